//! Opening a job's files without ever leaving the job's workdir.
//!
//! The agent may run as root while the job's files belong to the job's user, who could swap
//! any directory on the way for a symlink between our scan and our open. `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` makes the kernel refuse any such detour, so a job
//! can never make the agent read (and upload) a file it could not read itself.

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};

/// Opens `path` for reading. Below `root` no symlink is followed in any component;
/// elsewhere (the agent's own files) only the last component is protected.
pub fn open_read(root: Option<&Path>, path: &Path) -> std::io::Result<File> {
    if let Some(rel) = root.and_then(|r| path.strip_prefix(r).ok().map(|rel| (r, rel))) {
        let (root, rel) = rel;
        let dir = File::open(root)?;
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(&dir, rel, how) {
            Ok(fd) => return Ok(File::from(fd)),
            // Kernels before 5.6 (or a seccomp filter) lack openat2: the last-component check below.
            Err(Errno::ENOSYS) => {}
            Err(e) => return Err(e.into()),
        }
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits() | OFlag::O_NONBLOCK.bits())
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinked_directories_below_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("artifacts/real")).unwrap();
        std::fs::write(root.join("artifacts/real/f"), "ok").unwrap();
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("f"), "secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("artifacts/swapped")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), root.join("artifacts/link")).unwrap();

        assert!(open_read(Some(&root), &root.join("artifacts/real/f")).is_ok());
        assert!(
            open_read(Some(&root), &root.join("artifacts/swapped/f")).is_err(),
            "followed a symlinked dir"
        );
        assert!(
            open_read(Some(&root), &root.join("artifacts/link")).is_err(),
            "followed a symlinked file"
        );
        // Outside the root, only the last component is checked.
        assert!(open_read(Some(&root), &outside.join("f")).is_ok());
    }
}
