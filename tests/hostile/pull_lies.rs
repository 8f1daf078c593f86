//! A store that lies (a blob bigger than its manifest says, a manifest too big to read) must
//! not make `pull` or `ls` write or hold more than they were promised.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{files_under, not_root, wait_within};
use crate::support::{sha256_hex, Harness};

#[test]
fn pull_stops_at_the_manifest_size_of_an_oversized_blob() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    // A real job gives a real manifest entry for "abc" (sha256 and blake3).
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/big"]}),
    )
    .assert_code(0);
    let mut manifest = h.manifest("real");
    let sha = sha256_hex(b"abc");
    assert_eq!(manifest["files"][0]["sha256"], sha.as_str());
    assert_eq!(manifest["files"][0]["size"], 3);
    manifest["job_id"] = json!("liar");
    let path = h.object_path("jobs/liar/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    // The blob the manifest names: 20 MiB, not "abc".
    std::fs::write(
        h.object_path(&format!("blobs/sha256/{sha}")),
        vec![b'z'; 20 << 20],
    )
    .unwrap();

    // Watches `dest` while pull runs: a 20 MiB file written and deleted again also counts.
    let dest = h.path("dest");
    let mut child = h.spawn(&["pull", "liar", dest.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut biggest: Option<(PathBuf, u64)> = None;
    let look = |biggest: &mut Option<(PathBuf, u64)>| {
        for (file, size) in files_under(&dest) {
            if biggest.as_ref().is_none_or(|(_, s)| size > *s) {
                *biggest = Some((file, size));
            }
        }
    };
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        look(&mut biggest);
        std::thread::sleep(Duration::from_micros(500));
    }
    look(&mut biggest);
    let run = wait_within("pull liar", child, Duration::from_secs(1));
    assert_ne!(
        run.code, 0,
        "pull accepted a blob that is not what the manifest says\n{}",
        run.stderr
    );
    if let Some((file, size)) = biggest {
        assert!(
            size <= 4 << 20,
            "pull wrote {size} bytes to {} for a 3-byte file",
            file.display()
        );
    }
}

#[test]
fn ls_refuses_a_manifest_past_max_manifest_bytes() {
    if not_root() {
        return;
    }
    let mut h = Harness::file();
    let script =
        "i=0; while [ $i -lt 60 ]; do echo $i > $C3_ARTIFACTS_DIR/file$i; i=$((i+1)); done";
    h.run_job(json!({"job_id": "big", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let bytes = h.object("jobs/big/manifest.json").unwrap().len();
    assert!(bytes > 1000, "the manifest is only {bytes} bytes");
    h.run(&["ls", "big"]).assert_code(0);
    // The key is known, and a manifest within the limit lists fine.
    h.extra_toml = "[store]\nmax_manifest_bytes = 1000000\n".into();
    h.run(&["ls", "big"]).assert_code(0);

    h.extra_toml = "[store]\nmax_manifest_bytes = 1000\n".into();
    let run = h.run(&["ls", "big"]);
    assert_ne!(
        run.code, 0,
        "ls read a {bytes}-byte manifest past max_manifest_bytes = 1000"
    );
    let err = run.stderr.to_lowercase();
    assert!(
        err.contains("limit") || err.contains("too large") || err.contains("max_manifest_bytes"),
        "stderr does not name the limit: {}",
        run.stderr
    );
}

/// Copies job `real`'s manifest to job `liar`, changed by `edit`.
fn forge_manifest(h: &Harness, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut manifest = h.manifest("real");
    manifest["job_id"] = json!("liar");
    edit(&mut manifest);
    let path = h.object_path("jobs/liar/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
}

#[test]
fn a_dataset_bigger_than_the_free_space_is_refused_before_a_byte_is_written() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    // One entry whose size says 4 PiB (the blob is 3 bytes: the size alone is the lie).
    forge_manifest(&h, |m| m["files"][0]["size"] = json!(4u64 << 50));
    let marker = h.path("launched");
    let run = h.run_job(
        json!({"job_id": "eat", "command": ["touch", marker.display().to_string()],
        "datasets": [{"ref": "/jobs/liar", "mount": "in"}]}),
    );
    run.assert_code(6);
    assert!(!marker.exists(), "the script ran");
    let t = h.terminal("eat");
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap_or("")
            .contains("is free there"),
        "{t}"
    );
    assert!(crate::common::files_under(&h.workdir("eat").join("in")).is_empty());
    let dest = h.path("dest");
    let pulled = h.run(&["pull", "liar", dest.to_str().unwrap()]);
    assert_ne!(pulled.code, 0);
    assert!(pulled.stderr.contains("is free there"), "{}", pulled.stderr);
}

#[test]
fn an_in_progress_dataset_is_materialized_with_a_warning() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    forge_manifest(&h, |m| m["complete"] = json!(false));
    h.run_job(
        json!({"job_id": "resume", "command": ["cat", "in/artifacts/f"],
        "datasets": [{"ref": "/jobs/liar", "mount": "in"}]}),
    )
    .assert_code(0);
    let warnings = h.terminal("resume")["warnings"].to_string();
    assert!(warnings.contains("in-progress manifest"), "{warnings}");
}

/// An entry no agent writes: 5,000 directories deep, 0 bytes (the free-space check counts file
/// bytes). `pull` would make every directory as root before a byte is fetched.
#[test]
fn a_manifest_entry_deeper_than_any_agent_writes_is_refused_before_a_directory_is_made() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "real", "command": ["sh", "-c", ": > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    forge_manifest(&h, |m| {
        m["files"][0]["path"] = json!(format!("artifacts/{}f", "d/".repeat(5000)));
    });
    let dest = h.path("dest");
    let pulled = h.run(&["pull", "liar", dest.to_str().unwrap()]);
    assert_ne!(pulled.code, 0);
    assert!(pulled.stderr.contains("deeper than"), "{}", pulled.stderr);
    let made = walk_dirs(&dest);
    assert!(made < 10, "{made} directories made");
}

/// 0-byte files, each below its own chain of 60 directories (every entry within the depth
/// cap): the free-space check counted file bytes and one inode a file, so `pull` made
/// directories as root until the file system had no inode left (87 million for a forged
/// manifest of 256 MiB), the agent's state dir on it included.
#[test]
fn the_directories_a_manifest_asks_for_count_against_the_room() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    h.run_job(json!({"job_id": "real", "command": ["sh", "-c", ": > $C3_ARTIFACTS_DIR/f"]}))
        .assert_code(0);
    forge_manifest(&h, |m| {
        let one = m["files"][0].clone();
        let files: Vec<_> = (0..100)
            .map(|i| {
                let mut e = one.clone();
                e["path"] = json!(format!("artifacts/c{i}/{}f", "d/".repeat(60)));
                e
            })
            .collect();
        m["files"] = json!(files);
    });
    let dest = h.path("dest");
    let Some(_fs) = crate::support::Tmpfs::mount(&dest, Some("size=64m,nr_inodes=2000")) else {
        return;
    };
    let pulled = h.run(&["pull", "liar", dest.to_str().unwrap()]);
    assert_ne!(pulled.code, 0);
    assert!(pulled.stderr.contains("is free there"), "{}", pulled.stderr);
    let made = walk_dirs(&dest);
    assert!(made < 10, "{made} directories made");
}

/// A pull that finished (or broke off) and runs again, or an attempt that finds its dataset
/// in place: the files already there are not asked for room again. The check counted every
/// file, so a dataset of over half the free space failed on every attempt after the first.
#[test]
fn files_already_in_place_need_no_room_again() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let script = "head -c 5000000 /dev/urandom > $C3_ARTIFACTS_DIR/big";
    h.run_job(json!({"job_id": "real", "command": ["sh", "-c", script]}))
        .assert_code(0);
    let dest = h.path("dest");
    let Some(_fs) = crate::support::Tmpfs::mount(&dest, Some("size=8m")) else {
        return;
    };
    h.run(&["pull", "real", dest.to_str().unwrap()])
        .assert_code(0);
    let again = h.run(&["pull", "real", dest.to_str().unwrap()]);
    again.assert_code(0);
}

/// A manifest the store holds under another job's key (a cache or gateway that swapped keys,
/// a copy): its files are another job's, perhaps another tenant's.
#[test]
fn a_manifest_of_another_job_is_refused() {
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    let path = h.object_path("jobs/liar/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(h.object_path("jobs/real/manifest.json"), &path).unwrap();
    let dest = h.path("dest");
    let pulled = h.run(&["pull", "liar", dest.to_str().unwrap()]);
    assert_ne!(pulled.code, 0);
    assert!(pulled.stderr.contains("is job real's"), "{}", pulled.stderr);
    assert!(crate::common::files_under(&dest).is_empty());
}

/// `logs` read the store's manifest with no look at whose it was: a manifest copied or
/// swapped under this job's key showed another job's (another tenant's) log as this one's.
#[test]
fn logs_of_a_manifest_of_another_job_are_refused() {
    let h = Harness::file();
    h.run_job(json!({"job_id": "real", "command": ["echo", "secret"]}))
        .assert_code(0);
    let path = h.object_path("jobs/liar/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(h.object_path("jobs/real/manifest.json"), &path).unwrap();
    let shown = h.run(&["logs", "liar"]);
    assert_ne!(shown.code, 0);
    assert!(!shown.stdout.contains("secret"), "{}", shown.stdout);
    assert!(shown.stderr.contains("is job real's"), "{}", shown.stderr);
    // Another attempt's manifest of the right job is not this attempt's either.
    let path = h.object_path("jobs/real/attempts/2/manifest.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(h.object_path("jobs/real/attempts/1/manifest.json"), &path).unwrap();
    let shown = h.run(&["logs", "real", "--attempt", "2"]);
    assert_ne!(shown.code, 0);
    assert!(!shown.stdout.contains("secret"), "{}", shown.stdout);
    assert!(shown.stderr.contains("is attempt 1's"), "{}", shown.stderr);
}

/// An earlier attempt made a directory where a dataset file goes: the verified download was
/// left beside it as a `.c3-pull-*` temp file, and the attempt called retryable (it fails the
/// same way on every attempt, each leaving another copy).
#[test]
fn a_directory_where_a_dataset_file_goes_is_the_jobs_doing() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    let spec = |attempt: u32| {
        json!({"job_id": "planter", "attempt": attempt, "user": "nobody",
            "command": ["sh", "-c", "rm -f in/artifacts/f; mkdir -p in/artifacts/f/sub"],
            "datasets": [{"ref": "/jobs/real", "mount": "in"}]})
    };
    h.run_job(spec(1)).assert_code(0);
    let run = h.run_job(spec(2));
    assert_ne!(run.code, 0);
    let t = failed_status(&h, "planter", 2);
    assert_eq!(t["reason"], "DATASET_ERROR", "{t}");
    assert_eq!(t["retryable"], false, "{t}");
    let left: Vec<_> = crate::common::files_under(&h.workdir("planter").join("in"))
        .into_iter()
        .filter(|(f, _)| f.to_string_lossy().contains(".c3-pull-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// An earlier attempt left a symlink (or a file) where a dataset is mounted: the mount
/// directory cannot be made, the same on every attempt in that workdir, and the attempt was
/// called retryable (a scheduler retried it for ever). One level deeper the same is refused
/// as the job's doing, not retried.
#[test]
fn a_symlink_or_file_where_a_dataset_is_mounted_is_the_jobs_doing() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    h.run_job(
        json!({"job_id": "real", "command": ["sh", "-c", "printf abc > $C3_ARTIFACTS_DIR/f"]}),
    )
    .assert_code(0);
    for (job, plant) in [
        ("linker", "ln -s /tmp m"),
        ("filer", "printf x > m"),
        // A directory every user may write (an earlier attempt's `chmod -R 777`).
        ("opener", "mkdir m; chmod 777 m"),
    ] {
        let spec = |attempt: u32| {
            json!({"job_id": job, "attempt": attempt, "user": "nobody",
                "command": ["sh", "-c", format!("rm -rf m; {plant}")],
                "datasets": [{"ref": "/jobs/real", "mount": "m"}]})
        };
        h.run_job(spec(1)).assert_code(0);
        h.run_job(spec(2)).assert_code(6);
        let t = failed_status(&h, job, 2);
        assert_eq!(t["reason"], "DATASET_ERROR", "{job}: {t}");
        assert_eq!(t["retryable"], false, "{job}: {t}");
    }
}

/// The FAILED status an attempt reported.
fn failed_status(h: &Harness, job: &str, attempt: u32) -> serde_json::Value {
    let reports = h
        .state
        .join(format!("jobs/{job}/attempts/{attempt}/reports.jsonl"));
    std::fs::read_to_string(reports)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["body"].clone())
        .find(|b| b["state"] == "FAILED")
        .unwrap_or_else(|| panic!("attempt {attempt} of {job}: no FAILED status"))
}

fn walk_dirs(dir: &std::path::Path) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) && count < 100_000 {
                count += 1;
                stack.push(e.path());
            }
        }
    }
    count
}
