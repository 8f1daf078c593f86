//! Path spelling (contract §3): `./res` and `a//b` are normalized at parse; `.` and `..`
//! components are spec errors, so one directory cannot hide behind two spellings.

use serde_json::json;

use crate::common::not_root;
use crate::support::Harness;

#[test]
fn output_dirs_are_normalized_and_round_trip_through_ls_and_pull() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let run = h.run_job(json!({
        "job_id": "norm", "output": ["./res", "a//b"],
        "command": ["sh", "-c", "echo x > res/x && echo y > a/b/y"],
    }));
    run.assert_code(0);
    assert_eq!(h.manifest_paths("norm"), vec!["a/b/y", "res/x"]);

    let ls = h.run(&["ls", "norm"]);
    ls.assert_code(0);
    assert!(
        ls.stdout.contains("a/b/y") && ls.stdout.contains("res/x"),
        "{}",
        ls.stdout
    );

    let dest = h.path("dest");
    h.run(&["pull", "norm", dest.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(std::fs::read_to_string(dest.join("res/x")).unwrap(), "x\n");
    assert_eq!(std::fs::read_to_string(dest.join("a/b/y")).unwrap(), "y\n");
}

#[test]
fn dot_and_dotdot_components_in_output_are_spec_errors() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let marker = h.path("launched");
    for output in ["results/.", "a/../b"] {
        let run = h.run_job(json!({
            "job_id": "dots", "output": [output],
            "command": ["touch", marker.display().to_string()],
        }));
        run.assert_code(2);
        assert!(run.stderr.contains("output[0]"), "{output}: {}", run.stderr);
        assert!(!marker.exists(), "{output}: the job was launched");
    }
}
