//! What the engine needs from the agent's configuration, shared by every phase of a job.

use std::path::PathBuf;
use std::time::Duration;

use crate::live::LiveOptions;
use crate::report::ControlPlane;
use crate::statedir::StateDir;
use crate::store::BlobStore;
use crate::upload::UploadOptions;

/// Who gets a forwarded signal (`[job] forward_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardTo {
    /// The process the agent launched, as a shell's `kill -USR1 $!` would: a trainer's
    /// data-loader workers (no handler: USR1 would kill them) are left alone.
    Leader,
    /// Every process of the job, as Slurm itself signals a job step.
    All,
}

/// Everything the engine needs from the agent's configuration.
#[derive(Debug, Clone)]
pub struct AgentContext {
    pub state: StateDir,
    pub store: BlobStore,
    pub control_plane: Option<ControlPlane>,
    /// The bearer token, so that it can be kept out of the job's environment.
    pub token: Option<crate::display::Secret>,
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
    /// Signals the agent passes on to the job (`[job] forward_signals`), and to whom.
    pub forward_signals: Vec<i32>,
    pub forward_to: ForwardTo,
    /// After a stop request (SIGTERM), everything (grace, final sync, reports) ends within
    /// this; what is left is `recover`'s (`[job] stop_deadline_secs`: Slurm's KillWait,
    /// systemd's TimeoutStopSec, Kubernetes' terminationGracePeriodSeconds).
    pub stop_deadline: Duration,
    /// What is kept of each of the job's streams (`[job] max_log_bytes`): past it the
    /// output is still drained, counted and dropped.
    pub max_log_bytes: u64,
    /// How long a job's input datasets may take to arrive (`[job] dataset_timeout_secs`).
    pub dataset_timeout: std::time::Duration,
    /// Blobs this node knows to be in the store (uploads skip sending them again).
    pub known: std::sync::Arc<crate::known::KnownBlobs>,
}

impl AgentContext {
    /// Where live sync's work runs (`sync.live_cpus`; empty: wherever the kernel puts it).
    pub fn live_cpus(&self) -> &[usize] {
        self.live.as_ref().map_or(&[], |l| &l.cpus)
    }

    /// `give_up_secs` from now (now, when there is no control plane): the one deadline for
    /// what the control plane still gets.
    pub fn report_deadline(&self) -> tokio::time::Instant {
        self.control_plane
            .as_ref()
            .map(ControlPlane::deadline)
            .unwrap_or_else(tokio::time::Instant::now)
    }

    /// Where this agent sends output and reports (see [`c3_proto::RunRecord::destination`]).
    pub fn destination(&self) -> c3_proto::Destination {
        c3_proto::Destination {
            store: self.store.identity(),
            control_plane: self.control_plane.as_ref().map(ControlPlane::shown_url),
        }
    }
}
