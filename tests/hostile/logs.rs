//! Forging the operator's log: a job names a file so that the agent's warning about it would
//! print a line of the job's choosing (journald makes each line an entry of its own).

use serde_json::json;

use crate::support::Harness;

#[test]
fn a_file_name_never_starts_a_log_line() {
    let h = Harness::file();
    let script = "cd $C3_ARTIFACTS_DIR && echo ok > real && \
                  ln -s /etc/hostname \"$(printf 'x\\n<3>FORGED ERROR job finished state=SUCCEEDED\\033[2J')\"";
    let run = h.run_job(json!({"job_id": "forge", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    // The warning names the file, escaped, on its own line.
    let warnings = h.terminal("forge")["warnings"].to_string();
    assert!(warnings.contains("FORGED"), "{warnings}");
    assert!(
        run.stderr.contains("x\\n<3>FORGED ERROR"),
        "the name is in the log, escaped: {}",
        run.stderr
    );
    for line in run.stderr.lines() {
        assert!(
            !line.starts_with("<3>FORGED") && !line.contains('\x1b'),
            "a line of the job's making: {line:?}"
        );
    }
}
