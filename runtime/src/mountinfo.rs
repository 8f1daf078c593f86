//! The mount table (`/proc/self/mountinfo`), read as bytes and never by touching a path: a
//! stat of a hung network mount or of a job's FUSE mount waits without bound.

/// Every mount point of this mount namespace, as `/proc/self/mountinfo` lists them (no
/// path is touched: a stat of a hung network mount or a job's FUSE mount waits without bound).
/// An error when the table cannot be read: callers decide on it whether root may remove a
/// tree, so "no mounts" is never the answer to a failed read.
pub fn mount_points() -> std::io::Result<Vec<std::path::PathBuf>> {
    mount_points_in(&std::fs::read("/proc/self/mountinfo")?)
}

/// One mount of this mount namespace, as `/proc/self/mountinfo` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The mount's id (what `statx` gives as `stx_mnt_id`).
    pub id: u64,
    /// The device its files show (`0:53`); btrfs shows another per subvolume.
    pub dev: u64,
    /// Its file system type (`fuse.sshfs`).
    pub fstype: Vec<u8>,
    /// Whom a FUSE mount was made for (its `user_id=`): `fusermount` gives the user who ran it.
    pub fuse_user: Option<u32>,
}

impl Mount {
    /// A FUSE file system made for a user other than root: what any job may mount
    /// (`fusermount`), served by a process of its own.
    pub fn made_by_a_user(&self) -> bool {
        (self.fstype == b"fuse" || self.fstype == b"fuseblk" || self.fstype.starts_with(b"fuse."))
            && self.fuse_user != Some(0)
    }
}

/// The table as last read, and the open file it was read from, which says when it changed.
static MOUNTS: std::sync::Mutex<Option<(std::fs::File, Vec<Mount>)>> = std::sync::Mutex::new(None);

/// The first mount of this mount namespace `pred` picks. The table is read again only when
/// the kernel says it changed (`POLLPRI` on `/proc/self/mountinfo`, as libmount watches it),
/// or on a miss: every open that crosses a mount asks (a workdir that is a mount of its own
/// is crossed at each open of the job's root), and a node may list thousands.
pub fn find_mount(pred: impl Fn(&Mount) -> bool) -> std::io::Result<Option<Mount>> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let mut cache = MOUNTS.lock().unwrap_or_else(|p| p.into_inner());
    for fresh in [false, true] {
        let changed = match cache.as_ref() {
            None => true,
            Some((file, _)) => {
                let mut fds = [libc::pollfd {
                    fd: file.as_raw_fd(),
                    events: libc::POLLPRI,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd, the fd open for the call; no wait.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 0) };
                n != 0 || fds[0].revents != 0
            }
        };
        if fresh || changed {
            let mut file = match cache.take() {
                Some((file, _)) => file,
                None => std::fs::File::open("/proc/self/mountinfo")?,
            };
            file.rewind()?;
            let mut table = Vec::new();
            file.read_to_end(&mut table)?;
            *cache = Some((file, mounts_in(&table)?));
        }
        if let Some(m) = cache.as_ref().and_then(|(_, t)| t.iter().find(|m| pred(m))) {
            return Ok(Some(m.clone()));
        }
    }
    Ok(None)
}

/// The id of the mount an open fd is on, from `/proc/self/fdinfo` (kernels before 5.8,
/// whose `statx` does not give it).
pub fn fd_mount_id(fd: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every mount of this mount namespace, with its id, device and type: what a walk looks up
/// for an entry that is the root of a mount, without a word to that file system.
pub fn mounts() -> std::io::Result<Vec<Mount>> {
    mounts_in(&std::fs::read("/proc/self/mountinfo")?)
}

fn mounts_in(table: &[u8]) -> std::io::Result<Vec<Mount>> {
    let bad = || std::io::Error::other("a mountinfo line without an id, a device or a type");
    let number = |f: Option<&&[u8]>| {
        f.and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u64>().ok())
    };
    let mut out = Vec::new();
    for line in table.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let id = number(fields.first()).ok_or_else(bad)?;
        let (major, minor) = fields
            .get(2)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(bad)?;
        // Optional fields end at a lone `-`; the type, the source and the super options
        // follow it.
        let mut after = fields.iter().skip(6).skip_while(|f| **f != b"-").skip(1);
        let fstype = after.next().ok_or_else(bad)?;
        let fuse_user = after.nth(1).and_then(|opts| {
            opts.split(|&b| b == b',')
                .find_map(|o| o.strip_prefix(b"user_id="))
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        });
        out.push(Mount {
            id,
            dev: libc::makedev(major, minor),
            fstype: fstype.to_vec(),
            fuse_user,
        });
    }
    Ok(out)
}

/// The devices of this mount namespace's file systems where a store through a shared
/// mapping moves no file time (shmem: tmpfs, ramfs, hugetlbfs have no `page_mkwrite`): a
/// file mapped, stored to and unmapped there keeps every field of its stamp, its bytes
/// changed.
pub fn untimed_mapped_stores() -> std::io::Result<std::collections::HashSet<u64>> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| matches!(m.fstype.as_slice(), b"tmpfs" | b"ramfs" | b"hugetlbfs"))
        .map(|m| m.dev)
        .collect())
}

/// The block device a mount of device `dev` was made from (`/dev/sda1`), as the table names
/// it; None for a mount of no device under `/dev` (tmpfs, NFS, a FUSE server's own word for
/// its source, which root must not go and look up).
pub fn device_of(dev: u64) -> std::io::Result<Option<Vec<u8>>> {
    let table = std::fs::read("/proc/self/mountinfo")?;
    Ok(device_in(&table, dev))
}

fn device_in(table: &[u8], dev: u64) -> Option<Vec<u8>> {
    table
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .find_map(|line| {
            let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
            let (major, minor) = std::str::from_utf8(fields.get(2)?).ok()?.split_once(':')?;
            if libc::makedev(major.parse().ok()?, minor.parse().ok()?) != dev {
                return None;
            }
            let source = fields.iter().skip(6).skip_while(|f| **f != b"-").nth(2)?;
            let source = unescape_mount_path(source);
            let source = <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::into_vec(
                source.into_os_string(),
            );
            source.starts_with(b"/dev/").then_some(source)
        })
}

/// The table is bytes: the kernel escapes only space, tab, newline and backslash, so one
/// mount path that is not UTF-8 (any user's FUSE mount, a USB stick's Latin-1 label) made a
/// read as text fail, and every caller saw no mount at all.
fn mount_points_in(table: &[u8]) -> std::io::Result<Vec<std::path::PathBuf>> {
    table
        .split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.split(|&b| b == b' ')
                .nth(4)
                .map(unescape_mount_path)
                .ok_or_else(|| std::io::Error::other("a mountinfo line with no mount point"))
        })
        .collect()
}

/// The mount point `/etc/fstab` names at or above `path` (the deepest) when nothing is
/// mounted there now: a `nofail` NFS mount that failed at boot leaves its mount point an
/// empty directory of the root file system, and a store below it "worked" on the local disk,
/// its output hidden once the mount came back (and a dataset named there looked absent).
/// None when fstab or the mount table cannot be read (nothing known), or all is mounted.
pub fn unmounted_fstab_above(path: &std::path::Path) -> Option<std::path::PathBuf> {
    let fstab_path = crate::fault::path_for("fstab").unwrap_or_else(|| "/etc/fstab".into());
    let fstab = std::fs::read(fstab_path).ok()?;
    let mounted = mount_points().ok()?;
    // The store's path, and with its deepest existing directory resolved.
    let real = real_as_far_as_it_exists(path);
    unmounted_in(
        &[path.to_path_buf(), real],
        &fstab,
        &mounted,
        &resolved_parent,
    )
}

/// `path` with its longest existing part resolved as the kernel does (symlinks, `..`), the
/// rest as written: where a path not made yet will be.
pub fn real_as_far_as_it_exists(path: &std::path::Path) -> std::path::PathBuf {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        if let Ok(mut real) = std::fs::canonicalize(existing) {
            real.extend(rest.iter().rev());
            return real;
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name);
                existing = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// `p` with its parent resolved (symlinks): where `mount` and systemd put a mount point named
/// through one (`/mnt -> /var/mnt` on Fedora CoreOS), without a look at `p` itself, which may
/// be a mount that does not answer.
fn resolved_parent(p: &std::path::Path) -> std::path::PathBuf {
    match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|real| real.join(name))
            .unwrap_or_else(|_| p.to_path_buf()),
        _ => p.to_path_buf(),
    }
}

/// The deepest fstab mount point above the store's path (`forms`: as written, and resolved),
/// unless a mount (fstab's or not: a `.mount` unit, a prep script's RAID, a CSI volume) is
/// at it or between it and `path`.
fn unmounted_in(
    forms: &[std::path::PathBuf],
    fstab: &[u8],
    mounted: &[std::path::PathBuf],
    resolve: &dyn Fn(&std::path::Path) -> std::path::PathBuf,
) -> Option<std::path::PathBuf> {
    use std::path::{Path, PathBuf};
    let points = fstab
        .split(|&b| b == b'\n')
        .map(|l| {
            l.split(|b| b.is_ascii_whitespace())
                .filter(|f| !f.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|f| f.len() >= 3 && !f[0].starts_with(b"#"))
        // Swap and pseudo entries name no directory.
        .filter(|f| f[1].starts_with(b"/") && f[2] != b"swap")
        .map(|f| unescape_mount_path(f[1]))
        .filter(|point| point != Path::new("/"));
    let mut deepest: Option<(usize, PathBuf, PathBuf)> = None;
    for point in points {
        // Resolved only when its name is on the store's way: resolving looks at its parent,
        // and an unrelated entry below a mount that does not answer would hold every start.
        let related = point
            .file_name()
            .is_some_and(|name| forms.iter().any(|f| f.iter().any(|c| c == name)));
        let resolved = related.then(|| resolve(&point));
        for point_form in std::iter::once(point.clone()).chain(resolved) {
            if forms.iter().any(|form| form.starts_with(&point_form)) {
                let depth = point_form.components().count();
                if deepest.as_ref().is_none_or(|(d, _, _)| depth > *d) {
                    deepest = Some((depth, point.clone(), point_form.clone()));
                }
            }
        }
    }
    let (_, point, point_form) = deepest?;
    // Mounted at it, or below it on the way to the store.
    let covered = mounted.iter().any(|m| {
        forms.iter().any(|form| {
            form.starts_with(m) && (m.starts_with(&point) || m.starts_with(&point_form))
        })
    });
    (!covered).then_some(point)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(bytes: &[u8]) -> std::path::PathBuf {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::path::PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

#[cfg(test)]
mod tests {
    /// A store below an fstab mount point that is not mounted now is named; one mounted,
    /// one below no fstab entry, comments, swap and the root are not.
    #[test]
    fn a_path_below_an_fstab_mount_not_mounted_is_named() {
        use std::path::{Path, PathBuf};
        let fstab = b"# <fs> <dir> <type> <opts>\nUUID=1 / ext4 defaults 0 1\n/dev/sdb none swap sw 0 0\nnfs:/s /mnt/nfs nfs nofail 0 0\nnfs:/t /mnt/nfs/deep nfs nofail 0 0\nnfs:/u /srv/with\\040space nfs nofail 0 0\n/dev/sdc /mnt auto nofail 0 0\n";
        let same = |p: &Path| p.to_path_buf();
        let check = |path: &str, mounted: &[&str]| {
            let mounted: Vec<PathBuf> = mounted.iter().map(PathBuf::from).collect();
            super::unmounted_in(&[PathBuf::from(path)], fstab, &mounted, &same)
        };
        assert_eq!(check("/mnt/nfs/store", &["/"]), Some("/mnt/nfs".into()));
        assert_eq!(
            check("/mnt/nfs/deep/store", &["/"]),
            Some("/mnt/nfs/deep".into())
        );
        assert_eq!(
            check("/srv/with space/store", &["/"]),
            Some("/srv/with space".into())
        );
        assert_eq!(check("/mnt/nfs/store", &["/", "/mnt/nfs"]), None);
        assert_eq!(check("/var/lib/c3/store", &["/"]), None);
        assert_eq!(check("/mnt/other/store", &["/"]), Some("/mnt".into()));
        // A mount fstab does not name, between the point and the store (a RAID a prep
        // script mounted, a .mount unit, a CSI volume): the store is on it.
        assert_eq!(check("/mnt/nvme/c3store", &["/", "/mnt/nvme"]), None);
        // A mount point named through a symlink (`/mnt -> /var/mnt`): mounted where it
        // resolves to.
        let coreos = |p: &Path| match p.strip_prefix("/mnt") {
            Ok(rest) => Path::new("/var/mnt").join(rest),
            Err(_) => p.to_path_buf(),
        };
        let mounted: Vec<PathBuf> = vec!["/".into(), "/var/mnt/nfs".into()];
        let f = b"nfs:/s /mnt/nfs nfs nofail 0 0\n";
        let store = [PathBuf::from("/mnt/nfs/store"), "/var/mnt/nfs/store".into()];
        assert_eq!(super::unmounted_in(&store, f, &mounted, &coreos), None);
        let down: Vec<PathBuf> = vec!["/".into()];
        assert_eq!(
            super::unmounted_in(&store, f, &down, &coreos),
            Some("/mnt/nfs".into())
        );
        // A store named through a symlink (`/srv/c3 -> /mnt/nfs/store`): judged where it is.
        let through = [PathBuf::from("/srv/c3"), "/mnt/nfs/store".into()];
        assert_eq!(
            super::unmounted_in(&through, f, &down, &same),
            Some("/mnt/nfs".into())
        );
    }

    use super::*;

    #[test]
    fn mount_points_are_read_as_bytes() {
        let table = b"22 1 0:21 / /proc rw - proc proc rw\n\
                      40 22 0:50 / /srv/x\xff\\040y rw - fuse f rw\n\
                      41 22 0:51 / /tmp/z rw - tmpfs t rw\n";
        let found = mount_points_in(table).unwrap();
        let odd = std::path::PathBuf::from(
            <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(
                b"/srv/x\xff y".to_vec(),
            ),
        );
        assert_eq!(
            found,
            vec![std::path::PathBuf::from("/proc"), odd, "/tmp/z".into()]
        );
        assert!(mount_points_in(b"garbage\n").is_err());
        assert!(!mount_points().unwrap().is_empty());
    }

    #[test]
    fn mounts_are_read_with_their_id_device_and_type() {
        let table = b"22 1 0:21 / /proc rw - proc proc rw\n\
                      40 22 0:50 / /srv/x\xff\\040y rw shared:7 master:2 - fuse.sshfs u@h: rw,user_id=1000,group_id=1000\n\
                      41 22 8:1 / /data rw - ext4 /dev/sda1 rw\n";
        let found = mounts_in(table).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[1],
            Mount {
                id: 40,
                dev: libc::makedev(0, 50),
                fstype: b"fuse.sshfs".to_vec(),
                fuse_user: Some(1000),
            }
        );
        assert!(found[1].made_by_a_user() && !found[2].made_by_a_user());
        let roots = mounts_in(b"7 1 0:9 / /gcs rw - fuse.gcsfuse b rw,user_id=0,group_id=0\n");
        assert!(!roots.unwrap()[0].made_by_a_user());
        assert_eq!(
            (found[2].id, found[2].fstype.as_slice()),
            (41, &b"ext4"[..])
        );
        assert!(mounts_in(b"1 2 0:1 / /x rw proc\n").is_err());
        assert!(mounts_in(b"garbage\n").is_err());
        assert!(!mounts().unwrap().is_empty());
        assert!(find_mount(|m| m.fstype == b"proc").unwrap().is_some());
        assert!(find_mount(|m| m.id == u64::MAX).unwrap().is_none());
    }

    #[test]
    fn a_mounts_device_is_found_by_its_number() {
        let table = b"22 1 0:21 / /proc rw - proc proc rw\n\
                      40 22 0:50 / /srv/x rw - fuse.sshfs /dev/sdz rw,user_id=1000\n\
                      41 22 8:1 / /data rw shared:1 - ext4 /dev/sda1 rw\n";
        assert_eq!(
            device_in(table, libc::makedev(8, 1)),
            Some(b"/dev/sda1".to_vec())
        );
        assert_eq!(
            device_in(table, libc::makedev(0, 21)),
            None,
            "not a /dev path"
        );
        assert_eq!(
            device_in(table, libc::makedev(0, 50)),
            Some(b"/dev/sdz".to_vec()),
            "a FUSE server's word: quota.rs checks it names this device"
        );
        assert_eq!(device_in(table, libc::makedev(9, 9)), None);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(
            unescape_mount_path(br"/a\040b\134c\011"),
            std::path::PathBuf::from("/a b\\c\t")
        );
        assert_eq!(
            unescape_mount_path(br"/x\9"),
            std::path::PathBuf::from(r"/x\9")
        );
        assert_eq!(
            unescape_mount_path("/é\\".as_bytes()),
            std::path::PathBuf::from("/é\\")
        );
    }
}
