//! Bad input: one line naming the field, exit 2, nothing launched.

use serde_json::json;

use crate::support::Harness;

#[test]
fn bad_specs_are_one_line_naming_the_field() {
    let h = Harness::file();
    let marker = h.path("launched");
    let cmd = json!(["touch", marker.display().to_string()]);
    let cases = [
        (json!({"command": cmd}), "`job_id`"),
        (json!({"job_id": "has space", "command": cmd}), "`job_id`"),
        (json!({"job_id": "j", "command": []}), "`command`"),
        (json!({"job_id": "j", "command": "touch x"}), "`command`"),
        (
            json!({"job_id": "j", "command": cmd, "output": ["../escape"]}),
            "`output[0]`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "output": ["/abs"]}),
            "`output[0]`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "timeout_secs": -1}),
            "`timeout_secs`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "env": {"A": 1}}),
            "`env.A`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "attempt": 0}),
            "`attempt`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "datasets": [{"ref": "job_prev", "mount": "in"}]}),
            "`datasets[0].ref`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "user": "no\u{0}pe"}),
            "`user`",
        ),
        (
            json!({"job_id": "j", "command": cmd, "user": "a:b"}),
            "`user`",
        ),
    ];
    for (spec, field) in cases {
        let path = h.path("bad.json");
        std::fs::write(&path, serde_json::to_vec(&spec).unwrap()).unwrap();
        let run = h.run(&["run", "--job", path.to_str().unwrap()]);
        run.assert_code(2);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line for {spec}: {:?}", run.stderr);
        assert!(lines[0].contains(field), "{field} not named: {}", lines[0]);
    }
    let run = h.run(&["run", "--job", h.path("missing.json").to_str().unwrap()]);
    run.assert_code(2);
    std::fs::write(h.path("bad.json"), "{not json").unwrap();
    h.run(&["run", "--job", h.path("bad.json").to_str().unwrap()])
        .assert_code(2);
    assert!(!marker.exists(), "nothing may be launched on a bad spec");
}

#[test]
fn unknown_spec_fields_are_errors_with_a_suggestion() {
    let h = Harness::file();
    let marker = h.path("launched");
    let run = h.run_job(
        json!({"job_id": "j1", "command": ["touch", marker.to_str().unwrap()], "timeout": 5}),
    );
    run.assert_code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("`timeout`") && run.stderr.contains("timeout_secs"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists(), "nothing is launched for a bad spec");
}

#[test]
fn bad_config_is_one_line_naming_the_key() {
    let mut h = Harness::file();
    h.extra_toml = "log_format = \"xml\"\n[sync]\nsettle_msec = 5\n".into();
    let marker = h.path("launched");
    let run = h.run(&["run", "--", "touch", marker.to_str().unwrap()]);
    run.assert_code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("settle_msec") && run.stderr.contains("config.toml"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists());

    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_STORE_URL".into(), "ftp://nowhere".into()));
    let run = h.run(&["run", "--", "touch", marker.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("store") && run.stderr.contains("ftp"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists());
}

/// An argument or variable the kernel refuses at execve (E2BIG, 128 KiB) is a bad spec, exit
/// 2 naming it, before anything runs: it was a FAILED script (exit 126) after the store check
/// and the datasets.
#[test]
fn an_argument_past_the_kernels_limit_is_a_bad_spec() {
    let h = Harness::file();
    let big = "a".repeat(131_072);
    for (spec, field) in [
        (
            json!({"job_id": "j", "command": ["echo", big]}),
            "`command[1]`",
        ),
        (
            json!({"job_id": "j", "command": ["true"], "env": {"BLOB": big}}),
            "`env.BLOB`",
        ),
    ] {
        let run = h.run_job(spec);
        run.assert_code(2);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(run.stderr.contains(field), "{field}: {}", run.stderr);
    }
}

/// A variable whose value is not UTF-8 is exit 2 naming it: read as unset,
/// `$C3_AGENT_STORE_URL` silently meant the node-local file store.
#[test]
fn a_variable_that_is_not_utf8_is_named() {
    use std::os::unix::ffi::OsStrExt;
    let h = Harness::file();
    let marker = h.path("launched");
    let out = h
        .command(&["run", "--", "touch", marker.to_str().unwrap()])
        .env(
            "C3_AGENT_STORE_URL",
            std::ffi::OsStr::from_bytes(b"s3://bucket/\xe9"),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("$C3_AGENT_STORE_URL") && stderr.contains("store.url"),
        "{stderr}"
    );
    assert!(!marker.exists());
}

/// A state dir another user could write (made 0777 before the agent, or owned by another
/// user) is refused at start, exit 2 naming `state_dir`, nothing launched: its writers could
/// read and rewrite the agent's records and store. It was taken over (chmod 0711) as it was.
#[test]
fn a_state_dir_others_may_write_or_own_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let h = Harness::file();
    let marker = h.path("launched");
    std::fs::create_dir(&h.state).unwrap();
    std::fs::set_permissions(&h.state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = h.run(&["run", "--", "touch", marker.to_str().unwrap()]);
    run.assert_code(2);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("`state_dir`") && run.stderr.contains("chmod 0711"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists());
    if nix::unistd::geteuid().is_root() {
        std::fs::set_permissions(&h.state, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::os::unix::fs::chown(&h.state, Some(4242), Some(4242)).unwrap();
        let run = h.run(&["run", "--", "touch", marker.to_str().unwrap()]);
        run.assert_code(2);
        assert!(
            run.stderr.contains("`state_dir`") && run.stderr.contains("uid 4242"),
            "{}",
            run.stderr
        );
        assert!(!marker.exists());
        // An operator's look as root at another user's state dir (that user's agent under
        // Slurm) reads only: not refused.
        let look = h.run(&["status"]);
        assert!(!look.stderr.contains("`state_dir`"), "{}", look.stderr);
        std::os::unix::fs::chown(&h.state, Some(0), Some(0)).unwrap();
    }
    std::fs::set_permissions(&h.state, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.run(&["run", "--", "touch", marker.to_str().unwrap()])
        .assert_code(0);
    assert!(marker.exists());
}

/// A store URL the store cannot take (a scheme it has not, a host on a file URL, a pattern
/// object_store does not know) is an exit 2 naming it, without its password: the line goes
/// to the journal.
#[test]
fn a_store_url_refused_is_named_without_its_password() {
    for url in [
        "https://minio:S3CRETPW@minio:9000/bucket",
        "file://u:S3CRETPW@host/x",
        "az://c:S3CRETPW@not.azure.example/x",
    ] {
        let mut h = Harness::file();
        h.env.push(("C3_AGENT_STORE_URL".into(), url.into()));
        for args in [&["ls", "j"][..], &["run", "--", "true"][..]] {
            let run = h.run(args);
            run.assert_code(2);
            assert!(run.stderr.contains("store"), "{url}: {}", run.stderr);
            assert!(!run.stderr.contains("S3CRETPW"), "{url}: {}", run.stderr);
        }
    }
}

#[test]
fn bad_flags_exit_2() {
    let h = Harness::file();
    h.run(&["run"]).assert_code(2);
    h.run(&["run", "--job-id", "a b", "--", "true"])
        .assert_code(2);
    h.run(&["run", "--output", "../x", "--", "true"])
        .assert_code(2);
    h.run(&["frobnicate"]).assert_code(2);
}

#[test]
fn missing_token_file_is_a_config_error() {
    let h = Harness::file().with_control_plane(2);
    let config = h.config_path();
    std::fs::remove_file(h.path("token")).unwrap();
    let run = h
        .command(&["run", "--", "true"])
        .env("C3_AGENT_CONFIG", &config)
        .env("C3_AGENT_TOKEN_FILE", h.path("nope"))
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&run.stderr).contains("token_file"));
    // Only the commands that report read it: an operator's `status` or `gc` in a shell has
    // no unit credential to read, and a user's `pull` no root-only token.
    for cmd in [&["status"][..], &["gc", "--dry-run"], &["ls", "some-job"]] {
        let run = h
            .command(cmd)
            .env("C3_AGENT_CONFIG", &config)
            .env("C3_AGENT_TOKEN_FILE", h.path("nope"))
            .output()
            .unwrap();
        assert_ne!(
            run.status.code(),
            Some(2),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

/// A spec on a `jobs_root`, or a file store, whose file server stopped answering is given up
/// after the node's look deadline (2 s under the faults): the node's error, exit 6 with one
/// line, nothing launched, where every command (the unit's start, `recover`, `gc`) waited
/// for ever.
#[test]
fn a_spec_or_store_that_hangs_is_the_nodes_error() {
    let h = Harness::file();
    let spec = h.spec(
        json!({"job_id": "hung", "command": ["sh", "-c", "echo ran > $C3_ARTIFACTS_DIR/ran"]}),
    );
    let run_it = ["run", "--job", spec.to_str().unwrap()];
    for (fault, cmd, says) in [
        ("spec-read-hangs", &run_it[..], "not read within 2 s"),
        ("store-open-hangs", &run_it[..], "not opened within 2 s"),
        ("store-open-hangs", &["gc"], "not opened within 2 s"),
        ("store-open-hangs", &["recover"], "not opened within 2 s"),
    ] {
        let begun = std::time::Instant::now();
        let run = h
            .command(cmd)
            .env("C3_AGENT_FAULT", fault)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(6), "{fault} {cmd:?}: {stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(begun.elapsed() < std::time::Duration::from_secs(60));
    }
    assert!(!h.workdir("hung").join("artifacts/ran").exists());
}
