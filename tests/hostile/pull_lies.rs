//! A store that lies (a blob bigger than its manifest says, a manifest too big to read) must
//! not make `pull` or `ls` write or hold more than they were promised.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{files_under, not_root, wait_within};
use crate::support::{sha256_hex, Harness};

#[test]
fn pull_stops_at_the_manifest_size_of_an_oversized_blob() {
    if not_root("pull_stops_at_the_manifest_size_of_an_oversized_blob") {
        return;
    }
    let h = Harness::file();
    // A real job gives a real manifest entry for "abc" (sha256 and blake3).
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/big"]}),
    )
    .assert_code(0);
    let mut manifest = h.manifest("real");
    let sha = sha256_hex(b"abc");
    assert_eq!(manifest["files"][0]["sha256"], sha.as_str());
    assert_eq!(manifest["files"][0]["size"], 3);
    manifest["job_id"] = json!("liar");
    let path = h.object_path("jobs/liar/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    // The blob the manifest names: 20 MiB, not "abc".
    std::fs::write(
        h.object_path(&format!("blobs/sha256/{sha}")),
        vec![b'z'; 20 << 20],
    )
    .unwrap();

    // Watches `dest` while pull runs: a 20 MiB file written and deleted again also counts.
    let dest = h.path("dest");
    let mut child = h.spawn(&["pull", "liar", dest.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut biggest: Option<(PathBuf, u64)> = None;
    let look = |biggest: &mut Option<(PathBuf, u64)>| {
        for (file, size) in files_under(&dest) {
            if biggest.as_ref().is_none_or(|(_, s)| size > *s) {
                *biggest = Some((file, size));
            }
        }
    };
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        look(&mut biggest);
        std::thread::sleep(Duration::from_micros(500));
    }
    look(&mut biggest);
    let run = wait_within("pull liar", child, Duration::from_secs(1));
    assert_ne!(
        run.code, 0,
        "pull accepted a blob that is not what the manifest says\n{}",
        run.stderr
    );
    if let Some((file, size)) = biggest {
        assert!(
            size <= 4 << 20,
            "pull wrote {size} bytes to {} for a 3-byte file",
            file.display()
        );
    }
}

#[test]
fn ls_refuses_a_manifest_past_max_manifest_bytes() {
    if not_root("ls_refuses_a_manifest_past_max_manifest_bytes") {
        return;
    }
    let mut h = Harness::file();
    let script =
        "i=0; while [ $i -lt 60 ]; do echo $i > $C3_ARTIFACTS_DIR/file$i; i=$((i+1)); done";
    h.run_job(json!({"job_id": "big", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let bytes = h.object("jobs/big/manifest.json").unwrap().len();
    assert!(bytes > 1000, "the manifest is only {bytes} bytes");
    h.run(&["ls", "big"]).assert_code(0);
    // The key is known, and a manifest within the limit lists fine.
    h.extra_toml = "[store]\nmax_manifest_bytes = 1000000\n".into();
    h.run(&["ls", "big"]).assert_code(0);

    h.extra_toml = "[store]\nmax_manifest_bytes = 1000\n".into();
    let run = h.run(&["ls", "big"]);
    assert_ne!(
        run.code, 0,
        "ls read a {bytes}-byte manifest past max_manifest_bytes = 1000"
    );
    let err = run.stderr.to_lowercase();
    assert!(
        err.contains("limit") || err.contains("too large") || err.contains("max_manifest_bytes"),
        "stderr does not name the limit: {}",
        run.stderr
    );
}
