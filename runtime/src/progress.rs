//! One progress line for live and final sync: files and bytes queued and done, shared by
//! whoever uploads (live sync, the final pass, publish), logged by one ticker per phase.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::display::human_bytes;

/// At least this often while uploads are pending (contract §9: every 10 s).
pub const EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Progress {
    files_queued: AtomicU64,
    files_done: AtomicU64,
    bytes_queued: AtomicU64,
    bytes_done: AtomicU64,
}

impl Progress {
    pub fn shared() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// A file of `bytes` is about to be uploaded.
    pub fn queue(&self, bytes: u64) {
        self.files_queued.fetch_add(1, Relaxed);
        self.bytes_queued.fetch_add(bytes, Relaxed);
    }

    /// An upload queued with `bytes` ended (stored, or not: it is no longer pending).
    pub fn finish(&self, bytes: u64) {
        self.files_done.fetch_add(1, Relaxed);
        self.bytes_done.fetch_add(bytes, Relaxed);
    }

    fn snapshot(&self) -> (u64, u64, u64, u64) {
        (
            self.files_done.load(Relaxed),
            self.files_queued.load(Relaxed),
            self.bytes_done.load(Relaxed),
            self.bytes_queued.load(Relaxed),
        )
    }
}

/// The unit's STATUS while live sync has nothing pending.
fn idle_status(files: u64, bytes: u64) -> String {
    format!(
        "running: {files} files synced ({}), nothing pending",
        human_bytes(bytes)
    )
}

/// Logs a progress line every [`EVERY`] until `stop`: in the `live` phase only while
/// uploads are pending, in the `final` phase always (the GPU may be waiting on it). With
/// `record`, the figures are also kept there for `c3-agent status`.
pub async fn report(
    progress: Arc<Progress>,
    phase: &'static str,
    record: Option<std::path::PathBuf>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    let mut last = (Instant::now(), progress.snapshot().2);
    let mut recorded = None;
    // The files synced when the idle STATUS was last said.
    let mut idle_said = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (files_done, files_queued, bytes_done, bytes_queued) = progress.snapshot();
        let now = (files_done, files_queued, bytes_done, bytes_queued);
        // Written only when it says something new: a job idle for days costs nothing. Not
        // fsync'd: it is there for `c3-agent status`, and a commit stalls the job's writes.
        if let Some(path) = record.as_ref().filter(|_| recorded != Some(now)) {
            recorded = Some(now);
            let body = c3_proto::ProgressRecord {
                phase: phase.into(),
                files_done,
                files_queued,
                bytes_done,
                bytes_queued,
                time: crate::display::now_rfc3339(),
            }
            .to_json();
            let path = path.clone();
            let _ =
                tokio::task::spawn_blocking(move || crate::statedir::write_replace(&path, &body))
                    .await;
        }
        let pending = files_queued.saturating_sub(files_done);
        let secs = last.0.elapsed().as_secs_f64().max(0.001);
        let rate = bytes_done.saturating_sub(last.1) as f64 / secs;
        last = (Instant::now(), bytes_done);
        if pending == 0 && phase == "live" {
            // `systemctl status` showed the last upload's "... left, ETA" for hours after it.
            if idle_said != Some(files_done) {
                idle_said = Some(files_done);
                crate::sdnotify::status(&idle_status(files_done, bytes_done));
            }
            continue;
        }
        idle_said = None;
        let left = bytes_queued.saturating_sub(bytes_done);
        let eta = (rate > 0.0).then(|| (left as f64 / rate).ceil() as u64);
        let text = format!(
            "{phase} sync: {files_done}/{files_queued} files, {} left, {}/s{}",
            human_bytes(left),
            human_bytes(rate as u64),
            eta.map(|s| format!(", ETA {s} s")).unwrap_or_default()
        );
        tracing::info!(
            phase,
            files_done,
            files_queued,
            bytes_done,
            bytes_left = left,
            bytes_per_s = rate.round() as u64,
            eta_s = eta,
            "{text}"
        );
        crate::sdnotify::status(&text);
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    /// Once live sync has nothing pending, `systemctl status` says so: the last upload's
    /// "... left, ETA" stayed for hours.
    #[tokio::test(start_paused = true)]
    async fn an_idle_live_sync_says_so_in_the_units_status() {
        use std::os::unix::net::UnixDatagram;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_nonblocking(true).unwrap();
        // Each test is its own process (nextest): the variable is this test's alone.
        std::env::set_var("NOTIFY_SOCKET", &path);
        let progress = Progress::shared();
        progress.queue(100);
        let stop = CancellationToken::new();
        let task = tokio::spawn(report(progress.clone(), "live", None, stop.clone()));
        tokio::time::sleep(EVERY + Duration::from_millis(10)).await;
        progress.finish(100);
        tokio::time::sleep(EVERY).await;
        stop.cancel();
        task.await.unwrap();
        let mut said = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = sock.recv(&mut buf) {
            said.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert!(
            said.first()
                .is_some_and(|s| s.contains("live sync: 0/1 files")),
            "{said:?}"
        );
        assert!(
            said.last().is_some_and(
                |s| s.contains("running: 1 files synced") && s.contains("nothing pending")
            ),
            "{said:?}"
        );
    }
}
