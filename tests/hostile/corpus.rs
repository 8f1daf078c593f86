//! Artifacts that are not plain files (contract §5): a symlink to a root-only file, a FIFO, a
//! socket, a hard link to a file outside the output dir. Nothing hangs, nothing but regular
//! files is collected.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, open_harness, spawn_job, wait_within};
use crate::support::{chmod, Harness};

/// A script that fills `$C3_ARTIFACTS_DIR` with the corpus (`hardlink`: also `hl`, a hard link
/// to `outside`). The socket needs python3; without it there is none.
fn corpus_script(h: &Harness, hardlink: bool) -> String {
    let rootonly = h.path("rootonly");
    std::fs::write(&rootonly, "root's secret\n").unwrap();
    chmod(&rootonly, 0o600);
    let mut s = format!(
        "cd $C3_ARTIFACTS_DIR && echo plain > plain && ln -s '{}' link && mkfifo fifo && \
         (p=/usr/bin/python3; [ -x $p ] || p=python3; \
         $p -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")' || true)",
        rootonly.display()
    );
    if hardlink {
        let outside = h.path("outside");
        std::fs::write(&outside, "outside the output dir\n").unwrap();
        s.push_str(&format!(" && ln '{}' hl", outside.display()));
    }
    s
}

/// Says whether the corpus had its socket (it needs python3).
fn note_socket(h: &Harness, job: &str) {
    use std::os::unix::fs::FileTypeExt;
    let sock = h.workdir(job).join("artifacts/sock");
    let is_socket = std::fs::symlink_metadata(&sock).is_ok_and(|m| m.file_type().is_socket());
    println!("corpus socket present: {is_socket}");
}

fn assert_only_regular_files(h: &Harness, job: &str) -> Vec<String> {
    let paths = h.manifest_paths(job);
    assert!(paths.contains(&"artifacts/plain".to_string()), "{paths:?}");
    for odd in ["artifacts/link", "artifacts/fifo", "artifacts/sock"] {
        assert!(
            !paths.contains(&odd.to_string()),
            "{odd} is in the manifest: {paths:?}"
        );
    }
    paths
}

#[test]
fn root_job_corpus_symlink_fifo_socket_hardlink_does_not_hang() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let script = corpus_script(&h, true);
    let child = spawn_job(
        &h,
        json!({"job_id": "odd", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run odd", child, Duration::from_secs(30));
    run.assert_code(0);
    let paths = assert_only_regular_files(&h, "odd");
    println!("manifest of the root corpus: {paths:?}");
    note_socket(&h, "odd");
    assert!(
        h.workdir("odd").join("artifacts/hl").exists(),
        "the job could not make its hard link"
    );
}

#[test]
fn nobody_job_corpus_symlink_fifo_socket_does_not_hang() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let script = corpus_script(&h, false);
    let child = spawn_job(
        &h,
        json!({"job_id": "odd", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run odd", child, Duration::from_secs(30));
    run.assert_code(0);
    assert_only_regular_files(&h, "odd");
    note_socket(&h, "odd");
}
