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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum SocketRequest {
    /// Store these files now.
    Publish { paths: Vec<String> },
    /// Everything pending so far (settled, not open for writing) is stored.
    WaitAll,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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
    }
}
