//! The kernel's own answer to "may the job's user read this?", for file systems whose
//! permissions the mode bits and a POSIX ACL do not tell (NFSv4, CIFS, GPFS: an ACL of their
//! own, kept on the server). The calling thread takes the job's file-system identity (fsuid,
//! fsgid, groups: per thread in the kernel, unlike glibc's process-wide `setgroups`) for one
//! open, and gives it back before returning.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// How many checks were made, for the tests of the callers that should make them.
static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many checks [`may`] made in this process.
pub fn checks() -> usize {
    CHECKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The thread's file-system identity before [`AsUser::become_`], given back on drop.
struct AsUser {
    fsuid: libc::uid_t,
    fsgid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// `setfsuid`/`setfsgid` return the previous id and never fail loudly: asked with an id no
/// one may take (-1) they return the current one unchanged.
fn current_fsuid() -> libc::uid_t {
    // SAFETY: a plain syscall with an integer argument; -1 changes nothing.
    unsafe { libc::syscall(libc::SYS_setfsuid, -1i32 as libc::uid_t) as libc::uid_t }
}

fn current_fsgid() -> libc::gid_t {
    // SAFETY: as [`current_fsuid`].
    unsafe { libc::syscall(libc::SYS_setfsgid, -1i32 as libc::gid_t) as libc::gid_t }
}

/// This thread's groups, as the raw syscall sets them (glibc's wrapper sets every thread's).
fn set_thread_groups(groups: &[libc::gid_t]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`, which outlives the call.
    let r = unsafe { libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsUser {
    fn become_(uid: u32, gids: &[u32]) -> io::Result<AsUser> {
        let groups = nix::unistd::getgroups()
            .map_err(io::Error::from)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        let before = AsUser {
            fsuid: current_fsuid(),
            fsgid: current_fsgid(),
            groups,
        };
        // From here, a drop gives back whatever was changed.
        set_thread_groups(gids)?;
        let gid = gids.first().copied().unwrap_or(u32::MAX - 1);
        // SAFETY: plain syscalls with integer arguments.
        unsafe {
            libc::syscall(libc::SYS_setfsgid, gid);
            libc::syscall(libc::SYS_setfsuid, uid);
        }
        if current_fsgid() != gid || current_fsuid() != uid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "cannot take the job's file-system identity (no CAP_SETUID/CAP_SETGID?)",
            ));
        }
        Ok(before)
    }
}

impl Drop for AsUser {
    fn drop(&mut self) {
        // fsuid first: back at 0 it has its file capabilities again; CAP_SETGID it never lost.
        // SAFETY: plain syscalls with integer arguments.
        unsafe {
            libc::syscall(libc::SYS_setfsuid, self.fsuid);
            libc::syscall(libc::SYS_setfsgid, self.fsgid);
        }
        let groups = set_thread_groups(&self.groups);
        if current_fsuid() != self.fsuid || current_fsgid() != self.fsgid || groups.is_err() {
            // A thread of the root agent left with a job's identity would read and write as
            // it from then on, wherever the runtime sends it.
            eprintln!("c3-agent: cannot give back the thread's own file-system identity; aborting");
            std::process::abort();
        }
    }
}

/// Whether the user (`uid`, every group in `gids`) may read the open file or directory
/// `fd` (`want`: 0o4 read, 0o1 search, 0o5 both), by the kernel's check of an open made as
/// them: the file system's own rules (an NFSv4 ACL the server keeps) decide. An `Err` when
/// the identity cannot be taken.
pub fn may(fd: &impl AsFd, dir: bool, uid: u32, gids: &[u32], want: u16) -> io::Result<bool> {
    CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
    let _as = AsUser::become_(uid, gids)?;
    let denied = |e: nix::Error| match e {
        nix::Error::EACCES | nix::Error::EPERM => Ok(false),
        e => Err(io::Error::from(e)),
    };
    if want & 0o4 != 0 {
        let mut flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        if dir {
            flags |= OFlag::O_DIRECTORY;
        }
        // Through the fd's magic link: the very inode asked about, whatever its name is now.
        match nix::fcntl::open(link.as_str(), flags, Mode::empty()) {
            Ok(_) => {}
            Err(e) => return denied(e),
        }
    }
    if want & 0o1 != 0 && dir {
        // A lookup in the directory is what search permission is checked for.
        match nix::fcntl::openat(fd, ".", OFlag::O_PATH | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(_) => {}
            Err(e) => return denied(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    /// The kernel's answer for owner, group, other, as the mode bits give it on a local file
    /// system; and the thread is itself again after each: a root-only file reads.
    #[test]
    fn the_kernel_answers_as_the_user_and_the_thread_is_root_again() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        std::os::unix::fs::chown(&f, Some(4001), Some(4002)).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let secret = dir.path().join("root-only");
        std::fs::write(&secret, "s").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let file = std::fs::File::open(&f).unwrap();
        let groups_before = nix::unistd::getgroups().unwrap();
        for (uid, gids, want) in [
            (4001, vec![9], true),
            (4003, vec![9, 4002], true),
            (4003, vec![9], false),
            (4003, vec![], false),
        ] {
            assert_eq!(
                may(&file, false, uid, &gids, 0o4).unwrap(),
                want,
                "uid {uid} gids {gids:?}"
            );
            assert_eq!(current_fsuid(), 0);
            assert_eq!(current_fsgid(), 0);
            assert_eq!(nix::unistd::getgroups().unwrap(), groups_before);
            assert_eq!(std::fs::read_to_string(&secret).unwrap(), "s");
        }
        // A directory: listed (read) and passed through (search) apart.
        let d = dir.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(4001), Some(4002)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o711)).unwrap();
        let held = std::fs::File::open(&d).unwrap();
        assert!(may(&held, true, 4003, &[], 0o1).unwrap());
        assert!(!may(&held, true, 4003, &[], 0o5).unwrap());
        assert!(may(&held, true, 4001, &[], 0o5).unwrap());
    }
}
