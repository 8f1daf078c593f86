//! `FIEMAP`: how many bytes of a file share their extents with other files (a reflinked copy,
//! `cp --reflink`, a dedup tool's work, a snapshot). The uploader charges them to the
//! attempt's shared budget before it reads a file (`upload::SHARED_BUDGET`): such a copy
//! costs the job no data blocks, and the agent a whole read of it.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `fe_flags`: the last extent of the file.
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// `fe_flags`: the extent's blocks are shared with another file.
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
/// Extents asked for per call.
const BATCH: usize = 256;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Extent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

/// `struct fiemap` with room for [`BATCH`] extents after its header.
#[repr(C)]
struct Map {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [Extent; BATCH],
}

/// The bytes of the open `file`'s first `size` that lie in extents shared with other files;
/// 0 where the file system cannot say (no `FIEMAP`: NFS, FUSE, tmpfs). Without
/// `FIEMAP_FLAG_SYNC`: blocks not yet written out are nobody's but the file's. A walk as
/// long as the file's extents are many, each a call per 256 of them: less than the read of
/// the file it is asked for.
pub fn shared_bytes(file: &File, size: u64) -> u64 {
    let mut map = Box::new(Map {
        start: 0,
        length: 0,
        flags: 0,
        mapped_extents: 0,
        extent_count: BATCH as u32,
        reserved: 0,
        extents: [Extent::default(); BATCH],
    });
    let (mut shared, mut at) = (0u64, 0u64);
    while at < size {
        map.start = at;
        map.length = size - at;
        map.flags = 0;
        map.mapped_extents = 0;
        map.extent_count = BATCH as u32;
        // SAFETY: FS_IOC_FIEMAP reads the header and writes at most `extent_count` extents
        // into the buffer, which holds that many; the fd is borrowed for the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP as _, &mut *map as *mut Map) };
        if r < 0 || map.mapped_extents == 0 {
            break;
        }
        let mapped = &map.extents[..(map.mapped_extents as usize).min(BATCH)];
        for e in mapped {
            if e.flags & FIEMAP_EXTENT_SHARED != 0 {
                // Within [at, size): an extent may begin before the range asked for.
                let from = e.logical.max(at);
                let to = e.logical.saturating_add(e.length).min(size);
                shared += to.saturating_sub(from);
            }
        }
        let last = mapped[mapped.len() - 1];
        let next = last.logical.saturating_add(last.length);
        if last.flags & FIEMAP_EXTENT_LAST != 0 || next <= at {
            break;
        }
        at = next;
    }
    shared.min(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file no other shares nothing with (on any file system the tests run on); one that
    /// cannot be mapped (a pipe) says 0.
    #[test]
    fn a_file_of_its_own_shares_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(shared_bytes(&file, 3 << 20), 0);
        assert_eq!(std::mem::size_of::<Extent>(), 56);
        assert_eq!(std::mem::size_of::<Map>(), 32 + 56 * BATCH);
    }
}
