//! Big uploads survive an agent crash: `recover` sends only the missing parts, and uploads
//! nobody will finish are aborted at the server.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{sha256_hex, signal, wait_for, Harness, Store};

const SIZE: usize = 150 * 1024 * 1024;

fn harness() -> Harness {
    harness_on(Store::s3())
}

fn harness_on(store: Store) -> Harness {
    let mut h = Harness::new(store);
    // One 5 MiB part at a time, upload at exit only: a long, predictable upload to interrupt.
    h.extra_toml = "[sync]\nlive = false\n[upload]\nmultipart_threshold_bytes = 5242880\nmin_part_size_bytes = 5242880\nparts_in_flight = 1\n".into();
    h.env.push(("C3_AGENT_LOG_FORMAT".into(), "json".into()));
    h.env.push((
        "C3_AGENT_LOG".into(),
        "info,c3_runtime::upload=debug".into(),
    ));
    h
}

/// Starts the job, waits until its big file's upload journaled `parts` parts, SIGKILLs the agent.
fn crash_mid_upload(h: &Harness, job: &str, parts: usize) -> Value {
    let script = format!("head -c {SIZE} /dev/urandom > $C3_ARTIFACTS_DIR/big.bin");
    let spec = h.spec(json!({"job_id": job, "command": ["sh", "-c", script]}));
    let mut child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let journal_dir = h.state.join(format!("jobs/{job}/uploads"));
    let record = wait_for(
        "a journaled multipart upload",
        Duration::from_secs(60),
        || {
            let entry = std::fs::read_dir(&journal_dir)
                .ok()?
                .flatten()
                .find(|e| e.path().extension().is_some_and(|x| x == "json"))?;
            let record: Value = serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
            // Finished parts are appended to `<sha>.parts`, one JSON line each.
            let booked = std::fs::read_to_string(entry.path().with_extension("parts"))
                .unwrap_or_default()
                .lines()
                .filter(|l| serde_json::from_str::<Value>(l).is_ok())
                .count();
            (booked >= parts).then_some(record)
        },
    );
    signal(child.id(), "KILL");
    child.wait().unwrap();
    record
}

fn events(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn recover_resumes_a_multipart_upload_with_the_missing_parts() {
    resumes(harness());
}

#[test]
fn az_recover_resumes_a_multipart_upload_with_the_missing_parts() {
    resumes(harness_on(Store::azure()));
}

fn resumes(h: Harness) {
    crash_mid_upload(&h, "resume", 4);
    let done_before = 4;
    assert!(
        done_before < SIZE / (5 * 1024 * 1024),
        "the upload was interrupted, not finished"
    );

    let run = h.run(&["recover"]);
    run.assert_code(0); // the script had exited 0: recover reports its real outcome
    let ev = events(&run.stderr);
    let resumed = ev
        .iter()
        .find(|e| e["message"] == "resuming multipart upload")
        .unwrap_or_else(|| panic!("no resume: {}", run.stderr));
    assert!(resumed["parts_done"].as_u64().unwrap() >= done_before as u64);
    let complete = ev
        .iter()
        .find(|e| e["message"] == "multipart upload complete")
        .expect("completed");
    let sent = complete["bytes_sent"].as_u64().unwrap();
    assert!(
        sent < SIZE as u64,
        "sent {sent} of {SIZE}: the resume re-sent everything"
    );
    assert_eq!(
        sent,
        (SIZE - resumed["parts_done"].as_u64().unwrap() as usize * 5 * 1024 * 1024) as u64
    );

    let local = std::fs::read(h.workdir("resume").join("artifacts/big.bin")).unwrap();
    let sha = sha256_hex(&local);
    assert_eq!(h.manifest("resume")["files"][0]["sha256"], sha);
    assert_eq!(
        sha256_hex(&h.object(&format!("blobs/sha256/{sha}")).expect("blob")),
        sha
    );
    assert!(
        std::fs::read_dir(h.state.join("jobs/resume/uploads"))
            .unwrap()
            .next()
            .is_none(),
        "journal cleaned up"
    );
}

#[test]
fn an_upload_nobody_will_finish_is_aborted() {
    let h = harness();
    let record = crash_mid_upload(&h, "orphan", 2);
    let upload_id = record["upload_id"].as_str().unwrap().to_string();
    let Store::S3(s3) = &h.store else {
        unreachable!()
    };
    let on_server = || {
        walk(s3.root.path())
            .into_iter()
            .filter(|p| p.contains(&upload_id))
            .collect::<Vec<_>>()
    };
    assert!(
        !on_server().is_empty(),
        "the interrupted upload's parts are on the server"
    );
    // The file changes before recovery: the interrupted upload can never be completed.
    std::fs::write(h.workdir("orphan").join("artifacts/big.bin"), "small now").unwrap();
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(
        events(&run.stderr)
            .iter()
            .any(|e| e["message"] == "aborted an orphaned multipart upload"),
        "{}",
        run.stderr
    );
    assert_eq!(h.manifest("orphan")["files"][0]["size"], 9);
    // The server no longer has the upload.
    let leftovers = on_server();
    assert!(
        leftovers.is_empty(),
        "parts of the aborted upload remain: {leftovers:?}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        out.push(p.display().to_string());
        if p.is_dir() {
            out.extend(walk(&p));
        }
    }
    out
}

/// The store lost the interrupted upload (expired, cleaned up, a server crash): `recover`
/// cannot resume it, so it starts the upload over instead of failing the job.
#[test]
fn a_resumed_upload_the_store_lost_is_started_over() {
    let h = harness();
    let record = crash_mid_upload(&h, "lost", 2);
    let upload_id = record["upload_id"].as_str().unwrap().to_string();
    let Store::S3(s3) = &h.store else {
        unreachable!()
    };
    for path in walk(s3.root.path())
        .into_iter()
        .filter(|p| p.contains(&upload_id))
    {
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir_all(&path);
    }
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(
        events(&run.stderr)
            .iter()
            .any(|e| e["message"]
                == "the resumed multipart upload is not accepted; starting it over"),
        "{}",
        run.stderr
    );
    let local = std::fs::read(h.workdir("lost").join("artifacts/big.bin")).unwrap();
    let sha = sha256_hex(&local);
    assert_eq!(h.manifest("lost")["files"][0]["sha256"], sha);
    assert_eq!(
        sha256_hex(&h.object(&format!("blobs/sha256/{sha}")).expect("blob")),
        sha
    );
}
