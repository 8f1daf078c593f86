//! The standard AWS shared-config profile chain, for the S3 store: object_store reads
//! `AWS_*` variables but not `~/.aws/credentials` and `~/.aws/config`, and would otherwise
//! fall back to the instance-metadata endpoint, which off-cloud never answers.

use std::collections::HashMap;
use std::path::PathBuf;

/// Static keys (and where to send them) from one profile.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub name: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The profile `AWS_PROFILE` (else `AWS_DEFAULT_PROFILE`, else `default`) names, from
/// `AWS_SHARED_CREDENTIALS_FILE` (`~/.aws/credentials`) and `AWS_CONFIG_FILE`
/// (`~/.aws/config`). `Err` when a profile was asked for by name and has no keys.
pub fn load(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Profile>, String> {
    let named = env("AWS_PROFILE").or_else(|| env("AWS_DEFAULT_PROFILE"));
    let name = named.clone().unwrap_or_else(|| "default".into());
    let [creds_path, config_path] = files(env);
    let read = |p: &Option<PathBuf>| {
        p.as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| parse_ini(&t))
            .unwrap_or_default()
    };
    let creds = read(&creds_path);
    let config = read(&config_path);
    let from_creds = creds.get(&name);
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    let from_config = config.get(&config_section);
    let get = |key: &str| {
        from_creds
            .and_then(|s| s.get(key))
            .or_else(|| from_config.and_then(|s| s.get(key)))
            .cloned()
    };
    let profile = Profile {
        name: name.clone(),
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: get("region"),
        endpoint_url: get("endpoint_url"),
    };
    match (&profile.access_key_id, &profile.secret_access_key) {
        (Some(_), Some(_)) => Ok(Some(profile)),
        _ if named.is_some() => Err(format!(
            "AWS profile `{name}` has no aws_access_key_id/aws_secret_access_key in {} or {} (only static keys are read)",
            creds_path.map(|p| p.display().to_string()).unwrap_or_else(|| "~/.aws/credentials".into()),
            config_path.map(|p| p.display().to_string()).unwrap_or_else(|| "~/.aws/config".into()),
        )),
        _ => Ok(None),
    }
}

/// Where the profile chain reads: the credentials file, then the config file.
fn files(env: &dyn Fn(&str) -> Option<String>) -> [Option<PathBuf>; 2] {
    let home = env("HOME").map(PathBuf::from);
    let file = |var: &str, rel: &str| {
        env(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(rel)))
    };
    [
        file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
        file("AWS_CONFIG_FILE", ".aws/config"),
    ]
}

/// The variables [`load`] reads.
const PROFILE_VARS: [&str; 5] = [
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "HOME",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
];

/// A profile's keys for the S3 client, read again whenever its files change: a session
/// token a helper (vault-agent, a cron running `aws sts`) rewrites there before it expires.
/// Read once, a job that outlived the token had every later upload refused (`ExpiredToken`,
/// retried with the same token until the deadline: UPLOAD_ERROR).
#[derive(Debug)]
pub struct ProfileCredentials {
    env: HashMap<&'static str, String>,
    last: std::sync::Mutex<(FilesStamp, std::sync::Arc<object_store::aws::AwsCredential>)>,
    /// A look at the files is under way (perhaps held by a hung mount): no second one.
    looking: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// How long a request waits for a look at the profile's files before it signs with the
/// keys read before.
const PROFILE_LOOK: std::time::Duration = std::time::Duration::from_secs(5);

/// The files' (modified time, length, inode), to tell a rewrite (in place, or renamed over).
type FilesStamp = [Option<(std::time::SystemTime, u64, u64)>; 2];

impl ProfileCredentials {
    /// From the profile just loaded with this process's environment.
    pub fn new(profile: &Profile) -> Self {
        let env: HashMap<&'static str, String> = PROFILE_VARS
            .iter()
            .filter_map(|k| Some((*k, std::env::var(k).ok().filter(|v| !v.is_empty())?)))
            .collect();
        let stamp = Self::stamp(&env);
        ProfileCredentials {
            env,
            last: std::sync::Mutex::new((stamp, std::sync::Arc::new(credential(profile)))),
            looking: Default::default(),
        }
    }

    fn stamp(env: &HashMap<&'static str, String>) -> FilesStamp {
        files(&|k| env.get(k).cloned()).map(|p| {
            let md = std::fs::metadata(p?).ok()?;
            Some((
                md.modified().ok()?,
                md.len(),
                std::os::unix::fs::MetadataExt::ino(&md),
            ))
        })
    }
}

fn credential(p: &Profile) -> object_store::aws::AwsCredential {
    object_store::aws::AwsCredential {
        key_id: p.access_key_id.clone().unwrap_or_default(),
        secret_key: p.secret_access_key.clone().unwrap_or_default(),
        token: p.session_token.clone(),
    }
}

#[async_trait::async_trait]
impl object_store::CredentialProvider for ProfileCredentials {
    type Credential = object_store::aws::AwsCredential;

    /// The files are looked at off the reactor, one look at a time, and waited for
    /// [`PROFILE_LOOK`] at most: on a network or FUSE secrets mount that stopped answering,
    /// the stat and read held a runtime worker each, every other request waited on the lock,
    /// and once the workers were all held no timer fired (no terminal status either).
    async fn get_credential(&self) -> object_store::Result<std::sync::Arc<Self::Credential>> {
        use std::sync::atomic::Ordering::SeqCst;
        let (seen, keys) = {
            let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            (last.0, last.1.clone())
        };
        if self.looking.swap(true, SeqCst) {
            return Ok(keys);
        }
        /// Lets the next request look again however this look ends: set for good (a panic
        /// in the look, a task dropped before it ran at a runtime's end), every later
        /// request signed with the keys read before, rotated keys never read.
        struct Looked(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Looked {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let (env, looked) = (self.env.clone(), Looked(self.looking.clone()));
        let look = tokio::task::spawn_blocking(move || {
            let _looked = looked;
            if crate::fault::armed_at("profile-look-panics", "aws") {
                panic!("injected fault: the AWS profile's look panics");
            }
            let stamp = Self::stamp(&env);
            let loaded = (stamp != seen).then(|| load(&|k| env.get(k).cloned()));
            (stamp, loaded)
        });
        match tokio::time::timeout(PROFILE_LOOK, look).await {
            // A file caught half rewritten (no keys in it yet) keeps the keys read before.
            Ok(Ok((stamp, Some(Ok(Some(p)))))) => {
                tracing::info!(profile = %p.name, "the AWS profile's files changed; its keys are read again");
                let keys = std::sync::Arc::new(credential(&p));
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = (stamp, keys.clone());
                Ok(keys)
            }
            Ok(_) => Ok(keys),
            Err(_) => {
                tracing::warn!(
                    limit_s = PROFILE_LOOK.as_secs(),
                    "the AWS profile's files did not answer (a hung mount?); signing with the keys read before"
                );
                Ok(keys)
            }
        }
    }
}

/// `[section]` -> key -> value; `#`/`;` comments, keys lower-cased.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut section = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = Some(name.trim().to_string());
            continue;
        }
        if let (Some(s), Some((k, v))) = (&section, line.split_once('=')) {
            out.entry(s.clone())
                .or_default()
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_from_credentials_and_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id = D\naws_secret_access_key = DS\n\n[train]\n# comment\naws_access_key_id=T\naws_secret_access_key = TS\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[profile train]\nregion = eu-west-1\nendpoint_url = http://127.0.0.1:9\n",
        )
        .unwrap();
        let home = dir.path().display().to_string();
        let env = |k: &str| match k {
            "HOME" => Some(home.clone()),
            "AWS_PROFILE" => Some("train".into()),
            _ => None,
        };
        let p = load(&env).unwrap().unwrap();
        assert_eq!(p.access_key_id.as_deref(), Some("T"));
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        assert_eq!(p.endpoint_url.as_deref(), Some("http://127.0.0.1:9"));
        let default_env = |k: &str| (k == "HOME").then(|| home.clone());
        assert_eq!(
            load(&default_env)
                .unwrap()
                .unwrap()
                .access_key_id
                .as_deref(),
            Some("D")
        );
        let missing = |k: &str| match k {
            "HOME" => Some(home.clone()),
            "AWS_PROFILE" => Some("nope".into()),
            _ => None,
        };
        assert!(load(&missing).unwrap_err().contains("`nope`"));
        let nothing = |k: &str| (k == "HOME").then(|| "/nonexistent".to_string());
        assert_eq!(load(&nothing).unwrap(), None);
    }

    /// A provider whose credentials file `creds` (written here) holds keys `A`, read once.
    fn provider_of_keys_a(creds: &std::path::Path) -> ProfileCredentials {
        std::fs::write(
            creds,
            "[default]\naws_access_key_id = A\naws_secret_access_key = AS\n",
        )
        .unwrap();
        let env: HashMap<&'static str, String> =
            [("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string())].into();
        let profile = load(&|k| env.get(k).cloned()).unwrap().unwrap();
        ProfileCredentials {
            env: env.clone(),
            last: std::sync::Mutex::new((
                ProfileCredentials::stamp(&env),
                std::sync::Arc::new(credential(&profile)),
            )),
            looking: Default::default(),
        }
    }

    /// A look that panics lets the next request look again: its flag left set, every later
    /// request signed with the keys read before, rotated ones never read.
    #[tokio::test]
    async fn a_look_that_panicked_does_not_stop_the_next_one() {
        use object_store::CredentialProvider;
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let provider = provider_of_keys_a(&creds);
        let rotated = "[default]\naws_access_key_id = B\naws_secret_access_key = BS\n";
        std::fs::write(&creds, rotated).unwrap();
        let armed = crate::fault::arm("profile-look-panics", "aws");
        assert_eq!(provider.get_credential().await.unwrap().key_id, "A");
        drop(armed);
        // A new stamp for certain (mtime granularity): the size changes too.
        std::fs::write(&creds, format!("{rotated}\n")).unwrap();
        assert_eq!(provider.get_credential().await.unwrap().key_id, "B");
    }

    /// The credentials file on a mount that stops answering (here a FIFO renamed over it,
    /// whose read never returns): a request signs with the keys read before, within the
    /// bound, and so does every one after it while the look is held.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_profile_file_that_does_not_answer_keeps_the_keys_read_before() {
        use object_store::CredentialProvider;
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("credentials");
        let provider = provider_of_keys_a(&creds);
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::rename(&fifo, &creds).unwrap();
        let started = std::time::Instant::now();
        for _ in 0..3 {
            let keys = tokio::time::timeout(PROFILE_LOOK * 3, provider.get_credential())
                .await
                .expect("held by the profile's file")
                .unwrap();
            assert_eq!(keys.key_id, "A");
        }
        assert!(
            started.elapsed() < PROFILE_LOOK * 3,
            "{:?}",
            started.elapsed()
        );
        // Let the held read go.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&creds)
            .map(drop)
            .unwrap();
    }
}
