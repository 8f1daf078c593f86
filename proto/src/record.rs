//! What the agent keeps in its state dir: a run record per attempt (so that `recover`
//! can finish a job a crashed agent left) and outbox entries (reports not yet delivered).

use serde::{Deserialize, Serialize};

use crate::control::{FailReason, JobState};
use crate::spec::JobSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Preparing: store checks, datasets. Nothing launched yet.
    Preparing,
    /// The script was launched (pid/pgid recorded).
    Running,
    /// The script ended; the final sync is under way.
    Finishing,
    /// Terminal status decided and handed to the reporter (delivered or in the outbox).
    Done,
}

impl Phase {
    /// The record's spelling, for `status` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Running => "running",
            Phase::Finishing => "finishing",
            Phase::Done => "done",
        }
    }
}

/// The job's result as read at its end ([`RunRecord::result`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedResult {
    /// The value (null: the job wrote none).
    Value(serde_json::Value),
    /// Why the file there was ignored (too large, not JSON, unreadable).
    Ignored(String),
}

/// `<state_dir>/jobs/<job_id>/attempts/<n>/run.json`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub spec: JobSpec,
    /// Resolved absolute workdir.
    pub workdir: String,
    /// Which directory `workdir` named when the agent checked it (prepare, or a sidecar's
    /// start): a later agent (`recover`, `resync`) has only the path, and whoever may write
    /// above the workdir could meanwhile have swapped a component for a symlink to another
    /// tenant's tree. `None` in records of agents that kept it in memory only.
    #[serde(default)]
    pub workdir_pin: Option<DirPin>,
    pub phase: Phase,
    /// Process group id of the script while it runs.
    pub pgid: Option<i32>,
    /// The last status `seq` handed out, so a resumed reporter keeps it growing.
    pub seq: u64,
    /// Set once the script ended: what the outcome was, so `recover` does not invent one.
    pub state: Option<JobState>,
    pub reason: Option<FailReason>,
    /// Whether a dataset's failure may be retried (its cause the store or the node, not the
    /// reference), kept from the moment the attempt ends: a `recover` of an attempt whose
    /// agent died while sending DATASET_ERROR sent AGENT_ERROR, retryable, in its place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    pub exit_code: Option<i32>,
    pub signal: Option<String>,
    pub started_at: String,
    /// Where the attempt's start falls among every attempt this state dir started (a counter
    /// taken at its start): which of two jobs that shared a workdir ran later, which a wall
    /// clock stepped back could not say. `None` in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_order: Option<u64>,
    /// A random id taken when the record is made, written into every manifest the run (and
    /// a `recover` or `resync` of it) writes: a complete manifest at the attempt's key that
    /// carries it is this run's own seal, one that does not is another node's run of the
    /// same attempt. `None` in older records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The agent working on this attempt: pid and its start time (clock ticks after boot,
    /// field 22 of /proc/<pid>/stat), so that `recover` never takes over a live agent's job.
    #[serde(default)]
    pub agent: Option<(i32, u64)>,
    /// Boot the `agent` pid belongs to: a pid from an earlier boot means nothing now.
    #[serde(default)]
    pub agent_boot_id: Option<String>,
    /// The pid namespace (`/proc/self/ns/pid`'s inode) of the agent that wrote the record:
    /// its pids (`agent`, `leader`, `watched_leader`) are numbered there. A sidecar's, in a
    /// pod, are not the host's: `recover` on the host looked its pid 7 up as the host's pid
    /// 7, found the job's leader gone while it ran, and finished the job under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid_ns: Option<u64>,
    /// The job's first process, so that `recover` signals its group only while that very
    /// process (not a later one that reused the pid) still exists.
    #[serde(default)]
    pub leader: Option<ProcIdentity>,
    /// The job's own cgroup (v2), when the agent could create one.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// Set (and saved) just before the script is launched: an agent that dies between the
    /// launch and the record of its leader leaves `recover` this word that the job's
    /// processes may run, to be found by their marks where no cgroup holds them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub launching: bool,
    /// What the last finish could not store (output paths, `logs/stdout`, `manifest`): the
    /// files stay on the node, and `resync`/`recover` try again.
    #[serde(default)]
    pub unstored: Vec<String>,
    /// How many more could not be stored than `unstored` names (it names the first 100: a
    /// job's million unstorable files must not make this record a gigabyte).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unstored_more: u64,
    /// How many of those (named or counted) the job made unstorable itself: paths too deep
    /// or long, more files than a manifest lists, files or places its user cannot read,
    /// files over `max_file_bytes` or mostly holes. They count as upload errors (the verdict
    /// says so), but no later look stores them as they are: `recover` and retention look
    /// only at the rest ([`RunRecord::unstored_to_retry`]). 0 in older records: all of them
    /// are tried again, as they were.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unstored_for_good: u64,
    /// The upload errors of the terminal status this run decided, saved just before the
    /// status goes out and cleared by the `done` that follows its delivery: an agent killed
    /// between the two left a status out that its record does not know of. `recover`, which
    /// finishes the attempt again, never reports more upload errors than this: what its look
    /// cannot see any more (a workdir removed meanwhile) the final sync that decided saw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concluded_upload_errors: Option<u64>,
    /// The job user's uid and groups, as resolved at launch: `recover` and `resync` check
    /// readability against them even if the user is gone from the node by then.
    #[serde(default)]
    pub job_user: Option<JobUser>,
    /// What the kernel said about the job's processes once they were gone: OOM kills,
    /// peak memory, CPU time (for the terminal status, also when `recover` sends it).
    #[serde(default)]
    pub facts: Option<JobFacts>,
    /// The job's result file as `run` read it the moment the job's processes were gone,
    /// for the seal and for a `recover` of the attempt: read again after a final sync of
    /// hours, it was whatever another job of the user (or the next job placed in the same
    /// workdir) left there by then. `None`: not read yet (read at the seal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<RecordedResult>,
    /// Sidecar mode (`c3-agent watch`): the directories synced, relative to the workdir
    /// (instead of `artifacts` + the spec's outputs). The agent launched nothing.
    #[serde(default)]
    pub watched_dirs: Option<Vec<String>>,
    /// Sidecar mode with `--pid`: the job's main process the agent watches (never signals:
    /// it launched nothing). While it lives, `recover` leaves the attempt to a restarted
    /// sidecar rather than finish a job that still runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watched_leader: Option<ProcIdentity>,
    /// What the attempt's final manifest lists (for `c3-agent status`), once written.
    #[serde(default)]
    pub synced: Option<Synced>,
    /// Where the attempt's output and reports go, as logs show them (no credentials): the
    /// store's URL and the control plane's (`None`: none). `recover` and `resync` run with
    /// another config (a housekeeping unit without the job unit's environment) leave the
    /// attempt alone rather than finish it into another store, or report to nobody. Absent
    /// in older records: not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
}

/// [`RunRecord::destination`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub store: String,
    pub control_plane: Option<String>,
}

impl Destination {
    /// Whether an agent sending here may finish an attempt that was sending to `theirs`: the
    /// same store, and the same control plane if the attempt had one (reports sent to one
    /// where it had none are no loss).
    pub fn serves(&self, theirs: &Destination) -> bool {
        self.store == theirs.store
            && (theirs.control_plane.is_none() || self.control_plane == theirs.control_plane)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Synced {
    pub files: u64,
    pub bytes: u64,
    pub new_bytes: u64,
}

/// `<state_dir>/jobs/<id>/attempts/<n>/progress.json`, rewritten every 10 s while the agent
/// syncs: what `c3-agent status` says about uploads pending.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressRecord {
    pub phase: String,
    pub files_done: u64,
    pub files_queued: u64,
    pub bytes_done: u64,
    pub bytes_queued: u64,
    /// RFC 3339.
    pub time: String,
}

/// Resource facts of a finished job, from its cgroup or, without one, `getrusage`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobFacts {
    /// Processes of the job the kernel's OOM killer killed.
    pub oom_kills: u64,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

/// A directory, told apart from whatever is renamed into its path later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirPin {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobUser {
    pub uid: u32,
    pub gids: Vec<u32>,
}

/// A process, told apart from any later process that reuses its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcIdentity {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_ticks: u64,
    /// `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

/// One undelivered control-plane request: `<state_dir>/outbox/<job_id>/<seq>-<kind>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub job_id: String,
    /// Path below the control-plane URL, e.g. `v1/jobs/j1/status`.
    pub endpoint: String,
    pub body: serde_json::Value,
    /// The control plane it was meant for (its URL as shown: no credentials), when kept;
    /// absent in entries of older agents (their attempt's run record says it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<String>,
}

/// A multipart upload under way: `<state_dir>/jobs/<job_id>/uploads/<attempt>-<sha256>.json`,
/// with its finished parts appended to `<attempt>-<sha256>.parts` beside it (one JSON line each: `part`,
/// `id`, `blake3`), so that a restarted agent sends only the missing parts (object_store
/// offers no list-parts call), and so that an upload nobody will finish is aborted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartRecord {
    pub sha256: String,
    pub upload_id: String,
    pub size: u64,
    pub part_size: u64,
    /// Part index -> the store's opaque id for it.
    pub parts: std::collections::BTreeMap<u32, String>,
    /// Part index -> the BLAKE3 tag (hex) of the bytes sent as that part: a resumed upload
    /// keeps a part only if this is the content's tag for it (absent: sent again).
    #[serde(default)]
    pub part_blake3: std::collections::BTreeMap<u32, String>,
}

/// One finished part of a [`MultipartRecord`]'s upload, a line of `<sha256>.parts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartPart {
    /// Ties the line to its upload (16 hex digits of the upload id's SHA-256): a line that an
    /// agent still busy with an earlier upload of the blob appends (another attempt's, say)
    /// names parts the journal's upload never had.
    pub upload: String,
    pub part: u32,
    /// The store's opaque id for the part.
    pub id: String,
    /// The BLAKE3 tag (hex) of the bytes sent as the part.
    pub blake3: String,
}

json_io!(to_vec_pretty; RunRecord, OutboxEntry, MultipartRecord, ProgressRecord);

impl RunRecord {
    /// What the last finish left unstored that a later one may store: everything unstored
    /// but what the job made unstorable for good.
    pub fn unstored_to_retry(&self) -> u64 {
        (self.unstored.len() as u64)
            .saturating_add(self.unstored_more)
            .saturating_sub(self.unstored_for_good)
    }
}

impl OutboxEntry {
    /// Wrap any wire message as an outbox entry.
    pub fn new(job_id: &str, endpoint: String, body_json: &[u8]) -> Self {
        let body = serde_json::from_slice(body_json).unwrap_or(serde_json::Value::Null);
        OutboxEntry {
            job_id: job_id.to_string(),
            endpoint,
            body,
            control_plane: None,
        }
    }

    /// One line of `reports.jsonl`.
    pub fn to_json_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("records always serialize");
        line.push(b'\n');
        line
    }

    pub fn body_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.body).expect("values always serialize")
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record from before `unstored_for_good`: everything unstored is tried again, as it
    /// was; the field is written only when it says something.
    #[test]
    fn what_is_unstored_for_good_is_not_retried() {
        let old = br#"{"spec": {"job_id": "j", "command": ["true"]}, "workdir": "/w",
            "phase": "done", "seq": 3, "started_at": "2026-01-01T00:00:00Z",
            "unstored": ["artifacts/a", "artifacts/b"], "unstored_more": 5}"#;
        let mut r = RunRecord::from_json(old).unwrap();
        assert_eq!((r.unstored_for_good, r.unstored_to_retry()), (0, 7));
        assert!(!String::from_utf8(r.to_json()).unwrap().contains("for_good"));
        r.unstored_for_good = 6;
        assert_eq!(r.unstored_to_retry(), 1);
        r.unstored_for_good = 7;
        let back = RunRecord::from_json(&r.to_json()).unwrap();
        assert_eq!((back.unstored_for_good, back.unstored_to_retry()), (7, 0));
    }
}
