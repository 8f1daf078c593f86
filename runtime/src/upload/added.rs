//! `<attempt dir>/added-blobs`: the bytes an attempt added to the store, whoever of its
//! agents uploaded them, so that `recover` after a crash registers the right storage delta.
//!
//! A line per blob added (`<sha256> <size>`), and from time to time the whole file rewritten
//! as one line (`total <bytes>`) that stands for every line before it. A line per blob alone
//! grew without end: a job rewriting 1,000 small files with new bytes every 2 s added 3.3 GB
//! a day to the state dir, and the sum, each blob once, held every line in memory (8 GB a day
//! of run, at the seal and in `recover`). Now the file stays under [`COMPACT_LINES`] lines and
//! is read a line at a time; a blob recorded twice counts once while the last
//! [`MAX_RECENT`] blobs remember it. A blob is added once (a create-if-absent PUT, one owner per
//! multipart upload, a staged file's hard link): a second record is a rare race or a blob
//! `gc` took in between, so a bounded memory of them is enough.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, Write};
use std::path::Path;

use crate::digest::Digests;

/// Lines appended after which the file is written again as its total.
pub(crate) const COMPACT_LINES: usize = 16_384;
/// Blobs remembered to count a second record of one once (32 bytes each).
pub(crate) const MAX_RECENT: usize = 65_536;
/// The first word of a line that stands for every line before it.
const TOTAL: &str = "total";

/// The bytes the blobs recorded in an `added-blobs` file add up to (each blob once, as far as
/// [`MAX_RECENT`] reaches), or `None` when there is no such file. Read a line at a time.
fn added_bytes(path: &Path) -> Option<u64> {
    let file = File::open(path).ok()?;
    Some(sum(file, &mut Recent::default()).0)
}

/// What the lines of `file` add up to, and how many there are; the blobs named go into
/// `recent`.
fn sum(file: File, recent: &mut Recent) -> (u64, usize) {
    let mut reader = std::io::BufReader::new(file);
    let (mut total, mut lines) = (0u64, 0usize);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        lines += 1;
        let Some((word, size)) = std::str::from_utf8(&line)
            .ok()
            .and_then(|l| l.split_once(' '))
        else {
            continue;
        };
        let Ok(size) = size.trim().parse::<u64>() else {
            continue;
        };
        let mut sha = [0u8; 32];
        if word == TOTAL || hex::decode_to_slice(word, &mut sha).is_err() || recent.first(sha) {
            total = total.saturating_add(size);
        }
    }
    (total, lines)
}

/// The blobs recorded lately, forgotten all at once past [`MAX_RECENT`].
#[derive(Debug, Default)]
struct Recent(HashSet<[u8; 32]>);

impl Recent {
    /// Whether `sha` is not among them (it is now).
    fn first(&mut self, sha: [u8; 32]) -> bool {
        if self.0.len() >= MAX_RECENT && !self.0.contains(&sha) {
            self.0.clear();
        }
        self.0.insert(sha)
    }
}

/// The file and what it holds, behind the uploader's lock.
#[derive(Debug, Default)]
struct State {
    /// Open for appending, from the first blob added on (one write per blob, not an open).
    file: Option<File>,
    /// What the file adds up to.
    total: u64,
    /// Its lines.
    lines: usize,
    recent: Recent,
}

/// Where an uploader records the blobs it adds. Cheap to clone: clones share the file.
#[derive(Debug, Clone)]
pub(crate) struct AddedLog {
    path: std::sync::Arc<Path>,
    state: std::sync::Arc<std::sync::Mutex<State>>,
}

impl AddedLog {
    pub(crate) fn new(path: &Path) -> Self {
        AddedLog {
            path: path.into(),
            state: Default::default(),
        }
    }

    pub(crate) fn bytes(&self) -> Option<u64> {
        added_bytes(&self.path)
    }

    /// Records that this attempt added the blob `digests` to the store. Nothing is fsync'd:
    /// what a crash loses only makes the delta smaller, never a blob lost.
    pub(crate) fn record(&self, digests: &Digests) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        if state.file.is_none() {
            // What earlier agents of the attempt recorded counts in the total written over it.
            if let Ok(file) = File::open(&self.path) {
                (state.total, state.lines) = sum(file, &mut state.recent);
            }
            state.file = self.append();
        }
        if !state.recent.first(digests.sha256) {
            return;
        }
        state.total = state.total.saturating_add(digests.size);
        state.lines += 1;
        if state.lines > COMPACT_LINES {
            let line = format!("{TOTAL} {}\n", state.total);
            if crate::statedir::write_replace(&self.path, line.as_bytes()).is_ok() {
                state.lines = 1;
                state.file = self.append();
                return;
            }
        }
        let line = format!("{} {}\n", digests.sha256_hex(), digests.size);
        // One short line per write (O_APPEND): never interleaved.
        if let Some(f) = state.file.as_mut() {
            let _ = f.write_all(line.as_bytes());
        }
    }

    fn append(&self) -> Option<File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u64) -> Digests {
        let mut sha256 = [0u8; 32];
        sha256[..8].copy_from_slice(&n.to_le_bytes());
        Digests {
            sha256,
            blake3: [0; 32],
            size: n,
        }
    }

    /// Many blobs added (a job rewriting small files with new bytes all day): the file stays
    /// a few thousand lines long and adds up to every blob once; a blob recorded twice, across
    /// a rewrite of the file too, counts once; a new agent of the attempt goes on from it.
    #[test]
    fn the_record_stays_small_and_adds_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("added-blobs");
        let log = AddedLog::new(&path);
        let n = 3 * COMPACT_LINES as u64 + 10;
        for i in 1..=n {
            log.record(&blob(i));
            if i % 1000 == 0 {
                log.record(&blob(i - 10));
            }
        }
        let expected: u64 = (1..=n).sum();
        assert_eq!(added_bytes(&path), Some(expected));
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(
            len <= (COMPACT_LINES as u64 + 1) * 80,
            "{len} bytes for {n} blobs"
        );
        // A later agent of the attempt (after a crash) adds to it.
        let later = AddedLog::new(&path);
        later.record(&blob(n));
        later.record(&blob(n + 1));
        assert_eq!(later.bytes(), Some(expected + n + 1));
    }

    /// A record written line by line, whole (by an agent before this one), is summed a line
    /// at a time, each blob once.
    #[test]
    fn a_record_of_lines_is_summed_each_blob_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("added-blobs");
        assert_eq!(added_bytes(&path), None);
        let line = |d: &Digests| format!("{} {}\n", d.sha256_hex(), d.size);
        let text = [blob(5), blob(7), blob(5)]
            .iter()
            .map(line)
            .collect::<String>();
        std::fs::write(&path, text + "total 100\n").unwrap();
        assert_eq!(added_bytes(&path), Some(112));
    }
}
