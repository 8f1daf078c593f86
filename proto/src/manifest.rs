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
    /// Relative to the workdir, `/`-separated. For a name that is not UTF-8, a lossy form for
    /// display; the exact bytes are `path_b64`.
    pub path: String,
    /// The path's exact bytes (standard base64), present only when they are not UTF-8
    /// (contract v2 §5). A reader that predates it sees `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_b64: Option<String>,
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
            let raw = match f.path_b64 {
                Some(_) => {
                    let raw = f.raw_path().map_err(|_| ManifestError::UnsafePath {
                        path: f.path.clone(),
                        problem: "path_b64 is not base64",
                    })?;
                    check_raw_path(&raw, &f.path)?;
                    std::borrow::Cow::Owned(raw)
                }
                None => std::borrow::Cow::Borrowed(f.path.as_bytes()),
            };
            check_size_of_path(&raw, &f.path)?;
            if !is_sha256_hex(&f.sha256) {
                return Err(ManifestError::BadDigest {
                    path: f.path.clone(),
                });
            }
        }
        Ok(manifest)
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FileEntry {
    /// The path's exact bytes: `path_b64` decoded, else `path`.
    pub fn raw_path(&self) -> Result<Vec<u8>, base64::DecodeError> {
        use base64::Engine;
        match &self.path_b64 {
            Some(b) => base64::engine::general_purpose::STANDARD.decode(b),
            None => Ok(self.path.as_bytes().to_vec()),
        }
    }
}

/// The agent's key for a relative path: the path itself when it is UTF-8, else a NUL (which
/// no file name holds, so no real path collides) and the bytes in base64.
pub fn rel_key(bytes: &[u8]) -> String {
    use base64::Engine;
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => format!(
            "\0{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ),
    }
}

/// The bytes of a [`rel_key`].
pub fn rel_bytes(key: &str) -> Vec<u8> {
    use base64::Engine;
    match key.strip_prefix('\0') {
        Some(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_else(|_| key.as_bytes().to_vec()),
        None => key.as_bytes().to_vec(),
    }
}

/// A [`rel_key`] for people: the lossy path of a name that is not UTF-8.
pub fn rel_display(key: &str) -> String {
    if key.starts_with('\0') {
        String::from_utf8_lossy(&rel_bytes(key)).into_owned()
    } else {
        key.to_string()
    }
}

/// A manifest entry for `key` (a [`rel_key`]): `path`, and `path_b64` when not UTF-8.
pub fn entry_paths(key: &str) -> (String, Option<String>) {
    match key.strip_prefix('\0') {
        Some(b64) => (rel_display(key), Some(b64.to_string())),
        None => (key.to_string(), None),
    }
}

/// The deepest path, in components, that the agent collects or writes (a manifest entry, a
/// file below the workdir).
pub const MAX_PATH_DEPTH: usize = 128;
/// The longest path, in bytes, that the agent collects or writes.
pub const MAX_PATH_BYTES: usize = 16 * 1024;

/// Whether a path (relative to the workdir, `/`-separated) is one a manifest may list.
pub fn path_fits(raw: &[u8]) -> bool {
    let depth = raw.iter().filter(|&&b| b == b'/').count() + 1;
    depth <= MAX_PATH_DEPTH && raw.len() <= MAX_PATH_BYTES
}

/// No agent writes an entry deeper or longer than it collects: one that is came from
/// elsewhere, and `pull` (perhaps as root) would make a directory for each of its thousands
/// of components, past quotas and the free-space check, which counts file bytes.
fn check_size_of_path(raw: &[u8], shown: &str) -> Result<(), ManifestError> {
    if !path_fits(raw) {
        return Err(ManifestError::UnsafePath {
            path: shown.chars().take(200).collect(),
            problem: "deeper than 128 directories or longer than 16 KiB",
        });
    }
    Ok(())
}

/// The exact bytes of a path: relative, no NUL, no empty/`.`/`..` component.
fn check_raw_path(raw: &[u8], shown: &str) -> Result<(), ManifestError> {
    let bad = |problem| {
        Err(ManifestError::UnsafePath {
            path: shown.to_string(),
            problem,
        })
    };
    if raw.is_empty() || raw[0] == b'/' || raw.contains(&0) {
        return bad("path_b64 is not a relative path");
    }
    if raw
        .split(|b| *b == b'/')
        .any(|part| part.is_empty() || part == b"." || part == b"..")
    {
        return bad("path_b64 has an empty, `.` or `..` component");
    }
    Ok(())
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
            path_b64: None,
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
        let deep = format!("artifacts/{}f", "d/".repeat(MAX_PATH_DEPTH - 1));
        assert!(check_size_of_path(deep.as_bytes(), &deep).is_err());
        let deepest = format!("artifacts/{}f", "d/".repeat(MAX_PATH_DEPTH - 2));
        assert!(check_size_of_path(deepest.as_bytes(), &deepest).is_ok());
        let long = format!("artifacts/{}", "x".repeat(MAX_PATH_BYTES));
        assert!(check_size_of_path(long.as_bytes(), &long).is_err());
    }

    #[test]
    fn names_that_are_not_utf8_have_exact_bytes_and_stay_confined() {
        let raw = b"artifacts/caf\xe9".to_vec();
        let key = rel_key(&raw);
        assert!(key.starts_with('\0'), "no real path holds a NUL");
        assert_eq!(rel_bytes(&key), raw);
        assert_eq!(rel_key(b"artifacts/plain"), "artifacts/plain");
        let (path, b64) = entry_paths(&key);
        assert_eq!(path, "artifacts/caf\u{fffd}");
        let entry = FileEntry {
            path,
            path_b64: b64,
            size: 0,
            sha256: "0".repeat(64),
            blake3: String::new(),
            mode: 0o644,
            mtime_ns: 0,
        };
        assert_eq!(entry.raw_path().unwrap(), raw);
        let mut m = Manifest::new("j", None, 1);
        m.files.push(entry.clone());
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        // A plain entry has no path_b64 at all (older readers see what they always saw).
        let plain = String::from_utf8(Manifest::new("j", None, 1).to_json()).unwrap();
        assert!(!plain.contains("path_b64"));
        // The exact bytes are held to the same rules as `path`.
        use base64::Engine;
        for evil in [&b"../x"[..], b"/etc/passwd", b"a/\xff/../../x", b"a\0b"] {
            let mut bad = m.clone();
            bad.files[0].path_b64 = Some(base64::engine::general_purpose::STANDARD.encode(evil));
            assert!(Manifest::from_json(&bad.to_json()).is_err(), "{evil:?}");
        }
    }
}
