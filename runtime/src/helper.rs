//! Processes the agent runs for itself (`squeue`, `systemctl`): children of the agent like
//! the job's orphans, which the orphan reaper must leave to their own wait and a stop must
//! not take for the job's.
//!
//! A helper's spawn returns only once its `execve` has, and an exec of a program on a hung
//! network mount (or a PATH search through one) never does: nothing is held across it. The
//! child names its pid on a pipe before its exec; it is a known helper from then on, and
//! killed by that pid when the whole ask runs past its time. Until it has named itself, a
//! spawn is counted as pending: the reaper reaps nothing and a look at the job's processes
//! waits for it (a few syscalls), as neither can tell it from an orphan of the job's.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;

/// The agent's helpers, as the reaper and the looks at the job's processes see them.
#[derive(Debug, Default)]
pub(crate) struct Helpers {
    /// Helpers that named their pid and are not reaped yet: written by [`Spawn`].
    pids: BTreeSet<i32>,
    /// Spawns that may have forked a child that has not named its pid yet.
    pending: usize,
}

impl Helpers {
    pub(crate) fn contains(&self, pid: &i32) -> bool {
        self.pids.contains(pid)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &i32> {
        self.pids.iter()
    }

    /// Whether a child of the agent may be a helper not yet known as one.
    pub(crate) fn pending(&self) -> bool {
        self.pending > 0
    }
}

static HELPERS: Mutex<Helpers> = Mutex::new(Helpers {
    pids: BTreeSet::new(),
    pending: 0,
});

/// Told whenever no spawn is pending any more.
static SETTLED: Condvar = Condvar::new();

/// How long a look at the job's processes waits for a pending spawn to name its child:
/// the child does that first of all, so only a machine frozen for as long misses it.
const SETTLE_WITHIN: Duration = Duration::from_millis(200);

/// The helpers as they are now, pending spawns or not: for the reaper, which does not wait.
pub(crate) fn helpers() -> MutexGuard<'static, Helpers> {
    HELPERS.lock().unwrap_or_else(|p| p.into_inner())
}

/// The helpers once no spawn is pending (or [`SETTLE_WITHIN`] has passed): every helper
/// forked before the call is known by then. Blocking: call it off the reactor.
pub(crate) fn settled_helpers() -> MutexGuard<'static, Helpers> {
    let guard = helpers();
    match SETTLED.wait_timeout_while(guard, SETTLE_WITHIN, |h| h.pending > 0) {
        Ok((guard, _)) => guard,
        Err(p) => p.into_inner().0,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("cannot start {program}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read what {program} said")]
    Read {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} did not answer within {within:?}")]
    TimedOut { program: String, within: Duration },
}

/// One helper from its spawn to its reaping, shared by the thread that spawns and waits for
/// it and the ask that may kill it.
#[derive(Debug, Default)]
struct Spawn {
    /// Set once the spawn no longer counts as pending (its pid known, or no child).
    settled: bool,
    /// The helper's pid, registered in [`HELPERS`] until it is reaped.
    pid: Option<i32>,
    /// Set by the waiting thread just before it reaps: the pid may be another's after.
    reaping: bool,
    /// Set once the ask ended without the answer: a helper that names itself after is
    /// killed at once.
    abandoned: bool,
}

impl Spawn {
    fn pending() -> Arc<Mutex<Spawn>> {
        helpers().pending += 1;
        Arc::new(Mutex::new(Spawn::default()))
    }

    /// The spawn is no longer pending: its child is `pid`, or it has none.
    fn settle(&mut self, pid: Option<i32>) {
        if self.settled {
            return;
        }
        self.settled = true;
        self.pid = pid;
        let mut h = helpers();
        h.pending -= 1;
        if let Some(pid) = pid {
            h.pids.insert(pid);
        }
        if h.pending == 0 {
            SETTLED.notify_all();
        }
        drop(h);
        if self.abandoned {
            self.kill();
        }
    }

    /// SIGKILL to the helper if it is still unreaped (its pid its own).
    fn kill(&self) {
        if let (Some(pid), false) = (self.pid, self.reaping) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    /// The helper is reaped (or was never there): forgotten.
    fn finish(&mut self) {
        self.settle(None);
        if let Some(pid) = self.pid.take() {
            helpers().pids.remove(&pid);
        }
    }
}

impl Drop for Spawn {
    fn drop(&mut self) {
        self.finish();
    }
}

fn lock(spawn: &Mutex<Spawn>) -> MutexGuard<'_, Spawn> {
    spawn.lock().unwrap_or_else(|p| p.into_inner())
}

/// Kills the helper when the ask ends without its answer (timed out, or dropped).
struct KillUnlessAnswered(Arc<Mutex<Spawn>>);

impl Drop for KillUnlessAnswered {
    fn drop(&mut self) {
        let mut spawn = lock(&self.0);
        spawn.abandoned = true;
        spawn.kill();
    }
}

/// Runs `command` as a helper of the agent's and returns what it printed on stdout, all of
/// it within `within`: past that the helper is killed and the ask given up, wherever it
/// is (its exec included). Stdin and stderr are null.
pub async fn ask(mut command: std::process::Command, within: Duration) -> Result<Output, AskError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let start = |source: std::io::Error| AskError::Start {
        program: program.clone(),
        source,
    };
    let deadline = tokio::time::Instant::now() + within;
    // Where the child names its pid before its exec (close-on-exec: execve closes it).
    let (heard, said) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| start(e.into()))?;
    let said_fd = said.as_raw_fd();
    // Decided before the fork: the child may make syscalls only.
    let exec_hangs = crate::fault::armed("helper-exec-hangs");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and makes raw syscalls only
    // (getpid, write, sleep), which are async-signal-safe; it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let pid = libc::getpid().to_ne_bytes();
            libc::write(said_fd, pid.as_ptr().cast(), pid.len());
            if exec_hangs {
                // An exec on a hung mount, for the tests of the bound around it.
                libc::sleep(3600);
            }
            Ok(())
        });
    }
    let spawn = Spawn::pending();
    // Threads of their own, not tokio's blocking pool: one stuck in an exec for good must
    // not hold up the runtime's shutdown. The pid is heard on one while the other is in
    // the spawn, whatever becomes of this ask: a spawn left pending keeps the reaper off.
    let listener = spawn.clone();
    std::thread::Builder::new()
        .name("c3-helper-pid".into())
        .spawn(move || {
            if let Some(pid) = read_pid(&heard) {
                lock(&listener).settle(Some(pid));
            }
        })
        .map_err(start)?;
    let killer = KillUnlessAnswered(spawn.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let waiter = spawn.clone();
    std::thread::Builder::new()
        .name("c3-helper".into())
        .spawn(move || {
            let spawned = command.spawn();
            // The child has its own copy until execve (or its end): the pipe ends then.
            drop(said);
            let answer = spawned.map(|mut child| {
                lock(&waiter).settle(Some(child.id() as i32));
                answer_of(&mut child, &waiter)
            });
            lock(&waiter).finish();
            let _ = tx.send(answer);
        })
        .map_err(start)?;
    let timed_out = || AskError::TimedOut {
        program: program.clone(),
        within,
    };
    let answer = match tokio::time::timeout_at(deadline, rx).await {
        Ok(Ok(answer)) => answer,
        // The thread ended without a word: it panicked.
        Ok(Err(_)) => Err(std::io::Error::other("the helper's thread ended")),
        Err(_) => return Err(timed_out()),
    };
    drop(killer);
    let (status, stdout, read) = answer.map_err(start)?;
    let unread = |source| AskError::Read {
        program: program.clone(),
        source,
    };
    read.map_err(unread)?;
    let status = status.map_err(unread)?;
    Ok(Output {
        status,
        stdout,
        stderr: Vec::new(),
    })
}

/// The pid the child wrote first of all; None once the pipe ended without one (no child:
/// the spawn failed before its fork).
fn read_pid(heard: &std::os::fd::OwnedFd) -> Option<i32> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(heard, &mut buf[got..]) {
            Ok(0) => return None,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return None,
        }
    }
    Some(i32::from_ne_bytes(buf))
}

/// The helper's exit, what it said on stdout, and whether reading that failed.
type Answer = (
    std::io::Result<std::process::ExitStatus>,
    Vec<u8>,
    std::io::Result<()>,
);

/// Reads the helper's stdout to its end and reaps it, once the ask may no longer kill it by
/// its pid: a pid reaped is free for another process.
fn answer_of(child: &mut std::process::Child, spawn: &Mutex<Spawn>) -> Answer {
    let mut stdout = Vec::new();
    let read = match child.stdout.take() {
        Some(mut out) => out.read_to_end(&mut stdout).map(drop),
        None => Ok(()),
    };
    // Exited, but left unreaped: until then its pid is its own.
    let pid = Pid::from_raw(child.id() as i32);
    let exited = || waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
    while let Err(nix::errno::Errno::EINTR) = exited() {}
    lock(spawn).reaping = true;
    (child.wait(), stdout, read)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> std::process::Command {
        let mut command = std::process::Command::new("sh");
        command.args(["-c", script]);
        command
    }

    #[tokio::test]
    async fn a_helper_answers_and_is_forgotten_once_reaped() {
        let out = ask(sh("echo $$"), Duration::from_secs(10)).await.unwrap();
        assert!(out.status.success());
        let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        assert!(!helpers().contains(&pid));
    }

    #[tokio::test]
    async fn a_program_that_is_not_there_cannot_be_started() {
        let err = ask(
            std::process::Command::new("/nonexistent/c3-helper"),
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, AskError::Start { .. }), "{err:?}");
    }

    /// An ask given up by its caller (dropped) kills its helper all the same.
    #[tokio::test]
    async fn a_dropped_ask_kills_its_helper() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
        let asking = tokio::spawn(ask(sh(&script), Duration::from_secs(60)));
        let mut pid = None;
        for _ in 0..500 {
            pid = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if pid.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pid = pid.expect("the helper never started");
        asking.abort();
        // Awaited: the abort drops the ask only when the runtime gets to it.
        let _ = asking.await;
        let mut gone = false;
        for _ in 0..500 {
            if !helpers().contains(&pid) {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            gone,
            "the helper of a dropped ask was never killed and reaped"
        );
    }

    /// A helper that does not answer in time is killed, by its pid, and the ask ends then.
    #[tokio::test]
    async fn a_helper_past_its_time_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let script = format!("echo $$ > {}; exec sleep 30", pidfile.display());
        let began = std::time::Instant::now();
        let err = ask(sh(&script), Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(err, AskError::TimedOut { .. }), "{err:?}");
        assert!(began.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let gone = (0..500).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            !helpers().contains(&pid)
        });
        assert!(gone, "the killed helper was never reaped");
    }
}
