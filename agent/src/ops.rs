//! Operator commands that look after a node rather than run a job: `gc` (local retention and
//! the file store's unreferenced blobs), and the retention sweep `recover` ends with.

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use c3_runtime::gc::GcError;
use c3_runtime::job::AgentContext;
use c3_runtime::retention::{Retention, RetentionReport};

use crate::out;

/// How long a halted retention sweep is waited for before it is left to its thread.
const SWEEP_HALT_GRACE: Duration = Duration::from_secs(5);

/// Deletes finished jobs' local data past `policy`, off the reactor; logs what it did. Stops
/// at its next safe point once `halt` is cancelled (`recover --budget-secs`, a SIGTERM).
pub async fn sweep_retention(
    ctx: &AgentContext,
    policy: Retention,
    halt: &CancellationToken,
) -> RetentionReport {
    let state = ctx.state.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let watching = {
        let halt = halt.clone();
        tokio::spawn(async move {
            halt.cancelled().await;
            flag.store(true, Ordering::Relaxed);
        })
    };
    let sweep = tokio::task::spawn_blocking(move || {
        c3_runtime::retention::sweep_until(&state, &policy, SystemTime::now(), &stop)
    });
    // The sweep checks its stop flag between entries; one blocked inside an entry (a user
    // lookup behind an sssd that never answers, a hung mount) is left to its thread once a
    // halt has waited `SWEEP_HALT_GRACE` for it: `--budget-secs` and SIGTERM are not held.
    let halted = async {
        halt.cancelled().await;
        tokio::time::sleep(SWEEP_HALT_GRACE).await;
    };
    let report = tokio::select! {
        swept = sweep => swept.unwrap_or_else(|e| RetentionReport {
            errors: vec![format!("retention sweep failed: {e}")],
            ..RetentionReport::default()
        }),
        () = halted => RetentionReport {
            errors: vec![format!("retention sweep did not stop within {} s of the halt; left to its thread", SWEEP_HALT_GRACE.as_secs())],
            ..RetentionReport::default()
        },
    };
    watching.abort();
    for (job, why) in &report.kept {
        tracing::debug!(job_id = %job, why = %why, "kept by retention");
    }
    for (job, dir) in &report.left_workdirs {
        tracing::info!(job_id = %job, workdir = %dir.display(), "workdir outside the state dir left in place");
    }
    for e in &report.errors {
        tracing::warn!(error = %e, "retention");
    }
    if !report.removed_jobs.is_empty() {
        tracing::info!(
            jobs = report.removed_jobs.len(),
            bytes_freed = report.bytes_freed,
            "finished jobs' local data removed (retention)"
        );
    }
    report
}

/// `c3-agent gc`: retention, then (file store) blobs no manifest references.
pub async fn gc(ctx: &AgentContext, policy: Retention, grace: Duration, dry_run: bool) -> ExitCode {
    let retention = if dry_run {
        None
    } else {
        let swept = c3_runtime::watch::sweep_alias_dirs();
        if swept > 0 {
            tracing::info!(
                dirs = swept,
                "removed the watch scratch dirs of agents that were killed"
            );
        }
        // A SIGTERM ends `gc` at once, as it always did: it installs no handler to stop at.
        Some(sweep_retention(ctx, policy, &CancellationToken::new()).await)
    };
    let blobs = if ctx.store.is_local() {
        Some(
            c3_runtime::gc::collect_garbage_seen(
                &ctx.store,
                grace,
                dry_run,
                ctx.max_manifest_bytes,
                Some(&gc_ledger(ctx)),
            )
            .await,
        )
    } else {
        None
    };
    let mut code = ExitCode::SUCCESS;
    let (jobs, local_bytes) = retention
        .as_ref()
        .map_or((0, 0), |r| (r.removed_jobs.len(), r.bytes_freed));
    let blob_json = match &blobs {
        None => serde_json::Value::Null,
        Some(Ok(r)) => serde_json::json!({
            "manifests": r.manifests, "blobs": r.blobs, "referenced": r.referenced,
            "deleted": r.deleted, "bytes_freed": r.bytes_freed, "kept_young": r.kept_young,
            "awaiting_second_look": r.awaiting_second_look,
            "missing": r.missing, "staging_deleted": r.staging_deleted,
            "staging_bytes": r.staging_bytes, "torn_deleted": r.torn_deleted,
            "torn_bytes": r.torn_bytes, "dry_run": r.dry_run,
        }),
        Some(Err(_)) => serde_json::Value::Null,
    };
    let blob_text = match &blobs {
        None => "store: not a file store (use the bucket's lifecycle rules); no blobs deleted"
            .to_string(),
        Some(Ok(r)) => {
            let deleted = if r.dry_run {
                "would be deleted"
            } else {
                "deleted"
            };
            let mut text = format!(
                "store: {} manifests, {} blobs, {} {deleted} ({} bytes), {} unreferenced but younger than the grace period",
                r.manifests, r.blobs, r.deleted, r.bytes_freed, r.kept_young,
            );
            if r.awaiting_second_look > 0 {
                text += &format!(
                    "; {} unreferenced and old kept until this node has seen them so for the grace period",
                    r.awaiting_second_look
                );
            }
            if r.missing > 0 {
                text += &format!("; {} blobs that manifests list are MISSING", r.missing);
            }
            if r.staging_deleted > 0 {
                text += &format!(
                    "; {} staging files a crash left {deleted} ({} bytes)",
                    r.staging_deleted, r.staging_bytes
                );
            }
            if r.torn_deleted > 0 {
                text += &format!(
                    "; {} temp files of manifests a crash left {deleted} ({} bytes)",
                    r.torn_deleted, r.torn_bytes
                );
            }
            text
        }
        Some(Err(e)) => {
            code = ExitCode::FAILURE;
            out::error(&format!("gc: {}", c3_runtime::error_chain(e)));
            if matches!(e, GcError::Manifests { .. }) {
                "store: a manifest could not be read; nothing deleted".to_string()
            } else {
                "store: gc stopped".to_string()
            }
        }
    };
    let local_text = match &retention {
        None => "local: dry run, nothing removed".to_string(),
        Some(r) if !r.errors.is_empty() => {
            // Logged one by one already; the exit status tells the housekeeping unit (a
            // trash entry that cannot go, a job's dir that would not move, every hour).
            code = ExitCode::FAILURE;
            format!(
                "local: {jobs} finished jobs removed ({local_bytes} bytes); {} could not be cleaned up (see the log)",
                r.errors.len()
            )
        }
        Some(_) => format!("local: {jobs} finished jobs removed ({local_bytes} bytes)"),
    };
    out::result(
        &format!("{local_text}\n{blob_text}"),
        serde_json::json!({
            "jobs_removed": jobs,
            "local_bytes_freed": local_bytes,
            "local_errors": retention.as_ref().map_or(0, |r| r.errors.len()),
            "store": blob_json,
        }),
    );
    code
}

/// This node's gc ledger for the configured store ([`c3_runtime::gc::Ledger`]): in the state
/// dir, one per store URL.
fn gc_ledger(ctx: &AgentContext) -> std::path::PathBuf {
    let url = c3_runtime::digest::sha256_hex(ctx.store.url().as_bytes());
    ctx.state
        .root()
        .join("gc")
        .join(format!("{}.seen", &url[..16]))
}
