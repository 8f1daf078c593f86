//! How the engine writes errors and times into logs, statuses and records: one place, used by
//! every module, so that no module has to reach up into another for a formatting helper.

/// An error and its sources on one line. A source whose text the line already holds (many
/// wrappers repeat their cause: `...: Permission denied (os error 13): Permission denied
/// (os error 13)`) is said once.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    clip_text(s, MAX_ERROR_TEXT)
}

/// A URL as a log, an error or a summary may show it: a `user:pass@` is a credential, and so
/// may be a query (an S3 or Azure signature, `?code=`) or a fragment. The agent's own URLs
/// (store, control plane) keep neither in what it says; one that does not parse is not shown.
pub fn shown_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut shown) => {
            // `abfss://container@account...`: the name before the `@` is the container.
            let container =
                matches!(shown.scheme(), "abfs" | "abfss") && shown.password().is_none();
            if !container {
                let _ = shown.set_username("");
            }
            let _ = shown.set_password(None);
            shown.set_query(None);
            shown.set_fragment(None);
            shown.to_string()
        }
        Err(_) => "(a URL that does not parse)".to_string(),
    }
}

/// An error line's longest text. A store or proxy may answer with an error body of any size
/// (object_store puts it whole into the error): a log line, status or record keeps its head.
pub const MAX_ERROR_TEXT: usize = 2048;

/// `text` with each NUL as U+FFFD, for what goes to the control plane: its storage (jsonb,
/// text) refuses U+0000, and a status or a live piece holding one was refused with it.
pub fn without_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text
    }
}

/// `s` cut to at most about `max` bytes at a character boundary, saying how much was cut.
pub fn clip_text(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut at = max;
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    let cut = s.len() - at;
    s.truncate(at);
    s.push_str(&format!("… ({cut} bytes more)"));
    s
}

/// `text` cut to at most `max` bytes on a character's boundary, "…" marking the cut; one
/// cut already is left as it is.
pub fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut at = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push('…');
    text
}

/// Now, as RFC 3339 UTC with milliseconds (statuses, records).
/// `t` in ns since the epoch, as file times are kept (0 before it).
pub fn epoch_ns(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// A file time (`st_mtime`, `st_mtime_nsec`) in ns since the epoch, saturated: a job may set
/// its files' times past 2262, where the product overflows an i64 (a panic in debug builds,
/// a wrapped time in release).
pub fn file_time_ns(secs: i64, nsec: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsec)
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Now, compact and usable in a job id (`20261130T101500Z`).
pub fn compact_utc_now() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

/// `args` for a log line, at most about `max` bytes: a 100 KB command line (a long list of
/// files) is cut, with how much was left out.
pub fn clipped(args: &[String], max: usize) -> Vec<String> {
    let total: usize = args.iter().map(String::len).sum();
    if total <= max {
        return args.to_vec();
    }
    let mut out = Vec::new();
    let mut used = 0;
    for a in args {
        if used + a.len() <= max {
            out.push(a.clone());
            used += a.len();
            continue;
        }
        let mut cut = max.saturating_sub(used);
        while !a.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(format!("{}…", &a[..cut]));
        used = max;
        break;
    }
    out.push(format!("(… {} more bytes)", total.saturating_sub(used)));
    out
}

/// `1288490188` -> `1.2 GiB`: for people (`systemctl status`), not for parsers.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    /// The token shows in no `Debug` print of the config that holds it.
    #[test]
    fn a_secret_never_shows_in_debug() {
        let cp = crate::report::ControlPlaneConfig {
            url: "http://agent:pa55word@127.0.0.1:1/".parse().unwrap(),
            token: Some("hunter2-token".into()),
            give_up: std::time::Duration::from_secs(1),
            max_reply_bytes: 1,
        };
        let shown = format!("{cp:?} {:#?}", crate::report::ControlPlane::new(cp.clone()));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("pa55word"), "{shown}");
        assert_eq!(cp.token.unwrap().expose(), "hunter2-token");
    }

    use super::*;

    #[test]
    fn long_command_lines_are_clipped() {
        let short = vec!["python3".to_string(), "train.py".to_string()];
        assert_eq!(clipped(&short, 1024), short);
        let long = vec!["cat".to_string(), "é".repeat(60_000)];
        let c = clipped(&long, 1024);
        assert_eq!(c[0], "cat");
        assert!(
            c[1].len() <= 1024 + 3 && c[1].ends_with('…'),
            "{}",
            c[1].len()
        );
        assert!(c[2].contains("more bytes"));
    }

    #[test]
    fn a_huge_error_body_is_cut_to_its_head() {
        let body = "é".repeat(1_000_000);
        let e = std::io::Error::other(format!("400 Bad Request: {body}"));
        let line = error_chain(&e);
        assert!(line.len() < MAX_ERROR_TEXT + 40, "{}", line.len());
        assert!(line.starts_with("400 Bad Request: é"));
        assert!(
            line.ends_with("bytes more)"),
            "{}",
            &line[line.len() - 40..]
        );
        assert_eq!(clip_text("short".into(), 10), "short");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read {0}: {1}")]
    struct Outer(&'static str, #[source] std::io::Error);

    #[test]
    fn a_repeated_cause_is_said_once() {
        let e = Outer(
            "/x",
            std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        );
        assert_eq!(error_chain(&e), "cannot read /x: permission denied");
        let io = std::io::Error::other(Outer(
            "/y",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
        assert_eq!(error_chain(&io), "cannot read /y: entity not found");
    }

    /// A login, a query (a signature, `?code=`) and a fragment are not shown; a URL that
    /// does not parse is not shown at all (it may be all secret).
    #[test]
    fn a_shown_url_keeps_no_credentials() {
        assert_eq!(
            super::shown_url("https://svc:secret@cp.example:8443/api?code=x#frag"),
            "https://cp.example:8443/api"
        );
        assert_eq!(
            super::shown_url("s3://AK:SK@bucket/pre?X-Amz-Signature=s"),
            "s3://bucket/pre"
        );
        assert_eq!(
            super::shown_url("file:///var/lib/store"),
            "file:///var/lib/store"
        );
        assert!(!super::shown_url("not a url secret").contains("secret"));
    }
}

/// A credential (the control plane's bearer token): its `Debug` never shows it, so that a
/// `?ctx` in a log line, a `dbg!` or a panic message with the config in it leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_string())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}
