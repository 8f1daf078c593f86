//! Bringing the store up to date with the job's output dirs.
//!
//! [`SyncBook`] remembers which version (stamp) of each file is already a blob, so a
//! file synced earlier is not read again; [`sync_scan`] uploads what is new or changed,
//! a bounded number of files at a time, with a progress line every 10 s.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::collect::{FileStamp, LocalFile, Scan};
use crate::inflight::FilesInFlight;
use crate::store::StoreError;
use crate::upload::{UploadError, Uploaded, Uploader};

/// A file that changes while being read is tried again this many times.
const CHANGED_RETRIES: usize = 3;
/// The most files an adaptive limit may put in flight (bytes held stay within the memory
/// budget whatever the count).
const MAX_ADAPTIVE: usize = 256;

/// The newest synced version of every collected file, keyed by manifest path.
#[derive(Debug, Default)]
pub struct SyncBook {
    /// Manifest path -> where its version is in `versions`. Small slots: a map's nodes
    /// filled in path order stay half empty, and it is mostly these that a file costs.
    synced: BTreeMap<Box<str>, u32>,
    /// The bytes of each key in `synced` that is not UTF-8 (`\0` and base64, whose text says
    /// nothing of its place): what is above or below a path is looked up here by bytes, in
    /// the set's order. Written with `synced`, wherever a key goes in or out.
    odd: std::collections::BTreeSet<Vec<u8>>,
    /// The version of each file in `synced`, at its index; the slots of forgotten files are
    /// in `free`, for the next ones.
    versions: Vec<Synced>,
    free: Vec<u32>,
    /// The bytes of every path in `synced`.
    path_bytes: u64,
    /// Moves with every change to `synced`.
    generation: u64,
    /// The `generation` the last in-progress manifest written lists (set by
    /// [`crate::manifest::ManifestWriter::in_progress`]): while it is current, writing one
    /// again would store the same document.
    listed: Option<u64>,
    /// The entries taken from an earlier manifest ([`SyncBook::listed_before`]) came from a
    /// complete one: the job's end is past, and a file of theirs gone since was removed
    /// after it (an operator freeing disk), not by the job. They stay listed.
    listed_complete: bool,
    /// Bytes this job added to the store so far.
    pub new_bytes: u64,
    /// Uploads queued and done, for the progress line.
    pub progress: std::sync::Arc<crate::progress::Progress>,
}

/// One entry of the book as its manifest lists it.
pub struct Listing<'a> {
    path: std::borrow::Cow<'a, str>,
    path_b64: Option<&'a str>,
    up: &'a Synced,
}

/// What the book keeps of one upload (its path is the key; a book of many files keeps no
/// more per file than the manifest and the next look need).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Synced {
    digests: crate::digest::Digests,
    /// The version of the file that was uploaded.
    stamp: FileStamp,
    /// See [`Uploaded::racy`].
    racy: bool,
    /// See [`Uploaded::judged_ns`].
    judged_ns: i64,
}

impl Synced {
    /// Whether `other` makes the same manifest entry (for the same path).
    fn lists_as(&self, other: &Synced) -> bool {
        self.digests == other.digests
            && self.stamp.mode == other.stamp.mode
            && self.stamp.mtime_ns == other.stamp.mtime_ns
    }
}

impl c3_proto::ListedFile for Listing<'_> {
    fn entry(&self) -> c3_proto::EntryRef<'_> {
        c3_proto::EntryRef {
            path: &self.path,
            path_b64: self.path_b64,
            size: self.up.digests.size,
            sha256: &self.up.digests.sha256,
            blake3: &self.up.digests.blake3,
            mode: self.up.stamp.mode,
            mtime_ns: self.up.stamp.mtime_ns,
        }
    }
}

/// Unstored files named (in the log, the run record, `status`); the rest are counted. A job
/// can make a million files that cannot be stored (hard links to one sparse file), each
/// with a 16 KiB path: one error line and one record entry each flooded the journal and grew
/// the run record to gigabytes.
pub const MAX_NAMED_UNSTORED: usize = 100;

/// What one sync pass did.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub uploaded: usize,
    pub skipped: usize,
    /// The first [`MAX_NAMED_UNSTORED`] files not stored, with their errors in full; the rest
    /// are counted in `failures_more`. Kept whole, 800,000 failures each with a store's
    /// 64 KiB error body held 52 GB until the pass ended.
    pub failures: Vec<(String, UploadError)>,
    /// Files not stored past those in `failures`.
    pub failures_more: u64,
    /// Of `failures_more`, those the job made unstorable ([`UploadError::is_for_good`]).
    pub failures_more_for_good: u64,
    /// Files left out on purpose (not readable by the job's user, vanished), for the status'
    /// warnings: the first [`crate::collect::MAX_SCAN_WARNINGS`].
    pub warnings: Vec<String>,
    /// Warnings past those.
    pub more_warnings: usize,
    /// Stopped by a halt ([`sync_scan_until`]) before every file was tried: what landed is
    /// in the book (and listed), the rest was not looked at.
    pub halted: bool,
}

impl SyncReport {
    fn failed(&mut self, rel: String, e: UploadError) {
        if self.failures.len() < MAX_NAMED_UNSTORED {
            self.failures.push((rel, e));
        } else {
            self.failures_more += 1;
            self.failures_more_for_good += u64::from(e.is_for_good());
        }
    }

    fn warn(&mut self, warning: impl FnOnce() -> String) {
        if self.warnings.len() < crate::collect::MAX_SCAN_WARNINGS {
            self.warnings.push(warning());
        } else {
            self.more_warnings += 1;
        }
    }
}

impl SyncBook {
    /// The manifest's entries, sorted by path (a name that is not UTF-8 by its lossy form),
    /// drawn from the book one at a time (see [`c3_proto::Manifest::to_json_with`]).
    /// A path no reader would accept is never listed (the final scan counts it as unstored):
    /// one such entry would make the whole manifest unreadable.
    pub fn listing(&self) -> impl Iterator<Item = Listing<'_>> {
        use c3_proto::manifest::{path_fits, rel_bytes, rel_display};
        let odd_key = |rel: &str| rel.starts_with('\0');
        // The keys of names that are not UTF-8 (a NUL, then base64) come first in the book,
        // but are listed by their lossy path: few, so sorted apart and merged in.
        let mut odd: Vec<Listing<'_>> = self
            .entries()
            .take_while(|(rel, _)| odd_key(rel))
            .filter(|(rel, _)| path_fits(&rel_bytes(rel)))
            .map(|(rel, up)| Listing {
                path: std::borrow::Cow::Owned(rel_display(rel)),
                path_b64: Some(&rel[1..]),
                up,
            })
            .collect();
        odd.sort_by(|a, b| (&a.path, a.path_b64).cmp(&(&b.path, b.path_b64)));
        let mut odd = odd.into_iter().peekable();
        let mut plain = self
            .entries()
            .skip_while(move |(rel, _)| odd_key(rel))
            .filter(|(rel, _)| path_fits(rel.as_bytes()))
            .map(|(rel, up)| Listing {
                path: std::borrow::Cow::Borrowed(rel),
                path_b64: None,
                up,
            })
            .peekable();
        // On an equal path, the entry without `path_b64` first.
        std::iter::from_fn(move || match (odd.peek(), plain.peek()) {
            (Some(o), Some(p)) if o.path < p.path => odd.next(),
            (_, Some(_)) => plain.next(),
            _ => odd.next(),
        })
    }

    /// Each path and its version, in path order.
    fn entries(&self) -> impl Iterator<Item = (&str, &Synced)> {
        self.synced
            .iter()
            .map(|(rel, &at)| (&**rel, &self.versions[at as usize]))
    }

    fn get(&self, rel: &str) -> Option<&Synced> {
        self.synced.get(rel).map(|&at| &self.versions[at as usize])
    }

    /// Saturating: sizes a lying store's manifest gave (kept by `recover` through
    /// `listed_before`) may add past u64, which overflowed here (a panic, or in release a
    /// wrapped total registered with the quota).
    pub fn total_bytes(&self) -> u64 {
        self.entries()
            .map(|(_, u)| u.digests.size)
            .fold(0, u64::saturating_add)
    }

    pub fn len(&self) -> usize {
        self.synced.len()
    }

    pub fn is_empty(&self) -> bool {
        self.synced.is_empty()
    }

    /// Takes in the files an earlier look at the attempt stored (its last manifest, in
    /// progress or complete), for a collector that starts after the agent that knew them
    /// died (`recover`): from an empty book, a final scan that could not look (a workdir
    /// refused or gone) sealed a manifest listing nothing over the one that listed them, and
    /// `gc` then took their blobs. They stay listed wherever the scan cannot look; wherever it
    /// can, each is read again or forgotten (no stamp of theirs is ever current). Entries
    /// whose digests are not hex are left out. How many were taken.
    pub fn listed_before(
        &mut self,
        files: &[c3_proto::manifest::FileEntry],
        complete: bool,
    ) -> usize {
        self.listed_complete = complete;
        let mut taken = 0;
        for f in files {
            let (mut sha256, mut blake3) = ([0u8; 32], [0u8; 32]);
            let (Ok(raw), Ok(()), Ok(())) = (
                f.raw_path(),
                hex::decode_to_slice(&f.sha256, &mut sha256),
                hex::decode_to_slice(&f.blake3, &mut blake3),
            ) else {
                continue;
            };
            self.record(Uploaded {
                rel: c3_proto::manifest::rel_key(&raw),
                digests: crate::digest::Digests {
                    sha256,
                    blake3,
                    size: f.size,
                },
                stamp: FileStamp {
                    size: f.size,
                    mtime_ns: f.mtime_ns,
                    ctime_ns: 0,
                    ino: 0,
                    dev: 0,
                    mode: f.mode,
                },
                new_bytes: 0,
                racy: true,
                judged_ns: 0,
            });
            taken += 1;
        }
        taken
    }

    /// Whether this exact version (`stamp`) of the file `rel` is already a blob (a stamp
    /// taken racily, too soon after a change to tell the next one, says nothing: read again).
    pub fn is_current(&self, rel: &str, stamp: &FileStamp) -> bool {
        self.current_digests(rel, stamp).is_some()
    }

    /// The digests of this exact version of `rel`, when [`SyncBook::is_current`].
    pub fn current_digests(&self, rel: &str, stamp: &FileStamp) -> Option<crate::digest::Digests> {
        self.get(rel)
            .filter(|u| u.stamp == *stamp && !u.racy)
            .map(|u| u.digests)
    }

    /// Whether the book holds a later version of `rel` than `stamp` (changed after it): a
    /// `publish` recorded it while an upload of the version `stamp` was under way. Live sync
    /// then does not record that upload over it; the final scan, which records what the file
    /// holds at the end, is not asked (a clock stepped back would make this a wrong guess).
    pub fn holds_later(&self, rel: &str, stamp: &FileStamp) -> bool {
        self.get(rel)
            .is_some_and(|u| u.stamp != *stamp && u.stamp.ctime_ns > stamp.ctime_ns)
    }

    /// The most its manifest's entries take (see [`c3_proto::manifest::entry_ceiling`]).
    pub fn entries_ceiling(&self) -> u64 {
        self.path_bytes + self.synced.len() as u64 * c3_proto::manifest::ENTRY_FIXED_BYTES
    }

    /// Whether `rel` is listed, in any version.
    pub fn contains(&self, rel: &str) -> bool {
        self.synced.contains_key(rel)
    }

    /// The paths of the entries still as an earlier complete manifest listed them (none
    /// read again since): what the final scan does not drop for not finding it.
    fn listed_at_the_end(&self) -> std::collections::HashSet<Box<str>> {
        if !self.listed_complete {
            return Default::default();
        }
        self.synced
            .iter()
            .filter(|(_, &at)| self.versions[at as usize].stamp.from_a_manifest())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Drops the entries whose path matches; returns how many.
    pub fn forget(&mut self, mut gone: impl FnMut(&str) -> bool) -> usize {
        let before = self.synced.len();
        let (free, path_bytes, odd) = (&mut self.free, &mut self.path_bytes, &mut self.odd);
        self.synced.retain(|k, &mut at| {
            let keep = !gone(k);
            if !keep {
                free.push(at);
                *path_bytes -= c3_proto::manifest::entry_path_bytes(k);
                if k.starts_with('\0') {
                    odd.remove(&c3_proto::manifest::rel_bytes(k));
                }
            }
            keep
        });
        let dropped = before - self.synced.len();
        if dropped > 0 {
            self.generation += 1;
        }
        dropped
    }

    /// Drops `rel` and everything below it (`rel/...`), found by the map's order, not by a
    /// pass over every entry: a job deleting 100,000 files sends as many hints. Returns
    /// whether `rel` itself was listed (a file: nothing can be below it) and how many went.
    pub fn forget_under(&mut self, rel: &str) -> (bool, usize) {
        let exact = self.synced.contains_key(rel);
        let mut gone = self.keys_below(rel);
        if exact {
            gone.push(rel.into());
        }
        self.drop_keys(&gone);
        if !gone.is_empty() {
            self.generation += 1;
        }
        (exact, gone.len())
    }

    /// The keys listed below `rel` (`rel/...`), by the maps' order. A name that is not UTF-8
    /// below a UTF-8 one has a key of its own kind, found in `odd`; nothing below a name
    /// that is not UTF-8 is UTF-8.
    fn keys_below(&self, rel: &str) -> Vec<Box<str>> {
        let mut below: Vec<Box<str>> = Vec::new();
        if !rel.starts_with('\0') {
            let prefix = format!("{rel}/");
            below.extend(
                self.synced
                    .range::<str, _>((
                        std::ops::Bound::Included(prefix.as_str()),
                        std::ops::Bound::Unbounded,
                    ))
                    .map(|(k, _)| k)
                    .take_while(|k| k.starts_with(&prefix))
                    .cloned(),
            );
        }
        if !self.odd.is_empty() {
            let mut prefix = c3_proto::manifest::rel_bytes(rel);
            prefix.push(b'/');
            below.extend(
                self.odd
                    .range::<[u8], _>((
                        std::ops::Bound::Included(prefix.as_slice()),
                        std::ops::Bound::Unbounded,
                    ))
                    .take_while(|raw| raw.starts_with(&prefix))
                    .map(|raw| c3_proto::manifest::rel_key(raw).into_boxed_str()),
            );
        }
        below
    }

    /// Takes `keys` out of the book.
    fn drop_keys(&mut self, keys: &[Box<str>]) {
        for key in keys {
            if let Some(at) = self.synced.remove(key) {
                self.free.push(at);
                self.path_bytes -= c3_proto::manifest::entry_path_bytes(key);
                if key.starts_with('\0') {
                    self.odd.remove(&c3_proto::manifest::rel_bytes(key));
                }
            }
        }
    }

    /// Drops `rel` unless the book holds it in the version `stamp`: a newer version than the
    /// book's could not be uploaded, and the book's is not what the file holds. With
    /// `listed_stays` (the store's fault, not the file's), a version taken from a manifest
    /// that the file looks like ([`FileStamp::stands_for`]) stays. Returns whether it went.
    pub fn forget_unless_at(&mut self, rel: &str, stamp: &FileStamp, listed_stays: bool) -> bool {
        if self
            .get(rel)
            .is_none_or(|u| u.stamp == *stamp || listed_stays && u.stamp.stands_for(stamp))
        {
            return false;
        }
        self.drop_keys(&[rel.into()]);
        self.generation += 1;
        true
    }

    pub fn record(&mut self, up: Uploaded) {
        self.record_as(up, true)
    }

    /// [`SyncBook::record`] of a version read while the job held the file open for writing
    /// or mapped it writable: it stays racy however often the same bytes are read. Stores
    /// through a mapping to pages already dirty move no stamp, so two equal reads of a held
    /// file settle nothing; settled, the final scan took a second publish's version as
    /// current, and the complete manifest listed bytes the file no longer held.
    pub fn record_held(&mut self, up: Uploaded) {
        self.record_as(up, false)
    }

    fn record_as(&mut self, up: Uploaded, may_settle: bool) {
        self.new_bytes += up.new_bytes;
        let mut new = Synced {
            digests: up.digests,
            stamp: up.stamp,
            racy: up.racy,
            judged_ns: up.judged_ns,
        };
        let old = match self.synced.get(up.rel.as_str()) {
            Some(&at) => Some(&mut self.versions[at as usize]),
            None => None,
        };
        // The same entry read again (a racy stamp confirmed) is no change to list. Two reads
        // at least a tick apart that found the same stamp and bytes settle it (a file whose
        // mtime is in the future, set by `tar` or a skewed NFS server, stays racy otherwise).
        let same = old.as_ref().is_some_and(|old| old.lists_as(&new));
        match old {
            Some(old) => {
                if same
                    && may_settle
                    && new.stamp == old.stamp
                    && new.judged_ns - old.judged_ns >= crate::upload::settle_apart_ns(&new.stamp)
                {
                    new.racy = false;
                }
                *old = new;
            }
            None => {
                self.forget_other_shapes(&up.rel);
                let at = match self.free.pop() {
                    Some(at) => {
                        self.versions[at as usize] = new;
                        at
                    }
                    None => {
                        self.versions.push(new);
                        u32::try_from(self.versions.len() - 1)
                            .expect("fewer files than a manifest can list")
                    }
                };
                self.path_bytes += c3_proto::manifest::entry_path_bytes(&up.rel);
                if up.rel.starts_with('\0') {
                    self.odd.insert(c3_proto::manifest::rel_bytes(&up.rel));
                }
                self.synced.insert(up.rel.into_boxed_str(), at);
            }
        }
        if !same {
            self.generation += 1;
        }
    }

    /// `rel` was just read as a file: a listed file above it (`a` for `a/x`) or anything
    /// listed below it (`a/x` for `a`) is gone from disk, whatever hints were lost or came
    /// too late (a file removed and made a directory, `RENAME_EXCHANGE` of a file and a
    /// directory, a `Gone` hint handled after the path was back). Listed together, one
    /// manifest would hold a file and entries below it, which every reader refuses (and a
    /// manifest `gc` cannot read stops every `gc`). Compared by their bytes: a name that is
    /// not UTF-8 (live sync records those too) is in the same place as any other.
    fn forget_other_shapes(&mut self, rel: &str) {
        let raw = c3_proto::manifest::rel_bytes(rel);
        let mut gone: Vec<Box<str>> = raw
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .map(|(i, _)| c3_proto::manifest::rel_key(&raw[..i]))
            .filter(|above| self.synced.contains_key(above.as_str()))
            .map(String::into_boxed_str)
            .collect();
        gone.extend(self.keys_below(rel));
        self.drop_keys(&gone);
    }

    /// A count that moves with every change of the book.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the last in-progress manifest written lists the book as it is now.
    pub fn listed(&self) -> bool {
        self.listed == Some(self.generation)
    }

    /// An in-progress manifest of the book as it is now is stored.
    pub fn mark_listed(&mut self) {
        self.listed = Some(self.generation);
    }
}

/// What becomes of the version the book holds of a file whose newer version could not be
/// stored ([`upload_all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OlderVersion {
    /// Listed still (a request while the job runs: the in-progress manifest lists the last
    /// version stored, as live sync's does until the next lands; a crash keeps a checkpoint).
    /// Each file is then read only in the version found, the one its look at the job's
    /// writers saw ([`Uploader::upload_as_seen`]): another may be one a job maps and stores to
    /// after that look, then again after the read, with its stamp unmoved.
    Kept,
    /// Taken out (the final look: the complete manifest is what the job left, and the
    /// book's version is not it).
    Dropped,
}

/// Where a long [`upload_all`] lists what it stored so far (an in-progress manifest): a blob
/// no manifest names is `c3-agent gc`'s once it is an hour old, and the final sync of a large
/// output takes longer than that.
pub trait Checkpoint: Sync {
    /// At most this often.
    fn every(&self) -> Duration;
    /// Lists the book as it is now.
    fn save<'a>(
        &'a self,
        book: &'a mut SyncBook,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>>;
}

/// Uploads every file of `scan` (below `workdir`) not already current in `book`; forgets
/// files no longer on disk. The scan is used up as its files are queued.
pub async fn sync_scan(
    uploader: &Uploader,
    workdir: &std::path::Path,
    scan: Scan,
    book: &mut SyncBook,
    checkpoint: Option<&dyn Checkpoint>,
) -> SyncReport {
    sync_scan_until(uploader, workdir, scan, book, checkpoint, None, None).await
}

/// The book's entries a walk cut short did not reach, each looked at by its path: gone (or
/// no longer a file) it is forgotten, found it joins the scan (stored again if it changed).
/// Kept as they were, a job that made four million empty directories after live sync listed
/// its checkpoints had its final manifest list the ones it deleted since, and the old bytes
/// of one it rewrote. Any other failure (a denial, an I/O error) leaves the entry as it is,
/// and so does one an earlier complete manifest listed (`kept`). The looks (a manifest's
/// worth) run off the reactor, given up on a halt (the entries then left as they are), as
/// the walk is.
async fn look_again_at_unreached(
    workdir: &std::path::Path,
    scan: &mut Scan,
    book: &mut SyncBook,
    kept: &std::collections::HashSet<Box<str>>,
    halt: Option<&CancellationToken>,
) {
    let unreached: Vec<String> = book
        .synced
        .keys()
        .filter(|k| !scan.files.contains_key(&***k) && !kept.contains(*k))
        .map(|k| k.to_string())
        .collect();
    let workdir = workdir.to_path_buf();
    let looking = tokio::task::spawn_blocking(move || {
        let Ok(root) = crate::confine::DirFd::open_root(&workdir) else {
            return Vec::new();
        };
        unreached
            .into_iter()
            .filter_map(|rel| {
                match crate::confine::lstat_beneath(&root, &crate::collect::path_of(&rel)) {
                    Ok(st) if crate::confine::is_regular(&st) => {
                        Some((rel, Some(FileStamp::of_stat(&st))))
                    }
                    Ok(_) => Some((rel, None)),
                    Err(e)
                        if e.kind() == std::io::ErrorKind::NotFound
                            || matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) =>
                    {
                        Some((rel, None))
                    }
                    Err(_) => None,
                }
            })
            .collect::<Vec<_>>()
    });
    let looked = tokio::select! {
        looked = looking => looked.unwrap_or_default(),
        () = crate::halted(halt) => return,
    };
    let mut gone = std::collections::HashSet::new();
    for (rel, found) in looked {
        match found {
            Some(stamp) => {
                scan.files.insert(rel, stamp);
            }
            None => {
                gone.insert(rel);
            }
        }
    }
    if !gone.is_empty() {
        book.forget(|rel| gone.contains(rel));
    }
}

/// [`sync_scan`] that stops when `halt` is cancelled (`recover` told to stop: a signal, its
/// time budget): the uploads under way are dropped (a multipart one keeps its journal, for
/// the next pass to resume), and what landed is listed through `checkpoint` before it
/// returns, so that the next pass does not store it again and `gc` does not take it.
/// `room`: what the manifest may list (`max_bytes`): a file the book does not hold yet
/// past it is not stored, and counted unstored for good.
pub async fn sync_scan_until(
    uploader: &Uploader,
    workdir: &std::path::Path,
    mut scan: Scan,
    book: &mut SyncBook,
    checkpoint: Option<&dyn Checkpoint>,
    halt: Option<&CancellationToken>,
    room: Option<u64>,
) -> SyncReport {
    let kept = book.listed_at_the_end();
    if scan.cut_short {
        look_again_at_unreached(workdir, &mut scan, book, &kept, halt).await;
    }
    book.forget(|rel| !scan.files.contains_key(rel) && scan.covers(rel) && !kept.contains(rel));
    drop(kept);
    let files = std::mem::take(&mut scan.files);
    let found = files.len();
    // On tmpfs a file mapped, stored to and unmapped after its last read keeps its stamp:
    // each that looks as the book has it is read again and hashed (at memory speed, nothing
    // sent), and stored again only if its bytes changed, the book's version taken out first.
    // Taken as current, the complete manifest listed bytes the file no longer held. A table
    // that cannot be read takes every device for one.
    let untimed = crate::mountinfo::untimed_mapped_stores().ok();
    let (mut todo, to_verify): (Vec<_>, Vec<_>) = files
        .into_iter()
        .filter(|(rel, stamp)| {
            !book.is_current(rel, stamp) || untimed.as_ref().is_none_or(|u| u.contains(&stamp.dev))
        })
        .partition(|(rel, stamp)| !book.is_current(rel, stamp));
    // First: they take back the room in the manifest their entries left.
    let changed = verify_untimed(uploader, workdir, to_verify, book, halt).await;
    todo.splice(0..0, changed);
    let skipped = found - todo.len();
    // A scan that stopped at a manifest's worth of files (its dirs then unread for good)
    // found other files than live sync had listed: stored beside the book's, they made a
    // manifest too large to write, never for good, and each `recover` walked and sent it
    // all again, for ever.
    let mut no_room = Vec::new();
    if let Some(room) = room {
        let mut tracked = book.entries_ceiling();
        todo.retain(|(rel, _)| {
            if book.contains(rel) {
                return true;
            }
            let entry = c3_proto::manifest::entry_ceiling(rel);
            if tracked + entry > room {
                no_room.push(rel.clone());
                return false;
            }
            tracked += entry;
            true
        });
    }
    let mut report = upload_all_until(
        uploader,
        workdir,
        todo,
        book,
        OlderVersion::Dropped,
        checkpoint,
        halt,
    )
    .await;
    report.skipped = skipped;
    for rel in no_room {
        let path = workdir.join(crate::collect::path_of(&rel));
        report.failed(rel, UploadError::NoRoom { path });
    }
    report
}

/// Uploads `todo` (paths below `workdir` and the stamps they were found with) into the book, a
/// bounded number at a time (progress in `book.progress`).
///
/// Each file is its own task, so that the per-file work (opening, the request, its signature,
/// the response) spreads over the runtime's threads instead of queueing behind one; how many
/// run at once adapts unless the config fixed it ([`crate::inflight`]). With a `checkpoint`,
/// what is stored is listed as it goes.
pub async fn upload_all(
    uploader: &Uploader,
    workdir: &std::path::Path,
    todo: Vec<(String, FileStamp)>,
    book: &mut SyncBook,
    older: OlderVersion,
    checkpoint: Option<&dyn Checkpoint>,
) -> SyncReport {
    upload_all_until(uploader, workdir, todo, book, older, checkpoint, None).await
}

/// The files of `to_verify` (each current in `book`, on a file system where a store through
/// a mapping moves no time) whose bytes are no longer the book's version, or could not be
/// read: their book entries are taken out (a failed upload then leaves them unlisted, not
/// listed with bytes nobody checked), and they are returned to be stored. The links of one
/// inode (one stamp) are read once: a job's 10,000 links to a 1 GiB file were 10 TB of
/// reads. What `halt` leaves unread stays as the book has it.
async fn verify_untimed(
    uploader: &Uploader,
    workdir: &std::path::Path,
    to_verify: Vec<(String, FileStamp)>,
    book: &mut SyncBook,
    halt: Option<&CancellationToken>,
) -> Vec<(String, FileStamp)> {
    use futures::StreamExt;
    let mut inodes: HashMap<(u64, u64), Vec<(String, FileStamp)>> = HashMap::new();
    for (rel, stamp) in to_verify {
        inodes
            .entry((stamp.dev, stamp.ino))
            .or_default()
            .push((rel, stamp));
    }
    let in_flight = uploader.options().files_in_flight.max(1);
    let looked: Vec<_> = futures::stream::iter(inodes.into_values())
        .map(|links| async move {
            let (rel, stamp) = &links[0];
            let file = LocalFile {
                abs: workdir.join(crate::collect::path_of(rel)),
                rel: rel.clone(),
                stamp: *stamp,
            };
            let digests = uploader.digests_of(&file).await.ok();
            (links, digests)
        })
        .buffer_unordered(in_flight)
        .take_until(crate::halted(halt))
        .collect()
        .await;
    let (mut changed, mut stale) = (Vec::new(), std::collections::HashSet::new());
    for (links, digests) in looked {
        for (rel, stamp) in links {
            match digests {
                Some(d) if book.current_digests(&rel, &stamp) == Some(d) => {}
                _ => {
                    tracing::debug!(path = %rel, "changed through a mapping with its stamp unmoved (tmpfs), or unreadable; stored again");
                    stale.insert(rel.clone());
                    changed.push((rel, stamp));
                }
            }
        }
    }
    // One pass over the book for all of them: `forget` walks it whole.
    if !stale.is_empty() {
        book.forget(|r| stale.contains(r));
    }
    changed
}

/// [`upload_all`] that stops when `halt` is cancelled (see [`sync_scan_until`]).
async fn upload_all_until(
    uploader: &Uploader,
    workdir: &std::path::Path,
    todo: Vec<(String, FileStamp)>,
    book: &mut SyncBook,
    older: OlderVersion,
    mut checkpoint: Option<&dyn Checkpoint>,
    halt: Option<&CancellationToken>,
) -> SyncReport {
    let mut report = SyncReport::default();
    let as_seen = older == OlderVersion::Kept;
    let mut saved = tokio::time::Instant::now();
    for (_, stamp) in &todo {
        book.progress.queue(stamp.size);
    }
    let opts = uploader.options();
    let mut limit = if opts.auto_in_flight {
        let start = opts.files_in_flight.max(1);
        FilesInFlight::adaptive(
            start,
            (start / 4).max(2),
            (start * 8).min(MAX_ADAPTIVE).max(start),
        )
    } else {
        FilesInFlight::fixed(opts.files_in_flight.max(1))
    };
    let mut todo = todo.into_iter();
    let mut uploads = tokio::task::JoinSet::new();
    // Which file each task uploads: a task that panicked returns nothing else to tell.
    let mut sending: HashMap<tokio::task::Id, (String, FileStamp)> = HashMap::new();
    loop {
        // None started once halted: an upload aborted a moment after its start may leave a
        // multipart upload nothing names.
        let open = halt.is_none_or(|h| !h.is_cancelled());
        while open && uploads.len() < limit.limit() {
            let Some((rel, stamp)) = todo.next() else {
                break;
            };
            // The absolute path only while its upload runs.
            let file = LocalFile::below(workdir, rel.clone(), stamp);
            let uploader = uploader.clone();
            let task = uploads.spawn(
                async move {
                    if crate::fault::armed_at("upload-panics", &file.rel) {
                        panic!("injected fault at upload-panics for {}", file.rel);
                    }
                    let (rel, result) = upload_settled(&uploader, &file, as_seen).await;
                    (rel, file.stamp, result)
                }
                .in_current_span(),
            );
            sending.insert(task.id(), (rel, stamp));
        }
        // Due by the clock too: one large file may take hours to land, and what landed
        // before it must be listed within the hour all the same.
        let due = checkpoint
            .filter(|_| !book.listed())
            .map(|cp| saved + cp.every());
        let joined = tokio::select! {
            biased;
            () = crate::halted(halt) => {
                // Dropped, not waited for: a multi-GB file may be minutes from landing.
                uploads.abort_all();
                report.halted = true;
                // The same listing a checkpoint by the clock writes, only sooner: what landed
                // since the last one is not read and stored again by the next pass.
                if !book.listed() {
                    save_checkpoint(&mut checkpoint, book).await;
                }
                break;
            }
            joined = uploads.join_next_with_id() => joined,
            () = until(due) => {
                saved = tokio::time::Instant::now();
                save_checkpoint(&mut checkpoint, book).await;
                continue;
            }
        };
        let Some(joined) = joined else {
            break;
        };
        let (rel, stamp, result) = match joined {
            Ok((task, done)) => {
                sending.remove(&task);
                done
            }
            // A panic in one upload is a bug; it must not take the other files with it. The
            // file is not stored, as after any other failure (its older version included).
            Err(e) => {
                let Some((rel, stamp)) = sending.remove(&e.id()) else {
                    tracing::error!(error = %e, "an upload task failed");
                    continue;
                };
                tracing::error!(path = %rel, error = %e, "an upload task failed");
                let path = workdir.join(crate::collect::path_of(&rel));
                (rel, stamp, Err(UploadError::Task { path, source: e }))
            }
        };
        limit.done(stamp.size, std::time::Instant::now());
        book.progress.finish(stamp.size);
        // Not stored: a version the book holds from before (live sync's, a `publish`'s) is
        // not what the scan found, and must not be listed as if it were. Kept, a job that
        // rewrote `m.bin` and made it unreadable (or that someone removed after the scan)
        // left a complete manifest listing the version before. The version the scan found,
        // held racily, stays: nothing says it is not the file's.
        if let (Err(e), OlderVersion::Dropped) = (&result, older) {
            // A version taken from a manifest that the store's fault kept from being stored
            // again stays, if the file looks as listed; the file's own fault (sparse, a read
            // error, a change) says it is not that version any more.
            // Permanent or not (a 403 from an expired token, a read-only file store): a
            // store's error says nothing of the file's bytes. After a complete manifest (the
            // job's end past) nor does one of this look's own (a lower `max_file_bytes` than
            // the run's, a mode or a disk read that fails now): a file that looks as listed
            // keeps the version stored for it, whose blob gc took once a manifest listed less.
            let store_fault = matches!(e, UploadError::Store { .. });
            let not_the_file = store_fault
                || book.listed_complete
                    && !matches!(
                        e,
                        UploadError::Changed { .. } | UploadError::Vanished { .. }
                    );
            book.forget_unless_at(&rel, &stamp, not_the_file);
        }
        match result {
            Ok(up) => {
                report.uploaded += 1;
                book.record(up);
            }
            // Deleted (by the job, or whoever may write there) before it could be read:
            // nothing to collect, and no failure; said, since the scan had seen it.
            Err(UploadError::Vanished { .. }) => {
                let shown = c3_proto::manifest::rel_display(&rel);
                tracing::debug!(path = %shown, "file vanished before upload");
                report.warn(|| {
                    format!("{shown} vanished before it could be read; not in the manifest")
                });
            }
            Err(e @ UploadError::NotReadable { .. }) => {
                tracing::debug!(path = %rel, "{e}");
                report.warn(|| format!("{rel} is not readable by the job's user; not uploaded"));
            }
            Err(e) => report.failed(rel, e),
        }
        if checkpoint.is_some_and(|cp| saved.elapsed() >= cp.every()) {
            saved = tokio::time::Instant::now();
            save_checkpoint(&mut checkpoint, book).await;
        }
    }
    report
}

/// Sleeps until `due`, for ever without one.
async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Lists the book through `checkpoint`; a book too large to list is not tried again.
async fn save_checkpoint(checkpoint: &mut Option<&dyn Checkpoint>, book: &mut SyncBook) {
    let Some(cp) = *checkpoint else {
        return;
    };
    match cp.save(book).await {
        Ok(()) => tracing::debug!(files = book.len(), "in-progress manifest written"),
        // More files only make it larger.
        Err(e @ StoreError::TooLarge { .. }) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot write the in-progress manifest; not tried again in this sync");
            *checkpoint = None;
        }
        Err(e) => {
            tracing::warn!(error = %crate::error_chain(&e), "cannot write the in-progress manifest; will retry")
        }
    }
}

/// Uploads one file, trying again while it keeps changing under us.
async fn upload_settled(
    uploader: &Uploader,
    file: &LocalFile,
    as_seen: bool,
) -> (String, Result<Uploaded, UploadError>) {
    // A store that takes a second a file: a window for a test to stop a long sync in.
    crate::fault::pause_for("slow-upload", Duration::from_secs(1)).await;
    if as_seen {
        return (file.rel.clone(), uploader.upload_as_seen(file).await);
    }
    let (mut attempt, mut blips) = (0, 0);
    loop {
        match uploader.upload(file).await {
            Err(UploadError::Changed { .. }) if attempt < CHANGED_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt as u64)).await;
            }
            // One EIO from a network file system's blip failed the file at the final sync
            // (no later look comes): UPLOAD_ERROR for a job whose output was all there. The
            // parts sent stay journaled, so the next try sends only the rest.
            Err(UploadError::Read { source, .. })
                if blips < READ_BLIP_RETRIES && read_blip(&source) =>
            {
                blips += 1;
                tracing::info!(path = %file.rel, error = %source, "reading the file failed; trying it again");
                tokio::time::sleep(Duration::from_secs(1 << (blips - 1))).await;
            }
            result => return (file.rel.clone(), result),
        }
    }
}

/// Tries of a file whose read failed as a network file system fails for a moment.
const READ_BLIP_RETRIES: u32 = 3;

/// A read error that a moment may cure: a network file system's I/O error, time-out or
/// stale handle (NFS soft mounts, Lustre, a FUSE server restarting), not a refusal.
fn read_blip(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EIO
                | libc::ETIMEDOUT
                | libc::EAGAIN
                | libc::EINTR
                | libc::ESTALE
                | libc::ENOTCONN
                | libc::ECONNRESET
                | libc::ECONNABORTED
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETDOWN
                | libc::ENETUNREACH
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::FileStamp;
    use crate::digest::Digests;

    fn up(rel: &str, n: u8) -> Uploaded {
        Uploaded {
            rel: rel.into(),
            digests: Digests {
                sha256: [n; 32],
                blake3: [!n; 32],
                size: u64::from(n),
            },
            stamp: FileStamp {
                size: u64::from(n),
                mtime_ns: i64::from(n),
                ctime_ns: 0,
                ino: 0,
                dev: 0,
                mode: 0o644,
            },
            new_bytes: 0,
            racy: false,
            judged_ns: 0,
        }
    }

    /// A version published while an older one was being sent is later than that one: live
    /// sync keeps the published one (the job was told it is in the manifest). The same
    /// version, or an earlier one in the book, is not.
    #[test]
    fn a_version_published_meanwhile_is_later_than_the_one_sent() {
        let mut book = SyncBook::default();
        let mut published = up("artifacts/ckpt", 2);
        published.stamp.ctime_ns = 200;
        book.record(published.clone());
        let mut sent = up("artifacts/ckpt", 1);
        sent.stamp.ctime_ns = 100;
        assert!(book.holds_later("artifacts/ckpt", &sent.stamp));
        assert!(!book.holds_later("artifacts/ckpt", &published.stamp));
        assert!(!book.holds_later("artifacts/other", &sent.stamp));
        let mut newer = up("artifacts/ckpt", 3);
        newer.stamp.ctime_ns = 300;
        assert!(!book.holds_later("artifacts/ckpt", &newer.stamp));
    }

    /// A workdir with an empty `artifacts/`, and an uploader to an in-memory store.
    fn artifacts_in_memory() -> (tempfile::TempDir, std::path::PathBuf, Uploader) {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        let uploader = Uploader::new(
            crate::store::BlobStore::in_memory(),
            crate::upload::UploadOptions::default(),
            "j",
            None,
        )
        .confined_to(dir.path());
        (dir, arts, uploader)
    }

    /// The final scan finds a file in a version the book does not hold, and its upload
    /// fails (removed after the scan here; made unreadable by the job it is `NotReadable`,
    /// the same way): the book's older version is not listed as the file's. A file found in
    /// the version the book holds (racily, so read again) keeps it.
    #[tokio::test]
    async fn a_newer_version_not_stored_takes_the_older_one_out_of_the_book() {
        let (dir, arts, uploader) = artifacts_in_memory();
        let stamp_of = |name: &str| FileStamp::of(&std::fs::metadata(arts.join(name)).unwrap());
        let mut book = SyncBook::default();
        std::fs::write(arts.join("m.bin"), b"v1").unwrap();
        let mut v1 = up("artifacts/m.bin", 1);
        v1.stamp = stamp_of("m.bin");
        book.record(v1);
        std::fs::write(arts.join("m.bin"), b"v2, longer").unwrap();
        std::fs::write(arts.join("r.bin"), b"r").unwrap();
        let mut racy = up("artifacts/r.bin", 2);
        racy.stamp = stamp_of("r.bin");
        racy.racy = true;
        book.record(racy);
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        assert_eq!(found.files.len(), 2);
        std::fs::remove_file(arts.join("m.bin")).unwrap();
        std::fs::remove_file(arts.join("r.bin")).unwrap();
        // A request while the job runs (`wait_all`) keeps the version stored before.
        let todo: Vec<_> = found.files.clone().into_iter().collect();
        upload_all(
            &uploader,
            dir.path(),
            todo,
            &mut book,
            OlderVersion::Kept,
            None,
        )
        .await;
        assert!(book.contains("artifacts/m.bin"), "a request dropped v1");
        let report = sync_scan(&uploader, dir.path(), found, &mut book, None).await;
        assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
        let listed: Vec<String> = book.listing().map(|l| l.path.to_string()).collect();
        assert_eq!(listed, ["artifacts/r.bin"], "v1 of m.bin listed as final");
    }

    /// A final scan that stopped at a manifest's worth of files found others than live sync
    /// had listed: stored beside the book's, they made a manifest too large to write (never
    /// for good: each `recover` walked and sent it all again). Past the room they are not
    /// stored, and counted unstored for good.
    #[tokio::test]
    async fn a_full_scan_stores_no_more_than_the_manifest_can_list() {
        let (dir, arts, uploader) = artifacts_in_memory();
        let mut book = SyncBook::default();
        // Live sync listed ten, as they are on disk (settled: not read again).
        for i in 0..10u8 {
            let rel = format!("artifacts/a{i}");
            std::fs::write(dir.path().join(&rel), format!("a{i}")).unwrap();
            let md = std::fs::metadata(dir.path().join(&rel)).unwrap();
            book.record(Uploaded {
                stamp: FileStamp::of(&md),
                ..up(&rel, i)
            });
        }
        for i in 0..20 {
            std::fs::write(arts.join(format!("b{i:02}")), format!("b{i}")).unwrap();
        }
        let entry = c3_proto::manifest::entry_ceiling("artifacts/b00");
        let room = book.entries_ceiling() + 5 * entry;
        // Full: the scan stopped at its room, so it covers nothing and the book's files stay.
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 20 * entry);
        assert!(!found.covers("artifacts/a0"));
        let new = found
            .files
            .keys()
            .filter(|k| k.starts_with("artifacts/b"))
            .count();
        assert!(new > 5, "{new}");
        let over = new - 5;
        let report = sync_scan_until(
            &uploader,
            dir.path(),
            found,
            &mut book,
            None,
            None,
            Some(room),
        )
        .await;
        assert!(
            book.entries_ceiling() <= room,
            "the book outgrew its manifest"
        );
        assert_eq!(report.uploaded, 5);
        assert!(report.failures.iter().all(|(_, e)| e.is_for_good()));
        assert_eq!(report.failures.len() + report.failures_more as usize, over);
    }

    /// On tmpfs a store through a shared mapping moves no time: a file live sync read, then
    /// mapped, stored to and unmapped by the job, looks as it did. The final sync reads and
    /// hashes every such file again and stores the one whose bytes changed (one unchanged
    /// costs no store call); on disk a file that looks as the book has it is not read.
    #[tokio::test]
    async fn the_final_sync_reads_again_what_lies_on_tmpfs() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, disk) = (dir.path().join("tmp"), dir.path().join("disk"));
        std::fs::create_dir(&tmp).unwrap();
        let Some(_mounted) = crate::rmtree::tests::Tmpfs::mount(&tmp) else {
            return;
        };
        let untimed = crate::mountinfo::untimed_mapped_stores().unwrap();
        for (workdir, on_tmpfs) in [(&tmp, true), (&disk, false)] {
            std::fs::create_dir_all(workdir.join("artifacts")).unwrap();
            if !on_tmpfs
                && untimed.contains(&std::os::unix::fs::MetadataExt::dev(
                    &std::fs::metadata(workdir).unwrap(),
                ))
            {
                continue; // this test's own temp dir lies on a tmpfs: no disk to compare
            }
            let mut book = SyncBook::default();
            for (i, name) in ["state.npy", "same.bin"].into_iter().enumerate() {
                let path = workdir.join("artifacts").join(name);
                std::fs::write(&path, [1u8; 8192]).unwrap();
                book.record(Uploaded {
                    stamp: FileStamp::of(&std::fs::metadata(&path).unwrap()),
                    digests: crate::digest::digest_bytes(&[1u8; 8192]),
                    ..up(&format!("artifacts/{name}"), i as u8)
                });
            }
            let path = workdir.join("artifacts/state.npy");
            // A second link, read once with it (one stamp for both).
            std::fs::hard_link(&path, workdir.join("artifacts/state.lnk")).unwrap();
            let before = FileStamp::of(&std::fs::metadata(&path).unwrap());
            book.record(Uploaded {
                stamp: before,
                digests: crate::digest::digest_bytes(&[1u8; 8192]),
                ..up("artifacts/state.lnk", 3)
            });
            // The link moved its ctime: booked as live sync read it after.
            book.record(Uploaded {
                stamp: before,
                digests: crate::digest::digest_bytes(&[1u8; 8192]),
                ..up("artifacts/state.npy", 0)
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .unwrap();
            // SAFETY: the mapping is of a file this test alone holds, unmapped below.
            unsafe {
                use std::os::fd::AsRawFd;
                let map = libc::mmap(
                    std::ptr::null_mut(),
                    8192,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                );
                assert_ne!(map, libc::MAP_FAILED);
                // A read first (the fault that maps the page), as `a[i] += 1` does.
                let first = std::ptr::read_volatile(map as *const u8);
                std::ptr::write_volatile(map as *mut u8, first + 1);
                assert_eq!(libc::munmap(map, 8192), 0);
            }
            drop(file);
            let after = FileStamp::of(&std::fs::metadata(&path).unwrap());
            let uploader = Uploader::new(
                crate::store::BlobStore::in_memory(),
                crate::upload::UploadOptions::default(),
                "j",
                None,
            )
            .confined_to(workdir);
            let found = crate::collect::scan(workdir, &["artifacts".into()], None, u64::MAX);
            let report =
                sync_scan_until(&uploader, workdir, found, &mut book, None, None, None).await;
            let mut now = [1u8; 8192];
            now[0] = 2;
            let listed = |name: &str| {
                book.get(&format!("artifacts/{name}"))
                    .unwrap()
                    .digests
                    .sha256_hex()
            };
            if on_tmpfs {
                assert_eq!(after, before, "tmpfs moved a time on a mapped store");
                assert_eq!(
                    report.uploaded, 2,
                    "only the changed file's links are stored"
                );
                for name in ["state.npy", "state.lnk"] {
                    assert_eq!(
                        listed(name),
                        crate::digest::sha256_hex(&now),
                        "{name}: the book kept bytes the file no longer holds"
                    );
                }
                assert_eq!(listed("same.bin"), crate::digest::sha256_hex(&[1u8; 8192]));
            } else if after == before {
                assert_eq!(report.uploaded, 0, "a settled file on disk was read again");
            }
        }
    }

    /// The final sync's upload of a file's newer version panics (a bug): it is failed by its    /// The final sync's upload of a file's newer version panics (a bug): it is failed by its
    /// name, and the version the book held (live sync's) is not sealed into the complete
    /// manifest as the file's content. The panic was booked as "(an upload task)", the
    /// older version listed as final.
    #[tokio::test]
    async fn a_panicked_upload_names_its_file_and_takes_the_older_version_out() {
        let (dir, arts, uploader) = artifacts_in_memory();
        let mut book = SyncBook::default();
        std::fs::write(arts.join("p.bin"), b"A").unwrap();
        let mut a = up("artifacts/p.bin", 1);
        a.stamp = FileStamp::of(&std::fs::metadata(arts.join("p.bin")).unwrap());
        book.record(a);
        std::fs::write(arts.join("p.bin"), b"B, the version the job ended with").unwrap();
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        let _armed = crate::fault::arm("upload-panics", "artifacts/p.bin");
        let report = sync_scan(&uploader, dir.path(), found, &mut book, None).await;
        let failed: Vec<&str> = report
            .failures
            .iter()
            .map(|(rel, _)| rel.as_str())
            .collect();
        assert_eq!(failed, ["artifacts/p.bin"]);
        assert!(
            matches!(report.failures[0].1, UploadError::Task { .. }),
            "{:?}",
            report.failures[0].1
        );
        assert_eq!(book.listing().count(), 0, "version A listed as final");
    }

    /// What a manifest listed goes back into a book as it was listed, a name that is not
    /// UTF-8 included, and is never taken as current: each file found again is read again.
    #[test]
    fn files_listed_before_are_listed_again_and_never_current() {
        let entry = |path: &str, b64: Option<String>| c3_proto::manifest::FileEntry {
            path: path.into(),
            path_b64: b64,
            size: 5,
            sha256: "ab".repeat(32),
            blake3: "cd".repeat(32),
            mode: 0o644,
            mtime_ns: 7,
        };
        let odd = entry(
            "artifacts/\u{fffd}.bin",
            // `artifacts/\xff.bin`
            Some("YXJ0aWZhY3RzL/8uYmlu".into()),
        );
        let bad = c3_proto::manifest::FileEntry {
            sha256: "not hex".into(),
            ..entry("artifacts/bad", None)
        };
        let mut book = SyncBook::default();
        let files = [entry("artifacts/a", None), odd.clone(), bad];
        assert_eq!(book.listed_before(&files, false), 2);
        let listed: Vec<(String, Option<&str>)> = book
            .listing()
            .map(|l| (l.path.to_string(), l.path_b64))
            .collect();
        assert_eq!(
            listed,
            [
                ("artifacts/a".to_string(), None),
                (odd.path.clone(), odd.path_b64.as_deref())
            ]
        );
        let stamp = FileStamp {
            size: 5,
            mtime_ns: 7,
            ctime_ns: 0,
            ino: 0,
            dev: 0,
            mode: 0o644,
        };
        assert!(!book.is_current("artifacts/a", &stamp));
    }

    /// `recover` could not store a file again (the store failing): one that looks as its
    /// manifest listed it (size, mtime, mode) stays listed, one that changed since is dropped
    /// as any newer version not stored. A stamp taken from a manifest never matched the one
    /// found, and an unchanged, stored file was dropped from the list.
    #[tokio::test(start_paused = true)]
    async fn a_listed_file_not_read_again_stays_listed_while_it_looks_the_same() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        std::fs::write(arts.join("same"), b"same").unwrap();
        std::fs::write(arts.join("changed"), b"changed").unwrap();
        let faulty = crate::store::tests::Faulty {
            refusing: true.into(),
            ..Default::default()
        };
        // Nothing is stored yet: each upload is a write the store refuses.
        let store =
            crate::store::tests::store_over(std::sync::Arc::new(faulty), Duration::from_secs(5));
        let uploader = Uploader::new(store, crate::upload::UploadOptions::default(), "j", None)
            .confined_to(dir.path());
        let listed = |name: &str, mtime_delta: i64| {
            let md = std::fs::metadata(arts.join(name)).unwrap();
            c3_proto::manifest::FileEntry {
                path: format!("artifacts/{name}"),
                path_b64: None,
                size: md.len(),
                sha256: "ab".repeat(32),
                blake3: "cd".repeat(32),
                mode: md.mode() & 0o7777,
                mtime_ns: crate::display::file_time_ns(md.mtime(), md.mtime_nsec()) + mtime_delta,
            }
        };
        let mut book = SyncBook::default();
        book.listed_before(&[listed("same", 0), listed("changed", -1)], false);
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        let report = sync_scan(&uploader, dir.path(), found, &mut book, None).await;
        assert_eq!(report.failures.len(), 2, "{:?}", report.failures);
        assert!(
            book.contains("artifacts/same"),
            "an unchanged listed file was dropped"
        );
        assert!(!book.contains("artifacts/changed"));

        // A store refusing for good (a 403 from an expired token) says nothing of the file
        // either.
        let faulty = crate::store::tests::Faulty::default();
        *faulty.denied.lock().unwrap() =
            Some(crate::store::blob_key(&crate::digest::sha256_hex(b"same")));
        let store =
            crate::store::tests::store_over(std::sync::Arc::new(faulty), Duration::from_secs(5));
        let denied = Uploader::new(store, crate::upload::UploadOptions::default(), "j", None)
            .confined_to(dir.path());
        let mut book = SyncBook::default();
        book.listed_before(&[listed("same", 0)], false);
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        sync_scan(&denied, dir.path(), found, &mut book, None).await;
        assert!(book.contains("artifacts/same"), "dropped on a store's 403");

        // The file's own fault (over the size limit here; a sparse rewrite with its mtime put
        // back the same way) says it is not the listed version any more.
        let options = crate::upload::UploadOptions {
            max_file_bytes: 1,
            ..crate::upload::UploadOptions::default()
        };
        let strict = Uploader::new(crate::store::BlobStore::in_memory(), options, "j", None)
            .confined_to(dir.path());
        let mut book = SyncBook::default();
        book.listed_before(&[listed("same", 0)], false);
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        sync_scan(&strict, dir.path(), found, &mut book, None).await;
        assert!(
            !book.contains("artifacts/same"),
            "listed though not storable"
        );
        // Unless a complete manifest listed it: the job's end is past, and this look's own
        // limit (a `resync` run with a lower `max_file_bytes`) says nothing of its bytes.
        let mut book = SyncBook::default();
        book.listed_before(&[listed("same", 0)], true);
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        sync_scan(&strict, dir.path(), found, &mut book, None).await;
        assert!(
            book.contains("artifacts/same"),
            "dropped by resync's own limit"
        );
    }

    /// A final scan cut short (more files than a manifest lists, a tree without end) did not
    /// reach what live sync had listed: each is looked at by its path. Kept unchecked, the
    /// manifest listed a file the job had deleted and the old bytes of one it rewrote.
    #[tokio::test]
    async fn a_scan_cut_short_looks_again_at_what_it_did_not_reach() {
        let (dir, arts, uploader) = artifacts_in_memory();
        for name in ["kept", "deleted", "rewritten"] {
            std::fs::write(arts.join(name), name).unwrap();
        }
        let mut book = SyncBook::default();
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        sync_scan(&uploader, dir.path(), found, &mut book, None).await;
        assert_eq!(book.len(), 3);
        std::fs::remove_file(arts.join("deleted")).unwrap();
        std::fs::write(arts.join("rewritten"), "rewritten, longer now").unwrap();
        let mut cut = Scan::default();
        cut.incomplete = vec!["artifacts".into()];
        cut.cut_short = true;
        sync_scan(&uploader, dir.path(), cut, &mut book, None).await;
        assert!(book.contains("artifacts/kept"));
        assert!(!book.contains("artifacts/deleted"), "a deleted file listed");
        let listed = book.get("artifacts/rewritten").unwrap();
        assert_eq!(listed.digests.size, "rewritten, longer now".len() as u64);
    }

    /// A file a complete manifest listed and that is gone now (an operator freed the disk
    /// after the job's end, before a `resync` of what was left unstored) stays listed: the
    /// manifest `resync` wrote listed less, and gc took the blob. One an in-progress manifest
    /// listed is forgotten: the job may have removed it before its end.
    #[tokio::test]
    async fn a_file_gone_after_a_complete_manifest_stays_listed() {
        let (dir, _, uploader) = artifacts_in_memory();
        let freed = c3_proto::manifest::FileEntry {
            path: "artifacts/freed".into(),
            path_b64: None,
            size: 4,
            sha256: "ab".repeat(32),
            blake3: "cd".repeat(32),
            mode: 0o644,
            mtime_ns: 1,
        };
        for complete in [true, false] {
            let mut book = SyncBook::default();
            book.listed_before(std::slice::from_ref(&freed), complete);
            let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
            sync_scan(&uploader, dir.path(), found, &mut book, None).await;
            assert_eq!(
                book.contains("artifacts/freed"),
                complete,
                "complete: {complete}"
            );
        }
    }

    /// Checkpoints taken: how many files the book held at each.
    struct Saves(std::sync::Mutex<Vec<usize>>);

    impl Checkpoint for Saves {
        fn every(&self) -> Duration {
            Duration::from_secs(600)
        }
        fn save<'a>(
            &'a self,
            book: &'a mut SyncBook,
        ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
            self.0.lock().unwrap().push(book.len());
            book.mark_listed();
            Box::pin(async { Ok(()) })
        }
    }

    /// `artifacts/a`, stored at once, and `artifacts/b`, whose upload hangs.
    fn quick_and_hanging() -> (tempfile::TempDir, Uploader, crate::collect::Scan) {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        std::fs::write(arts.join("a"), b"quick").unwrap();
        std::fs::write(arts.join("b"), b"takes hours").unwrap();
        let faulty = crate::store::tests::Faulty::default();
        *faulty.hanging.lock().unwrap() = Some(crate::store::blob_key(&crate::digest::sha256_hex(
            b"takes hours",
        )));
        let store =
            crate::store::tests::store_over(std::sync::Arc::new(faulty), Duration::from_secs(7200));
        let uploader = Uploader::new(store, crate::upload::UploadOptions::default(), "j", None)
            .confined_to(dir.path());
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        (dir, uploader, found)
    }

    /// What landed is listed within the checkpoint's period even while one file's upload
    /// takes hours: the checkpoint came only as an upload landed, and a 180 GB file left
    /// the small files stored before it unlisted past gc's hour.
    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_comes_by_the_clock_while_a_long_upload_runs() {
        let (dir, uploader, found) = quick_and_hanging();
        let saves = Saves(std::sync::Mutex::new(Vec::new()));
        let mut book = SyncBook::default();
        let syncing = sync_scan(&uploader, dir.path(), found, &mut book, Some(&saves));
        assert!(tokio::time::timeout(Duration::from_secs(3600), syncing)
            .await
            .is_err());
        assert_eq!(*saves.0.lock().unwrap(), [1], "what landed was not listed");
    }

    /// A halted sync (`recover` told to stop) returns at once, though an upload hangs, and
    /// lists what landed before it does: without it, `recover` died mid-sync, and what it
    /// stored since the last checkpoint was unlisted (gc's, and read and stored again).
    #[tokio::test(start_paused = true)]
    async fn a_halted_sync_returns_at_once_and_lists_what_landed() {
        let (dir, uploader, found) = quick_and_hanging();
        let saves = Saves(std::sync::Mutex::new(Vec::new()));
        let mut book = SyncBook::default();
        let halt = CancellationToken::new();
        let stop = halt.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            stop.cancel();
        });
        let syncing = sync_scan_until(
            &uploader,
            dir.path(),
            found,
            &mut book,
            Some(&saves),
            Some(&halt),
            None,
        );
        let report = tokio::time::timeout(Duration::from_secs(120), syncing)
            .await
            .expect("a halted sync returns");
        assert!(report.halted);
        assert_eq!(*saves.0.lock().unwrap(), [1], "what landed was not listed");
        assert!(book.contains("artifacts/a") && !book.contains("artifacts/b"));
    }

    /// A book filled to its room (what a scan or live sync lets it hold), with the largest
    /// numbers an entry can have, still makes a manifest within the cap, with a header, logs
    /// and a result beside it. Counted at 200 bytes an entry (the least one takes), a scan
    /// took a third more files than the manifest could list, and none was ever written.
    #[test]
    fn a_book_filled_to_its_room_fits_in_its_manifest() {
        let max = 1 << 20;
        let room = crate::manifest::entries_room(max);
        let mut book = SyncBook::default();
        let mut n = 0u32;
        loop {
            let rel = format!("artifacts/{n:08}");
            if book.entries_ceiling() + c3_proto::manifest::entry_ceiling(&rel) > room {
                break;
            }
            let mut u = up(&rel, 0xff);
            u.digests.size = u64::MAX;
            u.stamp.mtime_ns = i64::MIN;
            u.stamp.mode = u32::MAX;
            book.record(u);
            n += 1;
        }
        let mut m = c3_proto::Manifest::new(&"j".repeat(128), Some("p".repeat(128)), u32::MAX);
        m.complete = true;
        m.result = serde_json::json!({ "loss": vec![0.5; 1000] });
        assert!(
            m.to_json_within(book.listing(), max).is_some(),
            "{n} files counted within the room do not fit in the manifest"
        );
    }

    /// What the book counts against `max_manifest_bytes` is never under what its manifest
    /// takes, names of control characters and names that are not UTF-8 included: live sync
    /// counted their raw bytes (a sixth of a control character's), and a book it let grow
    /// made a complete manifest over the cap.
    #[test]
    fn the_book_counts_what_its_manifest_takes() {
        let mut book = SyncBook::default();
        book.record(up(&format!("artifacts/{}", "\u{1}".repeat(200)), 1));
        book.record(up(
            &c3_proto::manifest::rel_key(b"artifacts/\xff\xfe\x01"),
            2,
        ));
        book.record(up("artifacts/plain", 3));
        let m = c3_proto::Manifest::new("j", None, 1);
        let taken = (m.to_json_with(book.listing()).len()
            - m.to_json_with(std::iter::empty::<Listing>()).len()) as u64;
        assert!(
            taken <= book.entries_ceiling(),
            "{} under {taken}",
            book.entries_ceiling()
        );
        assert!(
            book.entries_ceiling() - taken < 300,
            "{} far over {taken}",
            book.entries_ceiling()
        );
        book.forget(|_| true);
        assert_eq!((book.entries_ceiling(), book.path_bytes), (0, 0));
    }

    /// Forgetting a path drops it and what lies below it, nothing beside it.
    #[test]
    fn forget_under_drops_a_path_and_what_is_below_it() {
        let mut book = SyncBook::default();
        for (n, rel) in ["a/b/c", "a/d", "a.b", "a0", "ab/x", "b"]
            .iter()
            .enumerate()
        {
            book.record(up(rel, n as u8));
        }
        assert_eq!(book.forget_under("a"), (false, 2));
        let left: Vec<String> = book.listing().map(|l| l.path.to_string()).collect();
        assert_eq!(left, ["a.b", "a0", "ab/x", "b"]);
        assert_eq!(book.forget_under("ab"), (false, 1));
        assert_eq!(book.forget_under("zz"), (false, 0));
        assert_eq!(book.forget_under("b"), (true, 1));
        assert_eq!(book.len(), 2);
        assert_eq!(book.path_bytes, 5);
    }

    /// A path read as a file drops a listed file above it and whatever is listed below it
    /// (a file made a directory, or the other way round, with its hints lost or late): the
    /// book listed `d` and `d/x` together, a manifest every reader refuses.
    #[test]
    fn a_file_and_entries_below_it_are_never_listed_together() {
        let mut book = SyncBook::default();
        book.record(up("artifacts/d", 1));
        book.record(up("artifacts/d-1", 2));
        book.record(up("artifacts/d/x", 3));
        book.record(up("artifacts/d/y/z", 4));
        // What a reader checks: `from_json` parses, `check_places` refuses a file with
        // entries below it.
        let readable = |book: &SyncBook| {
            let doc = c3_proto::Manifest::new("j", None, 1).to_json_with(book.listing());
            c3_proto::Manifest::from_json(&doc)
                .unwrap()
                .check_places()
                .unwrap();
        };
        readable(&book);
        let paths: Vec<String> = book.listing().map(|l| l.path.to_string()).collect();
        assert_eq!(paths, ["artifacts/d-1", "artifacts/d/x", "artifacts/d/y/z"]);
        book.record(up("artifacts/d", 5));
        readable(&book);
        let paths: Vec<String> = book.listing().map(|l| l.path.to_string()).collect();
        assert_eq!(paths, ["artifacts/d", "artifacts/d-1"]);
        assert_eq!(
            book.path_bytes,
            ("artifacts/d".len() + "artifacts/d-1".len()) as u64
        );
        // Two sibling names that are not UTF-8, one's base64 a prefix of the other's and a
        // `/` after it: both stay.
        let a = c3_proto::manifest::rel_key(b"artifacts/\xff\xfe");
        let b = c3_proto::manifest::rel_key(b"artifacts/\xff\xfe\xfcab");
        assert!(b.starts_with(&format!("{a}/")), "{a} {b}");
        book.record(up(&b, 6));
        book.record(up(&a, 7));
        assert!(book.contains(&a) && book.contains(&b));
    }

    /// Names that are not UTF-8 (keyed by their bytes in base64) have places like any other:
    /// a file read where one was a directory drops what was listed below it, a directory
    /// forgotten drops them too. Live sync records such names; with their keys compared as
    /// text, `d` and `d/\xff` were listed together, a manifest every reader refuses.
    #[test]
    fn names_that_are_not_utf8_have_places_too() {
        let key = |raw: &[u8]| c3_proto::manifest::rel_key(raw);
        let mut book = SyncBook::default();
        book.record(up(&key(b"artifacts/d/\xff"), 1));
        book.record(up(&key(b"artifacts/\xfe/x"), 2));
        book.record(up(&key(b"artifacts/\xfe/y/\xfd"), 3));
        book.record(up(&key(b"artifacts/q/\xfc"), 4));
        book.record(up(&key(b"artifacts/q\xfc"), 5));
        book.record(up("artifacts/d", 6));
        book.record(up(&key(b"artifacts/\xfe"), 7));
        let doc = c3_proto::Manifest::new("j", None, 1).to_json_with(book.listing());
        let read = c3_proto::Manifest::from_json(&doc).and_then(|m| m.check_places());
        assert!(read.is_ok(), "{read:?}: {}", String::from_utf8_lossy(&doc));
        assert!(!book.contains(&key(b"artifacts/d/\xff")));
        assert!(!book.contains(&key(b"artifacts/\xfe/x")));
        assert!(!book.contains(&key(b"artifacts/\xfe/y/\xfd")));
        assert_eq!(book.forget_under("artifacts/q"), (false, 1));
        assert!(book.contains(&key(b"artifacts/q\xfc")));
        assert_eq!(book.forget_under(&key(b"artifacts/\xfe")), (true, 1));
        assert_eq!(book.len(), 2, "artifacts/d and artifacts/q\\xfc");
    }

    /// A sync in which every file fails keeps the first failures whole and counts the rest
    /// (800,000 failures with a store's 64 KiB error body each held 52 GB until the end),
    /// with how many of those the job made unstorable.
    #[tokio::test]
    async fn failures_past_those_named_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let arts = dir.path().join("artifacts");
        std::fs::create_dir(&arts).unwrap();
        // A file store whose directory cannot be made: every call fails, for good.
        std::fs::write(dir.path().join("f"), b"").unwrap();
        let url = format!("file://{}/f/store", dir.path().display());
        let store =
            crate::store::BlobStore::open(&crate::store::StoreConfig::for_tests(&url)).unwrap();
        let options = crate::upload::UploadOptions {
            max_file_bytes: 10,
            ..Default::default()
        };
        let uploader = Uploader::new(store, options, "j", None).confined_to(dir.path());
        let (small, large) = (180, 120);
        for i in 0..small + large {
            let body = if i < small {
                format!("{i}")
            } else {
                format!("{i:>20}")
            };
            std::fs::write(arts.join(format!("{i}")), body).unwrap();
        }
        let found = crate::collect::scan(dir.path(), &["artifacts".into()], None, 1 << 20);
        let mut book = SyncBook::default();
        let report = sync_scan(&uploader, dir.path(), found, &mut book, None).await;
        assert_eq!(report.uploaded, 0);
        assert_eq!(report.failures.len(), MAX_NAMED_UNSTORED);
        assert_eq!(
            report.failures.len() as u64 + report.failures_more,
            (small + large) as u64
        );
        let named_for_good = report
            .failures
            .iter()
            .filter(|(_, e)| e.is_for_good())
            .count() as u64;
        assert_eq!(named_for_good + report.failures_more_for_good, large as u64);
    }

    /// Entries a lying store's manifest gave, whose sizes add past u64 (kept by `recover`
    /// through `listed_before`): the total saturates. It overflowed (a panic in debug, a
    /// wrapped byte count registered with the quota in release).
    #[test]
    fn sizes_that_add_past_u64_saturate() {
        let mut book = SyncBook::default();
        for (n, rel) in ["a", "b"].iter().enumerate() {
            let mut u = up(rel, n as u8);
            u.digests.size = u64::MAX / 2 + 1;
            book.record(u);
        }
        assert_eq!(book.total_bytes(), u64::MAX);
    }

    /// A forgotten file's slot goes to the next new one; every path keeps its own version.
    #[test]
    fn forgotten_slots_are_reused() {
        let mut book = SyncBook::default();
        for (n, rel) in ["a", "b", "c"].iter().enumerate() {
            book.record(up(rel, n as u8));
        }
        assert_eq!(book.forget(|rel| rel == "a" || rel == "c"), 2);
        book.record(up("d", 3));
        book.record(up("e", 4));
        book.record(up("f", 5));
        assert_eq!((book.len(), book.versions.len()), (4, 4));
        assert!(!book.contains("a") && !book.contains("c"));
        for (rel, n) in [("b", 1), ("d", 3), ("e", 4), ("f", 5)] {
            assert!(book.is_current(rel, &up(rel, n).stamp), "{rel}");
        }
        assert_eq!(book.total_bytes(), 1 + 3 + 4 + 5);
    }

    /// The listing is the book's entries sorted by (path, path_b64): a name that is not
    /// UTF-8 by its lossy form, after a UTF-8 path equal to it; an unreadable path left out.
    #[test]
    fn the_listing_is_sorted_by_lossy_path() {
        let key = |raw: &[u8]| c3_proto::manifest::rel_key(raw);
        let mut book = SyncBook::default();
        let rels = [
            key(b"a/z\xff"),
            key(b"a/\xfe"),
            "a/\u{fffd}".to_string(),
            "a/b".into(),
            "a/\u{fffd}x".into(),
            key(b"a/\xff"),
            format!("a{}", "/d".repeat(200)),
            "b".into(),
        ];
        for (n, rel) in rels.iter().enumerate() {
            book.record(up(rel, n as u8));
        }
        let mut want: Vec<_> = rels
            .iter()
            .enumerate()
            .map(|(n, rel)| up(rel, n as u8).entry())
            .filter(|e| c3_proto::manifest::path_fits(&e.raw_path().unwrap()))
            .collect();
        want.sort_by(|a, b| (&a.path, &a.path_b64).cmp(&(&b.path, &b.path_b64)));
        let m = c3_proto::Manifest::new("j", None, 1);
        let mut expected = m.clone();
        expected.files = want;
        assert_eq!(m.to_json_with(book.listing()), expected.to_json());
        assert_eq!(expected.files.len(), rels.len() - 1);
    }
}
