//! The node's FUSE connections (`/sys/fs/fuse/connections`, the fusectl file system): the
//! one way to free a process of the job stuck for good on its own FUSE mount. A thread
//! waiting on a request the mount's server read and never answers waits uninterruptibly
//! once SIGKILL arrives; the server (a thread of the job, stuck too, or killed with a
//! sibling still holding `/dev/fuse`) keeps the device open, so the kernel never ends the
//! connection and the process, with its GPU context, never dies. Writing to a connection's
//! `abort` fails every request of it; the process then dies of its SIGKILL.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

const CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// The connections that existed when the job was launched, which are never the job's to
/// abort, and whose connections are: its user's.
#[derive(Debug)]
pub struct Before {
    /// Whether fusectl is mounted; without it nothing can be aborted.
    mounted: bool,
    /// Each connection's (name, inode): a name (the mount's device number) that a later
    /// connection reused is a new connection.
    known: BTreeSet<(String, u64)>,
    /// The job's user. fusectl gives a connection's files the owner of the mount's
    /// `user_id`: the user `fusermount` mounted for, or the one a user namespace maps to.
    uid: u32,
}

impl Before {
    /// Taken just before the launch, so that nothing of the job's is among them.
    pub fn take(uid: u32) -> Before {
        let mounted = fusectl_mounted();
        let known = if mounted {
            connections()
                .into_iter()
                .map(|(n, ino, _)| (n, ino))
                .collect()
        } else {
            BTreeSet::new()
        };
        Before {
            mounted,
            known,
            uid,
        }
    }

    /// Aborts each connection the job's user made since [`Before::take`] that has requests
    /// waiting (a stuck process of the job has one), logging each; returns their names.
    ///
    /// For a job run as root, a connection root made is the job's only when it is mounted in
    /// a mount namespace of one of the job's processes (`members`) and not in the agent's:
    /// in the node's namespace it cannot be told from one a root daemon mounted meanwhile
    /// (an automounted gcsfuse), which must not break because a job went wrong. Another job
    /// of the same user that made a mount meanwhile cannot be told apart; it is that user's.
    pub fn abort_new(&self, members: &[i32]) -> Vec<String> {
        if !self.mounted {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = CONNECTIONS,
                    "fusectl is not mounted: a process stuck on the job's own FUSE mount cannot be freed (mount -t fusectl none /sys/fs/fuse/connections)"
                );
            }
            return Vec::new();
        }
        if read_only(Path::new(CONNECTIONS)) {
            static SAID: AtomicBool = AtomicBool::new(false);
            if !SAID.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    path = CONNECTIONS,
                    "fusectl is read-only here (systemd's ProtectKernelTunables=): a process stuck on the job's own FUSE mount cannot be freed (add ReadWritePaths=-/sys/fs/fuse/connections to the unit)"
                );
            }
            return Vec::new();
        }
        // A survivor stuck on something else (a CUDA context torn down for seconds, the GPU
        // driver, NFS) is not helped by an abort, and another job of the same user with a busy
        // FUSE mount of its own would be broken by one.
        if stuck_on_fuse(members) == Some(false) {
            return Vec::new();
        }
        let roots = (self.uid == 0).then(|| mounted_only_in(members));
        let mut aborted = Vec::new();
        for (name, ino, owner) in connections() {
            if owner != self.uid
                || self.known.contains(&(name.clone(), ino))
                || roots.as_ref().is_some_and(|r| !r.contains(&name))
            {
                continue;
            }
            let dir = Path::new(CONNECTIONS).join(&name);
            let waiting: u64 = std::fs::read_to_string(dir.join("waiting"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            if waiting == 0 {
                continue;
            }
            match std::fs::write(dir.join("abort"), "1") {
                Ok(()) => {
                    tracing::warn!(connection = %name, waiting, uid = owner, "processes of the job survive SIGKILL: aborted the FUSE connection the job's user made during the job");
                    aborted.push(name);
                }
                Err(e) => {
                    tracing::warn!(connection = %name, error = %e, "cannot abort the job's FUSE connection")
                }
            }
        }
        aborted
    }
}

/// Whether a thread of `pids` sleeps in the FUSE client, waiting on a request: its kernel
/// wait channel (`wchan`: `request_wait_answer`, or a `fuse_` function it is inlined
/// into), or where that says nothing (`0`: x86 kernels before 5.16 with the ORC unwinder),
/// its kernel stack. `None` when neither can be read: nothing tells, and the caller aborts
/// as it did before it could tell.
fn stuck_on_fuse(pids: &[i32]) -> Option<bool> {
    let mut told = false;
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let wchan = std::fs::read_to_string(task.path().join("wchan")).unwrap_or_default();
            let wchan = wchan.trim();
            if !wchan.is_empty() && wchan != "0" {
                told = true;
                if is_fuse_wait(wchan) {
                    return Some(true);
                }
                continue;
            }
            if let Ok(stack) = std::fs::read_to_string(task.path().join("stack")) {
                told = true;
                if stack_waits_on_fuse(&stack) {
                    return Some(true);
                }
            }
        }
    }
    told.then_some(false)
}

fn is_fuse_wait(wchan: &str) -> bool {
    // A server's thread reading its device (`fuse_dev_do_read`) waits on no one; a function
    // the compiler specialised keeps its name before a suffix (`.isra.0`).
    wchan.starts_with("request_wait_answer")
        || (wchan.contains("fuse") && !wchan.starts_with("fuse_dev"))
}

/// `/proc/<pid>/task/<tid>/stack`: one `[<0>] function+0x1f/0x90` frame a line.
fn stack_waits_on_fuse(stack: &str) -> bool {
    stack.lines().any(|frame| {
        let f = frame.split_once("] ").map_or(frame, |(_, f)| f);
        f.starts_with("request_wait_answer")
            || f.starts_with("fuse_simple_request")
            || f.starts_with("__fuse_simple_request")
            || f.starts_with("__fuse_request_send")
    })
}

/// Each connection: its name, its directory's inode and owner.
fn connections() -> Vec<(String, u64, u32)> {
    let Ok(entries) = std::fs::read_dir(CONNECTIONS) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.file_name().into_string().ok()?, m.ino(), m.uid()))
        })
        .collect()
}

/// Whether the file system at `path` is mounted read-only for this process.
fn read_only(path: &Path) -> bool {
    nix::sys::statvfs::statvfs(path)
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
}

/// A mount table as text: its fields read here (types, device numbers, the fusectl mount
/// point) are ASCII, and a mount point elsewhere that is not UTF-8 (a user's FUSE mount on a
/// Latin-1 directory) failed the whole read: fusectl "not mounted", the rescue of a job stuck
/// on its own FUSE mount off for every later job.
fn mount_table(path: &Path) -> Option<String> {
    std::fs::read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

fn fusectl_mounted() -> bool {
    mount_table(Path::new("/proc/self/mountinfo")).is_some_and(|t| {
        t.lines().any(|l| {
            l.split_once(" - ").is_some_and(|(left, right)| {
                right.split_whitespace().next() == Some("fusectl")
                    && left.split_whitespace().nth(4) == Some(CONNECTIONS)
            })
        })
    })
}

/// Mount namespaces of the job's looked at, at most: a job has one or a few.
const MAX_NAMESPACES: usize = 16;

/// The FUSE connections mounted in a mount namespace of `pids` but not in the agent's.
fn mounted_only_in(pids: &[i32]) -> BTreeSet<String> {
    let own_ns = std::fs::read_link("/proc/self/ns/mnt").ok();
    let own = fuse_mounts(Path::new("/proc/self/mountinfo"));
    let mut seen = BTreeSet::new();
    let mut theirs = BTreeSet::new();
    for pid in pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if Some(&ns) == own_ns.as_ref() || !seen.insert(ns) {
            continue;
        }
        if seen.len() > MAX_NAMESPACES {
            break;
        }
        theirs.extend(fuse_mounts(Path::new(&format!("/proc/{pid}/mountinfo"))));
    }
    theirs.difference(&own).cloned().collect()
}

/// The connection names of the FUSE mounts in a mount table: each mount's device number as
/// the kernel's `dev_t` (major << 20 | minor), which names its connection.
fn fuse_mounts(mountinfo: &Path) -> BTreeSet<String> {
    mount_table(mountinfo).map_or_else(BTreeSet::new, |t| fuse_mounts_in(&t))
}

fn fuse_mounts_in(mountinfo: &str) -> BTreeSet<String> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            if fstype != "fuse" && fstype != "fuseblk" && !fstype.starts_with("fuse.") {
                return None;
            }
            let (major, minor) = left.split_whitespace().nth(2)?.split_once(':')?;
            let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
            Some(((major << 20) | minor).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read-only fusectl (systemd's ProtectKernelTunables= without the unit's
    /// ReadWritePaths= for it) is told apart from a writable one.
    #[test]
    fn a_read_only_mount_is_seen_as_one() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (mount)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mount = |opts: &str| {
            std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", opts, "none"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !mount("ro,size=1m") {
            crate::testskip::skip("cannot mount a tmpfs here");
            return;
        }
        let ro = read_only(dir.path());
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        assert!(mount("rw,size=1m"));
        let rw = read_only(dir.path());
        let _ = std::process::Command::new("umount")
            .arg(dir.path())
            .status();
        assert!(ro && !rw, "ro {ro}, rw {rw}");
    }

    #[test]
    fn a_fuse_mount_is_named_as_its_connection() {
        let table = "46 27 0:41 / /work/m rw,relatime - fuse silent rw,user_id=65534\n\
                     47 27 0:42 / /work/g rw - fuse.gcsfuse bucket rw,user_id=0\n\
                     48 27 8:17 / /mnt/ntfs rw - fuseblk /dev/sdb1 rw,user_id=0\n\
                     49 27 0:43 / /tmp rw - tmpfs tmpfs rw\n\
                     50 27 0:44 / /sys/fs/fuse/connections rw - fusectl none rw\n";
        let names: Vec<String> = fuse_mounts_in(table).into_iter().collect();
        assert_eq!(names, ["41", "42", &((8 << 20) | 17).to_string()]);
    }

    /// Nothing is aborted for survivors stuck elsewhere than in the FUSE client: a process
    /// asleep in a plain wait is no reason to break anyone's mount.
    /// A mount point elsewhere that is not UTF-8 leaves the table readable.
    #[test]
    fn a_mount_table_with_a_name_not_utf8_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("mountinfo");
        std::fs::write(
            &table,
            b"46 27 0:41 / /home/u/caf\xe9 rw - fuse.sshfs u@h: rw,user_id=1000\n",
        )
        .unwrap();
        assert_eq!(
            super::fuse_mounts(&table).into_iter().collect::<Vec<_>>(),
            ["41".to_string()]
        );
    }

    #[test]
    fn only_a_wait_in_the_fuse_client_counts() {
        for (w, fuse) in [
            ("request_wait_answer", true),
            ("fuse_simple_request", true),
            ("__fuse_simple_request", true),
            ("fuse_dev_do_read", false),
            ("do_nanosleep", false),
            ("0", false),
            ("", false),
        ] {
            assert_eq!(is_fuse_wait(w), fuse, "{w}");
        }
        assert!(is_fuse_wait("request_wait_answer.constprop.0"));
        let stuck = "[<0>] request_wait_answer+0x12a/0x260\n[<0>] fuse_simple_request+0x17/0x30\n";
        assert!(stack_waits_on_fuse(stuck));
        let server = "[<0>] fuse_dev_do_read+0x3b1/0x4e0\n[<0>] vfs_read+0x99/0x180\n";
        assert!(!stack_waits_on_fuse(server));
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_ne!(stuck_on_fuse(&[sleeper.id() as i32]), Some(true));
        let _ = sleeper.kill();
        let _ = sleeper.wait();
    }
}
