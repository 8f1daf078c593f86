//! A job's process that called setsid() (its own session, its own process group) is still the
//! job's: cancel, timeout and the job's end stop it, and a file it holds open for writing is
//! not uploaded half-written.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, open_harness, pid_from, spawn_job, wait_within, KillOnDrop};
use crate::support::{alive, sha256_hex, signal, wait_for, Harness};

/// Starts, in its own session, a sleeper that ignores SIGTERM and writes its pid to
/// `$C3_ARTIFACTS_DIR/esc.pid`.
const ESCAPE: &str =
    "setsid -f sh -c 'trap \"\" TERM; echo $$ > $C3_ARTIFACTS_DIR/esc.pid.tmp; mv $C3_ARTIFACTS_DIR/esc.pid.tmp $C3_ARTIFACTS_DIR/esc.pid; exec sleep 300'";

fn esc_pid(h: &Harness, job: &str) -> i32 {
    pid_from(&h.workdir(job).join("artifacts/esc.pid"))
}

/// The escaped sleeper is dead (a zombie counts as dead); a SIGKILL may take a moment to land.
fn assert_dead(pid: i32, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !alive(pid),
        "the job's setsid() process {pid} survived the {what}"
    );
}

#[test]
fn cancel_kills_a_process_that_left_the_jobs_session() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let script = format!("{ESCAPE}; sleep 300");
    let child = spawn_job(
        &h,
        json!({"job_id": "c", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let pid = esc_pid(&h, "c");
    let _cleanup = KillOnDrop(pid);
    signal(child.id(), "TERM");
    let run = wait_within("canceled run", child, Duration::from_secs(30));
    run.assert_code(4);
    assert_dead(pid, "cancel");
}

#[test]
fn timeout_kills_a_process_that_left_the_jobs_session() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let script = format!("{ESCAPE}; sleep 300");
    let child = spawn_job(
        &h,
        json!({"job_id": "t", "user": "nobody", "timeout_secs": 2, "command": ["sh", "-c", script]}),
    );
    let pid = esc_pid(&h, "t");
    let _cleanup = KillOnDrop(pid);
    let run = wait_within("timed-out run", child, Duration::from_secs(30));
    run.assert_code(5);
    assert_dead(pid, "timeout");
}

#[test]
fn job_exit_kills_a_process_that_left_the_jobs_session() {
    if not_root() {
        return;
    }
    let h = open_harness();
    // Exits 0 as soon as the sleeper has written its pid (at most 10 s).
    let script = format!(
        "{ESCAPE}; i=0; while [ ! -e $C3_ARTIFACTS_DIR/esc.pid ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done; exit 0"
    );
    let child = spawn_job(
        &h,
        json!({"job_id": "e", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run", child, Duration::from_secs(30));
    let pid = esc_pid(&h, "e");
    let _cleanup = KillOnDrop(pid);
    run.assert_code(0);
    assert_dead(pid, "job's exit");
}

#[test]
fn a_file_held_open_by_a_setsid_writer_is_not_uploaded_half_written() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.extra_toml = "[sync]\nsettle_ms = 200\n".into();
    // The writer leaves the job's session, writes "A", keeps the file open 3 s, writes "B".
    let script = "setsid sh -c 'exec 3>$C3_ARTIFACTS_DIR/w.bin; printf A >&3; sleep 3; printf B >&3; exec 3>&-; touch writer.done' & \
                  i=0; while [ ! -e writer.done ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done";
    let child = spawn_job(
        &h,
        json!({"job_id": "w", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let w = h.workdir("w").join("artifacts/w.bin");
    wait_for("the writer to open w.bin", Duration::from_secs(20), || {
        w.exists().then_some(())
    });
    let run = wait_within("run w", child, Duration::from_secs(30));
    run.assert_code(0);
    let m = h.manifest("w");
    let entry = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "artifacts/w.bin")
        .unwrap_or_else(|| panic!("w.bin not in the manifest: {m}"))
        .clone();
    assert_eq!(entry["size"], 2, "{entry}");
    assert_eq!(entry["sha256"], sha256_hex(b"AB"));
    let half: PathBuf = h.object_path(&format!("blobs/sha256/{}", sha256_hex(b"A")));
    assert!(
        !half.exists(),
        "the half-written w.bin (\"A\") was uploaded while its writer held it open"
    );
}

/// A process that keeps forking (each parent exiting at once) is always newer than any list
/// of pids the agent takes. It must still be gone once the agent has exited: the cgroup's
/// own word (or freezing the job first) decides, not a snapshot.
#[test]
fn a_fork_hopping_process_does_not_outlive_its_job() {
    if not_root() {
        return;
    }
    fork_hopper_is_stopped(open_harness(), "0.01");
}

/// The same where the kernel has no `cgroup.kill` (5.2 to 5.13: Debian 11, Ubuntu 20.04's
/// 5.4) and the hopper does not rest between hops: a kill by the cgroup's list of pids,
/// round after round, never caught it; the cgroup is frozen first now.
#[test]
fn a_fork_hopping_process_is_stopped_without_cgroup_kill() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_FAULT".into(), "no-cgroup-kill".into()));
    fork_hopper_is_stopped(h, "0");
}

/// The same with no cgroup at all (cgroup v1 Slurm nodes, pods without a writable cgroup v2):
/// a look that listed `/proc` before the hop and read the old pid's stat after it found no
/// one, and the job was taken for gone, its GPU for free, while the hopper ran on.
#[test]
fn a_fork_hopping_process_is_stopped_without_a_cgroup() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_FAULT".into(), "no-job-cgroup".into()));
    fork_hopper_is_stopped(h, "0");
}

fn fork_hopper_is_stopped(h: Harness, rest: &str) {
    let beat = h.path("heartbeat");
    std::fs::write(&beat, "").unwrap();
    crate::support::chmod(&beat, 0o666);
    let hopper = format!(
        "import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.setsid()\nend = time.time() + 60\nwhile time.time() < end:\n    if os.fork():\n        os._exit(0)\n    with open('{}', 'r+') as f: f.write('%20.6f' % time.time())\n    time.sleep({rest})\n",
        beat.display(),
    );
    // The beat is overwritten in place at a fixed width, never truncated first: a hopper
    // killed between a truncate and its write would leave the file empty, as if it never ran.
    // Exit only once the hopper is hopping (a loaded machine may start python3 late).
    let script = format!(
        "/usr/bin/python3 -c \"$HOPPER\" & for i in $(seq 200); do [ -s '{}' ] && break; sleep 0.05; done; sleep 0.3; exit 0",
        beat.display()
    );
    let mut spec = json!({"job_id": "hop", "user": "nobody", "command": ["sh", "-c", script]});
    spec["env"] = json!({ "HOPPER": hopper });
    let run = h.run_job(spec);
    run.assert_code(0);
    let settled = std::fs::read_to_string(&beat).unwrap();
    assert!(!settled.is_empty(), "the hopper never ran: {}", run.stderr);
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        std::fs::read_to_string(&beat).unwrap(),
        settled,
        "a fork-hopping process of the job still runs after the agent exited"
    );
}

/// Whoever starts the agent (a wrapper script, a Slurm prolog, a scheduler daemon) may leave
/// an fd open without close-on-exec, say a root-only file: the job must not get it.
#[test]
fn a_file_the_agent_inherited_never_reaches_the_job() {
    use std::os::fd::AsRawFd;
    let h = Harness::file();
    let secret = h.path("root-only");
    std::fs::write(&secret, "root only\n").unwrap();
    crate::support::chmod(&secret, 0o600);
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&secret)
        .unwrap();
    // Inheritable, as a shell's `exec 7<>file` would leave it (nextest runs each test in its
    // own process, so no other test's child gets it).
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let fd = file.as_raw_fd();
    let script = format!(
        "ls -l /proc/self/fd/ > $C3_ARTIFACTS_DIR/fds; echo leaked >&{fd} && echo yes > $C3_ARTIFACTS_DIR/wrote; true"
    );
    h.run_job(json!({"job_id": "fds", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let fds = std::fs::read_to_string(h.workdir("fds").join("artifacts/fds")).unwrap();
    assert!(
        !fds.contains("root-only"),
        "the job got the agent's fd:\n{fds}"
    );
    assert!(!h.workdir("fds").join("artifacts/wrote").exists());
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only\n");
    drop(file);
}
