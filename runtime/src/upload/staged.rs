//! Large files on the file store: read once, streamed into a staging object while hashed,
//! then hard-linked to their key (unless that blob exists) once the stamp proves the file
//! did not change meanwhile.

use std::io::Read;
use std::path::Path;

use tokio::task::JoinSet;

use super::{
    blocking, ensure_unchanged_off, fill, part_size_for, store_err, UploadError, Uploader,
};
use crate::collect::FileStamp;
use crate::digest::{Digests, DualHasher};
use crate::store::StoreError;

impl Uploader {
    pub(super) async fn upload_staged(
        &self,
        path: &Path,
        before: FileStamp,
    ) -> Result<(Digests, bool), UploadError> {
        let store_err = store_err(path);
        let n = self
            .staged
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging_key = format!(
            "{}/{}{}-{n}",
            self.staging,
            self.attempt_tag,
            std::process::id()
        );
        let part_size = part_size_for(before.size, self.opts.min_part_size);
        let opened = self.open(path, before, true).await?;
        let file = opened.take(before.size + 1);
        // `staged-eio-late`: the blip comes after a long copy (2.5 s, past the tests' 2 s
        // deadline).
        let late = crate::fault::fail_once("staged-eio-late");
        if late || crate::fault::fail_once("staged-eio") {
            if late {
                tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            }
            return Err(store_err(StoreError::Op {
                op: "write part",
                key: staging_key,
                source: object_store::Error::Generic {
                    store: "LocalFileSystem",
                    source: Box::new(std::io::Error::from_raw_os_error(libc::EIO)),
                },
            }));
        }
        let mut upload = self
            .store
            .start_multipart_at(&staging_key)
            .await
            .map_err(store_err)?;
        let mut reader = Some((file, DualHasher::new()));
        let mut parts: JoinSet<Result<(), UploadError>> = JoinSet::new();
        let mut outcome = Ok(());
        // Bytes read so far: the next write is the rest of the file, at most a part.
        let mut offset = 0u64;
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
            // Past the checked size (the read that sees the end, or growth the size check
            // turns into "changed") there is nothing worth pacing.
            self.pace(part_size.min(before.size.saturating_sub(offset)))
                .await;
            let (guard, mut chunk) = self.budget.acquire_buffer(part_size as usize).await;
            let p = path.to_path_buf();
            let read = blocking(path, move || {
                let (mut f, mut h) = (f, h);
                let n = fill(&mut f, &mut chunk).map_err(|source| super::read_error(&p, source))?;
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
            offset += chunk.len() as u64;
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
                budget.recycle(chunk, guard);
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
        let verified = match (outcome, digests) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(d)) if d.size == before.size => {
                ensure_unchanged_off(self.root.clone(), path, before)
                    .await
                    .map(|()| d)
            }
            (Ok(()), _) => Err(UploadError::Changed { path: path.into() }),
        };
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
            .promote(&staging_key, &digests.sha256_hex(), digests.size)
            .await
            .map_err(store_err)?;
        Ok((digests, new))
    }
}
