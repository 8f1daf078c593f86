//! Test harness: the real `c3-agent` binary, a real S3 server (s3s-fs) and a recording
//! control-plane server, all on 127.0.0.1, each test in its own temp dir.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[path = "../skip.rs"]
mod skip;
pub use skip::skip;

pub const BIN: &str = env!("CARGO_BIN_EXE_c3-agent");
/// Upper bound for any one agent run in a test.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Polls `f` every 20 ms until it returns Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A tmpfs a test mounted at `at` (made if missing, with `-o options`), unmounted (lazily)
/// when dropped; `None`, and a line saying the test is skipped, where mounting is not allowed.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, options: Option<&str>) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs"])
            .args(options.iter().flat_map(|o| ["-o", o]))
            .arg("c3-test")
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            skip("cannot mount a tmpfs here");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The job's one file, `a` 4096 times stored to through a mapping (`b` at 0, then `c` at 1,
/// the second store to a dirty page that moves no stamp), is listed as it ended: `bc` then
/// `a`s, not the version an upload read between the stores.
pub fn assert_listed_as_it_ends(h: &Harness, job: &str) {
    let mut last = b"bc".to_vec();
    last.resize(4096, b'a');
    assert_eq!(
        h.manifest(job)["files"][0]["sha256"],
        sha256_hex(&last),
        "the manifest lists bytes the file no longer holds"
    );
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

// ---------------------------------------------------------------- S3 server

/// A real S3 protocol server on loopback (s3s-fs), killed on drop.
pub struct S3Server {
    pub port: u16,
    pub root: tempfile::TempDir,
    pub bucket: String,
    child: Child,
    /// `store.retry_deadline_secs` in its config: short, so that failure tests are quick.
    pub retry_deadline_secs: u64,
}

fn s3s_fs_binary() -> PathBuf {
    if let Ok(p) = std::env::var("C3_TEST_S3S_FS") {
        return PathBuf::from(p);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    for candidate in [
        format!("{home}/.cargo/bin/s3s-fs"),
        "/usr/local/bin/s3s-fs".into(),
    ] {
        if Path::new(&candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("s3s-fs not found: run the tests through scripts/test.sh, which installs it (or set C3_TEST_S3S_FS)");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        let bucket = "c3-test".to_string();
        std::fs::create_dir_all(root.path().join(&bucket)).expect("bucket dir");
        // A port picked then released can be taken meanwhile: try a few.
        for _ in 0..5 {
            let port = free_port();
            if let Some(child) = Self::spawn_on(root.path(), port) {
                return S3Server {
                    port,
                    root,
                    bucket,
                    child,
                    retry_deadline_secs: 3,
                };
            }
        }
        panic!("s3s-fs did not start");
    }

    /// An outage: the server goes away (connections refused) until `restart`.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The same server back, on the same port and directory.
    pub fn restart(&mut self) {
        for _ in 0..50 {
            if let Some(child) = Self::spawn_on(self.root.path(), self.port) {
                self.child = child;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("s3s-fs did not come back on port {}", self.port);
    }

    fn spawn_on(root: &Path, port: u16) -> Option<Child> {
        {
            let mut child = Command::new(s3s_fs_binary())
                .args([
                    "--host",
                    "127.0.0.1",
                    "--port",
                    &port.to_string(),
                    "--access-key",
                    "AK",
                    "--secret-key",
                    "SK",
                ])
                .arg(root)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start s3s-fs");
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Some(child);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `[store]` config for this server under `prefix`.
    pub fn store_toml(&self, prefix: &str) -> String {
        format!(
            "[store]\nurl = \"s3://{}/{prefix}\"\nmax_retries = 2\nretry_timeout_secs = 3\nretry_deadline_secs = {}\n[store.options]\naws_endpoint = \"{}\"\naws_allow_http = \"true\"\naws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\naws_region = \"us-east-1\"\n",
            self.bucket,
            self.retry_deadline_secs,
            self.endpoint()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------- stores

// ---------------------------------------------------------------- Azurite

/// Azurite's blob service (the Azure Storage emulator, npm `azurite`) on loopback, with one
/// container, killed on drop. `scripts/test.sh` installs it.
pub struct Azurite {
    pub port: u16,
    pub container: String,
    _root: tempfile::TempDir,
    child: Child,
}

/// Azurite's fixed development account (public, documented by Microsoft).
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn azurite_binary() -> PathBuf {
    if let Ok(p) = std::env::var("C3_TEST_AZURITE") {
        return PathBuf::from(p);
    }
    for candidate in ["/usr/bin/azurite-blob", "/usr/local/bin/azurite-blob"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!("azurite-blob not found: run the tests through scripts/test.sh, which installs it (or set C3_TEST_AZURITE)");
}

impl Azurite {
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("tempdir");
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(azurite_binary())
                .args([
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    &port.to_string(),
                    "--skipApiVersionCheck",
                    "--silent",
                    "--location",
                ])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start azurite");
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    let az = Azurite {
                        port,
                        container: "c3-test".into(),
                        _root: root,
                        child,
                    };
                    let (status, body) = az.request("PUT", "?restype=container", &[]);
                    assert_eq!(
                        status,
                        201,
                        "create container: {}",
                        String::from_utf8_lossy(&body)
                    );
                    return az;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("azurite did not start");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZ_ACCOUNT}", self.port)
    }

    pub fn store_toml(&self, prefix: &str) -> String {
        format!(
            "[store]\nurl = \"az://{}/{prefix}\"\nmax_retries = 2\nretry_timeout_secs = 3\nretry_deadline_secs = 3\n[store.options]\nazure_storage_use_emulator = \"true\"\n",
            self.container
        )
    }

    /// The agent finds the emulator through this variable (object_store's convention).
    pub fn env(&self) -> (String, String) {
        (
            "AZURITE_BLOB_STORAGE_URL".into(),
            format!("http://127.0.0.1:{}", self.port),
        )
    }

    /// A blob, read from outside the agent.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let (status, body) = self.request("GET", &format!("/{key}"), &[]);
        (status == 200).then_some(body)
    }

    /// Deletes a blob from outside the agent.
    pub fn delete(&self, key: &str) {
        let (status, body) = self.request("DELETE", &format!("/{key}"), &[]);
        assert_eq!(
            status,
            202,
            "delete {key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Overwrites a blob from outside the agent (to tamper with the store).
    pub fn put(&self, key: &str, bytes: &[u8]) {
        let (status, body) = self.request("PUT", &format!("/{key}"), bytes);
        assert_eq!(status, 201, "put {key}: {}", String::from_utf8_lossy(&body));
    }

    /// One request with SharedKey auth; `rest` is `/blob/path` or `?query` below the container.
    fn request(&self, method: &str, rest: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let enc_path: String = path
            .split('/')
            .map(|seg| {
                seg.bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("/");
        let uri_path = format!("/{AZ_ACCOUNT}/{}{enc_path}", self.container);
        let date = httpdate_now();
        let version = "2021-08-06";
        let mut canon_query = String::new();
        let mut params: Vec<(&str, &str)> = query
            .split('&')
            .filter(|q| !q.is_empty())
            .filter_map(|q| q.split_once('='))
            .collect();
        params.sort();
        for (k, v) in &params {
            canon_query.push_str(&format!("\n{k}:{v}"));
        }
        let length = if body.is_empty() {
            String::new()
        } else {
            body.len().to_string()
        };
        // A blob PUT names its type; a container PUT does not.
        let blob_type = (method == "PUT" && query.is_empty()).then_some("BlockBlob");
        let type_header = blob_type
            .map(|t| format!("x-ms-blob-type:{t}\n"))
            .unwrap_or_default();
        let to_sign = format!(
            "{method}\n\n\n{length}\n\n\n\n\n\n\n\n\n{type_header}x-ms-date:{date}\nx-ms-version:{version}\n/{AZ_ACCOUNT}{uri_path}{canon_query}"
        );
        let key = base64_decode(AZ_KEY);
        let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
        let target = if query.is_empty() {
            uri_path.clone()
        } else {
            format!("{uri_path}?{query}")
        };
        let mut conn =
            std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect azurite");
        conn.set_read_timeout(Some(Duration::from_secs(20))).ok();
        let head = format!(
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n{}x-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {AZ_ACCOUNT}:{signature}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            self.port,
            blob_type
                .map(|t| format!("x-ms-blob-type: {t}\r\n"))
                .unwrap_or_default(),
            body.len()
        );
        conn.write_all(head.as_bytes()).expect("write");
        conn.write_all(body).expect("write");
        let mut raw = Vec::new();
        let _ = conn.read_to_end(&mut raw);
        parse_http_response(&raw)
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Status and body of a `Connection: close` HTTP/1.1 response (plain or chunked body).
fn parse_http_response(raw: &[u8]) -> (u16, Vec<u8>) {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    (status, body)
}

fn httpdate_now() -> String {
    // RFC 1123, as the x-ms-date header wants it, without a date crate.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let names = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{weekday}, {day:02} {} {year} {h:02}:{m:02}:{s:02} GMT",
        names[(month - 1) as usize]
    )
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = sha2::Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = sha2::Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|b| *b == c).expect("base64") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

// ---------------------------------------------------------------- stores

/// Where a test's store lives, and a way to look at it from the outside.
pub enum Store {
    File,
    S3(S3Server),
    Azure(Azurite),
}

impl Store {
    pub fn s3() -> Self {
        Store::S3(S3Server::start())
    }

    pub fn azure() -> Self {
        Store::Azure(Azurite::start())
    }
}

// ---------------------------------------------------------------- control plane

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub auth: Option<String>,
    pub idempotency_key: Option<String>,
    pub body: Value,
    pub answered: u16,
}

#[derive(Default)]
struct CpState {
    requests: Mutex<Vec<Recorded>>,
    fail_next: AtomicUsize,
    fail_all: AtomicBool,
    /// What failing requests are answered (0: 503).
    fail_status: std::sync::atomic::AtomicU16,
    quota: Mutex<(u64, Option<u64>)>,
    /// Non-zero: what a status with a result is answered (see `refuse_results`).
    refuse_results: std::sync::atomic::AtomicU16,
    /// Non-zero: every 200 reply body is exactly this many bytes (see `set_reply_padding`).
    reply_padding: AtomicUsize,
    /// The padded body, built once per size.
    padded: Mutex<Option<axum::body::Bytes>>,
    /// While set, a terminal status is taken and not answered (see `hold_terminal`).
    hold_terminal: AtomicBool,
    /// Terminal statuses that came while `hold_terminal` was set.
    held: AtomicUsize,
    /// While set, a FINALIZING is taken and not answered (see `hold_finalizing`).
    hold_finalizing: AtomicBool,
}

/// A JSON object of exactly `bytes` bytes (at least its fixed fields), with a huge `pad` string.
fn padded_reply(bytes: usize) -> axum::body::Bytes {
    let head = br#"{"storage_used_bytes":0,"storage_quota_bytes":null,"pad":""#;
    let tail = br#""}"#;
    let fill = bytes.saturating_sub(head.len() + tail.len());
    let mut body = Vec::with_capacity(head.len() + fill + tail.len());
    body.extend_from_slice(head);
    body.resize(head.len() + fill, b'x');
    body.extend_from_slice(tail);
    axum::body::Bytes::from(body)
}

/// An HTTP control plane that records every request and can answer 503 or over-quota.
pub struct ControlPlane {
    pub url: String,
    state: Arc<CpState>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlPlane {
    pub fn start() -> Self {
        use axum::extract::{Path as AxPath, State};
        use axum::http::{header, HeaderMap, StatusCode};
        use axum::response::IntoResponse;
        use axum::routing::post;

        let state = Arc::new(CpState::default());
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let url = format!("http://{}/api", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let handler = |State(st): State<Arc<CpState>>,
                               AxPath(rest): AxPath<String>,
                               headers: HeaderMap,
                               body: String| async move {
                    let terminal = rest.ends_with("/status")
                        && serde_json::from_str::<Value>(&body)
                            .is_ok_and(|b| b["state"] != "RUNNING" && b["state"] != "FINALIZING");
                    let finalizing = rest.ends_with("/status")
                        && serde_json::from_str::<Value>(&body)
                            .is_ok_and(|b| b["state"] == "FINALIZING");
                    if finalizing && st.hold_finalizing.load(Ordering::SeqCst) {
                        st.held.fetch_add(1, Ordering::SeqCst);
                        while st.hold_finalizing.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    if terminal && st.hold_terminal.load(Ordering::SeqCst) {
                        st.held.fetch_add(1, Ordering::SeqCst);
                        while st.hold_terminal.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                    let failing = st.fail_all.load(Ordering::SeqCst)
                        || st
                            .fail_next
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let refused = match st.refuse_results.load(Ordering::SeqCst) {
                        0 => None,
                        status => serde_json::from_str::<Value>(&body)
                            .is_ok_and(|b| !b["result"].is_null())
                            .then(|| StatusCode::from_u16(status).expect("a status code")),
                    };
                    let (code, reply) = if let Some(code) = refused {
                        (code, json!({"error": "result refused"}))
                    } else if failing {
                        let status = st.fail_status.load(Ordering::SeqCst);
                        (
                            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                            json!({"error": "try later"}),
                        )
                    } else if rest.ends_with("/artifacts") {
                        let (used, quota) = *st.quota.lock().expect("lock");
                        (
                            StatusCode::OK,
                            json!({"storage_used_bytes": used, "storage_quota_bytes": quota}),
                        )
                    } else {
                        (StatusCode::OK, json!({}))
                    };
                    st.requests.lock().expect("lock").push(Recorded {
                        path: format!("/{rest}"),
                        auth: headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from),
                        idempotency_key: headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .map(String::from),
                        body: serde_json::from_str(&body).unwrap_or(Value::Null),
                        answered: code.as_u16(),
                    });
                    let padding = st.reply_padding.load(Ordering::SeqCst);
                    if code == StatusCode::OK && padding > 0 {
                        let body = {
                            let mut cached = st.padded.lock().expect("lock");
                            match cached.as_ref() {
                                Some(b) if b.len() == padding => b.clone(),
                                _ => cached.insert(padded_reply(padding)).clone(),
                            }
                        };
                        return (code, [(header::CONTENT_TYPE, "application/json")], body)
                            .into_response();
                    }
                    (code, axum::Json(reply)).into_response()
                };
                let app = axum::Router::new()
                    .route("/api/{*rest}", post(handler))
                    .with_state(st);
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await
                    .expect("serve");
            });
        });
        ControlPlane {
            url,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn fail_next(&self, n: usize) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    pub fn fail_all(&self, on: bool) {
        self.state.fail_all.store(on, Ordering::SeqCst);
    }

    /// The HTTP status failing requests get (503 unless set).
    pub fn set_fail_status(&self, status: u16) {
        self.state.fail_status.store(status, Ordering::SeqCst);
    }

    /// Non-zero: every 200 reply body is `bytes` bytes long (a JSON object with one huge string
    /// field; the quota set by `set_quota` is then not reported). Proves the agent reads at most
    /// a capped amount of a reply.
    pub fn set_reply_padding(&self, bytes: usize) {
        self.state.reply_padding.store(bytes, Ordering::SeqCst);
    }

    /// Non-zero: a status that carries a result is answered `status` (a control plane whose
    /// schema or database refuses it).
    pub fn refuse_results(&self, status: u16) {
        self.state.refuse_results.store(status, Ordering::SeqCst);
    }

    /// On: a terminal status is taken and not answered until this is turned off (a control
    /// plane that accepts and answers slowly).
    pub fn hold_terminal(&self, on: bool) {
        self.state.hold_terminal.store(on, Ordering::SeqCst);
    }

    /// On: a FINALIZING is taken and not answered until this is turned off (counted in
    /// `held` too).
    pub fn hold_finalizing(&self, on: bool) {
        self.state.hold_finalizing.store(on, Ordering::SeqCst);
    }

    /// How many terminal statuses came while `hold_terminal` was on.
    pub fn held(&self) -> usize {
        self.state.held.load(Ordering::SeqCst)
    }

    pub fn set_quota(&self, used: u64, quota: Option<u64>) {
        *self.state.quota.lock().expect("lock") = (used, quota);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    /// Successfully answered requests whose path ends with `suffix`.
    pub fn delivered(&self, suffix: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered == 200 && r.path.ends_with(suffix))
            .map(|r| r.body)
            .collect()
    }

    pub fn terminal_status(&self) -> Option<Value> {
        self.delivered("/status")
            .into_iter()
            .find(|b| b["state"] != "RUNNING" && b["state"] != "FINALIZING")
    }

    pub fn toml(&self, token_file: &Path, give_up_secs: u64) -> String {
        format!(
            "[control_plane]\nurl = \"{}\"\ntoken_file = \"{}\"\ngive_up_secs = {give_up_secs}\n",
            self.url,
            token_file.display()
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------- the agent

/// One test's world: a temp dir holding the state dir, workdirs, config and spec files.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub store: Store,
    pub control_plane: Option<ControlPlane>,
    pub token: String,
    pub extra_toml: String,
    pub env: Vec<(String, String)>,
    pub give_up_secs: u64,
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub what: String,
}

impl Run {
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "{} exited {} (expected {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.what, self.code, self.stdout, self.stderr
        );
        self
    }
}

fn finish(what: String, out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        what,
    }
}

impl Harness {
    pub fn new(store: Store) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        Harness {
            dir,
            state,
            store,
            control_plane: None,
            token: "tok-Secret-123".into(),
            extra_toml: String::new(),
            env: Vec::new(),
            give_up_secs: 5,
        }
    }

    pub fn file() -> Self {
        Self::new(Store::File)
    }

    pub fn with_control_plane(mut self, give_up_secs: u64) -> Self {
        self.control_plane = Some(ControlPlane::start());
        self.give_up_secs = give_up_secs;
        self
    }

    pub fn cp(&self) -> &ControlPlane {
        self.control_plane
            .as_ref()
            .expect("harness has a control plane")
    }

    /// How many statuses the control plane got in `state`.
    pub fn statuses_in(&self, state: &str) -> usize {
        self.cp()
            .delivered("/status")
            .iter()
            .filter(|s| s["state"] == state)
            .count()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn workdir(&self, job: &str) -> PathBuf {
        self.path(&format!("work-{job}"))
    }

    pub fn config_path(&self) -> PathBuf {
        let token_file = self.path("token");
        std::fs::write(&token_file, format!("{}\n", self.token)).expect("token");
        // Spec workdirs must lie under `jobs_root`: the temp dir holds them all, unless the
        // test sets its own `jobs_root` in `extra_toml` (a TOML key may appear only once).
        let jobs_root = if self
            .extra_toml
            .lines()
            .any(|l| l.trim_start().starts_with("jobs_root"))
        {
            String::new()
        } else {
            format!("jobs_root = \"{}\"\n", self.dir.path().display())
        };
        let mut toml = format!(
            "state_dir = \"{}\"\nkill_grace_secs = 1\n{jobs_root}{}",
            self.state.display(),
            self.extra_toml
        );
        match &self.store {
            Store::S3(s3) => toml.push_str(&s3.store_toml("pre")),
            Store::Azure(az) => toml.push_str(&az.store_toml("pre")),
            Store::File => {}
        }
        if let Some(cp) = &self.control_plane {
            toml.push_str(&cp.toml(&token_file, self.give_up_secs));
        }
        let path = self.path("config.toml");
        std::fs::write(&path, toml).expect("config");
        path
    }

    /// Writes a job spec; `workdir` defaults to `work-<job_id>` in the temp dir.
    pub fn spec(&self, mut spec: Value) -> PathBuf {
        let id = spec["job_id"].as_str().expect("job_id").to_string();
        if spec.get("workdir").is_none() {
            spec["workdir"] = json!(self.workdir(&id).display().to_string());
        }
        let path = self.path(&format!("{id}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&spec).expect("json")).expect("spec");
        path
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let config = self.config_path();
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("HOME", self.dir.path())
            .env("C3_AGENT_CONFIG", config)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Store::Azure(az) = &self.store {
            let (k, v) = az.env();
            cmd.env(k, v);
        }
        cmd
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).spawn().expect("spawn c3-agent")
    }

    pub fn wait(&self, what: String, mut child: Child) -> Run {
        // Drained while it runs: an agent that logs more than a pipe holds (64 KiB) must not
        // block on its own stderr.
        fn drain(
            pipe: Option<impl std::io::Read + Send + 'static>,
        ) -> std::thread::JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut out = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut out);
                }
                out
            })
        }
        let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let status = child.wait().expect("wait");
        let output = Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        finish(what, output)
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let what = format!("c3-agent {}", args.join(" "));
        let child = self.spawn(args);
        self.wait(what, child)
    }

    /// `run --job` for a spec built from `spec`.
    pub fn run_job(&self, spec: Value) -> Run {
        let path = self.spec(spec);
        self.run(&["run", "--job", path.to_str().expect("utf8")])
    }

    /// A store object, read from outside the agent (the store's own directory).
    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        if let Store::Azure(az) = &self.store {
            return az.get(&format!("pre/{key}"));
        }
        std::fs::read(self.object_path(key)).ok()
    }

    /// Replaces a store object's bytes behind the agent's back.
    pub fn tamper(&self, key: &str, bytes: &[u8]) {
        match &self.store {
            Store::Azure(az) => az.put(&format!("pre/{key}"), bytes),
            _ => std::fs::write(self.object_path(key), bytes).expect("tamper"),
        }
    }

    /// Deletes a store object behind the agent's back.
    pub fn delete_object(&self, key: &str) {
        match &self.store {
            Store::Azure(az) => az.delete(&format!("pre/{key}")),
            _ => std::fs::remove_file(self.object_path(key)).expect("delete"),
        }
    }

    /// Where a file or S3 store keeps an object on disk (Azurite keeps its own format).
    pub fn object_path(&self, key: &str) -> PathBuf {
        match &self.store {
            Store::File => self.state.join("store").join(key),
            Store::S3(s3) => s3.root.path().join(&s3.bucket).join("pre").join(key),
            Store::Azure(_) => panic!("Azurite objects have no path; use Harness::object"),
        }
    }

    pub fn manifest(&self, job: &str) -> Value {
        let bytes = self
            .object(&format!("jobs/{job}/manifest.json"))
            .unwrap_or_else(|| panic!("no manifest for {job}"));
        serde_json::from_slice(&bytes).expect("manifest json")
    }

    pub fn manifest_paths(&self, job: &str) -> Vec<String> {
        self.manifest(job)["files"]
            .as_array()
            .expect("files")
            .iter()
            .map(|f| f["path"].as_str().expect("path").to_string())
            .collect()
    }

    /// Reports recorded locally (no control plane): `reports.jsonl` of attempt 1.
    pub fn local_reports(&self, job: &str) -> Vec<Value> {
        let path = self
            .state
            .join(format!("jobs/{job}/attempts/1/reports.jsonl"));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("jsonl"))
            .collect()
    }

    /// The terminal status, from the control plane if there is one, else from the local reports.
    pub fn terminal(&self, job: &str) -> Value {
        match &self.control_plane {
            Some(cp) => cp
                .terminal_status()
                .expect("a terminal status was delivered"),
            None => self
                .local_reports(job)
                .into_iter()
                .filter(|r| {
                    r["endpoint"]
                        .as_str()
                        .is_some_and(|e| e.ends_with("/status"))
                })
                .map(|r| r["body"].clone())
                .find(|b| b["state"] != "RUNNING" && b["state"] != "FINALIZING")
                .expect("a terminal status was recorded"),
        }
    }
}

/// Is `pid` a live (non-zombie) process?
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("Z");
            state != "Z" && state != "X"
        }
    }
}

/// The pid the job `job` wrote to `artifacts/job.pid` (`echo $$ > ...`), once it has.
pub fn job_pid(h: &Harness, job: &str) -> i32 {
    let pid_file = h.workdir(job).join("artifacts/job.pid");
    wait_for("the job to start", Duration::from_secs(20), || {
        std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

/// The exit status of `child`, which must have exited by `deadline`: killed and `why`
/// panicked with otherwise.
pub fn exit_within(child: &mut Child, deadline: Instant, why: &str) -> std::process::ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Waits until process `pid` catches SIGTERM (its `SigCgt` in `/proc`): a signal sent before
/// the agent installed its handlers kills it outright (exit -1), where a test meant a stop.
/// A fixed sleep before the signal was a guess a loaded machine could lose.
pub fn wait_catches_term(pid: u32) {
    wait_for(
        "the agent to catch SIGTERM",
        Duration::from_secs(20),
        || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let mask = status.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            let mask = u64::from_str_radix(mask.trim(), 16).ok()?;
            (mask & (1 << (libc::SIGTERM - 1)) != 0).then_some(())
        },
    );
}

/// Sends `sig` (a number) to `pid` and waits until no such signal is pending there: one
/// sent again while the first is still pending is merged into it (standard signals do not
/// queue), and a test's "second" signal was never one.
pub fn signal_taken(pid: u32, sig: i32) {
    let name = match sig {
        libc::SIGINT => "INT",
        libc::SIGTERM => "TERM",
        _ => panic!("signal {sig}"),
    };
    signal(pid, name);
    wait_for("the signal to be taken", Duration::from_secs(20), || {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return Some(()); // gone
        };
        let pending = ["SigPnd:", "ShdPnd:"].iter().any(|field| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & (1 << (sig - 1)) != 0)
        });
        (!pending).then_some(())
    });
}

/// `chmod MODE PATH` (follows symlinks, like chmod(1)).
pub fn chmod(path: impl AsRef<Path>, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let path = path.as_ref();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Peak resident set size, in KiB, of the largest child process this process has waited for
/// (and of their own waited-for descendants). nextest runs each test in its own process, so
/// this is the peak of the agents the test ran.
#[allow(clippy::useless_conversion)] // `c_long` is `i64` on 64-bit targets only
pub fn max_child_rss_kib() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes a `rusage` through a valid pointer.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: getrusage succeeded, so it filled the struct (and it was zeroed before).
    i64::from(unsafe { usage.assume_init() }.ru_maxrss)
}
