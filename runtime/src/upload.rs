//! Turning one local file into a blob, with a bounded amount of memory, and without ever
//! storing bytes that do not match their key.
//!
//! * Small files (up to `multipart_threshold`): one read into memory (counted against the
//!   [`ByteBudget`]), SHA-256 + BLAKE3 over that very buffer, PUT create-if-absent. One read.
//! * Large files: the key (SHA-256) must be known before the upload starts, so the file is
//!   read twice. Pass 1 computes SHA-256, BLAKE3 and a CRC64 per part. Pass 2 reads each part
//!   again (`pread`), checks its CRC against pass 1 (cheap: no second SHA-256) and sends it;
//!   several parts in flight, each holding budget until the store has it. The upload is
//!   completed only if every part matched and the file's stamp did not move, so a file
//!   that changes meanwhile is re-queued and a torn version never becomes a blob.
//! * On the file store, a large file is read once: streamed into a staging object while
//!   hashed, then hard-linked to its key (unless that blob exists) once the stamp proves
//!   the file did not change meanwhile.
//! * On S3, GCS and Azure the upload id and every finished part are journaled in the state
//!   dir: after a crash the same file resumes with only the missing parts.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use tokio::task::JoinSet;

use c3_proto::{FileEntry, MultipartRecord};

use crate::budget::ByteBudget;
use crate::collect::{FileStamp, LocalFile};
use crate::confine::JobReader;
use crate::digest::{Digests, DualHasher};
use crate::statedir::write_atomic;
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
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            multipart_threshold: 16 * MIB,
            min_part_size: 8 * MIB,
            parts_in_flight: 4,
            files_in_flight: 16,
            memory_budget: 32 * MIB,
        }
    }
}

/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
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
}

impl Uploaded {
    pub fn entry(&self) -> FileEntry {
        FileEntry {
            path: self.rel.clone(),
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
}

/// Maps a store error on `path`'s upload.
fn store_err(path: &Path) -> impl Fn(StoreError) -> UploadError + Copy + '_ {
    move |source| UploadError::Store {
        path: path.into(),
        source,
    }
}

fn stat(path: &Path) -> Result<FileStamp, UploadError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(FileStamp::of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(UploadError::Vanished { path: path.into() })
        }
        Err(source) => Err(UploadError::Read {
            path: path.into(),
            source,
        }),
    }
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

fn crc(bytes: &[u8]) -> u64 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes)
}

/// Pass 1 of a large file: both digests and a CRC per part.
fn hash_file(
    path: &Path,
    mut file: impl Read,
    part_size: u64,
) -> Result<(Digests, Vec<u64>), UploadError> {
    let read_err = |source| UploadError::Read {
        path: path.into(),
        source,
    };
    let mut hasher = DualHasher::new();
    let mut part_crcs = Vec::new();
    let mut part = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
    let mut in_part = 0u64;
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = fill(&mut file, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        // A part boundary may fall inside this buffer.
        let mut rest = &buf[..n];
        while !rest.is_empty() {
            let take = rest.len().min((part_size - in_part) as usize);
            part.update(&rest[..take]);
            in_part += take as u64;
            rest = &rest[take..];
            if in_part == part_size {
                part_crcs.push(part.finalize());
                part = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc64Nvme);
                in_part = 0;
            }
        }
    }
    if in_part > 0 {
        part_crcs.push(part.finalize());
    }
    Ok((hasher.finish(), part_crcs))
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, UploadError> + Send + 'static,
) -> Result<T, UploadError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| UploadError::Task {
            path: path.into(),
            source,
        })?
}

fn ensure_unchanged(path: &Path, before: FileStamp) -> Result<(), UploadError> {
    if stat(path)? != before {
        return Err(UploadError::Changed { path: path.into() });
    }
    Ok(())
}

/// Where a large file's parts go: an explicit, journaled multipart upload (resumable),
/// or object_store's streaming upload (the file store).
/// A part task's outcome: index, the store's id for it, bytes sent.
type PartResult = Result<(usize, String, u64), UploadError>;

enum PartSink {
    Resumable {
        record: MultipartRecord,
        journal: Option<PathBuf>,
    },
    Streaming(Box<dyn object_store::MultipartUpload>),
}

impl Uploader {
    pub fn new(
        store: BlobStore,
        opts: UploadOptions,
        job_id: &str,
        journal_dir: Option<PathBuf>,
    ) -> Self {
        let budget = ByteBudget::new(opts.memory_budget);
        let staging = Arc::from(format!("staging/{job_id}"));
        Uploader {
            store,
            opts: Arc::new(opts),
            budget,
            journal_dir,
            staging,
            staged: Default::default(),
            owners: Default::default(),
            root: None,
            reader: None,
        }
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

    /// Opens the version of the file that `before` describes: no symlink on the way, the
    /// same inode (a swapped-in file is "changed"), and one the job's user may read.
    fn open(&self, path: &Path, before: FileStamp) -> Result<File, UploadError> {
        let file = crate::confine::open_read(self.root.as_deref(), path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                UploadError::Vanished { path: path.into() }
            } else {
                UploadError::Read {
                    path: path.into(),
                    source,
                }
            }
        })?;
        let st = crate::confine::fstat(&file).map_err(|source| UploadError::Read {
            path: path.into(),
            source,
        })?;
        if !crate::confine::is_regular(&st) || st.st_ino != before.ino || st.st_dev != before.dev {
            return Err(UploadError::Changed { path: path.into() });
        }
        // The agent's own files (the job's logs in the state dir) are not the job's to read.
        let confined = self.root.as_deref().is_some_and(|r| path.starts_with(r));
        if confined && self.reader.as_ref().is_some_and(|r| !r.can_read(&st)) {
            return Err(UploadError::NotReadable { path: path.into() });
        }
        Ok(file)
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

    /// Uploads `file` as a blob. `Changed` means a later attempt should see a settled version.
    pub async fn upload(&self, file: &LocalFile) -> Result<Uploaded, UploadError> {
        let path = file.abs.clone();
        let before = stat(&path)?;
        let (digests, new) = if before.size <= self.opts.multipart_threshold {
            self.upload_small(&path, before).await?
        } else if self.store.is_local() {
            self.upload_staged(&path, before).await?
        } else {
            self.upload_large(&path, before).await?
        };
        Ok(Uploaded {
            rel: file.rel.clone(),
            digests,
            stamp: before,
            new_bytes: if new { digests.size } else { 0 },
        })
    }

    async fn upload_small(
        &self,
        path: &Path,
        before: FileStamp,
    ) -> Result<(Digests, bool), UploadError> {
        let guard = self.budget.acquire(before.size).await;
        let p = path.to_path_buf();
        let file = self.open(path, before)?;
        let (digests, bytes) = blocking(path, move || {
            let read_err = |source| UploadError::Read {
                path: p.clone(),
                source,
            };
            let mut buf = Vec::with_capacity(before.size as usize);
            // One byte past the size we hold budget for: a file that grew (or was swapped for
            // a huge sparse one) is "changed", never read into memory.
            file.take(before.size + 1)
                .read_to_end(&mut buf)
                .map_err(read_err)?;
            Ok((crate::digest::digest_bytes(&buf), Bytes::from(buf)))
        })
        .await?;
        if digests.size != before.size {
            return Err(UploadError::Changed { path: path.into() });
        }
        ensure_unchanged(path, before)?;
        let new = self
            .store
            .put_blob(&digests.sha256_hex(), bytes)
            .await
            .map_err(store_err(path))?;
        drop(guard);
        Ok((digests, new))
    }

    async fn upload_large(
        &self,
        path: &Path,
        before: FileStamp,
    ) -> Result<(Digests, bool), UploadError> {
        let part_size = part_size_for(before.size, self.opts.min_part_size);
        let p = path.to_path_buf();
        let file = self.open(path, before)?;
        let (digests, part_crcs) = blocking(path, move || {
            hash_file(&p, file.take(before.size + 1), part_size)
        })
        .await?;
        if digests.size != before.size {
            return Err(UploadError::Changed { path: path.into() });
        }
        ensure_unchanged(path, before)?;
        let sha = digests.sha256_hex();
        let owner = self.owner_of(&sha);
        let turn = owner.lock().await;
        let result = self
            .upload_large_owned(path, before, &sha, part_size, &part_crcs)
            .await;
        drop(turn);
        self.release_owner(&sha, owner);
        result.map(|new| (digests, new))
    }

    fn owner_of(&self, sha: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        owners.entry(sha.to_string()).or_default().clone()
    }

    fn release_owner(&self, sha: &str, owner: Arc<tokio::sync::Mutex<()>>) {
        let mut owners = self.owners.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this handle left: nobody else waits for this blob.
        if Arc::strong_count(&owner) <= 2 {
            owners.remove(sha);
        }
    }

    /// The part of a large upload done by the blob's one owner. Returns whether it added it.
    async fn upload_large_owned(
        &self,
        path: &Path,
        before: FileStamp,
        sha: &str,
        part_size: u64,
        part_crcs: &[u64],
    ) -> Result<bool, UploadError> {
        let store_err = store_err(path);
        let sha = sha.to_string();
        if self.store.blob_exists(&sha).await.map_err(store_err)? {
            self.forget_journal(&sha).await;
            return Ok(false);
        }
        let mut sink = self
            .open_sink(&sha, before.size, part_size)
            .await
            .map_err(store_err)?;
        let sent = self
            .send_parts(path, before, &sha, part_size, part_crcs, &mut sink)
            .await;
        let verified =
            sent.and_then(|bytes_sent| ensure_unchanged(path, before).map(|()| bytes_sent));
        match verified {
            Ok(bytes_sent) => {
                self.finish_sink(&sha, sink).await.map_err(store_err)?;
                tracing::debug!(path = %path.display(), bytes = before.size, bytes_sent, parts = part_crcs.len(), "multipart upload complete");
                Ok(true)
            }
            Err(e) => {
                // Never completed, so nothing appears under the key; abort frees the parts.
                self.abort_sink(&sha, sink).await;
                Err(e)
            }
        }
    }

    /// File store, large file: one read, streamed to a staging object, then linked to its key.
    async fn upload_staged(
        &self,
        path: &Path,
        before: FileStamp,
    ) -> Result<(Digests, bool), UploadError> {
        let store_err = store_err(path);
        let n = self
            .staged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging_key = format!("{}/{}-{n}", self.staging, std::process::id());
        let part_size = part_size_for(before.size, self.opts.min_part_size);
        let mut upload = self
            .store
            .start_multipart_at(&staging_key)
            .await
            .map_err(store_err)?;
        let file = self.open(path, before)?.take(before.size + 1);
        let mut reader = Some((file, DualHasher::new()));
        let mut parts: JoinSet<Result<(), UploadError>> = JoinSet::new();
        let mut outcome = Ok(());
        while let Some((f, h)) = reader.take() {
            while parts.len() >= self.opts.parts_in_flight.max(1) {
                if let Some(Err(e) | Ok(Err(e))) = parts.join_next().await.map(|r| {
                    r.map_err(|source| UploadError::Task {
                        path: path.into(),
                        source,
                    })
                }) {
                    outcome = Err(e);
                }
            }
            if outcome.is_err() {
                break;
            }
            let guard = self.budget.acquire(part_size).await;
            let p = path.to_path_buf();
            let mut chunk = self.budget.buffer(part_size as usize);
            let read = blocking(path, move || {
                let (mut f, mut h) = (f, h);
                let n = fill(&mut f, &mut chunk)
                    .map_err(|source| UploadError::Read { path: p, source })?;
                chunk.truncate(n);
                h.update(&chunk);
                Ok((f, h, chunk.freeze()))
            })
            .await;
            let (f, h, chunk) = match read {
                Ok(r) => r,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let last = chunk.is_empty();
            reader = Some((f, h));
            if last {
                break;
            }
            let part = upload.put_part(chunk.clone().into());
            let (p, key, budget) = (path.to_path_buf(), staging_key.clone(), self.budget.clone());
            parts.spawn(async move {
                part.await.map_err(|source| UploadError::Store {
                    path: p,
                    source: StoreError::Op {
                        op: "write part",
                        key,
                        source,
                    },
                })?;
                budget.recycle(chunk);
                drop(guard);
                Ok(())
            });
        }
        while let Some(r) = parts.join_next().await {
            if let Err(e) | Ok(Err(e)) = r.map_err(|source| UploadError::Task {
                path: path.into(),
                source,
            }) {
                outcome = outcome.and(Err(e));
            }
        }
        let digests = reader.map(|(_, h)| h.finish());
        let verified = outcome.and_then(|()| match digests {
            Some(d) if d.size == before.size => ensure_unchanged(path, before).map(|()| d),
            _ => Err(UploadError::Changed { path: path.into() }),
        });
        let digests = match verified {
            Ok(d) => d,
            Err(e) => {
                if let Err(abort) = upload.abort().await {
                    tracing::warn!(error = %abort, "could not drop a staging object");
                }
                return Err(e);
            }
        };
        upload.complete().await.map_err(|source| {
            store_err(StoreError::Op {
                op: "complete",
                key: staging_key.clone(),
                source,
            })
        })?;
        let new = self
            .store
            .promote(&staging_key, &digests.sha256_hex())
            .await
            .map_err(store_err)?;
        Ok((digests, new))
    }

    fn journal_path(&self, sha: &str) -> Option<PathBuf> {
        self.journal_dir
            .as_ref()
            .map(|d| d.join(format!("{sha}.json")))
    }

    /// Resumes the journaled upload of this blob if there is one, else starts a new one.
    async fn open_sink(
        &self,
        sha: &str,
        size: u64,
        part_size: u64,
    ) -> Result<PartSink, StoreError> {
        if !self.store.can_resume() {
            return Ok(PartSink::Streaming(self.store.start_multipart(sha).await?));
        }
        let journal = self.journal_path(sha);
        if let Some(path) = &journal {
            if let Some(record) = std::fs::read(path)
                .ok()
                .and_then(|b| MultipartRecord::from_json(&b).ok())
            {
                if record.size == size && record.part_size == part_size {
                    tracing::info!(sha256 = %sha, parts_done = record.parts.len(), "resuming multipart upload");
                    return Ok(PartSink::Resumable { record, journal });
                }
                // Same content, other part size: its parts are of no use.
                let _ = self.store.abort_multipart(sha, &record.upload_id).await;
            }
        }
        let upload_id = self.store.create_multipart(sha).await?;
        let record = MultipartRecord {
            sha256: sha.to_string(),
            upload_id,
            size,
            part_size,
            parts: Default::default(),
        };
        if let Some(path) = &journal {
            if let Err(e) = write_atomic(path, &record.to_json()) {
                tracing::warn!(error = %crate::error_chain(&e), "cannot journal a multipart upload; it will not be resumable");
            }
        }
        Ok(PartSink::Resumable { record, journal })
    }

    /// Pass 2: each missing part read, checked against pass 1, sent; returns bytes sent.
    async fn send_parts(
        &self,
        path: &Path,
        before: FileStamp,
        sha: &str,
        part_size: u64,
        part_crcs: &[u64],
        sink: &mut PartSink,
    ) -> Result<u64, UploadError> {
        let file = Arc::new(self.open(path, before)?);
        let size = file
            .metadata()
            .map_err(|source| UploadError::Read {
                path: path.into(),
                source,
            })?
            .len();
        let mut in_flight: JoinSet<PartResult> = JoinSet::new();
        let mut bytes_sent = 0u64;
        let mut result = Ok(());
        for (idx, expected_crc) in part_crcs.iter().copied().enumerate() {
            if let PartSink::Resumable { record, .. } = sink {
                if record.parts.contains_key(&(idx as u32)) {
                    continue;
                }
            }
            while in_flight.len() >= self.opts.parts_in_flight.max(1) {
                if let Err(e) =
                    self.part_done(in_flight.join_next().await, sink, &mut bytes_sent, path)
                {
                    result = Err(e);
                    break;
                }
            }
            if result.is_err() {
                break;
            }
            let offset = idx as u64 * part_size;
            let len = part_size.min(size.saturating_sub(offset));
            let guard = self.budget.acquire(len).await;
            let (f, p) = (file.clone(), path.to_path_buf());
            let mut buf = self.budget.buffer(len as usize);
            let chunk = blocking(path, move || {
                f.read_exact_at(&mut buf, offset)
                    .map_err(|source| UploadError::Read {
                        path: p.clone(),
                        source,
                    })?;
                if crc(&buf) != expected_crc {
                    return Err(UploadError::Changed { path: p });
                }
                Ok(buf.freeze())
            })
            .await;
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let key_err = {
                let path = path.to_path_buf();
                move |source| UploadError::Store { path, source }
            };
            match sink {
                PartSink::Resumable { record, .. } => {
                    let (store, sha, id) = (
                        self.store.clone(),
                        sha.to_string(),
                        record.upload_id.clone(),
                    );
                    let budget = self.budget.clone();
                    in_flight.spawn(async move {
                        let content_id = store
                            .put_part(&sha, &id, idx, chunk.clone())
                            .await
                            .map_err(key_err)?;
                        budget.recycle(chunk);
                        drop(guard);
                        Ok((idx, content_id, len))
                    });
                }
                PartSink::Streaming(upload) => {
                    let part = upload.put_part(chunk.clone().into());
                    let (sha, budget) = (sha.to_string(), self.budget.clone());
                    in_flight.spawn(async move {
                        part.await.map_err(|source| {
                            key_err(StoreError::Op {
                                op: "upload part",
                                key: crate::store::blob_key(&sha),
                                source,
                            })
                        })?;
                        budget.recycle(chunk);
                        drop(guard);
                        Ok((idx, String::new(), len))
                    });
                }
            }
        }
        while !in_flight.is_empty() {
            let r = self.part_done(in_flight.join_next().await, sink, &mut bytes_sent, path);
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| bytes_sent)
    }

    fn part_done(
        &self,
        joined: Option<Result<PartResult, tokio::task::JoinError>>,
        sink: &mut PartSink,
        bytes_sent: &mut u64,
        path: &Path,
    ) -> Result<(), UploadError> {
        let Some(joined) = joined else { return Ok(()) };
        let (idx, content_id, len) = joined.map_err(|source| UploadError::Task {
            path: path.into(),
            source,
        })??;
        *bytes_sent += len;
        if let PartSink::Resumable { record, journal } = sink {
            record.parts.insert(idx as u32, content_id);
            if let Some(j) = journal {
                if let Err(e) = write_atomic(j, &record.to_json()) {
                    tracing::debug!(error = %e, "cannot update the multipart journal");
                }
            }
        }
        Ok(())
    }

    async fn finish_sink(&self, sha: &str, sink: PartSink) -> Result<(), StoreError> {
        match sink {
            PartSink::Streaming(mut upload) => {
                upload
                    .complete()
                    .await
                    .map(|_| ())
                    .map_err(|source| StoreError::Op {
                        op: "complete multipart upload",
                        key: crate::store::blob_key(sha),
                        source,
                    })
            }
            PartSink::Resumable { record, journal } => {
                let parts = record.parts.values().cloned().collect();
                self.store
                    .complete_multipart(sha, &record.upload_id, parts)
                    .await?;
                if let Some(j) = journal {
                    let _ = std::fs::remove_file(j);
                }
                Ok(())
            }
        }
    }

    async fn abort_sink(&self, sha: &str, sink: PartSink) {
        let aborted = match sink {
            PartSink::Streaming(mut upload) => upload.abort().await.map_err(|e| e.to_string()),
            PartSink::Resumable { record, journal } => {
                let r = self
                    .store
                    .abort_multipart(sha, &record.upload_id)
                    .await
                    .map_err(|e| crate::error_chain(&e));
                if let Some(j) = journal {
                    let _ = std::fs::remove_file(j);
                }
                r
            }
        };
        if let Err(e) = aborted {
            tracing::warn!(sha256 = %sha, error = %e, "could not abort a multipart upload");
        }
    }

    /// The blob exists after all: an upload of it left by a crash is useless.
    async fn forget_journal(&self, sha: &str) {
        let Some(path) = self.journal_path(sha) else {
            return;
        };
        if let Some(record) = std::fs::read(&path)
            .ok()
            .and_then(|b| MultipartRecord::from_json(&b).ok())
        {
            let _ = self.store.abort_multipart(sha, &record.upload_id).await;
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Aborts every journaled upload nobody will finish (the job is over), and drops
    /// staging objects a crash left. Returns how many uploads were aborted.
    pub async fn abort_orphans(&self) -> usize {
        if self.store.is_local() {
            for key in self.store.list(&self.staging).await.unwrap_or_default() {
                let _ = self.store.delete(&key).await;
            }
        }
        let Some(dir) = &self.journal_dir else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut aborted = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(record) = std::fs::read(&path)
                .ok()
                .and_then(|b| MultipartRecord::from_json(&b).ok())
            {
                match self
                    .store
                    .abort_multipart(&record.sha256, &record.upload_id)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(sha256 = %record.sha256, parts = record.parts.len(), "aborted an orphaned multipart upload")
                    }
                    Err(e) => {
                        tracing::warn!(sha256 = %record.sha256, error = %crate::error_chain(&e), "cannot abort an orphaned multipart upload")
                    }
                }
                aborted += 1;
            }
            let _ = std::fs::remove_file(&path);
        }
        aborted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // A crashed agent's upload: created, two parts sent, journaled.
        let sha = crate::digest::digest_bytes(&data).sha256_hex();
        let id = store.create_multipart(&sha).await.unwrap();
        let mut record = MultipartRecord {
            sha256: sha.clone(),
            upload_id: id.clone(),
            size: data.len() as u64,
            part_size: MIB,
            parts: Default::default(),
        };
        for idx in [0usize, 3] {
            let part = Bytes::copy_from_slice(&data[idx * MIB as usize..(idx + 1) * MIB as usize]);
            record.parts.insert(
                idx as u32,
                store.put_part(&sha, &id, idx, part).await.unwrap(),
            );
        }
        write_atomic(&journal.join(format!("{sha}.json")), &record.to_json()).unwrap();

        let mut sink = up.open_sink(&sha, data.len() as u64, MIB).await.unwrap();
        let (_, crcs) = hash_file(&file.abs, File::open(&file.abs).unwrap(), MIB).unwrap();
        let sent = up
            .send_parts(&file.abs, file.stamp, &sha, MIB, &crcs, &mut sink)
            .await
            .unwrap();
        assert_eq!(sent, 3 * MIB, "only the three missing parts are sent");
        up.finish_sink(&sha, sink).await.unwrap();
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

    #[tokio::test]
    async fn orphaned_uploads_are_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::in_memory();
        let journal = dir.path().join("journal");
        let up = Uploader::new(
            store.clone(),
            UploadOptions::default(),
            "j",
            Some(journal.clone()),
        );
        let sha = "ab".repeat(32);
        let id = store.create_multipart(&sha).await.unwrap();
        let record = MultipartRecord {
            sha256: sha.clone(),
            upload_id: id.clone(),
            size: 1,
            part_size: MIB,
            parts: Default::default(),
        };
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
        let config = crate::store::StoreConfig {
            url: format!("file://{}/store", dir.path().display()),
            options: Default::default(),
            max_retries: 0,
            retry_timeout: std::time::Duration::from_secs(1),
            retry_deadline: std::time::Duration::from_secs(1),
        };
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
            store.list("staging").await.unwrap().is_empty(),
            "no staging object left"
        );
        assert!(up.budget().peak() <= 2 * MIB);
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

    #[test]
    fn part_crcs_follow_part_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(3 * MIB as usize + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let (d, crcs) = hash_file(&path, File::open(&path).unwrap(), MIB + 5).unwrap();
        assert_eq!(d, crate::digest::digest_bytes(&data));
        let expected: Vec<u64> = data.chunks((MIB + 5) as usize).map(crc).collect();
        assert_eq!(crcs, expected);
    }
}
