//! Finding a job's output: regular files under `artifacts/` and each output dir (contract §5).
//! Symlinks, sockets, FIFOs and devices are never followed or uploaded; each gets a warning.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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

/// Walks `dirs` (relative to `workdir`) without following any symlink.
pub fn scan(workdir: &Path, dirs: &[String]) -> Scan {
    let mut out = Scan::default();
    for dir in dirs {
        let root = workdir.join(dir);
        match std::fs::symlink_metadata(&root) {
            Ok(m) if m.is_dir() => walk(&root, dir.trim_end_matches('/'), &mut out),
            Ok(_) => out.warnings.push(format!(
                "output dir {dir} is not a directory (a symlink?); skipped"
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => out.warnings.push(format!("output dir {dir}: {e}; skipped")),
        }
    }
    out
}

fn walk(root: &Path, root_rel: &str, out: &mut Scan) {
    // An explicit stack: output trees can be deep, recursion depth is not ours to choose.
    let mut stack = vec![(root.to_path_buf(), root_rel.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) => {
                out.warnings.push(format!("cannot read {rel}/: {e}"));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    out.warnings
                        .push(format!("cannot read an entry of {rel}/: {e}"));
                    continue;
                }
            };
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                out.warnings.push(format!(
                    "{rel}/{}: file name is not UTF-8; skipped",
                    name.to_string_lossy()
                ));
                continue;
            };
            let child_rel = format!("{rel}/{name}");
            let path = entry.path();
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(m) => m,
                // Deleted between readdir and stat: the job removed it, nothing to collect.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    out.warnings.push(format!("cannot stat {child_rel}: {e}"));
                    continue;
                }
            };
            let ft = meta.file_type();
            if ft.is_dir() {
                stack.push((path, child_rel));
            } else if ft.is_file() {
                out.files.insert(
                    child_rel.clone(),
                    LocalFile {
                        rel: child_rel,
                        abs: path,
                        stamp: FileStamp::of(&meta),
                    },
                );
            } else {
                let kind = if ft.is_symlink() {
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
        );
        let names: Vec<_> = s.files.keys().cloned().collect();
        assert_eq!(names, vec!["artifacts/deep/er/a.txt", "out/b"]);
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
    }
}
