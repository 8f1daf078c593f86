//! The kernel's log (`/dev/kmsg`), read for one fact: did the OOM killer kill this process?
//! Used only where the job has no cgroup whose `memory.events` would say so.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

/// Records read at most: the ring buffer holds a few thousand; a flood must not stall us.
const MAX_RECORDS: usize = 100_000;

/// When a process of the job lived, in microseconds on the kernel log's clock
/// ([`crate::procfs::start_micros`], [`crate::procfs::now_micros`]): a record of its pid
/// counts only between the two, so neither an earlier process with that pid nor a later one
/// (another tenant's, cycling pids until it holds one the job's process left) is taken for
/// the job's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub from_us: u64,
    /// When it was found gone (or, still there, when the log is read).
    pub until_us: u64,
}

/// The initial pid namespace's inode (the kernel's `PROC_PID_INIT_INO`).
const INIT_PID_NS: u64 = 0xEFFF_FFFC;

/// Whether the kernel log's pids are those of the pid namespace `ns` (this process's).
fn names_our_pids(ns: Option<u64>) -> bool {
    ns == Some(INIT_PID_NS)
}

/// Whether the kernel log says the OOM killer killed one of `processes` while it lived.
/// False when the log cannot be read (no privilege, `ProtectKernelLogs=`), and in a pid
/// namespace of its own (a pod's, `shareProcessNamespace`): the log names the host's pids,
/// so the job's OOM kill went unseen, and a host process with the job's pod pid, killed
/// meanwhile, was taken for the job's.
pub fn oom_killed(processes: &BTreeMap<i32, Lifetime>) -> bool {
    if processes.is_empty() || !names_our_pids(crate::procfs::pid_ns()) {
        return false;
    }
    let Ok(mut kmsg) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return false;
    };
    let mut buf = vec![0u8; 8192];
    for _ in 0..MAX_RECORDS {
        // One read is one record; the end of the buffer is EAGAIN.
        let n = match kmsg.read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => n,
            // EPIPE: the record was overwritten while we read; the next one follows.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => return false,
        };
        if record_says_oom(&buf[..n], processes) {
            return true;
        }
    }
    false
}

/// `prio,seq,usec,flags;message`: "Out of memory: Killed process 123 (python3) ..." and
/// "Memory cgroup out of memory: Killed process 123 (python3) ...".
///
/// Only the kernel's own records (facility 0: userspace writes to /dev/kmsg carry another) and
/// only a message that starts with one of the OOM killer's sentences: the `oom-kill:` record
/// carries cgroup paths, which an unprivileged user names freely in its delegated subtree
/// (a cgroup called `Killed process 4242 (x` would otherwise turn another job's SIGKILL into
/// OUT_OF_MEMORY).
fn record_says_oom(record: &[u8], processes: &BTreeMap<i32, Lifetime>) -> bool {
    const SENTENCES: &[&str] = &[
        "Out of memory: Killed process ",
        "Memory cgroup out of memory: Killed process ",
        "Out of memory (oom_kill_allocating_task): Killed process ",
        // Kernels before 5.1: its own record after "Out of memory: Kill process ...".
        "Killed process ",
    ];
    let text = String::from_utf8_lossy(record);
    let Some((head, message)) = text.split_once(';') else {
        return false;
    };
    let mut fields = head.split(',');
    let kernel = fields
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|prio| prio >> 3 == 0);
    let usec: u64 = fields.nth(1).and_then(|t| t.parse().ok()).unwrap_or(0);
    if !kernel {
        return false;
    }
    let killed = SENTENCES
        .iter()
        .find_map(|s| message.strip_prefix(s))
        .and_then(|rest| rest.split_once(" ("))
        .and_then(|(pid, _)| pid.parse::<i32>().ok());
    killed
        .and_then(|pid| processes.get(&pid))
        .is_some_and(|life| (life.from_us..=life.until_us).contains(&usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn life(from_us: u64, until_us: u64) -> Lifetime {
        Lifetime { from_us, until_us }
    }

    /// In a pod's pid namespace the log's pids are the host's, not the job's.
    #[test]
    fn only_the_hosts_pid_namespace_reads_the_log_by_pid() {
        assert!(names_our_pids(Some(INIT_PID_NS)));
        assert!(!names_our_pids(Some(4_026_532_999)));
        assert!(!names_our_pids(None));
    }

    #[test]
    fn finds_the_oom_record_of_a_process_of_the_job_only_while_it_lived() {
        let rec = b"3,1234,5000000,-;Memory cgroup out of memory: Killed process 4242 (python3) total-vm:1kB\n";
        let job =
            |pid, from, until| BTreeMap::from([(1, life(0, u64::MAX)), (pid, life(from, until))]);
        assert!(record_says_oom(rec, &job(4242, 4_000_000, u64::MAX)));
        assert!(
            !record_says_oom(rec, &job(4242, 6_000_000, u64::MAX)),
            "an earlier process with that pid"
        );
        assert!(
            !record_says_oom(rec, &job(4242, 1_000_000, 4_000_000)),
            "a later process with that pid: the job's had gone by then"
        );
        assert!(record_says_oom(rec, &job(4242, 1_000_000, 5_000_000)));
        assert!(
            !record_says_oom(rec, &job(424, 0, u64::MAX)),
            "pid 424 is not 4242"
        );
        assert!(!record_says_oom(
            b"6,1,5,-;eth0: link up",
            &job(1, 0, u64::MAX)
        ));
        // A cgroup a user named after the sentence, and a userspace write to /dev/kmsg.
        let forged = b"6,1,5000000,-;oom-kill:constraint=CONSTRAINT_MEMCG,oom_memcg=/user.slice/Killed process 4242 (x,task_memcg=/a\n";
        assert!(!record_says_oom(forged, &job(4242, 0, u64::MAX)));
        let user = b"14,1,5000000,-;Out of memory: Killed process 4242 (x) total-vm:1kB\n";
        assert!(!record_says_oom(user, &job(4242, 0, u64::MAX)));
        let plain = b"3,1,5000000,-;Out of memory: Killed process 4242 (x) total-vm:1kB\n";
        assert!(record_says_oom(plain, &job(4242, 0, u64::MAX)));
    }

    #[test]
    fn a_start_is_on_the_logs_clock() {
        // This process's start, read from /proc, is before now on the log's clock.
        let ticks = crate::procfs::stat(std::process::id() as i32)
            .unwrap()
            .start_ticks;
        assert!(crate::procfs::start_micros(ticks) <= crate::procfs::now_micros());
    }
}
