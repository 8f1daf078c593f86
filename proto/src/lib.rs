//! Wire types of c3-agent, and the only place that knows JSON.
//!
//! * [`spec`]: the job spec the scheduler writes (contract §3).
//! * [`manifest`]: the manifest stored next to a job's blobs (contract §6), versioned.
//! * [`control`]: messages sent to the control plane (contract §7).
//! * [`record`]: what the agent keeps in its state dir so that `recover` can finish a job.
//! * [`socket`]: the job's agent socket (`c3-agent publish`).
//!
//! Everything else in the workspace handles these as typed values and calls
//! `to_json`/`from_json` here, so a format change has exactly one room.

/// `to_json`/`from_json` for wire types: compact for messages, pretty for files people read.
macro_rules! json_io {
    ($to:ident; $($t:ty),*) => {$(
        impl $t {
            pub fn to_json(&self) -> Vec<u8> {
                serde_json::$to(self).expect("wire types always serialize")
            }
            pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
                serde_json::from_slice(bytes)
            }
        }
    )*};
}

pub mod control;
pub mod manifest;
pub mod record;
pub mod socket;
pub mod spec;

pub use control::{
    ArtifactsRegistration, ArtifactsReply, FailReason, JobState, OutputChunk, StatusReport, Stream,
};
pub use manifest::{
    EntryRef, FileEntry, ListedFile, LogEntry, Logs, Manifest, ManifestError, MANIFEST_VERSION,
};
pub use record::{
    Destination, JobFacts, JobUser, MultipartPart, MultipartRecord, OutboxEntry, Phase,
    ProcIdentity, ProgressRecord, RecordedResult, RunRecord, Synced,
};
pub use socket::{PublishedFile, SocketReply, SocketRequest};
pub use spec::{DatasetSpec, JobSpec, ParsedSpec, SpecError};

/// Parse a small JSON document the job itself wrote (its structured result).
pub fn parse_json_value(bytes: &[u8]) -> Result<serde_json::Value, serde_json::Error> {
    serde_json::from_slice(bytes)
}

pub use serde_json::Value as JsonValue;
