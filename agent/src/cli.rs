//! The command line (contract §1).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "c3-agent",
    version,
    propagate_version = true,
    about = "Runs one GPU job, syncs its artifacts to a content-addressed store, reports to the control plane"
)]
pub struct Cli {
    /// Configuration file (else $C3_AGENT_CONFIG, else /etc/c3-agent/config.toml if present)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one job: from a job spec (`--job SPEC.json`, or `--job-id ID` for <jobs_root>/ID/job.json), or quickly from a command line (`-- CMD ARGS`)
    Run(RunArgs),
    /// Sidecar mode: sync directories of a job this agent did not launch (Kubernetes native sidecar, Slurm prolog); finishes on SIGTERM, when --pid exits or when --done-file appears
    Watch(WatchArgs),
    /// Download a job's files per its manifest, verifying each sha256
    Pull {
        job_id: String,
        dest: PathBuf,
        /// Overwrite files in DEST that differ from the job's
        #[arg(long)]
        force: bool,
        /// Also fetch the job's stdout and stderr (into DEST/.c3/)
        #[arg(long)]
        logs: bool,
    },
    /// List a job's manifest (size, sha256, path)
    Ls {
        job_id: String,
        /// Print the manifest document itself
        #[arg(long)]
        json: bool,
    },
    /// Finish jobs a crashed agent left unfinished and deliver kept reports
    Recover {
        /// Stop after this many seconds, as on SIGTERM: the attempt under way keeps what it
        /// stored and the next `recover` goes on with it (the housekeeping unit's, so that
        /// `gc` still runs within its timeout)
        #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
        budget_secs: Option<u64>,
    },
    /// (internal) Exit 0 if a TCP connection to ENDPOINT's host and port opens within a
    /// second, 1 if not: the agent runs it as a job's user to learn whether jobs reach the
    /// instance-metadata endpoint its store credentials come from
    #[command(hide = true, name = "probe-connect")]
    ProbeConnect { endpoint: String },
    /// Inside a job: store these files now; exits 0 only once every blob is stored and listed
    /// in the in-progress manifest (talks to $C3_AGENT_SOCKET)
    Publish {
        /// Then wait until everything pending so far is stored (a barrier before deleting
        /// old checkpoints); alone, only the barrier
        #[arg(long)]
        wait_all: bool,
        /// Files below the job's output dirs (relative to the current dir, or absolute)
        paths: Vec<PathBuf>,
    },
    /// Store what an UPLOAD_ERROR job left on the node, write its manifest, amend its status
    Resync {
        job_id: String,
        /// The attempt (default: the latest one this node ran)
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: Option<u32>,
    },
    /// This node's jobs (or one): phase, state, attempts, bytes synced and pending, unstored output, undelivered reports
    Status {
        job_id: Option<String>,
        /// One JSON object per job
        #[arg(long)]
        json: bool,
    },
    /// A job's output: from this node's state dir, else from the store's log blobs
    Logs {
        job_id: String,
        /// The attempt (default: the latest one)
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        attempt: Option<u32>,
        /// stderr instead of stdout
        #[arg(long)]
        stderr: bool,
        /// Keep printing what the job writes until its attempt is done
        #[arg(long, short)]
        follow: bool,
    },
    /// Shell completions on stdout (e.g. `c3-agent completions bash > /etc/bash_completion.d/c3-agent`)
    Completions { shell: clap_complete::Shell },
    /// The man page (roff) on stdout (e.g. `c3-agent man > /usr/local/share/man/man1/c3-agent.1`)
    Man,
    /// Housekeeping: delete finished jobs' local data past their retention, and file-store blobs no manifest references
    Gc {
        /// Spare unreferenced blobs younger than this (default: `[gc] grace_hours`, 24 h)
        #[arg(long, value_name = "DAYS")]
        older_than: Option<u64>,
        /// Say what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The job spec (JSON) written by the scheduler
    #[arg(long, value_name = "SPEC.json", conflicts_with_all = ["job_id", "output", "timeout", "attempt", "workdir"])]
    pub job: Option<PathBuf>,
    /// Quick run: the job id (default: slurm-$SLURM_JOB_ID under Slurm, else local-<time>-<pid>-<random>).
    /// Without a command: run the spec <jobs_root>/ID/job.json
    #[arg(long, value_name = "ID")]
    pub job_id: Option<String>,
    /// Quick run: an extra output dir, relative to the current dir (repeatable)
    #[arg(long, value_name = "DIR")]
    pub output: Vec<String>,
    /// Quick run: the attempt (default: $SLURM_RESTART_COUNT + 1 under Slurm, else 1)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: Option<u32>,
    /// Quick run: the workdir (created if missing; default: the current dir)
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Quick run: stop the job after this many seconds
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Quick run: the command and its arguments, after `--`
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The job's id
    #[arg(long, value_name = "ID")]
    pub job_id: String,
    /// The job's attempt
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,
    /// Finish when this process (the job's main process) exits (at once if it already has when a restarted watch of the attempt starts; a first watch refuses a pid not found); its descendants count as the job
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
    /// Finish when this file appears: an integer in it is the job's exit code, `canceled` a cancel;
    /// stopped (SIGTERM) without it, the job is taken as killed
    #[arg(long, value_name = "FILE")]
    pub done_file: Option<PathBuf>,
    /// Once finished, stay until SIGTERM (a Kubernetes native sidecar that exits is restarted)
    #[arg(long)]
    pub stay: bool,
    /// Directories to sync (one parent directory; each appears in the manifest under its own name)
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
}
