//! Every name the filesystem allows round-trips exactly through the manifest and `pull`
//! (contract v2 §5): names that are not UTF-8 carry `path_b64`.

use serde_json::{json, Value};

use crate::support::{Harness, Store};

/// Writes the odd names (as bytes) below `artifacts/`; prints nothing.
const WRITE_NAMES: &str = r#"
import os
d = os.environb[b'C3_ARTIFACTS_DIR']
every = bytes(b for b in range(1, 256) if b != 0x2f)
names = [b'caf\xe9.txt', b'\x83e\x83X\x83g.sjis', every, b'plain.txt']
for n in names:
    open(os.path.join(d, n), 'wb').write(b'content of ' + n)
os.mkdir(os.path.join(d, b'dir\xff'))
open(os.path.join(d, b'dir\xff', b'inner\xfe'), 'wb').write(b'deep')
"#;

fn every_byte_name() -> Vec<u8> {
    (1u8..=255).filter(|b| *b != b'/').collect()
}

fn round_trip(h: &Harness, job: &str) {
    use std::os::unix::ffi::OsStrExt;
    h.run_job(json!({"job_id": job, "command": ["python3", "-c", WRITE_NAMES]}))
        .assert_code(0);
    let ls = h.run(&["ls", job, "--json"]);
    ls.assert_code(0);
    let m: Value = serde_json::from_str(ls.stdout.trim()).unwrap();
    let files = m["files"].as_array().unwrap();
    assert_eq!(files.len(), 5, "{m}");
    assert_eq!(
        files.iter().filter(|f| f.get("path_b64").is_some()).count(),
        4,
        "only the names that are not UTF-8 carry path_b64: {m}"
    );
    let dest = h.path(&format!("pulled-{job}"));
    h.run(&["pull", job, dest.to_str().unwrap()]).assert_code(0);
    let a = dest.join("artifacts");
    let every = every_byte_name();
    for (name, body) in [
        (b"caf\xe9.txt".to_vec(), None),
        (b"\x83e\x83X\x83g.sjis".to_vec(), None),
        (every.clone(), None),
        (b"plain.txt".to_vec(), None),
        (b"dir\xff/inner\xfe".to_vec(), Some(b"deep".to_vec())),
    ] {
        let path = a.join(std::ffi::OsStr::from_bytes(&name));
        let got = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&name)));
        let last = name.rsplit(|b| *b == b'/').next().unwrap().to_vec();
        let want = body.unwrap_or_else(|| [b"content of ".to_vec(), last].concat());
        assert_eq!(got, want, "{}", String::from_utf8_lossy(&name));
    }
    let text = h.run(&["ls", job]);
    assert!(text.stdout.contains("name not UTF-8"), "{}", text.stdout);
}

#[test]
fn names_that_are_not_utf8_round_trip_on_the_file_store() {
    round_trip(&Harness::file(), "names-file");
}

#[test]
fn names_that_are_not_utf8_round_trip_on_s3() {
    round_trip(&Harness::new(Store::s3()), "names-s3");
}

#[test]
fn a_file_that_vanishes_before_its_read_is_a_warning_not_an_upload_error() {
    use std::time::Duration;
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nlive = false\n".into();
    let held = h.path("held");
    h.env.push((
        "C3_AGENT_FAULT".into(),
        format!("after-final-scan@{}", held.display()),
    ));
    let spec = h.spec(json!({"job_id": "vanish", "command": ["sh", "-c",
        "echo k > $C3_ARTIFACTS_DIR/keep; echo g > $C3_ARTIFACTS_DIR/gone"]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // The final scan has seen both files; the agent holds until `held` is removed.
    crate::support::wait_for("the final scan", Duration::from_secs(30), || {
        held.exists().then_some(())
    });
    std::fs::remove_file(h.workdir("vanish").join("artifacts/gone")).unwrap();
    std::fs::remove_file(&held).unwrap();
    let run = h.wait("run".into(), agent);
    run.assert_code(0);
    let t = h.terminal("vanish");
    assert_eq!(t["state"], "SUCCEEDED", "{t}");
    assert_eq!(t["upload_errors"], 0);
    assert!(
        t["warnings"]
            .to_string()
            .contains("vanished before it could be read"),
        "{t}"
    );
    assert_eq!(h.manifest_paths("vanish"), vec!["artifacts/keep"]);
}

#[test]
fn recover_after_a_crash_registers_the_bytes_the_crashed_agent_added() {
    use std::time::Duration;
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nsettle_ms = 100\n".into();
    let script = "head -c 30000 /dev/urandom > $C3_ARTIFACTS_DIR/a; \
                  head -c 20000 /dev/urandom > $C3_ARTIFACTS_DIR/b; exec sleep 60";
    let spec = h.spec(json!({"job_id": "crashed", "command": ["sh", "-c", script]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    // Both files stored while the job runs (the in-progress manifest lists them).
    crate::support::wait_for("live uploads", Duration::from_secs(20), || {
        let m: Value =
            serde_json::from_slice(&h.object("jobs/crashed/attempts/1/manifest.json")?).ok()?;
        (m["files"].as_array()?.len() == 2).then_some(())
    });
    crate::support::signal(agent.id(), "KILL");
    let _ = h.wait("killed agent".into(), agent);
    h.run(&["recover"]);
    let registration = h
        .local_reports("crashed")
        .into_iter()
        .find(|r| {
            r["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with("/artifacts"))
        })
        .expect("an artifacts registration");
    let new_bytes = registration["body"]["new_bytes"].as_u64().unwrap();
    assert!(
        new_bytes >= 50_000,
        "the crashed agent's uploads are this job's storage delta too: {registration}"
    );
}

/// A file 5,000+ bytes deep below `artifacts/` (PATH_MAX is 4,096): 25 directories of 200
/// characters. Python walks there with chdir, as a job would.
const DEEP: &str = r#"
import os, sys
os.chdir(os.environ['C3_ARTIFACTS_DIR'])
for i in range(25):
    n = ('d%02d' % i) + 'x' * 197
    os.mkdir(n)
    os.chdir(n)
open('deep.txt', 'w').write('at the bottom')
"#;

const READ_DEEP: &str = r#"
import os, sys
os.chdir(sys.argv[1])
for i in range(25):
    os.chdir(('d%02d' % i) + 'x' * 197)
print(open('deep.txt').read())
"#;

fn deep_round_trip(h: &Harness, job: &str) {
    h.run_job(json!({"job_id": job, "command": ["python3", "-c", DEEP]}))
        .assert_code(0);
    let ls = h.run(&["ls", job, "--json"]);
    let m: Value = serde_json::from_str(ls.stdout.trim()).unwrap();
    let path = m["files"][0]["path"].as_str().unwrap().to_string();
    assert!(
        path.len() > 5000 && path.ends_with("/deep.txt"),
        "{}",
        path.len()
    );
    let dest = h.path(&format!("pulled-{job}"));
    h.run(&["pull", job, dest.to_str().unwrap()]).assert_code(0);
    let read = std::process::Command::new("python3")
        .args(["-c", READ_DEEP, dest.join("artifacts").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&read.stdout).trim(),
        "at the bottom"
    );
}

#[test]
fn a_path_longer_than_path_max_round_trips_on_the_file_store() {
    deep_round_trip(&Harness::file(), "deep-file");
}

#[test]
fn a_path_longer_than_path_max_round_trips_on_s3() {
    deep_round_trip(&Harness::new(Store::s3()), "deep-s3");
}
