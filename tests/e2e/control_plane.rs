//! Reports to the control plane: order, auth, retries, quota, live output, the outbox.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{wait_for, Harness};

#[test]
fn reports_arrive_in_order_with_the_token() {
    let h = Harness::file().with_control_plane(10);
    let script = "echo '{\"accuracy\": 0.93}' > $C3_RESULT_FILE; echo w > $C3_ARTIFACTS_DIR/w";
    h.run_job(json!({"job_id": "rep", "attempt": 2, "command": ["sh", "-c", script]}))
        .assert_code(0);
    let reqs: Vec<_> = h
        .cp()
        .requests()
        .into_iter()
        .filter(|r| !r.path.ends_with("/output"))
        .collect();
    let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "/v1/jobs/rep/status",
            "/v1/jobs/rep/status",
            "/v1/jobs/rep/artifacts",
            "/v1/jobs/rep/status"
        ]
    );
    for r in &reqs {
        assert_eq!(r.auth.as_deref(), Some("Bearer tok-Secret-123"));
        assert_eq!(r.body["attempt"], 2);
    }
    // Each report has its own key, the same whenever it is sent again.
    let mut keys: Vec<_> = reqs
        .iter()
        .map(|r| r.idempotency_key.clone().unwrap())
        .collect();
    assert!(keys.iter().all(|k| k.len() == 64), "{keys:?}");
    keys.dedup();
    assert_eq!(keys.len(), 4, "{keys:?}");
    assert_eq!(reqs[0].body["state"], "RUNNING");
    assert_eq!(reqs[0].body["seq"], 1);
    assert!(reqs[0].body.get("gpu_released").is_none());
    // The GPU is free before the final sync: a scheduler may place the next job.
    assert_eq!(reqs[1].body["state"], "FINALIZING");
    assert_eq!(reqs[1].body["seq"], 2);
    assert_eq!(reqs[1].body["gpu_released"], true);
    let t = &reqs[3].body;
    assert_eq!(t["state"], "SUCCEEDED");
    assert_eq!(t["seq"], 3);
    assert_eq!(t["result"], json!({"accuracy": 0.93}));
    assert!(
        t["peak_memory_bytes"].as_u64().is_some_and(|b| b > 0),
        "{t}"
    );
    assert!(t["cpu_seconds"].as_f64().is_some_and(|s| s >= 0.0), "{t}");
    let reg = &reqs[2].body;
    assert_eq!(reg["manifest"], "jobs/rep/manifest.json");
    assert_eq!(reg["files"], 1);
    let manifest = h.object("jobs/rep/manifest.json").unwrap();
    assert_eq!(
        reg["manifest_sha256"],
        crate::support::sha256_hex(&manifest)
    );
    assert_eq!(h.manifest("rep")["result"], json!({"accuracy": 0.93}));
    assert!(h.object("jobs/rep/attempts/2/manifest.json").is_some());
}

#[test]
fn bad_result_file_is_a_warning() {
    let h = Harness::file().with_control_plane(10);
    let script = "head -c 70000 /dev/zero | tr '\\0' 1 > $C3_RESULT_FILE";
    h.run_job(json!({"job_id": "bigres", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["result"], serde_json::Value::Null);
    assert!(t["warnings"].to_string().contains("result file"), "{t}");
}

/// A spec's value for a variable the agent sets is overridden, and the user is told so.
#[test]
fn a_spec_variable_the_agent_sets_is_named_in_the_warnings() {
    let h = Harness::file().with_control_plane(10);
    let spec = json!({"job_id": "ownvar", "command": ["sh", "-c", "echo \"$C3_JOB_ID\" > $C3_ARTIFACTS_DIR/id"],
        "env": {"C3_JOB_ID": "other", "C3_ARTIFACTS_DIR": "/tmp/elsewhere", "MINE": "1"}});
    h.run_job(spec).assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    let warnings = t["warnings"].to_string();
    assert!(
        warnings.contains("env.C3_JOB_ID") && warnings.contains("env.C3_ARTIFACTS_DIR"),
        "{t}"
    );
    assert!(!warnings.contains("MINE"), "{t}");
    let stored = h.manifest("ownvar")["files"][0].clone();
    assert_eq!(stored["path"], "artifacts/id", "{stored}");
    assert_eq!(stored["sha256"], crate::support::sha256_hex(b"ownvar\n"));
}

/// The agent's own warnings (the result file ignored, the project over its quota) are in
/// the terminal status and the log however many the job's files made first: past 50, the
/// 51st and later were dropped unsaid, so 60 symlinks hid both.
#[test]
fn the_agents_own_warnings_are_never_crowded_out_by_the_jobs() {
    let h = Harness::file().with_control_plane(10);
    h.cp().set_quota(2_000_000, Some(1_000));
    let script = "for i in $(seq 60); do ln -s /x $C3_ARTIFACTS_DIR/l$i; done; echo 1 > $C3_ARTIFACTS_DIR/f; echo '{' > $C3_RESULT_FILE";
    let run = h.run_job(json!({"job_id": "crowd", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    let warnings = t["warnings"].to_string();
    assert!(warnings.contains("result file ignored"), "{t}");
    assert!(warnings.contains("over the quota"), "{t}");
    assert!(warnings.contains("more warnings, not listed"), "{t}");
    assert!(run.stderr.contains("result file ignored"), "{}", run.stderr);
}

/// Every SUCCEEDED status the control plane was sent, answered or not.
fn succeeded_statuses(h: &Harness) -> Vec<crate::support::Recorded> {
    h.cp()
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/status") && r.body["state"] == "SUCCEEDED")
        .collect()
}

/// A terminal status the control plane refused for the job's result (a schema it checks, a
/// NUL its database cannot hold) was dropped: the job stayed FINALIZING there for good. It
/// goes again at once, with the same seq, without the result and warnings.
#[test]
fn a_terminal_status_refused_for_its_result_goes_again_without_it() {
    let h = Harness::file().with_control_plane(10);
    h.cp().refuse_results(422);
    let script = "echo '{\"accuracy\": 0.93}' > $C3_RESULT_FILE";
    h.run_job(json!({"job_id": "refres", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let terminal = succeeded_statuses(&h);
    let answered: Vec<u16> = terminal.iter().map(|r| r.answered).collect();
    assert_eq!(answered, [422, 200], "{terminal:?}");
    assert_eq!(terminal[0].body["result"], json!({"accuracy": 0.93}));
    let t = &terminal[1].body;
    assert_eq!(t["seq"], terminal[0].body["seq"]);
    assert_eq!(t["result"], Value::Null);
    assert_eq!(
        t["warnings"],
        json!(["status refused with HTTP 422; result and warnings dropped; see the agent log"])
    );
    assert!(!h.state.join("outbox/refres").exists(), "nothing kept");
    assert_eq!(h.manifest("refres")["result"], json!({"accuracy": 0.93}));
}

/// A result holding a NUL (`{"x":"\u0000"}`, valid JSON) made a terminal status that a
/// control plane on PostgreSQL fails on (500) for good. It is ignored, with a warning.
#[test]
fn a_result_holding_a_nul_is_a_warning() {
    let h = Harness::file().with_control_plane(10);
    h.cp().refuse_results(500);
    let script = r#"printf '{"x":"\u0000"}' > $C3_RESULT_FILE"#;
    h.run_job(json!({"job_id": "nulres", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let terminal = succeeded_statuses(&h);
    assert_eq!(terminal.len(), 1, "{terminal:?}");
    let t = &terminal[0].body;
    assert_eq!(terminal[0].answered, 200, "{t}");
    assert_eq!(t["result"], Value::Null);
    assert!(t["warnings"].to_string().contains("NUL"), "{t}");
    assert!(!h.state.join("outbox/nulres").exists(), "nothing kept");
    assert_eq!(h.manifest("nulres")["result"], Value::Null);
}

/// A registration the outbox could not keep (a full disk) is sent the ordinary way; with the
/// control plane down too it was lost, yet the run record counted its bytes as registered,
/// and a later `resync` registered only what it added. Recorded only once delivered.
#[test]
fn a_registration_neither_kept_nor_delivered_is_not_counted_as_registered() {
    let synced = |h: &Harness, job: &str| {
        let record = h.state.join(format!("jobs/{job}/attempts/1/run.json"));
        let record: Value = serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        record["synced"].clone()
    };
    let mut h = Harness::file().with_control_plane(2);
    h.env
        .push(("C3_AGENT_FAULT".into(), "outbox-write-enospc:lost".into()));
    h.cp().fail_all(true);
    let script = "echo data > $C3_ARTIFACTS_DIR/a";
    h.run_job(json!({"job_id": "lost", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert!(h.cp().delivered("/artifacts").is_empty());
    assert_eq!(synced(&h, "lost"), Value::Null, "registered, by the record");

    h.env = vec![("C3_AGENT_FAULT".into(), "outbox-write-enospc:sent".into())];
    h.cp().fail_all(false);
    h.run_job(json!({"job_id": "sent", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(h.cp().delivered("/artifacts").len(), 1);
    let sent = synced(&h, "sent");
    assert_eq!(sent["files"], 1, "{sent}");
}

/// The job filled the filesystem the state dir is on, and the control plane was down: the
/// terminal status could be neither kept nor delivered, the record was done all the same,
/// and nothing ever sent it. The run record's reserve makes room for the outbox too, and a
/// later `recover` delivers the status.
#[test]
fn a_terminal_status_on_a_full_disk_with_the_control_plane_down_is_kept() {
    let mut h = Harness::file().with_control_plane(2);
    h.env
        .push(("C3_AGENT_FAULT".into(), "outbox-full:full".into()));
    h.cp().fail_all(true);
    h.run_job(json!({"job_id": "full", "command": ["sh", "-c", "exit 1"]}))
        .assert_code(1);
    assert_eq!(h.statuses_in("FAILED"), 0);
    h.env.clear();
    h.cp().fail_all(false);
    h.run(&["recover"]);
    assert_eq!(h.statuses_in("FAILED"), 1, "the terminal status was lost");
}

#[test]
fn control_plane_503s_are_retried() {
    let h = Harness::file().with_control_plane(30);
    h.cp().fail_next(3);
    h.run_job(json!({"job_id": "r503", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"]}))
        .assert_code(0);
    let failed = h
        .cp()
        .requests()
        .iter()
        .filter(|r| r.answered == 503)
        .count();
    assert_eq!(failed, 3);
    let statuses = h.cp().delivered("/status");
    assert_eq!(
        statuses
            .iter()
            .map(|s| s["state"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["RUNNING", "FINALIZING", "SUCCEEDED"]
    );
    assert_eq!(h.cp().delivered("/artifacts").len(), 1);
}

#[test]
fn over_quota_is_a_warning_not_a_failure() {
    let h = Harness::file().with_control_plane(10);
    h.cp().set_quota(2_000_000, Some(1_000));
    h.run_job(json!({"job_id": "quota", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"]}))
        .assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["state"], "SUCCEEDED");
    assert!(t["warnings"].to_string().contains("over the quota"), "{t}");
}

#[test]
fn undeliverable_terminal_status_is_kept_and_recovered() {
    let h = Harness::file().with_control_plane(2);
    h.cp().fail_all(true);
    let run = h.run_job(
        json!({"job_id": "keep", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x; exit 3"]}),
    );
    run.assert_code(1);
    assert!(h.cp().terminal_status().is_none());
    let outbox = h.state.join("outbox/keep");
    assert!(
        std::fs::read_dir(&outbox).map(|d| d.count()).unwrap_or(0) >= 2,
        "reports kept in {}",
        outbox.display()
    );

    h.cp().fail_all(false);
    h.run(&["recover"]).assert_code(0);
    let statuses = h.cp().delivered("/status");
    let states: Vec<&str> = statuses
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states,
        vec!["RUNNING", "FINALIZING", "FAILED"],
        "delivered in order"
    );
    assert_eq!(statuses[2]["reason"], "SCRIPT_ERROR");
    assert_eq!(h.cp().delivered("/artifacts").len(), 1);
    assert!(!outbox.exists() || std::fs::read_dir(&outbox).unwrap().count() == 0);
}

/// A token that ran out mid-job (401) is the node's fault, not the report's: the reports are
/// kept, and `recover` delivers them once the control plane takes the agent's credentials.
#[test]
fn reports_refused_for_the_agents_credentials_are_kept() {
    let h = Harness::file().with_control_plane(2);
    h.cp().set_fail_status(401);
    h.cp().fail_all(true);
    h.run_job(json!({"job_id": "token", "command": ["true"]}))
        .assert_code(0);
    assert!(h.cp().terminal_status().is_none());
    h.cp().fail_all(false);
    h.run(&["recover"]).assert_code(0);
    let states: Vec<String> = h
        .cp()
        .delivered("/status")
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(states, vec!["RUNNING", "FINALIZING", "SUCCEEDED"]);
}

#[test]
fn a_later_run_delivers_kept_reports() {
    let h = Harness::file().with_control_plane(1);
    h.cp().fail_all(true);
    h.run_job(json!({"job_id": "first", "command": ["true"]}))
        .assert_code(0);
    h.cp().fail_all(false);
    h.run_job(json!({"job_id": "second", "command": ["true"]}))
        .assert_code(0);
    let jobs: Vec<String> = h
        .cp()
        .requests()
        .iter()
        .filter(|r| r.answered == 200 && r.body["state"] == "SUCCEEDED")
        .map(|r| r.path.clone())
        .collect();
    assert!(
        jobs.contains(&"/v1/jobs/first/status".to_string()),
        "{jobs:?}"
    );
    assert!(
        jobs.contains(&"/v1/jobs/second/status".to_string()),
        "{jobs:?}"
    );
}

#[test]
fn live_output_is_streamed_while_the_job_runs() {
    let h = Harness::file().with_control_plane(10);
    let script = "for i in 1 2 3 4 5 6; do echo line $i; echo err $i >&2; sleep 0.5; done";
    let spec = h.spec(json!({"job_id": "live", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // Output arrives before the job ends.
    wait_for("live output", Duration::from_secs(20), || {
        (!h.cp().delivered("/output").is_empty()).then_some(())
    });
    let seen_while_running = h.cp().terminal_status().is_none();
    h.wait("live".into(), child).assert_code(0);
    assert!(
        seen_while_running,
        "output posts must come while the job runs"
    );
    let mut stdout = String::new();
    for post in h
        .cp()
        .delivered("/output")
        .iter()
        .filter(|p| p["stream"] == "stdout")
    {
        assert_eq!(
            post["offset"].as_u64().unwrap() as usize,
            stdout.len(),
            "contiguous offsets"
        );
        stdout.push_str(post["data"].as_str().unwrap());
    }
    let expected: String = (1..=6).map(|i| format!("line {i}\n")).collect();
    assert_eq!(stdout, expected);
}

/// A server that accepts connections and never answers, for `limit`.
fn hanging_server(limit: Duration) -> (String, std::thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}/api", listener.local_addr().unwrap());
    let thread = std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + limit;
        let mut held = Vec::new();
        while std::time::Instant::now() < deadline && held.len() < 1000 {
            match listener.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    (url, thread)
}

/// Contract §7: `give_up_secs` bounds the agent's whole stay after the final sync, whatever
/// the control plane does (hang, refuse, 5xx); the terminal status waits in the outbox.
#[test]
fn give_up_secs_bounds_the_whole_stay() {
    const GIVE_UP: u64 = 2;
    let (hanging, server) = hanging_server(Duration::from_secs(40));
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/api", l.local_addr().unwrap())
    };
    let failing = crate::support::ControlPlane::start();
    failing.fail_all(true);
    for (what, url) in [
        ("hanging", hanging.as_str()),
        ("refusing", dead.as_str()),
        ("5xx", failing.url.as_str()),
    ] {
        let mut h = Harness::file();
        h.extra_toml = format!("[control_plane]\nurl = \"{url}\"\ngive_up_secs = {GIVE_UP}\n");
        let started = std::time::Instant::now();
        let run = h.run_job(json!({"job_id": "stay", "command": ["true"]}));
        let took = started.elapsed();
        run.assert_code(0);
        // give_up_secs + 2 s of the contract, plus start-up and final sync on a loaded machine.
        assert!(
            took < Duration::from_secs(GIVE_UP + 6),
            "{what} control plane held the agent {took:?}\n{}",
            run.stderr
        );
        let kept = std::fs::read_dir(h.state.join("outbox/stay"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(
            kept >= 2,
            "{what}: RUNNING and the terminal status are kept ({kept})"
        );
    }
    drop(server);
}

/// A run refused at its start (its attempt already ran) leaves the outbox alone: it began
/// flushing earlier reports, then returned from inside a POST the control plane may have
/// taken, and the next flush sent that report again (a registration counted twice).
#[test]
fn a_refused_rerun_does_not_cut_a_kept_report_mid_post() {
    let mut h = Harness::file().with_control_plane(60);
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "3".into()));
    let again = h.spec(json!({"job_id": "again", "command": ["true"]}));
    h.run(&["run", "--job", again.to_str().unwrap()])
        .assert_code(0);
    // Another job's terminal status, taken and never answered: kept in its outbox.
    h.cp().hold_terminal(true);
    let kept = h.spec(json!({"job_id": "kept", "command": ["true"]}));
    let agent = h.spawn(&["run", "--job", kept.to_str().unwrap()]);
    wait_for(
        "the terminal status to be posted",
        Duration::from_secs(30),
        || (h.cp().held() > 0).then_some(()),
    );
    crate::support::signal(agent.id(), "TERM");
    h.wait("run stopped during its reports".into(), agent);
    // Refused by the attempt's record (in `run_job`), not by its manifest (before it).
    for key in [
        "jobs/again/manifest.json",
        "jobs/again/attempts/1/manifest.json",
    ] {
        std::fs::remove_file(h.object_path(key)).unwrap();
    }
    let held = h.cp().held();
    // The look at the earlier run takes 2 s: time for a flush begun beside it to post.
    h.env.push(("C3_AGENT_FAULT".into(), "take-over".into()));
    let rerun = h.run(&["run", "--job", again.to_str().unwrap()]);
    h.env.pop();
    rerun.assert_code(2);
    assert!(
        rerun.stderr.contains("already ran on this node"),
        "{}",
        rerun.stderr
    );
    assert_eq!(
        h.cp().held(),
        held,
        "the refused run posted a kept report and cut it off\n{}",
        rerun.stderr
    );
    h.cp().hold_terminal(false);
    h.run(&["recover"]).assert_code(0);
    let terminals: Vec<Value> = h
        .cp()
        .delivered("/status")
        .into_iter()
        .filter(|b| b["state"] == "SUCCEEDED")
        .collect();
    assert_eq!(terminals.len(), 2, "{terminals:?}");
}

/// A stop that comes once the reports after the final sync are under way ends them by the
/// stop deadline, not `give_up_secs` later: the deadline they started with was looked at
/// once, and a control plane that took the terminal status and answered slowly held the agent
/// 60 s, past a scheduler's kill (Slurm's KillWait, k8s's grace), which then lost the status
/// in flight. It is in the outbox before it is sent, and `recover` delivers it.
#[test]
fn a_stop_during_the_reports_ends_them_by_the_stop_deadline() {
    let mut h = Harness::file().with_control_plane(60);
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "5".into()));
    h.cp().hold_terminal(true);
    let spec = h.spec(json!({"job_id": "late-stop", "command": ["true"]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for(
        "the terminal status to be posted",
        Duration::from_secs(30),
        || (h.cp().held() > 0).then_some(()),
    );
    let asked = std::time::Instant::now();
    crate::support::signal(agent.id(), "TERM");
    let run = h.wait("run stopped during its reports".into(), agent);
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "exited {took:?} after SIGTERM (stop deadline 5 s, give_up_secs 60)\n{}",
        run.stderr
    );
    let outbox = h.state.join("outbox/late-stop");
    let kept: Vec<String> = std::fs::read_dir(&outbox)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with("-status.json"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        !kept.is_empty(),
        "the terminal status is kept ({}): {kept:?}\n{}",
        outbox.display(),
        run.stderr
    );
    h.cp().hold_terminal(false);
    h.run(&["recover"]);
    let terminal = h
        .cp()
        .terminal_status()
        .expect("a terminal status delivered");
    assert_eq!(terminal["state"], "SUCCEEDED", "{terminal}");
    assert!(
        !outbox.exists()
            || !std::fs::read_dir(&outbox)
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".json")),
        "recover delivered what was kept"
    );
}

/// Job `stopped` (`first`, then a long sleep) is sent SIGTERM `after` its start, with the
/// stop deadline at 8 s: the agent must exit 4 within it (10 s, with room for a loaded
/// machine; it is the bound that matters).
fn stopped_once_started(h: &Harness, first: &str, after: Duration) {
    let script = format!("{first}; echo up > $C3_ARTIFACTS_DIR/started; exec sleep 300");
    let spec = h.spec(json!({"job_id": "stopped", "command": ["sh", "-c", script]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let up = h.workdir("stopped").join("artifacts/started");
    wait_for("the job to start", Duration::from_secs(20), || {
        up.exists().then_some(())
    });
    std::thread::sleep(after);
    let asked = std::time::Instant::now();
    crate::support::signal(agent.id(), "TERM");
    let run = h.wait("run stopped".into(), agent);
    let took = asked.elapsed();
    run.assert_code(4);
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM\n{}",
        run.stderr
    );
}

/// Live output is best effort and keeps to the same bounds: a control plane that takes the
/// posts' connections and never answers holds the agent no longer than `give_up_secs` after
/// the job, and never past the stop deadline (each post once waited 5 s of its own, per
/// stream and per round, and the end waited 30 s for them).
#[test]
fn live_output_posts_keep_to_give_up_secs_and_the_stop_deadline() {
    const GIVE_UP: u64 = 2;
    const JOB_SECS: u64 = 3;
    let (hanging, server) = hanging_server(Duration::from_secs(90));
    let mut h = Harness::file();
    h.extra_toml = format!("[control_plane]\nurl = \"{hanging}\"\ngive_up_secs = {GIVE_UP}\n");
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "8".into()));

    let script = format!("echo a; echo b >&2; sleep {JOB_SECS}");
    let started = std::time::Instant::now();
    let run = h.run_job(json!({"job_id": "plain", "command": ["sh", "-c", script]}));
    let took = started.elapsed();
    run.assert_code(0);
    assert!(
        took < Duration::from_secs(JOB_SECS + GIVE_UP + 6),
        "a {JOB_SECS} s job held {took:?}\n{}",
        run.stderr
    );

    // Live posts of both streams are in flight 3 s after the start.
    stopped_once_started(&h, "echo a; echo b >&2", Duration::from_secs(3));
    drop(server);
}

/// A control plane down at launch for longer than `give_up_secs` hears RUNNING as soon as it
/// is back, not with the next status: RUNNING went to the outbox, which nothing read while
/// the job ran (for hours, while its output streamed in).
#[test]
fn running_reaches_a_control_plane_back_from_an_outage_while_the_job_runs() {
    let h = Harness::file().with_control_plane(1);
    h.cp().fail_all(true);
    let spec = h.spec(json!({"job_id": "late", "command": ["sleep", "14"]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    std::thread::sleep(Duration::from_secs(3));
    h.cp().fail_all(false);
    let back = std::time::Instant::now();
    wait_for(
        "RUNNING, while the job runs",
        Duration::from_secs(9),
        || {
            h.cp()
                .delivered("/status")
                .iter()
                .any(|b| b["state"] == "RUNNING")
                .then_some(())
        },
    );
    assert!(back.elapsed() < Duration::from_secs(10));
    h.wait("late".into(), agent).assert_code(0);
    let states: Vec<Value> = h
        .cp()
        .delivered("/status")
        .iter()
        .map(|b| b["state"].clone())
        .collect();
    assert_eq!(
        states,
        vec![json!("RUNNING"), json!("FINALIZING"), json!("SUCCEEDED")]
    );
}

/// A control plane that refuses live output (404: no such endpoint; a proxy's 413) is not
/// sent the same piece again and again: a rejected piece is passed over and the stream rests
/// longer after each refusal. The same 1 MiB was read and posted every 2 s for the whole job.
#[test]
fn refused_live_output_is_passed_over_not_sent_again() {
    let h = Harness::file().with_control_plane(2);
    h.cp().set_fail_status(404);
    h.cp().fail_all(true);
    let script = "head -c 1000000 /dev/zero | tr '\\0' x; echo; sleep 11";
    h.run_job(json!({"job_id": "refused", "command": ["sh", "-c", script]}));
    let posts: Vec<(String, u64)> = h
        .cp()
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/output"))
        .map(|r| {
            (
                r.body["stream"].as_str().unwrap_or("").to_string(),
                r.body["offset"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    let mut distinct = posts.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        posts.len(),
        "a piece was sent again: {posts:?}"
    );
    assert!(posts.len() <= 5, "{} posts: {posts:?}", posts.len());
}

/// After a stop request the agent is gone by the stop deadline even while earlier jobs'
/// kept reports are being delivered to a control plane that never answers: it waited 5 s
/// more for them after its own end (8 s deadline + 5 s here; 25 + 5 = Slurm's KillWait by
/// default, and a SIGKILL then).
#[test]
fn earlier_jobs_reports_do_not_hold_a_stopped_agent_past_its_deadline() {
    let (hanging, server) = hanging_server(Duration::from_secs(90));
    let mut h = Harness::file();
    h.extra_toml = format!("[control_plane]\nurl = \"{hanging}\"\ngive_up_secs = 1\n");
    h.run_job(json!({"job_id": "earlier", "command": ["true"]}));
    assert!(
        h.state.join("outbox/earlier").exists(),
        "the earlier job's reports were kept"
    );
    h.extra_toml = format!("[control_plane]\nurl = \"{hanging}\"\ngive_up_secs = 60\n");
    h.env
        .push(("C3_AGENT_STOP_DEADLINE_SECS".into(), "8".into()));
    stopped_once_started(&h, "true", Duration::ZERO);
    drop(server);
}

/// The agent killed while its artifacts registration waits on the control plane: the
/// attempt's `new_bytes` was recorded as registered before it went, so `recover` registered
/// 0 and the storage delta never reached the control plane. The registration is kept in the
/// outbox before it is sent.
#[test]
fn a_registration_under_way_when_the_agent_is_killed_is_not_lost() {
    let mut h = Harness::file().with_control_plane(30);
    h.extra_toml.push_str("[sync]\nlive = false\n");
    h.cp().fail_all(true);
    let script = "head -c 1024 /dev/zero > $C3_ARTIFACTS_DIR/k";
    let spec = h.spec(json!({"job_id": "killed", "command": ["sh", "-c", script]}));
    let mut agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("the complete manifest", Duration::from_secs(30), || {
        h.object("jobs/killed/manifest.json")
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter(|m| m["complete"] == true)
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.kill().unwrap();
    let _ = agent.wait();
    h.cp().fail_all(false);
    h.run(&["recover"]);
    let registered: u64 = h
        .cp()
        .delivered("/artifacts")
        .iter()
        .map(|b| b["new_bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(registered, 1024, "{:?}", h.cp().delivered("/artifacts"));
}

/// `recover` (the housekeeping timer) reads a job's record while its agent is finishing it;
/// by the time `recover` holds the lock that agent has finished. Finishing it again from the
/// phase first read would send a second terminal status.
#[test]
fn recover_never_finishes_again_what_its_agent_finished_meanwhile() {
    let h = Harness::file().with_control_plane(10);
    let go = h.path("go");
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/x; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "race", "command": ["sh", "-c", script]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("RUNNING", Duration::from_secs(20), || {
        (!h.cp().delivered("/status").is_empty()).then_some(())
    });
    // recover reads the record (RUNNING), then waits 2 s before it looks at the agent.
    let mut recover = h.command(&["recover"]);
    recover
        .env("C3_AGENT_FAULT", "recover-after-read")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let recover = recover.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, "").unwrap();
    h.wait("race".into(), agent).assert_code(0);
    let out = recover.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let terminal: Vec<_> = h
        .cp()
        .delivered("/status")
        .into_iter()
        .filter(|s| s["state"] != "RUNNING" && s["state"] != "FINALIZING")
        .collect();
    assert_eq!(terminal.len(), 1, "{terminal:?}");
}

/// The result is the job's word at its end: read at the seal, after a final sync that may
/// take hours once FINALIZING freed the GPU, it was whatever was in `.c3/result.json` by then
/// (another job of the user's, or the next job placed in the same workdir, whose prepare
/// removes it). Read as the job's processes are gone, before FINALIZING.
#[test]
fn the_result_is_read_when_the_job_ends_not_at_the_seal() {
    let mut h = Harness::file().with_control_plane(10);
    h.env
        .push(("C3_AGENT_FAULT".into(), "after-final-scan".into()));
    let script = "echo '{\"epoch\": 1}' > $C3_RESULT_FILE; echo w > $C3_ARTIFACTS_DIR/w";
    let spec = h.spec(json!({"job_id": "late", "command": ["sh", "-c", script]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_for("FINALIZING", Duration::from_secs(30), || {
        h.cp()
            .delivered("/status")
            .iter()
            .any(|s| s["state"] == "FINALIZING")
            .then_some(())
    });
    // In the final sync (its 2 s pause after the scan), something else writes there.
    std::fs::write(
        h.workdir("late").join(".c3/result.json"),
        "{\"epoch\": 2}\n",
    )
    .unwrap();
    h.wait("late".into(), agent).assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["result"], json!({"epoch": 1}), "{t}");
    assert_eq!(h.manifest("late")["result"], json!({"epoch": 1}));
}
