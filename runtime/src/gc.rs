//! `c3-agent gc`: deletes the file store's blobs that no manifest references.
//!
//! Every manifest under `jobs/` is read (the job's and each attempt's, complete or in
//! progress), and every blob it names (files and logs) is kept. A blob no manifest names is
//! deleted only once it is older than the grace period: a running job's blobs are uploaded
//! before its (in-progress) manifest lists them, which a sync, during the job or after it,
//! rewrites at least every [`crate::manifest::CHECKPOINT_EVERY`] while it stores.
//!
//! A manifest that cannot be listed, read or parsed (corrupt, too large, a newer version)
//! stops the collection before anything is deleted: what it references is unknown, and a
//! corrupt manifest must never cost data.
//!
//! Manifests written while the collection runs are read again just before deleting (those
//! new or changed since the first pass), so a job finishing meanwhile keeps what it lists.
//! A blob that was already present (an old, unreferenced one) when a new upload of the same
//! bytes found it gets its mtime set to now by the upload (`BlobStore::still_wanted`), so
//! the grace period covers it until the manifest that names it is written. The empty blob,
//! which every preflight writes, is never deleted.
//!
//! The temp files a crash left go once as old as the grace period (never under an hour):
//! puts' under `staging/`, and the `<key>#<N>` object_store writes a manifest to beside its
//! key under `jobs/`, which its listing hides.
//!
//! File store only: blobs are listed from its directory (object_store's listing carries no
//! mtime through [`BlobStore`]), manifests are read through the store. What gc deletes it
//! reaches through directory fds opened from the store's root, never through a symlink; as
//! root it refuses a root that anyone else may write (or swap, writing a directory above it).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::Arc;

use futures::StreamExt;
use nix::sys::stat::FileStat;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use c3_proto::manifest::is_sha256_hex;
use c3_proto::Manifest;

use crate::confine::{is_dir, is_regular, DirFd};
use crate::pull::DEFAULT_MAX_MANIFEST_BYTES;
use crate::store::BLOB_MIN_AGE;
use crate::store::{blob_key, BlobStore, StoreError, EMPTY_SHA256};
use crate::treewalk::{Item, TreeWalk};

/// How long an unreferenced blob is kept by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(24 * 60 * 60);

/// Staging files younger than this are never deleted: a put takes seconds, a large file's
/// staging object as long as the file takes to read.
const STAGING_MIN_AGE: Duration = Duration::from_secs(60 * 60);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Manifests read.
    pub manifests: usize,
    /// Blobs in the store.
    pub blobs: usize,
    /// Blobs deleted (with `dry_run`: that would have been).
    pub deleted: usize,
    pub bytes_freed: u64,
    /// Unreferenced blobs younger than the grace period, kept.
    pub kept_young: usize,
    /// Unreferenced blobs old by their mtime, kept until this node's gc has seen them so for
    /// the grace period by its own clock ([`Ledger`]).
    pub awaiting_second_look: usize,
    /// Blobs some manifest references (and the empty blob), kept.
    pub referenced: usize,
    /// Blobs manifests reference that are not in the store (lost before this run).
    pub missing: usize,
    /// Entries of `blobs/sha256/` that are no blob (temp files, symlinks, directories): left alone.
    pub ignored: usize,
    /// Temp files under `staging/` older than the grace period (a put a crash interrupted):
    /// deleted (with `dry_run`: would be), and their bytes.
    pub staging_deleted: usize,
    pub staging_bytes: u64,
    /// Temp files of documents under `jobs/` (`<key>#<N>`, a manifest's write a crash
    /// interrupted) as old as `staging/`'s: deleted (with `dry_run`: would be), and their
    /// bytes.
    pub torn_deleted: usize,
    pub torn_bytes: u64,
    pub dry_run: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("gc works on a file store only; `{url}` is not a usable file store (on a bucket, expire only `staging/` and incomplete multipart uploads by lifecycle rules: an age rule on `blobs/` deletes blobs that newer manifests still list, since finding a blob stored does not make it younger)")]
    NotFileStore { url: String },
    #[error("cannot open the file store {path}; nothing was deleted")]
    Root {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the file store {path} is refused: {why}; gc runs as root and deletes what it finds there, so only root (or the user root_squash makes it there) may write it and every directory above it (chown root and chmod go-w, or name another store.url); nothing was deleted")]
    UnsafeRoot { path: PathBuf, why: String },
    #[error("{} manifest(s) could not be read, so what they reference is unknown; nothing was deleted: {}", .failures.len(), first_failures(.failures))]
    Manifests { failures: Vec<(String, String)> },
    #[error("cannot read the blob directory {path}; nothing was deleted")]
    Blobs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot delete `{key}` ({deleted} blob(s) were deleted before it; the rest are kept)")]
    Delete {
        key: String,
        deleted: usize,
        #[source]
        source: StoreError,
    },
    #[error("no manifest was found under {path}, yet {blobs} blob(s) older than the grace period are stored: a `jobs/` moved, unmounted or restored in part would have every blob taken for unreferenced; nothing was deleted (put `jobs/` back; only a store that truly lists no job may have its old blobs removed by hand)")]
    NoManifests { path: PathBuf, blobs: usize },
    #[error("gc task failed")]
    Task(#[from] tokio::task::JoinError),
    #[error("the file store does not answer; nothing more was deleted")]
    Hung(#[source] std::io::Error),
}

/// Runs one of gc's own blocking file store calls (`op`) off the reactor, cut as the store's
/// own calls are ([`crate::filestore::bounded`]) when it makes no progress for `limit`: a
/// whole call, or, for a listing or a walk, between two of the entries it `tick`s. A hung
/// network file system never returns (D state on a hard NFS mount): its thread is abandoned,
/// and `c3-agent gc` (the hourly housekeeping's, after `recover`) fails instead of hanging.
async fn blocking_cut<T: Send + 'static>(
    op: &'static str,
    limit: Duration,
    f: impl FnOnce(&dyn Fn()) -> T + Send + 'static,
) -> Result<T, GcError> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let ticks = Arc::new(AtomicU64::new(0));
    let mut call = tokio::task::spawn_blocking({
        let ticks = ticks.clone();
        move || {
            crate::filestore::hang_if_armed(op);
            f(&|| {
                ticks.fetch_add(1, Relaxed);
            })
        }
    });
    let mut seen = 0;
    loop {
        match tokio::time::timeout(limit, &mut call).await {
            Ok(done) => return Ok(done?),
            Err(_) if ticks.load(Relaxed) != seen => seen = ticks.load(Relaxed),
            Err(_) => {
                return Err(GcError::Hung(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "gc's {op} made no progress for {} s (a network file system that stopped answering?)",
                        limit.as_secs()
                    ),
                )))
            }
        }
    }
}

fn first_failures(failures: &[(String, String)]) -> String {
    let mut shown: Vec<String> = failures
        .iter()
        .take(3)
        .map(|(key, why)| format!("`{key}`: {why}"))
        .collect();
    if failures.len() > 3 {
        shown.push(format!("and {} more", failures.len() - 3));
    }
    shown.join("; ")
}

/// [`collect_garbage_capped`] with the default manifest size limit.
pub async fn collect_garbage(
    store: &BlobStore,
    grace: Duration,
    dry_run: bool,
) -> Result<GcReport, GcError> {
    collect_garbage_capped(store, grace, dry_run, DEFAULT_MAX_MANIFEST_BYTES).await
}

/// Deletes the blobs of the file store `store` that no manifest references and that were
/// last modified more than `grace` ago. With `dry_run`, deletes nothing and reports what
/// it would delete. Manifests larger than `max_manifest_bytes` count as unreadable (the
/// config's `store.max_manifest_bytes`, as `pull` uses).
pub async fn collect_garbage_capped(
    store: &BlobStore,
    grace: Duration,
    dry_run: bool,
    max_manifest_bytes: u64,
) -> Result<GcReport, GcError> {
    collect_garbage_seen(store, grace, dry_run, max_manifest_bytes, None).await
}

/// [`collect_garbage_capped`], deleting a blob only once the [`Ledger`] at `ledger` (this
/// node's) has seen it unreferenced for the grace period by this node's clock.
pub async fn collect_garbage_seen(
    store: &BlobStore,
    grace: Duration,
    dry_run: bool,
    max_manifest_bytes: u64,
    ledger: Option<&Path>,
) -> Result<GcReport, GcError> {
    let root = file_root(store)?;
    let limit = store.file_limits().meta;
    let root_dir = open_root(&root, limit).await?;
    let now = {
        let root = root.clone();
        let fs_now =
            blocking_cut("gc clock", limit, move |_| crate::store::store_clock(&root)).await?;
        if fs_now.is_none() {
            // Its probe file could not be made (no inode left, a read-only root): ages are
            // by this node's clock, which may be ahead of the store's.
            tracing::warn!(
                "cannot read the file store's clock; blob ages are taken by this node's clock"
            );
        }
        earlier_now(SystemTime::now(), fs_now)
    };
    // Whatever the grace period (`--older-than 0`), a blob stored in the last hour is kept: a
    // job stores a blob before its manifest names it, and a sync under way may be minutes
    // from writing that manifest.
    let cutoff = now
        .checked_sub(grace.max(BLOB_MIN_AGE))
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };

    let mut scan = Scan::default();
    scan.run(store, (&root, &root_dir), max_manifest_bytes, limit)
        .await?;
    report.manifests = scan.read;

    let dir_path = root.join("blobs").join("sha256");
    let (dir, listed) = {
        let root_dir = root_dir.clone();
        blocking_cut("gc list", limit, move |tick| {
            let dir = match root_dir.open_dir(Path::new("blobs/sha256")) {
                Ok(dir) => dir,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            if !dry_run {
                put_back_left_aside(&dir, tick);
            }
            let listed = list_blobs(&dir, tick)?;
            Ok(Some((Arc::new(dir), listed)))
        })
        .await?
    }
    .map_err(|source| GcError::Blobs {
        path: dir_path.clone(),
        source,
    })?
    .map_or((None, Listing::default()), |(d, l)| (Some(d), l));
    let mut listed = listed;
    // Any blob but the empty one was stored by a job whose manifest names it, in progress
    // at least, within minutes: blobs and no manifest at all is a store missing its jobs.
    let empty = digest_of(EMPTY_SHA256).expect("a sha256");
    // Only the old ones: a store's first job stores blobs minutes before its first manifest.
    let stored = listed
        .blobs
        .iter()
        .filter(|b| b.sha256 != empty && b.modified < cutoff)
        .count();
    if scan.read == 0 && stored > 0 {
        return Err(GcError::NoManifests {
            path: root.join("jobs"),
            blobs: stored,
        });
    }
    report.blobs = listed.blobs.len();
    report.ignored = listed.ignored;
    // Sorted, the listing is its own index: no set of it beside.
    listed.blobs.sort_unstable_by_key(|b| b.sha256);
    let present = |sha: &Digest| listed.blobs.binary_search_by_key(sha, |b| b.sha256).is_ok();
    report.missing = scan.refs.iter().filter(|r| !present(r)).count();

    let mut doomed = Vec::new();
    for blob in &listed.blobs {
        if blob.sha256 == empty || scan.refs.contains(&blob.sha256) {
            report.referenced += 1;
        } else if blob.modified >= cutoff {
            report.kept_young += 1;
        } else {
            doomed.push(blob);
        }
    }
    // A blob's mtime is the writer's clock on a shared file system where the client sets
    // times (CephFS, Lustre, GPFS, NFS with delegated times): a node 2 h behind stored a
    // blob "2 h old", and gc elsewhere deleted it before the manifest that names it landed.
    // Past its mtime's age, a blob goes only once this node has seen it unreferenced for
    // the grace period by its own clock.
    if let Some(path) = ledger {
        let min_age = grace.max(BLOB_MIN_AGE).as_secs();
        let (path, now) = (path.to_path_buf(), Ledger::now());
        // With its age: the last saved ledger judges only while it is recent (older than the
        // grace period, saves failing for that long, blobs stored since would never be due).
        let (seen, recent) = tokio::task::spawn_blocking({
            let path = path.clone();
            move || {
                let recent = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() < min_age));
                (Ledger::load(&path), recent)
            }
        })
        .await
        .unwrap_or_default();
        // Only the blobs not due yet are noted: one deleted now and stored again before the
        // next run (by a writer whose clock is behind) is seen for the first time then.
        let mut next = Ledger::default();
        let due = |blob: &&Blob| {
            // One seen "later" than now is of a clock since stepped back: seen now. So is
            // one touched or stored again since (another version).
            let first = seen
                .first_seen(&blob.sha256, blob.version.1)
                .filter(|&t| t <= now)
                .unwrap_or(now);
            (now - first >= min_age, first)
        };
        for blob in &doomed {
            if let (false, first) = due(blob) {
                next.note(blob.sha256, first, blob.version.1);
            }
        }
        let had_seen = !seen.is_empty() && recent;
        let saved = if dry_run {
            true
        } else {
            match tokio::task::spawn_blocking(move || next.save(&path)).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) if had_seen => {
                    // The last saved ledger still judges: what it saw long enough goes.
                    tracing::warn!(error = %crate::error_chain(&e), "cannot save which blobs gc saw unreferenced; this run deletes only what an earlier run saw");
                    false
                }
                Ok(Err(e)) => {
                    // Unsaved and none saved before, every later run would see them all for
                    // the first time and none would ever be deleted: on a full disk gc
                    // would free nothing for good.
                    tracing::warn!(error = %crate::error_chain(&e), "cannot save which blobs gc saw unreferenced; this run deletes by their mtime alone");
                    false
                }
                Err(_) => false,
            }
        };
        if saved || had_seen {
            doomed.retain(|blob| {
                let (due, _) = due(blob);
                report.awaiting_second_look += usize::from(!due);
                due
            });
        }
    }
    // A put under way is never swept either.
    let staging_cutoff = cutoff.min(
        now.checked_sub(STAGING_MIN_AGE)
            .unwrap_or(SystemTime::UNIX_EPOCH),
    );
    let (staged, staged_bytes) = {
        let root_dir = root_dir.clone();
        blocking_cut("gc sweep", limit, move |tick| {
            sweep_staging(&root_dir, staging_cutoff, dry_run, tick)
        })
        .await?
    };
    report.staging_deleted = staged;
    report.staging_bytes = staged_bytes;
    (report.torn_deleted, report.torn_bytes) = {
        let root_dir = root_dir.clone();
        blocking_cut("gc sweep jobs", limit, move |tick| {
            sweep_torn_documents(&root_dir, staging_cutoff, dry_run, tick)
        })
        .await?
    };
    if dry_run {
        report.deleted = doomed.len();
        // Saturating, as the report is a count for a person: sizes come from the store.
        report.bytes_freed = doomed.iter().map(|b| b.size).fold(0, u64::saturating_add);
        return Ok(report);
    }

    // Manifests written since the first pass (a job that ended meanwhile) count too.
    scan.run(store, (&root, &root_dir), max_manifest_bytes, limit)
        .await?;
    report.manifests = scan.read.max(report.manifests);
    let doomed: Vec<&Blob> = doomed
        .into_iter()
        .filter(|blob| {
            let referenced = scan.refs.contains(&blob.sha256);
            report.referenced += usize::from(referenced);
            !referenced
        })
        .collect();
    let Some(dir) = dir else {
        return Ok(report);
    };
    // A few at once: each is a rename, a stat and an unlink. After an error none is begun,
    // and those under way end first: dropped between their rename and their last look, a
    // blob a job had just found stored was left aside, missing from its key.
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut deletions = futures::stream::iter(doomed)
        .take_while(|_| std::future::ready(!failed.load(std::sync::atomic::Ordering::Relaxed)))
        .map(|blob| delete_blob(&dir, blob, cutoff, limit))
        .buffer_unordered(DELETE_CONCURRENCY);
    let mut first_error = None;
    while let Some(outcome) = deletions.next().await {
        match outcome {
            Ok(Deleted::Yes(bytes)) => {
                report.deleted += 1;
                report.bytes_freed = report.bytes_freed.saturating_add(bytes);
            }
            Ok(Deleted::Young) => report.kept_young += 1,
            Ok(Deleted::Gone) => {}
            Err(e) => {
                failed.store(true, std::sync::atomic::Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        None => Ok(report),
        Some(Err((key, source))) => Err(GcError::Delete {
            key,
            deleted: report.deleted,
            source,
        }),
        Some(Ok(hung)) => Err(hung),
    }
}

const DELETE_CONCURRENCY: usize = 16;

/// The unreferenced blobs this node's gc saw, each since when by this node's clock (Unix
/// seconds) and with which mtime (ns): a text file, a line `<sha256 hex> <secs> <mtime ns>`
/// each, replaced whole at each run. A blob with another mtime since (touched by a job that
/// found it, stored again) is seen anew. Not its inode: some file systems make those up per
/// mount (CIFS `noserverino`, FUSE stores), and nothing would ever be deleted there.
#[derive(Debug, Default)]
pub struct Ledger {
    seen: std::collections::HashMap<Digest, (u64, i64)>,
}

impl Ledger {
    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    /// What `path` holds; an unreadable file or line is nothing seen (a later delete).
    fn load(path: &Path) -> Ledger {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ledger::default();
        };
        // A line of an older agent's (no mtime) is nothing seen: its blob is seen anew.
        let seen = text
            .lines()
            .filter_map(|l| {
                let mut fields = l.split(' ');
                let sha = digest_of(fields.next()?)?;
                let secs = fields.next()?.parse().ok()?;
                let mtime = fields.next()?.parse().ok()?;
                if fields.next().is_some() {
                    return None;
                }
                Some((sha, (secs, mtime)))
            })
            .collect();
        Ledger { seen }
    }

    fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Since when the blob was seen unreferenced with `mtime`.
    fn first_seen(&self, sha: &Digest, mtime: i64) -> Option<u64> {
        self.seen
            .get(sha)
            .filter(|(_, m)| *m == mtime)
            .map(|(secs, _)| *secs)
    }

    fn note(&mut self, sha: Digest, since: u64, mtime: i64) {
        self.seen.insert(sha, (since, mtime));
    }

    fn save(&self, path: &Path) -> Result<(), crate::statedir::StateError> {
        use std::fmt::Write;
        let mut text = String::with_capacity(self.seen.len() * 100);
        for (sha, (secs, mtime)) in &self.seen {
            let _ = writeln!(text, "{} {secs} {mtime}", hex::encode(sha));
        }
        crate::statedir::write_atomic_private(path, text.as_bytes())
    }
}

enum Deleted {
    Yes(u64),
    /// Written again since it was listed.
    Young,
    /// Gone meanwhile (another gc), or no longer a plain file: not ours to delete.
    Gone,
}

/// Deletes one unreferenced blob, unless it was written again since the listing.
/// `Err(Ok(_))`: the file store did not answer ([`blocking_cut`]).
async fn delete_blob(
    dir: &Arc<DirFd>,
    blob: &Blob,
    cutoff: SystemTime,
    limit: Duration,
) -> Result<Deleted, Result<GcError, (String, StoreError)>> {
    let sha = hex::encode(blob.sha256);
    let key = blob_key(&sha);
    let (dir, listed) = (dir.clone(), blob.version);
    let outcome = blocking_cut("gc delete", limit, move |_| {
        set_aside_and_delete(&dir, &sha, cutoff, listed)
    })
    .await
    .map_err(Ok)?;
    let deleted = outcome.map_err(|e| {
        let source = StoreError::Op {
            op: "delete",
            key: key.clone(),
            source: object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            },
        };
        Err((key.clone(), source))
    })?;
    if let Deleted::Yes(bytes) = deleted {
        tracing::debug!(key = %key, bytes, "deleted an unreferenced blob");
    }
    Ok(deleted)
}

/// The name a blob is moved to while gc makes its last check (in its own directory: a rename).
const ASIDE: &str = ".gc-";

/// Moves the blob aside, then checks its mtime one last time, then deletes it or puts it
/// back. A job that finds the blob stored touches it and then checks it is still at its key
/// ([`BlobStore`]'s `still_wanted`): touched before the move, the mtime here is young and
/// the blob is put back; after it, the job finds the key empty and stores the blob again.
/// Checking the mtime and then deleting in place would lose a blob touched in between.
fn set_aside_and_delete(
    dir: &DirFd,
    sha: &str,
    cutoff: SystemTime,
    listed: (u64, i64),
) -> std::io::Result<Deleted> {
    match dir.stat(OsStr::new(sha)) {
        Ok(st) if is_regular(&st) => {}
        _ => return Ok(Deleted::Gone),
    }
    let aside = format!("{ASIDE}{sha}.{}", crate::procfs::self_tag());
    match dir.rename(OsStr::new(sha), OsStr::new(&aside)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Deleted::Gone),
        Err(e) => return Err(e),
    }
    // From here, any failure puts the blob back first: left aside (a stat's EIO or ESTALE,
    // a failed link), a blob a job's manifest may name was missing from its key until some
    // later gc put it back, and `pull` and datasets failed meanwhile.
    let st = match dir.stat(OsStr::new(&aside)) {
        Ok(st) => st,
        Err(e) => {
            if let Err(back) = put_back(dir, OsStr::new(&aside), OsStr::new(sha)) {
                tracing::error!(blob = sha, error = %back, "a blob gc set aside could not be put back; the next gc puts it back");
            }
            return Err(e);
        }
    };
    // Touched since the listing by a writer whose clock is behind (its touch "old"), or
    // stored again: wanted, whatever its mtime says.
    if modified(&st) >= cutoff || version_of(&st) != listed {
        put_back(dir, OsStr::new(&aside), OsStr::new(sha))?;
        return Ok(Deleted::Young);
    }
    dir.remove_file(OsStr::new(&aside))?;
    Ok(Deleted::Yes(st.st_size as u64))
}

/// Returns a blob set aside to its key; a copy stored there meanwhile holds the same bytes.
fn put_back(dir: &DirFd, aside: &OsStr, name: &OsStr) -> std::io::Result<()> {
    match nix::unistd::linkat(dir, aside, dir, name, nix::fcntl::AtFlags::empty()) {
        Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    dir.remove_file(aside)
}

/// A blob file's inode and mtime (ns).
fn version_of(st: &FileStat) -> (u64, i64) {
    (
        st.st_ino,
        crate::display::file_time_ns(st.st_mtime, st.st_mtime_nsec),
    )
}

/// A file's mtime as its stat says it (one before the epoch, as the epoch).
fn modified(st: &FileStat) -> SystemTime {
    let ns = crate::display::file_time_ns(st.st_mtime, st.st_mtime_nsec);
    SystemTime::UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

/// How long a blob another node's gc set aside (by its rename's ctime) is left to it before
/// this gc puts it back.
const FOREIGN_ASIDE_SETTLED: std::time::Duration = std::time::Duration::from_secs(600);

/// Puts back every blob an interrupted gc left set aside: it may have been wanted after all,
/// and this run decides again. One set aside by a gc still running (the timer's and an
/// operator's at once) is that gc's to finish.
fn put_back_left_aside(dir: &DirFd, tick: &dyn Fn()) {
    let Ok(mut entries) = dir.try_clone().and_then(|d| TreeWalk::new(d, Vec::new())) else {
        return;
    };
    while let Some(Item::Entry(entry)) = entries.next() {
        tick();
        let name = entry.name;
        let Some((sha, owner)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(ASIDE))
            .and_then(|rest| rest.split_once('.'))
            .filter(|(sha, _)| is_sha256_hex(sha))
        else {
            continue;
        };
        if crate::procfs::tag_alive(owner) {
            continue;
        }
        // Another node's tag (a store shared by many nodes' gc) says nothing of whether its
        // gc still runs: one set aside within 10 minutes may be in flight there (it checks,
        // then deletes or puts back, in seconds), and taken back from under it, that gc
        // failed on its own blob. Older, its gc is gone (so is one of an earlier boot here).
        let in_flight_elsewhere = !crate::procfs::tag_of_this_boot(owner)
            && entry.stat.as_ref().is_ok_and(|st| {
                let changed = crate::display::file_time_ns(st.st_ctime, st.st_ctime_nsec);
                crate::display::epoch_ns(SystemTime::now()).saturating_sub(changed)
                    < FOREIGN_ASIDE_SETTLED.as_nanos() as i64
            });
        if in_flight_elsewhere {
            continue;
        }
        if entry.stat.is_ok_and(|st| is_regular(&st)) {
            let _ = put_back(dir, &name, OsStr::new(sha));
        }
    }
}

/// Deletes the plain files under `staging/` last modified before `cutoff`: the temp files of
/// puts a crash interrupted (small blobs' shards, large files' staging objects). A put takes
/// seconds, so one that old is nobody's. Directories stay: a put creates its shard only when
/// missing, and removing one under it would fail that put. Each entry is reached from its
/// directory's fd and no symlink is followed, `staging` itself included: one a job put in
/// its place (or anywhere below) would have led root's unlinks into /etc.
fn sweep_staging(root: &DirFd, cutoff: SystemTime, dry_run: bool, tick: &dyn Fn()) -> (usize, u64) {
    // staging/<shard or job>/<temp>, and one level more for object_store's own temp names.
    let sweep = Sweep {
        top: "staging",
        depth: 4,
        takes: |_| true,
    };
    let swept = sweep.run(root, cutoff, dry_run, tick);
    if swept.0 > 0 && !dry_run {
        tracing::info!(
            files = swept.0,
            bytes = swept.1,
            "deleted staging files a crash left"
        );
    }
    swept
}

/// Deletes the temp files of documents under `jobs/` last modified before `cutoff`: object_store's
/// `LocalFileSystem` writes a manifest to `<key>#<N>` beside its key and renames it over the
/// key once whole, so an agent killed mid-write left one there, which object_store's own
/// listing hides and nothing else removes. Only plain files named `<name>#<digits>` go (no
/// job id or key of the agent's has a `#`), at most as deep as an attempt's manifest
/// (`jobs/<id>/attempts/<n>/`), each reached from its directory's fd with no symlink followed,
/// `jobs` itself included. A write that stalled past `cutoff` (an hour at least) and then
/// went on finds its temp gone: its rename fails, a transient failure retried with a new
/// temp; or, if another write of the same key took the freed `#N` meanwhile, it renames that
/// one's file over the key and that write's own rename fails and is retried (the key is
/// written again whole).
fn sweep_torn_documents(
    root: &DirFd,
    cutoff: SystemTime,
    dry_run: bool,
    tick: &dyn Fn(),
) -> (usize, u64) {
    // jobs/<id>/attempts/<n>: four levels open at most.
    let sweep = Sweep {
        top: "jobs",
        depth: 4,
        takes: is_staged_temp,
    };
    let swept = sweep.run(root, cutoff, dry_run, tick);
    if swept.0 > 0 && !dry_run {
        tracing::info!(
            files = swept.0,
            bytes = swept.1,
            "deleted temp files of manifests a crash left"
        );
    }
    swept
}

/// A walk of `top` (at most `depth` directories open, `top` included) that deletes the plain
/// files `takes` names, last modified before a cutoff: each reached from its directory's fd,
/// no symlink followed. Directories stay. Returns how many files, and their bytes.
struct Sweep {
    top: &'static str,
    depth: usize,
    takes: fn(&OsStr) -> bool,
}

impl Sweep {
    fn run(
        &self,
        root: &DirFd,
        cutoff: SystemTime,
        dry_run: bool,
        tick: &dyn Fn(),
    ) -> (usize, u64) {
        let mut swept = (0, 0);
        let Ok(mut walk) = root
            .open_dir(Path::new(self.top))
            .and_then(|dir| TreeWalk::new(dir, self.top.as_bytes().to_vec()))
        else {
            return swept;
        };
        while let Some(item) = walk.next() {
            tick();
            let Item::Entry(entry) = item else {
                continue;
            };
            let Ok(st) = &entry.stat else {
                continue;
            };
            if is_dir(st) {
                if walk.depth() < self.depth {
                    if let Ok(dir) = entry.open_dir() {
                        let _ = walk.enter(dir, entry.rel);
                    }
                }
            } else if is_regular(st)
                && (self.takes)(&entry.name)
                && modified(st) < cutoff
                && (dry_run || entry.parent.remove_file(&entry.name).is_ok())
            {
                swept.0 += 1;
                swept.1 += st.st_size as u64;
            }
        }
        swept
    }
}

/// Whether `name` is one object_store's `LocalFileSystem` stages a write to: `<name>#<digits>`
/// (the names its listing hides).
fn is_staged_temp(name: &OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let name = name.as_bytes();
    let Some(at) = name.iter().rposition(|&b| b == b'#') else {
        return false;
    };
    let (stem, suffix) = (&name[..at], &name[at + 1..]);
    !stem.is_empty() && !suffix.is_empty() && suffix.iter().all(u8::is_ascii_digit)
}

/// Ages are taken from the earlier of the node's time and the store's: either clock ahead
/// would make blobs look older than they are, and gc delete one a job stored minutes ago.
fn earlier_now(node: SystemTime, store: Option<SystemTime>) -> SystemTime {
    store.map_or(node, |s| s.min(node))
}

/// The file store's directory, opened (not through a symlink) and, as root, vetted as
/// [`BlobStore::open`] vets it.
async fn open_root(root: &Path, limit: Duration) -> Result<Arc<DirFd>, GcError> {
    let path = root.to_path_buf();
    blocking_cut("gc open", limit, move |_| {
        let dir = DirFd::open(&path).map_err(|source| GcError::Root {
            path: path.clone(),
            source,
        })?;
        if nix::unistd::geteuid().is_root() {
            crate::store::vet_file_root(&dir).map_err(|why| GcError::UnsafeRoot { path, why })?;
        }
        Ok(Arc::new(dir))
    })
    .await?
}

/// Whether `dir` and every directory above it (the real ones, reached by `..` from the fd,
/// not by the path) only root may change. Someone who may write the store's root could put
/// a symlink or a tree of their own in it, and someone who may write a directory above it
/// could swap it for another. A sticky directory others write (`/tmp`) is fine above, for an
/// entry root owns: only its owner may rename it there. `squashed`: a user taken as root's
/// equal, the owner root_squash gives what root makes there (see [`crate::store::vet_file_root`]).
pub(crate) fn alone_above(dir: &DirFd, squashed: Option<u32>) -> Result<(), String> {
    use nix::fcntl::{openat, OFlag};
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let fd = |e: nix::errno::Errno| e.to_string();
    let mut cur = openat(dir, ".", flags, nix::sys::stat::Mode::empty()).map_err(fd)?;
    let mut st = nix::sys::stat::fstat(&cur).map_err(fd)?;
    let mut below: Option<FileStat> = None;
    let mut up = "the store's directory".to_string();
    let roots = |uid: u32| uid == 0 || Some(uid) == squashed;
    loop {
        let sticky_over_ours = below.is_some_and(|b| roots(b.st_uid))
            && st.st_mode & libc::S_ISVTX != 0
            && st.st_uid == 0;
        // Judged as root's when the squashed user owns it: its group and others, and any
        // named entry of an ACL, still may not write it.
        let mut judged = st;
        if roots(st.st_uid) {
            judged.st_uid = 0;
        }
        if !sticky_over_ours && !crate::statedir::root_alone(&cur, &judged)? {
            return Err(format!(
                "{up} is owned by uid {} gid {} (mode {:o}, or an ACL), not root's alone",
                st.st_uid,
                st.st_gid,
                st.st_mode & 0o7777
            ));
        }
        let parent = openat(&cur, "..", flags, nix::sys::stat::Mode::empty()).map_err(fd)?;
        let pst = nix::sys::stat::fstat(&parent).map_err(fd)?;
        if (pst.st_dev, pst.st_ino) == (st.st_dev, st.st_ino) {
            return Ok(());
        }
        (cur, below, st) = (parent, Some(st), pst);
        up = format!(
            "a directory above it (device {}, inode {})",
            st.st_dev, st.st_ino
        );
    }
}

/// The file store's directory, as [`BlobStore::open`] derives it from the URL.
fn file_root(store: &BlobStore) -> Result<PathBuf, GcError> {
    store
        .local_root()
        .map(Path::to_path_buf)
        .ok_or_else(|| GcError::NotFileStore {
            url: store.shown_url(),
        })
}

/// What the manifests reference, built up over one or more passes.
#[derive(Default)]
struct Scan {
    refs: HashSet<Digest>,
    /// Each manifest read, with the identity of its file when it was read: a later pass
    /// reads only manifests that are new or were replaced.
    seen: HashMap<String, Option<FileId>>,
    /// Manifests read in the last pass or kept from an earlier one.
    read: usize,
}

/// Device, inode, size and mtime: a manifest rewritten (a new file renamed into place)
/// differs in at least one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64, u64, i64, i64);

fn file_id(path: &Path) -> Option<FileId> {
    let md = std::fs::symlink_metadata(path).ok()?;
    Some(FileId(
        md.dev(),
        md.ino(),
        md.size(),
        md.mtime(),
        md.mtime_nsec(),
    ))
}

impl Scan {
    /// Reads every manifest not read before in the same version; fails, having deleted
    /// nothing, if any cannot be read.
    /// `limit`: how long a stat of gc's own may take ([`blocking_cut`]).
    async fn run(
        &mut self,
        store: &BlobStore,
        (root, root_dir): (&Path, &Arc<DirFd>),
        max: u64,
        limit: Duration,
    ) -> Result<(), GcError> {
        let (keys, mut failures) = {
            let root_dir = root_dir.clone();
            blocking_cut("gc list manifests", limit, move |tick| {
                list_manifests(&root_dir, tick)
            })
            .await?
        };
        let mut read = 0;
        for key in keys {
            let path = root.join(&key);
            let id = blocking_cut("gc stat", limit, move |_| file_id(&path)).await?;
            if let Some(Some(before)) = self.seen.get(&key) {
                if id == Some(*before) {
                    read += 1;
                    continue;
                }
            }
            match read_manifest(store, &key, max).await {
                Ok(manifest) => {
                    self.refs.extend(references(&manifest));
                    self.seen.insert(key, id);
                    read += 1;
                }
                Err(why) => failures.push((key, why)),
            }
        }
        self.read = read;
        failures.sort();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(GcError::Manifests { failures })
        }
    }
}

/// The keys of the manifests below the file store's `jobs/`, and what could not be looked
/// at there: any of those stops the collection, as a manifest that cannot be read does.
/// object_store's listing of a local file system leaves out, without a word, an entry it
/// cannot stat (an I/O error, a checksum error of ext4's, EACCES), and a manifest left out
/// was never read: its blobs, unreferenced, were deleted. A walk of gc's own, from the
/// store's directory fd, no symlink followed.
fn list_manifests(root: &DirFd, tick: &dyn Fn()) -> (Vec<String>, Vec<(String, String)>) {
    let (mut keys, mut failures) = (Vec::new(), Vec::new());
    let not_found = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let walk = root
        .open_dir(Path::new("jobs"))
        .and_then(|jobs| TreeWalk::new(jobs, b"jobs".to_vec()));
    let mut walk = match walk {
        Ok(walk) => walk,
        Err(e) if not_found(&e) => return (keys, failures),
        Err(e) => {
            failures.push(("jobs".into(), e.to_string()));
            return (keys, failures);
        }
    };
    while let Some(item) = walk.next() {
        tick();
        let entry = match item {
            Item::Entry(entry) => entry,
            Item::Unlisted { rel, error } => {
                failures.push((
                    String::from_utf8_lossy(&rel).into_owned(),
                    error.to_string(),
                ));
                continue;
            }
        };
        // No key of the store's is other than UTF-8 (object_store's listing failed on one).
        let key = match String::from_utf8(entry.rel.clone()) {
            Ok(key) => key,
            Err(_) => {
                let shown = String::from_utf8_lossy(&entry.rel).into_owned();
                failures.push((shown, "the name is not UTF-8".into()));
                continue;
            }
        };
        match &entry.stat {
            Err(e) if not_found(e) => {}
            Err(e) => failures.push((key, e.to_string())),
            Ok(st) if is_dir(st) => match entry.open_dir() {
                Ok(dir) => {
                    if let Err(e) = walk.enter(dir, entry.rel) {
                        failures.push((key, e.to_string()));
                    }
                }
                Err(e) if not_found(&e) => {}
                Err(e) => failures.push((key, e.to_string())),
            },
            Ok(_) if is_manifest_key(&key) => keys.push(key),
            // Readers (object_store's file store, `pull`) follow a link to a directory (an
            // operator's relocated job tree), and this walk follows none: a manifest there
            // went unread, and its blobs looked unreferenced.
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFLNK => failures.push((
                key,
                "a symbolic link: gc's walk follows none, and a manifest reached through it would go unread".into(),
            )),
            Ok(_) => {}
        }
    }
    (keys, failures)
}

/// `jobs/<id>/manifest.json` and `jobs/<id>/attempts/<n>/manifest.json` (any depth: a
/// manifest of some other layout still keeps its blobs).
fn is_manifest_key(key: &str) -> bool {
    key.starts_with("jobs/") && key.rsplit('/').next() == Some("manifest.json")
}

async fn read_manifest(store: &BlobStore, key: &str, max: u64) -> Result<Manifest, String> {
    let bytes = store
        .get_bytes_capped(key, max)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    // A large manifest is seconds of parsing: off the reactor.
    tokio::task::spawn_blocking(move || Manifest::from_json(&bytes))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| crate::error_chain(&e))
}

/// Every blob a manifest names: its files and its logs (a manifest read is checked to name
/// each by a sha256).
fn references(manifest: &Manifest) -> impl Iterator<Item = Digest> + '_ {
    let logs = manifest
        .logs
        .iter()
        .flat_map(|l| [l.stdout.sha256.as_str(), l.stderr.sha256.as_str()]);
    manifest
        .files
        .iter()
        .map(|f| f.sha256.as_str())
        .chain(logs)
        .filter_map(digest_of)
}

/// A sha256, as bytes: gc holds one per blob of the store and one per file its manifests
/// name, and as a hex `String` each took about 100 bytes more (tens of millions of small
/// blobs, a job's cheap making: gigabytes, the housekeeping killed for memory every hour).
type Digest = [u8; 32];

fn digest_of(hex_str: &str) -> Option<Digest> {
    let mut out = [0; 32];
    (is_sha256_hex(hex_str) && hex::decode_to_slice(hex_str, &mut out).is_ok()).then_some(out)
}

struct Blob {
    sha256: Digest,
    size: u64,
    modified: SystemTime,
    /// The file as listed (inode, mtime in ns): a blob touched since (a job that found it
    /// stored), or stored again, is another version, whatever its writer's clock said.
    version: (u64, i64),
}

#[derive(Default)]
struct Listing {
    blobs: Vec<Blob>,
    ignored: usize,
}

/// The plain files of `blobs/sha256/` named by a sha256 (lstat: a symlink is no blob).
fn list_blobs(dir: &DirFd, tick: &dyn Fn()) -> std::io::Result<Listing> {
    let mut listing = Listing::default();
    let mut entries = TreeWalk::new(dir.try_clone()?, Vec::new())?;
    while let Some(item) = entries.next() {
        tick();
        let entry = match item {
            Item::Entry(entry) => entry,
            Item::Unlisted { error, .. } => return Err(error),
        };
        let st = match entry.stat {
            Ok(st) => st,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        match entry.name.to_str() {
            Some(sha) if is_regular(&st) && is_sha256_hex(sha) => listing.blobs.push(Blob {
                sha256: digest_of(sha).expect("checked"),
                size: st.st_size as u64,
                modified: modified(&st),
                version: version_of(&st),
            }),
            _ => listing.ignored += 1,
        }
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node clock ahead of the store's (an NFS server's) does not age blobs: the earlier of
    /// the two is now, and the store's is read from a file made there and removed.
    #[test]
    fn ages_are_taken_from_the_earlier_clock() {
        let node = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let behind = node - Duration::from_secs(7200);
        assert_eq!(earlier_now(node, Some(behind)), behind);
        assert_eq!(earlier_now(behind, Some(node)), behind);
        assert_eq!(earlier_now(node, None), node);
        let t = tempfile::tempdir().unwrap();
        let fs_now = crate::store::store_clock(t.path()).unwrap();
        let skew = SystemTime::now()
            .duration_since(fs_now)
            .unwrap_or_else(|e| e.duration());
        assert!(skew < Duration::from_secs(60), "{skew:?}");
        assert_eq!(
            std::fs::read_dir(t.path()).unwrap().count(),
            0,
            "left its file"
        );
    }
    use crate::store::{attempt_manifest_key, manifest_key, StoreConfig};
    use bytes::Bytes;
    use c3_proto::{FileEntry, LogEntry, Logs};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        store: BlobStore,
    }

    impl Fixture {
        /// The fixture's file store with every call cut at a second.
        fn store_cut_at_a_second(&self) -> BlobStore {
            let limits = crate::filestore::Limits {
                meta: Duration::from_secs(1),
                data_floor: Duration::from_secs(1),
                data_rate: u64::MAX,
            };
            let config = StoreConfig::for_tests(&format!("file://{}", self.root.display()));
            BlobStore::open_with(&config, limits).unwrap()
        }

        async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("store");
            let store = BlobStore::open(&StoreConfig::for_tests(&format!(
                "file://{}",
                root.display()
            )))
            .unwrap();
            store.preflight().await.unwrap();
            Fixture {
                _dir: dir,
                root,
                store,
            }
        }

        /// A job with no files: a store in use lists some job (with none, gc refuses).
        async fn some_job(&self) {
            self.put(
                &attempt_manifest_key("other", 1),
                manifest("other", 1, &[], None),
            )
            .await;
        }

        fn blob_path(&self, sha: &str) -> PathBuf {
            self.root.join(blob_key(sha))
        }

        /// Stores `bytes` as a blob last modified `age` ago; returns its sha256.
        async fn blob(&self, bytes: &'static [u8], age: Duration) -> String {
            let sha = crate::digest::sha256_hex(bytes);
            self.store
                .put_blob(&sha, Bytes::from_static(bytes))
                .await
                .unwrap();
            self.age(&sha, age);
            sha
        }

        fn age(&self, sha: &str, age: Duration) {
            aged(&self.blob_path(sha), age);
        }

        fn exists(&self, sha: &str) -> bool {
            self.blob_path(sha).is_file()
        }

        async fn put(&self, key: &str, bytes: Vec<u8>) {
            self.store
                .put_document(key, Bytes::from(bytes))
                .await
                .unwrap();
        }
    }

    /// Sets `path`'s mtime `age` ago.
    fn aged(path: &Path, age: Duration) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - age)
            .unwrap();
    }

    /// The keys of the manifests `e` says could not be read (it must say so).
    fn unread_keys(e: &GcError) -> Vec<&str> {
        let GcError::Manifests { failures } = e else {
            panic!("{e}");
        };
        failures.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn manifest(job: &str, attempt: u32, files: &[&str], logs: Option<(&str, &str)>) -> Vec<u8> {
        let mut m = Manifest::new(job, None, attempt);
        for (i, sha) in files.iter().enumerate() {
            m.files.push(FileEntry {
                path_b64: None,
                path: format!("artifacts/f{i}"),
                size: 1,
                sha256: sha.to_string(),
                blake3: "0".repeat(64),
                mode: 0o644,
                mtime_ns: 0,
            });
        }
        m.logs = logs.map(|(out, err)| Logs {
            stdout: LogEntry {
                size: 1,
                sha256: out.into(),
            },
            stderr: LogEntry {
                size: 1,
                sha256: err.into(),
            },
        });
        m.to_json()
    }

    #[tokio::test]
    async fn referenced_blobs_stay_unreferenced_old_ones_go() {
        let f = Fixture::new().await;
        let file = f.blob(b"a file", 10 * DAY).await;
        let stdout = f.blob(b"stdout", 10 * DAY).await;
        let stderr = f.blob(b"stderr", 10 * DAY).await;
        let in_progress = f.blob(b"listed by a running attempt", 10 * DAY).await;
        let old = f.blob(b"nobody's, old", 2 * DAY).await;
        let young = f.blob(b"nobody's yet", Duration::from_secs(2 * 3600)).await;
        f.age(EMPTY_SHA256, 10 * DAY);
        let never_stored = "f".repeat(64);
        f.put(
            &manifest_key("done"),
            manifest("done", 1, &[&file, &never_stored], Some((&stdout, &stderr))),
        )
        .await;
        f.put(
            &attempt_manifest_key("done", 1),
            manifest("done", 1, &[&file], Some((&stdout, &stderr))),
        )
        .await;
        f.put(
            &attempt_manifest_key("running", 1),
            manifest("running", 1, &[&in_progress], None),
        )
        .await;
        // Not blobs: a symlink named like one (its target must survive) and a temp file.
        let outside = f.root.join("outside");
        std::fs::write(&outside, "keep").unwrap();
        let link = f.blob_path(&"e".repeat(64));
        std::os::unix::fs::symlink(&outside, &link).unwrap();
        std::fs::write(f.blob_path(&format!("{old}#1")), "tmp").unwrap();

        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!(
            report,
            GcReport {
                manifests: 3,
                blobs: 7,
                deleted: 1,
                bytes_freed: b"nobody's, old".len() as u64,
                kept_young: 1,
                referenced: 5,
                missing: 1,
                ignored: 2,
                dry_run: false,
                ..GcReport::default()
            }
        );
        assert!(!f.exists(&old));
        for sha in [&file, &stdout, &stderr, &in_progress, &young, EMPTY_SHA256] {
            assert!(f.exists(sha), "{sha}");
        }
        assert!(std::fs::symlink_metadata(&link).is_ok());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");

        // A shorter grace takes the young one too; running again finds nothing more.
        let report = collect_garbage(&f.store, Duration::from_secs(60), false)
            .await
            .unwrap();
        assert_eq!((report.deleted, report.kept_young), (1, 0));
        assert!(!f.exists(&young));
        let report = collect_garbage(&f.store, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!(report.deleted, 0);

        // Even with no grace at all: a blob just stored may be one a manifest is yet to name.
        let just = f.blob(b"stored a second ago", Duration::from_secs(1)).await;
        let report = collect_garbage(&f.store, Duration::ZERO, false)
            .await
            .unwrap();
        assert_eq!((report.deleted, report.kept_young), (0, 1));
        assert!(f.exists(&just));
    }

    /// A blob old by its mtime (a writer whose clock is behind, on a file system where the
    /// client sets times) goes only once this node's gc has seen it unreferenced for the
    /// grace period by its own clock; one a manifest names meanwhile stays.
    #[tokio::test]
    async fn an_old_looking_blob_goes_only_after_a_second_look_a_grace_period_later() {
        let f = Fixture::new().await;
        f.some_job().await;
        let day = Duration::from_secs(86_400);
        let orphan = f.blob(b"old by its writer's clock", 3 * day).await;
        let named = f.blob(b"named by a manifest soon", 3 * day).await;
        let ledger = f.root.parent().unwrap().join("state/gc/x.seen");
        let gc = |dry| {
            collect_garbage_seen(
                &f.store,
                day,
                dry,
                DEFAULT_MAX_MANIFEST_BYTES,
                Some(&ledger),
            )
        };
        let dry = gc(true).await.unwrap();
        assert_eq!((dry.deleted, dry.awaiting_second_look), (0, 2));
        assert!(!ledger.exists(), "a dry run writes nothing");
        let first = gc(false).await.unwrap();
        assert_eq!((first.deleted, first.awaiting_second_look), (0, 2));
        assert!(f.exists(&orphan) && f.exists(&named));
        // The manifest lands; a day passes by this node's clock (the ledger says so).
        f.put(
            &attempt_manifest_key("late", 1),
            manifest("late", 1, &[&named], None),
        )
        .await;
        let text = std::fs::read_to_string(&ledger).unwrap();
        let aged: String = text
            .lines()
            .map(|l| {
                let (hex, rest) = l.split_once(' ').unwrap();
                let (secs, version) = rest.split_once(' ').unwrap();
                format!(
                    "{hex} {} {version}\n",
                    secs.parse::<u64>().unwrap() - day.as_secs() - 1
                )
            })
            .collect();
        std::fs::write(&ledger, aged).unwrap();
        let second = gc(false).await.unwrap();
        assert_eq!((second.deleted, second.awaiting_second_look), (1, 0));
        assert!(!f.exists(&orphan));
        assert!(f.exists(&named), "a blob a manifest names now stays");
        // Deleted, it is not noted: stored again (old-looking), it is seen anew.
        assert!(!std::fs::read_to_string(&ledger).unwrap().contains(&orphan));
        // Seen "in the future" (a clock stepped back since): seen now.
        let again = f.blob(b"another old one", 3 * day).await;
        let st = std::fs::metadata(f.blob_path(&again)).unwrap();
        let version = {
            use std::os::unix::fs::MetadataExt;
            format!("{}", st.mtime() * 1_000_000_000 + st.mtime_nsec())
        };
        let future = format!("{again} {} {version}\n", Ledger::now() + 10 * day.as_secs());
        std::fs::write(&ledger, future).unwrap();
        let third = gc(false).await.unwrap();
        assert_eq!((third.deleted, third.awaiting_second_look), (0, 1));
        assert!(f.exists(&again));
        // Seen long enough, then touched by a writer whose clock is behind (as old as
        // before, another version): seen anew, not deleted.
        let aged = format!("{again} {} {version}\n", Ledger::now() - 2 * day.as_secs());
        std::fs::write(&ledger, &aged).unwrap();
        f.age(&again, 3 * day + Duration::from_secs(5));
        let touched = gc(false).await.unwrap();
        assert_eq!((touched.deleted, touched.awaiting_second_look), (0, 1));
        assert!(f.exists(&again));
        // A line of an older agent's (no mtime) is nothing seen.
        std::fs::write(
            &ledger,
            format!("{again} {}\n", Ledger::now() - 2 * day.as_secs()),
        )
        .unwrap();
        let legacy = gc(false).await.unwrap();
        assert_eq!((legacy.deleted, legacy.awaiting_second_look), (0, 1));
        // A ledger that cannot be saved (a full disk) leaves the mtime to decide where no
        // ledger was ever saved: kept for ever, gc would free nothing when space is needed
        // most.
        let blocked = f.root.parent().unwrap().join("not-a-dir");
        std::fs::write(&blocked, "").unwrap();
        let unsaved = blocked.join("x.seen");
        let fourth = collect_garbage_seen(
            &f.store,
            day,
            false,
            DEFAULT_MAX_MANIFEST_BYTES,
            Some(&unsaved),
        )
        .await
        .unwrap();
        assert_eq!((fourth.deleted, fourth.awaiting_second_look), (1, 0));
        assert!(!f.exists(&again));
    }

    /// The race a job and gc run on one blob: the job finds it stored and touches it, gc
    /// finds it old and deletes it. Whichever goes first, the blob is there when the job's
    /// manifest names it.
    #[tokio::test]
    async fn a_blob_a_job_finds_stored_is_never_lost_to_gc() {
        let f = Fixture::new().await;
        let bytes: &[u8] = b"found stored by a job";
        let sha = f.blob(bytes, 10 * DAY).await;
        let cutoff = SystemTime::now() - DAY;
        let dir = f.root.join("blobs/sha256");
        let dir_fd = DirFd::open(&dir).unwrap();

        // gc set it aside first: the job finds its key empty and stores it again.
        // Set aside by a gc that is gone (pid 0 is no process's).
        let aside = dir.join(format!("{ASIDE}{sha}.0.0"));
        std::fs::rename(f.blob_path(&sha), &aside).unwrap();
        assert!(f
            .store
            .put_blob(&sha, Bytes::from_static(bytes))
            .await
            .unwrap());
        assert!(f.exists(&sha));
        // ... and an interrupted gc's leftover is put back (same bytes) on the next run.
        put_back_left_aside(&dir_fd, &|| {});
        assert!(!aside.exists() && f.exists(&sha));
        // One another node's gc set aside a moment ago (its tag names another boot) may be
        // in flight there: left to it.
        let elsewhere = dir.join(format!("{ASIDE}{sha}.7.7.0badb007"));
        std::fs::hard_link(f.blob_path(&sha), &elsewhere).unwrap();
        put_back_left_aside(&dir_fd, &|| {});
        assert!(elsewhere.exists(), "taken from another node's gc in flight");
        std::fs::remove_file(&elsewhere).unwrap();

        let listed = || version_of(&dir_fd.stat(OsStr::new(&sha)).unwrap());
        // The job touched it first: gc's last look, after the move, sees it young.
        f.age(&sha, 10 * DAY);
        let seen = listed();
        assert!(!f
            .store
            .put_blob(&sha, Bytes::from_static(bytes))
            .await
            .unwrap());
        assert!(matches!(
            set_aside_and_delete(&dir_fd, &sha, cutoff, seen).unwrap(),
            Deleted::Young
        ));
        assert!(f.exists(&sha), "put back");

        // Touched by a writer whose clock is days behind (its touch as old as the listing
        // saw): another version than listed, put back.
        f.age(&sha, 10 * DAY);
        let seen = listed();
        f.age(&sha, 9 * DAY);
        assert!(matches!(
            set_aside_and_delete(&dir_fd, &sha, cutoff, seen).unwrap(),
            Deleted::Young
        ));
        assert!(f.exists(&sha), "put back");

        // Nobody wants it: deleted, and nothing left aside.
        f.age(&sha, 10 * DAY);
        assert!(matches!(
            set_aside_and_delete(&dir_fd, &sha, cutoff, listed()).unwrap(),
            Deleted::Yes(_)
        ));
        assert!(!f.exists(&sha));
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(ASIDE))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    /// A manifest object_store's listing leaves out without a word (an entry it cannot stat:
    /// EIO, an ext4 checksum error, or, as here, a path past PATH_MAX, which it stats by
    /// path) is one gc could not read: nothing is deleted. Left out, its blobs were.
    #[tokio::test]
    async fn a_manifest_the_listing_cannot_stat_deletes_nothing() {
        use std::io::Write;
        let f = Fixture::new().await;
        let old = f.blob(b"listed there only", 10 * DAY).await;
        // Its directory's path just short of PATH_MAX, the manifest's past it.
        let mut rel = PathBuf::from("jobs");
        let mut left = 4090 - f.root.join("jobs").as_os_str().len();
        while left > 1 {
            let n = (left - 1).min(200);
            rel.push("d".repeat(n));
            left -= n + 1;
        }
        let root = DirFd::open(&f.root).unwrap();
        let dir = root.ensure_dir(&rel, 0o700, None).unwrap();
        let (name, mut file) = dir.create_temp(".m-").unwrap();
        file.write_all(&manifest("long", 1, &[&old], None)).unwrap();
        dir.rename(OsStr::new(&name), OsStr::new("manifest.json"))
            .unwrap();
        let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap_err();
        assert!(matches!(e, GcError::Manifests { .. }), "{e}");
        assert!(f.exists(&old), "deleted a blob its manifest names");
    }

    #[tokio::test]
    async fn an_unreadable_manifest_deletes_nothing() {
        let f = Fixture::new().await;
        let old = f.blob(b"maybe someone's", 10 * DAY).await;
        f.put(&manifest_key("ok"), manifest("ok", 1, &[], None))
            .await;
        f.put(
            &attempt_manifest_key("bad", 1),
            b"{\"version\": 1, \"files\": [".to_vec(),
        )
        .await;
        let future = String::from_utf8(manifest("new", 1, &[], None))
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        f.put(&manifest_key("new"), future.into_bytes()).await;
        for dry_run in [false, true] {
            let e = collect_garbage(&f.store, DEFAULT_GRACE, dry_run)
                .await
                .unwrap_err();
            assert_eq!(
                unread_keys(&e),
                [
                    "jobs/bad/attempts/1/manifest.json",
                    "jobs/new/manifest.json"
                ],
                "{e}"
            );
            assert!(e.to_string().contains("nothing was deleted"), "{e}");
            assert!(f.exists(&old));
        }
        // Too large for the cap: unreadable as well.
        std::fs::remove_file(f.root.join("jobs/bad/attempts/1/manifest.json")).unwrap();
        std::fs::remove_file(f.root.join("jobs/new/manifest.json")).unwrap();
        let e = collect_garbage_capped(&f.store, DEFAULT_GRACE, false, 10)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("max_manifest_bytes"), "{e}");
        assert!(f.exists(&old));
        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!((report.manifests, report.deleted), (1, 1));
    }

    /// The pass before deleting sees manifests written (or rewritten) since the first.
    async fn scan_pass(scan: &mut Scan, f: &Fixture) {
        let root_dir = Arc::new(DirFd::open(&f.root).unwrap());
        scan.run(
            &f.store,
            (&f.root, &root_dir),
            1 << 20,
            crate::filestore::META_LIMIT,
        )
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_later_pass_reads_new_and_rewritten_manifests() {
        let f = Fixture::new().await;
        let (a, b, c) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        f.put(&attempt_manifest_key("j", 1), manifest("j", 1, &[&a], None))
            .await;
        let mut scan = Scan::default();
        scan_pass(&mut scan, &f).await;
        assert_eq!((scan.read, scan.refs.len()), (1, 1));
        f.put(
            &attempt_manifest_key("j", 1),
            manifest("j", 1, &[&a, &b], None),
        )
        .await;
        f.put(&manifest_key("k"), manifest("k", 1, &[&c], None))
            .await;
        scan_pass(&mut scan, &f).await;
        assert_eq!(scan.read, 2);
        assert!([&a, &b, &c]
            .iter()
            .all(|s| scan.refs.contains(&digest_of(s).unwrap())));
    }

    /// A file store that stops answering (a hung NFS server) at any of gc's own calls: gc
    /// fails within the file store's limit instead of hanging for ever, the hourly
    /// housekeeping with it.
    #[tokio::test]
    async fn a_hung_file_store_ends_gc_at_its_limit() {
        let f = Fixture::new().await;
        let old = f.blob(b"nobody's, old", 10 * DAY).await;
        let kept = f.blob(b"listed", 10 * DAY).await;
        f.put(&manifest_key("j"), manifest("j", 1, &[&kept], None))
            .await;
        let store = f.store_cut_at_a_second();
        for op in [
            "gc open",
            "gc clock",
            "gc stat",
            "gc list",
            "gc sweep",
            "gc sweep jobs",
            "gc delete",
        ] {
            let hang = crate::fault::arm(crate::filestore::HANG, op);
            let start = std::time::Instant::now();
            let gc = collect_garbage(&store, DAY, false);
            let gc = tokio::time::timeout(Duration::from_secs(20), gc).await;
            let took = start.elapsed();
            drop(hang);
            let gc = gc.unwrap_or_else(|_| panic!("gc hung at its {op}"));
            assert!(matches!(gc, Err(GcError::Hung(_))), "{op}: {gc:?}");
            assert!(took < Duration::from_secs(5), "{op}: {took:?}");
        }
        // The store back, gc works (the delete left hanging may have finished meanwhile).
        collect_garbage(&store, DAY, false).await.unwrap();
        assert!(!f.exists(&old) && f.exists(&kept));
    }

    /// A file store that stops answering while a manifest's bytes are read (the open went
    /// through): the read is cut at its limit, and gc fails (a manifest it cannot read)
    /// instead of hanging until the unit's time limit. Only the open was bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_store_hung_mid_read_ends_gc_at_its_limit() {
        let f = Fixture::new().await;
        let kept = f.blob(b"listed", 10 * DAY).await;
        f.put(&manifest_key("j"), manifest("j", 1, &[&kept], None))
            .await;
        let store = f.store_cut_at_a_second();
        let hang = crate::fault::arm(crate::filestore::HANG, "get body");
        let start = std::time::Instant::now();
        let gc = collect_garbage_capped(&store, DAY, false, 1 << 20);
        let gc = tokio::time::timeout(Duration::from_secs(20), gc).await;
        let took = start.elapsed();
        drop(hang);
        let gc = gc.expect("gc hung reading a manifest");
        assert!(matches!(gc, Err(GcError::Manifests { .. })), "{gc:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        // The store back, the manifest reads (and keeps its blob).
        collect_garbage_capped(&store, DAY, false, 1 << 20)
            .await
            .unwrap();
        assert!(f.exists(&kept));
    }

    /// Blobs and no manifest at all is a store missing its `jobs/` (moved, unmounted, restored
    /// in part): every blob would be taken for unreferenced. Nothing is deleted.
    #[tokio::test]
    async fn blobs_without_any_manifest_are_not_taken_for_garbage() {
        let f = Fixture::new().await;
        // A store's first job, minutes before its first manifest: fine, nothing to delete.
        let young = f.blob(b"young", Duration::from_secs(60)).await;
        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!((report.deleted, report.kept_young), (0, 1));
        assert!(f.exists(&young));
        let old = f.blob(b"old", 10 * DAY).await;
        let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap_err();
        assert!(matches!(e, GcError::NoManifests { blobs: 1, .. }), "{e}");
        assert!(f.exists(&old));
        f.some_job().await;
        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!(report.deleted, 1);
        assert!(!f.exists(&old));
    }

    #[tokio::test]
    async fn a_dry_run_deletes_nothing() {
        let f = Fixture::new().await;
        f.some_job().await;
        let old = f.blob(b"old", 10 * DAY).await;
        let report = collect_garbage(&f.store, DEFAULT_GRACE, true)
            .await
            .unwrap();
        assert!(report.dry_run);
        assert_eq!((report.deleted, report.bytes_freed), (1, 3));
        assert!(f.exists(&old));
    }

    #[tokio::test]
    async fn staging_files_a_crash_left_go_once_older_than_the_grace_period() {
        let f = Fixture::new().await;
        let staging = f.root.join("staging");
        let file = |rel: &str, bytes: &[u8], age: Duration| {
            let path = staging.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            aged(&path, age);
            path
        };
        let small = file(".small-07/4242-0011223344556677", b"12345", 2 * DAY);
        let large = file("job-1/4242-0", b"123", 2 * DAY);
        let busy = file(".small-08/4343-8899aabbccddeeff", b"young", Duration::ZERO);
        // A symlink is no temp file, and what it points to is not the store's.
        let outside = f.root.parent().unwrap().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, staging.join(".small-08/link")).unwrap();

        // A grace period of zero still spares a put under way.
        let now = collect_garbage(&f.store, Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!((now.staging_deleted, now.staging_bytes), (2, 8));
        let dry = collect_garbage(&f.store, DEFAULT_GRACE, true)
            .await
            .unwrap();
        assert_eq!((dry.staging_deleted, dry.staging_bytes), (2, 8));
        assert!(small.exists() && large.exists());

        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!((report.staging_deleted, report.staging_bytes), (2, 8));
        assert!(!small.exists() && !large.exists());
        assert!(busy.exists(), "a put under way keeps its temp file");
        assert!(outside.exists() && staging.join(".small-08").is_dir());
    }

    /// An agent killed while it wrote a manifest left object_store's temp file beside the key
    /// (`<key>#<N>`, renamed over it once whole). object_store's listing hides such names, and
    /// gc swept only `staging/`: they stayed for ever, a manifest's size each.
    #[tokio::test]
    async fn torn_manifest_temps_go_once_older_than_the_grace_period() {
        let f = Fixture::new().await;
        let kept = f.blob(b"listed", 10 * DAY).await;
        let listing = manifest("j", 1, &[&kept], None);
        f.put(&manifest_key("j"), listing.clone()).await;
        f.put(&attempt_manifest_key("j", 1), listing.clone()).await;
        let file = |rel: &str, bytes: &[u8], age: Duration| {
            let path = f.root.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
            aged(&path, age);
            path
        };
        let torn = [
            file("jobs/j/manifest.json#1", b"{\"vers", 2 * DAY),
            file("jobs/j/attempts/1/manifest.json#1", b"{", 2 * DAY),
            file("jobs/j/attempts/2/manifest.json#12", b"", 2 * DAY),
        ];
        // A write under way, and what is no temp of object_store's: kept.
        let busy = file(
            "jobs/j/attempts/3/manifest.json#1",
            b"young",
            Duration::ZERO,
        );
        let not_temps = [
            file("jobs/j/manifest.json#", b"x", 2 * DAY),
            file("jobs/j/manifest.json#1a", b"x", 2 * DAY),
            file("jobs/j/#1", b"x", 2 * DAY),
        ];
        let manifests = [
            f.root.join(manifest_key("j")),
            f.root.join(attempt_manifest_key("j", 1)),
        ];
        for m in &manifests {
            aged(m, 2 * DAY);
        }

        let dry = collect_garbage(&f.store, DEFAULT_GRACE, true)
            .await
            .unwrap();
        assert!(torn.iter().all(|t| t.exists()), "a dry run deleted");

        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        for t in &torn {
            assert!(!t.exists(), "{} stayed", t.display());
        }
        assert!(busy.exists(), "a write under way keeps its temp file");
        for kept in not_temps.iter().chain(&manifests) {
            assert!(kept.exists(), "{} went", kept.display());
        }
        assert!(f.exists(&kept));
        assert_eq!((dry.torn_deleted, dry.torn_bytes), (3, 7));
        assert_eq!((report.torn_deleted, report.torn_bytes), (3, 7));
        assert_eq!((report.staging_deleted, report.deleted), (0, 0));
        // Running again finds nothing more.
        let again = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!(again.torn_deleted, 0);
    }

    /// An operator moved a job's tree elsewhere and left a symlink (`jobs/moved -> /big/moved`):
    /// the file store's readers follow it, gc follows none, and the blobs of the manifest
    /// there, unread, were deleted. Any symlink below `jobs/` stops the collection, as a
    /// manifest that cannot be read does; one named like a temp file is not followed either.
    #[tokio::test]
    async fn a_symlink_below_jobs_stops_the_collection() {
        let f = Fixture::new().await;
        let listed = f.blob(b"listed over there", 10 * DAY).await;
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::write(
            elsewhere.path().join("manifest.json"),
            manifest("moved", 1, &[&listed], None),
        )
        .unwrap();
        std::fs::create_dir_all(f.root.join("jobs")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), f.root.join("jobs/moved")).unwrap();
        let target = elsewhere.path().join("manifest.json#1");
        std::fs::write(&target, b"root's").unwrap();
        aged(&target, 2 * DAY);
        let link = f.root.join("jobs/j/attempts/4/manifest.json#1");
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = collect_garbage(&f.store, Duration::ZERO, false)
            .await
            .unwrap_err();
        assert_eq!(
            unread_keys(&e),
            ["jobs/j/attempts/4/manifest.json#1", "jobs/moved"],
            "{e}"
        );
        assert!(f.exists(&listed), "a blob listed through the symlink went");
        assert!(target.exists() && std::fs::symlink_metadata(&link).is_ok());
    }

    /// A job that may write the store's root swapped `staging` for a symlink to a directory
    /// of root's: gc, as root, deleted every file older than an hour there.
    #[tokio::test]
    async fn a_symlink_in_place_of_staging_is_not_followed() {
        let f = Fixture::new().await;
        let elsewhere = tempfile::tempdir().unwrap();
        let keep = elsewhere.path().join("passwd");
        std::fs::write(&keep, b"root:x:0:0").unwrap();
        aged(&keep, 2 * Duration::from_secs(3600));
        let staging = f.root.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::os::unix::fs::symlink(elsewhere.path(), &staging).unwrap();
        // As root the store is refused outright (`vet_file_root`); otherwise the sweep does
        // not follow it.
        match collect_garbage(&f.store, Duration::ZERO, false).await {
            Ok(report) => assert_eq!(report.staging_deleted, 0),
            Err(e) => assert!(matches!(e, GcError::UnsafeRoot { .. }), "{e}"),
        }
        assert!(keep.exists(), "followed the symlink at staging/");
        std::fs::remove_file(&staging).unwrap();

        // blobs/sha256 too: the directory it leads to is no store's, and nothing in it goes.
        let sha = crate::digest::sha256_hex(b"root:x:0:0");
        let named_like_a_blob = elsewhere.path().join(&sha);
        std::fs::rename(&keep, &named_like_a_blob).unwrap();
        let blobs = f.root.join("blobs/sha256");
        std::fs::rename(&blobs, f.root.join("blobs/moved")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &blobs).unwrap();
        let e = collect_garbage(&f.store, Duration::ZERO, false)
            .await
            .unwrap_err();
        assert!(
            matches!(e, GcError::Blobs { .. } | GcError::UnsafeRoot { .. }),
            "{e}"
        );
        assert!(named_like_a_blob.exists(), "followed blobs/sha256");
    }

    /// As root, gc refuses a store whose directory (or one above it) someone else may write:
    /// they could plant there, or swap it, whatever root then deletes.
    #[tokio::test]
    async fn a_store_others_may_write_is_refused_to_root() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (the check is made only for root)");
            return;
        }
        let f = Fixture::new().await;
        f.some_job().await;
        let old = f.blob(b"old", 10 * DAY).await;
        for dir in [f.root.clone(), f.root.parent().unwrap().into()] {
            let was = std::fs::metadata(&dir).unwrap().permissions();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
                .await
                .unwrap_err();
            std::fs::set_permissions(&dir, was).unwrap();
            assert!(matches!(e, GcError::UnsafeRoot { .. }), "{e}");
            assert!(e.to_string().contains("not root's alone"), "{e}");
            assert!(f.exists(&old));
        }
        // Owned by a user.
        std::os::unix::fs::chown(&f.root, Some(1000), None).unwrap();
        let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap_err();
        assert!(matches!(e, GcError::UnsafeRoot { .. }), "{e}");
        std::os::unix::fs::chown(&f.root, Some(0), None).unwrap();
        // The top root's, a directory root writes below it a user's (a store a non-root
        // agent made first, only its top chowned), or a symlink: refused too.
        std::fs::create_dir_all(f.root.join("staging/.small-07")).unwrap();
        for rel in ["staging", "staging/.small-07", "blobs/sha256"] {
            std::os::unix::fs::chown(f.root.join(rel), Some(1000), None).unwrap();
            let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
                .await
                .unwrap_err();
            std::os::unix::fs::chown(f.root.join(rel), Some(0), None).unwrap();
            assert!(
                e.to_string().contains(&format!("{rel}/ in the store")),
                "{e}"
            );
        }
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::remove_dir(f.root.join("staging/.small-07")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), f.root.join("staging/.small-07")).unwrap();
        let e = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        std::fs::remove_file(f.root.join("staging/.small-07")).unwrap();
        let report = collect_garbage(&f.store, DEFAULT_GRACE, false)
            .await
            .unwrap();
        assert_eq!(report.deleted, 1);
    }

    #[tokio::test]
    async fn an_empty_store_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&StoreConfig::for_tests(&format!(
            "file://{}/never-used",
            dir.path().display()
        )))
        .unwrap();
        let report = collect_garbage(&store, DEFAULT_GRACE, false).await.unwrap();
        assert_eq!(report, GcReport::default());
    }

    #[tokio::test]
    async fn only_the_file_store() {
        let e = collect_garbage(&BlobStore::in_memory(), DEFAULT_GRACE, false)
            .await
            .unwrap_err();
        assert!(matches!(e, GcError::NotFileStore { .. }), "{e}");
    }
}
