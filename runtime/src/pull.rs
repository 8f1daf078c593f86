//! Downloading a job's files per its manifest, each verified against its sha256
//! (`c3-agent pull`, and inputs materialized for job chaining).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};
use tokio_util::sync::CancellationToken;

use c3_proto::{FileEntry, Manifest, ManifestError};

use crate::confine::{DirFd, Owner};
use crate::digest::Sha256Hasher;
use crate::store::{manifest_key, BlobStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("job {job_id}: {}", manifest_unread(.source))]
    NoManifest {
        job_id: String,
        #[source]
        source: StoreError,
    },
    #[error("manifest of job {job_id} is unusable")]
    BadManifest {
        job_id: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot fetch {path}")]
    Blob {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} needs {} for {files} files and {dirs} directories and {} is free there (or too few inodes beside a reserve)", .path.display(), crate::display::human_bytes(*.needed), crate::display::human_bytes(*.free))]
    NoRoom {
        path: PathBuf,
        needed: u64,
        files: usize,
        dirs: u64,
        free: u64,
    },
    #[error("{} still needs {} and {} is free there (what a user may write): stopped before the file system fills", .path.display(), crate::display::human_bytes(*.needed), crate::display::human_bytes(*.free))]
    Filling {
        path: PathBuf,
        needed: u64,
        free: u64,
    },
    /// Root passes quotas (and so does the chown that gives the user its files): the job's
    /// user's hard limit is measured here, or one tenant fills a shared file system.
    #[error("{} {}, and the disk quota of {} there leaves {} and {}: stopped before the user's hard limit", .path.display(), needs_text(*.needed, *.inodes), .left.whose, .left.bytes_text(), .left.inodes_text())]
    OverQuota {
        path: PathBuf,
        needed: u64,
        inodes: u64,
        left: crate::quota::Left,
    },
    #[error("{} exists and differs from the job's file; `--force` overwrites it", .path.display())]
    Exists { path: PathBuf },
    #[error("{path}: content does not match the manifest (sha256 {actual}, expected {expected})")]
    Mismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: a symlink (or a file) in the destination is in the way; refusing to write through it")]
    Escapes { path: String },
    /// A directory on the way that other users may write (what the workdir holds: not
    /// retried, it is there on every attempt).
    #[error("{path}: {source}")]
    OpenToOthers {
        path: String,
        source: std::io::Error,
    },
    /// Two entries whose names differ only in case landed on one file: the destination
    /// folds case (CIFS, an ext4 or tmpfs casefold directory), and each verified its own
    /// bytes before the last rename put one over the other.
    #[error("{a} and {b} differ only in case, and the destination folds case (a case-insensitive file system): one path would hold the other's bytes")]
    CaseFolded { a: String, b: String },
    #[error("download task for {path} failed")]
    Task { path: String },
    /// Given up (a signal, a dataset's timeout), its writers waited for.
    #[error("the pull was stopped before it was done")]
    Stopped,
    #[error("the store's manifest for job {job_id} is job {found}'s")]
    WrongJob { job_id: String, found: String },
    #[error("the store's manifest for job {job_id} attempt {attempt} is attempt {found}'s")]
    WrongAttempt {
        job_id: String,
        attempt: u32,
        found: u32,
    },
}

/// What a pull still needs, in words: a download under way needs no new inode.
fn needs_text(needed: u64, inodes: u64) -> String {
    let bytes = crate::display::human_bytes(needed);
    if inodes == 0 {
        format!("still needs {bytes}")
    } else {
        format!("needs {bytes} and {inodes} inodes")
    }
}

/// Why a job's manifest was not read, in words: "no manifest" only when the store said so (a
/// dataset's status began with a false cause for a timeout, a denial or a manifest too large).
fn manifest_unread(e: &StoreError) -> &'static str {
    match e {
        StoreError::Op {
            source: object_store::Error::NotFound { .. },
            ..
        } => "no manifest in the store",
        StoreError::TooLarge { .. } => "its manifest is larger than a manifest may be",
        StoreError::Op {
            source:
                object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. },
            ..
        } => "the store refuses to read its manifest",
        _ => "its manifest could not be read from the store",
    }
}

impl PullError {
    /// The job has no manifest at all (as opposed to a store that could not be read).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            PullError::NoManifest {
                source: StoreError::Op {
                    source: object_store::Error::NotFound { .. },
                    ..
                },
                ..
            }
        )
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PullSummary {
    pub files: u64,
    pub bytes: u64,
}

/// Largest manifest the agent reads unless configured otherwise.
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 256 * 1024 * 1024;

/// What an ordinary user may still write on the file system of `fs` (root's reserved
/// blocks left out): the room a pull as root measures itself against.
fn user_free(fs: &nix::sys::statvfs::Statvfs) -> u64 {
    fs.blocks_available().saturating_mul(fs.fragment_size())
}

/// Whether `file` has no hole before `size`: a sparse file of the entry's size and mtime (a
/// job's stand-in for its dataset copy) is not the copy, and writing the copy takes room.
/// Asked of the holes, not of the blocks: on a compressing file system (ZFS, btrfs) a copy
/// written out takes fewer blocks than its size. One that cannot say counts as no copy.
fn no_hole_before(file: &std::fs::File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    // An empty file has none, and SEEK_HOLE at its end is ENXIO.
    if size == 0 {
        return true;
    }
    // SAFETY: lseek on an fd borrowed for the call; no memory is touched.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    hole >= 0 && hole as u64 >= size
}

/// Reads a job's manifest; one larger than `max_bytes` is refused before it is parsed.
pub async fn read_manifest(
    store: &BlobStore,
    job_id: &str,
    max_bytes: u64,
) -> Result<Manifest, PullError> {
    read_manifest_of(store, job_id, None, max_bytes, Places::Checked).await
}

/// Whether a manifest read is checked for one place per path ([`Manifest::check_places`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Places {
    /// For what writes its files out (`pull`, datasets): `a` and `a/b` both listed, or a
    /// path twice, cannot both be written.
    Checked,
    /// For what only shows or reads entries (`ls`, `logs`): an older agent's manifest with
    /// such a pair is still read, as `gc` reads it.
    Unchecked,
}

/// [`read_manifest`] of one attempt's manifest (`Some`), or of the job's latest (`None`).
pub async fn read_manifest_of(
    store: &BlobStore,
    job_id: &str,
    attempt: Option<u32>,
    max_bytes: u64,
    places: Places,
) -> Result<Manifest, PullError> {
    let key = match attempt {
        Some(n) => crate::store::attempt_manifest_key(job_id, n),
        None => manifest_key(job_id),
    };
    let bytes = store
        .get_bytes_capped_listed(&key, max_bytes)
        .await
        .map_err(|source| PullError::NoManifest {
            job_id: job_id.into(),
            source,
        })?;
    // Up to 256 MiB of JSON: parsed off the reactor, where a dataset's timeout and a cancel
    // are heard.
    let manifest = tokio::task::spawn_blocking(move || {
        Manifest::from_json(&bytes).and_then(|m| match places {
            Places::Checked => m.check_places().map(|()| m),
            Places::Unchecked => Ok(m),
        })
    })
    .await
    .map_err(|_| PullError::Task { path: key })?
    .map_err(|source| PullError::BadManifest {
        job_id: job_id.into(),
        source,
    })?;
    // A key swapped or misrouted (a cache, a gateway, a copy) would hand this job another
    // job's files, perhaps another tenant's.
    if manifest.job_id != job_id {
        return Err(PullError::WrongJob {
            job_id: job_id.into(),
            found: manifest.job_id,
        });
    }
    if let Some(n) = attempt.filter(|n| *n != manifest.attempt) {
        return Err(PullError::WrongAttempt {
            job_id: job_id.into(),
            attempt: n,
            found: manifest.attempt,
        });
    }
    Ok(manifest)
}

/// Writes every file of `manifest` below the open directory `root` (`shown` is its path, for
/// messages); stops at the first error. A file already there with other content is an error
/// unless `force` (one with the same content is left as it is).
pub async fn pull(
    store: &BlobStore,
    manifest: &Manifest,
    root: DirFd,
    shown: &Path,
    force: bool,
    stop: &CancellationToken,
) -> Result<PullSummary, PullError> {
    pull_into(
        store,
        manifest.files.clone().into(),
        root,
        shown,
        (None, None),
        force,
        stop,
    )
    .await
}

/// The job's logs as entries to pull (`.c3/stdout.log`, `.c3/stderr.log`: `.c3` is never
/// an output dir, so they cannot collide with the job's files).
pub fn log_entries(manifest: &Manifest) -> Vec<FileEntry> {
    let Some(logs) = &manifest.logs else {
        return Vec::new();
    };
    [("stdout", &logs.stdout), ("stderr", &logs.stderr)]
        .into_iter()
        .map(|(name, log)| FileEntry {
            path: format!(".c3/{name}.log"),
            path_b64: None,
            size: log.size,
            sha256: log.sha256.clone(),
            blake3: String::new(),
            mode: 0o644,
            mtime_ns: 0,
        })
        .collect()
}

/// Writes every file of `manifest` below the open directory `root` (`shown` is its path,
/// for messages). Directories and files are created relative to directory fds, never
/// through a symlink. Of `(owner, vet)`: with `owner`, what is created belongs to that
/// uid/gid; with `vet` (`owner`, or root for a root job below the jobs root), a directory or
/// file already there is used only if that user's (a directory: or root's), as
/// [`DirFd::ensure_own_dir`]. `stop` ends it as an error would ([`PullError::Stopped`]):
/// its writers are waited for, their temp files removed. Dropped instead, its writers went on alone, and a process that then
/// exited left their named temp files (no O_TMPFILE: NFS, CIFS) in DEST.
pub async fn pull_into(
    store: &BlobStore,
    files: Arc<[FileEntry]>,
    root: DirFd,
    shown: &Path,
    (owner, vet): (Owner, Owner),
    force: bool,
    stop: &CancellationToken,
) -> Result<PullSummary, PullError> {
    let root = Arc::new(root);
    // Every directory first, one at a time: created concurrently, one download's `d/sub`
    // could land in `d` before the download that made `d` checked it was still empty (which
    // is how a directory swapped in is told from the one just made). Ordered by component,
    // so the directories a path adds are those it does not share with the one before.
    let mut parents = std::collections::BTreeMap::new();
    for (i, entry) in files.iter().enumerate() {
        let (parent, _, _) = split(entry, shown)?;
        if !parent.as_os_str().is_empty() {
            parents.entry(parent).or_insert(i);
        }
    }
    let (made, checked) = (root.clone(), files.clone());
    let (shown_dir, dirs_stop) = (shown.to_path_buf(), Stop::default());
    let stopped = dirs_stop.0.clone();
    let making = tokio::task::spawn_blocking(move || {
        check_room(&made, &checked, &parents, &shown_dir, vet, &stopped)?;
        let mut abandoned = made.remove_abandoned_temps(TEMP_PREFIX);
        for (parent, i) in parents {
            // The pull was given up (a dataset's timeout, a cancel): no more directories.
            if stopped.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let entry = &checked[i];
            let (_, _, target) = split(entry, &shown_dir)?;
            abandoned += make_parent(&made, &parent, vet, entry, &target)?
                .remove_abandoned_temps(TEMP_PREFIX);
        }
        if abandoned > 0 {
            tracing::info!(dest = %shown_dir.display(), files = abandoned, "removed partial downloads an earlier pull left");
        }
        Ok::<_, PullError>(())
    });
    let made = tokio::select! {
        made = making => made,
        // `dirs_stop`, dropped, stops it after the directory it is making.
        () = stop.cancelled() => return Err(PullError::Stopped),
    };
    made.map_err(|e| PullError::Write {
        path: shown.to_path_buf(),
        source: std::io::Error::other(e),
    })??;
    drop(dirs_stop);
    let (writers, mut writers_done) = tokio::sync::mpsc::channel(1);
    let fetching = futures::stream::iter(files.iter())
        .map(|entry| {
            fetch(
                store,
                entry,
                root.clone(),
                shown,
                (owner, vet),
                force,
                &writers,
            )
        })
        .buffer_unordered(8)
        .try_collect::<Vec<u64>>();
    let results = tokio::select! {
        results = fetching => results,
        () = stop.cancelled() => Err(PullError::Stopped),
    };
    // On an error or a stop the other downloads were dropped, their writers not: those go on until
    // they have removed their temp files (a CLI pull's runtime, shut down at once, would
    // leave them in DEST).
    drop(writers);
    // Not for ever: a writer blocked in write(2) on a hung NFS DEST would hang the pull. One
    // still writing after the wait may leave its temp file (a named one, where the file
    // system has no O_TMPFILE).
    if tokio::time::timeout(WRITERS_WAIT, writers_done.recv())
        .await
        .is_err()
    {
        tracing::warn!(dest = %shown.display(), wait_secs = WRITERS_WAIT.as_secs(), "a failed or stopped pull's writers did not stop in time; returning without them");
    }
    let results = results?;
    let (placed, listed) = (root.clone(), files.clone());
    // Raced with the stop as the writes are: DEST on an NFS server that stopped answering
    // held a Ctrl-C here.
    let apart = tokio::task::spawn_blocking(move || apart_in_case(&placed, &listed));
    tokio::select! {
        apart = apart => apart.map_err(|_| PullError::Task {
            path: shown.display().to_string(),
        })??,
        () = stop.cancelled() => return Err(PullError::Stopped),
    };
    Ok(PullSummary {
        files: results.len() as u64,
        bytes: results.iter().sum(),
    })
}

/// Entries whose paths differ only in case (`Model.bin`, `model.bin`: fine where the source
/// job ran) are two files in the destination, not one: where it folds case, both were
/// verified and placed, the second over the first, and the pull said both were there.
/// Where the destination is known to fold case (SMB, FAT, a casefold directory: its own
/// folding, Unicode's, may join names a lowercase does not), every entry is looked at;
/// elsewhere only pairs apart in case alone, which are rare.
fn apart_in_case(root: &DirFd, files: &[FileEntry]) -> Result<(), PullError> {
    use std::os::unix::ffi::OsStrExt;
    // By the path's exact bytes: `path` shows a name that is not UTF-8 with U+FFFD, and two
    // such names apart in one invalid byte only read alike.
    let raw = |e: &FileEntry| e.raw_path().unwrap_or_else(|_| e.path.clone().into_bytes());
    let id = |e: &FileEntry| {
        crate::confine::lstat_beneath(root, Path::new(std::ffi::OsStr::from_bytes(&raw(e))))
            .ok()
            .map(|st| (st.st_dev, st.st_ino))
    };
    let merged = |a: &FileEntry, b: &FileEntry| PullError::CaseFolded {
        a: a.path.clone(),
        b: b.path.clone(),
    };
    if folds_case(root) {
        let mut placed: std::collections::HashMap<(u64, u64), &FileEntry> = Default::default();
        for entry in files {
            let Some(at) = id(entry) else {
                return Err(merged(entry, entry));
            };
            if let Some(other) = placed.insert(at, entry) {
                return Err(merged(other, entry));
            }
        }
        return Ok(());
    }
    let mut folded: std::collections::HashMap<String, &FileEntry> = Default::default();
    for entry in files {
        let name = raw(entry);
        let Some(other) = folded.insert(String::from_utf8_lossy(&name).to_lowercase(), entry)
        else {
            continue;
        };
        match (id(other), id(entry)) {
            (Some(a), Some(b)) if a != b => {}
            _ => return Err(merged(other, entry)),
        }
    }
    Ok(())
}

/// Whether names in `dir` are compared without case: a file system that always does (SMB,
/// FAT, exFAT, HFS+), or a casefold directory (ext4, f2fs, tmpfs: `chattr +F`).
fn folds_case(dir: &DirFd) -> bool {
    use std::os::fd::{AsFd, AsRawFd};
    const FOLDING: &[i64] = &[
        0xFF53_4D42,
        0xFE53_4D42,
        0x517B,
        0x4d44,
        0x2011_BAB0,
        0x482b,
    ];
    let fs =
        nix::sys::statfs::fstatfs(dir).is_ok_and(|s| FOLDING.contains(&{ s.filesystem_type().0 }));
    const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
    const FS_CASEFOLD_FL: libc::c_long = 0x4000_0000;
    let mut flags: libc::c_long = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int into `flags`, which is larger.
    let r = unsafe { libc::ioctl(dir.as_fd().as_raw_fd(), FS_IOC_GETFLAGS as _, &mut flags) };
    fs || (r == 0 && flags & FS_CASEFOLD_FL != 0)
}

/// How long a failed or stopped pull waits for its writers to remove their temp files.
pub const WRITERS_WAIT: Duration = if cfg!(test) {
    Duration::from_secs(2)
} else {
    Duration::from_secs(30)
};

/// Held by each blocking writer of a pull until it returns: when every one is dropped, the
/// pull's receiver hears the channel close (mini-redis's `shutdown_complete`).
type Writers = tokio::sync::mpsc::Sender<()>;

/// Set when its holder is dropped: a blocking task that outlives the future that awaited it
/// (given up on at a timeout) sees it and stops.
#[derive(Default)]
struct Stop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The manifest's sizes are the store's word, and each file is written out whole (one huge
/// blob listed a thousand times is a thousand copies), perhaps as root, past quotas and
/// reserved blocks: what does not fit in what an ordinary user could still write is refused
/// up front rather than filling the node's disk, the agent's state dir included, and so is
/// what does not fit the hard quota limits (blocks, inodes) of the user and group it is
/// pulled for, whom the chown at the end charges past them (a tenant with 1 TB of quota
/// filled a shared scratch with 5 TB). Each file
/// takes whole blocks (counted at most 4 KiB each: NFS, CephFS and ZFS report 128 KiB to
/// 4 MiB here, and pack small files tighter) and an inode, and so does each directory made
/// for them (a forged manifest of 0-byte files, each below its own chain of 127 directories,
/// asked for 87 million of them). A file already in place with the entry's size and mtime
/// (an earlier attempt's, a pull that broke off) is not counted again, if its blocks hold
/// its size: a sparse one (a job's `truncate` and `touch` over its dataset copy in a
/// workdir a later attempt reuses) is downloaded again whole, as root. (So is one of the
/// right size with other bytes: [`write_verified`] stops before the file system fills.)
fn check_room(
    root: &DirFd,
    files: &[FileEntry],
    parents: &std::collections::BTreeMap<PathBuf, usize>,
    shown: &Path,
    owner: Owner,
    stopped: &std::sync::atomic::AtomicBool,
) -> Result<(), PullError> {
    let Ok(fs) = nix::sys::statvfs::fstatvfs(root) else {
        return Ok(());
    };
    let block = fs.fragment_size().clamp(1, 4096);
    let blocks_of = |size: u64| size.div_ceil(block).saturating_mul(block);
    // Only the directories still to make: a retry with its dataset in place needs none.
    let mut dirs = 0u64;
    let mut before: Option<&PathBuf> = None;
    for parent in parents.keys() {
        let shared = before.map_or(0, |b| {
            b.components()
                .zip(parent.components())
                .take_while(|(a, b)| a == b)
                .count()
        });
        let mut at: PathBuf = parent.components().take(shared).collect();
        let mut missing = false;
        for part in parent.components().skip(shared) {
            at.push(part);
            // Below a missing one, every one is missing: no look.
            missing = missing
                || !crate::confine::lstat_beneath(root, &at)
                    .is_ok_and(|st| crate::confine::is_dir(&st));
            dirs += u64::from(missing);
        }
        before = Some(parent);
    }
    let in_place = |entry: &FileEntry| {
        use std::os::unix::ffi::OsStrExt;
        let Ok(raw) = entry.raw_path() else {
            return false;
        };
        let rel = Path::new(std::ffi::OsStr::from_bytes(&raw));
        // The mtime too, which a pull sets from the entry: a file of the same size that was
        // rewritten since (a job may change its dataset copy) is replaced, and its new copy
        // needs room beside it until the rename.
        crate::confine::lstat_beneath(root, rel).is_ok_and(|st| {
            crate::confine::is_regular(&st)
                && st.st_size as u64 == entry.size
                && owner.is_none_or(|(uid, _)| uid == st.st_uid)
                && crate::display::file_time_ns(st.st_mtime, st.st_mtime_nsec) == entry.mtime_ns
                && root
                    .open_file(rel)
                    .is_ok_and(|f| no_hole_before(&f, entry.size))
        })
    };
    // A look per entry (a million of them on a slow file system): the pull given up (a
    // dataset's timeout, a cancel) stops it.
    let mut new: Vec<&FileEntry> = Vec::new();
    for f in files {
        if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(PullError::Stopped);
        }
        if !in_place(f) {
            new.push(f);
        }
    }
    let needed = new
        .iter()
        .map(|f| blocks_of(f.size))
        .fold(dirs.saturating_mul(block), u64::saturating_add);
    let free = user_free(&fs);
    // A file in place takes no new inode: a retry of a pull of more files than the reserve
    // leaves was refused for ever, though it would make none.
    let inodes = (new.len() as u64).saturating_add(dirs);
    let no_inodes = too_few_inodes(inodes, fs.files(), fs.files_available());
    if needed > free || no_inodes {
        return Err(PullError::NoRoom {
            path: shown.to_path_buf(),
            needed,
            files: new.len(),
            dirs,
            free,
        });
    }
    if let Some((uid, gid)) = owner {
        if let Some(left) = crate::quota::left(root, uid, gid)
            .into_iter()
            .find(|q| needed > q.bytes || inodes > q.inodes)
        {
            return Err(PullError::OverQuota {
                path: shown.to_path_buf(),
                needed,
                inodes,
                left,
            });
        }
    }
    Ok(())
}

/// Whether `needed` inodes would leave fewer than a reserve of the file system's `total`
/// free: root creates the files (then chowns them), past inode quotas, and most file systems
/// keep no inodes back for root, so a pull could take the last one of the file system that
/// holds the state dir. The reserve is 1% of the inodes, and at least 10 000 (or a tenth of
/// a small file system's). A file system that counts no inodes (btrfs: 0) is not judged, nor
/// a pull that makes none (a retry with all in place, on a file system already past it).
fn too_few_inodes(needed: u64, total: u64, available: u64) -> bool {
    let reserve = (total / 100).max((total / 10).min(10_000));
    needed > 0 && available > 0 && needed.saturating_add(reserve) > available
}

/// An entry's parent directory and name below the pull root (the exact bytes: a name that
/// is not UTF-8 comes back as it was written), and its target path for messages.
fn split(
    entry: &FileEntry,
    shown: &Path,
) -> Result<(PathBuf, std::ffi::OsString, PathBuf), PullError> {
    use std::os::unix::ffi::OsStrExt;
    let raw = entry.raw_path().map_err(|_| PullError::Escapes {
        path: entry.path.clone(),
    })?;
    let (parent, name) = match raw.iter().rposition(|b| *b == b'/') {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (&raw[..0], &raw[..]),
    };
    Ok((
        PathBuf::from(std::ffi::OsStr::from_bytes(parent)),
        std::ffi::OsStr::from_bytes(name).to_os_string(),
        shown.join(std::ffi::OsStr::from_bytes(&raw)),
    ))
}

/// Opens `parent` below `root`, creating what is missing (never through a symlink).
fn make_parent(
    root: &DirFd,
    parent: &Path,
    owner: Owner,
    entry: &FileEntry,
    target: &Path,
) -> Result<DirFd, PullError> {
    root.ensure_dataset_dir(parent, 0o755, owner)
        .map_err(|source| {
            if crate::confine::OpenToOthers::is(&source) {
                PullError::OpenToOthers {
                    path: entry.path.clone(),
                    source,
                }
            } else if source.kind() == std::io::ErrorKind::InvalidInput {
                PullError::Escapes {
                    path: entry.path.clone(),
                }
            } else {
                PullError::Write {
                    path: target.to_path_buf(),
                    source,
                }
            }
        })
}

/// The names of a pull's temp files (`.c3-pull-<random>.part`) beside their targets.
const TEMP_PREFIX: &str = ".c3-pull-";

/// Resumes of one download in a row that bring no byte before it fails (each resume's
/// request is itself retried for the store's retry deadline).
const MAX_FRUITLESS_RESUMES: u32 = 3;

/// Resumes of one download in all: 64, and one more a MiB of the blob. A store or middlebox
/// that cut every answer after a few KiB made a large blob millions of GETs, until a
/// dataset's 6 h time-out (a `pull`: for good); a link that breaks every few MiB still gets
/// its blob.
fn max_resumes(size: u64) -> u64 {
    64 + size / (1 << 20)
}

/// One blob into place; a body that did not match its sha256 is fetched once more from the
/// start (a cache or proxy that served a wrong or cut body once is not the blob), and only
/// a second mismatch is the store's word. So is a download whose resume the store answered
/// ignoring its Range (a gateway that does not do ranges): once more from the start, where
/// no Range is asked, since one break (a reset) failed the dataset for good otherwise; only
/// a second refusal, a store that breaks every download, is reported.
async fn fetch(
    store: &BlobStore,
    entry: &FileEntry,
    root: Arc<DirFd>,
    shown: &Path,
    whose: (Owner, Owner),
    force: bool,
    writers: &Writers,
) -> Result<u64, PullError> {
    let once = || {
        fetch_once(
            store,
            entry,
            root.clone(),
            shown,
            whose,
            force,
            writers.clone(),
        )
    };
    let (mut mismatch_left, mut refusal_left) = (true, true);
    loop {
        match once().await {
            Err(PullError::Mismatch { actual, .. }) if mismatch_left => {
                mismatch_left = false;
                tracing::warn!(path = %entry.path, sha256 = %actual, "the blob's bytes did not match its sha256; fetching it again");
            }
            Err(PullError::Blob { source, .. }) if refusal_left && source.is_range_refusal() => {
                refusal_left = false;
                tracing::warn!(path = %entry.path, error = %crate::error_chain(&source), "the store ignored the Range of a resumed download; fetching it again from the start");
            }
            done => return done,
        }
    }
}

/// Streams one blob into a new temp file beside its target, hashing off the reactor and
/// stopping at the manifest's size, then renames it into place. A file already there with
/// the entry's bytes is kept without asking the store.
async fn fetch_once(
    store: &BlobStore,
    entry: &FileEntry,
    root: Arc<DirFd>,
    shown: &Path,
    (owner, vet): (Owner, Owner),
    force: bool,
    writers: Writers,
) -> Result<u64, PullError> {
    let (parent, name, target) = split(entry, shown)?;
    let task_failed = || PullError::Task {
        path: entry.path.clone(),
    };
    let werr = {
        let target = target.clone();
        move |source| PullError::Write {
            path: target.clone(),
            source,
        }
    };
    // The look at what is there may read (and hash) a file of the entry's size: given up
    // with this download (a dataset's timeout, a cancel), it stops within a MiB, and the
    // wind-down waits for it as for a writer (it may still make a directory).
    let looking = Stop::default();
    let dir = {
        let (entry, target, name, werr) =
            (entry.clone(), target.clone(), name.clone(), werr.clone());
        let (stopped, running) = (looking.0.clone(), writers.clone());
        tokio::task::spawn_blocking(move || -> Result<Option<DirFd>, PullError> {
            let _running = running;
            let dir = if parent.as_os_str().is_empty() {
                root.try_clone().map_err(&werr)?
            } else {
                make_parent(&root, &parent, vet, &entry, &target)?
            };
            match existing(&dir, &name, &entry, vet, force, &stopped).map_err(&werr)? {
                None => Ok(Some(dir)),
                Some(true) => Ok(None),
                Some(false) => Err(PullError::Exists {
                    path: target.clone(),
                }),
            }
        })
        .await
        .map_err(|_| task_failed())??
    };
    drop(looking);
    let Some(dir) = dir else {
        return Ok(entry.size);
    };
    let result = store
        .get_blob(&entry.sha256)
        .await
        .map_err(|source| PullError::Blob {
            path: entry.path.clone(),
            source,
        })?;
    // Chunks, or None when the download broke off and the temp file must go.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(4);
    // Set when this download is given up (its future dropped by a stop), not when it ends:
    // a small blob's sender is gone at once, and the test's window with it.
    let given_up = Stop::default();
    let writer = {
        let entry = entry.clone();
        let given_up = given_up.0.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, PullError> {
            // Held until this writer is done, its temp file gone or in place.
            let _running = writers;
            let (tmp, file) = dir.create_unnamed_temp(TEMP_PREFIX).map_err(&werr)?;
            if crate::fault::armed_at("pull-writer-hangs", &entry.path) {
                std::thread::sleep(WRITERS_WAIT * 3);
            }
            // A window with the temp file made, for a test's stop to come in: until the
            // download is given up, 20 s at most.
            if crate::fault::armed_at("pull-writer-pauses", &entry.path) {
                let until = std::time::Instant::now() + Duration::from_secs(20);
                while !given_up.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < until
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let written = write_verified(&file, &mut rx, &entry, owner)
                .map_err(|e| match e {
                    WriteFailure::Io(source) => werr(source),
                    WriteFailure::Filling { needed, free } => PullError::Filling {
                        path: target.clone(),
                        needed,
                        free,
                    },
                    WriteFailure::OverQuota { needed, left } => PullError::OverQuota {
                        path: target.clone(),
                        needed,
                        inodes: 0,
                        left,
                    },
                    WriteFailure::Other(e) => e,
                })
                .and_then(|size| {
                    // Without `force`, a file that came to be there since the look (a job
                    // writing into the DEST an operator pulls to) is kept, as one found then.
                    let placed = dir.place_temp(tmp.as_deref(), &file, TEMP_PREFIX, &name, force);
                    placed.map(|()| size).map_err(|source| {
                        // A directory (or a file below one) is where the job's file goes: the
                        // job made it; root neither removes nor writes into it.
                        match source.raw_os_error() {
                            Some(libc::EEXIST) if !force => PullError::Exists {
                                path: target.clone(),
                            },
                            Some(libc::EISDIR | libc::ENOTEMPTY | libc::ENOTDIR) => {
                                PullError::Escapes {
                                    path: entry.path.clone(),
                                }
                            }
                            _ => werr(source),
                        }
                    })
                });
            if let (Err(_), Some(tmp)) = (&written, &tmp) {
                let _ = dir.remove_file(std::ffi::OsStr::new(tmp));
            }
            written
        })
    };
    let mut body = result.into_stream();
    let mut fetch_error = None;
    // A body that breaks off (a reset, a stall, a request over its time limit) goes on from
    // the byte it reached, as often as each new request brings bytes: a big blob on a slow
    // or blinking link arrives in several requests rather than failing the pull.
    let (mut received, mut fruitless, mut resumes) = (0u64, 0u32, 0u64);
    loop {
        let chunk = match body.next().await {
            Some(chunk) => chunk,
            // A clean end short of the entry's size is a break too (a proxy that cut a body
            // sent without a length): taken for the store holding other bytes, it was
            // fetched whole again, and a second such cut failed the pull, not retryable.
            // The file store's end is the blob's: shorter than the manifest says (a size
            // lie, a torn copy), it is a mismatch, fetched once more and then failed. Resumed,
            // its answer to a range past the end was taken for a blip and retried for the
            // whole retry deadline, and the job failed retryable, every attempt alike.
            None if received < entry.size && !store.is_local() => {
                Err(object_store::Error::Generic {
                    store: "HTTP",
                    source: format!(
                        "the body ended after {received} of the blob's {} bytes",
                        entry.size
                    )
                    .into(),
                })
            }
            None => break,
        };
        match chunk {
            Ok(bytes) => {
                received += bytes.len() as u64;
                // An empty chunk (an HTTP/2 DATA frame of no bytes) before each reset is no
                // progress: counted as some, a store answering so was resumed for ever.
                if !bytes.is_empty() {
                    fruitless = 0;
                }
                if tx.send(Some(bytes)).await.is_err() {
                    break; // the writer stopped (an error, or more bytes than the manifest says)
                }
            }
            Err(source) => {
                let broke = StoreError::Op {
                    op: "get",
                    key: crate::store::blob_key(&entry.sha256),
                    source,
                };
                fruitless += 1;
                let mut failed = broke;
                resumes += 1;
                if received < entry.size
                    && fruitless <= MAX_FRUITLESS_RESUMES
                    && resumes <= max_resumes(entry.size)
                {
                    tracing::debug!(path = %entry.path, received, error = %crate::error_chain(&failed), "download broke off; resuming");
                    match store.get_blob_from(&entry.sha256, received).await {
                        Ok(rest) => {
                            body = rest.into_stream();
                            continue;
                        }
                        // A store that ignores the Range, a blob deleted meanwhile: the next
                        // attempt fails the same way, and says why.
                        Err(e) if e.is_permanent() => failed = e,
                        Err(e) => {
                            tracing::debug!(path = %entry.path, error = %crate::error_chain(&e), "resuming failed");
                        }
                    }
                }
                fetch_error = Some(PullError::Blob {
                    path: entry.path.clone(),
                    source: failed,
                });
                let _ = tx.send(None).await;
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|_| task_failed())?;
    drop(given_up);
    match fetch_error {
        Some(e) => Err(e),
        None => written,
    }
}

/// What is at `name` already: `None` nothing (or `force`: it will be replaced),
/// `Some(true)` a regular file with the entry's size and sha256, `Some(false)` anything else.
/// With `owner`, only a file of that user is kept: a job may plant a hard link to another
/// user's file there (`fs.protected_hardlinks=0`), and whether root kept it would tell the
/// job whether that file holds the entry's bytes.
fn existing(
    dir: &DirFd,
    name: &std::ffi::OsStr,
    entry: &FileEntry,
    owner: Owner,
    force: bool,
    stopped: &std::sync::atomic::AtomicBool,
) -> std::io::Result<Option<bool>> {
    let st = match dir.stat(name) {
        Ok(st) => st,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let regular = crate::confine::is_regular(&st);
    if regular && st.st_size as u64 == entry.size {
        let file = dir.open_file(Path::new(name))?;
        let theirs = crate::confine::fstat(&file)?.st_uid;
        if owner.is_none_or(|(uid, _)| uid == theirs) && same_bytes(file, entry, stopped)? {
            return Ok(Some(true));
        }
    }
    Ok((!force).then_some(false))
}

/// Whether the file opened is the entry: checked on the fd (a job's process may have swapped
/// a FIFO or a file that grows to a sparse terabyte in since the stat by name), and read no
/// further than the entry's size + 1 byte.
fn same_bytes(
    file: std::fs::File,
    entry: &FileEntry,
    stopped: &std::sync::atomic::AtomicBool,
) -> std::io::Result<bool> {
    use std::io::Read;
    let st = crate::confine::fstat(&file)?;
    if !crate::confine::is_regular(&st) || st.st_size as u64 != entry.size {
        return Ok(false);
    }
    let mut hasher = crate::digest::Sha256Hasher::default();
    let mut buf = vec![0u8; 1 << 20];
    let (mut file, mut read) = (file.take(entry.size.saturating_add(1)), 0u64);
    loop {
        if stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "the pull was given up",
            ));
        }
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(read == entry.size && hasher.finish_hex() == entry.sha256)
}

enum WriteFailure {
    Io(std::io::Error),
    /// `needed` bytes still to write, `free` what an ordinary user could still write there.
    Filling {
        needed: u64,
        free: u64,
    },
    /// `needed` bytes still to be given to the owner, past what its hard limit `left` allows.
    OverQuota {
        needed: u64,
        left: crate::quota::Left,
    },
    Other(PullError),
}

impl From<std::io::Error> for WriteFailure {
    fn from(e: std::io::Error) -> Self {
        WriteFailure::Io(e)
    }
}

/// Bytes written between two looks at the free space (with 8 downloads at once, root writes
/// at most 8 times this into the blocks an ordinary user may not use).
const ROOM_LOOK_EVERY: u64 = 4 << 20;

/// Writes the chunks to `file`, refusing more bytes than the manifest's size (a store that
/// serves 50 GiB for a 3-byte entry must not fill the disk), then checks size and sha256
/// and sets mode, mtime and owner on the fd. What is still to come must fit in what an
/// ordinary user could still write there, and the whole file within the hard quota of the
/// `owner` it is given to (looked at every [`ROOM_LOOK_EVERY`] bytes): the room check up
/// front takes a file in place with the entry's size and mtime for the entry's, and one
/// with other bytes (a job's, in a workdir a later attempt reuses) is written again here,
/// perhaps as root, past reserved blocks and quotas.
fn write_verified(
    mut file: &std::fs::File,
    rx: &mut tokio::sync::mpsc::Receiver<Option<bytes::Bytes>>,
    entry: &FileEntry,
    owner: Owner,
) -> Result<u64, WriteFailure> {
    use std::os::unix::fs::PermissionsExt;
    let mismatch = |actual: String| {
        WriteFailure::Other(PullError::Mismatch {
            path: entry.path.clone(),
            expected: entry.sha256.clone(),
            actual,
        })
    };
    let mut hasher = Sha256Hasher::default();
    let (mut size, mut next_look) = (0u64, 0u64);
    while let Some(chunk) = rx.blocking_recv() {
        let Some(chunk) = chunk else {
            return Err(WriteFailure::Io(std::io::Error::other(
                "download broke off",
            )));
        };
        size += chunk.len() as u64;
        if size > entry.size {
            return Err(mismatch(format!(
                "unknown: the store sent more than the manifest's {} bytes",
                entry.size
            )));
        }
        let before = size - chunk.len() as u64;
        if before >= next_look {
            if let Ok(fs) = nix::sys::statvfs::fstatvfs(file) {
                let free = user_free(&fs);
                let needed = entry.size - before;
                if needed > free {
                    return Err(WriteFailure::Filling { needed, free });
                }
            }
            if let Some((uid, gid)) = owner {
                over_quota(file, entry.size, uid, gid)?;
            }
            next_look = before.saturating_add(ROOM_LOOK_EVERY);
        }
        hasher.update(&chunk);
        file.write_all(&chunk)?;
    }
    let actual = hasher.finish_hex();
    if actual != entry.sha256 || size != entry.size {
        return Err(mismatch(actual));
    }
    if entry.mtime_ns >= 0 {
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns as u64))?;
    }
    // setuid/setgid/sticky are never restored, nor write for others than the owner. With no
    // owner the file is the agent's (root's, for `c3-agent pull`): a job's 0777 file would be
    // a root file anyone may rewrite. Given to the job's user, a source job's 0666 (a umask
    // of 000, or 002 and a group the user shares) let other local users rewrite the verified
    // input (a pickled model: code run in the job) while the job read it; its user may
    // chmod its own file.
    let mode = entry.mode & 0o755;
    drop_inherited_acl(file)?;
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        nix::unistd::fchown(
            file,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(std::io::Error::from)?;
    }
    file.sync_all()?;
    Ok(size)
}

/// Takes off the access ACL a new file inherited from its directory's default one (a team
/// dir's `d:g:team:rwx`): `fchmod` sets only its mask, and a dataset file whose mode lets
/// its group write (a source's 0664) let every member of that team rewrite the verified
/// bytes in place while the job read them. The mode alone says who may, as in the source.
fn drop_inherited_acl(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is open for the call; the name is NUL-terminated.
    let rc = unsafe { libc::fremovexattr(file.as_raw_fd(), c"system.posix_acl_access".as_ptr()) };
    match rc {
        0 => Ok(()),
        _ => match std::io::Error::last_os_error() {
            e if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(()),
            e => Err(e),
        },
    }
}

/// Whether a file of `size` bytes, given to `uid`:`gid` once written, fits what their hard
/// limits still allow. The file is root's until then, and none of it is charged to them yet
/// (unless it is charged already: a group's, in a setgid directory of theirs); nor are the
/// other downloads of the pull, which the room check up front counted.
fn over_quota(file: &std::fs::File, size: u64, uid: u32, gid: u32) -> Result<(), WriteFailure> {
    let Ok(st) = crate::confine::fstat(file) else {
        return Ok(());
    };
    let charged = (st.st_blocks as u64).saturating_mul(512);
    for left in crate::quota::left(file, uid, gid) {
        let already = match left.whose {
            crate::quota::Whose::User(id) => id == st.st_uid,
            crate::quota::Whose::Group(id) => id == st.st_gid,
        };
        let needed = if already {
            size.saturating_sub(charged)
        } else {
            size
        };
        if needed > left.bytes {
            return Err(WriteFailure::OverQuota { needed, left });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A dataset file's inherited access ACL (a team dir's default one) is taken off: its
    /// mode alone says who may write it.
    #[test]
    fn an_inherited_acl_is_taken_off_a_dataset_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        super::drop_inherited_acl(&file).unwrap();
        if !crate::acl::tests::grant_group_rwx(&file, 4100) {
            crate::testskip::skip("no POSIX ACLs here");
            return;
        }
        assert!(crate::acl::of(&file).unwrap().is_some());
        super::drop_inherited_acl(&file).unwrap();
        assert!(crate::acl::of(&file).unwrap().is_none());
    }

    use super::*;

    /// "No manifest" only when the store said so: a manifest too large (or a timeout, a
    /// denial) made a dataset's status begin with a false cause.
    #[test]
    fn a_manifest_not_read_says_why() {
        let err = |source| {
            PullError::NoManifest {
                job_id: "j".into(),
                source,
            }
            .to_string()
        };
        let missing = StoreError::Op {
            op: "get",
            key: "k".into(),
            source: object_store::Error::NotFound {
                path: "k".into(),
                source: "gone".into(),
            },
        };
        assert_eq!(err(missing), "job j: no manifest in the store");
        let large = StoreError::TooLarge {
            key: "k".into(),
            size: 2,
            max: 1,
        };
        assert!(err(large).contains("larger than"));
    }

    fn entry_of(bytes: &[u8]) -> FileEntry {
        FileEntry {
            path: "artifacts/f".into(),
            path_b64: None,
            size: bytes.len() as u64,
            sha256: crate::digest::sha256_hex(bytes),
            blake3: String::new(),
            mode: 0o644,
            mtime_ns: 0,
        }
    }

    /// Entries whose paths differ only in case are two files after the pull, or it fails:
    /// a destination that folds case (CIFS, a casefold directory) put one over the other,
    /// both verified, and the pull said both were there. (No casefold file system here: its
    /// one name for both is stood for by a hard link.)
    #[test]
    fn entries_apart_only_in_case_must_be_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let entry = |path: &str| FileEntry {
            path: path.into(),
            ..entry_of(b"x")
        };
        let files = [entry("Model.bin"), entry("model.bin"), entry("other")];
        for f in ["Model.bin", "other"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        std::fs::write(dir.path().join("model.bin"), "y").unwrap();
        let root = DirFd::open_root(dir.path()).unwrap();
        assert!(apart_in_case(&root, &files).is_ok());
        std::fs::remove_file(dir.path().join("model.bin")).unwrap();
        std::fs::hard_link(dir.path().join("Model.bin"), dir.path().join("model.bin")).unwrap();
        let err = apart_in_case(&root, &files).unwrap_err();
        assert!(matches!(err, PullError::CaseFolded { .. }), "{err}");
        // Two names that are not UTF-8 and differ in one invalid byte only: both shown as
        // `a\u{fffd}`, two files all the same.
        use std::os::unix::ffi::OsStrExt;
        let latin = |b: u8| {
            let raw = [b'a', b];
            std::fs::write(dir.path().join(std::ffi::OsStr::from_bytes(&raw)), [b]).unwrap();
            let (path, path_b64) =
                c3_proto::manifest::entry_paths(&c3_proto::manifest::rel_key(&raw));
            FileEntry {
                path,
                path_b64,
                ..entry_of(b"x")
            }
        };
        assert!(apart_in_case(&root, &[latin(0xe9), latin(0xe8)]).is_ok());
    }

    /// Pulls `bytes` (as one entry) from a store over `faulty`; what the pull returned, and
    /// how many GETs it made.
    async fn pulled_through(
        faulty: crate::store::tests::Faulty,
        bytes: Vec<u8>,
    ) -> (Result<PullSummary, PullError>, u64) {
        let faulty = Arc::new(faulty);
        let store = crate::store::tests::store_over(faulty.clone(), Duration::from_secs(5));
        let entry = entry_of(&bytes);
        store.put_blob(&entry.sha256, bytes.into()).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pulled =
            tokio::time::timeout(Duration::from_secs(20), pull_one(&store, entry, dir.path()))
                .await
                .expect("the download was resumed without end");
        let gets = faulty.gets.load(std::sync::atomic::Ordering::Relaxed) as u64;
        (pulled, gets)
    }

    /// A store whose every answer to a download is one byte, then a reset: the pull fails
    /// after 64 resumes (and one a MiB), each bringing a byte. It went on for as many GETs as
    /// the blob has bytes.
    #[tokio::test]
    async fn resumes_are_bounded_in_all() {
        let faulty = crate::store::tests::Faulty {
            byte_then_broken_gets: true,
            ..Default::default()
        };
        let (pulled, gets) = pulled_through(faulty, vec![7u8; 1000]).await;
        assert!(matches!(pulled, Err(PullError::Blob { .. })), "{pulled:?}");
        assert!(gets <= 1 + max_resumes(1000) + 1, "{gets} GETs");
    }

    /// A store whose every answer to a download is an empty chunk, then a reset: the pull
    /// fails after a few resumes that bring nothing. Each empty chunk counted as progress,
    /// and it resumed for ever (a dataset: until its 6 h timeout; a `pull`: for good).
    #[tokio::test]
    async fn resumes_that_bring_no_byte_end_the_download() {
        let faulty = crate::store::tests::Faulty {
            empty_then_broken_gets: true,
            ..Default::default()
        };
        let (pulled, gets) = pulled_through(faulty, b"dataset bytes".to_vec()).await;
        assert!(matches!(pulled, Err(PullError::Blob { .. })), "{pulled:?}");
        assert!(gets <= 1 + u64::from(MAX_FRUITLESS_RESUMES), "{gets} GETs");
    }

    /// Pulls `entry` alone into `dest`, as root.
    async fn pull_one(
        store: &BlobStore,
        entry: FileEntry,
        dest: &std::path::Path,
    ) -> Result<PullSummary, PullError> {
        pull_into(
            store,
            vec![entry].into(),
            DirFd::open(dest).unwrap(),
            dest,
            (None, None),
            true,
            &CancellationToken::new(),
        )
        .await
    }

    /// A proxy before the store answers a download with its own 404 (no body, no NoSuchKey)
    /// twice: a blip, retried. Taken for the blob missing, it failed the dataset at once.
    #[tokio::test]
    async fn a_bare_404_to_a_download_is_retried() {
        use crate::store::tests::{remote_store_over, Faulty};
        let faulty = Arc::new(Faulty {
            bare_404_gets: 2.into(),
            ..Default::default()
        });
        let store = remote_store_over(faulty.clone(), std::time::Duration::from_secs(30));
        let bytes = b"dataset bytes".to_vec();
        let entry = entry_of(&bytes);
        store
            .put_blob(&entry.sha256, bytes.clone().into())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pulled = pull_one(&store, entry, dir.path()).await;
        assert!(pulled.is_ok(), "{pulled:?}");
        assert_eq!(
            std::fs::read(dir.path().join("artifacts/f")).unwrap(),
            bytes
        );
        // The store's own word is not a blip: a blob it says is absent fails at once.
        let missing = entry_of(b"never stored");
        let e = store.get_blob(&missing.sha256).await.unwrap_err();
        assert!(e.is_permanent() && e.is_not_found(), "{e:?}");
    }

    /// Pulled for a job's user, a file of another user at the entry's path (a hard link the
    /// job planted) is replaced whatever it holds, never kept for matching bytes.
    #[test]
    fn only_the_jobs_own_file_is_kept_for_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), b"abc").unwrap();
        let fd = DirFd::open(dir.path()).unwrap();
        let entry = entry_of(b"abc");
        let name = std::ffi::OsStr::new("f");
        let me = nix::unistd::geteuid().as_raw();
        let other = me.wrapping_add(1);
        assert_eq!(
            existing(&fd, name, &entry, None, true, &Default::default()).unwrap(),
            Some(true)
        );
        assert_eq!(
            existing(&fd, name, &entry, Some((me, me)), true, &Default::default()).unwrap(),
            Some(true)
        );
        assert_eq!(
            existing(
                &fd,
                name,
                &entry,
                Some((other, other)),
                true,
                &Default::default()
            )
            .unwrap(),
            None
        );
        assert_eq!(
            existing(
                &fd,
                name,
                &entry,
                Some((other, other)),
                false,
                &Default::default()
            )
            .unwrap(),
            Some(false)
        );
    }

    /// A tmpfs of `size` at a new temp dir (unmounted before the dir goes); None (said)
    /// where this machine cannot mount one.
    struct Tmpfs {
        _mounted: crate::rmtree::tests::Tmpfs,
        dir: tempfile::TempDir,
    }

    impl Tmpfs {
        fn mount(size: &str) -> Option<Tmpfs> {
            let dir = tempfile::tempdir().unwrap();
            let mounted = crate::rmtree::tests::Tmpfs::mount_sized(dir.path(), Some(size))?;
            Some(Tmpfs {
                _mounted: mounted,
                dir,
            })
        }

        fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    /// An entry `name` of `size` bytes (of no one's content) with a fixed mtime, and a file
    /// in place for it under `dir`: `dense` written out, else only its size set (a hole).
    fn in_place(dir: &Path, name: &str, size: u64, dense: bool) -> FileEntry {
        let path = dir.join(name);
        let file = std::fs::File::create(&path).unwrap();
        if dense {
            std::fs::write(&path, vec![7u8; size as usize]).unwrap();
        } else {
            file.set_len(size).unwrap();
        }
        let mtime_ns = 1_700_000_000_123_456_789i64;
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_nanos(mtime_ns as u64))
            .unwrap();
        FileEntry {
            path: name.into(),
            path_b64: None,
            size,
            sha256: "0".repeat(64),
            blake3: String::new(),
            mode: 0o644,
            mtime_ns,
        }
    }

    /// A job (its workdir reused by the next attempt) swaps its dataset copy for a sparse file
    /// of the same size and mtime: the room check took it as in place and counted nothing,
    /// and root then wrote the whole file again, into the blocks kept for root, until the
    /// file system was full. A file written out in place is still not counted again.
    #[test]
    fn a_sparse_file_in_place_is_not_taken_for_the_entry() {
        let Some(fs) = Tmpfs::mount("8m") else {
            return;
        };
        let root = DirFd::open(fs.path()).unwrap();
        let none = std::collections::BTreeMap::new();
        let me = nix::unistd::geteuid().as_raw();
        let owner = Some((me, me));
        // 5 MiB written out of 8: counted again, they would not fit beside themselves.
        let dense = in_place(fs.path(), "dense", 5 << 20, true);
        check_room(
            &root,
            std::slice::from_ref(&dense),
            &none,
            fs.path(),
            owner,
            &Default::default(),
        )
        .expect("a file in place is not counted again");
        let sparse = in_place(fs.path(), "sparse", 64 << 20, false);
        let checked = check_room(
            &root,
            &[dense, sparse],
            &none,
            fs.path(),
            owner,
            &Default::default(),
        );
        assert!(
            matches!(checked, Err(PullError::NoRoom { .. })),
            "64 MiB to write, with 3 MiB free: {checked:?}"
        );
    }

    /// A file in place with a time past 2262 (a job's `touch -d 2300-01-01` on its dataset
    /// copy): its time in ns overflowed an i64 in the room check.
    #[test]
    fn a_file_in_place_from_past_2262_is_compared_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let mut entry = in_place(dir.path(), "f", 3, true);
        let in_2300 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_413_792_000);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("f"))
            .unwrap()
            .set_modified(in_2300)
            .unwrap();
        entry.mtime_ns = i64::MAX;
        let root = DirFd::open(dir.path()).unwrap();
        let none = std::collections::BTreeMap::new();
        check_room(
            &root,
            &[entry],
            &none,
            dir.path(),
            None,
            &Default::default(),
        )
        .unwrap();
    }

    /// Root creates a pull's files past inode quotas: a pull that fit exactly took the last
    /// inodes of the file system (perhaps the state dir's). A small one still fits.
    #[test]
    fn a_pull_leaves_a_reserve_of_inodes() {
        let Some(fs) = Tmpfs::mount("8m,nr_inodes=1000") else {
            return;
        };
        let root = DirFd::open(fs.path()).unwrap();
        let none = std::collections::BTreeMap::new();
        let files = |n: usize| -> Vec<FileEntry> {
            (0..n)
                .map(|i| FileEntry {
                    path: format!("f{i}"),
                    ..entry_of(b"")
                })
                .collect()
        };
        let checked = check_room(
            &root,
            &files(950),
            &none,
            fs.path(),
            None,
            &Default::default(),
        );
        assert!(
            matches!(checked, Err(PullError::NoRoom { .. })),
            "950 files of 999 inodes free: {checked:?}"
        );
        check_room(
            &root,
            &files(10),
            &none,
            fs.path(),
            None,
            &Default::default(),
        )
        .expect("10 files fit");
        assert!(!too_few_inodes(1 << 30, 0, 0), "no inode count: not judged");
    }

    /// A retry with its 900 files in place (and their directory) on a file system of 1000
    /// inodes: every one was counted again, and the retry refused for ever (NoRoom is
    /// retryable), though it makes none.
    #[test]
    fn files_in_place_take_no_inodes_of_the_reserve() {
        let Some(fs) = Tmpfs::mount("8m,nr_inodes=1000") else {
            return;
        };
        let root = DirFd::open(fs.path()).unwrap();
        std::fs::create_dir(fs.path().join("d")).unwrap();
        let files: Vec<FileEntry> = (0..900)
            .map(|i| in_place(fs.path(), &format!("d/f{i}"), 0, true))
            .collect();
        let parents = std::collections::BTreeMap::from([(PathBuf::from("d"), 0)]);
        check_room(
            &root,
            &files,
            &parents,
            fs.path(),
            None,
            &Default::default(),
        )
        .expect("nothing to make");
        let mut more = files;
        more.extend((0..50).map(|i| FileEntry {
            path: format!("e/f{i}"),
            ..entry_of(b"")
        }));
        let parents =
            std::collections::BTreeMap::from([(PathBuf::from("d"), 0), (PathBuf::from("e"), 900)]);
        let checked = check_room(&root, &more, &parents, fs.path(), None, &Default::default());
        assert!(
            matches!(
                checked,
                Err(PullError::NoRoom {
                    files: 50,
                    dirs: 1,
                    ..
                })
            ),
            "51 new inodes of 98 free, 100 kept back: {checked:?}"
        );
    }

    /// What the kernel says of the job's user's quota, on this thread, until dropped.
    struct FakeQuota;

    impl FakeQuota {
        fn set(bytes: u64, inodes: u64) -> FakeQuota {
            let me = nix::unistd::geteuid().as_raw();
            let left = crate::quota::Left {
                whose: crate::quota::Whose::User(me),
                bytes,
                inodes,
            };
            crate::quota::FAKE.with(|f| *f.borrow_mut() = Some(vec![left]));
            FakeQuota
        }
    }

    impl Drop for FakeQuota {
        fn drop(&mut self) {
            crate::quota::FAKE.with(|f| *f.borrow_mut() = None);
        }
    }

    /// Root writes a dataset past the job user's quota, then chowns it to the user (which
    /// passes it too): a tenant with 1 TB of quota pulled 5 TB onto shared scratch. What it
    /// pulls must fit its hard limits, in blocks and in inodes; a pull for no user (`c3-agent
    /// pull`, as the agent) is not judged by them.
    #[test]
    fn a_pull_past_the_users_quota_is_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let root = DirFd::open(dir.path()).unwrap();
        let none = std::collections::BTreeMap::new();
        let me = nix::unistd::geteuid().as_raw();
        let owner = Some((me, me));
        let big = FileEntry {
            size: 5 << 20,
            ..entry_of(b"")
        };
        let _quota = FakeQuota::set(1 << 20, u64::MAX);
        let checked = check_room(
            &root,
            std::slice::from_ref(&big),
            &none,
            dir.path(),
            owner,
            &Default::default(),
        );
        match &checked {
            Err(e @ PullError::OverQuota { needed, left, .. }) => {
                assert_eq!((*needed, left.bytes), (5 << 20, 1 << 20));
                assert!(e.to_string().contains("disk quota of user"), "{e}");
            }
            other => panic!("5 MiB with 1 MiB of quota left: {other:?}"),
        }
        check_room(
            &root,
            std::slice::from_ref(&big),
            &none,
            dir.path(),
            None,
            &Default::default(),
        )
        .expect("no user, no quota");
        let small = FileEntry {
            size: 512 << 10,
            ..entry_of(b"")
        };
        check_room(
            &root,
            &[small],
            &none,
            dir.path(),
            owner,
            &Default::default(),
        )
        .expect("512 KiB fits");
        drop(_quota);
        let _quota = FakeQuota::set(u64::MAX, 3);
        let files: Vec<FileEntry> = (0..5)
            .map(|i| FileEntry {
                path: format!("f{i}"),
                ..entry_of(b"")
            })
            .collect();
        let checked = check_room(&root, &files, &none, dir.path(), owner, &Default::default());
        assert!(
            matches!(checked, Err(PullError::OverQuota { inodes: 5, .. })),
            "5 files with 3 inodes of quota left: {checked:?}"
        );
        check_room(
            &root,
            &files[..3],
            &none,
            dir.path(),
            owner,
            &Default::default(),
        )
        .expect("3 files fit");
    }

    /// A download the room check let through (a file in place of the right size with other
    /// bytes, or a quota that shrank since) stops before the user's hard limit, as it does
    /// before the file system fills: root wrote on past it.
    #[test]
    fn a_download_past_the_users_quota_stops_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let mut entry = entry_of(b"");
        entry.size = 8 << 20;
        let me = nix::unistd::geteuid().as_raw();
        let _quota = FakeQuota::set(1 << 20, u64::MAX);
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(1);
        tx.try_send(Some(vec![7u8; 1 << 20].into())).unwrap();
        drop(tx);
        match write_verified(&file, &mut rx, &entry, Some((me, me))) {
            Err(WriteFailure::OverQuota { needed, left }) => {
                assert_eq!((needed, left.bytes), (8 << 20, 1 << 20));
            }
            Err(WriteFailure::Io(e)) => panic!("{e}"),
            Err(WriteFailure::Other(e)) => panic!("{e}"),
            Err(WriteFailure::Filling { needed, free }) => panic!("{needed} {free}"),
            Ok(n) => panic!("{n} bytes written"),
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    /// The kernel's own limit, on an ext4 with quotas: a 50 MiB dataset for a user with a
    /// 10 MiB hard limit is refused before a byte is written (root wrote it all, and the
    /// chown gave the user five times its quota).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dataset_past_a_kernel_quota_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let Some(fs) = crate::quota::tests::QuotaExt4::mount(&dir.path().join("img"), &mnt) else {
            return;
        };
        let nobody = 65534;
        fs.limit(nobody, 10 << 10);
        let url = format!("file://{}", dir.path().join("store").display());
        let store = BlobStore::open(&crate::store::StoreConfig::for_tests(&url)).unwrap();
        let large: Vec<u8> = (0..50u32 << 20).map(|i| (i % 251) as u8).collect();
        let entry = FileEntry {
            path: "d/large".into(),
            ..entry_of(&large)
        };
        store.put_blob(&entry.sha256, large.into()).await.unwrap();
        let root = DirFd::open(&mnt).unwrap();
        let pulled = pull_into(
            &store,
            vec![entry].into(),
            root,
            &mnt,
            (Some((nobody, nobody)), Some((nobody, nobody))),
            true,
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(&pulled, Err(PullError::OverQuota { left, .. }) if left.bytes == 10 << 20),
            "{pulled:?}"
        );
        assert!(!mnt.join("d").exists(), "nothing made");
        drop(fs);
    }

    /// A file of the right size and mtime with other bytes (dense: the room check takes it for
    /// the entry's) is written again as root: what is still to come must fit in what an
    /// ordinary user could write, else the download stops before root fills the file system.
    /// It wrote on into the blocks kept for root until the disk was full.
    #[test]
    fn a_download_that_would_fill_the_file_system_stops_first() {
        let Some(fs) = Tmpfs::mount("8m") else {
            return;
        };
        let path = fs.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let mut entry = entry_of(b"");
        entry.size = 64 << 20;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(4);
        let sender = std::thread::spawn(move || {
            for _ in 0..64 {
                if tx.blocking_send(Some(vec![7u8; 1 << 20].into())).is_err() {
                    break;
                }
            }
        });
        let written = write_verified(&file, &mut rx, &entry, None);
        drop(rx);
        sender.join().unwrap();
        match written {
            Err(WriteFailure::Filling { needed, free }) => {
                assert_eq!(needed, 64 << 20);
                assert!(free <= 8 << 20, "{free}");
            }
            Err(WriteFailure::OverQuota { .. }) => panic!("no owner, no quota"),
            Err(WriteFailure::Io(e)) => panic!("written until: {e}"),
            Err(WriteFailure::Other(e)) => panic!("{e}"),
            Ok(n) => panic!("{n} bytes written"),
        }
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }

    /// A job's 0777 file, pulled as root with no owner (`c3-agent pull`), became a root file
    /// every user may rewrite; pulled for the job's user, a file its group or others may
    /// rewrite. Each keeps the rest of its mode.
    #[test]
    fn a_file_pulled_for_no_owner_is_writable_by_none_but_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        for (name, owner, want) in [("root", None, 0o755), ("job", Some((me, me)), 0o755)] {
            let path = dir.path().join(name);
            let file = std::fs::File::create(&path).unwrap();
            let mut entry = entry_of(b"abc");
            entry.mode = 0o777;
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Option<bytes::Bytes>>(1);
            tx.try_send(Some(bytes::Bytes::from_static(b"abc")))
                .unwrap();
            drop(tx);
            assert!(write_verified(&file, &mut rx, &entry, owner).is_ok());
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{name}: {mode:o}");
        }
    }

    /// A store with a 64 MiB blob, 16 small ones, and entries for them and for one blob it
    /// lacks (last).
    async fn store_missing_one(dir: &Path) -> (BlobStore, Vec<FileEntry>) {
        let url = format!("file://{}", dir.join("store").display());
        let store = BlobStore::open(&crate::store::StoreConfig::for_tests(&url)).unwrap();
        let large: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        let mut files = vec![FileEntry {
            path: "large".into(),
            ..entry_of(&large)
        }];
        store
            .put_blob(&files[0].sha256, large.into())
            .await
            .unwrap();
        for i in 0..16 {
            let small = format!("small {i}");
            let entry = FileEntry {
                path: format!("s{i}"),
                ..entry_of(small.as_bytes())
            };
            store
                .put_blob(&entry.sha256, small.into_bytes().into())
                .await
                .unwrap();
            files.push(entry);
        }
        files.push(FileEntry {
            path: "missing".into(),
            ..entry_of(b"in no store")
        });
        (store, files)
    }

    /// A file store's blob shorter than its entry says (a manifest's size lie, a torn copy)
    /// is a mismatch: its clean end is the blob's end. Taken for a break, the resumed read
    /// past the end was retried for the whole retry deadline and failed as a store fault
    /// (retryable: every attempt of the job waited it out again).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_store_blob_shorter_than_its_entry_is_a_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        let store = BlobStore::open(&crate::store::StoreConfig::for_tests(&url)).unwrap();
        let bytes = b"shorter than the manifest says";
        let entry = entry_of(bytes);
        store
            .put_blob(&entry.sha256, bytes.to_vec().into())
            .await
            .unwrap();
        let lying = FileEntry {
            path: "lie".into(),
            size: entry.size + 10,
            ..entry
        };
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let pulled = pull_one(&store, lying, &dest).await;
        assert!(
            matches!(pulled, Err(PullError::Mismatch { .. })),
            "{pulled:?}"
        );
        assert!(!dest.join("lie").exists());
    }

    /// One blob missing while others download: the error returned at once, the other
    /// writers went on detached, and a CLI pull's runtime shut down under them left their
    /// `.c3-pull-*` temp files in DEST. So too where the file system has no O_TMPFILE, and
    /// each temp file has a name from the start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_that_fails_leaves_no_temp_file() {
        for named in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (store, files) = store_missing_one(dir.path()).await;
            let dest = dir.path().join("dest");
            std::fs::create_dir(&dest).unwrap();
            let root = DirFd::open(&dest).unwrap();
            let _armed = named.then(|| crate::fault::arm("no-o-tmpfile", ".c3-pull-"));
            if named {
                let (name, _) = root.create_unnamed_temp(".c3-pull-").unwrap();
                root.remove_file(std::ffi::OsStr::new(&name.expect("a named temp file")))
                    .unwrap();
            }
            let pulled = pull_into(
                &store,
                files.into(),
                root,
                &dest,
                (None, None),
                false,
                &CancellationToken::new(),
            )
            .await;
            assert!(matches!(pulled, Err(PullError::Blob { .. })), "{pulled:?}");
            let left: Vec<_> = std::fs::read_dir(&dest)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(".c3-pull-"))
                .collect();
            assert!(left.is_empty(), "named {named}: {left:?}");
        }
    }

    /// What a pull killed mid-download left where the file system has no O_TMPFILE (its
    /// named temp files, root's and 0600 in a job's dataset directory) is removed by the
    /// next pull into that directory; a temp file another pull is writing stays, as does a
    /// file of that name that is not the agent's own (a second link to it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_removes_the_temp_files_a_killed_one_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let entry = FileEntry {
            path: "sub/f".into(),
            ..entry_of(b"data")
        };
        store
            .put_blob(&entry.sha256, b"data".to_vec().into())
            .await
            .unwrap();
        let dest = dir.path().join("dest");
        std::fs::create_dir_all(dest.join("sub")).unwrap();
        let sub = DirFd::open(&dest.join("sub")).unwrap();
        // All written an hour ago: what keeps two of them is their lock and their links.
        let hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        let (left, file) = sub.create_temp(TEMP_PREFIX).unwrap();
        file.set_modified(hour_ago).unwrap();
        drop(file);
        let (writing, held) = sub.create_temp(TEMP_PREFIX).unwrap();
        held.set_modified(hour_ago).unwrap();
        let (linked, file) = sub.create_temp(TEMP_PREFIX).unwrap();
        file.set_modified(hour_ago).unwrap();
        drop(file);
        let (young, file) = sub.create_temp(TEMP_PREFIX).unwrap();
        drop(file);
        std::fs::hard_link(dest.join("sub").join(&linked), dir.path().join("other")).unwrap();
        let pulled = pull_into(
            &store,
            vec![entry].into(),
            DirFd::open(&dest).unwrap(),
            &dest,
            (None, None),
            false,
            &CancellationToken::new(),
        )
        .await;
        pulled.unwrap();
        assert_eq!(std::fs::read(dest.join("sub/f")).unwrap(), b"data");
        assert!(!dest.join("sub").join(&left).exists(), "the abandoned one");
        assert!(
            dest.join("sub").join(&writing).exists(),
            "the one being written"
        );
        assert!(
            dest.join("sub").join(&linked).exists(),
            "the one with two links"
        );
        assert!(
            dest.join("sub").join(&young).exists(),
            "the one written a moment ago"
        );
        drop(held);
    }

    /// A writer blocked (in write(2) on a hung NFS DEST) held a failed pull for ever: it is
    /// waited for a while, then the error returned.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_pull_waits_for_a_stuck_writer_a_while_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, files) = store_missing_one(dir.path()).await;
        let dest = dir.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let root = DirFd::open(&dest).unwrap();
        // The first entry's writer begins before the missing one (past the 8 at a time) is
        // asked for.
        let _stuck = crate::fault::arm("pull-writer-hangs", &files[0].path);
        let began = std::time::Instant::now();
        let pulled = pull_into(
            &store,
            files.into(),
            root,
            &dest,
            (None, None),
            false,
            &CancellationToken::new(),
        )
        .await;
        assert!(matches!(pulled, Err(PullError::Blob { .. })), "{pulled:?}");
        assert!(
            began.elapsed() < WRITERS_WAIT * 2,
            "returned after {:?}",
            began.elapsed()
        );
    }

    /// A job's process grows the file to a sparse terabyte the moment root opens it: the
    /// agent must not read (and hash) the terabyte.
    #[test]
    fn a_file_grown_after_its_check_is_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let entry = entry_of(b"abc");
        assert!(same_bytes(
            std::fs::File::open(&path).unwrap(),
            &entry,
            &Default::default()
        )
        .unwrap());
        let opened = std::fs::File::open(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 40)
            .unwrap();
        let started = std::time::Instant::now();
        assert!(!same_bytes(opened, &entry, &Default::default()).unwrap());
        assert!(started.elapsed() < std::time::Duration::from_secs(30));
    }

    /// The looks a pull makes before it writes (each file in place read and hashed, each
    /// entry's stat) stop once the pull was given up (a dataset's timeout, a cancel): the
    /// blocking threads they run on outlived the pull, reading terabytes as root.
    #[test]
    fn the_looks_before_writing_stop_with_the_pull() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let entry = entry_of(b"abc");
        let stopped = std::sync::atomic::AtomicBool::new(true);
        let err = same_bytes(std::fs::File::open(&path).unwrap(), &entry, &stopped).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::Interrupted);
        let root = DirFd::open(dir.path()).unwrap();
        let none = std::collections::BTreeMap::new();
        let checked = check_room(&root, &[entry], &none, dir.path(), None, &stopped);
        assert!(matches!(checked, Err(PullError::Stopped)), "{checked:?}");
    }
}
