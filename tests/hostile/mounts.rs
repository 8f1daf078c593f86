//! A job may mount a FUSE file system of its own below an output dir (`fusermount`, with
//! `allow_other` where the node allows it) and never answer its kernel: each stat, open or
//! listing the root agent sent it would wait for ever, and the job's terminal status with it.
//! The agent never looks into one; what it holds is named and counted as not uploaded.

use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::common::{not_root, spawn_job, wait_within};
use crate::support::{wait_for, Harness, BIN};

/// A user's FUSE mount whose server never reads its device: every request to it waits until the
/// device is closed (dropping this aborts the connection, then detaches the mount).
struct SilentFuse {
    dev: Option<OwnedFd>,
    at: PathBuf,
}

impl SilentFuse {
    /// `rootmode`: the mount root's type and mode, octal (`40755` a directory, `100644` a file).
    fn mount(at: &Path, rootmode: &str) -> Option<SilentFuse> {
        let dev = crate::common::mount_fuse(at, rootmode, 65534)?;
        Some(SilentFuse {
            dev: Some(dev),
            at: at.to_path_buf(),
        })
    }
}

impl Drop for SilentFuse {
    fn drop(&mut self) {
        drop(self.dev.take());
        let target = CString::new(self.at.as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn a_fuse_mount_that_never_answers_is_not_looked_into() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let work = h.workdir("fm");
    let script = "cd $C3_ARTIFACTS_DIR && mkdir sub && echo keep > keep.txt && : > plain && \
                  touch ../ready && while [ ! -e ../go ]; do sleep 0.05; done; sleep 1";
    let child = spawn_job(&h, json!({"job_id": "fm", "command": ["sh", "-c", script]}));
    wait_for("the job's dirs", Duration::from_secs(30), || {
        work.join("ready").exists().then_some(())
    });
    let arts = work.join("artifacts");
    let (Some(dir), Some(file)) = (
        SilentFuse::mount(&arts.join("sub"), "40755"),
        SilentFuse::mount(&arts.join("plain"), "100644"),
    ) else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        std::fs::write(work.join("go"), "").unwrap();
        let _ = wait_within("run fm", child, Duration::from_secs(60));
        return;
    };
    std::fs::write(work.join("go"), "").unwrap();
    let run = wait_within("run fm", child, Duration::from_secs(60));
    drop((dir, file));
    // Exit 0 with files not uploaded: UPLOAD_ERROR.
    run.assert_code(3);
    for place in ["artifacts/sub", "artifacts/plain"] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.contains(place) && l.contains("of type fuse is mounted there")),
            "{place} not named\n{}",
            run.stderr
        );
    }
    let paths = h.manifest_paths("fm");
    assert!(
        paths.contains(&"artifacts/keep.txt".to_string()),
        "{paths:?}"
    );
}

/// An output dir that is itself a FUSE mount is not entered either; a file system only root
/// could have mounted below one (a tmpfs here) is walked like the rest.
#[test]
fn an_output_dir_that_is_a_fuse_mount_is_not_looked_into() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let work = h.workdir("fo");
    let script =
        "mkdir $C3_ARTIFACTS_DIR/tmp && touch ready && while [ ! -e go ]; do sleep 0.05; done; \
                  echo kept > $C3_ARTIFACTS_DIR/tmp/f && sleep 1";
    let spec = json!({"job_id": "fo", "output": ["out"], "command": ["sh", "-c", script]});
    let child = spawn_job(&h, spec);
    wait_for("the job's dirs", Duration::from_secs(30), || {
        work.join("ready").exists().then_some(())
    });
    let tmp = work.join("artifacts/tmp");
    let tmpfs = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "c3test", tmp.to_str().unwrap()])
        .status()
        .is_ok_and(|s| s.success());
    let out = SilentFuse::mount(&work.join("out"), "40755");
    std::fs::write(work.join("go"), "").unwrap();
    let run = wait_within("run fo", child, Duration::from_secs(60));
    if tmpfs {
        let _ = std::process::Command::new("umount").arg(&tmp).status();
    }
    let Some(_out) = out else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        return;
    };
    run.assert_code(3);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("out") && l.contains("of type fuse is mounted there")),
        "out/ not named\n{}",
        run.stderr
    );
    if tmpfs {
        let paths = h.manifest_paths("fo");
        assert!(paths.contains(&"artifacts/tmp/f".to_string()), "{paths:?}");
    }
}

/// `publish` of a path through a FUSE mount is refused at once: the agent's look at it never
/// reaches the mount's server, and live sync goes on.
#[test]
fn a_publish_through_a_fuse_mount_is_refused() {
    if not_root() {
        return;
    }
    let h = Harness::file();
    let work = h.workdir("fp");
    let script = format!(
        "mkdir $C3_ARTIFACTS_DIR/m && touch ready && while [ ! -e go ]; do sleep 0.05; done; \
         {BIN} publish $C3_ARTIFACTS_DIR/m/x 2> err; echo $? > rc; \
         echo later > $C3_ARTIFACTS_DIR/later && {BIN} publish $C3_ARTIFACTS_DIR/later; echo $? > rc2"
    );
    let child = spawn_job(&h, json!({"job_id": "fp", "command": ["sh", "-c", script]}));
    wait_for("the job's dirs", Duration::from_secs(30), || {
        work.join("ready").exists().then_some(())
    });
    let fuse = SilentFuse::mount(&work.join("artifacts/m"), "40755");
    std::fs::write(work.join("go"), "").unwrap();
    let run = wait_within("run fp", child, Duration::from_secs(60));
    let Some(_fuse) = fuse else {
        crate::support::skip("cannot mount a FUSE file system here (no /dev/fuse?)");
        return;
    };
    let read = |name: &str| std::fs::read_to_string(work.join(name)).unwrap_or_default();
    assert_ne!(read("rc").trim(), "0", "published through the mount");
    assert!(read("err").contains("fuse"), "{}", read("err"));
    assert_eq!(
        read("rc2").trim(),
        "0",
        "publish after it failed\n{}",
        run.stderr
    );
}
