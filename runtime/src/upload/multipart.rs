//! Large files on S3, GCS and Azure: hashed first (the key must be known), then sent part
//! by part, each part checked against its BLAKE3 [`Tag`] from the hashing pass, the upload
//! journaled in a [`MultipartJournal`] so that a crashed agent's upload resumes with the
//! missing parts only.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::task::JoinSet;

use c3_proto::{MultipartPart, MultipartRecord};

use super::subtree::{PartTrees, Tag};
use super::{
    blocking, ensure_unchanged_off, fill, part_size_for, read_error, store_err, UploadError,
    Uploader, HASH_BUF,
};
use crate::collect::FileStamp;
use crate::digest::{Digests, Sha256Hasher, PIECE};
use crate::statedir::write_replace;
use crate::store::StoreError;

/// A part task's outcome: index, the store's id for it, bytes sent, the tag of those bytes.
type PartResult = Result<(usize, String, u64, Tag), UploadError>;

/// A multipart upload under way and its journal: `<state_dir>/jobs/<id>/uploads/<attempt>-<sha>.json`
/// holds the upload (its id, size, part size), written once when the upload starts, and
/// `<attempt>-<sha>.parts` one line per finished part (its index, the store's id for it, the tag of the
/// bytes sent), appended as each part is done. object_store has no list-parts call, so these
/// files are the only way to resume. Appending keeps a part's booking O(1): the whole record
/// rewritten after each part was quadratic, gigabytes written for an 80 GB checkpoint's
/// 10,000 parts.
pub(super) struct MultipartJournal {
    record: MultipartRecord,
    path: Option<PathBuf>,
    /// Taken over from an earlier agent (a crash), not started by this one.
    pub(super) resumed: bool,
    /// Whether a journal on disk names the upload: only then may a store fault keep it
    /// open for a later try to resume; one nothing names is aborted, or its parts stay
    /// billed at the store for ever.
    journaled: bool,
}

/// The parts file beside the journal at `path`.
fn parts_path(path: &Path) -> PathBuf {
    path.with_extension("parts")
}

/// A short name of an upload id for [`MultipartPart::upload`] (ids run to 1 KiB).
fn upload_tag(upload_id: &str) -> String {
    crate::digest::sha256_hex(upload_id.as_bytes())[..16].to_string()
}

impl MultipartJournal {
    /// The journaled upload at `path` with the parts booked beside it, if there is a
    /// readable one. One whose upload id no request could carry (see
    /// [`crate::store::usable_upload_id`]) is not read: it is of no use, and naming it would
    /// fail every look at it. A line of the parts file that does not parse (the last one,
    /// torn by a crash) is passed over: that part is only sent again.
    fn load(path: &Path) -> Option<MultipartRecord> {
        let mut record = std::fs::read(path)
            .ok()
            .and_then(|b| MultipartRecord::from_json(&b).ok())
            .filter(|r| crate::store::usable_upload_id(&r.upload_id))?;
        if let Ok(lines) = std::fs::read(parts_path(path)) {
            let upload = upload_tag(&record.upload_id);
            for line in lines.split(|&b| b == b'\n') {
                if let Some(l) = serde_json::from_slice::<MultipartPart>(line)
                    .ok()
                    .filter(|l| l.upload == upload && crate::store::usable_upload_id(&l.id))
                {
                    record.parts.insert(l.part, l.id);
                    record.part_blake3.insert(l.part, l.blake3);
                }
            }
        }
        Some(record)
    }

    /// Starts the journal of a new upload, off the reactor. Parts of an earlier upload of
    /// this blob go first: beside the new upload id they would name parts it never had.
    /// fsync'd once, here: the upload id is in no other place, and a host crash could
    /// otherwise leave the journal empty (a new file renamed into place), the upload never
    /// aborted and its parts billed for ever. The parts' lines are not: after a crash a stale
    /// list only resends parts (the store acknowledged every part it lists, and a part sent
    /// again replaces itself). Returns whether it was written.
    async fn start(&self) -> bool {
        let Some(path) = self.path.clone() else {
            return false;
        };
        let bytes = self.record.to_json();
        let eio = crate::fault::armed_at("journal-write-eio", &self.record.sha256);
        let written = tokio::task::spawn_blocking(move || {
            if eio {
                let source = std::io::Error::from_raw_os_error(libc::EIO);
                return Err(crate::statedir::StateError::Write { path, source });
            }
            match std::fs::remove_file(parts_path(&path)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(crate::statedir::StateError::Write { path, source: e })
                }
                _ => {}
            }
            crate::statedir::write_atomic(&path, &bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot journal a multipart upload; it is aborted rather than kept if it fails");
                false
            }
            Err(_) => false,
        }
    }

    /// Books a finished part: one line appended, off the reactor.
    async fn book(&mut self, idx: u32, id: String, tag: &Tag) {
        let blake3 = hex::encode(tag);
        let Some(path) = self.path.as_deref().map(parts_path) else {
            self.record.parts.insert(idx, id);
            self.record.part_blake3.insert(idx, blake3);
            return;
        };
        let line = MultipartPart {
            upload: upload_tag(&self.record.upload_id),
            part: idx,
            id,
            blake3,
        };
        // The newline goes first: a line a crash tore stays a line of its own, not the head
        // of the next one (which would be lost with it).
        let mut bytes = vec![b'\n'];
        bytes.extend(serde_json::to_vec(&line).expect("a part line serializes"));
        self.record.parts.insert(idx, line.id);
        self.record.part_blake3.insert(idx, line.blake3);
        let written = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .and_then(|mut f| f.write_all(&bytes))
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::warn!(error = %e, "cannot journal a finished part; a resumed upload sends it again");
        }
    }

    fn remove(&self) {
        if let Some(p) = &self.path {
            remove_journal(p);
        }
    }

    /// Whether part `idx` is in the store with exactly the bytes tagged `tag`: an earlier
    /// agent's part counts only if it journaled the tag of what it sent (it may have sent a
    /// version the job rewrote afterwards, or be an older agent that kept no tags).
    fn holds(&self, idx: usize, tag: &Tag) -> bool {
        let idx = idx as u32;
        self.record.parts.contains_key(&idx)
            && self.record.part_blake3.get(&idx) == Some(&hex::encode(tag))
    }
}

/// The store refused the upload's complete for one of its parts (S3's InvalidPart).
fn part_refused(e: &StoreError) -> bool {
    crate::store::says(e, "<Code>InvalidPart</Code>")
}

/// A part's body that the store stopped taking until the deadline: a server that answers
/// an upload it lost (NoSuchUpload) before reading the body, and closes, leaves the client
/// writing into a closed connection, the answer unread. A resumed upload's part failing so
/// was retried until the deadline, and the next `recover` resumed the same lost upload
/// again: the file never stored. A proxy's or load balancer's reset reads the same, and the
/// upload is still there: [`Uploader::upload_lost`] asks the store which it is.
fn cut_off_sending(e: &StoreError) -> bool {
    crate::store::says(e, "error writing a body to connection")
}

/// Removes a journal and its parts; the parts go last, so a crash between leaves no parts
/// file beside a journal of another upload.
fn remove_journal(path: &Path) {
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(parts_path(path));
}

/// A part's read that failed. One that ended early is the file truncated under it (a
/// `torch.save` rewriting a checkpoint with `O_TRUNC`): the file changed, to be looked at
/// again, not a fault that fails its upload for good.
fn part_read_error(path: &Path, source: std::io::Error) -> UploadError {
    if source.kind() == std::io::ErrorKind::UnexpectedEof {
        UploadError::Changed { path: path.into() }
    } else {
        read_error(path, source)
    }
}

/// Whether a failed upload's parts are worth keeping for a later try of the same content: a
/// store fault, or a read fault the job did not make (its file is still what was hashed).
fn keeps_parts(e: &UploadError) -> bool {
    match e {
        UploadError::Store { .. } => e.is_retryable(),
        UploadError::Read { .. } => !e.is_for_good(),
        _ => false,
    }
}

/// Reads the part at `offset` into `buf` (its length) and checks it is what pass 1 hashed.
/// Read and hashed a piece at a time, so the hash finds each piece still in this core's cache.
fn read_part(
    file: &std::fs::File,
    buf: &mut [u8],
    offset: u64,
    part_size: u64,
    expected: &Tag,
    path: &Path,
) -> Result<Tag, UploadError> {
    if offset > 0 && crate::fault::fail_once("part-read-eio") {
        return Err(part_read_error(
            path,
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    let mut part = PartTrees::at(part_size, offset);
    let mut at = offset;
    for piece in buf.chunks_mut(PIECE) {
        file.read_exact_at(piece, at)
            .map_err(|source| part_read_error(path, source))?;
        part.update(piece);
        at += piece.len() as u64;
    }
    let tag = part.finish_part();
    if tag != *expected {
        return Err(UploadError::Changed { path: path.into() });
    }
    Ok(tag)
}

/// Checks the part at `offset` (`len` bytes) against its tag from pass 1 without keeping it:
/// read through `scratch` a piece at a time, so checking a 500 MiB part of a 5 TiB file
/// holds one piece, not the part.
fn check_part(
    file: &std::fs::File,
    scratch: &mut [u8],
    offset: u64,
    part_size: u64,
    expected: &Tag,
    path: &Path,
) -> Result<(), UploadError> {
    if offset > 0 && crate::fault::fail_once("part-read-eio") {
        return Err(part_read_error(
            path,
            std::io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    let mut part = PartTrees::at(part_size, offset);
    let mut at = offset;
    while at < offset + part_size {
        let n = scratch.len().min((offset + part_size - at) as usize);
        file.read_exact_at(&mut scratch[..n], at)
            .map_err(|source| part_read_error(path, source))?;
        part.update(&scratch[..n]);
        at += n as u64;
    }
    if part.finish_part() != *expected {
        return Err(UploadError::Changed { path: path.into() });
    }
    Ok(())
}

/// Pass 1 of a large file: SHA-256 (the key), and BLAKE3 as the subtrees of each part (its
/// tag), merged into the file's BLAKE3 at the end. Also the state kept for a file hashed
/// ahead while the job still writes it ([`Prehashed`]): the final pass 1 goes on from there,
/// and pass 2 still checks every part against its tag, so a region rewritten after it was
/// hashed fails that upload ("changed") and the file is hashed again from its start.
#[derive(Clone)]
pub(super) struct PartHasher {
    pub part_size: u64,
    sha256: Sha256Hasher,
    trees: PartTrees,
}

/// A [`PartHasher`] stopped at a part boundary.
pub(super) type Prehashed = PartHasher;

impl std::fmt::Debug for PartHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartHasher")
            .field("part_size", &self.part_size)
            .field("hashed", &self.hashed())
            .finish_non_exhaustive()
    }
}

impl PartHasher {
    pub fn new(part_size: u64) -> Self {
        let part_size = part_size.max(1);
        Self {
            part_size,
            sha256: Sha256Hasher::default(),
            trees: PartTrees::whole_file(part_size),
        }
    }

    /// Bytes fed so far.
    pub fn hashed(&self) -> u64 {
        self.trees.pos()
    }

    /// Whether it stands at a part boundary (what a hash-ahead may keep).
    pub fn whole_parts(&self) -> bool {
        self.hashed().is_multiple_of(self.part_size)
    }

    /// The tags of the whole parts hashed so far.
    pub fn tags(&self) -> &[Tag] {
        self.trees.tags()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(PIECE) {
            self.sha256.update(piece);
            self.trees.update(piece);
        }
    }

    /// The digests and every part's tag (the last part may be short).
    pub fn finish(self) -> (Digests, Vec<Tag>) {
        let size = self.hashed();
        let (blake3, tags) = self.trees.finish();
        let digests = Digests {
            sha256: self.sha256.finish(),
            blake3,
            size,
        };
        (digests, tags)
    }
}

/// Pass 1 of a large file, from `from` (a prefix hashed ahead, if any; `file` then reads on
/// where it stopped).
pub(super) fn hash_file(
    path: &Path,
    mut file: impl Read,
    part_size: u64,
    from: Option<Prehashed>,
) -> Result<(Digests, Vec<Tag>), UploadError> {
    let mut state = from.unwrap_or_else(|| PartHasher::new(part_size));
    let mut buf = vec![0u8; HASH_BUF];
    loop {
        let n = fill(&mut file, &mut buf).map_err(|source| read_error(path, source))?;
        if n == 0 {
            break;
        }
        state.update(&buf[..n]);
    }
    Ok(state.finish())
}

impl Uploader {
    pub(super) async fn upload_large(
        &self,
        path: &Path,
        before: FileStamp,
    ) -> Result<(Digests, bool), UploadError> {
        let part_size = part_size_for(before.size, self.opts.min_part_size);
        let p = path.to_path_buf();
        let mut file = self.open(path, before, true).await?;
        // What was hashed while the job wrote it: only the tail is left to read.
        let ahead = self
            .take_prehashed(before)
            .filter(|a| a.part_size == part_size && a.hashed() <= before.size);
        let ahead_parts = ahead.as_ref().map_or(0, |a| a.tags().len());
        // Pass 1's buffer is file bytes in memory too: held from the budget, or the final
        // sync's hundreds of large files at once (8 per CPU) held a MiB each beside it.
        let hashing = self.budget.acquire(HASH_BUF as u64).await;
        let (digests, tags) = blocking(path, move || {
            let start = ahead.as_ref().map_or(0, |a| a.hashed());
            std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start)).map_err(|source| {
                UploadError::Read {
                    path: p.clone(),
                    source,
                }
            })?;
            hash_file(&p, file.take(before.size + 1 - start), part_size, ahead)
        })
        .await?;
        drop(hashing);
        if digests.size != before.size {
            return Err(UploadError::Changed { path: path.into() });
        }
        ensure_unchanged_off(self.root.clone(), path, before).await?;
        let sha = digests.sha256_hex();
        let owner = self.owner_of(&sha);
        let turn = owner.lock().await;
        let result = self
            .upload_large_owned(path, before, &digests, part_size, &tags, ahead_parts)
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
        digests: &Digests,
        part_size: u64,
        tags: &[Tag],
        ahead_parts: usize,
    ) -> Result<bool, UploadError> {
        let store_err = store_err(path);
        let sha = digests.sha256_hex();
        if self
            .store
            .blob_exists(&sha, before.size)
            .await
            .map_err(store_err)?
        {
            // Nothing is sent, so nothing re-reads the parts hashed ahead: check them here, or
            // a region rewritten since would be taken for the old content.
            self.verify_parts(path, before, part_size, &tags[..ahead_parts])
                .await?;
            self.forget_journal(&sha).await;
            return Ok(false);
        }
        // An upload the store no longer knows (a resumed one it expired, or a lifecycle rule
        // or another agent aborted under way: NoSuchUpload), or whose complete it refuses for
        // a part (InvalidPart: an ETag changed on the way, a part it lost), is started over
        // from scratch, at most twice.
        let mut restarts = 0;
        self.keep(&sha, false);
        loop {
            let mut journal = self
                .open_journal(&sha, before.size, part_size)
                .await
                .map_err(store_err)?;
            let (resumed, journaled) = (journal.resumed, journal.journaled);
            let upload_id = journal.record.upload_id.clone();
            // What an abort of an upload no journal names needs (a new upload: no parts yet).
            let unjournaled = (!journaled).then(|| journal.record.clone());
            let sent = self
                .send_parts(path, before, tags, ahead_parts, &mut journal)
                .await;
            let outcome = match sent {
                Ok(bytes_sent) => match self.complete(journal).await {
                    Ok(()) => {
                        tracing::debug!(path = %path.display(), bytes = before.size, bytes_sent, parts = tags.len(), "multipart upload complete");
                        // Every part holds the bytes pass 1 hashed (each was checked against
                        // its tag), so the blob is the key's content whatever the file did
                        // since. Only the listing needs the file still to be `before`: a
                        // change now (a chmod, a touch, a new link) is reported for the next
                        // look, which finds the blob stored; checked before the complete, it
                        // threw away every part sent and sent them all again.
                        return ensure_unchanged_off(self.root.clone(), path, before)
                            .await
                            .map(|()| true)
                            .inspect_err(|_| self.record_added(digests));
                    }
                    Err(e) => {
                        let e = store_err(e);
                        if let Some(record) = &unjournaled {
                            // Nothing on the node names it, to resume it or abort it later:
                            // whatever the complete's error (a denial, or an InvalidPart
                            // that starts it over, left it open, its parts billed for ever).
                            self.abort_unjournaled(record).await;
                        }
                        Err(e)
                    }
                },
                // A store fault, or a read that failed (EIO from a network file system's
                // blip): the parts sent stay at the store and in the journal, for the next
                // look (or `recover`) to resume instead of sending them all again. Unless
                // no journal names the upload (the state dir full, or failing): kept, it
                // would be neither resumed nor aborted, its parts billed for ever.
                Err(e) if keeps_parts(&e) && journaled => Err(e),
                Err(e) => {
                    // Never completed, so nothing appears under the key; abort frees the parts.
                    match &unjournaled {
                        Some(record) => self.abort_unjournaled(record).await,
                        None => self.abort(journal).await,
                    }
                    Err(e)
                }
            };
            let cut_off = match &outcome {
                Err(UploadError::Store { source, .. })
                    if resumed
                        && cut_off_sending(source)
                        && !source.is_permanent()
                        && !crate::store::upload_gone(source) =>
                {
                    Some(
                        self.upload_lost(&sha, &upload_id, before.size.div_ceil(part_size))
                            .await,
                    )
                }
                _ => None,
            };
            match outcome {
                Err(UploadError::Store { source, .. })
                    if restarts < 2
                        && ((resumed && source.is_permanent())
                            || cut_off == Some(true)
                            || crate::store::upload_gone(&source)
                            || part_refused(&source)) =>
                {
                    restarts += 1;
                    tracing::warn!(sha256 = %sha, error = %crate::error_chain(&source), "the store no longer accepts the multipart upload; starting it over");
                    if let Some(p) = self.journal_path(&sha) {
                        // One refused for a part is still open at the store: its parts would
                        // stay billed with nothing on the node naming them.
                        match MultipartJournal::load(&p) {
                            Some(old) => self.replace_upload(&p, &old).await,
                            None => remove_journal(&p),
                        }
                    }
                }
                Err(e) => {
                    if keeps_parts(&e) && journaled {
                        self.keep(&sha, true);
                    }
                    return Err(e);
                }
                Ok(()) => return Ok(true),
            }
        }
    }

    /// Forgets which uploads were kept: from now on only those this uploader's later tries
    /// keep stay when the attempt ends ([`Uploader::abort_orphans`]).
    pub fn forget_kept(&self) {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Marks the upload of `sha` as kept for a later try (`yes`), or as this try's again.
    fn keep(&self, sha: &str, yes: bool) {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if yes {
            kept.insert(sha.to_string());
        } else {
            kept.remove(sha);
        }
    }

    /// File store, large file: one read, streamed to a staging object, then linked to its key.
    fn journal_path(&self, sha: &str) -> Option<PathBuf> {
        self.journal_dir
            .as_ref()
            .map(|d| d.join(format!("{}{sha}.json", self.attempt_tag)))
    }

    /// Resumes the journaled upload of this blob if there is one, else starts a new one.
    pub(super) async fn open_journal(
        &self,
        sha: &str,
        size: u64,
        part_size: u64,
    ) -> Result<MultipartJournal, StoreError> {
        let path = self.journal_path(sha);
        if let Some(record) = path.as_deref().and_then(MultipartJournal::load) {
            // A journal is a hint, not a proof: one that names another blob or parts this
            // file does not have (a torn or stale file after a host crash) starts over.
            let parts = size.div_ceil(part_size.max(1));
            if record.sha256 == sha
                && record.size == size
                && record.part_size == part_size
                && record.parts.keys().all(|&idx| u64::from(idx) < parts)
            {
                tracing::info!(sha256 = %sha, parts_done = record.parts.len(), "resuming multipart upload");
                return Ok(MultipartJournal {
                    record,
                    path,
                    resumed: true,
                    journaled: true,
                });
            }
            // Same content, other part size: its parts are of no use.
            if let Some(p) = path.as_deref() {
                self.replace_upload(p, &record).await;
            }
        }
        let upload_id = self.store.create_multipart(sha).await?;
        let mut journal = MultipartJournal {
            record: MultipartRecord {
                sha256: sha.to_string(),
                upload_id,
                size,
                part_size,
                parts: Default::default(),
                part_blake3: Default::default(),
            },
            path,
            resumed: false,
            journaled: false,
        };
        journal.journaled = journal.start().await;
        Ok(journal)
    }

    /// Re-reads the first `tags.len()` parts and checks each against its tag: `Changed` if
    /// any part is not what was hashed.
    async fn verify_parts(
        &self,
        path: &Path,
        before: FileStamp,
        part_size: u64,
        tags: &[Tag],
    ) -> Result<(), UploadError> {
        if tags.is_empty() {
            return Ok(());
        }
        let file = self.open(path, before, false).await?;
        let (p, tags) = (path.to_path_buf(), tags.to_vec());
        blocking(path, move || {
            let mut scratch = vec![0u8; PIECE];
            for (idx, expected) in tags.iter().enumerate() {
                let offset = idx as u64 * part_size;
                check_part(&file, &mut scratch, offset, part_size, expected, &p)?;
            }
            Ok(())
        })
        .await
    }

    /// Pass 2: reads each part the store does not hold yet, checks it against its tag from
    /// pass 1 (a rewrite since shows; unlike a CRC, a tag cannot be forged to match other
    /// bytes), and sends it. A part an earlier agent sent (a resumed upload) is kept without
    /// a read only if the journal holds the tag of the bytes it sent and that tag is this
    /// content's: a key never names bytes it is not the hash of, or every later upload of
    /// the real content would be skipped as "already stored". Such a part among the first
    /// `ahead_parts` (hashed ahead while the job wrote the file) is read again, unsent: its
    /// tag proves what the store holds, not that the file still holds it. Returns the bytes
    /// sent.
    pub(super) async fn send_parts(
        &self,
        path: &Path,
        before: FileStamp,
        tags: &[Tag],
        ahead_parts: usize,
        journal: &mut MultipartJournal,
    ) -> Result<u64, UploadError> {
        let (sha, part_size) = (journal.record.sha256.clone(), journal.record.part_size);
        let file = Arc::new(self.open(path, before, false).await?);
        let size = before.size;
        let mut in_flight: JoinSet<PartResult> = JoinSet::new();
        let mut bytes_sent = 0u64;
        let mut result = Ok(());
        for (idx, expected) in tags.iter().copied().enumerate() {
            if journal.holds(idx, &expected) {
                if idx < ahead_parts {
                    // As when the blob is stored already: a region rewritten since it was
                    // hashed ahead would otherwise be listed with the old bytes' digests.
                    let (f, p) = (file.clone(), path.to_path_buf());
                    let offset = idx as u64 * part_size;
                    let checked = blocking(path, move || {
                        let mut scratch = vec![0u8; PIECE];
                        check_part(&f, &mut scratch, offset, part_size, &expected, &p)
                    })
                    .await;
                    if let Err(e) = checked {
                        result = Err(e);
                        break;
                    }
                }
                continue;
            }
            while in_flight.len() >= self.opts.parts_in_flight.max(1) {
                let done = in_flight.join_next().await;
                if let Err(e) = part_done(done, journal, &mut bytes_sent, path).await {
                    result = Err(e);
                    break;
                }
            }
            if result.is_err() {
                break;
            }
            let offset = idx as u64 * part_size;
            let len = part_size.min(size.saturating_sub(offset));
            self.pace(len).await;
            let (guard, mut buf) = self.budget.acquire_buffer(len as usize).await;
            let (f, p) = (file.clone(), path.to_path_buf());
            let read = blocking(path, move || {
                let tag = read_part(&f, &mut buf, offset, part_size, &expected, &p)?;
                Ok((buf.freeze(), tag))
            })
            .await;
            let (chunk, tag) = match read {
                Ok(c) => c,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            let (store, sha, id) = (
                self.store.clone(),
                sha.clone(),
                journal.record.upload_id.clone(),
            );
            let (budget, p) = (self.budget.clone(), path.to_path_buf());
            in_flight.spawn(async move {
                let content_id = store
                    .put_part(&sha, &id, idx, chunk.clone())
                    .await
                    .map_err(|source| UploadError::Store { path: p, source })?;
                budget.recycle(chunk, guard);
                Ok((idx, content_id, len, tag))
            });
        }
        while !in_flight.is_empty() {
            let done = in_flight.join_next().await;
            let r = part_done(done, journal, &mut bytes_sent, path).await;
            if result.is_ok() {
                result = r;
            }
        }
        result.map(|()| bytes_sent)
    }

    /// Completes the upload: the blob appears under its key, the journal goes.
    pub(super) async fn complete(&self, journal: MultipartJournal) -> Result<(), StoreError> {
        let parts = journal.record.parts.values().cloned().collect();
        self.store
            .complete_multipart(
                &journal.record.sha256,
                &journal.record.upload_id,
                journal.record.size,
                parts,
            )
            .await?;
        journal.remove();
        Ok(())
    }

    /// Aborts the upload (never completed, so nothing appears under the key). Its journal
    /// goes once the store has let the upload go: one that could not be aborted (the store
    /// down) stays, for the attempt's end or `recover` to abort, rather than leave its parts
    /// billed at the store with nothing on the node that names them.
    async fn abort(&self, journal: MultipartJournal) {
        let record = &journal.record;
        let _ = self
            .abort_upload(&record.sha256, &record.upload_id, journal.path.as_deref())
            .await;
    }

    /// Aborts the upload `upload_id` of `sha` and removes its journal at `path` once the store
    /// has let the upload go, or no longer knows it. A journal whose abort failed (the store
    /// down past its retry deadline, or refusing) stays: without it nothing on the node names
    /// the upload, whose parts stay billed at the store; kept, it keeps its job from
    /// retention, and this attempt's end or a later pass aborts it.
    async fn abort_upload(
        &self,
        sha: &str,
        upload_id: &str,
        path: Option<&Path>,
    ) -> Result<(), StoreError> {
        match self.store.abort_multipart(sha, upload_id).await {
            Ok(()) => {}
            Err(e) if crate::store::upload_gone(&e) => {}
            // A store that will never abort it (a write-only policy without
            // s3:AbortMultipartUpload): a journal kept for it would keep the job from
            // retention for ever. Only the store's own lifecycle rule frees the parts now.
            // Only that refusal: a skewed clock at boot, keys being rotated or an expired
            // token are refusals too, and pass.
            Err(e) if refuses_aborts(&e) => {
                tracing::warn!(sha256 = %sha, error = %crate::error_chain(&e), "the store refuses to abort a multipart upload; its parts stay until a lifecycle rule for incomplete multipart uploads removes them");
            }
            Err(e) => {
                if path.is_some() {
                    tracing::warn!(sha256 = %sha, error = %crate::error_chain(&e), "could not abort a multipart upload; its journal is kept to abort it later");
                }
                return Err(e);
            }
        }
        if let Some(p) = path {
            remove_journal(p);
        }
        Ok(())
    }

    /// Aborts an upload no journal names (its journal could not be written). One whose abort
    /// fails (a store outage cut the upload short, and it is still on) is journaled now if
    /// the state dir takes it, under a name of its own as [`Uploader::replace_upload`] sets
    /// one aside, else kept in memory: either way the attempt's end
    /// ([`Uploader::abort_orphans`]) tries it again, and its parts are not left billed with
    /// nothing naming them.
    async fn abort_unjournaled(&self, record: &MultipartRecord) {
        let (sha, id) = (&record.sha256, &record.upload_id);
        let Err(e) = self.abort_upload(sha, id, None).await else {
            return;
        };
        if self.journal_aside(record).await {
            tracing::warn!(sha256 = %sha, error = %crate::error_chain(&e), "could not abort a multipart upload that was not journaled; journaled now, to abort it later");
            return;
        }
        tracing::warn!(sha256 = %sha, error = %crate::error_chain(&e), "could not abort a multipart upload that was not journaled (nor can be now); this attempt's end tries again");
        self.unjournaled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.clone());
    }

    /// Writes the journal of `record`'s upload under a name of its own
    /// (`<attempt>-<sha>.<upload tag>.json`), which no upload of its blob resumes or
    /// overwrites and [`Uploader::abort_orphans`] finds. Returns whether it was written.
    async fn journal_aside(&self, record: &MultipartRecord) -> bool {
        let Some(path) = self.journal_path(&record.sha256) else {
            return false;
        };
        let aside = path.with_extension(format!("{}.json", upload_tag(&record.upload_id)));
        let eio = crate::fault::armed_at("journal-write-eio", &record.sha256);
        let bytes = record.to_json();
        tokio::task::spawn_blocking(move || !eio && write_replace(&aside, &bytes).is_ok())
            .await
            .unwrap_or(false)
    }

    /// Lets go of the journaled upload at `path` that a new upload of its blob replaces: it is
    /// aborted, or, if the store will not abort it now, its journal is set aside under a name
    /// of its own (`<attempt>-<sha>.<upload tag>.json`), which the new upload's journal does
    /// not overwrite and [`Uploader::abort_orphans`] still finds.
    /// Whether upload `upload_id` of `sha` (of `parts` parts), whose part the store kept
    /// cutting off, is one the store lost: only its own NoSuchUpload to a probe says so.
    /// Taken as lost on the cut alone (any middlebox reset mid-body), a resumed upload with
    /// hundreds of GB of parts stored was aborted and every part sent again.
    async fn upload_lost(&self, sha: &str, upload_id: &str, parts: u64) -> bool {
        // The last part number S3 allows, unused by an upload of fewer parts.
        const PROBE_PART: usize = 9_999;
        if parts > PROBE_PART as u64 {
            return false;
        }
        match self
            .store
            .upload_still_open(sha, upload_id, PROBE_PART)
            .await
        {
            Ok(open) => !open,
            // Refused for good (s3s-fs answers an upload it lost 403): as a refused part of
            // a resumed upload is, it is started over (at most twice). Taken as no answer,
            // the resume was retried to the deadline and failed UPLOAD_ERROR.
            Err(e) if e.is_permanent() => {
                tracing::debug!(sha256 = %sha, error = %crate::error_chain(&e), "the store refuses a part of the upload for good; starting it over");
                true
            }
            Err(e) => {
                tracing::debug!(sha256 = %sha, error = %crate::error_chain(&e), "the store did not say whether it still knows the upload; it is kept");
                false
            }
        }
    }

    async fn replace_upload(&self, path: &Path, record: &MultipartRecord) {
        if self
            .abort_upload(&record.sha256, &record.upload_id, Some(path))
            .await
            .is_ok()
        {
            return;
        }
        let aside = path.with_extension(format!("{}.json", upload_tag(&record.upload_id)));
        // Its parts are of no use to an abort; beside the new upload they would be read as its.
        let moved = std::fs::rename(path, &aside);
        let _ = std::fs::remove_file(parts_path(path));
        if let Err(e) = moved {
            tracing::warn!(sha256 = %record.sha256, error = %e, "cannot set aside the journal of a multipart upload the store would not abort; its parts stay at the store");
        }
    }

    /// The blob exists after all: an upload of it left by a crash is useless.
    async fn forget_journal(&self, sha: &str) {
        let Some(path) = self.journal_path(sha) else {
            return;
        };
        if let Some(record) = MultipartJournal::load(&path) {
            let _ = self
                .abort_upload(&record.sha256, &record.upload_id, Some(&path))
                .await;
        }
    }

    /// Whether this attempt has a multipart upload journaled (one [`Uploader::abort_orphans`]
    /// would abort).
    pub fn journaled(&self) -> bool {
        let Some(dir) = &self.journal_dir else {
            return false;
        };
        std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten().any(|e| {
                e.file_name().to_str().is_some_and(|n| {
                    n.strip_prefix(&*self.attempt_tag)
                        .is_some_and(|rest| rest.ends_with(".json"))
                })
            })
        })
    }

    /// Aborts every upload of this attempt's journals nobody will finish (the attempt is
    /// over), but those kept after a store fault (`recover` resumes them), and drops the
    /// attempt's staging objects a crash left. Another attempt's are left alone: its agent
    /// may be sending them now. One the store will not abort keeps its journal
    /// ([`Uploader::abort_upload`]). So do uploads no journal named whose abort failed
    /// ([`Uploader::abort_unjournaled`]): journaled now if the state dir takes it (for
    /// `recover`), else kept for a later call. Returns how many uploads were aborted.
    pub async fn abort_orphans(&self) -> usize {
        let mut aborted = self.abort_journaled().await;
        // Uploads no journal names, whose abort failed: only this uploader knows them.
        let unjournaled =
            std::mem::take(&mut *self.unjournaled.lock().unwrap_or_else(|p| p.into_inner()));
        for record in unjournaled {
            let (sha, id) = (&record.sha256, &record.upload_id);
            match self.abort_upload(sha, id, None).await {
                Ok(()) => {
                    tracing::info!(sha256 = %sha, "aborted a multipart upload that was not journaled");
                    aborted += 1;
                }
                // Journaled now, `recover` aborts it.
                Err(_) if self.journal_aside(&record).await => {}
                Err(e) => {
                    tracing::warn!(sha256 = %sha, error = %crate::error_chain(&e), "could not abort a multipart upload that was not journaled (nor can be now); its parts stay at the store until a lifecycle rule for incomplete multipart uploads removes them");
                    self.unjournaled
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(record);
                }
            }
        }
        aborted
    }

    /// [`Uploader::abort_orphans`] of the attempt's journals and staging objects.
    async fn abort_journaled(&self) -> usize {
        if self.store.is_local() {
            // The file store's own directory: only this job's staging objects, never endless;
            // of those, this attempt's (another attempt's agent may be staging now).
            for key in self
                .store
                .list(&self.staging, usize::MAX)
                .await
                .unwrap_or_default()
            {
                if key
                    .rsplit('/')
                    .next()
                    .is_some_and(|name| name.starts_with(&*self.attempt_tag))
                {
                    let _ = self.store.delete(&key).await;
                }
            }
        }
        let Some(dir) = &self.journal_dir else {
            return 0;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let kept = self.kept.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut aborted = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            // A journal's start an agent was killed in (`write_atomic`'s temp file): it
            // names no upload, and retention would keep the job for it. A minute old at
            // least: a younger one may be another attempt's agent starting its journal.
            if name.starts_with(".c3-") {
                let stale = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > std::time::Duration::from_secs(60));
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            // This attempt's, or one an agent that named no attempt left (`<sha>.json`).
            let Some(sha) = name
                .strip_prefix(&*self.attempt_tag)
                .or_else(|| (!name.contains('-')).then_some(name))
                .and_then(|rest| rest.split('.').next())
            else {
                continue;
            };
            if kept.contains(sha) {
                continue;
            }
            if path.extension().is_some_and(|x| x == "parts") {
                // Its journal's turn removes it; alone (a crash between the two removals) it
                // names no upload.
                if !path.with_extension("json").exists() {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(record) = MultipartJournal::load(&path) else {
                // Its upload, if the store began one, can no longer be named: said, since
                // its parts stay billed until the bucket's lifecycle rule for incomplete
                // uploads takes them.
                tracing::warn!(journal = %path.display(), "a multipart upload's journal cannot be read; removed (an upload it named, if any, is left to the bucket's lifecycle rule for incomplete uploads)");
                remove_journal(&path);
                continue;
            };
            if self
                .abort_upload(&record.sha256, &record.upload_id, Some(&path))
                .await
                .is_ok()
            {
                tracing::info!(sha256 = %record.sha256, parts = record.parts.len(), "aborted an orphaned multipart upload");
                aborted += 1;
            }
        }
        aborted
    }
}

/// Whether the store refuses this node aborts for good: its own "access denied" to the
/// request (S3's `AccessDenied`, Azure's `AuthorizationPermissionMismatch`), nothing else.
fn refuses_aborts(e: &StoreError) -> bool {
    let denied = matches!(
        e,
        StoreError::Op {
            source: object_store::Error::PermissionDenied { .. },
            ..
        }
    );
    denied
        && (crate::store::says(e, "<Code>AccessDenied</Code>")
            || crate::store::says(e, "AuthorizationPermissionMismatch"))
}

/// Books a finished part: its id and tag into the journal (appended, so a crash loses no part).
async fn part_done(
    joined: Option<Result<PartResult, tokio::task::JoinError>>,
    journal: &mut MultipartJournal,
    bytes_sent: &mut u64,
    path: &Path,
) -> Result<(), UploadError> {
    let Some(joined) = joined else { return Ok(()) };
    let (idx, content_id, len, tag) = joined.map_err(|source| UploadError::Task {
        path: path.into(),
        source,
    })??;
    *bytes_sent += len;
    journal.book(idx as u32, content_id, &tag).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BlobStore;
    use crate::upload::UploadOptions;

    const SHA: &str = "ab";

    fn uploader(dir: &Path) -> Uploader {
        Uploader::new(
            BlobStore::in_memory(),
            UploadOptions::default(),
            "j",
            Some(dir.to_path_buf()),
        )
    }

    /// Parts are booked by appending a line each; a crash mid-append leaves a torn last line,
    /// which costs that one part, not the journal.
    #[tokio::test]
    async fn parts_are_appended_and_a_torn_last_line_costs_one_part() {
        let dir = tempfile::tempdir().unwrap();
        let up = uploader(dir.path());
        let mut journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        let header = std::fs::read(journal.path.as_ref().unwrap()).unwrap();
        journal.book(0, "etag-0".into(), &[1; 32]).await;
        journal.book(1, "etag-1".into(), &[2; 32]).await;
        // The record written when the upload started is left as it was: a part costs a line.
        assert_eq!(
            std::fs::read(journal.path.as_ref().unwrap()).unwrap(),
            header
        );
        let parts = parts_path(journal.path.as_ref().unwrap());
        let mut lines = std::fs::read(&parts).unwrap();
        assert_eq!(lines.iter().filter(|&&b| b == b'\n').count(), 2);
        // A part another upload of the blob booked (an agent of another attempt) is not this
        // upload's, and a torn last line is passed over.
        let other = MultipartPart {
            upload: upload_tag("another-upload"),
            part: 2,
            id: "other-etag".into(),
            blake3: hex::encode([3u8; 32]),
        };
        lines.push(b'\n');
        lines.extend_from_slice(&serde_json::to_vec(&other).unwrap());
        lines.push(b'\n');
        lines.extend_from_slice(br#"{"upload":"x","part":2,"id":"etag-"#);
        std::fs::write(&parts, &lines).unwrap();

        let resumed = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        assert!(resumed.resumed);
        assert_eq!(
            resumed.record.parts.values().collect::<Vec<_>>(),
            ["etag-0", "etag-1"]
        );
        assert!(resumed.holds(1, &[2; 32]));
        assert!(!resumed.holds(2, &[3; 32]));
        // A part booked after the torn line is a line of its own, not glued to it.
        let mut resumed = resumed;
        resumed.book(2, "etag-2".into(), &[4; 32]).await;
        let again = MultipartJournal::load(resumed.path.as_ref().unwrap()).unwrap();
        assert_eq!(again.parts.get(&2).map(String::as_str), Some("etag-2"));
    }

    /// A file truncated while its parts are read or checked has changed; it is not a read
    /// fault (those are not retried, and a job that exited 0 would end UPLOAD_ERROR).
    #[test]
    fn a_part_cut_short_by_a_truncation_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        std::fs::write(&path, vec![7u8; 512 << 10]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let read = read_part(&file, &mut buf, 0, 1 << 20, &[0; 32], &path);
        assert!(matches!(read, Err(UploadError::Changed { .. })), "{read:?}");
        let mut scratch = vec![0u8; PIECE];
        let checked = check_part(&file, &mut scratch, 0, 1 << 20, &[0; 32], &path);
        assert!(
            matches!(checked, Err(UploadError::Changed { .. })),
            "{checked:?}"
        );
    }

    /// A read that meets ESTALE (another NFS client replaced the file) is a change, looked at
    /// again; it failed the file UPLOAD_ERROR as a read fault. Other faults stay read faults.
    #[test]
    fn a_stale_nfs_handle_is_a_change() {
        let path = Path::new("/w/ckpt");
        let stale = std::io::Error::from_raw_os_error(libc::ESTALE);
        assert!(matches!(
            part_read_error(path, stale),
            UploadError::Changed { .. }
        ));
        let stale = std::io::Error::from_raw_os_error(libc::ESTALE);
        let hashed = hash_file(path, FailingRead(Some(stale)), 1 << 20, None);
        assert!(
            matches!(hashed, Err(UploadError::Changed { .. })),
            "{hashed:?}"
        );
        let eio = std::io::Error::from_raw_os_error(libc::EIO);
        assert!(matches!(
            part_read_error(path, eio),
            UploadError::Read { .. }
        ));
    }

    /// A reader whose first read fails with the error it holds.
    struct FailingRead(Option<std::io::Error>);

    impl Read for FailingRead {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            self.0.take().map_or(Ok(0), Err)
        }
    }

    /// An upload kept after a store fault stays when the attempt ends, for `recover`; once
    /// the final sync has had its try (`forget_kept`), one it did not keep again is aborted
    /// like any other, not kept with its job for ever. A stale temp file of a journal's start
    /// goes too.
    #[tokio::test]
    async fn a_kept_upload_stays_only_while_a_try_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let up = uploader(dir.path());
        let journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        let path = journal.path.clone().unwrap();
        let tmp = dir.path().join(".c3-killed.tmp");
        std::fs::write(&tmp, b"{").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(old)
            .unwrap();
        up.keep(SHA, true);
        assert_eq!(up.abort_orphans().await, 0);
        assert!(path.exists(), "a kept upload was aborted");
        assert!(!tmp.exists(), "a stale temp file stayed");
        up.forget_kept();
        assert_eq!(up.abort_orphans().await, 1);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    /// A store in memory whose aborts fail (a 503) while `failing` is above zero, one less
    /// each time, that runs `after_part` once a part is stored, and whose parts fail (a 503)
    /// once `parts_ok` have been stored.
    struct FlakyAbort {
        mem: Arc<object_store::memory::InMemory>,
        failing: std::sync::atomic::AtomicUsize,
        after_part: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
        parts_ok: std::sync::atomic::AtomicUsize,
        creates: std::sync::atomic::AtomicUsize,
        /// The ids of the uploads started.
        ids: std::sync::Mutex<Vec<String>>,
        /// Every abort is refused for good (a 403: no s3:AbortMultipartUpload).
        denied: std::sync::atomic::AtomicBool,
        /// The id every stored part is named by, instead of the store's.
        part_id: std::sync::Mutex<Option<String>>,
        /// Every part with bytes is cut off mid-body (a reset by a proxy, or a store that
        /// answered before reading it).
        cut_off: std::sync::atomic::AtomicBool,
        /// A part of an upload it does not know is refused 403 AccessDenied (s3s-fs's
        /// answer), not NoSuchUpload.
        unknown_denied: std::sync::atomic::AtomicBool,
        /// Every complete is refused for good: 1, a 403; 2, a 400 InvalidPart.
        complete_refused: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl object_store::multipart::MultipartStore for FlakyAbort {
        async fn create_multipart(
            &self,
            path: &object_store::path::Path,
        ) -> object_store::Result<object_store::MultipartId> {
            self.creates
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let id = self.mem.create_multipart(path).await?;
            self.ids.lock().unwrap().push(id.clone());
            Ok(id)
        }

        async fn put_part(
            &self,
            path: &object_store::path::Path,
            id: &object_store::MultipartId,
            part_idx: usize,
            data: object_store::PutPayload,
        ) -> object_store::Result<object_store::multipart::PartId> {
            use std::sync::atomic::Ordering::SeqCst;
            if self
                .parts_ok
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: "Server returned non-2xx status code: 503 Service Unavailable".into(),
                });
            }
            if self.cut_off.load(SeqCst) && data.content_length() > 0 {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: "error sending request: client error (SendRequest): error writing a body to connection: Broken pipe (os error 32)".into(),
                });
            }
            // An upload it does not know, as S3 says it (or s3s-fs).
            let denied = self.unknown_denied.load(SeqCst);
            let mut part = self
                .mem
                .put_part(path, id, part_idx, data)
                .await
                .map_err(|_| match denied {
                    true => object_store::Error::PermissionDenied {
                        path: path.to_string(),
                        source: "Server returned non-2xx status code: 403 Forbidden: <Error><Code>AccessDenied</Code></Error>".into(),
                    },
                    false => object_store::Error::NotFound {
                        path: path.to_string(),
                        source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchUpload</Code></Error>".into(),
                    },
                });
            if let (Ok(p), Some(named)) = (&mut part, self.part_id.lock().unwrap().clone()) {
                p.content_id = named;
            }
            let hook = self.after_part.lock().unwrap().take();
            if let Some(hook) = hook {
                hook();
            }
            part
        }

        async fn complete_multipart(
            &self,
            path: &object_store::path::Path,
            id: &object_store::MultipartId,
            parts: Vec<object_store::multipart::PartId>,
        ) -> object_store::Result<object_store::PutResult> {
            match self
                .complete_refused
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                1 => Err(object_store::Error::PermissionDenied {
                    path: path.to_string(),
                    source: "Server returned non-2xx status code: 403 Forbidden: <Error><Code>AccessDenied</Code></Error>".into(),
                }),
                2 => Err(object_store::Error::Generic {
                    store: "S3",
                    source: "Server returned non-2xx status code: 400 Bad Request: <Error><Code>InvalidPart</Code></Error>".into(),
                }),
                _ => self.mem.complete_multipart(path, id, parts).await,
            }
        }

        async fn abort_multipart(
            &self,
            path: &object_store::path::Path,
            id: &object_store::MultipartId,
        ) -> object_store::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            if self.denied.load(SeqCst) {
                return Err(object_store::Error::PermissionDenied {
                    path: path.to_string(),
                    source: "Server returned non-2xx status code: 403 Forbidden: <Error><Code>AccessDenied</Code></Error>".into(),
                });
            }
            let down = self
                .failing
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok();
            if down {
                return Err(object_store::Error::Generic {
                    store: "S3",
                    source: "Server returned non-2xx status code: 503 Service Unavailable".into(),
                });
            }
            self.mem.abort_multipart(path, id).await
        }
    }

    const DEADLINE: std::time::Duration = std::time::Duration::from_millis(300);

    /// An uploader journaling in `dir` on a store whose next `failing` aborts fail.
    fn flaky_uploader(dir: &Path, failing: usize) -> (Uploader, Arc<FlakyAbort>) {
        flaky_uploader_within(dir, failing, DEADLINE)
    }

    /// [`flaky_uploader`] whose store's retry deadline is `deadline`.
    fn flaky_uploader_within(
        dir: &Path,
        failing: usize,
        deadline: std::time::Duration,
    ) -> (Uploader, Arc<FlakyAbort>) {
        let mem = Arc::new(object_store::memory::InMemory::new());
        let flaky = Arc::new(FlakyAbort {
            mem: mem.clone(),
            failing: failing.into(),
            after_part: Default::default(),
            parts_ok: usize::MAX.into(),
            creates: Default::default(),
            ids: Default::default(),
            denied: Default::default(),
            part_id: Default::default(),
            cut_off: Default::default(),
            unknown_denied: Default::default(),
            complete_refused: Default::default(),
        });
        let store = BlobStore::in_memory_with(mem, flaky.clone(), deadline);
        let opts = UploadOptions {
            multipart_threshold: 1 << 20,
            min_part_size: 1 << 20,
            ..UploadOptions::default()
        };
        let up = Uploader::new(store, opts, "j", Some(dir.join("journal")));
        (up, flaky)
    }

    /// Whether the store still holds upload `id` of `SHA` open (it lets it be aborted).
    async fn still_open(flaky: &FlakyAbort, id: &str) -> bool {
        use object_store::multipart::MultipartStore;
        let path = object_store::path::Path::from(crate::store::blob_key(SHA).as_str());
        flaky
            .mem
            .abort_multipart(&path, &id.to_string())
            .await
            .is_ok()
    }

    /// An orphan's abort that meets a blip is retried; one the store does not take by its
    /// retry deadline keeps its journal, the only thing on the node that names the upload,
    /// and the next look aborts it. Its journal was removed whatever the abort's outcome,
    /// and the upload's parts stayed billed at the store.
    #[tokio::test]
    async fn an_orphan_whose_abort_fails_keeps_its_journal_until_it_is_aborted() {
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 1);
        let journals = dir.path().join("journal");
        let journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        let id = journal.record.upload_id.clone();
        assert_eq!(up.abort_orphans().await, 1);
        assert!(
            !still_open(&flaky, &id).await,
            "a blip left the upload open"
        );
        assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);

        let journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        let (id, path) = (journal.record.upload_id.clone(), journal.path.clone());
        flaky
            .failing
            .store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(up.abort_orphans().await, 0);
        assert!(path.unwrap().exists(), "the journal of an open upload went");
        // The outage over (stale past its deadline), the next look aborts it.
        flaky.failing.store(0, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(DEADLINE * 2).await;
        assert_eq!(up.abort_orphans().await, 1);
        assert!(!still_open(&flaky, &id).await);
        assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
    }

    /// A part's id (its ETag) as long as a reply's headers hold (400 KiB) is taken for a
    /// blip, never kept: each of 10,000 parts' was held in memory, journaled and sent back at
    /// the completion (4 GB of one big checkpoint's). A journal's line naming one is passed
    /// over (that part is only sent again).
    #[tokio::test]
    async fn a_part_id_no_request_could_carry_is_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 0);
        *flaky.part_id.lock().unwrap() = Some("x".repeat(400 << 10));
        let id = up.store.create_multipart(SHA).await.unwrap();
        let part = up
            .store
            .put_part(SHA, &id, 0, bytes::Bytes::from(vec![1u8; 1 << 20]))
            .await;
        assert!(part.is_err(), "a 400 KiB part id was taken");
        *flaky.part_id.lock().unwrap() = None;
        let fine = up
            .store
            .put_part(SHA, &id, 0, bytes::Bytes::from(vec![1u8; 1 << 20]))
            .await
            .unwrap();
        assert!(crate::store::usable_upload_id(&fine));

        let journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        let path = journal.path.clone().unwrap();
        let upload = upload_tag(&journal.record.upload_id);
        let line = |part: u32, id: &str| {
            let mut l = serde_json::to_vec(&MultipartPart {
                upload: upload.clone(),
                part,
                id: id.into(),
                blake3: "b".into(),
            })
            .unwrap();
            l.push(b'\n');
            l
        };
        let mut lines = line(0, "good");
        lines.extend(line(1, &"y".repeat(crate::store::MAX_UPLOAD_ID + 1)));
        std::fs::write(parts_path(&path), lines).unwrap();
        let loaded = MultipartJournal::load(&path).unwrap();
        assert_eq!(loaded.parts.keys().copied().collect::<Vec<_>>(), [0]);
    }

    /// A store that refuses aborts for good (a write-only policy) does not keep the journal:
    /// no later look aborts the upload either, and the journal would keep the job from
    /// retention for ever.
    #[tokio::test]
    async fn a_journal_whose_abort_is_refused_for_good_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 0);
        flaky
            .denied
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let journals = dir.path().join("journal");
        up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        up.abort_orphans().await;
        assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
        // Other refusals pass (a clock skewed at boot): the journal stays for a later look.
        let skewed = StoreError::Op {
            op: "abort multipart upload",
            key: "k".into(),
            source: object_store::Error::PermissionDenied {
                path: "k".into(),
                source: "Server returned non-2xx status code: 403 Forbidden: <Error><Code>RequestTimeTooSkewed</Code></Error>".into(),
            },
        };
        assert!(!skewed.is_permanent() && !refuses_aborts(&skewed));
    }

    /// A journaled upload replaced by a new one of its blob (another part size) whose abort
    /// fails is set aside, not overwritten: the attempt's end aborts both.
    #[tokio::test]
    async fn a_replaced_upload_whose_abort_fails_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), usize::MAX);
        let journals = dir.path().join("journal");
        let old = up.open_journal(SHA, 4 << 20, 1 << 20).await.unwrap();
        let new = up.open_journal(SHA, 4 << 20, 2 << 20).await.unwrap();
        assert!(!new.resumed);
        assert_ne!(old.record.upload_id, new.record.upload_id);
        assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 2);
        flaky.failing.store(0, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(DEADLINE * 2).await;
        assert_eq!(up.abort_orphans().await, 2);
        assert!(!still_open(&flaky, &old.record.upload_id).await);
        assert!(!still_open(&flaky, &new.record.upload_id).await);
        assert_eq!(std::fs::read_dir(&journals).unwrap().count(), 0);
    }

    /// A file whose stamp moves (a chmod: its ctime and mode) once its parts were read and
    /// checked against their tags is `Changed` for its listing, but its blob is stored: every
    /// part holds the key's bytes. The next look finds it and sends nothing. The whole upload
    /// was aborted, and every part sent again.
    #[tokio::test]
    async fn a_stamp_moved_after_the_parts_were_checked_keeps_the_blob() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 0);
        let abs = dir.path().join("ckpt");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&abs, &data).unwrap();
        std::fs::set_permissions(&abs, std::fs::Permissions::from_mode(0o644)).unwrap();
        let stamp = || FileStamp::of(&std::fs::metadata(&abs).unwrap());
        let mut file = crate::collect::LocalFile {
            rel: "artifacts/ckpt".into(),
            abs: abs.clone(),
            stamp: stamp(),
        };
        let at = abs.clone();
        *flaky.after_part.lock().unwrap() = Some(Box::new(move || {
            std::fs::set_permissions(&at, std::fs::Permissions::from_mode(0o600)).unwrap();
        }));
        let first = up.upload(&file).await;
        assert!(
            matches!(first, Err(UploadError::Changed { .. })),
            "{first:?}"
        );
        let sha = crate::digest::sha256_hex(&data);
        assert!(
            up.store.blob_exists(&sha, data.len() as u64).await.unwrap(),
            "every part was sent and checked, and the blob was thrown away"
        );
        file.stamp = stamp();
        let again = up.upload(&file).await.unwrap();
        assert_eq!(again.digests.sha256_hex(), sha);
        assert_eq!(again.new_bytes, 0, "sent again");
        assert_eq!(flaky.creates.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A 3 MiB file `unjournaled` in `dir` (bytes counting modulo `modulus`), as collected.
    fn patterned_file(dir: &Path, modulus: u32) -> (Vec<u8>, crate::collect::LocalFile) {
        let abs = dir.join("unjournaled");
        let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % modulus) as u8).collect();
        std::fs::write(&abs, &data).unwrap();
        let stamp = FileStamp::of(&std::fs::metadata(&abs).unwrap());
        let file = crate::collect::LocalFile {
            rel: "artifacts/unjournaled".into(),
            abs,
            stamp,
        };
        (data, file)
    }

    /// An upload whose journal could not be written (the state dir full, or failing) is
    /// aborted when a store fault cuts it short, not kept for a later try: nothing on the
    /// node names it, to resume it or to abort it, and its parts stayed billed for ever.
    #[tokio::test]
    async fn an_upload_no_journal_names_is_aborted_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 0);
        flaky.parts_ok.store(1, std::sync::atomic::Ordering::SeqCst);
        let (data, file) = patterned_file(dir.path(), 241);
        let _eio = crate::fault::arm("journal-write-eio", &crate::digest::sha256_hex(&data));
        let e = up.upload(&file).await.unwrap_err();
        assert!(
            matches!(e, UploadError::Store { .. }) && e.is_retryable(),
            "{e:?}"
        );
        let ids = flaky.ids.lock().unwrap().clone();
        assert!(!ids.is_empty());
        for id in ids {
            assert!(!still_open(&flaky, &id).await, "upload {id} is left open");
        }
    }

    /// An upload no journal names whose complete the store refuses for good (a denial), or
    /// for a part (InvalidPart: started over) is aborted: it was left open, nothing on the
    /// node naming it.
    #[tokio::test]
    async fn an_unjournaled_upload_whose_complete_is_refused_is_aborted() {
        for refusal in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let (up, flaky) = flaky_uploader(dir.path(), 0);
            flaky
                .complete_refused
                .store(refusal, std::sync::atomic::Ordering::SeqCst);
            let (data, file) = patterned_file(dir.path(), 229);
            let _eio = crate::fault::arm("journal-write-eio", &crate::digest::sha256_hex(&data));
            assert!(up.upload(&file).await.is_err());
            let ids = flaky.ids.lock().unwrap().clone();
            assert!(!ids.is_empty());
            for id in ids {
                assert!(
                    !still_open(&flaky, &id).await,
                    "upload {id} is left open ({refusal})"
                );
            }
        }
    }

    /// An upload no journal names that a store outage cuts short: its abort fails too (the
    /// store still down), and nothing on the node named it, to abort it when the store
    /// answered again; its parts stayed billed for ever. Journaled once the state dir takes
    /// it, or kept in memory, the attempt's end aborts it.
    #[tokio::test]
    async fn an_unjournaled_upload_whose_abort_fails_is_aborted_at_the_attempts_end() {
        for journal_back in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (up, flaky) = flaky_uploader(dir.path(), usize::MAX);
            flaky.parts_ok.store(1, std::sync::atomic::Ordering::SeqCst);
            let (data, file) = patterned_file(dir.path(), 239);
            let eio = crate::fault::arm("journal-write-eio", &crate::digest::sha256_hex(&data));
            // The state dir takes writes again once the upload started (its journal not written).
            let mut eio = Some(eio);
            if journal_back {
                let eio = eio.take();
                *flaky.after_part.lock().unwrap() = Some(Box::new(move || drop(eio)));
            }
            let e = up.upload(&file).await.unwrap_err();
            assert!(
                matches!(e, UploadError::Store { .. }) && e.is_retryable(),
                "{e:?}"
            );
            let ids = flaky.ids.lock().unwrap().clone();
            assert!(!ids.is_empty());
            let journals = dir.path().join("journal");
            let named = std::fs::read_dir(&journals).map_or(0, |d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            });
            assert_eq!(named, usize::from(journal_back));
            // The store answers again: the attempt ends.
            flaky.failing.store(0, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(DEADLINE * 2).await;
            up.abort_orphans().await;
            for id in ids {
                assert!(
                    !still_open(&flaky, &id).await,
                    "upload {id} is left open (journal back: {journal_back})"
                );
            }
            let left: Vec<_> = std::fs::read_dir(&journals)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            assert!(left.is_empty(), "{left:?}");
            drop(eio);
        }
    }

    /// A resumed upload whose parts are cut off mid-body (a proxy's resets, or a store that
    /// answers an upload it lost before reading the part) is started over only when the
    /// store says it lost it: taken as lost on the cut alone, a resumed upload with hundreds
    /// of GB stored was aborted and every part sent again.
    #[tokio::test]
    async fn a_resumed_upload_cut_off_mid_part_is_started_over_only_if_lost() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (up, flaky) = flaky_uploader(dir.path(), 0);
        let (_data, file) = patterned_file(dir.path(), 233);
        // One part stored, then an outage: the upload is kept, journaled, for a resume.
        flaky.parts_ok.store(1, SeqCst);
        assert!(up.upload(&file).await.is_err());
        let id = flaky.ids.lock().unwrap()[0].clone();
        let open_now = || async {
            use object_store::multipart::MultipartStore;
            let path = object_store::path::Path::from(crate::store::blob_key(SHA).as_str());
            let empty = object_store::PutPayload::default();
            flaky.mem.put_part(&path, &id, 9_998, empty).await.is_ok()
        };
        assert!(open_now().await);
        flaky.parts_ok.store(usize::MAX, SeqCst);
        flaky.cut_off.store(true, SeqCst);
        // Resumed, its parts cut off, the store still holding it: kept, not started over.
        assert!(up.upload(&file).await.is_err());
        assert_eq!(flaky.creates.load(SeqCst), 1, "started over on a reset");
        assert!(open_now().await, "the resumed upload was aborted");
        // The store lost it meanwhile (a lifecycle rule): now it is started over.
        assert!(still_open(&flaky, &id).await);
        assert!(up.upload(&file).await.is_err());
        assert_eq!(flaky.creates.load(SeqCst), 2, "a lost upload resumed again");
    }

    /// As above, on a store that refuses a part of an upload it lost for good (s3s-fs's 403,
    /// as it refuses the resumed upload's own parts, which are started over on it): the
    /// probe's refusal was taken as no answer, and the resume was retried to the deadline
    /// and failed UPLOAD_ERROR (a CI flake: under load the part is cut before its 403).
    #[tokio::test]
    async fn a_resumed_upload_whose_probe_is_refused_for_good_is_started_over() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        // Its second upload's probe is refused for good, and its create comes after: within
        // 300 ms of the first upload's outage on a loaded machine, or it was refused unasked
        // (a flake).
        let (up, flaky) = flaky_uploader_within(dir.path(), 0, std::time::Duration::from_secs(5));
        flaky.unknown_denied.store(true, SeqCst);
        let (_data, file) = patterned_file(dir.path(), 233);
        flaky.parts_ok.store(1, SeqCst);
        assert!(up.upload(&file).await.is_err());
        let id = flaky.ids.lock().unwrap()[0].clone();
        flaky.parts_ok.store(usize::MAX, SeqCst);
        flaky.cut_off.store(true, SeqCst);
        assert!(still_open(&flaky, &id).await, "lost");
        let _ = up.upload(&file).await;
        assert_eq!(flaky.creates.load(SeqCst), 2, "a lost upload resumed again");
    }

    /// A parts file left beside no journal (a crash between the two removals) is not taken
    /// into the next upload of the same blob: its ids are another upload's.
    #[tokio::test]
    async fn a_new_upload_starts_with_no_parts_of_an_earlier_one() {
        let dir = tempfile::tempdir().unwrap();
        let up = uploader(dir.path());
        let stale = MultipartPart {
            upload: upload_tag("old-upload"),
            part: 0,
            id: "old-upload-part".into(),
            blake3: hex::encode([1u8; 32]),
        };
        let parts = dir.path().join(format!("{SHA}.parts"));
        std::fs::write(&parts, serde_json::to_vec(&stale).unwrap()).unwrap();
        let journal = up.open_journal(SHA, 3 << 20, 1 << 20).await.unwrap();
        assert!(!journal.resumed);
        assert!(!parts.exists());
        assert!(MultipartJournal::load(journal.path.as_ref().unwrap())
            .unwrap()
            .parts
            .is_empty());
        journal.remove();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
