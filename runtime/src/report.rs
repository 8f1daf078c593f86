//! Reports to the control plane (contract §7), with the outbox that keeps what
//! could not be delivered for a later `run` or `recover`.
//!
//! Retry policy: one `backon` exponential backoff with jitter per request; only connection
//! errors, 408, 429 and 5xx retry. Every call takes a *deadline*, not a duration: after the
//! job's final sync the agent computes one deadline (`give_up_secs` from then) for all it still
//! has to say, so no sum of per-request timeouts can hold the GPU longer (contract §7).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use c3_proto::OutboxEntry;

use crate::statedir::{write_atomic, StateDir};

#[derive(Clone)]
pub struct ControlPlaneConfig {
    pub url: url::Url,
    /// Bearer token (read from `token_file`; never in argv or the job's env).
    pub token: Option<crate::display::Secret>,
    /// How long one report is retried before it goes to the outbox.
    pub give_up: Duration,
    /// Reply bodies are read up to this many bytes; the rest is never buffered.
    pub max_reply_bytes: usize,
}

/// By hand: the URL as shown (a `user:pass@` in it is a credential too) and the token
/// redacted, so that no `Debug` print of the config (a `?ctx`, a panic message) leaks either.
impl std::fmt::Debug for ControlPlaneConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlaneConfig")
            .field("url", &crate::display::shown_url(self.url.as_str()))
            .field("token", &self.token)
            .field("give_up", &self.give_up)
            .field("max_reply_bytes", &self.max_reply_bytes)
            .finish()
    }
}

/// The default for [`ControlPlaneConfig::max_reply_bytes`].
pub const DEFAULT_MAX_REPLY_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("control plane rejected {endpoint} with HTTP {status}: {body}")]
    Rejected {
        endpoint: String,
        status: u16,
        body: String,
    },
    #[error("control plane answered {endpoint} with HTTP {status}")]
    Unavailable {
        endpoint: String,
        status: u16,
        /// The wait its `Retry-After` asks for (a 429 or 503), uncapped.
        retry_after: Option<Duration>,
    },
    #[error("no answer from {endpoint} before the deadline (give_up_secs)")]
    Deadline { endpoint: String },
    #[error("request to {endpoint} failed")]
    Transport {
        endpoint: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot keep the report for later delivery")]
    Outbox(#[source] crate::statedir::StateError),
    /// The delivery was stopped before this try began (a later status of the job took
    /// over the outbox): no request went.
    #[error("delivery to {endpoint} stopped")]
    Stopped { endpoint: String },
}

impl ReportError {
    pub fn is_retryable(&self) -> bool {
        match self {
            ReportError::Unavailable { .. }
            | ReportError::Transport { .. }
            | ReportError::Deadline { .. } => true,
            ReportError::Rejected { .. } | ReportError::Outbox(_) | ReportError::Stopped { .. } => {
                false
            }
        }
    }

    /// The control plane itself answered with a server error (500, 501, 505 and up): the
    /// report reached it, and it failed on it. Not a proxy's or load balancer's 502, 503
    /// (maintenance) or 504, not a time-out or a connection error: those say nothing of the
    /// report, and an outage answers them to every one.
    pub fn is_server_error(&self) -> bool {
        matches!(
            self,
            ReportError::Unavailable {
                status: 500 | 501 | 505..=599,
                ..
            }
        )
    }

    /// The answer counts a failed flush of a kept report ([`failed_again`]): the control
    /// plane's own server error. Not a gateway's 502 or 504 (a load balancer answers them to
    /// every report while the control plane is down), a 503, a time-out or a refused
    /// connection: an outage behind a proxy would count, and move reports aside. A redirect
    /// counts too (301, 308: an ingress's rule for this endpoint; 302, 303, 307: an ALB's or
    /// Traefik's "redirect to HTTPS", which say no less of it): never followed and never
    /// counted, it held the report, and every later one of its job, for ever.
    fn fails_a_flush(&self) -> bool {
        self.is_server_error()
            || matches!(
                self,
                ReportError::Unavailable {
                    status: 301..=303 | 307 | 308,
                    ..
                }
            )
    }

    /// The try may have reached the control plane with its answer lost on the way back: the
    /// control plane may still be working on it (a time-out, a connection broken after
    /// it was made, a gateway's 502 or 504).
    fn may_be_in_flight(&self) -> bool {
        match self {
            ReportError::Deadline { .. } => true,
            ReportError::Transport { source, .. } => !source.is_connect(),
            ReportError::Unavailable { status, .. } => matches!(status, 502 | 504),
            ReportError::Rejected { .. } | ReportError::Outbox(_) | ReportError::Stopped { .. } => {
                false
            }
        }
    }

    /// The control plane refused the agent's credentials (401), not the report: a token
    /// that ran out or was rotated mid-job. Not retried now, but kept, so that `recover` (or
    /// the next run) delivers it once the node's credentials are right again; dropped, a
    /// job's terminal status was lost for good. A 403 (this token may not report on this
    /// job) is a verdict on the report: kept, it would hold the job's local data forever,
    /// since retention waits for an empty outbox.
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            ReportError::Rejected {
                status: 401 | 407,
                ..
            }
        )
    }
}

/// An HTTP client for one control plane; cheap to clone.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    http: reqwest::Client,
    config: Arc<ControlPlaneConfig>,
    /// When the control plane itself last answered a request (a 2xx): proof it is up, so
    /// that a gateway's 502 or 504 to one report is about that report.
    /// When each kind of endpoint (`status`, `artifacts`, `output`: the path's last segment)
    /// last answered a 2xx: behind one gateway they may be services of their own, and live
    /// output answered while the status service was down proved nothing of a status's 502.
    heard: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
}

/// The `Idempotency-Key` of a POST: the same for every sending of one report (a retry, a
/// kept one flushed again after its answer was lost, a run and a later `recover`), another
/// for any other. A registration sent again was counted twice (its `new_bytes` against the
/// quota) by a control plane with no way to tell it from a new one.
/// Taken over the body's canonical form (its keys sorted, as the outbox writes it back): a
/// report posted first from its struct, then kept and sent again, had two keys.
pub fn idempotency_key(endpoint: &str, body: &[u8]) -> String {
    use sha2::Digest;
    let canonical = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok());
    let mut h = sha2::Sha256::new();
    h.update(endpoint.as_bytes());
    h.update(b"\n");
    h.update(canonical.as_deref().unwrap_or(body));
    hex::encode(h.finalize())
}

/// How long before a report's first try an answer of the control plane's still proves it up.
const HEARD_WINDOW: Duration = Duration::from_secs(60);

impl ControlPlane {
    /// Its URL as logs show it ([`crate::display::shown_url`]).
    pub fn shown_url(&self) -> String {
        crate::display::shown_url(self.config.url.as_str())
    }

    pub fn new(mut config: ControlPlaneConfig) -> Self {
        // `Url::join` replaces the last segment unless the base ends in '/'.
        if !config.url.path().ends_with('/') {
            let path = format!("{}/", config.url.path());
            config.url.set_path(&path);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(ONE_REQUEST)
            // Contract §7: a POST is never redirected (the body and token would follow it).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("c3-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a plain reqwest client always builds");
        ControlPlane {
            http,
            config: Arc::new(config),
            heard: Default::default(),
        }
    }

    fn note_heard(&self, endpoint: &str) {
        let now = Instant::now();
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        let at = heard
            .entry(endpoint_kind(endpoint).to_string())
            .or_insert(now);
        *at = (*at).max(now);
    }

    /// Whether the control plane's endpoint of `endpoint`'s kind answered a request at or
    /// after `since`.
    fn heard_since(&self, endpoint: &str, since: Instant) -> bool {
        self.heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(endpoint_kind(endpoint))
            .is_some_and(|at| *at >= since)
    }

    pub fn give_up(&self) -> Duration {
        self.config.give_up
    }

    async fn post_once(
        &self,
        endpoint: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Bytes, ReportError> {
        let url = self
            .config
            .url
            .join(endpoint)
            .expect("endpoints are relative paths");
        let mut req = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(token) = &self.config.token {
            req = req.bearer_auth(token.expose());
        }
        req = req.header("Idempotency-Key", idempotency_key(endpoint, body));
        // The endpoint names the request; reqwest's text would add the whole URL, a
        // `user:pass@` in it included.
        let transport = |source: reqwest::Error| ReportError::Transport {
            endpoint: endpoint.to_string(),
            source: source.without_url(),
        };
        let mut resp = match tokio::time::timeout_at(deadline, req.send()).await {
            Ok(sent) => sent.map_err(transport)?,
            Err(_) => {
                return Err(ReportError::Deadline {
                    endpoint: endpoint.to_string(),
                })
            }
        };
        let status = resp.status().as_u16();
        let retry_after = crate::httpcap::retry_after(status, resp.headers());
        let cap = if (200..300).contains(&status) {
            self.config.max_reply_bytes
        } else {
            300
        };
        // A reply is untrusted: read at most `cap` bytes of it, whatever its length says.
        let mut body = bytes::BytesMut::new();
        let read = async {
            while let Some(chunk) = resp.chunk().await? {
                let room = cap.saturating_sub(body.len());
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                // An error page (a gateway's HTML 502) is cut to its first lines quietly: a
                // warning for each, every few seconds through an outage, named a limit that
                // is not the configured one.
                if chunk.len() > room {
                    if (200..300).contains(&status) {
                        tracing::warn!(
                            endpoint,
                            max_reply_bytes = cap,
                            "control plane reply is over the size limit; the rest is ignored"
                        );
                    }
                    break;
                }
            }
            Ok::<(), reqwest::Error>(())
        };
        // The status line is the answer: a 2xx whose body then broke off or stalled was
        // taken as not delivered, and the same report went again until the deadline (a
        // registration counted twice, a terminal status never sent behind it).
        let read =
            tokio::time::timeout_at(deadline.min(Instant::now() + REPLY_BODY_READ), read).await;
        if (200..300).contains(&status) {
            match read {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let e = e.without_url();
                    tracing::warn!(endpoint, status, bytes = body.len(), error = %crate::error_chain(&e), "control plane accepted a report, but its reply broke off; taken as it came");
                }
                Err(_) => {
                    tracing::warn!(
                        endpoint,
                        status,
                        bytes = body.len(),
                        "control plane accepted a report, but its reply stalled; taken as it came"
                    );
                }
            }
        }
        let bytes = body.freeze();
        // A 2xx only: a 404 or 413 may be a gateway's own (an ingress's default backend).
        if (200..300).contains(&status) {
            self.note_heard(endpoint);
        }
        match status {
            200..=299 => Ok(bytes),
            // Only the control plane's own 4xx is a verdict on the report (a 401 or 407 on
            // the node's credentials, which keep it). Anything else is not: a redirect is not
            // followed (the body and token would go with it) but a proxy or load balancer in
            // maintenance says it; a 1xx or a code past 599 is a middlebox's.
            400..=499 if !matches!(status, 408 | 429) => Err(ReportError::Rejected {
                endpoint: endpoint.into(),
                status,
                // Logged: a gateway that echoes the request would quote the node's token.
                body: crate::httpcap::without_credentials(&String::from_utf8_lossy(
                    &bytes[..bytes.len().min(300)],
                )),
            }),
            _ => Err(ReportError::Unavailable {
                endpoint: endpoint.into(),
                status,
                retry_after,
            }),
        }
    }

    /// The deadline `give_up_secs` from now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.config.give_up
    }

    /// POSTs with backoff until delivered, rejected, or `deadline`; no try and no wait
    /// between tries runs past it (a control plane that accepts and never answers included).
    pub async fn post(
        &self,
        endpoint: &str,
        body: &[u8],
        deadline: Instant,
    ) -> Result<Bytes, ReportError> {
        self.post_tracked(endpoint, body, deadline, None).await.0
    }

    /// [`ControlPlane::post`], telling also whether a try of it may still be in flight
    /// ([`ReportError::may_be_in_flight`]): only a report none of whose tries is may be
    /// overtaken by a later one; and the HTTP status of the last try answered with a failure
    /// that counts a failed flush ([`ReportError::fails_a_flush`]), whatever the last try
    /// met (one cut by the deadline under load lost the answer that came before it).
    /// Once `stop` is cancelled no new try begins; the one under way ends as it would (its
    /// answer is what says whether the report went: dropped, it may have been applied
    /// and was sent again).
    pub(crate) async fn post_tracked(
        &self,
        endpoint: &str,
        body: &[u8],
        deadline: Instant,
        stop: Option<&CancellationToken>,
    ) -> (Result<Bytes, ReportError>, bool, Option<u16>) {
        let stopped = || stop.is_some_and(CancellationToken::is_cancelled);
        let began = Instant::now();
        let in_flight = std::sync::atomic::AtomicBool::new(false);
        // 0: no such answer.
        let answered = std::sync::atomic::AtomicU16::new(0);
        let once = || async {
            if stopped() {
                return Err(ReportError::Stopped {
                    endpoint: endpoint.to_string(),
                });
            }
            let tried = self.post_once(endpoint, body, deadline).await;
            if tried.as_ref().is_err_and(ReportError::may_be_in_flight) {
                in_flight.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            if let Err(e @ ReportError::Unavailable { status, .. }) = &tried {
                // A gateway's 502 or 504 while the control plane answers other requests
                // (behind a proxy, a backend that crashes on this one body): about this
                // report, so it counts. Never counted, such an entry stayed for ever, its
                // job FINALIZING at the control plane and its data held on the node.
                let up = matches!(status, 502 | 504)
                    && self.heard_since(endpoint, began.checked_sub(HEARD_WINDOW).unwrap_or(began));
                // A redirect counts a failed flush (`failed_again`) but is no answer about
                // the body: the control plane never saw it, so its result stays.
                if e.is_server_error() || up {
                    answered.store(*status, std::sync::atomic::Ordering::Relaxed);
                }
            }
            tried
        };
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .with_max_times(usize::MAX);
        let posted = once
            .retry(policy)
            // A throttled control plane asked for a wait: tries inside it are refused too,
            // and add to its load. Within the deadline, and at most `MAX_RETRY_AFTER`.
            .adjust(move |e: &ReportError, wait: Option<Duration>| {
                let left = deadline.saturating_duration_since(Instant::now());
                let wait = match e {
                    ReportError::Unavailable {
                        retry_after: Some(asked),
                        ..
                    } => wait.map(|wait| wait.max((*asked).min(MAX_RETRY_AFTER).min(left))),
                    _ => wait,
                };
                // A wait that leaves no time for a try ends the tries with the last answer:
                // a try begun at the deadline is cut at once, its request maybe sent, and
                // the control plane's own answer (a 500) was lost for a time-out.
                wait.filter(|wait| *wait + LAST_TRY < left)
            })
            .sleep({
                let stop = stop.cloned();
                move |wait: Duration| {
                    let stop = stop.clone();
                    async move {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let nap = tokio::time::sleep(wait.min(left));
                        // Woken by a stop, the next try ends at once (`Stopped`).
                        match stop {
                            Some(stop) => tokio::select! {
                                () = nap => {}
                                () = stop.cancelled() => {}
                            },
                            None => nap.await,
                        }
                    }
                }
            })
            .when(|e: &ReportError| e.is_retryable() && Instant::now() < deadline && !stopped())
            .notify(|e, wait| tracing::debug!(error = %crate::error_chain(e), retry_in_ms = wait.as_millis() as u64, "control plane request failed; retrying"))
            .await;
        let answered = Some(answered.into_inner()).filter(|&status| status != 0);
        (posted, in_flight.into_inner(), answered)
    }
}

/// What happened to one report.
#[derive(Debug)]
pub enum Delivery {
    /// Delivered; the reply body.
    Delivered(Bytes),
    /// Kept in the outbox for a later `run`/`recover`.
    Kept,
    /// The control plane refused it (4xx); logged, not retried.
    Rejected,
    /// No control plane: written to the attempt's `reports.jsonl`.
    Local,
}

/// The longest one control-plane request may take.
const ONE_REQUEST: Duration = Duration::from_secs(30);

/// The least time a retry is begun with: one with less would be cut by the deadline.
const LAST_TRY: Duration = Duration::from_millis(100);

/// How long a reply's body is waited for once its status line came.
const REPLY_BODY_READ: Duration = Duration::from_secs(5);

/// The longest a control plane's `Retry-After` holds the next try back: one asking for an
/// hour would otherwise keep a terminal status until the deadline.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The least time one job's outbox gets in a flush of all of them.
const SHARE_FLOOR: Duration = Duration::from_secs(5);

/// How often a job's kept background status is tried again while the job runs.
const KEPT_RETRY_EVERY: Duration = Duration::from_secs(5);

/// A report kept ahead of its sending (see [`Reporter::keep_ahead`]).
#[derive(Debug)]
pub enum Ahead {
    /// No control plane: recorded in the attempt's `reports.jsonl`.
    Local,
    Kept(PathBuf),
    /// The outbox could not be written (logged): sent the ordinary way.
    NotKept(Vec<u8>),
}

/// Sends one job's reports, in order, never losing one.
#[derive(Debug, Clone)]
pub struct Reporter {
    control_plane: Option<ControlPlane>,
    state: StateDir,
    job_id: String,
    attempt: u32,
}

impl Reporter {
    pub fn new(
        control_plane: Option<ControlPlane>,
        state: StateDir,
        job_id: &str,
        attempt: u32,
    ) -> Self {
        Reporter {
            control_plane,
            state,
            job_id: job_id.to_string(),
            attempt,
        }
    }

    /// Sends `body` to `v1/jobs/<job>/<kind>` until `deadline`, then keeps it in the outbox.
    /// `order` keeps outbox entries in sending order.
    pub async fn send(&self, kind: &str, order: u64, body: Vec<u8>, deadline: Instant) -> Delivery {
        self.send_until(kind, order, body, deadline, None).await
    }

    /// [`Reporter::send`]; once `stop` is cancelled, the flush of the earlier reports before
    /// it ends after the POST under way, and this one is kept.
    pub async fn send_until(
        &self,
        kind: &str,
        order: u64,
        mut body: Vec<u8>,
        deadline: Instant,
        stop: Option<&CancellationToken>,
    ) -> Delivery {
        let endpoint = endpoint_of(&self.job_id, kind);
        let Some(cp) = &self.control_plane else {
            self.append_local(&endpoint, &body);
            return Delivery::Local;
        };
        // Earlier undelivered reports of this job go first, or the control plane would see
        // them out of order; a status supersedes the attempt's earlier RUNNING or FINALIZING.
        let later = (kind == "status").then_some((self.attempt, order));
        let flushed =
            flush_outbox_for(cp, &self.state, &self.job_id, deadline, None, later, stop).await;
        if !flushed.done || flushed.held.contains(&Some(self.attempt)) {
            return self.keep(kind, order, &endpoint, &body);
        }
        // The outbox stays claimed (`flushed.claim`) until this report is settled, as in a
        // flush: another flusher would post what this one passed over, and after it.
        let mut posted = cp.post(&endpoint, &body, deadline).await;
        // Answered (delivered or refused), it settles the kept statuses it supersedes:
        // left, they went later, after it.
        if posted
            .as_ref()
            .map_or_else(|e| !e.is_retryable() && !e.is_auth(), |_| true)
        {
            for path in &flushed.superseded {
                remove_entry(path);
            }
        }
        // A terminal status the control plane refuses may be refusing the job's result or
        // warnings (a NUL in the result, which PostgreSQL refuses; a schema it checks):
        // dropped, it left the job FINALIZING for good. At once, with the same seq, without
        // them; kept as it now goes, should that one meet an outage.
        let fallback = match &posted {
            Err(e @ ReportError::Rejected { status, .. }) if !e.is_auth() => {
                status_fallback(&body, *status).inspect(|_| {
                    tracing::error!(endpoint = %endpoint, error = %crate::error_chain(e), "control plane refused the terminal status; sending it again without its result and warnings");
                })
            }
            _ => None,
        };
        if let Some(fallback) = fallback {
            body = fallback;
            posted = cp.post(&endpoint, &body, deadline).await;
        }
        let delivery = match posted {
            Ok(reply) => Delivery::Delivered(reply),
            Err(e) if e.is_retryable() => {
                tracing::warn!(endpoint = %endpoint, error = %crate::error_chain(&e), give_up_secs = cp.give_up().as_secs(), "control plane unreachable; keeping the report for later delivery");
                self.keep(kind, order, &endpoint, &body)
            }
            Err(e) if e.is_auth() => {
                tracing::error!(endpoint = %endpoint, error = %crate::error_chain(&e), "control plane refused the agent's credentials; keeping the report for `c3-agent recover` once they are fixed");
                self.keep(kind, order, &endpoint, &body)
            }
            Err(e) => {
                tracing::error!(endpoint = %endpoint, error = %crate::error_chain(&e), "control plane rejected a report; not retried");
                Delivery::Rejected
            }
        };
        if let Some(claim) = flushed.claim {
            // Empty now but for what was kept, as a flush leaves it.
            claim.release_and_remove(&self.state.outbox_dir(&self.job_id));
        }
        delivery
    }

    /// For a report that a crash must not lose while it is under way (the artifacts
    /// registration: once it is kept, the attempt's `new_bytes` is recorded as registered),
    /// step one: kept in the outbox (or, with no control plane, recorded locally).
    pub fn keep_ahead(&self, kind: &str, order: u64, body: Vec<u8>) -> Ahead {
        let endpoint = endpoint_of(&self.job_id, kind);
        if self.control_plane.is_none() {
            self.append_local(&endpoint, &body);
            return Ahead::Local;
        }
        match self.keep_at(kind, order, &endpoint, &body) {
            Some(path) => Ahead::Kept(path),
            None => Ahead::NotKept(body),
        }
    }

    /// Step two of [`Reporter::keep_ahead`]: delivered from the outbox, after the entries
    /// before it, and removed once delivered or rejected; else it stays kept.
    pub async fn deliver_ahead(
        &self,
        ahead: Ahead,
        kind: &str,
        order: u64,
        deadline: Instant,
    ) -> Delivery {
        let mine = match ahead {
            Ahead::Local => return Delivery::Local,
            Ahead::NotKept(body) => return self.send(kind, order, body, deadline).await,
            Ahead::Kept(mine) => mine,
        };
        let Some(cp) = &self.control_plane else {
            return Delivery::Kept;
        };
        match flush_outbox_for(
            cp,
            &self.state,
            &self.job_id,
            deadline,
            Some(&mine),
            None,
            None,
        )
        .await
        .mine
        {
            Some(Ok(reply)) => Delivery::Delivered(reply),
            Some(Err(())) => Delivery::Rejected,
            // Gone from the outbox without an answer here: another flusher (a `recover`,
            // another job's start) sent or dropped it, or this flush superseded it or set it
            // aside, each said where it happened; "unreachable" here was false.
            None if !mine.exists() => {
                tracing::info!(
                    kind,
                    "the kept report left the outbox meanwhile (sent by another flush, superseded, or set aside)"
                );
                Delivery::Kept
            }
            None => {
                tracing::warn!(
                    kind,
                    give_up_secs = cp.give_up().as_secs(),
                    "control plane unreachable; the report stays kept for later delivery"
                );
                Delivery::Kept
            }
        }
    }

    /// After a report was kept: tries the job's outbox every [`KEPT_RETRY_EVERY`] until it
    /// is delivered (`Delivered`, with no body) or `stop` (`Kept`).
    pub async fn deliver_kept(&self, stop: &tokio_util::sync::CancellationToken) -> Delivery {
        let Some(cp) = &self.control_plane else {
            return Delivery::Kept;
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Delivery::Kept,
                _ = tokio::time::sleep(KEPT_RETRY_EVERY) => {}
            }
            // Stopped (a later status of the job supersedes this one), the flush ends
            // between two entries, never inside a POST: one dropped there may have been
            // taken, and the next flusher sent it again (a registration counted twice).
            // (Past the report stay, `JobReporter` still aborts the task: the agent's exit
            // is not held for a slow control plane.)
            let deadline = Instant::now() + cp.give_up();
            let flushed = flush_outbox_for(
                cp,
                &self.state,
                &self.job_id,
                deadline,
                None,
                None,
                Some(stop),
            )
            .await;
            // An earlier attempt's entry the control plane keeps failing on stays, and holds
            // none of this one's back.
            if flushed.done && !flushed.held.contains(&Some(self.attempt)) {
                return Delivery::Delivered(Bytes::new());
            }
        }
    }

    /// Puts a report straight into the outbox (one whose sending ran out of time).
    pub fn keep_unsent(&self, kind: &str, order: u64, body: &[u8]) -> Delivery {
        match self.keep_ahead(kind, order, body.to_vec()) {
            Ahead::Local => Delivery::Local,
            Ahead::Kept(_) => Delivery::Kept,
            Ahead::NotKept(_) => Delivery::Rejected,
        }
    }

    fn keep(&self, kind: &str, order: u64, endpoint: &str, body: &[u8]) -> Delivery {
        match self.keep_at(kind, order, endpoint, body) {
            Some(_) => Delivery::Kept,
            None => Delivery::Rejected,
        }
    }

    /// Writes the outbox entry; its path, or None (logged) when it cannot be written.
    fn keep_at(&self, kind: &str, order: u64, endpoint: &str, body: &[u8]) -> Option<PathBuf> {
        let mut entry = OutboxEntry::new(&self.job_id, endpoint.to_string(), body);
        entry.control_plane = self.control_plane.as_ref().map(ControlPlane::shown_url);
        let name = format!("{:06}-{order:08}-{kind}.json", self.attempt);
        let path = self.state.outbox_dir(&self.job_id).join(name);
        let json = entry.to_json();
        if crate::fault::armed_at("outbox-write-enospc", &self.job_id) {
            let e = crate::statedir::StateError::Write {
                path: path.clone(),
                source: std::io::Error::from_raw_os_error(libc::ENOSPC),
            };
            tracing::error!(error = %crate::error_chain(&e), endpoint, "report lost: cannot write the outbox");
            return None;
        }
        let reserve = self.state.record_reserve_path(&self.job_id, self.attempt);
        let write = || {
            // Debug builds: a filesystem with no room but for the run record's reserve.
            if crate::fault::armed_at("outbox-full", &self.job_id) && reserve.exists() {
                return Err(crate::statedir::StateError::Write {
                    path: path.clone(),
                    source: std::io::Error::from_raw_os_error(libc::ENOSPC),
                });
            }
            // Made private whatever the umask (`private_files = false` keeps the one the
            // agent was started with, 000 under some launchers): a folder others may write
            // is refused by every flush (`claim_outbox`), and its reports were never sent.
            crate::statedir::write_atomic_private(&path, &json)
        };
        // Another flusher of this outbox (a `recover`, a later job's run) removes the folder
        // once it is empty: it may have gone between this write's mkdir and its temp file.
        let written = write().or_else(|e| match &e {
            crate::statedir::StateError::Write { source, .. }
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                write()
            }
            _ => Err(e),
        });
        // Out of space (the job's checkpoints filled the filesystem the state dir is on), the
        // attempt's run record reserve makes room: the record alone had it, and a terminal
        // status neither kept nor delivered (the control plane down too) was lost for good,
        // the record done with nothing left to send.
        let written = match written {
            Err(e) if e.is_out_of_space() && std::fs::remove_file(&reserve).is_ok() => {
                tracing::warn!(
                    endpoint,
                    "the state dir's filesystem is full: the run record's reserve was freed for the outbox"
                );
                write()
            }
            other => other,
        };
        match written {
            Ok(()) => Some(path),
            Err(e) => {
                tracing::error!(error = %crate::error_chain(&e), endpoint, "report lost: cannot write the outbox");
                None
            }
        }
    }

    fn append_local(&self, endpoint: &str, body: &[u8]) {
        use std::io::Write;
        let path = self
            .state
            .attempt_dir(&self.job_id, self.attempt)
            .join("reports.jsonl");
        let line = OutboxEntry::new(&self.job_id, endpoint.to_string(), body).to_json_line();
        // The contract's 0600 whatever the umask, never through a symlink; a line a crash
        // tore is ended first, or the next one would join it and both be unreadable.
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let written = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .and_then(|mut f| {
                let len = f.metadata()?.len();
                let mut last = [0u8];
                if len > 0 && f.read_at(&mut last, len - 1)? == 1 && last[0] != b'\n' {
                    f.write_all(b"\n")?;
                }
                f.write_all(&line).and_then(|()| f.sync_data())
            });
        if let Err(e) = written {
            tracing::warn!(path = %path.display(), error = %crate::error_chain(&e), "cannot record report");
        }
    }
}

/// Delivers a job's outbox in order; true when nothing for this control plane is left in it
/// afterwards (what is for another one stays, and holds nothing back). Another flusher's
/// hold ([`claim_outbox`]) is waited out until `deadline`, then false.
pub async fn flush_job_outbox(
    cp: &ControlPlane,
    state: &StateDir,
    job: &str,
    deadline: Instant,
) -> bool {
    let flushed = flush_outbox_for(cp, state, job, deadline, None, None, None).await;
    flushed.done && flushed.held.is_empty()
}

/// Storage used and quota, when an artifacts registration's reply says the project is over
/// its quota (a warning, never a failure: contract §7).
pub(crate) fn over_quota(reply: &[u8]) -> Option<(u64, u64)> {
    match c3_proto::ArtifactsReply::from_json(reply) {
        Ok(c3_proto::ArtifactsReply {
            storage_used_bytes: used,
            storage_quota_bytes: Some(quota),
        }) if used > quota => Some((used, quota)),
        _ => None,
    }
}

/// How often a flush looks again at an outbox another flusher holds.
const CLAIM_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// What one flush of a job's outbox did.
struct Flushed {
    /// Nothing for this control plane is left but the attempts in `held`.
    done: bool,
    /// Attempts (by their entries' names) whose entries stay behind one the control plane
    /// keeps failing on ([`Failed::Stuck`]); the other attempts' went past them.
    held: std::collections::HashSet<Option<u32>>,
    /// The outbox, still claimed, for the sender of `later` to post it under: released by
    /// the flush itself otherwise.
    claim: Option<OutboxClaim>,
    /// Entries left for another control plane.
    elsewhere: usize,
    /// What became of the entry `mine` (None: not delivered yet; `Err`: rejected).
    mine: Option<Result<Bytes, ()>>,
    /// Kept statuses that failed and that the status about to be sent (`later`) supersedes:
    /// left for its sender to remove once that one is delivered (they do not count against
    /// `done`).
    superseded: Vec<PathBuf>,
}

/// [`flush_job_outbox`], telling also what became of the entry `mine`. `later`: the attempt
/// and order of a status about to be sent, which supersedes the kept ones before it.
async fn flush_outbox_for(
    cp: &ControlPlane,
    state: &StateDir,
    job: &str,
    deadline: Instant,
    mine: Option<&Path>,
    later: Option<(u32, u64)>,
    stop: Option<&CancellationToken>,
) -> Flushed {
    let stopped = || stop.is_some_and(CancellationToken::is_cancelled);
    let dir = &state.outbox_dir(job);
    let mut flushed = Flushed {
        done: false,
        held: std::collections::HashSet::new(),
        claim: None,
        elsewhere: 0,
        mine: None,
        superseded: Vec::new(),
    };
    // Another flusher's hold is waited out within the deadline: a terminal status given up
    // at once would wait in the outbox for the next `recover`, an hour maybe.
    let claim = loop {
        match claim_outbox(dir) {
            Claim::Held(claim) => break claim,
            Claim::Missing => {
                flushed.done = true;
                return flushed;
            }
            Claim::Busy if Instant::now() + CLAIM_RETRY < deadline && !stopped() => {
                tokio::time::sleep(CLAIM_RETRY).await;
            }
            Claim::Busy | Claim::Refused => return flushed,
        }
    };
    let here = cp.shown_url();
    let mut by_attempt = std::collections::HashMap::new();
    // A listing that failed is not an empty outbox.
    let entries = match sorted_entries(dir, job) {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "cannot list the outbox; its reports stay");
            return flushed;
        }
    };
    // The newest status of each attempt kept here, with the one about to be sent.
    let mut newest_status = std::collections::HashMap::new();
    for (attempt, order) in entries
        .iter()
        .filter_map(|p| entry_name(p))
        .filter(|(_, _, kind)| *kind == "status")
        .map(|(attempt, order, _)| (attempt, order))
        .chain(later)
    {
        let newest = newest_status.entry(attempt).or_insert(order);
        *newest = order.max(*newest);
    }
    // Passed over (see `passing` below): attempt, order, path.
    let mut passed_over = Vec::new();
    for path in entries {
        let read = if crate::fault::armed_at("outbox-read-eio", job) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            std::fs::read(&path)
        };
        let mut entry = match read {
            Ok(bytes) => match OutboxEntry::from_json(&bytes) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable outbox entry; moved aside");
                    move_aside(&path);
                    continue;
                }
            },
            // Delivered by another flusher of this outbox meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            // A read that failed once (EIO, ENOMEM) may not fail again: the entry stays, and
            // so do the ones after it.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read an outbox entry; its reports stay");
                return flushed;
            }
        };
        // The request an entry names is the one its place says (`v1/jobs/<job>/<kind>`),
        // never another: its endpoint, joined to the URL with the token, could name any
        // origin (an absolute URL), and one that is not a URL at all panicked the flush and
        // every `recover` after it. Only an entry this agent could not have written differs
        // (copied from elsewhere, edited): set aside.
        let name = entry_name(&path);
        let expected = match name {
            Some((_, _, kind @ ("status" | "artifacts"))) => Some(endpoint_of(job, kind)),
            _ => None,
        };
        if expected.as_deref() != Some(entry.endpoint.as_str()) || entry.job_id != job {
            tracing::warn!(path = %path.display(), endpoint = %entry.endpoint.escape_debug(), "an outbox entry names another request than its place says; moved aside");
            move_aside(&path);
            continue;
        }
        // Entries kept for another control plane (attempt 1 under one config, attempt 2 or
        // a `resync` under another) are its own: they name a manifest in its store, and
        // would go out under this one's token. Each says whom it was for; an older agent's
        // entry goes by its attempt's run record. Passed over, not waited for: they would
        // hold this control plane's reports back for good.
        let elsewhere = match &entry.control_plane {
            Some(theirs) => *theirs != here,
            None => {
                let attempt = entry_attempt(&path);
                *by_attempt.entry(attempt).or_insert_with(|| {
                    attempt.is_some_and(|n| attempt_reports_elsewhere(state, job, n, &here))
                })
            }
        };
        if elsewhere {
            flushed.elsewhere += 1;
            continue;
        }
        let attempt = name.map(|(attempt, _, _)| attempt);
        // Behind an entry of its attempt that stays: in order, or not at all.
        if flushed.held.contains(&attempt) {
            continue;
        }
        // A RUNNING or FINALIZING: what a later status of its attempt says supersedes it.
        let progress = matches!(name, Some((_, _, "status")))
            && c3_proto::StatusReport::from_json(&entry.body_json()).is_ok_and(|r| {
                matches!(
                    r.state,
                    c3_proto::JobState::Running | c3_proto::JobState::Finalizing
                )
            });
        // One that a later status of its attempt follows says nothing that one does not. It
        // gets half the time left; if the control plane answered it with a failure (and no
        // try of it may still be in flight, or the later one could get there first), it is
        // passed over, and dropped once a later status of its attempt is answered: a 5xx it
        // met for ever held every later report of the job back (the terminal status among
        // them). In an outage, or on a time-out, the later ones wait, and all stay, in order.
        let passing = progress
            && name.is_some_and(|(attempt, order, _)| {
                newest_status.get(&attempt).is_some_and(|&n| n > order)
            });
        // One the control plane kept failing on gets half the time left too: it would take
        // it all, each flush, from the other attempts' entries that go past it.
        let stuck = !progress && is_stuck(&path);
        // Past the deadline nothing is asked, and no entry counts a failed flush for it.
        // Stopped, the flush ends here, between two entries, never inside a POST.
        let now = Instant::now();
        if now >= deadline || stopped() {
            return flushed;
        }
        let by = if passing || stuck {
            now + (deadline - now) / 2
        } else {
            deadline
        };
        let is_mine = mine == Some(path.as_path());
        let (mut posted, mut in_flight, mut answered) = cp
            .post_tracked(&entry.endpoint, &entry.body_json(), by, stop)
            .await;
        // Stopped between its tries: the entry stays as it is, no failed flush counted (a
        // supersede is no answer of the control plane's).
        if stopped() && posted.is_err() {
            return flushed;
        }
        // A terminal status the control plane refuses (its 4xx), or fails on flush after
        // flush (its own 5xx): what it holds of the job's may be what it cannot take (a NUL
        // in the result, which PostgreSQL refuses). Dropped, or moved aside in a week, it
        // left the job FINALIZING for good; sent again at once, with the same seq, without it.
        let fallback = fallback_due(&posted, answered, &path).and_then(|(http, e)| {
            status_fallback(&entry.body_json(), http).inspect(|_| {
                tracing::error!(endpoint = %entry.endpoint, error = %crate::error_chain(e), "control plane refuses a kept terminal status, or keeps failing on it; sending it again without its result and warnings");
            })
        });
        if let Some(fallback) = fallback {
            let control_plane = entry.control_plane.take();
            entry = OutboxEntry::new(job, entry.endpoint, &fallback);
            entry.control_plane = control_plane;
            // Kept as it now goes: a crash from here on must not send the refused one again.
            if let Err(e) = write_atomic(&path, &entry.to_json()) {
                tracing::warn!(path = %path.display(), error = %crate::error_chain(&e), "cannot keep the terminal status's fallback; the refused one stays kept");
            }
            // The failed flushes were the refused body's.
            let _ = std::fs::remove_file(path.with_extension(TRIES));
            (posted, in_flight, answered) = cp
                .post_tracked(&entry.endpoint, &entry.body_json(), by, stop)
                .await;
            if stopped() && posted.is_err() {
                return flushed;
            }
        }
        // A later status answered (delivered or refused) settles the ones passed over.
        if let (Some((attempt, order, "status")), Ok(_) | Err(ReportError::Rejected { .. })) =
            (name, &posted)
        {
            passed_over.retain(|(a, o, p): &(u32, u64, PathBuf)| {
                let settled = *a == attempt && *o < order;
                if settled {
                    tracing::debug!(path = %p.display(), "a kept status a later one superseded; dropped");
                    remove_entry(p);
                }
                !settled
            });
        }
        match posted {
            Err(e) if passing && e.is_server_error() && !in_flight => {
                if matches!(
                    failed_again(&path, &e, answered.is_some(), progress),
                    Failed::Stays
                ) {
                    if let Some((attempt, order, _)) = name {
                        passed_over.push((attempt, order, path));
                    }
                }
                continue;
            }
            Ok(reply) if is_mine => flushed.mine = Some(Ok(reply)),
            Ok(reply) => {
                tracing::info!(endpoint = %entry.endpoint, "delivered a kept report");
                // The job's own status went long ago; the operator's log still hears of it.
                if let Some((used, quota)) = entry
                    .endpoint
                    .ends_with("/artifacts")
                    .then(|| over_quota(&reply))
                    .flatten()
                {
                    tracing::warn!(
                        job_id = job,
                        storage_used_bytes = used,
                        storage_quota_bytes = quota,
                        "storage usage is over the quota (soft limit: nothing was rejected)"
                    );
                }
            }
            Err(e) if e.is_retryable() => {
                match failed_again(&path, &e, answered.is_some(), progress) {
                    Failed::Stays => return flushed,
                    Failed::Stuck => {
                        flushed.held.insert(attempt);
                        continue;
                    }
                    Failed::MovedAside => {
                        if is_mine {
                            flushed.mine = Some(Err(()));
                        }
                        continue;
                    }
                }
            }
            // A week of refused credentials (a token revoked, the node moved to another
            // control plane) and the entry goes aside as any other stuck one: kept for ever,
            // it held the job's data on the node (retention waits for an empty outbox).
            Err(e) if e.is_auth() && refused_for_good(&path) => {
                tracing::error!(path = %path.display(), error = %crate::error_chain(&e), "a kept report for which the control plane has refused the agent's credentials for a week; moved aside (`.bad`): the control plane never heard it");
                move_aside(&path);
                if is_mine {
                    flushed.mine = Some(Err(()));
                }
                continue;
            }
            Err(e) if e.is_auth() => {
                tracing::error!(endpoint = %entry.endpoint, error = %crate::error_chain(&e), "control plane refuses the agent's credentials; reports kept");
                return flushed;
            }
            Err(e) => {
                tracing::error!(endpoint = %entry.endpoint, error = %crate::error_chain(&e), "control plane rejected a kept report; dropped");
                if is_mine {
                    flushed.mine = Some(Err(()));
                }
            }
        }
        remove_entry(&path);
    }
    if flushed.elsewhere > 0 {
        tracing::warn!(job_id = job, control_plane = %here, reports = flushed.elsewhere, "the job's kept reports are for another control plane than this config's; left in its outbox");
    }
    // What was passed over and no later status in the outbox settled is for `later`'s
    // sender; anything else stays, and holds the next report back.
    for (attempt, order, path) in passed_over {
        match later {
            Some((a, o)) if a == attempt && o > order => flushed.superseded.push(path),
            _ => return flushed,
        }
    }
    remove_stale_temps(dir);
    if later.is_some() {
        flushed.claim = Some(claim);
    } else {
        claim.release_and_remove(dir);
    }
    flushed.done = true;
    flushed
}

/// The attempt an outbox entry belongs to, by its name (`<attempt>-<order>-<kind>.json`).
/// The request a report of `kind` (`status`, `artifacts`) for `job` is: a path below the
/// control plane's URL.
fn endpoint_of(job: &str, kind: &str) -> String {
    format!("v1/jobs/{job}/{kind}")
}

/// The kind of an endpoint ([`endpoint_of`]): its last segment.
fn endpoint_kind(endpoint: &str) -> &str {
    endpoint.rsplit('/').next().unwrap_or(endpoint)
}

/// Moves an outbox entry aside (`.bad`), with its count of failed flushes: no flush sends it
/// again, and retention lets it go with its job.
fn move_aside(path: &Path) {
    let _ = std::fs::rename(path, path.with_extension("bad"));
    drop_counts(path);
}

/// Removes what an entry's failed flushes left beside it ([`TRIES`], [`REFUSED`]).
fn drop_counts(path: &Path) {
    for count in [TRIES, REFUSED] {
        let _ = std::fs::remove_file(path.with_extension(count));
    }
}

/// Beside an entry the control plane refused the agent's credentials for: when it first did
/// (Unix seconds) and how many flushes since.
const REFUSED: &str = "refused";

/// Counts a flush of the entry at `path` that met refused credentials; whether they have
/// been refused for [`MAX_AGE_STUCK`] since the first refusal, over [`MAX_FAILED_FLUSHES`]
/// flushes at least. Judged by the entry's age, a report kept through a week's outage went
/// aside at the first 401 after it (a token rotated during a deploy, a proxy's 407).
fn refused_for_good(path: &Path) -> bool {
    let marker = path.with_extension(REFUSED);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (first, count) = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|t| {
            let (first, count) = t.trim().split_once(' ')?;
            Some((first.parse::<u64>().ok()?, count.parse::<u32>().ok()?))
        })
        // A first refusal "in the future" (the clock was set back since) counts from now.
        .filter(|&(first, _)| first <= now)
        .unwrap_or((now, 0));
    let count = count.saturating_add(1);
    if let Err(e) = write_atomic(&marker, format!("{first} {count}").as_bytes()) {
        tracing::debug!(path = %marker.display(), error = %crate::error_chain(&e), "cannot count a refused flush");
    }
    count >= MAX_FAILED_FLUSHES && now - first >= MAX_AGE_STUCK.as_secs()
}

/// Whether an outbox entry's file is a report a flush delivers (`*.json`), not one set
/// aside, a tries count, a temp file or the lock.
pub(crate) fn is_kept_report(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "json")
}

fn entry_attempt(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    name.split_once('-')?.0.parse().ok()
}

/// An outbox entry's attempt, order and kind, by its name (`<attempt>-<order>-<kind>.json`).
fn entry_name(path: &Path) -> Option<(u32, u64, &str)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".json")?;
    let (attempt, rest) = name.split_once('-')?;
    let (order, kind) = rest.split_once('-')?;
    Some((attempt.parse().ok()?, order.parse().ok()?, kind))
}

/// Flushes a kept terminal status may fail on the control plane's own server error before
/// it goes again without the job's result and warnings ([`status_fallback`]): long before
/// [`MAX_AGE_STUCK`] moves it aside, and not on the first, which a bad deploy fails too.
const FALLBACK_AFTER_FLUSHES: u32 = 3;

/// How long a kept terminal status has failed on the control plane's own server error
/// before it goes without its result and warnings, however many flushes failed: a node that
/// starts jobs every few minutes flushes three times in minutes, and an outage of the control
/// plane's database (its own 500s) stripped every status that ended in it.
const FALLBACK_MIN_AGE: Duration = Duration::from_secs(3600);

/// The one warning a terminal status sent again without its result and warnings carries,
/// up to its HTTP status.
const FALLBACK_NOTE: &str = "status refused with HTTP ";

/// A terminal status sent again without its result and warnings keeps this much of its
/// message.
const MAX_FALLBACK_MESSAGE_BYTES: usize = 512;

/// The HTTP status a kept report's flush was refused with, and the failure, when a terminal
/// status goes again for it without its extras ([`status_fallback`]): the control plane's
/// own 4xx (not 401 or 407: the node's credentials), or its own 5xx on the
/// [`FALLBACK_AFTER_FLUSHES`]th flush.
fn fallback_due<'a>(
    posted: &'a Result<Bytes, ReportError>,
    answered: Option<u16>,
    path: &Path,
) -> Option<(u16, &'a ReportError)> {
    match posted {
        Err(e @ ReportError::Rejected { status, .. }) if !e.is_auth() => Some((*status, e)),
        Err(e) if e.is_retryable() => answered
            .filter(|_| {
                failed_flushes(path).saturating_add(1) >= FALLBACK_AFTER_FLUSHES
                    && kept_for(path) >= FALLBACK_MIN_AGE
            })
            .map(|http| (http, e)),
        _ => None,
    }
}

/// What a terminal status `body` the control plane refused with `http` is sent again as:
/// the same status and seq with `result` null, its warnings replaced by one note, and its
/// message cut. None for any other report, and for a status with nothing to drop (one such
/// fallback included, so that one refused too is not sent a third time).
pub(crate) fn status_fallback(body: &[u8], http: u16) -> Option<Vec<u8>> {
    use c3_proto::JobState;
    let mut status = c3_proto::StatusReport::from_json(body).ok()?;
    match status.state {
        JobState::Running | JobState::Finalizing => return None,
        JobState::Succeeded | JobState::Failed | JobState::Canceled | JobState::TimedOut => {}
    }
    let noted = matches!(status.warnings.as_slice(), [only] if only.starts_with(FALLBACK_NOTE));
    let extras = !status.result.is_null()
        || !(status.warnings.is_empty() || noted)
        || status
            .message
            .as_ref()
            .is_some_and(|m| m.len() > MAX_FALLBACK_MESSAGE_BYTES);
    if !extras {
        return None;
    }
    status.result = serde_json::Value::Null;
    status.warnings = vec![format!(
        "{FALLBACK_NOTE}{http}; result and warnings dropped; see the agent log"
    )];
    status.message = status
        .message
        .map(|m| crate::display::cut(m, MAX_FALLBACK_MESSAGE_BYTES));
    Some(status.to_json())
}

/// The extension of the file beside an outbox entry that counts the flushes it failed.
const TRIES: &str = "tries";

/// Flushes an entry may fail, each on the control plane's own server error
/// ([`ReportError::is_server_error`]), before it counts as one the control plane fails on
/// for good (once it is also [`MIN_AGE_ASIDE`] old): a body that crashes it held every later
/// report of its job back for ever. Reports of an earlier attempt keep going first, ahead of
/// a later attempt's: the control plane hears how one attempt ended before the next one's
/// news; this bound is what ends the wait.
const MAX_FAILED_FLUSHES: u32 = 20;

/// The least age of an entry the control plane fails on for good: it may fail on every
/// report for a while (a bad deploy), and a running job's kept status is tried every few
/// seconds.
const MIN_AGE_ASIDE: Duration = Duration::from_secs(24 * 3600);

/// What became of an entry whose flush failed ([`failed_again`]).
enum Failed {
    /// It stays, and so do the entries after it.
    Stays,
    /// The control plane fails on it for good, and it is no RUNNING or FINALIZING: it stays
    /// (a terminal status or an artifacts registration is never given up), and so do the
    /// entries of its attempt after it; other attempts' go past it.
    Stuck,
    /// The control plane fails on it for good, and it is a RUNNING or FINALIZING, which the
    /// attempt's terminal status says all of: moved aside (`.bad`).
    MovedAside,
}

/// Whether the entry at `path` failed [`MAX_FAILED_FLUSHES`] flushes and is
/// [`MIN_AGE_ASIDE`] old.
fn is_stuck(path: &Path) -> bool {
    failed_flushes(path) >= MAX_FAILED_FLUSHES && is_old(path)
}

/// How long ago the entry at `path` was kept (nothing for one that cannot be read). One
/// kept in the future was kept before the node's clock stepped back (NTP at boot, a VM
/// resumed): counted as kept now, and its time set so, for it otherwise stayed young until
/// the clock caught up, never falling back to a status without its result nor stuck, and
/// held every later report of its job behind it.
fn kept_for(path: &Path) -> Duration {
    let Ok(kept) = std::fs::metadata(path).and_then(|m| m.modified()) else {
        return Duration::ZERO;
    };
    match kept.elapsed() {
        Ok(age) => age,
        Err(_) => {
            let now = std::time::SystemTime::now();
            if let Err(e) = std::fs::File::options()
                .write(true)
                .open(path)
                .and_then(|f| f.set_modified(now))
            {
                tracing::debug!(path = %path.display(), error = %e, "cannot set the time of a report kept in the future");
            }
            Duration::ZERO
        }
    }
}

/// The flushes the entry at `path` failed, by its `.tries` file.
fn failed_flushes(path: &Path) -> u32 {
    std::fs::read_to_string(path.with_extension(TRIES))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .unwrap_or(0)
}

/// How long a terminal status or registration the control plane keeps failing on is kept.
const MAX_AGE_STUCK: Duration = Duration::from_secs(7 * 24 * 3600);

fn is_ancient(path: &Path) -> bool {
    kept_for(path) >= MAX_AGE_STUCK
}

fn is_old(path: &Path) -> bool {
    kept_for(path) >= MIN_AGE_ASIDE
}

/// A flush of the entry at `path` failed with `e` (`answered`: a try of it met an answer
/// that counts, [`ReportError::fails_a_flush`]); `progress`: it is a RUNNING or FINALIZING.
/// Only such answers count (in `<entry>.tries`): an outage (refused connections, time-outs,
/// a 503) fails every entry on every flush, and one of a day moved a job's terminal status
/// aside for good.
fn failed_again(path: &Path, e: &ReportError, answered: bool, progress: bool) -> Failed {
    let tries_path = path.with_extension(TRIES);
    let mut tries = failed_flushes(path);
    if answered || e.fails_a_flush() {
        tries = tries.saturating_add(1);
        if let Err(e) = write_atomic(&tries_path, tries.to_string().as_bytes()) {
            tracing::debug!(path = %tries_path.display(), error = %crate::error_chain(&e), "cannot count a failed flush");
        }
    }
    // A gateway's 502 or 504 counts only when the same kind of endpoint answered lately;
    // on an idle node (one kept status, nothing else sent) none ever did, and a body the
    // backend crashes on stayed for ever: a week of them is enough.
    let gateway_for_a_week = matches!(
        e,
        ReportError::Unavailable {
            status: 502 | 504,
            ..
        }
    ) && is_ancient(path);
    if (tries < MAX_FAILED_FLUSHES || !is_old(path)) && !gateway_for_a_week {
        return Failed::Stays;
    }
    if !progress && !is_ancient(path) {
        tracing::warn!(path = %path.display(), failed_flushes = tries, error = %crate::error_chain(e), "a kept report the control plane keeps failing on; it stays, and the job's other attempts' reports go past it");
        return Failed::Stuck;
    }
    if !progress {
        // A week of the control plane failing on it: kept for ever, it held the job's data on
        // the node (retention waits for an empty outbox) and half of every flush's time.
        tracing::error!(path = %path.display(), failed_flushes = tries, error = %crate::error_chain(e), "a kept terminal status or registration the control plane has failed on for a week; moved aside (`.bad`): the control plane never heard it");
        move_aside(path);
        return Failed::MovedAside;
    }
    tracing::error!(path = %path.display(), failed_flushes = tries, error = %crate::error_chain(e), "a kept RUNNING or FINALIZING the control plane keeps failing on; moved aside (`.bad`), the job's later reports go on");
    move_aside(path);
    Failed::MovedAside
}

/// Removes a delivered (or dropped) outbox entry and its count of failed flushes. A
/// registration's removal is made durable: come back after a power loss, it was delivered
/// again, and its bytes counted twice against the quota.
fn remove_entry(path: &Path) {
    let _ = std::fs::remove_file(path);
    drop_counts(path);
    let registration = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with("-artifacts.json"));
    if registration {
        if let Some(dir) = path.parent().and_then(|d| std::fs::File::open(d).ok()) {
            let _ = dir.sync_all();
        }
    }
}

/// The lock file in a job's outbox folder; not an entry (entries are `*.json`).
pub(crate) const OUTBOX_LOCK: &str = ".lock";

/// What [`claim_outbox`] found.
enum Claim {
    Held(OutboxClaim),
    /// Another flusher holds the outbox (for a moment: worth waiting for).
    Busy,
    /// It is not one the agent may trust, or cannot be locked: no wait makes it one.
    Refused,
    /// No outbox folder: nothing kept.
    Missing,
}

/// One flusher's flock on a job's outbox (`outbox/<job>/.lock`), held for its whole flush.
/// Without it two flushers (two jobs starting after an outage, a run beside `recover`) each
/// read an entry and posted it before either removed it: statuses are told apart by `seq`,
/// but an artifacts registration sent twice counted its `new_bytes` twice.
struct OutboxClaim {
    /// The outbox folder, opened once: the lock file is made and removed in it, never through
    /// a path that could be swapped meanwhile.
    dir: std::fs::File,
    /// The locked file; its flock goes when it is dropped.
    _lock: crate::statedir::HeldFlock,
}

/// Takes `dir`'s lock without waiting: [`Claim::Busy`] when another flusher has it.
fn claim_outbox(dir: &Path) -> Claim {
    use nix::fcntl::{AtFlags, OFlag};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // A flusher that emptied the outbox unlinks its lock file, then removes the folder: a
    // lock taken on the unlinked file (opened just before) or in the removed folder claims
    // nothing, and the next try opens the current one.
    for _ in 0..3 {
        // Never through a symlink, and only a folder root alone writes: root makes the lock
        // file in it and posts what it holds under the node's token.
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(dir);
        let folder = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Claim::Missing,
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot open the outbox; its reports stay");
                return Claim::Refused;
            }
        };
        let Ok(meta) = folder.metadata() else {
            return Claim::Refused;
        };
        if !crate::statedir::root_alone_writes(meta.uid(), meta.gid(), meta.mode()) {
            tracing::warn!(path = %dir.display(), "the outbox is writable by others than root; its reports stay");
            return Claim::Refused;
        }
        let lock = nix::fcntl::openat(
            &folder,
            OUTBOX_LOCK,
            OFlag::O_RDWR
                | OFlag::O_CREAT
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC
                | OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        );
        let lock = match lock {
            Ok(fd) => std::fs::File::from(fd),
            // The folder went since it was opened (a flusher emptied it).
            Err(nix::errno::Errno::ENOENT) => continue,
            Err(e) => {
                tracing::warn!(path = %dir.join(OUTBOX_LOCK).display(), error = %e, "cannot open the outbox's lock; its reports stay");
                return Claim::Refused;
            }
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Claim::Busy,
            Err(std::fs::TryLockError::Error(e)) => {
                tracing::warn!(path = %dir.join(OUTBOX_LOCK).display(), error = %e, "cannot lock the outbox; its reports stay");
                return Claim::Refused;
            }
        }
        let Ok(locked) = lock.metadata() else {
            return Claim::Refused;
        };
        let linked = nix::sys::stat::fstatat(&folder, OUTBOX_LOCK, AtFlags::AT_SYMLINK_NOFOLLOW)
            .is_ok_and(|st| st.st_ino == locked.ino() && st.st_dev == locked.dev());
        let current = std::fs::symlink_metadata(dir)
            .is_ok_and(|m| m.ino() == meta.ino() && m.dev() == meta.dev());
        if linked && current {
            return Claim::Held(OutboxClaim {
                dir: folder,
                _lock: crate::statedir::HeldFlock::new(lock),
            });
        }
    }
    Claim::Busy
}

impl OutboxClaim {
    /// The flush is done: the lock file goes (while still held, so that no flusher takes
    /// it and then finds it gone), then the folder if nothing else is in it.
    fn release_and_remove(self, dir: &Path) {
        let _ = nix::unistd::unlinkat(
            &self.dir,
            OUTBOX_LOCK,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        let _ = std::fs::remove_dir(dir);
    }
}

/// A keep that a kill interrupted leaves its temp file (`.c3-*.tmp`): never delivered, it
/// held the folder (and retention's "reports wait") for good. One written a minute ago may be
/// a keep under way.
fn remove_stale_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(60)));
        if name.to_string_lossy().starts_with(".c3-") && stale {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Retention's end of a job's outbox (its job removed, or long gone): under the outbox's
/// claim (a flusher at work keeps it, and the next sweep tries again), what the flush set
/// aside (`*.bad`), tries counts of no report and stale temp files go, then the lock file
/// and the folder. A report kept meanwhile stays, with its tries count and the folder.
/// Returns whether the folder is gone.
pub(crate) fn drop_outbox_leftovers(dir: &Path) -> bool {
    let claim = match claim_outbox(dir) {
        Claim::Held(claim) => claim,
        Claim::Missing => return true,
        Claim::Busy | Claim::Refused => return false,
    };
    remove_stale_temps(dir);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let mut reports = false;
    for e in entries.flatten() {
        let path = e.path();
        if is_kept_report(&path) {
            reports = true;
            continue;
        }
        match path.extension().and_then(|x| x.to_str()) {
            Some("bad") => {
                let _ = std::fs::remove_file(&path);
            }
            Some(TRIES | REFUSED) if !path.with_extension("json").exists() => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
    if reports {
        return false;
    }
    claim.release_and_remove(dir);
    !dir.exists()
}

/// Delivers every job's outbox; returns how many jobs still have undelivered reports. Once
/// `stop` is cancelled it ends between two deliveries, after the POST under way, within
/// [`IN_FLIGHT_GRACE`] (then 0: what is left is not known).
pub async fn flush_all_outboxes(
    cp: &ControlPlane,
    state: &StateDir,
    deadline: Instant,
    stop: Option<&CancellationToken>,
) -> usize {
    let flush = flush_every_outbox(cp, state, deadline, stop);
    match stop {
        Some(stop) => until_stopped(flush, stop, 0).await,
        None => flush.await,
    }
}

/// [`flush_all_outboxes`], however long its POST under way takes after a stop.
async fn flush_every_outbox(
    cp: &ControlPlane,
    state: &StateDir,
    deadline: Instant,
    stop: Option<&CancellationToken>,
) -> usize {
    let Ok(dirs) = std::fs::read_dir(state.outbox_root()) else {
        return 0;
    };
    let mut left = 0;
    let mut jobs: Vec<String> = dirs
        .flatten()
        .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|d| d.file_name().into_string().ok())
        .collect();
    jobs.sort();
    // Order matters within a job only: each job's outbox gets its share of the time left,
    // so one job whose reports the control plane keeps failing (a job it deleted, a body
    // that crashes it) does not hold every later job's reports back until the deadline.
    // A job whose agent runs delivers its own outbox, in order, with what it sends next: a
    // second flusher would post its artifacts registration (kept ahead of its sending)
    // again, counting its bytes twice, or after its terminal status.
    // Reports an attempt kept for another control plane (a housekeeping unit without the
    // job unit's environment) stay for one that is it ([`flush_job_outbox`]).
    jobs.retain(|job| {
        let running = job_is_running(state, job);
        if running {
            left += 1;
        }
        !running
    });
    let count = jobs.len();
    for (i, job) in jobs.into_iter().enumerate() {
        let now = Instant::now();
        let time_left = deadline.saturating_duration_since(now);
        // At least time for a try or two each: a share shorter than one POST (200 outboxes
        // in 60 s) cut every first try, and nothing was ever delivered. An outbox delivered
        // at once leaves its share to the rest.
        let share = (time_left / (count - i) as u32).max(time_left.min(SHARE_FLOOR));
        let flushed = flush_outbox_for(
            cp,
            state,
            &job,
            (now + share).min(deadline),
            None,
            None,
            stop,
        )
        .await;
        if stop.is_some_and(CancellationToken::is_cancelled) {
            return left + count - i;
        }
        if !flushed.done || flushed.elsewhere > 0 || !flushed.held.is_empty() {
            left += 1;
        }
    }
    left
}

/// How long a flush told to stop may still take: it ends after the POST under way, whose
/// answer says whether the report went. Dropped inside it, a registration the control plane
/// had taken stayed kept, and the next flush sent it again: its bytes counted twice.
pub const IN_FLIGHT_GRACE: Duration = Duration::from_secs(10);

/// Runs `flush` (given `stop`) until it ends; once `stop` is cancelled, for at most
/// [`IN_FLIGHT_GRACE`] more. Its result, or `gave_up` if it was dropped.
async fn until_stopped<T>(
    flush: impl std::future::Future<Output = T>,
    stop: &CancellationToken,
    gave_up: T,
) -> T {
    tokio::pin!(flush);
    tokio::select! {
        done = &mut flush => done,
        () = stop.cancelled() => tokio::time::timeout(IN_FLIGHT_GRACE, flush).await.unwrap_or(gave_up),
    }
}

/// Whether the run record of `job`'s attempt `n` names a control plane other than `here`
/// (shown URL). No record, or none named: this one's.
fn attempt_reports_elsewhere(state: &StateDir, job: &str, n: u32, here: &str) -> bool {
    state
        .read_record(&state.run_record_path(job, n))
        .ok()
        .and_then(|r| r.destination)
        .and_then(|d| d.control_plane)
        .is_some_and(|theirs| theirs != here)
}

/// Whether an agent holds the lock of one of `job`'s attempts now.
fn job_is_running(state: &StateDir, job: &str) -> bool {
    state.attempt_numbers(job).into_iter().any(|n| {
        matches!(
            crate::statedir::AttemptLock::acquire_existing(state, job, n),
            Err(crate::statedir::LockError::Held { .. })
        )
    })
}

/// The entries (`*.json`) of `job`'s outbox `dir`, in sending order.
fn sorted_entries(dir: &Path, job: &str) -> std::io::Result<Vec<PathBuf>> {
    if crate::fault::armed_at("outbox-list-eio", job) {
        return Err(std::io::Error::from_raw_os_error(libc::EIO));
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if is_kept_report(&path) {
            v.push(path);
        }
    }
    // By the numbers the names hold, not their text: an attempt past 999,999 or an order
    // past 99,999,999 (seq after many set-aside records) is a wider name, which sorted as
    // text went ahead of smaller ones (a terminal status before its FINALIZING). Names that
    // do not parse go last.
    v.sort_by(|a, b| {
        let key = |p: &Path| entry_name(p).map(|(attempt, order, _)| (attempt, order));
        match (key(a), key(b)) {
            (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => a.cmp(b),
        }
    });
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP server on 127.0.0.1 that answers each request with the next of `replies`
    /// (status line, body), and counts the requests.
    async fn serve(replies: Vec<(&'static str, &'static str)>) -> (url::Url, Arc<AtomicUsize>) {
        let replies = std::sync::Mutex::new(replies.into_iter());
        serve_with(move |_| replies.lock().unwrap().next()).await
    }

    /// An HTTP server on 127.0.0.1 that answers each request (its request line given) with
    /// what `answer` says, until it says None; counts the requests.
    async fn serve_with(
        answer: impl Fn(&str) -> Option<(&'static str, &'static str)> + Send + 'static,
    ) -> (url::Url, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            url::Url::parse(&format!("http://{}/api/", listener.local_addr().unwrap())).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (line, _) = read_request(&mut conn).await;
                let Some((status, body)) = answer(&line) else {
                    return;
                };
                seen.fetch_add(1, Ordering::SeqCst);
                write_reply(&mut conn, status, body).await;
            }
        });
        (url, count)
    }

    /// A request the server got: its request line and its body.
    pub(crate) type Request = (String, String);

    /// An HTTP server on 127.0.0.1 that answers each request, `delay` after it came, with
    /// what `answer` says (given its request line and body), several at once; records them
    /// in the order they came.
    pub(crate) async fn serve_recorded(
        delay: Duration,
        answer: impl Fn(&str, &str) -> (&'static str, &'static str) + Send + Sync + 'static,
    ) -> (url::Url, Arc<std::sync::Mutex<Vec<Request>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            url::Url::parse(&format!("http://{}/api/", listener.local_addr().unwrap())).unwrap();
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (seen, answer) = (seen.clone(), answer.clone());
                tokio::spawn(async move {
                    let (line, body) = read_request(&mut conn).await;
                    let (status, reply) = answer(&line, &body);
                    seen.lock().unwrap().push((line, body));
                    tokio::time::sleep(delay).await;
                    write_reply(&mut conn, status, reply).await;
                });
            }
        });
        (url, requests)
    }

    /// Headers, then the Content-Length bytes of the body: the request line and the body.
    async fn read_request(conn: &mut tokio::net::TcpStream) -> (String, String) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = Vec::new();
        let mut body_at = None;
        loop {
            let n = conn.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got);
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                body_at = Some(end + 4);
                if got.len() >= end + 4 + len {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&got);
        let line = text.lines().next().unwrap_or("").to_string();
        let body = body_at.map(|at| text[at..].to_string()).unwrap_or_default();
        (line, body)
    }

    async fn write_reply(conn: &mut tokio::net::TcpStream, status: &str, body: &str) {
        let reply = format!(
            "HTTP/1.1 {status}\r\nLocation: http://127.0.0.1:9/elsewhere\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = conn.write_all(reply.as_bytes()).await;
    }

    pub(crate) fn control_plane(url: url::Url) -> ControlPlane {
        ControlPlane::new(ControlPlaneConfig {
            url,
            token: Some("t".into()),
            give_up: Duration::from_secs(20),
            max_reply_bytes: DEFAULT_MAX_REPLY_BYTES,
        })
    }

    #[tokio::test]
    async fn a_redirect_is_retried_not_followed_and_not_a_verdict() {
        let (url, count) = serve(vec![
            ("307 Temporary Redirect", ""),
            ("308 Permanent Redirect", ""),
            ("200 OK", "{}"),
        ])
        .await;
        let cp = control_plane(url);
        let deadline = Instant::now() + Duration::from_secs(20);
        let reply = cp.post("v1/jobs/j/status", b"{}", deadline).await.unwrap();
        assert_eq!(&reply[..], b"{}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_4xx_is_a_verdict() {
        let (url, count) = serve(vec![("400 Bad Request", "no"), ("200 OK", "{}")]).await;
        let e = control_plane(url)
            .post(
                "v1/jobs/j/status",
                b"{}",
                Instant::now() + Duration::from_secs(20),
            )
            .await
            .unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// Only the control plane's own 4xx is a verdict: a status past 599 (a middlebox's) is
    /// retried, and a 407 (the node's proxy credentials) keeps the report as a 401 does.
    #[tokio::test]
    async fn a_status_outside_the_known_classes_is_retried() {
        let (url, count) = serve(vec![("600 Odd", ""), ("200 OK", "{}")]).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        control_plane(url)
            .post("v1/jobs/j/status", b"{}", deadline)
            .await
            .unwrap();
        assert_eq!(count.load(Ordering::SeqCst), 2);
        let (url, _) = serve(vec![("407 Proxy Authentication Required", "")]).await;
        let e = control_plane(url)
            .post("v1/jobs/j/status", b"{}", deadline)
            .await
            .unwrap_err();
        assert!(e.is_auth(), "{e}");
    }

    /// One job whose reports keep failing gets its share of the time, not all of it: the
    /// outboxes were flushed one after another against one deadline, so job `a`'s 503s held
    /// job `b`'s kept terminal status back on every run and every `recover`.
    #[tokio::test]
    async fn one_failing_outbox_does_not_hold_the_others_back() {
        let (url, count) = serve_with(|line| {
            Some(if line.contains("/jobs/a/") {
                ("503 Service Unavailable", "")
            } else {
                ("200 OK", "{}")
            })
        })
        .await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        for job in ["a", "b"] {
            let reporter = Reporter::new(Some(cp.clone()), state.clone(), job, 1);
            assert!(matches!(
                reporter.keep_unsent("status", 1, b"{}"),
                Delivery::Kept
            ));
        }
        let left =
            flush_all_outboxes(&cp, &state, Instant::now() + Duration::from_secs(12), None).await;
        assert_eq!(left, 1);
        assert!(!state.outbox_dir("b").exists(), "b's report was delivered");
        assert!(count.load(Ordering::SeqCst) >= 2);
    }

    /// With no control plane the reports go to `reports.jsonl`: 0600 whatever the umask, and
    /// a line a crash tore is ended before the next, which stays readable.
    #[tokio::test]
    async fn local_reports_are_private_and_a_torn_line_does_not_take_the_next() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        state.ensure_attempt_dir("loc", 1).unwrap();
        let path = state.attempt_dir("loc", 1).join("reports.jsonl");
        let reporter = Reporter::new(None, state.clone(), "loc", 1);
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        let sent = reporter
            .send("status", 1, br#"{"seq":1}"#.to_vec(), Instant::now())
            .await;
        nix::sys::stat::umask(old);
        assert!(matches!(sent, Delivery::Local));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut torn = std::fs::read(&path).unwrap();
        torn.truncate(torn.len() - 5);
        std::fs::write(&path, &torn).unwrap();
        reporter
            .send("status", 2, br#"{"seq":2}"#.to_vec(), Instant::now())
            .await;
        let text = std::fs::read_to_string(&path).unwrap();
        let last = text.lines().last().unwrap();
        let entry: serde_json::Value = serde_json::from_str(last).unwrap();
        assert!(entry.to_string().contains("seq"), "{text}");
    }

    /// A flush told to stop (recover halted, a run's end) while a kept registration's POST
    /// is under way ends after it: dropped inside it, the registration the control plane
    /// took stayed kept, and the next flush sent it again (its bytes counted twice).
    #[tokio::test]
    async fn a_stop_during_a_registrations_post_lets_it_finish() {
        let (url, requests) =
            serve_recorded(Duration::from_millis(1500), |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "reg", 1);
        reporter.keep_unsent("artifacts", 2, br#"{"attempt":1,"new_bytes":4096}"#);
        reporter.keep_unsent("status", 3, br#"{"attempt":1,"seq":3}"#);
        let stop = CancellationToken::new();
        let stopping = {
            let stop = stop.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.cancel();
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let flush = flush_all_outboxes(&cp, &state, deadline, Some(&stop));
        let (left, ()) = tokio::join!(flush, stopping);
        assert_eq!(left, 1, "the status after it waits for the next flush");
        let entries = sorted_entries(&state.outbox_dir("reg"), "reg").unwrap();
        assert_eq!(entries.len(), 1, "the registration delivered: {entries:?}");
        assert!(requests.lock().unwrap()[0].0.contains("/artifacts"));
        // The next flush sends the status alone.
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 0);
        let sent = requests.lock().unwrap();
        assert_eq!(sent.len(), 2, "{sent:?}");
        assert!(sent[1].0.contains("/status"));
    }

    /// The outbox of a job whose agent runs is that agent's to deliver: another flusher (a
    /// later job's start, `recover`) sent its registration, kept ahead of its sending, a
    /// second time.
    #[tokio::test]
    async fn a_running_jobs_outbox_is_left_to_its_agent() {
        let (url, count) = serve_with(|_| Some(("200 OK", "{}"))).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let lock = crate::statedir::AttemptLock::acquire(&state, "live", 1).unwrap();
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "live", 1);
        reporter.keep_unsent("artifacts", 3, b"{}");
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 1);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        drop(lock);
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 0);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// Reports a job kept for another control plane (its run record names it) stay in its
    /// outbox: a flush with another config sent them, under its own token, to its own one.
    #[tokio::test]
    async fn reports_kept_for_another_control_plane_stay() {
        let (url, count) = serve_with(|_| Some(("200 OK", "{}"))).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let record: c3_proto::RunRecord = serde_json::from_value(serde_json::json!({
            "spec": {"job_id": "away", "command": ["true"]},
            "workdir": "/w", "phase": "done", "seq": 3, "started_at": "x",
            "destination": {"store": "s3://b", "control_plane": "http://cp-a.example/api/"},
        }))
        .unwrap();
        state.write_record(&record).unwrap();
        let cp_a = control_plane("http://cp-a.example/api/".parse().unwrap());
        let reporter = Reporter::new(Some(cp_a), state.clone(), "away", 1);
        reporter.keep_unsent("status", 3, b"{}");
        // An older agent's entry says nothing of its control plane: its record does.
        let older = OutboxEntry::new("away", "v1/jobs/away/status".into(), b"{}");
        let path = state.outbox_dir("away").join("000001-00000004-status.json");
        write_atomic(&path, &older.to_json()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 1);
        assert_eq!(
            sorted_entries(&state.outbox_dir("away"), "away")
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            count.load(Ordering::SeqCst),
            0,
            "sent to another control plane"
        );
        assert!(state.outbox_dir("away").exists());
    }

    /// A kept registration's background delivery, superseded by the job's next status while
    /// its POST waited for the answer, was dropped mid-request: the control plane had taken
    /// it, the entry stayed, and the next flush sent it again (its bytes counted twice). The
    /// POST under way ends as it would; only then does the delivery stop.
    #[tokio::test]
    async fn a_superseded_delivery_never_drops_a_post_under_way() {
        let (url, requests) =
            serve_recorded(Duration::from_millis(800), |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        reporter.keep_unsent("artifacts", 3, br#"{"attempt":1,"new_bytes":1000}"#);
        let stop = CancellationToken::new();
        let delivering = {
            let (reporter, stop) = (reporter.clone(), stop.clone());
            tokio::spawn(async move { reporter.deliver_kept(&stop).await })
        };
        let began = Instant::now();
        while requests.lock().unwrap().is_empty() {
            assert!(began.elapsed() < Duration::from_secs(20), "never posted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        let _ = delivering.await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 0);
        assert_eq!(
            requests.lock().unwrap().len(),
            1,
            "the registration was sent twice"
        );
    }

    /// Kept entries go in the order their numbers say, not their names' text: a seq past
    /// 99,999,999 (after many set-aside records) is a wider name, which went first. An entry
    /// whose endpoint is not the one its place says (an absolute URL: the token would go
    /// there; not a URL at all: the flush panicked) is set aside, never posted.
    #[tokio::test]
    async fn kept_entries_go_in_number_order_and_only_to_their_own_endpoint() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        reporter.keep_unsent("status", 100_000_001, br#"{"attempt":1,"seq":100000001}"#);
        reporter.keep_unsent("status", 99_999_999, br#"{"attempt":1,"seq":99999999}"#);
        let outbox = state.outbox_dir("j");
        for (name, endpoint) in [
            (
                "000001-00000005-status.json",
                "http://elsewhere.example/steal",
            ),
            ("000001-00000006-status.json", "http://[::1"),
            ("000001-00000007-status.json", "v1/jobs/other/status"),
        ] {
            let entry = OutboxEntry::new("j", endpoint.into(), br#"{"attempt":1,"seq":5}"#);
            write_atomic(&outbox.join(name), &entry.to_json()).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 0);
        let sent: Vec<(String, String)> = requests.lock().unwrap().clone();
        let bodies: Vec<&str> = sent.iter().map(|(_, b)| b.as_str()).collect();
        assert_eq!(
            bodies,
            [
                r#"{"attempt":1,"seq":99999999}"#,
                r#"{"attempt":1,"seq":100000001}"#
            ],
            "{sent:?}"
        );
        assert!(sent
            .iter()
            .all(|(line, _)| line.contains("/api/v1/jobs/j/status")));
        for n in [5, 6, 7] {
            assert!(outbox
                .join(format!("000001-0000000{n}-status.bad"))
                .is_file());
        }
    }

    /// Two flushers of one outbox (two jobs starting after an outage, a run beside
    /// `recover`) each read the kept registration and posted it before either removed it;
    /// the control plane, which cannot tell one registration sent twice from two, counted
    /// its `new_bytes` twice. One holds the outbox now; the other leaves it to that one.
    #[tokio::test]
    async fn two_flushers_post_a_kept_registration_once() {
        let (url, requests) =
            serve_recorded(Duration::from_millis(300), |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        let registration = br#"{"attempt":1,"new_bytes":1000}"#;
        assert!(matches!(
            reporter.keep_unsent("artifacts", 3, registration),
            Delivery::Kept
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let (a, b) = tokio::join!(
            flush_all_outboxes(&cp, &state, deadline, None),
            flush_job_outbox(&cp, &state, "j", deadline),
        );
        let requests = requests.lock().unwrap().clone();
        assert_eq!(requests.len(), 1, "posted more than once: {requests:?}");
        assert!(
            requests[0].0.contains("/v1/jobs/j/artifacts"),
            "{requests:?}"
        );
        assert_eq!(
            (a, b),
            (0, true),
            "the second flusher waited for the first and found it delivered"
        );
        assert!(
            !state.outbox_dir("j").exists(),
            "the lock file went with the outbox"
        );
    }

    /// A registration's reply over quota is told (a kept one's too, delivered later: its
    /// warning went nowhere); one within its quota, without one, or unreadable is not.
    #[test]
    fn over_quota_is_read_from_a_registrations_reply() {
        let over = br#"{"storage_used_bytes":2,"storage_quota_bytes":1}"#;
        assert_eq!(over_quota(over), Some((2, 1)));
        assert_eq!(
            over_quota(br#"{"storage_used_bytes":1,"storage_quota_bytes":1}"#),
            None
        );
        assert_eq!(over_quota(br#"{"storage_used_bytes":9}"#), None);
        assert_eq!(over_quota(b"<html>"), None);
    }

    /// An outbox the agent may not trust (writable by others than root) is left at once, not
    /// polled as if another flusher held it until the send's deadline: every status of the
    /// job would wait that long before it was kept.
    #[tokio::test(start_paused = true)]
    async fn an_outbox_not_to_be_trusted_is_not_waited_for() {
        use std::os::unix::fs::PermissionsExt;
        let cp = control_plane("http://127.0.0.1:9".parse().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        reporter.keep_unsent("status", 2, br#"{"attempt":1,"seq":2}"#);
        let outbox = state.outbox_dir("j");
        std::fs::set_permissions(&outbox, std::fs::Permissions::from_mode(0o777)).unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_secs(30);
        assert!(!flush_job_outbox(&cp, &state, "j", deadline).await);
        assert_eq!(started.elapsed(), Duration::ZERO, "waited for nobody");
    }

    /// A job's next attempt (or a `resync`) under another control plane's config delivered
    /// the reports attempt 1 kept for its own one along with its own: `send` flushed the
    /// job's outbox without the check a flush of all of them makes. Attempt 1's stay, and
    /// hold none of attempt 2's back.
    #[tokio::test]
    async fn a_send_leaves_an_earlier_attempts_reports_for_its_control_plane() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        for (attempt, theirs) in [
            (1, "http://cp-a.example/api/".to_string()),
            (2, cp.shown_url()),
        ] {
            let record: c3_proto::RunRecord = serde_json::from_value(serde_json::json!({
                "spec": {"job_id": "again", "command": ["true"], "attempt": attempt},
                "workdir": "/w", "phase": "done", "seq": 3, "started_at": "x",
                "destination": {"store": "s3://b", "control_plane": theirs},
            }))
            .unwrap();
            state.write_record(&record).unwrap();
        }
        let cp_a = control_plane("http://cp-a.example/api/".parse().unwrap());
        let first = Reporter::new(Some(cp_a), state.clone(), "again", 1);
        first.keep_unsent("artifacts", 3, br#"{"attempt":1,"new_bytes":1000}"#);
        let second = Reporter::new(Some(cp.clone()), state.clone(), "again", 2);
        second.keep_unsent("status", 1, br#"{"attempt":2,"seq":1}"#);
        let deadline = Instant::now() + Duration::from_secs(5);
        let sent = second
            .send("status", 2, br#"{"attempt":2,"seq":2}"#.to_vec(), deadline)
            .await;
        assert!(matches!(sent, Delivery::Delivered(_)), "{sent:?}");
        let bodies: Vec<String> = requests
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(
            bodies,
            [r#"{"attempt":2,"seq":1}"#, r#"{"attempt":2,"seq":2}"#],
            "attempt 1's registration went to another control plane"
        );
        let left: Vec<PathBuf> = sorted_entries(&state.outbox_dir("again"), "again").unwrap();
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(
            left[0].ends_with("000001-00000003-artifacts.json"),
            "{left:?}"
        );
        assert!(state.run_record_path("again", 2).is_file());
        assert_eq!(flush_all_outboxes(&cp, &state, deadline, None).await, 1);

        // `resync` of attempt 1 under this config (the operator's move of the job here): its
        // own reports are this control plane's, though the attempt's record names the other.
        let resync = Reporter::new(Some(cp.clone()), state.clone(), "again", 1);
        resync.keep_unsent("status", 20, br#"{"attempt":1,"seq":20}"#);
        let sent = resync
            .send(
                "status",
                21,
                br#"{"attempt":1,"seq":21}"#.to_vec(),
                deadline,
            )
            .await;
        assert!(matches!(sent, Delivery::Delivered(_)), "{sent:?}");
        let bodies: Vec<String> = requests.lock().unwrap()[2..]
            .iter()
            .map(|(_, b)| b.clone())
            .collect();
        assert_eq!(
            bodies,
            [r#"{"attempt":1,"seq":20}"#, r#"{"attempt":1,"seq":21}"#]
        );
        assert_eq!(
            sorted_entries(&state.outbox_dir("again"), "again")
                .unwrap()
                .len(),
            1
        );
    }

    /// A keep cut short by a kill leaves its temp file; once it is stale, a flush removes it
    /// with the folder (it held the folder, and retention, for good).
    #[tokio::test]
    async fn a_stale_temp_file_does_not_hold_the_outbox() {
        let (url, _) = serve(vec![]).await;
        let dir = tempfile::tempdir().unwrap();
        let outbox = dir.path().join("outbox/j");
        std::fs::create_dir_all(&outbox).unwrap();
        let tmp = outbox.join(".c3-abc.tmp");
        std::fs::write(&tmp, b"{").unwrap();
        let young = outbox.join(".c3-new.tmp");
        let deadline = Instant::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - Duration::from_secs(600))
            .unwrap();
        let state = StateDir::new(dir.path());
        assert!(flush_job_outbox(&control_plane(url.clone()), &state, "j", deadline).await);
        assert!(!outbox.exists());
        std::fs::create_dir_all(&outbox).unwrap();
        std::fs::write(&young, b"{").unwrap();
        flush_job_outbox(&control_plane(url), &state, "j", deadline).await;
        assert!(young.exists(), "a keep under way is left alone");
    }

    /// An HTTP server on 127.0.0.1 that answers each request with the next of `replies`
    /// written as they are (status line, headers and body), then holds the connection for
    /// `hold` before closing it; records when each request came.
    pub(crate) async fn serve_raw(
        replies: Vec<&'static str>,
        hold: Duration,
    ) -> (url::Url, Arc<std::sync::Mutex<Vec<Instant>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            url::Url::parse(&format!("http://{}/api/", listener.local_addr().unwrap())).unwrap();
        let came = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = came.clone();
        tokio::spawn(async move {
            for reply in replies {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                read_request(&mut conn).await;
                seen.lock().unwrap().push(Instant::now());
                tokio::spawn(async move {
                    let _ = conn.write_all(reply.as_bytes()).await;
                    tokio::time::sleep(hold).await;
                });
            }
        });
        (url, came)
    }

    /// A 2xx whose body broke off (or stalled) after its status line was taken as not
    /// delivered: the same report went again until the deadline, a registration's bytes
    /// counted twice.
    #[tokio::test]
    async fn a_2xx_whose_body_breaks_off_is_delivered_once() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let broken = "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}";
        let (url, came) = serve_raw(vec![broken, broken], Duration::ZERO).await;
        let reply = control_plane(url)
            .post("v1/jobs/j/artifacts", b"{}", deadline)
            .await
            .unwrap();
        assert_eq!(&reply[..], b"{}");
        assert_eq!(came.lock().unwrap().len(), 1);
        // One that stalls is given up after a few seconds, delivered as well.
        let (url, came) = serve_raw(vec![broken, broken], Duration::from_secs(60)).await;
        let started = Instant::now();
        control_plane(url)
            .post("v1/jobs/j/artifacts", b"{}", deadline)
            .await
            .unwrap();
        assert_eq!(came.lock().unwrap().len(), 1);
        assert!(started.elapsed() < REPLY_BODY_READ + Duration::from_secs(2));
    }

    /// A throttled control plane's `Retry-After` is waited out: the next try came within it,
    /// after the backoff's 200 ms.
    #[tokio::test]
    async fn a_retry_after_is_honoured() {
        let (url, came) = serve_raw(
            vec![
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            ],
            Duration::ZERO,
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(20);
        control_plane(url)
            .post("v1/jobs/j/status", b"{}", deadline)
            .await
            .unwrap();
        let came = came.lock().unwrap();
        assert_eq!(came.len(), 2);
        assert!(came[1] - came[0] >= Duration::from_secs(2), "{came:?}");
    }

    /// A reporter of job `j`, attempt 1, sending to `url`, with a RUNNING (seq 1) kept in its
    /// outbox; the state dir's temp dir, which must outlive it.
    fn keeping_a_running(url: url::Url) -> (tempfile::TempDir, StateDir, Reporter) {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(control_plane(url)), state.clone(), "j", 1);
        reporter.keep_unsent("status", 1, &status(1, c3_proto::JobState::Running));
        (dir, state, reporter)
    }

    /// A RUNNING kept in the outbox that the control plane answers with a 500 for ever held
    /// every later status of the job back, its terminal one too. A later status of the
    /// attempt supersedes it: passed over once it failed, dropped once that one is delivered.
    #[tokio::test]
    async fn a_later_status_supersedes_a_kept_one_that_keeps_failing() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, body| {
            if body.contains(r#""seq":1"#) {
                ("500 Internal Server Error", "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let (_dir, state, reporter) = keeping_a_running(url);
        let deadline = Instant::now() + Duration::from_secs(3);
        let sent = reporter
            .send(
                "status",
                3,
                status(3, c3_proto::JobState::Succeeded),
                deadline,
            )
            .await;
        assert!(matches!(sent, Delivery::Delivered(_)), "{sent:?}");
        let requests = requests.lock().unwrap();
        assert!(requests.last().unwrap().1.contains(r#""seq":3"#));
        assert!(!state.outbox_dir("j").exists());
    }

    /// An entry the control plane fails on flush after flush (its own 500), for long
    /// enough, holds the other attempts' reports back no more; a terminal status stays kept
    /// all the same (moved aside, nothing ever sent it), and so does what its attempt kept
    /// after it. A 503 (maintenance) counts no failed flush.
    #[tokio::test]
    async fn an_entry_that_keeps_failing_holds_only_its_attempt_back_in_the_end() {
        let maintenance = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let in_maintenance = maintenance.clone();
        let (url, requests) = serve_recorded(Duration::ZERO, move |_, body| {
            if body.contains(r#""seq":3"#) {
                if in_maintenance.load(Ordering::SeqCst) {
                    ("503 Service Unavailable", "")
                } else {
                    ("500 Internal Server Error", "")
                }
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let first = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        first.keep_unsent("status", 3, br#"{"attempt":1,"seq":3,"state":"FAILED"}"#);
        first.keep_unsent("status", 4, br#"{"attempt":1,"seq":4,"state":"FAILED"}"#);
        let second = Reporter::new(Some(cp.clone()), state.clone(), "j", 2);
        second.keep_unsent("status", 1, br#"{"attempt":2,"seq":1}"#);
        let entry = state.outbox_dir("j").join("000001-00000003-status.json");
        let deadline = || Instant::now() + Duration::from_millis(1500);
        assert!(!flush_job_outbox(&cp, &state, "j", deadline()).await);
        assert!(
            !entry.with_extension(TRIES).exists(),
            "a 503 is no failed flush"
        );
        maintenance.store(false, Ordering::SeqCst);
        let before = requests.lock().unwrap().len();
        assert!(!flush_job_outbox(&cp, &state, "j", deadline()).await);
        assert_eq!(
            std::fs::read_to_string(entry.with_extension(TRIES)).unwrap(),
            "1"
        );
        // Young, it holds everything back however often it failed.
        write_atomic(&entry.with_extension(TRIES), b"30").unwrap();
        assert!(!flush_job_outbox(&cp, &state, "j", deadline()).await);
        assert!(
            requests.lock().unwrap()[before..]
                .iter()
                .all(|(_, b)| b.contains(r#""seq":3"#)),
            "only seq 3 was posted"
        );
        kept_at(&entry, std::time::SystemTime::now() - MIN_AGE_ASIDE);
        assert!(!flush_job_outbox(&cp, &state, "j", deadline()).await);
        assert!(entry.exists(), "a terminal status stays kept");
        assert!(!entry.with_extension("bad").exists());
        let left = sorted_entries(&state.outbox_dir("j"), "j").unwrap();
        assert_eq!(left.len(), 2, "attempt 1's, in order: {left:?}");
        let requests = requests.lock().unwrap();
        assert!(requests.last().unwrap().1.contains(r#""attempt":2"#));
        assert!(!requests.iter().any(|(_, b)| b.contains(r#""seq":4"#)));
    }

    /// Sets when the entry at `path` was kept (its mtime), for the ages of the outbox.
    fn kept_at(path: &Path, when: std::time::SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(when)
            .unwrap();
    }

    /// A report kept before the node's clock stepped back is counted as kept now, and its
    /// time put right: left in the future it stayed young (no fallback, never stuck, every
    /// later report of its job held behind it) until the clock caught up, a year here.
    #[test]
    fn a_report_kept_in_the_future_is_counted_as_kept_now() {
        let dir = tempfile::tempdir().unwrap();
        let entry = dir.path().join("000001-00000003-status.json");
        std::fs::write(&entry, "{}").unwrap();
        let year = Duration::from_secs(365 * 24 * 3600);
        kept_at(&entry, std::time::SystemTime::now() + year);
        assert_eq!(kept_for(&entry), Duration::ZERO);
        let kept = std::fs::metadata(&entry).unwrap().modified().unwrap();
        assert!(
            kept <= std::time::SystemTime::now(),
            "its time was put right"
        );
        kept_at(&entry, std::time::SystemTime::now() - MIN_AGE_ASIDE);
        assert!(is_old(&entry));
    }

    #[test]
    fn one_report_has_one_idempotency_key() {
        let k = idempotency_key("v1/jobs/j/artifacts", b"{}");
        assert_eq!(k, idempotency_key("v1/jobs/j/artifacts", b"{}"));
        assert_eq!(k.len(), 64);
        assert_ne!(k, idempotency_key("v1/jobs/k/artifacts", b"{}"));
        assert_ne!(k, idempotency_key("v1/jobs/j/artifacts", br#"{"a":1}"#));
        // Posted from its struct, then kept and sent again from the outbox: one report.
        let sent = status(3, c3_proto::JobState::Failed);
        let kept = c3_proto::record::OutboxEntry::new("j", "e".into(), &sent).body_json();
        assert_ne!(sent, kept, "the outbox writes its keys in another order");
        assert_eq!(idempotency_key("e", &sent), idempotency_key("e", &kept));
    }

    /// A gateway's 502 to one body, while the control plane answers others, counts a failed
    /// flush (and in time the terminal status goes without its result); while it answers
    /// nothing (an outage behind the proxy) it does not.
    #[tokio::test]
    async fn a_gateway_error_on_one_body_counts_when_the_control_plane_answers_others() {
        let (url, requests) = serve_recorded(Duration::ZERO, move |_, body| {
            if body.contains(r#""result":{"#) || body.contains("down") {
                ("502 Bad Gateway", "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let body = br#"{"attempt":1,"seq":3,"state":"SUCCEEDED","reason":null,"retryable":false,"exit_code":0,"signal":null,"message":null,"upload_errors":0,"warnings":[],"result":{"a":1},"time":"2026-01-01T00:00:00Z"}"#;
        let w = Reporter::new(Some(cp.clone()), state.clone(), "w", 1);
        w.keep_unsent("status", 3, body);
        let entry = state.outbox_dir("w").join("000001-00000003-status.json");
        let tries = || std::fs::read_to_string(entry.with_extension(TRIES)).ok();
        let deadline = || Instant::now() + Duration::from_secs(1);
        // Nothing answered yet: an outage, not counted.
        assert!(!flush_job_outbox(&cp, &state, "w", deadline()).await);
        assert_eq!(tries(), None);
        // Only another kind of endpoint answers (registrations, live output): behind the
        // gateway the status service may be the one down. Not counted.
        let r = Reporter::new(Some(cp.clone()), state.clone(), "r", 1);
        r.keep_unsent("artifacts", 1, br#"{"attempt":1,"new_bytes":1}"#);
        assert!(flush_job_outbox(&cp, &state, "r", deadline()).await);
        assert!(!flush_job_outbox(&cp, &state, "w", deadline()).await);
        assert_eq!(tries(), None);
        // Another job's status goes: the control plane is up.
        let a = Reporter::new(Some(cp.clone()), state.clone(), "a", 1);
        a.keep_unsent("status", 1, br#"{"attempt":1,"seq":1}"#);
        flush_all_outboxes(&cp, &state, Instant::now() + Duration::from_secs(3), None).await;
        assert_eq!(tries().as_deref(), Some("1"));
        kept_at(&entry, std::time::SystemTime::now() - FALLBACK_MIN_AGE);
        write_atomic(&entry.with_extension(TRIES), b"2").unwrap();
        let a = Reporter::new(Some(cp.clone()), state.clone(), "a", 2);
        a.keep_unsent("status", 1, br#"{"attempt":2,"seq":1}"#);
        flush_all_outboxes(&cp, &state, Instant::now() + Duration::from_secs(3), None).await;
        let requests = requests.lock().unwrap();
        assert!(
            requests
                .iter()
                .any(|(_, b)| b.contains(r#""seq":3"#) && b.contains(r#""result":null"#)),
            "the terminal status went without its result"
        );
        assert!(!entry.exists());
    }

    /// A terminal status the control plane fails on every time counts its failed flushes,
    /// whatever the last try met, and after a week it is moved aside: kept for ever, it held
    /// the job's data on the node and half of every flush.
    #[tokio::test]
    async fn a_report_failed_on_for_a_week_goes_aside_in_the_end() {
        let (url, requests) = serve_recorded(Duration::ZERO, move |_, body| {
            if body.contains(r#""seq":3"#) {
                ("500 Internal Server Error", "")
            } else {
                ("200 OK", "{}")
            }
        })
        .await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let first = Reporter::new(Some(cp.clone()), state.clone(), "w", 1);
        first.keep_unsent("status", 3, br#"{"attempt":1,"seq":3,"state":"FAILED"}"#);
        let entry = state.outbox_dir("w").join("000001-00000003-status.json");
        let deadline = || Instant::now() + Duration::from_secs(2);
        assert!(!flush_job_outbox(&cp, &state, "w", deadline()).await);
        assert_eq!(
            std::fs::read_to_string(entry.with_extension(TRIES)).unwrap(),
            "1",
            "a server error counts"
        );
        write_atomic(&entry.with_extension(TRIES), b"30").unwrap();
        kept_at(&entry, std::time::SystemTime::now() - MAX_AGE_STUCK);
        let second = Reporter::new(Some(cp.clone()), state.clone(), "w", 2);
        second.keep_unsent("status", 1, br#"{"attempt":2,"seq":1}"#);
        assert!(flush_job_outbox(&cp, &state, "w", deadline()).await);
        assert!(!entry.exists() && entry.with_extension("bad").exists());
        assert!(requests
            .lock()
            .unwrap()
            .last()
            .unwrap()
            .1
            .contains(r#""attempt":2"#));
    }

    /// An endpoint an ingress redirects for good (308: never followed, the token would go
    /// with the body) counts its failed flushes as a server error does: never counted, the
    /// report and every later one of its job stayed for ever.
    #[tokio::test]
    async fn a_report_redirected_for_good_goes_aside_in_the_end() {
        // An ALB's "redirect to HTTPS" says 302 for ever as well.
        for redirect in ["308 Permanent Redirect", "302 Found"] {
            a_report_redirected_goes_aside(redirect).await;
        }
    }

    async fn a_report_redirected_goes_aside(redirect: &'static str) {
        let (url, _) = serve_recorded(Duration::ZERO, move |_, _| (redirect, "")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "r", 1);
        let body = status(3, c3_proto::JobState::Failed);
        let mut body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        body["result"] = serde_json::json!({"acc": 0.9});
        reporter.keep_unsent("status", 3, &serde_json::to_vec(&body).unwrap());
        let entry = state.outbox_dir("r").join("000001-00000003-status.json");
        let deadline = || Instant::now() + Duration::from_secs(1);
        assert!(!flush_job_outbox(&cp, &state, "r", deadline()).await);
        assert_eq!(
            std::fs::read_to_string(entry.with_extension(TRIES)).unwrap(),
            "1",
            "{redirect} counts"
        );
        write_atomic(&entry.with_extension(TRIES), b"30").unwrap();
        kept_at(&entry, std::time::SystemTime::now() - MAX_AGE_STUCK);
        flush_job_outbox(&cp, &state, "r", deadline()).await;
        assert!(!entry.exists() && entry.with_extension("bad").exists());
        // The control plane never saw the body: its result was not dropped for a refusal.
        let aside = std::fs::read_to_string(entry.with_extension("bad")).unwrap();
        assert!(aside.contains("0.9"), "{aside}");
    }

    /// A gateway's 502 to a body on an idle node (nothing else sent, so the control plane is
    /// never heard and the 502 never counts): after a week the report goes aside, as one
    /// failed on for a week does, rather than hold its job's data on the node for ever.
    #[tokio::test]
    async fn a_gateway_error_for_a_week_on_an_idle_node_goes_aside() {
        let (url, _) = serve_recorded(Duration::ZERO, |_, _| ("502 Bad Gateway", "")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "idle", 1);
        reporter.keep_unsent("status", 3, br#"{"attempt":1,"seq":3,"state":"FAILED"}"#);
        let entry = state.outbox_dir("idle").join("000001-00000003-status.json");
        let deadline = || Instant::now() + Duration::from_secs(1);
        assert!(!flush_job_outbox(&cp, &state, "idle", deadline()).await);
        assert!(entry.exists(), "a fresh one stays");
        kept_at(&entry, std::time::SystemTime::now() - MAX_AGE_STUCK);
        flush_job_outbox(&cp, &state, "idle", deadline()).await;
        assert!(!entry.exists() && entry.with_extension("bad").exists());
    }

    /// Refused credentials keep a report (a token renewed soon delivers it), but not for
    /// ever: a week on, it goes aside as a report failed on for a week does.
    #[tokio::test]
    async fn a_report_refused_credentials_for_a_week_goes_aside() {
        let (url, _) = serve_recorded(Duration::ZERO, |_, _| ("401 Unauthorized", "")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "a", 1);
        reporter.keep_unsent("status", 3, br#"{"attempt":1,"seq":3,"state":"FAILED"}"#);
        let entry = state.outbox_dir("a").join("000001-00000003-status.json");
        let deadline = || Instant::now() + Duration::from_secs(2);
        assert!(!flush_job_outbox(&cp, &state, "a", deadline()).await);
        assert!(entry.exists(), "a fresh one stays");
        // Kept a week (through an outage), then refused once: the refusals are what count.
        kept_at(&entry, std::time::SystemTime::now() - MAX_AGE_STUCK);
        flush_job_outbox(&cp, &state, "a", deadline()).await;
        assert!(entry.exists(), "a week-old report refused once stays");
        let week_ago = std::time::SystemTime::now() - MAX_AGE_STUCK;
        let secs = week_ago
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        write_atomic(
            &entry.with_extension(REFUSED),
            format!("{secs} 30").as_bytes(),
        )
        .unwrap();
        flush_job_outbox(&cp, &state, "a", deadline()).await;
        assert!(!entry.exists() && entry.with_extension("bad").exists());
        assert!(!entry.with_extension(REFUSED).exists());
    }

    /// Under a umask of 000 (`private_files = false` keeps the one the agent was started
    /// with) the outbox folder was made 0777, and every flush refused it as a folder others
    /// may write: its reports were never sent.
    #[tokio::test]
    async fn an_outbox_made_under_an_open_umask_is_private_and_flushed() {
        use std::os::unix::fs::PermissionsExt;
        let (url, requests) = serve_recorded(Duration::ZERO, |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "um", 1);
        // nextest runs each test in a process of its own: the umask is this test's.
        let before = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
        reporter.keep_unsent("status", 3, br#"{"attempt":1,"seq":3}"#);
        nix::sys::stat::umask(before);
        for made in [
            state.outbox_dir("um"),
            state.outbox_dir("um").parent().unwrap().into(),
        ] {
            let mode = std::fs::metadata(&made).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o700, "{}", made.display());
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        assert!(flush_job_outbox(&cp, &state, "um", deadline).await);
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    /// A read of an entry or a listing of the outbox that failed once (EIO) moved the entry
    /// aside for good, or took the outbox for delivered; both stay for the next flush.
    #[tokio::test]
    async fn a_passing_read_error_leaves_the_outbox_as_it_is() {
        let (url, requests) = serve_recorded(Duration::ZERO, |_, _| ("200 OK", "{}")).await;
        let cp = control_plane(url);
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "eio", 1);
        reporter.keep_unsent("status", 3, br#"{"attempt":1,"seq":3}"#);
        let deadline = Instant::now() + Duration::from_secs(5);
        for point in ["outbox-read-eio", "outbox-list-eio"] {
            let armed = crate::fault::arm(point, "eio");
            assert!(
                !flush_job_outbox(&cp, &state, "eio", deadline).await,
                "{point}"
            );
            drop(armed);
            let left = sorted_entries(&state.outbox_dir("eio"), "eio").unwrap();
            assert_eq!(left.len(), 1, "{point}: {left:?}");
        }
        assert!(requests.lock().unwrap().is_empty());
        assert!(flush_job_outbox(&cp, &state, "eio", deadline).await);
        assert_eq!(requests.lock().unwrap().len(), 1);
    }

    fn status(seq: u64, state: c3_proto::JobState) -> Vec<u8> {
        c3_proto::StatusReport::plain(1, seq, state, "t".into()).to_json()
    }

    /// A control plane that refuses connections, as one down for a day does.
    async fn refused() -> ControlPlane {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let at = listener.local_addr().unwrap();
        drop(listener);
        control_plane(format!("http://{at}/api/").parse().unwrap())
    }

    /// An outage of a day or more (every flush failing on a refused connection) moved a
    /// job's terminal status aside (`.bad`) for good: nothing ever sent it.
    #[tokio::test]
    async fn an_outage_never_moves_a_terminal_status_aside() {
        let cp = refused().await;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let reporter = Reporter::new(Some(cp.clone()), state.clone(), "j", 1);
        reporter.keep_unsent("status", 3, &status(3, c3_proto::JobState::Failed));
        let entry = state.outbox_dir("j").join("000001-00000003-status.json");
        write_atomic(&entry.with_extension(TRIES), b"30").unwrap();
        kept_at(&entry, std::time::SystemTime::now() - 2 * MIN_AGE_ASIDE);
        let deadline = Instant::now() + Duration::from_millis(500);
        let flushed = flush_job_outbox(&cp, &state, "j", deadline).await;
        assert!(entry.exists(), "the terminal status is still kept");
        assert!(!entry.with_extension("bad").exists());
        assert!(!flushed);
        assert_eq!(
            std::fs::read_to_string(entry.with_extension(TRIES)).unwrap(),
            "30",
            "a refused connection is no failed flush"
        );
    }

    /// A kept RUNNING whose answer was slow (the control plane still working on it) was
    /// passed over on its time-out: the terminal status went and was answered, and then the
    /// control plane finished the RUNNING, after it.
    #[tokio::test]
    async fn a_status_timed_out_is_not_overtaken_by_a_later_one() {
        let (url, log) = serve_slow_first().await;
        let (_dir, state, reporter) = keeping_a_running(url);
        let deadline = Instant::now() + Duration::from_secs(4);
        let sent = reporter
            .send("status", 3, status(3, c3_proto::JobState::Failed), deadline)
            .await;
        // Until the control plane has answered seq 1.
        let until = Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().contains(&"answered 1".to_string()) {
            assert!(Instant::now() < until, "{:?}", log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let log = log.lock().unwrap().clone();
        let answered_1 = log.iter().position(|e| e == "answered 1").unwrap();
        match log.iter().position(|e| e == "came 3") {
            Some(came_3) => assert!(came_3 > answered_1, "{log:?}"),
            None => {
                assert!(matches!(sent, Delivery::Kept), "{sent:?}");
                let left = sorted_entries(&state.outbox_dir("j"), "j").unwrap();
                assert_eq!(left.len(), 2, "both kept, in order: {left:?}");
            }
        }
    }

    /// A server that answers seq 1 after 3 s and anything else at once, several at once;
    /// logs "came N" and "answered N" as they happen.
    async fn serve_slow_first() -> (url::Url, Arc<std::sync::Mutex<Vec<String>>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url =
            url::Url::parse(&format!("http://{}/api/", listener.local_addr().unwrap())).unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = log.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen.clone();
                tokio::spawn(async move {
                    let (_, body) = read_request(&mut conn).await;
                    let seq = serde_json::from_str::<serde_json::Value>(&body).unwrap()["seq"]
                        .as_u64()
                        .unwrap();
                    seen.lock().unwrap().push(format!("came {seq}"));
                    if seq == 1 {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    seen.lock().unwrap().push(format!("answered {seq}"));
                    write_reply(&mut conn, "200 OK", "{}").await;
                });
            }
        });
        (url, log)
    }

    /// A terminal status the control plane refused (400) left the kept RUNNING it
    /// superseded in the outbox, with nothing behind it: posted later, after the terminal.
    #[tokio::test]
    async fn a_rejected_status_settles_the_ones_it_superseded() {
        let (url, _) = serve_recorded(Duration::ZERO, |_, body| {
            if body.contains(r#""seq":1"#) {
                ("500 Internal Server Error", "")
            } else {
                ("400 Bad Request", "no")
            }
        })
        .await;
        let (_dir, state, reporter) = keeping_a_running(url);
        let deadline = Instant::now() + Duration::from_secs(5);
        let sent = reporter
            .send("status", 3, status(3, c3_proto::JobState::Failed), deadline)
            .await;
        assert!(matches!(sent, Delivery::Rejected), "{sent:?}");
        let left = sorted_entries(&state.outbox_dir("j"), "j").unwrap_or_default();
        assert!(left.is_empty(), "{left:?}");
    }
}
