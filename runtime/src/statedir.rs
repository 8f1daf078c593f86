//! Layout of the agent's state dir, and crash-safe writes into it.
//!
//! ```text
//! <state_dir>/store/                                  the embedded default store (file://)
//! <state_dir>/start.order                             how many attempts were started here
//! <state_dir>/start.order.lock                        held while one start takes its number
//! <state_dir>/jobs/<job_id>/job.json                  written by the scheduler
//! <state_dir>/jobs/<job_id>/work/                     default workdir
//! <state_dir>/jobs/<job_id>/attempts/<n>/run.json     RunRecord: what recover needs
//! <state_dir>/jobs/<job_id>/attempts/<n>/run.reserve  space kept for run.json while not done
//! <state_dir>/jobs/<job_id>/attempts/<n>/stdout.log   the job's whole output
//! <state_dir>/jobs/<job_id>/attempts/<n>/stderr.log
//! <state_dir>/jobs/<job_id>/attempts/<n>/reports.jsonl  reports, when there is no control plane
//! <state_dir>/outbox/<job_id>/<attempt>-<order>-<kind>.json  reports not yet delivered
//! <state_dir>/outbox/<job_id>/.lock                   held by the one flusher of the outbox
//! ```

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};

use c3_proto::RunRecord;

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state dir: cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state dir: cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state dir: {path} is not a valid record")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl StateError {
    /// A write that failed for lack of room (blocks or a quota).
    pub fn is_out_of_space(&self) -> bool {
        match self {
            StateError::Write { source, .. } => {
                matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
            }
            StateError::Read { .. } | StateError::Corrupt { .. } => false,
        }
    }
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn default_store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where default workdirs live (and, by default, the jobs root).
    pub fn jobs_dir(&self) -> PathBuf {
        self.root.join("jobs")
    }

    /// Whether this node's jobs can be listed: none yet is fine, but a dir this user may not
    /// read (an operator without sudo, a wrong `state_dir`) must not read as "no jobs" to
    /// `recover` and `status`, while unfinished attempts and reports sit there.
    pub fn check_listable(&self) -> Result<(), StateError> {
        match std::fs::read_dir(self.jobs_dir()) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Read {
                path: self.jobs_dir(),
                source,
            }),
        }
    }

    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.jobs_dir().join(job_id)
    }

    /// Where a job's multipart uploads are journaled (every attempt's).
    pub fn uploads_dir(&self, job_id: &str) -> PathBuf {
        self.job_dir(job_id).join("uploads")
    }

    /// Creates the state dir and an attempt's dir with their modes: the path down to a
    /// job's dir is traversable (0711: a default workdir lives below it and its user must
    /// reach it) but not listable; everything of the agent's own below is 0700.
    pub fn ensure_attempt_dir(&self, job_id: &str, attempt: u32) -> Result<PathBuf, StateError> {
        self.ensure_root()?;
        // The jobs dir may be an operator's symlink to a larger disk; below a job's dir
        // everything is the agent's own, and one found there must be.
        mkdir_mode(&self.jobs_dir(), 0o711, false)?;
        let job_dir = self.job_dir(job_id);
        // The agent's (made 0711 again if another pass changed its mode: a Kubernetes
        // `fsGroup`'s `g+rwxs`), or root's that no one else may write (a scheduler's, over a
        // user-mode agent). One its job's user owns let the job rename `attempts/` away and
        // link one in its place, and root's records, logs and upload journals landed
        // wherever the links led.
        if let Err(e) = mkdir_mode(&job_dir, 0o711, true) {
            if !agents_own(&[&job_dir]) {
                return Err(e);
            }
        }
        // Made by the agent when a multipart upload is journaled; one of another's (planted
        // while others could write in the job's dir) would have root's journals written and
        // read where its links lead.
        let uploads = self.uploads_dir(job_id);
        if std::fs::symlink_metadata(&uploads).is_ok() {
            mkdir_mode(&uploads, 0o700, true)?;
        }
        for dir in [job_dir.join("attempts"), self.attempt_dir(job_id, attempt)] {
            mkdir_mode(&dir, 0o700, true)?;
        }
        Ok(self.attempt_dir(job_id, attempt))
    }

    /// Creates the state dir (0711), and sets an existing one of the agent's to 0711. One
    /// another user owns, or (root's) that group or others may write, is refused: its owner or
    /// writers could read and rewrite the records a root `recover` acts on and the default
    /// store (the config's check said so at start; this one holds for a dir made since).
    pub fn ensure_root(&self) -> Result<(), StateError> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if let Some(parent) = self.root.parent() {
            make_dirs(parent, 0o711).map_err(|source| StateError::Write {
                path: parent.into(),
                source,
            })?;
        }
        mkdir_mode(&self.root, 0o711, false)?;
        if let Ok(meta) = std::fs::metadata(&self.root) {
            let mine = meta.uid() == nix::unistd::geteuid().as_raw();
            if !mine && (meta.uid() != 0 || meta.mode() & 0o022 != 0) {
                return Err(StateError::Write {
                    path: self.root.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "owned by uid {} (mode {:o}), not by this agent's user or root, or others may write it",
                            meta.uid(),
                            meta.mode() & 0o7777
                        ),
                    ),
                });
            }
            // Exactly 0711: narrower and a job's user could not reach a default workdir below it.
            if mine && meta.mode() & 0o777 != 0o711 {
                std::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o711))
                    .map_err(|source| StateError::Write {
                        path: self.root.clone(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    pub fn default_workdir(&self, job_id: &str) -> PathBuf {
        self.job_dir(job_id).join("work")
    }

    /// Why a spec's `workdir` may not be used, when it reaches into the agent's own tree: the
    /// workdir is made the job's, and a job owning a directory among the run records could
    /// plant one that a root `recover` then acts on (its lock, its cgroup, another job's
    /// manifest). Inside the state dir only `jobs/<own id>/<name>` and below is the job's,
    /// `<name>` none of the agent's; a workdir above the state dir would let an output dir
    /// reach into it.
    pub fn workdir_problem(&self, job_id: &str, workdir: &Path) -> Option<String> {
        // The state dir is root's: resolving it is safe, and a `jobs_root` given by the real
        // path of a state dir reached through a symlink is held to the same rule. So is a
        // workdir below a `jobs_root` that is a symlink (or a path through one) to the state
        // dir's `jobs/`: by its text it was elsewhere, and the job was given `jobs/<other>`,
        // where a record it planted had root create a lock through its symlinks. Only the
        // part root owns is resolved ([`resolved`]); below the jobs root no symlink is
        // followed anyway.
        let real = std::fs::canonicalize(&self.root).ok();
        let real_workdir = resolved(workdir).filter(|r| r != workdir);
        for (root, workdir) in [&self.root]
            .into_iter()
            .chain(real.as_ref())
            .flat_map(|root| {
                std::iter::once((root, workdir)).chain(real_workdir.as_deref().map(|w| (root, w)))
            })
        {
            if root.starts_with(workdir) {
                return Some(format!(
                    "`{}` holds the agent's state dir `{}`",
                    workdir.display(),
                    self.root.display()
                ));
            }
            let Ok(below) = workdir.strip_prefix(root) else {
                continue;
            };
            let mut parts = below.components().map(|c| c.as_os_str());
            let own = parts.next() == Some(OsStr::new("jobs"))
                && parts.next() == Some(OsStr::new(job_id))
                && parts
                    .next()
                    .is_some_and(|name| !AGENTS_NAMES.iter().any(|n| name == OsStr::new(n)));
            if !own {
                return Some(format!(
                    "`{}` is inside the agent's state dir `{}`: only below `{}` (not in its {}) may it be",
                    workdir.display(),
                    self.root.display(),
                    self.job_dir(job_id).display(),
                    AGENTS_NAMES.join(", ")
                ));
            }
        }
        None
    }

    pub fn attempt_dir(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.job_dir(job_id)
            .join("attempts")
            .join(attempt.to_string())
    }

    pub fn run_record_path(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.attempt_dir(job_id, attempt).join("run.json")
    }

    /// The attempts `job_id` has a directory for (any order; none if the job has none).
    pub fn attempt_numbers(&self, job_id: &str) -> Vec<u32> {
        std::fs::read_dir(self.job_dir(job_id).join("attempts"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    pub fn log_path(&self, job_id: &str, attempt: u32, stream: c3_proto::Stream) -> PathBuf {
        self.attempt_dir(job_id, attempt)
            .join(format!("{}.log", stream.as_str()))
    }

    pub fn outbox_root(&self) -> PathBuf {
        self.root.join("outbox")
    }

    pub fn outbox_dir(&self, job_id: &str) -> PathBuf {
        self.outbox_root().join(job_id)
    }

    pub fn write_record(&self, record: &RunRecord) -> Result<(), StateError> {
        write_atomic(
            &self.run_record_path(&record.spec.job_id, record.spec.attempt),
            &record.to_json(),
        )
    }

    /// The next number of `<state_dir>/start.order`, a counter every attempt's start takes
    /// (under the flock of `start.order.lock`, for agents starting at once): the order
    /// attempts started in, which no step of the wall clock changes
    /// ([`RunRecord::start_order`]). The counter is replaced whole ([`write_atomic`]):
    /// rewritten in place, a kill or a full disk between the truncate and the write left it
    /// empty, read as 0, and the next attempts took orders below those already recorded
    /// (`recover` then took the earlier job in a workdir for the later one). One missing or
    /// unreadable all the same goes on from the largest order in the run records.
    pub fn next_start_order(&self) -> Result<u64, StateError> {
        self.ensure_root()?;
        let _held = lock_patiently(&self.root.join("start.order.lock"))?;
        let path = self.root.join("start.order");
        let last = match read_state_file(&path, 4096) {
            Ok(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let last = last.unwrap_or_else(|| {
            let recorded = self.largest_start_order();
            if recorded > 0 {
                tracing::warn!(
                    path = %path.display(),
                    recorded,
                    "the start order counter was missing or unreadable: it goes on from the run records"
                );
            }
            recorded
        });
        let next = last.saturating_add(1);
        write_atomic(&path, format!("{next}\n").as_bytes())?;
        Ok(next)
    }

    /// The largest [`RunRecord::start_order`] of the run records here (0: none has one).
    fn largest_start_order(&self) -> u64 {
        self.all_records()
            .iter()
            .filter_map(|path| self.read_record(path).ok()?.start_order)
            .max()
            .unwrap_or(0)
    }

    /// Where an attempt keeps [`RECORD_RESERVE_BYTES`] for its run record.
    pub fn record_reserve_path(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.attempt_dir(job_id, attempt).join("run.reserve")
    }

    /// [`StateDir::write_record`] for the agent at work on the attempt, which a full disk
    /// must not stop: the job and root's own copies into a file store on the same filesystem
    /// can eat every block, the reserved ones included, and a record left at `running` made
    /// `recover` send FAILED/AGENT_ERROR (retryable, with a higher `seq`) after the agent had
    /// delivered SUCCEEDED, and the scheduler ran a finished job again. Out of space, the
    /// write frees the attempt's reserve and is tried again; while the attempt is not done the
    /// reserve is made again when there is room, and once it is done it is given back.
    pub fn write_record_reserved(&self, record: &RunRecord) -> Result<(), StateError> {
        let (job_id, attempt) = (record.spec.job_id.as_str(), record.spec.attempt);
        let reserve = self.record_reserve_path(job_id, attempt);
        let written = match self.write_record_or_full(record) {
            Err(e) if e.is_out_of_space() && std::fs::remove_file(&reserve).is_ok() => {
                tracing::warn!(
                    "the state dir's filesystem is full: the run record's reserve was freed for it"
                );
                #[cfg(debug_assertions)]
                RESERVE_FREED.store(true, std::sync::atomic::Ordering::SeqCst);
                self.write_record_or_full(record)
            }
            other => other,
        };
        if record.phase == c3_proto::Phase::Done {
            let _ = std::fs::remove_file(&reserve);
        } else if written.is_ok() && std::fs::symlink_metadata(&reserve).is_err() {
            make_reserve(&reserve);
        }
        written
    }

    /// [`StateDir::write_record`], and under the `record-write-enospc` fault (debug builds),
    /// past the record of the launch (`seq` 2 on), a filesystem with no room for it until a
    /// reserve is freed.
    fn write_record_or_full(&self, record: &RunRecord) -> Result<(), StateError> {
        #[cfg(debug_assertions)]
        if record.seq >= 2
            && crate::fault::armed("record-write-enospc")
            && !RESERVE_FREED.load(std::sync::atomic::Ordering::SeqCst)
        {
            return Err(StateError::Write {
                path: self.run_record_path(&record.spec.job_id, record.spec.attempt),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            });
        }
        self.write_record(record)
    }

    pub fn read_record(&self, path: &Path) -> Result<RunRecord, StateError> {
        let bytes = read_state_file(path, MAX_RECORD_BYTES).map_err(|source| StateError::Read {
            path: path.into(),
            source,
        })?;
        RunRecord::from_json(&bytes).map_err(|e| StateError::Corrupt {
            path: path.into(),
            source: e,
        })
    }

    /// Moves a run record that does not parse out of the way (`run.json.bad`, or
    /// `run.json.bad-<nanos>` beside an earlier one), for an operator or a newer agent: a
    /// record written over in its place loses what the earlier run was (its leader, its
    /// `seq`), and one left in place stops every later run of the attempt.
    pub fn set_aside(&self, path: &Path) -> Result<PathBuf, StateError> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(".bad");
        let mut aside = PathBuf::from(aside);
        if std::fs::symlink_metadata(&aside).is_ok() {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let mut later = aside.into_os_string();
            later.push(format!("-{nanos}"));
            aside = later.into();
        }
        std::fs::rename(path, &aside).map_err(|source| StateError::Write {
            path: aside.clone(),
            source,
        })?;
        Ok(aside)
    }

    /// The names of the records [`StateDir::set_aside`] moved out of `record`'s place, in
    /// order of name (`run.json.bad`, then `run.json.bad-<nanos>` by time).
    pub fn set_aside_names(record: &Path) -> std::io::Result<Vec<String>> {
        let dir = record.parent().unwrap_or(Path::new("."));
        let prefix = format!(
            "{}.bad",
            record.file_name().unwrap_or_default().to_string_lossy()
        );
        let mut names: Vec<String> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.starts_with(&prefix))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Every run record, oldest job first.
    pub fn all_records(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(jobs) = std::fs::read_dir(self.root.join("jobs")) else {
            return out;
        };
        for job in jobs.flatten() {
            let Ok(attempts) = std::fs::read_dir(job.path().join("attempts")) else {
                continue;
            };
            for attempt in attempts.flatten() {
                let record = attempt.path().join("run.json");
                if agents_own(&[&job.path(), &attempt.path(), &record]) {
                    out.push(record);
                } else if std::fs::symlink_metadata(&record).is_ok() {
                    tracing::warn!(record = %record.display(), "a run record in a directory that is not the agent's alone (a symlink, another owner, writable by others) is left alone");
                }
            }
        }
        out.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        out
    }
}

/// The order of one attempt's run record writes, for the agent at work on it: a write runs
/// on a blocking thread and goes on after the task that asked for it is dropped (the stop
/// cut drops the reports' deliveries), so an older write could run beside a newer one, and
/// the last rename won: a `finishing` record landed over the `done` one (`recover` then
/// finished the attempt again, a second terminal status), and its "not done" branch made
/// the reserve again after the done one gave it back.
#[derive(Debug, Default)]
pub struct RecordWrites {
    /// The number of the last write asked for: taken by the attempt's task as it asks, so
    /// the numbers follow the records' order.
    asked: std::sync::atomic::AtomicU64,
    /// The number of the newest write begun, held by a write from its start to its end:
    /// writes never overlap, and one older than the newest begun is skipped.
    newest: std::sync::Mutex<u64>,
}

impl RecordWrites {
    /// The number of a write asked for now, to pass to [`RecordWrites::write`].
    pub fn ticket(&self) -> u64 {
        self.asked
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            .saturating_add(1)
    }

    /// [`StateDir::write_record_reserved`], unless a write asked for after `ticket` has
    /// begun (its record is newer); blocking, as that is.
    pub fn write(
        &self,
        state: &StateDir,
        record: &RunRecord,
        ticket: u64,
    ) -> Result<(), StateError> {
        let mut newest = self
            .newest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *newest > ticket {
            tracing::debug!(
                ticket,
                newest = *newest,
                "a run record older than the one written is not written"
            );
            return Ok(());
        }
        *newest = ticket;
        state.write_record_reserved(record)
    }
}

/// Whether each path is the agent's own, as a record `recover` acts on as root must be: not a
/// symlink, owned by root (or the agent's user), not writable by others (the rule `run
/// --job-id` holds its spec to). A record anywhere else was not written by an agent.
pub(crate) fn agents_own(paths: &[&Path]) -> bool {
    use std::os::unix::fs::MetadataExt;
    paths.iter().all(|p| {
        std::fs::symlink_metadata(p).is_ok_and(|m| {
            !m.file_type().is_symlink() && root_alone_writes(m.uid(), m.gid(), m.mode())
        })
    })
}

/// Whether only root (or the agent's user) may write what has this owner, group and mode:
/// what root acts on by path (a run record, a scheduler's spec) must be no one else's to
/// plant. Not others, and not its group unless that is root's (a `root:jobs 2775` spec dir
/// let every job rewrite specs).
pub fn root_alone_writes(uid: u32, gid: u32, mode: u32) -> bool {
    let euid = nix::unistd::geteuid().as_raw();
    (uid == 0 || uid == euid) && mode & 0o002 == 0 && (mode & 0o020 == 0 || gid == 0)
}

/// Whether only root may write the open `file` (a spec, a directory on its way, a store
/// root): its owner, mode and group ([`root_alone_writes`]), and no access ACL letting a named
/// user or group write it (one that cannot be understood counts as letting them).
pub fn root_alone(
    file: &impl std::os::fd::AsFd,
    st: &nix::sys::stat::FileStat,
) -> Result<bool, String> {
    if !root_alone_writes(st.st_uid, st.st_gid, st.st_mode) {
        return Ok(false);
    }
    match crate::acl::of(file) {
        Ok(None) => Ok(true),
        Ok(Some(acl)) => Ok(!acl.lets_others_write(st.st_uid)),
        Err(crate::acl::AclError::Malformed) => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}

/// `path` with its longest part root owns resolved (symlinks, `..`), the rest as written:
/// what a job's user owns below a jobs root is never followed (its symlink into a hung mount
/// would hold the check for ever), and `prepare` follows no symlink there anyway.
fn resolved(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let parts: Vec<_> = path.components().collect();
    let mut trusted = PathBuf::new();
    let mut taken = 0;
    for part in &parts {
        let next = trusted.join(part);
        match std::fs::symlink_metadata(&next) {
            Ok(m) if m.uid() == 0 => {
                trusted = next;
                taken += 1;
            }
            _ => break,
        }
    }
    let mut real = std::fs::canonicalize(&trusted).ok()?;
    real.extend(&parts[taken..]);
    Some(real)
}

/// What the agent keeps in a job's dir (`<state_dir>/jobs/<id>/`), beside the default workdir.
const AGENTS_NAMES: &[&str] = &["attempts", "uploads", "job.json"];

/// Creates `dir` and whatever is missing above it (the operator's paths: the state dir's,
/// `jobs_root`'s), each directory made here with exactly `mode`: under the agent's private
/// umask they came out 0700, and a job's user could not reach its workdir, its
/// `$C3_ARTIFACTS_DIR` or its socket below them by absolute path.
pub fn make_dirs(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent, mode)?;
    }
    // Made with `mode` (narrowed by the umask, never wider), then given exactly it: made
    // wide first, it was another user's to rename a tree into before the chmod.
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `dir` (not its parents) with exactly `mode` (the umask would narrow it). With
/// `own`, one that exists must be the agent's own directory that no one else may write: root
/// writes the attempt's logs and records into it by path, and a tree another user put there
/// (a rename into a parent it could write for a moment) would have them land wherever its
/// links say.
fn mkdir_mode(dir: &Path, mode: u32, own: bool) -> Result<(), StateError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| StateError::Write {
        path: dir.into(),
        source,
    };
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(err),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !own => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::symlink_metadata(dir).map_err(err)?;
            if !md.is_dir() || md.uid() != nix::unistd::geteuid().as_raw() {
                return Err(err(std::io::Error::other(
                    "exists and is not a directory of the agent's own",
                )));
            }
            // Its own, with a mode another pass gave it (a Kubernetes `fsGroup`'s `g+rwxs`
            // on a state dir's volume): made its again.
            if md.mode() & 0o7777 != mode {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                    .map_err(err)?;
            }
            Ok(())
        }
        Err(e) => Err(err(e)),
    }
}

/// What an attempt keeps for its run record (a few records' worth: one is at most a few
/// hundred KiB, the unstored paths it names capped), so that a full filesystem cannot stop
/// the writes that tell `recover` how the attempt ended.
pub const RECORD_RESERVE_BYTES: u64 = 4 << 20;

/// Set once a reserve was freed for a record: the `record-write-enospc` fault's filesystem
/// has room from then on (each record's rename frees the one before).
#[cfg(debug_assertions)]
static RESERVE_FREED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the reserve file at `path`, its blocks allocated (not a sparse file, which frees
/// nothing). Best effort: no room, no reserve (the next record write tries again); a
/// partly made one is removed.
fn make_reserve(path: &Path) {
    #[cfg(debug_assertions)]
    if crate::fault::armed("record-write-enospc")
        && RESERVE_FREED.load(std::sync::atomic::Ordering::SeqCst)
    {
        return; // the fault's filesystem, once full, has no room for another
    }
    let made = (|| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        reserve_blocks(&file, |file| {
            let len = RECORD_RESERVE_BYTES as i64;
            match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, len) {
                // A filesystem without fallocate (ZFS before 2.0, some NFS): written out below.
                Ok(()) | Err(nix::errno::Errno::EOPNOTSUPP) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    })();
    if let Err(e) = made {
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            let _ = std::fs::remove_file(path);
            tracing::debug!(error = %e, "no reserve for the run record now");
        }
    }
}

/// Gives `file` [`RECORD_RESERVE_BYTES`] of blocks of its own: `allocate`'s (fallocate), and
/// where those fall short, bytes written out. A successful fallocate is not enough: OpenZFS
/// 2.x answers it with a sparse file, and zeros written to a compressing filesystem are
/// stored as holes; either way the reserve held no block, and freeing it on a full disk
/// gave the run record no room. The bytes written are a PRNG's, which no compression
/// shrinks, seeded per file so that no dedup folds two reserves into one.
fn reserve_blocks(
    file: &std::fs::File,
    allocate: impl FnOnce(&std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let held = |file: &std::fs::File| -> std::io::Result<u64> {
        Ok(file.metadata()?.blocks().saturating_mul(512))
    };
    allocate(file)?;
    if held(file)? >= RECORD_RESERVE_BYTES {
        return file.sync_all();
    }
    let meta = file.metadata()?;
    let mut rng = XorShift::seeded(meta.ino() ^ u64::from(std::process::id()));
    let mut chunk = vec![0u8; 64 << 10];
    let mut offset = 0;
    while offset < RECORD_RESERVE_BYTES {
        rng.fill(&mut chunk);
        file.write_all_at(&chunk, offset)?;
        offset += chunk.len() as u64;
    }
    file.sync_all()?;
    // Some filesystems (ZFS) count a file's blocks only once its transaction group is
    // written out, seconds later: a short count now is not proof, so only said once.
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let now = held(file)?;
    if now < RECORD_RESERVE_BYTES && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::info!(
            held_bytes = now,
            wanted_bytes = RECORD_RESERVE_BYTES,
            "the run record's reserve holds fewer blocks than written (a copy-on-write or deduplicating filesystem?): on a full disk it is best effort"
        );
    }
    Ok(())
}

/// xorshift64*: bytes no compression or dedup shrinks, at memory speed, for
/// [`reserve_blocks`] (nothing here needs them unpredictable).
struct XorShift(u64);

impl XorShift {
    fn seeded(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // Never zero: xorshift's one fixed point.
        XorShift((nanos ^ salt.rotate_left(32)) | 1)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let out = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            word.copy_from_slice(&out[..word.len()]);
        }
    }
}

/// How long an agent starting an attempt waits out a lock held by another process's look.
pub const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// The exclusive claim of one agent on one job attempt, held until dropped: a second agent
/// for the same attempt would mix logs and manifests and abort the first one's uploads.
#[derive(Debug)]
pub struct AttemptLock {
    _file: HeldFlock,
}

/// A file whose flock this agent holds, known while held so that a forked child lets go of
/// its share ([`held_flocks`]): a flock belongs to the open file, which a fork shares until
/// execve closes it, and an execve stuck on a hung mount held the attempt's lock for as
/// long as it hung: `recover` left the attempt "already being run", its process running.
#[derive(Debug)]
pub struct HeldFlock {
    file: std::fs::File,
}

/// Each held flock's fd, device and inode (a child closes the fd only while it still is
/// that file: the number may have been given to another since).
static HELD_FLOCKS: std::sync::Mutex<Vec<(i32, u64, u64)>> = std::sync::Mutex::new(Vec::new());

fn held_flocks_list() -> std::sync::MutexGuard<'static, Vec<(i32, u64, u64)>> {
    HELD_FLOCKS.lock().unwrap_or_else(|p| p.into_inner())
}

impl HeldFlock {
    /// `file`, whose flock is taken.
    pub fn new(file: std::fs::File) -> HeldFlock {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        if let Ok(meta) = file.metadata() {
            held_flocks_list().push((file.as_raw_fd(), meta.dev(), meta.ino()));
        }
        HeldFlock { file }
    }
}

impl Drop for HeldFlock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        held_flocks_list().retain(|(f, _, _)| *f != fd);
    }
}

/// The flocks this agent holds now, for a child to let go of before its execve.
pub fn held_flocks() -> Vec<(i32, u64, u64)> {
    held_flocks_list().clone()
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("job {job_id} attempt {attempt} is already being run by another agent (pid {holder})")]
    Held {
        job_id: String,
        attempt: u32,
        holder: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
}

impl AttemptLock {
    /// Takes the attempt's lock, creating the attempt's dir (and the job's) if missing.
    pub fn acquire(state: &StateDir, job_id: &str, attempt: u32) -> Result<Self, LockError> {
        let dir = state.ensure_attempt_dir(job_id, attempt)?;
        Self::lock_in(&dir, job_id, attempt)?.ok_or_else(|| {
            LockError::State(StateError::Write {
                path: dir.join("lock"),
                source: std::io::ErrorKind::NotFound.into(),
            })
        })
    }

    /// [`AttemptLock::acquire`] for an agent starting its attempt: a lock held for a moment
    /// only (another process's look at whether the attempt is running: an outbox flush,
    /// retention) is waited out, up to [`LOCK_PATIENCE`]. The start failed `Held` at once,
    /// exit 2, which a scheduler takes as a bad spec and fails the job for good.
    pub async fn acquire_patiently(
        state: &StateDir,
        job_id: &str,
        attempt: u32,
    ) -> Result<Self, LockError> {
        let until = tokio::time::Instant::now() + LOCK_PATIENCE;
        loop {
            match Self::acquire(state, job_id, attempt) {
                Err(LockError::Held { .. }) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                other => return other,
            }
        }
    }

    /// Takes the lock of an attempt whose dir exists; `Ok(None)`: the attempt's dir is gone
    /// (removed meanwhile, by another retention sweep say), and nothing was created. For
    /// whoever only acts on what is there: [`AttemptLock::acquire`] would make the job's
    /// directories again, an empty job for every sweep that came second.
    pub fn acquire_existing(
        state: &StateDir,
        job_id: &str,
        attempt: u32,
    ) -> Result<Option<Self>, LockError> {
        Self::lock_in(&state.attempt_dir(job_id, attempt), job_id, attempt)
    }

    fn lock_in(dir: &Path, job_id: &str, attempt: u32) -> Result<Option<Self>, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join("lock");
        let err = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        // Never through a symlink: a lock planted as one would have root truncate its target.
        // The file alone is created: a missing dir is ENOENT.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(err(e).into()),
        };
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let holder = std::io::Read::read_to_string(
                    &mut std::io::Read::take(&mut file, 4096),
                    &mut holder,
                )
                .ok()
                .map(|_| holder.trim().to_string())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "unknown".into());
                return Err(LockError::Held {
                    job_id: job_id.into(),
                    attempt,
                    holder,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e).into()),
        }
        file.set_len(0).map_err(err)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .map_err(err)?;
        Ok(Some(AttemptLock {
            _file: HeldFlock::new(file),
        }))
    }
}

/// [`write_atomic`] into a directory made private (0700) if missing, whatever the umask
/// (a folder others may write is refused by its readers: its files never read).
/// A directory it makes is made durable in its parent too: each flush that empties an outbox
/// removes its folder, so most kept terminal statuses land in a new one, and a power cut that
/// lost the folder's entry lost the status that `recover` was to send again.
pub fn write_atomic_private(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().expect("state files live in a directory");
    let made = !dir.is_dir();
    make_dirs(dir, 0o700).map_err(|source| StateError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    if let (true, Some(parent)) = (made, dir.parent()) {
        if let Err(e) = std::fs::File::open(parent).and_then(|d| d.sync_all()) {
            tracing::debug!(dir = %parent.display(), error = %e, "cannot sync a directory");
        }
    }
    write_atomic(path, bytes)?;
    // Removed meanwhile (a flush that emptied it) and made again by the write under the
    // umask (000 under some launchers): its readers would refuse it.
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot make a directory private");
    }
    Ok(())
}

/// Write to a temp file (unique name, 0600), fsync, rename: a reader (or a crash) never
/// sees half a file, and two writers never share a temp file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    replace(path, bytes, true)
}

/// Takes the flock of the file at `path` (made if missing, never through a symlink), waiting
/// out another agent's hold up to [`LOCK_PATIENCE`]: such a lock is held for a read and a
/// write, and a blocking flock behind a stuck holder would hang the start (and the reactor
/// thread it runs on) for good.
fn lock_patiently(path: &Path) -> Result<HeldFlock, StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let file = open_lock_file(path).map_err(err)?;
    let until = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(HeldFlock::new(file)),
            Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(err(std::io::ErrorKind::WouldBlock.into()))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
    }
}

/// The flock of `<state_dir>/retention.lock`, taken without waiting: `None` while another
/// sweep holds it. One sweep at a time: a second one's start empties the trash, and took
/// the first one's entry in flight for a leftover (removed as it was being put back).
pub fn try_retention_lock(state: &StateDir) -> Result<Option<HeldFlock>, StateError> {
    let path = state.root().join("retention.lock");
    let err = |source| StateError::Write {
        path: path.clone(),
        source,
    };
    let file = open_lock_file(&path).map_err(err)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(HeldFlock::new(file))),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(err(e)),
    }
}

/// A lock file at `path` (0600), made if missing, never through a symlink.
fn open_lock_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// The most a run record may hold: its spec (at most 1 MiB) and the first 100 unstored paths,
/// with room to spare; anything larger is not one.
pub const MAX_RECORD_BYTES: u64 = 64 << 20;

/// The bytes of the state file at `path`, at most `cap` of them: never through a symlink, and
/// only a regular file's. An operator's `status` or `logs` as root reads the state dir of a
/// user-mode agent (a Slurm user's), which that user laid out: a FIFO there hung the command,
/// a link to `/dev/zero` grew it until the OOM killer came.
pub fn read_state_file(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = open_state_file(path)?;
    let mut bytes = Vec::new();
    file.take(cap.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("over {cap} bytes: not a state file of the agent's"),
        ));
    }
    Ok(bytes)
}

/// The state file at `path`, opened to read: not through a symlink, without waiting for a
/// FIFO's writer, and only a regular file.
pub fn open_state_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// [`write_atomic`] without the fsyncs, for records that are only hints after a host crash
/// (losing the newest version costs work, never data). Each fsync on ext4 forces a journal
/// commit, and a commit stalls the job's own writes on the same filesystem: one per part of
/// every upload made a checkpointing job's writes measurably slower.
pub fn write_replace(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    replace(path, bytes, false)
}

fn replace(path: &Path, bytes: &[u8], durable: bool) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".c3-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    if durable {
        tmp.as_file().sync_all().map_err(err)?;
    }
    tmp.persist(path).map_err(|e| err(e.error))?;
    if durable {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An attempt's dir of the agent's own that another pass gave another mode (a Kubernetes
    /// `fsGroup`'s `g+rwxs` on the state dir's volume) is made its again; one of another
    /// user's, or a symlink, is refused.
    #[test]
    fn an_attempt_dir_is_the_agents_own() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let s = StateDir::new(top.path().join("state"));
        let dir = s.ensure_attempt_dir("j", 1).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o2770)).unwrap();
        s.ensure_attempt_dir("j", 1).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, s.attempt_dir("j", 2)).unwrap();
        assert!(s.ensure_attempt_dir("j", 2).is_err());
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
            assert!(s.ensure_attempt_dir("j", 1).is_err());
        }
    }

    /// A job's dir its user owns is refused: the job could rename `attempts/` away and link
    /// one in its place for root to write records through. One of the agent's that others
    /// may write in (a `fsGroup`'s `g+rwxs`) is made 0711 again; a symlink is refused.
    #[test]
    fn a_job_dir_of_another_users_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let s = StateDir::new(top.path().join("state"));
        s.ensure_attempt_dir("j", 1).unwrap();
        let job = s.job_dir("j");
        std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o2777)).unwrap();
        s.ensure_attempt_dir("j", 2).unwrap();
        let mode = std::fs::metadata(&job).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o711);
        let elsewhere = top.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, s.job_dir("linked")).unwrap();
        assert!(s.ensure_attempt_dir("linked", 1).is_err());
        assert!(!elsewhere.join("attempts").exists());
        // An `uploads` planted as a symlink while others could write in the job's dir.
        std::os::unix::fs::symlink(&elsewhere, s.uploads_dir("j")).unwrap();
        assert!(s.ensure_attempt_dir("j", 4).is_err());
        std::fs::remove_file(s.uploads_dir("j")).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&job, Some(4242), None).unwrap();
            let e = s.ensure_attempt_dir("j", 3).unwrap_err();
            assert!(crate::error_chain(&e).contains("agent's own"), "{e:?}");
            assert!(!s.attempt_dir("j", 3).exists());
        } else {
            crate::testskip::skip("not root: a dir of another user's cannot be made; not checked");
        }
    }

    /// A state dir another user made first (0777, theirs) is not taken over: they could read
    /// and rewrite every record in it. The agent's own is set to 0711.
    #[test]
    fn a_state_dir_another_user_owns_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let s = StateDir::new(top.path().join("state"));
        std::fs::create_dir(s.root()).unwrap();
        std::fs::set_permissions(s.root(), std::fs::Permissions::from_mode(0o777)).unwrap();
        s.ensure_root().unwrap();
        let mode = std::fs::metadata(s.root()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o711);
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("not root: a dir of another user's cannot be made; not checked");
            return;
        }
        std::fs::set_permissions(s.root(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(s.root(), Some(4242), Some(4242)).unwrap();
        let e = s.ensure_root().unwrap_err();
        assert!(format!("{:?}", e).contains("uid 4242"), "{e:?}");
        assert!(s.ensure_attempt_dir("j", 1).is_err());
        assert!(!s.jobs_dir().exists());
    }

    #[test]
    fn a_workdir_reaches_into_the_state_dir_only_below_its_own_job_dir() {
        let s = StateDir::new(Path::new("/var/lib/c3"));
        let problem = |w: &str| s.workdir_problem("j1", Path::new(w));
        assert_eq!(problem("/var/lib/c3/jobs/j1/work"), None);
        assert_eq!(problem("/var/lib/c3/jobs/j1/work/deeper"), None);
        assert_eq!(problem("/var/lib/c3/jobs/j1/run"), None);
        assert_eq!(problem("/srv/jobs/j1"), None);
        assert_eq!(problem("/var/lib/c3x/jobs"), None);
        for bad in [
            "/var/lib/c3/jobs/plant",
            "/var/lib/c3/jobs/j1",
            "/var/lib/c3/jobs/j1/attempts/9",
            "/var/lib/c3/jobs/j1/uploads",
            "/var/lib/c3/jobs/other/work",
            "/var/lib/c3/jobs/.trash",
            "/var/lib/c3/outbox",
            "/var/lib",
        ] {
            assert!(problem(bad).is_some(), "{bad} was allowed");
        }
    }

    /// A jobs root that is a symlink to the state dir's `jobs/` (or a path through one)
    /// is held to the same rule: by its text `/srv/jobs/plant` was elsewhere.
    #[test]
    fn a_workdir_through_a_symlink_into_the_state_dir_is_refused() {
        let top = tempfile::tempdir().unwrap();
        let s = StateDir::new(top.path().join("state"));
        std::fs::create_dir_all(s.jobs_dir()).unwrap();
        let link = top.path().join("srv-jobs");
        std::os::unix::fs::symlink(s.jobs_dir(), &link).unwrap();
        let problem = |w: &Path| s.workdir_problem("j1", w);
        assert!(problem(&link.join("plant")).is_some());
        assert!(problem(&link.join("plant/deeper/still")).is_some());
        assert!(problem(&link.join("j1/attempts")).is_some());
        assert_eq!(problem(&link.join("j1/work")), None);
        assert_eq!(problem(&top.path().join("elsewhere/j1")), None);
    }

    /// Another process's look at the lock (an outbox flush asking whether the job runs)
    /// holds it for a moment: an agent starting the attempt then waits it out. One held for
    /// good (another agent at work) is still refused.
    #[tokio::test]
    async fn a_start_waits_out_a_look_at_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        s.ensure_attempt_dir("j", 1).unwrap();
        let look = AttemptLock::acquire_existing(&s, "j", 1).unwrap().unwrap();
        let ends = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(look);
        });
        let started = AttemptLock::acquire_patiently(&s, "j", 1).await;
        ends.join().unwrap();
        let held = started.expect("the start waited out the look");
        assert!(matches!(
            AttemptLock::acquire_patiently(&s, "j", 1).await,
            Err(LockError::Held { .. })
        ));
        drop(held);
    }

    /// A state dir another user laid out (a user-mode agent's, which root's `status` reads):
    /// a FIFO in a record's place is refused at once, not waited on; a symlink is not
    /// followed; a file past the cap is not read whole.
    #[test]
    fn a_state_file_is_a_small_regular_file_never_a_fifo_or_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let fifo = dir.path().join("fifo.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let begun = std::time::Instant::now();
        assert!(s.read_record(&fifo).is_err());
        assert!(begun.elapsed() < std::time::Duration::from_secs(5));
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "root only").unwrap();
        let link = dir.path().join("stdout.log");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(open_state_file(&link).is_err());
        assert!(read_state_file(&link, 100).is_err());
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; 101]).unwrap();
        assert_eq!(
            read_state_file(&big, 100).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        assert_eq!(read_state_file(&big, 101).unwrap().len(), 101);
        assert_eq!(
            read_state_file(Path::new("/dev/zero"), 100)
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::InvalidInput
        );
    }

    fn blocks_held(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn a_reserve_holds_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.reserve");
        make_reserve(&path);
        assert!(
            blocks_held(&path) >= RECORD_RESERVE_BYTES,
            "{}",
            blocks_held(&path)
        );
    }

    /// A fallocate that succeeds and leaves a sparse file (OpenZFS 2.x) is not taken for a
    /// reserve: the bytes are written out, and not as zeros (a compressing filesystem stores
    /// those as holes).
    #[test]
    fn a_reserve_a_sparse_fallocate_left_empty_is_written_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.reserve");
        let file = std::fs::File::create_new(&path).unwrap();
        reserve_blocks(&file, |file| file.set_len(RECORD_RESERVE_BYTES)).unwrap();
        assert!(
            blocks_held(&path) >= RECORD_RESERVE_BYTES,
            "{}",
            blocks_held(&path)
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, RECORD_RESERVE_BYTES);
        let zeros = bytes
            .chunks(4096)
            .filter(|c| c.iter().all(|b| *b == 0))
            .count();
        assert_eq!(
            zeros, 0,
            "pages of zeros a compressing filesystem keeps as holes"
        );
    }

    /// A run record of job `job_id` (attempt 1), started `start_order`th.
    fn record_started(s: &StateDir, job_id: &str, start_order: u64) {
        let spec = c3_proto::JobSpec::from_json(
            format!(r#"{{"job_id":"{job_id}","command":["true"]}}"#).as_bytes(),
        )
        .unwrap()
        .spec;
        let mut r: RunRecord = serde_json::from_value(serde_json::json!({
            "spec": spec, "workdir": "/w", "phase": "running", "pgid": null, "seq": 1,
            "state": null, "reason": null, "exit_code": null, "signal": null,
            "started_at": "2026-12-01T00:00:00Z",
        }))
        .unwrap();
        r.start_order = Some(start_order);
        s.ensure_attempt_dir(job_id, 1).unwrap();
        s.write_record(&r).unwrap();
    }

    /// A counter left empty (a kill between a truncate and a write) or unreadable goes on
    /// from the orders in the run records: read as 0, it handed out 1 again, below orders
    /// already recorded, and `recover` took the earlier job in a workdir for the later one.
    #[test]
    fn a_lost_start_order_goes_on_from_the_run_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        for (job, expected) in [("a", 1), ("b", 2), ("c", 3)] {
            let order = s.next_start_order().unwrap();
            assert_eq!(order, expected);
            record_started(&s, job, order);
        }
        let mut last = 3;
        for (job, lost) in [("d", ""), ("e", "garbage\n"), ("f", "\u{0}\u{0}")] {
            std::fs::write(s.root().join("start.order"), lost).unwrap();
            let order = s.next_start_order().unwrap();
            assert!(order > last, "{lost:?}: {order} after {last}");
            record_started(&s, job, order);
            last = order;
        }
        assert_eq!(s.next_start_order().unwrap(), last + 1);
    }

    /// The counter's lock held by another (a start stuck meanwhile) is waited out for a while,
    /// not for good.
    #[test]
    fn a_start_order_held_too_long_is_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        assert_eq!(s.next_start_order().unwrap(), 1);
        let held = lock_patiently(&s.root().join("start.order.lock")).unwrap();
        let started = std::time::Instant::now();
        assert!(s.next_start_order().is_err());
        assert!(started.elapsed() >= LOCK_PATIENCE);
        drop(held);
        assert_eq!(s.next_start_order().unwrap(), 2);
    }

    /// A record write that runs late (its task dropped by the stop cut, its blocking thread
    /// not) after the newer `done` one is skipped: it left `finishing` in run.json and made
    /// the reserve again.
    #[test]
    fn an_older_record_write_never_lands_over_a_newer_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path().join("state"));
        record_started(&s, "j", 1);
        let path = s.run_record_path("j", 1);
        let mut record = s.read_record(&path).unwrap();
        let writes = RecordWrites::default();
        record.phase = c3_proto::Phase::Finishing;
        writes.write(&s, &record, writes.ticket()).unwrap();
        assert!(s.record_reserve_path("j", 1).exists());
        let (older, newer) = (writes.ticket(), writes.ticket());
        let mut done = record.clone();
        done.seq += 1;
        done.phase = c3_proto::Phase::Done;
        writes.write(&s, &done, newer).unwrap();
        record.synced = Some(c3_proto::Synced {
            files: 1,
            bytes: 1,
            new_bytes: 1,
        });
        writes.write(&s, &record, older).unwrap();
        assert_eq!(s.read_record(&path).unwrap().phase, c3_proto::Phase::Done);
        assert!(
            !s.record_reserve_path("j", 1).exists(),
            "the reserve was made again"
        );
    }

    #[test]
    fn a_record_in_a_directory_others_may_write_is_not_listed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        for job in ["good", "open", "linked"] {
            let attempt = s.ensure_attempt_dir(job, 1).unwrap();
            std::fs::write(attempt.join("run.json"), "{}").unwrap();
        }
        let open = s.attempt_dir("open", 1);
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o707)).unwrap();
        let linked = s.run_record_path("linked", 1);
        std::fs::remove_file(&linked).unwrap();
        std::os::unix::fs::symlink(s.run_record_path("good", 1), &linked).unwrap();
        assert_eq!(s.all_records(), vec![s.run_record_path("good", 1)]);
    }
}
