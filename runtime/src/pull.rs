//! Downloading a job's files per its manifest, each verified against its sha256
//! (`c3-agent pull`, and inputs materialized for job chaining).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::{StreamExt, TryStreamExt};

use c3_proto::{FileEntry, Manifest, ManifestError};

use crate::digest::Sha256Hasher;
use crate::store::{manifest_key, BlobStore, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("job {job_id} has no manifest in the store")]
    NoManifest {
        job_id: String,
        #[source]
        source: StoreError,
    },
    #[error("manifest of job {job_id} is unusable")]
    BadManifest {
        job_id: String,
        #[source]
        source: ManifestError,
    },
    #[error("cannot fetch {path}")]
    Blob {
        path: String,
        #[source]
        source: StoreError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: content does not match the manifest (sha256 {actual}, expected {expected})")]
    Mismatch {
        path: String,
        expected: String,
        actual: String,
    },
    #[error("{path}: a symlink in the destination leads outside it; refusing to write there")]
    Escapes { path: String },
    #[error("download task for {path} failed")]
    Task { path: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PullSummary {
    pub files: u64,
    pub bytes: u64,
}

pub async fn read_manifest(store: &BlobStore, job_id: &str) -> Result<Manifest, PullError> {
    let bytes = store
        .get_bytes(&manifest_key(job_id))
        .await
        .map_err(|source| PullError::NoManifest {
            job_id: job_id.into(),
            source,
        })?;
    Manifest::from_json(&bytes).map_err(|source| PullError::BadManifest {
        job_id: job_id.into(),
        source,
    })
}

/// Writes every file of `manifest` under `dest`; stops at the first error.
pub async fn pull(
    store: &BlobStore,
    manifest: &Manifest,
    dest: &Path,
) -> Result<PullSummary, PullError> {
    let werr = |source| PullError::Write {
        path: dest.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dest).map_err(werr)?;
    // Resolved once: every file's directory must resolve to a place below it.
    let root = dest.canonicalize().map_err(werr)?;
    let results = futures::stream::iter(manifest.files.iter().enumerate())
        .map(|(i, entry)| fetch(store, entry, dest, &root, i))
        .buffer_unordered(8)
        .try_collect::<Vec<u64>>()
        .await?;
    Ok(PullSummary {
        files: results.len() as u64,
        bytes: results.iter().sum(),
    })
}

/// Streams one blob into a temp file beside its target, hashing off the reactor, then renames.
async fn fetch(
    store: &BlobStore,
    entry: &FileEntry,
    dest: &Path,
    root: &Path,
    index: usize,
) -> Result<u64, PullError> {
    let target = dest.join(&entry.path);
    let dir = target
        .parent()
        .expect("manifest paths have a directory part")
        .to_path_buf();
    let werr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PullError::Write { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(werr(&dir))?;
    // A symlink already inside `dest` must not redirect the download (the agent may be root,
    // and `dest` may be a workdir a job wrote to before).
    if !dir.canonicalize().is_ok_and(|d| d.starts_with(root)) {
        return Err(PullError::Escapes {
            path: entry.path.clone(),
        });
    }
    let tmp = dir.join(format!(".c3-pull-{}-{index}.part", std::process::id()));
    let result = store
        .get_blob(&entry.sha256)
        .await
        .map_err(|source| PullError::Blob {
            path: entry.path.clone(),
            source,
        })?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    let writer = {
        let tmp = tmp.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
            let mut file = std::fs::File::create(&tmp)?;
            let mut hasher = Sha256Hasher::default();
            let mut size = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                size += chunk.len() as u64;
            }
            file.sync_all()?;
            Ok((hasher.finish_hex(), size))
        })
    };
    let mut body = result.into_stream();
    let mut fetch_error = None;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => {
                if tx.send(bytes).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(source) => {
                fetch_error = Some(PullError::Blob {
                    path: entry.path.clone(),
                    source: StoreError::Op {
                        op: "get",
                        key: crate::store::blob_key(&entry.sha256),
                        source,
                    },
                });
                break;
            }
        }
    }
    drop(tx);
    let written = writer.await.map_err(|_| PullError::Task {
        path: entry.path.clone(),
    })?;
    let outcome = match (fetch_error, written) {
        (Some(e), _) => Err(e),
        (None, Err(source)) => Err(PullError::Write {
            path: tmp.clone(),
            source,
        }),
        (None, Ok((actual, _))) if actual != entry.sha256 => Err(PullError::Mismatch {
            path: entry.path.clone(),
            expected: entry.sha256.clone(),
            actual,
        }),
        (None, Ok((_, size))) => Ok(size),
    };
    let size = match outcome {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    finalize(&tmp, &target, entry).map_err(werr(&target))?;
    Ok(size)
}

fn finalize(tmp: &Path, target: &Path, entry: &FileEntry) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if entry.mtime_ns >= 0 {
        let mtime = SystemTime::UNIX_EPOCH + Duration::from_nanos(entry.mtime_ns as u64);
        std::fs::File::options()
            .write(true)
            .open(tmp)?
            .set_modified(mtime)?;
    }
    // After the mtime, which needs write access; setuid/setgid/sticky are never restored.
    std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(entry.mode & 0o777))?;
    std::fs::rename(tmp, target)
}
