//! Private by default (contract §6, file modes): the state dir, its records and logs, the
//! default workdir and the file store are closed to other users.

use std::path::Path;

use serde_json::json;

use crate::common::{mode, nobody, not_root, open_harness, owner};

/// Every entry under `dir` (not following symlinks), `dir` included.
fn tree(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        assert!(out.len() < 100_000, "tree too big");
        let p = out[i].clone();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut children: Vec<_> = std::fs::read_dir(&p)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            children.sort();
            out.extend(children);
        }
        i += 1;
    }
    out
}

#[test]
fn state_dir_records_logs_workdir_and_store_are_private() {
    if not_root() {
        return;
    }
    let h = open_harness();
    // No `workdir`: the default one, `<state_dir>/jobs/<job_id>/work` (`Harness::spec` would
    // fill one in, so the spec is written here).
    let spec = h.path("priv.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&json!({
            "job_id": "priv", "user": "nobody",
            "command": ["sh", "-c", "echo out; echo err >&2; echo data > $C3_ARTIFACTS_DIR/d; mkdir $C3_ARTIFACTS_DIR/sub; echo more > $C3_ARTIFACTS_DIR/sub/e"],
        }))
        .unwrap(),
    )
    .unwrap();
    h.run(&["run", "--job", spec.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(
        h.manifest_paths("priv"),
        vec!["artifacts/d", "artifacts/sub/e"]
    );

    let state_mode = mode(&h.state);
    assert_eq!(
        state_mode & 0o066,
        0,
        "state dir is {state_mode:o}: group/other may read or write it"
    );
    let attempt = h.state.join("jobs/priv/attempts/1");
    for name in ["run.json", "stdout.log", "stderr.log"] {
        let m = mode(&attempt.join(name));
        assert_eq!(m, 0o600, "{name} is {m:o}");
    }

    let wd = h.state.join("jobs/priv/work");
    assert_eq!(mode(&wd), 0o700, "default workdir mode");
    assert_eq!(owner(&wd), nobody(), "default workdir owner");

    let store = h.state.join("store");
    let mut blobs = 0;
    for p in tree(&store) {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let bits = mode(&p);
        if m.is_dir() {
            assert_eq!(bits, 0o700, "store dir {} is {bits:o}", p.display());
        } else if p.starts_with(store.join("blobs")) {
            assert_eq!(bits, 0o600, "blob {} is {bits:o}", p.display());
            blobs += 1;
        }
    }
    assert!(blobs >= 2, "expected the job's blobs in the store");
}

/// `private_files = false` under a scheduler's umask 000: the agent's files may be readable
/// (and its group's to write), never writable by others. Each directory it made was 0777 until its chmod, and a job's
/// user could rename a tree of its own into one (an attempt dir whose `stdout.log` linked to
/// a file root then appended the job's output to). The job keeps the umask it was given.
#[test]
fn shared_files_are_never_writable_by_others() {
    use std::os::unix::process::CommandExt;
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.env
        .push(("C3_AGENT_PRIVATE_FILES".into(), "false".into()));
    let spec = h.path("shared.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&json!({
            "job_id": "shared", "user": "nobody",
            "command": ["sh", "-c", "echo out; echo data > $C3_ARTIFACTS_DIR/d"],
        }))
        .unwrap(),
    )
    .unwrap();
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    // SAFETY: umask is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    h.wait("run shared".into(), child).assert_code(0);
    let work = h.state.join("jobs/shared/work");
    assert_eq!(
        mode(&work.join("artifacts/d")) & 0o777,
        0o666,
        "the job's umask"
    );
    let mut seen = 0;
    for p in tree(&h.state) {
        if p.starts_with(&work) || std::fs::symlink_metadata(&p).unwrap().is_symlink() {
            continue;
        }
        seen += 1;
        let bits = mode(&p);
        assert_eq!(bits & 0o002, 0, "{} is {bits:o}", p.display());
    }
    assert!(seen > 10, "only {seen} entries looked at");
}

/// The job's `artifacts/` (open to all) holding root's 0700 `locked/` with a 0644 `secret`:
/// a file the job may read behind a directory it may not enter. Returns `artifacts/`.
fn root_locked_dir(h: &crate::support::Harness, job: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let artifacts = h.workdir(job).join("artifacts");
    std::fs::create_dir_all(artifacts.join("locked")).unwrap();
    for (path, mode) in [
        (artifacts.clone(), 0o777),
        (artifacts.join("locked"), 0o700),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::fs::write(artifacts.join("locked/secret"), "root's eyes only\n").unwrap();
    std::fs::set_permissions(
        artifacts.join("locked/secret"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    artifacts
}

/// A file the job's user may read, under a directory it may not enter (root's, 0700, left in
/// an output dir): `publish` refuses it as the scan skips it, and it is never stored.
#[test]
fn publish_refuses_a_file_behind_a_directory_the_job_cannot_enter() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let artifacts = root_locked_dir(&h, "locked");
    let ask = "import json, os, socket, sys; s = socket.socket(socket.AF_UNIX); \
               s.connect(os.environ['C3_AGENT_SOCKET']); \
               req = {'op': 'publish', 'paths': ['artifacts/locked/secret']}; \
               s.sendall(json.dumps(req).encode() + bytes([10])); \
               sys.stdout.write(s.makefile().readline())";
    let script = format!("python3 -c \"{ask}\" > $C3_ARTIFACTS_DIR/reply.txt");
    h.run_job(json!({"job_id": "locked", "user": "nobody", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let reply = std::fs::read_to_string(artifacts.join("reply.txt")).unwrap();
    assert!(
        reply.contains("\"ok\":false") && reply.contains("not readable by the job's user"),
        "{reply}"
    );
    let secret = crate::support::sha256_hex(b"root's eyes only\n");
    assert!(h.object(&format!("blobs/sha256/{secret}")).is_none());
    assert_eq!(h.manifest_paths("locked"), vec!["artifacts/reply.txt"]);
}

/// The directories on the way were checked by path and the file opened by path again, so
/// a job that may write `artifacts/` swapped (RENAME_EXCHANGE, which needs write access to
/// the parent only) its own `mine/`, whose `secret` live sync had already seen close, with
/// root's 0700 `locked/`: live sync then read root's `locked/secret` as `mine/secret`.
#[test]
fn a_directory_swapped_in_after_its_check_keeps_its_file() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    h.extra_toml = "[sync]\nsettle_ms = 1000\n".into();
    root_locked_dir(&h, "swapper");
    let swap = "import ctypes, os, time; a = os.environ['C3_ARTIFACTS_DIR']; \
                os.mkdir(a + '/mine'); open(a + '/mine/secret', 'w').write('decoy'); \
                time.sleep(0.3); libc = ctypes.CDLL(None, use_errno=True); \
                r = libc.renameat2(-100, (a + '/mine').encode(), -100, (a + '/locked').encode(), 2); \
                assert r == 0, os.strerror(ctypes.get_errno()); time.sleep(4)";
    let run = h.run_job(json!({"job_id": "swapper", "user": "nobody",
        "command": ["python3", "-c", swap]}));
    assert!(
        !run.stderr.contains("Traceback"),
        "the swap failed: {}",
        run.stderr
    );
    eprintln!("STDERR {}", run.stderr);
    let secret = crate::support::sha256_hex(b"root's eyes only\n");
    assert!(
        h.object(&format!("blobs/sha256/{secret}")).is_none(),
        "root's file was stored: {}",
        run.stderr
    );
    assert!(!h
        .manifest_paths("swapper")
        .contains(&"artifacts/mine/secret".to_string()));
}

/// The scheduler's spec at `<jobs_root>/<id>/job.json`, written with umask 022, sat in
/// directories the agent makes traversable for the job's user: any other tenant's job that
/// guessed the id (`systemctl list-units`, `/proc/<pid>/cmdline`) read its `env` secrets. The
/// agent closes it (0600) on its fd and says so.
#[test]
fn a_spec_readable_by_others_is_closed_before_the_job_starts() {
    use std::os::unix::fs::PermissionsExt;
    let h = open_harness();
    let dir = h.path("specx");
    std::fs::create_dir(&dir).unwrap();
    let spec = dir.join("job.json");
    let body = json!({"job_id": "specx", "workdir": h.path("specx/work").display().to_string(),
        "env": {"SECRET": "xyzzy"}, "command": ["true"]});
    std::fs::write(&spec, body.to_string()).unwrap();
    std::fs::set_permissions(&spec, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = h.run(&["run", "--job-id", "specx"]);
    run.assert_code(0);
    assert_eq!(mode(&spec), 0o600);
    assert!(
        run.stderr.contains("readable by other users"),
        "{}",
        run.stderr
    );
    // The same spec named by its path (`run --job PATH`, as a scheduler's unit runs it).
    let body = json!({"job_id": "specy", "workdir": h.path("specx/work2").display().to_string(),
        "env": {"SECRET": "xyzzy"}, "command": ["true"]});
    let by_path = dir.join("other.json");
    std::fs::write(&by_path, body.to_string()).unwrap();
    std::fs::set_permissions(&by_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = h.run(&["run", "--job", by_path.to_str().unwrap()]);
    run.assert_code(0);
    assert_eq!(mode(&by_path), 0o600, "{}", run.stderr);
    // A file that is no spec (`--job /etc/passwd`) is not the agent's to change.
    let other = dir.join("passwd");
    std::fs::write(&other, "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = h.run(&["run", "--job", other.to_str().unwrap()]);
    run.assert_code(2);
    assert_eq!(mode(&other), 0o644, "{}", run.stderr);
}

/// The agent's control-plane token in a file every user may read is named at each run with
/// its fix (a job could report as this node with it); closed, nothing is said.
#[test]
fn a_token_file_every_user_may_read_is_named_at_each_run() {
    use std::os::unix::fs::PermissionsExt;
    let h = open_harness().with_control_plane(10);
    let config = h.config_path();
    let token = h.path("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = h.run_job(json!({"job_id": "tok1", "command": ["true"]}));
    run.assert_code(0);
    assert!(
        run.stderr.contains("control-plane token file") && run.stderr.contains("chmod 600"),
        "{}",
        run.stderr
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let run = h.run_job(json!({"job_id": "tok2", "command": ["true"]}));
    run.assert_code(0);
    assert!(
        !run.stderr.contains("may be read by every user"),
        "{}",
        run.stderr
    );
}

/// Store credentials from the instance-metadata endpoint: a job running as another user
/// that reaches the endpoint could take them. The agent probes it as the job's user (a
/// node that blocks it for non-root users hears nothing) and names the risk when it is open.
/// A local listener stands for the endpoint; the store itself is unusable here.
#[test]
fn a_metadata_endpoint_the_jobs_user_reaches_is_named() {
    if not_root() {
        return;
    }
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(64) {
            drop(conn);
        }
    });
    let mut h = open_harness();
    h.extra_toml = format!(
        "[store]\nurl = \"s3://bucket\"\nmax_retries = 0\nretry_timeout_secs = 1\nretry_deadline_secs = 1\n[store.options]\naws_endpoint = \"http://127.0.0.1:{port}\"\naws_allow_http = \"true\"\naws_region = \"us-east-1\"\naws_metadata_endpoint = \"http://127.0.0.1:{port}\"\n"
    );
    for (k, v) in [
        ("HOME", "/nonexistent"),
        ("AWS_CONFIG_FILE", "/nonexistent"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ] {
        h.env.push((k.into(), v.into()));
    }
    let run = h.run_job(json!({"job_id": "imds", "user": "nobody", "command": ["true"]}));
    assert!(
        run.stderr.contains("the job's user reaches it too"),
        "{}",
        run.stderr
    );
    // The probe itself: 0 reached, 1 not, 2 no URL.
    let probe = |endpoint: &str| {
        std::process::Command::new(crate::support::BIN)
            .args(["probe-connect", endpoint])
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(probe(&format!("http://127.0.0.1:{port}")), Some(0));
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    assert_eq!(probe(&format!("http://127.0.0.1:{closed_port}")), Some(1));
    assert_eq!(probe("not a url"), Some(2));
}

/// The agent's session keyring is not the job's: a keyring is possessed through the session,
/// not by uid, so a key the agent's session holds (a Kerberos or AFS token a prolog put there,
/// shared by every job that prolog starts) could be read by the job's user.
#[test]
fn the_agents_session_keyring_is_not_the_jobs() {
    use std::os::unix::process::CommandExt;
    if not_root() {
        return;
    }
    let h = open_harness();
    let name = format!("c3-probe-{}", std::process::id());
    let probe = format!(
        r#"
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
keyctl = {{"x86_64": 250, "aarch64": 219}}[os.uname().machine]
key = libc.syscall(keyctl, 10, ctypes.c_long(-3), b"user", b"{name}", 0)
buf = ctypes.create_string_buffer(64)
n = libc.syscall(keyctl, 11, ctypes.c_long(key), buf, 64) if key > 0 else -1
seen = buf.raw[:n] if n > 0 else b"none"
# Its own keyring is the job's to use: a key it adds is there to read back.
add_key = {{"x86_64": 248, "aarch64": 217}}[os.uname().machine]
own = libc.syscall(add_key, b"user", b"mine", b"v", 1, ctypes.c_long(-3))
n = libc.syscall(keyctl, 11, ctypes.c_long(own), buf, 64) if own > 0 else -1
with open(os.environ["C3_ARTIFACTS_DIR"] + "/key", "wb") as f:
    f.write(seen + b"," + (buf.raw[:n] if n > 0 else b"-"))
"#
    );
    let spec = h.spec(json!({
        "job_id": "keys", "user": "nobody", "command": ["python3", "-c", probe],
    }));
    let mut cmd = h.command(&["run", "--job", spec.to_str().unwrap()]);
    let (ty, desc, payload) = (
        c"user",
        std::ffi::CString::new(name).unwrap(),
        b"root-only-secret",
    );
    // SAFETY: raw syscalls only, on buffers made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // The agent's own session keyring (as a prolog's), holding the secret.
            const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
            const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
            if libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_JOIN_SESSION_KEYRING,
                std::ptr::null::<libc::c_char>(),
            ) < 0
                || libc::syscall(
                    libc::SYS_add_key,
                    ty.as_ptr(),
                    desc.as_ptr(),
                    payload.as_ptr(),
                    payload.len(),
                    KEY_SPEC_SESSION_KEYRING,
                ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn c3-agent in its own keyring");
    h.wait("c3-agent run (keyring)".into(), child)
        .assert_code(0);
    let seen = std::fs::read(h.workdir("keys").join("artifacts/key")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "none,v",
        "the job read the agent's key, or could not use its own keyring"
    );
}

/// A job of another user gets that user's identity, not the agent's: under sudo or cron the
/// agent's `USER=root` made `getpass.getuser()` say root (and PyTorch share
/// `/tmp/torchinductor_root` across tenants). The spec's `env` still wins, `HOME` included.
#[test]
fn a_user_job_gets_its_users_identity_not_the_agents() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    for (k, v) in [
        ("USER", "root"),
        ("LOGNAME", "root"),
        ("SUDO_USER", "admin"),
        ("XDG_RUNTIME_DIR", "/run/user/0"),
        ("MAIL", "/var/mail/root"),
    ] {
        h.env.push((k.into(), v.into()));
    }
    let home = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .dir
        .display()
        .to_string();
    let script = "echo \"$USER|$LOGNAME|$HOME|${SUDO_USER-unset}|${XDG_RUNTIME_DIR-unset}|${MAIL-unset}\" > $C3_ARTIFACTS_DIR/who";
    h.run_job(json!({"job_id": "j", "user": "nobody", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let who = std::fs::read_to_string(h.workdir("j").join("artifacts/who")).unwrap();
    assert_eq!(
        who.trim(),
        format!("nobody|nobody|{home}|unset|unset|unset")
    );
    h.run_job(json!({
        "job_id": "k", "user": "nobody", "env": {"HOME": "/scratch/k", "USER": "svc"},
        "command": ["sh", "-c", script],
    }))
    .assert_code(0);
    let who = std::fs::read_to_string(h.workdir("k").join("artifacts/who")).unwrap();
    assert_eq!(who.trim(), "svc|nobody|/scratch/k|unset|unset|unset");
}

/// A `jobs_root` or state dir whose parents do not exist yet: the agent makes them, and
/// (its own umask being private) made them 0700, so a job's user could not reach its
/// `$C3_ARTIFACTS_DIR` by absolute path. What is missing above them is made 0711.
#[test]
fn missing_parents_of_the_roots_are_made_traversable() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    let jobs = h.path("new/deeper/jobs");
    h.extra_toml = format!("jobs_root = \"{}\"\n", jobs.display());
    h.state = h.path("fresh/nested/state");
    let script = "echo x > $C3_ARTIFACTS_DIR/x";
    h.run_job(json!({
        "job_id": "spec", "user": "nobody", "workdir": jobs.join("spec").display().to_string(),
        "command": ["sh", "-c", script],
    }))
    .assert_code(0);
    // The state dir's own jobs dir holds the default workdirs (jobs_root: the temp dir).
    h.extra_toml.clear();
    let default = h.state.join("jobs/dflt/work");
    let run = h.run_job(json!({
        "job_id": "dflt", "user": "nobody", "workdir": default.display().to_string(),
        "command": ["sh", "-c", script],
    }));
    let modes: Vec<_> = ["fresh", "fresh/nested", "fresh/nested/state"]
        .iter()
        .map(|d| format!("{d}={:o}", mode(&h.path(d))))
        .collect();
    let log = h.run(&["logs", "dflt", "--stderr"]);
    assert_eq!(run.code, 0, "{modes:?}\n{}\n{}", log.stdout, run.stderr);
    for dir in ["new", "new/deeper", "fresh", "fresh/nested"] {
        assert_eq!(mode(&h.path(dir)), 0o711, "{dir}");
    }
    assert!(h
        .manifest_paths("spec")
        .contains(&"artifacts/x".to_string()));
    assert!(h
        .manifest_paths("dflt")
        .contains(&"artifacts/x".to_string()));
}

/// A tenant's files are private in its 0700 workdir; pulled by root into a DEST it makes
/// under /tmp, their 0644 modes made them every local user's to read. What root makes of DEST
/// is its own (0700); a DEST that exists keeps its mode.
#[test]
fn a_pull_as_root_makes_dest_private() {
    use std::os::unix::fs::PermissionsExt;
    if not_root() {
        return;
    }
    let h = crate::common::open_harness();
    h.run_job(serde_json::json!({"job_id": "priv", "user": "nobody",
        "command": ["sh", "-c", "echo s > $C3_ARTIFACTS_DIR/s"]}))
        .assert_code(0);
    let dest = h.path("pulled/here");
    h.run(&["pull", "priv", dest.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(mode(&dest), 0o700);
    assert_eq!(mode(&h.path("pulled")), 0o700);
    assert_eq!(
        std::fs::read_to_string(dest.join("artifacts/s")).unwrap(),
        "s\n"
    );
    let open = h.path("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    h.run(&["pull", "priv", open.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(mode(&open), 0o755);
}
