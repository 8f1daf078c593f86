//! `c3-agent`: the binary's edge. Parses the command line and the config, sets up
//! logging and signals, wires the runtime, and turns outcomes into exit codes.

mod cli;
mod config;
mod exposure;
mod inspect;
mod logwriter;
mod ops;
mod out;
mod publish;
mod specpath;
mod telemetry;
#[cfg(test)]
#[path = "../../tests/skip.rs"]
mod testskip;
mod unitcheck;
mod workmark;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use c3_proto::JobSpec;
use c3_runtime::job::AgentContext;
use c3_runtime::report::ControlPlane;
use c3_runtime::statedir::StateDir;
use c3_runtime::store::{BlobStore, StoreError};
use c3_runtime::{error_chain, ExitCode as JobExit};

use crate::cli::{Cli, Command, RunArgs, WatchArgs};

/// Usage, config or spec error: nothing launched (contract §1).
const USAGE: u8 = 2;

/// How long the log lines still queued at exit may take to write: a slow journal still gets
/// the job's last lines, a stalled one does not keep the agent (and the scheduler's kill
/// timer) waiting.
const FLUSH_AT_EXIT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let code = std::panic::catch_unwind(agent_main);
    logwriter::flush(FLUSH_AT_EXIT);
    match code {
        Ok(code) => code,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

fn agent_main() -> ExitCode {
    bound_malloc();
    out::set_json(out::json_from_env());
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return bad_arguments(e),
    };
    // Inside a job: no config to read (it may not be readable by the job's user).
    if let Command::Publish { wait_all, paths } = &cli.command {
        return publish::client(*wait_all, paths);
    }
    // Run as a job's user, with no config either.
    if let Command::ProbeConnect { endpoint } = &cli.command {
        return exposure::probe_connect(endpoint);
    }
    // Generated from the command line's own definition: nothing to configure.
    match &cli.command {
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "c3-agent",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
        Command::Man => {
            use clap::CommandFactory;
            let written = clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout());
            return if written.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
        _ => {}
    }
    let config = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => return usage(&e.to_string()),
    };
    let acts_on_state = matches!(
        cli.command,
        Command::Run(_)
            | Command::Watch(_)
            | Command::Recover { .. }
            | Command::Resync { .. }
            | Command::Gc { .. }
    );
    if acts_on_state {
        if let Some(problem) = config::state_dir_problem(&config.state_dir) {
            return usage(&format!("config: {problem}"));
        }
    }
    out::set_json(config.log_format == config::LogFormat::Json);
    match telemetry::filter() {
        Ok(filter) => telemetry::init(config.log_format, filter),
        Err(e) => return usage(&e),
    }
    for o in &config.warnings {
        tracing::warn!("{o}");
    }
    // One escaped line with its priority, as every other error: the default hook wrote a
    // raw block (and a backtrace note) that `journalctl -p err` did not show.
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(at, "the agent panicked: {message}");
        // Out now: an abort, a second panic or a SIGKILL during the panic path's grace
        // would lose it in the queue.
        logwriter::flush(std::time::Duration::from_secs(1));
    }));
    if acts_on_state {
        match c3_runtime::fdlimit::raise() {
            Ok((was, now)) if was != now => {
                tracing::debug!(was, now, "raised the fd limit to its hard limit")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot raise the fd limit; many uploads at once may fail for fds")
            }
        }
    }
    let job_umask = private_umask(config.private_files);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            return failure(
                &format!("cannot start the async runtime: {e}"),
                JobExit::AgentOrDataset.code(),
            )
        }
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(dispatch(cli.command, config.clone(), job_umask))
    }));
    match outcome {
        Ok(code) => {
            // Done: a blocking task still hashing a file the stop deadline gave up on must
            // not keep the process (and the scheduler's SIGKILL timer) waiting.
            runtime.shutdown_background();
            code
        }
        Err(_) => {
            runtime.shutdown_background();
            after_panic(config, job_umask)
        }
    }
}

/// The attempt `run` is working on, for the panic path.
static CURRENT: std::sync::Mutex<Option<(String, u32)>> = std::sync::Mutex::new(None);

/// A bug must not orphan a job or lose its status: stop the job's processes, then finish
/// the attempt exactly as `recover` would (final sync, manifest, status kept or delivered),
/// and exit with one of the contract's codes. A stop ends it by the stop deadline, as it
/// would have ended `run`.
fn after_panic(config: config::Config, job_umask: u32) -> ExitCode {
    let current = CURRENT.lock().ok().and_then(|g| g.clone());
    let agent_error = ExitCode::from(JobExit::AgentOrDataset.code());
    let Some((job_id, attempt)) = current else {
        c3_runtime::jobproc::stop_all_descendants(config.kill_grace);
        return agent_error;
    };
    tracing::error!("stopping the job and finishing it as `recover` would, after the panic");
    c3_runtime::jobproc::stop_all_descendants(config.kill_grace);
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    else {
        return agent_error;
    };
    let env = Env { config, job_umask };
    let recovered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            // The first runtime's handlers stay installed for the process's life, and with it
            // gone nothing read them: a stop now was swallowed. One asked before the panic
            // counts from its own time (`job::stop_asked_at`).
            let stop = cancel_on_signals(&env.config.forward_signals);
            // One that came while the job was stopped above reached no runtime: it counts
            // from when it came.
            if let Some(at) = stop_signaled_at() {
                c3_runtime::job::note_stop_asked_at(at);
            }
            if c3_runtime::job::stop_asked_at().is_some() {
                stop.cancel();
            }
            let ctx = context(&env).ok()?;
            c3_runtime::recover::recover_own(&ctx, &job_id, attempt, &stop).await
        })
    }));
    // As after `dispatch`: dropped, the runtime waits for every blocking task, and one given
    // up on (the result file's read over a hung mount) kept the process from exiting for ever.
    runtime.shutdown_background();
    match recovered {
        Ok(Some(summary)) => ExitCode::from(summary.verdict.exit.code()),
        _ => agent_error,
    }
}

async fn dispatch(command: Command, config: config::Config, job_umask: u32) -> ExitCode {
    let env = Env { config, job_umask };
    match command {
        Command::Run(args) => run(args, &env).await,
        Command::Watch(args) => watch(args, &env).await,
        Command::Pull {
            job_id,
            dest,
            force,
            logs,
        } => {
            // Ctrl-C or a SIGTERM ends it as a failure does: its writers' temp files (named
            // ones where DEST has no O_TMPFILE: NFS) removed, where the default action left
            // them, root's, in DEST.
            let stop = cancel_on_signals(&[]);
            tokio::spawn(exit_on_second_stop(stop.clone()));
            let ctx = match checked(&env, &job_id) {
                Ok(c) => c,
                Err(code) => return code,
            };
            edge(inspect::pull(&ctx, &job_id, &dest, force, logs, &stop).await)
        }
        Command::Ls { job_id, json } => {
            let ctx = match checked(&env, &job_id) {
                Ok(c) => c,
                Err(code) => return code,
            };
            edge(inspect::ls(&ctx, &job_id, json).await)
        }
        Command::Status { job_id, json } => {
            let ctx = match job_id.as_deref().map_or(context_to_read(&env), |id| {
                inspect::checked_job_id(id).and_then(|()| context_to_read(&env))
            }) {
                Ok(c) => c,
                Err(e) => return usage(&e),
            };
            if let Err(e) = ctx.state.check_listable() {
                return usage(&c3_runtime::error_chain(&e));
            }
            inspect::status(&ctx, job_id.as_deref(), json)
        }
        Command::Logs {
            job_id,
            attempt,
            stderr,
            follow,
        } => {
            let ctx = match checked(&env, &job_id) {
                Ok(c) => c,
                Err(code) => return code,
            };
            edge(inspect::logs(&ctx, &job_id, attempt, stderr, follow).await)
        }
        Command::Completions { .. } | Command::Man => {
            unreachable!("handled before the config is read")
        }
        Command::Recover { budget_secs } => recover(&env, budget_secs).await,
        Command::Resync { job_id, attempt } => resync(&env, &job_id, attempt).await,
        Command::Gc {
            older_than,
            dry_run,
        } => {
            let ctx = match context_without_reports(&env) {
                Ok(c) => c,
                Err(e) => return usage(&e),
            };
            let grace = older_than
                .map(|d| Duration::from_secs(d.saturating_mul(86_400)))
                .unwrap_or(env.config.gc_grace);
            ops::gc(&ctx, env.config.retention, grace, dry_run).await
        }
        Command::Publish { .. } | Command::ProbeConnect { .. } => {
            unreachable!("handled before the config is read")
        }
    }
}

/// The resolved config plus what the process itself decided at start.
struct Env {
    config: config::Config,
    /// The umask the agent was started with: the job's, while the agent's own is private.
    job_umask: u32,
}

/// Everything the agent creates (state dir, logs, records, file-store blobs) is private
/// unless `private_files = false`, and never writable by others whatever the umask it was
/// started with: under a scheduler's 000, each directory the agent made was 0777 until its
/// chmod, and a job's user renamed a tree of its own in there (an attempt dir holding
/// `stdout.log -> /etc/ld.so.preload`, which root then appended to). Its group keeps what
/// the umask gives it (agents of one group sharing a file store). Returns the umask the
/// agent started with, for the job.
fn private_umask(private: bool) -> u32 {
    use nix::sys::stat::{umask, Mode};
    let before = umask(Mode::from_bits_truncate(0o077));
    if !private {
        umask(before | Mode::from_bits_truncate(0o002));
    }
    before.bits()
}

/// Part buffers (MiB-sized) are allocated and freed all the time. glibc's dynamic mmap
/// threshold would move them onto per-thread heaps after the first free, where they
/// fragment and keep the RSS far above the upload budget; a fixed threshold keeps every
/// large buffer an mmap that goes back to the kernel when freed.
fn bound_malloc() {
    // SAFETY: mallopt only changes allocator tuning; called once, before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 * 1024);
    }
}

/// `--help` and `--version` as clap prints them; any other error in the arguments as one
/// line (the contract's "one line naming the field, exit 2"; JSON under the JSON log format),
/// not clap's block of error, tip, usage and hint.
fn bad_arguments(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { USAGE } else { 0 });
    }
    let text = e.render().to_string();
    let said: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(|l| l.trim().trim_start_matches("error: "))
        .filter(|l| !l.is_empty())
        .collect();
    usage(&format!("{} (`c3-agent --help`)", said.join("; ")))
}

fn usage(message: &str) -> ExitCode {
    failure(message, USAGE)
}

fn failure(message: &str, code: u8) -> ExitCode {
    out::error(message);
    ExitCode::from(code)
}

/// `pull`/`ls`: 0 on success, 1 on any failure, with the whole error chain.
fn edge(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&error_chain(&*e), 1),
    }
}

/// A command that reads one job (`ls`, `pull`, `logs`): its id checked like `run` checks
/// it, then the context, its store opened only to read.
fn checked(env: &Env, job_id: &str) -> Result<AgentContext, ExitCode> {
    inspect::checked_job_id(job_id)
        .and_then(|()| context_to_read(env))
        .map_err(|e| usage(&e))
}

/// Builds the engine's context; `Err` is a usage/config problem (exit 2).
fn context(env: &Env) -> Result<AgentContext, String> {
    context_with(env, env.config.store.clone(), true)
}

/// [`context`] for a command that only reads the store (`ls`, `pull`, `logs`, `status`).
fn context_to_read(env: &Env) -> Result<AgentContext, String> {
    let mut store = env.config.store.clone();
    store.reads_only = true;
    context_with(env, store, false)
}

/// [`context`] for a command that never talks to the control plane (`gc`).
fn context_without_reports(env: &Env) -> Result<AgentContext, String> {
    context_with(env, env.config.store.clone(), false)
}

/// `reports`: whether the command talks to the control plane, whose token file is read only
/// then: an operator's `status` (or a user's `pull`) refused because the unit's credential
/// (`/run/credentials/c3-agent@JOB.service/c3-token`) is not there outside the unit.
fn context_with(
    env: &Env,
    store: c3_runtime::store::StoreConfig,
    reports: bool,
) -> Result<AgentContext, String> {
    let config = &env.config;
    let store = open_store_bounded(&store).map_err(|e| match e {
        StoreError::BadUrl { .. } | StoreError::BadOption { .. } | StoreError::Build { .. } => {
            format!("config: `store`: {}", error_chain(&e))
        }
        other => error_chain(&other),
    })?;
    let (control_plane, token) = match &config.control_plane {
        None => (None, None),
        Some(_) if !reports => (None, None),
        Some(settings) => {
            let (cp, token) = settings.resolve().map_err(|p| format!("config: {p}"))?;
            (Some(ControlPlane::new(cp)), token)
        }
    };
    // The state dir may not exist yet (a first `ls` on a fresh node): nothing is kept then.
    let known = std::sync::Arc::new(if store.is_local() {
        c3_runtime::known::KnownBlobs::none()
    } else {
        c3_runtime::known::KnownBlobs::open(&config.state_dir, store.url())
    });
    Ok(AgentContext {
        state: StateDir::new(&config.state_dir),
        store,
        control_plane,
        token,
        kill_grace: config.kill_grace,
        upload: config.upload.clone(),
        preflight_timeout: config.preflight_timeout,
        live: config.live.clone(),
        jobs_root: config.jobs_root.clone(),
        job_umask: env.job_umask,
        max_manifest_bytes: config.max_manifest_bytes,
        known,
        forward_signals: config.forward_signals.clone(),
        forward_to: config.forward_to,
        stop_deadline: config.stop_deadline,
        max_log_bytes: config.max_log_bytes,
        dataset_timeout: config.dataset_timeout,
    })
}

/// The node's look deadline, 2 s under the test fault `fault` (which hangs that look).
fn look_deadline(fault: &str) -> Duration {
    match c3_runtime::fault::armed(fault) {
        true => Duration::from_secs(2),
        false => c3_runtime::prepare::NODE_LOOK_DEADLINE,
    }
}

/// Opens the store on a thread of its own, within the node's look deadline: a file store's
/// root on an NFS server that stopped answering held every command before any handler or
/// deadline (`systemctl start` for ever, `recover` and `gc` until their unit's time-out).
/// Past it, the process ends: one line, exit 6 (the node's fault), nothing done.
fn open_store_bounded(config: &c3_runtime::store::StoreConfig) -> Result<BlobStore, StoreError> {
    let limit = look_deadline("store-open-hangs");
    let (tx, rx) = std::sync::mpsc::channel();
    let owned = config.clone();
    std::thread::spawn(move || {
        let _ = tx.send(BlobStore::open(&owned));
    });
    match rx.recv_timeout(limit) {
        Ok(opened) => opened,
        // Its thread left behind, blocked in the kernel: the exit takes it down.
        Err(_) => {
            out::error(&format!(
                "store {}: not opened within {} s (its file system hung?); nothing was done",
                c3_runtime::display::shown_url(&config.url),
                limit.as_secs()
            ));
            logwriter::flush(FLUSH_AT_EXIT);
            std::process::exit(6)
        }
    }
}

/// Closes a root-owned spec (checked by its caller) that others may read, on its fd. The
/// agent makes `<jobs_root>` and the job's dir traversable (0711) for the job's user: a spec
/// a scheduler wrote with umask 022 was then readable, `env` secrets and all, by every other
/// tenant's job that guessed its id (unit names and `/proc/<pid>/cmdline` tell it); so was
/// one that `--job PATH` names there or in any other place open to all.
fn close_spec(path: &Path, file: &std::fs::File, st: &libc::stat) -> Result<(), String> {
    if st.st_mode & 0o077 == 0 || !c3_runtime::confine::is_regular(st) {
        return Ok(());
    }
    let closed = nix::sys::stat::Mode::from_bits_truncate(st.st_mode & 0o7777 & !0o077);
    match nix::sys::stat::fchmod(file, closed) {
        Ok(()) => {
            tracing::warn!(spec = %path.display(), was = format!("{:o}", st.st_mode & 0o7777), now = format!("{:o}", closed.bits()), "the job spec was readable by other users (its env may hold secrets); closed to them: have the scheduler write it 0600");
            Ok(())
        }
        Err(e) => Err(format!(
            "job spec {}: readable by other users (mode {:o}) and cannot be closed: {e}",
            path.display(),
            st.st_mode & 0o7777
        )),
    }
}

/// The largest job spec read: a real one is a few KiB (its `env` included).
const MAX_SPEC_BYTES: u64 = 1 << 20;

/// Reads a job spec: a regular file (a FIFO never blocks the start), at most 1 MiB, root's
/// (or the agent's) and not writable by others. Below `under` (the `--job-id` place,
/// `<jobs_root>/<id>/job.json`) no component is a symlink and its directory is root's too: a
/// workdir is made its job's, and a job owning `<jobs_root>/<id>` before a job of that id is
/// placed could otherwise swap in the spec that job starts with (another command, user root).
/// A `--job PATH` may pass symlinks, but every directory on its way is held to that rule.
fn read_spec(path: &Path, under: Option<&Path>) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    c3_runtime::fault::blocking_pause("spec-read-hangs", Duration::from_secs(600));
    let err = |e: std::io::Error| format!("cannot read job spec {}: {e}", path.display());
    // The file, and (root's, checked) its stat for `close_spec`.
    let (file, root_owned) = match under {
        Some(root) => {
            let rel = path
                .strip_prefix(root)
                .map_err(|_| "spec outside its root".to_string())?;
            // jobs_root is the operator's: a symlink in it (its last component too) is theirs.
            let real = std::fs::canonicalize(root).map_err(err)?;
            let root = c3_runtime::confine::DirFd::open_root(&real).map_err(err)?;
            if let Some(dir) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                let dir = root.open_dir(dir).map_err(err)?;
                let st = c3_runtime::confine::fstat(&dir).map_err(err)?;
                owned_here(path, &dir, &st, "its directory")?;
            }
            let file = root.open_file(rel).map_err(err)?;
            let st = c3_runtime::confine::fstat(&file).map_err(err)?;
            // Anything else is only a handle, whose ACL cannot be read.
            if !c3_runtime::confine::is_regular(&st) {
                return Err(format!("job spec {}: not a regular file", path.display()));
            }
            owned_here(path, &file, &st, "it")?;
            (file, Some(st))
        }
        // A path the scheduler chose: symlinks in it are taken, but nobody but root may be
        // able to change what it leads to. Otherwise a job could write a spec (`workdir` set
        // to where the scheduler's next spec goes, a dir the agent then makes the job's) and
        // have root start its command. An agent that is not root gains a job nothing: its
        // jobs run as itself.
        None if nix::unistd::geteuid().is_root() => {
            let real = specpath::resolve_root_alone(path)
                .map_err(|e| format!("job spec {}: {e}", path.display()))?;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
                .open(&real)
                .map_err(err)?;
            let st = c3_runtime::confine::fstat(&file).map_err(err)?;
            owned_here(path, &file, &st, "it")?;
            (file, Some(st))
        }
        None => (
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(err)?,
            None,
        ),
    };
    let st = c3_runtime::confine::fstat(&file).map_err(err)?;
    if !c3_runtime::confine::is_regular(&st) {
        return Err(format!("job spec {}: not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_SPEC_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(err)?;
    if bytes.len() as u64 > MAX_SPEC_BYTES {
        return Err(format!(
            "job spec {}: over {MAX_SPEC_BYTES} bytes",
            path.display()
        ));
    }
    // Only a spec that runs: `--job` may name any file root alone writes (`/etc/passwd`),
    // which is not the agent's to change, and a bad spec is one line, exit 2.
    let a_spec = || c3_proto::JobSpec::from_json(&bytes).is_ok();
    if let Some(st) = root_owned.filter(|_| a_spec()) {
        close_spec(path, &file, &st)?;
    }
    Ok(bytes)
}

/// A spec (or its directory, `what`) only root may have written, or why not.
fn owned_here(
    path: &Path,
    fd: &impl std::os::fd::AsFd,
    st: &nix::sys::stat::FileStat,
    what: &str,
) -> Result<(), String> {
    match c3_runtime::statedir::root_alone(fd, st) {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "job spec {}: {what} is owned by uid {} gid {} (mode {:o}, or an ACL), not root's alone: a job may have written it",
            path.display(),
            st.st_uid,
            st.st_gid,
            st.st_mode & 0o7777
        )),
        Err(e) => Err(format!("job spec {}: {e}", path.display())),
    }
}

/// Why an agent running as `me` cannot run a job as `user` (`None`: it can, or the node
/// does not know the user, which the launch says).
fn user_needs_root(user: &str, me: nix::unistd::Uid) -> Option<String> {
    // Root asks NSS nothing here: its launch looks the user up within its own deadline.
    if me.is_root() {
        return None;
    }
    let theirs = nix::unistd::User::from_name(user).ok().flatten()?.uid;
    (theirs != me).then(|| format!("`{user}` needs the agent to run as root (it runs as uid {me})"))
}

fn spec_from_args(
    args: RunArgs,
    jobs_root: &Path,
    state: &StateDir,
    under: Option<&Path>,
) -> Result<JobSpec, String> {
    if let Some(path) = &args.job {
        if !args.command.is_empty() {
            return Err("`run --job SPEC.json` takes no command after `--`".into());
        }
        let bytes = read_spec(path, under)?;
        let parsed = JobSpec::from_json(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        // Another user's job needs root to switch to that user: refused as the spec's, at
        // once, not launched and failed as the node's (AGENT_ERROR, retried elsewhere, on
        // every node like this one). The lookup is bounded with the spec's read; a user this
        // node does not know is the node's to say (at launch).
        if let Some(why) = parsed
            .spec
            .user
            .as_deref()
            .and_then(|user| user_needs_root(user, nix::unistd::geteuid()))
        {
            return Err(format!("{}: job spec field `user`: {why}", path.display()));
        }
        // A scheduler's spec may only name a workdir the operator set aside for jobs: an
        // existing tree elsewhere (`/etc`, another tenant's data) is never the job's.
        if let Some(w) = &parsed.spec.workdir {
            let w = Path::new(w);
            if !w.starts_with(jobs_root) || w == jobs_root {
                return Err(format!(
                    "{}: job spec field `workdir`: `{}` must lie under jobs_root `{}`",
                    path.display(),
                    w.display(),
                    jobs_root.display()
                ));
            }
            if let Some(problem) = state.workdir_problem(&parsed.spec.job_id, w) {
                return Err(format!(
                    "{}: job spec field `workdir`: {problem}",
                    path.display()
                ));
            }
        }
        return Ok(parsed.spec);
    }
    if args.command.is_empty() {
        // `run --job-id ID`: the scheduler's spec in its usual place (the systemd unit's way,
        // so that the unit names no path the config can move).
        let spec_flags_only = args.output.is_empty()
            && args.timeout.is_none()
            && args.attempt.is_none()
            && args.workdir.is_none();
        if let (Some(id), true) = (&args.job_id, spec_flags_only) {
            c3_proto::spec::validate_job_id(id).map_err(|e| format!("--job-id {e}"))?;
            let path = jobs_root.join(id).join("job.json");
            let spec = spec_from_args(
                RunArgs {
                    job: Some(path.clone()),
                    job_id: None,
                    attempt: None,
                    workdir: None,
                    output: Vec::new(),
                    timeout: None,
                    command: Vec::new(),
                },
                jobs_root,
                state,
                Some(jobs_root),
            )?;
            if &spec.job_id != id {
                return Err(format!(
                    "{}: job spec field `job_id`: `{}` is not `{id}` (--job-id)",
                    path.display(),
                    spec.job_id
                ));
            }
            return Ok(spec);
        }
        return Err("run needs `--job SPEC.json`, `--job-id ID` or a command after `--` (c3-agent run -- python3 train.py)".into());
    }
    let cwd = std::env::current_dir().map_err(|e| format!("cannot read the current dir: {e}"))?;
    let cwd = match &args.workdir {
        // Named as text in the spec: a path that is not UTF-8 would be another directory.
        Some(dir) if std::path::absolute(dir).is_ok_and(|d| d.to_str().is_none()) => {
            return Err(format!("--workdir {}: not UTF-8", dir.display()));
        }
        // Made only once every flag is known good (a bad --timeout left a root-made dir),
        // and named as the kernel finds it: `../sib` was refused for its `..`, as a spec field.
        Some(dir) => std::path::absolute(dir)
            .map(|d| c3_runtime::mountinfo::real_as_far_as_it_exists(&d))
            .map_err(|e| format!("--workdir {}: {e}", dir.display()))?,
        None => cwd,
    };
    let (slurm_id, slurm_attempt) = slurm_job()?;
    // Ranks of one `srun` in one directory share `./artifacts`: each rank's agent would list
    // (and may read mid-write) the others' files. Said, since each is its own job.
    let ranks = slurm_number("SLURM_STEP_NUM_TASKS")?;
    if args.workdir.is_none() && (ranks > 1 || slurm_number("SLURM_PROCID")? > 0) {
        tracing::warn!(
            tasks = ranks,
            "under srun over several tasks every rank runs in this directory and shares ./artifacts: give each its own --workdir (srun sh -c 'exec c3-agent run --workdir rank$SLURM_PROCID -- ...'), or run one agent around srun"
        );
    }
    let attempt = args.attempt.unwrap_or(slurm_attempt);
    let job_id = args.job_id.or(slurm_id).unwrap_or_else(quick_job_id);
    let mut spec = JobSpec {
        job_id,
        project: None,
        attempt,
        command: args.command,
        workdir: Some(
            cwd.to_str()
                .ok_or_else(|| {
                    format!(
                        "{}: the workdir's path is not UTF-8 (a spec names it as text); run in another directory or pass --workdir",
                        cwd.display()
                    )
                })?
                .to_string(),
        ),
        env: Default::default(),
        output: args.output,
        timeout_secs: args.timeout,
        user: None,
        datasets: Vec::new(),
    };
    // Flag errors name the flag, not the spec field.
    let outputs = spec.output.clone();
    spec.validate().map_err(|e| {
        let text = e.to_string();
        let output = text
            .strip_prefix("job spec field `output[")
            .and_then(|rest| rest.split_once("]`"))
            .and_then(|(i, rest)| Some((outputs.get(i.parse::<usize>().ok()?)?, rest)));
        if let Some((given, rest)) = output {
            return format!("--output {given}{rest}");
        }
        text.replace("job spec field `job_id`", "--job-id")
            .replace("job spec field `workdir`", "--workdir")
            .replace("job spec field `timeout_secs`", "--timeout")
            .replace("job spec field `attempt`", "--attempt")
    })?;
    // Another run's output would be mistaken for this one's (and uploaded again under this
    // job's name), in `./artifacts` or an `--output` dir: start clean, unless this is a later
    // attempt of the job that left it (a requeue resuming from its checkpoint).
    if let Some(refused) = workmark::refusal(&cwd, &spec.output, &spec.job_id, spec.attempt) {
        return Err(refused);
    }
    if let Some(dir) = &spec.workdir {
        std::fs::create_dir_all(dir).map_err(|e| format!("--workdir {dir}: {e}"))?;
    }
    Ok(spec)
}

/// Under Slurm (`SLURM_JOB_ID`): the job id `slurm-<id>` and the attempt
/// `SLURM_RESTART_COUNT + 1` (a requeued job is a new attempt of the same job).
fn slurm_job() -> Result<(Option<String>, u32), String> {
    let Some(id) = std::env::var("SLURM_JOB_ID").ok().filter(|s| !s.is_empty()) else {
        return Ok((None, 1));
    };
    let restarts = slurm_number("SLURM_RESTART_COUNT")?;
    // `srun c3-agent run ...` over several tasks: each is an agent with its own output (and
    // its own state dir on its node), all with one SLURM_JOB_ID: under one job id each rank
    // replaced the others' manifest. Rank 0 (the batch step's one) keeps the plain id.
    let id = match slurm_number("SLURM_PROCID")? {
        0 => format!("slurm-{id}"),
        r => format!("slurm-{id}-rank{r}"),
    };
    Ok((Some(id), restarts.saturating_add(1)))
}

/// A count Slurm gives in `$name` (0 when unset).
fn slurm_number(name: &str) -> Result<u32, String> {
    match std::env::var(name) {
        Ok(n) => n
            .trim()
            .parse()
            .map_err(|_| format!("${name}: `{n}` is not a whole number")),
        Err(_) => Ok(0),
    }
}

/// Whether `signal` was ignored (`SIG_IGN`) when this process started.
fn ignored_at_start(signal: i32) -> bool {
    // SAFETY: sigaction with a null new action only reads the current one.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN
    }
}

/// A second Ctrl-C (or SIGTERM) after `stop` ends the process at once, exit 130: the first
/// one's wait for a pull's writers (30 s at most, on a hung DEST) is the user's to cut.
async fn exit_on_second_stop(stop: CancellationToken) {
    stop.cancelled().await;
    // Counted by the signal handler ([`STOP_SIGNALS`]): a listener made now missed a second
    // signal that came before it.
    while STOP_SIGNALS.load(std::sync::atomic::Ordering::SeqCst) < 2 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    out::note("stopped again: exiting without waiting for the pull's writers");
    logwriter::flush(FLUSH_AT_EXIT);
    std::process::exit(130);
}

/// A quick run's job id: its time, pid and a random part. Random to the end: as a
/// container's entrypoint the agent is pid 1 in every pod, and two started in the same second
/// had one id, one store key, and one manifest replaced by the other's.
fn quick_job_id() -> String {
    format!(
        "local-{}-{}-{}",
        c3_runtime::display::compact_utc_now(),
        std::process::id(),
        &c3_runtime::confine::random_hex()[..8]
    )
}

/// When the first SIGTERM or SIGINT came (CLOCK_MONOTONIC, ns; 0: none), kept by a handler
/// of its own beside tokio's: after a panic, the first runtime that read tokio's is gone, and
/// a stop sent while the panic path stopped the job (its kill grace) was swallowed; the
/// job's finishing then ran to `retry_deadline_secs`, past the scheduler's kill.
static STOP_SIGNALED_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many SIGTERMs and SIGINTs came, counted by the same handler: tokio folds signals that
/// come before a listener reads them into one, and drops those no listener is subscribed
/// for, so a second Ctrl-C soon after the first went unheard.
static STOP_SIGNALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given; it is async-signal-safe.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Installs [`STOP_SIGNALED_NS`]'s handlers, once.
fn mark_stop_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the action only reads the clock and stores into an atomic, both
            // async-signal-safe; signal-hook-registry chains it with tokio's handler.
            let _ = unsafe {
                signal_hook_registry::register(sig, || {
                    STOP_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = STOP_SIGNALED_NS.compare_exchange(
                        0,
                        monotonic_ns().max(1),
                        std::sync::atomic::Ordering::SeqCst,
                        std::sync::atomic::Ordering::SeqCst,
                    );
                })
            };
        }
    });
}

/// When a stop signal came, if one did, as the stop clock's instant.
fn stop_signaled_at() -> Option<tokio::time::Instant> {
    let at = STOP_SIGNALED_NS.load(std::sync::atomic::Ordering::SeqCst);
    (at != 0).then(|| {
        let ago = std::time::Duration::from_nanos(monotonic_ns().saturating_sub(at));
        let now = tokio::time::Instant::now();
        now.checked_sub(ago).unwrap_or(now)
    })
}

/// SIGTERM (`systemctl stop`) and SIGINT cancel the job. The handlers are installed
/// before this returns, so a stop that comes at once is a cancel, not a killed agent.
/// Handlers for the signals passed on to the job are installed too: one that comes before
/// the job runs (or after it ended) must not kill the agent, whose default action it is.
fn cancel_on_signals(forwarded: &[i32]) -> CancellationToken {
    use tokio::signal::unix::{signal, SignalKind};
    for n in forwarded {
        // tokio keeps a handler installed for the process's life once registered.
        if let Err(e) = signal(SignalKind::from_raw(*n)) {
            tracing::warn!(signal = n, error = %e, "cannot catch this signal; it will not be forwarded");
        }
    }
    let token = CancellationToken::new();
    let t = token.clone();
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; cancel will kill the agent outright");
        return token;
    };
    // After tokio's: installed first, a stop in between was counted here and heard by
    // nobody, the default action gone (the agent ran on to systemd's SIGKILL).
    mark_stop_signals();
    // A hangup (the ssh session or terminal of a `run` started by hand went away) and a quit
    // (Ctrl-\) stop the job too: their default action ended the agent at once and left the job
    // running unsupervised, with no final sync and no status. One forwarded to the job is
    // the job's.
    // One ignored when the agent started (`nohup c3-agent run ...`) stays ignored: the
    // caller asked that a hangup not end the run.
    let also = |kind: SignalKind| {
        (!forwarded.contains(&kind.as_raw_value()) && !ignored_at_start(kind.as_raw_value()))
            .then(|| signal(kind).ok())
            .flatten()
    };
    let (mut hup, mut quit) = (also(SignalKind::hangup()), also(SignalKind::quit()));
    async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = next(&mut hup) => "SIGHUP",
            _ = next(&mut quit) => "SIGQUIT",
        };
        // Before the cancel: a stop clock that sees it counts the stop deadline from here.
        c3_runtime::job::note_stop_asked();
        if matches!(name, "SIGHUP" | "SIGQUIT") {
            // Not counted by the stop handler: one more INT or TERM is the second stop.
            STOP_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        tracing::info!(signal = name, "stop requested");
        t.cancel();
    });
    token
}

async fn run(args: RunArgs, env: &Env) -> ExitCode {
    let config = &env.config;
    let state = StateDir::new(&config.state_dir);
    let quick = args.job.is_none() && !args.command.is_empty();
    // Off the reactor and bounded: `jobs_root` (the spec, the workdir's checks) may be on an
    // NFS server that stopped answering, and the unit's start (`TimeoutStartSec=infinity`,
    // READY only once the job is launched) waited on it for ever. The node's fault, not the
    // spec's: exit 6, for the scheduler to place the job elsewhere.
    let reading = {
        let (jobs_root, state) = (config.jobs_root.clone(), state.clone());
        tokio::task::spawn_blocking(move || spec_from_args(args, &jobs_root, &state, None))
    };
    let limit = look_deadline("spec-read-hangs");
    let spec = match tokio::time::timeout(limit, reading).await {
        Ok(Ok(Ok(s))) => s,
        Ok(Ok(Err(e))) => return usage(&e),
        Ok(Err(e)) => return failure(&format!("reading the job spec failed: {e}"), 6),
        Err(_) => {
            return failure(
                &format!(
                    "the job spec was not read within {} s ({} on a hung file system?); nothing launched",
                    limit.as_secs(),
                    match quick {
                        true => "the workdir".to_string(),
                        false => format!("jobs_root `{}`", config.jobs_root.display()),
                    }
                ),
                6,
            )
        }
    };
    let ctx = match context(env) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    // First: a stop (or a forwarded signal) from now on is handled, never the default action.
    // Before the look at the store (up to `preflight_timeout_secs`): a stop then ended the
    // agent outright, and the attempt was never reported canceled.
    let cancel = cancel_on_signals(&config.forward_signals);
    // A stop during the look ends it: the attempt is then canceled before its launch, and
    // nothing of it is stored (an attempt that never launched seals no manifest), so a run of
    // it the look would have found keeps its manifest.
    let ran = tokio::select! {
        ran = c3_runtime::job::already_ran(&ctx, &spec.job_id, spec.attempt) => ran,
        () = cancel.cancelled() => {
            tracing::warn!(job_id = %spec.job_id, attempt = spec.attempt,
                "stopped before the store said whether this attempt already ran: nothing is launched or stored");
            None
        }
    };
    if let Some((problem, code)) = ran {
        return failure(&problem, code.code());
    }
    // Only now, once the store said this attempt is a new one: one refused above leaves the
    // marker naming the run whose files ./artifacts holds.
    if let (true, Some(workdir)) = (quick, &spec.workdir) {
        // Off the reactor and bounded: the submit dir may be on an NFS server that stopped
        // answering, and a stop there (its handler installed, the default action gone) was
        // heard by nobody. A stop goes on to the run, which reports the attempt canceled.
        let (dir, id, n) = (
            std::path::PathBuf::from(workdir),
            spec.job_id.clone(),
            spec.attempt,
        );
        let marking = tokio::task::spawn_blocking(move || workmark::record(&dir, &id, n));
        let limit = c3_runtime::prepare::NODE_LOOK_DEADLINE;
        let marked = tokio::select! {
            marked = tokio::time::timeout(limit, marking) => Some(marked),
            () = cancel.cancelled() => None,
        };
        let failed = match marked {
            Some(Ok(Ok(Ok(())))) | None => None,
            Some(Ok(Ok(Err(e)))) => Some(e),
            Some(Ok(Err(e))) => Some(format!("recording which job ./artifacts belongs to failed: {e}")),
            Some(Err(_)) => Some(format!(
                "{workdir}: recording which job ./artifacts belongs to did not finish within {} s (a hung file system?)",
                limit.as_secs()
            )),
        };
        if let Some(e) = failed {
            // The workdir's disk (full, failing, hung), not the run's arguments: a scheduler
            // may try it again, elsewhere.
            return failure(&e, JobExit::AgentOrDataset.code());
        }
    }
    starting(env, &ctx);
    // Up to 6 s, which a stop does not wait out: its deadline runs.
    let metadata = match (ctx.store.instance_metadata_endpoint(), &spec.user) {
        (Some(endpoint), Some(user)) => tokio::select! {
            reach = exposure::metadata_reach(endpoint, user) => Some(reach),
            () = cancel.cancelled() => None,
        },
        _ => None,
    };
    for exposed in exposure::warnings(config, metadata.as_ref(), &cancel).await {
        tracing::warn!("{exposed}");
    }
    tokio::spawn(unitcheck::warn_if_stop_timeout_too_short(
        config.stop_deadline,
        config.kill_grace,
        config.control_plane.as_ref().map(|c| c.give_up),
    ));
    if let Ok(mut current) = CURRENT.lock() {
        *current = Some((spec.job_id.clone(), spec.attempt));
    }
    // Whatever the job forks and orphans is re-parented to the agent, never lost to init.
    c3_runtime::jobproc::become_subreaper();
    let summary = match c3_runtime::run_job(&ctx, spec, cancel).await {
        Ok(s) => s,
        Err(e) => return failure(&error_chain(&e), e.exit_code().code()),
    };
    finished(&ctx, &summary)
}

/// The agent's first log line; the systemd watchdog, if the unit has one.
fn starting(env: &Env, ctx: &AgentContext) {
    let config = &env.config;
    c3_runtime::sdnotify::keep_watchdog_fed();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config.source.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "defaults".into()),
        store = %ctx.store.shown_url(),
        control_plane = %config.control_plane.as_ref().map(|c| c3_runtime::display::shown_url(c.url.as_str())).unwrap_or_else(|| "none".into()),
        state_dir = %config.state_dir.display(),
        "c3-agent starting"
    );
}

/// `c3-agent watch`: sidecar mode, finished like `run`.
async fn watch(args: WatchArgs, env: &Env) -> ExitCode {
    let ctx = match context(env) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    // No CURRENT: a panicking sidecar must not finish a job that still runs elsewhere; its
    // restart takes the attempt over.
    let cancel = cancel_on_signals(&[]);
    starting(env, &ctx);
    for exposed in exposure::warnings(&env.config, None, &cancel).await {
        tracing::warn!("{exposed}");
    }
    let plan = c3_runtime::sidecar::WatchPlan {
        job_id: args.job_id,
        attempt: args.attempt,
        pid: args.pid,
        done_file: match args.done_file.map(std::path::absolute).transpose() {
            Ok(d) => d,
            Err(e) => return usage(&format!("watch: --done-file: {e}")),
        },
        dirs: args.dirs,
        stay: args.stay,
    };
    match c3_runtime::sidecar::watch_job(&ctx, plan, cancel).await {
        Ok(c3_runtime::sidecar::Watched::Finished(summary)) => finished(&ctx, &summary),
        Ok(c3_runtime::sidecar::Watched::AlreadyFinished(code)) => ExitCode::from(code),
        Err(e) => failure(&format!("watch: {}", error_chain(&e)), e.exit_code().code()),
    }
}

/// The summary on stdout and the job's exit code (contract §1).
fn finished(ctx: &AgentContext, summary: &c3_runtime::job::JobSummary) -> ExitCode {
    let v = summary.verdict;
    let manifest = summary
        .manifest
        .as_ref()
        .map(|key| format!("{}/{key}", ctx.store.shown_url().trim_end_matches('/')));
    let json = serde_json::json!({
        "job_id": summary.job_id,
        "state": v.state.as_str(),
        "reason": v.reason.map(|r| r.as_str()),
        "agent_exit_code": v.exit.code(),
        "script_exit_code": summary.script_exit_code,
        "files": summary.files,
        "bytes": summary.bytes,
        "new_bytes": summary.new_bytes,
        "upload_errors": summary.upload_errors,
        "manifest": manifest,
        "finished": !summary.unfinished,
    });
    if summary.unfinished {
        out::result(
            &format!(
                "job {} {}: stopped before the final sync was done; `c3-agent recover` finishes it",
                summary.job_id,
                v.state.as_str()
            ),
            json,
        );
        return ExitCode::from(v.exit.code());
    }
    let reason = v
        .reason
        .map(|r| format!("/{}", r.as_str()))
        .unwrap_or_default();
    let where_ = match &manifest {
        Some(url) => format!("manifest {url}"),
        None => "no manifest written".to_string(),
    };
    out::result(
        &format!(
            "job {} {}{reason}: {} files, {} bytes ({} new); {where_}\n  list:  c3-agent ls {}\n  fetch: c3-agent pull {} DEST",
            summary.job_id, v.state.as_str(), summary.files, summary.bytes, summary.new_bytes, summary.job_id, summary.job_id
        ),
        json,
    );
    ExitCode::from(v.exit.code())
}

async fn recover(env: &Env, budget_secs: Option<u64>) -> ExitCode {
    // First: a SIGTERM (the housekeeping unit's timeout, `systemctl stop`) that came at once
    // ended the process mid-write; now it stops at the next safe point.
    let halt = cancel_on_signals(&[]);
    let ctx = match context(env) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    if let Err(e) = ctx.state.check_listable() {
        return usage(&c3_runtime::error_chain(&e));
    }
    let spent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(secs) = budget_secs {
        let (halt, spent) = (halt.clone(), spent.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            spent.store(true, std::sync::atomic::Ordering::Relaxed);
            tracing::info!(budget_secs = secs, "recover's time budget is spent");
            halt.cancel();
        });
    }
    let finished = c3_runtime::recover::recover_all(&ctx, &halt).await;
    let code = ExitCode::from(finished.last().map(|s| s.verdict.exit.code()).unwrap_or(0));
    if halt.is_cancelled() {
        // Retention is left to `gc`, which the housekeeping unit runs next (and to the next
        // pass): who stopped `recover` is waiting for it to end.
        let why = if spent.load(std::sync::atomic::Ordering::Relaxed) {
            format!("its --budget-secs {} were spent", budget_secs.unwrap_or(0))
        } else {
            "it was asked to stop (a signal)".to_string()
        };
        let cut: Vec<String> = finished
            .iter()
            .filter(|s| s.unfinished)
            .map(|s| s.job_id.clone())
            .collect();
        let left = if cut.is_empty() {
            String::new()
        } else {
            format!("; left in phase finishing: {}", cut.join(", "))
        };
        out::summary(format!(
            "recover stopped before it was done: {why}{left}; what it stored is kept and the next `c3-agent recover` goes on from there"
        ));
        return code;
    }
    if finished.is_empty() {
        tracing::info!("nothing to recover");
    }
    // `recover` runs at boot and from timers: the natural moment to let old jobs go.
    ops::sweep_retention(&ctx, env.config.retention, &halt).await;
    code
}

async fn resync(env: &Env, job_id: &str, attempt: Option<u32>) -> ExitCode {
    if let Err(e) = c3_proto::spec::validate_job_id(job_id) {
        return usage(&format!("job id {e}"));
    }
    let halt = cancel_on_signals(&[]);
    let ctx = match context(env) {
        Ok(c) => c,
        Err(e) => return usage(&e),
    };
    match c3_runtime::recover::resync(&ctx, job_id, attempt, &halt).await {
        Ok(Some(summary)) if summary.unfinished => {
            out::summary(format!(
                "job {}: resync stopped (a signal) before it was done; what it stored is kept and `c3-agent resync {}` goes on from there",
                summary.job_id, summary.job_id
            ));
            ExitCode::from(summary.verdict.exit.code())
        }
        Ok(Some(summary)) => {
            let v = summary.verdict;
            out::summary(format!(
                "job {} {}{}: {} files, {} bytes ({} new)",
                summary.job_id,
                v.state.as_str(),
                v.reason
                    .map(|r| format!("/{}", r.as_str()))
                    .unwrap_or_default(),
                summary.files,
                summary.bytes,
                summary.new_bytes
            ));
            ExitCode::from(v.exit.code())
        }
        // Stopped before it started storing (while the job's processes were being stopped).
        Ok(None) if halt.is_cancelled() => {
            out::summary(format!(
                "job {job_id}: resync stopped (a signal) before it was done; `c3-agent resync {job_id}` goes on from there"
            ));
            ExitCode::from(JobExit::Canceled.code())
        }
        // The attempt's own outcome, as `run` would exit: an operator's `resync JOB && ...`
        // took 0 for "stored and succeeded" of a SCRIPT_ERROR job, or of one another agent
        // is still at work on.
        Ok(None) => {
            let latest = c3_runtime::recover::resync_attempt(&ctx, job_id, attempt);
            let record = latest.and_then(|a| {
                ctx.state
                    .read_record(&ctx.state.run_record_path(job_id, a))
                    .ok()
            });
            match record.filter(|r| r.phase == c3_proto::Phase::Done) {
                // Files are still left: another agent holds the attempt (an hourly `recover`
                // at work on it), or its manifest could not be taken in (the log says which).
                Some(r) if !r.unstored.is_empty() || r.unstored_more > 0 => failure(
                    &format!("job {job_id} attempt {}: left alone, nothing was stored: another agent is at work on it, or its manifest in the store could not be taken in (the log above says which)", r.spec.attempt),
                    2,
                ),
                Some(r) => {
                    out::summary(format!(
                        "job {job_id} attempt {}: nothing left to store; it ended {}{}",
                        r.spec.attempt,
                        r.state.map_or("?", |s| s.as_str()),
                        r.reason.map(|r| format!("/{}", r.as_str())).unwrap_or_default()
                    ));
                    ExitCode::from(c3_runtime::outcome::recorded_exit(&r).code())
                }
                None => failure(
                    &format!("job {job_id}: nothing was done: it has not finished (its agent or `recover` is at work on it, or it still runs), or its run record cannot be read (`c3-agent status {job_id}`)"),
                    2,
                ),
            }
        }
        Err(e) => failure(&error_chain(&e), 1),
    }
}

#[cfg(test)]
mod tests {
    /// A spec naming another user, given to an agent that is not root, is the spec's
    /// error (exit 2), not the node's; its own user, or any under root, is fine.
    #[test]
    fn another_users_job_needs_a_root_agent() {
        let nobody = nix::unistd::Uid::from_raw(65534);
        let why = super::user_needs_root("root", nobody).unwrap();
        assert!(why.contains("needs the agent to run as root"), "{why}");
        assert!(super::user_needs_root("root", nix::unistd::Uid::from_raw(0)).is_none());
        assert!(super::user_needs_root("no-such-user-here", nobody).is_none());
    }

    /// Two quick runs of one pid in one second (two pods, the agent pid 1 in each) get two
    /// ids: with one, each replaced the other's manifest in a shared store.
    #[test]
    fn quick_runs_of_one_pid_in_one_second_get_two_ids() {
        let (a, b) = (super::quick_job_id(), super::quick_job_id());
        assert_ne!(a, b);
        assert!(a.starts_with("local-"), "{a}");
        c3_proto::spec::validate_job_id(&a).unwrap();
    }
}
