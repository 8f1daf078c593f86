//! How a job ended -> its final state -> the agent's exit code (contract §1 and §8),
//! in one exhaustive match.

use c3_proto::{FailReason, JobState};

/// How the job ended, as far as the script is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    /// The script exited with this code.
    Exited(i32),
    /// The script was killed by this signal (not by us).
    Killed(String),
    /// The agent got SIGTERM/SIGINT (`systemctl stop`).
    Canceled,
    /// The script ran past `timeout_secs`.
    TimedOut,
    /// Nothing was launched: the store failed its preflight or the agent could not launch.
    AgentFailed,
    /// Nothing was launched: an input dataset could not be materialized. `retryable` when
    /// the cause is the store or the node (a fault past its retries, a timeout, no room here),
    /// not the reference (no such job, a manifest or blob that is not what it claims) or the
    /// job's own workdir (what an earlier attempt left where a dataset goes).
    DatasetFailed { retryable: bool },
    /// The agent died while the job ran; `recover` found it.
    AgentLost,
}

/// The agent's exit status (contract §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    Succeeded = 0,
    ScriptError = 1,
    Usage = 2,
    UploadError = 3,
    Canceled = 4,
    TimedOut = 5,
    AgentOrDataset = 6,
}

impl ExitCode {
    pub fn code(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub state: JobState,
    pub reason: Option<FailReason>,
    pub retryable: bool,
    pub exit: ExitCode,
}

/// The §8 table. `upload_failed`: some file or log could not be stored. `oom_killed`: the
/// kernel's OOM killer killed a process of the job; a script that failed after that failed
/// for want of memory (one that still exited 0 coped with it, say a data-loader worker).
pub fn decide(end: &JobEnd, upload_failed: bool, oom_killed: bool) -> Verdict {
    use FailReason::*;
    use JobState::*;
    let v = |state, reason, retryable, exit| Verdict {
        state,
        reason,
        retryable,
        exit,
    };
    match (end, upload_failed, oom_killed) {
        (JobEnd::Exited(0), false, _) => v(Succeeded, None, false, ExitCode::Succeeded),
        // The GPU work is done but its output is lost: retrying would redo it for nothing
        // until the storage problem is fixed, so the platform must not retry blindly.
        (JobEnd::Exited(0), true, _) => v(Failed, Some(UploadError), false, ExitCode::UploadError),
        // The same job on the same machine would run out of memory again.
        (JobEnd::Exited(_) | JobEnd::Killed(_), _, true) => {
            v(Failed, Some(OutOfMemory), false, ExitCode::ScriptError)
        }
        (JobEnd::Exited(_) | JobEnd::Killed(_), _, false) => {
            v(Failed, Some(ScriptError), false, ExitCode::ScriptError)
        }
        (JobEnd::Canceled, _, _) => v(Canceled, None, false, ExitCode::Canceled),
        (JobEnd::TimedOut, _, _) => v(TimedOut, None, false, ExitCode::TimedOut),
        // The node, not the job, failed: another node may well succeed.
        (JobEnd::AgentFailed | JobEnd::AgentLost, _, _) => {
            v(Failed, Some(AgentError), true, ExitCode::AgentOrDataset)
        }
        (JobEnd::DatasetFailed { retryable }, _, _) => v(
            Failed,
            Some(DatasetError),
            *retryable,
            ExitCode::AgentOrDataset,
        ),
    }
}

/// The exit code of an attempt that was finished (by an earlier agent), from the state and
/// reason its record kept: the same table as [`decide`], read backwards.
pub fn recorded_exit(record: &c3_proto::RunRecord) -> ExitCode {
    use c3_proto::JobState;
    match (record.state, record.reason) {
        (Some(JobState::Succeeded), _) => ExitCode::Succeeded,
        (Some(JobState::Canceled), _) => ExitCode::Canceled,
        (Some(JobState::TimedOut), _) => ExitCode::TimedOut,
        (_, Some(FailReason::UploadError)) => ExitCode::UploadError,
        (_, Some(FailReason::ScriptError | FailReason::OutOfMemory)) => ExitCode::ScriptError,
        _ => ExitCode::AgentOrDataset,
    }
}

/// Whether [`note_end`] saved an end in `record` (of any kind).
pub fn end_noted(record: &c3_proto::RunRecord) -> bool {
    record.state.is_some() || record.exit_code.is_some() || record.signal.is_some()
}

/// Records in the run record how the job ended, so that `recover` never invents an outcome.
pub fn note_end(end: &JobEnd, record: &mut c3_proto::RunRecord) {
    use c3_proto::JobState;
    record.exit_code = None;
    record.signal = None;
    record.state = None;
    record.reason = None;
    record.retryable = None;
    match end {
        JobEnd::Exited(code) => record.exit_code = Some(*code),
        JobEnd::Killed(sig) => record.signal = Some(sig.clone()),
        JobEnd::Canceled => record.state = Some(JobState::Canceled),
        JobEnd::TimedOut => record.state = Some(JobState::TimedOut),
        JobEnd::DatasetFailed { retryable } => {
            record.state = Some(JobState::Failed);
            record.reason = Some(FailReason::DatasetError);
            record.retryable = Some(*retryable);
        }
        JobEnd::AgentFailed | JobEnd::AgentLost => record.state = Some(JobState::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_table() {
        let d = |e: JobEnd, f| {
            let v = decide(&e, f, false);
            (v.state, v.reason, v.exit.code())
        };
        assert_eq!(d(JobEnd::Exited(0), false), (JobState::Succeeded, None, 0));
        assert_eq!(
            d(JobEnd::Exited(0), true),
            (JobState::Failed, Some(FailReason::UploadError), 3)
        );
        assert!(!decide(&JobEnd::Exited(0), true, false).retryable);
        assert_eq!(
            d(JobEnd::Exited(3), true),
            (JobState::Failed, Some(FailReason::ScriptError), 1)
        );
        assert_eq!(
            d(JobEnd::Killed("SIGKILL".into()), false),
            (JobState::Failed, Some(FailReason::ScriptError), 1)
        );
        assert_eq!(d(JobEnd::Canceled, true), (JobState::Canceled, None, 4));
        assert_eq!(d(JobEnd::TimedOut, false), (JobState::TimedOut, None, 5));
        assert_eq!(
            d(JobEnd::AgentFailed, false),
            (JobState::Failed, Some(FailReason::AgentError), 6)
        );
        assert_eq!(
            d(JobEnd::DatasetFailed { retryable: false }, false),
            (JobState::Failed, Some(FailReason::DatasetError), 6)
        );
        assert!(decide(&JobEnd::DatasetFailed { retryable: true }, false, false).retryable);
        let oom = |e: JobEnd| {
            let v = decide(&e, false, true);
            (v.state, v.reason, v.exit.code())
        };
        let out_of_memory = (JobState::Failed, Some(FailReason::OutOfMemory), 1);
        assert_eq!(oom(JobEnd::Killed("SIGKILL".into())), out_of_memory);
        assert_eq!(oom(JobEnd::Exited(137)), out_of_memory);
        // A job that coped with a worker's OOM kill succeeded; a cancel stays a cancel.
        assert_eq!(oom(JobEnd::Exited(0)), (JobState::Succeeded, None, 0));
        assert_eq!(oom(JobEnd::Canceled), (JobState::Canceled, None, 4));
    }
}
