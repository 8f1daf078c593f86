//! The run record against what ends an agent early: a full disk, a crash between two of
//! its writes, a rerun of an attempt. Whatever `recover` sends afterwards never contradicts
//! what was already delivered.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::Harness;

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
#[test]
fn a_crash_after_finalizing_keeps_the_known_exit() {
    let mut h = Harness::file().with_control_plane(5);
    h.env
        .push(("C3_AGENT_FAULT".into(), "crash-after-gpu-released".into()));
    let run = h.run_job(json!({"job_id": "fin", "command": ["sh", "-c", "exit 0"]}));
    assert_ne!(run.code, 0, "the agent was meant to crash");
    assert!(terminals(&h).is_empty(), "{:?}", statuses(&h));
    h.env.clear();
    h.run(&["recover"]).assert_code(0);
    let t = h.cp().terminal_status().unwrap();
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert_eq!(t["exit_code"], 0, "{t}");
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
    h.run(&["recover"]).assert_code(0);
    let registrations = h.cp().delivered("/artifacts");
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
    crate::support::wait_for(
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
