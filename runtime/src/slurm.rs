//! Slurm's own word on why it stopped a job. Its time limit and `scancel` both reach the
//! agent as SIGTERM; only the controller knows which it was, and a job that ran out of
//! time must say TIMED_OUT (ask for more time), not CANCELED.

use std::time::Duration;

/// How long the controller gets to answer; the stop goes on meanwhile.
pub const ASK_WITHIN: Duration = Duration::from_secs(3);

/// Whether the agent runs inside a Slurm job (`SLURM_JOB_ID` set): there scancel and the
/// time limit signal the job's processes and the agent at once.
pub fn under_slurm() -> bool {
    std::env::var_os("SLURM_JOB_ID").is_some_and(|id| !id.is_empty())
}

/// Whether Slurm stopped the job the agent runs in (`SLURM_JOB_ID`) for its time limit:
/// `squeue`'s reason for it is `TimeLimit`. False outside Slurm, without `squeue`, or when
/// the controller does not answer within `within`.
pub async fn stopped_by_time_limit(within: Duration) -> bool {
    let Some(id) = std::env::var("SLURM_JOB_ID")
        .ok()
        .filter(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
    else {
        return false;
    };
    let mut command = std::process::Command::new("squeue");
    // A user's `SQUEUE_STATES=R` (sbatch exports the environment) hid the job while it
    // completes, and a time limit was reported as a cancel: its own filters are not asked.
    command.args([
        "--noheader",
        "--states=all",
        "--jobs",
        &id,
        "--format",
        "%r",
    ]);
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"SQUEUE_") {
            command.env_remove(name);
        }
    }
    // The whole ask, its exec included: a `squeue` (or a PATH directory before it) on a
    // hung mount must not hold up the stop it answers for.
    match crate::helper::ask(command, within).await {
        Ok(out) if out.status.success() => says_time_limit(&out.stdout),
        Ok(out) => {
            tracing::info!(status = %out.status, "squeue failed; the stop is taken for a cancel");
            false
        }
        Err(e @ crate::helper::AskError::TimedOut { .. }) => {
            tracing::warn!(
                error = %crate::error_chain(&e),
                "squeue did not answer; a Slurm time limit is reported as a cancel"
            );
            false
        }
        Err(e) => {
            tracing::info!(error = %crate::error_chain(&e), "cannot run squeue; the stop is taken for a cancel");
            false
        }
    }
}

/// `squeue --format %r` for one job: its reason, `TimeLimit` when the limit ended it. A
/// heterogeneous job has a line per component, each `TimeLimit` when its limit ended them
/// all: its one line wanted, its time limit read as a cancel.
fn says_time_limit(stdout: &[u8]) -> bool {
    let text = String::from_utf8_lossy(stdout);
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .peekable();
    lines.peek().is_some() && lines.all(|l| l == "TimeLimit")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_time_limit_reason_counts() {
        assert!(says_time_limit(b"TimeLimit\n"));
        assert!(!says_time_limit(b"None\n"));
        assert!(!says_time_limit(b""));
        assert!(
            says_time_limit(b"TimeLimit\nTimeLimit\n"),
            "a heterogeneous job's components"
        );
        assert!(!says_time_limit(b"TimeLimit\nNone\n"));
        assert!(!says_time_limit(b"\n\n"));
    }
}
