//! From inside the job (contract §4): `publish` stores named files now, `wait_all` stores
//! everything pending so far. Served by the collector task (which owns the book) through the
//! agent socket; a reply says `ok` only once every blob is stored and listed in the
//! in-progress manifest.

use std::os::fd::{AsFd, AsRawFd};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use c3_proto::manifest::rel_display;
use c3_proto::{PublishedFile, SocketReply, SocketRequest};

use crate::collect::{scan, FileStamp, LocalFile};
use crate::confine::{DirFd, JobReader};
use crate::jobproc::JobProcesses;
use crate::manifest::ManifestWriter;
use crate::sync::{upload_all, OlderVersion, SyncBook};
use crate::upload::{UploadError, Uploader};

pub use c3_proto::socket::MAX_PATHS;

/// The longest rest after one request ([`paced`]).
pub const MAX_REQUEST_REST: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a look at the job's open files ([`look_at_open_files`]) may take before the
/// agent stops waiting on it.
pub const OPEN_FILES_LOOK_LIMIT: Duration = Duration::from_secs(10);

/// Why a look at the job's open files gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookFailed {
    /// An earlier look never answered and still holds its thread: another would only stick
    /// beside it.
    Stuck,
    /// This look did not answer within [`OPEN_FILES_LOOK_LIMIT`]; it is left to its thread.
    TimedOut,
    /// The look's task failed (a panic).
    Failed,
}

/// Runs `look` (a read of the job's processes' fds and `maps`) off the reactor, at the
/// agent's gentle priority, for at most [`OPEN_FILES_LOOK_LIMIT`]. Reading a process's `maps`
/// waits on its memory lock, which a thread in D state holds for as long as it stays there (a
/// wedged GPU, a page fault on a silent FUSE mount of the job's), past SIGKILL: waited for
/// without a limit, one such process held the collector, the job's end and the agent's exit
/// for ever. `looking` is held while a look runs, and stays held by one that never answers,
/// so that at most one thread sticks for each flag (live sync keeps one for its settle looks
/// and one for the job's requests).
///
/// `gently`: at the agent's idle priority (live sync's own looks); a look a job's request
/// waits on runs at the normal one (`paced` already rests the job's requests), else on a node
/// whose job keeps every core busy it took past the limit, and every `wait_all` was refused.
pub async fn look_at_open_files<T: Send + 'static>(
    looking: &Arc<AtomicBool>,
    gently: bool,
    look: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LookFailed> {
    if looking.swap(true, Ordering::AcqRel) {
        return Err(LookFailed::Stuck);
    }
    let done = looking.clone();
    let work = move || {
        let found = look();
        done.store(false, Ordering::Release);
        found
    };
    let task = if gently {
        futures::FutureExt::boxed(crate::pace::spawn_gently(work))
    } else {
        futures::FutureExt::boxed(tokio::task::spawn_blocking(work))
    };
    match tokio::time::timeout(OPEN_FILES_LOOK_LIMIT, task).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(_)) => {
            looking.store(false, Ordering::Release);
            Err(LookFailed::Failed)
        }
        Err(_) => Err(LookFailed::TimedOut),
    }
}

/// Serves one request; returns with when the next may be served: after a rest as long as
/// this one took (at most [`MAX_REQUEST_REST`]), so that a job's requests get at most half
/// the collector's time. A request's cost is the job's to choose (a `touch` before each
/// `publish` rewrites both manifests, up to `store.max_manifest_bytes` each; a `wait_all`
/// scans the tree and `/proc`), and in a loop it was all the root agent did, at full speed,
/// past `bandwidth_limit`. A cheap request (a small book, nothing new) rests a few
/// milliseconds. With live sync or without.
pub async fn paced<F: std::future::Future>(serve: F) -> (F::Output, tokio::time::Instant) {
    let began = tokio::time::Instant::now();
    crate::fault::pause_for("slow-request", std::time::Duration::from_secs(1)).await;
    let out = serve.await;
    (
        out,
        tokio::time::Instant::now() + began.elapsed().min(MAX_REQUEST_REST),
    )
}

/// One request from the socket, and where its answer goes.
pub struct PublishCall {
    pub request: SocketRequest,
    pub reply: oneshot::Sender<SocketReply>,
}

/// What serving a request needs besides the book (all owned by the collector).
pub struct Parts<'a> {
    pub uploader: &'a Uploader,
    pub manifest: &'a ManifestWriter,
    pub workdir: &'a Path,
    /// The job's spelling of the workdir, when it is not the agent's ([`physical_path`]).
    pub physical_workdir: Option<&'a Path>,
    pub dirs: &'a [String],
    pub reader: Option<&'a JobReader>,
    pub procs: Option<&'a JobProcesses>,
    /// Held while a look at the job's open files runs ([`look_at_open_files`]): live sync's
    /// own, when it serves the request.
    pub looking: &'a Arc<AtomicBool>,
}

pub async fn serve(parts: &Parts<'_>, book: &mut SyncBook, request: SocketRequest) -> SocketReply {
    let before = book.generation();
    let reply = match request {
        SocketRequest::Publish { paths } => publish(parts, book, paths).await,
        SocketRequest::WaitAll => wait_all(parts, book).await,
    };
    // A request that failed part way (one file too large, one that changed) stored the others
    // first: listed now, not at the job's end. With live sync off nothing else writes an
    // in-progress manifest, and a job that retried its failing barrier every few minutes had
    // hours of stored checkpoints in no manifest (lost with the node, then taken by `gc`).
    // Only one that changed the book: a refused path writes nothing.
    if !reply.ok && book.generation() != before && !book.listed() {
        if let Err(e) = parts.manifest.in_progress(book).await {
            tracing::warn!(error = %crate::error_chain(&e), "cannot write the in-progress manifest after a failed publish request");
        }
    }
    reply
}

/// Stores exactly the bytes each file has now; a file that changes meanwhile fails the call
/// ("changed while publishing") and is synced again normally, never stored torn.
async fn publish(parts: &Parts<'_>, book: &mut SyncBook, paths: Vec<String>) -> SocketReply {
    if paths.is_empty() {
        return SocketReply::error("publish needs at least one path");
    }
    // The root agent's work per request is bounded: a 1 MiB request line holds 65,000 copies
    // of one short path, and each would be a file to open and hash.
    let mut seen = std::collections::HashSet::new();
    let paths: Vec<String> = paths
        .into_iter()
        .filter(|p| seen.insert(p.clone()))
        .collect();
    if paths.len() > MAX_PATHS {
        return SocketReply::error(format!(
            "publish takes at most {MAX_PATHS} paths at once ({} given); publish a directory's files in batches, or use wait_all",
            paths.len()
        ));
    }
    // One file named in many spellings (`a`, `./a`, `././a`, an absolute path) is one file:
    // each spelling was read and hashed again, a 20 GiB checkpoint a thousand times.
    let mut files: Vec<LocalFile> = Vec::new();
    let mut located = std::collections::HashSet::new();
    for path in &paths {
        match locate(parts, path).await {
            Ok(file) => {
                if located.insert(file.rel.clone()) {
                    files.push(file);
                }
            }
            Err(e) => return SocketReply::error(e),
        }
    }
    // A version the book already holds is answered from it, not read again; the reply
    // lists the files in the order they were named.
    let mut published: Vec<Option<PublishedFile>> = files
        .iter()
        .map(|f| {
            book.current_digests(&f.rel, &f.stamp)
                .map(|d| PublishedFile {
                    path: f.rel.clone(),
                    sha256: d.sha256_hex(),
                    size: d.size,
                })
        })
        .collect();
    let todo: Vec<(usize, &LocalFile)> = files
        .iter()
        .enumerate()
        .filter(|(i, _)| published[*i].is_none())
        .collect();
    // The book holds no more than a manifest can list, as live sync's candidates do: each
    // request of 1,000 hard links of 16 KiB paths added 16 MiB to the root agent's book,
    // without end (a link is not read again, only listed).
    let room = parts.manifest.max_bytes();
    if admitted(book, todo.iter().map(|(_, f)| f.rel.as_str()), room) < todo.len() {
        return SocketReply::error(format!(
            "{TOO_MANY_FILES} (store.max_manifest_bytes); not published"
        ));
    }
    // Who writes what, looked at before the reads, each of which takes only the version
    // located (`upload_as_seen`): a file the job holds open for writing or mapped writable is
    // stored as it is now, but taken as racy, read again by the next look. Stores through a
    // mapping to pages already dirty move no stamp, and a version published and taken as
    // current was listed by the complete manifest over the bytes the file ended with.
    let held = match parts.procs.cloned() {
        Some(procs) if !todo.is_empty() => look_at_open_files(parts.looking, false, move || {
            crate::procfs::written_by(&procs.members())
        })
        .await
        .ok(),
        _ => Some(Default::default()),
    };
    // Hard links of one version (one inode, one stamp) are read once: a job naming a
    // thousand links of a 1 GiB file it holds open (a held file is read whatever the book
    // says) had root read and hash a terabyte a request. The others take its digests.
    let mut first_of: std::collections::HashMap<FileStamp, usize> = Default::default();
    let mut links: Vec<(usize, usize)> = Vec::new();
    let todo: Vec<(usize, &LocalFile)> = todo
        .into_iter()
        .filter(|(i, f)| match first_of.entry(f.stamp) {
            std::collections::hash_map::Entry::Occupied(first) => {
                links.push((*i, *first.get()));
                false
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(*i);
                true
            }
        })
        .collect();
    let mut read: std::collections::HashMap<usize, (crate::upload::Uploaded, bool)> =
        Default::default();
    let at_once = parts.uploader.options().files_in_flight.max(1);
    for batch in todo.chunks(at_once) {
        // Not looked at (the look did not answer) counts as held. Each read takes only the
        // version located, this inode.
        let held_now: Vec<bool> = batch
            .iter()
            .map(|(_, f)| {
                held.as_ref()
                    .is_none_or(|h| h.contains(&(f.stamp.dev, f.stamp.ino)))
            })
            .collect();
        let uploads = batch
            .iter()
            .zip(&held_now)
            .map(|((_, f), &held)| parts.uploader.upload_as_seen_held(f, held));
        let results = futures::future::join_all(uploads).await;
        for (((i, file), result), &held) in batch.iter().zip(results).zip(&held_now) {
            match result {
                Ok(mut up) => {
                    up.racy |= held;
                    published[*i] = Some(PublishedFile {
                        path: up.rel.clone(),
                        sha256: up.digests.sha256_hex(),
                        size: up.digests.size,
                    });
                    read.insert(*i, (up.clone(), held));
                    match held {
                        true => book.record_held(up),
                        false => book.record(up),
                    }
                }
                Err(UploadError::Changed { .. }) => {
                    return SocketReply::error(format!(
                        "{} changed while publishing; not published (it is synced again once it settles)",
                        file.rel
                    ))
                }
                Err(e) => return SocketReply::error(told_the_job(&e)),
            }
        }
    }
    for (i, first) in links {
        let Some((up, held)) = read.get(&first) else {
            continue;
        };
        let up = crate::upload::Uploaded {
            rel: files[i].rel.clone(),
            // Its blob was added (if at all) by the first.
            new_bytes: 0,
            ..up.clone()
        };
        published[i] = Some(PublishedFile {
            path: up.rel.clone(),
            sha256: up.digests.sha256_hex(),
            size: up.digests.size,
        });
        match *held {
            true => book.record_held(up),
            false => book.record(up),
        }
    }
    let published: Vec<PublishedFile> = published.into_iter().flatten().collect();
    match parts.manifest.in_progress(book).await {
        Ok(_) => SocketReply::ok(published),
        Err(e) => SocketReply::error(manifest_failure_told(&e)),
    }
}

/// A barrier: every file of the output dirs that is not stored in its current version and
/// that no process of the job holds open for writing is stored now.
async fn wait_all(parts: &Parts<'_>, book: &mut SyncBook) -> SocketReply {
    let (workdir, dirs, reader) = (
        parts.workdir.to_path_buf(),
        parts.dirs.to_vec(),
        parts.reader.cloned(),
    );
    let room = parts.manifest.max_bytes();
    // At the normal priority, as the look of the job's open files a request waits on: at
    // the idle one (live sync's own scans'), on a node whose job keeps every core busy the
    // scan took minutes, and live sync, which serves the request inline, stalled with it.
    // A job calling wait_all in a loop is rested by `paced`, not by starving its scans.
    let Ok(found) =
        tokio::task::spawn_blocking(move || scan(&workdir, &dirs, reader.as_ref(), room)).await
    else {
        return SocketReply::error("the scan of the output dirs failed");
    };
    // Who writes what, looked at after the scan: a file opened since is still being written.
    let open = match parts.procs.cloned() {
        Some(procs) => {
            let look = look_at_open_files(parts.looking, false, move || {
                crate::fault::blocking_pause("wait-all-look-hangs", Duration::from_secs(3600));
                crate::procfs::written_by(&procs.members())
            })
            .await;
            match look {
                Ok(open) => open,
                Err(why) => {
                    if why == LookFailed::TimedOut {
                        tracing::warn!(
                            limit_s = OPEN_FILES_LOOK_LIMIT.as_secs(),
                            "a wait_all's look at the job's open files did not answer; wait_all is refused (the final sync takes the files)"
                        );
                    }
                    return SocketReply::error(
                        "the look at the job's open files did not answer; nothing stored by this call (the files are stored at the end)",
                    );
                }
            }
        }
        None => Default::default(),
    };
    // What the final sync counts as unstored is no "everything is stored" here: a job that
    // deletes its older checkpoints once wait_all answers ok would delete what never was.
    let unread: Vec<String> = found
        .incomplete
        .iter()
        .map(|d| format!("{}/ (could not be read whole)", rel_display(d)))
        .chain(
            found
                .refused
                .iter()
                .map(|d| format!("{}/ (paths too deep or long to store)", rel_display(d))),
        )
        .chain(
            found
                .owner_only
                .iter()
                .map(|r| format!("{r} (open to its owner alone)")),
        )
        .chain(found.refused_more_text())
        .collect();
    // A file the scan could look for and did not find is gone: kept, a job that made and
    // deleted new names between requests (with live sync off) had the book hold every name
    // it ever made. A file still there keeps the version stored before until its new one
    // lands (`OlderVersion::Kept`).
    book.forget(|k| !found.files.contains_key(k) && found.covers(k));
    let mut todo: Vec<_> = found
        .files
        .into_iter()
        .filter(|(rel, stamp)| {
            !book.is_current(rel, stamp) && !open.contains(&(stamp.dev, stamp.ino))
        })
        .collect();
    let admits = admitted(book, todo.iter().map(|(rel, _)| rel.as_str()), room);
    let left_out = todo.len() - admits;
    todo.truncate(admits);
    crate::fault::pause_point("wait-all-before-reads").await;
    let report = upload_all(
        parts.uploader,
        parts.workdir,
        todo,
        book,
        OlderVersion::Kept,
        Some(parts.manifest),
    )
    .await;
    if let Some((path, e)) = report.failures.first() {
        return SocketReply::error(format!("{path}: {}", told_the_job(e)));
    }
    match parts.manifest.in_progress(book).await {
        Ok(_) if left_out > 0 => SocketReply::error(format!(
            "{TOO_MANY_FILES} (store.max_manifest_bytes): {left_out} not stored"
        )),
        Ok(_) if unread.is_empty() => SocketReply::ok(Vec::new()),
        Ok(_) => SocketReply::error(not_all_read(unread)),
        Err(e) => SocketReply::error(manifest_failure_told(&e)),
    }
}

/// What a request is answered when storing its files would list more than a manifest can.
const TOO_MANY_FILES: &str = "more files than a manifest can list";

/// How many of `rels` (in order) the book may take in and still fit a manifest of `room`
/// bytes of entries: a path it lists already costs nothing more.
fn admitted<'a>(book: &SyncBook, rels: impl IntoIterator<Item = &'a str>, room: u64) -> usize {
    let mut tracked = book.entries_ceiling();
    let mut taken = 0;
    for rel in rels {
        if !book.contains(rel) {
            tracked += c3_proto::manifest::entry_ceiling(rel);
            if tracked > room {
                break;
            }
        }
        taken += 1;
    }
    taken
}

/// Places named in a failed `wait_all`; the rest are counted (each may be 16 KiB long, and a
/// scan keeps 100 of each kind).
const NAMED_UNREAD: usize = 3;

fn not_all_read(unread: Vec<String>) -> String {
    let more = unread.len().saturating_sub(NAMED_UNREAD);
    let mut named: Vec<String> = unread
        .into_iter()
        .take(NAMED_UNREAD)
        .map(|p| crate::display::clip_text(p, 1024))
        .collect();
    if more > 0 {
        named.push(format!("{more} more"));
    }
    format!(
        "what could be read is stored, but not everything pending: {} (an upload failure at the end too)",
        named.join(", ")
    )
}

/// What a failed upload tells the job: its own file's trouble in full, the store's only as
/// "failed" (the store's error names its endpoint, bucket, keys and a piece of its reply:
/// the node's business, logged for the operator).
fn told_the_job(e: &UploadError) -> String {
    match e {
        UploadError::Store { path, .. } | UploadError::Task { path, .. } => {
            tracing::warn!(path = %path.display(), error = %crate::error_chain(e), "a publish or wait_all upload failed");
            format!(
                "{}: the upload failed (the agent's log says why); it is retried at the end",
                path.display()
            )
        }
        _ => crate::error_chain(e),
    }
}

/// What a failed in-progress manifest write tells the job: that it is too large in full
/// (the job's own doing), the store's error only as "failed", as [`told_the_job`] (its text
/// names the endpoint, bucket and keys, and an S3 denial's body the node's role).
fn manifest_failure_told(e: &crate::store::StoreError) -> String {
    const STORED: &str = "stored, but the in-progress manifest could not be written";
    if matches!(e, crate::store::StoreError::TooLarge { .. }) {
        return format!("{STORED}: {}", crate::error_chain(e));
    }
    tracing::warn!(error = %crate::error_chain(e), "a publish or wait_all could not write the in-progress manifest");
    format!("{STORED} (the agent's log says why); it is written again at the end")
}

/// The directory's path as the kernel names it, the spelling `getcwd` gives the job in it:
/// read from the open fd, not looked up by path. A lookup by path for each request (a
/// `canonicalize`, bounded in time but never cancelled) left a blocking thread stuck per
/// request behind a mount that does not answer, until the pool was used up.
pub fn physical_path(dir: &impl AsFd) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd()))
        .ok()
        .filter(|p| p.is_absolute())
}

/// The file a job names: below one of its output dirs, a regular file reached without any
/// symlink, one its user may read.
async fn locate(parts: &Parts<'_>, path: &str) -> Result<LocalFile, String> {
    let given = Path::new(path);
    let rel_path = if given.is_absolute() {
        // The job's cwd is the workdir's physical path (it was entered by fd, and getcwd
        // resolves a jobs_root reached through a symlink, `/scratch -> /mnt/scratch`): that
        // spelling is the workdir too. What follows is resolved below the pinned directory.
        given
            .strip_prefix(parts.workdir)
            .ok()
            .or_else(|| {
                parts
                    .physical_workdir
                    .and_then(|p| given.strip_prefix(p).ok())
            })
            .ok_or_else(|| format!("{path} is outside the job's output dirs; not published"))?
    } else {
        given
    };
    let mut parts_of = Vec::new();
    for c in rel_path.components() {
        match c {
            Component::Normal(p) => parts_of.push(
                p.to_str()
                    .ok_or_else(|| format!("{path}: the name is not UTF-8"))?
                    .to_string(),
            ),
            Component::CurDir => {}
            _ => return Err(format!("{path} must not contain `..`; not published")),
        }
    }
    let rel = parts_of.join("/");
    if !c3_proto::manifest::path_fits(rel.as_bytes()) {
        return Err(format!(
            "{path}: deeper than 128 directories or longer than 16 KiB; not published"
        ));
    }
    if !parts
        .dirs
        .iter()
        .any(|d| rel.starts_with(d.as_str()) && rel.as_bytes().get(d.len()) == Some(&b'/'))
    {
        return Err(format!(
            "{path} is outside the job's output dirs; not published"
        ));
    }
    let (workdir, r, reader) = (
        parts.workdir.to_path_buf(),
        rel.clone(),
        parts.reader.cloned(),
    );
    // At the normal priority, as `wait_all`'s scan (see there).
    let checked = tokio::task::spawn_blocking(move || -> Result<FileStamp, String> {
        let why = |e: std::io::Error| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR) => {
                format!("{r} is (or goes through) a symlink; not published")
            }
            _ if e.kind() == std::io::ErrorKind::NotFound => format!("{r} does not exist"),
            _ => format!("{r}: {e}"),
        };
        // As the scan does: every directory on the way must be one the job's user may enter
        // (a 0644 file under a root-owned 0700 directory is not the job's to publish).
        let file = match &reader {
            Some(rd) => crate::confine::open_read_as(&workdir, Path::new(&r), rd)
                .map_err(why)?
                .ok_or_else(|| {
                    format!("{r}: a directory on the way is not readable by the job's user; not published")
                })?,
            None => DirFd::open_root(&workdir)
                .map_err(|e| format!("{r}: {e}"))?
                .open_file(Path::new(&r))
                .map_err(why)?,
        };
        let st = crate::confine::fstat(&file).map_err(|e| format!("{r}: {e}"))?;
        if !crate::confine::is_regular(&st) {
            return Err(format!("{r} is not a regular file; not published"));
        }
        if let Some(false) = reader
            .map(|rd| rd.may_read(&file, &st))
            .transpose()
            .map_err(|e| format!("{r}: {e}"))?
        {
            return Err(format!(
                "{r} is not readable by the job's user; not published"
            ));
        }
        Ok(FileStamp::of_stat(&st))
    })
    .await
    .map_err(|_| format!("{path}: the check failed"))??;
    Ok(LocalFile {
        abs: parts.workdir.join(&rel),
        rel,
        stamp: checked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobStore;
    use crate::upload::UploadOptions;

    fn writers(workdir: &Path) -> (Uploader, ManifestWriter) {
        writers_within(workdir, 1 << 20)
    }

    fn writers_within(workdir: &Path, max_manifest_bytes: u64) -> (Uploader, ManifestWriter) {
        let uploader = Uploader::new(BlobStore::in_memory(), UploadOptions::default(), "j", None)
            .confined_to(workdir);
        let spec = c3_proto::JobSpec::from_json(br#"{"job_id":"j","command":["true"]}"#)
            .unwrap()
            .spec;
        let manifest = ManifestWriter::new(BlobStore::in_memory(), &spec, max_manifest_bytes);
        (uploader, manifest)
    }

    fn parts<'a>(
        uploader: &'a Uploader,
        manifest: &'a ManifestWriter,
        workdir: &'a Path,
        dirs: &'a [String],
    ) -> Parts<'a> {
        Parts {
            uploader,
            manifest,
            workdir,
            physical_workdir: None,
            dirs,
            reader: None,
            procs: None,
            // A test's few: leaked, to live as long as the parts.
            looking: Box::leak(Box::default()),
        }
    }

    /// Requests publishing new files past what a manifest can list are refused: each one's
    /// files went into the book whatever its size, and a job publishing hard links of long
    /// paths ran the root agent's book up without end.
    #[tokio::test]
    async fn publish_keeps_the_book_within_a_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path();
        std::fs::create_dir(workdir.join("artifacts")).unwrap();
        let (uploader, manifest) = writers_within(workdir, 16 << 10);
        let dirs = vec!["artifacts".to_string()];
        let parts = parts(&uploader, &manifest, workdir, &dirs);
        let mut book = SyncBook::default();
        let mut refused = 0;
        for request in 0..8 {
            let paths: Vec<String> = (0..10)
                .map(|i| {
                    let name = format!("artifacts/{request}-{i}-{}", "x".repeat(200));
                    std::fs::write(workdir.join(&name), b"same").unwrap();
                    name
                })
                .collect();
            let reply = serve(&parts, &mut book, SocketRequest::Publish { paths }).await;
            if !reply.ok {
                let error = reply.error.unwrap();
                assert!(error.contains(TOO_MANY_FILES), "{error}");
                refused += 1;
            }
            assert!(
                book.entries_ceiling() <= manifest.max_bytes(),
                "request {request}: the book takes {} bytes of entries, past {}",
                book.entries_ceiling(),
                manifest.max_bytes()
            );
        }
        assert!(refused > 0);
        assert!(book.len() >= 10, "the first requests were stored");
    }

    /// Hard links of one file the job holds open for writing (read whatever the book says)
    /// are read once a request: a job naming a thousand links of a 1 GiB file had root
    /// read and hash a terabyte a request. Each link is published, with the one digest.
    #[tokio::test]
    async fn links_of_one_held_file_are_read_once_a_request() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path();
        let arts = workdir.join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        let size = 4 << 20;
        std::fs::write(arts.join("f"), vec![7u8; size]).unwrap();
        let mut paths = vec!["artifacts/f".to_string()];
        for i in 0..32 {
            std::fs::hard_link(arts.join("f"), arts.join(format!("l{i}"))).unwrap();
            paths.push(format!("artifacts/l{i}"));
        }
        let mut holder = std::process::Command::new("sh")
            .args(["-c", "exec 3>>artifacts/f; exec sleep 30"])
            .current_dir(workdir)
            .spawn()
            .unwrap();
        let procs = JobProcesses::new(holder.id() as i32, None);
        // Once its shell has opened the file (a loaded machine takes a while).
        let until = std::time::Instant::now() + Duration::from_secs(20);
        let mut held = crate::procfs::written_by(&procs.members());
        while held.is_empty() && std::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
            held = crate::procfs::written_by(&procs.members());
        }
        let (uploader, manifest) = writers(workdir);
        let dirs = vec!["artifacts".to_string()];
        let mut parts = parts(&uploader, &manifest, workdir, &dirs);
        parts.procs = Some(&procs);
        let rchar = || {
            std::fs::read_to_string("/proc/self/io")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("rchar: ")?.parse::<u64>().ok())
                .unwrap()
        };
        let mut book = SyncBook::default();
        let before = rchar();
        let reply = serve(&parts, &mut book, SocketRequest::Publish { paths }).await;
        let read = rchar() - before;
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(!held.is_empty(), "the holder's fd was not seen");
        assert!(reply.ok, "{reply:?}");
        let published = reply.files;
        assert_eq!(published.len(), 33);
        assert!(published.iter().all(|p| p.sha256 == published[0].sha256));
        assert!(
            read < 3 * size as u64,
            "{read} bytes read for 33 links of {size}"
        );
        assert_eq!(book.len(), 33);
    }

    /// Without live sync, the book forgets what a `wait_all` no longer finds: a job making
    /// new names and deleting them between requests had it keep every name it ever made.
    /// A file still there stays listed in its stored version.
    #[tokio::test]
    async fn wait_all_forgets_files_gone_since() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path();
        let arts = workdir.join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        std::fs::write(arts.join("kept.bin"), b"kept").unwrap();
        let (uploader, manifest) = writers(workdir);
        let dirs = vec!["artifacts".to_string()];
        let parts = parts(&uploader, &manifest, workdir, &dirs);
        let mut book = SyncBook::default();
        for round in 0..5 {
            let names: Vec<_> = (0..20).map(|i| arts.join(format!("{round}-{i}"))).collect();
            for name in &names {
                std::fs::write(name, b"x").unwrap();
            }
            let reply = serve(&parts, &mut book, SocketRequest::WaitAll).await;
            assert!(reply.ok, "{reply:?}");
            assert_eq!(book.len(), 21, "round {round}");
            for name in &names {
                std::fs::remove_file(name).unwrap();
            }
        }
        assert!(book.contains("artifacts/kept.bin"));
    }

    /// A file deeper than a manifest lists is not stored; wait_all answered ok all the same,
    /// and a job deleting its older checkpoints on that ok deleted what never was stored.
    #[tokio::test]
    async fn wait_all_is_not_ok_while_a_place_could_not_be_stored() {
        let dir = tempfile::tempdir().unwrap();
        let workdir = dir.path();
        let deep = (0..c3_proto::manifest::MAX_PATH_DEPTH + 2)
            .fold(workdir.join("artifacts"), |p, _| p.join("d"));
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("ckpt.pt"), "deep").unwrap();
        std::fs::write(workdir.join("artifacts/ok.txt"), "ok").unwrap();
        let (uploader, manifest) = writers(workdir);
        let dirs = vec!["artifacts".to_string()];
        let parts = Parts {
            uploader: &uploader,
            manifest: &manifest,
            workdir,
            physical_workdir: None,
            dirs: &dirs,
            reader: None,
            procs: None,
            looking: &Default::default(),
        };
        let mut book = SyncBook::default();
        let reply = serve(&parts, &mut book, SocketRequest::WaitAll).await;
        assert!(!reply.ok, "{reply:?}");
        let error = reply.error.unwrap();
        assert!(
            error.contains("artifacts/d/d/") && error.contains("too deep"),
            "{error}"
        );
        // What could be stored still is.
        assert!(book.contains("artifacts/ok.txt"));
    }

    /// An absolute path in the job's spelling of the workdir is placed without any lookup by
    /// path: each one took a blocking thread (a `canonicalize` of the workdir), and behind a
    /// mount that does not answer each stayed stuck. Here the one blocking thread the runtime
    /// has is held, as a stuck lookup would hold it: the requests are answered all the same.
    #[test]
    fn the_jobs_spelling_of_the_workdir_takes_no_blocking_thread() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir_all(real.join("w/artifacts")).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let workdir = link.join("w");
        let physical = physical_path(&DirFd::open(&workdir).unwrap()).unwrap();
        assert_eq!(physical, real.join("w"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let stuck = rt.spawn_blocking(move || held.recv());
        let (uploader, manifest) = rt.block_on(async { writers(&workdir) });
        let dirs = vec!["artifacts".to_string()];
        let parts = Parts {
            uploader: &uploader,
            manifest: &manifest,
            workdir: &workdir,
            physical_workdir: Some(&physical),
            dirs: &dirs,
            reader: None,
            procs: None,
            looking: &Default::default(),
        };
        for _ in 0..3 {
            // Outside the output dirs: answered once placed, with no file to open.
            let path = physical.join("notes.txt").display().to_string();
            let placed = rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(2), locate(&parts, &path)).await
            });
            let Ok(Err(e)) = placed else {
                panic!("{path}: not answered in time ({placed:?})")
            };
            assert!(e.contains("outside the job's output dirs"), "{e}");
        }
        release.send(()).unwrap();
        rt.block_on(stuck).unwrap().unwrap();
    }
}
