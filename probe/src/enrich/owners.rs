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
//! earlier. A socket a listener accepted (recorded by `sock_ops` once
//! established, in softirq, with no process of its own) takes the owner
//! of the listener recorded at `listen(2)` on its port in its network
//! namespace (one listening since before the run: the owner a resolver
//! pass found for it). So an end is attributed
//! even when its socket and its process were gone before any resolver
//! pass, on the connecting side and on the accepting one.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use flowtable::attrib::{
    Host, Owner, ProcessInfo, Proto, Recorded, Resolver, Tuple, SERVICE_ENV, UNATTRIBUTED,
};
use flowtable::{Connection, Tags};
use probe_common::owner::{SockOwner, OWNER_ACCEPT, OWNER_LISTEN, OWNER_TUPLE};

use super::cgroupid::CgroupIds;

/// Between drains of the ring: a process that lives this long after its
/// first connect is read whole (command line, environment).
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Sockets remembered at most ([`socket_bound`]: about 90 bytes each);
/// the oldest are forgotten first (counted). Each is also forgotten when
/// its connection is retired. The programs record every socket below the
/// cgroup root, monitored or not: at 1000 new sockets a second this keeps
/// the last minute, and an end is joined at the first report after its
/// connection (a socket forgotten while its connection is open is found by
/// the resolver's passes, at a lookup each and more memory).
pub const MIN_SOCKETS: usize = 1 << 16;

/// The bound for a kernel table of `capacity` slots: as many sockets as
/// slots (the two ends of the half the table is sized to hold open), and
/// [`MIN_SOCKETS`] at least.
pub fn socket_bound(capacity: usize) -> usize {
    capacity.max(MIN_SOCKETS)
}

/// Listeners remembered at most (one per namespace and port; a port
/// listened on again replaces its entry).
pub const MAX_LISTENERS: usize = 4096;

/// Network namespaces whose id is remembered (by their cookie); beyond,
/// all are forgotten and learnt again.
pub const MAX_NETNS: usize = 4096;

mod socks;

use socks::{Sock, Socks, TupleKey};

#[derive(Default)]
pub struct Owners {
    /// By cookie and by tuple, at most `max_sockets`.
    socks: Socks,
    max_sockets: Bound,
    /// Cookies in the order they were recorded (some forgotten since).
    order: VecDeque<u64>,
    /// Per cgroup id, the service a process of it declared.
    cgroup_service: HashMap<u64, String>,
    /// Listeners' owners by (network namespace cookie, local port), the
    /// oldest forgotten first beyond [`MAX_LISTENERS`].
    listeners: HashMap<(u64, u16), Arc<Owner>>,
    listen_order: VecDeque<(u64, u16)>,
    /// Network namespace ids (what the resolver's `netns` tag says) by
    /// cookie (what a record says), learnt from the records of processes
    /// the resolver listed: an end named by its record carries `netns` as
    /// one whose socket a pass found.
    netns_ids: HashMap<u64, u64>,
    pub recorded: u64,
    /// Listeners recorded at `listen(2)`.
    pub listens: u64,
    /// Accepted sockets given their listener's owner; of them, those whose
    /// listener was not recorded (listening since before the run) but found
    /// by a resolver pass; and those whose listener is not known at all.
    pub accepted: u64,
    pub accepted_by_pass: u64,
    pub accepted_unknown: u64,
    /// Records of processes gone before they could be read.
    pub gone: u64,
    /// Sockets forgotten to stay within the bound.
    pub evicted: u64,
    /// Sockets forgotten once the listing named their end ([`Owners::release`]).
    pub released: u64,
    /// Listeners forgotten to stay within [`MAX_LISTENERS`].
    pub listeners_evicted: u64,
    /// Times every namespace id was forgotten to stay within [`MAX_NETNS`].
    pub netns_cleared: u64,
}

/// The most sockets remembered ([`socket_bound`]; [`MIN_SOCKETS`] by
/// default).
#[derive(Clone, Copy)]
struct Bound(usize);

impl Default for Bound {
    fn default() -> Bound {
        Bound(MIN_SOCKETS)
    }
}

impl Owners {
    /// Remembering at most `max_sockets` sockets ([`socket_bound`]).
    pub fn new(max_sockets: usize) -> Owners {
        Owners {
            max_sockets: Bound(max_sockets),
            ..Owners::default()
        }
    }

    /// The most sockets it remembers.
    pub fn limit(&self) -> usize {
        self.max_sockets.0
    }

    /// Sockets whose owner is held now.
    pub fn held(&self) -> usize {
        self.socks.len()
    }

    pub fn listeners_held(&self) -> usize {
        self.listeners.len()
    }

    /// Namespace ids held now.
    pub fn netns_held(&self) -> usize {
        self.netns_ids.len()
    }

    /// Turns drained records into owners.
    pub fn ingest<H: Host>(
        &mut self,
        records: &[SockOwner],
        r: &mut Resolver<H>,
        cgroups: &mut CgroupIds,
    ) {
        for rec in records {
            self.learn_netns(rec, r);
            match rec.kind {
                OWNER_TUPLE => {
                    // The port `connect` chose, for the owner its hook recorded.
                    self.add_tuple(rec);
                    continue;
                }
                OWNER_LISTEN => {
                    let owner = self.owner_of(rec, r, cgroups);
                    let key = (rec.netns_cookie, rec.local_port);
                    if self.listeners.insert(key, owner).is_none() {
                        self.listen_order.push_back(key);
                    }
                    while self.listen_order.len() > MAX_LISTENERS {
                        if let Some(old) = self.listen_order.pop_front() {
                            self.listeners.remove(&old);
                            self.listeners_evicted += 1;
                        }
                    }
                    self.listens += 1;
                    continue;
                }
                OWNER_ACCEPT => {
                    // The owner of the listener on its port in its namespace,
                    // recorded at `listen(2)`, else found by a pass.
                    let o = match self.listeners.get(&(rec.netns_cookie, rec.local_port)) {
                        Some(o) => o.clone(),
                        None => match r.owner_of_end(&accepted(rec)) {
                            Some(l) => {
                                self.accepted_by_pass += 1;
                                if let Some(id) = l.netns {
                                    self.learn_id(rec.netns_cookie, id);
                                }
                                l.owner
                            }
                            None => {
                                self.accepted_unknown += 1;
                                continue;
                            }
                        },
                    };
                    self.accepted += 1;
                    self.remember(rec, o);
                    self.add_tuple(rec);
                    continue;
                }
                _ => {}
            }
            self.recorded += 1;
            if !self.socks.contains(rec.cookie) {
                let owner = self.owner_of(rec, r, cgroups);
                self.remember(rec, owner);
            }
            self.add_tuple(rec);
        }
    }

    /// Learns the id of the record's network namespace from its process
    /// (as the resolver's listing of namespaces saw it, else as it is now),
    /// the first time a record names it. A process gone before its record
    /// was drained teaches nothing; an accepted socket's record has no
    /// process, its listener's taught it.
    fn learn_netns<H: Host>(&mut self, rec: &SockOwner, r: &mut Resolver<H>) {
        if rec.tgid == 0 || rec.netns_cookie == 0 || self.netns_ids.contains_key(&rec.netns_cookie)
        {
            return;
        }
        if let Some(id) = r.netns_of(rec.tgid) {
            self.learn_id(rec.netns_cookie, id);
        }
    }

    /// Network namespace `cookie` is the one with `id`.
    fn learn_id(&mut self, cookie: u64, id: u64) {
        if cookie == 0 {
            return;
        }
        if self.netns_ids.len() >= MAX_NETNS {
            self.netns_ids.clear();
            self.netns_cleared += 1;
        }
        self.netns_ids.insert(cookie, id);
    }

    fn sock(rec: &SockOwner, owner: Arc<Owner>) -> Sock {
        Sock {
            cookie: rec.cookie,
            owner,
            netns_cookie: rec.netns_cookie,
            local: ip(rec.local),
            tuple: None,
        }
    }

    /// The owner of the process a record names: its own tags while it
    /// lives, else what the kernel recorded, with the container from the
    /// cgroup id; the service its cgroup declared when it has none.
    fn owner_of<H: Host>(
        &mut self,
        rec: &SockOwner,
        r: &mut Resolver<H>,
        cgroups: &mut CgroupIds,
    ) -> Arc<Owner> {
        match r.process_owner(rec.tgid) {
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
        }
    }

    /// Joins the record's socket to `owner`, within the bound.
    fn remember(&mut self, rec: &SockOwner, owner: Arc<Owner>) {
        self.socks.insert(Self::sock(rec, owner));
        self.order.push_back(rec.cookie);
        while self.order.len() > self.max_sockets.0 {
            if let Some(old) = self.order.pop_front() {
                if self.drop_socket(old) {
                    self.evicted += 1;
                }
            }
        }
    }

    /// Indexes the record's socket (remembered) by its tuple, when the
    /// record knows its local port (`sendmsg`, or `sock_ops` after
    /// `connect`).
    fn add_tuple(&mut self, rec: &SockOwner) {
        if rec.local_port == 0 || rec.remote_port == 0 {
            return;
        }
        let key = (rec.proto, rec.local_port, ip(rec.remote), rec.remote_port);
        self.socks
            .set_tuple(rec.cookie, key, ip(rec.local), rec.netns_cookie);
    }

    /// Forgets socket `cookie` and its tuple, unless a later socket on the
    /// same tuple (a port reused while the earlier connection is still
    /// listed) holds it now. True when it was remembered.
    fn drop_socket(&mut self, cookie: u64) -> bool {
        self.socks.remove(cookie)
    }

    /// Gives every end without an owning process whose socket cookie was
    /// recorded its owner's tags (and drops its `unattributed` reason).
    pub fn tag<H: Host>(&self, r: &mut Resolver<H>, conns: &mut [Connection]) {
        for c in conns {
            let keys = end_keys(c);
            for (tags, key) in [&mut c.src_tags, &mut c.dst_tags].into_iter().zip(keys) {
                if tags.contains_key("pid") {
                    continue;
                }
                // By the socket cookie the tc program took; else by the
                // end's port and peer.
                let s = cookie(tags)
                    .and_then(|k| self.socks.get(k))
                    .or_else(|| self.socks.named(&key));
                if let Some(s) = s {
                    let mut rec = self.record(s);
                    if tags.contains_key("netns") {
                        rec.netns = None;
                    }
                    // One set for every end of the owner.
                    let set = r.intern(r.recorded_tags(&rec, key.1));
                    if tags.len() == 1 && tags.contains_key(UNATTRIBUTED) {
                        tags.replace_set(&set);
                    } else {
                        tags.remove(UNATTRIBUTED);
                        tags.add_shared(&set);
                    }
                }
            }
        }
    }

    /// The owner the kernel recorded for the socket at `t`'s local end,
    /// found by its port and peer as [`Owners::tag`] finds it (and at its
    /// local address, when the record has one): a resolver pass need not
    /// look that socket up.
    pub fn recorded(&self, t: &Tuple) -> Option<Recorded> {
        let key = (
            t.proto.number(),
            t.local.port(),
            t.remote.ip(),
            t.remote.port(),
        );
        let s = self.socks.named(&key)?;
        (s.local.is_unspecified() || s.local == t.local.ip()).then(|| self.record(s))
    }

    /// What the kernel recorded of socket `s`: its owner, and its network
    /// namespace's id once learnt.
    fn record(&self, s: &Sock) -> Recorded {
        Recorded {
            owner: s.owner.clone(),
            netns: self.netns_ids.get(&s.netns_cookie).copied(),
        }
    }

    /// Forgets the sockets of connections listed for the last time.
    pub fn forget(&mut self, retired: &[Connection]) {
        for c in retired {
            for tags in [&c.src_tags, &c.dst_tags] {
                if let Some(k) = cookie(tags) {
                    self.drop_socket(k);
                }
            }
        }
        self.tidy();
    }

    /// Forgets the sockets of the TCP ends `listed` names by their process:
    /// the memo gives those ends their tags from now on
    /// (`super::memo`), and a TCP socket is one connection's. So the
    /// sockets held are those of ends not named yet, not one per open
    /// connection's end. A UDP socket may talk to peers still to come, and
    /// is kept.
    pub fn release(&mut self, listed: &[Connection]) {
        for c in listed.iter().filter(|c| c.proto == flowtable::Proto::Tcp) {
            for (tags, key) in [&c.src_tags, &c.dst_tags].into_iter().zip(end_keys(c)) {
                if !super::memo::named(tags) {
                    continue;
                }
                let k = cookie(tags)
                    .filter(|&k| self.socks.contains(k))
                    .or_else(|| self.socks.named(&key).map(|s| s.cookie));
                if k.is_some_and(|k| self.drop_socket(k)) {
                    self.released += 1;
                }
            }
        }
        self.tidy();
    }

    /// Drops the recording order's forgotten cookies, and the sockets'
    /// room, once most of it is unused.
    fn tidy(&mut self) {
        if self.order.len() > 2 * self.socks.len() + 1024 {
            let live = &self.socks;
            self.order.retain(|&k| live.contains(k));
            self.order.shrink_to_fit();
        }
        self.socks.compact();
    }
}

/// The keys an end of `c` is recorded under: the initiator's as it sent,
/// the responder's beyond any translation (`nat.ip`/`nat.port`: its
/// socket has those addresses).
fn end_keys(c: &Connection) -> [TupleKey; 2] {
    let p = c.proto.number();
    let (src_far, dst_far) = flowtable::nat::beyond(c);
    [
        (p, c.sport, c.dst, c.dport),
        (p, dst_far.port(), src_far.ip(), src_far.port()),
    ]
}

/// The accepted socket a record names, as the resolver keys it.
fn accepted(rec: &SockOwner) -> Tuple {
    Tuple::new(
        Proto::Tcp,
        SocketAddr::new(ip(rec.local), rec.local_port),
        SocketAddr::new(ip(rec.remote), rec.remote_port),
    )
}

/// A record's address (IPv4-mapped for IPv4) as a connection renders it.
fn ip(a: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(a);
    v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
}

fn cookie(tags: &Tags) -> Option<u64> {
    Some(tags.socket().cookie).filter(|&k| k != 0)
}

#[cfg(test)]
mod tests {
    use std::io;

    use std::net::Ipv4Addr;

    use flowtable::attrib::{Netns, Options, SocketEntry, SocketState};
    use flowtable::DirStats;

    use super::*;

    /// A host with one live process, 10, in a docker-shaped cgroup, in
    /// network namespace [`NETNS`], listening on 10.0.0.1:5001.
    struct OneProcess;

    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const NETNS: u64 = 4026532001;
    const LISTENER_INODE: u64 = 99;

    impl Host for OneProcess {
        fn namespaces(&mut self) -> io::Result<Vec<Netns>> {
            Ok(vec![Netns {
                id: NETNS,
                pids: vec![10],
            }])
        }
        fn sockets(&mut self, _: &Netns) -> io::Result<Vec<SocketEntry>> {
            Ok(vec![SocketEntry {
                tuple: Tuple::new(
                    Proto::Tcp,
                    "10.0.0.1:5001".parse().unwrap(),
                    "0.0.0.0:0".parse().unwrap(),
                ),
                inode: LISTENER_INODE,
                uid: 1000,
                cookie: 0,
                state: SocketState::Listen,
            }])
        }
        fn lookup(&mut self, _: &Netns, _: &Tuple) -> io::Result<Option<SocketEntry>> {
            Ok(None)
        }
        fn socket_inodes(&mut self, pid: u32) -> io::Result<Vec<u64>> {
            Ok(if pid == 10 {
                vec![LISTENER_INODE]
            } else {
                Vec::new()
            })
        }
        fn netns_of(&mut self, pid: u32) -> io::Result<u64> {
            match pid {
                10 => Ok(NETNS),
                _ => Err(io::ErrorKind::NotFound.into()),
            }
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
        let tags: std::collections::BTreeMap<String, String> = src_tags
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Connection {
            proto: flowtable::Proto::Tcp,
            src: [10, 0, 0, 2].into(),
            sport: 40000,
            dst: [10, 0, 0, 1].into(),
            dport: 80,
            iface: 0,
            first_seen: 0,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Tags::from(tags).with_socket(flowtable::Socket {
                cookie: src_cookie,
                cgroup: 0,
            }),
            dst_tags: Default::default(),
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
        o.tag(&mut r, &mut conns);
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
        o.tag(&mut r, &mut by_port);
        assert_eq!(
            by_port[0].src_tags.get("pid").map(String::as_str),
            Some("10")
        );
        assert!(by_port[0].dst_tags.is_empty(), "{:?}", by_port[0].dst_tags);

        o.forget(&conns[..1]);
        let mut again = [conn(1, &[])];
        o.tag(&mut r, &mut again);
        assert!(!again[0].src_tags.contains_key("pid"));
    }

    /// A server's accepted sockets, recorded with no process of their own,
    /// take the owner of the listener on their port in their namespace;
    /// the end is found beyond a translation (`nat.ip`/`nat.port`).
    #[test]
    fn an_accepted_socket_takes_its_listeners_owner() {
        let mut r = Resolver::new(OneProcess, Options::default());
        let mut cg = CgroupIds::default();
        let mut o = Owners::default();
        let peer = Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets();
        let mut listen = record(5, 10, b"catalog");
        listen.kind = OWNER_LISTEN;
        listen.netns_cookie = 4096;
        listen.local_port = 5001;
        let accept = |cookie, netns_cookie, port| SockOwner {
            cookie,
            netns_cookie,
            kind: OWNER_ACCEPT,
            proto: 6,
            family: 4,
            local_port: 5001,
            remote_port: port,
            remote: peer,
            ..SockOwner::default()
        };
        // The second accepted socket is in another namespace, whose
        // listener was not recorded.
        o.ingest(
            &[listen, accept(6, 4096, 40000), accept(7, 8192, 40001)],
            &mut r,
            &mut cg,
        );
        assert_eq!((o.listens, o.accepted, o.accepted_unknown), (1, 1, 1));
        // Client 10.0.0.2:40000 to a published 10.0.0.9:8080, translated to
        // 10.0.0.1:5001; no cookie on the server's end.
        let mut conns = [conn(0, &[]), conn(0, &[])];
        for (c, sport) in conns.iter_mut().zip([40000, 40001]) {
            c.src_tags.clear();
            c.sport = sport;
            c.dst = [10, 0, 0, 9].into();
            c.dport = 8080;
            c.dst_tags
                .insert("nat.ip".to_owned(), "10.0.0.1".to_owned());
            c.dst_tags.insert("nat.port".to_owned(), "5001".to_owned());
        }
        o.tag(&mut r, &mut conns);
        let t = &conns[0].dst_tags;
        assert_eq!(t.get("pid").map(String::as_str), Some("10"));
        assert_eq!(t.get("service").map(String::as_str), Some("shop"));
        assert_eq!(t.get("container").map(String::as_str), Some(ID));
        assert!(conns[0].src_tags.is_empty(), "{:?}", conns[0].src_tags);
        assert!(!conns[1].dst_tags.contains_key("pid"));
    }

    /// An end named by its socket's record alone carries the tags a pass
    /// that found its socket gives, `netns` included (the namespace its
    /// process was listed in, learnt by the record's namespace cookie);
    /// so does an end a pass named from the record instead of a lookup.
    #[test]
    fn an_end_named_by_its_record_carries_its_netns() {
        let mut r = Resolver::new(OneProcess, Options::default());
        // Lists the namespaces: process 10 in NETNS.
        r.refresh(0, &[]);
        let mut cg = CgroupIds::default();
        let mut o = Owners::default();
        let mut connect = record(1, 10, b"checkout");
        connect.netns_cookie = 4096;
        let mut port = record(1, 0, b"");
        port.kind = OWNER_TUPLE;
        port.netns_cookie = 4096;
        port.proto = 6;
        port.local = Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets();
        port.local_port = 40000;
        port.remote = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        port.remote_port = 80;
        o.ingest(&[connect, port], &mut r, &mut cg);

        // No pass saw it: named at the report from the record.
        let mut at_report = [conn(1, &[])];
        o.tag(&mut r, &mut at_report);
        let t = &at_report[0].src_tags;
        assert_eq!(t.get("netns"), Some(&NETNS.to_string()), "{t:?}");
        assert_eq!(t.get("pid").map(String::as_str), Some("10"));

        // A pass saw it: named from the record (no lookup), the same tags.
        let client = Tuple::new(
            Proto::Tcp,
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        let st = r.refresh_skipping(1, &[client], |t| o.recorded(t), |_| false);
        assert_eq!((st.lookups, st.skipped), (0, 1));
        let mut by_pass = [conn(1, &[])];
        r.tag(&mut by_pass);
        o.tag(&mut r, &mut by_pass);
        assert_eq!(by_pass[0].src_tags, at_report[0].src_tags);
        // Another local address on the same port and peer is not it.
        let other = Tuple::new(
            Proto::Tcp,
            "10.0.0.3:40000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        assert!(o.recorded(&other).is_none());
    }

    /// A server listening since before the run (no record of its
    /// `listen(2)`): its accepted sockets take the owner a pass found for
    /// its listener, and their namespace.
    #[test]
    fn an_accepted_socket_of_an_older_listener_takes_the_owner_a_pass_found() {
        let mut r = Resolver::new(OneProcess, Options::default());
        let mut cg = CgroupIds::default();
        let mut o = Owners::default();
        let accept = SockOwner {
            cookie: 6,
            netns_cookie: 4096,
            kind: OWNER_ACCEPT,
            proto: 6,
            family: 4,
            local: Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets(),
            local_port: 5001,
            remote: Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets(),
            remote_port: 40000,
            ..SockOwner::default()
        };
        // Before any pass: not known.
        o.ingest(&[accept], &mut r, &mut cg);
        assert_eq!((o.accepted, o.accepted_unknown), (0, 1));
        // A pass (its dump) found the listener and its process.
        r.refresh(0, &[]);
        o.ingest(
            &[SockOwner {
                cookie: 7,
                ..accept
            }],
            &mut r,
            &mut cg,
        );
        assert_eq!((o.accepted, o.accepted_by_pass), (1, 1));
        let mut conns = [conn(0, &[])];
        conns[0].src_tags.clear();
        conns[0].dport = 5001;
        o.tag(&mut r, &mut conns);
        let t = &conns[0].dst_tags;
        assert_eq!(t.get("pid").map(String::as_str), Some("10"));
        assert_eq!(t.get("netns"), Some(&NETNS.to_string()), "{t:?}");
    }

    /// A port reused while the earlier connection on its tuple is still
    /// listed: retiring the earlier one leaves the later one's record.
    #[test]
    fn retiring_a_connection_keeps_the_record_of_a_later_one_on_its_tuple() {
        let mut r = Resolver::new(OneProcess, Options::default());
        let mut cg = CgroupIds::default();
        let mut o = Owners::default();
        let tuple_rec = |cookie| {
            let mut t = record(cookie, 0, b"");
            t.kind = OWNER_TUPLE;
            t.proto = 6;
            t.local_port = 40000;
            t.remote_port = 80;
            t.remote = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
            t
        };
        o.ingest(
            &[
                record(1, 10, b"checkout"),
                tuple_rec(1),
                record(2, 10, b"checkout"),
                tuple_rec(2),
            ],
            &mut r,
            &mut cg,
        );
        let end = Tuple::new(
            Proto::Tcp,
            "10.0.0.2:40000".parse().unwrap(),
            "10.0.0.1:80".parse().unwrap(),
        );
        o.forget(&[conn(1, &[])]);
        assert!(o.recorded(&end).is_some());
        o.forget(&[conn(2, &[])]);
        assert!(o.recorded(&end).is_none());
    }

    /// The sockets of TCP ends the listing names by their process go, by
    /// cookie or, for an end the tc program saw no socket of (a server's
    /// accepted one), by port and peer; a UDP socket and an end not named
    /// yet keep theirs.
    #[test]
    fn sockets_of_ends_the_listing_names_are_released() {
        let mut r = Resolver::new(OneProcess, Options::default());
        let mut cg = CgroupIds::default();
        let mut o = Owners::default();
        let mut listen = record(5, 10, b"catalog");
        listen.kind = OWNER_LISTEN;
        listen.local_port = 80;
        let accept = SockOwner {
            cookie: 6,
            kind: OWNER_ACCEPT,
            proto: 6,
            family: 4,
            local_port: 80,
            remote_port: 40000,
            remote: Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped().octets(),
            ..SockOwner::default()
        };
        o.ingest(
            &[
                listen,
                record(1, 10, b"checkout"),
                accept,
                record(2, 10, b"x"),
                record(3, 10, b"y"),
            ],
            &mut r,
            &mut cg,
        );
        assert_eq!(o.held(), 4);
        // Client socket 1 to the server's accepted 6, both named; socket 2's
        // end is not named yet; socket 3 is a UDP one's.
        let mut both = conn(1, &[]);
        o.tag(&mut r, std::slice::from_mut(&mut both));
        assert!(both.src_tags.contains_key("pid") && both.dst_tags.contains_key("pid"));
        let unnamed = conn(2, &[(UNATTRIBUTED, "no_socket")]);
        let mut udp = conn(3, &[("pid", "10")]);
        udp.proto = flowtable::Proto::Udp;
        o.release(&[both, unnamed, udp]);
        assert_eq!(o.released, 2);
        assert_eq!(o.held(), 2);
        assert!(o.socks.contains(2) && o.socks.contains(3));
    }
}
