//! One job attempt, one agent: a second `run` of a spec whose agent still runs is refused
//! before it touches the job's workdir, records or processes.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, wait_within};
use crate::support::{wait_for, Harness};

#[test]
fn a_second_agent_for_a_running_job_is_refused_naming_the_first() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let go = h.path("go");
    let script = format!(
        "echo s >> $C3_ARTIFACTS_DIR/started; i=0; while [ ! -e '{}' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo done > $C3_ARTIFACTS_DIR/done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "once", "command": ["sh", "-c", script]}));
    let a = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let started = h.workdir("once").join("artifacts/started");
    wait_for("agent A's job to start", Duration::from_secs(20), || {
        started.exists().then_some(())
    });

    let b = h.run(&["run", "--job", spec.to_str().unwrap()]);
    b.assert_code(2);
    assert!(
        b.stderr.contains("already"),
        "B does not say the job already runs: {}",
        b.stderr
    );
    assert!(
        b.stderr.contains(&a.id().to_string()),
        "B does not name agent A (pid {}): {}",
        a.id(),
        b.stderr
    );
    assert_eq!(
        std::fs::read_to_string(&started).unwrap(),
        "s\n",
        "B launched the job a second time"
    );

    std::fs::write(&go, "").unwrap();
    let run = wait_within("agent A", a, Duration::from_secs(40));
    run.assert_code(0);
    let m = h.manifest("once");
    assert_eq!(m["complete"], true);
    assert_eq!(
        h.manifest_paths("once"),
        vec!["artifacts/done", "artifacts/started"]
    );
}
