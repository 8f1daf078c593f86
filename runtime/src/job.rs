//! One job's lifecycle: prepare -> launch -> wait -> final sync -> manifest -> report.
//!
//! [`run_job`] drives a fresh attempt; [`crate::recover`] resumes a [`Run`] from its
//! record and calls the same [`Run::finish`], so a crashed agent's job ends the same way.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use c3_proto::{
    ArtifactsRegistration, ArtifactsReply, JobSpec, JobState, Phase, RunRecord, StatusReport,
    Stream,
};

use crate::collector::{CollectorConfig, CollectorHandle, Sealed};
use crate::confine::{DirFd, JobReader};
use crate::display::{error_chain, now_rfc3339};
use crate::jobproc::{Cgroup, JobProcesses};
use crate::launch::{child_env, signal_name, spawn, LaunchError, LaunchPlan, RunAs};
use crate::live::LiveOptions;
use crate::manifest::ManifestWriter;
use crate::outcome::{decide, JobEnd, Verdict};
use crate::output::{forward_live, pump};
use crate::report::{ControlPlane, Delivery, Reporter};
use crate::statedir::AttemptLock;
use crate::statedir::StateDir;
use crate::store::{manifest_key, BlobStore};
use crate::upload::{UploadOptions, Uploader};

/// Largest structured result a job may hand back (contract §4).
pub const MAX_RESULT_BYTES: u64 = 64 * 1024;
/// Warnings sent with a status; more are counted, not listed.
const MAX_WARNINGS: usize = 50;
/// How long the output pumps may run on once the job's process group is gone.
const PUMP_DRAIN: Duration = Duration::from_secs(5);

/// Everything the engine needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct AgentContext {
    pub state: StateDir,
    pub store: BlobStore,
    pub control_plane: Option<ControlPlane>,
    /// The bearer token, so that it can be kept out of the job's environment.
    pub token: Option<String>,
    pub kill_grace: Duration,
    pub upload: UploadOptions,
    /// The store check before launch waits at most this long; a slow store does not block the launch.
    pub preflight_timeout: Duration,
    /// Sync while the job runs; `None` uploads everything at the end.
    pub live: Option<LiveOptions>,
    /// A spec's `workdir` must lie under this directory (checked at parse by the agent);
    /// workdirs are opened from it, never through a symlink.
    pub jobs_root: PathBuf,
    /// The umask the job's processes get (the agent's own keeps its files private).
    pub job_umask: u32,
    /// Manifests larger than this are refused (datasets).
    pub max_manifest_bytes: u64,
}

/// What the agent tells its caller (and the log's summary line) about a finished job.
#[derive(Debug, Clone)]
pub struct JobSummary {
    pub job_id: String,
    pub verdict: Verdict,
    pub files: usize,
    pub bytes: u64,
    pub new_bytes: u64,
    pub upload_errors: u64,
    /// Store key of the final manifest, if it was written.
    pub manifest: Option<String>,
}

/// Why an attempt could not even be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Lock(#[from] crate::statedir::LockError),
}

/// Runs one attempt of `spec` to its end. Cancelling `cancel` is `systemctl stop`.
/// `Err` only when another agent already runs this attempt (nothing was touched).
pub async fn run_job(
    ctx: &AgentContext,
    spec: JobSpec,
    cancel: CancellationToken,
) -> Result<JobSummary, RunError> {
    let lock = AttemptLock::acquire(&ctx.state, &spec.job_id, spec.attempt)?;
    let span = tracing::info_span!("job", job_id = %spec.job_id, attempt = spec.attempt);
    Ok(async move {
        let started = Instant::now();
        let mut background = JoinSet::new();
        if let Some(cp) = ctx.control_plane.clone() {
            let state = ctx.state.clone();
            background.spawn(
                async move {
                    crate::report::flush_all_outboxes(&cp, &state, cp.deadline()).await;
                }
                .in_current_span(),
            );
        }
        let mut run = Run::new(ctx, spec);
        run.lock = Some(lock);
        let end = match run.prepare(&cancel).await {
            Ok(()) => run.execute(&cancel).await,
            Err(end) => end,
        };
        let summary = run.finish(end, started).await;
        // Earlier jobs' reports get a little longer, but never hold the GPU hostage.
        if tokio::time::timeout(Duration::from_secs(5), async {
            while background.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            tracing::info!(
                "earlier undelivered reports stay in the outbox for a later run or recover"
            );
        }
        summary
    }
    .instrument(span)
    .await)
}

/// The state of one attempt while the agent works on it.
pub struct Run<'a> {
    ctx: &'a AgentContext,
    record: RunRecord,
    workdir: PathBuf,
    reporter: Reporter,
    /// What the collector needs; it becomes the collector's when the job is launched (or,
    /// for a job that never ran, when it is finished).
    collector_config: CollectorConfig,
    collector: Option<CollectorHandle>,
    warnings: Vec<String>,
    /// Why the job ended, in words, for the terminal status.
    message: Option<String>,
    run_as: Option<RunAs>,
    /// Whom readability is checked against (the job's user), when it is not the agent's own.
    reader: Option<JobReader>,
    /// The RUNNING report (its task, seq and body), delivered before the terminal one.
    running_report: Option<(tokio::task::JoinHandle<Delivery>, u64, Vec<u8>)>,
    /// This agent's claim on the attempt, held until the run is dropped.
    lock: Option<AttemptLock>,
    /// The workdir, opened without following symlinks; the job `fchdir`s into it.
    workdir_fd: Option<DirFd>,
    /// What could not be stored in this finish (paths, `logs/<stream>`, `manifest`).
    unstored: Vec<String>,
}

impl<'a> Run<'a> {
    fn new(ctx: &'a AgentContext, spec: JobSpec) -> Self {
        let workdir = spec
            .workdir
            .as_ref()
            .map(PathBuf::from)
            .unwrap_or_else(|| ctx.state.default_workdir(&spec.job_id));
        let record = RunRecord {
            workdir: workdir.display().to_string(),
            spec,
            phase: Phase::Preparing,
            pgid: None,
            seq: 0,
            state: None,
            reason: None,
            exit_code: None,
            signal: None,
            started_at: now_rfc3339(),
            agent: crate::recover::this_agent(),
            agent_boot_id: crate::procfs::boot_id(),
            leader: None,
            cgroup: None,
            unstored: Vec::new(),
            job_user: None,
        };
        Self::from_record(ctx, record)
    }

    /// A run rebuilt from its record, for `recover`.
    pub fn from_record(ctx: &'a AgentContext, record: RunRecord) -> Self {
        let reporter = Reporter::new(
            ctx.control_plane.clone(),
            ctx.state.clone(),
            &record.spec.job_id,
            record.spec.attempt,
        );
        let journal = ctx.state.job_dir(&record.spec.job_id).join("uploads");
        let uploader = Uploader::new(
            ctx.store.clone(),
            ctx.upload.clone(),
            &record.spec.job_id,
            Some(journal),
        )
        .confined_to(Path::new(&record.workdir));
        // `recover` runs the same checks for a job it finishes as the agent that launched it:
        // the identity recorded at launch, else a fresh lookup, else (the user is gone) a
        // reader that may read only what anyone may.
        let run_as = record
            .spec
            .user
            .as_deref()
            .and_then(|u| RunAs::lookup(u).ok());
        let reader = match (&record.job_user, &run_as, &record.spec.user) {
            (Some(u), _, _) => Some(JobReader {
                uid: u.uid,
                gids: u.gids.clone(),
            }),
            (None, Some(user), _) => Some(user.reader()),
            (None, None, Some(_)) => Some(JobReader {
                uid: u32::MAX - 1,
                gids: Vec::new(),
            }),
            (None, None, None) => None,
        };
        let collector_config = CollectorConfig {
            uploader: uploader.readable_by(reader.clone()),
            workdir: PathBuf::from(&record.workdir),
            dirs: record.spec.collected_dirs(),
            reader: reader.clone(),
            manifest: ManifestWriter::new(ctx.store.clone(), &record.spec),
            live: ctx.live.clone(),
        };
        Run {
            ctx,
            workdir: PathBuf::from(&record.workdir),
            record,
            reporter,
            collector_config,
            collector: None,
            warnings: Vec::new(),
            message: None,
            run_as,
            reader,
            running_report: None,
            lock: None,
            workdir_fd: None,
            unstored: Vec::new(),
        }
    }

    fn spec(&self) -> &JobSpec {
        &self.record.spec
    }

    /// `give_up_secs` from now (now, when there is no control plane).
    fn deadline(&self) -> tokio::time::Instant {
        self.ctx
            .control_plane
            .as_ref()
            .map(ControlPlane::deadline)
            .unwrap_or_else(tokio::time::Instant::now)
    }

    fn save(&self) {
        if let Err(e) = self.ctx.state.write_record(&self.record) {
            tracing::error!(error = %error_chain(&e), "cannot write the run record; recover may not find this job");
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.record.seq += 1;
        self.save();
        self.record.seq
    }

    /// A warning for the log and the terminal status; past `MAX_WARNINGS` only counted, so
    /// a job with a million symlinks costs neither a million log lines nor the memory.
    fn warn(&mut self, text: String) {
        if self.warnings.len() < MAX_WARNINGS {
            tracing::warn!("{text}");
            self.warnings.push(text);
        } else if self.warnings.len() == MAX_WARNINGS {
            tracing::warn!("more warnings follow; they are not logged one by one");
            self.warnings
                .push("more warnings; see the agent's log".into());
        }
    }

    fn fail_before_launch(&mut self, end: JobEnd, message: String) -> JobEnd {
        tracing::error!("{message}");
        self.message = Some(message);
        end
    }

    /// Directories, user, store check, input datasets. Nothing of the job runs yet.
    async fn prepare(&mut self, cancel: &CancellationToken) -> Result<(), JobEnd> {
        if let Err(e) = self
            .ctx
            .state
            .ensure_attempt_dir(&self.spec().job_id, self.spec().attempt)
        {
            return Err(self.fail_before_launch(JobEnd::AgentFailed, error_chain(&e)));
        }
        self.save();
        self.run_as = None;
        self.reader = None;
        if let Some(name) = self.spec().user.clone() {
            match RunAs::lookup(&name) {
                Ok(user) => {
                    self.record.job_user = Some(c3_proto::JobUser {
                        uid: user.uid,
                        gids: user.groups.clone(),
                    });
                    self.reader = Some(user.reader());
                    self.run_as = Some(user);
                }
                Err(e) => return Err(self.fail_before_launch(JobEnd::AgentFailed, error_chain(&e))),
            }
        }
        self.collector_config.reader = self.reader.clone();
        self.collector_config.uploader = self
            .collector_config
            .uploader
            .clone()
            .readable_by(self.reader.clone());
        match self.prepare_dirs() {
            Ok(fd) => self.workdir_fd = Some(fd),
            Err(e) => {
                return Err(self.fail_before_launch(
                    JobEnd::AgentFailed,
                    format!("cannot prepare the workdir {}: {e}", self.workdir.display()),
                ))
            }
        }
        match tokio::time::timeout(self.ctx.preflight_timeout, self.ctx.store.preflight()).await {
            Ok(Ok(())) => tracing::debug!(store = self.ctx.store.url(), "store is writable"),
            Ok(Err(e)) if e.is_permanent() => {
                let msg = format!(
                    "store {} is not usable: {}",
                    self.ctx.store.url(),
                    error_chain(&e)
                );
                return Err(self.fail_before_launch(JobEnd::AgentFailed, msg));
            }
            Ok(Err(e)) => self.warn(format!(
                "store check failed, launching anyway (uploads retry later): {}",
                error_chain(&e)
            )),
            Err(_) => self.warn(format!(
                "store check did not answer within {:?}; launching anyway",
                self.ctx.preflight_timeout
            )),
        }
        if cancel.is_cancelled() {
            return Err(JobEnd::Canceled);
        }
        for dataset in self.spec().datasets.clone() {
            let source = dataset
                .source_job()
                .expect("validated with the spec")
                .to_string();
            let pulled = tokio::select! {
                r = self.materialize(&source, &dataset.mount) => r,
                _ = cancel.cancelled() => return Err(JobEnd::Canceled),
            };
            match pulled {
                Ok(summary) => {
                    tracing::info!(dataset = %dataset.reference, mount = %dataset.mount, files = summary.files, bytes = summary.bytes, "input materialized");
                }
                Err(e) => {
                    let msg = format!(
                        "input {} cannot be materialized at {}: {e}",
                        dataset.reference, dataset.mount
                    );
                    return Err(self.fail_before_launch(JobEnd::DatasetFailed, msg));
                }
            }
        }
        Ok(())
    }

    /// Copies another job's files to `mount` (below the workdir): a private copy the job
    /// may modify freely, created as the job's user, never written through a symlink.
    async fn materialize(
        &self,
        job_id: &str,
        mount: &str,
    ) -> Result<crate::pull::PullSummary, String> {
        let workdir = self
            .workdir_fd
            .as_ref()
            .ok_or_else(|| "the workdir is not open".to_string())?;
        let owner = self.run_as.as_ref().map(|u| (u.uid, u.gid));
        let dir = workdir
            .ensure_dir(Path::new(mount), 0o755, owner)
            .map_err(|e| e.to_string())?;
        let manifest =
            crate::pull::read_manifest(&self.ctx.store, job_id, self.ctx.max_manifest_bytes)
                .await
                .map_err(|e| error_chain(&e))?;
        crate::pull::pull_into(
            &self.ctx.store,
            &manifest,
            dir,
            &self.workdir.join(mount),
            owner,
        )
        .await
        .map_err(|e| error_chain(&e))
    }

    fn result_path(&self) -> PathBuf {
        self.workdir.join(".c3").join("result.json")
    }

    /// Opens the workdir from a trusted root and creates the output dirs and `.c3` in it,
    /// all relative to directory fds: a symlink a job (or its earlier attempt) planted is
    /// never followed, and only directories created here are given to the job's user.
    fn prepare_dirs(&self) -> std::io::Result<DirFd> {
        let owner = self.run_as.as_ref().map(|u| (u.uid, u.gid));
        let roots = [self.ctx.jobs_root.clone(), self.ctx.state.jobs_dir()];
        let root = roots
            .iter()
            .find(|r| self.workdir.starts_with(r) && self.workdir != **r);
        let workdir = match root {
            Some(root) => {
                if !root.exists() {
                    std::fs::create_dir_all(root)?;
                    std::fs::set_permissions(
                        root,
                        std::os::unix::fs::PermissionsExt::from_mode(0o711),
                    )?;
                }
                let rel = self.workdir.strip_prefix(root).expect("checked above");
                // Parents of the workdir stay the agent's (traversable, not listable);
                // the workdir itself, when created here, is the job's and private.
                DirFd::open(root)?.ensure_dir_with(rel, |last| {
                    if last {
                        (0o700, owner)
                    } else {
                        (0o711, None)
                    }
                })?
            }
            // A quick local run: the current dir of whoever started the agent.
            None => {
                std::fs::create_dir_all(&self.workdir)?;
                DirFd::open(&self.workdir)?
            }
        };
        for dir in self.spec().collected_dirs() {
            workdir
                .ensure_dir(Path::new(&dir), 0o755, owner)
                .map_err(|e| std::io::Error::new(e.kind(), format!("output dir `{dir}`: {e}")))?;
        }
        // `.c3` is the agent's: whatever a job put in its place is replaced.
        let c3 = workdir.replace_with_dir(OsStr::new(".c3"), 0o755, owner)?;
        // A result left by an earlier attempt in the same workdir is not this attempt's.
        c3.remove_file(OsStr::new("result.json"))?;
        Ok(workdir)
    }

    /// Launches the script and waits for its end (exit, timeout or cancel).
    async fn execute(&mut self, cancel: &CancellationToken) -> JobEnd {
        let spec = self.spec().clone();
        let artifacts = self.workdir.join("artifacts");
        let job_vars = [
            ("C3_ARTIFACTS_DIR", artifacts.display().to_string()),
            ("C3_JOB_ID", spec.job_id.clone()),
            ("C3_ATTEMPT", spec.attempt.to_string()),
            ("C3_RESULT_FILE", self.result_path().display().to_string()),
        ];
        let env = child_env(
            std::env::vars_os(),
            self.ctx.token.as_deref(),
            &spec.env,
            &job_vars,
        );
        let Some(workdir) = self.workdir_fd.as_ref() else {
            self.message = Some("the workdir is not open".into());
            return JobEnd::AgentFailed;
        };
        let cgroup_name = format!("c3-{}-{}-{}", spec.job_id, spec.attempt, std::process::id());
        let cgroup = match Cgroup::create(&cgroup_name) {
            Ok(cg) => match cg.procs_file() {
                Ok(f) => Some((cg, f)),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot open the job cgroup's cgroup.procs");
                    cg.remove();
                    None
                }
            },
            Err(why) => {
                tracing::debug!(reason = %why, "no cgroup for the job");
                None
            }
        };
        let plan = LaunchPlan {
            command: &spec.command,
            workdir,
            env,
            run_as: self.run_as.as_ref(),
            cgroup_procs: cgroup.as_ref().map(|(_, f)| f),
            umask: self.ctx.job_umask,
        };
        let spawned = spawn(plan);
        let cgroup = cgroup.map(|(cg, _)| cg);
        let mut script = match spawned {
            Ok(s) => s,
            Err(e) => {
                // The shell's convention: 127 not found, 126 not executable.
                let code = match &e {
                    LaunchError::Spawn { source, .. }
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        127
                    }
                    _ => 126,
                };
                let msg = error_chain(&e);
                tracing::error!(exit_code = code, "{msg}");
                self.message = Some(msg);
                if let Some(cg) = cgroup {
                    cg.remove();
                }
                return JobEnd::Exited(code);
            }
        };
        let containment = match &cgroup {
            Some(cg) => format!("cgroup {}", cg.path().display()),
            None => "process group + subreaper (no writable cgroup v2)".to_string(),
        };
        self.record.phase = Phase::Running;
        self.record.pgid = Some(script.pid);
        self.record.leader = crate::procfs::identity(script.pid);
        self.record.cgroup = cgroup.as_ref().map(|cg| cg.path().display().to_string());
        let procs = JobProcesses::new(script.pid, cgroup);
        let seq = self.next_seq();
        tracing::info!(pid = script.pid, contained_by = %containment, command = ?spec.command, workdir = %self.workdir.display(), "job launched");
        let reaping = CancellationToken::new();
        let reaper = tokio::spawn(procs.clone().reap_until(reaping.clone()));
        let running = self
            .status(seq, JobState::Running, None, false, None)
            .to_json();
        let reporter = self.reporter.clone();
        let deadline = self.deadline();
        let body = running.clone();
        self.running_report = Some((
            tokio::spawn(
                async move { reporter.send("status", seq, body, deadline).await }.in_current_span(),
            ),
            seq,
            running,
        ));

        let mut pumps = JoinSet::new();
        let logs = [Stream::Stdout, Stream::Stderr]
            .map(|s| (s, self.ctx.state.log_path(&spec.job_id, spec.attempt, s)));
        if let Some(out) = script.child.stdout.take() {
            pumps.spawn(pump(out, Stream::Stdout, logs[0].1.clone()).in_current_span());
        }
        if let Some(err) = script.child.stderr.take() {
            pumps.spawn(pump(err, Stream::Stderr, logs[1].1.clone()).in_current_span());
        }
        let output_done = CancellationToken::new();
        let forwarder = self.ctx.control_plane.clone().map(|cp| {
            tokio::spawn(
                forward_live(
                    cp,
                    spec.job_id.clone(),
                    spec.attempt,
                    logs.clone(),
                    output_done.clone(),
                )
                .in_current_span(),
            )
        });

        self.collector = Some(CollectorHandle::start(
            self.collector_config.clone(),
            Some(procs.clone()),
        ));

        crate::fault::point("after-launch");
        let end = self
            .wait(&mut script.child, &procs, cancel, spec.timeout_secs)
            .await;

        let left = {
            let p = procs.clone();
            tokio::task::spawn_blocking(move || p.members())
                .await
                .unwrap_or_default()
        };
        if !left.is_empty() {
            self.warn(format!(
                "the job's script ended but left {} processes running; terminating them",
                left.len()
            ));
        }
        // Always: it also reaps orphans and removes the job's cgroup.
        procs.terminate(None, self.ctx.kill_grace).await;
        reaping.cancel();
        let _ = reaper.await;
        let drained = tokio::time::timeout(PUMP_DRAIN, async {
            while let Some(r) = pumps.join_next().await {
                if let Ok(Err(e)) = r {
                    tracing::error!(error = %e, "cannot keep the job's output in the state dir");
                }
            }
        })
        .await;
        if drained.is_err() {
            // Something that left the job's session still holds its stdout/stderr.
            self.warn("a process outside the job's process group keeps its output open; stopped reading it".into());
            pumps.shutdown().await;
        }
        output_done.cancel();
        if let Some(f) = forwarder {
            if tokio::time::timeout(Duration::from_secs(30), f)
                .await
                .is_err()
            {
                tracing::warn!("live output forwarding did not finish in time");
            }
        }
        end
    }

    async fn wait(
        &mut self,
        child: &mut tokio::process::Child,
        procs: &JobProcesses,
        cancel: &CancellationToken,
        timeout_secs: Option<u64>,
    ) -> JobEnd {
        enum Wake {
            Exited(std::io::Result<std::process::ExitStatus>),
            TimedOut,
            Canceled,
        }
        let deadline = async {
            match timeout_secs {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending().await,
            }
        };
        let wake = tokio::select! {
            status = child.wait() => Wake::Exited(status),
            _ = deadline => Wake::TimedOut,
            _ = cancel.cancelled() => Wake::Canceled,
        };
        match wake {
            Wake::Exited(Ok(status)) => match (status.code(), signal_name(&status)) {
                (Some(code), _) => {
                    tracing::info!(exit_code = code, "job script exited");
                    JobEnd::Exited(code)
                }
                (None, Some(signal)) => {
                    tracing::info!(signal = %signal, "job script was killed by a signal");
                    self.message = Some(format!("killed by {signal}"));
                    JobEnd::Killed(signal)
                }
                (None, None) => JobEnd::Exited(-1),
            },
            Wake::Exited(Err(e)) => {
                // waitpid failing means we lost the child: treat as a node fault.
                self.message = Some(format!("lost track of the job's process: {e}"));
                procs.terminate(None, self.ctx.kill_grace).await;
                JobEnd::AgentLost
            }
            Wake::TimedOut => {
                let secs = timeout_secs.unwrap_or_default();
                tracing::warn!(timeout_secs = secs, "job ran past its timeout; stopping it");
                self.message = Some(format!("ran past timeout_secs={secs}"));
                procs.terminate(Some(child), self.ctx.kill_grace).await;
                JobEnd::TimedOut
            }
            Wake::Canceled => {
                tracing::warn!("agent asked to stop; canceling the job");
                self.message = Some("canceled".into());
                procs.terminate(Some(child), self.ctx.kill_grace).await;
                JobEnd::Canceled
            }
        }
    }

    fn status(
        &self,
        seq: u64,
        state: JobState,
        verdict: Option<&Verdict>,
        terminal: bool,
        upload_errors: Option<u64>,
    ) -> StatusReport {
        StatusReport {
            attempt: self.spec().attempt,
            seq,
            state,
            reason: verdict.and_then(|v| v.reason),
            retryable: verdict.is_some_and(|v| v.retryable),
            exit_code: if terminal {
                self.record.exit_code
            } else {
                None
            },
            signal: if terminal {
                self.record.signal.clone()
            } else {
                None
            },
            message: if terminal { self.message.clone() } else { None },
            upload_errors: upload_errors.unwrap_or(0),
            warnings: if terminal {
                self.warnings.clone()
            } else {
                Vec::new()
            },
            result: serde_json::Value::Null,
            time: now_rfc3339(),
        }
    }

    fn note_end(&mut self, end: &JobEnd) {
        self.record.exit_code = None;
        self.record.signal = None;
        self.record.state = None;
        match end {
            JobEnd::Exited(code) => self.record.exit_code = Some(*code),
            JobEnd::Killed(sig) => self.record.signal = Some(sig.clone()),
            JobEnd::Canceled => self.record.state = Some(JobState::Canceled),
            JobEnd::TimedOut => self.record.state = Some(JobState::TimedOut),
            JobEnd::AgentFailed | JobEnd::DatasetFailed | JobEnd::AgentLost => {
                self.record.state = Some(JobState::Failed)
            }
        }
    }

    /// Final sync, manifest, artifacts registration, terminal status. Used by `run` and `recover`.
    pub async fn finish(mut self, end: JobEnd, started: Instant) -> JobSummary {
        self.note_end(&end);
        self.record.phase = Phase::Finishing;
        self.save();
        let launched = match &end {
            JobEnd::Exited(_) | JobEnd::Killed(_) | JobEnd::TimedOut | JobEnd::AgentLost => true,
            // Canceled before launch leaves no record of a pgid.
            JobEnd::Canceled => self.record.pgid.is_some(),
            JobEnd::AgentFailed | JobEnd::DatasetFailed => false,
        };
        let mut sealed = Sealed::default();
        let mut result = serde_json::Value::Null;
        if launched {
            let collector = match self.collector.take() {
                Some(c) => c,
                // `recover`: the same collector, with no job running.
                None => CollectorHandle::start(self.collector_config.clone(), None),
            };
            let final_sync = collector.job_ended().await;
            for w in final_sync.warnings {
                self.warn(w);
            }
            self.unstored.extend(final_sync.unstored);
            result = self.read_result();
            let (job_id, attempt) = (self.spec().job_id.clone(), self.spec().attempt);
            let logs = [Stream::Stdout, Stream::Stderr]
                .map(|s| (s, self.ctx.state.log_path(&job_id, attempt, s)));
            sealed = collector.seal(logs, result.clone()).await;
            self.unstored.extend(std::mem::take(&mut sealed.unstored));
        }
        let upload_errors = self.unstored.len() as u64;
        let verdict = decide(&end, upload_errors > 0);
        if upload_errors > 0 {
            tracing::error!(
                upload_errors,
                unstored = ?self.unstored,
                "some output could not be stored; it stays on the node: `c3-agent resync {}` (or `recover`) stores it later",
                self.spec().job_id
            );
        }
        self.record.unstored = std::mem::take(&mut self.unstored);
        // From here on, one deadline bounds everything the control plane still gets.
        let stay = self.deadline();
        // RUNNING must reach the control plane (or the outbox) before the terminal status.
        if let Some((mut h, seq, body)) = self.running_report.take() {
            if tokio::time::timeout_at(stay, &mut h).await.is_err() {
                h.abort();
                self.reporter.keep_unsent("status", seq, &body);
            }
        }
        let seq = self.next_seq();
        if let Some(sha) = sealed.manifest_sha256.clone() {
            self.register_artifacts(seq, &sha, &sealed, stay).await;
        }
        let mut status = self.status(
            seq,
            verdict.state,
            Some(&verdict),
            true,
            Some(upload_errors),
        );
        status.result = result;
        let delivery = self
            .reporter
            .send("status", seq, status.to_json(), stay)
            .await;
        if matches!(delivery, Delivery::Kept) {
            tracing::warn!("terminal status kept in the state dir; `c3-agent recover` or the next run delivers it");
        }
        self.record.state = Some(verdict.state);
        self.record.reason = verdict.reason;
        self.record.phase = Phase::Done;
        self.save();
        let summary = JobSummary {
            job_id: self.spec().job_id.clone(),
            verdict,
            files: sealed.files,
            bytes: sealed.bytes,
            new_bytes: sealed.new_bytes,
            upload_errors,
            manifest: sealed
                .manifest_sha256
                .map(|_| self.collector_config.manifest.key()),
        };
        tracing::info!(
            state = verdict.state.as_str(),
            reason = verdict.reason.map(|r| r.as_str()).unwrap_or("-"),
            exit_code = verdict.exit.code(),
            files = summary.files,
            bytes = summary.bytes,
            new_bytes = summary.new_bytes,
            upload_errors,
            elapsed_s = format_args!("{:.2}", started.elapsed().as_secs_f64()),
            "job finished"
        );
        summary
    }

    /// The job's structured result, if it wrote a valid one.
    fn read_result(&mut self) -> serde_json::Value {
        let reader = self.reader.clone();
        match read_result_file(&self.workdir, &self.result_path(), reader.as_ref()) {
            Ok(v) => v,
            Err(problem) => {
                self.warn(format!("result file ignored: {problem}"));
                serde_json::Value::Null
            }
        }
    }

    async fn register_artifacts(
        &mut self,
        order: u64,
        manifest_sha256: &str,
        sealed: &Sealed,
        deadline: tokio::time::Instant,
    ) {
        let reg = ArtifactsRegistration {
            attempt: self.spec().attempt,
            manifest: manifest_key(&self.spec().job_id),
            manifest_sha256: manifest_sha256.to_string(),
            files: sealed.files as u64,
            bytes: sealed.bytes,
            new_bytes: sealed.new_bytes,
        };
        if let Delivery::Delivered(body) = self
            .reporter
            .send("artifacts", order, reg.to_json(), deadline)
            .await
        {
            match ArtifactsReply::from_json(&body) {
                Ok(ArtifactsReply {
                    storage_used_bytes: used,
                    storage_quota_bytes: Some(quota),
                }) if used > quota => {
                    self.warn(format!("storage usage {used} bytes is over the quota of {quota} bytes (soft limit: nothing was rejected)"));
                }
                Ok(reply) => {
                    tracing::info!(storage_used_bytes = reply.storage_used_bytes, storage_quota_bytes = ?reply.storage_quota_bytes, "artifacts registered")
                }
                Err(e) => tracing::warn!(error = %e, "artifacts registration reply not understood"),
            }
        }
    }
}

/// Reads the result file without following any symlink the job may have planted.
fn read_result_file(
    workdir: &Path,
    path: &Path,
    reader: Option<&JobReader>,
) -> Result<serde_json::Value, String> {
    use std::io::Read;
    let mut file = match crate::confine::open_read(Some(workdir), path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::Value::Null),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let st = crate::confine::fstat(&file).map_err(|e| e.to_string())?;
    if reader.is_some_and(|r| !r.can_read(&st)) {
        return Err("not readable by the job's user".into());
    }
    if meta.len() > MAX_RESULT_BYTES {
        return Err(format!(
            "{} bytes is over the limit of {MAX_RESULT_BYTES}",
            meta.len()
        ));
    }
    let mut bytes = Vec::new();
    file.by_ref()
        .take(MAX_RESULT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_RESULT_BYTES {
        return Err(format!("over the limit of {MAX_RESULT_BYTES} bytes"));
    }
    c3_proto::parse_json_value(&bytes).map_err(|e| format!("not valid JSON: {e}"))
}
