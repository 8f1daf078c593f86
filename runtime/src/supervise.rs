//! The job while it runs: launched into its own session (and cgroup, where the agent can
//! create one), its output pumped to the log and the state dir (and live to the control
//! plane), its orphans reaped, and its end (exit, timeout, cancel) turned into a [`JobEnd`]
//! with every process of the job stopped.

use std::path::Path;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use c3_proto::{JobSpec, Stream};

use crate::confine::DirFd;
use crate::context::{AgentContext, ForwardTo};
use crate::display::error_chain;
use crate::jobproc::{Cgroup, JobProcesses, StopBy};
use crate::launch::{
    child_env, signal_name, start, LaunchError, LaunchPlan, RunAs, LAUNCH_DEADLINE,
};
use crate::outcome::JobEnd;
use crate::output::{forward_live, pump, LAST_ROUND};

/// How long the output pumps may run on once the job's processes are gone.
const PUMP_DRAIN: Duration = Duration::from_secs(5);

/// How long the output pumps may run on when the stop's deadline has passed.
const PUMP_MOMENT: Duration = Duration::from_millis(100);

/// A launched job, until it ends.
pub struct Supervisor {
    child: tokio::process::Child,
    procs: JobProcesses,
    output: Output,
    reaping: CancellationToken,
    reaper: JoinHandle<()>,
    /// Passes the configured signals (`forward_signals`) on to the job while it runs.
    forwarding: CancellationToken,
    forwarder: JoinHandle<()>,
}

/// The job's output, still being read after its processes are gone.
pub struct Output {
    pumps: JoinSet<std::io::Result<crate::output::Pumped>>,
    /// Tells the pumps to end their logs now ([`Output::drain`] past its wait).
    stop_pumps: CancellationToken,
    /// Live posts to the control plane; owned here, and aborted if it overruns its deadline.
    forwarder: Option<JoinHandle<()>>,
    /// Written once, by [`Output::drain`]: the deadline of the forwarder's last round. Dropped
    /// unwritten (an `Output` never drained), it stops the forwarder at once.
    last_by: tokio::sync::watch::Sender<Option<tokio::time::Instant>>,
}

/// The script could not be started: `end` says how (127 not found, 126 not executable, the
/// node's fault, a stop before it started).
pub struct LaunchFailed {
    pub end: JobEnd,
    pub message: String,
}

/// How a supervised job ended; every process of it is gone.
pub struct Supervised {
    pub end: JobEnd,
    /// Why, in words, for the terminal status (timeout, cancel, signal).
    pub message: Option<String>,
    /// For the log and the terminal status (the caller logs them, once).
    pub warnings: Vec<String>,
    /// OOM kills, peak memory, CPU time.
    pub facts: c3_proto::JobFacts,
    /// Every process of the job is gone (else some survived SIGKILL): its GPU is free.
    pub gone: bool,
    /// What the job wrote last is still being read: [`Output::drain`].
    pub output: Output,
}

/// The job's own cgroup, if the agent can create one. Created (and recorded by the caller)
/// before the launch, so that an agent killed right after the launch leaves `recover` a
/// cgroup to stop.
pub fn job_cgroup(spec: &JobSpec) -> Option<Cgroup> {
    let name = format!("c3-{}-{}-{}", spec.job_id, spec.attempt, std::process::id());
    match Cgroup::create(&name) {
        Ok(cg) => Some(cg),
        Err(why) => {
            tracing::debug!(reason = %why, "no cgroup for the job");
            None
        }
    }
}

impl Output {
    /// Reads what the job's pipes still hold (bounded: a process outside the job, or one of
    /// it stuck for good, may keep them open; after a stop, by `stop_by` too) and lets the
    /// live posts finish by [`LAST_ROUND`] from now or `stay` (what `give_up_secs` and the
    /// stop deadline leave), whichever is first; warnings for the terminal status.
    pub async fn drain(
        mut self,
        stay: tokio::time::Instant,
        stop_by: Option<tokio::time::Instant>,
    ) -> Vec<String> {
        let mut warnings = Vec::new();
        let now = tokio::time::Instant::now();
        // A moment even past the stop's deadline: a pipe whose writers are gone only has its
        // last bytes to give.
        let until = stop_by.map_or(now + PUMP_DRAIN, |by| {
            by.clamp(now + PUMP_MOMENT, now + PUMP_DRAIN)
        });
        let pumps = &mut self.pumps;
        let mut ended = async |warnings: &mut Vec<String>| {
            while let Some(r) = pumps.join_next().await {
                match r {
                    Ok(Ok(pumped)) => warnings.extend(pumped.warning()),
                    Ok(Err(e)) => {
                        tracing::error!(error = %error_chain(&e), "cannot read the job's output");
                        warnings.push(format!(
                            "the job's output could not be read to its end: {}",
                            error_chain(&e)
                        ));
                    }
                    Err(_) => {}
                }
            }
        };
        let drained = tokio::time::timeout_at(until, ended(&mut warnings)).await;
        if drained.is_err() {
            // Something outside the job still holds its stdout/stderr: the pumps stop reading
            // and end their logs (notes of what was dropped, their sync), a moment at most.
            warnings
                .push("a process outside the job keeps its output open; stopped reading it".into());
            self.stop_pumps.cancel();
            let moment = tokio::time::Instant::now() + PUMP_MOMENT;
            if tokio::time::timeout_at(moment, ended(&mut warnings))
                .await
                .is_err()
            {
                self.pumps.shutdown().await;
            }
        }
        let by = (tokio::time::Instant::now() + LAST_ROUND).min(stay);
        let _ = self.last_by.send(Some(by));
        if let Some(mut f) = self.forwarder.take() {
            // The forwarder keeps to `by` itself; this also bounds a read of the log files
            // that hangs. A moment's slack lets a post that just got its answer finish.
            if tokio::time::timeout_at(by + Duration::from_millis(200), &mut f)
                .await
                .is_err()
            {
                f.abort();
                let _ = f.await;
                tracing::warn!("live output forwarding did not finish in time; stopped");
            }
        }
        warnings
    }
}

/// How long after the script's end a stop of the agent's still counts as what ended it.
/// Slurm's scancel and time limit (and systemd's stop of a unit's whole cgroup) signal every
/// process of the step at once, and the script's end may reach the agent a moment before
/// its own signal does; a moment, since the same kernel delivers both.
pub(crate) const STOP_WITH_END: Duration = Duration::from_millis(200);

/// Whether the script ended with a stop of the agent's: one already requested, or one
/// within [`STOP_WITH_END`]. Then the job was stopped, whatever its exit code: a trainer
/// that catches SIGTERM, saves a checkpoint and exits 0 (or 1) did not succeed (or fail)
/// on its own, and dying of the signal is no different. An end that came longer before the
/// stop predates it and stands (the code cannot tell one within the window apart).
///
/// The window is waited only where a stop can race the script's end: a death by a stop
/// signal (whoever sent it), or under Slurm, whose scancel and time limit signal the whole
/// step at once. Elsewhere (systemd stops the agent alone, as does a pod's deletion) every
/// job's end, and its GPU, would wait 200 ms for nothing.
async fn stopped_with_the_job(
    status: &std::process::ExitStatus,
    cancel: &CancellationToken,
) -> bool {
    use std::os::unix::process::ExitStatusExt;
    if cancel.is_cancelled() {
        return true;
    }
    let stop_signal = matches!(status.signal(), Some(libc::SIGTERM | libc::SIGINT))
        || matches!(status.code(), Some(143 | 130));
    (stop_signal || crate::slurm::under_slurm())
        && tokio::time::timeout(STOP_WITH_END, cancel.cancelled())
            .await
            .is_ok()
}

/// The signals to pass on, each registered now: one that arrives the moment the job
/// starts is not missed by a listener still being set up.
fn listen(signals: &[i32]) -> Vec<(i32, tokio::signal::unix::Signal)> {
    use tokio::signal::unix::{signal, SignalKind};
    signals
        .iter()
        .filter_map(|n| match signal(SignalKind::from_raw(*n)) {
            Ok(s) => Some((*n, s)),
            Err(e) => {
                tracing::warn!(signal = n, error = %e, "cannot forward this signal to the job");
                None
            }
        })
        .collect()
}

/// Passes each signal the agent gets on to the job (its leader, or every process of it:
/// `to`), until `stop`. Slurm's `--signal=B:USR1@N` reaches only the batch shell, the
/// agent, and frameworks save a checkpoint on it.
async fn forward_signals(
    procs: JobProcesses,
    leader_fd: Option<crate::jobproc::PidFd>,
    mut streams: Vec<(i32, tokio::signal::unix::Signal)>,
    to: ForwardTo,
    stop: CancellationToken,
) {
    if streams.is_empty() {
        return;
    }
    loop {
        let next = futures::future::select_all(
            streams
                .iter_mut()
                .map(|(n, s)| Box::pin(async move { s.recv().await.map(|_| *n) })),
        );
        let got = tokio::select! {
            _ = stop.cancelled() => return,
            (got, _, _) = next => got,
        };
        let Some(n) = got else { return };
        let Ok(sig) = nix::sys::signal::Signal::try_from(n) else {
            continue;
        };
        let reached = match (to, &leader_fd) {
            // Through the pidfd: never a later process that reused the leader's pid.
            (ForwardTo::Leader, Some(fd)) => usize::from(fd.signal(sig)),
            // No pidfds (Linux < 5.3): the leader while it is the process it was.
            (ForwardTo::Leader, None) => {
                let leader = procs.leader();
                let same = crate::procfs::stat(leader)
                    .is_some_and(|s| s.start_ticks == procs.leader_start_ticks() && !s.is_zombie());
                usize::from(
                    same && nix::sys::signal::kill(nix::unistd::Pid::from_raw(leader), sig).is_ok(),
                )
            }
            (ForwardTo::All, _) => procs.signal_all(sig).await,
        };
        tracing::info!(signal = %sig, processes = reached, to = ?to, "signal forwarded to the job");
    }
}

/// How long the look at what the processes a script left behind still write may take.
const LEFT_LOOK: Duration = Duration::from_secs(2);

impl Supervisor {
    /// Starts the script in `workdir_fd` with the job's environment and user; a stop
    /// (`cancel`) before or while it starts ends the attempt with nothing of the job running.
    /// `spawned` hears the script's pid once it is forked (see [`start`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn launch(
        ctx: &AgentContext,
        spec: &JobSpec,
        workdir: &Path,
        workdir_fd: &DirFd,
        run_as: Option<&RunAs>,
        socket: Option<&Path>,
        cgroup: Option<Cgroup>,
        cancel: &CancellationToken,
        spawned: Option<tokio::sync::oneshot::Sender<i32>>,
    ) -> Result<Supervisor, LaunchFailed> {
        // What `AGENT_SETS` lists, in its order.
        let mut job_vars = vec![
            (
                "C3_ARTIFACTS_DIR",
                workdir.join("artifacts").display().to_string(),
            ),
            ("C3_JOB_ID", spec.job_id.clone()),
            ("C3_ATTEMPT", spec.attempt.to_string()),
            (
                "C3_RESULT_FILE",
                crate::result::result_path(workdir).display().to_string(),
            ),
        ];
        if let Some(socket) = socket {
            job_vars.push(("C3_AGENT_SOCKET", socket.display().to_string()));
        }
        let env = child_env(
            std::env::vars_os(),
            ctx.token.as_ref().map(crate::display::Secret::expose),
            run_as,
            &spec.env,
            &job_vars,
        );
        let cgroup = cgroup.and_then(|cg| match cg.procs_file() {
            Ok(f) => Some((cg, f)),
            Err(e) => {
                tracing::debug!(error = %crate::error_chain(&e), "cannot open the job cgroup's cgroup.procs");
                cg.remove();
                None
            }
        });
        let (cgroup, cgroup_procs) = cgroup.unzip();
        let fail = |e: &LaunchError, cgroup: Option<Cgroup>| {
            if let Some(cg) = cgroup {
                // Empty unless a stuck launch's process outlived its SIGKILL.
                cg.kill();
                cg.remove();
            }
            LaunchFailed {
                end: launch_failure_end(e),
                message: error_chain(e),
            }
        };
        let workdir_fd = match workdir_fd.try_clone() {
            Ok(fd) => fd,
            Err(source) => {
                let e = LaunchError::Setup {
                    program: spec.command[0].clone(),
                    step: crate::launch::Step::Fork,
                    source,
                };
                return Err(fail(&e, cgroup));
            }
        };
        let plan = LaunchPlan {
            command: spec.command.clone(),
            workdir: workdir_fd,
            env,
            run_as: run_as.cloned(),
            cgroup_procs,
            umask: ctx.job_umask,
            hang_before_exec: crate::fault::armed("exec-hangs")
                || crate::fault::armed("exec-hangs-without-cgroup"),
            drop_in_child: crate::statedir::held_flocks(),
        };
        // Just before the launch: every connection made from now on may be the job's.
        let fuse = crate::fusectl::Before::take(
            run_as.map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid),
        );
        let mut script = match start(plan, cancel, LAUNCH_DEADLINE, spawned).await {
            Ok(s) => s,
            Err(e) => return Err(fail(&e, cgroup)),
        };
        let procs = JobProcesses::launched(script.pid, cgroup, Some(fuse));
        // Taken while the leader is surely alive and unreaped (nothing waited for it yet).
        let leader_fd = crate::jobproc::PidFd::open(script.pid);
        let reaping = CancellationToken::new();
        let reaper = tokio::spawn(procs.clone().reap_until(reaping.clone()));
        let mut pumps = JoinSet::new();
        let stop_pumps = CancellationToken::new();
        let logs = [Stream::Stdout, Stream::Stderr]
            .map(|s| (s, ctx.state.log_path(&spec.job_id, spec.attempt, s)));
        if let Some(out) = script.child.stdout.take() {
            let keep = ctx.max_log_bytes;
            pumps.spawn(
                pump(
                    out,
                    Stream::Stdout,
                    logs[0].1.clone(),
                    keep,
                    stop_pumps.clone(),
                )
                .in_current_span(),
            );
        }
        if let Some(err) = script.child.stderr.take() {
            let keep = ctx.max_log_bytes;
            pumps.spawn(
                pump(
                    err,
                    Stream::Stderr,
                    logs[1].1.clone(),
                    keep,
                    stop_pumps.clone(),
                )
                .in_current_span(),
            );
        }
        let (last_by, last_by_rx) = tokio::sync::watch::channel(None);
        let forwarder = ctx.control_plane.clone().map(|cp| {
            tokio::spawn(
                forward_live(cp, spec.job_id.clone(), spec.attempt, logs, last_by_rx)
                    .in_current_span(),
            )
        });
        let forwarding = CancellationToken::new();
        let signal_forwarder = tokio::spawn(
            forward_signals(
                procs.clone(),
                leader_fd,
                listen(&ctx.forward_signals),
                ctx.forward_to,
                forwarding.clone(),
            )
            .in_current_span(),
        );
        Ok(Supervisor {
            child: script.child,
            procs,
            output: Output {
                pumps,
                stop_pumps,
                forwarder,
                last_by,
            },
            reaping,
            reaper,
            forwarding,
            forwarder: signal_forwarder,
        })
    }

    pub fn procs(&self) -> &JobProcesses {
        &self.procs
    }

    /// How the job is contained, for the log.
    pub fn containment(&self) -> String {
        match self.procs.cgroup() {
            Some(cg) => format!("cgroup {}", cg.path().display()),
            None => "process group + subreaper (no writable cgroup v2)".to_string(),
        }
    }

    /// Waits for the job's end (exit, timeout or cancel); then every process of the job is
    /// stopped and reaped, after a stop by `stop`'s deadline. Its output may still be
    /// draining ([`Output::drain`]).
    pub async fn wait(
        mut self,
        cancel: &CancellationToken,
        timeout_secs: Option<u64>,
        grace: Duration,
        stop: &StopBy,
    ) -> Supervised {
        let mut warnings = Vec::new();
        let (end, message, terminated) = self.wait_script(cancel, timeout_secs, grace, stop).await;
        // The script is over: nothing more to pass on (its pid may be reused from now on).
        self.forwarding.cancel();
        let left = self.procs.members_async().await;
        // After a terminate, what is left survived SIGKILL: no leftovers of the script's.
        if !left.is_empty() && !terminated {
            // What they were still writing is stored as it stands, perhaps cut short: say which
            // files (a `save.py &` whose script exited 0 leaves a half-written checkpoint).
            // Bounded: the look stats each open file, and a file system of the job's (FUSE) or
            // a hung network mount may never answer; the job is stopped either way.
            let writing = {
                let left = left.clone();
                let look =
                    tokio::task::spawn_blocking(move || crate::procfs::written_paths(&left, 5));
                let until = tokio::time::Instant::now() + LEFT_LOOK;
                tokio::time::timeout_at(stop.by().map_or(until, |by| by.min(until)), look).await
            };
            let mut warning = format!(
                "the job's script ended but left {} processes running; terminating them",
                left.len()
            );
            let (count, named) = match writing {
                Ok(found) => found.unwrap_or_default(),
                Err(_) => {
                    warning.push_str(&format!(
                        " (which files they still wrote is unknown: /proc did not answer within {} s)",
                        LEFT_LOOK.as_secs()
                    ));
                    (0, Vec::new())
                }
            };
            if count > 0 {
                let shown: Vec<String> = named
                    .iter()
                    .map(|p| crate::display::clip_text(p.display().to_string(), 256))
                    .collect();
                warning.push_str(&format!(
                    " (they still wrote {count} file(s); any in the output dirs is stored as it stands, perhaps incomplete: {}{})",
                    shown.join(", "),
                    if count > shown.len() { ", ..." } else { "" }
                ));
            }
            warnings.push(warning);
        }
        // Always: it also reaps orphans and removes the job's cgroup. A second grace after the
        // stop's terminate would double the stop's time for a job that ignores SIGTERM.
        if terminated {
            self.procs.last_round(stop).await;
        } else {
            self.procs.terminate(None, grace, stop).await;
        }
        let _ = self.forwarder.await;
        let gone = self.procs.all_gone().await;
        if !gone {
            tracing::error!("processes of the job survive SIGKILL; its GPU is not reported free");
            warnings.push("processes of the job survived SIGKILL (stuck in the kernel?)".into());
        }
        self.reaping.cancel();
        let _ = self.reaper.await;
        let sigkilled = matches!(&end, JobEnd::Killed(s) if s == "SIGKILL")
            || end == JobEnd::Exited(128 + libc::SIGKILL);
        let facts = {
            let p = self.procs.clone();
            tokio::task::spawn_blocking(move || p.facts(sigkilled))
                .await
                .unwrap_or_default()
        };
        if facts.oom_kills > 0 {
            tracing::warn!(
                oom_kills = facts.oom_kills,
                "the kernel's OOM killer killed processes of the job"
            );
        }
        Supervised {
            end,
            message,
            warnings,
            facts,
            gone,
            output: self.output,
        }
    }

    /// How the script ended, and whether its processes were terminated for it.
    async fn wait_script(
        &mut self,
        cancel: &CancellationToken,
        timeout_secs: Option<u64>,
        grace: Duration,
        stop: &StopBy,
    ) -> (JobEnd, Option<String>, bool) {
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
            status = self.child.wait() => Wake::Exited(status),
            _ = deadline => Wake::TimedOut,
            _ = cancel.cancelled() => Wake::Canceled,
        };
        if let Wake::Exited(Ok(status)) = &wake {
            if stopped_with_the_job(status, cancel).await {
                let limit = crate::slurm::stopped_by_time_limit(crate::slurm::ASK_WITHIN).await;
                tracing::warn!(
                    script_exit_code = status.code(),
                    signal = signal_name(status),
                    "agent asked to stop as the job's script ended: the stop ended it"
                );
                let (end, message) = stop_end(limit);
                return (end, message, false);
            }
        }
        match wake {
            Wake::Exited(Ok(status)) => match (status.code(), signal_name(&status)) {
                (Some(code), _) => {
                    tracing::info!(script_exit_code = code, "job script exited");
                    (JobEnd::Exited(code), None, false)
                }
                (None, Some(signal)) => {
                    tracing::info!(signal = %signal, "job script was killed by a signal");
                    let message = format!("killed by {signal}");
                    (JobEnd::Killed(signal), Some(message), false)
                }
                (None, None) => (JobEnd::Exited(-1), None, false),
            },
            Wake::Exited(Err(e)) => {
                // waitpid failing means we lost the child: treat as a node fault.
                self.procs.terminate(None, grace, stop).await;
                (
                    JobEnd::AgentLost,
                    Some(format!("lost track of the job's process: {e}")),
                    true,
                )
            }
            Wake::TimedOut => {
                let secs = timeout_secs.unwrap_or_default();
                tracing::warn!(timeout_secs = secs, "job ran past its timeout; stopping it");
                self.procs
                    .terminate(Some(&mut self.child), grace, stop)
                    .await;
                (
                    JobEnd::TimedOut,
                    Some(format!("ran past timeout_secs={secs}")),
                    true,
                )
            }
            Wake::Canceled => {
                tracing::warn!("agent asked to stop; stopping the job");
                let (_, limit) = tokio::join!(
                    self.procs.terminate(Some(&mut self.child), grace, stop),
                    crate::slurm::stopped_by_time_limit(crate::slurm::ASK_WITHIN)
                );
                let (end, message) = stop_end(limit);
                (end, message, true)
            }
        }
    }
}

/// A stop request is a cancel, unless Slurm says its time limit sent it.
pub(crate) fn stop_end(slurm_time_limit: bool) -> (JobEnd, Option<String>) {
    if slurm_time_limit {
        tracing::warn!("Slurm's time limit stopped the job (squeue: TimeLimit); timed out");
        (JobEnd::TimedOut, Some("ran past Slurm's time limit".into()))
    } else {
        tracing::warn!("job canceled");
        (JobEnd::Canceled, Some("canceled".into()))
    }
}

/// How a launch that failed ends. The script's own fault, in the shell's convention: 127 not
/// found, 126 not executable (a FAILED/SCRIPT_ERROR no retry helps); only execve's own
/// errors can be that. The node's fault (no pids, no memory, a cgroup that refused the
/// process, a user switch the node does not allow, a user lookup that failed): AGENT_ERROR,
/// retryable, for another node may well run it.
fn launch_failure_end(e: &LaunchError) -> JobEnd {
    match e {
        LaunchError::Exec { source, .. } => match source.raw_os_error() {
            Some(libc::ENOENT) => JobEnd::Exited(127),
            Some(
                libc::EACCES
                | libc::EPERM
                | libc::ENOEXEC
                | libc::EISDIR
                | libc::ETXTBSY
                | libc::ELOOP
                | libc::ENOTDIR
                | libc::ENAMETOOLONG
                | libc::E2BIG,
            ) => JobEnd::Exited(126),
            _ => JobEnd::AgentFailed,
        },
        LaunchError::Canceled { .. } => JobEnd::Canceled,
        LaunchError::Setup { .. }
        | LaunchError::Stuck { .. }
        | LaunchError::NoSuchUser(_)
        | LaunchError::NotRoot(_)
        | LaunchError::UserLookup { .. } => JobEnd::AgentFailed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_failed(errno: i32) -> JobEnd {
        launch_failure_end(&LaunchError::Exec {
            program: "train.py".into(),
            source: std::io::Error::from_raw_os_error(errno),
        })
    }

    #[test]
    fn a_launch_the_node_failed_is_the_agents_error_not_the_scripts() {
        assert_eq!(spawn_failed(libc::ENOENT), JobEnd::Exited(127));
        for errno in [libc::EACCES, libc::ENOEXEC, libc::ETXTBSY, libc::EISDIR] {
            assert_eq!(spawn_failed(errno), JobEnd::Exited(126), "errno {errno}");
        }
        // fork out of pids or memory, a cgroup that refused the process: another node may do.
        for errno in [libc::EAGAIN, libc::ENOMEM, libc::EBUSY, libc::ENODEV] {
            assert_eq!(spawn_failed(errno), JobEnd::AgentFailed, "errno {errno}");
        }
    }

    /// A file every write to fails with EPERM (a memfd sealed against writes): a stand-in
    /// for a job cgroup whose `cgroup.procs` refuses the process.
    fn refusing_file() -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create takes a valid C string and flags and returns a new fd or -1.
        let fd = unsafe {
            libc::memfd_create(
                c"refuses-writes".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        // SAFETY: fcntl on an fd this function owns.
        let sealed = unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_WRITE) };
        assert_eq!(
            sealed,
            0,
            "F_ADD_SEALS: {}",
            std::io::Error::last_os_error()
        );
        file
    }

    /// A plan for `command` in `dir`, as the agent's own user.
    fn plan(command: &[&str], dir: &Path) -> LaunchPlan {
        LaunchPlan {
            command: command.iter().map(|s| s.to_string()).collect(),
            workdir: DirFd::open(dir).unwrap(),
            env: std::collections::BTreeMap::new(),
            run_as: None,
            cgroup_procs: None,
            umask: 0o022,
            hang_before_exec: false,
            drop_in_child: Vec::new(),
        }
    }

    /// The launch's error, which it must end with.
    async fn failed(plan: LaunchPlan, cancel: &CancellationToken, within: Duration) -> LaunchError {
        match start(plan, cancel, within, None).await {
            Ok(mut script) => {
                let _ = script.child.kill().await;
                panic!("the launch went through");
            }
            Err(e) => e,
        }
    }

    const RAN: [&str; 3] = ["/bin/sh", "-c", "echo ran > ran"];

    /// A step of the agent's before execve that the node refuses (the job's cgroup, with
    /// EPERM; a switch to another user where the agent may not make one, as in a pod
    /// without CAP_SETUID) failed every job as the script's (EPERM read as 126, not
    /// executable): the node's fault, retryable elsewhere, and the script never ran.
    #[tokio::test]
    async fn a_step_before_execve_the_node_refuses_is_the_agents_error_not_the_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let me = nix::unistd::geteuid().as_raw();
        let other = RunAs {
            name: "someone-else".into(),
            uid: me + 1,
            gid: me + 1,
            groups: vec![me + 1],
            home: "/".into(),
            shell: "/bin/sh".into(),
        };
        let mut cases = vec![("cgroup.procs refuses", Some(refusing_file()), None)];
        if me != 0 {
            cases.push(("no right to switch users", None, Some(other)));
        }
        for (what, cgroup_procs, run_as) in cases {
            let mut p = plan(&RAN, dir.path());
            (p.cgroup_procs, p.run_as) = (cgroup_procs, run_as);
            let e = failed(p, &CancellationToken::new(), LAUNCH_DEADLINE).await;
            assert_eq!(
                launch_failure_end(&e),
                JobEnd::AgentFailed,
                "{what}: {}",
                error_chain(&e)
            );
            assert!(!dir.path().join("ran").exists(), "{what}: the script ran");
        }
        // execve's own errors are still the script's.
        let missing = plan(&["/no/such/program"], dir.path());
        let e = failed(missing, &CancellationToken::new(), LAUNCH_DEADLINE).await;
        assert_eq!(
            launch_failure_end(&e),
            JobEnd::Exited(127),
            "{}",
            error_chain(&e)
        );
    }

    /// An execve that never returns (the command, a PATH entry or its interpreter on a hung
    /// NFS mount or an unanswered FUSE mount; here the child blocks where execve would)
    /// held the agent in std's spawn for good: the launch is given up at its deadline,
    /// AGENT_ERROR, and its process killed and reaped.
    #[tokio::test]
    async fn a_launch_whose_execve_never_returns_is_given_up_and_its_process_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = plan(&RAN, dir.path());
        p.hang_before_exec = true;
        let began = std::time::Instant::now();
        let e = failed(p, &CancellationToken::new(), Duration::from_secs(1)).await;
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(
            launch_failure_end(&e),
            JobEnd::AgentFailed,
            "{}",
            error_chain(&e)
        );
        let LaunchError::Stuck { pid: Some(pid), .. } = e else {
            panic!("not a stuck launch with its pid: {}", error_chain(&e));
        };
        assert!(crate::procfs::stat(pid).is_none(), "process {pid} is left");
        assert!(!dir.path().join("ran").exists());
    }

    /// A stop that came before the launch still started the script (which then got SIGTERM);
    /// one during a stuck launch was never heard. Both now end it, CANCELED, nothing left.
    #[tokio::test]
    async fn a_stop_before_or_during_a_launch_starts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let stopped = CancellationToken::new();
        stopped.cancel();
        let e = failed(plan(&RAN, dir.path()), &stopped, LAUNCH_DEADLINE).await;
        assert_eq!(
            launch_failure_end(&e),
            JobEnd::Canceled,
            "{}",
            error_chain(&e)
        );

        let stop = CancellationToken::new();
        let stopper = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                stop.cancel();
            })
        };
        let mut p = plan(&RAN, dir.path());
        p.hang_before_exec = true;
        let began = std::time::Instant::now();
        let e = failed(p, &stop, LAUNCH_DEADLINE).await;
        stopper.await.unwrap();
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(
            launch_failure_end(&e),
            JobEnd::Canceled,
            "{}",
            error_chain(&e)
        );
        assert!(!dir.path().join("ran").exists());
    }
}
