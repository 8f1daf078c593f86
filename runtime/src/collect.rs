//! Finding a job's output: regular files under `artifacts/` and each output dir (contract §5).
//! Symlinks, sockets, FIFOs and devices are never followed or uploaded; each gets a warning.
//!
//! The walk goes from directory fd to directory fd (`openat` with `O_NOFOLLOW`), so a job
//! that swaps a directory for a symlink mid-walk cannot lead it outside the workdir, and a
//! file or directory the job's user could not read is skipped with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::FileStat;

use c3_proto::manifest::entry_ceiling;

use crate::confine::{is_dir, is_regular, DirFd, JobReader};
use crate::treewalk::{Item, TreeWalk};

/// What identifies one version of a file on disk; a change in any field means new content may exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileStamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
    pub mode: u32,
}

impl FileStamp {
    /// Whether a version the book holds as `self` is the one found as `found`: the same
    /// stamp, or, for one taken from a manifest (`SyncBook::listed_before`: no inode, no
    /// device), the same size, mtime and mode. A file `recover` could not read again (a
    /// store fault) that looks as it was listed stays listed, not dropped for a stamp that
    /// never matches.
    pub fn stands_for(&self, found: &FileStamp) -> bool {
        self == found
            || (self.from_a_manifest()
                && (self.size, self.mtime_ns, self.mode)
                    == (found.size, found.mtime_ns, found.mode))
    }

    /// Whether this stamp was taken from a manifest (`SyncBook::listed_before`), which
    /// keeps no inode, device or ctime: a file never read by this look.
    pub fn from_a_manifest(&self) -> bool {
        self.ino == 0 && self.dev == 0 && self.ctime_ns == 0
    }

    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileStamp {
            size: meta.len(),
            mtime_ns: crate::display::file_time_ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: crate::display::file_time_ns(meta.ctime(), meta.ctime_nsec()),
            ino: meta.ino(),
            dev: meta.dev(),
            mode: meta.mode() & 0o7777,
        }
    }

    pub fn of_stat(st: &FileStat) -> Self {
        FileStamp {
            size: st.st_size as u64,
            mtime_ns: crate::display::file_time_ns(st.st_mtime, st.st_mtime_nsec),
            ctime_ns: crate::display::file_time_ns(st.st_ctime, st.st_ctime_nsec),
            ino: st.st_ino,
            dev: st.st_dev,
            mode: st.st_mode & 0o7777,
        }
    }
}

/// A file to upload: a regular file found under a collected dir, or a log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalFile {
    /// Relative to the workdir, `/`-separated: the manifest path (a [`rel_key`]).
    ///
    /// [`rel_key`]: c3_proto::manifest::rel_key
    pub rel: String,
    pub abs: PathBuf,
    pub stamp: FileStamp,
}

impl LocalFile {
    /// The file `rel` (a scan's key) below `workdir`.
    pub fn below(workdir: &Path, rel: String, stamp: FileStamp) -> LocalFile {
        let abs = workdir.join(path_of(&rel));
        LocalFile { rel, abs, stamp }
    }
}

/// The path below the workdir that the key `rel` (a [`rel_key`]) stands for: the key of a
/// name that is not UTF-8 is no path.
///
/// [`rel_key`]: c3_proto::manifest::rel_key
pub fn path_of(rel: &str) -> PathBuf {
    PathBuf::from(std::ffi::OsString::from_vec(c3_proto::manifest::rel_bytes(
        rel,
    )))
}

#[derive(Debug, Default)]
pub struct Scan {
    /// Keyed (and so sorted) by manifest path; nested output dirs do not duplicate files.
    /// Only the stamp: the path below the workdir is the key's ([`LocalFile::below`]), so a
    /// scan of many files keeps one copy of each path.
    pub files: BTreeMap<String, FileStamp>,
    /// The first [`MAX_SCAN_WARNINGS`] warnings; the rest are only counted.
    pub warnings: Vec<String>,
    pub more_warnings: usize,
    /// Directories (their [`rel_key`]s) that could not be read (not for lack of the job user's permission: an
    /// I/O error, no fds left): what they hold is unknown, so it is neither collected nor
    /// taken as deleted. The final sync counts each as an upload failure.
    pub incomplete: Vec<String>,
    /// Directories holding entries too deep or too long to store (each an upload failure at
    /// the end, named once); at most [`MAX_INCOMPLETE`].
    pub refused: Vec<String>,
    /// Files and directories open to their owner alone where no job user is named to read
    /// them as (each an upload failure at the end, for good); at most [`MAX_INCOMPLETE`].
    pub owner_only: Vec<String>,
    /// Of `incomplete`, the places no later look will read either: refused for lack of
    /// permission (the agent reads as the job's user, or with more rights than it: the job
    /// or its file system closed them), or every dir when the job made more files than a
    /// manifest lists. An unstored item for good, which `recover` does not come back for.
    pub for_good: BTreeSet<String>,
    /// Places past [`MAX_INCOMPLETE`]: then every output dir counts as incomplete.
    incomplete_overflow: usize,
    /// Entries refused by name past [`MAX_INCOMPLETE`] (`refused`, `owner_only`): each an
    /// upload failure for good. No unread place: what the walk saw of their directories
    /// stands, and a file gone from it is gone (counted as unread places, they made every
    /// output dir incomplete, and the complete manifest kept listing deleted checkpoints).
    pub refused_more: usize,
    /// One of the places past [`MAX_INCOMPLETE`] might be read at a later look.
    overflow_retryable: bool,
    /// The most the manifest entries of `files` take ([`entry_ceiling`] each).
    listed_bytes: u64,
    /// Entries the walk met, of every kind ([`visit_budget`]).
    visited: u64,
    /// The walk stopped before its end (more files than a manifest lists, a tree without
    /// end): what it did not reach is neither found nor known gone.
    pub cut_short: bool,
}

/// How many entries of any kind (symlinks, empty directories, FIFOs, unreadable files,
/// which no manifest lists) one scan meets before it gives up: four times what a manifest
/// of `room` bytes could list, and a million at least. Only the files listed were counted,
/// and a walk over a directory the job (a process it left, another job of its user) keeps
/// renaming entries in, which readdir then returns again at a new offset, never ended: no
/// manifest and no terminal status, for ever.
fn visit_budget(room: u64) -> u64 {
    (room / c3_proto::manifest::ENTRY_FIXED_BYTES)
        .saturating_mul(4)
        .max(1_000_000)
}

/// The deepest and the longest path, relative to the workdir, that is collected (paths past
/// PATH_MAX are, opened a directory at a time). Beyond, they are refused by name: a job's
/// chain of 15,000 one-letter directories with a file in each would otherwise cost memory
/// with the square of its depth (each file keeps its whole path, in the scan, the book and
/// the manifest) and a walk of every level for each open.
pub const MAX_DEPTH: usize = c3_proto::manifest::MAX_PATH_DEPTH;
pub const MAX_REL_PATH: usize = c3_proto::manifest::MAX_PATH_BYTES;

/// Places that could not be read whole, kept by name per scan; past them, every output dir
/// counts as incomplete (each name is an upload failure and an error line, and
/// [`Scan::covers`] looks through them all for every file).
pub const MAX_INCOMPLETE: usize = 100;

/// Warnings kept per scan: a job with a million symlinks must not cost a million lines.
pub const MAX_SCAN_WARNINGS: usize = 1000;

impl Scan {
    fn warn(&mut self, text: String) {
        if self.warnings.len() < MAX_SCAN_WARNINGS {
            self.warnings.push(text);
        } else {
            self.more_warnings += 1;
        }
    }

    /// `rel` is left out for a reason no later look changes: said, named (the first
    /// [`MAX_INCOMPLETE`]) and counted by the final sync as a failure.
    fn refuse(&mut self, rel: String, why: &str) {
        self.warn(format!("{rel} {why}"));
        if self.owner_only.len() < MAX_INCOMPLETE {
            self.owner_only.push(rel);
        } else {
            self.refused_more += 1;
        }
    }

    /// What the entries refused past the named ones are, in one line (`None`: none were).
    pub fn refused_more_text(&self) -> Option<String> {
        (self.refused_more > 0).then(|| {
            format!(
                "{} more paths too deep, too long or open to their owner alone",
                self.refused_more
            )
        })
    }

    /// Whether the scan saw the whole place where `rel` would be: only then does its absence
    /// mean the file is gone.
    pub fn covers(&self, rel: &str) -> bool {
        !self
            .incomplete
            .iter()
            .any(|d| rel == d || c3_proto::manifest::key_is_below(rel, d))
    }

    fn broken(&mut self, rel: &str, what: String, cause: &std::io::Error) {
        self.broken_as(rel, what, cause, false)
    }

    /// [`Scan::broken`]; `gone`: no later look finds the place either.
    fn broken_as(&mut self, rel: &str, what: String, cause: &std::io::Error, gone: bool) {
        // A FUSE mount is never looked into, whoever looks next.
        let for_good = gone
            || cause.kind() == std::io::ErrorKind::PermissionDenied
            || crate::confine::is_mount_refused(cause);
        self.warn(what);
        if self.incomplete.len() < MAX_INCOMPLETE {
            self.incomplete.push(rel.to_string());
            if for_good {
                self.for_good.insert(rel.to_string());
            }
        } else {
            self.incomplete_overflow += 1;
            self.overflow_retryable |= !for_good;
        }
    }

    /// Past [`MAX_INCOMPLETE`] places: every output dir counts as incomplete, for good if
    /// every place was.
    fn overflowed(&mut self, dirs: &[String]) {
        let for_good =
            !self.overflow_retryable && self.incomplete.iter().all(|d| self.for_good.contains(d));
        self.all_incomplete(dirs, for_good);
    }

    /// Every output dir counts as incomplete; for good if every place that made it so is.
    fn all_incomplete(&mut self, dirs: &[String], for_good: bool) {
        self.incomplete = dirs.to_vec();
        self.for_good = if for_good {
            dirs.iter().cloned().collect()
        } else {
            BTreeSet::new()
        };
    }
}

/// Walks `dirs` (relative to `workdir`, each a [`rel_key`]: live sync walks a directory moved
/// in whatever its name) without following any symlink. With `reader`,
/// only what that user could read itself is collected. At most the files one manifest of
/// `room` bytes could list (each at most [`entry_ceiling`]: short paths, `room` / 330; a path
/// can be 16 KiB, and a million of those would be 16 GiB): past that the walk stops and every
/// dir counts as incomplete (nothing taken as deleted, each an upload failure at the end),
/// since a manifest could not list them all anyway. So do they past [`MAX_INCOMPLETE`]
/// places that could not be read whole.
///
/// [`rel_key`]: c3_proto::manifest::rel_key
pub fn scan(workdir: &Path, dirs: &[String], reader: Option<&JobReader>, room: u64) -> Scan {
    scan_within(workdir, dirs, reader, room, visit_budget(room))
}

/// [`scan`], giving up after `budget` entries of any kind.
fn scan_within(
    workdir: &Path,
    dirs: &[String],
    reader: Option<&JobReader>,
    room: u64,
    budget: u64,
) -> Scan {
    let mut out = Scan::default();
    let root = match DirFd::open_root(workdir) {
        Ok(d) => d,
        Err(e) => {
            // A workdir gone is gone for every later look too (one made again at its path
            // is refused by its pin): what was in it will never be stored.
            let gone = e.kind() == std::io::ErrorKind::NotFound;
            for dir in dirs {
                out.broken_as(
                    dir,
                    format!("cannot open the workdir {}: {e}", workdir.display()),
                    &e,
                    gone,
                );
            }
            return out;
        }
    };
    for dir in dirs {
        match walk(&root, dir, reader, room, budget, &mut out) {
            Ok(()) => {}
            Err(Stop::Full) => {
                out.warn(format!(
                    "more files in the output dirs than a manifest can list (store.max_manifest_bytes = {room}; {} files were found first); the rest are not uploaded",
                    out.files.len()
                ));
                out.all_incomplete(dirs, true);
                out.cut_short = true;
                return out;
            }
            // For good: a tree of millions of entries (links, FIFOs, empty directories, which
            // no manifest lists) that held still is as large at every later look, and taken
            // for one still changing, `recover` walked it every hour and retention kept the
            // workdir for ever.
            Err(Stop::Huge) => {
                out.warn(format!(
                    "the output dirs hold more than {budget} entries (none changed while they were read); the rest are not uploaded"
                ));
                out.all_incomplete(dirs, true);
                out.cut_short = true;
                return out;
            }
            // Not for good: once whatever keeps changing the tree stops, a later look
            // (`resync`, `recover`) walks it whole.
            Err(Stop::Endless) => {
                out.warn(format!(
                    "the output dirs' walk met {} entries without an end (entries renamed or made while it read?); the rest are not uploaded",
                    out.visited
                ));
                out.all_incomplete(dirs, false);
                out.cut_short = true;
                return out;
            }
        }
    }
    if out.incomplete_overflow > 0 {
        out.warn(format!(
            "more than {MAX_INCOMPLETE} places in the output dirs could not be read whole; every output dir counts as incomplete"
        ));
        out.overflowed(dirs);
    }
    out
}

/// Why the walk stopped before its end.
enum Stop {
    /// The files found fill a manifest.
    Full,
    /// It met [`visit_budget`] entries, and a directory changed while it was read.
    Endless,
    /// It met [`visit_budget`] entries of a tree that held still: as many the next time.
    Huge,
}

/// Depth first, reading each directory as a stream ([`TreeWalk`]): open fds and memory grow
/// with the depth, not with the width.
fn walk(
    root: &DirFd,
    root_rel: &str,
    reader: Option<&JobReader>,
    room: u64,
    budget: u64,
    out: &mut Scan,
) -> Result<(), Stop> {
    // A key (live sync walks a directory moved in, whose name may not be UTF-8).
    let raw = c3_proto::manifest::rel_bytes(root_rel);
    let shown = display_rel(&raw);
    let Some(top) = open_walked(root, OsStr::from_bytes(&raw), root_rel, reader, out) else {
        return Ok(());
    };
    // The relative path's exact bytes travel with each entry: a name that is not UTF-8
    // is collected like any other (its key is a `rel_key`, its manifest entry has `path_b64`).
    let mut tree = match TreeWalk::tracking(top, raw) {
        Ok(t) => t,
        Err(e) => {
            out.broken(root_rel, format!("cannot read {shown}/: {e}"), &e);
            return Ok(());
        }
    };
    while let Some(item) = tree.next() {
        out.visited += 1;
        if out.visited > budget {
            return Err(if tree.changed_while_read() {
                Stop::Endless
            } else {
                Stop::Huge
            });
        }
        let entry = match item {
            Item::Entry(entry) => entry,
            // Removed while it was read (a checkpoint rotation's rmtree): nothing to collect,
            // and nothing unread either.
            Item::Unlisted { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                continue;
            }
            Item::Unlisted { rel, error } => {
                let key = c3_proto::manifest::rel_key(&rel);
                let rel = display_rel(&rel);
                out.broken(&key, format!("cannot read {rel}/: {error}"), &error);
                continue;
            }
        };
        let child_key = c3_proto::manifest::rel_key(&entry.rel);
        let child_rel = c3_proto::manifest::rel_display(&child_key);
        let st = match &entry.stat {
            Ok(st) => *st,
            // Deleted between readdir and stat: the job removed it, nothing to collect.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                out.broken(&child_key, format!("cannot stat {child_rel}: {e}"), e);
                continue;
            }
        };
        if !c3_proto::manifest::path_fits(&entry.rel) {
            // Not walked, not stored. The directory that holds it is named once (a job can
            // put a million such entries there), and counted as a failure by the final sync.
            // It is no unread place: what it holds that fits was seen, and the book never
            // holds a path that does not fit, so nothing else there is kept as not covered.
            let parent = display_rel(entry.parent_rel());
            if !out.refused.contains(&parent) {
                out.warn(format!("{child_rel}: deeper than {MAX_DEPTH} directories or longer than {MAX_REL_PATH} bytes; it and whatever else in {parent}/ is so are not uploaded"));
                if out.refused.len() < MAX_INCOMPLETE {
                    out.refused.push(parent);
                } else {
                    out.refused_more += 1;
                }
            }
        } else if is_dir(&st) {
            if let Some(dir) = open_walked(&entry.parent, &entry.name, &child_key, reader, out) {
                match tree.enter(dir, entry.rel) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => out.broken(&child_key, format!("cannot read {child_rel}/: {e}"), &e),
                    Ok(()) => {}
                }
            }
        } else if is_regular(&st) {
            if let Some(r) = reader.filter(|r| !r.might_read(&entry.parent, &entry.name, &st)) {
                if r.is_unknown_owner() {
                    out.refuse(child_rel, "is readable by its owner alone, and no job user is named to read it as; not uploaded");
                } else {
                    out.warn(format!(
                        "{child_rel} is not readable by the job's user; not uploaded"
                    ));
                }
                continue;
            }
            let ceiling = entry_ceiling(&child_key);
            if !out.files.contains_key(&child_key) {
                if out.listed_bytes.saturating_add(ceiling) > room {
                    return Err(Stop::Full);
                }
                out.listed_bytes += ceiling;
            }
            out.files.insert(child_key, FileStamp::of_stat(&st));
        } else {
            let symlink = nix::sys::stat::SFlag::from_bits_truncate(st.st_mode)
                & nix::sys::stat::SFlag::S_IFMT
                == nix::sys::stat::SFlag::S_IFLNK;
            let kind = if symlink {
                "a symlink"
            } else {
                "not a regular file"
            };
            out.warn(format!("{child_rel} is {kind}; not uploaded"));
        }
    }
    Ok(())
}

/// Opens the directory `name` below `parent` (whose path is the [`rel_key`] `key`) to walk
/// it, or says why not (into `out`).
///
/// [`rel_key`]: c3_proto::manifest::rel_key
fn open_walked(
    parent: &DirFd,
    name: &OsStr,
    key: &str,
    reader: Option<&JobReader>,
    out: &mut Scan,
) -> Option<DirFd> {
    let rel = &c3_proto::manifest::rel_display(key);
    let dir = match parent.open_dir(Path::new(name)) {
        Ok(d) => d,
        // Deleted meanwhile: nothing to collect.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        // A symlink (planted, or swapped in for the directory): never followed.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV)
            ) =>
        {
            out.warn(format!("{rel} is not a directory (a symlink?); skipped"));
            return None;
        }
        Err(e) => {
            out.broken(key, format!("cannot open {rel}/: {e}"), &e);
            return None;
        }
    };
    if let Some(reader) = reader {
        match crate::confine::fstat(&dir).and_then(|st| reader.may_enter(&dir, &st)) {
            Ok(true) => {}
            Ok(false) if reader.is_unknown_owner() => {
                out.refuse(
                    rel.to_string(),
                    "is open to its owner alone, and no job user is named to read it as; skipped",
                );
                return None;
            }
            Ok(false) => {
                out.warn(format!("{rel}/ is not readable by the job's user; skipped"));
                return None;
            }
            Err(e) => {
                out.broken(key, format!("cannot stat {rel}/: {e}"), &e);
                return None;
            }
        }
    }
    Some(dir)
}

fn display_rel(raw: &[u8]) -> String {
    c3_proto::manifest::rel_display(&c3_proto::manifest::rel_key(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job's `touch -d 2300-01-01`: the time in ns overflowed an i64 (a panic in debug
    /// builds, mid-scan).
    #[test]
    fn a_file_time_past_2262_is_stamped_without_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let in_2300 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10_413_792_000);
        file.set_modified(in_2300).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&path).unwrap());
        assert_eq!(stamp.mtime_ns, i64::MAX);
        let st = nix::sys::stat::stat(&path).unwrap();
        assert_eq!(FileStamp::of_stat(&st), stamp);
    }

    /// More files open to their owner alone than are named (a sidecar's unknown owner, a
    /// trainer's `umask 077`): each counts as refused, but no place is unread, so a file gone
    /// from the dirs is known gone. Counted as unread places, they made every output dir
    /// incomplete, and the complete manifest kept listing deleted checkpoints.
    #[test]
    fn files_refused_past_the_named_ones_leave_the_scan_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::set_permissions(w, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(w.join("out")).unwrap();
        std::fs::set_permissions(w.join("out"), std::fs::Permissions::from_mode(0o755)).unwrap();
        for i in 0..MAX_INCOMPLETE + 5 {
            let f = w.join(format!("out/private-{i}"));
            std::fs::write(&f, "x").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let open = w.join("out/open");
        std::fs::write(&open, "y").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let reader = JobReader {
            uid: crate::confine::UNKNOWN_OWNER_UID,
            gids: Vec::new(),
        };
        let found = scan(w, &["out".to_string()], Some(&reader), 1 << 30);
        assert_eq!(found.owner_only.len(), MAX_INCOMPLETE);
        assert_eq!(found.refused_more, 5);
        assert!(found.incomplete.is_empty(), "{:?}", found.incomplete);
        assert!(found.covers("out/ckpt-deleted"));
        assert!(found.files.contains_key("out/open"));
    }

    #[test]
    fn a_wide_tree_is_walked_with_few_fds() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        for i in 0..300 {
            std::fs::create_dir_all(w.join(format!("artifacts/d{i}"))).unwrap();
            std::fs::write(w.join(format!("artifacts/d{i}/f")), "x").unwrap();
        }
        // A limit far below the width: opening every sibling at once would fail.
        let limit =
            nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
        let open_now = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            open_now + 40,
            limit.1,
        )
        .unwrap();
        let s = scan(w, &["artifacts".into()], None, u64::MAX);
        nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
            limit.0,
            limit.1,
        )
        .unwrap();
        assert_eq!(s.files.len(), 300, "{:?}", s.warnings.first());
        assert!(s.incomplete.is_empty());
    }

    #[test]
    fn a_path_deeper_than_max_depth_is_refused_by_name_not_walked() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        // artifacts/ and 140 levels below it, a file in each.
        let mut d = w.join("artifacts");
        for _ in 0..=140 {
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("f"), "x").unwrap();
            d.push("d");
        }
        let s = scan(w, &["artifacts".into()], None, u64::MAX);
        // artifacts/f has 2 components, artifacts/d/f 3, ...: MAX_DEPTH - 1 files fit.
        assert_eq!(
            s.files.len(),
            MAX_DEPTH - 1,
            "the files above the limit are collected"
        );
        // The directory at the limit and the file beside it, by the directory that holds them:
        // refused, not unread (a file deleted beside them is gone from the manifest).
        let last = format!("artifacts{}", "/d".repeat(MAX_DEPTH - 1));
        assert_eq!(s.refused, vec![last.clone()]);
        assert!(s.incomplete.is_empty());
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("deeper than 128 directories")));
    }

    /// Makes `artifacts/` + components of 250 bytes until the path is `len` bytes long or
    /// more (through fds: past PATH_MAX); returns it (relative) and its fd.
    fn long_dir(w: &Path, len: usize) -> (String, DirFd) {
        let mut rel = "artifacts".to_string();
        while rel.len() < len {
            rel.push('/');
            rel.push_str(&"n".repeat(250.min(len - rel.len())));
        }
        let dir = DirFd::open(w)
            .unwrap()
            .ensure_dir(Path::new(&rel), 0o755, None)
            .unwrap();
        (rel, dir)
    }

    fn touch(dir: &DirFd, name: &str) {
        use nix::fcntl::{openat, OFlag};
        let flags = OFlag::O_CREAT | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        openat(
            dir,
            name,
            flags,
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
    }

    /// A job that puts thousands of entries too long to store in one directory gets that
    /// directory named once: the scan's memory, the error lines and the failures named do
    /// not grow with the count (each name there is up to 16 KiB).
    #[test]
    fn entries_past_the_path_limit_name_their_directory_once() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        let (base, fd) = long_dir(w, MAX_REL_PATH - 20);
        for i in 0..3000 {
            touch(&fd, &format!("{i:040}"));
        }
        touch(&fd, "ok");
        let s = scan(w, &["artifacts".into()], None, u64::MAX);
        assert_eq!(s.refused, vec![base.clone()]);
        assert!(s.incomplete.is_empty());
        // A file that fits and is gone from beside them is known gone (off the manifest).
        assert!(s.covers(&format!("{base}/gone")));
        assert_eq!(s.files.len(), 1, "the short name beside them is collected");
        assert_eq!(
            s.warnings.len(),
            1,
            "{:?}",
            &s.warnings[..2.min(s.warnings.len())]
        );
        assert_eq!(s.more_warnings, 0);
    }

    /// Past `MAX_INCOMPLETE` directories holding entries too deep or long, the rest are
    /// counted, not named: they are no unread place (what fits there was seen), so no output
    /// dir counts as incomplete and a file gone from them is known gone.
    #[test]
    fn many_directories_of_refused_entries_leave_the_scan_whole() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        // Each subdirectory fits, the entry in it does not.
        let (_, fd) = long_dir(w, MAX_REL_PATH - 300);
        for i in 0..MAX_INCOMPLETE + 20 {
            let sub = fd
                .ensure_dir(Path::new(&format!("{i:0250}")), 0o755, None)
                .unwrap();
            touch(&sub, &"f".repeat(100));
        }
        std::fs::create_dir(w.join("out")).unwrap();
        std::fs::write(w.join("out/g"), "x").unwrap();
        let dirs = vec!["artifacts".to_string(), "out".to_string()];
        let s = scan(w, &dirs, None, u64::MAX);
        assert!(s.incomplete.is_empty(), "{:?}", s.incomplete);
        assert_eq!((s.refused.len(), s.refused_more), (MAX_INCOMPLETE, 20));
        assert!(s.covers("out/gone") && s.covers("artifacts/gone"));
        assert_eq!(s.files.len(), 1);
    }

    /// Past `MAX_INCOMPLETE` places that cannot be read whole, every output dir counts as
    /// incomplete: the list `covers` goes through for each file stays short.
    #[test]
    fn many_unreadable_places_make_every_dir_incomplete() {
        use std::io::{Error, ErrorKind};
        let mut s = Scan::default();
        for i in 0..MAX_INCOMPLETE + 20 {
            s.broken(
                &format!("artifacts/d{i}"),
                "x".into(),
                &Error::from(ErrorKind::PermissionDenied),
            );
        }
        let dirs = vec!["artifacts".to_string(), "out".to_string()];
        s.overflowed(&dirs);
        assert_eq!(s.incomplete, dirs);
        // Every one of them refused for lack of permission: no later look stores them either.
        assert!(s.for_good.iter().eq(dirs.iter()), "{:?}", s.for_good);
    }

    /// A place refused for lack of permission is so for good (the agent reads as the job's
    /// user, or with more rights); one that failed otherwise (I/O, no fds left) may be read
    /// at a later look. Past `MAX_INCOMPLETE`, every dir is for good only if all of them were.
    #[test]
    fn a_place_refused_for_lack_of_permission_is_so_for_good() {
        use std::io::{Error, ErrorKind};
        let mut s = Scan::default();
        s.broken(
            "artifacts/shut",
            "x".into(),
            &Error::from(ErrorKind::PermissionDenied),
        );
        s.broken("artifacts/eio", "x".into(), &Error::other("I/O error"));
        assert_eq!(s.incomplete, ["artifacts/shut", "artifacts/eio"]);
        assert!(s.for_good.iter().eq(["artifacts/shut"].iter()));
        let dirs = vec!["artifacts".to_string()];
        let mut many = Scan::default();
        for i in 0..MAX_INCOMPLETE + 1 {
            let e = Error::from(ErrorKind::PermissionDenied);
            many.broken(&format!("artifacts/{i}"), "x".into(), &e);
        }
        let mut mixed = Scan::default();
        for i in 0..MAX_INCOMPLETE {
            let e = Error::from(ErrorKind::PermissionDenied);
            mixed.broken(&format!("artifacts/{i}"), "x".into(), &e);
        }
        mixed.broken("artifacts/eio", "x".into(), &Error::other("I/O error"));
        for (s, for_good) in [(&mut many, true), (&mut mixed, false)] {
            s.overflowed(&dirs);
            assert_eq!(s.incomplete, dirs);
            assert_eq!(s.for_good.contains("artifacts"), for_good);
        }
    }

    #[test]
    fn covers_knows_what_an_unreadable_subtree_hides() {
        let s = Scan {
            incomplete: vec!["artifacts/a".into()],
            ..Scan::default()
        };
        assert!(!s.covers("artifacts/a/f"));
        assert!(s.covers("artifacts/ab/f"));
        assert!(s.covers("artifacts/b"));
    }

    /// Places are kept as keys and compared by bytes: a file whose name is not UTF-8 (its key
    /// is base64) below a place not read is not taken as deleted.
    #[test]
    fn covers_compares_paths_that_are_not_utf8_by_their_bytes() {
        use c3_proto::manifest::rel_key;
        let s = Scan {
            incomplete: vec!["artifacts".into(), rel_key(b"out/\xffd")],
            ..Scan::default()
        };
        assert!(!s.covers(&rel_key(b"artifacts/\xff.pt")));
        assert!(!s.covers(&rel_key(b"out/\xffd/\xfe")));
        assert!(s.covers("out/\u{fffd}d/x"));
        assert!(s.covers(&rel_key(b"out/\xffe/x")));
        assert!(s.covers(&rel_key(b"artifactsx/\xff")));
        // A file that could not be looked at (a FUSE mount over it) is no deleted one either.
        assert!(!s.covers(&rel_key(b"out/\xffd")));
    }

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
            None,
            u64::MAX,
        );
        let names: Vec<_> = s.files.keys().cloned().collect();
        assert_eq!(names, vec!["artifacts/deep/er/a.txt", "out/b"]);
        assert_eq!(s.warnings.len(), 2, "{:?}", s.warnings);
        assert!(s.incomplete.is_empty());
    }

    /// Past what a manifest can list the walk stops: what it holds is bounded, nothing is
    /// taken as deleted (every dir incomplete), and one warning says why.
    #[test]
    fn a_scan_stops_where_a_manifest_is_full() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        for d in ["artifacts/a", "artifacts/b", "out"] {
            std::fs::create_dir_all(w.join(d)).unwrap();
            for i in 0..10 {
                std::fs::write(w.join(d).join(format!("f{i}")), "").unwrap();
            }
        }
        let dirs = vec!["artifacts".to_string(), "out".to_string()];
        // artifacts/ is walked first: 20 keys of 14 bytes, then out/'s 10 of 6.
        let s = scan(w, &dirs, None, 15 * entry_ceiling("artifacts/a/f0"));
        assert_eq!(s.files.len(), 15);
        assert_eq!(s.incomplete, dirs);
        // The job made more files than a manifest lists: so they stay.
        assert!(s.for_good.iter().eq(dirs.iter()), "{:?}", s.for_good);
        assert!(!s.covers("artifacts/a/f0") && !s.covers("out/f9"));
        assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
        assert!(s.warnings[0].contains("than a manifest can list"));
        let room = 20 * entry_ceiling("artifacts/a/f0") + 10 * entry_ceiling("out/f0");
        let all = scan(w, &dirs, None, room);
        assert_eq!((all.files.len(), all.incomplete.len()), (30, 0));
        let short = scan(w, &dirs, None, room - 1);
        assert_eq!((short.files.len(), short.incomplete.len()), (29, 2));
    }

    /// Entries no manifest lists (symlinks here) count towards the walk's end too. A tree that
    /// held still while read is as large the next time: its dirs incomplete for good (taken
    /// for one still changing, `recover` walked it every hour and retention kept it for
    /// ever). One that changed while read is not for good (a later look walks it whole once it
    /// settles): `TreeWalk::changed_while_read`, tested in `treewalk`.
    #[test]
    fn a_walk_ends_after_its_budget_of_entries_of_any_kind() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("artifacts")).unwrap();
        for i in 0..100 {
            std::os::unix::fs::symlink("/nowhere", w.join(format!("artifacts/l{i}"))).unwrap();
        }
        std::fs::write(w.join("artifacts/zz"), "z").unwrap();
        let dirs = vec!["artifacts".to_string()];
        let s = scan_within(w, &dirs, None, u64::MAX, 50);
        assert_eq!(s.incomplete, dirs);
        assert_eq!(s.for_good.iter().cloned().collect::<Vec<_>>(), dirs);
        assert!(!s.covers("artifacts/zz"));
        assert!(
            s.warnings.iter().any(|w| w.contains("none changed")),
            "{:?}",
            s.warnings
        );
        let whole = scan_within(w, &dirs, None, u64::MAX, 200);
        assert!(whole.incomplete.is_empty());
        assert_eq!(whole.files.len(), 1);
        assert!(visit_budget(u64::MAX) > 1_000_000 && visit_budget(1 << 20) == 1_000_000);
    }

    /// Long paths count with their length: 200 files below a 15 KiB path are 3 MB of keys, far
    /// more than a 100 KB manifest could list, and the scan does not hold them.
    #[test]
    fn long_paths_fill_a_manifest_sooner() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        let (_, fd) = long_dir(w, 15_000);
        for i in 0..200 {
            touch(&fd, &format!("f{i}"));
        }
        let s = scan(w, &["artifacts".into()], None, 100_000);
        let held: u64 = s.files.keys().map(|k| entry_ceiling(k)).sum();
        assert!(held <= 100_000, "{} files, {held} bytes", s.files.len());
        assert_eq!(s.files.len(), 6);
        assert_eq!(s.incomplete, vec!["artifacts".to_string()]);
    }
}
