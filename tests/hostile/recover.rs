//! `recover` never kills a stranger: a run record's pgid is only trusted while the recorded
//! job leader (pid, start time, boot id) is the very process that runs under that pid.

use std::process::Command;
use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, KillOnDrop};
use crate::support::{alive, wait_for, Harness};

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat.
fn stat_field(pid: i32, n: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(n - 3).map(String::from)
}

#[test]
fn recover_does_not_kill_a_process_that_reused_a_recorded_pgid() {
    if not_root("recover_does_not_kill_a_process_that_reused_a_recorded_pgid") {
        return;
    }
    // The stranger: a session leader the agent never started.
    let mut stranger = Command::new("setsid")
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let pid = stranger.id() as i32;
    let _cleanup = KillOnDrop(pid);
    wait_for(
        "the stranger to be a sleeping session leader",
        Duration::from_secs(5),
        || {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "sleep" && stat_field(pid, 6)? == pid.to_string()).then_some(())
        },
    );

    let h = Harness::file();
    h.run_job(json!({"job_id": "old", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"]}))
        .assert_code(0);
    let record_path = h.state.join("jobs/old/attempts/1/run.json");
    let mut record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record_path).unwrap()).unwrap();
    let boot_id = record["leader"]["boot_id"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .unwrap()
                .trim()
                .to_string()
        });
    record["phase"] = json!("running");
    record["pgid"] = json!(pid);
    // The same pid and boot, but not the same process: its start time differs.
    record["leader"] = json!({"pid": pid, "start_ticks": 1, "boot_id": boot_id});
    record["agent"] = serde_json::Value::Null;
    // No cgroup to go by: the record's pgid and leader are all recover has.
    record["cgroup"] = serde_json::Value::Null;
    std::fs::write(&record_path, serde_json::to_vec_pretty(&record).unwrap()).unwrap();

    let run = h.run(&["recover"]);
    assert!(
        alive(pid),
        "recover killed process group {pid}, which is not the job's (recover exited {})\n--- stderr\n{}",
        run.code,
        run.stderr
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}
