//! POSIX access ACLs (`system.posix_acl_access`), read from an open file, for the question the
//! mode bits alone answer wrongly: may the job's user read this? A named entry decides for
//! its user before "other" does (`user:bob:---` on a 0644 file denies bob), and may grant
//! what the mode bits seem to refuse (`user:bob:r--` on a 0600 file).

use std::os::fd::{AsFd, AsRawFd};

use nix::sys::stat::FileStat;

/// The entries of an access ACL: `(tag, perm, id)`.
pub struct Acl(Vec<(u16, u16, u32)>);

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// An access ACL that is there but cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// Reading it failed (an I/O error, a network file system's hiccup): not an answer.
    #[error("cannot read the file's ACL: {0}")]
    Read(std::io::Error),
    /// Not an ACL this code understands: taken as a refusal.
    #[error("the file's ACL is not a version 2 POSIX ACL")]
    Malformed,
}

const NAME: &std::ffi::CStr = c"system.posix_acl_access";

/// What a file system says of a file's access ACL.
pub enum Look {
    /// It has none: the mode bits are the whole answer.
    NoAcl,
    Acl(Acl),
    /// Its file system has no POSIX ACLs (NFSv4, CIFS, GPFS, ramfs): one of its own (an
    /// NFSv4 ACL on the server) may decide what the mode bits seem to allow.
    Unsupported,
}

impl Look {
    /// The ACL, if there is one: the mode bits are the whole answer otherwise.
    pub fn into_acl(self) -> Option<Acl> {
        match self {
            Look::Acl(acl) => Some(acl),
            Look::NoAcl | Look::Unsupported => None,
        }
    }
}

/// What the open file's ACL says: `Ok(None)` when it has none, or its file system has no
/// POSIX ACLs ([`look`] tells the two apart).
pub fn of(file: &impl AsFd) -> Result<Option<Acl>, AclError> {
    look(file).map(Look::into_acl)
}

/// [`of`], saying whether the file system has POSIX ACLs at all.
pub fn look(file: &impl AsFd) -> Result<Look, AclError> {
    let fd = file.as_fd().as_raw_fd();
    read(|buf| {
        // SAFETY: the fd is open for the call; `NAME` is NUL-terminated; `buf` is writable
        // for its whole length, which is what the kernel is told.
        unsafe { libc::fgetxattr(fd, NAME.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    })
}

/// [`of`] for an `O_PATH` handle (which `fgetxattr` refuses), through its `/proc/self/fd`
/// link: the link leads to the handle's own file and nowhere else, so a name swapped or
/// mounted over since the handle was taken (and judged) is not what is asked.
pub fn of_handle(handle: &impl AsFd) -> Result<Option<Acl>, AclError> {
    let path = std::ffi::CString::new(format!("/proc/self/fd/{}", handle.as_fd().as_raw_fd()))
        .map_err(|_| AclError::Malformed)?;
    read(|buf| {
        // SAFETY: `path` and `NAME` are NUL-terminated; `buf` is writable for its whole
        // length, which is what the kernel is told.
        unsafe {
            libc::getxattr(
                path.as_ptr(),
                NAME.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        }
    })
    .map(Look::into_acl)
}

/// Reads the attribute with `get`, into a small buffer first (most ACLs are a few entries),
/// then the most the kernel keeps of one attribute (64 KiB).
fn read(get: impl Fn(&mut [u8]) -> isize) -> Result<Look, AclError> {
    let mut buf = vec![0u8; 256];
    let mut n = get(&mut buf);
    if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE) {
        buf = vec![0u8; 1 << 16];
        n = get(&mut buf);
    }
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(Look::NoAcl),
            Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(Look::Unsupported),
            _ => Err(AclError::Read(e)),
        };
    }
    parse(&buf[..n as usize]).map(Look::Acl)
}

fn parse(bytes: &[u8]) -> Result<Acl, AclError> {
    let (head, body) = bytes.split_at_checked(4).ok_or(AclError::Malformed)?;
    let version = u32::from_le_bytes(head.try_into().map_err(|_| AclError::Malformed)?);
    if version != VERSION || body.len() % 8 != 0 {
        return Err(AclError::Malformed);
    }
    Ok(Acl(body
        .chunks_exact(8)
        .map(|e| {
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect()))
}

impl Acl {
    /// Whether a named entry lets someone other than root (or `owner`) write: a `root:root
    /// 0775` directory with `user:alice:rwx` shows its mask as the group bits, and alice may
    /// write it.
    pub fn lets_others_write(&self, owner: u32) -> bool {
        const WRITE: u16 = 0o2;
        let mask = self.0.iter().find(|e| e.0 == MASK).map_or(0o7, |e| e.1);
        self.0.iter().any(|&(tag, perm, id)| {
            let named = (tag == USER && id != 0 && id != owner) || (tag == GROUP && id != 0);
            named && perm & mask & WRITE != 0
        })
    }

    /// Whether a named entry for a user not in `trusted_uids` or a group not in
    /// `trusted_gids` grants `want` (under the mask): who besides those the ACL lets in.
    pub fn named_others_may(&self, want: u16, trusted_uids: &[u32], trusted_gids: &[u32]) -> bool {
        let mask = self.0.iter().find(|e| e.0 == MASK).map_or(0o7, |e| e.1);
        self.0.iter().any(|&(tag, perm, id)| {
            let other = (tag == USER && !trusted_uids.contains(&id))
                || (tag == GROUP && !trusted_gids.contains(&id));
            other && perm & mask & want == want
        })
    }

    /// Whether the owning group's entry grants `want` (under the mask): with an ACL, the
    /// group bits of the mode are the mask, not the owning group's own permission.
    pub fn owning_group_may(&self, want: u16) -> bool {
        let mask = self.0.iter().find(|e| e.0 == MASK).map_or(0o7, |e| e.1);
        self.0
            .iter()
            .any(|&(tag, perm, _)| tag == GROUP_OBJ && perm & mask & want == want)
    }

    /// The kernel's check (`posix_acl_permission`) for `uid` in `gids`, on a file owned by
    /// `st`'s uid and gid: owner, then a named user, then the group class (any matching
    /// group entry that grants; one that matches and none grants is a refusal), then other.
    pub fn allows(&self, uid: u32, gids: &[u32], st: &FileStat, want: u16) -> bool {
        // The kernel consults an ACL only while the group class (the mask) grants something
        // (`acl_permission_check`); with none, the mode bits decide.
        if st.st_mode & 0o070 == 0 {
            let bits = if st.st_uid == uid {
                st.st_mode >> 6
            } else if gids.contains(&st.st_gid) {
                st.st_mode >> 3
            } else {
                st.st_mode
            };
            return bits as u16 & 0o7 & want == want;
        }
        let perm = |tag: u16| self.0.iter().find(|e| e.0 == tag).map_or(0, |e| e.1);
        let mask = self.0.iter().find(|e| e.0 == MASK).map_or(0o7, |e| e.1);
        if st.st_uid == uid {
            return perm(USER_OBJ) & want == want;
        }
        if let Some(e) = self.0.iter().find(|e| e.0 == USER && e.2 == uid) {
            return e.1 & mask & want == want;
        }
        let mut in_group_class = false;
        for &(tag, p, id) in &self.0 {
            let member = match tag {
                GROUP_OBJ => gids.contains(&st.st_gid),
                GROUP => gids.contains(&id),
                _ => false,
            };
            if member {
                if p & mask & want == want {
                    return true;
                }
                in_group_class = true;
            }
        }
        !in_group_class && perm(OTHER) & want == want
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn bytes(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for (tag, perm, id) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&perm.to_le_bytes());
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    fn stat(uid: u32, gid: u32) -> FileStat {
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: FileStat = unsafe { std::mem::zeroed() };
        st.st_uid = uid;
        st.st_gid = gid;
        st.st_mode = libc::S_IFREG | 0o644;
        st
    }

    const ANY: u32 = u32::MAX;

    #[test]
    fn named_entries_decide_before_other_and_the_mask_narrows() {
        // rw- owner 1, user 7 ---, user 8 r--, group 5 r--, named group 9 ---, mask r--, other r--
        let acl = parse(&bytes(&[
            (USER_OBJ, 6, ANY),
            (USER, 0, 7),
            (USER, 4, 8),
            (GROUP_OBJ, 4, ANY),
            (GROUP, 0, 9),
            (MASK, 4, ANY),
            (OTHER, 4, ANY),
        ]))
        .unwrap();
        let st = stat(1, 5);
        assert!(acl.allows(1, &[], &st, 4), "the owner");
        assert!(
            !acl.allows(7, &[], &st, 4),
            "a named user denied, whatever other says"
        );
        assert!(acl.allows(8, &[], &st, 4), "a named user granted");
        assert!(acl.allows(3, &[5], &st, 4), "the owning group");
        assert!(
            !acl.allows(3, &[9], &st, 4),
            "a matching group that grants nothing"
        );
        assert!(
            acl.allows(3, &[9, 5], &st, 4),
            "any matching group that grants"
        );
        assert!(acl.allows(3, &[], &st, 4), "other");
        let masked = parse(&bytes(&[
            (USER_OBJ, 6, ANY),
            (USER, 4, 8),
            (GROUP_OBJ, 0, ANY),
            (MASK, 0, ANY),
            (OTHER, 0, ANY),
        ]))
        .unwrap();
        assert!(
            !masked.allows(8, &[], &st, 4),
            "the mask takes a named user's read"
        );
    }

    /// On a real file: a 0644 file whose ACL names the job's user with no rights is not the
    /// job's to read, though "other" may; a 0600 one whose ACL grants it is.
    #[test]
    fn the_job_reader_follows_a_files_acl() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "x").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let job = crate::confine::JobReader {
            uid: 65534,
            gids: vec![65534],
        };
        let set = |perm: u16, other: u16| {
            set_acl(
                &file,
                &[
                    (USER_OBJ, 6, ANY),
                    (USER, perm, 65534),
                    (GROUP_OBJ, 4, ANY),
                    (MASK, 4, ANY),
                    (OTHER, other, ANY),
                ],
            )
        };
        if !set(0, 4) {
            crate::testskip::skip("no POSIX ACLs here: the ACL case is not checked");
            return;
        }
        let st = crate::confine::fstat(&file).unwrap();
        assert_eq!(st.st_mode & 0o777, 0o644);
        assert!(job.can_read(&st), "the mode bits alone say yes");
        assert!(
            !job.may_read(&file, &st).unwrap(),
            "the named entry says no"
        );
        assert!(set(4, 0));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let st = crate::confine::fstat(&file).unwrap();
        assert!(!job.can_read(&st));
        assert!(
            job.may_read(&file, &st).unwrap(),
            "the named entry grants it"
        );
    }

    /// With no rights in the group class (the mask), the kernel does not look at the ACL:
    /// `setfacl -m u:bob:r f; chmod 604 f` lets bob read through "other".
    #[test]
    fn with_an_empty_group_class_the_mode_bits_decide() {
        let acl = parse(&bytes(&[
            (USER_OBJ, 6, ANY),
            (USER, 4, 8),
            (GROUP_OBJ, 0, ANY),
            (MASK, 0, ANY),
            (OTHER, 4, ANY),
        ]))
        .unwrap();
        let mut st = stat(1, 5);
        st.st_mode = libc::S_IFREG | 0o604;
        assert!(acl.allows(8, &[], &st, 4));
        assert!(
            !acl.allows(8, &[5], &st, 4),
            "the owning group gets its own bits"
        );
    }

    /// A named user or group that may write (through the mask) is someone else writing;
    /// root's entries and the owner's are not, nor is one the mask cuts to reading.
    #[test]
    fn named_writers_through_the_mask_are_others() {
        let with = |extra: &[(u16, u16, u32)], mask: u16| {
            let mut e = vec![
                (USER_OBJ, 7, 0),
                (GROUP_OBJ, 5, 0),
                (OTHER, 5, 0),
                (MASK, mask, 0),
            ];
            e.extend_from_slice(extra);
            Acl(e)
        };
        assert!(with(&[(USER, 7, 1000)], 7).lets_others_write(0));
        assert!(
            !with(&[(USER, 7, 1000)], 5).lets_others_write(0),
            "the mask cuts it"
        );
        assert!(
            !with(&[(USER, 7, 1000)], 7).lets_others_write(1000),
            "the owner"
        );
        assert!(!with(&[(USER, 7, 0), (GROUP, 7, 0)], 7).lets_others_write(0));
        assert!(with(&[(GROUP, 6, 1000)], 7).lets_others_write(0));
        assert!(!with(&[(GROUP, 5, 1000)], 7).lets_others_write(0));
        // The agent's own entry (a root-owned dir or secret granted to a non-root agent with
        // `setfacl -m u:c3:rwx`) lets in no one else.
        assert!(!with(&[(USER, 7, 1000)], 7).named_others_may(0o4, &[0, 1000], &[0]));
        assert!(
            with(&[(USER, 7, 1000), (USER, 4, 1001)], 7).named_others_may(0o4, &[0, 1000], &[0])
        );
        assert!(!with(&[(USER, 4, 1001)], 0).named_others_may(0o4, &[0], &[0]));
        assert!(with(&[(GROUP, 4, 50)], 7).named_others_may(0o4, &[0], &[0]));
    }

    /// A `setfacl -m g:<gid>:rwx` on the open directory `fd` of mode 0755; false where ACLs
    /// are not supported.
    pub(crate) fn grant_group_rwx(fd: &impl AsFd, gid: u32) -> bool {
        set_acl(
            fd,
            &[
                (USER_OBJ, 7, u32::MAX),
                (GROUP_OBJ, 5, u32::MAX),
                (GROUP, 7, gid),
                (MASK, 7, u32::MAX),
                (OTHER, 5, u32::MAX),
            ],
        )
    }

    /// Sets `entries` as the access ACL of the open `fd`; false where ACLs are not supported.
    fn set_acl(fd: &impl AsFd, entries: &[(u16, u16, u32)]) -> bool {
        let acl = bytes(entries);
        // SAFETY: the fd is open; the name is NUL-terminated; `acl` is readable for its length.
        let rc = unsafe {
            libc::fsetxattr(
                fd.as_fd().as_raw_fd(),
                NAME.as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        };
        rc == 0
    }

    /// A scan follows ACLs both ways: a directory whose ACL shuts the job's user out is not
    /// walked (its 0644 files are not the job's), a 0640 file whose ACL grants it is collected.
    #[test]
    fn a_scan_follows_directory_and_file_acls() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let w = dir.path();
        std::fs::create_dir_all(w.join("artifacts/shut")).unwrap();
        std::fs::write(w.join("artifacts/shut/f"), "x").unwrap();
        std::fs::write(w.join("artifacts/granted"), "x").unwrap();
        std::fs::set_permissions(
            w.join("artifacts/granted"),
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let job = crate::confine::JobReader {
            uid: 65534,
            gids: vec![65534],
        };
        let shut = std::fs::File::open(w.join("artifacts/shut")).unwrap();
        let granted = std::fs::File::open(w.join("artifacts/granted")).unwrap();
        let deny_dir = [
            (USER_OBJ, 7, ANY),
            (USER, 0, 65534),
            (GROUP_OBJ, 5, ANY),
            (MASK, 5, ANY),
            (OTHER, 5, ANY),
        ];
        let grant_file = [
            (USER_OBJ, 6, ANY),
            (USER, 4, 65534),
            (GROUP_OBJ, 4, ANY),
            (MASK, 4, ANY),
            (OTHER, 0, ANY),
        ];
        if !set_acl(&shut, &deny_dir) || !set_acl(&granted, &grant_file) {
            crate::testskip::skip("no POSIX ACLs here: the ACL case is not checked");
            return;
        }
        let s = crate::collect::scan(w, &["artifacts".into()], Some(&job), u64::MAX);
        let names: Vec<&String> = s.files.keys().collect();
        assert_eq!(names, ["artifacts/granted"], "{:?}", s.warnings);
        assert!(s
            .warnings
            .iter()
            .any(|w| w.contains("artifacts/shut/ is not readable")));
    }

    #[test]
    fn what_is_not_an_acl_is_refused() {
        assert!(parse(&[2, 0, 0]).is_err());
        assert!(parse(&[3, 0, 0, 0]).is_err());
        assert!(parse(&bytes(&[(USER_OBJ, 6, ANY)])[..9]).is_err());
    }
}
