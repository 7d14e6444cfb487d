//! The real [`Host`]: sock_diag per network namespace (with `/proc/<pid>/net`
//! as the fallback) and procfs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use flowtable::attrib::{Host, Netns, ProcessInfo, SocketEntry, Tuple};

use super::procfs::{self, gone_is_not_found};
use super::procnet;
use super::sockdiag::DiagSocket;

pub struct ProcHost {
    /// One sock_diag socket per namespace, opened once. Dropped when the
    /// namespace is no longer listed: the socket would keep it alive.
    diag: HashMap<u64, DiagSocket>,
    own_netns: Option<u64>,
    users: BTreeMap<u32, String>,
    /// sock_diag is missing from this kernel: read `/proc/<pid>/net`.
    diag_missing: bool,
    /// Said once on stderr why sock_diag is not used.
    pub warning: Option<String>,
    /// Namespaces we may not enter (no CAP_SYS_ADMIN): not tried again,
    /// each try costs a thread.
    denied: HashSet<u64>,
}

impl ProcHost {
    pub fn new() -> ProcHost {
        ProcHost {
            diag: HashMap::new(),
            own_netns: procfs::netns_of(std::process::id()).ok(),
            users: procfs::users(),
            diag_missing: false,
            warning: None,
            denied: HashSet::new(),
        }
    }

    pub fn own_netns(&self) -> Option<u64> {
        self.own_netns
    }

    fn diag_sockets(&mut self, ns: &Netns) -> io::Result<Vec<SocketEntry>> {
        self.diag_socket(ns)?.sockets()
    }

    /// The namespace's sock_diag socket, opened on first use.
    fn diag_socket(&mut self, ns: &Netns) -> io::Result<&mut DiagSocket> {
        if self.denied.contains(&ns.id) {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        if !self.diag.contains_key(&ns.id) {
            let sock = if Some(ns.id) == self.own_netns {
                DiagSocket::open()
            } else {
                self.open_netns(ns).and_then(|f| DiagSocket::open_in(&f))
            };
            let sock = sock.inspect_err(|e| {
                if e.kind() == io::ErrorKind::PermissionDenied {
                    self.denied.insert(ns.id);
                }
            })?;
            self.diag.insert(ns.id, sock);
        }
        self.diag
            .get_mut(&ns.id)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }

    /// `/proc/<pid>/ns/net` of a process still in `ns` (checked by inode:
    /// the pid may have exited and been reused since the listing).
    fn open_netns(&self, ns: &Netns) -> io::Result<File> {
        for pid in &ns.pids {
            let Ok(f) = File::open(format!("/proc/{pid}/ns/net")) else {
                continue;
            };
            if f.metadata().is_ok_and(|m| m.ino() == ns.id) {
                return Ok(f);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process left in network namespace {}", ns.id),
        ))
    }
}

impl Host for ProcHost {
    fn netns_of(&mut self, pid: u32) -> io::Result<u64> {
        procfs::netns_of(pid)
    }

    fn namespaces(&mut self) -> io::Result<Vec<Netns>> {
        let list = procfs::namespaces()?;
        self.diag.retain(|id, _| list.iter().any(|n| n.id == *id));
        self.denied.retain(|id| list.iter().any(|n| n.id == *id));
        Ok(list)
    }

    fn sockets(&mut self, ns: &Netns) -> io::Result<Vec<SocketEntry>> {
        if !self.diag_missing {
            match self.diag_sockets(ns) {
                Ok(v) => return Ok(v),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(e),
                Err(e) => {
                    self.diag.remove(&ns.id);
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EPROTONOSUPPORT | libc::ENOENT | libc::EAFNOSUPPORT)
                    ) {
                        self.diag_missing = true;
                    }
                    // Without the privilege to enter the namespace, the
                    // fallback is all there is; not worth a word each run.
                    if e.kind() != io::ErrorKind::PermissionDenied {
                        self.warning = Some(format!(
                            "sock_diag in network namespace {}: {e}; reading /proc/<pid>/net instead",
                            ns.id
                        ));
                    }
                }
            }
        }
        let mut last = io::Error::from(io::ErrorKind::NotFound);
        for &pid in &ns.pids {
            match procnet::sockets(pid) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn lookup(&mut self, ns: &Netns, t: &Tuple) -> io::Result<Option<SocketEntry>> {
        if self.diag_missing {
            // Without sock_diag there is no lookup by 5-tuple; the periodic
            // dumps (of /proc/<pid>/net) are all there is.
            return Ok(None);
        }
        let r = self.diag_socket(ns).and_then(|d| d.lookup(t));
        if r.as_ref()
            .is_err_and(|e| e.kind() != io::ErrorKind::NotFound)
        {
            // Open afresh next time.
            self.diag.remove(&ns.id);
        }
        r
    }

    fn socket_inodes(&mut self, pid: u32) -> io::Result<Vec<u64>> {
        procfs::socket_inodes(pid).map_err(gone_is_not_found)
    }

    fn process(&mut self, pid: u32) -> io::Result<ProcessInfo> {
        procfs::process(pid)
    }

    fn user_name(&mut self, uid: u32) -> Option<String> {
        self.users.get(&uid).cloned()
    }

    fn host_name(&mut self) -> Option<String> {
        procfs::host_name()
    }
}
