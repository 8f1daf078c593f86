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
    HttpResponseBody, HttpService, ReqwestConnector,
};
use object_store::ClientOptions;

/// An error reply is cut here: its first 64 KiB say everything a person will read.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// A listing page or an XML reply over this fails: S3's 1,000-key page is under 1 MiB.
pub const MAX_REPLY_BODY: usize = 16 << 20;

/// object_store's own reqwest client, with every reply body but an object read's capped.
#[derive(Debug, Default)]
pub struct CappedConnector;

impl HttpConnector for CappedConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Capped(inner)))
    }
}

#[derive(Debug)]
struct Capped(HttpClient);

#[async_trait::async_trait]
impl HttpService for Capped {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let object_read = req.method() == http::Method::GET && !is_listing(req.uri().query());
        let (method, sent_to) = (req.method().clone(), req.uri().clone());
        let res = self.0.execute(req).await?;
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
        let cap = if !res.status().is_success() {
            Cap::Truncate
        } else if object_read {
            return Ok(res);
        } else {
            Cap::Fail
        };
        let (parts, body) = res.into_parts();
        let body = CappedBody {
            inner: body,
            left: cap.limit(),
            cap,
            done: false,
        };
        Ok(HttpResponse::from_parts(parts, HttpResponseBody::new(body)))
    }
}

/// A redirect of a request that is not a GET, followed by the HTTP client.
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
/// multipart `uploads`/`uploadId`) rather than an object's bytes. An Azure SAS token's
/// parameters (`sv`, `sig`, ...) are none of these.
fn is_listing(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            matches!(
                key,
                "list-type" | "comp" | "restype" | "uploads" | "uploadId"
            )
        })
    })
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
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        if data.len() <= self.left {
            self.left -= data.len();
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        self.done = true;
        match self.cap {
            Cap::Truncate => {
                data.truncate(self.left);
                self.left = 0;
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Cap::Fail => Poll::Ready(Some(Err(HttpError::new(
                HttpErrorKind::Decode,
                TooLarge {
                    limit: self.cap.limit(),
                },
            )))),
        }
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
        CappedBody {
            inner,
            left: cap.limit(),
            cap,
            done: false,
        }
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

    #[test]
    fn listings_are_told_from_object_reads() {
        assert!(is_listing(Some("list-type=2&prefix=a")));
        assert!(is_listing(Some("restype=container&comp=list")));
        assert!(is_listing(Some("uploads")));
        assert!(!is_listing(None));
        assert!(!is_listing(Some("sv=2024&sig=abc&se=now")));
        assert!(!is_listing(Some("x-id=GetObject")));
    }
}
