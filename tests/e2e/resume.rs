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
    let mut child = start_big(h, job);
    let record = wait_booked(h, job, parts);
    signal(child.id(), "KILL");
    child.wait().unwrap();
    record
}

/// Starts a job that writes one big file and exits.
fn start_big(h: &Harness, job: &str) -> std::process::Child {
    let script = format!("head -c {SIZE} /dev/urandom > $C3_ARTIFACTS_DIR/big.bin");
    let spec = h.spec(json!({"job_id": job, "command": ["sh", "-c", script]}));
    h.spawn(&["run", "--job", spec.to_str().unwrap()])
}

/// Waits until the job's big upload journaled `parts` parts; its journal's record.
fn wait_booked(h: &Harness, job: &str, parts: usize) -> Value {
    let journal_dir = h.state.join(format!("jobs/{job}/uploads"));
    wait_for(
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
    )
}

/// An outage longer than the retry deadline in the middle of a big upload fails the attempt
/// (UPLOAD_ERROR), and keeps what was sent: `recover`, once the store is back, sends only the
/// missing parts. The upload was aborted at its first fault and its journal dropped, so every
/// recover sent the whole file again (an hour's upload redone for a minute's outage).
#[test]
fn an_outage_mid_upload_keeps_its_parts_for_recover() {
    let mut h = harness();
    let child = start_big(&h, "outage");
    wait_booked(&h, "outage", 2);
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.stop();
    let run = h.wait("run through an outage".into(), child);
    run.assert_code(3);
    let Store::S3(s3) = &mut h.store else {
        unreachable!()
    };
    s3.restart();
    let run = h.run(&["recover"]);
    run.assert_code(0);
    let ev = events(&run.stderr);
    let resumed = ev
        .iter()
        .find(|e| e["message"] == "resuming multipart upload")
        .unwrap_or_else(|| panic!("no resume: {}", run.stderr));
    let done = resumed["parts_done"].as_u64().unwrap();
    assert!(done >= 2, "{done} parts kept");
    let complete = ev
        .iter()
        .find(|e| e["message"] == "multipart upload complete")
        .expect("completed");
    assert_eq!(
        complete["bytes_sent"].as_u64().unwrap(),
        SIZE as u64 - done * 5 * 1024 * 1024
    );
    let local = std::fs::read(h.workdir("outage").join("artifacts/big.bin")).unwrap();
    assert_eq!(
        h.manifest("outage")["files"][0]["sha256"],
        sha256_hex(&local)
    );
}

/// Attempts of one job share its journal dir: the end of one (here `recover` of an attempt
/// whose agent was killed) aborts its own uploads, never those of another attempt's agent
/// still sending. Aborted under it, attempt 2's next part met NoSuchUpload.
#[test]
fn the_end_of_one_attempt_leaves_another_attempts_uploads_alone() {
    let h = harness();
    crash_mid_upload(&h, "two", 2);
    let journals = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".json"))
            .collect();
        names.sort();
        names
    };
    let dir = h.state.join("jobs/two/uploads");
    let first = journals(&dir);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(first[0].starts_with("1-"), "{first:?}");
    // Attempt 2's upload, journaled under its own name, as if its agent were sending it now.
    let theirs = dir.join(first[0].replacen("1-", "2-", 1));
    std::fs::copy(dir.join(&first[0]), &theirs).unwrap();
    let run = h.run(&["recover"]);
    run.assert_code(0);
    assert!(theirs.exists(), "attempt 2's journal went: {}", run.stderr);
    assert_eq!(
        journals(&dir),
        vec![theirs.file_name().unwrap().to_string_lossy().into_owned()]
    );
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
        events(&run.stderr).iter().any(|e| e["message"]
            == "the store no longer accepts the multipart upload; starting it over"),
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
