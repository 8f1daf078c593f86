//! Starting the user's script: its environment (without the agent's credentials),
//! its own session and process group, its user; and stopping the whole group.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Prefixes of variables that carry the agent's credentials or configuration.
const SECRET_PREFIXES: &[&str] = &["AWS_", "AZURE_", "GOOGLE_", "C3_AGENT_"];
/// Single variables that point at credentials (systemd's LoadCredential= dir).
const SECRET_NAMES: &[&str] = &["CREDENTIALS_DIRECTORY"];

/// The child's environment: the agent's minus its credentials, then the spec's `env`,
/// then the job variables the contract promises.
pub fn child_env(
    agent_env: impl IntoIterator<Item = (OsString, OsString)>,
    token: Option<&str>,
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
        .collect();
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
    pub home: PathBuf,
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
    #[error("cannot start `{program}`")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl RunAs {
    pub fn lookup(name: &str) -> Result<Self, LaunchError> {
        let user = nix::unistd::User::from_name(name)
            .map_err(|source| LaunchError::UserLookup {
                name: name.into(),
                source,
            })?
            .ok_or_else(|| LaunchError::NoSuchUser(name.into()))?;
        if !nix::unistd::geteuid().is_root() && user.uid != nix::unistd::geteuid() {
            return Err(LaunchError::NotRoot(name.into()));
        }
        Ok(RunAs {
            name: name.into(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })
    }
}

pub struct LaunchPlan<'a> {
    pub command: &'a [String],
    pub workdir: &'a Path,
    pub env: BTreeMap<OsString, OsString>,
    pub run_as: Option<&'a RunAs>,
}

/// A launched script: the child (always awaited) and its process group.
pub struct Script {
    pub child: Child,
    pub group: ProcessGroup,
}

pub fn spawn(plan: LaunchPlan<'_>) -> Result<Script, LaunchError> {
    let program = plan.command[0].clone();
    let mut cmd = Command::new(&program);
    cmd.args(&plan.command[1..])
        .current_dir(plan.workdir)
        .env_clear()
        .envs(&plan.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(false);
    if let Some(user) = plan.run_as {
        cmd.uid(user.uid).gid(user.gid);
        for (k, v) in [("USER", user.name.clone()), ("LOGNAME", user.name.clone())] {
            if !plan.env.contains_key(&OsString::from(k)) {
                cmd.env(k, v);
            }
        }
        cmd.env("HOME", &user.home);
    }
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe and allocates nothing.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    // std opens every fd with O_CLOEXEC, so the child inherits only stdio.
    let child = cmd
        .spawn()
        .map_err(|source| LaunchError::Spawn { program, source })?;
    let pid = child.id().expect("a just-spawned child has a pid") as i32;
    Ok(Script {
        child,
        group: ProcessGroup(pid),
    })
}

/// The script's session and process group (pgid = the script's pid, from setsid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessGroup(pub i32);

impl ProcessGroup {
    /// Sends `signal`; false when no process of the group is left.
    pub fn signal(self, signal: Signal) -> bool {
        killpg(Pid::from_raw(self.0), signal).is_ok()
    }

    pub fn is_alive(self) -> bool {
        killpg(Pid::from_raw(self.0), None).is_ok()
    }

    /// SIGTERM to the group, SIGKILL after `grace` to whatever is left, the leader reaped.
    /// Returns the leader's exit status if it had to be waited for here.
    pub async fn terminate(
        self,
        leader: Option<&mut Child>,
        grace: Duration,
    ) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + grace;
        self.signal(Signal::SIGTERM);
        let mut status = None;
        if let Some(child) = leader {
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(s) => status = s.ok(),
                Err(_) => {
                    tracing::warn!(
                        pgid = self.0,
                        grace_secs = grace.as_secs_f64(),
                        "job ignored SIGTERM; sending SIGKILL"
                    );
                    self.signal(Signal::SIGKILL);
                    status = child.wait().await.ok();
                }
            }
        }
        self.reap_rest(deadline).await;
        status
    }

    /// Leftover members (a grandchild that ignores SIGTERM) get until `deadline`, then SIGKILL.
    async fn reap_rest(self, deadline: tokio::time::Instant) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        while self.is_alive() {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    pgid = self.0,
                    "processes of the job outlived the grace period; sending SIGKILL"
                );
                self.signal(Signal::SIGKILL);
                // Bounded: a zombie that nobody reaps would keep the group "alive".
                let until = tokio::time::Instant::now() + Duration::from_secs(2);
                while self.is_alive() && tokio::time::Instant::now() < until {
                    tick.tick().await;
                }
                return;
            }
            tick.tick().await;
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

#[cfg(test)]
mod tests {
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
            ("SNEAKY", "Bearer tok123"),
            ("PYTHONUNBUFFERED", "0"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let mut spec = BTreeMap::new();
        spec.insert("AWS_PROFILE".to_string(), "job-own".to_string());
        let env = child_env(
            agent,
            Some("tok123"),
            &spec,
            &[("C3_AGENT_SOCKET", "/s".into())],
        );
        let keys: Vec<_> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(
            keys,
            vec!["AWS_PROFILE", "C3_AGENT_SOCKET", "PATH", "PYTHONUNBUFFERED"]
        );
        assert_eq!(env[&OsString::from("PYTHONUNBUFFERED")], "1");
    }
}
