//! While a job runs it owns the host: the agent's background work (reading and hashing
//! files, scanning the output dirs, reading `/proc` for open files and orphans) runs at the
//! lowest CPU priority then, on the operator's housekeeping CPUs if `sync.live_cpus` names
//! some, and at the normal priority on every CPU for the final sync.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static GENTLE: AtomicBool = AtomicBool::new(false);
/// `sync.live_cpus`: where gentle work runs (None: wherever the kernel puts it).
static LIVE_CPUS: Mutex<Option<libc::cpu_set_t>> = Mutex::new(None);

/// CPU numbers from a Linux CPU list (`0-3,8,10-11`, as in `/sys/devices/system/cpu/online`
/// and `taskset -c`). The error says what is wrong, for a config line.
pub fn parse_cpu_list(list: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for item in list.split(',').map(str::trim) {
        let (lo, hi) = item.split_once('-').unwrap_or((item, item));
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n < libc::CPU_SETSIZE as usize)
                .ok_or_else(|| format!("`{item}` is not a CPU number or range (as in `0-3,8`)"))
        };
        let (lo, hi) = (num(lo)?, num(hi)?);
        if lo > hi {
            return Err(format!("`{item}` is an empty range"));
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// `[0, 1, 2, 5]` -> `0-2,5`.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &c in cpus {
        match runs.last_mut() {
            Some((_, hi)) if *hi + 1 == c => *hi = c,
            _ => runs.push((c, c)),
        }
    }
    let items: Vec<String> = runs
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    items.join(",")
}

/// The CPUs this process may run on now (its affinity, the cgroup's cpuset included).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the size passed is its own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Gentle work runs on `cpus` (empty: wherever the kernel puts it). The job and the final
/// sync are not affected: a thread is pinned only for the length of one [`gently`] call.
pub fn set_live_cpus(cpus: &[usize]) {
    let set = (!cpus.is_empty()).then(|| {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET bounds were checked at parse.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            set
        }
    });
    *LIVE_CPUS.lock().unwrap_or_else(|p| p.into_inner()) = set;
}

/// `cpus` as the logs name them: None for none named (wherever the kernel puts the work).
pub fn cpus_shown(cpus: &[usize]) -> Option<String> {
    (!cpus.is_empty()).then(|| cpu_list(cpus))
}

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
    let pinned = *LIVE_CPUS.lock().unwrap_or_else(|p| p.into_inner());
    match pinned {
        Some(cpus) => on_cpus(&cpus, || idle_class(f)),
        None => idle_class(f),
    }
}

/// Runs `f` with this thread's affinity set to `cpus`, and puts the thread's own back after.
fn on_cpus<T>(cpus: &libc::cpu_set_t, f: impl FnOnce() -> T) -> T {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: affinity calls on this thread (0) with valid sets of their own size.
    unsafe {
        let mut own: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size, &mut own) != 0
            || libc::sched_setaffinity(0, size, cpus) != 0
        {
            // None of them is ours any more (a cpuset changed): run where we are.
            return f();
        }
        // Restored however `f` ends: a panic in gentle work left this pool thread pinned to
        // the CPUs the job does not use, for whatever the pool ran on it next.
        struct Restore(libc::cpu_set_t);
        impl Drop for Restore {
            fn drop(&mut self) {
                // SAFETY: as above.
                unsafe {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
                }
            }
        }
        let _restore = Restore(own);
        f()
    }
}

fn idle_class<T>(f: impl FnOnce() -> T) -> T {
    static REVERSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    idle_class_if(*REVERSIBLE.get_or_init(idle_is_reversible), f)
}

/// Whether a thread may leave SCHED_IDLE again: root without CAP_SYS_NICE (a container's
/// default capabilities, the shipped Kubernetes job's) may enter it and never come back,
/// and each blocking-pool thread that once did gentle work stayed idle-class for good,
/// the job's log drain among the work it serves (a job busy on its CPUs then blocked on its
/// own `print`). Tried on a thread of its own, thrown away after, which takes this one's
/// capabilities.
fn idle_is_reversible() -> bool {
    // No thread to be had (a job that filled the pids cgroup it shares with the agent):
    // not reversible, said so; `thread::spawn` panicked there, in every gentle task.
    let tried = std::thread::Builder::new().spawn(|| {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: scheduling calls on this (throwaway) thread with a valid param.
        unsafe {
            libc::geteuid() == 0
                && libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0
                && libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) == 0
        }
    });
    tried.is_ok_and(|t| t.join().unwrap_or(false))
}

/// [`idle_class`]; `reversible`: [`idle_is_reversible`].
fn idle_class_if<T>(reversible: bool, f: impl FnOnce() -> T) -> T {
    /// Back to the normal policy however `f` ends (a panic included).
    struct Normal;
    impl Drop for Normal {
        fn drop(&mut self) {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: a scheduling call on this thread with a valid param.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
        }
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: scheduling calls on this thread (0 / its tid) with a valid param; no memory effects.
    unsafe {
        if reversible
            && libc::geteuid() == 0
            && libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0
        {
            let _normal = Normal;
            return f();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_linux_writes_them() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11"),
            Ok(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list(" 5 , 2-3,3"), Ok(vec![2, 3, 5]));
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        for bad in ["", "a", "3-1", "1-", "0,,1", "99999"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// Root without CAP_SYS_NICE (a container's default capabilities) may enter SCHED_IDLE
    /// but not leave it: gentle work there runs at nice 10 instead, and the thread is never
    /// left idle-class (it serves the job's log drain too).
    #[test]
    fn without_the_right_to_come_back_no_thread_is_left_idle_class() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        std::thread::spawn(|| {
            drop_sys_nice();
            assert!(
                !idle_is_reversible(),
                "left SCHED_IDLE without CAP_SYS_NICE"
            );
            idle_class_if(idle_is_reversible(), || ());
            // SAFETY: a query of this thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_OTHER, "the thread was left idle-class");
        })
        .join()
        .unwrap();
        // With it, a panic in the work does not leave the thread idle-class either.
        std::thread::spawn(|| {
            let _ = std::panic::catch_unwind(|| idle_class_if(true, || panic!("in gentle work")));
            // SAFETY: a query of this thread's policy.
            assert_eq!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_OTHER);
        })
        .join()
        .unwrap();
    }

    /// Drops CAP_SYS_NICE from this thread's effective set (capabilities are per thread).
    fn drop_sys_nice() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        const VERSION_3: u32 = 0x2008_0522;
        const CAP_SYS_NICE: u32 = 23;
        let mut header = Header {
            version: VERSION_3,
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a v3 header and the two data words it takes.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !(1 << CAP_SYS_NICE);
            assert_eq!(libc::syscall(libc::SYS_capset, &header, data.as_ptr()), 0);
        }
    }

    #[test]
    fn gentle_work_runs_on_the_live_cpus_and_the_thread_gets_its_own_back() {
        let allowed = allowed_cpus();
        let last = *allowed.last().unwrap();
        // On a thread of its own: the statics are process-wide, so nothing else may run gently
        // in this test binary (no other test sets GENTLE).
        std::thread::spawn(move || {
            set_live_cpus(&[last]);
            set_gentle(true);
            let inside = gently(allowed_cpus);
            set_gentle(false);
            let outside = gently(allowed_cpus);
            set_live_cpus(&[]);
            assert_eq!(inside, vec![last]);
            assert_eq!(outside, allowed);
            assert_eq!(allowed_cpus(), allowed);
        })
        .join()
        .unwrap();
    }

    /// Gentle work that panics (a blocking-pool task) leaves its thread with its own CPUs:
    /// restored only on a normal return, the pool thread stayed pinned to the live CPUs.
    #[test]
    fn a_panic_in_work_on_other_cpus_gives_the_thread_its_own_back() {
        let allowed = allowed_cpus();
        let last = *allowed.last().unwrap();
        std::thread::spawn(move || {
            // SAFETY: a zeroed set is a valid empty one; CPU_SET on it with an index below
            // CPU_SETSIZE.
            let cpus = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(last, &mut set);
                set
            };
            let panicked = std::panic::catch_unwind(|| on_cpus(&cpus, || panic!("gentle work")));
            assert!(panicked.is_err());
            assert_eq!(allowed_cpus(), allowed);
        })
        .join()
        .unwrap();
    }
}
