//! One attempt's lifecycle, as a short pipeline of phases that live in their own modules:
//! [`crate::prepare`] (user, dirs, store check, datasets) -> [`crate::supervise`] (launch,
//! output, wait, stop) with the [`crate::collector`] syncing alongside -> `finish` (final
//! sync and seal through the collector, then [`crate::jobreport`]).
//!
//! [`run_job`] drives a fresh attempt; [`crate::recover`] rebuilds a [`Run`] from its record
//! and calls the same [`Run::finish`], so a crashed agent's job ends the same way. `Run`
//! itself only keeps the run record (saved at each step, for `recover`) and wires the phases.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use c3_proto::{
    ArtifactsRegistration, JobSpec, JobState, Phase, RecordedResult, RunRecord, Stream,
};

use crate::agentsock::AgentSocket;
use crate::collector::{CollectorConfig, CollectorHandle, Sealed};
use crate::confine::{DirFd, JobReader};
pub use crate::context::AgentContext;
use crate::display::{error_chain, now_rfc3339};
use crate::jobproc::StopBy;
use crate::jobreport::{Ending, JobReporter};
use crate::launch::RunAs;
use crate::outcome::{decide, JobEnd, Verdict};
use crate::prepare::PrepareError;
use crate::report::{Ahead, Reporter};
use crate::statedir::AttemptLock;
use crate::supervise::Supervisor;

/// What the agent tells its caller (and the log's summary line) about a finished job.
#[derive(Debug, Clone)]
pub struct JobSummary {
    pub job_id: String,
    pub verdict: Verdict,
    pub files: usize,
    pub bytes: u64,
    pub new_bytes: u64,
    pub upload_errors: u64,
    /// Store key of the final manifest, if it was written.
    pub manifest: Option<String>,
    /// The stop deadline cut the final sync short: `recover` finishes the attempt.
    pub unfinished: bool,
    /// The script's own exit code, when it exited.
    pub script_exit_code: Option<i32>,
}

/// The run record of an attempt about to start: the spec, the resolved workdir, this agent.
pub(crate) fn fresh_record(ctx: &AgentContext, spec: JobSpec) -> RunRecord {
    let workdir = spec
        .workdir
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| ctx.state.default_workdir(&spec.job_id));
    RunRecord {
        workdir: workdir.display().to_string(),
        workdir_pin: None,
        spec,
        phase: Phase::Preparing,
        pgid: None,
        seq: 0,
        state: None,
        reason: None,
        retryable: None,
        exit_code: None,
        signal: None,
        started_at: now_rfc3339(),
        start_order: ctx.state.next_start_order().map_or_else(
            |e| {
                tracing::warn!(error = %error_chain(&e), "no start order for the attempt; recover orders it by its start time");
                None
            },
            Some,
        ),
        run_id: Some(crate::confine::random_hex()),
        agent: crate::procfs::this_agent(),
        agent_boot_id: crate::procfs::boot_id(),
        agent_pid_ns: crate::procfs::pid_ns(),
        leader: None,
        cgroup: None,
        launching: false,
        unstored: Vec::new(),
        unstored_more: 0,
        unstored_for_good: 0,
        concluded_upload_errors: None,
        job_user: None,
        facts: None,
        result: None,
        watched_dirs: None,
        watched_leader: None,
        synced: None,
        destination: Some(ctx.destination()),
    }
}

impl JobSummary {
    /// The one summary line at the end (contract §9).
    pub fn log(&self, elapsed: Duration) {
        let elapsed_s = (elapsed.as_secs_f64() * 100.0).round() / 100.0;
        if self.unfinished {
            tracing::error!(
                job_id = %self.job_id,
                elapsed_s,
                "job stopped before its final sync was done (stop deadline); `c3-agent recover` finishes it"
            );
            return;
        }
        let v = &self.verdict;
        // A job that did not succeed ends with a warning or an error (`journalctl -p warning`).
        macro_rules! finished {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    state = v.state.as_str(),
                    reason = v.reason.map(|r| r.as_str()),
                    script_exit_code = self.script_exit_code,
                    agent_exit_code = v.exit.code(),
                    files = self.files,
                    bytes = self.bytes,
                    new_bytes = self.new_bytes,
                    upload_errors = self.upload_errors,
                    elapsed_s,
                    "job finished"
                )
            };
        }
        match v.state {
            JobState::Succeeded => finished!(tracing::Level::INFO),
            JobState::Canceled | JobState::TimedOut => finished!(tracing::Level::WARN),
            _ => finished!(tracing::Level::ERROR),
        }
    }
}

/// Why an attempt could not even be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lock(#[from] crate::statedir::LockError),
    /// This node's record of the attempt says it ran (or its final sync was under way),
    /// whatever the store said or did not say in time.
    #[error(
        "job {job_id} attempt {attempt} {what} on this node (its run record is {phase}): {next}"
    )]
    AlreadyRan {
        job_id: String,
        attempt: u32,
        what: &'static str,
        phase: &'static str,
        next: &'static str,
    },
    /// The attempt's run record was set aside unread and the store did not say in time
    /// whether the attempt finished: run over it, a finished one got a second terminal status
    /// and its manifest replaced.
    #[error("job {job_id} attempt {attempt}: its run record did not parse and the store did not say whether the attempt finished; nothing was started (try again)")]
    StoreSilent { job_id: String, attempt: u32 },
    /// The attempt's earlier run record is there but could not be read (an I/O error): run
    /// over it, the earlier job's processes were never stopped and its `seq` was lost.
    #[error("job {job_id} attempt {attempt}: its earlier run record cannot be read; nothing was started")]
    EarlierRecord {
        job_id: String,
        attempt: u32,
        #[source]
        source: crate::statedir::StateError,
    },
    /// The processes an earlier run of the attempt (its record set aside) may have left
    /// could not be looked for: the job's user did not come back from NSS in time. Run on,
    /// the earlier copy and this one could both hold the GPU and write the same workdir.
    #[error("job {job_id} attempt {attempt}: the earlier run's processes could not be looked for; nothing was started (try again)")]
    EarlierUnstopped {
        job_id: String,
        attempt: u32,
        #[source]
        source: crate::prepare::PrepareError,
    },
    /// Stopped while the earlier run's processes were being looked for: nothing was started
    /// (no record written over the set-aside one, so the next run looks for them again).
    #[error("job {job_id} attempt {attempt}: stopped before anything was started")]
    StoppedBeforeStart { job_id: String, attempt: u32 },
}

impl RunError {
    /// Another agent on the attempt is the caller's mistake (a usage error, exit 2); a
    /// state dir that cannot be written (full, read-only) is the node's, retryable on
    /// another: a scheduler takes exit 2 as a bad spec and fails the job for good.
    pub fn exit_code(&self) -> crate::outcome::ExitCode {
        match self {
            RunError::Lock(crate::statedir::LockError::Held { .. }) => {
                crate::outcome::ExitCode::Usage
            }
            RunError::Lock(crate::statedir::LockError::State(_))
            | RunError::EarlierRecord { .. }
            | RunError::EarlierUnstopped { .. }
            | RunError::StoreSilent { .. } => crate::outcome::ExitCode::AgentOrDataset,
            RunError::AlreadyRan { .. } => crate::outcome::ExitCode::Usage,
            RunError::StoppedBeforeStart { .. } => crate::outcome::ExitCode::Canceled,
        }
    }
}

/// A run never silently replaces an earlier run's manifest for the same job and attempt:
/// why it is refused, and its exit code. A store that cannot answer now says nothing here
/// (the preflight judges the store); one whose answer cannot be taken in (an earlier run's
/// manifest over this config's `max_manifest_bytes`, a newer agent's) is not taken for
/// "never ran": the run's first manifest would replace it.
pub async fn already_ran(
    ctx: &AgentContext,
    job_id: &str,
    attempt: u32,
) -> Option<(String, crate::outcome::ExitCode)> {
    let complete = match stored_manifest(ctx, job_id, attempt).await {
        Stored::Complete => true,
        Stored::InProgress => false,
        Stored::Unreadable => {
            return Some((
                cannot_take_in(job_id, attempt, "started"),
                crate::outcome::ExitCode::AgentOrDataset,
            ))
        }
        // Another job's, misrouted or copied: it says nothing of this attempt, and the run's
        // own manifest at its own key takes nothing from that job.
        Stored::Absent | Stored::Unknown | Stored::Foreign => return None,
    };
    Some((
        ran_already(job_id, attempt, complete),
        crate::outcome::ExitCode::Usage,
    ))
}

/// Why an attempt whose manifest key holds a manifest this agent cannot take in is left as
/// it is: nothing was `done` (started, watched).
pub fn cannot_take_in(job_id: &str, attempt: u32, done: &str) -> String {
    format!("job {job_id} attempt {attempt}: its manifest key in the store holds one this agent cannot take in (a newer agent's, another job's or attempt's, one over store.max_manifest_bytes); nothing was {done}")
}

/// How long a write to the state dir on a stop's way out may take before it is given up.
const STATE_WRITE_WAIT: Duration = Duration::from_secs(2);

/// Why a new run of an attempt whose manifest (complete or not) is in the store is refused.
pub fn ran_already(job_id: &str, attempt: u32, complete: bool) -> String {
    let (id, n) = (job_id, attempt);
    if complete {
        let next = n
            .checked_add(1)
            .map_or(String::new(), |next| format!("`--attempt {next}`, or "));
        format!("job {id} attempt {n} already ran (its manifest is in the store): a new run needs a new attempt ({next}the spec's `attempt`) or job id")
    } else {
        format!("job {id} attempt {n} has an unfinished run (its manifest is in progress): `c3-agent recover` on its node finishes it; a new run needs a new attempt or job id")
    }
}

/// What the store says of the attempt's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Absent,
    InProgress,
    Complete,
    /// No answer within the preflight's time, or an error.
    Unknown,
    /// A manifest there this agent cannot take in: another version's, one over
    /// `max_manifest_bytes`, not JSON.
    Unreadable,
    /// Another job's or attempt's manifest (a cache or gateway misrouting, a copy).
    Foreign,
}

/// What the store says of the attempt's manifest, within the preflight's time.
pub async fn stored_manifest(ctx: &AgentContext, job_id: &str, attempt: u32) -> Stored {
    crate::fault::pause_for("slow-already-ran", Duration::from_secs(60)).await;
    let key = crate::store::attempt_manifest_key(job_id, attempt);
    let read = ctx.store.get_bytes_capped(&key, ctx.max_manifest_bytes);
    let read = async {
        match read.await {
            Ok(bytes) => Ok(parse_off_reactor(bytes).await),
            Err(e) => Err(e),
        }
    };
    match tokio::time::timeout(ctx.preflight_timeout, read).await {
        // Another job's or attempt's at this key (misrouted, copied) says nothing of this one.
        Ok(Ok(Ok(m))) if !is_attempts(&m, job_id, attempt) => {
            tracing::error!(key = %key, found_job = %crate::display::cut(m.job_id.clone(), 256), found_attempt = m.attempt,
                "the attempt's manifest key in the store holds another job's or attempt's manifest; taken as no answer");
            Stored::Foreign
        }
        Ok(Ok(Ok(m))) if m.complete => Stored::Complete,
        Ok(Ok(Ok(_))) => Stored::InProgress,
        Ok(Ok(Err(_))) | Ok(Err(crate::store::StoreError::TooLarge { .. })) => Stored::Unreadable,
        Ok(Err(crate::store::StoreError::Op {
            source: object_store::Error::NotFound { .. },
            ..
        })) => Stored::Absent,
        _ => Stored::Unknown,
    }
}

/// Up to `store.max_manifest_bytes` (256 MiB) of JSON, parsed where a timeout and a stop
/// are still heard (on a runtime worker it holds the reactor for seconds).
pub(crate) async fn parse_off_reactor(
    bytes: bytes::Bytes,
) -> Result<c3_proto::Manifest, c3_proto::manifest::ManifestError> {
    tokio::task::spawn_blocking(move || c3_proto::Manifest::from_json(&bytes))
        .await
        .unwrap_or_else(|join| std::panic::resume_unwind(join.into_panic()))
}

/// Whether `m` is the manifest of `job_id`'s attempt `attempt`, the one its key names.
pub(crate) fn is_attempts(m: &c3_proto::Manifest, job_id: &str, attempt: u32) -> bool {
    m.job_id == job_id && m.attempt == attempt
}

/// How long the job's result file (at most 64 KiB) may take to read.
const RESULT_READ_WAIT: Duration = Duration::from_secs(10);

/// How far a later agent's `seq` starts past the one its attempt's record saved
/// ([`Run::from_record`]).
pub(crate) const SEQ_GAP_AFTER_ITS_AGENT: u64 = 16;

/// Where `seq` starts when the attempt's earlier record was set aside unread, per record set
/// aside so far: past anything its agent can have sent, which the control plane would
/// otherwise take the new statuses for duplicates of (a second set-aside starts past the
/// first one's run).
pub(crate) const SEQ_AFTER_UNREADABLE_RECORD: u64 = 1_000_000;

/// The attempt's earlier run record, as far as it could be read.
pub(crate) enum Earlier {
    None,
    Record(Box<RunRecord>),
    /// It did not parse (corrupt, or a newer agent's): set aside, what it said unknown;
    /// `seq` goes on from here.
    SetAside {
        seq: u64,
    },
}

/// Where `seq` goes on after the records set aside beside `record` (0: none): each one's
/// run went on from its own floor, so the next starts past all of them.
fn set_aside_floor(record: &Path) -> Result<u64, crate::statedir::StateError> {
    let count = match crate::statedir::StateDir::set_aside_names(record) {
        Ok(names) => names.len() as u64,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(crate::statedir::StateError::Read {
                path: record.parent().unwrap_or(Path::new(".")).into(),
                source,
            })
        }
    };
    Ok(SEQ_AFTER_UNREADABLE_RECORD.saturating_mul(count))
}

/// Reads the attempt's earlier run record, if one is there (the attempt's lock held). One
/// that does not parse is set aside ([`crate::statedir::StateDir::set_aside`]); one that
/// cannot be read (an I/O error, likely transient) is an error, the record left as it is.
pub(crate) async fn read_earlier_record(
    ctx: &AgentContext,
    job_id: &str,
    attempt: u32,
) -> Result<Earlier, crate::statedir::StateError> {
    let path = ctx.state.run_record_path(job_id, attempt);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        // None, but one was set aside and the run after it died before its first record:
        // still past what the set-aside ones' runs sent (from 0, its statuses were dropped
        // as duplicates).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(match set_aside_floor(&path)? {
                0 => Earlier::None,
                seq => Earlier::SetAside { seq },
            })
        }
        // Not "no record" (a state dir's disk failing): the record may be there.
        Err(source) => return Err(crate::statedir::StateError::Read { path, source }),
    }
    let state = ctx.state.clone();
    let read = tokio::task::spawn_blocking(move || match state.read_record(&path) {
        Ok(record) => Ok(Earlier::Record(Box::new(record))),
        Err(e @ crate::statedir::StateError::Corrupt { .. }) => {
            let aside = state.set_aside(&path)?;
            tracing::error!(
                error = %error_chain(&e),
                set_aside = %aside.display(),
                "the attempt's earlier run record does not parse (corrupt, or written by a newer agent); set aside, the run goes on without what it said"
            );
            Ok(Earlier::SetAside {
                seq: set_aside_floor(&path)?.max(SEQ_AFTER_UNREADABLE_RECORD),
            })
        }
        Err(e) => Err(e),
    })
    .await;
    read.unwrap_or_else(|_| {
        Err(crate::statedir::StateError::Read {
            path: ctx.state.run_record_path(job_id, attempt),
            source: std::io::Error::other("the record's read panicked"),
        })
    })
}

/// Runs one attempt of `spec` to its end. Cancelling `cancel` is `systemctl stop`.
/// `Err` only when another agent already runs this attempt (nothing was touched).
pub async fn run_job(
    ctx: &AgentContext,
    spec: JobSpec,
    cancel: CancellationToken,
) -> Result<JobSummary, RunError> {
    let lock = AttemptLock::acquire_patiently(&ctx.state, &spec.job_id, spec.attempt).await?;
    let span = tracing::info_span!("job", job_id = %spec.job_id, attempt = spec.attempt);
    async move {
        let started = Instant::now();
        // Begun once the run is let through: a refused one returns at once, and a flush
        // dropped there inside a POST the control plane took sent it again next time.
        let earlier_seq = take_over_earlier_run(ctx, &spec, &cancel).await?;
        let mut background = JoinSet::new();
        let winding_down = CancellationToken::new();
        if let Some(cp) = ctx.control_plane.clone() {
            let (state, stop) = (ctx.state.clone(), winding_down.clone());
            background.spawn(
                async move {
                    crate::report::flush_all_outboxes(&cp, &state, cp.deadline(), Some(&stop))
                        .await;
                }
                .in_current_span(),
            );
        }
        let mut run = Run::new(ctx, spec);
        if let Some(seq) = earlier_seq {
            run.record.seq = seq.saturating_add(SEQ_GAP_AFTER_ITS_AGENT);
        }
        run.lock = Some(lock);
        run.stop_requested = Some(stop_clock(&cancel));
        let end = match run.prepare(&cancel).await {
            Ok(workdir) => run.execute(workdir, &cancel).await,
            Err(e) => run.failed_before_launch(e),
        };
        let summary = run.finish(end, started).await;
        // Earlier jobs' reports get a little longer, but never hold the GPU hostage, and
        // after a stop request not at all: the stop deadline is the agent's to keep (Slurm's
        // KillWait follows it), and they stay in the outbox.
        // Then they end after the POST under way (dropped inside it, a kept registration the
        // control plane took was sent again by the next flush, its bytes counted twice):
        // within a second after a stop, else within `IN_FLIGHT_GRACE`.
        // A stop that comes meanwhile cuts either wait to a second from then.
        let mut drain = std::pin::pin!(async { while background.join_next().await.is_some() {} });
        let stopped = || async {
            cancel.cancelled().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let linger = if cancel.is_cancelled() {
            Duration::ZERO
        } else {
            Duration::from_secs(5)
        };
        let lingered = tokio::select! {
            biased;
            () = &mut drain => true,
            () = tokio::time::sleep(linger) => false,
            () = cancel.cancelled() => false,
        };
        winding_down.cancel();
        let ended = lingered
            || tokio::select! {
                biased;
                () = &mut drain => true,
                () = tokio::time::sleep(crate::report::IN_FLIGHT_GRACE) => false,
                () = stopped() => false,
            };
        if !ended {
            tracing::info!(
                "earlier undelivered reports stay in the outbox for a later run or recover"
            );
        }
        Ok(summary)
    }
    .instrument(span)
    .await
}

/// An earlier run of this attempt, its record left in the state dir: `already_ran` lets a
/// run through when the store holds no manifest of the attempt, as after an agent killed
/// before its first one (OOM, early on) that the scheduler starts again with the same spec.
/// Started afresh, the record forgot the earlier job's leader and cgroup (it ran on in the
/// same workdir, named in no record) and `seq` began at 0 again, below the statuses the dead
/// agent sent, which the control plane then dropped as duplicates. An unfinished one is
/// taken over as `recover` would: its processes stopped first. Returns its `seq`, which this
/// run goes on past (with [`Run::from_record`]'s gap: a status may have gone out unsaved).
/// One whose job ran to its end, or whose final sync was under way, is refused: run again,
/// the job's second terminal status went past the first (its `seq` higher), its manifest
/// replaced the first's, and its bytes were registered twice. Only one that never launched
/// (failed or canceled before) runs again.
async fn take_over_earlier_run(
    ctx: &AgentContext,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> Result<Option<u64>, RunError> {
    crate::fault::pause_point("take-over").await;
    let record = match read_earlier_record(ctx, &spec.job_id, spec.attempt).await {
        Ok(Earlier::Record(record)) => record,
        Ok(Earlier::None) => return Ok(None),
        Ok(Earlier::SetAside { seq }) => {
            // What the record said is unknown, whether the attempt finished too: the store
            // is asked again, under the lock (the look before it may have timed out).
            match stored_manifest(ctx, &spec.job_id, spec.attempt).await {
                Stored::Complete => {
                    return Err(RunError::AlreadyRan {
                        job_id: spec.job_id.clone(),
                        attempt: spec.attempt,
                        what: "already ran",
                        phase: "set aside, unread",
                        next: "its manifest is complete in the store; a new run needs a new attempt or job id",
                    })
                }
                Stored::Unknown | Stored::Unreadable | Stored::Foreign => {
                    return Err(RunError::StoreSilent {
                        job_id: spec.job_id.clone(),
                        attempt: spec.attempt,
                    })
                }
                Stored::Absent | Stored::InProgress => {}
            }
            stop_unrecorded_run(ctx, spec, cancel).await?;
            return Ok(Some(seq));
        }
        Err(source) => {
            return Err(RunError::EarlierRecord {
                job_id: spec.job_id.clone(),
                attempt: spec.attempt,
                source,
            })
        }
    };
    let launched = record.pgid.is_some()
        || record.leader.is_some()
        || record.cgroup.is_some()
        || record.launching
        || record.watched_dirs.is_some();
    let refused = |what, phase, next| RunError::AlreadyRan {
        job_id: spec.job_id.clone(),
        attempt: spec.attempt,
        what,
        phase,
        next,
    };
    match record.phase {
        Phase::Done if launched => {
            return Err(refused(
                "already ran",
                "done",
                "a new run needs a new attempt or job id",
            ))
        }
        Phase::Finishing => {
            return Err(refused(
                "has a final sync left unfinished",
                "finishing",
                "`c3-agent recover` finishes it; a new run needs a new attempt or job id",
            ))
        }
        // Its script ended, and FINALIZING may have gone (saved with it): run again, the
        // attempt went back to RUNNING and could end SUCCEEDED after a first run that failed.
        // Not a takeover's own cancel that could not stop the earlier processes (state
        // CANCELED, no exit, no signal): that one is tried again.
        Phase::Running
            if crate::outcome::end_noted(&record)
                && !(record.state == Some(c3_proto::JobState::Canceled)
                    && record.exit_code.is_none()
                    && record.signal.is_none()) =>
        {
            return Err(refused(
                "has a script that already ended and a final sync left unfinished",
                "running, its end recorded",
                "`c3-agent recover` finishes it; a new run needs a new attempt or job id",
            ))
        }
        _ => {}
    }
    if record.phase != Phase::Done {
        tracing::warn!(
            phase = ?record.phase,
            earlier_seq = record.seq,
            earlier_agent_pid = record.agent.map(|a| a.0),
            "taking over an unfinished earlier run of this attempt (its agent died): its processes are stopped first"
        );
        if let Err(stopped) = stop_earlier_survivors(ctx, spec, &record, cancel).await {
            // The stop is the attempt's cancel: `recover`, finishing the earlier record
            // later, reports it CANCELED, not the earlier agent's loss (retryable).
            let mut canceled = record.clone();
            canceled.state = Some(c3_proto::JobState::Canceled);
            let state = ctx.state.clone();
            let saved = tokio::time::timeout(
                STATE_WRITE_WAIT,
                tokio::task::spawn_blocking(move || state.write_record(&canceled)),
            )
            .await;
            if !matches!(saved, Ok(Ok(Ok(())))) {
                tracing::error!("cannot mark the earlier run's record canceled; `recover` will report its agent lost");
            }
            return Err(stopped);
        }
    }
    // The attempt's lock is held: the earlier agent is gone.
    if let Some((pid, _)) = record.agent {
        crate::agentsock::remove_left(&ctx.state, &spec.job_id, spec.attempt, pid.unsigned_abs());
    }
    Ok(Some(record.seq))
}

/// Stops what an earlier run of the attempt whose record was set aside may have left, as
/// for an agent that died mid-launch: by the job's marks alone (no leader, no cgroup known),
/// among everything started since boot (its agent's start is unknown too). The attempt's
/// lock says no live agent runs the attempt: a marked process is the earlier copy's, which
/// would keep the GPU and write the same workdir. The user is looked up off the reactor, bounded as `prepare`'s lookup is and given up on a
/// stop: behind a hung sssd it held the run, a stop unheard.
async fn stop_unrecorded_run(
    ctx: &AgentContext,
    spec: &JobSpec,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    let mut record = fresh_record(ctx, spec.clone());
    record.launching = true;
    record.agent = Some((0, 0));
    match crate::prepare::bounded(
        "looking up the job's user",
        cancel,
        crate::prepare::user(spec),
    )
    .await
    {
        Ok(Some(user)) => {
            record.job_user = Some(c3_proto::JobUser {
                uid: user.uid,
                gids: user.groups,
            });
        }
        Ok(None) => {}
        // No answer in time (or a stop during the look): NSS may answer the launch's own look,
        // or the next run's, and a second copy would run beside the first.
        Err(crate::prepare::PrepareError::Canceled) => {
            return Err(RunError::StoppedBeforeStart {
                job_id: spec.job_id.clone(),
                attempt: spec.attempt,
            })
        }
        Err(
            source @ (crate::prepare::PrepareError::Stuck { .. }
            | crate::prepare::PrepareError::Task(_)),
        ) => {
            return Err(RunError::EarlierUnstopped {
                job_id: spec.job_id.clone(),
                attempt: spec.attempt,
                source,
            })
        }
        Err(e) => {
            // Its processes cannot be told: never signalled (the launch fails on the user too).
            tracing::warn!(error = %error_chain(&e), "the job's user is not known on this node: the earlier run's processes, if any, are not stopped");
            return Ok(());
        }
    }
    stop_earlier_survivors(ctx, spec, &record, cancel).await
}

/// Stops what an earlier run of the attempt left (`record`'s processes): up to a kill grace
/// and more (two minutes by the job's marks, with no cgroup), which a stop does not wait
/// out (`StoppedBeforeStart`; the earlier record stays for `recover`).
async fn stop_earlier_survivors(
    ctx: &AgentContext,
    spec: &JobSpec,
    record: &RunRecord,
    cancel: &CancellationToken,
) -> Result<(), RunError> {
    let stopped = tokio::select! {
        survive = crate::recover::stop_survivors(ctx, record) => survive,
        () = cancel.cancelled() => {
            return Err(RunError::StoppedBeforeStart {
                job_id: spec.job_id.clone(),
                attempt: spec.attempt,
            })
        }
    };
    if stopped {
        tracing::warn!("processes of the earlier run survive SIGKILL (stuck in the kernel?): its GPU may still be in use");
    }
    Ok(())
}

/// When the agent was first asked to stop (a signal): set once, by whoever turns the signal
/// into a cancellation, before it cancels.
static STOP_ASKED: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();

/// Notes that a stop was asked for now (the first call counts): the stop deadline is counted
/// from here. A stop clock made later (the run is made after the look at the store and the
/// attempt's lock, either of which a stop may come during) counted from its own start, and
/// the agent outlived the deadline a scheduler's kill follows by as much.
pub fn note_stop_asked() {
    STOP_ASKED.get_or_init(tokio::time::Instant::now);
}

/// [`note_stop_asked`], for a stop that came at `at` (heard late: after a panic, no runtime
/// read its signal). The first one noted stays.
pub fn note_stop_asked_at(at: tokio::time::Instant) {
    STOP_ASKED.get_or_init(|| at);
}

/// When a stop was asked for, if one was ([`note_stop_asked`]).
pub fn stop_asked_at() -> Option<tokio::time::Instant> {
    STOP_ASKED.get().copied()
}

/// A stop request's time, for the stop deadline of the final sync: the signal's
/// ([`note_stop_asked`]), else the moment `cancel` is seen cancelled.
pub(crate) fn stop_clock(
    cancel: &CancellationToken,
) -> tokio::sync::watch::Receiver<Option<tokio::time::Instant>> {
    let (stopped_at, stop_rx) = tokio::sync::watch::channel(None);
    let cancel = cancel.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = cancel.cancelled() => {
                let at = stop_asked_at().unwrap_or_else(tokio::time::Instant::now);
                let _ = stopped_at.send(Some(at));
            }
            // Nobody waits for the time any more: the run is over.
            _ = stopped_at.closed() => {}
        }
    });
    stop_rx
}

/// The state of one attempt while the agent works on it.
pub struct Run<'a> {
    pub(crate) ctx: &'a AgentContext,
    /// What `recover` needs; saved at every step.
    pub(crate) record: RunRecord,
    /// The order of the record's saves, shared with their blocking writes ([`Run::save`]).
    pub(crate) record_writes: std::sync::Arc<crate::statedir::RecordWrites>,
    pub(crate) workdir: PathBuf,
    pub(crate) reports: JobReporter,
    /// What the collector needs; it becomes the collector's when the job is launched (or,
    /// for a job that never ran, when it is finished).
    pub(crate) collector_config: CollectorConfig,
    pub(crate) collector: Option<CollectorHandle>,
    /// Why the job ended, in words, for the terminal status.
    pub(crate) message: Option<String>,
    pub(crate) run_as: Option<RunAs>,
    /// This agent's claim on the attempt, held until the run is dropped.
    pub(crate) lock: Option<AttemptLock>,
    /// The workdir this attempt opened, which every look at it goes to until the run is
    /// dropped ([`crate::confine::DirFd::hold`]); `None` before `prepare` and in `recover`.
    pub(crate) held_workdir: Option<crate::confine::HeldRoot>,
    /// When a stop (SIGTERM) was requested, if it was: the final sync then ends by
    /// `stop_deadline` after it. `recover` has none; the panic path's `recover_own` has one.
    pub(crate) stop_requested: Option<tokio::sync::watch::Receiver<Option<tokio::time::Instant>>>,
}

impl<'a> Run<'a> {
    /// A fresh attempt: `prepare` looks the user up (off the reactor) and sets the reader.
    fn new(ctx: &'a AgentContext, spec: JobSpec) -> Self {
        Self::with_user(ctx, fresh_record(ctx, spec), None)
    }

    /// A run rebuilt from its record, for `recover`. Readability is checked against the
    /// identity recorded at launch, else a fresh lookup, else (the user is gone from the
    /// node) a reader that may read only what anyone may. The workdir is the one the record
    /// pinned, or none at all ([`crate::prepare::reopen_recorded_workdir`]). Both looks at
    /// the node (the workdir's open, the user's lookup through NSS) end when `given_up` is
    /// cancelled or after [`crate::prepare::NODE_LOOK_DEADLINE`]: behind a hung NFS mount
    /// or sssd they never did, and a stop or `recover`'s budget went unheard.
    pub async fn from_record(
        ctx: &'a AgentContext,
        mut record: RunRecord,
        given_up: &CancellationToken,
    ) -> Self {
        // The record's `seq` is the last one saved, not always the last one sent: a status
        // goes out even when its record could not be written (a full disk), and a `recover`
        // that counted on from the saved one sent its terminal status with a `seq` the
        // control plane had seen, dropped as a duplicate (the job stayed RUNNING there). A
        // gap is allowed (`seq` only has to grow); more statuses than this are never sent
        // without a record written between them.
        record.seq += SEQ_GAP_AFTER_ITS_AGENT;
        crate::prepare::reopen_recorded_workdir(ctx, &record, given_up).await;
        // The identity recorded at launch is the one files are checked against
        // (`JobReader::for_record`): NSS is asked only by a record without one.
        let run_as = match record.job_user {
            Some(_) => None,
            None => crate::prepare::bounded(
                "looking up the job's user",
                given_up,
                crate::prepare::user(&record.spec),
            )
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %error_chain(&e), "the job's user is not known; its files are read as anyone may");
                None
            }),
        };
        Self::with_user(ctx, record, run_as)
    }

    pub(crate) fn with_user(
        ctx: &'a AgentContext,
        record: RunRecord,
        run_as: Option<RunAs>,
    ) -> Self {
        let spec = &record.spec;
        let reader = JobReader::for_record(&record, run_as.as_ref().map(RunAs::reader));
        let collector_config = CollectorConfig::new(ctx, &record, reader);
        let reporter = Reporter::new(
            ctx.control_plane.clone(),
            ctx.state.clone(),
            &spec.job_id,
            spec.attempt,
        );
        Run {
            ctx,
            workdir: PathBuf::from(&record.workdir),
            reports: JobReporter::new(reporter, spec.attempt),
            collector_config,
            collector: None,
            message: None,
            run_as,
            lock: None,
            held_workdir: None,
            stop_requested: None,
            record,
            record_writes: Default::default(),
        }
    }

    /// The attempt's manifest as it was before this run of it: its files stay listed
    /// ([`crate::sync::SyncBook::listed_before`]), and a complete one stays complete until
    /// the seal ([`crate::manifest::ManifestWriter::continuing`]).
    pub(crate) fn listed_before(&mut self, earlier: Option<c3_proto::Manifest>) {
        let Some(mut earlier) = earlier else {
            return;
        };
        let config = &mut self.collector_config;
        config.manifest = config.manifest.clone().continuing(&earlier);
        config.listed_complete = earlier.complete;
        config.listed_before = Some(std::sync::Arc::new(std::mem::take(&mut earlier.files)));
    }

    /// The attempt's manifest could not be read ([`crate::recover::Listed::Unknown`]): a
    /// seal from what the final scan finds replaces it only when the scan sees all of the
    /// output.
    pub(crate) fn earlier_listing_unknown(&mut self) {
        let config = &mut self.collector_config;
        config.earlier_unknown = true;
        config.manifest = config.manifest.clone().holding_in_progress(true);
    }

    fn spec(&self) -> &JobSpec {
        &self.record.spec
    }

    /// Saves the run record, off the reactor (it is fsync'd), on a full disk too (the
    /// attempt's reserve, [`crate::statedir::StateDir::write_record_reserved`]).
    /// Its number is taken here, before the wait, so that a save whose task is dropped (the
    /// stop cut) and whose write runs late never lands over a newer one
    /// ([`crate::statedir::RecordWrites`]).
    pub(crate) async fn save(&self) {
        let (state, record) = (self.ctx.state.clone(), self.record.clone());
        let writes = std::sync::Arc::clone(&self.record_writes);
        let ticket = writes.ticket();
        let saved =
            tokio::task::spawn_blocking(move || writes.write(&state, &record, ticket)).await;
        if let Ok(Err(e)) = saved {
            tracing::error!(error = %error_chain(&e), "cannot write the run record; recover may not find this job");
        }
    }

    pub(crate) async fn next_seq(&mut self) -> u64 {
        self.record.seq += 1;
        self.save().await;
        self.record.seq
    }

    fn failed_before_launch(&mut self, e: PrepareError) -> JobEnd {
        let message = error_chain(&e);
        tracing::error!("{message}");
        self.message = Some(message);
        e.end()
    }

    /// User, directories, store check, input datasets. Nothing of the job runs yet.
    async fn prepare(&mut self, cancel: &CancellationToken) -> Result<DirFd, PrepareError> {
        self.ctx
            .state
            .ensure_attempt_dir(&self.spec().job_id, self.spec().attempt)?;
        self.save().await;
        crate::prepare::earlier_attempts_settled(self.ctx, &self.record, cancel).await?;
        self.run_as = crate::prepare::bounded(
            "looking up the job's user",
            cancel,
            crate::prepare::user(self.spec()),
        )
        .await?;
        if let Some(user) = &self.run_as {
            crate::prepare::not_the_store_owner(user, &self.ctx.store)?;
            self.record.job_user = Some(c3_proto::JobUser {
                uid: user.uid,
                gids: user.groups.clone(),
            });
            let reader = Some(user.reader());
            self.collector_config.reader = reader.clone();
            self.collector_config.uploader =
                self.collector_config.uploader.clone().readable_by(reader);
        }
        let owner = self.run_as.as_ref().map(|u| (u.uid, u.gid));
        let (workdir, held) = crate::prepare::bounded(
            "opening the workdir",
            cancel,
            crate::prepare::workdir(self.ctx, self.spec(), &self.workdir, owner),
        )
        .await?;
        self.held_workdir = Some(held);
        // A later agent knows the workdir by path only and must find this very directory
        // there: saved now, not at launch, so that an agent dying in the store check or a
        // long dataset pull leaves a record that already names it.
        self.record.workdir_pin = workdir.pin_id().ok();
        self.save().await;
        // Up to `preflight_timeout_secs`, which a stop does not wait out: its deadline runs.
        let checked = tokio::select! {
            checked = crate::prepare::store_check(self.ctx) => checked?,
            () = cancel.cancelled() => return Err(PrepareError::Canceled),
        };
        if let Some(warning) = checked {
            self.reports.warn_always(warning);
        }
        // The agent's value wins ([`crate::launch::child_env`]); the user who set one in the
        // spec learns it here, not from a script that wrote where it did not expect.
        for name in crate::launch::AGENT_SETS {
            if self.spec().env.contains_key(name) {
                self.reports.warn_always(format!(
                    "env.{name} in the spec is not used: the agent sets {name} for every job"
                ));
            }
        }
        if cancel.is_cancelled() {
            return Err(PrepareError::Canceled);
        }
        let warnings = crate::prepare::datasets(
            self.ctx,
            self.spec(),
            &workdir,
            &self.workdir,
            owner,
            cancel,
        )
        .await?;
        for w in warnings {
            self.reports.warn(w);
        }
        Ok(workdir)
    }

    /// Launches the script, syncs (and serves its agent socket) while it runs, waits for its end.
    async fn execute(&mut self, workdir: DirFd, cancel: &CancellationToken) -> JobEnd {
        let spec = self.spec().clone();
        let owner = self.run_as.as_ref().map(|u| (u.uid, u.gid));
        let socket = AgentSocket::bind(&self.ctx.state, &spec.job_id, spec.attempt, owner)
            .map_err(|e| {
                self.reports.warn_always(format!(
                    "no agent socket, `c3-agent publish` is unavailable: {}",
                    error_chain(&e)
                ))
            })
            .ok();
        // `no-job-cgroup`: the node without a writable cgroup v2, where only the recorded
        // leader and its process group tell `recover` what is the job's.
        let cgroup = if crate::fault::armed("no-job-cgroup")
            || crate::fault::armed("crash-after-spawn-without-cgroup")
            || crate::fault::armed("exec-hangs-without-cgroup")
        {
            None
        } else {
            crate::supervise::job_cgroup(&spec)
        };
        // Recorded before the launch: an agent killed in between leaves `recover` the cgroup,
        // or without one the word to look for the job's marked processes.
        self.record.cgroup = cgroup.as_ref().map(|cg| cg.path().display().to_string());
        self.record.launching = true;
        self.save().await;
        let (workdir_path, run_as) = (self.workdir.clone(), self.run_as.clone());
        let (spawned, mut heard) = tokio::sync::oneshot::channel();
        let launched = {
            let launch = Supervisor::launch(
                self.ctx,
                &spec,
                &workdir_path,
                &workdir,
                run_as.as_ref(),
                socket.as_ref().map(AgentSocket::path),
                cgroup,
                cancel,
                Some(spawned),
            );
            tokio::pin!(launch);
            let mut pid_saved = false;
            loop {
                tokio::select! {
                    launched = &mut launch => break launched,
                    // Saved as soon as the child is forked: an execve stuck on a hung mount holds
                    // the launch up to a minute, and an agent dying then left `recover` nothing
                    // to find where no cgroup holds the job (it has no marks before the execve).
                    Ok(pid) = &mut heard, if !pid_saved => {
                        pid_saved = true;
                        self.record.leader = crate::procfs::identity(pid);
                        self.save().await;
                    }
                }
            }
        };
        let supervisor = match launched {
            Ok(s) => s,
            Err(failed) => {
                // The failed launch stopped what it started.
                self.record.launching = false;
                self.record.leader = None;
                self.save().await;
                if failed.end == JobEnd::Canceled {
                    tracing::warn!("{}", failed.message);
                } else {
                    tracing::error!("{}", failed.message);
                }
                self.message = Some(failed.message);
                return failed.end;
            }
        };
        crate::fault::crash_point("crash-after-spawn");
        crate::fault::crash_point("crash-after-spawn-without-cgroup");
        let procs = supervisor.procs().clone();
        self.record.phase = Phase::Running;
        self.record.pgid = Some(procs.leader());
        self.record.leader = crate::procfs::identity(procs.leader());
        self.record.cgroup = procs.cgroup().map(|cg| cg.path().display().to_string());
        let seq = self.next_seq().await;
        // Which GPUs the job sees: the spec's choice, else what the scheduler gave the agent.
        let cuda_visible_devices = spec
            .env
            .get("CUDA_VISIBLE_DEVICES")
            .cloned()
            .or_else(|| std::env::var("CUDA_VISIBLE_DEVICES").ok());
        let live_cpus = crate::pace::cpus_shown(self.ctx.live_cpus());
        tracing::info!(pid = procs.leader(), contained_by = %supervisor.containment(), command = ?crate::display::clipped(&spec.command, 1024), workdir = %self.workdir.display(), cuda_visible_devices, live_cpus, "job launched");
        self.reports.running(seq, self.ctx.report_deadline());
        crate::sdnotify::ready(&format!("running: job pid {}", procs.leader()));
        // Once, from the fd: the job publishes in the spelling its cwd has.
        self.collector_config.physical_workdir = crate::publish::physical_path(&workdir);
        let collector = CollectorHandle::start(self.collector_config.clone(), Some(procs.clone()));
        let live_progress = self.progress("live");
        crate::pace::set_live_cpus(self.ctx.live_cpus());
        crate::pace::set_gentle(true);
        let stop_socket = CancellationToken::new();
        let uid = owner.map_or_else(|| nix::unistd::geteuid().as_raw(), |(uid, _)| uid);
        let server =
            socket.map(|s| s.serve(collector.publisher(), procs, uid, stop_socket.clone()));
        self.collector = Some(collector);
        crate::fault::point("after-launch");
        // The job's processes get what the stop deadline leaves the final sync: the status's
        // own reserve stays whole however long they refuse to die.
        let within = self.ctx.stop_deadline - status_reserve(self.ctx.stop_deadline);
        let stop = StopBy::new(self.stop_requested.clone(), within);
        let supervised = supervisor
            .wait(cancel, spec.timeout_secs, self.ctx.kill_grace, &stop)
            .await;
        drop(live_progress);
        // The job's processes are gone: the final sync may use the whole host.
        crate::pace::set_gentle(false);
        // Saved with FINALIZING's record, not only at `finish`: the output's drain and the
        // socket's end take seconds, and an agent killed then left a record at `running`
        // with no outcome, which `recover` ended FAILED/AGENT_ERROR though the exit was known.
        crate::outcome::note_end(&supervised.end, &mut self.record);
        // Saved now too: the result's read below may take `RESULT_READ_WAIT` (a hung `.c3`),
        // and an agent killed in it left the known exit to `recover` as AGENT_ERROR.
        self.save().await;
        crate::fault::crash_point("crash-after-end-noted");
        // Before FINALIZING lets the scheduler place the next job (in the same workdir, at
        // times), and saved with its record for a `recover`; bounded, so a hung mount holds
        // the GPU `RESULT_READ_WAIT` at most. With processes of the job left (they may still
        // write it), read at the seal as before.
        if supervised.gone {
            self.record.result = Some(match self.read_result(stop.by()).await {
                Ok(value) => RecordedResult::Value(value),
                Err(problem) => RecordedResult::Ignored(problem),
            });
        }
        self.gpu_released(Some(supervised.facts.clone()), supervised.gone)
            .await;
        crate::fault::crash_point("crash-after-gpu-released");
        stop_socket.cancel();
        if let Some(server) = server {
            let _ = server.await;
        }
        let drained = supervised.output.drain(self.report_stay(), stop.by()).await;
        for w in supervised.warnings.into_iter().chain(drained) {
            self.reports.warn(w);
        }
        self.message = supervised.message;
        supervised.end
    }

    /// The job's result file, or why it is not taken. Off the reactor and bounded: `.c3` is
    /// the job's, and a FUSE mount it made there (`allow_other`, its server kept alive
    /// elsewhere) could hold the read for ever, and the terminal status with it.
    /// Given up at `by` too (a stop's deadline, which a hung read must not outlast).
    async fn read_result(
        &self,
        by: Option<tokio::time::Instant>,
    ) -> Result<serde_json::Value, String> {
        let (workdir, reader) = (self.workdir.clone(), self.collector_config.reader.clone());
        let read =
            tokio::task::spawn_blocking(move || crate::result::read(&workdir, reader.as_ref()));
        let within = tokio::time::Instant::now() + RESULT_READ_WAIT;
        match tokio::time::timeout_at(by.map_or(within, |by| by.min(within)), read).await {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => Err(format!("its read failed: {e}")),
            Err(_) => Err(format!(
                "not read within {} s (a hung file system?)",
                RESULT_READ_WAIT.as_secs()
            )),
        }
    }

    /// `recover` could not stop every process of the job: FINALIZING says the GPU is not
    /// released, as the supervised path's does, and the terminal status carries the warning.
    pub(crate) async fn processes_survive(&mut self) {
        self.reports.warn_always(
            "processes of the job survive SIGKILL (stuck in the kernel?): its GPU may still be in use"
                .into(),
        );
        self.gpu_released(self.record.facts.clone(), false).await;
    }

    /// The job's processes are gone: FINALIZING, in the background, so a scheduler may
    /// place the next job on the GPU while the final sync runs.
    pub(crate) async fn gpu_released(&mut self, facts: Option<c3_proto::JobFacts>, gone: bool) {
        self.record.facts = facts;
        let seq = self.next_seq().await;
        self.reports
            .finalizing(seq, gone, self.ctx.report_deadline());
        if gone {
            crate::sdnotify::status("finalizing: the job's processes are gone; final sync");
            tracing::info!(
                seq,
                "job's processes are gone, GPU released (FINALIZING); final sync"
            );
        } else {
            crate::sdnotify::status("finalizing: processes of the job still run; final sync");
            tracing::warn!(
                seq,
                "the job is over but processes it left still run: FINALIZING says the GPU is not released; final sync"
            );
        }
    }

    /// Final sync, manifest, artifacts registration, terminal status. Used by `run` and
    /// `recover`. After a stop request, bounded by the stop deadline: the final sync and the
    /// manifest get all of it but a last slice ([`status_reserve`]), in which the terminal
    /// status is sent whatever happened; a cut final sync leaves the attempt in phase
    /// `finishing` for `recover`, which stores the rest and sends the status again with a
    /// higher `seq`. Without that status a control plane would wait for one until `recover`
    /// runs, which in a pod with an `emptyDir` state dir is never. Only the final sync is ever
    /// cut: the reports and the run record are written whole, or a delivered SUCCEEDED could
    /// be followed by a CANCELED that nothing corrects.
    pub async fn finish(mut self, end: JobEnd, started: Instant) -> JobSummary {
        crate::outcome::note_end(&end, &mut self.record);
        self.record.phase = Phase::Finishing;
        self.save().await;
        let deadline = self.sync_cut();
        // A halted `recover`'s sync stops on its own, its checkpoint written; this is for
        // what does not look at the halt (a hung look at the workdir, a slow seal).
        let halt = self.collector_config.halt.clone();
        let halt_backstop = async move {
            match halt {
                Some(halt) => {
                    halt.cancelled().await;
                    tokio::time::sleep(HALT_GRACE).await;
                }
                None => std::future::pending().await,
            }
        };
        let collected = {
            let _final_progress = self.progress("final");
            tokio::select! {
                collected = self.collect_output(&end) => Some(collected).filter(|c| !c.halted),
                () = deadline => None,
                () = halt_backstop => None,
            }
        };
        match collected {
            Some(collected) => self.conclude(end, collected, started).await,
            None => self.conclude_cut(end, started).await,
        }
    }

    /// [`Run::finish`] for a run that the stop deadline left no time to sync at all (the
    /// panic path, stopped while it still read what the attempt's manifest lists): the cut
    /// path's status, the attempt left in phase `finishing` for `recover`.
    pub(crate) async fn finish_cut(mut self, end: JobEnd, started: Instant) -> JobSummary {
        crate::outcome::note_end(&end, &mut self.record);
        self.record.phase = Phase::Finishing;
        self.save().await;
        self.conclude_cut(end, started).await
    }

    /// Fires when a stop leaves the final sync no more time: `stop_deadline` after the stop
    /// request, less the terminal status's reserve ([`status_reserve`]). Never without a
    /// stop clock.
    pub(crate) fn sync_cut(&self) -> impl std::future::Future<Output = ()> + 'static {
        self.before_stop_deadline(status_reserve)
    }

    /// Fires `margin(stop_deadline)` before the stop deadline, once a stop was asked for.
    /// Never without a stop clock (`recover`).
    fn before_stop_deadline(
        &self,
        margin: fn(Duration) -> Duration,
    ) -> impl std::future::Future<Output = ()> + 'static {
        before_stop_deadline(self.stop_requested.clone(), self.ctx.stop_deadline, margin)
    }

    /// `recover` and `resync` stop this run's final sync when `halt` is cancelled (a signal,
    /// the time budget): what it stored is listed, the attempt stays in phase `finishing`,
    /// and the next pass goes on from there.
    pub fn halt_on(&mut self, halt: CancellationToken) {
        self.collector_config.halt = Some(halt);
    }

    /// Whether `recover` was told to stop this run.
    fn halted(&self) -> bool {
        self.collector_config
            .halt
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
    }

    /// When reports must be done by: `give_up_secs` from now, and after a stop request also
    /// a moment before the stop deadline, so that what is kept reaches the outbox in time.
    fn report_stay(&self) -> tokio::time::Instant {
        let mut stay = self.ctx.report_deadline();
        if self.halted() {
            // Whoever stopped `recover` waits for it: what is not delivered by then is kept.
            stay = stay.min(tokio::time::Instant::now() + HALT_REPORTS);
        }
        let requested = self.stop_requested.as_ref().and_then(|r| *r.borrow());
        match requested.and_then(|at| at.checked_add(self.ctx.stop_deadline)) {
            Some(hard) => stay.min(hard - report_margin(self.ctx.stop_deadline)),
            None => stay,
        }
    }

    /// Fires when a stop that comes while the reports are under way leaves them no more
    /// time: [`Run::report_stay`] looks at the stop clock once, and a stop after it (a
    /// control plane that takes the reports and answers slowly) was waited out for all of
    /// `give_up_secs`, past the stop deadline and a scheduler's kill. Never without a stop
    /// clock (`recover`).
    fn stop_cut(&self) -> impl std::future::Future<Output = ()> + 'static {
        self.before_stop_deadline(report_margin)
    }

    /// The stop deadline cut the final sync: the terminal status says so, and the attempt
    /// stays in phase `finishing` for `recover`.
    async fn conclude_cut(&mut self, end: JobEnd, started: Instant) -> JobSummary {
        // Uploads in flight are dropped; a resumable multipart journal stays for recover.
        self.collector.take();
        // Not finished is never success: the agent was stopped before its work was done, its
        // output not all stored (yet), as an upload error says. A script that succeeded is
        // FAILED/UPLOAD_ERROR, the status the contract lets a completed sync replace: the
        // CANCELED sent before was contradicted by `recover`'s SUCCEEDED. An OOM kill is said
        // as the finished attempt will say it (`recover`'s status after).
        let oom = self.oom_killed();
        // A `recover` cut after its agent's conclusion may have gone out (its `done` unsaved)
        // says that one again: an UPLOAD_ERROR after a SUCCEEDED contradicted it. Cut
        // unconcluded, how many files are not stored is not known, and at least one is (the
        // final sync was not done): an UPLOAD_ERROR that counted none contradicted itself.
        let upload_errors = self.record.concluded_upload_errors.unwrap_or(1);
        let verdict = decide(&end, upload_errors > 0, oom);
        let note = if self.halted() {
            "`c3-agent recover` was stopped (a signal, or its --budget-secs) before the final sync was done: output not yet stored stays on the node; the next `recover` goes on with it and sends the final status".to_string()
        } else {
            format!(
                "stopped before the final sync was done (job.stop_deadline_secs = {}): output not yet stored stays on the node; `c3-agent recover` stores it and sends the final status",
                self.ctx.stop_deadline.as_secs()
            )
        };
        self.say_unsynced_end(&verdict, upload_errors, note).await;
        self.unsynced_summary(verdict, upload_errors, true, started)
    }

    /// The terminal status of an end said without a (complete) sync, `note` after the
    /// run's own message. RUNNING and FINALIZING go first; past the reports' stay, all go
    /// to the outbox in order.
    async fn say_unsynced_end(&mut self, verdict: &Verdict, upload_errors: u64, note: String) {
        let ending = Ending {
            exit_code: self.record.exit_code,
            signal: self.record.signal.clone(),
            message: Some(match &self.message {
                Some(m) => format!("{m}; {note}"),
                None => note,
            }),
            upload_errors,
            result: serde_json::Value::Null,
            facts: self.record.facts.clone(),
        };
        let stay = self.report_stay();
        let seq = self.next_seq().await;
        self.reports.finish(seq, None, verdict, ending, stay).await;
    }

    /// The summary of such an end (nothing listed by it), logged.
    fn unsynced_summary(
        &self,
        verdict: Verdict,
        upload_errors: u64,
        unfinished: bool,
        started: Instant,
    ) -> JobSummary {
        let summary = JobSummary {
            job_id: self.spec().job_id.clone(),
            verdict,
            files: 0,
            bytes: 0,
            new_bytes: 0,
            upload_errors,
            manifest: None,
            unfinished,
            script_exit_code: self.record.exit_code,
        };
        summary.log(started.elapsed());
        summary
    }

    /// Whether the kernel's OOM killer ended a process of the job (its facts say).
    fn oom_killed(&self) -> bool {
        self.record.facts.as_ref().is_some_and(|f| f.oom_kills > 0)
    }

    /// An attempt whose workdir a later attempt of its job took: what is there is that
    /// attempt's, so nothing is synced as this one's, but its end is said (left as it was,
    /// it stayed RUNNING or FINALIZING at the control plane for good, and retention removed
    /// its record unreported). What its record leaves unstored counts as unstorable for good.
    pub(crate) async fn conclude_left(&mut self, end: JobEnd, later: u32) -> JobSummary {
        let started = Instant::now();
        self.collector.take();
        let oom = self.oom_killed();
        let unstored =
            (self.record.unstored.len() as u64).saturating_add(self.record.unstored_more);
        // Never synced to its end (a done one is never concluded so), it has output it did
        // not store: at least one.
        let upload_errors = self
            .record
            .concluded_upload_errors
            .unwrap_or(unstored.max(1));
        let verdict = decide(&end, upload_errors > 0, oom);
        let note = format!(
            "attempt {later} of the job ran in this attempt's workdir since: what is there is its; this attempt's output was not synced further"
        );
        self.record.concluded_upload_errors = Some(upload_errors);
        self.record.unstored_for_good = unstored;
        self.save().await;
        self.say_unsynced_end(&verdict, upload_errors, note).await;
        self.record.state = Some(verdict.state);
        self.record.reason = verdict.reason;
        self.record.phase = Phase::Done;
        self.record.concluded_upload_errors = None;
        self.save().await;
        self.unsynced_summary(verdict, upload_errors, false, started)
    }

    /// A progress line for `phase` every 10 s until the returned guard is dropped (also when
    /// the stop deadline drops the final sync).
    fn progress(&self, phase: &'static str) -> tokio_util::sync::DropGuard {
        let stop = CancellationToken::new();
        let record = self
            .ctx
            .state
            .attempt_dir(&self.spec().job_id, self.spec().attempt)
            .join("progress.json");
        tokio::spawn(
            crate::progress::report(
                self.collector_config.progress.clone(),
                phase,
                Some(record),
                stop.clone(),
            )
            .in_current_span(),
        );
        stop.drop_guard()
    }

    /// The final sync and the seal (logs, the complete manifest): the part of finishing that
    /// the stop deadline may cut.
    async fn collect_output(&mut self, end: &JobEnd) -> Collected {
        let launched = match end {
            JobEnd::Exited(_) | JobEnd::Killed(_) | JobEnd::TimedOut | JobEnd::AgentLost => true,
            // Canceled before launch leaves no record of a pgid.
            JobEnd::Canceled => self.record.pgid.is_some() || self.record.watched_dirs.is_some(),
            JobEnd::AgentFailed | JobEnd::DatasetFailed { .. } => false,
        };
        let mut unstored = Vec::new();
        let mut unstored_more = 0;
        let mut unstored_for_good = 0;
        let mut sealed = Sealed::default();
        let mut result = serde_json::Value::Null;
        if launched {
            if self.collector.is_none() {
                // `recover`: the same collector, with no job running.
                self.collector = Some(CollectorHandle::start(self.collector_config.clone(), None));
            }
            let Some(collector) = self.collector.as_ref() else {
                unreachable!("started above")
            };
            let final_sync = collector.job_ended().await;
            if final_sync.halted {
                // Not sealed: a complete manifest would leave out what the sync did not get to.
                return Collected {
                    halted: true,
                    ..Collected::default()
                };
            }
            for w in final_sync.warnings {
                self.reports.warn(w);
            }
            unstored.extend(final_sync.unstored);
            unstored_more = final_sync.unstored_more;
            unstored_for_good = final_sync.for_good;
            let read = match self.record.result.clone() {
                Some(RecordedResult::Value(value)) => Ok(value),
                Some(RecordedResult::Ignored(problem)) => Err(problem),
                None => self.read_result(None).await,
            };
            result = read.unwrap_or_else(|problem| {
                self.reports
                    .warn_always(format!("result file ignored: {problem}"));
                serde_json::Value::Null
            });
            let (job_id, attempt) = (self.spec().job_id.clone(), self.spec().attempt);
            let logs = [Stream::Stdout, Stream::Stderr]
                .map(|s| (s, self.ctx.state.log_path(&job_id, attempt, s)));
            if let Some(collector) = self.collector.take() {
                sealed = collector.seal(logs, result.clone()).await;
            }
            unstored.append(&mut sealed.unstored);
            unstored_for_good += sealed.for_good;
        }
        Collected {
            unstored,
            unstored_more,
            unstored_for_good,
            sealed,
            result,
            halted: false,
        }
    }

    /// Verdict, artifacts registration, terminal status, the run record's `done`: never cut.
    async fn conclude(
        &mut self,
        end: JobEnd,
        collected: Collected,
        started: Instant,
    ) -> JobSummary {
        let Collected {
            mut unstored,
            mut unstored_more,
            mut unstored_for_good,
            mut sealed,
            result,
            halted: _,
        } = collected;
        let mut upload_errors = unstored.len() as u64 + unstored_more;
        if let Some(sent) = self.record.concluded_upload_errors {
            if upload_errors > sent {
                tracing::warn!(upload_errors, sent,
                    "this attempt's terminal status may have gone out before its agent died, with fewer upload errors: what this look could not see (the workdir removed meanwhile?) that final sync saw and stored; its status stands");
                unstored = std::mem::take(&mut self.record.unstored);
                unstored_more = self.record.unstored_more;
                unstored_for_good = self.record.unstored_for_good;
                upload_errors = sent;
            }
        }
        let oom = self.oom_killed();
        // The verdict counts every upload error, whoever caused it (contract §8).
        let verdict = decide(&end, upload_errors > 0, oom);
        if upload_errors > unstored_for_good {
            tracing::error!(upload_errors, for_good = unstored_for_good, unstored = ?&unstored[..unstored.len().min(20)],
                "some output could not be stored; it stays on the node: `c3-agent resync {}` (or `recover`) stores it later",
                self.spec().job_id);
        } else if upload_errors > 0 {
            tracing::error!(upload_errors, unstored = ?&unstored[..unstored.len().min(20)],
                "some output can never be stored as it is (paths too deep or long, too many files, unreadable by the job's user, too large or sparse, on a FUSE mount); `recover` leaves it");
        }
        self.record.unstored = unstored;
        self.record.unstored_more = unstored_more;
        self.record.unstored_for_good = unstored_for_good;
        if self.record.concluded_upload_errors != Some(upload_errors) {
            self.record.concluded_upload_errors = Some(upload_errors);
            self.save().await;
        }
        // `sealed.new_bytes` is what the attempt added in all (a crashed agent's uploads
        // included); an earlier registration of this attempt (before a resync) said part of it.
        let registered = self.record.synced.as_ref().map_or(0, |s| s.new_bytes);
        let attempt_total = sealed.new_bytes;
        sealed.new_bytes = attempt_total.saturating_sub(registered);
        let synced = sealed
            .manifest_sha256
            .is_some()
            .then_some(c3_proto::Synced {
                files: sealed.files as u64,
                bytes: sealed.bytes,
                new_bytes: attempt_total,
            });
        self.report(&verdict, &sealed, synced, upload_errors, result)
            .await;
        crate::fault::crash_point("crash-after-terminal-status");
        self.record.state = Some(verdict.state);
        self.record.reason = verdict.reason;
        self.record.phase = Phase::Done;
        self.record.concluded_upload_errors = None;
        self.save().await;
        let summary = JobSummary {
            job_id: self.spec().job_id.clone(),
            verdict,
            files: sealed.files,
            bytes: sealed.bytes,
            new_bytes: sealed.new_bytes,
            upload_errors,
            manifest: sealed
                .manifest_sha256
                .map(|_| self.collector_config.manifest.key()),
            unfinished: false,
            script_exit_code: self.record.exit_code,
        };
        summary.log(started.elapsed());
        summary
    }

    /// Artifacts registration and terminal status, within one deadline (`give_up_secs`), cut
    /// short by a stop that comes meanwhile ([`Run::stop_cut`]): what is not delivered by
    /// then is kept in the outbox. `synced` (what the registration says the attempt added)
    /// is recorded just before the registration is kept in the outbox, never while it waits
    /// on the control plane: recorded then, a crash while it waited left a `recover` that
    /// registered 0 bytes. One the outbox could not keep (a full disk) is recorded once
    /// delivered: recorded at once, a control plane down as well lost it, and a later
    /// `resync` registered only what it added.
    async fn report(
        &mut self,
        verdict: &Verdict,
        sealed: &Sealed,
        synced: Option<c3_proto::Synced>,
        upload_errors: u64,
        result: serde_json::Value,
    ) {
        let stay = self.report_stay();
        let cut = self.stop_cut();
        let seq = self.next_seq().await;
        let registration = sealed
            .manifest_sha256
            .as_ref()
            .map(|sha| ArtifactsRegistration {
                attempt: self.spec().attempt,
                manifest: self.collector_config.manifest.key(),
                manifest_sha256: sha.clone(),
                files: sealed.files as u64,
                bytes: sealed.bytes,
                new_bytes: sealed.new_bytes,
            });
        let ending = Ending {
            exit_code: self.record.exit_code,
            signal: self.record.signal.clone(),
            message: self.message.clone(),
            upload_errors,
            result,
            facts: self.record.facts.clone(),
        };
        self.reports.owe_terminal(seq, verdict, ending.clone());
        // What the record said before the deliveries, which may have recorded the
        // registration (and be cut during that save) before the outbox kept it.
        let before = self.record.synced.clone();
        let reported = tokio::select! {
            () = self.deliver_reports(seq, registration, synced.clone(), verdict, ending, stay) => true,
            () = cut => false,
        };
        if !reported {
            tracing::warn!(
                stop_deadline_secs = self.ctx.stop_deadline.as_secs(),
                "the stop deadline is near: the reports not yet delivered are kept for `c3-agent recover` or the next run"
            );
            // As on the way without a stop: recorded as registered before it is kept (a kill
            // between the keep and the Done save left `recover` to deliver the kept one and
            // register the same bytes again), put back if the outbox could not keep it.
            let owes = self.reports.owes_registration() && synced.is_some();
            if owes && self.record.synced != synced {
                self.record.synced = synced;
                self.save().await;
            }
            let kept = self.reports.keep_owed();
            crate::fault::crash_point("crash-after-owed-reports-kept");
            if owes && !kept {
                self.record.synced = before;
                self.save().await;
            }
        }
    }

    /// [`Run::report`]'s deliveries, which a stop may drop at any of its waits: each report
    /// is owed to [`JobReporter::keep_owed`] until it is kept or delivered.
    async fn deliver_reports(
        &mut self,
        seq: u64,
        registration: Option<ArtifactsRegistration>,
        synced: Option<c3_proto::Synced>,
        verdict: &Verdict,
        ending: Ending,
        stay: tokio::time::Instant,
    ) {
        self.reports.settle(seq, registration, stay).await;
        // Recorded as registered before it is kept: a kill between the keep and the record
        // left `recover` to deliver the kept one and then register the same bytes again
        // (the quota charged twice). A kill before the keep undercounts instead.
        let before = self.record.synced.clone();
        if self.reports.owes_registration() && synced.is_some() {
            self.record.synced = synced.clone();
            self.save().await;
        }
        let mut registration = self.reports.keep();
        crate::fault::crash_point("crash-after-registration-kept");
        let registered = match registration {
            Some(Ahead::Kept(_) | Ahead::Local) => true,
            Some(Ahead::NotKept(_)) => {
                // Sent now, maybe for as long as `stay`: counted only once delivered.
                self.record.synced = before.clone();
                self.save().await;
                let unkept = registration.take().expect("matched just now");
                self.reports.register_unkept(seq, unkept, stay).await
            }
            None => false,
        };
        let now = if registered && synced.is_some() {
            synced
        } else {
            before
        };
        if self.record.synced != now {
            self.record.synced = now;
            self.save().await;
        }
        self.reports
            .finish(seq, registration, verdict, ending, stay)
            .await;
    }
}

/// What the final sync and the seal left for the reports.
#[derive(Default)]
struct Collected {
    /// The first [`crate::collector::MAX_NAMED_UNSTORED`] (and the seal's), by name.
    unstored: Vec<String>,
    unstored_more: u64,
    /// How many of those the job made unstorable for good (`RunRecord::unstored_for_good`).
    unstored_for_good: u64,
    sealed: Sealed,
    result: serde_json::Value,
    /// `recover` was told to stop ([`Run::halt_on`]) before the final sync was done.
    halted: bool,
}

/// How long a halted `recover` (a signal, its time budget) waits for a final sync that does
/// not stop on its own (a hung look at the workdir, a seal under way) before it drops it.
const HALT_GRACE: Duration = Duration::from_secs(10);

/// How long a halted `recover` tries to deliver the cut attempt's status; then it is kept.
const HALT_REPORTS: Duration = Duration::from_secs(5);

/// How long before the stop deadline the reports give up, for what they keep to reach the
/// outbox: a quarter of [`status_reserve`], at most half a second.
fn report_margin(stop_deadline: Duration) -> Duration {
    (status_reserve(stop_deadline) / 4).min(Duration::from_millis(500))
}

/// [`Run::sync_cut`] before there is a run: what ends `recover_own`'s rebuilding of the run
/// (its workdir's open, its user's lookup) on the panic path, as it ends the final sync.
pub(crate) fn sync_cut(
    requested: Option<tokio::sync::watch::Receiver<Option<tokio::time::Instant>>>,
    within: Duration,
) -> impl std::future::Future<Output = ()> + 'static {
    before_stop_deadline(requested, within, status_reserve)
}

/// Fires `margin(within)` before `within` after the stop `requested` says was asked for;
/// never without one.
async fn before_stop_deadline(
    requested: Option<tokio::sync::watch::Receiver<Option<tokio::time::Instant>>>,
    within: Duration,
    margin: fn(Duration) -> Duration,
) {
    let Some(mut requested) = requested else {
        return std::future::pending().await;
    };
    // The watch's borrow ends with this statement: the future stays `Send`.
    let at = match requested.wait_for(Option::is_some).await {
        Ok(at) => Some(at.unwrap_or_else(tokio::time::Instant::now)),
        Err(_) => None,
    };
    match at.and_then(|at| at.checked_add(within)) {
        Some(hard) => tokio::time::sleep_until(hard - margin(within)).await,
        None => std::future::pending().await,
    }
}

/// The last slice of the stop deadline, kept for the terminal status: a fifth of it, at
/// least 1 s and at most 5 s (never more than the deadline itself).
fn status_reserve(stop_deadline: Duration) -> Duration {
    (stop_deadline / 5)
        .clamp(Duration::from_secs(1), Duration::from_secs(5))
        .min(stop_deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_reserve_is_a_fifth_of_the_stop_deadline_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(status_reserve(s(25)), s(5));
        assert_eq!(status_reserve(s(10)), s(2));
        assert_eq!(status_reserve(s(2)), s(1), "at least a second to be heard");
        assert_eq!(status_reserve(s(120)), s(5), "the sync keeps the rest");
        assert_eq!(
            status_reserve(Duration::from_millis(500)),
            Duration::from_millis(500)
        );
        assert_eq!(status_reserve(Duration::ZERO), Duration::ZERO);
    }
}
