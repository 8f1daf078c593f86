//! The agent's fd limit, raised at start to its hard limit; the job gets the one it had.
//!
//! A final sync of small files on a big node keeps hundreds of uploads in flight
//! (`files_in_flight` grows to 256 and more), each holding a few fds, and the soft limit a
//! shell, Slurm or the housekeeping unit leaves the agent (1024) failed them with EMFILE:
//! each such file unstored, an exit-0 job's UPLOAD_ERROR. Only `c3-agent@.service` raised it.

use std::sync::OnceLock;

/// The limit the agent was started with, once [`raise`] raised it.
static STARTED_WITH: OnceLock<libc::rlimit> = OnceLock::new();

/// Raises the soft fd limit to the hard one; returns the soft limit before and after.
pub fn raise() -> std::io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read the struct given, nothing else.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur >= limit.rlim_max {
            return Ok((limit.rlim_cur, limit.rlim_cur));
        }
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let _ = STARTED_WITH.set(limit);
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// The fd limit a job starts with: the one the agent was started with, where it raised its
/// own. A job's tools (an old `select`, a loop closing every fd up to the limit) are used to
/// what the node gives, not to a million.
pub fn for_jobs() -> Option<libc::rlimit> {
    STARTED_WITH.get().copied()
}
