//! While a job runs it owns the host: the agent's background work (reading and hashing
//! files, scanning the output dirs, reading `/proc` for open files and orphans) runs at the
//! lowest CPU priority then, and at the normal one for the final sync.

use std::sync::atomic::{AtomicBool, Ordering};

static GENTLE: AtomicBool = AtomicBool::new(false);

/// Live sync (true) or the final sync (false).
pub fn set_gentle(gentle: bool) {
    GENTLE.store(gentle, Ordering::Relaxed);
}

/// Runs `f` on this (blocking-pool) thread gently while the job runs: as root under
/// SCHED_IDLE, so it takes only CPU time the job leaves, and back to the normal policy right
/// after (the pool's threads serve other work too: a job's output must never wait on an
/// idle-class thread). Without the privilege to come back, nice 10 instead (which an
/// unprivileged thread cannot undo either, but which never starves).
pub fn gently<T>(f: impl FnOnce() -> T) -> T {
    if !GENTLE.load(Ordering::Relaxed) {
        return f();
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: scheduling calls on this thread (0 / its tid) with a valid param; no memory effects.
    unsafe {
        if libc::geteuid() == 0 && libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 {
            let out = f();
            libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
            return out;
        }
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 10);
    }
    f()
}

/// `spawn_blocking`, [`gently`].
pub async fn spawn_gently<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    tokio::task::spawn_blocking(move || gently(f)).await
}
