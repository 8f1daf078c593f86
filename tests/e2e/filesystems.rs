//! Filesystems other than the test machine's own: directories the agent creates are checked
//! by what they hold, not by a link count only ext4 and xfs keep.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::json;

use crate::support::Harness;

/// A loop-mounted btrfs at `dir`, unmounted on drop. None (and the test says why it did not
/// run) without root, `mkfs.btrfs` (scripts/test.sh installs btrfs-progs) or loop devices.
struct Btrfs(PathBuf);

impl Btrfs {
    fn mount(image: &Path, dir: &Path) -> Option<Btrfs> {
        if !nix::unistd::geteuid().is_root() {
            crate::support::skip("mounting btrfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).ok()?;
        let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("truncate").args(["-s", "256M"]).arg(image))
            || !ok(Command::new(mkfs_btrfs()).arg("-q").arg(image))
        {
            crate::support::skip("no mkfs.btrfs here");
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir))
        {
            crate::support::skip("cannot loop-mount here");
            return None;
        }
        Some(Btrfs(dir.to_path_buf()))
    }
}

/// In /usr/sbin, which a non-login PATH may lack.
fn mkfs_btrfs() -> &'static str {
    ["/usr/sbin/mkfs.btrfs", "/sbin/mkfs.btrfs"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("mkfs.btrfs")
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn jobs_and_their_datasets_run_on_btrfs() {
    let mut h = Harness::file();
    let Some(_fs) = Btrfs::mount(&h.path("btrfs.img"), &h.path("btr")) else {
        return;
    };
    h.state = h.path("btr/state");
    let work = |job: &str| h.path(&format!("btr/work-{job}")).display().to_string();
    // New directories everywhere: the workdir, artifacts/, an output dir, nested ones.
    let producer =
        "mkdir -p $C3_ARTIFACTS_DIR/a/b results/c && echo one > $C3_ARTIFACTS_DIR/a/b/f \
                    && for i in 1 2 3 4 5 6 7 8 9; do echo $i > results/c/$i; done";
    h.run_job(
        json!({"job_id": "producer", "command": ["sh", "-c", producer],
        "workdir": work("producer"), "output": ["results"]}),
    )
    .assert_code(0);
    assert_eq!(h.manifest_paths("producer").len(), 10);
    // The dataset's directories are made by the pull (eight downloads at once).
    let consumer = "cat in/prev/artifacts/a/b/f in/prev/results/c/9 > $C3_ARTIFACTS_DIR/got";
    h.run_job(
        json!({"job_id": "consumer", "command": ["sh", "-c", consumer],
        "workdir": work("consumer"), "datasets": [{"ref": "/jobs/producer", "mount": "in/prev"}]}),
    )
    .assert_code(0);
    let got = std::fs::read_to_string(h.path("btr/work-consumer/artifacts/got")).unwrap();
    assert_eq!(got, "one\n9\n");
}

/// A reflinked copy (`cp --reflink`, the default of `cp` on btrfs and XFS) costs the job no
/// data blocks and the root agent a whole read and hash: 10,000 copies of a 10 GiB file were
/// 100 TB for it. Past `upload.shared_budget_bytes` copies are refused by name, unread, and
/// what was stored stays within the budget and the originals.
#[test]
fn reflinked_copies_past_the_shared_budget_are_refused() {
    let mut h = Harness::file();
    let Some(_fs) = Btrfs::mount(&h.path("btrfs.img"), &h.path("btr")) else {
        return;
    };
    h.state = h.path("btr/state");
    let budget: u64 = 8 << 20;
    h.extra_toml = format!("[upload]\nshared_budget_bytes = {budget}\n");
    // A small file (one PUT) and a large one (staged), 100 copies of each.
    let script = "cd $C3_ARTIFACTS_DIR && head -c 3000000 /dev/urandom > s \
                  && head -c 20000000 /dev/urandom > l \
                  && for i in $(seq 100); do cp --reflink=always s s.$i && cp --reflink=always l l.$i; done";
    let work = h.path("btr/work-reflinks").display().to_string();
    let run =
        h.run_job(json!({"job_id": "reflinks", "command": ["sh", "-c", script], "workdir": work}));
    run.assert_code(3);
    let t = h.terminal("reflinks");
    assert_eq!(t["reason"], "UPLOAD_ERROR", "{t}");
    assert!(
        run.stderr.contains("upload.shared_budget_bytes"),
        "{}",
        run.stderr
    );
    let manifest = h.manifest("reflinks");
    let files = manifest["files"].as_array().unwrap();
    let stored: u64 = files.iter().map(|f| f["size"].as_u64().unwrap()).sum();
    assert!(
        stored <= budget + 23_000_000,
        "{} files, {stored} bytes stored past a budget of {budget}",
        files.len()
    );
    assert!(files.len() < 10, "{} of 202 stored", files.len());
}
