//! The agent's TOML configuration (contract §2), environment overrides, and defaults.
//! Every problem is reported at once, on one line, naming the file and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use c3_runtime::context::ForwardTo;
use c3_runtime::display::Secret;
use c3_runtime::live::{LiveOptions, WatchMode};
use c3_runtime::report::ControlPlaneConfig;
use c3_runtime::store::StoreConfig;
use c3_runtime::upload::UploadOptions;

pub const SYSTEM_CONFIG: &str = "/etc/c3-agent/config.toml";

/// S3's largest part.
const MAX_PART_BYTES: u64 = 5 << 30;
/// Most watcher events queued: far past any use, far below what a channel can hold.
const MAX_EVENT_QUEUE: usize = 1 << 24;
/// The longest duration a setting may hold: a century, in seconds.
const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    state_dir: Option<PathBuf>,
    jobs_root: Option<PathBuf>,
    private_files: Option<bool>,
    kill_grace_secs: Option<u64>,
    log_format: Option<String>,
    #[serde(default)]
    store: StoreSection,
    control_plane: Option<ControlPlaneSection>,
    #[serde(default)]
    sync: SyncSection,
    #[serde(default)]
    upload: UploadSection,
    #[serde(default)]
    job: JobSection,
    #[serde(default)]
    retention: RetentionSection,
    #[serde(default)]
    gc: GcSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetentionSection {
    succeeded_days: Option<u64>,
    failed_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GcSection {
    grace_hours: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct JobSection {
    forward_signals: Option<Vec<String>>,
    forward_to: Option<String>,
    stop_deadline_secs: Option<u64>,
    max_log_bytes: Option<u64>,
    dataset_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreSection {
    url: Option<String>,
    /// Strings for object_store's builder, and `retry_deadline_secs` (a number) where the
    /// contract's own example puts it: see [`store_options`].
    #[serde(default)]
    options: BTreeMap<String, toml::Value>,
    max_retries: Option<usize>,
    retry_timeout_secs: Option<u64>,
    preflight_timeout_secs: Option<u64>,
    max_manifest_bytes: Option<u64>,
    retry_deadline_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneSection {
    url: Option<String>,
    token_file: Option<PathBuf>,
    give_up_secs: Option<u64>,
    max_reply_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncSection {
    settle_ms: Option<u64>,
    live: Option<bool>,
    mode: Option<String>,
    poll_ms: Option<u64>,
    event_queue: Option<usize>,
    manifest_interval_ms: Option<u64>,
    max_watches: Option<usize>,
    live_cpus: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadSection {
    multipart_threshold_bytes: Option<u64>,
    min_part_size_bytes: Option<u64>,
    parts_in_flight: Option<usize>,
    files_in_flight: Option<usize>,
    memory_budget_bytes: Option<u64>,
    max_file_bytes: Option<u64>,
    hole_budget_bytes: Option<u64>,
    shared_budget_bytes: Option<u64>,
    /// Bytes per second for all uploads together; 0 or absent: unlimited.
    bandwidth_limit_bytes_per_sec: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any.
    pub source: Option<PathBuf>,
    pub state_dir: PathBuf,
    /// A spec's workdir must lie under it (default `<state_dir>/jobs`).
    pub jobs_root: PathBuf,
    /// Files and directories the agent creates are private (umask 077); false keeps the
    /// umask the agent was started with.
    pub private_files: bool,
    pub max_manifest_bytes: u64,
    pub kill_grace: Duration,
    pub log_format: LogFormat,
    pub store: StoreConfig,
    pub preflight_timeout: Duration,
    pub control_plane: Option<ControlPlaneSettings>,
    /// Sync while the job runs (`None`: `sync.live = false`, upload at the end only).
    pub live: Option<LiveOptions>,
    pub upload: UploadOptions,
    /// Signals passed on to the job's processes (numbers), `[job] forward_signals`.
    pub forward_signals: Vec<i32>,
    /// `[job] forward_to`: "leader" (default) or "all".
    pub forward_to: ForwardTo,
    /// `[job] stop_deadline_secs`: after SIGTERM, the agent is done within this.
    pub stop_deadline: Duration,
    /// `[job] max_log_bytes`: what is kept of each of the job's streams.
    pub max_log_bytes: u64,
    /// `[job] dataset_timeout_secs`: how long a job's input datasets may take to arrive.
    pub dataset_timeout: Duration,
    /// `[retention]`: how long finished jobs' local data is kept.
    pub retention: c3_runtime::retention::Retention,
    /// `[gc] grace_hours`: unreferenced blobs younger than this are kept.
    pub gc_grace: Duration,
    /// What the agent says about its config at start: settings the file gives one value and
    /// the environment another (a unit's `Environment=C3_AGENT_STOP_DEADLINE_SECS=280`
    /// silently beat an operator's edit of the file), settings held to a limit.
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    pub url: url::Url,
    pub token_file: Option<PathBuf>,
    pub give_up: Duration,
    pub max_reply_bytes: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("config{}: {}", .source_file.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default(), .problems.join("; "))]
pub struct ConfigError {
    pub source_file: Option<PathBuf>,
    pub problems: Vec<String>,
}

/// The least `control_plane.max_reply_bytes`.
const MIN_REPLY_BYTES: usize = 1024;

/// Which file to read: `--config`, else `$C3_AGENT_CONFIG`, else the system file if present.
pub fn locate(
    flag: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<(PathBuf, bool)> {
    if let Some(p) = flag {
        return Some((p.to_path_buf(), true));
    }
    if let Some(p) = env("C3_AGENT_CONFIG").filter(|s| !s.is_empty()) {
        return Some((PathBuf::from(p), true));
    }
    // Absent only when nothing is there: a dangling symlink (into a secrets mount not yet
    // up) or a stat that fails otherwise read as "no config", and the node ran its jobs on
    // the defaults (its own disk for a store, no control plane). Read, it fails as it should.
    match std::fs::symlink_metadata(SYSTEM_CONFIG) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => Some((PathBuf::from(SYSTEM_CONFIG), false)),
    }
}

/// Every `C3_AGENT_*` variable the agent reads. Any other is a typo (a setting silently
/// ignored is worse than none).
const KNOWN_VARS: &[&str] = &[
    "C3_AGENT_BANDWIDTH_LIMIT",
    "C3_AGENT_CONFIG",
    "C3_AGENT_CONTROL_PLANE_URL",
    "C3_AGENT_DATASET_TIMEOUT_SECS",
    "C3_AGENT_FAULT",
    "C3_AGENT_FORWARD_SIGNALS",
    "C3_AGENT_FORWARD_TO",
    "C3_AGENT_GC_GRACE_HOURS",
    "C3_AGENT_GIVE_UP_SECS",
    "C3_AGENT_JOBS_ROOT",
    "C3_AGENT_KILL_GRACE_SECS",
    "C3_AGENT_LIVE_CPUS",
    "C3_AGENT_LOG",
    "C3_AGENT_LOG_FORMAT",
    "C3_AGENT_MAX_LOG_BYTES",
    "C3_AGENT_PRIVATE_FILES",
    "C3_AGENT_RETENTION_FAILED_DAYS",
    "C3_AGENT_RETENTION_SUCCEEDED_DAYS",
    "C3_AGENT_SETTLE_MS",
    "C3_AGENT_SOCKET",
    "C3_AGENT_STATE_DIR",
    "C3_AGENT_STOP_DEADLINE_SECS",
    "C3_AGENT_STORE_MAX_RETRIES",
    "C3_AGENT_STORE_PREFLIGHT_TIMEOUT_SECS",
    "C3_AGENT_STORE_RETRY_DEADLINE_SECS",
    "C3_AGENT_STORE_RETRY_TIMEOUT_SECS",
    "C3_AGENT_STORE_URL",
    "C3_AGENT_SYNC_LIVE",
    "C3_AGENT_SYNC_MODE",
    "C3_AGENT_TOKEN_FILE",
];

/// A problem for each `C3_AGENT_*` variable in `names` the agent does not know.
fn unknown_vars(names: impl Iterator<Item = String>) -> Vec<String> {
    let mut problems: Vec<String> = names
        .filter(|n| n.starts_with("C3_AGENT_") && !KNOWN_VARS.contains(&n.as_str()))
        .map(|n| {
            let hint = c3_proto::spec::closest(&n, KNOWN_VARS)
                .map(|k| format!("; did you mean {k}?"))
                .unwrap_or_default();
            format!("${n} is not a c3-agent setting{hint}")
        })
        .collect();
    problems.sort();
    problems
}

/// The setting a variable overrides, for a message about it.
fn field_of(var: &str) -> Option<&'static str> {
    Some(match var {
        "C3_AGENT_BANDWIDTH_LIMIT" => "upload.bandwidth_limit_bytes_per_sec",
        "C3_AGENT_CONFIG" => "the config file",
        "C3_AGENT_CONTROL_PLANE_URL" => "control_plane.url",
        "C3_AGENT_DATASET_TIMEOUT_SECS" => "job.dataset_timeout_secs",
        "C3_AGENT_FORWARD_SIGNALS" => "job.forward_signals",
        "C3_AGENT_FORWARD_TO" => "job.forward_to",
        "C3_AGENT_GC_GRACE_HOURS" => "gc.grace_hours",
        "C3_AGENT_GIVE_UP_SECS" => "control_plane.give_up_secs",
        "C3_AGENT_JOBS_ROOT" => "jobs_root",
        "C3_AGENT_KILL_GRACE_SECS" => "kill_grace_secs",
        "C3_AGENT_LIVE_CPUS" => "sync.live_cpus",
        "C3_AGENT_LOG" => "the log filter",
        "C3_AGENT_LOG_FORMAT" => "log_format",
        "C3_AGENT_MAX_LOG_BYTES" => "job.max_log_bytes",
        "C3_AGENT_PRIVATE_FILES" => "private_files",
        "C3_AGENT_RETENTION_FAILED_DAYS" => "retention.failed_days",
        "C3_AGENT_RETENTION_SUCCEEDED_DAYS" => "retention.succeeded_days",
        "C3_AGENT_SETTLE_MS" => "sync.settle_ms",
        "C3_AGENT_STATE_DIR" => "state_dir",
        "C3_AGENT_STOP_DEADLINE_SECS" => "job.stop_deadline_secs",
        "C3_AGENT_STORE_MAX_RETRIES" => "store.max_retries",
        "C3_AGENT_STORE_PREFLIGHT_TIMEOUT_SECS" => "store.preflight_timeout_secs",
        "C3_AGENT_STORE_RETRY_DEADLINE_SECS" => "store.retry_deadline_secs",
        "C3_AGENT_STORE_RETRY_TIMEOUT_SECS" => "store.retry_timeout_secs",
        "C3_AGENT_STORE_URL" => "store.url",
        "C3_AGENT_SYNC_LIVE" => "sync.live",
        "C3_AGENT_SYNC_MODE" => "sync.mode",
        "C3_AGENT_TOKEN_FILE" => "control_plane.token_file",
        _ => return None,
    })
}

/// A problem for each variable the agent reads as text whose value is not UTF-8: read as
/// unset, `$C3_AGENT_STORE_URL` silently meant the node-local file store. (A path is refused
/// too: the config file, UTF-8 by TOML's rule, could not name it either.) `$C3_AGENT_SOCKET`
/// is a path read as it is.
fn not_utf8_vars(get: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Vec<String> {
    KNOWN_VARS
        .iter()
        .filter(|&&k| k != "C3_AGENT_SOCKET")
        .filter(|&&k| get(k).is_some_and(|v| v.to_str().is_none()))
        .map(|&k| match field_of(k) {
            Some(field) if field.contains(' ') => format!("${k} ({field}): not UTF-8"),
            Some(field) => format!("`{field}` (from ${k}): not UTF-8"),
            None => format!("${k}: not UTF-8"),
        })
        .collect()
}

pub fn load(flag: Option<&Path>) -> Result<Config, ConfigError> {
    let not_utf8 = not_utf8_vars(&|k| std::env::var_os(k));
    if !not_utf8.is_empty() {
        // Before the file is looked for: `$C3_AGENT_CONFIG` may be one of them.
        return Err(ConfigError {
            source_file: None,
            problems: not_utf8,
        });
    }
    let env = |k: &str| std::env::var(k).ok();
    let located = locate(flag, &env);
    let (file, text) = match &located {
        None => (None, String::new()),
        Some((path, _)) => match std::fs::read_to_string(path) {
            Ok(t) => (Some(path.clone()), t),
            Err(e) => {
                return Err(ConfigError {
                    source_file: Some(path.clone()),
                    problems: vec![format!("cannot read: {e}")],
                })
            }
        },
    };
    let unknown = unknown_vars(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()));
    match resolve(file.clone(), &text, &env, default_state_dir()) {
        Ok(c) if unknown.is_empty() => Ok(c),
        Ok(_) => Err(ConfigError {
            source_file: file,
            problems: unknown,
        }),
        Err(mut e) => {
            e.problems.extend(unknown);
            Err(e)
        }
    }
}

/// The store's builder options, as strings. The contract's config example puts
/// `retry_deadline_secs` after `[store.options]`, where TOML files it: a config copied from it
/// was refused on S3 ("unknown option") and the value ignored on a file store, so there it
/// means `store.retry_deadline_secs` (both set and different: a problem naming both).
fn store_options(store: &mut StoreSection, problems: &mut Vec<String>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (key, value) in std::mem::take(&mut store.options) {
        match (key.as_str(), value) {
            ("retry_deadline_secs", toml::Value::Integer(n)) if n >= 0 => {
                let n = n as u64;
                match store.retry_deadline_secs {
                    Some(was) if was != n => problems.push(format!(
                        "`store.options.retry_deadline_secs` ({n}) differs from `store.retry_deadline_secs` ({was}): keep one"
                    )),
                    _ => store.retry_deadline_secs = Some(n),
                }
            }
            ("retry_deadline_secs", _) => problems.push(
                "`store.options.retry_deadline_secs`: a whole number of seconds (it means `store.retry_deadline_secs`)".into(),
            ),
            (_, toml::Value::String(v)) => {
                out.insert(key, v);
            }
            (_, other) => problems.push(format!(
                "`store.options.{key}`: a string (\"...\"), not a {}",
                other.type_str()
            )),
        }
    }
    out
}

/// Parses `text`, applies `env` overrides and defaults.
pub fn resolve(
    source_file: Option<PathBuf>,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
    default_state: PathBuf,
) -> Result<Config, ConfigError> {
    let fail = |problems: Vec<String>| ConfigError {
        source_file: source_file.clone(),
        problems,
    };
    let mut file: FileConfig = toml::from_str(text).map_err(|e| {
        let msg = e.message().to_string();
        let at = e
            .span()
            .map(|s| line_of(text, s.start))
            .map(|l| format!("line {l}: "))
            .unwrap_or_default();
        let key = toml_error_key(&e, text)
            .filter(|k| !msg.contains(&format!("`{k}`")))
            .map(|k| format!("`{k}`: "))
            .unwrap_or_default();
        fail(vec![format!("{at}{key}{msg}")])
    })?;
    let mut problems = Vec::new();
    let mut warnings = Vec::new();
    let options = store_options(&mut file.store, &mut problems);

    let mut num = |var: &str, key: &str, slot: &mut Option<u64>| {
        if let Some(v) = env(var) {
            match v.trim().parse() {
                Ok(n) => {
                    if let Some(was) = slot.filter(|&was| was != n) {
                        warnings.push(format!(
                            "`{key}` is {n} from ${var}, over the config file's {was}"
                        ));
                    }
                    *slot = Some(n)
                }
                Err(_) => problems.push(format!(
                    "`{key}` (from ${var}): `{v}` is not a whole number"
                )),
            }
        }
    };
    // Every whole-number setting and the variable that overrides it.
    for (var, key, slot) in [
        (
            "C3_AGENT_KILL_GRACE_SECS",
            "kill_grace_secs",
            &mut file.kill_grace_secs,
        ),
        (
            "C3_AGENT_STOP_DEADLINE_SECS",
            "job.stop_deadline_secs",
            &mut file.job.stop_deadline_secs,
        ),
        (
            "C3_AGENT_MAX_LOG_BYTES",
            "job.max_log_bytes",
            &mut file.job.max_log_bytes,
        ),
        (
            "C3_AGENT_DATASET_TIMEOUT_SECS",
            "job.dataset_timeout_secs",
            &mut file.job.dataset_timeout_secs,
        ),
        (
            "C3_AGENT_RETENTION_SUCCEEDED_DAYS",
            "retention.succeeded_days",
            &mut file.retention.succeeded_days,
        ),
        (
            "C3_AGENT_RETENTION_FAILED_DAYS",
            "retention.failed_days",
            &mut file.retention.failed_days,
        ),
        (
            "C3_AGENT_GC_GRACE_HOURS",
            "gc.grace_hours",
            &mut file.gc.grace_hours,
        ),
        (
            "C3_AGENT_STORE_RETRY_TIMEOUT_SECS",
            "store.retry_timeout_secs",
            &mut file.store.retry_timeout_secs,
        ),
        (
            "C3_AGENT_STORE_RETRY_DEADLINE_SECS",
            "store.retry_deadline_secs",
            &mut file.store.retry_deadline_secs,
        ),
        (
            "C3_AGENT_STORE_PREFLIGHT_TIMEOUT_SECS",
            "store.preflight_timeout_secs",
            &mut file.store.preflight_timeout_secs,
        ),
        (
            "C3_AGENT_SETTLE_MS",
            "sync.settle_ms",
            &mut file.sync.settle_ms,
        ),
        (
            "C3_AGENT_BANDWIDTH_LIMIT",
            "upload.bandwidth_limit_bytes_per_sec",
            &mut file.upload.bandwidth_limit_bytes_per_sec,
        ),
    ] {
        num(var, key, slot);
    }
    let mut retries = file.store.max_retries.map(|n| n as u64);
    num(
        "C3_AGENT_STORE_MAX_RETRIES",
        "store.max_retries",
        &mut retries,
    );
    let mut cp = file.control_plane.take();
    // Only a URL makes a control plane: the unit file may set the token file on every node.
    if env("C3_AGENT_CONTROL_PLANE_URL").is_some() {
        cp.get_or_insert_with(ControlPlaneSection::default);
    }
    // Checked with no control plane too: a bad value was accepted on every node without one,
    // and failed only where a control plane was set, by its config file, later.
    let mut unused = None;
    let give_up = match cp.as_mut() {
        Some(section) => &mut section.give_up_secs,
        None => &mut unused,
    };
    num(
        "C3_AGENT_GIVE_UP_SECS",
        "control_plane.give_up_secs",
        give_up,
    );
    if unused.is_some() {
        warnings.push(
            "$C3_AGENT_GIVE_UP_SECS is set, but no control plane is: it has nothing to bound"
                .into(),
        );
    }
    if let Some(v) = env("C3_AGENT_STATE_DIR") {
        file.state_dir = Some(PathBuf::from(v));
    }
    if let Some(v) = env("C3_AGENT_JOBS_ROOT") {
        file.jobs_root = Some(PathBuf::from(v));
    }
    if let Some(v) = env("C3_AGENT_PRIVATE_FILES") {
        match v.as_str() {
            "true" | "1" | "on" => file.private_files = Some(true),
            "false" | "0" | "off" => file.private_files = Some(false),
            _ => problems.push(format!(
                "`private_files` (from $C3_AGENT_PRIVATE_FILES): `{v}` is not true or false"
            )),
        }
    }
    if let Some(v) = env("C3_AGENT_LOG_FORMAT") {
        file.log_format = Some(v);
    }
    if let Some(v) = env("C3_AGENT_LIVE_CPUS") {
        file.sync.live_cpus = Some(v);
    }
    if let Some(v) = env("C3_AGENT_SYNC_MODE") {
        file.sync.mode = Some(v);
    }
    if let Some(v) = env("C3_AGENT_SYNC_LIVE") {
        match v.as_str() {
            "true" | "1" | "on" => file.sync.live = Some(true),
            "false" | "0" | "off" => file.sync.live = Some(false),
            _ => problems.push(format!(
                "`sync.live` (from $C3_AGENT_SYNC_LIVE): `{v}` is not true or false"
            )),
        }
    }
    if let Some(v) = env("C3_AGENT_STORE_URL") {
        file.store.url = Some(v);
    }
    if let Some(section) = cp.as_mut() {
        if let Some(v) = env("C3_AGENT_CONTROL_PLANE_URL") {
            section.url = Some(v);
        }
        if let Some(v) = env("C3_AGENT_TOKEN_FILE") {
            if let (true, Some(file)) = (v.is_empty(), &section.token_file) {
                // Meant by a unit's drop-in for a control plane that takes no token: said,
                // since the 401s it would cause otherwise come only later.
                warnings.push(format!(
                    "`control_plane.token_file` is {} in the config file, emptied by $C3_AGENT_TOKEN_FILE: no token is sent",
                    file.display()
                ));
            }
            section.token_file = Some(PathBuf::from(v));
        }
    }

    let state_dir = file.state_dir.unwrap_or(default_state);
    if let Some(why) = unusable_path(&state_dir) {
        problems.push(format!("`state_dir`: `{}` {why}", state_dir.display()));
    } else if state_dir.as_os_str().is_empty() {
        problems.push(
            "`state_dir`: no default for this user (no $XDG_STATE_HOME, no $HOME, no home in its passwd entry): set one".into(),
        );
    } else if !state_dir.is_absolute() {
        problems.push(format!(
            "`state_dir`: `{}` must be an absolute path",
            state_dir.display()
        ));
    }
    let jobs_root_unusable = file.jobs_root.as_deref().and_then(unusable_path);
    let jobs_root = lexical_clean(
        &file
            .jobs_root
            .unwrap_or_else(|| c3_runtime::statedir::StateDir::new(&state_dir).jobs_dir()),
    );
    // A jobs root below no state dir is that one problem, said once.
    let below_no_state_dir = jobs_root.is_relative() && state_dir.as_os_str().is_empty();
    if let Some(why) = jobs_root_unusable {
        // `/srv/../../etc`: every spec's workdir below it was refused for its `..`.
        problems.push(format!("`jobs_root`: `{}` {why}", jobs_root.display()));
    } else if !below_no_state_dir && (!jobs_root.is_absolute() || jobs_root == Path::new("/")) {
        problems.push(format!(
            "`jobs_root`: `{}` must be an absolute path below /",
            jobs_root.display()
        ));
    }
    let log_format = match file.log_format.as_deref() {
        None | Some("human") | Some("text") => LogFormat::Human,
        Some("json") => LogFormat::Json,
        Some(other) => {
            problems.push(format!("`log_format`: `{other}` is not `human` or `json`"));
            LogFormat::Human
        }
    };
    let store_url = match file.store.url {
        Some(u) => u,
        // Percent-encoded: a state dir named `/scratch/team#1/c3` made `file:///scratch/team#1/c3/store`,
        // whose `#` began a fragment, and the store went to `/scratch/team`.
        None => {
            let dir = c3_runtime::statedir::StateDir::new(&state_dir).default_store_dir();
            match url::Url::from_directory_path(&dir) {
                Ok(u) => u.as_str().trim_end_matches('/').to_string(),
                // A relative state dir, refused above.
                Err(()) => format!("file://{}", dir.display()),
            }
        }
    };
    if let Err(e) = url::Url::parse(&store_url) {
        // Not echoed: it may hold a credential (`user:pass@`), and it does not parse.
        problems.push(format!("`store.url`: not a URL: {e}"));
    }
    let control_plane = cp.and_then(|section| {
        let Some(raw) = section.url else {
            problems.push(
                "`control_plane.url`: missing (remove [control_plane] to run without one)".into(),
            );
            return None;
        };
        // Replies are cut at it: 0 cut every one to nothing, and the quota a registration's
        // reply names was never heard (the warning lost), without a word.
        if section.max_reply_bytes.is_some_and(|n| n < MIN_REPLY_BYTES) {
            problems.push(format!(
                "`control_plane.max_reply_bytes`: at least {MIN_REPLY_BYTES} (a reply cut shorter says nothing)"
            ));
        }
        match url::Url::parse(&raw) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => Some(ControlPlaneSettings {
                url: u,
                token_file: section.token_file,
                give_up: Duration::from_secs(section.give_up_secs.unwrap_or(60)),
                max_reply_bytes: section
                    .max_reply_bytes
                    .unwrap_or(c3_runtime::report::DEFAULT_MAX_REPLY_BYTES),
            }),
            Ok(_) => {
                problems.push(format!(
                    "`control_plane.url`: `{}` must be http:// or https://",
                    c3_runtime::display::shown_url(&raw)
                ));
                None
            }
            Err(e) => {
                problems.push(format!("`control_plane.url`: not a URL: {e}"));
                None
            }
        }
    });
    let defaults = UploadOptions::default();
    let upload = UploadOptions {
        multipart_threshold: file
            .upload
            .multipart_threshold_bytes
            .unwrap_or(defaults.multipart_threshold),
        min_part_size: file
            .upload
            .min_part_size_bytes
            .unwrap_or(defaults.min_part_size),
        parts_in_flight: file
            .upload
            .parts_in_flight
            .unwrap_or(defaults.parts_in_flight),
        files_in_flight: file
            .upload
            .files_in_flight
            .unwrap_or(defaults.files_in_flight),
        memory_budget: file
            .upload
            .memory_budget_bytes
            .unwrap_or(defaults.memory_budget),
        bandwidth_limit: file
            .upload
            .bandwidth_limit_bytes_per_sec
            .filter(|&n| n > 0)
            .map(c3_runtime::ratelimit::RateLimit::new),
        auto_in_flight: file.upload.files_in_flight.is_none()
            && file.upload.parts_in_flight.is_none(),
        max_file_bytes: file
            .upload
            .max_file_bytes
            .unwrap_or(defaults.max_file_bytes),
        hole_budget: file
            .upload
            .hole_budget_bytes
            .unwrap_or(defaults.hole_budget),
        shared_budget: file
            .upload
            .shared_budget_bytes
            .unwrap_or(defaults.shared_budget),
    };
    // A file up to the threshold is read whole into memory, and sent in one PUT. Past the
    // budget it is held to the budget (the uploader does), as a config that worked before
    // this limit still does; past S3's largest PUT nothing could work.
    if let Some(t) = file.upload.multipart_threshold_bytes {
        if t > MAX_PART_BYTES {
            problems.push(format!(
                "`upload.multipart_threshold_bytes`: at most {MAX_PART_BYTES} (5 GiB, S3's largest PUT)"
            ));
        } else if t > upload.memory_budget {
            warnings.push(format!(
                "`upload.multipart_threshold_bytes` ({t}) is over `upload.memory_budget_bytes` ({}): a file up to it would be read whole into memory, so it is held to the budget",
                upload.memory_budget
            ));
        }
    }
    if upload.max_file_bytes == 0 {
        problems.push("`upload.max_file_bytes` must be at least 1".into());
    }
    if upload.min_part_size < 5 * 1024 * 1024 {
        problems.push(
            "`upload.min_part_size_bytes`: must be at least 5 MiB (S3's smallest part)".into(),
        );
    }
    // Part sizes are rounded up to whole MiB: near 2^64 that overflowed (a panic mid-upload).
    if upload.min_part_size > MAX_PART_BYTES {
        problems.push(format!(
            "`upload.min_part_size_bytes`: at most {MAX_PART_BYTES} (5 GiB, S3's largest part)"
        ));
    }
    // A part is sent from memory whole (one request), whatever the budget: a part larger
    // than it holds that much, and every other file waits behind it.
    if upload.min_part_size > upload.memory_budget {
        warnings.push(format!(
            "`upload.min_part_size_bytes` ({}) is over `upload.memory_budget_bytes` ({}): each part is held in memory whole, so the agent may hold a part's size, not the budget",
            upload.min_part_size, upload.memory_budget
        ));
    }
    if upload.parts_in_flight == 0 || upload.files_in_flight == 0 {
        problems.push(
            "`upload.parts_in_flight` and `upload.files_in_flight` must be at least 1".into(),
        );
    }
    let mode = match file.sync.mode.as_deref() {
        None | Some("inotify") => WatchMode::Inotify,
        Some("poll") => WatchMode::Poll,
        Some(other) => {
            problems.push(format!("`sync.mode`: `{other}` is not `inotify` or `poll`"));
            WatchMode::Inotify
        }
    };
    if file.sync.event_queue == Some(0) || file.sync.poll_ms == Some(0) {
        problems.push("`sync.event_queue` and `sync.poll_ms` must be at least 1".into());
    }
    // A channel's capacity: tokio panics past usize::MAX >> 3, when the job starts.
    if file.sync.event_queue.is_some_and(|n| n > MAX_EVENT_QUEUE) {
        problems.push(format!("`sync.event_queue`: at most {MAX_EVENT_QUEUE}"));
    }
    let live_cpus = live_cpus(file.sync.live_cpus.as_deref(), &mut problems);
    let live = file.sync.live.unwrap_or(true).then(|| LiveOptions {
        settle: Duration::from_millis(file.sync.settle_ms.unwrap_or(1000)),
        mode,
        poll_interval: Duration::from_millis(file.sync.poll_ms.unwrap_or(2000)),
        event_queue: file.sync.event_queue.unwrap_or(4096),
        manifest_interval: Duration::from_millis(file.sync.manifest_interval_ms.unwrap_or(3000)),
        max_watches: file.sync.max_watches.unwrap_or(8192),
        cpus: live_cpus,
    });
    if let Some(v) = env("C3_AGENT_FORWARD_SIGNALS") {
        file.job.forward_signals = Some(
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        );
    }
    let forward_signals = file
        .job
        .forward_signals
        .unwrap_or_else(|| vec!["USR1".into(), "USR2".into()])
        .iter()
        .filter_map(|name| match forwardable_signal(name) {
            Ok(n) => Some(n),
            Err(why) => {
                problems.push(format!("`job.forward_signals`: `{name}` {why}"));
                None
            }
        })
        .collect();
    if let Some(v) = env("C3_AGENT_FORWARD_TO") {
        file.job.forward_to = Some(v);
    }
    let forward_to = match file.job.forward_to.as_deref().map(str::trim) {
        None | Some("leader") => ForwardTo::Leader,
        Some("all") => ForwardTo::All,
        Some(other) => {
            problems.push(format!(
                "`job.forward_to`: `{other}` is not `leader` or `all`"
            ));
            ForwardTo::Leader
        }
    };
    // Every duration is added to a clock somewhere (a deadline, a sleep): past what a clock
    // holds, that panics (`kill_grace_secs = 18446744073709551615` was exit 101 at the job's
    // first stop). A century is more than any setting means.
    let (s, ms) = (1, 1_000);
    for (key, value, per_sec) in [
        ("kill_grace_secs", file.kill_grace_secs, s),
        ("job.stop_deadline_secs", file.job.stop_deadline_secs, s),
        ("job.dataset_timeout_secs", file.job.dataset_timeout_secs, s),
        ("store.retry_timeout_secs", file.store.retry_timeout_secs, s),
        (
            "store.retry_deadline_secs",
            file.store.retry_deadline_secs,
            s,
        ),
        (
            "store.preflight_timeout_secs",
            file.store.preflight_timeout_secs,
            s,
        ),
        ("sync.settle_ms", file.sync.settle_ms, ms),
        ("sync.poll_ms", file.sync.poll_ms, ms),
    ] {
        let most = MAX_DURATION_SECS * per_sec;
        if value.is_some_and(|v| v > most) {
            problems.push(format!("`{key}`: at most {most} (a century)"));
        }
    }
    // The store's HTTP client reads these only when a store is opened, and some values it
    // cannot hold (a timeout past what a clock adds, a frame size h2 asserts on) panicked
    // in a request the retries then waited out: refused here, naming the key.
    for (key, value) in &options {
        if let Some(client_key) = c3_runtime::storehttp::client_key(key) {
            if let Err(why) = c3_runtime::storehttp::check(client_key, value) {
                problems.push(format!("`store.options.{key}`: {why}"));
            }
        }
    }
    // `gc` takes a blob no manifest names once it is an hour old: live sync lists what it
    // stored well within that (a blob found stored is trusted for half of it).
    let most = c3_runtime::manifest::CHECKPOINT_EVERY.as_millis();
    if file
        .sync
        .manifest_interval_ms
        .is_some_and(|v| u128::from(v) > most)
    {
        problems.push(format!(
            "`sync.manifest_interval_ms`: at most {most} (gc may delete a blob no manifest names once it is an hour old)"
        ));
    }
    if control_plane.as_ref().is_some_and(|c| c.give_up.is_zero()) {
        problems.push("`control_plane.give_up_secs` must be at least 1".into());
    }
    if control_plane
        .as_ref()
        .is_some_and(|c| c.give_up.as_secs() > MAX_DURATION_SECS)
    {
        problems.push(format!(
            "`control_plane.give_up_secs`: at most {MAX_DURATION_SECS} (a century)"
        ));
    }
    for (key, value, unit_secs) in [
        (
            "retention.succeeded_days",
            file.retention.succeeded_days,
            86_400,
        ),
        ("retention.failed_days", file.retention.failed_days, 86_400),
        ("gc.grace_hours", file.gc.grace_hours, 3_600),
    ] {
        let most = MAX_DURATION_SECS / unit_secs;
        if value.is_some_and(|v| v > most) {
            problems.push(format!("`{key}`: at most {most} (a century)"));
        }
    }
    // Zero is no setting at all here: no manifest fits in 0 bytes, and a zero deadline or
    // timeout fails every store blip, every dataset and every preflight at once. Each was
    // taken, and every job then failed after running (or without cause).
    for (key, value) in [
        ("store.max_manifest_bytes", file.store.max_manifest_bytes),
        ("store.retry_deadline_secs", file.store.retry_deadline_secs),
        (
            "store.preflight_timeout_secs",
            file.store.preflight_timeout_secs,
        ),
        ("job.dataset_timeout_secs", file.job.dataset_timeout_secs),
        ("job.stop_deadline_secs", file.job.stop_deadline_secs),
    ] {
        if value == Some(0) {
            problems.push(format!("`{key}` must be at least 1"));
        }
    }
    if file.sync.max_watches == Some(0) {
        problems.push(
            "`sync.max_watches` must be at least 1 (use `sync.mode = \"poll\"` for none)".into(),
        );
    }
    if !problems.is_empty() {
        return Err(fail(problems));
    }
    Ok(Config {
        source: source_file,
        state_dir,
        jobs_root,
        private_files: file.private_files.unwrap_or(true),
        max_manifest_bytes: file
            .store
            .max_manifest_bytes
            .unwrap_or(c3_runtime::pull::DEFAULT_MAX_MANIFEST_BYTES),
        kill_grace: Duration::from_secs(file.kill_grace_secs.unwrap_or(10)),
        log_format,
        store: StoreConfig {
            url: store_url,
            options,
            max_retries: retries.unwrap_or(3) as usize,
            retry_timeout: Duration::from_secs(file.store.retry_timeout_secs.unwrap_or(30)),
            retry_deadline: Duration::from_secs(file.store.retry_deadline_secs.unwrap_or(600)),
            reads_only: false,
        },
        preflight_timeout: Duration::from_secs(file.store.preflight_timeout_secs.unwrap_or(20)),
        control_plane,
        live,
        upload,
        forward_signals,
        forward_to,
        stop_deadline: Duration::from_secs(file.job.stop_deadline_secs.unwrap_or(25)),
        max_log_bytes: file
            .job
            .max_log_bytes
            .unwrap_or(c3_runtime::output::DEFAULT_MAX_LOG_BYTES),
        dataset_timeout: Duration::from_secs(
            file.job
                .dataset_timeout_secs
                .unwrap_or(c3_runtime::prepare::DEFAULT_DATASET_TIMEOUT_SECS),
        ),
        retention: c3_runtime::retention::Retention::from_days(
            file.retention.succeeded_days.unwrap_or(7),
            file.retention.failed_days.unwrap_or(30),
        ),
        gc_grace: Duration::from_secs(file.gc.grace_hours.unwrap_or(24).saturating_mul(3600)),
        warnings,
    })
}

/// `sync.live_cpus`: a CPU list this agent may run on (empty or absent: no pinning).
fn live_cpus(list: Option<&str>, problems: &mut Vec<String>) -> Vec<usize> {
    let Some(list) = list.map(str::trim).filter(|l| !l.is_empty()) else {
        return Vec::new();
    };
    let cpus = match c3_runtime::pace::parse_cpu_list(list) {
        Ok(cpus) => cpus,
        Err(e) => {
            problems.push(format!("`sync.live_cpus`: {e}"));
            return Vec::new();
        }
    };
    let allowed = c3_runtime::pace::allowed_cpus();
    if let Some(c) = cpus.iter().find(|c| !allowed.contains(c)) {
        problems.push(format!(
            "`sync.live_cpus`: CPU {c} is not one this agent may run on (it may use {})",
            c3_runtime::pace::cpu_list(&allowed)
        ));
        return Vec::new();
    }
    cpus
}

/// `USR1`, `SIGUSR1` or `10` -> 10. SIGTERM and SIGINT are the agent's own (stop), SIGKILL
/// and SIGSTOP cannot be caught, and SIGCHLD/SIGPIPE/fault signals would break the agent.
fn forwardable_signal(name: &str) -> Result<i32, &'static str> {
    use nix::sys::signal::Signal;
    let upper = name.trim().to_ascii_uppercase();
    let sig = match upper.parse::<i32>() {
        Ok(n) => Signal::try_from(n).map_err(|_| "is not a signal")?,
        Err(_) => {
            let full = if upper.starts_with("SIG") {
                upper
            } else {
                format!("SIG{upper}")
            };
            full.parse::<Signal>()
                .map_err(|_| "is not a signal name (USR1, SIGHUP, 12...)")?
        }
    };
    use Signal::*;
    match sig {
        SIGTERM | SIGINT => Err("is the agent's stop signal; it always reaches the job as a stop"),
        SIGKILL | SIGSTOP => Err("cannot be caught"),
        SIGCHLD | SIGPIPE | SIGSEGV | SIGBUS | SIGILL | SIGFPE | SIGABRT | SIGTRAP | SIGSYS => {
            Err("cannot be forwarded (the agent needs it)")
        }
        other => Ok(other as i32),
    }
}

impl ControlPlaneSettings {
    /// Reads the bearer token; its absence is a configuration error.
    pub fn resolve(&self) -> Result<(ControlPlaneConfig, Option<Secret>), String> {
        // Empty: no token (a node whose control plane takes none sets the unit's variable so).
        let file = self
            .token_file
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty());
        let token = match file {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                // A token goes into a header: a second line or a control character made
                // every report fail as "control plane unreachable" while the job looked fine.
                Ok(t) if t.trim().bytes().any(|b| !(0x21..=0x7e).contains(&b)) => {
                    return Err(format!(
                        "`control_plane.token_file`: {} holds more than one token (a space, a second line or a control character)",
                        path.display()
                    ))
                }
                Ok(t) if !t.trim().is_empty() => Some(Secret::new(t.trim().to_string())),
                Ok(_) => {
                    return Err(format!(
                        "`control_plane.token_file`: {} is empty",
                        path.display()
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "`control_plane.token_file`: cannot read {}: {e}",
                        path.display()
                    ))
                }
            },
        };
        Ok((
            ControlPlaneConfig {
                url: self.url.clone(),
                token: token.clone(),
                give_up: self.give_up,
                max_reply_bytes: self.max_reply_bytes,
            },
            token,
        ))
    }
}

/// `/a//b/./c/` -> `/a/b/c` (no `..` handling: a path with `..` stays as it is and
/// fails the checks that use it).
/// What makes a configured directory unusable whatever is on disk: a NUL (no system call
/// takes it; it failed the first write, exit 6) or a `..` (what it names depends on links).
fn unusable_path(p: &Path) -> Option<&'static str> {
    use std::os::unix::ffi::OsStrExt;
    if p.as_os_str().as_bytes().contains(&0) {
        Some("contains a NUL byte")
    } else if p.components().any(|c| c == std::path::Component::ParentDir) {
        Some("must not contain `..`")
    } else {
        None
    }
}

fn lexical_clean(p: &Path) -> PathBuf {
    p.components().collect()
}

/// The key a TOML error is about (`job.stop_deadline_secs` for `-1`, which names only the
/// value): the path the parser kept, else the key on the line the error points into.
fn toml_error_key(e: &toml::de::Error, text: &str) -> Option<String> {
    // The parser's key path is shown only in an error without its input.
    let mut bare = e.clone();
    bare.set_input(None);
    let kept = bare.to_string().lines().find_map(|l| {
        l.strip_prefix("in `")
            .and_then(|k| k.strip_suffix('`'))
            .map(String::from)
    });
    if kept.is_some() {
        return kept;
    }
    let span = e.span()?;
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let key = match text[line_start..start].split_once('=') {
        Some((key, _)) => key,
        // The span is the key itself (`duplicate key`).
        None => text.get(start..span.end)?,
    }
    .trim();
    let bare = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    (!key.is_empty() && key.chars().all(bare)).then(|| key.to_string())
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// `/var/lib/c3-agent` for root; the XDG state dir otherwise, under `$XDG_STATE_HOME`, else
/// the home (`$HOME`, else the passwd entry's). Never a shared place such as /tmp: another
/// user could make it first, and read and rewrite all of it. Empty when no home is known.
fn default_state_dir() -> PathBuf {
    let euid = nix::unistd::geteuid();
    default_state_dir_in(euid.is_root(), &|k| std::env::var_os(k), &|| {
        nix::unistd::User::from_uid(euid)
            .ok()
            .flatten()
            .map(|u| u.dir)
    })
}

fn default_state_dir_in(
    root: bool,
    env: &dyn Fn(&str) -> Option<std::ffi::OsString>,
    passwd_home: &dyn Fn() -> Option<PathBuf>,
) -> PathBuf {
    if root {
        return PathBuf::from("/var/lib/c3-agent");
    }
    // Relative values are ignored, as the XDG spec asks.
    let absolute = |k: &str| env(k).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = absolute("XDG_STATE_HOME") {
        return x.join("c3-agent");
    }
    absolute("HOME")
        .or_else(|| passwd_home().filter(|p| p.is_absolute()))
        .map(|home| home.join(".local/state/c3-agent"))
        .unwrap_or_default()
}

/// Why the existing state dir `dir` may not be used: another user than the agent's (or root)
/// owns it, or its group, others or an ACL's named entries may write it. They could read and
/// rewrite the records a root `recover` acts on, the logs, and the default store.
///
/// Asked by the commands that write there or act on what is there (`run`, `watch`,
/// `recover`, `resync`, `gc`): an operator's `ls`, `status` or `logs` as root may read
/// another user's state dir (a job's agent run as that user under Slurm).
pub fn state_dir_problem(dir: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).ok()?;
    let euid = nix::unistd::geteuid().as_raw();
    let shown = dir.display();
    if !meta.is_dir() {
        // Found at the first write, it was an AGENT_ERROR (exit 6, retryable) on every job.
        return Some(format!("`state_dir`: {shown} is not a directory"));
    }
    if meta.uid() != euid && meta.uid() != 0 {
        return Some(format!(
            "`state_dir`: {shown} is owned by uid {}, not by this agent's user (uid {euid}) or root: it could read and rewrite the agent's records and store (use a dir of the agent's own)",
            meta.uid()
        ));
    }
    let acl = std::fs::File::open(dir)
        .ok()
        .and_then(|d| c3_runtime::acl::of(&d).ok().flatten());
    // With an ACL the group bits are its mask: the owning group's own entry says.
    let group_writes = match &acl {
        Some(a) => a.owning_group_may(0o2),
        None => meta.mode() & 0o020 != 0,
    };
    if group_writes || meta.mode() & 0o002 != 0 {
        return Some(format!(
            "`state_dir`: {shown} may be written by its group or others (mode {:o}): they could rewrite the agent's records and store: `chmod 0711 {shown}`",
            meta.mode() & 0o7777
        ));
    }
    let egid = nix::unistd::getegid().as_raw();
    if acl.is_some_and(|a| a.named_others_may(0o2, &[0, euid], &[0, egid])) {
        return Some(format!(
            "`state_dir`: {shown} has an ACL that lets other users write it: they could rewrite the agent's records and store: `setfacl -b {shown}`"
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    /// Every variable this file reads is one `unknown_vars` lets through: two documented
    /// ones were read but refused as "not a c3-agent setting", failing every command.
    #[test]
    fn every_variable_read_is_a_known_one() {
        let source = include_str!("config.rs");
        let code = &source[..source.find("#[cfg(test)]").unwrap()];
        let read: Vec<&str> = code
            .split('"')
            .filter(|w| {
                w.len() > "C3_AGENT_".len()
                    && w.starts_with("C3_AGENT_")
                    && w.bytes()
                        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            })
            .collect();
        assert!(read.len() > 20, "{read:?}");
        for name in read {
            assert!(
                unknown_vars(std::iter::once(name.to_string())).is_empty(),
                "{name} is read but refused"
            );
        }
    }

    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn a_duration_past_a_century_is_named_not_a_crash() {
        let max = u64::MAX;
        let text = format!(
            "kill_grace_secs = {max}\n[job]\nstop_deadline_secs = {max}\ndataset_timeout_secs = {max}\n\
             [store]\nretry_deadline_secs = {max}\nretry_timeout_secs = {max}\npreflight_timeout_secs = {max}\n\
             [sync]\nsettle_ms = {max}\npoll_ms = {max}\nmanifest_interval_ms = {max}\n\
             [retention]\nsucceeded_days = {max}\nfailed_days = {max}\n[gc]\ngrace_hours = {max}\n\
             [control_plane]\nurl = \"http://cp\"\ngive_up_secs = {max}\n"
        );
        let e = resolve(None, &text, &|_| None, PathBuf::from("/s")).unwrap_err();
        for key in [
            "kill_grace_secs",
            "job.stop_deadline_secs",
            "job.dataset_timeout_secs",
            "store.retry_deadline_secs",
            "store.retry_timeout_secs",
            "store.preflight_timeout_secs",
            "sync.settle_ms",
            "sync.poll_ms",
            "sync.manifest_interval_ms",
            "retention.succeeded_days",
            "retention.failed_days",
            "gc.grace_hours",
            "control_plane.give_up_secs",
        ] {
            assert!(
                e.problems
                    .iter()
                    .any(|p| p.starts_with(&format!("`{key}`: at most"))),
                "{key}: {:?}",
                e.problems
            );
        }
        // The environment's overrides are held to it too; a century itself is fine.
        let e = resolve(
            None,
            "",
            &env_of(&[("C3_AGENT_KILL_GRACE_SECS", "18446744073709551615")]),
            PathBuf::from("/s"),
        )
        .unwrap_err();
        assert_eq!(e.problems.len(), 1, "{:?}", e.problems);
        let c = resolve(
            None,
            &format!(
                "kill_grace_secs = {MAX_DURATION_SECS}\n[sync]\nsettle_ms = {}\n",
                MAX_DURATION_SECS * 1000
            ),
            &|_| None,
            PathBuf::from("/s"),
        )
        .unwrap();
        assert_eq!(c.kill_grace, Duration::from_secs(MAX_DURATION_SECS));
    }

    /// A non-root agent without $HOME keeps its state in its passwd entry's home, never in
    /// /tmp (where another user could make it first); with no home at all it asks for one.
    #[test]
    fn the_default_state_dir_is_never_a_shared_place() {
        let none = |_: &str| None;
        let home = || Some(PathBuf::from("/home/u"));
        let no_home = || None;
        assert_eq!(
            default_state_dir_in(true, &none, &home),
            Path::new("/var/lib/c3-agent")
        );
        assert_eq!(
            default_state_dir_in(false, &none, &home),
            Path::new("/home/u/.local/state/c3-agent")
        );
        let env = |k: &str| match k {
            "HOME" => Some("/h".into()),
            "XDG_STATE_HOME" => Some("relative".into()),
            _ => None,
        };
        assert_eq!(
            default_state_dir_in(false, &env, &home),
            Path::new("/h/.local/state/c3-agent"),
            "a relative XDG_STATE_HOME is ignored"
        );
        let empty = default_state_dir_in(false, &none, &no_home);
        assert_eq!(empty, PathBuf::new());
        let e = resolve(None, "", &|_| None, empty.clone()).unwrap_err();
        assert_eq!(e.problems.len(), 1, "{:?}", e.problems);
        assert!(
            e.problems[0].starts_with("`state_dir`: no default"),
            "{:?}",
            e.problems
        );
        resolve(None, "state_dir = \"/s\"\n", &|_| None, empty).unwrap();
    }

    /// A state dir its group, others or another user may write is refused; the agent's own
    /// 0711 or 0755 one is not.
    #[test]
    fn a_state_dir_others_may_write_is_named() {
        use std::os::unix::fs::PermissionsExt;
        let top = tempfile::tempdir().unwrap();
        let dir = top.path().join("state");
        assert_eq!(state_dir_problem(&dir), None, "none yet");
        std::fs::create_dir(&dir).unwrap();
        let chmod = |m| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
        for ok in [0o711, 0o755, 0o700] {
            chmod(ok);
            assert_eq!(state_dir_problem(&dir), None, "{ok:o}");
        }
        for bad in [0o777, 0o1777, 0o775, 0o757] {
            chmod(bad);
            let p = state_dir_problem(&dir).unwrap_or_default();
            assert!(
                p.starts_with("`state_dir`:") && p.contains("chmod 0711"),
                "{bad:o}: {p}"
            );
        }
        chmod(0o711);
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&dir, Some(4242), None).unwrap();
            let p = state_dir_problem(&dir).unwrap_or_default();
            assert!(
                p.starts_with("`state_dir`:") && p.contains("uid 4242"),
                "{p}"
            );
        }
    }

    /// Directories no system call takes, or whose meaning hangs on links, are config errors
    /// naming their key; so is a state dir that is a file, and a bad give-up with no control
    /// plane (which it was only with one).
    #[test]
    fn unusable_dirs_and_values_are_named_at_load() {
        let state = |t: &str| resolve(None, t, &|_| None, "/s".into());
        for (text, key) in [
            ("state_dir = \"/t/s\\u0000x\"\n", "`state_dir`"),
            ("state_dir = \"/t/../s\"\n", "`state_dir`"),
            ("jobs_root = \"/t/../../etc\"\n", "`jobs_root`"),
        ] {
            let e = state(text).unwrap_err();
            assert!(
                e.problems.iter().any(|p| p.starts_with(key)),
                "{text}: {:?}",
                e.problems
            );
        }
        let env = |k: &str| (k == "C3_AGENT_GIVE_UP_SECS").then(|| "abc".to_string());
        let e = resolve(None, "", &env, "/s".into()).unwrap_err();
        assert!(e.problems[0].contains("give_up_secs"), "{:?}", e.problems);
        let env = |k: &str| (k == "C3_AGENT_GIVE_UP_SECS").then(|| "60".to_string());
        let ok = resolve(None, "", &env, "/s".into()).unwrap();
        assert!(
            ok.warnings.iter().any(|w| w.contains("no control plane")),
            "{:?}",
            ok.warnings
        );
        let top = tempfile::tempdir().unwrap();
        let file = top.path().join("state");
        std::fs::write(&file, "").unwrap();
        let p = state_dir_problem(&file).unwrap_or_default();
        assert!(p.contains("not a directory"), "{p}");
    }

    /// A value that is not UTF-8 is named with its setting, never read as unset.
    #[test]
    fn a_variable_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStrExt;
        let get = |k: &str| match k {
            "C3_AGENT_STORE_URL" => Some(std::ffi::OsStr::from_bytes(b"s3://b/\xe9").into()),
            "C3_AGENT_CONFIG" | "C3_AGENT_SOCKET" => {
                Some(std::ffi::OsStr::from_bytes(b"/x\xff").into())
            }
            "C3_AGENT_SETTLE_MS" => Some("5".into()),
            _ => None,
        };
        assert_eq!(
            not_utf8_vars(&get),
            [
                "$C3_AGENT_CONFIG (the config file): not UTF-8",
                "`store.url` (from $C3_AGENT_STORE_URL): not UTF-8"
            ]
        );
        for var in KNOWN_VARS {
            assert!(
                field_of(var).is_some() || ["C3_AGENT_FAULT", "C3_AGENT_SOCKET"].contains(var),
                "{var} names no setting"
            );
        }
    }

    #[test]
    fn a_part_size_or_event_queue_past_its_limit_is_named_not_a_crash() {
        let max = u64::MAX;
        let text = format!("[upload]\nmin_part_size_bytes = {max}\n[sync]\nevent_queue = {max}\n");
        let e = resolve(None, &text, &|_| None, PathBuf::from("/s")).unwrap_err();
        for key in ["upload.min_part_size_bytes", "sync.event_queue"] {
            assert!(
                e.problems
                    .iter()
                    .any(|p| p.starts_with(&format!("`{key}`: at most"))),
                "{key}: {:?}",
                e.problems
            );
        }
        let text = format!("[upload]\nmin_part_size_bytes = {MAX_PART_BYTES}\n[sync]\nevent_queue = {MAX_EVENT_QUEUE}\n");
        resolve(None, &text, &|_| None, PathBuf::from("/s")).unwrap();
    }

    #[test]
    fn a_reply_limit_too_small_to_say_anything_is_refused() {
        let text = "[control_plane]\nurl = \"http://127.0.0.1:1/\"\nmax_reply_bytes = 0\n";
        let e = resolve(None, text, &|_| None, "/s".into()).unwrap_err();
        assert!(
            e.problems[0].contains("max_reply_bytes"),
            "{:?}",
            e.problems
        );
        let ok = text.replace("= 0", "= 4096");
        resolve(None, &ok, &|_| None, "/s".into()).unwrap();
    }

    #[test]
    fn a_part_larger_than_the_memory_budget_is_named() {
        let text = "[upload]\nmin_part_size_bytes = 67108864\nmemory_budget_bytes = 33554432\n";
        let c = resolve(None, text, &|_| None, "/s".into()).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("min_part_size_bytes") && w.contains("held in memory")),
            "{:?}",
            c.warnings
        );
        let fits = resolve(None, "", &|_| None, "/s".into()).unwrap();
        assert!(!fits
            .warnings
            .iter()
            .any(|w| w.contains("min_part_size_bytes")));
    }

    #[test]
    fn a_multipart_threshold_past_the_memory_budget_is_named() {
        let text = "[upload]\nmultipart_threshold_bytes = 18446744073709551615\n";
        let e = resolve(None, text, &|_| None, PathBuf::from("/s")).unwrap_err();
        assert!(
            e.problems
                .iter()
                .any(|p| p.starts_with("`upload.multipart_threshold_bytes`: at most 5368709120")),
            "{:?}",
            e.problems
        );
        let text = "[upload]\nmultipart_threshold_bytes = 67108864\n";
        let c = resolve(None, text, &|_| None, PathBuf::from("/s")).unwrap();
        assert!(
            c.warnings[0].contains("held to the budget"),
            "{:?}",
            c.warnings
        );
        let text =
            "[upload]\nmultipart_threshold_bytes = 33554432\nmemory_budget_bytes = 33554432\n";
        resolve(None, text, &|_| None, PathBuf::from("/s")).unwrap();
    }

    #[test]
    fn a_url_in_a_config_error_shows_no_credential() {
        for (text, key) in [
            (
                "[control_plane]\nurl = \"ftp://admin:S3CRETPW@cp.example/api\"\n",
                "control_plane.url",
            ),
            (
                "[control_plane]\nurl = \"http://u:S3CRETPW@h:99999/\"\n",
                "control_plane.url",
            ),
            ("[store]\nurl = \"s3://u:S3CRETPW@b:99999/\"\n", "store.url"),
        ] {
            let e = resolve(None, text, &|_| None, PathBuf::from("/s")).unwrap_err();
            let all = e.problems.join("\n");
            assert!(all.contains(key), "{all}");
            assert!(!all.contains("S3CRETPW"), "{all}");
        }
    }

    /// The bytes a job's files may share with other files (reflinked copies) in all: 1 TiB
    /// unless set.
    #[test]
    fn the_shared_budget_is_set_in_the_upload_section() {
        let c = resolve(None, "", &env_of(&[]), PathBuf::from("/s")).unwrap();
        assert_eq!(c.upload.shared_budget, 1 << 40);
        let text = "[upload]\nshared_budget_bytes = 8388608\n";
        let c = resolve(None, text, &env_of(&[]), PathBuf::from("/s")).unwrap();
        assert_eq!(c.upload.shared_budget, 8 << 20);
    }

    /// The holes a job's files may have in all: 64 GiB unless set (a node on a compressing
    /// file system, where zeros written out are holes too, may want more); 0 leaves each
    /// file its 1 MiB and no more.
    #[test]
    fn the_hole_budget_is_set_in_the_upload_section() {
        let c = resolve(None, "", &env_of(&[]), PathBuf::from("/s")).unwrap();
        assert_eq!(c.upload.hole_budget, 64 << 30);
        for n in [0u64, 1 << 40] {
            let text = format!("[upload]\nhole_budget_bytes = {n}\n");
            let c = resolve(None, &text, &env_of(&[]), PathBuf::from("/s")).unwrap();
            assert_eq!(c.upload.hole_budget, n);
        }
    }

    #[test]
    fn defaults_use_embedded_store() {
        let c = resolve(None, "", &env_of(&[]), PathBuf::from("/s")).unwrap();
        assert_eq!(c.store.url, "file:///s/store");
        assert!(c.control_plane.is_none());
        assert_eq!(c.kill_grace, Duration::from_secs(10));
        // A `#` or `?` in the state dir's path is the path's, not a fragment or a query
        // that cut the store's path short (`/scratch/team`).
        let c = resolve(None, "", &env_of(&[]), PathBuf::from("/scratch/team#1 ?x")).unwrap();
        let url = url::Url::parse(&c.store.url).unwrap();
        assert_eq!(
            url.to_file_path().unwrap(),
            Path::new("/scratch/team#1 ?x/store")
        );
    }

    #[test]
    fn unknown_agent_variables_are_named_with_a_suggestion() {
        let names = [
            "C3_AGENT_STORE_ULR",
            "C3_AGENT_STORE_URL",
            "PATH",
            "C3_AGENT_ZZZZZZZZZZZZ",
        ];
        let p = unknown_vars(names.iter().map(|s| s.to_string()));
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter().any(|l| l.contains("$C3_AGENT_STORE_ULR")
                && l.contains("did you mean C3_AGENT_STORE_URL?")),
            "{p:?}"
        );
        assert!(
            p.iter()
                .any(|l| l.contains("$C3_AGENT_ZZZZZZZZZZZZ") && !l.contains("did you mean")),
            "{p:?}"
        );
    }

    #[test]
    fn forwarded_signals() {
        let c = resolve(None, "", &|_| None, PathBuf::from("/s")).unwrap();
        assert_eq!(c.forward_signals, vec![libc::SIGUSR1, libc::SIGUSR2]);
        assert_eq!(c.stop_deadline, Duration::from_secs(25));
        let c = resolve(
            None,
            "[job]\nforward_signals = [\"sighup\", \"12\"]\nstop_deadline_secs = 7\n",
            &|_| None,
            PathBuf::from("/s"),
        )
        .unwrap();
        assert_eq!(c.forward_signals, vec![libc::SIGHUP, libc::SIGUSR2]);
        assert_eq!(c.stop_deadline, Duration::from_secs(7));
        assert_eq!(c.forward_to, ForwardTo::Leader);
        let env = env_of(&[("C3_AGENT_FORWARD_TO", "all")]);
        let c = resolve(None, "", &env, PathBuf::from("/s")).unwrap();
        assert_eq!(c.forward_to, ForwardTo::All);
        let env = env_of(&[("C3_AGENT_FORWARD_TO", "everyone")]);
        let e = resolve(None, "", &env, PathBuf::from("/s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`job.forward_to`: `everyone`"), "{e}");
        let env = env_of(&[("C3_AGENT_FORWARD_SIGNALS", "")]);
        let c = resolve(None, "", &env, PathBuf::from("/s")).unwrap();
        assert!(c.forward_signals.is_empty());
        let e = resolve(
            None,
            "[job]\nforward_signals = [\"TERM\", \"USR9\"]\n",
            &|_| None,
            PathBuf::from("/s"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("`TERM` is the agent's stop signal"), "{e}");
        assert!(e.contains("`USR9` is not a signal name"), "{e}");
    }

    #[test]
    fn env_overrides_file() {
        let text = "state_dir = \"/a\"\n[store]\nurl = \"s3://b\"\n";
        let env = env_of(&[
            ("C3_AGENT_STORE_URL", "file:///x"),
            ("C3_AGENT_CONTROL_PLANE_URL", "http://127.0.0.1:1/api"),
        ]);
        let c = resolve(None, text, &env, PathBuf::from("/s")).unwrap();
        assert_eq!(c.store.url, "file:///x");
        assert_eq!(c.state_dir, PathBuf::from("/a"));
        assert_eq!(c.control_plane.unwrap().give_up, Duration::from_secs(60));
        let only_token = resolve(
            None,
            "",
            &env_of(&[("C3_AGENT_TOKEN_FILE", "/run/t")]),
            PathBuf::from("/s"),
        )
        .unwrap();
        assert!(
            only_token.control_plane.is_none(),
            "a token file alone does not make a control plane"
        );
        // The unit sets C3_AGENT_TOKEN_FILE; a drop-in that empties it runs without a token
        // (it named no file, and every run and recover was exit 2).
        let no_token = resolve(
            None,
            "",
            &env_of(&[
                ("C3_AGENT_CONTROL_PLANE_URL", "http://127.0.0.1:1/api"),
                ("C3_AGENT_TOKEN_FILE", ""),
            ]),
            PathBuf::from("/s"),
        )
        .unwrap();
        let (_, token) = no_token.control_plane.unwrap().resolve().unwrap();
        assert_eq!(token, None);
        // Emptying a token file the config file names is said.
        let emptied = resolve(
            None,
            "[control_plane]\nurl = \"http://127.0.0.1:1/api\"\ntoken_file = \"/etc/t\"\n",
            &env_of(&[("C3_AGENT_TOKEN_FILE", "")]),
            PathBuf::from("/s"),
        )
        .unwrap();
        assert!(
            emptied
                .warnings
                .iter()
                .any(|w| w.contains("no token is sent")),
            "{:?}",
            emptied.warnings
        );
    }

    /// The unit's `C3_AGENT_STOP_DEADLINE_SECS=280` beats the file's 900: said, not silent.
    #[test]
    fn an_environment_value_over_the_files_is_said() {
        let text = "[job]\nstop_deadline_secs = 900\nmax_log_bytes = 5\n";
        let env = env_of(&[
            ("C3_AGENT_STOP_DEADLINE_SECS", "280"),
            ("C3_AGENT_MAX_LOG_BYTES", "5"),
            ("C3_AGENT_KILL_GRACE_SECS", "3"),
        ]);
        let c = resolve(None, text, &env, PathBuf::from("/s")).unwrap();
        assert_eq!(c.stop_deadline, Duration::from_secs(280));
        assert_eq!(
            c.warnings,
            vec!["`job.stop_deadline_secs` is 280 from $C3_AGENT_STOP_DEADLINE_SECS, over the config file's 900".to_string()]
        );
    }

    /// A zero that would fail every job is refused by name, from the file or the environment.
    #[test]
    fn a_zero_that_fails_every_job_is_refused() {
        for (text, key) in [
            (
                "[store]\nmax_manifest_bytes = 0\n",
                "store.max_manifest_bytes",
            ),
            (
                "[store]\nretry_deadline_secs = 0\n",
                "store.retry_deadline_secs",
            ),
            (
                "[store]\npreflight_timeout_secs = 0\n",
                "store.preflight_timeout_secs",
            ),
            (
                "[job]\ndataset_timeout_secs = 0\n",
                "job.dataset_timeout_secs",
            ),
            ("[job]\nstop_deadline_secs = 0\n", "job.stop_deadline_secs"),
            (
                "[control_plane]\nurl = \"http://cp\"\ngive_up_secs = 0\n",
                "control_plane.give_up_secs",
            ),
        ] {
            let e = resolve(None, text, &|_| None, PathBuf::from("/s"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}` must be at least 1")), "{e}");
        }
        let env = &[("C3_AGENT_STORE_RETRY_DEADLINE_SECS", "0")];
        let e = resolve(None, "", &env_of(env), PathBuf::from("/s"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("store.retry_deadline_secs"), "{e}");
    }

    /// Live sync lists what it stored at least as often as a long sync does: with a longer
    /// interval, `gc` (which spares a blob no manifest names for an hour only) deleted blobs
    /// the book had as stored, and the complete manifest listed them missing.
    #[test]
    fn a_manifest_interval_gc_could_outrun_is_refused() {
        let e = resolve(
            None,
            "[sync]\nmanifest_interval_ms = 7200000\n",
            &|_| None,
            PathBuf::from("/s"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`sync.manifest_interval_ms`: at most 600000"),
            "{e}"
        );
        assert!(resolve(
            None,
            "[sync]\nmanifest_interval_ms = 600000\n",
            &|_| None,
            PathBuf::from("/s")
        )
        .is_ok());
    }

    /// A token file of two lines (a token and a comment, two tokens) would go into every
    /// report's header and fail it as "unreachable"; it is refused when the config is read.
    #[test]
    fn a_token_file_of_more_than_one_token_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let settings = |body: &str| {
            let path = dir.path().join("token");
            std::fs::write(&path, body).unwrap();
            ControlPlaneSettings {
                url: url::Url::parse("http://127.0.0.1:1/").unwrap(),
                token_file: Some(path),
                give_up: Duration::from_secs(1),
                max_reply_bytes: 1,
            }
        };
        assert!(settings("tok-1\n").resolve().is_ok());
        for bad in ["tok-1\n# rotated\ntok-2\n", "tok 1", "tok\u{7}"] {
            let e = settings(bad).resolve().unwrap_err();
            assert!(e.contains("`control_plane.token_file`"), "{e}");
        }
    }

    #[test]
    fn bandwidth_limit_from_file_or_env() {
        let limit = |text: &str, env: &'static [(&'static str, &'static str)]| {
            resolve(None, text, &env_of(env), PathBuf::from("/s"))
                .map(|c| c.upload.bandwidth_limit.map(|l| l.bytes_per_sec()))
        };
        assert_eq!(limit("", &[]).unwrap(), None, "unlimited by default");
        let text = "[upload]\nbandwidth_limit_bytes_per_sec = 104857600\n";
        assert_eq!(limit(text, &[]).unwrap(), Some(100 << 20));
        let zero = "[upload]\nbandwidth_limit_bytes_per_sec = 0\n";
        assert_eq!(limit(zero, &[]).unwrap(), None, "0 is unlimited");
        let env = &[("C3_AGENT_BANDWIDTH_LIMIT", "2097152")];
        assert_eq!(limit(text, env).unwrap(), Some(2 << 20), "env wins");
        assert_eq!(
            limit("", &[("C3_AGENT_BANDWIDTH_LIMIT", "0")]).unwrap(),
            None
        );
        let e = limit("", &[("C3_AGENT_BANDWIDTH_LIMIT", "100MB")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`upload.bandwidth_limit_bytes_per_sec` (from $C3_AGENT_BANDWIDTH_LIMIT)"),
            "{e}"
        );
    }

    #[test]
    fn all_problems_named_at_once() {
        let text =
            "kill_grace_secs = 1\nlog_format = \"xml\"\n[control_plane]\nurl = \"ftp://x\"\n";
        let e = resolve(
            Some("/etc/c.toml".into()),
            text,
            &env_of(&[("C3_AGENT_SETTLE_MS", "soon")]),
            PathBuf::from("/s"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("config /etc/c.toml: "), "{e}");
        for key in ["`log_format`", "`control_plane.url`", "`sync.settle_ms`"] {
            assert!(e.contains(key), "{key} missing in {e}");
        }
        assert!(!e.contains('\n'));
        let unknown = resolve(
            None,
            "\n[store]\nbucket = 1\n",
            &env_of(&[]),
            PathBuf::from("/s"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            unknown.contains("line 3") && unknown.contains("bucket"),
            "{unknown}"
        );
    }

    /// A store option the HTTP client cannot hold is named at load: a century-past timeout
    /// panicked in reqwest at each request (the job then waited out the retry deadline), an
    /// unparsable one was "failed to parse" without the key, a frame size asserted in h2.
    #[test]
    fn a_store_option_the_client_cannot_hold_is_named() {
        let huge = "18446744073709551615s";
        let text = format!(
            "[store]\nurl = \"s3://b/p\"\n[store.options]\naws_region = \"x\"\n\
             read_timeout = \"{huge}\"\naws_timeout = \"{huge}\"\nconnect_timeout = \"abc\"\n\
             pool_idle_timeout = \"{huge}\"\nhttp2_keep_alive_interval = \"{huge}\"\n\
             aws_http2_keep_alive_timeout = \"{huge}\"\nhttp2_max_frame_size = \"1\"\n"
        );
        let e = resolve(None, &text, &|_| None, PathBuf::from("/s"))
            .unwrap_err()
            .to_string();
        for key in [
            "read_timeout",
            "aws_timeout",
            "connect_timeout",
            "pool_idle_timeout",
            "http2_keep_alive_interval",
            "aws_http2_keep_alive_timeout",
            "http2_max_frame_size",
        ] {
            assert!(e.contains(&format!("`store.options.{key}`")), "{key}: {e}");
        }
        assert!(!e.contains("aws_region"), "{e}");
        let fine = "[store]\nurl = \"s3://b/p\"\n[store.options]\nread_timeout = \"5m\"\n\
                    http2_max_frame_size = \"16384\"\n";
        resolve(None, fine, &|_| None, PathBuf::from("/s")).unwrap();
    }

    /// The contract's config example puts `retry_deadline_secs` after `[store.options]`: read
    /// as the store's (it was refused on S3 as an unknown option, ignored on a file store).
    #[test]
    fn retry_deadline_where_the_contract_example_puts_it() {
        let text = "[store]\nurl = \"s3://b/p\"\n[store.options]\naws_region = \"x\"\n\
                    retry_deadline_secs = 60\n";
        let c = resolve(None, text, &|_| None, PathBuf::from("/s")).unwrap();
        assert_eq!(c.store.retry_deadline, Duration::from_secs(60));
        assert_eq!(c.store.options.keys().collect::<Vec<_>>(), ["aws_region"]);
        let e = |text: &str| {
            resolve(None, text, &|_| None, PathBuf::from("/s"))
                .unwrap_err()
                .to_string()
        };
        let both =
            e("[store]\nretry_deadline_secs = 30\n[store.options]\nretry_deadline_secs = 60\n");
        assert!(both.contains("keep one"), "{both}");
        let text = e("[store.options]\nretry_deadline_secs = \"60\"\n");
        assert!(
            text.contains("`store.options.retry_deadline_secs`"),
            "{text}"
        );
    }

    /// A value of the wrong type names its key, not only its line.
    #[test]
    fn a_type_error_names_the_key() {
        let e = |text: &str| {
            resolve(None, text, &env_of(&[]), PathBuf::from("/s"))
                .unwrap_err()
                .to_string()
        };
        let said = e("[job]\nstop_deadline_secs = -1\n");
        assert!(
            said.contains("line 2") && said.contains("`job.stop_deadline_secs`"),
            "{said}"
        );
        let said = e("kill_grace_secs = \"ten\"\n");
        assert!(said.contains("`kill_grace_secs`"), "{said}");
        let said = e("[store]\noptions = { aws_region = 5 }\n");
        assert!(said.contains("`store.options.aws_region`"), "{said}");
        let said = e("kill_grace_secs = 1\nkill_grace_secs = 2\n");
        assert!(said.contains("line 2: `kill_grace_secs`"), "{said}");
    }

    #[test]
    fn live_cpus_must_be_a_cpu_list_this_agent_may_use() {
        let first = c3_runtime::pace::allowed_cpus()[0];
        let ok = resolve(
            None,
            &format!("[sync]\nlive_cpus = \"{first}\"\n"),
            &env_of(&[]),
            PathBuf::from("/s"),
        )
        .unwrap();
        assert_eq!(ok.live.unwrap().cpus, vec![first]);
        let from_env = resolve(
            None,
            "",
            &env_of(&[("C3_AGENT_LIVE_CPUS", "x-1")]),
            "/s".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(from_env.contains("`sync.live_cpus`: `x-1`"), "{from_env}");
        let absent = resolve(
            None,
            "[sync]\nlive_cpus = \"1000\"\n",
            &env_of(&[]),
            "/s".into(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            absent.contains("`sync.live_cpus`: CPU 1000 is not one this agent may run on"),
            "{absent}"
        );
    }
}
