//! `c3-agent publish` and the agent socket (contract §4): stored now, `ok` only once durable
//! and in the in-progress manifest; refused for anything that is not the job's to publish.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use serde_json::json;

use crate::support::{sha256_hex, wait_for, Harness, S3Server, Store, BIN};

/// Live sync would not touch these files for a minute: only `publish` can have stored them.
fn slow_settle() -> Harness {
    let mut h = Harness::file();
    h.extra_toml = "[sync]\nsettle_ms = 60000\n".into();
    h
}

#[test]
fn publish_returns_after_the_blob_is_stored_and_listed() {
    let h = slow_settle();
    let blob = h.object_path(&format!("blobs/sha256/{}", sha256_hex(b"weights\n")));
    let manifest = h.object_path("jobs/pub/manifest.json");
    let script = format!(
        "echo weights > $C3_ARTIFACTS_DIR/ckpt.bin && {BIN} publish $C3_ARTIFACTS_DIR/ckpt.bin > published.txt; echo $? > rc; \
         test -f '{}' && echo stored > seen; grep -q ckpt.bin '{}' && echo listed >> seen; sleep 0.2",
        blob.display(),
        manifest.display()
    );
    h.run_job(json!({"job_id": "pub", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("pub");
    assert_eq!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "0");
    assert_eq!(
        std::fs::read_to_string(w.join("seen")).unwrap(),
        "stored\nlisted\n",
        "publish returned before the blob and the manifest entry existed"
    );
    assert!(std::fs::read_to_string(w.join("published.txt"))
        .unwrap()
        .contains("artifacts/ckpt.bin"));
}

#[test]
fn publish_refuses_what_is_not_the_jobs_output() {
    let h = slow_settle();
    let script = format!(
        "echo x > outside.txt; {BIN} publish outside.txt 2> e1; echo $? > r1; \
         ln -s /etc/hostname $C3_ARTIFACTS_DIR/link; {BIN} publish $C3_ARTIFACTS_DIR/link 2> e2; echo $? > r2; \
         mkdir -p $C3_ARTIFACTS_DIR/d; {BIN} publish $C3_ARTIFACTS_DIR/d 2> e3; echo $? > r3; \
         {BIN} publish $C3_ARTIFACTS_DIR/../outside.txt 2> e4; echo $? > r4"
    );
    h.run_job(json!({"job_id": "ref", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("ref");
    for (i, needle) in [
        (1, "outside the job's output dirs"),
        (2, "symlink"),
        (3, "not a regular file"),
        // Named through a real directory: the file outside, refused as such.
        (4, "outside the job's output dirs"),
    ] {
        assert_eq!(
            std::fs::read_to_string(w.join(format!("r{i}")))
                .unwrap()
                .trim(),
            "1",
            "case {i}"
        );
        let err = std::fs::read_to_string(w.join(format!("e{i}"))).unwrap();
        assert!(err.contains(needle), "case {i}: {err}");
        assert_eq!(err.lines().count(), 1, "one clear line: {err}");
    }
}

/// Only the job's own processes may use the socket: another uid, or a process of the same
/// uid that is not the job's, is refused.
#[test]
fn the_socket_refuses_a_stranger() {
    let h = slow_settle();
    let go = h.path("go");
    let script = format!(
        "echo s > $C3_ARTIFACTS_DIR/f; echo $C3_AGENT_SOCKET > sock; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "str", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let sock = wait_for("the socket path", Duration::from_secs(20), || {
        std::fs::read_to_string(h.workdir("str").join("sock"))
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    // This test process runs as the job's uid (the job has no `user`) but is not the job's.
    let mut conn = std::os::unix::net::UnixStream::connect(sock.trim()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // The agent may answer a stranger and hang up before reading: the request's write may
    // then find the pipe closed, and the refusal is still there to read.
    let _ = conn.write_all(b"{\"op\":\"publish\",\"paths\":[\"artifacts/f\"]}\n");
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("refused"),
        "{reply}"
    );
    std::fs::write(&go, "").unwrap();
    h.wait("str".into(), child).assert_code(0);
}

#[test]
fn a_job_as_another_user_refuses_root_on_its_socket() {
    if !nix::unistd::geteuid().is_root() {
        crate::support::skip("needs root (the job runs as another user)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let h = slow_settle();
    std::fs::set_permissions(h.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let go = h.path("go");
    let script = format!(
        "echo s > $C3_ARTIFACTS_DIR/f; echo $C3_AGENT_SOCKET > $C3_ARTIFACTS_DIR/sock; i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        go.display()
    );
    let spec = h.spec(json!({"job_id": "uid", "user": "nobody", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let sock = wait_for("the socket path", Duration::from_secs(20), || {
        std::fs::read_to_string(h.workdir("uid").join("artifacts/sock"))
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    let meta = std::fs::metadata(sock.trim()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let mut conn = std::os::unix::net::UnixStream::connect(sock.trim()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Refused at once, maybe before the request is read: a closed pipe here is no failure.
    let _ = conn.write_all(b"{\"op\":\"wait_all\"}\n");
    let mut reply = String::new();
    BufReader::new(&conn).read_line(&mut reply).unwrap();
    assert!(reply.contains("refused"), "{reply}");
    std::fs::write(&go, "").unwrap();
    h.wait("uid".into(), child).assert_code(0);
}

/// The barrier: files written and closed are stored; one still open for writing is not.
#[test]
fn wait_all_stores_everything_pending_but_what_is_still_open() {
    let h = slow_settle();
    let manifest = h.object_path("jobs/wa/manifest.json");
    let script = format!(
        "for i in 1 2 3; do echo $i > $C3_ARTIFACTS_DIR/f$i; done; exec 3>$C3_ARTIFACTS_DIR/open.log; echo partial >&3; \
         {BIN} publish --wait-all > out; echo $? > rc; cp '{}' listed.json; exec 3>&-",
        manifest.display()
    );
    h.run_job(json!({"job_id": "wa", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("wa");
    assert_eq!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "0");
    let listed: serde_json::Value =
        serde_json::from_slice(&std::fs::read(w.join("listed.json")).unwrap()).unwrap();
    let paths: Vec<&str> = listed["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, vec!["artifacts/f1", "artifacts/f2", "artifacts/f3"]);
    assert_eq!(listed["complete"], false);
    // At the end, everything (the log too, once closed) is in the final manifest.
    assert!(h
        .manifest_paths("wa")
        .contains(&"artifacts/open.log".to_string()));
}

/// A barrier that fails for one file (too large to store) still lists the files it stored:
/// the job retrying it had them in no manifest until its end, lost with the node and taken
/// by `gc`.
#[test]
fn a_failed_wait_all_lists_what_it_stored() {
    failed_wait_all_lists(true);
}

/// The same without live sync, where nothing else writes an in-progress manifest.
#[test]
fn a_failed_wait_all_lists_what_it_stored_without_live_sync() {
    failed_wait_all_lists(false);
}

fn failed_wait_all_lists(live: bool) {
    let mut h = slow_settle();
    h.extra_toml.push_str("[upload]\nmax_file_bytes = 1000\n");
    h.env.push(("C3_AGENT_SYNC_LIVE".into(), live.to_string()));
    let manifest = h.object_path("jobs/wf/manifest.json");
    let script = format!(
        "echo small > $C3_ARTIFACTS_DIR/small; head -c 5000 /dev/zero > $C3_ARTIFACTS_DIR/big; \
         {BIN} publish --wait-all 2> err; echo $? > rc; cp '{}' listed.json; rm $C3_ARTIFACTS_DIR/big",
        manifest.display()
    );
    h.run_job(json!({"job_id": "wf", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("wf");
    assert_eq!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "1");
    assert!(
        std::fs::read_to_string(w.join("err"))
            .unwrap()
            .contains("big"),
        "the failure names the file"
    );
    let listed: serde_json::Value = serde_json::from_slice(
        &std::fs::read(w.join("listed.json")).expect("an in-progress manifest was written"),
    )
    .unwrap();
    assert_eq!(listed["files"][0]["path"], "artifacts/small", "{listed}");
    assert_eq!(listed["complete"], false);
}

/// A file that changes while it is being published is not published (and never torn).
#[test]
fn a_file_changing_while_published_fails_that_publish() {
    let h = slow_settle();
    // The writer says when it writes (a loaded machine may start python3 late), and the file
    // is large enough that reading it takes many of the writer's periods.
    let writer = "import os,sys,time\nf=open(sys.argv[1],'r+b')\nend=time.time()+20\nfirst=True\nwhile time.time()<end and not os.path.exists('stop'):\n    f.seek(0); f.write(os.urandom(4096)); f.flush()\n    if first: open('ready','w').close(); first=False\n    time.sleep(0.001)\n";
    let script = format!(
        "head -c 32000000 /dev/urandom > $C3_ARTIFACTS_DIR/moving.bin; python3 -c \"$W\" $C3_ARTIFACTS_DIR/moving.bin & \
         while [ ! -e ready ]; do sleep 0.05; done; \
         {BIN} publish $C3_ARTIFACTS_DIR/moving.bin 2> err; echo $? > rc; touch stop; wait"
    );
    let mut spec = json!({"job_id": "mv", "command": ["sh", "-c", script]});
    spec["env"] = json!({ "W": writer });
    h.run_job(spec).assert_code(0);
    let w = h.workdir("mv");
    assert_eq!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "1");
    let err = std::fs::read_to_string(w.join("err")).unwrap();
    assert!(err.contains("changed while publishing"), "{err}");
    // The final version is what the manifest lists, and its blob matches it.
    let local = std::fs::read(w.join("artifacts/moving.bin")).unwrap();
    assert_eq!(h.manifest("mv")["files"][0]["sha256"], sha256_hex(&local));
}

/// During a store outage longer than the deadline, publish answers non-zero (and the job
/// goes on; the file is stored later).
#[test]
fn publish_during_a_store_outage_fails_after_the_deadline() {
    let mut s3 = S3Server::start();
    s3.retry_deadline_secs = 2;
    let mut h = Harness::new(Store::File);
    h.extra_toml = format!("[sync]\nsettle_ms = 60000\n{}", s3.store_toml("pre"));
    let down = h.path("down");
    let back = h.path("back");
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/f; touch ready; i=0; while [ ! -e '{0}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; \
         {BIN} publish $C3_ARTIFACTS_DIR/f 2> err; echo $? > rc; touch published; \
         i=0; while [ ! -e '{1}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        down.display(),
        back.display()
    );
    let spec = h.spec(json!({"job_id": "out", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let w = h.workdir("out");
    wait_for("the job", Duration::from_secs(20), || {
        w.join("ready").exists().then_some(())
    });
    s3.stop();
    std::fs::write(&down, "").unwrap();
    wait_for("publish to give up", Duration::from_secs(60), || {
        w.join("published").exists().then_some(())
    });
    s3.restart();
    std::fs::write(&back, "").unwrap();
    h.wait("out".into(), child).assert_code(0);
    assert_eq!(std::fs::read_to_string(w.join("rc")).unwrap().trim(), "1");
    assert!(!std::fs::read_to_string(w.join("err")).unwrap().is_empty());
}

/// A name that is not UTF-8 is refused by the client, not sent lossily: `\xff.pt` went as
/// `\u{FFFD}.pt`, a sibling of that name was stored, and the client said it published.
#[test]
fn publish_refuses_a_name_that_is_not_utf8() {
    let h = slow_settle();
    let script = format!(
        "cd $C3_ARTIFACTS_DIR && echo other > \"$(printf '\\357\\277\\275').pt\" && echo mine > \"$(printf '\\377').pt\" && \
         {BIN} publish \"$(printf '\\377').pt\" > ../out 2> ../err; echo $? > ../rc"
    );
    h.run_job(json!({"job_id": "nonutf", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("nonutf");
    let read = |f: &str| std::fs::read_to_string(w.join(f)).unwrap();
    assert!(
        w.join("artifacts/\u{FFFD}.pt").exists(),
        "the sibling was made"
    );
    assert_eq!(read("rc").trim(), "2", "{}{}", read("out"), read("err"));
    assert!(read("out").is_empty(), "{}", read("out"));
    let err = read("err");
    assert!(
        err.contains("not UTF-8") && err.contains("--wait-all"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one clear line: {err}");
}

/// The stdlib-only Python client speaks the same protocol.
#[test]
fn the_python_example_publishes() {
    let h = slow_settle();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/publish.py");
    let blob = h.object_path(&format!("blobs/sha256/{}", sha256_hex(b"py\n")));
    let script = format!(
        "echo py > $C3_ARTIFACTS_DIR/p.txt && python3 {example} $C3_ARTIFACTS_DIR/p.txt --wait-all > out && test -f '{}' && echo ok > seen",
        blob.display()
    );
    h.run_job(json!({"job_id": "py", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("py");
    assert!(std::fs::read_to_string(w.join("out"))
        .unwrap()
        .contains("published artifacts/p.txt"));
    assert_eq!(std::fs::read_to_string(w.join("seen")).unwrap(), "ok\n");
}

/// `publish ../best.pt` from a directory below `artifacts/` names the file as the shell
/// does (the agent takes no `..`: it was refused); a `..` after a symlink is still refused.
#[test]
fn a_parent_path_through_real_directories_is_published() {
    let h = slow_settle();
    let script = format!(
        "mkdir -p $C3_ARTIFACTS_DIR/run1 && echo w > $C3_ARTIFACTS_DIR/best.pt && ln -s run1 $C3_ARTIFACTS_DIR/link && \
         (cd $C3_ARTIFACTS_DIR/run1 && {BIN} publish ../best.pt > ../../out 2> ../../e1; echo $? > ../../r1); \
         {BIN} publish $C3_ARTIFACTS_DIR/link/../best.pt 2> e2; echo $? > r2"
    );
    h.run_job(json!({"job_id": "up", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("up");
    let read = |f: &str| std::fs::read_to_string(w.join(f)).unwrap();
    assert_eq!(read("r1").trim(), "0", "{}", read("e1"));
    assert!(read("out").contains("artifacts/best.pt"), "{}", read("out"));
    assert_ne!(read("r2").trim(), "0");
    assert!(read("e2").contains(".."), "{}", read("e2"));
}

/// One request costs the root agent a bounded amount of work: the same path named 5,000
/// times is one file published, and more than 1,000 distinct paths are refused in one line
/// (the client sends them in batches that fit).
#[test]
fn one_publish_request_is_bounded() {
    let h = slow_settle();
    let script = format!(
        "echo a > $C3_ARTIFACTS_DIR/a; {BIN} publish $(for i in $(seq 5000); do echo $C3_ARTIFACTS_DIR/a; done) > dup.txt; echo $? > r1; \
         for i in $(seq 1001); do : > $C3_ARTIFACTS_DIR/f$i; done; {BIN} publish $C3_ARTIFACTS_DIR/f* > many.txt 2> e3; echo $? > r3; \
         python3 -c \"$RAW\" > e2"
    );
    // The agent's own bound, in one raw request (the client sends batches within it).
    let raw = "import json, os, socket\ns = socket.socket(socket.AF_UNIX)\ns.connect(os.environ['C3_AGENT_SOCKET'])\nd = os.environ['C3_ARTIFACTS_DIR']\ns.sendall((json.dumps({'op': 'publish', 'paths': ['%s/f%d' % (d, i) for i in range(1, 1002)]}) + '\\n').encode())\nprint(s.makefile().readline())\n";
    let mut spec = json!({"job_id": "many", "command": ["sh", "-c", script]});
    spec["env"] = json!({ "RAW": raw });
    h.run_job(spec).assert_code(0);
    let w = h.workdir("many");
    let read = |f: &str| std::fs::read_to_string(w.join(f)).unwrap();
    assert_eq!(read("r1").trim(), "0", "{}", read("dup.txt"));
    assert_eq!(
        read("dup.txt").matches("artifacts/a").count(),
        1,
        "{}",
        read("dup.txt")
    );
    assert!(read("e2").contains("at most 1000 paths"), "{}", read("e2"));
    assert_eq!(read("r3").trim(), "0", "{}", read("e3"));
    assert_eq!(read("many.txt").matches("published").count(), 1001);
}

/// One file in many spellings (`artifacts/big`, `artifacts/./big`, ...) is one file, read
/// once; a version already stored is answered from the book, not read again (its stamp not
/// racy: the file was last written over a second before it was read). Each spelling
/// was read and hashed in full, every time: a 1,000-spelling request cost a checkpoint's
/// size a thousand times over, as root.
#[test]
fn a_file_named_many_ways_or_already_stored_is_not_read_again() {
    let h = slow_settle();
    let script = format!(
        "head -c 16000000 /dev/urandom > $C3_ARTIFACTS_DIR/big; sleep 1.5; \
         names=$(i=0; d=; while [ $i -lt 100 ]; do echo artifacts/$d''big; d=$d./; i=$((i+1)); done); \
         io() {{ sed -n 's/^rchar: //p' /proc/$PPID/io; }}; cat /proc/$PPID/comm > comm; \
         a=$(io); {BIN} publish $names > one.txt; b=$(io); {BIN} publish $names > two.txt; c=$(io); \
         echo $((b - a)) $((c - b)) > reads"
    );
    h.run_job(json!({"job_id": "spell", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("spell");
    let read = |f: &str| std::fs::read_to_string(w.join(f)).unwrap();
    assert!(read("comm").starts_with("c3-agent"), "{}", read("comm"));
    for reply in [read("one.txt"), read("two.txt")] {
        assert_eq!(reply.matches("artifacts/big").count(), 1, "{reply}");
    }
    let reads: Vec<u64> = read("reads")
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        reads[0] < 64_000_000,
        "the first publish read {} bytes",
        reads[0]
    );
    assert!(
        reads[1] < 4_000_000,
        "the second publish read {} bytes",
        reads[1]
    );
}

/// Jobs under a jobs_root reached through a symlink (`/scratch -> /mnt/scratch`): the job's
/// cwd is the physical path, so `publish` of a relative name sent that spelling, which the
/// agent took for a path outside the workdir.
#[test]
fn a_relative_publish_works_below_a_symlinked_jobs_root() {
    let mut h = slow_settle();
    let real = h.path("real-scratch");
    std::fs::create_dir_all(real.join("jobs")).unwrap();
    let link = h.path("scratch");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (link, real) = (link.join("jobs"), real.join("jobs"));
    h.extra_toml = format!("jobs_root = \"{}\"\n{}", link.display(), h.extra_toml);
    let script = format!(
        "cd artifacts && echo weights > ckpt.bin && {BIN} publish ckpt.bin > ../published.txt 2>&1; echo $? > ../rc"
    );
    h.run_job(
        json!({"job_id": "linked", "workdir": link.join("linked").display().to_string(),
        "command": ["sh", "-c", script]}),
    )
    .assert_code(0);
    let w = real.join("linked");
    let read = |f: &str| std::fs::read_to_string(w.join(f)).unwrap();
    assert_eq!(read("rc").trim(), "0", "{}", read("published.txt"));
    assert!(read("published.txt").contains("artifacts/ckpt.bin"));
}

/// A job's requests get at most about half the collector's time: after each, the next waits
/// as long as it took. Each request here is made to take a second (fault point
/// `slow-request`); four in a row took 4 s, and a job whose requests were costly (a `touch`
/// before each `publish` rewrites both manifests) kept the root agent at it without a pause.
/// Only a lower bound on the time is asserted: a slow machine makes it longer, not shorter.
#[test]
fn a_jobs_requests_rest_as_long_as_each_took() {
    requests_rest(true);
}

/// The same without live sync (`sync.live = false`), where requests were served back to back.
#[test]
fn a_jobs_requests_rest_without_live_sync_too() {
    requests_rest(false);
}

fn requests_rest(live: bool) {
    let mut h = slow_settle();
    h.env.push(("C3_AGENT_FAULT".into(), "slow-request".into()));
    h.env.push(("C3_AGENT_SYNC_LIVE".into(), live.to_string()));
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/x; a=$(date +%s%N); \
         for i in 1 2 3 4; do {BIN} publish --wait-all > /dev/null || echo failed >> failed; done; \
         echo $(( ($(date +%s%N) - a) / 1000000 )) > took_ms"
    );
    h.run_job(json!({"job_id": "paced", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("paced");
    assert!(!w.join("failed").exists(), "every wait_all answered ok");
    let took: u64 = std::fs::read_to_string(w.join("took_ms"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        took >= 6_500,
        "4 requests of 1 s each took {took} ms: no rest between them"
    );
}

/// Every socket request is logged, and a job may send as many as it likes with paths as long
/// as a request line allows: the agent's log keeps a clipped, rate-limited account of them
/// (it once wrote each request's first three paths whole: 500 MB in 20 s).
#[test]
fn socket_requests_cannot_flood_the_agents_log() {
    let h = slow_settle();
    let script = format!(
        "p=$C3_ARTIFACTS_DIR/$(head -c 100000 /dev/zero | tr '\\0' a); i=0; \
         while [ $i -lt 200 ]; do {BIN} publish $p $p.1 $p.2 2>/dev/null; i=$((i+1)); done"
    );
    let run = h.run_job(json!({"job_id": "flood", "command": ["sh", "-c", script]}));
    // Before anything that prints the whole log.
    assert!(
        run.stderr.len() < 2 << 20,
        "{} bytes of agent log for 200 requests",
        run.stderr.len()
    );
    run.assert_code(0);
    assert!(
        run.stderr.contains("job asks to publish"),
        "requests are still logged"
    );
}

/// The root agent parses every request line on its own threads, outside the job's cgroup:
/// a job sending 1 MiB lines as fast as it can is held to a pace (4 MiB a second over its
/// connections, after a second's burst), and a line that is not a request ends its
/// connection (a reply per `x\n` was as fast as the agent could write them).
#[test]
fn the_socket_parses_a_jobs_lines_at_a_bounded_pace() {
    let h = slow_settle();
    // 24 lines of 1 MiB (an empty publish and its padding): at least 5 s.
    let py = r#"import json, os, socket, time
s = socket.socket(socket.AF_UNIX)
s.connect(os.environ['C3_AGENT_SOCKET'])
f = s.makefile('rb')
line = (json.dumps({'op': 'publish', 'paths': []}) + ' ' * ((1 << 20) - 40) + '\n').encode()
began = time.monotonic()
for i in range(24):
    s.sendall(line)
    assert f.readline(), i
open('took', 'w').write('%f' % (time.monotonic() - began))
s.sendall(b'x\n')
first = f.readline()
try:
    s.sendall(b'y\n')
    second = f.readline()
except OSError:
    second = b''
open('bad', 'w').write(repr((first, second)))
"#;
    std::fs::write(h.path("pace.py"), py).unwrap();
    let script = format!("python3 {}", h.path("pace.py").display());
    h.run_job(json!({"job_id": "pace", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("pace");
    let took: f64 = std::fs::read_to_string(w.join("took"))
        .unwrap()
        .parse()
        .unwrap();
    assert!(took >= 4.5, "24 MiB of request lines parsed in {took:.2} s");
    let bad = std::fs::read_to_string(w.join("bad")).unwrap();
    assert!(
        bad.contains("not a request") && bad.ends_with(", b'')"),
        "{bad}"
    );
}

/// A `wait_all` with nothing new to store writes no manifest: a job calling it in a loop
/// cannot make the agent rewrite manifests faster than `manifest_interval_ms`. The job
/// removes the manifest before each call and counts how often it came back.
#[test]
fn wait_all_with_nothing_new_writes_no_manifest() {
    let h = slow_settle();
    let manifest = h.object_path("jobs/idle/manifest.json");
    let script = format!(
        "echo x > $C3_ARTIFACTS_DIR/x; n=0; i=0; while [ $i -lt 100 ]; do rm -f '{m}'; \
         {BIN} publish --wait-all > /dev/null || echo failed >> failed; \
         [ -e '{m}' ] && n=$((n+1)); i=$((i+1)); done; echo $n > written",
        m = manifest.display()
    );
    h.run_job(json!({"job_id": "idle", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let w = h.workdir("idle");
    assert!(!w.join("failed").exists(), "every wait_all answered ok");
    let written: u32 = std::fs::read_to_string(w.join("written"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        written <= 2,
        "100 wait_all calls with nothing new wrote the manifest {written} times"
    );
    assert!(h
        .manifest_paths("idle")
        .contains(&"artifacts/x".to_string()));
}

/// A file the job maps and stores to, then publishes, then stores to again through the same
/// dirty page (its stamp unmoved): the complete manifest lists what it ended with. The
/// publish was taken as current, the final scan skipped the file, and the manifest listed
/// the bytes it held at the publish.
#[test]
fn a_mapped_file_published_and_stored_to_again_is_listed_as_it_ends() {
    let h = slow_settle();
    let py = mapped_store_job(
        "",
        &format!("r = subprocess.run(['{BIN}', 'publish', p])"),
        "sys.exit(r.returncode)",
    );
    h.run_job(json!({"job_id": "mappub", "command": ["python3", "-c", py]}))
        .assert_code(0);
    crate::support::assert_listed_as_it_ends(&h, "mappub");
}

/// A job that writes `res` (4096 bytes of `a`), maps it and stores `b` through the map, runs
/// `while_mapped` (Python at the top level; `before` runs once `res` is written), stores `c`
/// through the same dirty page, unmaps and closes it, then runs `after`.
fn mapped_store_job(before: &str, while_mapped: &str, after: &str) -> String {
    format!(
        r#"
import mmap, os, subprocess, sys, time
p = os.path.join(os.environ['C3_ARTIFACTS_DIR'], 'res')
with open(p, 'wb') as f:
    f.write(b'a' * 4096)
{before}
f = open(p, 'r+b')
m = mmap.mmap(f.fileno(), 4096)
m[0:1] = b'b'
time.sleep(1.2)
{while_mapped}
m[1:2] = b'c'
m.close()
f.close()
{after}
"#
    )
}

/// A workdir on tmpfs, where a store through a shared mapping moves no file time: a file of
/// two links, stored (wait_all) while not mapped, then mapped, stored to and unmapped before
/// the job exits, is listed under both names with the bytes it ends with. Its stamp was as
/// the book had it: the final sync skipped it, and (had it read it) live sync's read of the
/// inode, kept for its other link, would have answered.
#[test]
fn a_file_on_tmpfs_stored_to_through_a_mapping_is_listed_as_it_ends() {
    let h = slow_settle();
    let point = h.path("shm");
    let Some(_mounted) = crate::support::Tmpfs::mount(&point, Some("mode=0755")) else {
        return;
    };
    let py = format!(
        r#"
import mmap, os, subprocess, sys, time
d = os.environ['C3_ARTIFACTS_DIR']
p = os.path.join(d, 'ckpt')
with open(p, 'wb') as f:
    f.write(b'a' * 4096)
os.link(p, os.path.join(d, 'latest'))
time.sleep(0.3)  # past the racy window: the read settles the version
r = subprocess.run(['{BIN}', 'publish', '--wait-all'])
f = open(p, 'r+b')
m = mmap.mmap(f.fileno(), 4096)
first = m[0]  # a read first (as `a[i] += 1`): the page is mapped writable, no later fault
m[0:2] = b'bc'
m.close()
f.close()
sys.exit(r.returncode)
"#
    );
    let workdir = point.join("w");
    h.run_job(
        json!({"job_id": "shmmap", "workdir": workdir.display().to_string(),
        "command": ["python3", "-c", py]}),
    )
    .assert_code(0);
    let mut now = b"bc".to_vec();
    now.resize(4096, b'a');
    let manifest = h.manifest("shmmap");
    let listed: Vec<(&str, &str)> = manifest["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["sha256"].as_str().unwrap()))
        .collect();
    let want = crate::support::sha256_hex(&now);
    assert_eq!(
        listed,
        [
            ("artifacts/ckpt", want.as_str()),
            ("artifacts/latest", want.as_str())
        ],
        "the manifest lists bytes the file no longer holds"
    );
}

/// As above, published twice while mapped: two reads of a held file that found the same
/// bytes settled it, and the store after the second publish was not listed.
#[test]
fn a_mapped_file_published_twice_and_stored_to_again_is_listed_as_it_ends() {
    let h = slow_settle();
    let py = mapped_store_job(
        "",
        &format!(
            "r1 = subprocess.run(['{BIN}', 'publish', p])\ntime.sleep(1.2)\nr2 = subprocess.run(['{BIN}', 'publish', p])"
        ),
        "sys.exit(r1.returncode or r2.returncode)",
    );
    h.run_job(json!({"job_id": "mappub2", "command": ["python3", "-c", py]}))
        .assert_code(0);
    crate::support::assert_listed_as_it_ends(&h, "mappub2");
}

/// A mapped file of two links, published, stored to again through the dirty page, then
/// unmapped and published again: the read made while it was mapped was kept for the
/// inode's links, and the second publish (the file no longer held) took it as settled.
#[test]
fn a_mapped_file_of_two_links_published_again_once_unmapped_is_listed_as_it_ends() {
    let h = slow_settle();
    let py = mapped_store_job(
        "os.link(p, p + '2')",
        &format!("r1 = subprocess.run(['{BIN}', 'publish', p])"),
        &format!("r2 = subprocess.run(['{BIN}', 'publish', p])\nsys.exit(r1.returncode or r2.returncode)"),
    );
    h.run_job(json!({"job_id": "maplinks", "command": ["python3", "-c", py]}))
        .assert_code(0);
    let mut last = b"bc".to_vec();
    last.resize(4096, b'a');
    let files = h.manifest("maplinks")["files"].clone();
    for f in files.as_array().unwrap() {
        assert_eq!(
            f["sha256"],
            crate::support::sha256_hex(&last),
            "{} lists bytes the file no longer holds",
            f["path"]
        );
    }
    assert_eq!(files.as_array().unwrap().len(), 2, "{files}");
}

/// `wait_all` looks at the job's writers, then reads: a file the job maps and stores to in
/// between (held there 2 s by the fault point), then stores to again after the read, is read
/// only in the version the look saw (here none: it changed), and listed as it ends. The read
/// took the version after the first store, as current, and the manifest listed it.
#[test]
fn a_file_mapped_between_wait_alls_look_and_its_read_is_listed_as_it_ends() {
    let mut h = slow_settle();
    h.env
        .push(("C3_AGENT_FAULT".into(), "wait-all-before-reads".into()));
    let py = format!(
        r#"
import mmap, os, subprocess, time
p = os.path.join(os.environ['C3_ARTIFACTS_DIR'], 'res')
with open(p, 'wb') as f:
    f.write(b'a' * 4096)
time.sleep(1.2)
w = subprocess.Popen(['{BIN}', 'publish', '--wait-all'])
time.sleep(0.8)
f = open(p, 'r+b')
m = mmap.mmap(f.fileno(), 4096)
m[0:1] = b'b'
w.wait()
m[1:2] = b'c'
m.close()
f.close()
"#
    );
    h.run_job(json!({"job_id": "mapwait", "command": ["python3", "-c", py]}))
        .assert_code(0);
    crate::support::assert_listed_as_it_ends(&h, "mapwait");
}
