//! Layout of the agent's state dir, and crash-safe writes into it.
//!
//! ```text
//! <state_dir>/store/                                  the embedded default store (file://)
//! <state_dir>/jobs/<job_id>/job.json                  written by the scheduler
//! <state_dir>/jobs/<job_id>/work/                     default workdir
//! <state_dir>/jobs/<job_id>/attempts/<n>/run.json     RunRecord: what recover needs
//! <state_dir>/jobs/<job_id>/attempts/<n>/stdout.log   the job's whole output
//! <state_dir>/jobs/<job_id>/attempts/<n>/stderr.log
//! <state_dir>/jobs/<job_id>/attempts/<n>/reports.jsonl  reports, when there is no control plane
//! <state_dir>/outbox/<job_id>/<attempt>-<order>-<kind>.json  reports not yet delivered
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use c3_proto::RunRecord;

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state dir: cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state dir: cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state dir: {path} is not a valid record")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        StateDir { root: root.into() }
    }

    pub fn default_store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.root.join("jobs").join(job_id)
    }

    pub fn default_workdir(&self, job_id: &str) -> PathBuf {
        self.job_dir(job_id).join("work")
    }

    pub fn attempt_dir(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.job_dir(job_id)
            .join("attempts")
            .join(attempt.to_string())
    }

    pub fn run_record_path(&self, job_id: &str, attempt: u32) -> PathBuf {
        self.attempt_dir(job_id, attempt).join("run.json")
    }

    pub fn log_path(&self, job_id: &str, attempt: u32, stream: c3_proto::Stream) -> PathBuf {
        self.attempt_dir(job_id, attempt)
            .join(format!("{}.log", stream.as_str()))
    }

    pub fn outbox_root(&self) -> PathBuf {
        self.root.join("outbox")
    }

    pub fn outbox_dir(&self, job_id: &str) -> PathBuf {
        self.outbox_root().join(job_id)
    }

    pub fn write_record(&self, record: &RunRecord) -> Result<(), StateError> {
        write_atomic(
            &self.run_record_path(&record.spec.job_id, record.spec.attempt),
            &record.to_json(),
        )
    }

    pub fn read_record(&self, path: &Path) -> Result<RunRecord, StateError> {
        let bytes = std::fs::read(path).map_err(|source| StateError::Read {
            path: path.into(),
            source,
        })?;
        RunRecord::from_json(&bytes).map_err(|e| StateError::Corrupt {
            path: path.into(),
            source: e,
        })
    }

    /// Every run record, oldest job first.
    pub fn all_records(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(jobs) = std::fs::read_dir(self.root.join("jobs")) else {
            return out;
        };
        for job in jobs.flatten() {
            let Ok(attempts) = std::fs::read_dir(job.path().join("attempts")) else {
                continue;
            };
            for attempt in attempts.flatten() {
                let record = attempt.path().join("run.json");
                if record.is_file() {
                    out.push(record);
                }
            }
        }
        out.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        out
    }
}

/// Write to a temp file, fsync, rename: a reader (or a crash) never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let err = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let dir = path.parent().expect("state files live in a directory");
    std::fs::create_dir_all(dir).map_err(err)?;
    let mut tmp = tempfile_in(dir, path).map_err(err)?;
    tmp.1.write_all(bytes).map_err(err)?;
    tmp.1.sync_all().map_err(err)?;
    std::fs::rename(&tmp.0, path).map_err(err)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn tempfile_in(dir: &Path, target: &Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp)?;
    Ok((tmp, file))
}
