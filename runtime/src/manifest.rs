//! The one place that assembles and writes a job's manifest (contract §6): in progress
//! (`complete: false`, while the job runs) and complete (after the final sync), always at the
//! attempt's key first and then at the job's.

use c3_proto::{JobSpec, Logs, Manifest};

use crate::store::{attempt_manifest_key, manifest_key, BlobStore, StoreError};
use crate::sync::SyncBook;

/// Writes manifests of one attempt. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManifestWriter {
    store: BlobStore,
    job_id: String,
    project: Option<String>,
    attempt: u32,
    /// `store.max_manifest_bytes`: what readers (`pull`, `ls`, datasets, `gc`) accept. A
    /// bigger manifest is not written: every `gc` after it would refuse to run.
    max_bytes: u64,
}

impl ManifestWriter {
    pub fn new(store: BlobStore, spec: &JobSpec, max_bytes: u64) -> Self {
        ManifestWriter {
            store,
            max_bytes,
            job_id: spec.job_id.clone(),
            project: spec.project.clone(),
            attempt: spec.attempt,
        }
    }

    /// `store.max_manifest_bytes`: the room the files tracked may take, each at least
    /// [`c3_proto::manifest::entry_floor`]. Collecting more is of no use (the manifest could
    /// not be written), and each file tracked costs the root agent memory, which a job could
    /// otherwise run up without bound with empty files (256 MiB: at most 1,342,177 files,
    /// fewer with long paths).
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// The job's manifest key (what the artifacts registration names).
    pub fn key(&self) -> String {
        manifest_key(&self.job_id)
    }

    /// What is stored so far, `complete: false`. Lists only blobs that exist (the book holds
    /// only uploads that returned). Not written again while the book is as the last one
    /// written lists it: a job calling `wait_all` in a loop would otherwise have both
    /// manifests rewritten each time, whatever `manifest_interval_ms` says.
    pub async fn in_progress(&self, book: &mut SyncBook) -> Result<(), StoreError> {
        if book.listed() {
            return Ok(());
        }
        let m = Manifest::new(&self.job_id, self.project.clone(), self.attempt);
        self.write(self.document(&m, book)?).await?;
        book.mark_listed();
        Ok(())
    }

    /// The last write, after every blob it lists: `complete: true`. Returns its sha256.
    pub async fn complete(
        &self,
        book: &SyncBook,
        logs: Option<Logs>,
        result: serde_json::Value,
    ) -> Result<String, StoreError> {
        let mut m = Manifest::new(&self.job_id, self.project.clone(), self.attempt);
        m.complete = true;
        m.logs = logs;
        m.result = result;
        self.write(self.document(&m, book)?).await
    }

    /// The document, never built past `max_bytes` (what could not be stored anyway).
    fn document(&self, m: &Manifest, book: &SyncBook) -> Result<Vec<u8>, StoreError> {
        m.to_json_within(book.listing(), self.max_bytes)
            .ok_or_else(|| StoreError::TooLarge {
                key: manifest_key(&self.job_id),
                size: self.max_bytes.saturating_add(1),
                max: self.max_bytes,
            })
    }

    /// The per-attempt key first, then the job's: a retried job never hides its failed
    /// attempt's output.
    async fn write(&self, json: Vec<u8>) -> Result<String, StoreError> {
        let bytes = bytes::Bytes::from(json);
        if bytes.len() as u64 > self.max_bytes {
            return Err(StoreError::TooLarge {
                key: manifest_key(&self.job_id),
                size: bytes.len() as u64,
                max: self.max_bytes,
            });
        }
        let sha = crate::digest::sha256_hex(&bytes);
        self.store
            .put_document(
                &attempt_manifest_key(&self.job_id, self.attempt),
                bytes.clone(),
            )
            .await?;
        self.store
            .put_document(&manifest_key(&self.job_id), bytes)
            .await?;
        Ok(sha)
    }
}
