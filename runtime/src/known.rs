//! Blobs this node knows to be in a store: the ones it uploaded and the ones the manifests it
//! read list. A small file whose blob is known is checked with one HEAD and never sent again
//! (a create-if-absent PUT would send the whole body before the store says it exists).
//!
//! Only an ordering hint, never trusted alone: a known blob is still checked with a HEAD (a
//! lifecycle rule or `gc` may have removed it since), and sent when it is gone.

use std::collections::HashSet;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Keys kept at most (about 50 bytes each in memory: the digest's 32 bytes, not its hex);
/// a file that reached it is cut to the newest half when it is loaded: left full, it took
/// no key again, frozen on its oldest for good (one dataset of 200,000 files did it).
const MAX_KEYS: usize = 200_000;

#[derive(Debug)]
pub struct KnownBlobs {
    /// Loaded at the first question, not at start: most commands never ask one.
    keys: std::sync::OnceLock<Mutex<HashSet<[u8; 32]>>>,
    /// `<state_dir>/known-blobs/<store id>`, appended to as keys become known; opened at the
    /// first key (the state dir may not exist when the agent starts), never if `None`.
    path: Option<PathBuf>,
    file: Mutex<Option<std::fs::File>>,
}

impl KnownBlobs {
    /// Nothing known, nothing kept (tests, stores where a PUT costs nothing to repeat).
    pub fn none() -> KnownBlobs {
        KnownBlobs {
            keys: std::sync::OnceLock::new(),
            path: None,
            file: Mutex::new(None),
        }
    }

    /// The record of `store_url` in `state_root` (read when first needed).
    pub fn open(state_root: &Path, store_url: &str) -> KnownBlobs {
        let dir = state_root.join("known-blobs");
        KnownBlobs {
            keys: std::sync::OnceLock::new(),
            path: Some(dir.join(&crate::digest::sha256_hex(store_url.as_bytes())[..16])),
            file: Mutex::new(None),
        }
    }

    /// The keys, read from the record the first time (blocking, once: a few MB at most).
    fn keys(&self) -> &Mutex<HashSet<[u8; 32]>> {
        self.keys.get_or_init(|| {
            let Some(path) = &self.path else {
                return Mutex::new(HashSet::new());
            };
            let mut keys = load(path);
            if keys.len() >= MAX_KEYS {
                let keep: Vec<String> = keys.split_off(keys.len() - MAX_KEYS / 2);
                let _ = crate::statedir::write_atomic(path, (keep.join("\n") + "\n").as_bytes());
                keys = keep;
            }
            // A line in capitals was never asked about (keys are asked in lower case).
            Mutex::new(keys.iter().filter_map(|k| from_hex(k)).collect())
        })
    }

    /// Whether the blob `sha256` is known to be stored.
    pub fn contains(&self, sha256: &[u8; 32]) -> bool {
        self.keys().lock().is_ok_and(|k| k.contains(sha256))
    }

    /// The blob `sha256` is in the store (uploaded, or found there).
    pub fn insert(&self, sha256: &[u8; 32]) {
        self.extend(std::iter::once(*sha256));
    }

    /// Each of `keys` is in the store: the new ones are kept, in one write.
    pub fn extend(&self, keys: impl IntoIterator<Item = [u8; 32]>) {
        let new: String = {
            let Ok(mut known) = self.keys().lock() else {
                return;
            };
            keys.into_iter()
                .filter(|k| known.len() < MAX_KEYS && known.insert(*k))
                .map(|k| format!("{}\n", hex::encode(k)))
                .collect()
        };
        let (false, Some(path)) = (new.is_empty(), &self.path) else {
            return;
        };
        let Ok(mut file) = self.file.lock() else {
            return;
        };
        // Another agent's trim at load replaces the record (`write_atomic`): appended to the
        // old one, every key this agent learns from then on was lost with it.
        let replaced = file.as_ref().is_some_and(|f| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().is_ok_and(|m| m.nlink() == 0)
        });
        if file.is_none() || replaced {
            *file = open_append(path);
        }
        if let Some(f) = file.as_mut() {
            // Whole lines in one write (O_APPEND): concurrent agents never interleave a key.
            let _ = f.write_all(new.as_bytes());
        }
    }
}

/// Never the one to create the state dir (its mode is `prepare`'s business): only the
/// `known-blobs` dir inside an existing one.
fn open_append(path: &Path) -> Option<std::fs::File> {
    let dir = path.parent()?;
    let state = dir.parent()?;
    if !state.is_dir() {
        return None;
    }
    // The record lists every blob this node stored or read, of every tenant: the agent's
    // alone whatever the umask (with `private_files = false` it was 0644 in a 0755 dir, in
    // the 0711 state dir anyone may pass through), and one an older agent made so is closed.
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .ok()?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ok()?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .ok()?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .ok()?;
    Some(file)
}

/// The digest a SHA-256 in lower-case hex (a key line, a manifest's `sha256`) stands for.
pub fn from_hex(line: &str) -> Option<[u8; 32]> {
    let lower = line
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let mut out = [0; 32];
    (lower && hex::decode_to_slice(line, &mut out).is_ok()).then_some(out)
}

fn load(path: &PathBuf) -> Vec<String> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|l| l.len() == 64 && l.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_blobs_survive_a_restart_per_store() {
        let dir = tempfile::tempdir().unwrap();
        let a = [0xaa; 32];
        let k = KnownBlobs::open(dir.path(), "s3://one/x");
        assert!(!k.contains(&a));
        k.insert(&a);
        k.insert(&a);
        assert!(k.contains(&a));
        drop(k);
        assert!(KnownBlobs::open(dir.path(), "s3://one/x").contains(&a));
        assert!(
            !KnownBlobs::open(dir.path(), "s3://two/x").contains(&a),
            "per store"
        );
        let file = std::fs::read_dir(dir.path().join("known-blobs"))
            .unwrap()
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .find(|t| !t.is_empty())
            .unwrap();
        assert_eq!(file, format!("{}\n", "a".repeat(64)), "one line, once");
    }

    /// A record that reached its size (one dataset of 200,000 files) is cut to its newest
    /// half when loaded: left as it was, the next agent loaded a full set and kept no key
    /// for good.
    #[test]
    fn a_full_record_takes_new_keys_again() {
        let dir = tempfile::tempdir().unwrap();
        let key = |i: usize| {
            let mut k = [0u8; 32];
            k[..8].copy_from_slice(&(i as u64).to_be_bytes());
            k
        };
        let full = KnownBlobs::open(dir.path(), "s3://b/x");
        full.extend((0..MAX_KEYS).map(key));
        assert!(full.contains(&key(MAX_KEYS - 1)));
        drop(full);
        let next = KnownBlobs::open(dir.path(), "s3://b/x");
        let new = [0xee; 32];
        next.insert(&new);
        assert!(next.contains(&new));
        assert!(next.contains(&key(MAX_KEYS - 1)), "the newest stay");
        assert!(!next.contains(&key(0)), "the oldest go");
        drop(next);
        assert!(KnownBlobs::open(dir.path(), "s3://b/x").contains(&new));
    }

    /// Another agent's trim replaces the record while this one appends to it: the keys
    /// learnt after went to the unlinked file, lost.
    #[test]
    fn keys_learnt_after_another_agents_trim_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let one = KnownBlobs::open(dir.path(), "s3://b/x");
        one.insert(&[1; 32]);
        let path = one.path.clone().unwrap();
        crate::statedir::write_atomic(&path, format!("{}\n", "1".repeat(64)).as_bytes()).unwrap();
        one.insert(&[2; 32]);
        assert!(KnownBlobs::open(dir.path(), "s3://b/x").contains(&[2; 32]));
    }

    /// The record is the agent's alone under any umask, and one made open is closed.
    #[test]
    fn the_record_is_private_whatever_the_umask() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let was = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        let dir = tempfile::tempdir().unwrap();
        KnownBlobs::open(dir.path(), "s3://b/x").insert(&[1; 32]);
        let known = dir.path().join("known-blobs");
        let record = std::fs::read_dir(&known)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        assert_eq!((mode(&known), mode(&record)), (0o700, 0o600));
        // As an older agent left them.
        std::fs::set_permissions(&known, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o644)).unwrap();
        KnownBlobs::open(dir.path(), "s3://b/x").insert(&[2; 32]);
        assert_eq!((mode(&known), mode(&record)), (0o700, 0o600));
        nix::sys::stat::umask(was);
    }
}
