//! Network namespaces as a user names them (`--netns`): an inode number, a namespace file
//! (`/proc/PID/ns/net`, `/run/netns/NAME`) or a name from `ip netns`, turned into the inode
//! number events carry — checked to be a network namespace with nsfs's own ioctl.

/// `NS_GET_NSTYPE`: what kind of namespace a namespace file is (Linux 4.11+).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// The magic number of nsfs, the filesystem of namespace files.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Parses a `--netns` value: an inode number, a namespace file (`/proc/PID/ns/net`, a
/// bind mount such as `/run/netns/NAME`), or a bare NAME for `/run/netns/NAME` (as
/// `ip netns` names them).
pub fn parse_netns(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return match s.parse::<u32>() {
            Ok(n) if n != 0 => Ok(n),
            _ => Err(format!("'{s}' is not a network namespace inode number")),
        };
    }
    if s.is_empty() {
        return Err(
            "an empty network namespace: give /run/netns/NAME, /proc/PID/ns/net, a NAME or an \
             inode number"
                .into(),
        );
    }
    let path = if s.contains('/') {
        s.to_string()
    } else {
        format!("/run/netns/{s}")
    };
    netns_inode(std::path::Path::new(&path))
}

/// The inode number of the network namespace that the namespace file `path` refers to.
pub fn netns_inode(path: &std::path::Path) -> Result<u32, String> {
    use std::os::{fd::AsRawFd as _, unix::fs::MetadataExt as _};
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
    let fd = file.as_raw_fd();
    // SAFETY: a valid descriptor and a statfs buffer that outlives the call.
    let fs_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fd, &mut st) != 0 {
            return Err(format!(
                "cannot stat {shown}: {}",
                std::io::Error::last_os_error()
            ));
        }
        st.f_type as i64
    };
    if fs_type != NSFS_MAGIC {
        return Err(format!(
            "{shown} is not a namespace file (expected /run/netns/NAME or /proc/PID/ns/net)"
        ));
    }
    // SAFETY: an ioctl without argument on a valid descriptor.
    let kind = unsafe { libc::ioctl(fd, NS_GET_NSTYPE as _) };
    if kind >= 0 && kind != libc::CLONE_NEWNET {
        return Err(format!("{shown} is not a network namespace"));
    }
    let ino = file
        .metadata()
        .map_err(|e| format!("cannot stat {shown}: {e}"))?
        .ino();
    u32::try_from(ino).map_err(|_| format!("{shown}: inode {ino} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_values() {
        assert_eq!(parse_netns("4026531840"), Ok(4026531840));
        assert!(parse_netns("0").unwrap_err().contains("'0'"));
        assert!(parse_netns("99999999999").unwrap_err().contains("inode"));
        assert!(parse_netns("").unwrap_err().contains("empty"));
        let err = parse_netns("/nonexistent/ns").unwrap_err();
        assert!(err.contains("cannot open /nonexistent/ns"), "{err}");
        let err = parse_netns("no-such-namespace-here").unwrap_err();
        assert!(err.contains("/run/netns/no-such-namespace-here"), "{err}");
        let err = parse_netns("/proc/self/status").unwrap_err();
        assert!(err.contains("not a namespace file"), "{err}");
        // This process's own namespace, readable without root.
        let own = parse_netns("/proc/self/ns/net").unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(
            u64::from(own),
            std::fs::metadata("/proc/self/ns/net").unwrap().ino()
        );
        let err = parse_netns("/proc/self/ns/uts").unwrap_err();
        assert!(err.contains("not a network namespace"), "{err}");
    }
}
