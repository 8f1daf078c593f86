//! The kernel's own answer to "may the job's user read this?", for file systems whose
//! permissions the mode bits and a POSIX ACL do not tell (NFSv4, CIFS, GPFS: an ACL of their
//! own, kept on the server). The calling thread takes the job's file-system identity (fsuid,
//! fsgid, groups: per thread in the kernel, unlike glibc's process-wide `setgroups`) for one
//! open, and gives it back before returning.

use std::io;
use std::os::fd::AsFd;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// How many checks were made, for the tests of the callers that should make them.
static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many checks [`may`] made in this process.
pub fn checks() -> usize {
    CHECKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The thread's file-system identity before [`AsUser::become_`], given back on drop: only
/// what was changed (an agent without CAP_SETGID may not set even its own groups again).
struct AsUser {
    fsuid: libc::uid_t,
    fsgid: libc::gid_t,
    /// `Some` once this thread's groups were set to the user's.
    groups: Option<Vec<libc::gid_t>>,
    /// The process's dumpable flag: a change of fsuid clears it for the whole process.
    dumpable: libc::c_int,
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
        if !nix::unistd::geteuid().is_root() {
            // Not root: it cannot take another identity, and tried, it lost its own groups.
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the agent is not root: it cannot take the job's file-system identity",
            ));
        }
        let groups: Vec<libc::gid_t> = nix::unistd::getgroups()
            .map_err(io::Error::from)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        // SAFETY: prctl with PR_GET_DUMPABLE takes no pointer.
        let dumpable = unsafe { libc::prctl(libc::PR_GET_DUMPABLE) };
        let mut before = AsUser {
            fsuid: current_fsuid(),
            fsgid: current_fsgid(),
            groups: None,
            dumpable,
        };
        // From here, a drop gives back whatever was changed.
        set_thread_groups(gids)?;
        before.groups = Some(groups);
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
        let groups = self.groups.as_deref().map_or(Ok(()), set_thread_groups);
        if self.dumpable == 1 {
            // SAFETY: prctl with PR_SET_DUMPABLE takes an integer.
            unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1) };
        }
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
        match crate::confine::reopen(fd, flags) {
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

    /// This thread's effective capabilities without `cap` until the guard is dropped.
    struct WithoutCap([CapData; 2]);

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }

    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }

    const CAP_V3: u32 = 0x2008_0522;

    impl WithoutCap {
        fn drop_effective(cap: u32) -> WithoutCap {
            let mut head = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            let mut data = [CapData::default(); 2];
            // SAFETY: header and two data structs, as capget(2) v3 takes them.
            let r = unsafe { libc::syscall(libc::SYS_capget, &mut head, data.as_mut_ptr()) };
            assert_eq!(r, 0);
            let saved = data;
            data[(cap / 32) as usize].effective &= !(1 << (cap % 32));
            // SAFETY: as above; only this thread's sets change.
            let r = unsafe { libc::syscall(libc::SYS_capset, &mut head, data.as_ptr()) };
            assert_eq!(r, 0);
            WithoutCap(saved)
        }
    }

    impl Drop for WithoutCap {
        fn drop(&mut self) {
            let mut head = CapHeader {
                version: CAP_V3,
                pid: 0,
            };
            // SAFETY: as above; the permitted set still holds what is raised again.
            unsafe { libc::syscall(libc::SYS_capset, &mut head, self.0.as_ptr()) };
        }
    }

    /// An agent that may not take the job's identity (no CAP_SETGID: a hardened pod's root,
    /// a user namespace) gets an error to fall back on, its thread as it was: it aborted,
    /// giving back groups it had never changed (and may not set, even to its own).
    #[test]
    fn without_the_capabilities_the_check_fails_and_the_thread_is_as_it_was() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        let file = std::fs::File::open(&f).unwrap();
        let groups = nix::unistd::getgroups().unwrap();
        // CAP_SETGID, CAP_SETUID.
        for cap in [6u32, 7] {
            let without = WithoutCap::drop_effective(cap);
            assert!(may(&file, false, 4003, &[4004], 0o4).is_err(), "cap {cap}");
            drop(without);
            assert_eq!(current_fsuid(), 0);
            assert_eq!(current_fsgid(), 0);
            assert_eq!(nix::unistd::getgroups().unwrap(), groups);
        }
        assert!(may(&file, false, 0, &[0], 0o4).unwrap());
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
