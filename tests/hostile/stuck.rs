//! A job's process that survives SIGKILL: a thread waiting on a FUSE request that its file
//! system's server read and never answers is unkillable for as long as the connection lives
//! (the server holds `/dev/fuse` open). The stop must still keep to `stop_deadline_secs`, and a
//! connection the job's user made during the job is aborted, which frees the process (and its
//! GPU); one that predates the job, or is another user's, is left alone.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{nobody, not_root, open_harness, pid_from, spawn_job, wait_within, KillOnDrop};
use crate::support::{alive, chmod, signal, wait_for, Harness};

/// A FUSE mount whose server answers `INIT` and then reads every request without answering
/// it: a process that asked something is stuck until the connection is aborted, SIGKILL or
/// not. Dropping it closes the device, which aborts the connection.
struct DeafFuse {
    at: PathBuf,
    /// The connection's name under `/sys/fs/fuse/connections` (the mount's device minor).
    conn: String,
    /// Requests read (and left unanswered) after `INIT`.
    unanswered: Arc<AtomicUsize>,
    /// The kernel ended the connection (a read said ENODEV).
    aborted: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

const FUSE_INIT: u32 = 26;

impl DeafFuse {
    /// Mounts at `at` as `fusermount` would for `uid` (whose group id is taken to be the same).
    fn mount(at: &Path, uid: u32) -> Option<DeafFuse> {
        let dev = crate::common::mount_fuse(at, "40755", uid)?;
        let conn = mount_minor(at)?;
        let (unanswered, aborted, stop) = Default::default();
        let server = {
            let (unanswered, aborted, stop): (Arc<AtomicUsize>, Arc<AtomicBool>, Arc<AtomicBool>) = (
                Arc::clone(&unanswered),
                Arc::clone(&aborted),
                Arc::clone(&stop),
            );
            std::thread::spawn(move || serve(dev, &unanswered, &aborted, &stop))
        };
        Some(DeafFuse {
            at: at.to_path_buf(),
            conn,
            unanswered,
            aborted,
            stop,
            server: Some(server),
        })
    }

    fn unanswered(&self) -> usize {
        self.unanswered.load(Ordering::SeqCst)
    }

    fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

/// Reads requests until the connection ends or `stop`; answers only `INIT`.
fn serve(dev: OwnedFd, unanswered: &AtomicUsize, aborted: &AtomicBool, stop: &AtomicBool) {
    let mut buf = vec![0u8; 1 << 20];
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: dev.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        // SAFETY: reads into a buffer of the length given.
        let n = unsafe { libc::read(dev.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENODEV) {
                aborted.store(true, Ordering::SeqCst);
                return;
            }
            continue;
        }
        let word = |at: usize| u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap());
        if word(4) != FUSE_INIT {
            unanswered.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        // fuse_out_header (len, error, unique), then fuse_init_out: 7.31, max_write 4096.
        let mut reply = [0u8; 16 + 64];
        reply[0..4].copy_from_slice(&(16u32 + 64).to_ne_bytes());
        reply[8..16].copy_from_slice(&buf[8..16]);
        reply[16..20].copy_from_slice(&7u32.to_ne_bytes());
        reply[20..24].copy_from_slice(&31u32.to_ne_bytes());
        reply[36..40].copy_from_slice(&4096u32.to_ne_bytes());
        reply[40..44].copy_from_slice(&1u32.to_ne_bytes());
        // SAFETY: writes a buffer of the length given.
        unsafe { libc::write(dev.as_raw_fd(), reply.as_ptr().cast(), reply.len()) };
    }
}

impl Drop for DeafFuse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(s) = self.server.take() {
            let _ = s.join();
        }
        let target = CString::new(self.at.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The minor of the device mounted at `at` (`0:N` in mountinfo): the name of its FUSE
/// connection. Read from the table, as a stat of the mount would wait on its server.
fn mount_minor(at: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let at = at.to_str()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(4) == Some(&at))
            .then(|| f.get(2)?.split_once(':').map(|(_, m)| m.to_string()))
            .flatten()
    })
}

/// `/sys/fs/fuse/connections` mounted (as systemd does at boot), or why the test cannot run.
fn fusectl() -> bool {
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .is_ok_and(|t| t.lines().any(|l| l.contains(" - fusectl ")))
    };
    mounted()
        || std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status()
            .is_ok_and(|s| s.success())
            && mounted()
}

fn state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// A directory anyone may enter, for a mount.
fn mount_point(h: &Harness, name: &str) -> PathBuf {
    let p = h.path(name);
    std::fs::create_dir(&p).unwrap();
    chmod(&p, 0o755);
    p
}

/// A stop while a process of the job is stuck for good (on a FUSE mount that was there
/// before the job, so nothing of the agent's may abort it) ended after ~19 s with grace 2 s
/// and stop deadline 6 s: a second full grace, 5 s of SIGKILL rounds twice, 5 s for the
/// output pumps. Under Slurm (KillWait 30 s with the defaults' ~45 s) the agent was killed
/// with the record still running. Now all of it keeps to the stop deadline: CANCELED.
#[test]
fn a_stop_keeps_its_deadline_when_a_process_survives_sigkill() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env = vec![
        ("C3_AGENT_KILL_GRACE_SECS".into(), "2".into()),
        ("C3_AGENT_STOP_DEADLINE_SECS".into(), "6".into()),
    ];
    let at = mount_point(&h, "fuse");
    // Root's, and the job root's: no other test's agent (their jobs are nobody's) takes it
    // for its job's.
    let Some(fuse) = DeafFuse::mount(&at, 0) else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        return;
    };
    let script = format!(
        "trap '' TERM; stat {}/x & echo $! > stat.pid; sleep 1000",
        at.display()
    );
    let child = spawn_job(&h, json!({"job_id": "sk", "command": ["sh", "-c", script]}));
    let stat = pid_from(&h.workdir("sk").join("stat.pid"));
    wait_for(
        "the job's request to the mount",
        Duration::from_secs(20),
        || (fuse.unanswered() > 0).then_some(()),
    );
    let stopped = Instant::now();
    signal(child.id(), "TERM");
    let run = wait_within("stopped run", child, Duration::from_secs(60));
    let took = stopped.elapsed();
    run.assert_code(4);
    assert!(
        took < Duration::from_secs(8),
        "the stop took {took:?} (stop deadline 6 s)\n{}",
        run.stderr
    );
    assert_eq!(h.terminal("sk")["state"], "CANCELED", "{}", run.stderr);
    // A mount that was there before the job, in the node's mount namespace, is not the job's
    // to abort.
    assert!(
        alive(stat) && state(stat) == Some('D'),
        "{stat}: {:?}",
        state(stat)
    );
    assert!(!fuse.aborted());
}

/// The job's user mounts a FUSE file system during the job and leaves a process waiting on
/// a request its server never answers: that process survives SIGKILL, and the agent said
/// `gpu_released: false` for good. Its connection (new since the launch, the job user's,
/// with a request waiting) is now aborted and the process dies; a connection of another
/// user, made during the job too, is left alone.
#[test]
fn a_job_users_fuse_connection_is_aborted_when_its_processes_survive_sigkill() {
    if not_root() {
        return;
    }
    if !fusectl() {
        crate::support::skip("no /sys/fs/fuse/connections (fusectl) here");
        return;
    }
    let h = open_harness();
    let (mine, theirs) = (mount_point(&h, "fuse"), mount_point(&h, "other"));
    let work = h.workdir("fa");
    let script = format!(
        "touch ready; while [ ! -e go ]; do sleep 0.05; done; \
         stat {}/x & echo $! > stat.pid; \
         while [ ! -e go2 ]; do sleep 0.05; done",
        mine.display()
    );
    let child = spawn_job(
        &h,
        json!({"job_id": "fa", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    wait_for("the job's start", Duration::from_secs(30), || {
        work.join("ready").exists().then_some(())
    });
    let (Some(fuse), Some(other)) = (
        DeafFuse::mount(&mine, nobody()),
        DeafFuse::mount(&theirs, 0),
    ) else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        std::fs::write(work.join("go"), "").unwrap();
        std::fs::write(work.join("go2"), "").unwrap();
        let _ = wait_within("run fa", child, Duration::from_secs(60));
        return;
    };
    // Stuck on the other user's mount too, but no process of the job's.
    let mut outsider = std::process::Command::new("stat")
        .arg(theirs.join("x"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(work.join("go"), "").unwrap();
    let stat = pid_from(&work.join("stat.pid"));
    wait_for(
        "the requests to the mounts",
        Duration::from_secs(20),
        || (fuse.unanswered() > 0 && other.unanswered() > 0).then_some(()),
    );
    std::fs::write(work.join("go2"), "").unwrap();
    let run = wait_within("run fa", child, Duration::from_secs(60));
    let finalizing: Vec<_> = h
        .local_reports("fa")
        .into_iter()
        .map(|r| r["body"].clone())
        .filter(|b| b["state"] == "FINALIZING")
        .collect();
    assert_eq!(finalizing.len(), 1, "{finalizing:?}\n{}", run.stderr);
    assert_eq!(finalizing[0]["gpu_released"], true, "{}", run.stderr);
    assert!(!alive(stat), "{stat} is left: {:?}", state(stat));
    assert!(fuse.aborted(), "{}", run.stderr);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&format!("connection={}", fuse.conn))),
        "the aborted connection is not named\n{}",
        run.stderr
    );
    assert!(!other.aborted(), "another user's connection was aborted");
    drop(other);
    let _ = outsider.wait();
}

/// The agent is SIGKILLed mid-job, and the job's workdir then stops answering (a hung NFS
/// server; here a FUSE mount over it whose server never answers). `recover` opened the
/// recorded workdir, with no bound, before it listened for its budget or a SIGTERM: `recover
/// --budget-secs 2` never ended, nor did the housekeeping unit's `gc` after it. Now the open
/// is given up on when the budget is spent: the attempt is left for a later pass.
#[test]
fn recover_keeps_its_budget_when_the_recorded_workdir_hangs() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let work = h.workdir("hw");
    let agent = spawn_job(
        &h,
        json!({"job_id": "hw", "command": ["sh", "-c", "echo $$ > ready; exec sleep 300"]}),
    );
    let _agent = KillOnDrop(agent.id() as i32);
    let _job = KillOnDrop(pid_from(&work.join("ready")));
    let record = h.state.join("jobs/hw/attempts/1/run.json");
    wait_for("the launch to be recorded", Duration::from_secs(20), || {
        let text = std::fs::read_to_string(&record).ok()?;
        text.contains("\"running\"").then_some(())
    });
    let mut agent = agent;
    agent.kill().unwrap();
    agent.wait().unwrap();
    // Root's, and the job root's: no other test's agent (their jobs are nobody's) takes it
    // for its job's.
    let Some(fuse) = DeafFuse::mount(&work, 0) else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        return;
    };
    let started = Instant::now();
    let recover = h.spawn(&["recover", "--budget-secs", "2"]);
    let pid = recover.id() as i32;
    // Its main thread's end: a thread of its still waiting on the mount keeps the process
    // until the connection goes, below (a FUSE request its server read is not interrupted,
    // not even by SIGKILL).
    let ended = (|| {
        while started.elapsed() < Duration::from_secs(15) {
            if !alive(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })();
    let took = started.elapsed();
    drop(fuse);
    let run = wait_within("c3-agent recover", recover, Duration::from_secs(30));
    assert!(
        ended,
        "recover --budget-secs 2 was still running after {took:?}\n{}",
        run.stderr
    );
    assert!(
        run.stdout.contains("its --budget-secs 2 were spent"),
        "--- stdout\n{}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
}

/// A sidecar (`c3-agent watch`) whose watched directories' parent stops answering (a hung
/// NFS volume; here a FUSE mount whose server never answers). The parent was opened with
/// nothing racing the stop: the pod's SIGTERM went unheard until its SIGKILL. Now the
/// stop ends the watch at once, the attempt left for a later start (exit 6).
#[test]
fn a_watch_hears_a_stop_while_its_watched_parent_hangs() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let at = mount_point(&h, "fuse");
    let Some(fuse) = DeafFuse::mount(&at, 0) else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        return;
    };
    let agent = h.spawn(&[
        "watch",
        "--job-id",
        "wh",
        at.join("artifacts").to_str().unwrap(),
    ]);
    let pid = agent.id();
    wait_for(
        "the watch's open of the mount",
        Duration::from_secs(20),
        || (fuse.unanswered() > 0).then_some(()),
    );
    let stopped = Instant::now();
    signal(pid, "TERM");
    // Its main thread's end: as above, a thread left on the mount keeps the process until
    // the connection goes.
    while alive(pid as i32) && stopped.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = stopped.elapsed();
    drop(fuse);
    let run = wait_within("c3-agent watch", agent, Duration::from_secs(30));
    assert!(
        took < Duration::from_secs(5),
        "the watch heard its SIGTERM after {took:?}\n{}",
        run.stderr
    );
    run.assert_code(6);
}
