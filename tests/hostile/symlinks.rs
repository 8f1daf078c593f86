//! Writing as root through symlinks a job planted: attempt 1 of a job (as `nobody`) plants a
//! link in its workdir, attempt 2 of the same job shares that workdir; the agent (root) must
//! never write, chown or delete through the link.

use std::path::Path;

use serde_json::json;

use crate::common::{nobody, not_root, open_harness, owner, snapshot, victim};
use crate::support::Harness;

/// Runs job `src` (as root) whose only file is `artifacts/f` = "dataset\n".
fn dataset_source(h: &Harness) {
    h.run_job(
        json!({"job_id": "src", "command": ["sh", "-c", "echo dataset > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    assert_eq!(h.manifest_paths("src"), vec!["artifacts/f"]);
}

/// Attempt 1 of job `job`, as nobody, running `script` in its workdir; it must succeed.
fn plant(h: &Harness, job: &str, script: &str) {
    h.run_job(
        json!({"job_id": job, "attempt": 1, "user": "nobody", "command": ["sh", "-c", script]}),
    )
    .assert_code(0);
}

fn assert_untouched(victim: &Path, before: &[String]) {
    assert_eq!(
        snapshot(victim),
        before,
        "the victim dir changed (root wrote through a planted symlink)"
    );
    assert_eq!(owner(victim), 0, "the victim dir was re-owned");
}

#[test]
fn dataset_mount_that_is_a_planted_dir_symlink_is_refused() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    dataset_source(&h);
    plant(&h, "j", &format!("ln -s '{}' data", v.display()));
    assert!(std::fs::symlink_metadata(h.workdir("j").join("data"))
        .unwrap()
        .file_type()
        .is_symlink());
    let run = h.run_job(json!({
        "job_id": "j", "attempt": 2, "user": "nobody",
        "datasets": [{"ref": "/jobs/src", "mount": "data"}],
        "command": ["true"],
    }));
    run.assert_code(6);
    assert_untouched(&v, &before);
}

#[test]
fn dataset_file_that_is_a_planted_file_symlink_is_replaced_not_followed() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    dataset_source(&h);
    plant(
        &h,
        "j",
        &format!(
            "mkdir -p data/artifacts && ln -s '{}' data/artifacts/f",
            v.join("file").display()
        ),
    );
    let run = h.run_job(json!({
        "job_id": "j", "attempt": 2, "user": "nobody",
        "datasets": [{"ref": "/jobs/src", "mount": "data"}],
        "command": ["true"],
    }));
    run.assert_code(0);
    assert_untouched(&v, &before);
    let f = h.workdir("j").join("data/artifacts/f");
    let m = std::fs::symlink_metadata(&f).unwrap();
    assert!(
        m.file_type().is_file(),
        "{} is still not a regular file: {m:?}",
        f.display()
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "dataset\n");
    assert_eq!(owner(&f), nobody(), "the job's dataset copy belongs to it");
}

/// An output dir an earlier attempt's job replaced with a symlink (or a file, or a symlink
/// on the way to a nested one): moved aside, never followed, and the next attempt runs.
/// Refused, it failed every later attempt as the node's error, retryable, for ever.
#[test]
fn output_dir_that_is_a_planted_symlink_is_moved_aside() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    plant(
        &h,
        "j",
        &format!(
            "ln -s '{}' results && echo mine > deep && ln -s '{}' up",
            v.display(),
            v.display()
        ),
    );
    // Were a link followed and the victim given to nobody, this would write into it.
    let run = h.run_job(json!({
        "job_id": "j", "attempt": 2, "user": "nobody", "output": ["results", "deep", "up/sub"],
        "command": ["sh", "-c", "touch results/ckpt deep/a up/sub/b"],
    }));
    run.assert_code(0);
    assert!(!v.join("ckpt").exists());
    assert!(!v.join("sub").exists());
    assert_untouched(&v, &before);
    let w = h.workdir("j");
    for dir in ["results", "deep", "up/sub"] {
        let m = std::fs::symlink_metadata(w.join(dir)).unwrap();
        assert!(m.is_dir(), "{dir} is a real directory now");
        assert_eq!(
            std::os::unix::fs::MetadataExt::uid(&m),
            nobody(),
            "{dir} is the job's"
        );
    }
    // What the job had put there is kept beside, as it was.
    let aside: Vec<String> = std::fs::read_dir(&w)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("-aside-"))
        .collect();
    assert_eq!(aside.len(), 3, "{aside:?}");
    let kept = aside
        .iter()
        .find(|n| std::fs::read_to_string(w.join(n)).is_ok_and(|t| t == "mine\n"));
    assert!(kept.is_some(), "the job's file is kept aside: {aside:?}");
}

/// A symlink someone else made where an output dir goes (root's here: a scheduler's link
/// to a big disk) is not moved out of the way: refused by name, as before.
#[test]
fn an_output_dir_symlink_not_the_jobs_is_left_and_refused() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    plant(&h, "j", "true");
    let link = h.workdir("j").join("results");
    std::os::unix::fs::symlink(&v, &link).unwrap();
    let run = h.run_job(json!({
        "job_id": "j", "attempt": 2, "user": "nobody", "output": ["results"],
        "command": ["sh", "-c", "touch results/ckpt"],
    }));
    run.assert_code(6);
    assert!(
        std::fs::symlink_metadata(&link).unwrap().is_symlink(),
        "left in place"
    );
    assert!(!v.join("ckpt").exists());
    assert_untouched(&v, &before);
}

#[test]
fn planted_dot_c3_symlink_is_replaced_and_its_target_kept() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    std::fs::write(v.join("result.json"), "{\"victim\":true}\n").unwrap();
    let before = snapshot(&v);
    plant(
        &h,
        "j",
        &format!("rm -rf .c3 && ln -s '{}' .c3", v.display()),
    );
    let run = h.run_job(json!({
        "job_id": "j", "attempt": 2, "user": "nobody",
        "command": ["sh", "-c", "echo 7 > \"$C3_RESULT_FILE\""],
    }));
    run.assert_code(0);
    assert_untouched(&v, &before);
    assert_eq!(
        std::fs::read_to_string(v.join("result.json")).unwrap(),
        "{\"victim\":true}\n"
    );
    let c3 = h.workdir("j").join(".c3");
    assert!(
        std::fs::symlink_metadata(&c3).unwrap().is_dir(),
        ".c3 is a real directory again"
    );
}

/// A directory an attempt made at `.c3/result.json`: every later attempt failed before its
/// launch (the agent's unlink met EISDIR) and ended AGENT_ERROR.
#[test]
fn a_directory_at_the_result_path_does_not_fail_the_next_attempt() {
    if not_root() {
        return;
    }
    let h = open_harness();
    plant(
        &h,
        "rd",
        "rm -f .c3/result.json; mkdir -p .c3/result.json/x",
    );
    let run = h.run_job(json!({
        "job_id": "rd", "attempt": 2, "user": "nobody",
        "command": ["sh", "-c", "echo 7 > \"$C3_RESULT_FILE\""],
    }));
    run.assert_code(0);
    assert_eq!(
        std::fs::read_to_string(h.workdir("rd").join(".c3/result.json")).unwrap(),
        "7\n"
    );
}

#[test]
fn pull_refuses_a_destination_symlink_to_a_victim_dir() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    h.run_job(json!({
        "job_id": "src", "output": ["sub"],
        "command": ["sh", "-c", "mkdir -p sub/a/b && echo x > sub/a/b/file"],
    }))
    .assert_code(0);
    assert_eq!(h.manifest_paths("src"), vec!["sub/a/b/file"]);
    let dest = h.path("dest");
    std::fs::create_dir(&dest).unwrap();
    std::os::unix::fs::symlink(&v, dest.join("sub")).unwrap();
    let run = h.run(&["pull", "src", dest.to_str().unwrap()]);
    assert_ne!(
        run.code, 0,
        "pull wrote through a symlink in its destination\n{}",
        run.stderr
    );
    assert!(
        !v.join("a").exists(),
        "pull created files inside the victim"
    );
    assert_untouched(&v, &before);
}

/// `pull` as root made DEST with `create_dir_all` through the links on its way: a job's user
/// who may write a directory above DEST swaps a component for a link, and root creates (with
/// `--force`, replaces) files wherever it leads. Below a directory root's alone no link is
/// followed; a DEST made fresh in the job's directory is still fine.
#[test]
fn pull_follows_no_link_a_job_planted_above_its_destination() {
    if not_root() {
        return;
    }
    let h = open_harness();
    let v = victim(&h);
    let before = snapshot(&v);
    dataset_source(&h);
    let theirs = h.path("theirs");
    std::fs::create_dir(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(nobody()), Some(nobody())).unwrap();
    let link = theirs.join("link");
    std::os::unix::fs::symlink(&v, &link).unwrap();
    std::os::unix::fs::lchown(&link, Some(nobody()), Some(nobody())).unwrap();
    for dest in [link.join("dest"), link.clone()] {
        let run = h.run(&["pull", "--force", "src", dest.to_str().unwrap()]);
        assert_ne!(
            run.code,
            0,
            "pull into {} went through the job's link\n{}",
            dest.display(),
            run.stderr
        );
        assert!(run.stderr.contains("symlink"), "{}", run.stderr);
    }
    assert_untouched(&v, &before);
    let fresh = theirs.join("new/dest");
    h.run(&["pull", "src", fresh.to_str().unwrap()])
        .assert_code(0);
    assert_eq!(
        std::fs::read_to_string(fresh.join("artifacts/f")).unwrap(),
        "dataset\n"
    );
}
