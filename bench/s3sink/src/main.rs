//! `c3-s3sink`: a discarding S3-protocol server for upload benchmarks.
//!
//! Every bucket "exists", every upload (PutObject / UploadPart) is streamed and
//! thrown away, and nothing is ever stored: HeadObject / GetObject always answer
//! `NoSuchKey`, listings are always empty. SigV4 authentication (including
//! `UNSIGNED-PAYLOAD`, single-chunk payload hashes and `STREAMING-*` aws-chunked
//! bodies with or without trailers) is handled by `s3s`; flexible checksums
//! (`x-amz-checksum-*`, in headers or trailers) are *not* verified, only echoed
//! back, so the sink spends as little CPU as possible per byte.
//!
//! Usage: `c3-s3sink --host 127.0.0.1 --port 9000 --access-key AK --secret-key SK`
//! Prints `listening on http://ADDR` on stdout when ready; on SIGTERM/SIGINT it
//! prints `received N bytes in M requests` on stderr and exits 0.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Parser;
use futures::StreamExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use tokio::net::TcpListener;

#[derive(Debug, Parser)]
#[command(version, about = "Discarding S3 server for upload benchmarks")]
struct Opt {
    /// Host/IP to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,

    /// Port to listen on (0 = pick a free port; see the `listening on` line).
    #[arg(long, default_value_t = 0)]
    port: u16,

    /// Access key for SigV4 authentication (with --secret-key).
    #[arg(long, requires = "secret_key")]
    access_key: Option<String>,

    /// Secret key for SigV4 authentication (with --access-key).
    #[arg(long, requires = "access_key")]
    secret_key: Option<String>,
}

/// Counters and id source shared by all requests (nothing else is stored).
#[derive(Debug, Default)]
struct Stats {
    /// Body bytes received by PutObject + UploadPart.
    bytes: AtomicU64,
    /// PutObject requests fully received.
    objects: AtomicU64,
    /// UploadPart requests fully received.
    parts: AtomicU64,
    /// CompleteMultipartUpload requests.
    completed: AtomicU64,
    /// Source of synthetic upload ids / ETags.
    seq: AtomicU64,
    /// Distinguishes upload ids across restarts.
    boot: u64,
}

impl Stats {
    fn new() -> Self {
        let boot = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self { boot, ..Default::default() }
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Relaxed) + 1
    }

    /// Synthetic ETag. It deliberately contains a `-` so that clients that
    /// treat a 32-hex ETag as the object's MD5 (rclone) do not flag a
    /// "hash mismatch"; a `-N` ETag is what S3 returns for multipart objects
    /// and means "not an MD5" to every client.
    fn synthetic_etag(&self, suffix: usize) -> ETag {
        ETag::Strong(format!("{:016x}{:016x}-{suffix}", self.boot, self.next()))
    }

    /// Read and drop the whole body, returning its length. Errors raised by
    /// s3s while decoding (payload-hash / chunk-signature mismatch, truncated
    /// body) are passed through as the S3 error.
    async fn drain(&self, body: Option<StreamingBlob>) -> S3Result<u64> {
        let Some(mut body) = body else { return Ok(0) };
        let mut n: u64 = 0;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(b) => n += b.len() as u64,
                Err(e) => {
                    self.bytes.fetch_add(n, Relaxed);
                    return Err(body_error(e));
                }
            }
        }
        self.bytes.fetch_add(n, Relaxed);
        Ok(n)
    }
}

/// Map a body-stream error to an S3 error. s3s's verifying streams
/// (`AwsChunkedStreamError`, `UploadStreamError`) are not public types, so
/// classify them by their message.
fn body_error(e: s3s::StdError) -> S3Error {
    use s3s::S3ErrorCode as C;
    let e = match e.downcast::<S3Error>() {
        Ok(s3e) => return *s3e,
        Err(e) => e,
    };
    let msg = e.to_string();
    let code = if msg.contains("SignatureMismatch") {
        C::SignatureDoesNotMatch // bad chunk signature (STREAMING-AWS4-HMAC-SHA256-PAYLOAD)
    } else if msg.contains("Sha256Mismatch") {
        C::BadDigest // body does not match x-amz-content-sha256
    } else {
        C::IncompleteBody
    };
    S3Error::with_source(code, e)
}

/// Client-supplied flexible checksums (header values, overridden by verified
/// streaming trailers if present). Echoed back unverified.
#[derive(Default)]
struct Checksums {
    crc32: Option<String>,
    crc32c: Option<String>,
    crc64nvme: Option<String>,
    sha1: Option<String>,
    sha256: Option<String>,
}

impl Checksums {
    fn merge_trailers(&mut self, trailers: Option<&s3s::TrailingHeaders>) {
        let Some(hm) = trailers.and_then(s3s::TrailingHeaders::take) else { return };
        let get = |name: &str| hm.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        for (name, slot) in [
            ("x-amz-checksum-crc32", &mut self.crc32),
            ("x-amz-checksum-crc32c", &mut self.crc32c),
            ("x-amz-checksum-crc64nvme", &mut self.crc64nvme),
            ("x-amz-checksum-sha1", &mut self.sha1),
            ("x-amz-checksum-sha256", &mut self.sha256),
        ] {
            if let Some(v) = get(name) {
                *slot = Some(v);
            }
        }
    }
}

#[async_trait::async_trait]
impl S3 for Sink {
    // ---------------------------------------------------------------- buckets

    async fn create_bucket(&self, _req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        Ok(S3Response::new(CreateBucketOutput::default()))
    }

    async fn head_bucket(&self, _req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        Ok(S3Response::new(HeadBucketOutput::default()))
    }

    async fn get_bucket_location(
        &self,
        _req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        // Empty LocationConstraint == us-east-1.
        Ok(S3Response::new(GetBucketLocationOutput::default()))
    }

    async fn list_buckets(&self, _req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        Ok(S3Response::new(ListBucketsOutput { buckets: Some(Vec::new()), ..Default::default() }))
    }

    async fn delete_bucket(&self, _req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        Ok(S3Response::new(DeleteBucketOutput {}))
    }

    // ---------------------------------------------------------------- listing

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        let i = req.input;
        Ok(S3Response::new(ListObjectsOutput {
            name: Some(i.bucket),
            prefix: i.prefix,
            delimiter: i.delimiter,
            encoding_type: i.encoding_type,
            marker: i.marker,
            max_keys: Some(i.max_keys.unwrap_or(1000)),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        let i = req.input;
        Ok(S3Response::new(ListObjectsV2Output {
            name: Some(i.bucket),
            prefix: i.prefix,
            delimiter: i.delimiter,
            encoding_type: i.encoding_type,
            start_after: i.start_after,
            continuation_token: i.continuation_token,
            max_keys: Some(i.max_keys.unwrap_or(1000)),
            key_count: Some(0),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let i = req.input;
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(i.bucket),
            prefix: i.prefix,
            delimiter: i.delimiter,
            encoding_type: i.encoding_type,
            key_marker: i.key_marker,
            upload_id_marker: i.upload_id_marker,
            max_uploads: Some(i.max_uploads.unwrap_or(1000)),
            is_truncated: Some(false),
            ..Default::default()
        }))
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let i = req.input;
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(i.upload_id),
            max_parts: Some(i.max_parts.unwrap_or(1000)),
            is_truncated: Some(false),
            parts: Some(Vec::new()),
            ..Default::default()
        }))
    }

    // ---------------------------------------------------------------- objects (nothing is stored)

    async fn head_object(&self, _req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        Err(s3_error!(NoSuchKey))
    }

    async fn get_object(&self, _req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        Err(s3_error!(NoSuchKey))
    }

    async fn delete_object(&self, _req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let quiet = req.input.delete.quiet.unwrap_or(false);
        let deleted = if quiet {
            Vec::new()
        } else {
            req.input
                .delete
                .objects
                .into_iter()
                .map(|o| DeletedObject { key: Some(o.key), version_id: o.version_id, ..Default::default() })
                .collect()
        };
        Ok(S3Response::new(DeleteObjectsOutput { deleted: Some(deleted), ..Default::default() }))
    }

    // ---------------------------------------------------------------- uploads (drained and discarded)

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        // If-None-Match: * / If-Match are ignored: the key never exists, so a
        // conditional create always succeeds.
        let i = req.input;
        let mut ck = Checksums {
            crc32: i.checksum_crc32,
            crc32c: i.checksum_crc32c,
            crc64nvme: i.checksum_crc64nvme,
            sha1: i.checksum_sha1,
            sha256: i.checksum_sha256,
        };
        self.drain(i.body).await?;
        self.objects.fetch_add(1, Relaxed);
        ck.merge_trailers(req.trailing_headers.as_ref());

        // Real S3 answers with the MD5 as ETag; if the client told us the MD5
        // (Content-MD5) echo it (unverified), otherwise make one up.
        let e_tag = i
            .content_md5
            .as_deref()
            .and_then(|b64| base64_simd::STANDARD.decode_to_vec(b64).ok())
            .filter(|md5| md5.len() == 16)
            .map(|md5| ETag::Strong(hex_simd::encode_to_string(md5, hex_simd::AsciiCase::Lower)))
            .unwrap_or_else(|| self.synthetic_etag(1));

        Ok(S3Response::new(PutObjectOutput {
            e_tag: Some(e_tag),
            checksum_crc32: ck.crc32,
            checksum_crc32c: ck.crc32c,
            checksum_crc64nvme: ck.crc64nvme,
            checksum_sha1: ck.sha1,
            checksum_sha256: ck.sha256,
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let i = req.input;
        let upload_id = format!("sink-{:016x}-{:016x}", self.boot, self.next());
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            upload_id: Some(upload_id),
            checksum_algorithm: i.checksum_algorithm,
            checksum_type: i.checksum_type,
            ..Default::default()
        }))
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        let i = req.input;
        if !(1..=10_000).contains(&i.part_number) {
            return Err(s3_error!(InvalidArgument, "Part number must be an integer between 1 and 10000, inclusive"));
        }
        let mut ck = Checksums {
            crc32: i.checksum_crc32,
            crc32c: i.checksum_crc32c,
            crc64nvme: i.checksum_crc64nvme,
            sha1: i.checksum_sha1,
            sha256: i.checksum_sha256,
        };
        self.drain(i.body).await?;
        self.parts.fetch_add(1, Relaxed);
        ck.merge_trailers(req.trailing_headers.as_ref());
        Ok(S3Response::new(UploadPartOutput {
            e_tag: Some(ETag::Strong(format!("{:016x}{:016x}", self.boot, self.next()))),
            checksum_crc32: ck.crc32,
            checksum_crc32c: ck.crc32c,
            checksum_crc64nvme: ck.crc64nvme,
            checksum_sha1: ck.sha1,
            checksum_sha256: ck.sha256,
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let i = req.input;
        let n_parts = i.multipart_upload.as_ref().and_then(|m| m.parts.as_ref()).map_or(0, Vec::len);
        self.completed.fetch_add(1, Relaxed);
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(i.bucket),
            key: Some(i.key),
            e_tag: Some(self.synthetic_etag(n_parts.max(1))),
            checksum_crc32: i.checksum_crc32,
            checksum_crc32c: i.checksum_crc32c,
            checksum_crc64nvme: i.checksum_crc64nvme,
            checksum_sha1: i.checksum_sha1,
            checksum_sha256: i.checksum_sha256,
            checksum_type: i.checksum_type,
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        _req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let opt = Opt::parse();

    // Quiet unless RUST_LOG is set (e.g. RUST_LOG=s3s=debug to debug a client).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }

    run(opt)
}

#[tokio::main]
async fn run(opt: Opt) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let sink = std::sync::Arc::new(Stats::new());

    let service = {
        let mut b = S3ServiceBuilder::new(Sink(sink.clone()));
        if let (Some(ak), Some(sk)) = (opt.access_key, opt.secret_key) {
            b.set_auth(SimpleAuth::from_single(ak, sk));
        }
        b.build()
    };

    let listener = TcpListener::bind((opt.host.as_str(), opt.port)).await?;
    let local_addr = listener.local_addr()?;

    let http_server = ConnBuilder::new(TokioExecutor::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{local_addr}")?;
        out.flush()?;
    }

    loop {
        let socket = tokio::select! {
            res = listener.accept() => match res {
                Ok((socket, _)) => socket,
                Err(err) => {
                    eprintln!("c3-s3sink: accept error: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        let _ = socket.set_nodelay(true);
        let conn = http_server.serve_connection(TokioIo::new(socket), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }

    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {},
        () = tokio::time::sleep(Duration::from_secs(3)) => {
            eprintln!("c3-s3sink: connections still open after 3s; exiting anyway");
        }
    }

    let bytes = sink.bytes.load(Relaxed);
    let objects = sink.objects.load(Relaxed);
    let parts = sink.parts.load(Relaxed);
    let completed = sink.completed.load(Relaxed);
    eprintln!("received {bytes} bytes in {} requests", objects + parts);
    eprintln!("({objects} PutObject, {parts} UploadPart, {completed} CompleteMultipartUpload)");
    Ok(())
}

/// The S3 implementation. `S3ServiceBuilder::new` takes it by value, so the
/// counters live behind an Arc to stay readable from `run` after shutdown.
#[derive(Debug, Clone)]
struct Sink(std::sync::Arc<Stats>);

impl std::ops::Deref for Sink {
    type Target = Stats;
    fn deref(&self) -> &Stats {
        &self.0
    }
}
