//! What of the agent's own secrets a job could read: its store keys in a config file every
//! user may read, its control-plane token file, store credentials from the instance-metadata
//! endpoint. Said at every run, each in one line that names the fix; never changed for the
//! operator (they are the operator's files and the node's network).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Config;

/// Store options whose values are secrets (keys, tokens, passwords), not names of them.
fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // A key naming a file (`azure_federated_token_file`) holds its path, not the secret.
    if key.ends_with("_file") || key.ends_with("_path") {
        return false;
    }
    ["secret", "token", "password", "sas"]
        .iter()
        .any(|w| key.contains(w))
        || (key.ends_with("_key") && !key.ends_with("_key_id"))
}

/// Whether any user may read `path`: the file is readable by others and every directory
/// above it may be passed by others (a 0644 file in a 0700 directory is private).
fn readable_by_everyone(path: &Path) -> bool {
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    let others =
        |p: &Path, bit: u32| std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & bit != 0);
    others(&real, 0o004) && real.ancestors().skip(1).all(|dir| others(dir, 0o001))
}

/// Whether a job's user reaches the instance-metadata endpoint the store's credentials come
/// from (then it may take them).
pub enum MetadataReach {
    Reached(String),
    Blocked,
    /// The probe could not run (the user, the agent's binary): said as a possibility.
    Unknown(String),
}

/// Runs `c3-agent probe-connect ENDPOINT` as `user` (no groups beyond its own, no env, none
/// of the agent's fds or keys: another process of that user may attach to it), bounded to 3 s.
pub async fn metadata_reach(endpoint: &str, user: &str) -> MetadataReach {
    let unknown = || MetadataReach::Unknown(endpoint.to_string());
    let name = user.to_string();
    // Bounded as the probe is: behind a hung name service the lookup never ends, and this
    // runs before the attempt has a record or hears a stop (the launch's own lookup is
    // bounded the same way, and says why).
    let lookup = tokio::task::spawn_blocking(move || c3_runtime::launch::RunAs::lookup(&name));
    let Ok(Ok(Ok(who))) = tokio::time::timeout(std::time::Duration::from_secs(3), lookup).await
    else {
        return unknown();
    };
    // The agent's own binary through its magic link: the job's user may not be able to pass
    // the directories it lies in, and the link is followed without them.
    let mut child = tokio::process::Command::new("/proc/self/exe");
    child
        .args(["probe-connect", endpoint])
        .env_clear()
        .current_dir("/")
        .uid(who.uid)
        .gid(who.gid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    // SAFETY: runs between fork and exec (after std's uid switch): raw syscalls only.
    unsafe {
        child.pre_exec(c3_runtime::launch::shed_the_agents);
    }
    let child = child.status();
    match tokio::time::timeout(std::time::Duration::from_secs(3), child).await {
        Ok(Ok(status)) if status.code() == Some(0) => MetadataReach::Reached(endpoint.to_string()),
        Ok(Ok(status)) if status.code() == Some(1) => MetadataReach::Blocked,
        _ => unknown(),
    }
}

/// `c3-agent probe-connect`: 0 if a TCP connection to the endpoint's host and port opens
/// within a second, 1 if not, 2 for an endpoint that is no URL.
pub fn probe_connect(endpoint: &str) -> std::process::ExitCode {
    use std::net::ToSocketAddrs;
    let Some(addrs) = c3_runtime::store::endpoint_host_port(endpoint)
        .and_then(|(host, port)| (host.as_str(), port).to_socket_addrs().ok())
    else {
        return std::process::ExitCode::from(2);
    };
    let timeout = std::time::Duration::from_secs(1);
    let reached = addrs
        .into_iter()
        .any(|a| std::net::TcpStream::connect_timeout(&a, timeout).is_ok());
    std::process::ExitCode::from(if reached { 0 } else { 1 })
}

/// One warning per secret a job could read; `metadata`: what the job's user reaches of the
/// instance-metadata endpoint, when the store's credentials come from there and the job runs
/// as another user (a job running as root can read anything anyway).
pub fn warnings(config: &Config, metadata: Option<&MetadataReach>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(file) = &config.source {
        let secrets: Vec<&str> = config
            .store
            .options
            .keys()
            .map(String::as_str)
            .filter(|k| is_secret_option(k))
            .collect();
        if !secrets.is_empty() && readable_by_everyone(file) {
            out.push(format!(
                "{} holds store secrets ({}) and every user may read it, every job too: `chmod 600 {}`",
                file.display(),
                secrets.join(", "),
                file.display()
            ));
        }
    }
    if let Some(token) = config
        .control_plane
        .as_ref()
        .and_then(|cp| cp.token_file.as_ref())
    {
        if readable_by_everyone(token) {
            out.push(format!(
                "the control-plane token file {} may be read by every user, every job too (it could report as this node): `chmod 600 {}`",
                token.display(),
                token.display()
            ));
        }
    }
    let block = "block it for users other than root (e.g. `iptables -A OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT`) or give the agent keys of its own";
    match metadata {
        Some(MetadataReach::Reached(endpoint)) => out.push(format!(
            "the store's credentials come from the instance-metadata endpoint {endpoint}, and the job's user reaches it too (it may take them): {block}"
        )),
        Some(MetadataReach::Unknown(endpoint)) => out.push(format!(
            "the store's credentials come from the instance-metadata endpoint {endpoint}, which the job's processes may reach too (not checked): {block}"
        )),
        Some(MetadataReach::Blocked) | None => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_options_are_told_from_names() {
        for k in [
            "aws_secret_access_key",
            "aws_session_token",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "google_service_account_key",
            "azure_client_secret",
        ] {
            assert!(is_secret_option(k), "{k}");
        }
        for k in [
            "aws_access_key_id",
            "aws_region",
            "aws_endpoint",
            "bucket",
            "azure_federated_token_file",
        ] {
            assert!(!is_secret_option(k), "{k}");
        }
    }

    /// Each secret a job could read is named with its fix; none once they are closed.
    #[test]
    fn secrets_every_user_may_read_are_named() {
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (file, token) = (top.path().join("config.toml"), top.path().join("token"));
        let text = format!(
            "[store]\nurl = \"s3://b\"\n[store.options]\naws_access_key_id = \"AK\"\naws_secret_access_key = \"SK\"\n[control_plane]\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
            token.display()
        );
        for p in [&file, &token] {
            std::fs::write(p, &text).unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let config =
            crate::config::resolve(Some(file.clone()), &text, &|_| None, "/s".into()).unwrap();
        let reached = MetadataReach::Reached("http://169.254.169.254".into());
        let said = warnings(&config, Some(&reached));
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].contains("(aws_secret_access_key)") && said[0].contains("chmod 600"));
        assert!(said[1].contains("control-plane token file"));
        assert!(said[2].contains("instance-metadata endpoint"));
        assert_eq!(warnings(&config, Some(&MetadataReach::Blocked)).len(), 2);
        for p in [&file, &token] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(warnings(&config, None).is_empty());
    }

    #[test]
    fn a_file_is_readable_by_everyone_only_through_passable_dirs() {
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, "x").unwrap();
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        chmod(top.path(), 0o755);
        chmod(&dir, 0o755);
        chmod(&f, 0o644);
        // /tmp and what is above it are passable on any normal system.
        assert!(readable_by_everyone(&f));
        chmod(&f, 0o600);
        assert!(!readable_by_everyone(&f));
        chmod(&f, 0o644);
        chmod(&dir, 0o700);
        assert!(!readable_by_everyone(&f));
    }
}
