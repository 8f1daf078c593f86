//! One conformance suite run against every store: the file store, a real S3 server (s3s-fs)
//! and the Azure Storage emulator (Azurite).

use serde_json::json;

use crate::support::{sha256_hex, Harness, S3Server, Store};

/// Names a filesystem allows and URLs and JSON must not mangle.
const ODD_NAMES: &[&str] = &[
    "a b.txt",
    "100%.txt",
    "a&b#c?.txt",
    "ünïcödé ✓.txt",
    "new\nline.txt",
    "tab\there",
    "+plus=eq;semi",
    "sub dir/x y",
];

fn write_odd_names_script() -> String {
    let mut py = String::from("import os\nd=os.environ['C3_ARTIFACTS_DIR']\n");
    for (i, name) in ODD_NAMES.iter().enumerate() {
        py.push_str(&format!(
            "p=os.path.join(d,{name:?})\nos.makedirs(os.path.dirname(p),exist_ok=True)\nopen(p,'wb').write(b'content {i} '*{n})\n",
            n = 1 + i * 100
        ));
    }
    py.push_str("os.makedirs('results',exist_ok=True)\nopen('results/r.csv','w').write('a,b\\n')\nopen('not-collected.txt','w').write('x')\n");
    py
}

fn round_trip(h: Harness) {
    let run = h.run_job(json!({"job_id": "odd", "command": ["python3", "-c", write_odd_names_script()], "output": ["results"]}));
    run.assert_code(0);
    let mut expected: Vec<String> = ODD_NAMES.iter().map(|n| format!("artifacts/{n}")).collect();
    expected.push("results/r.csv".into());
    expected.sort();
    assert_eq!(h.manifest_paths("odd"), expected);
    let m = h.manifest("odd");
    for f in m["files"].as_array().unwrap() {
        let blob = h
            .object(&format!("blobs/sha256/{}", f["sha256"].as_str().unwrap()))
            .expect("blob exists");
        assert_eq!(
            sha256_hex(&blob),
            f["sha256"].as_str().unwrap(),
            "blob bytes match their key"
        );
        assert_eq!(blob.len() as u64, f["size"].as_u64().unwrap());
        assert_eq!(f["blake3"].as_str().unwrap().len(), 64);
    }
    assert_eq!(m["attempt"], 1);
    let per_attempt = h
        .object("jobs/odd/attempts/1/manifest.json")
        .expect("per-attempt manifest");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&per_attempt).unwrap(),
        m
    );
    let stdout_sha = m["logs"]["stdout"]["sha256"].as_str().unwrap();
    assert!(
        h.object(&format!("blobs/sha256/{stdout_sha}")).is_some(),
        "log blobs are stored"
    );

    let dest = h.path("pulled");
    h.run(&["pull", "odd", dest.to_str().unwrap()])
        .assert_code(0);
    for name in ODD_NAMES {
        let original = std::fs::read(h.workdir("odd").join("artifacts").join(name)).unwrap();
        let pulled = std::fs::read(dest.join("artifacts").join(name))
            .unwrap_or_else(|e| panic!("{name:?}: {e}"));
        assert_eq!(original, pulled, "{name:?}");
    }
    assert!(!dest.join("not-collected.txt").exists());
    let ls = h.run(&["ls", "odd"]);
    ls.assert_code(0);
    assert_eq!(
        ls.stdout.lines().count(),
        expected.len(),
        "one line per file, even with a newline in a name"
    );
}

#[test]
fn file_store_round_trips_odd_names() {
    round_trip(Harness::file());
}

#[test]
fn s3_round_trips_odd_names() {
    round_trip(Harness::new(Store::s3()));
}

fn dedup(h: Harness) {
    let h = h.with_control_plane(5);
    let script = "head -c 100000 /dev/zero > $C3_ARTIFACTS_DIR/zeros; echo same";
    h.run_job(json!({"job_id": "d1", "command": ["sh", "-c", script]}))
        .assert_code(0);
    h.run_job(json!({"job_id": "d2", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let regs = h.cp().delivered("/artifacts");
    assert_eq!(regs.len(), 2, "{regs:?}");
    assert!(
        regs[0]["new_bytes"].as_u64().unwrap() >= 100_000,
        "{}",
        regs[0]
    );
    assert_eq!(
        regs[1]["new_bytes"], 0,
        "the second job added nothing new: {}",
        regs[1]
    );
    assert_eq!(regs[1]["bytes"], 100_000);
    assert_eq!(regs[1]["files"], 1);
}

#[test]
fn file_store_dedup_counts_no_new_bytes() {
    dedup(Harness::file());
}

#[test]
fn s3_dedup_counts_no_new_bytes() {
    dedup(Harness::new(Store::s3()));
}

fn symlinks_not_followed(h: Harness) {
    let secret = h.path("outside-secret");
    std::fs::write(&secret, "do not upload").unwrap();
    let script = format!(
        "cd $C3_ARTIFACTS_DIR && ln -s '{}' link && ln -s / rootlink && mkfifo pipe && echo ok > real",
        secret.display()
    );
    h.run_job(json!({"job_id": "ln", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(h.manifest_paths("ln"), vec!["artifacts/real"]);
    assert!(h
        .object(&format!("blobs/sha256/{}", sha256_hex(b"do not upload")))
        .is_none());
    let warnings = h.terminal("ln")["warnings"].to_string();
    assert!(
        warnings.contains("artifacts/link") && warnings.contains("artifacts/pipe"),
        "{warnings}"
    );
}

#[test]
fn file_store_skips_symlinks_and_fifos() {
    symlinks_not_followed(Harness::file());
}

#[test]
fn s3_skips_symlinks_and_fifos() {
    symlinks_not_followed(Harness::new(Store::s3()));
}

fn corruption_detected(h: Harness) {
    h.run_job(
        json!({"job_id": "c", "command": ["sh", "-c", "echo precious > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    let sha = sha256_hex(b"precious\n");
    h.tamper(&format!("blobs/sha256/{sha}"), b"tampered\n");
    let dest = h.path("pulled");
    let run = h.run(&["pull", "c", dest.to_str().unwrap()]);
    run.assert_code(1);
    assert!(
        run.stderr.contains("does not match") && run.stderr.contains("artifacts/f"),
        "{}",
        run.stderr
    );
    assert!(
        !dest.join("artifacts/f").exists(),
        "a corrupt file is never left in place"
    );
}

#[test]
fn file_store_pull_detects_corruption() {
    corruption_detected(Harness::file());
}

#[test]
fn s3_pull_detects_corruption() {
    corruption_detected(Harness::new(Store::s3()));
}

fn large_file(mut h: Harness) {
    h.extra_toml =
        "[upload]\nmultipart_threshold_bytes = 1000000\nmin_part_size_bytes = 5242880\n".into();
    let script = "head -c 12000000 /dev/urandom > $C3_ARTIFACTS_DIR/big.bin";
    h.run_job(json!({"job_id": "big", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let local = std::fs::read(h.workdir("big").join("artifacts/big.bin")).unwrap();
    let m = h.manifest("big");
    assert_eq!(m["files"][0]["sha256"], sha256_hex(&local));
    assert_eq!(
        h.object(&format!("blobs/sha256/{}", sha256_hex(&local)))
            .unwrap(),
        local
    );
}

#[test]
fn file_store_large_file_is_staged_and_linked() {
    large_file(Harness::file());
}

#[test]
fn s3_large_file_goes_multipart() {
    large_file(Harness::new(Store::s3()));
}

#[test]
fn az_round_trips_odd_names() {
    round_trip(Harness::new(Store::azure()));
}

#[test]
fn az_dedup_counts_no_new_bytes() {
    dedup(Harness::new(Store::azure()));
}

#[test]
fn az_skips_symlinks_and_fifos() {
    symlinks_not_followed(Harness::new(Store::azure()));
}

#[test]
fn az_pull_detects_corruption() {
    corruption_detected(Harness::new(Store::azure()));
}

#[test]
fn az_large_file_goes_multipart() {
    large_file(Harness::new(Store::azure()));
}

/// A dataset whose blob the store says it does not hold (gc took it, an operator deleted it)
/// fails at once, not retryable: the store's own "no such key" is not taken for a proxy's
/// bare 404, which is retried as a blip.
fn a_dataset_missing_a_blob_fails_for_good(h: Harness) {
    h.run_job(json!({"job_id": "producer", "command": ["sh", "-c", "echo weights > $C3_ARTIFACTS_DIR/model.bin"]}))
        .assert_code(0);
    h.delete_object(&format!("blobs/sha256/{}", sha256_hex(b"weights\n")));
    let marker = h.path("launched");
    let run = h.run_job(json!({"job_id": "consumer", "command": ["touch", marker.display().to_string()], "datasets": [{"ref": "/jobs/producer", "mount": "in"}]}));
    run.assert_code(6);
    assert!(!marker.exists());
    let t = h.terminal("consumer");
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    assert_eq!(t["retryable"], false, "{t}");
}

#[test]
fn s3_dataset_missing_a_blob_fails_for_good() {
    a_dataset_missing_a_blob_fails_for_good(Harness::new(Store::s3()));
}

#[test]
fn az_dataset_missing_a_blob_fails_for_good() {
    a_dataset_missing_a_blob_fails_for_good(Harness::new(Store::azure()));
}

#[test]
fn datasets_are_materialized_as_private_copies() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "producer", "command": ["sh", "-c", "mkdir -p $C3_ARTIFACTS_DIR/w && echo weights > $C3_ARTIFACTS_DIR/w/model.bin"]}))
        .assert_code(0);
    let consumer = "cat inputs/prev/artifacts/w/model.bin > $C3_ARTIFACTS_DIR/seen && echo scribble >> inputs/prev/artifacts/w/model.bin";
    h.run_job(json!({"job_id": "consumer", "command": ["sh", "-c", consumer], "datasets": [{"ref": "/jobs/producer", "mount": "inputs/prev"}]}))
        .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(h.workdir("consumer").join("artifacts/seen")).unwrap(),
        "weights\n"
    );
    assert_eq!(
        h.object(&format!("blobs/sha256/{}", sha256_hex(b"weights\n")))
            .unwrap(),
        b"weights\n"
    );

    let marker = h.path("launched");
    let run = h.run_job(json!({"job_id": "orphan", "command": ["touch", marker.display().to_string()], "datasets": [{"ref": "/jobs/never-ran", "mount": "in"}]}));
    run.assert_code(6);
    assert!(!marker.exists());
    let t = h.terminal("orphan");
    assert_eq!(t["reason"], "DATASET_ERROR");
    // No such job: no retry can help.
    assert_eq!(t["retryable"], false, "{t}");
}

/// A stop while a dataset is being pulled (here with the writers' temp files named, as on
/// NFS) is the job's cancel, not a dataset failure: told to the pull as it came, the pull's
/// own waits heard it first and the canceled job was reported DATASET_ERROR, retryable, to be
/// run again. The writers are waited for: no temp file stays in the mount.
#[test]
fn a_stop_during_a_dataset_pull_is_a_cancel_and_leaves_no_temp_files() {
    let mut h = Harness::file();
    h.run_job(
        json!({"job_id": "big", "command": ["sh", "-c", "echo weights > $C3_ARTIFACTS_DIR/w"]}),
    )
    .assert_code(0);
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "no-o-tmpfile:.c3-pull-+pull-writer-pauses:artifacts/w".into(),
    ));
    let spec = h.spec(json!({"job_id": "chained", "command": ["true"], "datasets": [{"ref": "/jobs/big", "mount": "in"}]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let mount = h.workdir("chained").join("in/artifacts");
    let temps = || {
        std::fs::read_dir(&mount)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".c3-pull-"))
                    .count()
            })
            .unwrap_or(0)
    };
    crate::support::wait_for(
        "the dataset writer's temp file",
        std::time::Duration::from_secs(30),
        || (temps() > 0).then_some(()),
    );
    crate::support::signal(agent.id(), "TERM");
    let run = h.wait("stopped run".into(), agent);
    run.assert_code(4);
    let t = h.terminal("chained");
    assert_eq!(t["state"], "CANCELED", "{t}\n{}", run.stderr);
    assert_eq!(temps(), 0, "a temp file stayed in the mount");
}

/// The agent holds the store's keys for every tenant: a dataset of another project's job is
/// refused before launch, for good; one of the same project is materialized.
#[test]
fn a_dataset_of_another_projects_job_is_refused() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "theirs", "project": "alpha", "command": ["sh", "-c", "echo secret > $C3_ARTIFACTS_DIR/w"]}))
        .assert_code(0);
    let marker = h.path("launched");
    let run = h.run_job(json!({"job_id": "mine", "project": "beta", "command": ["touch", marker.display().to_string()], "datasets": [{"ref": "/jobs/theirs", "mount": "in"}]}));
    run.assert_code(6);
    assert!(!marker.exists(), "launched with another project's dataset");
    assert!(!h.workdir("mine").join("in/artifacts/w").exists());
    let t = h.terminal("mine");
    assert_eq!(t["reason"], "DATASET_ERROR");
    assert_eq!(t["retryable"], false, "{t}");
    assert!(t["message"].as_str().unwrap().contains("project"), "{t}");
    h.run_job(json!({"job_id": "ours", "project": "alpha", "command": ["cat", "in/artifacts/w"], "datasets": [{"ref": "/jobs/theirs", "mount": "in"}]}))
        .assert_code(0);
}

/// A spec that names no project got any project's job as its dataset: the check passed
/// whenever either side named none. A manifest that names no project stays anyone's.
#[test]
fn a_dataset_of_a_projects_job_is_refused_to_a_job_of_no_project() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "theirs", "project": "alpha", "command": ["sh", "-c", "echo secret > $C3_ARTIFACTS_DIR/w"]}))
        .assert_code(0);
    let marker = h.path("launched");
    let run = h.run_job(json!({"job_id": "mine", "command": ["touch", marker.display().to_string()], "datasets": [{"ref": "/jobs/theirs", "mount": "in"}]}));
    run.assert_code(6);
    assert!(!marker.exists(), "launched with another project's dataset");
    assert!(!h.workdir("mine").join("in/artifacts/w").exists());
    let t = h.terminal("mine");
    assert_eq!(t["reason"], "DATASET_ERROR");
    assert_eq!(t["retryable"], false, "{t}");
    assert!(t["message"].as_str().unwrap().contains("no project"), "{t}");
    h.run_job(
        json!({"job_id": "open", "command": ["sh", "-c", "echo shared > $C3_ARTIFACTS_DIR/w"]}),
    )
    .assert_code(0);
    h.run_job(json!({"job_id": "any", "project": "beta", "command": ["cat", "in/artifacts/w"], "datasets": [{"ref": "/jobs/open", "mount": "in"}]}))
        .assert_code(0);
}

#[test]
fn pull_never_writes_through_a_symlink_in_the_destination() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "p", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let dest = h.path("dest");
    let elsewhere = h.path("elsewhere");
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dest.join("artifacts")).unwrap();
    let run = h.run(&["pull", "p", dest.to_str().unwrap()]);
    run.assert_code(1);
    assert!(run.stderr.contains("symlink"), "{}", run.stderr);
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_none(),
        "nothing written through the symlink"
    );
}

/// Contract §8: a store path that is not a directory is permanent: exit 6, nothing launched.
#[test]
fn a_file_store_that_cannot_be_written_fails_before_launch() {
    let h = Harness::file();
    std::fs::create_dir_all(h.state.join("store")).unwrap();
    std::fs::write(h.state.join("store/blobs"), "not a directory").unwrap();
    let marker = h.path("launched");
    let run =
        h.run_job(json!({"job_id": "nostore", "command": ["touch", marker.to_str().unwrap()]}));
    run.assert_code(6);
    assert!(!marker.exists(), "nothing is launched");
    assert_eq!(h.terminal("nostore")["reason"], "AGENT_ERROR");
}

/// A file store other users may write is refused to the root agent, naming `store.url`
/// (exit 2, nothing launched), as `gc` refused it: a job's user could plant a symlink in
/// `staging/` that root wrote through, a forged manifest, or a blob dedup took by its size.
#[test]
fn a_file_store_others_may_write_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        crate::support::skip("needs root (the check is made only for root)");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let mut h = Harness::file();
    let store = h.path("shared-store");
    std::fs::create_dir(&store).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1777)).unwrap();
    h.extra_toml = format!("[store]\nurl = \"file://{}\"\n", store.display());
    let marker = h.path("launched");
    let run =
        h.run_job(json!({"job_id": "shared", "command": ["touch", marker.to_str().unwrap()]}));
    run.assert_code(2);
    assert!(run.stderr.contains("store.url"), "{}", run.stderr);
    assert!(!marker.exists(), "nothing is launched");
    for args in [&["recover"][..], &["gc"]] {
        let run = h.run(args);
        run.assert_code(2);
        assert!(run.stderr.contains("store.url"), "{args:?}: {}", run.stderr);
    }
    // Root's alone again: taken.
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.run_job(json!({"job_id": "mine", "command": ["true"]}))
        .assert_code(0);
    // Only read, a store anyone may write is looked at all the same (an operator's `ls` as
    // root of a user's own store, a non-root agent's under Slurm).
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let listed = h.run(&["ls", "mine"]);
    listed.assert_code(0);
}

fn s3_without_keys(s3: &S3Server, extra_options: &str) -> String {
    format!(
        "[store]\nurl = \"s3://{}/pre\"\nretry_deadline_secs = 3\n[store.options]\naws_endpoint = \"{}\"\naws_allow_http = \"true\"\naws_region = \"us-east-1\"\n{extra_options}",
        s3.bucket,
        s3.endpoint()
    )
}

/// A store option the HTTP client cannot hold is a config error naming it: exit 2, before
/// any job. A century-past `read_timeout` panicked in reqwest at each request, and the job
/// waited out the retry deadline; a frame size outside RFC 9113's range asserted in h2.
#[test]
fn a_store_option_the_http_client_cannot_hold_is_named() {
    let s3 = S3Server::start();
    for (key, value) in [
        ("read_timeout", "18446744073709551615s"),
        ("aws_http2_keep_alive_interval", "18446744073709551615s"),
        ("http2_max_frame_size", "1"),
    ] {
        let mut h = Harness::file();
        h.extra_toml = s3_without_keys(
            &s3,
            &format!(
                "aws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\n{key} = \"{value}\"\n"
            ),
        );
        let marker = h.path("launched");
        let run =
            h.run_job(json!({"job_id": "opt", "command": ["touch", marker.to_str().unwrap()]}));
        run.assert_code(2);
        assert!(
            run.stderr.contains(&format!("store.options.{key}")),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
        assert!(!marker.exists(), "nothing is launched");
    }
}

/// A credential file the agent's environment names is a FIFO (or on a mount that hangs): the
/// start's look at who may read it opened it blocking and waited for a writer for ever, a
/// stop unheard. Looked at off the reactor, bounded, a FIFO never opened for a wait.
#[test]
fn a_credential_file_that_is_a_fifo_does_not_hold_the_start() {
    let mut h = Harness::new(Store::s3());
    let fifo = h.path("token.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    h.env.push((
        "AWS_WEB_IDENTITY_TOKEN_FILE".into(),
        fifo.display().to_string(),
    ));
    let spec = h.spec(json!({"job_id": "fifo", "command": ["true"]}));
    let mut agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let exited = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = agent.kill();
            let _ = agent.wait();
            panic!("the agent's start hung on the FIFO");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(exited.success(), "{exited:?}");
}

/// Keys only in `~/.aws/credentials`, chosen with `AWS_PROFILE`: the standard chain works.
#[test]
fn s3_keys_from_an_aws_profile() {
    let s3 = S3Server::start();
    let mut h = Harness::file();
    h.extra_toml = s3_without_keys(&s3, "");
    std::fs::create_dir_all(h.dir.path().join(".aws")).unwrap();
    std::fs::write(
        h.dir.path().join(".aws/credentials"),
        "[default]\naws_access_key_id = WRONG\naws_secret_access_key = WRONG\n[c3]\naws_access_key_id = AK\naws_secret_access_key = SK\n",
    )
    .unwrap();
    h.env.push(("AWS_PROFILE".into(), "c3".into()));
    h.run_job(json!({"job_id": "prof", "command": ["sh", "-c", "echo hi > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let key = format!("pre/blobs/sha256/{}", sha256_hex(b"hi\n"));
    assert!(s3.root.path().join(&s3.bucket).join(key).exists());
}

/// No keys anywhere and no metadata endpoint answering: one line, exit 6, within seconds.
#[test]
fn s3_without_any_credentials_fails_preflight_at_once() {
    let s3 = S3Server::start();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut h = Harness::file();
    h.extra_toml = s3_without_keys(
        &s3,
        &format!("aws_metadata_endpoint = \"http://127.0.0.1:{closed}\"\n"),
    );
    let marker = h.path("launched");
    let started = std::time::Instant::now();
    let run =
        h.run_job(json!({"job_id": "nokeys", "command": ["touch", marker.to_str().unwrap()]}));
    run.assert_code(6);
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    assert!(!marker.exists(), "nothing is launched");
    assert!(run.stderr.contains("AWS_ACCESS_KEY_ID"), "{}", run.stderr);
}

/// A manifest readers would refuse (over `store.max_manifest_bytes`) is never written: every
/// `gc` after it would refuse to run. The job says why, and fails as an upload error.
#[test]
fn a_manifest_over_the_readers_limit_is_not_written() {
    let mut h = Harness::file();
    h.extra_toml = "[store]\nmax_manifest_bytes = 4096\n".into();
    let script =
        "cd $C3_ARTIFACTS_DIR && for i in $(seq 1 60); do echo $i > file-with-a-long-name-$i; done";
    let run = h.run_job(json!({"job_id": "wide", "command": ["sh", "-c", script]}));
    run.assert_code(3);
    assert!(
        run.stderr.contains("store.max_manifest_bytes"),
        "{}",
        run.stderr
    );
    assert!(h
        .object("jobs/wide/manifest.json")
        .is_none_or(|m| m.len() <= 4096));
    h.run(&["gc"]).assert_code(0);
}

/// A credential in the store's or the control plane's URL (a `user:pass@`, a signature in
/// the query) is never said: not in the log, the summary or an error the job's status carries.
#[test]
fn credentials_in_the_urls_are_never_shown() {
    let mut h = Harness::new(Store::s3()).with_control_plane(10);
    let Store::S3(s3) = &h.store else {
        unreachable!()
    };
    let store_url = format!(
        "s3://AKIDLEAK:STORESECRET@{}/pre?X-Amz-Signature=STORESIG",
        s3.bucket
    );
    let cp = h.control_plane.as_ref().unwrap().url.clone();
    let cp_url = cp.replacen("http://", "http://cpuser:CPSECRET@", 1) + "?code=CPCODE";
    h.env.push(("C3_AGENT_STORE_URL".into(), store_url));
    h.env.push(("C3_AGENT_CONTROL_PLANE_URL".into(), cp_url));
    h.env.push(("C3_AGENT_LOG".into(), "debug".into()));
    let run = h.run_job(
        json!({"job_id": "urls", "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/a"]}),
    );
    run.assert_code(0);
    let said = format!("{}{}", run.stdout, run.stderr);
    for secret in ["STORESECRET", "STORESIG", "CPSECRET", "CPCODE", "AKIDLEAK"] {
        assert!(!said.contains(secret), "{secret} shown: {said}");
    }
    assert!(said.contains("c3-agent starting"), "{said}");
}

/// A file store below an fstab mount point with nothing mounted there (a `nofail` NFS mount
/// that failed at boot) is refused before the launch, retryable (another node has it), and
/// nothing is written below the bare mount point: the job "succeeded" into the local disk,
/// its output hidden once the mount came back.
#[test]
fn a_file_store_below_an_unmounted_fstab_mount_is_refused() {
    let mut h = Harness::file().with_control_plane(5);
    let point = h.path("nfs");
    std::fs::create_dir(&point).unwrap();
    let fstab = h.path("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test\nnfs:/export {} nfs nofail,_netdev 0 0\n",
            point.display()
        ),
    )
    .unwrap();
    let store = point.join("store");
    h.env.push((
        "C3_AGENT_STORE_URL".into(),
        format!("file://{}", store.display()),
    ));
    h.env.push((
        "C3_AGENT_FAULT".into(),
        format!("fstab@{}", fstab.display()),
    ));
    let run = h.run_job(json!({"job_id": "nfs", "command": ["true"]}));
    run.assert_code(6);
    assert!(
        run.stderr.contains("nothing is mounted there"),
        "{}",
        run.stderr
    );
    let t = h.terminal("nfs");
    assert_eq!(t["reason"], "AGENT_ERROR", "{t}");
    assert_eq!(t["retryable"], true, "{t}");
    assert!(!store.exists(), "the store was made on the local disk");
    assert_eq!(std::fs::read_dir(&point).unwrap().count(), 0);
}
