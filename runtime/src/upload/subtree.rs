//! A large file's BLAKE3, computed as the BLAKE3 subtrees that fall inside each part.
//!
//! BLAKE3 is a tree hash, so the chaining values of the subtrees inside a part are a
//! cryptographic fingerprint of that part alone, and pass 1's whole-file BLAKE3 is merged
//! from them at no extra cost. That gives each part a [`Tag`] as strong as the key: pass 2
//! checks every part it sends against pass 1's tag (a CRC could be forged by a job that
//! rewrites a part it wrote: CRCs are linear), the multipart journal records the tag of the
//! bytes actually sent, and a resumed upload keeps an earlier agent's part only when that tag
//! is the content's. Parts are hashed independently, so nothing chains them in order.
//!
//! How a part is cut: from each offset the largest subtree that BLAKE3's tree allows there
//! (a power of two of chunks, no larger than the offset's alignment) and that fits in the
//! part; the file's end cuts the last one short, which is then a subtree on the tree's right
//! edge. The cut depends only on the part size and the offset, so pass 1 (streaming over the
//! whole file) and pass 2 (one part) cut alike.

use blake3::hazmat::{
    left_subtree_len, merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use blake3::CHUNK_LEN;

/// A part's fingerprint: the chaining value of its one subtree, or the BLAKE3 of its
/// subtrees' chaining values in order.
pub(super) type Tag = [u8; 32];

const CHUNK: u64 = CHUNK_LEN as u64;

/// Cuts a stream of a file's bytes, starting at a part boundary, into subtrees and tags
/// each part.
#[derive(Clone)]
pub(super) struct PartTrees {
    part_size: u64,
    /// Bytes fed so far end here (an offset into the file).
    pos: u64,
    /// The open subtree: where it starts, where it is cut, its hasher.
    start: u64,
    end: u64,
    hasher: blake3::Hasher,
    /// Chaining values of the current part's finished subtrees.
    in_part: Vec<ChainingValue>,
    /// Each finished part's tag.
    tags: Vec<Tag>,
    /// Every finished subtree `(start, len, cv)`, when the file's BLAKE3 is wanted (pass 1).
    trees: Option<Vec<(u64, u64, ChainingValue)>>,
    /// The hasher of the subtree at offset 0 once cut: if the file ends there, that subtree
    /// is the whole tree, and its root hash is not merged from anything.
    first: Option<blake3::Hasher>,
}

impl PartTrees {
    /// Pass 1: the whole file from its first byte; [`PartTrees::finish`] gives its BLAKE3.
    pub fn whole_file(part_size: u64) -> Self {
        let mut t = Self::at(part_size, 0);
        t.trees = Some(Vec::new());
        t
    }

    /// Pass 2: one part, from its offset; [`PartTrees::finish_part`] gives its tag.
    pub fn at(part_size: u64, offset: u64) -> Self {
        debug_assert!(
            part_size > 0 && part_size.is_multiple_of(CHUNK) && offset.is_multiple_of(part_size)
        );
        let mut t = Self {
            part_size,
            pos: offset,
            start: offset,
            end: offset,
            hasher: blake3::Hasher::new(),
            in_part: Vec::new(),
            tags: Vec::new(),
            trees: None,
            first: None,
        };
        t.open(offset);
        t
    }

    /// Bytes fed so far, counted from the file's start.
    pub fn pos(&self) -> u64 {
        self.pos
    }

    /// The tags of the parts finished so far.
    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let take = bytes.len().min((self.end - self.pos) as usize);
            self.hasher.update(&bytes[..take]);
            self.pos += take as u64;
            bytes = &bytes[take..];
            if self.pos == self.end {
                self.cut();
                if self.pos.is_multiple_of(self.part_size) {
                    self.end_part();
                }
                self.open(self.pos);
            }
        }
    }

    /// Pass 2: the tag of the one part fed (the file may have ended inside it).
    pub fn finish_part(mut self) -> Tag {
        if self.pos > self.start {
            self.cut();
        }
        if !self.in_part.is_empty() {
            self.end_part();
        }
        self.tags.first().copied().unwrap_or_default()
    }

    /// Pass 1: the file's BLAKE3 and every part's tag.
    pub fn finish(mut self) -> ([u8; 32], Vec<Tag>) {
        let size = self.pos;
        let whole = if self.start == 0 && self.pos > 0 {
            // Still in the first subtree: it is the whole file.
            Some(self.hasher.clone())
        } else {
            None
        };
        if self.pos > self.start {
            self.cut();
        }
        if !self.in_part.is_empty() {
            self.end_part();
        }
        let trees = self.trees.take().unwrap_or_default();
        let root = match (whole, trees.as_slice()) {
            (_, []) => blake3::hash(b""),
            (Some(h), _) => h.finalize(),
            (None, [(0, len, _)]) if *len == size => self
                .first
                .take()
                .map(|h| h.finalize())
                .unwrap_or(blake3::hash(b"")),
            (None, trees) => {
                merge(trees, 0, size, true).expect("a file's subtrees always tile its tree")
            }
        };
        (*root.as_bytes(), self.tags)
    }

    fn open(&mut self, at: u64) {
        self.start = at;
        self.end = at + planned_len(self.part_size, at);
        self.hasher = blake3::Hasher::new();
        self.hasher.set_input_offset(at);
    }

    fn cut(&mut self) {
        let cv = self.hasher.finalize_non_root();
        if self.start == 0 && self.trees.is_some() {
            self.first = Some(self.hasher.clone());
        }
        if let Some(trees) = self.trees.as_mut() {
            trees.push((self.start, self.pos - self.start, cv));
        }
        self.in_part.push(cv);
    }

    fn end_part(&mut self) {
        let tag = match self.in_part.as_slice() {
            [one] => *one,
            many => {
                let mut h = blake3::Hasher::new();
                for cv in many {
                    h.update(cv);
                }
                *h.finalize().as_bytes()
            }
        };
        self.tags.push(tag);
        self.in_part.clear();
    }
}

/// The length of the subtree that starts at `at`: the largest power of two of chunks that
/// BLAKE3's tree has there (the offset's alignment) and that fits in the part.
fn planned_len(part_size: u64, at: u64) -> u64 {
    let room = ((at / part_size + 1) * part_size - at) / CHUNK;
    let mut chunks = 1u64 << (63 - room.max(1).leading_zeros());
    if at > 0 {
        chunks = chunks.min(1 << (at / CHUNK).trailing_zeros());
    }
    chunks * CHUNK
}

/// The chaining value (or, at the top, the root hash) of the tree node `[start, start+len)`
/// merged from `trees`, which tile the file in order. None if they do not fit the tree.
fn merge(
    trees: &[(u64, u64, ChainingValue)],
    start: u64,
    len: u64,
    root: bool,
) -> Option<blake3::Hash> {
    let cv = |start: u64, len: u64| -> Option<ChainingValue> {
        let i = trees.partition_point(|t| t.0 < start);
        match trees.get(i) {
            Some(&(s, l, cv)) if s == start && l == len => Some(cv),
            _ if len <= CHUNK => None,
            _ => merge(trees, start, len, false).map(|h| *h.as_bytes()),
        }
    };
    if len <= CHUNK {
        return None;
    }
    let left = left_subtree_len(len);
    let (l, r) = (cv(start, left)?, cv(start + left, len - left)?);
    Some(if root {
        merge_subtrees_root(&l, &r, Mode::Hash)
    } else {
        blake3::Hash::from(merge_subtrees_non_root(&l, &r, Mode::Hash))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u64 * 31 + u64::from(seed)) as u8 ^ (i >> 10) as u8)
            .collect()
    }

    /// Every cut of every size agrees with plain BLAKE3, and each part's tag is what one part
    /// hashed alone gives.
    #[test]
    fn subtrees_of_parts_merge_into_the_files_blake3() {
        for part_chunks in [1u64, 2, 3, 4, 5, 7, 8, 9, 12] {
            let part_size = part_chunks * CHUNK;
            let sizes = [
                1,
                CHUNK - 1,
                CHUNK,
                CHUNK + 1,
                part_size,
                part_size + 1,
                2 * part_size,
                3 * part_size - 5,
                17 * CHUNK + 3,
                40 * CHUNK,
                41 * CHUNK - 1,
                64 * CHUNK + 1000,
            ];
            for size in sizes {
                let bytes = data(size as usize, part_chunks as u8);
                let mut whole = PartTrees::whole_file(part_size);
                // Odd feeds: one byte, across subtree and part boundaries.
                let mut at = 0;
                for n in [1usize, 700, 1024, 3000, 5].into_iter().cycle() {
                    let end = (at + n).min(bytes.len());
                    whole.update(&bytes[at..end]);
                    at = end;
                    if at == bytes.len() {
                        break;
                    }
                }
                let (root, tags) = whole.finish();
                assert_eq!(
                    root,
                    *blake3::hash(&bytes).as_bytes(),
                    "part {part_size}, size {size}"
                );
                assert_eq!(tags.len() as u64, size.div_ceil(part_size));
                for (idx, chunk) in bytes.chunks(part_size as usize).enumerate() {
                    let mut one = PartTrees::at(part_size, idx as u64 * part_size);
                    one.update(chunk);
                    assert_eq!(one.finish_part(), tags[idx], "part {idx} of {size}");
                }
            }
        }
    }

    #[test]
    fn a_changed_byte_changes_its_parts_tag_only() {
        let part_size = 8 * CHUNK;
        let mut bytes = data(30 * CHUNK as usize + 17, 3);
        let (_, before) = {
            let mut t = PartTrees::whole_file(part_size);
            t.update(&bytes);
            t.finish()
        };
        bytes[9 * CHUNK as usize + 5] ^= 1;
        let (_, after) = {
            let mut t = PartTrees::whole_file(part_size);
            t.update(&bytes);
            t.finish()
        };
        let differ: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert_eq!(differ, vec![1]);
    }

    /// The cut's shape at real sizes (up to 5 TiB, the part sizes `part_size_for` picks),
    /// without hashing a byte: every subtree is one BLAKE3 allows where it starts, and the
    /// merge finds each one where the tree has it.
    #[test]
    fn cuts_of_real_sizes_tile_the_tree() {
        use blake3::hazmat::max_subtree_len;
        let mib: u64 = 1024 * 1024;
        for part_size in [mib, 8 * mib, 9 * mib, 64 * mib, 525 * mib] {
            for size in [
                part_size + 1,
                3 * part_size,
                10 * part_size - 4097,
                1 << 40,
                (5 << 40) - 12_345,
            ] {
                if size.div_ceil(part_size) > 10_000 {
                    continue;
                }
                let mut trees = Vec::new();
                let mut pos = 0;
                while pos < size {
                    let len = planned_len(part_size, pos).min(size - pos);
                    if pos > 0 {
                        assert!(len <= max_subtree_len(pos).unwrap(), "{pos} {len}");
                    }
                    // Never across a part boundary.
                    assert_eq!(pos / part_size, (pos + len - 1) / part_size);
                    trees.push((pos, len, [0u8; 32]));
                    pos += len;
                }
                assert!(
                    merge(&trees, 0, size, true).is_some(),
                    "part {part_size}, size {size}"
                );
            }
        }
    }

    #[test]
    fn real_part_sizes_cut_few_subtrees() {
        let mib = 1024 * 1024;
        assert_eq!(planned_len(8 * mib, 0), 8 * mib);
        assert_eq!(planned_len(8 * mib, 24 * mib), 8 * mib);
        // 9 MiB parts: 8 + 1 in the first, then by alignment.
        assert_eq!(planned_len(9 * mib, 0), 8 * mib);
        assert_eq!(planned_len(9 * mib, 8 * mib), mib);
        assert_eq!(planned_len(9 * mib, 9 * mib), mib);
        assert_eq!(planned_len(9 * mib, 10 * mib), 2 * mib);
    }
}
