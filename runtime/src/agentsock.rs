//! The job's agent socket (contract §4): a Unix socket only the job's processes may use,
//! where `c3-agent publish` (or any client speaking the JSON-lines protocol) asks the
//! collector to store files now.
//!
//! It lives at `<state_dir>/run/<id>.sock`: the directory is the agent's (0711, so the job's
//! user can reach the socket but not list or swap anything), the socket is 0600 and owned by
//! the job's user. Every connection's peer credentials (`SO_PEERCRED`) must be the job's
//! uid and a pid among the job's processes; anything else is refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use c3_proto::{SocketReply, SocketRequest};

use crate::jobproc::JobProcesses;
use crate::loglimit::LineLimit;
use crate::publish::PublishCall;
use crate::statedir::StateDir;

/// Longest request line; more is a protocol error.
use c3_proto::socket::MAX_LINE;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 16;
/// Connections accepted a second (and in a burst): each costs the root agent a peer check
/// in /proc, on CPU outside the job's cgroup, and a job can connect in a loop from many
/// threads. `c3-agent publish` connects once per call; a client that asks often keeps
/// its connection.
const CONNECTIONS_PER_SEC: u64 = 100;
/// Request bytes read a second (and in a burst), over every connection: each line is parsed
/// by the root agent on its runtime's threads, outside the job's cgroup, and a job sending
/// 1 MiB lines of 262,144 paths from 16 connections kept them busy for as long as it liked.
/// `c3-agent publish` sends 1,000 paths a line: 100,000 paths of 100 bytes take 2.5 s here.
const REQUEST_BYTES_PER_SEC: u64 = 4 << 20;
/// `sun_path` holds 108 bytes with its NUL.
const MAX_SOCKET_PATH: usize = 107;
/// Log lines a second for the socket's requests and refusals, sustained and in a burst: the
/// job sets their pace.
const LOG_PER_SEC: f64 = 20.0;
const LOG_BURST: f64 = 20.0;
/// Most bytes of one path in a log line; a request line may hold a 1 MiB path.
const LOGGED_PATH: usize = 256;

/// One [`LineLimit`] for the log lines of every connection of the socket.
#[derive(Clone)]
struct LogGate(Arc<Mutex<LineLimit>>);

impl LogGate {
    fn new() -> Self {
        LogGate(Arc::new(Mutex::new(LineLimit::new(LOG_PER_SEC, LOG_BURST))))
    }

    /// Whether to log one more line now; at most once a second it first says how many were
    /// held back.
    fn admit(&self) -> bool {
        let mut limit = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let admitted = limit.admit();
        if admitted {
            say_held_back(limit.held_back(false));
        }
        admitted
    }

    fn finish(&self) {
        let mut limit = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        say_held_back(limit.held_back(true));
    }
}

fn say_held_back(lines: Option<u64>) {
    if let Some(lines) = lines {
        tracing::info!(
            lines,
            "(agent socket: log lines of requests and refusals left out: they came faster than the log keeps)"
        );
    }
}

pub struct AgentSocket {
    path: PathBuf,
    listener: UnixListener,
}

/// The socket file goes with the socket, served or not: one bound for a launch that then
/// failed was left in `<state_dir>/run` for good.
impl Drop for AgentSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The socket of `job_id`'s attempt served by the agent of pid `pid`: short and unique per
/// attempt and agent (job ids can be 128 characters long).
fn socket_path(state: &StateDir, job_id: &str, attempt: u32, pid: u32) -> PathBuf {
    let name = crate::digest::sha256_hex(format!("{job_id}\0{attempt}\0{pid}").as_bytes());
    state
        .root()
        .join("run")
        .join(format!("{}.sock", &name[..16]))
}

/// Removes the socket an agent of pid `pid` left for the attempt (killed, OOM-killed, dead
/// of a panic: its `Drop` never ran), once that agent is known gone: one inode in the state
/// dir per crash, for ever.
pub fn remove_left(state: &StateDir, job_id: &str, attempt: u32, pid: u32) {
    let path = socket_path(state, job_id, attempt, pid);
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed the socket a dead agent left"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot remove the socket a dead agent left")
        }
    }
}

impl AgentSocket {
    /// Binds the socket of one attempt; `owner` (the job's uid and gid) gets it.
    pub fn bind(
        state: &StateDir,
        job_id: &str,
        attempt: u32,
        owner: Option<(u32, u32)>,
    ) -> std::io::Result<AgentSocket> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        let dir = state.root().join("run");
        // Made 0711 from the start (a scheduler's umask 000 left it open to every user for a
        // moment), and one found must be the agent's own directory, shut to others: in one
        // they may write, another tenant's job could take a socket's predictable name.
        match std::fs::DirBuilder::new().mode(0o711).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let md = std::fs::symlink_metadata(&dir)?;
        if !md.is_dir() || md.uid() != nix::unistd::geteuid().as_raw() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory of the agent's own; no socket is made there",
                    dir.display()
                ),
            ));
        }
        if md.mode() & 0o7777 != 0o711 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
        }
        let path = socket_path(state, job_id, attempt, std::process::id());
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is too long for a Unix socket", path.display()),
            ));
        }
        // A socket left by a crashed agent of the same pid (after a reboot) is stale.
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            // The directory is the agent's: nothing in this path can be swapped by the job.
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
        Ok(AgentSocket { path, listener })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop`, then removes the socket.
    pub fn serve(
        self,
        publisher: mpsc::Sender<PublishCall>,
        procs: JobProcesses,
        uid: u32,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(
            async move {
                let mut conns = JoinSet::new();
                let log = LogGate::new();
                let pace = crate::ratelimit::RateLimit::new(CONNECTIONS_PER_SEC);
                let bytes = crate::ratelimit::RateLimit::new(REQUEST_BYTES_PER_SEC);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        Some(_) = conns.join_next(), if !conns.is_empty() => {}
                        accepted = self.listener.accept() => {
                            let Ok((stream, _)) = accepted else {
                                // Out of fds, say: the error stays until something closes, and
                                // looping straight back would spin a core beside the job.
                                tokio::select! {
                                    _ = stop.cancelled() => break,
                                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                                }
                                continue;
                            };
                            // Past the rate, the next accept waits (one token at a time, so
                            // at most 1/rate): further clients queue in the listen backlog.
                            pace.take(1).await;
                            if conns.len() >= MAX_CONNECTIONS {
                                let _ = refuse(stream, "too many connections").await;
                                continue;
                            }
                            let (p, procs, stop) = (publisher.clone(), procs.clone(), stop.clone());
                            let gates = (log.clone(), bytes.clone());
                            conns.spawn(connection(stream, p, procs, uid, stop, gates).in_current_span());
                        }
                    }
                }
                conns.shutdown().await;
                log.finish();
                drop(self);
            }
            .in_current_span(),
        )
    }
}

async fn refuse(mut stream: UnixStream, why: &str) -> std::io::Result<()> {
    stream.write_all(&SocketReply::error(why).to_line()).await
}

/// One client: peer checked once, then one reply per request line.
async fn connection(
    stream: UnixStream,
    publisher: mpsc::Sender<PublishCall>,
    procs: JobProcesses,
    uid: u32,
    stop: CancellationToken,
    (log, bytes): (LogGate, crate::ratelimit::RateLimit),
) {
    let Ok(cred) = stream.peer_cred() else { return };
    let pid = cred.pid().unwrap_or(0);
    // The uid first: a stranger's connection costs no scan of /proc.
    let member = cred.uid() == uid
        && tokio::task::spawn_blocking(move || procs.contains(pid))
            .await
            .unwrap_or(false);
    if !member {
        if log.admit() {
            tracing::warn!(
                peer_uid = cred.uid(),
                peer_pid = pid,
                "agent socket: refused a process that is not the job's"
            );
        }
        let _ = refuse(stream, "refused: not a process of this job").await;
        return;
    }
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let mut limited = (&mut lines).take(MAX_LINE + 1);
        let read = tokio::select! {
            _ = stop.cancelled() => return,
            r = limited.read_until(b'\n', &mut line) => r,
        };
        match read {
            Ok(0) | Err(_) => return,
            // MAX_LINE bytes and the newline are a whole request.
            Ok(_) if line.len() as u64 > MAX_LINE && line.last() != Some(&b'\n') => {
                let _ = write
                    .write_all(&SocketReply::error("request line too long").to_line())
                    .await;
                return;
            }
            Ok(_) => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            () = bytes.take(line.len() as u64) => {}
        }
        let reply = match SocketRequest::from_line(&line) {
            // The connection is closed after it: `c3-agent publish` sends none, and a job
            // sending `x\n` in a loop got a reply each, as fast as the agent could write them.
            Err(e) => {
                let reply = SocketReply::error(format!("not a request: {e}"));
                let _ = write.write_all(&reply.to_line()).await;
                return;
            }
            Ok(request) => {
                match &request {
                    SocketRequest::Publish { paths } if log.admit() => tracing::info!(
                        paths = paths.len(),
                        first = ?paths
                            .iter()
                            .take(3)
                            .map(|p| crate::display::clip_text(p.clone(), LOGGED_PATH))
                            .collect::<Vec<_>>(),
                        "job asks to publish on the agent socket"
                    ),
                    SocketRequest::WaitAll if log.admit() => {
                        tracing::info!("job asks to wait_all on the agent socket")
                    }
                    _ => {}
                }
                let (tx, rx) = oneshot::channel();
                let call = PublishCall { request, reply: tx };
                if publisher.send(call).await.is_err() {
                    SocketReply::error("the job has ended; nothing more is published")
                } else {
                    rx.await.unwrap_or_else(|_| {
                        SocketReply::error("the job has ended; nothing more is published")
                    })
                }
            }
        };
        if write.write_all(&reply.to_line()).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket bound for a launch that then failed is not left behind.
    #[tokio::test]
    async fn an_unserved_socket_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let socket = AgentSocket::bind(&state, "j", 1, None).unwrap();
        let path = socket.path().to_path_buf();
        assert!(path.exists());
        drop(socket);
        assert!(!path.exists());
    }

    /// The sockets' directory is shut to other users whatever the umask or an earlier
    /// mode left, and one that is not the agent's own directory (a symlink) is not used.
    #[tokio::test]
    async fn the_sockets_dir_is_the_agents_and_shut() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        let run = dir.path().join("run");
        std::fs::create_dir(&run).unwrap();
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o777)).unwrap();
        drop(AgentSocket::bind(&state, "j", 1, None).unwrap());
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o711);
        std::fs::remove_dir(&run).unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), &run).unwrap();
        assert!(AgentSocket::bind(&state, "j", 1, None).is_err());
        assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
    }
}
