//! `[upload] bandwidth_limit_bytes_per_sec`: uploads cannot go faster than the limit.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{sha256_hex, Harness};

const MIB: u64 = 1024 * 1024;

/// A 1 MiB small file (one PUT) and a 5 MiB large one (staged: one 5 MiB part, more than
/// the bucket's burst) under 2 MiB/s: 6 MiB with 2 MiB of burst need at least 2 s of
/// sending, where the same run without a limit takes well under a second.
#[test]
fn uploads_keep_to_the_bandwidth_limit() {
    let mut h = Harness::file();
    h.extra_toml = format!(
        "[sync]\nlive = false\n[upload]\nmultipart_threshold_bytes = {MIB}\nmin_part_size_bytes = {}\n",
        5 * MIB
    );
    h.env
        .push(("C3_AGENT_BANDWIDTH_LIMIT".into(), (2 * MIB).to_string()));
    let script = "head -c 1048576 /dev/urandom > $C3_ARTIFACTS_DIR/small.bin; \
                  head -c 5242880 /dev/urandom > $C3_ARTIFACTS_DIR/large.bin";
    let start = Instant::now();
    h.run_job(json!({"job_id": "bw", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let took = start.elapsed();
    assert_eq!(h.manifest("bw")["complete"], true);
    let mut paths = h.manifest_paths("bw");
    paths.sort();
    assert_eq!(paths, ["artifacts/large.bin", "artifacts/small.bin"]);
    for f in h.manifest("bw")["files"].as_array().unwrap() {
        let rel = f["path"].as_str().unwrap();
        let local = std::fs::read(h.workdir("bw").join(rel)).unwrap();
        assert_eq!(f["sha256"], sha256_hex(&local), "{rel}");
        let blob = h.object(&format!("blobs/sha256/{}", f["sha256"].as_str().unwrap()));
        assert!(blob == Some(local), "{rel}: the blob is not the file");
    }
    // (6 MiB - 2 MiB of burst) / 2 MiB/s = 2 s at least; a lower bound only.
    assert!(
        took >= Duration::from_millis(1800),
        "the run took {took:?}: the limit was not applied"
    );
}
