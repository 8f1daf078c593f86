//! What the agent prints for people and scripts: results on stdout, errors on stderr. With
//! `C3_AGENT_LOG_FORMAT=json` every line on both streams is one JSON object, like the log,
//! so `journalctl -o cat | jq` and `c3-agent ... | jq` never meet plain text.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static JSON: AtomicBool = AtomicBool::new(false);

/// JSON lines from now on (the log format), or plain text.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

pub fn json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Before the config is read: the environment alone says whether errors must be JSON.
pub fn json_from_env() -> bool {
    std::env::var("C3_AGENT_LOG_FORMAT").is_ok_and(|v| v.trim().eq_ignore_ascii_case("json"))
}

/// A line on stdout; a closed stdout (`| head -1`, a reader gone) is not the agent's failure.
/// Returns false once stdout is gone.
pub fn say(line: &str) -> bool {
    writeln!(std::io::stdout().lock(), "{line}").is_ok()
}

/// JSON text (serde_json's) on stdout, with DEL and the C1 controls written as JSON escapes:
/// serde_json writes them raw, and a job's file name or result holding `\u{9b}2J` or an OSC 52
/// sequence reached the operator's terminal from `ls --json` or `status --json` as one. They
/// occur only inside strings there, where the escape means the same.
pub fn say_json(text: &str) -> bool {
    say(&json_safe(text))
}

fn json_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)) {
        return text.into();
    }
    text.chars()
        .map(|c| match c {
            '\u{7f}'..='\u{9f}' => format!("\\u{:04x}", c as u32),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// One result: `human` as text, or `json` as one JSON line ([`summary`]: the last word of
/// a command that a unit or a timer runs).
pub fn result(human: &str, json: serde_json::Value) -> bool {
    if self::json() {
        summary(json_safe(&json.to_string()).into_owned())
    } else {
        summary(human.to_string())
    }
}

/// How long a command's summary line may wait on stdout.
const SUMMARY_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Set once a summary line was given up on: its writer holds stdout, and the next would
/// wait out its own [`SUMMARY_WAIT`] behind it.
static STALLED: AtomicBool = AtomicBool::new(false);

/// A command's summary line on stdout, given up on after [`SUMMARY_WAIT`]: under systemd
/// stdout is journald's stream socket, and a stalled journal held the agent in a blocking
/// write after the job was done and reported, until the stop timeout's SIGKILL made its
/// exit status 9/KILL instead of the job's code (which schedulers read). The line is
/// written from a thread of its own that the process does not wait for at exit.
pub fn summary(line: String) -> bool {
    if STALLED.load(Ordering::Relaxed) {
        return false;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::Builder::new()
        .name("summary".into())
        .spawn(move || {
            let _ = tx.send(say(&line));
        });
    if writer.is_err() {
        return false;
    }
    match rx.recv_timeout(SUMMARY_WAIT) {
        Ok(said) => said,
        Err(_) => {
            STALLED.store(true, Ordering::Relaxed);
            note(&format!(
                "stdout did not take the summary line within {} s (a stalled journal?); exiting without it",
                SUMMARY_WAIT.as_secs()
            ));
            false
        }
    }
}

/// A problem on stderr: `c3-agent: ...`, or `{"level":"ERROR","message":...}`.
pub fn error(message: &str) {
    to_stderr(tracing::Level::ERROR, "", message);
}

/// A note on stderr (not an error): `c3-agent: note: ...`, or a WARN JSON line.
pub fn note(message: &str) {
    to_stderr(tracing::Level::WARN, "note: ", message);
}

/// One line, whatever `message` holds, with its priority in front under journald
/// ([`crate::telemetry::stderr_line`]).
fn to_stderr(level: tracing::Level, prefix: &str, message: &str) {
    use crate::telemetry::Style;
    let (line, style) = if json() {
        let line = serde_json::json!({
            "timestamp": c3_runtime::display::now_rfc3339(),
            "level": level.as_str(),
            "target": "c3_agent",
            "message": message,
        })
        .to_string();
        (line, Style::Json)
    } else {
        (format!("c3-agent: {prefix}{message}"), Style::Text)
    };
    // Behind the log lines already queued, never before them.
    crate::logwriter::send(crate::telemetry::stderr_line(&level, &line, style));
}

/// A job's log bytes on their way to stdout. To a terminal (an operator's, often root's),
/// escape sequences the job printed are shown, not obeyed: OSC 52 writes the clipboard, others
/// make the terminal answer as if typed. Control bytes other than `\n`, `\t`, `\r` (a progress
/// bar's), C1 controls in UTF-8 and every byte that is not UTF-8 become `\xNN`: a lone 0x9B
/// is CSI to a terminal in an 8-bit locale. To a pipe or file the bytes pass as they are.
pub struct JobBytes {
    terminal: bool,
    /// The start of a character the last chunk ended inside, held to see how it goes on.
    carry: Vec<u8>,
}

impl JobBytes {
    pub fn for_stdout() -> Self {
        use std::io::IsTerminal;
        JobBytes {
            terminal: std::io::stdout().is_terminal(),
            carry: Vec::new(),
        }
    }

    /// Writes `chunk`, escaped when stdout is a terminal; false once stdout is gone.
    pub fn write(&mut self, out: &mut impl Write, chunk: &[u8]) -> bool {
        if !self.terminal {
            return out.write_all(chunk).is_ok();
        }
        out.write_all(&self.escape(chunk)).is_ok()
    }

    /// The end of the log: the start of a character held back to see what followed it is
    /// shown, escaped (raw, the next output's first byte could complete a C1 control).
    pub fn finish(&mut self, out: &mut impl Write) {
        let mut shown = Vec::new();
        for b in std::mem::take(&mut self.carry) {
            shown.extend_from_slice(format!("\\x{b:02x}").as_bytes());
        }
        let _ = out.write_all(&shown);
    }

    fn escape(&mut self, chunk: &[u8]) -> Vec<u8> {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(chunk);
        let mut shown = Vec::with_capacity(bytes.len());
        let mut parts = bytes.utf8_chunks().peekable();
        while let Some(part) = parts.next() {
            for c in part.valid().chars() {
                match c {
                    '\n' | '\t' | '\r' => shown.push(c as u8),
                    '\0'..='\x1f' | '\x7f' => {
                        shown.extend_from_slice(format!("\\x{:02x}", c as u32).as_bytes())
                    }
                    '\u{80}'..='\u{9f}' => {
                        shown.extend_from_slice(format!("\\xc2\\x{:02x}", c as u32).as_bytes())
                    }
                    _ => shown.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            let invalid = part.invalid();
            let unfinished = parts.peek().is_none()
                && matches!(std::str::from_utf8(invalid), Err(e) if e.error_len().is_none());
            if unfinished {
                self.carry = invalid.to_vec();
            } else {
                for b in invalid {
                    shown.extend_from_slice(format!("\\x{b:02x}").as_bytes());
                }
            }
        }
        shown
    }
}

#[cfg(test)]
mod tests {
    /// A job's C1 controls (CSI, OSC) and DEL leave as JSON escapes, and the text still
    /// parses to the same value.
    #[test]
    fn json_text_carries_no_terminal_controls() {
        let value = serde_json::json!({"path": "artifacts/\u{9b}2J\u{9d}52;c;eA==\u{9c}\u{7f}é"});
        let text = super::json_safe(&serde_json::to_string_pretty(&value).unwrap()).into_owned();
        assert!(
            !text.chars().any(|c| ('\u{7f}'..='\u{9f}').contains(&c)),
            "{text:?}"
        );
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&text).unwrap(),
            value
        );
    }

    use super::*;

    #[test]
    fn a_terminal_sees_escape_sequences_shown_not_obeyed() {
        let mut t = JobBytes {
            terminal: true,
            carry: Vec::new(),
        };
        let mut out = Vec::new();
        assert!(t.write(&mut out, b"ok\t1\r\n\x1b]52;c;aGk=\x07caf\xc3\xa9 \xc2"));
        assert!(t.write(&mut out, b"\x9b2J\xc2\xa0end\n"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ok\t1\r\n\\x1b]52;c;aGk=\\x07caf\u{e9} \\xc2\\x9b2J\u{a0}end\n"
        );
        let mut out = Vec::new();
        assert!(t.write(&mut out, b"a\xc2"));
        t.finish(&mut out);
        assert_eq!(out, b"a\\xc2", "the last byte was lost");
        // Bytes that are not UTF-8 are shown as `\xNN`: a lone 0x9B is CSI to a terminal in
        // an 8-bit locale. A character split across chunks is whole again.
        let mut out = Vec::new();
        assert!(t.write(&mut out, b"\x9b2J\x9d52;c;aGk=\x9c|\xe2\x82"));
        assert!(t.write(&mut out, b"\xac\xff\n"));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\\x9b2J\\x9d52;c;aGk=\\x9c|\u{20ac}\\xff\n"
        );
        let mut pipe = JobBytes {
            terminal: false,
            carry: Vec::new(),
        };
        let mut raw = Vec::new();
        assert!(pipe.write(&mut raw, b"\x1b[31m"));
        assert_eq!(raw, b"\x1b[31m");
    }
}
