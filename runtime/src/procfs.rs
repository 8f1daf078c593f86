//! The one reader of `/proc`: process identity (pid + start time + boot), parentage,
//! and which files a set of processes holds open for writing.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use c3_proto::ProcIdentity;

/// The fields of `/proc/<pid>/stat` the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Its threads (field 20): a zombie main thread counts, until the process is reaped.
    pub threads: u64,
    /// Clock ticks after boot (field 22).
    pub start_ticks: u64,
}

impl Stat {
    /// Whether the process is over: its main thread dead, and no other thread left. The
    /// state is the main thread's alone: a job whose main thread ended (`SYS_exit`) while
    /// its workers run on (CUDA streams, a data loader) reads `Z`, and taken for a zombie
    /// it was never signalled, and the job taken for gone.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X') && self.threads <= 1
    }
}

/// Parses `/proc/<pid>/stat`; the command name may hold spaces and parentheses.
/// This process as a name it leaves behind says it: `pid.start.boot`, start in clock ticks
/// after boot and the first 8 hex digits of the boot id (a pid alone is soon another
/// process's after a crash, and after a reboot even the pid and start may come again).
pub fn self_tag() -> String {
    let pid = std::process::id();
    let start = stat(pid as i32).map_or(0, |s| s.start_ticks);
    format!("{pid}.{start}.{}", boot_tag())
}

/// The first 8 hex digits of this boot's id ("" when it cannot be read).
fn boot_tag() -> String {
    boot_id()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(8)
        .collect()
}

/// Whether a [`self_tag`] was made on this boot of this node (one that holds no boot counts
/// as this one's, as [`tag_alive`] judges it by pid and start).
pub fn tag_of_this_boot(tag: &str) -> bool {
    tag.splitn(3, '.')
        .nth(2)
        .is_none_or(|boot| boot == boot_tag())
}

/// Whether the process a [`self_tag`] names still runs (a tag of an earlier boot never does;
/// one written before tags held the boot is judged by pid and start).
pub fn tag_alive(tag: &str) -> bool {
    let mut parts = tag.splitn(3, '.');
    let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
        return false;
    };
    if parts.next().is_some_and(|boot| boot != boot_tag()) {
        return false;
    }
    let (Ok(pid), Ok(start)) = (pid.parse::<i32>(), start.parse::<u64>()) else {
        return false;
    };
    stat(pid).is_some_and(|s| s.start_ticks == start && !s.is_zombie())
}

/// Read as bytes: the command name is the process's to set (`prctl(PR_SET_NAME)`, a write to
/// `/proc/self/comm`, a non-ASCII name cut at 15 bytes), and one that is not UTF-8 made the
/// whole line unreadable, the process (and, without a cgroup, everything below it) unseen
/// and never signalled.
pub fn stat(pid: i32) -> Option<Stat> {
    let bytes = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    let after = bytes.iter().rposition(|b| *b == b')')? + 1;
    let text = std::str::from_utf8(&bytes[after..]).ok()?;
    let mut f = text.split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    // Fields 7..19 lie between session (6) and num_threads (20), 21 before starttime (22).
    let threads = f.nth(13)?.parse().ok()?;
    let start_ticks = f.nth(1)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        session,
        threads,
        start_ticks,
    })
}

pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// How long the node has been up (the boot clock, suspends included).
pub fn uptime() -> std::time::Duration {
    std::time::Duration::from_micros(clock_micros(libc::CLOCK_BOOTTIME))
}

/// Clock ticks after boot (a process's start) as microseconds on the kernel log's clock,
/// less a second for the two clocks' drift. A start is counted on the boot clock, which runs
/// through a suspend and is slewed by NTP; the log's (`local_clock`) does neither, and runs
/// as `CLOCK_MONOTONIC_RAW` does: after a suspend of S seconds every start read plainly was
/// S late, and an OOM kill within S of the job's start was taken for an earlier process's.
/// The difference of the two clocks so far is taken off (all of it: a process started before
/// a suspend gets an earlier start, never a later one).
pub fn start_micros(ticks: u64) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let apart = clock_micros(libc::CLOCK_BOOTTIME).saturating_sub(now_micros());
    (ticks.saturating_mul(1_000_000) / hz)
        .saturating_sub(apart)
        .saturating_sub(1_000_000)
}

/// Now, in microseconds on (about) the kernel log's clock: it stops while the node is
/// suspended and NTP does not slew it (`CLOCK_MONOTONIC` is slewed: over days of uptime it
/// drifted seconds from the log's, and an OOM kill a second after a process was seen gone
/// fell outside its life).
pub fn now_micros() -> u64 {
    clock_micros(libc::CLOCK_MONOTONIC_RAW)
}

fn clock_micros(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(clock, &mut t) } != 0 {
        return 0;
    }
    (t.tv_sec.max(0) as u64)
        .saturating_mul(1_000_000)
        .saturating_add(t.tv_nsec.max(0) as u64 / 1_000)
}

/// Who `pid` is right now.
pub fn identity(pid: i32) -> Option<ProcIdentity> {
    Some(ProcIdentity {
        pid,
        start_ticks: stat(pid)?.start_ticks,
        boot_id: boot_id()?,
    })
}

/// Whether the process recorded as `id` still exists (same boot, same pid, same start).
pub fn is_alive(id: &ProcIdentity) -> bool {
    is_alive_in(id, None)
}

/// [`is_alive`] of a process recorded in the pid namespace `ns` ([`alive_in`]).
pub fn is_alive_in(id: &ProcIdentity, ns: Option<u64>) -> bool {
    boot_id().is_some_and(|b| b == id.boot_id) && alive_in(ns, id.pid, id.start_ticks)
}

/// This process's pid namespace: the inode `/proc/self/ns/pid` leads to.
pub fn pid_ns() -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/pid").ok().map(|m| m.ino())
}

/// Whether a process numbered `pid` in the pid namespace `ns` (this one's: `None`, or this
/// process's own), started at `start_ticks` (a time after boot, the same in every namespace),
/// still runs. Seen from another namespace (a host looking at a pod's), it is the one whose
/// start is that time and whose pid in its own namespace (the last of `NSpid`) is `pid`.
pub fn alive_in(ns: Option<u64>, pid: i32, start_ticks: u64) -> bool {
    if ns.is_none() || ns == pid_ns() {
        return stat(pid).is_some_and(|s| s.start_ticks == start_ticks && !s.is_zombie());
    }
    all().into_iter().any(|(host_pid, s)| {
        s.start_ticks == start_ticks && !s.is_zombie() && innermost_pid(host_pid) == Some(pid)
    })
}

/// The process's pid in its own (innermost) pid namespace: the last of `NSpid` in its status.
fn innermost_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// This process, as recorded in run records: pid and start time.
pub fn this_agent() -> Option<(i32, u64)> {
    let pid = std::process::id() as i32;
    stat(pid).map(|s| (pid, s.start_ticks))
}

/// Every process's stat, by pid.
pub fn all() -> HashMap<i32, Stat> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            if let Some(s) = stat(pid) {
                out.insert(pid, s);
            }
        }
    }
    out
}

/// Every descendant of `root` (children, their children, ...), zombies included.
pub fn descendants(root: i32, procs: &HashMap<i32, Stat>) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (&pid, s) in procs {
        children.entry(s.ppid).or_default().push(pid);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if c != root && seen.insert(c) {
                out.push(c);
                stack.push(c);
            }
        }
    }
    out
}

/// `(dev, ino)` of every regular file open with O_WRONLY or O_RDWR by one of `pids`, or
/// mapped shared and writable.
pub fn written_by(pids: &[i32]) -> HashSet<(u64, u64)> {
    written(pids, None)
}

/// [`written_by`] for live sync's look every second: each process's mappings as read within
/// the last [`MAPS_TTL`] and not before `not_before`. A PyTorch process has thousands of them
/// (megabytes of text with its DataLoader workers, each read under the process's mmap lock),
/// and they change far less often than files are opened. `not_before` is when the files in
/// question last changed: a mapping made since an older read (`mmap`, `close`, stores) moved
/// the file's mtime at its first store, and only a read after that surely shows it; a read
/// from before was trusted for 3 s, longer than the settle, and a file still being stored to
/// through the mapping was listed.
pub fn written_by_lately(pids: &[i32], not_before: std::time::Instant) -> HashSet<(u64, u64)> {
    written(pids, Some(not_before))
}

const MAPS_TTL: std::time::Duration = std::time::Duration::from_secs(3);

type MapsCache = std::collections::HashMap<(i32, u64), (std::time::Instant, Vec<(u64, u64)>)>;
static MAPS: std::sync::Mutex<Option<MapsCache>> = std::sync::Mutex::new(None);

/// `cached`: mappings may come from [`MAPS`], read at that instant or later.
fn written(pids: &[i32], cached: Option<std::time::Instant>) -> HashSet<(u64, u64)> {
    let mut open = HashSet::new();
    for pid in pids {
        open.extend(write_fds(*pid).into_iter().map(|(_, id)| id));
        match cached {
            None => shared_writable_maps(*pid, &mut open),
            Some(not_before) => open.extend(lately_mapped(*pid, not_before)),
        }
    }
    open
}

/// A process's shared writable mappings, from the cache while younger than [`MAPS_TTL`]
/// and read at `not_before` or later.
fn lately_mapped(pid: i32, not_before: std::time::Instant) -> Vec<(u64, u64)> {
    let ttl = MAPS_TTL;
    let Some(start) = stat(pid).map(|s| s.start_ticks) else {
        return Vec::new();
    };
    let now = std::time::Instant::now();
    {
        let cache = MAPS.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, found)) = cache.as_ref().and_then(|c| c.get(&(pid, start))) {
            if now.duration_since(*at) < ttl && *at >= not_before {
                return found.clone();
            }
        }
    }
    // Read without the lock: another look may read the same process meanwhile, no harm.
    let mut found = HashSet::new();
    shared_writable_maps(pid, &mut found);
    let found: Vec<(u64, u64)> = found.into_iter().collect();
    let mut cache = MAPS.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    if cache.len() >= 4096 {
        cache.retain(|_, (at, _)| now.duration_since(*at) < ttl);
        // All fresh (thousands of processes in sight): start over rather than scan each time.
        if cache.len() >= 4096 {
            cache.clear();
        }
    }
    cache.insert((pid, start), (now, found.clone()));
    found
}

/// How many regular files `pids` hold open for write, and the paths (as the kernel names
/// them now; ` (deleted)` for one removed) of the first `named` of them, sorted. Counted by
/// file, named in bounded memory: the job's processes may hold a million files open below
/// 4 KB paths, and every path was gathered only to show five (gigabytes in the root agent,
/// growing on after the look was given up).
pub fn written_paths(pids: &[i32], named: usize) -> (usize, Vec<std::path::PathBuf>) {
    crate::fault::blocking_pause("written-paths", std::time::Duration::from_secs(3600));
    let mut files = HashSet::new();
    let mut paths = std::collections::BTreeSet::new();
    for (fd, id) in pids.iter().flat_map(|pid| write_fds(*pid)) {
        if files.insert(id) && paths.len() < named {
            if let Ok(path) = std::fs::read_link(fd) {
                paths.insert(path);
            }
        }
    }
    (files.len(), paths.into_iter().collect())
}

/// The `/proc/<pid>/fd/N` links of the regular files `pid` holds open with O_WRONLY or
/// O_RDWR, each with the file's `(dev, ino)` (the magic link leads to the open file itself,
/// even if renamed or deleted).
fn write_fds(pid: i32) -> Vec<(std::path::PathBuf, (u64, u64))> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    // Regular files first, their fdinfo after: the fdinfo of an epoll fd takes the epoll's
    // lock, which a job's thread stuck in `epoll_ctl` on a file of its own silent FUSE mount
    // holds for ever, and the look with it.
    fds.flatten()
        .filter_map(|fd| {
            let (is_file, id) = cached_stat(&fd.path())?;
            is_file.then_some((fd, id))
        })
        .filter(|(fd, _)| {
            fd.file_name()
                .to_str()
                .is_some_and(|n| opened_for_write(pid, n))
        })
        .map(|(fd, id)| (fd.path(), id))
        .collect()
}

/// Files a process has mapped shared and writable (`np.memmap(mode="r+")`, `mmap` then
/// `close`): still being written with no fd open, and a store to a page already dirty changes
/// neither mtime nor ctime, so a copy taken now could be listed with bytes the file no longer
/// has. `(dev, ino)` from the mapping's `map_files` link (the maps line's device number is
/// not `st_dev` on btrfs), else from the line itself.
///
/// Read a line at a time, each kept only up to [`MAPS_LINE_HEAD`] bytes: a mapped file's path
/// is the job's to make (a chain of directories has no length limit), and 65,530 mappings
/// under a 1 MB path made the whole text 64 GB, read into one string by the root agent.
/// Lossy: one path that is not UTF-8 made the whole text unreadable, and every mapping with it.
fn shared_writable_maps(pid: i32, open: &mut HashSet<(u64, u64)>) {
    let Ok(maps) = std::fs::File::open(format!("/proc/{pid}/maps")) else {
        return;
    };
    let mut maps = std::io::BufReader::with_capacity(64 * 1024, maps);
    let mut head = Vec::with_capacity(MAPS_LINE_HEAD);
    while line_head(&mut maps, &mut head, MAPS_LINE_HEAD).unwrap_or(false) {
        let line = String::from_utf8_lossy(&head);
        let mut fields = line.split_ascii_whitespace();
        let (Some(range), Some(perms), Some(_), Some(dev), Some(ino), Some(path)) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            continue;
        };
        let perms = perms.as_bytes();
        let shared_writable = perms.get(1) == Some(&b'w') && perms.get(3) == Some(&b's');
        // Device memory (a GPU's /dev/nvidia* is mapped rw-s many times over) is no file.
        if !shared_writable || !path.starts_with('/') || path.starts_with("/dev/") || ino == "0" {
            continue;
        }
        match cached_stat(Path::new(&format!("/proc/{pid}/map_files/{range}"))) {
            Some((true, id)) => {
                open.insert(id);
            }
            Some(_) => {}
            None => {
                let dev = dev.split_once(':').and_then(|(major, minor)| {
                    Some(libc::makedev(
                        u32::from_str_radix(major, 16).ok()?,
                        u32::from_str_radix(minor, 16).ok()?,
                    ))
                });
                if let (Some(dev), Ok(ino)) = (dev, ino.parse()) {
                    open.insert((dev, ino));
                }
            }
        }
    }
}

/// What is kept of a maps line: its fields and the start of its path, enough to tell a file
/// (`/`) from device memory (`/dev/`).
const MAPS_LINE_HEAD: usize = 512;

/// Reads the next line of `r` into `head`, at most `max` bytes of it (the rest passed over);
/// false at the end.
fn line_head(
    r: &mut impl std::io::BufRead,
    head: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    head.clear();
    let mut read_any = false;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(read_any);
        }
        read_any = true;
        let end = buf.iter().position(|b| *b == b'\n');
        let line = &buf[..end.unwrap_or(buf.len())];
        let room = max.saturating_sub(head.len());
        head.extend_from_slice(&line[..line.len().min(room)]);
        let used = end.map_or(buf.len(), |e| e + 1);
        r.consume(used);
        if end.is_some() {
            return Ok(true);
        }
    }
}

/// Whether a `/proc` magic link names a regular file, and its `(dev, ino)`, from the
/// attributes the kernel holds ([`crate::confine::cached_stat`]): a plain stat asks the file's
/// own file system, and a job's FUSE server may never answer, which held the agent before it
/// stopped the job.
fn cached_stat(link: &Path) -> Option<(bool, (u64, u64))> {
    let st = crate::confine::cached_stat(link, true)?;
    Some((st.is_regular(), (st.dev, st.ino)))
}

fn opened_for_write(pid: i32, fd: &str) -> bool {
    let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
        return false;
    };
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .is_some_and(|flags| flags & 0o3 != 0)
}

#[cfg(test)]
mod tests {

    /// A process whose main thread ended while another thread runs on reads `Z` (the main
    /// thread's state): it is alive, to be signalled. A process reaped by no one yet is not.
    #[test]
    fn a_process_whose_main_thread_ended_is_alive_while_a_thread_runs() {
        let code = "import threading,ctypes,time\n\
                    t=threading.Thread(target=lambda: time.sleep(30)); t.start()\n\
                    ctypes.CDLL(None).syscall(60, 0)\n";
        let mut leaderless = std::process::Command::new("python3")
            .args(["-c", code])
            .spawn()
            .unwrap();
        let mut zombie = std::process::Command::new("true").spawn().unwrap();
        let settled = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let state = |pid: u32| super::stat(pid as i32).map(|s| s.state);
        while (state(leaderless.id()) != Some('Z') || state(zombie.id()) != Some('Z'))
            && std::time::Instant::now() < settled
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let (l, z) = (
            super::stat(leaderless.id() as i32).unwrap(),
            super::stat(zombie.id() as i32).unwrap(),
        );
        let _ = leaderless.kill();
        let _ = leaderless.wait();
        let _ = zombie.wait();
        assert_eq!((l.state, z.state), ('Z', 'Z'));
        assert!(!l.is_zombie(), "{l:?}");
        assert!(z.is_zombie(), "{z:?}");
    }

    /// A process a sidecar recorded in its pod's pid namespace (pid 1 there) is found alive
    /// from the host's, where its pid is another: looked up as the host's pid 1, it was
    /// taken for gone (or for init).
    #[test]
    fn a_process_of_another_pid_namespace_is_judged_there() {
        use std::os::unix::fs::MetadataExt;
        let Ok(mut child) = std::process::Command::new("unshare")
            .args(["--pid", "--fork", "sleep", "30"])
            .spawn()
        else {
            crate::testskip::skip("no unshare");
            return;
        };
        // The forked `sleep`, pid 1 in the new namespace: the child of `unshare`.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let inner = loop {
            let found = all()
                .into_iter()
                .find(|(pid, s)| s.ppid == child.id() as i32 && innermost_pid(*pid) == Some(1));
            if let Some(found) = found {
                break Some(found);
            }
            if std::time::Instant::now() > deadline || child.try_wait().ok().flatten().is_some() {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let Some((host_pid, st)) = inner else {
            let _ = child.kill();
            crate::testskip::skip("unshare --pid made no process (no privilege?)");
            return;
        };
        let ns = std::fs::metadata(format!("/proc/{host_pid}/ns/pid"))
            .unwrap()
            .ino();
        assert!(alive_in(Some(ns), 1, st.start_ticks));
        assert!(!alive_in(Some(ns), 1, st.start_ticks + 1));
        assert!(
            !alive_in(None, 1, st.start_ticks),
            "taken for this namespace's pid 1"
        );
        let _ = child.kill();
        let _ = child.wait();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(host_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }

    use super::*;

    /// Files open for writing are found, and nothing else: an epoll fd (whose fdinfo would
    /// take its lock) or a pipe is passed over by its type before its fdinfo is read.
    #[test]
    fn write_fds_are_regular_files_open_for_writing() {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::fs::MetadataExt;
        let t = tempfile::tempdir().unwrap();
        let written = std::fs::File::create(t.path().join("w")).unwrap();
        std::fs::write(t.path().join("r"), "x").unwrap();
        let _read = std::fs::File::open(t.path().join("r")).unwrap();
        // SAFETY: epoll_create1 returns a new fd we own, or -1.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        // SAFETY: `ep` is a fresh fd owned by nothing else.
        let _ep = unsafe { OwnedFd::from_raw_fd(ep) };
        let (_rx, _tx) = nix::unistd::pipe().unwrap();
        let found = write_fds(std::process::id() as i32);
        let meta = written.metadata().unwrap();
        assert!(found.iter().any(|(_, id)| *id == (meta.dev(), meta.ino())));
        let r = std::fs::metadata(t.path().join("r")).unwrap();
        assert!(!found.iter().any(|(_, id)| *id == (r.dev(), r.ino())));
        let named =
            |fd: i32| std::path::PathBuf::from(format!("/proc/{}/fd/{fd}", std::process::id()));
        assert!(!found.iter().any(|(p, _)| *p == named(ep)));
        assert!(!found.iter().any(|(p, _)| *p == named(_tx.as_raw_fd())));
    }

    /// Maps the 4 KiB file at `path` shared and writable, then closes its fd (the caller
    /// unmaps the address it gets).
    fn map_shared_then_close(path: &std::path::Path) -> *mut libc::c_void {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // SAFETY: a fresh 4 KiB shared mapping of a file we own; the caller unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr
    }

    /// Files held open for write are all counted and only the first few named.
    #[test]
    fn written_paths_counts_every_file_and_names_a_few() {
        let dir = tempfile::tempdir().unwrap();
        let open: Vec<std::fs::File> = (0..20)
            .map(|i| std::fs::File::create(dir.path().join(format!("f{i:02}"))).unwrap())
            .collect();
        let (count, named) = written_paths(&[std::process::id() as i32], 5);
        assert!(count >= 20, "{count}");
        assert_eq!(named.len(), 5);
        drop(open);
    }

    /// A shared writable mapping made after the cache's last read of this process, its fd
    /// closed: a look asked for mappings read after the file's change sees it (the cached
    /// read, 3 s fresh, did not).
    #[test]
    fn a_mapping_made_after_the_cached_read_is_seen() {
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        let id = (md.dev(), md.ino());
        let primed = written_by_lately(&[me], std::time::Instant::now());
        assert!(!primed.contains(&id));
        let addr = map_shared_then_close(&path);
        let changed = std::time::Instant::now();
        let seen = written_by_lately(&[me], changed);
        // SAFETY: the mapping made above, of that length.
        unsafe { libc::munmap(addr, 4096) };
        assert!(seen.contains(&id), "the mapping was missed");
    }

    /// A tag names this process in this boot only: the same pid and start under another
    /// boot id are another process (the gc's set-aside blobs were kept for it for good).
    #[test]
    fn a_tag_of_another_boot_is_not_alive() {
        let tag = self_tag();
        assert!(tag_alive(&tag), "{tag}");
        let (pid_start, _) = tag.rsplit_once('.').unwrap();
        assert!(tag_alive(pid_start), "a tag without its boot: {pid_start}");
        assert!(!tag_alive(&format!("{pid_start}.00000000")));
    }
    use std::os::unix::fs::MetadataExt;

    /// The cached look names the open file itself, as a stat through the link would.
    #[test]
    fn a_cached_stat_of_an_fd_link_is_the_open_file() {
        use std::os::fd::AsRawFd;
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let meta = file.metadata().unwrap();
        let link = format!("/proc/self/fd/{}", file.as_raw_fd());
        assert_eq!(
            cached_stat(Path::new(&link)),
            Some((true, (meta.dev(), meta.ino())))
        );
        let (read, _write) = nix::unistd::pipe().unwrap();
        let pipe = format!("/proc/self/fd/{}", read.as_raw_fd());
        assert!(matches!(cached_stat(Path::new(&pipe)), Some((false, _))));
        assert_eq!(cached_stat(Path::new("/proc/self/fd/999999")), None);
    }

    #[test]
    fn sees_own_writable_file_but_not_readonly() {
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path().join("w");
        let r = dir.path().join("r");
        std::fs::write(&r, "x").unwrap();
        let _writer = std::fs::File::create(&w).unwrap();
        let _reader = std::fs::File::open(&r).unwrap();
        let open = written_by(&[std::process::id() as i32]);
        let id = |p: &std::path::Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        assert!(open.contains(&id(&w)));
        assert!(!open.contains(&id(&r)));
    }

    /// A mapping whose path is not UTF-8 (or is longer than a line's kept head) is read like
    /// any other, and hides none of the others: one such name made the whole maps text
    /// unreadable, and every file the process stored to through a mapping was missed.
    #[test]
    fn mappings_of_odd_and_long_paths_are_all_seen() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"\xff.bin"));
        let mut deep = dir.path().to_path_buf();
        for _ in 0..12 {
            deep.push("d".repeat(250));
        }
        std::fs::create_dir_all(&deep).unwrap();
        let long = deep.join("long.bin");
        let plain = dir.path().join("plain.bin");
        let paths = [odd, long, plain];
        let mut addrs = Vec::new();
        for path in &paths {
            std::fs::write(path, [0u8; 4096]).unwrap();
            addrs.push(map_shared_then_close(path));
        }
        let open = written_by(&[std::process::id() as i32]);
        for addr in addrs {
            // SAFETY: the mappings made above, 4096 bytes each.
            unsafe { libc::munmap(addr, 4096) };
        }
        for path in &paths {
            let m = std::fs::metadata(path).unwrap();
            assert!(open.contains(&(m.dev(), m.ino())), "{path:?} was missed");
        }
    }

    /// A line longer than the head kept is cut there, and the next line read whole.
    #[test]
    fn a_line_head_keeps_its_start_and_passes_the_rest() {
        let text = format!("{}\nshort\n", "x".repeat(100_000));
        let mut r = std::io::BufReader::with_capacity(16, std::io::Cursor::new(text));
        let mut head = Vec::new();
        assert!(line_head(&mut r, &mut head, 10).unwrap());
        assert_eq!(head, b"xxxxxxxxxx");
        assert!(line_head(&mut r, &mut head, 10).unwrap());
        assert_eq!(head, b"short");
        assert!(!line_head(&mut r, &mut head, 10).unwrap());
    }

    /// A process whose name is not UTF-8 (`prctl(PR_SET_NAME)`, a non-ASCII name cut at 15
    /// bytes) is still seen: its stat line was unreadable, and the process (without a cgroup,
    /// with everything below it) never found nor signalled.
    #[test]
    fn a_process_named_in_any_bytes_is_seen() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "printf '\\377x' > /proc/$$/comm; sleep 30; :"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let renamed = (0..500).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            std::fs::read(format!("/proc/{pid}/comm")).is_ok_and(|c| c.starts_with(b"\xff"))
        });
        let seen = stat(pid);
        // SAFETY: the group made above; its sleep goes with it.
        unsafe { libc::killpg(pid, libc::SIGKILL) };
        let _ = child.wait();
        assert!(renamed);
        assert!(seen.is_some_and(|s| s.ppid == std::process::id() as i32));
    }

    #[test]
    fn sees_a_file_mapped_shared_and_writable_with_its_fd_closed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapped");
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let addr = map_shared_then_close(&path);
        let m = std::fs::metadata(&path).unwrap();
        let open = written_by(&[std::process::id() as i32]);
        // SAFETY: the mapping made above, 4096 bytes.
        unsafe { libc::munmap(addr, 4096) };
        assert!(
            open.contains(&(m.dev(), m.ino())),
            "a writable shared mapping was missed"
        );
    }

    #[test]
    fn identity_tells_a_reused_pid_apart() {
        let me = identity(std::process::id() as i32).unwrap();
        assert!(is_alive(&me));
        let other = ProcIdentity {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert!(!is_alive(&other));
        let other_boot = ProcIdentity {
            boot_id: "not-this-boot".into(),
            ..me
        };
        assert!(!is_alive(&other_boot));
    }

    #[test]
    fn descendants_follow_parentage() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let found = descendants(me, &all());
        assert!(found.contains(&(child.id() as i32)));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
