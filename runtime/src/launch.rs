//! Starting the user's script: its environment (without the agent's credentials),
//! its own session and process group, its user; and stopping the whole group.
//!
//! std's spawn blocks until the child's execve returns, which for a command (or a PATH
//! entry, or a `#!` interpreter) on a hung NFS mount or a FUSE mount nobody serves is never:
//! [`start`] runs it off the reactor and gives up on a stop or after [`LAUNCH_DEADLINE`],
//! killing the child by the pid it reported first thing.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// How long a launch may take, from fork to execve's return, before it is taken as stuck.
/// A healthy execve takes milliseconds and a cold network mount answers within seconds; one
/// that has not returned in a minute waits on a server that does not answer (a hung NFS
/// mount, a FUSE server that is stopped or is the job user's own process) and may never
/// return. That is the node's state, not the script's: AGENT_ERROR, retryable elsewhere.
pub const LAUNCH_DEADLINE: Duration = Duration::from_secs(60);

/// How long a stuck launch's child has to die of SIGKILL and be reaped. One asleep in the
/// kernel on a hard NFS mount may not: it is left (in the job's cgroup, for `recover`).
const KILLED_WITHIN: Duration = Duration::from_secs(5);

/// Prefixes of variables that carry the agent's credentials or configuration.
const SECRET_PREFIXES: &[&str] = &["AWS_", "AZURE_", "GOOGLE_", "C3_AGENT_"];
/// Single variables that point at credentials (systemd's LoadCredential= dir) or at the
/// agent's own channels to systemd: a job holding NOTIFY_SOCKET could report READY or a
/// STATUS in the agent's name, or feed its watchdog.
const SECRET_NAMES: &[&str] = &[
    "CREDENTIALS_DIRECTORY",
    // object_store's GCS builder reads the key file's path from it, unprefixed.
    "SERVICE_ACCOUNT",
    "NOTIFY_SOCKET",
    "WATCHDOG_PID",
    "WATCHDOG_USEC",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    // Azure managed identity on App Service, Container Apps and Arc: object_store's Azure
    // builder sends IDENTITY_HEADER as the secret that buys a token from IDENTITY_ENDPOINT.
    "IDENTITY_HEADER",
    "IDENTITY_ENDPOINT",
    "MSI_SECRET",
    "MSI_ENDPOINT",
    "IMDS_ENDPOINT",
];

/// A proxy the agent reaches its store through may carry the operator's login
/// (`http://svc:pass@proxy:3128`): the job keeps the proxy, not the login.
fn is_proxy_var(name: &[u8]) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(b"_proxy") && lower != b"no_proxy"
}

/// `scheme://user:pass@host:port/path` without `user:pass@` (and the same without a scheme).
fn without_userinfo(value: &[u8]) -> Option<Vec<u8>> {
    let start = value
        .windows(3)
        .position(|w| w == b"://")
        .map_or(0, |i| i + 3);
    let end = value[start..]
        .iter()
        .position(|&b| matches!(b, b'/' | b'?' | b'#'))
        .map_or(value.len(), |i| start + i);
    let at = value[start..end].iter().rposition(|&b| b == b'@')?;
    let mut out = value[..start].to_vec();
    out.extend_from_slice(&value[start + at + 1..]);
    Some(out)
}

/// Who the agent's environment says it is (its login, its session, its own places): a job of
/// another user gets none of it. Under sudo or cron `USER=root` made `getpass.getuser()` say
/// root, and tools keyed on it (PyTorch's `/tmp/torchinductor_$USER` cache) shared one place
/// across tenants; root's `XDG_CACHE_HOME=/root/.cache` or a private `TMPDIR` (pam_tmpdir's
/// `/tmp/user/0`) sent the job's caches and temp files where it may not write; root's
/// Kerberos ticket cache is root's; `PWD`/`OLDPWD` are where the agent was started.
const IDENTITY_NAMES: &[&str] = &[
    "USER",
    "LOGNAME",
    "HOME",
    "SHELL",
    "MAIL",
    "PWD",
    "OLDPWD",
    "TMPDIR",
    "KRB5CCNAME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_STATE_HOME",
    "XDG_RUNTIME_DIR",
    "XDG_SESSION_ID",
    "XDG_SESSION_TYPE",
    "XDG_SESSION_CLASS",
    "XDG_SEAT",
    "XDG_VTNR",
    "DBUS_SESSION_BUS_ADDRESS",
    "XAUTHORITY",
    "SSH_AUTH_SOCK",
];

/// The variables the agent gives every job, over any the spec names ([`child_env`]).
pub const AGENT_SETS: [&str; 5] = [
    "C3_ARTIFACTS_DIR",
    "C3_JOB_ID",
    "C3_ATTEMPT",
    "C3_RESULT_FILE",
    "C3_AGENT_SOCKET",
];

/// The child's environment: the agent's minus its credentials (and, for a job of a `user`,
/// minus the agent's identity, replaced by that user's `USER`, `LOGNAME`, `HOME`, `SHELL`),
/// then the spec's `env` (which wins over all of that), then the job variables the contract
/// promises.
pub fn child_env(
    agent_env: impl IntoIterator<Item = (OsString, OsString)>,
    token: Option<&str>,
    run_as: Option<&RunAs>,
    spec_env: &BTreeMap<String, String>,
    job_vars: &[(&str, String)],
) -> BTreeMap<OsString, OsString> {
    let token = token.filter(|t| !t.is_empty());
    let mut env: BTreeMap<OsString, OsString> = agent_env
        .into_iter()
        .filter(|(k, v)| {
            let name = k.as_bytes();
            let secret_name = SECRET_PREFIXES
                .iter()
                .any(|p| name.starts_with(p.as_bytes()))
                || SECRET_NAMES.iter().any(|n| name == n.as_bytes());
            // A variable that happens to hold the bearer token leaks it just the same.
            let holds_token =
                token.is_some_and(|t| v.as_bytes().windows(t.len()).any(|w| w == t.as_bytes()));
            !(secret_name || holds_token)
        })
        .map(|(k, v)| {
            let bare = is_proxy_var(k.as_bytes())
                .then(|| without_userinfo(v.as_bytes()))
                .flatten();
            (k, bare.map_or(v, OsString::from_vec))
        })
        .collect();
    if let Some(user) = run_as {
        // A non-root agent naming its own user keeps its session (the same user's).
        if user.uid != nix::unistd::geteuid().as_raw() {
            env.retain(|k, _| {
                let name = k.as_bytes();
                !(IDENTITY_NAMES.iter().any(|n| name == n.as_bytes()) || name.starts_with(b"SUDO_"))
            });
        }
        env.insert("USER".into(), user.name.clone().into());
        env.insert("LOGNAME".into(), user.name.clone().into());
        env.insert("HOME".into(), user.home.clone().into());
        // A service account's `nologin` is no shell to run: tools that start `$SHELL` (vim's
        // `:!`, tmux, a Jupyter terminal) would fail with "account not available".
        if is_a_shell(&user.shell) {
            env.insert("SHELL".into(), user.shell.clone().into());
        }
    }
    env.insert("PYTHONUNBUFFERED".into(), "1".into());
    for (k, v) in spec_env {
        env.insert(k.into(), v.into());
    }
    for (k, v) in job_vars {
        env.insert((*k).into(), v.into());
    }
    env
}

/// Who the script runs as.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Primary and supplementary groups (`initgroups`): `video`, `render` or `rdma`
    /// membership is what opens `/dev/nvidia*` and `/dev/infiniband/*` on many hosts.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    /// The login shell (`SHELL` in the job's environment; empty: unset).
    pub shell: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("user `{0}` does not exist")]
    NoSuchUser(String),
    #[error("cannot look up user `{name}`")]
    UserLookup {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("running the job as user `{0}` needs the agent to run as root")]
    NotRoot(String),
    /// A step of the agent's between fork and execve failed (a node that may not switch
    /// users, a cgroup that refuses the process): the node's fault, whatever the errno.
    #[error("cannot start `{program}`: {step} failed")]
    Setup {
        program: String,
        step: Step,
        #[source]
        source: std::io::Error,
    },
    /// execve itself failed: the command (or its `#!` interpreter) is missing or not
    /// executable, or the node is short of memory.
    #[error("cannot start `{program}`")]
    Exec {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The launch did not end within [`LAUNCH_DEADLINE`]: execve never returned.
    #[error("`{program}` did not start within {secs} s: execve never returned (is the command, a directory on PATH or its interpreter on a hung network mount or an unanswered FUSE mount?); its process was killed")]
    Stuck {
        program: String,
        secs: u64,
        /// The stuck process, if it said its pid.
        pid: Option<i32>,
    },
    /// A stop came before the script was started, or while its launch was stuck.
    #[error("stopped before `{program}` was started")]
    Canceled { program: String },
}

/// The steps of a launch between fork and execve, in order. The child names each on a
/// close-on-exec pipe before it takes it: std returns every error before execve through
/// the same channel as execve's own, and an EPERM from `setuid` (a pod without
/// CAP_SETUID) must not read as a script that is not executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// std's own preparation of the child (its stdio), before any step of the agent's.
    Fork = b'f',
    Session = b's',
    Cgroup = b'c',
    Workdir = b'w',
    Keyring = b'k',
    Groups = b'G',
    Group = b'g',
    User = b'u',
    /// Every step of the agent's is done: what fails now is execve.
    Exec = b'x',
}

impl Step {
    fn from_code(code: u8) -> Option<Step> {
        [
            Step::Fork,
            Step::Session,
            Step::Cgroup,
            Step::Workdir,
            Step::Keyring,
            Step::Groups,
            Step::Group,
            Step::User,
            Step::Exec,
        ]
        .into_iter()
        .find(|s| *s as u8 == code)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Fork => "preparing the child",
            Step::Session => "setsid",
            Step::Cgroup => "moving into the job's cgroup",
            Step::Workdir => "fchdir into the workdir",
            Step::Keyring => "joining a session keyring of its own",
            Step::Groups => "setgroups",
            Step::Group => "setgid",
            Step::User => "setuid",
            Step::Exec => "execve",
        })
    }
}

/// What the child said on its pipe: its pid (4 bytes, first of all), then one [`Step`] code
/// before each step.
#[derive(Default)]
struct Heard(Vec<u8>);

impl Heard {
    const PID_BYTES: usize = std::mem::size_of::<libc::pid_t>();

    fn pid(&self) -> Option<i32> {
        let bytes = self.0.get(..Self::PID_BYTES)?;
        Some(libc::pid_t::from_ne_bytes(bytes.try_into().ok()?))
    }

    /// The last step the child reached.
    fn last_step(&self) -> Step {
        self.0
            .get(Self::PID_BYTES..)
            .and_then(|steps| steps.iter().rev().find_map(|b| Step::from_code(*b)))
            .unwrap_or(Step::Fork)
    }

    /// Takes what the pipe holds now, without waiting: after std's spawn returned its error
    /// the child is gone (reaped) and all it said is there. Read from the fd itself: tokio's
    /// `try_read` answers "would block" from its cached readiness without a syscall, and the
    /// last byte (the step execve failed at) may not have reached the reactor yet: a missing
    /// command (127, the script's error) read as the node's (retried for ever).
    fn take_rest(&mut self, pipe: &impl std::os::fd::AsFd) {
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = nix::unistd::read(pipe.as_fd(), &mut buf) {
            self.0.extend_from_slice(&buf[..n]);
        }
    }
}

impl RunAs {
    pub fn lookup(name: &str) -> Result<Self, LaunchError> {
        let lookup_err = |source| LaunchError::UserLookup {
            name: name.into(),
            source,
        };
        let user = nix::unistd::User::from_name(name)
            .map_err(lookup_err)?
            .ok_or_else(|| LaunchError::NoSuchUser(name.into()))?;
        if !nix::unistd::geteuid().is_root() && user.uid != nix::unistd::geteuid() {
            return Err(LaunchError::NotRoot(name.into()));
        }
        let cname = std::ffi::CString::new(name).map_err(|_| lookup_err(nix::Error::EINVAL))?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .map_err(lookup_err)?
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        Ok(RunAs {
            name: name.into(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups,
            home: user.dir,
            shell: user.shell,
        })
    }

    /// The identity the kernel checks the job's file accesses against.
    pub fn reader(&self) -> crate::confine::JobReader {
        crate::confine::JobReader {
            uid: self.uid,
            gids: self.groups.clone(),
        }
    }
}

/// What a launch needs, owned: the fork runs on a blocking thread that may outlive the
/// caller's wait for it.
pub struct LaunchPlan {
    pub command: Vec<String>,
    /// The workdir, already opened safely: the child `fchdir`s into it.
    pub workdir: crate::confine::DirFd,
    pub env: BTreeMap<OsString, OsString>,
    pub run_as: Option<RunAs>,
    /// `cgroup.procs` of the job's cgroup: the child moves itself there before exec.
    pub cgroup_procs: Option<std::fs::File>,
    /// The umask the job gets (the agent's own is private).
    pub umask: u32,
    /// The child blocks where execve would, never returning (debug builds' fault point
    /// `exec-hangs`, for the tests of a stuck launch). Decided before the fork: the child
    /// may make syscalls only.
    pub hang_before_exec: bool,
    /// The flocks the agent holds ([`crate::statedir::held_flocks`]): fd, device, inode.
    /// The child closes each before its execve, which may hang for a minute (a hung mount).
    pub drop_in_child: Vec<(i32, u64, u64)>,
}

/// Starts the script, off the reactor: std's spawn returns only once execve did. Gives up
/// on `cancel` or after `within` (the caller passes [`LAUNCH_DEADLINE`]), killing the child,
/// which then never ran anything of the job's (it is alone: nothing of the job ran to fork).
/// A stop already requested starts nothing.
///
/// `spawned` hears the child's pid as soon as the child says it, long before a stuck execve
/// returns: an agent that dies meanwhile leaves its record naming the process.
pub async fn start(
    plan: LaunchPlan,
    cancel: &CancellationToken,
    within: Duration,
    mut spawned: Option<tokio::sync::oneshot::Sender<i32>>,
) -> Result<Script, LaunchError> {
    let program = plan.command[0].clone();
    if cancel.is_cancelled() {
        return Err(LaunchError::Canceled { program });
    }
    let setup = |source: std::io::Error| LaunchError::Setup {
        program: program.clone(),
        step: Step::Fork,
        source,
    };
    // Where the child names its pid and steps (close-on-exec: execve closes it).
    // Non-blocking: the child never waits on it, nor does the agent once the child is gone.
    let (heard_fd, said) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
            .map_err(|e| setup(e.into()))?;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(heard_fd).map_err(setup)?;
    // Set once the launch is given up: a blocking thread that has not forked yet never will.
    let abandoned = Arc::new(AtomicBool::new(false));
    let mut spawning = {
        let abandoned = abandoned.clone();
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            // tokio's Command registers the child and its pipes with this runtime.
            let _in = runtime.enter();
            if abandoned.load(Ordering::SeqCst) {
                let program = plan.command[0].clone();
                return Err(LaunchError::Canceled { program });
            }
            let spawned = spawn(plan, &said);
            // The child has its own copy until execve (or its end): the pipe ends then.
            drop(said);
            spawned
        })
    };
    let mut heard = Heard::default();
    let mut pipe_open = true;
    let mut buf = [0u8; 64];
    let give_up = tokio::time::sleep(within);
    tokio::pin!(give_up);
    let stuck = loop {
        tokio::select! {
            // A launch that is done counts even when a stop came at the same moment: the
            // supervisor then stops the job like any other.
            biased;
            spawned = &mut spawning => {
                let spawned = spawned.map_err(|e| setup(std::io::Error::other(e)))?;
                return spawned.map_err(|e| match e {
                    LaunchError::Exec { program, source } => {
                        heard.take_rest(&pipe);
                        match heard.last_step() {
                            Step::Exec => LaunchError::Exec { program, source },
                            step => LaunchError::Setup { program, step, source },
                        }
                    }
                    other => other,
                });
            }
            () = cancel.cancelled() => break false,
            () = &mut give_up => break true,
            read = pipe.read(&mut buf), if pipe_open => match read {
                Ok(n @ 1..) => {
                    heard.0.extend_from_slice(&buf[..n]);
                    if let Some(pid) = heard.pid() {
                        if let Some(tx) = spawned.take() {
                            let _ = tx.send(pid);
                        }
                    }
                }
                _ => pipe_open = false,
            },
        }
    };
    abandoned.store(true, Ordering::SeqCst);
    // The pid is the first thing the child says: a stop in the first moment may come
    // before it (or before the fork, which then never happens).
    let _ = tokio::time::timeout(KILLED_WITHIN, async {
        while pipe_open && heard.pid().is_none() {
            match pipe.read(&mut buf).await {
                Ok(n @ 1..) => heard.0.extend_from_slice(&buf[..n]),
                _ => pipe_open = false,
            }
        }
    })
    .await;
    let pid = heard.pid();
    if let Some(pid) = pid {
        kill_own_child(pid);
    }
    match tokio::time::timeout(KILLED_WITHIN, &mut spawning).await {
        Ok(Ok(Ok(mut script))) => {
            // Dead of the SIGKILL above (or, started just now, killed here): reaped.
            let group = nix::unistd::Pid::from_raw(script.pid);
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
            let _ = script.child.start_kill();
            if tokio::time::timeout(KILLED_WITHIN, script.child.wait())
                .await
                .is_err()
            {
                tracing::error!(
                    pid = script.pid,
                    "the abandoned launch's process does not die of SIGKILL; left behind"
                );
            }
        }
        // std waited for it.
        Ok(_) => {}
        Err(_) => tracing::error!(
            pid,
            "the abandoned launch's process does not die of SIGKILL (asleep in the kernel on a hung mount?); left behind"
        ),
    }
    Err(if stuck {
        LaunchError::Stuck {
            program,
            secs: within.as_secs(),
            pid,
        }
    } else {
        LaunchError::Canceled { program }
    })
}

/// This process's `oom_score_adj` (0 where it cannot be read).
fn own_oom_score() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether a job launched by an agent of OOM score `agent` starts at 0 instead: only one
/// protected below the default is not passed on.
fn resets_oom_score(agent: i32) -> bool {
    agent < 0
}

/// A launched script: the child (always awaited) and its pid (= process group = session).
pub struct Script {
    pub child: Child,
    pub pid: i32,
}

/// Forks and execs, blocking until execve returned; `said` is where the child reports.
fn spawn(plan: LaunchPlan, said: &std::os::fd::OwnedFd) -> Result<Script, LaunchError> {
    use std::os::fd::AsRawFd;
    let program = plan.command[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&plan.command[1..])
        .env_clear()
        .envs(&plan.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    let mut ids = None;
    if let Some(user) = &plan.run_as {
        // A non-root agent may name its own user: nothing to switch (and setgroups would fail).
        if user.uid != nix::unistd::geteuid().as_raw() {
            ids = Some((user.uid, user.gid, user.groups.clone()));
        }
    }
    let workdir = std::os::fd::AsFd::as_fd(&plan.workdir).as_raw_fd();
    let cgroup = plan.cgroup_procs.as_ref().map(|f| f.as_raw_fd());
    let umask = plan.umask;
    let hang = plan.hang_before_exec;
    let drop_in_child = plan.drop_in_child.clone();
    let said_fd = said.as_raw_fd();
    let reset_oom_score = resets_oom_score(own_oom_score());
    let fd_limit = crate::fdlimit::for_jobs();
    // SAFETY: the closure runs in the forked child before exec. It only makes raw syscalls
    // (getpid, fstat, open, close, setrlimit, setsid, write, fchdir, setgroups, setgid, setuid, keyctl,
    // umask, close_range, pause), which are async-signal-safe, on fds and a group list prepared
    // before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let step = |step: Step| {
                // A lost byte only blames the step before it: nothing to do about it here.
                libc::write(said_fd, (&(step as u8) as *const u8).cast(), 1);
            };
            let check = |r: libc::c_int| {
                if r < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // First of all: the agent can kill a child whose execve never returns.
            let pid = libc::getpid().to_ne_bytes();
            libc::write(said_fd, pid.as_ptr().cast(), pid.len());
            // The agent's flocks are not the child's to hold while its execve hangs. An fd
            // number given to another file since is left alone.
            for (fd, dev, ino) in &drop_in_child {
                let mut st: libc::stat = std::mem::zeroed();
                if libc::fstat(*fd, &mut st) == 0
                    && st.st_dev as u64 == *dev
                    && st.st_ino as u64 == *ino
                {
                    libc::close(*fd);
                }
            }
            step(Step::Session);
            check(libc::setsid())?;
            if let Some(fd) = cgroup {
                step(Step::Cgroup);
                // "0" is the writing process: the job enters its cgroup before it runs anything.
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // The job starts at the kernel's default OOM score where the agent's is below it
            // (the unit's `OOMScoreAdjust=` keeps the agent, which reports the job's OOM, from
            // being the node's first pick): written as root, the job cannot lower it again.
            // A score above it (a pod's QoS, an operator's) is the job's too.
            if reset_oom_score {
                let adj = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if adj >= 0 {
                    libc::write(adj, b"0".as_ptr().cast(), 1);
                    libc::close(adj);
                }
            }
            step(Step::Workdir);
            check(libc::fchdir(workdir))?;
            // Before the uid switch: a keyring made now is charged to root's key quota, not
            // to the job user's, which another of its jobs may have filled.
            step(Step::Keyring);
            let joined = try_join_keyring();
            if let Some((uid, gid, groups)) = &ids {
                step(Step::Groups);
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                step(Step::Group);
                check(libc::setgid(*gid))?;
                step(Step::User);
                check(libc::setuid(*uid))?;
            }
            if joined.is_err() {
                // Once more, charged to the job user's quota: a root in a user namespace has
                // a quota of 200 keys, which runc's per-container keyrings fill.
                step(Step::Keyring);
                try_join_keyring().or_else(tolerated)?;
            }
            libc::umask(umask as libc::mode_t);
            close_on_exec_from(3);
            // The fd limit the agent was started with, not the one it raised its own to; after
            // the close above, whose fallback (kernels before 5.11) walks up to the current
            // limit: lowered first, an agent fd numbered past the job's limit stayed open in it.
            if let Some(limit) = &fd_limit {
                libc::setrlimit(libc::RLIMIT_NOFILE, limit);
            }
            step(Step::Exec);
            if hang {
                // Where a stuck execve would be; only SIGKILL ends this.
                loop {
                    libc::pause();
                }
            }
            Ok(())
        });
    }
    // Which step failed is told apart by the caller, from what the child said.
    let child = cmd
        .spawn()
        .map_err(|source| LaunchError::Exec { program, source })?;
    let pid = child.id().expect("a just-spawned child has a pid") as i32;
    Ok(Script { child, pid })
}

/// SIGKILL to the launch's child `pid` and its group (execve may have gone through just now
/// and the script forked), only while `pid` is still this agent's child: std's spawn reaps a
/// child whose execve failed, at any moment, and the pid may then be anyone's. Held by a
/// pidfd from before the check to the signal, so the pid cannot change hands in between.
fn kill_own_child(pid: i32) {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: a plain syscall.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let held = if pidfd >= 0 {
        // SAFETY: a new fd, owned by nobody else.
        Some(unsafe { OwnedFd::from_raw_fd(pidfd as i32) })
    } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        // Gone already (reaped): nothing of the launch's to kill by this pid.
        return;
    } else {
        // No pidfds here (a kernel before 5.3, a seccomp profile that bars them).
        None
    };
    let ours = crate::procfs::stat(pid).is_some_and(|s| s.ppid == std::process::id() as i32);
    if !ours {
        return;
    }
    match &held {
        // SAFETY: a plain syscall on the pidfd held above.
        Some(fd) => unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        },
        // Without a pidfd: the parent check alone.
        None => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
}

/// Leaves the agent's fds and session keyring behind, in a child that runs as a job's user
/// (a probe run as its user), between fork and exec: syscalls only, nothing allocated. Every
/// fd from 3 up is marked close-on-exec ([`close_on_exec_from`]), and the child joins a
/// session keyring of its own ([`join_own_keyring`]).
pub fn shed_the_agents() -> std::io::Result<()> {
    try_join_keyring().or_else(tolerated)?;
    close_on_exec_from(3);
    Ok(())
}

/// Joins a new session keyring, as `pam_keyinit` gives a login: a keyring is possessed
/// through its session, not by uid, so the agent's (a Kerberos or AFS token, a cifs key;
/// shared by every job a prolog or daemon started) would be read, and written, by each job.
/// Between fork and exec: one syscall.
fn try_join_keyring() -> std::io::Result<()> {
    const KEYCTL_JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a plain syscall; a null name asks for a new anonymous keyring.
    let joined = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if joined >= 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A join that failed (`e`) is no error when keyctl is barred (ENOSYS, or EPERM from a
/// seccomp profile: barred to the job too), nor while the agent's session keyring is known
/// to hold no key (nothing to leak: a full key quota must not fail every launch). Otherwise
/// it is: the child would keep the agent's keys. Between fork and exec: syscalls only.
fn tolerated(e: std::io::Error) -> std::io::Result<()> {
    const KEYCTL_READ: libc::c_long = 11;
    const KEY_SPEC_SESSION_KEYRING: libc::c_long = -3;
    // SAFETY: a plain syscall; a null buffer of length 0 asks only for the payload's size
    // (4 bytes per key the keyring holds).
    let held = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_READ,
            KEY_SPEC_SESSION_KEYRING,
            std::ptr::null_mut::<libc::c_char>(),
            0usize,
        )
    };
    if join_failure_is_fatal(e.raw_os_error(), held) {
        Err(e)
    } else {
        Ok(())
    }
}

/// Whether a failed join (its errno) may leave the child with keys of the agent's: `held`
/// is what a read of the agent's session keyring said (its size in bytes, or -1: unknown,
/// so taken as holding some).
fn join_failure_is_fatal(errno: Option<i32>, held: libc::c_long) -> bool {
    !matches!(errno, Some(libc::ENOSYS | libc::EPERM)) && held != 0
}

/// Marks every fd from `first` up close-on-exec, so the job gets only its stdio. std opens
/// its own fds with O_CLOEXEC, but not what the agent inherited from whoever started it (a
/// wrapper script, a prolog, a scheduler daemon: a root-opened file as fd 7) nor what a crate
/// opened without the flag. Marked, not closed: std's exec-error pipe must live until exec.
/// Runs between fork and exec: syscalls only, nothing allocated.
fn close_on_exec_from(first: libc::c_int) {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: plain syscalls on fd numbers; an fd that is not open is EBADF, ignored.
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        // Kernels before 5.11: one fcntl per possible fd, up to the fd limit (bounded).
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as libc::c_int
        } else {
            1 << 16
        };
        for fd in first..top {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

/// The signal name for an exit status, if the process was killed by one.
pub fn signal_name(status: &ExitStatus) -> Option<String> {
    use std::os::unix::process::ExitStatusExt;
    status.signal().map(|s| match Signal::try_from(s) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) => format!("SIG{s}"),
    })
}

/// Whether a login shell from the user database is one to hand a job as `SHELL`.
fn is_a_shell(shell: &std::path::Path) -> bool {
    let name = shell.file_name().and_then(|n| n.to_str()).unwrap_or("");
    !shell.as_os_str().is_empty() && !matches!(name, "nologin" | "false" | "true")
}

#[cfg(test)]
mod tests {
    /// A job starts at score 0 only when the agent is protected below it (the unit's -500):
    /// a pod's or an operator's raised score stays the job's.
    #[test]
    fn only_a_protected_agents_oom_score_is_not_passed_on() {
        assert!(super::resets_oom_score(-500));
        assert!(!super::resets_oom_score(0));
        assert!(!super::resets_oom_score(1000));
    }

    /// A join that fails leaves the child with the agent's keys only if it holds some, and
    /// keyctl barred is barred to the job too.
    #[test]
    fn a_failed_keyring_join_is_fatal_only_with_keys_to_leak() {
        assert!(join_failure_is_fatal(Some(libc::EDQUOT), 8));
        assert!(!join_failure_is_fatal(Some(libc::EDQUOT), 0));
        assert!(join_failure_is_fatal(Some(libc::EDQUOT), -1));
        assert!(!join_failure_is_fatal(Some(libc::EPERM), 8));
        assert!(!join_failure_is_fatal(Some(libc::ENOSYS), 8));
        assert!(join_failure_is_fatal(Some(libc::ENOMEM), 4));
    }

    /// What the child said last is read even when the reactor has not seen it yet: the
    /// step execve failed at decides whether the error is the script's (127) or the node's.
    #[tokio::test]
    async fn the_last_step_said_is_read_before_the_reactor_sees_it() {
        use std::os::fd::AsRawFd;
        let (heard_fd, said) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .unwrap();
        let pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(heard_fd).unwrap();
        let mut buf = [0u8; 8];
        // Drained until it would block: tokio now holds "not readable" for it.
        assert!(pipe.try_read(&mut buf).is_err());
        // SAFETY: a plain write of one byte from a live buffer.
        let wrote = unsafe { libc::write(said.as_raw_fd(), [Step::Exec as u8].as_ptr().cast(), 1) };
        assert_eq!(wrote, 1);
        drop(said);
        let mut heard = Heard(vec![0; Heard::PID_BYTES]);
        heard.take_rest(&pipe);
        assert_eq!(heard.last_step(), Step::Exec);
    }

    use super::*;

    #[test]
    fn credentials_are_removed_and_spec_env_wins() {
        let agent = [
            ("PATH", "/bin"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("AZURE_STORAGE_KEY", "s"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/k"),
            ("C3_AGENT_STORE_URL", "s3://b"),
            ("CREDENTIALS_DIRECTORY", "/run/credentials/x"),
            ("SERVICE_ACCOUNT", "/etc/c3-agent/gcs.json"),
            ("NOTIFY_SOCKET", "/run/systemd/notify"),
            ("WATCHDOG_USEC", "30000000"),
            ("IDENTITY_HEADER", "azsecret"),
            ("IDENTITY_ENDPOINT", "http://localhost:42356/msi/token"),
            ("MSI_SECRET", "old"),
            ("HTTPS_PROXY", "http://svc:pass@proxy:3128"),
            ("no_proxy", "a@b"),
            ("SNEAKY", "Bearer tok123"),
            ("PYTHONUNBUFFERED", "0"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let mut spec = BTreeMap::new();
        spec.insert("AWS_PROFILE".to_string(), "job-own".to_string());
        let env = child_env(
            agent,
            Some("tok123"),
            None,
            &spec,
            &[("C3_AGENT_SOCKET", "/s".into())],
        );
        let keys: Vec<_> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(
            keys,
            vec![
                "AWS_PROFILE",
                "C3_AGENT_SOCKET",
                "HTTPS_PROXY",
                "PATH",
                "PYTHONUNBUFFERED",
                "no_proxy"
            ]
        );
        assert_eq!(env[&OsString::from("PYTHONUNBUFFERED")], "1");
        assert_eq!(env[&OsString::from("HTTPS_PROXY")], "http://proxy:3128");
        assert_eq!(env[&OsString::from("no_proxy")], "a@b");
    }

    /// For a job of another user the agent's identity is replaced by the user's; the
    /// spec's `env` still has the last word.
    #[test]
    fn a_user_job_gets_its_users_identity_and_the_spec_wins() {
        let me = nix::unistd::geteuid().as_raw();
        let user = RunAs {
            name: "c3job".into(),
            uid: me.wrapping_add(1),
            gid: 1,
            groups: vec![1],
            home: "/home/c3job".into(),
            shell: "/bin/bash".into(),
        };
        let agent = [
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("HOME", "/root"),
            ("SHELL", "/bin/zsh"),
            ("SUDO_UID", "0"),
            ("XDG_RUNTIME_DIR", "/run/user/0"),
            ("DBUS_SESSION_BUS_ADDRESS", "unix:path=/run/user/0/bus"),
            ("XDG_CACHE_HOME", "/root/.cache"),
            ("XDG_CONFIG_HOME", "/root/.config"),
            ("XDG_DATA_HOME", "/root/.local/share"),
            ("XDG_STATE_HOME", "/root/.local/state"),
            ("TMPDIR", "/tmp/user/0"),
            ("KRB5CCNAME", "FILE:/tmp/krb5cc_0"),
            ("PWD", "/root"),
            ("OLDPWD", "/root/src"),
            ("PATH", "/usr/bin"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let mut spec = BTreeMap::new();
        spec.insert("HOME".to_string(), "/scratch".to_string());
        let env = child_env(agent.clone(), None, Some(&user), &spec, &[]);
        let got: Vec<_> = env
            .iter()
            .map(|(k, v)| format!("{}={}", k.to_str().unwrap(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                "HOME=/scratch",
                "LOGNAME=c3job",
                "PATH=/usr/bin",
                "PYTHONUNBUFFERED=1",
                "SHELL=/bin/bash",
                "USER=c3job"
            ]
        );
        // A service account's nologin is not handed on, nor is the agent's own shell.
        let nologin = RunAs {
            shell: "/usr/sbin/nologin".into(),
            ..user
        };
        let env = child_env(agent, None, Some(&nologin), &spec, &[]);
        assert!(!env.iter().any(|(k, _)| k == "SHELL"), "{env:?}");
    }

    #[test]
    fn a_proxy_loses_its_login_and_keeps_the_rest() {
        let strip = |v: &str| without_userinfo(v.as_bytes()).map(|b| String::from_utf8(b).unwrap());
        assert_eq!(
            strip("http://u:p@h:1/x@y").as_deref(),
            Some("http://h:1/x@y")
        );
        assert_eq!(strip("u:p@h:1").as_deref(), Some("h:1"));
        assert_eq!(strip("socks5://a@b@h").as_deref(), Some("socks5://h"));
        assert_eq!(strip("http://h:1/p@q"), None);
        assert_eq!(strip("http://h:1"), None);
        assert!(is_proxy_var(b"all_proxy") && is_proxy_var(b"HTTP_PROXY"));
        assert!(!is_proxy_var(b"NO_PROXY"));
    }
}
