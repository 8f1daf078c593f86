//! Which job a quick run's `./artifacts` (and `--output` dirs) belong to: `<workdir>/.c3-agent-job`, one JSON line
//! `{"job_id":..,"attempt":..}` written as the run starts. A later attempt of the same job (a
//! Slurm requeue, in the same submit dir) may start on the files an earlier one left there,
//! to resume from its checkpoint; anything else would take another run's files for its own.
//!
//! The marker lies at the workdir's top, and output dirs are strictly inside the workdir (never
//! the workdir itself, never through a symlink), so it is never uploaded. The job, running as
//! the same user, could rewrite it: it only vouches to that user for that user's own files.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::Path;

use c3_runtime::confine::DirFd;

const NAME: &str = ".c3-agent-job";
/// A marker is one short line; anything longer is not one.
const MAX_BYTES: u64 = 4096;

/// Why a quick run in `workdir` as `job_id`'s attempt `attempt` must not start: its
/// `artifacts` or one of its `outputs` (relative to it, checked) holds files, and the marker
/// does not say they are an earlier attempt's of this job (`None`: it may start).
pub fn refusal(workdir: &Path, outputs: &[String], job_id: &str, attempt: u32) -> Option<String> {
    let holding = std::iter::once("artifacts")
        .chain(outputs.iter().map(String::as_str))
        .map(|dir| workdir.join(dir))
        .find(|dir| std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()))?;
    let whose = match read(workdir) {
        Some((id, earlier)) if id == job_id && earlier < attempt => return None,
        Some((id, earlier)) if id == job_id => format!(
            "files of attempt {earlier} of job `{id}`: only a later attempt of that job (not {attempt}) starts on them"
        ),
        Some((id, earlier)) => format!("files of job `{id}` (attempt {earlier})"),
        None => "files from an earlier run".to_string(),
    };
    Some(format!(
        "{} holds {whose}: move them away, or run in another directory (`--workdir DIR`)",
        holding.display()
    ))
}

/// The job id and attempt the marker names; `None` for a missing, unreadable or malformed one
/// (or a symlink, a FIFO, anything but a small regular file).
fn read(workdir: &Path) -> Option<(String, u32)> {
    let dir = DirFd::open_trusted(workdir).ok()?;
    let file = dir.open_file(Path::new(NAME)).ok()?;
    if !c3_runtime::confine::is_regular(&c3_runtime::confine::fstat(&file).ok()?) {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX_BYTES {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let id = v.get("job_id")?.as_str()?.to_string();
    let attempt = u32::try_from(v.get("attempt")?.as_u64()?).ok()?;
    Some((id, attempt))
}

/// Records that `workdir`'s `artifacts` is now `job_id`'s attempt `attempt`'s: a temp file
/// (`O_EXCL | O_NOFOLLOW`) renamed over the marker, so a reader sees the old one or the new
/// one, and a symlink in its place is replaced, never followed.
pub fn record(workdir: &Path, job_id: &str, attempt: u32) -> Result<(), String> {
    let fail = |e: std::io::Error| {
        format!(
            "{}: cannot record which job ./artifacts belongs to: {e}",
            workdir.join(NAME).display()
        )
    };
    let dir = DirFd::open_trusted(workdir).map_err(fail)?;
    let (temp, mut file) = dir.create_temp(&format!("{NAME}.")).map_err(fail)?;
    let line = serde_json::json!({"job_id": job_id, "attempt": attempt}).to_string() + "\n";
    let placed = file
        .write_all(line.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| dir.rename(OsStr::new(&temp), OsStr::new(NAME)));
    if placed.is_err() {
        let _ = dir.remove_file(OsStr::new(&temp));
    }
    placed.map_err(fail)
}
