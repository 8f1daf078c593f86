//! docs/logs.md against the code: operators match its messages exactly (`jq 'select(.message ==
//! ...)'`), so a message the code no longer logs word for word is a filter that silently matches
//! nothing.

use std::path::{Path, PathBuf};

/// Pieces shorter than this are too common ("job finished", "files,") to tell a stale message.
const CHECKED_LEN: usize = 12;

/// Words of a message that stand for a value, not for its text.
const PLACEHOLDERS: &[&str] = &["N", "M", "J", "KEY", "MESSAGE"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The code spans of a markdown cell: `a`, or `` a `b` c `` (a run of backticks closes only on
/// a run of the same length; one space inside each end is padding).
fn code_spans(cell: &str) -> Vec<String> {
    let mut spans = Vec::new();
    let mut rest = cell;
    while let Some(open) = rest.find('`') {
        let ticks = rest[open..].chars().take_while(|&c| c == '`').count();
        let body = &rest[open + ticks..];
        let fence = "`".repeat(ticks);
        let mut from = 0;
        let close = loop {
            let Some(at) = body[from..].find(&fence) else {
                break None;
            };
            let at = from + at;
            let run = body[at..].chars().take_while(|&c| c == '`').count();
            if run == ticks {
                break Some(at);
            }
            from = at + run;
        };
        let Some(close) = close else {
            break;
        };
        let text = &body[..close];
        let text = match text.strip_prefix(' ').and_then(|t| t.strip_suffix(' ')) {
            Some(t) if ticks > 1 => t,
            _ => text,
        };
        spans.push(text.to_string());
        rest = &body[close + ticks..];
    }
    spans
}

/// The literal runs of a documented message: split at `...`, `<...>`, the capitalized
/// placeholders, `$VAR` and example numbers (`3/10`, `1.2`).
fn literal_pieces(message: &str) -> Vec<String> {
    let mut cut = String::new();
    let mut angle = false;
    for c in message.chars() {
        match c {
            '<' => angle = true,
            '>' if angle => {
                angle = false;
                cut.push('\0');
            }
            _ if angle => {}
            _ => cut.push(c),
        }
    }
    let cut = cut.replace("...", "\0");
    let mut pieces = Vec::new();
    for chunk in cut.split('\0') {
        let mut piece: Vec<&str> = Vec::new();
        for word in chunk.split(' ') {
            let core = word.trim_matches(|c: char| !c.is_alphanumeric() && c != '$');
            let placeholder = PLACEHOLDERS.contains(&core)
                || core.starts_with('$')
                || core.starts_with(|c: char| c.is_ascii_digit());
            if placeholder {
                pieces.push(piece.join(" "));
                piece.clear();
            } else {
                piece.push(word);
            }
        }
        pieces.push(piece.join(" "));
    }
    pieces
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| p.len() >= CHECKED_LEN)
        .collect()
}

/// The source the way it logs: string continuations joined, escaped quotes unescaped.
fn source_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let mut lines = text.split('\n');
                if let Some(first) = lines.next() {
                    out.push_str(first);
                }
                for line in lines {
                    match out.strip_suffix('\\') {
                        Some(joined) => {
                            out.truncate(joined.len());
                            out.push_str(line.trim_start());
                        }
                        None => {
                            out.push('\n');
                            out.push_str(line);
                        }
                    }
                }
                out.push('\n');
            }
        }
    }
    let mut out = String::new();
    for krate in ["runtime/src", "agent/src", "proto/src"] {
        walk(&repo().join(krate), &mut out);
    }
    out.replace("\\\"", "\"")
}

/// The message column of every table row of the log reference.
fn documented_messages(doc: &str) -> Vec<String> {
    let mut messages = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with('|')) {
        let Some(cell) = line.split('|').nth(2) else {
            continue;
        };
        messages.extend(code_spans(cell));
    }
    messages
}

#[test]
fn the_log_reference_quotes_messages_the_code_logs() {
    let doc = std::fs::read_to_string(repo().join("docs/logs.md")).unwrap();
    let messages = documented_messages(&doc);
    assert!(
        messages.len() > 50,
        "the tables were not read: {messages:?}"
    );
    let source = source_text();
    let stale: Vec<String> = messages
        .iter()
        .flat_map(|m| {
            literal_pieces(m)
                .into_iter()
                .filter(|p| !source.contains(p.as_str()))
                .map(move |p| format!("{p:?} (of `{m}`)"))
        })
        .collect();
    assert!(
        stale.is_empty(),
        "docs/logs.md quotes text no .rs file has:\n{}",
        stale.join("\n")
    );
}

#[test]
fn pieces_split_at_placeholders() {
    assert_eq!(
        literal_pieces("live sync: 3/10 files, 1.2 GiB left, 85.3 MiB/s, ETA 15 s"),
        Vec::<String>::new()
    );
    assert_eq!(
        literal_pieces("storage usage N bytes is over the quota of M bytes (soft limit)"),
        [
            "storage usage",
            "bytes is over the quota of",
            "bytes (soft limit)"
        ]
    );
    assert_eq!(
        literal_pieces("`KEY` is N from $VAR, over the config file's M"),
        ["over the config file's"]
    );
    assert_eq!(
        literal_pieces("[stdout] <the job's line> and a long tail ... `c3-agent recover` ends"),
        ["and a long tail", "`c3-agent recover` ends"]
    );
    assert_eq!(code_spans(" `a` / `b` "), ["a", "b"]);
    assert_eq!(code_spans(" `` `KEY` is N `` "), ["`KEY` is N"]);
}
