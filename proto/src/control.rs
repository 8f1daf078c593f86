//! Control-plane messages (contract §7).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Running,
    /// The job's processes are gone (its GPU is free); the final sync is under way.
    Finalizing,
    Succeeded,
    Failed,
    Canceled,
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailReason {
    ScriptError,
    UploadError,
    DatasetError,
    AgentError,
    /// The kernel's OOM killer ended the job.
    OutOfMemory,
}

impl JobState {
    /// The contract's spelling, for logs and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "RUNNING",
            JobState::Finalizing => "FINALIZING",
            JobState::Succeeded => "SUCCEEDED",
            JobState::Failed => "FAILED",
            JobState::Canceled => "CANCELED",
            JobState::TimedOut => "TIMED_OUT",
        }
    }
}

impl FailReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::ScriptError => "SCRIPT_ERROR",
            FailReason::UploadError => "UPLOAD_ERROR",
            FailReason::DatasetError => "DATASET_ERROR",
            FailReason::AgentError => "AGENT_ERROR",
            FailReason::OutOfMemory => "OUT_OF_MEMORY",
        }
    }
}

/// `POST {url}/v1/jobs/{job_id}/status`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub attempt: u32,
    pub seq: u64,
    pub state: JobState,
    pub reason: Option<FailReason>,
    pub retryable: bool,
    pub exit_code: Option<i32>,
    /// The signal that killed the script, by name (`"SIGKILL"`).
    pub signal: Option<String>,
    pub message: Option<String>,
    pub upload_errors: u64,
    pub warnings: Vec<String>,
    pub result: serde_json::Value,
    /// RFC 3339.
    pub time: String,
    /// FINALIZING only: the job's processes are gone, a scheduler may reuse its GPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_released: Option<bool>,
    /// Terminal statuses: the job's peak memory (its cgroup's `memory.peak`, else the
    /// largest single process's peak RSS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_bytes: Option<u64>,
    /// Terminal statuses: CPU time the job's processes used (user + system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
}

impl StatusReport {
    /// A status that says only its state: no reason, exit, warnings, result or facts.
    pub fn plain(attempt: u32, seq: u64, state: JobState, time: String) -> StatusReport {
        StatusReport {
            attempt,
            seq,
            state,
            reason: None,
            retryable: false,
            exit_code: None,
            signal: None,
            message: None,
            upload_errors: 0,
            warnings: Vec::new(),
            result: serde_json::Value::Null,
            time,
            gpu_released: None,
            peak_memory_bytes: None,
            cpu_seconds: None,
        }
    }
}

/// `POST {url}/v1/jobs/{job_id}/artifacts`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsRegistration {
    pub attempt: u32,
    pub manifest: String,
    pub manifest_sha256: String,
    pub files: u64,
    pub bytes: u64,
    pub new_bytes: u64,
}

/// The control plane's answer to an artifacts registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactsReply {
    #[serde(default)]
    pub storage_used_bytes: u64,
    #[serde(default)]
    pub storage_quota_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// `POST {url}/v1/jobs/{job_id}/output`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputChunk {
    pub attempt: u32,
    pub stream: Stream,
    pub offset: u64,
    pub data: String,
}

json_io!(to_vec; StatusReport, ArtifactsRegistration, ArtifactsReply, OutputChunk);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_use_contract_spelling() {
        assert_eq!(
            serde_json::to_string(&JobState::TimedOut).unwrap(),
            "\"TIMED_OUT\""
        );
        assert_eq!(
            serde_json::to_string(&FailReason::UploadError).unwrap(),
            "\"UPLOAD_ERROR\""
        );
        let reply = ArtifactsReply::from_json(
            br#"{"storage_used_bytes":5,"storage_quota_bytes":null,"x":1}"#,
        )
        .unwrap();
        assert_eq!(reply.storage_quota_bytes, None);
    }
}
