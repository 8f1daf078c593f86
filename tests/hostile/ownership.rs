//! Taking root's files: a spec must not point the agent (root) at a directory it would then
//! hand to the job user, and a file the job user could not read is never collected.

use serde_json::json;

use crate::common::{mode, not_root, open_harness, owner, snapshot, victim};
use crate::support::chmod;

#[test]
fn workdir_outside_jobs_root_is_a_spec_error() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    let jobs = h.path("jobs");
    std::fs::create_dir(&jobs).unwrap();
    h.extra_toml = format!("jobs_root = \"{}\"\n", jobs.display());
    let v = victim(&h);
    let before = snapshot(&v);
    let marker = h.path("launched");
    let run = h.run_job(json!({
        "job_id": "j", "user": "nobody", "workdir": v.display().to_string(),
        "command": ["touch", marker.display().to_string()],
    }));
    run.assert_code(2);
    assert!(run.stderr.contains("workdir"), "{}", run.stderr);
    assert!(!marker.exists(), "nothing may be launched");
    assert_eq!(owner(&v), 0, "the victim dir was given to the job user");
    assert_eq!(snapshot(&v), before);
}

/// Removes a directory tree the test may have caused to be created outside its temp dir.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn absolute_dataset_mount_outside_the_workdir_is_a_spec_error() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    h.run_job(json!({"job_id": "src", "command": ["sh", "-c", "echo d > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let marker = h.path("launched");
    // A name of this run's own, removed again should a regression create it.
    let etc_victim =
        std::path::PathBuf::from(format!("/etc/c3-hostile-victim-{}", std::process::id()));
    assert!(
        !etc_victim.exists(),
        "{} exists already",
        etc_victim.display()
    );
    let _cleanup = RemoveOnDrop(etc_victim.clone());
    for mount in [etc_victim.display().to_string(), v.display().to_string()] {
        let run = h.run_job(json!({
            "job_id": "j", "user": "nobody",
            "datasets": [{"ref": "/jobs/src", "mount": mount}],
            "command": ["touch", marker.display().to_string()],
        }));
        run.assert_code(2);
        assert!(
            run.stderr.contains("datasets[0].mount"),
            "mount {mount}: {}",
            run.stderr
        );
        assert!(!marker.exists(), "nothing may be launched");
    }
    assert!(!etc_victim.exists(), "a dataset was materialized in /etc");
    assert_eq!(snapshot(&v), before);
}

#[test]
fn existing_workdir_is_not_reowned_and_unreadable_files_are_not_collected() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let wd = h.workdir("j");
    std::fs::create_dir(&wd).unwrap();
    chmod(&wd, 0o755);
    let art = wd.join("artifacts");
    std::fs::create_dir(&art).unwrap();
    chmod(&art, 0o777);
    std::fs::write(art.join("secret"), "root only\n").unwrap();
    chmod(art.join("secret"), 0o600);
    std::fs::write(art.join("public"), "everyone\n").unwrap();
    chmod(art.join("public"), 0o644);

    let run = h.run_job(json!({
        "job_id": "j", "user": "nobody",
        "command": ["sh", "-c", "echo mine > $C3_ARTIFACTS_DIR/mine"],
    }));
    run.assert_code(0);
    let paths = h.manifest_paths("j");
    assert!(paths.contains(&"artifacts/mine".to_string()), "{paths:?}");
    assert!(paths.contains(&"artifacts/public".to_string()), "{paths:?}");
    assert!(
        !paths.contains(&"artifacts/secret".to_string()),
        "a file the job user cannot read was collected: {paths:?}"
    );
    let t = h.terminal("j");
    let warnings = t["warnings"].to_string();
    assert!(
        warnings.contains("secret"),
        "no warning names the skipped file: {t}"
    );
    assert_eq!(owner(&wd), 0, "an existing workdir was re-owned");
    assert_eq!(mode(&wd), 0o755, "an existing workdir's mode changed");
    assert_eq!(owner(&art), 0, "an existing artifacts dir was re-owned");
    assert_eq!(owner(&art.join("secret")), 0);
    assert_eq!(mode(&art.join("secret")), 0o600);
}

/// The default jobs_root is the state dir's jobs dir, where the run records live: a workdir
/// there would be made the job's, and a job owning a directory among the records could plant
/// one that a root `recover` acts on. Only the job's own default workdir is allowed there.
#[test]
fn a_workdir_among_the_agents_run_records_is_a_spec_error() {
    if not_root() {
        return;
    }
    let mut h = open_harness();
    let jobs = h.state.join("jobs");
    h.extra_toml = format!("jobs_root = \"{}\"\n", jobs.display());
    let marker = h.path("launched");
    for workdir in [
        jobs.join("plant"),
        jobs.join("other/work"),
        jobs.join("j"),
        jobs.join("j/attempts/7"),
    ] {
        let run = h.run_job(json!({
            "job_id": "j", "user": "nobody", "workdir": workdir.display().to_string(),
            "command": ["touch", marker.display().to_string()],
        }));
        run.assert_code(2);
        assert!(run.stderr.contains("`workdir`"), "{}", run.stderr);
        assert!(!workdir.exists(), "{} was made", workdir.display());
    }
    assert!(!marker.exists(), "nothing may be launched");
    // The default one still works.
    let own = jobs.join("j/work").display().to_string();
    h.run_job(json!({"job_id": "j", "user": "nobody", "workdir": own, "command": ["true"]}))
        .assert_code(0);
}

/// `run --job PATH` holds the scheduler's path to the same rule: a spec a job wrote (in a
/// directory it owns, or a file it owns, or behind a symlink it can change) never starts as
/// root; a root-owned spec in a sticky dir others write (`/tmp`) and behind root's symlink runs.
#[test]
fn a_spec_path_a_job_could_write_is_refused() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let marker = h.path("launched");
    let spec = json!({"job_id": "next", "command": ["touch", marker.display().to_string()]});
    let nobody = crate::common::nobody();
    let dir = h.path("jobs-dir");
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("job.json");
    std::fs::write(&path, spec.to_string()).unwrap();
    let run_spec = |p: &std::path::Path| h.run(&["run", "--job", p.to_str().unwrap()]);
    // The job owns the directory: it could have put the file there.
    std::os::unix::fs::chown(&dir, Some(nobody), None).unwrap();
    let run = run_spec(&path);
    run.assert_code(2);
    assert!(run.stderr.contains("owned by uid"), "{}", run.stderr);
    // The job owns the file.
    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    std::os::unix::fs::chown(&path, Some(nobody), None).unwrap();
    run_spec(&path).assert_code(2);
    // A symlink in a directory the job owns leads to a root-owned spec: the link is the job's.
    std::os::unix::fs::chown(&path, Some(0), None).unwrap();
    let theirs = h.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::symlink(&dir, theirs.join("link")).unwrap();
    std::os::unix::fs::chown(&theirs, Some(nobody), None).unwrap();
    run_spec(&theirs.join("link/job.json")).assert_code(2);
    // Root's, but its group (the job users') may write it.
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .or_else(|| nix::unistd::Group::from_name("nobody").unwrap())
        .unwrap()
        .gid;
    std::os::unix::fs::chown(&dir, Some(0), Some(nogroup.as_raw())).unwrap();
    crate::support::chmod(&dir, 0o775);
    run_spec(&path).assert_code(2);
    crate::support::chmod(&dir, 0o755);
    // A link a job planted in a sticky dir others write (`/tmp`) leads to a root spec.
    let tmp = h.path("tmp");
    std::fs::create_dir(&tmp).unwrap();
    crate::support::chmod(&tmp, 0o1777);
    std::os::unix::fs::symlink(&path, tmp.join("job.json")).unwrap();
    std::os::unix::fs::lchown(tmp.join("job.json"), Some(nobody), None).unwrap();
    run_spec(&tmp.join("job.json")).assert_code(2);
    assert!(!marker.exists(), "nothing may be launched");
    // Root's all the way, through a sticky dir others write and root's own symlink: runs.
    let sticky = h.path("sticky");
    std::fs::create_dir(&sticky).unwrap();
    crate::support::chmod(&sticky, 0o1777);
    std::fs::create_dir(sticky.join("specs")).unwrap();
    std::fs::copy(&path, sticky.join("specs/job.json")).unwrap();
    std::os::unix::fs::symlink(sticky.join("specs"), h.path("root-link")).unwrap();
    run_spec(&h.path("root-link/job.json")).assert_code(0);
    assert!(marker.exists());
}

/// `run --job-id ID` reads `<jobs_root>/ID/job.json`: a directory a job owns there (an earlier
/// job's workdir named after an id to come) must not supply the spec a later job starts with.
#[test]
fn a_spec_in_a_directory_a_job_owns_is_refused() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let marker = h.path("launched");
    let spec = json!({"job_id": "next", "command": ["touch", marker.display().to_string()]});
    let dir = h.path("next");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("job.json"), spec.to_string()).unwrap();
    std::os::unix::fs::chown(&dir, Some(crate::common::nobody()), None).unwrap();
    let run = h.run(&["run", "--job-id", "next"]);
    run.assert_code(2);
    assert!(run.stderr.contains("owned by uid"), "{}", run.stderr);
    // A symlink for the spec, or a FIFO, is refused at once too.
    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    std::fs::remove_file(dir.join("job.json")).unwrap();
    let elsewhere = h.path("elsewhere.json");
    std::fs::write(&elsewhere, spec.to_string()).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("job.json")).unwrap();
    h.run(&["run", "--job-id", "next"]).assert_code(2);
    std::fs::remove_file(dir.join("job.json")).unwrap();
    nix::unistd::mkfifo(
        &dir.join("job.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let fifo = crate::common::wait_within(
        "a FIFO spec",
        h.spawn(&["run", "--job-id", "next"]),
        std::time::Duration::from_secs(20),
    );
    fifo.assert_code(2);
    assert!(!marker.exists(), "nothing may be launched");
}

/// A spec may name another tenant's existing workdir under jobs_root: the agent (root) must
/// not take it as this job's (keep `.c3` there, remove its result, collect its files into
/// this job's manifest). Only a directory of root's or the job user's that no one else may
/// write is used; a root-owned one a scheduler made, and the job's own on a retry, still are.
#[test]
fn another_users_workdir_is_refused() {
    if not_root() {
        return;
    }
    use std::os::unix::fs::chown;
    let h = open_harness();
    // Tenant B's workdir: B's (a uid no account needs), shut, with readable artifacts.
    let b = h.workdir("b");
    std::fs::create_dir_all(b.join("artifacts")).unwrap();
    std::fs::create_dir_all(b.join(".c3")).unwrap();
    std::fs::write(b.join("artifacts/weights"), "B's\n").unwrap();
    std::fs::write(b.join(".c3/result.json"), "{\"b\":1}").unwrap();
    chmod(b.join("artifacts"), 0o755);
    chmod(b.join("artifacts/weights"), 0o644);
    for p in [
        "",
        "artifacts",
        "artifacts/weights",
        ".c3",
        ".c3/result.json",
    ] {
        chown(b.join(p), Some(4242), Some(4242)).unwrap();
    }
    chmod(&b, 0o700);
    // A root-owned directory anyone may write, with a workdir in it.
    let shared = h.path("shared");
    std::fs::create_dir_all(shared.join("w")).unwrap();
    chmod(&shared, 0o777);
    let marker = h.path("launched");
    for (id, workdir) in [("a", &b), ("s", &shared.join("w"))] {
        let before = snapshot(workdir);
        let run = h.run_job(json!({
            "job_id": id, "user": "nobody", "workdir": workdir.display().to_string(),
            "command": ["touch", marker.display().to_string()],
        }));
        run.assert_code(6);
        assert!(
            run.stderr.contains("workdir") && run.stderr.contains("refusing another user's"),
            "{}",
            run.stderr
        );
        assert!(!marker.exists(), "nothing may be launched");
        assert_eq!(snapshot(workdir), before, "the refused workdir was touched");
        if let Some(m) = h.object(&format!("jobs/{id}/manifest.json")) {
            let m: serde_json::Value = serde_json::from_slice(&m).unwrap();
            assert_eq!(m["files"], json!([]), "another user's files collected");
        }
    }
    // Legit: a root-owned workdir a scheduler made (in a team's group-writable dir, made with
    // umask 002), and the job's own on a retry.
    let team = h.path("team");
    std::fs::create_dir(&team).unwrap();
    chown(&team, Some(0), Some(4243)).unwrap();
    chmod(&team, 0o2775);
    let teams = team.join("t");
    std::fs::create_dir(&teams).unwrap();
    chmod(&teams, 0o755);
    h.run_job(json!({
        "job_id": "t", "user": "nobody", "workdir": teams.display().to_string(),
        "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"],
    }))
    .assert_code(0);
    // The workdir itself writable by the team: a member could plant its outputs.
    let open = team.join("o");
    std::fs::create_dir(&open).unwrap();
    chown(&open, Some(0), Some(4243)).unwrap();
    chmod(&open, 0o775);
    h.run_job(json!({
        "job_id": "o", "user": "nobody", "workdir": open.display().to_string(),
        "command": ["true"],
    }))
    .assert_code(6);
    let pre = h.workdir("p");
    std::fs::create_dir(&pre).unwrap();
    chmod(&pre, 0o755);
    for attempt in 1..=2 {
        for id in ["p", "own"] {
            h.run_job(json!({
                "job_id": id, "attempt": attempt, "user": "nobody",
                "command": ["sh", "-c", "echo x > $C3_ARTIFACTS_DIR/x"],
            }))
            .assert_code(0);
        }
    }
    assert_eq!(owner(&h.workdir("own")), crate::common::nobody());
}

/// In a workdir other users may search (a scheduler's root-owned 0755 one), the directories
/// the agent makes for a job with a user (output dirs, `.c3`, dataset mounts) are that
/// user's and private: another tenant cannot read the job's artifacts or result.
#[test]
fn the_dirs_the_agent_makes_for_a_user_job_are_private() {
    if not_root() {
        return;
    }
    let h = open_harness();
    h.run_job(json!({"job_id": "src", "command": ["sh", "-c", "echo d > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let wd = h.workdir("j");
    std::fs::create_dir(&wd).unwrap();
    chmod(&wd, 0o755);
    h.run_job(json!({
        "job_id": "j", "user": "nobody", "output": ["out/deep"],
        "datasets": [{"ref": "/jobs/src", "mount": "in/src"}],
        "command": ["sh", "-c", "echo r > $C3_ARTIFACTS_DIR/r"],
    }))
    .assert_code(0);
    for dir in ["artifacts", "out", "out/deep", ".c3", "in", "in/src"] {
        let p = wd.join(dir);
        assert_eq!(owner(&p), crate::common::nobody(), "{dir}");
        assert_eq!(mode(&p), 0o700, "{dir} may be read by other users");
    }
}

/// Tenant B's job ran earlier in a root-owned workdir a scheduler reuses, and left its private
/// `results/` (its checkpoint in it) and its `.c3`. Tenant A's job in the same workdir, with a
/// dataset mounted at `results`: root replaced B's checkpoint with A's file, in B's directory,
/// and A's agent kept its socket and result in B's `.c3` (B could swap the socket A's job
/// talks to). B's directory is refused as the mount, B's `.c3` moved aside, B's files as
/// they were.
#[test]
fn another_users_dirs_in_a_shared_workdir_are_never_written() {
    if not_root() {
        return;
    }
    use std::os::unix::fs::chown;
    let h = open_harness();
    h.run_job(
        json!({"job_id": "src", "command": ["sh", "-c", "echo A > $C3_ARTIFACTS_DIR/model.pt"]}),
    )
    .assert_code(0);
    let wd = h.workdir("a");
    std::fs::create_dir_all(wd.join("results")).unwrap();
    std::fs::create_dir_all(wd.join(".c3")).unwrap();
    std::fs::write(wd.join("results/model.pt"), "B's\n").unwrap();
    std::fs::write(wd.join(".c3/mine"), "B's\n").unwrap();
    for p in ["results", "results/model.pt", ".c3", ".c3/mine"] {
        chown(wd.join(p), Some(4242), Some(4242)).unwrap();
    }
    chmod(wd.join("results"), 0o700);
    chmod(&wd, 0o755);
    let run = h.run_job(json!({
        "job_id": "a", "user": "nobody",
        "datasets": [{"ref": "/jobs/src", "mount": "results"}],
        "command": ["true"],
    }));
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("user 4242's"), "{}", run.stderr);
    assert_eq!(
        std::fs::read_to_string(wd.join("results/model.pt")).unwrap(),
        "B's\n"
    );
    assert_eq!(owner(&wd.join("results/model.pt")), 4242);
    let names: Vec<String> = std::fs::read_dir(&wd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let aside = names
        .iter()
        .find(|n| n.starts_with(".c3-aside-"))
        .unwrap_or_else(|| panic!("B's .c3 not moved aside: {names:?}\n{}", run.stderr));
    assert_eq!(
        std::fs::read_to_string(wd.join(aside).join("mine")).unwrap(),
        "B's\n"
    );
    assert_eq!(owner(&wd.join(aside)), 4242);
    assert_eq!(owner(&wd.join(".c3")), crate::common::nobody());
}

/// The same for a job without a user (it runs as root) in a reused root-owned workdir: another
/// user's `.c3` was kept (that user could write the root job's result while it ran) and its
/// output dir collected as the root job's (that user planting files in it). The `.c3` is
/// moved aside and made root's; an output dir of another user's is refused.
#[test]
fn another_users_dirs_are_never_a_root_jobs() {
    if not_root() {
        return;
    }
    use std::os::unix::fs::chown;
    let h = open_harness();
    let wd = h.workdir("r");
    std::fs::create_dir_all(wd.join(".c3")).unwrap();
    chown(wd.join(".c3"), Some(4242), Some(4242)).unwrap();
    chmod(&wd, 0o755);
    let script = "echo '{\"mine\": 1}' > $C3_RESULT_FILE";
    h.run_job(json!({"job_id": "r", "command": ["sh", "-c", script]}))
        .assert_code(0);
    assert_eq!(owner(&wd.join(".c3")), 0, "another user's .c3 kept");
    let aside = std::fs::read_dir(&wd)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(".c3-aside-"));
    assert!(aside.is_some(), "the other user's .c3 was not moved aside");
    let wd = h.workdir("r2");
    std::fs::create_dir_all(wd.join("artifacts")).unwrap();
    std::fs::write(wd.join("artifacts/planted"), "4242's\n").unwrap();
    chown(wd.join("artifacts"), Some(4242), Some(4242)).unwrap();
    let run = h.run_job(json!({"job_id": "r2", "command": ["true"]}));
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("user 4242's"), "{}", run.stderr);
    assert!(h.object("jobs/r2/manifest.json").is_none());
}

/// A job without a user (it runs as root) with a dataset, in a reused root-owned 0755
/// workdir: another user's directory below the mount (their job's output there) got root's
/// copy of the dataset, theirs to read and to swap under the root job; their file with the
/// dataset's bytes was kept, theirs to rewrite. The first is refused, the second replaced by
/// root's own; the mount is private, as a user job's is.
#[test]
fn a_root_jobs_dataset_is_never_in_another_users_dirs() {
    if not_root() {
        return;
    }
    use std::os::unix::fs::chown;
    let h = open_harness();
    h.run_job(json!({"job_id": "dsrc", "command": ["sh", "-c", "echo A > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let dataset = json!([{"ref": "/jobs/dsrc", "mount": "data"}]);
    let wd = h.workdir("rd");
    std::fs::create_dir_all(wd.join("data/artifacts")).unwrap();
    chown(wd.join("data/artifacts"), Some(4242), Some(4242)).unwrap();
    chmod(&wd, 0o755);
    let run = h.run_job(json!({"job_id": "rd", "datasets": dataset, "command": ["true"]}));
    assert_ne!(run.code, 0, "{}", run.stderr);
    assert!(run.stderr.contains("user 4242's"), "{}", run.stderr);
    assert!(
        !wd.join("data/artifacts/f").exists(),
        "root wrote the dataset into another user's directory"
    );
    let wd = h.workdir("rd2");
    std::fs::create_dir_all(wd.join("data/artifacts")).unwrap();
    std::fs::write(
        wd.join("data/artifacts/f"),
        "A
",
    )
    .unwrap();
    chown(wd.join("data/artifacts/f"), Some(4242), Some(4242)).unwrap();
    chmod(&wd, 0o755);
    h.run_job(json!({"job_id": "rd2", "datasets": dataset, "command": ["true"]}))
        .assert_code(0);
    assert_eq!(
        owner(&wd.join("data/artifacts/f")),
        0,
        "another user's file kept"
    );
    let wd = h.workdir("rd3");
    std::fs::create_dir(&wd).unwrap();
    chmod(&wd, 0o755);
    h.run_job(json!({"job_id": "rd3", "datasets": dataset, "command": ["true"]}))
        .assert_code(0);
    for dir in ["data", "artifacts", ".c3"] {
        assert_eq!(
            mode(&wd.join(dir)),
            0o700,
            "{dir} may be read by other users"
        );
    }
}

/// Root's vetting of a job without a user stays with workdirs below `jobs_root`: a root
/// `pull` into a DEST holding another user's directory, and a root quick run in another
/// user's tree, still use their directories (their owner may swap them anyway).
#[test]
fn roots_own_pull_and_quick_run_use_another_users_dirs() {
    if not_root() {
        return;
    }
    use std::os::unix::fs::chown;
    let h = open_harness();
    h.run_job(json!({"job_id": "src2", "command": ["sh", "-c", "echo A > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    let dest = h.path("alice-out");
    std::fs::create_dir_all(dest.join("artifacts")).unwrap();
    chown(&dest, Some(4242), Some(4242)).unwrap();
    chown(dest.join("artifacts"), Some(4242), Some(4242)).unwrap();
    h.run(&["pull", "src2", dest.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(dest.join("artifacts/f")).unwrap(),
        "A\n"
    );
    // Outside the harness's dir, which is its `jobs_root`.
    let outside = tempfile::tempdir().unwrap();
    let tree = outside.path().join("alice-tree");
    std::fs::create_dir_all(tree.join("artifacts")).unwrap();
    chown(&tree, Some(4242), Some(4242)).unwrap();
    chown(tree.join("artifacts"), Some(4242), Some(4242)).unwrap();
    let mut cmd = h.command(&[
        "run",
        "--job-id",
        "quickroot",
        "--",
        "sh",
        "-c",
        "echo q > $C3_ARTIFACTS_DIR/q",
    ]);
    cmd.current_dir(&tree);
    let run = h.wait(
        "quick run in another user's tree".into(),
        cmd.spawn().unwrap(),
    );
    run.assert_code(0);
}

/// In a team's group-writable directory (`root:team 2775`, accepted above a workdir), another
/// member may rename a running job's workdir: a rename needs write access to the parent only.
/// The job goes on in its own directory (its cwd is the inode, not the path), and so must
/// the agent: every scan, upload and the result read reach the directory opened at prepare,
/// wherever it now lies in that parent, not whatever the path names now.
#[test]
fn a_workdir_renamed_in_a_shared_dir_is_still_the_jobs() {
    if not_root() {
        return;
    }
    use std::time::Duration;
    let h = open_harness();
    let team = h.path("team");
    std::fs::create_dir(&team).unwrap();
    nix::unistd::chown(
        &team,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(4243)),
    )
    .unwrap();
    chmod(&team, 0o2775);
    let workdir = team.join("b");
    let go = h.path("go");
    // Relative paths only: the job's environment names the workdir by path, which the
    // rename takes away; its cwd stays.
    let script = format!(
        "echo x > artifacts/x; i=0; while [ ! -e '{}' ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; echo y > artifacts/y; echo '{{\"r\": 1}}' > .c3/result.json",
        go.display()
    );
    let agent = crate::common::spawn_job(
        &h,
        json!({
            "job_id": "b", "user": "nobody", "workdir": workdir.display().to_string(),
            "command": ["sh", "-c", script],
        }),
    );
    crate::support::wait_for("the job's first file", Duration::from_secs(20), || {
        workdir.join("artifacts/x").exists().then_some(())
    });
    // Root stands for the other member here: the rename is the same, and the agent must not
    // depend on who made it.
    let moved = team.join("b.x");
    std::fs::rename(&workdir, &moved).unwrap();
    std::fs::write(&go, "").unwrap();
    let run = crate::common::wait_within("the agent", agent, Duration::from_secs(60));
    run.assert_code(0);
    assert_eq!(h.terminal("b")["state"], "SUCCEEDED");
    assert_eq!(h.manifest("b")["complete"], true);
    assert_eq!(h.manifest("b")["result"], json!({"r": 1}));
    assert_eq!(h.manifest_paths("b"), vec!["artifacts/x", "artifacts/y"]);
    assert_eq!(
        std::fs::read_to_string(moved.join("artifacts/y")).unwrap(),
        "y\n"
    );
}
