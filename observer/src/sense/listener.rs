//! Whose listener is it? The socket at `--socket` counts as containerd's only when the kernel
//! ties it to containerd's process: one of the process's file descriptors is the listening
//! socket that sock_diag finds bound at the path. A path where some other process listens
//! (or nothing does) says nothing about containerd.

use std::path::Path;

use crate::sense::fallback::sockdiag::{self, SockDiagError};

/// What the kernel says about the listener at a path and a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// The process holds a listening socket bound at the path.
    Owned,
    /// Something listens at the path, but not this process.
    Foreign,
    /// Nothing listens at the path.
    NoListener,
}

/// Whether `pid` holds a listening socket bound at `path`.
pub fn ownership(path: &Path, pid: u32) -> Result<Ownership, SockDiagError> {
    let listeners = sockdiag::sample_listener(path)?;
    if listeners.is_empty() {
        return Ok(Ownership::NoListener);
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Ok(Ownership::Foreign);
    };
    let held = fds.filter_map(Result::ok).any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| {
            socket_inode(&target.to_string_lossy())
                .is_some_and(|inode| listeners.iter().any(|l| l.inode == inode))
        })
    });
    Ok(if held {
        Ownership::Owned
    } else {
        Ownership::Foreign
    })
}

/// The inode of a `socket:[N]` link target.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[12345]"), Some(12345));
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(socket_inode("socket:[x]"), None);
    }

    #[test]
    fn our_own_listener_is_ours_and_not_another_process() {
        let dir = std::env::temp_dir().join(format!(
            "observer-listener-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let missing = ownership(&path, std::process::id());
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let owned = ownership(&path, std::process::id());
        let foreign = ownership(&path, 1);
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
        // sock_diag may be unavailable in a sandbox; then there is nothing to check.
        if let (Ok(missing), Ok(owned), Ok(foreign)) = (missing, owned, foreign) {
            assert_eq!(missing, Ownership::NoListener);
            assert_eq!(owned, Ownership::Owned);
            assert_eq!(foreign, Ownership::Foreign);
        }
    }
}
