//! Turning one local file into a blob: hash what is sent, detect a file that changes meanwhile.
//!
//! Small files are read once into memory, hashed and PUT with create-if-absent.
//! Large files are hashed in a first pass (the key must be known before the upload),
//! then streamed as a multipart upload while being hashed again; the upload is only
//! completed if the second pass saw exactly the bytes of the first. So a blob's bytes
//! always match its key, and a torn file never becomes a blob.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use object_store::WriteMultipart;

use c3_proto::FileEntry;

use crate::collect::{FileStamp, LocalFile};
use crate::digest::{DualHasher, Digests};
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
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            multipart_threshold: 16 * 1024 * 1024,
            min_part_size: 8 * 1024 * 1024,
            parts_in_flight: 4,
            files_in_flight: 8,
        }
    }
}

/// S3's limit on parts per upload.
const MAX_PARTS: u64 = 10_000;
const MIB: u64 = 1024 * 1024;

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
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("{path} changed while it was being uploaded")]
    Changed { path: PathBuf },
    #[error("{path} vanished before it could be uploaded")]
    Vanished { path: PathBuf },
    #[error("upload of {path} failed")]
    Store { path: PathBuf, #[source] source: StoreError },
    #[error("upload task of {path} failed")]
    Task { path: PathBuf, #[source] source: tokio::task::JoinError },
}

impl UploadError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            UploadError::Changed { .. } => true,
            UploadError::Store { source, .. } => !source.is_permanent(),
            UploadError::Read { .. } | UploadError::Vanished { .. } | UploadError::Task { .. } => false,
        }
    }
}

fn stat(path: &Path) -> Result<FileStamp, UploadError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(FileStamp::of(&m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(UploadError::Vanished { path: path.into() }),
        Err(source) => Err(UploadError::Read { path: path.into(), source }),
    }
}

/// Reads into `buf` until it is full or the file ends.
fn fill(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// Small file: one read, both digests, the bytes kept for the PUT.
fn read_small(path: &Path, before: FileStamp) -> Result<(Digests, Bytes), UploadError> {
    let read_err = |source| UploadError::Read { path: path.into(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let mut buf = Vec::with_capacity(before.size as usize);
    file.read_to_end(&mut buf).map_err(read_err)?;
    let digests = crate::digest::digest_bytes(&buf);
    Ok((digests, Bytes::from(buf)))
}

/// Large file, first pass: digests only.
fn hash_file(path: &Path) -> Result<Digests, UploadError> {
    let read_err = |source| UploadError::Read { path: path.into(), source };
    let mut file = File::open(path).map_err(read_err)?;
    let mut hasher = DualHasher::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = fill(&mut file, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, UploadError> + Send + 'static,
) -> Result<T, UploadError> {
    tokio::task::spawn_blocking(f).await.map_err(|source| UploadError::Task { path: path.into(), source })?
}

/// Uploads `file` as a blob. `Changed` means a later attempt should see a settled version.
pub async fn upload_file(store: &BlobStore, file: &LocalFile, opts: &UploadOptions) -> Result<Uploaded, UploadError> {
    let path = file.abs.clone();
    let before = stat(&path)?;
    let (digests, new) = if before.size <= opts.multipart_threshold {
        let p = path.clone();
        let (digests, bytes) = blocking(&path, move || read_small(&p, before)).await?;
        ensure_unchanged(&path, before, digests.size)?;
        let new = store
            .put_blob(&digests.sha256_hex(), bytes)
            .await
            .map_err(|source| UploadError::Store { path: path.clone(), source })?;
        (digests, new)
    } else {
        upload_large(store, &path, before, opts).await?
    };
    Ok(Uploaded {
        rel: file.rel.clone(),
        digests,
        stamp: before,
        new_bytes: if new { digests.size } else { 0 },
    })
}

fn ensure_unchanged(path: &Path, before: FileStamp, bytes_read: u64) -> Result<(), UploadError> {
    let after = stat(path)?;
    if after != before || bytes_read != before.size {
        return Err(UploadError::Changed { path: path.into() });
    }
    Ok(())
}

async fn upload_large(
    store: &BlobStore,
    path: &Path,
    before: FileStamp,
    opts: &UploadOptions,
) -> Result<(Digests, bool), UploadError> {
    let store_err = |source| UploadError::Store { path: path.into(), source };
    let p = path.to_path_buf();
    let first = blocking(path, move || hash_file(&p)).await?;
    ensure_unchanged(path, before, first.size)?;
    let sha = first.sha256_hex();
    if store.blob_exists(&sha).await.map_err(store_err)? {
        return Ok((first, false));
    }
    let part_size = part_size_for(first.size, opts.min_part_size) as usize;
    let upload = store.start_multipart(&sha).await.map_err(store_err)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_size);
    let read_err = |source| UploadError::Read { path: path.into(), source };
    let file = File::open(path).map_err(read_err)?;
    let mut reader = Some((file, DualHasher::new()));
    let mut outcome: Result<(), UploadError> = Ok(());
    while let Some((f, h)) = reader.take() {
        let p = path.to_path_buf();
        let read = blocking(path, move || {
            let (mut f, mut h) = (f, h);
            let mut chunk = BytesMut::zeroed(part_size);
            let n = fill(&mut f, &mut chunk).map_err(|source| UploadError::Read { path: p, source })?;
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
        if chunk.is_empty() {
            reader = Some((f, h));
            break;
        }
        writer.put(chunk);
        if let Err(source) = writer.wait_for_capacity(opts.parts_in_flight).await {
            outcome = Err(UploadError::Store {
                path: path.into(),
                source: StoreError::Op { op: "upload part", key: crate::store::blob_key(&sha), source },
            });
            break;
        }
        reader = Some((f, h));
    }
    let second = reader.map(|(_, h)| h.finish());
    let verified = outcome.and_then(|()| {
        if second != Some(first) {
            return Err(UploadError::Changed { path: path.into() });
        }
        ensure_unchanged(path, before, first.size)
    });
    match verified {
        Ok(()) => {
            writer.finish().await.map_err(|source| UploadError::Store {
                path: path.into(),
                source: StoreError::Op { op: "complete multipart upload", key: crate::store::blob_key(&sha), source },
            })?;
            Ok((first, true))
        }
        Err(e) => {
            // Not completed, so nothing appears under the key; abort frees the parts.
            if let Err(abort) = writer.abort().await {
                tracing::warn!(path = %path.display(), error = %abort, "could not abort multipart upload");
            }
            Err(e)
        }
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
}
