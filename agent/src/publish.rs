//! `c3-agent publish`: the client side of the job's agent socket (contract §4), run inside
//! the job. Synchronous and small: it sends one JSON line per request and waits for the
//! agent's answer, which comes only once the files are stored (or the store gave up).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

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
        for p in paths {
            let a = match std::path::absolute(p) {
                Ok(a) => a,
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
            absolute.push(text.to_string());
        }
        requests.push(SocketRequest::Publish { paths: absolute });
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
        if let Err(e) = writer.write_all(&request.to_line()) {
            return fail(&format!("cannot talk to the agent: {e}"), 1);
        }
        let mut line = Vec::new();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return fail("the agent closed the connection (the job is ending?)", 1),
            Ok(_) => {}
            Err(e) => return fail(&format!("cannot read the agent's answer: {e}"), 1),
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

fn fail(message: &str, code: u8) -> ExitCode {
    let _ = writeln!(std::io::stderr().lock(), "c3-agent publish: {message}");
    ExitCode::from(code)
}
