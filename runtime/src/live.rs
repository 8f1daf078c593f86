//! Incremental sync while the job runs (contract §5): the first phase of the
//! [`crate::collector`] task, which owns the [`SyncBook`] throughout.
//!
//! Hints from the watcher (or a periodic scan when inotify is unavailable) make a path a
//! *candidate*; a candidate whose stamp stayed the same for `settle` and that no process of
//! the job holds open for writing is uploaded. The in-progress manifest (`complete: false`)
//! is rewritten, throttled, and lists only uploaded blobs. The phase ends when the collector
//! is told the job ended; it hands the book back so the final scan only uploads what is new.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use c3_proto::manifest::entry_ceiling;

use crate::candidates::{Candidate, Candidates};
use crate::collect::{path_of, scan, FileStamp, LocalFile};
use crate::confine::{lstat_beneath, DirFd, JobReader};
use crate::jobproc::JobProcesses;
use crate::manifest::ManifestWriter;
use crate::publish::{Parts, PublishCall};
use crate::sync::SyncBook;
use crate::upload::{UploadError, Uploaded, Uploader};
use crate::watch::{watcher, DirWatcher, Hint};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchMode {
    /// inotify, falling back to polling if watches cannot be set.
    Inotify,
    /// Periodic scans only (network filesystems, where inotify does not see remote writes).
    Poll,
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    pub settle: Duration,
    pub mode: WatchMode,
    pub poll_interval: Duration,
    /// Hints buffered between the watcher thread and the syncer; past that, a rescan.
    pub event_queue: usize,
    /// The in-progress manifest is rewritten at most this often.
    pub manifest_interval: Duration,
    /// Directories watched at most; past that, the output dirs are polled.
    pub max_watches: usize,
    /// `sync.live_cpus`: the CPUs the agent's reading and hashing run on while the job runs
    /// (empty: wherever the kernel puts them).
    pub cpus: Vec<usize>,
}

/// The live phase: starts from the collector's book, ends at `JobEnded`.
pub struct LiveSync {
    syncer: Syncer,
}

impl LiveSync {
    /// Syncs `dirs` (relative to `workdir`) for the job made of `procs`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        uploader: Uploader,
        workdir: PathBuf,
        physical_workdir: Option<PathBuf>,
        dirs: Vec<String>,
        procs: JobProcesses,
        reader: Option<JobReader>,
        manifest: ManifestWriter,
        book: SyncBook,
        opts: LiveOptions,
        publishes: mpsc::Receiver<PublishCall>,
    ) -> LiveSync {
        let manifest_interval = opts.manifest_interval;
        let syncer = Syncer {
            publishes,
            roots: dirs.iter().map(|d| workdir.join(d)).collect(),
            uploader,
            workdir,
            physical_workdir,
            dirs,
            procs,
            reader,
            watcher: None,
            writes_queued: None,
            manifest,
            book,
            opts,
            candidates: Candidates::default(),
            in_flight: HashMap::new(),
            panicked: Default::default(),
            manifest_dirty: false,
            manifest_too_large: false,
            manifest_written: None,
            manifest_spacing: manifest_interval,
            requests_from: Instant::now(),
            polling: false,
            roots_lost: false,
            rescans: RescanPace::default(),
            prehashing: JoinSet::new(),
            prehash_busy: Default::default(),
            looking: Default::default(),
            request_looking: Default::default(),
            touch_rest: None,
            warned_upload: false,
            warned_store_retry: false,
            store_failures: HashMap::new(),
            store_failures_bytes: 0,
            blind_retry: None,
            warned_files: false,
        };
        LiveSync { syncer }
    }

    /// Runs until `ended` resolves (the job's processes are gone, or the collector's handle
    /// went away), lets the uploads under way land, and hands the book back.
    pub async fn run(self, ended: impl std::future::Future<Output = ()>) -> SyncBook {
        self.syncer.run(ended).await
    }
}

struct Syncer {
    /// Requests from the job (`c3-agent publish`): served before the live queue.
    publishes: mpsc::Receiver<PublishCall>,
    uploader: Uploader,
    workdir: PathBuf,
    /// The job's spelling of the workdir, for its publish requests.
    physical_workdir: Option<PathBuf>,
    dirs: Vec<String>,
    /// Absolute collected dirs.
    roots: Vec<PathBuf>,
    /// Every process of the job: a file any of them holds open for writing is not done.
    procs: JobProcesses,
    /// The job's user, when the agent runs the job as another user.
    reader: Option<JobReader>,
    /// Per-directory inotify watches; `None` while polling only.
    watcher: Option<DirWatcher>,
    /// The watcher's [`crate::watch::WritesQueued`], kept while the watcher is lent to a walk.
    writes_queued: Option<crate::watch::WritesQueued>,
    /// Writes the in-progress manifest.
    manifest: ManifestWriter,
    book: SyncBook,
    opts: LiveOptions,
    /// Keyed by manifest path.
    candidates: Candidates,
    /// Uploads under way, by manifest path: added by `settle`, marked by `forget` and
    /// `rescan`, taken out by `on_uploaded` (by the task's id when the task panicked: its
    /// result, the path with it, is lost).
    in_flight: HashMap<String, Sending>,
    /// Files whose live upload panicked, with the version and how often: a version is sent
    /// again once, then left to the final sync, so that a bug every read of a file meets
    /// does not panic at every settle (a rescan or a hint finds the file again each time).
    panicked: HashMap<String, (FileStamp, u32)>,
    manifest_dirty: bool,
    /// The in-progress manifest is over `store.max_manifest_bytes`: not written again.
    manifest_too_large: bool,
    manifest_written: Option<Instant>,
    /// How long after the last in-progress manifest write the next may come
    /// ([`manifest_spacing`]).
    manifest_spacing: Duration,
    /// The job's next socket request is served no sooner than this: see [`Syncer::serve`].
    requests_from: Instant,
    /// Polling instead of (or in addition to) inotify.
    polling: bool,
    /// An output dir (or a directory above one) was removed: nothing watches the workdir, so
    /// nothing would see it made again. Polled until every output dir is watched again.
    roots_lost: bool,
    warned_upload: bool,
    /// Said once: a live upload the store failed is tried again while the job runs.
    warned_store_retry: bool,
    /// Files whose latest live upload the store failed: how many times in a row
    /// ([`store_retry_hold`]) and when the latest failed ([`Syncer::held_for_the_store`]).
    store_failures: HashMap<String, (u32, Instant)>,
    /// What the keys of `store_failures` take: past [`MAX_STORE_FAILURES_BYTES`] it starts
    /// again (entries of files since removed are not looked for).
    store_failures_bytes: usize,
    /// When a file was last tried again with the store silent since its failure.
    blind_retry: Option<Instant>,
    /// Said once: more files than a manifest can list.
    warned_files: bool,
    /// Large files being hashed ahead while the job writes them, and which (by the task
    /// hashing each: a task that panicked names no file, and its file must not stay busy).
    prehashing: JoinSet<(u64, u64)>,
    prehash_busy: HashMap<(u64, u64), tokio::task::Id>,
    /// A look at the job's processes' fds and maps (a settle's or a wait_all's) is under way,
    /// or stuck: reading a job process's `maps` waits on its memory lock, which a thread
    /// faulting on a page of its own silent FUSE mount holds for ever. One stuck look halts
    /// settling and wait_all, not the sync ([`crate::publish::look_at_open_files`]).
    looking: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The same for the looks of the job's requests (wait_all, publish): held apart, so that a
    /// request is not refused behind a settle look at the idle priority that a node whose job
    /// keeps every core busy starves past its limit. At most two threads stick.
    request_looking: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Until when a directory made or moved in is left to the next rescan, not walked at
    /// once (after a walk that cost [`TOUCH_WALK_FREE`] or more).
    touch_rest: Option<Instant>,
    /// Watcher errors can come by the ten thousand (a job swapping a watched dir for a
    /// symlink): rescans at most once a second, logged at most once every 10 s.
    rescans: RescanPace,
}

/// One upload under way (see `Syncer::in_flight`).
struct Sending {
    /// The file was found removed while it was sent: what lands is not recorded. Recorded,
    /// the in-progress manifest listed a deleted file until the final scan, and the hint
    /// that said so had come and gone.
    removed: bool,
    /// The task sending it: a panicked task's error names only this. Left in the map, the
    /// file was skipped by every later look and held an upload slot for the rest of the job.
    task: tokio::task::Id,
    /// Bytes queued in `book.progress` for it.
    size: u64,
    /// The version sent.
    stamp: FileStamp,
    /// When its upload began.
    started: Instant,
}

/// The longest a file whose live upload found it changed is held back ([`CHANGED_HOLD`]).
const MAX_CHANGED_HOLD: Duration = Duration::from_secs(300);

/// How many times its failed read took a file whose live upload found it changed is held
/// back: a 10 GB file appended every few seconds (a metrics log, an HDF5 file grown a step
/// at a time) was read whole, found changed, and read whole again a settle later, for the
/// whole run (disk and CPU the job's, and nothing stored). Held back so, its reads take at
/// most a third of the time; the final sync stores it.
const CHANGED_HOLD: u32 = 2;

/// How long a file whose live upload the store failed waits before it is tried again: the
/// first wait one outage probe apart (a store past its outage deadline is tried once every
/// 10 s), each next one twice as long, up to [`MAX_STORE_RETRY_HOLD`]. Left for the final
/// sync, a checkpoint written during an hour's outage early in a week's job waited the week
/// once the store was back, and was lost with the node.
fn store_retry_hold(failures: u32) -> Duration {
    const FIRST: Duration = Duration::from_secs(10);
    FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MAX_STORE_RETRY_HOLD)
}

/// The longest wait of [`store_retry_hold`]: each try re-reads and re-hashes the file.
const MAX_STORE_RETRY_HOLD: Duration = Duration::from_secs(600);

/// How often a file held for a silent store ([`Syncer::held_for_the_store`]) looks again.
const STORE_SILENT_RECHECK: Duration = Duration::from_secs(10);

/// How many bytes [`Syncer::store_failures`] takes at most (its paths and
/// [`STORE_FAILURE_ENTRY_BYTES`] each): past it, the counts start again (the waits are
/// shorter, never missing).
const MAX_STORE_FAILURES_BYTES: usize = 16 << 20;

/// What an entry of [`Syncer::store_failures`] takes besides its path (the map's slot, the
/// string's header, the count and the instant).
const STORE_FAILURE_ENTRY_BYTES: usize = 64;

#[derive(Default)]
struct RescanPace {
    /// When the last rescan ended.
    last: Option<Instant>,
    /// How long after `last` the next may start ([`rescan_gap`]).
    gap: Duration,
    /// A rescan asked for while the last one was too recent.
    due: Option<Instant>,
    logged: Option<Instant>,
    unlogged: u64,
}

const RESCAN_EVERY: Duration = Duration::from_secs(1);

/// How many due candidates one settle round looks at beyond its free upload slots (files
/// held open for writing take none).
const LOOK_AHEAD: usize = 1024;

/// A walk of a directory made or moved in that takes less earns no rest: a job making many
/// small directories has each walked at once.
const TOUCH_WALK_FREE: Duration = Duration::from_millis(50);

/// The rest after a rescan that took `took`: at least [`RESCAN_EVERY`], and twice its cost, so
/// rescans of a tree that takes long to walk (a million files on a network file system, each
/// a metadata round trip the job's own I/O waits behind) keep to a third of the time however
/// often the job overflows the event queue.
fn rescan_gap(took: Duration) -> Duration {
    RESCAN_EVERY.max(took.saturating_mul(2))
}
const RESCAN_LOG_EVERY: Duration = Duration::from_secs(10);

/// Manifest path, size queued, outcome.
type UploadResult = (String, u64, Result<Uploaded, UploadError>);

impl Syncer {
    async fn run(mut self, ended: impl std::future::Future<Output = ()>) -> SyncBook {
        tokio::pin!(ended);
        // Every walk (the watches' and the rescans', of a tree of millions of entries, or of
        // a directory another process of the user keeps renaming in) is raced against the
        // job's end: awaited whole, one held the final sync and the terminal status for as
        // long as it took. The final scan needs none of them.
        let mut hints = tokio::select! {
            hints = self.start_watching() => hints,
            () = &mut ended => return self.wind_down(JoinSet::new()).await,
        };
        // The job started before the watches were set: what it wrote meanwhile left no events.
        tokio::select! {
            () = self.rescan() => {}
            () = &mut ended => return self.wind_down(JoinSet::new()).await,
        }
        let mut uploads: JoinSet<UploadResult> = JoinSet::new();
        let mut next_poll = Instant::now() + self.opts.poll_interval;
        loop {
            let wake = self.next_wake(next_poll);
            tokio::select! {
                _ = &mut ended => break,
                hint = recv(&mut hints) => match hint {
                    Some(h) => {
                        let drained = hints.as_ref().is_some_and(mpsc::Receiver::is_empty);
                        let handled = async {
                            self.on_hint(h).await;
                            if drained {
                                self.make_up_lost_hints().await;
                            }
                        };
                        tokio::select! {
                            () = handled => {}
                            () = &mut ended => break,
                        }
                    }
                    // The watcher is gone (it failed): keep going by polling.
                    None => self.degrade("watcher stopped".into(), &mut hints),
                },
                Some(call) = self.publishes.recv(), if Instant::now() >= self.requests_from => {
                    // Raced against the job's end: a request that does not answer (a look at
                    // the open files of a process stuck in D state) held the end for ever.
                    // Its caller is one of the job's processes, all gone by then; the call
                    // dropped, the socket answers "the job has ended".
                    tokio::select! {
                        () = self.serve(call, &mut uploads) => {}
                        () = &mut ended => break,
                    }
                }
                Some(done) = uploads.join_next(), if !uploads.is_empty() => self.on_uploaded(done),
                Some(done) = self.prehashing.join_next_with_id(), if !self.prehashing.is_empty() => {
                    self.on_prehashed(done);
                }
                _ = tokio::time::sleep_until(wake) => {
                    let due = async {
                        if (self.polling || self.roots_lost) && Instant::now() >= next_poll {
                            // A lost output dir that is not back costs a look at its name only
                            // (an output dir removed for good must not make every poll a walk).
                            if self.polling || self.a_lost_root_is_back().await {
                                self.paced_rescan().await;
                            }
                            // Polling keeps the rest a costly rescan earned too.
                            let rested = self.rescans.last.map(|t| t + self.rescans.gap);
                            next_poll = (Instant::now() + self.opts.poll_interval)
                                .max(rested.unwrap_or_else(Instant::now));
                        }
                        if self.rescans.due.is_some_and(|t| Instant::now() >= t) {
                            self.paced_rescan().await;
                        }
                        // A hint lost as the queue was drained (the handler marks the loss
                        // just after its send failed): made up here too.
                        self.make_up_lost_hints().await;
                        self.settle(&mut uploads).await;
                        self.write_manifest_if_due().await;
                    };
                    tokio::select! {
                        () = due => {}
                        () = &mut ended => break,
                    }
                }
            }
        }
        self.wind_down(uploads).await
    }

    /// After the job's end: what is under way lands, as the final sync's head start.
    async fn wind_down(mut self, mut uploads: JoinSet<UploadResult>) -> SyncBook {
        self.watcher = None;
        // Hashing under way is the final sync's head start too (at most one step each).
        while self.prehashing.join_next().await.is_some() {}
        // Uploads under way are the final sync's head start: let them land.
        while let Some(done) = uploads.join_next().await {
            self.on_uploaded(done);
        }
        self.book
    }

    /// A request from the job, ahead of the live queue, paced ([`crate::publish::paced`]).
    async fn serve(&mut self, call: PublishCall, uploads: &mut JoinSet<UploadResult>) {
        let ((), next) = crate::publish::paced(self.serve_now(call, uploads)).await;
        self.requests_from = next;
    }

    async fn serve_now(&mut self, call: PublishCall, uploads: &mut JoinSet<UploadResult>) {
        if call.request == c3_proto::SocketRequest::WaitAll {
            while let Some(done) = uploads.join_next().await {
                self.on_uploaded(done);
            }
        }
        let parts = Parts {
            uploader: &self.uploader,
            manifest: &self.manifest,
            workdir: &self.workdir,
            physical_workdir: self.physical_workdir.as_deref(),
            dirs: &self.dirs,
            reader: self.reader.as_ref(),
            procs: Some(&self.procs),
            looking: &self.request_looking,
        };
        let reply = crate::publish::serve(&parts, &mut self.book, call.request).await;
        // The reply's manifest write (`serve` writes one after a failed request too) covered
        // the whole book; one that failed is tried again when due.
        if self.book.listed() {
            self.manifest_dirty = false;
            self.manifest_written = Some(Instant::now());
        } else {
            self.manifest_dirty = true;
        }
        let _ = call.reply.send(reply);
    }

    async fn start_watching(&mut self) -> Option<mpsc::Receiver<Hint>> {
        if self.opts.mode == WatchMode::Poll {
            self.polling = true;
            tracing::info!(
                poll_ms = self.opts.poll_interval.as_millis() as u64,
                "syncing by polling the output dirs"
            );
            return None;
        }
        match watcher(&self.workdir, self.opts.event_queue, self.opts.max_watches) {
            Ok((w, rx)) => {
                self.writes_queued = Some(w.writes_queued());
                self.watcher = Some(w);
                for root in self.roots.clone() {
                    self.watch_tree(root).await;
                }
                tracing::debug!(dirs = ?self.dirs, "watching output dirs");
                Some(rx)
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot watch the output dirs; falling back to polling");
                self.polling = true;
                None
            }
        }
    }

    /// Adds watches for `dir` and below, off the reactor; past the cap, polling takes over.
    async fn watch_tree(&mut self, dir: PathBuf) {
        // Past the cap (or given up), no more are added: each try would walk the tree again.
        if self.polling {
            return;
        }
        let Some(mut w) = self.watcher.take() else {
            return;
        };
        let joined = crate::pace::spawn_gently(move || {
            let r = w.watch_tree(&dir);
            (w, r)
        })
        .await;
        match joined {
            Ok((w, Ok(()))) => self.watcher = Some(w),
            Ok((w, Err(stopped))) => {
                tracing::warn!(
                    watches = w.watch_count(),
                    why = %stopped,
                    poll_ms = self.opts.poll_interval.as_millis() as u64,
                    "no more directories can be watched; live sync polls from now on"
                );
                self.polling = true;
                // The watches set so far stay useful; no more are added. Dropped, the
                // watcher took every watch with it (and closed the hints' channel): live
                // sync heard nothing more and waited for each poll.
                self.watcher = Some(w);
            }
            Err(_) => self.polling = true,
        }
    }

    fn degrade(&mut self, why: String, hints: &mut Option<mpsc::Receiver<Hint>>) {
        *hints = None;
        if !self.polling {
            tracing::warn!(reason = %why, poll_ms = self.opts.poll_interval.as_millis() as u64, "live sync falls back to polling");
            self.polling = true;
        }
    }

    /// The output dirs that have no watch.
    fn unwatched_roots(&self) -> impl Iterator<Item = &PathBuf> {
        self.roots
            .iter()
            .filter(|root| !self.watcher.as_ref().is_some_and(|w| w.watches(root)))
    }

    /// Whether an output dir that has no watch is a directory again.
    async fn a_lost_root_is_back(&self) -> bool {
        let lost: Vec<PathBuf> = self
            .unwatched_roots()
            .filter_map(|root| root.strip_prefix(&self.workdir).ok().map(Path::to_path_buf))
            .collect();
        let workdir = self.workdir.clone();
        crate::pace::spawn_gently(move || {
            let Ok(root) = DirFd::open_root(&workdir) else {
                return false;
            };
            lost.iter()
                .any(|rel| lstat_beneath(&root, rel).is_ok_and(|st| crate::confine::is_dir(&st)))
        })
        .await
        .unwrap_or(false)
    }

    async fn paced_rescan(&mut self) {
        let began = Instant::now();
        self.rescans.due = None;
        self.rewatch().await;
        self.rescan().await;
        let end = Instant::now();
        self.rescans.last = Some(end);
        self.rescans.gap = rescan_gap(end - began);
    }

    /// A rescan now, or once the rest after the last one is over.
    async fn ask_rescan(&mut self) {
        let p = &mut self.rescans;
        match p.last {
            Some(t) if Instant::now() < t + p.gap => p.due = Some(t + p.gap),
            _ => self.paced_rescan().await,
        }
    }

    /// Hints were lost (or polling looks again): the watches of directories removed
    /// meanwhile are dropped (their `Gone` may be among the lost: each would keep a watch
    /// slot and its name for the rest of the job), and directories made meanwhile are
    /// watched (their `Touched` too), before the rescan looks at the files.
    async fn rewatch(&mut self) {
        let Some(mut w) = self.watcher.take() else {
            return;
        };
        match crate::pace::spawn_gently(move || {
            let dropped = w.prune();
            (w, dropped)
        })
        .await
        {
            Ok((w, dropped)) => {
                if dropped > 0 {
                    tracing::debug!(dropped, "watches of removed directories dropped");
                }
                self.watcher = Some(w);
            }
            Err(_) => {
                self.polling = true;
                return;
            }
        }
        // Past `max_watches` polling has taken over: walking again would only hit the cap.
        if !self.polling {
            for root in self.roots.clone() {
                self.watch_tree(root).await;
            }
        }
        if self.roots_lost {
            let still_lost = self.unwatched_roots().next().is_some();
            self.roots_lost = still_lost;
        }
    }

    /// Hashes ahead what a large file being written already holds (one task per file).
    fn prehash(&mut self, rel: &str, abs: &Path, stamp: FileStamp) {
        let opts = self.uploader.options();
        let key = (stamp.dev, stamp.ino);
        // No more tasks than files may be hashed ahead: 5,000 shards written at once each got
        // a task, every one past the cap's check before any stored its state.
        if stamp.size <= opts.multipart_threshold
            || self.uploader.store().is_local()
            || self.prehash_busy.contains_key(&key)
            || self.prehash_busy.len() >= crate::upload::MAX_PREHASHED
        {
            return;
        }
        let file = LocalFile {
            rel: rel.to_string(),
            abs: abs.to_path_buf(),
            stamp,
        };
        let uploader = self.uploader.clone();
        let task = self.prehashing.spawn(
            async move {
                uploader.prehash(&file).await;
                (file.stamp.dev, file.stamp.ino)
            }
            .in_current_span(),
        );
        self.prehash_busy.insert(key, task.id());
    }

    /// A file's hashing ahead is over: it may be hashed ahead again.
    fn on_prehashed(
        &mut self,
        done: Result<(tokio::task::Id, (u64, u64)), tokio::task::JoinError>,
    ) {
        let task = match done {
            Ok((task, _)) => task,
            Err(e) => {
                tracing::error!(error = %e, "a task hashing a file ahead failed");
                e.id()
            }
        };
        // At most one per large file being written: looked through whole.
        self.prehash_busy.retain(|_, busy| *busy != task);
    }

    /// The next moment something is due: a candidate settling, the manifest, a poll.
    fn next_wake(&self, next_poll: Instant) -> Instant {
        let mut wake = Instant::now() + Duration::from_secs(3600);
        // At capacity, a finished upload wakes the loop; due candidates must not spin it.
        let has_room = self.in_flight.len() < self.uploader.options().files_in_flight.max(1);
        // Nor may a look at the open files that never answered (a thread stuck on the job's
        // FUSE mount: every settle then ends at once) or a candidate whose upload is under way.
        let stuck = self.looking.load(std::sync::atomic::Ordering::Acquire);
        if let Some(due) = self
            .candidates
            .next_due_except(self.opts.settle, |rel| self.in_flight.contains_key(rel))
            .filter(|_| has_room && !stuck)
        {
            wake = wake.min(due);
        }
        // A stuck look may yet answer (a FUSE stall that clears): looked at again each second
        // (a look still stuck ends at once), or a quiet job's candidates waited an hour.
        if stuck {
            wake = wake.min(Instant::now() + Duration::from_secs(1));
        }
        // Too large is not written again while the job runs: a deadline for it woke the
        // loop every few milliseconds until the job's end.
        if self.manifest_dirty && !self.manifest_too_large {
            let due = self
                .manifest_written
                .map(|t| t + self.manifest_spacing)
                .unwrap_or_else(Instant::now);
            wake = wake.min(due);
        }
        if self.polling || self.roots_lost {
            wake = wake.min(next_poll);
        }
        // A request that came while the last one's rest lasts is served when it ends.
        if self.requests_from > Instant::now() {
            wake = wake.min(self.requests_from);
        }
        if let Some(due) = self.rescans.due {
            wake = wake.min(due);
        }
        wake.max(Instant::now() + Duration::from_millis(5))
    }

    /// The path's key below the workdir (a [`rel_key`], as a scan keys it: a name that is
    /// not UTF-8 is synced like any other); none for a path the manifest could not list (too
    /// deep or long: not watched, not synced; the final scan names it).
    ///
    /// [`rel_key`]: c3_proto::manifest::rel_key
    fn rel_of(&self, path: &Path) -> Option<String> {
        if !crate::watch::under_any(path, &self.roots) {
            return None;
        }
        let raw = path
            .strip_prefix(&self.workdir)
            .ok()?
            .as_os_str()
            .as_bytes();
        c3_proto::manifest::path_fits(raw).then(|| c3_proto::manifest::rel_key(raw))
    }

    async fn on_hint(&mut self, hint: Hint) {
        match hint {
            Hint::Touched(path) => {
                if let Some(q) = &self.writes_queued {
                    crate::watch::take_queued_write(q, &path);
                }
                self.touch(&path).await
            }
            Hint::Gone(path) => {
                // A test's window to put something at the name before the hint is handled.
                crate::fault::pause_for("slow-gone", Duration::from_millis(500)).await;
                // What is at the name now: nothing, or a directory that may be the one
                // watched there (hints of an exchange come in an order of their own).
                let probe = path
                    .strip_prefix(&self.workdir)
                    .ok()
                    .filter(|rel| !rel.as_os_str().is_empty())
                    .map(Path::to_path_buf);
                let now = match probe {
                    Some(probe) => {
                        let workdir = self.workdir.clone();
                        crate::pace::spawn_gently(move || {
                            DirFd::open_root(&workdir)
                                .and_then(|root| lstat_beneath(&root, &probe))
                                .map(|st| {
                                    crate::confine::is_dir(&st).then_some((st.st_dev, st.st_ino))
                                })
                        })
                        .await
                        .ok()
                    }
                    None => None,
                };
                let mut is_gone = matches!(now, Some(Err(_)));
                if let Some(w) = self.watcher.as_mut() {
                    // A file or a symlink where a watched directory was (`mv d ../trash &&
                    // touch d`: a move brings no DELETE for each file below): what the book
                    // held below it is gone.
                    is_gone |= matches!(now, Some(Ok(None))) && w.watches(&path);
                    // Another directory at the name (`mv ckpt ckpt.old; mv ckpt.tmp ckpt`):
                    // what the book holds below it is the old one's, listed until the end
                    // while the new one lacks it. The walk its own hint brings adds what the
                    // new one holds.
                    is_gone |= w.unwatch_tree_unless(&path, now.and_then(Result::ok).flatten());
                }
                if self.unwatched_roots().any(|root| root.starts_with(&path)) {
                    // `rm -rf out && mkdir out`: the new one is found by looking again.
                    self.roots_lost = true;
                }
                if let Some(rel) = self.rel_of(&path).filter(|r| !r.is_empty()) {
                    if is_gone {
                        self.forget(&rel);
                    }
                }
            }
            Hint::Rescan(why) => {
                let now = Instant::now();
                let p = &mut self.rescans;
                if p.logged.is_none_or(|t| now >= t + RESCAN_LOG_EVERY) {
                    tracing::info!(reason = %why, suppressed = p.unlogged, "rescanning the output dirs");
                    p.logged = Some(now);
                    p.unlogged = 0;
                } else {
                    p.unlogged += 1;
                }
                self.ask_rescan().await;
            }
            Hint::Degraded(why) => {
                if !self.polling {
                    tracing::warn!(reason = %why, "live sync adds polling to inotify");
                    self.polling = true;
                }
                self.ask_rescan().await;
            }
        }
    }

    /// A path changed: a file becomes a candidate; a directory (made or moved in) is walked.
    async fn touch(&mut self, path: &Path) {
        // A test's window to change the tree before a hint is handled, as a busy syncer
        // handles it late (`mkdir new && mv a new/b` before `new` is walked).
        crate::fault::pause_for("slow-touch", Duration::from_millis(500)).await;
        let Some(rel) = self.rel_of(path) else { return };
        let (workdir, probe) = (self.workdir.clone(), path_of(&rel));
        let Ok(meta) = crate::pace::spawn_gently(move || {
            DirFd::open_root(&workdir).and_then(|root| lstat_beneath(&root, &probe))
        })
        .await
        else {
            return;
        };
        match meta {
            Ok(m) if crate::confine::is_regular(&m) => {
                if !self.admits(&rel) {
                    return;
                }
                let stamp = FileStamp::of_stat(&m);
                // A large file that grows: hash what it holds while the job writes on.
                self.prehash(&rel, path, stamp);
                self.candidates.insert(
                    rel,
                    Candidate {
                        stamp: Some(stamp),
                        since: Instant::now(),
                    },
                );
            }
            Ok(m) if crate::confine::is_dir(&m) => {
                // A file listed, uploading or waiting by this name is gone (`rm ckpt && mkdir
                // ckpt`): kept, the in-progress manifest listed it until a file below was
                // recorded.
                if self.knows(&rel) {
                    self.forget(&rel);
                }
                // A walk costs what the directory holds, and a job may move a large tree in and
                // out of its output dirs for nothing: while the rest the last costly walk earned
                // lasts, the rescan when it ends looks at this one too.
                let began = Instant::now();
                if let Some(until) = self.touch_rest.filter(|t| began < *t) {
                    // Never sooner than the rescans' own rest: a full rescan may cost more.
                    let at = until.max(self.rescans.last.map_or(until, |t| t + self.rescans.gap));
                    self.rescans.due = Some(self.rescans.due.map_or(at, |d| d.min(at)));
                    return;
                }
                if !self.polling {
                    self.watch_tree(path.to_path_buf()).await;
                }
                // Files created before the new directory's watch was set left no events.
                let (workdir, reader) = (self.workdir.clone(), self.reader.clone());
                let room = self.manifest.max_bytes();
                let Ok(found) = crate::pace::spawn_gently(move || {
                    scan(&workdir, &[rel], reader.as_ref(), room)
                })
                .await
                else {
                    return;
                };
                for (rel, stamp) in found.files {
                    if !self.book.is_current(&rel, &stamp) && self.admits(&rel) {
                        self.candidates.insert(
                            rel,
                            Candidate {
                                stamp: Some(stamp),
                                since: Instant::now(),
                            },
                        );
                    }
                }
                let took = began.elapsed();
                if took >= TOUCH_WALK_FREE {
                    self.touch_rest = Some(Instant::now() + rescan_gap(took));
                }
            }
            // A symlink, FIFO or socket now at the name (`ln -s step_900 tmp && mv -T tmp
            // latest` over a file): the file known there is gone, never uploaded again. Only
            // a known one: a new symlink would cost a pass over every candidate.
            Ok(_) if self.knows(&rel) => self.forget(&rel),
            Ok(_) => {}
            Err(_) => {}
        }
    }

    /// A rescan for hints the watcher dropped for a full queue, if it did
    /// ([`DirWatcher::take_lost`]).
    async fn make_up_lost_hints(&mut self) {
        if self.watcher.as_ref().is_some_and(DirWatcher::take_lost) {
            self.on_hint(Hint::Rescan("event queue was full".into()))
                .await;
        }
    }

    /// Whether a file by this name is listed, uploading or waiting to settle.
    fn knows(&self, rel: &str) -> bool {
        self.book.contains(rel) || self.in_flight.contains_key(rel) || self.candidates.contains(rel)
    }

    fn forget(&mut self, rel: &str) {
        // At most `files_in_flight` of them: looked through whole.
        for (key, sending) in self.in_flight.iter_mut() {
            if key == rel || c3_proto::manifest::key_is_below(key, rel) {
                sending.removed = true;
            }
        }
        let (listed, dropped) = self.book.forget_under(rel);
        if dropped > 0 {
            self.manifest_dirty = true;
        }
        // A file known by that name has nothing below it: the candidates are looked through
        // only for a directory (or a name never seen). A stale candidate left below a file
        // that replaced its directory goes at its settle look (it is no longer there).
        if self.candidates.remove(rel).is_none() && !listed {
            self.candidates
                .retain(|k| !c3_proto::manifest::key_is_below(k, rel));
        }
    }

    /// Whether `rel` may be tracked: files known (listed, uploading or waiting) stay under
    /// what a manifest can list, or a job's million empty files cost the root agent GBs. The
    /// final scan names what is left out.
    fn admits(&mut self, rel: &str) -> bool {
        // What the book, the candidates and the uploads under way hold, as manifest entries
        // at the least (a path may be 16 KiB: a count alone let a million such cost 16 GiB).
        let held = (self.candidates.len() + self.in_flight.len()) as u64;
        let tracked = self.book.entries_ceiling()
            + self.candidates.path_bytes()
            + held * c3_proto::manifest::ENTRY_FIXED_BYTES;
        if tracked + entry_ceiling(rel) <= self.manifest.max_bytes()
            || self.candidates.contains(rel)
            || self.book.contains(rel)
        {
            return true;
        }
        if !self.warned_files {
            tracing::warn!(
                max_manifest_bytes = self.manifest.max_bytes(),
                "more files in the output dirs than a manifest can list; no more are synced while the job runs"
            );
            self.warned_files = true;
        }
        false
    }

    async fn rescan(&mut self) {
        let (workdir, dirs, reader) =
            (self.workdir.clone(), self.dirs.clone(), self.reader.clone());
        let room = self.manifest.max_bytes();
        let Ok(found) =
            crate::pace::spawn_gently(move || scan(&workdir, &dirs, reader.as_ref(), room)).await
        else {
            return;
        };
        // A subtree that could not be read is not a deleted one.
        if self
            .book
            .forget(|k| !found.files.contains_key(k) && found.covers(k))
            > 0
        {
            self.manifest_dirty = true;
        }
        self.candidates
            .retain(|k| found.files.contains_key(k) || !found.covers(k));
        for (key, sending) in self.in_flight.iter_mut() {
            if !found.files.contains_key(key) && found.covers(key) {
                sending.removed = true;
            }
        }
        for (rel, stamp) in found.files {
            // One being sent is a candidate again if it changed since the version sent: its
            // hint may be what was lost, and once that version landed nothing looked again
            // until the end (a candidate waits while its file is in flight).
            if self.book.is_current(&rel, &stamp)
                || self.in_flight.get(&rel).is_some_and(|s| s.stamp == stamp)
            {
                continue;
            }
            // Keep the clock of a candidate that still looks the same.
            let unchanged = self
                .candidates
                .get(&rel)
                .is_some_and(|c| c.stamp == Some(stamp));
            if !unchanged && self.admits(&rel) {
                self.candidates.insert(
                    rel,
                    Candidate {
                        stamp: Some(stamp),
                        since: Instant::now(),
                    },
                );
            }
        }
    }

    /// Whether the store failed `rel`'s latest live upload and has answered nothing since.
    fn silent_since_its_failure(&self, rel: &str) -> bool {
        self.store_failures
            .get(rel)
            .is_some_and(|&(_, failed)| !self.uploader.store().answered_since(failed))
    }

    /// `due` but for the files whose live upload the store failed, while it has answered
    /// nothing since: each try reads and hashes the file before the store is asked, and
    /// 1 TB of checkpoints met by an outage was read again at every file's wait, the store
    /// refusing them all unasked. Those wait [`STORE_SILENT_RECHECK`] more, unread; one of them
    /// is tried anyway every [`MAX_STORE_RETRY_HOLD`], as a probe for a quiet job (whose
    /// in-progress manifest and new files ask the store otherwise).
    fn held_for_the_store(&mut self, due: Vec<String>) -> Vec<String> {
        if self.store_failures.is_empty() {
            return due;
        }
        let now = Instant::now();
        let mut kept = Vec::with_capacity(due.len());
        // One blind try in this turn at most, and not when the store would refuse it unasked
        // (another operation probes it): the probe it is for would not be made.
        let mut blind_due = self
            .blind_retry
            .is_none_or(|at| now >= at + MAX_STORE_RETRY_HOLD)
            && !self.uploader.store().refuses_writes_now();
        for rel in due {
            if !self.silent_since_its_failure(&rel) {
                kept.push(rel);
            } else if blind_due {
                // Spent when its upload starts (`settle`): a look that finds the file
                // changed or still written to leaves the turn to the next.
                blind_due = false;
                kept.push(rel);
            } else {
                let since = now + STORE_SILENT_RECHECK;
                let stamp = self.candidates.get(&rel).and_then(|c| c.stamp);
                self.candidates.insert(rel, Candidate { stamp, since });
            }
        }
        kept
    }

    /// Uploads the candidates that settled and that nobody writes to any more.
    async fn settle(&mut self, uploads: &mut JoinSet<UploadResult>) {
        let now = Instant::now();
        let room = self
            .uploader
            .options()
            .files_in_flight
            .max(1)
            .saturating_sub(self.in_flight.len());
        if room == 0 {
            return;
        }
        // More are looked at than there are slots: each look reads every fd of the job's
        // processes, and files held open for writing (restarted, due again a settle later)
        // took the slots' worth of each round, so a job holding 10,000 open made 600 looks at
        // its 10,000 fds per settle period, and a file that was ready waited behind them.
        let in_flight = &self.in_flight;
        let due = self.candidates.due(
            now,
            self.opts.settle,
            room.saturating_add(LOOK_AHEAD),
            |rel| in_flight.contains_key(rel),
        );
        let due = self.held_for_the_store(due);
        if due.is_empty() {
            return;
        }
        let mut spawned = 0;
        // One trip off the reactor: who writes what, and how each due file looks now.
        let procs = self.procs.clone();
        let (workdir, paths) = (self.workdir.clone(), due.clone());
        // Mappings read after the last change of every due file (see `written_by_lately`).
        let changed = due
            .iter()
            .filter_map(|rel| self.candidates.get(rel).map(|c| c.since))
            .max()
            .unwrap_or(now);
        let look = crate::publish::look_at_open_files(&self.looking, true, move || {
            crate::fault::blocking_pause("settle-look-hangs", Duration::from_secs(3600));
            let open = crate::procfs::written_by_lately(&procs.members(), changed.into_std());
            let root = DirFd::open_root(&workdir).ok();
            let stamps: Vec<Option<FileStamp>> = paths
                .iter()
                .map(
                    |rel| match root.as_ref().map(|r| lstat_beneath(r, &path_of(rel))) {
                        Some(Ok(m)) if crate::confine::is_regular(&m) => {
                            Some(FileStamp::of_stat(&m))
                        }
                        _ => None,
                    },
                )
                .collect();
            (open, stamps)
        });
        let (open, stamps) = match look.await {
            Ok(looked) => looked,
            Err(crate::publish::LookFailed::TimedOut) => {
                tracing::warn!(
                    limit_s = crate::publish::OPEN_FILES_LOOK_LIMIT.as_secs(),
                    "a look at the job's open files did not answer; live sync stops settling files (the final sync takes them)"
                );
                return;
            }
            Err(_) => return,
        };
        for (rel, stamp) in due.into_iter().zip(stamps) {
            let abs = self.workdir.join(path_of(&rel));
            let Some(stamp) = stamp else {
                self.candidates.remove(&rel);
                continue;
            };
            let growing = self
                .candidates
                .get(&rel)
                .is_some_and(|c| c.stamp != Some(stamp));
            let writing = open.contains(&(stamp.dev, stamp.ino));
            if growing || writing {
                // Not to be sent yet, but its written part may be hashed already.
                self.prehash(&rel, &abs, stamp);
            }
            if growing {
                let candidate = Candidate {
                    stamp: Some(stamp),
                    since: now,
                };
                self.candidates.insert(rel, candidate);
                continue;
            }
            if writing {
                // Still open for writing: wait for the close (or the job's end).
                self.candidates.restart(&rel, now);
                continue;
            }
            if spawned >= room {
                // Ready, no slot left: due still, taken up as uploads land.
                continue;
            }
            self.candidates.remove(&rel);
            let file = LocalFile {
                rel: rel.clone(),
                abs,
                stamp,
            };
            if self.book.is_current(&file.rel, &file.stamp) {
                continue;
            }
            if self
                .panicked
                .get(&file.rel)
                .is_some_and(|&(version, times)| version == file.stamp && times > 1)
            {
                continue;
            }
            let uploader = self.uploader.clone();
            let size = file.stamp.size;
            self.book.progress.queue(size);
            let task = uploads.spawn(
                async move {
                    // A test's window between the look and the read (the job maps the file).
                    crate::fault::pause_point("before-live-upload").await;
                    crate::fault::point_once_per("live-upload-panics", &file.rel);
                    crate::fault::point_always("live-upload-always-panics");
                    // Only the version just looked at: what the job made of it since then
                    // (mapped and stored to, say) is not known to be done.
                    let result = uploader.upload_as_seen(&file).await;
                    (file.rel, file.stamp.size, result)
                }
                .in_current_span(),
            );
            let sending = Sending {
                removed: false,
                task: task.id(),
                size,
                stamp,
                started: Instant::now(),
            };
            if self.silent_since_its_failure(&rel) {
                self.blind_retry = Some(Instant::now());
            }
            self.in_flight.insert(rel, sending);
            spawned += 1;
        }
    }

    fn on_uploaded(&mut self, done: Result<UploadResult, tokio::task::JoinError>) {
        let (rel, size, result) = match done {
            Ok(done) => done,
            Err(e) => return self.on_upload_panicked(e),
        };
        self.book.progress.finish(size);
        let sending = self.in_flight.remove(&rel);
        let removed = sending.as_ref().is_some_and(|s| s.removed);
        let sent = sending.as_ref().map(|s| s.stamp);
        let took = sending.map_or(Duration::ZERO, |s| s.started.elapsed());
        match result {
            // Stored, but no longer the job's file: the blob is this job's bytes all the same.
            Ok(up) if removed => {
                tracing::debug!(path = %rel, "removed while it was sent; not listed");
                self.book.new_bytes += up.new_bytes;
            }
            // A publish recorded a later version while this one was sent: the job was told
            // that one is in the manifest, and it stays.
            Ok(up) if self.book.holds_later(&up.rel, &up.stamp) => {
                self.book.new_bytes += up.new_bytes;
            }
            Ok(up) => {
                tracing::debug!(path = %rel, bytes = up.digests.size, new = up.new_bytes > 0, "synced while running");
                if self.store_failures.remove(&rel).is_some() {
                    self.store_failures_bytes -= rel.len() + STORE_FAILURE_ENTRY_BYTES;
                }
                self.book.record(up);
                self.manifest_dirty = true;
            }
            Err(UploadError::Changed { .. }) => {
                let hold = (took * CHANGED_HOLD).min(MAX_CHANGED_HOLD);
                self.candidates.insert(
                    rel,
                    Candidate {
                        stamp: None,
                        since: Instant::now() + hold,
                    },
                );
            }
            // The final scan says why in the status' warnings.
            Err(UploadError::Vanished { .. } | UploadError::NotReadable { .. }) => {}
            // A store fault: tried again while the job runs, once it may have passed. Not a
            // refusal (a 403, a key it will not take): each try reads and hashes the file
            // again, for nothing; the final sync tries once more.
            Err(UploadError::Store { source, .. }) if !source.is_permanent() => {
                if self.store_failures_bytes >= MAX_STORE_FAILURES_BYTES {
                    self.store_failures.clear();
                    self.store_failures_bytes = 0;
                }
                let now = Instant::now();
                let failures = match self.store_failures.get_mut(&rel) {
                    Some(failed) => {
                        *failed = (failed.0.saturating_add(1), now);
                        failed.0
                    }
                    None => {
                        self.store_failures_bytes += rel.len() + STORE_FAILURE_ENTRY_BYTES;
                        self.store_failures.insert(rel.clone(), (1, now));
                        1
                    }
                };
                let hold = store_retry_hold(failures);
                if !self.warned_store_retry {
                    tracing::warn!(path = %rel, error = %crate::error_chain(&source), retry_in_s = hold.as_secs(), "upload while running failed; tried again while the job runs (waits doubling up to 10 min), and at the end");
                    self.warned_store_retry = true;
                }
                // With the version sent: unchanged when it is due, it is sent at once (a
                // first look at it would spend the turn `held_for_the_store` gave it).
                self.candidates.insert(
                    rel,
                    Candidate {
                        stamp: sent,
                        since: Instant::now() + hold,
                    },
                );
            }
            Err(e) => {
                // Not final: the final scan tries every file that is not in the book.
                if !self.warned_upload {
                    tracing::warn!(path = %rel, error = %crate::error_chain(&e), "upload while running failed; retried at the end");
                    self.warned_upload = true;
                }
            }
        }
    }

    /// An upload task panicked (a bug) or was cancelled: its file is known by the task's id
    /// only. Its slot is given back and the file looked at again (once: the final sync takes
    /// a file that panics again).
    fn on_upload_panicked(&mut self, e: tokio::task::JoinError) {
        // At most `files_in_flight` of them: looked through whole.
        let Some(rel) = self
            .in_flight
            .iter()
            .find(|(_, sending)| sending.task == e.id())
            .map(|(rel, _)| rel.clone())
        else {
            tracing::error!(error = %e, "an upload task failed");
            return;
        };
        let Some(sending) = self.in_flight.remove(&rel) else {
            return;
        };
        self.book.progress.finish(sending.size);
        let times = match self.panicked.get(&rel) {
            Some(&(version, times)) if version == sending.stamp => times + 1,
            _ => 1,
        };
        self.panicked.insert(rel.clone(), (sending.stamp, times));
        let again = !sending.removed && times == 1;
        tracing::error!(path = %rel, error = %e, sent_again = again, "an upload task failed");
        if again {
            let candidate = Candidate {
                stamp: None,
                since: Instant::now(),
            };
            self.candidates.insert(rel, candidate);
        }
    }

    async fn write_manifest_if_due(&mut self) {
        let due = self
            .manifest_written
            .is_none_or(|t| t.elapsed() >= self.manifest_spacing);
        if !self.manifest_dirty || !due || self.manifest_too_large {
            return;
        }
        let started = Instant::now();
        self.manifest_written = Some(started);
        let written = self.manifest.in_progress(&mut self.book).await;
        self.manifest_spacing = manifest_spacing(
            self.opts.manifest_interval,
            started.elapsed(),
            self.book.entries_ceiling(),
        );
        match written {
            Ok(_) => {
                self.manifest_dirty = false;
                tracing::debug!(files = self.book.len(), "in-progress manifest written");
            }
            // Too large stays too large (more files only make it larger): said once, and
            // the final sync's error says it again.
            Err(e @ crate::store::StoreError::TooLarge { .. }) => {
                if !self.manifest_too_large {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot write the in-progress manifest; not tried again while the job runs");
                    self.manifest_too_large = true;
                }
                self.manifest_dirty = false;
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot write the in-progress manifest; will retry")
            }
        }
    }
}

/// How long after an in-progress manifest write the next may come: the configured interval,
/// but no less than 20 times what the last write took nor its document's size at 1 MiB/s,
/// and no more than a long sync's checkpoint period (gc spares what no manifest names for
/// an hour only). A job of a million files that changed one every 3 s had a 256 MiB document
/// built and put twice every 3 s by the root agent: terabytes a day to the store.
fn manifest_spacing(interval: Duration, took: Duration, bytes: u64) -> Duration {
    let by_size = Duration::from_secs(bytes >> 20);
    interval
        .max(took.saturating_mul(20))
        .max(by_size)
        .min(crate::manifest::CHECKPOINT_EVERY.max(interval))
}

async fn recv(hints: &mut Option<mpsc::Receiver<Hint>>) -> Option<Hint> {
    match hints {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small manifest is written at the configured interval; a large or slow one is
    /// spaced by its cost, never past the checkpoint period.
    #[test]
    fn in_progress_manifests_are_spaced_by_their_cost() {
        let s = Duration::from_secs;
        let interval = Duration::from_millis(3000);
        assert_eq!(
            manifest_spacing(interval, Duration::from_millis(5), 50_000),
            interval
        );
        assert_eq!(manifest_spacing(interval, s(1), 1 << 20), s(20));
        assert_eq!(manifest_spacing(interval, s(1), 256 << 20), s(256));
        assert_eq!(
            manifest_spacing(interval, s(60), 1 << 30),
            crate::manifest::CHECKPOINT_EVERY
        );
    }
    use crate::store::BlobStore;
    use crate::upload::UploadOptions;

    const SETTLE: Duration = Duration::from_millis(200);

    /// A syncer of `workdir/artifacts` for a job of no processes (nothing holds a file open).
    fn syncer(workdir: &Path) -> Syncer {
        std::fs::create_dir_all(workdir.join("artifacts")).unwrap();
        let uploader = Uploader::new(BlobStore::in_memory(), UploadOptions::default(), "j", None)
            .confined_to(workdir);
        let spec = c3_proto::JobSpec::from_json(br#"{"job_id":"j","command":["true"]}"#)
            .unwrap()
            .spec;
        let manifest = ManifestWriter::new(BlobStore::in_memory(), &spec, 1 << 20);
        let procs = JobProcesses::new(std::process::id() as i32, None);
        let opts = LiveOptions {
            settle: SETTLE,
            mode: WatchMode::Poll,
            poll_interval: Duration::from_secs(1),
            event_queue: 16,
            manifest_interval: Duration::from_secs(1),
            max_watches: 16,
            cpus: Vec::new(),
        };
        let live = LiveSync::new(
            uploader,
            workdir.to_path_buf(),
            None,
            vec!["artifacts".into()],
            procs,
            None,
            manifest,
            SyncBook::default(),
            opts,
            mpsc::channel(1).1,
        );
        live.syncer
    }

    /// A file whose live upload the store failed is not read again while the store has
    /// answered nothing since, but for one such file every 10 minutes (a probe for a quiet
    /// job); once the store answers, all of them are.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_file_the_store_failed_waits_unread_while_the_store_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let failed = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        for rel in ["artifacts/a", "artifacts/b"] {
            s.store_failures.insert(rel.into(), (1, failed));
        }
        let due = |v: &[&str]| v.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        // The first is tried blind (a probe); the other waits, unread; one the store did not
        // fail is tried.
        let tried = s.held_for_the_store(due(&["artifacts/a", "artifacts/b", "artifacts/c"]));
        assert_eq!(tried, ["artifacts/a", "artifacts/c"]);
        let held = s.candidates.get("artifacts/b").expect("held again").since;
        assert!(held >= Instant::now() + STORE_SILENT_RECHECK);
        // Until an upload of one starts (`settle`), the turn is still to be had.
        assert_eq!(s.held_for_the_store(due(&["artifacts/b"])), ["artifacts/b"]);
        s.blind_retry = Some(Instant::now());
        assert!(s.held_for_the_store(due(&["artifacts/b"])).is_empty());
        tokio::time::advance(MAX_STORE_RETRY_HOLD).await;
        assert_eq!(s.held_for_the_store(due(&["artifacts/b"])), ["artifacts/b"]);
        s.blind_retry = Some(Instant::now());
        assert!(s.held_for_the_store(due(&["artifacts/a"])).is_empty());
        // The store answers: every file it failed is tried.
        s.uploader
            .store()
            .put_blob(crate::store::EMPTY_SHA256, bytes::Bytes::new())
            .await
            .unwrap();
        assert_eq!(
            s.held_for_the_store(due(&["artifacts/a", "artifacts/b"])),
            ["artifacts/a", "artifacts/b"]
        );
    }

    /// Writes `rel` and makes it a candidate that has settled; its upload is spawned by the
    /// next `settle` and runs only when the test awaits it (a current-thread runtime).
    fn settled(s: &mut Syncer, rel: &str, data: &[u8]) {
        let abs = s.workdir.join(rel);
        std::fs::create_dir_all(abs.parent().unwrap()).unwrap();
        std::fs::write(&abs, data).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&abs).unwrap());
        let since = Instant::now().checked_sub(2 * SETTLE).unwrap();
        s.candidates.insert(
            rel.into(),
            Candidate {
                stamp: Some(stamp),
                since,
            },
        );
    }

    /// An in-progress manifest too large to write is not tried again while the job runs, and
    /// its changes set no deadline: the loop woke every 5 ms until the job's end.
    #[tokio::test]
    async fn a_manifest_too_large_sets_no_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let next_poll = Instant::now() + Duration::from_secs(60);
        s.manifest_dirty = true;
        s.manifest_written = Some(Instant::now() - Duration::from_secs(5));
        assert!(s.next_wake(next_poll) < Instant::now() + Duration::from_secs(1));
        s.manifest_too_large = true;
        assert!(s.next_wake(next_poll) > Instant::now() + Duration::from_secs(30));
    }

    /// A rescan asked for during the rest after the last one waits for its end, and the
    /// rest grows with what the last one cost.
    #[tokio::test]
    async fn rescans_keep_a_rest_that_grows_with_their_cost() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        s.paced_rescan().await;
        let last = s.rescans.last.unwrap();
        assert!(s.rescans.gap >= RESCAN_EVERY);
        s.on_hint(Hint::Rescan("overflow".into())).await;
        s.on_hint(Hint::Degraded("watcher failed".into())).await;
        assert_eq!(s.rescans.last, Some(last), "rescanned during the rest");
        assert_eq!(s.rescans.due, Some(last + s.rescans.gap));
        assert_eq!(rescan_gap(Duration::from_secs(3)), Duration::from_secs(6));
        assert_eq!(rescan_gap(Duration::from_millis(10)), RESCAN_EVERY);
    }

    /// After a costly walk of a directory moved in, the next one waits for the rescan the
    /// rest ends with, instead of a walk of its own.
    #[tokio::test]
    async fn a_directory_moved_in_during_a_walks_rest_waits_for_the_rescan() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let sub = dir.path().join("artifacts/sub");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join("f"), "x").unwrap();
        let until = Instant::now() + Duration::from_secs(30);
        s.touch_rest = Some(until);
        s.touch(&sub).await;
        assert!(
            !s.candidates.contains("artifacts/sub/f"),
            "walked during the rest"
        );
        assert_eq!(s.rescans.due, Some(until));
        // Nor sooner than the rest the last full rescan earned.
        s.rescans.due = None;
        s.rescans.last = Some(Instant::now());
        s.rescans.gap = Duration::from_secs(60);
        s.touch(&sub).await;
        assert_eq!(s.rescans.due, Some(s.rescans.last.unwrap() + s.rescans.gap));
        s.touch_rest = None;
        s.touch(&sub).await;
        assert!(
            s.candidates.contains("artifacts/sub/f"),
            "not walked after it"
        );
    }

    /// Files the job holds open for writing take no upload slot: a ready file behind more
    /// of them than there are slots is sent in the same settle round. Each round took only
    /// the slots' worth of due files, so the held ones (due again each settle period) made
    /// a look at all of the job's fds per slots' worth, and the ready file waited.
    #[tokio::test]
    async fn files_held_open_do_not_hold_a_ready_one_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let slots = s.uploader.options().files_in_flight.max(1);
        let mut held = Vec::new();
        for i in 0..slots * 3 {
            let rel = format!("artifacts/held-{i}");
            settled(&mut s, &rel, b"open");
            held.push(dir.path().join(&rel));
        }
        // A process of the job (a child of this one, as the agent's are) holds them open.
        let mut holder = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys,time; fs=[open(p,'a') for p in sys.argv[1:]]; print('ok',flush=True); time.sleep(60)",
            ])
            .args(&held)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ok");
        // Settled later than every held one: last in the order they come due.
        std::thread::sleep(Duration::from_millis(5));
        settled(&mut s, "artifacts/ready", b"done");
        let mut uploads = JoinSet::new();
        s.settle(&mut uploads).await;
        let _ = holder.kill();
        let _ = holder.wait();
        assert!(s.in_flight.contains_key("artifacts/ready"), "held back");
        assert_eq!(s.in_flight.len(), 1, "a file held open was sent");
        // More ready than there are slots: the slots' worth go, the rest stay due.
        for i in 0..slots + 2 {
            settled(&mut s, &format!("artifacts/more-{i}"), b"more");
        }
        s.settle(&mut uploads).await;
        assert_eq!(s.in_flight.len(), slots);
        assert_eq!(
            s.candidates
                .due(Instant::now(), SETTLE, usize::MAX, |_| false)
                .iter()
                .filter(|r| r.starts_with("artifacts/more-"))
                .count(),
            3
        );
    }

    /// The job changes a file after the settle look (maps it and stores, say) and before
    /// its upload reads it: that version was not looked at, so it is not recorded; the file
    /// is a candidate again. The upload read and recorded it, and a store after the read
    /// through the same dirty page left the stamp as it was: the final scan kept it.
    #[tokio::test]
    async fn a_file_changed_after_the_settle_look_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let mut uploads = JoinSet::new();
        settled(&mut s, "artifacts/ckpt", b"v1");
        s.settle(&mut uploads).await;
        assert!(s.in_flight.contains_key("artifacts/ckpt"), "not sent");
        std::fs::write(
            dir.path().join("artifacts/ckpt"),
            b"v2, stored after the look",
        )
        .unwrap();
        let done = uploads.join_next().await.unwrap();
        assert!(
            matches!(&done, Ok((_, _, Err(UploadError::Changed { .. })))),
            "{done:?}"
        );
        s.on_uploaded(done);
        assert!(
            !s.book.contains("artifacts/ckpt"),
            "a version not looked at was recorded"
        );
        assert!(
            s.candidates.contains("artifacts/ckpt"),
            "not looked at again"
        );
    }

    /// A watched directory swapped for another by rename (`mv ckpt ckpt.old; mv ckpt.tmp
    /// ckpt`): its `Gone` found a directory at the name, not the one watched, and kept what
    /// the book held below it; the in-progress manifests listed the old one's `y` until
    /// the end.
    #[tokio::test]
    async fn a_directory_swapped_in_by_rename_drops_what_the_old_one_held() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let ckpt = dir.path().join("artifacts/ckpt");
        std::fs::create_dir_all(&ckpt).unwrap();
        s.opts.mode = WatchMode::Inotify;
        let _hints = s.start_watching().await;
        assert!(s.watcher.is_some(), "no inotify here");
        let mut uploads = JoinSet::new();
        settled(&mut s, "artifacts/ckpt/x", b"x");
        settled(&mut s, "artifacts/ckpt/y", b"y");
        s.settle(&mut uploads).await;
        while let Some(done) = uploads.join_next().await {
            s.on_uploaded(done);
        }
        assert!(s.book.contains("artifacts/ckpt/y"));
        let tmp = dir.path().join("artifacts/ckpt.tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::write(tmp.join("x"), b"x").unwrap();
        std::fs::rename(&ckpt, dir.path().join("artifacts/ckpt.old")).unwrap();
        std::fs::rename(&tmp, &ckpt).unwrap();
        s.on_hint(Hint::Gone(ckpt.clone())).await;
        assert!(
            !s.book.contains("artifacts/ckpt/y"),
            "the old dir's file kept"
        );
    }

    /// A file rewritten while its upload is under way, its hint lost (a full queue): the
    /// rescan that makes up for the loss passed it over as in flight, the old version
    /// landed, and nothing looked at the file again until the end.
    #[tokio::test]
    async fn a_rescan_takes_a_file_changed_while_it_was_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let mut uploads = JoinSet::new();
        settled(&mut s, "artifacts/m", b"v1");
        s.settle(&mut uploads).await;
        assert!(s.in_flight.contains_key("artifacts/m"), "not sent");
        let done = uploads.join_next().await.unwrap();
        std::fs::write(dir.path().join("artifacts/m"), b"v2, longer").unwrap();
        s.rescan().await;
        s.on_uploaded(done);
        assert!(s.candidates.contains("artifacts/m"), "not looked at again");
    }

    /// A file removed while its upload is under way (its `Gone` hint, or a rescan that no
    /// longer finds it, handled before the upload lands) is not recorded when it lands: the
    /// in-progress manifest listed the deleted file until the final scan.
    #[tokio::test]
    async fn a_file_removed_while_it_is_sent_is_not_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = syncer(dir.path());
        let mut uploads = JoinSet::new();
        settled(&mut s, "artifacts/a", b"a");
        settled(&mut s, "artifacts/sub/b", b"b");
        settled(&mut s, "artifacts/quiet", b"quiet");
        settled(&mut s, "artifacts/kept", b"kept");
        s.settle(&mut uploads).await;
        assert_eq!(s.in_flight.len(), 4);
        let mut landed = Vec::new();
        while let Some(done) = uploads.join_next().await {
            landed.push(done);
        }
        std::fs::remove_file(dir.path().join("artifacts/a")).unwrap();
        std::fs::remove_dir_all(dir.path().join("artifacts/sub")).unwrap();
        s.on_hint(Hint::Gone(dir.path().join("artifacts/a"))).await;
        s.on_hint(Hint::Gone(dir.path().join("artifacts/sub")))
            .await;
        // Its hint lost (a queue overflow): the rescan finds it gone.
        std::fs::remove_file(dir.path().join("artifacts/quiet")).unwrap();
        s.rescan().await;
        for done in landed {
            s.on_uploaded(done);
        }
        for gone in ["artifacts/a", "artifacts/sub/b", "artifacts/quiet"] {
            assert!(
                !s.book.contains(gone),
                "{gone} recorded after it was removed"
            );
        }
        assert!(s.book.contains("artifacts/kept"));
        assert!(s.in_flight.is_empty());
    }
}
