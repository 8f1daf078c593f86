//! `c3-agent watch`: sidecar mode. The agent syncs the directories of a job it did not
//! launch (a trainer in another container of the pod, sharing an `emptyDir`), and finishes
//! like `run` does (final scan, manifest, artifacts registration, terminal status) when the
//! job is over: a done file appears (holding the exit code, or `canceled`), the job's main
//! process exits, or the agent is stopped (SIGTERM: Kubernetes stops native sidecars once the
//! main containers ended; a job that was to write a done file and did not was killed).
//!
//! A Kubernetes sidecar that exits is restarted while the pod runs: with `stay`, the agent
//! waits for its SIGTERM after finishing, and a restarted agent finds the attempt finished
//! (it reports nothing again) or unfinished (it takes the attempt over, `seq` growing on).
//!
//! Such a job is never signalled, and its files are read as the owner of the watched
//! directories' parent (when the agent is root), not as root.

use std::io::Read;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use c3_proto::record::DirPin;
use c3_proto::{JobSpec, JobUser, Phase};

use crate::collector::CollectorHandle;
use crate::confine::DirFd;
use crate::context::AgentContext;
use crate::job::{fresh_record, Earlier, JobSummary, Run};
use crate::jobproc::JobProcesses;
use crate::outcome::JobEnd;
use crate::recover::Listed;
use crate::statedir::AttemptLock;

/// How often the done file and the main process are looked at.
const POLL: Duration = Duration::from_millis(200);
/// A done file is an exit code and a newline; more is not read.
const MAX_DONE_FILE: u64 = 64;

/// What `c3-agent watch` was asked to do.
#[derive(Debug, Clone)]
pub struct WatchPlan {
    pub job_id: String,
    pub attempt: u32,
    pub pid: Option<i32>,
    pub done_file: Option<PathBuf>,
    pub dirs: Vec<PathBuf>,
    /// Once finished, stay until stopped (a native sidecar that exits is restarted).
    pub stay: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// A bad argument: nothing was watched (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The attempt is left as it is, nothing reported, for a later start: the store did not
    /// answer, or the agent was stopped, while its answer was needed (exit 6, retryable).
    #[error("{0}")]
    Left(String),
    #[error(transparent)]
    Lock(#[from] crate::statedir::LockError),
    #[error(transparent)]
    State(#[from] crate::statedir::StateError),
}

impl WatchError {
    /// As [`crate::job::RunError::exit_code`]: another agent on the attempt and a bad
    /// argument are the caller's (exit 2); a state dir that cannot be read or written is the
    /// node's, and a scheduler takes exit 2 as a bad spec and fails the job for good.
    pub fn exit_code(&self) -> crate::outcome::ExitCode {
        match self {
            WatchError::Usage(_) | WatchError::Lock(crate::statedir::LockError::Held { .. }) => {
                crate::outcome::ExitCode::Usage
            }
            WatchError::Left(_)
            | WatchError::Lock(crate::statedir::LockError::State(_))
            | WatchError::State(_) => crate::outcome::ExitCode::AgentOrDataset,
        }
    }
}

impl WatchPlan {
    /// The one parent directory and each watched directory's name in it.
    fn layout(&self) -> Result<(PathBuf, Vec<String>), String> {
        let cwd =
            std::env::current_dir().map_err(|e| format!("cannot read the current dir: {e}"))?;
        let mut parent: Option<PathBuf> = None;
        let mut names: Vec<String> = Vec::new();
        for dir in &self.dirs {
            let abs: PathBuf = cwd.join(dir).components().collect();
            if abs.components().any(|c| c == Component::ParentDir) {
                return Err(format!("DIR `{}`: `..` is not allowed", dir.display()));
            }
            let (Some(up), Some(name)) = (abs.parent(), abs.file_name()) else {
                return Err(format!("DIR `{}` has no parent directory", dir.display()));
            };
            let name = name
                .to_str()
                .ok_or_else(|| format!("DIR `{}`: the name is not UTF-8", dir.display()))?
                .to_string();
            match &parent {
                None => parent = Some(up.to_path_buf()),
                Some(p) if p == up => {}
                Some(p) => {
                    return Err(format!(
                        "DIR `{}` is not in `{}`: the watched directories must share one parent",
                        dir.display(),
                        p.display()
                    ))
                }
            }
            if names.contains(&name) {
                return Err(format!("DIR `{}` is given twice", dir.display()));
            }
            names.push(name);
        }
        let parent = parent.ok_or("watch needs at least one DIR")?;
        Ok((parent, names))
    }
}

/// What `watch` did.
pub enum Watched {
    Finished(JobSummary),
    /// This attempt was finished by an earlier agent (a restarted sidecar): nothing was
    /// reported again. The exit code that agent had.
    AlreadyFinished(u8),
}

/// Ends an attempt stopped before the store said whether it already ran: CANCELED, and
/// nothing stored (no sync, no manifest), since what the store holds for it may be another
/// run's. With no watched dirs in its record, neither its finish nor a `recover` of it syncs
/// or seals anything.
async fn stopped_unclaimed(
    ctx: &AgentContext,
    record: c3_proto::record::RunRecord,
    lock: AttemptLock,
    cancel: &CancellationToken,
    started: std::time::Instant,
) -> JobSummary {
    let message = format!(
        "stopped before the store said whether attempt {} already ran: nothing of this watch was stored, and what the store holds for the attempt is left as it is",
        record.spec.attempt
    );
    tracing::warn!("{message}");
    let mut run = Run::with_user(ctx, record, None);
    run.lock = Some(lock);
    run.stop_requested = Some(crate::job::stop_clock(cancel));
    run.message = Some(message);
    run.finish(JobEnd::Canceled, started).await
}

/// Runs one watched attempt to its end. `cancel`: the agent was asked to stop.
pub async fn watch_job(
    ctx: &AgentContext,
    plan: WatchPlan,
    cancel: CancellationToken,
) -> Result<Watched, WatchError> {
    let stay = plan.stay;
    let begun = std::time::SystemTime::now();
    let watched = watch_attempt(ctx, plan, &cancel, begun).await?;
    if stay {
        tracing::info!("finished; staying until stopped (sidecar)");
        cancel.cancelled().await;
    }
    Ok(watched)
}

async fn watch_attempt(
    ctx: &AgentContext,
    plan: WatchPlan,
    cancel: &CancellationToken,
    begun: std::time::SystemTime,
) -> Result<Watched, WatchError> {
    c3_proto::spec::validate_job_id(&plan.job_id)
        .map_err(|e| WatchError::Usage(format!("--job-id {e}")))?;
    let (parent, names) = plan.layout().map_err(WatchError::Usage)?;
    // The first look, at once: what it finds was there before this watch began.
    let mut done_reader = DoneReader::start(plan.done_file.as_deref(), begun);
    // A pid already gone is a job that ended before its sidecar came up (a short job, a
    // sidecar OOM-killed and restarted after the trainer ended): its files are still the
    // job's, so it is watched and finished, never refused before anything is stored, where
    // that end is proven (below).
    let (mut leader, mut gone) = match plan.pid {
        Some(pid) if pid <= 0 => {
            return Err(WatchError::Usage(format!("--pid {pid}: not a process id")))
        }
        Some(pid) => match crate::procfs::identity(pid) {
            Some(id) => (Some(id), None),
            None => (None, Some(pid)),
        },
        None => (None, None),
    };
    // The parent may be a network volume, and the owner's groups come from NSS: either may
    // hang (a dead NFS server, sssd down), and unraced, a SIGTERM was never heard (the pod's
    // grace ran out to its SIGKILL). Nothing is claimed yet: a stop or a hang leaves the
    // attempt for a later start. The blocking task is left to end, or hang, on its own.
    let (job_user, parent_pin) = {
        let (p, n) = (parent.clone(), names.clone());
        let opened = tokio::task::spawn_blocking(move || open_dirs(&p, &n));
        let opened = tokio::select! {
            opened = opened => opened,
            () = cancel.cancelled() => return Err(WatchError::Left(format!(
                "stopped while the watched directories in {} were being opened; nothing watched",
                parent.display()
            ))),
            () = tokio::time::sleep(crate::prepare::NODE_LOOK_DEADLINE) => {
                return Err(WatchError::Left(format!(
                    "the watched directories in {} did not open within {} s (a hung network file system or name service?); nothing watched",
                    parent.display(),
                    crate::prepare::NODE_LOOK_DEADLINE.as_secs()
                )))
            }
        };
        opened
            .map_err(|e| WatchError::Usage(format!("cannot open the watched directories: {e}")))?
            .map_err(|e| {
                WatchError::Usage(format!(
                    "cannot open the watched directories in {}: {e}",
                    parent.display()
                ))
            })?
    };
    // Made by an earlier agent for this attempt (it may have died before its first record).
    let attempt_known = ctx.state.attempt_dir(&plan.job_id, plan.attempt).exists();
    // A pid not found at the attempt's first watch proves no end by itself: a pid of another
    // pid namespace (no shareProcessNamespace), one /proc hides (hidepid), a typo. Finished
    // as SUCCEEDED, the trainer still running there, its later files were never stored; nor
    // does a done file already there (an earlier attempt's, in a shared workdir, reads the
    // same). Only an earlier watch of this attempt (a restart) says the job ended.
    if let (Some(pid), false) = (gone, attempt_known) {
        return Err(WatchError::Usage(format!(
            "--pid {pid}: no such process here (it ended, lives in another pid namespace, or /proc hides it); nothing watched"
        )));
    }
    // The attempt's first start on this node (a restarted sidecar takes it over) never
    // replaces a manifest another run of it stored: a pod retried with the same `--attempt`,
    // a second sidecar on another node. Looked at after the clock and the pid were read: the
    // store may take a while to answer.
    // A stop during the look (up to `preflight_timeout_secs`) leaves the attempt unclaimed:
    // taken as "never ran", its final sync replaced the complete manifest of the run the
    // look was there to find (a retried pod stopped at once), and `gc` could then delete
    // that run's files.
    let mut unclaimed = false;
    if !attempt_known {
        // A manifest there this agent cannot take in (a newer agent's, another job's) read as
        // "never ran", and the watch's seal replaced it (another node's sidecar of the
        // attempt, a newer agent's run): left for a later start. A store that does not answer
        // yet (a pod up before its network) does not hold the watch back: its uploads retry.
        let asked = tokio::select! {
            stored = crate::job::stored_manifest(ctx, &plan.job_id, plan.attempt) => Some(stored),
            () = cancel.cancelled() => None,
        };
        match asked {
            Some(crate::job::Stored::Absent) => {}
            Some(crate::job::Stored::Unknown) => {
                tracing::warn!("the store did not say whether this attempt ran before (no answer within preflight_timeout_secs); watching it as a first run");
            }
            Some(crate::job::Stored::Unreadable | crate::job::Stored::Foreign) => {
                return Err(WatchError::Left(crate::job::cannot_take_in(
                    &plan.job_id,
                    plan.attempt,
                    "watched",
                )))
            }
            Some(stored @ (crate::job::Stored::Complete | crate::job::Stored::InProgress)) => {
                return Err(WatchError::Usage(crate::job::ran_already(
                    &plan.job_id,
                    plan.attempt,
                    stored == crate::job::Stored::Complete,
                )));
            }
            None => unclaimed = true,
        }
    }
    let lock = AttemptLock::acquire_patiently(&ctx.state, &plan.job_id, plan.attempt).await?;
    ctx.state.ensure_attempt_dir(&plan.job_id, plan.attempt)?;
    // Before anything says this attempt is known: a sidecar killed before its first look at
    // the done file answered leaves this word, and its restart looks afresh rather than honour
    // whatever is there (an earlier attempt's file).
    let remember = ctx
        .state
        .attempt_dir(&plan.job_id, plan.attempt)
        .join("done-before");
    if !attempt_known && plan.done_file.is_some() {
        // With the watch's start: a restart judges what it finds from then.
        keep_verdict(
            remember.clone(),
            format!("{LOOKING} {}", crate::display::epoch_ns(begun)),
        )
        .await;
    }
    // A record that cannot be read now (I/O) stops the watch, the record kept: watched over
    // it, `seq` began again below what the earlier sidecar sent. One that does not parse is
    // set aside and `seq` starts past anything it can have sent.
    let (earlier, set_aside) =
        match crate::job::read_earlier_record(ctx, &plan.job_id, plan.attempt).await? {
            Earlier::Record(record) => (Some(*record), None),
            Earlier::None => (None, None),
            Earlier::SetAside { seq } => (None, Some(seq)),
        };
    if let Some(done) = earlier.as_ref().filter(|r| r.phase == Phase::Done) {
        let exit = crate::outcome::recorded_exit(done).code();
        tracing::info!(job_id = %plan.job_id, attempt = plan.attempt, exit_code = exit,
            "this attempt was finished by an earlier agent; nothing to do");
        return Ok(Watched::AlreadyFinished(exit));
    }
    // The leader an earlier agent watched, its pid now another process's: the job ended.
    let recorded = earlier.as_ref().and_then(|r| r.watched_leader.as_ref());
    if let (Some(now), Some(was)) = (&leader, recorded) {
        if now.pid == was.pid && now != was {
            (leader, gone) = (None, Some(now.pid));
        }
    }
    let recorded = recorded.cloned();
    let span = tracing::info_span!("job", job_id = %plan.job_id, attempt = plan.attempt);
    async move {
        let started = std::time::Instant::now();
        let spec = JobSpec {
            job_id: plan.job_id.clone(),
            project: None,
            attempt: plan.attempt,
            command: vec!["c3-agent".into(), "watch".into()],
            workdir: Some(parent.display().to_string()),
            env: Default::default(),
            output: Vec::new(),
            timeout_secs: None,
            user: None,
            datasets: Vec::new(),
        };
        // A sidecar taking an attempt over honours any done file (written while none watched),
        // as does one whose job ended before it began.
        if attempt_known || gone.is_some() {
            done_reader.resume(&remember);
        } else {
            done_reader.remembering(&remember);
        }
        let mut record = fresh_record(ctx, spec);
        if let Some(seq) = set_aside {
            record.seq = seq;
        }
        if unclaimed {
            return Ok(Watched::Finished(
                stopped_unclaimed(ctx, record, lock, cancel, started).await,
            ));
        }
        record.watched_dirs = Some(names.clone());
        // The identity an earlier agent watched stays when its pid is another process's now
        // (`gone`): saved as none, the next restart took that process for the job's leader.
        record.watched_leader = leader.clone().or(recorded);
        record.job_user = job_user;
        record.workdir_pin = Some(parent_pin);
        if let Some(earlier) = &earlier {
            // A restarted sidecar takes the attempt over: statuses go on past its seq (the
            // last one saved, not always the last one sent: a status goes out even when its
            // record could not be written, and one sent again with that seq is dropped as a
            // duplicate), what it learnt of the job's end (an OOM kill) stands, and so does
            // its run id (a manifest it sealed is this run's own, not another node's).
            tracing::warn!(
                seq = earlier.seq,
                "taking over an attempt an earlier agent left unfinished"
            );
            record.seq = earlier
                .seq
                .saturating_add(crate::job::SEQ_GAP_AFTER_ITS_AGENT);
            record.facts = earlier.facts.clone();
            // What it registered already: counted again from the attempt's added blobs, the
            // quota was charged twice.
            record.synced = earlier.synced.clone();
            // A terminal status it may have sent before it died (its `done` unsaved) is not
            // made worse by what this run's look cannot see any more.
            if earlier.phase == Phase::Finishing {
                record.concluded_upload_errors = earlier.concluded_upload_errors;
                record.unstored.clone_from(&earlier.unstored);
                record.unstored_more = earlier.unstored_more;
                record.unstored_for_good = earlier.unstored_for_good;
            }
            if earlier.run_id.is_some() {
                record.run_id.clone_from(&earlier.run_id);
            }
        }
        // An earlier agent that saw the job end (it was in its final sync) left the end in the
        // record: finish that, never watch again (a RUNNING after FINALIZING, and a done file
        // read anew, could tell another story than the one already reported).
        let ended = earlier
            .as_ref()
            .filter(|r| {
                r.phase == Phase::Finishing
                    // Ended, and killed before its final sync began (saved with FINALIZING).
                    || (r.phase == Phase::Running && crate::outcome::end_noted(r))
            })
            // An end `recover` found lost (its AGENT_ERROR may have gone) is finished so too:
            // watched again, the attempt went FAILED, RUNNING, SUCCEEDED.
            .map(crate::recover::recorded_end);
        let mut run = Run::with_user(ctx, record, None);
        run.lock = Some(lock);
        run.stop_requested = Some(crate::job::stop_clock(cancel));
        // A restart goes on from what the attempt's manifest lists, as `recover` does: what
        // the earlier watch stored stays listed wherever the final scan cannot look (a dir
        // refused or gone), never sealed over by an empty list for gc to take its blobs.
        // Over a record set aside unread, a complete
        // manifest says the attempt finished (watched again, it got a second terminal status
        // and its manifest replaced), and no answer leaves the attempt as it is, nothing
        // reported, for the next start.
        if attempt_known {
            let say = |why: String| {
                format!(
                    "job {} attempt {}: {why}; the attempt is left as it is, nothing reported",
                    plan.job_id, plan.attempt
                )
            };
            // What the store said (it ran; not this agent's to take in) stands; its silence
            // or a stop passes, and a later start asks again.
            let left = |why: String| Err(WatchError::Usage(say(why)));
            let later = |why: String| Err(WatchError::Left(say(why)));
            let asked = tokio::select! {
                listed = tokio::time::timeout(
                    ctx.preflight_timeout,
                    crate::recover::listed_before(ctx, &run.record),
                ) => Some(listed),
                () = cancel.cancelled() => None,
            };
            match asked {
                Some(Ok(Ok(Listed::Before(Some(m))))) if set_aside.is_some() && m.complete => {
                    return left("its run record did not parse and its manifest in the store is complete: it already ran".into());
                }
                Some(Ok(Ok(Listed::Before(m)))) => run.listed_before(m.map(|m| *m)),
                Some(Ok(Ok(Listed::Unknown))) => run.earlier_listing_unknown(),
                Some(Ok(Ok(Listed::NotThisAgents))) => {
                    return left("its manifest in the store is not one this agent can take in".into());
                }
                // Misrouted, likely to pass: not the job's fault (exit 2 failed it for good).
                Some(Ok(Ok(Listed::Foreign))) => {
                    return later("its manifest key in the store holds another job's or attempt's manifest".into());
                }
                // Over a readable record the watch goes on without it (a store blip must not
                // keep a restarted sidecar from its final sync: the pod's files go with it),
                // writing no manifest over the earlier sidecar's unless the final scan sees
                // all of the output: an in-progress one from what this watch alone stored
                // replaced it, and gc took what only that one listed.
                Some(Ok(Err(e))) if set_aside.is_none() => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot read the attempt's manifest in the store; watching on from what the scan finds (its manifest replaced only if the final scan sees all of the output)");
                    run.earlier_listing_unknown();
                }
                Some(Err(_)) | None if set_aside.is_none() => {
                    tracing::warn!("the attempt's manifest in the store was not read in time; watching on from what the scan finds (its manifest replaced only if the final scan sees all of the output)");
                    run.earlier_listing_unknown();
                }
                Some(Ok(Err(e))) => {
                    return later(format!(
                        "cannot read its manifest in the store ({})",
                        crate::error_chain(&e)
                    ));
                }
                Some(Err(_)) => {
                    return later("the store did not answer within preflight_timeout_secs".into())
                }
                None => return later("stopped while reading its manifest in the store".into()),
            }
        }
        if let Some(end) = ended {
            tracing::warn!(end = ?end, "the job had ended when the earlier agent stopped; finishing its final sync");
            run.collector = Some(CollectorHandle::start(
                run.collector_config.clone(),
                Some(JobProcesses::watched(None)),
            ));
            return Ok(Watched::Finished(run.finish(end, started).await));
        }
        run.record.phase = Phase::Running;
        let seq = run.next_seq().await;
        run.reports.running(seq, ctx.report_deadline());
        let procs = JobProcesses::watched(leader.as_ref());
        // Its tree at once: a leader that ends soon may leave a writer behind.
        let _ = procs.members_async().await;
        run.collector = Some(CollectorHandle::start(
            run.collector_config.clone(),
            Some(procs.clone()),
        ));
        // The trainer owns the host while it runs, as under `run`: live sync's hashing, scans
        // and looks at `/proc` ran at the normal priority on every CPU, `sync.live_cpus`
        // unheard.
        crate::pace::set_live_cpus(ctx.live_cpus());
        crate::pace::set_gentle(true);
        let live_cpus = crate::pace::cpus_shown(ctx.live_cpus());
        tracing::info!(dir = %parent.display(), watched = ?names, pid = ?plan.pid,
            done_file = ?plan.done_file, live_cpus, "watching a job's directories (sidecar mode)");
        crate::sdnotify::ready("watching the job's directories");
        let Ended { end, message, oom } = match gone {
            Some(pid) => ended_before(&plan, pid, done_reader).await,
            None => wait_for_end(&plan, leader.as_ref(), &procs, cancel, done_reader).await,
        };
        // Its end is the final sync's: the whole host.
        crate::pace::set_gentle(false);
        // Saved with FINALIZING's record, as under `run`: a sidecar killed after it and
        // restarted watched again (a RUNNING after FINALIZING, the done file read anew), and
        // a `recover` ended the attempt AGENT_ERROR though its exit was known.
        crate::outcome::note_end(&end, &mut run.record);
        if end != JobEnd::Canceled {
            // The job says it is over (its own processes are out of sight here).
            let facts = oom.then(|| c3_proto::JobFacts {
                oom_kills: 1,
                ..Default::default()
            });
            // An OOM kill an earlier sidecar learnt of stands.
            let facts = facts.or_else(|| run.record.facts.clone());
            // With `--pid`, what its leader left running is in sight: a process still holding
            // the GPU after the waits (a TensorBoard, a save that writes nothing) is said, and
            // a scheduler does not place the next job on it as if it were free.
            let gone = leader.is_none() || gone_within(&procs, GONE_WAIT).await;
            run.gpu_released(facts, gone).await;
            crate::fault::crash_point("crash-after-gpu-released");
        }
        run.message = message;
        Ok(Watched::Finished(run.finish(end, started).await))
    }
    .instrument(span)
    .await
}

/// Opens the parent and each watched directory in it, never through a symlink. A missing
/// one is created as its parent is (owner and mode), as if the job had made it: the job
/// (another container, another user) must be able to write into it. Returns whom the
/// job's files are read as: the parent's owner, when the agent is root and that is not root;
/// and which directory the parent is, for the run record.
fn open_dirs(parent: &Path, names: &[String]) -> std::io::Result<(Option<JobUser>, DirPin)> {
    // No symlink anywhere on the way: a job that may write above its dirs (a scratch dir of
    // its own) must not point the agent at another tenant's tree.
    let fd = from_root(parent, |root, rel| root.open_dir(rel))?;
    // The scans, uploads and watches that follow open `parent` by path: pinned, a component
    // swapped for a symlink after this check is refused there.
    fd.pin(parent, Some(Path::new("/")))?;
    let meta = nix::sys::stat::fstat(&fd)?;
    let (uid, gid, mode) = (meta.st_uid, meta.st_gid, meta.st_mode as u32);
    let owner = nix::unistd::geteuid().is_root().then_some((uid, gid));
    for name in names {
        fd.ensure_dir_with(Path::new(name), |_| (mode & 0o7777, owner))?;
    }
    let reader = match owner {
        Some((uid, gid)) if uid != 0 => Some(JobUser {
            uid,
            gids: groups_of(uid).unwrap_or_else(|| vec![gid]),
        }),
        // A root-owned parent (an emptyDir, a root prolog's mkdir) names no job user: read
        // only what anyone may, never what root alone may (a file renamed in by someone else);
        // what that leaves out is an upload failure, not a quiet skip (a root trainer's 0600
        // checkpoint is the job's).
        Some(_) => Some(JobUser {
            uid: crate::confine::UNKNOWN_OWNER_UID,
            gids: Vec::new(),
        }),
        None => None,
    };
    Ok((reader, fd.pin_id()?))
}

fn groups_of(uid: u32) -> Option<Vec<u32>> {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok()??;
    let name = std::ffi::CString::new(user.name).ok()?;
    let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
    Some(groups.into_iter().map(|g| g.as_raw()).collect())
}

/// How the watched job ended, as far as the agent can tell.
struct Ended {
    end: JobEnd,
    message: Option<String>,
    /// The kernel's log says the OOM killer killed the job's main process.
    oom: bool,
}

impl From<(JobEnd, Option<String>)> for Ended {
    fn from((end, message): (JobEnd, Option<String>)) -> Self {
        Ended {
            end,
            message,
            oom: false,
        }
    }
}

/// How long the processes a `--pid` leader left behind (a `save.py &`) are waited for while
/// they write files, and while they do not (a save still computing, or a TensorBoard that
/// never ends and must not hold the GPU's release long).
const LEFT_BEHIND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const LEFT_BEHIND_IDLE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits, bounded, for what the leader left running (the leader itself aside: a wrapper that
/// wrote the done file): what they write is the job's, and the final sync would store it cut
/// short.
async fn left_behind(procs: &JobProcesses, cancel: &CancellationToken) {
    let begun = tokio::time::Instant::now();
    loop {
        let (p, leader) = (procs.clone(), procs.leader());
        let look = tokio::task::spawn_blocking(move || {
            crate::fault::blocking_pause("left-behind-hangs", std::time::Duration::from_secs(600));
            let left: Vec<i32> = p.members().into_iter().filter(|&q| q != leader).collect();
            let writing = !crate::procfs::written_by(&left).is_empty();
            (left, writing)
        });
        // A look at a process's fds or maps can hang (a file open on a dead NFS server, a
        // fault stuck on the job's own FUSE mount): the wait is bounded whatever the look
        // does, and a stop is heard; the look is then left to end on its own.
        let until = begun + LEFT_BEHIND_WAIT;
        let looked = tokio::select! {
            looked = tokio::time::timeout_at(until, look) => looked,
            () = cancel.cancelled() => return,
        };
        let Ok(looked) = looked else {
            tracing::warn!("the look at what the job's main process left behind does not end; syncing without it");
            return;
        };
        let (left, writing) = looked.unwrap_or_default();
        if left.is_empty() || cancel.is_cancelled() {
            return;
        }
        let limit = if writing {
            LEFT_BEHIND_WAIT
        } else {
            LEFT_BEHIND_IDLE_WAIT
        };
        if begun.elapsed() >= limit {
            tracing::warn!(processes = left.len(), "processes the job's main process left behind still write files; syncing without waiting for them (those files may be stored incomplete)");
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until the job is over; a stop request first looks whether it is (Kubernetes stops
/// a sidecar after the main containers ended).
async fn wait_for_end(
    plan: &WatchPlan,
    leader: Option<&c3_proto::ProcIdentity>,
    procs: &JobProcesses,
    cancel: &CancellationToken,
    mut done_reader: DoneReader,
) -> Ended {
    let mut tick = tokio::time::interval(POLL);
    let mut looks = 0u32;
    loop {
        let stopped = tokio::select! {
            _ = tick.tick() => false,
            _ = cancel.cancelled() => true,
        };
        // Once a second while the leader lives: its tree as it is, so that a process it
        // leaves behind is known as the job's once re-parented away.
        looks = looks.wrapping_add(1);
        if leader.is_some() && looks % 5 == 1 {
            let _ = procs.members_async().await;
        }
        let said = match plan.done_file.as_deref() {
            Some(done) => done_reader.look(done).await,
            None => Look::Absent,
        };
        if let Look::Said(said) = said {
            if leader.is_some() {
                // The wrapper says it is over; what the trainer left behind may still write.
                left_behind(procs, cancel).await;
            }
            return said.end().into();
        }
        if let Some(leader) = leader {
            if !crate::procfs::is_alive(leader) {
                tracing::info!(pid = leader.pid, "the job's main process ended");
                // Under Slurm, scancel and the time limit signal the whole job at once: the
                // trainer dies of the SIGTERM this agent is sent too, and one look may see its
                // death a moment before the agent's own stop. Both are the job stopped, not its
                // own end (it was SUCCEEDED, "exit code unknown"). Not elsewhere: Kubernetes
                // stops a sidecar right after every trainer's end, its own ones included (as
                // `run` waits for a stop only under Slurm or after a death by a stop signal).
                let stopped = crate::slurm::under_slurm()
                    && (stopped
                        || tokio::time::timeout(
                            crate::supervise::STOP_WITH_END,
                            cancel.cancelled(),
                        )
                        .await
                        .is_ok());
                left_behind(procs, cancel).await;
                if let Some(said) = done_after_end(plan, &mut done_reader).await {
                    return said.into();
                }
                // Not our child, so no exit status: the kernel's log still tells an OOM kill.
                let life = crate::kernlog::Lifetime {
                    from_us: crate::procfs::start_micros(leader.start_ticks),
                    until_us: crate::procfs::now_micros().saturating_add(30_000_000),
                };
                let processes = std::collections::BTreeMap::from([(leader.pid, life)]);
                let ticket =
                    tokio::task::spawn_blocking(move || crate::kernlog::oom_killed(&processes));
                if ticket.await.unwrap_or(false) {
                    tracing::warn!(
                        pid = leader.pid,
                        "the kernel's OOM killer killed the job's main process"
                    );
                    return Ended {
                        end: JobEnd::Killed("SIGKILL".into()),
                        message: Some(format!(
                            "process {} was killed by the kernel's OOM killer",
                            leader.pid
                        )),
                        oom: true,
                    };
                }
                if stopped {
                    tracing::warn!(
                        pid = leader.pid,
                        "the job's main process ended with the agent's stop; canceled"
                    );
                    return stop_end().await.into();
                }
                if plan.done_file.is_some() {
                    return killed().into();
                }
                return (
                    JobEnd::Exited(0),
                    Some(format!(
                        "process {} ended; its exit code is unknown to the agent (write it to --done-file)",
                        leader.pid
                    )),
                )
                    .into();
            }
        }
        if stopped {
            if leader.is_some() {
                // Its main process still runs (it was alive just above): the agent is stopped
                // with the job (scancel, a pod deletion), not after it.
                tracing::warn!("agent asked to stop while the job's main process runs; canceled");
                return stop_end().await.into();
            }
            if let Some(done) = plan.done_file.as_deref() {
                // A read still under way (a network mount slow just after the last
                // checkpoint) may hold the job's own word: it gets a few seconds of the stop
                // deadline, and one read begun after the stop, before the job is called killed.
                if let Some(said) = done_reader.last_word(done).await {
                    return said.end().into();
                }
                // Kubernetes stops a sidecar only after the main containers ended, and the
                // job's wrapper writes its done file (`canceled` on a pod deletion) before it
                // exits: a job that wrote none was killed (OOM, SIGKILL).
                tracing::warn!(
                    "agent asked to stop, and the job never wrote its done file: it was killed"
                );
                return killed().into();
            }
            tracing::warn!("agent asked to stop before the job said it was done; canceled");
            return (JobEnd::Canceled, Some("canceled".into())).into();
        }
    }
}

/// What the done file says once the job's main process ended, looked at for a few seconds:
/// its wrapper may still be writing it.
async fn done_after_end(
    plan: &WatchPlan,
    done_reader: &mut DoneReader,
) -> Option<(JobEnd, Option<String>)> {
    let done = plan.done_file.as_deref()?;
    for _ in 0..10 {
        if let Look::Said(said) = done_reader.look(done).await {
            return Some(said.end());
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

/// The end of a job whose main process (`--pid`) had ended before the watch began: as that
/// process ending under watch, save the OOM look (no start time to bound the kernel log's
/// search by) and a stop (the job's end came first, whatever stopped the agent).
async fn ended_before(plan: &WatchPlan, pid: i32, mut done_reader: DoneReader) -> Ended {
    if let Some(said) = done_after_end(plan, &mut done_reader).await {
        tracing::warn!(
            pid,
            "the job's main process had ended before the watch began"
        );
        return said.into();
    }
    if plan.done_file.is_some() {
        tracing::warn!(
            pid,
            "the job's main process had ended before the watch began, and wrote no done file"
        );
        return killed().into();
    }
    tracing::warn!(pid, "the job's main process had ended before the watch began; its exit code is unknown, reported as SUCCEEDED (give --done-file to know it)");
    (
        JobEnd::Exited(0),
        Some(format!(
            "process {pid} had ended before the watch began; its exit code is unknown to the agent (write it to --done-file)"
        )),
    )
        .into()
}

/// How long the watched processes get to be gone before FINALIZING says whether the GPU is
/// released: a wrapper that wrote the done file is still exiting a moment after.
const GONE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether nothing of the watched job is left, looked at until `wait` has passed.
async fn gone_within(procs: &JobProcesses, wait: std::time::Duration) -> bool {
    let until = tokio::time::Instant::now() + wait;
    loop {
        if procs.all_gone().await {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How a watched job the agent was stopped with ended, as a launched one does: TIMED_OUT
/// when Slurm stopped it for its time limit, else CANCELED.
async fn stop_end() -> (JobEnd, Option<String>) {
    crate::supervise::stop_end(crate::slurm::stopped_by_time_limit(crate::slurm::ASK_WITHIN).await)
}

/// `abs`, opened from `/` with no symlink in any component (`DirFd`'s rules).
pub(crate) fn from_root<T>(
    abs: &Path,
    open: impl FnOnce(&DirFd, &Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let rel = abs.strip_prefix("/").map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an absolute path")
    })?;
    crate::confine::below_root(Path::new("/"), rel, open)
}

/// A job that was to write a done file and ended without one.
fn killed() -> (JobEnd, Option<String>) {
    (
        JobEnd::Killed("unknown".into()),
        Some(
            "the job ended without writing its done file (killed: out of memory, SIGKILL?)".into(),
        ),
    )
}

impl DoneFile {
    fn end(self) -> (JobEnd, Option<String>) {
        tracing::info!(said = ?self, "the job says it is done");
        match self {
            DoneFile::Exit(code) => (JobEnd::Exited(code), None),
            DoneFile::Canceled => (JobEnd::Canceled, Some("canceled".into())),
            // Fail closed: an exit nobody can read is not a success.
            DoneFile::Unclear => (
                JobEnd::Exited(-1),
                Some("the done file holds no exit code (an integer, or `canceled`)".into()),
            ),
            DoneFile::Unreadable => (
                JobEnd::Exited(-1),
                Some(
                    "the done file is not one the owner of its directory may read; not read".into(),
                ),
            ),
        }
    }
}

/// What a done file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DoneFile {
    Exit(i32),
    /// The job's wrapper was stopped (a pod deletion) and stopped the job.
    Canceled,
    /// Neither: the job is over, how is unknown.
    Unclear,
    /// There, but not readable by whom the job's files are read as (see
    /// [`done_file_reader`]): not read, so that a file the job may not read (a root-only
    /// one hard-linked to the done file's name) tells nothing of itself through the status.
    Unreadable,
}

/// Which version of the done file is there.
type DoneStamp = crate::collect::FileStamp;

/// What one look at the done file found.
enum Look {
    Said(DoneFile),
    /// Not there, empty, or from before this attempt.
    Absent,
    /// The read has not answered yet (it goes on; the next look waits for it again).
    Pending,
}

/// How long a stop request waits for the done file's read to answer.
const STOP_READ_WAIT: Duration = Duration::from_secs(5);

/// Reads the done file off the reactor, one read at a time: a look that finds the last read
/// still hanging does not start another (each would hold a blocking thread), and a FUSE
/// mount a job made there (`allow_other`) could hold a read forever, and the reactor with it.
#[derive(Default)]
struct DoneReader {
    pending: Option<tokio::task::JoinHandle<DoneRead>>,
    /// Which done file is an earlier attempt's.
    before: Before,
    warned_stale: bool,
    /// Where the first look's verdict on an earlier attempt's done file is kept for a
    /// sidecar restarted over this attempt (`<attempt>/done-before`): kept in memory alone,
    /// a restart honoured that file, and a trainer still running was reported SUCCEEDED.
    remember: Option<PathBuf>,
}

/// A done file there before the watch began (a workdir a retry shares, a Slurm submit dir) is
/// not this attempt's word: ignored until it is written again. Told by the file itself (its
/// size, times, or its appearing), not by its time against this node's clock: an NFS
/// server's clock is its own, and one ahead made an earlier attempt's file end the watch at
/// once, one behind made this attempt's be ignored.
#[derive(Default)]
enum Before {
    /// Every done file is the job's word: a sidecar taking an attempt over, or no done file
    /// in its directory at the first look.
    #[default]
    Nothing,
    /// The first look, begun as the agent began (`begun_ns` on this node's clock, `begun`
    /// to measure from), has not answered, or failed (an I/O error, a symlink on the way
    /// that is later renamed away): what a later look finds may have been there all along.
    Looking {
        begun_ns: i64,
        begun: Instant,
        /// A look failed (a mount starting up, ESTALE): the one that answers may be late,
        /// and a file written since the agent began is still the job's.
        failed: bool,
        /// A restarted sidecar's look, `begun_ns` the first watch's start, which died before
        /// any look of its own answered: a file written since then (the trainer finished
        /// while no sidecar ran) is the job's, whenever this look answers.
        since_first: bool,
    },
    /// The first look found no directory for the done file: one that comes later (made,
    /// mounted or renamed into place) may bring an earlier attempt's file, which only its
    /// time, long before the agent began, can tell. When the agent began is worked out at
    /// each judgment from `begun` (monotonic), on the clock as it is then: taken from the
    /// clock at the start, a step back since (NTP correcting a clock that was ahead) made
    /// this attempt's own done file look older than the agent, ignored until the clock
    /// caught up.
    NoDir { begun: Instant },
    /// What the first look found. `fresh`: a trainer that finished while the agent started
    /// wrote it, by its time (which alone can tell): its own word.
    Found { stamp: DoneStamp, fresh: bool },
}

impl Before {
    /// Whether the done file in this version is an earlier attempt's.
    fn is_earlier(&self, stamp: &DoneStamp) -> bool {
        match self {
            Before::Nothing | Before::Looking { .. } => false,
            Before::NoDir { begun } => {
                stamp.ctime_ns < wall_ns_of(*begun).saturating_sub(LONG_BEFORE_NS)
            }
            // Not the device and inode: gcsfuse numbers inodes anew once the kernel forgets
            // them, CIFS with `noserverino` makes them up, and a remount changes the device,
            // and the unchanged old file then counted as written again.
            Before::Found {
                stamp: first,
                fresh,
            } => {
                !fresh
                    && (first.size, first.mtime_ns, first.ctime_ns)
                        == (stamp.size, stamp.mtime_ns, stamp.ctime_ns)
            }
        }
    }
}

/// What this node's clock says `at` (a monotonic instant) was, read now: a step of the clock
/// between `at` and now moves the answer with it, as it moved the times of files written
/// since.
fn wall_ns_of(at: Instant) -> i64 {
    let (now, wall) = (
        Instant::now(),
        crate::display::epoch_ns(std::time::SystemTime::now()),
    );
    match now.checked_duration_since(at) {
        Some(ago) => wall.saturating_sub(ago.as_nanos() as i64),
        // Later than now: only a test's.
        None => wall.saturating_add(at.saturating_duration_since(now).as_nanos() as i64),
    }
}

/// How long before the agent began a done file that came with its directory was written, to
/// be taken for an earlier attempt's: well past any clock a file server keeps apart from this
/// node's, so that this attempt's own (in a directory the job made) is not ignored.
const LONG_BEFORE_NS: i64 = 600_000_000_000;

/// The most a span of failed first looks counts for a done file written as they failed.
const FAILED_LOOKS_SPAN_NS: i64 = 60_000_000_000;

/// How far a done file's time may lie from this node's clock and still be taken as written
/// while the agent started: file times move once a tick (seconds on some file systems), and
/// a server's clock is a little apart.
const FRESH_MARGIN_NS: i64 = 2_000_000_000;

impl DoneReader {
    /// Begins the first look at `path` now, as the agent begins (`begun`).
    fn start(path: Option<&Path>, begun: std::time::SystemTime) -> DoneReader {
        let Some(path) = path else {
            return DoneReader::default();
        };
        DoneReader {
            pending: Some(read_in_background(path)),
            before: Before::Looking {
                begun_ns: crate::display::epoch_ns(begun),
                begun: Instant::now(),
                failed: false,
                since_first: false,
            },
            warned_stale: false,
            remember: None,
        }
    }

    /// A sidecar taking an attempt over: the done file is this attempt's, whenever written,
    /// unless the attempt's first watch found an earlier attempt's there (`remember`), which
    /// stays ignored until it is written again.
    fn resume(&mut self, remember: &Path) {
        self.remember = Some(remember.to_path_buf());
        let kept = std::fs::read_to_string(remember).unwrap_or_default();
        if let Some(first) = kept.trim().strip_prefix(LOOKING) {
            // The first watch was stopped before its first look answered: this one's own
            // first look (under way) judges what is there, by the first watch's start (an
            // older agent's word names none: by this one's). A file the trainer wrote while
            // no sidecar ran was taken, by this start, for an earlier attempt's.
            if let (Ok(begun_ns), Before::Looking { .. }) =
                (first.trim().parse::<i64>(), &self.before)
            {
                self.before = Before::Looking {
                    begun_ns,
                    begun: Instant::now(),
                    failed: false,
                    since_first: true,
                };
            }
            return;
        }
        self.before = parse_kept_stamp(&kept).map_or(Before::Nothing, |stamp| Before::Found {
            stamp,
            fresh: false,
        });
    }

    /// Keeps where the first look's verdict goes ([`DoneReader::remember`]).
    fn remembering(&mut self, remember: &Path) {
        self.remember = Some(remember.to_path_buf());
    }

    /// Waits up to [`POLL`] for the read under way (or a new one).
    async fn look(&mut self, path: &Path) -> Look {
        let pending = self.pending.get_or_insert_with(|| read_in_background(path));
        let Ok(read) = tokio::time::timeout(POLL, pending).await else {
            return Look::Pending;
        };
        self.pending = None;
        let (read, answered) =
            read.unwrap_or_else(|e| (Err(DoneError::Failed(e.into())), Instant::now()));
        if let Before::Looking {
            begun_ns,
            begun,
            failed,
            since_first,
        } = self.before
        {
            // Only a time can tell a trainer that finished before the first look from an
            // earlier attempt: one between the agent's start and the look's answer, give or
            // take the margin (an hour-old file, or one in this node's future, is neither).
            // A look that answered late (a slow mount, a first look that failed and was
            // tried again) would stretch that span over an earlier attempt's file on a server
            // whose clock is ahead: its file is then the earlier attempt's, whatever its time.
            let took = answered.saturating_duration_since(begun).as_nanos() as i64;
            // Failed looks stretch the span by no more than a minute: a server clock ahead by
            // less than a long span would take an earlier attempt's file for a fresh one.
            let until_ns = match since_first {
                true => crate::display::epoch_ns(std::time::SystemTime::now()),
                false => begun_ns.saturating_add(if failed {
                    took.min(FAILED_LOOKS_SPAN_NS)
                } else {
                    took
                }),
            };
            // After a failed look, the late answer is no stretch of the span but the first
            // that could tell: a trainer that wrote its file while the looks failed (more
            // than the margin, a mount coming up) was ignored for good.
            let quick = took <= FRESH_MARGIN_NS || failed || since_first;
            match &read {
                Ok(Some((_, stamp))) => {
                    let fresh = quick
                        && (begun_ns - FRESH_MARGIN_NS..=until_ns + FRESH_MARGIN_NS)
                            .contains(&stamp.ctime_ns);
                    self.before = Before::Found {
                        stamp: *stamp,
                        fresh,
                    };
                }
                Ok(None) | Err(DoneError::Absent) => self.before = Before::Nothing,
                Err(DoneError::NoDir) => self.before = Before::NoDir { begun },
                Err(DoneError::Failed(e)) => {
                    tracing::debug!(done_file = %path.display(), error = %e, "the first look at the done file failed; looking again");
                    self.before = Before::Looking {
                        begun_ns,
                        begun,
                        failed: true,
                        since_first,
                    };
                }
            }
            // The verdict, kept for a restart: an earlier attempt's file by its stamp; any
            // other (none there, a fresh one, one that will come with its directory, judged
            // by its time as long as this watch runs) honours what comes. Not yet judged
            // (the look failed): still `looking`.
            let verdict = match &self.before {
                Before::Found {
                    stamp,
                    fresh: false,
                } => Some(kept_stamp(stamp)),
                Before::Looking { .. } => None,
                Before::Found { fresh: true, .. } | Before::Nothing | Before::NoDir { .. } => {
                    Some(HONOUR_ANY.to_string())
                }
            };
            if let (Some(verdict), Some(remember)) = (verdict, self.remember.clone()) {
                keep_verdict(remember, verdict).await;
            }
        }
        match read {
            Ok(Some((_, stamp))) if self.before.is_earlier(&stamp) => {
                if !self.warned_stale {
                    self.warned_stale = true;
                    tracing::warn!(done_file = %path.display(), "a done file is there before the job started (an earlier attempt's?): ignored until it is written again");
                }
                Look::Absent
            }
            Ok(Some((said, _))) => Look::Said(said),
            Ok(None) | Err(_) => Look::Absent,
        }
    }

    /// After a stop request: what the done file says, waiting up to [`STOP_READ_WAIT`] for a
    /// read begun after the request to answer (one already under way may predate the file).
    async fn last_word(&mut self, path: &Path) -> Option<DoneFile> {
        let until = tokio::time::Instant::now() + STOP_READ_WAIT;
        let mut began_before = self.pending.is_some();
        loop {
            let in_time = tokio::time::Instant::now() < until;
            match self.look(path).await {
                Look::Said(said) => return Some(said),
                Look::Pending if in_time => {}
                Look::Absent if began_before && in_time => began_before = false,
                Look::Pending | Look::Absent => return None,
            }
        }
    }
}

/// What `done-before` says while the first watch's first look has not answered.
const LOOKING: &str = "looking";
/// What `done-before` says when no done file was there at the first look (or it was fresh).
const HONOUR_ANY: &str = "none";

/// `size mtime_ns ctime_ns` of an earlier attempt's done file, as `done-before` keeps it.
fn kept_stamp(stamp: &DoneStamp) -> String {
    format!("{} {} {}", stamp.size, stamp.mtime_ns, stamp.ctime_ns)
}

/// A [`kept_stamp`] read back.
fn parse_kept_stamp(kept: &str) -> Option<DoneStamp> {
    let mut fields = kept.split_whitespace();
    let size = fields.next()?.parse().ok()?;
    let mtime_ns = fields.next()?.parse().ok()?;
    let ctime_ns = fields.next()?.parse().ok()?;
    Some(DoneStamp {
        size,
        mtime_ns,
        ctime_ns,
        ino: 0,
        dev: 0,
        mode: 0,
    })
}

/// Keeps the first watch's word on the done file at `remember` (off the reactor; a failure
/// is said, and a restart then judges as it can).
async fn keep_verdict(remember: PathBuf, verdict: String) {
    let line = format!("{verdict}\n");
    let shown = remember.clone();
    let kept = tokio::task::spawn_blocking(move || {
        crate::statedir::write_atomic(&remember, line.as_bytes())
    })
    .await;
    if let Ok(Err(e)) = kept {
        tracing::warn!(path = %shown.display(), error = %crate::error_chain(&e), "cannot keep which done file is an earlier attempt's; a restarted sidecar would take it for this one's");
    }
}

/// What one read of the done file found, and when it answered.
type DoneRead = (Result<Option<(DoneFile, DoneStamp)>, DoneError>, Instant);

/// Why a read of the done file found no word.
#[derive(Debug)]
enum DoneError {
    /// Not in its directory.
    Absent,
    /// Its directory is not there either.
    NoDir,
    /// Anything else: whether the file is there is unknown.
    Failed(std::io::Error),
}

fn read_in_background(path: &Path) -> tokio::task::JoinHandle<DoneRead> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || (read_done_file(&path), Instant::now()))
}

/// `Ok(None)`: there, but not a regular file, or still empty (a wrapper that writes it in
/// place may not have written it yet). Never through a symlink, at most `MAX_DONE_FILE` bytes,
/// and only a file the owner of its directory may read ([`done_file_reader`]).
fn read_done_file(path: &Path) -> Result<Option<(DoneFile, DoneStamp)>, DoneError> {
    use std::io::ErrorKind::NotFound;
    crate::fault::blocking_pause("slow-done-read", Duration::from_secs(1));
    let (dir, name) = match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => (dir, Path::new(name)),
        _ => return Err(DoneError::Failed(std::io::ErrorKind::InvalidInput.into())),
    };
    let dir = match from_root(dir, |root, rel| root.open_dir(rel)) {
        Ok(dir) => dir,
        Err(e) if e.kind() == NotFound => return Err(DoneError::NoDir),
        Err(e) => return Err(DoneError::Failed(e)),
    };
    let file = match dir.open_file(name) {
        Ok(file) => file,
        Err(e) if e.kind() == NotFound => return Err(DoneError::Absent),
        Err(e) => return Err(DoneError::Failed(e)),
    };
    let st = crate::confine::fstat(&file).map_err(DoneError::Failed)?;
    if !crate::confine::is_regular(&st) {
        return Ok(None);
    }
    let stamp = DoneStamp::of_stat(&st);
    if !done_file_reader(&dir, &file, &st).map_err(DoneError::Failed)? {
        return Ok(Some((DoneFile::Unreadable, stamp)));
    }
    let mut text = String::new();
    let _ = file.take(MAX_DONE_FILE).read_to_string(&mut text);
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let said = match text.parse() {
        Ok(code) => DoneFile::Exit(code),
        Err(_) if text.eq_ignore_ascii_case("canceled") => DoneFile::Canceled,
        Err(_) => DoneFile::Unclear,
    };
    Ok(Some((said, stamp)))
}

/// Whether root may read the done file open as `file` (its stat `st`) for the job. The
/// threat is a file the job may not read put at the done name, its number then reported as
/// the job's exit code: a root-only file hard-linked there (where `fs.protected_hardlinks`
/// is off). A file with one link has no other name, so it is the one written there
/// (however shut to others: `mktemp` and `NamedTemporaryFile` make it 0600, a umask of 077
/// does too), read whatever its mode; judged on the open file (opened with no symlink), a
/// link added or removed since the open does not change what is read. A file with more
/// links is read only if the owner of its directory `dir` may read it; a root-owned
/// directory (an emptyDir, `root:<fsGroup>` with the setgid bit) names no user, so then
/// anyone, or its group when that is not root's.
fn done_file_reader(
    dir: &DirFd,
    file: &std::fs::File,
    st: &nix::sys::stat::FileStat,
) -> std::io::Result<bool> {
    use crate::confine::JobReader;
    if !nix::unistd::geteuid().is_root() || st.st_nlink == 1 {
        return Ok(true);
    }
    let owner = crate::confine::fstat(dir)?;
    if owner.st_uid == 0 {
        let anyone = JobReader {
            uid: crate::confine::UNKNOWN_OWNER_UID,
            gids: (owner.st_gid != 0)
                .then_some(owner.st_gid)
                .into_iter()
                .collect(),
        };
        return anyone.may_read(file, st);
    }
    // The directory's group first: a look-up of the owner's groups (NSS, maybe a network
    // directory) every poll only where that does not settle it.
    let reader = JobReader {
        uid: owner.st_uid,
        gids: vec![owner.st_gid],
    };
    if reader.may_read(file, st)? {
        return Ok(true);
    }
    match groups_of(owner.st_uid) {
        Some(gids) => JobReader { gids, ..reader }.may_read(file, st),
        None => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(dirs: &[&str]) -> WatchPlan {
        WatchPlan {
            job_id: "j".into(),
            attempt: 1,
            pid: None,
            done_file: None,
            dirs: dirs.iter().map(PathBuf::from).collect(),
            stay: false,
        }
    }

    #[test]
    fn watched_dirs_share_one_parent() {
        let (parent, names) = plan(&["/shared/artifacts", "/shared//results/"])
            .layout()
            .unwrap();
        assert_eq!(parent, PathBuf::from("/shared"));
        assert_eq!(names, vec!["artifacts", "results"]);
        let e = plan(&["/a/x", "/b/y"]).layout().unwrap_err();
        assert!(e.contains("must share one parent"), "{e}");
        let e = plan(&["/a/x", "/a/x/"]).layout().unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        assert!(plan(&["/"]).layout().is_err());
        assert!(plan(&["/a/../b"]).layout().is_err());
    }

    /// The first look's answer, and then the next look that answers.
    async fn answered(reader: &mut DoneReader, path: &Path) -> Option<DoneFile> {
        loop {
            match reader.look(path).await {
                Look::Pending => {}
                Look::Absent => return None,
                Look::Said(said) => return Some(said),
            }
        }
    }

    /// Writes `path` anew, its time a second ahead: file times move once a tick, and a file of
    /// the same size written in the tick of the one it replaces is that version still.
    fn rewrite(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(1))
            .unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// A done file there before the watch began is an earlier attempt's until written again,
    /// whatever its time says against this node's clock: with the file server's clock an hour
    /// ahead (the file's time in the node's future) it ended the watch at once, and with it
    /// an hour behind, this attempt's own done file was ignored.
    #[tokio::test]
    async fn a_done_file_is_judged_by_what_it_is_not_by_the_servers_clock() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let done = dir.path().join("done");
        std::fs::write(&done, "0\n").unwrap();
        let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now() - hour);
        assert_eq!(
            answered(&mut reader, &done).await,
            None,
            "an earlier attempt's"
        );
        assert_eq!(answered(&mut reader, &done).await, None, "still");
        rewrite(&done, "3\n");
        assert_eq!(answered(&mut reader, &done).await, Some(DoneFile::Exit(3)));

        let later = dir.path().join("later");
        let mut reader = DoneReader::start(Some(&later), std::time::SystemTime::now() + hour);
        assert_eq!(answered(&mut reader, &later).await, None);
        rewrite(&later, "0\n");
        assert_eq!(
            answered(&mut reader, &later).await,
            Some(DoneFile::Exit(0)),
            "this attempt's, written after the first look"
        );

        // A trainer that finished as the agent started, before its first look: its time
        // alone tells, and counts.
        let quick = dir.path().join("quick");
        std::fs::write(&quick, "0\n").unwrap();
        let mut reader = DoneReader::start(Some(&quick), std::time::SystemTime::now());
        assert_eq!(answered(&mut reader, &quick).await, Some(DoneFile::Exit(0)));
        // A sidecar taking an attempt over honours whatever is there, unless its first watch
        // kept an earlier attempt's file.
        let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now() - hour);
        reader.resume(&dir.path().join("nothing-kept"));
        assert_eq!(answered(&mut reader, &done).await, Some(DoneFile::Exit(3)));
    }

    /// The first watch's word that the done file there is an earlier attempt's is kept for a
    /// sidecar restarted over the attempt: held in memory alone, the restart honoured that
    /// file at once, and a trainer still running was reported SUCCEEDED.
    #[tokio::test]
    async fn a_restart_keeps_the_first_watchs_word_on_an_earlier_done_file() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let (done, remember) = (dir.path().join("done"), dir.path().join("done-before"));
        std::fs::write(&done, "0\n").unwrap();
        let mut first = DoneReader::start(Some(&done), std::time::SystemTime::now() - hour);
        first.remembering(&remember);
        assert_eq!(answered(&mut first, &done).await, None);
        assert!(remember.is_file(), "the verdict was not kept");
        let mut again = DoneReader::start(Some(&done), std::time::SystemTime::now());
        again.resume(&remember);
        assert_eq!(
            answered(&mut again, &done).await,
            None,
            "the restart took it"
        );
        rewrite(&done, "1\n");
        assert_eq!(answered(&mut again, &done).await, Some(DoneFile::Exit(1)));
        // The first watch stopped before its first look answered (`looking` kept): the
        // restart's own first look judges what is there, and keeps its word in turn.
        std::fs::write(&remember, "looking\n").unwrap();
        let mut late = DoneReader::start(Some(&done), std::time::SystemTime::now() - hour);
        late.resume(&remember);
        assert_eq!(answered(&mut late, &done).await, None, "honoured unjudged");
        assert!(std::fs::read_to_string(&remember).unwrap().contains(' '));
        // As this agent keeps it, with the first watch's start: a file written since (the
        // trainer finished while no sidecar ran, an hour before the restart) is the job's.
        rewrite(&done, "4\n");
        let restarted = |first_began: std::time::SystemTime| {
            std::fs::write(
                &remember,
                format!("looking {}\n", crate::display::epoch_ns(first_began)),
            )
            .unwrap();
            let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now() + hour);
            reader.resume(&remember);
            reader
        };
        let mut after = restarted(std::time::SystemTime::now() - Duration::from_secs(10));
        assert_eq!(
            answered(&mut after, &done).await,
            Some(DoneFile::Exit(4)),
            "written since the first watch began"
        );
        // One written before the first watch began is still an earlier attempt's.
        let mut before = restarted(std::time::SystemTime::now() + hour);
        assert_eq!(answered(&mut before, &done).await, None);
    }

    /// A first look that failed (here a symlink on the way, renamed away after) was taken for
    /// no done file there: the earlier attempt's, seen by the next look, ended the watch at
    /// once with its exit code. Its directory made (or mounted) after the first look brings
    /// one too, told by its time long before the agent began.
    #[tokio::test]
    async fn a_first_look_that_failed_takes_no_earlier_done_file_for_this_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::fs::write(dir.path().join("real/done"), "3\n").unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("via")).unwrap();
        let done = dir.path().join("via/done");
        let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now() + hour);
        assert_eq!(
            answered(&mut reader, &done).await,
            None,
            "through a symlink"
        );
        std::fs::remove_file(dir.path().join("via")).unwrap();
        std::fs::rename(dir.path().join("real"), dir.path().join("via")).unwrap();
        assert_eq!(
            answered(&mut reader, &done).await,
            None,
            "the earlier attempt's, there all along"
        );
        rewrite(&done, "0\n");
        assert_eq!(answered(&mut reader, &done).await, Some(DoneFile::Exit(0)));

        let later = dir.path().join("later/done");
        let mut reader = DoneReader::start(Some(&later), std::time::SystemTime::now());
        assert_eq!(answered(&mut reader, &later).await, None, "no directory");
        // The agent began an hour after the file was written.
        match &mut reader.before {
            Before::NoDir { begun } => *begun += hour,
            _ => panic!("the first look found a directory"),
        }
        std::fs::rename(dir.path().join("via"), dir.path().join("later")).unwrap();
        assert_eq!(
            answered(&mut reader, &later).await,
            None,
            "came with its directory, an hour before the agent began"
        );
        let mut reader = DoneReader::start(Some(&later), std::time::SystemTime::now());
        assert_eq!(
            answered(&mut reader, &later).await,
            Some(DoneFile::Exit(0)),
            "written as the agent began"
        );
    }

    /// The sidecar started with the node's clock an hour ahead, NTP stepped it back, and the
    /// trainer made the done file's directory and wrote its file: the file's time was before
    /// the agent's start as the clock had said it then, taken for an earlier attempt's, and
    /// the job's own word ignored until the clock caught up.
    #[tokio::test]
    async fn a_clock_stepped_back_after_the_start_leaves_this_attempts_done_file_its_word() {
        let dir = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let done = dir.path().join("out/done");
        // `begun` as read from the clock an hour ahead.
        let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now() + hour);
        assert_eq!(answered(&mut reader, &done).await, None, "no directory");
        std::fs::create_dir(dir.path().join("out")).unwrap();
        std::fs::write(&done, "0\n").unwrap();
        assert_eq!(answered(&mut reader, &done).await, Some(DoneFile::Exit(0)));
    }

    /// Looks that fail for longer than the margin (a mount coming up), then one that finds a
    /// file the trainer wrote meanwhile: it is the job's word, not an earlier attempt's.
    #[tokio::test]
    async fn a_done_file_written_while_the_first_looks_failed_is_the_jobs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("via")).unwrap();
        let done = dir.path().join("via/done");
        let mut reader = DoneReader::start(Some(&done), std::time::SystemTime::now());
        assert_eq!(
            answered(&mut reader, &done).await,
            None,
            "through a symlink"
        );
        // The failing looks took longer than the margin.
        if let Before::Looking { begun, .. } = &mut reader.before {
            *begun -= Duration::from_secs(5);
        }
        std::fs::write(dir.path().join("real/done"), "0\n").unwrap();
        std::fs::remove_file(dir.path().join("via")).unwrap();
        std::fs::rename(dir.path().join("real"), dir.path().join("via")).unwrap();
        assert_eq!(answered(&mut reader, &done).await, Some(DoneFile::Exit(0)));
    }

    /// An earlier attempt's done file, unchanged, seen again with another device or inode
    /// number (gcsfuse after the kernel forgot it, CIFS `noserverino`, a remount): it counted
    /// as written again and ended the watch with the old exit code. A first look that
    /// answered late takes no file as written while the agent started.
    #[test]
    fn an_earlier_done_file_is_told_by_its_size_and_times_alone() {
        let stamp = DoneStamp {
            size: 2,
            mtime_ns: 1,
            ctime_ns: 2,
            ino: 3,
            dev: 4,
            mode: 0o644,
        };
        let before = Before::Found {
            stamp,
            fresh: false,
        };
        let renumbered = DoneStamp {
            ino: 30,
            dev: 40,
            ..stamp
        };
        assert!(before.is_earlier(&renumbered));
        assert!(!before.is_earlier(&DoneStamp {
            ctime_ns: 5,
            ..stamp
        }));
    }

    /// The watched container hard-links a root-only file to the done file's name (where
    /// `fs.protected_hardlinks` is 0): root read it and reported the number in it as the
    /// job's exit code. Only what the owner of the done file's directory may read is read.
    #[test]
    fn a_done_file_its_directorys_owner_may_not_read_is_not_read() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root");
            return;
        }
        let said = |p: &Path| read_done_file(p).ok().flatten().map(|(said, _)| said);
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let chown = |p: &Path, uid: u32, gid: u32| {
            nix::unistd::chown(
                p,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
            )
            .unwrap()
        };
        let tmp = tempfile::tempdir().unwrap();
        mode(tmp.path(), 0o755);
        // Root's own, out of the job's reach, hard-linked to the done name.
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, "42\n").unwrap();
        mode(&secret, 0o600);
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        chown(&out, 64123, 64123);
        let done = out.join("done");
        std::fs::hard_link(&secret, &done).unwrap();
        assert_eq!(said(&done), Some(DoneFile::Unreadable), "root's file read");
        std::fs::remove_file(&done).unwrap();
        // The job's own, however shut to others.
        std::fs::write(&done, "42\n").unwrap();
        mode(&done, 0o600);
        chown(&done, 64123, 64123);
        assert_eq!(said(&done), Some(DoneFile::Exit(42)));
        // A root-owned directory (an emptyDir).
        let shared = tmp.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        mode(&shared, 0o777);
        let done = shared.join("done");
        std::fs::hard_link(&secret, &done).unwrap();
        assert_eq!(said(&done), Some(DoneFile::Unreadable), "root's file read");
        mode(&secret, 0o644);
        assert_eq!(said(&done), Some(DoneFile::Exit(42)), "anyone may read it");
        mode(&secret, 0o600);
        std::fs::remove_file(&done).unwrap();
        // Written there atomically (`mktemp`, then a rename): 0600, one link, the trainer's
        // or (a root trainer) root's.
        std::fs::write(&done, "0\n").unwrap();
        mode(&done, 0o600);
        assert_eq!(said(&done), Some(DoneFile::Exit(0)), "a root trainer's own");
        chown(&done, 64123, 64123);
        assert_eq!(said(&done), Some(DoneFile::Exit(0)), "a trainer's own");
        std::fs::remove_file(&done).unwrap();
        // `root:<fsGroup>` with the setgid bit: the group may read what it is given.
        let grouped = tmp.path().join("grouped");
        std::fs::create_dir(&grouped).unwrap();
        chown(&grouped, 0, 4000);
        mode(&grouped, 0o2777);
        let theirs = grouped.join("theirs");
        std::fs::write(&theirs, "7\n").unwrap();
        chown(&theirs, 64123, 4000);
        mode(&theirs, 0o640);
        let done = grouped.join("done");
        std::fs::hard_link(&theirs, &done).unwrap();
        assert_eq!(
            said(&done),
            Some(DoneFile::Exit(7)),
            "the group may read it"
        );
        std::fs::remove_file(&done).unwrap();
        std::fs::hard_link(&secret, &done).unwrap();
        assert_eq!(said(&done), Some(DoneFile::Unreadable), "root's file read");
    }

    #[test]
    fn done_file_says_the_exit_code() {
        let said = |p: &Path| read_done_file(p).ok().flatten().map(|(said, _)| said);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("done");
        assert_eq!(said(&f), None);
        std::fs::write(&f, "3\n").unwrap();
        assert_eq!(said(&f), Some(DoneFile::Exit(3)));
        std::fs::write(&f, "").unwrap();
        assert_eq!(said(&f), None, "not written yet");
        std::fs::write(&f, "done\n").unwrap();
        assert_eq!(said(&f), Some(DoneFile::Unclear));
        std::fs::write(&f, "canceled\n").unwrap();
        assert_eq!(said(&f), Some(DoneFile::Canceled));
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        assert_eq!(said(&link), None, "a symlink is not the done file");
    }
}
