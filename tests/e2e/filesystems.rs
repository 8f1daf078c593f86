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
            eprintln!("skipped: mounting btrfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).ok()?;
        let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
        if !ok(Command::new("truncate").args(["-s", "256M"]).arg(image))
            || !ok(Command::new(mkfs_btrfs()).arg("-q").arg(image))
        {
            eprintln!("skipped: no mkfs.btrfs here");
            return None;
        }
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir))
        {
            eprintln!("skipped: cannot loop-mount here");
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
