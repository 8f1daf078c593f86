//! How much of a store's HTTP reply the agent will hold. object_store reads some bodies whole
//! into memory: every error reply (for its message), every listing, and the XML of a multipart
//! start or completion. A store, a proxy or anything on the path could answer a PUT with an
//! endless 403 body and grow the root agent beside the job until the OOM killer picks one of
//! them. Object reads stay as they are: the agent streams them and bounds them by the size it
//! expects ([`crate::store`], [`crate::pull`]).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService,
};
use object_store::ClientOptions;

/// The longest a throttled reply's `Retry-After` is honoured here: enough for S3-style
/// throttling (a second or a few), while a store that asks for minutes on every 503 (MinIO
/// says 120 s during an outage) costs each try at most this, far inside the preflight's
/// 20 s (an "already ran" look timed out by it would let a run replace a manifest) and an
/// outage probe's 30 s. The outage deadline bounds the whole.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// An error reply is cut here: its first 64 KiB say everything a person will read.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// A listing page or an XML reply over this fails: S3's 1,000-key page is under 1 MiB.
pub const MAX_REPLY_BODY: usize = 16 << 20;

/// object_store's reqwest client, kept at the store's origin ([`crate::storehttp`]), with
/// every reply body but an object read's capped.
#[derive(Debug, Default)]
pub struct CappedConnector;

impl HttpConnector for CappedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = HttpClient::new(crate::storehttp::client(options)?);
        Ok(HttpClient::new(Capped(inner)))
    }
}

#[derive(Debug)]
struct Capped(HttpClient);

#[async_trait::async_trait]
impl HttpService for Capped {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let object_read = req.method() == http::Method::GET
            && !is_listing(req.uri().query())
            && !is_credential_request(&req);
        let (method, sent_to) = (req.method().clone(), req.uri().clone());
        let res = self.0.execute(req).await?;
        // A redirect to another origin is not followed ([`crate::storehttp`]) and is not an
        // answer either: refused, for good, as every try meets it again (a 304 and S3's
        // wrong-region 301 carry no Location and are object_store's to read).
        if res.status().is_redirection() && res.headers().contains_key(http::header::LOCATION) {
            let sent_url = url::Url::parse(&sent_to.to_string()).ok();
            // A relative Location is the store's own origin.
            let at = res.headers()[http::header::LOCATION]
                .to_str()
                .ok()
                .and_then(|l| match &sent_url {
                    Some(base) => base.join(l).ok(),
                    None => url::Url::parse(l).ok(),
                });
            let to = at
                .as_ref()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_default();
            let here = matches!((&at, &sent_url), (Some(a), Some(b)) if a.origin() == b.origin());
            if here {
                // A 301-303 within the origin, not followed either: it would have turned the
                // request into a GET ([`crate::storehttp`]). A blip, as a proxy's would be.
                return Err(HttpError::new(
                    HttpErrorKind::Unknown,
                    Redirected {
                        method: format!("{method} ({})", res.status()),
                        to,
                    },
                ));
            }
            return Err(HttpError::new(
                HttpErrorKind::Unknown,
                RedirectedAway {
                    method: method.to_string(),
                    to,
                },
            ));
        }
        // reqwest follows redirects (object_store relies on it for a GET). For anything else
        // the answer is not the store's word on this request: a PUT answered 303 comes back
        // as the 200 of a GET elsewhere (an upload "done" that stored nothing), and a HEAD's
        // size from another host says a blob exists. Refused (a blip, retried: the upload
        // fails at the deadline rather than count as stored).
        if method != http::Method::GET {
            if let Some(at) = res
                .extensions()
                .get::<tower_http::follow_redirect::RequestUri>()
            {
                if !same_place(&at.0, &sent_to) {
                    return Err(HttpError::new(
                        HttpErrorKind::Unknown,
                        Redirected {
                            method: method.to_string(),
                            to: at.0.host().unwrap_or("").to_string(),
                        },
                    ));
                }
            }
        }
        // A throttled store (429, 503 SlowDown) that says when to come back is not asked
        // again before: object_store neither reads `Retry-After` nor passes it up, and its
        // next try came within the window, one more throttled request for every one.
        if let Some(wait) = retry_after(res.status().as_u16(), res.headers()) {
            tokio::time::sleep(wait.min(MAX_RETRY_AFTER)).await;
        }
        let cap = if !res.status().is_success() {
            Cap::Truncate
        } else if object_read {
            return Ok(res);
        } else {
            Cap::Fail
        };
        let (parts, body) = res.into_parts();
        let body = CappedBody::new(body, cap);
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// How long a throttled reply (429 or 503) asks the client to wait: `Retry-After` in seconds
/// or as an HTTP date, which Azure and some gateways send. Uncapped: each caller has its own
/// bound (the store's [`MAX_RETRY_AFTER`], the control plane's in `report.rs`).
pub(crate) fn retry_after(status: u16, headers: &http::HeaderMap) -> Option<std::time::Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let value = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    match value.parse::<u64>() {
        Ok(secs) => Some(std::time::Duration::from_secs(secs)),
        // A date already past (or a node clock ahead of the server's) asks for no wait.
        Err(_) => Some(
            httpdate::parse_http_date(value)
                .ok()?
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
        ),
    }
}

/// A redirect to another origin, not followed: permanent ([`crate::store`]), as every try
/// is sent to the same store, which answers the same.
#[derive(Debug, thiserror::Error)]
#[error("the store answered a {method} with a redirect to another origin (host `{to}`), which is not followed")]
pub(crate) struct RedirectedAway {
    pub(crate) method: String,
    pub(crate) to: String,
}

/// A redirect of a request that is not a GET, followed by the HTTP client, or one within the
/// store's origin that would have turned it into a GET (301-303), not followed.
#[derive(Debug, thiserror::Error)]
#[error("the store answered a {method} with a redirect (to host `{to}`); its answer is not taken")]
struct Redirected {
    method: String,
    to: String,
}

/// Whether two URIs name the same place once both are spelt as the HTTP client spells them
/// (it parses every request's URI into a URL); one that does not parse is taken as the same.
fn same_place(a: &http::Uri, b: &http::Uri) -> bool {
    match (
        url::Url::parse(&a.to_string()),
        url::Url::parse(&b.to_string()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

/// Whether a GET's query names a listing (S3 and GCS `list-type`, Azure `comp`/`restype`,
/// multipart `uploads`/`uploadId`) or another document object_store reads whole (S3
/// Express's `session`, from the store's own origin) rather than an object's bytes. An
/// Azure SAS token's parameters (`sv`, `sig`, ...) are none of these.
fn is_listing(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            matches!(
                key,
                "list-type" | "comp" | "restype" | "uploads" | "uploadId" | "session"
            )
        })
    })
}

/// Whether a GET asks for credentials rather than an object: object_store's credential
/// providers (EC2 and ECS task roles, GCP's and Azure's metadata services) build their
/// clients through this connector too, and read the reply whole (`.json()`, `.text()`).
/// Taken for an object read, an endless body from a link-local endpoint grew the root agent
/// until the OOM killer came. Known by the headers those services require, or by the
/// metadata hosts (link-local addresses included).
fn is_credential_request(req: &HttpRequest) -> bool {
    let headers = req.headers();
    // Azure Fabric's token service (`x-ms-partner-token`) may be on any host.
    if [
        "x-aws-ec2-metadata-token",
        "metadata",
        "metadata-flavor",
        "x-ms-partner-token",
    ]
    .iter()
    .any(|h| headers.contains_key(*h))
    {
        return true;
    }
    if is_container_credentials_uri(req.uri()) {
        return true;
    }
    match req.uri().host() {
        Some(host) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            host.eq_ignore_ascii_case("metadata.google.internal")
                || host.eq_ignore_ascii_case("metadata")
                || match host.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(ip)) => ip.is_link_local(),
                    // fe80::/10, and EC2's IPv6 metadata address.
                    Ok(std::net::IpAddr::V6(ip)) => {
                        ip.segments()[0] & 0xffc0 == 0xfe80
                            || ip.segments()[0] == 0xfd00 && ip.segments()[1] == 0x0ec2
                    }
                    Err(_) => false,
                }
        }
        None => false,
    }
}

/// Whether `uri` is the container credentials endpoint the environment names in full
/// (ECS's `AWS_CONTAINER_CREDENTIALS_FULL_URI`, EKS Pod Identity's), which may be any host:
/// the relative one is on the link-local ECS address, which the host check covers.
fn is_container_credentials_uri(uri: &http::Uri) -> bool {
    let Ok(full) = std::env::var("AWS_CONTAINER_CREDENTIALS_FULL_URI") else {
        return false;
    };
    let Ok(full) = url::Url::parse(&full) else {
        return false;
    };
    let port = |scheme: Option<&str>, port: Option<u16>| {
        port.or(match scheme {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        })
    };
    full.host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        == uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        && full.port_or_known_default() == port(uri.scheme_str(), uri.port_u16())
        && full.path() == uri.path()
}

#[derive(Debug, Clone, Copy)]
enum Cap {
    /// An error reply: keep its head, end the body there (the connection is not reused).
    Truncate,
    /// A reply object_store must parse whole: over the limit is an error, not a cut document.
    Fail,
}

impl Cap {
    fn limit(self) -> usize {
        match self {
            Cap::Truncate => MAX_ERROR_BODY,
            Cap::Fail => MAX_REPLY_BODY,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the store's reply body is over {limit} bytes (a listing or an XML answer); refused")]
struct TooLarge {
    limit: usize,
}

struct CappedBody {
    inner: HttpResponseBody,
    left: usize,
    cap: Cap,
    done: bool,
    /// An error reply's bytes so far ([`Cap::Truncate`]).
    held: Vec<u8>,
}

impl CappedBody {
    fn new(inner: HttpResponseBody, cap: Cap) -> Self {
        CappedBody {
            inner,
            left: cap.limit(),
            cap,
            done: false,
            held: Vec::new(),
        }
    }

    /// An error reply, whole (up to its limit), as one frame of [`error_text`].
    fn poll_error_text(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        // What came before a break is the reply's text all the same.
        while let Some(Ok(frame)) = ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            if let Ok(data) = frame.into_data() {
                let take = data.len().min(self.left);
                self.held.extend_from_slice(&data[..take]);
                self.left -= take;
                if self.left == 0 {
                    break;
                }
            }
        }
        self.done = true;
        let text = error_text(&std::mem::take(&mut self.held));
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(text)))))
    }
}

/// An error reply's body as the agent passes it on (to object_store, whose error the journal
/// and the control plane's statuses quote): valid UTF-8, and without what S3 quotes of a
/// request it could not verify. object_store reads an error body as text: one that was not
/// UTF-8 (a proxy's Latin-1 page, or one cut inside a character) failed that read, and the
/// reply's status was lost with it: a 403 taken for a blip and retried to the deadline, a 412
/// not taken for "exists". `SignatureDoesNotMatch` quotes the canonical request, the node's
/// session token among its headers.
fn error_text(body: &[u8]) -> String {
    let mut text = String::from_utf8_lossy(body).into_owned();
    for tag in [
        "CanonicalRequest",
        "CanonicalRequestBytes",
        "StringToSign",
        "StringToSignBytes",
    ] {
        text = without_element(&text, tag);
    }
    without_credentials(&text)
}

/// `text` with each `<tag>…</tag>`'s content replaced by `(removed)`.
fn without_element(text: &str, tag: &str) -> String {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        out.push_str(&rest[..start]);
        out.push_str(&open);
        out.push_str("(removed)");
        out.push_str(&close);
        let after = start + open.len();
        rest = match rest[after..].find(&close) {
            Some(end) => &rest[after + end + close.len()..],
            None => "",
        };
    }
    out.push_str(rest);
    out
}

/// Credentials a request carries that a reply may quote (a gateway's error page echoing the
/// request's headers or URL): the name (any case) and whether its value runs to the end of
/// the line or quote (an `Authorization` header's scheme, a space, then the secret) rather
/// than to the next separator (a query parameter, a token).
const CREDENTIALS: [(&str, bool); 9] = [
    ("x-amz-security-token", false),
    ("authorization", true),
    ("proxy-authorization", true),
    // SSE-C: the key the data is encrypted with, sent on every request.
    ("x-amz-server-side-encryption-customer-key", false),
    (
        "x-amz-copy-source-server-side-encryption-customer-key",
        false,
    ),
    ("x-amz-signature", false),
    ("x-goog-signature", false),
    // Azure's SAS signature in a URL (`…&sig=…`).
    ("sig", false),
    ("x-ms-copy-source-authorization", true),
];

/// `text` with the value of each credential it quotes ([`CREDENTIALS`]) replaced by
/// `(removed)`: a store's error page (which object_store's error, the journal and the
/// control plane's statuses quote) or a control plane's (the journal) may echo the agent's
/// own request, its bearer token, session token or SAS signature among it.
pub fn without_credentials(text: &str) -> String {
    CREDENTIALS
        .iter()
        .fold(text.to_string(), |t, &(name, to_line_end)| {
            without_value(&t, name, to_line_end)
        })
}

/// `text` with the value after each `name` (any case, as a whole word followed by `:`, `=`
/// or a tab) replaced. A name inside a word (`AuthorizationHeaderMalformed`, `signature`) or
/// without a separator is not a quoted credential and stays.
fn without_value(text: &str, name: &str, to_line_end: bool) -> String {
    let lower = text.to_ascii_lowercase();
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find(name) {
        let begin = at + found;
        let mut i = begin + name.len();
        if (begin > 0 && word(bytes[begin - 1])) || bytes.get(i).is_some_and(|&b| word(b)) {
            out.push_str(&text[at..i]);
            at = i;
            continue;
        }
        // A header line, a query, or a proxy's page quoting headers as JSON or a dict
        // (`"x-amz-security-token": "…"`, `'…': '…'`, Go's `{"Authorization":["…"]}`, and
        // in HTML, `&quot;…&quot;: &quot;…&quot;`).
        let mut separated = false;
        loop {
            if let Some(quote) = ["&quot;", "&#39;", "&#34;"]
                .iter()
                .find(|q| lower[i..].starts_with(*q))
            {
                i += quote.len();
                continue;
            }
            match bytes.get(i) {
                Some(b':' | b'=' | b'\t') => separated = true,
                Some(b' ' | b'"' | b'\'' | b'[') => {}
                _ => break,
            }
            i += 1;
        }
        out.push_str(&text[at..i]);
        if !separated {
            at = i;
            continue;
        }
        let mut end = i;
        while end < bytes.len()
            && !match to_line_end {
                true => matches!(bytes[end], b'\r' | b'\n' | b'<' | b'"' | b'\'' | b'&'),
                false => matches!(
                    bytes[end],
                    b' ' | b'\t' | b'\r' | b'\n' | b'&' | b'<' | b'"' | b'\'' | b',' | b'}' | b']'
                ),
            }
        {
            end += 1;
        }
        if end > i {
            out.push_str("(removed)");
        }
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        if matches!(self.cap, Cap::Truncate) {
            return self.poll_error_text(cx);
        }
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        if data.len() <= self.left {
            self.left -= data.len();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        self.done = true;
        Poll::Ready(Some(Err(HttpError::new(
            HttpErrorKind::Decode,
            TooLarge {
                limit: self.cap.limit(),
            },
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The inner hint may promise more than is passed on: say nothing rather than lie.
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(chunks: usize, chunk: usize) -> HttpResponseBody {
        let stream = futures::stream::iter(
            (0..chunks)
                .map(move |_| Ok::<_, HttpError>(Frame::data(Bytes::from(vec![b'x'; chunk])))),
        );
        HttpResponseBody::new(http_body_util::StreamBody::new(stream))
    }

    fn capped(inner: HttpResponseBody, cap: Cap) -> CappedBody {
        CappedBody::new(inner, cap)
    }

    /// An error body that is not UTF-8, or is cut inside a character, is passed on as valid
    /// UTF-8 (object_store reads it as text, and lost the reply's status when it could not);
    /// what S3 quotes of a request it could not verify is taken out, the session token first.
    #[tokio::test]
    async fn an_error_body_is_text_without_the_request_it_quotes() {
        let body = b"<Error><Code>SignatureDoesNotMatch</Code>\xe9<CanonicalRequest>PUT\n/b/k\nx-amz-security-token:SECRET1\n</CanonicalRequest><StringToSign>AWS4 SECRET2</StringToSign><Note>X-Amz-Security-Token=SECRET3&amp;</Note></Error>";
        let inner = HttpResponseBody::from(Bytes::from_static(body));
        let got = capped(inner, Cap::Truncate)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        let text = std::str::from_utf8(&got).expect("UTF-8");
        assert!(text.contains("SignatureDoesNotMatch"), "{text}");
        assert!(!text.contains("SECRET"), "{text}");
        // A gateway's page quoting the request's headers.
        for quoted in [
            r#"{"x-amz-security-token":"SECRET4","host":"h"}"#,
            "x-amz-security-token:\tSECRET5\r\nhost: h\r\n",
            "{'X-Amz-Security-Token': 'SECRET6', 'host': 'h'}",
            // GCS's and Azure AD's bearer tokens, Azure's SAS and presigned URLs.
            "Authorization: Bearer SECRET7\r\nhost: h\r\n",
            r#"{"authorization": "Bearer SECRET8, more", "host": "h"}"#,
            "GET /c/b?sv=2022&sig=SECRET9&se=1 host",
            "<p>https://h/k?X-Goog-Signature=SECRET10&amp;host</p>",
            "https://h/k?X-Amz-Signature=SECRET11 host",
            r#"{"Authorization":["Bearer SECRET12"],"host":["h"]}"#,
            "<pre>{&quot;Authorization&quot;: &quot;Bearer SECRET13&quot;, &quot;host&quot;: 1}</pre>",
            "Proxy-Authorization: Basic SECRET14\r\nhost: h\r\n",
            "x-amz-server-side-encryption-customer-key: SECRET15\r\nhost: h\r\n",
        ] {
            let text = error_text(quoted.as_bytes());
            assert!(!text.contains("SECRET"), "{text}");
            assert!(text.contains("host"), "{text}");
        }
        // What only looks like one stays: S3's error codes, a word that holds a name.
        for kept in [
            "<Code>AuthorizationHeaderMalformed</Code>",
            "the request signature we calculated does not match",
            "no authorization given",
        ] {
            assert_eq!(error_text(kept.as_bytes()), kept);
        }
        let mut cut = vec![b'x'; MAX_ERROR_BODY - 1];
        cut.extend_from_slice("é".as_bytes());
        let got = capped(HttpResponseBody::from(Bytes::from(cut)), Cap::Truncate)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert!(std::str::from_utf8(&got).is_ok());
    }

    #[tokio::test]
    async fn an_error_body_is_cut_at_its_limit() {
        let got = capped(body_of(100, 10_000), Cap::Truncate)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(got.len(), MAX_ERROR_BODY);
        let small = capped(body_of(3, 100), Cap::Truncate)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(small.len(), 300);
    }

    #[tokio::test]
    async fn a_reply_over_its_limit_is_an_error() {
        let chunks = MAX_REPLY_BODY / (1 << 20) + 1;
        let err = capped(body_of(chunks, 1 << 20), Cap::Fail)
            .collect()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("over"), "{err}");
        let at_limit = capped(body_of(chunks - 1, 1 << 20), Cap::Fail)
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(at_limit.len(), MAX_REPLY_BODY);
    }

    /// A reply that throttles with a number of seconds to wait.
    #[derive(Debug)]
    struct Throttles(String);

    #[async_trait::async_trait]
    impl HttpService for Throttles {
        async fn call(&self, _req: HttpRequest) -> Result<HttpResponse, HttpError> {
            Ok(http::Response::builder()
                .status(503)
                .header("retry-after", self.0.as_str())
                .body(HttpResponseBody::from(Bytes::from_static(
                    b"<Code>SlowDown</Code>",
                )))
                .unwrap())
        }
    }

    async fn held_for(retry_after: impl Into<String>) -> std::time::Duration {
        let client = Capped(HttpClient::new(Throttles(retry_after.into())));
        let req = http::Request::builder()
            .method("PUT")
            .uri("http://127.0.0.1:9/bucket/key")
            .body(object_store::client::HttpRequestBody::from(Bytes::new()))
            .unwrap();
        let started = tokio::time::Instant::now();
        let res = client.call(req).await.unwrap();
        assert_eq!(res.status(), 503);
        started.elapsed()
    }

    /// A throttled reply is handed back once its `Retry-After` has passed (at most 2 s), so
    /// the next try does not come inside the window; one that says nothing usable is not held.
    #[tokio::test(start_paused = true)]
    async fn a_throttled_reply_is_held_for_its_retry_after() {
        assert_eq!(held_for("1").await, std::time::Duration::from_secs(1));
        assert_eq!(held_for("3600").await, MAX_RETRY_AFTER);
        assert_eq!(
            held_for("Wed, 21 Oct 2026 07:28:00 GMT").await,
            std::time::Duration::ZERO,
            "a date gone by"
        );
        let in_a_minute = httpdate::fmt_http_date(
            std::time::SystemTime::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(held_for(in_a_minute).await, MAX_RETRY_AFTER);
        assert_eq!(held_for("soon").await, std::time::Duration::ZERO);
    }

    /// A reply of `ENDLESS` bytes to every request.
    #[derive(Debug)]
    struct Endless;

    #[async_trait::async_trait]
    impl HttpService for Endless {
        async fn call(&self, _req: HttpRequest) -> Result<HttpResponse, HttpError> {
            let chunks = MAX_REPLY_BODY / (1 << 20) + 8;
            Ok(http::Response::builder()
                .status(200)
                .body(body_of(chunks, 1 << 20))
                .unwrap())
        }
    }

    /// A credential endpoint's reply is read whole by object_store: an endless one (a
    /// hostile link-local service) is cut at the reply limit, as a listing's is. An object
    /// read still streams as it is.
    #[tokio::test]
    async fn a_credential_endpoints_reply_is_capped() {
        let client = Capped(HttpClient::new(Endless));
        let get = |uri: &str, header: Option<(&str, &str)>| {
            let mut req = http::Request::builder().method("GET").uri(uri);
            if let Some((k, v)) = header {
                req = req.header(k, v);
            }
            req.body(object_store::client::HttpRequestBody::from(Bytes::new()))
                .unwrap()
        };
        for req in [
            get(
                "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                None,
            ),
            get("http://169.254.170.2/v2/credentials/x", None),
            get("http://[fd00:ec2::254]/latest/meta-data/", None),
            get(
                "http://metadata.google.internal/computeMetadata/v1/token",
                None,
            ),
            get("http://10.0.0.1/token", Some(("Metadata-Flavor", "Google"))),
            get(
                "http://10.0.0.1/metadata/identity",
                Some(("Metadata", "true")),
            ),
            get("http://10.0.0.1/x", Some(("x-aws-ec2-metadata-token", "t"))),
            get("http://10.0.0.1/token", Some(("x-ms-partner-token", "t"))),
        ] {
            let uri = req.uri().clone();
            let res = client.call(req).await.unwrap();
            let err = res.into_body().collect().await.unwrap_err();
            assert!(err.to_string().contains("over"), "{uri}: {err}");
        }
        let object = client
            .call(get("http://127.0.0.1:9/bucket/key", None))
            .await
            .unwrap();
        let got = object.into_body().collect().await.unwrap().to_bytes();
        assert!(got.len() > MAX_REPLY_BODY, "an object read was capped");
    }

    /// The container credentials endpoint the environment names in full may be any host
    /// (EKS Pod Identity's, a local agent's): its reply is capped, an object read beside it
    /// is not. (nextest runs each test in a process of its own: the variable is this one's.)
    #[test]
    fn the_container_credentials_uri_is_told_by_the_environment() {
        // SAFETY: set before any thread of this test process reads the environment.
        unsafe {
            std::env::set_var(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://127.0.0.1:9911/v1/credentials",
            );
        }
        let uri = |u: &str| u.parse::<http::Uri>().unwrap();
        assert!(is_container_credentials_uri(&uri(
            "http://127.0.0.1:9911/v1/credentials"
        )));
        assert!(!is_container_credentials_uri(&uri(
            "http://127.0.0.1:9911/bucket/key"
        )));
        assert!(!is_container_credentials_uri(&uri(
            "http://127.0.0.1:9912/v1/credentials"
        )));
    }

    #[test]
    fn listings_are_told_from_object_reads() {
        assert!(is_listing(Some("list-type=2&prefix=a")));
        assert!(is_listing(Some("restype=container&comp=list")));
        assert!(is_listing(Some("uploads")));
        assert!(is_listing(Some("session")), "S3 Express CreateSession");
        assert!(!is_listing(None));
        assert!(!is_listing(Some("sv=2024&sig=abc&se=now")));
        assert!(!is_listing(Some("x-id=GetObject")));
    }
}
