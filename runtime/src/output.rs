//! The job's stdout/stderr: each line into the agent's log (for `journalctl -f`), the
//! whole stream into the state dir, and (from that file) live to the control plane.
//!
//! The pumps never wait on the network: the forwarder reads the log files by offset,
//! so a slow control plane can never block the job on a full pipe.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use c3_proto::{OutputChunk, Stream};

use crate::loglimit::LineLimit;
use crate::report::ControlPlane;

/// The most one echoed line may take in the log once escaped; longer ones are split.
/// journald cuts a stream line at `LineMax` (48 KiB) and reads a `<N>` priority at the start
/// of each piece: a line that only grew past it when escaped (a control byte is six bytes as
/// `\u0001`) ended in a journal entry of the job's making, at any priority it named.
const MAX_LINE: usize = 16 * 1024;
/// Most bytes of one stream read for one live post.
const MAX_POST: usize = 256 * 1024;
/// Most bytes of one live post's body, as JSON: the job's control characters are six bytes
/// escaped and its invalid UTF-8 three, so a read is halved until its post fits (a proxy's
/// usual body limit is 1 MiB, and a post over it is refused every time).
const MAX_POST_BODY: usize = 1024 * 1024;
/// How far live output may fall behind its log while the job runs (a post of at most
/// [`MAX_POST`] every 2 s is 128 KiB/s a stream): past it the posts skip to the log's tail,
/// or a job that floods its output is shown minutes, then hours, behind.
const MAX_LIVE_BACKLOG: u64 = 16 * MAX_POST as u64;
/// The same once the job is over: the last round (2 s) sends the end, where the traceback
/// that says why the job failed is, not the middle of a flood.
const MAX_LAST_BACKLOG: u64 = 4 * MAX_POST as u64;

/// The smallest read a refused-as-too-large post is cut down to.
const MIN_POST: usize = 4 * 1024;
/// After a rejected post (a 4xx), or one not delivered, a stream skips up to 2^this rounds
/// before its next one.
const MAX_REJECTED_BACKOFF: u32 = 5;
/// Rounds in a row the control plane may fail on one piece with its own server error (500,
/// 501, 505+) before it is passed over as a 4xx'd one is: a piece it cannot take (a NUL,
/// which PostgreSQL refuses) held the stream's live output back for the whole job.
const MAX_FAILED_ROUNDS: u32 = 3;
/// The longest a control plane's `Retry-After` rests a stream.
const MAX_LIVE_RETRY_AFTER: Duration = Duration::from_secs(300);
/// The contract's "at most every 2 s while output flows".
pub const POST_INTERVAL: Duration = Duration::from_secs(2);
/// How long one post may try while the job runs (best effort: the next round sends it again).
const LIVE_POST: Duration = Duration::from_secs(5);
/// The most the last round of posts takes once the job is gone, all posts together; less
/// when `give_up_secs` or the stop deadline leave less.
pub const LAST_ROUND: Duration = Duration::from_secs(2);

/// What is kept of each stream by default (`[job] max_log_bytes`).
pub const DEFAULT_MAX_LOG_BYTES: u64 = 1 << 30;
/// Lines echoed into the agent's log per second, sustained, and in a burst: journald
/// drops a unit's messages past its rate limit (10,000 per 30 s by default), and a job
/// printing faster must not make it drop the agent's own.
const ECHO_PER_SEC: f64 = 100.0;
const ECHO_BURST: f64 = 2000.0;

/// How often a pump whose log could not be written tries it again (a full disk may have
/// room again: the job deleted a checkpoint).
const LOG_RETRY: Duration = Duration::from_secs(2);

/// What a pump kept of its stream, for the terminal status.
#[derive(Debug)]
pub struct Pumped {
    pub stream: Stream,
    /// Bytes read from the job.
    pub total: u64,
    /// Bytes past `max_log_bytes`: drained and counted, not kept.
    pub over_limit: u64,
    /// Bytes the log file could not take (a full disk), and the first error.
    pub lost: u64,
    pub error: Option<String>,
}

impl Pumped {
    /// What the user must know of the stream's log: a log that lost its middle or its end
    /// (the traceback of a job that filled the disk) looked whole in the manifest.
    pub fn warning(&self) -> Option<String> {
        let stream = self.stream.as_str();
        let mut parts = Vec::new();
        if self.lost > 0 {
            parts.push(format!(
                "{} of it could not be written to the state dir ({}); the log says where",
                crate::display::human_bytes(self.lost),
                self.error.as_deref().unwrap_or("an error")
            ));
        }
        if self.over_limit > 0 {
            parts.push(format!(
                "{} past job.max_log_bytes were dropped",
                crate::display::human_bytes(self.over_limit)
            ));
        }
        (!parts.is_empty())
            .then(|| format!("the job's {stream} log is not whole: {}", parts.join("; ")))
    }
}

/// Copies `reader` to `log_path` (its first `max_bytes` bytes) and echoes lines into the
/// log (at a rate journald keeps). Past `max_bytes` the output is still drained, so the job
/// never blocks on a full pipe, but only counted: the agent writes the log as root, where
/// neither the job user's quota nor the root reserve stops it, and it becomes a blob too.
/// A log file that cannot be written (a full disk) never stops the draining either: what
/// it could not take is counted, the file is tried again every [`LOG_RETRY`], and a note
/// in it says where bytes are missing and how many.
pub async fn pump(
    mut reader: impl AsyncRead + Unpin,
    stream: Stream,
    log_path: PathBuf,
    max_bytes: u64,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<Pumped> {
    // Appended to: a rerun that takes over the attempt of an agent that died keeps the
    // earlier run's output (truncated, it was lost, and the live posts sent other bytes at
    // offsets the control plane already had).
    let mut options = tokio::fs::OpenOptions::new();
    // Never through a link: root appends the job's bytes to it.
    options
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW);
    let open = || options.open(&log_path);
    let mut pumped = Pumped {
        stream,
        total: 0,
        over_limit: 0,
        lost: 0,
        error: None,
    };
    // Bytes lost since the file last took a note of them.
    let mut unsaid = 0u64;
    let mut retry_at = Instant::now();
    let (mut file, earlier) = match open().await {
        Ok(f) => {
            let earlier = f.metadata().await.map_or(0, |m| m.len());
            (Some(f), earlier)
        }
        Err(e) => {
            tracing::error!(path = %log_path.display(), error = %crate::error_chain(&e), "cannot keep the job's output in the state dir; still echoing it");
            pumped.error = Some(crate::error_chain(&e));
            retry_at += LOG_RETRY;
            (None, 0)
        }
    };
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Lines::default();
    // What the earlier run kept counts against `max_bytes` too.
    let room = max_bytes.saturating_sub(earlier);
    let mut echo = EchoLimit::new(stream);
    let lost_note = |lost: u64, error: &Option<String>| {
        format!(
            "\n[c3-agent: {lost} bytes of {} are missing here: the state dir could not take them ({})]\n",
            stream.as_str(),
            error.as_deref().unwrap_or("an error")
        )
    };
    loop {
        // Told to stop (a process outside the job holds the pipe open), the log is still
        // ended as at the pipe's end: its notes of what was dropped or lost, its sync.
        let n = tokio::select! {
            read = reader.read(&mut buf) => read?,
            () = stop.cancelled() => 0,
        };
        if n == 0 {
            break;
        }
        let total = pumped.total;
        let keep = (room.saturating_sub(total)).min(n as u64) as usize;
        if keep < n && total <= room {
            tracing::warn!(stream = stream.as_str(), max_log_bytes = max_bytes, "the job's output is over job.max_log_bytes: the rest is drained and counted, not kept or echoed");
        }
        if keep > 0 {
            let due = Instant::now() >= retry_at;
            if file.is_none() && due {
                file = open().await.ok();
            }
            // After a failure the file is tried again only when due: each try of a full
            // disk's file costs a write that fails.
            let written = match file.as_mut() {
                Some(f) if unsaid == 0 || due => {
                    // Flushing each read keeps the file current for the live forwarder
                    // and for `recover`.
                    let note = (unsaid > 0).then(|| lost_note(unsaid, &pumped.error));
                    let tried = async {
                        if let Some(note) = &note {
                            f.write_all(note.as_bytes()).await?;
                        }
                        f.write_all(&buf[..keep]).await?;
                        f.flush().await
                    }
                    .await;
                    Some(tried.map(|()| note.is_some()))
                }
                _ => None,
            };
            match written {
                Some(Ok(true)) => {
                    tracing::info!(
                        stream = stream.as_str(),
                        lost_bytes = unsaid,
                        "the job's output is kept in the state dir again"
                    );
                    unsaid = 0;
                }
                Some(Ok(false)) => {}
                // Not written: a write that failed, or none tried (not due yet, or no file).
                failed => {
                    if let Some(Err(e)) = &failed {
                        if pumped.error.is_none() {
                            tracing::error!(path = %log_path.display(), error = %crate::error_chain(e), "cannot write the job's output to the state dir; still echoing it, trying again every 2 s");
                            pumped.error = Some(crate::error_chain(e));
                        }
                    }
                    if failed.is_some() || due {
                        retry_at = Instant::now() + LOG_RETRY;
                    }
                    pumped.lost += keep as u64;
                    unsaid += keep as u64;
                }
            }
        }
        pumped.total += n as u64;
        lines.feed(&buf[..keep], |line| echo.line(line));
    }
    lines.finish(|line| echo.line(line));
    echo.finish();
    if file.is_none() && unsaid > 0 {
        file = open().await.ok();
    }
    if unsaid > 0 {
        let note = lost_note(unsaid, &pumped.error);
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(note.as_bytes()).await;
        }
    }
    let total = pumped.total;
    if total > room {
        pumped.over_limit = total - room;
        let note = format!(
            "\n[c3-agent: {} more bytes of {} were dropped past job.max_log_bytes = {max_bytes}]\n",
            total - room,
            stream.as_str()
        );
        tracing::warn!(
            stream = stream.as_str(),
            dropped_bytes = total - room,
            total_bytes = total,
            "the job's output past job.max_log_bytes was dropped"
        );
        if let Some(f) = file.as_mut() {
            let _ = f.write_all(note.as_bytes()).await;
        }
    }
    if let Some(f) = file {
        if let Err(e) = f.sync_all().await {
            tracing::error!(path = %log_path.display(), error = %crate::error_chain(&e), "cannot sync the job's output log to disk");
        }
    }
    Ok(pumped)
}

/// The most byte `b` of a job's line becomes in the log, in either format: a control byte
/// is `\u0001` in JSON, `"` and a backslash are escaped there, and a byte of a multi-byte character
/// at most three (a byte that is not UTF-8 is U+FFFD, and a C1 control is two bytes that
/// become `\u0085`).
fn escaped_len(b: u8) -> usize {
    match b {
        0..=0x1f | 0x7f => 6,
        b'"' | b'\\' => 2,
        0x80.. => 3,
        _ => 1,
    }
}

/// One stream's output cut into the lines echoed: at each newline, and where a line would
/// pass [`MAX_LINE`] once escaped (never inside a UTF-8 character).
#[derive(Default)]
struct Lines {
    line: Vec<u8>,
    /// `line`'s escaped length, at most.
    escaped: usize,
}

impl Lines {
    /// Adds `data`, handing each line it completes to `each`.
    fn feed(&mut self, data: &[u8], mut each: impl FnMut(&[u8])) {
        for &b in data {
            if b == b'\n' {
                each(&self.line);
                self.line.clear();
                self.escaped = 0;
                continue;
            }
            let len = escaped_len(b);
            if self.escaped + len > MAX_LINE {
                // A character begun at the end goes whole into the next line.
                let cut = self.line.len() - split_at_end(&self.line);
                each(&self.line[..cut]);
                self.line.drain(..cut);
                self.escaped = self.line.iter().map(|&b| escaped_len(b)).sum();
            }
            self.line.push(b);
            self.escaped += len;
        }
    }

    /// The last line, which no newline ended.
    fn finish(&mut self, mut each: impl FnMut(&[u8])) {
        if !self.line.is_empty() {
            each(&std::mem::take(&mut self.line));
        }
    }
}

/// The echo's [`LineLimit`]; what it holds back is counted and said in one line once lines
/// flow again (or at the end), pointing at where the whole output is.
struct EchoLimit {
    stream: Stream,
    limit: LineLimit,
}

impl EchoLimit {
    fn new(stream: Stream) -> Self {
        EchoLimit {
            stream,
            limit: LineLimit::new(ECHO_PER_SEC, ECHO_BURST),
        }
    }

    fn line(&mut self, line: &[u8]) {
        if !self.limit.admit_costing(echo_cost(line)) {
            return;
        }
        self.say_held_back(false);
        emit(self.stream, line);
    }

    /// Says what was held back, if anything.
    fn finish(&mut self) {
        self.say_held_back(true);
    }

    fn say_held_back(&mut self, at_end: bool) {
        if let Some(lines) = self.limit.held_back(at_end) {
            tracing::info!(target: "c3::job", stream = self.stream.as_str(), lines, "(lines of the job's output not echoed here: faster than the journal keeps; all are in `c3-agent logs`)");
        }
    }
}

/// How many lines `line` counts as against the echo's rate: each KiB it takes in the log
/// counts as a line more. 100 lines a second of 16 KiB each were 1.6 MB/s into the journal,
/// which turned it over until the agent's own lines were gone; and a line of control bytes
/// takes up to six times its length there, so its escaped length is what is charged.
fn echo_cost(line: &[u8]) -> f64 {
    let escaped: usize = line.iter().map(|&b| escaped_len(b)).sum();
    1.0 + (escaped / 1024) as f64
}

/// One line of the job's, the stream first: at the end (`stream="stdout"`, as a field) a
/// job's `job finished state=SUCCEEDED` padded with spaces read as the agent's own in a pager.
fn emit(stream: Stream, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let stream = stream.as_str();
    tracing::info!(target: "c3::job", stream, "[{stream}] {text}");
}

/// Posts new output every [`POST_INTERVAL`] while the job runs; once `last_by` holds a
/// deadline, sends the rest by then and returns (at once if the sender is gone).
///
/// One deadline covers the whole last round, every post of both streams: per-post timeouts
/// add up (5 s, per stream, per post) past `give_up_secs` and the stop deadline when the
/// control plane takes connections and never answers. A live post under way when the end
/// comes is dropped; its bytes are sent again from the same offset in the last round.
pub async fn forward_live(
    cp: ControlPlane,
    job_id: String,
    attempt: u32,
    logs: [(Stream, PathBuf); 2],
    mut last_by: watch::Receiver<Option<Instant>>,
) {
    let endpoint = format!("v1/jobs/{job_id}/output");
    let mut streams = [StreamPosts::default(), StreamPosts::default()];
    let mut tick = tokio::time::interval(POST_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    let by = 'live: loop {
        // The end first: a tick that is ready too must not start one more live round.
        tokio::select! {
            biased;
            by = last_by.wait_for(Option::is_some) => break 'live by.ok().and_then(|b| *b),
            _ = tick.tick() => {}
        }
        for (i, (stream, path)) in logs.iter().enumerate() {
            if streams[i].resting() {
                continue;
            }
            streams[i].catch_up(path, *stream, MAX_LIVE_BACKLOG).await;
            let post = post_next(
                &cp,
                &endpoint,
                attempt,
                *stream,
                path,
                &streams[i],
                Instant::now() + LIVE_POST,
                false,
            );
            tokio::select! {
                biased;
                by = last_by.wait_for(Option::is_some) => break 'live by.ok().and_then(|b| *b),
                posted = post => streams[i].after(posted, *stream),
            }
        }
    };
    let by = by.unwrap_or_else(Instant::now);
    // On the last round drain everything, a bounded number of posts per stream, the streams
    // taking turns and stderr first: a stdout backlog must not spend the whole deadline while
    // the traceback that says why the job failed waits behind it.
    let mut order: Vec<usize> = (0..logs.len()).collect();
    order.sort_by_key(|&i| logs[i].0 != Stream::Stderr);
    let mut drained = [false; 2];
    for (i, (stream, path)) in logs.iter().enumerate() {
        streams[i].catch_up(path, *stream, MAX_LAST_BACKLOG).await;
    }
    for _ in 0..64 {
        for &i in &order {
            if drained[i] {
                continue;
            }
            let (stream, path) = &logs[i];
            let posted = post_next(
                &cp,
                &endpoint,
                attempt,
                *stream,
                path,
                &streams[i],
                by,
                true,
            )
            .await;
            if !matches!(posted, Posted::Sent(_)) && !streams[i].cut_down(&posted) {
                drained[i] = true;
            }
            streams[i].after(posted, *stream);
        }
        if drained.iter().all(|d| *d) {
            break;
        }
    }
}

/// Where one stream's live posts stand.
struct StreamPosts {
    offset: u64,
    /// Bytes read for the next post (cut down by a 413).
    limit: usize,
    /// Rejected posts in a row, and rounds still to skip because of them.
    rejected: u32,
    rest: u32,
    /// Undelivered posts in a row (they rest the stream too).
    undelivered: u32,
    /// Rounds in a row the control plane failed on the piece at `offset` with its own server
    /// error.
    failed: u32,
}

impl Default for StreamPosts {
    fn default() -> Self {
        StreamPosts {
            offset: 0,
            limit: MAX_POST,
            rejected: 0,
            rest: 0,
            undelivered: 0,
            failed: 0,
        }
    }
}

impl StreamPosts {
    /// Skips to the last `backlog / 2` bytes of the log (from a line's start, or a
    /// character's) when the posts are more than `backlog` behind it. The gap in the offsets
    /// tells the control plane; the whole log is stored with the job's files.
    async fn catch_up(&mut self, path: &PathBuf, stream: Stream, backlog: u64) {
        let Ok(len) = tokio::fs::metadata(path).await.map(|m| m.len()) else {
            return;
        };
        if len.saturating_sub(self.offset) <= backlog {
            return;
        }
        let mut to = len - backlog / 2;
        let mut head = vec![0u8; MAX_LINE];
        let read = async {
            let mut file = tokio::fs::File::open(path).await?;
            file.seek(std::io::SeekFrom::Start(to)).await?;
            let n = file.read(&mut head).await?;
            Ok::<usize, std::io::Error>(n)
        }
        .await;
        let Ok(n) = read else {
            return;
        };
        let head = &head[..n];
        let skip = match head.iter().position(|&b| b == b'\n') {
            Some(nl) => nl + 1,
            // No line starts near: a character does.
            None => head
                .iter()
                .position(|&b| !(0x80..0xc0).contains(&b))
                .unwrap_or(0),
        };
        to += skip as u64;
        tracing::warn!(
            stream = stream.as_str(),
            skipped_bytes = to - self.offset,
            "live output is too far behind the job's {} to catch up; skipped to its tail (the whole log is stored with the job's files)",
            stream.as_str()
        );
        self.offset = to;
    }

    /// Whether this round is skipped (a rest after rejections); counts it down.
    fn resting(&mut self) -> bool {
        let resting = self.rest > 0;
        self.rest = self.rest.saturating_sub(1);
        resting
    }

    /// Whether `posted` was refused as too large and the next read is smaller.
    fn cut_down(&self, posted: &Posted) -> bool {
        matches!(posted, Posted::Rejected { status: 413, .. }) && self.limit > MIN_POST
    }

    /// The contract's "other 4xx are not retried": a rejected piece is passed over (the
    /// whole log is still stored at the end), and the stream rests 1, 2, 4 ... 32 rounds,
    /// so a control plane without the endpoint (404) or refusing the agent (401) is not sent
    /// each new piece every 2 s. A 413 cuts the reads down first. Before, a rejected piece
    /// was read and sent again every round, for the rest of the job.
    fn after(&mut self, posted: Posted, stream: Stream) {
        match posted {
            Posted::Sent(n) => {
                self.offset += n;
                self.rejected = 0;
                self.undelivered = 0;
                self.failed = 0;
                // A 413 was one proxy's limit at one moment: grown back a step at a time.
                self.limit = (self.limit * 2).min(MAX_POST);
            }
            Posted::Nothing => {}
            // Sent again from the same offset, after a rest as a rejection's, or as long as
            // the control plane asked: each round began its tries at 200 ms again, every
            // agent of the cluster in step through an outage. A piece the control plane
            // itself fails on round after round is passed over.
            Posted::Undelivered {
                server_error,
                retry_after,
                covered,
            } => {
                let asked = retry_after.map_or(0, |wait| {
                    let wait = wait.min(MAX_LIVE_RETRY_AFTER);
                    wait.as_millis().div_ceil(POST_INTERVAL.as_millis()) as u32
                });
                self.rest = (1 << self.undelivered.min(MAX_REJECTED_BACKOFF)).max(asked);
                self.undelivered += 1;
                self.failed = if server_error { self.failed + 1 } else { 0 };
                if self.failed >= MAX_FAILED_ROUNDS {
                    tracing::warn!(stream = stream.as_str(), offset = self.offset, bytes = covered, "the control plane keeps failing on a piece of live output; skipped (the whole log is stored with the job's files)");
                    self.offset += covered;
                    self.failed = 0;
                }
            }
            Posted::Rejected { .. } if self.cut_down(&posted) => {
                self.limit = (self.limit / 2).max(MIN_POST);
            }
            Posted::Rejected { status, covered } => {
                self.undelivered = 0;
                self.failed = 0;
                if self.rejected == 0 {
                    tracing::warn!(stream = stream.as_str(), status, "the control plane refused live output; skipped (the whole log is stored with the job's files)");
                }
                self.offset += covered;
                self.rest = 1 << self.rejected.min(MAX_REJECTED_BACKOFF);
                self.rejected += 1;
            }
        }
    }
}

/// What one live post did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Posted {
    /// Delivered; the bytes it covered.
    Sent(u64),
    /// No new output.
    Nothing,
    /// Not delivered in time (sent again from the same offset): `server_error`, a try met
    /// the control plane's own server error ([`crate::report::ReportError::is_server_error`]);
    /// the wait its last answer asked for; the bytes it covered.
    Undelivered {
        server_error: bool,
        retry_after: Option<Duration>,
        covered: u64,
    },
    /// Refused with this 4xx; the bytes it covered.
    Rejected { status: u16, covered: u64 },
}

/// Posts the next piece of `path` from the stream's offset by `deadline`; `at_end`: the job
/// is over, and nothing will complete a character the log ends in the middle of.
#[allow(clippy::too_many_arguments)]
async fn post_next(
    cp: &ControlPlane,
    endpoint: &str,
    attempt: u32,
    stream: Stream,
    path: &PathBuf,
    at: &StreamPosts,
    deadline: Instant,
    at_end: bool,
) -> Posted {
    let offset = at.offset;
    let mut limit = at.limit;
    let (body, consumed) = loop {
        let Some((data, consumed)) = read_text(path, offset, limit, at_end).await else {
            return Posted::Nothing;
        };
        let body = OutputChunk {
            attempt,
            stream,
            offset,
            data,
        }
        .to_json();
        if body.len() <= MAX_POST_BODY || limit <= MIN_POST {
            break (body, consumed);
        }
        limit /= 2;
    };
    // Live output is best effort: a short retry, never the outbox.
    let (posted, _, answered) = cp.post_tracked(endpoint, &body, deadline, None).await;
    match posted {
        Ok(_) => Posted::Sent(consumed),
        Err(crate::report::ReportError::Rejected { status, .. }) => Posted::Rejected {
            status,
            covered: consumed,
        },
        Err(e) => {
            tracing::debug!(error = %crate::error_chain(&e), "live output not delivered");
            let retry_after = match e {
                crate::report::ReportError::Unavailable { retry_after, .. } => retry_after,
                _ => None,
            };
            Posted::Undelivered {
                server_error: answered.is_some(),
                retry_after,
                covered: consumed,
            }
        }
    }
}

/// Up to `limit` bytes of new text from `offset`, cut at a UTF-8 boundary (`at_end`: what is
/// left of a character cut by the log's end goes as `?`, one for each byte).
async fn read_text(
    path: &PathBuf,
    offset: u64,
    limit: usize,
    at_end: bool,
) -> Option<(String, u64)> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    file.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
    let mut buf = Vec::with_capacity(limit.min(64 * 1024));
    (&mut file)
        .take(limit as u64)
        .read_to_end(&mut buf)
        .await
        .ok()?;
    if buf.is_empty() {
        return None;
    }
    if let Ok(s) = std::str::from_utf8(&buf) {
        if !s.contains('\0') {
            return Some((s.to_string(), buf.len() as u64));
        }
    }
    // A character split at the end of what was read is sent whole next time, also after bytes
    // that are not UTF-8 (those go as `?`): it was cut into two replacements, one each side.
    let split = split_at_end(&buf);
    // Held back only while more may come; a read cut by `limit` always may.
    let n = if at_end && buf.len() < limit {
        buf.len()
    } else {
        buf.len() - split
    };
    if n == 0 {
        return None;
    }
    Some((byte_for_byte(&buf[..n]), n as u64))
}

/// `bytes` as text of the same length: a NUL (`find -print0`, a binary dump; the whole piece
/// around it was passed over once the control plane had failed on it three times) and each
/// byte that is not UTF-8 become one `?`. As U+FFFD (three bytes, one for up to three bytes
/// read), the next post's `offset` was no longer this one's plus its `data`'s length, and a
/// control plane that places or dedupes pieces by those cut or doubled them.
fn byte_for_byte(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        out.extend(
            chunk
                .valid()
                .chars()
                .map(|c| if c == '\0' { '?' } else { c }),
        );
        out.extend(std::iter::repeat_n('?', chunk.invalid().len()));
    }
    out
}

/// How many bytes at the end of `buf` begin a UTF-8 character and are not all of it.
fn split_at_end(buf: &[u8]) -> usize {
    for back in 1..=buf.len().min(3) {
        let b = buf[buf.len() - back];
        if b & 0xc0 == 0x80 {
            continue;
        }
        let needs = match b {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf4 => 4,
            _ => return 0,
        };
        let tail = &buf[buf.len() - back..];
        let a_prefix = std::str::from_utf8(tail).is_err_and(|e| e.error_len().is_none());
        return if needs > back && a_prefix { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::{pump, Pumped, LOG_RETRY};
    use c3_proto::Stream;
    use tokio::io::AsyncWriteExt;

    /// A log the disk cannot take is counted and said, never taken for a whole one.
    #[tokio::test]
    async fn output_a_full_disk_refuses_is_counted_and_warned() {
        let p: Pumped = pump(
            &b"a\nb\n"[..],
            Stream::Stdout,
            "/dev/full".into(),
            u64::MAX,
            Default::default(),
        )
        .await
        .unwrap();
        assert_eq!((p.total, p.lost), (4, 4));
        let w = p.warning().expect("a warning");
        assert!(
            w.contains("stdout") && w.contains("could not be written"),
            "{w}"
        );
        let whole = pump(
            &b"a\nb\n"[..],
            Stream::Stderr,
            tempfile::tempdir().unwrap().path().join("l"),
            2,
            Default::default(),
        )
        .await
        .unwrap();
        assert!(
            whole.warning().unwrap().contains("max_log_bytes"),
            "{:?}",
            whole.warning()
        );
    }

    /// A flood far past what live posts carry is skipped to its tail while the job runs
    /// (live posts were minutes, then hours, behind), and the last line reaches the control
    /// plane (the last round sent at most 64 posts from where the live ones had got to).
    #[tokio::test]
    async fn live_output_far_behind_skips_to_the_tail() {
        use std::io::Write;
        let (url, requests) =
            crate::report::tests::serve_recorded(std::time::Duration::ZERO, |_, _| {
                ("200 OK", "{}")
            })
            .await;
        let cp = crate::report::tests::control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let (out, err) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
        let mut f = std::fs::File::create(&out).unwrap();
        let line = [b'x'; 99];
        for _ in 0..(40 << 20) / 100 {
            f.write_all(&line).unwrap();
            f.write_all(b"\n").unwrap();
        }
        f.write_all(b"TAIL\n").unwrap();
        std::fs::write(&err, b"").unwrap();
        let (last_by, rx) = tokio::sync::watch::channel(None);
        let logs = [(Stream::Stdout, out), (Stream::Stderr, err)];
        let forward = tokio::spawn(super::forward_live(cp, "j".into(), 1, logs, rx));
        // One live round first (every 2 s).
        tokio::time::sleep(super::POST_INTERVAL + std::time::Duration::from_millis(500)).await;
        last_by
            .send(Some(
                tokio::time::Instant::now() + std::time::Duration::from_secs(5),
            ))
            .unwrap();
        forward.await.unwrap();
        let requests = requests.lock().unwrap();
        let first: serde_json::Value = serde_json::from_str(&requests[0].1).unwrap();
        let len = (40u64 << 20) / 100 * 100 + 5;
        let offset = first["offset"].as_u64().unwrap();
        // The live round's skip: to the last half of its backlog, from a line's start.
        let to = len - super::MAX_LIVE_BACKLOG / 2;
        assert!((to..to + 100).contains(&offset), "{offset} (to {to})");
        assert!(first["data"].as_str().unwrap().starts_with('x'));
        assert!(
            requests.iter().any(|(_, b)| b.contains("TAIL\\n")),
            "the tail was not sent"
        );
    }

    /// A pump told to stop while the pipe stays open (a process outside the job holds it)
    /// ends its log as at the pipe's end: the note of what was dropped is written.
    #[tokio::test]
    async fn a_stopped_pump_still_ends_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let (mut job, read) = tokio::io::duplex(1024);
        job.write_all(&[b'x'; 100]).await.unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let pumping = tokio::spawn(pump(read, Stream::Stdout, log.clone(), 10, stop.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        stop.cancel();
        let p = pumping.await.unwrap().unwrap();
        assert_eq!((p.total, p.over_limit), (100, 90));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("90 more bytes of stdout were dropped"),
            "{text}"
        );
        drop(job);
    }

    /// Once the log can be written again it is, with a note where bytes are missing.
    #[tokio::test(start_paused = true)]
    async fn output_is_kept_again_once_the_log_can_be_written() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("later");
        let log = dir.join("stdout.log");
        let (mut job, read) = tokio::io::duplex(1024);
        let making = dir.clone();
        let writer = tokio::spawn(async move {
            job.write_all(b"lost\n").await.unwrap();
            tokio::time::sleep(LOG_RETRY * 2).await;
            std::fs::create_dir(&making).unwrap();
            job.write_all(b"kept\n").await.unwrap();
        });
        let p = pump(
            read,
            Stream::Stdout,
            log.clone(),
            u64::MAX,
            Default::default(),
        )
        .await
        .unwrap();
        writer.await.unwrap();
        assert_eq!((p.total, p.lost), (10, 5));
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            text.contains("5 bytes of stdout are missing here"),
            "{text}"
        );
        assert!(text.ends_with("kept\n"), "{text}");
        assert!(p.warning().is_some());
    }

    use super::*;

    /// A NUL in the job's output goes as `?` (the control plane's storage refuses U+0000,
    /// and the piece around it was passed over); its byte still counts as read.
    #[tokio::test]
    async fn a_nul_in_the_output_is_not_posted() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        std::fs::write(&log, b"a\0b\n").unwrap();
        assert_eq!(
            read_text(&log, 0, 1000, true).await,
            Some(("a?b\n".to_string(), 4))
        );
        std::fs::write(&log, b"\xff\0").unwrap();
        assert_eq!(
            read_text(&log, 0, 1000, true).await,
            Some(("??".to_string(), 2))
        );
    }

    /// Whatever the job printed, a piece's text is as long as the bytes it covers: the next
    /// `offset` is this one's plus the length of its `data`.
    #[tokio::test]
    async fn a_piece_is_as_long_as_the_bytes_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        // Latin-1, a NUL, a lone continuation byte, a truncated 3-byte character, UTF-8.
        let printed = b"caf\xe9 \0 \x80 \xe2\x82 \xe2\x82\xac end\n";
        std::fs::write(&log, printed).unwrap();
        let (text, read) = read_text(&log, 0, 1000, true).await.unwrap();
        assert_eq!(read as usize, printed.len());
        assert_eq!(text.len(), printed.len(), "{text:?}");
        assert_eq!(text, "caf? ? ? ?? \u{20ac} end\n");
    }

    /// A character split at the end of a read goes whole with the next one, also when the
    /// read holds bytes that are not UTF-8 or only the character's first bytes.
    #[tokio::test]
    async fn a_character_split_by_a_read_is_sent_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        let e_acute = "\u{e9}".as_bytes();
        std::fs::write(&log, [&b"\xff"[..], &e_acute[..1]].concat()).unwrap();
        assert_eq!(
            read_text(&log, 0, 1000, false).await,
            Some(("?".to_string(), 1))
        );
        assert_eq!(
            read_text(&log, 1, 1000, false).await,
            None,
            "half a character"
        );
        // Once the job is over nothing will complete it: sent as it is.
        assert_eq!(
            read_text(&log, 1, 1000, true).await,
            Some(("?".to_string(), 1))
        );
        let mut all = std::fs::read(&log).unwrap();
        all.extend_from_slice(&e_acute[1..]);
        all.extend_from_slice("\u{1f600}".as_bytes());
        std::fs::write(&log, &all).unwrap();
        assert_eq!(
            read_text(&log, 1, 1000, false).await,
            Some(("\u{e9}\u{1f600}".to_string(), 6))
        );
        assert_eq!(
            read_text(&log, 1, 4, true).await,
            Some(("\u{e9}".to_string(), 2))
        );
        assert_eq!(split_at_end(b"ab\xff"), 0);
        assert_eq!(split_at_end(b"a\xe2\x82"), 2);
        assert_eq!(split_at_end(b"a\xe2\x82\xac"), 0);
    }

    /// Every line echoed stays under [`MAX_LINE`] once escaped, as JSON (what serde_json
    /// writes, then the C1 controls the log writer escapes) and as text (`\x01`), whatever the
    /// job printed; nothing is lost and no character is cut in two.
    #[test]
    fn echoed_lines_stay_short_once_escaped() {
        fn as_json(line: &[u8]) -> usize {
            let text = String::from_utf8_lossy(line);
            // serde_json leaves DEL and C1 controls raw; the log writer makes them `\u0085`.
            let del = text.chars().filter(|&c| c == '\x7f').count();
            let c1 = text
                .chars()
                .filter(|c| ('\u{80}'..='\u{9f}').contains(c))
                .count();
            serde_json::to_string(&text).unwrap().len() - 2 + 5 * del + 4 * c1
        }
        fn as_text(line: &[u8]) -> usize {
            let text = String::from_utf8_lossy(line);
            text.chars()
                .map(|c| match c {
                    '\0'..='\x1f' | '\x7f' => 4,
                    '\u{80}'..='\u{9f}' => 6,
                    c => c.len_utf8(),
                })
                .sum()
        }
        let forged = b"<0>c3-agent: job finished state=SUCCEEDED";
        let mut inputs: Vec<Vec<u8>> = [b'\x01', b'\xff', b'"', b'\x7f', b'a']
            .iter()
            .map(|&b| [vec![b; 3 * MAX_LINE], forged.to_vec()].concat())
            .collect();
        inputs.push(
            "\u{85}\u{e9}\u{20ac}\u{1f600}"
                .repeat(MAX_LINE)
                .into_bytes(),
        );
        for input in inputs {
            let mut lines = Lines::default();
            let mut echoed: Vec<Vec<u8>> = Vec::new();
            // Fed in odd-sized reads, as a pipe hands them over.
            for chunk in input.chunks(4093) {
                lines.feed(chunk, |l| echoed.push(l.to_vec()));
            }
            lines.finish(|l| echoed.push(l.to_vec()));
            assert!(echoed.len() > 1);
            for line in &echoed {
                assert!(as_json(line) <= MAX_LINE, "{} as JSON", as_json(line));
                assert!(as_text(line) <= MAX_LINE, "{} as text", as_text(line));
                if input.is_ascii() || input[0] != 0xff {
                    assert!(std::str::from_utf8(line).is_ok(), "a character was cut");
                }
            }
            assert_eq!(echoed.concat(), input);
        }
        // Plain text still fills a line.
        let mut lines = Lines::default();
        let mut echoed = Vec::new();
        lines.feed(&[b'a'; MAX_LINE + 1], |l| echoed.push(l.len()));
        lines.finish(|l| echoed.push(l.len()));
        assert_eq!(echoed, [MAX_LINE, 1]);
    }

    /// A line is charged for what it takes in the log, escaped: control bytes as much as
    /// plain text six times as long.
    #[test]
    fn an_echoed_line_costs_its_escaped_length() {
        assert_eq!(echo_cost(b"ok"), 1.0);
        assert_eq!(echo_cost(&[1; 2730]), echo_cost(&[b'a'; 6 * 2730]));
        assert_eq!(echo_cost(&[0xff; 5461]), echo_cost(&[b'a'; 3 * 5461]));
        assert_eq!(echo_cost(&[1; 2730]), 16.0);
    }

    /// A 413 halves the next read down to [`MIN_POST`] without passing anything over; at
    /// the floor, or on any other 4xx, the piece is passed over and the stream rests longer
    /// each time; a delivery ends the rests.
    #[test]
    fn a_refused_post_is_cut_down_then_passed_over() {
        let mut at = StreamPosts::default();
        let too_large = Posted::Rejected {
            status: 413,
            covered: 100,
        };
        while at.limit > MIN_POST {
            let before = at.limit;
            at.after(too_large, Stream::Stdout);
            assert_eq!((at.offset, at.limit), (0, before / 2));
            assert!(!at.resting());
        }
        at.after(too_large, Stream::Stdout);
        assert_eq!(at.offset, 100);
        let rests = |at: &mut StreamPosts| (0..100).take_while(|_| at.resting()).count();
        assert_eq!(rests(&mut at), 1);
        at.after(
            Posted::Rejected {
                status: 404,
                covered: 5,
            },
            Stream::Stdout,
        );
        assert_eq!((at.offset, rests(&mut at)), (105, 2));
        for _ in 0..10 {
            at.after(
                Posted::Rejected {
                    status: 404,
                    covered: 0,
                },
                Stream::Stdout,
            );
        }
        assert_eq!(rests(&mut at), 1 << MAX_REJECTED_BACKOFF);
        at.after(Posted::Sent(7), Stream::Stdout);
        assert_eq!(at.limit, 2 * MIN_POST, "grown back after a delivery");
        at.after(
            Posted::Rejected {
                status: 404,
                covered: 0,
            },
            Stream::Stdout,
        );
        assert_eq!((at.offset, rests(&mut at)), (112, 1));
    }

    fn undelivered(server_error: bool, retry_after: Option<Duration>) -> Posted {
        Posted::Undelivered {
            server_error,
            retry_after,
            covered: 10,
        }
    }

    /// A post not delivered (an outage) was sent again the very next round, its tries
    /// beginning at 200 ms again, for the whole outage: the stream rests 1, 2, 4 ... 32 rounds
    /// now, or as long as the control plane's `Retry-After` asked; the piece stays.
    #[test]
    fn an_undelivered_post_rests_the_stream() {
        let rests = |at: &mut StreamPosts| (0..1000).take_while(|_| at.resting()).count();
        let mut at = StreamPosts::default();
        let mut seen = Vec::new();
        for _ in 0..8 {
            at.after(undelivered(false, None), Stream::Stdout);
            seen.push(rests(&mut at));
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 32, 32]);
        assert_eq!(at.offset, 0, "sent again from the same offset");
        at.after(Posted::Sent(5), Stream::Stdout);
        at.after(
            undelivered(false, Some(Duration::from_secs(30))),
            Stream::Stdout,
        );
        assert_eq!(
            rests(&mut at),
            15,
            "the control plane's Retry-After, in rounds"
        );
        at.after(
            undelivered(false, Some(Duration::from_secs(86400))),
            Stream::Stdout,
        );
        assert_eq!(rests(&mut at), 150, "at most 5 min");
        at.after(Posted::Sent(5), Stream::Stdout);
        at.after(undelivered(false, None), Stream::Stdout);
        assert_eq!(rests(&mut at), 1, "a delivery ends the rests");
    }

    /// A piece the control plane itself fails on (a 500: a NUL PostgreSQL refuses) was
    /// posted ~4 times every 5 s for the whole job, and the stream's live output stopped
    /// there. After [`MAX_FAILED_ROUNDS`] such rounds in a row it is passed over.
    #[test]
    fn a_piece_the_control_plane_keeps_failing_on_is_passed_over() {
        let mut at = StreamPosts::default();
        for _ in 1..MAX_FAILED_ROUNDS {
            at.after(undelivered(true, None), Stream::Stdout);
            assert_eq!(at.offset, 0);
        }
        // An outage's answer between them starts the count again.
        at.after(undelivered(false, None), Stream::Stdout);
        for _ in 1..MAX_FAILED_ROUNDS {
            at.after(undelivered(true, None), Stream::Stdout);
        }
        assert_eq!(at.offset, 0);
        at.after(undelivered(true, None), Stream::Stdout);
        assert_eq!(at.offset, 10, "passed over");
    }

    /// What a live post met reaches the stream: the control plane's own 500, and a 503's
    /// `Retry-After`.
    #[tokio::test]
    async fn an_undelivered_post_says_what_it_met() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("stdout.log");
        std::fs::write(&log, "line\n").unwrap();
        async fn post_once(cp: ControlPlane, log: &PathBuf) -> Posted {
            let deadline = Instant::now() + Duration::from_millis(300);
            let at = StreamPosts::default();
            post_next(
                &cp,
                "v1/jobs/j/output",
                1,
                Stream::Stdout,
                log,
                &at,
                deadline,
                false,
            )
            .await
        }
        let post = |cp| post_once(cp, &log);
        let (url, _) = crate::report::tests::serve_recorded(Duration::ZERO, |_, _| {
            ("500 Internal Server Error", "")
        })
        .await;
        assert_eq!(
            post(crate::report::tests::control_plane(url)).await,
            undelivered(true, None).with_covered(5)
        );
        let (url, _) = crate::report::tests::serve_raw(
            vec!["HTTP/1.1 503 Service Unavailable\r\nRetry-After: 30\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"; 10],
            Duration::ZERO,
        )
        .await;
        assert_eq!(
            post(crate::report::tests::control_plane(url)).await,
            undelivered(false, Some(Duration::from_secs(30))).with_covered(5)
        );
    }

    impl Posted {
        fn with_covered(self, n: u64) -> Posted {
            match self {
                Posted::Undelivered {
                    server_error,
                    retry_after,
                    ..
                } => Posted::Undelivered {
                    server_error,
                    retry_after,
                    covered: n,
                },
                other => other,
            }
        }
    }
}
