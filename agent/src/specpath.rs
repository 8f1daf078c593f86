//! Whether a spec path the scheduler chose is root's alone: `run --job PATH` starts, as
//! root, whatever command the file names, so no one else may be able to change what the path
//! leads to, through any directory or symlink on the way.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed at most, as the kernel's own limit.
const MAX_LINKS: usize = 40;

/// Resolves `path` as the kernel would, checking that every directory an entry is read from
/// (symlinks followed) is root's (or the agent's user's) and writable by no one else, or
/// sticky (`/tmp`: its entries are checked in turn). Returns the real path, whose last
/// component the caller opens with `O_NOFOLLOW` and checks on the fd. Checked top down, a
/// directory found safe cannot be swapped afterwards by anyone but root.
pub fn resolve_root_alone(path: &Path) -> Result<PathBuf, String> {
    walk(path, false).map(|(real, _)| real)
}

/// [`resolve_root_alone`] as far as it goes: the real path of the first directory that is
/// not root's alone (or of the last one that exists), and the rest of `path` below it. Root
/// may follow no symlink in that rest (whoever may write there could plant one): the caller
/// opens the directory returned with `O_NOFOLLOW` and walks the rest from its fd.
/// A `..` in the rest takes back the name before it, as the kernel would where that is a
/// directory and no symlink (the only kind the caller goes through; `absolute` keeps the
/// working directory's real path), and never goes above the directory returned: a relative
/// DEST of `../out` from a directory below a user's came back with its `..`, refused by the
/// walk as no plain relative path.
pub fn resolve_root_alone_prefix(path: &Path) -> Result<(PathBuf, PathBuf), String> {
    let (real, todo) = walk(path, true)?;
    let mut rest = PathBuf::new();
    for name in todo {
        if name == ".." {
            if !rest.pop() {
                return Err(format!(
                    "{}: its `..` climbs above {}, a directory root does not own alone, which root does not go through: give it as an absolute path without `..`",
                    path.display(),
                    real.display()
                ));
            }
        } else {
            rest.push(name);
        }
    }
    Ok((real, rest))
}

/// The walk of [`resolve_root_alone`]; with `stop`, a missing entry or a directory that is
/// not root's alone ends it, and what is left of the path comes back.
fn walk(path: &Path, stop: bool) -> Result<(PathBuf, VecDeque<OsString>), String> {
    let absolute = std::path::absolute(path).map_err(|e| e.to_string())?;
    let mut todo: VecDeque<OsString> = parts(&absolute);
    let mut cur = PathBuf::from("/");
    check_dir(&cur)?;
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        match name.to_str() {
            Some("/") => {
                cur = PathBuf::from("/");
                continue;
            }
            Some("..") => {
                cur.pop();
                continue;
            }
            _ => {}
        }
        let next = cur.join(&name);
        let meta = match std::fs::symlink_metadata(&next) {
            Ok(meta) => meta,
            Err(e) if stop && e.kind() == std::io::ErrorKind::NotFound => {
                todo.push_front(name);
                return Ok((cur, todo));
            }
            Err(e) => return Err(format!("{}: {e}", next.display())),
        };
        if meta.file_type().is_symlink() {
            // In a sticky dir others write (`/tmp`), anyone may plant a link: followed only if
            // it is root's, the agent's or the dir's owner's (the kernel's protected_symlinks).
            let parent =
                std::fs::symlink_metadata(&cur).map_err(|e| format!("{}: {e}", cur.display()))?;
            let sticky = parent.mode() & libc::S_ISVTX != 0;
            if sticky && !owned_by_us(meta.uid()) && meta.uid() != parent.uid() {
                return Err(format!(
                    "{} is a symlink of uid {} in a sticky directory others write",
                    next.display(),
                    meta.uid()
                ));
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(format!("{}: too many symlinks", path.display()));
            }
            let target =
                std::fs::read_link(&next).map_err(|e| format!("{}: {e}", next.display()))?;
            for part in parts(&target).into_iter().rev() {
                todo.push_front(part);
            }
            continue;
        }
        if !todo.is_empty() {
            match check_dir(&next) {
                Ok(()) => {}
                // Reached from a directory root's alone, it is this one for good.
                Err(_) if stop => return Ok((next, todo)),
                Err(e) => return Err(e),
            }
        }
        cur = next;
    }
    Ok((cur, todo))
}

/// A path's components as names, `/` standing for the root and `.` dropped.
fn parts(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::RootDir => Some("/".into()),
            Component::ParentDir => Some("..".into()),
            Component::Normal(n) => Some(n.to_os_string()),
            Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn open_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn owned_by_us(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

fn check_dir(dir: &Path) -> Result<(), String> {
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    // A sticky dir others write (`/tmp`) passes: its entries are checked in turn.
    let sticky = m.mode() & libc::S_ISVTX != 0 && owned_by_us(m.uid());
    let fd = open_dir(dir)?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| format!("{}: {e}", dir.display()))?;
    if sticky
        || c3_runtime::statedir::root_alone(&fd, &st)
            .map_err(|e| format!("{}: {e}", dir.display()))?
    {
        return Ok(());
    }
    Err(format!(
        "its directory {} is owned by uid {} gid {} (mode {:o}), not root's alone: a job may have written it",
        dir.display(),
        m.uid(),
        m.gid(),
        m.mode() & 0o7777
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_resolves_as_the_kernel_resolves_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::create_dir_all(real.join("a/b")).unwrap();
        std::fs::write(real.join("a/b/job.json"), "{}").unwrap();
        std::os::unix::fs::symlink("a/b", real.join("rel")).unwrap();
        std::os::unix::fs::symlink(real.join("rel"), real.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../a/./b/job.json", real.join("a/b/up")).unwrap();
        for p in [
            "rel/job.json",
            "abs/job.json",
            "a/b/up",
            "a/../a/b/job.json",
        ] {
            assert_eq!(
                resolve_root_alone(&real.join(p)).unwrap(),
                real.join("a/b/job.json"),
                "{p}"
            );
        }
        std::os::unix::fs::symlink("loop", real.join("loop")).unwrap();
        assert!(resolve_root_alone(&real.join("loop/x")).is_err());
    }

    /// `c3-agent pull JOB ../out` as root, from a directory below one a user may write: the
    /// rest below that one came back with its `..`, which the walk from its fd refused as no
    /// plain relative path.
    #[test]
    fn a_dotdot_below_a_users_directory_is_taken_within_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(dir.path()).unwrap();
        let user = real.join("u");
        std::fs::create_dir_all(user.join("proj")).unwrap();
        std::fs::set_permissions(&user, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(
            resolve_root_alone_prefix(&user.join("proj/../out")).unwrap(),
            (user.clone(), PathBuf::from("out"))
        );
        assert_eq!(
            resolve_root_alone_prefix(&user.join("proj/new/../../out/x")).unwrap(),
            (user.clone(), PathBuf::from("out/x"))
        );
        let e = resolve_root_alone_prefix(&user.join("proj/../../out")).unwrap_err();
        assert!(e.contains("`..`") && e.contains("absolute path"), "{e}");
    }
}
