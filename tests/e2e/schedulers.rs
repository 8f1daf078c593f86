//! Under the schedulers (issue: Slurm, Kubernetes, systemd): the GPU released early
//! (FINALIZING), signals forwarded to the job, the stop deadline, OOM facts, sidecar
//! (`watch`) mode, job ids from Slurm, `run --job-id`, and systemd's notify protocol.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{sha256_hex, signal, wait_for, Harness, Run, Store};

fn states(h: &Harness) -> Vec<String> {
    h.cp()
        .delivered("/status")
        .iter()
        .map(|s| s["state"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// The leader traps USR1 and writes its checkpoint. Its worker (a stand-in for a data
/// loader) notes a USR1 of its own; the leader gives it half a second, then stops it.
// `started` only once the worker's traps are set: a USR1 before them killed it.
const USR1_JOB: &str = "A=$C3_ARTIFACTS_DIR; \
    ( trap 'echo got > $A/worker_got; exit 0' USR1; trap 'exit 0' TERM; : > $A/worker_up; \
      while :; do sleep 0.1; done ) & child=$!; \
    trap 'echo ckpt > $A/last.ckpt; sleep 0.5; kill $child; wait $child; exit 0' USR1; \
    while [ ! -e $A/worker_up ]; do sleep 0.02; done; \
    echo up > $A/started; while :; do sleep 0.1; done";

/// `c3-agent run` of `command`, once the job wrote `artifacts/started`.
fn spawn_until_started(h: &Harness, job: &str, command: serde_json::Value) -> std::process::Child {
    let spec = h.spec(json!({"job_id": job, "command": command}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let started = h.workdir(job).join("artifacts/started");
    wait_for("the job to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });
    child
}

fn usr1_run(forward_to: Option<&str>) -> Harness {
    let mut h = Harness::file().with_control_plane(10);
    if let Some(to) = forward_to {
        h.env.push(("C3_AGENT_FORWARD_TO".into(), to.into()));
    }
    let child = spawn_until_started(&h, "usr1", json!(["bash", "-c", USR1_JOB]));
    // Slurm's `--signal=B:USR1@N` reaches the batch shell only: the agent.
    signal(child.id(), "USR1");
    let run = h.wait("run with USR1".into(), child);
    run.assert_code(0);
    assert!(
        run.stderr.contains("signal forwarded to the job"),
        "{}",
        run.stderr
    );
    assert_eq!(h.terminal("usr1")["state"], "SUCCEEDED");
    assert!(h
        .manifest_paths("usr1")
        .contains(&"artifacts/last.ckpt".to_string()));
    h
}

#[test]
fn forwarded_usr1_reaches_the_leader_and_its_checkpoint_is_kept() {
    let h = usr1_run(None);
    assert!(
        !h.manifest_paths("usr1")
            .contains(&"artifacts/worker_got".to_string()),
        "only the leader gets it: a worker without a handler would die of it"
    );
}

#[test]
fn forward_to_all_signals_every_process_as_slurm_does() {
    let h = usr1_run(Some("all"));
    assert!(
        h.manifest_paths("usr1")
            .contains(&"artifacts/worker_got".to_string()),
        "every process gets it: {:?}",
        h.manifest_paths("usr1")
    );
}

#[test]
fn a_stop_that_reaches_the_job_and_the_agent_at_once_is_a_cancel() {
    // scancel and Slurm's time limit: SIGTERM to every process of the step at the same time;
    // the script's death may reach the agent before its own SIGTERM does.
    let h = Harness::file();
    for i in 0..5 {
        let job = format!("both{i}");
        let script = "echo $$ > $C3_ARTIFACTS_DIR/pid; exec sleep 300";
        let spec = h.spec(json!({"job_id": job, "command": ["sh", "-c", script]}));
        let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
        let pidfile = h.workdir(&job).join("artifacts/pid");
        let leader: u32 = wait_for("the job's pid", Duration::from_secs(20), || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        let ok = Command::new("kill")
            .args(["-TERM", &leader.to_string(), &child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        let run = h.wait(format!("run {job}"), child);
        run.assert_code(4);
        assert_eq!(h.terminal(&job)["state"], "CANCELED");
    }
}

/// A trainer that catches the SIGTERM scancel or Slurm's time limit sends every process of
/// the step, checkpoints and exits 0 (or 1) before the agent has handled its own SIGTERM
/// was reported SUCCEEDED (or SCRIPT_ERROR): only a death by SIGTERM/SIGINT (or 143/130)
/// waited for the agent's stop. It was stopped: CANCELED, whatever its exit code.
#[test]
fn a_trainer_that_exits_on_the_stop_before_the_agent_hears_it_is_canceled() {
    let mut h = Harness::file();
    // Under Slurm (whose scancel signals the whole step): elsewhere only the agent is
    // signalled, and a job's end does not wait for a stop that cannot race it. No squeue on
    // this PATH answers for job 1: the stop is taken for a cancel.
    h.env.push(("SLURM_JOB_ID".into(), "1".into()));
    h.env.push(("PATH".into(), "/usr/bin:/bin".into()));
    for (i, code) in [0, 1, 0, 1, 0, 1].into_iter().enumerate() {
        let job = format!("caught{i}");
        let script = format!(
            "echo $$ > $C3_ARTIFACTS_DIR/pid; trap 'echo saved > $C3_ARTIFACTS_DIR/ckpt; exit {code}' TERM; \
             while :; do sleep 0.1; done"
        );
        let spec = h.spec(json!({"job_id": job, "command": ["sh", "-c", script]}));
        let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
        let pidfile = h.workdir(&job).join("artifacts/pid");
        let group: u32 = wait_for("the job's pid", Duration::from_secs(20), || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        // As slurmstepd does: the step's processes first, the batch shell (the agent) a
        // moment later.
        let ok = Command::new("kill")
            .args(["-TERM", "--", &format!("-{group}")])
            .status()
            .unwrap()
            .success();
        assert!(ok);
        std::thread::sleep(Duration::from_millis(50));
        signal(child.id(), "TERM");
        let run = h.wait(format!("run {job}, exit {code} on SIGTERM"), child);
        run.assert_code(4);
        assert_eq!(h.terminal(&job)["state"], "CANCELED", "exit {code}");
        assert!(
            h.manifest_paths(&job)
                .contains(&"artifacts/ckpt".to_string()),
            "the checkpoint it saved on the stop is kept"
        );
    }
}

/// Slurm's time limit and `scancel` both arrive as SIGTERM: the agent asks `squeue` for the
/// job's reason (here a stand-in on PATH that answers what the real one does; the real one
/// is checked by `scripts/slurm_test.py`, scenario b).
#[test]
fn under_slurm_a_stop_for_the_time_limit_is_timed_out_and_scancel_a_cancel() {
    for (reason, state, code) in [("TimeLimit", "TIMED_OUT", 5), ("None", "CANCELED", 4)] {
        let mut h = Harness::file().with_control_plane(10);
        let bin = h.dir.path().join("fake-slurm");
        std::fs::create_dir(&bin).unwrap();
        let asked = h.dir.path().join("squeue-args");
        let squeue = bin.join("squeue");
        std::fs::write(
            &squeue,
            format!(
                "#!/bin/sh\necho \"$@\" \"$SQUEUE_STATES\" > {}\necho {reason}\n",
                asked.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&squeue, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        h.env.push(("PATH".into(), path));
        h.env.push(("SLURM_JOB_ID".into(), "4242".into()));
        // A user's own filter (sbatch exports the environment) is not the agent's ask.
        h.env.push(("SQUEUE_STATES".into(), "PD".into()));
        let script = "echo up > $C3_ARTIFACTS_DIR/started; exec sleep 300";
        let child = spawn_until_started(&h, "limit", json!(["sh", "-c", script]));
        signal(child.id(), "TERM");
        let run = h.wait(format!("run stopped, squeue says {reason}"), child);
        let args = std::fs::read_to_string(&asked)
            .unwrap_or_else(|e| panic!("squeue was not run ({e}):\n{}", run.stderr));
        assert_eq!(
            args.trim(),
            "--noheader --states=all --jobs 4242 --format %r"
        );
        run.assert_code(code);
        assert_eq!(h.terminal("limit")["state"], state, "squeue said {reason}");
        assert!(h
            .manifest_paths("limit")
            .contains(&"artifacts/started".to_string()));
    }
}

/// Under Slurm a stop asks `squeue` why, while the job is stopped; a `squeue` (or a PATH
/// directory before it) on a hung mount never returns from its exec. The spawn held the
/// agent's helper registry across that exec, and every look at the job's processes waited
/// on it: the SIGTERM never reached the job, and the stop deadline was not kept.
#[test]
fn a_stop_under_slurm_is_kept_when_squeues_exec_hangs() {
    let mut h = Harness::file();
    let bin = h.dir.path().join("fake-slurm");
    std::fs::create_dir(&bin).unwrap();
    let squeue = bin.join("squeue");
    std::fs::write(&squeue, "#!/bin/sh\necho TimeLimit\n").unwrap();
    std::fs::set_permissions(&squeue, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    h.env.push(("PATH".into(), path));
    h.env.push(("SLURM_JOB_ID".into(), "4242".into()));
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "10".into()));
    // Every helper's exec hangs (after it named its pid), as on a hung mount.
    h.env
        .push(("C3_AGENT_FAULT".into(), "helper-exec-hangs".into()));
    let script = "echo $$ > $C3_ARTIFACTS_DIR/pid; sleep 300 & echo $! > $C3_ARTIFACTS_DIR/child; \
                  echo up > $C3_ARTIFACTS_DIR/started; wait";
    let mut child = spawn_until_started(&h, "hung", json!(["sh", "-c", script]));
    let artifacts = h.workdir("hung").join("artifacts");
    let pid_of = |name: &str| -> i32 {
        std::fs::read_to_string(artifacts.join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let (leader, worker) = (pid_of("pid"), pid_of("child"));
    let asked = Instant::now();
    signal(child.id(), "TERM");
    // The stop deadline and a margin for a slow machine, not the harness's two minutes.
    let limit = Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() && asked.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let ended = child.try_wait().unwrap().is_some();
    if !ended {
        let _ = child.kill();
    }
    let run = h.wait("run stopped with squeue's exec hung".into(), child);
    assert!(
        ended,
        "the stop took longer than {limit:?} with squeue's exec hung:\n{}",
        run.stderr
    );
    run.assert_code(4);
    assert_eq!(h.terminal("hung")["state"], "CANCELED");
    for pid in [leader, worker] {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        });
        assert!(!alive, "the job's process {pid} outlived the stop");
    }
    assert!(
        run.stderr.contains("squeue did not answer"),
        "{}",
        run.stderr
    );
}

#[test]
fn stop_deadline_leaves_the_final_sync_to_recover() {
    let mut h = Harness::new(Store::s3()).with_control_plane(2);
    h.extra_toml = "[sync]\nlive = false\n".into();
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "2".into()));
    let script = "head -c 100000 /dev/urandom > $C3_ARTIFACTS_DIR/data; \
                  echo up > $C3_ARTIFACTS_DIR/started; exec sleep 300";
    let child = spawn_until_started(&h, "late", json!(["sh", "-c", script]));
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.stop();
    let asked = Instant::now();
    signal(child.id(), "TERM");
    let run = h.wait("run stopped with the store down".into(), child);
    run.assert_code(4);
    assert!(
        run.stdout.contains("c3-agent recover"),
        "says what finishes it: {}",
        run.stdout
    );
    // Bounded (kill grace 1 s + stop deadline 2 s), not the store's 600 s retry deadline.
    assert!(
        asked.elapsed() < Duration::from_secs(30),
        "{:?}",
        asked.elapsed()
    );
    // The control plane hears of the end within the deadline, not only once recover runs
    // (in a pod with an emptyDir state dir, never).
    assert_eq!(states(&h), vec!["RUNNING", "FINALIZING", "CANCELED"]);
    let statuses = h.cp().delivered("/status");
    let at_deadline = statuses.last().unwrap().clone();
    assert!(
        at_deadline["message"]
            .as_str()
            .is_some_and(|m| m.contains("c3-agent recover")),
        "{at_deadline}"
    );
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.restart();
    h.run(&["recover"]).assert_code(4);
    // The same end again, now with everything stored, under a higher seq.
    assert_eq!(
        states(&h),
        vec!["RUNNING", "FINALIZING", "CANCELED", "CANCELED"]
    );
    let amended = h.cp().delivered("/status").last().unwrap().clone();
    assert!(
        amended["seq"].as_u64() > at_deadline["seq"].as_u64(),
        "{at_deadline} then {amended}"
    );
    let m = h.manifest("late");
    assert_eq!(m["complete"], true);
    assert!(h
        .manifest_paths("late")
        .contains(&"artifacts/data".to_string()));
}

/// The script exits 0, and the stop comes while its output is still being stored (a store
/// down): the status the stop deadline sends is FAILED/UPLOAD_ERROR, which the contract lets
/// a completed sync replace. A CANCELED sent then was contradicted by `recover`'s SUCCEEDED.
#[test]
fn a_stop_during_the_final_sync_of_a_job_that_succeeded_sends_what_recover_may_amend() {
    let mut h = Harness::new(Store::s3()).with_control_plane(2);
    h.extra_toml = "[sync]\nlive = false\n".into();
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "2".into()));
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.stop();
    let script = "head -c 100000 /dev/urandom > $C3_ARTIFACTS_DIR/data";
    let spec = h.spec(json!({"job_id": "done0", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("FINALIZING", Duration::from_secs(30), || {
        (h.statuses_in("FINALIZING") > 0).then_some(())
    });
    signal(child.id(), "TERM");
    let run = h.wait("run stopped in its final sync".into(), child);
    assert_ne!(run.code, 0, "{}", run.stderr);
    let cut = h.terminal("done0");
    assert_eq!(
        (cut["state"].as_str(), cut["reason"].as_str()),
        (Some("FAILED"), Some("UPLOAD_ERROR")),
        "{cut}"
    );
    assert_eq!(cut["exit_code"], 0, "{cut}");
    // An UPLOAD_ERROR that counts no upload error contradicts itself: at least one file of
    // the job (here its only one) is not stored.
    assert!(cut["upload_errors"].as_u64() >= Some(1), "{cut}");
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.restart();
    h.run(&["recover"]).assert_code(0);
    let amended = h
        .cp()
        .delivered("/status")
        .into_iter()
        .rev()
        .find(|s| s["state"] != "RUNNING" && s["state"] != "FINALIZING")
        .unwrap();
    assert_eq!(amended["state"], "SUCCEEDED", "{amended}");
    assert!(amended["seq"].as_u64() > cut["seq"].as_u64());
    assert_eq!(h.statuses_in("CANCELED"), 0);
}

/// A v1 memory cgroup (this kind of machine mounts one beside the unified hierarchy)
/// that the job moves itself into, so the kernel's OOM killer really kills it.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn create(name: &str, limit: &str) -> Option<Self> {
        let dir = Path::new("/sys/fs/cgroup/memory").join(name);
        std::fs::create_dir(&dir).ok()?;
        let cg = MemoryCgroup(dir);
        std::fs::write(cg.0.join("memory.limit_in_bytes"), limit).ok()?;
        let _ = std::fs::write(cg.0.join("memory.memsw.limit_in_bytes"), limit);
        Some(cg)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Runs the job `job`, whose `sh -c script` finds a 40 MB v1 memory cgroup in `$CG` to move
/// into (so the kernel's OOM killer really kills it), with a control plane; None where
/// this machine has no writable v1 memory cgroup.
fn run_in_memory_cgroup(job: &str, script: &str) -> Option<(Harness, Run)> {
    let name = format!("c3-e2e-{job}-{}", std::process::id());
    let Some(cg) = MemoryCgroup::create(&name, "40M") else {
        crate::support::skip("no writable v1 memory cgroup here");
        return None;
    };
    let h = Harness::file().with_control_plane(10);
    let script = format!("CG={}; {script}", cg.0.display());
    let run = h.run_job(json!({"job_id": job, "command": ["sh", "-c", script]}));
    drop(cg);
    Some((h, run))
}

#[test]
fn a_job_the_oom_killer_ended_is_out_of_memory() {
    let script = "echo x > $C3_ARTIFACTS_DIR/before; echo $$ > $CG/cgroup.procs; \
                  exec python3 -c 'a = bytearray(400 << 20); print(len(a))'";
    let Some((h, run)) = run_in_memory_cgroup("oom", script) else {
        return;
    };
    run.assert_code(1);
    let t = h.terminal("oom");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("OUT_OF_MEMORY")),
        "{t}"
    );
    assert_eq!(t["signal"], "SIGKILL");
    assert!(t["peak_memory_bytes"].as_u64().is_some(), "{t}");
    assert!(h
        .manifest_paths("oom")
        .contains(&"artifacts/before".to_string()));
}

/// The usual launcher: a shell that runs the trainer as its child (no `exec`), and exits 137
/// when the OOM killer killed that child. The leader itself was never killed.
#[test]
fn a_shell_whose_child_the_oom_killer_ended_is_out_of_memory() {
    // The child lives past the agent's once-a-second look before it grows.
    let script = "echo $$ > $CG/cgroup.procs; \
                  python3 -c 'import time; time.sleep(2.5); a = bytearray(400 << 20)'; exit $?";
    let Some((h, run)) = run_in_memory_cgroup("oomchild", script) else {
        return;
    };
    run.assert_code(1);
    let t = h.terminal("oomchild");
    assert_eq!(
        (
            t["state"].as_str(),
            t["reason"].as_str(),
            t["exit_code"].as_i64()
        ),
        (Some("FAILED"), Some("OUT_OF_MEMORY"), Some(137)),
        "{t}"
    );
}

/// The OOM killer ended the job, and a stop came while the final sync waited on a store that
/// was down: the status sent at the stop deadline said SCRIPT_ERROR, and the one `recover`
/// sent later OUT_OF_MEMORY. Both say OUT_OF_MEMORY.
#[test]
fn an_oom_kill_cut_by_the_stop_deadline_is_out_of_memory() {
    let name = format!("c3-e2e-oomcut-{}", std::process::id());
    let Some(cg) = MemoryCgroup::create(&name, "40M") else {
        crate::support::skip("no writable v1 memory cgroup here");
        return;
    };
    let mut h = Harness::new(Store::s3()).with_control_plane(2);
    h.extra_toml = "[sync]\nlive = false\n".into();
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "2".into()));
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/data; echo up > $C3_ARTIFACTS_DIR/started; \
         while [ ! -e go ]; do sleep 0.1; done; echo $$ > {}/cgroup.procs; \
         exec python3 -c 'a = bytearray(400 << 20)'",
        cg.0.display()
    );
    let child = spawn_until_started(&h, "oomcut", json!(["sh", "-c", script]));
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.stop();
    std::fs::write(h.workdir("oomcut").join("go"), "").unwrap();
    wait_for("the job's end", Duration::from_secs(30), || {
        states(&h).contains(&"FINALIZING".to_string()).then_some(())
    });
    signal(child.id(), "TERM");
    h.wait("run stopped with the store down".into(), child);
    drop(cg);
    let reasons = |h: &Harness| -> Vec<String> {
        h.cp()
            .delivered("/status")
            .iter()
            .filter_map(|s| s["reason"].as_str().map(String::from))
            .collect()
    };
    assert_eq!(reasons(&h), ["OUT_OF_MEMORY"]);
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.restart();
    h.run(&["recover"]);
    assert_eq!(reasons(&h), ["OUT_OF_MEMORY", "OUT_OF_MEMORY"]);
}

#[test]
fn a_script_killed_by_sigkill_without_oom_is_a_script_error() {
    let h = Harness::file();
    let run = h.run_job(json!({"job_id": "k9", "command": ["sh", "-c", "kill -9 $$"]}));
    run.assert_code(1);
    let t = h.terminal("k9");
    assert_eq!(t["reason"], "SCRIPT_ERROR", "{t}");
}

/// `c3-agent watch` as a native sidecar would run it, against a trainer it did not start.
fn watch(h: &Harness, job: &str, extra: &[&str], dirs: &[&Path]) -> std::process::Child {
    let mut args = vec!["watch", "--job-id", job];
    args.extend_from_slice(extra);
    let dirs: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    args.extend(dirs.iter().map(String::as_str));
    h.spawn(&args)
}

/// Waits until the watch of `job` (attempt 1) runs; the path of its run record.
fn running_watch(h: &Harness, job: &str) -> std::path::PathBuf {
    let rec = h.state.join(format!("jobs/{job}/attempts/1/run.json"));
    wait_for("the watch to start", Duration::from_secs(20), || {
        std::fs::read_to_string(&rec)
            .ok()
            .filter(|r| r.contains("\"running\""))
    });
    rec
}

/// A watch of `job` over a trainer that wrote `out/f`, killed once live sync listed the file
/// (a sidecar OOM-killed while the trainer runs): the trainer (running), its pid, the watched
/// dir and the attempt's run record. `extra` follows `--pid PID`.
struct KilledWatch {
    trainer: std::process::Child,
    pid: String,
    out: std::path::PathBuf,
    rec: std::path::PathBuf,
}

fn a_watch_killed_over_its_trainer(h: &Harness, job: &str, extra: &[&str]) -> KilledWatch {
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let trainer = trainer("echo x > out/f; exec sleep 60", &shared);
    let pid = trainer.id().to_string();
    let out = shared.join("out");
    let mut args = vec!["--pid", pid.as_str()];
    args.extend_from_slice(extra);
    let first = watch(h, job, &args, &[&out]);
    let rec = running_watch(h, job);
    // Killed before its echo ran (a loaded host), the trainer left no out/f and a manifest
    // check failed for a reason that is not the test's.
    wait_for("live sync to list out/f", Duration::from_secs(30), || {
        let m = h.object(&format!("jobs/{job}/attempts/1/manifest.json"))?;
        String::from_utf8_lossy(&m).contains("out/f").then_some(())
    });
    signal(first.id(), "KILL");
    let _ = h.wait("killed watch".into(), first);
    KilledWatch {
        trainer,
        pid,
        out,
        rec,
    }
}

fn trainer(script: &str, shared: &Path) -> std::process::Child {
    Command::new("sh")
        .args(["-c", script])
        .current_dir(shared)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn watch_syncs_a_trainer_it_did_not_launch_and_ends_on_the_done_file() {
    let mut h = Harness::file().with_control_plane(10);
    // Its live sync runs gently, on the live CPUs, as `run`'s does.
    h.extra_toml.push_str("[sync]\nlive_cpus = \"0\"\n");
    let shared = h.path("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let done = shared.join(".c3-done");
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "side",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts"), &shared.join("results")],
    );
    // The sidecar starts first; the directories it watches are made for the trainer.
    wait_for("the watched dirs", Duration::from_secs(20), || {
        (shared.join("artifacts").is_dir() && shared.join("results").is_dir()).then_some(())
    });
    let mut t = trainer(
        "mkdir -p artifacts/ckpt && echo w > artifacts/ckpt/model.pt && sleep 1.5 && \
         echo r > results/eval.json && echo 0 > .c3-done",
        &shared,
    );
    assert!(t.wait().unwrap().success());
    let run = h.wait("watch".into(), agent);
    run.assert_code(0);
    assert_eq!(
        h.manifest_paths("side"),
        vec!["artifacts/ckpt/model.pt", "results/eval.json"],
        "each dir under its own name; the done file is not an output"
    );
    assert_eq!(h.manifest("side")["complete"], true);
    assert_eq!(states(&h), vec!["RUNNING", "FINALIZING", "SUCCEEDED"]);
    assert!(
        run.stderr.contains("live_cpus=\"0\""),
        "the watch line names the live CPUs: {}",
        run.stderr
    );
}

/// A stop while the sidecar still asks the store whether the attempt already ran (held 60 s
/// here; up to `preflight_timeout_secs` in life) is heard at once, and the stop deadline
/// counts from the signal: the look was waited out, then the stop clock started, and the
/// sidecar outlived a pod's grace by all of it, its status never sent.
#[test]
fn watch_stopped_during_its_look_at_the_store_ends_by_the_stop_deadline() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "slow-already-ran".into()));
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "3".into()));
    let shared = h.path("shared-look");
    std::fs::create_dir_all(&shared).unwrap();
    let done_arg = shared.join(".c3-done").display().to_string();
    let agent = watch(
        &h,
        "look",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts")],
    );
    crate::support::wait_catches_term(agent.id());
    // As a pod's wrapper does on a deletion, before the sidecar is stopped.
    std::fs::write(shared.join(".c3-done"), "canceled\n").unwrap();
    let asked = Instant::now();
    signal(agent.id(), "TERM");
    let run = h.wait("watch stopped during its look".into(), agent);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "exited {took:?} after SIGTERM (stop deadline 3 s)\n{}",
        run.stderr
    );
    assert_eq!(h.terminal("look")["state"], "CANCELED");
}

/// A retried pod starts its sidecar with the attempt of a run whose complete manifest is in
/// the store (a fresh state dir knows nothing of it); the trainer ends at once and the
/// sidecar is stopped while it still asks the store about that run. The stop was taken as
/// "never ran": the final sync replaced that run's manifest with one of this pod's files
/// (and `gc` could then delete the earlier run's). The attempt is left unclaimed now:
/// CANCELED, nothing stored.
#[test]
fn watch_stopped_before_the_store_answered_leaves_an_earlier_runs_manifest_alone() {
    let mut h = Harness::file();
    h.run_job(
        json!({"job_id": "again", "command": ["sh", "-c", "echo 1 > $C3_ARTIFACTS_DIR/first.txt"]}),
    )
    .assert_code(0);
    let keys = [
        "jobs/again/manifest.json",
        "jobs/again/attempts/1/manifest.json",
    ];
    let stored = |h: &Harness| -> Vec<Vec<u8>> {
        keys.iter()
            .map(|k| h.object(k).unwrap_or_else(|| panic!("no {k}")))
            .collect()
    };
    let before = stored(&h);
    // The retry pod's own state dir.
    std::fs::remove_dir_all(h.state.join("jobs/again")).unwrap();
    // Held at the look, which says so by this marker: a stop sent as soon as the agent
    // catches SIGTERM came, on a loaded machine, while the watched dirs were still being
    // opened (exit 6, nothing watched), not during the look.
    let held = h.path("look-held");
    h.env.push((
        "C3_AGENT_FAULT".into(),
        format!("slow-already-ran@{}", held.display()),
    ));
    let shared = h.path("shared-again");
    std::fs::create_dir_all(shared.join("artifacts")).unwrap();
    std::fs::write(shared.join("artifacts/second.txt"), "2\n").unwrap();
    let done_arg = shared.join(".c3-done").display().to_string();
    let agent = watch(
        &h,
        "again",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts")],
    );
    wait_for("the look", Duration::from_secs(20), || {
        held.exists().then_some(())
    });
    signal(agent.id(), "TERM");
    let run = h.wait("watch stopped during its look".into(), agent);
    assert!(
        stored(&h) == before,
        "the earlier run's manifest was replaced\n{}",
        run.stderr
    );
    run.assert_code(4);
    let terminal = h.terminal("again");
    assert_eq!(terminal["state"], "CANCELED");
    assert!(
        terminal["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing of this watch was stored")),
        "{terminal}"
    );
}

/// The Kubernetes default: a root-owned emptyDir and a root trainer whose checkpoint is
/// 0600 (`tempfile.mkstemp`, then a rename). No job user is named, so the sidecar reads only
/// what anyone may: the checkpoint was skipped with a warning and the job SUCCEEDED without
/// it. It is an upload failure now, named.
#[test]
fn watch_does_not_quietly_leave_out_what_no_named_user_may_read() {
    let h = Harness::file();
    let shared = h.path("shared0");
    std::fs::create_dir_all(&shared).unwrap();
    let done = shared.join(".c3-done");
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "private",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts")],
    );
    wait_for("the watched dir", Duration::from_secs(20), || {
        shared.join("artifacts").is_dir().then_some(())
    });
    let mut t = trainer(
        "echo open > artifacts/open.txt && (umask 077; echo w > artifacts/model.pt) && echo 0 > .c3-done",
        &shared,
    );
    assert!(t.wait().unwrap().success());
    let run = h.wait("watch".into(), agent);
    run.assert_code(3);
    assert!(run.stderr.contains("artifacts/model.pt"), "{}", run.stderr);
    // Named for what it is, not as paths too deep or long.
    assert!(
        run.stderr.contains("open to its owner alone")
            && !run.stderr.contains("paths in it are too deep"),
        "{}",
        run.stderr
    );
    assert_eq!(h.manifest_paths("private"), vec!["artifacts/open.txt"]);
    assert_eq!(h.terminal("private")["reason"], "UPLOAD_ERROR");
}

/// A done file an earlier attempt left in a workdir a retry shares is not this attempt's end:
/// the watch ends when it is written again, with the trainer's files.
#[test]
fn watch_ignores_a_done_file_from_before_it_started() {
    let h = Harness::file();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("artifacts")).unwrap();
    let done = shared.join(".c3-done");
    std::fs::write(&done, "0\n").unwrap();
    // Older than the margin the agent allows for coarse file times.
    std::thread::sleep(Duration::from_millis(2500));
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "stale",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts")],
    );
    let mut t = trainer(
        "sleep 1 && echo w > artifacts/model.pt && echo 0 > .c3-done.tmp && mv .c3-done.tmp .c3-done",
        &shared,
    );
    assert!(t.wait().unwrap().success());
    h.wait("watch".into(), agent).assert_code(0);
    assert_eq!(h.manifest_paths("stale"), vec!["artifacts/model.pt"]);
}

/// A sidecar of `job` watching `shared/out` (with a file in it, `with_file`) killed in its
/// final sync, after its end was recorded (the 2 s pause after the final scan); the done
/// file and the watched dir, for its restart.
fn sidecar_killed_in_its_final_sync(
    h: &mut Harness,
    job: &str,
    with_file: bool,
) -> (String, std::path::PathBuf) {
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done").display().to_string();
    let out = shared.join("out");
    h.env
        .push(("C3_AGENT_FAULT".into(), "after-final-scan".into()));
    let first = watch(h, job, &["--done-file", &done], &[&out]);
    wait_for("RUNNING", Duration::from_secs(20), || {
        states(h).iter().any(|s| s == "RUNNING").then_some(())
    });
    if with_file {
        std::fs::write(out.join("a"), "a").unwrap();
    }
    std::fs::write(&done, "0\n").unwrap();
    wait_for("FINALIZING", Duration::from_secs(20), || {
        states(h).iter().any(|s| s == "FINALIZING").then_some(())
    });
    // FINALIZING is posted as the end is recorded, not after: wait for the record too.
    let record = h.state.join(format!("jobs/{job}/attempts/1/run.json"));
    wait_for("the recorded end", Duration::from_secs(20), || {
        std::fs::read_to_string(&record)
            .ok()
            .filter(|r| r.contains("\"finishing\""))
            .map(|_| ())
    });
    signal(first.id(), "KILL");
    let _ = h.wait("killed watch".into(), first);
    h.env.clear();
    (done, out)
}

/// A sidecar killed in its final sync (its container's memory limit) and restarted finishes
/// that sync from the end it recorded: no RUNNING after FINALIZING, one terminal status.
#[test]
fn a_sidecar_restarted_in_its_final_sync_finishes_it_without_watching_again() {
    let mut h = Harness::file().with_control_plane(10);
    let (done, out) = sidecar_killed_in_its_final_sync(&mut h, "sidefin", true);
    h.wait(
        "watch again".into(),
        watch(&h, "sidefin", &["--done-file", &done], &[&out]),
    )
    .assert_code(0);
    assert_eq!(states(&h), vec!["RUNNING", "FINALIZING", "SUCCEEDED"]);
    assert_eq!(h.manifest_paths("sidefin"), vec!["out/a"]);
}

/// A sidecar killed right after FINALIZING went out, before its final sync began: the end
/// was not yet saved, and the restarted one watched again (a RUNNING after FINALIZING, the
/// done file read anew), as a `recover` ended the attempt AGENT_ERROR though the job exited
/// 0. The end is saved with FINALIZING's record.
#[test]
fn a_sidecar_killed_as_finalizing_went_out_finishes_with_the_end_it_saw() {
    for restart in ["watch", "recover"] {
        let mut h = Harness::file().with_control_plane(10);
        let job = format!("sidegone-{restart}");
        let shared = h.path("shared");
        std::fs::create_dir_all(shared.join("out")).unwrap();
        let done = shared.join("done").display().to_string();
        let out = shared.join("out");
        h.env
            .push(("C3_AGENT_FAULT".into(), "crash-after-gpu-released".into()));
        let first = watch(&h, &job, &["--done-file", &done], &[&out]);
        wait_for("RUNNING", Duration::from_secs(20), || {
            states(&h).iter().any(|s| s == "RUNNING").then_some(())
        });
        std::fs::write(out.join("a"), "a").unwrap();
        std::fs::write(&done, "0\n").unwrap();
        assert_ne!(h.wait("crashed watch".into(), first).code, 0);
        h.env.clear();
        if restart == "watch" {
            h.wait(
                "watch again".into(),
                watch(&h, &job, &["--done-file", &done], &[&out]),
            )
            .assert_code(0);
        } else {
            h.run(&["recover"]).assert_code(0);
        }
        let states = states(&h);
        assert_eq!(
            states.first().map(String::as_str),
            Some("RUNNING"),
            "{restart}: {states:?}"
        );
        assert_eq!(
            states.iter().filter(|s| *s == "RUNNING").count(),
            1,
            "{restart}: {states:?}"
        );
        assert_eq!(
            states.last().map(String::as_str),
            Some("SUCCEEDED"),
            "{restart}: {states:?}"
        );
        assert_eq!(h.manifest_paths(&job), vec!["out/a"], "{restart}");
    }
}

/// A sidecar restarted over a record `recover` finished as lost (its job's end unknown: the
/// sidecar died before it saw one, and `recover`'s AGENT_ERROR may have gone out) finishes
/// it so too: watched again, the attempt went FAILED, RUNNING, SUCCEEDED.
#[test]
fn a_sidecar_restarted_over_an_attempt_recover_found_lost_does_not_watch_again() {
    let mut h = Harness::file().with_control_plane(10);
    let (done, out) = sidecar_killed_in_its_final_sync(&mut h, "sidelost", false);
    // What `recover` leaves of an attempt it found lost and could not finish in its budget.
    let path = h.state.join("jobs/sidelost/attempts/1/run.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["phase"] = json!("finishing");
    record["state"] = json!("FAILED");
    record["exit_code"] = serde_json::Value::Null;
    record["signal"] = serde_json::Value::Null;
    record["reason"] = serde_json::Value::Null;
    std::fs::write(&path, serde_json::to_vec(&record).unwrap()).unwrap();
    let run = h.wait(
        "watch again".into(),
        watch(&h, "sidelost", &["--done-file", &done], &[&out]),
    );
    assert_eq!(
        states(&h),
        vec!["RUNNING", "FINALIZING", "FAILED"],
        "{}",
        run.stderr
    );
    assert_eq!(h.terminal("sidelost")["reason"], "AGENT_ERROR");
}

#[test]
fn watch_reports_the_exit_code_the_done_file_holds() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done");
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "side3",
        &["--done-file", &done_arg],
        &[&shared.join("out")],
    );
    let mut t = trainer("echo partial > out/p; sleep 0.5; echo 3 > done", &shared);
    t.wait().unwrap();
    let run = h.wait("watch".into(), agent);
    run.assert_code(1);
    let term = h.terminal("side3");
    assert_eq!(
        (term["state"].as_str(), term["reason"].as_str()),
        (Some("FAILED"), Some("SCRIPT_ERROR"))
    );
    assert_eq!(term["exit_code"], 3);
    assert_eq!(h.manifest_paths("side3"), vec!["out/p"]);
}

#[test]
fn watch_ends_when_the_watched_process_exits() {
    let h = Harness::file();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("sleep 1; echo x > out/f; sleep 0.5", &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sidepid", &["--pid", &pid], &[&shared.join("out")]);
    t.wait().unwrap();
    let run = h.wait("watch --pid".into(), agent);
    run.assert_code(0);
    assert_eq!(h.manifest_paths("sidepid"), vec!["out/f"]);
    let term = h.terminal("sidepid");
    assert!(
        term["message"]
            .as_str()
            .unwrap_or("")
            .contains("exit code is unknown"),
        "{term}"
    );
}

/// A pid not found at an attempt's first watch, with no done file written, proves no end:
/// refused as before, nothing stored or reported (the done file and a restarted sidecar's
/// earlier record, below, are what prove it).
#[test]
fn watch_of_a_pid_not_found_at_a_first_watch_without_a_done_file_watches_nothing() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    std::fs::write(shared.join("out/f"), "x").unwrap();
    let pid = dead_pid();
    let out = shared.join("out").display().to_string();
    // Nothing proves the job ended (a pid of another namespace reads the same): reported
    // SUCCEEDED, a trainer still running elsewhere would have its later files never stored.
    let run = h.run(&["watch", "--job-id", "gone", "--pid", &pid, &out]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("no such process here"),
        "{}",
        run.stderr
    );
    assert!(h.object("jobs/gone/manifest.json").is_none());
    assert!(states(&h).is_empty(), "{:?}", states(&h));
    let run = h.run(&["watch", "--job-id", "nopid", "--pid", "0", &out]);
    run.assert_code(2);
}

/// A sidecar restarted after the trainer ended takes the done file its wrapper wrote while
/// no sidecar watched as the job's word (an earlier watch of the attempt proves the pid was
/// the job's); at a first watch a done file already there proves nothing (an earlier
/// attempt's, in a shared workdir, reads the same) and the gone pid is refused.
#[test]
fn a_sidecar_restarted_after_its_pid_ended_honours_the_done_file() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done");
    std::fs::write(&done, "0\n").unwrap();
    let stale = dead_pid();
    let (out, done_arg) = (shared.join("out"), done.display().to_string());
    let first = h.run(&[
        "watch",
        "--job-id",
        "gonedone",
        "--pid",
        &stale,
        "--done-file",
        &done_arg,
        &out.display().to_string(),
    ]);
    first.assert_code(2);
    assert!(states(&h).is_empty(), "{:?}", states(&h));
    std::fs::remove_file(&done).unwrap();
    let KilledWatch {
        trainer: mut t,
        pid,
        ..
    } = a_watch_killed_over_its_trainer(&h, "gonedone", &["--done-file", &done_arg]);
    t.kill().unwrap();
    t.wait().unwrap();
    std::fs::write(&done, "3\n").unwrap();
    let run = h.wait(
        "watch again".into(),
        watch(
            &h,
            "gonedone",
            &["--pid", &pid, "--done-file", &done_arg],
            &[&out],
        ),
    );
    run.assert_code(1);
    let term = h.terminal("gonedone");
    assert_eq!(
        (term["state"].as_str(), term["reason"].as_str()),
        (Some("FAILED"), Some("SCRIPT_ERROR")),
        "{term}"
    );
    assert_eq!(term["exit_code"], 3);
    assert_eq!(h.manifest_paths("gonedone"), vec!["out/f"]);
}

/// A sidecar killed while its trainer ran, and restarted after the trainer ended (same
/// `--pid`, now gone), takes the attempt over and finishes it: it exited 2 and left the
/// attempt RUNNING, its files unlisted.
#[test]
fn a_sidecar_restarted_after_its_pid_ended_finishes_the_attempt() {
    let h = Harness::file().with_control_plane(10);
    let KilledWatch {
        trainer: mut t,
        pid,
        out,
        rec,
    } = a_watch_killed_over_its_trainer(&h, "sidere", &[]);
    t.kill().unwrap();
    t.wait().unwrap();
    // The earlier watch's last save did not land (a full state disk): its RUNNING went out
    // with a seq the record does not hold.
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    record["seq"] = json!(0);
    std::fs::write(&rec, serde_json::to_vec(&record).unwrap()).unwrap();
    let run = h.wait(
        "watch again".into(),
        watch(&h, "sidere", &["--pid", &pid], &[&out]),
    );
    run.assert_code(0);
    assert_eq!(h.manifest_paths("sidere"), vec!["out/f"]);
    assert_eq!(states(&h).last().map(String::as_str), Some("SUCCEEDED"));
    let seqs: Vec<u64> = h
        .cp()
        .delivered("/status")
        .iter()
        .map(|s| s["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "a status sent again with a seq already used: {seqs:?}"
    );
}

/// A restarted sidecar whose run record does not parse sets it aside and watches on over the
/// in-progress manifest its earlier watch stored, past every seq sent (it was refused, exit 2,
/// "an unfinished run", and the restart after that began again from seq 0).
#[test]
fn a_sidecar_restarted_over_a_record_that_does_not_parse_watches_on() {
    let h = Harness::file().with_control_plane(10);
    let KilledWatch {
        trainer: mut t,
        pid,
        out,
        rec,
    } = a_watch_killed_over_its_trainer(&h, "sidebad", &[]);
    let mut bytes = std::fs::read(&rec).unwrap();
    bytes.pop();
    std::fs::write(&rec, &bytes).unwrap();
    let again = watch(&h, "sidebad", &["--pid", &pid], &[&out]);
    let aside = h.state.join("jobs/sidebad/attempts/1/run.json.bad");
    wait_for("the restart to watch", Duration::from_secs(30), || {
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).ok()?).ok()?;
        (aside.is_file() && r["phase"] == "running").then_some(())
    });
    t.kill().unwrap();
    t.wait().unwrap();
    let run = crate::faults::exited_within(&h, again, Duration::from_secs(30));
    run.assert_code(0);
    assert_eq!(h.manifest_paths("sidebad"), vec!["out/f"]);
    let term = h.terminal("sidebad");
    assert_eq!(term["state"], "SUCCEEDED", "{term}");
    assert!(term["seq"].as_u64() >= Some(1_000_000), "{term}");
}

/// A sidecar restarted while its attempt's key answers with another job's manifest (a cache
/// or gateway misrouting, likely to pass) leaves the attempt as it is for a later start,
/// exit 6: exit 2 ("not one this agent can take in") failed the pod's job for good.
#[test]
fn a_sidecar_restarted_over_another_jobs_manifest_at_its_key_is_left_for_later() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "other", "command": ["sh", "-c", "echo o > $C3_ARTIFACTS_DIR/o"]}))
        .assert_code(0);
    let foreign = h.object("jobs/other/attempts/1/manifest.json").unwrap();
    let KilledWatch {
        trainer: mut t,
        pid,
        out,
        ..
    } = a_watch_killed_over_its_trainer(&h, "sidefor", &[]);
    let key = "jobs/sidefor/attempts/1/manifest.json";
    h.tamper(key, &foreign);
    let again = h.run(&[
        "watch",
        "--job-id",
        "sidefor",
        "--pid",
        &pid,
        &out.display().to_string(),
    ]);
    t.kill().unwrap();
    t.wait().unwrap();
    again.assert_code(6);
    assert!(again.stderr.contains("another job's"), "{}", again.stderr);
    assert_eq!(h.object(key).unwrap(), foreign);
}

/// A sidecar started again over a finished attempt whose run record no longer parses sets
/// the record aside and finds the complete manifest in the store: nothing to do, no second
/// terminal status (past every seq, the control plane would take it), the manifest as it was.
#[test]
fn a_sidecar_over_a_finished_attempt_whose_record_does_not_parse_does_nothing() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; exec sleep 60", &shared);
    let pid = t.id().to_string();
    let out = shared.join("out");
    let first = watch(&h, "sidedone", &["--pid", &pid], &[&out]);
    running_watch(&h, "sidedone");
    wait_for("the trainer's out/f", Duration::from_secs(20), || {
        (std::fs::read_to_string(out.join("f")).ok()? == "x\n").then_some(())
    });
    t.kill().unwrap();
    t.wait().unwrap();
    h.wait("watch".into(), first).assert_code(0);
    let manifest = h.object("jobs/sidedone/attempts/1/manifest.json").unwrap();
    let sent = states(&h).len();
    let rec = h.state.join("jobs/sidedone/attempts/1/run.json");
    let mut bytes = std::fs::read(&rec).unwrap();
    bytes.pop();
    std::fs::write(&rec, &bytes).unwrap();
    let again = h.run(&[
        "watch",
        "--job-id",
        "sidedone",
        "--pid",
        &pid,
        &out.display().to_string(),
    ]);
    again.assert_code(2);
    assert!(again.stderr.contains("it already ran"), "{}", again.stderr);
    assert_eq!(states(&h).len(), sent, "{:?}", states(&h));
    assert_eq!(
        h.object("jobs/sidedone/attempts/1/manifest.json").unwrap(),
        manifest
    );
}

/// As `a_sidecar_restarted_after_its_pid_ended_finishes_the_attempt`, the leader's pid since
/// taken by another process (here: the record's leader made another start time): the restarted sidecar watched that stranger as the job (here
/// for its whole minute).
#[test]
fn a_sidecar_restarted_after_its_pid_was_reused_finishes_the_attempt() {
    let h = Harness::file().with_control_plane(10);
    let KilledWatch {
        trainer: mut t,
        pid,
        out,
        rec,
    } = a_watch_killed_over_its_trainer(&h, "sidereuse", &[]);
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rec).unwrap()).unwrap();
    let ticks = &mut record["watched_leader"]["start_ticks"];
    *ticks = json!(ticks.as_u64().expect("a recorded leader") - 1);
    std::fs::write(&rec, record.to_string()).unwrap();
    let again = watch(&h, "sidereuse", &["--pid", &pid], &[&out]);
    let run = crate::faults::exited_within(&h, again, Duration::from_secs(30));
    t.kill().unwrap();
    t.wait().unwrap();
    run.assert_code(0);
    assert_eq!(h.manifest_paths("sidereuse"), vec!["out/f"]);
}

/// The pid of a process that ended and was reaped.
fn dead_pid() -> String {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid.to_string()
}

/// A watch of an attempt another run stored (a pod retried with the same `--attempt`, a
/// second sidecar on another node: nothing of it in this node's state dir) replaced that
/// run's manifest with its own. It is refused, as `run` refuses one, naming the next attempt.
#[test]
fn watch_of_an_attempt_stored_elsewhere_is_refused() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "wa", "command": ["sh", "-c", "echo a > $C3_ARTIFACTS_DIR/a"]}))
        .assert_code(0);
    std::fs::remove_dir_all(h.state.join("jobs/wa")).unwrap();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let out = shared.join("out").display().to_string();
    let run = h.run(&["watch", "--job-id", "wa", &out]);
    run.assert_code(2);
    assert!(run.stderr.contains("already ran"), "{}", run.stderr);
    assert_eq!(h.manifest_paths("wa"), vec!["artifacts/a"]);
}

/// A run whose attempt key holds another job's complete manifest (misrouted by a cache or
/// gateway, a copy) was refused as having "already ran": that manifest says nothing of
/// this attempt.
#[test]
fn another_jobs_manifest_at_the_attempts_key_is_no_earlier_run() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "theirs", "command": ["sh", "-c", "echo t > $C3_ARTIFACTS_DIR/t"]}))
        .assert_code(0);
    let foreign = h.object("jobs/theirs/attempts/1/manifest.json").unwrap();
    let key = "jobs/ours/attempts/1/manifest.json";
    std::fs::create_dir_all(h.object_path(key).parent().unwrap()).unwrap();
    h.tamper(key, &foreign);
    let run = h.run_job(
        json!({"job_id": "ours", "command": ["sh", "-c", "echo o > $C3_ARTIFACTS_DIR/o"]}),
    );
    run.assert_code(0);
    assert!(run.stderr.contains("another job's"), "{}", run.stderr);
    assert_eq!(h.manifest_paths("ours"), vec!["artifacts/o"]);
}

/// A watch over a run record that cannot be read (a directory in its place: EISDIR, as a
/// failing disk reads) is refused as the node's fault, retryable elsewhere (exit 6), as `run`
/// refuses one: exit 2 told the scheduler the job itself was bad and failed it for good.
#[test]
fn watch_over_a_record_that_cannot_be_read_is_refused_as_the_nodes_fault() {
    let h = Harness::file().with_control_plane(5);
    let path = h.state.join("jobs/weio/attempts/1/run.json");
    std::fs::create_dir_all(&path).unwrap();
    let out = h.path("shared/out");
    std::fs::create_dir_all(&out).unwrap();
    let run = h.run(&["watch", "--job-id", "weio", out.to_str().unwrap()]);
    run.assert_code(6);
    assert!(
        run.stderr.contains("earlier run record cannot be read")
            || run.stderr.contains("cannot read"),
        "{}",
        run.stderr
    );
    let posted = h.cp().delivered("/status");
    assert!(posted.is_empty(), "{posted:?}");
    assert!(path.is_dir());
}

/// Under Slurm, scancel signals the whole job at once: the watched trainer dies of its
/// SIGTERM as the agent gets its own, and the agent saw the death first. That was SUCCEEDED
/// ("exit code unknown"), a canceled job reported as a success.
#[test]
fn watch_of_a_process_stopped_with_it_is_canceled() {
    let mut h = Harness::file().with_control_plane(10);
    h.env.push(("SLURM_JOB_ID".into(), "4243".into()));
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; exec sleep 60", &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sidekill", &["--pid", &pid], &[&shared.join("out")]);
    running_watch(&h, "sidekill");
    // As scancel does: both at once.
    let both = Command::new("kill")
        .args(["-TERM", &t.id().to_string(), &agent.id().to_string()])
        .status()
        .unwrap();
    assert!(both.success());
    t.wait().unwrap();
    let run = h.wait("watch --pid stopped".into(), agent);
    run.assert_code(4);
    assert_eq!(h.terminal("sidekill")["state"], "CANCELED");
    assert_eq!(h.manifest_paths("sidekill"), vec!["out/f"]);
}

/// The look at what a `--pid` leader left behind reads each process's fds and maps, which
/// can hang (a file open on a dead NFS server; fault point `left-behind-hangs`): the watch
/// waited on it with no bound, SIGTERM heard by nobody, and never synced or reported.
#[test]
fn a_stop_ends_a_watch_whose_look_at_what_was_left_behind_hangs() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "left-behind-hangs".into()));
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; sleep 2", &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sidehang", &["--pid", &pid], &[&shared.join("out")]);
    running_watch(&h, "sidehang");
    t.wait().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    signal(agent.id(), "TERM");
    // The process had ended before the stop: its end, exit code unknown, as without a hang.
    h.wait("watch stopped while its look hangs".into(), agent)
        .assert_code(0);
    assert_eq!(h.manifest_paths("sidehang"), vec!["out/f"]);
}

/// A `--pid` leader that leaves a process running that writes nothing (a TensorBoard, a
/// save still computing): after the wait for it, FINALIZING said the GPU was released while
/// that process, in sight, still ran.
#[test]
fn watch_says_the_gpu_is_not_released_while_a_process_left_behind_runs() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer(
        "echo x > out/f; sleep 30 & echo $! > bg.pid; sleep 2",
        &shared,
    );
    let pid = t.id().to_string();
    let agent = watch(&h, "sideleft2", &["--pid", &pid], &[&shared.join("out")]);
    running_watch(&h, "sideleft2");
    t.wait().unwrap();
    h.wait("watch --pid".into(), agent).assert_code(0);
    let finalizing: Vec<serde_json::Value> = h
        .cp()
        .delivered("/status")
        .into_iter()
        .filter(|s| s["state"] == "FINALIZING")
        .collect();
    let bg = std::fs::read_to_string(shared.join("bg.pid")).unwrap();
    let _ = Command::new("kill").arg(bg.trim()).status();
    assert_eq!(finalizing.len(), 1, "{finalizing:?}");
    assert_eq!(finalizing[0]["gpu_released"], false, "{finalizing:?}");
}

/// The sidecar dies (an OOM kill, a crash) while the job it watches runs, and `recover` (the
/// hourly timer on a Slurm node, a hostPath state dir) comes before its restart: it finished
/// the attempt as AGENT_ERROR with a complete manifest, and the restarted sidecar found it
/// done and stored nothing the job wrote after. It is left alone while the watched process
/// lives, and finished once it is gone.
#[test]
fn recover_leaves_a_watched_job_that_still_runs_to_its_sidecar() {
    let h = Harness::file();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; exec sleep 60", &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sidecrash", &["--pid", &pid], &[&shared.join("out")]);
    let rec = running_watch(&h, "sidecrash");
    signal(agent.id(), "KILL");
    h.wait("watch killed".into(), agent);
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(run.stderr.contains("left to its sidecar"), "{}", run.stderr);
    assert!(std::fs::read_to_string(&rec)
        .unwrap()
        .contains("\"running\""));
    signal(t.id(), "KILL");
    t.wait().unwrap();
    h.run(&["recover"]);
    assert!(std::fs::read_to_string(&rec).unwrap().contains("\"done\""));
}

/// As above, for a sidecar told no pid (the done file its only word on the end): `recover`
/// finished the attempt at once, AGENT_ERROR and retryable while the job still ran (a second
/// copy placed on its GPU), its manifest complete, and the restarted sidecar stored nothing
/// the job wrote after. It is left to the restart, for a bounded wait from the attempt's
/// start; the restart finds the done file written meanwhile.
#[test]
fn recover_leaves_a_sidecar_told_no_pid_to_its_restart() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done").display().to_string();
    let out = shared.join("out");
    let agent = watch(&h, "nopid", &["--done-file", &done], &[&out]);
    let rec = running_watch(&h, "nopid");
    std::fs::write(out.join("early"), "e").unwrap();
    signal(agent.id(), "KILL");
    h.wait("watch killed".into(), agent);
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(
        run.stderr.contains("left to its sidecar's restart"),
        "{}",
        run.stderr
    );
    assert!(std::fs::read_to_string(&rec)
        .unwrap()
        .contains("\"running\""));
    assert!(
        states(&h).iter().all(|s| s == "RUNNING"),
        "{:?}",
        states(&h)
    );
    // The job goes on writing and ends while no sidecar watches; the restart finishes it.
    std::fs::write(out.join("late"), "l").unwrap();
    std::fs::write(&done, "0\n").unwrap();
    h.wait(
        "watch again".into(),
        watch(&h, "nopid", &["--done-file", &done], &[&out]),
    )
    .assert_code(0);
    assert_eq!(h.terminal("nopid")["state"], "SUCCEEDED");
    assert_eq!(h.manifest_paths("nopid"), vec!["out/early", "out/late"]);

    // One whose sidecar never came back is finished once the wait is over.
    let shared = h.path("shared2");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done").display().to_string();
    let agent = watch(
        &h,
        "nopid2",
        &["--done-file", &done],
        &[&shared.join("out")],
    );
    let rec = running_watch(&h, "nopid2");
    signal(agent.id(), "KILL");
    h.wait("watch killed".into(), agent);
    let mut record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&rec).unwrap()).unwrap();
    record["started_at"] = json!("2020-01-01T00:00:00Z");
    std::fs::write(&rec, serde_json::to_vec(&record).unwrap()).unwrap();
    h.run(&["recover"]);
    assert!(std::fs::read_to_string(&rec).unwrap().contains("\"done\""));
}

/// Outside Slurm a stop that comes with the watched process's end is not a cancel: Kubernetes
/// stops a sidecar right after every trainer's end, its own ones included.
#[test]
fn watch_stopped_as_its_process_ends_is_its_end_outside_slurm() {
    let h = Harness::file();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; exec sleep 60", &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sidek8s", &["--pid", &pid], &[&shared.join("out")]);
    running_watch(&h, "sidek8s");
    // The kubelet's order: the trainer's container has ended, then the sidecar is stopped.
    signal(t.id(), "TERM");
    t.wait().unwrap();
    signal(agent.id(), "TERM");
    h.wait("watch --pid stopped".into(), agent).assert_code(0);
    assert_eq!(h.terminal("sidek8s")["state"], "SUCCEEDED");
}

/// A process the `--pid` leader left behind (`save.py &`) still writes the job's files: the
/// watch waits for it (bounded) before its final sync.
#[test]
fn watch_waits_for_what_the_watched_process_left_behind() {
    let h = Harness::file();
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    // It holds its file open while it works, as a `torch.save` does.
    let mut t = trainer(
        "(exec 3> out/late; printf half >&3; sleep 2.5; echo late >&3) & sleep 1.5",
        &shared,
    );
    let pid = t.id().to_string();
    let agent = watch(&h, "sideleft", &["--pid", &pid], &[&shared.join("out")]);
    t.wait().unwrap();
    h.wait("watch --pid".into(), agent).assert_code(0);
    assert_eq!(h.manifest_paths("sideleft"), vec!["out/late"]);
    assert_eq!(
        h.manifest("sideleft")["files"][0]["size"],
        9,
        "stored whole"
    );
}

/// Starts `watch` on `shared/out` (holding one file), waits until it runs, stops it.
fn stopped_watch(h: &Harness, job: &str, extra: &[&str]) -> crate::support::Run {
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    std::fs::write(shared.join("out/a"), "a").unwrap();
    let agent = watch(h, job, extra, &[&shared.join("out")]);
    running_watch(h, job);
    signal(agent.id(), "TERM");
    h.wait(format!("watch {job} stopped"), agent)
}

#[test]
fn watch_stopped_without_a_done_file_or_pid_is_canceled_and_still_synced() {
    let h = Harness::file().with_control_plane(10);
    stopped_watch(&h, "sidestop", &[]).assert_code(4);
    assert_eq!(h.terminal("sidestop")["state"], "CANCELED");
    assert_eq!(h.manifest_paths("sidestop"), vec!["out/a"]);
    assert!(
        !states(&h).contains(&"FINALIZING".to_string()),
        "the job may still hold its GPU"
    );
}

#[test]
fn watch_stopped_before_the_promised_done_file_says_the_job_was_killed() {
    // Kubernetes stops the sidecar only after the trainer's container ended; a wrapper that
    // never wrote its done file was killed with the trainer (the container's OOM kill).
    let h = Harness::file().with_control_plane(10);
    let done = h.path("shared/done").display().to_string();
    stopped_watch(&h, "sidekill", &["--done-file", &done]).assert_code(1);
    let t = h.terminal("sidekill");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("SCRIPT_ERROR"))
    );
    assert!(
        t["message"].as_str().unwrap_or("").contains("done file"),
        "{t}"
    );
    assert_eq!(h.manifest_paths("sidekill"), vec!["out/a"]);
}

/// The trainer wrote its done file, and the sidecar is stopped while its read of it is still
/// under way (a network mount slow just after the last checkpoint; the fault point makes each
/// read take 1 s): the read's answer is the job's end, not "killed".
#[test]
fn watch_stopped_during_a_slow_read_of_the_done_file_takes_its_word() {
    let mut h = Harness::file().with_control_plane(10);
    h.env
        .push(("C3_AGENT_FAULT".into(), "slow-done-read".into()));
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    std::fs::write(shared.join("out/a"), "a").unwrap();
    let done = shared.join("done");
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "sideslow",
        &["--done-file", &done_arg],
        &[&shared.join("out")],
    );
    running_watch(&h, "sideslow");
    // Reads under way from now on take 1 s each: the stop comes before one answers.
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&done, "0\n").unwrap();
    signal(agent.id(), "TERM");
    h.wait("watch stopped".into(), agent).assert_code(0);
    let t = h.terminal("sideslow");
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert_eq!(h.manifest_paths("sideslow"), vec!["out/a"]);
}

#[test]
fn watch_takes_a_canceled_done_file_as_a_cancel_and_a_restart_reports_nothing_twice() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    std::fs::write(shared.join("out/a"), "a").unwrap();
    let done = shared.join("done").display().to_string();
    let out = shared.join("out");
    let first = watch(&h, "sidecan", &["--done-file", &done], &[&out]);
    // Written once the watch runs: one there before it started is an earlier attempt's.
    wait_for("RUNNING", Duration::from_secs(20), || {
        states(&h).iter().any(|s| s == "RUNNING").then_some(())
    });
    std::fs::write(shared.join("done"), "canceled\n").unwrap();
    let run = h.wait("watch".into(), first);
    run.assert_code(4);
    assert_eq!(h.terminal("sidecan")["state"], "CANCELED");
    let reported = h.cp().requests().len();
    // A native sidecar that exited is restarted while the pod still runs.
    let again = h.wait(
        "watch again".into(),
        watch(&h, "sidecan", &["--done-file", &done], &[&out]),
    );
    again.assert_code(4);
    assert_eq!(h.cp().requests().len(), reported, "nothing reported twice");
    // With --stay it waits for the pod's SIGTERM instead of exiting (and being restarted).
    // Stopped once it says it stays: a stop as soon as it caught SIGTERM came, on a loaded
    // machine, while the watched dirs were still being opened (exit 6, nothing watched).
    let mut staying = watch(&h, "sidecan", &["--done-file", &done, "--stay"], &[&out]);
    let (said, stays) = std::sync::mpsc::channel();
    let stderr = staying.stderr.take().unwrap();
    let drained = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            if line.contains("staying until stopped") {
                let _ = said.send(());
            }
            lines.push(line);
        }
        lines.join("\n")
    });
    let heard = stays.recv_timeout(Duration::from_secs(20));
    signal(staying.id(), "TERM");
    let run = h.wait("watch --stay".into(), staying);
    let stderr = drained.join().unwrap();
    assert!(heard.is_ok(), "it never said it stays\n{stderr}");
    assert_eq!(run.code, 4, "{stderr}");
}

#[test]
fn watch_refuses_dirs_without_one_parent() {
    let h = Harness::file();
    let (a, b) = (h.path("a/x"), h.path("b/y"));
    let run = h.run(&[
        "watch",
        "--job-id",
        "bad",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("must share one parent"),
        "{}",
        run.stderr
    );
}

#[test]
fn watch_never_goes_through_a_symlink_to_another_tree() {
    let h = Harness::file();
    let victim = h.path("victim");
    std::fs::create_dir_all(victim.join("out")).unwrap();
    std::fs::write(victim.join("out/secret"), "s").unwrap();
    // A job that owns the scratch dir above its outputs points it elsewhere.
    std::os::unix::fs::symlink(&victim, h.path("scratch")).unwrap();
    let run = h.run(&[
        "watch",
        "--job-id",
        "sym",
        h.path("scratch/out").to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(run.stderr.contains("symlink"), "{}", run.stderr);
    assert!(h.object("jobs/sym/manifest.json").is_none());
}

#[test]
fn a_quick_run_under_slurm_takes_its_job_id_and_attempt_from_slurm() {
    let mut h = Harness::file();
    h.env.push(("SLURM_JOB_ID".into(), "4242".into()));
    h.env.push(("SLURM_RESTART_COUNT".into(), "1".into()));
    let run = h.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "echo $C3_JOB_ID $C3_ATTEMPT > $C3_ARTIFACTS_DIR/id",
    ]);
    run.assert_code(0);
    assert!(h
        .object("jobs/slurm-4242/attempts/2/manifest.json")
        .is_some());
    assert_eq!(
        std::fs::read_to_string(h.dir.path().join("artifacts/id")).unwrap(),
        "slurm-4242 2\n"
    );
    // The platform's own attempt number wins (a Kubernetes Job retried by the platform). The
    // earlier run's ./artifacts is not empty, but it is this job's, from an earlier attempt:
    // a later one starts on it.
    h.run(&["run", "--attempt", "5", "--", "true"])
        .assert_code(0);
    assert!(h
        .object("jobs/slurm-4242/attempts/5/manifest.json")
        .is_some());
    // Another job's files, or those of a later attempt than this one, are refused; --workdir
    // is the way.
    let other = h.run(&["run", "--job-id", "other", "--", "true"]);
    other.assert_code(2);
    assert!(other.stderr.contains("`slurm-4242`"), "{}", other.stderr);
    h.run(&["run", "--attempt", "4", "--", "true"])
        .assert_code(2);
    let again = h.path("again").display().to_string();
    h.run(&[
        "run",
        "--job-id",
        "other",
        "--workdir",
        &again,
        "--",
        "true",
    ])
    .assert_code(0);
    assert!(h.object("jobs/other/manifest.json").is_some());
    // `srun c3-agent run` over several tasks: every rank but 0 is a job of its own (under
    // one id each replaced the others' manifest).
    h.env.push(("SLURM_PROCID".into(), "3".into()));
    let rank = h.path("rank3").display().to_string();
    let ran = h.run(&["run", "--workdir", &rank, "--", "true"]);
    ran.assert_code(0);
    assert!(!ran.stderr.contains("shares ./artifacts"), "{}", ran.stderr);
    assert!(h
        .object("jobs/slurm-4242-rank3/attempts/2/manifest.json")
        .is_some());
    // A rank in the shared directory is told it shares ./artifacts with the others.
    h.env.push(("SLURM_STEP_NUM_TASKS".into(), "4".into()));
    let shared = h.run(&["run", "--job-id", "r3", "--workdir", &rank, "--", "true"]);
    shared.assert_code(0);
    let mut h = h;
    h.env.retain(|(k, _)| k != "SLURM_PROCID");
    std::fs::create_dir_all(h.path("ranks")).unwrap();
    let mut cmd = h.command(&["run", "--job-id", "r0", "--", "true"]);
    cmd.current_dir(h.path("ranks"));
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("shares ./artifacts"), "{stderr}");
}

fn set_env(h: &mut Harness, name: &str, value: &str) {
    h.env.retain(|(k, _)| k != name);
    h.env.push((name.into(), value.into()));
}

/// A requeued Slurm job runs again in its submit dir, where attempt 1 left ./artifacts (its
/// checkpoint): the next attempt of the same job starts on it; another job does not.
#[test]
fn a_requeued_quick_run_resumes_from_what_its_earlier_attempt_left() {
    let mut h = Harness::file();
    set_env(&mut h, "SLURM_JOB_ID", "42");
    set_env(&mut h, "SLURM_RESTART_COUNT", "0");
    h.run(&["run", "--", "sh", "-c", "echo 1 > $C3_ARTIFACTS_DIR/a"])
        .assert_code(0);
    set_env(&mut h, "SLURM_RESTART_COUNT", "1");
    let resume = "test -f $C3_ARTIFACTS_DIR/a && echo resumed > $C3_ARTIFACTS_DIR/b";
    h.run(&["run", "--", "sh", "-c", resume]).assert_code(0);
    let second: serde_json::Value =
        serde_json::from_slice(&h.object("jobs/slurm-42/attempts/2/manifest.json").unwrap())
            .unwrap();
    let paths: Vec<&str> = second["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["artifacts/a", "artifacts/b"]);
    assert_eq!(
        std::fs::read_to_string(h.path("artifacts/b")).unwrap(),
        "resumed\n"
    );
    // The same attempt again, or another job, would take these files for its own.
    let same = h.run(&["run", "--", "true"]);
    same.assert_code(2);
    assert!(
        same.stderr.contains("attempt 2 of job `slurm-42`"),
        "{}",
        same.stderr
    );
    set_env(&mut h, "SLURM_JOB_ID", "43");
    set_env(&mut h, "SLURM_RESTART_COUNT", "2");
    let other = h.run(&["run", "--", "true"]);
    other.assert_code(2);
    assert!(other.stderr.contains("`slurm-42`"), "{}", other.stderr);
    // A marker that is not one (a symlink to a real one, or junk) says nothing: refused.
    let marker = h.path(".c3-agent-job");
    let elsewhere = h.path("marker-elsewhere");
    std::fs::write(&elsewhere, r#"{"job_id":"slurm-43","attempt":1}"#).unwrap();
    std::fs::remove_file(&marker).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &marker).unwrap();
    h.run(&["run", "--", "true"]).assert_code(2);
    std::fs::remove_file(&marker).unwrap();
    std::fs::write(&marker, "x".repeat(5000)).unwrap();
    let junk = h.run(&["run", "--", "true"]);
    junk.assert_code(2);
    assert!(
        junk.stderr.contains("files from an earlier run"),
        "{}",
        junk.stderr
    );
    // Written over a symlink, the marker replaces it and leaves its target alone.
    std::fs::remove_file(&marker).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &marker).unwrap();
    std::fs::remove_dir_all(h.path("artifacts")).unwrap();
    h.run(&["run", "--", "true"]).assert_code(0);
    assert!(!marker.is_symlink());
    assert_eq!(
        std::fs::read_to_string(&elsewhere).unwrap(),
        r#"{"job_id":"slurm-43","attempt":1}"#
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&marker).unwrap()).unwrap();
    assert_eq!(written, json!({"job_id": "slurm-43", "attempt": 3}));
    // An `--output` dir is looked at as `./artifacts` is: another job's checkpoints there
    // were listed as this one's own.
    set_env(&mut h, "SLURM_JOB_ID", "44");
    set_env(&mut h, "SLURM_RESTART_COUNT", "0");
    std::fs::create_dir_all(h.path("ckpt")).unwrap();
    std::fs::write(h.path("ckpt/step-1"), "43's").unwrap();
    let ckpt = h.run(&["run", "--output", "ckpt", "--", "true"]);
    ckpt.assert_code(2);
    assert!(
        ckpt.stderr.contains("ckpt holds files of job `slurm-43`"),
        "{}",
        ckpt.stderr
    );
}

#[test]
fn run_job_id_reads_the_spec_from_the_jobs_root() {
    let h = Harness::file();
    let dir = h.path("jr1");
    std::fs::create_dir_all(&dir).unwrap();
    let spec = json!({"job_id": "jr1", "workdir": h.path("jr1/work").display().to_string(),
        "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"]});
    std::fs::write(dir.join("job.json"), spec.to_string()).unwrap();
    h.run(&["run", "--job-id", "jr1"]).assert_code(0);
    assert_eq!(h.manifest_paths("jr1"), vec!["artifacts/x"]);
    let missing = h.run(&["run", "--job-id", "nope"]);
    missing.assert_code(2);
    assert!(
        missing.stderr.contains("nope/job.json"),
        "{}",
        missing.stderr
    );
}

#[test]
fn systemd_hears_ready_and_status_and_the_job_never_gets_the_socket() {
    use std::os::unix::net::UnixDatagram;
    let mut h = Harness::file();
    let sock_path = h.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    h.env
        .push(("NOTIFY_SOCKET".into(), sock_path.display().to_string()));
    let run =
        h.run_job(json!({"job_id": "sd", "command": ["sh", "-c", "env > $C3_ARTIFACTS_DIR/env"]}));
    run.assert_code(0);
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let all = messages.join("\n");
    assert!(all.contains("READY=1"), "{all}");
    assert!(all.contains("STATUS=running: job pid"), "{all}");
    assert!(all.contains("STATUS=finalizing"), "{all}");
    let env = std::fs::read_to_string(h.workdir("sd").join("artifacts/env")).unwrap();
    assert!(
        !env.contains("NOTIFY_SOCKET"),
        "the job could speak for the agent"
    );
}

#[test]
fn the_systemd_unit_verifies_clean() {
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        crate::support::skip("no systemd-analyze here");
        return;
    };
    assert!(version.status.success());
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/c3-agent@.service"),
    )
    .unwrap();
    // verify checks that ExecStart's binary exists: this build's.
    let unit = unit.replace("/usr/local/bin/c3-agent", crate::support::BIN);
    assert!(unit.contains("Type=notify") && unit.contains("run --job-id=%i"));
    assert!(
        !unit.lines().any(|l| l.starts_with("AssertPathExists")),
        "the config may move the state dir"
    );
    // ProtectKernelTunables= makes fusectl read-only with the rest of /sys: the abort that
    // frees a job process stuck on its own FUSE mount failed with EROFS.
    assert!(
        !unit.lines().any(|l| l == "ProtectKernelTunables=yes")
            || unit
                .lines()
                .any(|l| l == "ReadWritePaths=-/sys/fs/fuse/connections"),
        "fusectl must stay writable for the agent"
    );
    let path = dir.path().join("c3-agent@job1.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_ours: Vec<&str> = stderr.lines().filter(|l| l.contains("c3-agent@")).collect();
    assert!(out.status.success(), "{stderr}");
    assert!(about_ours.is_empty(), "{}", about_ours.join("\n"));
    // The housekeeping pair (recover + gc, at boot and hourly) verifies too. recover exits with
    // the last finished job's code (6 after a crash): that must not stop gc from running.
    let housekeeping = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/c3-agent-housekeeping.service"),
    )
    .unwrap();
    assert!(
        housekeeping
            .lines()
            .any(|l| l == "ExecStart=-/usr/local/bin/c3-agent recover --budget-secs 2700"),
        "a recover that finished a failed job (or had more to do than the unit's timeout) stops the unit before gc"
    );
    for name in [
        "c3-agent-housekeeping.service",
        "c3-agent-housekeeping.timer",
    ] {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../systemd")
                .join(name),
        )
        .unwrap()
        .replace("/usr/local/bin/c3-agent", crate::support::BIN);
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            dir.path()
                .join("c3-agent-housekeeping.timer")
                .to_str()
                .unwrap(),
            dir.path()
                .join("c3-agent-housekeeping.service")
                .to_str()
                .unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("c3-agent-housekeeping"))
        .collect();
    assert!(out.status.success(), "{stderr}");
    assert!(about_ours.is_empty(), "{}", about_ours.join("\n"));
}

#[test]
fn the_gpus_a_job_sees_are_in_its_launch_line() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_LOG_FORMAT".into(), "json".into()));
    let run = h.run_job(
        json!({"job_id": "gpus", "command": ["true"], "env": {"CUDA_VISIBLE_DEVICES": "1,3"}}),
    );
    run.assert_code(0);
    let launched: serde_json::Value = run
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["message"] == "job launched")
        .unwrap();
    assert_eq!(launched["cuda_visible_devices"], "1,3");
}

#[test]
fn recover_removes_empty_job_cgroups_that_dead_agents_left() {
    // Where this process's agents create their jobs' cgroups (cgroup v2, writable: root).
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(own) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        crate::support::skip("no cgroup v2 line in /proc/self/cgroup");
        return;
    };
    let mount = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split_whitespace().nth(4).map(str::to_string))
                .flatten()
        });
    let Some(mount) = mount else {
        crate::support::skip("no cgroup2 mount here");
        return;
    };
    let base = Path::new(&mount).join(own.trim_start_matches('/'));
    let dead = base.join(format!("c3-leaked-1-{}", 4_194_300));
    let live = base.join(format!("c3-busy-1-{}", std::process::id()));
    if std::fs::create_dir(&dead).is_err() {
        crate::support::skip(&format!("cannot create a cgroup in {}", base.display()));
        return;
    }
    std::fs::create_dir(&live).unwrap();
    let h = Harness::file();
    let run = h.run(&["recover"]);
    let (live_survived, dead_gone) = (live.exists(), !dead.exists());
    let _ = std::fs::remove_dir(&live);
    let _ = std::fs::remove_dir(&dead);
    run.assert_code(0);
    assert!(
        live_survived,
        "an agent that still runs keeps its job's cgroup"
    );
    // Gone, by this `recover` or another test's running beside it in the same cgroup (a
    // loaded CI run saw the second: this one's log then said nothing of it).
    assert!(dead_gone, "{}", run.stderr);
}

/// A job that owns the tree above its dirs (its own scratch space) swaps a component for a
/// symlink to another tenant's tree once the sidecar checked it: the sidecar must not scan
/// and store that tree as this job's output.
#[test]
fn watch_never_follows_a_swapped_parent_into_another_tenants_tree() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("scratch/a/b/shared");
    std::fs::create_dir_all(&shared).unwrap();
    let victim = h.path("victim/shared/artifacts");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("secret.txt"), "another tenant's data\n").unwrap();
    let done = h.path("done");
    let done_arg = done.display().to_string();
    let agent = watch(
        &h,
        "swap",
        &["--done-file", &done_arg],
        &[&shared.join("artifacts")],
    );
    wait_for("the watched dir", Duration::from_secs(20), || {
        shared.join("artifacts").is_dir().then_some(())
    });
    std::fs::rename(h.path("scratch/a/b"), h.path("scratch/a/b.orig")).unwrap();
    std::os::unix::fs::symlink(h.path("victim"), h.path("scratch/a/b")).unwrap();
    std::fs::write(&done, "0\n").unwrap();
    let run = h.wait("watch".into(), agent);
    let secret = sha256_hex(b"another tenant's data\n");
    assert!(
        h.object(&format!("blobs/sha256/{secret}")).is_none(),
        "the other tenant's file was stored: {}",
        run.stderr
    );
    let manifest = h.object("jobs/swap/manifest.json").unwrap_or_default();
    assert!(!String::from_utf8_lossy(&manifest).contains("secret"));
    // Refused without going through the link (it could lead to an automount or a dead
    // server, where even a look waits).
    assert!(
        run.stderr
            .contains("the agent never goes through a symlink"),
        "{}",
        run.stderr
    );
    assert_ne!(
        run.code, 0,
        "an output it could not collect is not a success"
    );
}

/// `watch --pid` on a trainer the kernel's OOM killer ends: not a success with an unknown
/// exit code, but what the kernel's log says.
#[test]
fn watch_pid_of_a_trainer_the_oom_killer_ended_is_out_of_memory() {
    let name = format!("c3-e2e-sideoom-{}", std::process::id());
    let Some(cg) = MemoryCgroup::create(&name, "40M") else {
        crate::support::skip("no writable v1 memory cgroup here");
        return;
    };
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let go = shared.join("go");
    // It waits for the agent to know it, then moves into the cgroup and grows.
    let script = format!(
        "echo x > out/before; i=0; while [ ! -e go ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
         echo $$ > {}/cgroup.procs; exec python3 -c 'a = bytearray(400 << 20)'",
        cg.0.display()
    );
    let mut t = trainer(&script, &shared);
    let pid = t.id().to_string();
    let agent = watch(&h, "sideoom", &["--pid", &pid], &[&shared.join("out")]);
    wait_for("the watch to start", Duration::from_secs(20), || {
        (!h.cp().delivered("/status").is_empty()).then_some(())
    });
    std::fs::write(&go, "").unwrap();
    t.wait().unwrap();
    let run = h.wait("watch --pid".into(), agent);
    drop(cg);
    run.assert_code(1);
    let term = h.terminal("sideoom");
    assert_eq!(
        (term["state"].as_str(), term["reason"].as_str()),
        (Some("FAILED"), Some("OUT_OF_MEMORY")),
        "{term}"
    );
    assert_eq!(h.manifest_paths("sideoom"), vec!["out/before"]);
}

/// A stop while the watched trainer still runs (scancel, a pod deletion) is a cancel, even
/// with a done file the trainer had no chance to write.
#[test]
fn watch_stopped_while_its_trainer_runs_is_canceled() {
    let h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let mut t = trainer("echo x > out/f; exec sleep 30", &shared);
    let pid = t.id().to_string();
    let done = shared.join("done").display().to_string();
    let agent = watch(
        &h,
        "sidestop",
        &["--pid", &pid, "--done-file", &done],
        &[&shared.join("out")],
    );
    wait_for("the watch to start", Duration::from_secs(20), || {
        (!h.cp().delivered("/status").is_empty()).then_some(())
    });
    signal(agent.id(), "TERM");
    let run = h.wait("watch stopped".into(), agent);
    let _ = t.kill();
    let _ = t.wait();
    run.assert_code(4);
    assert_eq!(h.terminal("sidestop")["state"], "CANCELED");
}

/// Under systemd the agent asks `systemctl` for its unit's stop timeout while the job runs:
/// that `systemctl` is the agent's helper, never one of the job's processes (the agent's
/// descendants) to be named as left running, signalled and reaped as the job's.
#[test]
fn the_unit_check_is_none_of_the_jobs_processes() {
    let mut h = Harness::file();
    let bin = h.dir.path().join("fake-systemd");
    std::fs::create_dir(&bin).unwrap();
    let asked = h.dir.path().join("systemctl-args");
    let systemctl = bin.join("systemctl");
    std::fs::write(
        &systemctl,
        format!(
            // One process, as systemctl is (a helper's own children are not the agent's to
            // tell from the job's).
            "#!/bin/sh\necho \"$@\" > {}\nexec perl -e 'sleep 2; print \"1s\\n\"'\n",
            asked.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &systemctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    h.env.push(("PATH".into(), path));
    h.env.push(("INVOCATION_ID".into(), "0123abcd".into()));
    h.env
        .push(("C3_AGENT_FAULT".into(), "unitcheck-in-a-unit".into()));
    // The job outlives the start of the check and ends before the check does.
    let script = "while [ ! -s ../systemctl-args ]; do sleep 0.05; done; sleep 0.3";
    let run = h.run_job(json!({"job_id": "u", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let args = std::fs::read_to_string(&asked).unwrap();
    assert!(args.contains("TimeoutStopUSec"), "{args}");
    assert!(
        !run.stderr.contains("left"),
        "the unit check was taken for the job's:\n{}",
        run.stderr
    );
}

/// A sidecar killed right after it kept its artifacts registration (the record says what it
/// registered: `synced`), restarted: the restart took the attempt over from a fresh record
/// that had registered nothing, and registered the attempt's bytes again (the quota charged
/// twice). It goes on from what the earlier one registered.
#[test]
fn a_sidecar_restarted_after_its_registration_does_not_count_its_bytes_twice() {
    let mut h = Harness::file().with_control_plane(10);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    let done = shared.join("done").display().to_string();
    let out = shared.join("out");
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(out.join("data"), &data).unwrap();
    std::fs::write(&done, "0\n").unwrap();
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "crash-after-registration-kept".into(),
    ));
    let first = h.wait(
        "first watch".into(),
        watch(&h, "sidereg", &["--done-file", &done], &[&out]),
    );
    assert_ne!(first.code, 0, "the agent was meant to crash");
    h.env.clear();
    h.wait(
        "watch again".into(),
        watch(&h, "sidereg", &["--done-file", &done], &[&out]),
    )
    .assert_code(0);
    let registrations = h.cp().delivered("/artifacts");
    let registered: u64 = registrations
        .iter()
        .map(|b| b["new_bytes"].as_u64().unwrap())
        .sum();
    assert!(registered >= 4096, "{registrations:?}");
    assert!(registered < 2 * 4096, "counted twice: {registrations:?}");
    assert_eq!(states(&h).last().map(String::as_str), Some("SUCCEEDED"));
}

/// A first watch of an attempt whose key holds a manifest this agent cannot take in (a newer
/// agent's, here version 2, written by another node's sidecar of the attempt): taken for
/// "never ran", the watch sealed its own over it. A watch has no preflight to judge the
/// store: it is left for a later start, exit 6, the manifest as it was.
#[test]
fn a_first_watch_over_a_manifest_it_cannot_take_in_is_left_for_later() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "model", "command": ["sh", "-c", "echo m > $C3_ARTIFACTS_DIR/m"]}))
        .assert_code(0);
    let mut newer: serde_json::Value =
        serde_json::from_slice(&h.object("jobs/model/attempts/1/manifest.json").unwrap()).unwrap();
    newer["job_id"] = json!("sidenew");
    newer["version"] = json!(2);
    let newer = serde_json::to_vec(&newer).unwrap();
    let key = "jobs/sidenew/attempts/1/manifest.json";
    std::fs::create_dir_all(h.object_path(key).parent().unwrap()).unwrap();
    h.tamper(key, &newer);
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("out")).unwrap();
    std::fs::write(shared.join("out/f"), "mine").unwrap();
    let done = shared.join("done").display().to_string();
    let run = h.wait(
        "watch".into(),
        watch(
            &h,
            "sidenew",
            &["--done-file", &done],
            &[&shared.join("out")],
        ),
    );
    run.assert_code(6);
    assert!(run.stderr.contains("cannot take in"), "{}", run.stderr);
    assert_eq!(h.object(key).unwrap(), newer);
}
