//! Hard links cost a job one inode's disk, whatever their number: the agent must not read and
//! hash the same bytes once per link.

use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, open_harness, spawn_job, wait_within};

#[test]
fn a_file_with_hundreds_of_hard_links_is_read_once() {
    if not_root() {
        return;
    }
    let h = open_harness();
    // 256 MiB and 400 links: 100 GB of reads and hashing if each link is read (minutes on
    // the project's machine), one read of 256 MiB if not.
    let script = "cd $C3_ARTIFACTS_DIR && head -c 268435456 /dev/urandom > f && \
                  i=0; while [ $i -lt 400 ]; do ln f l$i; i=$((i+1)); done";
    let child = spawn_job(
        &h,
        json!({"job_id": "links", "user": "nobody", "command": ["sh", "-c", script]}),
    );
    let run = wait_within("run links", child, Duration::from_secs(45));
    run.assert_code(0);
    let manifest = h.manifest("links");
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 401);
    let sha = files[0]["sha256"].as_str().unwrap();
    assert!(files
        .iter()
        .all(|f| f["sha256"] == sha && f["size"] == 268435456));
    let blob = h.object(&format!("blobs/sha256/{sha}")).unwrap();
    assert_eq!(blob.len(), 268435456);
    assert_eq!(crate::support::sha256_hex(&blob), sha);
}
