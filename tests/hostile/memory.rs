//! The agent's memory does not follow what a job or a control plane throws at it: huge sparse
//! files swapped into the artifacts, a control plane answering with hundreds of MiB.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, spawn_job, wait_within};
use crate::support::{max_child_rss_kib, Harness};

const MIB_IN_KIB: i64 = 1024;

#[test]
fn sparse_gib_files_swapped_into_artifacts_do_not_grow_the_agent() {
    if not_root() {
        return;
    }
    let mut h = Harness::file();
    // Uploads one at a time (a 1 KiB memory budget), at most 4 files in flight: the agent's
    // look at a file (one byte) and its read of it are then far enough apart for the job to
    // swap a GiB in between, as a busy node would make them; and a regression reads at most a
    // few GiB, not 50.
    h.extra_toml =
        "[sync]\nsettle_ms = 0\n[upload]\nmemory_budget_bytes = 1024\nfiles_in_flight = 4\n".into();
    // 50 one-byte files; then, for ~3 s, each in turn becomes a 1 GiB sparse file (made by
    // truncate) and a one-byte file again, renamed in as a checkpoint writer would (hard links
    // of two templates, so that the swaps come fast); at the end they are one byte again.
    let swapper = h.path("swap.py");
    std::fs::write(
        &swapper,
        r#"import os, time
os.chdir(os.environ["C3_ARTIFACTS_DIR"])
for i in range(50):
    with open("f%d" % i, "w") as f:
        f.write("x")
with open("../big", "wb") as f:
    f.truncate(1 << 30)
with open("../small", "w") as f:
    f.write("x")
def place(src, dst):
    os.link(src, "../tmp")
    os.rename("../tmp", dst)
end = time.time() + 3
while time.time() < end:
    for i in range(50):
        place("../small", "f%d" % i)
    time.sleep(0.01)
    for i in range(50):
        place("../big", "f%d" % i)
    time.sleep(0.002)
for i in range(50):
    place("../small", "f%d" % i)
"#,
    )
    .unwrap();
    let script = format!(
        "p=/usr/bin/python3; [ -x $p ] || p=python3; exec $p '{}'",
        swapper.display()
    );
    let child = spawn_job(
        &h,
        json!({"job_id": "sparse", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run sparse", child, Duration::from_secs(90));
    println!("run sparse exited {}", run.code);
    assert!(
        run.code >= 0,
        "the agent did not exit normally\n--- stderr\n{}",
        run.stderr
    );
    let rss = max_child_rss_kib();
    println!("peak RSS of the agent: {} MiB", rss / MIB_IN_KIB);
    assert!(
        rss < 300 * MIB_IN_KIB,
        "the agent's peak RSS was {} MiB (limit 300 MiB): it buffered a sparse file\n--- stderr\n{}",
        rss / MIB_IN_KIB,
        run.stderr
    );
}

#[test]
fn a_huge_control_plane_reply_is_not_buffered() {
    if not_root() {
        return;
    }
    let h = Harness::file().with_control_plane(5);
    h.cp().set_reply_padding(300 * 1024 * 1024);
    let child = spawn_job(
        &h,
        json!({"job_id": "cp", "command": ["sh", "-c", "echo hi; echo x > $C3_ARTIFACTS_DIR/x"]}),
    );
    let run = wait_within("run cp", child, Duration::from_secs(60));
    run.assert_code(0);
    let rss = max_child_rss_kib();
    println!("peak RSS of the agent: {} MiB", rss / MIB_IN_KIB);
    assert!(
        rss < 150 * MIB_IN_KIB,
        "the agent's peak RSS was {} MiB (limit 150 MiB): it buffered a control-plane reply\n--- stderr\n{}",
        rss / MIB_IN_KIB,
        run.stderr
    );
    assert_eq!(h.manifest_paths("cp"), vec!["artifacts/x"]);
}

/// `truncate -s` costs a job no disk and no quota, but a file that is mostly holes would cost
/// the agent hours of hashing zeros (a larger one than S3 takes, forever): both are refused by
/// name, at once, and the rest of the output is stored.
fn sparse_and_oversized_files_are_refused(h: Harness) {
    let script = "cd $C3_ARTIFACTS_DIR && echo ok > real && truncate -s 2T holes && \
                  printf x | dd of=holes bs=1 seek=1000 conv=notrunc 2>/dev/null && truncate -s 6T huge";
    let run = h.run_job(json!({"job_id": "sparse", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    let t = h.terminal("sparse");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert_eq!(h.manifest_paths("sparse"), vec!["artifacts/real"]);
    assert!(
        run.stderr.contains("holes is a sparse file"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("over upload.max_file_bytes"),
        "{}",
        run.stderr
    );
}

#[test]
fn file_store_refuses_sparse_and_oversized_files() {
    sparse_and_oversized_files_are_refused(Harness::file());
}

#[test]
fn s3_refuses_sparse_and_oversized_files() {
    sparse_and_oversized_files_are_refused(Harness::new(crate::support::Store::s3()));
}

/// A job's files cost the root agent memory each (scan, book, manifest): it tracks no more of
/// them than a manifest can list (`store.max_manifest_bytes`, 200 bytes and the path each), however many empty
/// files the job makes, and says so; the job is an upload error, as its manifest could never
/// list them all.
#[test]
fn files_past_what_a_manifest_can_list_are_not_tracked() {
    let mut h = Harness::file();
    // 100,000 bytes: at most 500 files, 460 with these paths.
    h.extra_toml = "[store]\nmax_manifest_bytes = 100000\n[sync]\nsettle_ms = 0\n".into();
    let script = "import os\nos.chdir(os.environ['C3_ARTIFACTS_DIR'])\nfor d in range(20):\n    os.mkdir('d%d' % d)\n    for i in range(500):\n        with open('d%d/f%d' % (d, i), 'w') as f:\n            f.write('%d %d' % (d, i))\n";
    let run = h.run_job(json!({"job_id": "many", "command": ["python3", "-c", script]}));
    run.assert_code(3);
    assert!(
        run.stderr.contains("than a manifest can list"),
        "{}",
        run.stderr
    );
    let blobs = std::fs::read_dir(h.object_path("blobs/sha256"))
        .map(|d| d.count())
        .unwrap_or(0);
    // Live sync's 500 and the final scan's 500 may differ; the job made 10,000.
    assert!(blobs <= 1_010, "{blobs} blobs stored for 10,000 files");
}

/// Hard links to one sparse file cost a job nothing, and each is refused: the failures are
/// counted in full, but only the first 100 are named (in the log, the run record, `status`):
/// one error line and one record entry each flooded the journal and grew `run.json` (root's
/// disk, read whole by every `recover`) with the job's file count and path lengths.
#[test]
fn unstorable_files_are_counted_not_each_named() {
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nlive = false\n".into();
    let script = "cd $C3_ARTIFACTS_DIR && truncate -s 2G s && mkdir -p d && \
                  i=0; while [ $i -lt 300 ]; do ln s d/link$i; i=$((i+1)); done";
    let run = h.run_job(json!({"job_id": "links", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    let t = h.terminal("links");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert_eq!(t["upload_errors"], 301, "{t}");
    let failed_lines = run.stderr.matches("upload failed").count();
    assert!(failed_lines <= 101, "{failed_lines} error lines");
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/links/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["unstored"].as_array().map(Vec::len), Some(100));
    assert_eq!(record["unstored_more"], 201);
    // Sparse, each of them: the job's doing, which `recover` does not come back for.
    assert_eq!(record["unstored_for_good"], 301);
}
