//! Retention of finished jobs' local data: a job's state dir (`<state_dir>/jobs/<id>`: run
//! records, logs, the default workdir `work/`) is removed once every attempt of the job is
//! done, everything is stored, no report waits in the outbox, and the job has been finished
//! for longer than the policy keeps jobs of its latest attempt's state.
//!
//! What is never removed: a workdir outside the job's state dir (a spec's workdir elsewhere
//! under the jobs root, or anywhere else, belongs to the operator: it is reported in
//! [`RetentionReport::left_workdirs`]), a job another job's workdir lies in, a job with a file
//! system mounted inside it, and anything reached through a symlink.
//!
//! How a job goes: its attempt locks are taken (a held lock means an agent is at work on it:
//! the job is left alone), its records read again under the locks, then its dir is renamed
//! into `<state_dir>/jobs/.trash/` (one atomic step: `recover`, `resync` and a new attempt see
//! the whole job or none of it, and the job's user can no longer reach anything in it: the
//! trash is the agent's, 0700) and the trash entry removed. A sweep cut short leaves a trash
//! entry that the next sweep removes first.
//!
//! Blocking: call it with `spawn_blocking`.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use c3_proto::{JobState, Phase, RunRecord};

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
    /// Attempt numbers, ascending, with their records.
    attempts: Vec<(u32, RunRecord)>,
    /// The newest run record's mtime: when the job last changed.
    finished: SystemTime,
    /// The mtime of the scheduler's `job.json`, if there is one.
    job_json: Option<SystemTime>,
}

/// Removes the local data of every finished job past its retention period.
pub fn sweep(state: &StateDir, policy: &Retention, now: SystemTime) -> RetentionReport {
    let mut report = RetentionReport::default();
    let jobs_dir = state.jobs_dir();
    let trash = jobs_dir.join(TRASH);
    empty_trash(&trash, &mut report);

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
        match remove_job(state, policy, now, job, &trash, &mut report) {
            Ok(()) => {}
            Err(Left::Kept(why)) => report.kept.push((job.id.clone(), why)),
            Err(Left::Gone) => {
                tracing::debug!(job_id = %job.id, "removed meanwhile (by another sweep)");
            }
        }
    }
    let _ = std::fs::remove_dir(&trash);
    report
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
            return Err("no attempt records".into());
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
        attempts.push((n, record));
    }
    let job_json = std::fs::symlink_metadata(dir.join("job.json"))
        .and_then(|md| md.modified())
        .ok();
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
    for (n, record) in &job.attempts {
        if record.phase != Phase::Done {
            return Err(format!(
                "attempt {n} is not done (phase {})",
                record.phase.as_str()
            ));
        }
        // What the job made unstorable for good (a path too deep, a file too large) keeps
        // no job: no later look stores it, and the job would otherwise stay for ever.
        let left = record.unstored_to_retry();
        if left > 0 {
            return Err(format!(
                "attempt {n} left {left} item(s) unstored (`c3-agent resync`)"
            ));
        }
    }
    // What the flush delivers (`*.json`): a report it set aside (`*.bad`) or a temp file a
    // killed keep left (`.c3-*.tmp`, which the flush removes once stale) waits for nothing.
    let report = |name: &str| Path::new(name).extension().is_some_and(|x| x == "json");
    if has_entries(&state.outbox_dir(&job.id), report)? {
        return Err("reports wait in the outbox".into());
    }
    if has_entries(&job.dir.join("uploads"), |_| true)? {
        return Err("multipart uploads are journaled (not finished or aborted)".into());
    }
    let latest = job.attempts.last().map(|(_, r)| r.state).unwrap_or(None);
    let period = policy.period_for(latest);
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
        Ok(entries) => Ok(entries
            .flatten()
            .any(|e| counts(&e.file_name().to_string_lossy()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot read {}: {e}", dir.display())),
    }
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
    if let Some(mount) = mount_inside(&job.dir) {
        return Err(format!("a file system is mounted at {}", mount.display()).into());
    }
    let (bytes, foreign) = tree_bytes(&job.dir);
    if let Some(path) = foreign {
        return Err(format!(
            "{} is on another file system (a mount point?)",
            path.display()
        )
        .into());
    }

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
        if std::fs::rename(&doomed, &job.dir).is_err() {
            // Its agent made a new dir meanwhile: out of the trash (no sweep removes it: not a
            // job id), for the operator to merge.
            let aside = trash.with_file_name(format!("{}.moved-aside.{nanos}", job.id));
            let at = match std::fs::rename(&doomed, &aside) {
                Ok(()) => aside,
                Err(_) => doomed,
            };
            let why = format!(
                "job {}: a new attempt started while its dir was being moved; the old dir is at {}",
                job.id,
                at.display()
            );
            tracing::error!("{why}");
            report.errors.push(why);
        }
        return Err("a new attempt started meanwhile".into());
    }

    for workdir in workdirs {
        tracing::info!(job_id = %job.id, workdir = %workdir.display(), "workdir outside the job's state dir left in place");
        report.left_workdirs.push((job.id.clone(), workdir));
    }
    match remove_tree(&doomed) {
        Ok(()) => report.bytes_freed += bytes,
        Err(e) => {
            report.bytes_freed += bytes.saturating_sub(tree_bytes(&doomed).0);
            let why = format!("cannot remove {}: {e}", doomed.display());
            tracing::warn!(job_id = %job.id, "{why}; the next sweep tries again");
            report.errors.push(why);
        }
    }
    tracing::info!(job_id = %job.id, bytes, "removed a finished job's local data");
    report.removed_jobs.push(job.id.clone());
    drop(locks);
    Ok(())
}

fn numbers(job: &Job) -> BTreeSet<u32> {
    job.attempts.iter().map(|(n, _)| *n).collect()
}

fn ensure_trash(trash: &Path) -> io::Result<()> {
    match std::fs::create_dir(trash) {
        Ok(()) => std::fs::set_permissions(trash, std::fs::Permissions::from_mode(0o700)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let md = std::fs::symlink_metadata(trash)?;
            if md.is_dir() {
                Ok(())
            } else {
                Err(io::Error::other("exists and is not a directory"))
            }
        }
        Err(e) => Err(e),
    }
}

/// Removes what an earlier sweep moved to the trash and did not finish removing.
fn empty_trash(trash: &Path, report: &mut RetentionReport) {
    let Ok(entries) = std::fs::read_dir(trash) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let (bytes, _) = tree_bytes(&path);
        match remove_tree(&path) {
            Ok(()) => report.bytes_freed += bytes,
            Err(e) => {
                let why = format!("cannot remove {}: {e}", path.display());
                tracing::warn!("{why}");
                report.errors.push(why);
            }
        }
    }
    let _ = std::fs::remove_dir(trash);
}

/// Removes a directory tree without ever following a symlink.
///
/// The top entry is checked here (a symlink is refused; `remove_dir_all` would only remove
/// the link). Inside, std's `remove_dir_all` (rustc 1.95 here; so since 1.58.1, the fix of
/// CVE-2022-21658) works relative to directory fds: `openat(O_NOFOLLOW | O_DIRECTORY)`,
/// `fdopendir`, `unlinkat`; a symlink inside is unlinked as a link, its target never
/// touched (the test `symlinks_inside_a_workdir_are_not_followed` checks it). A job that left
/// directories without write permission for its owner (the agent's own user, when the job
/// ran as it) has them opened up first; nothing of the job runs any more and, in the trash,
/// nobody else can reach them.
fn remove_tree(path: &Path) -> io::Result<()> {
    let md = std::fs::symlink_metadata(path)?;
    if !md.is_dir() {
        return Err(io::Error::other("not a directory"));
    }
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            open_up_dirs(path);
            std::fs::remove_dir_all(path)
        }
        other => other,
    }
}

/// Gives the owner rwx on every directory of the tree. Every directory is opened from its
/// parent's fd, never through a symlink, and changed on its own fd: a process of the job
/// still inside the tree (its cwd) may swap a directory for a symlink to `/etc/shadow` at any
/// moment, and a path-based chmod would follow it, as root.
/// How deep retention's walks go: each level holds two fds while walked, and a job's chain
/// of a million directories must not run the housekeeping unit out of them (what lies deeper
/// is left for a later sweep, or counted out of `tree_bytes`).
const MAX_WALK_DEPTH: usize = 256;

fn open_up_dirs(root: &Path) {
    use crate::confine::{is_dir, DirFd};
    use crate::treewalk::{Item, TreeWalk};
    fn open_up(dir: &DirFd) {
        if let Ok(st) = nix::sys::stat::fstat(dir) {
            let mode = st.st_mode & 0o7777;
            if mode & 0o700 != 0o700 {
                let _ = nix::sys::stat::fchmod(
                    dir,
                    nix::sys::stat::Mode::from_bits_truncate(mode | 0o700),
                );
            }
        }
    }
    let Ok(top) = DirFd::open(root) else {
        return;
    };
    open_up(&top);
    // Each directory is read as a stream: the fds and memory held follow the depth, not
    // the width.
    let Ok(mut walk) = TreeWalk::new(top, Vec::new()) else {
        return;
    };
    // Bounded: a tree larger than this is left for the next sweep.
    let mut budget = 1_000_000usize;
    while let Some(item) = walk.next() {
        let Item::Entry(entry) = item else {
            continue;
        };
        if !entry.stat.as_ref().is_ok_and(is_dir) {
            continue;
        }
        if budget == 0 {
            break;
        }
        budget -= 1;
        let Ok(dir) = entry.open_dir() else {
            continue;
        };
        open_up(&dir);
        if walk.depth() < MAX_WALK_DEPTH {
            let _ = walk.enter(dir, Vec::new());
        }
    }
}

/// Apparent size of the tree's regular files, and a directory on another device than the
/// root, if any (not walked: an automount or a hung network mount would hold the sweep).
/// Walked on directory fds, each opened from its parent's with no symlink: a job's process
/// swapping a directory for a symlink mid-walk never sends it into another tree.
fn tree_bytes(root: &Path) -> (u64, Option<PathBuf>) {
    use crate::confine::{is_dir, is_regular, DirFd};
    use crate::treewalk::{Item, TreeWalk};
    use std::os::unix::ffi::OsStrExt;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return (0, None);
    };
    if !top.is_dir() {
        return (if top.is_file() { top.len() } else { 0 }, None);
    }
    let Ok(fd) = DirFd::open_root(root) else {
        return (0, None);
    };
    let (mut bytes, mut foreign) = (0, None);
    // Each directory is read as a stream, opened from its parent when met: a directory of
    // 100,000 subdirectories costs one listing at a time, not 100,000 paths.
    let Ok(mut walk) = TreeWalk::new(fd, Vec::new()) else {
        return (0, None);
    };
    while let Some(item) = walk.next() {
        let Item::Entry(entry) = item else {
            continue;
        };
        let Ok(st) = entry.stat else {
            continue;
        };
        if is_dir(&st) {
            if st.st_dev != top.dev() {
                foreign
                    .get_or_insert_with(|| root.join(std::ffi::OsStr::from_bytes(&entry.rel[1..])));
            } else if walk.depth() < MAX_WALK_DEPTH {
                if let Ok(dir) = entry.open_dir() {
                    let _ = walk.enter(dir, entry.rel);
                }
            }
        } else if is_regular(&st) {
            bytes += u64::try_from(st.st_size).unwrap_or(0);
        }
    }
    (bytes, foreign)
}

/// A mount point at or below `dir`, from `/proc/self/mountinfo` (bind mounts of the same
/// file system have no other device number: only the mount table tells).
fn mount_inside(dir: &Path) -> Option<PathBuf> {
    let dir = std::fs::canonicalize(dir).ok()?;
    crate::procfs::mount_points()
        .into_iter()
        .find(|p| p.starts_with(&dir))
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
    use c3_proto::JobSpec;

    struct Fixture {
        dir: tempfile::TempDir,
        state: StateDir,
    }

    impl Fixture {
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
                exit_code: Some(0),
                signal: None,
                started_at: "2026-01-01T00:00:00Z".into(),
                agent: None,
                agent_boot_id: None,
                leader: None,
                cgroup: None,
                unstored: Vec::new(),
                unstored_more: 0,
                unstored_for_good: 0,
                job_user: None,
                facts: None,
                watched_dirs: None,
                synced: None,
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
    }

    fn reason<'a>(report: &'a RetentionReport, id: &str) -> &'a str {
        report
            .kept
            .iter()
            .find(|(k, _)| k == id)
            .map(|(_, why)| why.as_str())
            .unwrap_or_else(|| panic!("{id} not kept: {report:?}"))
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
        std::fs::write(f.state.outbox_dir("tmponly").join(".c3-x.tmp"), "{").unwrap();
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

    /// What a job left closed to its owner is opened up on the fds of the tree itself: a
    /// symlink to a directory outside is never followed (its target keeps its mode).
    #[test]
    fn opening_up_a_tree_changes_its_own_directories_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (root, outside) = (dir.path().join("t"), dir.path().join("outside"));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
        open_up_dirs(&root);
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o777;
        assert_eq!(mode(&root.join("a")), 0o700);
        assert_eq!(mode(&root.join("a/b")), 0o700);
        assert_eq!(mode(&outside), 0o555, "followed a symlink");
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
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&self.0)
                    .status();
            }
        }
        let f = Fixture::new();
        f.job("mounted", 1, JobState::Succeeded, 10 * DAY, None);
        let point = f.state.default_workdir("mounted").join("data");
        std::fs::create_dir_all(&point).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "c3-test", point.to_str().unwrap()])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs here");
            return;
        }
        let _unmount = Unmount(point.clone());
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
        let report = f.sweep();
        assert_eq!(report.removed_jobs, ["plain"], "{report:?}");
        assert!(
            reason(&report, "retried").contains("job.json written"),
            "{report:?}"
        );
        assert!(f.state.job_dir("retried").join("job.json").is_file());
        let later = sweep(
            &f.state,
            &Retention::default(),
            SystemTime::now() + 31 * DAY,
        );
        assert_eq!(later.removed_jobs, ["retried"], "{later:?}");
    }

    /// Overlapping sweeps: the one that comes second to a job finds its dir gone and makes
    /// none again (taking the attempt's lock created the job's directories).
    #[test]
    fn a_job_removed_meanwhile_is_not_made_again() {
        let f = Fixture::new();
        f.job("gone", 1, JobState::Succeeded, 10 * DAY, None);
        let job = read_job(&f.state, "gone").unwrap().unwrap();
        assert_eq!(f.sweep().removed_jobs, ["gone"]);
        let mut report = RetentionReport::default();
        let trash = f.state.jobs_dir().join(TRASH);
        let left = remove_job(
            &f.state,
            &Retention::default(),
            SystemTime::now(),
            &job,
            &trash,
            &mut report,
        );
        assert!(matches!(left, Err(Left::Gone)), "{report:?}");
        assert!(!f.state.job_dir("gone").exists());
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
