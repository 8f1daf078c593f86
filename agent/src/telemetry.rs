//! Logging: human lines or one JSON object per line (with `job_id` at the top level),
//! filtered by `C3_AGENT_LOG`. Under systemd each line carries its syslog priority as a
//! `<N>` prefix (journald's `SyslogLevelPrefix=`, on by default), so `journalctl -p warning`
//! shows warnings and errors only and `journalctl -o cat | jq` still reads pure JSON.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Info for the agent; object_store's own per-request retry lines (hundreds in an outage)
/// only from warn: the agent logs one line when an outage starts and one when it ends.
/// notify's own info lines (a watch descriptor it could not remove, with a path from its
/// build machine) say nothing an operator can act on.
const DEFAULT_FILTER: &str = "info,object_store=warn,notify=warn";

use crate::config::LogFormat;

/// The filter from `C3_AGENT_LOG` (default: info); a malformed one is a config error.
pub fn filter() -> Result<EnvFilter, String> {
    filter_of(std::env::var("C3_AGENT_LOG").ok().as_deref())
}

/// Levels a bare directive may name.
const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

fn filter_of(value: Option<&str>) -> Result<EnvFilter, String> {
    let v = match value {
        None => return Ok(EnvFilter::new(DEFAULT_FILTER)),
        Some(v) if v.trim().is_empty() => return Ok(EnvFilter::new(DEFAULT_FILTER)),
        Some(v) => v,
    };
    let bad = |why: String| {
        format!("config: `C3_AGENT_LOG`: `{v}` is not a log filter ({why}); try `info`, `debug` or `c3_runtime=debug`")
    };
    // A bare word is a target to tracing (everything it logs, at every level): `warning` or
    // `debg` kept nothing at all, the job's own lines included, and said nothing. A word
    // that is a level misspelt is refused; any other bare word stays a target.
    for word in v.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if let Some(level) = misspelt_level(word) {
            return Err(bad(format!(
                "`{word}` is not a level (trace, debug, info, warn, error, off, or 0 to 5); did you mean `{level}`? (a target takes `={{level}}`)"
            )));
        }
    }
    EnvFilter::try_new(v).map_err(|e| bad(e.to_string()))
}

/// The level a bare directive seems meant as, when it is not one: `warning`, `debg`, `inf0`,
/// `errors`. A target's name (`c3_runtime`, `h2`) is none.
fn misspelt_level(word: &str) -> Option<&'static str> {
    let w = word.to_ascii_lowercase();
    if word.contains(['=', '[', ':']) || LEVELS.contains(&w.as_str()) {
        return None;
    }
    if w.len() == 1 && ('0'..='5').contains(&w.chars().next()?) {
        return None;
    }
    // One edit away (a letter wrong, missing or extra), or a level with more after it.
    let one_edit = |a: &str, b: &str| {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let (short, long) = if a.len() <= b.len() {
            (&a, &b)
        } else {
            (&b, &a)
        };
        match long.len() - short.len() {
            0 => {
                short
                    .iter()
                    .zip(long.iter())
                    .filter(|(x, y)| x != y)
                    .count()
                    <= 1
            }
            1 => (0..long.len()).any(|skip| {
                long.iter()
                    .enumerate()
                    .filter(|(i, _)| *i != skip)
                    .map(|(_, c)| c)
                    .eq(short.iter())
            }),
            _ => false,
        }
    };
    LEVELS
        .iter()
        .find(|l| {
            w.starts_with(*l) || (w.len() >= 3 && l.starts_with(w.as_str())) || one_edit(&w, l)
        })
        .copied()
}

pub fn init(format: LogFormat, filter: EnvFilter) {
    // A closed stderr (journald restarted, `2>&- `, a reader that went away) loses log lines,
    // never the agent: tracing-subscriber's own error report would `eprintln!` and panic.
    use std::io::IsTerminal;
    let ansi = format == LogFormat::Human && std::io::stderr().is_terminal();
    let style = match format {
        LogFormat::Json => Style::Json,
        LogFormat::Human if ansi => Style::Terminal,
        LogFormat::Human => Style::Text,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Stderr {
            journal: stderr_is_journal(),
            style,
        })
        .log_internal_errors(false);
    crate::logwriter::start(say_dropped);
    match format {
        LogFormat::Human => builder.with_target(false).with_ansi(ansi).init(),
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init(),
    }
}

/// Said by the log writer once its queue has drained after lines were dropped.
fn say_dropped(lines: u64) {
    tracing::warn!(
        dropped_lines = lines,
        "{lines} log lines dropped: the journal did not keep up"
    );
}

/// stderr, with each line's syslog priority in front (`<3>` error ... `<7>` debug) when
/// stderr is journald's stream (`JOURNAL_STREAM` names its device and inode).
#[derive(Clone, Copy)]
struct Stderr {
    journal: bool,
    style: Style,
}

fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Ok(stream) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    stream == format!("{}:{}", st.st_dev, st.st_ino)
}

/// One line the agent prints itself on stderr (a config error, a note), as log events are
/// written: its priority in front under journald, so `journalctl -p warning` shows an exit-2
/// error too, and every control character escaped, so a spec's or config's value holding
/// `\n<3>...` is not a second journal entry of the writer's making.
pub fn stderr_line(level: &tracing::Level, text: &str, style: Style) -> Vec<u8> {
    let prefix = stderr_is_journal().then(|| priority(level));
    written(prefix, style, text.as_bytes())
}

fn priority(level: &tracing::Level) -> &'static [u8] {
    match *level {
        tracing::Level::ERROR => b"<3>",
        tracing::Level::WARN => b"<4>",
        tracing::Level::INFO => b"<6>",
        _ => b"<7>",
    }
}

/// One event's text, handed to the log writer as one line, with its priority in front.
/// What the job chose (file names in warnings, a path in a field) may hold newlines and
/// terminal escapes: written raw, a name such as `x\n<3>... ERROR ...` would forge a log line
/// (a journal entry of its own, at the priority it names). Control characters inside an
/// event are therefore written escaped (`\n`, `\x1b`), except the colours the formatter
/// itself adds on a terminal.
struct Line {
    prefix: Option<&'static [u8]>,
    style: Style,
    buf: Vec<u8>,
}

/// How a line's control characters are escaped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Style {
    /// Human lines to a pipe or the journal: `\n`, `\x1b`, C1 controls as `\u0080`.
    Text,
    /// Human lines to a terminal: as `Text`, but the formatter's own colours stay.
    Terminal,
    /// JSON lines: only JSON's own escapes (`\u007f`, `\u0080`), so the line still parses.
    /// serde_json escapes C0 itself but leaves DEL and C1 raw, which terminals and
    /// pagers obey (0x9b is CSI).
    Json,
}

/// `event` (which ends in one newline) with every other control character escaped: C0, DEL
/// and the C1 controls U+0080..U+009F (bytes C2 80..C2 9F in the UTF-8 the formatters write).
fn one_line(event: &[u8], style: Style) -> Vec<u8> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    let mut out = Vec::with_capacity(body.len() + 1);
    let mut bytes = body.iter().copied().peekable();
    while let Some(b) = bytes.next() {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' if style == Style::Json => out.extend_from_slice(b"\\t"),
            b'\t' => out.push(b),
            0x1b if style == Style::Terminal && is_formatter_colour(bytes.clone()) => out.push(b),
            0..=0x1f | 0x7f if style == Style::Json => {
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes())
            }
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            0xc2 => match bytes.next_if(|c| (0x80..=0x9f).contains(c)) {
                Some(c1) => out.extend_from_slice(format!("\\u{c1:04x}").as_bytes()),
                None => out.push(b),
            },
            _ => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

/// Whether what follows an ESC is a colour of the formatter's own (`[`, SGR codes of bold,
/// dim, italic, the five level colours or a reset, `m`). tracing-subscriber escapes only the
/// message: a field's value (a file name the job chose) is written as it is, and an OSC 52
/// or a cursor move in it was obeyed by the terminal of an operator running `resync` or
/// `recover` (the clipboard set, earlier lines rewritten); a concealing or blinking SGR too.
fn is_formatter_colour(mut rest: impl Iterator<Item = u8>) -> bool {
    if rest.next() != Some(b'[') {
        return false;
    }
    let mut code = String::new();
    for b in rest.take(32) {
        match b {
            b'0'..=b'9' => code.push(b as char),
            b';' | b'm' => {
                if !matches!(
                    code.as_str(),
                    "0" | "1" | "2" | "3" | "22" | "23" | "31" | "32" | "33" | "34" | "35" | "39"
                ) {
                    return false;
                }
                if b == b'm' {
                    return true;
                }
                code.clear();
            }
            _ => return false,
        }
    }
    false
}

/// The most one written line may take, its priority and newline included. journald cuts a
/// stream line at `LineMax` (48 KiB by default) and reads a `<N>` priority at the start of
/// each piece: nothing the agent writes may reach it, whatever an event holds once escaped.
const MAX_WRITTEN: usize = 32 * 1024;

/// One event as written: its priority, its text as [`one_line`], cut to [`MAX_WRITTEN`]
/// with a note of how much was cut.
fn written(prefix: Option<&[u8]>, style: Style, event: &[u8]) -> Vec<u8> {
    let mut line = prefix.unwrap_or_default().to_vec();
    line.extend_from_slice(&one_line(event, style));
    if line.len() <= MAX_WRITTEN {
        return line;
    }
    if style == Style::Json {
        // A JSON line cut anywhere no longer parses: log shippers and `jq` drop it, its level
        // and job id with it. Its longest values are shortened instead.
        let room = MAX_WRITTEN - prefix.map_or(0, <[u8]>::len);
        if let Some(short) = shortened_json(event, room) {
            let mut line = prefix.unwrap_or_default().to_vec();
            line.extend_from_slice(&one_line(&short, style));
            if line.len() <= MAX_WRITTEN {
                return line;
            }
        }
    }
    // Room for the note; the cut falls between characters, never inside one.
    let mut keep = MAX_WRITTEN - 64;
    while keep > 0 && line[keep] & 0xc0 == 0x80 {
        keep -= 1;
    }
    let cut = line.len() - 1 - keep;
    line.truncate(keep);
    line.extend_from_slice(format!(" \u{2026} ({cut} bytes cut)\n").as_bytes());
    line
}

/// Fields a shortened line keeps whole: what a log pipeline selects and sorts on.
const KEPT_WHOLE: &[&str] = &["timestamp", "level", "target", "job_id", "attempt"];

/// `event` (one JSON object) with its largest values halved (a string to half its length
/// and `…`, a list to its first half and a last item saying how many went; never the fields
/// of [`KEPT_WHOLE`]) until it is written in at most `room` bytes (escaped as [`one_line`]
/// writes it), and `cut_bytes` saying how many bytes of values went. `None` if it is not an
/// object or no halving gets it there.
fn shortened_json(event: &[u8], room: usize) -> Option<Vec<u8>> {
    use serde_json::Value;
    let mut map: serde_json::Map<String, Value> = serde_json::from_slice(event).ok()?;
    let size = |v: &Value| one_line(&serde_json::to_vec(v).unwrap_or_default(), Style::Json).len();
    let mut cut = 0usize;
    for _ in 0..256 {
        if size(&Value::Object(map.clone())) + 32 <= room {
            map.insert("cut_bytes".into(), cut.into());
            let mut out = serde_json::to_vec(&map).ok()?;
            out.push(b'\n');
            return Some(out);
        }
        let largest = map
            .iter_mut()
            .filter(|(k, _)| !KEPT_WHOLE.contains(&k.as_str()))
            .max_by_key(|(_, v)| size(v))?
            .1;
        let before = size(largest);
        halve(largest);
        let after = size(largest);
        if after >= before {
            return None;
        }
        cut += before - after;
    }
    None
}

/// Halves the largest part of `v`: a string's text, a list's items, an object's largest value.
fn halve(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) => {
            let mut keep = s.len() / 2;
            while !s.is_char_boundary(keep) {
                keep -= 1;
            }
            s.truncate(keep);
            s.push('\u{2026}');
        }
        Value::Array(items) if items.len() > 2 => {
            let keep = items.len() / 2;
            let went = items.len() - keep;
            items.truncate(keep);
            items.push(format!("\u{2026} ({went} more)").into());
        }
        Value::Array(items) => {
            if let Some(first) = items.first_mut() {
                halve(first);
            }
        }
        Value::Object(fields) => {
            if let Some(largest) = fields
                .values_mut()
                .max_by_key(|v| serde_json::to_vec(v).map_or(0, |b| b.len()))
            {
                halve(largest);
            }
        }
        _ => {}
    }
}

impl std::io::Write for Line {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        crate::logwriter::send(written(self.prefix, self.style, &self.buf));
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Stderr {
    type Writer = Line;
    fn make_writer(&'a self) -> Line {
        Line {
            prefix: None,
            style: self.style,
            buf: Vec::new(),
        }
    }
    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Line {
        Line {
            prefix: self.journal.then(|| priority(meta.level())),
            style: self.style,
            buf: Vec::new(),
        }
    }
}

/// Like tracing-subscriber's JSON format, but span fields (`job_id`, `attempt`) are
/// lifted to the top level so that `jq 'select(.job_id == "…")'` just works.
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut map = serde_json::Map::new();
        map.insert(
            "timestamp".into(),
            c3_runtime::display::now_rfc3339().into(),
        );
        map.insert("level".into(), event.metadata().level().as_str().into());
        map.insert("target".into(), event.metadata().target().into());
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    if let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(fields) {
                        map.extend(obj);
                    }
                }
            }
        }
        event.record(&mut Visitor(&mut map));
        // A field the event declares but did not record (an `Option` that was `None`) is
        // null, not missing: `jq '.reason'` then means the same on every "job finished".
        for field in event.metadata().fields() {
            map.entry(field.name()).or_insert(serde_json::Value::Null);
        }
        writeln!(writer, "{}", serde_json::Value::Object(map))
    }
}

/// The fields the agent logs as lists.
const LIST_FIELDS: &[&str] = &["command", "unstored", "dirs", "watched", "first", "to"];

struct Visitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl Visit for Visitor<'_> {
    /// The agent's list fields (`command = ?vec`) stay lists; everything else recorded by
    /// `Debug`/`Display` is a string. Nothing else is parsed: a job's output line is echoed as
    /// the message and a file name as a `path`, and `{"level":"ERROR"}` or `[1,2]` a job wrote
    /// must stay text, not become structure a log pipeline takes for the agent's.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        let json = LIST_FIELDS
            .contains(&field.name())
            .then(|| serde_json::from_str::<serde_json::Value>(&text).ok())
            .flatten()
            .filter(serde_json::Value::is_array);
        self.0
            .insert(field.name().into(), json.unwrap_or(text.into()));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use super::{filter_of, is_formatter_colour, one_line, FlatJson, Style};

    #[test]
    fn a_misspelt_level_is_refused_not_taken_for_a_target() {
        for v in ["warning", "debg", "info,errors", "inf0", "Warnings", "trac"] {
            let e = filter_of(Some(v)).expect_err(v);
            assert!(e.contains("C3_AGENT_LOG"), "{e}");
        }
        assert!(filter_of(Some("warning")).unwrap_err().contains("`warn`"));
        for v in [
            "info",
            "WARN",
            "debug,object_store=warn",
            "c3=debug",
            "off",
            " ",
            "c3_runtime[run]=debug",
            // Bare targets and numeric levels are tracing's own, and stay.
            "c3_runtime",
            "info,c3_runtime::upload",
            "3",
            "h2",
            "hyper",
            "notify",
        ] {
            filter_of(Some(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
        }
        filter_of(None).unwrap();
        assert!(filter_of(Some("c3=debg")).is_err());
    }

    /// What a subscriber writes, gathered.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Each event logged under `tracing::subscriber::with_default`, through the JSON format.
    fn json_lines(log: impl FnOnce()) -> Vec<serde_json::Value> {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, log);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Each event logged under `with_default`, in `style`'s format, as it is written.
    fn written_lines(style: Style, log: impl FnOnce()) -> Vec<Vec<u8>> {
        use std::sync::{Arc, Mutex};
        /// One event's bytes, handed to the list whole when the formatter is done with it.
        struct Event(Vec<u8>, Style, Arc<Mutex<Vec<Vec<u8>>>>);
        impl std::io::Write for Event {
            fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
                self.0.extend_from_slice(data);
                Ok(data.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        impl Drop for Event {
            fn drop(&mut self) {
                let line = super::written(Some(b"<6>"), self.1, &self.0);
                self.2.lock().unwrap().push(line);
            }
        }
        let events = Arc::new(Mutex::new(Vec::new()));
        let to = events.clone();
        let writer = move || Event(Vec::new(), style, to.clone());
        let builder = tracing_subscriber::fmt().with_writer(writer);
        match style {
            Style::Json => {
                let subscriber = builder
                    .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
                    .event_format(FlatJson)
                    .finish();
                tracing::subscriber::with_default(subscriber, log);
            }
            _ => {
                let subscriber = builder.with_target(false).with_ansi(false).finish();
                tracing::subscriber::with_default(subscriber, log);
            }
        }
        let lines = events.lock().unwrap().clone();
        lines
    }

    /// Nothing written is longer than [`super::MAX_WRITTEN`], however much an event grows when
    /// escaped (16 KiB of control bytes are 64 KiB as `\x01`, 96 KiB as `\u0001`): a longer
    /// one journald would cut, and read the rest as an entry of its own, at the priority its
    /// first bytes name. The cut is said at the end of the line.
    #[test]
    fn no_line_written_is_long_enough_for_journald_to_cut() {
        let controls = "\x01".repeat(16 * 1024);
        let not_utf8 = String::from_utf8_lossy(&[0xff; 16 * 1024]).into_owned();
        let c1 = "\u{85}".repeat(16 * 1024);
        for style in [Style::Text, Style::Json] {
            let lines = written_lines(style, || {
                for text in [&controls, &not_utf8, &c1] {
                    tracing::info!(target: "c3::job", stream = "stdout", "{text}<0>forged");
                    tracing::warn!(path = %text, "a warning naming a path");
                }
                tracing::info!("short");
            });
            assert_eq!(lines.len(), 7);
            if style == Style::Json {
                // The failure line naming what the job made unstorable: a list of long
                // paths, shortened, not cut.
                let list = written_lines(style, || {
                    tracing::error!(unstored = ?vec!["a/".repeat(1250); 20], job_id = "j", "the job's output could not be stored whole");
                });
                let text = std::str::from_utf8(&list[0]).unwrap();
                assert!(list[0].len() <= super::MAX_WRITTEN, "{}", list[0].len());
                let event: serde_json::Value = serde_json::from_str(&text[3..]).unwrap();
                assert_eq!(event["job_id"], "j", "{event}");
                assert_eq!(event["level"], "ERROR", "{event}");
                assert!(event["unstored"].is_array(), "{event}");
            }
            for line in &lines {
                let text = std::str::from_utf8(line).unwrap();
                assert!(
                    line.len() <= super::MAX_WRITTEN,
                    "{style:?}: {}",
                    line.len()
                );
                assert!(text.starts_with("<6>"), "{style:?}");
                assert_eq!(text.matches('\n').count(), 1);
            }
            for line in &lines[..6] {
                let text = std::str::from_utf8(line).unwrap();
                if style == Style::Json {
                    // Shortened, not cut: it still parses, its level and fields kept.
                    let event: serde_json::Value =
                        serde_json::from_str(text.strip_prefix("<6>").unwrap()).unwrap();
                    assert!(event["cut_bytes"].as_u64().unwrap() > 0, "{event}");
                    assert!(event["level"].is_string(), "{event}");
                } else {
                    assert!(text.ends_with(" bytes cut)\n"), "{style:?}: {text}");
                }
            }
            let last = String::from_utf8_lossy(&lines[6]);
            assert!(
                last.contains("short") && !last.contains("cut)"),
                "{style:?}: {last}"
            );
        }
    }

    #[test]
    fn a_message_that_looks_like_json_stays_a_string() {
        let forged = r#"{"level":"ERROR","job_id":"other"}"#;
        let lines = json_lines(|| {
            tracing::info!(target: "c3::job", stream = "stdout", "{forged}");
            tracing::info!(command = ?vec!["sh", "-c"], "job launched");
            tracing::info!(path = %"[1,2]", "a file the job named");
        });
        assert_eq!(lines[0]["message"], serde_json::Value::from(forged));
        assert_eq!(lines[0]["level"], "INFO");
        assert!(lines[0].get("job_id").is_none(), "{}", lines[0]);
        // A list field stays a list.
        assert_eq!(lines[1]["command"], serde_json::json!(["sh", "-c"]));
        assert_eq!(lines[2]["path"], "[1,2]");
    }

    #[test]
    fn an_event_is_one_line_whatever_the_job_named_its_files() {
        let forged =
            b"WARN skipping a symlink: artifacts/x\n<3>2026 ERROR forged\r\x1b[2J\x07\tok\n";
        assert_eq!(
            one_line(forged, Style::Text),
            b"WARN skipping a symlink: artifacts/x\\n<3>2026 ERROR forged\\r\\x1b[2J\\x07\tok\n"
        );
        // On a terminal the formatter's own colours stay; other controls are still escaped.
        assert_eq!(
            one_line(b"\x1b[33mWARN\x1b[0m a\nb\n", Style::Terminal),
            b"\x1b[33mWARN\x1b[0m a\\nb\n"
        );
        assert_eq!(one_line(b"plain\n", Style::Text), b"plain\n");
    }

    /// On a terminal, a field's value (a path the job chose) keeps no escape of its own: an
    /// OSC 52 (the operator's clipboard), a cursor move, a concealing colour. The formatter's
    /// own colours, logged with ANSI on, stay.
    #[test]
    fn a_terminal_obeys_only_the_formatters_colours() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_target(false)
            .with_ansi(true)
            .finish();
        let hostile = "a\x1b]52;c;aGk=\x1b\\b\x1b[1Ac\x1b[8md\x1b[2Je";
        tracing::subscriber::with_default(subscriber, || {
            let _span = tracing::info_span!("job", job_id = "j").entered();
            tracing::error!(path = %hostile, "upload failed");
            tracing::warn!(dir = ?hostile, n = 3, "x");
        });
        let raw = buf.0.lock().unwrap().clone();
        let mut obeyed = 0;
        for event in raw.split_inclusive(|b| *b == b'\n') {
            let line = one_line(event, Style::Terminal);
            for (i, _) in line.iter().enumerate().filter(|(_, b)| **b == 0x1b) {
                assert!(
                    is_formatter_colour(line[i + 1..].iter().copied()),
                    "an escape obeyed: {:?}",
                    String::from_utf8_lossy(&line)
                );
                obeyed += 1;
            }
            let text = String::from_utf8_lossy(&line);
            // Shown escaped (by the writer, or by Debug for a `?` field), never dropped.
            assert!(
                text.contains("\\x1b]52;c;aGk=") || text.contains("\\u{1b}]52;c;aGk="),
                "{text:?}"
            );
        }
        assert!(obeyed >= 4, "the formatter's colours went: {obeyed}");
    }

    /// C1 controls (U+009B is CSI to many terminals) and DEL are escaped too, in JSON as
    /// JSON escapes: the line still parses, to the text the job wrote.
    #[test]
    fn c1_controls_and_del_are_escaped_and_json_stays_json() {
        let text = "a\u{9b}2Jb\u{85}c\u{7f}d\u{a0}\u{e9}";
        let lines = json_lines(|| tracing::info!(path = %text, "{text}"));
        let json = format!("{}\n", lines[0]);
        let escaped = one_line(json.as_bytes(), Style::Json);
        let raw = std::str::from_utf8(&escaped).unwrap();
        assert!(!raw.chars().any(|c| c.is_control() && c != '\n'), "{raw:?}");
        assert!(
            raw.contains("a\\u009b2Jb\\u0085c\\u007fd\u{a0}\u{e9}"),
            "{raw}"
        );
        let back: serde_json::Value = serde_json::from_str(raw).unwrap();
        assert_eq!(back["message"], text);
        assert_eq!(back["path"], text);
        // No-break space and other non-controls above U+009F pass as they are.
        assert_eq!(
            one_line("x\u{9b}y\u{a0}\n".as_bytes(), Style::Text),
            "x\\u009by\u{a0}\n".as_bytes()
        );
    }
}
