//! The job's stdout/stderr: each line into the agent's log (for `journalctl -f`), the
//! whole stream into the state dir, and (from that file) live to the control plane.
//!
//! The pumps never wait on the network: the forwarder reads the log files by offset,
//! so a slow control plane can never block the job on a full pipe.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use c3_proto::{OutputChunk, Stream};

use crate::report::ControlPlane;

/// Longest line echoed to the log as one event; longer ones are split.
const MAX_LINE: usize = 16 * 1024;
/// Most bytes of one stream sent in one live post.
const MAX_POST: usize = 1024 * 1024;
/// The contract's "at most every 2 s while output flows".
pub const POST_INTERVAL: Duration = Duration::from_secs(2);

/// Copies `reader` to `log_path` and echoes each line into the log. Returns bytes copied.
/// A log file that cannot be written (a full disk) never stops the draining: the job must
/// not block on a full pipe because the agent's disk is full. The error is returned at the end.
pub async fn pump(
    mut reader: impl AsyncRead + Unpin,
    stream: Stream,
    log_path: PathBuf,
) -> std::io::Result<u64> {
    let mut file = match tokio::fs::File::create(&log_path).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::error!(path = %log_path.display(), error = %crate::error_chain(&e), "cannot keep the job's output in the state dir; still echoing it");
            None
        }
    };
    let mut failed: Option<std::io::Error> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut line: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        if let Some(f) = file.as_mut() {
            // Flushing each read keeps the file current for the live forwarder and for `recover`.
            let written = async {
                f.write_all(&buf[..n]).await?;
                f.flush().await
            }
            .await;
            if let Err(e) = written {
                tracing::error!(path = %log_path.display(), error = %crate::error_chain(&e), "cannot write the job's output to the state dir; still echoing it");
                failed = Some(e);
                file = None;
            }
        }
        total += n as u64;
        for &b in &buf[..n] {
            if b == b'\n' {
                emit(stream, &line);
                line.clear();
            } else {
                line.push(b);
                if line.len() >= MAX_LINE {
                    emit(stream, &line);
                    line.clear();
                }
            }
        }
    }
    if !line.is_empty() {
        emit(stream, &line);
    }
    if let Some(f) = file {
        f.sync_all().await?;
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

fn emit(stream: Stream, line: &[u8]) {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    tracing::info!(target: "c3::job", stream = stream.as_str(), "{text}");
}

/// Posts new output every [`POST_INTERVAL`] until `done`, then sends the rest.
pub async fn forward_live(
    cp: ControlPlane,
    job_id: String,
    attempt: u32,
    logs: [(Stream, PathBuf); 2],
    done: CancellationToken,
) {
    let endpoint = format!("v1/jobs/{job_id}/output");
    let mut offsets = [0u64; 2];
    let mut tick = tokio::time::interval(POST_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = done.cancelled() => true,
        };
        // On the last round drain everything, a bounded number of posts per stream.
        let rounds = if last { 64 } else { 1 };
        for (i, (stream, path)) in logs.iter().enumerate() {
            for _ in 0..rounds {
                let Some((data, consumed)) = read_text(path, offsets[i]).await else {
                    break;
                };
                let chunk = OutputChunk {
                    attempt,
                    stream: *stream,
                    offset: offsets[i],
                    data,
                };
                // Live output is best effort: a short retry, never the outbox.
                match cp
                    .post(
                        &endpoint,
                        &chunk.to_json(),
                        tokio::time::Instant::now() + Duration::from_secs(5),
                    )
                    .await
                {
                    Ok(_) => offsets[i] += consumed,
                    Err(e) => {
                        tracing::debug!(error = %crate::error_chain(&e), "live output not delivered");
                        break;
                    }
                }
            }
        }
        if last {
            return;
        }
    }
}

/// Up to [`MAX_POST`] bytes of new text from `offset`, cut at a UTF-8 boundary.
async fn read_text(path: &PathBuf, offset: u64) -> Option<(String, u64)> {
    let mut file = tokio::fs::File::open(path).await.ok()?;
    file.seek(std::io::SeekFrom::Start(offset)).await.ok()?;
    let mut buf = Vec::with_capacity(MAX_POST.min(64 * 1024));
    (&mut file)
        .take(MAX_POST as u64)
        .read_to_end(&mut buf)
        .await
        .ok()?;
    if buf.is_empty() {
        return None;
    }
    match std::str::from_utf8(&buf) {
        Ok(s) => Some((s.to_string(), buf.len() as u64)),
        // A character split at the end of what was read: send the rest next time.
        Err(e) if e.error_len().is_none() && e.valid_up_to() > 0 => {
            let n = e.valid_up_to();
            Some((String::from_utf8_lossy(&buf[..n]).into_owned(), n as u64))
        }
        Err(_) => Some((String::from_utf8_lossy(&buf).into_owned(), buf.len() as u64)),
    }
}
