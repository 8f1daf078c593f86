//! Hostile tests: the agent runs as root, the job it runs (as `nobody` or a test user) is an
//! adversary. Each test plants something (symlinks, escaping processes, huge files, lying
//! manifests, huge control-plane replies) and checks that root's files, other processes and the
//! agent's memory come through untouched. Every test needs root; as another user it says so
//! and passes without checking anything.

// Tests fail by panicking: unwrap is the assertion.
#![allow(clippy::unwrap_used)]

#[path = "../e2e/support.rs"]
mod support;

mod corpus;
mod escapes;
mod exclusive;
mod groups;
mod links;
mod logs;
mod memory;
mod mounts;
mod ownership;
mod paths;
mod privacy;
mod pull_lies;
mod recover;
mod socket;
mod stuck;
mod symlinks;
mod watches;

/// Shared helpers for the hostile tests.
mod common {
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::process::Child;
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use crate::support::{chmod, Harness, Run};

    /// Mounts a FUSE file system served through a fresh `/dev/fuse` fd at `at`, as
    /// `fusermount` would for `uid` (group the same) with `allow_other`; `rootmode` is the
    /// root's type and mode, octal (`40755` a directory, `100644` a file). The fd, or `None`
    /// where the node cannot (no `/dev/fuse`, not root).
    pub fn mount_fuse(at: &Path, rootmode: &str, uid: u32) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsRawFd;
        use std::os::unix::ffi::OsStrExt;
        let dev: std::os::fd::OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .ok()?
            .into();
        let opts = std::ffi::CString::new(format!(
            "fd={},rootmode={rootmode},user_id={uid},group_id={uid},allow_other",
            dev.as_raw_fd()
        ))
        .unwrap();
        let target = std::ffi::CString::new(at.as_os_str().as_bytes()).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"c3test".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        (rc == 0).then_some(dev)
    }

    /// True (and says so) when the test cannot run: it needs root to switch users.
    pub fn not_root() -> bool {
        if nix::unistd::geteuid().is_root() {
            return false;
        }
        crate::support::skip("needs root (the agent switches to the job user)");
        true
    }

    /// A harness whose temp dir the job user can traverse (a real workdir's parents are 0755).
    pub fn open_harness() -> Harness {
        let h = Harness::file();
        chmod(h.dir.path(), 0o755);
        h
    }

    pub fn uid_of(user: &str) -> u32 {
        nix::unistd::User::from_name(user)
            .unwrap()
            .unwrap_or_else(|| panic!("no user {user}"))
            .uid
            .as_raw()
    }

    pub fn nobody() -> u32 {
        uid_of("nobody")
    }

    /// `h.path("victim")`: a root-owned 0755 directory holding `file` ("original\n").
    pub fn victim(h: &Harness) -> PathBuf {
        let v = h.path("victim");
        std::fs::create_dir(&v).unwrap();
        chmod(&v, 0o755);
        std::fs::write(v.join("file"), "original\n").unwrap();
        chmod(v.join("file"), 0o644);
        v
    }

    /// Everything under `dir` (not following symlinks): relative path, kind, owner, mode, bytes.
    pub fn snapshot(dir: &Path) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>, budget: &mut usize) {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            entries.sort();
            for p in entries {
                *budget = budget.checked_sub(1).expect("snapshot: too many entries");
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(root).unwrap().display().to_string();
                let what = if m.file_type().is_symlink() {
                    format!("link->{}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_file() {
                    format!("file {:?}", std::fs::read(&p).unwrap())
                } else if m.is_dir() {
                    "dir".to_string()
                } else {
                    "other".to_string()
                };
                out.push(format!(
                    "{rel}: {what} uid={} gid={} mode={:o}",
                    m.uid(),
                    m.gid(),
                    m.mode()
                ));
                if m.is_dir() {
                    walk(root, &p, out, budget);
                }
            }
        }
        let m = std::fs::symlink_metadata(dir).unwrap();
        let mut out = vec![format!(
            ".: uid={} gid={} mode={:o}",
            m.uid(),
            m.gid(),
            m.mode()
        )];
        let mut budget = 10_000;
        walk(dir, dir, &mut out, &mut budget);
        out
    }

    /// Spawns `run --job` for `spec` (workdir defaults as in `Harness::spec`).
    pub fn spawn_job(h: &Harness, spec: Value) -> Child {
        let path = h.spec(spec);
        h.spawn(&["run", "--job", path.to_str().unwrap()])
    }

    /// Waits for an agent at most `limit`; a run that needs longer is a hang: it is killed and
    /// the test fails, showing its output.
    pub fn wait_within(what: &str, mut child: Child, limit: Duration) -> Run {
        let deadline = Instant::now() + limit;
        let mut hung = false;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                hung = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().unwrap();
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            what: what.to_string(),
        };
        assert!(
            !hung,
            "{what} did not finish within {limit:?} (killed)\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        );
        run
    }

    /// Reads a pid a job wrote to a file, waiting for it at most 20 s.
    pub fn pid_from(path: &Path) -> i32 {
        crate::support::wait_for(
            &format!("a pid in {}", path.display()),
            Duration::from_secs(20),
            || {
                std::fs::read_to_string(path)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
            },
        )
    }

    /// SIGKILLs `pid` when dropped, so that a failed test leaves no stray process behind.
    pub struct KillOnDrop(pub i32);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// The number of inotify watches `pid` holds: `inotify wd:` lines in the fdinfo of each of
    /// its inotify descriptors. 0 when the process is gone.
    pub fn inotify_watches(pid: u32) -> usize {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return 0;
        };
        let mut watches = 0;
        for fd in fds.flatten().take(100_000) {
            let is_inotify = std::fs::read_link(fd.path())
                .map(|t| t.to_string_lossy() == "anon_inode:inotify")
                .unwrap_or(false);
            if !is_inotify {
                continue;
            }
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            watches += info
                .lines()
                .filter(|l| l.starts_with("inotify wd:"))
                .count();
        }
        watches
    }

    /// Polls `inotify_watches` every 20 ms until the agent exits (at most `limit`), and returns
    /// the highest count seen with the finished run.
    pub fn watch_peak_until_exit(what: &str, mut child: Child, limit: Duration) -> (usize, Run) {
        let pid = child.id();
        let deadline = Instant::now() + limit;
        let mut peak = 0;
        while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            peak = peak.max(inotify_watches(pid));
            std::thread::sleep(Duration::from_millis(20));
        }
        (peak, wait_within(what, child, Duration::from_secs(1)))
    }

    /// Files (not directories) under `dir`, recursively, with their sizes (symlinks not followed).
    pub fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        let mut budget = 100_000usize;
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                budget = budget
                    .checked_sub(1)
                    .expect("files_under: too many entries");
                let m = std::fs::symlink_metadata(e.path()).unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    out.push((e.path(), m.len()));
                }
            }
        }
        out.sort();
        out
    }

    pub fn owner(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .uid()
    }

    pub fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .mode()
            & 0o7777
    }
}
