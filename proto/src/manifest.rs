//! The manifest (contract §6): which blobs make up a job's output.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// The only manifest version this build reads and writes.
pub const MANIFEST_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub job_id: String,
    pub project: Option<String>,
    pub attempt: u32,
    pub complete: bool,
    /// Sorted by `path`; `[]` when the job wrote nothing.
    pub files: Vec<FileEntry>,
    pub logs: Option<Logs>,
    /// The job's structured result, or null.
    #[serde(default)]
    pub result: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the workdir, `/`-separated.
    pub path: String,
    pub size: u64,
    pub sha256: String,
    pub blake3: String,
    pub mode: u32,
    pub mtime_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logs {
    pub stdout: LogEntry,
    pub stderr: LogEntry,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON")]
    Syntax(#[source] serde_json::Error),
    #[error(
        "manifest version {found} is not supported (this agent reads version {MANIFEST_VERSION})"
    )]
    UnsupportedVersion { found: u64 },
    #[error("manifest entry `{path}` is unsafe: {problem}")]
    UnsafePath { path: String, problem: &'static str },
    #[error("manifest entry `{path}` has a malformed sha256")]
    BadDigest { path: String },
}

impl Manifest {
    pub fn new(job_id: &str, project: Option<String>, attempt: u32) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            job_id: job_id.to_string(),
            project,
            attempt,
            complete: false,
            files: Vec::new(),
            logs: None,
            result: serde_json::Value::Null,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a Manifest always serializes");
        out.push(b'\n');
        out
    }

    /// Parse, refusing other versions and any entry that could escape a destination dir.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        // The version first, without building the document: a huge manifest is parsed once,
        // straight into its types (a `Value` tree costs several times the document's size).
        #[derive(Deserialize)]
        struct VersionOnly {
            #[serde(default)]
            version: u64,
        }
        let found = serde_json::from_slice::<VersionOnly>(bytes)
            .map_err(ManifestError::Syntax)?
            .version;
        if found != u64::from(MANIFEST_VERSION) {
            return Err(ManifestError::UnsupportedVersion { found });
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(ManifestError::Syntax)?;
        for f in &manifest.files {
            check_entry_path(&f.path)?;
            if !is_sha256_hex(&f.sha256) {
                return Err(ManifestError::BadDigest {
                    path: f.path.clone(),
                });
            }
        }
        Ok(manifest)
    }

    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A manifest path must be relative, `/`-separated, with no `.`/`..`/empty parts,
/// so that `pull` can never write outside its destination.
fn check_entry_path(path: &str) -> Result<(), ManifestError> {
    let bad = |problem| {
        Err(ManifestError::UnsafePath {
            path: path.to_string(),
            problem,
        })
    };
    if path.is_empty() || path.starts_with('/') {
        return bad("not a relative path");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("has an empty, `.` or `..` component");
        }
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return bad("has a non-normal component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_version_check() {
        let mut m = Manifest::new("j", None, 1);
        m.files.push(FileEntry {
            path: "artifacts/a b\n%&#é".into(),
            size: 1,
            sha256: "0".repeat(64),
            blake3: "1".repeat(64),
            mode: 0o644,
            mtime_ns: 5,
        });
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let v2 = String::from_utf8(m.to_json())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        assert!(matches!(
            Manifest::from_json(v2.as_bytes()),
            Err(ManifestError::UnsupportedVersion { found: 2 })
        ));
    }

    #[test]
    fn unsafe_paths_rejected() {
        for p in ["../x", "/etc/passwd", "a/../../x", "a//b", "./a", ""] {
            assert!(check_entry_path(p).is_err(), "{p}");
        }
        assert!(check_entry_path("artifacts/ok..name").is_ok());
    }
}
