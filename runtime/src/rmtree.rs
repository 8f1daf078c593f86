//! Removal of a directory tree a job shaped, as root: retention's.
//!
//! std's `remove_dir_all` is the wrong tool there, in three ways a job can use:
//! * It recurses, one open listing per level: a job's chain of 2,000 directories ran the
//!   housekeeping unit out of fds near level 1,000 (soft limit 1024), leaving the chain and
//!   what came after it in the listing, or out of stack under a high limit. Here the walk is
//!   a loop with at most [`MAX_OPEN`] levels open (one fd each); a directory met deeper is
//!   renamed up to the top of the tree, under a name of this call's own
//!   (`.c3-deep.<pid>.<nanos>.<n>`), and removed from there in its turn, found again by
//!   listing the top again: no list of them is kept (a job's ten million held 700 MB of
//!   names). No job user may write the top (the agent's job dir, 0711, in retention's 0700
//!   trash), so only the walk makes those names there; one that keeps something is renamed
//!   `.c3-kept.<pid>.<nanos>.<n>`, so each listing again takes what it finds for good and the
//!   walk ends. A listing again that fails, or one past [`MAX_RELISTS`], ends it: what was not
//!   found again stays at the top, reported.
//! * It crosses mount points: a file system mounted inside (a job's FUSE mount, a bind
//!   mount) was emptied, and a stat could wait for ever on a FUSE server that never answers.
//!   Here each entry is looked at with the kernel's cached attributes (`statx`
//!   `AT_STATX_DONT_SYNC`, from its parent's fd), and a directory at a mount root or on
//!   another device than the top is never opened (`openat2` `RESOLVE_NO_XDEV`): it stays.
//!   But for a btrfs subvolume (a device of its own, and no mount: any user may make one
//!   with `btrfs subvolume create`): on the top's own mount by its mount id (`statx`
//!   `STATX_MNT_ID`) and no mount's root, it is emptied and removed as any directory.
//! * It removes whatever root may: a job's user that moved another user's directory into
//!   its workdir (one it may write, holding that user's 0755 subdirectory) had root delete
//!   the other user's files. Here, for a job that ran as other users ([`Who::Users`]), a
//!   directory is emptied only if one of them could have emptied it (it owns it, or its
//!   mode or ACL lets it list, enter and write it) or it is the agent's own: the agent's
//!   user's, with every directory above it the agent's own and closed to those users (none
//!   may add to it). Root's `out/` in a tree a user moved into its workdir is not the
//!   agent's. In a sticky directory an entry goes only if such a user owns it or the
//!   directory. A directory is never chmod'ed as root (root needs no mode bits; only an
//!   agent that is not root gives its own directories back the owner's rwx a job took away).
//!
//! Nothing is followed: a symlink is unlinked as a link, each directory is opened from its
//! parent's fd with no symlink, and what stays is reported (the caller keeps the job).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::dir::{Dir, OwningIter};
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, renameat2, OFlag, OpenHow, RenameFlags, ResolveFlag};
use nix::sys::stat::{fstat, FileStat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use crate::confine::{cached_stat_at, CachedStat, DirFd, JobReader};

/// Directories open at once (one fd each); one met deeper is moved up to the top first.
pub const MAX_OPEN: usize = 64;

/// The most times the top is listed again for the directories moved up to it. A chain needs
/// one per [`MAX_OPEN`] levels or so (2^20: 60 million levels, more than a file system's
/// inodes allow a job); a belt, should a listing keep finding what the walk just moved.
pub const MAX_RELISTS: u64 = 1 << 20;

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

/// A name an earlier walk gave what it moved up to the top (`.c3-deep.<pid>.<nanos>.N`)
/// or what it found swapped in there (`.c3-kept.…`); not this walk's own `prefix`.
fn left_by_an_earlier_walk(name: &OsStr, prefix: &str) -> bool {
    let name = name.as_bytes();
    (name.starts_with(b".c3-deep.") || name.starts_with(b".c3-kept."))
        && !name.starts_with(prefix.as_bytes())
}

/// Whose removals the agent stands in for.
#[derive(Debug, Clone)]
pub enum Who {
    /// The job ran as the agent's own user: what the agent may remove, the job could.
    Anyone,
    /// The job ran as these users: nothing goes that none of them could have removed
    /// (the agent's own directories aside). Empty: only the agent's own directories.
    Users(Vec<JobReader>),
}

impl Who {
    /// May the entries of the open directory `dir` (stat `st`) go? `sealed_above`: its parent
    /// is [`Who::seals`]: then a directory of the agent's own user is the agent's making.
    /// Anywhere else one of root's is not (docker's root `out/` in a tree a job's user moved
    /// into its workdir): the user could not have emptied it, so neither does root.
    fn may_empty(&self, dir: &impl AsFd, st: &FileStat, euid: u32, sealed_above: bool) -> bool {
        match self {
            Who::Anyone => true,
            Who::Users(users) => {
                (sealed_above && st.st_uid == euid) || users.iter().any(|u| u.may_empty(dir, st))
            }
        }
    }

    /// Whether nothing in the open directory `dir` (stat `st`) can be the job's users' doing:
    /// it is the agent's own (`own`: its user's, and below a directory that seals) and none of
    /// them may add to it. The top seals when it is the agent's own: the caller vouches for it.
    fn seals(&self, dir: &impl AsFd, st: &FileStat, own: bool) -> bool {
        match self {
            Who::Anyone => true,
            Who::Users(users) => own && !users.iter().any(|u| u.may_add(dir, st)),
        }
    }

    /// May an entry owned by `uid` go from the directory `dir`? Only a sticky one says no.
    fn may_unlink(&self, dir: &FileStat, uid: u32) -> bool {
        if dir.st_mode & libc::S_ISVTX == 0 {
            return true;
        }
        match self {
            Who::Anyone => true,
            Who::Users(users) => users
                .iter()
                .any(|u| u.uid == 0 || u.uid == uid || u.uid == dir.st_uid),
        }
    }
}

/// Why an entry stays.
#[derive(Debug)]
pub enum Stay {
    /// A mount point, or a directory on another device than the top not known to be on the
    /// top's own mount.
    Mount,
    /// A btrfs subvolume, emptied, that could not be removed (a kernel before 4.18 removes
    /// none by `rmdir`).
    Subvolume(io::Error),
    /// A directory, not empty, that the job's users could not have emptied.
    NotTheirs { uid: u32 },
    /// An entry of a sticky directory that neither belongs to them nor is in one of theirs.
    Sticky { uid: u32 },
    /// Removing it failed.
    Failed(io::Error),
}

impl std::fmt::Display for Stay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stay::Mount => write!(f, "a file system is mounted there"),
            Stay::NotTheirs { uid } => write!(
                f,
                "a directory of uid {uid} that the job's user could not have emptied"
            ),
            Stay::Sticky { uid } => write!(
                f,
                "uid {uid}'s, in a sticky directory: the job's user could not have removed it"
            ),
            Stay::Subvolume(e) => write!(f, "a btrfs subvolume that could not be removed: {e}"),
            Stay::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// What [`remove_entries`] did.
#[derive(Debug, Default)]
pub struct Removal {
    /// Apparent size of the regular files removed.
    pub bytes: u64,
    /// Entries that stay (and with each, every directory above it).
    pub left: u64,
    /// The first of them, by its path from the top, and why.
    pub first_left: Option<(PathBuf, Stay)>,
}

impl Removal {
    fn leave(&mut self, rel: PathBuf, why: Stay) {
        self.left += 1;
        if self.first_left.is_none() {
            self.first_left = Some((rel, why));
        }
    }
}

/// One directory being emptied.
struct Level {
    /// Its listing, read as a stream; the listing's fd is the one its entries are reached by.
    names: OwningIter,
    /// Its listing failed or ended.
    ended: bool,
    st: FileStat,
    /// Its name in the directory above (removed by it once empty).
    name: OsString,
    /// Its path from the top, for messages.
    rel: PathBuf,
    /// Something in it stays, so it does too.
    keeps: bool,
    /// [`Who::seals`]: a directory of the agent's own user in it is the agent's own.
    seals: bool,
    /// A subvolume (another device than the directory above, on the same mount).
    subvolume: bool,
}

impl Level {
    fn open(
        fd: OwnedFd,
        st: FileStat,
        name: OsString,
        rel: PathBuf,
        seals: bool,
    ) -> io::Result<Level> {
        Ok(Level {
            names: Dir::from_fd(fd)?.into_iter(),
            ended: false,
            st,
            name,
            rel,
            keeps: false,
            seals,
            subvolume: false,
        })
    }

    /// Starts its listing again, on an open file description of its own: the old one's
    /// offset says nothing about what was added since.
    fn relist(&mut self) -> io::Result<()> {
        if let Some(e) = relist_fault(RelistStep::Open) {
            return Err(e);
        }
        let fd = openat(self.fd(), ".", DIR_FLAGS, Mode::empty())?;
        self.names = Dir::from_fd(fd)?.into_iter();
        self.ended = false;
        Ok(())
    }

    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the listing owns this fd and closes it only when dropped; the borrow is
        // tied to `self`, so it cannot outlive the listing.
        unsafe { BorrowedFd::borrow_raw(self.names.as_raw_fd()) }
    }

    /// The next name of its listing (never `.` or `..`); `Err`: the listing failed.
    fn next_name(&mut self) -> Option<io::Result<OsString>> {
        loop {
            if self.ended {
                return None;
            }
            match self.names.next() {
                None => self.ended = true,
                Some(Err(e)) => {
                    self.ended = true;
                    return Some(Err(e.into()));
                }
                Some(Ok(entry)) => {
                    let name = entry.file_name().to_bytes();
                    if name != b"." && name != b".." {
                        return Some(Ok(OsStr::from_bytes(name).to_os_string()));
                    }
                }
            }
        }
    }
}

/// Removes every entry of `top` but those named in `except`, as `who` could have, and never
/// across a mount; `top` itself stays. Blocking: the caller is off the reactor. No job user
/// may write `top` (the agent's job dir in retention's trash): the directories met too deep
/// are moved up into it, and found again there by their names alone.
pub fn remove_entries(top: &DirFd, except: &[&OsStr], who: &Who) -> Removal {
    remove_entries_until(top, except, who, &AtomicBool::new(false))
}

/// [`remove_entries`], given up (what is left reported, `Stay::Failed`) once `stop` is set:
/// `recover --budget-secs` and a SIGTERM, which a tree of millions of entries (or one a
/// process still adds to) otherwise outlasted.
pub fn remove_entries_until(
    top: &DirFd,
    except: &[&OsStr],
    who: &Who,
    stop: &AtomicBool,
) -> Removal {
    walk(top, except, who, MAX_RELISTS, stop)
}

/// How many entries the walk meets between two looks at its stop flag.
const STOP_LOOK_EVERY: u64 = 1024;

/// [`remove_entries`], listing the top again at most `max_relists` times.
fn walk(top: &DirFd, except: &[&OsStr], who: &Who, max_relists: u64, stop: &AtomicBool) -> Removal {
    let mut out = Removal::default();
    let euid = nix::unistd::geteuid().as_raw();
    // A listing of its own (an open file description not shared with the caller's fd).
    let opened = openat(top, ".", DIR_FLAGS, Mode::empty())
        .map_err(io::Error::from)
        .and_then(|fd| {
            let st = fstat(&fd)?;
            Ok((fd, st))
        });
    let (fd, st) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            out.leave(PathBuf::new(), Stay::Failed(e));
            return out;
        }
    };
    if !who.may_empty(&fd, &st, euid, true) {
        out.leave(PathBuf::new(), Stay::NotTheirs { uid: st.st_uid });
        return out;
    }
    open_up(&fd, &st, euid);
    let top_dev = st.st_dev;
    let top_mount = mount_of(fd.as_fd(), OsStr::new("")).map(|(id, _)| id);
    let seals = who.seals(&fd, &st, st.st_uid == euid);
    let mut stack = match Level::open(fd, st, OsString::new(), PathBuf::new(), seals) {
        Ok(level) => vec![level],
        Err(e) => {
            out.leave(PathBuf::new(), Stay::Failed(e));
            return out;
        }
    };
    // Directories met too deep are moved up to the top under names of this call's own
    // (`prefix`), and found again by listing the top again; the first listing skips them.
    // Only the walk writes the top, so nothing else makes or takes such a name there, and
    // each one a listing again takes is removed or renamed out of the prefix (`kept`, see
    // `settle`): no later listing meets it again, so the walk ends.
    let (pid, nanos) = (std::process::id(), unique_nanos());
    let prefix = format!(".c3-deep.{pid}.{nanos}.");
    let kept = format!(".c3-kept.{pid}.{nanos}.");
    let mut moves = 0u64;
    // Moved up and not yet taken by a listing again: what stays at the top if the walk ends.
    let mut at_top = 0u64;
    // A directory was moved up since the top's listing began, maybe behind where the listing
    // had got to: the top is listed again once the listing ends.
    let mut moved_since = false;
    let mut relists = 0u64;
    // The top's listing is one again: it takes only the names with `prefix`.
    let mut relisting = false;
    // The one of them being removed, to be settled once the walk is back at the top.
    let mut taken: Option<OsString> = None;
    // No more listings again: one failed, or one taken could not be renamed out of the prefix
    // (a listing again would take it again). Fail closed: what is at the top stays.
    let mut no_relist = false;
    let mut met = 0u64;

    loop {
        met += 1;
        if met.is_multiple_of(STOP_LOOK_EVERY) && stop.load(Ordering::Relaxed) {
            out.leave(
                PathBuf::new(),
                Stay::Failed(io::Error::other(
                    "stopped before it was done (a stop, or the time budget)",
                )),
            );
            break;
        }
        if stack.len() == 1 {
            if let Some(name) = taken.take() {
                if !settle(&stack[0], &name, (&prefix, &kept), &mut out) {
                    no_relist = true;
                }
            }
        }
        let depth = stack.len();
        let Some(level) = stack.last_mut() else {
            break;
        };
        let injected = depth == 1 && relisting && !level.ended;
        let next = match relist_fault(RelistStep::Read).filter(|_| injected) {
            Some(e) => {
                level.ended = true;
                Some(Err(e))
            }
            None => level.next_name(),
        };
        let name = match next {
            Some(Ok(name)) => {
                if depth == 1 {
                    let moved = name.as_bytes().starts_with(prefix.as_bytes());
                    if moved != relisting || except.contains(&name.as_os_str()) {
                        continue;
                    }
                    if moved {
                        at_top = at_top.saturating_sub(1);
                        taken = Some(name.clone());
                    }
                }
                name
            }
            Some(Err(e)) => {
                level.keeps = true;
                out.leave(level.rel.clone(), Stay::Failed(e));
                // The top's listing again would fail the same way, for ever.
                no_relist |= depth == 1;
                continue;
            }
            None if depth == 1 => {
                let why = if at_top == 0 {
                    break;
                } else if no_relist {
                    "moved up, and the top could not be listed again for it".to_string()
                } else if !moved_since {
                    // The listing saw every name there when it began: none should be left.
                    "moved up, and not found again at the top".to_string()
                } else if relists >= max_relists {
                    format!("moved up, and the top was listed again {relists} times already")
                } else {
                    relists += 1;
                    match level.relist() {
                        Ok(()) => {
                            (relisting, moved_since) = (true, false);
                            continue;
                        }
                        Err(e) => format!("moved up, and the top could not be listed again: {e}"),
                    }
                };
                out.leave(
                    PathBuf::from(format!("{prefix}*")),
                    Stay::Failed(io::Error::other(why)),
                );
                out.left += at_top - 1;
                break;
            }
            None => {
                let Some(done) = stack.pop() else { break };
                let Some(parent) = stack.last_mut() else {
                    break;
                };
                if done.keeps {
                    parent.keeps = true;
                    continue;
                }
                let (name, rel) = (done.name, done.rel);
                drop(done.names);
                match unlinkat(parent.fd(), name.as_os_str(), UnlinkatFlags::RemoveDir) {
                    Ok(()) | Err(Errno::ENOENT) => {}
                    // ENOTEMPTY: something was put there meanwhile (a process of the job
                    // with its cwd inside); the next sweep sees it.
                    Err(e) if done.subvolume && e != Errno::ENOTEMPTY => {
                        parent.keeps = true;
                        out.leave(rel, Stay::Subvolume(e.into()));
                    }
                    Err(e) => {
                        parent.keeps = true;
                        out.leave(rel, Stay::Failed(e.into()));
                    }
                }
                continue;
            }
        };

        let rel = level.rel.join(&name);
        let cs = match cached_stat_at(&level.fd(), &name) {
            Ok(cs) => cs,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                level.keeps = true;
                out.leave(rel, Stay::Failed(e));
                continue;
            }
        };
        // Any type: a file can be a mount point too (a bind mount of one file).
        let elsewhere = cs.dev != top_dev && !on_mount(mount_of(level.fd(), &name), top_mount);
        if cs.mount_root || elsewhere {
            level.keeps = true;
            out.leave(rel, Stay::Mount);
            continue;
        }
        if !who.may_unlink(&level.st, cs.uid) {
            level.keeps = true;
            out.leave(rel, Stay::Sticky { uid: cs.uid });
            continue;
        }
        if !cs.is_dir() {
            match unlinkat(level.fd(), name.as_os_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) if cs.is_regular() => out.bytes += cs.size,
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => {
                    level.keeps = true;
                    out.leave(rel, Stay::Failed(e.into()));
                }
            }
            continue;
        }
        let fd = match open_below(level.fd(), &name, &cs, euid) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => continue,
            Err(Errno::EXDEV) => {
                level.keeps = true;
                out.leave(rel, Stay::Mount);
                continue;
            }
            Err(e) => {
                level.keeps = true;
                out.leave(rel, Stay::Failed(e.into()));
                continue;
            }
        };
        let st = match fstat(&fd) {
            Ok(st) if (st.st_dev, st.st_ino) == (cs.dev, cs.ino) => st,
            Ok(st) if st.st_dev != top_dev => {
                level.keeps = true;
                out.leave(rel, Stay::Mount);
                continue;
            }
            Ok(_) => {
                level.keeps = true;
                let e = io::Error::other("replaced while it was being removed");
                out.leave(rel, Stay::Failed(e));
                continue;
            }
            Err(e) => {
                level.keeps = true;
                out.leave(rel, Stay::Failed(e.into()));
                continue;
            }
        };
        // A directory an earlier walk moved up and left at the top (`.c3-kept.*`: swapped in
        // as it was moved; `.c3-deep.*`: a walk cut short) is judged as if nothing sealed it:
        // taken for the agent's own there, the next sweep emptied another user's directory
        // the job had swapped in.
        let sealed_above = level.seals && !(depth == 1 && left_by_an_earlier_walk(&name, &prefix));
        if !who.may_empty(&fd, &st, euid, sealed_above) {
            // Theirs only if empty: removing an empty directory needs the parent alone.
            drop(fd);
            match unlinkat(level.fd(), name.as_os_str(), UnlinkatFlags::RemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::ENOTEMPTY | Errno::EEXIST) => {
                    level.keeps = true;
                    out.leave(rel, Stay::NotTheirs { uid: st.st_uid });
                }
                Err(e) => {
                    level.keeps = true;
                    out.leave(rel, Stay::Failed(e.into()));
                }
            }
            continue;
        }
        open_up(&fd, &st, euid);
        // Moved up to the top (below), a directory seals as it does here: one that seals is
        // the agent's own and closed to the job's users; one that does not is another user's,
        // or one a job's user may add to, wherever it is.
        let seals = who.seals(&fd, &st, sealed_above && st.st_uid == euid);
        let subvolume = st.st_dev != level.st.st_dev;
        if depth < MAX_OPEN {
            match Level::open(fd, st, name, rel.clone(), seals) {
                Ok(next) => stack.push(Level { subvolume, ..next }),
                Err(e) => {
                    level.keeps = true;
                    out.leave(rel, Stay::Failed(e));
                }
            }
            continue;
        }
        // As deep as the walk goes: up to the top with it, to be emptied from there.
        drop(fd);
        let top_fd = stack[0].fd().try_clone_to_owned();
        let level = stack.last_mut().expect("a level is being read");
        before_move_up(level.fd(), &name);
        let moved = top_fd.and_then(|top_fd| loop {
            moves += 1;
            let new = OsString::from(format!("{prefix}{moves}"));
            match renameat2(
                level.fd(),
                name.as_os_str(),
                &top_fd,
                new.as_os_str(),
                RenameFlags::RENAME_NOREPLACE,
            ) {
                Ok(()) => break Ok(Some((top_fd, new))),
                Err(Errno::EEXIST) => continue,
                Err(Errno::ENOENT) => break Ok(None),
                Err(e) => break Err(io::Error::from(e)),
            }
        });
        match moved {
            Ok(Some((top_fd, new))) => {
                // Moved by name from a directory a job's user may write: it may have swapped
                // another directory in under that name since the checks above (root's `out/`
                // of another user's files), which the top would take for the agent's own.
                // Only the walk renames at the top, so what is there now is what was moved.
                let same = cached_stat_at(&top_fd, &new)
                    .is_ok_and(|cs| (cs.dev, cs.ino) == (st.st_dev, st.st_ino));
                if same {
                    at_top += 1;
                    moved_since = true;
                } else {
                    level.keeps = true;
                    let e = io::Error::other("replaced while it was being moved up");
                    out.leave(rel, Stay::Failed(e));
                    // Out of the prefix, so no listing again takes it; one left in it would
                    // be, as the agent's own: no listing again then, and it stays.
                    let mut to = OsString::from(&kept);
                    to.push(format!("{moves}"));
                    let renamed = renameat2(
                        &top_fd,
                        new.as_os_str(),
                        &top_fd,
                        to.as_os_str(),
                        RenameFlags::RENAME_NOREPLACE,
                    );
                    if renamed.is_err() {
                        at_top += 1;
                        no_relist = true;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                level.keeps = true;
                out.leave(rel, Stay::Failed(e));
            }
        }
    }
    out
}

/// A step of listing the top again, for a test to make fail ([`relist_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelistStep {
    /// Opening the top again.
    Open,
    /// Reading the new listing.
    Read,
}

/// The failure a test injects at `step` (`tests::RELIST_FAULT`, on the walk's thread); none
/// outside the tests: a failing open or read of the top is not something a test can cause.
fn relist_fault(step: RelistStep) -> Option<io::Error> {
    #[cfg(test)]
    if tests::RELIST_FAULT.get() == Some(step) {
        return Some(io::Error::other(format!("injected: {step:?} fails")));
    }
    let _ = step;
    None
}

/// A test's window between the checks of a directory met too deep and its move up (a job's
/// user swapping another directory in under its name); nothing outside the tests.
fn before_move_up(parent: BorrowedFd<'_>, name: &OsStr) {
    #[cfg(test)]
    tests::BEFORE_MOVE.with(|hook| {
        if let Some(hook) = hook.borrow_mut().as_mut() {
            hook(parent, name);
        }
    });
    let _ = (parent, name);
}

/// Now in ns since the epoch, never the same twice in this process: two walks of one
/// process (retention's two passes over a job) never share a prefix, so neither takes what
/// the other left at the top.
fn unique_nanos() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::display::epoch_ns(std::time::SystemTime::now()).max(0) as u64;
    let prev = LAST.fetch_max(now, Ordering::Relaxed);
    if prev < now {
        now
    } else {
        LAST.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Settles `name`, an entry of the top a listing again took (`names`: the walk's prefix and
/// the one for what stays): gone, or renamed out of the prefix, keeping its number, so no
/// later listing takes it again; the first entry `out` reports is renamed with it. False
/// when it is still there under the prefix: no listing again may run.
fn settle(top: &Level, name: &OsStr, names: (&str, &str), out: &mut Removal) -> bool {
    let (prefix, kept) = names;
    let Some(number) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
        return true;
    };
    let mut to = OsString::from(kept);
    to.push(OsStr::from_bytes(number));
    match renameat2(
        top.fd(),
        name,
        top.fd(),
        to.as_os_str(),
        RenameFlags::RENAME_NOREPLACE,
    ) {
        Ok(()) => {}
        // Removed.
        Err(Errno::ENOENT) => return true,
        // A mount point (EBUSY), or a name taken that nothing should have taken.
        Err(_) => return false,
    }
    if let Some((first, _)) = out.first_left.as_mut() {
        if let Ok(below) = first.strip_prefix(name) {
            let mut renamed = PathBuf::from(&to);
            if !below.as_os_str().is_empty() {
                renamed.push(below);
            }
            *first = renamed;
        }
    }
    true
}

/// Opens the directory `name` below `parent`: no symlink, and never the root of a mount
/// (EXDEV), so nothing of a mounted file system is asked for anything. A directory its owner
/// closed to itself is opened up first when that owner is the agent (not root).
fn open_below(
    parent: BorrowedFd<'_>,
    name: &OsStr,
    cs: &CachedStat,
    euid: u32,
) -> nix::Result<OwnedFd> {
    let how = || {
        OpenHow::new().flags(DIR_FLAGS).resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_XDEV,
        )
    };
    match openat2(parent, name, how()) {
        // Before 5.6: the caller's device check after the open stands in (a bind mount of
        // the same file system is the mount table's to tell, checked before any removal).
        Err(Errno::ENOSYS) => openat(parent, name, DIR_FLAGS, Mode::empty()),
        Err(Errno::EACCES) if euid != 0 && cs.uid == euid => {
            let path = openat(parent, name, DIR_FLAGS | OFlag::O_PATH, Mode::empty())?;
            let st = fstat(&path)?;
            if st.st_dev != cs.dev || st.st_ino != cs.ino {
                return Err(Errno::EACCES);
            }
            // An O_PATH fd takes no fchmod; its magic link names this very inode.
            nix::sys::stat::fchmodat(
                nix::fcntl::AT_FDCWD,
                format!("/proc/self/fd/{}", path.as_raw_fd()).as_str(),
                Mode::from_bits_truncate((st.st_mode & 0o7777) | 0o700),
                nix::sys::stat::FchmodatFlags::FollowSymlink,
            )?;
            openat2(parent, name, how())
        }
        other => other,
    }
}

/// The mount the entry `name` of `dir` (`dir` itself for an empty name) is on, from the
/// attributes the kernel holds: its id, and whether the entry is its root. `None` where the
/// kernel tells either not (before 5.8).
fn mount_of(dir: BorrowedFd<'_>, name: &OsStr) -> Option<(u64, bool)> {
    let path = std::ffi::CString::new(name.as_bytes()).ok()?;
    let mut flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_STATX_DONT_SYNC;
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `dir` is an open fd borrowed
    // for the call; `stx` is a writable statx the kernel fills.
    let rc = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            path.as_ptr(),
            flags,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    let root = libc::STATX_ATTR_MOUNT_ROOT as u64;
    (rc == 0 && stx.stx_mask & libc::STATX_MNT_ID != 0 && stx.stx_attributes_mask & root != 0)
        .then_some((stx.stx_mnt_id, stx.stx_attributes & root != 0))
}

/// Whether an entry on another device than the top is on the top's own mount all the same
/// ([`mount_of`] it, and the top's mount id): a btrfs subvolume, a directory like any other.
/// Not known (an older kernel): a mount, as it may be.
fn on_mount(entry: Option<(u64, bool)>, top: Option<u64>) -> bool {
    matches!((entry, top), (Some((id, false)), Some(top)) if id == top)
}

/// Gives the agent's own directory back the owner's rwx a job took away, on its fd. Only an
/// agent that is not root needs it; root changes no mode.
fn open_up(dir: &impl AsFd, st: &FileStat, euid: u32) {
    if euid != 0 && st.st_uid == euid && st.st_mode & 0o700 != 0o700 {
        let mode = Mode::from_bits_truncate((st.st_mode & 0o7777) | 0o700);
        let _ = nix::sys::stat::fchmod(dir, mode);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    thread_local! {
        /// A step of the top's listing again that fails on this thread ([`relist_fault`]).
        pub(crate) static RELIST_FAULT: std::cell::Cell<Option<RelistStep>> =
            const { std::cell::Cell::new(None) };
        /// Runs on this thread before a directory met too deep is moved up ([`before_move_up`]).
        pub(crate) static BEFORE_MOVE: std::cell::RefCell<Option<MoveHook>> =
            const { std::cell::RefCell::new(None) };
    }

    pub(crate) type MoveHook = Box<dyn FnMut(BorrowedFd<'_>, &OsStr)>;

    fn is_root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn remove(dir: &Path, who: &Who) -> Removal {
        remove_entries(&DirFd::open(dir).unwrap(), &[], who)
    }

    fn chown(path: &Path, uid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(uid)).unwrap();
    }

    fn job_user(uid: u32) -> Who {
        Who::Users(vec![JobReader {
            uid,
            gids: vec![uid],
        }])
    }

    #[test]
    fn removes_everything_but_what_it_is_told_to_keep_and_counts_bytes() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b/c")).unwrap();
        std::fs::write(t.path().join("a/b/c/f"), [0u8; 10]).unwrap();
        std::fs::write(t.path().join("a/g"), [0u8; 5]).unwrap();
        std::fs::create_dir_all(t.path().join("keep/x")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("a/link")).unwrap();
        let top = DirFd::open(t.path()).unwrap();
        let r = remove_entries(&top, &[OsStr::new("keep")], &Who::Anyone);
        assert_eq!((r.bytes, r.left), (15, 0), "{r:?}");
        let left: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["keep"]);
        assert!(Path::new("/etc/passwd").exists());
    }

    /// A chain deeper than the fds a process may open goes whole, with at most
    /// [`MAX_OPEN`] directories open at a time.
    #[test]
    fn a_chain_deeper_than_the_fd_limit_goes() {
        let t = tempfile::tempdir().unwrap();
        let (soft, _) =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let depth = usize::try_from(soft).unwrap_or(usize::MAX).min(4000) + 64;
        let mut dir = DirFd::open(t.path()).unwrap();
        for _ in 0..depth {
            dir = dir.ensure_dir(Path::new("d"), 0o755, None).unwrap();
        }
        std::fs::write(t.path().join("sibling"), "x").unwrap();
        drop(dir);
        let r = remove(t.path(), &Who::Anyone);
        assert_eq!(r.left, 0, "{r:?}");
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    /// A chain of `MAX_OPEN - 1` directories below `top` (owned by `owner`): what is made in
    /// the last is met at the depth where the walk moves directories up.
    fn chain(top: &Path, owner: Option<(u32, u32)>) -> DirFd {
        let mut dir = DirFd::open(top).unwrap();
        for _ in 0..MAX_OPEN - 1 {
            dir = dir.ensure_dir(Path::new("d"), 0o755, owner).unwrap();
        }
        dir
    }

    /// The top's entries, by name.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Counts what this thread allocates while [`held_during`] runs, for the test below: the
    /// walk's memory must not grow with the width of the tree.
    struct Counting;

    thread_local! {
        /// While set: the bytes allocated and not freed since it was set, and their peak.
        static HELD: std::cell::Cell<Option<(isize, isize)>> =
            const { std::cell::Cell::new(None) };
    }

    fn count(delta: isize) {
        // `try_with`: an allocation while the thread is being torn down counts for nothing.
        let _ = HELD.try_with(|held| {
            if let Some((now, peak)) = held.get() {
                held.set(Some((now + delta, peak.max(now + delta))));
            }
        });
    }

    // SAFETY: every call is passed on to the system allocator as it came; the counting
    // allocates nothing.
    unsafe impl std::alloc::GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            count(layout.size() as isize);
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            count(-(layout.size() as isize));
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }

        unsafe fn realloc(
            &self,
            ptr: *mut u8,
            layout: std::alloc::Layout,
            new_size: usize,
        ) -> *mut u8 {
            count(new_size as isize - layout.size() as isize);
            // SAFETY: the caller's contract, passed on.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// Runs `f`; returns what it returned and the most bytes it held at once.
    pub(crate) fn held_during<T>(f: impl FnOnce() -> T) -> (T, isize) {
        HELD.set(Some((0, 0)));
        let out = f();
        let (_, peak) = HELD.take().unwrap_or_default();
        (out, peak)
    }

    /// Tens of thousands of directories just past [`MAX_OPEN`] go in memory that does not
    /// grow with their number: the walk keeps no list of the directories it moved up (a
    /// job's ten million held 700 MB of names in the root agent).
    #[test]
    fn many_directories_past_the_depth_limit_take_no_memory_each() {
        let t = tempfile::tempdir().unwrap();
        let bottom = chain(t.path(), None);
        for i in 0..20_000 {
            let name = format!("sibling-number-{i:08}");
            nix::sys::stat::mkdirat(&bottom, name.as_str(), Mode::S_IRWXU).unwrap();
        }
        drop(bottom);
        let (r, peak) = held_during(|| remove(t.path(), &Who::Anyone));
        assert_eq!(r.left, 0, "{r:?}");
        assert_eq!(names(t.path()), Vec::<String>::new());
        assert!(peak < 256 * 1024, "held {peak} bytes at once");
    }

    /// [`remove`] as `Who::Anyone` on a thread of its own, with `fault` injected into the
    /// top's listings again, given a minute: a walk that spins fails the test, not hangs it.
    fn remove_in_time(dir: &Path, fault: Option<RelistStep>) -> Removal {
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = dir.to_path_buf();
        std::thread::spawn(move || {
            RELIST_FAULT.set(fault);
            let _ = tx.send(remove(&dir, &Who::Anyone));
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .expect("the walk did not end within a minute")
    }

    /// The top listed again for the directories moved up to it, and that listing failing
    /// (to open or to read): the walk ends there, and the directories it could not find
    /// again stay at the top, reported; it never lists again and again.
    #[test]
    fn a_failing_relist_of_the_top_ends_the_walk() {
        for fault in [RelistStep::Open, RelistStep::Read] {
            let t = tempfile::tempdir().unwrap();
            let bottom = chain(t.path(), None);
            bottom.ensure_dir(Path::new("x/y"), 0o755, None).unwrap();
            bottom.ensure_dir(Path::new("z"), 0o755, None).unwrap();
            drop(bottom);
            let r = remove_in_time(t.path(), Some(fault));
            // The two moved up, and a listing that failed to read is reported as well.
            let read_failed = u64::from(fault == RelistStep::Read);
            assert_eq!(r.left, 2 + read_failed, "{fault:?}: {r:?}");
            assert!(
                matches!(&r.first_left, Some((_, Stay::Failed(_)))),
                "{fault:?}: {r:?}"
            );
            let left = names(t.path());
            assert_eq!(left.len(), 2, "{fault:?}: {left:?}");
            assert!(left.iter().all(|n| n.starts_with(".c3-deep.")), "{left:?}");
        }
    }

    /// However many listings of the top a tree needs, the walk stops after the most it may
    /// make, and what it did not find again stays, reported.
    #[test]
    fn relists_of_the_top_are_bounded() {
        let t = tempfile::tempdir().unwrap();
        let mut dir = DirFd::open(t.path()).unwrap();
        for _ in 0..4 * MAX_OPEN {
            dir = dir.ensure_dir(Path::new("d"), 0o755, None).unwrap();
        }
        drop(dir);
        let r = walk(
            &DirFd::open(t.path()).unwrap(),
            &[],
            &Who::Anyone,
            1,
            &AtomicBool::new(false),
        );
        assert_eq!(r.left, 1, "{r:?}");
        let left = names(t.path());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with(".c3-deep."), "{left:?}");
        // With listings enough, all of it goes.
        assert_eq!(remove_in_time(t.path(), None).left, 0);
        assert_eq!(names(t.path()), Vec::<String>::new());
    }

    /// A directory moved up that keeps something (here another user's directory a job's user
    /// moved in) is renamed out of the walk's prefix, so no later listing of the top takes it
    /// again; it stays, reported by its new name. Root only (chown).
    #[test]
    fn what_stays_of_a_directory_moved_up_leaves_the_prefix() {
        if !is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bottom = nobodys_chain(t.path());
        std::fs::create_dir_all(bottom.join("x/victim")).unwrap();
        std::fs::write(bottom.join("x/victim/f"), "bob's").unwrap();
        for (path, uid) in [("x/victim/f", 1), ("x/victim", 1), ("x", 65534)] {
            chown(&bottom.join(path), uid);
        }

        let r = remove(t.path(), &job_user(65534));
        assert_eq!(r.left, 1, "{r:?}");
        let left = names(t.path());
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(left[0].starts_with(".c3-kept."), "{left:?}");
        let kept = t.path().join(&left[0]);
        assert_eq!(
            std::fs::read_to_string(kept.join("victim/f")).unwrap(),
            "bob's"
        );
        let (rel, _) = r.first_left.as_ref().unwrap();
        assert_eq!(t.path().join(rel), kept.join("victim"), "{r:?}");
    }

    /// A directory swapped in under the name of one met too deep, between its checks and its
    /// move up (root's `out/` holding another user's file, for the job's user's own `x`), is
    /// not taken at the top for the agent's own: the other user's file stays. Root only.
    #[test]
    fn a_directory_swapped_in_as_it_is_moved_up_is_not_emptied() {
        if !is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let bottom = nobodys_chain(t.path());
        std::fs::create_dir_all(bottom.join("x")).unwrap();
        std::fs::create_dir_all(bottom.join("out")).unwrap();
        std::fs::write(bottom.join("out/f"), "bob's").unwrap();
        chown(&bottom.join("x"), 65534);
        chown(&bottom.join("out/f"), 1);
        let mut swapped = false;
        BEFORE_MOVE.set(Some(Box::new(move |parent, name| {
            if name == "x" && !swapped {
                swapped = true;
                nix::fcntl::renameat2(
                    parent,
                    "x",
                    parent,
                    "out",
                    nix::fcntl::RenameFlags::RENAME_EXCHANGE,
                )
                .unwrap();
            }
        })));
        let r = remove(t.path(), &job_user(65534));
        BEFORE_MOVE.set(None);
        assert!(r.left >= 1, "{r:?}");
        let survived = walk_files(t.path());
        assert!(
            survived.iter().any(|(_, body)| body == "bob's"),
            "the other user's file was removed: {r:?}"
        );
        // The next sweep meets it at the top, where this walk kept it (`.c3-kept.*`): root's
        // directory there is no agent's own, and stays with what it holds.
        let again = remove(t.path(), &job_user(65534));
        let survived = walk_files(t.path());
        assert!(
            survived.iter().any(|(_, body)| body == "bob's"),
            "the next sweep removed the other user's file: {again:?}"
        );
    }

    /// `work/d/d/...` below `top`, `nobody`'s, as deep as the walk goes before it moves what
    /// it meets up: returns the deepest `d`, whose entries are moved.
    fn nobodys_chain(top: &Path) -> PathBuf {
        let work = top.join("work");
        std::fs::create_dir(&work).unwrap();
        chown(&work, 65534);
        let mut dir = DirFd::open(&work).unwrap();
        for _ in 0..MAX_OPEN - 2 {
            dir = dir
                .ensure_dir(Path::new("d"), 0o755, Some((65534, 65534)))
                .unwrap();
        }
        work.join("d/".repeat(MAX_OPEN - 2))
    }

    /// Every regular file below `dir` and its contents.
    fn walk_files(dir: &Path) -> Vec<(PathBuf, String)> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    todo.push(e.path());
                } else if t.is_file() {
                    out.push((e.path(), std::fs::read_to_string(e.path()).unwrap()));
                }
            }
        }
        out
    }

    /// What is mounted inside is never opened, let alone emptied; the directories above it
    /// stay, the rest goes. Root only (mount); skipped where mounting is not allowed.
    #[test]
    fn a_mount_inside_is_never_entered() {
        let t = tempfile::tempdir().unwrap();
        let point = t.path().join("w/data");
        std::fs::create_dir_all(&point).unwrap();
        std::fs::write(t.path().join("w/f"), "x").unwrap();
        let Some(_mounted) = Tmpfs::mount(&point) else {
            return;
        };
        std::fs::write(point.join("dataset"), "d").unwrap();
        let r = remove(t.path(), &Who::Anyone);
        assert_eq!(r.left, 1, "{r:?}");
        assert!(matches!(&r.first_left, Some((p, Stay::Mount)) if p == Path::new("w/data")));
        assert!(point.join("dataset").is_file());
        assert!(!t.path().join("w/f").exists());
    }

    /// A btrfs subvolume has a device of its own, as a mount does, but it is no mount (any
    /// user may make one, `btrfs subvolume create`): on the top's own mount, and not its
    /// root, it is a directory like any other. What the kernel does not tell is a mount.
    #[test]
    fn only_a_subvolume_of_the_tops_own_mount_is_entered() {
        assert!(on_mount(Some((7, false)), Some(7)));
        assert!(!on_mount(Some((8, false)), Some(7)), "another mount");
        assert!(
            !on_mount(Some((7, true)), Some(7)),
            "a bind mount of the top's"
        );
        assert!(!on_mount(None, Some(7)));
        assert!(!on_mount(Some((7, false)), None));
    }

    /// A subvolume a job made in its workdir goes, with what is in it; a file system mounted
    /// beside it stays. The subvolume was taken for a mount: it stayed, and the job with it,
    /// for ever. Root only (a loop mount); skipped where btrfs cannot be made and mounted.
    #[test]
    fn a_btrfs_subvolume_inside_goes() {
        let t = tempfile::tempdir().unwrap();
        let Some(fs) = Btrfs::mount(&t.path().join("img"), &t.path().join("m")) else {
            return;
        };
        let top = fs.0.join("top");
        std::fs::create_dir_all(top.join("w")).unwrap();
        let made = std::process::Command::new("btrfs")
            .args(["subvolume", "create"])
            .arg(top.join("w/sub"))
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "btrfs subvolume create failed");
        std::fs::create_dir_all(top.join("w/sub/d")).unwrap();
        std::fs::write(top.join("w/sub/d/f"), [1u8; 10]).unwrap();
        let point = top.join("data");
        std::fs::create_dir_all(&point).unwrap();
        let Some(_mounted) = Tmpfs::mount(&point) else {
            return;
        };
        std::fs::write(point.join("dataset"), "d").unwrap();
        let r = remove(&top, &Who::Anyone);
        assert_eq!(r.left, 1, "{r:?}");
        assert!(matches!(&r.first_left, Some((p, Stay::Mount)) if p == Path::new("data")));
        assert!(!top.join("w").exists(), "{r:?}");
        assert_eq!(r.bytes, 10);
        assert!(point.join("dataset").is_file());
    }

    /// A loop-mounted btrfs, unmounted (lazily) when dropped.
    struct Btrfs(PathBuf);

    impl Btrfs {
        /// `None` (and a line saying the test is skipped) without root, `mkfs.btrfs` or loop
        /// devices.
        fn mount(image: &Path, at: &Path) -> Option<Btrfs> {
            if !is_root() {
                crate::testskip::skip("mounting btrfs needs root");
                return None;
            }
            std::fs::create_dir_all(at).unwrap();
            let ok = |cmd: &mut std::process::Command| {
                cmd.stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            let mkfs = ["/usr/sbin/mkfs.btrfs", "/sbin/mkfs.btrfs"]
                .into_iter()
                .find(|p| Path::new(p).exists())
                .unwrap_or("mkfs.btrfs");
            let made = ok(std::process::Command::new("truncate")
                .args(["-s", "256M"])
                .arg(image))
                && ok(std::process::Command::new(mkfs).arg("-q").arg(image));
            if !made
                || !ok(std::process::Command::new("mount")
                    .args(["-o", "loop"])
                    .arg(image)
                    .arg(at))
            {
                crate::testskip::skip("cannot make and loop-mount a btrfs here");
                return None;
            }
            Some(Btrfs(at.to_path_buf()))
        }
    }

    impl Drop for Btrfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }

    /// A job's user that moved another user's directory into its tree does not get root to
    /// delete that user's files: a directory it could not have emptied stays, and so do
    /// the entries of a sticky directory that are neither its nor in its own.
    #[test]
    fn only_what_the_jobs_user_could_remove_goes() {
        if !is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("work");
        std::fs::create_dir_all(work.join("moved/victim")).unwrap();
        std::fs::write(work.join("moved/victim/f"), "bob's").unwrap();
        std::fs::write(work.join("moved/mine"), "job's").unwrap();
        std::fs::create_dir_all(work.join("moved/empty")).unwrap();
        chown(&work.join("moved/empty"), 1);
        chown(&work.join("moved/victim/f"), 1);
        chown(&work.join("moved/victim"), 1);
        chown(&work.join("moved"), 65534);
        // A sticky directory the job may write: its own file goes, another's stays.
        std::fs::create_dir_all(work.join("shared")).unwrap();
        std::fs::write(work.join("shared/theirs"), "x").unwrap();
        std::fs::write(work.join("shared/ours"), "x").unwrap();
        chown(&work.join("shared/theirs"), 1);
        chown(&work.join("shared/ours"), 65534);
        chown(&work.join("shared"), 2);
        std::fs::set_permissions(work.join("shared"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        // A directory of another user the job may write (group): emptied.
        std::fs::create_dir_all(work.join("team/sub")).unwrap();
        std::fs::write(work.join("team/sub/f"), "x").unwrap();
        chown(&work.join("team/sub/f"), 3);
        chown(&work.join("team/sub"), 65534);
        std::os::unix::fs::chown(work.join("team"), Some(3), Some(4242)).unwrap();
        std::fs::set_permissions(work.join("team"), std::fs::Permissions::from_mode(0o770))
            .unwrap();
        let who = Who::Users(vec![JobReader {
            uid: 65534,
            gids: vec![65534, 4242],
        }]);

        let r = remove(t.path(), &who);
        assert_eq!(r.left, 2, "{r:?}");
        assert!(work.join("moved/victim/f").is_file());
        assert!(work.join("shared/theirs").is_file());
        for gone in ["moved/mine", "moved/empty", "shared/ours", "team"] {
            assert!(!work.join(gone).exists(), "{gone}");
        }
        // The job's own user sees all of it go once the other user's things are gone.
        std::fs::remove_dir_all(work.join("moved/victim")).unwrap();
        std::fs::remove_file(work.join("shared/theirs")).unwrap();
        assert_eq!(remove(t.path(), &job_user(65534)).left, 0);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }

    /// Root's directories count as the agent's only where no job user could have put them:
    /// one inside a directory the job's user may write (docker's `out/` in a tree the user
    /// moved into its workdir, or in a root directory the user may write) is another's, and
    /// what the user could not remove in it stays. The agent's own above the workdir go.
    #[test]
    fn roots_directory_inside_the_jobs_is_not_the_agents() {
        if !is_root() {
            crate::testskip::skip("needs root (chown)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let work = t.path().join("parent/work");
        std::fs::create_dir_all(work.join("proj/out")).unwrap();
        std::fs::write(work.join("proj/out/f"), "alice's").unwrap();
        std::fs::write(work.join("proj/mine"), "job's").unwrap();
        chown(&work.join("proj/out/f"), 1);
        chown(&work.join("proj/mine"), 65534);
        chown(&work.join("proj"), 65534);
        chown(&work, 65534);
        // Root's, but the job's user may write it: what is in it may be the user's doing.
        std::fs::create_dir_all(work.join("open/sub")).unwrap();
        std::fs::write(work.join("open/sub/f"), "root's").unwrap();
        std::fs::set_permissions(work.join("open"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        // The agent's own: root's, 0711 or 0700, nobody else's to write.
        std::fs::set_permissions(
            t.path().join("parent"),
            std::fs::Permissions::from_mode(0o711),
        )
        .unwrap();
        std::fs::create_dir_all(t.path().join("attempts/1")).unwrap();
        std::fs::write(t.path().join("attempts/1/run.json"), "{}").unwrap();

        let r = remove(t.path(), &job_user(65534));
        assert_eq!(r.left, 2, "{r:?}");
        assert!(
            matches!(&r.first_left, Some((p, Stay::NotTheirs { uid: 0 }))
                if p.starts_with("parent/work")),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read_to_string(work.join("proj/out/f")).unwrap(),
            "alice's"
        );
        assert!(work.join("open/sub/f").is_file());
        assert!(!work.join("proj/mine").exists());
        assert!(!t.path().join("attempts").exists());
    }

    /// The agent's own directories a job closed to their owner are opened up on their fds;
    /// a symlink to a directory outside is never followed (its target keeps its mode), and
    /// as root no mode is changed at all.
    #[test]
    fn closed_directories_go_and_nothing_outside_changes() {
        let t = tempfile::tempdir().unwrap();
        let (root, outside) = (t.path().join("t"), t.path().join("outside"));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/f"), "x").unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o555)).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/link")).unwrap();
        std::fs::set_permissions(root.join("a/b"), std::fs::Permissions::from_mode(0o000)).unwrap();
        std::fs::set_permissions(root.join("a"), std::fs::Permissions::from_mode(0o500)).unwrap();
        let r = remove(&root, &Who::Anyone);
        assert_eq!(r.left, 0, "{r:?}");
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
        let mode = std::fs::symlink_metadata(&outside)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o555, "followed a symlink");
    }

    /// A tmpfs mounted for a test, unmounted (lazily) when dropped.
    pub(crate) struct Tmpfs(PathBuf);

    impl Tmpfs {
        /// `None` (and a line saying the test is skipped) where mounting is not allowed.
        pub(crate) fn mount(at: &Path) -> Option<Tmpfs> {
            Self::mount_sized(at, None)
        }

        /// [`Tmpfs::mount`] of `size` (`8m`), or the kernel's default.
        pub(crate) fn mount_sized(at: &Path, size: Option<&str>) -> Option<Tmpfs> {
            let options = size.map(|s| format!("size={s}"));
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs"])
                .args(options.iter().flat_map(|o| ["-o", o.as_str()]))
                .arg("c3-test")
                .arg(at)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !mounted {
                crate::testskip::skip("cannot mount a tmpfs here");
                return None;
            }
            Some(Tmpfs(at.to_path_buf()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}
