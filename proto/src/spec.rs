//! The job spec (contract §3): parsed strictly, so that a bad spec is one line naming the field.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// Fields the contract defines; anything else is reported as a warning.
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
    /// Absolute, or relative to the workdir.
    pub mount: String,
}

fn default_attempt() -> u32 {
    1
}

/// A spec that parsed, with the names of fields the contract does not know.
#[derive(Debug, Clone)]
pub struct ParsedSpec {
    pub spec: JobSpec,
    pub unknown_fields: Vec<String>,
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

impl JobSpec {
    /// Parse and validate a spec; the error names the first bad field.
    pub fn from_json(bytes: &[u8]) -> Result<ParsedSpec, SpecError> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| SpecError::Syntax(e.to_string()))?;
        let object = value.as_object().ok_or(SpecError::NotAnObject)?;
        let unknown_fields = object
            .keys()
            .filter(|k| !KNOWN_FIELDS.contains(&k.as_str()))
            .cloned()
            .collect();
        let spec: JobSpec = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde reports a missing field at the parent (".")
            match inner.strip_prefix("missing field `") {
                Some(rest) => SpecError::field(rest.trim_end_matches('`'), "is required"),
                None => SpecError::field(path, inner),
            }
        })?;
        spec.validate()?;
        Ok(ParsedSpec {
            spec,
            unknown_fields,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a JobSpec always serializes")
    }

    /// Checks what serde's types cannot express.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_job_id(&self.job_id).map_err(|p| SpecError::field("job_id", p))?;
        if self.attempt == 0 {
            return Err(SpecError::field("attempt", "must be 1 or more"));
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
        if let Some(workdir) = &self.workdir {
            if workdir.is_empty() || !Path::new(workdir).is_absolute() {
                return Err(SpecError::field("workdir", "must be an absolute path"));
            }
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
        }
        for (i, dir) in self.output.iter().enumerate() {
            relative_dir(dir).map_err(|p| SpecError::field(format!("output[{i}]"), p))?;
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
        }
        for (i, d) in self.datasets.iter().enumerate() {
            d.source_job()
                .map_err(|p| SpecError::field(format!("datasets[{i}].ref"), p))?;
            if d.mount.is_empty() {
                return Err(SpecError::field(format!("datasets[{i}].mount"), "is empty"));
            }
            if !Path::new(&d.mount).is_absolute() {
                relative_dir(&d.mount)
                    .map_err(|p| SpecError::field(format!("datasets[{i}].mount"), p))?;
            } else if Path::new(&d.mount)
                .components()
                .any(|c| c == Component::ParentDir)
            {
                return Err(SpecError::field(
                    format!("datasets[{i}].mount"),
                    "must not contain `..`",
                ));
            }
        }
        Ok(())
    }

    /// Output dirs the job's files are collected from, `artifacts` first.
    pub fn collected_dirs(&self) -> Vec<String> {
        let mut dirs = vec!["artifacts".to_string()];
        for d in &self.output {
            let clean = d.trim_end_matches('/').to_string();
            if !dirs.contains(&clean) {
                dirs.push(clean);
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

/// A relative directory that stays inside the workdir.
fn relative_dir(dir: &str) -> Result<(), String> {
    let path = Path::new(dir);
    if dir.is_empty() {
        return Err("is empty".into());
    }
    if path.is_absolute() {
        return Err(format!("`{dir}` must be relative to the workdir"));
    }
    for c in path.components() {
        match c {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(format!("`{dir}` must not contain `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("`{dir}` must be relative"))
            }
        }
    }
    if path.components().all(|c| c == Component::CurDir) {
        return Err(format!(
            "`{dir}` is the workdir itself; name a directory inside it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> String {
        JobSpec::from_json(json.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn minimal_spec_gets_defaults() {
        let p = JobSpec::from_json(br#"{"job_id":"j1","command":["true"],"extra":1}"#).unwrap();
        assert_eq!(p.spec.attempt, 1);
        assert_eq!(p.unknown_fields, vec!["extra".to_string()]);
        assert_eq!(p.spec.collected_dirs(), vec!["artifacts"]);
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
        assert!(err(r#"[1]"#).contains("object"));
        assert!(err(r#"{"#).contains("not valid JSON"));
    }
}
