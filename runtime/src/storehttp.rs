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

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::{ClientConfigKey, ClientOptions};

/// Hops followed within the origin before the redirect is an error (reqwest's own default).
const MAX_HOPS: usize = 10;

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
    if let Some(n) = number::<u32>(options, ClientConfigKey::Http2MaxFrameSize)? {
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

/// Follow a redirect only to the origin (scheme, host, port) the request was sent to.
fn within_origin(attempt: reqwest::redirect::Attempt<'_>) -> reqwest::redirect::Action {
    let first = attempt.previous().first();
    if attempt.previous().len() > MAX_HOPS {
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

fn config_error(key: ClientConfigKey, value: &str, kind: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "Config",
        source: format!("failed to parse \"{value}\" as {kind} ({key:?})").into(),
    }
}

/// A boolean option, read as object_store reads one.
fn flag(options: &ClientOptions, key: ClientConfigKey) -> object_store::Result<bool> {
    let Some(v) = options.get_config_value(&key) else {
        return Ok(false);
    };
    match v.to_ascii_lowercase().as_str() {
        "1" | "true" | "on" | "yes" | "y" => Ok(true),
        "0" | "false" | "off" | "no" | "n" => Ok(false),
        _ => Err(config_error(key, &v, "boolean")),
    }
}

fn duration(
    options: &ClientOptions,
    key: ClientConfigKey,
) -> object_store::Result<Option<Duration>> {
    options
        .get_config_value(&key)
        .map(|v| humantime::parse_duration(&v).map_err(|_| config_error(key, &v, "Duration")))
        .transpose()
}

fn number<T: FromStr>(
    options: &ClientOptions,
    key: ClientConfigKey,
) -> object_store::Result<Option<T>> {
    options
        .get_config_value(&key)
        .map(|v| v.parse().map_err(|_| config_error(key, &v, "number")))
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
        assert!(err.contains("soon"), "{err}");
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
