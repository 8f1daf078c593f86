//! An operator's day (issue "operator logs"): status, logs, pull --force/--logs, ls,
//! completions and the man page, gc and retention, config mistakes named at once, and no
//! run that silently replaces an earlier one.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{signal, wait_for, Harness};

#[test]
fn status_lists_this_nodes_jobs_and_one_in_detail() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "st-ok", "command": ["sh", "-c", "echo 12345 > $C3_ARTIFACTS_DIR/a"]}),
    )
    .assert_code(0);
    h.run_job(json!({"job_id": "st-bad", "command": ["sh", "-c", "exit 3"]}))
        .assert_code(1);
    let all = h.run(&["status"]);
    all.assert_code(0);
    assert!(
        all.stdout.contains("st-ok") && all.stdout.contains("SUCCEEDED"),
        "{}",
        all.stdout
    );
    assert!(
        all.stdout.contains("st-bad") && all.stdout.contains("SCRIPT_ERROR"),
        "{}",
        all.stdout
    );
    let one = h.run(&["status", "st-ok", "--json"]);
    one.assert_code(0);
    let v: Value = serde_json::from_str(one.stdout.trim()).unwrap();
    assert_eq!(v["phase"], "done");
    assert_eq!(v["state"], "SUCCEEDED");
    assert_eq!(v["attempts"], json!([1]));
    assert_eq!(v["files_synced"], 1);
    assert_eq!(v["bytes_synced"], 6);
    assert_eq!(v["outbox"], 0);
    let unknown = h.run(&["status", "nope"]);
    unknown.assert_code(1);
    assert!(
        unknown.stderr.contains("no record of job nope"),
        "{}",
        unknown.stderr
    );
    h.run(&["status", "../x"]).assert_code(2);
}

/// A state dir whose jobs cannot be listed is not "no jobs": `status` and `recover` say so
/// and fail, rather than tell an operator there is nothing to recover.
#[test]
fn a_state_dir_that_cannot_be_listed_is_not_empty() {
    let h = Harness::file();
    h.run(&["status"]).assert_code(0);
    std::fs::create_dir_all(&h.state).unwrap();
    let _ = std::fs::remove_dir_all(h.state.join("jobs"));
    std::fs::write(h.state.join("jobs"), "not a dir").unwrap();
    for cmd in ["status", "recover"] {
        let run = h.run(&[cmd]);
        run.assert_code(2);
        assert!(run.stderr.contains("cannot read"), "{cmd}: {}", run.stderr);
    }
}

#[test]
fn status_of_a_running_job_says_running() {
    let h = Harness::file();
    let spec = h.spec(json!({"job_id": "st-run", "command": ["sh", "-c", "echo up > $C3_ARTIFACTS_DIR/up; exec sleep 60"]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let up = h.workdir("st-run").join("artifacts/up");
    wait_for("the job", Duration::from_secs(20), || {
        up.exists().then_some(())
    });
    // The run record says `running` once saved after the launch (off the reactor), which a
    // quick job's first file can beat by a moment.
    let v: Value = wait_for("status to say running", Duration::from_secs(20), || {
        let v: Value =
            serde_json::from_str(h.run(&["status", "st-run", "--json"]).stdout.trim()).unwrap();
        (v["phase"] == "running").then_some(v)
    });
    assert_eq!(v["agent_running"], true);
    signal(child.id(), "TERM");
    h.wait("stopped".into(), child).assert_code(4);
}

#[test]
fn logs_come_from_the_node_and_else_from_the_store() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "lg", "command": ["sh", "-c", "echo hello-out; echo hello-err >&2"]}),
    )
    .assert_code(0);
    let out = h.run(&["logs", "lg"]);
    out.assert_code(0);
    assert_eq!(out.stdout, "hello-out\n");
    let err = h.run(&["logs", "lg", "--stderr", "--attempt", "1"]);
    assert_eq!(err.stdout, "hello-err\n");
    // The node no longer has it (retention, another node): the manifest's log blob.
    std::fs::remove_dir_all(h.state.join("jobs/lg")).unwrap();
    let from_store = h.run(&["logs", "lg"]);
    from_store.assert_code(0);
    assert_eq!(from_store.stdout, "hello-out\n");
    // Shown as it comes, but a blob that is not the log (longer, or other bytes) is said so.
    let sha = h.manifest("lg")["logs"]["stdout"]["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    for lie in [&b"hello-out\nand more\n"[..], b"hello-ouT\n"] {
        h.tamper(&format!("blobs/sha256/{sha}"), lie);
        let shown = h.run(&["logs", "lg"]);
        shown.assert_code(1);
        assert!(
            shown.stderr.contains("does not match its manifest entry"),
            "{}",
            shown.stderr
        );
    }
    let none = h.run(&["logs", "nope"]);
    none.assert_code(1);
    assert!(
        none.stderr.contains("no log of job nope"),
        "{}",
        none.stderr
    );
}

#[test]
fn logs_follow_a_running_job_to_its_end() {
    let h = Harness::file();
    let spec =
        h.spec(json!({"job_id": "lf", "command": ["sh", "-c", "echo one; sleep 1; echo two"]}));
    let agent = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let log = h.state.join("jobs/lf/attempts/1/stdout.log");
    wait_for("the log", Duration::from_secs(20), || {
        log.exists().then_some(())
    });
    let follow = h.run(&["logs", "lf", "--follow"]);
    follow.assert_code(0);
    assert_eq!(follow.stdout, "one\ntwo\n");
    h.wait("run".into(), agent).assert_code(0);
}

/// An attempt whose record was set aside (it did not parse) with none written since is still
/// this node's: `status` lists it as unreadable (it said "no record of job"), and `logs -f`
/// shows its log. One whose record cannot be read at all (a directory in its place) names no
/// agent that writes on either: the follow ends once the log stays quiet, never waits for ever.
#[test]
fn an_attempt_whose_record_is_set_aside_or_unreadable_is_listed_and_its_follow_ends() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "sa", "command": ["sh", "-c", "echo said"]}))
        .assert_code(0);
    let dir = h.state.join("jobs/sa/attempts/1");
    std::fs::rename(dir.join("run.json"), dir.join("run.json.bad")).unwrap();
    let status = h.run(&["status", "sa"]);
    status.assert_code(0);
    assert!(
        status.stdout.contains("record unreadable") && status.stdout.contains("set aside"),
        "{}",
        status.stdout
    );
    let follow = h.run(&["logs", "sa", "--follow"]);
    follow.assert_code(0);
    assert_eq!(follow.stdout, "said\n");
    assert!(
        follow.stderr.contains("no longer following"),
        "{}",
        follow.stderr
    );
    std::fs::create_dir(dir.join("run.json")).unwrap();
    let follow = h.run(&["logs", "sa", "--follow"]);
    follow.assert_code(0);
    assert_eq!(follow.stdout, "said\n");
    assert!(
        follow.stderr.contains("no longer following"),
        "{}",
        follow.stderr
    );
}

/// Ctrl-C during a pull into a DEST without O_TMPFILE (NFS, CIFS: the writers' temp files
/// are named there) leaves none of them: the default action ended the process at once and
/// left `.c3-pull-*.part` files, root's, in DEST. Ended as a failure, its writers are waited
/// for.
#[test]
fn a_pull_stopped_by_a_signal_leaves_no_temp_files() {
    let mut h = Harness::file();
    h.run_job(json!({"job_id": "ps", "command": ["sh", "-c", "echo data > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let dest = h.path("dest");
    std::fs::create_dir_all(&dest).unwrap();
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "no-o-tmpfile:.c3-pull-+pull-writer-pauses:artifacts/f".into(),
    ));
    let pull = h.spawn(&["pull", "ps", dest.to_str().unwrap()]);
    let temps = || {
        std::fs::read_dir(dest.join("artifacts"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(".c3-pull-"))
                    .count()
            })
            .unwrap_or(0)
    };
    wait_for(
        "the writer's named temp file",
        Duration::from_secs(20),
        || (temps() > 0).then_some(()),
    );
    crate::support::signal(pull.id(), "INT");
    let pulled = h.wait("pull".into(), pull);
    assert_eq!(pulled.code, 1, "{}", pulled.stderr);
    assert!(pulled.stderr.contains("stopped"), "{}", pulled.stderr);
    assert_eq!(temps(), 0, "a temp file stayed in DEST");
    // The writer had every byte already: placed whole, or not at all.
    if let Ok(f) = std::fs::read(dest.join("artifacts/f")) {
        assert_eq!(f, b"data\n");
    }
}

/// A second Ctrl-C ends a pull at once (exit 130) while the first one's wait for its
/// writers (30 s at most: one blocked on a hung DEST) runs: the signal's default action was
/// gone, and nothing but SIGKILL ended it.
#[test]
fn a_second_signal_ends_a_pull_at_once() {
    let mut h = Harness::file();
    h.run_job(json!({"job_id": "p2", "command": ["sh", "-c", "echo data > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let dest = h.path("dest");
    h.env.push((
        "C3_AGENT_FAULT".into(),
        "no-o-tmpfile:.c3-pull-+pull-writer-hangs:artifacts/f".into(),
    ));
    let pull = h.spawn(&["pull", "p2", dest.to_str().unwrap()]);
    // The writer made its (named) temp file and hangs (90 s, 3x the wait for writers).
    wait_for(
        "the writer's named temp file",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(dest.join("artifacts"))
                .ok()?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".c3-pull-"))
                .then_some(())
        },
    );
    let started = std::time::Instant::now();
    crate::support::signal_taken(pull.id(), libc::SIGINT);
    // However soon after the first is taken: tokio folded or dropped such a second signal.
    crate::support::signal(pull.id(), "INT");
    let pulled = h.wait("pull".into(), pull);
    assert_eq!(pulled.code, 130, "{}", pulled.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the second signal was waited out: {:?}",
        started.elapsed()
    );
}

#[test]
fn pull_refuses_to_overwrite_a_different_file_unless_forced_and_fetches_logs() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "pf", "command": ["sh", "-c", "echo fresh > $C3_ARTIFACTS_DIR/f; echo said"]}))
        .assert_code(0);
    let dest = h.path("dest");
    std::fs::create_dir_all(dest.join("artifacts")).unwrap();
    std::fs::write(dest.join("artifacts/f"), "mine\n").unwrap();
    let d = dest.to_str().unwrap();
    let refused = h.run(&["pull", "pf", d]);
    refused.assert_code(1);
    assert!(refused.stderr.contains("--force"), "{}", refused.stderr);
    assert_eq!(
        std::fs::read_to_string(dest.join("artifacts/f")).unwrap(),
        "mine\n"
    );
    h.run(&["pull", "pf", d, "--force", "--logs"])
        .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(dest.join("artifacts/f")).unwrap(),
        "fresh\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join(".c3/stdout.log")).unwrap(),
        "said\n"
    );
    // The same content again is no conflict.
    h.run(&["pull", "pf", d]).assert_code(0);
}

#[test]
fn ls_says_no_files_and_answers_an_unknown_job_in_one_line() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "empty", "command": ["true"]}))
        .assert_code(0);
    let ls = h.run(&["ls", "empty"]);
    ls.assert_code(0);
    assert_eq!(ls.stdout.trim(), "no files");
    let unknown = h.run(&["ls", "nosuchjob"]);
    unknown.assert_code(1);
    assert_eq!(
        unknown.stderr.trim().lines().count(),
        1,
        "{}",
        unknown.stderr
    );
    assert!(
        unknown.stderr.contains("no manifest") && unknown.stderr.contains("c3-agent status"),
        "{}",
        unknown.stderr
    );
    let bad = h.run(&["ls", "a/b"]);
    bad.assert_code(2);
    h.run(&["pull", "a b", "/tmp/x"]).assert_code(2);
}

/// An older agent's manifest may list a file and entries below it (`a` and `a/b`): `pull`
/// cannot write both and refuses it, but `ls` only shows entries and lists it, as `gc` reads
/// it: refused, the user could not even see what was stored.
#[test]
fn ls_lists_a_manifest_pull_cannot_write_out() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "pair", "command": ["sh", "-c", "echo a > $C3_ARTIFACTS_DIR/a"]}))
        .assert_code(0);
    let key = "jobs/pair/manifest.json";
    let mut m: serde_json::Value = serde_json::from_slice(&h.object(key).unwrap()).unwrap();
    let mut below = m["files"][0].clone();
    below["path"] = json!("artifacts/a/b");
    m["files"].as_array_mut().unwrap().push(below);
    h.tamper(key, &serde_json::to_vec(&m).unwrap());
    let ls = h.run(&["ls", "pair"]);
    ls.assert_code(0);
    assert!(
        ls.stdout.contains("artifacts/a/b") && ls.stdout.contains("artifacts/a"),
        "{}",
        ls.stdout
    );
    let dest = h.path("dest");
    let pull = h.run(&["pull", "pair", dest.to_str().unwrap()]);
    assert_ne!(pull.code, 0, "{}", pull.stderr);
}

#[test]
fn a_run_never_replaces_an_earlier_runs_manifest() {
    let h = Harness::file();
    let spec = json!({"job_id": "twice", "command": ["true"]});
    h.run_job(spec.clone()).assert_code(0);
    let again = h.run_job(spec);
    again.assert_code(2);
    assert!(again.stderr.contains("already ran"), "{}", again.stderr);
}

/// An attempt whose manifest key holds one this agent cannot take in (an earlier run's,
/// here a newer agent's version 2) is not taken for "never ran": the run's first manifest
/// replaced it. Refused, exit 6, the manifest as it was and nothing launched.
#[test]
fn a_run_never_replaces_a_manifest_it_cannot_take_in() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "older", "command": ["sh", "-c", "echo m > $C3_ARTIFACTS_DIR/m"]}))
        .assert_code(0);
    let mut newer: serde_json::Value =
        serde_json::from_slice(&h.object("jobs/older/attempts/1/manifest.json").unwrap()).unwrap();
    newer["job_id"] = json!("newer");
    newer["version"] = json!(2);
    let newer = serde_json::to_vec(&newer).unwrap();
    let key = "jobs/newer/attempts/1/manifest.json";
    std::fs::create_dir_all(h.object_path(key).parent().unwrap()).unwrap();
    h.tamper(key, &newer);
    let marker = h.path("launched");
    let run =
        h.run_job(json!({"job_id": "newer", "command": ["touch", marker.display().to_string()]}));
    run.assert_code(6);
    assert!(run.stderr.contains("cannot take in"), "{}", run.stderr);
    assert!(!marker.exists(), "launched over the manifest");
    assert_eq!(h.object(key).unwrap(), newer);
}

#[test]
fn version_everywhere_completions_and_man_page() {
    let h = Harness::file();
    for args in [
        vec!["--version"],
        vec!["run", "--version"],
        vec!["status", "--version"],
    ] {
        let v = h.run(&args);
        v.assert_code(0);
        assert!(v.stdout.starts_with("c3-agent"), "{args:?}: {}", v.stdout);
    }
    let bash = h.run(&["completions", "bash"]);
    bash.assert_code(0);
    assert!(
        bash.stdout.contains("complete -F") && bash.stdout.contains("watch"),
        "bash completion"
    );
    let man = h.run(&["man"]);
    man.assert_code(0);
    assert!(man.stdout.contains(".TH c3-agent 1") && man.stdout.contains("status"));
}

#[test]
fn every_config_mistake_is_named_at_once() {
    let mut h = Harness::file();
    h.env
        .push(("C3_AGENT_STORE_ULR".into(), "file:///x".into()));
    h.env
        .push(("C3_AGENT_KILL_GRACE_SECS".into(), "soon".into()));
    let run = h.run(&["run", "--", "true"]);
    run.assert_code(2);
    assert_eq!(run.stderr.trim().lines().count(), 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("did you mean C3_AGENT_STORE_URL?"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("kill_grace_secs"), "{}", run.stderr);
}

#[test]
fn a_misspelt_store_option_is_named_with_the_right_one() {
    let mut h = Harness::file();
    h.extra_toml =
        "[store]\nurl = \"s3://b/p\"\n[store.options]\naws_endpont = \"http://127.0.0.1:1\"\n"
            .into();
    let run = h.run(&["run", "--", "true"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("did you mean `aws_endpoint`?"),
        "{}",
        run.stderr
    );
}

/// A quick run's `--workdir` is made only once every flag is good, and a relative one with
/// `..` is the directory the kernel finds, named in errors as the flag.
#[test]
fn a_quick_runs_workdir_is_made_only_for_a_run_that_starts() {
    let h = Harness::file();
    let never = h.path("never");
    let run = h.run(&[
        "run",
        "--workdir",
        never.to_str().unwrap(),
        "--timeout",
        "0",
        "--",
        "true",
    ]);
    run.assert_code(2);
    assert!(!never.exists(), "a refused run made its workdir");
    let bad = h.run(&["run", "--output", "../x", "--", "true"]);
    bad.assert_code(2);
    assert!(bad.stderr.contains("--output ../x:"), "{}", bad.stderr);
    std::fs::create_dir_all(h.path("up/down")).unwrap();
    let sib = h.path("up/down/../sib");
    h.run(&[
        "run",
        "--job-id",
        "sib",
        "--workdir",
        sib.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        "echo x > $C3_ARTIFACTS_DIR/f",
    ])
    .assert_code(0);
    assert!(h.path("up/sib/artifacts/f").is_file());
}

#[test]
fn gc_deletes_what_no_manifest_references_and_old_finished_jobs() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "keep", "command": ["sh", "-c", "echo kept > $C3_ARTIFACTS_DIR/k"]}),
    )
    .assert_code(0);
    // An unreferenced blob, old enough to go (and one too young to).
    let blobs = h.state.join("store/blobs/sha256");
    let old = blobs.join("0".repeat(64));
    let young = blobs.join("1".repeat(64));
    std::fs::write(&old, "orphan").unwrap();
    std::fs::write(&young, "recent").unwrap();
    // The temp file of a manifest's write a killed agent left beside its key.
    let torn = h.state.join("store/jobs/keep/manifest.json#1");
    std::fs::write(&torn, "{\"vers").unwrap();
    let past = std::time::SystemTime::now() - Duration::from_secs(3 * 86_400);
    for file in [&old, &torn] {
        std::fs::File::options()
            .write(true)
            .open(file)
            .unwrap()
            .set_modified(past)
            .unwrap();
    }
    let dry = h.run(&["gc", "--older-than", "1", "--dry-run"]);
    dry.assert_code(0);
    assert!(old.exists() && torn.exists(), "a dry run deletes nothing");
    // Not before this node's gc has seen it unreferenced for the grace period.
    assert!(dry.stdout.contains("0 would be deleted"), "{}", dry.stdout);
    assert!(
        dry.stdout.contains("1 unreferenced and old kept"),
        "{}",
        dry.stdout
    );
    assert!(
        dry.stdout
            .contains("1 temp files of manifests a crash left would be deleted (6 bytes)"),
        "{}",
        dry.stdout
    );
    // Old by its mtime (a writer's clock may be behind), it goes once this node's gc has
    // seen it unreferenced for the grace period by its own clock.
    let gc = h.run(&["gc", "--older-than", "1"]);
    gc.assert_code(0);
    assert!(old.exists(), "deleted at its first sight: {}", gc.stdout);
    assert!(
        gc.stdout
            .contains("1 unreferenced and old kept until this node has seen them so"),
        "{}",
        gc.stdout
    );
    let ledgers: Vec<_> = std::fs::read_dir(h.state.join("gc"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(ledgers.len(), 1, "{ledgers:?}");
    let seen = std::fs::read_to_string(&ledgers[0]).unwrap();
    let (hex, rest) = seen.trim().split_once(' ').unwrap();
    let (secs, version) = rest.split_once(' ').unwrap();
    assert_eq!(hex, "0".repeat(64));
    let day_earlier = secs.parse::<u64>().unwrap() - 86_400 - 1;
    std::fs::write(&ledgers[0], format!("{hex} {day_earlier} {version}\n")).unwrap();
    let gc = h.run(&["gc", "--older-than", "1"]);
    gc.assert_code(0);
    assert!(!old.exists(), "{}", gc.stdout);
    assert!(!torn.exists(), "{}", gc.stdout);
    assert!(young.exists(), "younger than the grace period");
    // What the job's manifest lists is still there and pulls.
    h.run(&["pull", "keep", h.path("p").to_str().unwrap()])
        .assert_code(0);
    // Retention: a finished job older than its period goes (0 days: at once).
    let mut h2 = h;
    h2.env
        .push(("C3_AGENT_RETENTION_SUCCEEDED_DAYS".into(), "0".into()));
    let swept = h2.run(&["gc"]);
    swept.assert_code(0);
    assert!(
        swept.stdout.contains("1 finished jobs removed"),
        "{}",
        swept.stdout
    );
    assert!(!h2.state.join("jobs/keep").exists());
}

/// What retention could not clean up is no silent success: a trash entry with a file system
/// mounted in it (a job's FUSE mount made during an earlier sweep) stays whole, and `gc`
/// says so and exits 1. Root only (mount); skipped where mounting is not allowed.
#[test]
fn gc_fails_when_retention_leaves_something_behind() {
    let h = Harness::file();
    let point = h.state.join("jobs/.trash/gone.1.2/work/data");
    let Some(_mounted) = crate::support::Tmpfs::mount(&point, None) else {
        return;
    };
    std::fs::write(point.join("f"), "keep").unwrap();
    let gc = h.run(&["gc"]);
    gc.assert_code(1);
    assert!(
        gc.stdout.contains("1 could not be cleaned up"),
        "{}",
        gc.stdout
    );
    assert!(
        gc.stderr.contains("a file system is mounted"),
        "{}",
        gc.stderr
    );
    assert_eq!(std::fs::read_to_string(point.join("f")).unwrap(), "keep");
}

/// How many files there are in the slow attempt: at a second a file, one at a time, its
/// final sync takes this many seconds.
const SLOW_FILES: usize = 40;

/// A harness whose uploads take a second a file, one at a time (`slow-upload`), and an
/// attempt of job `slow` whose final sync a stop cut (as on a node whose multi-TB output
/// does not fit the stop deadline): phase `finishing`, most of its output not stored.
fn cut_slow_attempt() -> Harness {
    let mut h = Harness::file();
    h.extra_toml.push_str(
        "[job]\nstop_deadline_secs = 3\n[sync]\nlive = false\n[upload]\nfiles_in_flight = 1\n",
    );
    h.env.push(("C3_AGENT_FAULT".into(), "slow-upload".into()));
    let script = format!(
        "for i in $(seq 1 {SLOW_FILES}); do echo $i > $C3_ARTIFACTS_DIR/f$i; done; touch ready; exec sleep 300"
    );
    let spec = h.spec(json!({"job_id": "slow", "command": ["sh", "-c", script]}));
    let child = h.spawn(&["run", "--job", spec.to_str().unwrap()]);
    let ready = h.workdir("slow").join("ready");
    wait_for("the job's files", Duration::from_secs(30), || {
        ready.exists().then_some(())
    });
    signal(child.id(), "TERM");
    let run = h.wait("run, stopped".into(), child);
    run.assert_code(4);
    assert!(
        run.stdout
            .contains("stopped before the final sync was done"),
        "{}",
        run.stdout
    );
    assert_eq!(phase(&h), "finishing");
    h
}

fn phase(h: &Harness) -> String {
    let record: Value = serde_json::from_slice(
        &std::fs::read(h.state.join("jobs/slow/attempts/1/run.json")).unwrap(),
    )
    .unwrap();
    record["phase"].as_str().unwrap_or_default().to_string()
}

/// How many files the attempt's manifest lists now (in progress or complete).
fn listed(h: &Harness) -> usize {
    h.object("jobs/slow/attempts/1/manifest.json")
        .map(|b| {
            serde_json::from_slice::<Value>(&b).unwrap()["files"]
                .as_array()
                .unwrap()
                .len()
        })
        .unwrap_or(0)
}

/// The hourly `recover` of a cut attempt with a large output was SIGTERMed by the
/// housekeeping unit's timeout mid-sync: it died at once, listed nothing of what it stored
/// that pass, and the next pass started over, for ever. A SIGTERM now stops it within a few
/// seconds at a safe point: what it stored is listed, the record stays `finishing`, and a
/// later `recover` finishes the attempt.
#[test]
fn a_sigterm_stops_recover_at_a_safe_point_and_the_next_one_goes_on() {
    let mut h = cut_slow_attempt();
    let before = listed(&h);
    let child = h.spawn(&["recover"]);
    // A few files land (a second each), then the stop.
    std::thread::sleep(Duration::from_secs(4));
    signal(child.id(), "TERM");
    let stopped = std::time::Instant::now();
    let recover = h.wait("recover, stopped".into(), child);
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "took {took:?}\n{}",
        recover.stderr
    );
    assert!(
        recover
            .stdout
            .contains("recover stopped before it was done")
            && recover.stdout.contains("slow"),
        "code {}\n--- stdout\n{}\n--- stderr\n{}",
        recover.code,
        recover.stdout,
        recover.stderr
    );
    assert_eq!(phase(&h), "finishing", "{}", recover.stderr);
    let kept = listed(&h);
    assert!(
        kept > before && kept < SLOW_FILES,
        "listed {before} before, {kept} after the stop\n{}",
        recover.stderr
    );
    // The next pass (a store back to speed) finishes it, with every file.
    h.env.clear();
    let done = h.run(&["recover"]);
    done.assert_code(4);
    assert_eq!(phase(&h), "done");
    let m = h.manifest("slow");
    assert_eq!(m["complete"], true);
    assert_eq!(listed(&h), SLOW_FILES);
    assert_eq!(h.terminal("slow")["state"], "CANCELED");
}

/// `recover --budget-secs` (the housekeeping unit's) stops by then as on a SIGTERM, so that
/// the unit's `gc` runs within its timeout; `gc` then works beside the attempt left
/// `finishing`, and takes none of what the cut pass stored.
#[test]
fn recover_stops_when_its_budget_is_spent_and_gc_runs_after() {
    let h = cut_slow_attempt();
    let started = std::time::Instant::now();
    let recover = h.run(&["recover", "--budget-secs", "4"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "took {took:?}\n{}",
        recover.stderr
    );
    assert!(
        recover.stdout.contains("its --budget-secs 4 were spent"),
        "code {}\n--- stdout\n{}\n--- stderr\n{}",
        recover.code,
        recover.stdout,
        recover.stderr
    );
    assert_eq!(phase(&h), "finishing");
    let kept = listed(&h);
    assert!(kept > 0 && kept < SLOW_FILES, "{kept}\n{}", recover.stderr);
    let gc = h.run(&["gc", "--older-than", "0"]);
    gc.assert_code(0);
    assert_eq!(listed(&h), kept);
    let mut h = h;
    h.env.clear();
    h.run(&["recover", "--budget-secs", "600"]).assert_code(4);
    assert_eq!(phase(&h), "done");
    assert_eq!(listed(&h), SLOW_FILES);
    // What the cut passes stored is still there: every listed file pulls.
    h.run(&["pull", "slow", h.path("p").to_str().unwrap()])
        .assert_code(0);
}
