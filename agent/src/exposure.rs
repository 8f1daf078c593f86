//! What of the agent's own secrets a job could read: its store keys in a config file every
//! user may read, a file its store credentials come from (named by a store option or a
//! variable such as `$GOOGLE_APPLICATION_CREDENTIALS`, which the job does not get, or the AWS
//! profile's), its control-plane token file, store credentials from the instance-metadata
//! endpoint. Said at every run, each in one line that names the fix; never changed for the
//! operator (they are the operator's files and the node's network).

use std::path::{Path, PathBuf};

use crate::config::Config;

/// Store options whose values are secrets (keys, tokens, passwords), not names of them.
fn is_secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    // A key naming a file (`azure_federated_token_file`) holds its path, not the secret: the
    // file is checked itself (`names_a_credential_file`).
    if names_a_credential_file(&key) {
        return false;
    }
    ["secret", "token", "password", "sas"]
        .iter()
        .any(|w| key.contains(w))
        || (key.ends_with("_key") && !key.ends_with("_key_id"))
        // S3's SSE-C key (`aws_sse_customer_key_base64`): the key the data is encrypted with.
        || key.contains("customer_key")
}

/// Store options (and, upper-cased, the variables object_store reads them from) whose values
/// are paths of files holding credentials: a key file, a web-identity or federated token, a
/// service account. The variable is kept from the job; a file it may read is not.
fn names_a_credential_file(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.ends_with("_file")
        || key.ends_with("_path")
        || [
            "google_service_account",
            "service_account",
            "google_application_credentials",
            "application_credentials",
        ]
        .contains(&key.as_str())
}

/// The files the store's credentials may come from, each with what names it: store options
/// naming one, the variables of the store's provider naming one (`$GOOGLE_APPLICATION_CREDENTIALS`,
/// `$AWS_WEB_IDENTITY_TOKEN_FILE`, `$AZURE_FEDERATED_TOKEN_FILE`...), and for S3 the AWS
/// profile's files the agent reads when nothing else gives keys.
fn credential_files(
    config: &Config,
    env: &[(String, std::ffi::OsString)],
) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = config
        .store
        .options
        .iter()
        .filter(|(k, v)| names_a_credential_file(k) && !v.is_empty())
        .map(|(k, v)| (PathBuf::from(v), format!("store option `{k}`")))
        .collect();
    let scheme = config.store.url.split_once("://").map_or("", |(s, _)| s);
    let prefix = match scheme {
        "s3" | "s3a" => "AWS_",
        "gs" => "GOOGLE_",
        "az" | "azure" | "abfs" | "abfss" => "AZURE_",
        _ => return out,
    };
    let var = |name: &str| {
        env.iter()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v))
    };
    for (k, v) in env {
        // object_store's GCS builder reads the key file's path from it, unprefixed.
        let provider = k.starts_with(prefix) || (prefix == "GOOGLE_" && k == "SERVICE_ACCOUNT");
        if provider && !v.is_empty() && names_a_credential_file(k) {
            out.push((PathBuf::from(v), format!("${k}")));
        }
    }
    if prefix == "AWS_" {
        let home = var("HOME");
        for (name, rel) in [
            ("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            ("AWS_CONFIG_FILE", ".aws/config"),
        ] {
            if let (None, Some(home)) = (var(name), &home) {
                out.push((home.join(rel), "the AWS profile".into()));
            }
        }
    }
    // One line for a file named twice (an option and its variable).
    let mut seen = std::collections::HashSet::new();
    out.retain(|(path, _)| seen.insert(path.clone()));
    out
}

/// A uid no account has: a user neither the file nor its ACL names.
const STRANGER: u32 = u32::MAX - 1;

/// Who besides root and the agent may read one of the agent's secrets (and so every job they
/// run).
#[derive(Debug, PartialEq, Eq)]
enum Readers {
    /// "Other" may: every user.
    Everyone,
    /// The members of the file's group (not root's, not the agent's own).
    Group(String),
    /// Its ACL lets users or groups it names read it (the group class grants reading).
    Acl,
}

impl Readers {
    /// "every user may read it, every job too", as a line's subject and verb.
    fn may_read(&self) -> String {
        match self {
            Readers::Everyone => "every user may read it, every job too".into(),
            Readers::Group(g) => format!("every member of group {g} may read it, their jobs too"),
            Readers::Acl => "the users and groups its ACL names may read it, their jobs too".into(),
        }
    }

    /// "may be read by every user, every job too".
    fn may_be_read(&self) -> String {
        match self {
            Readers::Everyone => "may be read by every user, every job too".into(),
            Readers::Group(g) => {
                format!("may be read by every member of group {g}, their jobs too")
            }
            Readers::Acl => {
                "may be read by the users and groups its ACL names, their jobs too".into()
            }
        }
    }
}

/// Who besides root and the agent may read `path` through every directory above it (a 0644
/// file in a 0700 directory is private), by the kernel's rules, ACLs included. The job's user
/// is not known here (the config is checked before any spec): "other", the file's group, and
/// an ACL's named entries stand for it. A file someone else owns is that owner's to read
/// anyway, and is not judged by its group.
fn who_may_read(path: &Path) -> Option<Readers> {
    use c3_runtime::confine::{fstat, JobReader};
    use std::os::unix::fs::OpenOptionsExt;
    let real = std::fs::canonicalize(path).ok()?;
    // A FIFO planted or configured there never blocks the look: only a file is judged.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&real)
        .ok()?;
    let st = fstat(&file).ok()?;
    if !c3_runtime::confine::is_regular(&st) {
        return None;
    }
    let trusted = [0, nix::unistd::geteuid().as_raw()];
    let own_groups = [0, nix::unistd::getegid().as_raw()];
    // A transient fault reading an ACL is no finding: a warning must be a fact.
    let reaches = |reader: &JobReader| {
        reader.may_read(&file, &st).unwrap_or(false)
            && real.ancestors().skip(1).all(|dir| passable(reader, dir))
    };
    if reaches(&JobReader {
        uid: STRANGER,
        gids: Vec::new(),
    }) {
        return Some(Readers::Everyone);
    }
    if !trusted.contains(&st.st_uid) {
        return None;
    }
    // The file's group, and each directory's above it: a 0644 file in a `0750 root:lab`
    // directory is every lab member's to read, whatever the file's own group.
    let mut groups = vec![st.st_gid];
    for dir in real.ancestors().skip(1) {
        if let Ok(m) = std::fs::metadata(dir) {
            use std::os::unix::fs::MetadataExt;
            if !groups.contains(&m.gid()) {
                groups.push(m.gid());
            }
        }
    }
    for gid in groups.into_iter().filter(|g| !own_groups.contains(g)) {
        if reaches(&JobReader {
            uid: STRANGER,
            gids: vec![gid],
        }) {
            return Some(Readers::Group(group_name(gid)));
        }
    }
    // An ACL's named entries, but root's and the agent's own (the usual way to give a
    // non-root agent a root-owned secret: `setfacl -m u:c3:r`).
    let acl = c3_runtime::acl::of(&file).ok().flatten();
    acl.is_some_and(|a| a.named_others_may(0o4, &trusted, &own_groups))
        .then_some(Readers::Acl)
}

/// Whether `reader` may pass through `dir`: its ACL too where the agent may open it, else
/// the mode bits.
fn passable(reader: &c3_runtime::confine::JobReader, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if let Ok(d) = std::fs::File::open(dir) {
        if let Ok(st) = c3_runtime::confine::fstat(&d) {
            return reader.may_search(&d, &st).unwrap_or(false);
        }
    }
    std::fs::metadata(dir).is_ok_and(|m| {
        let bits = if reader.gids.contains(&m.gid()) {
            m.mode() >> 3
        } else {
            m.mode()
        };
        bits & 0o001 != 0
    })
}

/// A group's name from `/etc/group` (never the name service: one that hangs would hold the
/// agent's start), else its number.
fn group_name(gid: u32) -> String {
    std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                (f.nth(1)?.parse::<u32>().ok()? == gid).then(|| name.to_string())
            })
        })
        .map_or_else(|| format!("gid {gid}"), |name| format!("`{name}`"))
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
/// How long the looks at the secrets' files may take: one on a hung mount (a secrets or NFS
/// mount that stopped answering) held the start, a stop unheard.
const LOOK_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The warnings, said at each run: the files looked at off the reactor, within
/// [`LOOK_LIMIT`], given up on a stop (then nothing is said of them).
pub async fn warnings(
    config: &Config,
    metadata: Option<&MetadataReach>,
    cancel: &tokio_util::sync::CancellationToken,
) -> Vec<String> {
    let env: Vec<(String, std::ffi::OsString)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v)))
        .collect();
    let files = files_to_check(config, &env);
    let looked = tokio::task::spawn_blocking(move || readable_files(files));
    let mut out = tokio::select! {
        looked = tokio::time::timeout(LOOK_LIMIT, looked) => match looked {
            Ok(Ok(said)) => said,
            Ok(Err(_)) => Vec::new(),
            Err(_) => vec![format!(
                "the look at who may read the agent's secrets did not finish within {} s (a hung mount?); not checked this run",
                LOOK_LIMIT.as_secs()
            )],
        },
        () = cancel.cancelled() => Vec::new(),
    };
    out.extend(metadata_warning(metadata));
    out
}

/// A file holding one of the agent's secrets, and what it holds.
enum Held {
    /// The config, with the store options that are secrets.
    Config(String),
    Token,
    /// Store credentials, named so.
    Credentials(String),
}

/// The files [`warnings`] looks at, with what each holds; no I/O.
fn files_to_check(config: &Config, env: &[(String, std::ffi::OsString)]) -> Vec<(PathBuf, Held)> {
    let mut out = Vec::new();
    if let Some(file) = &config.source {
        let secrets: Vec<&str> = config
            .store
            .options
            .keys()
            .map(String::as_str)
            .filter(|k| is_secret_option(k))
            .collect();
        if !secrets.is_empty() {
            out.push((file.clone(), Held::Config(secrets.join(", "))));
        }
    }
    if let Some(token) = config
        .control_plane
        .as_ref()
        .and_then(|cp| cp.token_file.as_ref())
    {
        out.push((token.clone(), Held::Token));
    }
    for (file, named_by) in credential_files(config, env) {
        out.push((file, Held::Credentials(named_by)));
    }
    out
}

/// One line for each of `files` someone else may read; blocking.
fn readable_files(files: Vec<(PathBuf, Held)>) -> Vec<String> {
    files
        .into_iter()
        .filter_map(|(file, held)| {
            let readers = who_may_read(&file)?;
            let shown = file.display();
            Some(match held {
                Held::Config(secrets) => format!(
                    "{shown} holds store secrets ({secrets}) and {}: `chmod 600 {shown}`",
                    readers.may_read()
                ),
                Held::Token => format!(
                    "the control-plane token file {shown} {} (it could report as this node): `chmod 600 {shown}`",
                    readers.may_be_read()
                ),
                Held::Credentials(named_by) => format!(
                    "{shown} holds the store's credentials ({named_by}) and {}: `chmod 600 {shown}`",
                    readers.may_be_read()
                ),
            })
        })
        .collect()
}

/// The line for store credentials from an instance-metadata endpoint the job may reach.
fn metadata_warning(metadata: Option<&MetadataReach>) -> Option<String> {
    let block = "block it for users other than root (e.g. `iptables -A OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT`) or give the agent keys of its own";
    match metadata {
        Some(MetadataReach::Reached(endpoint)) => Some(format!(
            "the store's credentials come from the instance-metadata endpoint {endpoint}, and the job's user reaches it too (it may take them): {block}"
        )),
        Some(MetadataReach::Unknown(endpoint)) => Some(format!(
            "the store's credentials come from the instance-metadata endpoint {endpoint}, which the job's processes may reach too (not checked): {block}"
        )),
        Some(MetadataReach::Blocked) | None => None,
    }
}

/// [`warnings`] for the agent's environment `env`, all on this thread.
#[cfg(test)]
fn warnings_in(
    config: &Config,
    metadata: Option<&MetadataReach>,
    env: &[(String, std::ffi::OsString)],
) -> Vec<String> {
    let mut out = readable_files(files_to_check(config, env));
    out.extend(metadata_warning(metadata));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_options_are_told_from_names() {
        for k in [
            "aws_secret_access_key",
            "aws_session_token",
            "azure_storage_account_key",
            "azure_storage_sas_key",
            "google_service_account_key",
            "azure_client_secret",
            "aws_sse_customer_key_base64",
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
        let said = warnings_in(&config, Some(&reached), &[]);
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].contains("(aws_secret_access_key)") && said[0].contains("chmod 600"));
        assert!(said[1].contains("control-plane token file"));
        assert!(said[2].contains("instance-metadata endpoint"));
        assert_eq!(
            warnings_in(&config, Some(&MetadataReach::Blocked), &[]).len(),
            2
        );
        for p in [&file, &token] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(warnings_in(&config, None, &[]).is_empty());
    }

    /// A variable or option naming a credential file is kept from the job, the file is not:
    /// one every user may read is named with its fix, as the keys themselves are.
    #[test]
    fn credential_files_every_user_may_read_are_named() {
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = top.path().join("gcp.json");
        let fed = top.path().join("federated");
        for p in [&key, &fed] {
            std::fs::write(p, "{}").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let text = format!(
            "[store]\nurl = \"gs://b\"\n[store.options]\nazure_federated_token_file = \"{}\"\n",
            fed.display()
        );
        let config = crate::config::resolve(None, &text, &|_| None, "/s".into()).unwrap();
        let env = [
            (
                "GOOGLE_APPLICATION_CREDENTIALS".to_string(),
                key.clone().into(),
            ),
            // Another provider's variable is not the store's credential.
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE".to_string(),
                fed.clone().into(),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE".to_string(),
                key.clone().into(),
            ),
        ];
        let said = warnings_in(&config, None, &env);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(
            said[0].contains("store option `azure_federated_token_file`")
                && said[0].contains(&format!("`chmod 600 {}`", fed.display())),
            "{said:?}"
        );
        assert!(
            said[1].contains("$GOOGLE_APPLICATION_CREDENTIALS")
                && said[1].contains(&format!("`chmod 600 {}`", key.display())),
            "{said:?}"
        );
        // S3: its variables, and the AWS profile's default files under $HOME.
        let config =
            crate::config::resolve(None, "[store]\nurl = \"s3://b\"\n", &|_| None, "/s".into())
                .unwrap();
        std::fs::create_dir(top.path().join(".aws")).unwrap();
        let profile = top.path().join(".aws/credentials");
        std::fs::write(&profile, "[default]\n").unwrap();
        std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o644)).unwrap();
        let env = [
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE".to_string(),
                fed.clone().into(),
            ),
            ("HOME".to_string(), top.path().into()),
        ];
        let said = warnings_in(&config, None, &env);
        assert_eq!(said.len(), 2, "{said:?}");
        assert!(said[0].contains("$AWS_WEB_IDENTITY_TOKEN_FILE"), "{said:?}");
        assert!(said[1].contains("the AWS profile"), "{said:?}");
        for p in [&key, &fed, &profile] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(warnings_in(&config, None, &env).is_empty());
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
        assert_eq!(who_may_read(&f), Some(Readers::Everyone));
        chmod(&f, 0o600);
        assert_eq!(who_may_read(&f), None);
        chmod(&f, 0o644);
        chmod(&dir, 0o700);
        assert_eq!(who_may_read(&f), None);
    }

    /// A secret of root's that a group other than root's may read (`0640 root:hpcusers`), or
    /// that an ACL lets a named user read, is the members' and that user's jobs' to read too.
    /// Root's own group, or a file another user owns (theirs to read anyway), are no finding.
    #[test]
    fn a_file_a_group_or_an_acl_lets_others_read_is_named() {
        if !nix::unistd::geteuid().is_root() {
            crate::testskip::skip("not root: a file's group cannot be set to another; not checked");
            return;
        }
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("d");
        std::fs::create_dir(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, "x").unwrap();
        let chmod = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        let chown =
            |p: &Path, u: u32, g: u32| std::os::unix::fs::chown(p, Some(u), Some(g)).unwrap();
        let gid = 4242;
        chmod(top.path(), 0o755);
        chmod(&dir, 0o755);
        chmod(&f, 0o640);
        chown(&f, 0, gid);
        let group = Some(Readers::Group(group_name(gid)));
        assert_eq!(who_may_read(&f), group);
        assert!(group_name(gid).contains("4242") || group_name(gid).starts_with('`'));
        chown(&f, 0, 0);
        assert_eq!(who_may_read(&f), None, "root's group");
        chown(&f, 0, gid);
        chmod(&dir, 0o750);
        assert_eq!(who_may_read(&f), None, "a directory the group may not pass");
        chown(&dir, 0, gid);
        assert_eq!(who_may_read(&f), group, "one it may");
        // Root's 0644 file in a `0750 root:4242` directory: the group's members read it too.
        chown(&f, 0, 0);
        chmod(&f, 0o644);
        assert_eq!(who_may_read(&f), group, "a directory's group");
        chmod(&f, 0o640);
        chown(&f, 0, gid);
        let text = format!(
            "[control_plane]\nurl = \"http://127.0.0.1:1\"\ntoken_file = \"{}\"\n",
            f.display()
        );
        let config = crate::config::resolve(None, &text, &|_| None, "/s".into()).unwrap();
        let said = warnings_in(&config, None, &[]);
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(
            said[0].contains("may be read by every member of group")
                && said[0].contains("chmod 600"),
            "{said:?}"
        );
        chown(&f, 4243, gid);
        assert_eq!(who_may_read(&f), None, "another user's file");

        // `setfacl -m u:4243:r f` on a `0600 root:root` file: the mode bits show 0640.
        chown(&f, 0, 0);
        let named = |user: u32| {
            [
                (0x01u16, 6u16, u32::MAX),
                (0x02, 4, user),
                (0x04, 0, u32::MAX),
                (0x10, 4, u32::MAX),
                (0x20, 0, u32::MAX),
            ]
        };
        if !set_acl(&f, &named(4243)) {
            crate::testskip::skip("no POSIX ACLs here: the ACL case is not checked");
            return;
        }
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(who_may_read(&f), Some(Readers::Acl));
        // `chmod 600`, the fix the line names, empties the mask.
        chmod(&f, 0o600);
        assert_eq!(who_may_read(&f), None);
        // An entry for the agent's own user (here root's) lets in no one else: granting a
        // non-root agent a root-owned secret that way was named at every run, with a fix
        // that took the agent's own access away.
        let own = nix::unistd::geteuid().as_raw();
        assert!(set_acl(&f, &named(own)));
        assert_eq!(who_may_read(&f), None, "the agent's own ACL entry");
    }

    /// Sets `entries` (tag, permissions, id) as the access ACL of `path`, as `setfacl` does
    /// (the runtime's `acl` tests have the same, on an fd); false where ACLs are not supported.
    fn set_acl(path: &std::path::Path, entries: &[(u16, u16, u32)]) -> bool {
        let mut acl = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            acl.extend_from_slice(&tag.to_le_bytes());
            acl.extend_from_slice(&perm.to_le_bytes());
            acl.extend_from_slice(&id.to_le_bytes());
        }
        let path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: both strings are NUL-terminated; `acl` is readable for its length.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        };
        rc == 0
    }
}
