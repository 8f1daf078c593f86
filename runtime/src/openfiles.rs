//! Which files the job's processes hold open for writing, read from `/proc`.
//!
//! inotify tells us *which* files changed; this tells us whether the writer is done,
//! whatever way the file was found (an event, a rescan after overflow, a poll).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;

/// `(dev, ino)` of every regular file open with O_WRONLY or O_RDWR by a process of `session`.
pub fn written_by_session(session: i32) -> HashSet<(u64, u64)> {
    let mut open = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return open;
    };
    for entry in procs.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if session_of(pid) != Some(session) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let fd_name = fd.file_name();
            let Some(fd_num) = fd_name.to_str() else {
                continue;
            };
            if !opened_for_write(pid, fd_num) {
                continue;
            }
            // metadata() follows the magic link to the open file itself, even if renamed or deleted.
            if let Ok(meta) = std::fs::metadata(fd.path()) {
                if meta.is_file() {
                    open.insert((meta.dev(), meta.ino()));
                }
            }
        }
    }
    open
}

/// The session id (field 6 of `/proc/<pid>/stat`; the command name may contain spaces or parens).
fn session_of(pid: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_comm = &stat[stat.rfind(')')? + 1..];
    // state ppid pgrp session
    after_comm.split_whitespace().nth(3)?.parse().ok()
}

fn opened_for_write(pid: &str, fd: &str) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_own_writable_file_but_not_readonly() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        let r = dir.path().join("r");
        std::fs::write(&r, "x").unwrap();
        let _writer = std::fs::File::create(&w).unwrap();
        let _reader = std::fs::File::open(&r).unwrap();
        let session = nix::unistd::getsid(None).unwrap().as_raw();
        let open = written_by_session(session);
        let id = |p: &std::path::Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        assert!(open.contains(&id(&w)));
        assert!(!open.contains(&id(&r)));
    }
}
