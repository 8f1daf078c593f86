//! What one attempt tells the control plane (contract §7): RUNNING at launch, FINALIZING once
//! the job's processes are gone, the artifacts registration, one terminal status, and the warnings an operator or user should see. Built
//! on [`Reporter`] (ordered delivery, outbox); `seq` is the run record's, passed in.

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use c3_proto::{ArtifactsRegistration, ArtifactsReply, JobState, StatusReport};

use crate::display::{cut, now_rfc3339};
use crate::outcome::Verdict;
use crate::report::{Ahead, Delivery, Reporter};

/// Warnings sent with a status; more are counted, not listed.
const MAX_WARNINGS: usize = 50;

/// The agent's own warnings on the job as a whole (its result file, the project's quota, its
/// processes): few, and never crowded out of the status by the job's file names.
const MAX_OWN_WARNINGS: usize = 16;

/// A warning is cut to this many bytes for the status: the job's file names go into them
/// (16 KiB each at most), and 50 such made a terminal status of megabytes.
const MAX_WARNING_BYTES: usize = 512;

/// A warning is cut to this many bytes for the log, which the status sends people to when
/// it had to cut or drop them: a path of 16 KiB, named twice, fits whole.
const MAX_LOGGED_WARNING_BYTES: usize = 40 * 1024;

/// The most the terminal status's body may be; past it, its warnings go, then its result.
/// A proxy's body limit (nginx's default is 1 MiB) answers a 413, a verdict on the report:
/// the status was dropped for good, the job left FINALIZING at the control plane.
const MAX_STATUS_BYTES: usize = 256 * 1024;

/// What the terminal status says about how the job ended.
#[derive(Debug, Clone, Default)]
pub struct Ending {
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub message: Option<String>,
    pub upload_errors: u64,
    pub result: serde_json::Value,
    pub facts: Option<c3_proto::JobFacts>,
}

pub struct JobReporter {
    reporter: Reporter,
    attempt: u32,
    warnings: Vec<String>,
    /// Warnings past [`MAX_WARNINGS`], counted.
    more_warnings: u64,
    /// [`JobReporter::warn_always`]'s.
    own_warnings: Vec<String>,
    /// RUNNING and FINALIZING under way (task, seq, body), in seq order: each is delivered,
    /// or kept, before the terminal status.
    background: Vec<(JoinHandle<Delivery>, u64, Vec<u8>)>,
    /// Fires when the newest background status is settled: the next one waits for it, so
    /// the control plane sees them in `seq` order.
    last_done: Option<oneshot::Receiver<()>>,
    /// Stops the newest background status's tries of the outbox once a later status's turn
    /// comes (that one's send delivers the outbox first): two flushers of one outbox would
    /// each post what it holds.
    superseded: Option<tokio_util::sync::CancellationToken>,
    /// Cancelled once the background statuses are out of time: their flushes of the outbox
    /// end after the POST under way, not inside it ([`JobReporter::settle_background`]).
    winding_down: tokio_util::sync::CancellationToken,
    /// The artifacts registration (order, body) from when its turn is awaited until it is
    /// kept ahead: [`JobReporter::keep_owed`] keeps it if a stop cuts the wait.
    owed_registration: Option<(u64, Vec<u8>)>,
    /// The terminal status from when the reports after the final sync begin until it is
    /// kept ahead of its sending: [`JobReporter::keep_owed`] keeps it if a stop cuts them.
    owed_terminal: Option<(u64, Verdict, Ending)>,
}

/// How long past its stay a background status's POST under way may end (a control plane
/// answers in milliseconds): short, the stay being what the stop deadline leaves.
const WIND_DOWN: std::time::Duration = std::time::Duration::from_millis(250);

impl JobReporter {
    pub fn new(reporter: Reporter, attempt: u32) -> Self {
        JobReporter {
            reporter,
            attempt,
            warnings: Vec::new(),
            more_warnings: 0,
            own_warnings: Vec::new(),
            background: Vec::new(),
            last_done: None,
            superseded: None,
            winding_down: Default::default(),
            owed_registration: None,
            owed_terminal: None,
        }
    }

    /// A warning for the log and the terminal status; past `MAX_WARNINGS` only counted, so
    /// a job with a million symlinks costs neither a million log lines nor the memory.
    pub fn warn(&mut self, text: String) {
        if self.warnings.len() < MAX_WARNINGS {
            let text = cut(text, MAX_LOGGED_WARNING_BYTES);
            tracing::warn!("{text}");
            self.warnings.push(cut(text, MAX_WARNING_BYTES));
        } else {
            if self.more_warnings == 0 {
                tracing::warn!("more warnings follow; they are counted, not logged one by one");
            }
            self.more_warnings += 1;
        }
    }

    /// The agent's own word on the job as a whole (its result file ignored, the project over
    /// its quota, processes that survive): always logged and in the terminal status. Through
    /// [`JobReporter::warn`], a job that left 50 symlinks first had them dropped unsaid.
    pub fn warn_always(&mut self, text: String) {
        let text = cut(text, MAX_LOGGED_WARNING_BYTES);
        tracing::warn!("{text}");
        if self.own_warnings.len() < MAX_OWN_WARNINGS {
            self.own_warnings.push(cut(text, MAX_WARNING_BYTES));
        } else {
            self.more_warnings += 1;
        }
    }

    /// The terminal status's warnings: the first ones, how many more, the agent's own.
    fn listed_warnings(&self) -> Vec<String> {
        let more = (self.more_warnings > 0).then(|| {
            format!(
                "{} more warnings, not listed (the agent's log has the first {MAX_WARNINGS})",
                self.more_warnings
            )
        });
        let all = self.warnings.iter().cloned().chain(more);
        all.chain(self.own_warnings.iter().cloned()).collect()
    }

    fn status(&self, seq: u64, state: JobState) -> StatusReport {
        StatusReport::plain(self.attempt, seq, state, now_rfc3339())
    }

    /// RUNNING, sent in the background (the job must not wait for the control plane).
    pub fn running(&mut self, seq: u64, deadline: Instant) {
        let body = self.status(seq, JobState::Running).to_json();
        self.in_background(seq, body, deadline);
    }

    /// FINALIZING with `gpu_released`: the job's processes are gone, so a scheduler may place
    /// the next job on its GPU while the final sync runs. In the background, right away.
    pub fn finalizing(&mut self, seq: u64, gpu_released: bool, deadline: Instant) {
        let mut status = self.status(seq, JobState::Finalizing);
        status.gpu_released = Some(gpu_released);
        self.in_background(seq, status.to_json(), deadline);
    }

    /// Sent until `deadline`, then kept in the outbox (where a crash cannot lose it) and
    /// delivered from there as soon as the control plane answers again, until the terminal
    /// status's turn. Kept and left there, a RUNNING that met a control plane down at launch
    /// reached it only with the next status, hours later, while the job's output streamed in.
    fn in_background(&mut self, seq: u64, body: Vec<u8>, deadline: Instant) {
        let reporter = self.reporter.clone();
        let sent = body.clone();
        let (done, done_rx) = oneshot::channel();
        let before = self.last_done.replace(done_rx);
        let superseded = tokio_util::sync::CancellationToken::new();
        if let Some(earlier) = self.superseded.replace(superseded.clone()) {
            earlier.cancel();
        }
        let winding_down = self.winding_down.clone();
        let task = tokio::spawn(
            async move {
                if let Some(before) = before {
                    // Err: the earlier one was aborted (and kept); this one may go now.
                    let _ = before.await;
                }
                let delivery = reporter
                    .send_until("status", seq, sent, deadline, Some(&winding_down))
                    .await;
                let _ = done.send(());
                match delivery {
                    Delivery::Kept => reporter.deliver_kept(&superseded).await,
                    other => other,
                }
            }
            .in_current_span(),
        );
        self.background.push((task, seq, body));
    }

    /// Waits for the background statuses until `stay`; past it, they go to the outbox
    /// first, in order. Each stays in `self.background` until it is settled, so that a stop
    /// that drops this wait leaves them for [`JobReporter::keep_owed`].
    async fn settle_background(&mut self, stay: Instant) {
        if let Some(newest) = self.superseded.take() {
            newest.cancel();
        }
        while let Some((task, _, _)) = self.background.first_mut() {
            if tokio::time::timeout_at(stay, &mut *task).await.is_err() {
                // Past `stay`: its flush of the outbox (an earlier attempt's kept
                // registration among what it holds) ends after the POST under way, if that
                // ends within a moment; aborted inside it, a registration the control plane
                // took stayed kept and was sent again, its bytes counted twice.
                self.winding_down.cancel();
                if tokio::time::timeout(WIND_DOWN, &mut *task).await.is_err() {
                    // This one and every later one go to the outbox, in order.
                    let rest = std::mem::take(&mut self.background);
                    self.keep_all(rest);
                    return;
                }
            }
            self.background.remove(0);
        }
    }

    /// Aborts the newest first (an aborted one releases the next, which must not get out
    /// ahead of it), then keeps each that was not delivered, oldest first.
    fn keep_all(&mut self, tasks: Vec<(JoinHandle<Delivery>, u64, Vec<u8>)>) {
        for (task, _, _) in tasks.iter().rev() {
            task.abort();
        }
        for (task, seq, body) in tasks {
            // Finished before the abort: delivered, rejected, or already kept by itself.
            let settled = task.is_finished()
                && futures::FutureExt::now_or_never(task)
                    .and_then(Result::ok)
                    .is_some();
            if !settled {
                self.reporter.keep_unsent("status", seq, &body);
            }
        }
    }

    /// Everything after the final sync, within `stay`, step one: RUNNING and FINALIZING
    /// settled, the artifacts registration (if a manifest was written) owed from now on.
    /// Then [`JobReporter::keep`].
    pub async fn settle(
        &mut self,
        seq: u64,
        registration: Option<ArtifactsRegistration>,
        stay: Instant,
    ) {
        self.owed_registration = registration.map(|r| (seq, r.to_json()));
        self.settle_background(stay).await;
    }

    /// Whether an artifacts registration is owed (and [`JobReporter::keep`] keeps one).
    pub fn owes_registration(&self) -> bool {
        self.owed_registration.is_some()
    }

    /// The artifacts registration kept ahead of its sending, so that a crash from here on
    /// cannot lose it. The caller records it as registered first: kept, and the agent killed
    /// before it said so, a `recover` delivered the kept one and then registered the same
    /// bytes again.
    pub fn keep(&mut self) -> Option<Ahead> {
        self.owed_registration
            .take()
            .map(|(seq, body)| self.reporter.keep_ahead("artifacts", seq, body))
    }

    /// The terminal status the reports after the final sync end with, owed from now on: a
    /// stop that cuts them before it is kept leaves it to [`JobReporter::keep_owed`].
    pub fn owe_terminal(&mut self, seq: u64, verdict: &Verdict, ending: Ending) {
        self.owed_terminal = Some((seq, *verdict, ending));
    }

    /// A stop cut the reports short (its deadline is near): what is still owed goes to the
    /// outbox, in order, for `recover` or the next run: RUNNING and FINALIZING not yet
    /// settled, the registration, the terminal status. True when a registration was kept
    /// here (the attempt's `new_bytes` then count as registered).
    pub fn keep_owed(&mut self) -> bool {
        let background = std::mem::take(&mut self.background);
        self.keep_all(background);
        let registered = self.owed_registration.take().is_some_and(|(seq, body)| {
            matches!(
                self.reporter.keep_unsent("artifacts", seq, &body),
                Delivery::Kept | Delivery::Local
            )
        });
        if let Some((seq, verdict, ending)) = self.owed_terminal.take() {
            let body = self.terminal_body(seq, &verdict, ending);
            self.reporter.keep_unsent("status", seq, &body);
        }
        registered
    }

    /// Step two: the registration delivered, then the terminal status. RUNNING and
    /// FINALIZING are settled first here too (a no-op after [`JobReporter::settle`]):
    /// the stop deadline's cut path comes here alone, and its terminal status went out while
    /// FINALIZING was still being retried, reached the control plane ahead of it, or left it
    /// in flight for the runtime's shutdown to drop, never kept.
    pub async fn finish(
        &mut self,
        seq: u64,
        registration: Option<Ahead>,
        verdict: &Verdict,
        ending: Ending,
        stay: Instant,
    ) {
        self.owe_terminal(seq, verdict, ending);
        self.settle_background(stay).await;
        if let Some(registration) = registration {
            self.artifacts(seq, registration, stay).await;
        }
        self.terminal(stay).await;
    }

    /// Step two for a registration the outbox could not keep ([`Ahead::NotKept`]): sent now,
    /// ahead of [`JobReporter::finish`] (which then gets none); true once the control plane
    /// has it, the only time such a one may be counted as registered.
    pub async fn register_unkept(
        &mut self,
        order: u64,
        registration: Ahead,
        stay: Instant,
    ) -> bool {
        self.settle_background(stay).await;
        self.artifacts(order, registration, stay).await
    }

    /// The artifacts registration; over quota is a warning, never a failure. True when it
    /// was delivered, or kept for a later delivery (a keep that failed once may succeed on
    /// the send's own try: the registration then stands, and a resync that took it for lost
    /// counted its bytes twice).
    async fn artifacts(&mut self, order: u64, registration: Ahead, stay: Instant) -> bool {
        let delivered = self
            .reporter
            .deliver_ahead(registration, "artifacts", order, stay)
            .await;
        let body = match delivered {
            Delivery::Delivered(body) => body,
            Delivery::Kept | Delivery::Local => return true,
            Delivery::Rejected => return false,
        };
        if let Some((used, quota)) = crate::report::over_quota(&body) {
            self.warn_always(format!("storage usage {used} bytes is over the quota of {quota} bytes (soft limit: nothing was rejected)"));
            return true;
        }
        match ArtifactsReply::from_json(&body) {
            Ok(reply) => {
                tracing::info!(storage_used_bytes = reply.storage_used_bytes, storage_quota_bytes = ?reply.storage_quota_bytes, "artifacts registered")
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "artifacts registration reply not understood")
            }
        }
        true
    }

    /// The one terminal status, with every warning gathered so far: kept in the outbox
    /// first, then delivered from there, so that a kill while it is in flight (a scheduler's
    /// SIGKILL after its grace) cannot lose it. A control plane that got it before the kill
    /// gets it again from the outbox with the same `seq`, which it drops as a duplicate
    /// (contract §7).
    async fn terminal(&mut self, stay: Instant) {
        let Some((seq, verdict, ending)) = self.owed_terminal.take() else {
            return;
        };
        let body = self.terminal_body(seq, &verdict, ending);
        let ahead = self.reporter.keep_ahead("status", seq, body);
        let delivery = self
            .reporter
            .deliver_ahead(ahead, "status", seq, stay)
            .await;
        if matches!(delivery, Delivery::Kept) {
            tracing::warn!("terminal status kept in the state dir; `c3-agent recover` or the next run delivers it");
        }
    }

    /// The terminal status's body, within [`MAX_STATUS_BYTES`] as far as dropping its
    /// warnings and result takes it.
    fn terminal_body(&self, seq: u64, verdict: &Verdict, ending: Ending) -> Vec<u8> {
        let facts = ending.facts.unwrap_or_default();
        // A NUL in the message or a warning (a store's or a gateway's error body quoted in a
        // dataset's failure, a file name) would have the status refused.
        let no_nul = crate::display::without_nul;
        let mut status = StatusReport {
            reason: verdict.reason,
            retryable: verdict.retryable,
            exit_code: ending.exit_code,
            signal: ending.signal,
            message: ending.message.map(no_nul),
            upload_errors: ending.upload_errors,
            warnings: self.listed_warnings().into_iter().map(no_nul).collect(),
            result: ending.result,
            peak_memory_bytes: facts.peak_memory_bytes,
            cpu_seconds: facts.cpu_seconds,
            ..self.status(seq, verdict.state)
        };
        let mut body = status.to_json();
        if body.len() > MAX_STATUS_BYTES {
            let dropped = status.warnings.len();
            status.warnings = vec![format!("{dropped} warnings dropped: the status was over {MAX_STATUS_BYTES} bytes; see the agent's log")];
            body = status.to_json();
        }
        if body.len() > MAX_STATUS_BYTES && !status.result.is_null() {
            status.result = serde_json::Value::Null;
            status.warnings.push(format!(
                "the result was dropped: the status was over {MAX_STATUS_BYTES} bytes"
            ));
            body = status.to_json();
        }
        if body.len() > MAX_STATUS_BYTES {
            tracing::warn!(
                bytes = body.len(),
                "the terminal status is large; a proxy may refuse it"
            );
        }
        body
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use super::*;
    use crate::report::tests::{control_plane, serve_recorded};
    use crate::statedir::StateDir;

    /// The stop deadline's cut path sent the terminal status (seq 3) while FINALIZING
    /// (seq 2), refused once with a 503, was still being retried: 3 reached the control plane
    /// ahead of 2, and 2 was left to a task that the agent's exit dropped.
    #[tokio::test]
    async fn the_terminal_status_waits_for_finalizing_on_every_path() {
        let refused = AtomicBool::new(false);
        let (url, requests) = serve_recorded(Duration::ZERO, move |_, body| {
            if body.contains(r#""seq":2"#) && !refused.swap(true, Ordering::SeqCst) {
                ("503 Service Unavailable", "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(control_plane(url)), state.clone(), "j", 1);
        let mut reports = JobReporter::new(reporter, 1);
        let stay = Instant::now() + Duration::from_secs(10);
        reports.finalizing(2, true, stay);
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Canceled, false, false);
        reports
            .finish(3, None, &verdict, Ending::default(), stay)
            .await;
        let seqs: Vec<u64> = requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| {
                serde_json::from_str::<serde_json::Value>(body).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, [2, 2, 3], "2 refused once, then 2, then 3");
        assert!(!state.outbox_dir("j").exists(), "nothing kept");
    }

    /// FINALIZING's flush of the outbox was posting an earlier attempt's kept registration
    /// when the stay ran out: aborted inside the POST, the registration the control plane
    /// took stayed kept and was posted again (its bytes counted twice). The POST under way
    /// ends, its entry is settled, and only then do the reports go on.
    #[tokio::test]
    async fn a_registration_posted_as_the_stay_runs_out_is_settled_not_sent_twice() {
        let (url, requests) =
            serve_recorded(Duration::from_millis(150), |_, _| ("200 OK", "{}")).await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let cp = control_plane(url);
        let earlier = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        let registration = br#"{"attempt":1,"manifest":"m","files":1,"bytes":9,"new_bytes":9}"#;
        assert!(matches!(
            earlier.keep_unsent("artifacts", 4, registration),
            Delivery::Kept
        ));
        let reporter = Reporter::new(Some(cp), state.clone(), "j", 2);
        let mut reports = JobReporter::new(reporter, 2);
        reports.finalizing(2, true, Instant::now() + Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Canceled, false, false);
        let stay = Instant::now() + Duration::from_millis(20);
        reports
            .finish(3, None, &verdict, Ending::default(), stay)
            .await;
        let posted = requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(line, _)| line.contains("/artifacts"))
            .count();
        assert_eq!(posted, 1, "the registration posted once");
        let kept: Vec<String> = std::fs::read_dir(state.outbox_dir("j"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !kept.iter().any(|name| name.contains("artifacts")),
            "{kept:?}"
        );
    }

    /// A job's file names (16 KiB each) in 50 warnings made a terminal status of megabytes;
    /// a proxy answered 413, a verdict, and the status was dropped for good.
    #[tokio::test]
    async fn a_terminal_status_fits_a_proxys_body_limit() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, body| {
            if body.len() > 1024 * 1024 {
                ("413 Payload Too Large", "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(control_plane(url)), state.clone(), "j", 1);
        let mut reports = JobReporter::new(reporter, 1);
        for _ in 0..MAX_WARNINGS {
            // As the final scan says it: a path too long to walk, named twice.
            let path = "d/".repeat(8000);
            reports.warn(format!(
                "{path}: not uploaded (path longer than 16 KiB; {path})"
            ));
        }
        reports.warn("one more".into());
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Canceled, false, false);
        let stay = Instant::now() + Duration::from_secs(10);
        reports
            .finish(3, None, &verdict, Ending::default(), stay)
            .await;
        let requests = requests.lock().unwrap();
        assert_eq!(requests.len(), 1);
        let body = &requests[0].1;
        assert!(body.len() <= MAX_STATUS_BYTES, "{} bytes", body.len());
        let status: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(status["state"], "CANCELED");
        let warnings = status["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), MAX_WARNINGS + 1);
        assert!(warnings
            .iter()
            .all(|w| w.as_str().unwrap().len() <= MAX_WARNING_BYTES));
        assert!(warnings[0].as_str().unwrap().ends_with('…'));
    }

    /// A warning is cut on a character's boundary.
    #[test]
    fn a_warning_is_cut_on_a_char_boundary() {
        assert_eq!(cut("short".into(), 512), "short");
        let cut_text = cut("é".repeat(600), 512);
        assert!(cut_text.len() <= 512);
        assert!(cut_text.ends_with("é…"));
    }

    /// Whatever the warnings, the status's body stays under the limit: they go, then the
    /// result, each with a note.
    #[tokio::test]
    async fn an_oversized_status_drops_its_warnings_then_its_result() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, _| ("200 OK", "{}")).await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(control_plane(url)), state.clone(), "j", 1);
        let mut reports = JobReporter::new(reporter, 1);
        // Control characters are escaped six bytes each: 512 of them serialize to 3 KiB.
        for _ in 0..MAX_WARNINGS {
            reports.warn("\u{1}".repeat(MAX_WARNING_BYTES));
        }
        let big = serde_json::Value::String("\u{1}".repeat(MAX_STATUS_BYTES / 6 + 1));
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Canceled, false, false);
        let stay = Instant::now() + Duration::from_secs(10);
        let ending = Ending {
            result: big,
            ..Ending::default()
        };
        reports.finish(3, None, &verdict, ending, stay).await;
        let body = requests.lock().unwrap()[0].1.clone();
        assert!(body.len() <= MAX_STATUS_BYTES, "{} bytes", body.len());
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(status["result"].is_null());
        let warnings = status["warnings"].as_array().unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0]
            .as_str()
            .unwrap()
            .starts_with("50 warnings dropped"));
        assert!(warnings[1]
            .as_str()
            .unwrap()
            .starts_with("the result was dropped"));
    }

    /// A control plane that answers `refusal` to any body holding a NUL (`\u0000`, which
    /// PostgreSQL's jsonb and text refuse) and 200 to the rest; a job's reporter sending to
    /// it; and the terminal status of a job whose result holds one, with warnings.
    async fn refusing_nul(
        refusal: &'static str,
    ) -> (
        tempfile::TempDir,
        StateDir,
        JobReporter,
        std::sync::Arc<std::sync::Mutex<Vec<crate::report::tests::Request>>>,
        Ending,
        crate::report::ControlPlane,
    ) {
        let (url, requests) = serve_recorded(Duration::ZERO, move |_, body| {
            if body.contains("\\u0000") {
                (refusal, "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let cp = control_plane(url);
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        let mut reports = JobReporter::new(reporter, 1);
        reports.warn("a warning".into());
        let ending = Ending {
            exit_code: Some(0),
            message: Some("m".repeat(4096)),
            result: serde_json::json!({"x": "\u{0}"}),
            ..Ending::default()
        };
        (dir, state, reports, requests, ending, cp)
    }

    /// A NUL in the message or a warning (a store's error body quoted in a dataset's
    /// failure) goes as U+FFFD: the control plane's storage refuses U+0000, and with nothing
    /// to drop the status had no fallback and was lost.
    #[tokio::test]
    async fn a_nul_in_the_message_or_a_warning_is_not_sent() {
        let (_dir, state, mut reports, requests, _, _) =
            refusing_nul("422 Unprocessable Entity").await;
        reports.warn("a gateway said x\0y".into());
        let ending = Ending {
            exit_code: Some(1),
            message: Some("dataset: 403: x\0y".into()),
            ..Ending::default()
        };
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Exited(1), false, false);
        let stay = Instant::now() + Duration::from_secs(10);
        reports.finish(3, None, &verdict, ending, stay).await;
        let statuses = statuses(&requests);
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        assert_eq!(statuses[0]["message"], "dataset: 403: x\u{fffd}y");
        assert!(!state.outbox_dir("j").exists(), "nothing kept");
    }

    /// Sets the kept entries' mtime an hour and a minute back.
    fn kept_an_hour_ago(outbox: &std::path::Path) {
        let past = std::time::SystemTime::now() - Duration::from_secs(3660);
        for entry in std::fs::read_dir(outbox).unwrap().flatten() {
            if entry.path().extension().is_some_and(|x| x == "json") {
                std::fs::File::options()
                    .write(true)
                    .open(entry.path())
                    .unwrap()
                    .set_modified(past)
                    .unwrap();
            }
        }
    }

    /// The terminal statuses a recording server got, parsed.
    fn statuses(
        requests: &std::sync::Mutex<Vec<crate::report::tests::Request>>,
    ) -> Vec<serde_json::Value> {
        requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, body)| serde_json::from_str(body).unwrap())
            .collect()
    }

    /// What a status sent again without its extras says: the same seq and state, no result,
    /// one note for the warnings, the message cut.
    fn assert_fallback(status: &serde_json::Value, http: u16) {
        assert_eq!(status["seq"], 3);
        assert_eq!(status["state"], "SUCCEEDED");
        assert!(status["result"].is_null());
        assert_eq!(
            status["warnings"],
            serde_json::json!([format!(
                "status refused with HTTP {http}; result and warnings dropped; see the agent log"
            )])
        );
        assert!(status["message"].as_str().unwrap().len() <= 512);
    }

    /// A terminal status the control plane refused (a 422: a NUL in the job's result) was
    /// dropped, and the job stayed FINALIZING at the control plane for good. It goes again
    /// at once, with the same seq, without the result and warnings.
    #[tokio::test]
    async fn a_refused_terminal_status_goes_again_without_its_result() {
        let (_dir, state, mut reports, requests, ending, _) =
            refusing_nul("422 Unprocessable Entity").await;
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Exited(0), false, false);
        let stay = Instant::now() + Duration::from_secs(10);
        reports.finish(3, None, &verdict, ending, stay).await;
        let statuses = statuses(&requests);
        assert_eq!(statuses.len(), 2, "{statuses:?}");
        assert_eq!(statuses[0]["result"]["x"], "\u{0}");
        assert_fallback(&statuses[1], 422);
        assert!(!state.outbox_dir("j").exists(), "nothing kept");
    }

    /// A terminal status the control plane fails on (a 500: a NUL in the job's result) was
    /// kept, failed every flush, and went aside after a week, the job FINALIZING all along.
    /// After a few failed flushes it goes without the result and warnings.
    #[tokio::test]
    async fn a_terminal_status_failed_on_goes_again_without_its_result() {
        let (_dir, state, mut reports, requests, ending, cp) =
            refusing_nul("500 Internal Server Error").await;
        let verdict = crate::outcome::decide(&crate::outcome::JobEnd::Exited(0), false, false);
        let stay = Instant::now() + Duration::from_millis(700);
        reports.finish(3, None, &verdict, ending, stay).await;
        let outbox = state.outbox_dir("j");
        assert!(outbox.exists(), "kept");
        // Three flushes within the hour leave it whole: an outage fails them all too.
        for _ in 0..3 {
            let deadline = Instant::now() + Duration::from_millis(700);
            crate::report::flush_job_outbox(&cp, &state, "j", deadline).await;
        }
        assert!(outbox.exists(), "stripped within the hour");
        assert!(statuses(&requests)
            .iter()
            .all(|s| s["result"]["x"] == "\u{0}"));
        kept_an_hour_ago(&outbox);
        let _ = std::fs::remove_file(
            std::fs::read_dir(&outbox)
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "tries"))
                .expect("its failed flushes counted"),
        );
        let mut flushes = 0;
        while outbox.exists() {
            flushes += 1;
            assert!(flushes <= 3, "still kept after 3 flushes");
            let deadline = Instant::now() + Duration::from_millis(700);
            crate::report::flush_job_outbox(&cp, &state, "j", deadline).await;
        }
        assert_eq!(
            flushes, 3,
            "not on the first failed flush: a bad deploy fails them all"
        );
        let statuses = statuses(&requests);
        assert!(statuses[..statuses.len() - 1]
            .iter()
            .all(|s| s["result"]["x"] == "\u{0}"));
        assert_fallback(statuses.last().unwrap(), 500);
    }

    /// Records the messages of the events logged under it.
    #[derive(Default)]
    struct Messages(std::sync::Mutex<Vec<String>>);

    impl tracing::Subscriber for Messages {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Message<'a>(&'a mut String);
            impl tracing::field::Visit for Message<'_> {
                fn record_debug(&mut self, field: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        *self.0 = format!("{v:?}");
                    }
                }
            }
            let mut text = String::new();
            event.record(&mut Message(&mut text));
            self.0.lock().unwrap().push(text);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// A warning was cut to the status's 512 bytes before it was logged, while a status
    /// over its size limit says "see the agent's log": the log holds it whole.
    #[test]
    fn a_warning_is_logged_whole_and_cut_for_the_status() {
        let dir = tempfile::tempdir().unwrap();
        let reporter = Reporter::new(None, StateDir::new(dir.path()), "j", 1);
        let mut reports = JobReporter::new(reporter, 1);
        let long = format!("{}: not uploaded", "d/".repeat(1024));
        let messages = std::sync::Arc::new(Messages::default());
        tracing::subscriber::with_default(messages.clone(), || reports.warn(long.clone()));
        assert_eq!(*messages.0.lock().unwrap(), [long]);
        assert_eq!(reports.warnings.len(), 1);
        assert!(reports.warnings[0].len() <= MAX_WARNING_BYTES);
    }
}
