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

/// The string literals of a Rust file as the program sees them (escapes undone, `\`-newline
/// continuations joined), one a line: comments are left out, so a message only a comment or a
/// doc line still quotes counts as gone. Raw strings, byte strings, char literals (`'"'`) and
/// lifetimes are told apart so that none opens a literal that is not one.
fn string_literals(text: &str) -> Vec<String> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '/' if c.get(i + 1) == Some(&'/') => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            '/' if c.get(i + 1) == Some(&'*') => {
                // Block comments nest.
                let mut depth = 0;
                while i < c.len() {
                    if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                        depth += 1;
                        i += 2;
                    } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            '\'' => {
                i += match (c.get(i + 1), c.get(i + 2)) {
                    // '\'' or '\n': past the escaped char, then to the closing quote.
                    (Some('\\'), _) => {
                        let mut j = i + 3;
                        while j < c.len() && c[j] != '\'' {
                            j += 1;
                        }
                        j + 1 - i
                    }
                    (Some(_), Some('\'')) => 3,
                    // A lifetime or a label.
                    _ => 1,
                };
            }
            '"' => {
                let (literal, next) = cooked(&c, i + 1);
                out.push(literal);
                i = next;
            }
            ch if ch.is_alphabetic() || ch == '_' => {
                let from = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                    i += 1;
                }
                let word: String = c[from..i].iter().collect();
                let raw = matches!(word.as_str(), "r" | "br" | "cr");
                if raw && matches!(c.get(i), Some('"' | '#')) {
                    let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
                    if c.get(i + hashes) == Some(&'"') {
                        let body = i + hashes + 1;
                        let mut j = body;
                        while j < c.len()
                            && !(c[j] == '"'
                                && c[j + 1..].iter().take_while(|&&h| h == '#').count() >= hashes)
                        {
                            j += 1;
                        }
                        out.push(c[body..j.min(c.len())].iter().collect());
                        i = j + 1 + hashes;
                    }
                }
            }
            _ => i += 1,
        }
    }
    out
}

/// The text of a `"..."` literal whose body starts at `from`, escapes undone, and the index
/// past its closing quote.
fn cooked(c: &[char], from: usize) -> (String, usize) {
    let mut text = String::new();
    let mut i = from;
    while i < c.len() && c[i] != '"' {
        if c[i] != '\\' {
            text.push(c[i]);
            i += 1;
            continue;
        }
        i += 1;
        match c.get(i) {
            Some('\n') => {
                while i < c.len() && c[i].is_whitespace() {
                    i += 1;
                }
                continue;
            }
            Some('n') => text.push('\n'),
            Some('t') => text.push('\t'),
            Some(&other) => text.push(other),
            None => {}
        }
        i += 1;
    }
    (text, i + 1)
}

/// Every string literal of the crates' sources, one a line.
fn source_text() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                for literal in string_literals(&std::fs::read_to_string(&path).unwrap()) {
                    out.push_str(&literal);
                    out.push('\n');
                }
            }
        }
    }
    let mut out = String::new();
    for krate in ["runtime/src", "agent/src", "proto/src"] {
        walk(&repo().join(krate), &mut out);
    }
    out
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
    let pieces: Vec<(&String, String)> = messages
        .iter()
        .flat_map(|m| literal_pieces(m).into_iter().map(move |p| (m, p)))
        .collect();
    // Too few and the test passes while checking next to nothing (a table format that
    // changed, a split that drops every piece).
    assert!(
        pieces.len() > 50,
        "only {} pieces checked: {pieces:?}",
        pieces.len()
    );
    let stale: Vec<String> = pieces
        .iter()
        .filter(|(_, p)| !source.contains(p.as_str()))
        .map(|(m, p)| format!("{p:?} (of `{m}`)"))
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

#[test]
fn only_string_literals_outside_comments_are_searched() {
    let text = r##"
        // "in a line comment"
        /* "in a /* nested */ block" */
        /// "in a doc comment"
        fn f<'a>(x: &'a str) -> char {
            info!(url = "http://host/x", "it's \"quoted\" \
                   and joined");
            let _ = (r#"raw "inner" text"#, b"bytes", '"', '\'', 'x');
            '"'
        }
    "##;
    assert_eq!(
        string_literals(text),
        [
            "http://host/x",
            "it's \"quoted\" and joined",
            "raw \"inner\" text",
            "bytes"
        ]
    );
}
