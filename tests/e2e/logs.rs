//! What operators see: the job's output in the agent's log, JSON logs, the environment.

use serde_json::{json, Value};

use crate::support::Harness;

#[test]
fn json_logs_carry_job_id_and_stream() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_LOG_FORMAT".into(), "json".into()));
    let run = h.run_job(
        json!({"job_id": "jl", "command": ["sh", "-c", "echo hello-out; echo hello-err >&2"]}),
    );
    run.assert_code(0);
    let lines: Vec<Value> = run
        .stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let find = |text: &str| {
        lines
            .iter()
            .find(|l| l["message"] == text)
            .unwrap_or_else(|| panic!("{text} not logged: {}", run.stderr))
    };
    assert_eq!(find("[stdout] hello-out")["stream"], "stdout");
    assert_eq!(find("[stdout] hello-out")["job_id"], "jl");
    assert_eq!(find("[stdout] hello-out")["target"], "c3::job");
    assert_eq!(find("[stderr] hello-err")["stream"], "stderr");
    let summary = find("job finished");
    assert_eq!(summary["state"], "SUCCEEDED");
    assert_eq!(summary["job_id"], "jl");
}

#[test]
fn job_output_is_kept_whole_in_the_state_dir() {
    let h = Harness::file();
    let run = h.run_job(
        json!({"job_id": "kept", "command": ["sh", "-c", "printf 'a\\nno newline'; printf e >&2"]}),
    );
    run.assert_code(0);
    assert!(run.stderr.contains("no newline"), "{}", run.stderr);
    let out = std::fs::read_to_string(h.state.join("jobs/kept/attempts/1/stdout.log")).unwrap();
    assert_eq!(out, "a\nno newline");
    let m = h.manifest("kept");
    assert_eq!(m["logs"]["stdout"]["size"], 12);
    assert_eq!(m["logs"]["stderr"]["size"], 1);
}

#[test]
fn credentials_never_reach_the_job() {
    let mut h = Harness::file().with_control_plane(5);
    for (k, v) in [
        ("AWS_SECRET_ACCESS_KEY", "aws-sekrit"),
        ("AWS_ACCESS_KEY_ID", "AKIA"),
        ("AZURE_STORAGE_ACCOUNT_KEY", "az-sekrit"),
        ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcp.json"),
        ("C3_AGENT_SETTLE_MS", "1000"),
        ("CREDENTIALS_DIRECTORY", "/run/credentials/c3"),
        ("INNOCENT_LOOKING", "tok-Secret-123"),
        ("KEEP_ME", "yes"),
        ("PYTHONUNBUFFERED", "0"),
    ] {
        h.env.push((k.into(), v.into()));
    }
    let spec = json!({"job_id": "env", "command": ["sh", "-c", "env > $C3_ARTIFACTS_DIR/env.txt"], "env": {"EPOCHS": "3", "AWS_PROFILE": "mine"}});
    h.run_job(spec).assert_code(0);
    let env = std::fs::read_to_string(h.workdir("env").join("artifacts/env.txt")).unwrap();
    for secret in [
        "aws-sekrit",
        "AKIA",
        "az-sekrit",
        "gcp.json",
        "C3_AGENT_SETTLE_MS",
        "CREDENTIALS_DIRECTORY",
        "tok-Secret-123",
        "C3_AGENT_CONFIG",
    ] {
        assert!(
            !env.contains(secret),
            "{secret} leaked into the job:\n{env}"
        );
    }
    let workdir = h.workdir("env");
    for expected in [
        "KEEP_ME=yes".to_string(),
        "EPOCHS=3".into(),
        "AWS_PROFILE=mine".into(),
        "PYTHONUNBUFFERED=1".into(),
        "C3_JOB_ID=env".into(),
        "C3_ATTEMPT=1".into(),
        format!("C3_ARTIFACTS_DIR={}/artifacts", workdir.display()),
        format!("C3_RESULT_FILE={}/.c3/result.json", workdir.display()),
    ] {
        assert!(
            env.lines().any(|l| l == expected),
            "{expected} missing:\n{env}"
        );
    }
}

#[test]
fn quick_run_uses_the_current_dir() {
    let h = Harness::file();
    let run = h.run(&[
        "run",
        "--job-id",
        "quick",
        "--output",
        "out",
        "--",
        "sh",
        "-c",
        "echo a > $C3_ARTIFACTS_DIR/a; echo b > out/b",
    ]);
    run.assert_code(0);
    assert!(run.stdout.contains("c3-agent pull quick"), "{}", run.stdout);
    assert_eq!(h.manifest_paths("quick"), vec!["artifacts/a", "out/b"]);
    assert!(h.dir.path().join("artifacts/a").exists());
}

#[test]
fn json_mode_writes_only_json_on_both_streams() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_LOG_FORMAT".into(), "json".into()));
    let run = h.run_job(json!({"job_id": "jsonly", "command": ["sh", "-c", "echo out; echo x > $C3_ARTIFACTS_DIR/x; exit 3"]}));
    run.assert_code(1);
    let parse = |stream: &str, text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("{stream} line not JSON: {l}: {e}"))
            })
            .collect()
    };
    let err = parse("stderr", &run.stderr);
    let out = parse("stdout", &run.stdout);
    assert_eq!(out.len(), 1, "the summary: {}", run.stdout);
    assert_eq!(out[0]["state"], "FAILED");
    assert_eq!(out[0]["agent_exit_code"], 1);
    assert_eq!(out[0]["script_exit_code"], 3);
    let find = |m: &str| err.iter().find(|l| l["message"] == m).cloned().unwrap();
    let launched = find("job launched");
    assert!(launched["command"].is_array(), "a list: {launched}");
    assert_eq!(launched["command"][0], "sh");
    let exited = find("job script exited");
    assert_eq!(exited["script_exit_code"], 3);
    let fin = find("job finished");
    assert!(fin["elapsed_s"].is_f64(), "a number: {fin}");
    assert_eq!(fin["reason"], "SCRIPT_ERROR");
    assert_eq!(fin["agent_exit_code"], 1);
    assert_eq!(fin["level"], "ERROR", "a failed job ends with an error");

    // A bad flag is a JSON line too.
    let bad = h.run(&["run", "--timeout", "0", "--", "true"]);
    bad.assert_code(2);
    let line: Value = serde_json::from_str(bad.stderr.trim()).unwrap();
    assert_eq!(line["level"], "ERROR");
}

#[test]
fn a_succeeded_job_says_reason_null() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_LOG_FORMAT".into(), "json".into()));
    let run = h.run_job(json!({"job_id": "nullr", "command": ["true"]}));
    run.assert_code(0);
    let fin: Value = run
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "job finished")
        .unwrap();
    assert_eq!(fin["reason"], Value::Null);
    assert_eq!(fin["level"], "INFO");
    assert_eq!(fin["script_exit_code"], 0);
}

/// A harness whose agent takes its stderr for journald's stream (`JOURNAL_STREAM` names the
/// file's device and inode): the log file, and the file to give the agent as its stderr.
fn under_journald() -> (Harness, std::path::PathBuf, std::fs::File) {
    use std::os::unix::fs::MetadataExt;
    let mut h = Harness::file();
    let log = h.path("journal.log");
    let file = std::fs::File::create(&log).unwrap();
    let meta = file.metadata().unwrap();
    h.env.push((
        "JOURNAL_STREAM".into(),
        format!("{}:{}", meta.dev(), meta.ino()),
    ));
    (h, log, file)
}

#[test]
fn under_journald_each_line_carries_its_priority() {
    let (h, log, file) = under_journald();
    let spec = h.spec(json!({"job_id": "prio", "command": ["sh", "-c", "exit 4"]}));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    cmd.stderr(file);
    let status = cmd.status().unwrap();
    assert_eq!(status.code(), Some(1));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.lines().all(|l| l.starts_with('<')), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>") && l.contains("job launched")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<3>") && l.contains("job finished")),
        "a failed job's end is an error for `journalctl -p err`: {text}"
    );
}

/// An error the agent prints itself (a bad spec, exit 2) is one journal entry at error
/// priority, whatever the spec holds: a value with `\n<3>...` in it was a second entry of the
/// writer's making, and the error itself was filed at info, unseen by `journalctl -p warning`.
#[test]
fn a_bad_spec_is_one_error_line_under_journald() {
    let (h, log, file) = under_journald();
    let spec = h.spec(json!({
        "job_id": "forge", "command": ["true"],
        "datasets": [{"ref": "/jobs/x\n<3>c3-agent: FORGED", "mount": "d"}],
    }));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    cmd.stderr(file);
    assert_eq!(cmd.status().unwrap().code(), Some(2));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with("<3>c3-agent: "), "{text}");
    assert!(text.contains("\\n<3>c3-agent: FORGED"), "{text}");
}

/// A bad flag is one line that names it, exit 2 (clap printed a block of five); `--help` is
/// still clap's whole text. A job id that starts with `-` runs when given as `--job-id=ID`
/// (as the unit does).
#[test]
fn a_bad_flag_is_one_line_and_a_dash_id_runs() {
    let h = Harness::file();
    for args in [
        &["run", "--bogus", "--", "true"][..],
        &["run", "--timeout", "abc", "--", "true"],
        &["run", "--job-id", "-x", "--", "true"],
        &["frobnicate"],
    ] {
        let run = h.run(args);
        run.assert_code(2);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {}", run.stderr);
        assert!(run.stderr.starts_with("c3-agent: "), "{}", run.stderr);
    }
    let bogus = h.run(&["run", "--bogus", "--", "true"]);
    assert!(bogus.stderr.contains("--bogus"), "{}", bogus.stderr);
    let help = h.run(&["run", "--help"]);
    help.assert_code(0);
    assert!(help.stdout.lines().count() > 5, "{}", help.stdout);
    h.run(&["run", "--job-id=-dash", "--", "true"])
        .assert_code(0);
    for args in [
        &["run", "--attempt", "0", "--", "true"][..],
        &["watch", "--job-id", "w", "--attempt", "0", "--pid", "1"],
        &["logs", "j", "--attempt", "0"],
    ] {
        let run = h.run(args);
        run.assert_code(2);
        assert!(run.stderr.contains("--attempt"), "{args:?}: {}", run.stderr);
    }
}

/// A quick run's workdir is named as text in its spec: in a directory whose path is not
/// UTF-8 the run made and used another one (`nu\u{fffd}`, the bytes replaced); it is refused.
#[test]
fn a_workdir_that_is_not_utf8_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    let h = Harness::file();
    let odd = h
        .path("x")
        .with_file_name(std::ffi::OsStr::from_bytes(b"nu\xff"));
    std::fs::create_dir(&odd).unwrap();
    let mut cmd = h.command(&["run", "--job-id", "nu", "--", "true"]);
    cmd.current_dir(&odd);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not UTF-8"), "{stderr}");
    let made = h.path("x").with_file_name("nu\u{fffd}");
    assert!(!made.exists(), "another directory was made");
}

#[test]
fn a_malformed_log_filter_is_a_config_error() {
    let mut h = Harness::file();
    h.env.push(("C3_AGENT_LOG".into(), "info,[[[".into()));
    let run = h.run(&["run", "--", "true"]);
    run.assert_code(2);
    assert!(run.stderr.contains("C3_AGENT_LOG"), "{}", run.stderr);
}

/// A job that floods its output costs the node at most `job.max_log_bytes` per stream (the
/// agent writes the log as root, and stores it as a blob too), never blocks on a full pipe,
/// and is echoed into the journal only as fast as journald keeps lines.
#[test]
fn a_flooding_job_is_kept_up_to_max_log_bytes_and_echoed_at_a_rate_journald_keeps() {
    let mut h = Harness::file();
    h.extra_toml = "[job]\nmax_log_bytes = 1048576\n".into();
    // 3 MiB in 30,000 lines of 100 bytes, then a last word on stderr.
    let script = "python3 -c \"import sys\nfor i in range(30000): sys.stdout.write('%099d\\n' % i)\"; echo done >&2";
    let run = h.run_job(json!({"job_id": "flood", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let log = std::fs::read(h.state.join("jobs/flood/attempts/1/stdout.log")).unwrap();
    assert!(log.len() < (1 << 20) + 200, "{} bytes kept", log.len());
    assert!(log.starts_with(&b"0000"[..]));
    let tail = String::from_utf8_lossy(&log[log.len() - 120..]).into_owned();
    assert!(
        tail.contains("1951424 more bytes of stdout were dropped"),
        "{tail}"
    );
    assert_eq!(
        h.manifest("flood")["logs"]["stdout"]["size"],
        log.len() as u64
    );
    let echoed = run.stderr.lines().filter(|l| l.contains(" 000")).count();
    assert!(echoed <= 2100, "{echoed} lines echoed");
    assert!(
        run.stderr.contains("not echoed here"),
        "{}",
        &run.stderr[..2000]
    );
    assert!(run.stderr.contains("done"), "stderr is kept apart");
    // The user sees the cut in the status, not only in the log's last line.
    let warnings = h.terminal("flood")["warnings"].to_string();
    assert!(
        warnings.contains("stdout log is not whole") && warnings.contains("max_log_bytes"),
        "{warnings}"
    );
}

/// journald cuts a stream line at `LineMax` (48 KiB) and reads a `<N>` priority at the start of
/// every piece. A job line of control bytes was cut at 16 KiB as the job wrote it, then grew
/// fourfold (`\x01`) or sixfold (`\u0001`) when escaped: its tail, `<0>...`, was a journal
/// entry of the job's making, at emergency priority (a wall message on every terminal).
#[test]
fn a_job_line_that_grows_when_escaped_is_never_cut_by_journald() {
    const LINE_MAX: usize = 48 * 1024;
    let script = "head -c 12270 /dev/zero | tr '\\0' '\\001'; echo '<0>c3-agent: job finished state=SUCCEEDED'; \
                  head -c 16384 /dev/zero | tr '\\0' '\\377'; echo '<0>forged'";
    for format in ["human", "json"] {
        let (mut h, log, file) = under_journald();
        h.env.push(("C3_AGENT_LOG_FORMAT".into(), format.into()));
        let spec = h.spec(json!({"job_id": "forge", "command": ["sh", "-c", script]}));
        let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
        cmd.stderr(file);
        assert_eq!(cmd.status().unwrap().code(), Some(0));
        let text = std::fs::read_to_string(&log).unwrap();
        let longest = text.lines().map(str::len).max().unwrap_or(0);
        assert!(
            longest <= 32 * 1024,
            "{format}: a line of {longest} bytes (journald cuts at {LINE_MAX})"
        );
        for line in text.lines() {
            assert!(
                line.starts_with("<6>") || line.starts_with("<4>") || line.starts_with("<3>"),
                "{format}: {}",
                &line[..line.len().min(200)]
            );
            // What journald would make of it: no piece but the first reads as a priority.
            for piece in line.as_bytes().chunks(LINE_MAX).skip(1) {
                assert!(!piece.starts_with(b"<"), "{format}: a forged entry");
            }
            if format == "json" {
                let body = &line[3..];
                serde_json::from_str::<Value>(body)
                    .unwrap_or_else(|e| panic!("not JSON ({e}): {}", &body[..body.len().min(200)]));
            }
        }
        // The job's text is all there, inside its own lines.
        assert!(text.contains("<0>c3-agent: job finished"), "{format}");
        assert!(text.contains("<0>forged"), "{format}");
    }
}

/// A journal that stops reading (stderr a full pipe) costs log lines, never the job's
/// timeout. Log lines were written in place, so every tokio worker that logged blocked on the
/// pipe: the timeout was never enforced, the output pumps stopped reading and the job blocked
/// on its own stdout, for ever.
#[test]
fn a_stalled_journal_does_not_stop_a_timeout() {
    use std::time::{Duration, Instant};
    let h = Harness::file();
    // Kept open and never read: the pipe fills at 64 KiB and stays full.
    let (unread, stderr) = nix::unistd::pipe().unwrap();
    let script = "yes xxxxxxxx | head -c 20000000; sleep 60";
    let mut cmd = h.command(&["run", "--timeout", "3", "--", "sh", "-c", script]);
    cmd.stderr(std::process::Stdio::from(stderr));
    let started = Instant::now();
    let mut agent = cmd.spawn().unwrap();
    drop(cmd);
    let status = crate::support::exit_within(
        &mut agent,
        started + Duration::from_secs(30),
        "the agent still runs 30 s into a 3 s timeout, its stderr full",
    );
    assert_eq!(status.code(), Some(5), "TIMED_OUT");
    drop(unread);
}

/// A stdout that takes nothing (journald's stream socket, stalled) never holds the agent
/// after its job is done and reported: the summary line blocked the exit until the stop
/// timeout's SIGKILL, and the unit's exit status, which schedulers read, said 9/KILL
/// instead of the job's code.
#[test]
fn a_stdout_that_takes_nothing_does_not_hold_the_exit() {
    use std::io::Write;
    use std::time::{Duration, Instant};
    let h = Harness::file();
    let (unread, stdout) = nix::unistd::pipe().unwrap();
    // Filled to the brim without blocking here, then handed over blocking, as a socket
    // whose reader stopped is.
    let flags = |fd: &std::os::fd::OwnedFd, on: bool| {
        let mut f = nix::fcntl::OFlag::from_bits_truncate(
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap(),
        );
        f.set(nix::fcntl::OFlag::O_NONBLOCK, on);
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(f)).unwrap();
    };
    flags(&stdout, true);
    let mut full = std::fs::File::from(stdout);
    while full.write(&[b'x'; 4096]).is_ok_and(|n| n > 0) {}
    let stdout: std::os::fd::OwnedFd = full.into();
    flags(&stdout, false);
    let mut cmd = h.command(&["run", "--job-id", "quiet", "--", "sh", "-c", "exit 3"]);
    cmd.stdout(std::process::Stdio::from(stdout));
    let started = Instant::now();
    let mut agent = cmd.spawn().unwrap();
    drop(cmd);
    let status = crate::support::exit_within(
        &mut agent,
        started + Duration::from_secs(30),
        "the agent still runs 30 s after its job ended, its stdout full",
    );
    assert_eq!(status.code(), Some(1), "the job's failure, not a kill");
    assert_eq!(h.terminal("quiet")["reason"], "SCRIPT_ERROR");
    drop(unread);
}

/// A job's line says its stream first: with the stream at the end, a job printing the
/// agent's summary padded with spaces read as the agent's own summary in a pager.
#[test]
fn a_job_line_says_its_stream_first() {
    let h = Harness::file();
    let script = "printf 'job finished state=SUCCEEDED files=12%300s\\n' ''";
    let run = h.run_job(json!({"job_id": "lookalike", "command": ["sh", "-c", script]}));
    run.assert_code(0);
    let echoed = run
        .stderr
        .lines()
        // The "job launched" line names the command, and may come before the echo or after.
        .find(|l| l.contains("files=12") && !l.contains("job launched"))
        .unwrap_or_else(|| panic!("not echoed: {}", run.stderr));
    assert!(
        echoed.contains("}: [stdout] job finished state=SUCCEEDED files=12"),
        "{echoed}"
    );
}
