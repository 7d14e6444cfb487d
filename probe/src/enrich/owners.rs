//! Socket owners the kernel recorded at connect or first send (the eBPF
//! source's cgroup programs, handed over as an
//! [`OwnerFeed`](crate::sources::OwnerFeed)), joined to connection ends by
//! the socket cookie the tc program took from the same socket's packets.
//!
//! Each record is turned into an owner when it is drained (every
//! [`DRAIN_EVERY`]): the process's own tags while it lives (read once per
//! pid, as for sockets a pass finds), else what the kernel recorded (pid,
//! `comm`, uid) with the container from its cgroup id; a process without
//! a service variable takes the one a process of the same cgroup declared
//! earlier. So an end is attributed
//! even when its socket and its process were gone before any resolver
//! pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use flowtable::attrib::{Host, Owner, ProcessInfo, Resolver, SERVICE_ENV, UNATTRIBUTED};
use flowtable::Connection;
use probe_common::owner::{SockOwner, OWNER_TUPLE};

use super::cgroupid::CgroupIds;

/// Between drains of the ring: a process that lives this long after its
/// first connect is read whole (command line, environment).
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Sockets remembered at most (about 100 bytes each); the oldest are
/// forgotten first (counted). Each is also forgotten when its connection
/// is retired. The programs record every socket below the cgroup root,
/// monitored or not: at 1000 new sockets a second this keeps the last
/// minute, and an end is joined at the first report after its connection
/// (a socket that lives longer is found by the resolver's passes).
pub const MAX_SOCKETS: usize = 1 << 16;

/// Tag key of the socket cookie (`Connection::from_entry`).
pub const SOCKET_COOKIE: &str = "socket_cookie";

/// An end by its local port and its peer (protocol number, local port,
/// remote address as the connection renders it, remote port): the join
/// where the tc program did not see the socket. The local address is left
/// out: an unconnected UDP socket's is chosen after the hook.
type TupleKey = (u8, u16, IpAddr, u16);

#[derive(Default)]
pub struct Owners {
    by_cookie: HashMap<u64, Arc<Owner>>,
    by_tuple: HashMap<TupleKey, Arc<Owner>>,
    /// The tuple each socket is known by, to forget it with the socket.
    tuple_of: HashMap<u64, TupleKey>,
    order: VecDeque<u64>,
    /// Per cgroup id, the service a process of it declared.
    cgroup_service: HashMap<u64, String>,
    pub recorded: u64,
    /// Records of processes gone before they could be read.
    pub gone: u64,
    /// Sockets forgotten to stay within [`MAX_SOCKETS`].
    pub evicted: u64,
}

impl Owners {
    /// Turns drained records into owners.
    pub fn ingest<H: Host>(
        &mut self,
        records: &[SockOwner],
        r: &mut Resolver<H>,
        cgroups: &mut CgroupIds,
    ) {
        for rec in records {
            if rec.kind == OWNER_TUPLE {
                // The port `connect` chose, for the owner its hook recorded.
                if let Some(o) = self.by_cookie.get(&rec.cookie) {
                    self.add_tuple(rec, o.clone());
                }
                continue;
            }
            self.recorded += 1;
            if let Some(o) = self.by_cookie.get(&rec.cookie) {
                let o = o.clone();
                self.add_tuple(rec, o);
                continue;
            }
            let owner = match r.process_owner(rec.tgid) {
                Some(o) => match (&o.env_service, self.cgroup_service.get(&rec.cgroup_id)) {
                    (Some(svc), _) => {
                        self.cgroup_service.insert(rec.cgroup_id, svc.clone());
                        o
                    }
                    // No service variable (or an environment already gone
                    // with the exiting process): its cgroup's.
                    (None, Some(svc)) => {
                        let mut c = (*o).clone();
                        c.env_service = Some(svc.clone());
                        Arc::new(c)
                    }
                    (None, None) => o,
                },
                None => {
                    self.gone += 1;
                    let cgroup = cgroups
                        .path_of(rec.cgroup_id)
                        .map(|p| format!("0::{p}\n"))
                        .unwrap_or_default();
                    let env = self
                        .cgroup_service
                        .get(&rec.cgroup_id)
                        .map(|s| vec![(SERVICE_ENV[0].to_owned(), s.clone())])
                        .unwrap_or_default();
                    let p = ProcessInfo {
                        pid: rec.tgid,
                        comm: String::from_utf8_lossy(rec.comm_bytes()).into_owned(),
                        uid: rec.uid,
                        cgroup,
                        env,
                        ..ProcessInfo::default()
                    };
                    Arc::new(r.recorded_owner(&p))
                }
            };
            self.add_tuple(rec, owner.clone());
            self.by_cookie.insert(rec.cookie, owner);
            self.order.push_back(rec.cookie);
            while self.order.len() > MAX_SOCKETS {
                if let Some(old) = self.order.pop_front() {
                    if self.by_cookie.remove(&old).is_some() {
                        self.evicted += 1;
                    }
                    self.drop_tuple(old);
                }
            }
        }
    }

    /// Indexes `o` by the record's tuple, when the record knows its local
    /// port (`sendmsg`, or `sock_ops` after `connect`).
    fn add_tuple(&mut self, rec: &SockOwner, o: Arc<Owner>) {
        if rec.local_port == 0 || rec.remote_port == 0 {
            return;
        }
        let v6 = Ipv6Addr::from(rec.remote);
        let remote = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
        let key = (rec.proto, rec.local_port, remote, rec.remote_port);
        self.by_tuple.insert(key, o);
        self.tuple_of.insert(rec.cookie, key);
    }

    fn drop_tuple(&mut self, cookie: u64) {
        if let Some(k) = self.tuple_of.remove(&cookie) {
            self.by_tuple.remove(&k);
        }
    }

    /// Gives every end without an owning process whose socket cookie was
    /// recorded its owner's tags (and drops its `unattributed` reason).
    pub fn tag<H: Host>(&self, r: &Resolver<H>, conns: &mut [Connection]) {
        for c in conns {
            let proto = match c.proto {
                "tcp" => 6,
                "udp" => 17,
                _ => continue,
            };
            let ends = [
                (&mut c.src_tags, (proto, c.sport, c.dst, c.dport)),
                (&mut c.dst_tags, (proto, c.dport, c.src, c.sport)),
            ];
            for (tags, key) in ends {
                if tags.contains_key("pid") {
                    continue;
                }
                // By the socket cookie the tc program took; else by the
                // end's port and peer.
                let o = cookie(tags)
                    .and_then(|k| self.by_cookie.get(&k))
                    .or_else(|| self.by_tuple.get(&key));
                if let Some(o) = o {
                    tags.remove(UNATTRIBUTED);
                    tags.extend(r.owner_tags(o, key.1));
                }
            }
        }
    }

    /// Forgets the sockets of connections listed for the last time.
    pub fn forget(&mut self, retired: &[Connection]) {
        for c in retired {
            for tags in [&c.src_tags, &c.dst_tags] {
                if let Some(k) = cookie(tags) {
                    self.by_cookie.remove(&k);
                    self.drop_tuple(k);
                }
            }
        }
        if self.order.len() > 2 * self.by_cookie.len() + 1024 {
            let live = &self.by_cookie;
            self.order.retain(|k| live.contains_key(k));
        }
    }
}

fn cookie(tags: &BTreeMap<String, String>) -> Option<u64> {
    tags.get(SOCKET_COOKIE)
        .and_then(|v| v.parse().ok())
        .filter(|&k| k != 0)
}

#[cfg(test)]
mod tests {
    use std::io;

    use std::net::Ipv4Addr;

    use flowtable::attrib::{Netns, Options, SocketEntry, Tuple};
    use flowtable::DirStats;

    use super::*;

    /// A host with one live process, 10, in a docker-shaped cgroup.
    struct OneProcess;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    impl Host for OneProcess {
        fn namespaces(&mut self) -> io::Result<Vec<Netns>> {
            Ok(Vec::new())
        }
        fn sockets(&mut self, _: &Netns) -> io::Result<Vec<SocketEntry>> {
            Ok(Vec::new())
        }
        fn lookup(&mut self, _: &Netns, _: &Tuple) -> io::Result<Option<SocketEntry>> {
            Ok(None)
        }
        fn socket_inodes(&mut self, _: u32) -> io::Result<Vec<u64>> {
            Ok(Vec::new())
        }
        fn process(&mut self, pid: u32) -> io::Result<ProcessInfo> {
            if pid != 10 {
                return Err(io::ErrorKind::NotFound.into());
            }
            Ok(ProcessInfo {
                pid,
                comm: "checkout".to_owned(),
                cmdline: vec!["checkout".to_owned(), "--fast".to_owned()],
                uid: 1000,
                cgroup: format!("0::/system.slice/docker-{ID}.scope\n"),
                env: vec![("OTEL_SERVICE_NAME".to_owned(), "shop".to_owned())],
                ..ProcessInfo::default()
            })
        }
        fn user_name(&mut self, _: u32) -> Option<String> {
            None
        }
        fn host_name(&mut self) -> Option<String> {
            Some("node1".to_owned())
        }
    }

    fn record(cookie: u64, tgid: u32, comm: &[u8]) -> SockOwner {
        let mut r = SockOwner {
            cookie,
            cgroup_id: 77,
            tgid,
            tid: tgid,
            uid: 1000,
            ..SockOwner::default()
        };
        r.comm[..comm.len()].copy_from_slice(comm);
        r
    }

    fn conn(src_cookie: u64, src_tags: &[(&str, &str)]) -> Connection {
        let mut tags: BTreeMap<String, String> = src_tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        tags.insert(SOCKET_COOKIE.to_owned(), src_cookie.to_string());
        Connection {
            proto: "tcp",
            src: [10, 0, 0, 2].into(),
            sport: 40000,
            dst: [10, 0, 0, 1].into(),
            dport: 80,
            iface: 0,
            first_seen: 0,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: None,
            src_tags: tags,
            dst_tags: BTreeMap::new(),
        }
    }

    #[test]
    fn an_end_takes_the_owner_its_socket_recorded_live_or_gone() {
        let mut r = Resolver::new(OneProcess, Options::default());
        let mut cg = CgroupIds::default();
        cg.insert(77, &format!("/system.slice/docker-{ID}.scope"));
        let mut o = Owners::default();
        // Process 10 is read whole; 11 is gone: what the kernel recorded,
        // the container from the cgroup id, the service 10 declared there.
        o.ingest(
            &[
                record(1, 10, b"checkout"),
                record(2, 11, b"worker"),
                record(1, 10, b"x"),
            ],
            &mut r,
            &mut cg,
        );
        assert_eq!((o.recorded, o.gone), (3, 1));
        let mut conns = [
            conn(1, &[(UNATTRIBUTED, "no_socket")]),
            conn(2, &[]),
            conn(3, &[(UNATTRIBUTED, "no_socket")]),
            conn(1, &[("pid", "5")]),
        ];
        o.tag(&r, &mut conns);
        let t = &conns[0].src_tags;
        assert_eq!(t.get("pid").map(String::as_str), Some("10"));
        assert_eq!(
            t.get("cmdline").map(String::as_str),
            Some("checkout --fast")
        );
        assert_eq!(t.get("service").map(String::as_str), Some("shop"));
        assert_eq!(t.get("container").map(String::as_str), Some(ID));
        assert!(!t.contains_key(UNATTRIBUTED));
        let t = &conns[1].src_tags;
        assert_eq!(t.get("pid").map(String::as_str), Some("11"));
        assert_eq!(t.get("process").map(String::as_str), Some("worker"));
        assert_eq!(t.get("service").map(String::as_str), Some("shop"));
        assert_eq!(t.get("container").map(String::as_str), Some(ID));
        assert_eq!(t.get("runtime").map(String::as_str), Some("docker"));
        assert_eq!(t.get("host").map(String::as_str), Some("node1"));
        // Not recorded: left as it was; found by a pass: kept.
        assert_eq!(
            conns[2].src_tags.get(UNATTRIBUTED).map(String::as_str),
            Some("no_socket")
        );
        assert_eq!(conns[3].src_tags.get("pid").map(String::as_str), Some("5"));
        assert!(!conns[3].src_tags.contains_key("service"));

        // Without a cookie (XDP, or a socket the tc program did not see):
        // by the end's port and peer, once `sock_ops` gave the port.
        let mut port = record(1, 10, b"");
        port.kind = OWNER_TUPLE;
        port.proto = 6;
        port.local_port = 40000;
        port.remote_port = 80;
        port.remote = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        o.ingest(&[port], &mut r, &mut cg);
        let mut by_port = [conn(0, &[])];
        by_port[0].src_tags.clear();
        o.tag(&r, &mut by_port);
        assert_eq!(
            by_port[0].src_tags.get("pid").map(String::as_str),
            Some("10")
        );
        assert!(by_port[0].dst_tags.is_empty(), "{:?}", by_port[0].dst_tags);

        o.forget(&conns[..1]);
        let mut again = [conn(1, &[])];
        o.tag(&r, &mut again);
        assert!(!again[0].src_tags.contains_key("pid"));
    }
}
