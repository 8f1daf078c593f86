//! Crash paths: whatever goes wrong inside the agent, the job's processes are stopped and
//! reaped, its status is kept, and the exit code is one of the contract's.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;

use crate::support::{alive, wait_for, Harness};

/// The reader of the agent's stdout and stderr goes away (`| head -1`, journald restarted).
#[test]
fn closed_stdout_and_stderr_do_not_kill_the_agent() {
    let h = Harness::file();
    let spec = h.spec(json!({"job_id": "deaf", "command": ["sh", "-c",
        "i=0; while [ $i -lt 300 ]; do echo line $i; echo err $i >&2; i=$((i+1)); done; echo x > $C3_ARTIFACTS_DIR/f"]}));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    let status = wait_for("the agent to exit", Duration::from_secs(60), || {
        child.try_wait().unwrap()
    });
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(h.terminal("deaf")["state"], "SUCCEEDED");
    assert_eq!(h.manifest_paths("deaf"), vec!["artifacts/f"]);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/deaf/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["phase"], "done");
}

/// A panic inside the agent while the job runs (injected: debug builds only).
#[test]
fn a_panic_stops_the_job_and_finishes_it_as_recover_would() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_FAULT".into(), "after-launch".into()));
    let script = "trap '' TERM; setsid sh -c 'echo $$ > $C3_ARTIFACTS_DIR/esc.pid; exec sleep 300' & sleep 30";
    let run = h.run_job(json!({"job_id": "boom", "command": ["sh", "-c", script]}));
    run.assert_code(6);
    // One log line, as every error (the default hook's raw block escaped the journal's levels).
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("the agent panicked: injected fault")),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("RUST_BACKTRACE"), "{}", run.stderr);
    let t = h.terminal("boom");
    assert_eq!(t["state"], "FAILED", "{t}");
    assert_eq!(t["reason"], "AGENT_ERROR", "{t}");
    assert_eq!(h.manifest("boom")["complete"], true);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/boom/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["phase"], "done");
    if let Ok(pid) = std::fs::read_to_string(h.workdir("boom").join("artifacts/esc.pid")) {
        let pid: i32 = pid.trim().parse().unwrap();
        assert!(
            !alive(pid),
            "a process of the job outlived the agent's panic"
        );
    }
}

/// A panic, then, while the job is finished as `recover` would, a result read that never
/// answers (a FUSE mount the job left in `.c3`): given up after its limit, the status is
/// sent, and the agent exits. The panic path's runtime was dropped without being shut down,
/// which waits for every blocking task: the process never exited.
#[test]
fn a_panic_path_with_a_hung_result_read_still_exits() {
    let mut h = Harness::file();
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "after-launch+result-read-hangs".into(),
    ));
    let script = "echo '{\"a\": 1}' > $C3_RESULT_FILE; sleep 30";
    let run = run_within(
        &h,
        json!({"job_id": "boomhang", "command": ["sh", "-c", script]}),
        Duration::from_secs(60),
    );
    run.assert_code(6);
    let t = h.terminal("boomhang");
    assert_eq!(t["reason"], "AGENT_ERROR", "{t}");
}

/// A stop (SIGTERM) while a panic's job is being finished, the store down so that the final
/// sync retries: the panic path's runtime listened for no signal (the first runtime's
/// handler took it, and nothing read it) and had no stop clock, so it went on until
/// `retry_deadline_secs`, past the kill a scheduler sends after the stop deadline, and no
/// status came. It ends by the stop deadline, with the cut path's status; one that comes
/// while the panic path stops the job (its kill grace: no runtime reads signals) counts from
/// when it came.
#[test]
fn a_stop_during_the_panic_path_ends_it_by_the_stop_deadline() {
    let mut s3 = crate::support::S3Server::start();
    s3.retry_deadline_secs = 90;
    let mut h = Harness::new(crate::support::Store::File);
    h.extra_toml = format!("[job]\nstop_deadline_secs = 10\n{}", s3.store_toml("pre"));
    h.env.push(("C3_AGENT_FAULT".into(), "after-launch".into()));
    h.env.push(("C3_AGENT_KILL_GRACE_SECS".into(), "6".into()));
    // TERM noted and outlived: the panic path's stop of the job takes its whole grace, and
    // the agent's stop comes inside it, while no runtime reads signals (it was swallowed).
    let script = "trap 'echo t > $C3_ARTIFACTS_DIR/termed' TERM; echo x > $C3_ARTIFACTS_DIR/a; while :; do sleep 30 & wait; done";
    let spec = h.spec(json!({"job_id": "boomstop", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the job to start", Duration::from_secs(20), || {
        h.workdir("boomstop")
            .join("artifacts/a")
            .exists()
            .then_some(())
    });
    s3.stop();
    wait_for(
        "the panic path's stop of the job",
        Duration::from_secs(20),
        || {
            h.workdir("boomstop")
                .join("artifacts/termed")
                .exists()
                .then_some(())
        },
    );
    crate::support::signal(child.id(), "TERM");
    // By the stop deadline, counted from the signal (a scheduler's kill follows it by as
    // much), and a moment for the exit: heard only once the grace was over, it was counted
    // from then, 6 s late.
    let run = exited_within(&h, child, Duration::from_secs(10 + 2));
    assert!(
        run.stderr.contains("the agent panicked: injected fault"),
        "{}",
        run.stderr
    );
    let t = h.terminal("boomstop");
    assert!(
        t["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped before the final sync was done")),
        "{t}"
    );
}

/// An UPLOAD_ERROR does not cost a re-run: the files stay on the node, and once the store
/// works again `resync` stores them, writes the complete manifest and amends the status.
#[test]
fn resync_completes_an_upload_error_job_with_a_higher_seq() {
    let h = Harness::file();
    let blobs = h.state.join("store/blobs");
    let script = format!(
        "echo one > $C3_ARTIFACTS_DIR/a; echo two > $C3_ARTIFACTS_DIR/b; rm -rf '{0}' && touch '{0}'",
        blobs.display()
    );
    h.run_job(json!({"job_id": "later", "command": ["sh", "-c", script]}))
        .assert_code(3);
    let failed = h.terminal("later");
    assert_eq!(failed["reason"], "UPLOAD_ERROR");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/later/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert!(
        !record["unstored"].as_array().unwrap().is_empty(),
        "the state dir lists what is left: {record}"
    );
    // The store is mended.
    std::fs::remove_file(&blobs).unwrap();
    let run = h.run(&["resync", "later"]);
    run.assert_code(0);
    assert!(run.stdout.contains("SUCCEEDED"), "{}", run.stdout);
    let statuses: Vec<serde_json::Value> = h
        .local_reports("later")
        .into_iter()
        .filter(|r| r["endpoint"].as_str().unwrap().ends_with("/status"))
        .map(|r| r["body"].clone())
        .collect();
    let last = statuses.last().unwrap();
    assert_eq!(last["state"], "SUCCEEDED", "{statuses:?}");
    assert!(
        last["seq"].as_u64() > failed["seq"].as_u64(),
        "{statuses:?}"
    );
    let m = h.manifest("later");
    assert_eq!(m["complete"], true);
    assert_eq!(
        h.manifest_paths("later"),
        vec!["artifacts/a", "artifacts/b"]
    );
    // Nothing left: a second resync has nothing to do.
    let again = h.run(&["resync", "later"]);
    again.assert_code(0);
    assert!(again.stdout.contains("nothing left"), "{}", again.stdout);
    h.run(&["resync", "no-such-job"]).assert_code(1);
    // As `run` exits: a script's failure is not "stored and succeeded".
    h.run_job(json!({"job_id": "failed", "command": ["sh", "-c", "exit 3"]}))
        .assert_code(1);
    let failed = h.run(&["resync", "failed"]);
    failed.assert_code(1);
    assert!(failed.stdout.contains("SCRIPT_ERROR"), "{}", failed.stdout);
}

/// A store outage shorter than `retry_deadline_secs` is absorbed: the job SUCCEEDS, with one
/// WARN when the outage starts and one when it ends (not a line per retry).
#[test]
fn a_store_outage_shorter_than_the_deadline_is_not_a_failure() {
    let mut s3 = crate::support::S3Server::start();
    s3.retry_deadline_secs = 60;
    let mut h = Harness::new(crate::support::Store::File);
    h.extra_toml = format!("[sync]\nsettle_ms = 100\n{}", s3.store_toml("pre"));
    let back = h.path("back");
    let script = format!(
        "echo during > $C3_ARTIFACTS_DIR/a; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo after > $C3_ARTIFACTS_DIR/b",
        back.display()
    );
    let spec = h.spec(json!({"job_id": "blink", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the job to start", Duration::from_secs(20), || {
        h.workdir("blink")
            .join("artifacts/a")
            .exists()
            .then_some(())
    });
    s3.stop();
    std::thread::sleep(Duration::from_secs(4));
    s3.restart();
    std::fs::write(&back, "").unwrap();
    let run = h.wait("blink".into(), child);
    run.assert_code(0);
    let paths: Vec<String> = {
        let bytes = std::fs::read(
            s3.root
                .path()
                .join(&s3.bucket)
                .join("pre/jobs/blink/manifest.json"),
        )
        .unwrap();
        let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(paths, vec!["artifacts/a", "artifacts/b"]);
    let started = run.stderr.matches("store is failing").count();
    let ended = run.stderr.matches("store answers again").count();
    assert!(started >= 1 && started == ended, "{}", run.stderr);
    assert!(
        run.stderr.lines().count() < 60,
        "an outage is a few lines, not one per retry:\n{}",
        run.stderr
    );
}

/// The agent dies right after starting the script, before it recorded the launch: `recover`
/// still finds the job's processes (through the cgroup recorded before the launch) and stops
/// them, and the attempt ends AGENT_ERROR with a complete manifest.
#[test]
fn recover_stops_a_job_whose_agent_died_right_after_spawning_it() {
    if !nix::unistd::geteuid().is_root() {
        crate::support::skip("needs root (the job's cgroup)");
        return;
    }
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "crash-after-spawn".into()));
    let script = "trap '' TERM; echo $$ > $C3_ARTIFACTS_DIR/job.pid; echo out > $C3_ARTIFACTS_DIR/f; sleep 300";
    let run = h.run_job(json!({"job_id": "orph", "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    let pid = crate::support::job_pid(&h, "orph");
    assert!(
        alive(pid),
        "the job outlived its agent, as it would after a SIGKILL"
    );
    h.env.clear();
    h.run(&["recover"]).assert_code(6);
    wait_for("the job to be stopped", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    let t = h.terminal("orph");
    assert_eq!(t["reason"], "AGENT_ERROR", "{t}");
    assert_eq!(h.manifest("orph")["complete"], true);
    assert!(h
        .manifest_paths("orph")
        .contains(&"artifacts/f".to_string()));
}

/// The same where no cgroup holds the job (a node without a writable cgroup v2): the agent
/// dies after the launch and before it recorded the job's leader, and `recover` finds the
/// job's processes by their marks (their user, `C3_JOB_ID`, `C3_ATTEMPT`, started after the
/// agent). It signalled nothing and ended the attempt as one that never launched, with no
/// manifest, while the job went on holding the GPU.
#[test]
fn recover_stops_a_job_launched_without_cgroup_whose_agent_died_at_once() {
    let mut h = Harness::file();
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "crash-after-spawn-without-cgroup".into(),
    ));
    let script = "trap '' TERM; echo $$ > $C3_ARTIFACTS_DIR/job.pid; echo out > $C3_ARTIFACTS_DIR/f; sleep 300";
    let run = h.run_job(json!({"job_id": "orphan", "command": ["sh", "-c", script]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/orphan/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert!(
        record["cgroup"].is_null() && record["phase"] == "preparing",
        "the job was meant to run without a cgroup, its launch unrecorded: {record}"
    );
    let pid = crate::support::job_pid(&h, "orphan");
    assert!(alive(pid), "the job outlived its agent");
    h.env.clear();
    h.run(&["recover"]).assert_code(6);
    wait_for("the job to be stopped", Duration::from_secs(5), || {
        (!alive(pid)).then_some(())
    });
    let t = h.terminal("orphan");
    assert_eq!(t["reason"], "AGENT_ERROR", "{t}");
    assert!(h
        .manifest_paths("orphan")
        .contains(&"artifacts/f".to_string()));
}

/// Attempt 1 ends UPLOAD_ERROR (the store broke), attempt 2 succeeds with other files, and
/// then `recover` stores what attempt 1 left: attempt 1's manifest goes to its own key and is
/// registered there, while the job's manifest stays attempt 2's (every `recover` that came
/// back for the older attempt overwrote it with attempt 1's).
#[test]
fn recover_of_an_older_attempt_leaves_the_job_manifest_to_the_newer_one() {
    let mut h = Harness::file();
    let blobs = h.state.join("store/blobs");
    let first = format!(
        "echo first > $C3_ARTIFACTS_DIR/a1; rm -rf '{0}' && touch '{0}'",
        blobs.display()
    );
    older_attempt_recovered(&mut h, &first, |_| std::fs::remove_file(&blobs).unwrap());
}

/// The same on S3, where the job's manifest is replaced only by a conditional put: the store
/// is down for attempt 1 (none of its manifests is written then), back for attempt 2.
#[test]
fn s3_recover_of_an_older_attempt_leaves_the_job_manifest_to_the_newer_one() {
    let mut h = Harness::new(crate::support::Store::s3());
    if let crate::support::Store::S3(s3) = &mut h.store {
        s3.stop();
    }
    older_attempt_recovered(&mut h, "echo first > $C3_ARTIFACTS_DIR/a1", |h| {
        if let crate::support::Store::S3(s3) = &mut h.store {
            s3.restart();
        }
    });
}

fn older_attempt_recovered(h: &mut Harness, first: &str, mend: impl FnOnce(&mut Harness)) {
    let spec = |h: &Harness, attempt: u32, script: &str| {
        json!({"job_id": "again", "attempt": attempt, "command": ["sh", "-c", script],
               "workdir": h.path(&format!("w{attempt}")).display().to_string()})
    };
    h.run_job(spec(h, 1, first)).assert_code(3);
    assert_eq!(h.terminal("again")["reason"], "UPLOAD_ERROR");
    mend(h);
    let second = spec(h, 2, "echo second attempt > $C3_ARTIFACTS_DIR/a2");
    h.run_job(second).assert_code(0);
    let newest = h.manifest("again");
    assert_eq!(newest["attempt"], 2, "{newest}");

    let run = h.run(&["recover"]);
    run.assert_code(0);
    // Attempt 1 was finished again: its files are stored, under its own key.
    let own: serde_json::Value = serde_json::from_slice(
        &h.object("jobs/again/attempts/1/manifest.json")
            .expect("attempt 1's manifest"),
    )
    .unwrap();
    assert_eq!(own["attempt"], 1, "{own}");
    assert_eq!(own["files"][0]["path"], "artifacts/a1", "{own}");
    // The job's manifest is attempt 2's, as attempt 2 wrote it.
    assert_eq!(h.manifest("again"), newest, "{}", run.stderr);
    assert_eq!(h.manifest_paths("again"), vec!["artifacts/a2"]);
    assert_eq!(
        newest["files"][0]["sha256"],
        crate::support::sha256_hex(b"second attempt\n")
    );
    // Attempt 1's registration names the manifest it wrote, not the job's.
    let registered: Vec<serde_json::Value> = h
        .local_reports("again")
        .into_iter()
        .filter(|r| r["endpoint"].as_str().unwrap().ends_with("/artifacts"))
        .map(|r| r["body"].clone())
        .collect();
    assert_eq!(
        registered.last().unwrap()["manifest"],
        "jobs/again/attempts/1/manifest.json",
        "{registered:?}"
    );
}

/// Attempt 1 ends UPLOAD_ERROR (the store broke), and attempt 2 runs in the same workdir (the
/// default one: a retry resumes from what the first left) and succeeds. `recover` finished
/// attempt 1 again from what was there now, attempt 2's files: attempt 1's manifest was
/// replaced by one listing attempt 2's output, and its status amended. It is left alone, and
/// retention lets the job go once attempt 2 may go.
#[test]
fn recover_leaves_an_attempt_whose_workdir_a_later_one_took_over() {
    let mut h = Harness::file();
    let blobs = h.state.join("store/blobs");
    let spec = |attempt: u32, script: String| json!({"job_id": "retried", "attempt": attempt, "command": ["sh", "-c", script]});
    let first = format!(
        "echo first > $C3_ARTIFACTS_DIR/a1; rm -rf '{0}' && touch '{0}'",
        blobs.display()
    );
    h.run_job(spec(1, first)).assert_code(3);
    assert_eq!(h.terminal("retried")["reason"], "UPLOAD_ERROR");
    let own_key = "jobs/retried/attempts/1/manifest.json";
    let before = h.object(own_key);
    std::fs::remove_file(&blobs).unwrap();
    h.run_job(spec(
        2,
        "rm $C3_ARTIFACTS_DIR/a1; echo second > $C3_ARTIFACTS_DIR/a2".into(),
    ))
    .assert_code(0);
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(run.stderr.contains("left alone"), "{}", run.stderr);
    assert_eq!(
        h.object(own_key),
        before,
        "attempt 1's manifest was written again"
    );
    assert_eq!(h.manifest_paths("retried"), vec!["artifacts/a2"]);

    h.env
        .push(("C3_AGENT_RETENTION_FAILED_DAYS".into(), "0".into()));
    h.env
        .push(("C3_AGENT_RETENTION_SUCCEEDED_DAYS".into(), "0".into()));
    h.run(&["recover"]).assert_code(0);
    assert!(!h.state.join("jobs/retried").exists(), "the job was kept");
}

/// Job `one` in the workdir `shared`, ended UPLOAD_ERROR (its store broken while it ran: its
/// file `a1` unstored), the store mended after; returns the harness and the workdir.
fn first_of_two_in_one_workdir() -> (Harness, String) {
    let h = Harness::file();
    let blobs = h.state.join("store/blobs");
    let work = h.path("shared").display().to_string();
    let first = format!(
        "echo first > $C3_ARTIFACTS_DIR/a1; rm -rf '{0}' && touch '{0}'",
        blobs.display()
    );
    h.run_job(json!({"job_id": "one", "workdir": work, "command": ["sh", "-c", first]}))
        .assert_code(3);
    std::fs::remove_file(&blobs).unwrap();
    (h, work)
}

/// Two jobs given the same workdir: the first ends UPLOAD_ERROR (the store broke), the second
/// runs there later, removes the first's file and leaves its own. `recover` finished the first
/// again from what the second left: its manifest listed the second's file as its own.
#[test]
fn recover_leaves_a_done_attempt_whose_workdir_another_job_used_since() {
    let (h, work) = first_of_two_in_one_workdir();
    let own_key = "jobs/one/attempts/1/manifest.json";
    let before = h.object(own_key);
    let second = "rm $C3_ARTIFACTS_DIR/a1; echo second > $C3_ARTIFACTS_DIR/a2";
    h.run_job(json!({"job_id": "two", "workdir": work, "command": ["sh", "-c", second]}))
        .assert_code(0);
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(run.stderr.contains("another job ran"), "{}", run.stderr);
    assert_eq!(
        h.object(own_key),
        before,
        "the first job's manifest was written again"
    );
    // Not looked at again each hour, and retention lets it go.
    let again = h.run(&["recover"]);
    assert!(
        !again.stderr.contains("another job ran"),
        "{}",
        again.stderr
    );
    let mut h = h;
    h.env
        .push(("C3_AGENT_RETENTION_FAILED_DAYS".into(), "0".into()));
    h.env
        .push(("C3_AGENT_RETENTION_SUCCEEDED_DAYS".into(), "0".into()));
    h.run(&["recover"]).assert_code(0);
    assert!(!h.state.join("jobs/one").exists(), "the job was kept");
}

/// A job whose spec names another job's workdir but never used it (its prepare failed:
/// here its user does not exist) takes nothing from the first: `recover` still stores what
/// the first left unstored.
#[test]
fn a_job_that_never_opened_the_workdir_does_not_take_it_over() {
    let (h, work) = first_of_two_in_one_workdir();
    let run = h.run_job(
        json!({"job_id": "two", "workdir": work, "user": "c3-no-such-user",
        "command": ["true"]}),
    );
    assert_ne!(run.code, 0);
    let run = h.run(&["recover"]);
    assert!(!run.stderr.contains("another job ran"), "{}", run.stderr);
    assert_eq!(
        h.manifest_paths("one"),
        vec!["artifacts/a1"],
        "{}",
        run.stderr
    );
}

/// A job leaves an entry deeper than a manifest path may be: UPLOAD_ERROR, as the contract
/// says, but no later look can store it, so `recover` leaves the attempt alone (it redid it
/// every hour: a rescan and rehash as root, new manifests, another registration and status,
/// exit 3), `status` says so, and retention lets the job go when it is old enough.
#[test]
fn output_the_job_made_unstorable_is_not_recovered_again_and_again() {
    let mut h = Harness::file().with_control_plane(5);
    let script = "d=$C3_ARTIFACTS_DIR; i=0; while [ $i -lt 130 ]; do d=$d/d; i=$((i+1)); done; \
                  mkdir -p $d && echo deep > $d/f && echo ok > $C3_ARTIFACTS_DIR/ok";
    let run = h.run_job(json!({"job_id": "deep", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    let t = h.terminal("deep");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert_eq!(t["upload_errors"], 1, "{t}");
    assert_eq!(h.manifest_paths("deep"), vec!["artifacts/ok"]);
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/deep/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["unstored"].as_array().unwrap().len(), 1, "{record}");
    assert_eq!(record["unstored_for_good"], 1, "{record}");

    let manifest = h.object_path("jobs/deep/manifest.json");
    let written = |p: &std::path::Path| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(p).unwrap();
        (md.ino(), md.mtime_nsec(), md.mtime())
    };
    let before = written(&manifest);
    let reports = |h: &Harness| {
        (
            h.cp().delivered("/status").len(),
            h.cp().delivered("/artifacts").len(),
        )
    };
    let reported = reports(&h);
    for _ in 0..2 {
        let recover = h.run(&["recover"]);
        recover.assert_code(0);
        assert!(
            !recover
                .stderr
                .contains("storing what an earlier run could not"),
            "{}",
            recover.stderr
        );
        assert_eq!(reports(&h), reported, "no new status or registration");
        assert_eq!(
            written(&manifest),
            before,
            "the manifest is not written again"
        );
    }
    let status = h.run(&["status", "deep"]);
    assert!(
        status.stdout.contains("1 unstored for good"),
        "{}",
        status.stdout
    );
    assert!(!status.stdout.contains("resync"), "{}", status.stdout);

    // Retention lets it go (a failed job is kept 30 days by default; 0 here).
    h.env
        .push(("C3_AGENT_RETENTION_FAILED_DAYS".into(), "0".into()));
    h.run(&["recover"]).assert_code(0);
    assert!(!h.state.join("jobs/deep").exists(), "the job was kept");
}

/// One I/O error from the file store (an NFS or Lustre blip) while a large file is staged:
/// the staged upload is run again whole, as one store call would be. It failed the file at
/// once, and a job that exited 0 ended UPLOAD_ERROR.
#[test]
fn a_blip_while_a_large_file_is_staged_is_retried() {
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nlive = false\n[upload]\nmultipart_threshold_bytes = 1048576\n".into();
    h.env.push(("C3_AGENT_FAULT".into(), "staged-eio".into()));
    let script = "head -c 3000000 /dev/urandom > $C3_ARTIFACTS_DIR/big";
    h.run_job(json!({"job_id": "blip", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(h.manifest_paths("blip"), vec!["artifacts/big"]);
}

/// The blip comes after the staged copy ran past the retry deadline (an 80 GB file to an NFS
/// store takes many minutes): judged from the try's start, it was past the deadline at once
/// and the file failed for one blip; from the failure, it is run again.
#[test]
fn a_blip_late_in_a_long_staged_copy_is_retried() {
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nlive = false\n[upload]\nmultipart_threshold_bytes = 1048576\n".into();
    h.env
        .push(("C3_AGENT_FAULT".into(), "staged-eio-late".into()));
    h.env
        .push(("C3_AGENT_STORE_RETRY_DEADLINE_SECS".into(), "2".into()));
    let script = "head -c 3000000 /dev/urandom > $C3_ARTIFACTS_DIR/big";
    h.run_job(json!({"job_id": "lateblip", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(h.manifest_paths("lateblip"), vec!["artifacts/big"]);
}

/// A result file whose read never comes back (a FUSE mount the job left in `.c3`) costs the
/// result, with a warning, not the terminal status: the read held the job's end for ever.
#[test]
fn a_result_read_that_hangs_is_given_up() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "result-read-hangs".into()));
    let script = "echo '{\"a\": 1}' > $C3_RESULT_FILE; echo w > $C3_ARTIFACTS_DIR/w";
    h.run_job(json!({"job_id": "hung", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let t = h.terminal("hung");
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert!(t["result"].is_null(), "{t}");
    assert!(
        t["warnings"]
            .to_string()
            .contains("result file ignored: not read within"),
        "{t}"
    );
    assert_eq!(h.manifest("hung")["files"][0]["path"], "artifacts/w");
}

/// The same hung read after a stop is given up by the stop deadline: bounded only by its own
/// 10 s, it held the agent past the deadline a scheduler's kill follows.
#[test]
fn a_result_read_that_hangs_after_a_stop_ends_by_the_stop_deadline() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "result-read-hangs".into()));
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "3".into()));
    let script =
        "echo '{\"a\": 1}' > $C3_RESULT_FILE; echo up > $C3_ARTIFACTS_DIR/up; exec sleep 60";
    let spec = h.spec(json!({"job_id": "hungstop", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the job to start", Duration::from_secs(20), || {
        h.workdir("hungstop")
            .join("artifacts/up")
            .exists()
            .then_some(())
    });
    crate::support::signal(child.id(), "TERM");
    // The stop deadline and a moment for the exit; the read alone took 10 s.
    let run = exited_within(&h, child, Duration::from_secs(3 + 4));
    run.assert_code(4);
    assert_eq!(h.terminal("hungstop")["state"], "CANCELED");
}

/// A look at the job's open files that never answers (reading a process's `maps` waits on its
/// memory lock, which a thread faulting on a page of the job's own silent FUSE mount holds)
/// stops live sync's settling, not the job's end: the final sync takes the file.
#[test]
fn a_settle_look_that_hangs_does_not_hold_the_end() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "settle-look-hangs".into()));
    let script = "echo w > $C3_ARTIFACTS_DIR/w; sleep 13";
    let run = h.run_job(json!({"job_id": "look", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    assert!(
        run.stderr
            .contains("a look at the job's open files did not answer"),
        "{}",
        run.stderr
    );
    assert_eq!(h.manifest("look")["files"][0]["path"], "artifacts/w");
}

/// A settle look stuck past its limit (at the idle priority, on a node whose job keeps every
/// core busy, one takes minutes) does not refuse the job's wait_all: its look is its own.
/// They shared one flag, and every wait_all meanwhile was refused at once.
#[test]
fn a_stuck_settle_look_does_not_refuse_a_wait_all() {
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nsettle_ms = 100\n".into();
    h.env
        .push(("C3_AGENT_FAULT".into(), "settle-look-hangs".into()));
    let script = format!(
        "echo w > $C3_ARTIFACTS_DIR/w; sleep 2; {BIN} publish --wait-all 2> err; echo $? > rc",
        BIN = crate::support::BIN
    );
    let run = run_within(
        &h,
        json!({"job_id": "twolooks", "command": ["sh", "-c", script]}),
        Duration::from_secs(60),
    );
    run.assert_code(0);
    let w = h.workdir("twolooks");
    let err = std::fs::read_to_string(w.join("err")).unwrap();
    assert_eq!(
        std::fs::read_to_string(w.join("rc")).unwrap().trim(),
        "0",
        "{err}\n{}",
        run.stderr
    );
}

/// `run --job` for `spec`, given `limit` to exit (killed past it, and the test fails): for
/// the waits that were unbounded, whose old failure is an agent that never exits.
fn run_within(h: &Harness, spec: serde_json::Value, limit: Duration) -> crate::support::Run {
    let path = h.spec(spec);
    let child = h.spawn(&["run", "--job", path.to_str().unwrap()]);
    exited_within(h, child, limit)
}

/// `child` (a `c3-agent run`) waited for, given `limit` from now to exit (killed past it,
/// and the test fails).
pub(crate) fn exited_within(
    h: &Harness,
    mut child: std::process::Child,
    limit: Duration,
) -> crate::support::Run {
    let began = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() && began.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    let in_time = child.try_wait().unwrap().is_some();
    let _ = child.kill();
    let run = h.wait("c3-agent run".into(), child);
    assert!(
        in_time,
        "the agent had not exited after {limit:?}\n--- stderr\n{}",
        run.stderr
    );
    run
}

/// A wait_all whose look at the job's open files never answers (reading `maps` of a process
/// stuck in D state, a wedged GPU, waits on its memory lock) is refused after a time: it held
/// the collector, and with it the job's end and the agent's exit, for ever.
#[test]
fn a_wait_all_look_that_hangs_is_refused_in_time() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_FAULT".into(), "wait-all-look-hangs".into()));
    let script = format!(
        "echo w > $C3_ARTIFACTS_DIR/w; {BIN} publish --wait-all 2> err; echo $? > rc",
        BIN = crate::support::BIN
    );
    let run = run_within(
        &h,
        json!({"job_id": "waitlook", "command": ["sh", "-c", script]}),
        Duration::from_secs(45),
    );
    run.assert_code(0);
    let w = h.workdir("waitlook");
    assert_ne!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "0");
    let err = std::fs::read_to_string(w.join("err")).unwrap();
    assert!(err.contains("did not answer"), "{err}");
    assert_eq!(h.terminal("waitlook")["state"], "SUCCEEDED");
    assert_eq!(h.manifest_paths("waitlook"), vec!["artifacts/w"]);
}

/// The job ends while its wait_all's look hangs (`publish --wait-all &`, then exit): the
/// request is dropped at the end, and the final sync, the manifest and the terminal status
/// come at once, not after the look's time limit (or never, as before: the collector served
/// the request before it heard of the end).
#[test]
fn a_job_that_ends_during_a_hung_wait_all_ends_at_once() {
    // With live sync and without: each serves the job's requests in its own loop.
    for live in [true, false] {
        let mut h = Harness::file();
        h.extra_toml = format!("[sync]\nlive = {live}\n");
        h.env
            .push(("C3_AGENT_FAULT".into(), "wait-all-look-hangs".into()));
        let script = format!(
            "echo w > $C3_ARTIFACTS_DIR/w; {BIN} publish --wait-all > /dev/null 2>&1 & sleep 1",
            BIN = crate::support::BIN
        );
        let began = std::time::Instant::now();
        let run = run_within(
            &h,
            json!({"job_id": "waitend", "command": ["sh", "-c", script]}),
            Duration::from_secs(30),
        );
        run.assert_code(0);
        assert!(
            began.elapsed() < Duration::from_secs(9),
            "live = {live}: the end waited for the look's time limit: {:?}",
            began.elapsed()
        );
        assert_eq!(h.terminal("waitend")["state"], "SUCCEEDED");
        assert_eq!(h.manifest_paths("waitend"), vec!["artifacts/w"]);
    }
}

/// Runs `job`, whose script stores `artifacts/a` and sleeps, kills its agent once live sync
/// listed the file in the attempt's manifest, and removes the workdir; that manifest.
fn killed_after_live_sync_then_workdir_gone(h: &Harness, job: &str) -> Vec<u8> {
    let work = h.path("w");
    let spec = h.spec(json!({"job_id": job, "workdir": work.display().to_string(),
        "command": ["sh", "-c", "echo stored > $C3_ARTIFACTS_DIR/a; sleep 120"]}));
    let mut agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let own_key = format!("jobs/{job}/attempts/1/manifest.json");
    let listed = wait_for(
        "live sync to list the file",
        Duration::from_secs(30),
        || {
            h.object(&own_key)
                .filter(|m| String::from_utf8_lossy(m).contains("artifacts/a"))
        },
    );
    agent.kill().unwrap();
    agent.wait().unwrap();
    std::fs::remove_dir_all(&work).unwrap();
    listed
}

/// The agent dies while its job runs, after live sync stored a file and listed it, and the
/// workdir is gone when `recover` comes (a scratch wiped at boot; the job may also rename a
/// directory above it). The attempt's manifest still lists what was stored, and `gc` keeps
/// its blob: finished from an empty book, `recover` sealed a manifest listing nothing over
/// the one that listed it, and the next `gc` deleted the only copy.
#[test]
fn recover_keeps_listing_what_was_stored_when_the_workdir_is_gone() {
    let h = Harness::file();
    let own_key = "jobs/wiped/attempts/1/manifest.json";
    killed_after_live_sync_then_workdir_gone(&h, "wiped");
    // Its exit is the finished job's (AGENT_ERROR: its agent died).
    let run = h.run(&["recover"]);
    let own: serde_json::Value = serde_json::from_slice(&h.object(own_key).unwrap()).unwrap();
    assert_eq!(own["complete"], true, "{own}\n{}", run.stderr);
    assert_eq!(
        own["files"][0]["path"], "artifacts/a",
        "{own}\n{}",
        run.stderr
    );
    assert_eq!(h.manifest_paths("wiped"), vec!["artifacts/a"]);

    let blob = h.object_path(&format!(
        "blobs/sha256/{}",
        crate::support::sha256_hex(b"stored\n")
    ));
    let past = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    std::fs::File::options()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_modified(past)
        .unwrap();
    h.run(&["gc", "--older-than", "1"]).assert_code(0);
    assert!(blob.exists(), "gc deleted a blob the job had stored");
}

/// A finished attempt whose output could not be stored (UPLOAD_ERROR), and whose workdir the
/// scheduler then removed: what was in it is unstorable for good. Taken for a blip, every
/// hourly `recover` took the attempt up again and sent its status again, and retention kept
/// the job for ever. The first pass after says so once; later ones leave it alone.
#[test]
fn a_done_attempt_whose_workdir_is_gone_is_taken_up_once() {
    let h = Harness::file().with_control_plane(5);
    let blobs = h.state.join("store/blobs");
    let script = format!(
        "echo data > $C3_ARTIFACTS_DIR/out; rm -rf '{0}' && touch '{0}'",
        blobs.display()
    );
    h.run_job(json!({"job_id": "gonewd", "command": ["sh", "-c", script]}))
        .assert_code(3);
    std::fs::remove_file(&blobs).unwrap();
    std::fs::remove_dir_all(h.workdir("gonewd")).unwrap();
    h.run(&["recover"]);
    let after_one = h.statuses_in("FAILED");
    for _ in 0..2 {
        let run = h.run(&["recover"]);
        assert!(
            !run.stderr.contains("storing what an earlier run could not"),
            "taken up again: {}",
            run.stderr
        );
    }
    assert_eq!(
        h.statuses_in("FAILED"),
        after_one,
        "its status was sent again"
    );
    let t = h.terminal("gonewd");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
}

/// As above, but the attempt's manifest key holds another job's complete manifest (a cache
/// or gateway answering for the wrong key, a copy): taken in, its files, another tenant's,
/// were listed in this job's manifests, where a chained job would pull them. It is left as
/// it is, the attempt alone, with an error naming whose it is.
#[test]
fn recover_never_takes_in_another_jobs_manifest_at_its_key() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "tenant", "command": ["sh", "-c", "echo secret > $C3_ARTIFACTS_DIR/secret"]}))
        .assert_code(0);
    let foreign = h.object("jobs/tenant/attempts/1/manifest.json").unwrap();
    let own_key = "jobs/mine/attempts/1/manifest.json";
    killed_after_live_sync_then_workdir_gone(&h, "mine");
    h.tamper(own_key, &foreign);
    let run = h.run(&["recover"]);
    assert_eq!(
        h.object(own_key).unwrap(),
        foreign,
        "the manifest was replaced\n{}",
        run.stderr
    );
    if let Some(job) = h.object("jobs/mine/manifest.json") {
        assert!(
            !String::from_utf8_lossy(&job).contains("secret"),
            "another job's file listed as this job's: {}",
            String::from_utf8_lossy(&job)
        );
    }
    assert!(
        run.stderr.contains(own_key) && run.stderr.contains("job tenant attempt 1"),
        "{}",
        run.stderr
    );
}

/// This node's agent of an attempt died before its final sync, and the scheduler ran the same
/// attempt on another node, which sealed its manifest and reported it. This node's `recover`
/// finished it again: the other run's manifest replaced by what this node's workdir holds,
/// and a second, contradicting terminal status sent past its `seq`. A complete manifest of an
/// attempt this node never took to its final sync is another run's: left alone.
#[test]
fn recover_leaves_an_attempt_another_node_completed_alone() {
    let h = Harness::file().with_control_plane(5);
    h.run_job(json!({"job_id": "twice", "command": ["sh", "-c", "echo b > $C3_ARTIFACTS_DIR/b"]}))
        .assert_code(0);
    let key = "jobs/twice/attempts/1/manifest.json";
    let sealed = h.object(key).unwrap();
    let sent = h.cp().delivered("/status").len();
    // This node's record, as its agent left it when it died mid-run: its own run id, not the
    // one the other node's run wrote into the manifest.
    let rec = h.state.join("jobs/twice/attempts/1/run.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    record["phase"] = json!("running");
    record["state"] = json!(null);
    record["agent"] = json!([1, 1]);
    record["run_id"] = json!("00000000000000aa");
    std::fs::write(&rec, serde_json::to_vec(&record).unwrap()).unwrap();
    std::fs::remove_dir_all(h.workdir("twice")).ok();
    let run = h.run(&["recover"]);
    assert_eq!(h.object(key).unwrap(), sealed, "{}", run.stderr);
    assert_eq!(h.cp().delivered("/status").len(), sent, "{}", run.stderr);
    assert!(
        run.stderr.contains("another node ran the same attempt"),
        "{}",
        run.stderr
    );
    // Closed on this node: no later pass goes through it again, and retention lets it go.
    let left: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert_eq!(left["phase"], "done", "{left}");
    let again = h.run(&["recover"]);
    assert!(
        !again.stderr.contains("another node ran"),
        "{}",
        again.stderr
    );
}

/// As above, but the complete manifest is this run's own seal: its agent sealed, but the
/// record's `finishing` before it never saved (a full state disk) and the terminal status
/// never went out. Taken for another node's, the attempt was closed with no status sent at
/// all, the platform left waiting for one. The manifest carries the record's run id: the
/// attempt is finished as any other, its status sent past the last `seq`.
#[test]
fn recover_finishes_an_attempt_its_own_run_sealed() {
    let h = Harness::file().with_control_plane(5);
    h.run_job(json!({"job_id": "own", "command": ["sh", "-c", "echo b > $C3_ARTIFACTS_DIR/b"]}))
        .assert_code(0);
    let key = "jobs/own/attempts/1/manifest.json";
    let sealed: serde_json::Value = serde_json::from_slice(&h.object(key).unwrap()).unwrap();
    let sent = h.cp().delivered("/status").len();
    let rec = h.state.join("jobs/own/attempts/1/run.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert!(record["run_id"].is_string(), "{record}");
    assert_eq!(sealed["run_id"], record["run_id"], "{sealed}");
    record["phase"] = json!("running");
    record["state"] = json!(null);
    record["agent"] = json!([1, 1]);
    std::fs::write(&rec, serde_json::to_vec(&record).unwrap()).unwrap();
    let run = h.run(&["recover"]);
    assert!(!run.stderr.contains("another node ran"), "{}", run.stderr);
    assert!(
        h.cp().delivered("/status").len() > sent,
        "no terminal status sent\n{}",
        run.stderr
    );
    let resealed: serde_json::Value = serde_json::from_slice(&h.object(key).unwrap()).unwrap();
    assert_eq!(resealed["complete"], true, "{resealed}");
    assert_eq!(resealed["files"], sealed["files"], "{resealed}");
    assert_eq!(resealed["run_id"], sealed["run_id"], "{resealed}");
    let left: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
    assert_eq!(left["phase"], "done", "{left}");
}

/// As above, but the attempt's manifest is a newer agent's (version 2; this node was rolled
/// back): taken for unreadable, it was replaced by a complete one listing nothing (the
/// workdir gone), and `gc` then deleted every blob only it named. It is left as it is, the
/// attempt left for a newer agent, with an error naming the key.
#[test]
fn recover_leaves_a_manifest_it_cannot_take_in_as_it_is() {
    let h = Harness::file();
    let own_key = "jobs/newer/attempts/1/manifest.json";
    let listed = killed_after_live_sync_then_workdir_gone(&h, "newer");
    let mut newer: serde_json::Value = serde_json::from_slice(&listed).unwrap();
    newer["version"] = json!(2);
    let newer = serde_json::to_vec(&newer).unwrap();
    h.tamper(own_key, &newer);
    let run = h.run(&["recover"]);
    assert_eq!(
        h.object(own_key).unwrap(),
        newer,
        "the manifest was replaced\n{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(own_key) && run.stderr.contains("version 2"),
        "{}",
        run.stderr
    );
}
