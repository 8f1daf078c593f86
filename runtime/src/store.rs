//! The content-addressed store (contract §6) on top of `object_store`.
//!
//! Retry policy, in two layers with distinct jobs:
//! * object_store's own `RetryConfig` retries one HTTP request a few times, quickly
//!   (connection errors, 5xx, 429), as it would for any client, but for a blob's
//!   create-if-absent PUT (`BlobStore::creator`);
//! * every operation of [`BlobStore`] is retried here, with exponential backoff and jitter
//!   (`backon`), for as long as `retry_deadline` allows, whenever the failure is transient:
//!   transport errors, 5xx, 429/SlowDown, a reset mid-body (which object_store does not retry
//!   for a PUT), a 404 to a write (the preflight found the bucket: a proxy's blip). Permanent
//!   errors (403, 404 to a read, 400 and the other 4xx but [`TRANSIENT_4XX`], a redirect to
//!   another origin, a file store path that is read-only or not a directory) fail at once. So "the network blinked" never becomes UPLOAD_ERROR; only
//!   "the store really refused" or "it stayed down past the deadline" does. The deadline is
//!   the outage's, shared by every operation: a try made during an outage is cut at it, and
//!   past it operations fail without a try but for one probe at a time.
//!   One WARN marks the start of an outage and one its end, never a line per retry.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as StorePath;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ClientConfigKey, GetResult, MultipartUpload, ObjectStore, ObjectStoreExt,
    PutMode, PutPayload, RetryConfig,
};

/// SHA-256 of zero bytes: the blob the preflight check writes (a real, valid blob).
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `file:///abs`, `s3://bucket[/prefix]`, `gs://…`, `az://…`.
    pub url: String,
    /// Passed to the scheme's object_store builder (`aws_endpoint`, …).
    pub options: BTreeMap<String, String>,
    /// Retries per request (remote stores only).
    pub max_retries: usize,
    /// Give up retrying one request after this long.
    pub retry_timeout: Duration,
    /// How long the store may fail (an outage, counted from its first failed try) before
    /// operations do: transient failures are retried until then, and no try outlasts it.
    pub retry_deadline: Duration,
    /// Opened only to read (`ls`, `pull`, `logs`, `status`): a file store root does not
    /// write to is not held to root's rules ([`vet_file_root`]). An operator looking as root
    /// at a user's own store (a non-root agent's, under Slurm) was refused it.
    pub reads_only: bool,
}

#[cfg(test)]
impl StoreConfig {
    /// A store at `url` for unit tests: no options, no request retries, 1 s deadlines.
    pub(crate) fn for_tests(url: &str) -> StoreConfig {
        StoreConfig {
            url: url.into(),
            options: BTreeMap::new(),
            max_retries: 0,
            retry_timeout: Duration::from_secs(1),
            retry_deadline: Duration::from_secs(1),
            reads_only: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store url `{url}`: {problem}")]
    BadUrl { url: String, problem: String },
    #[error("store option `{key}` is not an option of the {scheme} store{}", did_you_mean(.key, .scheme))]
    BadOption { key: String, scheme: &'static str },
    /// A file store root acts on by path (blobs, staging shards, manifests) that someone else
    /// may write: they could plant symlinks root writes through, forged manifests, or blobs.
    #[error("`store.url`: the file store {path} is refused: {why}; the agent runs as root and writes there by path, so only root (or the user root_squash makes it there) may write it and every directory above it (chown root and chmod go-w, or name another store.url)")]
    UnsafeRoot { path: String, why: String },
    #[error("cannot create the store directory {path}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("store: cannot configure {scheme} store")]
    Build {
        scheme: &'static str,
        #[source]
        source: object_store::Error,
    },
    #[error("`{key}` is {size} bytes or more, over the limit of {max} (store.max_manifest_bytes)")]
    TooLarge { key: String, size: u64, max: u64 },
    #[error("no S3 credentials found ({why}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials, or store.options aws_access_key_id/aws_secret_access_key")]
    NoCredentials { why: String },
    #[error("store: create-if-absent of `{key}` was refused as existing, but {found}; retrying")]
    NotThere { key: String, found: String },
    #[error("`{key}` kept changing under other writers while it was being written")]
    Contended { key: String },
    /// The store has been failing for longer than `retry_deadline`: the operation was not
    /// tried, or its try was cut at the deadline (a request that takes minutes to fail).
    #[error("store {}: it has been failing for {failing_secs} s, past store.retry_deadline_secs ({deadline_secs}); its latest failure: {latest}",
        if *.tried { "did not answer by the retry deadline" } else { "not tried" })]
    PastDeadline {
        tried: bool,
        failing_secs: u64,
        deadline_secs: u64,
        latest: String,
    },
    #[error("store {op} of `{key}` failed")]
    Op {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
    /// A 404 that does not say the key is absent, retried as a blip: a write's (S3's
    /// NoSuchBucket, or a proxy's own 404: see [`write_error`]), a blob read's without the
    /// store's own code, or a dataset manifest's ([`BlobStore::listed_read_error`]).
    #[error("store {op} of `{key}` was answered \"not found\"")]
    BareNotFound {
        op: &'static str,
        key: String,
        #[source]
        source: object_store::Error,
    },
}

/// Runs a file store's blocking call off the reactor, cut at `limit`
/// ([`crate::filestore::bounded`]: a hung network file system never returns, and its thread
/// is abandoned); its I/O error is the store's, as object_store's `LocalFileSystem` reports
/// one (so `is_permanent` judges it the same way; a time-out is transient).
async fn local_blocking<T: Send + 'static>(
    op: &'static str,
    key: &str,
    limit: Duration,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    let call = async move {
        // The fault `file-store-hang:<op>` is `bounded`'s, as for every file store call.
        let ran = tokio::task::spawn_blocking(f)
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        ran.map_err(|e| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        })
    };
    crate::filestore::bounded(op, limit, call)
        .await
        .map_err(|source| StoreError::Op {
            op,
            key: key.to_string(),
            source,
        })
}

/// The error of a store's builder. object_store names the URL whole in some (`az://c:PW@host`
/// "did not match any known pattern"), and a config error goes to the journal: one that
/// does is said with the URL as [`crate::display::shown_url`] shows it.
fn build_error(
    scheme: &'static str,
    source: object_store::Error,
    url: &str,
    shown: &str,
) -> StoreError {
    let text = crate::error_chain(&source);
    if url != shown && text.contains(url) {
        return StoreError::BadUrl {
            url: shown.to_string(),
            problem: text.replace(url, shown),
        };
    }
    StoreError::Build { scheme, source }
}

/// The error of a write (`op` of `key`). A 404 to a write is not the key missing (a write
/// makes it): it is the bucket, which the preflight found there, or a proxy or load
/// balancer between that answered for a moment with its own 404. Retried until the retry
/// deadline, not failed at once: one such blip failed a file UPLOAD_ERROR.
fn write_error(op: &'static str, key: &str, source: object_store::Error) -> StoreError {
    let key = key.to_string();
    match source {
        object_store::Error::NotFound { .. } => StoreError::BareNotFound { op, key, source },
        source => StoreError::Op { op, key, source },
    }
}

/// How long [`BlobStore::upload_still_open`] waits for its answer.
const UPLOAD_PROBE_LIMIT: Duration = Duration::from_secs(60);

/// How often a streamed blob may break off in a row with no byte between before the
/// stream fails.
const MAX_STREAM_RESUMES: u32 = 3;

/// How a store says the bucket (container) a request names is not there.
const NO_BUCKET_CODES: &[&str] = &[
    "<Code>NoSuchBucket</Code>",
    "<Code>ContainerNotFound</Code>",
    "bucket does not exist",
];

/// How a remote store says a key it was asked to read is not there.
const ABSENT_CODES: &[&str] = &[
    "<Code>NoSuchKey</Code>",
    "<Code>BlobNotFound</Code>",
    "No such object",
];

/// The code S3 (and GCS's XML API, which the multipart uploads use) answers with a 404 to
/// a request naming an upload it no longer knows.
const NO_SUCH_UPLOAD: &str = "NoSuchUpload";

/// The error of a request naming a multipart upload (`op` of `key`: a part, its complete,
/// its abort). A 404 is the upload gone ([`upload_gone`]) only when the store says so;
/// any other (a proxy's or load balancer's own, with no body) is a blip, as a 404 to any
/// write is ([`write_error`]): taken for NoSuchUpload, one aborted the upload and sent every
/// part again, the third failed the file, and one to an abort dropped the journal of an
/// upload still open, its parts billed. Azure's uploads (blocks of the blob itself) have no
/// such answer: a 404 there is never the upload gone.
fn upload_error(op: &'static str, key: &str, source: object_store::Error) -> StoreError {
    match source {
        object_store::Error::NotFound { .. } if says(&source, NO_SUCH_UPLOAD) => StoreError::Op {
            op,
            key: key.to_string(),
            source,
        },
        source => write_error(op, key, source),
    }
}

impl StoreError {
    /// A read answered "not found" (by the store, or by whatever stands before it: see
    /// [`BlobStore::says_absent`]).
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            StoreError::Op {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }

    /// Whether the write that failed with it may yet have been done by the store: its
    /// answer lost after the request went (a time-out, a reset, a 500 or a gateway's 502 or
    /// 504). Not a request the store refused unprocessed: a throttle (503, 429), a 4xx, one
    /// that never reached it (a refused connection, a name that does not resolve).
    pub fn may_have_been_applied(&self) -> bool {
        let StoreError::Op { source, .. } = self else {
            return false;
        };
        let text = crate::error_chain(source);
        match http_status(&text) {
            Some(status) => matches!(status, 500 | 502 | 504),
            None => !["tcp connect error", "dns error", "(Connect)"]
                .iter()
                .any(|t| text.contains(t)),
        }
    }

    /// A permanent error will not go away by retrying: fail fast instead of
    /// burning the retry budget (missing bucket, denied, bad credentials, bad config).
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::BadUrl { .. }
            | StoreError::BadOption { .. }
            | StoreError::UnsafeRoot { .. }
            | StoreError::CreateDir { .. }
            | StoreError::Build { .. }
            | StoreError::TooLarge { .. }
            | StoreError::NoCredentials { .. } => true,
            StoreError::NotThere { .. }
            | StoreError::Contended { .. }
            | StoreError::PastDeadline { .. }
            | StoreError::BareNotFound { .. } => false,
            // Denied, but for the request's date: the clock will be set (NTP had not synced
            // at boot), so it goes through the outage and its deadline.
            StoreError::Op { .. } if self.clock_skewed() => false,
            StoreError::Op { source, .. } => {
                matches!(
                    source,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                        | object_store::Error::NotSupported { .. }
                        | object_store::Error::NotImplemented { .. }
                        | object_store::Error::InvalidPath { .. }
                ) || permanent_cause(source, is_local(source))
            }
        }
    }

    /// A store (or a gateway before it) that ignored a request's Range: a full 200, or other
    /// bytes than asked for.
    pub fn is_range_refusal(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = cur {
            if text_is_range_refusal(err) {
                return true;
            }
            cur = err.source();
        }
        false
    }

    /// A HEAD refused for lack of permission (a write-only bucket policy): the store will
    /// not say what a key holds, whatever is tried again.
    pub fn is_head_denied(&self) -> bool {
        matches!(
            self,
            StoreError::Op {
                op: "head",
                source: object_store::Error::PermissionDenied { .. },
                ..
            }
        ) && !self.clock_skewed()
    }

    /// The store refused the request for its date, too far off the store's clock
    /// ([`CLOCK_SKEW`]): a denial that says nothing of the node's permissions. Read in the
    /// denial's reply only: the key is in the error's text too, and a job named
    /// `RequestTimeTooSkewed` made any 403 on its keys a clock retried for the outage's
    /// deadline (a dataset reference denied failed after 600 s, not at once).
    pub fn clock_skewed(&self) -> bool {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(err) = cur {
            if let Some(object_store::Error::PermissionDenied { source, .. }) = err.downcast_ref() {
                let reply: &(dyn std::error::Error + 'static) = source.as_ref();
                return CLOCK_SKEW.iter().any(|needle| says(reply, needle));
            }
            cur = err.source();
        }
        false
    }
}

/// The store no longer knows the upload (S3's NoSuchUpload): completed already, or aborted.
/// Only the store's word for it ([`upload_error`]), not any 404.
pub(crate) fn upload_gone(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Op {
            source: object_store::Error::NotFound { .. },
            ..
        }
    ) && says(e, NO_SUCH_UPLOAD)
}

/// Whether a file store call failed for time: it did not return, or found no call slot
/// ([`crate::filestore::bounded`]).
fn timed_out(e: &StoreError) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Whether the error comes from the file store (object_store's `LocalFileSystem`, or ours).
fn is_local(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { store, .. } if *store == "LocalFileSystem")
}

/// Causes that no retry cures, found anywhere in an error's chain: a file store (`local`)
/// that is read-only, denied or not a directory, an HTTP 4xx that object_store does not type
/// (but [`TRANSIENT_4XX`]), and a redirect to another origin. For a remote store an I/O error is the node's network: a `connect` refused
/// with EPERM by a full conntrack table or a firewall being reloaded passes, so it is
/// retried (the store's own refusals come as HTTP statuses).
fn permanent_cause(e: &(dyn std::error::Error + 'static), local: bool) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let (true, Some(io)) = (local, err.downcast_ref::<std::io::Error>()) {
            if matches!(
                io.kind(),
                std::io::ErrorKind::PermissionDenied
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::NotADirectory
            ) {
                return true;
            }
        }
        // A store that ignores a Range request (a full 200, or other bytes than asked for)
        // will not start honouring it on a retry.
        if text_is_range_refusal(err) {
            return true;
        }
        // S3's answer to a request for a bucket of another region (a `301 PermanentRedirect`
        // without a Location): the next try goes to the same wrong place.
        if err
            .to_string()
            .contains("Received redirect without LOCATION")
        {
            return true;
        }
        // Not followed, and the next try is sent where it was refused again.
        if err
            .downcast_ref::<crate::httpcap::RedirectedAway>()
            .is_some()
        {
            return true;
        }
        // object_store's RetryError is not nameable outside the crate; its text is stable:
        // "Server returned non-2xx status code: 400 Bad Request: ...", with the body after it.
        let text = err.to_string();
        match http_status(&text) {
            Some(400) => return !TRANSIENT_400.iter().any(|code| text.contains(code)),
            // A proxy's 413 (nginx's client_max_body_size), a 405, 411, 414, 431: each try
            // is refused the same way, and was retried until the deadline.
            Some(status @ 401..=499) => return !TRANSIENT_4XX.contains(&status),
            // The store does not do what was asked (a checksum or encryption header it does
            // not know, an HTTP version): each try was refused alike, its body sent again
            // each time, until the deadline. A 501 to a condition is met before this.
            Some(501 | 505) => return true,
            _ => {}
        }
        cur = err.source();
    }
    false
}

/// The HTTP status object_store's error text names, if any.
fn http_status(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("status code: ")?;
    rest.get(..3)?.parse().ok()
}

/// 4xx statuses that a later try may not get: a request timed out (408), a conflict or a
/// failed condition another writer causes (409, 412), a connection reused for the wrong host
/// (421), a lock (423), too early (425), throttling (429); and a 404, which object_store
/// types, to a write a blip ([`write_error`]).
const TRANSIENT_4XX: &[u16] = &[404, 408, 409, 412, 421, 423, 425, 429];

fn text_is_range_refusal(err: &(dyn std::error::Error + 'static)) -> bool {
    let text = err.to_string();
    text.contains("Received non-partial response when range requested")
        || text.contains("Content-Range header not present in partial response")
        || (text.starts_with("Requested ") && text.contains(", got "))
}

/// Whether `e` or any of its sources mentions `needle` (an S3 error code in the body).
pub(crate) fn says(e: &(dyn std::error::Error + 'static), needle: &str) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.to_string().contains(needle) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// S3 error codes that come with a 400 and yet are blips: the connection stalled or broke
/// mid-body (`RequestTimeout`, `IncompleteBody`), or a session token ran out a moment before
/// object_store refreshed it (`ExpiredToken`).
const TRANSIENT_400: &[&str] = &[
    "<Code>RequestTimeout</Code>",
    "<Code>IncompleteBody</Code>",
    "<Code>ExpiredToken</Code>",
];

/// What a store answers a request signed by a clock far off its own (15 minutes for both):
/// S3's 403 `RequestTimeTooSkewed`, and Azure's 403 `AuthenticationFailed` detailed "Request
/// date header too old". aws-cli corrects for it from the reply's Date; object_store cannot.
/// As the reply's XML spells them: the request's URL (its key) is in the same text, and
/// there `<`, `>` and spaces are escaped.
const CLOCK_SKEW: &[&str] = &[
    "<Code>RequestTimeTooSkewed</Code>",
    "<AuthenticationErrorDetail>Request date header too old",
];

/// S3 error codes that say the bytes the store got are not the bytes sent (their checksum
/// does not match): corruption on the way, which a resend cures, or a store that mishandles
/// the checksum, which no resend does. So a few tries, then permanent, unless a resend has
/// cured one since the agent started ([`Retry::corruption_cured`]): then the path corrupts
/// at random (a middlebox mangling 1 body in 5 made 0.8% of operations fail for good after
/// three unlucky tries, a 1,000-part checkpoint UPLOAD_ERROR), and it gets three times the
/// tries (within the deadline).
const CORRUPT_IN_TRANSIT: &[&str] = &["<Code>BadDigest</Code>", "<Code>InvalidDigest</Code>"];
const CORRUPT_TRIES: u32 = 3;

/// How many times a whole operation's try that failed after half a deadline of work (a
/// staged upload's long copy) gets a deadline from its failure ([`BlobStore::retrying_whole`]).
const WHOLE_LATE_FAILURES: u32 = 3;

impl StoreError {
    /// A failure whose cause is this node, not the store: what its operator should look at
    /// ("" if none known), said where it fails and in the outage's WARN line.
    pub fn node_hint(&self) -> &'static str {
        if self.clock_skewed() {
            " (this node's clock may be off: the store says it is more than 15 minutes off its own; check its time sync, e.g. `timedatectl` or `chronyc tracking`)"
        } else {
            ""
        }
    }

    /// The store got other bytes than were sent (see [`CORRUPT_IN_TRANSIT`]).
    fn corrupt_in_transit(&self) -> bool {
        CORRUPT_IN_TRANSIT.iter().any(|code| says(self, code))
    }
}

/// How the HTTP client of a remote store bounds its waits. object_store's default, 30 s for a
/// whole request body included, fails any part or download slower than 30 s (a 500 MiB part
/// under 17 MB/s, a 4 GiB pull at 100 MB/s) on a link that works. Instead: 5 s to connect
/// (the default) and 5 min for one request, so a PUT the server stops reading is still given
/// up. No read timeout: reqwest's (`read_timeout`) runs from the request's start to the
/// reply's headers, a request body's upload included (it is not reset by bytes sent), so
/// 60 s of it failed every part that took a minute to send (16 parts of 64 MiB sharing a
/// 100 Mbit/s link) while bytes flowed. A download longer than 5 min resumes where it broke
/// off (pull). Set key by key over what `from_env` read (a proxy, `AWS_ALLOW_HTTP`), unless
/// the environment sets that very key (`AWS_TIMEOUT`); store options (`timeout`,
/// `read_timeout`, `connect_timeout`) override them all.
fn bounded<B>(mut b: B, env_prefix: &str, set: impl Fn(B, ClientConfigKey, &str) -> B) -> B {
    for (key, value) in STORE_TIMEOUTS {
        let var = format!("{env_prefix}{}", key.as_ref().to_ascii_uppercase());
        if std::env::var_os(var).is_none() {
            b = set(b, key, value);
        }
    }
    b
}

/// The bounds [`bounded`] sets.
const STORE_TIMEOUTS: [(ClientConfigKey, &str); 1] = [(ClientConfigKey::Timeout, "300s")];

/// The most keys a job's attempts listing may give (one manifest per attempt; attempts are
/// numbered by the scheduler, thousands at most).
const MAX_ATTEMPT_KEYS: usize = 100_000;

/// The longest key of an attempts listing that is looked at (an attempt's manifest key is
/// well under it; S3 allows no longer).
const MAX_ATTEMPT_KEY_BYTES: usize = 1024;

/// The longest upload id a store's reply may give that the agent uses (S3's are about 100
/// bytes, GCS's a few hundred, Azure's empty).
pub const MAX_UPLOAD_ID: usize = 1024;

/// Whether an upload id (or a part's id) from the store (or from a journal) can go into
/// the requests that name it: one of 64 KiB made every part's URI too long for the HTTP client, which panics
/// on it (object_store's signing `expect`s a valid request), in the upload and again in every
/// later look at its journal, the seal's included (no manifest was ever written).
pub fn usable_upload_id(id: &str) -> bool {
    id.len() <= MAX_UPLOAD_ID && !id.chars().any(char::is_control)
}

/// A store and the key layout of contract §6.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// `inner` without object_store's own retries, for a blob's create-if-absent PUT (None:
    /// `inner`). Retried inside object_store, a PUT the store took but answered with a 500
    /// came back as the retry's 412, with nothing to tell that the blob was this job's own
    /// ([`BlobPut::Landed`]): missing from `new_bytes`. And a 501 (no conditional writes)
    /// sent the body `max_retries + 1` times before the fallback.
    creator: Option<Arc<dyn ObjectStore>>,
    url: String,
    /// A file store whose directory could not be created: every operation fails with this,
    /// so the job fails its preflight (AGENT_ERROR) instead of the agent failing to start.
    broken: Option<Arc<(String, std::io::ErrorKind, String)>>,
    /// Explicit multipart uploads (S3, GCS, Azure), which can be resumed after a crash;
    /// with the key prefix that `PrefixStore` would otherwise add.
    multipart: Option<(Arc<dyn MultipartStore>, String)>,
    /// Retrying transient failures, and whether the store is in an outage right now.
    retry: Arc<Retry>,
    /// Whether "HEAD is denied" was logged already (once per store).
    head_warned: Arc<std::sync::atomic::AtomicBool>,
    /// Where S3 credentials come from, checked by the preflight.
    credentials: Arc<Credentials>,
    /// The file store's directory (`gc` lists it; a re-used blob's mtime is set in it).
    root: Option<Arc<Path>>,
    /// Whom root's files belong to in the file store, when not root (NFS's root_squash):
    /// that user may write the store, so no job may run as it ([`vet_file_root`]).
    squashed: Option<u32>,
    /// The file store's group commit of `blobs/sha256/` ([`crate::filestore`]).
    dir_sync: Arc<crate::filestore::DirSync>,
    /// How long the file store's calls may take.
    file_limits: crate::filestore::Limits,
    /// The store answered a create-if-absent PUT with 501: blobs go as a HEAD and a plain
    /// PUT from then on. object_store retries a 501 as a server error, so each blob's body
    /// went out `max_retries + 1` times before the fallback, past the bandwidth limit.
    no_conditional_put: Arc<std::sync::atomic::AtomicBool>,
}

/// Where the store's credentials come from, as far as the preflight must know.
#[derive(Debug)]
enum Credentials {
    /// Keys in the environment or options, a profile, web identity, a container endpoint,
    /// or no signing at all (`aws_skip_signature`).
    Given,
    /// Nothing configured: only the instance-metadata endpoint could answer.
    InstanceMetadata(String),
    /// A profile was named but is unusable.
    Broken(String),
}

/// Fills in static keys from the AWS profile chain when neither the environment nor the
/// options give any, and says what the preflight must check.
fn s3_credentials(b: AmazonS3Builder) -> (AmazonS3Builder, Credentials) {
    s3_credentials_with(b, &|k: &str| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    })
}

/// Whether object_store will sign with credentials of its own other than the instance
/// metadata's, or sign nothing: its builder's own rules (`AmazonS3Builder::build`), read from
/// the builder, which `from_env` filled from the `AWS_*` variables as well as the options. A
/// role the operator configured must not lose to root's `~/.aws` profile (an admin's keys), nor
/// a half-configured one pass the preflight that the instance metadata then fails.
fn s3_signs_without_metadata(b: &AmazonS3Builder) -> bool {
    let has = |k| b.get_config_value(&k).is_some();
    // Parsed as object_store parses a bool option.
    let skips = b
        .get_config_value(&AmazonS3ConfigKey::SkipSignature)
        .is_some_and(|v| {
            matches!(
                v.to_ascii_lowercase().as_str(),
                "1" | "true" | "on" | "yes" | "y"
            )
        });
    skips
        || has(AmazonS3ConfigKey::AccessKeyId)
        || has(AmazonS3ConfigKey::WebIdentityTokenFile) && has(AmazonS3ConfigKey::RoleArn)
        || has(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || has(AmazonS3ConfigKey::ContainerCredentialsFullUri)
            && has(AmazonS3ConfigKey::ContainerAuthorizationTokenFile)
}

/// [`s3_credentials`] with the profile chain's variables read through `env`.
fn s3_credentials_with(
    mut b: AmazonS3Builder,
    env: &dyn Fn(&str) -> Option<String>,
) -> (AmazonS3Builder, Credentials) {
    let has = |b: &AmazonS3Builder, k| b.get_config_value(&k).is_some();
    if s3_signs_without_metadata(&b) {
        return (b, Credentials::Given);
    }
    match crate::awsprofile::load(env) {
        Ok(Some(p)) => {
            tracing::debug!(profile = %p.name, "S3 credentials from the AWS profile");
            b = b.with_credentials(Arc::new(crate::awsprofile::ProfileCredentials::new(&p)));
            for (key, value) in [
                (AmazonS3ConfigKey::Region, p.region),
                (AmazonS3ConfigKey::Endpoint, p.endpoint_url),
            ] {
                if let (false, Some(v)) = (has(&b, key), value) {
                    b = b.with_config(key, v);
                }
            }
            (b, Credentials::Given)
        }
        Ok(None) => {
            let endpoint = b
                .get_config_value(&AmazonS3ConfigKey::MetadataEndpoint)
                .unwrap_or_else(|| "http://169.254.169.254".into());
            (b, Credentials::InstanceMetadata(endpoint))
        }
        Err(why) => (b, Credentials::Broken(why)),
    }
}

/// Whether root may use the file store whose directory `dir` is: it and every directory
/// above it only root may change ([`crate::gc::alone_above`]). One rule for every command
/// that opens a file store as root, `gc` included: two disagreed, and gc refused the NFS
/// store the agent wrote to. Root is who root's files belong to there ([`root_becomes`]):
/// under root_squash (NFS, Lustre, GPFS) the export's anonymous user, and root cannot own
/// the store. That user can write it, so no job may run as it (returned here: the store
/// records it, and launch refuses a job of that uid); its group and others, named ACL
/// entries and any other owner are still refused. The store's owner was trusted on NFS
/// whoever it was: a store a user owned passed. A 1777 store let any job plant symlinks in
/// `staging/` that root wrote through, forged manifests, or blobs dedup took by their size.
pub(crate) fn vet_file_root(dir: &crate::confine::DirFd) -> Result<Option<u32>, String> {
    let squashed = root_becomes(dir)?.filter(|&uid| uid != 0);
    crate::gc::alone_above(dir, squashed)?;
    vet_store_dirs(dir, squashed)?;
    Ok(squashed)
}

/// The directories root writes below a file store's root by path (`blobs`, `blobs/sha256`,
/// `staging` and its shards, `jobs`) that exist already must be root's alone too, and no
/// symlink: a store first run by a non-root agent was made by its user, and the operator's
/// `chown`/`chmod` of the top alone left that user `staging/`, where a symlink for a shard
/// made root write elsewhere, and a temp file swapped before its link put the user's own
/// inode (its bytes, still theirs to rewrite) at a blob's key. Missing ones root makes.
fn vet_store_dirs(dir: &crate::confine::DirFd, squashed: Option<u32>) -> Result<(), String> {
    let vet = |rel: &str| -> Result<(), String> {
        // No symlink anywhere on the way (RESOLVE_NO_SYMLINKS).
        let sub = match dir.open_dir(std::path::Path::new(rel)) {
            Ok(sub) => sub,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(format!("{rel}/ in the store is a symlink"))
            }
            // O_NOFOLLOW | O_DIRECTORY on a symlink says ENOTDIR. A plain file there is a
            // broken store, not an unsafe one: its writes fail (the node's error), as they did.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let link =
                    nix::sys::stat::fstatat(dir, rel, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                return if link {
                    Err(format!("{rel}/ in the store is a symlink"))
                } else {
                    Ok(())
                };
            }
            Err(e) => return Err(format!("{rel}/ in the store: {e}")),
        };
        let mut st = nix::sys::stat::fstat(&sub).map_err(|e| e.to_string())?;
        // Root's own, or the user root's files become there: under root_squash the
        // export's anonymous user, found in the directory itself when the store's top is
        // not one root may write (an operator's root-owned top over squashed-owned dirs).
        let roots = st.st_uid == 0
            || Some(st.st_uid) == squashed
            || (squashed.is_none() && root_becomes(&sub)? == Some(st.st_uid));
        if roots {
            st.st_uid = 0;
        }
        if !crate::statedir::root_alone(&sub, &st)? {
            return Err(format!(
                "{rel}/ in the store is owned by uid {} gid {} (mode {:o}, or an ACL), not root's alone",
                st.st_uid,
                st.st_gid,
                st.st_mode & 0o7777
            ));
        }
        Ok(())
    };
    for rel in ["blobs", "blobs/sha256", "staging", "jobs"] {
        vet(rel)?;
    }
    for shard in 0..crate::filestore::SHARDS {
        vet(&crate::filestore::shard_dir(shard))?;
    }
    Ok(())
}

/// Whom a file root makes in `dir` belongs to, from one made there (unnamed where the file
/// system allows; else a new name, never through a symlink) and removed: 0, or root_squash's
/// anonymous user. None where none can be made (a read-only store): root's alone then. A
/// file system that lies about owners (a user's FUSE server) could lie about the store's own.
fn root_becomes(dir: &crate::confine::DirFd) -> Result<Option<u32>, String> {
    #[cfg(test)]
    {
        let st = nix::sys::stat::fstat(dir).map_err(|e| e.to_string())?;
        if let Some(uid) = tests::squash_said(&st) {
            return Ok(Some(uid));
        }
    }
    let Ok((name, file)) = dir.create_unnamed_temp(".c3-owner-") else {
        return Ok(None);
    };
    let owner = nix::sys::stat::fstat(&file).map(|st| st.st_uid);
    if let Some(name) = name {
        let _ = dir.remove_file(std::ffi::OsStr::new(&name));
    }
    Ok(owner.ok())
}

/// The usual options of each store, for a suggestion when one is misspelt (object_store
/// accepts more, and aliases; these are the ones operators set).
const KNOWN_OPTIONS: &[(&str, &[&str])] = &[
    (
        "s3",
        &[
            "aws_access_key_id",
            "aws_secret_access_key",
            "aws_session_token",
            "aws_region",
            "aws_endpoint",
            "aws_allow_http",
            "aws_virtual_hosted_style_request",
            "aws_skip_signature",
            "aws_imdsv1_fallback",
            "aws_unsigned_payload",
            "aws_sse_kms_key_id",
            "aws_server_side_encryption",
            "aws_request_payer",
        ],
    ),
    (
        "gs",
        &[
            "google_service_account",
            "google_service_account_key",
            "google_application_credentials",
        ],
    ),
    (
        "azure",
        &[
            "azure_storage_account_name",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "azure_storage_token",
            "azure_storage_client_id",
            "azure_storage_client_secret",
            "azure_storage_tenant_id",
            "azure_storage_use_emulator",
            "azure_storage_endpoint",
            "azure_allow_http",
        ],
    ),
];

fn did_you_mean(key: &str, scheme: &str) -> String {
    KNOWN_OPTIONS
        .iter()
        .find(|(s, _)| *s == scheme)
        .and_then(|(_, known)| c3_proto::spec::closest(&key.to_ascii_lowercase(), known))
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default()
}

/// Whether the instance-metadata endpoint accepts a connection within a second: on a cloud
/// instance it does at once; off-cloud nothing answers and object_store would retry for minutes.
async fn metadata_endpoint_answers(endpoint: &str) -> bool {
    let Some((host, port)) = endpoint_host_port(endpoint) else {
        return false;
    };
    matches!(
        tokio::time::timeout(
            Duration::from_secs(1),
            tokio::net::TcpStream::connect((host.as_str(), port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// The host (an IPv6 address without its brackets: `http://[fd00:ec2::254]`) and port an
/// endpoint URL names, to connect to.
pub fn endpoint_host_port(endpoint: &str) -> Option<(String, u16)> {
    let url = url::Url::parse(endpoint).ok()?;
    let port = url.port_or_known_default().unwrap_or(80);
    let host = url.host_str()?.trim_matches(['[', ']']).to_string();
    Some((host, port))
}

/// How long a probe may take. Past an outage's deadline one operation at a time is still
/// tried, a probe, so that a store that came back is noticed while a long job runs (its live
/// sync), not only at its final sync; the probe is cut after this, as a try within the
/// deadline is cut at the deadline. A HEAD or a small PUT answers well within it; a big part
/// cut by it only fails as it would have without a try.
const PROBE_BOUND: Duration = Duration::from_secs(30);

/// The least time from one probe's end to the next one's start. Without it, operations one
/// after another (a final sync of 1,000 files) would each probe, and with failures that take
/// a request timeout each (an unreachable host, a connection accepted and never answered)
/// cost `PROBE_BOUND` apiece: hours past the deadline again.
const PROBE_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Retry {
    deadline: Duration,
    /// Written by each try of every operation (a failure booked, an answer) and by the final
    /// sync's start; read before each try, to bound it or refuse it.
    state: std::sync::Mutex<RetryState>,
    /// An operation's resend after the store said its bytes came corrupted succeeded: the
    /// store checks checksums right, and corruption on the way is a fault like any other.
    corruption_cured: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct RetryState {
    /// The outage under way; `None` while the store answers. Shared by every operation: one
    /// that starts during an outage gets what is left of its deadline.
    outage: Option<Outage>,
    /// When the store last answered a request: an operation's try, or a look within one
    /// ([`Retry::heard`]). An outage begins no earlier, however long before it the try that
    /// met the outage started; and a try that began before it is not cut at the deadline.
    answered_at: Option<tokio::time::Instant>,
    /// How many outages have begun, each one's `id`: a try bounded by an outage's deadline
    /// tells by it whether that outage is still the one under way.
    outages: u64,
}

#[derive(Debug)]
struct Outage {
    id: u64,
    /// When operations began failing: the start of the first failed try (for the log line at
    /// its end).
    began: tokio::time::Instant,
    /// What the deadline counts from: `began`, or the start of the final sync if later.
    clock: tokio::time::Instant,
    /// When a failure was last booked (its try's end). An outage nobody has met for a
    /// deadline's time is stale (its operations were cancelled, not answered: a timeout
    /// around them): a try that starts then is not bounded, and its failure starts the clock
    /// again rather than find it run out. Operations refused without a try do not count: they
    /// met no store.
    last: tokio::time::Instant,
    /// Whether a probe (a try past the deadline) is in flight.
    probing: bool,
    /// When the latest probe ended.
    probed: Option<tokio::time::Instant>,
    /// The latest failure's error chain, for the operations that fail without a try.
    error: String,
    /// Whether a write failed in it: then only a write that succeeds ends it. A store that
    /// serves reads and refuses writes (a 503 to every PUT, a full disk) answered each
    /// file's HEAD, which ended the outage, and every file waited a deadline of its own.
    writes_failed: bool,
    /// How reads fare in an outage of writes.
    reads: Reads,
    /// Write operations whose tries failed in it and that have not succeeded since: still
    /// trying, given up, or cancelled. While one has not, a blob found stored after a blip
    /// of its own ([`Shows::Blips`]) ends nothing: a store that refuses new writes and fails
    /// at random too answers a blob it holds after a blip, while another file's writes are
    /// still refused.
    failing_writes: usize,
}

/// How reads fare in an outage of writes. Once one has answered in it, reads are judged by
/// their own failures, not by the writes': a final sync that needs no write (large files
/// all stored: HEADs only) had nothing to end an outage that a failed write began, each read
/// fault kept it fresh, and past its deadline every HEAD was refused, UPLOAD_ERROR from a
/// store that answered 4 requests in 5. Writes are still refused as before: a store that
/// answers reads and refuses writes fails the files it does not hold in one deadline.
#[derive(Debug, Clone, Copy)]
enum Reads {
    /// None has answered in this outage: they are held to its clock, as writes are (a store
    /// that is down, its first failure a write's).
    Unknown,
    /// The latest read answered: a read is tried unbounded, as with no outage under way.
    Answering,
    /// Reads have failed since `since` with none answering, the latest failure booked at
    /// `last`: an outage of their own, as [`Outage::clock`] and [`Outage::last`] are.
    Failing {
        since: tokio::time::Instant,
        last: tokio::time::Instant,
    },
}

impl Outage {
    /// The clock and the latest failure a try counts by (`write`: a write's), as
    /// [`Outage::clock`] and [`Outage::last`]; `None` for a read where reads answer.
    fn counted(&self, write: bool) -> Option<(tokio::time::Instant, tokio::time::Instant)> {
        match (write || !self.writes_failed, self.reads) {
            (true, _) | (false, Reads::Unknown) => Some((self.clock, self.last)),
            (false, Reads::Answering) => None,
            // The final sync's restart of the clock holds for reads too.
            (false, Reads::Failing { since, last }) => Some((since.max(self.clock), last)),
        }
    }
}

/// What a write's success shows of the store taking writes ([`Retry::answered_as`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shows {
    /// Nothing: it wrote nothing (a blob found stored, an upload started or aborted), or
    /// may not have.
    Nothing,
    /// It wrote: the store takes writes.
    Wrote,
    /// A try of it failed, and then the store answered it, finding its blob stored (a 412
    /// to its create-if-absent): the store fails at random, and its failures are blips,
    /// unless another write's failure stands ([`Outage::failing_writes`]).
    Blips,
}

/// Where a try stands in an outage ([`Retry::standing`]).
enum Standing {
    /// Not bounded here: the outage does not count for it, or is stale.
    Free,
    /// Within the outage's deadline, which ends then.
    Within(tokio::time::Instant),
    /// Past the deadline, another operation probing or having probed a moment ago.
    Refused,
    /// Past the deadline, and the probe slot is free.
    MayProbe,
}

/// What an operation's next try may do, decided as it starts ([`Retry::admit`]).
enum Admit<'a> {
    /// No outage under way, or a stale one: the try is not bounded here. A healthy part
    /// upload may take minutes while its bytes flow; the HTTP client's request timeout bounds
    /// it.
    Free,
    /// Outage `id` is under way: the try is cut at `until` (what is left of the deadline, or
    /// a probe's bound), unless that outage ends first or the store answers a request meanwhile
    /// (the try is slow, not met by a dead store).
    During {
        id: u64,
        until: tokio::time::Instant,
        probe: Option<Probe<'a>>,
    },
    /// The outage is past its deadline and another operation probes it, or did a moment ago:
    /// no try.
    Refused(StoreError),
}

/// The probe slot of outage `id`, held for one try; given back when the try ends or is
/// dropped (an operation cancelled by a timeout around it).
struct Probe<'a> {
    retry: &'a Retry,
    id: u64,
    /// Whether the try succeeded ([`Probe::answered`]).
    answered: bool,
}

impl Probe<'_> {
    /// The probe succeeded: the slot is given back without [`PROBE_EVERY`]'s wait. A success
    /// that ends no outage (a read, or a write that found its blob stored, in an outage of
    /// writes) proves the store answers, and the write that follows it (a HEAD, then the
    /// PUT) must be tried: made to wait, that PUT was refused, every file's HEAD took the
    /// slot again, and writes that worked again were never probed until the outage went
    /// stale, a deadline later. A probe that fails still holds the next one off.
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        let mut state = self.retry.lock();
        if let Some(o) = state.outage.as_mut().filter(|o| o.id == self.id) {
            o.probing = false;
            if !self.answered {
                o.probed = Some(tokio::time::Instant::now());
            }
        }
    }
}

impl Retry {
    fn new(deadline: Duration) -> Arc<Self> {
        Arc::new(Retry {
            deadline,
            state: Default::default(),
            corruption_cured: Default::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RetryState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where a try (`write`: a write's) that starts at `now` stands in outage `o`: the one
    /// decision [`Retry::admit`] acts on and [`Retry::refuses_writes_now`] reports.
    fn standing(&self, o: &Outage, now: tokio::time::Instant, write: bool) -> Standing {
        let Some((clock, last)) = o.counted(write) else {
            return Standing::Free;
        };
        if now.saturating_duration_since(last) > self.deadline {
            return Standing::Free;
        }
        let ends = clock + self.deadline;
        if now < ends {
            return Standing::Within(ends);
        }
        if o.probing || o.probed.is_some_and(|t| now < t + PROBE_EVERY) {
            return Standing::Refused;
        }
        Standing::MayProbe
    }

    /// Whether a write's try that started now would be refused unasked ([`Retry::admit`]): an
    /// outage past its deadline whose probe is under way or was made a moment ago.
    fn refuses_writes_now(&self) -> bool {
        let now = tokio::time::Instant::now();
        let state = self.lock();
        state
            .outage
            .as_ref()
            .is_some_and(|o| matches!(self.standing(o, now, true), Standing::Refused))
    }

    /// Decides how a try that starts now may run; `op_deadline` is its operation's own;
    /// `write`: whether it is a write's.
    fn admit(&self, op_deadline: tokio::time::Instant, write: bool) -> Admit<'_> {
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        let Some(o) = state.outage.as_mut() else {
            return Admit::Free;
        };
        match self.standing(o, now, write) {
            Standing::Free => Admit::Free,
            Standing::Within(ends) => Admit::During {
                id: o.id,
                until: ends.min(op_deadline),
                probe: None,
            },
            Standing::Refused => Admit::Refused(StoreError::PastDeadline {
                tried: false,
                failing_secs: now.duration_since(o.began).as_secs(),
                deadline_secs: self.deadline.as_secs(),
                latest: o.error.clone(),
            }),
            Standing::MayProbe => {
                o.probing = true;
                Admit::During {
                    id: o.id,
                    until: now + PROBE_BOUND,
                    probe: Some(Probe {
                        retry: self,
                        id: o.id,
                        answered: false,
                    }),
                }
            }
        }
    }

    /// Runs a try admitted `During` outage `id` at `started`: `None` if it was cut at
    /// `until`. When the bound comes, the outage may be over or the store may have answered a
    /// request since the try began (the try goes on to `ceiling`, as one made with no outage
    /// known: `None`, unbounded), or the outage's clock may have been restarted by the final
    /// sync (the bound moves with it). `write`: whether the try is a write's
    /// ([`Outage::counted`]).
    async fn bounded<F: std::future::Future>(
        &self,
        try_: F,
        (id, write): (u64, bool),
        started: tokio::time::Instant,
        mut until: tokio::time::Instant,
        (op_deadline, ceiling): (tokio::time::Instant, Option<tokio::time::Instant>),
    ) -> Option<F::Output> {
        let mut try_ = std::pin::pin!(try_);
        loop {
            if let Ok(out) = tokio::time::timeout_at(until, try_.as_mut()).await {
                return Some(out);
            }
            let later = {
                let state = self.lock();
                let heard = state.answered_at.is_some_and(|at| at > started);
                match &state.outage {
                    Some(o) if o.id == id && !heard => o
                        .counted(write)
                        .map(|(clock, _)| (clock + self.deadline).min(op_deadline)),
                    _ => None,
                }
            };
            let Some(later) = later else {
                return match ceiling {
                    Some(ceiling) => tokio::time::timeout_at(ceiling, try_).await.ok(),
                    None => Some(try_.await),
                };
            };
            if later <= tokio::time::Instant::now() {
                return None;
            }
            until = later;
        }
    }

    /// The error of a try cut, no outage under way, after `waited` without an answer.
    fn unanswered(&self, waited: Duration) -> StoreError {
        StoreError::PastDeadline {
            tried: true,
            failing_secs: waited.as_secs(),
            deadline_secs: self.deadline.as_secs(),
            latest: format!("no answer to a request in {} s", waited.as_secs()),
        }
    }

    /// The error of a try cut at the outage's deadline.
    fn cut(&self) -> StoreError {
        let state = self.lock();
        let (failing_secs, latest) = state.outage.as_ref().map_or((0, String::new()), |o| {
            (o.began.elapsed().as_secs(), o.error.clone())
        });
        StoreError::PastDeadline {
            tried: true,
            failing_secs,
            deadline_secs: self.deadline.as_secs(),
            latest,
        }
    }

    /// Books a transient failure of a try that started at `started`; returns when the outage
    /// it belongs to has lasted the deadline. Counted from the try's start, not its end: a
    /// try that took a request timeout to fail neither starts a new outage late nor makes the
    /// outage under way look stale.
    /// `write`: whether the try was a write's; `booked`: the outage in which a try of this
    /// operation failed before, if any ([`Outage::failing_writes`]), set to the one this
    /// failure is booked in.
    fn failed_in(
        &self,
        e: &StoreError,
        started: tokio::time::Instant,
        write: bool,
        booked: &mut Option<u64>,
    ) -> tokio::time::Instant {
        let mut state = self.lock();
        let now = tokio::time::Instant::now();
        // With the node's hint: a store refusing a skewed clock fails each try until the
        // clock is set, and the deadline's error says why from this.
        let error = match e {
            StoreError::PastDeadline { .. } => None,
            e => Some(format!("{}{}", crate::error_chain(e), e.node_hint())),
        };
        if let Some(o) = state.outage.as_mut() {
            // A read that fails where reads answered: their own outage begins or goes on,
            // and the outage of writes is not kept fresh by it (a read's fault says nothing
            // of writes), so it goes stale a deadline after the last write failed.
            if let (false, true, Reads::Answering | Reads::Failing { .. }) =
                (write, o.writes_failed, o.reads)
            {
                let since = match o.reads {
                    Reads::Failing { since, last }
                        if started.saturating_duration_since(last) <= self.deadline =>
                    {
                        since
                    }
                    _ => started,
                };
                o.reads = Reads::Failing {
                    since,
                    last: now.max(started),
                };
                if let Some(error) = error {
                    o.error = error;
                }
                return since.max(o.clock) + self.deadline;
            }
            if started.saturating_duration_since(o.last) > self.deadline {
                o.clock = started;
            }
            o.last = o.last.max(now);
            o.writes_failed |= write;
            if write && *booked != Some(o.id) {
                o.failing_writes += 1;
                *booked = Some(o.id);
            }
            if let Some(error) = error {
                o.error = error;
            }
            return o.clock + self.deadline;
        }
        let began = state.answered_at.map_or(started, |a| a.max(started));
        state.outages += 1;
        if write {
            *booked = Some(state.outages);
        }
        state.outage = Some(Outage {
            id: state.outages,
            began,
            clock: began,
            last: now,
            probing: false,
            probed: None,
            error: error.unwrap_or_default(),
            writes_failed: write,
            reads: Reads::Unknown,
            failing_writes: usize::from(write),
        });
        tracing::warn!(error = %crate::error_chain(e), retry_deadline_secs = self.deadline.as_secs(),
            "store is failing; retrying with backoff (one line when it answers again){}", e.node_hint());
        began + self.deadline
    }

    /// A write whose try failed in outage `booked` was refused for good (a 403 for its key):
    /// the store answered it, and its failure no longer stands for one that refuses writes
    /// ([`Outage::failing_writes`]).
    fn refused(&self, booked: Option<u64>) {
        if let Some(o) = self.lock().outage.as_mut().filter(|o| booked == Some(o.id)) {
            o.failing_writes = o.failing_writes.saturating_sub(1);
        }
    }

    /// Whether an outage in which writes failed is under way.
    fn writes_failing(&self) -> bool {
        self.lock().outage.as_ref().is_some_and(|o| o.writes_failed)
    }

    fn restart_clock(&self) {
        if let Some(o) = self.lock().outage.as_mut() {
            o.clock = tokio::time::Instant::now();
        }
    }

    /// The store answered a request within an operation's try (a look for a blob while a
    /// complete's outcome is awaited): said without ending the outage, which the operation's
    /// own outcome does, one WARN line each way.
    fn heard(&self) {
        self.lock().answered_at = Some(tokio::time::Instant::now());
    }

    /// A try succeeded; `write`: a write's, whose success showed `shows`, a try of it having
    /// failed in outage `booked` before. A read says nothing of an outage of writes, and is
    /// not taken for the store answering within a write's try either: only a write that wrote
    /// ends an outage in which writes failed, or one that found its blob stored after a blip
    /// when no other write's failure stands ([`Shows::Blips`]). In an outage of writes a read
    /// that answers has reads tried again as they come ([`Reads`]).
    fn answered_as(&self, write: bool, shows: Shows, booked: Option<u64>) {
        let mut state = self.lock();
        if let Some(o) = state.outage.as_mut().filter(|o| o.writes_failed) {
            if write && booked == Some(o.id) {
                o.failing_writes = o.failing_writes.saturating_sub(1);
            }
            let ends = write
                && match shows {
                    Shows::Nothing => false,
                    Shows::Wrote => true,
                    Shows::Blips => o.failing_writes == 0,
                };
            if !ends {
                o.reads = Reads::Answering;
                return;
            }
        }
        state.answered_at = Some(tokio::time::Instant::now());
        if let Some(o) = state.outage.take() {
            tracing::warn!(
                outage_secs = o.began.elapsed().as_secs_f64(),
                "store answers again"
            );
        }
    }
}

/// The youngest an unreferenced blob may be and still be taken by `c3-agent gc`, whatever
/// its grace period: a job stores a blob before its manifest names it.
pub const BLOB_MIN_AGE: Duration = Duration::from_secs(60 * 60);

/// How young (by its mtime) a blob found stored that could not be touched may be and still
/// be taken as stored: half of [`BLOB_MIN_AGE`], so gc spares it at least half an hour more,
/// time for the manifest that will name it (a sync takes minutes) and for this node's clock
/// being somewhat behind the store's, by which gc may count.
const UNTOUCHED_KEPT: Duration = Duration::from_secs(BLOB_MIN_AGE.as_secs() / 2);

/// Whether the blob at `path` that could not be touched is a regular file made within
/// [`UNTOUCHED_KEPT`]: `Ok(false)` has it stored again.
fn young_enough_untouched(path: &Path) -> std::io::Result<bool> {
    let md = match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        md => md?,
    };
    // Counted by the later of this node's clock and the store's (the mtime of a file made
    // beside it): gc counts by the earlier of its own and the store's, and a store's clock
    // ahead of this node's made a blob gc would take look young here. No store clock, no
    // keeping.
    let Some(store_now) = path.parent().and_then(store_clock) else {
        return Ok(false);
    };
    let now = store_now.max(std::time::SystemTime::now());
    let age = now.duration_since(md.modified()?).unwrap_or_default();
    Ok(md.is_file() && age < UNTOUCHED_KEPT)
}

/// The store's time (blob mtimes are stamped by the file system's clock, an NFS server's,
/// which a node's may be hours off), read in `dir` from a file made there (unnamed where the
/// file system allows: a kill leaves nothing) at most once a minute, then kept as an offset
/// from this node's clock: every deduplicated blob asked for it under NFS's root_squash, a
/// create and an unlink each in a directory of millions.
pub(crate) fn store_clock(dir: &Path) -> Option<std::time::SystemTime> {
    use std::time::SystemTime;
    // When measured (monotonic and wall), and the store's clock less the node's.
    static OFFSET: std::sync::Mutex<Option<(std::time::Instant, i128, i128)>> =
        std::sync::Mutex::new(None);
    let ns = |t: SystemTime| match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    let at = |offset: i128| {
        let t = ns(SystemTime::now()) + offset;
        let d = Duration::from_nanos(u64::try_from(t.max(0)).unwrap_or(u64::MAX));
        SystemTime::UNIX_EPOCH + d
    };
    let mut kept = OFFSET.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((when, wall, offset)) = *kept {
        // Kept a minute, while the node's clock runs as the monotonic one: across a step
        // the offset is the step wrong, and a young blob looked old (or an old one young).
        let ran = ns(SystemTime::now()) - wall;
        let steady = (ran - when.elapsed().as_nanos() as i128).abs() < 1_000_000_000;
        if steady && when.elapsed() < Duration::from_secs(60) {
            return Some(at(offset));
        }
    }
    let dir = crate::confine::DirFd::open(dir).ok()?;
    let (name, file) = dir.create_unnamed_temp(".c3-clock-").ok()?;
    let stamped = file.metadata().and_then(|m| m.modified()).ok();
    if let Some(name) = name {
        let _ = dir.remove_file(std::ffi::OsStr::new(&name));
    }
    let stamped = stamped?;
    let now = ns(SystemTime::now());
    *kept = Some((std::time::Instant::now(), now, ns(stamped) - now));
    Some(stamped)
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore")
            .field("url", &self.shown_url())
            .field("resumable", &self.multipart.is_some())
            .finish()
    }
}

/// What one try of [`BlobStore::put_blob`] did.
#[derive(Debug, Clone, Copy)]
enum BlobPut {
    /// It wrote the blob.
    Added,
    /// The store refused its create-if-absent as the key is taken (a 412, "exists"), and a
    /// HEAD found the blob whole: a write the store processed.
    Exists,
    /// A look found it stored (a HEAD where the store has no conditional writes, the file
    /// store): no write was answered.
    Found,
    /// [`BlobPut::Exists`] or [`BlobPut::Found`], last modified since this operation
    /// began: after a try of it failed, its own write, whose answer was lost (a reset or a
    /// time-out after the store took it). It added the blob: taken for one that was there,
    /// its bytes were missing from the job's `new_bytes` ([`BlobStore::put_blob`]).
    Landed,
}

/// How much older than its operation's start a blob found stored may look and still be
/// taken for its own lost write ([`BlobPut::Landed`]): the store's clock against the
/// node's (NTP keeps both within a second; SigV4 refuses 15 minutes). Past it, a skewed
/// clock undercounts as before. Only after a failed try: a blob another job stored a
/// moment before (a rerun's outputs) is not counted twice.
const LANDED_SKEW: Duration = Duration::from_secs(60);

/// The slowest rate a try's bytes are given time for past the deadline
/// ([`BlobStore::retrying_sized`]): the one the client's 300 s time-out already asks of a
/// 64 MiB part. A try that sends more than the deadline allows at it is not cut sooner.
const BULK_FLOOR_BYTES_PER_SEC: u64 = 224 * 1024;

/// How long a try that sends `bulk` bytes may take at [`BULK_FLOOR_BYTES_PER_SEC`].
fn bulk_time(bulk: u64) -> Duration {
    Duration::from_secs(bulk / BULK_FLOOR_BYTES_PER_SEC)
}

/// Whether a blob last modified at `modified` was stored by an operation begun at `began`.
fn landed_since(modified: std::time::SystemTime, began: std::time::SystemTime) -> bool {
    modified >= began.checked_sub(LANDED_SKEW).unwrap_or(began)
}

impl BlobPut {
    fn of(added: bool) -> BlobPut {
        if added {
            BlobPut::Added
        } else {
            BlobPut::Found
        }
    }
}

/// A stored document's version as the store showed it (ETag, and GCS's generation): what
/// a write that must not replace another writer's document names.
pub type DocVersion = object_store::UpdateVersion;

/// What [`BlobStore::put_document_over`] did.
#[derive(Debug)]
pub enum DocWrite {
    /// Written; the store's version of it now.
    Written(DocVersion),
    /// Another document is there than the one expected (or none is): look again.
    Changed,
}

/// See [`BlobStore::identity`].
pub fn store_identity(url: &str) -> String {
    let shown = crate::display::shown_url(url);
    let (scheme, rest) = shown.split_once("://").unwrap_or(("", &shown));
    let scheme = match scheme {
        "s3a" => "s3",
        "azure" => "az",
        other => other,
    };
    format!("{scheme}://{}", rest.trim_end_matches('/'))
}

pub fn blob_key(sha256_hex: &str) -> String {
    format!("blobs/sha256/{sha256_hex}")
}

pub fn manifest_key(job_id: &str) -> String {
    format!("jobs/{job_id}/manifest.json")
}

pub fn attempt_manifest_key(job_id: &str, attempt: u32) -> String {
    format!("jobs/{job_id}/attempts/{attempt}/manifest.json")
}

impl BlobStore {
    pub fn open(config: &StoreConfig) -> Result<Self, StoreError> {
        Self::open_with(config, Default::default())
    }

    /// [`BlobStore::open`], a file store's calls cut at `limits`.
    pub(crate) fn open_with(
        config: &StoreConfig,
        limits: crate::filestore::Limits,
    ) -> Result<Self, StoreError> {
        crate::fault::blocking_pause("store-open-hangs", Duration::from_secs(600));
        let url = config.url.clone();
        // What an error names: the URL without its user, password and query (a config error
        // goes to the journal, and `https://minio:PW@host/b` has the password in it).
        let shown = crate::display::shown_url(&url);
        let parsed = url::Url::parse(&url).map_err(|e| StoreError::BadUrl {
            url: shown.clone(),
            problem: e.to_string(),
        })?;
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: config.max_retries,
            retry_timeout: config.retry_timeout,
        };
        let prefix = parsed.path().trim_matches('/').to_string();
        let mut credentials = Credentials::Given;
        // Each try of a create-if-absent PUT is one request ([`BlobStore::creator`]).
        let once = RetryConfig {
            max_retries: 0,
            ..retry.clone()
        };
        let (inner, multipart, creator): (
            Arc<dyn ObjectStore>,
            Arc<dyn MultipartStore>,
            Arc<dyn ObjectStore>,
        ) = match parsed.scheme() {
            "file" => {
                // The file store takes none: a misspelt or misplaced one (an S3 endpoint left
                // after switching to a file URL) was ignored without a word.
                if let Some(key) = config.options.keys().next() {
                    return Err(StoreError::BadOption {
                        key: key.clone(),
                        scheme: "file",
                    });
                }
                if parsed
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(StoreError::BadUrl {
                        url: shown,
                        problem: "file URLs take no host: file:///abs/path".into(),
                    });
                }
                let path = parsed.to_file_path().map_err(|()| StoreError::BadUrl {
                    url: shown.clone(),
                    problem: "not an absolute path".into(),
                })?;
                // What is missing above the store (the state dir and its parents, for the
                // default one) is made traversable, not listable (0711): made first
                // under the agent's private umask, a job's user could not reach its workdir
                // below the state dir. The store's own dir stays private.
                // Resolved once, and that directory is the store from here on (vetted, written,
                // gc's): a store URL may name a symlink the operator made (`/srv/c3store ->
                // /mnt/nvme/c3store`), and the vet opens it without following one.
                let unmounted = crate::mountinfo::unmounted_fstab_above(&path).map(|point| {
                    std::io::Error::other(format!(
                        "{} is a mount point in /etc/fstab, and nothing is mounted there: the store would be written to the local disk below it",
                        point.display()
                    ))
                });
                let made = match unmounted {
                    Some(e) => Err(e),
                    None => path
                        .parent()
                        .map_or(Ok(()), |p| crate::statedir::make_dirs(p, 0o711))
                        .and_then(|()| std::fs::create_dir_all(&path))
                        .and_then(|()| std::fs::canonicalize(&path)),
                };
                let path = match made {
                    Ok(resolved) => resolved,
                    Err(e) => {
                        let broken = Some(Arc::new((
                            path.display().to_string(),
                            e.kind(),
                            e.to_string(),
                        )));
                        return Ok(BlobStore {
                            inner: Arc::new(object_store::memory::InMemory::new()),
                            creator: None,
                            url,
                            broken,
                            multipart: None,
                            retry: Retry::new(config.retry_deadline),
                            head_warned: Default::default(),
                            credentials: Arc::new(Credentials::Given),
                            root: None,
                            squashed: None,
                            dir_sync: Default::default(),
                            file_limits: limits,
                            no_conditional_put: Default::default(),
                        });
                    }
                };
                let squashed = if nix::unistd::geteuid().is_root() && !config.reads_only {
                    let vetted = crate::confine::DirFd::open(&path)
                        .map_err(|e| e.to_string())
                        .and_then(|dir| vet_file_root(&dir));
                    vetted.map_err(|why| StoreError::UnsafeRoot {
                        path: path.display().to_string(),
                        why,
                    })?
                } else {
                    None
                };
                let fs = LocalFileSystem::new_with_prefix(&path).map_err(|source| {
                    StoreError::Build {
                        scheme: "file",
                        source,
                    }
                })?;
                // Durability matters more than speed for a job's only copy of its output.
                let fs: Arc<dyn ObjectStore> = Arc::new(fs.with_fsync(true));
                return Ok(BlobStore {
                    inner: Arc::new(crate::filestore::Bounded::new(fs, limits)),
                    creator: None,
                    url,
                    broken: None,
                    multipart: None,
                    retry: Retry::new(config.retry_deadline),
                    head_warned: Default::default(),
                    credentials: Arc::new(Credentials::Given),
                    root: Some(Arc::from(path.as_path())),
                    squashed,
                    dir_sync: Default::default(),
                    file_limits: limits,
                    no_conditional_put: Default::default(),
                });
            }
            "s3" | "s3a" => {
                // The agent hashes every byte itself and checks each part's bytes before sending:
                // a second SHA-256 for request signing would double the CPU per GiB. CRC64-NVME
                // (cheap, verified by the server) guards the transfer instead. Options may override both.
                let mut b = bounded(AmazonS3Builder::from_env(), "AWS_", |b, k, v| {
                    b.with_config(AmazonS3ConfigKey::Client(k), v)
                })
                .with_url(url.as_str())
                .with_retry(retry)
                .with_http_connector(crate::httpcap::CappedConnector)
                .with_unsigned_payload(true)
                .with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME);
                for (k, v) in &config.options {
                    let key: AmazonS3ConfigKey = k.parse().map_err(|_| StoreError::BadOption {
                        key: k.clone(),
                        scheme: "s3",
                    })?;
                    b = b.with_config(key, v);
                }
                let (b, check) = s3_credentials(b);
                credentials = check;
                let creator = Arc::new(
                    b.clone()
                        .with_retry(once)
                        .build()
                        .map_err(|source| build_error("s3", source, &url, &shown))?,
                );
                let built = Arc::new(
                    b.build()
                        .map_err(|source| build_error("s3", source, &url, &shown))?,
                );
                (built.clone(), built, creator)
            }
            "gs" => {
                let mut b = bounded(
                    GoogleCloudStorageBuilder::from_env(),
                    "GOOGLE_",
                    |b, k, v| b.with_config(GoogleConfigKey::Client(k), v),
                )
                .with_url(url.as_str())
                .with_retry(retry)
                .with_http_connector(crate::httpcap::CappedConnector);
                for (k, v) in &config.options {
                    let key: GoogleConfigKey = k.parse().map_err(|_| StoreError::BadOption {
                        key: k.clone(),
                        scheme: "gs",
                    })?;
                    b = b.with_config(key, v);
                }
                let creator = Arc::new(
                    b.clone()
                        .with_retry(once)
                        .build()
                        .map_err(|source| build_error("gs", source, &url, &shown))?,
                );
                let built = Arc::new(
                    b.build()
                        .map_err(|source| build_error("gs", source, &url, &shown))?,
                );
                (built.clone(), built, creator)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut b = bounded(MicrosoftAzureBuilder::from_env(), "AZURE_", |b, k, v| {
                    b.with_config(AzureConfigKey::Client(k), v)
                })
                .with_url(url.as_str())
                .with_retry(retry)
                .with_http_connector(crate::httpcap::CappedConnector);
                for (k, v) in &config.options {
                    let key: AzureConfigKey = k.parse().map_err(|_| StoreError::BadOption {
                        key: k.clone(),
                        scheme: "azure",
                    })?;
                    b = b.with_config(key, v);
                }
                let creator = Arc::new(
                    b.clone()
                        .with_retry(once)
                        .build()
                        .map_err(|source| build_error("azure", source, &url, &shown))?,
                );
                let built = Arc::new(
                    b.build()
                        .map_err(|source| build_error("azure", source, &url, &shown))?,
                );
                (built.clone(), built, creator)
            }
            other => {
                return Err(StoreError::BadUrl {
                    url: shown,
                    problem: format!("scheme `{other}` is not one of file, s3, gs, az"),
                })
            }
        };
        // Bucket-style URLs: the path after the bucket is a key prefix.
        let prefix = if parsed.scheme() == "abfss" {
            String::new()
        } else {
            prefix
        };
        let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
            inner
        } else {
            Arc::new(PrefixStore::new(inner, prefix.as_str()))
        };
        let creator: Arc<dyn ObjectStore> = if prefix.is_empty() {
            creator
        } else {
            Arc::new(PrefixStore::new(creator, prefix.as_str()))
        };
        Ok(BlobStore {
            inner,
            creator: Some(creator),
            url,
            broken: None,
            multipart: Some((multipart, prefix)),
            retry: Retry::new(config.retry_deadline),
            head_warned: Default::default(),
            credentials: Arc::new(credentials),
            root: None,
            squashed: None,
            dir_sync: Default::default(),
            file_limits: Default::default(),
            no_conditional_put: Default::default(),
        })
    }

    /// [`BlobStore::retrying_sized`] of a request that sends nothing much.
    #[cfg(test)]
    async fn retrying<T, Fut>(&self, op: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retrying_sized(op, 0).await
    }

    /// Runs `op` until it succeeds, fails permanently, or `retry_deadline` has passed, since
    /// it began or since the outage it met began, whichever is sooner. The deadline bounds how
    /// long the store may fail, not each operation: with a deadline per operation a dead store
    /// held the final sync for files / files_in_flight deadlines (1,000 files, 16 at a time,
    /// 600 s each: ten hours), each file starting its own wait after the last one gave up.
    ///
    /// Nor may one try outlast it: a failure can take a whole request timeout to come (an
    /// unreachable host, ~30 s through object_store's retries; a connection accepted and never
    /// answered, 300 s), and one first try per file held a dead store's final sync for hours
    /// past the deadline. So a try made while an outage is under way is cut at its deadline,
    /// and once it has passed an operation fails without a try, but for one probe at a time
    /// ([`PROBE_BOUND`], [`PROBE_EVERY`]). A try made while the store answers is cut at the
    /// deadline too, but for the time its `bulk` bytes may take at a slow rate
    /// ([`bulk_time`]): a big part may take minutes to send.
    async fn retrying_sized<T, Fut>(
        &self,
        op: impl FnMut() -> Fut,
        bulk: u64,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retrying_cut(op, Some(bulk_time(bulk)), true, |_, _| Shows::Wrote)
            .await
    }

    /// [`BlobStore::retrying_sized`] for an operation that only reads: its success does not end an
    /// outage in which writes failed.
    async fn retrying_read<T, Fut>(&self, op: impl FnMut() -> Fut) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retrying_cut(op, Some(Duration::ZERO), false, |_, _| Shows::Nothing)
            .await
    }

    /// [`BlobStore::retrying_sized`] for a write that may succeed without writing: a blob found
    /// stored, a create-if-absent refused (412) because the key is taken, an upload started
    /// or aborted. Those the store answers with its disk full or its PUTs refused, so they
    /// end no outage in which writes failed: taken for writes, each file's found blob ended
    /// the outage and its neighbour's PUT began a new one, with a deadline of its own (1,000
    /// files: ten hours). `ends` says what a success shows, given whether a try of this
    /// operation failed before it (see [`BlobStore::put_blob`]).
    async fn retrying_write<T, Fut>(
        &self,
        op: impl FnMut() -> Fut,
        ends: impl Fn(&T, bool) -> Shows,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retrying_write_sized(op, ends, 0).await
    }

    /// [`BlobStore::retrying_write`] of `bulk` bytes ([`BlobStore::retrying_sized`]).
    async fn retrying_write_sized<T, Fut>(
        &self,
        op: impl FnMut() -> Fut,
        ends: impl Fn(&T, bool) -> Shows,
        bulk: u64,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        self.retrying_cut(op, Some(bulk_time(bulk)), true, ends)
            .await
    }

    /// [`BlobStore::retrying_sized`]; `cut`: whether a try is cut at its deadline (`None`:
    /// never), and how long a try made while the store answers may take if longer (its
    /// bytes' [`bulk_time`]); `write`: whether the operation writes (a failure books a failed
    /// write);
    /// `ends`: what its success (and whether a try of it failed before) shows of the store
    /// taking writes, which alone ends an outage in which writes failed.
    async fn retrying_cut<T, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
        cut: Option<Duration>,
        write: bool,
        ends: impl Fn(&T, bool) -> Shows,
    ) -> Result<T, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, StoreError>>,
    {
        use backon::BackoffBuilder;
        let mut deadline = tokio::time::Instant::now() + self.retry.deadline;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(10))
            .with_jitter()
            .with_max_times(usize::MAX)
            .build();
        let mut corrupt = 0;
        let mut extended = 0;
        let mut failure: Option<StoreError> = None;
        // The outage a failure of this operation was booked in.
        let mut booked = None;
        loop {
            let started = tokio::time::Instant::now();
            let (tried, probe) = match self.retry.admit(deadline, write) {
                // No outage known: the try is not held to what is left of one, but nor may it
                // outlast the deadline (its bytes' time aside). A request the store never
                // answers takes the client's whole time-out (300 s, some minutes more with
                // object_store's retries), and one first try held a job's end that long
                // past a shorter `retry_deadline_secs`. The file store's calls have bounds
                // of their own ([`crate::filestore::Limits`]).
                Admit::Free => match cut.filter(|_| !self.is_local()) {
                    Some(allowed) => {
                        let until = started + self.retry.deadline.max(allowed);
                        match tokio::time::timeout_at(until, op()).await {
                            Ok(tried) => (Some(tried), None),
                            Err(_) => (Some(Err(self.retry.unanswered(started.elapsed()))), None),
                        }
                    }
                    None => (Some(op().await), None),
                },
                Admit::During { id, until, probe } => match cut {
                    Some(allowed) => {
                        // Once the store answered, as a try made with no outage known.
                        let ceiling =
                            (!self.is_local()).then(|| started + self.retry.deadline.max(allowed));
                        let tried = self
                            .retry
                            .bounded(op(), (id, write), started, until, (deadline, ceiling))
                            .await;
                        (tried, probe)
                    }
                    None => (Some(op().await), probe),
                },
                // This operation's own failure says more than "not tried".
                Admit::Refused(e) => return Err(failure.unwrap_or(e)),
            };
            let tried = tried.unwrap_or_else(|| Err(self.retry.cut()));
            if let (Some(probe), Ok(_)) = (probe, &tried) {
                probe.answered();
            }
            match tried {
                Ok(v) => {
                    let shows = ends(&v, failure.is_some());
                    self.retry.answered_as(write, shows, booked);
                    if corrupt > 0 {
                        self.retry
                            .corruption_cured
                            .store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                // Cured once, a few times more (a store that mishandles one kind of request,
                // its parts, is not retried for a whole deadline each).
                Err(e)
                    if e.corrupt_in_transit()
                        && (corrupt + 1 < CORRUPT_TRIES
                            || (corrupt + 1 < CORRUPT_TRIES * 3
                                && self
                                    .retry
                                    .corruption_cured
                                    .load(std::sync::atomic::Ordering::Relaxed))) =>
                {
                    corrupt += 1;
                    let wait = delays.next().unwrap_or(Duration::from_secs(10));
                    if tokio::time::Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(error = %crate::error_chain(&e), tries = corrupt, "the store got other bytes than were sent; sending again");
                    tokio::time::sleep(wait).await;
                }
                Err(e) if e.is_permanent() => {
                    if write {
                        self.retry.refused(booked);
                    }
                    return Err(e);
                }
                Err(e) => {
                    // A whole operation's try that failed late (a staged copy of an 80 GB file
                    // to an NFS store, 13 minutes, an EIO at minute 12) is judged from its
                    // failure, not its start: from there it was past the deadline at once,
                    // and one blip failed the file. A few times only, each try bounded by
                    // the file store's own limits.
                    let long = cut.is_none()
                        && extended < WHOLE_LATE_FAILURES
                        && started.elapsed() > self.retry.deadline / 2;
                    let failed_from = match long {
                        true => {
                            extended += 1;
                            let now = tokio::time::Instant::now();
                            deadline = deadline.max(now + self.retry.deadline);
                            now
                        }
                        false => started,
                    };
                    let outage_ends = self.retry.failed_in(&e, failed_from, write, &mut booked);
                    let wait = delays.next().unwrap_or(Duration::from_secs(10));
                    if tokio::time::Instant::now() + wait >= deadline.min(outage_ends) {
                        return Err(e);
                    }
                    tracing::debug!(error = %crate::error_chain(&e), retry_in_ms = wait.as_millis() as u64, "store operation failed; retrying");
                    failure = Some(e);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Runs `op` (an operation of several store calls, run again whole) under the same
    /// retries as one store call: a store failure it reports (`Err(Err(_))`) is tried again
    /// while transient, until the outage deadline; `Err(Ok(_))` is its own failure, handed
    /// back at once. Past the deadline it is refused as a store call is, but a try is not cut
    /// at the deadline: a whole staged upload lasts as long as its file takes to copy (80 GB
    /// to an NFS store: many minutes), and one that follows a blip nobody else answered since
    /// would be cut while its bytes flow. Its store calls are file system calls, which fail
    /// with an error rather than wait for a request timeout.
    pub async fn retrying_whole<T, E, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
    ) -> Result<Result<T, E>, StoreError>
    where
        Fut: std::future::Future<Output = Result<T, Result<E, StoreError>>>,
    {
        self.retrying_cut(
            || {
                let run = op();
                async move {
                    match run.await {
                        Ok(v) => Ok(Ok(v)),
                        Err(Ok(own)) => Ok(Err(own)),
                        Err(Err(store)) => Err(store),
                    }
                }
            },
            None,
            true,
            // A whole staged upload that succeeded wrote its staging object, whether or not
            // the blob was found stored after; one that failed on its own (the file could not
            // be opened, was sparse, changed) may have written nothing.
            |r, _| match r {
                Ok(_) => Shows::Wrote,
                Err(_) => Shows::Nothing,
            },
        )
        .await
    }

    /// The final sync begins: an outage under way gets a whole `retry_deadline` again from
    /// now, so a store that was down for hours of a long job and is back a minute after it
    /// still gets every file, which is first tried now.
    pub fn restart_outage_clock(&self) {
        self.retry.restart_clock();
    }

    /// Whether the store has answered since `at`, as an outage counts answers: a read in an
    /// outage of writes does not.
    pub fn answered_since(&self, at: tokio::time::Instant) -> bool {
        let state = self.retry.lock();
        // A look within a write's try (a HEAD while a complete's outcome is awaited) is heard
        // in an outage of writes too: no answer to a write.
        state.answered_at.is_some_and(|a| a > at)
            && !state.outage.as_ref().is_some_and(|o| o.writes_failed)
    }

    /// Whether a write started now would be refused without a try (an outage past its
    /// deadline, its probe under way or made a moment ago).
    pub fn refuses_writes_now(&self) -> bool {
        self.retry.refuses_writes_now()
    }

    /// The backing store, unless it could not be set up.
    fn store(&self) -> Result<&Arc<dyn ObjectStore>, StoreError> {
        match &self.broken {
            None => Ok(&self.inner),
            Some(b) => Err(StoreError::CreateDir {
                path: b.0.clone(),
                source: std::io::Error::new(b.1, b.2.clone()),
            }),
        }
    }

    /// A store in memory with resumable multipart uploads, for tests and benchmarks.
    pub fn in_memory() -> Self {
        let mem = Arc::new(object_store::memory::InMemory::new());
        Self::in_memory_with(mem.clone(), mem, Duration::from_secs(5))
    }

    /// A store in memory whose multipart uploads go through `multipart` (a test's faulty
    /// wrapper of `mem`), failing for at most `deadline`.
    pub fn in_memory_with(
        mem: Arc<object_store::memory::InMemory>,
        multipart: Arc<dyn MultipartStore>,
        deadline: Duration,
    ) -> Self {
        BlobStore {
            inner: mem,
            creator: None,
            url: "memory:///".into(),
            broken: None,
            multipart: Some((multipart, String::new())),
            retry: Retry::new(deadline),
            head_warned: Default::default(),
            credentials: Arc::new(Credentials::Given),
            root: None,
            squashed: None,
            dir_sync: Default::default(),
            file_limits: Default::default(),
            no_conditional_put: Default::default(),
        }
    }

    /// The store's URL as configured: what names it (the node's record of known blobs).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The URL as logs, errors and summaries show it ([`crate::display::shown_url`]).
    pub fn shown_url(&self) -> String {
        crate::display::shown_url(&self.url)
    }

    /// Which store this is, as a run record keeps it ([`c3_proto::RunRecord::destination`]):
    /// the shown URL with the spellings [`BlobStore::open`] takes for one store made one
    /// (`s3a` is `s3`, `azure` is `az`, a trailing `/` is none).
    pub fn identity(&self) -> String {
        store_identity(&self.url)
    }

    /// The instance-metadata endpoint the store's credentials come from, if that is where
    /// (nothing configured: object_store asks it). Any process of the node that can reach it
    /// gets the same keys, a job's too, unless the node blocks it for users other than root.
    pub fn instance_metadata_endpoint(&self) -> Option<&str> {
        match &*self.credentials {
            Credentials::InstanceMetadata(endpoint) => Some(endpoint),
            _ => None,
        }
    }

    /// Proves before launch that the store is reachable and writable by
    /// creating the empty blob (which is itself a valid blob).
    /// One attempt, no retries: a transient failure here does not block the launch. Missing
    /// credentials are permanent: said in one line within a second, not after minutes.
    pub async fn preflight(&self) -> Result<(), StoreError> {
        match &*self.credentials {
            Credentials::Given => {}
            Credentials::Broken(why) => return Err(StoreError::NoCredentials { why: why.clone() }),
            Credentials::InstanceMetadata(endpoint) => {
                if !metadata_endpoint_answers(endpoint).await {
                    return Err(StoreError::NoCredentials {
                        why: format!("none in the environment, the options or an AWS profile, and the instance-metadata endpoint {endpoint} does not answer"),
                    });
                }
            }
        }
        // Here a 404 that says the bucket is missing is said before the launch: the bucket is
        // what the preflight proves. A bare one (a proxy's, a load balancer's) is a blip, as
        // for any write: taken for the store's word, it failed the job before its launch.
        match self
            .put_blob_once(EMPTY_SHA256, Bytes::new(), std::time::SystemTime::now())
            .await
        {
            Ok(_) => Ok(()),
            Err(StoreError::BareNotFound { op, key, source })
                if NO_BUCKET_CODES.iter().any(|code| says(&source, code)) =>
            {
                Err(StoreError::Op { op, key, source })
            }
            Err(e) => Err(e),
        }
    }

    /// Writes a blob unless present. Returns whether this call added it. A retry after a
    /// lost acknowledgement finds the blob present: that is success (content-addressed).
    ///
    /// A blob found stored by the store refusing its create-if-absent (412) after a try of
    /// this very PUT failed ends an outage of writes, unless another write's failure in it
    /// stands (a write still failing, given up or cancelled: [`Outage::failing_writes`]).
    /// Its own failure was a blip, the store answering it after; with no other, the outage
    /// was blips. Without it a final sync of blobs all stored (a re-run, a dataset copied to
    /// the artifacts) against a store failing 1 request in 5 had no write that wrote to end
    /// the outage, each fault kept it fresh, and past the deadline its operations were
    /// refused: UPLOAD_ERROR from a store that answered 80% of them. With another's failure
    /// standing it ends nothing: a store that refuses new writes (a 503, its disk full) and
    /// answers a key it holds with a 412 fails at random too, and each blip on a stored blob
    /// ended the outage, the next new file beginning one with a deadline of its own.
    ///
    /// Failed in an outage of writes (refused past its deadline, or its tries failing), it
    /// looks, as a read, whether the blob is stored: one that is needs no write, and a store
    /// that answers reads says so however its writes fare. Refused, a blob stored long ago
    /// failed its file (a re-run's small files, the file store's).
    pub async fn put_blob(&self, sha256_hex: &str, bytes: Bytes) -> Result<bool, StoreError> {
        let size = bytes.len() as u64;
        let began = std::time::SystemTime::now();
        // A try of it failed in a way the store may have taken it (see `BlobPut::Landed`).
        let may_have_landed = std::sync::atomic::AtomicBool::new(false);
        let put = self
            .retrying_write_sized(
                || {
                    let put = self.put_blob_once(sha256_hex, bytes.clone(), began);
                    let landed = &may_have_landed;
                    async move {
                        let put = put.await;
                        if put.as_ref().is_err_and(StoreError::may_have_been_applied) {
                            landed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        put
                    }
                },
                // Landed or not, a blob found stored shows no more of the store taking
                // writes than before (another job's a moment ago looks the same).
                |put, failed_before| match put {
                    BlobPut::Added => Shows::Wrote,
                    BlobPut::Exists | BlobPut::Landed if failed_before => Shows::Blips,
                    BlobPut::Exists | BlobPut::Found | BlobPut::Landed => Shows::Nothing,
                },
                size,
            )
            .await;
        match put {
            Ok(BlobPut::Added) => Ok(true),
            Ok(BlobPut::Landed) => Ok(may_have_landed.load(std::sync::atomic::Ordering::Relaxed)),
            Ok(_) => Ok(false),
            Err(e) if !e.is_permanent() && self.retry.writes_failing() => {
                match self.blob_exists(sha256_hex, size).await {
                    Ok(true) => Ok(false),
                    _ => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// `began`: when its operation's first try began ([`BlobPut::Landed`]).
    async fn put_blob_once(
        &self,
        sha256_hex: &str,
        bytes: Bytes,
        began: std::time::SystemTime,
    ) -> Result<BlobPut, StoreError> {
        let key = blob_key(sha256_hex);
        if let (true, Some(root)) = (self.is_local(), self.local_root()) {
            let (root, sha, sync) = (
                root.to_path_buf(),
                sha256_hex.to_string(),
                self.dir_sync.clone(),
            );
            let put = |replace: bool| {
                let (root, sha, bytes, sync) =
                    (root.clone(), sha.clone(), bytes.clone(), sync.clone());
                let limit = self.file_limits.data(bytes.len() as u64);
                local_blocking("put", &key, limit, move || {
                    crate::filestore::put_blob(&root, &sha, &bytes, &sync, replace)
                })
            };
            if put(false).await? {
                return Ok(BlobPut::Added);
            }
            if self.still_wanted(sha256_hex).await? {
                return Ok(BlobPut::Found);
            }
            // gc took it meanwhile, or it could not be touched and is old enough that gc
            // may take it before the manifest is written: a new copy takes its place, young.
            return Ok(BlobPut::of(put(true).await?));
        }
        let path = StorePath::from(key.as_str());
        let size = bytes.len() as u64;
        if self
            .no_conditional_put
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.put_blob_plain(sha256_hex, &key, bytes, began).await;
        }
        let inner = self.store()?;
        let refused = match self
            .creator
            .as_ref()
            .unwrap_or(inner)
            .put_opts(
                &path,
                PutPayload::from(bytes.clone()),
                PutMode::Create.into(),
            )
            .await
        {
            Ok(_) => return Ok(BlobPut::Added),
            Err(
                e @ (object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }),
            ) => e,
            // A store without conditional writes (an S3-compatible one's 501): a HEAD, then
            // a plain PUT. The key names the bytes, so a PUT over a blob another upload
            // stored meanwhile replaces it with itself. It was retried as a server error
            // until the deadline: UPLOAD_ERROR where aws-cli, sending no condition, succeeds.
            Err(e)
                if matches!(e, object_store::Error::NotImplemented { .. })
                    || says(&e, "<Code>NotImplemented</Code>") =>
            {
                // Taken for "no conditional writes" only once a plain PUT went through: a 501
                // for another cause (a server-side encryption the store cannot do) fails
                // that PUT too.
                let put = self.put_blob_plain(sha256_hex, &key, bytes, began).await;
                if put.is_ok()
                    && !self
                        .no_conditional_put
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!("the store has no conditional writes (501 to If-None-Match); blobs and manifests are checked with a HEAD, then written");
                }
                return put;
            }
            Err(source) => return Err(write_error("put", &key, source)),
        };
        // "Exists" is the store's word, and a 409 is also S3's answer to two conditional
        // PUTs of one key at once (ConditionalRequestConflict: the other may yet fail). The
        // blob counts as stored only once a HEAD shows it whole.
        let not_there = |found: &str| StoreError::NotThere {
            key: key.clone(),
            found: found.into(),
        };
        if says(&refused, "ConditionalRequestConflict") {
            return Err(not_there("another upload of it is in flight"));
        }
        match self.stored_meta(sha256_hex).await {
            Ok(Some((s, modified))) if s == size => {
                if !self.still_wanted(sha256_hex).await? {
                    return Err(not_there("gc deleted it meanwhile"));
                }
                Ok(match landed_since(modified, began) {
                    true => BlobPut::Landed,
                    false => BlobPut::Exists,
                })
            }
            // A short or torn object under a content-addressed key (another tool, an old
            // bug): these bytes hash to the key, so replacing it can only mend it.
            Ok(Some((other, _))) => {
                tracing::warn!(key = %key, stored_bytes = other, bytes = size, "a blob in the store has the wrong size; replacing it");
                self.put_document_once(&key, bytes)
                    .await
                    .map(|()| BlobPut::Added)
            }
            Ok(None) => Err(not_there("a HEAD does not find it")),
            // A write-only policy (no s3:GetObject) cannot check: a 412 (or Azure's "blob
            // already exists") is the store saying the key exists, and is taken; a bare 409
            // may be S3's OperationAborted, a conflict.
            Err(e) if self.head_denied(&e) => {
                if says(&refused, "412 Precondition Failed") || says(&refused, "BlobAlreadyExists")
                {
                    Ok(BlobPut::Exists)
                } else {
                    Err(not_there("HEAD is denied and a 409 may be a conflict"))
                }
            }
            Err(e) => Err(e),
        }
    }

    /// A blob on a store without conditional writes: a HEAD, then a plain PUT. The key names
    /// the bytes, so a PUT over a blob another upload stored meanwhile replaces it with
    /// itself.
    async fn put_blob_plain(
        &self,
        sha256_hex: &str,
        key: &str,
        bytes: Bytes,
        began: std::time::SystemTime,
    ) -> Result<BlobPut, StoreError> {
        let put = || async {
            self.put_document_once(key, bytes.clone())
                .await
                .map(|()| BlobPut::Added)
        };
        match self.stored_meta(sha256_hex).await {
            Ok(Some((s, modified))) if s == bytes.len() as u64 => {
                match self.still_wanted(sha256_hex).await? {
                    true if landed_since(modified, began) => Ok(BlobPut::Landed),
                    true => Ok(BlobPut::Found),
                    false => put().await,
                }
            }
            Ok(_) => put().await,
            Err(e) if self.head_denied(&e) => put().await,
            Err(e) => Err(e),
        }
    }

    /// Whether the blob is stored whole (`size` bytes): one of another size is not taken for
    /// it, and is replaced by the upload that follows. A store that denies HEAD (a write-only
    /// policy) answers "not known", so the file is sent.
    pub async fn blob_exists(&self, sha256_hex: &str, size: u64) -> Result<bool, StoreError> {
        let stored = match self.retrying_read(|| self.stored_size(sha256_hex)).await {
            Err(e) if self.head_denied(&e) => return Ok(false),
            r => r?,
        };
        if stored != Some(size) {
            return Ok(false);
        }
        self.still_wanted(sha256_hex).await
    }

    /// Whether `e` is a HEAD refused for lack of permission; said once per store.
    fn head_denied(&self, e: &StoreError) -> bool {
        let denied = matches!(
            e,
            StoreError::Op {
                source: object_store::Error::PermissionDenied { .. },
                ..
            }
        ) && !e.clock_skewed();
        if denied
            && !self
                .head_warned
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(error = %crate::error_chain(e), "the store denies HEAD (a write-only policy?): files are sent without asking first whether their blob is stored");
        }
        denied
    }

    /// A blob this job is about to list was already stored: on the file store its mtime is
    /// set to now, so that `c3-agent gc` (which spares blobs younger than its grace period)
    /// cannot delete it between now and the manifest that will name it. `false`: gc took it
    /// first (the blob must be stored again). gc moves a blob aside before it checks the
    /// mtime a last time, so a blob still at its key after the touch is one gc will keep.
    /// A blob that could not be touched (NFS's root_squash refuses every touch) is wanted
    /// only while it is young enough ([`UNTOUCHED_KEPT`]) that gc spares it until the
    /// manifest naming it is written; an older one is stored again (a copy of this node's).
    /// Replacing every one renamed a new copy over each deduplicated blob, and readers on
    /// other nodes that had it open got ESTALE.
    async fn still_wanted(&self, sha256_hex: &str) -> Result<bool, StoreError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let Some(root) = self.local_root() else {
            return Ok(true);
        };
        let (key, path) = (blob_key(sha256_hex), root.join(blob_key(sha256_hex)));
        let sha = sha256_hex.to_string();
        // In one of the file store's call slots, as every other call: a touch that does not
        // return (a hung network file system whose stats still answer) keeps its thread, and
        // every deduplicated file's left one stuck until tokio's blocking pool was full.
        let touch = local_blocking("touch", &key, self.file_limits.meta, move || {
            // "Now" as the file system keeps time (UTIME_NOW): allowed to any writer, where an
            // explicit time needs the owner (a blob another node's agent stored fails, and
            // the touch was skipped), and on NFS the server's clock, which gc's ages are
            // counted by, not this node's.
            use nix::sys::stat::{futimens, utimensat, UtimensatFlags};
            use nix::sys::time::TimeSpec;
            // Never through a symlink at the key: root would touch (and open for writing)
            // whatever it leads to.
            let opened = std::fs::File::options()
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .and_then(
                    |file| match crate::fault::armed_at("blob-touch-open", &sha) {
                        true => Err(std::io::Error::from_raw_os_error(libc::EACCES)),
                        false => Ok(file),
                    },
                );
            let ino = match opened {
                Ok(file) => {
                    if futimens(&file, &TimeSpec::UTIME_OMIT, &TimeSpec::UTIME_NOW).is_err() {
                        return young_enough_untouched(&path);
                    }
                    file.metadata()?.ino()
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                // Not this user's to write (a blob another user stored read-only): its owner
                // may still set its times.
                Err(_) => {
                    let set = match crate::fault::armed_at("blob-touch-utimensat", &sha) {
                        true => Err(nix::errno::Errno::EPERM),
                        false => utimensat(
                            nix::fcntl::AT_FDCWD,
                            &path,
                            &TimeSpec::UTIME_OMIT,
                            &TimeSpec::UTIME_NOW,
                            UtimensatFlags::NoFollowSymlink,
                        ),
                    };
                    if set.is_err() {
                        return young_enough_untouched(&path);
                    }
                    std::fs::symlink_metadata(&path)?.ino()
                }
            };
            std::fs::symlink_metadata(&path).map(|now| now.is_file() && now.ino() == ino)
        });
        match touch.await {
            Ok(wanted) => Ok(wanted),
            // No slot came free in time (every one a data write's, under a heavy load that
            // answers), or the touch did not return: transient, the caller's try is retried.
            // Taken for "not wanted", the blob was stored again over itself (readers on other
            // nodes got ESTALE) and its bytes counted as new to the tenant.
            Err(e) if timed_out(&e) => Err(e),
            // A touch that failed: a blob not known wanted, stored again.
            Err(_) => Ok(false),
        }
    }

    /// Whether what is at the blob's key on the file store is a regular file (elsewhere: the
    /// store's word, taken). A symlink there is no blob: its size and its touch would be its
    /// target's.
    async fn blob_is_file(&self, sha256_hex: &str) -> Result<bool, StoreError> {
        let Some(root) = self.local_root() else {
            return Ok(true);
        };
        let (key, path) = (blob_key(sha256_hex), root.join(blob_key(sha256_hex)));
        local_blocking("promote", &key, self.file_limits.meta, move || {
            match std::fs::symlink_metadata(&path) {
                Ok(md) => Ok(md.is_file()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The stored blob's size, `None` if there is none.
    async fn stored_size(&self, sha256_hex: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.stored_meta(sha256_hex).await?.map(|(size, _)| size))
    }

    /// [`BlobStore::stored_size`], with when the store last modified the blob.
    async fn stored_meta(
        &self,
        sha256_hex: &str,
    ) -> Result<Option<(u64, std::time::SystemTime)>, StoreError> {
        let key = blob_key(sha256_hex);
        match self.store()?.head(&StorePath::from(key.as_str())).await {
            Ok(meta) => Ok(Some((meta.size, meta.last_modified.into()))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(StoreError::Op {
                op: "head",
                key,
                source,
            }),
        }
    }

    /// The file store's directory (a working one: not one that could not be created).
    pub fn local_root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The user root's files belong to in the file store when not root (root_squash's
    /// anonymous user, found when it was opened as root): it may write the whole store.
    pub fn squashed_uid(&self) -> Option<u32> {
        self.squashed
    }

    /// How long the file store's calls may take (gc cuts its own at the same limits).
    pub(crate) fn file_limits(&self) -> crate::filestore::Limits {
        self.file_limits
    }

    /// Whether a read's "not found" is the store's own word that the key is absent: the
    /// file store's always; a remote store's only with its own code in the reply (S3's and
    /// GCS's NoSuchKey, Azure's BlobNotFound, GCS's JSON "No such object"), as a write's
    /// ([`write_error`]): a proxy's or load balancer's bare 404 says nothing of the key.
    pub fn says_absent(&self, e: &StoreError) -> bool {
        match e {
            StoreError::Op {
                source: source @ object_store::Error::NotFound { .. },
                ..
            } => self.says_absent_in(source),
            _ => false,
        }
    }

    /// [`BlobStore::says_absent`] of a "not found" from object_store.
    fn says_absent_in(&self, source: &object_store::Error) -> bool {
        let local = self.url.starts_with("file:") || self.url.starts_with("memory:");
        local || ABSENT_CODES.iter().any(|code| says(source, code))
    }

    /// Whether this is the file store, where a staged object becomes a blob by a hard link.
    pub fn is_local(&self) -> bool {
        self.multipart.is_none() && self.broken.is_none() && self.url.starts_with("file:")
    }

    /// Starts a streaming multipart write of any key (a staging object).
    pub async fn start_multipart_at(
        &self,
        key: &str,
    ) -> Result<Box<dyn MultipartUpload>, StoreError> {
        let key = key.to_string();
        self.store()?
            .put_multipart(&StorePath::from(key.as_str()))
            .await
            .map_err(|source| StoreError::Op {
                op: "start multipart upload",
                key,
                source,
            })
    }

    /// Whether multipart uploads can be resumed (S3, GCS, Azure; not the file store).
    pub fn can_resume(&self) -> bool {
        self.multipart.is_some() && self.broken.is_none()
    }

    fn multipart_path(
        &self,
        sha256_hex: &str,
    ) -> Result<(&Arc<dyn MultipartStore>, StorePath), StoreError> {
        self.store()?;
        let (mp, prefix) = self.multipart.as_ref().ok_or_else(|| StoreError::Op {
            op: "multipart upload",
            key: blob_key(sha256_hex),
            source: object_store::Error::NotSupported {
                source: "this store has no resumable multipart uploads".into(),
            },
        })?;
        let key = blob_key(sha256_hex);
        let full = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}/{key}")
        };
        Ok((mp, StorePath::from(full.as_str())))
    }

    pub async fn create_multipart(&self, sha256_hex: &str) -> Result<String, StoreError> {
        self.retrying_write(
            || self.create_multipart_once(sha256_hex),
            |_, _| Shows::Nothing,
        )
        .await
    }

    async fn create_multipart_once(&self, sha256_hex: &str) -> Result<String, StoreError> {
        let (mp, path) = self.multipart_path(sha256_hex)?;
        let key = blob_key(sha256_hex);
        let op_error = |source| write_error("create multipart upload", &key, source);
        let id = mp.create_multipart(&path).await.map_err(op_error)?;
        if !usable_upload_id(&id) {
            // Taken as a blip (a proxy that garbled one reply): a new upload is started.
            return Err(op_error(object_store::Error::Generic {
                store: "c3-agent",
                source: format!(
                    "the store named the upload with {} bytes (at most {MAX_UPLOAD_ID} are used)",
                    id.len()
                )
                .into(),
            }));
        }
        Ok(id)
    }

    /// Uploads part `idx` (0-based); returns the store's opaque id for it. Each part is
    /// retried on its own: a failing part never fails the file before the deadline.
    pub async fn put_part(
        &self,
        sha256_hex: &str,
        upload_id: &str,
        idx: usize,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let bulk = bytes.len() as u64;
        self.retrying_sized(
            || self.put_part_once(sha256_hex, upload_id, idx, bytes.clone()),
            bulk,
        )
        .await
    }

    async fn put_part_once(
        &self,
        sha256_hex: &str,
        upload_id: &str,
        idx: usize,
        bytes: Bytes,
    ) -> Result<String, StoreError> {
        let (mp, path) = self.multipart_path(sha256_hex)?;
        let id = upload_id.to_string();
        let key = blob_key(sha256_hex);
        let part = mp
            .put_part(&path, &id, idx, PutPayload::from(bytes))
            .await
            .map_err(|source| upload_error("upload part", &key, source))?;
        // Kept in memory, journaled and sent back whole at the completion, for each of up
        // to 10,000 parts: an ETag of 400 KiB (the most a reply's headers hold) was 4 GB of a
        // big checkpoint's. Taken as a blip, as a garbled upload id is: the part is sent again.
        if !usable_upload_id(&part.content_id) {
            return Err(upload_error(
                "upload part",
                &key,
                object_store::Error::Generic {
                    store: "c3-agent",
                    source: format!(
                        "the store named part {idx} with {} bytes (at most {MAX_UPLOAD_ID} are used)",
                        part.content_id.len()
                    )
                    .into(),
                },
            ));
        }
        Ok(part.content_id)
    }

    /// Whether the store still knows the upload: an empty part put at `idx`, a part number
    /// the upload does not use (a complete lists its parts, so the store drops it). One try,
    /// bounded: `Ok(false)` only on the store's own NoSuchUpload; anything else (a reset, a
    /// time-out, a store that refuses an empty part) is `Err`, no answer.
    pub async fn upload_still_open(
        &self,
        sha256_hex: &str,
        upload_id: &str,
        idx: usize,
    ) -> Result<bool, StoreError> {
        const OP: &str = "probe the upload with an empty part";
        let key = blob_key(sha256_hex);
        let (mp, path) = self.multipart_path(sha256_hex)?;
        let id = upload_id.to_string();
        let probe = mp.put_part(&path, &id, idx, PutPayload::default());
        match tokio::time::timeout(UPLOAD_PROBE_LIMIT, probe).await {
            // Its parts cut off mid-body while it is there: the link's fault, an outage.
            Ok(Ok(_)) => Ok(true),
            Ok(Err(source)) => {
                let e = upload_error(OP, &key, source);
                if upload_gone(&e) {
                    // The failures were this upload's (a store that answers a lost upload
                    // before reading the part), not an outage's: the upload started over
                    // must not be refused as one past the outage's deadline.
                    self.retry.answered_as(true, Shows::Wrote, None);
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            Err(_) => Err(StoreError::Op {
                op: OP,
                key,
                source: object_store::Error::Generic {
                    store: "c3-agent",
                    source: format!("no answer within {} s", UPLOAD_PROBE_LIMIT.as_secs()).into(),
                },
            }),
        }
    }

    /// Completes an upload. A retry after a lost acknowledgement (ours, or one object_store
    /// made inside a single call) finds the upload gone: if the blob exists, the earlier try
    /// went through, and the content-addressed key makes that a success whoever completed it.
    pub async fn complete_multipart(
        &self,
        sha256_hex: &str,
        upload_id: &str,
        size: u64,
        parts: Vec<String>,
    ) -> Result<(), StoreError> {
        // The store assembles `size` bytes (S3: minutes for a big object), and a complete
        // answered with an error looks for the blob for up to a minute and a half.
        let allowed = bulk_time(size) + Duration::from_secs(90);
        self.retrying_cut(
            || async {
                match self
                    .complete_multipart_once(sha256_hex, upload_id, parts.clone())
                    .await
                {
                    Err(e)
                        if self
                            .completed_meanwhile(sha256_hex, size, upload_gone(&e))
                            .await =>
                    {
                        tracing::debug!(error = %crate::error_chain(&e), "completed by an earlier try");
                        Ok(())
                    }
                    r => r,
                }
            },
            Some(allowed),
            true,
            |_, _| Shows::Wrote,
        )
        .await
    }

    /// Whether the blob exists now, or a moment later: a store may forget the upload id
    /// before it has finished assembling the object (s3s-fs does), so a retried complete can
    /// see neither the upload nor the blob for a while, the longer the larger the object:
    /// looked for over 1.25 s, or, once the upload is known gone, over 5 s or as long as
    /// assembling the object at 100 MB/s takes (at most 60 s).
    async fn completed_meanwhile(&self, sha256_hex: &str, size: u64, upload_gone: bool) -> bool {
        let patience = if upload_gone {
            Duration::from_millis((size / 100_000).clamp(5_000, 60_000))
        } else {
            Duration::from_millis(1_250)
        };
        let started = tokio::time::Instant::now();
        for wait_ms in [0u64, 250, 1000, 2000, 4000, 8000, 15_000, 30_000] {
            if wait_ms > 0 && started.elapsed() >= patience {
                break;
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            let found = self.stored_size(sha256_hex).await;
            if found.is_ok() {
                // Looked for over a minute, perhaps: the store answers, so the try is not
                // one a dead store holds, to be cut at the outage's deadline.
                self.retry.heard();
            }
            if matches!(found, Ok(Some(s)) if s == size) {
                return true;
            }
        }
        false
    }

    async fn complete_multipart_once(
        &self,
        sha256_hex: &str,
        upload_id: &str,
        parts: Vec<String>,
    ) -> Result<(), StoreError> {
        let (mp, path) = self.multipart_path(sha256_hex)?;
        let parts = parts
            .into_iter()
            .map(|content_id| PartId { content_id })
            .collect();
        mp.complete_multipart(&path, &upload_id.to_string(), parts)
            .await
            .map(|_| ())
            .map_err(|source| {
                upload_error("complete multipart upload", &blob_key(sha256_hex), source)
            })
    }

    /// Aborts an upload, retried as every operation is: an abort given up after one blip
    /// left the upload's parts billed at the store.
    pub async fn abort_multipart(
        &self,
        sha256_hex: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        self.retrying_write(
            || self.abort_multipart_once(sha256_hex, upload_id),
            |_, _| Shows::Nothing,
        )
        .await
    }

    async fn abort_multipart_once(
        &self,
        sha256_hex: &str,
        upload_id: &str,
    ) -> Result<(), StoreError> {
        let (mp, path) = self.multipart_path(sha256_hex)?;
        mp.abort_multipart(&path, &upload_id.to_string())
            .await
            .map_err(|source| upload_error("abort multipart upload", &blob_key(sha256_hex), source))
    }

    /// Makes a finished staging object (of `size` bytes) the blob `sha256_hex` unless that
    /// blob exists. Returns whether it was added. The staging object is gone either way.
    pub async fn promote(
        &self,
        staging_key: &str,
        sha256_hex: &str,
        size: u64,
    ) -> Result<bool, StoreError> {
        let key = blob_key(sha256_hex);
        let (from, to) = (StorePath::from(staging_key), StorePath::from(key.as_str()));
        match self.store()?.rename_if_not_exists(&from, &to).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => {
                // Only a regular file of the blob's size is the blob: anything else at its key
                // is replaced (a rename replaces a symlink, never follows it), and so is one
                // gc took in between or the touch could not reach (if old enough for gc). Trying the conditional
                // rename again instead went round for ever on a symlink at the key.
                let found = self.blob_is_file(sha256_hex).await?
                    && matches!(self.stored_size(sha256_hex).await, Ok(Some(s)) if s == size)
                    && self.still_wanted(sha256_hex).await?;
                if !found {
                    self.store()?
                        .rename(&from, &to)
                        .await
                        .map_err(|source| StoreError::Op {
                            op: "promote",
                            key: key.clone(),
                            source,
                        })?;
                    return Ok(true);
                }
                if let Some(root) = self.local_root() {
                    let (dir, blob) = (root.join("blobs/sha256"), root.join(&key));
                    let sync = self.dir_sync.clone();
                    local_blocking("promote", &key, self.file_limits.meta, move || {
                        sync.sync_found(&dir, &std::fs::symlink_metadata(&blob)?)
                    })
                    .await?;
                }
                self.delete(staging_key).await?;
                Ok(false)
            }
            Err(source) => Err(StoreError::Op {
                op: "promote",
                key,
                source,
            }),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store()?.delete(&StorePath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(StoreError::Op {
                op: "delete",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Keys under `prefix` (staging leftovers).
    /// The keys below `prefix`, at most `max` of them: a listing past that is a permanent
    /// error. A store or gateway that hands back its continuation token unchanged (or drops
    /// the one it was sent) pages for ever, and the keys were gathered without end.
    pub async fn list(&self, prefix: &str, max: usize) -> Result<Vec<String>, StoreError> {
        use futures::StreamExt;
        let op_error = |source| StoreError::Op {
            op: "list",
            key: prefix.to_string(),
            source,
        };
        let mut keys = Vec::new();
        let mut listing = self.store()?.list(Some(&StorePath::from(prefix)));
        while let Some(meta) = listing.next().await {
            if keys.len() == max {
                // Not a blip to list again: what asked for the listing decides without it.
                return Err(op_error(object_store::Error::NotSupported {
                    source: format!("the listing went past {max} keys").into(),
                }));
            }
            keys.push(meta.map_err(op_error)?.location.to_string());
        }
        Ok(keys)
    }

    pub async fn get_blob(&self, sha256_hex: &str) -> Result<GetResult, StoreError> {
        let key = blob_key(sha256_hex);
        self.retrying_read(|| async {
            self.get_once(&key)
                .await
                .map_err(|e| self.listed_read_error(e))
        })
        .await
    }

    /// A blob is read because a manifest lists it, a dataset's manifest because the spec
    /// names its job: a 404 without the store's word that the key is absent
    /// ([`BlobStore::says_absent`]) is a proxy's or load balancer's, retried as any blip.
    /// Taken as the object missing, one such answer failed a dataset at once, not retryable.
    pub(crate) fn listed_read_error(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Op {
                op,
                key,
                source: source @ object_store::Error::NotFound { .. },
            } if !self.says_absent_in(&source) => StoreError::BareNotFound { op, key, source },
            e => e,
        }
    }

    /// The blob from byte `offset` on (a download resumed where it broke off).
    pub async fn get_blob_from(
        &self,
        sha256_hex: &str,
        offset: u64,
    ) -> Result<GetResult, StoreError> {
        let key = blob_key(sha256_hex);
        self.retrying_read(|| async {
            let opts = object_store::GetOptions {
                range: Some(object_store::GetRange::Offset(offset)),
                ..Default::default()
            };
            self.store()?
                .get_opts(&StorePath::from(key.as_str()), opts)
                .await
                .map_err(|source| {
                    self.listed_read_error(StoreError::Op {
                        op: "get",
                        key: key.clone(),
                        source,
                    })
                })
        })
        .await
    }

    pub async fn get(&self, key: &str) -> Result<GetResult, StoreError> {
        self.retrying_read(|| self.get_once(key)).await
    }

    async fn get_once(&self, key: &str) -> Result<GetResult, StoreError> {
        self.store()?
            .get(&StorePath::from(key))
            .await
            .map_err(|source| StoreError::Op {
                op: "get",
                key: key.to_string(),
                source,
            })
    }

    /// Reads a small object whole (a manifest).
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let result = self.get(key).await?;
        result.bytes().await.map_err(|source| StoreError::Op {
            op: "get",
            key: key.to_string(),
            source,
        })
    }

    /// Reads a document whole, refusing one larger than `max` bytes (checked on the object's
    /// size and again while reading: the store's word is not trusted).
    pub async fn get_bytes_capped(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        // The request and its body together: a body that breaks off (a reset after the
        // headers) is a blip like a failed request, and a dataset's manifest failed on one.
        self.retrying_read(|| self.get_bytes_capped_once(key, max))
            .await
    }

    /// [`BlobStore::get_bytes_capped`] of a document a spec names, which the store should
    /// hold: a bare 404 is a blip ([`BlobStore::listed_read_error`]).
    pub async fn get_bytes_capped_listed(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        self.retrying_read(|| async {
            self.get_bytes_capped_once(key, max)
                .await
                .map_err(|e| self.listed_read_error(e))
        })
        .await
    }

    async fn get_bytes_capped_once(&self, key: &str, max: u64) -> Result<Bytes, StoreError> {
        use futures::StreamExt;
        let too_large = |size: u64| StoreError::TooLarge {
            key: key.to_string(),
            size,
            max,
        };
        let result = self.get_once(key).await?;
        if result.meta.size > max {
            return Err(too_large(result.meta.size));
        }
        // The size is the store's word: room for a small document up front, the rest as read.
        let mut out = bytes::BytesMut::with_capacity(result.meta.size.min(1 << 20) as usize);
        let mut body = result.into_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| StoreError::Op {
                op: "get",
                key: key.to_string(),
                source,
            })?;
            if (out.len() + chunk.len()) as u64 > max {
                return Err(too_large((out.len() + chunk.len()) as u64));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    /// Streams the blob (at most `size` bytes, its manifest entry's) into `out` a chunk at a
    /// time, and says whether what came is that blob: exactly `size` bytes hashing to its
    /// key. For readers that show bytes as they come (`c3-agent logs`): a multi-GiB log is
    /// never held whole, and a lying store is caught at the end. `out` returns false to stop
    /// (its reader went away): `Ok(true)` then, as nothing false was shown.
    pub async fn stream_blob(
        &self,
        sha256_hex: &str,
        size: u64,
        mut out: impl FnMut(&[u8]) -> bool,
    ) -> Result<bool, StoreError> {
        use futures::StreamExt;
        let key = blob_key(sha256_hex);
        let mut body = self.get_blob(sha256_hex).await?.into_stream();
        let (mut hasher, mut seen) = (crate::digest::Sha256Hasher::default(), 0u64);
        // A body that breaks off (a reset; a log whose transfer outlasts a request's time
        // limit) goes on from the byte it reached, as a pull's does: a log of a few GiB on a
        // slow link never arrived whole otherwise.
        let mut fruitless = 0;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(source) if seen < size && fruitless < MAX_STREAM_RESUMES => {
                    fruitless += 1;
                    tracing::debug!(key = %key, seen, error = %crate::error_chain(&source), "download broke off; resuming");
                    body = self.get_blob_from(sha256_hex, seen).await?.into_stream();
                    continue;
                }
                Err(source) => {
                    return Err(StoreError::Op {
                        op: "get",
                        key: key.clone(),
                        source,
                    })
                }
            };
            if !chunk.is_empty() {
                fruitless = 0;
            }
            seen += chunk.len() as u64;
            if seen > size {
                return Ok(false);
            }
            hasher.update(&chunk);
            if !out(&chunk) {
                return Ok(true);
            }
        }
        Ok(seen == size && hasher.finish_hex() == sha256_hex)
    }

    /// Overwrites a small document (a manifest): a single PUT, never torn.
    pub async fn put_document(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.retrying_sized(
            || self.put_document_once(key, bytes.clone()),
            bytes.len() as u64,
        )
        .await
    }

    async fn put_document_once(&self, key: &str, bytes: Bytes) -> Result<(), StoreError> {
        self.store()?
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|source| write_error("put", key, source))
    }

    /// The version of the document at `key` (`None`: there is none).
    pub async fn document_version(&self, key: &str) -> Result<Option<DocVersion>, StoreError> {
        self.retrying_read(|| self.document_version_once(key)).await
    }

    async fn document_version_once(&self, key: &str) -> Result<Option<DocVersion>, StoreError> {
        match self.store()?.head(&StorePath::from(key)).await {
            Ok(meta) => Ok(Some(DocVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(StoreError::Op {
                op: "head",
                key: key.to_string(),
                source,
            }),
        }
    }

    /// Writes a document only over `expected` (`None`: only where there is none), so that
    /// what another writer put there meanwhile is never replaced unseen: `Changed` then,
    /// and the caller looks again. Where the store cannot write conditionally (the file
    /// store; object_store's `LocalFileSystem` has no `PutMode::Update`) the version is
    /// checked by a HEAD just before a plain write: a write landing between the two is
    /// replaced (a window of one round trip on the node's own disk).
    pub async fn put_document_over(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&DocVersion>,
    ) -> Result<DocWrite, StoreError> {
        self.retrying_write(
            || self.put_document_over_once(key, bytes.clone(), expected),
            |put, _| match put {
                DocWrite::Written(_) => Shows::Wrote,
                DocWrite::Changed => Shows::Nothing,
            },
        )
        .await
    }

    async fn put_document_over_once(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&DocVersion>,
    ) -> Result<DocWrite, StoreError> {
        let op_error = |source| write_error("put", key, source);
        let path = StorePath::from(key);
        if self
            .no_conditional_put
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return self.put_document_checked(key, bytes, expected).await;
        }
        let updating = expected.is_some();
        let mode = match expected {
            None => PutMode::Create,
            // A version with nothing to match (a store that sends no ETag) cannot be asked for.
            Some(v) if self.is_local() || v.e_tag.is_none() && v.version.is_none() => {
                return self.put_document_checked(key, bytes, Some(v)).await
            }
            Some(v) => PutMode::Update(v.clone()),
        };
        match self
            .store()?
            .put_opts(&path, PutPayload::from(bytes.clone()), mode.into())
            .await
        {
            Ok(put) => Ok(DocWrite::Written(put.into())),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(DocWrite::Changed),
            // A document gone since (a lifecycle rule, an operator): AWS answers If-Match on a
            // key that is not there with 404 NoSuchKey, not 412. Taken as a write's blip, it
            // was retried to the deadline, every checkpoint and the job's key failed, and no
            // fresh look was made.
            Err(e @ object_store::Error::NotFound { .. }) if updating && says(&e, "NoSuchKey") => {
                Ok(DocWrite::Changed)
            }
            // No conditional write here after all: object_store's own refusal, or an
            // S3-compatible store's 501 for If-Match (retried as a server error until the
            // deadline otherwise). Checked as on the file store.
            Err(e)
                if matches!(e, object_store::Error::NotImplemented { .. })
                    || says(&e, "<Code>NotImplemented</Code>") =>
            {
                self.put_document_checked(key, bytes, expected).await
            }
            Err(source) => Err(op_error(source)),
        }
    }

    /// [`BlobStore::put_document_over`] without a conditional write: HEAD, then a plain PUT.
    /// `expected`: `None` for "only if there is none".
    async fn put_document_checked(
        &self,
        key: &str,
        bytes: Bytes,
        expected: Option<&DocVersion>,
    ) -> Result<DocWrite, StoreError> {
        if self.document_version_once(key).await?.as_ref() != expected {
            return Ok(DocWrite::Changed);
        }
        let put = self
            .store()?
            .put(&StorePath::from(key), PutPayload::from(bytes))
            .await
            .map_err(|source| write_error("put", key, source))?;
        Ok(DocWrite::Written(put.into()))
    }

    /// The highest attempt of `job_id` with a manifest at its attempt's key, if any: each
    /// attempt writes that key before the job's.
    pub async fn newest_attempt(&self, job_id: &str) -> Result<Option<u32>, StoreError> {
        let prefix = format!("jobs/{job_id}/attempts/");
        self.retrying_read(|| self.newest_attempt_once(&prefix))
            .await
    }

    /// One listing of the attempts, read as it comes: only the highest number is kept, and a
    /// key over [`MAX_ATTEMPT_KEY_BYTES`] is passed over. Gathered whole, a hostile listing
    /// (100,000 keys of 16 MiB each) was held in the root agent's memory. One past
    /// [`MAX_ATTEMPT_KEYS`] is refused for good; one that outlasts the retry deadline (pages
    /// that trickle, a store that stops answering) is a transient failure like any slow
    /// request: taken for a refusal, it let the manifest writer go ahead without a look, and a
    /// late attempt's manifest replaced the newer attempt's at the job's key.
    async fn newest_attempt_once(&self, prefix: &str) -> Result<Option<u32>, StoreError> {
        use futures::StreamExt;
        let op_error = |source| StoreError::Op {
            op: "list",
            key: prefix.to_string(),
            source,
        };
        let refused =
            |why: String| op_error(object_store::Error::NotSupported { source: why.into() });
        let mut listing = self.store()?.list(Some(&StorePath::from(prefix)));
        let listed = async {
            let (mut newest, mut seen) = (None, 0);
            while let Some(meta) = listing.next().await {
                seen += 1;
                if seen > MAX_ATTEMPT_KEYS {
                    return Err(refused(format!(
                        "the listing went past {MAX_ATTEMPT_KEYS} keys"
                    )));
                }
                let key = meta.map_err(op_error)?.location;
                let key = key.as_ref();
                if key.len() > MAX_ATTEMPT_KEY_BYTES {
                    continue;
                }
                let n = key
                    .strip_prefix(prefix)
                    .and_then(|k| k.strip_suffix("/manifest.json"))
                    .and_then(|n| n.parse::<u32>().ok());
                newest = newest.max(n);
            }
            Ok(newest)
        };
        let limit = self.retry.deadline;
        tokio::time::timeout(limit, listed)
            .await
            .unwrap_or_else(|_| {
                Err(op_error(object_store::Error::Generic {
                    store: "c3-agent",
                    source: format!(
                        "the listing went on past {} s (store.retry_deadline_secs)",
                        limit.as_secs()
                    )
                    .into(),
                }))
            })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// Directories (device, inode) whose owner a test says root_squash made: a root_squash
    /// export cannot be had in a unit test.
    static SQUASHED: std::sync::Mutex<Vec<(u64, u64, u32)>> = std::sync::Mutex::new(Vec::new());

    pub(crate) fn squash_said(st: &nix::sys::stat::FileStat) -> Option<u32> {
        let said = SQUASHED.lock().unwrap_or_else(|p| p.into_inner());
        said.iter()
            .find(|(dev, ino, _)| (*dev, *ino) == (st.st_dev, st.st_ino))
            .map(|&(.., uid)| uid)
    }

    /// Has the vet take `dir` for a root_squash store, whose root's files `uid` owns.
    pub(crate) fn say_squashed(dir: &std::path::Path, uid: u32) {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(dir).unwrap();
        let mut said = SQUASHED.lock().unwrap_or_else(|p| p.into_inner());
        said.push((md.dev(), md.ino(), uid));
    }

    /// One store spelt two ways is one identity: a run record written under one spelling
    /// (the job unit's environment) is finished by a `recover` configured with the other.
    /// Two stores are two.
    #[test]
    fn one_store_spelt_two_ways_is_one_identity() {
        let id = super::store_identity;
        assert_eq!(id("s3://b/p/"), id("s3://b/p"));
        assert_eq!(id("s3a://b/p"), id("s3://b/p"));
        assert_eq!(id("s3://AK:SK@b/p?X-Amz-Signature=s"), "s3://b/p");
        assert_eq!(id("azure://c/x"), id("az://c/x/"));
        assert_eq!(id("file:///var/store/"), id("file:///var/store"));
        assert_ne!(id("s3://b/p"), id("s3://b/q"));
        assert_ne!(id("s3://b/p"), id("gs://b/p"));
        assert_ne!(
            id("abfss://c1@acct.dfs.core.windows.net/x"),
            id("abfss://c2@acct.dfs.core.windows.net/x")
        );
    }

    use super::*;

    /// A role configured in the options (web identity, a pod-identity endpoint) or unsigned
    /// requests are object_store's to use: root's default profile (an admin's keys) must not
    /// take their place, and with no profile the preflight must not ask the instance metadata.
    /// Only the keys and the relative container URI counted: every tenant's artifacts were
    /// written with the admin's keys, or the preflight failed off AWS.
    #[test]
    fn configured_credentials_are_not_replaced_by_roots_profile() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".aws")).unwrap();
        std::fs::write(
            home.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = ADMIN\naws_secret_access_key = ADMINSECRET\n",
        )
        .unwrap();
        let with_home = {
            let home = home.path().display().to_string();
            move |k: &str| (k == "HOME").then(|| home.clone())
        };
        let no_home = |_: &str| None;
        let builder = |options: &[(&str, &str)]| {
            options
                .iter()
                .fold(AmazonS3Builder::new().with_url("s3://b/p"), |b, (k, v)| {
                    b.with_config(k.parse().unwrap(), *v)
                })
        };
        let judged = |options: &[(&str, &str)], env: &dyn Fn(&str) -> Option<String>| {
            let (b, c) = s3_credentials_with(builder(options), env);
            let profile = format!("{b:?}").contains("ProfileCredentials");
            (c, profile)
        };
        let given = |c: &Credentials| matches!(c, Credentials::Given);
        let metadata = |c: &Credentials| matches!(c, Credentials::InstanceMetadata(_));
        // The profile is used when nothing else is configured (the test's premise).
        let (c, profile) = judged(&[], &with_home);
        assert!(given(&c) && profile);
        for options in [
            &[
                ("aws_web_identity_token_file", "/var/run/token"),
                ("aws_role_arn", "arn:aws:iam::1:role/r"),
            ][..],
            &[
                (
                    "aws_container_credentials_full_uri",
                    "http://127.0.0.1:80/c",
                ),
                ("aws_container_authorization_token_file", "/var/run/t"),
            ],
            &[("aws_skip_signature", "true")],
            &[("aws_skip_signature", "YES")],
        ] {
            let (c, profile) = judged(options, &with_home);
            assert!(
                given(&c) && !profile,
                "{options:?}: the profile took their place"
            );
            let (c, _) = judged(options, &no_home);
            assert!(
                given(&c),
                "{options:?}: the preflight would ask the instance metadata"
            );
        }
        // Half of a pair is nothing to object_store, which falls back to the instance metadata.
        for options in [
            &[("aws_web_identity_token_file", "/var/run/token")][..],
            &[(
                "aws_container_credentials_full_uri",
                "http://127.0.0.1:80/c",
            )],
            &[("aws_skip_signature", "false")],
        ] {
            let (c, _) = judged(options, &no_home);
            assert!(metadata(&c), "{options:?}");
        }
    }

    /// Only the whole request is bounded by default: reqwest's read timeout would also bound
    /// a request body's upload to the reply's headers, and failed parts that took a minute
    /// to send.
    #[test]
    fn a_store_request_has_no_default_read_timeout() {
        let set = bounded(
            Vec::new(),
            "C3_TEST_NO_SUCH_",
            |mut v: Vec<String>, k, val| {
                v.push(format!("{}={val}", k.as_ref()));
                v
            },
        );
        assert_eq!(set, ["timeout=300s"]);
    }

    /// A 4xx refuses the request as it is: a proxy's 413 for a large part, retried until the
    /// deadline, failed the upload after 10 minutes rather than at once. Those a later try
    /// may not get are retried.
    #[test]
    fn a_4xx_is_permanent_but_for_those_a_later_try_may_pass() {
        let status = |s: &str| {
            std::io::Error::other(format!("Server returned non-2xx status code: {s}: <html>"))
        };
        for s in [
            "413 Payload Too Large",
            "405 Method Not Allowed",
            "411 Length Required",
            "414 URI Too Long",
            "416 Range Not Satisfiable",
            "431 Request Header Fields Too Large",
            "400 Bad Request",
        ] {
            assert!(permanent_cause(&status(s), false), "{s}");
        }
        for s in [
            "408 Request Timeout",
            "429 Too Many Requests",
            "421 Misdirected Request",
            "423 Locked",
            "425 Too Early",
            "503 Service Unavailable",
            "500 Internal Server Error",
        ] {
            assert!(!permanent_cause(&status(s), false), "{s}");
        }
        let e = std::io::Error::other(
            "Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>",
        );
        assert!(!permanent_cause(&e, false));
        let op = StoreError::Op {
            op: "upload part",
            key: "k".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: Box::new(status("413 Payload Too Large")),
            },
        };
        assert!(op.is_permanent());
        // A redirect to another origin, not followed: the next try meets it again.
        let away = object_store::Error::Generic {
            store: "S3",
            source: Box::new(crate::httpcap::RedirectedAway {
                method: "PUT".into(),
                to: "elsewhere".into(),
            }),
        };
        assert!(permanent_cause(&away, false));
    }

    /// Only a failure whose request may have been done by the store counts a blob found
    /// stored after it as its own ([`BlobPut::Landed`]): a throttle or a connection never
    /// made is a request the store did not take, and a blob another job stored a moment
    /// before was counted twice.
    #[test]
    fn only_a_lost_answer_may_have_been_applied() {
        let failed = |text: &str| StoreError::Op {
            op: "put",
            key: "k".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: text.to_string().into(),
            },
        };
        for (text, applied) in [
            ("Server returned non-2xx status code: 500 Internal Server Error: ", true),
            ("Server returned non-2xx status code: 504 Gateway Timeout: ", true),
            ("error sending request: connection closed before message completed", true),
            ("error sending request: operation timed out", true),
            ("Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>", false),
            ("Server returned non-2xx status code: 429 Too Many Requests: ", false),
            ("Server returned non-2xx status code: 400 Bad Request: <Code>RequestTimeout</Code>", false),
            ("error sending request: client error (Connect): tcp connect error: Connection refused", false),
            ("error sending request: client error (Connect): dns error: failed to lookup", false),
        ] {
            assert_eq!(failed(text).may_have_been_applied(), applied, "{text}");
        }
        let cut = StoreError::PastDeadline {
            tried: true,
            failing_secs: 1,
            deadline_secs: 1,
            latest: String::new(),
        };
        assert!(!cut.may_have_been_applied());
    }

    /// A 403 for the request's date (S3's RequestTimeTooSkewed, Azure's "Request date header
    /// too old") is the node's clock, set soon after boot: retried through the outage, said
    /// to be the clock, and no HEAD denial. It was a denial, and the job's final sync failed
    /// at once. Any other 403 stays a denial.
    #[test]
    fn a_refusal_of_the_nodes_clock_is_retried_and_named() {
        let denied = |op: &'static str, body: &str| StoreError::Op {
            op,
            key: "k".into(),
            source: object_store::Error::PermissionDenied {
                path: "k".into(),
                source: format!("Server returned non-2xx status code: 403 Forbidden: {body}")
                    .into(),
            },
        };
        for body in [
            "<Error><Code>RequestTimeTooSkewed</Code><Message>The difference between the request time and the current time is too large.</Message></Error>",
            "<Error><Code>AuthenticationFailed</Code><AuthenticationErrorDetail>Request date header too old: 'Fri, 04 Oct 2019 18:02:12 GMT'</AuthenticationErrorDetail></Error>",
        ] {
            let e = denied("put", body);
            assert!(!e.is_permanent(), "{body}");
            assert!(e.node_hint().contains("clock"), "{body}");
            assert!(!denied("head", body).is_head_denied(), "{body}");
        }
        let e = denied("head", "<Error><Code>AccessDenied</Code></Error>");
        assert!(e.is_permanent() && e.is_head_denied() && e.node_hint().is_empty());
        // A key (a job's id) that names the code is no clock: the denial is permanent.
        let key = "jobs/RequestTimeTooSkewed/Request date header too old/manifest.json";
        let e = StoreError::Op {
            op: "get",
            key: key.into(),
            source: object_store::Error::PermissionDenied {
                path: key.into(),
                source: format!(
                    "Error performing GET http://s3/b/{} - Server returned non-2xx status code: 403 Forbidden: <Error><Code>AccessDenied</Code></Error>",
                    key.replace(' ', "%20")
                )
                .into(),
            },
        };
        assert!(!e.clock_skewed(), "{e}");
        assert!(e.is_permanent() && e.node_hint().is_empty(), "{e}");
    }

    #[test]
    fn a_store_that_ignores_a_range_request_is_not_retried() {
        let e = std::io::Error::other("Received non-partial response when range requested");
        assert!(permanent_cause(&e, false));
        let e = std::io::Error::other("Requested 100..200, got 0..200");
        assert!(permanent_cause(&e, false));
        let e = std::io::Error::other("error decoding response body");
        assert!(!permanent_cause(&e, false));
    }

    #[test]
    fn endpoint_urls_name_a_host_and_port() {
        let hp = |e: &str| endpoint_host_port(e);
        assert_eq!(
            hp("http://169.254.169.254"),
            Some(("169.254.169.254".into(), 80))
        );
        assert_eq!(
            hp("http://[fd00:ec2::254]"),
            Some(("fd00:ec2::254".into(), 80))
        );
        assert_eq!(hp("https://h:8443/x"), Some(("h".into(), 8443)));
        assert_eq!(hp("not a url"), None);
    }

    /// Only the store's NoSuchUpload is an upload gone; a bare 404 to a part (a proxy's) is
    /// retried.
    #[test]
    fn only_no_such_upload_is_an_upload_gone() {
        let not_found = |body: &str| object_store::Error::NotFound {
            path: "k".into(),
            source: format!("Server returned non-2xx status code: 404 Not Found: {body}").into(),
        };
        let gone = upload_error(
            "upload part",
            "k",
            not_found("<Error><Code>NoSuchUpload</Code></Error>"),
        );
        assert!(upload_gone(&gone) && gone.is_permanent(), "{gone:?}");
        let blip = upload_error("upload part", "k", not_found(""));
        assert!(!upload_gone(&blip) && !blip.is_permanent(), "{blip:?}");
    }

    /// An EPERM on the way to a remote store is the node's network (a full conntrack table,
    /// a firewall reload): retried. On the file store it is the directory's mode: not.
    #[test]
    fn an_io_permission_error_is_permanent_only_on_the_file_store() {
        let op = |store: &'static str| StoreError::Op {
            op: "put",
            key: "k".into(),
            source: object_store::Error::Generic {
                store,
                source: Box::new(std::io::Error::from_raw_os_error(libc::EPERM)),
            },
        };
        assert!(!op("S3").is_permanent());
        assert!(!op("MicrosoftAzure").is_permanent());
        assert!(op("LocalFileSystem").is_permanent());
    }

    /// One outage, one deadline, whichever operation meets it; but an outage left behind by
    /// operations that were cancelled (nobody failed for a deadline's time) is not held
    /// against the next one, and the final sync gets a whole deadline of its own.
    #[tokio::test(start_paused = true)]
    async fn an_outage_has_one_deadline_unless_it_went_stale() {
        let retry = Retry::new(Duration::from_secs(10));
        let e = StoreError::NotThere {
            key: "k".into(),
            found: "nothing".into(),
        };
        let start = tokio::time::Instant::now();
        assert_eq!(
            retry.failed(&e, tokio::time::Instant::now(), true),
            start + Duration::from_secs(10)
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            retry.failed(&e, tokio::time::Instant::now(), true),
            start + Duration::from_secs(10)
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        retry.restart_clock();
        assert_eq!(
            retry.failed(&e, tokio::time::Instant::now(), true),
            start + Duration::from_secs(18)
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(
            retry.failed(&e, tokio::time::Instant::now(), true),
            now + Duration::from_secs(10)
        );
        retry.answered(true);
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(
            retry.failed(&e, tokio::time::Instant::now(), true),
            now + Duration::from_secs(10)
        );
    }

    /// A transient failure that takes `secs` to come, as from an unreachable host or a
    /// connection accepted and never answered.
    async fn fails_after(secs: u64) -> Result<(), StoreError> {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        Err(StoreError::NotThere {
            key: "k".into(),
            found: "no answer".into(),
        })
    }

    /// A document gone since its writer's last write (a lifecycle rule, an operator): AWS
    /// answers the If-Match PUT with 404 NoSuchKey. It is "changed" (look again), not a blip
    /// retried to the deadline.
    #[tokio::test(start_paused = true)]
    async fn an_update_of_a_document_gone_is_changed() {
        let faulty = Arc::new(Faulty {
            update_of_nothing_404: true,
            ..Default::default()
        });
        let mut store = store_over(faulty, Duration::from_secs(600));
        store.url = "s3://bucket".into();
        let version = DocVersion {
            e_tag: Some("\"gone\"".into()),
            version: None,
        };
        let started = tokio::time::Instant::now();
        let put = store
            .put_document_over(
                "jobs/j/manifest.json",
                Bytes::from_static(b"{}"),
                Some(&version),
            )
            .await;
        assert!(matches!(put, Ok(DocWrite::Changed)), "{put:?}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "retried as a blip"
        );
    }

    fn store_with_deadline(secs: u64) -> BlobStore {
        let mut store = BlobStore::in_memory();
        store.retry = Retry::new(Duration::from_secs(secs));
        store
    }

    /// Failures that take a request timeout each (300 s) against a 60 s deadline: the first
    /// try was made before anyone knew of the outage and takes its 300 s; after it, nothing
    /// may hold an operation past the deadline. One first try per operation held a dead
    /// store's final sync 300 s per file in turn (1,000 files, 16 at a time: over 5 hours).
    #[tokio::test(start_paused = true)]
    async fn slow_failures_end_by_the_outage_deadline() {
        let bound = Duration::from_secs(60 + 300);
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        for _ in 0..8 {
            assert!(store.retrying(|| fails_after(300)).await.is_err());
        }
        assert!(start.elapsed() <= bound, "{:?}", start.elapsed());

        // 16 operations in flight, 8 each.
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..16 {
            let store = store.clone();
            workers.spawn(async move {
                for _ in 0..8 {
                    assert!(store.retrying(|| fails_after(300)).await.is_err());
                }
            });
        }
        while let Some(done) = workers.join_next().await {
            done.unwrap();
        }
        assert!(start.elapsed() <= bound, "{:?}", start.elapsed());

        // A try that starts during an outage gets what is left of its deadline, no more.
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        store
            .retry
            .failed(&StoreError::Contended { key: "k".into() }, start, true);
        tokio::time::advance(Duration::from_secs(20)).await;
        let e = store.retrying(|| fails_after(300)).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        assert!(
            matches!(e, StoreError::PastDeadline { tried: true, .. }),
            "{e}"
        );
    }

    /// A slow try is booked at its start: one that took longer than the deadline to fail
    /// neither restarts the clock of the outage it met (stale) nor begins a new one late.
    #[tokio::test(start_paused = true)]
    async fn a_slow_failure_does_not_make_its_outage_look_new() {
        let retry = Retry::new(Duration::from_secs(10));
        let e = StoreError::Contended { key: "k".into() };
        let start = tokio::time::Instant::now();
        assert_eq!(
            retry.failed(&e, start, true),
            start + Duration::from_secs(10)
        );
        tokio::time::advance(Duration::from_secs(300)).await;
        let second = start + Duration::from_secs(5);
        assert_eq!(
            retry.failed(&e, second, true),
            start + Duration::from_secs(10)
        );
        retry.answered(true);
        let answered = tokio::time::Instant::now();
        tokio::time::advance(Duration::from_secs(300)).await;
        // Failed after 300 s; but not before the store last answered.
        assert_eq!(
            retry.failed(&e, start, true),
            answered + Duration::from_secs(10)
        );
    }

    /// No outage known, a try the store never answers is cut at the deadline, but for the
    /// time its bytes may take at the floor rate: it took the client's whole time-out (300 s,
    /// and object_store's retries), past a shorter `retry_deadline_secs`.
    #[tokio::test(start_paused = true)]
    async fn an_unanswered_try_is_cut_at_the_deadline_with_no_outage_known() {
        let hangs = || async {
            tokio::time::sleep(Duration::from_secs(300)).await;
            Ok::<_, StoreError>(())
        };
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        let e = store.retrying(hangs).await.unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        assert!(
            matches!(e, StoreError::PastDeadline { tried: true, .. }) && !e.is_permanent(),
            "{e}"
        );
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        let e = store
            .retrying_sized(hangs, 120 * BULK_FLOOR_BYTES_PER_SEC)
            .await
            .unwrap_err();
        assert_eq!(start.elapsed(), Duration::from_secs(120), "{e}");
    }

    /// A slow request while the store answers (a big part whose bytes flow for minutes) is
    /// not cut before its bytes' time, nor one made during a blip that ended while it ran.
    #[tokio::test(start_paused = true)]
    async fn a_slow_request_while_the_store_answers_is_not_cut() {
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        let slow_ok = || async {
            tokio::time::sleep(Duration::from_secs(600)).await;
            Ok::<_, StoreError>(())
        };
        // 200 MiB at the floor rate: 914 s.
        store.retrying_sized(slow_ok, 200 << 20).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(600));

        store
            .retry
            .failed(&StoreError::Contended { key: "k".into() }, start, true);
        let start = tokio::time::Instant::now();
        let answered = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.retrying(|| async { Ok::<_, StoreError>(()) }).await
        };
        let (slow, answered) = tokio::join!(store.retrying_sized(slow_ok, 200 << 20), answered);
        slow.unwrap();
        answered.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(600));

        // A try within which the store answered (a complete's look for its blob).
        let start = tokio::time::Instant::now();
        store
            .retry
            .failed(&StoreError::Contended { key: "k".into() }, start, true);
        let look = || async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.retry.heard();
            tokio::time::sleep(Duration::from_secs(90)).await;
            Ok::<_, StoreError>(())
        };
        let looked = store
            .retrying_sized(look, 100 * BULK_FLOOR_BYTES_PER_SEC)
            .await;
        assert!(looked.is_ok(), "{looked:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(91));
        // Heard, it is held to what a try made with no outage known is: the deadline, or its
        // bytes' time (a request the store never answers among others it does).
        let start = tokio::time::Instant::now();
        store
            .retry
            .failed(&StoreError::Contended { key: "k".into() }, start, true);
        let looked = store.retrying(look).await;
        assert!(
            matches!(looked, Err(StoreError::PastDeadline { .. })),
            "{looked:?}"
        );
        assert_eq!(start.elapsed(), Duration::from_secs(60));

        // A whole staged upload that follows a blip nobody else answered since.
        let start = tokio::time::Instant::now();
        store
            .retry
            .failed(&StoreError::Contended { key: "k".into() }, start, true);
        let whole = store
            .retrying_whole(|| async {
                tokio::time::sleep(Duration::from_secs(600)).await;
                Ok::<_, Result<(), StoreError>>(())
            })
            .await;
        assert!(matches!(whole, Ok(Ok(()))), "{whole:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(600));
    }

    /// Past the deadline an operation fails without a try, but for one probe at a time,
    /// [`PROBE_EVERY`] apart, which finds the store back.
    #[tokio::test(start_paused = true)]
    async fn past_the_deadline_one_probe_at_a_time_finds_the_store_back() {
        let store = store_with_deadline(60);
        let start = tokio::time::Instant::now();
        let e = StoreError::Contended { key: "k".into() };
        store.retry.failed(&e, start, true);
        tokio::time::advance(Duration::from_secs(55)).await;
        store.retry.failed(&e, tokio::time::Instant::now(), true);
        tokio::time::advance(Duration::from_secs(6)).await;
        let tries = std::sync::atomic::AtomicUsize::new(0);
        let counted = |secs| {
            tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            fails_after(secs)
        };
        let probe = store.retrying(|| counted(100));
        let refused = async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            store.retrying(|| counted(0)).await
        };
        let (probe, refused) = tokio::join!(probe, refused);
        assert!(
            matches!(probe, Err(StoreError::PastDeadline { tried: true, .. })),
            "{probe:?}"
        );
        let refused = refused.unwrap_err();
        assert!(
            matches!(refused, StoreError::PastDeadline { tried: false, .. }),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("`k` kept changing"),
            "{refused}"
        );
        assert_eq!(tries.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert_eq!(start.elapsed(), Duration::from_secs(61) + PROBE_BOUND);
        // Right after a probe: none; PROBE_EVERY later, one, and the store answers it.
        assert!(store.retrying(|| counted(0)).await.is_err());
        assert_eq!(tries.load(std::sync::atomic::Ordering::Relaxed), 1);
        tokio::time::advance(PROBE_EVERY).await;
        store
            .retrying(|| async { Ok::<_, StoreError>(()) })
            .await
            .unwrap();
        assert!(store.retry.lock().outage.is_none());
    }

    impl Retry {
        /// [`Retry::failed_in`] of an operation that booked no failure before.
        fn failed(
            &self,
            e: &StoreError,
            started: tokio::time::Instant,
            write: bool,
        ) -> tokio::time::Instant {
            self.failed_in(e, started, write, &mut None)
        }

        /// [`Retry::answered_as`] of an operation that failed no try before, a write that
        /// wrote.
        fn answered(&self, write: bool) {
            let shows = if write { Shows::Wrote } else { Shows::Nothing };
            self.answered_as(write, shows, None)
        }
    }

    /// A store that answers reads and, while `refusing`, refuses every write with a 503 (its
    /// disk full behind it) but a create-if-absent of a key it holds, which it answers as S3
    /// does, before taking any bytes: "exists". With `flaky_puts` at n, every n-th PUT fails
    /// with a 503 whatever its key (a store failing at random), and with `flaky_heads` at n
    /// every n-th HEAD. Its listings are as `listing` says.
    #[derive(Debug, Default)]
    pub(crate) struct Faulty {
        pub(crate) mem: object_store::memory::InMemory,
        pub(crate) refusing: std::sync::atomic::AtomicBool,
        pub(crate) flaky_puts: usize,
        /// PUTs so far, for `flaky_puts`.
        pub(crate) puts: std::sync::atomic::AtomicUsize,
        pub(crate) flaky_heads: usize,
        /// HEADs so far, for `flaky_heads`.
        pub(crate) heads: std::sync::atomic::AtomicUsize,
        pub(crate) listing: Listing,
        /// A key whose PUTs are refused for good (403), after `flaky_puts`' blips.
        pub(crate) denied: std::sync::Mutex<Option<String>>,
        /// A key whose PUTs never answer.
        pub(crate) hanging: std::sync::Mutex<Option<String>>,
        /// Every GET's body is an empty chunk, then a reset.
        pub(crate) empty_then_broken_gets: bool,
        /// Every GET's body is its first byte, then a reset.
        pub(crate) byte_then_broken_gets: bool,
        /// A PUT `If-Match` of a key not there: 404 NoSuchKey, as AWS answers it.
        pub(crate) update_of_nothing_404: bool,
        /// GETs so far (not HEADs).
        pub(crate) gets: std::sync::atomic::AtomicUsize,
        /// How many GETs (from the first) a proxy answers with its own 404, no body.
        pub(crate) bare_404_gets: std::sync::atomic::AtomicUsize,
    }

    /// What a [`Faulty`] store's listings give.
    #[derive(Debug, Default)]
    pub(crate) enum Listing {
        /// What it holds.
        #[default]
        Held,
        /// Nothing, ever: a listing never answers.
        Hanging,
        /// `n` keys of 1 MiB below `jobs/j/attempts/`, then attempts 3's and 7's manifests.
        HugeKeys(usize),
    }

    impl std::fmt::Display for Faulty {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Faulty")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put_opts(
            &self,
            location: &StorePath,
            payload: PutPayload,
            opts: object_store::PutOptions,
        ) -> object_store::Result<object_store::PutResult> {
            let unavailable = || object_store::Error::Generic {
                store: "S3",
                source: "Server returned non-2xx status code: 503 Service Unavailable: ".into(),
            };
            let nth = self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if self.flaky_puts > 0 && nth.is_multiple_of(self.flaky_puts) {
                return Err(unavailable());
            }
            if self.hanging.lock().unwrap().as_deref() == Some(location.as_ref()) {
                std::future::pending::<()>().await;
            }
            if self.denied.lock().unwrap().as_deref() == Some(location.as_ref()) {
                return Err(object_store::Error::PermissionDenied {
                    path: location.to_string(),
                    source: "403 Access Denied".into(),
                });
            }
            if self.update_of_nothing_404
                && matches!(opts.mode, PutMode::Update(_))
                && self.mem.head(location).await.is_err()
            {
                return Err(object_store::Error::NotFound {
                    path: location.to_string(),
                    source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchKey</Code></Error>".into(),
                });
            }
            if !self.refusing.load(std::sync::atomic::Ordering::Relaxed) {
                return self.mem.put_opts(location, payload, opts).await;
            }
            if opts.mode == PutMode::Create && self.mem.head(location).await.is_ok() {
                return Err(object_store::Error::AlreadyExists {
                    path: location.to_string(),
                    source: "412 Precondition Failed".into(),
                });
            }
            Err(unavailable())
        }
        async fn put_multipart_opts(
            &self,
            location: &StorePath,
            opts: object_store::PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.mem.put_multipart_opts(location, opts).await
        }
        async fn get_opts(
            &self,
            location: &StorePath,
            options: object_store::GetOptions,
        ) -> object_store::Result<GetResult> {
            if options.head && self.flaky_heads > 0 {
                let nth = self
                    .heads
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if nth.is_multiple_of(self.flaky_heads) {
                    return Err(object_store::Error::Generic {
                        store: "S3",
                        source: "Server returned non-2xx status code: 503 Service Unavailable: "
                            .into(),
                    });
                }
            }
            let head = options.head;
            let bare_404 = !head
                && self
                    .bare_404_gets
                    .fetch_update(
                        std::sync::atomic::Ordering::Relaxed,
                        std::sync::atomic::Ordering::Relaxed,
                        |n| n.checked_sub(1),
                    )
                    .is_ok();
            if bare_404 {
                return Err(object_store::Error::NotFound {
                    path: location.to_string(),
                    source: "Server returned non-2xx status code: 404 Not Found: ".into(),
                });
            }
            // A key not there, as S3 says it.
            let again = options.clone();
            let got = self
                .mem
                .get_opts(location, options)
                .await
                .map_err(|e| match e {
                    object_store::Error::NotFound { path, .. } => object_store::Error::NotFound {
                        path,
                        source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchKey</Code></Error>".into(),
                    },
                    e => e,
                })?;
            if head {
                return Ok(got);
            }
            self.gets.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let reset = || object_store::Error::Generic {
                store: "S3",
                source: "error decoding response body: connection reset".into(),
            };
            let first = match (self.byte_then_broken_gets, self.empty_then_broken_gets) {
                (false, false) => return Ok(got),
                (true, _) => {
                    let bytes = self.mem.get_opts(location, again).await?.bytes().await?;
                    Bytes::copy_from_slice(&bytes[..bytes.len().min(1)])
                }
                (false, true) => Bytes::new(),
            };
            let broken: Vec<object_store::Result<Bytes>> = vec![Ok(first), Err(reset())];
            Ok(GetResult {
                payload: object_store::GetResultPayload::Stream(Box::pin(futures::stream::iter(
                    broken,
                ))),
                ..got
            })
        }
        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<StorePath>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<StorePath>> {
            self.mem.delete_stream(locations)
        }
        fn list(
            &self,
            prefix: Option<&StorePath>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
        {
            use futures::StreamExt;
            let meta = |key: String| object_store::ObjectMeta {
                location: StorePath::from(key),
                last_modified: chrono::DateTime::<chrono::Utc>::MIN_UTC,
                size: 0,
                e_tag: None,
                version: None,
            };
            match self.listing {
                Listing::Held => self.mem.list(prefix),
                Listing::Hanging => futures::stream::pending().boxed(),
                Listing::HugeKeys(n) => {
                    let huge = (0..n).map(move |i| {
                        Ok(meta(format!("jobs/j/attempts/{i}{}", "x".repeat(1 << 20))))
                    });
                    let real =
                        [3, 7].map(|n| Ok(meta(format!("jobs/j/attempts/{n}/manifest.json"))));
                    futures::stream::iter(huge.chain(real)).boxed()
                }
            }
        }
        async fn list_with_delimiter(
            &self,
            prefix: Option<&StorePath>,
        ) -> object_store::Result<object_store::ListResult> {
            self.mem.list_with_delimiter(prefix).await
        }
        async fn copy_opts(
            &self,
            from: &StorePath,
            to: &StorePath,
            options: object_store::CopyOptions,
        ) -> object_store::Result<()> {
            self.mem.copy_opts(from, to, options).await
        }
    }

    /// A store over `inner` that fails for at most `deadline`.
    pub(crate) fn store_over(inner: Arc<dyn ObjectStore>, deadline: Duration) -> BlobStore {
        let mut store = store_with_deadline(deadline.as_secs());
        store.inner = inner;
        store
    }

    /// [`store_over`] as a remote store: its "not found" means absent only with the store's
    /// own code in the reply.
    pub(crate) fn remote_store_over(inner: Arc<dyn ObjectStore>, deadline: Duration) -> BlobStore {
        let mut store = store_over(inner, deadline);
        store.url = "s3://bucket".into();
        store
    }

    fn refusing_writes() -> Arc<Faulty> {
        let faulty = Faulty::default();
        faulty
            .refusing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Arc::new(faulty)
    }

    /// Files of a final sync against a store that serves reads and refuses writes: each
    /// file's HEAD (its blob not there) was an answer that ended the outage, and each PUT
    /// then began one of its own: 1,000 files took ten hours to fail, not one deadline.
    #[tokio::test(start_paused = true)]
    async fn reads_answered_do_not_end_an_outage_of_writes() {
        let store = store_over(refusing_writes(), Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        for i in 0..10 {
            let data = Bytes::from(format!("file {i}"));
            let sha = crate::digest::sha256_hex(&data);
            // Answered, or refused past the deadline; never found.
            let found = store.blob_exists(&sha, data.len() as u64).await;
            assert!(!matches!(found, Ok(true)), "{found:?}");
            let e = store.put_blob(&sha, data).await.unwrap_err();
            assert!(!e.is_permanent(), "{e}");
        }
        let took = start.elapsed();
        assert!(took < Duration::from_secs(60 + 30), "{took:?}");
    }

    /// Files found stored among files that are not, against a store that refuses writes:
    /// a blob found stored (a 412 to its create-if-absent, then a HEAD) wrote nothing, yet
    /// ended the outage, and the next file's PUT began a new one with a deadline of its own.
    #[tokio::test(start_paused = true)]
    async fn a_write_that_writes_nothing_does_not_end_an_outage_of_writes() {
        let faulty = refusing_writes();
        let stored = Bytes::from_static(b"stored before the outage");
        let stored_sha = crate::digest::sha256_hex(&stored);
        faulty
            .mem
            .put(
                &StorePath::from(blob_key(&stored_sha)),
                PutPayload::from(stored.clone()),
            )
            .await
            .unwrap();
        let store = store_over(faulty, Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        for i in 0..10 {
            // Found stored, or refused past the deadline; never written.
            let found = store.put_blob(&stored_sha, stored.clone()).await;
            assert!(!matches!(found, Ok(true)), "{found:?}");
            let data = Bytes::from(format!("file {i}"));
            let sha = crate::digest::sha256_hex(&data);
            let e = store.put_blob(&sha, data).await.unwrap_err();
            assert!(!e.is_permanent(), "{e}");
        }
        let took = start.elapsed();
        assert!(took < Duration::from_secs(60 + 30), "{took:?}");
    }

    /// 20 blobs put into `faulty`'s memory before the test (a re-run's output), as (sha256,
    /// bytes).
    async fn stored_before(faulty: &Faulty, label: &str) -> Vec<(String, Bytes)> {
        let blobs: Vec<(String, Bytes)> = (0..20)
            .map(|i| {
                let data = Bytes::from(format!("{label} {i}"));
                (crate::digest::sha256_hex(&data), data)
            })
            .collect();
        for (sha, data) in &blobs {
            let path = StorePath::from(blob_key(sha));
            faulty.mem.put(&path, data.clone().into()).await.unwrap();
        }
        blobs
    }

    /// A final sync of blobs all stored (a re-run) against a store that fails 1 PUT in 5:
    /// each file's create-if-absent is answered "exists", so no write writes, and a failed
    /// PUT began an outage of writes that only a write that wrote could end. Each fault kept
    /// it fresh; past the deadline its operations were refused, and the files failed.
    #[tokio::test(start_paused = true)]
    async fn faults_among_blobs_all_stored_do_not_outlast_the_deadline() {
        let faulty = Faulty {
            flaky_puts: 5,
            ..Default::default()
        };
        let blobs = stored_before(&faulty, "stored before the job").await;
        let deadline = Duration::from_secs(60);
        let store = store_over(Arc::new(faulty), deadline);
        let blobs = Arc::new(blobs);
        let end = tokio::time::Instant::now() + 3 * deadline;
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..4 {
            let (store, blobs) = (store.clone(), blobs.clone());
            workers.spawn(async move {
                for (puts, (sha, data)) in blobs.iter().cycle().skip(w * 5).enumerate() {
                    if tokio::time::Instant::now() >= end {
                        return puts;
                    }
                    let put = store.put_blob(sha, data.clone()).await;
                    assert!(matches!(put, Ok(false)), "after {puts} puts: {put:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                unreachable!()
            });
        }
        while let Some(puts) = workers.join_next().await {
            assert!(puts.unwrap() > 1000);
        }
    }

    /// A store that refuses new writes (a 503) and answers a blob it holds (a 412), and fails
    /// at random too: a stored blob's PUT that met a blip, then a 412, ended the outage
    /// while a new file's writes were refused, and the next new file's PUT began another,
    /// a deadline of its own (for each blip on a stored blob among them: hours).
    #[tokio::test(start_paused = true)]
    async fn a_blip_on_a_stored_blob_does_not_end_an_outage_of_writes() {
        let faulty = Arc::new(Faulty {
            refusing: true.into(),
            flaky_puts: 1_000_000,
            ..Default::default()
        });
        let stored = Bytes::from_static(b"stored before the outage");
        let stored_sha = crate::digest::sha256_hex(&stored);
        let path = StorePath::from(blob_key(&stored_sha));
        faulty.mem.put(&path, stored.clone().into()).await.unwrap();
        let deadline = Duration::from_secs(60);
        let store = store_over(faulty.clone(), deadline);
        let start = tokio::time::Instant::now();
        let new = |n: u32| {
            let data = Bytes::from(format!("new file {n}"));
            (crate::digest::sha256_hex(&data), data)
        };
        let (sha, data) = new(1);
        let refused = tokio::spawn({
            let store = store.clone();
            async move { store.put_blob(&sha, data).await }
        });
        tokio::time::sleep(Duration::from_secs(45)).await;
        // Its first PUT meets the blip, the next the 412.
        faulty
            .puts
            .store(faulty.flaky_puts - 1, std::sync::atomic::Ordering::Relaxed);
        let put = store.put_blob(&stored_sha, stored).await;
        assert!(matches!(put, Ok(false)), "{put:?}");
        let puts = faulty.puts.load(std::sync::atomic::Ordering::Relaxed);
        assert!(puts > faulty.flaky_puts, "{puts}");
        let e = refused.await.unwrap().unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        let (sha, data) = new(2);
        let e = store.put_blob(&sha, data).await.unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        let took = start.elapsed();
        assert!(took < deadline + Duration::from_secs(10), "{took:?}");
    }

    /// A write that failed transiently and was then refused for good (a 403 for its key, a
    /// policy on that prefix) got its answer: its failure no longer stands for a store that
    /// refuses writes, and the next blob found stored after a blip of its own ends the
    /// outage. It stood for ever, and a re-run's faults kept the outage fresh past its
    /// deadline, every later operation refused.
    #[tokio::test(start_paused = true)]
    async fn a_write_refused_for_good_does_not_keep_an_outage_of_writes() {
        let faulty = Arc::new(Faulty {
            flaky_puts: 1_000_000,
            ..Default::default()
        });
        let stored = Bytes::from_static(b"stored before");
        let stored_sha = crate::digest::sha256_hex(&stored);
        faulty
            .mem
            .put(
                &StorePath::from(blob_key(&stored_sha)),
                stored.clone().into(),
            )
            .await
            .unwrap();
        let denied = Bytes::from_static(b"denied");
        let denied_sha = crate::digest::sha256_hex(&denied);
        *faulty.denied.lock().unwrap() = Some(blob_key(&denied_sha));
        let store = store_over(faulty.clone(), Duration::from_secs(60));
        let blip_next = |faulty: &Faulty| {
            let puts = faulty.puts.load(std::sync::atomic::Ordering::Relaxed);
            let next = (puts / faulty.flaky_puts + 1) * faulty.flaky_puts;
            faulty
                .puts
                .store(next - 1, std::sync::atomic::Ordering::Relaxed);
        };
        blip_next(&faulty);
        let e = store.put_blob(&denied_sha, denied).await.unwrap_err();
        assert!(e.is_permanent(), "{e}");
        assert!(store.retry.lock().outage.is_some(), "the blip began none");
        blip_next(&faulty);
        let put = store.put_blob(&stored_sha, stored).await;
        assert!(matches!(put, Ok(false)), "{put:?}");
        assert!(
            store.retry.lock().outage.is_none(),
            "the refused write still stands"
        );
    }

    /// A final sync of large files all stored (HEAD first, then no PUT: a re-run, a dataset
    /// copied to the artifacts) after a write failed, against a store that fails 1 HEAD in
    /// 5: the outage of writes had no write to end it, each HEAD fault kept it fresh, and past
    /// its deadline every HEAD was refused, its file failed.
    #[tokio::test(start_paused = true)]
    async fn read_faults_after_a_write_failed_do_not_outlast_the_deadline() {
        let faulty = Faulty {
            flaky_heads: 5,
            ..Default::default()
        };
        let blobs = stored_before(&faulty, "large file stored before the job").await;
        let deadline = Duration::from_secs(60);
        let store = store_over(Arc::new(faulty), deadline);
        // A write failed (a live sync's PUT): an outage of writes.
        let e = StoreError::Op {
            op: "put",
            key: "k".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "Server returned non-2xx status code: 503 Service Unavailable: ".into(),
            },
        };
        store.retry.failed(&e, tokio::time::Instant::now(), true);
        let blobs = Arc::new(blobs);
        let end = tokio::time::Instant::now() + 3 * deadline;
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..4 {
            let (store, blobs) = (store.clone(), blobs.clone());
            workers.spawn(async move {
                for (looks, (sha, data)) in blobs.iter().cycle().skip(w * 5).enumerate() {
                    if tokio::time::Instant::now() >= end {
                        return looks;
                    }
                    // The HEAD-first path of a large file: a PUT only when not found.
                    let found = store.blob_exists(sha, data.len() as u64).await;
                    assert!(matches!(found, Ok(true)), "after {looks} looks: {found:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                unreachable!()
            });
        }
        while let Some(looks) = workers.join_next().await {
            assert!(looks.unwrap() > 1000);
        }
        // Nothing kept the outage of writes fresh: a write now gets a deadline of its own.
        assert!(matches!(store.retry.admit(end, true), Admit::Free));
        // And a blob stored is not failed by an outage of writes past its deadline, nor by
        // its probe taken by a write that failed a moment ago.
        let faulty = refusing_writes();
        let data = Bytes::from_static(b"stored long ago");
        let sha = crate::digest::sha256_hex(&data);
        let path = StorePath::from(blob_key(&sha));
        faulty.mem.put(&path, data.clone().into()).await.unwrap();
        let store = store_over(faulty, deadline);
        let refused = Bytes::from_static(b"not stored");
        let refused_sha = crate::digest::sha256_hex(&refused);
        let e = store.put_blob(&refused_sha, refused.clone()).await;
        assert!(e.is_err(), "{e:?}");
        let found = store.blob_exists(&refused_sha, refused.len() as u64).await;
        assert!(matches!(found, Ok(false)), "{found:?}");
        let e = store.put_blob(&refused_sha, refused).await;
        assert!(e.is_err(), "{e:?}");
        let stored = store.put_blob(&sha, data).await;
        assert!(matches!(stored, Ok(false)), "{stored:?}");
    }

    /// Writes that work again after an outage of writes past its deadline, met by uploads
    /// that look first (HEAD, then PUT): each HEAD was the probe, its success held the next
    /// probe off, and the PUT after it was refused; the outage ended only when it went stale,
    /// a whole deadline later.
    #[tokio::test(start_paused = true)]
    async fn writes_back_after_an_outage_of_writes_are_probed() {
        let faulty = refusing_writes();
        let store = store_over(faulty.clone(), Duration::from_secs(60));
        let start = tokio::time::Instant::now();
        let data = Bytes::from_static(b"refused");
        let e = store
            .put_blob(&crate::digest::sha256_hex(&data), data)
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        // Past the deadline, and not a deadline since the last failure (a stale outage).
        tokio::time::sleep_until(start + Duration::from_secs(70)).await;
        faulty
            .refusing
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let back = tokio::time::Instant::now();
        for i in 0.. {
            let data = Bytes::from(format!("large file {i}"));
            let sha = crate::digest::sha256_hex(&data);
            if matches!(store.blob_exists(&sha, data.len() as u64).await, Ok(false))
                && store.put_blob(&sha, data).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let took = back.elapsed();
        assert!(took < 2 * PROBE_EVERY, "{took:?}");
        assert!(store.retry.lock().outage.is_none());
    }

    /// An attempts listing that never answers: past the deadline it is a transient failure,
    /// not a refusal (which has the manifest writer go ahead without a look).
    #[tokio::test(start_paused = true)]
    async fn a_listing_too_slow_is_not_a_refusal() {
        let faulty = Faulty {
            listing: Listing::Hanging,
            ..Default::default()
        };
        let store = store_over(Arc::new(faulty), Duration::from_secs(1));
        let e = store.newest_attempt("j").await.unwrap_err();
        assert!(!e.is_permanent(), "{e}");
    }

    /// A listing of huge keys (a hostile store's, 100,000 of 16 MiB) is read one key at a
    /// time: it was gathered whole before the attempt numbers were looked at.
    #[test]
    fn the_newest_attempt_is_found_without_holding_the_listing() {
        let mut store = BlobStore::in_memory();
        store.inner = Arc::new(Faulty {
            listing: Listing::HugeKeys(64),
            ..Faulty::default()
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (newest, peak) =
            crate::rmtree::tests::held_during(|| rt.block_on(store.newest_attempt("j")));
        assert_eq!(newest.unwrap(), Some(7));
        assert!(peak < 16 << 20, "held {peak} bytes at once");
    }

    #[test]
    fn a_misspelt_store_option_gets_a_suggestion() {
        assert_eq!(
            did_you_mean("aws_endpont", "s3"),
            "; did you mean `aws_endpoint`?"
        );
        assert_eq!(
            did_you_mean("AWS_REGON", "s3"),
            "; did you mean `aws_region`?"
        );
        assert_eq!(did_you_mean("zzzzzzzzzzzz", "s3"), "");
    }

    fn config(url: &str) -> StoreConfig {
        StoreConfig::for_tests(url)
    }

    /// The file store takes no option: one given is named, not ignored.
    #[test]
    fn an_option_of_a_file_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(&format!("file://{}", dir.path().display()));
        c.options.insert("aws_endpoint".into(), "http://x".into());
        let e = BlobStore::open(&c).expect_err("refused");
        assert!(
            matches!(e, StoreError::BadOption { scheme: "file", .. }),
            "{e}"
        );
        c.options.clear();
        BlobStore::open(&c).unwrap();
    }

    /// A file store on a network file system whose server stops answering (a hard NFS
    /// mount): a blob's write and a staged file's part each block for ever in the kernel. No
    /// bound was set on them, and the final sync hung with them, no terminal status until a
    /// stop. Each call is cut at its limit, a transient failure retried until the deadline.
    #[tokio::test]
    async fn a_hung_file_store_call_ends_by_the_retry_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let deadline = Duration::from_secs(2);
        let limits = crate::filestore::Limits {
            meta: Duration::from_secs(1),
            data_floor: Duration::from_secs(1),
            data_rate: u64::MAX,
        };
        let bound = deadline + Duration::from_secs(1) + Duration::from_secs(2);
        let open = || {
            let mut config = config(&format!("file://{}", dir.path().join("store").display()));
            config.retry_deadline = deadline;
            BlobStore::open_with(&config, limits).unwrap()
        };
        let ended = |what: &str, start: std::time::Instant, r: Result<(), StoreError>| {
            let e = r.expect_err(what);
            assert!(!e.is_permanent(), "{what}: {e}");
            assert!(start.elapsed() < bound, "{what}: {:?}", start.elapsed());
        };

        let store = open();
        let hang = crate::fault::arm(crate::filestore::HANG, "put");
        let data = Bytes::from_static(b"never written");
        let start = std::time::Instant::now();
        let sha = crate::digest::sha256_hex(&data);
        let put = store.put_blob(&sha, data);
        let put = tokio::time::timeout(Duration::from_secs(20), put).await;
        ended("a blob's write", start, put.expect("bounded").map(|_| ()));
        drop(hang);

        let store = open();
        let hang = crate::fault::arm(crate::filestore::HANG, "write part");
        let start = std::time::Instant::now();
        let staged = store.retrying_whole(|| async {
            let part_error = |source| {
                Err(StoreError::Op {
                    op: "write part",
                    key: "staging/x".into(),
                    source,
                })
            };
            let mut upload = store.start_multipart_at("staging/x").await.map_err(Err)?;
            let part = upload.put_part(Bytes::from_static(b"part").into());
            part.await.map_err(part_error)?;
            upload.complete().await.map_err(part_error)?;
            Ok::<_, Result<(), StoreError>>(())
        });
        let staged = tokio::time::timeout(Duration::from_secs(20), staged).await;
        ended("a staged part", start, staged.expect("bounded").map(|_| ()));
        drop(hang);
    }

    /// A URL refused names the store without its user, password or query: the error is a
    /// config line in the journal.
    #[test]
    fn a_url_refused_is_named_without_its_credentials() {
        for url in [
            "https://minio:S3CRETPW@minio:9000/bucket",
            "file://u:S3CRETPW@host/x",
            "az://c:S3CRETPW@not.azure.example/x",
            "gs://u:S3CRETPW@/x?sig=S3CRETPW",
        ] {
            let e = BlobStore::open(&config(url)).unwrap_err();
            let shown = format!("{} {e:?}", crate::error_chain(&e));
            assert!(e.is_permanent(), "{shown}");
            assert!(!shown.contains("S3CRETPW"), "{shown}");
        }
    }

    #[test]
    fn bad_urls_are_permanent() {
        let e = BlobStore::open(&config("ftp://x")).unwrap_err();
        assert!(
            e.is_permanent() && e.to_string().contains("scheme `ftp`"),
            "{e}"
        );
        let mut c = config("s3://bucket");
        c.options.insert("no_such_option".into(), "1".into());
        assert!(BlobStore::open(&c)
            .unwrap_err()
            .to_string()
            .contains("no_such_option"));
    }

    #[tokio::test]
    async fn uncreatable_file_store_fails_preflight_permanently() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "").unwrap();
        let store =
            BlobStore::open(&config(&format!("file://{}/f/store", dir.path().display()))).unwrap();
        let e = store.preflight().await.unwrap_err();
        assert!(e.is_permanent(), "{e}");
    }

    /// An acknowledgement lost after the store completed the upload: the retry finds the
    /// upload gone, and the blob present means success.
    #[tokio::test]
    async fn a_complete_retried_after_it_went_through_succeeds() {
        let store = BlobStore::in_memory();
        let sha = crate::digest::sha256_hex(b"part");
        let id = store.create_multipart(&sha).await.unwrap();
        let part = store
            .put_part(&sha, &id, 0, Bytes::from_static(b"part"))
            .await
            .unwrap();
        store
            .complete_multipart(&sha, &id, 4, vec![part.clone()])
            .await
            .unwrap();
        store
            .complete_multipart(&sha, &id, 4, vec![part.clone()])
            .await
            .unwrap();
        // Present, but not at the size this upload was for (a short object left by another
        // tool): not taken for its completion.
        assert!(store
            .complete_multipart(&sha, &id, 5, vec![part])
            .await
            .is_err());
        let other = crate::digest::sha256_hex(b"never stored");
        assert!(store
            .complete_multipart(&other, &id, 0, Vec::new())
            .await
            .is_err());
    }

    /// A file store at `<dir>/s`, preflighted.
    async fn file_store_in(dir: &std::path::Path) -> BlobStore {
        let store = BlobStore::open(&config(&format!("file://{}/s", dir.display()))).unwrap();
        store.preflight().await.unwrap();
        store
    }

    #[tokio::test]
    async fn file_store_dedups() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store_in(dir.path()).await;
        let sha = "ab".repeat(32);
        assert!(store
            .put_blob(&sha, Bytes::from_static(b"x"))
            .await
            .unwrap());
        assert!(!store
            .put_blob(&sha, Bytes::from_static(b"y"))
            .await
            .unwrap());
        assert!(store.blob_exists(&sha, 1).await.unwrap());
        assert_eq!(
            store.get_bytes(&blob_key(&sha)).await.unwrap(),
            Bytes::from_static(b"x")
        );
    }

    /// Something of another size at a blob's key on the file store is not the blob: a
    /// `put_blob` replaced nothing and reported it stored.
    #[tokio::test]
    async fn a_file_store_entry_of_another_size_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store = file_store_in(dir.path()).await;
        let data = Bytes::from_static(b"the real bytes");
        let sha = crate::digest::sha256_hex(&data);
        let at = dir.path().join("s").join(blob_key(&sha));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(&at, vec![0u8; 1000]).unwrap();
        assert!(store.put_blob(&sha, data.clone()).await.unwrap());
        assert_eq!(std::fs::read(&at).unwrap(), &data[..]);
    }

    /// A symlink at a blob's key (to a copy of its bytes, so its size matched): the touch
    /// followed it and found another inode at the key, promote tried again, and went round
    /// for ever, touching the link's target as root each time.
    #[tokio::test]
    async fn a_symlink_at_the_key_is_replaced_by_promote() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = file_store_in(dir.path()).await;
        let data = Bytes::from_static(b"a large file's bytes");
        let sha = crate::digest::sha256_hex(&data);
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, &data).unwrap();
        let old = std::time::SystemTime::now() - Duration::from_secs(86_400);
        std::fs::File::options()
            .write(true)
            .open(&target)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let at = dir.path().join("s").join(blob_key(&sha));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &at).unwrap();
        let staging = "staging/job-1/0";
        store.put_document(staging, data.clone()).await.unwrap();

        let promoted = tokio::time::timeout(
            Duration::from_secs(5),
            store.promote(staging, &sha, data.len() as u64),
        )
        .await
        .expect("promote went round for ever");
        assert!(promoted.unwrap());
        let md = std::fs::symlink_metadata(&at).unwrap();
        assert!(md.is_file(), "{md:?}");
        assert_eq!(std::fs::read(&at).unwrap(), &data[..]);
        let target_md = std::fs::metadata(&target).unwrap();
        assert_eq!(
            target_md.modified().unwrap(),
            old,
            "the link's target was touched"
        );
        assert_ne!(target_md.ino(), md.ino());
    }

    /// A blob found stored that could not be touched (here a fault: the open for writing
    /// refused, as for a blob another user stored read-only) had its mtime left old and was
    /// taken as stored: gc could delete it before the manifest named it. The owner's
    /// `utimensat` is tried next; if that fails too, the blob is not taken, and storing it
    /// puts a new copy in its place.
    #[tokio::test]
    async fn a_blob_that_cannot_be_touched_is_stored_again() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = file_store_in(dir.path()).await;
        let data = Bytes::from_static(b"stored by someone else");
        let sha = crate::digest::sha256_hex(&data);
        let at = dir.path().join("s").join(blob_key(&sha));
        assert!(store.put_blob(&sha, data.clone()).await.unwrap());
        let age = || {
            std::fs::File::options()
                .write(true)
                .open(&at)
                .unwrap()
                .set_modified(std::time::SystemTime::now() - Duration::from_secs(86_400))
                .unwrap();
        };
        let young = || {
            let m = std::fs::metadata(&at).unwrap().modified().unwrap();
            m.elapsed().unwrap_or_default() < Duration::from_secs(600)
        };

        age();
        let _open = crate::fault::arm("blob-touch-open", &sha);
        assert!(store.blob_exists(&sha, data.len() as u64).await.unwrap());
        assert!(young(), "touched by utimensat");

        age();
        let _utimensat = crate::fault::arm("blob-touch-utimensat", &sha);
        assert!(!store.blob_exists(&sha, data.len() as u64).await.unwrap());
        let ino = std::fs::metadata(&at).unwrap().ino();
        assert!(store.put_blob(&sha, data.clone()).await.unwrap());
        assert!(young(), "a new copy");
        assert_ne!(std::fs::metadata(&at).unwrap().ino(), ino);
        assert_eq!(std::fs::read(&at).unwrap(), &data[..]);
    }

    /// A young blob found stored that cannot be touched (NFS's root_squash refuses every
    /// touch): gc spares it until the manifest naming it is written, so it is taken as it
    /// is. A new copy renamed over each one left other nodes' readers with ESTALE.
    #[tokio::test]
    async fn a_young_blob_that_cannot_be_touched_is_kept() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = file_store_in(dir.path()).await;
        let data = Bytes::from_static(b"stored a moment ago by another node");
        let sha = crate::digest::sha256_hex(&data);
        let at = dir.path().join("s").join(blob_key(&sha));
        assert!(store.put_blob(&sha, data.clone()).await.unwrap());
        let ino = std::fs::metadata(&at).unwrap().ino();
        let _open = crate::fault::arm("blob-touch-open", &sha);
        let _utimensat = crate::fault::arm("blob-touch-utimensat", &sha);
        assert!(store.blob_exists(&sha, data.len() as u64).await.unwrap());
        assert!(!store.put_blob(&sha, data.clone()).await.unwrap());
        let staging = "staging/job-1/0";
        store.put_document(staging, data.clone()).await.unwrap();
        assert!(!store
            .promote(staging, &sha, data.len() as u64)
            .await
            .unwrap());
        assert_eq!(std::fs::metadata(&at).unwrap().ino(), ino);
        assert!(!dir.path().join("s").join(staging).exists());
    }

    /// A file store whose stats answer but whose touches hang (an NFS or Lustre server that
    /// stopped taking setattr): each touch was cut at its limit, but on a thread of its own,
    /// outside the file store's call slots. Every deduplicated file left one stuck; once
    /// tokio's blocking pool was full, nothing else that needs it ran (run record saves, job
    /// kills, upload reads).
    #[test]
    fn hung_touches_leave_the_blocking_pool_room() {
        use crate::filestore::CALLS;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(CALLS + 16)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let limits = crate::filestore::Limits {
                meta: Duration::from_millis(300),
                data_floor: Duration::from_secs(1),
                data_rate: u64::MAX,
            };
            let mut config = config(&format!("file://{}", dir.path().join("s").display()));
            config.retry_deadline = Duration::from_secs(2);
            let store = BlobStore::open_with(&config, limits).unwrap();
            store.preflight().await.unwrap();
            let data = Bytes::from_static(b"a file every job has");
            let sha = crate::digest::sha256_hex(&data);
            let size = data.len() as u64;
            assert!(store.put_blob(&sha, data).await.unwrap());

            let hung = crate::fault::arm(crate::filestore::HANG, "touch");
            let calls: Vec<_> = (0..CALLS + 40)
                .map(|_| {
                    let (store, sha) = (store.clone(), sha.clone());
                    tokio::spawn(async move { store.blob_exists(&sha, size).await })
                })
                .collect();
            for call in calls {
                let wanted = tokio::time::timeout(Duration::from_secs(30), call).await;
                // Not known wanted (the blob is stored again) or the store's transient
                // time-out: either way not taken as stored.
                assert!(!matches!(wanted, Ok(Ok(Ok(true)))), "a hung touch counted");
            }
            let other =
                tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(|| ()))
                    .await;
            assert!(
                other.is_ok(),
                "the abandoned touches took every blocking thread"
            );
            drop(hung);
            // The stuck threads see the fault disarmed and return, their slots with them.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            // A look while the last touches come back may itself find every call slot busy
            // (its own deadline past): not back yet, not a failure.
            while !store.blob_exists(&sha, size).await.unwrap_or(false) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "touches never came back"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// A store URL that names a symlink root made, in a directory only root may write
    /// (`/srv/c3store -> /mnt/nvme/c3store`), is the operator's choice: the store is the
    /// directory it leads to, vetted and used (gc's too). The vet's no-follow open refused it
    /// as unsafe.
    #[tokio::test]
    async fn a_file_store_through_roots_symlink_opens() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (a symlink in a directory only root may write)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("nvme/c3store");
        std::fs::create_dir_all(&real).unwrap();
        let link = dir.path().join("c3store");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let store = BlobStore::open(&StoreConfig::for_tests(&format!(
            "file://{}",
            link.display()
        )))
        .unwrap();
        assert_eq!(
            store.local_root(),
            Some(std::fs::canonicalize(&real).unwrap().as_path())
        );
        let sha = crate::digest::sha256_hex(b"x");
        store
            .put_blob(&sha, Bytes::from_static(b"x"))
            .await
            .unwrap();
        assert!(real.join(blob_key(&sha)).is_file());
        let report = crate::gc::collect_garbage(&store, Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!((report.blobs, report.kept_young), (1, 1));
    }

    /// gc and the agent vet a file store alike: gc refused the root_squash store (owned by
    /// the export's anonymous user) that `BlobStore::open` accepted, and accepting one the
    /// agent refuses would be worse.
    #[tokio::test]
    async fn gc_and_the_agent_vet_a_file_store_alike() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let url = |name: &str| format!("file://{}/{name}", dir.path().display());
        let cases: [(&str, u32, u32, Option<u32>); 4] = [
            ("root", 0, 0o700, None),
            ("squashed", 65534, 0o700, Some(65534)),
            ("a-user", 1000, 0o700, None),
            ("squashed-all-write", 65534, 0o777, Some(65534)),
        ];
        for (name, uid, mode, squash) in cases {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            if let Some(squash) = squash {
                say_squashed(&path, squash);
            }
            let agent = BlobStore::open(&StoreConfig::for_tests(&url(name)));
            let gc = match &agent {
                Ok(store) => crate::gc::collect_garbage(store, Duration::ZERO, true)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Err(_) => Err("not opened".into()),
            };
            let ok = matches!(name, "root" | "squashed");
            assert_eq!(agent.is_ok(), ok, "{name}: {:?}", agent.err());
            assert_eq!(gc.is_ok(), ok, "{name}: {gc:?}");
        }
    }

    /// Root's equal in a file store is whom root's own files belong to there, found by
    /// making one: a store the probed root_squash user owns passes, one any other user owns
    /// does not, whatever the file system. The owner of an NFS store was trusted whoever it
    /// was (a user's own store passed as root_squash's).
    #[test]
    fn a_store_passes_as_roots_only_when_the_probe_says_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let dir = |name: &str, uid: u32, probe: Option<u32>| {
            let path = top.path().join(name);
            std::fs::create_dir(&path).unwrap();
            std::os::unix::fs::chown(&path, Some(uid), None).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700)).unwrap();
            if let Some(probe) = probe {
                say_squashed(&path, probe);
            }
            vet_file_root(&crate::confine::DirFd::open(&path).unwrap())
        };
        assert_eq!(dir("squashed", 65534, Some(65534)), Ok(Some(65534)));
        assert!(dir("another-user", 1000, Some(65534)).is_err());
        assert!(dir("probe-says-root", 65534, Some(0)).is_err());
        // The real probe here (root's files are root's): only root's store.
        assert!(dir("not-squashed", 65534, None).is_err());
        assert_eq!(dir("root", 0, None), Ok(None));
        let left: Vec<_> = std::fs::read_dir(top.path().join("root"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "the probe left {left:?}");
        let store = BlobStore::open(&StoreConfig::for_tests(&format!(
            "file://{}/squashed",
            top.path().display()
        )))
        .unwrap();
        assert_eq!(store.squashed_uid(), Some(65534));
    }

    /// The probe itself: root's file is root's on a local file system, made without a name
    /// or with one, and none is left.
    #[test]
    fn the_probe_finds_roots_files_are_roots() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (the probe makes a file as root)");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let dir = crate::confine::DirFd::open(top.path()).unwrap();
        assert_eq!(root_becomes(&dir), Ok(Some(0)));
        assert_eq!(std::fs::read_dir(top.path()).unwrap().count(), 0);
    }
}
