//! The one place that assembles and writes a job's manifest (contract §6): in progress
//! (`complete: false`, while the job runs) and complete (after the final sync), always at the
//! attempt's key first and then at the job's, unless a newer attempt's is there.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use c3_proto::{JobSpec, Logs, Manifest};

use crate::store::{
    attempt_manifest_key, manifest_key, BlobStore, DocVersion, DocWrite, StoreError,
};
use crate::sync::{Checkpoint, SyncBook};

/// How often a long sync after the job ([`Checkpoint`]) lists what it stored: well within
/// the half hour that a blob found stored (and not touched) is trusted to stay
/// (`store::UNTOUCHED_KEPT`), `gc` sparing only what a manifest names once it is an hour old.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(10 * 60);

/// Writes manifests of one attempt. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ManifestWriter {
    store: BlobStore,
    job_id: String,
    project: Option<String>,
    attempt: u32,
    /// The run record's `run_id`, written into every manifest.
    run_id: Option<String>,
    /// `store.max_manifest_bytes`: what readers (`pull`, `ls`, datasets, `gc`) accept. A
    /// bigger manifest is not written: every `gc` after it would refuse to run.
    max_bytes: u64,
    /// What this attempt knows of the job's key, shared by the clones (live sync's, publish's,
    /// the seal's; all in the collector task, one write at a time).
    job_key: Arc<Mutex<JobKey>>,
    /// [`CHECKPOINT_EVERY`]; shorter in tests.
    checkpoint_every: Duration,
    /// The logs and result of the complete manifest this writer's attempt had when `recover`
    /// took it up again: its in-progress writes stay complete and carry them, rather than
    /// put an incomplete manifest with neither over it until the seal.
    carried: Option<Arc<(Option<Logs>, serde_json::Value)>>,
    /// In-progress writes are not made ([`ManifestWriter::holding_in_progress`]).
    held: bool,
}

/// The job's manifest key as this attempt's writer last saw it.
#[derive(Debug, Default)]
struct JobKey {
    /// The version of the document this writer last put there: the next write replaces
    /// that one without looking first, and anything else only after a look.
    ours: Option<DocVersion>,
    /// A newer attempt's manifest is there (or under way): this attempt's manifests stay at
    /// its own key. An older attempt finished late (`recover`, `resync`, a node cut off
    /// while the job was retried elsewhere) must not replace what the job's key says.
    superseded: bool,
    /// The store refused a look (a policy without HEAD or LIST): the job's key is written
    /// as it always was, without one (and without a warning each time).
    blind: bool,
}

/// Rounds of "look, then write over what was seen" before the job's key counts as not
/// written: each lost round means another writer put a document there meanwhile.
const JOB_KEY_TRIES: usize = 5;

/// What a manifest may take besides its files' entries (a quarter of a smaller cap): its
/// header, the two logs, and the job's result as indented (64 KiB at most when read, more
/// when nested and indented; one that does not fit gives way, see
/// [`ManifestWriter::complete`]).
pub const ENVELOPE_BYTES: u64 = 256 * 1024;

/// What of a manifest of `max_bytes` its files' entries may take ([`ManifestWriter::max_bytes`]).
pub fn entries_room(max_bytes: u64) -> u64 {
    // A small cap (a test's, an operator's) keeps three quarters for the files.
    max_bytes.saturating_sub(ENVELOPE_BYTES.min(max_bytes / 4))
}

impl ManifestWriter {
    pub fn new(store: BlobStore, spec: &JobSpec, max_bytes: u64) -> Self {
        ManifestWriter {
            store,
            max_bytes,
            job_id: spec.job_id.clone(),
            project: spec.project.clone(),
            attempt: spec.attempt,
            run_id: None,
            job_key: Arc::default(),
            checkpoint_every: CHECKPOINT_EVERY,
            carried: None,
            held: false,
        }
    }

    /// `hold`: in-progress manifests are not written (the seal still is). A sidecar that
    /// could not read the attempt's manifest its earlier watch stored (a write-only bucket's
    /// 403) watches on with an empty book: its in-progress writes replaced that listing with
    /// one of only what it stored since, and a second death with the files gone left a
    /// recover nothing to list the earlier ones by (gc took their blobs). The final sync
    /// releases the hold once its scan sees all of the output.
    pub fn holding_in_progress(mut self, hold: bool) -> Self {
        self.held = hold;
        self
    }

    /// Writes in progress as `earlier` (this attempt's manifest, read back) when it is
    /// complete: with its logs and result, `complete: true`.
    pub fn continuing(mut self, earlier: &Manifest) -> Self {
        self.carried = earlier
            .complete
            .then(|| Arc::new((earlier.logs.clone(), earlier.result.clone())));
        self
    }

    /// Writes `run_id` (the run record's) into every manifest.
    pub fn for_run(mut self, run_id: Option<String>) -> Self {
        self.run_id = run_id;
        self
    }

    /// Lists a long sync's progress this often instead of [`CHECKPOINT_EVERY`].
    pub fn checkpoints_every(mut self, every: Duration) -> Self {
        self.checkpoint_every = every;
        self
    }

    /// The room the files tracked may take, each at most
    /// [`c3_proto::manifest::entry_ceiling`]: `store.max_manifest_bytes` but what the rest of
    /// the manifest may take ([`ENVELOPE_BYTES`]). Collecting more is of no use (the manifest
    /// could not be written), and each file tracked costs the root agent memory, which a job
    /// could otherwise run up without bound with empty files (256 MiB: at most about 860,000
    /// files, fewer with long paths).
    pub fn max_bytes(&self) -> u64 {
        entries_room(self.max_bytes)
    }

    /// Where the last manifest written is (what the artifacts registration names): the
    /// job's key, or the attempt's when a newer attempt's manifest holds the job's.
    pub fn key(&self) -> String {
        if self.superseded() {
            attempt_manifest_key(&self.job_id, self.attempt)
        } else {
            manifest_key(&self.job_id)
        }
    }

    fn superseded(&self) -> bool {
        self.job_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .superseded
    }

    /// What is stored so far, `complete: false`. Lists only blobs that exist (the book holds
    /// only uploads that returned). Not written again while the book is as the last one
    /// written lists it: a job calling `wait_all` in a loop would otherwise have both
    /// manifests rewritten each time, whatever `manifest_interval_ms` says.
    pub async fn in_progress(&self, book: &mut SyncBook) -> Result<(), StoreError> {
        if self.held || book.listed() {
            return Ok(());
        }
        let mut m = Manifest::new(&self.job_id, self.project.clone(), self.attempt);
        m.run_id.clone_from(&self.run_id);
        if let Some(carried) = &self.carried {
            m.complete = true;
            (m.logs, m.result) = (carried.0.clone(), carried.1.clone());
        }
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
        m.run_id.clone_from(&self.run_id);
        m.complete = true;
        m.logs = logs;
        m.result = result;
        let document = match self.document(&m, book) {
            // A result that takes more than its share once indented (a deep 64 KiB one can
            // take megabytes) gives way: the files' listing is the manifest's purpose.
            Err(StoreError::TooLarge { .. }) if !m.result.is_null() => {
                tracing::warn!(
                    "the job's result does not fit in the manifest beside its files; the manifest says so instead"
                );
                m.result = serde_json::json!({
                    "c3_error": "the job's result did not fit in the manifest beside its files"
                });
                self.document(&m, book)?
            }
            other => other?,
        };
        self.write(document).await
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
    /// attempt's output, and the job's key says the newest attempt's.
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
        self.write_job_key(bytes).await?;
        Ok(sha)
    }

    /// The job's key, unless a newer attempt wrote its manifest. Each write replaces only
    /// the document this writer saw there (a conditional put): a newer attempt's write that
    /// lands between the look and the write makes it look again, and then stay away.
    async fn write_job_key(&self, bytes: bytes::Bytes) -> Result<(), StoreError> {
        let key = manifest_key(&self.job_id);
        let (superseded, blind, ours) = {
            let known = self.job_key.lock().unwrap_or_else(|e| e.into_inner());
            (known.superseded, known.blind, known.ours.clone())
        };
        if superseded {
            return Ok(());
        }
        if blind {
            return self.write_blind(&key, bytes).await;
        }
        // `Some(expected)`: what should be there (`None` inside: nothing); `None`: look first.
        let mut expected = Some(ours);
        for _ in 0..JOB_KEY_TRIES {
            let over = match expected.take() {
                Some(over) => over,
                None => match self.look().await {
                    Ok(Look::Newer(newer)) => {
                        self.superseded_by(newer);
                        return Ok(());
                    }
                    Ok(Look::At(version)) => version,
                    // Without a look (a policy that denies HEAD or LIST) the write goes
                    // ahead as it always did: the job's manifest must not go missing.
                    Err(e) if e.is_permanent() => {
                        tracing::warn!(error = %crate::error_chain(&e), "cannot tell whether a newer attempt wrote the job's manifest; writing it anyway");
                        return self.write_blind(&key, bytes).await;
                    }
                    // A look that failed for now (a store down, a listing that trickled
                    // past the deadline) is no refusal: the write waits for a look, since
                    // going ahead blind is what lets an older attempt replace a newer one's.
                    Err(e) => return Err(e),
                },
            };
            match self
                .store
                .put_document_over(&key, bytes.clone(), over.as_ref())
                .await
            {
                Ok(DocWrite::Written(version)) => {
                    self.job_key.lock().unwrap_or_else(|e| e.into_inner()).ours = Some(version);
                    return Ok(());
                }
                Ok(DocWrite::Changed) => {}
                // A store without conditional writes checks the key with a HEAD, and a
                // write-only policy denies it: as when the look is denied, the job's manifest
                // must not go missing over a check the store will never allow.
                Err(e) if e.is_head_denied() => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot check the job's manifest before replacing it; writing it anyway");
                    return self.write_blind(&key, bytes).await;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Contended { key })
    }

    /// A newer attempt's manifest is the job's: this attempt's stay at its own key.
    fn superseded_by(&self, newer: u32) {
        self.job_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .superseded = true;
        tracing::info!(
            newer,
            "a newer attempt's manifest is the job's; this attempt's stays at its own key"
        );
    }

    /// Writes the job's key without a check of what is there (the store allows none), unless
    /// the attempts' keys, when the store lists them, show a newer attempt's manifest: a
    /// store without conditional writes that denies HEAD had an older attempt finished late
    /// (`recover`, `resync`) replace the newer one's, each write of it after.
    async fn write_blind(&self, key: &str, bytes: bytes::Bytes) -> Result<(), StoreError> {
        // Once written blind, the job's key holds this attempt's own manifest: it is not
        // read again at each checkpoint.
        let blind = self.job_key.lock().unwrap_or_else(|e| e.into_inner()).blind;
        match self.store.newest_attempt(&self.job_id).await {
            Ok(Some(newer)) if newer > self.attempt => {
                self.superseded_by(newer);
                return Ok(());
            }
            Ok(_) => {}
            // The listing refused (denied, or past its bound: a gateway that drops the
            // continuation token or ignores the prefix): the job's key itself says whose it
            // is, where the store lets it be read. Written blind past a refusal for the
            // listing's size, an older attempt finished late replaced the newer one's.
            Err(e) if e.is_permanent() && blind => {}
            Err(e) if e.is_permanent() => match self.attempt_at_job_key(key).await {
                Ok(Some(newer)) if newer > self.attempt => {
                    self.superseded_by(newer);
                    return Ok(());
                }
                Ok(_) => {}
                // Denied too: the job's manifest must not go missing.
                Err(e) if e.is_permanent() => {}
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
        self.job_key.lock().unwrap_or_else(|e| e.into_inner()).blind = true;
        self.store.put_document(key, bytes).await
    }

    /// The attempt whose manifest the job's key holds: `None` when there is none, or one of
    /// another job (nothing to keep from this attempt's). Only its `job_id` and `attempt` are
    /// read: a newer agent's manifest, which this one cannot take in whole, is the one most
    /// worth keeping. One over `max_manifest_bytes` is taken as a newer attempt's.
    async fn attempt_at_job_key(&self, key: &str) -> Result<Option<u32>, StoreError> {
        #[derive(serde::Deserialize)]
        struct Whose {
            job_id: String,
            attempt: u32,
        }
        let bytes = match self.store.get_bytes_capped(key, self.max_bytes).await {
            Ok(bytes) => bytes,
            Err(e) if self.store.says_absent(&e) => return Ok(None),
            Err(StoreError::TooLarge { .. }) => return Ok(Some(u32::MAX)),
            Err(e) => return Err(e),
        };
        let whose =
            tokio::task::spawn_blocking(move || serde_json::from_slice::<Whose>(&bytes).ok())
                .await
                .ok()
                .flatten();
        Ok(whose.filter(|w| w.job_id == self.job_id).map(|w| w.attempt))
    }

    /// The job's key now, and whether a newer attempt has stored a manifest: at its own key,
    /// which comes first (so a newer attempt that is about to write the job's key counts).
    async fn look(&self) -> Result<Look, StoreError> {
        let version = self
            .store
            .document_version(&manifest_key(&self.job_id))
            .await?;
        match self.store.newest_attempt(&self.job_id).await? {
            Some(newer) if newer > self.attempt => Ok(Look::Newer(newer)),
            _ => Ok(Look::At(version)),
        }
    }
}

/// What [`ManifestWriter::look`] found.
enum Look {
    /// The job's key holds this version (`None`: nothing), and no newer attempt wrote.
    At(Option<DocVersion>),
    /// This newer attempt stored a manifest.
    Newer(u32),
}

impl Checkpoint for ManifestWriter {
    fn every(&self) -> Duration {
        self.checkpoint_every
    }

    fn save<'a>(
        &'a self,
        book: &'a mut SyncBook,
    ) -> futures::future::BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(self.in_progress(book))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn writer(store: &BlobStore, attempt: u32) -> ManifestWriter {
        let json = format!(r#"{{"job_id":"j","command":["true"],"attempt":{attempt}}}"#);
        let spec = JobSpec::from_json(json.as_bytes()).unwrap().spec;
        ManifestWriter::new(store.clone(), &spec, 1 << 20)
    }

    /// `recover` taking up a finished attempt (its complete manifest, with logs and result,
    /// sealed and registered) writes what it stores as it goes: those writes stay complete,
    /// with the logs and result, where an incomplete manifest with neither went over it until
    /// the seal (for ever, when `recover` was cut off each hour), and gc took the logs.
    #[tokio::test]
    async fn a_finished_attempt_taken_up_again_stays_complete_as_it_goes() {
        let store = BlobStore::in_memory();
        let log = c3_proto::LogEntry {
            size: 3,
            sha256: "ab".repeat(32),
        };
        let first = writer(&store, 1);
        let logs = Logs {
            stdout: log.clone(),
            stderr: log,
        };
        let result = serde_json::json!({"loss": 0.5});
        first
            .complete(&SyncBook::default(), Some(logs.clone()), result.clone())
            .await
            .unwrap();
        let earlier =
            Manifest::from_json(&store.get_bytes("jobs/j/manifest.json").await.unwrap()).unwrap();
        let again = writer(&store, 1).continuing(&earlier);
        again.in_progress(&mut SyncBook::default()).await.unwrap();
        for key in ["jobs/j/manifest.json", "jobs/j/attempts/1/manifest.json"] {
            let now = Manifest::from_json(&store.get_bytes(key).await.unwrap()).unwrap();
            assert!(now.complete, "{key}");
            assert_eq!(now.logs, Some(logs.clone()), "{key}");
            assert_eq!(now.result, result, "{key}");
        }
        // An attempt whose agent died mid-run is still in progress as it goes.
        let crashed = writer(&store, 2);
        crashed.in_progress(&mut SyncBook::default()).await.unwrap();
        let earlier = Manifest::from_json(
            &store
                .get_bytes("jobs/j/attempts/2/manifest.json")
                .await
                .unwrap(),
        )
        .unwrap();
        let again = writer(&store, 2).continuing(&earlier);
        let mut book = SyncBook::default();
        book.listed_before(&[], false);
        again.in_progress(&mut book).await.unwrap();
        let now = Manifest::from_json(
            &store
                .get_bytes("jobs/j/attempts/2/manifest.json")
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(!now.complete);
    }

    async fn stored_attempt(store: &BlobStore, key: &str) -> u32 {
        let bytes = store.get_bytes(key).await.unwrap();
        Manifest::from_json(&bytes).unwrap().attempt
    }

    /// A resync of attempt 1 after attempt 2 finished: attempt 1's manifest goes to its own
    /// key only, and says so to whoever registers it; attempt 2 keeps the job's key.
    async fn an_older_attempt_never_replaces_the_job_manifest(store: BlobStore) {
        let book = SyncBook::default();
        let (first, second) = (writer(&store, 1), writer(&store, 2));
        first
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 1);
        second
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 2);
        assert_eq!(second.key(), "jobs/j/manifest.json");
        // The late writer of attempt 1: the one that wrote before, and a fresh one (recover).
        for late in [first, writer(&store, 1)] {
            late.complete(&book, None, serde_json::Value::Null)
                .await
                .unwrap();
            assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 2);
            assert_eq!(
                stored_attempt(&store, "jobs/j/attempts/1/manifest.json").await,
                1
            );
            assert_eq!(late.key(), "jobs/j/attempts/1/manifest.json");
        }
        // Attempt 2 goes on writing over its own document, and a third attempt over it.
        second
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        let third = writer(&store, 3);
        third
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 3);
        second
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 3);
    }

    #[tokio::test]
    async fn an_older_attempt_never_replaces_the_job_manifest_in_a_conditional_store() {
        an_older_attempt_never_replaces_the_job_manifest(BlobStore::in_memory()).await;
    }

    #[tokio::test]
    async fn an_older_attempt_never_replaces_the_job_manifest_in_the_file_store() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("store").display());
        let store = BlobStore::open(&StoreConfig::for_tests(&url)).unwrap();
        an_older_attempt_never_replaces_the_job_manifest(store).await;
    }

    /// An attempts listing that never answers while attempt 1 (`recover`, a late writer)
    /// completes after attempt 2: the look failed past the deadline, was taken for a
    /// refusal, and attempt 1 wrote the job's key blind over attempt 2's manifest.
    #[tokio::test(start_paused = true)]
    async fn a_listing_too_slow_never_lets_an_older_attempt_write_blind() {
        use crate::store::tests::{store_over, Faulty, Listing};
        let faulty = Faulty {
            listing: Listing::Hanging,
            ..Default::default()
        };
        let store = store_over(
            std::sync::Arc::new(faulty),
            std::time::Duration::from_secs(1),
        );
        let book = SyncBook::default();
        writer(&store, 2)
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        let late = writer(&store, 1);
        let e = late
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap_err();
        assert!(!e.is_permanent(), "{e}");
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 2);
        assert_eq!(
            stored_attempt(&store, "jobs/j/attempts/1/manifest.json").await,
            1
        );
    }

    /// Another writer of the same attempt (an agent whose work `recover` took over) put a
    /// document there meanwhile: the write looks again and goes over it, never blindly.
    #[tokio::test]
    async fn a_document_changed_meanwhile_is_looked_at_before_it_is_replaced() {
        let store = BlobStore::in_memory();
        let book = SyncBook::default();
        let (one, other) = (writer(&store, 1), writer(&store, 1));
        one.in_progress(&mut SyncBook::default()).await.unwrap();
        other
            .complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        one.complete(&book, None, serde_json::Value::Null)
            .await
            .unwrap();
        assert_eq!(one.key(), "jobs/j/manifest.json");
        assert_eq!(stored_attempt(&store, "jobs/j/manifest.json").await, 1);
    }
}
