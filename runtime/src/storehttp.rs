//! The HTTP client a store's requests go through: object_store's own reqwest client, built
//! here from the same options so that a redirect is followed only within the store's origin.
//! object_store's client follows any redirect reqwest would (up to 10 hops), and a 307 or
//! 308 re-sends a PUT's body, a job's checkpoint, with its `x-amz-security-token`, to
//! whatever host the store's answer names; a GET reads from there. object_store builds its
//! client in a crate-private method, so this is that method over the public option getters,
//! with the redirect policy changed and the agent named in `User-Agent`. A redirect to
//! another origin comes back unfollowed and is refused in [`crate::httpcap`]. Root
//! certificates added to the options have no getter: the agent adds none (the system's
//! are used), and one added some day must be passed here too. A `user_agent` option that is
//! no header value reads as none through the getter, so it gives the agent's own here where
//! object_store refused it.
//!
//! [`check`] is what a value must be for this client: the agent's config asks it of each
//! `store.options` value, so that one the HTTP stack cannot hold (a duration past what a clock
//! adds, a frame size h2 asserts on) is named at load instead of panicking or hanging later.

use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ClientConfigKey, ClientOptions};

/// Hops followed within the origin before the redirect is an error (reqwest's own default).
const MAX_HOPS: usize = 10;

/// The longest duration an option may give: a century, as for the agent's own settings.
/// reqwest adds a timeout to `Instant::now()` for each request (and hyper an HTTP/2
/// keep-alive to its clock): `read_timeout = "18446744073709551615s"` panicked there, in a
/// task the retries then waited out.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The HTTP/2 frame sizes a peer may be told (RFC 9113 §6.5.2); h2 asserts on any other.
const FRAME_SIZES: RangeInclusive<u32> = 16_384..=16_777_215;

/// The client option a store option's key names, as the stores' builders read their keys:
/// bare (`read_timeout`) or with a store's prefix (`aws_read_timeout`). `None` for a key
/// that is no client option (`aws_region`), which the store's builder judges.
pub fn client_key(key: &str) -> Option<ClientConfigKey> {
    ["aws_", "google_", "azure_"]
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key)
        .parse()
        .ok()
}

/// Why `value` is no value of the client option `key` as [`client`] reads it.
pub fn check(key: ClientConfigKey, value: &str) -> Result<(), String> {
    use ClientConfigKey as K;
    match key {
        K::AllowHttp
        | K::AllowInvalidCertificates
        | K::NoSystemCertificates
        | K::Http1Only
        | K::Http2Only
        | K::Http2KeepAliveWhileIdle
        | K::RandomizeAddresses => parse_flag(value)
            .map(drop)
            .ok_or_else(|| format!("`{value}` is not true or false")),
        K::Timeout
        | K::ConnectTimeout
        | K::ReadTimeout
        | K::PoolIdleTimeout
        | K::Http2KeepAliveInterval
        | K::Http2KeepAliveTimeout => key_duration(key, value).map(drop),
        K::PoolMaxIdlePerHost => value
            .parse::<usize>()
            .map(drop)
            .map_err(|_| format!("`{value}` is not a number")),
        K::Http2MaxFrameSize => frame_size(value).map(drop),
        // Text: a URL, a header value, a certificate, which the client judges when built.
        _ => Ok(()),
    }
}

/// A reqwest client as object_store 0.14's `ClientOptions::client` builds it, but for the
/// redirect policy.
pub fn client(options: &ClientOptions) -> object_store::Result<reqwest::Client> {
    let get = |key: ClientConfigKey| options.get_config_value(&key);
    let mut b = reqwest::ClientBuilder::new();
    b = b.user_agent(get(ClientConfigKey::UserAgent).unwrap_or_else(default_user_agent));
    if let Some(headers) = options.get_default_headers() {
        b = b.default_headers(headers.clone());
    }
    if let Some(url) = get(ClientConfigKey::ProxyUrl) {
        let mut proxy = reqwest::Proxy::all(&url).map_err(client_error)?;
        if let Some(pem) = get(ClientConfigKey::ProxyCaCertificate) {
            let cert = reqwest::tls::Certificate::from_pem(pem.as_bytes()).map_err(client_error)?;
            b = b.tls_certs_merge(std::iter::once(cert));
        }
        if let Some(excludes) = get(ClientConfigKey::ProxyExcludes) {
            proxy = proxy.no_proxy(reqwest::NoProxy::from_string(&excludes));
        }
        b = b.proxy(proxy);
    }
    // The agent adds no root certificate of its own; the system's are kept unless told not.
    if flag(options, ClientConfigKey::NoSystemCertificates)? {
        b = b.tls_certs_only(std::iter::empty());
    }
    if let Some(t) = duration(options, ClientConfigKey::Timeout)? {
        b = b.timeout(t);
    }
    if let Some(t) = duration(options, ClientConfigKey::ConnectTimeout)? {
        b = b.connect_timeout(t);
    }
    if let Some(t) = duration(options, ClientConfigKey::ReadTimeout)? {
        b = b.read_timeout(t);
    }
    if let Some(t) = duration(options, ClientConfigKey::PoolIdleTimeout)? {
        b = b.pool_idle_timeout(t);
    }
    if let Some(n) = number::<usize>(options, ClientConfigKey::PoolMaxIdlePerHost)? {
        b = b.pool_max_idle_per_host(n);
    }
    if let Some(t) = duration(options, ClientConfigKey::Http2KeepAliveInterval)? {
        b = b.http2_keep_alive_interval(t);
    }
    if let Some(t) = duration(options, ClientConfigKey::Http2KeepAliveTimeout)? {
        b = b.http2_keep_alive_timeout(t);
    }
    if flag(options, ClientConfigKey::Http2KeepAliveWhileIdle)? {
        b = b.http2_keep_alive_while_idle(true);
    }
    if let Some(v) = get(ClientConfigKey::Http2MaxFrameSize) {
        let n =
            frame_size(&v).map_err(|why| config_error(ClientConfigKey::Http2MaxFrameSize, why))?;
        b = b.http2_max_frame_size(Some(n));
    }
    if flag(options, ClientConfigKey::Http1Only)? {
        b = b.http1_only();
    }
    if flag(options, ClientConfigKey::Http2Only)? {
        b = b.http2_prior_knowledge();
    }
    if flag(options, ClientConfigKey::AllowInvalidCertificates)? {
        b = b.danger_accept_invalid_certs(true);
    }
    // Compression would change the Content-Length object sizes are read from.
    b = b.no_gzip().no_brotli().no_zstd().no_deflate();
    if options.dns_resolver().is_some() {
        // The agent sets none; one set would be object_store's to apply, not ours to drop.
        return Err(object_store::Error::NotSupported {
            source: "a custom DNS resolver with the agent's store client".into(),
        });
    }
    if flag(options, ClientConfigKey::RandomizeAddresses)? {
        b = b.dns_resolver(Arc::new(Shuffled));
    }
    b.https_only(!flag(options, ClientConfigKey::AllowHttp)?)
        .redirect(reqwest::redirect::Policy::custom(within_origin))
        .build()
        .map_err(client_error)
}

/// Follow a redirect only to the origin (scheme, host, port) the request was sent to, and
/// only one that keeps the method and body (307, 308).
fn within_origin(attempt: reqwest::redirect::Attempt<'_>) -> reqwest::redirect::Action {
    let first = attempt.previous().first();
    if matches!(attempt.status().as_u16(), 301..=303) {
        // Followed, a PUT (303) or a POST (301, 302) went on as a GET of the same place:
        // its 200 and the ETag of the object already there stood for the write, and a
        // manifest that was never written counted as stored. No store sends these to a
        // request of its own API; the 3xx comes back as the answer, a failed try.
        attempt.stop()
    } else if attempt.previous().len() > MAX_HOPS {
        attempt.error("too many redirects")
    } else if first.is_some_and(|f| f.origin() == attempt.url().origin()) {
        attempt.follow()
    } else {
        attempt.stop()
    }
}

fn default_user_agent() -> String {
    // Named in the store's access logs, so an operator can tell the agent's requests apart.
    concat!("c3-agent/", env!("CARGO_PKG_VERSION")).to_string()
}

fn client_error(e: reqwest::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "HTTP client",
        source: Box::new(e),
    }
}

fn config_error(key: ClientConfigKey, why: String) -> object_store::Error {
    object_store::Error::Generic {
        store: "Config",
        source: format!("option `{}`: {why}", key.as_ref()).into(),
    }
}

/// A boolean as object_store reads one.
fn parse_flag(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" | "y" => Some(true),
        "0" | "false" | "off" | "no" | "n" => Some(false),
        _ => None,
    }
}

/// A duration as object_store reads one (humantime), at most [`MAX_DURATION`].
fn parse_duration(v: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(v)
        .map_err(|_| format!("`{v}` is not a duration (e.g. \"30s\", \"5m\")"))?;
    if d > MAX_DURATION {
        return Err(format!(
            "`{v}` is more than a century ({} s at most)",
            MAX_DURATION.as_secs()
        ));
    }
    Ok(d)
}

/// The duration `key` is set to. A request's bounds under a second (`timeout = "0s"`)
/// time out every request at once: each job's upload failed after the outage's deadline.
fn key_duration(key: ClientConfigKey, v: &str) -> Result<Duration, String> {
    use ClientConfigKey as K;
    let d = parse_duration(v)?;
    let bounds_a_request = matches!(key, K::Timeout | K::ConnectTimeout | K::ReadTimeout);
    if bounds_a_request && d < Duration::from_secs(1) {
        return Err(format!(
            "must be at least 1 s: `{v}` times out every request at once"
        ));
    }
    Ok(d)
}

/// An HTTP/2 frame size h2 takes.
fn frame_size(v: &str) -> Result<u32, String> {
    v.parse()
        .ok()
        .filter(|n| FRAME_SIZES.contains(n))
        .ok_or_else(|| {
            format!(
                "`{v}` is not a frame size from {} to {} bytes",
                FRAME_SIZES.start(),
                FRAME_SIZES.end()
            )
        })
}

/// A boolean option.
fn flag(options: &ClientOptions, key: ClientConfigKey) -> object_store::Result<bool> {
    let Some(v) = options.get_config_value(&key) else {
        return Ok(false);
    };
    parse_flag(&v).ok_or_else(|| config_error(key, format!("`{v}` is not true or false")))
}

/// A duration option; the environment's (`AWS_READ_TIMEOUT`) is checked here, past the config.
fn duration(
    options: &ClientOptions,
    key: ClientConfigKey,
) -> object_store::Result<Option<Duration>> {
    options
        .get_config_value(&key)
        .map(|v| key_duration(key, &v).map_err(|why| config_error(key, why)))
        .transpose()
}

fn number<T: FromStr>(
    options: &ClientOptions,
    key: ClientConfigKey,
) -> object_store::Result<Option<T>> {
    options
        .get_config_value(&key)
        .map(|v| {
            v.parse()
                .map_err(|_| config_error(key, format!("`{v}` is not a number")))
        })
        .transpose()
}

/// The addresses of a name in random order, so that the store's connections spread over the
/// servers its name gives (object_store's `RandomizeAddresses`, on by default).
struct Shuffled;

impl reqwest::dns::Resolve for Shuffled {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let mut addrs = tokio::task::spawn_blocking(move || {
                (host.as_str(), 0)
                    .to_socket_addrs()
                    .map(|it| it.collect::<Vec<SocketAddr>>())
            })
            .await??;
            shuffle(&mut addrs, random_seed());
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// A seed that differs from one call to the next (spreading load, not secrecy).
fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// Fisher-Yates over a xorshift sequence from `seed`.
fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_the_agent_sets_is_taken() {
        let options = ClientOptions::new()
            .with_allow_http(true)
            .with_timeout(Duration::from_secs(300))
            .with_connect_timeout(Duration::from_secs(5));
        client(&options).unwrap();
        let bad = ClientOptions::new().with_config(ClientConfigKey::Timeout, "soon");
        let err = client(&bad).unwrap_err().to_string();
        assert!(err.contains("soon") && err.contains("`timeout`"), "{err}");
    }

    /// A value the HTTP stack cannot hold is refused, by [`check`] and by [`client`] (for one
    /// from the environment): a century-past timeout panicked in reqwest per request, a frame
    /// size outside RFC 9113's range asserted in h2.
    #[test]
    fn a_value_the_http_stack_cannot_hold_is_refused() {
        let huge = "18446744073709551615s";
        for key in [
            ClientConfigKey::Timeout,
            ClientConfigKey::ConnectTimeout,
            ClientConfigKey::ReadTimeout,
            ClientConfigKey::PoolIdleTimeout,
            ClientConfigKey::Http2KeepAliveInterval,
            ClientConfigKey::Http2KeepAliveTimeout,
        ] {
            assert!(check(key, huge).is_err(), "{key:?}");
            assert!(check(key, "abc").is_err(), "{key:?}");
            check(key, "36500d").unwrap_or_else(|e| panic!("{key:?}: {e}"));
            check(key, "30s").unwrap();
            let err = client(&ClientOptions::new().with_config(key, huge)).unwrap_err();
            assert!(err.to_string().contains(key.as_ref()), "{err}");
        }
        for bad in ["0", "16383", "16777216", "4294967295", "x"] {
            assert!(
                check(ClientConfigKey::Http2MaxFrameSize, bad).is_err(),
                "{bad}"
            );
            let options = ClientOptions::new().with_config(ClientConfigKey::Http2MaxFrameSize, bad);
            assert!(client(&options).is_err(), "{bad}");
        }
        for good in ["16384", "16777215"] {
            check(ClientConfigKey::Http2MaxFrameSize, good).unwrap();
        }
        assert!(check(ClientConfigKey::AllowHttp, "maybe").is_err());
        assert!(check(ClientConfigKey::PoolMaxIdlePerHost, "-1").is_err());
        assert_eq!(
            client_key("aws_read_timeout"),
            Some(ClientConfigKey::ReadTimeout)
        );
        assert_eq!(client_key("azure_timeout"), Some(ClientConfigKey::Timeout));
        assert_eq!(
            client_key("http2_max_frame_size"),
            Some(ClientConfigKey::Http2MaxFrameSize)
        );
        assert_eq!(client_key("aws_region"), None);
    }

    /// A request bound under a second fails every request (every job's upload, after the
    /// outage's deadline): refused, by [`check`] and by [`client`], naming the key. Other
    /// durations may be 0 (a pool that keeps no idle connection).
    #[test]
    fn a_request_bound_that_times_out_every_request_is_refused() {
        for key in [
            ClientConfigKey::Timeout,
            ClientConfigKey::ConnectTimeout,
            ClientConfigKey::ReadTimeout,
        ] {
            for zero in ["0s", "0", "500ms"] {
                let why = check(key, zero).unwrap_err();
                assert!(why.contains("at least 1 s"), "{key:?} {zero}: {why}");
                let err = client(&ClientOptions::new().with_config(key, zero)).unwrap_err();
                assert!(err.to_string().contains(key.as_ref()), "{err}");
            }
            check(key, "1s").unwrap();
        }
        check(ClientConfigKey::PoolIdleTimeout, "0s").unwrap();
    }

    #[test]
    fn a_shuffle_keeps_every_address() {
        let mut v: Vec<u32> = (0..16).collect();
        shuffle(&mut v, 12345);
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(sorted, (0..16).collect::<Vec<_>>());
        assert_ne!(v, sorted, "16 items in their own order");
    }
}
