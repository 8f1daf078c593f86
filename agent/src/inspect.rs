//! Commands that look at jobs without running one: `ls`, `pull` (the store), `status` and
//! `logs` (this node's state dir, else the store).

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use c3_proto::{Manifest, Phase, ProgressRecord, RunRecord};
use c3_runtime::job::AgentContext;

use crate::out;

/// The job id checked like `run` checks it: a usage error names the fix.
pub fn checked_job_id(job_id: &str) -> Result<(), String> {
    c3_proto::spec::validate_job_id(job_id).map_err(|e| format!("job id {e}"))
}

/// The manifest, or one line that says what to check.
async fn manifest(
    ctx: &AgentContext,
    job_id: &str,
    places: c3_runtime::pull::Places,
) -> anyhow::Result<Manifest> {
    match c3_runtime::pull::read_manifest_of(
        &ctx.store,
        job_id,
        None,
        ctx.max_manifest_bytes,
        places,
    )
    .await
    {
        Ok(m) => Ok(m),
        Err(e) if e.is_not_found() => anyhow::bail!(
            "job {job_id} has no manifest in {}: check the job id (`c3-agent status` lists this node's jobs) and that the config names the job's store",
            ctx.store.shown_url()
        ),
        Err(e) => Err(e.into()),
    }
}

pub async fn ls(ctx: &AgentContext, job_id: &str, json: bool) -> anyhow::Result<()> {
    let manifest = manifest(ctx, job_id, c3_runtime::pull::Places::Unchecked).await?;
    if json {
        out::say_json(String::from_utf8_lossy(&manifest.to_json()).trim_end());
        return Ok(());
    }
    if !manifest.complete {
        out::note(&format!(
            "job {job_id}'s manifest is not complete: the job may still run (or its agent stopped before the end; `c3-agent recover` on its node finishes it)"
        ));
    }
    if manifest.files.is_empty() {
        out::say("no files");
    }
    for f in &manifest.files {
        // Control characters (a newline in a name) are escaped so that one line is one file.
        let marked = if f.path_b64.is_some() {
            "  (name not UTF-8: shown lossy; the exact bytes are `path_b64` in --json)"
        } else {
            ""
        };
        if !out::say(&format!(
            "{:>12}  {}  {}{marked}",
            f.size,
            f.sha256,
            f.path.escape_debug()
        )) {
            break;
        }
    }
    Ok(())
}

pub async fn pull(
    ctx: &AgentContext,
    job_id: &str,
    dest: &Path,
    force: bool,
    logs: bool,
    stop: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let manifest = tokio::select! {
        m = manifest(ctx, job_id, c3_runtime::pull::Places::Checked) => m?,
        () = stop.cancelled() => anyhow::bail!("stopped (a signal) before the manifest was read"),
    };
    // Off the reactor and raced with the stop: a DEST on a hung NFS mount holds the open,
    // and a Ctrl-C (its default action gone) must still end the pull.
    let opening = {
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || open_dest(&dest))
    };
    let root = tokio::select! {
        opened = opening => opened.context("the open of DEST")?,
        () = stop.cancelled() => anyhow::bail!("stopped (a signal) while {} was opened", dest.display()),
    }
    .with_context(|| format!("cannot open {}", dest.display()))?;
    let logs_root = root.try_clone()?;
    let mut summary = c3_runtime::pull::pull(&ctx.store, &manifest, root, dest, force, stop)
        .await
        .with_context(|| format!("pull of job {job_id} into {}", dest.display()))?;
    if logs {
        let entries = c3_runtime::pull::log_entries(&manifest);
        if entries.is_empty() {
            out::note(&format!("job {job_id}'s manifest lists no logs yet"));
        }
        let got = c3_runtime::pull::pull_into(
            &ctx.store,
            entries.into(),
            logs_root,
            dest,
            (None, None),
            force,
            stop,
        )
        .await
        .with_context(|| format!("logs of job {job_id}"))?;
        summary.files += got.files;
        summary.bytes += got.bytes;
    }
    if !manifest.complete {
        out::note(&format!(
            "job {job_id}'s manifest is not complete yet (the job may still run)"
        ));
    }
    out::result(
        &format!(
            "pulled {} files, {} bytes of job {job_id} into {}{}",
            summary.files,
            summary.bytes,
            dest.display(),
            if logs { " (logs in .c3/)" } else { "" }
        ),
        serde_json::json!({
            "job_id": job_id, "files": summary.files, "bytes": summary.bytes,
            "dest": dest.display().to_string(), "complete": manifest.complete,
        }),
    );
    Ok(())
}

/// DEST, made if missing, opened once for the files and the logs. As root, it is reached as
/// a spec path is (`specpath`): symlinks are followed only in directories root's alone, and
/// below the first one another user may write (a job's), none at all: that user could swap
/// a directory on the way for a link, and root would create (or, with `--force`, replace)
/// files wherever it leads. What root makes of DEST is its own (0700): a tenant's files,
/// private in its 0700 workdir, are not every local user's to read once pulled (`chmod` to
/// share them).
fn open_dest(dest: &Path) -> anyhow::Result<c3_runtime::confine::DirFd> {
    use c3_runtime::confine::DirFd;
    if !nix::unistd::geteuid().is_root() {
        // The user's own rights: a DEST that is a symlink (`~/scratch -> /scratch/u`) is
        // followed, as every other tool of theirs follows it.
        std::fs::create_dir_all(dest)?;
        return Ok(DirFd::open_trusted(dest)?);
    }
    let (reached, rest) =
        crate::specpath::resolve_root_alone_prefix(dest).map_err(anyhow::Error::msg)?;
    let at = DirFd::open(&reached).with_context(|| format!("{}", reached.display()))?;
    Ok(at.ensure_dir(&rest, 0o700, None)?)
}

/// One attempt as this node recorded it.
struct Attempt {
    n: u32,
    /// Why a record that is there could not be read (I/O, corrupt, a newer agent's): the
    /// attempt is listed all the same, never hidden.
    record: Result<RunRecord, String>,
    progress: Option<ProgressRecord>,
}

fn attempts(ctx: &AgentContext, job_id: &str) -> Vec<Attempt> {
    let dir = ctx.state.job_dir(job_id).join("attempts");
    let mut found: Vec<Attempt> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            let path = e.path().join("run.json");
            let record = match std::fs::symlink_metadata(&path) {
                Ok(_) => ctx
                    .state
                    .read_record(&path)
                    .map_err(|e| c3_runtime::display::error_chain(&e)),
                // Its record set aside unread and none written since (the run after it died
                // first): still an attempt this node ran, never hidden.
                Err(_) => Err(set_aside_only(&e.path())?),
            };
            let progress =
                c3_runtime::statedir::read_state_file(&e.path().join("progress.json"), 1 << 20)
                    .ok()
                    .and_then(|b| ProgressRecord::from_json(&b).ok());
            Some(Attempt {
                n,
                record,
                progress,
            })
        })
        .collect();
    found.sort_by_key(|a| a.n);
    found
}

/// Why an attempt dir without a run record still lists: the record(s) set aside in it.
fn set_aside_only(dir: &Path) -> Option<String> {
    let aside = c3_runtime::statedir::StateDir::set_aside_names(&dir.join("run.json")).ok()?;
    let last = aside.last()?;
    Some(format!(
        "its run record did not parse and was set aside ({}), and none was written since",
        dir.join(last).display()
    ))
}

fn outbox_len(ctx: &AgentContext, job_id: &str) -> usize {
    std::fs::read_dir(ctx.state.outbox_dir(job_id))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
        .unwrap_or(0)
}

/// The agent named in the record still runs (same boot, pid and start time).
fn agent_alive(record: &RunRecord) -> bool {
    c3_runtime::recover::owner_alive(record)
}

fn job_json(ctx: &AgentContext, job_id: &str, all: &[Attempt]) -> serde_json::Value {
    let last = all.last();
    let r = last.and_then(|a| a.record.as_ref().ok());
    let p = last.and_then(|a| a.progress.as_ref());
    serde_json::json!({
        "job_id": job_id,
        "attempts": all.iter().map(|a| a.n).collect::<Vec<_>>(),
        "attempt": last.map(|a| a.n),
        "record_unreadable": last.and_then(|a| a.record.as_ref().err()),
        "phase": r.map(|r| r.phase.as_str()),
        "agent_running": r.is_some_and(agent_alive),
        "state": r.and_then(|r| r.state).map(|s| s.as_str()),
        "reason": r.and_then(|r| r.reason).map(|x| x.as_str()),
        "exit_code": r.and_then(|r| r.exit_code),
        "started_at": r.map(|r| r.started_at.clone()),
        "workdir": r.map(|r| r.workdir.clone()),
        "files_synced": r.and_then(|r| r.synced.as_ref()).map(|s| s.files).or(p.map(|p| p.files_done)),
        "bytes_synced": r.and_then(|r| r.synced.as_ref()).map(|s| s.bytes).or(p.map(|p| p.bytes_done)),
        "files_pending": p.filter(|_| r.is_some_and(|r| r.phase != Phase::Done)).map(|p| p.files_queued.saturating_sub(p.files_done)),
        "bytes_pending": p.filter(|_| r.is_some_and(|r| r.phase != Phase::Done)).map(|p| p.bytes_queued.saturating_sub(p.bytes_done)),
        "unstored": r.map(|r| r.unstored.clone()).unwrap_or_default(),
        "unstored_more": r.map_or(0, |r| r.unstored_more),
        "unstored_for_good": r.map_or(0, |r| r.unstored_for_good),
        "outbox": outbox_len(ctx, job_id),
        "peak_memory_bytes": r.and_then(|r| r.facts.as_ref()).and_then(|f| f.peak_memory_bytes),
    })
}

fn job_line(v: &serde_json::Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
    let mut line = format!(
        "{:<24} attempt {:<3} {:<10} {:<10}",
        s("job_id"),
        v["attempt"]
            .as_u64()
            .map(|n| n.to_string())
            .unwrap_or("-".into()),
        s("phase"),
        s("state")
    );
    if let Some(reason) = v["reason"].as_str() {
        line.push_str(&format!(" {reason}"));
    }
    if let Some(why) = v["record_unreadable"].as_str() {
        // A parser's words quote the record (`unknown variant "..."`): its control
        // characters reached the operator's terminal as themselves.
        line.push_str(&format!("  record unreadable: {}", why.escape_debug()));
    }
    if let (Some(f), Some(b)) = (v["files_synced"].as_u64(), v["bytes_synced"].as_u64()) {
        line.push_str(&format!(
            "  {f} files {} synced",
            c3_runtime::display::human_bytes(b)
        ));
    }
    if let (Some(f), Some(b)) = (v["files_pending"].as_u64(), v["bytes_pending"].as_u64()) {
        if f > 0 {
            line.push_str(&format!(
                ", {f} files {} pending",
                c3_runtime::display::human_bytes(b)
            ));
        }
    }
    let unstored = v["unstored"].as_array().map_or(0, Vec::len) as u64
        + v["unstored_more"].as_u64().unwrap_or(0);
    // What the job made unstorable itself is named apart: no resync stores it as it is.
    let for_good = v["unstored_for_good"].as_u64().unwrap_or(0).min(unstored);
    if unstored > for_good {
        line.push_str(&format!("  {unstored} unstored"));
        if for_good > 0 {
            line.push_str(&format!(" ({for_good} for good)"));
        }
        line.push_str(&format!(": `c3-agent resync {}`", s("job_id")));
    } else if unstored > 0 {
        line.push_str(&format!(
            "  {unstored} unstored for good (too deep or long, too many, unreadable by the job's user, too large or sparse)"
        ));
    }
    if v["outbox"].as_u64().unwrap_or(0) > 0 {
        line.push_str(&format!("  {} reports undelivered (outbox)", v["outbox"]));
    }
    let p = s("phase");
    if (p == "running" || p == "finishing" || p == "preparing") && v["agent_running"] == false {
        line.push_str("  agent gone: `c3-agent recover` finishes it");
    }
    line
}

/// `c3-agent status [JOB]`: this node's jobs from its state dir.
pub fn status(ctx: &AgentContext, job_id: Option<&str>, json: bool) -> ExitCode {
    let ids: Vec<String> = match job_id {
        Some(id) => vec![id.to_string()],
        None => {
            let mut ids: Vec<String> = std::fs::read_dir(ctx.state.jobs_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| c3_proto::spec::validate_job_id(n).is_ok())
                .collect();
            ids.sort();
            ids
        }
    };
    let mut jobs = Vec::new();
    for id in &ids {
        let all = attempts(ctx, id);
        if all.is_empty() {
            continue;
        }
        jobs.push(job_json(ctx, id, &all));
    }
    if let (Some(id), true) = (job_id, jobs.is_empty()) {
        out::error(&format!(
            "this node ({}) has no record of job {id}: `c3-agent status` lists the jobs it has; `c3-agent ls {id}` reads the store",
            ctx.state.root().display()
        ));
        return ExitCode::FAILURE;
    }
    let as_json = json || out::json();
    if as_json {
        for j in &jobs {
            out::say_json(&j.to_string());
        }
    } else if jobs.is_empty() {
        out::say(&format!("no jobs in {}", ctx.state.root().display()));
    } else {
        for j in &jobs {
            if !out::say(&job_line(j)) {
                break;
            }
        }
    }
    ExitCode::SUCCESS
}

/// `c3-agent logs JOB`: the job's output from this node's state dir, else from the store.
pub async fn logs(
    ctx: &AgentContext,
    job_id: &str,
    attempt: Option<u32>,
    stderr: bool,
    follow: bool,
) -> anyhow::Result<()> {
    let stream = if stderr {
        c3_proto::Stream::Stderr
    } else {
        c3_proto::Stream::Stdout
    };
    let local = attempts(ctx, job_id);
    let n = attempt.or(local.last().map(|a| a.n));
    if let Some(n) = n {
        let path = ctx.state.log_path(job_id, n, stream);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return local_log(ctx, job_id, n, &path, follow).await;
        }
    }
    // Not (or no longer) on this node: the log blob the manifest lists, from a manifest that
    // is this job's (a key swapped or copied would show another job's, another tenant's, log).
    let manifest =
        match c3_runtime::pull::read_manifest_of(
            &ctx.store,
            job_id,
            n,
            ctx.max_manifest_bytes,
            c3_runtime::pull::Places::Unchecked,
        )
        .await
        {
            Ok(m) => m,
            Err(e) if e.is_not_found() => anyhow::bail!(
                "no log of job {job_id} on this node and no manifest in {}: check the job id (`c3-agent status`)",
                ctx.store.shown_url()
            ),
            Err(e) => return Err(e.into()),
        };
    let Some(logs) = manifest.logs else {
        anyhow::bail!(
            "job {job_id}'s manifest lists no logs yet (the job may still run on its node)"
        );
    };
    let entry = if stderr { logs.stderr } else { logs.stdout };
    let mut stdout = std::io::stdout().lock();
    let mut shown = crate::out::JobBytes::for_stdout();
    let whole = ctx
        .store
        .stream_blob(&entry.sha256, entry.size, |chunk| {
            shown.write(&mut stdout, chunk)
        })
        .await
        .context("the log's blob")?;
    shown.finish(&mut stdout);
    let _ = stdout.flush();
    if !whole {
        anyhow::bail!("the log's blob does not match its manifest entry (what was shown above is not the job's log)");
    }
    Ok(())
}

/// How long `logs -f` waits on an attempt whose run record cannot be read, its log still.
const FOLLOW_WITHOUT_RECORD: Duration = Duration::from_secs(10);

async fn local_log(
    ctx: &AgentContext,
    job_id: &str,
    attempt: u32,
    path: &Path,
    follow: bool,
) -> anyhow::Result<()> {
    let mut file = c3_runtime::statedir::open_state_file(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let record = ctx.state.run_record_path(job_id, attempt);
    let mut shown = crate::out::JobBytes::for_stdout();
    // The log's length when it last grew, and when; when the run record was last read.
    let mut grown = (0u64, std::time::Instant::now());
    let mut record_read = std::time::Instant::now();
    loop {
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            if !shown.write(&mut std::io::stdout().lock(), &buf[..n]) {
                return Ok(());
            }
        }
        if !follow {
            shown.finish(&mut std::io::stdout().lock());
            let _ = std::io::stdout().flush();
            return Ok(());
        }
        let _ = std::io::stdout().flush();
        let pos = file.stream_position()?;
        if pos > grown.0 {
            grown = (pos, std::time::Instant::now());
        }
        // Until the attempt is done (its agent wrote the last line before it said so). A
        // record that does not parse names no agent that writes on: the end. One not read
        // this time (a blip, a run's first record still to come) is looked at again, for a
        // while: one gone for good (set aside, its attempt removed by retention) names no
        // agent either, and a follow is a bounded wait.
        let done = match ctx.state.read_record(&record) {
            Ok(r) => {
                record_read = std::time::Instant::now();
                r.phase == Phase::Done || !agent_alive(&r)
            }
            Err(c3_runtime::statedir::StateError::Corrupt { .. }) => true,
            Err(e)
                if record_read.elapsed() >= FOLLOW_WITHOUT_RECORD
                    && grown.1.elapsed() >= FOLLOW_WITHOUT_RECORD =>
            {
                out::note(&format!(
                    "no longer following: the attempt's run record has not been readable for {} s and the log did not grow ({})",
                    FOLLOW_WITHOUT_RECORD.as_secs(),
                    c3_runtime::display::error_chain(&e)
                ));
                true
            }
            Err(_) => false,
        };
        if done {
            let pos = file.stream_position()?;
            if file.metadata()?.len() <= pos {
                shown.finish(&mut std::io::stdout().lock());
                let _ = std::io::stdout().flush();
                return Ok(());
            }
            continue;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    /// A record's parse error, which quotes the record, is shown, never obeyed.
    #[test]
    fn an_unreadable_records_words_are_escaped() {
        let v = serde_json::json!({"job_id": "j", "attempt": 1, "phase": "-", "state": "-",
            "record_unreadable": "unknown variant `\u{1b}]0;pwned\u{7}\u{1b}[2K\rfake: all ok`"});
        let line = super::job_line(&v);
        assert!(!line.contains(['\u{1b}', '\u{7}', '\r']), "{line:?}");
    }
}
