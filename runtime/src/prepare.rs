//! Before anything of the job runs: its user, its workdir and output dirs (opened and created
//! through directory fds, never through a symlink), the store check, its input datasets.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use c3_proto::{JobSpec, RunRecord};

use crate::confine::{DirFd, HeldRoot, Owner};
use crate::context::AgentContext;
use crate::display::error_chain;
use crate::launch::{LaunchError, RunAs};
use crate::outcome::JobEnd;
use crate::pull::PullError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    State(#[from] crate::statedir::StateError),
    #[error(transparent)]
    User(#[from] LaunchError),
    #[error("cannot prepare the workdir {path}")]
    Workdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store {url} is not usable{hint}")]
    Store {
        url: String,
        /// What to look at when the cause is this node, not the store ("" if none known).
        hint: &'static str,
        #[source]
        source: StoreError,
    },
    #[error("input {reference} cannot be materialized at {mount}")]
    Dataset {
        reference: String,
        mount: String,
        #[source]
        source: DatasetError,
    },
    #[error("canceled before launch")]
    Canceled,
    #[error("{step} did not finish within {secs} s (a hung name service or network file system?)")]
    Stuck { step: &'static str, secs: u64 },
    #[error("a preparation task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The job's user is whom root's files belong to in the file store (root_squash's
    /// anonymous user): it may write the whole store, every job's blobs and manifests.
    #[error("the job's user `{name}` (uid {uid}) is the user root's files belong to in the file store {store} (its export's root_squash user): a job of it could rewrite every stored output; refusing to run it (give the export an `anonuid` no job runs as)")]
    StoreOwner {
        name: String,
        uid: u32,
        store: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// InvalidInput from [`DirFd::ensure_dir`]: a symlink or a file in the mount path (an
    /// earlier attempt's, in the workdir this one reuses), or a directory swapped in there.
    #[error("cannot create the mount directory")]
    Mount(#[source] std::io::Error),

    #[error(transparent)]
    Pull(#[from] PullError),

    #[error("not materialized within job.dataset_timeout_secs ({secs} s): the store is too slow")]
    TimedOut { secs: u64 },

    /// The source job's manifest names a project and this job's spec names none or another.
    /// A manifest that names no project is anyone's: the control plane decides who may chain
    /// on it.
    #[error("job {job_id} belongs to project {found:?}, not to {}", .project.as_ref().map_or("this job, which names no project".to_string(), |p| format!("this job's project {p:?}")))]
    OtherProject {
        job_id: String,
        project: Option<String>,
        found: String,
    },
}

impl DatasetError {
    /// Whether another attempt (later, or on another node) may succeed: the store or this
    /// node failed, not the reference. Every fault is taken as transient until proven
    /// permanent: only a job with no manifest, a manifest or blob the store holds wrong, a
    /// store that refuses this node, or a workdir the job itself blocked are not retried.
    pub fn is_retryable(&self) -> bool {
        match self {
            // What the job left in its workdir is there on the next attempt too.
            DatasetError::Mount(e) => {
                e.kind() != std::io::ErrorKind::InvalidInput && !crate::confine::OpenToOthers::is(e)
            }
            DatasetError::TimedOut { .. } => true,
            DatasetError::OtherProject { .. } => false,
            DatasetError::Pull(e) => match e {
                PullError::NoManifest { source, .. } | PullError::Blob { source, .. } => {
                    !source.is_permanent()
                }
                PullError::Write { .. }
                // The node's file system, not the dataset: another may keep them apart.
                | PullError::CaseFolded { .. }
                | PullError::NoRoom { .. }
                | PullError::Filling { .. }
                // Freed by the user, or another node's scratch, the quota may let it in.
                | PullError::OverQuota { .. }
                | PullError::Task { .. }
                | PullError::Stopped => true,
                PullError::BadManifest { .. }
                | PullError::WrongJob { .. }
                | PullError::WrongAttempt { .. }
                | PullError::Mismatch { .. }
                | PullError::Exists { .. }
                | PullError::Escapes { .. }
                | PullError::OpenToOthers { .. } => false,
            },
        }
    }
}

impl PrepareError {
    /// How the attempt ends when its preparation fails.
    pub fn end(&self) -> JobEnd {
        match self {
            PrepareError::Dataset { source, .. } => JobEnd::DatasetFailed {
                retryable: source.is_retryable(),
            },
            PrepareError::Canceled => JobEnd::Canceled,
            PrepareError::State(_)
            | PrepareError::User(_)
            | PrepareError::Workdir { .. }
            | PrepareError::Store { .. }
            | PrepareError::Stuck { .. }
            | PrepareError::Task(_)
            | PrepareError::StoreOwner { .. } => JobEnd::AgentFailed,
        }
    }
}

/// How long a look at the node may take (the user's lookup through NSS, opening the workdir
/// on a network file system) before the attempt is the node's error: on a healthy node either
/// takes well under a second; behind a hung sssd or NFS server it never ends.
pub const NODE_LOOK_DEADLINE: Duration = Duration::from_secs(120);

/// `look`, given up on a stop (`Canceled`) or after [`NODE_LOOK_DEADLINE`] (`Stuck`, the
/// node's error, retryable): it ran unbounded, and a stop was heard by nobody. The blocking
/// task under it is left to end, or hang, on its own.
pub async fn bounded<T>(
    step: &'static str,
    cancel: &CancellationToken,
    look: impl std::future::Future<Output = Result<T, PrepareError>>,
) -> Result<T, PrepareError> {
    tokio::select! {
        done = look => done,
        _ = cancel.cancelled() => Err(PrepareError::Canceled),
        _ = tokio::time::sleep(NODE_LOOK_DEADLINE) => Err(PrepareError::Stuck {
            step,
            secs: NODE_LOOK_DEADLINE.as_secs(),
        }),
    }
}

/// How long a run waits for the earlier attempts of its job in its workdir that another
/// process holds (`recover` or `resync` finishing one, its own agent still in its final
/// sync after a stop): a final sync of a large workdir takes minutes.
pub const EARLIER_ATTEMPT_WAIT: Duration = Duration::from_secs(15 * 60);

/// Waits until no earlier attempt of `record`'s job that ran in the same workdir is held by
/// another process (its lock is taken and given back at once), up to
/// [`EARLIER_ATTEMPT_WAIT`]. Called once this attempt's record is saved: a `recover` that
/// locks an earlier attempt from then on sees this one and leaves it alone. One already past
/// that look went on scanning the workdir this run is about to take: it stored this run's
/// files as the earlier attempt's, forgot what that one had listed (its blobs then gc's), and
/// read this run's result as its own.
pub async fn earlier_attempts_settled(
    ctx: &AgentContext,
    record: &RunRecord,
    cancel: &CancellationToken,
) -> Result<(), PrepareError> {
    let (job_id, attempt) = (&record.spec.job_id, record.spec.attempt);
    let mut earlier: Vec<u32> = ctx
        .state
        .attempt_numbers(job_id)
        .into_iter()
        .filter(|n| *n < attempt)
        .filter(|n| {
            ctx.state
                .read_record(&ctx.state.run_record_path(job_id, *n))
                .is_ok_and(|r| r.workdir == record.workdir)
        })
        .collect();
    earlier.sort_unstable();
    let until = tokio::time::Instant::now() + EARLIER_ATTEMPT_WAIT;
    for n in earlier {
        let mut said = false;
        // Free (taken and given back), gone, or a lock file that cannot be opened: nothing
        // holds the attempt that this look can tell.
        while let Err(crate::statedir::LockError::Held { holder, .. }) =
            crate::statedir::AttemptLock::acquire_existing(&ctx.state, job_id, n)
        {
            // This process's own brief look (its outbox flush asking whether the attempt
            // runs) is no other process's work.
            if !said && holder.trim() != std::process::id().to_string() {
                tracing::warn!(earlier_attempt = n, holder = %holder, wait_secs = EARLIER_ATTEMPT_WAIT.as_secs(),
                            "an earlier attempt of the job in the same workdir is being finished by another process (recover, resync, its own agent's final sync); waiting for it before the workdir is touched");
                said = true;
            }
            if tokio::time::Instant::now() >= until {
                return Err(PrepareError::Stuck {
                    step: "waiting for an earlier attempt in the same workdir to be finished",
                    secs: EARLIER_ATTEMPT_WAIT.as_secs(),
                });
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = cancel.cancelled() => return Err(PrepareError::Canceled),
            }
        }
    }
    Ok(())
}

/// The spec's user, looked up off the reactor (NSS may be slow: LDAP, sssd).
pub async fn user(spec: &JobSpec) -> Result<Option<RunAs>, PrepareError> {
    let Some(name) = spec.user.clone() else {
        return Ok(None);
    };
    let found = tokio::task::spawn_blocking(move || RunAs::lookup(&name))
        .await
        .map_err(PrepareError::Task)?;
    Ok(Some(found?))
}

/// Refuses a job of the user the file store's root_squash makes root
/// ([`crate::store::BlobStore::squashed_uid`]), before anything of it runs.
pub fn not_the_store_owner(
    user: &RunAs,
    store: &crate::store::BlobStore,
) -> Result<(), PrepareError> {
    if store.squashed_uid() != Some(user.uid) {
        return Ok(());
    }
    Err(PrepareError::StoreOwner {
        name: user.name.clone(),
        uid: user.uid,
        store: store.shown_url(),
    })
}

/// Opens the workdir from a trusted root and creates the output dirs and `.c3` in it, all
/// relative to directory fds: a symlink a job (or its earlier attempt) planted is never
/// followed, and only directories created here are given to the job's user. The workdir is
/// held open for the attempt: every later open of it by path finds this directory while the
/// [`HeldRoot`] lives, wherever it was renamed to. Off the reactor.
pub async fn workdir(
    ctx: &AgentContext,
    spec: &JobSpec,
    workdir: &Path,
    owner: Owner,
) -> Result<(DirFd, HeldRoot), PrepareError> {
    let roots = job_roots(ctx);
    let (path, dirs) = (workdir.to_path_buf(), spec.collected_dirs());
    let opened = tokio::task::spawn_blocking(move || {
        crate::fault::blocking_pause("workdir-hangs", Duration::from_secs(600));
        open_workdir(&roots, &path, &dirs, owner)
    })
    .await
    .map_err(PrepareError::Task)?;
    opened.map_err(|source| PrepareError::Workdir {
        path: workdir.to_path_buf(),
        source,
    })
}

fn open_workdir(
    roots: &[PathBuf],
    workdir: &Path,
    dirs: &[String],
    owner: Owner,
) -> std::io::Result<(DirFd, HeldRoot)> {
    let root = root_of(roots, workdir);
    let vet = vetting(roots, workdir, owner);
    let fd = match root {
        Some(root) => {
            if !root.exists() {
                // What is missing above it is made traversable, not listable (0711).
                if let Some(parent) = root.parent() {
                    crate::statedir::make_dirs(parent, 0o711)?;
                }
                std::fs::create_dir_all(root)?;
                std::fs::set_permissions(
                    root,
                    std::os::unix::fs::PermissionsExt::from_mode(0o711),
                )?;
            }
            let rel = workdir.strip_prefix(root).expect("checked above");
            // Parents of the workdir stay the agent's (traversable, not listable); the workdir
            // itself, when created here, is the job's and private. One that exists must be
            // root's or the job user's alone: root keeps `.c3` in it and collects from it.
            DirFd::open_trusted(root)?.ensure_dir_vetted(
                rel,
                |last| {
                    if last {
                        (0o700, owner)
                    } else {
                        (0o711, None)
                    }
                },
                |name, st, last, held| vet_existing(workdir, name, (st, held), last, vet),
            )?
        }
        // A quick local run: the current dir of whoever started the agent.
        None => {
            std::fs::create_dir_all(workdir)?;
            DirFd::open(workdir)?
        }
    };
    // Every later open of the workdir by path must find this directory: while the attempt
    // runs, without a look at the path (a member of the team's group-writable directory above
    // it may rename it there, and the job goes on in it); after, the way it was found here.
    let held = fd.hold(workdir, root.map(PathBuf::as_path))?;
    for dir in dirs {
        ensure_output_dir(&fd, Path::new(dir), owner, vet)
            .map_err(|e| std::io::Error::new(e.kind(), format!("output dir `{dir}`: {e}")))?;
    }
    // `.c3` is the agent's: whatever a job put in its place is replaced. (`vet` owns what is
    // made: for a root job root, who makes it.)
    let c3 = fd.replace_with_dir(OsStr::new(".c3"), job_dir_mode(vet), vet)?;
    // A result left by an earlier attempt in the same workdir is not this attempt's. A
    // directory made there is the job's (it failed every later attempt before its launch):
    // moved aside, never removed as root.
    let result = OsStr::new("result.json");
    match c3.remove_file(result) {
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
            let aside = crate::confine::aside_name(".result.json-aside-");
            c3.rename(result, OsStr::new(&aside))?;
        }
        done => done?,
    }
    Ok((fd, held))
}

/// Makes the output dir `rel` below the workdir. What an earlier attempt's job left in the
/// way (`rm -r artifacts && ln -s /etc artifacts`, a file in its place; the job's user's) is
/// its own doing and is there on every later attempt: refused, it failed each of them before
/// launch as the node's error (AGENT_ERROR, retryable), for ever. It is moved aside in its
/// own directory (the link itself, never its target; a file kept, never removed as root),
/// as `.c3` is replaced and a result left a directory is moved aside.
fn ensure_output_dir(
    workdir: &DirFd,
    rel: &Path,
    owner: Owner,
    vet: Owner,
) -> std::io::Result<DirFd> {
    let mut dir = workdir.try_clone()?;
    for part in rel.components() {
        let std::path::Component::Normal(name) = part else {
            // `ensure_dir` says what is wrong with the path.
            return workdir.ensure_dir(rel, job_dir_mode(owner), owner);
        };
        match (dir.stat(name), owner) {
            // Only what the job's user made: an operator's own `artifacts -> /big/disk` (a
            // quick run in their dir, a scheduler's link in a root-owned workdir) is refused
            // by name as before, never moved out of the way.
            (Ok(st), Some((uid, _))) if !crate::confine::is_dir(&st) && st.st_uid == uid => {
                // Of a fixed length: a name near NAME_MAX with a suffix would not fit.
                let aside = crate::confine::aside_name(".c3-aside-");
                dir.rename(name, OsStr::new(&aside))?;
                tracing::warn!(
                    path = %rel.display(),
                    aside = %aside,
                    "something of the job's other than a directory was where an output dir goes (an earlier attempt's?); moved aside"
                );
            }
            _ => {}
        }
        // Another user's directory there (another tenant's job ran in this root-owned
        // workdir before) is refused: the job would collect and write into its files.
        dir = dir.ensure_own_dir(Path::new(name), job_dir_mode(vet), vet)?;
    }
    Ok(dir)
}

/// The mode of a directory the agent makes in the workdir (output dirs, `.c3`, dataset
/// mounts), given whose the job's directories are ([`vetting`]): a job with a user, or a root
/// job below the jobs root, gets them private (0700; root reads them anyway), for its workdir
/// may be one others can search (a scheduler's root-owned 0755 one), and its files (a
/// dataset: another project's) are no other tenant's to read. A quick run in a user's own
/// dir keeps 0755, what that user's shell would make.
fn job_dir_mode(vet: Owner) -> u32 {
    if vet.is_some() {
        0o700
    } else {
        0o755
    }
}

/// For a job with a user: a directory on the way to its workdir (the workdir included) that
/// existed already must be root's or the job user's, and not writable by every user (unless
/// sticky). Another tenant's workdir named in a spec would otherwise be used as this job's:
/// root keeps `.c3` there, removes its result, and collects its files into this job's
/// manifest. A directory above the workdir may be its group's to write: a team's `root:team
/// 2775` directory under `jobs_root` is a common layout, and a directory a member made in it
/// is refused as theirs. The workdir itself may be only root's group's: a member could make
/// an output dir or `.c3` there before the job starts, or plant files root collects as this
/// job's. `owner` is root's own for a job without a user under a root agent (it runs as
/// root); `None` for one under a non-root agent, whose user may do it all anyway.
fn vet_existing(
    workdir: &Path,
    name: &OsStr,
    (st, held): (&nix::sys::stat::FileStat, &std::os::fd::OwnedFd),
    last: bool,
    owner: Owner,
) -> std::io::Result<()> {
    let Some((job_uid, _)) = owner else {
        return Ok(());
    };
    let agent = nix::unistd::geteuid().as_raw();
    let owned = st.st_uid == 0 || st.st_uid == agent || st.st_uid == job_uid;
    // Root's group writing is root writing (a scheduler's `root:root 0775`, umask 002).
    let writers = if last && st.st_gid != 0 { 0o022 } else { 0o002 };
    let sticky = st.st_mode & libc::S_ISVTX != 0;
    // A named entry lets others write as the mode bits do (a team dir's default ACL
    // `d:g:team:rwx` on a `root:root` workdir, shown as 0775 by its mask): another member
    // could swap `artifacts` or `.c3` for their own while the job runs. One not understood
    // (or unread) is taken so.
    let named = last
        && !sticky
        && match crate::acl::of(held) {
            Ok(None) => false,
            Ok(Some(acl)) => acl.named_others_may(0o3, &[0, agent, job_uid], &[0]),
            // Said as what it is: an NFS blip is no ACL that lets others in.
            Err(crate::acl::AclError::Read(e)) => {
                return Err(std::io::Error::new(
                    e.kind(),
                    format!(
                        "`{}` (in {}): cannot read its ACL: {e}",
                        name.to_string_lossy(),
                        workdir.display()
                    ),
                ))
            }
            Err(_) => true,
        };
    let shared = (st.st_mode & writers != 0 && !sticky) || named;
    if owned && !shared {
        return Ok(());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!(
            "`{}` (in {}) exists and is owned by uid {} with mode {:o}{}: only a directory of root's or the job user's (uid {job_uid}) that others may not write is used; refusing another user's",
            name.to_string_lossy(),
            workdir.display(),
            st.st_uid,
            st.st_mode & 0o7777,
            if named { " and an ACL that lets others write in it" } else { "" }
        ),
    ))
}

/// The trusted root (`jobs_root`, the state dir's jobs dir) the workdir lies below, if any.
/// The root's own path may hold symlinks (`/scratch -> /mnt/scratch`): the operator's choice.
/// Below it the job may write, and no symlink is followed.
/// The trusted roots a job's workdir may lie below.
fn job_roots(ctx: &AgentContext) -> [PathBuf; 2] {
    [ctx.jobs_root.clone(), ctx.state.jobs_dir()]
}

/// Whose existing directories (and files, for a dataset) root may use for this job: the job
/// user's; for a job without a user under a root agent in a workdir below `jobs_root`, root's
/// (it runs as root): another user's `.c3` in a reused root-owned workdir was kept, and that
/// user could write the root job's result while it ran, or plant files in its output; their
/// `data/` got a root job's dataset, theirs to read and to swap under it. Not for a quick run
/// in someone's own tree, whose owner may swap it all anyway. What the agent makes for such a
/// root job is private too ([`job_dir_mode`]).
fn vetting(roots: &[PathBuf], workdir: &Path, owner: Owner) -> Owner {
    owner.or_else(|| {
        (root_of(roots, workdir).is_some() && nix::unistd::geteuid().is_root()).then_some((0, 0))
    })
}

fn root_of<'a>(roots: &'a [PathBuf], workdir: &Path) -> Option<&'a PathBuf> {
    roots
        .iter()
        .find(|r| workdir.starts_with(r) && workdir != r.as_path())
}

/// Before a later agent (`recover`, `resync`) touches a recorded attempt's workdir, which it
/// knows by path only: opens it as the attempt did (below its root with no symlink in any
/// component; a sidecar's parent from `/` with none at all), and requires the directory the
/// record pinned there. Every later open of it by path (scan, uploads, the result file) then
/// finds that directory, or, when this check failed, is refused: the attempt's files are
/// counted as not stored (the way a vanished workdir's are), and another tenant's tree that
/// the job swapped in above its workdir is never read. Off the reactor, and given up on (the
/// workdir then refused) when `given_up` is cancelled or after [`NODE_LOOK_DEADLINE`]: on a
/// hung NFS or FUSE mount the open never ends, and `recover` heard neither its budget nor a
/// SIGTERM.
pub async fn reopen_recorded_workdir(
    ctx: &AgentContext,
    record: &RunRecord,
    given_up: &CancellationToken,
) {
    let roots = [ctx.jobs_root.clone(), ctx.state.jobs_dir()];
    let workdir = PathBuf::from(&record.workdir);
    let (sidecar, pin) = (record.watched_dirs.is_some(), record.workdir_pin);
    // A device number holds for one boot only (NFS, Lustre, overlay, even NVMe partitions and
    // LVM get theirs at mount, probe or activation): after a reboot, the inode is what is left
    // to compare, and `recover` at boot is the common case.
    let same_boot = record
        .agent_boot_id
        .as_ref()
        .is_some_and(|b| crate::procfs::boot_id().as_ref() == Some(b));
    let path = workdir.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let root = recorded_root(&roots, &path, sidecar);
        let fd = match root {
            Some(root) => {
                let rel = path.strip_prefix(root).map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an absolute path")
                })?;
                crate::confine::below_root(root, rel, |root, rel| root.open_dir(rel))?
            }
            // A quick local run's workdir: a path its operator gave; the pin is all to check.
            None => DirFd::open(&path)?,
        };
        let found = fd.pin_id().ok();
        match pin.map_or(PinCheck::Same, |pin| pin_check(found, pin, same_boot)) {
            PinCheck::Same => {}
            // Another directory in its place: the attempt's, wherever it went, is found by
            // no later look either.
            PinCheck::Other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "not the directory the attempt used (removed and made again, or a directory above it was swapped since)",
                ))
            }
            // Refused, but not for good: taken for another directory, an NFS mount that
            // autofs remounted (a new device number) or a failed fstat left the attempt's
            // files unstored for good, and retention removed them.
            PinCheck::Unsure => {
                return Err(std::io::Error::other(
                    "not known to be the directory the attempt used (its device number changed: remounted? or it could not be looked at); looked at again later",
                ))
            }
        }
        fd.pin_later(&path, root)
    });
    let checked = tokio::select! {
        checked = checked => checked
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .map(crate::confine::PendingPin::record),
        () = given_up.cancelled() => Err(std::io::Error::new(
            std::io::ErrorKind::Interrupted,
            "a stop (a signal, recover's budget) came before it opened",
        )),
        () = tokio::time::sleep(NODE_LOOK_DEADLINE) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "it did not open within {} s (a hung network file system?)",
                NODE_LOOK_DEADLINE.as_secs()
            ),
        )),
    };
    if let Err(e) = checked {
        // Gone (or another in its place), its files are unstorable for good: taken for a
        // blip, a done attempt was taken up again by every hourly `recover`, each sending
        // its status again, and retention kept the job for ever. Not in the first hour after
        // a reboot: the file system that holds it may not be mounted yet (`recover` at boot,
        // before a network mount or a late disk).
        let gone = e.kind() == std::io::ErrorKind::NotFound
            && (same_boot || crate::procfs::uptime() > MOUNTS_SETTLED);
        tracing::warn!(workdir = %workdir.display(), error = %e, gone, "the recorded workdir is refused; its files are left unstored");
        DirFd::refuse_as(&workdir, e.to_string(), gone);
    }
}

/// How long after a boot a workdir not found may still be on a file system not mounted yet.
const MOUNTS_SETTLED: Duration = Duration::from_secs(3600);

/// What a recorded workdir found is, against its pin.
#[derive(Debug, PartialEq, Eq)]
enum PinCheck {
    /// The pinned directory.
    Same,
    /// Another one: its inode differs.
    Other,
    /// Not known: its identity could not be read, or only its device differs on the boot
    /// that pinned it (a remount renumbers it; after a reboot only the inode counts).
    Unsure,
}

fn pin_check(
    found: Option<c3_proto::record::DirPin>,
    pin: c3_proto::record::DirPin,
    same_boot: bool,
) -> PinCheck {
    match found {
        None => PinCheck::Unsure,
        Some(f) if f.ino != pin.ino => PinCheck::Other,
        Some(f) if f.dev != pin.dev && same_boot => PinCheck::Unsure,
        Some(_) => PinCheck::Same,
    }
}

/// The trusted root a recorded workdir is reached below with no symlink: `/` for a
/// sidecar's parent, else its `jobs_root`; none for a quick local run's workdir.
fn recorded_root<'a>(roots: &'a [PathBuf], workdir: &Path, sidecar: bool) -> Option<&'a Path> {
    if sidecar {
        return Some(Path::new("/"));
    }
    root_of(roots, workdir).map(PathBuf::as_path)
}

/// Proves the store is writable before any GPU time is spent. A permanent failure is an
/// error; a transient one (or no answer in time) is a warning, and the job launches.
pub async fn store_check(ctx: &AgentContext) -> Result<Option<String>, PrepareError> {
    match tokio::time::timeout(ctx.preflight_timeout, ctx.store.preflight()).await {
        Ok(Ok(())) => {
            tracing::debug!(store = %ctx.store.shown_url(), "store is writable");
            Ok(None)
        }
        Ok(Err(e)) if e.is_permanent() => Err(PrepareError::Store {
            url: ctx.store.shown_url(),
            hint: e.node_hint(),
            source: e,
        }),
        Ok(Err(e)) => Ok(Some(format!(
            "store check failed, launching anyway (uploads retry later){}: {}",
            e.node_hint(),
            error_chain(&e)
        ))),
        Err(_) => Ok(Some(format!(
            "store check did not answer within {:?}; launching anyway",
            ctx.preflight_timeout
        ))),
    }
}

/// How long a job's datasets may take to arrive, by default: 10 TB at 1 GB/s, with room.
pub const DEFAULT_DATASET_TIMEOUT_SECS: u64 = 6 * 60 * 60;

/// Copies each input dataset (another job's files) below the workdir: a private copy the
/// job may modify freely, created as the job's user, never written through a symlink.
pub async fn datasets(
    ctx: &AgentContext,
    spec: &JobSpec,
    workdir_fd: &DirFd,
    workdir: &Path,
    owner: Owner,
    cancel: &CancellationToken,
) -> Result<Vec<String>, PrepareError> {
    let mut warnings = Vec::new();
    // A store that trickles a byte now and then never fails a request: the node's GPUs would
    // wait in "preparing" for as long as it likes.
    let limit = ctx.dataset_timeout;
    let deadline = tokio::time::Instant::now() + limit;
    for dataset in &spec.datasets {
        let source = dataset.source_job().expect("validated with the spec");
        // Given up (a stop, the timeout), the pull is told and its writers waited for: a
        // download dropped mid-write leaves its writer alone, and its named temp file (no
        // O_TMPFILE: NFS) stayed in the mount once the agent exited. A pull that does not
        // wind down in time (a hung store call before it) is dropped all the same.
        // Its own token, told only once the stop or the timeout is decided here: a child of
        // `cancel`, the pull's inner waits heard the stop first and a canceled job was
        // reported DATASET_ERROR (retryable, so run again).
        let give_up = CancellationToken::new();
        let work = materialize(
            ctx,
            spec,
            source,
            workdir_fd,
            workdir,
            &dataset.mount,
            owner,
            &give_up,
        );
        tokio::pin!(work);
        let ended = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            _ = tokio::time::sleep_until(deadline) => None,
            r = &mut work => Some(r),
        };
        let pulled = match ended {
            Some(r) => r,
            None => {
                give_up.cancel();
                // A stop (now or during the wind-down) waits a few seconds at most: its
                // deadline (25 s by default) holds the final sync and the status too.
                tokio::select! {
                    _ = tokio::time::timeout(WIND_DOWN, &mut work) => {}
                    () = async {
                        cancel.cancelled().await;
                        tokio::time::sleep(STOPPED_WIND_DOWN).await;
                    } => {}
                }
                if cancel.is_cancelled() {
                    return Err(PrepareError::Canceled);
                }
                Err(DatasetError::TimedOut {
                    secs: limit.as_secs(),
                })
            }
        };
        match pulled {
            Ok((summary, complete)) => {
                tracing::info!(dataset = %dataset.reference, mount = %dataset.mount, files = summary.files, bytes = summary.bytes, complete, "input materialized");
                if !complete {
                    // Resuming from a crashed or preempted job is what this is for; a job
                    // that chained on one still running should know it got a snapshot.
                    let w = format!(
                        "dataset {} is an in-progress manifest (its job is running, or ended without finishing it): {} files as stored so far",
                        dataset.reference, summary.files
                    );
                    warnings.push(w);
                }
            }
            Err(source) => {
                return Err(PrepareError::Dataset {
                    reference: dataset.reference.clone(),
                    mount: dataset.mount.clone(),
                    source,
                })
            }
        }
    }
    Ok(warnings)
}

/// How long a dataset pull given up on may take to wind down (its writers' temp files).
const WIND_DOWN: std::time::Duration =
    crate::pull::WRITERS_WAIT.saturating_add(std::time::Duration::from_secs(2));
/// As [`WIND_DOWN`], on a stop: a writer that ends at once (its download dropped) removes its
/// temp file in far less; one blocked in a write on a hung mount is left.
const STOPPED_WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

#[allow(clippy::too_many_arguments)]
async fn materialize(
    ctx: &AgentContext,
    spec: &JobSpec,
    job_id: &str,
    workdir_fd: &DirFd,
    workdir: &Path,
    mount: &str,
    owner: Owner,
    stop: &CancellationToken,
) -> Result<(crate::pull::PullSummary, bool), DatasetError> {
    // Off the reactor, where a dataset's timeout and a cancel are heard (a hung network
    // file system holds the call).
    let (at, name) = (
        workdir_fd.try_clone().map_err(DatasetError::Mount)?,
        mount.to_string(),
    );
    let vet = vetting(&job_roots(ctx), workdir, owner);
    let mode = job_dir_mode(vet);
    let stopped = || DatasetError::from(crate::pull::PullError::Stopped);
    let dir =
        tokio::task::spawn_blocking(move || at.ensure_dataset_dir(Path::new(&name), mode, vet));
    let dir = tokio::select! {
        dir = dir => dir,
        () = stop.cancelled() => return Err(stopped()),
    };
    let dir = dir
        .map_err(|e| DatasetError::Mount(std::io::Error::other(e)))?
        .map_err(DatasetError::Mount)?;
    let manifest = tokio::select! {
        m = crate::pull::read_manifest(&ctx.store, job_id, ctx.max_manifest_bytes) => m?,
        () = stop.cancelled() => return Err(stopped()),
    };
    // The agent holds the store's keys for every tenant: a spec that names another project's
    // job, or none, would otherwise get its files. A manifest that names no project tells
    // nothing: the control plane decides who may chain on it.
    if let Some(found) = &manifest.project {
        if spec.project.as_ref() != Some(found) {
            return Err(DatasetError::OtherProject {
                job_id: job_id.to_string(),
                project: spec.project.clone(),
                found: found.clone(),
            });
        }
    }
    // A dataset is the earlier job's files, as they are: what an earlier attempt left is replaced.
    let files: Arc<[c3_proto::FileEntry]> = manifest.files.into();
    let pulled = crate::pull::pull_into(
        &ctx.store,
        files.clone(),
        dir,
        &workdir.join(mount),
        (owner, vet),
        true,
        stop,
    )
    .await?;
    // Those blobs are in the store: a job that writes the same files sends nothing again.
    ctx.known.extend(
        files
            .iter()
            .filter_map(|f| crate::known::from_hex(&f.sha256)),
    );
    Ok((pulled, manifest.complete))
}

#[cfg(test)]
mod tests {
    /// A look at the node that never ends is the node's error (retryable) once its deadline
    /// has passed, and a stop ends it at once.
    #[tokio::test(start_paused = true)]
    async fn a_look_at_the_node_that_never_ends_is_given_up() {
        let cancel = CancellationToken::new();
        let never = std::future::pending::<Result<(), PrepareError>>();
        let started = tokio::time::Instant::now();
        let e = super::bounded("looking", &cancel, never).await.unwrap_err();
        assert!(matches!(e, PrepareError::Stuck { .. }), "{e}");
        assert!(matches!(e.end(), JobEnd::AgentFailed));
        assert_eq!(started.elapsed(), super::NODE_LOOK_DEADLINE);
        cancel.cancel();
        let never = std::future::pending::<Result<(), PrepareError>>();
        let e = super::bounded("looking", &cancel, never).await.unwrap_err();
        assert!(matches!(e, PrepareError::Canceled));
    }

    use super::*;
    use c3_proto::record::DirPin;

    /// An existing workdir whose ACL lets a team write in it (a `root:root` dir shown 0775
    /// by its mask) is refused as one its group may write is: another member could swap its
    /// `artifacts` or `.c3` while the job runs. Without the entry it is used.
    #[test]
    fn a_workdir_an_acl_lets_others_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let w = top.path().join("w");
        std::fs::create_dir(&w).unwrap();
        std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
        let held: std::os::fd::OwnedFd = std::fs::File::open(&w).unwrap().into();
        let st = nix::sys::stat::fstat(&held).unwrap();
        let owner = Some((st.st_uid.max(1), 4242));
        let vet = |held: &std::os::fd::OwnedFd| {
            let st = nix::sys::stat::fstat(held).unwrap();
            vet_existing(top.path(), OsStr::new("w"), (&st, held), true, owner)
        };
        assert!(vet(&held).is_ok());
        if !crate::acl::tests::grant_group_rwx(&held, 4100) {
            crate::testskip::skip("no POSIX ACLs here");
            return;
        }
        let e = vet(&held).unwrap_err();
        assert!(e.to_string().contains("ACL"), "{e}");
    }

    /// A job of the user root_squash makes root in the file store (it may write every
    /// stored output) is refused before it runs, as the node's error; any other user runs.
    #[test]
    fn a_job_of_the_store_squash_user_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let path = top.path().join("store");
        std::fs::create_dir(&path).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
        crate::store::tests::say_squashed(&path, 65534);
        let store = crate::store::BlobStore::open(&crate::store::StoreConfig::for_tests(&format!(
            "file://{}",
            path.display()
        )))
        .unwrap();
        let user = |uid| RunAs {
            name: "nobody".into(),
            uid,
            gid: 65534,
            groups: vec![65534],
            home: "/".into(),
            shell: "".into(),
        };
        let e = not_the_store_owner(&user(65534), &store).unwrap_err();
        assert!(
            matches!(e, PrepareError::StoreOwner { uid: 65534, .. }),
            "{e}"
        );
        assert!(matches!(e.end(), JobEnd::AgentFailed));
        assert!(e.to_string().contains("root_squash"), "{e}");
        assert!(not_the_store_owner(&user(1000), &store).is_ok());
        assert!(not_the_store_owner(&user(65534), &crate::store::BlobStore::in_memory()).is_ok());
    }

    #[test]
    fn a_pin_survives_a_reboot_that_renumbered_the_device_but_never_another_inode() {
        let pin = DirPin { dev: 2049, ino: 77 };
        let renumbered = Some(DirPin { dev: 66, ino: 77 });
        assert_eq!(pin_check(Some(pin), pin, true), PinCheck::Same);
        assert_eq!(
            pin_check(renumbered, pin, false),
            PinCheck::Same,
            "after a reboot: the inode"
        );
        for same_boot in [true, false] {
            let other = Some(DirPin { dev: 2049, ino: 78 });
            assert_eq!(pin_check(other, pin, same_boot), PinCheck::Other);
        }
    }

    /// A remount on the same boot (autofs expired an NFS jobs root and mounted it again: a
    /// new device number) or an fstat that failed is not another directory: refused for now,
    /// looked at again. Taken for another one, the attempt's files counted as unstorable for
    /// good (its UPLOAD_ERROR final, retention free to remove them).
    #[test]
    fn a_pin_not_known_to_differ_refuses_the_workdir_for_now_only() {
        let pin = DirPin { dev: 2049, ino: 77 };
        let renumbered = Some(DirPin { dev: 66, ino: 77 });
        assert_eq!(pin_check(renumbered, pin, true), PinCheck::Unsure);
        assert_eq!(pin_check(None, pin, true), PinCheck::Unsure);
        assert_eq!(pin_check(None, pin, false), PinCheck::Unsure);
    }
}
