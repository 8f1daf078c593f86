//! Finding a job's output: regular files under `artifacts/` and each output dir (contract §5).
//! Symlinks, sockets, FIFOs and devices are never followed or uploaded; each gets a warning.
//!
//! The walk goes from directory fd to directory fd (`openat` with `O_NOFOLLOW`), so a job
//! that swaps a directory for a symlink mid-walk cannot lead it outside the workdir, and a
//! file or directory the job's user could not read is skipped with a warning.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::dir::Dir;
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};

use crate::confine::{is_dir, is_regular, DirFd, JobReader};

/// What identifies one version of a file on disk; a change in any field means new content may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
}

impl FileStamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            size: meta.len(),
            mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            ctime_ns: meta.ctime() * 1_000_000_000 + meta.ctime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
            mode: meta.mode() & 0o7777,
        }
    }

    pub fn of_stat(st: &FileStat) -> Self {
        FileStamp {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            ctime_ns: st.st_ctime * 1_000_000_000 + st.st_ctime_nsec,
            ino: st.st_ino,
            dev: st.st_dev,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// A regular file found under a collected dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Relative to the workdir, `/`-separated: the manifest path.
    pub rel: String,
    pub abs: PathBuf,
    pub stamp: FileStamp,
}

#[derive(Debug, Default)]
pub struct Scan {
    /// Keyed (and so sorted) by manifest path; nested output dirs do not duplicate files.
    pub files: BTreeMap<String, LocalFile>,
    pub warnings: Vec<String>,
}

/// Walks `dirs` (relative to `workdir`) without following any symlink. With `reader`,
/// only what that user could read itself is collected.
pub fn scan(workdir: &Path, dirs: &[String], reader: Option<&JobReader>) -> Scan {
    let mut out = Scan::default();
    let root = match DirFd::open(workdir) {
        Ok(d) => d,
        Err(e) => {
            out.warnings.push(format!(
                "cannot open the workdir {}: {e}",
                workdir.display()
            ));
            return out;
        }
    };
    for dir in dirs {
        match root.open_dir(Path::new(dir)) {
            Ok(fd) => walk(workdir, fd, dir.trim_end_matches('/'), reader, &mut out),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV)
                ) =>
            {
                out.warnings.push(format!(
                    "output dir {dir} is not a directory (a symlink?); skipped"
                ))
            }
            Err(e) => out.warnings.push(format!("output dir {dir}: {e}; skipped")),
        }
    }
    out
}

fn walk(workdir: &Path, root: DirFd, root_rel: &str, reader: Option<&JobReader>, out: &mut Scan) {
    // An explicit stack: output trees can be deep, recursion depth is not ours to choose.
    let mut stack = vec![(root, root_rel.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        if let Some(reader) = reader {
            match crate::confine::fstat(&dir) {
                Ok(st) if reader.can_enter(&st) => {}
                Ok(_) => {
                    out.warnings
                        .push(format!("{rel}/ is not readable by the job's user; skipped"));
                    continue;
                }
                Err(e) => {
                    out.warnings.push(format!("cannot stat {rel}/: {e}"));
                    continue;
                }
            }
        }
        let names = match list(&dir) {
            Ok(n) => n,
            Err(e) => {
                out.warnings.push(format!("cannot read {rel}/: {e}"));
                continue;
            }
        };
        for name in names {
            let Some(utf8) = std::str::from_utf8(name.as_bytes()).ok() else {
                out.warnings.push(format!(
                    "{rel}/{}: file name is not UTF-8; skipped",
                    name.to_string_lossy()
                ));
                continue;
            };
            let child_rel = format!("{rel}/{utf8}");
            let st = match dir.stat(&name) {
                Ok(st) => st,
                // Deleted between readdir and stat: the job removed it, nothing to collect.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    out.warnings.push(format!("cannot stat {child_rel}: {e}"));
                    continue;
                }
            };
            if is_dir(&st) {
                match dir.open_dir(Path::new(&name)) {
                    Ok(fd) => stack.push((fd, child_rel)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => out.warnings.push(format!("cannot open {child_rel}/: {e}")),
                }
            } else if is_regular(&st) {
                if reader.is_some_and(|r| !r.can_read(&st)) {
                    out.warnings.push(format!(
                        "{child_rel} is not readable by the job's user; not uploaded"
                    ));
                    continue;
                }
                out.files.insert(
                    child_rel.clone(),
                    LocalFile {
                        abs: workdir.join(&child_rel),
                        rel: child_rel,
                        stamp: FileStamp::of_stat(&st),
                    },
                );
            } else {
                let symlink = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode)
                    & nix::sys::stat::SFlag::S_IFMT
                    == nix::sys::stat::SFlag::S_IFLNK;
                let kind = if symlink {
                    "a symlink"
                } else {
                    "not a regular file"
                };
                out.warnings
                    .push(format!("{child_rel} is {kind}; not uploaded"));
            }
        }
    }
}

/// The entry names of an open directory (without `.` and `..`).
fn list(dir: &DirFd) -> std::io::Result<Vec<std::ffi::OsString>> {
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_os_string());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_regular_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("artifacts/deep/er")).unwrap();
        std::fs::create_dir_all(w.join("out")).unwrap();
        std::fs::write(w.join("artifacts/deep/er/a.txt"), "a").unwrap();
        std::fs::write(w.join("out/b"), "b").unwrap();
        std::fs::write(w.join("elsewhere"), "x").unwrap();
        std::os::unix::fs::symlink(w.join("elsewhere"), w.join("artifacts/link")).unwrap();
        std::os::unix::fs::symlink(w, w.join("artifacts/dirlink")).unwrap();
        let s = scan(
            w,
            &[
                "artifacts".into(),
                "out".into(),
                "missing".into(),
                "artifacts/deep".into(),
            ],
            None,
        );
        let names: Vec<_> = s.files.keys().cloned().collect();
        assert_eq!(names, vec!["artifacts/deep/er/a.txt", "out/b"]);
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
    }
}
