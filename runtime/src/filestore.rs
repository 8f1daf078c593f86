//! Small blobs on the file store without one directory as the bottleneck.
//!
//! Every blob lives in `blobs/sha256/` (contract §6), so every create there takes that
//! directory's lock. A generic create-if-absent put makes three changes to it per blob (a
//! temp file, the link, the temp's removal) and fsyncs it each time; with many files in
//! flight the writers spin on the lock (measured: 22 % of the agent's CPU in
//! `rwsem_spin_on_owner`, 0.15x `cp -r` + `sha256sum` for 10,000 small files). Here the
//! temp file is written and fsync'd in one of [`SHARDS`] staging directories, then hard-linked
//! to its key (create-if-absent: an existing blob is never replaced; one link at a time), and the blobs
//! directory is fsync'd once for every link that happened before the fsync began
//! ([`DirSync`], a group commit), so a put still returns only when its blob is durable.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Staging directories the temp files are spread over.
pub(crate) const SHARDS: u64 = 64;

/// Group commit of the blobs directory: one fsync covers every link made before it began.
#[derive(Debug, Default)]
pub struct DirSync {
    linked: AtomicU64,
    synced: Mutex<u64>,
    /// Links into the blobs directory, one at a time: the kernel serializes them on the
    /// directory's lock anyway, and waiting here sleeps where waiting there spins.
    linking: Mutex<()>,
    /// When the last fsync of the directory that went through began (ns since the epoch,
    /// and on the monotonic clock): it covers every entry changed before then, whoever made
    /// it.
    began: Mutex<Option<(u64, std::time::Instant)>>,
}

impl DirSync {
    /// Returns once the link numbered `mine` (from [`DirSync::linked`]) is durable.
    fn sync(&self, dir: &Path, mine: u64) -> io::Result<()> {
        let mut synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if *synced >= mine {
            return Ok(());
        }
        // Every link counted by now is complete, so this fsync covers it too.
        let upto = self.linked.load(Ordering::SeqCst);
        self.fsync(dir)?;
        *synced = upto;
        Ok(())
    }

    /// One fsync of the directory, noting when it began. Called with `synced` held, so
    /// fsyncs never overlap.
    fn fsync(&self, dir: &Path) -> io::Result<()> {
        let began = (now_ns(), std::time::Instant::now());
        File::open(dir)?.sync_all()?;
        *self.began.lock().unwrap_or_else(|p| p.into_inner()) = Some(began);
        Ok(())
    }

    /// Makes the directory entry of a blob found at its key durable if it may be another
    /// process's link whose fsync is still pending (another job's agent on the same store;
    /// this process's own are [`DirSync::sync_linked`]'s). One fsync that began after the
    /// blob last changed covers it, so many copies of one file found at once cost one, and
    /// an old blob (a re-run whose blobs are all stored) costs none.
    pub fn sync_found(&self, dir: &Path, found: &std::fs::Metadata) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let changed = (found.ctime().max(0) as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(found.ctime_nsec().max(0) as u64);
        // File times come from a coarse clock, up to a tick behind this one.
        let changed = changed.saturating_add(MARGIN_NS);
        if now_ns().saturating_sub(changed) > YOUNG_NS {
            return Ok(());
        }
        let _synced = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if self.began_covers(changed) {
            return Ok(());
        }
        self.fsync(dir)
    }

    /// Whether the last fsync began after `changed` (ns since the epoch, a file's ctime).
    /// Only while the node's clock has run as the monotonic one since that fsync: after a
    /// step back, a blob linked since looked older than the fsync, and no fsync covered it
    /// for the length of the step.
    fn began_covers(&self, changed: u64) -> bool {
        let Some((wall, mono)) = *self.began.lock().unwrap_or_else(|p| p.into_inner()) else {
            return false;
        };
        let ran = now_ns().saturating_sub(wall) as i128;
        let steady = (ran - mono.elapsed().as_nanos() as i128).abs() < 1_000_000_000;
        steady && now_ns() >= wall && wall > changed
    }

    fn linked(&self) -> u64 {
        self.linked.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Returns once every link this process made so far is durable. A blob found at its key
    /// may be one another put linked a moment ago (two copies of a file in one job), whose
    /// directory entry waits for that put's fsync: taken as stored before then, a manifest
    /// could list it and a crash lose it (on btrfs or ZFS a file's fsync does not carry the
    /// directory's). Links are counted under the link lock, so none made is left uncounted.
    fn sync_linked(&self, dir: &Path) -> io::Result<()> {
        let upto = {
            let _one = self.linking.lock().unwrap_or_else(|p| p.into_inner());
            self.linked.load(Ordering::SeqCst)
        };
        self.sync(dir, upto)
    }
}

/// Stores `bytes` as `blobs/sha256/<sha256_hex>` under `root` unless that blob exists (with
/// `replace`, whatever is there); returns whether it was added. Durable when it returns (blob
/// and directory entry).
pub fn put_blob(
    root: &Path,
    sha256_hex: &str,
    bytes: &[u8],
    sync: &DirSync,
    replace: bool,
) -> io::Result<bool> {
    let dir = root.join("blobs/sha256");
    let dest = dir.join(sha256_hex);
    // Something of another size at the blob's key (a torn copy, a file put there by hand)
    // is not the blob: replaced, never taken for it.
    let replace = match std::fs::symlink_metadata(&dest) {
        Ok(_) if replace => true,
        Ok(md) if md.is_file() && md.len() == bytes.len() as u64 => {
            sync.sync_linked(&dir)?;
            sync.sync_found(&dir, &md)?;
            return Ok(false);
        }
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        // Not "absent" (an NFS blip): a file of another size there would then be taken
        // for the blob by the link's EEXIST below (that is checked too, for a race).
        Err(e) => return Err(e),
    };
    let (tmp, mut file) = temp_file(root)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            std::fs::create_dir_all(&dir)?;
            let _one = sync.linking.lock().unwrap_or_else(|p| p.into_inner());
            Ok(link_or_found(&tmp, &dest, bytes.len() as u64, replace)?.then(|| sync.linked()))
        });
    let _ = std::fs::remove_file(&tmp);
    match written? {
        Some(mine) => sync.sync(&dir, mine).map(|()| true),
        None => {
            sync.sync_linked(&dir)?;
            sync.sync_found(&dir, &std::fs::symlink_metadata(&dest)?)?;
            Ok(false)
        }
    }
}

/// Puts the written `tmp` at `dest`: whether it was linked (false: the blob was there, a
/// regular file of `len` bytes). Anything else at `dest` (a torn copy, a file of another size
/// that appeared after the first look) is replaced, never taken for the blob.
fn link_or_found(tmp: &Path, dest: &Path, len: u64, replace: bool) -> io::Result<bool> {
    if !replace {
        match std::fs::hard_link(tmp, dest) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let md = std::fs::symlink_metadata(dest)?;
                if md.is_file() && md.len() == len {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    std::fs::rename(tmp, dest).map(|()| true)
}

/// A blob that changed longer ago than this is taken as durable: a put returns only once its
/// link is, and no put takes a minute between its link and its fsync.
const YOUNG_NS: u64 = 60_000_000_000;
const MARGIN_NS: u64 = 20_000_000;

fn now_ns() -> u64 {
    crate::display::epoch_ns(std::time::SystemTime::now()).max(0) as u64
}

/// The staging shard `shard` (below [`SHARDS`]), relative to the store's root.
pub(crate) fn shard_dir(shard: u64) -> String {
    format!("staging/.small-{shard:02}")
}

/// A new temp file in one of the staging shards, which nobody else can have opened.
fn temp_file(root: &Path) -> io::Result<(PathBuf, File)> {
    let mut rand = [0u8; 8];
    // SAFETY: getrandom writes at most `rand.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(rand.as_mut_ptr().cast(), rand.len(), 0) };
    if n != rand.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let shard = u64::from_le_bytes(rand) % SHARDS;
    let dir = root.join(shard_dir(shard));
    let path = dir.join(format!("{}-{}", std::process::id(), hex::encode(rand)));
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
    };
    let file = match open() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&dir)?;
            open()?
        }
        other => other?,
    };
    Ok((path, file))
}

/// How long one metadata call of the file store (a stat, a rename, a link, a directory's
/// fsync, a look in a listing) may take. A network file system whose server stops answering
/// (NFS mounted `hard`, its default; Lustre) blocks such a call for ever, and the agent with
/// it: no terminal status until someone stops it. One that answers does so in milliseconds,
/// seconds when loaded; a minute is a server gone, taken as a transient failure like a
/// remote store's timeout, and retried until the retry deadline.
pub const META_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The least time one data write of the file store (a blob, a part, the fsync that completes
/// a staged file) may take: [`META_LIMIT`]'s, doubled for the fsync of what was written.
pub const DATA_FLOOR: std::time::Duration = std::time::Duration::from_secs(120);

/// The slowest rate a data write may go at above [`DATA_FLOOR`] (bytes a second): far below
/// any network file system that works (a 1 Gbit/s link, 100 MiB/s), so only a hung one is cut.
pub const DATA_RATE: u64 = 1 << 20;

/// How long the file store's calls may take ([`META_LIMIT`], [`DATA_FLOOR`], [`DATA_RATE`]);
/// shorter in tests.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub meta: std::time::Duration,
    pub data_floor: std::time::Duration,
    pub data_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            meta: META_LIMIT,
            data_floor: DATA_FLOOR,
            data_rate: DATA_RATE,
        }
    }
}

impl Limits {
    /// The limit of a data write of `bytes`.
    pub fn data(&self, bytes: u64) -> std::time::Duration {
        self.data_floor + std::time::Duration::from_secs(bytes / self.data_rate.max(1))
    }
}

/// The error of a file store call cut at `limit`, as object_store's `LocalFileSystem`
/// reports an I/O error (a transient one: see `store::is_permanent`).
pub fn timed_out(op: &str, limit: std::time::Duration) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the file store's {op} did not return within {} s (a network file system that stopped answering?)",
                limit.as_secs()
            ),
        )),
    }
}

/// Runs a file store call (`op`), cut at `limit`. The call's blocking thread, stuck in the
/// kernel (D state on a hard NFS mount), cannot be stopped: the call goes on in a task of its
/// own, and the agent goes on (its retries, the job's terminal status; the runtime is shut
/// down without waiting for it).
///
/// At most [`CALLS`] calls are under way at once, the abandoned ones counted until they
/// really return: each holds a thread of tokio's blocking pool (512), and a hung store with
/// hundreds of files in flight filled it; then nothing else that needs one ran (the run
/// record's save, DNS lookups, file reads), and the agent hung all the same. A call that
/// finds every slot taken waits for one within its limit, then fails as timed out.
pub async fn bounded<T: Send + 'static>(
    op: &'static str,
    limit: std::time::Duration,
    call: impl std::future::Future<Output = object_store::Result<T>> + Send + 'static,
) -> object_store::Result<T> {
    // Under a heavy load that answers, every slot may be a data write's for a while (16 files
    // of 4 parts): a wait of its own limit alone read as a hung store.
    let wait = limit.saturating_mul(4);
    let Some(slot) = slot(wait).await else {
        return Err(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "none of the file store's {CALLS} calls under way returned within {} s for its {op} (a network file system that stopped answering?)",
                    wait.as_secs()
                ),
            )),
        });
    };
    let mut running = tokio::spawn(async move {
        if crate::fault::armed_at(HANG, op) {
            let _ = tokio::task::spawn_blocking(move || hang_if_armed(op)).await;
        }
        let done = call.await;
        drop(slot);
        done
    });
    match tokio::time::timeout(limit, &mut running).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => Err(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        }),
        // Left running, its slot with it, until the file system answers.
        Err(_) => Err(timed_out(op, limit)),
    }
}

/// File store calls under way at once, abandoned ones included ([`bounded`]).
pub const CALLS: usize = 64;

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(CALLS);

/// A slot for a file store call, held by the task that runs it until the call really
/// returns. `None` when none came free within `limit`.
async fn slot(limit: std::time::Duration) -> Option<tokio::sync::SemaphorePermit<'static>> {
    tokio::time::timeout(limit, SLOTS.acquire())
        .await
        .ok()?
        .ok()
}

/// The fault point (`file-store-hang:<op>`) at which a file store call blocks as on a hung
/// network file system, in debug builds.
pub const HANG: &str = "file-store-hang";

/// Blocks the calling thread (for an hour, or until a unit test disarms the point) if the
/// fault [`HANG`] is armed for `op`.
pub fn hang_if_armed(op: &str) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3600);
    while crate::fault::armed_at(HANG, op) && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The file store's `LocalFileSystem` with every call cut at its [`Limits`] ([`bounded`]):
/// it runs each in a blocking thread, with no bound of its own.
#[derive(Debug)]
pub struct Bounded {
    inner: std::sync::Arc<dyn object_store::ObjectStore>,
    limits: Limits,
    turns: Turns,
}

/// The writes of one key, in the order they were made: a put cut at its limit goes on in
/// its task (a hard NFS mount answers when it likes), and released a minute later it
/// renamed the older manifest it held over the newer one written since, the one the
/// registration named. Each put holds its key's turn from before its call starts until
/// the call really returns; a later one waits for it within its own limit.
#[derive(Debug, Default)]
struct Turns(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
);

impl Turns {
    fn of(&self, key: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(turn) = turns.get(key).and_then(std::sync::Weak::upgrade) {
            return turn;
        }
        let turn = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        turns.insert(key.to_string(), std::sync::Arc::downgrade(&turn));
        if turns.len() > 4 * CALLS {
            // Keys no put holds any more.
            turns.retain(|_, t| t.strong_count() > 0);
        }
        turn
    }
}

impl Bounded {
    pub fn new(inner: std::sync::Arc<dyn object_store::ObjectStore>, limits: Limits) -> Self {
        Bounded {
            inner,
            limits,
            turns: Turns::default(),
        }
    }
}

impl std::fmt::Display for Bounded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.inner)
    }
}

/// A stream whose every item comes within `limit`; one that does not ends it with an error.
fn bounded_stream<T: Send + 'static>(
    op: &'static str,
    limit: std::time::Duration,
    items: futures::stream::BoxStream<'static, object_store::Result<T>>,
) -> futures::stream::BoxStream<'static, object_store::Result<T>> {
    use futures::StreamExt;
    futures::stream::unfold(Some(items), move |items| async move {
        let mut items = items?;
        let next = async move {
            let next = items.next().await;
            Ok((next, items))
        };
        match bounded(op, limit, next).await {
            Ok((Some(item), items)) => Some((item, Some(items))),
            Ok((None, _)) => None,
            Err(e) => Some((Err(e), None)),
        }
    })
    .boxed()
}

/// The most bytes [`bounded_body`] reads in one call: object_store's own reader takes 8 KiB
/// a call, a blocking thread each; a chunk is one [`bounded`] call, a task and a slot each.
const BODY_CHUNK: u64 = 256 << 10;

/// The bytes `range` of an opened file store object, read [`BODY_CHUNK`] at a time, each
/// read cut at the data limit of its size. object_store's reader (`GetResult::into_stream`)
/// has no bound: a network file system that stopped answering mid-read (NFS mounted `hard`,
/// Lustre) held `c3-agent gc` until its unit's limit and a dataset until its time-out; cut,
/// it is the file store's usual transient time-out. A file that ends before `range` does (cut
/// short since it was opened) is an error, not an endless run of empty chunks.
fn bounded_body(
    file: File,
    path: PathBuf,
    range: std::ops::Range<u64>,
    limits: Limits,
) -> futures::stream::BoxStream<'static, object_store::Result<bytes::Bytes>> {
    use futures::StreamExt;
    let file = std::sync::Arc::new(file);
    futures::stream::unfold(Some(range.start), move |at| {
        let (file, path) = (file.clone(), path.clone());
        async move {
            let at = at?;
            if at >= range.end {
                return None;
            }
            let want = (range.end - at).min(BODY_CHUNK);
            let read = async move {
                tokio::task::spawn_blocking(move || read_at(&file, &path, at, want))
                    .await
                    .map_err(|e| object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    })?
            };
            match bounded("get body", limits.data(want), read).await {
                Ok(chunk) => {
                    let next = at + chunk.len() as u64;
                    Some((Ok(chunk), Some(next)))
                }
                Err(e) => Some((Err(e), None)),
            }
        }
    })
    .boxed()
}

/// Up to `want` bytes of `file` from `at` (fewer only at its end: then an error if none).
fn read_at(file: &File, path: &Path, at: u64, want: u64) -> object_store::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; want as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(io::Error::new(
                        source.kind(),
                        format!("cannot read {}: {source}", path.display()),
                    )),
                })
            }
        }
    }
    if got == 0 {
        return Err(object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} ended at byte {at}, before the range read",
                    path.display()
                ),
            )),
        });
    }
    buf.truncate(got);
    Ok(buf.into())
}

#[async_trait::async_trait]
impl object_store::ObjectStore for Bounded {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let limit = self.limits.data(payload.content_length() as u64);
        let turn = tokio::time::timeout(limit, self.turns.of(location.as_ref()).lock_owned())
            .await
            .map_err(|_| timed_out("put (an earlier write of the key still under way)", limit))?;
        let (inner, location) = (self.inner.clone(), location.clone());
        bounded("put", limit, async move {
            let done = inner.put_opts(&location, payload, opts).await;
            drop(turn);
            done
        })
        .await
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        let (store, location) = (self.inner.clone(), location.clone());
        let inner = bounded("start upload", self.limits.meta, async move {
            store.put_multipart_opts(&location, opts).await
        })
        .await?;
        Ok(Box::new(BoundedUpload {
            inner: std::sync::Arc::new(tokio::sync::Mutex::new(inner)),
            limits: self.limits,
            written: 0,
        }))
    }

    /// The call that opens the object, then its bytes ([`bounded_body`]): each cut at its
    /// limit.
    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        let op = if options.head { "head" } else { "get" };
        let (inner, location) = (self.inner.clone(), location.clone());
        let mut got = bounded(op, self.limits.meta, async move {
            inner.get_opts(&location, options).await
        })
        .await?;
        got.payload = match got.payload {
            object_store::GetResultPayload::File(file, path) => {
                object_store::GetResultPayload::Stream(bounded_body(
                    file,
                    path,
                    got.range.clone(),
                    self.limits,
                ))
            }
            stream => stream,
        };
        Ok(got)
    }

    async fn get_ranges(
        &self,
        location: &object_store::path::Path,
        ranges: &[std::ops::Range<u64>],
    ) -> object_store::Result<Vec<bytes::Bytes>> {
        let bytes = ranges.iter().map(|r| r.end.saturating_sub(r.start)).sum();
        let limit = self.limits.data(bytes);
        let (inner, location, ranges) = (self.inner.clone(), location.clone(), ranges.to_vec());
        bounded("get", limit, async move {
            inner.get_ranges(&location, &ranges).await
        })
        .await
    }

    fn delete_stream(
        &self,
        locations: futures::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>> {
        bounded_stream(
            "delete",
            self.limits.meta,
            self.inner.delete_stream(locations),
        )
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        bounded_stream("list", self.limits.meta, self.inner.list(prefix))
    }

    fn list_with_offset(
        &self,
        prefix: Option<&object_store::path::Path>,
        offset: &object_store::path::Path,
    ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
        bounded_stream(
            "list",
            self.limits.meta,
            self.inner.list_with_offset(prefix, offset),
        )
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        let (inner, prefix) = (self.inner.clone(), prefix.cloned());
        bounded("list", self.limits.meta, async move {
            inner.list_with_delimiter(prefix.as_ref()).await
        })
        .await
    }

    /// A hard link on the file store, not a copy of the bytes.
    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        let (inner, from, to) = (self.inner.clone(), from.clone(), to.clone());
        bounded("copy", self.limits.meta, async move {
            inner.copy_opts(&from, &to, options).await
        })
        .await
    }

    async fn rename_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::RenameOptions,
    ) -> object_store::Result<()> {
        let (inner, from, to) = (self.inner.clone(), from.clone(), to.clone());
        bounded("rename", self.limits.meta, async move {
            inner.rename_opts(&from, &to, options).await
        })
        .await
    }
}

/// A staged file's upload on the [`Bounded`] file store: each part cut at the limit of its
/// size, the complete (an fsync of all of it, and a rename) at that of the whole.
#[derive(Debug)]
struct BoundedUpload {
    /// Shared with a call left running past its limit, which holds it until it returns.
    inner: std::sync::Arc<tokio::sync::Mutex<Box<dyn object_store::MultipartUpload>>>,
    limits: Limits,
    written: u64,
}

#[async_trait::async_trait]
impl object_store::MultipartUpload for BoundedUpload {
    fn put_part(&mut self, data: object_store::PutPayload) -> object_store::UploadPart {
        let size = data.content_length() as u64;
        self.written += size;
        // Made now, in call order: `LocalUpload` gives a part its offset in the file when the
        // part is made, and parts made from tasks in the order they got a slot were written
        // out of order (a blob of the right size and the wrong bytes, stored under the
        // file's sha256). The lock is taken only by a complete or abort left running past
        // its limit: the upload is over then.
        let part = match self.inner.try_lock() {
            Ok(mut upload) => upload.put_part(data),
            Err(_) => {
                return Box::pin(async {
                    Err(object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: "a part of an upload whose complete or abort is under way".into(),
                    })
                })
            }
        };
        Box::pin(bounded("write part", self.limits.data(size), part))
    }

    async fn complete(&mut self) -> object_store::Result<object_store::PutResult> {
        let limit = self.limits.data(self.written);
        let inner = self.inner.clone();
        bounded("complete", limit, async move {
            inner.lock().await.complete().await
        })
        .await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        let inner = self.inner.clone();
        bounded("abort", self.limits.meta, async move {
            inner.lock().await.abort().await
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory store whose first put waits for `gate` (a write stuck in a hard NFS
    /// mount, released later).
    #[derive(Debug)]
    struct FirstPutStalls {
        inner: object_store::memory::InMemory,
        gate: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl std::fmt::Display for FirstPutStalls {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("FirstPutStalls")
        }
    }

    #[async_trait::async_trait]
    impl object_store::ObjectStore for FirstPutStalls {
        async fn put_opts(
            &self,
            location: &object_store::path::Path,
            payload: object_store::PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let gate = self.gate.lock().unwrap().take();
            if let Some(gate) = gate {
                let _ = tokio::task::spawn_blocking(move || gate.recv()).await;
            }
            self.inner.put_opts(location, payload, opts).await
        }
        async fn put_multipart_opts(
            &self,
            location: &object_store::path::Path,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &object_store::path::Path,
            options: object_store::GetOptions,
        ) -> object_store::Result<object_store::GetResult> {
            self.inner.get_opts(location, options).await
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<
                'static,
                object_store::Result<object_store::path::Path>,
            >,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
        {
            self.inner.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            self.inner.list(prefix)
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&object_store::path::Path>,
        ) -> object_store::Result<object_store::ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &object_store::path::Path,
            to: &object_store::path::Path,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.inner.copy_opts(from, to, options).await
        }
    }

    /// A manifest write cut at its limit went on, stuck in the file system; the newer one
    /// written after it succeeded; released later, the stuck one renamed the older manifest
    /// over it. A later write of a key waits for an earlier one still under way.
    #[tokio::test]
    async fn a_write_cut_at_its_limit_never_lands_over_a_later_one() {
        use object_store::ObjectStoreExt;
        let (release, gate) = std::sync::mpsc::channel();
        let store = Bounded::new(
            std::sync::Arc::new(FirstPutStalls {
                inner: object_store::memory::InMemory::new(),
                gate: std::sync::Mutex::new(Some(gate)),
            }),
            Limits {
                meta: std::time::Duration::from_millis(200),
                data_floor: std::time::Duration::from_millis(200),
                data_rate: u64::MAX,
            },
        );
        let key = object_store::path::Path::from("jobs/j/manifest.json");
        assert!(
            store.put(&key, "old".into()).await.is_err(),
            "cut at its limit"
        );
        // The retry's write, and the complete manifest's, while the first is stuck: each
        // waits for it within its limit, then fails as it would have.
        let waited = store.put(&key, "new".into()).await;
        release.send(()).unwrap();
        let mut written = waited.is_ok();
        for _ in 0..50 {
            if written {
                break;
            }
            written = store.put(&key, "new".into()).await.is_ok();
        }
        assert!(written);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = store.get(&key).await.unwrap().bytes().await.unwrap();
        assert_eq!(&now[..], b"new");
    }

    /// Parts are written where their order of making puts them, whatever order they are
    /// awaited in (the upload's tasks run them as they get slots and threads).
    #[tokio::test]
    async fn staged_parts_land_in_the_order_they_were_made() {
        use object_store::ObjectStore;
        let dir = tempfile::tempdir().unwrap();
        let local = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store = Bounded::new(std::sync::Arc::new(local), Limits::default());
        let key = object_store::path::Path::from("staged");
        let mut upload = store
            .put_multipart_opts(&key, Default::default())
            .await
            .unwrap();
        let a = upload.put_part(bytes::Bytes::from_static(b"AAAAAAAA").into());
        let b = upload.put_part(bytes::Bytes::from_static(b"BB").into());
        b.await.unwrap();
        a.await.unwrap();
        upload.complete().await.unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("staged")).unwrap(),
            b"AAAAAAAABB"
        );
    }

    /// A hung file store with more calls in flight than tokio's blocking pool has threads:
    /// the abandoned calls took every thread, and then nothing else that needs one ran (the
    /// run record's save, DNS). At most [`CALLS`] are stuck now; a call past them fails
    /// within its limit; once the file system answers, the slots come back.
    #[test]
    fn a_hung_file_store_leaves_the_blocking_pool_room() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(CALLS + 16)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let limit = std::time::Duration::from_millis(300);
            let hung = crate::fault::arm(HANG, "put");
            let calls: Vec<_> = (0..CALLS + 40)
                .map(|_| tokio::spawn(bounded("put", limit, async { Ok(()) })))
                .collect();
            for call in calls {
                assert!(call.await.unwrap().is_err(), "every call hangs");
            }
            let other = tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio::task::spawn_blocking(|| ()),
            )
            .await;
            assert!(
                other.is_ok(),
                "the abandoned calls took every blocking thread"
            );
            drop(hung);
            // The stuck threads see the fault disarmed and return, and their slots with them
            // (on a loaded machine, not within a fixed 300 ms).
            let until = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while SLOTS.available_permits() < CALLS && tokio::time::Instant::now() < until {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            assert_eq!(SLOTS.available_permits(), CALLS);
            assert!(bounded("put", limit, async { Ok(()) }).await.is_ok());
        });
    }

    /// What a put finds at the blob's key when it links (after a first look saw nothing) is
    /// the blob only if it is a regular file of its size: a torn copy is replaced.
    #[test]
    fn a_link_finding_another_size_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, dest) = (dir.path().join("tmp"), dir.path().join("blob"));
        std::fs::write(&tmp, b"whole").unwrap();
        std::fs::write(&dest, b"torn").unwrap();
        assert!(link_or_found(&tmp, &dest, 5, false).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        // The blob itself there: found, left as it is.
        std::fs::write(&tmp, b"other").unwrap();
        assert!(!link_or_found(&tmp, &dest, 5, false).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"whole");
        // A symlink of any target is no blob.
        std::fs::remove_file(&dest).unwrap();
        std::os::unix::fs::symlink(&tmp, &dest).unwrap();
        assert!(link_or_found(&tmp, &dest, 5, false).unwrap());
        assert!(std::fs::symlink_metadata(&dest).unwrap().is_file());
    }

    #[test]
    fn a_blob_is_added_once_and_never_replaced() {
        let root = tempfile::tempdir().unwrap();
        let sync = DirSync::default();
        let sha = crate::digest::sha256_hex(b"hello");
        assert!(put_blob(root.path(), &sha, b"hello", &sync, false).unwrap());
        // The same key again (a second job with the same file, here bytes of the same size
        // that stand for it): not added, not rewritten.
        assert!(!put_blob(root.path(), &sha, b"HELLO", &sync, false).unwrap());
        let stored = std::fs::read(root.path().join("blobs/sha256").join(&sha)).unwrap();
        assert_eq!(stored, b"hello");
        // No temp file is left behind.
        let staging = root.path().join("staging");
        let left: Vec<_> = walk(&staging);
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(*sync.synced.lock().unwrap(), 1, "one link, synced");
    }

    /// A blob another put linked and has not fsync'd the directory for yet is not taken as
    /// stored before that fsync: a manifest listing it could outlive it after a crash.
    #[test]
    fn a_blob_found_linked_is_durable_before_it_counts_as_stored() {
        let root = tempfile::tempdir().unwrap();
        let sync = DirSync::default();
        let sha = crate::digest::sha256_hex(b"twin");
        let dir = root.path().join("blobs/sha256");
        std::fs::create_dir_all(&dir).unwrap();
        // The other put's state between its link and its fsync.
        std::fs::write(dir.join(&sha), b"twin").unwrap();
        sync.linked();
        assert_eq!(*sync.synced.lock().unwrap(), 0);
        assert!(!put_blob(root.path(), &sha, b"twin", &sync, false).unwrap());
        assert_eq!(
            *sync.synced.lock().unwrap(),
            1,
            "returned before the link was durable"
        );
    }

    /// A blob found young (another agent's link) costs one directory fsync, however many
    /// copies are found after it.
    #[test]
    fn blobs_found_young_share_one_fsync() {
        let root = tempfile::tempdir().unwrap();
        let sync = DirSync::default();
        let dir = root.path().join("blobs/sha256");
        std::fs::create_dir_all(&dir).unwrap();
        let sha = crate::digest::sha256_hex(b"theirs");
        std::fs::write(dir.join(&sha), b"theirs").unwrap();
        // Past the margin for the file system's coarse clock.
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!put_blob(root.path(), &sha, b"theirs", &sync, false).unwrap());
        let first = *sync.began.lock().unwrap();
        assert!(first.is_some(), "a young blob found was not made durable");
        for _ in 0..3 {
            assert!(!put_blob(root.path(), &sha, b"theirs", &sync, false).unwrap());
        }
        assert_eq!(*sync.began.lock().unwrap(), first, "one fsync covers them");
    }

    /// An fsync that began "later" than a blob's change only by a clock that stepped back
    /// since does not cover it.
    #[test]
    fn an_fsync_seen_across_a_clock_step_covers_nothing() {
        let sync = DirSync::default();
        let now = now_ns();
        let hour = 3_600_000_000_000;
        // Began at an honest time, a blob changed a second before: covered.
        *sync.began.lock().unwrap() = Some((now, std::time::Instant::now()));
        assert!(sync.began_covers(now - 1_000_000_000));
        // Began an hour "ahead" of the clock now (it stepped back an hour since): not.
        *sync.began.lock().unwrap() = Some((now + hour, std::time::Instant::now()));
        assert!(!sync.began_covers(now - 1_000_000_000));
        // Began, by the wall clock, an hour ago, but a second ago by the monotonic one.
        *sync.began.lock().unwrap() = Some((now - hour, std::time::Instant::now()));
        assert!(!sync.began_covers(now - 2 * hour));
    }

    #[test]
    fn concurrent_puts_share_directory_fsyncs_and_all_land() {
        let root = tempfile::tempdir().unwrap();
        let sync = DirSync::default();
        std::thread::scope(|s| {
            for t in 0..8 {
                let (root, sync) = (root.path(), &sync);
                s.spawn(move || {
                    for i in 0..25 {
                        let body = format!("{t}-{i}");
                        let sha = crate::digest::sha256_hex(body.as_bytes());
                        assert!(put_blob(root, &sha, body.as_bytes(), sync, false).unwrap());
                    }
                });
            }
        });
        assert_eq!(sync.linked.load(Ordering::SeqCst), 200);
        assert_eq!(
            *sync.synced.lock().unwrap(),
            200,
            "the last fsync covers all"
        );
        let blobs = std::fs::read_dir(root.path().join("blobs/sha256"))
            .unwrap()
            .count();
        assert_eq!(blobs, 200);
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .flat_map(|e| {
                let p = e.path();
                if p.is_dir() {
                    walk(&p)
                } else {
                    vec![p]
                }
            })
            .collect()
    }
}
