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
    s
}

/// Now, as RFC 3339 UTC with milliseconds (statuses, records).
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
}
