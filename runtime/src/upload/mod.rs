//! Turning one local file into a blob, with a bounded amount of memory, and without ever
//! storing bytes that do not match their key.
//!
//! * Small files (up to `multipart_threshold`): one read into memory (counted against the
//!   [`ByteBudget`]), SHA-256 + BLAKE3 over that very buffer, PUT create-if-absent. One read.
//! * Large files: the key (SHA-256) must be known before the upload starts, so the file is
//!   read twice. Pass 1 computes SHA-256 and BLAKE3, the latter as the BLAKE3 subtrees of
//!   each part (`subtree`: a tag per part, merged into the file's BLAKE3). Pass 2 reads each
//!   part again (`pread`), checks its tag against pass 1 (no second SHA-256) and sends it;
//!   several parts in flight, each holding budget until the store has it. The upload is
//!   completed only if every part matched and the file's stamp did not move, so a file
//!   that changes meanwhile is re-queued and a torn version never becomes a blob.
//! * On the file store, a large file is read once: streamed into a staging object while
//!   hashed, then hard-linked to its key (unless that blob exists) once the stamp proves
//!   the file did not change meanwhile.
//! * On S3, GCS and Azure the upload id and every finished part (with the tag of the bytes
//!   sent) are journaled in the state dir: after a crash the same file resumes with only the
//!   parts not proven sent.
//! * With a bandwidth limit ([`RateLimit`], shared by every upload of the agent), every body
//!   sent to the store (a small file's PUT, each multipart part, each staged write) first
//!   takes its bytes from the bucket: see `Uploader::pace` for why before the budget.
//!
//! This module holds the `Uploader` and the small-file path; `multipart` the large-file
//! path with its `MultipartJournal`, `staged` the file store's large-file path.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use c3_proto::FileEntry;

use crate::budget::ByteBudget;
use crate::collect::{FileStamp, LocalFile};
use crate::confine::JobReader;
use crate::digest::Digests;
use crate::display::human_bytes;
use crate::ratelimit::RateLimit;
use crate::store::{BlobStore, StoreError};

#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Files larger than this go through multipart upload.
    pub multipart_threshold: u64,
    /// Smallest part size; grows for huge files so that 10,000 parts always suffice.
    pub min_part_size: u64,
    /// Parts of one file in flight at once.
    pub parts_in_flight: usize,
    /// Files uploaded at once.
    pub files_in_flight: usize,
    /// File bytes held in memory by all uploads together.
    pub memory_budget: u64,
    /// Files and parts in flight are the agent's to choose (false when the config sets
    /// them): the final sync scales them to the host ([`UploadOptions::at_end`]) and the
    /// number of files in flight adapts to the throughput ([`crate::inflight`]).
    pub auto_in_flight: bool,
    /// Bytes per second sent to the store by all uploads together (`None`: unlimited).
    /// Clones share the bucket: build it once per agent.
    pub bandwidth_limit: Option<RateLimit>,
    /// A larger file is not stored (an upload error naming it): S3's and GCS's own limit by
    /// default, and a bound on the work one file can ask for.
    pub max_file_bytes: u64,
    /// Holes the files one attempt stores may have in all, past [`HOLE_SLACK`] a file (see
    /// [`HOLE_BUDGET`]).
    pub hole_budget: u64,
    /// Bytes the files one attempt stores may share with other files (reflinked copies) in
    /// all, past [`HOLE_SLACK`] a file (see [`SHARED_BUDGET`]).
    pub shared_budget: u64,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            multipart_threshold: 16 * MIB,
            min_part_size: 8 * MIB,
            parts_in_flight: 4,
            files_in_flight: 16,
            memory_budget: 32 * MIB,
            bandwidth_limit: None,
            auto_in_flight: true,
            max_file_bytes: MAX_FILE_BYTES,
            hole_budget: HOLE_BUDGET,
            shared_budget: SHARED_BUDGET,
        }
    }
}

impl UploadOptions {
    /// The final sync's options: the job's processes are gone, so the whole host may work
    /// on the upload (files and parts in flight scaled to the CPU count; the memory budget
    /// stays the one limit on bytes held). Live sync keeps the configured, gentle values. A
    /// value set in the config is kept as it is (`auto_in_flight` false).
    pub fn at_end(&self) -> UploadOptions {
        let mut end = self.clone();
        if self.auto_in_flight {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            end.files_in_flight = self.files_in_flight.max(8 * cpus);
            end.parts_in_flight = self.parts_in_flight.max(cpus).min(32);
        }
        end
    }
}

/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
/// S3's and GCS's largest object: 5 TiB.
pub const MAX_FILE_BYTES: u64 = 5 << 40;
/// A file with more holes than this (and holes over half its size) is refused as sparse.
const MAX_HOLE_BYTES: u64 = 1 << 30;
/// Holes that the files one attempt stores may have in all, past `HOLE_SLACK` a file, by
/// default (`upload.hole_budget_bytes`). A hole costs the job no disk and the agent a read, a
/// hash and bytes stored: below `MAX_HOLE_BYTES` each, 100,000 files of `truncate -s 1G` and a
/// 4 KiB header were 400 MiB of disk and 100 TiB for the final sync to read and store. Not
/// every hole is the job's doing: a compressing file system (ZFS, and Lustre or NFS servers on
/// it) stores runs of zeros written out densely as holes, so a job's zero-padded tensors or
/// `dd if=/dev/zero` image are holes too. 64 GiB is a large job's output: what a hostile one
/// can make the agent do stays that of one such job (minutes of hashing, and the bytes
/// stored; twice that where it gives holes back, see `HoleBudget`), while a legitimate one with zeros to spare rarely reaches it.
pub const HOLE_BUDGET: u64 = 64 << 30;
/// Bytes that the files one attempt stores may share with other files in all (extents
/// `FIEMAP` flags shared: `cp --reflink`, a dedup tool, a snapshot), past `HOLE_SLACK` a file,
/// by default (`upload.shared_budget_bytes`). A reflinked copy costs the job an inode, and the
/// agent a read, a hash (and on the file store a staged write) of the whole file, with no
/// hard link to tell it is the same bytes: on XFS or btrfs a 10 GiB file and 10,000
/// `cp --reflink` copies of it were metadata for the job and 100 TB to read for the agent.
/// 1 TiB: coreutils 9 `cp` reflinks by default on XFS and btrfs, so a job copying its
/// checkpoints into its output dirs shares every extent with the copy's source, and a charge
/// is never given back for a file deleted since; what a hostile job can make the agent read
/// stays 1 TiB an attempt. A file system whose snapshots share every extent (btrfs under
/// snapper) may need it raised. Counted per inode as the hole budget is (see `HoleBudget`).
pub const SHARED_BUDGET: u64 = 1 << 40;
/// Holes a file may have without drawing on the hole budget, ever: the gaps a writer leaves as
/// it seeks. The most a job gains a file over its disk once the budget is spent.
const HOLE_SLACK: u64 = 1 << 20;
const MIB: u64 = 1024 * 1024;
const HASH_BUF: usize = MIB as usize;

/// Part size for a file of `size` bytes: at least `min`, whole MiB, at most 10,000 parts.
pub fn part_size_for(size: u64, min: u64) -> u64 {
    let needed = size.div_ceil(MAX_PARTS);
    needed.max(min).div_ceil(MIB) * MIB
}

/// A file that became (or already was) a blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub rel: String,
    pub digests: Digests,
    /// The version of the file that was uploaded.
    pub stamp: FileStamp,
    /// Bytes this upload added to the store (0 when the blob already existed).
    pub new_bytes: u64,
    /// The file changed too shortly before it was read for its stamp to tell a later change:
    /// it is read again at the next look rather than taken as current ([`racy`]).
    pub racy: bool,
    /// When that was judged (ns since the epoch): a second read settles a racy stamp only if
    /// it comes later than any tick the first could share with a change.
    pub judged_ns: i64,
}

/// How long after a change the file's stamp may still be the one a further change leaves. A
/// kernel before 6.13 sets mtime and ctime from a clock that moves once a tick (1-10 ms): a
/// rewrite of the same size in the tick of the read (a job publishing a file and writing it
/// again at once) would leave every field of the stamp as it was. Git calls this racily clean.
const RACY_WINDOW_NS: i64 = 50_000_000;

/// Now, in ns since the epoch.
fn now_ns() -> i64 {
    crate::display::epoch_ns(std::time::SystemTime::now())
}

/// The most [`settle_apart_ns`] asks.
pub const SETTLE_APART_NS: i64 = 2_000_000_000 + RACY_WINDOW_NS;

/// How far apart two reads of a racy stamp must be for the second to settle it: past a tick,
/// and past a second where file systems keep whole seconds, two where they keep even ones
/// (FAT).
pub fn settle_apart_ns(stamp: &FileStamp) -> i64 {
    racy_window(stamp).max(1_000_000_000 + RACY_WINDOW_NS)
}

/// Whether `stamp`'s last change lies within [`RACY_WINDOW_NS`] of now (a read just done); on
/// a file system that keeps whole seconds only, within a second and a little.
pub fn racy(stamp: &FileStamp) -> bool {
    changed_lately(stamp, stamp.mtime_ns.max(stamp.ctime_ns))
}

/// Whether `at` (one of `stamp`'s times) lies within the racy window of now.
fn changed_lately(stamp: &FileStamp, at: i64) -> bool {
    changed_before(stamp, at, now_ns())
}

/// Whether `at` lies within the racy window ([`racy_window`]) before `now`.
fn changed_before(stamp: &FileStamp, at: i64, now: i64) -> bool {
    at > now - racy_window(stamp)
}

/// How long after a change a stamp may still be the one a further change leaves: a tick
/// (50 ms), a second and a tick where the file system keeps whole seconds, two where it
/// keeps even ones (FAT, which sets the ctime to the mtime too: a same-size rewrite 1.3 s
/// after the first write left every field of the stamp as it was).
fn racy_window(stamp: &FileStamp) -> i64 {
    let whole = |n: i64| stamp.mtime_ns % n == 0 && stamp.ctime_ns % n == 0;
    if whole(2_000_000_000) {
        2_000_000_000 + RACY_WINDOW_NS
    } else if whole(1_000_000_000) {
        1_000_000_000 + RACY_WINDOW_NS
    } else {
        RACY_WINDOW_NS
    }
}

/// How soon after its last change a file was read: [`racy`], and by the ctime alone, judged
/// at the read's first look (`at`).
#[derive(Debug, Clone, Copy)]
struct Racy {
    any: bool,
    /// By the ctime alone. Every write moves the ctime to now, and the mtime can be set
    /// to another time only by `utimes`, which moves the ctime to now too: past this window, any
    /// later change leaves another ctime. A job chooses its file's mtime (`touch -d +1year`) but
    /// not its ctime, and a future mtime is [`racy`] for ever: the read an inode keeps for its
    /// other links (`Uploader::inodes`) is judged by this, or each of 10,000 links to a 1 GiB
    /// file was read whole. The book keeps [`racy`], which a second read settles.
    ctime: bool,
    at: i64,
}

impl Racy {
    /// Judged as of `at`, when the stamp was first taken, before the read: a change that
    /// leaves the stamp as it was can come only within the tick the ctime holds, and a read
    /// that took longer than the window, judged at its end, took one made during it (another
    /// process of the job writing the same bytes' size in that tick) as settled.
    fn as_of(stamp: &FileStamp, at: i64) -> Racy {
        let (latest, ctime) = (stamp.mtime_ns.max(stamp.ctime_ns), stamp.ctime_ns);
        Racy {
            any: changed_before(stamp, latest, at),
            ctime: changed_before(stamp, ctime, at),
            at,
        }
    }
}

impl Uploaded {
    pub fn entry(&self) -> FileEntry {
        let (path, path_b64) = c3_proto::manifest::entry_paths(&self.rel);
        FileEntry {
            path,
            path_b64,
            size: self.digests.size,
            sha256: self.digests.sha256_hex(),
            blake3: self.digests.blake3_hex(),
            mode: self.stamp.mode,
            mtime_ns: self.stamp.mtime_ns,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} changed while it was being uploaded")]
    Changed { path: PathBuf },
    #[error("{path} vanished before it could be uploaded")]
    Vanished { path: PathBuf },
    #[error("{path} is not readable by the job's user; not uploaded")]
    NotReadable { path: PathBuf },
    #[error(
        "{path} is past the files one manifest can list (store.max_manifest_bytes); not stored"
    )]
    NoRoom { path: PathBuf },
    #[error("{path} is {}, over upload.max_file_bytes ({}); not stored", human_bytes(*.size), human_bytes(*.max))]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path} is a sparse file ({} long, {} of it data, the rest holes); not stored: a file that is mostly holes costs no disk to make and hours to hash (a file system that compresses, as ZFS, keeps runs of zeros as holes however they were written)", human_bytes(*.size), human_bytes(*.data))]
    Sparse { path: PathBuf, size: u64, data: u64 },
    #[error("{path} is a sparse file ({} long, {} of it data, the rest holes); not stored: the job's files have used up upload.hole_budget_bytes ({}), the holes they may have past 1 MiB a file: holes cost no disk to make and are read, hashed and stored as zeros (a file system that compresses, as ZFS, keeps runs of zeros as holes however they were written: there the setting may need raising)", human_bytes(*.size), human_bytes(*.data), human_bytes(*.budget))]
    HolesSpent {
        path: PathBuf,
        size: u64,
        data: u64,
        budget: u64,
    },
    #[error("{path} shares {} of its {} with other files (reflinked copies: `cp --reflink`, a dedup tool, a snapshot); not stored: the job's files have used up upload.shared_budget_bytes ({}), the shared bytes they may have past 1 MiB a file: a copy that shares its extents costs no disk to make and is read, hashed and stored whole (a file system whose snapshots share every extent, as btrfs under snapper, may need the setting raised)", human_bytes(*.shared), human_bytes(*.size), human_bytes(*.budget))]
    SharedSpent {
        path: PathBuf,
        size: u64,
        shared: u64,
        budget: u64,
    },
    #[error("upload of {path} failed")]
    Store {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("upload task of {path} failed")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl UploadError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Changed { .. } => true,
            UploadError::Store { source, .. } => !source.is_permanent(),
            UploadError::Read { .. }
            | UploadError::Vanished { .. }
            | UploadError::NotReadable { .. }
            | UploadError::NoRoom { .. }
            | UploadError::TooLarge { .. }
            | UploadError::Sparse { .. }
            | UploadError::HolesSpent { .. }
            | UploadError::SharedSpent { .. }
            | UploadError::Task { .. } => false,
        }
    }

    /// Whether the job made the file unstorable itself: over `max_file_bytes`, mostly
    /// holes, or not readable by its user (the agent reads as that user, or with more
    /// rights). No later sync stores it as it is, so `recover` does not come back for it; it
    /// still counts as an upload error.
    pub fn is_for_good(&self) -> bool {
        match self {
            UploadError::NotReadable { .. }
            | UploadError::NoRoom { .. }
            | UploadError::TooLarge { .. }
            | UploadError::Sparse { .. }
            | UploadError::HolesSpent { .. }
            | UploadError::SharedSpent { .. } => true,
            UploadError::Read { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            UploadError::Changed { .. }
            | UploadError::Vanished { .. }
            | UploadError::Store { .. }
            | UploadError::Task { .. } => false,
        }
    }
}

/// Uploads files of one job: the store, the options, the shared memory budget and
/// where multipart uploads are journaled. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Uploader {
    store: BlobStore,
    opts: Arc<UploadOptions>,
    budget: ByteBudget,
    journal_dir: Option<PathBuf>,
    /// `<attempt>-`, in front of this attempt's journal and staging names (empty: no
    /// attempt named). Attempts of one job share the journal dir and the staging prefix: an
    /// attempt's end (or `recover`'s) aborts what it journaled or staged, never another
    /// attempt's uploads under way.
    attempt_tag: Arc<str>,
    /// Blobs whose multipart upload failed on a store fault and was kept (not aborted), its
    /// journal with it, for a later sync or `recover` to resume rather than send again.
    kept: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Multipart uploads that no journal names (the state dir failing) whose abort failed
    /// (the store down): [`Uploader::abort_orphans`] tries them again. Nothing else on the
    /// node names them, and their parts stay billed at the store.
    unjournaled: Arc<std::sync::Mutex<Vec<c3_proto::MultipartRecord>>>,
    /// Key prefix of this job's staging objects (file store).
    staging: Arc<str>,
    staged: Arc<std::sync::atomic::AtomicU64>,
    /// One owner per blob being uploaded as multipart: identical files in one sync wait for
    /// the first one's upload instead of sharing (and aborting) its journaled upload id.
    owners: Arc<std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
    /// The workdir: files below it are opened without following any symlink.
    root: Option<Arc<Path>>,
    /// The job's user: a file it could not read itself is never uploaded.
    reader: Option<Arc<JobReader>>,
    /// Blobs this node knows are stored: checked with a HEAD instead of sent again.
    known: Arc<crate::known::KnownBlobs>,
    /// `<attempt dir>/added-blobs`: the blobs this attempt added to the store, whoever of its
    /// agents uploaded them, so that `recover` after a crash registers the right storage delta.
    added_log: Option<added::AddedLog>,
    /// Large files hashed ahead while the job writes them, by (dev, ino).
    prehashed: Arc<std::sync::Mutex<HashMap<(u64, u64), Ahead>>>,
    /// The version of each inode last read, by (dev, ino), behind a lock held through its
    /// upload: a hard link to a file already read in the version it has now is the same
    /// bytes, and costs a stat. A job's 1 GiB file with 10,000 links would otherwise be
    /// 10 TB of reads and hashing for the root agent, for 1 GiB of the job's disk.
    inodes: Arc<std::sync::Mutex<HashMap<(u64, u64), InodeSlot>>>,
    /// Holes this attempt's uploads may still read (see [`HOLE_BUDGET`]): shared by live sync
    /// and the final sync, as the uploader is.
    holes: HoleBudget,
    /// Shared extents this attempt's uploads may still read (see [`SHARED_BUDGET`]), counted
    /// the same way.
    shared: HoleBudget,
}

/// What is left of the hole budget, and the holes of each inode's latest version read: the
/// budget counts the holes of what the attempt stores, not of each state a file passed
/// through. One read again draws only holes it did not have (a sparse file live sync reads as
/// it grows is not charged each time) and gives back those it no longer has (a file stored
/// while a parallel writer had gaps in it, then stored whole). Given back at most the budget
/// again over the attempt: a job that makes one file sparse and dense in turn, for each
/// version to be read, has holes read twice the budget at most.
#[derive(Debug, Clone)]
struct HoleBudget(Arc<std::sync::Mutex<HoleBook>>);

#[derive(Debug)]
struct HoleBook {
    budget: u64,
    left: u64,
    /// What may still be given back.
    refunds: u64,
    /// Inodes whose latest version read had more than `HOLE_SLACK` of holes: each holds part
    /// of the budget, so at most `budget / HOLE_SLACK` of them.
    drawn: HashMap<(u64, u64), u64>,
}

impl HoleBudget {
    fn new(bytes: u64) -> Self {
        HoleBudget(Arc::new(std::sync::Mutex::new(HoleBook {
            budget: bytes,
            left: bytes,
            refunds: bytes,
            drawn: HashMap::new(),
        })))
    }

    /// Inode `key`'s version being read has `holes` (0 for at most `HOLE_SLACK`): draws what
    /// it has more than its last version read, or gives back what it has less; false, and
    /// nothing drawn, when they do not fit.
    fn draw(&self, key: (u64, u64), holes: u64) -> bool {
        let mut book = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let had = book.drawn.get(&key).copied().unwrap_or(0);
        if holes > had {
            if holes - had > book.left {
                return false;
            }
            book.left -= holes - had;
        } else {
            let back = (had - holes).min(book.refunds);
            book.refunds -= back;
            book.left += back;
        }
        if holes == 0 {
            book.drawn.remove(&key);
        } else {
            book.drawn.insert(key, holes);
        }
        true
    }

    fn budget(&self) -> u64 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).budget
    }
}

/// Refuses the open `file` (the version `stamp` describes) when its holes may not be read:
/// mostly holes (see [`ensure_dense`]), or more than [`HOLE_SLACK`] of them once the job's
/// hole budget is spent. Leaves the file offset at 0.
fn judge_holes(
    budget: &HoleBudget,
    file: &File,
    path: &Path,
    stamp: &FileStamp,
) -> Result<(), UploadError> {
    let key = (stamp.dev, stamp.ino);
    let size = stamp.size;
    // Read as a version with no holes to count: what an earlier one of the inode drew is
    // given back.
    if size <= HOLE_SLACK {
        budget.draw(key, 0);
        return Ok(());
    }
    let data = data_bytes(file, size);
    let holes = size - data;
    if holes <= HOLE_SLACK {
        budget.draw(key, 0);
        return Ok(());
    }
    let path = path.into();
    if holes > MAX_HOLE_BYTES && holes > size / 2 {
        return Err(UploadError::Sparse { path, size, data });
    }
    if !budget.draw(key, holes) {
        let budget = budget.budget();
        return Err(UploadError::HolesSpent {
            path,
            size,
            data,
            budget,
        });
    }
    Ok(())
}

/// Refuses the open `file` (the version `stamp` describes) when it shares more than
/// [`HOLE_SLACK`] with other files once the attempt's shared budget is spent (see
/// [`SHARED_BUDGET`]). Leaves the file offset as it was.
fn judge_shared(
    budget: &HoleBudget,
    file: &File,
    path: &Path,
    stamp: &FileStamp,
) -> Result<(), UploadError> {
    let shared = if stamp.size <= HOLE_SLACK {
        0
    } else {
        crate::extents::shared_bytes(file, stamp.size)
    };
    charge_shared(budget, path, stamp, shared)
}

/// Draws `shared` bytes of the version `stamp` of `path` from `budget` (nothing for at most
/// [`HOLE_SLACK`]), or refuses it.
fn charge_shared(
    budget: &HoleBudget,
    path: &Path,
    stamp: &FileStamp,
    shared: u64,
) -> Result<(), UploadError> {
    let drawn = if shared <= HOLE_SLACK { 0 } else { shared };
    if budget.draw((stamp.dev, stamp.ino), drawn) {
        return Ok(());
    }
    Err(UploadError::SharedSpent {
        path: path.into(),
        size: stamp.size,
        shared,
        budget: budget.budget(),
    })
}

/// Where the first hole at or past `from` starts in the open `file` (`size` long); `size` when
/// there is none (or the file system keeps none), `from` when it cannot tell.
fn first_hole(file: &File, from: u64, size: u64) -> u64 {
    use std::os::fd::AsRawFd;
    let Ok(st) = crate::confine::fstat(file) else {
        return from;
    };
    #[allow(clippy::unnecessary_cast)] // `blkcnt_t` is an i64 on some targets, a u64 on others.
    if (st.st_blocks as u64).saturating_mul(512) >= size {
        return size;
    }
    // SAFETY: lseek on an fd this function borrows; no memory is touched. The reads that
    // follow are at offsets (pread), so where this leaves the offset does not matter.
    let at = unsafe { libc::lseek(file.as_raw_fd(), from as i64, libc::SEEK_HOLE) };
    if at < 0 {
        return from;
    }
    (at as u64).clamp(from, size)
}

/// What one read of an inode found (see `Uploader::inodes`).
#[derive(Debug, Clone, Copy)]
struct InodeRead {
    stamp: FileStamp,
    digests: Digests,
    judged_ns: i64,
}

/// Which version of a file an upload may read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// Whatever the file holds when it is read (the final sync, a `publish`).
    Current,
    /// Only the one its `LocalFile::stamp` describes (see [`Uploader::upload_as_seen`]).
    Seen,
}

/// One inode's turn to be uploaded, and what its last read found.
type InodeSlot = Arc<tokio::sync::Mutex<Option<InodeRead>>>;

/// Inodes remembered at most; past that the ones no upload holds are forgotten.
const MAX_INODES: usize = 65_536;

/// Large files followed at once, at most (each entry is a hasher and a tag per part).
pub(crate) const MAX_PREHASHED: usize = 64;
/// A file hashed ahead that has not grown for this long gives its place up to a new one
/// when all are taken: one deleted or refused before its upload is never taken, and 64 of
/// them (checkpoints rotated away) stopped hashing ahead for the rest of the attempt.
const PREHASH_IDLE: std::time::Duration = std::time::Duration::from_secs(300);

/// A file's prefix hashed ahead, and when it last grew.
#[derive(Debug)]
struct Ahead {
    state: multipart::Prehashed,
    /// The file's size when it last grew, and when.
    size: u64,
    at: std::time::Instant,
}
/// Read ahead per call at most, so one fast writer cannot keep the agent reading.
const PREHASH_STEP: u64 = 256 * MIB;

/// A small file at least this large is checked with a HEAD before it is sent, known or not:
/// one round trip costs less than sending this much again.
const HEAD_FIRST_BYTES: u64 = 1024 * 1024;

/// Maps a store error on `path`'s upload.
fn store_err(path: &Path) -> impl Fn(StoreError) -> UploadError + Copy + '_ {
    move |source| UploadError::Store {
        path: path.into(),
        source,
    }
}

/// The file's stamp: below the job's `root`, an lstat beneath the pinned root with no
/// symlink in any component (a path lstat would go through a directory the job swapped for
/// a symlink, to an automount or a hung network mount, say); elsewhere (the agent's own
/// files) by path.
fn stat(root: Option<&Path>, path: &Path) -> Result<FileStamp, UploadError> {
    stat_linked(root, path).map(|(stamp, _)| stamp)
}

/// [`stat`], and the inode's link count.
fn stat_linked(root: Option<&Path>, path: &Path) -> Result<(FileStamp, u64), UploadError> {
    let linked = |st: &nix::sys::stat::FileStat| (FileStamp::of_stat(st), links(st));
    if let Some((root, rel)) = root.and_then(|r| path.strip_prefix(r).ok().map(|rel| (r, rel))) {
        return match crate::confine::DirFd::open_root(root)
            .and_then(|d| crate::confine::lstat_beneath(&d, rel))
        {
            Ok(st) => Ok(linked(&st)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(UploadError::Vanished { path: path.into() })
            }
            Err(source) => Err(read_error(path, source)),
        };
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok((FileStamp::of(&m), std::os::unix::fs::MetadataExt::nlink(&m))),
        // Longer than PATH_MAX (deep nesting below the workdir): from `/`, one directory at a
        // time, never through a symlink.
        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => stat_long(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(UploadError::Vanished { path: path.into() })
        }
        Err(source) => Err(read_error(path, source)),
    }
}

/// The inode's link count.
#[allow(clippy::unnecessary_cast)] // `nlink_t` is a u32 on some targets (aarch64).
fn links(st: &nix::sys::stat::FileStat) -> u64 {
    st.st_nlink as u64
}

fn stat_long(path: &Path) -> Result<(FileStamp, u64), UploadError> {
    let read_err = |source| UploadError::Read {
        path: path.into(),
        source,
    };
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(UploadError::Vanished { path: path.into() });
    };
    let rel = parent
        .strip_prefix("/")
        .map_err(|_| read_err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG)))?;
    let dir = crate::confine::DirFd::open(Path::new("/"))
        .and_then(|root| root.open_dir(rel))
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                UploadError::Vanished { path: path.into() }
            } else {
                read_err(e)
            }
        })?;
    match dir.stat(name) {
        Ok(st) => Ok((FileStamp::of_stat(&st), links(&st))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(UploadError::Vanished { path: path.into() })
        }
        Err(e) => Err(read_err(e)),
    }
}

/// Refuses a large file that is mostly holes (`truncate -s 16T`: no disk, no quota, and
/// hours of hashing zeros), its data counted by [`data_bytes`]. Leaves the file offset at 0.
fn ensure_dense(file: &File, path: &Path, size: u64) -> Result<(), UploadError> {
    if size <= MAX_HOLE_BYTES {
        return Ok(());
    }
    let data = data_bytes(file, size);
    let holes = size - data;
    if holes > MAX_HOLE_BYTES && holes > size / 2 {
        return Err(UploadError::Sparse {
            path: path.into(),
            size,
            data,
        });
    }
    Ok(())
}

/// The bytes of the open `file` (`size` long) that are data, not holes. A file with as many
/// bytes allocated as it is long has none (the usual case: one fstat). Otherwise counted with
/// SEEK_DATA/SEEK_HOLE, at most `MAX_EXTENTS` extents; past them the rest holds no more data
/// than the allocated bytes not yet counted: a job's 10,000 small extents and then
/// `truncate -s 5T` were 5 TiB taken as data. Allocated bytes only bound the count: a
/// compressing file system (ZFS) allocates less than a dense file's data, so they decide
/// nothing alone. A file system without SEEK_DATA reports one extent, the whole file; an
/// fstat or lseek that fails counts the file as data. Leaves the file offset at 0.
fn data_bytes(file: &File, size: u64) -> u64 {
    use std::os::fd::AsRawFd;
    const MAX_EXTENTS: usize = 10_000;
    let Ok(st) = crate::confine::fstat(file) else {
        return size;
    };
    #[allow(clippy::unnecessary_cast)] // `blkcnt_t` is an i64 on some targets, a u64 on others.
    let allocated = (st.st_blocks as u64).saturating_mul(512);
    if allocated >= size {
        return size;
    }
    let fd = file.as_raw_fd();
    let (mut data, mut at, mut finished) = (0u64, 0i64, false);
    for _ in 0..MAX_EXTENTS {
        // SAFETY: lseek on an fd this function borrows; no memory is touched.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            // ENXIO: no data past `at`. Anything else: no answer, so taken as dense.
            finished = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            if !finished {
                data = size;
            }
            break;
        }
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
        if end < start {
            data = size;
            break;
        }
        data += (end - start) as u64;
        at = end;
        if at as u64 >= size {
            finished = true;
            break;
        }
    }
    if !finished {
        // Stopped at MAX_EXTENTS: the rest holds at most what is allocated and not yet counted.
        let rest = size.saturating_sub(at as u64);
        data = data.saturating_add(rest.min(allocated.saturating_sub(data)));
    }
    // SAFETY: as above.
    unsafe { libc::lseek(fd, 0, libc::SEEK_SET) };
    data.min(size)
}

/// Reads into `buf` until it is full or the file ends.
fn fill(file: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, UploadError> + Send + 'static,
) -> Result<T, UploadError> {
    crate::pace::spawn_gently(f)
        .await
        .map_err(|source| UploadError::Task {
            path: path.into(),
            source,
        })?
}

/// Opens the version of the file that `before` describes: no symlink on the way (below
/// `root`), the same inode (a swapped-in file is "changed"), reached through directories
/// `reader` may enter, and one `reader` may read.
fn open_confined(
    root: Option<&Path>,
    reader: Option<&JobReader>,
    path: &Path,
    before: FileStamp,
) -> Result<File, UploadError> {
    let open_error = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            UploadError::Vanished { path: path.into() }
        } else {
            read_error(path, source)
        }
    };
    // The agent's own files (the job's logs in the state dir) are not the job's to read.
    let below = root.and_then(|r| path.strip_prefix(r).ok().map(|rel| (r, rel)));
    let file = match (below, reader) {
        (Some((root, rel)), Some(reader)) => crate::confine::open_read_as(root, rel, reader)
            .map_err(open_error)?
            .ok_or_else(|| UploadError::NotReadable { path: path.into() })?,
        _ => crate::confine::open_read(root, path).map_err(open_error)?,
    };
    let st = crate::confine::fstat(&file).map_err(|source| read_error(path, source))?;
    if !crate::confine::is_regular(&st) || st.st_ino != before.ino || st.st_dev != before.dev {
        return Err(UploadError::Changed { path: path.into() });
    }
    if let (Some(_), Some(reader)) = (below, reader) {
        match reader.may_read(&file, &st) {
            Ok(true) => {}
            Ok(false) => return Err(UploadError::NotReadable { path: path.into() }),
            Err(source) => {
                return Err(UploadError::Read {
                    path: path.into(),
                    source,
                })
            }
        }
    }
    Ok(file)
}

/// A look at or read of `path` that failed. ESTALE is the file (or a directory above it)
/// replaced by another NFS client while the agent held its handle: the file changed, to be
/// looked at again by path, not a read fault that fails its upload.
pub(super) fn read_error(path: &Path, source: std::io::Error) -> UploadError {
    if source.raw_os_error() == Some(libc::ESTALE) {
        UploadError::Changed { path: path.into() }
    } else {
        UploadError::Read {
            path: path.into(),
            source,
        }
    }
}

fn ensure_unchanged(
    root: Option<&Path>,
    path: &Path,
    before: FileStamp,
) -> Result<(), UploadError> {
    if stat(root, path)? != before {
        return Err(UploadError::Changed { path: path.into() });
    }
    Ok(())
}

/// [`ensure_unchanged`] off the reactor: the job's file may be on an NFS server that stopped
/// answering, and a stat there held a runtime thread (enough of them, every timer).
async fn ensure_unchanged_off(
    root: Option<Arc<Path>>,
    path: &Path,
    before: FileStamp,
) -> Result<(), UploadError> {
    let p = path.to_path_buf();
    blocking(path, move || ensure_unchanged(root.as_deref(), &p, before)).await
}

impl Uploader {
    pub fn new(
        store: BlobStore,
        opts: UploadOptions,
        job_id: &str,
        journal_dir: Option<PathBuf>,
    ) -> Self {
        let mut opts = opts;
        let budget = ByteBudget::new(opts.memory_budget);
        // A file up to the threshold is read whole into memory: one past the budget would
        // take as much as the job made it (a 200 GB sparse file, and the agent aborts).
        opts.multipart_threshold = opts.multipart_threshold.min(budget.limit());
        let staging = Arc::from(format!("staging/{job_id}"));
        let holes = HoleBudget::new(opts.hole_budget);
        let shared = HoleBudget::new(opts.shared_budget);
        Uploader {
            store,
            opts: Arc::new(opts),
            budget,
            journal_dir,
            attempt_tag: Arc::from(""),
            kept: Default::default(),
            unjournaled: Default::default(),
            staging,
            staged: Default::default(),
            owners: Default::default(),
            root: None,
            reader: None,
            known: Arc::new(crate::known::KnownBlobs::none()),
            added_log: None,
            prehashed: Default::default(),
            inodes: Default::default(),
            holes,
            shared,
        }
    }

    /// The same uploader with `bytes` of holes to read instead of the options' budget.
    #[cfg(test)]
    fn holes_up_to(mut self, bytes: u64) -> Self {
        self.holes = HoleBudget::new(bytes);
        self
    }

    /// What the blobs recorded as added (by this attempt's agents) add up to, if recorded.
    pub fn added_bytes(&self) -> Option<u64> {
        self.added_log.as_ref().and_then(added::AddedLog::bytes)
    }

    /// Journal and staging names of `attempt` (see `Uploader::attempt_tag`).
    pub fn for_attempt(mut self, attempt: u32) -> Self {
        self.attempt_tag = Arc::from(format!("{attempt}-"));
        self
    }

    /// Blobs this uploader adds are recorded in `path` (see [`added_bytes`]).
    pub fn recording_added(mut self, path: PathBuf) -> Self {
        self.added_log = Some(added::AddedLog::new(&path));
        self
    }

    /// This uploader with no inode read of another's to reuse: the final sync's, whose
    /// reads of a hard-linked file on tmpfs must not be answered by live sync's read of the
    /// same stamp (a store through a mapping moves none there).
    pub fn without_inode_reads(mut self) -> Self {
        self.inodes = Default::default();
        self
    }

    /// The same uploader (budget, staging, owners shared) with `opts`: the final sync's.
    pub fn with_options(mut self, opts: UploadOptions) -> Self {
        self.opts = Arc::new(opts);
        self
    }

    /// The node's record of stored blobs (see [`crate::known`]).
    pub fn knowing(mut self, known: Arc<crate::known::KnownBlobs>) -> Self {
        self.known = known;
        self
    }

    /// Only files `reader` could read itself are uploaded (checked on the open fd).
    pub fn readable_by(mut self, reader: Option<JobReader>) -> Self {
        self.reader = reader.map(Arc::new);
        self
    }

    /// Files below `workdir` are opened without following any symlink (see [`crate::confine`]).
    pub fn confined_to(mut self, workdir: &Path) -> Self {
        self.root = Some(Arc::from(workdir));
        self
    }

    /// Opens the version of the file that `before` describes (see [`open_confined`]), off
    /// the reactor: the open walks the path a directory at a time (openat2, fstat, ACLs), and
    /// `dense` (holes judged, [`ensure_dense`]) may take thousands of `SEEK_DATA` looks, a
    /// round trip each on NFS, with a final sync running 8 per CPU of them at once.
    async fn open(&self, path: &Path, before: FileStamp, dense: bool) -> Result<File, UploadError> {
        let (root, reader, p) = (self.root.clone(), self.reader.clone(), path.to_path_buf());
        blocking(path, move || {
            let file = open_confined(root.as_deref(), reader.as_deref(), &p, before)?;
            if dense {
                ensure_dense(&file, &p, before.size)?;
            }
            Ok(file)
        })
        .await
    }

    pub fn store(&self) -> &BlobStore {
        &self.store
    }

    pub fn options(&self) -> &UploadOptions {
        &self.opts
    }

    pub fn budget(&self) -> &ByteBudget {
        &self.budget
    }

    /// Waits until `bytes` more may be sent to the store (at once without a bandwidth limit).
    ///
    /// Called before the budget for those bytes is acquired and before they are read, never
    /// while holding budget for them: a slow limit then keeps the bytes on disk rather than
    /// pinning memory other uploads could use, and budget and tokens are never waited for
    /// while the other is held by the same upload (the token wait depends on time alone, so
    /// this is no deadlock either way, but it stays so if either changes). Budget held by
    /// parts already in flight is released when the store has them, whatever the bucket says.
    async fn pace(&self, bytes: u64) {
        if let Some(limit) = &self.opts.bandwidth_limit {
            limit.take(bytes).await;
        }
    }

    fn record_added(&self, digests: &Digests) {
        if let Some(log) = &self.added_log {
            log.record(digests);
        }
    }

    /// Hashes ahead the whole parts of a large file the job is still writing (nothing is
    /// uploaded: a file is sent only once closed and settled). When it is, only the unread
    /// tail is hashed, so the key is known almost at once. Whole parts only, at most
    /// `PREHASH_STEP` per call; S3/GCS/Azure only (the file store reads a file once anyway).
    pub async fn prehash(&self, file: &LocalFile) {
        let stamp = file.stamp;
        let part_size = self.opts.min_part_size.max(1);
        // A file over `max_file_bytes` is never uploaded: reading it ahead would read (a
        // job's sparse 80 GB file, again under each new inode) for nothing.
        if self.store.is_local()
            || stamp.size <= self.opts.multipart_threshold
            || stamp.size > self.opts.max_file_bytes
            || part_size_for(stamp.size, self.opts.min_part_size) != part_size
        {
            return;
        }
        let key = (stamp.dev, stamp.ino);
        let ahead = {
            let mut map = self.prehashed.lock().unwrap_or_else(|p| p.into_inner());
            // Growing counts as busy, whole parts hashed or not (a file stopped at its first
            // hole while parallel writers fill it).
            if let Some(a) = map.get_mut(&key).filter(|a| stamp.size > a.size) {
                (a.size, a.at) = (stamp.size, std::time::Instant::now());
            }
            if !map.contains_key(&key) && map.len() >= MAX_PREHASHED {
                map.retain(|_, a| a.at.elapsed() < PREHASH_IDLE);
                if map.len() >= MAX_PREHASHED {
                    return;
                }
            }
            map.get(&key).map(|a| a.state.clone())
        };
        let mut state = ahead.unwrap_or_else(|| multipart::PartHasher::new(part_size));
        let target = (stamp.size / part_size * part_size).min(state.hashed() + PREHASH_STEP);
        if target <= state.hashed() {
            return;
        }
        let path = file.abs.clone();
        let shown = path.clone();
        let (root, reader, shared) = (self.root.clone(), self.reader.clone(), self.shared.clone());
        // Its buffer is held from the budget, as pass 1's is.
        let hashing = self.budget.acquire(HASH_BUF as u64).await;
        // The open too is off the reactor: it walks the path a directory at a time, and the
        // hole's look may be a round trip each on a network file system.
        let done = blocking(&path, move || {
            let _hashing = hashing;
            let opened = open_confined(root.as_deref(), reader.as_deref(), &shown, stamp)?;
            // Shared extents are charged as an upload charges them: hashed ahead for free,
            // a job's 64 `cp --reflink` copies of one checkpoint, each touched again and
            // again, had root read them all past the attempt's shared budget.
            judge_shared(&shared, &opened, &shown, &stamp)?;
            // Up to the first hole only: a hole in a file still being written is most often
            // a stretch a parallel writer has yet to fill (its zeros would be hashed for
            // nothing), and holes read here would be read for no upload, with nothing to
            // count them against: a file deleted or filled before its upload stores none.
            // The upload reads (and counts) what holes the file still has.
            let target =
                target.min(first_hole(&opened, state.hashed(), stamp.size) / part_size * part_size);
            if target <= state.hashed() {
                return Ok(None);
            }
            let mut buf = vec![0u8; HASH_BUF];
            while state.hashed() < target {
                let at = state.hashed();
                let want = (target - at).min(HASH_BUF as u64) as usize;
                let n = std::os::unix::fs::FileExt::read_at(&opened, &mut buf[..want], at)
                    .map_err(|source| UploadError::Read {
                        path: shown.clone(),
                        source,
                    })?;
                if n == 0 {
                    break;
                }
                state.update(&buf[..n]);
            }
            // Shorter than it was (truncated as it was read): nothing worth keeping.
            if !state.whole_parts() {
                return Err(UploadError::Changed { path: shown });
            }
            Ok(Some(state))
        })
        .await;
        if let Ok(Some(state)) = done {
            let mut map = self.prehashed.lock().unwrap_or_else(|p| p.into_inner());
            // The cap again: others stored theirs while this one read.
            if map.contains_key(&key) || map.len() < MAX_PREHASHED {
                let (size, at) = (stamp.size, std::time::Instant::now());
                map.insert(key, Ahead { state, size, at });
            }
        }
    }

    /// The file's prefix hashed ahead, if any (taken: a retry after "changed" starts over).
    fn take_prehashed(&self, stamp: FileStamp) -> Option<multipart::Prehashed> {
        let mut map = self.prehashed.lock().unwrap_or_else(|p| p.into_inner());
        let ahead = map.remove(&(stamp.dev, stamp.ino)).map(|a| a.state);
        if let Some(a) = &ahead {
            tracing::debug!(
                hashed_ahead = a.hashed(),
                size = stamp.size,
                "hashed while written: only the tail is left"
            );
        }
        ahead
    }

    /// The digests of `file` in the version its stamp describes, read and hashed here (as
    /// the job's user may read it), nothing sent: whether a version the book holds at this
    /// stamp is still the file's where a stamp does not tell ([`crate::sync`]'s tmpfs rule).
    pub async fn digests_of(
        &self,
        file: &LocalFile,
    ) -> Result<crate::digest::Digests, UploadError> {
        let opened = self.open(&file.abs, file.stamp, false).await?;
        let (root, path, stamp) = (self.root.clone(), file.abs.clone(), file.stamp);
        blocking(&file.abs, move || {
            let mut hasher = crate::digest::DualHasher::new();
            let mut buf = vec![0u8; crate::digest::PIECE];
            // One byte past the size: a file that grew is "changed", not read on.
            let mut rest = opened.take(stamp.size + 1);
            loop {
                let n = fill(&mut rest, &mut buf).map_err(|e| read_error(&path, e))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            if hasher.size() != stamp.size {
                return Err(UploadError::Changed { path });
            }
            ensure_unchanged(root.as_deref(), &path, stamp)?;
            Ok(hasher.finish())
        })
        .await
    }

    /// Uploads `file` as a blob. `Changed` means a later attempt should see a settled version.
    /// The version read is whatever the file holds now, not necessarily `file.stamp`'s.
    pub async fn upload(&self, file: &LocalFile) -> Result<Uploaded, UploadError> {
        self.upload_version(file, Version::Current, false).await
    }

    /// [`Uploader::upload`] of the version `file.stamp` describes and no other: `Changed`
    /// when the file's stamp is another by the time it is read. Live sync looked at that
    /// version (settled, open for writing and mapped shared-writable by none of the job's
    /// processes) and may only send what it looked at: a job that maps the file right after
    /// that look and stores through the mapping moves its mtime at the first store, and
    /// the upload read that version, which nothing had looked at; stores to the same dirty
    /// page after the read leave the stamp as it was, so the final scan took the live
    /// version as current and the complete manifest listed bytes the file no longer held.
    pub async fn upload_as_seen(&self, file: &LocalFile) -> Result<Uploaded, UploadError> {
        self.upload_version(file, Version::Seen, false).await
    }

    /// [`Uploader::upload_as_seen`]; `held`: the job holds the file open for writing or maps
    /// it writable, so its read is not kept for the inode's other links. Kept, a store to a
    /// page already dirty after the read moved no stamp, and a later upload of either link
    /// took the kept bytes as the file's, settled.
    pub async fn upload_as_seen_held(
        &self,
        file: &LocalFile,
        held: bool,
    ) -> Result<Uploaded, UploadError> {
        self.upload_version(file, Version::Seen, held).await
    }

    async fn upload_version(
        &self,
        file: &LocalFile,
        version: Version,
        held: bool,
    ) -> Result<Uploaded, UploadError> {
        // One upload of an inode at a time: its other links wait, then find it read.
        let slot = self.inode_slot(file.stamp.dev, file.stamp.ino);
        let mut last = slot.lock().await;
        if let Some(read) = *last {
            if read.stamp == file.stamp {
                let (root, path) = (self.root.clone(), file.abs.clone());
                let now = blocking(&file.abs, move || stat(root.as_deref(), &path)).await?;
                // Still that inode in that version: the bytes read are this file's. Settled
                // too: the read was kept only if its ctime was past the racy window, so any
                // change since would have left another stamp.
                if now == read.stamp {
                    return Ok(Uploaded {
                        rel: file.rel.clone(),
                        digests: read.digests,
                        stamp: now,
                        new_bytes: 0,
                        racy: false,
                        judged_ns: read.judged_ns,
                    });
                }
            }
        }
        let up = self.upload_read(file, version).await;
        *last = match &up {
            // A racy version may hold bytes its stamp does not tell: read each link again.
            // Judged by the ctime (see `Racy::ctime`), so a future mtime does not make it so.
            // An inode of one link has no other path in this version (a new link, or a
            // rename, changes its ctime): its read is of no use to keep.
            Ok((up, links, racy))
                if *links > 1
                    && !held
                    && !racy.ctime
                    && (up.stamp.dev, up.stamp.ino) == (file.stamp.dev, file.stamp.ino) =>
            {
                Some(InodeRead {
                    stamp: up.stamp,
                    digests: up.digests,
                    judged_ns: up.judged_ns,
                })
            }
            _ => None,
        };
        let kept = last.is_some();
        drop(last);
        if !kept {
            self.drop_inode_slot(file.stamp.dev, file.stamp.ino, slot);
        }
        up.map(|(up, _, _)| up)
    }

    /// Forgets an inode's slot that holds no read and that no other upload holds or waits
    /// for: a job's many files of one link each cost the map nothing once uploaded.
    fn drop_inode_slot(&self, dev: u64, ino: u64, slot: InodeSlot) {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        // Slots are only handed out under this lock: two holders are the map and `slot`.
        let unused = inodes.get(&(dev, ino)).is_some_and(|s| {
            Arc::ptr_eq(s, &slot)
                && Arc::strong_count(&slot) == 2
                && s.try_lock().is_ok_and(|read| read.is_none())
        });
        if unused {
            inodes.remove(&(dev, ino));
        }
    }

    /// The lock and last read of one inode (see `Uploader::inodes`).
    fn inode_slot(&self, dev: u64, ino: u64) -> InodeSlot {
        let mut inodes = self.inodes.lock().unwrap_or_else(|p| p.into_inner());
        if inodes.len() >= MAX_INODES && !inodes.contains_key(&(dev, ino)) {
            inodes.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        inodes.entry((dev, ino)).or_default().clone()
    }

    /// Reads, hashes and stores one file; also the inode's link count when it was read, and
    /// how racy the read was.
    async fn upload_read(
        &self,
        file: &LocalFile,
        version: Version,
    ) -> Result<(Uploaded, u64, Racy), UploadError> {
        let path = file.abs.clone();
        self.within_max(&path, file.stamp.size)?;
        let expect = match version {
            Version::Current => None,
            Version::Seen => Some(file.stamp),
        };
        // Most files (by count) are small: one trip to the blocking pool stats, opens, reads,
        // hashes and re-stats it, with budget held for the size the scan saw.
        if file.stamp.size <= self.opts.multipart_threshold {
            if let Some(((before, links), digests, new, racy)) =
                self.upload_small(&path, file.stamp.size, expect).await?
            {
                return Ok((self.uploaded(file, before, digests, new, racy), links, racy));
            }
        }
        let looked = now_ns();
        // Off the reactor, as the small files' look is: on an NFS server that stopped
        // answering, each large upload's stat held a runtime thread, and enough of them held
        // every timer (the stop deadline, the job's own end).
        let (before, links) = {
            let (root, p) = (self.root.clone(), path.clone());
            blocking(&path, move || stat_linked(root.as_deref(), &p)).await?
        };
        // The large paths read `before` and prove at the end that the stamp stayed it.
        if expect.is_some_and(|seen| seen != before) {
            return Err(UploadError::Changed { path });
        }
        self.within_max(&path, before.size)?;
        if before.size > self.opts.multipart_threshold {
            // On an fd of its own: the large paths open `before` again, and the stamp proves
            // at the end that they read what was judged here.
            let (root, reader, p) = (self.root.clone(), self.reader.clone(), path.clone());
            let (holes, shared) = (self.holes.clone(), self.shared.clone());
            blocking(&path, move || {
                let file = open_confined(root.as_deref(), reader.as_deref(), &p, before)?;
                judge_holes(&holes, &file, &p, &before)?;
                judge_shared(&shared, &file, &p, &before)
            })
            .await?;
        }
        let (digests, new) = if before.size <= self.opts.multipart_threshold {
            // Grew since the scan, still small: once more with budget for this size.
            match self.upload_small(&path, before.size, expect).await? {
                Some(((before, links), digests, new, racy)) => {
                    return Ok((self.uploaded(file, before, digests, new, racy), links, racy))
                }
                None => return Err(UploadError::Changed { path }),
            }
        } else if self.store.is_local() {
            // Run again whole on a transient store failure (an EIO or a timeout from an NFS
            // or Lustre file store), as one store call is: one blip failed a large file.
            let staged = self
                .store
                .retrying_whole(|| async {
                    self.upload_staged(&path, before)
                        .await
                        .map_err(|e| match e {
                            UploadError::Store { source, .. } => Err(source),
                            own => Ok(own),
                        })
                })
                .await
                .map_err(|source| UploadError::Store {
                    path: path.clone(),
                    source,
                })?;
            staged?
        } else {
            let up = self.upload_large(&path, before).await?;
            self.known.insert(&up.0.sha256);
            up
        };
        let racy = Racy::as_of(&before, looked);
        Ok((self.uploaded(file, before, digests, new, racy), links, racy))
    }

    fn within_max(&self, path: &Path, size: u64) -> Result<(), UploadError> {
        if size > self.opts.max_file_bytes {
            return Err(UploadError::TooLarge {
                path: path.into(),
                size,
                max: self.opts.max_file_bytes,
            });
        }
        Ok(())
    }

    fn uploaded(
        &self,
        file: &LocalFile,
        before: FileStamp,
        digests: Digests,
        new: bool,
        racy: Racy,
    ) -> Uploaded {
        if new {
            self.record_added(&digests);
        }
        Uploaded {
            rel: file.rel.clone(),
            digests,
            racy: racy.any,
            // When the stamp was taken: a second read settles it only if its own look came
            // past any tick a change could share with this one's.
            judged_ns: racy.at,
            stamp: before,
            new_bytes: if new { digests.size } else { 0 },
        }
    }

    /// Uploads a file of at most `budgeted` bytes in one PUT; `None` when it has grown past
    /// that (nothing was read). `Changed` when its stamp is not `expect` (when given).
    async fn upload_small(
        &self,
        path: &Path,
        budgeted: u64,
        expect: Option<FileStamp>,
    ) -> Result<Option<((FileStamp, u64), Digests, bool, Racy)>, UploadError> {
        // The PUT body is the file: at most `budgeted` bytes (a grown file is not sent).
        self.pace(budgeted).await;
        let guard = self.budget.acquire(budgeted).await;
        let p = path.to_path_buf();
        let (root, reader) = (self.root.clone(), self.reader.clone());
        let (holes, shared) = (self.holes.clone(), self.shared.clone());
        let read = blocking(path, move || {
            let looked = now_ns();
            let (before, links) = stat_linked(root.as_deref(), &p)?;
            if expect.is_some_and(|seen| seen != before) {
                return Err(UploadError::Changed { path: p });
            }
            if before.size > budgeted {
                return Ok(None);
            }
            let file = open_confined(root.as_deref(), reader.as_deref(), &p, before)?;
            judge_holes(&holes, &file, &p, &before)?;
            judge_shared(&shared, &file, &p, &before)?;
            let mut buf = Vec::with_capacity(before.size as usize);
            // One byte past the size: a file that grew (or was swapped for a huge sparse one)
            // is "changed", never read into memory.
            file.take(before.size + 1)
                .read_to_end(&mut buf)
                .map_err(|source| read_error(&p, source))?;
            if buf.len() as u64 != before.size {
                return Err(UploadError::Changed { path: p });
            }
            ensure_unchanged(root.as_deref(), &p, before)?;
            let racy = Racy::as_of(&before, looked);
            Ok(Some((
                (before, links),
                crate::digest::digest_bytes(&buf),
                Bytes::from(buf),
                racy,
            )))
        })
        .await?;
        let Some(((before, links), digests, bytes, racy)) = read else {
            return Ok(None);
        };
        let sha = digests.sha256_hex();
        // A blob already stored costs one HEAD, not its body again.
        let head_first = !self.store.is_local()
            && (before.size >= HEAD_FIRST_BYTES || self.known.contains(&digests.sha256));
        let present = head_first
            && self
                .store
                .blob_exists(&sha, before.size)
                .await
                .map_err(store_err(path))?;
        let new = if present {
            false
        } else {
            self.store
                .put_blob(&sha, bytes)
                .await
                .map_err(store_err(path))?
        };
        drop(guard);
        self.known.insert(&digests.sha256);
        Ok(Some(((before, links), digests, new, racy)))
    }
}

mod added;
mod multipart;
mod staged;
mod subtree;

#[cfg(test)]
mod tests {
    use super::multipart::hash_file;
    use super::*;
    use crate::statedir::write_atomic;
    use c3_proto::MultipartRecord;
    use tokio::task::JoinSet;

    fn stamp_at(ns: i64) -> FileStamp {
        FileStamp {
            size: 1,
            mtime_ns: ns,
            ctime_ns: ns,
            ino: 1,
            dev: 1,
            mode: 0o100644,
        }
    }

    /// FAT keeps even seconds, for the ctime too: a same-size rewrite 1.3 s after the first
    /// write (the default settle is 1 s) left the stamp as it was, and a read 1.1 s after an
    /// even second was taken as settled. Whole odd seconds keep the one-second window.
    #[test]
    fn even_whole_seconds_are_racy_for_two_seconds() {
        let two = 2_000_000_000;
        let now = now_ns();
        // The latest even second at least 1.1 s ago: 1.1 to 3.1 s ago. Past 2 s, the next
        // one, once it is 1.1 s ago.
        let mut even = (now - 1_100_000_000).div_euclid(two) * two;
        if now - even >= two {
            even += two;
            let wait = 1_100_000_000 - (now - even);
            std::thread::sleep(std::time::Duration::from_nanos(wait.max(0) as u64));
        }
        let ago = now_ns() - even;
        assert!((1_050_000_000..2_050_000_000).contains(&ago), "{ago}");
        assert!(racy(&stamp_at(even)), "{ago} ns after an even second");
        assert!(!racy(&stamp_at(even - 3_000_000_000)));
        assert_eq!(settle_apart_ns(&stamp_at(even)), SETTLE_APART_NS);
        assert_eq!(
            settle_apart_ns(&stamp_at(even + 1_000_000_000)),
            1_050_000_000
        );
    }

    /// A read is judged racy as of its first look, not its end: a change in the tick the
    /// ctime holds, made while a long read ran, leaves the stamp as it was, and judged at
    /// the end of a read of over 50 ms the version was taken as settled.
    #[test]
    fn a_read_is_judged_as_of_its_first_look() {
        let looked = now_ns();
        let stamp = FileStamp {
            mtime_ns: looked - 10_000_000,
            ctime_ns: looked - 10_000_000 + 1,
            ..stamp_at(0)
        };
        std::thread::sleep(std::time::Duration::from_millis(120));
        let judged = Racy::as_of(&stamp, looked);
        assert!(judged.any && judged.ctime);
        assert_eq!(judged.at, looked);
        assert!(!Racy::as_of(&stamp, now_ns()).any, "the window is 50 ms");
    }

    #[test]
    fn the_final_sync_may_use_the_whole_host_unless_configured() {
        let live = UploadOptions::default();
        let end = live.at_end();
        assert!(end.files_in_flight >= live.files_in_flight);
        assert!(end.files_in_flight >= 8, "{}", end.files_in_flight);
        assert!(end.parts_in_flight >= live.parts_in_flight && end.parts_in_flight <= 32);
        assert_eq!(
            end.memory_budget, live.memory_budget,
            "the one limit on bytes held"
        );
        let fixed = UploadOptions {
            files_in_flight: 3,
            auto_in_flight: false,
            ..UploadOptions::default()
        };
        assert_eq!(fixed.at_end().files_in_flight, 3, "a configured value wins");
    }

    #[test]
    fn part_sizes_fit_five_tib() {
        let min = 8 * MIB;
        assert_eq!(part_size_for(1, min), min);
        assert_eq!(part_size_for(78 * 1024 * MIB, min), min);
        assert_eq!(part_size_for(80 * 1024 * MIB, min), 9 * MIB);
        let five_tib = 5 * 1024 * 1024 * MIB;
        let p = part_size_for(five_tib, min);
        assert!(five_tib.div_ceil(p) <= MAX_PARTS, "{p}");
        assert_eq!(p % MIB, 0);
        assert!(p <= 5 * 1024 * MIB, "S3 parts are at most 5 GiB");
    }

    fn file_of(dir: &Path, name: &str, len: usize, seed: u8) -> (LocalFile, Vec<u8>) {
        let path = dir.join(name);
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        std::fs::write(&path, &data).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&path).unwrap());
        (
            LocalFile {
                rel: format!("artifacts/{name}"),
                abs: path,
                stamp,
            },
            data,
        )
    }

    /// The read of an inode is kept for its other links only when it has some: a job's
    /// many files of one link each leave nothing in `Uploader::inodes`.
    #[tokio::test]
    async fn only_an_inode_of_several_links_keeps_its_read() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            crate::store::StoreConfig::for_tests(&format!("file://{}/store", dir.path().display()));
        let up = Uploader::new(
            BlobStore::open(&config).unwrap(),
            UploadOptions::default(),
            "j",
            None,
        );
        let (a, _) = file_of(dir.path(), "a", 100, 1);
        let (mut b, _) = file_of(dir.path(), "b", 100, 2);
        std::fs::hard_link(&b.abs, dir.path().join("c")).unwrap();
        restamp(&mut b);
        let c = LocalFile {
            rel: "artifacts/c".into(),
            abs: dir.path().join("c"),
            stamp: b.stamp,
        };
        // Past the racy window: a racy read is never kept.
        tokio::time::sleep(std::time::Duration::from_millis(60)).await;
        up.upload(&a).await.unwrap();
        let read = up.upload(&b).await.unwrap();
        let kept: Vec<_> = up.inodes.lock().unwrap().keys().copied().collect();
        assert_eq!(kept, vec![(b.stamp.dev, b.stamp.ino)]);
        let linked = up.upload(&c).await.unwrap();
        assert_eq!((linked.digests, linked.new_bytes), (read.digests, 0));
    }

    /// A job writes 4 KiB every 8 KiB for 10,001 extents (40 MiB of disk), past the extents
    /// that are counted, then `truncate -s 5T`: the rest is judged by the bytes allocated, not
    /// taken as data, and the file is refused as mostly holes rather than hashed twice and
    /// sent, 5 TiB of zeros. A dense file is all data.
    #[test]
    fn holes_past_the_counted_extents_are_still_holes() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extents");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let block = [7u8; 4096];
        for i in 0..10_001u64 {
            file.write_all_at(&block, i * 8192).unwrap();
        }
        let size = MAX_FILE_BYTES;
        file.set_len(size).unwrap();
        let judged = ensure_dense(&file, &path, size);
        assert!(
            matches!(judged, Err(UploadError::Sparse { data, .. }) if data < 64 * MIB),
            "{judged:?}"
        );
        let (dense, _) = file_of(dir.path(), "dense", 100_000, 1);
        let opened = File::open(&dense.abs).unwrap();
        assert_eq!(data_bytes(&opened, 100_000), 100_000);
    }

    /// A sparse file of `len` bytes with a 4 KiB header unique to `seed`: 4 KiB of disk.
    fn sparse_of(dir: &Path, name: &str, len: u64, seed: u8) -> LocalFile {
        let path = dir.join(name);
        let file = File::create(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[seed; 4096], 0).unwrap();
        file.set_len(len).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&path).unwrap());
        LocalFile {
            rel: format!("artifacts/{name}"),
            abs: path,
            stamp,
        }
    }

    /// Each sparse file costs the job 4 KiB of disk and the agent its whole size to read, hash
    /// and store: the job's holes have a budget, shared by its uploads, small and large. The
    /// first files fit and are stored; once it is spent a file with holes is refused by name
    /// (for good), while one with a few holes and a file already drawn for (read again, or
    /// another link) still are stored.
    #[tokio::test]
    async fn sparse_files_past_the_jobs_hole_budget_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let large =
            Uploader::new(BlobStore::in_memory(), small_parts(), "j", None).holes_up_to(10 * MIB);
        let a = sparse_of(dir.path(), "a", 4 * MIB, 1);
        let b = sparse_of(dir.path(), "b", 4 * MIB, 2);
        for file in [&a, &b] {
            let up = large.upload(file).await.unwrap();
            assert_eq!(up.new_bytes, 4 * MIB, "{}", file.rel);
        }
        let c = sparse_of(dir.path(), "c", 4 * MIB, 3);
        let refused = large.upload(&c).await;
        match &refused {
            Err(e @ UploadError::HolesSpent { path, .. }) => {
                assert!(e.is_for_good() && !e.is_retryable());
                assert_eq!(path, &c.abs);
                assert!(e.to_string().contains("c is a sparse file"), "{e}");
                // The file system may have made the holes of zeros the job wrote out: the
                // message names the setting, and asks for no rewrite.
                let shown = e.to_string();
                for part in ["upload.hole_budget_bytes", "10.0 MiB", "ZFS"] {
                    assert!(shown.contains(part), "{part}: {shown}");
                }
                assert!(!shown.contains("densely"), "{shown}");
            }
            other => panic!("{other:?}"),
        }
        let few = sparse_of(dir.path(), "few", HOLE_SLACK + 4096, 4);
        large.upload(&few).await.unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&a.abs)
            .unwrap()
            .set_len(7 * MIB)
            .unwrap();
        let mut grown = a.clone();
        restamp(&mut grown);
        let again = large.upload(&grown).await;
        assert!(
            matches!(again, Err(UploadError::HolesSpent { .. })),
            "a file grows past what it drew and the budget: {again:?}"
        );
        std::fs::OpenOptions::new()
            .write(true)
            .open(&a.abs)
            .unwrap()
            .set_len(4 * MIB)
            .unwrap();
        restamp(&mut grown);
        large.upload(&grown).await.unwrap();

        // A small file (one read into memory) draws from the budget too.
        let small = Uploader::new(BlobStore::in_memory(), UploadOptions::default(), "j", None)
            .holes_up_to(10 * MIB);
        let d = sparse_of(dir.path(), "d", 8 * MIB, 5);
        small.upload(&d).await.unwrap();
        let e = sparse_of(dir.path(), "e", 8 * MIB, 6);
        let refused = small.upload(&e).await;
        assert!(
            matches!(refused, Err(UploadError::HolesSpent { .. })),
            "{refused:?}"
        );
    }

    /// A parallel writer fills a 40 MiB file out of order: live sync hashes it ahead while a
    /// 6 MiB stretch is still a hole. Hashing ahead stops at the hole (it reads no holes, and
    /// draws none), so once the file is whole and stored the job's budget is all there for
    /// a sparse file later.
    #[tokio::test]
    async fn holes_hashed_ahead_and_filled_later_draw_nothing() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let up =
            Uploader::new(BlobStore::in_memory(), small_parts(), "j", None).holes_up_to(8 * MIB);
        let path = dir.path().join("ckpt");
        let written = File::create(&path).unwrap();
        let data: Vec<u8> = (0..40 * MIB as usize).map(|i| (i % 253) as u8).collect();
        let (hole, after) = (10 * MIB as usize, 16 * MIB as usize);
        written.write_all_at(&data[..hole], 0).unwrap();
        written.write_all_at(&data[after..], after as u64).unwrap();
        let mut file = LocalFile {
            rel: "artifacts/ckpt".into(),
            abs: path.clone(),
            stamp: FileStamp::of(&std::fs::metadata(&path).unwrap()),
        };
        assert!(
            data_bytes(&written, 40 * MIB) <= 34 * MIB,
            "the hole is one"
        );
        up.prehash(&file).await;
        let ahead = up
            .prehashed
            .lock()
            .unwrap()
            .values()
            .map(|p| p.state.hashed())
            .max();
        assert_eq!(
            ahead,
            Some(hole as u64),
            "hashed ahead up to the hole, no further"
        );
        written
            .write_all_at(&data[hole..after], hole as u64)
            .unwrap();
        drop(written);
        restamp(&mut file);
        let done = up.upload(&file).await.unwrap();
        assert_eq!(done.digests.sha256_hex(), crate::digest::sha256_hex(&data));
        let sparse = sparse_of(dir.path(), "sparse", 4 * MIB, 1);
        let stored = up.upload(&sparse).await;
        assert!(stored.is_ok(), "the transient hole was drawn: {stored:?}");
    }

    /// An inode's holes are those of its latest version read: one stored sparse and then
    /// written out (or stored again with fewer holes) gives back what it drew, so the
    /// budget holds what the attempt stores, not each state a file passed through. What is
    /// given back is at most the budget again: a job that makes one file sparse and dense in
    /// turn has its holes read twice the budget at most, then refused.
    #[tokio::test]
    async fn a_file_read_again_with_fewer_holes_gives_them_back_up_to_the_budget() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let up =
            Uploader::new(BlobStore::in_memory(), small_parts(), "j", None).holes_up_to(8 * MIB);
        let dense = |file: &mut LocalFile, seed: u8| {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&file.abs)
                .unwrap();
            f.write_all_at(&vec![seed; 4 * MIB as usize], 0).unwrap();
            restamp(file);
        };
        let mut a = sparse_of(dir.path(), "a", 4 * MIB, 1);
        up.upload(&a).await.unwrap();
        dense(&mut a, 2);
        up.upload(&a).await.unwrap();
        for (name, seed) in [("b", 3), ("c", 4)] {
            let file = sparse_of(dir.path(), name, 4 * MIB, seed);
            let stored = up.upload(&file).await;
            assert!(
                stored.is_ok(),
                "{name}: a's holes were not given back: {stored:?}"
            );
        }

        // One file, sparse and dense in turn.
        let up =
            Uploader::new(BlobStore::in_memory(), small_parts(), "j", None).holes_up_to(8 * MIB);
        let holes = 4 * MIB - 4096;
        let mut read = 0;
        let mut x = sparse_of(dir.path(), "x", 4 * MIB, 10);
        for turn in 0..20u8 {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&x.abs)
                .unwrap();
            f.set_len(0).unwrap();
            f.write_all_at(&[turn; 4096], 0).unwrap();
            f.set_len(4 * MIB).unwrap();
            restamp(&mut x);
            match up.upload(&x).await {
                Ok(_) => read += holes,
                Err(UploadError::HolesSpent { .. }) => break,
                Err(e) => panic!("{e:?}"),
            }
            dense(&mut x, 100 + turn);
            up.upload(&x).await.unwrap();
        }
        assert!(read > 8 * MIB, "nothing was given back: {read}");
        assert!(read <= 16 * MIB, "holes read past twice the budget: {read}");
    }

    /// A job sets its file's mtime a year ahead (`touch -d +1year`) and links it 10,000 times:
    /// the mtime is racy for ever, but the ctime (which the job cannot set) is not, so the
    /// inode's read is kept and each other link costs a stat, not a read of the whole file.
    /// Small and large (multipart) files alike.
    #[tokio::test]
    async fn a_future_mtime_does_not_make_each_link_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploader::new(BlobStore::in_memory(), small_parts(), "j", None);
        for (name, len) in [("small", 100), ("large", 3 * MIB as usize)] {
            let (mut first, _) = file_of(dir.path(), name, len, 3);
            let year = std::time::Duration::from_secs(365 * 24 * 3600);
            std::fs::File::options()
                .write(true)
                .open(&first.abs)
                .unwrap()
                .set_modified(std::time::SystemTime::now() + year)
                .unwrap();
            let other = dir.path().join(format!("{name}-link"));
            std::fs::hard_link(&first.abs, &other).unwrap();
            restamp(&mut first);
            let link = LocalFile {
                rel: format!("artifacts/{name}-link"),
                abs: other,
                stamp: first.stamp,
            };
            // Past the racy window of the ctime; the mtime stays racy.
            tokio::time::sleep(std::time::Duration::from_millis(60)).await;
            let read = up.upload(&first).await.unwrap();
            assert!(read.racy, "{name}: a future mtime is racy for the book");
            let key = (first.stamp.dev, first.stamp.ino);
            let kept = up.inodes.lock().unwrap().get(&key).cloned();
            assert!(
                kept.is_some_and(|slot| slot.try_lock().unwrap().is_some()),
                "{name}: the inode's read was not kept for its other link"
            );
            let linked = up.upload(&link).await.unwrap();
            assert_eq!(
                (linked.digests, linked.new_bytes),
                (read.digests, 0),
                "{name}"
            );
        }
    }

    /// `upload_as_seen` sends the version its stamp names or none: a file changed since the
    /// stamp was taken, small or large, is `Changed` and nothing is stored. `upload` sends
    /// what the file holds.
    #[tokio::test]
    async fn upload_as_seen_sends_only_the_version_its_stamp_names() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploader::new(BlobStore::in_memory(), small_parts(), "j", None);
        for (name, len) in [("small", 100), ("large", 3 * MIB as usize)] {
            let (seen, _) = file_of(dir.path(), name, len, 1);
            let (_, now) = file_of(dir.path(), name, len + 1, 2);
            let before = up.store().list("blobs/", 10).await.unwrap();
            let sent = up.upload_as_seen(&seen).await;
            assert!(
                matches!(sent, Err(UploadError::Changed { .. })),
                "{name}: {sent:?}"
            );
            let stored = up.store().list("blobs/", 10).await.unwrap();
            assert_eq!(stored, before, "{name}: stored");
            let current = up.upload(&seen).await.unwrap();
            assert_eq!(current.digests, crate::digest::digest_bytes(&now), "{name}");
        }
    }

    fn restamp(file: &mut LocalFile) {
        file.stamp = FileStamp::of(&std::fs::metadata(&file.abs).unwrap());
    }

    fn small_parts() -> UploadOptions {
        UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            ..UploadOptions::default()
        }
    }

    /// On a kernel whose file times move once a tick, a rewrite of the same size within the
    /// tick of a read leaves the stamp as it was: a file read that soon after a change is read
    /// again at the next look, not taken as current; a second read that finds the same stamp
    /// and bytes settles it (a file whose mtime is in the future would stay racy otherwise).
    #[tokio::test]
    async fn a_racy_stamp_is_read_again_and_a_second_read_settles_it() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploader::new(BlobStore::in_memory(), UploadOptions::default(), "j", None);
        let (mut file, _) = file_of(dir.path(), "future", 100, 1);
        let hour = std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&file.abs)
            .unwrap()
            .set_modified(std::time::SystemTime::now() + hour)
            .unwrap();
        restamp(&mut file);
        let mut first = up.upload(&file).await.unwrap();
        assert!(first.racy);
        let mut book = crate::sync::SyncBook::default();
        book.record(first.clone());
        assert!(
            !book.is_current(&file.rel, &file.stamp),
            "a racy stamp was trusted"
        );
        book.record(up.upload(&file).await.unwrap());
        assert!(
            !book.is_current(&file.rel, &file.stamp),
            "two reads within a tick (or a second) settle nothing"
        );
        first.judged_ns -= 2 * SETTLE_APART_NS;
        book.record(first);
        book.record(up.upload(&file).await.unwrap());
        assert!(
            book.is_current(&file.rel, &file.stamp),
            "two reads of the same stamp and bytes, apart"
        );

        let stamp = |mtime_ns: i64, ctime_ns: i64| FileStamp {
            mtime_ns,
            ctime_ns,
            ..file.stamp
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        assert!(!racy(&stamp(now - 10_000_000_000, now - 10_000_000_000)));
        assert!(racy(&stamp(now - 1_000_000, now - 1_000_000)));
        // Whole seconds only (ext3, some NFS): within a second is racy too.
        let second = (now / 1_000_000_000) * 1_000_000_000;
        assert!(racy(&stamp(second, second)));
        assert!(!racy(&stamp(
            second - 5_000_000_000,
            second - 5_000_000_000
        )));
    }

    #[tokio::test]
    async fn a_file_hashed_while_written_needs_only_its_tail_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let up = Uploader::new(store.clone(), small_parts(), "j", None);
        // Two and a half parts written so far: two whole parts are hashed ahead.
        let (mut file, mut data) = file_of(dir.path(), "ckpt", 5 * MIB as usize / 2, 7);
        up.prehash(&file).await;
        let ahead = up
            .prehashed
            .lock()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .state
            .hashed();
        assert_eq!(ahead, 2 * MIB, "whole parts only");
        // The writer goes on, then closes the file.
        let more: Vec<u8> = (0..MIB as usize + 123).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&file.abs)
            .unwrap();
        std::io::Write::write_all(&mut f, &more).unwrap();
        drop(f);
        data.extend_from_slice(&more);
        restamp(&mut file);
        let done = up.upload(&file).await.unwrap();
        assert!(
            up.prehashed.lock().unwrap().is_empty(),
            "the head start was used"
        );
        assert_eq!(done.digests.sha256_hex(), crate::digest::sha256_hex(&data));
        let stored = store
            .get_bytes(&crate::store::blob_key(&done.digests.sha256_hex()))
            .await
            .unwrap();
        assert_eq!(stored.as_ref(), &data[..], "the blob hashes to its key");
    }

    /// A file over `max_file_bytes` is never uploaded, so it is never read ahead either (a
    /// job's sparse file, recreated under new inodes, was read whole each time).
    #[tokio::test]
    async fn a_file_over_the_size_limit_is_not_hashed_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let opts = UploadOptions {
            max_file_bytes: 2 * MIB,
            ..small_parts()
        };
        let up = Uploader::new(BlobStore::in_memory(), opts, "j", None);
        let (file, _) = file_of(dir.path(), "big", 5 * MIB as usize / 2, 7);
        up.prehash(&file).await;
        assert!(up.prehashed.lock().unwrap().is_empty());
        let (file, _) = file_of(dir.path(), "fits", 2 * MIB as usize, 7);
        up.prehash(&file).await;
        assert_eq!(up.prehashed.lock().unwrap().len(), 1);
    }

    /// Files hashed ahead then deleted (checkpoints rotated away) are never taken by an
    /// upload: once 64 such took every place, no file was hashed ahead for the rest of the
    /// attempt. One idle past `PREHASH_IDLE` gives its place up; busy ones keep theirs.
    #[tokio::test]
    async fn files_hashed_ahead_then_gone_give_their_places_up() {
        let dir = tempfile::tempdir().unwrap();
        let up = Uploader::new(BlobStore::in_memory(), small_parts(), "j", None);
        let long_ago = std::time::Instant::now()
            .checked_sub(PREHASH_IDLE * 2)
            .unwrap_or_else(std::time::Instant::now);
        let fill = |at: std::time::Instant| {
            let mut map = up.prehashed.lock().unwrap();
            map.clear();
            for i in 0..MAX_PREHASHED as u64 {
                let state = multipart::PartHasher::new(MIB);
                map.insert((u64::MAX, i), Ahead { state, size: 0, at });
            }
        };
        let (file, _) = file_of(dir.path(), "ckpt", 5 * MIB as usize / 2, 3);
        let key = (file.stamp.dev, file.stamp.ino);
        fill(std::time::Instant::now());
        up.prehash(&file).await;
        assert!(
            !up.prehashed.lock().unwrap().contains_key(&key),
            "busy ones keep their places"
        );
        if long_ago.elapsed() >= PREHASH_IDLE {
            fill(long_ago);
            up.prehash(&file).await;
            let map = up.prehashed.lock().unwrap();
            assert!(map.contains_key(&key), "idle ones kept every place");
            assert_eq!(map.len(), 1);
        }
    }

    #[tokio::test]
    async fn a_region_rewritten_after_it_was_hashed_is_caught_and_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let up = Uploader::new(store.clone(), small_parts(), "j", None);
        let (mut file, mut data) = file_of(dir.path(), "ckpt", 3 * MIB as usize, 9);
        up.prehash(&file).await;
        let again = rewrite_is_caught_then_stored(&up, &mut file, &mut data).await;
        // The old content is in the store already: a stale head start must not pass as it.
        let old = data.clone();
        up.prehash(&file).await;
        data[10] ^= 0xff;
        std::fs::write(&file.abs, &data).unwrap();
        let mut file2 = file.clone();
        restamp(&mut file2);
        let stale = up.upload(&file2).await;
        assert!(
            matches!(stale, Err(UploadError::Changed { .. })),
            "{stale:?}"
        );
        assert!(old != data);
        let stored = store
            .get_bytes(&crate::store::blob_key(&again.digests.sha256_hex()))
            .await
            .unwrap();
        assert!(
            stored.as_ref() == &old[..],
            "the stored blob hashes to its key"
        );
    }

    /// An earlier agent of this job sent part 0 of the content hashed ahead, journaled it
    /// (with the tag of what it sent, if `tagged`), then died; the job rewrites the file.
    async fn journaled_part_then_rewritten(tagged: bool) {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let journal = dir.path().join("journal");
        let up = Uploader::new(store.clone(), small_parts(), "j", Some(journal.clone()));
        let (mut file, mut data) = file_of(dir.path(), "ckpt", 3 * MIB as usize, 9);
        up.prehash(&file).await;
        let old_sha = crate::digest::sha256_hex(&data);
        let id = store.create_multipart(&old_sha).await.unwrap();
        let part0 = Bytes::copy_from_slice(&data[..MIB as usize]);
        let mut tag = super::subtree::PartTrees::at(MIB, 0);
        tag.update(&part0);
        let part_blake3 = if tagged {
            [(0, hex::encode(tag.finish_part()))].into()
        } else {
            Default::default()
        };
        let record = MultipartRecord {
            sha256: old_sha.clone(),
            upload_id: id.clone(),
            size: data.len() as u64,
            part_size: MIB,
            parts: [(0, store.put_part(&old_sha, &id, 0, part0).await.unwrap())].into(),
            part_blake3,
        };
        write_atomic(&journal.join(format!("{old_sha}.json")), &record.to_json()).unwrap();
        rewrite_is_caught_then_stored(&up, &mut file, &mut data).await;
    }

    /// The journaled part is checked, not taken on trust.
    #[tokio::test]
    async fn a_resumed_upload_checks_the_parts_hashed_ahead_that_it_does_not_send() {
        journaled_part_then_rewritten(false).await;
    }

    /// As above, but the earlier agent journaled the tag of what it sent: that tag is pass 1's
    /// (both come from the prefix hashed ahead), yet the file no longer holds those bytes.
    /// Kept unread, the old part would complete the old content's blob and the file would be
    /// listed with the digests of bytes it no longer has.
    #[tokio::test]
    async fn a_journaled_part_hashed_ahead_is_read_again_before_it_is_kept() {
        journaled_part_then_rewritten(true).await;
    }

    fn crc(bytes: &[u8]) -> u64 {
        crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes)
    }

    /// Changes `part` (same length) so that its CRC64 stays what it was: a CRC is affine in
    /// the data, so a set of bit flips whose effects on it XOR to zero leaves it alone. Of
    /// 128 flips in the last 16 bytes (more than the CRC's 64 bits) some set always does.
    fn keep_crc_while_changing(part: &mut [u8]) {
        let base = crc(part);
        let n = part.len();
        let mut basis: Vec<(u64, u128)> = Vec::new();
        for bit in 0..128usize {
            let at = n - 16 + bit / 8;
            part[at] ^= 1 << (bit % 8);
            let mut effect = crc(part) ^ base;
            part[at] ^= 1 << (bit % 8);
            let mut flips = 1u128 << bit;
            for (v, m) in &basis {
                if effect ^ v < effect {
                    effect ^= v;
                    flips ^= m;
                }
            }
            if effect == 0 {
                for b in (0..128usize).filter(|b| flips >> b & 1 == 1) {
                    part[n - 16 + b / 8] ^= 1 << (b % 8);
                }
                assert_eq!(crc(part), base);
                return;
            }
            basis.push((effect, flips));
            basis.sort_by_key(|b| std::cmp::Reverse(b.0));
        }
        unreachable!("129 vectors in a 64-bit space are dependent");
    }

    /// A job rewrites a part it had written (after the agent hashed it ahead) with different
    /// bytes that have the same CRC: the upload must not complete under the old content's key.
    #[tokio::test]
    async fn a_rewrite_that_keeps_the_part_crc_never_lands_under_the_old_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let up = Uploader::new(
            store.clone(),
            small_parts(),
            "j",
            Some(dir.path().join("journal")),
        );
        let (mut file, mut data) = file_of(dir.path(), "ckpt", 3 * MIB as usize, 11);
        up.prehash(&file).await;
        let old_sha = crate::digest::sha256_hex(&data);
        let before = data.clone();
        keep_crc_while_changing(&mut data[..MIB as usize]);
        assert_ne!(data, before);
        std::fs::write(&file.abs, &data).unwrap();
        restamp(&mut file);
        let first = up.upload(&file).await;
        assert!(
            matches!(first, Err(UploadError::Changed { .. })),
            "{first:?}"
        );
        assert!(
            !store
                .blob_exists(&old_sha, data.len() as u64)
                .await
                .unwrap(),
            "bytes stored under a key they do not hash to"
        );
        let again = up.upload(&file).await.unwrap();
        assert_eq!(again.digests.sha256_hex(), crate::digest::sha256_hex(&data));
    }

    /// The job seeks back and rewrites a byte of the first part (same size) after it was
    /// hashed ahead: that upload fails "changed", and the next one stores the new content.
    async fn rewrite_is_caught_then_stored(
        up: &Uploader,
        file: &mut LocalFile,
        data: &mut [u8],
    ) -> Uploaded {
        data[10] ^= 0xff;
        std::fs::write(&file.abs, &*data).unwrap();
        restamp(file);
        let first = up.upload(file).await;
        assert!(
            matches!(first, Err(UploadError::Changed { .. })),
            "{first:?}"
        );
        let again = up.upload(file).await.unwrap();
        assert_eq!(again.digests.sha256_hex(), crate::digest::sha256_hex(data));
        again
    }

    /// A file up to the threshold is read whole: a threshold past the budget is held to it,
    /// and a file past the budget is sent in parts (a 200 GB sparse file read into memory
    /// aborted the agent).
    #[tokio::test]
    async fn a_threshold_past_the_memory_budget_is_held_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let opts = UploadOptions {
            multipart_threshold: u64::MAX,
            min_part_size: MIB,
            memory_budget: 2 * MIB,
            auto_in_flight: false,
            ..UploadOptions::default()
        };
        let up = Uploader::new(store.clone(), opts, "j", Some(dir.path().join("journal")));
        assert_eq!(up.options().multipart_threshold, 2 * MIB);
        let (file, data) = file_of(dir.path(), "big", 5 * MIB as usize, 3);
        let uploaded = up.upload(&file).await.unwrap();
        assert_eq!(uploaded.digests, crate::digest::digest_bytes(&data));
        assert!(up.budget().peak() <= 2 * MIB, "peak {}", up.budget().peak());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_parts_stay_within_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let opts = UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            parts_in_flight: 16,
            files_in_flight: 4,
            memory_budget: 3 * MIB,
            bandwidth_limit: None,
            auto_in_flight: false,
            max_file_bytes: MAX_FILE_BYTES,
            hole_budget: HOLE_BUDGET,
            shared_budget: SHARED_BUDGET,
        };
        let up = Uploader::new(store.clone(), opts, "j", Some(dir.path().join("journal")));
        let mut tasks = JoinSet::new();
        for i in 0..4u8 {
            let (file, data) = file_of(dir.path(), &format!("f{i}"), 9 * MIB as usize + 7, i);
            let up = up.clone();
            tasks.spawn(async move { (up.upload(&file).await.unwrap(), data) });
        }
        while let Some(done) = tasks.join_next().await {
            let (uploaded, data) = done.unwrap();
            assert_eq!(uploaded.digests, crate::digest::digest_bytes(&data));
            let stored = store
                .get_bytes(&crate::store::blob_key(&uploaded.digests.sha256_hex()))
                .await
                .unwrap();
            assert_eq!(stored.as_ref(), &data[..]);
        }
        assert!(
            up.budget().peak() <= 3 * MIB,
            "peak {} over the budget",
            up.budget().peak()
        );
        assert!(up.budget().peak() >= MIB);
        assert_eq!(up.budget().in_use(), 0);
    }

    #[tokio::test]
    async fn a_journaled_upload_resumes_with_the_missing_parts_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let opts = UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            ..UploadOptions::default()
        };
        let journal = dir.path().join("journal");
        let up = Uploader::new(store.clone(), opts, "j", Some(journal.clone()));
        let (file, data) = file_of(dir.path(), "big", 5 * MIB as usize, 9);
        let (d, tags) = hash_file(&file.abs, File::open(&file.abs).unwrap(), MIB, None).unwrap();
        // A crashed agent's upload: created, three parts sent, journaled; one of them by an
        // older agent that kept no tag, so it is not known to hold these bytes.
        let sha = d.sha256_hex();
        let id = store.create_multipart(&sha).await.unwrap();
        let mut record = MultipartRecord {
            sha256: sha.clone(),
            upload_id: id.clone(),
            size: data.len() as u64,
            part_size: MIB,
            parts: Default::default(),
            part_blake3: Default::default(),
        };
        for idx in [0usize, 2, 3] {
            let part = Bytes::copy_from_slice(&data[idx * MIB as usize..(idx + 1) * MIB as usize]);
            record.parts.insert(
                idx as u32,
                store.put_part(&sha, &id, idx, part).await.unwrap(),
            );
            if idx != 2 {
                record
                    .part_blake3
                    .insert(idx as u32, hex::encode(tags[idx]));
            }
        }
        write_atomic(&journal.join(format!("{sha}.json")), &record.to_json()).unwrap();

        let mut journal_now = up.open_journal(&sha, data.len() as u64, MIB).await.unwrap();
        let sent = up
            .send_parts(&file.abs, file.stamp, &tags, 0, &mut journal_now)
            .await
            .unwrap();
        assert_eq!(
            sent,
            3 * MIB,
            "only the three parts not proven sent are sent"
        );
        up.complete(journal_now).await.unwrap();
        assert_eq!(
            store
                .get_bytes(&crate::store::blob_key(&sha))
                .await
                .unwrap()
                .as_ref(),
            &data[..]
        );
        assert!(!journal.join(format!("{sha}.json")).exists());
    }

    /// An earlier agent sent part 0 as the job had just rewritten it (the same CRC, so pass 2's
    /// check then could not tell), journaled it with the tag of what it sent, and died; the job
    /// put the part back. The resumed upload must not complete with the rewritten part in it.
    #[tokio::test]
    async fn a_journaled_part_of_other_bytes_is_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let journal = dir.path().join("journal");
        let up = Uploader::new(store.clone(), small_parts(), "j", Some(journal.clone()));
        let (file, data) = file_of(dir.path(), "big", 3 * MIB as usize, 5);
        let (d, _) = hash_file(&file.abs, File::open(&file.abs).unwrap(), MIB, None).unwrap();
        let sha = d.sha256_hex();
        let mut rewritten = data[..MIB as usize].to_vec();
        keep_crc_while_changing(&mut rewritten);
        let mut sent = super::subtree::PartTrees::at(MIB, 0);
        sent.update(&rewritten);
        let id = store.create_multipart(&sha).await.unwrap();
        let record = MultipartRecord {
            sha256: sha.clone(),
            upload_id: id.clone(),
            size: data.len() as u64,
            part_size: MIB,
            parts: [(
                0,
                store
                    .put_part(&sha, &id, 0, rewritten.into())
                    .await
                    .unwrap(),
            )]
            .into(),
            part_blake3: [(0, hex::encode(sent.finish_part()))].into(),
        };
        write_atomic(&journal.join(format!("{sha}.json")), &record.to_json()).unwrap();
        let done = up.upload(&file).await.unwrap();
        assert_eq!(done.digests.sha256_hex(), sha);
        let stored = store
            .get_bytes(&crate::store::blob_key(&sha))
            .await
            .unwrap();
        assert!(stored.as_ref() == &data[..], "the blob holds the content");
    }

    /// An in-memory store, an uploader journaling into `<dir>/journal`, and a multipart
    /// upload of one blob started there, as a crashed agent leaves it (not yet journaled).
    async fn journaling(dir: &Path) -> (BlobStore, PathBuf, Uploader, MultipartRecord) {
        let store = BlobStore::in_memory();
        let journal = dir.join("journal");
        let up = Uploader::new(
            store.clone(),
            UploadOptions::default(),
            "j",
            Some(journal.clone()),
        );
        let sha = "ab".repeat(32);
        let upload_id = store.create_multipart(&sha).await.unwrap();
        let record = MultipartRecord {
            sha256: sha,
            upload_id,
            size: 1,
            part_size: MIB,
            parts: Default::default(),
            part_blake3: Default::default(),
        };
        (store, journal, up, record)
    }

    #[tokio::test]
    async fn a_journal_for_other_content_or_parts_is_not_resumed() {
        async fn resumes(up: &Uploader, at: &Path, sha: &str, record: &MultipartRecord) -> bool {
            write_atomic(at, &record.to_json()).unwrap();
            up.open_journal(sha, 3 * MIB, MIB).await.unwrap().resumed
        }
        let dir = tempfile::tempdir().unwrap();
        let (store, journal, up, started) = journaling(dir.path()).await;
        let sha = started.sha256.clone();
        let sound = MultipartRecord {
            size: 3 * MIB,
            parts: [(0, "p0".to_string()), (2, "p2".to_string())].into(),
            ..started
        };
        let at = journal.join(format!("{sha}.json"));
        assert!(
            resumes(&up, &at, &sha, &sound).await,
            "a sound journal resumes"
        );
        let other_blob = MultipartRecord {
            sha256: "cd".repeat(32),
            ..sound.clone()
        };
        assert!(
            !resumes(&up, &at, &sha, &other_blob).await,
            "a journal of another blob"
        );
        let mut past_the_end = sound.clone();
        past_the_end.parts.insert(3, "p3".into());
        // One the store knows (the last one was aborted): in memory, an abort of an upload
        // it no longer knows is not a 404, and is retried to the deadline.
        past_the_end.upload_id = store.create_multipart(&sha).await.unwrap();
        assert!(
            !resumes(&up, &at, &sha, &past_the_end).await,
            "a part the file does not have"
        );
        std::fs::write(&at, b"").unwrap();
        assert!(
            !up.open_journal(&sha, 3 * MIB, MIB).await.unwrap().resumed,
            "an empty journal (a host crash before write-back)"
        );
    }

    #[tokio::test]
    async fn orphaned_uploads_are_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, journal, up, record) = journaling(dir.path()).await;
        let (sha, id) = (record.sha256.clone(), record.upload_id.clone());
        write_atomic(&journal.join(format!("{sha}.json")), &record.to_json()).unwrap();
        assert_eq!(up.abort_orphans().await, 1);
        assert!(std::fs::read_dir(&journal).unwrap().next().is_none());
        // The store no longer knows the upload.
        assert!(store
            .put_part(&sha, &id, 0, Bytes::from_static(b"x"))
            .await
            .is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_store_large_files_are_staged_then_linked() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            crate::store::StoreConfig::for_tests(&format!("file://{}/store", dir.path().display()));
        let store = BlobStore::open(&config).unwrap();
        let opts = UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            memory_budget: 2 * MIB,
            ..UploadOptions::default()
        };
        let up = Uploader::new(store.clone(), opts, "j", None);
        let (a, data) = file_of(dir.path(), "a", 5 * MIB as usize + 3, 1);
        let (b, _) = file_of(dir.path(), "b", 5 * MIB as usize + 3, 1);
        let first = up.upload(&a).await.unwrap();
        assert_eq!(first.new_bytes, data.len() as u64);
        assert_eq!(
            up.upload(&b).await.unwrap().new_bytes,
            0,
            "same content: nothing new"
        );
        let key = crate::store::blob_key(&first.digests.sha256_hex());
        assert_eq!(store.get_bytes(&key).await.unwrap().as_ref(), &data[..]);
        assert!(
            store.list("staging", usize::MAX).await.unwrap().is_empty(),
            "no staging object left"
        );
        assert!(up.budget().peak() <= 2 * MIB);
    }

    /// Pass 1's buffer is held from the memory budget: with the budget all taken, a large
    /// file's hashing waits for it (it went ahead, a MiB per file outside the budget, with
    /// hundreds of large files at once in a final sync).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashing_a_large_file_holds_its_buffer_from_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let opts = UploadOptions {
            memory_budget: 2 * MIB,
            ..small_parts()
        };
        let up = Uploader::new(store.clone(), opts, "j", None);
        let (file, data) = file_of(dir.path(), "ckpt", 3 * MIB as usize, 5);
        // Stored already: no part needs the budget, only the hash would.
        store
            .put_blob(&crate::digest::sha256_hex(&data), Bytes::from(data.clone()))
            .await
            .unwrap();
        let all = up.budget().acquire(2 * MIB).await;
        let held =
            tokio::time::timeout(std::time::Duration::from_millis(500), up.upload(&file)).await;
        assert!(held.is_err(), "hashed with no budget left");
        drop(all);
        let done = up.upload(&file).await.unwrap();
        assert_eq!(done.new_bytes, 0);
    }

    /// An attempt's end deletes the staging objects of its own crash, never those of another
    /// attempt of the job being staged right now (they share the job's staging prefix).
    #[tokio::test]
    async fn an_attempts_end_deletes_only_its_own_staging_objects() {
        let dir = tempfile::tempdir().unwrap();
        let config =
            crate::store::StoreConfig::for_tests(&format!("file://{}/store", dir.path().display()));
        let store = BlobStore::open(&config).unwrap();
        for key in ["staging/j/1-77-0", "staging/j/2-88-0", "staging/j/12-99-0"] {
            store
                .put_document(key, Bytes::from_static(b"part"))
                .await
                .unwrap();
        }
        let first =
            Uploader::new(store.clone(), UploadOptions::default(), "j", None).for_attempt(1);
        first.abort_orphans().await;
        let mut left = store.list("staging", usize::MAX).await.unwrap();
        left.sort();
        assert_eq!(left, ["staging/j/12-99-0", "staging/j/2-88-0"]);
    }

    /// Reflinked copies draw what they share from the attempt's budget, by inode and version
    /// as holes do: past it one is refused for good, naming the setting; a file read again in
    /// the same state draws nothing more, one that shares no more than 1 MiB nothing at all,
    /// and one that no longer shares gives its part back.
    #[test]
    fn shared_extents_draw_on_the_attempts_budget() {
        let budget = HoleBudget::new(10 * MIB);
        let stamp = |ino: u64| FileStamp {
            size: 4 * MIB,
            mtime_ns: 0,
            ctime_ns: 0,
            ino,
            dev: 1,
            mode: 0o644,
        };
        let path = Path::new("artifacts/copy");
        let charge = |ino: u64, shared: u64| charge_shared(&budget, path, &stamp(ino), shared);
        assert!(charge(1, 4 * MIB).is_ok());
        assert!(charge(2, 4 * MIB).is_ok());
        assert!(charge(1, 4 * MIB).is_ok(), "the same inode drew again");
        let refused = charge(3, 4 * MIB).unwrap_err();
        assert!(refused.is_for_good() && !refused.is_retryable());
        let said = crate::error_chain(&refused);
        assert!(
            said.contains("upload.shared_budget_bytes") && said.contains("10.0 MiB"),
            "{said}"
        );
        assert!(charge(4, MIB).is_ok(), "1 MiB shared is free");
        assert!(charge(1, 0).is_ok());
        assert!(charge(3, 4 * MIB).is_ok(), "inode 1 gave its 4 MiB back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn identical_large_files_at_once_share_one_upload() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let opts = UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            ..UploadOptions::default()
        };
        let up = Uploader::new(store.clone(), opts, "j", Some(dir.path().join("journal")));
        let mut tasks = JoinSet::new();
        for i in 0..4 {
            let (file, _) = file_of(dir.path(), &format!("same{i}"), 3 * MIB as usize + 5, 7);
            let up = up.clone();
            tasks.spawn(async move { up.upload(&file).await.unwrap() });
        }
        let mut new = 0;
        while let Some(done) = tasks.join_next().await {
            new += done.unwrap().new_bytes;
        }
        assert_eq!(new, 3 * MIB + 5, "exactly one of them added the blob");
        assert!(up.owners.lock().unwrap().is_empty(), "owners are released");
    }

    /// Every path (small PUT, multipart parts, staged writes) takes its bytes from the one
    /// bucket the options share: 1 MiB/s with 1 MiB of burst, so `n` MiB need `n - 1` s.
    #[tokio::test(start_paused = true)]
    async fn every_upload_path_keeps_to_the_bandwidth_limit() {
        let dir = tempfile::tempdir().unwrap();
        let limit = RateLimit::new(MIB);
        let opts = UploadOptions {
            multipart_threshold: MIB,
            min_part_size: MIB,
            memory_budget: 2 * MIB,
            bandwidth_limit: Some(limit.clone()),
            ..UploadOptions::default()
        };
        let config =
            crate::store::StoreConfig::for_tests(&format!("file://{}/store", dir.path().display()));
        let remote = Uploader::new(BlobStore::in_memory(), opts.clone(), "j", None);
        let local = Uploader::new(BlobStore::open(&config).unwrap(), opts, "j", None);
        let (small, _) = file_of(dir.path(), "small", MIB as usize / 2, 1);
        let (large, _) = file_of(dir.path(), "large", 2 * MIB as usize + MIB as usize / 2, 2);
        let (staged, _) = file_of(dir.path(), "staged", 2 * MIB as usize, 3);
        let start = tokio::time::Instant::now();
        remote.upload(&small).await.unwrap();
        assert!(
            start.elapsed() < std::time::Duration::from_millis(100),
            "burst"
        );
        remote.upload(&large).await.unwrap();
        local.upload(&staged).await.unwrap();
        // 5 MiB sent, 1 MiB of it free: 4 s at least.
        let took = start.elapsed();
        assert!(took >= std::time::Duration::from_secs(4), "{took:?}");
        assert_eq!(remote.budget().in_use() + local.budget().in_use(), 0);
        assert!(remote.budget().peak() <= 2 * MIB && local.budget().peak() <= 2 * MIB);
    }

    #[test]
    fn pass_one_gives_both_digests_and_a_tag_per_part() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 * MIB as usize + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        // Not a power of two: each part is several BLAKE3 subtrees.
        let part = MIB + 5 * 1024;
        let (d, tags) = hash_file(&path, File::open(&path).unwrap(), part, None).unwrap();
        assert_eq!(d, crate::digest::digest_bytes(&data));
        assert_eq!(tags.len(), data.len().div_ceil(part as usize));
    }

    #[test]
    fn a_part_hasher_fed_in_any_pieces_gives_what_one_pass_gives() {
        let data: Vec<u8> = (0..(2 * MIB as usize + 77))
            .map(|i| (i * 13 % 241) as u8)
            .collect();
        let part = 300 * 1024;
        let mut whole = super::multipart::PartHasher::new(part);
        whole.update(&data);
        // Odd splits: across pieces, across part boundaries, one byte.
        let mut split = super::multipart::PartHasher::new(part);
        let mut at = 0;
        for len in [1usize, 131_071, 300_006, 2, 700_000].into_iter().cycle() {
            let end = (at + len).min(data.len());
            split.update(&data[at..end]);
            at = end;
            if at == data.len() {
                break;
            }
        }
        let (digests, tags) = split.finish();
        assert_eq!(digests, crate::digest::digest_bytes(&data));
        assert_eq!((digests, tags), whole.finish());
    }
}
