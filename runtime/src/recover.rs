//! `c3-agent recover`: finish the jobs a crashed agent left behind, and deliver kept reports.

use std::time::{Duration, Instant};

use c3_proto::{JobState, Phase, RunRecord};
use tokio_util::sync::CancellationToken;

use crate::context::AgentContext;
use crate::job::{JobSummary, Run};
use crate::outcome::JobEnd;
use crate::statedir::AttemptLock;

/// What the record says about how the job ended; a job still "running" was lost with the
/// agent, unless the record already says how it ended (saved with FINALIZING, before the
/// output's drain and the move to `finishing`).
pub fn recorded_end(record: &RunRecord) -> JobEnd {
    let ended = crate::outcome::end_noted(record);
    match record.phase {
        // Canceled while a rerun stopped what its dead agent left: the attempt's cancel.
        Phase::Preparing if record.state == Some(JobState::Canceled) => JobEnd::Canceled,
        // A cgroup or a launch recorded before the launch: the script may have started.
        Phase::Preparing if record.cgroup.is_some() || record.launching => JobEnd::AgentLost,
        Phase::Preparing => JobEnd::AgentFailed,
        Phase::Running if !ended => JobEnd::AgentLost,
        Phase::Running | Phase::Finishing | Phase::Done => {
            match (record.state, record.exit_code, &record.signal) {
                (Some(JobState::Canceled), _, _) => JobEnd::Canceled,
                (Some(JobState::Failed), None, None)
                    if record.reason == Some(c3_proto::FailReason::DatasetError) =>
                {
                    JobEnd::DatasetFailed {
                        retryable: record.retryable.unwrap_or(true),
                    }
                }
                (Some(JobState::TimedOut), _, _) => JobEnd::TimedOut,
                (_, Some(code), _) => JobEnd::Exited(code),
                (_, None, Some(sig)) => JobEnd::Killed(sig.clone()),
                _ => JobEnd::AgentLost,
            }
        }
    }
}

/// Whether the agent that wrote the record still runs (same boot, pid and start time).
pub fn owner_alive(record: &RunRecord) -> bool {
    same_boot(record)
        && record.agent.is_some_and(|(pid, started)| {
            crate::procfs::alive_in(record.agent_pid_ns, pid, started)
        })
}

/// Whether the job a sidecar watched (its recorded leader) still runs, judged in the pid
/// namespace the sidecar numbered it in.
fn watched_leader_alive(record: &RunRecord) -> bool {
    record
        .watched_leader
        .as_ref()
        .is_some_and(|leader| crate::procfs::is_alive_in(leader, record.agent_pid_ns))
}

/// How long `recover` leaves the attempt of a sidecar told no pid to its restart, from the
/// attempt's start, while nothing says the job ended: past it, the sidecar is taken for
/// gone for good (its pod deleted, its prolog's job over) and the attempt is finished.
pub const UNWATCHED_SIDECAR_WAIT: Duration = Duration::from_secs(72 * 3600);

/// Whether the job of a sidecar that was told no pid (`watch` without `--pid`: the done file
/// is its only word on the end) may still run: the attempt is unended in its record, on this
/// boot, and started within [`UNWATCHED_SIDECAR_WAIT`]. Finished now, a job that still ran
/// got AGENT_ERROR (retryable: a second copy placed on its GPU) and a complete manifest, and
/// the restarted sidecar found the attempt done and stored nothing the job wrote after.
fn unwatched_sidecar_job_may_run(record: &RunRecord) -> bool {
    let recent = chrono::DateTime::parse_from_rfc3339(&record.started_at)
        .map(|at| {
            let age = chrono::Utc::now().signed_duration_since(at);
            age.to_std()
                .map_or(true, |age| age < UNWATCHED_SIDECAR_WAIT)
        })
        .unwrap_or(true);
    record.watched_dirs.is_some()
        && record.watched_leader.is_none()
        && record.phase == Phase::Running
        && !crate::outcome::end_noted(record)
        && same_boot(record)
        && recent
}

/// Whether the record was written on this boot (one that does not say is taken as so).
fn same_boot(record: &RunRecord) -> bool {
    match &record.agent_boot_id {
        Some(b) => crate::procfs::boot_id().as_ref() == Some(b),
        None => true,
    }
}

/// Finishes every unfinished job in the state dir, oldest first. Once `halt` is cancelled (a
/// signal, the time budget) it stops at the next safe point: the attempt under way is cut
/// as a stop deadline cuts a run's final sync (what it stored listed, its record in phase
/// `finishing`, its status sent or kept), and the jobs after it are left for the next pass.
pub async fn recover_all(ctx: &AgentContext, halt: &CancellationToken) -> Vec<JobSummary> {
    if let Some(cp) = &ctx.control_plane {
        // Halted, it ends between two deliveries (each kept report stays until delivered),
        // after the POST under way.
        let left =
            crate::report::flush_all_outboxes(cp, &ctx.state, cp.deadline(), Some(halt)).await;
        if left > 0 {
            tracing::warn!(
                jobs = left,
                "control plane still unreachable; reports stay in the outbox"
            );
        }
    }
    let swept = tokio::task::spawn_blocking(crate::jobproc::sweep_leaked_cgroups)
        .await
        .unwrap_or(0);
    if swept > 0 {
        tracing::info!(
            cgroups = swept,
            "removed empty job cgroups that crashed agents left"
        );
    }
    let mut finished = Vec::new();
    for path in ctx.state.all_records() {
        if halt.is_cancelled() {
            break;
        }
        match recover_record(ctx, &path, Pass::Recover, None, Some(halt)).await {
            Some(summary) => finished.push(summary),
            None => abort_left_uploads(ctx, &path, halt).await,
        }
    }
    finished
}

/// Aborts the multipart uploads a finished attempt still has journaled: those whose abort
/// failed when the attempt ended (the store was down then). Their journals keep the job from
/// retention, and their parts stay billed at the store, until an abort goes through. An
/// attempt with output left unstored keeps its uploads: recover resumes them.
async fn abort_left_uploads(ctx: &AgentContext, path: &std::path::Path, halt: &CancellationToken) {
    let settled = |record: &RunRecord| {
        let elsewhere = record
            .destination
            .as_ref()
            .is_some_and(|d| !ctx.destination().serves(d));
        record.phase == Phase::Done && record.unstored_to_retry() == 0 && !elsewhere
    };
    let Ok(record) = ctx.state.read_record(path) else {
        return;
    };
    if !settled(&record) {
        return;
    }
    let (job_id, attempt) = (record.spec.job_id.as_str(), record.spec.attempt);
    let uploader = attempt_uploader(ctx, job_id, attempt);
    if !uploader.journaled() {
        return;
    }
    let Ok(_lock) = AttemptLock::acquire(&ctx.state, job_id, attempt) else {
        return;
    };
    // Read again under the lock: a `resync` that held it meanwhile may have left output to
    // retry, its uploads kept for the next pass to resume (aborted, they were sent again
    // from their first byte).
    if !ctx.state.read_record(path).is_ok_and(|r| settled(&r)) {
        return;
    }
    // A stop is heard: the aborts retry through a store outage (up to its deadline), and an
    // upload left open is aborted by the next pass.
    let aborted = tokio::select! {
        aborted = uploader.abort_orphans() => aborted,
        () = halt.cancelled() => return,
    };
    tracing::info!(
        job_id,
        attempt,
        aborted,
        "aborted the multipart uploads a finished attempt left journaled"
    );
}

/// The uploader of `attempt`'s journals (what [`crate::upload::Uploader::abort_orphans`]
/// aborts: that attempt's, never another's).
fn attempt_uploader(ctx: &AgentContext, job_id: &str, attempt: u32) -> crate::upload::Uploader {
    crate::upload::Uploader::new(
        ctx.store.clone(),
        ctx.upload.clone(),
        job_id,
        Some(ctx.state.uploads_dir(job_id)),
    )
    .for_attempt(attempt)
}

#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error("this node has no record of job {job_id}{}", attempt.map(|a| format!(" attempt {a}")).unwrap_or_default())]
    NoRecord {
        job_id: String,
        attempt: Option<u32>,
    },
    #[error(transparent)]
    State(#[from] crate::statedir::StateError),
}

/// `c3-agent resync JOB`: stores what an attempt left unstored (its latest attempt unless
/// given), writes the complete manifest and sends the amended terminal status with a higher
/// `seq`. `Ok(None)`: nothing was left to store (or another agent is at work on it).
/// Unlike `recover`, it also tries what the job made unstorable for good: the operator asked,
/// and may have changed what made it so (`upload.max_file_bytes`, `upload.hole_budget_bytes`,
/// a directory's mode).
pub async fn resync(
    ctx: &AgentContext,
    job_id: &str,
    attempt: Option<u32>,
    halt: &CancellationToken,
) -> Result<Option<JobSummary>, ResyncError> {
    let attempt = resync_attempt(ctx, job_id, attempt);
    let path = attempt
        .map(|a| ctx.state.run_record_path(job_id, a))
        .filter(|p| p.is_file())
        .ok_or_else(|| ResyncError::NoRecord {
            job_id: job_id.into(),
            attempt,
        })?;
    Ok(recover_record(ctx, &path, Pass::Resync, None, Some(halt)).await)
}

/// The attempt `resync` works on: the one given, else the latest with a run record.
pub fn resync_attempt(ctx: &AgentContext, job_id: &str, attempt: Option<u32>) -> Option<u32> {
    attempt.or_else(|| {
        ctx.state
            .attempt_numbers(job_id)
            .into_iter()
            .filter(|a| ctx.state.run_record_path(job_id, *a).is_file())
            .max()
    })
}

/// Finishes the attempt this very process was running when it panicked: its processes
/// stopped, final sync, manifest, status (`AGENT_ERROR` unless the real outcome was recorded).
/// Cancelling `stop` (a stop asked before the panic, or during this) ends it by the stop
/// deadline as `run` would have: the cut path's status, the rest left to `recover`.
pub async fn recover_own(
    ctx: &AgentContext,
    job_id: &str,
    attempt: u32,
    stop: &tokio_util::sync::CancellationToken,
) -> Option<JobSummary> {
    let path = ctx.state.run_record_path(job_id, attempt);
    recover_record(ctx, &path, Pass::Own, Some(stop), None).await
}

/// Who finishes a recorded attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// `recover` (at boot, hourly): attempts not done, and done ones with output a later
    /// look may store.
    Recover,
    /// `resync JOB`: also a done attempt whose unstored output the job made so for good.
    Resync,
    /// The agent's own attempt, after a panic in it.
    Own,
}

/// The run record at `path`, if it is one `pass` has work to do on. A finished attempt
/// whose output could not all be stored is finished again: its files are still on the node,
/// and the store may be back. What the job made unstorable itself (a path too deep, a file
/// too large) is not come back for by `recover`: every hourly pass would otherwise redo the
/// attempt (a rescan and rehash as root, new manifests, a registration and a status) for
/// ever, and retention would keep the job for ever too.
fn unfinished_record(
    ctx: &AgentContext,
    path: &std::path::Path,
    pass: Pass,
) -> Option<c3_proto::RunRecord> {
    let record = match ctx.state.read_record(path) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "skipping an unreadable run record");
            return None;
        }
    };
    let left = match pass {
        Pass::Recover | Pass::Own => record.unstored_to_retry() > 0,
        Pass::Resync => !record.unstored.is_empty(),
    };
    (record.phase != Phase::Done || left).then_some(record)
}

/// What the attempt's own manifest in the store says it stored, as far as this agent can tell.
pub(crate) enum Listed {
    /// Its manifest (`None`: there is none, or one cut short that lists nothing usable).
    Before(Option<Box<c3_proto::Manifest>>),
    /// The store would not let this agent read it (a write-only bucket's 403), or answered
    /// a 404 that is not its own word on the key (a proxy's): what it lists is unknown. The
    /// attempt is finished, but its manifest is replaced only if the final scan sees all of
    /// the output ([`crate::collector::CollectorConfig::earlier_unknown`]).
    Unknown,
    /// A manifest this agent cannot take in (a newer agent's version, over this config's
    /// `store.max_manifest_bytes`, an entry it refuses) but which may well be fine: logged,
    /// the attempt left alone this pass for an operator or a newer agent.
    NotThisAgents,
    /// Another job's or attempt's manifest at this attempt's key (a cache or gateway that
    /// answered for the wrong key, a copy): says nothing of this attempt; left alone as
    /// [`Listed::NotThisAgents`], but likely to pass.
    Foreign,
}

/// The attempt's own manifest in this store (in progress or complete): what it lists is what
/// its dead agent (or an earlier finish) stored. Finished from an empty book, the seal would
/// replace that manifest with one of what the final scan finds now (nothing, with the
/// workdir gone or refused), and `gc` would take the rest. `Err` only for a fault that may
/// pass. Only a manifest that is not JSON at all (cut short) is replaced, or one a store
/// refuses to read: one this agent merely cannot take in is no reason to list less than it.
pub(crate) async fn listed_before(
    ctx: &AgentContext,
    record: &RunRecord,
) -> Result<Listed, crate::store::StoreError> {
    let key = crate::store::attempt_manifest_key(&record.spec.job_id, record.spec.attempt);
    let not_this_agents = |reason: String| {
        tracing::error!(key = %key, reason = %reason, "the attempt's manifest in the store is not one this agent can take in; the attempt is left alone (a newer agent, or a config with a higher store.max_manifest_bytes, finishes it)");
        Ok(Listed::NotThisAgents)
    };
    match ctx
        .store
        .get_bytes_capped(&key, ctx.max_manifest_bytes)
        .await
    {
        Ok(bytes) => match crate::job::parse_off_reactor(bytes).await {
            // Another job's or attempt's at this key (a cache, a gateway, a copy): taken in,
            // its files (another tenant's) were listed in this attempt's manifest.
            Ok(m) if !crate::job::is_attempts(&m, &record.spec.job_id, record.spec.attempt) => {
                let _ = not_this_agents(format!(
                    "it is job {} attempt {}'s",
                    crate::display::cut(m.job_id.clone(), 256),
                    m.attempt
                ));
                Ok(Listed::Foreign)
            }
            Ok(m) => Ok(Listed::Before(Some(Box::new(m)))),
            // Only bytes that are not JSON at all (cut short, garbled): valid JSON of
            // another shape (a field of another type, a result past its bound) may be a
            // newer agent's, whose blobs gc would take once it is replaced.
            Err(e) if not_json(&e) => {
                tracing::warn!(error = %crate::error_chain(&e), "the attempt's manifest in the store is not valid JSON; replaced by what the final sync finds");
                Ok(Listed::Before(None))
            }
            Err(e) => not_this_agents(crate::error_chain(&e)),
        },
        Err(e) if ctx.store.says_absent(&e) => Ok(Listed::Before(None)),
        Err(e @ crate::store::StoreError::TooLarge { .. }) => {
            not_this_agents(crate::error_chain(&e))
        }
        Err(e) if e.is_permanent() || e.is_not_found() => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot read the attempt's manifest; it is replaced only if the final scan sees all of the output (a watch writes no in-progress manifest over it meanwhile)");
            Ok(Listed::Unknown)
        }
        Err(e) => Err(e),
    }
}

/// Whether a manifest that did not parse is not JSON at all (not merely another shape).
fn not_json(e: &c3_proto::manifest::ManifestError) -> bool {
    use serde_json::error::Category;
    matches!(e, c3_proto::manifest::ManifestError::Syntax(json)
        if matches!(json.classify(), Category::Syntax | Category::Eof))
}

/// The first attempt of `record`'s job after it whose record names the same workdir, and
/// whether it took it ([`took_workdir`]).
fn later_attempt_in_workdir(
    state: &crate::statedir::StateDir,
    record: &RunRecord,
) -> Option<(u32, bool)> {
    let mut later: Vec<u32> = state
        .attempt_numbers(&record.spec.job_id)
        .into_iter()
        .filter(|n| *n > record.spec.attempt)
        .collect();
    later.sort_unstable();
    // One still under way counts whatever it did yet: it may be about to take the workdir
    // (its look at this attempt's lock is behind it). One done counts if it took it.
    later.into_iter().find_map(|n| {
        state
            .read_record(&state.run_record_path(&record.spec.job_id, n))
            .ok()
            .and_then(|r| {
                let took = took_workdir(&r);
                (r.workdir == record.workdir && (r.phase != Phase::Done || took))
                    .then_some((n, took))
            })
    })
}

/// Whether a run opened its workdir (pinned it) or launched in it: one that ended before,
/// waiting for this very attempt to be finished (`prepare::earlier_attempts_settled`), found
/// nothing there and changed nothing, and took it from no one.
pub(crate) fn took_workdir(record: &RunRecord) -> bool {
    record.workdir_pin.is_some()
        || record.launching
        || record.leader.is_some()
        || record.pgid.is_some()
        || record.cgroup.is_some()
        || record.watched_dirs.is_some()
}

/// Whether attempt `a` started after `b`: by [`RunRecord::start_order`] where both have one,
/// else (an older record) by `started_at`; `None` when that cannot be read.
fn started_after(a: &RunRecord, b: &RunRecord) -> Option<bool> {
    if let (Some(a), Some(b)) = (a.start_order, b.start_order) {
        return Some(a > b);
    }
    let at = |r: &RunRecord| chrono::DateTime::parse_from_rfc3339(&r.started_at).ok();
    Some(at(a)? > at(b)?)
}

/// Another job that collected from the same directory as `record` (the same pinned workdir,
/// a collected dir in common) and started after it: by the state dir's start order, not
/// the wall clock (stepped back between the two, the earlier job's unstored output counted
/// as unstorable for good, or it was finished again from the later one's files). Only
/// records whose workdir was opened count (`workdir_pin`): a spec naming another job's
/// workdir that its prepare refused never used it.
fn later_job_in_workdir(state: &crate::statedir::StateDir, record: &RunRecord) -> Option<String> {
    let pin = record.workdir_pin.as_ref()?;
    let dirs = |r: &RunRecord| {
        r.watched_dirs
            .clone()
            .unwrap_or_else(|| r.spec.collected_dirs())
    };
    let ours = dirs(record);
    let within = |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
    state.all_records().into_iter().find_map(|path| {
        let other = state.read_record(&path).ok()?;
        let shared = dirs(&other)
            .iter()
            .any(|d| ours.iter().any(|o| within(d, o) || within(o, d)));
        (other.spec.job_id != record.spec.job_id
            && other.workdir_pin.as_ref() == Some(pin)
            && shared
            && started_after(&other, record)?)
        .then_some(other.spec.job_id)
    })
}

/// Stops what an attempt's dead agent left running (only what provably is the job: its
/// cgroup, its recorded leader's group, or without a cgroup its marked processes). Returns
/// whether processes of the job survive SIGKILL: its GPU is then not free.
pub(crate) async fn stop_survivors(ctx: &AgentContext, record: &RunRecord) -> bool {
    let mut survivors = false;
    if record.phase == Phase::Running
        || (record.cgroup.is_some() || record.launching) && record.phase == Phase::Preparing
    {
        // Nobody supervises these processes any more; they would hold the GPU forever.
        // Only what provably is the job is signalled: a reused pid is a stranger.
        // No recorded user: the job ran as the agent's own.
        let job = crate::jobproc::JobMark {
            uid: record
                .job_user
                .as_ref()
                .map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid),
            job_id: &record.spec.job_id,
            attempt: record.spec.attempt,
        };
        if let Some(cgroup) = record.cgroup.as_deref() {
            return crate::jobproc::stop_recorded(
                record.leader.as_ref(),
                Some(cgroup),
                job,
                ctx.kill_grace,
                true,
            )
            .await;
        }
        // Without a cgroup, the job's processes in groups of their own (a `setsid`, a
        // daemon's start, a `start_new_session` child, a `setpgrp`) left the leader's group,
        // and after a mid-launch death there is no leader at all: they are found by their
        // marks, among what started after the leader (or the agent). Found before anything
        // is signalled, so that the leader's group and these share one grace.
        let mut groups = Vec::new();
        let since = match (&record.leader, record.agent) {
            (Some(l), _) => Some((l.start_ticks, Some(l.boot_id.as_str()))),
            (None, Some((_, agent_start))) if record.launching => {
                Some((agent_start, record.agent_boot_id.as_deref()))
            }
            _ => None,
        };
        let leader = record.leader.as_ref().map(|l| l.pid);
        // Off the reactor: each process's environment may take a second to answer.
        let search = |(since, boot): (u64, Option<&str>)| {
            let (uid, job_id, attempt) = (job.uid, job.job_id.to_string(), job.attempt);
            let boot = boot.map(str::to_string);
            async move {
                let marked = tokio::task::spawn_blocking(move || {
                    let job = crate::jobproc::JobMark {
                        uid,
                        job_id: &job_id,
                        attempt,
                    };
                    crate::jobproc::marked_groups(job, since, boot.as_deref())
                })
                .await
                .unwrap_or_else(|_| crate::jobproc::MarkedGroups {
                    groups: Vec::new(),
                    unproven: true,
                });
                if marked.unproven {
                    // Never signalled (it may be a stranger's), never "none left" either.
                    tracing::warn!(
                        "a process of the job's user did not let its environment be read in time (its memory lock held: D state, a FUSE page); not signalled, the GPU is not reported free"
                    );
                }
                let groups: Vec<_> = marked
                    .groups
                    .into_iter()
                    .filter(|found| Some(found.pid) != leader)
                    .map(|found| crate::jobproc::RecordedGroup {
                        leader: found,
                        leads_session: false,
                    })
                    .collect();
                (groups, marked.unproven)
            }
        };
        if let Some(since) = since {
            let (found, unproven) = search(since).await;
            survivors |= unproven;
            groups.extend(found);
        }
        match &record.leader {
            Some(l) => groups.insert(
                0,
                crate::jobproc::RecordedGroup {
                    leader: l.clone(),
                    leads_session: true,
                },
            ),
            // An agent that died mid-launch recorded no leader: nothing but the marks tells
            // its processes.
            None if !record.launching => {
                tracing::warn!("the run record names no job process; nothing signalled");
            }
            None => {}
        }
        survivors |= crate::jobproc::stop_recorded_groups(groups, job, ctx.kill_grace).await;
        // Groups the job made while it was being stopped (a TERM trap's `setsid` child, a
        // retry loop) were not found above: searched for again, a few rounds at most, and
        // one still made at the last round keeps the GPU from being reported free.
        if let Some(since) = since {
            for round in 1..=STOP_ROUNDS {
                let (found, unproven) = search(since).await;
                survivors |= unproven;
                if found.is_empty() {
                    break;
                }
                if round == STOP_ROUNDS {
                    survivors = true;
                    break;
                }
                survivors |= crate::jobproc::stop_recorded_groups(found, job, ctx.kill_grace).await;
            }
        }
    }
    survivors
}

/// How long `recover` spends aborting an attempt's uploads while holding its lock.
const LEFT_ABORTS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Aborts the multipart uploads `record`'s attempt has journaled, under its lock (which a
/// later attempt may wait on): cut at a stop (`halt`) and at [`LEFT_ABORTS_WAIT`]; what is
/// left open, the next pass aborts. `None`: none journaled, or cut.
async fn abort_uploads_briefly(
    ctx: &AgentContext,
    record: &RunRecord,
    halt: Option<&CancellationToken>,
) -> Option<usize> {
    let uploader = attempt_uploader(ctx, &record.spec.job_id, record.spec.attempt);
    if !uploader.journaled() {
        return None;
    }
    tokio::select! {
        aborted = tokio::time::timeout(LEFT_ABORTS_WAIT, uploader.abort_orphans()) => aborted.ok(),
        () = crate::halted(halt) => None,
    }
}

/// Searches by marks after the first stop, for groups the job made while being stopped.
const STOP_ROUNDS: usize = 3;

async fn recover_record(
    ctx: &AgentContext,
    path: &std::path::Path,
    pass: Pass,
    stop: Option<&CancellationToken>,
    halt: Option<&CancellationToken>,
) -> Option<JobSummary> {
    let record = unfinished_record(ctx, path, pass)?;
    // `resync JOB` is the operator's own word on the attempt: the way to move a job's
    // output to the store the node uses now.
    if let Some(theirs) = record
        .destination
        .as_ref()
        .filter(|d| !ctx.destination().serves(d))
    {
        if pass == Pass::Resync {
            tracing::warn!(job_id = %record.spec.job_id, job_store = %theirs.store, store = %ctx.store.shown_url(), "the attempt's output went to another store; resync stores it in this config's");
        } else {
            tracing::warn!(
            job_id = %record.spec.job_id,
            attempt = record.spec.attempt,
            job_store = %theirs.store,
            job_control_plane = theirs.control_plane.as_deref().unwrap_or("none"),
            store = %ctx.store.shown_url(),
            "the attempt's output and reports go elsewhere than this config says; left alone (run recover with the job's config, or `c3-agent resync JOB` to move it here)"
            );
            return None;
        }
    }
    crate::fault::pause_point("recover-after-read").await;
    // A sidecar's job that still runs (its agent died, and the pod or the prolog restarts
    // it): finished now, it would be AGENT_ERROR with a complete manifest, and the restarted
    // sidecar would find it done and store nothing the job wrote after.
    if pass == Pass::Recover && record.phase == Phase::Running && watched_leader_alive(&record) {
        tracing::info!(job_id = %record.spec.job_id, attempt = record.spec.attempt,
            "the watched job still runs; left to its sidecar");
        return None;
    }
    if pass == Pass::Recover && unwatched_sidecar_job_may_run(&record) {
        tracing::info!(job_id = %record.spec.job_id, attempt = record.spec.attempt,
            wait_hours = UNWATCHED_SIDECAR_WAIT.as_secs() / 3600,
            "a sidecar told no pid died before the job's end was known: the job may still run; left to its sidecar's restart (finished once the wait from the attempt's start is over, or after a reboot)");
        return None;
    }
    if pass != Pass::Own && owner_alive(&record) {
        tracing::info!(job_id = %record.spec.job_id, agent_pid = record.agent.map(|a| a.0), "job still has its agent; left alone");
        return None;
    }
    // The attempt's lock is the final word: an agent holding it is at work on the job.
    let lock = match AttemptLock::acquire(&ctx.state, &record.spec.job_id, record.spec.attempt) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::info!(job_id = %record.spec.job_id, reason = %e, "job left alone");
            return None;
        }
    };
    // Read again under the lock: the agent that held it may have finished the attempt (and
    // sent its terminal status) between the first read and the lock, and finishing it again
    // from the stale phase would send a second, contradicting one.
    let record = unfinished_record(ctx, path, pass)?;
    let span =
        tracing::info_span!("job", job_id = %record.spec.job_id, attempt = record.spec.attempt);
    let entered = span.enter();
    // Bounded (a kill grace, two minutes by the job's marks with no cgroup) but not by
    // `--budget-secs` or a SIGTERM: halted, the attempt is left for the next pass.
    let halted = crate::halted(halt);
    let survivors = tokio::select! {
        survivors = stop_survivors(ctx, &record) => survivors,
        () = halted => {
            tracing::warn!("halted while the attempt's processes were being stopped; left for the next pass");
            return None;
        }
    };
    if let Some((pid, _)) = record.agent {
        crate::agentsock::remove_left(
            &ctx.state,
            &record.spec.job_id,
            record.spec.attempt,
            pid.unsigned_abs(),
        );
    }
    // The workdir is shared by the job's attempts (the default one, `jobs/<id>/work`, is):
    // once a later attempt has run in it, what is there is that attempt's, and finishing this
    // one from it would list the later attempt's files as this one's (its manifest replaced,
    // the blobs it did list left to gc). Its processes are stopped all the same, above.
    // `resync` is the operator's word.
    // Its multipart uploads (its agent killed mid-upload, or kept after a store fault for a
    // resume that will not come now) are aborted, under its lock: nothing else would (the
    // later attempt aborts only its own, `abort_left_uploads` only a finished attempt's),
    // and their journals kept the job (its whole workdir) and their parts at the store for
    // ever. One the store will not abort now keeps its journal, for the next pass.
    let mut left_to_later = None;
    if pass == Pass::Recover {
        if let Some((later, took)) = later_attempt_in_workdir(&ctx.state, &record) {
            if let Some(aborted) = abort_uploads_briefly(ctx, &record, halt).await {
                tracing::info!(
                    aborted,
                    "aborted the multipart uploads of an attempt a later one took the workdir from"
                );
            }
            // One under way that has not taken it yet (a reboot in its preparing) may never
            // take it: this attempt is left for a later pass, its output still its own.
            if record.phase == Phase::Done || !took {
                tracing::warn!(later_attempt = later,
                    "a later attempt of the job ran in its workdir since; left alone (`c3-agent resync JOB --attempt N` to store what is there now as this attempt's)");
                return None;
            }
            // Not done: its end is still said, without a sync (below).
            tracing::warn!(later_attempt = later,
                "a later attempt of the job ran in its workdir since; its end is reported without a sync (`c3-agent resync JOB --attempt N` to store what is there now as this attempt's)");
            left_to_later = Some(later);
        }
        // The same for another job given the same workdir, once this attempt is done (its
        // status sent): finished again from what that job left, its manifest listed the other
        // job's files as its own and dropped those it had stored (gc took them). An attempt
        // not done yet must still be finished: its book keeps what its manifest listed.
        // What it left unstored counts as unstorable for good from then on: no later look
        // stores it as this attempt's (`resync` still may, on the operator's word), so
        // `recover` does not come back each hour and retention lets the job go.
        if record.phase == Phase::Done {
            if let Some(other) = later_job_in_workdir(&ctx.state, &record) {
                tracing::warn!(other_job = %other,
                    "another job ran in its workdir since; left alone, what it left unstored counted as unstorable for good (`c3-agent resync JOB --attempt N` to store what is there now as this attempt's)");
                let mut record = record;
                record.unstored_for_good =
                    (record.unstored.len() as u64).saturating_add(record.unstored_more);
                if let Err(e) = ctx.state.write_record(&record) {
                    tracing::error!(error = %crate::error_chain(&e), "cannot write the run record");
                }
                return None;
            }
        }
    }
    if record.phase == Phase::Done {
        tracing::info!(
            unstored = record.unstored.len(),
            for_good = record.unstored_for_good,
            "storing what an earlier run could not"
        );
    } else {
        tracing::info!(phase = ?record.phase, "recovering a job the agent did not finish");
    }
    let end = recorded_end(&record);
    drop(entered);
    // The panic path's stop clock, from the signal's own time: without one, a stop during
    // it (or before the panic) was never heard of, and a store outage held it until
    // `retry_deadline_secs`, past the kill a scheduler sends after the stop deadline.
    let stop_requested = stop.map(crate::job::stop_clock);
    // The run's rebuilding looks at the node (the workdir's open, the user's lookup) and
    // ends, as its final sync does, on the halt or at the stop deadline's cut: behind a hung
    // mount or sssd, neither a SIGTERM nor `--budget-secs` was heard.
    let given_up = halt.map_or_else(CancellationToken::new, CancellationToken::child_token);
    let cut = {
        let cut = crate::job::sync_cut(stop_requested.clone(), ctx.stop_deadline);
        let given_up = given_up.clone();
        tokio::spawn(async move {
            cut.await;
            given_up.cancel();
        })
    };
    let mut run =
        tracing::Instrument::instrument(Run::from_record(ctx, record, &given_up), span.clone())
            .await;
    cut.abort();
    run.stop_requested = stop_requested;
    if let Some(halt) = halt {
        run.halt_on(halt.clone());
    }
    if let Some(later) = left_to_later {
        let summary =
            tracing::Instrument::instrument(run.conclude_left(end, later), span.clone()).await;
        return Some(summary);
    }
    // This read retries through a store outage too.
    let cut = run.sync_cut();
    let listed = tokio::select! {
        listed = tracing::Instrument::instrument(listed_before(ctx, &run.record), span.clone()) => Some(listed),
        () = cut => None,
        () = crate::halted(halt) => None,
    };
    let listed = match listed {
        // Complete, while this node's run of the attempt never reached its final sync (the
        // seal comes after the record says `finishing`) and the manifest does not carry this
        // run's id: another node's run of the same attempt sealed it (a rerun placed
        // elsewhere with the same attempt number). Finished here, its manifest was replaced
        // by what this node's workdir holds and a second, contradicting terminal status went
        // out past its `seq`. One that carries this run's id is its own seal, the `finishing`
        // before it never saved (a full state disk): finished as any other, or the attempt
        // closed with no terminal status sent at all.
        Some(Ok(Listed::Before(Some(m))))
            if pass == Pass::Recover
                && m.complete
                && matches!(run.record.phase, Phase::Running | Phase::Preparing)
                && !sealed_by(&m, &run.record) =>
        {
            {
                let _entered = span.enter();
                tracing::error!(
                    "the attempt's manifest in the store is complete, though this node's run of it never reached its final sync: another node ran the same attempt; left alone (no manifest written, no status sent)"
                );
            }
            // Closed on this node (no later pass looks at it again, retention lets it go in
            // time), its own multipart uploads aborted: left `running`, every pass repeated
            // all of this, and its uploads' parts stayed billed.
            abort_uploads_briefly(ctx, &run.record, halt).await;
            run.record.phase = Phase::Done;
            tracing::Instrument::instrument(run.save(), span).await;
            return None;
        }
        Some(Ok(Listed::Before(earlier))) => Some(earlier.map(|m| *m)),
        Some(Ok(Listed::Unknown)) => {
            run.earlier_listing_unknown();
            Some(None)
        }
        Some(Ok(Listed::NotThisAgents | Listed::Foreign)) => return None,
        Some(Err(e)) => {
            let _entered = span.enter();
            tracing::warn!(error = %crate::error_chain(&e), "cannot read what the attempt's manifest lists; left for the next pass");
            return None;
        }
        // Not a sync at all: without that list a seal could replace the manifest with less.
        None => None,
    };
    let cut = listed.is_none();
    if let Some(earlier) = listed {
        run.listed_before(earlier);
    }
    if survivors {
        // A retryable end alone would have the platform place the job again while this
        // copy still holds the GPU.
        tracing::Instrument::instrument(run.processes_survive(), span.clone()).await;
    }
    let finished = if cut {
        tracing::Instrument::instrument(run.finish_cut(end, Instant::now()), span).await
    } else {
        tracing::Instrument::instrument(run.finish(end, Instant::now()), span).await
    };
    drop(lock);
    Some(finished)
}

/// Whether `m` was written by the run `record` keeps (or a `recover` of it): both carry the
/// same `run_id`. Records and manifests of older agents carry none, and count as another's.
fn sealed_by(m: &c3_proto::Manifest, record: &RunRecord) -> bool {
    m.run_id.is_some() && m.run_id == record.run_id
}

#[cfg(test)]
mod tests {

    /// Only a manifest that is not JSON at all is replaced by recover's seal: valid JSON this
    /// agent cannot take in (another shape: a newer agent's) is left for one that can.
    #[test]
    fn only_a_manifest_that_is_not_json_is_taken_for_unreadable() {
        let err = |b: &[u8]| c3_proto::Manifest::from_json(b).unwrap_err();
        assert!(not_json(&err(b"{\"version\":1,\"files\":[")));
        assert!(not_json(&err(b"\x00garbage")));
        assert!(!not_json(&err(br#"{"version":1,"files":null}"#)));
        assert!(!not_json(&err(br#"{"version":2,"files":[]}"#)));
    }
    use super::*;
    use crate::outcome::{decide, note_end};

    /// Two jobs ran in one workdir, A first, B after it, but the wall clock was stepped back
    /// between their starts: B's `started_at` is earlier. By the clock, A counted as the later
    /// one, and `recover` finished B again from A's files (or gave B's unstored output up).
    /// The state dir's start order says B is the later one.
    #[test]
    fn a_clock_stepped_back_does_not_change_which_job_ran_later() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::statedir::StateDir::new(dir.path().join("state"));
        let record = |id: &str, started_at: &str, order: Option<u64>| {
            let json = format!(r#"{{"job_id":"{id}","command":["true"]}}"#);
            let spec = c3_proto::JobSpec::from_json(json.as_bytes()).unwrap().spec;
            let mut r: RunRecord = serde_json::from_value(serde_json::json!({
                "spec": spec, "workdir": "/shared", "phase": "done", "pgid": null, "seq": 3,
                "state": "SUCCEEDED", "reason": null, "exit_code": 0, "signal": null,
                "started_at": started_at, "workdir_pin": {"dev": 1, "ino": 2},
            }))
            .unwrap();
            r.start_order = order;
            state.ensure_attempt_dir(id, 1).unwrap();
            state.write_record(&r).unwrap();
            r
        };
        let a = record("a", "2026-12-01T10:00:00Z", Some(order_of(&state)));
        let b = record("b", "2026-12-01T09:00:00Z", Some(order_of(&state)));
        assert_eq!(later_job_in_workdir(&state, &a).as_deref(), Some("b"));
        assert_eq!(later_job_in_workdir(&state, &b), None, "b ran last");
        // Older records, without an order: the clock is all there is.
        let old_a = record("a", "2026-12-01T10:00:00Z", None);
        assert_eq!(later_job_in_workdir(&state, &old_a), None);
    }

    /// A later attempt in the workdir takes it from the earlier one while under way (it may
    /// be about to open it), and once done only if it opened it or launched: one that ended
    /// waiting for the earlier attempt to be finished took nothing from it.
    #[test]
    fn a_later_attempt_counts_while_under_way_or_if_it_took_the_workdir() {
        let dir = tempfile::tempdir().unwrap();
        let state = crate::statedir::StateDir::new(dir.path().join("state"));
        let record = |attempt: u32, phase: &str, launching: bool| {
            let json = format!(r#"{{"job_id":"w","attempt":{attempt},"command":["true"]}}"#);
            let spec = c3_proto::JobSpec::from_json(json.as_bytes()).unwrap().spec;
            let mut r: RunRecord = serde_json::from_value(serde_json::json!({
                "spec": spec, "workdir": "/shared", "phase": phase, "pgid": null, "seq": 3,
                "state": null, "reason": null, "exit_code": null, "signal": null,
                "started_at": "2026-12-01T10:00:00Z",
            }))
            .unwrap();
            r.launching = launching;
            state.ensure_attempt_dir("w", attempt).unwrap();
            state.write_record(&r).unwrap();
            r
        };
        let first = record(1, "running", true);
        record(2, "preparing", false);
        assert_eq!(later_attempt_in_workdir(&state, &first), Some((2, false)));
        record(2, "running", true);
        assert_eq!(later_attempt_in_workdir(&state, &first), Some((2, true)));
        record(2, "done", false);
        assert_eq!(later_attempt_in_workdir(&state, &first), None);
        record(2, "done", true);
        assert_eq!(later_attempt_in_workdir(&state, &first), Some((2, true)));
    }

    fn order_of(state: &crate::statedir::StateDir) -> u64 {
        state.next_start_order().unwrap()
    }

    /// An attempt whose agent died after its dataset failed (while the DATASET_ERROR was
    /// being sent) is finished by `recover` with that failure, retryable or not as it was:
    /// the record said only "failed", and `recover` sent AGENT_ERROR, retryable, in its
    /// place, and a scheduler retried a job whose dataset reference was bad.
    #[test]
    fn a_dataset_failure_is_recovered_as_it_was() {
        let spec = c3_proto::JobSpec::from_json(br#"{"job_id":"d","command":["true"]}"#)
            .unwrap()
            .spec;
        let mut record: RunRecord = serde_json::from_value(serde_json::json!({
            "spec": spec, "workdir": "/w", "phase": "preparing", "pgid": null, "seq": 1,
            "state": null, "reason": null, "exit_code": null, "signal": null,
            "started_at": "2026-12-01T00:00:00Z", "agent": null, "agent_boot_id": null,
            "leader": null, "cgroup": null, "unstored": [], "unstored_more": 0,
            "unstored_for_good": 0, "job_user": null, "facts": null,
        }))
        .unwrap();
        for retryable in [false, true] {
            note_end(&JobEnd::DatasetFailed { retryable }, &mut record);
            record.phase = Phase::Finishing;
            let verdict = decide(&recorded_end(&record), false, false);
            assert_eq!(
                verdict.reason,
                Some(c3_proto::FailReason::DatasetError),
                "{verdict:?}"
            );
            assert_eq!(verdict.retryable, retryable);
        }
        note_end(&JobEnd::AgentFailed, &mut record);
        assert_eq!(
            decide(&recorded_end(&record), false, false).reason,
            Some(c3_proto::FailReason::AgentError)
        );
    }
}
