//! Retention of finished jobs' local data: a job's state dir (`<state_dir>/jobs/<id>`: run
//! records, logs, the default workdir `work/`) is removed once every attempt of the job is
//! done, everything is stored, no report waits in the outbox, and the job has been finished
//! for longer than the policy keeps jobs of its latest attempt's state.
//!
//! What is never removed: a workdir outside the job's state dir (a spec's workdir elsewhere
//! under the jobs root, or anywhere else, belongs to the operator: it is reported in
//! [`RetentionReport::left_workdirs`]), a job another job's workdir lies in, a job with a file
//! system mounted inside it, anything reached through a symlink, and anything the job's
//! users could not have removed themselves (root stands in for them: another user's
//! directory one of them moved into its workdir stays, and the job with it).
//!
//! How a job goes: its attempt locks are taken (a held lock means an agent is at work on it:
//! the job is left alone), its records read again under the locks, then its dir is renamed
//! into `<state_dir>/jobs/.trash/` (one atomic step: `recover`, `resync` and a new attempt see
//! the whole job or none of it, and the job's user can no longer reach anything in it by
//! path: the trash is the agent's, 0700), the mount table read again (a mount made since
//! the first look keeps the job), and the trash entry removed by [`crate::rmtree`], which
//! enters no mount it meets, its records last.
//! What stays puts the job back in place, kept. A sweep cut short leaves a trash entry that
//! the next sweep removes first.
//!
//! Blocking: call it with `spawn_blocking`.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use c3_proto::{JobState, Phase, RunRecord};

use crate::confine::JobReader;
use crate::rmtree;
use crate::statedir::{AttemptLock, StateDir};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Where removed jobs wait for their removal, below the jobs dir (same file system, so the
/// move is a rename). Not a valid job id, and without an `attempts` dir: no job to anyone.
const TRASH: &str = ".trash";

/// How long finished jobs' local data is kept, by the state of their latest attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// SUCCEEDED.
    pub succeeded: Duration,
    /// FAILED, CANCELED, TIMED_OUT (and a done attempt with no state recorded).
    pub failed: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            succeeded: 7 * DAY,
            failed: 30 * DAY,
        }
    }
}

impl Retention {
    /// From whole days (the config's unit).
    pub fn from_days(succeeded_days: u64, failed_days: u64) -> Self {
        Retention {
            succeeded: DAY.saturating_mul(u32::try_from(succeeded_days).unwrap_or(u32::MAX)),
            failed: DAY.saturating_mul(u32::try_from(failed_days).unwrap_or(u32::MAX)),
        }
    }

    /// How long a job whose latest attempt ended in `state` is kept.
    pub fn period_for(&self, state: Option<JobState>) -> Duration {
        match state {
            Some(JobState::Succeeded) => self.succeeded,
            _ => self.failed,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    /// Jobs whose state dir (and the default workdir in it) is gone, by id.
    pub removed_jobs: Vec<String>,
    /// Apparent size of the regular files removed.
    pub bytes_freed: u64,
    /// Jobs left in place, and why.
    pub kept: Vec<(String, String)>,
    /// Workdirs of removed jobs that lie outside the job's state dir: never removed here.
    pub left_workdirs: Vec<(String, PathBuf)>,
    /// What could not be cleaned up (also logged); the next sweep tries again.
    pub errors: Vec<String>,
}

/// One job as read from its state dir.
struct Job {
    id: String,
    dir: PathBuf,
    /// Attempt numbers, ascending, with what their records say.
    attempts: Vec<(u32, Attempt)>,
    /// The newest run record's mtime: when the job last changed.
    finished: SystemTime,
    /// The mtime of the scheduler's `job.json`, if there is one.
    job_json: Option<SystemTime>,
}

/// What a sweep needs of an attempt's run record. A sweep holds every job's at once, and a
/// whole record (with its spec, up to a MiB, and the names of its unstored files) each: 5,000
/// retained jobs with big specs made gigabytes every hour. [`remove_job`] reads the records
/// again under the job's locks, one at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    /// As recorded.
    workdir: String,
    /// [`crate::recover::took_workdir`].
    took_workdir: bool,
    phase: Phase,
    /// [`RunRecord::unstored_to_retry`].
    unstored_to_retry: u64,
    state: Option<JobState>,
}

impl Attempt {
    fn of(record: &RunRecord) -> Attempt {
        Attempt {
            workdir: record.workdir.clone(),
            took_workdir: crate::recover::took_workdir(record),
            phase: record.phase,
            unstored_to_retry: record.unstored_to_retry(),
            state: record.state,
        }
    }
}

/// Removes the local data of every finished job past its retention period.
pub fn sweep(state: &StateDir, policy: &Retention, now: SystemTime) -> RetentionReport {
    sweep_until(state, policy, now, &AtomicBool::new(false))
}

/// [`sweep`], stopped at the next job, or within a job's removal (the job then put back,
/// kept, for the next sweep), once `stop` is set: `recover --budget-secs`, a SIGTERM.
pub fn sweep_until(
    state: &StateDir,
    policy: &Retention,
    now: SystemTime,
    stop: &AtomicBool,
) -> RetentionReport {
    let mut report = RetentionReport::default();
    if !state.root().is_dir() {
        return report;
    }
    let _sweeping = match crate::statedir::try_retention_lock(state) {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            tracing::info!("another retention sweep is running; this one is skipped");
            return report;
        }
        Err(e) => {
            let why = format!("no retention sweep: {}", crate::error_chain(&e));
            tracing::warn!("{why}");
            report.errors.push(why);
            return report;
        }
    };
    let jobs_dir = state.jobs_dir();
    let trash = jobs_dir.join(TRASH);
    empty_trash(state, &trash, &mut report, stop);

    let Ok(entries) = std::fs::read_dir(&jobs_dir) else {
        return report;
    };
    let mut ids: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| c3_proto::spec::validate_job_id(name).is_ok())
        .collect();
    ids.sort();

    let mut jobs = Vec::new();
    for id in ids {
        match read_job(state, &id) {
            Ok(Some(job)) => jobs.push(job),
            Ok(None) => {}
            Err(why) => report.kept.push((id, why)),
        }
    }
    // Every workdir any job's record names: a job whose dir holds another job's workdir stays.
    // Compared as recorded, never resolved (see `inside`); each job dir resolved once.
    let claims: Vec<(&str, PathBuf)> = jobs
        .iter()
        .flat_map(|j| {
            j.attempts
                .iter()
                .map(|(_, r)| (j.id.as_str(), PathBuf::from(&r.workdir)))
        })
        .collect();

    for job in &jobs {
        if stop.load(Ordering::Relaxed) {
            report
                .errors
                .push("stopped before every job was looked at (a stop, or the time budget)".into());
            break;
        }
        if let Err(why) = due(state, policy, now, job) {
            report.kept.push((job.id.clone(), why));
            continue;
        }
        let real_dir = std::fs::canonicalize(&job.dir).ok();
        if let Some((other, _)) = claims.iter().find(|(other, workdir)| {
            *other != job.id
                && (workdir.starts_with(&job.dir)
                    || real_dir.as_ref().is_some_and(|d| workdir.starts_with(d)))
        }) {
            report.kept.push((
                job.id.clone(),
                format!("job {other}'s workdir lies inside its dir"),
            ));
            continue;
        }
        match remove_job(state, policy, now, job, &trash, &mut report, stop) {
            Ok(()) => {}
            Err(Left::Kept(why)) => report.kept.push((job.id.clone(), why)),
            Err(Left::Gone) => {
                tracing::debug!(job_id = %job.id, "removed meanwhile (by another sweep)");
            }
        }
    }
    let _ = std::fs::remove_dir(&trash);
    sweep_orphan_outboxes(state, policy, now, &mut report);
    report
}

/// The least age of a `job.json` alone before retention takes its dir ([`spec_alone`]).
const SPEC_ALONE_MIN_AGE: Duration = DAY;

/// A job dir that holds the scheduler's `job.json` and nothing else: a run refused before
/// it made any attempt (a bad spec, "already ran", a unit stopped before it started). No
/// record ever names it, and it was kept for ever; it goes as a failed job does, counted
/// from when `job.json` was written. Anything else beside it (a dir another job uses as its
/// workdir, an operator's data) keeps the dir, and so does a dir that is not the agent's own:
/// with no record naming a user, its tree is emptied as anyone's ([`deputy`]), and a user who
/// may write in it (its owner) could move in, between the look and the walk, a tree of
/// another user's for root to empty.
fn spec_alone(dir: &Path, id: &str) -> Result<Job, String> {
    let none = || "no attempt records".to_string();
    if !crate::statedir::agents_own(&[dir]) {
        return Err(
            "no attempt records, and the dir is not the agent's own (owner or mode)".into(),
        );
    }
    let mut entries = std::fs::read_dir(dir).map_err(|_| none())?;
    let only = entries.next().ok_or_else(none)?.map_err(|_| none())?;
    if entries.next().is_some() || only.file_name() != "job.json" {
        return Err(none());
    }
    let md = std::fs::symlink_metadata(only.path()).map_err(|_| none())?;
    if !md.is_file() {
        return Err(none());
    }
    let written = spec_written(&md).ok_or_else(none)?;
    Ok(Job {
        id: id.to_string(),
        dir: dir.to_path_buf(),
        attempts: Vec::new(),
        finished: written,
        job_json: Some(written),
    })
}

/// When a `job.json` was written: the later of its mtime and ctime, as a copy that kept an
/// old mtime (`cp -p`, `rsync -a`, a tar) was written when it was made. Its mtime alone let
/// retention take the dir of a retry copied in just now from under its agent.
fn spec_written(md: &std::fs::Metadata) -> Option<SystemTime> {
    use std::os::unix::fs::MetadataExt;
    let changed =
        SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(md.ctime()).unwrap_or(0));
    Some(md.modified().ok()?.max(changed))
}

/// Reads a job's records. `Ok(None)`: not a job's dir (a plain file, a symlink).
fn read_job(state: &StateDir, id: &str) -> Result<Option<Job>, String> {
    let dir = state.job_dir(id);
    match std::fs::symlink_metadata(&dir) {
        Ok(md) if md.is_dir() => {}
        _ => return Ok(None),
    }
    let attempts_dir = dir.join("attempts");
    let entries = match std::fs::read_dir(&attempts_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return spec_alone(&dir, id).map(Some);
        }
        Err(e) => return Err(format!("cannot read {}: {e}", attempts_dir.display())),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read {}: {e}", attempts_dir.display()))?;
        let name = entry.file_name();
        let n = name
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| format!("unexpected entry attempts/{}", name.to_string_lossy()))?;
        numbers.push(n);
    }
    if numbers.is_empty() {
        return Err("no attempt records".into());
    }
    numbers.sort_unstable();
    let mut attempts = Vec::new();
    let mut finished = SystemTime::UNIX_EPOCH;
    for n in numbers {
        let path = state.run_record_path(id, n);
        let modified = std::fs::symlink_metadata(&path)
            .and_then(|md| {
                if md.is_file() {
                    md.modified()
                } else {
                    Err(io::Error::other("not a regular file"))
                }
            })
            .map_err(|e| format!("attempt {n} has no readable run record ({e})"))?;
        // What `recover` holds its records to: a record a job's user could have planted
        // (a dir of the job's, reached by a symlinked jobs root) made root take its lock
        // there, through the planter's symlinks, and decide whose files it removes.
        let attempt_dir = state.attempt_dir(id, n);
        if !crate::statedir::agents_own(&[&dir, &attempts_dir, &attempt_dir, &path]) {
            return Err(format!(
                "attempt {n}: its record is not the agent's own (owner or mode)"
            ));
        }
        let record = state
            .read_record(&path)
            .map_err(|e| format!("attempt {n}: {}", crate::error_chain(&e)))?;
        if record.spec.job_id != id || record.spec.attempt != n {
            return Err(format!(
                "attempt {n}: the record is of job {} attempt {}",
                record.spec.job_id, record.spec.attempt
            ));
        }
        finished = finished.max(modified);
        attempts.push((n, Attempt::of(&record)));
    }
    let job_json = std::fs::symlink_metadata(dir.join("job.json"))
        .ok()
        .and_then(|md| spec_written(&md));
    Ok(Some(Job {
        id: id.to_string(),
        dir,
        attempts,
        finished,
        job_json,
    }))
}

/// Whether the job may go now; `Err`: why it stays.
fn due(state: &StateDir, policy: &Retention, now: SystemTime, job: &Job) -> Result<(), String> {
    // A later attempt finished in the same workdir: what is left there is its, and `recover`
    // leaves this one alone (but for aborting its uploads), so it holds the job no longer.
    let superseded: BTreeSet<u32> = job
        .attempts
        .iter()
        .filter(|(n, record)| {
            job.attempts.iter().any(|(m, later)| {
                m > n
                    && later.workdir == record.workdir
                    && later.phase == Phase::Done
                    && later.took_workdir
            })
        })
        .map(|(n, _)| *n)
        .collect();
    for (n, record) in &job.attempts {
        if superseded.contains(n) {
            continue;
        }
        if record.phase != Phase::Done {
            return Err(format!(
                "attempt {n} is not done (phase {})",
                record.phase.as_str()
            ));
        }
        // What the job made unstorable for good (a path too deep, a file too large) keeps
        // no job: no later look stores it, and the job would otherwise stay for ever.
        let left = record.unstored_to_retry;
        if left > 0 {
            return Err(format!(
                "attempt {n} left {left} item(s) unstored (`c3-agent resync`)"
            ));
        }
    }
    // What the flush delivers (`*.json`): a report it set aside (`*.bad`), a temp file a
    // killed keep left (`.c3-*.tmp`, which the flush removes once stale) or the flush's lock
    // file (`.lock`) waits for nothing.
    if has_entries(&state.outbox_dir(&job.id), is_report)? {
        return Err("reports wait in the outbox".into());
    }
    // A journal (`*.json`) names an upload at the store; a temp file a killed journal start
    // left names none. A superseded attempt's too holds the job until `recover` has aborted
    // its uploads (before the sweep, in the same run): removed with the job while the store
    // was down, nothing on the node would name the upload any more, its parts billed.
    if has_entries(&job.dir.join("uploads"), |name| !name.starts_with(".c3-"))? {
        return Err("multipart uploads are journaled (not finished or aborted)".into());
    }
    let latest = job.attempts.last().map(|(_, r)| r.state).unwrap_or(None);
    let mut period = policy.period_for(latest);
    // A spec alone: never within a day, whatever `failed_days` says (0 is allowed), as the run
    // that reads it may not have made its attempt yet.
    if job.attempts.is_empty() {
        period = period.max(SPEC_ALONE_MIN_AGE);
    }
    // A `job.json` written after the newest record: the scheduler is starting another
    // attempt of the job (a retry of an old one), whose agent has not taken its lock yet.
    // Removing the dir now would take the spec from under it; the job stays a period from
    // then, as if that attempt had ended.
    if let Some(written) = job.job_json.filter(|t| *t > job.finished) {
        let age = now.duration_since(written).unwrap_or_default();
        if age < period {
            return Err(format!(
                "job.json written {} ago, after its last attempt (a new attempt?); kept for {}",
                days(age),
                days(period)
            ));
        }
    }
    let age = now.duration_since(job.finished).unwrap_or_default();
    if age < period {
        return Err(format!(
            "{} {} ago; kept for {}",
            state_name(latest),
            days(age),
            days(period)
        ));
    }
    Ok(())
}

/// Whether `dir` has an entry `counts` accepts; a missing dir has none.
fn has_entries(dir: &Path, counts: impl Fn(&str) -> bool) -> Result<bool, String> {
    match std::fs::read_dir(dir) {
        // A listing that fails part way (EIO on a failing disk) is not an empty one: the
        // journals past the error would go with the job, their uploads never aborted.
        Ok(entries) => entries_count(entries, counts)
            .map_err(|e| format!("cannot read {}: {e}", dir.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot read {}: {e}", dir.display())),
    }
}

/// Whether a listing has an entry `counts` accepts; an error in it is the answer.
fn entries_count(
    entries: impl Iterator<Item = io::Result<std::fs::DirEntry>>,
    counts: impl Fn(&str) -> bool,
) -> io::Result<bool> {
    for entry in entries {
        if counts(&entry?.file_name().to_string_lossy()) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Why [`remove_job`] did not remove a job.
enum Left {
    /// It stays, for this reason.
    Kept(String),
    /// Its dir went meanwhile: an overlapping sweep removed it.
    Gone,
}

impl From<String> for Left {
    fn from(why: String) -> Left {
        Left::Kept(why)
    }
}

impl From<&str> for Left {
    fn from(why: &str) -> Left {
        Left::Kept(why.into())
    }
}

/// Takes the job's locks, checks it again under them, moves its dir to the trash and
/// removes it there.
fn remove_job(
    state: &StateDir,
    policy: &Retention,
    now: SystemTime,
    job: &Job,
    trash: &Path,
    report: &mut RetentionReport,
    stop: &AtomicBool,
) -> Result<(), Left> {
    let mut locks = Vec::new();
    for (n, _) in &job.attempts {
        // Never creating the attempt's dir: an overlapping sweep may have removed the job
        // since it was read, and taking a lock must not bring back an empty one.
        match AttemptLock::acquire_existing(state, &job.id, *n) {
            Ok(Some(lock)) => locks.push(lock),
            Ok(None) => return Err(Left::Gone),
            Err(e) => return Err(e.to_string().into()),
        }
    }
    // Under the locks: what an agent did meanwhile (a resync, a new attempt) is seen now.
    let again = read_job(state, &job.id)?.ok_or(Left::Gone)?;
    if numbers(&again) != numbers(job) {
        return Err("a new attempt started meanwhile".into());
    }
    due(state, policy, now, &again)?;
    if let Some(mount) = mount_inside(&job.dir)? {
        let at = job.dir.join(mount);
        return Err(format!("a file system is mounted at {}", at.display()).into());
    }

    let who = deputy(job_users(state, &again)?);
    // Decided while the dir is in place (resolving it needs it).
    let mut workdirs: Vec<PathBuf> = job
        .attempts
        .iter()
        .map(|(_, r)| PathBuf::from(&r.workdir))
        .filter(|w| !inside(&job.dir, w))
        .collect();
    workdirs.sort();
    workdirs.dedup();
    ensure_trash(trash).map_err(|e| format!("cannot create {}: {e}", trash.display()))?;
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let doomed = trash.join(format!("{}.{}.{nanos}", job.id, std::process::id()));
    std::fs::rename(&job.dir, &doomed)
        .map_err(|e| format!("cannot move {} aside: {e}", job.dir.display()))?;
    let put_back = |report: &mut RetentionReport, why: String| {
        put_back(&doomed, &job.id, &job.dir, trash, nanos, report);
        Left::Kept(why)
    };
    // A new attempt whose lock was taken between the check above and the rename moved with
    // the dir: put it back (its agent recreated nothing yet, or we would not be here).
    let moved: BTreeSet<u32> = std::fs::read_dir(doomed.join("attempts"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if moved != numbers(job) {
        return Err(put_back(report, "a new attempt started meanwhile".into()));
    }
    // The scheduler wrote job.json between the look under the locks and the move.
    let job_json = std::fs::symlink_metadata(doomed.join("job.json"))
        .ok()
        .and_then(|md| spec_written(&md));
    if job_json != again.job_json {
        return Err(put_back(
            report,
            "job.json was written while the job was being removed (a new attempt?)".into(),
        ));
    }
    // In the trash (root's, 0700) no other user reaches the tree by path any more: what was
    // mounted inside since the look above is seen here, and the tree goes back as it is.
    // (The walk below enters no mount it meets either.)
    match mount_inside(&doomed) {
        Ok(None) => {}
        Ok(Some(mount)) => {
            let at = job.dir.join(mount);
            return Err(put_back(
                report,
                format!("a file system is mounted at {}", at.display()),
            ));
        }
        Err(Left::Kept(why)) => return Err(put_back(report, why)),
        Err(Left::Gone) => return Err(Left::Gone),
    }

    let (bytes, removed) = remove_doomed(&doomed, &who, stop);
    report.bytes_freed += bytes;
    if let Err(left) = removed {
        // What the job's user could not have removed, a mount, a failure: the job stays
        // with its records (they go last), and with what its user could not remove.
        let why = left.describe(&job.dir);
        tracing::warn!(job_id = %job.id, why = %why, "a finished job's local data is kept");
        return Err(put_back(report, why));
    }
    for workdir in workdirs {
        tracing::info!(job_id = %job.id, workdir = %workdir.display(), "workdir outside the job's state dir left in place");
        report.left_workdirs.push((job.id.clone(), workdir));
    }
    // Its outbox (beside the jobs dir) holds no report (`due`), but what the flush set
    // aside (`*.bad`), its lock file, a killed keep's temp file: kept, they outlived the job
    // for ever.
    drop_outbox(state, &job.id, report);
    tracing::info!(job_id = %job.id, bytes, "removed a finished job's local data");
    report.removed_jobs.push(job.id.clone());
    drop(locks);
    Ok(())
}

/// Whether an outbox entry is a report the flush delivers ([`crate::report::is_kept_report`]).
fn is_report(name: &str) -> bool {
    crate::report::is_kept_report(Path::new(name))
}

/// Removes the job's outbox dir and what it holds but reports ([`crate::report::drop_outbox_leftovers`]).
fn drop_outbox(state: &StateDir, id: &str, report: &mut RetentionReport) {
    let dir = state.outbox_dir(id);
    if crate::report::drop_outbox_leftovers(&dir) {
        tracing::debug!(job_id = %id, "removed the job's outbox");
    } else if dir.exists() {
        // A flusher holds it, or a report was kept meanwhile: the next sweep looks again.
        report.errors.push(format!(
            "{}: left for the next sweep (in use)",
            dir.display()
        ));
    }
}

/// Outboxes of jobs whose dir is gone (removed by hand, or by an agent that left the outbox
/// behind) holding no report, untouched for longer than `policy.failed`: nothing reads
/// them any more. One that holds a report stays for the flush, whoever's it was.
fn sweep_orphan_outboxes(
    state: &StateDir,
    policy: &Retention,
    now: SystemTime,
    report: &mut RetentionReport,
) {
    let Ok(entries) = std::fs::read_dir(state.outbox_root()) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if c3_proto::spec::validate_job_id(&id).is_err()
            || !entry.file_type().is_ok_and(|t| t.is_dir())
            || std::fs::symlink_metadata(state.job_dir(&id)).is_ok()
        {
            continue;
        }
        let dir = entry.path();
        let Ok(inside) = std::fs::read_dir(&dir) else {
            continue;
        };
        // Idle by what it holds, not by the folder's own time: every flush makes and
        // removes its lock file there. One holding nothing else goes at once.
        let mut newest = None;
        let mut reports = false;
        for e in inside.flatten() {
            let name = e.file_name();
            if name == crate::report::OUTBOX_LOCK {
                continue;
            }
            reports |= is_report(&name.to_string_lossy());
            let t = e.metadata().and_then(|m| m.modified()).ok();
            newest = newest.max(t);
        }
        let idle = newest.map_or(Duration::MAX, |t| now.duration_since(t).unwrap_or_default());
        if reports || idle < policy.failed.max(DAY) {
            continue;
        }
        drop_outbox(state, &id, report);
    }
}

/// Moves a job's dir back out of the trash. A new attempt's agent that made the dir again
/// meanwhile keeps it: the old one goes beside it (no sweep removes that: not a job id), for
/// the operator to merge.
fn put_back(
    doomed: &Path,
    id: &str,
    dir: &Path,
    trash: &Path,
    nanos: u128,
    report: &mut RetentionReport,
) {
    if std::fs::rename(doomed, dir).is_ok() {
        return;
    }
    let aside = trash.with_file_name(format!("{id}.moved-aside.{nanos}"));
    let at = match std::fs::rename(doomed, &aside) {
        Ok(()) => aside,
        Err(_) => doomed.to_path_buf(),
    };
    let why = format!(
        "job {id}: a new attempt started while its dir was being moved; the old dir is at {}",
        at.display()
    );
    tracing::error!("{why}");
    report.errors.push(why);
}

/// The users every attempt of `job` ran as, from its records, read again (under the job's
/// locks) one at a time. `Err`: one could not be read, and whose removals these are is not
/// known.
fn job_users(state: &StateDir, job: &Job) -> Result<Vec<JobReader>, String> {
    let mut users = Vec::new();
    for (n, _) in &job.attempts {
        let record = state
            .read_record(&state.run_record_path(&job.id, *n))
            .map_err(|e| format!("attempt {n}: {}", crate::error_chain(&e)))?;
        users.extend(user_of(&record));
    }
    Ok(users)
}

/// Whom an attempt ran as (the user recorded at launch, else looked up by name); `None`: the
/// agent's own user.
fn user_of(record: &RunRecord) -> Option<JobReader> {
    let looked_up = match (&record.job_user, &record.spec.user) {
        (None, Some(name)) => look_up(name),
        _ => None,
    };
    JobReader::for_record(record, looked_up)
}

/// Whose removals retention stands in for in a job's tree: every attempt's user. A job that
/// always ran as the agent's own user could remove whatever the agent may.
fn deputy(users: Vec<JobReader>) -> rmtree::Who {
    if users.is_empty() {
        rmtree::Who::Anyone
    } else {
        rmtree::Who::Users(users)
    }
}

/// [`deputy`] for a job's dir whose records are gone (a sweep of an older agent, cut short
/// part way): the owners of its top-level directories. Those are the agent's making (the job
/// dir is root's, 0711, and nobody else may add to it), given to the job's user, or root's.
fn deputy_by_owners(dir: &Path) -> rmtree::Who {
    let euid = nix::unistd::geteuid().as_raw();
    let mut uids: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| crate::confine::cached_stat(&e.path(), false))
        .filter(|st| st.is_dir() && st.uid != euid)
        .map(|st| st.uid)
        .collect();
    uids.sort_unstable();
    uids.dedup();
    let users = uids
        .into_iter()
        .map(|uid| {
            let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid));
            user.ok()
                .flatten()
                .and_then(|u| look_up(&u.name))
                .filter(|reader| reader.uid == uid)
                .unwrap_or(JobReader {
                    uid,
                    gids: Vec::new(),
                })
        })
        .collect();
    rmtree::Who::Users(users)
}

/// A user and its groups by name (a record from before the user's ids were kept).
fn look_up(name: &str) -> Option<JobReader> {
    let user = nix::unistd::User::from_name(name).ok()??;
    let cname = std::ffi::CString::new(name).ok()?;
    let gids = nix::unistd::getgrouplist(&cname, user.gid)
        .ok()?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Some(JobReader {
        uid: user.uid.as_raw(),
        gids,
    })
}

/// What stays of a tree [`remove_doomed`] could not remove whole.
struct Leftover {
    /// The first entry that stays, from the tree's top, and why.
    first: Option<(PathBuf, String)>,
    more: u64,
}

impl Leftover {
    /// In words, the tree's top being at `top`.
    fn describe(&self, top: &Path) -> String {
        let more = if self.more > 0 {
            format!(" (and {} more)", self.more)
        } else {
            String::new()
        };
        match &self.first {
            Some((rel, why)) => format!("{} stays: {why}{more}", top.join(rel).display()),
            None => format!("{} stays{more}", top.display()),
        }
    }
}

/// Removes a job's dir from the trash: its workdir and the rest first, its records and spec
/// (`attempts`, `job.json`) only once all that is gone, then the dir. A job that keeps
/// something (put back) is still a job, and a sweep cut short leaves the records of what it
/// did not finish, and with them whose removals those are. Returns the bytes removed.
fn remove_doomed(
    doomed: &Path,
    who: &rmtree::Who,
    stop: &AtomicBool,
) -> (u64, Result<(), Leftover>) {
    use std::ffi::OsStr;
    let top = match crate::confine::DirFd::open(doomed) {
        Ok(top) => top,
        Err(e) => {
            let first = Some((PathBuf::new(), format!("cannot open it: {e}")));
            return (0, Err(Leftover { first, more: 0 }));
        }
    };
    let mut bytes = 0;
    // The records go last and whole: a stop that cut through them left a job of no readable
    // record, kept by every later sweep.
    let whole = AtomicBool::new(false);
    for (except, stop) in [
        (&[OsStr::new("attempts"), OsStr::new("job.json")][..], stop),
        (&[], &whole),
    ] {
        let removal = rmtree::remove_entries_until(&top, except, who, stop);
        bytes += removal.bytes;
        if removal.left > 0 {
            let first = removal.first_left.map(|(rel, why)| (rel, why.to_string()));
            let more = removal.left - 1;
            return (bytes, Err(Leftover { first, more }));
        }
    }
    drop(top);
    match std::fs::remove_dir(doomed) {
        Ok(()) => (bytes, Ok(())),
        Err(e) => {
            let first = Some((PathBuf::new(), e.to_string()));
            (bytes, Err(Leftover { first, more: 0 }))
        }
    }
}

fn numbers(job: &Job) -> BTreeSet<u32> {
    job.attempts.iter().map(|(n, _)| *n).collect()
}

/// The trash is root's alone: what is in it is removed with the rights its records name.
fn ensure_trash(trash: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o700).create(trash) {
        Ok(()) => std::fs::set_permissions(trash, std::fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let md = std::fs::symlink_metadata(trash)?;
            if md.is_dir() && crate::statedir::agents_own(&[trash]) {
                Ok(())
            } else {
                Err(io::Error::other(
                    "exists and is not a directory of the agent's that only it may write",
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes what an earlier sweep moved to the trash and did not finish removing, as that
/// sweep would have (whose removals: from the records still in it, else the owners of its
/// top-level directories). An entry with a file system mounted in it stays, with a warning,
/// until it is unmounted.
fn empty_trash(state: &StateDir, trash: &Path, report: &mut RetentionReport, stop: &AtomicBool) {
    let Ok(entries) = std::fs::read_dir(trash) else {
        return;
    };
    // Read once: only root may mount below the trash (0700), and the walk never enters a
    // mount it meets anyway.
    let real_trash = std::fs::canonicalize(trash).unwrap_or_else(|_| trash.to_path_buf());
    let mounts: Vec<PathBuf> = match crate::mountinfo::mount_points() {
        Ok(all) => all
            .into_iter()
            .filter(|m| m.starts_with(&real_trash))
            .collect(),
        Err(e) => {
            let why = format!("cannot read the mount table ({e}): the trash is left as it is");
            tracing::warn!("{why}");
            report.errors.push(why);
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        // `<id>.<pid>.<nanos>` while its job's dir is there again: a put-back that failed
        // (a new attempt made the dir meanwhile, and the move aside failed too), whose error
        // named this place for the operator to merge. Removed, the old attempts were lost.
        let id = entry
            .file_name()
            .to_string_lossy()
            .split('.')
            .next()
            .map(str::to_owned);
        if let Some(id) = id.filter(|id| c3_proto::spec::validate_job_id(id).is_ok()) {
            if std::fs::symlink_metadata(state.job_dir(&id)).is_ok() {
                let why = format!(
                    "{}: job {id}'s earlier dir, which could not be put back beside its new one; left for the operator to merge",
                    path.display()
                );
                tracing::warn!("{why}");
                report.errors.push(why);
                continue;
            }
        }
        let real = real_trash.join(entry.file_name());
        if let Some(mount) = mounts.iter().find(|m| m.starts_with(&real)) {
            let why = format!(
                "{}: a file system is mounted at {}; left in the trash until it is unmounted",
                path.display(),
                mount.display()
            );
            tracing::warn!("{why}");
            report.errors.push(why);
            continue;
        }
        let (mut records, mut unread, mut users) = (0, 0, Vec::new());
        for attempt in std::fs::read_dir(path.join("attempts"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let record = attempt.path().join("run.json");
            // A record another user could have written names no rights: its owners' stand in.
            let own = crate::statedir::agents_own(&[&path.join("attempts"), &attempt.path()]);
            match state.read_record(&record).ok().filter(|_| own) {
                Some(record) => {
                    records += 1;
                    users.extend(user_of(&record));
                }
                None => unread += 1,
            }
        }
        let who = if records == 0 {
            deputy_by_owners(&path)
        } else if unread > 0 {
            // The attempts read all ran as the agent's user, and one not read ran as a
            // job's user: taken for "anyone", root emptied what that user had moved in of
            // other users'. The owners of its directories stand in for the records unread.
            if let rmtree::Who::Users(more) = deputy_by_owners(&path) {
                users.extend(more);
            }
            deputy(users)
        } else {
            deputy(users)
        };
        let (bytes, removed) = remove_doomed(&path, &who, stop);
        report.bytes_freed += bytes;
        if let Err(left) = removed {
            let why = format!("cannot remove {}: {}", path.display(), left.describe(&path));
            tracing::warn!("{why}");
            report.errors.push(why);
        }
    }
    let _ = std::fs::remove_dir(trash);
}

/// A mount point at or below `dir`, from `/proc/self/mountinfo` (bind mounts of the same
/// file system have no other device number: only the mount table tells), by its path from
/// `dir`.
/// `Err`: the table or `dir` could not be read, and nothing tells that no mount is there
/// (or `dir` is gone: an overlapping sweep removed it).
fn mount_inside(dir: &Path) -> Result<Option<PathBuf>, Left> {
    let real = std::fs::canonicalize(dir).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Left::Gone,
        _ => Left::from(format!("cannot resolve {}: {e}", dir.display())),
    })?;
    let mounts = crate::mountinfo::mount_points().map_err(|e| {
        Left::from(format!(
            "cannot read the mount table ({e}), so mounts inside are not known"
        ))
    })?;
    Ok(mounts
        .into_iter()
        .find_map(|p| p.strip_prefix(&real).ok().map(Path::to_path_buf)))
}

/// Whether the recorded workdir `path` is the job dir `dir` or below it: as recorded, or
/// below `dir` resolved (a state dir reached through a symlink, a quick run's workdir
/// recorded by its real path). `path` itself is never resolved: a job may have swapped a
/// directory on it for a symlink (to another job's dir, which would then be kept for as long
/// as its records exist, or to an automount, where resolving waits without bound). The job
/// dir is root's, and `prepare` followed no symlink below a root: as recorded is as made.
fn inside(dir: &Path, path: &Path) -> bool {
    path.starts_with(dir) || std::fs::canonicalize(dir).is_ok_and(|d| path.starts_with(d))
}

fn days(d: Duration) -> String {
    let days = d.as_secs_f64() / DAY.as_secs_f64();
    if days >= 1.0 {
        format!("{days:.1} d")
    } else {
        format!("{:.1} h", d.as_secs_f64() / 3600.0)
    }
}

fn state_name(state: Option<JobState>) -> &'static str {
    match state {
        Some(JobState::Succeeded) => "succeeded",
        Some(JobState::Failed) => "failed",
        Some(JobState::Canceled) => "canceled",
        Some(JobState::TimedOut) => "timed out",
        Some(JobState::Running | JobState::Finalizing) | None => "ended",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rmtree::tests::Tmpfs;
    use c3_proto::JobSpec;

    struct Fixture {
        dir: tempfile::TempDir,
        state: StateDir,
    }

    impl Fixture {
        /// Job `mover`, succeeded 10 days ago, that ran as `nobody` (uid 65534).
        fn mover_as_nobody(&self) {
            let mut record = self.job("mover", 1, JobState::Succeeded, 10 * DAY, None);
            record.job_user = Some(c3_proto::record::JobUser {
                uid: 65534,
                gids: vec![65534],
            });
            self.save(&record, 10 * DAY);
        }

        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let state = StateDir::new(dir.path().join("state"));
            state.ensure_root().unwrap();
            Fixture { dir, state }
        }

        fn base(&self) -> &Path {
            self.dir.path()
        }

        /// A done attempt whose record was last written `age` ago, with a default workdir
        /// holding a 100-byte file (unless `workdir` names another).
        fn job(
            &self,
            id: &str,
            attempt: u32,
            state: JobState,
            age: Duration,
            workdir: Option<&Path>,
        ) -> RunRecord {
            let json = format!(r#"{{"job_id":"{id}","command":["true"],"attempt":{attempt}}}"#);
            let spec = JobSpec::from_json(json.as_bytes()).unwrap().spec;
            let workdir = workdir
                .map(Path::to_path_buf)
                .unwrap_or_else(|| self.state.default_workdir(id));
            std::fs::create_dir_all(&workdir).unwrap();
            std::fs::write(workdir.join("out.bin"), [7u8; 100]).unwrap();
            let record = RunRecord {
                spec,
                workdir: workdir.display().to_string(),
                workdir_pin: None,
                phase: Phase::Done,
                pgid: None,
                seq: 3,
                state: Some(state),
                reason: None,
                retryable: None,
                exit_code: Some(0),
                signal: None,
                started_at: "2026-01-01T00:00:00Z".into(),
                start_order: None,
                run_id: None,
                agent: None,
                agent_boot_id: None,
                agent_pid_ns: None,
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
                destination: None,
            };
            self.save(&record, age);
            record
        }

        fn save(&self, record: &RunRecord, age: Duration) {
            let (id, attempt) = (&record.spec.job_id, record.spec.attempt);
            self.state.ensure_attempt_dir(id, attempt).unwrap();
            self.state.write_record(record).unwrap();
            std::fs::File::options()
                .write(true)
                .open(self.state.run_record_path(id, attempt))
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        }

        fn sweep(&self) -> RetentionReport {
            sweep(&self.state, &Retention::default(), SystemTime::now())
        }

        /// [`remove_job`] of `job` now, stopped from the start or not.
        fn remove(&self, job: &Job, stopped: bool) -> (Result<(), Left>, RetentionReport) {
            let mut report = RetentionReport::default();
            let trash = self.state.jobs_dir().join(TRASH);
            let stop = AtomicBool::new(stopped);
            let left = remove_job(
                &self.state,
                &Retention::default(),
                SystemTime::now(),
                job,
                &trash,
                &mut report,
                &stop,
            );
            (left, report)
        }
    }

    fn reason<'a>(report: &'a RetentionReport, id: &str) -> &'a str {
        report
            .kept
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, why)| why.as_str())
            .unwrap_or_else(|| panic!("{id} not kept: {report:?}"))
    }

    /// A record a job's user could have written (its dir theirs, reached by a symlinked
    /// jobs root) is not acted on: the job stays, and root makes no lock in it.
    #[test]
    fn a_record_not_the_agents_own_keeps_its_job_and_takes_no_lock() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let f = Fixture::new();
        f.job("plant", 1, JobState::Succeeded, 100 * DAY, None);
        let attempts = f.state.job_dir("plant").join("attempts");
        std::os::unix::fs::chown(&attempts, Some(65534), Some(65534)).unwrap();
        let lock = f.state.attempt_dir("plant", 1).join("lock");
        let _ = std::fs::remove_file(&lock);
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(
            reason(&report, "plant").contains("not the agent's own"),
            "{report:?}"
        );
        assert!(
            !lock.exists(),
            "root made a lock in a dir the job's user owns"
        );
    }

    /// A listing that fails part way is an error, not "no entries".
    #[test]
    fn a_listing_that_fails_is_not_an_empty_one() {
        let eio = || std::io::Error::from_raw_os_error(libc::EIO);
        let failing = std::iter::once(Err(eio()));
        assert!(entries_count(failing, |_| true).is_err());
        assert!(!entries_count(std::iter::empty(), |_| true).unwrap());
    }

    /// A job dir with the scheduler's `job.json` alone (a run refused before it made any
    /// attempt) was kept for ever ("no attempt records"); it goes as a failed job does. One
    /// with anything else beside it stays: it may be another job's workdir, or an operator's.
    #[test]
    fn a_spec_no_run_ever_took_goes_as_a_failed_job() {
        let f = Fixture::new();
        let spec_only = |id: &str, age: Duration, more: bool| {
            let dir = f.state.job_dir(id);
            std::fs::create_dir_all(&dir).unwrap();
            let spec = dir.join("job.json");
            std::fs::write(&spec, "{}").unwrap();
            if more {
                std::fs::write(dir.join("data.bin"), "d").unwrap();
            }
            std::fs::File::options()
                .write(true)
                .open(&spec)
                .unwrap()
                .set_modified(SystemTime::now() - age)
                .unwrap();
        };
        spec_only("refused", 40 * DAY, false);
        spec_only("with-data", 40 * DAY, true);
        // Aged by the later of its mtime and ctime: a copy that kept an old mtime (`cp -p`)
        // was written now.
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(
            reason(&report, "refused").contains("kept for 30.0 d"),
            "{report:?}"
        );
        let later = SystemTime::now() + 31 * DAY;
        let report = sweep(&f.state, &Retention::default(), later);
        assert_eq!(report.removed_jobs, ["refused"], "{report:?}");
        assert!(!f.state.job_dir("refused").exists());
        assert_eq!(reason(&report, "with-data"), "no attempt records");
        // Never within a day, even with `failed_days = 0`.
        spec_only("new", 40 * DAY, false);
        let report = sweep(&f.state, &Retention::from_days(0, 0), SystemTime::now());
        assert!(
            reason(&report, "new").contains("kept for 1.0 d"),
            "{report:?}"
        );
        assert!(f.state.job_dir("with-data").join("data.bin").exists());
        // A user's own dir (or one others may write in) is not emptied as anyone's.
        use std::os::unix::fs::PermissionsExt;
        let mut ids = vec!["open"];
        spec_only("open", 40 * DAY, false);
        let open = f.state.job_dir("open");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        if nix::unistd::geteuid().is_root() {
            spec_only("users", 40 * DAY, false);
            let dir = f.state.job_dir("users");
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
            ids.push("users");
        }
        let report = sweep(&f.state, &Retention::default(), later);
        for id in ids {
            assert!(
                reason(&report, id).contains("not the agent's own"),
                "{id}: {report:?}"
            );
            assert!(f.state.job_dir(id).join("job.json").exists(), "{id}");
        }
    }

    /// An unfinished attempt is held no longer by a later one done in its workdir, but only
    /// one that took the workdir (opened it, launched): a later attempt that ended while
    /// waiting for the earlier one to be finished changed nothing there, and the earlier
    /// attempt's unstored output went with the job.
    #[test]
    fn only_a_later_attempt_that_took_the_workdir_supersedes_an_earlier_one() {
        let f = Fixture::new();
        f.job("sup", 1, JobState::Failed, 40 * DAY, None);
        f.job("sup", 2, JobState::Failed, 40 * DAY, None);
        let path = |n| f.state.run_record_path("sup", n);
        let mut first = f.state.read_record(&path(1)).unwrap();
        first.phase = Phase::Running;
        f.save(&first, 40 * DAY);
        let report = f.sweep();
        assert!(
            reason(&report, "sup").contains("attempt 1 is not done"),
            "{report:?}"
        );
        let mut second = f.state.read_record(&path(2)).unwrap();
        second.launching = true;
        f.save(&second, 40 * DAY);
        assert_eq!(f.sweep().removed_jobs, ["sup"]);
    }

    #[test]
    fn an_old_succeeded_job_goes_a_recent_one_stays() {
        let f = Fixture::new();
        f.job("old", 1, JobState::Failed, 40 * DAY, None);
        f.job("old", 2, JobState::Succeeded, 8 * DAY, None);
        f.job("new", 1, JobState::Succeeded, 6 * DAY, None);
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["old"], "{report:?}");
        assert!(!f.state.job_dir("old").exists());
        assert!(report.bytes_freed >= 100, "{report:?}");
        assert!(
            reason(&report, "new").contains("kept for 7.0 d"),
            "{report:?}"
        );
        assert!(f.state.default_workdir("new").join("out.bin").is_file());
        assert!(report.errors.is_empty() && report.left_workdirs.is_empty());
        // Nothing is left behind in the jobs dir (the trash is gone once empty).
        let left: Vec<_> = std::fs::read_dir(f.state.jobs_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["new"]);
    }

    #[test]
    fn failed_jobs_are_kept_for_the_longer_period() {
        let f = Fixture::new();
        f.job("failed", 1, JobState::Failed, 8 * DAY, None);
        f.job("canceled", 1, JobState::Canceled, 8 * DAY, None);
        f.job("timedout", 1, JobState::TimedOut, 31 * DAY, None);
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["timedout"], "{report:?}");
        assert!(reason(&report, "failed").contains("kept for 30.0 d"));
        assert!(reason(&report, "canceled").starts_with("canceled 8.0 d ago"));
        let later = sweep(
            &f.state,
            &Retention::default(),
            SystemTime::now() + 23 * DAY,
        );
        assert_eq!(later.removed_jobs, ["canceled", "failed"], "{later:?}");
    }

    /// What the job made unstorable itself keeps no job: no later look stores it. What a
    /// later look may store (beside it, or in a record from before the distinction) does.
    #[test]
    fn output_unstorable_for_good_keeps_no_job() {
        let f = Fixture::new();
        let mut deep = f.job("deep", 1, JobState::Failed, 31 * DAY, None);
        deep.unstored = vec!["artifacts/d/d/d/ (paths too deep or long)".into()];
        deep.unstored_more = 2;
        deep.unstored_for_good = 3;
        f.save(&deep, 31 * DAY);
        let mut mixed = f.job("mixed", 1, JobState::Failed, 31 * DAY, None);
        mixed.unstored = vec!["artifacts/big.bin".into(), "logs/stdout".into()];
        mixed.unstored_for_good = 1;
        f.save(&mixed, 31 * DAY);
        let mut young = f.job("young", 1, JobState::Failed, 29 * DAY, None);
        young.unstored = vec!["artifacts/sparse.bin".into()];
        young.unstored_for_good = 1;
        f.save(&young, 29 * DAY);
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["deep"], "{report:?}");
        assert!(
            reason(&report, "mixed").contains("1 item(s) unstored"),
            "{report:?}"
        );
        assert!(
            reason(&report, "young").contains("kept for 30.0 d"),
            "{report:?}"
        );
    }

    #[test]
    fn unstored_outbox_and_unfinished_jobs_stay() {
        let f = Fixture::new();
        let mut unstored = f.job("unstored", 1, JobState::Succeeded, 100 * DAY, None);
        unstored.unstored = vec!["artifacts/model.pt".into()];
        f.save(&unstored, 100 * DAY);
        f.job("outbox", 1, JobState::Succeeded, 100 * DAY, None);
        let outbox = f.state.outbox_dir("outbox");
        std::fs::create_dir_all(&outbox).unwrap();
        std::fs::write(outbox.join("000001-00000003-status.json"), "{}").unwrap();
        f.job("badonly", 1, JobState::Succeeded, 100 * DAY, None);
        std::fs::create_dir_all(f.state.outbox_dir("badonly")).unwrap();
        std::fs::write(f.state.outbox_dir("badonly").join("x.bad"), "?").unwrap();
        // A keep a kill interrupted: no report the flush would ever send.
        f.job("tmponly", 1, JobState::Succeeded, 100 * DAY, None);
        std::fs::create_dir_all(f.state.outbox_dir("tmponly")).unwrap();
        let tmp = f.state.outbox_dir("tmponly").join(".c3-x.tmp");
        std::fs::write(&tmp, "{").unwrap();
        let a_day_ago = SystemTime::now() - DAY;
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(a_day_ago)
            .unwrap();
        // A flush cut short leaves its lock file: not a report.
        let lock = f
            .state
            .outbox_dir("tmponly")
            .join(crate::report::OUTBOX_LOCK);
        std::fs::write(lock, "").unwrap();
        let mut running = f.job("running", 2, JobState::Succeeded, 100 * DAY, None);
        f.job("running", 1, JobState::Failed, 100 * DAY, None);
        running.phase = Phase::Finishing;
        f.save(&running, 100 * DAY);
        f.job("uploads", 1, JobState::Succeeded, 100 * DAY, None);
        let journal = f.state.job_dir("uploads").join("uploads");
        std::fs::create_dir_all(&journal).unwrap();
        std::fs::write(journal.join(format!("{}.json", "a".repeat(64))), "{}").unwrap();
        std::fs::create_dir_all(f.state.job_dir("fresh").join("attempts/1")).unwrap();

        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["badonly", "tmponly"], "{report:?}");
        // Their outboxes went with them; a report keeps its own.
        assert!(!f.state.outbox_dir("badonly").exists());
        assert!(!f.state.outbox_dir("tmponly").exists());
        assert!(outbox.join("000001-00000003-status.json").is_file());
        assert!(reason(&report, "unstored").contains("1 item(s) unstored"));
        assert!(reason(&report, "outbox").contains("outbox"));
        assert!(reason(&report, "running").contains("attempt 2 is not done (phase finishing)"));
        assert!(reason(&report, "uploads").contains("multipart uploads"));
        assert!(reason(&report, "fresh").contains("attempt 1 has no readable run record"));
        for id in ["unstored", "outbox", "running", "uploads"] {
            assert!(
                f.state.default_workdir(id).join("out.bin").is_file(),
                "{id}"
            );
        }
    }

    /// An outbox whose job dir is gone (removed by hand, or by an agent that left outboxes
    /// behind) goes once nothing in it changed for the failed period, unless it holds a
    /// report, which the flush still delivers.
    #[test]
    fn orphan_outboxes_go_once_idle_unless_a_report_waits() {
        let f = Fixture::new();
        let old = SystemTime::now() - 100 * DAY;
        let put = |id: &str, name: &str, at: SystemTime| {
            let dir = f.state.outbox_dir(id);
            std::fs::create_dir_all(&dir).unwrap();
            let file = std::fs::File::create(dir.join(name)).unwrap();
            file.set_modified(at).unwrap();
        };
        put("ghost", "000001-00000003-status.bad", old);
        put("ghost", "000001-00000004-status.tries", old);
        put("ghost", "000001-00000005-status.refused", old);
        // A flush made and removed its lock there a moment ago: no sign of life.
        put("ghost", OUTBOX_LOCK_NAME, SystemTime::now());
        put("waiting", "000001-00000003-status.json", old);
        put("waiting", "000001-00000003-status.tries", old);
        put("young", "000001-00000003-status.bad", SystemTime::now());
        // A job that is still there keeps its outbox whatever its age.
        f.job("kept", 1, JobState::Succeeded, DAY, None);
        put("kept", "000001-00000003-status.bad", old);
        let report = f.sweep();
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(!f.state.outbox_dir("ghost").exists());
        assert!(f
            .state
            .outbox_dir("waiting")
            .join("000001-00000003-status.json")
            .is_file());
        assert!(f
            .state
            .outbox_dir("waiting")
            .join("000001-00000003-status.tries")
            .is_file());
        let bad = "000001-00000003-status.bad";
        assert!(f.state.outbox_dir("young").join(bad).is_file());
        assert!(f.state.outbox_dir("kept").join(bad).is_file());
    }

    const OUTBOX_LOCK_NAME: &str = crate::report::OUTBOX_LOCK;

    /// A sweep stopped (`recover --budget-secs`, a SIGTERM) ends at its next safe point: no
    /// job after the stop is looked at, and a removal under way (here a tree of 3,000
    /// entries, met after the stop) gives up and puts its job back, kept for the next sweep.
    #[test]
    fn a_stopped_sweep_ends_at_its_next_safe_point() {
        let f = Fixture::new();
        f.job("big", 1, JobState::Succeeded, 100 * DAY, None);
        let work = f.state.default_workdir("big");
        for i in 0..3000 {
            std::fs::write(work.join(format!("f{i}")), "x").unwrap();
        }
        let stopped = AtomicBool::new(true);
        let report = sweep_until(&f.state, &Retention::default(), SystemTime::now(), &stopped);
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(f.state.job_dir("big").exists());
        let job = read_job(&f.state, "big").unwrap().unwrap();
        let (left, report) = f.remove(&job, true);
        assert!(matches!(left, Err(Left::Kept(_))), "{report:?}");
        assert!(f.state.run_record_path("big", 1).is_file(), "not put back");
        assert_eq!(f.sweep().removed_jobs, ["big"]);
    }

    /// One sweep at a time: a second one (`gc` beside housekeeping's `recover`) starting
    /// while another runs emptied the trash, the first one's entry in flight with it.
    #[test]
    fn a_sweep_while_another_runs_does_nothing() {
        let f = Fixture::new();
        f.job("old", 1, JobState::Succeeded, 100 * DAY, None);
        let held = crate::statedir::try_retention_lock(&f.state)
            .unwrap()
            .unwrap();
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(f.state.job_dir("old").exists());
        drop(held);
        assert_eq!(f.sweep().removed_jobs, ["old"]);
    }

    #[test]
    fn unreadable_records_stay_and_leftover_trash_goes() {
        let f = Fixture::new();
        f.job("corrupt", 1, JobState::Succeeded, 100 * DAY, None);
        std::fs::write(f.state.run_record_path("corrupt", 1), "{not json").unwrap();
        let leftover = f.state.jobs_dir().join(TRASH).join("gone.1.2");
        std::fs::create_dir_all(leftover.join("work")).unwrap();
        std::fs::write(leftover.join("work/f"), [0u8; 10]).unwrap();
        let report = f.sweep();
        assert!(
            reason(&report, "corrupt").contains("not a valid record"),
            "{report:?}"
        );
        assert!(f.state.job_dir("corrupt").exists());
        assert!(!f.state.jobs_dir().join(TRASH).exists());
        assert_eq!(report.bytes_freed, 10);
    }

    /// A put-back that failed (a new attempt made the job's dir again meanwhile, and the
    /// move aside failed too) leaves the old dir in the trash, named to the operator: the
    /// next sweep removed it, and the old attempts' records and files with it.
    #[test]
    fn a_dir_that_could_not_be_put_back_stays_in_the_trash() {
        let f = Fixture::new();
        f.job("back", 2, JobState::Succeeded, DAY, None);
        let stuck = f.state.jobs_dir().join(TRASH).join("back.1.2");
        std::fs::create_dir_all(stuck.join("attempts/1")).unwrap();
        std::fs::write(stuck.join("attempts/1/run.json"), "{}").unwrap();
        let report = f.sweep();
        assert!(stuck.join("attempts/1/run.json").is_file(), "{report:?}");
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.contains("could not be put back")),
            "{report:?}"
        );
    }

    #[test]
    fn a_held_lock_keeps_the_job() {
        let f = Fixture::new();
        f.job("busy", 1, JobState::Succeeded, 10 * DAY, None);
        let lock = AttemptLock::acquire(&f.state, "busy", 1).unwrap();
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty());
        assert!(
            reason(&report, "busy").contains("already being run"),
            "{report:?}"
        );
        drop(lock);
        assert_eq!(f.sweep().removed_jobs, ["busy"]);
    }

    /// A job may plant symlinks in its workdir: removing it never touches their targets.
    #[test]
    fn symlinks_inside_a_workdir_are_not_followed() {
        let f = Fixture::new();
        let precious = f.base().join("precious");
        std::fs::create_dir_all(precious.join("sub")).unwrap();
        std::fs::write(precious.join("sub/keep.txt"), "keep").unwrap();
        let secret = f.base().join("secret");
        std::fs::write(&secret, "secret").unwrap();

        f.job("evil", 1, JobState::Succeeded, 10 * DAY, None);
        let work = f.state.default_workdir("evil");
        std::os::unix::fs::symlink(&precious, work.join("dir-link")).unwrap();
        std::os::unix::fs::symlink(&secret, work.join("file-link")).unwrap();
        std::fs::create_dir_all(work.join("deep/er")).unwrap();
        std::os::unix::fs::symlink(&precious, work.join("deep/er/up")).unwrap();
        // A directory its owner may not write to (the job ran as the agent's user).
        std::fs::create_dir_all(work.join("locked/in")).unwrap();
        std::fs::write(work.join("locked/in/f"), "x").unwrap();
        std::fs::set_permissions(work.join("locked"), std::fs::Permissions::from_mode(0o500))
            .unwrap();

        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["evil"], "{report:?}");
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(!f.state.job_dir("evil").exists());
        assert_eq!(
            std::fs::read_to_string(precious.join("sub/keep.txt")).unwrap(),
            "keep"
        );
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret");
    }

    #[test]
    fn a_state_dir_that_is_a_symlink_is_not_followed() {
        let f = Fixture::new();
        let elsewhere = f.base().join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("attempts")).unwrap();
        std::fs::write(elsewhere.join("data"), "d").unwrap();
        std::fs::create_dir_all(f.state.jobs_dir()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, f.state.job_dir("linked")).unwrap();
        let report = f.sweep();
        assert!(
            report.removed_jobs.is_empty() && report.kept.is_empty(),
            "{report:?}"
        );
        assert!(elsewhere.join("data").is_file());
    }

    #[test]
    fn a_workdir_outside_the_job_dir_is_left_to_its_owner() {
        let f = Fixture::new();
        // Under the jobs root (the state's jobs dir) but not the job's own dir, and elsewhere.
        let shared = f.state.jobs_dir().join("shared-data");
        let scratch = f.base().join("scratch/ext");
        f.job("ext", 1, JobState::Succeeded, 10 * DAY, Some(&scratch));
        f.job("ext", 2, JobState::Succeeded, 10 * DAY, Some(&shared));
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["ext"], "{report:?}");
        assert!(!f.state.job_dir("ext").exists());
        assert!(scratch.join("out.bin").is_file() && shared.join("out.bin").is_file());
        let mut left = report.left_workdirs.clone();
        left.sort();
        assert_eq!(
            left,
            [
                ("ext".to_string(), scratch),
                ("ext".to_string(), shared.clone())
            ]
        );
        // `shared-data` is no job: it has no attempts, and stays.
        assert_eq!(reason(&report, "shared-data"), "no attempt records");
    }

    /// A job that owns a parent of its workdir can swap it for a symlink into another job's
    /// dir after the fact: resolving the recorded workdir would keep that job forever.
    #[test]
    fn a_workdir_swapped_for_a_symlink_keeps_no_other_job() {
        let f = Fixture::new();
        f.job("victim", 1, JobState::Succeeded, 10 * DAY, None);
        let scratch = f.base().join("scratch");
        let workdir = scratch.join("mine/work");
        f.job("swapper", 1, JobState::Succeeded, DAY, Some(&workdir));
        std::fs::remove_dir_all(scratch.join("mine")).unwrap();
        std::os::unix::fs::symlink(f.state.job_dir("victim"), scratch.join("mine")).unwrap();
        std::fs::create_dir_all(f.state.job_dir("victim").join("work")).unwrap();
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["victim"], "{report:?}");
    }

    #[test]
    fn a_job_holding_another_jobs_workdir_stays() {
        let f = Fixture::new();
        f.job("host", 1, JobState::Succeeded, 10 * DAY, None);
        let inner = f.state.job_dir("host").join("guest-work");
        f.job("guest", 1, JobState::Succeeded, DAY, Some(&inner));
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(reason(&report, "host").contains("job guest's workdir"));
        assert!(inner.join("out.bin").is_file());
    }

    /// A file system mounted inside a job's dir (a bind mount of a dataset, a scratch tmpfs)
    /// keeps the job: removing it would empty the mounted file system. Needs root (mount);
    /// skipped where mounting is not allowed.
    #[test]
    fn a_mount_inside_keeps_the_job() {
        let f = Fixture::new();
        f.job("mounted", 1, JobState::Succeeded, 10 * DAY, None);
        let point = f.state.default_workdir("mounted").join("data");
        std::fs::create_dir_all(&point).unwrap();
        let Some(_mounted) = Tmpfs::mount(&point) else {
            return;
        };
        std::fs::write(point.join("dataset"), "d").unwrap();
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(
            reason(&report, "mounted").contains("a file system is mounted at"),
            "{report:?}"
        );
        assert!(point.join("dataset").is_file());
    }

    /// A scheduler that writes `job.json` for another attempt of an old job just before a
    /// sweep keeps the job: its agent would find no spec. An older `job.json` (the first
    /// attempt's) keeps nothing.
    #[test]
    fn a_job_json_written_after_the_last_attempt_keeps_the_job() {
        let f = Fixture::new();
        f.job("retried", 1, JobState::Failed, 40 * DAY, None);
        std::fs::write(f.state.job_dir("retried").join("job.json"), "{}").unwrap();
        f.job("plain", 1, JobState::Failed, 40 * DAY, None);
        let spec = f.state.job_dir("plain").join("job.json");
        std::fs::write(&spec, "{}").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&spec)
            .unwrap()
            .set_modified(SystemTime::now() - 41 * DAY)
            .unwrap();
        // Its mtime set back, "plain"'s job.json was still written now (its ctime): a copy
        // that kept an old mtime is as new as any ([`spec_written`]).
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        for id in ["retried", "plain"] {
            assert!(
                reason(&report, id).contains("job.json written"),
                "{report:?}"
            );
        }
        assert!(f.state.job_dir("retried").join("job.json").is_file());
        let later = sweep(
            &f.state,
            &Retention::default(),
            SystemTime::now() + 31 * DAY,
        );
        assert_eq!(later.removed_jobs, ["plain", "retried"], "{later:?}");
    }

    /// Overlapping sweeps: the one that comes second to a job finds its dir gone and makes
    /// none again (taking the attempt's lock created the job's directories).
    #[test]
    fn a_job_removed_meanwhile_is_not_made_again() {
        let f = Fixture::new();
        f.job("gone", 1, JobState::Succeeded, 10 * DAY, None);
        let job = read_job(&f.state, "gone").unwrap().unwrap();
        assert_eq!(f.sweep().removed_jobs, ["gone"]);
        let (left, report) = f.remove(&job, false);
        assert!(matches!(left, Err(Left::Gone)), "{report:?}");
        assert!(!f.state.job_dir("gone").exists());
    }

    /// What an earlier sweep left in the trash with a file system mounted in it (a job's FUSE
    /// mount made during that sweep) stays mounted and whole, with an error: the trash is
    /// emptied only where nothing is mounted. Root only; skipped where mounting is not
    /// allowed.
    #[test]
    fn a_mount_in_the_trash_is_never_emptied() {
        let f = Fixture::new();
        f.job("other", 1, JobState::Succeeded, DAY, None);
        let entry = f.state.jobs_dir().join(TRASH).join("x.1.2");
        let point = entry.join("work/data");
        std::fs::create_dir_all(&point).unwrap();
        std::fs::write(entry.join("work/out.bin"), [0u8; 10]).unwrap();
        let Some(_mounted) = Tmpfs::mount(&point) else {
            return;
        };
        std::fs::write(point.join("f"), "keep").unwrap();
        let report = f.sweep();
        assert_eq!(std::fs::read_to_string(point.join("f")).unwrap(), "keep");
        assert!(entry.join("work/out.bin").is_file(), "{report:?}");
        assert!(
            report.errors.len() == 1 && report.errors[0].contains("a file system is mounted"),
            "{report:?}"
        );
        assert!(report.removed_jobs.is_empty(), "{report:?}");
    }

    /// A trash entry whose records an older agent's sweep removed before it stopped goes as
    /// the owner of its workdir (the job's user) could have removed it. Root only (chown).
    #[test]
    fn a_trash_entry_without_records_goes_as_its_workdirs_owner_could() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let f = Fixture::new();
        let entry = f.state.jobs_dir().join(TRASH).join("old.1.2");
        let work = entry.join("work");
        std::fs::create_dir_all(work.join("deep/er")).unwrap();
        std::fs::write(work.join("deep/er/f"), [0u8; 10]).unwrap();
        std::fs::create_dir_all(work.join("moved/victim")).unwrap();
        std::fs::write(work.join("moved/victim/f"), "bob's").unwrap();
        for (path, uid) in [
            ("deep/er/f", 65534),
            ("deep/er", 65534),
            ("deep", 65534),
            ("moved/victim/f", 1),
            ("moved/victim", 1),
            ("moved", 65534),
            ("", 65534),
        ] {
            std::os::unix::fs::lchown(work.join(path), Some(uid), Some(uid)).unwrap();
        }
        let report = f.sweep();
        assert!(!work.join("deep").exists(), "{report:?}");
        assert!(work.join("moved/victim/f").is_file(), "{report:?}");
        assert!(
            report.errors.len() == 1 && report.errors[0].contains("moved/victim stays"),
            "{report:?}"
        );
        std::fs::remove_dir_all(work.join("moved/victim")).unwrap();
        let report = f.sweep();
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(!f.state.jobs_dir().join(TRASH).exists());
    }

    /// A chain of directories deeper than the fds the housekeeping unit may open (its soft
    /// limit, 1024) goes whole, with what comes after it in the listing.
    #[test]
    fn a_chain_deeper_than_the_fd_limit_goes() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        struct Restore(u64, u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                let _ = setrlimit(Resource::RLIMIT_NOFILE, self.0, self.1);
            }
        }
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let _restore = Restore(soft, hard);
        setrlimit(Resource::RLIMIT_NOFILE, soft.min(1024), hard).unwrap();
        let depth = usize::try_from(soft.min(1024)).unwrap() + 64;
        let f = Fixture::new();
        f.job("deep", 1, JobState::Succeeded, 10 * DAY, None);
        let work = f.state.default_workdir("deep");
        let mut dir = crate::confine::DirFd::open(&work).unwrap();
        for _ in 0..depth.max(2000) {
            dir = dir.ensure_dir(Path::new("d"), 0o755, None).unwrap();
        }
        drop(dir);
        std::fs::write(work.join("z-after"), "x").unwrap();
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["deep"], "{report:?}");
        assert!(report.errors.is_empty(), "{report:?}");
        assert!(!f.state.job_dir("deep").exists());
        assert!(!f.state.jobs_dir().join(TRASH).exists());
    }

    /// A job's user that moved another user's directory into its workdir (one it may write,
    /// holding that user's 0755 subdirectory) does not get root to delete that user's
    /// files: they stay, and so does the job, with its records. Root only (chown).
    #[test]
    fn what_the_jobs_user_could_not_remove_stays() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let f = Fixture::new();
        f.mover_as_nobody();
        let moved = f.state.default_workdir("mover").join("moved");
        std::fs::create_dir_all(moved.join("victim")).unwrap();
        std::fs::write(moved.join("victim/f"), "bob's").unwrap();
        std::fs::write(moved.join("mine"), "job's").unwrap();
        for (path, uid) in [("victim/f", 1), ("victim", 1), ("mine", 65534), ("", 65534)] {
            std::os::unix::fs::lchown(moved.join(path), Some(uid), Some(uid)).unwrap();
        }
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(
            reason(&report, "mover").contains("moved/victim stays"),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read_to_string(moved.join("victim/f")).unwrap(),
            "bob's"
        );
        assert!(
            !moved.join("mine").exists(),
            "what the job could remove goes"
        );
        assert!(f.state.run_record_path("mover", 1).is_file());
        assert!(!f.state.jobs_dir().join(TRASH).exists());
    }

    /// A trash entry one of whose records cannot be read (the others ran as the agent's
    /// user) is emptied as the owners of its directories, not as anyone: the files of
    /// another user that the job's user moved in stay. Root only (chown).
    #[test]
    fn a_trash_entry_with_an_unread_record_is_not_emptied_as_anyone() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let f = Fixture::new();
        f.job("old", 1, JobState::Succeeded, 10 * DAY, None);
        let trash = f.state.jobs_dir().join(TRASH);
        std::fs::create_dir_all(&trash).unwrap();
        let entry = trash.join("old.1.2");
        std::fs::rename(f.state.job_dir("old"), &entry).unwrap();
        std::fs::create_dir_all(entry.join("attempts/2")).unwrap();
        std::fs::write(entry.join("attempts/2/run.json"), "{x").unwrap();
        let moved = entry.join("work/moved");
        std::fs::create_dir_all(moved.join("victim")).unwrap();
        std::fs::write(moved.join("victim/f"), "bob's").unwrap();
        for (path, uid) in [("victim/f", 1), ("victim", 1), ("", 65534), ("..", 65534)] {
            std::os::unix::fs::lchown(moved.join(path), Some(uid), Some(uid)).unwrap();
        }
        let mut report = RetentionReport::default();
        empty_trash(&f.state, &trash, &mut report, &AtomicBool::new(false));
        assert_eq!(
            std::fs::read_to_string(moved.join("victim/f")).unwrap(),
            "bob's",
            "{report:?}"
        );
    }

    /// Root's directory inside a tree the job's user moved into its workdir (docker's
    /// `out/`, holding another user's files the job's user could not delete) is not the
    /// agent's own: its files stay, and so does the job. Root only (chown).
    #[test]
    fn a_roots_directory_the_jobs_user_moved_in_stays() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let f = Fixture::new();
        f.mover_as_nobody();
        let work = f.state.default_workdir("mover");
        std::fs::create_dir_all(work.join("proj/out")).unwrap();
        std::fs::write(work.join("proj/out/f"), "alice's").unwrap();
        for (path, uid) in [
            ("proj/out/f", 1),
            ("proj", 65534),
            ("out.bin", 65534),
            ("", 65534),
        ] {
            std::os::unix::fs::lchown(work.join(path), Some(uid), Some(uid)).unwrap();
        }
        let report = f.sweep();
        assert!(report.removed_jobs.is_empty(), "{report:?}");
        assert!(
            reason(&report, "mover").contains("work/proj/out stays"),
            "{report:?}"
        );
        assert_eq!(
            std::fs::read_to_string(work.join("proj/out/f")).unwrap(),
            "alice's"
        );
        assert!(f.state.run_record_path("mover", 1).is_file());
    }

    /// A sweep holds what it needs of each record, not the records: every job's whole record
    /// (its spec, up to a MiB) was held at once, 5,000 retained jobs with big specs
    /// gigabytes every hour. What decides is the summary: a job past its period goes, with
    /// its user read again from its record.
    #[test]
    fn a_sweep_holds_no_jobs_whole_record() {
        let f = Fixture::new();
        let big = "x".repeat(256 * 1024);
        for i in 0..16 {
            let id = format!("big{i:02}");
            let mut record = f.job(&id, 1, JobState::Succeeded, DAY, None);
            record.spec.env.insert("BIG".into(), big.clone());
            f.save(&record, DAY);
        }
        let (report, peak) = crate::rmtree::tests::held_during(|| f.sweep());
        assert_eq!(report.kept.len(), 16, "{report:?}");
        assert!(peak < 2 << 20, "held {peak} bytes at once");

        let job = read_job(&f.state, "big00").unwrap().unwrap();
        let workdir = f.state.default_workdir("big00").display().to_string();
        let summary = Attempt {
            workdir,
            took_workdir: false,
            phase: Phase::Done,
            unstored_to_retry: 0,
            state: Some(JobState::Succeeded),
        };
        assert_eq!(job.attempts, [(1, summary)]);
        let later = sweep(&f.state, &Retention::default(), SystemTime::now() + 7 * DAY);
        assert_eq!(later.removed_jobs.len(), 16, "{later:?}");
    }

    #[test]
    fn policy_by_state() {
        let p = Retention::from_days(1, 2);
        assert_eq!(p.period_for(Some(JobState::Succeeded)), DAY);
        for s in [JobState::Failed, JobState::Canceled, JobState::TimedOut] {
            assert_eq!(p.period_for(Some(s)), 2 * DAY);
        }
        assert_eq!(p.period_for(None), 2 * DAY);
    }
}
