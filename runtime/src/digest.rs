//! SHA-256 (the blob key) and BLAKE3 (for fast verification by readers) in one pass.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digests {
    pub sha256: [u8; 32],
    pub blake3: [u8; 32],
    pub size: u64,
}

impl Digests {
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
    pub fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }
}

/// How much of a buffer each digest takes at a time: small enough that SHA-256, BLAKE3 (and
/// a multipart upload's part subtrees) all find the piece in this core's L2, so a byte comes from
/// memory, or the L3 the job shares, once and not once per digest. Live sync shares that
/// memory path with the job.
pub const PIECE: usize = 128 * 1024;

/// Both digests, fed incrementally.
#[derive(Clone, Default)]
pub struct DualHasher {
    sha256: Sha256,
    blake3: blake3::Hasher,
    size: u64,
}

impl DualHasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(PIECE) {
            self.sha256.update(piece);
            self.blake3.update(piece);
        }
        self.size += bytes.len() as u64;
    }

    /// Bytes fed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn finish(self) -> Digests {
        Digests {
            sha256: self.sha256.finalize().into(),
            blake3: *self.blake3.finalize().as_bytes(),
            size: self.size,
        }
    }
}

pub fn digest_bytes(bytes: &[u8]) -> Digests {
    let mut h = DualHasher::new();
    h.update(bytes);
    h.finish()
}

/// SHA-256 alone, as lowercase hex (manifests, log blobs, verification).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Streaming SHA-256 for verification on download, and a large file's key.
#[derive(Default, Clone)]
pub struct Sha256Hasher(Sha256);

impl Sha256Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
    pub fn finish_hex(self) -> String {
        hex::encode(self.0.finalize())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vectors() {
        let d = digest_bytes(b"abc");
        assert_eq!(
            d.sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            d.blake3_hex(),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(sha256_hex(b""), crate::store::EMPTY_SHA256);
        let mut h = DualHasher::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
    }
}
