//! The run record against what ends an agent early: a full disk, a crash between two of
//! its writes, a rerun of an attempt. Whatever `recover` sends afterwards never contradicts
//! what was already delivered.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{alive, wait_for, Harness};

/// The states of the statuses the control plane took, in order, with their `seq`.
fn statuses(h: &Harness) -> Vec<(String, u64)> {
    h.cp()
        .delivered("/status")
        .iter()
        .map(|s| {
            (
                s["state"].as_str().unwrap().to_string(),
                s["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The terminal statuses (neither RUNNING nor FINALIZING) the control plane took.
fn terminals(h: &Harness) -> Vec<(String, u64)> {
    statuses(h)
        .into_iter()
        .filter(|(state, _)| state != "RUNNING" && state != "FINALIZING")
        .collect()
}

/// The job's filesystem fills once it runs (the fault: no room for a record until a reserve
/// is freed). The record stayed at `running`: the agent delivered SUCCEEDED, and `recover`
/// then sent FAILED/AGENT_ERROR, retryable, with a higher `seq`, and the scheduler ran the
/// finished job again. The attempt's reserve is freed for the record instead.
#[test]
fn a_full_disk_after_the_launch_does_not_let_recover_contradict_the_result() {
    let mut h = Harness::file().with_control_plane(5);
    h.env
        .push(("C3_AGENT_FAULT".into(), "record-write-enospc".into()));
    h.run_job(json!({"job_id": "full", "command": ["sh", "-c", "exit 0"]}))
        .assert_code(0);
    assert_eq!(terminals(&h), vec![("SUCCEEDED".to_string(), 3)]);
    h.env.clear();
    h.run(&["recover"]).assert_code(0);
    let record: Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/full/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        terminals(&h),
        vec![("SUCCEEDED".to_string(), 3)],
        "recover sent another verdict; the record: {record}"
    );
    assert_eq!(record["phase"], "done", "{record}");
    assert!(
        !h.state.join("jobs/full/attempts/1/run.reserve").exists(),
        "a done attempt gives its reserve back"
    );
}

/// The agent dies right after FINALIZING (the job's exit known, its output not yet drained):
/// the record said only `running`, and `recover` sent FAILED/AGENT_ERROR for a job that
/// exited 0. The exit is saved with FINALIZING's record.
/// So is one killed before FINALIZING, while the result file is read (up to 10 s on a
/// hung `.c3`): the exit is saved as soon as it is known.
#[test]
fn a_crash_after_finalizing_keeps_the_known_exit() {
    for (n, point) in ["crash-after-gpu-released", "crash-after-end-noted"]
        .iter()
        .enumerate()
    {
        let mut h = Harness::file().with_control_plane(5);
        h.env.push(("C3_AGENT_FAULT".into(), (*point).into()));
        let job = format!("fin{n}");
        let run = h.run_job(json!({"job_id": job, "command": ["sh", "-c", "exit 0"]}));
        assert_ne!(run.code, 0, "{point}: the agent was meant to crash");
        assert!(terminals(&h).is_empty(), "{:?}", statuses(&h));
        h.env.clear();
        h.run(&["recover"]).assert_code(0);
        let t = h.cp().terminal_status().unwrap();
        assert_eq!(t["state"], "SUCCEEDED", "{point}: {t}");
        assert_eq!(t["exit_code"], 0, "{point}: {t}");
    }
}

/// The agent dies in its final sync, and meanwhile something else writes the job's result
/// file (another job of the user's, the next job placed in the workdir): `recover` sends the
/// result the job left at its end, saved with FINALIZING's record, not what is there now.
#[test]
fn a_crash_after_finalizing_keeps_the_result_read_at_the_end() {
    let mut h = Harness::file().with_control_plane(5);
    h.env
        .push(("C3_AGENT_FAULT".into(), "crash-after-gpu-released".into()));
    let script = "echo '{\"epoch\": 1}' > $C3_RESULT_FILE";
    let run = h.run_job(json!({"job_id": "res", "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    std::fs::write(h.workdir("res").join(".c3/result.json"), "{\"epoch\": 2}\n").unwrap();
    h.env.clear();
    h.run(&["recover"]).assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["result"], json!({"epoch": 1}), "{t}");
    assert_eq!(h.manifest("res")["result"], json!({"epoch": 1}));
}

/// The agent dies right after its SUCCEEDED went out, before its record said so, and the
/// workdir is removed meanwhile (the scheduler cleaned the node): `recover` finished the
/// attempt again, could not see its output dirs any more, and sent FAILED/UPLOAD_ERROR past
/// the SUCCEEDED, though the manifest already listed every file. A conclusion once sent is
/// not made worse by what a later look cannot see.
#[test]
fn a_crash_after_the_terminal_status_went_out_is_not_contradicted_by_recover() {
    let mut h = Harness::file().with_control_plane(5);
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "crash-after-terminal-status".into(),
    ));
    let script = "head -c 4096 /dev/urandom > $C3_ARTIFACTS_DIR/data";
    let run = h.run_job(json!({"job_id": "sent", "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    assert_eq!(terminals(&h).len(), 1, "{:?}", statuses(&h));
    std::fs::remove_dir_all(h.workdir("sent")).unwrap();
    h.env.clear();
    h.run(&["recover"]).assert_code(0);
    let terminal = terminals(&h);
    assert!(
        terminal.iter().all(|(state, _)| state == "SUCCEEDED"),
        "{terminal:?}"
    );
    let last = h.cp().terminal_status().unwrap();
    assert_eq!(last["upload_errors"], 0, "{last}");
    let manifest = h.manifest("sent");
    assert_eq!(manifest["complete"], true, "{manifest}");
    let files = manifest["files"].as_array().unwrap();
    assert!(
        files.iter().any(|f| f["path"] == "artifacts/data"),
        "the manifest still lists the job's file: {manifest}"
    );
    // Done: the next pass has nothing left to do.
    h.run(&["recover"]).assert_code(0);
    assert_eq!(terminals(&h).len(), terminal.len(), "{:?}", statuses(&h));
}

/// The agent dies between keeping its artifacts registration in the outbox and recording
/// that it did: `recover` delivered the kept one, then finished the attempt again as one that
/// registered nothing and sent the same bytes again (the quota charged twice). The record
/// says so before the keep.
#[test]
fn a_crash_after_the_registration_is_kept_does_not_count_its_bytes_twice() {
    let mut h = Harness::file().with_control_plane(5);
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "crash-after-registration-kept".into(),
    ));
    let script = "head -c 4096 /dev/urandom > $C3_ARTIFACTS_DIR/data";
    let run = h.run_job(json!({"job_id": "twice", "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    assert!(h.cp().delivered("/artifacts").is_empty());
    h.env.clear();
    recover_registers_once(&h);
}

/// `recover` delivers the kept registration of the 4 KiB the job wrote, and registers the
/// attempt's bytes no second time; the job SUCCEEDED.
fn recover_registers_once(h: &Harness) {
    h.run(&["recover"]).assert_code(0);
    let registrations = h.cp().delivered("/artifacts");
    assert!(
        !registrations.is_empty(),
        "the kept registration is delivered"
    );
    let first = registrations[0]["new_bytes"].as_u64().unwrap();
    assert!(first >= 4096, "{registrations:?}");
    let registered: u64 = registrations
        .iter()
        .map(|b| b["new_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(registered, first, "{registrations:?}");
    assert_eq!(h.cp().terminal_status().unwrap()["state"], "SUCCEEDED");
}

/// A stop that cuts the reports short keeps the registration in the outbox: recorded as
/// registered first, so a kill right after the keep does not have `recover` deliver the kept
/// one and then register the same bytes again.
#[test]
fn a_crash_after_a_stop_kept_the_registration_does_not_count_its_bytes_twice() {
    let mut h = Harness::file().with_control_plane(60);
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "crash-after-owed-reports-kept".into(),
    ));
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "4".into()));
    h.cp().hold_finalizing(true);
    let script = "head -c 4096 /dev/urandom > $C3_ARTIFACTS_DIR/data";
    let spec = h.spec(json!({"job_id": "cut", "command": ["sh", "-c", script]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // Sealed, and its reports waiting on the FINALIZING the control plane holds.
    wait_for(
        "the manifest and a held FINALIZING",
        Duration::from_secs(30),
        || (h.cp().held() > 0 && h.object("jobs/cut/manifest.json").is_some()).then_some(()),
    );
    std::thread::sleep(Duration::from_millis(300));
    crate::support::signal(agent.id(), "TERM");
    let run = h.wait("run stopped during its reports".into(), agent);
    assert_ne!(run.code, 0, "the agent was meant to crash\n{}", run.stderr);
    assert!(h.cp().delivered("/artifacts").is_empty());
    h.cp().hold_finalizing(false);
    h.env.clear();
    recover_registers_once(&h);
}

/// Runs `job` (`sleep 300`, its pid in `artifacts/job.pid`) under an agent that crashes right
/// after the launch; the pid of the job, which outlives it.
/// The agent sockets in the state dir: each one a dead agent left stays for ever unless
/// the agent that takes its attempt over (a rerun, `recover`) removes it.
fn sockets(h: &Harness) -> usize {
    std::fs::read_dir(h.state.join("run"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
                .count()
        })
        .unwrap_or(0)
}

fn job_outliving_its_crashed_agent(h: &mut Harness, job: &str) -> i32 {
    // The job's cgroup needs root; without it the dead agent's job is found by its marks.
    let fault = if nix::unistd::geteuid().is_root() {
        "crash-after-spawn"
    } else {
        "crash-after-spawn-without-cgroup"
    };
    h.env.push(("C3_AGENT_FAULT".into(), fault.into()));
    let script = "echo $$ > $C3_ARTIFACTS_DIR/job.pid; exec sleep 300";
    let run = h.run_job(json!({"job_id": job, "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    let pid = crate::support::job_pid(h, job);
    assert!(alive(pid), "the job outlived its agent");
    h.env.clear();
    pid
}

/// The agent dies right after starting the job, before the store holds any manifest of the
/// attempt (an OOM kill early on), and the scheduler starts it again with the same spec. The
/// rerun wrote a fresh record over the dead agent's: its job (`sleep 300` here) was named in
/// no record any more and ran on in the same workdir for good. The rerun takes the attempt
/// over: the earlier job is stopped first, and the status is the rerun's.
#[test]
fn a_rerun_of_an_attempt_whose_agent_died_stops_the_earlier_job() {
    let mut h = Harness::file().with_control_plane(5);
    let pid = job_outliving_its_crashed_agent(&mut h, "again");
    assert_eq!(sockets(&h), 1, "the crashed agent's socket");
    let rerun = h.run_job(json!({"job_id": "again", "command": ["true"]}));
    rerun.assert_code(0);
    wait_for(
        "the earlier job to be stopped",
        Duration::from_secs(5),
        || (!alive(pid)).then_some(()),
    );
    assert!(
        rerun
            .stderr
            .contains("taking over an unfinished earlier run"),
        "{}",
        rerun.stderr
    );
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert_eq!(terminals(&h).len(), 1, "{:?}", statuses(&h));
    assert_eq!(sockets(&h), 0, "the dead agent's socket stayed");
}

/// A stop while a rerun stops the earlier run's processes (they outlive SIGTERM, and the
/// kill grace is long) ends the rerun, canceled, without waiting the grace out: the earlier
/// record stays for `recover`.
#[test]
fn a_stop_while_a_rerun_stops_the_earlier_job_is_heard() {
    let mut h = Harness::file();
    let fault = if nix::unistd::geteuid().is_root() {
        "crash-after-spawn"
    } else {
        "crash-after-spawn-without-cgroup"
    };
    h.env.push(("C3_AGENT_FAULT".into(), fault.into()));
    let script = "trap '' TERM; echo $$ > $C3_ARTIFACTS_DIR/job.pid; while :; do sleep 1; done";
    let spec = json!({"job_id": "deaf", "command": ["sh", "-c", script]});
    let run = h.run_job(spec.clone());
    assert_ne!(run.code, 0, "the agent was meant to crash");
    let pid = crate::support::job_pid(&h, "deaf");
    assert!(alive(pid), "the job outlived its agent");
    h.env.clear();
    h.env.push(("C3_AGENT_KILL_GRACE_SECS".into(), "60".into()));
    let path = h.spec(spec);
    let rerun = h.spawn(&["run", "--job", path.to_str().unwrap()]);
    crate::support::wait_catches_term(rerun.id());
    std::thread::sleep(Duration::from_millis(500));
    crate::support::signal(rerun.id(), "TERM");
    let run = crate::faults::exited_within(&h, rerun, Duration::from_secs(20));
    run.assert_code(4);
    // `recover` finishes the earlier record as the attempt's cancel, not its agent's loss
    // (FAILED/AGENT_ERROR, retryable: the platform would run a canceled job again).
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    h.run(&["recover"]);
    assert_eq!(h.terminal("deaf")["state"], "CANCELED");
}

/// `recover` of an attempt whose agent died removes the socket that agent left.
#[test]
fn recover_removes_the_socket_a_dead_agent_left() {
    let mut h = Harness::file();
    job_outliving_its_crashed_agent(&mut h, "sock");
    assert_eq!(sockets(&h), 1, "the crashed agent's socket");
    h.run(&["recover"]);
    assert_eq!(h.terminal("sock")["reason"], "AGENT_ERROR");
    assert_eq!(sockets(&h), 0, "the dead agent's socket stayed");
}

/// The agent dies after its script ended (its end saved with FINALIZING), before the store
/// held a manifest of the attempt; the same spec is run again. Taken over, the script ran
/// again: RUNNING after FINALIZING, and an attempt whose first run failed could end
/// SUCCEEDED. The rerun is refused, and `recover` finishes the attempt from the end it
/// recorded, its `seq`s past the dead agent's (a control plane drops a repeated one as a
/// duplicate), and the log's live posts true to the log.
#[test]
fn a_rerun_of_an_attempt_whose_script_ended_is_left_to_recover() {
    let mut h = Harness::file().with_control_plane(5);
    h.env
        .push(("C3_AGENT_FAULT".into(), "crash-after-gpu-released".into()));
    // The job ends once RUNNING was delivered (FINALIZING goes out as the agent dies, or not).
    let go = h.path("go");
    let script = format!(
        "echo run $$; until [ -e {} ]; do sleep 0.05; done",
        go.display()
    );
    let spec = json!({"job_id": "seqs", "command": ["sh", "-c", script]});
    let path = h.spec(spec.clone());
    let agent = h.spawn(&["run", "--job", path.to_str().unwrap()]);
    wait_for("RUNNING to be delivered", Duration::from_secs(30), || {
        statuses(&h)
            .iter()
            .any(|(s, _)| s == "RUNNING")
            .then_some(())
    });
    std::fs::write(&go, "").unwrap();
    let run = h.wait("the crashing run".into(), agent);
    assert_ne!(run.code, 0, "the agent was meant to crash");
    let first = statuses(&h);
    assert!(
        first.iter().any(|(s, _)| s == "RUNNING"),
        "the dead agent was meant to send RUNNING: {first:?}"
    );
    assert!(
        h.object("jobs/seqs/attempts/1/manifest.json").is_none(),
        "the store was meant to hold no manifest of the attempt, or the rerun is refused"
    );
    h.env.clear();
    let rerun = h.run_job(spec);
    rerun.assert_code(2);
    assert!(rerun.stderr.contains("already ended"), "{}", rerun.stderr);
    h.run(&["recover"]).assert_code(0);
    let all = statuses(&h);
    let mut seqs: Vec<u64> = all.iter().map(|(_, seq)| *seq).collect();
    let terminal = terminals(&h);
    assert_eq!(terminal.len(), 1, "{all:?}");
    assert_eq!(terminal[0].0, "SUCCEEDED", "{all:?}");
    assert_eq!(seqs.iter().max(), Some(&terminal[0].1), "{all:?}");
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), all.len(), "a seq was used twice: {all:?}");
    let log = std::fs::read_to_string(h.state.join("jobs/seqs/attempts/1/stdout.log")).unwrap();
    assert_eq!(
        log.matches("run ").count(),
        1,
        "the script ran again: {log:?}"
    );
    // Every byte posted at an offset is the byte the log holds there.
    for r in h.cp().requests() {
        if r.path.ends_with("/output") && r.body["stream"] == "stdout" {
            let offset = r.body["offset"].as_u64().unwrap() as usize;
            let data = r.body["data"].as_str().unwrap();
            assert_eq!(&log[offset..offset + data.len()], data, "{log:?}");
        }
    }
}

/// A second run of an attempt that ran to its end on this node, let through by a store that
/// did not show its manifest (gone, or a look that could not read it): refused by the
/// attempt's own record. Taken over, the job ran again, its statuses (past the first run's
/// `seq`) went back to RUNNING after SUCCEEDED, and it wrote the attempt's manifest again.
#[test]
fn a_second_run_of_an_attempt_that_ran_here_is_refused_by_its_record() {
    let h = Harness::file().with_control_plane(5);
    h.run_job(json!({"job_id": "again", "command": ["sh", "-c", "echo 1 > $C3_ARTIFACTS_DIR/a"]}))
        .assert_code(0);
    for key in [
        "jobs/again/manifest.json",
        "jobs/again/attempts/1/manifest.json",
    ] {
        std::fs::remove_file(h.object_path(key)).unwrap();
    }
    let before = statuses(&h);
    let run = h.run_job(
        json!({"job_id": "again", "command": ["sh", "-c", "echo 2 > $C3_ARTIFACTS_DIR/a"]}),
    );
    run.assert_code(2);
    assert!(
        run.stderr.contains("already ran on this node"),
        "{}",
        run.stderr
    );
    assert_eq!(statuses(&h), before, "no status after the first run's");
    assert!(h.object("jobs/again/attempts/1/manifest.json").is_none());
}

/// The dead agent's record of the attempt does not parse (cut short here; a newer agent's
/// enum variant after a rollback reads the same) and the scheduler starts the attempt again.
/// The rerun wrote a fresh record over it: the earlier job (`sleep 300`) was never stopped,
/// and `seq` began at 0 again, below the statuses the dead agent sent (dropped by the
/// control plane as duplicates). The record is set aside, the job found by its marks, and
/// `seq` goes on past anything the dead agent can have sent.
#[test]
fn a_rerun_over_a_record_that_does_not_parse_stops_the_earlier_job_and_goes_past_its_seq() {
    let mut h = Harness::file().with_control_plane(5);
    let pid = job_outliving_its_crashed_agent(&mut h, "cut");
    let path = h.state.join("jobs/cut/attempts/1/run.json");
    let mut record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    record["phase"] = json!("running");
    record["seq"] = json!(40);
    let mut bytes = serde_json::to_vec(&record).unwrap();
    let whole = bytes.clone();
    bytes.pop();
    std::fs::write(&path, &bytes).unwrap();
    let before = statuses(&h).len();
    let rerun = h.run_job(json!({"job_id": "cut", "command": ["true"]}));
    rerun.assert_code(0);
    let after = statuses(&h)[before..].to_vec();
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, seq)| *seq > 40),
        "a status at or below the dead agent's seq: {after:?}"
    );
    wait_for(
        "the earlier job to be stopped",
        Duration::from_secs(5),
        || (!alive(pid)).then_some(()),
    );
    let aside = std::fs::read(h.state.join("jobs/cut/attempts/1/run.json.bad"))
        .expect("the record is set aside");
    assert_eq!(aside, whole[..whole.len() - 1], "set aside as it was");
    assert!(rerun.stderr.contains("run.json.bad"), "{}", rerun.stderr);
}

/// A run record that cannot be read at all (here a directory in its place: EISDIR, as an
/// I/O error reads) is never run over: the run is refused as the node's fault (retryable
/// elsewhere), nothing posted, the record's place left as it was.
#[test]
fn a_rerun_over_a_record_that_cannot_be_read_is_refused_as_the_nodes_fault() {
    let h = Harness::file().with_control_plane(5);
    let path = h.state.join("jobs/eio/attempts/1/run.json");
    std::fs::create_dir_all(&path).unwrap();
    let run = h.run_job(json!({"job_id": "eio", "command": ["true"]}));
    run.assert_code(6);
    assert!(
        run.stderr.contains("earlier run record cannot be read"),
        "{}",
        run.stderr
    );
    assert!(statuses(&h).is_empty(), "{:?}", statuses(&h));
    assert!(path.is_dir());
}

/// An attempt whose agent died, after which a later attempt of the job ran in the same
/// (default) workdir: `recover` does not sync what is there as the earlier attempt's, but
/// says its end. Left as it was, it stayed RUNNING at the control plane for good.
#[test]
fn an_attempt_a_later_one_took_the_workdir_from_still_gets_its_terminal_status() {
    let mut h = Harness::file().with_control_plane(5);
    let pid = job_outliving_its_crashed_agent(&mut h, "took");
    h.run_job(json!({"job_id": "took", "attempt": 2, "command": ["true"]}))
        .assert_code(0);
    h.run(&["recover"]);
    let firsts: Vec<_> = h
        .cp()
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/status") && r.body["attempt"] == 1)
        .map(|r| r.body)
        .collect();
    let last = firsts.last().expect("attempt 1's statuses");
    assert_eq!(last["state"], "FAILED", "{firsts:?}");
    assert_eq!(last["reason"], "AGENT_ERROR", "{last}");
    assert!(
        last["message"].as_str().unwrap_or("").contains("attempt 2"),
        "{last}"
    );
    assert!(!alive(pid), "attempt 1's job was left running");
    // Done: the next pass does not say it again.
    let before = h.cp().requests().len();
    h.run(&["recover"]);
    assert!(
        !h.cp().requests()[before..]
            .iter()
            .any(|r| r.path.ends_with("/status") && r.body["attempt"] == 1),
        "said twice"
    );
}

/// A later attempt of a job starting in the workdir of an earlier one that another process
/// holds (`recover` finishing it after its agent died, `resync`, its own agent's final sync
/// after a stop; here the test holds its lock) waits for it before touching the workdir: a
/// `recover` already past its look for later attempts scanned this run's files as the earlier
/// attempt's, forgot what that one had listed (gc then took its blobs), and took this run's
/// result for its own.
#[test]
fn a_later_attempt_waits_for_an_earlier_one_being_finished_in_its_workdir() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "wait", "command": ["true"]}))
        .assert_code(0);
    let lock = std::fs::File::options()
        .read(true)
        .write(true)
        .open(h.state.join("jobs/wait/attempts/1/lock"))
        .unwrap();
    lock.lock().unwrap();
    let marker = h.path("launched");
    let spec = h.spec(
        json!({"job_id": "wait", "attempt": 2, "command": ["touch", marker.display().to_string()]}),
    );
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // Saved just before the wait: from then on it waits, or launches (the old code).
    wait_for("attempt 2's record", Duration::from_secs(30), || {
        h.state
            .join("jobs/wait/attempts/2/run.json")
            .is_file()
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !marker.exists(),
        "attempt 2 launched while attempt 1 was held"
    );
    lock.unlock().unwrap();
    let run = h.wait("attempt 2".into(), agent);
    run.assert_code(0);
    assert!(marker.exists());
    assert!(
        run.stderr
            .contains("waiting for it before the workdir is touched"),
        "{}",
        run.stderr
    );
}
