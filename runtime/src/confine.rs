//! Every path inside a job's workdir is hostile: the job (or an earlier attempt of it) may
//! have put a symlink anywhere, and may swap a directory for one between our check and our
//! use. The root agent therefore never resolves such a path with plain path calls.
//!
//! * [`DirFd`] is an open directory. Below it, directories are opened with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (or `O_NOFOLLOW` step by step where
//!   openat2 is missing), created with `mkdirat` and handed to the job user with `fchown`
//!   only when the agent created them; files are created `O_EXCL | O_NOFOLLOW` under
//!   unpredictable names, and modes and owners are set on the open fd.
//! * [`JobReader`] says whether the job's user could read a file itself: the agent never
//!   collects (and so never exports) a file the job could not have read.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use c3_proto::record::DirPin;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, unlinkat, Gid, Uid, UnlinkatFlags};

/// Job roots checked once, by path: see [`DirFd::open_root`].
static PINNED: std::sync::Mutex<std::collections::BTreeMap<std::path::PathBuf, Pin>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// What a job root's path must name from now on in this process.
#[derive(Debug, Clone)]
enum Pin {
    /// This directory, and nothing else; reached below a trusted root (its path, and the
    /// rest) when known.
    Dir(DirPin, Option<(PathBuf, PathBuf)>),
    /// This open directory, held by a running attempt ([`DirFd::hold`]), whose path is not
    /// looked at again while it is held; the [`HeldRoot`] that holds it is named by its
    /// number, and the pin it replaced comes back when that lets go.
    Held(std::sync::Arc<OwnedFd>, u64, Box<Pin>),
    /// Nothing: the path could not be checked safely (why, in words), so no open of it by
    /// path is safe either; `true`: the directory is gone (or another is in its place).
    Refused(String, bool),
}

/// A pin taken ([`DirFd::pin_later`]) and not yet recorded.
#[derive(Debug)]
pub struct PendingPin {
    path: PathBuf,
    pin: Pin,
}

impl PendingPin {
    /// Records it, as [`DirFd::pin`] does.
    pub fn record(self) {
        PINNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.path, self.pin);
    }
}

/// An open directory that job-controlled paths are resolved beneath.
#[derive(Debug)]
pub struct DirFd(OwnedFd);

/// A job root held open for [`DirFd::open_root`] ([`DirFd::hold`]) until this is dropped:
/// the run of an attempt keeps it to its end, and a long-lived agent keeps no directory of a
/// finished job open (an fd each, and a file system that could not be unmounted).
#[derive(Debug)]
#[must_use = "the root is held only while this lives"]
pub struct HeldRoot {
    path: PathBuf,
    /// Which hold this is: a later attempt in the same workdir may hold it anew, and this
    /// one's end must not take that one's away.
    token: u64,
}

impl Drop for HeldRoot {
    fn drop(&mut self) {
        let mut pinned = PINNED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Pin::Held(_, token, before)) = pinned.get(&self.path) {
            if *token == self.token {
                // The pin by path stays: a late look finds this directory there, or nothing.
                let before = (**before).clone();
                pinned.insert(self.path.clone(), before);
            }
        }
    }
}

/// Who gets the directories the agent creates for the job (its uid and gid).
pub type Owner = Option<(u32, u32)>;

impl AsFd for DirFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl DirFd {
    /// Opens a directory the agent trusts (its config, a jobs root, a CLI argument); only the
    /// last component must not be a symlink.
    pub fn open(path: &Path) -> io::Result<DirFd> {
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(DirFd(fd))
    }

    /// Opens a root the operator named (`jobs_root`, the state dir's jobs dir), whose own
    /// path, its last component included, may be a symlink (`/srv/jobs -> /mnt/jobs`): the
    /// operator's choice, resolved here; what lies below it is opened from this fd.
    pub fn open_trusted(path: &Path) -> io::Result<DirFd> {
        DirFd::open(&std::fs::canonicalize(path)?)
    }

    /// Opens a job's root (its workdir, or a sidecar's parent dir) by path. If [`DirFd::pin`]
    /// recorded which directory that path named when it was checked, anything else there now
    /// is refused: whoever may write above it (a job's own scratch tree) could have swapped a
    /// component for a symlink to another tenant's tree, and the path would follow it.
    pub fn open_root(path: &Path) -> io::Result<DirFd> {
        let pinned = PINNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .cloned();
        // A running attempt's own directory, wherever it lies now: another member of a
        // team's group-writable directory may rename the workdir in it (a rename needs write
        // access to the parent only), and the job goes on in it (its cwd is the inode).
        if let Some(Pin::Held(fd, ..)) = &pinned {
            return Ok(DirFd(fd.try_clone()?));
        }
        // Refused before any open by path: the path may lead anywhere (an automount, a hung
        // network mount).
        if let Some(Pin::Refused(why, gone)) = &pinned {
            let kind = match gone {
                true => io::ErrorKind::NotFound,
                false => io::ErrorKind::InvalidInput,
            };
            return Err(io::Error::new(
                kind,
                format!("{}: {why}; refusing it", path.display()),
            ));
        }
        // Below its trusted root no symlink is followed: a job user who owns a directory
        // above its workdir could swap it for a link to an automount or a dead NFS server,
        // and an open by path would go there (and wait) before the pin could refuse it.
        let dir = match &pinned {
            Some(Pin::Dir(_, Some((root, rel)))) => {
                below_root(root, rel, |r, rel| r.open_dir(rel))?
            }
            _ => DirFd::open(path)?,
        };
        if let Some(Pin::Dir(id, _)) = pinned {
            if dir.pin_id()? != id {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is no longer the directory it was when the job started (a path above it was swapped); refusing it",
                        path.display()
                    ),
                ));
            }
        }
        Ok(dir)
    }

    /// Records that `path` names this directory, for every later [`DirFd::open_root`].
    /// `below`: the trusted root it was reached below with no symlink (`jobs_root`, or `/`
    /// for a sidecar's parent), the way every later open reaches it; `None` for a path the
    /// operator gave (a quick run's current dir), opened as it is.
    pub fn pin(&self, path: &Path, below: Option<&Path>) -> io::Result<()> {
        self.pin_later(path, below).map(PendingPin::record)
    }

    /// [`DirFd::pin`], recorded only when [`PendingPin::record`] says so: a look made on a
    /// blocking thread that was given up on (a mount that stopped answering) must not pin
    /// the path over the refusal made meanwhile, when it ends after all.
    pub fn pin_later(&self, path: &Path, below: Option<&Path>) -> io::Result<PendingPin> {
        Ok(PendingPin {
            path: path.to_path_buf(),
            pin: self.pin_for(path, below)?,
        })
    }

    /// [`DirFd::pin`], and while the returned [`HeldRoot`] lives, every
    /// [`DirFd::open_root`] of `path` hands out this very directory without a look at the
    /// path: a running attempt's scans, uploads and result read do not depend on where the
    /// workdir is now. Only a later agent (`recover`, `resync`), which has no open
    /// directory to go on, reaches it by path again.
    pub fn hold(&self, path: &Path, below: Option<&Path>) -> io::Result<HeldRoot> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let pin = self.pin_for(path, below)?;
        let fd = std::sync::Arc::new(self.0.try_clone()?);
        let token = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        PINNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), Pin::Held(fd, token, Box::new(pin)));
        Ok(HeldRoot {
            path: path.to_path_buf(),
            token,
        })
    }

    /// What [`DirFd::pin`] records for `path`.
    fn pin_for(&self, path: &Path, below: Option<&Path>) -> io::Result<Pin> {
        let below = match below {
            Some(root) => {
                let rel = path.strip_prefix(root).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{} is not below {}", path.display(), root.display()),
                    )
                })?;
                Some((root.to_path_buf(), rel.to_path_buf()))
            }
            None => None,
        };
        Ok(Pin::Dir(self.pin_id()?, below))
    }

    /// Makes every later [`DirFd::open_root`] of `path` fail, saying `why`.
    pub fn refuse(path: &Path, why: String) {
        Self::refuse_as(path, why, false)
    }

    /// [`DirFd::refuse`]; `gone`: the directory is no longer there, or another is in its
    /// place, so no later look finds it either (every open of the path fails `NotFound`).
    pub fn refuse_as(path: &Path, why: String, gone: bool) {
        PINNED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), Pin::Refused(why, gone));
    }

    /// Which directory this is (device, inode), as the run record keeps it.
    pub fn pin_id(&self) -> io::Result<DirPin> {
        let st = nix::sys::stat::fstat(self)?;
        Ok(DirPin {
            dev: st.st_dev,
            ino: st.st_ino,
        })
    }

    pub fn try_clone(&self) -> io::Result<DirFd> {
        Ok(DirFd(self.0.try_clone()?))
    }

    /// Opens the directory `rel` below this one; no component may be a symlink or `..`.
    pub fn open_dir(&self, rel: &Path) -> io::Result<DirFd> {
        beneath(self, rel, DIR_FLAGS).map(DirFd)
    }

    /// Opens the regular file `rel` below this one for reading, never through a symlink.
    /// Anything else is not opened: its `O_PATH` handle comes back, which `fstat` shows for
    /// what it is (callers refuse all but a regular file) and which reads nothing. Opened as
    /// root, a device or FIFO a job placed had effects of its own: a tty became the agent's
    /// controlling terminal, a watchdog or a tape drive acted, a FIFO's blocked writer was
    /// let go.
    pub fn open_file(&self, rel: &Path) -> io::Result<File> {
        let handle = beneath(
            self,
            rel,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        )?;
        let st = fstat(&handle)?;
        // O_PATH with O_NOFOLLOW holds a symlink itself, where an open refuses it.
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK {
            return Err(Errno::ELOOP.into());
        }
        if !is_regular(&st) {
            return Ok(File::from(handle));
        }
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        Ok(File::from(reopen(&handle, flags)?))
    }

    /// `lstat` of one entry of this directory. An entry that is the root of a FUSE mount a
    /// user made is refused ([`is_mount_refused`]): a caller that went on would open it. On a
    /// local file system the kernel's own attributes are the file's, and asking them never
    /// reaches a file system that may not answer. Elsewhere (NFS, Lustre, a root's FUSE) they
    /// may be stale: another client's rewrite in place would be missed, so the entry is held
    /// by an `O_PATH` handle (a mount made on its name later is not entered), judged, and
    /// only then asked of its file system.
    pub fn stat(&self, name: &OsStr) -> io::Result<FileStat> {
        self.stat_on(name, attributes_are_local(self))
    }

    /// [`DirFd::stat`], told whether this directory's file system is a local one
    /// ([`attributes_are_local`]): a walk asks once per directory, not once per entry.
    pub fn stat_on(&self, name: &OsStr, local: bool) -> io::Result<FileStat> {
        if !local {
            return self.stat_held(name);
        }
        let c = std::ffi::CString::new(name.as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let stx = raw_statx(
            self.as_fd().as_raw_fd(),
            &c,
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
        )?;
        let st = file_stat(&stx);
        vet_mount(&stx, || dev_of(self), None)?;
        Ok(st)
    }

    /// [`DirFd::stat`] from the file system itself, through a handle judged first.
    fn stat_held(&self, name: &OsStr) -> io::Result<FileStat> {
        let handle = self.entry_handle(name)?;
        Ok(nix::sys::stat::fstat(&handle)?)
    }

    /// An `O_PATH` handle of the entry `name` (the symlink itself, if it is one), judged by
    /// [`vet_mount`] from the kernel's cached attributes before anything asks its file system:
    /// the job may have mounted its own there since the entry was last looked at.
    fn entry_handle(&self, name: &OsStr) -> io::Result<OwnedFd> {
        let handle = openat(
            self,
            name,
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let stx = raw_statx(handle.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
        vet_mount(&stx, || dev_of(self), Some(&handle))?;
        Ok(handle)
    }

    /// Opens (creating what is missing) the directory `rel` below this one. Every directory
    /// this call creates gets `mode` and, if given, `owner`; existing ones are left as they
    /// are. A symlink or a non-directory on the way is an error, never followed.
    pub fn ensure_dir(&self, rel: &Path, mode: u32, owner: Owner) -> io::Result<DirFd> {
        self.ensure_dir_with(rel, |_| (mode, owner))
    }

    /// [`DirFd::ensure_dir`] for a job with a user (`owner`), where each directory that
    /// already existed must be that user's, root's or the agent's (as a workdir must):
    /// root writes there on the job's behalf, and one of another user's (another tenant's
    /// job ran earlier in the same root-owned workdir, and left its private `results/`)
    /// would get this job's files, over its own.
    pub fn ensure_own_dir(&self, rel: &Path, mode: u32, owner: Owner) -> io::Result<DirFd> {
        self.ensure_dir_vetted(
            rel,
            |_| (mode, owner),
            |name, st, _, _| owners_dir(name, st, owner),
        )
    }

    /// [`DirFd::ensure_own_dir`] for a dataset: no directory on the way that others may
    /// rename in ([`others_may_rename_in`]) either, where another member of a team could
    /// swap the verified files for their own while the job reads them.
    pub fn ensure_dataset_dir(&self, rel: &Path, mode: u32, owner: Owner) -> io::Result<DirFd> {
        self.ensure_dir_vetted(
            rel,
            |_| (mode, owner),
            |name, st, _, held| {
                owners_dir(name, st, owner)?;
                match owner {
                    Some(job) if others_may_rename_in(st, held, job) => Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        OpenToOthers(format!(
                            "`{}` (uid {}, gid {}, mode {:o}) lets other users rename and replace what is in it; refusing to place a dataset there",
                            Path::new(name).display(),
                            st.st_uid,
                            st.st_gid,
                            st.st_mode & 0o7777
                        )),
                    )),
                    _ => Ok(()),
                }
            },
        )
    }

    /// [`DirFd::ensure_dir`] with the mode and owner chosen per component (`true`: the last).
    pub fn ensure_dir_with(
        &self,
        rel: &Path,
        how: impl FnMut(bool) -> (u32, Owner),
    ) -> io::Result<DirFd> {
        self.ensure_dir_vetted(rel, how, |_, _, _, _| Ok(()))
    }

    /// [`DirFd::ensure_dir_with`], where each component that already existed is first shown
    /// to `vet` (its name, its stat on the open directory, and whether it is the last): an
    /// error there stops the walk.
    pub fn ensure_dir_vetted(
        &self,
        rel: &Path,
        mut how: impl FnMut(bool) -> (u32, Owner),
        vet: impl Fn(&OsStr, &FileStat, bool, &OwnedFd) -> io::Result<()>,
    ) -> io::Result<DirFd> {
        let parts: Vec<&OsStr> = rel
            .components()
            .map(|c| match c {
                std::path::Component::Normal(p) => Ok(p),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("`{}` is not a plain relative path", rel.display()),
                )),
            })
            .collect::<io::Result<_>>()?;
        let mut dir = self.try_clone()?;
        for (i, name) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            let (mode, owner) = how(last);
            let created = match mkdirat(&dir, *name, Mode::from_bits_truncate(mode)) {
                Ok(()) => true,
                Err(Errno::EEXIST) => false,
                Err(e) => return Err(e.into()),
            };
            // A directory a retry finds, or a sidecar's, may be a job's FUSE mount by now.
            let next = step(&dir.0, name, DIR_FLAGS).map_err(|e| {
                if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)) {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "`{}` is a symlink or not a directory; refusing to go through it",
                            Path::new(name).display()
                        ),
                    )
                } else {
                    e
                }
            })?;
            if created {
                // What we opened must be what we made: someone who may write the parent could
                // have renamed another directory into the name between mkdirat and openat, and
                // must not get it chowned to them. Ours is the agent's and empty (read, not
                // judged by a link count of 2: btrfs counts 1 for every directory).
                // An empty directory of root's renamed in (a team dir's, under a root agent)
                // passed both, and was chmodded and chowned to the job's user: one just made
                // has never changed since its birth, one renamed in has (the rename is a
                // change), where the file system says when a directory was born.
                let st = nix::sys::stat::fstat(&next)?;
                if st.st_uid != nix::unistd::geteuid().as_raw()
                    || !is_empty_dir(&next)?
                    || !unchanged_since_birth(&next)?
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "`{}` was replaced while it was being created; refusing it",
                            Path::new(name).display()
                        ),
                    ));
                }
                // The umask narrowed the mode; an explicit one on the fd is what we meant.
                nix::sys::stat::fchmod(&next, Mode::from_bits_truncate(mode))?;
                if let Some((uid, gid)) = owner {
                    fchown(&next, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
                }
            } else {
                vet(name, &nix::sys::stat::fstat(&next)?, last, &next)?;
            }
            dir = DirFd(next);
        }
        Ok(dir)
    }

    /// Creates a new file under an unpredictable name (`O_EXCL | O_NOFOLLOW`, mode 0600).
    pub fn create_temp(&self, prefix: &str) -> io::Result<(String, File)> {
        for _ in 0..16 {
            let name = format!("{prefix}{}.part", random_hex());
            let flags = OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC;
            match openat(self, name.as_str(), flags, Mode::from_bits_truncate(0o600)) {
                Ok(fd) => {
                    let file = File::from(fd);
                    // Held while it is written: one no one holds was abandoned
                    // ([`DirFd::remove_abandoned_temps`]).
                    let _ = file.try_lock();
                    return Ok((name, file));
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary name",
        ))
    }

    /// Removes the agent's own [`DirFd::create_temp`] files (`prefix…part`) in this
    /// directory that no one holds: what a writer killed with the agent (OOM, a crash, a
    /// second Ctrl-C) left where the file system has no `O_TMPFILE` (NFS, CIFS, FUSE). Root's
    /// and 0600 in a job's dataset directory, each crash's were there for good, and a loader
    /// opening every file it lists failed on them. Only a regular file of the agent's user
    /// with one link, unwritten for [`ABANDONED_AFTER`] (a mount whose locks are per node:
    /// another node's pull into a shared DEST), whose lock is free, is removed. How many were.
    pub fn remove_abandoned_temps(&self, prefix: &str) -> usize {
        let Ok(mut listing) = nix::dir::Dir::openat(self, ".", DIR_FLAGS, Mode::empty()) else {
            return 0;
        };
        let names: Vec<std::ffi::OsString> = listing
            .iter()
            .filter_map(Result::ok)
            .map(|e| OsStr::from_bytes(e.file_name().to_bytes()).to_os_string())
            .filter(|n| {
                n.as_bytes().starts_with(prefix.as_bytes()) && n.as_bytes().ends_with(b".part")
            })
            .collect();
        let euid = nix::unistd::geteuid().as_raw();
        let ours = |st: &FileStat| is_regular(st) && st.st_uid == euid && st.st_nlink == 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        let mut removed = 0;
        for name in names {
            let Ok(before) = self.stat(&name) else {
                continue;
            };
            if !ours(&before) {
                continue;
            }
            let written = crate::display::file_time_ns(before.st_mtime, before.st_mtime_nsec);
            if now - written < ABANDONED_AFTER.as_nanos() as i64 {
                continue;
            }
            // Held and judged before any open: the job's user may swap its own FIFO (or a
            // file it mounted a FUSE file system on) in at the name between the look above
            // and an open by name, and root would open that.
            let Ok(handle) = self.entry_handle(&name) else {
                continue;
            };
            let same = |st: &FileStat| st.st_dev == before.st_dev && st.st_ino == before.st_ino;
            if !nix::sys::stat::fstat(&handle).is_ok_and(|st| same(&st) && ours(&st)) {
                continue;
            }
            // The lock is asked on a write handle of that very file (its fd's link): NFS
            // takes a flock for a POSIX lock, which a read-only fd may not hold (EBADF, and
            // every temp file looked held).
            let flags = OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
            let Ok(writable) = reopen(&handle, flags).map(File::from) else {
                continue;
            };
            if writable.try_lock().is_err() {
                continue;
            }
            if self.stat(&name).is_ok_and(|st| same(&st)) && self.remove_file(&name).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// A new file in this directory that no name leads to (`O_TMPFILE`) until
    /// [`DirFd::place_temp`] links it in: a process killed while writing it leaves nothing
    /// behind. Where the file system cannot make one, a [`DirFd::create_temp`] file, whose
    /// name comes back.
    pub fn create_unnamed_temp(&self, prefix: &str) -> io::Result<(Option<String>, File)> {
        let flags = OFlag::O_TMPFILE | OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let flags = if crate::fault::armed_at("no-o-tmpfile", prefix) {
            OFlag::O_DIRECTORY | OFlag::O_WRONLY
        } else {
            flags
        };
        match openat(self, ".", flags, Mode::from_bits_truncate(0o600)) {
            Ok(fd) => Ok((None, File::from(fd))),
            // EISDIR: a kernel that predates O_TMPFILE (it carries O_DIRECTORY).
            Err(Errno::EOPNOTSUPP | Errno::EISDIR) => {
                let (name, file) = self.create_temp(prefix)?;
                Ok((Some(name), file))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Puts a [`DirFd::create_unnamed_temp`] file at `to` (a symlink there is replaced,
    /// never followed): a named one is renamed; an unnamed one is linked in under a temp name
    /// (`linkat` cannot replace), then renamed. An error leaves no name of it behind.
    /// Without `replace`, whatever came to be at `to` meanwhile stays (`EEXIST`).
    pub fn place_temp(
        &self,
        named: Option<&str>,
        file: &File,
        prefix: &str,
        to: &OsStr,
        replace: bool,
    ) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        let rename = |from: &OsStr| {
            if replace {
                self.rename(from, to)
            } else {
                self.rename_noreplace(from, to)
            }
        };
        if let Some(name) = named {
            return rename(OsStr::new(name));
        }
        for _ in 0..16 {
            let name = format!("{prefix}{}.part", random_hex());
            // AT_EMPTY_PATH needs CAP_DAC_READ_SEARCH; without it, the fd's /proc link.
            let linked = nix::unistd::linkat(file, "", self, name.as_str(), AtFlags::AT_EMPTY_PATH);
            let linked = match linked {
                Err(Errno::EPERM | Errno::ENOENT) => nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    format!("/proc/self/fd/{}", file.as_raw_fd()).as_str(),
                    self,
                    name.as_str(),
                    AtFlags::AT_SYMLINK_FOLLOW,
                ),
                other => other,
            };
            match linked {
                Ok(()) => {}
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(e.into()),
            }
            let renamed = rename(OsStr::new(&name));
            if renamed.is_err() {
                let _ = self.remove_file(OsStr::new(&name));
            }
            return renamed;
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temporary name",
        ))
    }

    /// Renames within this directory unless something is at `to` (`EEXIST`). Where the
    /// file system has no `RENAME_NOREPLACE` (`EINVAL`), a link, which never replaces, and
    /// the old name's removal.
    fn rename_noreplace(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        use nix::fcntl::{renameat2, RenameFlags};
        match renameat2(self, from, self, to, RenameFlags::RENAME_NOREPLACE) {
            // A seccomp filter or an old kernel may refuse the call itself.
            Err(Errno::EINVAL | Errno::ENOSYS | Errno::EPERM) => {
                nix::unistd::linkat(self, from, self, to, AtFlags::empty())?;
                // In place under `to`: a temp name left beside it is no failure.
                if let Err(e) = self.remove_file(from) {
                    tracing::warn!(name = %Path::new(from).display(), error = %e, "cannot remove a temp name after placing its file");
                }
                Ok(())
            }
            done => Ok(done?),
        }
    }

    /// Renames within this directory; a symlink at `to` is replaced, never followed.
    pub fn rename(&self, from: &OsStr, to: &OsStr) -> io::Result<()> {
        Ok(nix::fcntl::renameat(self, from, self, to)?)
    }

    /// Removes a non-directory entry; a missing one is fine.
    pub fn remove_file(&self, name: &OsStr) -> io::Result<()> {
        match unlinkat(self, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Makes `name` a real directory: a symlink or file in its place is removed first.
    /// For the agent's own directories (`.c3`), which a job may have replaced.
    /// For a job with a user, a directory of anyone else's there (another tenant's job ran
    /// in the same root-owned workdir before: its socket's place, its result) is moved
    /// aside in this directory, never used or removed as root.
    pub fn replace_with_dir(&self, name: &OsStr, mode: u32, owner: Owner) -> io::Result<DirFd> {
        match self.stat(name) {
            Ok(st)
                if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
                    && owner.is_some_and(|(uid, _)| st.st_uid != uid) =>
            {
                let aside = aside_name(".c3-aside-");
                self.rename(name, OsStr::new(&aside))?;
                tracing::warn!(
                    name = %Path::new(name).display(),
                    aside = %aside,
                    uid = st.st_uid,
                    "another user's directory was where the agent's goes; moved aside"
                );
            }
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {}
            Ok(_) => self.remove_file(name)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        // Looked at again on the fd: the job may have swapped another user's directory in
        // since the look above.
        self.ensure_dir_vetted(
            Path::new(name),
            |_| (mode, owner),
            |name, st, _, _| match owner {
                Some((uid, _)) if st.st_uid != uid => Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "`{}` was replaced by another user's directory; refusing it",
                        Path::new(name).display()
                    ),
                )),
                _ => Ok(()),
            },
        )
    }
}

/// How long a temp file of the agent's must be unwritten before another pull takes it for
/// abandoned ([`DirFd::remove_abandoned_temps`]).
pub const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// A directory of the workdir's that others may write was refused for a dataset: what the
/// workdir holds (the job's `chmod -R 777` on an earlier attempt, a team's layout), there on
/// every attempt, not a fault of the node's.
#[derive(Debug)]
pub struct OpenToOthers(String);

impl std::fmt::Display for OpenToOthers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OpenToOthers {}

impl OpenToOthers {
    /// Whether `e` is this refusal.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<OpenToOthers>())
    }
}

/// A name to move something of the job's aside to, in its own directory: `prefix`, this
/// agent's pid and the time, unique and of a fixed length.
pub fn aside_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}{}-{nanos}", std::process::id())
}

/// Whether `fd` has not changed (contents or inode) since it was made, as far as its file
/// system tells (true where it keeps no birth time). Timestamps are all the file system's
/// own: a server's clock skew does not matter.
fn unchanged_since_birth(fd: &OwnedFd) -> io::Result<bool> {
    let stx = raw_statx(fd.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    if stx.stx_mask & libc::STATX_BTIME == 0 {
        return Ok(true);
    }
    let ns =
        |t: libc::statx_timestamp| i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    let born = ns(stx.stx_btime);
    // A second of slack: a coarse clock may stamp one syscall's times a tick apart.
    Ok([stx.stx_ctime, stx.stx_mtime]
        .into_iter()
        .all(|t| ns(t) - born <= 1_000_000_000))
}

/// Whether the open directory `dir` holds nothing (its own open file description is read,
/// so `dir`'s offset is left alone).
fn is_empty_dir(dir: &OwnedFd) -> io::Result<bool> {
    let mut listing = nix::dir::Dir::openat(dir, ".", DIR_FLAGS, Mode::empty())?;
    for entry in listing.iter() {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Opens `rel` below `dir` with `flags`, refusing symlinks and escapes in every component,
/// and never entering a FUSE file system mounted on the way ([`is_mount_refused`]).
fn beneath(dir: &DirFd, rel: &Path, flags: OFlag) -> io::Result<OwnedFd> {
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    // No mount crossed: the kernel refuses one as it resolves, so a mount made after any
    // check of ours is refused too.
    let how = OpenHow::new().flags(flags).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_XDEV,
    );
    match openat2(dir, rel, how) {
        Ok(fd) => return Ok(fd),
        // A mount on the way (or an escape, which the walk refuses too); kernels before 5.6
        // (or a seccomp filter) lack openat2, and no path call takes more than PATH_MAX: walk
        // it ourselves, one component (never a symlink, never a FUSE mount) at a time.
        Err(Errno::EXDEV | Errno::ENOSYS | Errno::ENAMETOOLONG) => {}
        Err(e) => return Err(e.into()),
    }
    let parts = plain_parts(rel)?;
    let Some((last, dirs)) = parts.split_last() else {
        return Ok(openat(dir, ".", flags, Mode::empty())?);
    };
    let mut cur = dir.try_clone()?.0;
    for p in dirs {
        cur = step(&cur, p, DIR_FLAGS)?;
    }
    step(&cur, last, flags)
}

/// Opens the entry `name` of `dir` with `flags`, never through a symlink and never into a
/// FUSE mount. It is first opened as a handle only (`O_PATH`: no word to its file system,
/// and the mount it is on held, so none made later is entered instead), judged from the
/// kernel's cached attributes and the mount table, then opened through that handle.
fn step(dir: &OwnedFd, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
    let handle_flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut handle = openat(dir, name, handle_flags, Mode::empty())?;
    let mut stx = raw_statx(handle.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    let automount = libc::STATX_ATTR_AUTOMOUNT as u64;
    if stx.stx_attributes_mask & automount != 0 && stx.stx_attributes & automount != 0 {
        // An automount point (an NFS submount, an autofs map: only root makes those) is
        // opened as what it mounts, not its empty stub, which the walk took for no directory.
        handle = openat(dir, name, handle_flags | OFlag::O_DIRECTORY, Mode::empty())?;
        stx = raw_statx(handle.as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    }
    let kind = u32::from(stx.stx_mode) & libc::S_IFMT;
    if kind == libc::S_IFLNK {
        return Err(Errno::ELOOP.into());
    }
    vet_mount(&stx, || dev_of(dir), Some(&handle))?;
    if kind == libc::S_IFDIR {
        return Ok(openat(&handle, ".", flags, Mode::empty())?);
    }
    Ok(reopen(&handle, flags)?)
}

/// Opens what `handle` (an `O_PATH` handle, or any fd) holds anew, with `flags`, through its
/// `/proc/self/fd` magic link: the very inode judged, whatever its name is now (`O_NOFOLLOW`,
/// which would refuse the link, is dropped).
pub(crate) fn reopen(handle: &impl AsFd, flags: OFlag) -> nix::Result<OwnedFd> {
    nix::fcntl::open(
        format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd()).as_str(),
        flags & !OFlag::O_NOFOLLOW,
        Mode::empty(),
    )
}

/// A FUSE file system a user mounted (or one the mount table does not name) where a job's
/// path leads: any user may mount one on a directory or file it owns (`fusermount`, with
/// `allow_other` where the node allows it), and its server answers a stat, an open or a
/// listing when it likes, or never, which held the root agent's scan (and the job's
/// terminal status with it) for ever. File systems root mounted (an NFS scratch, a tmpfs, a
/// gcsfuse or JuiceFS volume a CSI driver mounted) are entered.
#[derive(Debug, thiserror::Error)]
#[error("a file system of type {fstype} is mounted there, and the agent never looks into a FUSE one a user mounted, or one it cannot name (its server may never answer)")]
pub struct MountRefused {
    pub fstype: String,
}

/// Whether `e` is a [`MountRefused`].
pub fn is_mount_refused(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<MountRefused>())
}

/// Refuses what `stx` describes if it is the root of a FUSE mount a user made, or of one the
/// mount table does not name. `parent_dev`: the device of the directory it was met in, asked
/// only where the kernel does not mark mount roots (before 5.8); `handle`: an `O_PATH` fd of
/// it, whose mount id `/proc` gives where `statx` does not.
fn vet_mount(
    stx: &libc::statx,
    parent_dev: impl FnOnce() -> io::Result<u64>,
    handle: Option<&OwnedFd>,
) -> io::Result<()> {
    let attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    let marks = stx.stx_attributes_mask & attr != 0;
    let mount_root = marks && stx.stx_attributes & attr != 0;
    let dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    if !mount_root && (marks || dev == parent_dev()?) {
        return Ok(());
    }
    let refused = |fstype: String| io::Error::other(MountRefused { fstype });
    // By the mount's id, never its device: btrfs shows a device of its own per subvolume, not
    // the one the table names, and a mount detached from the table (`umount -l`) while held
    // shows a device no mount lists.
    let id = if stx.stx_mask & libc::STATX_MNT_ID != 0 {
        Some(stx.stx_mnt_id)
    } else {
        handle.and_then(|h| crate::mountinfo::fd_mount_id(h.as_raw_fd()))
    };
    let found = crate::mountinfo::find_mount(|m| match id {
        Some(id) => m.id == id,
        None => m.dev == dev,
    })
    .map_err(|e| refused(format!("unknown (the mount table could not be read: {e})")))?;
    match found {
        Some(m) if m.made_by_a_user() => {
            Err(refused(String::from_utf8_lossy(&m.fstype).into_owned()))
        }
        Some(_) => Ok(()),
        // Another device and no mount id to go by (a stat, not an open, on a kernel before
        // 5.8): a btrfs subvolume; the open that follows judges it by its handle.
        None if id.is_none() => Ok(()),
        None => Err(refused("unknown".into())),
    }
}

/// Whether the attributes the kernel holds for files in `dir` are the files' own: a local
/// file system's. Unknown ones are taken as not (asked of their file system, as before).
pub fn attributes_are_local(dir: &DirFd) -> bool {
    const LOCAL: [i64; 9] = [
        0xEF53,      // ext2/3/4
        0x5846_5342, // xfs
        0x9123_683E, // btrfs
        0x0102_1994, // tmpfs
        0x8584_58F6, // ramfs
        0x794C_7630, // overlayfs
        0x2FC1_2FC1, // zfs
        0xF2F5_2010, // f2fs
        0xCA45_1A4E, // bcachefs
    ];
    // The word's type differs by architecture (i64 here, u32 on s390x).
    #[allow(clippy::useless_conversion)]
    let local = |fs: nix::sys::statfs::Statfs| LOCAL.contains(&i64::from(fs.filesystem_type().0));
    nix::sys::statfs::fstatfs(dir).is_ok_and(local)
}

/// The device of an open directory, from the kernel's cached attributes.
fn dev_of(dir: &impl AsFd) -> io::Result<u64> {
    let stx = raw_statx(dir.as_fd().as_raw_fd(), c"", libc::AT_EMPTY_PATH)?;
    Ok(libc::makedev(stx.stx_dev_major, stx.stx_dev_minor))
}

/// The names of a relative path; `..` or a root in it escapes (EXDEV, as openat2 says).
fn plain_parts(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .filter(|c| *c != std::path::Component::CurDir)
        .map(|c| match c {
            std::path::Component::Normal(p) => Ok(p),
            _ => Err(Errno::EXDEV.into()),
        })
        .collect()
}

/// `lstat` of `rel` below the job root `root`, with no symlink followed in any component
/// (a path-based `lstat` would go through a directory swapped for a symlink).
pub fn lstat_beneath(root: &DirFd, rel: &Path) -> io::Result<FileStat> {
    let name = rel
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a plain relative path"))?;
    match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => root.open_dir(parent)?.stat(name),
        None => root.stat(name),
    }
}

/// Opens `path` for reading. Below `root` no symlink is followed in any component;
/// elsewhere (the agent's own files) only the last component is protected.
pub fn open_read(root: Option<&Path>, path: &Path) -> io::Result<File> {
    if let Some((root, rel)) = root.and_then(|r| path.strip_prefix(r).ok().map(|rel| (r, rel))) {
        return DirFd::open_root(root)?.open_file(rel);
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OFlag::O_NOFOLLOW.bits() | OFlag::O_NONBLOCK.bits() | OFlag::O_NOCTTY.bits())
        .open(path)
}

/// Opens `rel` below the job root `root` for reading the way `reader` would reach it: the
/// root must be one `reader` may search, each directory on the way is opened from the one
/// before (never through a symlink) and must be one `reader` may enter, and the file is opened from the last one checked. `None`: a
/// directory on the way shuts `reader` out. (Checking the directories by path and then
/// opening the file by path again let a job rename a directory it may enter aside and one
/// it may not into its place in between: a rename needs write access to the parent only.)
pub fn open_read_as(root: &Path, rel: &Path, reader: &JobReader) -> io::Result<Option<File>> {
    let parts = plain_parts(rel)?;
    let Some((last, dirs)) = parts.split_last() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file below the root",
        ));
    };
    let mut dir = DirFd::open_root(root)?;
    // The root too: a workdir another user owns and shuts (0700) hides what is in it from
    // the job's user, however open the directories and files below it are.
    if !reader.may_search(&dir, &fstat(&dir)?)? {
        return Ok(None);
    }
    for name in dirs {
        dir = dir.open_dir(Path::new(name))?;
        let st = fstat(&dir)?;
        if !reader.may_enter(&dir, &st)? {
            return Ok(None);
        }
    }
    dir.open_file(Path::new(last)).map(Some)
}

/// 16 hex digits from the kernel's random source: temp names a job cannot predict.
pub fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer we own.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // Never expected; O_EXCL keeps a guessed name harmless anyway.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes = (t as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    hex::encode(bytes)
}

/// What [`cached_stat`] tells.
#[derive(Debug, Clone, Copy)]
pub struct CachedStat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub dev: u64,
    pub ino: u64,
    /// Apparent size in bytes.
    pub size: u64,
    /// The root of a mount (a file system mounted there, a job's FUSE one say).
    pub mount_root: bool,
}

impl CachedStat {
    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn is_regular(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// A stat from the attributes the kernel holds (`statx` with `AT_STATX_DONT_SYNC`): no round
/// trip to the file's own file system for them, which a job's FUSE server may never answer.
/// (Reaching the file through a `/proc` magic link may still revalidate it on NFS: callers
/// that must not wait bound the look.) `follow`: through a last-component symlink.
pub fn cached_stat(path: &Path, follow: bool) -> Option<CachedStat> {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let flags = if follow { 0 } else { libc::AT_SYMLINK_NOFOLLOW };
    statx_cached(libc::AT_FDCWD, &c, flags).ok()
}

/// [`cached_stat`] of the entry `name` of the open directory `dir`, never through a symlink
/// and never triggering an automount: what a walk of a hostile tree may look at an entry
/// with before deciding whether to open it (an entry that is a mount point shows the mounted
/// root, `mount_root` set, without a word to its file system).
pub fn cached_stat_at(dir: &impl AsFd, name: &OsStr) -> io::Result<CachedStat> {
    let c = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    statx_cached(
        dir.as_fd().as_raw_fd(),
        &c,
        libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT,
    )
}

fn statx_cached(dirfd: libc::c_int, path: &std::ffi::CStr, flags: i32) -> io::Result<CachedStat> {
    let stx = raw_statx(dirfd, path, flags)?;
    let mount_attr = libc::STATX_ATTR_MOUNT_ROOT as u64;
    Ok(CachedStat {
        mode: u32::from(stx.stx_mode),
        uid: stx.stx_uid,
        gid: stx.stx_gid,
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        size: stx.stx_size,
        mount_root: stx.stx_attributes_mask & mount_attr != 0
            && stx.stx_attributes & mount_attr != 0,
    })
}

/// `statx` from the attributes the kernel holds (`AT_STATX_DONT_SYNC`): no round trip to
/// the file's own file system, which a job's FUSE server may never answer. The birth time
/// too, where the file system keeps one ([`unchanged_since_birth`]).
fn raw_statx(dirfd: libc::c_int, path: &std::ffi::CStr, flags: i32) -> io::Result<libc::statx> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and outlives the call; `dirfd` is AT_FDCWD or an open
    // fd the caller borrows for the call; `stx` is a writable statx the kernel fills.
    let rc = unsafe {
        libc::statx(
            dirfd,
            path.as_ptr(),
            flags | libc::AT_STATX_DONT_SYNC,
            libc::STATX_BASIC_STATS | libc::STATX_MNT_ID | libc::STATX_BTIME,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stx)
}

/// A `statx` as the `stat` the rest of the agent reads.
fn file_stat(stx: &libc::statx) -> FileStat {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: FileStat = unsafe { std::mem::zeroed() };
    st.st_dev = libc::makedev(stx.stx_dev_major, stx.stx_dev_minor);
    st.st_ino = stx.stx_ino;
    st.st_mode = stx.stx_mode.into();
    st.st_nlink = stx.stx_nlink as _;
    st.st_uid = stx.stx_uid;
    st.st_gid = stx.stx_gid;
    st.st_rdev = libc::makedev(stx.stx_rdev_major, stx.stx_rdev_minor);
    st.st_size = stx.stx_size as _;
    st.st_blksize = stx.stx_blksize as _;
    st.st_blocks = stx.stx_blocks as _;
    st.st_atime = stx.stx_atime.tv_sec as _;
    st.st_atime_nsec = stx.stx_atime.tv_nsec as _;
    st.st_mtime = stx.stx_mtime.tv_sec as _;
    st.st_mtime_nsec = stx.stx_mtime.tv_nsec as _;
    st.st_ctime = stx.stx_ctime.tv_sec as _;
    st.st_ctime_nsec = stx.stx_ctime.tv_nsec as _;
    st
}

/// The uid a sidecar reads as when no job user is named (no account has it).
pub const UNKNOWN_OWNER_UID: u32 = u32::MAX - 2;

/// The job's user as the kernel would check it: uid and every group (primary and supplementary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReader {
    pub uid: u32,
    pub gids: Vec<u32>,
}

impl JobReader {
    /// Whom to check a recorded attempt's files against: the identity recorded at launch,
    /// else a fresh lookup, else (the user is gone from the node) a reader that may read
    /// only what anyone may. `None` when the job ran as the agent's own user.
    pub fn for_record(
        record: &c3_proto::RunRecord,
        looked_up: Option<JobReader>,
    ) -> Option<JobReader> {
        match (&record.job_user, looked_up, &record.spec.user) {
            (Some(u), _, _) => Some(JobReader {
                uid: u.uid,
                gids: u.gids.clone(),
            }),
            (None, Some(reader), _) => Some(reader),
            (None, None, Some(_)) => Some(JobReader {
                uid: u32::MAX - 1,
                gids: Vec::new(),
            }),
            (None, None, None) => None,
        }
    }

    /// Whether this reader stands in for an owner no one named (a sidecar's, when the watched
    /// dirs' parent is root's: an emptyDir): what it may not read may well be the job's (a
    /// root trainer's 0600 checkpoint), so it is not left out quietly.
    pub fn is_unknown_owner(&self) -> bool {
        self.uid == UNKNOWN_OWNER_UID
    }

    /// Whether this user may read a file with this owner and mode, by the mode bits alone:
    /// what a scan can tell from a stat. The read itself is decided by [`JobReader::may_read`].
    pub fn can_read(&self, st: &FileStat) -> bool {
        self.allows(st, 0o4)
    }

    /// Whether this user may list and enter a directory, by the mode bits alone.
    pub fn can_enter(&self, st: &FileStat) -> bool {
        self.allows(st, 0o5)
    }

    /// Whether this user may read the open `file` (whose stat is `st`), its access ACL
    /// included: a named entry may deny what "other" grants (`user:bob:---` on a 0644
    /// file someone else put in bob's output dir), or grant what the mode bits refuse. An
    /// ACL this code cannot understand is a refusal; one that cannot be read is an error
    /// (a transient fault is never a silent "not the job's").
    ///
    /// On a file system without POSIX ACLs (NFSv4, CIFS, GPFS) the kernel decides, by an open
    /// made as the user ([`crate::asuser`]): the server's own ACL may deny what the mode bits
    /// grant (`D::bob` on a 0644 file in a shared output dir), and the mode bits let a job
    /// have the root agent store a file its user could not read.
    pub fn may_read(&self, file: &impl AsFd, st: &FileStat) -> io::Result<bool> {
        self.may_open(file, st, false, 0o4)
    }

    /// [`JobReader::may_read`] for listing and entering the open directory `dir`.
    pub fn may_enter(&self, dir: &impl AsFd, st: &FileStat) -> io::Result<bool> {
        self.may_open(dir, st, true, 0o5)
    }

    /// Whether this user may pass through the open directory `dir` (search, not list): what
    /// reaching a file below it by path takes.
    pub fn may_search(&self, dir: &impl AsFd, st: &FileStat) -> io::Result<bool> {
        self.may_open(dir, st, true, 0o1)
    }

    fn may_open(&self, fd: &impl AsFd, st: &FileStat, dir: bool, want: u16) -> io::Result<bool> {
        if self.uid == 0 {
            return Ok(true);
        }
        let look = crate::acl::look(fd);
        if let Ok(crate::acl::Look::Unsupported) = look {
            match crate::asuser::may(fd, dir, self.uid, &self.gids, want) {
                Ok(yes) => return Ok(yes),
                Err(e) => {
                    // The identity could not be taken (no CAP_SETUID): the mode bits, as
                    // before, said once.
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| tracing::warn!(error = %e, "a file system without POSIX ACLs (NFSv4, CIFS): the job's user's access is judged by the mode bits alone, which its own ACLs may contradict"));
                }
            }
        }
        self.may(look.map(crate::acl::Look::into_acl), st, want)
    }

    /// Whether this user may remove what the open directory `dir` holds: it owns it (it may
    /// give itself any mode), or the mode bits or the ACL let it list, enter and write it.
    /// An ACL that cannot be read or understood is a no.
    pub fn may_empty(&self, dir: &impl AsFd, st: &FileStat) -> bool {
        st.st_uid == self.uid || self.may(crate::acl::of(dir), st, 0o7).unwrap_or(false)
    }

    /// Whether this user may add an entry to the open directory `dir` (make one, or rename
    /// one into it): it owns it, or the mode bits or the ACL let it write and enter it. An
    /// ACL that cannot be read or understood is a yes: the caller asks what surely is not
    /// this user's doing.
    pub fn may_add(&self, dir: &impl AsFd, st: &FileStat) -> bool {
        st.st_uid == self.uid
            || match crate::acl::of(dir) {
                Err(_) => true,
                acl => self.may(acl, st, 0o3).unwrap_or(true),
            }
    }

    /// For a scan, which opens no file: whether the entry `name` of `dir` may be the job's
    /// to read. The mode bits' yes, or (where they refuse) any ACL on it: the read gate,
    /// [`JobReader::may_read`], decides on the open file. The ACL is read through a handle
    /// judged first ([`DirFd::entry_handle`]): the job may have mounted a file system of its
    /// own on the name since the walk's stat, whose server would hold the scan for as long as
    /// it liked. An entry that cannot be judged or asked is left to the read gate too.
    pub fn might_read(&self, dir: &DirFd, name: &OsStr, st: &FileStat) -> bool {
        self.can_read(st)
            || !matches!(
                dir.entry_handle(name)
                    .map_err(crate::acl::AclError::Read)
                    .and_then(|h| crate::acl::of_handle(&h)),
                Ok(None)
            )
    }

    fn may(
        &self,
        acl: Result<Option<crate::acl::Acl>, crate::acl::AclError>,
        st: &FileStat,
        want: u16,
    ) -> io::Result<bool> {
        if self.uid == 0 {
            return Ok(true);
        }
        match acl {
            Ok(None) => Ok(self.allows(st, u32::from(want))),
            Ok(Some(acl)) => Ok(acl.allows(self.uid, &self.gids, st, want)),
            Err(crate::acl::AclError::Malformed) => Ok(false),
            Err(crate::acl::AclError::Read(e)) => Err(e),
        }
    }

    fn allows(&self, st: &FileStat, want: u32) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = st.st_mode;
        let bits = if st.st_uid == self.uid {
            mode >> 6
        } else if self.gids.contains(&st.st_gid) {
            mode >> 3
        } else {
            mode
        };
        bits & want == want
    }
}

/// `root/rel`, opened with `open` from the trusted `root` (the operator's: its own path may
/// hold symlinks) with no symlink in any component below it; a symlink there is said as such.
pub(crate) fn below_root<T>(
    root: &Path,
    rel: &Path,
    open: impl FnOnce(&DirFd, &Path) -> io::Result<T>,
) -> io::Result<T> {
    open(&DirFd::open_trusted(root)?, rel).map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR | libc::EXDEV)) {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "`{}`: a component below `{}` is a symlink or not a directory; the agent never goes through a symlink",
                    root.join(rel).display(),
                    root.display()
                ),
            )
        } else {
            e
        }
    })
}

/// `fstat` of an open file, for the checks above.
pub fn fstat(file: &impl AsFd) -> io::Result<FileStat> {
    Ok(nix::sys::stat::fstat(file)?)
}

/// For a job with a user (`owner`), an existing directory `name` must be that user's, root's
/// or the agent's ([`DirFd::ensure_own_dir`]).
fn owners_dir(name: &OsStr, st: &FileStat, owner: Owner) -> io::Result<()> {
    let agent = nix::unistd::geteuid().as_raw();
    match owner {
        Some((uid, _)) if ![uid, 0, agent].contains(&st.st_uid) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "`{}` is user {}'s, not the job's; refusing to write in it",
                Path::new(name).display(),
                st.st_uid
            ),
        )),
        _ => Ok(()),
    }
}

/// Whether users other than the owner (and root) may rename or replace the entries of the
/// directory `st`: writable by all, or by a group of root's directory that is not root's
/// (a scheduler's `root:team 2775`), without the sticky bit. Another member of the team
/// could swap a verified dataset file or a subdirectory for their own, or plant files the
/// agent collects as the job's. A directory of the job's user writable by its group is the
/// user's own choice (a user-private group with umask 002), as the workdir's check takes it.
pub fn others_may_rename_in(st: &FileStat, dir: &impl AsFd, (uid, gid): (u32, u32)) -> bool {
    let mode = st.st_mode;
    if mode & libc::S_ISVTX != 0 {
        return false;
    }
    let by_all = mode & 0o002 != 0;
    // The job's own group (a prolog's `root:<job gid> 2770`) is the job's.
    let by_a_group_of_roots = st.st_uid == 0 && ![0, gid].contains(&st.st_gid) && mode & 0o020 != 0;
    // A named entry (`setfacl -m g:team:rwx` on a `root:root 0755`, shown as 0775 by its
    // mask) lets others in as the mode bits do; one not understood, or unread, is taken so.
    let by_a_named_entry = match crate::acl::of(dir) {
        Ok(None) => false,
        Ok(Some(acl)) => acl.named_others_may(0o3, &[uid, 0], &[0, gid]),
        Err(_) => true,
    };
    by_all || by_a_group_of_roots || by_a_named_entry
}

/// Whether a `FileStat` is a regular file.
pub fn is_regular(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG
}

/// Whether a `FileStat` is a directory.
pub fn is_dir(st: &FileStat) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR
}

/// Bytes of a name, for messages.
pub fn lossy(name: &OsStr) -> String {
    String::from_utf8_lossy(name.as_bytes()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory made a moment ago is taken for the one just made; an old one renamed into
    /// its name is not (the swap a user who may write the parent can make).
    #[test]
    fn an_old_directory_renamed_in_is_not_taken_for_a_new_one() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("old")).unwrap();
        if std::fs::metadata(t.path().join("old"))
            .unwrap()
            .created()
            .is_err()
        {
            eprintln!("skipped: this file system keeps no birth times");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
        std::fs::create_dir(t.path().join("new")).unwrap();
        std::fs::rename(t.path().join("old"), t.path().join("swapped")).unwrap();
        let open = |name: &str| OwnedFd::from(File::open(t.path().join(name)).unwrap());
        assert!(unchanged_since_birth(&open("new")).unwrap());
        assert!(!unchanged_since_birth(&open("swapped")).unwrap());
    }

    /// Both ways of looking at an entry (the kernel's attributes on a local file system, the
    /// file system's own through a handle elsewhere) see what `lstat` sees.
    #[test]
    fn an_entry_is_seen_alike_either_way() {
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::write(t.path().join("f"), "four").unwrap();
        std::os::unix::fs::symlink("f", t.path().join("l")).unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        let dir = DirFd::open(t.path()).unwrap();
        for name in ["f", "l", "d"] {
            let want = std::fs::symlink_metadata(t.path().join(name)).unwrap();
            for st in [
                dir.stat(OsStr::new(name)).unwrap(),
                dir.stat_held(OsStr::new(name)).unwrap(),
            ] {
                assert_eq!(
                    (st.st_ino, st.st_mode, st.st_size as u64, st.st_mtime_nsec),
                    (want.ino(), want.mode(), want.size(), want.mtime_nsec()),
                    "{name}"
                );
            }
        }
        assert_eq!(
            dir.stat_held(OsStr::new("missing")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    /// On a file system without POSIX ACLs (ramfs here; NFSv4, CIFS, GPFS on a cluster) the
    /// read gate asks the kernel, by an open made as the job's user: the mode bits alone let
    /// the job have root store what the server's own ACL denies its user.
    #[test]
    fn without_posix_acls_the_kernel_judges_the_read() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot mount a ramfs");
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _unmount = Unmount(dir.path());
        let f = dir.path().join("f");
        std::fs::write(&f, "x").unwrap();
        std::os::unix::fs::chown(&f, Some(4001), Some(4002)).unwrap();
        std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
        let file = std::fs::File::open(&f).unwrap();
        assert!(matches!(
            crate::acl::look(&file),
            Ok(crate::acl::Look::Unsupported)
        ));
        let st = fstat(&file).unwrap();
        let before = crate::asuser::checks();
        let reader = |uid, gids: &[u32]| JobReader {
            uid,
            gids: gids.to_vec(),
        };
        assert!(reader(4001, &[]).may_read(&file, &st).unwrap());
        assert!(reader(4003, &[4002]).may_read(&file, &st).unwrap());
        assert!(!reader(4003, &[7]).may_read(&file, &st).unwrap());
        assert_eq!(
            crate::asuser::checks() - before,
            3,
            "not asked of the kernel"
        );
    }

    /// A dataset's mount dir that exists already and that others may rename in (a
    /// scheduler's `root:team 2775`, a `0777`) was used: another member of the team could
    /// swap the verified files for their own while the job reads them. Refused; a sticky
    /// one, or the job user's own group-writable one, is used.
    #[test]
    fn a_dataset_dir_others_may_rename_in_is_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let job = (4001, 4001);
        for (name, uid, gid, mode, used) in [
            ("team", 0, 4100, 0o2775, false),
            ("all", 0, 0, 0o777, false),
            ("tmp", 0, 0, 0o1777, true),
            ("mine", 4001, 4001, 0o775, true),
            ("roots", 0, 0, 0o775, true),
            ("jobs-group", 0, 4001, 0o2770, true),
        ] {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::os::unix::fs::chown(&d, Some(uid), Some(gid)).unwrap();
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
            let dir = DirFd::open_root(root.path()).unwrap();
            let got = dir.ensure_dataset_dir(Path::new(name), 0o755, Some(job));
            assert_eq!(got.is_ok(), used, "{name}: {:?}", got.err());
        }
        // `root:root 0755` with `setfacl -m g:team:rwx` (shown as 0775, its mask).
        let d = root.path().join("acl");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        if crate::acl::tests::grant_group_rwx(&std::fs::File::open(&d).unwrap(), 4100) {
            let dir = DirFd::open_root(root.path()).unwrap();
            assert!(dir
                .ensure_dataset_dir(Path::new("acl"), 0o755, Some(job))
                .is_err());
        }
    }

    /// A FIFO (or a device) is judged by its type before any open of it: opened as root for
    /// reading, a FIFO a job placed let its blocked writer go (a device node acted on the
    /// open: a tty, a watchdog). Its handle comes back, which shows what it is and reads
    /// nothing.
    #[test]
    fn open_file_does_not_open_a_fifo() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        nix::unistd::mkfifo(&fifo, Mode::from_bits_truncate(0o600)).unwrap();
        let writer = {
            let fifo = fifo.clone();
            // Blocks until a reader opens the FIFO.
            std::thread::spawn(move || std::fs::OpenOptions::new().write(true).open(fifo))
        };
        let dir = DirFd::open_root(root.path()).unwrap();
        let mut file = dir.open_file(Path::new("fifo")).unwrap();
        assert!(!is_regular(&fstat(&file).unwrap()));
        assert!(std::io::Read::read(&mut file, &mut [0u8; 8]).is_err());
        std::thread::sleep(std::time::Duration::from_millis(300));
        let released = writer.is_finished();
        // Let the writer go.
        use std::os::unix::fs::OpenOptionsExt;
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let _ = writer.join();
        assert!(!released, "the FIFO's writer was let go");
        std::fs::write(root.path().join("f"), "x").unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut dir.open_file(Path::new("f")).unwrap(), &mut text)
            .unwrap();
        assert_eq!(text, "x");
    }

    /// A directory the reader may not enter shuts it out of what lies below, however the
    /// file's own bits read; the same file through a directory it may enter opens.
    #[test]
    fn open_read_as_checks_each_directory_on_the_way() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        for (dir, mode) in [("open", 0o755), ("shut", 0o700)] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
            std::fs::write(root.path().join(dir).join("f"), b"x").unwrap();
            std::fs::set_permissions(root.path().join(dir), std::fs::Permissions::from_mode(mode))
                .unwrap();
        }
        let stranger = JobReader {
            uid: nix::unistd::geteuid().as_raw().wrapping_add(4242),
            gids: vec![],
        };
        assert!(open_read_as(root.path(), Path::new("open/f"), &stranger)
            .unwrap()
            .is_some());
        assert!(open_read_as(root.path(), Path::new("shut/f"), &stranger)
            .unwrap()
            .is_none());
        assert!(open_read_as(root.path(), Path::new("../f"), &stranger).is_err());
    }

    /// The root itself counts: a file in an open directory of a root the reader may not
    /// search (another user's 0700 workdir) is not the reader's to read.
    #[test]
    fn open_read_as_checks_the_root_too() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("artifacts")).unwrap();
        std::fs::write(root.join("artifacts/f"), b"x").unwrap();
        std::fs::set_permissions(
            root.join("artifacts"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(
            root.join("artifacts/f"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let stranger = JobReader {
            uid: nix::unistd::geteuid().as_raw().wrapping_add(4242),
            gids: vec![],
        };
        for (mode, readable) in [(0o711, true), (0o700, false)] {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
            let got = open_read_as(&root, Path::new("artifacts/f"), &stranger).unwrap();
            assert_eq!(got.is_some(), readable, "root mode {mode:o}");
        }
    }

    /// The trusted root's own path may be a symlink, its last component included; below
    /// it none is followed.
    #[test]
    fn a_pinned_root_is_reached_again_without_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jobs");
        std::fs::create_dir_all(root.join("bob/a/w")).unwrap();
        let workdir = root.join("bob/a/w");
        DirFd::open(&workdir)
            .unwrap()
            .pin(&workdir, Some(&root))
            .unwrap();
        assert!(DirFd::open_root(&workdir).is_ok());
        // The job's user swaps `a` for a link to where an open would wait (an automount,
        // a dead server): here, a path that is not there, which an open by path would try.
        std::fs::rename(root.join("bob/a"), root.join("bob/a.old")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("automount/a"), root.join("bob/a")).unwrap();
        let e = DirFd::open_root(&workdir).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("symlink"), "{e}");
    }

    /// A held root is the directory opened, wherever it is renamed to, and what now lies
    /// at its path is not looked at; once let go, its path is pinned as before.
    #[test]
    fn a_held_root_is_the_directory_opened_wherever_it_went() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("jobs");
        std::fs::create_dir_all(root.join("team/b/artifacts")).unwrap();
        let workdir = root.join("team/b");
        let opened = DirFd::open(&workdir).unwrap();
        let held = opened.hold(&workdir, Some(&root)).unwrap();
        // Another member renames it in the team's directory, and makes one of its own there.
        std::fs::rename(&workdir, root.join("team/b.x")).unwrap();
        std::fs::create_dir_all(workdir.join("artifacts")).unwrap();
        let got = DirFd::open_root(&workdir).unwrap();
        assert_eq!(got.pin_id().unwrap(), opened.pin_id().unwrap());
        std::fs::write(root.join("team/b.x/artifacts/f"), b"x").unwrap();
        let reader = JobReader {
            uid: nix::unistd::geteuid().as_raw(),
            gids: vec![],
        };
        assert!(open_read_as(&workdir, Path::new("artifacts/f"), &reader)
            .unwrap()
            .is_some());
        drop(held);
        let e = DirFd::open_root(&workdir).unwrap_err();
        assert!(e.to_string().contains("no longer the directory"), "{e}");
        // A later hold of the same path is not let go by an earlier one's end.
        let again = DirFd::open(&workdir).unwrap();
        let first = again.hold(&workdir, Some(&root)).unwrap();
        let second = again.hold(&workdir, Some(&root)).unwrap();
        drop(first);
        std::fs::rename(&workdir, root.join("team/b.y")).unwrap();
        assert!(DirFd::open_root(&workdir).is_ok());
        drop(second);
        assert!(DirFd::open_root(&workdir).is_err());
    }

    /// A scan's ACL look at a file the mode bits shut the job out of asks nothing of a file
    /// system the job mounted on its name since the walk's stat: the mount is judged from
    /// the kernel's attributes first, and a user's FUSE one refused. Staged with a FUSE
    /// server of the test's own that answers INIT (with POSIX ACLs, so the kernel would ask
    /// it for them) and never answers anything after; needs root and `/dev/fuse`.
    #[test]
    fn might_read_asks_nothing_of_a_file_system_mounted_on_the_name() {
        use std::io::{Read, Write};
        use std::os::unix::fs::OpenOptionsExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{mpsc, Arc};
        use std::time::Duration;
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("needs root (mount)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("f");
        std::fs::write(&target, b"x").unwrap();
        std::fs::set_permissions(&target, std::os::unix::fs::PermissionsExt::from_mode(0o000))
            .unwrap();
        let parent = DirFd::open(dir.path()).unwrap();
        let st = parent.stat(OsStr::new("f")).unwrap();
        let Ok(dev) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/fuse")
        else {
            crate::testskip::skip("no /dev/fuse here");
            return;
        };
        // As `fusermount` mounts for uid 65534: a file system a user made, on a file.
        let opts = std::ffi::CString::new(format!(
            "fd={},rootmode=100000,user_id=65534,group_id=65534,allow_other",
            dev.as_raw_fd()
        ))
        .unwrap();
        let at = std::ffi::CString::new(target.as_os_str().as_bytes()).unwrap();
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                c"c3test".as_ptr(),
                at.as_ptr(),
                c"fuse".as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (asked, heard) = mpsc::channel();
        let (ready, initialized) = mpsc::channel();
        let server = {
            let (mut dev, stop) = (dev.try_clone().unwrap(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 17];
                while !stop.load(Ordering::Relaxed) {
                    let n = match dev.read(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                            continue;
                        }
                        Err(_) => return,
                    };
                    let opcode = u32::from_le_bytes(buf[4..8].try_into().unwrap());
                    let unique = u64::from_le_bytes(buf[8..16].try_into().unwrap());
                    const FUSE_INIT: u32 = 26;
                    const FUSE_POSIX_ACL: u32 = 1 << 20;
                    if opcode != FUSE_INIT || n < 40 {
                        // Never answered: what the job's server would do.
                        let _ = asked.send(opcode);
                        continue;
                    }
                    // fuse_out_header, then fuse_init_out (64 bytes): 7.31, POSIX ACLs.
                    let mut reply = Vec::with_capacity(80);
                    reply.extend_from_slice(&80u32.to_le_bytes());
                    reply.extend_from_slice(&0i32.to_le_bytes());
                    reply.extend_from_slice(&unique.to_le_bytes());
                    for word in [7u32, 31, 0, FUSE_POSIX_ACL] {
                        reply.extend_from_slice(&word.to_le_bytes());
                    }
                    reply.extend_from_slice(&[0u8; 4]); // max_background, congestion_threshold
                    reply.extend_from_slice(&4096u32.to_le_bytes()); // max_write
                    reply.extend_from_slice(&1u32.to_le_bytes()); // time_gran
                    reply.resize(80, 0);
                    dev.write_all(&reply).unwrap();
                    let _ = ready.send(());
                }
            })
        };
        let answered = initialized.recv_timeout(Duration::from_secs(10)).is_ok();
        let (done, looked) = mpsc::channel();
        {
            let parent = parent.try_clone().unwrap();
            std::thread::spawn(move || {
                let job = JobReader {
                    uid: 65534,
                    gids: Vec::new(),
                };
                let _ = done.send(job.might_read(&parent, OsStr::new("f"), &st));
            });
        }
        let got = looked.recv_timeout(Duration::from_secs(5));
        let requests: Vec<u32> = heard.try_iter().collect();
        // Undone before any assertion: the last /dev/fuse fd closed aborts the connection,
        // and a look still waiting on it ends.
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        drop(dev);
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(at.as_ptr(), libc::MNT_DETACH) };
        assert!(answered, "the test's FUSE server got no INIT");
        assert_eq!(
            requests,
            Vec::<u32>::new(),
            "the look asked the job's file system"
        );
        // Refused to judge, it is left to the read gate (which opens nothing through a mount).
        assert_eq!(got, Ok(true), "the look waited on the job's file system");
    }

    #[test]
    fn below_root_goes_through_a_symlinked_root_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("real/w")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("root")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real/w"), dir.path().join("real/l")).unwrap();
        let root = dir.path().join("root");
        assert!(below_root(&root, Path::new("w"), |r, rel| r.open_dir(rel)).is_ok());
        assert!(below_root(&root, Path::new("l"), |r, rel| r.open_dir(rel)).is_err());
    }

    #[test]
    fn symlinked_directories_below_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir_all(root.join("artifacts/real")).unwrap();
        std::fs::write(root.join("artifacts/real/f"), "ok").unwrap();
        let outside = dir.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("f"), "secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("artifacts/swapped")).unwrap();
        std::os::unix::fs::symlink(outside.join("f"), root.join("artifacts/link")).unwrap();

        assert!(open_read(Some(&root), &root.join("artifacts/real/f")).is_ok());
        assert!(
            open_read(Some(&root), &root.join("artifacts/swapped/f")).is_err(),
            "followed a symlinked dir"
        );
        assert!(
            open_read(Some(&root), &root.join("artifacts/link")).is_err(),
            "followed a symlinked file"
        );
        // Outside the root, only the last component is checked.
        assert!(open_read(Some(&root), &outside.join("f")).is_ok());
    }

    #[test]
    fn ensure_dir_never_goes_through_a_symlink_and_creates_nothing_outside() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        let victim = dir.path().join("victim");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&victim).unwrap();
        std::os::unix::fs::symlink(&victim, root.join("results")).unwrap();
        let work = DirFd::open(&root).unwrap();
        assert!(work
            .ensure_dir(Path::new("results/ckpt"), 0o755, None)
            .is_err());
        assert!(std::fs::read_dir(&victim).unwrap().next().is_none());
        let made = work.ensure_dir(Path::new("a/b"), 0o750, None).unwrap();
        let st = nix::sys::stat::fstat(&made).unwrap();
        assert_eq!(st.st_mode & 0o777, 0o750);
        // `.c3` replaced by a symlink is put back as a real directory; the target is untouched.
        std::fs::write(victim.join("result.json"), "{}").unwrap();
        std::os::unix::fs::symlink(&victim, root.join(".c3")).unwrap();
        let c3 = work
            .replace_with_dir(OsStr::new(".c3"), 0o755, None)
            .unwrap();
        c3.remove_file(OsStr::new("result.json")).unwrap();
        assert!(victim.join("result.json").exists());
        assert!(root.join(".c3").symlink_metadata().unwrap().is_dir());
    }

    #[test]
    fn a_new_directory_is_judged_by_its_listing_not_its_link_count() {
        let dir = tempfile::tempdir().unwrap();
        let fd = DirFd::open(dir.path()).unwrap();
        assert!(is_empty_dir(&fd.0).unwrap());
        // A subdirectory raises the link count, a file does not: both make it not new.
        std::fs::write(dir.path().join("f"), "x").unwrap();
        assert!(!is_empty_dir(&fd.0).unwrap());
        // Reading the listing leaves the fd's own offset alone.
        let again = nix::dir::Dir::from_fd(fd.0.try_clone().unwrap())
            .unwrap()
            .iter()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_bytes() == b"f");
        assert!(again);
    }

    #[test]
    fn temp_files_are_new_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirFd::open(dir.path()).unwrap();
        let (a, fa) = d.create_temp(".x-").unwrap();
        let (b, _) = d.create_temp(".x-").unwrap();
        assert_ne!(a, b);
        assert_eq!(fstat(&fa).unwrap().st_mode & 0o777, 0o600);
    }

    /// An unnamed temp file has no name in the directory until it is placed, and then only
    /// its target's, over whatever was there; a named one (the fallback) is renamed.
    #[test]
    fn a_temp_file_is_named_only_once_placed() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let d = DirFd::open(dir.path()).unwrap();
        let names = || {
            let mut n: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            n.sort();
            n
        };
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("f")).unwrap();
        let (named, mut file) = d.create_unnamed_temp(".x-").unwrap();
        if named.is_some() {
            crate::testskip::skip("no O_TMPFILE on this file system");
            return;
        }
        file.write_all(b"abc").unwrap();
        assert_eq!(names(), ["f"]);
        d.place_temp(None, &file, ".x-", OsStr::new("f"), true)
            .unwrap();
        assert_eq!(names(), ["f"]);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"abc");
        let (tmp, file) = d.create_temp(".x-").unwrap();
        d.place_temp(Some(&tmp), &file, ".x-", OsStr::new("g"), true)
            .unwrap();
        assert_eq!(names(), ["f", "g"]);
        // Not replacing: what is there stays, and the temp file leaves no name.
        let (_, mut file) = d.create_unnamed_temp(".x-").unwrap();
        file.write_all(b"new").unwrap();
        let kept = d.place_temp(None, &file, ".x-", OsStr::new("f"), false);
        assert_eq!(kept.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        let (tmp, file) = d.create_temp(".x-").unwrap();
        let kept = d.place_temp(Some(&tmp), &file, ".x-", OsStr::new("g"), false);
        assert_eq!(kept.unwrap_err().raw_os_error(), Some(libc::EEXIST));
        let _ = d.remove_file(OsStr::new(&tmp));
        assert_eq!(names(), ["f", "g"]);
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"abc");
        let (_, file) = d.create_unnamed_temp(".x-").unwrap();
        d.place_temp(None, &file, ".x-", OsStr::new("h"), false)
            .unwrap();
        assert_eq!(names(), ["f", "g", "h"]);
    }

    fn st(uid: u32, gid: u32, mode: u32) -> FileStat {
        // SAFETY: FileStat is plain old data; zeroed is a valid value.
        let mut s: FileStat = unsafe { std::mem::zeroed() };
        s.st_uid = uid;
        s.st_gid = gid;
        s.st_mode = mode;
        s
    }

    #[test]
    fn job_reader_follows_mode_bits() {
        let job = JobReader {
            uid: 1000,
            gids: vec![1000, 44],
        };
        assert!(job.can_read(&st(1000, 1, 0o400)));
        assert!(!job.can_read(&st(0, 0, 0o600)));
        assert!(job.can_read(&st(0, 44, 0o640)));
        assert!(!job.can_read(&st(0, 45, 0o640)));
        assert!(job.can_read(&st(0, 0, 0o644)));
        assert!(!job.can_enter(&st(0, 0, 0o744)));
    }

    /// An ACL that could not be read (an I/O error on a network file system) is an error,
    /// which the upload counts as a failure: never a silent "not the job's to read".
    #[test]
    fn an_acl_that_cannot_be_read_is_an_error_not_a_refusal() {
        let job = JobReader {
            uid: 65534,
            gids: Vec::new(),
        };
        let eio = crate::acl::AclError::Read(io::Error::from_raw_os_error(libc::EIO));
        assert!(job.may(Err(eio), &st(0, 0, 0o644), 0o4).is_err());
        let malformed = crate::acl::AclError::Malformed;
        assert!(!job.may(Err(malformed), &st(0, 0, 0o644), 0o4).unwrap());
        assert!(job.may(Ok(None), &st(0, 0, 0o644), 0o4).unwrap());
    }
}
