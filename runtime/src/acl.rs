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

/// An access ACL that is there but cannot be used: the answer is then "no".
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read the file's ACL: {0}")]
    Read(std::io::Error),
    #[error("the file's ACL is not a version 2 POSIX ACL")]
    Malformed,
}

/// What the file's ACL says: `Ok(None)` when it has none (the mode bits are the whole
/// answer).
pub fn of(file: &impl AsFd) -> Result<Option<Acl>, AclError> {
    // The kernel keeps at most 64 KiB of one attribute.
    let mut buf = vec![0u8; 1 << 16];
    let name = c"system.posix_acl_access";
    // SAFETY: the fd is open for the call; `name` is NUL-terminated; `buf` is writable for
    // its whole length, which is what the kernel is told.
    let n = unsafe {
        libc::fgetxattr(
            file.as_fd().as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA | libc::EOPNOTSUPP) => Ok(None),
            _ => Err(AclError::Read(e)),
        };
    }
    parse(&buf[..n as usize]).map(Some)
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
    /// The kernel's check (`posix_acl_permission`) for `uid` in `gids`, on a file owned by
    /// `st`'s uid and gid: owner, then a named user, then the group class (any matching
    /// group entry that grants; one that matches and none grants is a refusal), then other.
    pub fn allows(&self, uid: u32, gids: &[u32], st: &FileStat, want: u16) -> bool {
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
mod tests {
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
            let acl = bytes(&[
                (USER_OBJ, 6, ANY),
                (USER, perm, 65534),
                (GROUP_OBJ, 4, ANY),
                (MASK, 4, ANY),
                (OTHER, other, ANY),
            ]);
            // SAFETY: the fd is open; the name is NUL-terminated; `acl` is readable for its
            // length.
            unsafe {
                libc::fsetxattr(
                    file.as_raw_fd(),
                    c"system.posix_acl_access".as_ptr(),
                    acl.as_ptr().cast(),
                    acl.len(),
                    0,
                )
            }
        };
        if set(0, 4) != 0 {
            eprintln!(
                "no POSIX ACLs here ({}): the ACL case is not checked",
                std::io::Error::last_os_error()
            );
            return;
        }
        let st = crate::confine::fstat(&file).unwrap();
        assert_eq!(st.st_mode & 0o777, 0o644);
        assert!(job.can_read(&st), "the mode bits alone say yes");
        assert!(!job.may_read(&file, &st), "the named entry says no");
        assert_eq!(set(4, 0), 0);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let st = crate::confine::fstat(&file).unwrap();
        assert!(!job.can_read(&st));
        assert!(job.may_read(&file, &st), "the named entry grants it");
    }

    #[test]
    fn what_is_not_an_acl_is_refused() {
        assert!(parse(&[2, 0, 0]).is_err());
        assert!(parse(&[3, 0, 0, 0]).is_err());
        assert!(parse(&bytes(&[(USER_OBJ, 6, ANY)])[..9]).is_err());
    }
}
