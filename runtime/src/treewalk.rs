//! A depth-first walk of a job's tree that reads each directory as a stream: one open
//! listing per level, so what the walk holds grows with the depth, never with the width.
//!
//! A job can put millions of entries in one directory (each costs it an inode, nothing
//! more). A walk that read a whole listing before acting on it, or kept the path of every
//! directory still to visit, held all of them at once in the root agent's memory: a million
//! 255-byte names, or a million 16 KiB paths below a deep directory. Here a level is a
//! directory fd and its `readdir` stream; the caller decides, entry by entry, whether to
//! descend (opening the child itself, from the parent's fd, with whatever checks it needs).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use nix::dir::{Dir, OwningIter};
use nix::fcntl::OFlag;
use nix::sys::stat::{FileStat, Mode};

use crate::confine::DirFd;

/// One entry of a directory the walk is reading.
pub struct Entry {
    /// The directory that holds it, open: open the entry from here, never by path.
    pub parent: Arc<DirFd>,
    pub name: OsString,
    /// The entry's path from the walk's start, its exact bytes (`start/.../name`).
    pub rel: Vec<u8>,
    /// `lstat` through the parent's fd (an entry removed since the listing: `NotFound`).
    pub stat: io::Result<FileStat>,
}

impl Entry {
    /// Opens this entry as a directory below its parent (no symlink, never `..`).
    pub fn open_dir(&self) -> io::Result<DirFd> {
        self.parent.open_dir(Path::new(&self.name))
    }

    /// The path of the directory that holds it, from the walk's start.
    pub fn parent_rel(&self) -> &[u8] {
        &self.rel[..self.rel.len() - self.name.len() - 1]
    }
}

/// What the walk found next.
pub enum Item {
    Entry(Entry),
    /// Reading the listing of `rel` failed part way (an I/O error): the rest of it is unknown.
    Unlisted {
        rel: Vec<u8>,
        error: io::Error,
    },
}

struct Level {
    dir: Arc<DirFd>,
    names: OwningIter,
    rel: Vec<u8>,
    /// Its file system keeps attributes that are the files' own ([`DirFd::stat_on`]).
    local: bool,
    /// Its change times as it was opened, where the walk tracks them
    /// ([`TreeWalk::changed_while_read`]); `None` where they could not be read.
    opened: Option<(i64, i64, i64, i64)>,
}

impl Level {
    /// Whether it changed since it was opened (one whose times cannot be read: as changed).
    fn changed(&self) -> bool {
        self.opened.is_none() || changes(&self.dir) != self.opened
    }
}

/// A directory's mtime and ctime (s, ns each): what an entry made, removed or renamed in it
/// moves.
fn changes(dir: &DirFd) -> Option<(i64, i64, i64, i64)> {
    let st = crate::confine::fstat(dir).ok()?;
    Some((st.st_mtime, st.st_mtime_nsec, st.st_ctime, st.st_ctime_nsec))
}

/// The walk: [`TreeWalk::next`] yields every entry of the directories entered, depth first;
/// [`TreeWalk::enter`] makes the directory just opened the one read next.
pub struct TreeWalk {
    levels: Vec<Level>,
    /// Each directory's change times are taken as it is opened and read again as it ends
    /// ([`TreeWalk::tracking`]): only a walk that asks pays the two stats a directory.
    track: bool,
    /// A directory read to its end had changed since it was opened.
    changed: bool,
}

impl TreeWalk {
    /// Starts at `dir`, whose path from the walk's start (used as the prefix of every `rel`)
    /// is `rel`.
    pub fn new(dir: DirFd, rel: Vec<u8>) -> io::Result<TreeWalk> {
        TreeWalk::start(dir, rel, false)
    }

    /// [`TreeWalk::new`], telling [`TreeWalk::changed_while_read`].
    pub fn tracking(dir: DirFd, rel: Vec<u8>) -> io::Result<TreeWalk> {
        TreeWalk::start(dir, rel, true)
    }

    fn start(dir: DirFd, rel: Vec<u8>, track: bool) -> io::Result<TreeWalk> {
        let mut walk = TreeWalk {
            levels: Vec::new(),
            track,
            changed: false,
        };
        walk.enter(dir, rel)?;
        Ok(walk)
    }

    /// Reads `dir` (at `rel`) before the rest of the current directory: depth first.
    pub fn enter(&mut self, dir: DirFd, rel: Vec<u8>) -> io::Result<()> {
        let names = Dir::openat(
            &dir,
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?
        .into_iter();
        let local = crate::confine::attributes_are_local(&dir);
        let opened = if self.track { changes(&dir) } else { None };
        self.levels.push(Level {
            dir: Arc::new(dir),
            names,
            rel,
            local,
            opened,
        });
        Ok(())
    }

    /// Whether a directory of the walk changed while it was read (an entry made, removed or
    /// renamed in it; one that cannot be looked at again counts as changed): a walk that met
    /// more entries than it may is then one another process kept going (readdir returns
    /// entries renamed meanwhile again), not a tree that large.
    /// Only for a walk made with [`TreeWalk::tracking`].
    pub fn changed_while_read(&self) -> bool {
        debug_assert!(self.track, "a walk that does not track changes");
        self.changed || self.levels.iter().any(Level::changed)
    }

    fn finished(&mut self) -> Option<Level> {
        let level = self.levels.pop()?;
        self.changed |= self.track && level.changed();
        Some(level)
    }

    /// How many directories are open (the depth below the start, plus one).
    pub fn depth(&self) -> usize {
        self.levels.len()
    }

    /// The next entry of the deepest directory still being read; `None` when every one is
    /// read to its end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Option<Item> {
        loop {
            let level = self.levels.last_mut()?;
            let entry = match level.names.next() {
                None => {
                    self.finished();
                    continue;
                }
                Some(Err(e)) => {
                    // A listing that fails keeps failing: the rest of it is given up.
                    let level = self.finished()?;
                    return Some(Item::Unlisted {
                        rel: level.rel,
                        error: e.into(),
                    });
                }
                Some(Ok(entry)) => entry,
            };
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let mut rel = Vec::with_capacity(level.rel.len() + 1 + name.len());
            rel.extend_from_slice(&level.rel);
            rel.push(b'/');
            rel.extend_from_slice(name.as_bytes());
            return Some(Item::Entry(Entry {
                parent: level.dir.clone(),
                stat: level.dir.stat_on(name, level.local),
                name: name.to_os_string(),
                rel,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::is_dir;

    /// A directory that changed while read (an entry renamed in it) is told from one that
    /// held still, while it is read and once it was read to its end.
    #[test]
    fn a_change_while_reading_is_seen() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("sub")).unwrap();
        for i in 0..3 {
            std::fs::write(t.path().join(format!("sub/f{i}")), "").unwrap();
        }
        let open = || DirFd::open(t.path()).unwrap();
        let mut still = TreeWalk::tracking(open(), Vec::new()).unwrap();
        names(&mut still, true);
        assert!(!still.changed_while_read());
        // Coarse timestamps: a change within the same tick would look like none.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut walk = TreeWalk::tracking(open(), Vec::new()).unwrap();
        assert!(walk.next().is_some());
        assert!(!walk.changed_while_read());
        std::fs::rename(t.path().join("sub"), t.path().join("moved")).unwrap();
        assert!(walk.changed_while_read(), "while read");
        names(&mut walk, false);
        assert!(walk.changed_while_read(), "once read to its end");
    }

    fn names(walk: &mut TreeWalk, descend: bool) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(item) = walk.next() {
            let Item::Entry(e) = item else {
                panic!("listing failed")
            };
            seen.push(String::from_utf8(e.rel.clone()).unwrap());
            assert_eq!(
                e.parent_rel(),
                &e.rel[..e.rel.iter().rposition(|&b| b == b'/').unwrap()]
            );
            if descend && is_dir(e.stat.as_ref().unwrap()) {
                let dir = e.open_dir().unwrap();
                walk.enter(dir, e.rel).unwrap();
            }
        }
        seen.sort();
        seen
    }

    #[test]
    fn walks_depth_first_only_where_told() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("a/b/c")).unwrap();
        std::fs::write(t.path().join("a/b/c/f"), "x").unwrap();
        std::fs::write(t.path().join("a/g"), "x").unwrap();
        std::os::unix::fs::symlink(t.path().join("a"), t.path().join("a/link")).unwrap();
        let root = DirFd::open(t.path()).unwrap();
        let mut walk =
            TreeWalk::new(root.open_dir(Path::new("a")).unwrap(), b"a".to_vec()).unwrap();
        assert_eq!(
            names(&mut walk, true),
            ["a/b", "a/b/c", "a/b/c/f", "a/g", "a/link"]
        );
        let mut walk =
            TreeWalk::new(root.open_dir(Path::new("a")).unwrap(), b"a".to_vec()).unwrap();
        assert_eq!(names(&mut walk, false), ["a/b", "a/g", "a/link"]);
    }

    /// A directory removed once opened reads as empty (glibc takes the kernel's ENOENT for a
    /// dead directory as its end) or as NotFound, which the scan takes for "removed
    /// meanwhile": never as a place it could not read (a checkpoint rotation's rmtree during
    /// a `wait_all` is no failure).
    #[test]
    fn a_directory_removed_once_opened_is_not_found() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("gone")).unwrap();
        let root = DirFd::open(t.path()).unwrap();
        let gone = root.open_dir(Path::new("gone")).unwrap();
        std::fs::remove_dir(t.path().join("gone")).unwrap();
        let found = TreeWalk::new(gone, b"gone".to_vec()).map(|mut walk| walk.next());
        match found {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::NotFound),
            Ok(Some(Item::Unlisted { error, .. })) => {
                assert_eq!(error.kind(), io::ErrorKind::NotFound)
            }
            Ok(Some(Item::Entry(e))) => panic!("listed {:?}", e.name),
            Ok(None) => {}
        }
    }

    /// A directory of many subdirectories is read with one listing open: the walk holds one
    /// level per depth, whatever the width.
    #[test]
    fn a_wide_directory_keeps_one_level_open() {
        let t = tempfile::tempdir().unwrap();
        for i in 0..2000 {
            std::fs::create_dir(t.path().join(format!("d{i}"))).unwrap();
        }
        let mut walk = TreeWalk::new(DirFd::open(t.path()).unwrap(), b"r".to_vec()).unwrap();
        let mut seen = 0;
        let mut deepest = 0;
        while let Some(Item::Entry(e)) = walk.next() {
            seen += 1;
            walk.enter(e.open_dir().unwrap(), e.rel).unwrap();
            deepest = deepest.max(walk.depth());
        }
        assert_eq!((seen, deepest), (2000, 2));
    }
}
