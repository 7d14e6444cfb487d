//! What `/proc` says about processes: their network namespace, the socket
//! inodes in their fd table, name, command line, executable, uid, cgroup
//! and the service-naming environment variables.
//!
//! Processes exit between any two reads; every "it is gone" error (ENOENT,
//! ESRCH) comes back as [`io::ErrorKind::NotFound`] so the resolver can
//! tell it from a real failure.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;

use flowtable::attrib::{Netns, ProcessInfo, SERVICE_ENV};

/// ESRCH (a process that died while we read its files) reads as NotFound.
pub fn gone_is_not_found(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ESRCH) {
        io::Error::new(io::ErrorKind::NotFound, e)
    } else {
        e
    }
}

fn read(path: &str) -> io::Result<Vec<u8>> {
    fs::read(path).map_err(gone_is_not_found)
}

/// Every pid in `/proc`.
pub fn pids() -> io::Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
            v.push(pid);
        }
    }
    Ok(v)
}

/// The network namespace (inode of `/proc/<pid>/ns/net`) of `pid`.
pub fn netns_of(pid: u32) -> io::Result<u64> {
    fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .map_err(gone_is_not_found)
}

/// Network namespaces with their processes, by namespace inode.
pub fn namespaces() -> io::Result<Vec<Netns>> {
    let mut by: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for pid in pids()? {
        // Kernel threads and exited processes have nothing to attribute.
        if let Ok(ns) = netns_of(pid) {
            by.entry(ns).or_default().push(pid);
        }
    }
    Ok(by
        .into_iter()
        .map(|(id, pids)| Netns { id, pids })
        .collect())
}

/// Inodes of the sockets in `pid`'s fd table (`socket:[12345]` links).
pub fn socket_inodes(pid: u32) -> io::Result<Vec<u64>> {
    let dir = format!("/proc/{pid}/fd");
    let mut v = Vec::new();
    for e in fs::read_dir(&dir).map_err(gone_is_not_found)? {
        let Ok(e) = e else { continue };
        // A fd closed between readdir and readlink is simply skipped.
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        if let Some(inode) = socket_inode(target.as_os_str().as_encoded_bytes()) {
            v.push(inode);
        }
    }
    Ok(v)
}

fn socket_inode(link: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(link).ok()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

pub fn process(pid: u32) -> io::Result<ProcessInfo> {
    let comm = String::from_utf8_lossy(&read(&format!("/proc/{pid}/comm"))?)
        .trim_end_matches('\n')
        .to_owned();
    let cmdline = split_nul(&read(&format!("/proc/{pid}/cmdline"))?);
    let exe = fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    let status = String::from_utf8_lossy(&read(&format!("/proc/{pid}/status"))?).into_owned();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX);
    let cgroup = String::from_utf8_lossy(&read(&format!("/proc/{pid}/cgroup"))?).into_owned();
    // Only the service names are kept: the rest of an environment is none
    // of our business (tokens, passwords).
    let env = match read(&format!("/proc/{pid}/environ")) {
        Ok(raw) => service_env(&raw),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
        Err(_) => Vec::new(),
    };
    Ok(ProcessInfo {
        pid,
        comm,
        cmdline,
        exe,
        uid,
        cgroup,
        env,
    })
}

fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

fn service_env(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|&c| c == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            SERVICE_ENV
                .contains(&k)
                .then(|| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// `/etc/passwd` of the host (not of a container: its users are its own).
pub fn users() -> BTreeMap<u32, String> {
    let Ok(text) = fs::read_to_string("/etc/passwd") else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

pub fn host_name() -> Option<String> {
    let h = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links_and_environment() {
        assert_eq!(socket_inode(b"socket:[123456]"), Some(123456));
        assert_eq!(socket_inode(b"pipe:[123456]"), None);
        assert_eq!(socket_inode(b"/dev/null"), None);
        let env = b"PATH=/bin\0OTEL_SERVICE_NAME=web\0SECRET=x\0DD_SERVICE=d=d\0";
        assert_eq!(
            service_env(env),
            vec![
                ("OTEL_SERVICE_NAME".to_owned(), "web".to_owned()),
                ("DD_SERVICE".to_owned(), "d=d".to_owned())
            ]
        );
        assert_eq!(split_nul(b"a\0b c\0"), vec!["a", "b c"]);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let p = process(me).unwrap();
        assert_eq!(p.pid, me);
        assert!(!p.comm.is_empty());
        assert!(!p.cgroup.is_empty());
        assert!(namespaces().unwrap().iter().any(|n| n.pids.contains(&me)));
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let ino = {
            use std::os::fd::AsRawFd;
            fs::metadata(format!("/proc/self/fd/{}", s.as_raw_fd()))
                .unwrap()
                .ino()
        };
        assert!(socket_inodes(me).unwrap().contains(&ino));
        // A pid that does not exist reads as NotFound.
        assert_eq!(
            process(u32::MAX - 1).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }
}
