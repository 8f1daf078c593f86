//! Incremental sync while the job runs (contract §5): files land in the store before the
//! job ends; open files wait; rewrites, renames, deletes, overflows and crashes lose nothing.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{sha256_hex, signal, wait_for, Harness, Store};

const LIMIT: Duration = Duration::from_secs(30);

/// Shell that blocks until the test creates `go` (bounded: 60 s).
fn wait_go(go: &std::path::Path) -> String {
    format!(
        "i=0; while [ ! -e '{}' ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    )
}

fn harness(store: Store) -> Harness {
    let mut h = Harness::new(store);
    h.extra_toml = "[sync]\nsettle_ms = 200\nmanifest_interval_ms = 200\n".into();
    h
}

fn try_manifest(h: &Harness, job: &str) -> Option<Value> {
    serde_json::from_slice(&h.object(&format!("jobs/{job}/manifest.json"))?).ok()
}

/// The in-progress manifest's entry for `path`, once it has one.
fn wait_synced(h: &Harness, job: &str, path: &str) -> Value {
    wait_for(
        &format!("{path} in the in-progress manifest"),
        LIMIT,
        || {
            let m = try_manifest(h, job)?;
            assert_eq!(m["complete"], false, "the job still runs");
            m["files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == path)
                .cloned()
        },
    )
}

fn synced_while_running(store: Store) {
    let h = harness(store);
    let go = h.path("go");
    let script = format!(
        "echo early > $C3_ARTIFACTS_DIR/early.txt; {}; echo late > $C3_ARTIFACTS_DIR/late.txt",
        wait_go(&go)
    );
    let spec = h.spec(json!({"job_id": "inc", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let entry = wait_synced(&h, "inc", "artifacts/early.txt");
    assert_eq!(entry["sha256"], sha256_hex(b"early\n"));
    assert!(
        h.object(&format!("blobs/sha256/{}", sha256_hex(b"early\n")))
            .is_some(),
        "the manifest lists only stored blobs"
    );
    std::fs::write(&go, "").unwrap();
    h.wait("inc".into(), child).assert_code(0);
    let m = h.manifest("inc");
    assert_eq!(m["complete"], true);
    assert_eq!(
        h.manifest_paths("inc"),
        vec!["artifacts/early.txt", "artifacts/late.txt"]
    );
}

#[test]
fn file_store_syncs_while_the_job_runs() {
    synced_while_running(Store::File);
}

#[test]
fn s3_syncs_while_the_job_runs() {
    synced_while_running(Store::s3());
}

fn cpus_allowed(status: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|v| v.trim().to_string())
        .expect("Cpus_allowed_list in a status file")
}

#[test]
fn live_cpus_pin_the_agents_work_but_never_the_job() {
    let mine = cpus_allowed(&std::fs::read_to_string("/proc/self/status").unwrap());
    let last = mine.rsplit([',', '-']).next().unwrap().to_string();
    let mut h = harness(Store::File);
    h.extra_toml.push_str(&format!("live_cpus = \"{last}\"\n"));
    let go = h.path("go");
    let script = format!(
        "grep Cpus_allowed_list /proc/self/status > $C3_ARTIFACTS_DIR/cpus.txt; {}",
        wait_go(&go)
    );
    let spec = h.spec(json!({"job_id": "pin", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let entry = wait_synced(&h, "pin", "artifacts/cpus.txt");
    std::fs::write(&go, "").unwrap();
    let run = h.wait("pin".into(), child);
    run.assert_code(0);
    let blob = h
        .object(&format!(
            "blobs/sha256/{}",
            entry["sha256"].as_str().unwrap()
        ))
        .unwrap();
    assert_eq!(
        cpus_allowed(&String::from_utf8(blob).unwrap()),
        mine,
        "the job keeps every CPU the agent was given"
    );
    assert!(
        run.stderr.contains(&format!("live_cpus=\"{last}\"")),
        "the launch line names the live CPUs: {}",
        run.stderr
    );
}

#[test]
fn nested_dirs_made_after_start_are_synced() {
    let h = harness(Store::File);
    let go = h.path("go");
    let script = format!("sleep 0.3; mkdir -p $C3_ARTIFACTS_DIR/a/b/c results/x; echo deep > $C3_ARTIFACTS_DIR/a/b/c/d.txt; echo r > results/x/r; {}", wait_go(&go));
    let spec =
        h.spec(json!({"job_id": "nest", "command": ["sh", "-c", script], "output": ["results"]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "nest", "artifacts/a/b/c/d.txt");
    wait_synced(&h, "nest", "results/x/r");
    std::fs::write(&go, "").unwrap();
    h.wait("nest".into(), child).assert_code(0);
}

#[test]
fn a_file_open_for_writing_waits_for_its_close() {
    let h = harness(Store::File);
    let (go, closed) = (h.path("go"), h.path("closed"));
    let py = format!(
        r#"
import os, time
d = os.environ['C3_ARTIFACTS_DIR']
open(os.path.join(d, 'other.txt'), 'w').write('other')
f = open(os.path.join(d, 'open.bin'), 'wb')
f.write(b'half'); f.flush()
for _ in range(1200):
    if os.path.exists({close:?}): break
    time.sleep(0.05)
f.write(b' and the rest'); f.close()
for _ in range(1200):
    if os.path.exists({go:?}): break
    time.sleep(0.05)
"#,
        close = h.path("close").display().to_string(),
        go = go.display().to_string()
    );
    let spec = h.spec(json!({"job_id": "open", "command": ["python3", "-c", py]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "open", "artifacts/other.txt");
    // Several settle periods pass while open.bin is still open.
    std::thread::sleep(Duration::from_millis(1200));
    let m = try_manifest(&h, "open").unwrap();
    assert!(
        !m["files"].to_string().contains("open.bin"),
        "an open file was uploaded early: {m}"
    );
    assert!(h
        .object(&format!("blobs/sha256/{}", sha256_hex(b"half")))
        .is_none());
    std::fs::write(h.path("close"), "").unwrap();
    let entry = wait_synced(&h, "open", "artifacts/open.bin");
    assert_eq!(entry["sha256"], sha256_hex(b"half and the rest"));
    let _ = closed;
    std::fs::write(&go, "").unwrap();
    h.wait("open".into(), child).assert_code(0);
}

#[test]
fn rewrites_renames_and_deletes_are_followed() {
    let h = harness(Store::File);
    let steps: Vec<PathBuf> = (0..3).map(|i| h.path(&format!("step{i}"))).collect();
    let script = format!(
        "echo v1 > $C3_ARTIFACTS_DIR/ckpt; echo doomed > $C3_ARTIFACTS_DIR/doomed; {w0}; \
         echo v2 > $C3_ARTIFACTS_DIR/ckpt; echo moved > ../staging.tmp && mv ../staging.tmp $C3_ARTIFACTS_DIR/moved; rm $C3_ARTIFACTS_DIR/doomed; {w1}",
        w0 = wait_go(&steps[0]),
        w1 = wait_go(&steps[1]),
    );
    let spec = h.spec(json!({"job_id": "rw", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    assert_eq!(
        wait_synced(&h, "rw", "artifacts/ckpt")["sha256"],
        sha256_hex(b"v1\n")
    );
    wait_synced(&h, "rw", "artifacts/doomed");
    std::fs::write(&steps[0], "").unwrap();
    wait_synced(&h, "rw", "artifacts/moved");
    wait_for(
        "v2 and the delete in the in-progress manifest",
        LIMIT,
        || {
            let m = try_manifest(&h, "rw")?;
            let files = m["files"].to_string();
            (files.contains(&sha256_hex(b"v2\n")) && !files.contains("doomed")).then_some(())
        },
    );
    std::fs::write(&steps[1], "").unwrap();
    h.wait("rw".into(), child).assert_code(0);
    assert_eq!(
        h.manifest_paths("rw"),
        vec!["artifacts/ckpt", "artifacts/moved"]
    );
    assert_eq!(h.manifest("rw")["files"][0]["sha256"], sha256_hex(b"v2\n"));
}

/// A file replaced by a symlink (`ln -s step_900 tmp && mv -T tmp latest`) or by a directory
/// (`rm ckpt && mkdir ckpt`) while the job runs: no Gone hint comes for it, and the
/// in-progress manifest listed the file that is no longer there until the job's end.
#[test]
fn a_file_replaced_by_a_symlink_or_a_directory_leaves_the_manifest() {
    let h = harness(Store::File);
    let go = h.path("go");
    let script = format!(
        "echo a > $C3_ARTIFACTS_DIR/latest; echo b > $C3_ARTIFACTS_DIR/ckpt; {w}; \
         ln -s nowhere $C3_ARTIFACTS_DIR/tmp && mv -T $C3_ARTIFACTS_DIR/tmp $C3_ARTIFACTS_DIR/latest; \
         rm $C3_ARTIFACTS_DIR/ckpt && mkdir $C3_ARTIFACTS_DIR/ckpt; {w2}",
        w = wait_go(&go),
        w2 = wait_go(&h.path("end")),
    );
    let spec = h.spec(json!({"job_id": "shape", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "shape", "artifacts/latest");
    wait_synced(&h, "shape", "artifacts/ckpt");
    std::fs::write(&go, "").unwrap();
    wait_for("both gone from the in-progress manifest", LIMIT, || {
        let m = try_manifest(&h, "shape")?;
        let files = m["files"].as_array()?;
        files.is_empty().then_some(())
    });
    std::fs::write(h.path("end"), "").unwrap();
    h.wait("shape".into(), child).assert_code(0);
    assert!(h.manifest_paths("shape").is_empty());
}

/// The job maps its checkpoint right after live sync's settle look and stores to it (mtime
/// moves at the first store), live sync's upload reads it (held 2 s between the look and the
/// read), then the job stores again through the same dirty page (mtime stays) and exits.
/// The version the upload read was never looked at: it was recorded, the final scan found
/// the same stamp and kept it, and the complete manifest listed `ba...`, not `bc...`.
#[test]
fn a_file_mapped_after_the_settle_look_is_listed_as_it_ends() {
    let mut h = harness(Store::File);
    h.env
        .push(("C3_AGENT_FAULT".into(), "before-live-upload".into()));
    let py = r#"
import mmap, os, time
p = os.path.join(os.environ['C3_ARTIFACTS_DIR'], 'ckpt')
with open(p, 'wb') as f:
    f.write(b'a' * 4096)
time.sleep(1.0)
f = open(p, 'r+b')
m = mmap.mmap(f.fileno(), 4096)
m[0:1] = b'b'
time.sleep(3.0)
m[1:2] = b'c'
m.close()
f.close()
"#;
    h.run_job(json!({"job_id": "mapped", "command": ["python3", "-c", py]}))
        .assert_code(0);
    crate::support::assert_listed_as_it_ends(&h, "mapped");
}

/// Every live upload panics once (a bug in the upload path): each panicked task held one of
/// the two upload slots for the rest of the job, its file skipped by every later look, so
/// nothing written after the first two was synced while the job ran. The slots come back
/// and each file is sent again.
#[test]
fn panicked_live_uploads_give_their_slots_back_and_are_sent_again() {
    let mut h = harness(Store::File);
    h.extra_toml.push_str("[upload]\nfiles_in_flight = 2\n");
    h.env
        .push(("C3_AGENT_FAULT".into(), "live-upload-panics".into()));
    let go = h.path("go");
    let script = format!(
        "for i in 1 2 3 4 5 6; do echo $i > $C3_ARTIFACTS_DIR/f$i; sleep 0.3; done; {}",
        wait_go(&go)
    );
    let spec = h.spec(json!({"job_id": "panics", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    for i in 1..=6 {
        wait_synced(&h, "panics", &format!("artifacts/f{i}"));
    }
    std::fs::write(&go, "").unwrap();
    let run = h.wait("panics".into(), child);
    run.assert_code(0);
    assert!(
        run.stderr.contains("injected fault at live-upload-panics"),
        "no upload panicked: {}",
        run.stderr
    );
    assert_eq!(h.manifest_paths("panics").len(), 6);
}

/// A file whose every live upload panics is sent again once, then left to the final sync:
/// polling found it again at every look, and it panicked (re-read, re-hashed) at each.
#[test]
fn a_file_whose_live_upload_always_panics_is_tried_twice() {
    let mut h = harness(Store::File);
    h.extra_toml.push_str("mode = \"poll\"\npoll_ms = 100\n");
    h.env
        .push(("C3_AGENT_FAULT".into(), "live-upload-always-panics".into()));
    // Time for two live tries at idle priority on a loaded machine (a third never comes).
    let script = "echo once > $C3_ARTIFACTS_DIR/f; sleep 8";
    let run = h.run_job(json!({"job_id": "always", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let panics = run
        .stderr
        .matches("an upload task failed path=artifacts/f")
        .count();
    assert_eq!(panics, 2, "{}", run.stderr);
    assert_eq!(h.manifest_paths("always"), ["artifacts/f"]);
}

/// A job writing `count` files in 50 dirs as fast as it can, `around` seconds after its start
/// and before its end (time for live sync to be watching, and to see the burst).
fn many_files(h: Harness, count: usize, around: f64) -> crate::support::Run {
    let py = format!(
        "import os, time\ntime.sleep({around})\nd=os.environ['C3_ARTIFACTS_DIR']\nfor i in range({count}):\n    sub=os.path.join(d,'s%02d'%(i%50))\n    os.makedirs(sub,exist_ok=True)\n    open(os.path.join(sub,'f%05d'%i),'w').write('file %d'%i)\ntime.sleep({around})\n"
    );
    let run = h.run_job(json!({"job_id": "many", "command": ["python3", "-c", py]}));
    run.assert_code(0);
    let paths = h.manifest_paths("many");
    assert_eq!(paths.len(), count);
    for i in [0, count / 2, count - 1] {
        assert!(paths.contains(&format!("artifacts/s{:02}/f{i:05}", i % 50)));
    }
    run
}

#[test]
fn five_thousand_files_written_fast_are_all_there() {
    many_files(harness(Store::File), 5000, 0.0);
}

#[test]
fn event_queue_overflow_rescans_and_loses_nothing() {
    let mut h = Harness::file();
    // A one-slot queue between the watcher and the syncer: every burst overflows. The burst
    // comes once live sync watches (a loaded machine started its watches after a job that
    // wrote everything at once had ended), and the job lives on a moment after it.
    // The burst waits until live sync has stored a first file (its watches are set: at a
    // fixed second in, a loaded machine's idle-priority watch setup had not yet run).
    h.extra_toml = "[sync]\nsettle_ms = 50\nevent_queue = 1\nmanifest_interval_ms = 200\n".into();
    let go = h.path("go");
    let (count, job) = (2000, "many");
    let py = format!(
        "import os, time\nd=os.environ['C3_ARTIFACTS_DIR']\nopen(os.path.join(d,'first'),'w').write('1')\nfor _ in range(1200):\n    if os.path.exists('{}'): break\n    time.sleep(0.05)\nfor i in range({count}):\n    sub=os.path.join(d,'s%02d'%(i%50))\n    os.makedirs(sub,exist_ok=True)\n    open(os.path.join(sub,'f%05d'%i),'w').write('file %d'%i)\ntime.sleep(1.0)\n",
        go.display()
    );
    let spec = h.spec(json!({"job_id": job, "command": ["python3", "-c", py]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, job, "artifacts/first");
    std::fs::write(&go, "").unwrap();
    let run = h.wait(job.into(), child);
    run.assert_code(0);
    let paths = h.manifest_paths(job);
    assert_eq!(paths.len(), count + 1);
    for i in [0, count / 2, count - 1] {
        assert!(paths.contains(&format!("artifacts/s{:02}/f{i:05}", i % 50)));
    }
    assert!(
        run.stderr.contains("rescanning"),
        "the overflow path ran: {}",
        run.stderr
    );
}

#[test]
fn directories_removed_while_hints_overflow_give_their_watches_back() {
    let mut h = Harness::file();
    // Every burst overflows the one-slot queue, so the removal of a watched directory is
    // often among the lost hints; 10 watches are 3 in use (artifacts, flood, the newest)
    // and room for what one rescan's pace (1 s, 5 rounds) loses, never for a whole job's.
    h.extra_toml = "[sync]\nsettle_ms = 50\nevent_queue = 1\nmax_watches = 10\n".into();
    let py = r#"
import os, time
d = os.environ['C3_ARTIFACTS_DIR']
flood = os.path.join(d, 'flood')
os.mkdir(flood)
for i in range(40):
    s = os.path.join(d, 'd%03d' % i)
    os.mkdir(s)
    time.sleep(0.1)
    for j in range(200):
        open(os.path.join(flood, 'f%d' % j), 'w').write('x')
    os.rmdir(s)
    time.sleep(0.05)
"#;
    let run = h.run_job(json!({"job_id": "dirs", "command": ["python3", "-c", py]}));
    run.assert_code(0);
    assert!(
        run.stderr.contains("rescanning"),
        "no hint was lost: {}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("no more directories can be watched"),
        "the watches of removed directories were kept: {}",
        run.stderr
    );
    assert_eq!(h.manifest_paths("dirs").len(), 200);
}

/// A watched directory moved away and a symlink made at its name (a move brings no DELETE
/// for each file below, and a symlink is never recorded over it): what it held leaves the
/// in-progress manifest, which listed it until the end.
#[test]
fn a_directory_replaced_by_a_symlink_leaves_the_in_progress_manifest() {
    let mut h = harness(Store::File);
    // The file is at the name by the time the hint is handled.
    h.env.push(("C3_AGENT_FAULT".into(), "slow-gone".into()));
    let (go1, go2, trash) = (h.path("go1"), h.path("go2"), h.path("trash"));
    let script = format!(
        "mkdir $C3_ARTIFACTS_DIR/d; echo x > $C3_ARTIFACTS_DIR/d/f; {}; mv $C3_ARTIFACTS_DIR/d {}; ln -s nowhere $C3_ARTIFACTS_DIR/d; {}",
        wait_go(&go1),
        trash.display(),
        wait_go(&go2)
    );
    let spec = h.spec(json!({"job_id": "dfile", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "dfile", "artifacts/d/f");
    std::fs::write(&go1, "").unwrap();
    wait_for(
        "artifacts/d/f to leave the in-progress manifest",
        LIMIT,
        || {
            let m = try_manifest(&h, "dfile")?;
            let files = m["files"].as_array()?;
            (!files.iter().any(|f| f["path"] == "artifacts/d/f")).then_some(())
        },
    );
    std::fs::write(&go2, "").unwrap();
    h.wait("dfile".into(), child).assert_code(0);
    assert!(h.manifest_paths("dfile").is_empty());
}

/// Past the watch cap, live sync polls, and the watches set so far keep giving their hints:
/// the watcher was dropped with every watch, and a file in a watched dir waited for the
/// next poll (a minute here).
#[test]
fn past_the_watch_cap_the_watches_set_still_hint() {
    let mut h = harness(Store::File);
    h.extra_toml.push_str(
        "max_watches = 2
poll_ms = 60000
",
    );
    let go = h.path("go");
    let script = format!(
        "mkdir -p $C3_ARTIFACTS_DIR/a $C3_ARTIFACTS_DIR/b $C3_ARTIFACTS_DIR/c; sleep 1; echo hinted > $C3_ARTIFACTS_DIR/h.txt; {}",
        wait_go(&go)
    );
    let spec = h.spec(json!({"job_id": "capped", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "capped", "artifacts/h.txt");
    std::fs::write(&go, "").unwrap();
    let run = h.wait("capped".into(), child);
    run.assert_code(0);
    assert!(
        run.stderr.contains("no more directories can be watched"),
        "the cap was not met: {}",
        run.stderr
    );
}

#[test]
fn poll_mode_syncs_without_inotify() {
    let mut h = harness(Store::File);
    h.extra_toml.push_str("mode = \"poll\"\npoll_ms = 100\n");
    let go = h.path("go");
    let script = format!("echo polled > $C3_ARTIFACTS_DIR/p.txt; {}", wait_go(&go));
    let spec = h.spec(json!({"job_id": "poll", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "poll", "artifacts/p.txt");
    std::fs::write(&go, "").unwrap();
    h.wait("poll".into(), child).assert_code(0);
}

#[test]
fn a_file_mutating_during_upload_never_becomes_a_torn_blob() {
    let mut h = harness(Store::File);
    h.extra_toml
        .push_str("[upload]\nmultipart_threshold_bytes = 1048576\nmin_part_size_bytes = 5242880\n");
    // Rewrites a 24 MiB file in place, over and over, with pauses about as long as the settle time.
    let py = r#"
import os, time
p = os.path.join(os.environ['C3_ARTIFACTS_DIR'], 'hot.bin')
for round in range(12):
    with open(p, 'r+b' if os.path.exists(p) else 'wb') as f:
        for chunk in range(24):
            f.write(bytes([round]) * 1048576)
    time.sleep(0.25)
"#;
    h.run_job(json!({"job_id": "hot", "command": ["python3", "-c", py]}))
        .assert_code(0);
    let blobs = std::fs::read_dir(h.state.join("store/blobs/sha256")).unwrap();
    for blob in blobs {
        let blob = blob.unwrap();
        let name = blob.file_name().into_string().unwrap();
        if name.contains('#') {
            continue; // an in-flight temp name of the file store, never a key
        }
        assert_eq!(
            sha256_hex(&std::fs::read(blob.path()).unwrap()),
            name,
            "blob bytes match their key"
        );
    }
    let last = vec![11u8; 24 * 1048576];
    assert_eq!(h.manifest("hot")["files"][0]["sha256"], sha256_hex(&last));
}

#[test]
fn sigkill_of_the_agent_then_recover_finishes_the_job() {
    let h = harness(Store::File).with_control_plane(5);
    let go = h.path("go");
    let script = format!("echo before > $C3_ARTIFACTS_DIR/before; {}; echo after > $C3_ARTIFACTS_DIR/after; sleep 300", wait_go(&go));
    let spec = h.spec(json!({"job_id": "crash", "command": ["sh", "-c", script]}));
    let mut child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    wait_synced(&h, "crash", "artifacts/before");
    signal(child.id(), "KILL");
    child.wait().unwrap();
    // The store holds a valid in-progress manifest of what was synced.
    let m = h.manifest("crash");
    assert_eq!(m["complete"], false);
    // The job itself lives on, unsupervised, and writes more.
    std::fs::write(&go, "").unwrap();
    wait_for("the orphaned job to write", LIMIT, || {
        h.workdir("crash")
            .join("artifacts/after")
            .exists()
            .then_some(())
    });

    // A recover run with another config (a housekeeping unit without the job unit's
    // environment) leaves the attempt alone: it would finish it into another store, and
    // report to nobody.
    let elsewhere = h.path("elsewhere");
    let mut other = h.command(&["recover"]);
    other.env(
        "C3_AGENT_STORE_URL",
        format!("file://{}", elsewhere.display()),
    );
    let out = other.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("left alone (run recover with the job's config"),
        "{said}"
    );
    assert!(
        !elsewhere.join("jobs/crash").exists(),
        "finished into another store"
    );
    assert_eq!(h.manifest("crash")["complete"], false);

    let run = h.run(&["recover"]);
    run.assert_code(6);
    let m = h.manifest("crash");
    assert_eq!(m["complete"], true);
    assert_eq!(
        h.manifest_paths("crash"),
        vec!["artifacts/after", "artifacts/before"]
    );
    let t = h.cp().terminal_status().expect("terminal status delivered");
    assert_eq!(
        (t["state"].as_str(), t["reason"].as_str()),
        (Some("FAILED"), Some("AGENT_ERROR"))
    );
    assert!(t["seq"].as_u64().unwrap() > 1);
    // A second recover has nothing left to do.
    h.run(&["recover"]).assert_code(0);
}

/// A file deeper than any manifest may list, published (or seen by live sync) while the job
/// runs: refused, left to the final scan (which names it, UPLOAD_ERROR), and the manifest stays
/// readable; one such entry in it would fail `ls`, `pull` and datasets of the job, and stop
/// every gc.
#[test]
fn a_file_too_deep_to_list_keeps_the_manifest_readable() {
    let h = harness(Store::File);
    let deep = format!("$C3_ARTIFACTS_DIR/{}", "d/".repeat(130));
    let script = format!(
        "mkdir -p {deep} && echo deep > {deep}f && echo ok > $C3_ARTIFACTS_DIR/ok; \
         {} publish {deep}f; echo $? > rc; sleep 1",
        crate::support::BIN
    );
    let run = h.run_job(json!({"job_id": "deep", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    assert_eq!(h.terminal("deep")["reason"], "UPLOAD_ERROR");
    h.run(&["ls", "deep"]).assert_code(0);
    assert_eq!(h.manifest_paths("deep"), vec!["artifacts/ok"]);
    let rc = std::fs::read_to_string(h.workdir("deep").join("rc")).unwrap();
    assert_ne!(rc.trim(), "0", "publish stored a path no manifest may list");
}

/// `rm -rf $C3_ARTIFACTS_DIR && mkdir $C3_ARTIFACTS_DIR` while the job runs: the workdir is
/// not watched, so nothing saw the new directory, and nothing below it was synced live for
/// the rest of the job (the final scan still found it).
#[test]
fn an_output_dir_made_again_is_watched_again() {
    let h = harness(Store::File);
    let go = h.path("go");
    let script = format!(
        "echo a > $C3_ARTIFACTS_DIR/first; sleep 1; rm -rf $C3_ARTIFACTS_DIR; \
         mkdir $C3_ARTIFACTS_DIR; sleep 0.5; echo b > $C3_ARTIFACTS_DIR/again; {}",
        wait_go(&go)
    );
    let spec = h.spec(json!({"job_id": "remade", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let entry = wait_synced(&h, "remade", "artifacts/again");
    assert_eq!(entry["sha256"], sha256_hex(b"b\n"));
    std::fs::write(&go, "").unwrap();
    h.wait("remade".into(), child).assert_code(0);
    assert_eq!(h.manifest_paths("remade"), vec!["artifacts/again"]);
}

/// `mkdir new && mv a new/b` with `a` watched: `new` was walked (finding `b`, the inode `a`
/// watched, whose watch inotify hands back) before `a`'s `Gone` came, and that `Gone`
/// removed the one watch `b` and its subdirectories had: nothing written below them was
/// synced while the job ran.
#[test]
fn a_watched_dir_moved_into_a_new_one_is_still_watched() {
    let mut h = harness(Store::File);
    // `new` is walked after the move, as a busy syncer would.
    h.env.push(("C3_AGENT_FAULT".into(), "slow-touch".into()));
    let go = h.path("go");
    let py = format!(
        r#"
import os, time
d = os.environ['C3_ARTIFACTS_DIR']
os.makedirs(os.path.join(d, 'a', 'c'))
time.sleep(1)
os.mkdir(os.path.join(d, 'new'))
os.rename(os.path.join(d, 'a'), os.path.join(d, 'new', 'b'))
time.sleep(1)
open(os.path.join(d, 'new', 'b', 'c', 'f'), 'w').write('moved')
for _ in range(1200):
    if os.path.exists({go:?}): break
    time.sleep(0.05)
"#,
        go = go.display().to_string()
    );
    let spec = h.spec(json!({"job_id": "moved", "command": ["python3", "-c", py]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let entry = wait_synced(&h, "moved", "artifacts/new/b/c/f");
    assert_eq!(entry["sha256"], sha256_hex(b"moved"));
    std::fs::write(&go, "").unwrap();
    h.wait("moved".into(), child).assert_code(0);
    assert_eq!(h.manifest_paths("moved"), vec!["artifacts/new/b/c/f"]);
}

/// Names that are not UTF-8 are synced while the job runs, a file written there and a
/// directory moved in: their hints were dropped (the path was taken as text), and a rescan's
/// key for them (`\0` and base64) was looked up as a path, so they reached the store only
/// at the end (never, with the agent killed first).
#[test]
fn names_that_are_not_utf8_are_synced_while_the_job_runs() {
    let h = harness(Store::File);
    let go = h.path("go");
    let py = format!(
        r#"
import os, time
d = os.environb[b'C3_ARTIFACTS_DIR']
open(os.path.join(d, b'ck\xff'), 'wb').write(b'odd file')
stage = os.path.join(os.path.dirname(d), b'stage\xfe')
os.mkdir(stage)
open(os.path.join(stage, b'f'), 'wb').write(b'odd dir')
os.rename(stage, os.path.join(d, b'in\xfe'))
for _ in range(1200):
    if os.path.exists({go:?}): break
    time.sleep(0.05)
"#,
        go = go.display().to_string()
    );
    let spec = h.spec(json!({"job_id": "odd", "command": ["python3", "-c", py]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    for (raw, body) in [
        (&b"artifacts/ck\xff"[..], &b"odd file"[..]),
        (b"artifacts/in\xfe/f", b"odd dir"),
    ] {
        let key = c3_proto::manifest::rel_key(raw);
        let b64 = key.strip_prefix('\0').unwrap();
        let entry = wait_for(
            &format!(
                "{} in the in-progress manifest",
                String::from_utf8_lossy(raw)
            ),
            LIMIT,
            || {
                let m = try_manifest(&h, "odd")?;
                assert_eq!(m["complete"], false, "the job still runs");
                m["files"]
                    .as_array()?
                    .iter()
                    .find(|f| f["path_b64"] == b64)
                    .cloned()
            },
        );
        assert_eq!(entry["sha256"], sha256_hex(body));
    }
    std::fs::write(&go, "").unwrap();
    h.wait("odd".into(), child).assert_code(0);
    assert_eq!(h.manifest_paths("odd").len(), 2);
}

/// A walk of live sync's that takes long (setting watches on a tree of millions of entries,
/// or one another process keeps renaming in) is dropped at the job's end: awaited, it held
/// the final sync and the terminal status for as long as it took. The final scan stores
/// what the job wrote.
#[test]
fn a_slow_watch_walk_does_not_hold_the_jobs_end() {
    let mut h = harness(Store::File);
    h.env
        .push(("C3_AGENT_FAULT".into(), "watch-walk-is-slow".into()));
    let started = std::time::Instant::now();
    h.run_job(
        json!({"job_id": "slowwalk", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(40),
        "the run took {took:?}: the walk's minute held it"
    );
    assert_eq!(h.manifest_paths("slowwalk"), vec!["artifacts/f"]);
}
