//! The c3-agent engine: everything that happens to a job between its spec and its
//! terminal status. No CLI, no config files; the `agent` crate wires it up.
//!
//! Data flows one way (ARCHITECTURE.md has the module graph): [`job`] runs an attempt as a
//! pipeline of [`prepare`], [`supervise`] (with the [`collector`] syncing alongside) and
//! the collector's final sync and seal, which write blobs through [`upload`] into the
//! [`store`] and the manifest last ([`manifest`]); [`jobreport`] tells the control plane.
//! [`recover`] finishes what a crashed agent left; [`pull`] reads back.

pub mod acl;
pub mod agentsock;
pub mod asuser;
pub mod awsprofile;
pub mod budget;
pub mod candidates;
pub mod collect;
pub mod collector;
pub mod confine;
pub mod context;
pub mod digest;
pub mod display;
pub mod extents;
pub mod fault;
pub mod fdlimit;
pub mod filestore;
pub mod fusectl;
pub mod gc;
pub mod helper;
pub mod httpcap;
pub mod inflight;
pub mod job;
pub mod jobproc;
pub mod jobreport;
pub mod kernlog;
pub mod known;
pub mod launch;
pub mod live;
pub mod loglimit;
pub mod manifest;
pub mod mountinfo;
pub mod outcome;
pub mod output;
pub mod pace;
pub mod prepare;
pub mod procfs;
pub mod progress;
pub mod publish;
pub mod pull;
pub mod quota;
pub mod ratelimit;
pub mod recover;
pub mod report;
pub mod result;
pub mod retention;
pub mod rmtree;
pub mod sdnotify;
pub mod sidecar;
pub mod slurm;
pub mod statedir;
pub mod store;
pub mod storehttp;
pub mod supervise;
pub mod sync;
#[cfg(test)]
#[path = "../../tests/skip.rs"]
mod testskip;
pub mod treewalk;
pub mod upload;
pub mod watch;

pub use display::error_chain;
pub use job::{run_job, AgentContext, JobSummary, RunError};
pub use outcome::{ExitCode, JobEnd, Verdict};

/// Fires when `halt` is cancelled; never without one.
pub(crate) async fn halted(halt: Option<&tokio_util::sync::CancellationToken>) {
    match halt {
        Some(halt) => halt.cancelled().await,
        None => std::future::pending().await,
    }
}
