//! An S3 endpoint that answers the way real S3 does on a bad day, or the way a broken proxy
//! lies: "exists" for a blob it does not hold, a 409 for two conditional PUTs at once, a 400
//! `RequestTimeout` for a stalled body, a HEAD denied by a write-only policy, a short object
//! under a blob's key, downloads that break off, a multipart completion answered 200 with an
//! `InternalError` body. A blob is counted as stored only when it is,
//! and a blip never fails a job or a pull.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use serde_json::json;

use std::time::Duration;

use crate::support::{sha256_hex, wait_for, Harness, BIN};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// The first create-if-absent PUT of each blob: 409 ConditionalRequestConflict.
    ConflictOnce,
    /// Every create-if-absent PUT of a non-empty blob: 412, and nothing stored.
    ClaimsExists,
    /// The first PUT of each blob: 400 RequestTimeout.
    RequestTimeoutOnce,
    /// The first PUT of each blob: 400 BadDigest (its bytes were corrupted on the way).
    BadDigestOnce,
    /// Every PUT of a blob: 400 BadDigest (a store that mishandles the checksum).
    BadDigestAlways,
    /// The first PUT of a one-byte blob and the first three of any other: 400 BadDigest (a
    /// middlebox corrupting bodies at random).
    BadDigestAtRandom,
    /// Every HEAD: 403.
    HeadDenied,
    /// Every GET response breaks off after at most 256 KiB.
    CutDownloads,
    /// As `CutDownloads`, and a Range is ignored: the whole object again, with a 200.
    CutDownloadsNoRange,
    /// The first GET of each blob breaks off after 256 KiB, and a Range is ignored (a
    /// gateway without ranges, one reset on the way).
    CutOnceNoRange,
    /// The first GET of each blob: its bytes with the first one flipped (a cache that served
    /// a corrupted copy once).
    FlipOnce,
    /// Every blob PUT: 403 with a 256 MiB body.
    EndlessError,
    /// Every multipart start: 200 with 256 MiB of XML.
    EndlessXml,
    /// Every PUT of a non-empty blob: 303 See Other to `/portal/x`, whose GET answers 200 with
    /// an ETag (a captive portal, a misrouted proxy).
    RedirectPuts,
    /// Every PUT of a manifest already stored: 303 See Other to its own path (a gateway's
    /// post-redirect-get), whose GET answers the manifest there, with its ETag.
    RedirectManifestPutsHere,
    /// Every PUT of a non-empty blob: 501 NotImplemented (a header the store does not do).
    PutsNotImplemented,
    /// Every request: 301 PermanentRedirect with no Location (a bucket of another region).
    WrongRegion,
    /// Every GET or non-empty PUT of a blob: 307 Temporary Redirect to the same path on the
    /// port in `State::redirect_to` (another host, to the HTTP client).
    RedirectAway,
    /// The first two GETs of each blob without a Range: its first half, with a Content-Length
    /// that says so (a proxy that cut a close-delimited body: a clean end, short).
    ShortCleanTwice,
    /// The first GET of each manifest: half its body, then the connection breaks.
    CutManifestOnce,
    /// Every listing: a page of keys that says more follow, for ever (a gateway that drops
    /// the continuation token).
    EndlessListing,
    /// The first multipart start: an upload id of 70,000 bytes (an HTTP request naming it
    /// is too long to build).
    HugeUploadIdOnce,
    /// Every blob GET: a byte every 100 ms (never slow enough to time a request out).
    Trickle,
    /// Every request: 503 SlowDown (PUTs still counted), nothing stored.
    Down,
    /// Every request: 403 RequestTimeTooSkewed (the node's clock is off by over 15 minutes).
    Skewed,
    /// Every PUT: 403 SignatureDoesNotMatch, its body not UTF-8 (a Latin-1 `é`) and quoting
    /// the canonical request with [`SESSION_TOKEN`] in it.
    SignatureMismatch,
    /// The first CompleteMultipartUpload of each upload: 200 with an `InternalError` body
    /// (S3 sends 200 before it knows), and nothing completed.
    CompleteFailsWith200,
    /// The first CompleteMultipartUpload of each upload completes it, forgets the upload and
    /// answers 200 with an `InternalError` body.
    CompleteAppliedWith200,
    /// The first CompleteMultipartUpload of each upload forgets the upload, answers 200 with
    /// an `InternalError` body, and the object shows only 3 s later (a large object still
    /// being assembled): the retried complete meets NoSuchUpload meanwhile.
    CompleteAssemblesSlowly,
    /// Every conditional PUT (If-None-Match, If-Match): 501 NotImplemented, as S3-compatible
    /// stores without conditional writes answer.
    NoConditionalPut,
    /// `NoConditionalPut` and `HeadDenied` at once: a store without conditional writes under
    /// a write-only bucket policy.
    NoConditionalPutHeadDenied,
    /// The first CompleteMultipartUpload: 400 InvalidPart (a part's ETag changed on the way,
    /// or the store lost a part), the upload left as it was.
    CompleteInvalidPartOnce,
    /// The first PUT of each blob, and the first multipart start: 404 NoSuchBucket (a proxy
    /// or load balancer that lost the bucket for a moment).
    NotFoundOnce,
    /// Every request: 404 NoSuchBucket.
    NoBucket,
    /// The first three UploadParts: 404 with no body (a proxy's or load balancer's own, not
    /// the store's NoSuchUpload), the part not stored.
    BarePartNotFound,
    /// Every PUT of a non-empty blob: 413 Request Entity Too Large (a proxy's
    /// `client_max_body_size`).
    TooLarge,
    /// The first PUT of each blob, the empty one of the preflight too: 404 with no body (a
    /// proxy's or load balancer's own, not the store's NoSuchBucket).
    BareNotFoundOnce,
    /// Every GET of a manifest: 403 AccessDenied (a write-only bucket policy).
    ManifestGetDenied,
    /// Every GET of a manifest: 404 with no body (a proxy's or load balancer's own).
    ManifestGetBareNotFound,
    /// Every GET of a manifest: 503 (a store's blip, past the retry deadline).
    ManifestGetUnavailable,
    /// The first PUT of each blob is stored, and answered 500 (its answer lost);
    /// objects stored under it are last modified when they were put (others at [`DATE`]).
    AppliedThen500Once,
    /// Every PUT of a manifest: 403 AccessDenied, its message naming the node's role
    /// ([`ROLE_IN_DENIAL`]).
    ManifestPutDenied,
    /// Every PUT of a non-empty blob is taken and never answered.
    BlobPutsHang,
}

/// What an S3 denial's message says of the caller (`User: arn:aws:sts::...`).
const ROLE_IN_DENIAL: &str = "arn:aws:sts::123456789012:assumed-role/node-role";

/// The node's session token, as S3 quotes it back in a `SignatureDoesNotMatch`.
const SESSION_TOKEN: &str = "FQoGZXIvYXdzEJr-session-token";

/// The size of the endless bodies: far over any cap, small enough that a test of code that
/// reads them whole still ends.
const ENDLESS: usize = 256 << 20;

#[derive(Default)]
struct State {
    /// Set: a request whose session token is another is refused (400 ExpiredToken).
    valid_token: Option<String>,
    objects: HashMap<String, Vec<u8>>,
    /// Last-Modified of the objects that have their own ([`Fault::AppliedThen500Once`]).
    modified: HashMap<String, String>,
    seen_puts: HashMap<String, usize>,
    seen_gets: HashMap<String, usize>,
    fault: Option<Fault>,
    /// The most bytes of one endless body handed to its connection (a retry sends another).
    endless_sent: Arc<std::sync::atomic::AtomicUsize>,
    /// Multipart uploads under way: upload id -> (key, part number -> bytes).
    uploads: HashMap<String, (String, std::collections::BTreeMap<u32, Vec<u8>>)>,
    /// CompleteMultipartUpload requests, in all.
    completes: usize,
    /// Objects being assembled: key, bytes, when they show.
    assembling: Vec<(String, Vec<u8>, std::time::Instant)>,
    /// Where `RedirectAway` sends requests.
    redirect_to: Option<u16>,
    /// Requests received, in all.
    requests: usize,
    /// UploadPart requests, in all.
    parts_put: usize,
    /// CreateMultipartUpload requests answered with an upload, in all.
    creates: usize,
}

/// A 200 or error body of `ENDLESS` bytes made as it is sent, its length so far kept in `sent`
/// when it is the longest yet.
fn endless(status: StatusCode, sent: Arc<std::sync::atomic::AtomicUsize>) -> Response {
    use futures::StreamExt;
    let chunk = Bytes::from(vec![b'<'; 64 << 10]);
    let body = futures::stream::iter(0..ENDLESS / chunk.len()).map(move |i| {
        let so_far = (i + 1) * chunk.len();
        sent.fetch_max(so_far, std::sync::atomic::Ordering::Relaxed);
        Ok::<_, std::io::Error>(chunk.clone())
    });
    reply(
        status,
        &[("content-type", "application/xml".into())],
        Body::from_stream(body),
    )
}

/// The fake endpoint: one bucket, path-style, on 127.0.0.1; a thread with its own runtime.
struct FakeS3 {
    port: u16,
    state: Arc<Mutex<State>>,
    _thread: std::thread::JoinHandle<()>,
}

const DATE: &str = "Tue, 01 Dec 2026 00:00:00 GMT";

fn reply(status: StatusCode, headers: &[(&str, String)], body: Body) -> Response {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    b.body(body).unwrap()
}

fn s3_error(status: StatusCode, code: &str) -> Response {
    reply(
        status,
        &[("content-type", "application/xml".into())],
        Body::from(format!(
            "<?xml version=\"1.0\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>"
        )),
    )
}

fn object_headers(bytes: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("etag", format!("\"{}\"", &sha256_hex(bytes)[..32])),
        ("last-modified", DATE.into()),
    ]
}

/// A query value with its `%XX` escapes decoded.
fn percent_decoded(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1..i + 3)) {
            (b'%', Some(hex)) => {
                let hex = std::str::from_utf8(hex).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(
    state: Arc<Mutex<State>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = uri
        .path()
        .trim_start_matches('/')
        .split_once('/')
        .map_or(String::new(), |(_, k)| k.to_string());
    // Before the lock is taken for the rest: a handler that holds it across an await is not
    // `Send`.
    let hangs = method == Method::PUT && key.contains("/blobs/sha256/") && !body.is_empty() && {
        let mut st = state.lock().unwrap();
        let hangs = st.fault == Some(Fault::BlobPutsHang);
        if hangs {
            *st.seen_puts.entry(key.clone()).or_default() += 1;
        }
        hangs
    };
    if hangs {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
    }
    let mut st = state.lock().unwrap();
    st.requests += 1;
    let now = std::time::Instant::now();
    let (ready, assembling): (Vec<_>, Vec<_>) = std::mem::take(&mut st.assembling)
        .into_iter()
        .partition(|a| a.2 <= now);
    st.assembling = assembling;
    for (k, bytes, _) in ready {
        st.objects.insert(k, bytes);
    }
    if let Some(valid) = &st.valid_token {
        let token = headers
            .get("x-amz-security-token")
            .and_then(|t| t.to_str().ok());
        if token != Some(valid.as_str()) {
            return s3_error(StatusCode::BAD_REQUEST, "ExpiredToken");
        }
    }
    let fault = st.fault.unwrap_or(Fault::None);
    if fault == Fault::Down {
        if method == Method::PUT {
            *st.seen_puts.entry(key).or_default() += 1;
        }
        return s3_error(StatusCode::SERVICE_UNAVAILABLE, "SlowDown");
    }
    if fault == Fault::SignatureMismatch && method == Method::PUT {
        *st.seen_puts.entry(key).or_default() += 1;
        let mut body = b"<?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the signature you provided. Caf\xe9</Message><CanonicalRequest>PUT\n/bucket/k\n\nhost:127.0.0.1\nx-amz-security-token:".to_vec();
        body.extend_from_slice(SESSION_TOKEN.as_bytes());
        body.extend_from_slice(b"\n</CanonicalRequest></Error>");
        return reply(
            StatusCode::FORBIDDEN,
            &[("content-type", "application/xml".into())],
            Body::from(body),
        );
    }
    if fault == Fault::Skewed {
        if method == Method::PUT {
            *st.seen_puts.entry(key).or_default() += 1;
        }
        return s3_error(StatusCode::FORBIDDEN, "RequestTimeTooSkewed");
    }
    if fault == Fault::NoBucket {
        return s3_error(StatusCode::NOT_FOUND, "NoSuchBucket");
    }
    if uri.path().starts_with("/portal/") {
        return reply(
            StatusCode::OK,
            &[("etag", "\"portal\"".into())],
            Body::empty(),
        );
    }
    if fault == Fault::RedirectPuts
        && method == Method::PUT
        && key.contains("/blobs/sha256/")
        && !body.is_empty()
    {
        return reply(
            StatusCode::SEE_OTHER,
            &[("location", "/portal/x".into())],
            Body::empty(),
        );
    }
    if fault == Fault::WrongRegion {
        return s3_error(StatusCode::MOVED_PERMANENTLY, "PermanentRedirect");
    }
    if fault == Fault::RedirectManifestPutsHere
        && method == Method::PUT
        && key.ends_with("/manifest.json")
        && st.objects.contains_key(&key)
    {
        *st.seen_puts.entry(key).or_default() += 1;
        return reply(
            StatusCode::SEE_OTHER,
            &[("location", uri.path().to_string())],
            Body::empty(),
        );
    }
    if fault == Fault::PutsNotImplemented
        && method == Method::PUT
        && key.contains("/blobs/sha256/")
        && !body.is_empty()
    {
        *st.seen_puts.entry(key).or_default() += 1;
        return s3_error(StatusCode::NOT_IMPLEMENTED, "NotImplemented");
    }
    if fault == Fault::TooLarge
        && method == Method::PUT
        && key.contains("/blobs/sha256/")
        && !body.is_empty()
    {
        return reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            &[],
            Body::from("<html>413 Request Entity Too Large</html>"),
        );
    }
    if fault == Fault::RedirectAway
        && key.contains("/blobs/sha256/")
        && (method == Method::GET || method == Method::PUT && !body.is_empty())
    {
        let to = format!(
            "http://localhost:{}{}",
            st.redirect_to.expect("a port to redirect to"),
            uri.path()
        );
        return reply(
            StatusCode::TEMPORARY_REDIRECT,
            &[("location", to)],
            Body::empty(),
        );
    }
    let is_blob = key.contains("/blobs/sha256/") && !body.is_empty();
    let query = |name: &str| {
        uri.query().and_then(|q| {
            q.split('&').find_map(|kv| match kv.split_once('=') {
                Some((k, v)) if k == name => Some(v.to_string()),
                None if kv == name => Some(String::new()),
                _ => None,
            })
        })
    };
    let xml = |body: String| {
        reply(
            StatusCode::OK,
            &[("content-type", "application/xml".into())],
            Body::from(format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>{body}")),
        )
    };
    if method == Method::POST && fault == Fault::EndlessXml {
        return endless(StatusCode::OK, st.endless_sent.clone());
    }
    if method == Method::POST && query("uploads").is_some() {
        if fault == Fault::NotFoundOnce && !st.seen_puts.contains_key("create") {
            st.seen_puts.insert("create".into(), 1);
            return s3_error(StatusCode::NOT_FOUND, "NoSuchBucket");
        }
        st.creates += 1;
        let mut id = format!("upload-{}", st.uploads.len() + st.completes + 1);
        if fault == Fault::HugeUploadIdOnce {
            st.fault = Some(Fault::None);
            id = "U".repeat(70_000);
        }
        st.uploads
            .insert(id.clone(), (key.clone(), Default::default()));
        return xml(format!("<InitiateMultipartUploadResult><Bucket>bucket</Bucket><Key>{key}</Key><UploadId>{id}</UploadId></InitiateMultipartUploadResult>"));
    }
    if let (true, Some(n), Some(id)) = (
        method == Method::PUT,
        query("partNumber"),
        query("uploadId"),
    ) {
        st.parts_put += 1;
        if fault == Fault::BarePartNotFound && st.parts_put <= 3 {
            return reply(StatusCode::NOT_FOUND, &[], Body::empty());
        }
        let Some((_, parts)) = st.uploads.get_mut(&id) else {
            return s3_error(StatusCode::NOT_FOUND, "NoSuchUpload");
        };
        parts.insert(n.parse().unwrap(), body.to_vec());
        return reply(StatusCode::OK, &object_headers(&body), Body::empty());
    }
    if let (true, Some(id)) = (method == Method::POST, query("uploadId")) {
        st.completes += 1;
        let first = !st.seen_puts.contains_key(&format!("complete {id}"));
        st.seen_puts.insert(format!("complete {id}"), 1);
        let internal_error = s3_error(StatusCode::OK, "InternalError");
        if first && fault == Fault::CompleteFailsWith200 {
            return internal_error;
        }
        if st.completes == 1 && fault == Fault::CompleteInvalidPartOnce {
            return s3_error(StatusCode::BAD_REQUEST, "InvalidPart");
        }
        let Some((key, parts)) = st.uploads.remove(&id) else {
            return s3_error(StatusCode::NOT_FOUND, "NoSuchUpload");
        };
        let whole: Vec<u8> = parts.into_values().flatten().collect();
        if first && fault == Fault::CompleteAssemblesSlowly {
            let shows = now + std::time::Duration::from_secs(3);
            st.assembling.push((key, whole, shows));
            return internal_error;
        }
        st.objects.insert(key, whole);
        if first && fault == Fault::CompleteAppliedWith200 {
            return internal_error;
        }
        return xml(
            "<CompleteMultipartUploadResult><ETag>\"done\"</ETag></CompleteMultipartUploadResult>"
                .into(),
        );
    }
    if let (true, Some(id)) = (method == Method::DELETE, query("uploadId")) {
        st.uploads.remove(&id);
        return reply(StatusCode::NO_CONTENT, &[], Body::empty());
    }
    match method {
        Method::PUT => {
            let seen = {
                let n = st.seen_puts.entry(key.clone()).or_default();
                *n += 1;
                *n
            };
            if is_blob && fault == Fault::EndlessError {
                return endless(StatusCode::FORBIDDEN, st.endless_sent.clone());
            }
            if is_blob && seen == 1 && fault == Fault::RequestTimeoutOnce {
                return s3_error(StatusCode::BAD_REQUEST, "RequestTimeout");
            }
            if is_blob && seen == 1 && fault == Fault::NotFoundOnce {
                return s3_error(StatusCode::NOT_FOUND, "NoSuchBucket");
            }
            if key.contains("/blobs/sha256/") && seen == 1 && fault == Fault::BareNotFoundOnce {
                return reply(StatusCode::NOT_FOUND, &[], Body::empty());
            }
            let corrupted = match fault {
                Fault::BadDigestAlways => true,
                Fault::BadDigestOnce => seen == 1,
                Fault::BadDigestAtRandom => seen <= if body.len() == 1 { 1 } else { 3 },
                _ => false,
            };
            if is_blob && corrupted {
                return s3_error(StatusCode::BAD_REQUEST, "BadDigest");
            }
            if fault == Fault::ManifestPutDenied && key.ends_with("/manifest.json") {
                return reply(
                    StatusCode::FORBIDDEN,
                    &[],
                    Body::from(format!("<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code><Message>User: {ROLE_IN_DENIAL}/i-0 is not authorized to perform: s3:PutObject</Message></Error>")),
                );
            }
            if matches!(
                fault,
                Fault::NoConditionalPut | Fault::NoConditionalPutHeadDenied
            ) && (headers.contains_key("if-none-match") || headers.contains_key("if-match"))
            {
                return s3_error(StatusCode::NOT_IMPLEMENTED, "NotImplemented");
            }
            if headers.contains_key("if-none-match") {
                if is_blob && seen == 1 && fault == Fault::ConflictOnce {
                    return s3_error(StatusCode::CONFLICT, "ConditionalRequestConflict");
                }
                if is_blob && fault == Fault::ClaimsExists {
                    return s3_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
                }
                if st.objects.contains_key(&key) {
                    return s3_error(StatusCode::PRECONDITION_FAILED, "PreconditionFailed");
                }
            }
            let h = object_headers(&body);
            if fault == Fault::AppliedThen500Once {
                let now = httpdate::fmt_http_date(std::time::SystemTime::now());
                st.modified.insert(key.clone(), now);
                if is_blob && seen == 1 {
                    st.objects.insert(key, body.to_vec());
                    return s3_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalError");
                }
            }
            st.objects.insert(key, body.to_vec());
            reply(StatusCode::OK, &h, Body::empty())
        }
        Method::HEAD => {
            if matches!(fault, Fault::HeadDenied | Fault::NoConditionalPutHeadDenied) {
                return reply(StatusCode::FORBIDDEN, &[], Body::empty());
            }
            match st.objects.get(&key) {
                Some(o) => {
                    let mut h = object_headers(o);
                    if let Some(at) = st.modified.get(&key) {
                        h.retain(|(name, _)| *name != "last-modified");
                        h.push(("last-modified", at.clone()));
                    }
                    h.push(("content-length", o.len().to_string()));
                    reply(StatusCode::OK, &h, Body::empty())
                }
                None => reply(StatusCode::NOT_FOUND, &[], Body::empty()),
            }
        }
        Method::GET
            if fault == Fault::EndlessListing
                && uri.query().is_some_and(|q| q.contains("list-type")) =>
        {
            let contents: String = (0..1000)
                .map(|i| format!("<Contents><Key>pre/jobs/x/attempts/{i}/other</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>e</ETag><Size>1</Size></Contents>"))
                .collect();
            reply(
                StatusCode::OK,
                &[("content-type", "application/xml".into())],
                Body::from(format!("<?xml version=\"1.0\"?><ListBucketResult><IsTruncated>true</IsTruncated><NextContinuationToken>again</NextContinuationToken><KeyCount>1000</KeyCount>{contents}</ListBucketResult>")),
            )
        }
        // A write-only policy still lets the agent list (ListBucket): the keys held below
        // the prefix asked for.
        Method::GET
            if fault == Fault::NoConditionalPutHeadDenied
                && uri.query().is_some_and(|q| q.contains("list-type")) =>
        {
            let prefix = uri
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("prefix="))
                .map(percent_decoded)
                .unwrap_or_default();
            let contents: String = st
                .objects
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(k, o)| format!("<Contents><Key>{k}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified><ETag>\"e\"</ETag><Size>{}</Size></Contents>", o.len()))
                .collect();
            reply(
                StatusCode::OK,
                &[("content-type", "application/xml".into())],
                Body::from(format!("<?xml version=\"1.0\"?><ListBucketResult><IsTruncated>false</IsTruncated>{contents}</ListBucketResult>")),
            )
        }
        Method::GET if uri.query().is_some_and(|q| q.contains("list-type")) => reply(
            StatusCode::OK,
            &[("content-type", "application/xml".into())],
            Body::from("<?xml version=\"1.0\"?><ListBucketResult><IsTruncated>false</IsTruncated><KeyCount>0</KeyCount></ListBucketResult>"),
        ),
        Method::GET if fault == Fault::ManifestGetDenied && key.ends_with("/manifest.json") => {
            s3_error(StatusCode::FORBIDDEN, "AccessDenied")
        }
        Method::GET
            if fault == Fault::ManifestGetUnavailable && key.ends_with("/manifest.json") =>
        {
            s3_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        }
        Method::GET
            if fault == Fault::ManifestGetBareNotFound && key.ends_with("/manifest.json") =>
        {
            reply(StatusCode::NOT_FOUND, &[], Body::empty())
        }
        Method::GET => {
            let Some(o) = st.objects.get(&key).cloned() else {
                return s3_error(StatusCode::NOT_FOUND, "NoSuchKey");
            };
            let from: usize = headers
                .get("range")
                .and_then(|r| r.to_str().ok())
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.trim_end_matches('-').parse().ok())
                .filter(|_| !matches!(fault, Fault::CutDownloadsNoRange | Fault::CutOnceNoRange))
                .unwrap_or(0);
            let mut h = object_headers(&o);
            h.push(("content-length", (o.len() - from).to_string()));
            let status = if from > 0 {
                h.push((
                    "content-range",
                    format!("bytes {from}-{}/{}", o.len() - 1, o.len()),
                ));
                StatusCode::PARTIAL_CONTENT
            } else {
                StatusCode::OK
            };
            let mut rest = o[from..].to_vec();
            let gets = st.seen_gets.entry(key.clone()).or_default();
            *gets += 1;
            if fault == Fault::FlipOnce && *gets == 1 && key.contains("/blobs/") && !rest.is_empty() {
                rest[0] ^= 0xff;
            }
            if fault == Fault::ShortCleanTwice
                && key.contains("/blobs/")
                && from == 0
                && *gets <= 2
                && rest.len() > 1
            {
                rest.truncate(rest.len() / 2);
                for (name, v) in h.iter_mut() {
                    if *name == "content-length" {
                        *v = rest.len().to_string();
                    }
                }
            }
            let rest = Bytes::from(rest);
            let body = if fault == Fault::Trickle && key.contains("/blobs/") {
                use futures::StreamExt;
                let bytes: Vec<u8> = rest.to_vec();
                Body::from_stream(futures::stream::iter(bytes).then(|b| async move {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Ok::<_, std::io::Error>(Bytes::from(vec![b]))
                }))
            } else if fault == Fault::CutManifestOnce
                && key.ends_with("/manifest.json")
                && st.seen_gets.get(&key) == Some(&1)
            {
                let head = rest.slice(..rest.len() / 2);
                use futures::StreamExt;
                let cut = futures::stream::once(async {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err(std::io::Error::other("cut"))
                });
                Body::from_stream(futures::stream::once(async { Ok(head) }).chain(cut))
            } else if (matches!(fault, Fault::CutDownloads | Fault::CutDownloadsNoRange)
                || fault == Fault::CutOnceNoRange
                    && key.contains("/blobs/")
                    && st.seen_gets.get(&key) == Some(&1))
                && rest.len() > 256 << 10
            {
                // Promise the whole rest, send 256 KiB, then break the connection.
                let head = rest.slice(..256 << 10);
                use futures::StreamExt;
                let cut = futures::stream::once(async {
                    // After the head has left (a failing body drops what is unsent).
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    Err(std::io::Error::other("cut"))
                });
                Body::from_stream(futures::stream::once(async { Ok(head) }).chain(cut))
            } else {
                Body::from(rest)
            };
            reply(status, &h, body)
        }
        _ => s3_error(StatusCode::NOT_IMPLEMENTED, "NotImplemented"),
    }
}

impl FakeS3 {
    fn start(fault: Fault) -> Self {
        let state = Arc::new(Mutex::new(State {
            fault: Some(fault),
            ..State::default()
        }));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .fallback(
                        move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                            handle(st.clone(), method, uri, headers, body)
                        },
                    )
                    .layer(axum::extract::DefaultBodyLimit::disable());
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let _ = axum::serve(listener, app).await;
            });
        });
        FakeS3 {
            port,
            state,
            _thread: thread,
        }
    }

    fn set_fault(&self, fault: Fault) {
        self.state.lock().unwrap().fault = Some(fault);
    }

    fn endless_sent(&self) -> usize {
        let st = self.state.lock().unwrap();
        st.endless_sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn blob(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let key = format!("pre/blobs/sha256/{}", sha256_hex(bytes));
        self.state.lock().unwrap().objects.get(&key).cloned()
    }

    /// How many PUTs of the blob of `bytes` the store was sent.
    fn puts_of(&self, bytes: &[u8]) -> usize {
        let key = format!("pre/blobs/sha256/{}", sha256_hex(bytes));
        let st = self.state.lock().unwrap();
        st.seen_puts.get(&key).copied().unwrap_or(0)
    }

    fn put_blob(&self, key_of: &[u8], bytes: &[u8]) {
        let key = format!("pre/blobs/sha256/{}", sha256_hex(key_of));
        self.state
            .lock()
            .unwrap()
            .objects
            .insert(key, bytes.to_vec());
    }

    /// A harness whose store is this endpoint (no retries inside object_store, 4 s deadline).
    fn harness(&self) -> Harness {
        let mut h = Harness::file();
        h.extra_toml = format!(
            "[store]\nurl = \"s3://bucket/pre\"\nmax_retries = 0\nretry_timeout_secs = 2\nretry_deadline_secs = 4\n[store.options]\naws_endpoint = \"http://127.0.0.1:{}\"\naws_allow_http = \"true\"\naws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\naws_region = \"us-east-1\"\n",
            self.port
        );
        h
    }
}

/// A job writing `bytes` (via a file the job copies) to `artifacts/out`.
fn job_writing(h: &Harness, id: &str, bytes: &[u8]) -> serde_json::Value {
    let src = h.path(&format!("{id}.src"));
    std::fs::write(&src, bytes).unwrap();
    json!({"job_id": id, "command": ["sh", "-c", format!("cp {} $C3_ARTIFACTS_DIR/out", src.display())]})
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn a_409_for_a_concurrent_conditional_put_is_retried_until_the_blob_is_stored() {
    let s3 = FakeS3::start(Fault::ConflictOnce);
    let h = s3.harness();
    h.run_job(job_writing(&h, "c409", b"checkpoint bytes"))
        .assert_code(0);
    assert_eq!(h.terminal("c409")["state"], "SUCCEEDED");
    assert_eq!(
        s3.blob(b"checkpoint bytes").as_deref(),
        Some(&b"checkpoint bytes"[..]),
        "the job succeeded, but its blob is not in the store"
    );
}

#[test]
fn a_store_that_claims_a_blob_it_does_not_hold_fails_the_job() {
    let s3 = FakeS3::start(Fault::ClaimsExists);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "liar", b"never stored"));
    run.assert_code(3);
    let t = h.terminal("liar");
    assert_eq!(t["state"], "FAILED", "{t}");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert!(s3.blob(b"never stored").is_none());
}

/// A store without conditional writes (501 NotImplemented to `If-None-Match`) still takes
/// the job's blobs: a HEAD, then a plain PUT (content-addressed, so a PUT over the same blob
/// replaces it with itself). Every blob's PUT was retried as a server error until the
/// deadline: UPLOAD_ERROR where aws-cli, which sends no condition, succeeds.
#[test]
fn a_store_without_conditional_writes_takes_the_blobs() {
    let s3 = FakeS3::start(Fault::NoConditionalPut);
    let h = s3.harness();
    h.run_job(job_writing(&h, "plain", b"no conditions here"))
        .assert_code(0);
    assert_eq!(
        s3.blob(b"no conditions here").as_deref(),
        Some(&b"no conditions here"[..])
    );
    // Once the store said so (the preflight's own write meets the 501 first), every blob
    // goes as one plain PUT: each conditional PUT's body went out again (object_store
    // retries a 501) before the fallback, past the bandwidth limit.
    let script = "echo one > $C3_ARTIFACTS_DIR/a; sleep 2; echo two > $C3_ARTIFACTS_DIR/b";
    h.run_job(json!({"job_id": "plain2", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(s3.puts_of(b"one\n") + s3.puts_of(b"two\n"), 2);
    // The manifests too: each of its writes is one plain PUT, not a conditional one first.
    let manifest_puts = s3
        .state
        .lock()
        .unwrap()
        .seen_puts
        .get("pre/jobs/plain2/manifest.json")
        .copied()
        .unwrap_or(0);
    let attempt_puts = s3
        .state
        .lock()
        .unwrap()
        .seen_puts
        .get("pre/jobs/plain2/attempts/1/manifest.json")
        .copied()
        .unwrap_or(0);
    assert!(
        manifest_puts <= attempt_puts,
        "the job's key: {manifest_puts} PUTs for {attempt_puts} manifest writes"
    );
}

/// A complete refused with InvalidPart (a part's ETag changed on the way, a part the store
/// lost) starts the upload over once, as NoSuchUpload does: it was permanent at once, and a
/// job that exited 0 ended UPLOAD_ERROR.
#[test]
fn a_complete_refused_for_an_invalid_part_starts_the_upload_over() {
    let s3 = FakeS3::start(Fault::CompleteInvalidPartOnce);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
    let data = pattern(3 << 20);
    h.run_job(job_writing(&h, "invalidpart", &data))
        .assert_code(0);
    assert!(s3.blob(&data).as_deref() == Some(&data[..]));
    let st = s3.state.lock().unwrap();
    assert_eq!(st.completes, 2);
    assert!(st.uploads.is_empty(), "the refused upload is left open");
}

#[test]
fn a_400_request_timeout_is_a_blip() {
    let s3 = FakeS3::start(Fault::RequestTimeoutOnce);
    let h = s3.harness();
    h.run_job(job_writing(&h, "rt400", b"slow link"))
        .assert_code(0);
    assert_eq!(s3.blob(b"slow link").as_deref(), Some(&b"slow link"[..]));
}

/// A proxy that refuses the upload's size (413): every try is refused the same way, and it
/// was retried until the deadline (10 minutes by default) before the job failed.
#[test]
fn a_413_fails_the_upload_at_once() {
    let s3 = FakeS3::start(Fault::TooLarge);
    let mut h = s3.harness();
    h.extra_toml = h
        .extra_toml
        .replace("retry_deadline_secs = 4", "retry_deadline_secs = 120");
    assert!(h.extra_toml.contains("retry_deadline_secs = 120"));
    let started = std::time::Instant::now();
    let run = h.run_job(job_writing(&h, "too-large", b"a file a proxy refuses"));
    run.assert_code(3);
    assert_eq!(h.terminal("too-large")["reason"], "UPLOAD_ERROR");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "retried a 413 for {:?}\n{}",
        started.elapsed(),
        run.stderr
    );
    assert!(run.stderr.contains("413"), "{}", run.stderr);
}

/// A 404 to a write (a blob's PUT, a multipart start) is a blip, as a 503 is: the bucket was
/// there at the preflight, and a proxy or load balancer may answer a moment for it. It was
/// permanent for every operation, and one such answer failed the job UPLOAD_ERROR.
#[test]
fn a_404_to_a_write_is_a_blip() {
    let s3 = FakeS3::start(Fault::NotFoundOnce);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
    let big = pattern(3 << 20);
    let src = h.path("nf404.src");
    std::fs::write(&src, &big).unwrap();
    let script = format!(
        "echo small > $C3_ARTIFACTS_DIR/small; cp {} $C3_ARTIFACTS_DIR/big",
        src.display()
    );
    h.run_job(json!({"job_id": "nf404", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(s3.blob(b"small\n").as_deref(), Some(&b"small\n"[..]));
    assert_eq!(s3.puts_of(b"small\n"), 2, "the 404 was not met");
    assert!(s3.blob(&big).as_deref() == Some(&big[..]));
    assert!(s3.state.lock().unwrap().seen_puts.contains_key("create"));
}

/// A 404 to an UploadPart that is not the store's NoSuchUpload (no body: a proxy's or load
/// balancer's own) is a blip: the part is sent again, in the same upload. Each was taken for
/// the upload gone: it was aborted and started over, its parts sent again, and the third
/// failed the job UPLOAD_ERROR.
#[test]
fn a_bare_404_to_a_part_is_a_blip() {
    let s3 = FakeS3::start(Fault::BarePartNotFound);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
    let data = pattern(3 << 20);
    let run = h.run_job(job_writing(&h, "part404", &data));
    run.assert_code(0);
    assert!(s3.blob(&data).as_deref() == Some(&data[..]));
    let st = s3.state.lock().unwrap();
    assert_eq!(st.creates, 1, "the upload was started over\n{}", run.stderr);
    assert_eq!(st.completes, 1);
    assert!(st.uploads.is_empty(), "an upload is left open");
}

/// The bucket missing is still said before the launch: the preflight's 404 is no blip.
#[test]
fn a_missing_bucket_fails_before_the_launch() {
    let s3 = FakeS3::start(Fault::NoBucket);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "nobucket", b"x"));
    run.assert_code(6);
    assert_eq!(h.terminal("nobucket")["reason"], "AGENT_ERROR");
}

/// A bare 404 to the preflight's write (a proxy's, with none of the store's codes) is a
/// blip as for any write: the job launches and its files are stored. Taken for the bucket
/// missing, it failed the job before its launch.
#[test]
fn a_bare_404_to_the_preflight_does_not_hold_the_launch() {
    let s3 = FakeS3::start(Fault::BareNotFoundOnce);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "bare404", b"x"));
    run.assert_code(0);
    assert!(run.stderr.contains("launching anyway"), "{}", run.stderr);
    assert_eq!(s3.blob(b"x").as_deref(), Some(&b"x"[..]));
}

/// Bytes corrupted on the way (the store's checksum check says so) are sent again; a store
/// that refuses every checksum fails after a few tries, not after the retry deadline.
#[test]
fn a_bad_digest_is_sent_again_a_few_times() {
    let s3 = FakeS3::start(Fault::BadDigestOnce);
    let h = s3.harness();
    h.run_job(job_writing(&h, "digest", b"flipped bit"))
        .assert_code(0);
    assert_eq!(
        s3.blob(b"flipped bit").as_deref(),
        Some(&b"flipped bit"[..])
    );

    let s3 = FakeS3::start(Fault::BadDigestAlways);
    let h = s3.harness();
    h.run_job(job_writing(&h, "digests", b"never right"))
        .assert_code(3);
    let puts = s3.state.lock().unwrap().seen_puts.values().copied().max();
    assert_eq!(puts, Some(3), "three tries of the blob");
}

/// Once a resend has cured a corrupted body, corruption is a fault of the way, not the
/// store's: a blob whose body came corrupted three times in a row is sent a fourth time (it
/// was UPLOAD_ERROR after the third).
#[test]
fn corruption_a_resend_cured_is_retried_past_a_few_tries() {
    let s3 = FakeS3::start(Fault::BadDigestAtRandom);
    let h = s3.harness();
    let spec = json!({"job_id": "mangled", "command": ["sh", "-c",
        "printf 1 > $C3_ARTIFACTS_DIR/one; sleep 2; printf 'unlucky bytes' > $C3_ARTIFACTS_DIR/two"]});
    h.run_job(spec).assert_code(0);
    assert_eq!(s3.blob(b"1").as_deref(), Some(&b"1"[..]));
    assert_eq!(
        s3.blob(b"unlucky bytes").as_deref(),
        Some(&b"unlucky bytes"[..])
    );
}

/// A store that refuses the node's clock for good is an outage that outlasts its deadline:
/// the job runs (its preflight's warning names the clock), its files stay for `resync`, and the
/// outage's WARN line says to look at the clock, not at the store's permissions.
#[test]
fn a_skewed_clock_is_named_as_the_cause() {
    let s3 = FakeS3::start(Fault::Skewed);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "skew", b"x"));
    run.assert_code(3);
    let t = h.terminal("skew");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert!(
        t["warnings"][0].as_str().unwrap_or("").contains("clock"),
        "{t}"
    );
    assert!(run.stderr.contains("clock may be off"), "{}", run.stderr);
}

/// A 403 whose body is not UTF-8 (a proxy's Latin-1 page; S3 quoting a request) is still a
/// 403: object_store reads an error body as text, and one it could not read lost the reply's
/// status, the denial retried to the deadline as a blip. What S3 quotes of the request (the
/// node's session token among its headers) reaches no log.
#[test]
fn a_denial_whose_body_is_not_utf8_is_a_denial_and_quotes_no_token() {
    let s3 = FakeS3::start(Fault::SignatureMismatch);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "sig", b"x"));
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stderr.contains("SignatureDoesNotMatch"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(SESSION_TOKEN), "{}", run.stderr);
    assert_eq!(s3.puts_of(b""), 1, "the preflight's denial was retried");
}

/// A store that refuses the node's clock for a while (a node booted before NTP synced, its
/// housekeeping `recover` run two minutes later) is an outage, not a denial: once the clock
/// is set the uploads go through and the job SUCCEEDS. The 403 was taken as permanent: a job
/// that exited 0 ended UPLOAD_ERROR at once, not retryable.
#[test]
fn a_clock_skewed_for_a_while_is_an_outage() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml = h
        .extra_toml
        .replace("retry_deadline_secs = 4", "retry_deadline_secs = 60");
    let data = b"written while the clock was off";
    let src = h.path("skewed.src");
    std::fs::write(&src, data).unwrap();
    let (started, go) = (h.path("started"), h.path("go"));
    let script = format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.1; done; cp {} $C3_ARTIFACTS_DIR/out",
        started.display(),
        go.display(),
        src.display()
    );
    let spec = h.spec(json!({"job_id": "skewed", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the job to start", Duration::from_secs(30), || {
        started.exists().then_some(())
    });
    s3.set_fault(Fault::Skewed);
    std::fs::write(&go, "").unwrap();
    wait_for("a PUT of the job's blob", Duration::from_secs(30), || {
        (s3.puts_of(data) > 0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    s3.set_fault(Fault::None);
    let run = h.wait("c3-agent run (skewed)".into(), child);
    run.assert_code(0);
    assert_eq!(h.terminal("skewed")["state"], "SUCCEEDED");
    assert_eq!(s3.blob(data).as_deref(), Some(&data[..]));
    assert!(run.stderr.contains("clock may be off"), "{}", run.stderr);
}

#[test]
fn a_store_that_denies_head_still_gets_every_file() {
    let s3 = FakeS3::start(Fault::HeadDenied);
    let h = s3.harness();
    // Over 1 MiB: the agent would ask with a HEAD first whether the blob is stored.
    let data = pattern(2 << 20);
    let run = h.run_job(job_writing(&h, "wonly", &data));
    run.assert_code(0);
    assert!(s3.blob(&data).as_deref() == Some(&data[..]));
    assert!(
        run.stderr.matches("denies HEAD").count() == 1,
        "said once\n{}",
        run.stderr
    );
}

/// No conditional writes and no HEAD (a write-only policy): the job's manifest key cannot be
/// checked before it is written, so it is written as it is when no look is allowed. The check
/// that the conditional write's 501 falls back to was a HEAD whose 403 was permanent: every
/// job ended UPLOAD_ERROR with its blobs and attempt manifest stored.
#[test]
fn a_write_only_store_without_conditional_writes_gets_the_jobs_manifest() {
    let s3 = FakeS3::start(Fault::NoConditionalPutHeadDenied);
    let h = s3.harness();
    h.run_job(job_writing(&h, "wo", b"x")).assert_code(0);
    assert_eq!(h.terminal("wo")["state"], "SUCCEEDED");
    let st = s3.state.lock().unwrap();
    let stored = st.objects.get("pre/jobs/wo/manifest.json");
    assert!(
        stored.is_some_and(|m| m.starts_with(b"{")),
        "no job manifest"
    );
}

/// On that store, an older attempt finished after a newer one (`recover`, `resync`, a node
/// cut off) leaves the job's manifest to the newer: the attempts' keys, which the store
/// lists, show it. Its blind write replaced the newer attempt's manifest.
#[test]
fn on_a_write_only_store_an_older_attempt_leaves_the_newer_ones_manifest() {
    let s3 = FakeS3::start(Fault::NoConditionalPutHeadDenied);
    let h = s3.harness();
    let mut second = job_writing(&h, "wo2", b"second");
    second["attempt"] = 2.into();
    h.run_job(second).assert_code(0);
    let mut first = job_writing(&h, "wo2", b"first");
    first["attempt"] = 1.into();
    h.run_job(first).assert_code(0);
    let st = s3.state.lock().unwrap();
    let stored = st
        .objects
        .get("pre/jobs/wo2/manifest.json")
        .expect("a job manifest");
    let m: serde_json::Value = serde_json::from_slice(stored).unwrap();
    assert_eq!(m["attempt"], 2, "{m}");
}

/// A public-write endpoint (`aws_skip_signature`, no keys): nothing to sign with is needed,
/// so the preflight does not look for the instance metadata (a closed port here). It did, and
/// failed every job before its launch (AGENT_ERROR, exit 6).
#[test]
fn unsigned_requests_need_no_credentials() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    h.extra_toml = h
        .extra_toml
        .replace("aws_access_key_id = \"AK\"\n", "")
        .replace("aws_secret_access_key = \"SK\"\n", "")
        + &format!(
            "aws_skip_signature = \"true\"\naws_metadata_endpoint = \"http://127.0.0.1:{closed}\"\n"
        );
    assert!(!h.extra_toml.contains("aws_access_key_id"));
    h.run_job(job_writing(&h, "unsigned", b"public"))
        .assert_code(0);
    assert_eq!(s3.blob(b"public").as_deref(), Some(&b"public"[..]));
}

#[test]
fn a_short_object_under_a_blobs_key_is_replaced_not_trusted() {
    let s3 = FakeS3::start(Fault::None);
    let data = pattern(2 << 20);
    s3.put_blob(&data, &data[..1000]);
    let h = s3.harness();
    h.run_job(job_writing(&h, "short", &data)).assert_code(0);
    assert!(
        s3.blob(&data).as_deref() == Some(&data[..]),
        "the torn object was taken for the blob"
    );
}

#[test]
fn a_pull_whose_downloads_break_off_goes_on_where_each_stopped() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(3 << 20);
    h.run_job(job_writing(&h, "cut", &data)).assert_code(0);
    s3.set_fault(Fault::CutDownloads);
    let dest = h.path("dest");
    h.run(&["pull", "cut", dest.to_str().unwrap()])
        .assert_code(0);
    assert!(std::fs::read(dest.join("artifacts/out")).unwrap() == data);
}

/// A download that ends cleanly but short (a proxy cut a close-delimited body) is a break,
/// resumed where it stopped: it was taken for the store holding other bytes, fetched whole
/// once more, and a second such cut failed the pull as a mismatch, not retryable.
#[test]
fn a_download_that_ends_short_is_resumed_not_a_mismatch() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(1 << 20);
    h.run_job(job_writing(&h, "short", &data)).assert_code(0);
    s3.set_fault(Fault::ShortCleanTwice);
    let dest = h.path("dest");
    let pulled = h.run(&["pull", "short", dest.to_str().unwrap()]);
    pulled.assert_code(0);
    assert!(std::fs::read(dest.join("artifacts/out")).unwrap() == data);
}

/// `c3-agent logs` of a job whose log is only in the store goes on where a broken-off
/// download stopped: the request was retried, its body never, and a log whose transfer
/// outlasted a request's time limit could not be read at all.
#[test]
fn logs_from_the_store_go_on_where_a_download_broke_off() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    // 1 MiB of lines: four pieces of 256 KiB.
    let script = "i=0; while [ $i -lt 16384 ]; do echo 'a line of the log, 64 bytes long, padded out to its length.....'; i=$((i+1)); done";
    h.run_job(json!({"job_id": "cutlog", "command": ["sh", "-c", script]}))
        .assert_code(0);
    std::fs::remove_dir_all(h.state.join("jobs/cutlog")).unwrap();
    s3.set_fault(Fault::CutDownloads);
    let shown = h.run(&["logs", "cutlog"]);
    shown.assert_code(0);
    assert_eq!(shown.stdout.len(), 16384 * 64, "{}", shown.stderr);
}

/// A download breaks off once and the store ignores the Range of its resume (object_store
/// refuses the 200 it gets): the blob is fetched again from the start, with no Range. The
/// refusal was taken as the store's last word, and one reset failed the dataset for good.
#[test]
fn a_dataset_whose_resume_the_store_answers_whole_is_fetched_again() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(3 << 20);
    h.run_job(job_writing(&h, "once", &data)).assert_code(0);
    s3.set_fault(Fault::CutOnceNoRange);
    let run = h.run_job(json!({"job_id": "again", "command": ["true"],
        "datasets": [{"ref": "/jobs/once", "mount": "in"}]}));
    run.assert_code(0);
    assert!(std::fs::read(h.workdir("again").join("in/artifacts/out")).unwrap() == data);
    let key = format!("pre/blobs/sha256/{}", sha256_hex(&data));
    let gets = s3.state.lock().unwrap().seen_gets.get(&key).copied();
    assert_eq!(
        gets,
        Some(3),
        "the cut GET, the resume refused, the GET from the start"
    );
}

/// A download breaks off and the store ignores the Range of its resume (object_store refuses
/// the 200 it gets), every time: that will not change on a retry. The resume's error was
/// dropped and the break reported, so the dataset failed as retryable, for ever. Fetched
/// again from the start once, it breaks off again, and the refusal is the store's word.
#[test]
fn a_dataset_whose_store_ignores_the_resumes_range_is_not_retried() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(3 << 20);
    h.run_job(job_writing(&h, "cut", &data)).assert_code(0);
    s3.set_fault(Fault::CutDownloadsNoRange);
    h.run_job(json!({"job_id": "chained", "command": ["true"],
        "datasets": [{"ref": "/jobs/cut", "mount": "in"}]}))
        .assert_code(6);
    let t = h.terminal("chained");
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    assert_eq!(t["retryable"], false, "{t}");
    assert!(t["message"].as_str().unwrap_or("").contains("range"), "{t}");
    let key = format!("pre/blobs/sha256/{}", sha256_hex(&data));
    let gets = s3.state.lock().unwrap().seen_gets.get(&key).copied();
    assert_eq!(gets, Some(4), "twice: a GET cut, its resume refused");
}

/// A body that does not hash to its key, once: a proxy's or cache's fault, which a second
/// GET cures. It failed the pull (and a dataset, for good: `retryable: false`).
#[test]
fn a_blob_served_wrong_once_is_fetched_again() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(1 << 20);
    h.run_job(job_writing(&h, "flip", &data)).assert_code(0);
    s3.set_fault(Fault::FlipOnce);
    let dest = h.path("dest");
    let pulled = h.run(&["pull", "flip", dest.to_str().unwrap()]);
    pulled.assert_code(0);
    assert!(
        pulled.stderr.contains("fetching it again"),
        "{}",
        pulled.stderr
    );
    assert!(std::fs::read(dest.join("artifacts/out")).unwrap() == data);
}

/// A store that is down for good: `retry_deadline_secs` is how long the store may fail before
/// the uploads do, not a fresh wait for each file in turn. Each file once got its own
/// deadline, so a dead store held the final sync for files / files_in_flight deadlines (10
/// files, one at a time: 10 x 4 s here; 1,000 files, 16 at a time, 600 s each: 10 hours).
/// Counted at the store: once the outage is older than the deadline, a file fails without a
/// try, but for one probe at a time (store.rs `PROBE_EVERY`).
#[test]
fn a_dead_store_fails_the_uploads_after_one_deadline_not_one_per_file() {
    let s3 = FakeS3::start(Fault::Down);
    let mut h = s3.harness();
    h.extra_toml.push_str("[upload]\nfiles_in_flight = 1\n");
    let files: Vec<Vec<u8>> = (0..10).map(|i| format!("file {i}").into_bytes()).collect();
    let src = h.path("src");
    std::fs::create_dir_all(&src).unwrap();
    for (i, bytes) in files.iter().enumerate() {
        std::fs::write(src.join(format!("f{i}")), bytes).unwrap();
    }
    let cmd = format!("cp {}/* $C3_ARTIFACTS_DIR/", src.display());
    let run = h.run_job(json!({"job_id": "dead", "command": ["sh", "-c", cmd]}));
    run.assert_code(3);
    assert_eq!(h.terminal("dead")["reason"], "UPLOAD_ERROR");
    let puts: Vec<usize> = files.iter().map(|b| s3.puts_of(b)).collect();
    assert!(
        puts.iter().any(|&n| n >= 1),
        "the store was tried: {puts:?}"
    );
    // One deadline for the outage: the files in flight retry within it, the rest get a try or
    // none (a probe past the deadline). A deadline per file made it 50 and more.
    let total: usize = puts.iter().sum();
    assert!(
        total <= 3 * files.len(),
        "each file waited out a deadline of its own: {total} PUTs {puts:?}\n{}",
        run.stderr
    );
}

/// The other side of one deadline for the whole outage: the final sync gets a whole deadline
/// of its own, from the job's end. A store down for longer than the deadline during the job and
/// back a moment after it still gets every file, though the outage began long before.
#[test]
fn a_store_back_soon_after_a_long_outage_during_the_job_gets_every_file() {
    let s3 = FakeS3::start(Fault::Down);
    let mut h = s3.harness();
    h.extra_toml.push_str("[sync]\nsettle_ms = 100\n");
    let go = h.path("go");
    let script = format!(
        "echo early > $C3_ARTIFACTS_DIR/a; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "back", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let a = b"early\n";
    wait_for("live sync to try the file", Duration::from_secs(30), || {
        (s3.puts_of(a) >= 1).then_some(())
    });
    // The outage outlasts the 4 s deadline while the job runs.
    std::thread::sleep(Duration::from_secs(5));
    let tried = s3.puts_of(a);
    std::fs::write(&go, "").unwrap();
    wait_for(
        "the final sync to try the file",
        Duration::from_secs(30),
        || {
            let finalizing = h
                .local_reports("back")
                .iter()
                .any(|r| r["body"]["state"] == "FINALIZING");
            (finalizing && s3.puts_of(a) > tried).then_some(())
        },
    );
    s3.set_fault(Fault::None);
    let run = h.wait("back".into(), child);
    run.assert_code(0);
    assert_eq!(s3.blob(a).as_deref(), Some(&a[..]));
}

/// S3 may answer CompleteMultipartUpload 200 and then, in the body, `InternalError`: the
/// upload is not complete (or is, and the answer was lost). Neither may be taken for success
/// unless the blob is there, nor fail the job.
#[test]
fn a_complete_answered_200_with_an_error_body_is_not_taken_for_success() {
    for (fault, id) in [
        (Fault::CompleteFailsWith200, "c200fail"),
        (Fault::CompleteAppliedWith200, "c200done"),
        (Fault::CompleteAssemblesSlowly, "c200slow"),
    ] {
        let s3 = FakeS3::start(fault);
        let mut h = s3.harness();
        h.extra_toml
            .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
        let data = pattern(3 << 20);
        h.run_job(job_writing(&h, id, &data)).assert_code(0);
        assert!(
            s3.blob(&data).as_deref() == Some(&data[..]),
            "{id}: the job succeeded, but its blob is not in the store"
        );
        if fault == Fault::CompleteFailsWith200 {
            assert!(s3.state.lock().unwrap().completes >= 2, "{id}: no retry");
        }
    }
}

/// Client settings the environment gives (`AWS_ALLOW_HTTP`, a proxy) survive the agent's own
/// request bounds.
#[test]
fn client_settings_from_the_environment_are_kept() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml = h.extra_toml.replace("aws_allow_http = \"true\"\n", "");
    h.env.push(("AWS_ALLOW_HTTP".into(), "true".into()));
    h.run_job(job_writing(&h, "envhttp", b"over plain http"))
        .assert_code(0);
    assert!(s3.blob(b"over plain http").is_some());
}

/// An error reply is read for its message, a listing for its keys: neither may make the root
/// agent hold whatever the store sends. Counted at the store: what it got to send before the
/// agent let go of one reply (the kernel's socket buffers included), against the 256 MiB on offer.
#[test]
fn an_endless_error_reply_is_cut_not_held() {
    let s3 = FakeS3::start(Fault::EndlessError);
    let h = s3.harness();
    let run = h.run_job(job_writing(&h, "endless", b"refused"));
    run.assert_code(3);
    assert_eq!(h.terminal("endless")["reason"], "UPLOAD_ERROR");
    let sent = s3.endless_sent();
    assert!(
        sent < 32 << 20,
        "the agent read {sent} bytes of one error reply"
    );
}

#[test]
fn an_endless_xml_reply_fails_the_upload_without_holding_it() {
    let s3 = FakeS3::start(Fault::EndlessXml);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
    let run = h.run_job(job_writing(&h, "xml", &pattern(2 << 20)));
    run.assert_code(3);
    assert_eq!(h.terminal("xml")["reason"], "UPLOAD_ERROR");
    let sent = s3.endless_sent();
    assert!(
        sent < 64 << 20,
        "the agent read {sent} bytes of one XML reply"
    );
}

/// A multipart upload id too long for any request that names it: the HTTP client panicked
/// on each part, on the abort, and then on every look at its journal, the seal's included,
/// so no manifest was ever written. It is a blip now: a new upload is started.
#[test]
fn an_upload_id_no_request_can_carry_is_not_used() {
    let s3 = FakeS3::start(Fault::HugeUploadIdOnce);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\n");
    let data = pattern(3 << 20);
    let run = h.run_job(job_writing(&h, "hugeid", &data));
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    run.assert_code(0);
    assert!(s3.blob(&data).as_deref() == Some(&data[..]));
    let manifest = s3
        .state
        .lock()
        .unwrap()
        .objects
        .get("pre/jobs/hugeid/manifest.json")
        .cloned();
    let manifest: serde_json::Value =
        serde_json::from_slice(&manifest.expect("a manifest")).unwrap();
    assert_eq!(manifest["complete"], true);
}

/// A bucket of another region than the one configured: S3 answers every request with a
/// 301 PermanentRedirect and no Location. That was taken as a blip: the job launched, and
/// every upload was retried to the deadline and failed (UPLOAD_ERROR). It is the node's
/// configuration, said before the launch.
#[test]
fn a_bucket_of_another_region_fails_before_the_launch() {
    let s3 = FakeS3::start(Fault::WrongRegion);
    let h = s3.harness();
    let marker = h.path("launched");
    let run = h.run_job(
        serde_json::json!({"job_id": "region", "command": ["touch", marker.display().to_string()]}),
    );
    run.assert_code(6);
    assert!(!marker.exists(), "the script ran");
    assert!(run.stderr.contains("region"), "{}", run.stderr);
}

/// A PUT answered with a redirect: the HTTP client followed it (a 303 turns the PUT into a
/// GET of the new place) and the 200 there counted as the blob stored; the job ended 0 with
/// a manifest listing a blob the store did not hold.
#[test]
fn a_redirected_upload_is_not_taken_as_stored() {
    let s3 = FakeS3::start(Fault::RedirectPuts);
    let h = s3.harness();
    let data = pattern(4096);
    let run = h.run_job(job_writing(&h, "redirected", &data));
    let stored = s3.blob(&data).is_some();
    assert!(
        stored || run.code != 0,
        "exit {} with the blob not in the store\n{}",
        run.code,
        run.stderr
    );
    assert!(run.stderr.contains("redirect"), "{}", run.stderr);
}

/// A gateway that answers the PUT of a manifest already stored with a 303 to its own path:
/// the HTTP client followed it as a GET, whose 200 and the old manifest's ETag stood for the
/// write. The second attempt ended 0 with the job's manifest still the first attempt's.
#[test]
fn a_manifest_put_answered_303_to_itself_is_not_taken_as_written() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    h.run_job(job_writing(&h, "again", b"first attempt"))
        .assert_code(0);
    s3.set_fault(Fault::RedirectManifestPutsHere);
    let mut second = job_writing(&h, "again", b"second attempt");
    second["attempt"] = json!(2);
    let run = h.run_job(second);
    let manifest: serde_json::Value =
        serde_json::from_slice(&s3.state.lock().unwrap().objects["pre/jobs/again/manifest.json"])
            .unwrap();
    assert!(
        run.code != 0 || manifest["attempt"] == 2,
        "exit {} with the job's manifest {manifest}\n{}",
        run.code,
        run.stderr
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("303"), "{}", run.stderr);
}

/// A store that answers 501 NotImplemented to each PUT (a checksum or encryption header it
/// does not do): each try was refused alike, its body sent again, until the deadline.
#[test]
fn a_501_fails_the_upload_at_once() {
    let s3 = FakeS3::start(Fault::PutsNotImplemented);
    let mut h = s3.harness();
    h.extra_toml = h
        .extra_toml
        .replace("retry_deadline_secs = 4", "retry_deadline_secs = 120");
    let data = b"a header the store does not do";
    let started = std::time::Instant::now();
    let run = h.run_job(job_writing(&h, "no501", data));
    run.assert_code(3);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "retried a 501 for {:?}\n{}",
        started.elapsed(),
        run.stderr
    );
    // The conditional PUT, then the plain one it falls back to: none after.
    assert!(s3.puts_of(data) <= 2, "{} PUTs", s3.puts_of(data));
    assert!(run.stderr.contains("501"), "{}", run.stderr);
}

/// A store that redirects to another host. The HTTP client followed: a 307 re-sent a PUT's
/// body, the job's file, with its session token to the host the store named, and a pull read
/// a blob from there. Redirects are followed only within the store's origin.
#[test]
fn a_redirect_to_another_host_is_not_followed() {
    let elsewhere = FakeS3::start(Fault::None);
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let first = pattern(5000);
    h.run_job(job_writing(&h, "first", &first)).assert_code(0);
    s3.state.lock().unwrap().redirect_to = Some(elsewhere.port);
    s3.set_fault(Fault::RedirectAway);

    let dest = h.path("dest");
    let pulled = h.run(&["pull", "first", dest.to_str().unwrap()]);
    let sent_elsewhere = || elsewhere.state.lock().unwrap().requests;
    assert_eq!(sent_elsewhere(), 0, "the pull's GET went to the other host");
    assert_ne!(pulled.code, 0, "{}", pulled.stderr);
    let second = pattern(6000);
    let run = h.run_job(job_writing(&h, "second", &second));
    assert_eq!(sent_elsewhere(), 0, "the job's PUT went to the other host");
    run.assert_code(3);
    assert!(run.stderr.contains("redirect"), "{}", run.stderr);
    assert!(s3.blob(&second).is_none());
}

/// A session token in the AWS profile that a helper rewrites before it expires: the agent
/// read the profile once, so a job that outlived its token had every later upload refused
/// (ExpiredToken, retried with the same token to the deadline: UPLOAD_ERROR).
#[test]
fn a_profile_rewritten_with_a_new_token_is_read_again() {
    let s3 = FakeS3::start(Fault::None);
    s3.state.lock().unwrap().valid_token = Some("T1".into());
    let mut h = s3.harness();
    h.extra_toml = h.extra_toml.replace(
        "aws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\n",
        "",
    );
    assert!(!h.extra_toml.contains("aws_access_key_id"));
    let creds = h.dir.path().join("aws-credentials");
    let write = |token: &str| {
        std::fs::write(
            &creds,
            format!("[default]\naws_access_key_id = AK\naws_secret_access_key = SK\naws_session_token = {token}\n"),
        )
        .unwrap()
    };
    write("T1");
    h.env.push((
        "AWS_SHARED_CREDENTIALS_FILE".into(),
        creds.display().to_string(),
    ));
    let spec = h.spec(serde_json::json!({"job_id": "rotated",
        "command": ["sh", "-c", "sleep 2; echo late > $C3_ARTIFACTS_DIR/late"]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    std::thread::sleep(std::time::Duration::from_millis(700));
    let tmp = h.dir.path().join("aws-credentials.new");
    std::fs::write(
        &tmp,
        "[default]\naws_access_key_id = AK\naws_secret_access_key = SK\naws_session_token = T2\n",
    )
    .unwrap();
    std::fs::rename(&tmp, &creds).unwrap();
    s3.state.lock().unwrap().valid_token = Some("T2".into());
    h.wait("rotated".into(), agent).assert_code(0);
    assert!(s3.blob(b"late\n").is_some());
}

/// A manifest read whose body breaks off after its headers: the request was retried, its
/// body not, and a dataset failed before its launch on one reset.
#[test]
fn a_manifest_read_cut_once_is_read_again() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(4096);
    h.run_job(job_writing(&h, "cutdoc", &data)).assert_code(0);
    s3.set_fault(Fault::CutManifestOnce);
    let dest = h.path("dest");
    h.run(&["pull", "cutdoc", dest.to_str().unwrap()])
        .assert_code(0);
    assert!(std::fs::read(dest.join("artifacts/out")).unwrap() == data);
}

/// A listing that never ends (every page says more follow): a later attempt's manifest
/// write looks for a newer attempt through a listing, which gathered keys for ever while
/// the agent never finished. The listing stops at a bound and the write goes on as when the
/// store refuses to list.
#[test]
fn an_endless_listing_does_not_hold_the_manifest_write() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let data = pattern(4096);
    h.run_job(job_writing(&h, "pages", &data)).assert_code(0);
    s3.set_fault(Fault::EndlessListing);
    let mut spec = job_writing(&h, "pages", &data);
    spec["attempt"] = serde_json::json!(2);
    let path = h.spec(spec);
    let mut agent = h.spawn(&["run", "--job", path.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while agent.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let finished = agent.try_wait().unwrap();
    if finished.is_none() {
        let _ = agent.kill();
    }
    assert!(finished.is_some(), "attempt 2 did not finish in 90 s");
    let run = h.wait("attempt 2".into(), agent);
    run.assert_code(0);
    assert!(run.stderr.contains("went past"), "{}", run.stderr);
}

/// An older attempt finished after a newer one (a late `recover`, a `resync`) on a store
/// whose listing of the attempts goes past its bound (a gateway that drops the continuation
/// token): refused for good, the write went blind and the older attempt's manifest replaced
/// the newer one's at the job's key. The job's key itself says it is the newer attempt's.
#[test]
fn an_older_attempt_past_a_refused_listing_leaves_the_newer_ones_manifest() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    let mut newer = job_writing(&h, "late", b"new");
    newer["attempt"] = json!(2);
    newer["workdir"] = json!(h.path("w2").display().to_string());
    h.run_job(newer).assert_code(0);
    s3.set_fault(Fault::EndlessListing);
    let mut older = job_writing(&h, "late", b"old");
    older["workdir"] = json!(h.path("w1").display().to_string());
    let run = h.run_job(older);
    run.assert_code(0);
    let st = s3.state.lock().unwrap();
    let job: serde_json::Value =
        serde_json::from_slice(st.objects.get("pre/jobs/late/manifest.json").unwrap()).unwrap();
    assert_eq!(job["attempt"], 2, "{}", run.stderr);
}

/// A store that sends a byte now and then fails no request: `job.dataset_timeout_secs` bounds
/// a job's inputs, or the node's GPUs wait in "preparing" for as long as the store likes.
#[test]
fn a_dataset_from_a_trickling_store_ends_at_the_dataset_timeout() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml.push_str("[job]\ndataset_timeout_secs = 2\n");
    h.run_job(job_writing(&h, "slowsrc", &pattern(4096)))
        .assert_code(0);
    s3.set_fault(Fault::Trickle);
    let marker = h.path("launched");
    let started = std::time::Instant::now();
    let run = h.run_job(json!({"job_id": "waits",
        "command": ["touch", marker.display().to_string()],
        "datasets": [{"ref": "/jobs/slowsrc", "mount": "in"}]}));
    run.assert_code(6);
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert!(!marker.exists(), "the script ran");
    let t = h.terminal("waits");
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    // A slow store is no fault of the job: a later attempt (or another node) may be luckier.
    assert_eq!(t["retryable"], true, "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap_or("")
            .contains("dataset_timeout_secs"),
        "{t}"
    );
}

/// A dataset's manifest answered with a bare 404 (a proxy's or load balancer's, not the
/// store's NoSuchKey) was taken for the job having no manifest: DATASET_ERROR, not
/// retryable, at the first such answer. It is a blip, retried; still met at the end, a
/// retryable failure. A job the store says it has no manifest of stays not retryable.
#[test]
fn a_bare_404_to_a_datasets_manifest_is_a_blip() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    h.run_job(job_writing(&h, "baresrc", &pattern(4096)))
        .assert_code(0);
    let absent = h.run_job(json!({"job_id": "nosrc", "command": ["true"],
        "datasets": [{"ref": "/jobs/never-ran", "mount": "in"}]}));
    absent.assert_code(6);
    assert_eq!(h.terminal("nosrc")["retryable"], false);
    s3.set_fault(Fault::ManifestGetBareNotFound);
    let marker = h.path("launched");
    let run = h.run_job(json!({"job_id": "bare404",
        "command": ["touch", marker.display().to_string()],
        "datasets": [{"ref": "/jobs/baresrc", "mount": "in"}]}));
    run.assert_code(6);
    assert!(!marker.exists(), "the script ran");
    let t = h.terminal("bare404");
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    assert_eq!(t["retryable"], true, "{t}");
    s3.set_fault(Fault::None);
    h.run_job(json!({"job_id": "bare404", "attempt": 2,
        "command": ["touch", marker.display().to_string()],
        "datasets": [{"ref": "/jobs/baresrc", "mount": "in"}]}))
        .assert_code(0);
    assert!(marker.exists());
}

/// A finished attempt whose multipart abort failed (the store was down as it ended) keeps its
/// journal; `recover` aborts the upload later, so neither the job (retention) nor the parts
/// (billed at the store) stay for ever.
#[test]
fn recover_aborts_an_upload_a_finished_attempt_left_journaled() {
    let s3 = FakeS3::start(Fault::None);
    let h = s3.harness();
    h.run_job(job_writing(&h, "left", b"small")).assert_code(0);
    let sha = "ab".repeat(32);
    let uploads = h.state.join("jobs/left/uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    let journal = uploads.join(format!("1-{sha}.json"));
    let record = json!({"sha256": sha, "upload_id": "u-left", "size": 10, "part_size": 5 << 20, "parts": {}});
    std::fs::write(&journal, record.to_string()).unwrap();
    s3.state.lock().unwrap().uploads.insert(
        "u-left".into(),
        (format!("pre/blobs/sha256/{sha}"), Default::default()),
    );
    h.run(&["recover"]).assert_code(0);
    assert!(!journal.exists(), "the journal is still there");
    assert!(
        !s3.state.lock().unwrap().uploads.contains_key("u-left"),
        "the upload is still open at the store"
    );
}

/// A retried job whose attempt 1 left a multipart upload journaled (its agent killed
/// mid-upload, its record still "running"; or its store down at its end, the upload kept for
/// a resume, its output unstored) and whose attempt 2 ran since in the same workdir:
/// `recover` leaves attempt 1 alone, and aborts its upload. Nothing did: the journal kept the
/// job (its whole workdir) from retention, and the parts at the store, for ever.
#[test]
fn recover_aborts_the_uploads_of_an_attempt_a_later_one_took_over() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.env
        .push(("C3_AGENT_RETENTION_FAILED_DAYS".into(), "0".into()));
    h.env
        .push(("C3_AGENT_RETENTION_SUCCEEDED_DAYS".into(), "0".into()));
    for (job, upload) in [("killed", "u-killed"), ("kept", "u-kept")] {
        for attempt in [1, 2] {
            let mut spec = job_writing(&h, job, b"small");
            spec["attempt"] = attempt.into();
            h.run_job(spec).assert_code(0);
        }
        let path = h.state.join(format!("jobs/{job}/attempts/1/run.json"));
        let mut record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        if job == "killed" {
            record["phase"] = "running".into();
        } else {
            record["unstored"] = json!(["artifacts/big.bin"]);
        }
        std::fs::write(&path, record.to_string()).unwrap();
        let sha = "ab".repeat(32);
        let uploads = h.state.join(format!("jobs/{job}/uploads"));
        std::fs::create_dir_all(&uploads).unwrap();
        let journal = json!({"sha256": sha, "upload_id": upload, "size": 10 << 20, "part_size": 5 << 20, "parts": {}});
        std::fs::write(uploads.join(format!("1-{sha}.json")), journal.to_string()).unwrap();
        s3.state.lock().unwrap().uploads.insert(
            upload.into(),
            (format!("pre/blobs/sha256/{sha}"), Default::default()),
        );
    }
    // The done one is left alone; the one whose agent was killed gets its end said (its
    // output not all stored: UPLOAD_ERROR, exit 3), without a sync.
    let run = h.run(&["recover"]);
    run.assert_code(3);
    assert!(run.stderr.contains("left alone"), "{}", run.stderr);
    assert!(
        run.stderr.contains("its end is reported without a sync"),
        "{}",
        run.stderr
    );
    for (job, upload) in [("killed", "u-killed"), ("kept", "u-kept")] {
        assert!(
            !s3.state.lock().unwrap().uploads.contains_key(upload),
            "{job}: the upload is still open at the store: {}",
            run.stderr
        );
        assert!(
            !h.state.join(format!("jobs/{job}")).exists(),
            "{job}: the job was kept: {}",
            run.stderr
        );
    }
}

/// A part read that fails (EIO: a network file system's blip) is tried again at once, and
/// the parts already sent are kept: only the rest is sent. The upload was aborted and every
/// part sent again; then it was kept, but the file failed the job (UPLOAD_ERROR) until a
/// `recover`.
#[test]
fn a_read_fault_mid_upload_is_tried_again_sending_only_the_rest() {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml.push_str(
        "[upload]\nmultipart_threshold_bytes = 5242880\nmin_part_size_bytes = 5242880\nparts_in_flight = 1\n[sync]\nlive = false\n",
    );
    let data = pattern((15 << 20) + 7);
    h.env
        .push(("C3_AGENT_FAULT".into(), "part-read-eio".into()));
    let run = h.run_job(job_writing(&h, "eio", &data));
    run.assert_code(0);
    assert!(run.stderr.contains("trying it again"), "{}", run.stderr);
    assert_eq!(s3.blob(&data).as_deref(), Some(&data[..]));
    assert_eq!(
        s3.state.lock().unwrap().parts_put,
        4,
        "parts sent again after the read fault"
    );
}

/// The agent dies while its job runs, after live sync stored a file and listed it; the
/// workdir is gone when `recover` comes, and the store will not let the agent read the
/// attempt's manifest (a write-only bucket's 403, a proxy's bare 404). What it lists is
/// unknown and the scan cannot see the output: no manifest is written over it (the seal from
/// an empty book listed nothing, and gc took the blobs), and "manifest" is unstored.
#[test]
fn recover_never_replaces_a_manifest_it_cannot_read_with_less() {
    for (n, fault) in [Fault::ManifestGetDenied, Fault::ManifestGetBareNotFound]
        .into_iter()
        .enumerate()
    {
        let s3 = FakeS3::start(Fault::None);
        let h = s3.harness();
        let job = format!("unread{n}");
        let key = format!("pre/jobs/{job}/attempts/1/manifest.json");
        let work = h.path("w");
        let spec = h.spec(json!({"job_id": job, "workdir": work.display().to_string(),
            "command": ["sh", "-c", "echo stored > $C3_ARTIFACTS_DIR/a; sleep 120"]}));
        let mut agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
        let listed = crate::support::wait_for(
            "live sync to list the file",
            std::time::Duration::from_secs(30),
            || {
                let st = s3.state.lock().unwrap();
                st.objects
                    .get(&key)
                    .filter(|m| String::from_utf8_lossy(m).contains("artifacts/a"))
                    .cloned()
            },
        );
        agent.kill().unwrap();
        agent.wait().unwrap();
        std::fs::remove_dir_all(&work).unwrap();
        s3.set_fault(fault);
        let run = h.run(&["recover"]);
        let now = s3.state.lock().unwrap().objects.get(&key).cloned();
        assert_eq!(
            now.as_deref(),
            Some(&listed[..]),
            "{fault:?}: the manifest was replaced\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("no manifest is written over it"),
            "{fault:?}: {}",
            run.stderr
        );
    }
}

/// A sidecar killed while its trainer runs, after live sync listed `out/f`, is restarted while
/// the store will not let it read the attempt's manifest (a write-only bucket's 403). Its
/// book is empty: the in-progress manifests it wrote listed only what it stored since, over
/// the listing of `out/f` (a second death with the pod's files gone left a recover nothing
/// to list `out/f` by). None is written until the final scan sees all of the output; the
/// seal then lists both files. So too when the store fails the read past its retries (a
/// 503 blip), where the watch went on with an empty book and wrote over it.
#[test]
fn a_sidecar_that_cannot_read_its_earlier_manifest_writes_none_over_it_while_it_watches() {
    earlier_manifest_unread(Fault::ManifestGetDenied);
}

/// The same with the read failing past its retries (503). Twice in some 20 runs under load
/// live sync stored `out/g` only at the job's end: most likely its upload met the outage the
/// read began, past its deadline, and a failed live upload waited for the final sync (now
/// tried again while the job runs: `a_live_upload_the_store_failed_is_tried_again_while_the_job_runs`).
#[test]
fn a_sidecar_whose_earlier_manifest_read_fails_past_its_retries_writes_none_over_it() {
    earlier_manifest_unread(Fault::ManifestGetUnavailable);
}
fn earlier_manifest_unread(fault: Fault) {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml
        .push_str("[sync]\nsettle_ms = 100\nmanifest_interval_ms = 200\npoll_ms = 1000\n");
    let job = "heldside";
    let key = format!("pre/jobs/{job}/attempts/1/manifest.json");
    let shared = h.path("shared");
    let out = shared.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut trainer = std::process::Command::new("sh")
        .args(["-c", "echo x > out/f; exec sleep 60"])
        .current_dir(&shared)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = trainer.id().to_string();
    let out_arg = out.display().to_string();
    let args = ["watch", "--job-id", job, "--pid", &pid, &out_arg];
    let first = h.spawn(&args);
    let listed = wait_for("live sync to list out/f", Duration::from_secs(30), || {
        let st = s3.state.lock().unwrap();
        st.objects
            .get(&key)
            .filter(|m| String::from_utf8_lossy(m).contains("out/f"))
            .cloned()
    });
    crate::support::signal(first.id(), "KILL");
    let _ = h.wait("killed watch".into(), first);
    s3.set_fault(fault);
    let second = h.spawn(&args);
    std::fs::write(out.join("g"), b"stored by the second watch").unwrap();
    wait_for("live sync to store out/g", Duration::from_secs(30), || {
        s3.blob(b"stored by the second watch")
    });
    // Ten manifest intervals: the in-progress write that followed the upload came in one.
    for _ in 0..20 {
        let now = s3.state.lock().unwrap().objects.get(&key).cloned();
        assert_eq!(
            now.as_deref(),
            Some(&listed[..]),
            "{fault:?}: an in-progress manifest was written over the one the watch could not read"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    trainer.kill().unwrap();
    trainer.wait().unwrap();
    let run = h.wait("the second watch".into(), second);
    run.assert_code(0);
    let sealed = s3.state.lock().unwrap().objects.get(&key).cloned().unwrap();
    let sealed: serde_json::Value = serde_json::from_slice(&sealed).unwrap();
    let paths: Vec<&str> = sealed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        (paths, &sealed["complete"]),
        (vec!["out/f", "out/g"], &json!(true)),
        "{}",
        run.stderr
    );
}

/// A job (`id`) that writes `bytes` to `artifacts/a` once the store has begun answering with
/// `fault`, then waits for the test's stop (60 s at most); returned once live sync's upload
/// of it met the fault, with the job's agent and the stop file.
fn live_upload_met_by(
    fault: Fault,
    id: &str,
    bytes: &[u8],
) -> (FakeS3, Harness, std::process::Child, std::path::PathBuf) {
    let s3 = FakeS3::start(Fault::None);
    let mut h = s3.harness();
    h.extra_toml.push_str("[sync]\nsettle_ms = 100\n");
    let stop = h.path("stop");
    let cmd = format!(
        "touch {started}; while [ ! -e {down} ]; do sleep 0.05; done; printf '%s' '{body}' > $C3_ARTIFACTS_DIR/a; \
         i=0; while [ ! -e {stop} ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done",
        started = h.path("started").display(),
        down = h.path("down").display(),
        body = std::str::from_utf8(bytes).unwrap(),
        stop = stop.display(),
    );
    let spec = h.spec(json!({"job_id": id, "command": ["sh", "-c", cmd]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // The fault begins once the job runs (the preflight passed).
    wait_for("the job to start", Duration::from_secs(30), || {
        h.path("started").exists().then_some(())
    });
    s3.set_fault(fault);
    std::fs::write(h.path("down"), b"").unwrap();
    wait_for(
        "the live upload to meet the fault",
        Duration::from_secs(30),
        || (s3.puts_of(bytes) >= 1).then_some(()),
    );
    (s3, h, agent, stop)
}

/// Live sync's upload of a file written while the store is down fails past the retry
/// deadline; once the store is back, the file is stored while the job still runs. It was
/// left for the final sync: a checkpoint written during an outage early in a long job
/// waited for the job's end, and was lost with a node that never got there.
#[test]
fn a_live_upload_the_store_failed_is_tried_again_while_the_job_runs() {
    let bytes = b"written during the outage";
    let (s3, h, agent, stop) = live_upload_met_by(Fault::Down, "backlive", bytes);
    // Past the retry deadline (4 s from the first failure): the upload has failed, as live
    // sync goes (its first try again comes 10 s after that).
    std::thread::sleep(Duration::from_secs(8));
    s3.set_fault(Fault::None);
    let stored = wait_for(
        "the file stored while the job runs",
        Duration::from_secs(40),
        || s3.blob(bytes),
    );
    assert!(!stop.exists());
    std::fs::write(&stop, b"").unwrap();
    let run = h.wait("the job".into(), agent);
    run.assert_code(0);
    assert_eq!(stored, bytes.to_vec());
    assert!(
        run.stderr.contains("tried again while the job runs"),
        "{}",
        run.stderr
    );
}

/// A live upload the store refused (a 403: no fault that passes) is not tried again while
/// the job runs: each try would read and hash the file again, for nothing. The final sync
/// tries it once more.
#[test]
fn a_live_upload_the_store_refused_waits_for_the_final_sync() {
    let bytes = b"refused while the job runs";
    let (s3, h, agent, stop) = live_upload_met_by(Fault::SignatureMismatch, "refusedlive", bytes);
    // Past the first wait of a store fault's (10 s).
    std::thread::sleep(Duration::from_secs(13));
    let puts = s3.puts_of(bytes);
    std::fs::write(&stop, b"").unwrap();
    let run = h.wait("the job".into(), agent);
    assert_eq!(
        puts, 1,
        "a refused upload was tried again while the job ran\n{}",
        run.stderr
    );
}

/// A blob PUT the store took and answered 500 (the answer lost) is sent again, refused as
/// present (412) and found by a HEAD last modified since the upload began: the job's own
/// write. It counts in `new_bytes` (the storage byte delta): taken for a blob that was there,
/// the job's bytes were missing from it. A blob stored before the job still counts nothing.
#[test]
fn a_blob_whose_put_answer_was_lost_counts_in_new_bytes() {
    lost_put_answer_counts(0);
}

/// Retried inside object_store (its `max_retries`, 3 by default), the lost answer came back
/// as the retry's 412, and the blob was taken for another's.
#[test]
fn a_blob_whose_put_answer_was_lost_counts_in_new_bytes_with_client_retries() {
    lost_put_answer_counts(2);
}

fn lost_put_answer_counts(client_retries: usize) {
    let s3 = FakeS3::start(Fault::AppliedThen500Once);
    let mut h = s3.harness().with_control_plane(10);
    h.extra_toml = h.extra_toml.replace(
        "max_retries = 0",
        &format!("max_retries = {client_retries}"),
    );
    let bytes = pattern(5000);
    s3.put_blob(b"there before", b"there before");
    let old = h.path("old.src");
    std::fs::write(&old, b"there before").unwrap();
    let mut spec = job_writing(&h, "lostack", &bytes);
    spec["command"][2] = json!(format!(
        "{}; cp {} $C3_ARTIFACTS_DIR/old",
        spec["command"][2].as_str().unwrap(),
        old.display()
    ));
    h.run_job(spec).assert_code(0);
    assert_eq!(s3.puts_of(&bytes), 2, "the first answer was not lost");
    let regs = h.cp().delivered("/artifacts");
    // The job's logs are empty: the empty blob is the preflight's.
    assert_eq!(
        (regs.len(), &regs[0]["bytes"], &regs[0]["new_bytes"]),
        (1, &json!(5000 + 12), &json!(5000)),
        "{regs:?}"
    );
}

/// The in-progress manifest write a publish or `--wait-all` makes is denied: the job hears
/// that it failed, not the store's error (its endpoint, bucket, keys, and the node's role in
/// an S3 denial's message); the agent's log has it.
#[test]
fn a_publish_whose_manifest_write_fails_tells_the_job_nothing_of_the_store() {
    let s3 = FakeS3::start(Fault::ManifestPutDenied);
    let mut h = s3.harness();
    h.extra_toml.push_str("[sync]\nsettle_ms = 60000\n");
    let script = format!(
        "echo w > $C3_ARTIFACTS_DIR/a; {BIN} publish $C3_ARTIFACTS_DIR/a 2> e1; echo $? > r1; \
         echo v > $C3_ARTIFACTS_DIR/b; {BIN} publish --wait-all 2> e2; echo $? > r2"
    );
    let run = h.run_job(json!({"job_id": "pubdeny", "command": ["sh", "-c", script]}));
    let w = h.workdir("pubdeny");
    let port = format!("127.0.0.1:{}", s3.port);
    for n in 1..=2 {
        let rc = std::fs::read_to_string(w.join(format!("r{n}"))).unwrap();
        let err = std::fs::read_to_string(w.join(format!("e{n}"))).unwrap();
        assert_eq!(rc.trim(), "1", "{err}");
        assert!(err.contains("manifest could not be written"), "{err}");
        assert!(
            !err.contains(ROLE_IN_DENIAL) && !err.contains(&port) && !err.contains("bucket"),
            "the job was told the store's error: {err}"
        );
    }
    assert!(run.stderr.contains(ROLE_IN_DENIAL), "{}", run.stderr);
}

/// The store takes the blob PUTs and never answers them, the agent knowing of no outage: the
/// final sync's first try is cut at `retry_deadline_secs` (4 s here), and the job fails with
/// UPLOAD_ERROR. It took the client's whole time-out (300 s) first.
#[test]
fn a_put_the_store_never_answers_fails_by_the_deadline() {
    let s3 = FakeS3::start(Fault::BlobPutsHang);
    let mut h = s3.harness();
    h.extra_toml.push_str("[sync]\nlive = false\n");
    let started = std::time::Instant::now();
    let run = h.run_job(job_writing(&h, "hangput", b"never answered"));
    let took = started.elapsed();
    run.assert_code(3);
    assert_eq!(h.terminal("hangput")["reason"], "UPLOAD_ERROR");
    assert_eq!(s3.puts_of(b"never answered"), 1, "{}", run.stderr);
    assert!(
        took < Duration::from_secs(120),
        "held {took:?} by one unanswered PUT\n{}",
        run.stderr
    );
}
