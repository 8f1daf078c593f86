//! What a user's disk quota still lets it write on one file system. Root writes a dataset
//! for the job's user and then gives it the files: root passes every hard limit
//! (CAP_SYS_RESOURCE), and so does the chown, so nothing but the agent's own look keeps a
//! tenant within its quota on a shared scratch file system.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd};

/// Whose limit it is: a user's, or a group's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Whose {
    User(u32),
    Group(u32),
}

impl std::fmt::Display for Whose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Whose::User(id) => write!(f, "user {id}"),
            Whose::Group(id) => write!(f, "group {id}"),
        }
    }
}

/// What one hard limit still allows: `u64::MAX` where that kind has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    pub whose: Whose,
    pub bytes: u64,
    pub inodes: u64,
}

impl Left {
    /// The bytes left, in words.
    pub fn bytes_text(&self) -> String {
        if self.bytes == u64::MAX {
            "no block limit".to_string()
        } else {
            crate::display::human_bytes(self.bytes)
        }
    }

    /// The inodes left, in words ("no limit" for none).
    pub fn inodes_text(&self) -> String {
        if self.inodes == u64::MAX {
            "no inode limit".to_string()
        } else {
            format!("{} inodes", self.inodes)
        }
    }
}

/// The limits of `uid` and of `gid` on the file system of `dir` that are set, with what each
/// still allows (a soft limit's grace over: nothing). None set, quotas off, a file system without them (tmpfs, NFS, FUSE) or
/// a kernel that will not say: nothing, as if there were no quota (the free space is still
/// looked at).
pub fn left(dir: &impl AsFd, uid: u32, gid: u32) -> Vec<Left> {
    #[cfg(test)]
    if let Some(fake) = FAKE.with(|f| f.borrow().clone()) {
        return fake;
    }
    let now_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    [
        (libc::USRQUOTA, Whose::User(uid)),
        (libc::GRPQUOTA, Whose::Group(gid)),
    ]
    .into_iter()
    .filter_map(|(kind, whose)| {
        let id = match whose {
            Whose::User(id) | Whose::Group(id) => id,
        };
        get(dir.as_fd(), kind, id).and_then(|q| left_of(whose, &q, now_secs))
    })
    .collect()
}

#[cfg(test)]
thread_local! {
    /// What [`left`] answers on this thread instead of asking the kernel (tests on machines
    /// whose kernel has no quota format: `CONFIG_QFMT_V2` unset).
    pub(crate) static FAKE: std::cell::RefCell<Option<Vec<Left>>> = const { std::cell::RefCell::new(None) };
}

/// The quota's block unit (`QIF_DQBLKSIZE`): hard limits are counted in KiB, usage in bytes.
const QUOTA_BLOCK: u64 = 1024;
const QIF_BLIMITS: u32 = 1;
const QIF_SPACE: u32 = 2;
const QIF_ILIMITS: u32 = 4;
const QIF_INODES: u32 = 8;

const QIF_BTIME: u32 = 16;
const QIF_ITIME: u32 = 32;

/// What a record's hard limits leave; None where it sets neither. A soft limit is the
/// user's warning until its grace period is over, and then a wall as the hard one is (the
/// kernel's `check_bdq`: usage past it and its grace time passed refuses every new block):
/// nothing is left then.
fn left_of(whose: Whose, q: &libc::dqblk, now_secs: u64) -> Option<Left> {
    let has = |bits: u32| q.dqb_valid & bits == bits;
    let graced_out = |over: bool, time: u64| over && time != 0 && now_secs >= time;
    let bytes_out = has(QIF_BLIMITS | QIF_SPACE | QIF_BTIME)
        && q.dqb_bsoftlimit != 0
        && graced_out(
            q.dqb_curspace > q.dqb_bsoftlimit.saturating_mul(QUOTA_BLOCK),
            q.dqb_btime,
        );
    let inodes_out = has(QIF_ILIMITS | QIF_INODES | QIF_ITIME)
        && q.dqb_isoftlimit != 0
        && graced_out(q.dqb_curinodes > q.dqb_isoftlimit, q.dqb_itime);
    let bytes = match bytes_out {
        true => Some(0),
        false => (has(QIF_BLIMITS | QIF_SPACE) && q.dqb_bhardlimit != 0).then(|| {
            q.dqb_bhardlimit
                .saturating_mul(QUOTA_BLOCK)
                .saturating_sub(q.dqb_curspace)
        }),
    };
    let inodes = match inodes_out {
        true => Some(0),
        false => (has(QIF_ILIMITS | QIF_INODES) && q.dqb_ihardlimit != 0)
            .then(|| q.dqb_ihardlimit.saturating_sub(q.dqb_curinodes)),
    };
    (bytes.is_some() || inodes.is_some()).then(|| Left {
        whose,
        bytes: bytes.unwrap_or(u64::MAX),
        inodes: inodes.unwrap_or(u64::MAX),
    })
}

/// One quota record, asked of the file system `fd` is on: `quotactl_fd` (Linux 5.14), else
/// `quotactl` on the block device the mount table names for it.
fn get(fd: std::os::fd::BorrowedFd<'_>, kind: libc::c_int, id: u32) -> Option<libc::dqblk> {
    let cmd = libc::QCMD(libc::Q_GETQUOTA, kind);
    // SAFETY: a plain C struct of integers; all zeros is a valid value.
    let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is borrowed for the call, and `q` is a dqblk the kernel fills.
    let r = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            fd.as_raw_fd(),
            cmd as libc::c_uint,
            id,
            std::ptr::from_mut(&mut q),
        )
    };
    if r == 0 {
        return Some(q);
    }
    // ENOSYS is also a file system without quotas (NFS, tmpfs): only a kernel without the
    // call is asked again, through the mount table, which is read at every look.
    if *HAS_QUOTACTL_FD.get_or_init(has_quotactl_fd) {
        return None;
    }
    let st = crate::confine::fstat(&fd).ok()?;
    // An anonymous device (NFS, tmpfs, FUSE, overlay) has no block device to ask.
    if libc::major(st.st_dev) == 0 {
        return None;
    }
    let device = device_of(st.st_dev)?;
    let device = std::ffi::CString::new(device).ok()?;
    // The source is the mount's own word (a FUSE server names its own): only the block
    // device of this very file system is asked.
    let named = nix::sys::stat::stat(device.as_c_str()).ok()?;
    if named.st_mode & libc::S_IFMT != libc::S_IFBLK || named.st_rdev != st.st_dev {
        return None;
    }
    // SAFETY: a NUL-terminated path and a dqblk the kernel fills, both live for the call.
    let r = unsafe {
        libc::quotactl(
            cmd,
            device.as_ptr(),
            id as libc::c_int,
            std::ptr::from_mut(&mut q).cast(),
        )
    };
    (r == 0).then_some(q)
}

static HAS_QUOTACTL_FD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// The block device the mount table names for `dev`, looked up once per device: asked for
/// every 4 MiB of every download, the whole table (hundreds of KiB on a node with thousands
/// of mounts) was read twice each time, under the kernel's namespace lock.
fn device_of(dev: u64) -> Option<Vec<u8>> {
    static DEVICES: std::sync::Mutex<Option<HashMap<u64, Option<Vec<u8>>>>> =
        std::sync::Mutex::new(None);
    let mut devices = DEVICES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let devices = devices.get_or_insert_with(HashMap::new);
    if let Some(known) = devices.get(&dev) {
        return known.clone();
    }
    let found = crate::mountinfo::device_of(dev).ok()?;
    // A node's mounts are few; a table past this is not worth keeping.
    if devices.len() < 1024 {
        devices.insert(dev, found.clone());
    }
    found
}

/// Whether the kernel has `quotactl_fd` (5.14): asked of no fd, it answers EBADF.
fn has_quotactl_fd() -> bool {
    let cmd = libc::QCMD(libc::Q_GETQUOTA, libc::USRQUOTA);
    // SAFETY: no fd and no buffer: the kernel refuses the fd before it reads anything.
    let r = unsafe {
        libc::syscall(
            libc::SYS_quotactl_fd,
            -1,
            cmd as libc::c_uint,
            0,
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn record(bhard: u64, space: u64, ihard: u64, inodes: u64) -> libc::dqblk {
        // SAFETY: a plain C struct of integers.
        let mut q: libc::dqblk = unsafe { std::mem::zeroed() };
        q.dqb_bhardlimit = bhard;
        q.dqb_bsoftlimit = 1;
        q.dqb_curspace = space;
        q.dqb_ihardlimit = ihard;
        q.dqb_isoftlimit = 1;
        q.dqb_curinodes = inodes;
        q.dqb_valid = 0x3f;
        q
    }

    #[test]
    fn hard_limits_are_what_is_left() {
        let me = Whose::User(7);
        assert_eq!(left_of(me, &record(0, 5, 0, 5), 100), None, "no hard limit");
        assert_eq!(
            left_of(me, &record(10, 4096, 0, 3), 100),
            Some(Left {
                whose: me,
                bytes: 10 * 1024 - 4096,
                inodes: u64::MAX
            })
        );
        let over = left_of(me, &record(1, 1 << 20, 5, 9), 100).unwrap();
        assert_eq!((over.bytes, over.inodes), (0, 0), "past its limits: none");
    }

    /// A soft limit past its grace time is a wall: 15 GiB used of a 10 GiB soft and 20 GiB
    /// hard limit left "5 GiB", and root wrote a 5 GiB dataset the user could not have.
    #[test]
    fn a_soft_limit_past_its_grace_leaves_nothing() {
        let me = Whose::User(7);
        let gib = 1 << 20; // in quota blocks
        let mut q = record(20 * gib, 15 << 30, 100, 50);
        q.dqb_bsoftlimit = 10 * gib;
        q.dqb_isoftlimit = 40;
        q.dqb_btime = 1000;
        q.dqb_itime = 1000;
        let in_grace = left_of(me, &q, 999).unwrap();
        assert_eq!((in_grace.bytes, in_grace.inodes), (5 << 30, 50));
        let out = left_of(me, &q, 1000).unwrap();
        assert_eq!((out.bytes, out.inodes), (0, 0));
        // Under the soft limit again: its old grace time says nothing.
        q.dqb_curspace = 9 << 30;
        q.dqb_curinodes = 30;
        let under = left_of(me, &q, 2000).unwrap();
        assert_eq!((under.bytes, under.inodes), (11 << 30, 70));
    }

    /// A loop-mounted ext4 with kernel-enforced user quotas at `dir` (`mkfs.ext4 -O quota`:
    /// no quota tools), unmounted on drop. None (and said) without root, mkfs.ext4, loop
    /// devices, or a kernel with the quota format (`CONFIG_QFMT_V2`).
    pub(crate) struct QuotaExt4(std::path::PathBuf);

    impl QuotaExt4 {
        pub(crate) fn mount(image: &std::path::Path, dir: &std::path::Path) -> Option<QuotaExt4> {
            use std::process::Command;
            if !nix::unistd::geteuid().is_root() {
                crate::testskip::skip("mounting ext4 needs root");
                return None;
            }
            let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
            let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
                .into_iter()
                .find(|p| std::path::Path::new(p).exists())
                .unwrap_or("mkfs.ext4");
            if !ok(Command::new("truncate").args(["-s", "128M"]).arg(image))
                || !ok(Command::new(mkfs)
                    .args(["-q", "-O", "quota", "-E", "quotatype=usrquota"])
                    .arg(image))
            {
                crate::testskip::skip("no mkfs.ext4 with quotas here");
                return None;
            }
            if !ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(image)
                .arg(dir))
            {
                crate::testskip::skip(
                    "cannot loop-mount an ext4 with quotas here (a kernel without CONFIG_QFMT_V2?)",
                );
                return None;
            }
            Some(QuotaExt4(dir.to_path_buf()))
        }

        /// Sets `uid`'s hard block limit (KiB) there, as `setquota` would.
        pub(crate) fn limit(&self, uid: u32, kib: u64) {
            let device = crate::mountinfo::device_of(
                std::fs::metadata(&self.0)
                    .map(|m| std::os::unix::fs::MetadataExt::dev(&m))
                    .unwrap(),
            )
            .unwrap()
            .expect("the loop device of the mount");
            let device = std::ffi::CString::new(device).unwrap();
            let mut q = record(kib, 0, 0, 0);
            q.dqb_valid = QIF_BLIMITS | QIF_ILIMITS;
            // SAFETY: a NUL-terminated path and a dqblk read by the kernel, live for the call.
            let r = unsafe {
                libc::quotactl(
                    libc::QCMD(0x800008, libc::USRQUOTA), // Q_SETQUOTA
                    device.as_ptr(),
                    uid as libc::c_int,
                    std::ptr::from_mut(&mut q).cast(),
                )
            };
            assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        }
    }

    impl Drop for QuotaExt4 {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// The kernel's record read back: a 10 MiB hard limit of a user with nothing there.
    #[test]
    fn a_hard_limit_is_read_from_the_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let Some(fs) = QuotaExt4::mount(&dir.path().join("img"), &mnt) else {
            return;
        };
        fs.limit(65534, 10 << 10);
        let at = std::fs::File::open(&mnt).unwrap();
        let found = left(&at, 65534, 65534);
        assert_eq!(
            found,
            vec![Left {
                whose: Whose::User(65534),
                bytes: 10 << 20,
                inodes: u64::MAX
            }]
        );
        assert!(left(&at, 65533, 65533).is_empty(), "no limit set");
        drop(at);
        drop(fs);
    }
}
