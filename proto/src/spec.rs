//! The job spec (contract §3): parsed strictly, so that a bad spec is one line naming the field.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Fields the contract defines; anything else is an error (contract v2 §3: a typo such as
/// `timeout` must not silently drop the time limit).
const KNOWN_FIELDS: &[&str] = &[
    "job_id",
    "project",
    "attempt",
    "command",
    "workdir",
    "env",
    "output",
    "timeout_secs",
    "user",
    "datasets",
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    pub job_id: String,
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default = "default_attempt")]
    pub attempt: u32,
    pub command: Vec<String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub output: Vec<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub datasets: Vec<DatasetSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// `/jobs/<job_id>`: the earlier job whose files are materialized.
    #[serde(rename = "ref")]
    pub reference: String,
    /// Relative to the workdir (normalized at parse; an absolute path inside the workdir is accepted).
    pub mount: String,
}

/// The longest workdir: the job's paths below it (`.c3/result.json`, its files) stay under
/// PATH_MAX (4096).
pub const MAX_WORKDIR_BYTES: usize = 3072;

/// What the agent adds to the job's environment (`C3_*`, `HOME`, `USER`, `PATH`, ...), at
/// most: room kept in [`max_exec_bytes`].
const AGENT_ENV_ENTRIES: usize = 32;
const AGENT_ENV_BYTES: usize = 64 * 1024;

/// What execve takes of arguments and environment, strings and pointers together: a quarter
/// of the stack limit (the job inherits the agent's), at most 6 MiB, at least 128 KiB
/// (`fs/exec.c`).
pub fn max_exec_bytes() -> usize {
    const FLOOR: usize = 128 * 1024;
    const CEILING: usize = 6 * 1024 * 1024;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) };
    if got != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return CEILING;
    }
    usize::try_from(limit.rlim_cur / 4)
        .unwrap_or(CEILING)
        .clamp(FLOOR, CEILING)
}

/// The kernel's limit on one argument or one `NAME=VALUE` (`MAX_ARG_STRLEN`, its NUL
/// included): past it execve fails (E2BIG) after the store check and the datasets ran, and the
/// job was reported as its script's failure (exit 126) rather than a bad spec. It is 32
/// pages: 128 KiB with 4 KiB pages, 2 MiB on the 64 KiB-page kernels of some arm64 GPU
/// hosts (past the spec's own 1 MiB limit there, so no argument is refused by it).
pub fn max_arg_strlen() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        // SAFETY: sysconf reads a constant of the system.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        32 * usize::try_from(page)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or(4096)
    })
}

fn default_attempt() -> u32 {
    1
}

/// A spec that parsed and validated.
#[derive(Debug, Clone)]
pub struct ParsedSpec {
    pub spec: JobSpec,
}

/// The known name closest to `name` (edit distance at most 3, or a prefix of it).
pub fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| {
            let d = if k.starts_with(name) && !name.is_empty() {
                0
            } else {
                distance(name, k)
            };
            (d, *k)
        })
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| k)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("job spec is not valid JSON: {0}")]
    Syntax(String),
    #[error("job spec must be a JSON object")]
    NotAnObject,
    #[error("job spec field `{field}`: {problem}")]
    Field { field: String, problem: String },
}

impl SpecError {
    fn field(field: impl Into<String>, problem: impl Into<String>) -> Self {
        SpecError::Field {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

/// Longest `project` name a spec may give.
pub const MAX_PROJECT_BYTES: usize = 256;

/// serde's type error without the value it found: `invalid type: string "AWS_SECRET_ACCESS_KEY=..",
/// expected a map` put a spec's secret (its `env` or `command` holds them) in the journal.
/// The field's name and the kinds say what is wrong.
fn without_value(message: &str) -> String {
    for head in ["invalid type: ", "invalid value: "] {
        let Some(rest) = message.strip_prefix(head) else {
            continue;
        };
        let Some(at) = rest.rfind(", expected ") else {
            continue;
        };
        let found = &rest[..at];
        let kind = found
            .find([' ', '`', '"'])
            .map_or(found, |end| &found[..end])
            .trim();
        let kind = match kind {
            "floating" => "floating point",
            "unit" => "unit value",
            k => k,
        };
        return format!("{head}{kind}{}", &rest[at..]);
    }
    message.to_string()
}

impl JobSpec {
    /// Parse and validate a spec; the error names the first bad field.
    pub fn from_json(bytes: &[u8]) -> Result<ParsedSpec, SpecError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Syntax(e.to_string()))?;
        let object = value.as_object().ok_or(SpecError::NotAnObject)?;
        // A JSON object keeps the last of two equal keys: `"timeout_secs": 5, ...,
        // "timeout_secs": null` ran with no time limit. Which one the writer meant is unknown.
        if let Some(path) = duplicate_key(bytes) {
            return Err(SpecError::field(path, "appears twice"));
        }
        if let Some(unknown) = object.keys().find(|k| !KNOWN_FIELDS.contains(&k.as_str())) {
            let hint = closest(unknown, KNOWN_FIELDS)
                .map(|k| format!("; did you mean `{k}`?"))
                .unwrap_or_default();
            return Err(SpecError::field(
                unknown.clone(),
                format!("is not a job spec field{hint}"),
            ));
        }
        let mut spec: JobSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports a missing field at the parent (".")
            match inner.strip_prefix("missing field `") {
                Some(rest) => SpecError::field(rest.trim_end_matches('`'), "is required"),
                None => SpecError::field(path, without_value(&inner)),
            }
        })?;
        spec.validate()?;
        Ok(ParsedSpec { spec })
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a JobSpec always serializes")
    }

    /// Checks what serde's types cannot express, and normalizes every path once, here:
    /// `./res` and `a//b` become `res` and `a/b`, so that everything downstream (the
    /// manifest, `ls`, `pull`, datasets) sees one spelling.
    pub fn validate(&mut self) -> Result<(), SpecError> {
        validate_job_id(&self.job_id).map_err(|p| SpecError::field("job_id", p))?;
        if self.attempt == 0 {
            return Err(SpecError::field("attempt", "must be 1 or more"));
        }
        if let Some(project) = &self.project {
            // It decides whose datasets a job may read (the manifests' `project` must equal
            // it) and is shown in logs and `ls`: an empty one, or control characters, were
            // taken as given.
            if project.is_empty() || project.len() > MAX_PROJECT_BYTES {
                return Err(SpecError::field(
                    "project",
                    format!("must be 1 to {MAX_PROJECT_BYTES} bytes (or left out)"),
                ));
            }
            if project.chars().any(char::is_control) {
                return Err(SpecError::field("project", "contains a control character"));
            }
        }
        match self.command.first() {
            None => {
                return Err(SpecError::field(
                    "command",
                    "must name a program (an empty argv)",
                ))
            }
            Some(program) if program.is_empty() => {
                return Err(SpecError::field("command[0]", "the program name is empty"))
            }
            Some(_) => {}
        }
        if let Some((i, _)) = self
            .command
            .iter()
            .enumerate()
            .find(|(_, a)| a.contains('\0'))
        {
            return Err(SpecError::field(
                format!("command[{i}]"),
                "contains a NUL byte",
            ));
        }
        if let Some((i, a)) = self
            .command
            .iter()
            .enumerate()
            .find(|(_, a)| a.len() >= max_arg_strlen())
        {
            return Err(SpecError::field(
                format!("command[{i}]"),
                format!(
                    "is {} bytes; an argument must be under {} (the kernel's limit)",
                    a.len(),
                    max_arg_strlen()
                ),
            ));
        }
        if let Some(workdir) = &self.workdir {
            let clean = absolute_dir(workdir).map_err(|p| SpecError::field("workdir", p))?;
            // The job's paths below it (`C3_RESULT_FILE`, its artifacts) must be paths it can
            // use: past PATH_MAX every open of them fails (ENAMETOOLONG), and past the
            // kernel's argument limit its variables failed the execve, after the workdir,
            // the store check and the datasets were made, as the script's own error.
            if clean.len() > MAX_WORKDIR_BYTES {
                return Err(SpecError::field(
                    "workdir",
                    format!(
                        "is {} bytes; it must be at most {MAX_WORKDIR_BYTES}, for the job's paths below it",
                        clean.len()
                    ),
                ));
            }
            self.workdir = Some(clean);
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::field(
                    format!("env.{key}"),
                    "is not a valid variable name",
                ));
            }
            if value.contains('\0') {
                return Err(SpecError::field(
                    format!("env.{key}"),
                    "value contains a NUL byte",
                ));
            }
            let entry = key.len() + 1 + value.len();
            if entry >= max_arg_strlen() {
                // A name that long is not echoed whole.
                let shown: String = key.chars().take(64).collect();
                return Err(SpecError::field(
                    format!("env.{shown}"),
                    format!(
                        "NAME=VALUE is {entry} bytes; a variable must be under {} (the kernel's limit)",
                        max_arg_strlen()
                    ),
                ));
            }
        }
        // All of it together, with a pointer for each string, must fit what execve takes
        // (a quarter of the stack limit): 300,000 empty arguments fit the spec's 1 MiB and
        // came to 2.7 MB, and execve failed (E2BIG) as the script's error.
        let strings: usize = self.command.iter().map(|a| a.len() + 1).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 2)
                .sum::<usize>();
        let pointers = std::mem::size_of::<usize>()
            * (self.command.len() + self.env.len() + AGENT_ENV_ENTRIES + 2);
        let total = strings + pointers + AGENT_ENV_BYTES;
        if total > max_exec_bytes() {
            return Err(SpecError::field(
                "command",
                format!(
                    "with `env` comes to {total} bytes for execve (strings and their pointers, and room for the agent's variables); it takes at most {} here (a quarter of the stack limit)",
                    max_exec_bytes()
                ),
            ));
        }
        for (i, dir) in self.output.iter_mut().enumerate() {
            *dir = relative_dir(dir)
                .and_then(not_the_agents)
                .map_err(|p| SpecError::field(format!("output[{i}]"), p))?;
        }
        if self.timeout_secs == Some(0) {
            return Err(SpecError::field(
                "timeout_secs",
                "must be more than 0 (omit it for no timeout)",
            ));
        }
        if let Some(user) = &self.user {
            if user.is_empty() {
                return Err(SpecError::field("user", "is empty"));
            }
            // No name service has such a name: refused as the spec's error (exit 2), not
            // looked up at launch and reported as the node's (retryable).
            if user.len() > 256 || user.chars().any(|c| c.is_control() || c == '/' || c == ':') {
                return Err(SpecError::field(
                    "user",
                    "is not a user name (control characters, `/` or `:`, or over 256 bytes)",
                ));
            }
        }
        let workdir = self.workdir.clone();
        for (i, d) in self.datasets.iter_mut().enumerate() {
            d.source_job()
                .map_err(|p| SpecError::field(format!("datasets[{i}].ref"), p))?;
            let field = || format!("datasets[{i}].mount");
            if d.mount.is_empty() {
                return Err(SpecError::field(field(), "is empty"));
            }
            // v1 allowed absolute mounts; one inside the workdir still works, as its relative form.
            let rel = if d.mount.starts_with('/') {
                let abs = absolute_dir(&d.mount).map_err(|p| SpecError::field(field(), p))?;
                let inside = workdir
                    .as_deref()
                    .and_then(|w| abs.strip_prefix(w))
                    .and_then(|r| r.strip_prefix('/'));
                match inside {
                    Some(r) if !r.is_empty() => r.to_string(),
                    _ => {
                        return Err(SpecError::field(
                            field(),
                            format!("`{}` must be relative to the workdir", d.mount),
                        ))
                    }
                }
            } else {
                d.mount.clone()
            };
            d.mount = relative_dir(&rel)
                .and_then(not_the_agents)
                .map_err(|p| SpecError::field(field(), p))?;
        }
        // Two datasets in one directory were merged, the second's copy of a path both list
        // silently replacing the first's.
        for (i, d) in self.datasets.iter().enumerate() {
            if let Some((j, other)) = self.datasets[..i].iter().enumerate().find(|(_, o)| {
                let (a, b) = (o.mount.as_str(), d.mount.as_str());
                a == b || b.starts_with(&format!("{a}/")) || a.starts_with(&format!("{b}/"))
            }) {
                return Err(SpecError::field(
                    format!("datasets[{i}].mount"),
                    format!(
                        "`{}` overlaps datasets[{j}].mount `{}`; each dataset needs a directory of its own",
                        d.mount, other.mount
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Output dirs the job's files are collected from, `artifacts` first.
    pub fn collected_dirs(&self) -> Vec<String> {
        let mut dirs = vec!["artifacts".to_string()];
        for d in &self.output {
            if !dirs.contains(d) {
                dirs.push(d.clone());
            }
        }
        dirs
    }
}

impl DatasetSpec {
    /// The job id named by `ref` (`/jobs/<job_id>`).
    pub fn source_job(&self) -> Result<&str, String> {
        let id = self
            .reference
            .strip_prefix("/jobs/")
            .map(|s| s.trim_end_matches('/'))
            .ok_or_else(|| format!("`{}` is not of the form /jobs/<job_id>", self.reference))?;
        validate_job_id(id)?;
        Ok(id)
    }
}

/// 1-128 chars of `[A-Za-z0-9_-]`.
pub fn validate_job_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("`{id}` must be 1-128 characters long"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "`{id}` has {c:?}; only A-Z a-z 0-9 _ - are allowed"
        ));
    }
    Ok(())
}

/// A relative directory inside the workdir, normalized: empty parts and one leading `./`
/// are dropped; `.` anywhere else, `..`, NUL and absolute paths are refused.
fn relative_dir(dir: &str) -> Result<String, String> {
    if dir.is_empty() {
        return Err("is empty".into());
    }
    if dir.starts_with('/') {
        return Err(format!("`{dir}` must be relative to the workdir"));
    }
    let parts = clean_parts(dir, true)?;
    if parts.is_empty() {
        return Err(format!(
            "`{dir}` is the workdir itself; name a directory inside it"
        ));
    }
    Ok(parts.join("/"))
}

/// A normalized relative dir that is not in the agent's own `.c3` (its socket, the job's
/// result, the logs `pull --logs` writes there): collected, `.c3/stdout.log` was the job's
/// file and the log's both, and a dataset there was the agent's to replace.
fn not_the_agents(dir: String) -> Result<String, String> {
    if dir == ".c3" || dir.starts_with(".c3/") {
        return Err(format!("`{dir}` is in `.c3`, the agent's own directory"));
    }
    Ok(dir)
}

/// An absolute directory, normalized the same way (no `.` or `..` at all).
fn absolute_dir(dir: &str) -> Result<String, String> {
    if !dir.starts_with('/') {
        return Err(format!("`{dir}` must be an absolute path"));
    }
    Ok(format!("/{}", clean_parts(dir, false)?.join("/")))
}

fn clean_parts(dir: &str, leading_dot_ok: bool) -> Result<Vec<&str>, String> {
    if dir.contains('\0') {
        return Err("contains a NUL byte".into());
    }
    let mut parts = Vec::new();
    for (i, part) in dir.split('/').filter(|p| !p.is_empty()).enumerate() {
        match part {
            "." if i == 0 && leading_dot_ok => {}
            "." => return Err(format!("`{dir}` must not contain `.` components")),
            ".." => return Err(format!("`{dir}` must not contain `..`")),
            // NAME_MAX: made later, it failed before the launch as the node's error
            // (retryable, on every node).
            p if p.len() > 255 => {
                let shown: String = p.chars().take(32).collect();
                return Err(format!(
                    "has a name of {} bytes (`{shown}...`); a name is at most 255",
                    p.len()
                ));
            }
            p => parts.push(p),
        }
    }
    Ok(parts)
}

/// The path of the first key that appears twice in one object of `bytes` (valid JSON).
fn duplicate_key(bytes: &[u8]) -> Option<String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};

    struct Walk<'a> {
        path: String,
        found: &'a mut Option<String>,
    }
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let Walk { path, found } = self;
            let mut i = 0;
            while seq
                .next_element_seed(Walk {
                    path: format!("{path}[{i}]"),
                    found: &mut *found,
                })?
                .is_some()
            {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Walk { path, found } = self;
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let at = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if !seen.insert(key) && found.is_none() {
                    *found = Some(at.clone());
                }
                map.next_value_seed(Walk {
                    path: at,
                    found: &mut *found,
                })?;
            }
            Ok(())
        }
    }

    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Walk {
        path: String::new(),
        found: &mut found,
    }
    .deserialize(&mut de)
    .ok()?;
    found
}

#[cfg(test)]
mod tests {
    /// Two equal keys in one object are refused by path, at any depth: JSON readers keep one
    /// of them, and which one the writer meant is unknown.
    #[test]
    fn a_key_given_twice_is_refused() {
        let twice = br#"{"job_id":"d1","command":["true"],"timeout_secs":5,"timeout_secs":null}"#;
        assert_eq!(
            super::JobSpec::from_json(twice).unwrap_err(),
            super::SpecError::field("timeout_secs", "appears twice")
        );
        let env = br#"{"job_id":"d1","command":["true"],"env":{"A":"1","B":"2","A":"3"}}"#;
        assert_eq!(
            super::JobSpec::from_json(env).unwrap_err(),
            super::SpecError::field("env.A", "appears twice")
        );
        let nested =
            br#"{"job_id":"d1","command":["true"],"datasets":[{"ref":"a","ref":"b","mount":"m"}]}"#;
        assert_eq!(
            super::JobSpec::from_json(nested).unwrap_err(),
            super::SpecError::field("datasets[0].ref", "appears twice")
        );
        assert!(super::JobSpec::from_json(
            br#"{"job_id":"d1","command":["true"],"env":{"A":"1"}}"#
        )
        .is_ok());
    }

    use super::*;

    fn err(json: &str) -> String {
        JobSpec::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    /// A type error names the field and the kinds, never the value: `env` and `command` hold
    /// secrets, and the error goes to the journal.
    #[test]
    fn a_type_error_does_not_show_the_value() {
        for (json, field) in [
            (
                r#"{"job_id":"j","command":["true"],"env":"AWS_SECRET_ACCESS_KEY=hunter2"}"#,
                "env",
            ),
            (
                r#"{"job_id":"j","command":"python t.py --token=hunter2"}"#,
                "command",
            ),
            (
                r#"{"job_id":"j","command":["true"],"env":{"TOKEN":4242}}"#,
                "env.TOKEN",
            ),
            (
                r#"{"job_id":"j","command":["true"],"timeout_secs":"hunter2"}"#,
                "timeout_secs",
            ),
        ] {
            let e = err(json);
            assert!(!e.contains("hunter2") && !e.contains("4242"), "{e}");
            assert!(e.contains(field) && e.contains("expected"), "{e}");
        }
        assert_eq!(
            without_value("invalid type: floating point `1.5`, expected u64"),
            "invalid type: floating point, expected u64"
        );
    }

    #[test]
    fn a_project_is_a_name() {
        for bad in ["", "a\\nb", "a\\u0000b", "a\\u001b[31m"] {
            let json = format!(r#"{{"job_id":"j","command":["true"],"project":"{bad}"}}"#);
            assert!(err(&json).contains("project"), "{bad:?}");
        }
        let long = "p".repeat(MAX_PROJECT_BYTES + 1);
        assert!(err(&format!(
            r#"{{"job_id":"j","command":["true"],"project":"{long}"}}"#
        ))
        .contains("project"));
        JobSpec::from_json(br#"{"job_id":"j","command":["true"],"project":"team-a/vision"}"#)
            .unwrap();
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let p = JobSpec::from_json(br#"{"job_id":"j1","command":["true"]}"#).unwrap();
        assert_eq!(p.spec.attempt, 1);
        assert_eq!(p.spec.collected_dirs(), vec!["artifacts"]);
    }

    #[test]
    fn paths_are_normalized_once() {
        let p = JobSpec::from_json(
            br#"{"job_id":"j","command":["x"],"workdir":"/w//j/","output":["./res","a//b/","res"],
                "datasets":[{"ref":"/jobs/p","mount":"/w/j/in//d"},{"ref":"/jobs/p","mount":"./e"}]}"#,
        )
        .unwrap()
        .spec;
        assert_eq!(p.workdir.as_deref(), Some("/w/j"));
        assert_eq!(p.output, vec!["res", "a/b", "res"]);
        assert_eq!(p.collected_dirs(), vec!["artifacts", "res", "a/b"]);
        assert_eq!(p.datasets[0].mount, "in/d");
        assert_eq!(p.datasets[1].mount, "e");
    }

    /// Two datasets in one directory (or one inside the other) were merged silently; the
    /// agent's `.c3` is no output dir nor mount.
    #[test]
    fn overlapping_mounts_and_the_agents_dir_are_refused() {
        let ds = |a: &str, b: &str| {
            format!(
                r#"{{"job_id":"j","command":["x"],"datasets":[{{"ref":"/jobs/a","mount":"{a}"}},{{"ref":"/jobs/b","mount":"{b}"}}]}}"#
            )
        };
        for (a, b) in [
            ("in", "in"),
            ("in", "./in/x"),
            ("in/x", "in"),
            ("in", "in//"),
        ] {
            let e = err(&ds(a, b));
            assert!(
                e.contains("datasets[1].mount") && e.contains("overlaps"),
                "{a} {b}: {e}"
            );
        }
        JobSpec::from_json(ds("in", "in2").as_bytes()).unwrap();
        JobSpec::from_json(ds("in/a", "in/b").as_bytes()).unwrap();
        assert!(err(&ds("x", ".c3/in")).contains(".c3"));
        for out in [".c3", "./.c3/logs"] {
            let e = err(&format!(
                r#"{{"job_id":"j","command":["x"],"output":["{out}"]}}"#
            ));
            assert!(e.contains("output[0]") && e.contains(".c3"), "{e}");
        }
        JobSpec::from_json(br#"{"job_id":"j","command":["x"],"output":[".c3x"]}"#).unwrap();
    }

    /// An argument or a variable the kernel would refuse at execve (E2BIG) is refused here;
    /// one byte under the limit (the NUL makes it) passes.
    #[test]
    fn an_argument_or_variable_past_the_kernels_limit_is_refused() {
        let spec = |command: Vec<String>, env: BTreeMap<String, String>| {
            let mut s = JobSpec::from_json(br#"{"job_id":"j","command":["x"]}"#)
                .unwrap()
                .spec;
            s.command = command;
            s.env = env;
            s.validate()
        };
        let max = max_arg_strlen();
        let big = "a".repeat(max);
        let fits = "a".repeat(max - 1);
        let e = spec(vec!["echo".into(), big.clone()], BTreeMap::new()).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("`command[1]`: is {max} bytes")),
            "{e}"
        );
        spec(vec!["echo".into(), fits], BTreeMap::new()).unwrap();
        let env = |v: usize| BTreeMap::from([("BLOB".to_string(), "a".repeat(v))]);
        // BLOB= is 5 bytes.
        let e = spec(vec!["x".into()], env(max - 5)).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("`env.BLOB`: NAME=VALUE is {max} bytes")),
            "{e}"
        );
        spec(vec!["x".into()], env(max - 6)).unwrap();
        let e = spec(vec!["x".into()], BTreeMap::from([(big, String::new())])).unwrap_err();
        assert!(e.to_string().len() < 300, "the name is not echoed whole");
    }

    /// A name over 255 bytes in a path, a workdir the job's paths below would not fit, and
    /// a command and env execve would refuse all together are the spec's error (exit 2),
    /// not the node's before the launch or the script's at execve.
    #[test]
    fn paths_and_a_command_the_node_would_refuse_are_the_specs_error() {
        let long = "a".repeat(256);
        let e = err(&format!(
            r#"{{"job_id":"a","command":["true"],"output":["x/{long}"]}}"#
        ));
        assert!(e.contains("`output[0]`") && e.contains("256 bytes"), "{e}");
        let e = err(&format!(
            r#"{{"job_id":"a","command":["true"],"datasets":[{{"ref":"/jobs/b","mount":"{long}"}}]}}"#
        ));
        assert!(e.contains("`datasets[0].mount`"), "{e}");
        let e = err(&format!(
            r#"{{"job_id":"a","command":["true"],"workdir":"/j/{long}"}}"#
        ));
        assert!(e.contains("`workdir`"), "{e}");
        let deep = format!("/j{}", "/abcdefgh".repeat(400));
        let e = err(&format!(
            r#"{{"job_id":"a","command":["true"],"workdir":"{deep}"}}"#
        ));
        assert!(e.contains("`workdir`: is 3602 bytes"), "{e}");
        let many = vec![String::new(); max_exec_bytes() / 8 + 1];
        let mut s = JobSpec::from_json(br#"{"job_id":"j","command":["x"]}"#)
            .unwrap()
            .spec;
        s.command.extend(many);
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("`command`") && e.contains("for execve"), "{e}");
        s.command.truncate(1000);
        s.validate().unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        assert!(err(r#"{"command":["true"]}"#).contains("`job_id`: is required"));
        assert!(err(r#"{"job_id":"a/b","command":["true"]}"#).contains("`job_id`"));
        assert!(err(r#"{"job_id":"a","command":[]}"#).contains("`command`"));
        assert!(err(r#"{"job_id":"a","command":"true"}"#).contains("`command`"));
        assert!(
            err(r#"{"job_id":"a","command":["x"],"timeout_secs":"1"}"#).contains("`timeout_secs`")
        );
        assert!(err(r#"{"job_id":"a","command":["x"],"output":["../x"]}"#).contains("`output[0]`"));
        assert!(err(r#"{"job_id":"a","command":["x"],"output":["/x"]}"#).contains("`output[0]`"));
        assert!(err(r#"{"job_id":"a","command":["x"],"env":{"A":1}}"#).contains("`env.A`"));
        assert!(
            err(r#"{"job_id":"a","command":["x"],"datasets":[{"ref":"jobs/x","mount":"m"}]}"#)
                .contains("`datasets[0].ref`")
        );
        assert!(err(r#"{"job_id":"a","command":["x"],"output":["r/."]}"#).contains("`output[0]`"));
        assert!(
            err(r#"{"job_id":"a","command":["x"],"output":["a/../b"]}"#).contains("`output[0]`")
        );
        assert!(err(r#"{"job_id":"a","command":["x"],"workdir":"/w/../x"}"#).contains("`workdir`"));
        assert!(err(
            r#"{"job_id":"a","command":["x"],"datasets":[{"ref":"/jobs/b","mount":"/etc/x"}]}"#
        )
        .contains("`datasets[0].mount`"));
        assert!(err(r#"[1]"#).contains("object"));
        let typo = err(r#"{"job_id":"a","command":["x"],"timeout":5}"#);
        assert!(
            typo.contains("`timeout`") && typo.contains("did you mean `timeout_secs`"),
            "{typo}"
        );
        assert!(!err(r#"{"job_id":"a","command":["x"],"zzzzzzzz":5}"#).contains("did you mean"));
        assert!(err(r#"{"#).contains("not valid JSON"));
    }
}
