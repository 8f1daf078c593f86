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

/// One result: `human` as text, or `json` as one JSON line.
pub fn result(human: &str, json: serde_json::Value) -> bool {
    if self::json() {
        say(&json.to_string())
    } else {
        say(human)
    }
}

/// A problem on stderr: `c3-agent: ...`, or `{"level":"ERROR","message":...}`.
pub fn error(message: &str) {
    to_stderr("ERROR", "", message);
}

/// A note on stderr (not an error): `c3-agent: note: ...`, or a WARN JSON line.
pub fn note(message: &str) {
    to_stderr("WARN", "note: ", message);
}

fn to_stderr(level: &str, prefix: &str, message: &str) {
    let line = if json() {
        serde_json::json!({
            "timestamp": c3_runtime::display::now_rfc3339(),
            "level": level,
            "target": "c3_agent",
            "message": message,
        })
        .to_string()
    } else {
        format!("c3-agent: {prefix}{message}")
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}
