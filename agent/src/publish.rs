//! `c3-agent publish`: the client side of the job's agent socket (contract §4), run inside
//! the job. Synchronous and small: it sends one JSON line per request and waits for the
//! agent's answer, which comes only once the files are stored (or the store gave up).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use c3_proto::socket::{MAX_LINE, MAX_PATHS};
use c3_proto::{SocketReply, SocketRequest};

pub fn client(wait_all: bool, paths: &[PathBuf]) -> ExitCode {
    if paths.is_empty() && !wait_all {
        return fail("publish needs PATH... or --wait-all", 2);
    }
    let Some(socket) = std::env::var_os("C3_AGENT_SOCKET").filter(|s| !s.is_empty()) else {
        return fail(
            "not inside a c3 job: C3_AGENT_SOCKET is not set (c3-agent publish talks to the agent running the job)",
            2,
        );
    };
    let stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            return fail(
                &format!(
                    "cannot reach the agent at {}: {e}",
                    PathBuf::from(socket).display()
                ),
                1,
            )
        }
    };
    let mut requests = Vec::new();
    if !paths.is_empty() {
        // Absolute, but not resolved: a symlink on the way must reach the agent as one.
        let mut absolute = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for p in paths {
            let a = match std::path::absolute(p) {
                Ok(a) => without_dotdot_through_dirs(&a),
                Err(e) => return fail(&format!("{}: {e}", p.display()), 1),
            };
            // A request names paths as text: a lossy spelling (`\xff.pt` as `\u{FFFD}.pt`)
            // named another file, which was stored and said published.
            let Some(text) = a.to_str() else {
                return fail(
                    &format!(
                        "{}: the path is not UTF-8, and publish names paths as text; `c3-agent publish --wait-all` stores such names",
                        a.display()
                    ),
                    2,
                );
            };
            // Each once: the agent reads a path named twice once anyway, and the batches
            // would each say it published it.
            if seen.insert(text.to_string()) {
                absolute.push(text.to_string());
            }
        }
        requests.extend(
            batches(absolute)
                .into_iter()
                .map(|paths| SocketRequest::Publish { paths }),
        );
    }
    if wait_all {
        requests.push(SocketRequest::WaitAll);
    }
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(e) => return fail(&format!("socket: {e}"), 1),
    };
    let mut writer = stream;
    for request in requests {
        let sent = writer.write_all(&request.to_line());
        // A refusal the agent wrote before it closed (its reason) is read even when the
        // write broke on it: "Broken pipe" alone said nothing.
        let mut line = Vec::new();
        match (reader.read_until(b'\n', &mut line), sent) {
            (Ok(n), _) if n > 0 => {}
            (_, Err(e)) => return fail(&format!("cannot talk to the agent: {e}"), 1),
            (Ok(_), Ok(())) => {
                return fail("the agent closed the connection (the job is ending?)", 1)
            }
            (Err(e), Ok(())) => return fail(&format!("cannot read the agent's answer: {e}"), 1),
        }
        let reply = match SocketReply::from_line(&line) {
            Ok(r) => r,
            Err(e) => return fail(&format!("the agent's answer is not understood: {e}"), 1),
        };
        if !reply.ok {
            return fail(reply.error.as_deref().unwrap_or("refused"), 1);
        }
        let mut out = std::io::stdout().lock();
        for f in &reply.files {
            let _ = writeln!(
                out,
                "published {} ({} bytes, sha256 {})",
                f.path, f.size, f.sha256
            );
        }
        if request == SocketRequest::WaitAll {
            let _ = writeln!(out, "everything pending is stored");
        }
    }
    ExitCode::SUCCESS
}

/// `path` with each `dir/..` taken out where `dir` is a real directory (not a symlink), as
/// the kernel would resolve it: `c3-agent publish ../best.pt` from `artifacts/run1` named
/// `.../artifacts/run1/../best.pt`, which the agent refuses (it takes no `..`). A `..` after
/// a symlink stays, and the agent refuses it.
fn without_dotdot_through_dirs(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir
                if std::fs::symlink_metadata(&out).is_ok_and(|m| m.is_dir())
                    && matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Requests of at most [`MAX_PATHS`] paths and [`MAX_LINE`] bytes each, in order:
/// `c3-agent publish artifacts/*` over a thousand files was refused, and a list over a MiB
/// cut off.
fn batches(paths: Vec<String>) -> Vec<Vec<String>> {
    // `{"op":"publish","paths":[...]}` and the newline, with room to spare.
    const ROOM: u64 = MAX_LINE - 64;
    let mut out: Vec<Vec<String>> = Vec::new();
    let mut bytes = 0u64;
    for p in paths {
        let size = serde_json::to_string(&p).map_or(0, |s| s.len() as u64) + 1;
        match out.last_mut() {
            Some(batch) if batch.len() < MAX_PATHS && bytes + size <= ROOM => {
                batch.push(p);
                bytes += size;
            }
            _ => {
                out.push(vec![p]);
                bytes = size;
            }
        }
    }
    out
}

fn fail(message: &str, code: u8) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "c3-agent publish: {message}");
    ExitCode::from(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batch fits one request line and the agent's count of paths, in order.
    #[test]
    fn batches_fit_the_agents_limits() {
        let short: Vec<String> = (0..2500).map(|i| format!("/w/artifacts/f{i}")).collect();
        let sizes: Vec<usize> = batches(short.clone()).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![1000, 1000, 500]);
        let long: Vec<String> = (0..900)
            .map(|i| format!("/w/{i:04}/{}", "x".repeat(4000)))
            .collect();
        let split = batches(long.clone());
        assert!(split.len() > 1);
        for batch in &split {
            let line = SocketRequest::Publish {
                paths: batch.clone(),
            }
            .to_line();
            assert!(line.len() as u64 <= MAX_LINE + 1, "{}", line.len());
        }
        assert_eq!(split.concat(), long);
    }
}
