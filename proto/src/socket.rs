//! The job's agent socket (contract §4): one JSON object per line, each way.
//!
//! ```text
//! -> {"op":"publish","paths":["artifacts/best.pt"]}      (relative to the workdir, or absolute)
//! -> {"op":"wait_all"}
//! <- {"ok":true,"files":[{"path":"artifacts/best.pt","sha256":"<hex>","size":123}]}
//! <- {"ok":false,"error":"artifacts/x is a symlink; not published"}
//! ```
//! `ok` only once every blob is durable and listed in the in-progress manifest.

use serde::{Deserialize, Serialize};

/// The most paths one `publish` may name.
pub const MAX_PATHS: usize = 1000;

/// The longest request line the agent reads (its newline aside).
pub const MAX_LINE: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SocketRequest {
    /// Store these files now.
    Publish { paths: Vec<String> },
    /// Everything pending so far (settled, not open for writing) is stored.
    WaitAll,
}

/// Read as a plain object, field by field: serde reads an internally tagged enum
/// (`"op"` beside the fields) into a buffer of the whole object before it looks at a field,
/// so `paths` would be built whole, however long, before anything counted it.
impl<'de> Deserialize<'de> for SocketRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Op {
            Publish,
            WaitAll,
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            op: Op,
            #[serde(default, deserialize_with = "some_paths")]
            paths: Option<Vec<String>>,
        }
        let raw = Raw::deserialize(d)?;
        match (raw.op, raw.paths) {
            (Op::Publish, Some(paths)) => Ok(SocketRequest::Publish { paths }),
            (Op::Publish, None) => Err(D::Error::missing_field("paths")),
            (Op::WaitAll, None) => Ok(SocketRequest::WaitAll),
            (Op::WaitAll, Some(_)) => Err(D::Error::unknown_field("paths", &["op"])),
        }
    }
}

fn some_paths<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    at_most_max_paths(d).map(Some)
}

/// `paths`, each once, refused as soon as more than [`MAX_PATHS`] distinct ones are read: a
/// 1 MiB line holds 350,000 short paths, a vector of 12 MB or more in the root agent (16
/// connections: 200 MB) were it read whole before being counted. A path named again is
/// dropped as it is read (a shell glob or a script's list may repeat one).
fn at_most_max_paths<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct Paths;
    impl<'de> serde::de::Visitor<'de> for Paths {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a list of at most {MAX_PATHS} paths")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut paths = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while let Some(path) = seq.next_element::<String>()? {
                if seen.contains(&path) {
                    continue;
                }
                if paths.len() == MAX_PATHS {
                    return Err(serde::de::Error::custom(format!(
                        "publish takes at most {MAX_PATHS} paths at once; publish a directory's files in batches, or use wait_all"
                    )));
                }
                seen.insert(path.clone());
                paths.push(path);
            }
            Ok(paths)
        }
    }
    d.deserialize_seq(Paths)
}

/// `files` is written in every `ok` reply, `[]` included (a client reading `reply["files"]`
/// after a `wait_all` must find it, as §4 shows it), and in no error reply.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SocketReply {
    pub ok: bool,
    #[serde(default)]
    pub files: Vec<PublishedFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

impl SocketRequest {
    /// One line, newline included.
    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("requests always serialize");
        v.push(b'\n');
        v
    }

    pub fn from_line(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

impl Serialize for SocketReply {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let listed = self.ok || !self.files.is_empty();
        let fields = 1 + usize::from(listed) + usize::from(self.error.is_some());
        let mut out = s.serialize_struct("SocketReply", fields)?;
        out.serialize_field("ok", &self.ok)?;
        if listed {
            out.serialize_field("files", &self.files)?;
        }
        if let Some(error) = &self.error {
            out.serialize_field("error", error)?;
        }
        out.end()
    }
}

impl SocketReply {
    pub fn ok(files: Vec<PublishedFile>) -> Self {
        SocketReply {
            ok: true,
            files,
            error: None,
        }
    }

    pub fn error(text: impl Into<String>) -> Self {
        SocketReply {
            ok: false,
            files: Vec::new(),
            error: Some(text.into()),
        }
    }

    pub fn to_line(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("replies always serialize");
        v.push(b'\n');
        v
    }

    pub fn from_line(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_lines_parse() {
        assert_eq!(
            SocketRequest::from_line(br#"{"op":"publish","paths":["artifacts/best.pt"]}"#).unwrap(),
            SocketRequest::Publish {
                paths: vec!["artifacts/best.pt".into()]
            }
        );
        assert_eq!(
            SocketRequest::from_line(br#"{"op":"wait_all"}"#).unwrap(),
            SocketRequest::WaitAll
        );
        assert!(SocketRequest::from_line(br#"{"op":"rm","paths":[]}"#).is_err());
        let reply = SocketReply::error("no");
        assert_eq!(
            reply.to_line(),
            b"{\"ok\":false,\"error\":\"no\"}\n".to_vec()
        );
        // A wait_all's reply lists no file, and still says `files` (§4's shape).
        assert_eq!(
            SocketReply::ok(Vec::new()).to_line(),
            b"{\"ok\":true,\"files\":[]}\n".to_vec()
        );
        let back = SocketReply::from_line(&SocketReply::ok(Vec::new()).to_line()).unwrap();
        assert_eq!(back, SocketReply::ok(Vec::new()));
    }

    /// A request naming more distinct paths than one publish may is refused as it is read,
    /// not built whole first; a path named again is dropped as it is read.
    #[test]
    fn too_many_paths_are_refused_while_read() {
        let line = |n: usize, distinct: usize| {
            let paths: Vec<String> = (0..n).map(|i| format!("\"{}\"", i % distinct)).collect();
            format!(r#"{{"op":"publish","paths":[{}]}}"#, paths.join(","))
        };
        let Ok(SocketRequest::Publish { paths }) =
            SocketRequest::from_line(line(50_000, MAX_PATHS).as_bytes())
        else {
            panic!("{MAX_PATHS} distinct paths refused");
        };
        assert_eq!(paths.len(), MAX_PATHS);
        let err = SocketRequest::from_line(line(150_000, 150_000).as_bytes()).unwrap_err();
        assert!(err.to_string().contains("at most 1000 paths"), "{err}");
        // Refused at the 1,001st path, not after the line was read whole: what follows it
        // (here not even JSON) is never looked at.
        let cut = line(1_001, 1_001);
        let cut = format!("{}, !!! not JSON", &cut[..cut.len() - 2]);
        let err = SocketRequest::from_line(cut.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("at most 1000 paths"), "{err}");
        assert!(SocketRequest::from_line(br#"{"op":"wait_all","paths":[]}"#).is_err());
        assert!(SocketRequest::from_line(br#"{"op":"publish"}"#).is_err());
        assert!(SocketRequest::from_line(br#"{"paths":["a"],"op":"publish"}"#).is_ok());
    }
}
