//! The manifest (contract §6): which blobs make up a job's output.

use std::io::Write;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// The only manifest version this build reads and writes.
pub const MANIFEST_VERSION: u32 = 1;

/// No manifest entry is longer than this plus its path: its two hex digests are 128 bytes,
/// its keys and indentation about 125 more, its numbers at most 50 (a 20-digit size and
/// mtime, a 10-digit mode). A count of the least an entry takes (200) let a scan collect
/// a third more files than the manifest could list: then no manifest at all was written,
/// and every `recover` did the whole job again.
pub const ENTRY_FIXED_BYTES: u64 = 310;

/// The most a manifest's entry for the file keyed `rel` (a [`rel_key`]) takes: what a scan
/// or live sync counts against `store.max_manifest_bytes` (a path may be 16 KiB). The path as
/// JSON spells it: a control character is six bytes there (`\u0001`), and a name that is not
/// UTF-8 is written twice, lossy and in base64. Counting the raw bytes let a job fill a
/// manifest six times over the cap with names of control characters: the scan took them all,
/// the manifest could never be written, and every `recover` did the whole job again.
pub fn entry_ceiling(rel: &str) -> u64 {
    match rel.strip_prefix('\0') {
        Some(b64) => {
            let lossy = String::from_utf8_lossy(&rel_bytes(rel)).into_owned();
            // `,\n    "path_b64": ""` and the base64 itself.
            ENTRY_FIXED_BYTES + json_len(&lossy) + 18 + b64.len() as u64
        }
        None => ENTRY_FIXED_BYTES + json_len(rel),
    }
}

/// What the file keyed `rel` adds to its entry beyond [`ENTRY_FIXED_BYTES`]: its path as the
/// manifest spells it. Every count of what a book or a queue will take in a manifest uses it.
pub fn entry_path_bytes(rel: &str) -> u64 {
    entry_ceiling(rel) - ENTRY_FIXED_BYTES
}

/// The bytes of `s` inside a JSON string as serde_json writes it.
fn json_len(s: &str) -> u64 {
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\t' | b'\r' | 0x08 | 0x0c => 2,
            0..=0x1f => 6,
            _ => 1,
        })
        .sum()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub job_id: String,
    pub project: Option<String>,
    pub attempt: u32,
    /// The run that wrote it: a random id its agent keeps in the run record, so that a
    /// later `recover` on the node tells its own run's seal from another node's run of the
    /// same attempt. Absent in older agents' manifests (contract v2 §6 lists no such field;
    /// a reader that predates it ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub complete: bool,
    /// Sorted by `path`; `[]` when the job wrote nothing.
    pub files: Vec<FileEntry>,
    pub logs: Option<Logs>,
    /// The job's structured result, or null.
    #[serde(default, deserialize_with = "bounded_result")]
    pub result: serde_json::Value,
}

/// The most a manifest's `result` may hold, not counting whitespace, when it is read. An
/// agent writes at most 64 KiB of the job's JSON (numbers re-spelt may grow it a little); a
/// forged `[0,0,...]` of 256 MiB would be a `Value` tree of 4 GiB in the root agent.
pub const MAX_READ_RESULT_BYTES: usize = 1024 * 1024;

/// `result` as written, measured before any `Value` is built from it.
fn bounded_result<'de, D: serde::Deserializer<'de>>(d: D) -> Result<serde_json::Value, D::Error> {
    use serde::de::Error;
    let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
    let dense = raw
        .get()
        .bytes()
        .filter(|b| !matches!(b, b' ' | b'\n' | b'\t' | b'\r'))
        .count();
    if dense > MAX_READ_RESULT_BYTES {
        return Err(D::Error::custom(format_args!(
            "result holds {dense} bytes; at most {MAX_READ_RESULT_BYTES} are read"
        )));
    }
    serde_json::from_str(raw.get()).map_err(D::Error::custom)
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
    /// No store holds 2^64 bytes: the manifest lies, and its sizes would overflow a total.
    #[error("manifest entries' sizes add up past 2^64 bytes (at `{path}`)")]
    SizesOverflow { path: String },
}

impl Manifest {
    pub fn new(job_id: &str, project: Option<String>, attempt: u32) -> Self {
        Manifest {
            version: MANIFEST_VERSION,
            job_id: job_id.to_string(),
            project,
            attempt,
            run_id: None,
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

    /// The bytes [`Manifest::to_json`] would write were `files` its entries (its own `files`
    /// are not written), one entry at a time: an agent's manifest of a million files is
    /// written from its book, never held as a million [`FileEntry`]s (hex strings and all)
    /// beside the document.
    pub fn to_json_with<T: ListedFile>(&self, files: impl Iterator<Item = T>) -> Vec<u8> {
        self.to_json_within(files, u64::MAX)
            .expect("a Manifest always serializes")
    }

    /// [`Manifest::to_json_with`], given up (`None`) as soon as the document passes `max`
    /// bytes: a job's names can make it many times its entries' count would say (a control
    /// character is six bytes escaped), and it is never built whole past what may be stored.
    pub fn to_json_within<T: ListedFile>(
        &self,
        files: impl Iterator<Item = T>,
        max: u64,
    ) -> Option<Vec<u8>> {
        // The field order (and so the bytes) of the derived `Serialize` of `Manifest`.
        #[derive(Serialize)]
        struct Out<'a, F: Serialize> {
            version: u32,
            job_id: &'a str,
            project: &'a Option<String>,
            attempt: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            run_id: &'a Option<String>,
            complete: bool,
            files: F,
            logs: &'a Option<Logs>,
            result: &'a serde_json::Value,
        }
        let out = Out {
            version: self.version,
            job_id: &self.job_id,
            project: &self.project,
            attempt: self.attempt,
            run_id: &self.run_id,
            complete: self.complete,
            files: Entries(std::cell::RefCell::new(Some(files))),
            logs: &self.logs,
            result: &self.result,
        };
        let mut capped = Capped {
            bytes: Vec::new(),
            max: usize::try_from(max).unwrap_or(usize::MAX),
        };
        serde_json::to_writer_pretty(&mut capped, &out).ok()?;
        capped.write_all(b"\n").ok()?;
        Some(capped.bytes)
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
        let mut total: u64 = 0;
        for f in &manifest.files {
            total = total
                .checked_add(f.size)
                .ok_or_else(|| ManifestError::SizesOverflow {
                    path: f.path.clone(),
                })?;
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
        if let Some(logs) = &manifest.logs {
            for (name, log) in [("stdout", &logs.stdout), ("stderr", &logs.stderr)] {
                if !is_sha256_hex(&log.sha256) {
                    return Err(ManifestError::BadDigest {
                        path: format!("logs.{name}"),
                    });
                }
            }
        }
        Ok(manifest)
    }

    /// No path is listed twice or as a file with entries below it: what `pull` needs before
    /// it writes anything. Not part of [`Manifest::from_json`]: a reader that only needs the
    /// digests (gc, `ls`) must still read a manifest an older agent wrote with such a pair
    /// (its book could list a file and entries below it), or one unreadable manifest would
    /// stop every gc.
    pub fn check_places(&self) -> Result<(), ManifestError> {
        check_one_place_each(&self.files)
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// One manifest entry as its holder keeps it (see [`Manifest::to_json_with`]): written
/// exactly as the [`FileEntry`] it stands for.
#[derive(Debug, Clone, Copy)]
pub struct EntryRef<'a> {
    pub path: &'a str,
    pub path_b64: Option<&'a str>,
    pub size: u64,
    pub sha256: &'a [u8; 32],
    pub blake3: &'a [u8; 32],
    pub mode: u32,
    pub mtime_ns: i64,
}

/// Something that is listed as one manifest entry.
pub trait ListedFile {
    fn entry(&self) -> EntryRef<'_>;
}

impl<T: ListedFile> ListedFile for &T {
    fn entry(&self) -> EntryRef<'_> {
        (**self).entry()
    }
}

/// A sequence written as it is drawn (`Serialize` takes `&self`; it is drawn once).
struct Entries<I>(std::cell::RefCell<Option<I>>);

impl<T: ListedFile, I: Iterator<Item = T>> Serialize for Entries<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let files = self.0.borrow_mut().take().expect("written once");
        s.collect_seq(files.map(Listed))
    }
}

struct Listed<T>(T);

impl<T: ListedFile> Serialize for Listed<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let e = self.0.entry();
        let mut st = s.serialize_struct("FileEntry", 6 + usize::from(e.path_b64.is_some()))?;
        st.serialize_field("path", e.path)?;
        match e.path_b64 {
            Some(b64) => st.serialize_field("path_b64", b64)?,
            None => st.skip_field("path_b64")?,
        }
        st.serialize_field("size", &e.size)?;
        st.serialize_field("sha256", hex(e.sha256, &mut [0; 64]))?;
        st.serialize_field("blake3", hex(e.blake3, &mut [0; 64]))?;
        st.serialize_field("mode", &e.mode)?;
        st.serialize_field("mtime_ns", &e.mtime_ns)?;
        st.end()
    }
}

/// `digest` in lower-case hex, written into `buf`.
fn hex<'b>(digest: &[u8; 32], buf: &'b mut [u8; 64]) -> &'b str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in digest.iter().enumerate() {
        buf[2 * i] = DIGITS[usize::from(b >> 4)];
        buf[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
    }
    std::str::from_utf8(buf).expect("hex digits are ASCII")
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

/// Whether the [`rel_key`] `k` names a path below the directory `dir` (a [`rel_key`] too),
/// by their bytes: a key that is not UTF-8 is base64 and shares no prefix with its dir's.
pub fn key_is_below(k: &str, dir: &str) -> bool {
    if !k.starts_with('\0') && !dir.starts_with('\0') {
        return k.len() > dir.len() && k.starts_with(dir) && k.as_bytes()[dir.len()] == b'/';
    }
    let (k, dir) = (rel_bytes(k), rel_bytes(dir));
    k.len() > dir.len() && k.starts_with(&dir) && k[dir.len()] == b'/'
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
    let problem = if !path_fits(raw) {
        "deeper than 128 directories or longer than 16 KiB"
    } else if raw.split(|b| *b == b'/').any(|name| name.len() > 255) {
        // No Linux file system holds such a name: `pull` would fail on it at the very end.
        "a name longer than 255 bytes"
    } else {
        return Ok(());
    };
    Err(ManifestError::UnsafePath {
        path: shown.chars().take(200).collect(),
        problem,
    })
}

/// No path is listed twice or as a file with entries below it: an agent's manifest never
/// does, and `pull` would write both (the last rename wins) or leave a verified download
/// behind a directory it made for the other. Entries are compared in an order where `/`
/// sorts first, so a file's path is followed at once by any path below it.
fn check_one_place_each(files: &[FileEntry]) -> Result<(), ManifestError> {
    let raws: Vec<std::borrow::Cow<'_, [u8]>> = files
        .iter()
        .map(|f| match f.raw_path() {
            Ok(raw) if f.path_b64.is_some() => std::borrow::Cow::Owned(raw),
            _ => std::borrow::Cow::Borrowed(f.path.as_bytes()),
        })
        .collect();
    let mut order: Vec<usize> = (0..files.len()).collect();
    let slash_first = |b: &u8| if *b == b'/' { 0 } else { *b };
    order.sort_unstable_by(|&a, &b| {
        raws[a]
            .iter()
            .map(slash_first)
            .cmp(raws[b].iter().map(slash_first))
    });
    for pair in order.windows(2) {
        let (a, b) = (&raws[pair[0]], &raws[pair[1]]);
        let problem = if a == b {
            "listed twice"
        } else if b.starts_with(a) && b.get(a.len()) == Some(&b'/') {
            "a file with entries below it"
        } else {
            continue;
        };
        return Err(ManifestError::UnsafePath {
            path: files[pair[0]].path.chars().take(200).collect(),
            problem,
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
    // `path` is how the name is shown (`ls`, the operator's review before a pull), `path_b64`
    // what a pull writes: two names, one shown and another written, are not one entry.
    if String::from_utf8_lossy(raw) != shown {
        return bad(
            "path is not path_b64's name as shown (its bytes, U+FFFD for each that is not UTF-8)",
        );
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

/// A `Vec` that refuses to grow past `max` bytes.
struct Capped {
    bytes: Vec<u8>,
    max: usize,
}

impl std::io::Write for Capped {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > self.max {
            return Err(std::io::Error::other("over the size limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an agent's book holds for an entry: digests as bytes.
    struct Held(String, Option<String>, [u8; 32], [u8; 32], u64, u32, i64);

    impl ListedFile for Held {
        fn entry(&self) -> EntryRef<'_> {
            EntryRef {
                path: &self.0,
                path_b64: self.1.as_deref(),
                size: self.4,
                sha256: &self.2,
                blake3: &self.3,
                mode: self.5,
                mtime_ns: self.6,
            }
        }
    }

    fn hex_of(d: &[u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// No entry takes more than its ceiling, whatever its name and numbers: a scan that
    /// counts ceilings never collects more than the manifest can list.
    #[test]
    fn an_entry_takes_at_most_its_ceiling() {
        let names: [&[u8]; 6] = [
            b"a",
            &[1u8; 255],
            b"\"\\\n\t",
            "caf\u{e9}/\u{7f}".as_bytes(),
            b"art/\xff\x01\xfe",
            &[0xffu8; 255],
        ];
        for raw in names {
            let key = rel_key(raw);
            let path_b64 = key.starts_with('\0').then(|| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD.encode(raw)
            });
            let m = Manifest::new("j", None, 1);
            let none = m.to_json_with(std::iter::empty::<&Held>());
            let taken = |entry: Held| {
                let one = m.to_json_with([&entry].into_iter());
                (one.len() - none.len()) as u64
            };
            let largest = taken(Held(
                rel_display(&key),
                path_b64.clone(),
                [0xff; 32],
                [0xff; 32],
                u64::MAX,
                u32::MAX,
                i64::MIN,
            ));
            let least = taken(Held(rel_display(&key), path_b64, [0; 32], [0; 32], 0, 0, 0));
            let ceiling = entry_ceiling(&key);
            assert!(
                largest <= ceiling,
                "{raw:?}: ceiling {ceiling} under {largest}"
            );
            assert!(
                ceiling - least < 100,
                "{raw:?}: ceiling {ceiling} far over {least}"
            );
        }
    }

    /// A manifest written entry by entry is the one `to_json` writes, byte for byte.
    #[test]
    fn a_streamed_manifest_is_to_json_byte_for_byte() {
        let held = [
            Held(
                "a \"q\"\n\u{1}é".into(),
                None,
                [0xab; 32],
                [7; 32],
                0,
                0o644,
                -5,
            ),
            Held(
                "b\u{fffd}".into(),
                Some("YoA=".into()),
                [0; 32],
                [0xff; 32],
                u64::MAX,
                0o7777,
                i64::MIN,
            ),
        ];
        for complete in [false, true] {
            for n in 0..=held.len() {
                let mut m = Manifest::new("j\"1", complete.then(|| "p".into()), 3);
                m.complete = complete;
                if complete {
                    m.logs = Some(Logs {
                        stdout: LogEntry {
                            size: 1,
                            sha256: "0".repeat(64),
                        },
                        stderr: LogEntry {
                            size: 2,
                            sha256: "1".repeat(64),
                        },
                    });
                    m.result = serde_json::json!({"loss": 0.5, "a": [1, {}]});
                }
                let streamed = m.to_json_with(held[..n].iter());
                m.files = held[..n]
                    .iter()
                    .map(|h| FileEntry {
                        path: h.0.clone(),
                        path_b64: h.1.clone(),
                        size: h.4,
                        sha256: hex_of(&h.2),
                        blake3: hex_of(&h.3),
                        mode: h.5,
                        mtime_ns: h.6,
                    })
                    .collect();
                let whole = m.to_json();
                // Capped: the same bytes at exactly their size, nothing one byte short.
                let len = whole.len() as u64;
                assert_eq!(
                    m.to_json_within(held[..n].iter(), len).as_ref(),
                    Some(&whole)
                );
                assert_eq!(m.to_json_within(held[..n].iter(), len - 1), None);
                assert_eq!(
                    String::from_utf8(streamed).unwrap(),
                    String::from_utf8(whole).unwrap()
                );
            }
        }
    }

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
        // One name shown, another written: refused.
        let mut bad = m.clone();
        bad.files[0].path_b64 =
            Some(base64::engine::general_purpose::STANDARD.encode(b"artifacts/payload.sh"));
        bad.files[0].path = "artifacts/readme.txt".into();
        assert!(Manifest::from_json(&bad.to_json()).is_err());
    }

    fn with_paths(paths: &[&str]) -> Manifest {
        let mut m = Manifest::new("j", None, 1);
        for p in paths {
            m.files.push(FileEntry {
                path: p.to_string(),
                path_b64: None,
                size: 0,
                sha256: "0".repeat(64),
                blake3: String::new(),
                mode: 0o644,
                mtime_ns: 0,
            });
        }
        m
    }

    /// A manifest whose entries' sizes add past u64 is a lie no store holds: refused, so no
    /// reader adds them up (`recover`'s book of what was stored overflowed on it).
    #[test]
    fn sizes_that_add_past_u64_are_refused() {
        let mut m = with_paths(&["artifacts/a", "artifacts/b"]);
        for f in &mut m.files {
            f.size = u64::MAX / 2 + 1;
        }
        let e = Manifest::from_json(&m.to_json()).unwrap_err();
        assert!(
            matches!(&e, ManifestError::SizesOverflow { path } if path == "artifacts/b"),
            "{e}"
        );
        m.files[1].size = u64::MAX / 2;
        assert!(Manifest::from_json(&m.to_json()).is_ok());
    }

    /// A forged manifest naming one place twice, or a file with entries below it, is refused
    /// whatever order it lists them in; neighbours that only share a prefix are not.
    #[test]
    fn each_path_names_one_place() {
        let refused = |paths: &[&str]| {
            matches!(
                Manifest::from_json(&with_paths(paths).to_json()).and_then(|m| m.check_places()),
                Err(ManifestError::UnsafePath { .. })
            )
        };
        // A reader that needs only the digests (gc) still reads one an older agent wrote.
        assert!(Manifest::from_json(&with_paths(&["a/x", "a/x/y"]).to_json()).is_ok());
        assert!(refused(&["a/x", "a/x"]));
        assert!(refused(&["a/x", "a/x-1", "a/x/y"]));
        assert!(refused(&["a/x/y/z", "a/x-1", "a/x"]));
        assert!(!refused(&["a/x", "a/x-1", "a/x.d/y", "a/xy/z", "b"]));
        let long = format!("a/{}", "n".repeat(256));
        assert!(refused(&[&long]));
        assert!(!refused(&[&format!("a/{}", "n".repeat(255))]));
    }

    /// A result that would be a huge `Value` tree is refused before it is built; the logs'
    /// digests are blob keys and held to the same form as the files'.
    #[test]
    fn a_manifest_is_read_within_bounds() {
        let mut m = with_paths(&["a/x"]);
        m.result = serde_json::json!({"loss": [0.5, 0.25], "ok": true});
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        m.result = serde_json::Value::Array(vec![0.into(); MAX_READ_RESULT_BYTES / 2 + 1]);
        assert!(matches!(
            Manifest::from_json(&m.to_json()),
            Err(ManifestError::Syntax(_))
        ));
        m.result = serde_json::Value::Null;
        let log = LogEntry {
            size: 1,
            sha256: "x/../../jobs/v/manifest.json".into(),
        };
        m.logs = Some(Logs {
            stdout: LogEntry {
                size: 0,
                sha256: "0".repeat(64),
            },
            stderr: log,
        });
        assert!(matches!(
            Manifest::from_json(&m.to_json()),
            Err(ManifestError::BadDigest { .. })
        ));
    }
}
