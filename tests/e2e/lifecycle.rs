//! The contract's §8 table, one test per row, plus timeout and cancel with a stubborn grandchild.

use std::time::Duration;

use serde_json::json;

use crate::support::{alive, signal, wait_for, Harness, Store};

/// A script that makes the store unusable while it runs (after the preflight passed).
fn break_file_store(h: &Harness) -> String {
    let blobs = h.state.join("store/blobs");
    format!("rm -rf '{0}' && touch '{0}'", blobs.display())
}

#[test]
fn exit_0_and_uploads_ok_is_succeeded() {
    let h = Harness::file();
    let run = h.run_job(json!({"job_id": "ok", "project": "p", "command": ["sh", "-c", "echo 42 > $C3_ARTIFACTS_DIR/answer"]}));
    run.assert_code(0);
    let t = h.terminal("ok");
    assert_eq!(t["state"], "SUCCEEDED");
    assert_eq!(t["reason"], serde_json::Value::Null);
    assert_eq!(t["exit_code"], 0);
    let m = h.manifest("ok");
    assert_eq!(m["complete"], true);
    assert_eq!(m["project"], "p");
    assert_eq!(h.manifest_paths("ok"), vec!["artifacts/answer"]);
}

#[test]
fn exit_0_and_upload_failed_is_upload_error_not_retryable() {
    let h = Harness::file();
    let script = format!(
        "echo data > $C3_ARTIFACTS_DIR/out; {}",
        break_file_store(&h)
    );
    let run = h.run_job(json!({"job_id": "upfail", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    let t = h.terminal("upfail");
    assert_eq!(t["state"], "FAILED");
    assert_eq!(t["reason"], "UPLOAD_ERROR");
    assert_eq!(t["retryable"], false);
    assert!(t["upload_errors"].as_u64().unwrap() > 0);
}

#[test]
fn s3_server_dying_mid_run_is_upload_error() {
    let h = Harness::new(Store::s3());
    let Store::S3(s3) = &h.store else {
        unreachable!()
    };
    let script = format!("echo data > $C3_ARTIFACTS_DIR/out; kill -9 {}", s3.pid());
    let run = h.run_job(json!({"job_id": "s3dies", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    let t = h.terminal("s3dies");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("UPLOAD_ERROR"))
    );
}

#[test]
fn script_failure_is_script_error() {
    let h = Harness::file();
    let run = h.run_job(json!({"job_id": "bad", "command": ["sh", "-c", "echo partial > $C3_ARTIFACTS_DIR/p; exit 3"]}));
    run.assert_code(1);
    let t = h.terminal("bad");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("SCRIPT_ERROR"))
    );
    assert_eq!(t["exit_code"], 3);
    assert_eq!(
        h.manifest_paths("bad"),
        vec!["artifacts/p"],
        "best-effort upload of what the script left"
    );
}

#[test]
fn script_failure_and_upload_failure_is_still_script_error() {
    let h = Harness::file();
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/x; {}; exit 7",
        break_file_store(&h)
    );
    let run = h.run_job(json!({"job_id": "both", "command": ["sh", "-c", script]}));
    run.assert_code(1);
    let t = h.terminal("both");
    assert_eq!(t["reason"], "SCRIPT_ERROR");
    assert!(
        t["upload_errors"].as_u64().unwrap() > 0,
        "upload errors are counted: {t}"
    );
}

#[test]
fn killed_by_signal_is_script_error_with_signal() {
    let h = Harness::file();
    let run = h.run_job(json!({"job_id": "sig", "command": ["sh", "-c", "kill -KILL $$"]}));
    run.assert_code(1);
    let t = h.terminal("sig");
    assert_eq!(t["reason"], "SCRIPT_ERROR");
    assert_eq!(t["signal"], "SIGKILL");
}

#[test]
fn command_not_found_is_script_error_127() {
    let h = Harness::file();
    let run = h.run_job(json!({"job_id": "nf", "command": ["/no/such/program"]}));
    run.assert_code(1);
    assert_eq!(h.terminal("nf")["exit_code"], 127);
}

/// Writes `started`, then leaves a grandchild that ignores SIGTERM, and waits.
const STUBBORN: &str = "echo s > $C3_ARTIFACTS_DIR/started; (trap '' TERM; exec sleep 300) & echo $! > $C3_ARTIFACTS_DIR/grandchild.pid; wait";

fn grandchild_pid(h: &Harness, job: &str) -> i32 {
    let path = h.workdir(job).join("artifacts/grandchild.pid");
    wait_for("the grandchild's pid", Duration::from_secs(20), || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
}

#[test]
fn timeout_kills_the_whole_group_and_uploads() {
    let h = Harness::file();
    let run =
        h.run_job(json!({"job_id": "slow", "command": ["sh", "-c", STUBBORN], "timeout_secs": 2}));
    run.assert_code(5);
    let pid = grandchild_pid(&h, "slow");
    assert!(!alive(pid), "grandchild {pid} survived the timeout");
    assert_eq!(h.terminal("slow")["state"], "TIMED_OUT");
    assert_eq!(
        h.manifest_paths("slow"),
        vec!["artifacts/grandchild.pid", "artifacts/started"]
    );
}

#[test]
fn sigterm_to_agent_cancels_the_job() {
    let h = Harness::file();
    let spec = h.spec(json!({"job_id": "cancel", "command": ["sh", "-c", STUBBORN]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let pid = grandchild_pid(&h, "cancel");
    signal(child.id(), "TERM");
    let run = h.wait("cancelled run".into(), child);
    run.assert_code(4);
    assert!(!alive(pid), "grandchild {pid} survived the cancel");
    assert_eq!(h.terminal("cancel")["state"], "CANCELED");
    assert!(h
        .manifest_paths("cancel")
        .contains(&"artifacts/started".to_string()));
}

/// A hangup (the ssh session or terminal of a `run` started by hand went away) or a quit
/// (Ctrl-\) is a stop like SIGTERM: by default either ended the agent at once, and the job ran
/// on unsupervised, with no final sync and no status.
#[test]
fn a_hangup_or_quit_stops_the_job_as_sigterm_does() {
    for (sig, job) in [("HUP", "hup"), ("QUIT", "quit")] {
        let h = Harness::file();
        let spec = h.spec(json!({"job_id": job, "command": ["sh", "-c", STUBBORN]}));
        let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
        let pid = grandchild_pid(&h, job);
        signal(child.id(), sig);
        let run = h.wait(format!("run stopped by SIG{sig}"), child);
        run.assert_code(4);
        assert!(!alive(pid), "SIG{sig}: grandchild {pid} survived");
        assert_eq!(h.terminal(job)["state"], "CANCELED");
    }
    // Under `nohup` (SIGHUP ignored when the agent starts) a hangup is nobody's stop.
    let h = Harness::file();
    let spec = h.spec(json!({"job_id": "nohup", "command": ["sh", "-c", "sleep 2"]}));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    // SAFETY: one async-signal-safe call between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    signal(child.id(), "HUP");
    h.wait("run under nohup".into(), child).assert_code(0);
}

/// A stop while the agent still asks the store whether the attempt already ran (up to
/// `preflight_timeout_secs`) cancels the attempt at once: the signal's default action ended
/// the agent there, and nothing reported the attempt.
#[test]
fn a_stop_before_the_launch_is_a_cancel() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "slow-already-ran".into()));
    let marker = h.path("launched");
    let spec =
        h.spec(json!({"job_id": "early", "command": ["touch", marker.display().to_string()]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    crate::support::wait_catches_term(child.id());
    let stopped = std::time::Instant::now();
    signal(child.id(), "TERM");
    let run = h.wait("run stopped before its launch".into(), child);
    run.assert_code(4);
    // Heard during the look (held 60 s here), not after it.
    assert!(
        stopped.elapsed() < std::time::Duration::from_secs(30),
        "the stop waited for the look"
    );
    assert!(!marker.exists(), "launched after a stop");
    assert_eq!(h.terminal("early")["state"], "CANCELED");
}

/// The same stop, for an attempt whose complete manifest is already in the store (run again
/// from a node that has no record of it): canceled before its launch, it stores nothing, and
/// the earlier run's manifest stays as it was.
#[test]
fn a_stop_before_the_launch_leaves_an_earlier_runs_manifest_alone() {
    let mut h = Harness::file();
    let script = "echo $$ > $C3_ARTIFACTS_DIR/pid.txt";
    h.run_job(json!({"job_id": "twice", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let key = "jobs/twice/attempts/1/manifest.json";
    let before = h.object(key).expect("the first run's manifest");
    std::fs::remove_dir_all(h.state.join("jobs/twice")).unwrap();
    h.env
        .push(("C3_AGENT_FAULT".into(), "slow-already-ran".into()));
    let spec = h.spec(json!({"job_id": "twice", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    crate::support::wait_catches_term(child.id());
    signal(child.id(), "TERM");
    let run = h.wait("run stopped before its launch".into(), child);
    run.assert_code(4);
    assert!(
        h.object(key).as_deref() == Some(&before[..]),
        "the earlier run's manifest was replaced\n{}",
        run.stderr
    );
}

/// A child of `parent` that leads its own session (the job's first process, past setsid).
fn session_leader_under(parent: u32) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        let (ppid, sid): (u32, i32) = (fields.get(1)?.parse().ok()?, fields.get(3)?.parse().ok()?);
        (ppid == parent && sid == pid).then_some(pid)
    })
}

/// An execve that never returns (the command, a directory on PATH or a `#!` interpreter on
/// a hung NFS mount, or a FUSE mount whose server never answers; here the fault point
/// `exec-hangs` blocks the child where execve would) held the agent in std's spawn: a stop
/// was never heard, no status ever sent, and the agent never exited. A stop now ends the
/// launch: CANCELED within the stop deadline, its process killed, the script never run.
#[test]
fn a_stop_ends_a_launch_whose_execve_never_returns() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_FAULT".into(), "exec-hangs".into()));
    h.extra_toml.push_str("[job]\nstop_deadline_secs = 10\n");
    let script = "echo ran > $C3_ARTIFACTS_DIR/ran";
    let spec = h.spec(json!({"job_id": "stuck", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let agent = child.id();
    let stuck = wait_for("the launch's process", Duration::from_secs(20), || {
        session_leader_under(agent)
    });
    signal(agent, "TERM");
    let stopped = std::time::Instant::now();
    let run = h.wait("run stopped during a stuck launch".into(), child);
    let took = stopped.elapsed();
    if alive(stuck) {
        // The old agent left it, paused for good.
        signal(stuck as u32, "KILL");
        panic!(
            "the launch's process {stuck} outlived the agent\n{}",
            run.stderr
        );
    }
    run.assert_code(4);
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let t = h.terminal("stuck");
    assert_eq!(t["state"], "CANCELED");
    assert!(!h.workdir("stuck").join("artifacts/ran").exists());
    assert!(
        !h.local_reports("stuck")
            .iter()
            .any(|r| r["body"]["state"] == "RUNNING"),
        "RUNNING was reported for a script that never started"
    );
}

/// The agent dies while the launch's execve is stuck (a hung mount), with no cgroup to hold
/// the job: the child's pid, saved as soon as it was forked, lets `recover` stop it. The
/// leader was recorded only once execve returned, and the child carries no marks before it:
/// `recover` found nothing, and the script ran later with no agent.
#[test]
fn recover_stops_a_launch_whose_agent_died_during_its_execve() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "exec-hangs-without-cgroup".into()));
    let spec = h.spec(json!({"job_id": "stuckexec", "command": ["true"]}));
    let mut child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let record = h.state.join("jobs/stuckexec/attempts/1/run.json");
    let leader: i32 = wait_for(
        "the forked child to be recorded",
        Duration::from_secs(20),
        || {
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&record).ok()?).ok()?;
            assert!(r["cgroup"].is_null(), "{r}");
            r["leader"]["pid"].as_i64().map(|p| p as i32)
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(alive(leader), "the stuck launch outlived its agent");
    h.env.clear();
    let recover = h.run(&["recover"]);
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        !alive(leader)
    });
    if !gone {
        signal(leader as u32, "KILL");
    }
    assert!(
        gone,
        "recover left the stuck launch's process running\n{}",
        recover.stderr
    );
}

/// A look at the node that never ends before the launch (the workdir on a hung NFS server,
/// the user behind a hung sssd) is given up on a stop: it ran unbounded, and the agent heard
/// SIGTERM only when the look ended, if ever.
#[test]
fn a_stop_ends_a_preparation_stuck_on_the_node() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "workdir-hangs".into()));
    h.extra_toml.push_str("[job]\nstop_deadline_secs = 10\n");
    let script = "echo ran > $C3_ARTIFACTS_DIR/ran";
    let spec = h.spec(json!({"job_id": "hung", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let record = h.state.join("jobs/hung/attempts/1/run.json");
    wait_for("the attempt's record", Duration::from_secs(20), || {
        record.exists().then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), "TERM");
    let run = h.wait("run stopped in a stuck preparation".into(), child);
    run.assert_code(4);
    assert_eq!(h.terminal("hung")["state"], "CANCELED");
    assert!(!h.workdir("hung").join("artifacts/ran").exists());
}

#[test]
fn preflight_failure_launches_nothing() {
    // A file store whose directory cannot be created.
    let mut h = Harness::file();
    std::fs::write(h.path("plain-file"), "").unwrap();
    h.env.push((
        "C3_AGENT_STORE_URL".into(),
        format!("file://{}/store", h.path("plain-file").display()),
    ));
    let marker = h.path("launched");
    let run =
        h.run_job(json!({"job_id": "pre", "command": ["touch", marker.display().to_string()]}));
    run.assert_code(6);
    assert!(!marker.exists());
    let t = h.terminal("pre");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("AGENT_ERROR"))
    );
    assert!(run.stderr.contains("not usable"), "{}", run.stderr);

    // An S3 store that denies access (bad secret key).
    let h = Harness::new(Store::s3());
    let config = h.config_path();
    let bad = std::fs::read_to_string(&config).unwrap().replace(
        "aws_secret_access_key = \"SK\"",
        "aws_secret_access_key = \"WRONG\"",
    );
    std::fs::write(h.path("bad.toml"), bad).unwrap();
    let spec =
        h.spec(json!({"job_id": "pre3", "command": ["touch", marker.display().to_string()]}));
    let out = h
        .command(&["run", "--job", spec.to_str().unwrap()])
        .env("C3_AGENT_CONFIG", h.path("bad.toml"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!marker.exists());
}

#[test]
fn leftover_background_processes_are_stopped() {
    let h = Harness::file();
    let script = "(trap '' TERM; exec sleep 300) & echo $! > $C3_ARTIFACTS_DIR/bg.pid; exit 0";
    h.run_job(json!({"job_id": "bg", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let pid: i32 = std::fs::read_to_string(h.workdir("bg").join("artifacts/bg.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(pid), "a background process outlived its job");
}

#[test]
fn the_job_runs_as_the_spec_user() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::file();
    // The temp dir is private (0700); a real workdir's parents are traversable.
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script =
        "id -u > $C3_ARTIFACTS_DIR/uid; echo $HOME > results/deep/home; touch results/deep/r";
    let run = h.run_job(json!({"job_id": "asuser", "user": "nobody", "output": ["results/deep"], "command": ["sh", "-c", script]}));
    if !nix::unistd::geteuid().is_root() {
        run.assert_code(6); // only root can switch users
        return;
    }
    run.assert_code(0);
    let uid = std::fs::read_to_string(h.workdir("asuser").join("artifacts/uid")).unwrap();
    assert_eq!(
        uid.trim(),
        nix::unistd::User::from_name("nobody")
            .unwrap()
            .unwrap()
            .uid
            .to_string()
    );
    assert_eq!(
        h.manifest_paths("asuser"),
        vec!["artifacts/uid", "results/deep/home", "results/deep/r"]
    );
}

#[test]
fn recover_leaves_a_job_with_a_live_agent_alone() {
    let h = Harness::file().with_control_plane(5);
    let go = h.path("go");
    let script = format!(
        "echo s > $C3_ARTIFACTS_DIR/started; i=0; while [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "busy", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the job to start", Duration::from_secs(20), || {
        h.workdir("busy")
            .join("artifacts/started")
            .exists()
            .then_some(())
    });
    h.run(&["recover"]).assert_code(0);
    assert!(
        h.cp().terminal_status().is_none(),
        "recover must not finish a job its agent still runs"
    );
    std::fs::write(&go, "").unwrap();
    h.wait("busy".into(), child).assert_code(0);
    assert_eq!(h.cp().terminal_status().unwrap()["state"], "SUCCEEDED");
}

/// The job's OOM score: the shipped unit gives the agent -500 (a node out of memory kills the
/// job, which the agent then reports, rather than the agent and the job with it), which the
/// job does not inherit (`launch::tests::only_a_protected_agents_oom_score_is_not_passed_on`;
/// lowering the agent's here needs CAP_SYS_RESOURCE, which CI's root lacks). A raised one (a
/// pod's QoS, an operator's) is the job's too.
#[test]
fn a_raised_oom_score_is_the_jobs_too() {
    let h = Harness::file();
    let script = "cat /proc/self/oom_score_adj > $C3_ARTIFACTS_DIR/adj";
    let spec = h.spec(json!({"job_id": "oomadj", "command": ["sh", "-c", script]}));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    // SAFETY: open, write and close between fork and exec: async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, b"300".as_ptr().cast(), 3) != 3 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(fd);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    h.wait("run with a protected agent".into(), child)
        .assert_code(0);
    let adj = std::fs::read_to_string(h.workdir("oomadj").join("artifacts/adj")).unwrap();
    assert_eq!(adj.trim(), "300");
}

/// A background writer the script left behind (`python save.py &` then exit 0) is stopped and
/// its file stored as it stands: the status names the file, which may be cut short.
#[test]
fn a_file_a_left_process_was_still_writing_is_named_in_the_warnings() {
    let h = Harness::file();
    // Until the writer has written (a fixed 0.5 s was a guess a loaded machine could lose).
    let script = "sh -c 'exec 3> $C3_ARTIFACTS_DIR/model.pt; printf half >&3; exec sleep 30' & \
                  until [ -s $C3_ARTIFACTS_DIR/model.pt ]; do sleep 0.05; done; exit 0";
    h.run_job(json!({"job_id": "leftw", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let t = h.terminal("leftw");
    let warnings = t["warnings"].to_string();
    assert!(
        warnings.contains("artifacts/model.pt") && warnings.contains("incomplete"),
        "{t}"
    );
}

/// The look at what the processes a script left behind still write stats each open file,
/// and a job's own FUSE server (or a hung NFS mount) may never answer: bounded, it cannot hold
/// the job's end (the GPU, the terminal status). The fault point stands for that stat.
#[test]
fn a_look_at_left_processes_that_never_answers_does_not_hold_the_end() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "written-paths".into()));
    // Until the writer has written (a fixed 0.5 s was a guess a loaded machine could lose).
    let script = "sh -c 'exec 3> $C3_ARTIFACTS_DIR/model.pt; printf half >&3; exec sleep 30' & \
                  until [ -s $C3_ARTIFACTS_DIR/model.pt ]; do sleep 0.05; done; exit 0";
    let spec = h.spec(json!({"job_id": "hung", "command": ["sh", "-c", script]}));
    let mut agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while agent.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if agent.try_wait().unwrap().is_none() {
        let _ = agent.kill();
        panic!("the agent was still waiting on the look 60 s after the script ended");
    }
    h.wait("c3-agent run".into(), agent).assert_code(0);
    let t = h.terminal("hung");
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert!(t["warnings"].to_string().contains("is unknown"), "{t}");
    assert_eq!(h.manifest_paths("hung"), vec!["artifacts/model.pt"]);
}

/// A state dir the agent cannot write (full, read-only, `jobs` not a directory) is the
/// node's fault, retryable on another node (exit 6), not a bad spec: a scheduler takes exit 2
/// as the job's own mistake and fails it for good.
#[test]
fn a_state_dir_that_cannot_be_written_is_the_nodes_error() {
    let h = Harness::file();
    std::fs::create_dir_all(&h.state).unwrap();
    std::fs::write(h.state.join("jobs"), "not a directory").unwrap();
    let run = h.run_job(json!({"job_id": "nodefault", "command": ["true"]}));
    run.assert_code(6);
    let said = run.stderr.lines().last().unwrap_or_default();
    assert!(
        said.starts_with("c3-agent: state dir: cannot write"),
        "{}",
        run.stderr
    );
}

/// A jobs_root that is itself a symlink (`/srv/jobs -> /mnt/jobs`) is the operator's choice:
/// it failed every job that named a workdir below it (ELOOP from the no-symlink open of the
/// root).
#[test]
fn a_jobs_root_that_is_a_symlink_works() {
    let mut h = Harness::file();
    let real = h.path("mnt-jobs");
    std::fs::create_dir(&real).unwrap();
    let link = h.path("jobs");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    h.extra_toml = format!("jobs_root = \"{}\"\n", link.display());
    let run = h.run_job(json!({
        "job_id": "j", "workdir": link.join("j").display().to_string(),
        "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"],
    }));
    run.assert_code(0);
    assert_eq!(h.manifest_paths("j"), ["artifacts/x"]);
    assert!(real.join("j/artifacts/x").exists());
}

/// Started with a low soft fd limit (a shell's, Slurm's, the housekeeping unit's 1024 on a
/// big node where hundreds of uploads are in flight at once), the agent raises its own to
/// the hard limit: its uploads failed with EMFILE, each file unstored, and an exit-0 job was
/// UPLOAD_ERROR (here 51 files of 300 stored: each PUT holds a socket). The job keeps the
/// limit the agent was started with.
#[test]
fn a_low_soft_fd_limit_fails_no_upload_and_is_the_jobs() {
    use std::os::unix::process::CommandExt;
    let mut h = Harness::new(Store::s3());
    // As many in flight as a 32-CPU node's final sync starts with.
    h.extra_toml = "[upload]\nfiles_in_flight = 256\n".into();
    let script = "ulimit -n > limit; cd $C3_ARTIFACTS_DIR; \
                  for i in $(seq 300); do echo $i > f$i; done";
    let spec = h.spec(json!({"job_id": "fds", "command": ["sh", "-c", script]}));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    // SAFETY: getrlimit and setrlimit only, in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            limit.rlim_cur = 64;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let run = h.wait(
        "a run with a soft fd limit of 64".into(),
        cmd.spawn().unwrap(),
    );
    run.assert_code(0);
    assert_eq!(h.manifest_paths("fds").len(), 300, "{}", run.stderr);
    let limit = std::fs::read_to_string(h.workdir("fds").join("limit")).unwrap();
    assert_eq!(
        limit.trim(),
        "64",
        "the job's fd limit is not the one it was given"
    );
}

/// A round of the reaper that takes long (run at the idle priority behind a busy job's
/// threads in the same CPU group; here a fault point holds it 20 s): it held the helpers'
/// lock throughout, and a timeout's SIGTERM waited for it; and the job's end waited for the
/// round once the job was done. The timeout stops the job at once, and the run ends well
/// before the round would.
#[test]
fn a_slow_reaper_round_holds_up_no_stop() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_FAULT".into(), "reap-is-slow".into()));
    let started = std::time::Instant::now();
    let run =
        h.run_job(json!({"job_id": "reapslow", "command": ["sleep", "1000"], "timeout_secs": 2}));
    run.assert_code(5);
    assert!(
        started.elapsed() < Duration::from_secs(14),
        "the run took {:?}: the stop waited for the reaper",
        started.elapsed()
    );
}
