//! Every process of a job, wherever it went: a process that calls `setsid()` leaves the
//! job's process group, so the group alone cannot stop or watch the job.
//!
//! * Where the agent can create one (cgroup v2, writable: systemd `Delegate=yes`, or root on
//!   a host without systemd), the job gets its own cgroup: membership is the kernel's, and
//!   `cgroup.kill` ends every member at once.
//! * Always, the agent is a child subreaper: whatever the job forks and orphans is re-parented
//!   to the agent, so "descendants of the agent" is the job even without a cgroup (the agent
//!   starts no other processes).
//!
//! Which of the two is in force is said in the log when the job starts.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use tokio::process::Child;

use crate::procfs;

/// The job's own cgroup (v2), a child of the agent's.
#[derive(Debug)]
pub struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Creates `<agent's cgroup>/<name>`; `Err` says why the job runs without one.
    pub fn create(name: &str) -> Result<Cgroup, String> {
        let (base, own) = jobs_base()?;
        // In its unit's own cgroup (not yet moved into its leaf): make the controllers the job's.
        if own.ends_with(".service")
            && std::env::var_os("INVOCATION_ID").is_some()
            && alone_in(&base)
        {
            enable_controllers(&base);
        }
        let dir = base.join(name);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        limit_pids(&dir);
        Ok(Cgroup { dir })
    }

    /// A cgroup recorded by an earlier agent, if it still exists.
    pub fn existing(path: &str) -> Option<Cgroup> {
        let dir = PathBuf::from(path);
        dir.join("cgroup.procs").exists().then_some(Cgroup { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// `cgroup.procs`, opened for the child to write its own pid into before exec.
    pub fn procs_file(&self) -> std::io::Result<File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join("cgroup.procs"))
    }

    pub fn members(&self) -> Vec<i32> {
        // A member outside the reader's pid namespace is listed as 0 (a `recover` in another
        // namespace than the agent that made the cgroup): kill(0) signalled the agent's own
        // process group.
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|t| {
                t.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .filter(|&pid: &i32| pid > 0)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether any process is left in it (`cgroup.events`): the kernel's answer, which no
    /// fork race can outrun, unlike a list of pids.
    pub fn populated(&self) -> bool {
        match std::fs::read_to_string(self.dir.join("cgroup.events")) {
            Ok(t) => t
                .lines()
                .any(|l| l.split_whitespace().eq(["populated", "1"])),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => !self.members().is_empty(),
            // Unread for another reason (no fd left to the agent, no memory): not known to be
            // empty. Taken so, the job counted as gone before any SIGKILL round, and FINALIZING
            // said its GPU was free.
            Err(_) => true,
        }
    }

    /// SIGKILL to every member at once (`cgroup.kill`, Linux 5.14), else one by one with
    /// the cgroup frozen (`cgroup.freeze`, Linux 5.2): a process that forks and exits in a
    /// loop is always newer than a list of pids, and a kill by list never caught it.
    pub fn kill(&self) {
        let killed = if crate::fault::armed("no-cgroup-kill") {
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            self.write("cgroup.kill", b"1")
        };
        if killed.is_ok() {
            return;
        }
        let frozen = self.write("cgroup.freeze", b"1").is_ok();
        if frozen {
            // Freezing takes until every member has reached the freezer's trap; bounded, as
            // a member in D state (a hung NFS read) reaches it only when the read ends.
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while !self.event("frozen") && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        self.signal_members(Signal::SIGKILL);
        if frozen {
            // A fatal signal ends a frozen process all the same; thawed, nothing the kill
            // missed stays frozen for ever in a cgroup that can then not be removed.
            let _ = self.write("cgroup.freeze", b"0");
        }
    }

    /// Sends `signal` to each process of the cgroup, only while it is one: a member listed may
    /// end and be reaped (by the agent's own reaper, by init under `recover`) and its pid go
    /// to a stranger before the signal. Each is held by a pidfd first, then the members are
    /// listed again, and only those still listed are signalled (through the pidfd, which never
    /// reaches a later process of that pid).
    fn signal_members(&self, signal: Signal) {
        // In batches: a fork bomb's hundred thousand pidfds at once would take every fd the
        // agent may open.
        for batch in self.members().chunks(MEMBERS_AT_ONCE) {
            let held: Vec<(i32, Option<PidFd>)> =
                batch.iter().map(|&pid| (pid, PidFd::open(pid))).collect();
            let still: std::collections::HashSet<i32> = self.members().into_iter().collect();
            for (pid, fd) in held {
                if !still.contains(&pid) {
                    continue;
                }
                match fd {
                    Some(fd) => {
                        fd.signal(signal);
                    }
                    // No pidfds (Linux < 5.3): the second listing is the last look.
                    None => {
                        let _ = kill(Pid::from_raw(pid), signal);
                    }
                }
            }
        }
    }

    fn write(&self, file: &str, value: &[u8]) -> std::io::Result<()> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.dir.join(file))
            .and_then(|mut f| f.write_all(value))
    }

    /// Whether `cgroup.events` says `<key> 1`.
    fn event(&self, key: &str) -> bool {
        std::fs::read_to_string(self.dir.join("cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().eq([key, "1"])))
    }

    /// What the kernel counted for the job: OOM kills (`memory.events`), peak memory
    /// (`memory.peak`, Linux 5.19) and CPU time (`cpu.stat`). Read before the cgroup is
    /// removed; a file missing (no memory controller delegated) leaves its fact unknown.
    /// Also whether `memory.events` could be read (an OOM kill count of 0 is then known).
    pub fn facts(&self) -> (c3_proto::JobFacts, bool) {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).ok();
        let key = |text: String, k: &str| {
            text.lines().find_map(|l| {
                let mut it = l.split_whitespace();
                (it.next() == Some(k))
                    .then(|| it.next()?.parse::<u64>().ok())
                    .flatten()
            })
        };
        let oom_kills = read("memory.events").and_then(|t| key(t, "oom_kill"));
        let facts = c3_proto::JobFacts {
            oom_kills: oom_kills.unwrap_or(0),
            peak_memory_bytes: read("memory.peak").and_then(|t| t.trim().parse().ok()),
            cpu_seconds: read("cpu.stat")
                .and_then(|t| key(t, "usage_usec"))
                .map(|us| us as f64 / 1e6),
        };
        (facts, oom_kills.is_some())
    }

    /// Removes the (empty) cgroup; the kernel refuses while members remain.
    pub fn remove(&self) {
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::error!(cgroup = %self.dir.display(), error = %crate::error_chain(&e), "cannot remove the job's cgroup (processes left in it?)")
            }
        }
    }
}

/// Removes the empty job cgroups (`c3-<job>-<attempt>-<agent pid>`) next to where this agent
/// would create its jobs' whose agent is gone: an agent killed between creating a job's
/// cgroup and launching into it leaves one behind. A live agent's are never touched (its
/// job's cgroup is empty for a moment before the launch). Returns how many went.
pub fn sweep_leaked_cgroups() -> usize {
    let Ok((base, _)) = jobs_base() else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(&base) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let agent: Option<i32> = name
            .strip_prefix("c3-")
            .and_then(|rest| rest.rsplit('-').next())
            .and_then(|pid| pid.parse().ok());
        let Some(agent) = agent else { continue };
        if procfs::stat(agent).is_some() {
            continue;
        }
        let cg = Cgroup { dir: e.path() };
        if !cg.populated() && std::fs::remove_dir(cg.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Where this agent's jobs' cgroups go (its own cgroup, or the parent of the leaf it moved
/// itself into), and its own cgroup path as `/proc/self/cgroup` says it.
fn jobs_base() -> Result<(PathBuf, String), String> {
    let mount = v2_mount().ok_or("no cgroup v2 hierarchy is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .ok_or("the agent is not in a cgroup v2 hierarchy")?;
    let mut base = mount.join(own.trim_start_matches('/'));
    if base.file_name().is_some_and(|n| n == AGENT_LEAF) {
        base.pop();
    }
    Ok((base, own))
}

/// Holds the job's cgroup (where its `pids` controller is on) to 90% of what the node can
/// number (the lower of `kernel.pid_max` and `kernel.threads-max`): a job's fork bomb took
/// every pid, and every other tenant, daemon and the agent itself (its helpers, its blocking
/// threads, its panic path's runtime) then failed to fork. Legitimate jobs stay far below; a
/// limit already set lower (an operator's) is kept.
fn limit_pids(dir: &Path) {
    let file = dir.join("pids.max");
    let Ok(now) = std::fs::read_to_string(&file) else {
        return;
    };
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    };
    let Some(node) = [
        read(Path::new("/proc/sys/kernel/pid_max")),
        read(Path::new("/proc/sys/kernel/threads-max")),
    ]
    .into_iter()
    .flatten()
    .min() else {
        return;
    };
    // A limit above (a pod's, a slice's TasksMax) binds the job's siblings, the agent among
    // them, too: 90% of the lowest.
    let above = dir
        .ancestors()
        .skip(1)
        .take_while(|d| d.join("pids.max").exists())
        .filter_map(|d| read(&d.join("pids.max")))
        .min();
    let limit = above.map_or(node, |a| a.min(node)) / 10 * 9;
    if now.trim().parse::<u64>().is_ok_and(|set| set <= limit) {
        return;
    }
    if let Err(e) = std::fs::write(&file, limit.to_string()) {
        tracing::debug!(path = %file.display(), error = %e, "cannot limit the job's pids");
    }
}

/// How many of a cgroup's members [`Cgroup::signal_members`] holds by pidfd at once.
const MEMBERS_AT_ONCE: usize = 256;

/// Where the agent moves itself inside its own (delegated) cgroup, see [`enable_controllers`].
const AGENT_LEAF: &str = "c3-agent";

/// Controllers the job's cgroup should have: `memory` (its `memory.events` counts OOM kills,
/// `memory.peak`), `pids`, `cpu`.
const JOB_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// In a systemd unit with `Delegate=yes`, the controllers are the agent's to enable for its
/// children, but cgroup v2 allows that only in a cgroup with no processes of its own: the
/// agent moves itself into a leaf (`<unit>/c3-agent`) first, as systemd's delegation rules
/// ask. Whatever fails leaves the job a cgroup without those controllers, as before (OOM
/// kills then come from the kernel log where the agent may read it).
fn enable_controllers(base: &Path) {
    let read = |f: &str| std::fs::read_to_string(base.join(f)).unwrap_or_default();
    let (available, enabled) = (read("cgroup.controllers"), read("cgroup.subtree_control"));
    let missing: Vec<String> = JOB_CONTROLLERS
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return;
    }
    let line = missing.join(" ");
    // One at a time: a controller the kernel refuses must not keep the others off.
    let enable = || {
        let mut result = Ok(());
        for c in &missing {
            if let Err(e) = std::fs::write(base.join("cgroup.subtree_control"), c) {
                result = Err(e);
            }
        }
        result
    };
    if enable().is_ok() {
        return;
    }
    let leaf = base.join(AGENT_LEAF);
    let moved = match std::fs::create_dir(&leaf) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
    .and_then(|()| {
        // Helpers go along: a process left behind keeps the controllers off.
        let helpers = crate::helper::settled_helpers();
        let pids: Vec<i32> = std::iter::once(std::process::id() as i32)
            .chain(helpers.iter().copied())
            .collect();
        pids.into_iter().try_for_each(|pid| {
            match std::fs::write(leaf.join("cgroup.procs"), pid.to_string()) {
                // A helper that ended meanwhile.
                Err(e)
                    if pid != std::process::id() as i32
                        && e.raw_os_error() == Some(libc::ESRCH) =>
                {
                    Ok(())
                }
                other => other,
            }
        })
    });
    match moved.and_then(|()| enable()) {
        Ok(()) => tracing::debug!(controllers = %line, "enabled for the job's cgroup"),
        Err(e) => {
            tracing::debug!(controllers = %line, error = %e, "cannot enable cgroup controllers for the job")
        }
    }
}

/// Whether the agent is the only process of its cgroup but for its own helpers: its own
/// unit's main process (a root agent inside another service, say slurmd's, must not
/// rearrange that service's cgroup). A helper (the unit check's `systemctl`, spawned at the
/// start) still running when the job's cgroup is made left the job without its memory
/// controller, and an OOM kill was reported as the script's SIGKILL.
fn alone_in(dir: &Path) -> bool {
    let me = std::process::id() as i32;
    std::fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|t| {
        let helpers = crate::helper::settled_helpers();
        let pids: Vec<i32> = t
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        pids.contains(&me) && pids.iter().all(|p| *p == me || helpers.contains(p))
    })
}

fn v2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Makes this process the subreaper of everything it starts (Linux `PR_SET_CHILD_SUBREAPER`).
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %crate::error_chain(&e), "cannot become a child subreaper; a job's daemonized processes may escape");
    }
}

/// Stops every process this agent started (and every orphan re-parented to it): SIGTERM,
/// up to `grace`, SIGKILL, reaped. For the agent's own panic path, where no `JobProcesses`
/// survives; blocking, called outside any async runtime.
pub fn stop_all_descendants(grace: Duration) {
    let me = std::process::id() as i32;
    let live = || -> Vec<Seen> {
        let procs = procfs::all();
        let d = procfs::descendants(me, &procs);
        for pid in &d {
            if procs
                .get(pid)
                .is_some_and(|s| s.ppid == me && s.is_zombie())
            {
                let _ = waitpid(Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG));
            }
        }
        d.into_iter()
            .filter_map(|pid| {
                let s = procs.get(&pid).filter(|s| !s.is_zombie())?;
                Some(Seen {
                    pid,
                    start: s.start_ticks,
                })
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + grace;
    for one in live() {
        signal_seen(one, Signal::SIGTERM);
    }
    while std::time::Instant::now() < deadline {
        if live().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..40 {
        let left = live();
        if left.is_empty() {
            return;
        }
        for one in left {
            signal_seen(one, Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process as a look at `/proc` saw it: its pid and its start (clock ticks after boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seen {
    pub pid: i32,
    pub start: u64,
}

/// Sends `signal` to the process `seen` names only while it is that process. Between a look
/// and its signal a job's process may end, its parent reap it and the pid go to a stranger
/// (a job that forks fast wraps the pid space in seconds): the pidfd is opened before the
/// start is compared, so it holds the process compared. Without pidfds (Linux < 5.3) the
/// comparison comes just before kill(2). Whether the signal was delivered.
pub fn signal_seen(seen: Seen, signal: Signal) -> bool {
    let same = || procfs::stat(seen.pid).is_some_and(|s| s.start_ticks == seen.start);
    match PidFd::open(seen.pid) {
        Some(fd) => same() && fd.signal(signal),
        None => same() && kill(Pid::from_raw(seen.pid), signal).is_ok(),
    }
}

/// Where a job's processes are found.
#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Launched by this agent: the agent's descendants (it is their subreaper) + the cgroup.
    Launched,
    /// Sidecar mode with `--pid`: that process and its descendants.
    Tree(i32),
    /// Sidecar mode without `--pid`: every process this agent can see, but itself.
    Everyone,
}

/// A process held by a pidfd (Linux 5.3): a signal sent through it never reaches a later
/// process that reused the pid, even after the process was reaped.
#[derive(Debug)]
pub struct PidFd(std::os::fd::OwnedFd);

impl PidFd {
    /// `None` where the kernel has no pidfds (or the process is gone).
    pub fn open(pid: i32) -> Option<PidFd> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        // SAFETY: a non-negative return is a fresh fd that nothing else owns.
        (fd >= 0).then(|| PidFd(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Whether the signal was delivered (false once the process is gone).
    pub fn signal(&self, signal: Signal) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid pidfd, a valid signal, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                signal as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        r == 0
    }
}

/// The processes of one running job. Cheap to clone.
#[derive(Debug, Clone)]
pub struct JobProcesses {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The script's pid: its process group and session id (from setsid), reaped by tokio.
    leader: i32,
    cgroup: Option<Cgroup>,
    /// This agent: with the subreaper flag, the job's orphans become its children.
    agent: i32,
    /// Whose descendants are the job.
    scope: Scope,
    /// The cgroup's facts, read when the job was stopped (just before the cgroup went).
    facts: std::sync::Mutex<Option<(c3_proto::JobFacts, bool)>>,
    /// The leader's start (clock ticks after boot), to tell its kernel-log lines from those
    /// of an earlier process with the same pid.
    leader_start_ticks: u64,
    /// Every process of the job seen by the reaper's once-a-second look (pid -> start
    /// ticks, and when a look first found it gone, on the kernel log's clock), at most
    /// [`MAX_SEEN`]: where no cgroup counts OOM kills, the kernel log is searched for these,
    /// so a shell leader's OOM-killed child is found too, and not a later process that took
    /// its pid.
    seen: std::sync::Mutex<std::collections::BTreeMap<i32, (u64, Option<u64>)>>,
    /// `--pid`'s tree as seen at each look (pid -> start ticks): a descendant the leader left
    /// behind is re-parented out of the tree when the leader ends, and is still the job's.
    tree: std::sync::Mutex<std::collections::BTreeMap<i32, u64>>,
    /// The FUSE connections at the launch: one the job's user made since may be aborted to
    /// free a process of the job that survives SIGKILL.
    fuse: Option<crate::fusectl::Before>,
    /// A look for survivors waiting on FUSE is under way (or stuck).
    fuse_looking: std::sync::atomic::AtomicBool,
}

/// How long SIGKILL rounds go on before the job's processes are said to survive them.
const KILL_ROUNDS: Duration = Duration::from_secs(5);

/// After this long surviving SIGKILL, a process is taken for stuck on a FUSE request.
const ABORT_AFTER: Duration = Duration::from_secs(1);
/// How often survivors are looked at again for a wait on their FUSE server.
const ABORT_LOOK_EVERY: Duration = Duration::from_millis(500);
/// How long one look at the survivors for a FUSE wait may take.
const ABORT_LOOK_LIMIT: Duration = Duration::from_secs(1);

/// The shortest round of SIGKILLs, even past the stop's deadline: a process freed by an
/// abort of its FUSE connection takes a moment to die.
const LAST_ROUND: Duration = Duration::from_millis(250);

/// How long the leader may take to die after its SIGKILL; a leader stuck in the kernel (a
/// GPU driver call) must not hold the agent.
const LEADER_AFTER_KILL: Duration = Duration::from_secs(10);

/// When the stopping of the job must be over once the agent was asked to stop: every wait
/// for the job's processes (grace, SIGKILL rounds, the leader's death) and for its output
/// is measured from the stop, so that the final sync's cut and the terminal status still
/// come by `stop_deadline_secs`, however long a process refuses to die. Without a stop,
/// each wait is its own.
#[derive(Debug, Clone, Default)]
pub struct StopBy {
    /// When the stop came (`job::stop_clock`): `None` in it until then.
    at: Option<tokio::sync::watch::Receiver<Option<tokio::time::Instant>>>,
    /// How long after the stop the job's processes may take.
    within: Duration,
}

impl StopBy {
    pub fn new(
        at: Option<tokio::sync::watch::Receiver<Option<tokio::time::Instant>>>,
        within: Duration,
    ) -> Self {
        StopBy { at, within }
    }

    /// The deadline, once a stop came.
    pub fn by(&self) -> Option<tokio::time::Instant> {
        let at = (*self.at.as_ref()?.borrow())?;
        at.checked_add(self.within)
    }

    /// `t`, or the stop's deadline if it comes first.
    fn cap(&self, t: tokio::time::Instant) -> tokio::time::Instant {
        self.by().map_or(t, |by| by.min(t))
    }

    /// `f`'s output, unless `t` (or the deadline of a stop, also one that comes meanwhile)
    /// passes first.
    async fn timeout_at<F: std::future::Future>(
        &self,
        t: tokio::time::Instant,
        f: F,
    ) -> Option<F::Output> {
        let mut at = self.at.clone();
        tokio::pin!(f);
        loop {
            let stop = async {
                match at.as_mut() {
                    Some(rx) if self.by().is_none() => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut f => return Some(out),
                () = tokio::time::sleep_until(self.cap(t)) => return None,
                () = stop => {}
            }
        }
    }
}

/// Generations walked up from a process to find the agent ([`JobProcesses::contains`]),
/// where no cgroup answers: each is a read of `/proc` by the root agent, outside the job's
/// cgroup, for every connection to the job's socket. A job that nests its processes deeper
/// (a fork chain 20,000 deep: 0.3 s of CPU per connection at 65,536) is refused the socket.
const MAX_ANCESTRY: usize = 1024;

/// Processes of one job remembered for the OOM search; a job that forks more is searched
/// for the first ones (the long-lived ones that hold memory come first).
const MAX_SEEN: usize = 4096;

impl JobProcesses {
    pub fn new(leader: i32, cgroup: Option<Cgroup>) -> Self {
        Self::launched(leader, cgroup, None)
    }

    /// A launched job; `fuse`, the FUSE connections taken just before its launch.
    pub fn launched(
        leader: i32,
        cgroup: Option<Cgroup>,
        fuse: Option<crate::fusectl::Before>,
    ) -> Self {
        let mut procs = Self::with_scope(leader, cgroup, Scope::Launched);
        if let Some(inner) = Arc::get_mut(&mut procs.inner) {
            inner.fuse = fuse;
        }
        procs
    }

    /// A job this agent did not launch (`c3-agent watch`): the process `pid` and its
    /// descendants, or without one every process in sight. Only for the open-for-write
    /// check: such a job is never signalled.
    pub fn watched(leader: Option<&c3_proto::ProcIdentity>) -> Self {
        match leader {
            // The identity checked when the watch began: read again later, a leader gone by
            // then would leave a start of 0, and a stranger reusing its pid would be taken in.
            Some(l) => {
                let mut procs = Self::with_scope(l.pid, None, Scope::Tree(l.pid));
                if let Some(inner) = Arc::get_mut(&mut procs.inner) {
                    inner.leader_start_ticks = l.start_ticks;
                }
                procs
            }
            None => Self::with_scope(0, None, Scope::Everyone),
        }
    }

    fn with_scope(leader: i32, cgroup: Option<Cgroup>, scope: Scope) -> Self {
        JobProcesses {
            inner: Arc::new(Inner {
                leader,
                cgroup,
                scope,
                agent: std::process::id() as i32,
                facts: std::sync::Mutex::new(None),
                leader_start_ticks: procfs::stat(leader).map_or(0, |s| s.start_ticks),
                seen: Default::default(),
                tree: Default::default(),
                fuse: None,
                fuse_looking: Default::default(),
            }),
        }
    }

    pub fn leader(&self) -> i32 {
        self.inner.leader
    }

    /// The leader's start (clock ticks after boot), to tell it from a later process.
    pub fn leader_start_ticks(&self) -> u64 {
        self.inner.leader_start_ticks
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.inner.cgroup.as_ref()
    }

    /// Live (non-zombie) processes of the job: its cgroup's members and the agent's
    /// descendants (the subreaper flag keeps orphans among them). Never a process group id
    /// alone: once the group is gone, its id may belong to a stranger. Reads `/proc`: call it
    /// off the reactor.
    pub fn members(&self) -> Vec<i32> {
        self.members_seen().into_iter().map(|m| m.pid).collect()
    }

    /// [`JobProcesses::members`], each with its start as the look saw it: what a signal is
    /// sent to ([`signal_seen`]).
    fn members_seen(&self) -> Vec<Seen> {
        self.members_seen_in(&procfs::all())
    }

    /// [`JobProcesses::members_seen`] in the look `procs`.
    fn members_seen_in(&self, procs: &std::collections::HashMap<i32, procfs::Stat>) -> Vec<Seen> {
        let live = |p: &i32| procs.get(p).is_some_and(|s| !s.is_zombie());
        let mut set: BTreeSet<i32> = match self.inner.scope {
            Scope::Launched => procfs::descendants(self.inner.agent, procs)
                .into_iter()
                .filter(live)
                .collect(),
            // Only while `root` is the leader still: a stranger that reused its pid has its own
            // tree.
            Scope::Tree(root)
                if procs
                    .get(&root)
                    .is_some_and(|s| s.start_ticks == self.inner.leader_start_ticks) =>
            {
                procfs::descendants(root, procs)
                    .into_iter()
                    .chain(std::iter::once(root))
                    .filter(live)
                    .collect()
            }
            Scope::Tree(_) => BTreeSet::new(),
            Scope::Everyone => procs.keys().copied().filter(live).collect(),
        };
        if let Scope::Tree(_) = self.inner.scope {
            let mut tree = self.inner.tree.lock().unwrap_or_else(|p| p.into_inner());
            for p in &set {
                if let (Some(s), true) = (procs.get(p), tree.len() < MAX_SEEN) {
                    tree.entry(*p).or_insert(s.start_ticks);
                }
            }
            // The same process (pid and start), alive, wherever it was re-parented to.
            tree.retain(|p, start| {
                procs
                    .get(p)
                    .is_some_and(|s| s.start_ticks == *start && !s.is_zombie())
            });
            set.extend(tree.keys());
        }
        // Not filtered through the snapshot above: a process forked after it is still ours.
        if let Some(cg) = &self.inner.cgroup {
            set.extend(cg.members());
        }
        set.remove(&self.inner.agent);
        // Looked at after the snapshot: a helper in it was forked before, and is known once
        // its spawn has settled.
        for helper in crate::helper::settled_helpers().iter() {
            set.remove(helper);
        }
        set.into_iter()
            .filter_map(|pid| {
                // A cgroup member forked since the snapshot is looked at now.
                let start = match procs.get(&pid) {
                    Some(s) => s.start_ticks,
                    None => procfs::stat(pid)?.start_ticks,
                };
                Some(Seen { pid, start })
            })
            .collect()
    }

    /// Whether `pid` is among [`JobProcesses::members`], looked up for that one process: for
    /// a launched job its ancestry is walked up to the agent and the cgroup's list read, not
    /// every process of the node. The job's socket asks this per connection, and a job
    /// connecting in a loop (beside 3,000 sleeping processes of its own) had the root agent
    /// scan all of /proc each time: 12.8 s of CPU, outside the job's cgroup, for its 3.7 s.
    /// Reads `/proc`: call it off the reactor.
    pub fn contains(&self, pid: i32) -> bool {
        if pid <= 0 || pid == self.inner.agent || crate::helper::settled_helpers().contains(&pid) {
            return false;
        }
        let Scope::Launched = self.inner.scope else {
            return self.members().contains(&pid);
        };
        // The cgroup first: one read, whatever the depth of the job's processes.
        if let Some(cg) = &self.inner.cgroup {
            if cg.members().contains(&pid) {
                return true;
            }
        }
        let Some(own) = procfs::stat(pid) else {
            return false;
        };
        if !own.is_zombie() {
            let mut parent = own.ppid;
            for _ in 0..MAX_ANCESTRY {
                if parent == self.inner.agent {
                    return true;
                }
                match procfs::stat(parent) {
                    Some(s) if parent > 1 => parent = s.ppid,
                    _ => break,
                }
            }
        }
        false
    }

    /// Whether nothing of the job is left (off the reactor): only then is its GPU free.
    pub async fn all_gone(&self) -> bool {
        self.gone_async().await
    }

    /// Whether nothing of the job is left. With a cgroup, the kernel says so.
    fn gone(&self) -> bool {
        match &self.inner.cgroup {
            Some(cg) => !cg.populated() && self.members().is_empty(),
            // A `/proc` that cannot be listed (no fd left) lists no one: not an answer.
            None => {
                let procs = procfs::all();
                self.members_seen_in(&procs).is_empty()
                    && !self.ended_unreaped(&procs)
                    && std::fs::read_dir("/proc").is_ok()
            }
        }
    }

    /// Whether the look `procs` holds a process of the job that ended and is not reaped yet
    /// (not the leader, whom tokio waits for, nor a helper's). Without a cgroup a look is a
    /// list of `/proc` and then each one's stat: a process that forks and exits in a loop
    /// was listed before its hop, read as a zombie after it, and its child (made after the
    /// list) never seen; the job was taken for gone, its GPU for free, and the hopper ran
    /// on. Its ended hops are zombies of the agent's (the subreaper's) until reaped, so a
    /// look holding one is no proof.
    fn ended_unreaped(&self, procs: &std::collections::HashMap<i32, procfs::Stat>) -> bool {
        let Scope::Launched = self.inner.scope else {
            return false;
        };
        let helpers: BTreeSet<i32> = crate::helper::settled_helpers().iter().copied().collect();
        procfs::descendants(self.inner.agent, procs)
            .into_iter()
            .any(|pid| {
                pid != self.inner.leader
                    && !helpers.contains(&pid)
                    && procs.get(&pid).is_some_and(procfs::Stat::is_zombie)
            })
    }

    async fn gone_async(&self) -> bool {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.gone())
            .await
            .unwrap_or(false)
    }

    /// [`JobProcesses::members`], off the reactor.
    pub async fn members_async(&self) -> Vec<i32> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.members())
            .await
            .unwrap_or_default()
    }

    fn signal_each(&self, seen: &[Seen], signal: Signal) {
        for one in seen {
            signal_seen(*one, signal);
        }
    }

    /// `signal` to every process of the job as it is now (off the reactor); how many it
    /// reached.
    pub async fn signal_all(&self, signal: Signal) -> usize {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let seen = this.members_seen();
            seen.iter().filter(|one| signal_seen(**one, signal)).count()
        })
        .await
        .unwrap_or(0)
    }

    /// SIGKILL to everything of the job, however fast it forks. With a cgroup, `cgroup.kill`
    /// is atomic. Without one, the job is frozen first (SIGSTOP until a scan finds nothing
    /// new), so a process that keeps forking cannot stay ahead of the list; then killed.
    /// Blocking: call it off the reactor.
    fn kill_hard(&self) {
        if let Some(cg) = &self.inner.cgroup {
            cg.kill();
        } else {
            let (mut seen, mut stopped) = (BTreeSet::new(), Vec::new());
            // Each scan reads all of /proc: with a hundred thousand processes a scan takes
            // about a second, and 100 of them outlasted the stop deadline. What a bounded
            // freeze misses, the stragglers' SIGKILL below and the caller's next round get.
            let started = std::time::Instant::now();
            for _ in 0..100 {
                if started.elapsed() > Duration::from_secs(2) {
                    break;
                }
                let now: BTreeSet<Seen> = self.members_seen().into_iter().collect();
                let new: Vec<Seen> = now.difference(&seen).copied().collect();
                if new.is_empty() {
                    break;
                }
                // Only a process that took the SIGSTOP is killed below: a stopped process
                // stays, its pid its own.
                for one in new {
                    seen.insert(one);
                    if signal_seen(one, Signal::SIGSTOP) {
                        stopped.push(one);
                    }
                }
            }
            self.signal_each(&stopped, Signal::SIGKILL);
        }
        // Stragglers: anything still listed (outside the cgroup, or forked meanwhile).
        let left = self.members_seen();
        self.signal_each(&left, Signal::SIGKILL);
    }

    async fn kill_hard_async(&self) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.kill_hard()).await;
    }

    /// Marks each process of the job seen before that the look `procs` no longer finds as
    /// gone at `now` (on the kernel log's clock).
    fn mark_gone(&self, procs: &std::collections::HashMap<i32, procfs::Stat>, now: u64) {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        // A look that read nothing (`/proc` unreadable for a moment: no fd left, no memory)
        // says nothing of who is gone; nor does a pid whose entry could not be read but is
        // there.
        for (pid, (start, gone)) in seen.iter_mut().filter(|_| !procs.is_empty()) {
            // Gone once is gone: a look at `/proc/<pid>` each round for each of the 4,096
            // seen was most of a reap's time.
            if gone.is_some() {
                continue;
            }
            let there = match procs.get(pid) {
                Some(s) => s.start_ticks == *start && !s.is_zombie(),
                None => Path::new(&format!("/proc/{pid}")).exists(),
            };
            if !there && gone.is_none() {
                *gone = Some(now);
            }
        }
    }

    /// [`JobProcesses::reap`] on a blocking thread at the normal priority (the stop path's:
    /// a scan of every `/proc/<pid>/stat`, a second for 100,000 processes, held the reactor's
    /// worker, its timers and the socket, every round of a stop).
    async fn reap_off_reactor(&self) {
        let this = self.clone();
        let _ = tokio::task::spawn_blocking(move || this.reap()).await;
    }

    /// Reaps re-parented job processes that exited (never the leader, nor a helper of the
    /// agent's own: tokio waits for those).
    pub fn reap(&self) {
        self.reap_round(false)
    }

    /// [`JobProcesses::reap`]; `ticking`: a round of [`JobProcesses::reap_until`]'s.
    fn reap_round(&self, ticking: bool) {
        let procs = procfs::all();
        let descendants = match self.inner.scope {
            Scope::Launched => procfs::descendants(self.inner.agent, &procs),
            _ => Vec::new(),
        };
        // Looked at after the snapshot (and not held across it, which would hold up every
        // helper's start): a helper in it was forked before, and is known unless its spawn
        // is still pending.
        // Copied, the lock let go at once: held through the rest, a reap run at the idle
        // priority (the job's busy threads in the same CPU group) held every signal of a
        // cancel, and the socket's peer checks, for minutes. A helper forked before the
        // snapshot is in the copy; one that ends meanwhile was waited for by tokio, so no
        // zombie of the snapshot is it.
        let helpers: std::collections::BTreeSet<i32> = {
            let helpers = crate::helper::helpers();
            // A child forked for a helper that has not named itself yet cannot be told from
            // an orphan of the job's: the next round reaps what this one leaves.
            if helpers.pending() {
                return;
            }
            helpers.iter().copied().collect()
        };
        self.mark_gone(&procs, procfs::now_micros());
        if ticking {
            crate::fault::blocking_pause("reap-is-slow", Duration::from_secs(20));
        }
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        for pid in descendants {
            if seen.len() >= MAX_SEEN {
                break;
            }
            if let Some(s) = procs.get(&pid).filter(|_| !helpers.contains(&pid)) {
                seen.entry(pid).or_insert((s.start_ticks, None));
            }
        }
        drop(seen);
        for (pid, s) in procs {
            if s.ppid == self.inner.agent
                && s.is_zombie()
                && pid != self.inner.leader
                && !helpers.contains(&pid)
            {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
        }
    }

    /// Reaps orphans every second until `stop`: a job that daemonizes many short-lived
    /// processes must not fill the pid table with the agent's zombies.
    pub async fn reap_until(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let this = self.clone();
                    // A round under way (at the idle priority, behind a busy job's threads)
                    // goes on alone once the job is done: waited for, it held the job's end,
                    // the GPUs' release and the status.
                    tokio::select! {
                        _ = crate::pace::spawn_gently(move || this.reap_round(true)) => {}
                        _ = stop.cancelled() => return,
                    }
                }
            }
        }
    }

    /// SIGTERM to every process of the job, SIGKILL after `grace` to whatever is left,
    /// everything reaped; after a stop, all of it by `stop`'s deadline. Returns the leader's
    /// exit status if it had to be waited for here.
    pub async fn terminate(
        &self,
        leader: Option<&mut Child>,
        grace: Duration,
        stop: &StopBy,
    ) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + grace;
        self.signal_all(Signal::SIGTERM).await;
        let mut status = None;
        if let Some(child) = leader {
            match stop.timeout_at(deadline, child.wait()).await {
                Some(s) => status = s.ok(),
                None => {
                    tracing::warn!(
                        pid = self.inner.leader,
                        grace_secs = grace.as_secs_f64(),
                        "job ignored SIGTERM; sending SIGKILL"
                    );
                    self.kill_hard_async().await;
                    // A leader stuck for good is left to the SIGKILL rounds below, which say so.
                    let until = tokio::time::Instant::now() + LEADER_AFTER_KILL;
                    status = stop
                        .timeout_at(until, child.wait())
                        .await
                        .and_then(Result::ok);
                }
            }
        }
        loop {
            self.reap_off_reactor().await;
            if self.gone_async().await {
                break;
            }
            if tokio::time::Instant::now() >= stop.cap(deadline) {
                tracing::warn!(
                    processes = self.members_async().await.len(),
                    "processes of the job outlived the grace period; sending SIGKILL"
                );
                self.kill_rounds(KILL_ROUNDS, stop).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.done();
        status
    }

    /// After [`JobProcesses::terminate`] already ran for a stop: one short round of SIGKILL
    /// for anything left (forked meanwhile, or still stuck), reaped; no second grace.
    pub async fn last_round(&self, stop: &StopBy) {
        self.reap_off_reactor().await;
        if !self.gone_async().await {
            self.kill_rounds(LAST_ROUND, stop).await;
        }
        self.done();
    }

    /// SIGKILL to whatever is left, for `rounds` (cut at `stop`'s deadline, but never below
    /// [`LAST_ROUND`]). A process that survives them for [`ABORT_AFTER`] may be stuck on a
    /// FUSE request its own server never answers: the job user's connections made since
    /// the launch are aborted, and the rounds look again.
    async fn kill_rounds(&self, rounds: Duration, stop: &StopBy) {
        let start = tokio::time::Instant::now();
        // Looked at each round: a stop that comes during them shortens them.
        let until = || stop.cap(start + rounds).max(start + LAST_ROUND);
        // Looked at again while the rounds last: a survivor may come to wait on its FUSE
        // server only after the first look.
        let mut next_abort_look: Option<tokio::time::Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            self.kill_hard_async().await;
            tick.tick().await;
            self.reap_off_reactor().await;
            if self.gone_async().await {
                return;
            }
            let now = tokio::time::Instant::now();
            let (until, abort_at) = (until(), (start + ABORT_AFTER).min(until() - LAST_ROUND));
            if now < until && now >= next_abort_look.unwrap_or(abort_at) {
                next_abort_look = Some(if self.abort_new_fuse().await {
                    until
                } else {
                    now + ABORT_LOOK_EVERY
                });
                continue;
            }
            if now >= until {
                tracing::error!(
                    processes = self.members_async().await.len(),
                    "processes of the job survive SIGKILL (stuck in the kernel?)"
                );
                return;
            }
        }
    }

    /// Whether a connection was aborted. The look is given up after [`ABORT_LOOK_LIMIT`], and
    /// none is begun while one is under way: a kernel stack is read under the process's exec
    /// lock before 5.7, which an exec from the job's own stuck FUSE mount holds for ever.
    async fn abort_new_fuse(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.inner.fuse_looking.swap(true, Ordering::AcqRel) {
            return false;
        }
        let this = self.clone();
        let span = tracing::Span::current();
        let look = tokio::task::spawn_blocking(move || {
            let _job = span.enter();
            let aborted = this
                .inner
                .fuse
                .as_ref()
                .is_some_and(|before| !before.abort_new(&this.members()).is_empty());
            this.inner.fuse_looking.store(false, Ordering::Release);
            aborted
        });
        matches!(
            tokio::time::timeout(ABORT_LOOK_LIMIT, look).await,
            Ok(Ok(true))
        )
    }

    /// The job's cgroup's facts, kept, and the cgroup removed.
    fn done(&self) {
        if let Some(cg) = &self.inner.cgroup {
            if let Ok(mut facts) = self.inner.facts.lock() {
                // Once, while the cgroup exists: a second `terminate` finds it removed.
                if facts.is_none() && cg.path().exists() {
                    *facts = Some(cg.facts());
                }
            }
            cg.remove();
        }
    }

    /// The job's resource facts once it was stopped: its cgroup's, completed from
    /// `getrusage` of the agent's reaped children (the job's processes: the agent, a
    /// subreaper, starts no others). Where no `memory.events` counts OOM kills, one is
    /// looked for in the kernel log when the leader died of SIGKILL or exited 137
    /// (`leader_sigkilled`): of the leader, or of any process of the job the reaper saw.
    pub fn facts(&self, leader_sigkilled: bool) -> c3_proto::JobFacts {
        use nix::sys::resource::{getrusage, UsageWho};
        let (mut facts, oom_counted) = self
            .inner
            .facts
            .lock()
            .ok()
            .and_then(|f| f.clone())
            .unwrap_or_default();
        if let Ok(usage) = getrusage(UsageWho::RUSAGE_CHILDREN) {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            facts.cpu_seconds = facts
                .cpu_seconds
                .or(Some(secs(usage.user_time()) + secs(usage.system_time())));
            // ru_maxrss is in KiB: the largest single process's peak, a floor for the job's.
            facts.peak_memory_bytes = facts
                .peak_memory_bytes
                .or(Some(usage.max_rss() as u64 * 1024));
        }
        if !oom_counted && leader_sigkilled {
            // One still there (or whose end no look saw) is counted up to now, and one found
            // gone up to a margin past that look, for the clocks' drift (a pid taken over by
            // another tenant's process takes wrapping the pid space, minutes, not seconds).
            const MARGIN_US: u64 = 30_000_000;
            let now = procfs::now_micros().saturating_add(MARGIN_US);
            let life = |ticks: u64, gone: Option<u64>| crate::kernlog::Lifetime {
                from_us: procfs::start_micros(ticks),
                until_us: gone.map_or(now, |g| g.saturating_add(MARGIN_US)),
            };
            let mut processes: std::collections::BTreeMap<i32, crate::kernlog::Lifetime> = self
                .inner
                .seen
                .lock()
                .map(|seen| {
                    seen.iter()
                        .map(|(&pid, &(ticks, gone))| (pid, life(ticks, gone)))
                        .collect()
                })
                .unwrap_or_default();
            processes.insert(self.inner.leader, life(self.inner.leader_start_ticks, None));
            if crate::kernlog::oom_killed(&processes) {
                facts.oom_kills = 1;
            }
        }
        facts
    }
}

/// A cgroup the agent made for a job (`c3-<job>-<attempt>-<pid>`, under the cgroup2 mount):
/// the only kind a run record may have `recover` kill and remove, whatever the record says.
fn is_agents_cgroup(path: &str) -> bool {
    let p = Path::new(path);
    p.starts_with("/sys/fs/cgroup")
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        })
        && p.file_name()
            .is_some_and(|n| is_job_leaf(n.as_encoded_bytes()))
}

/// `c3-<job>-<attempt>-<pid>` with a job id and two numbers: never the agent's own leaf
/// (`c3-agent`, where an agent itself runs), while a job whose id starts with `agent`
/// (`c3-agent42-1-999`) is a job's like any other.
fn is_job_leaf(name: &[u8]) -> bool {
    let Some(rest) = name.strip_prefix(b"c3-") else {
        return false;
    };
    let number = |p: &[u8]| !p.is_empty() && p.iter().all(u8::is_ascii_digit);
    let mut parts = rest.rsplitn(3, |&b| b == b'-');
    let (Some(pid), Some(attempt), Some(job)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    name != AGENT_LEAF.as_bytes() && number(pid) && number(attempt) && !job.is_empty()
}

/// Stops what a crashed agent's job left running, signalling only what provably is the
/// job: its own cgroup, or its process group while the recorded leader (pid, start time,
/// boot) still exists, or, the leader gone, while group `leader.pid` still exists with only
/// the job user's processes of the leader's session in it, none older than the leader. A
/// pid or group id reused by a stranger is never signalled. Returns whether processes of
/// the job are left ([`KILL_ROUNDS`] after SIGKILL): then the job's GPU is not free, and a
/// scheduler told the attempt is over must hear so.
pub async fn stop_recorded(
    leader: Option<&c3_proto::ProcIdentity>,
    cgroup: Option<&str>,
    job: JobMark<'_>,
    grace: Duration,
    leads_session: bool,
) -> bool {
    if let Some(cg) = cgroup
        .filter(|p| is_agents_cgroup(p))
        .and_then(Cgroup::existing)
    {
        // Emptiness is the kernel's word (`populated`): from another pid namespace than the
        // agent that made the cgroup, every member reads as pid 0 and the list is empty, and
        // the job's processes were never stopped (`cgroup.kill` reaches them all the same).
        let members = cg.members();
        let cg = if !cg.populated() {
            cg
        } else {
            tracing::warn!(
                processes = members.len(),
                cgroup = %cg.path().display(),
                "the job's processes outlived the agent; stopping them"
            );
            // Off the reactor: a fork bomb's tens of thousands of members take a while.
            let cg = match tokio::task::spawn_blocking(move || {
                cg.signal_members(Signal::SIGTERM);
                cg
            })
            .await
            {
                Ok(cg) => cg,
                Err(_) => return true,
            };
            let deadline = tokio::time::Instant::now() + grace;
            while cg.populated() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // Freezing first may take up to a second: off the reactor.
            let cg = match tokio::task::spawn_blocking(move || {
                cg.kill();
                cg
            })
            .await
            {
                Ok(cg) => cg,
                Err(_) => return true,
            };
            // A process in D state, or one tearing down its GPU memory, dies only when the
            // kernel lets it: a removal tried at once failed, and nobody heard of it.
            let deadline = tokio::time::Instant::now() + KILL_ROUNDS;
            while cg.populated() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cg
        };
        cg.remove();
        return cg.populated();
    }
    // A cgroup the record names that is not one the agent would kill (a cgroup2 mounted
    // elsewhere than /sys/fs/cgroup when the agent made it): not signalled, and not taken
    // for empty either while the kernel says it holds processes. Taken so, the job's
    // processes counted as gone, and the GPU they held as free.
    if let Some(refused) = cgroup
        .filter(|p| !is_agents_cgroup(p))
        .and_then(Cgroup::existing)
    {
        if refused.populated() {
            tracing::warn!(cgroup = %refused.path().display(), "the run record names a cgroup the agent does not stop (not under /sys/fs/cgroup, or not of a job's name) and it holds processes: not signalled, and the job's GPU is not taken as free");
            return true;
        }
    }
    let Some(leader) = leader else {
        tracing::warn!("the run record names no job process; nothing signalled");
        return false;
    };
    let group = RecordedGroup {
        leader: leader.clone(),
        leads_session,
    };
    stop_groups(vec![group], cgroup.is_some(), job, grace).await
}

/// A process group a crashed agent's job left where no cgroup holds it: the recorded
/// leader's, or one found by the job's marks ([`marked_groups`]).
#[derive(Debug, Clone)]
pub struct RecordedGroup {
    pub leader: c3_proto::ProcIdentity,
    /// The leader led its session too (the launch's own leader does); not one found by
    /// marks, which may be a `setpgrp` inside the job's session.
    pub leads_session: bool,
}

/// Stops the process groups of a crashed agent's job that no cgroup holds, signalling only
/// what provably is the job's (as [`stop_recorded`] says). Every group proven is sent
/// SIGTERM before any grace is waited, and the one `grace` is shared: a job that left N
/// groups ignoring SIGTERM (`setsid` children with a `trap '' TERM`) cost N graces when each
/// was waited for in turn, and `recover`, a stop and every record after waited with it.
/// Returns whether processes of the job are left ([`KILL_ROUNDS`] after SIGKILL).
pub async fn stop_recorded_groups(
    groups: Vec<RecordedGroup>,
    job: JobMark<'_>,
    grace: Duration,
) -> bool {
    stop_groups(groups, false, job, grace).await
}

/// [`stop_recorded_groups`]; `cgroup_recorded`: the record named a cgroup, now gone, which
/// says the job's processes are (what holds a group of a recorded id then is a stranger's).
async fn stop_groups(
    groups: Vec<RecordedGroup>,
    cgroup_recorded: bool,
    job: JobMark<'_>,
    grace: Duration,
) -> bool {
    if groups.is_empty() {
        return false;
    }
    // Off the reactor: telling a leaderless group reads its members' environments, up to a
    // second each. One deadline for all of them, as for one search by marks.
    let (uid, job_id, attempt) = (job.uid, job.job_id.to_string(), job.attempt);
    let span = tracing::Span::current();
    let judged = tokio::task::spawn_blocking(move || {
        let _entered = span.enter();
        let job = JobMark {
            uid,
            job_id: &job_id,
            attempt,
        };
        let deadline = Instant::now() + MARKS_SEARCH_LIMIT;
        let mut proven = Vec::new();
        let mut unproven = false;
        for group in &groups {
            match judge_group(group, cgroup_recorded, job, deadline) {
                // Signalled at once, as it is proven: from then on the group's existence
                // keeps its id from being given out again.
                Some(leader_alive) => {
                    tracing::warn!(
                        pgid = group.leader.pid,
                        leader_alive,
                        "the job's processes outlived the agent; stopping them"
                    );
                    let pgid = Pid::from_raw(group.leader.pid);
                    let _ = killpg(pgid, Signal::SIGTERM);
                    proven.push(pgid);
                }
                None if !cgroup_recorded
                    && unproven_group(&group.leader, job.uid, group.leads_session) =>
                {
                    // Not signalled (what is unproven may be a stranger's), but never "none
                    // left": the GPU may still be held.
                    tracing::warn!(
                        pgid = group.leader.pid,
                        "processes of the job's user remain in its group, some without the job's marks (an `env -i` child, a retitled worker); not signalled, the GPU is not reported free"
                    );
                    unproven = true;
                }
                None => tracing::info!(
                    pid = group.leader.pid,
                    "the job's first process and its group are gone (or its pid was reused); nothing signalled"
                ),
            }
        }
        (proven, unproven)
    })
    .await;
    let Ok((mut proven, unproven)) = judged else {
        return true;
    };
    // A group once seen gone is never looked at again: while the others' grace runs, its id
    // may be given to a stranger's new group, which the SIGKILL below would reach.
    let there = |g: &Pid| killpg(*g, None).is_ok();
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        proven.retain(there);
        if proven.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for group in &proven {
        let _ = killpg(*group, Signal::SIGKILL);
    }
    let deadline = tokio::time::Instant::now() + KILL_ROUNDS;
    loop {
        proven.retain(there);
        if proven.is_empty() || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unproven || !proven.is_empty()
}

/// Whether `group` provably is the job's, and then whether its leader is alive: its
/// recorded leader still is (pid, start time, boot), or, the leader gone and no cgroup
/// recorded, its members prove it ([`leaderless_group`]). `None`: not signalled.
fn judge_group(
    group: &RecordedGroup,
    cgroup_recorded: bool,
    job: JobMark<'_>,
    deadline: Instant,
) -> Option<bool> {
    if procfs::is_alive(&group.leader) {
        return Some(true);
    }
    (!cgroup_recorded && leaderless_group(&group.leader, job, deadline)).then_some(false)
}

/// What marks a process as the job's: its user, and the `C3_JOB_ID` and `C3_ATTEMPT` the
/// launch put in its environment.
#[derive(Debug, Clone, Copy)]
pub struct JobMark<'a> {
    pub uid: u32,
    pub job_id: &'a str,
    pub attempt: u32,
}

/// Whether process group `leader.pid`, its leader gone, is provably the job's. Pid P is not
/// given out again while a group of that id exists, but a stranger given it after the whole
/// group went may have made one of its own (a double-forking daemon leaves just that: a group
/// and session P whose leader is gone). So there must be members, each started since the
/// leader, the job's user, and carrying the job's own `C3_JOB_ID` and `C3_ATTEMPT` (a
/// process that dropped them is not taken for the job's). The group need not lead a session:
/// a job process's `setpgrp` makes one inside the job's. A member gone while looked at is
/// passed over. Environments are read until `deadline` (one for every group told in a
/// stop); what is left unread then proves nothing.
fn leaderless_group(leader: &c3_proto::ProcIdentity, job: JobMark<'_>, deadline: Instant) -> bool {
    if procfs::boot_id().as_deref() != Some(leader.boot_id.as_str()) {
        return false;
    }
    // Pid P given to another process means group P went with the leader: any group P now
    // is that process's.
    if procfs::stat(leader.pid).is_some_and(|s| s.start_ticks != leader.start_ticks) {
        return false;
    }
    let mut seen = false;
    for (pid, st) in procfs::all() {
        if st.pgrp != leader.pid || st.is_zombie() {
            continue;
        }
        if st.start_ticks < leader.start_ticks {
            return false;
        }
        match job.marks(pid, deadline) {
            // Gone meanwhile.
            Marks::Gone => continue,
            Marks::Marked => seen = true,
            // A member whose environment does not answer proves nothing: the group is left
            // to `unproven_group` (never signalled, counted as survivors).
            Marks::Unmarked | Marks::Unproven => return false,
        }
    }
    seen
}

/// Whether group `leader.pid`, whose leader is gone and which [`leaderless_group`] did not
/// prove the job's, still holds processes of the job's user started since the leader: a job
/// process that dropped its marks keeps it there as surely as a marked one. The recorded
/// leader led its session too (`leads_session`): a group of the same user's whose members
/// are of another session is then a stranger's that took the pid. A group found by marks
/// (a `setpgrp` inside the job's session) does not.
fn unproven_group(leader: &c3_proto::ProcIdentity, uid: u32, leads_session: bool) -> bool {
    if procfs::boot_id().as_deref() != Some(leader.boot_id.as_str())
        || procfs::stat(leader.pid).is_some_and(|s| s.start_ticks != leader.start_ticks)
    {
        return false;
    }
    procfs::all().into_iter().any(|(pid, st)| {
        st.pgrp == leader.pid
            && (!leads_session || st.session == leader.pid)
            && !st.is_zombie()
            && st.start_ticks >= leader.start_ticks
            && real_uid(pid) == Some(uid)
    })
}

/// The most of a process's environment [`JobMark::marks`] reads.
const MAX_ENVIRON_READ: u64 = 16 << 20;

/// How long the read of one process's environment may take. Reading `/proc/<pid>/environ`
/// takes the process's memory lock and faults its pages in: a job process stuck in D state
/// holding that lock, or one that mapped a page of its own FUSE mount over its environment,
/// held the root agent's `recover` for ever (the GPU kept, every later record unrecovered).
const ENVIRON_LOOK_LIMIT: Duration = Duration::from_secs(1);

/// How long one search by marks ([`marked_groups`], [`leaderless_group`]) may wait on
/// environments in all: past it, what is left unread is unproven at once (a job of a
/// thousand such processes cost a thousand seconds, and as many threads).
const MARKS_SEARCH_LIMIT: Duration = Duration::from_secs(10);

/// Processes whose environment a thread of [`read_environ`] is reading and has not come back
/// from: a second look at one waits for nothing and takes no second thread. Written by that
/// thread when its read returns (the process died, or let go of its lock).
static ENVIRON_READS: std::sync::Mutex<BTreeSet<i32>> = std::sync::Mutex::new(BTreeSet::new());

/// What a look at one process's marks found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marks {
    Gone,
    Unmarked,
    Marked,
    /// Its environment did not answer in time: it may be the job's, and it may not.
    Unproven,
}

impl JobMark<'_> {
    /// Whether `pid` carries the job's marks (its user, `C3_JOB_ID`, `C3_ATTEMPT`), read
    /// for at most [`ENVIRON_LOOK_LIMIT`] and not past `deadline`.
    fn marks(&self, pid: i32, deadline: Instant) -> Marks {
        match real_uid(pid) {
            None => return Marks::Gone,
            Some(uid) if uid != self.uid => return Marks::Unmarked,
            Some(_) => {}
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(ENVIRON_LOOK_LIMIT);
        let env = match read_environ(pid, wait, self.job_id) {
            Ok(Some(env)) => env,
            Ok(None) => return Marks::Gone,
            Err(Unanswered) => return Marks::Unproven,
        };
        let id = format!("C3_JOB_ID={}", self.job_id);
        let attempt = format!("C3_ATTEMPT={}", self.attempt);
        let marked = |var: &str| env.split(|&b| b == 0).any(|v| v == var.as_bytes());
        if marked(&id) && marked(&attempt) {
            Marks::Marked
        } else {
            Marks::Unmarked
        }
    }
}

/// A read of a process's environment that did not answer in time.
#[derive(Debug)]
struct Unanswered;

/// The first [`MAX_ENVIRON_READ`] bytes of `pid`'s environment (`None`: it is gone), read on
/// a thread of its own and waited for `wait` at most; a read that does not answer is left to
/// its thread ([`ENVIRON_READS`]). `job_id` is for the fault point of the tests.
fn read_environ(pid: i32, wait: Duration, job_id: &str) -> Result<Option<Vec<u8>>, Unanswered> {
    if wait.is_zero()
        || !ENVIRON_READS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid)
    {
        return Err(Unanswered);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let hangs = crate::fault::armed_at("environ-hangs", job_id);
    let reader = std::thread::Builder::new()
        .name("c3-environ".into())
        .spawn(move || {
            // As a read held by the process's memory lock: for as long as it lives.
            let until = Instant::now() + Duration::from_secs(3600);
            while hangs && procfs::stat(pid).is_some() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
            // The job sizes its own environment (up to a quarter of its stack limit,
            // gigabytes under `ulimit -s unlimited`): the launch's marks are read from the
            // first 16 MiB.
            let read = std::fs::File::open(format!("/proc/{pid}/environ")).and_then(|f| {
                let mut env = Vec::new();
                std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_ENVIRON_READ), &mut env)
                    .map(|_| env)
            });
            ENVIRON_READS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&pid);
            let _ = tx.send(read.ok());
        });
    if reader.is_err() {
        ENVIRON_READS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
        return Err(Unanswered);
    }
    rx.recv_timeout(wait).map_err(|_| Unanswered)
}

/// The process groups of a job no cgroup holds, found by their marks: the groups (the
/// leader's, and those a job process made with `setsid` or `setpgrp`) that hold a process
/// started after `since` (clock ticks of boot `boot`: the leader's start, or the agent's
/// when the agent died before recording a leader) that carries the job's marks. Each comes
/// as its leader's identity, or, with the leader gone, as one [`stop_recorded_groups`] takes for a
/// leaderless group (it checks every member's marks again before it signals).
pub fn marked_groups(job: JobMark<'_>, since: u64, boot: Option<&str>) -> MarkedGroups {
    let mut found = MarkedGroups::default();
    let Some(now) = procfs::boot_id() else {
        return found;
    };
    if boot.is_some_and(|b| b != now) {
        // Nothing of an earlier boot runs.
        return found;
    }
    let deadline = Instant::now() + MARKS_SEARCH_LIMIT;
    let procs = procfs::all();
    let mut groups = BTreeSet::new();
    for (pid, st) in &procs {
        if st.start_ticks < since || st.is_zombie() {
            continue;
        }
        match job.marks(*pid, deadline) {
            Marks::Marked => {
                groups.insert(st.pgrp);
            }
            Marks::Unproven => found.unproven = true,
            Marks::Gone | Marks::Unmarked => {}
        }
    }
    for group in groups {
        match procs.get(&group) {
            // A live leader is signalled with its whole group: it must carry the marks too
            // (another user's process leading the group a marked one sits in is not the
            // job's, even if only its own user could have put the marks there).
            Some(st) if st.start_ticks >= since => match job.marks(group, deadline) {
                Marks::Marked => found.groups.extend(procfs::identity(group)),
                // A marked process sits in the group, and its leader cannot be told: never
                // signalled, but the job may still hold the GPU.
                Marks::Unproven => found.unproven = true,
                Marks::Gone | Marks::Unmarked => {}
            },
            // A leader that started before `since` or is unmarked: a stranger's.
            Some(_) => {}
            None => found.groups.push(c3_proto::ProcIdentity {
                pid: group,
                start_ticks: since,
                boot_id: now.clone(),
            }),
        }
    }
    found
}

/// What [`marked_groups`] found.
#[derive(Debug, Default)]
pub struct MarkedGroups {
    /// Each group's leader, or one [`stop_recorded_groups`] takes for a leaderless group.
    pub groups: Vec<c3_proto::ProcIdentity>,
    /// A process of the job's user, started since, whose environment did not answer in time
    /// ([`ENVIRON_LOOK_LIMIT`]): never signalled (it may be a stranger's), but the job may be
    /// holding the GPU through it.
    pub unproven: bool,
}

/// The real uid of `pid` (`/proc/<pid>/status`): the directory's owner is root for a
/// process that made itself non-dumpable.
fn real_uid(pid: i32) -> Option<u32> {
    // Lossy: its `Name:` line is the process's own to set, in any bytes.
    let status = std::fs::read(format!("/proc/{pid}/status")).ok()?;
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {

    /// A job's cgroup is held below what the node can number (a fork bomb took every pid of
    /// the node); a limit already lower is kept, and a cgroup without the controller is left.
    #[test]
    fn a_jobs_cgroup_is_held_below_the_nodes_pids() {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        };
        let node = read("/proc/sys/kernel/pid_max").min(read("/proc/sys/kernel/threads-max"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pids.max");
        std::fs::write(&file, "max\n").unwrap();
        limit_pids(dir.path());
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            (node / 10 * 9).to_string()
        );
        std::fs::write(&file, "100\n").unwrap();
        limit_pids(dir.path());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "100\n");
        let without = tempfile::tempdir().unwrap();
        limit_pids(without.path());
        assert!(!without.path().join("pids.max").exists());
    }

    /// A recorded cgroup `recover` may not stop (a cgroup2 mounted elsewhere when its agent
    /// made it) that still holds processes is not taken for empty: the job's processes
    /// counted as gone, and the GPU they held as free.
    #[tokio::test]
    async fn a_recorded_cgroup_it_may_not_stop_is_not_taken_for_empty() {
        let dir = tempfile::tempdir().unwrap();
        let cg = dir.path().join("c3-j-1-999");
        std::fs::create_dir(&cg).unwrap();
        std::fs::write(cg.join("cgroup.procs"), "4242\n").unwrap();
        std::fs::write(cg.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let job = JobMark {
            uid: 65534,
            job_id: "j",
            attempt: 1,
        };
        let path = cg.display().to_string();
        assert!(!is_agents_cgroup(&path));
        let left = stop_recorded(None, Some(&path), job, Duration::from_millis(10), true).await;
        assert!(left, "taken for empty");
    }

    /// A look that cannot be made (no fd left to the agent: a low hard limit, uploads holding
    /// the rest) is no answer: the job counted as gone before any SIGKILL round, and
    /// FINALIZING said its GPU was free.
    #[test]
    fn a_look_that_cannot_be_made_is_not_the_job_gone() {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("cgroup.events")).unwrap();
        assert!(
            Cgroup {
                dir: dir.path().to_path_buf()
            }
            .populated(),
            "EISDIR taken for empty"
        );
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let procs = JobProcesses::new(child.id() as i32, None);
        assert!(!procs.gone());
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, 256.min(soft), hard).unwrap();
        let mut held = Vec::new();
        while let Ok(fd) = nix::unistd::dup(std::io::stdin()) {
            held.push(fd);
        }
        let gone = procs.gone();
        drop(held);
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(!gone, "taken for gone with no fd left");
    }

    use super::*;

    /// A look at `/proc` that read nothing marks no process of the job gone: marked, an OOM
    /// kill of each later was not counted.
    #[test]
    fn a_look_that_read_nothing_marks_nothing_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let procs = JobProcesses::new(i32::MAX, None);
        procs.reap();
        procs.mark_gone(&Default::default(), procfs::now_micros());
        let seen = procs.inner.seen.lock().unwrap().get(&pid).copied();
        assert!(matches!(seen, Some((_, None))), "{seen:?}");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// A process of the job the reaper saw is marked gone when a look no longer finds it:
    /// a kernel-log OOM record of its pid after that is another process's.
    #[test]
    fn a_process_seen_gone_is_marked_with_when() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let procs = JobProcesses::new(i32::MAX, None);
        procs.reap();
        let seen = |procs: &JobProcesses| procs.inner.seen.lock().unwrap().get(&pid).copied();
        assert!(
            matches!(seen(&procs), Some((_, None))),
            "{:?}",
            seen(&procs)
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let before = procfs::now_micros();
        procs.reap();
        let gone = seen(&procs).and_then(|s| s.1).expect("marked gone");
        assert!(gone >= before);
    }

    /// A pid whose process is not the one a look saw (another start: the pid changed hands
    /// since) gets no signal; the process seen does.
    #[test]
    fn a_signal_reaches_only_the_process_seen() {
        use std::os::unix::process::ExitStatusExt;
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = procfs::stat(pid).unwrap().start_ticks;
        let stranger = Seen {
            pid,
            start: start + 1,
        };
        assert!(!signal_seen(stranger, Signal::SIGKILL));
        std::thread::sleep(Duration::from_millis(100));
        assert!(child.try_wait().unwrap().is_none(), "a stranger was killed");
        assert!(signal_seen(Seen { pid, start }, Signal::SIGKILL));
        assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    }

    /// Starts `command`, which prints a pid as its first line and goes on running; the child
    /// and that pid.
    fn first_line_pid(command: &mut std::process::Command) -> (std::process::Child, i32) {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let pid = line.trim().parse().unwrap();
        (child, pid)
    }

    /// Runs `script` (which prints its pid and leaves processes behind) as the leader of a
    /// session and group of its own (`setsid`), with `env`; returns that group once the
    /// leader is gone.
    fn gone_leaders_group(script: &str, env: &[(&str, &str)]) -> i32 {
        let mut leader = std::process::Command::new("setsid")
            .args(["sh", "-c", script])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(leader.stdout.as_mut().unwrap(), &mut out).unwrap();
        let _ = leader.wait();
        let group: i32 = out.trim().parse().unwrap();
        // Each member forked before the leader's echo, but may still be a copy of the shell
        // (with its marks) before its exec: a look then judged an `env -i` member marked.
        for _ in 0..500 {
            let execd = procfs::all()
                .into_iter()
                .filter(|(_, s)| s.pgrp == group)
                .all(|(pid, _)| {
                    std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
                });
            if execd {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        group
    }

    /// A gone leader's group that still holds a process of the job's user without the
    /// marks (an `env -i` child) is not signalled, and not reported empty either: it said
    /// "nothing signalled", and `recover` reported the GPU free.
    #[tokio::test]
    async fn a_group_that_cannot_be_proven_the_jobs_is_not_reported_empty() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        let p = gone_leaders_group(
            "sleep 30 >/dev/null & env -i sleep 30 >/dev/null & echo $$",
            &[("C3_JOB_ID", "unproven"), ("C3_ATTEMPT", "1")],
        );
        let recorded = c3_proto::ProcIdentity {
            pid: p,
            start_ticks: before.start_ticks,
            boot_id: before.boot_id.clone(),
        };
        let job = JobMark {
            uid,
            job_id: "unproven",
            attempt: 1,
        };
        let left =
            stop_recorded(Some(&recorded), None, job, Duration::from_millis(100), true).await;
        let there = killpg(Pid::from_raw(p), None).is_ok();
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
        assert!(there, "nothing unproven is signalled");
        assert!(
            left,
            "a group still holding the job's processes was reported empty"
        );
    }

    /// A group found by its marks inside the job's session (a `setpgrp`), its leader gone,
    /// holding a marked process and one that dropped the marks (`env -i`): not signalled,
    /// but counted as survivors. Its members are not of a session it leads, which made it
    /// read as a stranger's: "nothing signalled", the GPU reported free.
    #[tokio::test]
    async fn a_marked_group_inside_the_jobs_session_is_not_reported_empty() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        let python = "import os, subprocess\nos.setpgrp()\nsubprocess.Popen(['sleep', '30'])\nsubprocess.Popen(['env', '-i', 'sleep', '30'])\nprint(os.getpid(), flush=True)\n";
        let mut setsid = std::process::Command::new("setsid");
        setsid
            .args(["sh", "-c", "/usr/bin/python3 -c \"$PY\"; sleep 30"])
            .env("PY", python)
            .envs([("C3_JOB_ID", "grouped"), ("C3_ATTEMPT", "1")]);
        let (mut shell, g) = first_line_pid(&mut setsid);
        // The group's leader (python) is gone once it printed and exited.
        for _ in 0..100 {
            if procfs::stat(g).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let job = JobMark {
            uid,
            job_id: "grouped",
            attempt: 1,
        };
        let found = marked_groups(job, before.start_ticks, Some(&before.boot_id));
        let synthetic = found.groups.iter().find(|l| l.pid == g).cloned();
        let left = match &synthetic {
            Some(l) => stop_recorded(Some(l), None, job, Duration::from_millis(100), false).await,
            None => false,
        };
        let _ = killpg(Pid::from_raw(g), Signal::SIGKILL);
        let _ = killpg(Pid::from_raw(shell.id() as i32), Signal::SIGKILL);
        let _ = shell.wait();
        assert!(
            synthetic.is_some(),
            "the marked group was not found: {found:?}"
        );
        assert!(
            left,
            "a job group holding an unmarked process was reported empty"
        );
    }

    /// A job process that started a session of its own (`setsid`, a daemon's start) left
    /// the leader's group; with no cgroup it is found by its marks.
    #[test]
    fn a_marked_process_in_a_session_of_its_own_is_found() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        let job = JobMark {
            uid,
            job_id: "daemon",
            attempt: 2,
        };
        let mut setsid = std::process::Command::new("setsid");
        setsid
            .args(["sh", "-c", "echo $$; exec sleep 30"])
            .envs([("C3_JOB_ID", "daemon"), ("C3_ATTEMPT", "2")]);
        let (mut daemon, p) = first_line_pid(&mut setsid);
        let found = marked_groups(job, before.start_ticks, Some(&before.boot_id));
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
        let _ = daemon.wait();
        assert!(found.groups.iter().any(|l| l.pid == p), "{found:?}");
    }

    /// A job process whose environment does not answer (its memory lock held: D state, a
    /// page of its own FUSE mount over its environment) is neither signalled nor waited for:
    /// the search answers within its limits and counts it as unproven. The read took the
    /// root agent's `recover` for ever.
    #[test]
    fn a_process_whose_environment_hangs_is_unproven_not_waited_for() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        let mut setsid = std::process::Command::new("setsid");
        setsid
            .args(["sh", "-c", "sleep 30 & echo $$; exec sleep 30"])
            .envs([("C3_JOB_ID", "hung-environ"), ("C3_ATTEMPT", "1")]);
        let (mut daemon, p) = first_line_pid(&mut setsid);
        let _hangs = crate::fault::arm("environ-hangs", "hung-environ");
        let (tx, rx) = std::sync::mpsc::channel();
        let boot = before.boot_id.clone();
        std::thread::spawn(move || {
            let job = JobMark {
                uid,
                job_id: "hung-environ",
                attempt: 1,
            };
            let began = Instant::now();
            let found = marked_groups(job, before.start_ticks, Some(&boot));
            let recorded = c3_proto::ProcIdentity {
                pid: p,
                start_ticks: before.start_ticks,
                boot_id: boot.clone(),
            };
            // Asked again, as `stop_recorded` asks of a leaderless group: the read still
            // under way is not waited for again.
            let proven = leaderless_group(&recorded, job, Instant::now() + MARKS_SEARCH_LIMIT);
            let _ = tx.send((found, proven, began.elapsed()));
        });
        let answered = rx.recv_timeout(Duration::from_secs(30));
        let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
        let _ = daemon.wait();
        let (found, proven, took) = answered.expect("the search by marks did not answer");
        assert!(found.unproven, "{found:?}");
        assert!(!found.groups.iter().any(|l| l.pid == p), "{found:?}");
        assert!(
            !proven,
            "a group whose members could not be read was proven the job's"
        );
        assert!(
            took < MARKS_SEARCH_LIMIT * 2 + Duration::from_secs(2),
            "the searches took {took:?}"
        );
    }

    /// The agent's own helpers (the unit check's `systemctl`) do not make its cgroup
    /// shared; a stranger's process does.
    #[tokio::test]
    async fn the_agents_helpers_leave_it_alone_in_its_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("helper-pid");
        let mut command = std::process::Command::new("sh");
        command.args([
            "-c",
            &format!("echo $$ > {}; exec sleep 5", pidfile.display()),
        ]);
        // Dropped at the end: the helper is killed then.
        let asking = tokio::spawn(crate::helper::ask(command, Duration::from_secs(30)));
        let mut helper = None;
        for _ in 0..500 {
            helper = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if helper.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let helper = helper.expect("the helper never started");
        let me = std::process::id();
        let procs = dir.path().join("cgroup.procs");
        std::fs::write(&procs, format!("{me}\n{helper}\n")).unwrap();
        let with_helper = alone_in(dir.path());
        std::fs::write(&procs, format!("{me}\n1\n")).unwrap();
        let with_stranger = alone_in(dir.path());
        asking.abort();
        assert!(
            with_helper,
            "a helper of the agent's made its cgroup shared"
        );
        assert!(!with_stranger);
    }

    /// A session found by its marks after an agent died mid-launch is signalled whole only
    /// if its live leader carries the marks too: a marked process in a stranger's group
    /// does not make the group the job's.
    #[test]
    fn a_marked_group_is_the_jobs_only_if_its_leader_is_marked_too() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        let job = JobMark {
            uid,
            job_id: "launched",
            attempt: 3,
        };
        // A session whose live leader carries no marks, a marked process in its group; then
        // one whose leader carries them.
        for (leader_env, ours) in [("", false), ("C3_JOB_ID=launched C3_ATTEMPT=3", true)] {
            let script = "C3_JOB_ID=launched C3_ATTEMPT=3 sleep 30 & echo $$; exec sleep 30";
            let mut setsid = std::process::Command::new("setsid");
            setsid
                .args(["env", "-i"])
                .args(leader_env.split_whitespace())
                .args(["sh", "-c", script]);
            let (mut leader, p) = first_line_pid(&mut setsid);
            // The background sleep is in the group once the shell has printed its pid.
            let found = marked_groups(job, before.start_ticks, Some(&before.boot_id));
            let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
            let _ = leader.wait();
            assert_eq!(
                found.groups.iter().any(|l| l.pid == p),
                ours,
                "leader env {leader_env:?}: {found:?}"
            );
        }
    }

    /// A group whose leader is gone is the job's only if its members carry the job's marks:
    /// a stranger's session of the same user (a double-forking daemon's, with no
    /// `C3_JOB_ID`) is not, nor another job's or attempt's.
    #[test]
    fn a_leaderless_group_is_the_jobs_only_by_its_marks() {
        let uid = nix::unistd::getuid().as_raw();
        let before = procfs::identity(std::process::id() as i32).unwrap();
        for (env, ours) in [
            (vec![], false),
            (vec![("C3_JOB_ID", "other"), ("C3_ATTEMPT", "1")], false),
            (vec![("C3_JOB_ID", "j"), ("C3_ATTEMPT", "2")], false),
            (vec![("C3_JOB_ID", "j"), ("C3_ATTEMPT", "1")], true),
        ] {
            let p = gone_leaders_group("sleep 30 >/dev/null & echo $$", &env);
            let recorded = c3_proto::ProcIdentity {
                pid: p,
                start_ticks: before.start_ticks,
                boot_id: before.boot_id.clone(),
            };
            let job = JobMark {
                uid,
                job_id: "j",
                attempt: 1,
            };
            let found = leaderless_group(&recorded, job, Instant::now() + MARKS_SEARCH_LIMIT);
            let _ = killpg(Pid::from_raw(p), Signal::SIGKILL);
            assert_eq!(found, ours, "{env:?}");
        }
    }

    #[test]
    fn a_record_may_name_only_a_cgroup_the_agent_makes() {
        for job in [
            "c3-j-1-42",
            "c3-agent42-1-999",
            "c3-agent-2-7",
            "c3-a-b-3-4",
        ] {
            let path = format!("/sys/fs/cgroup/system.slice/c3-agent@j.service/{job}");
            assert!(is_agents_cgroup(&path), "{path}");
        }
        for other in [
            "/sys/fs/cgroup/system.slice/c3-agent@j.service/c3-",
            "/sys/fs/cgroup/system.slice/c3-agent@j.service/c3-1-2",
            "/sys/fs/cgroup/system.slice/c3-agent@j.service/c3-j-x-2",
            "/sys/fs/cgroup/system.slice/sshd.service",
            "/sys/fs/cgroup/c3-x/../system.slice",
            "/tmp/c3-j-1-42",
            "/sys/fs/cgroup",
            "/sys/fs/cgroup/system.slice/c3-agent@j.service/c3-agent",
        ] {
            assert!(!is_agents_cgroup(other), "{other}");
        }
    }

    #[test]
    fn contains_agrees_with_members_for_one_process() {
        // This test process plays the agent: a shell it started, and the shell's child.
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(shell.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let grandchild: i32 = line.trim().parse().unwrap();
        let procs = JobProcesses::new(shell.id() as i32, None);
        let members = procs.members();
        for pid in [shell.id() as i32, grandchild] {
            assert!(members.contains(&pid) && procs.contains(pid), "{pid}");
        }
        for pid in [std::process::id() as i32, 1, 0, -1] {
            assert!(!members.contains(&pid) && !procs.contains(pid), "{pid}");
        }
        let _ = kill(Pid::from_raw(grandchild), Signal::SIGKILL);
        let _ = shell.kill();
        let _ = shell.wait();
    }
}
