//! inotify (through `notify`) turned into a small closed set of hints for the live syncer.
//!
//! The watcher is a hint, never the truth: a full queue, an inotify overflow, or any
//! watcher error becomes [`Hint::Rescan`], and a failure to set watches becomes
//! [`Hint::Degraded`] so the syncer falls back to polling. The final scan does not
//! depend on any of this.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use notify::event::{ModifyKind, RenameMode};
use notify::{Event, EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::confine::{is_dir, DirFd};
use crate::treewalk::{Item, TreeWalk};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Something at this path was written, closed, created or moved in.
    Touched(PathBuf),
    /// This path (file or directory) was removed or moved away.
    Gone(PathBuf),
    /// Events were lost; look at everything again.
    Rescan(String),
    /// Watches cannot be kept (the watch limit); poll from now on.
    Degraded(String),
}

/// The most bytes of watched paths a job may make the agent hold: a chain of 63 directories
/// of 255-byte names with 8,000 short ones at its bottom held 400 MB (each path 16 KiB,
/// kept three times), the inodes costing the job nothing. Past it, live sync polls.
pub const MAX_WATCHED_PATH_BYTES: usize = 16 << 20;

/// Owns the `notify` watcher; dropping it stops the watches.
///
/// Watches are set one directory at a time (never notify's own recursion), so the agent
/// decides what is watched: never through a symlink (a job's `u -> /usr` must not cost the
/// node its inotify watches, which systemd and udev need too), and never more than
/// `max_watches` of them.
///
/// A watch is set on the directory the agent opened, not on its path: notify takes a path
/// and inotify follows symlinks in it, so a job that swaps the directory for a symlink
/// between the open and the watch (`renameat2(RENAME_EXCHANGE)`) would have root watch
/// whatever it points at (another tenant's tree, an automount, a dead NFS mount that hangs
/// the watcher). Each watch goes through an alias of its own, a symlink in a root-only
/// temp dir to `/proc/self/fd/<the open fd>`, which the kernel resolves to that very
/// directory. The alias is removed at once; events name it, and are mapped back.
pub struct DirWatcher {
    watcher: notify::RecommendedWatcher,
    /// Watched directories are opened beneath it, never through a symlink.
    workdir: PathBuf,
    /// Each watched directory (its path under the workdir): the alias it is watched by, and
    /// which directory it was (see [`DirWatcher::prune`]).
    /// Sorted: what is below a directory follows it ([`DirWatcher::unwatch_tree`]).
    watched: BTreeMap<PathBuf, Watch>,
    /// The bytes of the paths in `watched` (each kept three times over, with `by_id` and the
    /// aliases), held under [`MAX_WATCHED_PATH_BYTES`].
    path_bytes: usize,
    max_path_bytes: usize,
    /// The most entries one walk meets ([`MAX_WALK_ENTRIES`]).
    max_walk_entries: u64,
    /// Which name in `watched` each directory (device, inode) is watched under: the kernel
    /// keeps one watch per inode and gives it again when the inode is watched under another
    /// name (see [`DirWatcher::watch_fd`]). Written with `watched`, by the syncer alone.
    by_id: HashMap<(u64, u64), PathBuf>,
    aliases: Arc<Aliases>,
    max_watches: usize,
    /// Owned here, not by `Aliases`: the event handler holds those until notify's thread lets
    /// go of it, which an exiting agent does not wait for, and /tmp kept one dir per job.
    _alias_dir: tempfile::TempDir,
    /// Set by the event handler when a hint did not fit the queue (see [`DirWatcher::take_lost`]).
    overflowed: Arc<AtomicBool>,
    /// See [`DirWatcher::writes_queued`].
    writes_queued: WritesQueued,
}

/// Files with a `Touched` hint of a write (`IN_MODIFY`) in the queue: a job printing a log
/// line at a time into an output dir makes one event per `write(2)`, tens of thousands a
/// second, and each hint an lstat walk of the syncer's; while one waits in the queue another
/// says nothing new (it is looked at when handled, as the file is then). The syncer takes a
/// path out as it takes its hint ([`take_queued_write`]). At most the queue's length.
pub type WritesQueued = Arc<Mutex<std::collections::HashSet<PathBuf>>>;

/// The syncer has taken a hint for `path`: a write after this one is news again.
pub fn take_queued_write(queued: &WritesQueued, path: &Path) {
    queued
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(path);
}

/// One watched directory.
struct Watch {
    alias: PathBuf,
    /// Device and inode of the directory watched: a name may be another directory later.
    id: (u64, u64),
}

/// Where watch aliases are made, and which directory each one stands for.
struct Aliases {
    dir: PathBuf,
    next: std::sync::atomic::AtomicU64,
    of: Mutex<HashMap<std::ffi::OsString, PathBuf>>,
}

impl Aliases {
    /// `path` as notify reports it (an alias, or a name below one), as the watched path.
    fn resolve(&self, path: &Path) -> Option<PathBuf> {
        let below = path.strip_prefix(&self.dir).ok()?;
        let mut parts = below.components();
        let Some(Component::Normal(id)) = parts.next() else {
            return None;
        };
        let of = self.of.lock().unwrap_or_else(|p| p.into_inner());
        Some(of.get(id)?.join(parts.as_path()))
    }
}

impl Aliases {
    /// Whether `w`'s kernel watch still stands: its alias was not forgotten when a removal
    /// (`DELETE_SELF`) took the watch. Its directory id alone does not say so: a directory
    /// made again at once often gets the removed one's inode number.
    fn live(&self, w: &Watch) -> bool {
        let of = self.of.lock().unwrap_or_else(|p| p.into_inner());
        w.alias
            .file_name()
            .is_some_and(|name| of.contains_key(name))
    }

    /// A watched directory removed (`DELETE_SELF`: the event names the alias itself) took its
    /// kernel watch with it: its alias stands for nothing any more. Done here, on notify's
    /// thread, whatever becomes of the hint: [`DirWatcher::prune`] must know the watch is gone
    /// even when a new directory got the old one's inode number.
    fn forget_removed(&self, event: &Event) {
        if !matches!(event.kind, EventKind::Remove(_)) {
            return;
        }
        for p in &event.paths {
            if let Some(name) = p.file_name().filter(|_| p.parent() == Some(&self.dir)) {
                let mut of = self.of.lock().unwrap_or_else(|p| p.into_inner());
                of.remove(name);
            }
        }
    }
}

/// The most entries one walk to set watches meets before polling takes over.
pub const MAX_WALK_ENTRIES: u64 = 2_000_000;

/// Setting watches stopped: poll from now on.
#[derive(Debug, thiserror::Error)]
pub enum WatchStopped {
    #[error("more than {max} directories to watch (sync.max_watches)")]
    Cap { max: usize },
    #[error("the paths of the directories to watch pass {max} bytes")]
    PathBytes { max: usize },
    #[error("a walk to set watches met more than {max} entries")]
    Entries { max: u64 },
    /// The alias a watch goes through could not be made (the temp dir gone: a tmp cleaner).
    #[error("cannot make a watch alias: {0}")]
    Alias(std::io::Error),
}

impl DirWatcher {
    /// Whether hints were dropped for a full queue since the last look (and clears it). The
    /// handler sends the rescan that makes up for them only with the next event: a job that
    /// went quiet after a burst (a checkpoint's 2,000 shards) left its last files unlisted
    /// until the end. The syncer asks when it has drained the queue.
    pub fn take_lost(&self) -> bool {
        self.overflowed.swap(false, Ordering::AcqRel)
    }

    pub fn watch_count(&self) -> usize {
        self.watched.len()
    }

    /// The files whose write hints wait in the queue ([`WritesQueued`]).
    pub fn writes_queued(&self) -> WritesQueued {
        self.writes_queued.clone()
    }

    /// Whether `dir` has a watch.
    pub fn watches(&self, dir: &Path) -> bool {
        self.watched.contains_key(dir)
    }

    /// Watches the open directory `fd` (which is `d`, the directory `id`) through a fresh
    /// alias.
    fn watch_fd(
        &mut self,
        fd: &DirFd,
        d: &Path,
        id: (u64, u64),
    ) -> Result<notify::Result<()>, WatchStopped> {
        let name = self
            .aliases
            .next
            .fetch_add(1, Ordering::Relaxed)
            .to_string();
        let alias = self.aliases.dir.join(&name);
        std::os::unix::fs::symlink(
            format!("/proc/self/fd/{}", std::os::fd::AsFd::as_fd(fd).as_raw_fd()),
            &alias,
        )
        .map_err(WatchStopped::Alias)?;
        self.aliases
            .of
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone().into(), d.to_path_buf());
        let watched = self.watcher.watch(&alias, RecursiveMode::NonRecursive);
        let _ = std::fs::remove_file(&alias);
        Ok(match watched {
            Ok(()) => {
                if self
                    .watched
                    .insert(d.to_path_buf(), Watch { alias, id })
                    .is_some()
                {
                    self.path_bytes -= d.as_os_str().len();
                }
                self.path_bytes += d.as_os_str().len();
                self.by_id.insert(id, d.to_path_buf());
                Ok(())
            }
            Err(e) => {
                self.aliases
                    .of
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(std::ffi::OsStr::new(&name));
                Err(e)
            }
        })
    }

    /// Watches `dir` (below the workdir) and every directory below it, meeting at most
    /// [`MAX_WALK_ENTRIES`] entries. Each directory is
    /// first opened from the workdir with no symlink in any component, and its children are
    /// listed from that fd: a directory swapped for a symlink is never walked into.
    pub fn watch_tree(&mut self, dir: &Path) -> Result<(), WatchStopped> {
        let Ok(rel) = dir.strip_prefix(&self.workdir) else {
            return Ok(());
        };
        let Ok(root) = DirFd::open_root(&self.workdir) else {
            return Ok(());
        };
        let Ok(top) = root.open_dir(rel) else {
            return Ok(());
        };
        if !self.watch_once(&top, rel)? {
            return Ok(());
        }
        // Debug builds: a walk that takes a minute (a tree of millions of entries on NFS).
        crate::fault::blocking_pause("watch-walk-is-slow", std::time::Duration::from_secs(60));
        // Each directory is read as a stream: a directory of a million subdirectories is not
        // listed into memory first (past `max_watches` the walk stops anyway).
        let Ok(mut walk) = TreeWalk::new(top, rel.as_os_str().as_bytes().to_vec()) else {
            return Ok(());
        };
        let mut met = 0u64;
        while let Some(item) = walk.next() {
            // Files count too: a tree of millions of them (or a directory another process
            // keeps renaming in, which readdir then returns again) is for polling's scans,
            // which have a budget of their own.
            met += 1;
            if met > self.max_walk_entries {
                return Err(WatchStopped::Entries {
                    max: self.max_walk_entries,
                });
            }
            let Item::Entry(entry) = item else {
                continue;
            };
            if !entry.stat.as_ref().is_ok_and(is_dir) {
                continue;
            }
            // Deeper or longer than a manifest path can be: its files are never synced live
            // (the final scan names them), and each level holds two fds while walked.
            if !c3_proto::manifest::path_fits(&entry.rel) {
                continue;
            }
            let Ok(fd) = entry.open_dir() else {
                continue;
            };
            if self.watch_once(&fd, Path::new(OsStr::from_bytes(&entry.rel)))? {
                let _ = walk.enter(fd, entry.rel);
            }
        }
        Ok(())
    }

    /// Watches the open directory `rel` (below the workdir) unless it is already; `false`
    /// when it is gone.
    fn watch_once(&mut self, fd: &DirFd, rel: &Path) -> Result<bool, WatchStopped> {
        let d = self.workdir.join(rel);
        if let Some(w) = self.watched.get(&d) {
            // The name's watch is on the directory there now, or it is another's (one
            // exchanged in, `RENAME_EXCHANGE`, its hints not yet handled): that one's go.
            let here = crate::confine::fstat(fd).map(|st| (st.st_dev, st.st_ino));
            if here.as_ref().is_ok_and(|id| *id == w.id) && self.aliases.live(w) {
                return Ok(true);
            }
            self.unwatch_tree(&d);
        }
        let id = match crate::confine::fstat(fd) {
            Ok(st) => (st.st_dev, st.st_ino),
            // Gone meanwhile: nothing to watch.
            Err(_) => return Ok(false),
        };
        // Watched already under another name (`mkdir new && mv a new/b`, `new` walked before
        // `a`'s `Gone` came, or with that `Gone` lost): inotify would hand back the very
        // watch `a` holds, and dropping `a` later (its `Gone`, a prune) would remove it from
        // under `new/b`, leaving `new/b` taken as watched and unseen. The old name's watch
        // goes first, so the inode has one name here as in the kernel. What happens there
        // meanwhile is not missed: every walk is followed by a scan of what it walked.
        if let Some(other) = self.by_id.get(&id).filter(|p| **p != d).cloned() {
            self.unwatch(&other);
        }
        if self.watched.len() >= self.max_watches {
            return Err(WatchStopped::Cap {
                max: self.max_watches,
            });
        }
        if self.path_bytes + d.as_os_str().len() > self.max_path_bytes {
            return Err(WatchStopped::PathBytes {
                max: self.max_path_bytes,
            });
        }
        match self.watch_fd(fd, &d, id)? {
            Ok(()) => Ok(true),
            Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                Err(WatchStopped::Cap {
                    max: self.watched.len(),
                })
            }
            // Gone meanwhile: nothing to watch.
            Err(_) => Ok(false),
        }
    }

    /// Drops the watches of `dir` and below (removed or moved away).
    pub fn unwatch_tree(&mut self, dir: &Path) {
        // What is below `dir` sorts right after it (paths compare by component): a `Gone` of
        // a file looks at no other watch, however many a deep tree holds.
        let gone: Vec<PathBuf> = self
            .watched
            .range::<Path, _>((std::ops::Bound::Included(dir), std::ops::Bound::Unbounded))
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(dir))
            .cloned()
            .collect();
        for p in gone {
            self.unwatch(&p);
        }
    }

    /// [`DirWatcher::unwatch_tree`], unless the directory watched at `dir` is the one there
    /// now (`now`: the device and inode found at the name): a `Gone` handled after the same
    /// directory came back (the second half of an exchange) took the watch of what is there.
    /// True when a directory was watched there and another one is there now: another inode,
    /// or the same number on a new directory (the watched one deleted, its watch dropped by
    /// the kernel, and ext4 or tmpfs handing its inode to the `mkdir` after).
    pub fn unwatch_tree_unless(&mut self, dir: &Path, now: Option<(u64, u64)>) -> bool {
        let watched = self.watched.get(dir);
        if now.is_some() && watched.is_some_and(|w| Some(w.id) == now && self.aliases.live(w)) {
            return false;
        }
        let replaced = now.is_some() && watched.is_some();
        self.unwatch_tree(dir);
        replaced
    }

    /// Drops the watch of the directory `d` (only that one).
    fn unwatch(&mut self, d: &Path) {
        let Some(w) = self.watched.remove(d) else {
            return;
        };
        self.path_bytes -= d.as_os_str().len();
        if self.by_id.get(&w.id).is_some_and(|p| p == d) {
            self.by_id.remove(&w.id);
        }
        // The kernel already dropped the watch of a deleted directory.
        let _ = self.watcher.unwatch(&w.alias);
        if let Some(name) = w.alias.file_name() {
            let mut of = self.aliases.of.lock().unwrap_or_else(|p| p.into_inner());
            of.remove(name);
        }
    }

    /// Drops the watches of directories that are gone, or whose name is another directory
    /// now; returns how many. Such a watch normally goes with the `Gone` hint of its removal,
    /// but hints are lost when the queue overflows: each lost one kept its name and a slot
    /// of `max_watches` for the rest of the job (a job making and removing directories in
    /// bursts pushed live sync into polling), and a directory made again under that name was
    /// taken as watched and never was.
    pub fn prune(&mut self) -> usize {
        let Ok(root) = DirFd::open_root(&self.workdir) else {
            return 0;
        };
        // Which aliases still stand for a watch, taken under the lock and then let go: the
        // looks below touch the job's paths, and notify's thread needs the lock for every event.
        let removed: std::collections::HashSet<PathBuf> = {
            let of = self.aliases.of.lock().unwrap_or_else(|p| p.into_inner());
            self.watched
                .iter()
                .filter(|(_, w)| {
                    w.alias
                        .file_name()
                        .is_none_or(|name| !of.contains_key(name))
                })
                .map(|(d, _)| d.clone())
                .collect()
        };
        let stale: Vec<PathBuf> = self
            .watched
            .iter()
            .filter(|(d, w)| {
                if removed.contains(*d) {
                    return true;
                }
                let now = match d.strip_prefix(&self.workdir) {
                    Ok(rel) if rel.as_os_str().is_empty() => crate::confine::fstat(&root),
                    Ok(rel) => crate::confine::lstat_beneath(&root, rel),
                    Err(_) => return true,
                };
                !now.is_ok_and(|st| is_dir(&st) && (st.st_dev, st.st_ino) == w.id)
            })
            .map(|(d, _)| d.clone())
            .collect();
        for d in &stale {
            self.unwatch(d);
        }
        stale.len()
    }
}

/// The alias scratch dirs' names: `c3-agent-watch-<pid>.<start>-XXXXXX` in the temp dir.
const ALIAS_DIR: &str = "c3-agent-watch-";

/// Removes the alias scratch dirs of agents that are gone (a SIGKILL or an OOM kill leaves
/// its dir in /tmp). Only root's own directories, never through a symlink, never a mount
/// point. Returns how many.
pub fn sweep_alias_dirs() -> usize {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return 0;
    };
    // A job may mount a FUSE file system of its own on a dir of that name in /tmp: a stat of
    // it would wait on the job's server (with `user_allow_other`, forever), and a root-owned
    // root there would have its contents removed. Mount points are known without a stat.
    let real_tmp = std::fs::canonicalize(&tmp).unwrap_or_else(|_| tmp.clone());
    let Ok(mounts) = crate::mountinfo::mount_points() else {
        return 0;
    };
    let mounts: std::collections::HashSet<PathBuf> = mounts
        .into_iter()
        .filter(|p| p.parent() == Some(real_tmp.as_path()))
        .collect();
    let mut removed = 0;
    for entry in entries.flatten() {
        if mounts.contains(&real_tmp.join(entry.file_name())) {
            continue;
        }
        let name = entry.file_name();
        let Some(owner) = name
            .to_str()
            .and_then(|n| n.strip_prefix(ALIAS_DIR))
            .and_then(|rest| rest.rsplit_once('-'))
            .map(|(owner, _)| owner)
        else {
            continue;
        };
        // From the kernel's cached attributes, never the file system's: a mount made after
        // the mountinfo read above is told by its mount-root attribute, without a round trip
        // to a job's FUSE server.
        let ours = crate::confine::cached_stat(&entry.path(), false).is_some_and(|st| {
            st.is_dir() && !st.mount_root && st.uid == nix::unistd::geteuid().as_raw()
        });
        if ours && !crate::procfs::tag_alive(owner) && std::fs::remove_dir_all(entry.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Creates the watcher (no watches yet: see [`DirWatcher::watch_tree`]). Hints arrive on the
/// returned channel, which holds at most `queue` of them: past that, one `Rescan` replaces
/// what was dropped.
pub fn watcher(
    workdir: &Path,
    queue: usize,
    max_watches: usize,
) -> Result<(DirWatcher, mpsc::Receiver<Hint>), notify::Error> {
    let (tx, rx) = mpsc::channel(queue.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    // Root's own, 0700: nobody else can put a symlink of theirs where an alias goes.
    let alias_dir = tempfile::Builder::new()
        .prefix(&format!("{ALIAS_DIR}{}-", crate::procfs::self_tag()))
        .tempdir()
        .map_err(notify::Error::io)?;
    let aliases = Arc::new(Aliases {
        dir: alias_dir.path().to_path_buf(),
        next: Default::default(),
        of: Mutex::new(HashMap::new()),
    });
    let writes_queued = WritesQueued::default();
    let handler = {
        let overflowed = overflowed.clone();
        let aliases = aliases.clone();
        let queued = writes_queued.clone();
        move |res: notify::Result<Event>| {
            let a_write =
                matches!(&res, Ok(e) if matches!(e.kind, EventKind::Modify(ModifyKind::Data(_))));
            let hints = match res {
                Ok(event) => {
                    // A name under a watch already dropped has no directory any more (None),
                    // and keeps its place: a rename's destination stays its destination.
                    let paths = event.paths.iter().map(|p| aliases.resolve(p)).collect();
                    let hints = hints_of(&event, paths);
                    aliases.forget_removed(&event);
                    hints
                }
                Err(e) if matches!(e.kind, notify::ErrorKind::MaxFilesWatch) => {
                    vec![Hint::Degraded(format!("inotify watch limit reached: {e}"))]
                }
                Err(e) => vec![Hint::Rescan(format!("watcher error: {e}"))],
            };
            for hint in hints {
                // A lost hint is fine as long as a rescan follows it.
                if overflowed.load(Ordering::Relaxed) {
                    if tx
                        .try_send(Hint::Rescan("event queue was full".into()))
                        .is_ok()
                    {
                        overflowed.store(false, Ordering::Relaxed);
                    } else {
                        return;
                    }
                }
                let write_of = match (&hint, a_write) {
                    (Hint::Touched(p), true) => Some(p.clone()),
                    _ => None,
                };
                if let Some(p) = &write_of {
                    let mut queued = queued.lock().unwrap_or_else(|p| p.into_inner());
                    if !queued.insert(p.clone()) {
                        continue;
                    }
                }
                if tx.try_send(hint).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                    if let Some(p) = write_of {
                        take_queued_write(&queued, &p);
                    }
                }
            }
        }
    };
    let config = notify::Config::default().with_follow_symlinks(false);
    let watcher = notify::RecommendedWatcher::new(handler, config)?;
    Ok((
        DirWatcher {
            watcher,
            workdir: workdir.to_path_buf(),
            watched: BTreeMap::new(),
            path_bytes: 0,
            max_path_bytes: MAX_WATCHED_PATH_BYTES,
            max_walk_entries: MAX_WALK_ENTRIES,
            by_id: HashMap::new(),
            aliases,
            max_watches: max_watches.max(1),
            _alias_dir: alias_dir,
            overflowed,
            writes_queued,
        },
        rx,
    ))
}

/// The hints of `event`, whose paths (in order) are already mapped to the workdir's.
fn hints_of(event: &Event, paths: Vec<Option<PathBuf>>) -> Vec<Hint> {
    if event.need_rescan() {
        return vec![Hint::Rescan("inotify queue overflowed".into())];
    }
    let mut paths = paths.into_iter();
    match event.kind {
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(RenameMode::From)) => {
            paths.flatten().map(Hint::Gone).collect()
        }
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
            let from = paths.next().flatten().map(Hint::Gone);
            let to = paths.next().flatten().map(Hint::Touched);
            from.into_iter().chain(to).collect()
        }
        // Opening or reading tells nothing new; closing after a write does.
        EventKind::Access(notify::event::AccessKind::Close(notify::event::AccessMode::Write)) => {
            paths.flatten().map(Hint::Touched).collect()
        }
        EventKind::Access(_) => Vec::new(),
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Any | EventKind::Other => {
            paths.flatten().map(Hint::Touched).collect()
        }
    }
}

/// Is `path` inside one of `roots`?
pub fn under_any(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The inodes the agent's inotify instances watch, from `/proc/self/fdinfo`.
    fn watched_inodes() -> Vec<u64> {
        let mut out = Vec::new();
        for fd in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            for line in info.lines().filter(|l| l.starts_with("inotify wd:")) {
                let ino = line.split_whitespace().find_map(|f| f.strip_prefix("ino:"));
                out.extend(ino.and_then(|h| u64::from_str_radix(h, 16).ok()));
            }
        }
        out
    }

    fn wait_until(mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "not within 10 s");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// A killed agent's scratch dir goes at the next sweep; a live agent's, a symlink and
    /// another user's dir of the same name stay.
    #[test]
    fn the_scratch_dirs_of_dead_agents_are_swept() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = std::env::temp_dir();
        // pid 0 is no process's: the tag of an agent long gone.
        let dead = tmp.join(format!("{ALIAS_DIR}0.1-sweeptest{}", std::process::id()));
        std::fs::create_dir(&dead).unwrap();
        std::os::unix::fs::symlink("/nonexistent", dead.join("alias")).unwrap();
        let alive = tempfile::Builder::new()
            .prefix(&format!("{ALIAS_DIR}{}-", crate::procfs::self_tag()))
            .tempdir()
            .unwrap();
        let target = tempfile::tempdir().unwrap();
        let link = tmp.join(format!("{ALIAS_DIR}0.2-sweeptest{}", std::process::id()));
        std::os::unix::fs::symlink(target.path(), &link).unwrap();
        let foreign = tmp.join(format!("{ALIAS_DIR}0.3-sweeptest{}", std::process::id()));
        std::fs::create_dir(&foreign).unwrap();
        std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = nix::unistd::Uid::from_raw(65534);
        let chowned = nix::unistd::chown(&foreign, Some(nobody), None).is_ok();

        // A mount on a dead agent's name: never stat'd, never emptied (a job's FUSE server
        // could hold the stat forever).
        let mounted = tmp.join(format!("{ALIAS_DIR}0.4-sweeptest{}", std::process::id()));
        std::fs::create_dir(&mounted).unwrap();
        let is_mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(&mounted)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if is_mounted {
            // A mount made after the sweep read mountinfo is told by its cached attributes.
            let cached = crate::confine::cached_stat(&mounted, false).unwrap();
            assert!(cached.mount_root && cached.is_dir());
            std::fs::write(mounted.join("keep"), "x").unwrap();
        } else {
            crate::testskip::skip(
                "cannot mount a tmpfs here (not root?): the mount point case is not checked",
            );
        }

        assert!(sweep_alias_dirs() >= 1);
        if is_mounted {
            let kept = mounted.join("keep").exists();
            let umounted = std::process::Command::new("umount").arg(&mounted).status();
            assert!(umounted.is_ok_and(|s| s.success()));
            assert!(kept, "a mount point was swept");
        }
        let _ = std::fs::remove_dir(&mounted);
        assert!(!dead.exists(), "a dead agent's dir stays");
        assert!(alive.path().exists(), "a live agent's dir was removed");
        assert!(target.path().exists() && link.symlink_metadata().is_ok());
        if chowned {
            assert!(foreign.exists(), "another user's dir was removed");
        }
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir(&foreign);
    }

    #[test]
    fn a_rename_from_an_unwatched_directory_is_still_a_new_file_at_its_destination() {
        let event = Event::new(EventKind::Modify(ModifyKind::Name(RenameMode::Both)));
        let to = PathBuf::from("/w/artifacts/ckpt");
        assert_eq!(
            hints_of(&event, vec![None, Some(to.clone())]),
            vec![Hint::Touched(to.clone())]
        );
        let from = PathBuf::from("/w/artifacts/tmp");
        assert_eq!(
            hints_of(&event, vec![Some(from.clone()), Some(to.clone())]),
            vec![Hint::Gone(from), Hint::Touched(to)]
        );
    }

    /// A walk meets so many entries at most (files count: a tree of millions of them held
    /// live sync's walk, and the job's end behind it); past them polling takes over.
    #[test]
    fn a_walk_past_its_entries_stops() {
        let dir = tempfile::tempdir().unwrap();
        let art = dir.path().join("artifacts");
        std::fs::create_dir_all(art.join("sub")).unwrap();
        for i in 0..20 {
            std::fs::write(art.join(format!("f{i}")), "").unwrap();
        }
        let (mut watcher, _hints) = watcher(dir.path(), 1, 16).unwrap();
        watcher.max_walk_entries = 10;
        assert!(matches!(
            watcher.watch_tree(&art),
            Err(WatchStopped::Entries { max: 10 })
        ));
        watcher.max_walk_entries = 100;
        watcher.watch_tree(&art).unwrap();
        assert_eq!(watcher.watch_count(), 2);
    }

    /// Directories removed, moved away or made again under their name while every hint was
    /// lost (nobody reads the queue here) give back their watches at the next prune, and a
    /// walk then watches what is there now.
    #[test]
    fn watches_of_directories_gone_while_hints_were_lost_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        for d in ["gone", "moved", "again", "kept"] {
            std::fs::create_dir_all(art.join(d)).unwrap();
        }
        let (mut watcher, _hints) = watcher(&w, 1, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        assert_eq!(watcher.watch_count(), 5);
        std::fs::remove_dir(art.join("gone")).unwrap();
        std::fs::rename(art.join("moved"), w.join("elsewhere")).unwrap();
        std::fs::remove_dir(art.join("again")).unwrap();
        std::fs::create_dir(art.join("again")).unwrap();
        // Its inode number may be the old one's: the removal's event tells them apart.
        wait_until(|| watcher.aliases.of.lock().unwrap().len() == 3);

        assert_eq!(watcher.prune(), 3);
        assert_eq!(watcher.watch_count(), 2, "artifacts and kept");
        assert_eq!(watcher.aliases.of.lock().unwrap().len(), 2);
        assert!(
            !watched_inodes().contains(&std::fs::metadata(w.join("elsewhere")).unwrap().ino()),
            "a directory moved out of the output dirs is still watched"
        );
        assert_eq!(watcher.prune(), 0);
        watcher.watch_tree(&art).unwrap();
        assert_eq!(watcher.watch_count(), 3);
        let again = std::fs::metadata(art.join("again")).unwrap().ino();
        assert!(
            watched_inodes().contains(&again),
            "the new `again` is not watched"
        );
    }

    /// A file written a line at a time (a log, unbuffered) makes one event per write: while
    /// one of its write hints waits in the queue, the next says nothing new and is not queued
    /// (each cost the syncer an lstat walk, and the queue overflowed into full rescans). Once
    /// the syncer has taken it, a write is news again.
    #[tokio::test]
    async fn writes_to_a_file_whose_hint_waits_are_not_queued_again() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        std::fs::create_dir_all(&art).unwrap();
        let (mut watcher, mut hints) = watcher(&w, 10_000, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        let log = art.join("log");
        let mut file = std::fs::File::create(&log).unwrap();
        for i in 0..500 {
            writeln!(file, "line {i}").unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut touched = 0;
        while let Ok(hint) = hints.try_recv() {
            if matches!(&hint, Hint::Touched(p) if *p == log) {
                touched += 1;
            }
        }
        assert!((1..=3).contains(&touched), "{touched} hints for one file");
        crate::watch::take_queued_write(&watcher.writes_queued(), &log);
        writeln!(file, "after").unwrap();
        let next = tokio::time::timeout(std::time::Duration::from_secs(5), hints.recv()).await;
        assert!(matches!(next, Ok(Some(Hint::Touched(p))) if p == log));
    }

    /// Hints dropped for a full queue, the job then quiet: no event comes to carry the rescan
    /// that makes up for them, so the syncer asks once it has drained the queue.
    #[tokio::test]
    async fn hints_lost_to_a_full_queue_are_told_once_drained() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        std::fs::create_dir_all(&art).unwrap();
        let (mut watcher, mut hints) = watcher(&w, 1, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        assert!(!watcher.take_lost());
        for i in 0..20 {
            std::fs::write(art.join(format!("f{i}")), "x").unwrap();
        }
        wait_until(|| watcher.overflowed.load(Ordering::Relaxed));
        // Let the handler finish the burst first, so that it is the flag that tells. Should it
        // still hold events when the queue is drained, it tells the loss itself, as a rescan
        // hint, and clears the flag: either way the loss must be told.
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut told = 0;
        let mut quiet_since = std::time::Instant::now();
        let deadline = quiet_since + std::time::Duration::from_secs(10);
        while quiet_since.elapsed() < std::time::Duration::from_millis(300) {
            assert!(
                std::time::Instant::now() < deadline,
                "the handler never went quiet"
            );
            match hints.try_recv() {
                Ok(hint) => {
                    told += usize::from(matches!(&hint, Hint::Rescan(r) if r.contains("full")));
                    quiet_since = std::time::Instant::now();
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        told += usize::from(watcher.take_lost());
        assert!(told >= 1, "the lost hints were not told");
        assert!(!watcher.take_lost(), "told twice");
    }

    /// A chain deeper than a manifest path can be is watched down to that depth only: below,
    /// no file could be synced live, and each level walked holds fds.
    #[tokio::test]
    async fn a_chain_is_watched_no_deeper_than_a_path_can_be() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let mut d = w.join("artifacts");
        for _ in 0..160 {
            d.push("d");
        }
        std::fs::create_dir_all(&d).unwrap();
        let (mut watcher, _hints) = watcher(&w, 64, 1000).unwrap();
        watcher.watch_tree(&w.join("artifacts")).unwrap();
        // artifacts/ (depth 1) and d/ levels down to depth MAX_PATH_DEPTH.
        assert_eq!(watcher.watch_count(), c3_proto::manifest::MAX_PATH_DEPTH);
    }

    /// Long names cost the agent memory the job does not pay for: past the bytes of paths
    /// it may hold, watching stops (live sync polls), and dropping a tree gives them back.
    #[tokio::test]
    async fn the_paths_watched_are_held_to_a_byte_budget() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        let long = "n".repeat(200);
        for i in 0..20 {
            std::fs::create_dir_all(art.join(format!("{long}{i}/{long}"))).unwrap();
        }
        std::fs::create_dir_all(art.join("a0/b")).unwrap();
        let (mut watcher, _hints) = watcher(&w, 1000, 16).unwrap();
        watcher.max_path_bytes = 4096;
        let stopped = watcher.watch_tree(&art);
        assert!(
            matches!(stopped, Err(WatchStopped::PathBytes { max: 4096 })),
            "{stopped:?}"
        );
        assert!(watcher.path_bytes <= 4096);
        let held: usize = watcher.watched.keys().map(|p| p.as_os_str().len()).sum();
        assert_eq!(held, watcher.path_bytes);
        watcher.unwatch_tree(&art);
        assert_eq!((watcher.watch_count(), watcher.path_bytes), (0, 0));
    }

    /// What is below a directory, and only that, goes with it.
    #[tokio::test]
    async fn unwatching_a_tree_takes_what_is_below_it_only() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        for d in ["a/b/c", "a/b0", "a-b", "ab"] {
            std::fs::create_dir_all(art.join(d)).unwrap();
        }
        let (mut watcher, _hints) = watcher(&w, 64, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        assert_eq!(watcher.watch_count(), 7);
        watcher.unwatch_tree(&art.join("a/b"));
        let left: Vec<_> = watcher.watched.keys().cloned().collect();
        let mut want: Vec<PathBuf> = ["a", "a/b0", "a-b", "ab"]
            .iter()
            .map(|d| art.join(d))
            .chain([art.clone()])
            .collect();
        want.sort();
        assert_eq!(left, want);
    }

    #[tokio::test]
    async fn a_watch_is_on_the_opened_directory_and_its_events_name_the_workdir_path() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        std::fs::create_dir_all(art.join("sub")).unwrap();
        let (mut watcher, mut hints) = watcher(&w, 64, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        assert_eq!(watcher.watch_count(), 2);
        let inodes = watched_inodes();
        for d in [&art, &art.join("sub")] {
            let ino = std::fs::metadata(d).unwrap().ino();
            assert!(
                inodes.contains(&ino),
                "{} not watched: {inodes:?}",
                d.display()
            );
        }
        // No alias is left behind, and events come back under the workdir's paths.
        assert_eq!(std::fs::read_dir(&watcher.aliases.dir).unwrap().count(), 0);
        std::fs::write(art.join("sub/f"), "x").unwrap();
        let want = Hint::Touched(art.join("sub/f"));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match hints.recv().await {
                    Some(h) if h == want => return h,
                    Some(_) => continue,
                    None => panic!("the watcher stopped"),
                }
            }
        })
        .await;
        assert!(got.is_ok(), "no event for sub/f");
        watcher.unwatch_tree(&art.join("sub"));
        assert_eq!(watcher.watch_count(), 1);
        assert!(watcher.aliases.of.lock().unwrap().len() == 1);
        // Its scratch dir goes with it (an agent's exit does not wait for notify's thread).
        let scratch = watcher.aliases.dir.clone();
        drop(watcher);
        assert!(!scratch.exists(), "{} left behind", scratch.display());
    }

    /// Two watched directories exchanged (`RENAME_EXCHANGE`), their hints handled in the
    /// order they come (`Gone(A)`, `Touched(B)`, `Gone(B)`, `Touched(A)`): both directories
    /// stay watched. Keyed by name alone, `Touched(B)` took B as watched (the watch was the
    /// other directory's) and `Gone(B)` then dropped it: one subtree went unwatched.
    #[tokio::test]
    async fn exchanged_directories_both_stay_watched() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        for d in ["A", "B"] {
            std::fs::create_dir_all(art.join(d)).unwrap();
        }
        let (a, b) = (art.join("A"), art.join("B"));
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let (ino_a, ino_b) = (ino(&a), ino(&b));
        let (mut watcher, _hints) = watcher(&w, 64, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        let (ca, cb) = (
            std::ffi::CString::new(a.as_os_str().as_bytes()).unwrap(),
            std::ffi::CString::new(b.as_os_str().as_bytes()).unwrap(),
        );
        // SAFETY: two NUL-terminated paths that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                ca.as_ptr(),
                libc::AT_FDCWD,
                cb.as_ptr(),
                libc::RENAME_EXCHANGE,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let at = |p: &Path| {
            let md = std::fs::symlink_metadata(p).unwrap();
            Some((md.dev(), md.ino()))
        };
        watcher.unwatch_tree_unless(&a, at(&a));
        watcher.watch_tree(&b).unwrap();
        watcher.unwatch_tree_unless(&b, at(&b));
        watcher.watch_tree(&a).unwrap();
        let inodes = watched_inodes();
        assert!(
            inodes.contains(&ino_a) && inodes.contains(&ino_b),
            "{ino_a} {ino_b} {inodes:?}"
        );
        assert_eq!(watcher.watch_count(), 3);
    }

    /// A watched directory moved into a directory made just before (`mkdir new && mv a
    /// new/b`), its hints handled as they come: `Touched(new)` walks into `new/b` first, and
    /// `Gone(a)` follows (or is lost in an overflow, and the rescan's prune finds `a` gone).
    /// inotify gives the inode's one watch again for `new/b`; keeping `a` too, dropping it
    /// removed that watch, and nothing below `new/b` was seen until the job's end.
    #[tokio::test]
    async fn a_directory_moved_into_a_new_one_stays_watched_after_its_gone() {
        for gone_lost in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let w = dir.path().to_path_buf();
            let art = w.join("artifacts");
            std::fs::create_dir_all(art.join("a/c")).unwrap();
            let (mut watcher, mut hints) = watcher(&w, 64, 16).unwrap();
            watcher.watch_tree(&art).unwrap();
            assert_eq!(watcher.watch_count(), 3);
            std::fs::create_dir(art.join("new")).unwrap();
            std::fs::rename(art.join("a"), art.join("new/b")).unwrap();
            // As the syncer handles them: the new directory is walked, then `a` is gone
            // (nothing at its name now).
            watcher.watch_tree(&art.join("new")).unwrap();
            if gone_lost {
                assert_eq!(watcher.prune(), 0, "gone_lost: {gone_lost}");
            } else {
                watcher.unwatch_tree_unless(&art.join("a"), None);
            }
            let inodes = watched_inodes();
            for d in ["new/b", "new/b/c"] {
                let ino = std::fs::metadata(art.join(d)).unwrap().ino();
                assert!(
                    inodes.contains(&ino) && watcher.watches(&art.join(d)),
                    "{d} is not watched (gone_lost: {gone_lost}): {inodes:?}"
                );
            }
            assert_eq!(watcher.watch_count(), 4, "artifacts, new, new/b, new/b/c");
            std::fs::write(art.join("new/b/c/f"), "x").unwrap();
            let want = Hint::Touched(art.join("new/b/c/f"));
            let got = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    match hints.recv().await {
                        Some(h) if h == want => return,
                        Some(_) => continue,
                        None => panic!("the watcher stopped"),
                    }
                }
            })
            .await;
            assert!(
                got.is_ok(),
                "no event for new/b/c/f (gone_lost: {gone_lost})"
            );
        }
    }

    /// A watch whose directory was removed is dead, even when the directory at its name now
    /// has the removed one's inode number (`rm -rf out && mkdir out` on ext4 often gives it):
    /// taken for the same directory, its dead watch was kept, and nothing below the new one
    /// was watched (a flaky `live::an_output_dir_made_again_is_watched_again` in CI).
    #[tokio::test]
    async fn a_dead_watch_is_not_taken_for_the_directory_that_reused_its_inode() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().to_path_buf();
        let art = w.join("artifacts");
        std::fs::create_dir_all(&art).unwrap();
        let (mut watcher, _hints) = watcher(&w, 64, 16).unwrap();
        watcher.watch_tree(&art).unwrap();
        let md = std::fs::symlink_metadata(&art).unwrap();
        let same = Some((md.dev(), md.ino()));
        // The removal's DELETE_SELF, as notify's thread hands it over, as if the directory
        // at the name now had reused the inode number (`same`).
        let alias = watcher.watched.get(&art).unwrap().alias.clone();
        watcher.aliases.forget_removed(
            &Event::new(EventKind::Remove(notify::event::RemoveKind::Folder)).add_path(alias),
        );
        watcher.unwatch_tree_unless(&art, same);
        assert!(!watcher.watches(&art), "a dead watch was kept");
        watcher.watch_tree(&art).unwrap();
        assert!(watcher.watches(&art));
        assert!(watcher.aliases.live(watcher.watched.get(&art).unwrap()));
    }
}
