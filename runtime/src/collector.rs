//! The collector: one task per attempt, the sole owner of the [`SyncBook`], the
//! [`Uploader`] and the [`ManifestWriter`]. Everything that turns the job's files into blobs
//! and a manifest happens here, in three phases driven through a [`CollectorHandle`]:
//!
//! 1. while the job runs: [`LiveSync`] (watch, settle, upload, in-progress manifest), or
//!    nothing when live sync is off or the job is being recovered;
//! 2. `job_ended`: uploads under way land, then the final scan uploads what is new;
//! 3. `seal`: the logs are stored, orphaned multipart uploads aborted, and the complete
//!    manifest written last. The task ends.
//!
//! `run` and `recover` drive the same collector; `recover` simply starts it without a job.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use c3_proto::{LogEntry, Logs, RunRecord, Stream};

use crate::collect::{scan, FileStamp, LocalFile};
use crate::confine::JobReader;
use crate::context::AgentContext;
use crate::jobproc::JobProcesses;
use crate::live::{LiveOptions, LiveSync};
use crate::manifest::ManifestWriter;
use crate::publish::{Parts, PublishCall};
use crate::sync::{sync_scan_until, SyncBook};
use crate::upload::Uploader;

/// What the collector works on.
#[derive(Debug, Clone)]
pub struct CollectorConfig {
    pub uploader: Uploader,
    pub workdir: PathBuf,
    /// The workdir's physical path, the job's spelling of it in the paths it publishes: read
    /// from the pinned fd once as the job starts (`publish::physical_path`); `None` for a
    /// collector that serves no job (recover) or a sidecar's (no socket).
    pub physical_workdir: Option<PathBuf>,
    /// Collected dirs, relative to the workdir (`artifacts` first).
    pub dirs: Vec<String>,
    /// The job's user, when it is not the agent's own: only what it could read is collected.
    pub reader: Option<JobReader>,
    pub manifest: ManifestWriter,
    /// Sync while the job runs (`None`: everything at the end).
    pub live: Option<LiveOptions>,
    /// Uploads queued and done, read by the progress line.
    pub progress: std::sync::Arc<crate::progress::Progress>,
    /// What the attempt's manifest listed when a collector that starts after its agent died
    /// (`recover`) read it ([`SyncBook::listed_before`]).
    pub listed_before: Option<std::sync::Arc<Vec<c3_proto::manifest::FileEntry>>>,
    /// That manifest was complete: its files stay listed, found or not.
    pub listed_complete: bool,
    /// What the attempt's manifest lists could not be read (a write-only bucket, a proxy's
    /// 404): where the final scan cannot see part of the output (the workdir gone, a dir
    /// unreadable), no manifest is written, the one in the store stays, and "manifest" is
    /// unstored. From an empty book, the seal replaced the listing of everything the dead
    /// agent stored with one of nothing, and gc took the blobs.
    pub earlier_unknown: bool,
    /// Cancelled when `recover` is told to stop (a signal, its time budget): the final sync
    /// stops at once, lists what it stored, and reports itself halted ([`FinalSync::halted`]).
    pub halt: Option<tokio_util::sync::CancellationToken>,
}

impl CollectorConfig {
    /// The collector of one recorded attempt: files below its workdir only, never through a
    /// symlink, only what `reader` could read; multipart uploads journaled in the state dir.
    pub fn new(ctx: &AgentContext, record: &RunRecord, reader: Option<JobReader>) -> Self {
        let spec = &record.spec;
        let journal = ctx.state.uploads_dir(&spec.job_id);
        let workdir = PathBuf::from(&record.workdir);
        let uploader = Uploader::new(
            ctx.store.clone(),
            ctx.upload.clone(),
            &spec.job_id,
            Some(journal),
        )
        .for_attempt(spec.attempt)
        .confined_to(&workdir)
        .readable_by(reader.clone())
        .knowing(ctx.known.clone())
        .recording_added(
            ctx.state
                .attempt_dir(&spec.job_id, spec.attempt)
                .join("added-blobs"),
        );
        CollectorConfig {
            uploader,
            workdir,
            physical_workdir: None,
            dirs: record
                .watched_dirs
                .clone()
                .unwrap_or_else(|| spec.collected_dirs()),
            reader,
            manifest: ManifestWriter::new(ctx.store.clone(), spec, ctx.max_manifest_bytes)
                .for_run(record.run_id.clone()),
            live: ctx.live.clone(),
            progress: crate::progress::Progress::shared(),
            listed_before: None,
            listed_complete: false,
            earlier_unknown: false,
            halt: None,
        }
    }
}

/// What the final scan found and could not do.
#[derive(Debug, Default)]
pub struct FinalSync {
    /// For the status' warnings (skipped files, unreadable ones).
    pub warnings: Vec<String>,
    /// Files (or subtrees) that could not be stored: the first [`MAX_NAMED_UNSTORED`].
    pub unstored: Vec<String>,
    /// How many more could not be stored.
    pub unstored_more: u64,
    /// How many of those (named or counted) the job made unstorable itself: paths too deep
    /// or long, more files than a manifest lists, places or files its user cannot read,
    /// files too large or sparse. No later look stores them as they are.
    pub for_good: u64,
    /// Stopped by [`CollectorConfig::halt`] before it was done: not to be sealed (a complete
    /// manifest would leave out what it did not get to).
    pub halted: bool,
    /// No manifest may be written ([`CollectorConfig::earlier_unknown`]).
    pub hold_manifest: bool,
}

pub use crate::sync::MAX_NAMED_UNSTORED;

impl FinalSync {
    fn unstored(&mut self, name: String, for_good: bool) {
        self.unstored_counted(name, 1, for_good);
    }

    /// [`FinalSync::unstored`] for `count` items named by one line (at least one).
    fn unstored_counted(&mut self, name: String, count: u64, for_good: bool) {
        let count = count.max(1);
        if for_good {
            self.for_good = self.for_good.saturating_add(count);
        }
        if self.unstored.len() < MAX_NAMED_UNSTORED {
            self.unstored.push(crate::display::clip_text(name, 1024));
        } else {
            self.unstored_more += 1;
        }
        self.unstored_more = self.unstored_more.saturating_add(count - 1);
    }
}

/// What the collector leaves behind.
#[derive(Debug, Default)]
pub struct Sealed {
    /// sha256 of the complete manifest, if it was written.
    pub manifest_sha256: Option<String>,
    pub files: usize,
    pub bytes: u64,
    /// Bytes this attempt added to the store (files and logs).
    pub new_bytes: u64,
    /// What could not be stored while sealing (`logs/<stream>`, `manifest`).
    pub unstored: Vec<String>,
    /// How many of those no later seal stores (a manifest over `max_manifest_bytes`).
    pub for_good: u64,
}

enum Command {
    JobEnded {
        reply: oneshot::Sender<FinalSync>,
    },
    Seal {
        logs: [(Stream, PathBuf); 2],
        result: serde_json::Value,
        reply: oneshot::Sender<Sealed>,
    },
}

/// The way to the collector task. Dropping it stops the task.
pub struct CollectorHandle {
    commands: mpsc::Sender<Command>,
    publishes: mpsc::Sender<PublishCall>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CollectorHandle {
    /// An abandoned final sync (the stop deadline) stops at once; `recover` redoes it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl CollectorHandle {
    /// Starts the collector; with `procs` (a running job) and live options, phase 1 syncs
    /// while the job runs.
    pub fn start(config: CollectorConfig, procs: Option<JobProcesses>) -> Self {
        let (commands, rx) = mpsc::channel(4);
        let (publishes, publish_rx) = mpsc::channel(16);
        let task = tokio::spawn(run(config, procs, rx, publish_rx).in_current_span());
        CollectorHandle {
            commands,
            publishes,
            task,
        }
    }

    /// Where the agent socket sends the job's requests (until the job ends).
    pub fn publisher(&self) -> mpsc::Sender<PublishCall> {
        self.publishes.clone()
    }

    /// The job's processes are gone: finish live sync and run the final scan.
    pub async fn job_ended(&self) -> FinalSync {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::JobEnded { reply })
            .await
            .is_err()
        {
            return lost("the final sync");
        }
        answer.await.unwrap_or_else(|_| lost("the final sync"))
    }

    /// Stores the logs and writes the complete manifest (after `job_ended`).
    pub async fn seal(mut self, logs: [(Stream, PathBuf); 2], result: serde_json::Value) -> Sealed {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .commands
            .send(Command::Seal {
                logs,
                result,
                reply,
            })
            .await;
        let sealed = match sent {
            Ok(()) => answer.await.ok(),
            Err(_) => None,
        };
        let _ = (&mut self.task).await;
        sealed.unwrap_or_else(|| Sealed {
            unstored: vec!["manifest".into()],
            ..Sealed::default()
        })
    }
}

/// The collector task died (a panic in it): everything it had is unknown, never "nothing".
fn lost(what: &str) -> FinalSync {
    tracing::error!("the collector task failed during {what}; counted as an upload failure");
    FinalSync {
        unstored: vec![format!("({what})")],
        ..FinalSync::default()
    }
}

async fn run(
    config: CollectorConfig,
    procs: Option<JobProcesses>,
    mut rx: mpsc::Receiver<Command>,
    mut publish_rx: mpsc::Receiver<PublishCall>,
) {
    let mut book = SyncBook::default();
    book.progress = config.progress.clone();
    if let Some(files) = &config.listed_before {
        let taken = book.listed_before(files, config.listed_complete);
        tracing::info!(
            files = taken,
            "the files the attempt's manifest listed stay listed where the final scan cannot look"
        );
    }
    // Phase 1: until the job ends (the first command is always JobEnded).
    let first = match (config.live.clone(), procs) {
        (Some(opts), Some(procs)) => {
            let mut first = None;
            let live = LiveSync::new(
                config.uploader.clone(),
                config.workdir.clone(),
                config.physical_workdir.clone(),
                config.dirs.clone(),
                procs,
                config.reader.clone(),
                config.manifest.clone(),
                book,
                opts,
                publish_rx,
            );
            book = live
                .run(async {
                    first = rx.recv().await;
                    // The final sync gets a whole deadline, counted from the job's end.
                    config.uploader.store().restart_outage_clock();
                })
                .await;
            first
        }
        // No live sync: the job's publish requests are still served, paced as live sync
        // paces them (`publish::paced`): in a loop they had the root agent at them without a
        // pause.
        (_, procs) => {
            let mut requests_from = tokio::time::Instant::now();
            let looking = Default::default();
            loop {
                tokio::select! {
                    first = rx.recv() => {
                        config.uploader.store().restart_outage_clock();
                        break first;
                    }
                    () = tokio::time::sleep_until(requests_from), if tokio::time::Instant::now() < requests_from => {}
                    Some(call) = publish_rx.recv(), if tokio::time::Instant::now() >= requests_from => {
                        let parts = Parts {
                            uploader: &config.uploader,
                            manifest: &config.manifest,
                            workdir: &config.workdir,
                            physical_workdir: config.physical_workdir.as_deref(),
                            dirs: &config.dirs,
                            reader: config.reader.as_ref(),
                            procs: procs.as_ref(),
                            looking: &looking,
                        };
                        let serving = crate::publish::serve(&parts, &mut book, call.request);
                        // Raced against the job's end, as live sync races it: the caller is
                        // gone by then, and the call dropped answers "the job has ended".
                        tokio::select! {
                            (reply, next) = crate::publish::paced(serving) => {
                                let _ = call.reply.send(reply);
                                requests_from = next;
                            }
                            first = rx.recv() => {
                                config.uploader.store().restart_outage_clock();
                                break first;
                            }
                        }
                    }
                }
            }
        }
    };
    let Some(Command::JobEnded { reply }) = first else {
        return;
    };
    // Phase 2: the final scan.
    let mut timings = Timings::default();
    let final_sync = final_sync(&config, &mut book, &mut timings).await;
    let hold_manifest = final_sync.hold_manifest;
    let _ = reply.send(final_sync);
    // Phase 3: seal.
    if let Some(Command::Seal {
        logs,
        result,
        reply,
    }) = rx.recv().await
    {
        let sealed = seal(
            &config,
            &mut book,
            logs,
            result,
            &mut timings,
            hold_manifest,
        )
        .await;
        timings.log();
        let _ = reply.send(sealed);
    }
}

/// Where the final sync's time went: one line per job, so that a slow end can be told apart
/// (a huge tree to walk, many files to send, a slow manifest write).
#[derive(Debug, Default)]
struct Timings {
    scan: Duration,
    scanned: usize,
    upload: Duration,
    uploaded: usize,
    already_synced: usize,
    logs: Duration,
    manifest: Duration,
}

impl Timings {
    fn log(&self) {
        // Tenths of a millisecond: enough to tell the stages apart, short to read.
        let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
        let per_sec = self.uploaded as f64 / self.upload.as_secs_f64().max(1e-6);
        tracing::info!(
            scan_ms = ms(self.scan),
            scanned = self.scanned,
            upload_ms = ms(self.upload),
            uploaded = self.uploaded,
            already_synced = self.already_synced,
            files_per_sec = per_sec.round(),
            logs_ms = ms(self.logs),
            manifest_ms = ms(self.manifest),
            "final sync timings"
        );
    }
}

/// Scans the output dirs and uploads what the book does not have.
async fn final_sync(
    config: &CollectorConfig,
    book: &mut SyncBook,
    timings: &mut Timings,
) -> FinalSync {
    let mut out = FinalSync::default();
    let started = Instant::now();
    let (workdir, dirs, reader) = (
        config.workdir.clone(),
        config.dirs.clone(),
        config.reader.clone(),
    );
    let room = config.manifest.max_bytes();
    let halt = config.halt.clone();
    let halted = crate::halted(halt.as_ref());
    if halt.as_ref().is_some_and(|h| h.is_cancelled()) {
        out.halted = true;
        return out;
    }
    let scanning =
        tokio::task::spawn_blocking(move || scan(&workdir, &dirs, reader.as_ref(), room));
    // The walk of a huge tree takes minutes; a halt does not wait for it (it is left to end
    // on its own thread, its result unused).
    let scanned = tokio::select! {
        scanned = scanning => scanned,
        () = halted => {
            out.halted = true;
            return out;
        }
    };
    let found = match scanned {
        Ok(found) => found,
        Err(e) => {
            // Never an empty scan: that would shrink the manifest silently.
            tracing::error!(error = %crate::error_chain(&e), "the final scan failed");
            out.unstored("(the final scan)".into(), false);
            out.hold_manifest = config.earlier_unknown;
            return out;
        }
    };
    out.hold_manifest = config.earlier_unknown && !found.incomplete.is_empty();
    if out.hold_manifest {
        tracing::error!("the attempt's manifest in the store could not be read and the final scan cannot see all of the output: no manifest is written over it (`c3-agent resync` once the store lets this agent read it)");
    }
    timings.scan = started.elapsed();
    timings.scanned = found.files.len();
    out.warnings = found.warnings.clone();
    if found.more_warnings > 0 {
        out.warnings.push(format!(
            "{} more warnings of the final scan",
            found.more_warnings
        ));
    }
    // What could not be read at all is unknown output: never a silent loss.
    for key in &found.incomplete {
        let dir = c3_proto::manifest::rel_display(key);
        tracing::error!(path = %dir, "part of the output could not be read; counted as an upload failure");
        out.unstored(format!("{dir}/"), found.for_good.contains(key));
    }
    for dir in &found.refused {
        tracing::error!(path = %dir, "paths in it are too deep or too long to store; counted as an upload failure");
        out.unstored(format!("{dir}/ (paths too deep or long)"), true);
    }
    // Said as what it is: named "paths too deep or long", a 0600 checkpoint sent operators
    // after the wrong cause.
    for rel in &found.owner_only {
        tracing::error!(path = %rel, "open to its owner alone, and no job user is named to read it as; counted as an upload failure");
        out.unstored(format!("{rel} (open to its owner alone)"), true);
    }
    if let Some(more) = found.refused_more_text() {
        tracing::error!(
            more = found.refused_more,
            "more paths too deep, too long or open to their owner alone than are named; each counted as an upload failure"
        );
        // One line, however many: a job's million too-deep names cost no million entries.
        out.unstored_counted(more, found.refused_more as u64, true);
    }
    crate::fault::pause_point("after-final-scan").await;
    // The job's processes are gone: the final sync may use the whole host.
    let at_end = config
        .uploader
        .clone()
        .with_options(config.uploader.options().at_end())
        .without_inode_reads();
    // Live sync's uploads cut short by an outage were kept for a later try: this is it. What
    // it leaves unstored the same way is kept again; the rest (a version since rewritten or
    // removed) is aborted when the attempt ends, not kept with its job for ever.
    at_end.forget_kept();
    let started = Instant::now();
    // Listed as it goes: gc may take a blob no manifest names once it is an hour old.
    // Its scan sees all of the output: what it lists as it goes covers what the unread
    // manifest may list that is still there (see `ManifestWriter::holding_in_progress`).
    let listing = config.manifest.clone().holding_in_progress(false);
    let report = sync_scan_until(
        &at_end,
        &config.workdir,
        found,
        book,
        (!out.hold_manifest).then_some(&listing),
        config.halt.as_ref(),
        Some(config.manifest.max_bytes()),
    )
    .await;
    out.halted = report.halted;
    timings.upload = started.elapsed();
    timings.uploaded = report.uploaded;
    timings.already_synced = report.skipped;
    out.warnings.extend(report.warnings.iter().cloned());
    if report.more_warnings > 0 {
        out.warnings.push(format!(
            "{} more warnings of the final sync",
            report.more_warnings
        ));
    }
    for (path, e) in report.failures {
        if out.unstored.len() < MAX_NAMED_UNSTORED {
            tracing::error!(path = %path, error = %crate::error_chain(&e), retryable = e.is_retryable(), "upload failed");
        }
        out.unstored(path, e.is_for_good());
    }
    // Counted only by the sync (see `SyncReport::failures`).
    out.unstored_more += report.failures_more;
    out.for_good += report.failures_more_for_good;
    if out.unstored_more > 0 {
        tracing::error!(
            named = out.unstored.len(),
            more = out.unstored_more,
            "more uploads failed than are named one by one"
        );
    }
    out
}

/// Logs, orphaned uploads, the complete manifest (written last).
async fn seal(
    config: &CollectorConfig,
    book: &mut SyncBook,
    logs: [(Stream, PathBuf); 2],
    result: serde_json::Value,
    timings: &mut Timings,
    hold_manifest: bool,
) -> Sealed {
    let started = Instant::now();
    let mut unstored = Vec::new();
    let mut for_good = 0;
    let mut entries = Vec::new();
    for (stream, path) in logs {
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => {
                // Never started (or crashed before the pump opened it): an empty stream.
                let _ = std::fs::write(&path, b"");
                match std::fs::metadata(&path) {
                    Ok(m) => m,
                    Err(_) => {
                        unstored.push(format!("logs/{}", stream.as_str()));
                        continue;
                    }
                }
            }
        };
        let file = LocalFile {
            rel: format!("logs/{}", stream.as_str()),
            abs: path,
            stamp: FileStamp::of(&meta),
        };
        match config.uploader.upload(&file).await {
            Ok(up) => {
                book.new_bytes += up.new_bytes;
                entries.push(LogEntry {
                    size: up.digests.size,
                    sha256: up.digests.sha256_hex(),
                });
            }
            Err(e) => {
                tracing::error!(stream = stream.as_str(), error = %crate::error_chain(&e), "cannot store the job's log");
                for_good += u64::from(e.is_for_good());
                unstored.push(format!("logs/{}", stream.as_str()));
            }
        }
    }
    let logs = match <[LogEntry; 2]>::try_from(entries) {
        Ok([stdout, stderr]) => Some(Logs { stdout, stderr }),
        Err(_) => None,
    };
    timings.logs = started.elapsed();
    // Whatever multipart upload is still journaled will never be completed now.
    config.uploader.abort_orphans().await;
    let started = Instant::now();
    let completed = match hold_manifest {
        true => None,
        false => Some(config.manifest.complete(book, logs, result).await),
    };
    let manifest_sha256 = match completed {
        // The store's manifest stays as it is (see `CollectorConfig::earlier_unknown`).
        None => {
            unstored.push("manifest".into());
            None
        }
        Some(Ok(sha)) => Some(sha),
        Some(Err(e)) => {
            tracing::error!(error = %crate::error_chain(&e), "cannot write the manifest");
            // Never "for good", even when too large: with no complete manifest, nothing lists
            // the attempt's blobs (gc may take those of its final sync) and the workdir is
            // the only copy of what was stored, so retention must keep it and recover look
            // again.
            unstored.push("manifest".into());
            None
        }
    };
    timings.manifest = started.elapsed();
    Sealed {
        manifest_sha256,
        files: book.len(),
        bytes: book.total_bytes(),
        // Whoever uploaded them: a crashed agent's blobs are this attempt's too.
        new_bytes: config
            .uploader
            .added_bytes()
            .map_or(book.new_bytes, |added| added.max(book.new_bytes)),
        unstored,
        for_good,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobStore;
    use crate::upload::UploadOptions;

    /// The final sync of a large output takes hours; `gc` takes a blob no manifest names once
    /// it is an hour old. What it stored is listed as it goes (an in-progress manifest),
    /// before the seal: none was written after the job's end, and a blob stored at the start
    /// of a long final sync was gone by the time the complete manifest named it.
    #[tokio::test]
    async fn a_final_sync_lists_what_it_stored_before_the_seal() {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        for name in ["a.bin", "b.bin", "c.bin"] {
            std::fs::write(arts.join(name), name).unwrap();
        }
        let store = BlobStore::in_memory();
        let spec = c3_proto::JobSpec::from_json(br#"{"job_id":"j","command":["true"]}"#)
            .unwrap()
            .spec;
        let options = UploadOptions {
            files_in_flight: 1,
            auto_in_flight: false,
            ..UploadOptions::default()
        };
        let config = CollectorConfig {
            uploader: Uploader::new(store.clone(), options, "j", None).confined_to(dir.path()),
            workdir: dir.path().to_path_buf(),
            physical_workdir: None,
            dirs: vec!["artifacts".into()],
            reader: None,
            manifest: ManifestWriter::new(store.clone(), &spec, 1 << 20)
                .checkpoints_every(Duration::ZERO),
            live: None,
            progress: crate::progress::Progress::shared(),
            listed_before: None,
            listed_complete: false,
            earlier_unknown: false,
            halt: None,
        };
        let collector = CollectorHandle::start(config, None);
        let ended = collector.job_ended().await;
        assert!(ended.unstored.is_empty(), "{:?}", ended.unstored);
        let key = crate::store::attempt_manifest_key("j", spec.attempt);
        let listed = c3_proto::Manifest::from_json(&store.get_bytes(&key).await.unwrap()).unwrap();
        assert!(!listed.complete);
        let paths: Vec<&str> = listed.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            ["artifacts/a.bin", "artifacts/b.bin", "artifacts/c.bin"]
        );
        drop(collector);
    }
}
