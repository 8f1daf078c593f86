//! What one attempt tells the control plane (contract §7): RUNNING at launch, the artifacts
//! registration, one terminal status, and the warnings an operator or user should see. Built
//! on [`Reporter`] (ordered delivery, outbox); `seq` is the run record's, passed in.

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use c3_proto::{ArtifactsRegistration, ArtifactsReply, JobState, StatusReport};

use crate::display::now_rfc3339;
use crate::outcome::Verdict;
use crate::report::{Delivery, Reporter};

/// Warnings sent with a status; more are counted, not listed.
const MAX_WARNINGS: usize = 50;

/// What the terminal status says about how the job ended.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub message: Option<String>,
    pub upload_errors: u64,
    pub result: serde_json::Value,
}

pub struct JobReporter {
    reporter: Reporter,
    attempt: u32,
    warnings: Vec<String>,
    /// The RUNNING report under way (its task, seq and body): delivered, or kept, before
    /// the terminal one.
    running: Option<(JoinHandle<Delivery>, u64, Vec<u8>)>,
}

impl JobReporter {
    pub fn new(reporter: Reporter, attempt: u32) -> Self {
        JobReporter {
            reporter,
            attempt,
            warnings: Vec::new(),
            running: None,
        }
    }

    /// A warning for the log and the terminal status; past `MAX_WARNINGS` only counted, so
    /// a job with a million symlinks costs neither a million log lines nor the memory.
    pub fn warn(&mut self, text: String) {
        if self.warnings.len() < MAX_WARNINGS {
            tracing::warn!("{text}");
            self.warnings.push(text);
        } else if self.warnings.len() == MAX_WARNINGS {
            tracing::warn!("more warnings follow; they are not logged one by one");
            self.warnings
                .push("more warnings; see the agent's log".into());
        }
    }

    /// RUNNING, sent in the background (the job must not wait for the control plane).
    pub fn running(&mut self, seq: u64, deadline: Instant) {
        let body = StatusReport {
            attempt: self.attempt,
            seq,
            state: JobState::Running,
            reason: None,
            retryable: false,
            exit_code: None,
            signal: None,
            message: None,
            upload_errors: 0,
            warnings: Vec::new(),
            result: serde_json::Value::Null,
            time: now_rfc3339(),
        }
        .to_json();
        let reporter = self.reporter.clone();
        let sent = body.clone();
        let task = tokio::spawn(
            async move { reporter.send("status", seq, sent, deadline).await }.in_current_span(),
        );
        self.running = Some((task, seq, body));
    }

    /// Waits for RUNNING until `stay`; past it, RUNNING goes to the outbox first.
    async fn settle_running(&mut self, stay: Instant) {
        if let Some((mut task, seq, body)) = self.running.take() {
            if tokio::time::timeout_at(stay, &mut task).await.is_err() {
                task.abort();
                self.reporter.keep_unsent("status", seq, &body);
            }
        }
    }

    /// Everything after the final sync, within `stay`: RUNNING settled, the artifacts
    /// registration (if a manifest was written), the terminal status.
    pub async fn finish(
        &mut self,
        seq: u64,
        registration: Option<ArtifactsRegistration>,
        verdict: &Verdict,
        ending: Ending,
        stay: Instant,
    ) {
        self.settle_running(stay).await;
        if let Some(registration) = registration {
            self.artifacts(seq, registration, stay).await;
        }
        self.terminal(seq, verdict, ending, stay).await;
    }

    /// The artifacts registration; over quota is a warning, never a failure.
    async fn artifacts(&mut self, order: u64, registration: ArtifactsRegistration, stay: Instant) {
        let delivered = self
            .reporter
            .send("artifacts", order, registration.to_json(), stay)
            .await;
        let Delivery::Delivered(body) = delivered else {
            return;
        };
        match ArtifactsReply::from_json(&body) {
            Ok(ArtifactsReply {
                storage_used_bytes: used,
                storage_quota_bytes: Some(quota),
            }) if used > quota => {
                self.warn(format!("storage usage {used} bytes is over the quota of {quota} bytes (soft limit: nothing was rejected)"));
            }
            Ok(reply) => {
                tracing::info!(storage_used_bytes = reply.storage_used_bytes, storage_quota_bytes = ?reply.storage_quota_bytes, "artifacts registered")
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "artifacts registration reply not understood")
            }
        }
    }

    /// The one terminal status, with every warning gathered so far.
    async fn terminal(&mut self, seq: u64, verdict: &Verdict, ending: Ending, stay: Instant) {
        let status = StatusReport {
            attempt: self.attempt,
            seq,
            state: verdict.state,
            reason: verdict.reason,
            retryable: verdict.retryable,
            exit_code: ending.exit_code,
            signal: ending.signal,
            message: ending.message,
            upload_errors: ending.upload_errors,
            warnings: self.warnings.clone(),
            result: ending.result,
            time: now_rfc3339(),
        };
        let delivery = self
            .reporter
            .send("status", seq, status.to_json(), stay)
            .await;
        if matches!(delivery, Delivery::Kept) {
            tracing::warn!("terminal status kept in the state dir; `c3-agent recover` or the next run delivers it");
        }
    }
}
