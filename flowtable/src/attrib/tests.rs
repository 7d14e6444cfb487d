//! The resolver on a fake host: two "containers" in two namespaces, a
//! Kubernetes pod, sockets that close, processes that vanish mid-read.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use super::*;
use crate::{Connection, DirStats};

const DOCKER_ID: &str = "4f2d9b3c1a0e8f7d6c5b4a39281706f5e4d3c2b1a0998877665544332211aabb";
const CRI_ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const POD_UID: &str = "6a1c3f1e-2b7c-4e0a-9a4e-3c1d2e5f6a7b";

/// An OS in memory; counts the reads the resolver makes.
#[derive(Default)]
struct Fake {
    namespaces: Vec<Netns>,
    sockets: HashMap<u64, Vec<SocketEntry>>,
    fds: HashMap<u32, Vec<u64>>,
    procs: HashMap<u32, ProcessInfo>,
    fd_reads: Vec<u32>,
    /// Processes whose fds we may not read (another user's, no CAP_SYS_PTRACE).
    forbidden: Vec<u32>,
    namespace_listings: usize,
    dumps: usize,
    lookups: usize,
}

impl Host for Fake {
    fn namespaces(&mut self) -> io::Result<Vec<Netns>> {
        self.namespace_listings += 1;
        Ok(self.namespaces.clone())
    }
    fn netns_of(&mut self, pid: u32) -> io::Result<u64> {
        self.namespaces
            .iter()
            .find(|n| n.pids.contains(&pid))
            .map(|n| n.id)
            .ok_or_else(|| io::ErrorKind::NotFound.into())
    }
    fn sockets(&mut self, ns: &Netns) -> io::Result<Vec<SocketEntry>> {
        self.dumps += 1;
        self.sockets
            .get(&ns.id)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    /// As the kernel: the connected socket, else one bound to the port
    /// without a peer (TCP: listening).
    fn lookup(&mut self, ns: &Netns, t: &Tuple) -> io::Result<Option<SocketEntry>> {
        self.lookups += 1;
        let Some(all) = self.sockets.get(&ns.id) else {
            return Ok(None);
        };
        if let Some(s) = all.iter().find(|s| s.tuple == *t) {
            return Ok(Some(*s));
        }
        Ok(all
            .iter()
            .find(|s| {
                s.tuple.proto == t.proto
                    && s.tuple.remote.ip().is_unspecified()
                    && s.tuple.local.port() == t.local.port()
                    && (s.tuple.local.ip().is_unspecified() || s.tuple.local.ip() == t.local.ip())
                    && (t.proto == Proto::Udp || s.state == SocketState::Listen)
            })
            .copied())
    }
    fn socket_inodes(&mut self, pid: u32) -> io::Result<Vec<u64>> {
        self.fd_reads.push(pid);
        if self.forbidden.contains(&pid) {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.fds
            .get(&pid)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn process(&mut self, pid: u32) -> io::Result<ProcessInfo> {
        self.procs
            .get(&pid)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }
    fn user_name(&mut self, uid: u32) -> Option<String> {
        (uid == 0).then(|| "root".to_owned())
    }
    fn host_name(&mut self) -> Option<String> {
        Some("node1".to_owned())
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn sock(proto: Proto, local: &str, remote: &str, inode: u64) -> SocketEntry {
    let state = if proto == Proto::Tcp && remote.ends_with(":0") {
        SocketState::Listen
    } else {
        SocketState::Other
    };
    SocketEntry {
        tuple: Tuple::new(proto, addr(local), addr(remote)),
        inode,
        uid: 0,
        cookie: 0,
        state,
    }
}

fn proc_info(pid: u32, comm: &str, cgroup: String, service: Option<&str>) -> ProcessInfo {
    ProcessInfo {
        pid,
        comm: comm.to_owned(),
        cmdline: vec![format!("/usr/local/bin/{comm}"), "--serve".to_owned()],
        exe: Some(format!("/usr/local/bin/{comm}")),
        uid: 0,
        cgroup,
        env: service
            .map(|s| vec![("OTEL_SERVICE_NAME".to_owned(), s.to_owned())])
            .unwrap_or_default(),
    }
}

fn conn(proto: &str, src: &str, dst: &str) -> Connection {
    let (s, d) = (addr(src), addr(dst));
    Connection {
        proto: Proto::from_name(proto).expect("tcp or udp"),
        src: s.ip(),
        sport: s.port(),
        dst: d.ip(),
        dport: d.port(),
        iface: 2,
        first_seen: 0,
        last_seen: 0,
        sent: DirStats::default(),
        received: DirStats::default(),
        rtt: Default::default(),
        src_tags: Default::default(),
        dst_tags: Default::default(),
    }
}

/// Client (docker container, netns 11) at 10.1.0.1 talking to a server
/// (Kubernetes pod, netns 22) at 10.1.0.2 over TCP, plus a host process
/// (netns 1) with a UDP server on every address.
fn world() -> Fake {
    let mut f = Fake {
        namespaces: vec![
            Netns {
                id: 1,
                pids: vec![1, 500],
            },
            Netns {
                id: 11,
                pids: vec![100, 101],
            },
            Netns {
                id: 22,
                pids: vec![200],
            },
        ],
        ..Fake::default()
    };
    f.sockets.insert(
        11,
        vec![sock(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080", 1001)],
    );
    f.sockets.insert(
        22,
        vec![
            sock(Proto::Tcp, "0.0.0.0:8080", "0.0.0.0:0", 2000),
            sock(Proto::Tcp, "10.1.0.2:8080", "10.1.0.1:40000", 2001),
        ],
    );
    f.sockets
        .insert(1, vec![sock(Proto::Udp, "[::]:5353", "[::]:0", 5000)]);
    f.fds.insert(1, vec![]);
    f.fds.insert(100, vec![]);
    f.fds.insert(101, vec![1001]);
    f.fds.insert(200, vec![2000, 2001]);
    f.fds.insert(500, vec![5000]);
    f.procs.insert(
        101,
        proc_info(
            101,
            "fp-client",
            format!("12:pids:/docker/{DOCKER_ID}\n"),
            Some("checkout"),
        ),
    );
    let pod_path = format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CRI_ID}.scope\n",
        POD_UID.replace('-', "_")
    );
    f.procs
        .insert(200, proc_info(200, "fp-server", pod_path, Some("payments")));
    f.procs.insert(
        500,
        proc_info(500, "mdns", "0::/system.slice/avahi.service\n".into(), None),
    );
    f
}

fn tags(pairs: &[(&str, &str)]) -> crate::Tags {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn both_ends_in_two_namespaces_get_process_container_and_service() {
    let mut r = Resolver::new(world(), Options::default());
    let st = r.refresh(0, &[]);
    assert_eq!(st.namespaces, 3);
    assert_eq!(st.errors, 0);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(
        c[0].src_tags,
        tags(&[
            ("pid", "101"),
            ("process", "fp-client"),
            ("cmdline", "/usr/local/bin/fp-client --serve"),
            ("exe", "/usr/local/bin/fp-client"),
            ("uid", "0"),
            ("user", "root"),
            ("host", "node1"),
            ("container", DOCKER_ID),
            ("runtime", "docker"),
            ("netns", "11"),
            ("service", "checkout"),
        ])
    );
    let d = &c[0].dst_tags;
    assert_eq!(d["pid"], "200");
    assert_eq!(d["process"], "fp-server");
    assert_eq!(d["container"], CRI_ID);
    assert_eq!(d["runtime"], "containerd");
    assert_eq!(d["pod"], POD_UID);
    assert_eq!(d["qos"], "burstable");
    assert_eq!(d["service"], "payments");
    assert_eq!(d["netns"], "22");
}

/// A Service's ClusterIP DNATed to the pod (`crate::nat`): the client's
/// socket talks to the ClusterIP, the pod's to the client; the responder
/// is found beyond the translation.
#[test]
fn the_responder_of_a_translated_connection_is_found_beyond_it() {
    let mut f = world();
    f.sockets.insert(
        11,
        vec![sock(Proto::Tcp, "10.1.0.1:40000", "10.96.0.10:80", 1001)],
    );
    let mut r = Resolver::new(f, Options::default());
    r.refresh(0, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.96.0.10:80")];
    c[0].dst_tags = tags(&[("nat.ip", "10.1.0.2"), ("nat.port", "8080")]);
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["process"], "fp-client");
    let d = &c[0].dst_tags;
    assert_eq!(
        (
            d["process"].as_str(),
            d["service"].as_str(),
            d["netns"].as_str()
        ),
        ("fp-server", "payments", "22"),
        "{d:?}"
    );
    assert_eq!(d["nat.ip"], "10.1.0.2");
}

#[test]
fn owner_is_kept_after_the_socket_and_process_are_gone() {
    let mut r = Resolver::new(world(), Options::default());
    r.refresh(0, &[]);
    // The connection closes: the client's socket goes to TIME_WAIT (inode
    // 0), the server's is gone, and the client process exits.
    let f = &mut r.host;
    f.sockets.insert(
        11,
        vec![sock(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080", 0)],
    );
    f.sockets.insert(
        22,
        vec![sock(Proto::Tcp, "0.0.0.0:8080", "0.0.0.0:0", 2000)],
    );
    f.procs.remove(&101);
    f.fds.remove(&101);
    f.namespaces[1].pids = vec![100];
    r.refresh(10_000_000_000, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["pid"], "101");
    assert_eq!(c[0].src_tags["service"], "checkout");
    assert_eq!(c[0].dst_tags["pid"], "200");
}

#[test]
fn unattributed_ends_say_why() {
    let mut f = world();
    // A socket no process holds (its last fd was closed between reads).
    f.sockets
        .get_mut(&11)
        .unwrap()
        .push(sock(Proto::Tcp, "10.1.0.1:40001", "10.1.0.2:9999", 1002));
    let mut r = Resolver::new(f, Options::default());
    r.refresh(0, &[]);
    let mut c = vec![
        conn("tcp", "10.1.0.1:40001", "10.1.0.2:9999"),
        // 10.1.0.1 is a local address, this port was never seen.
        conn("tcp", "10.1.0.1:40002", "192.0.2.7:443"),
    ];
    r.tag(&mut c);
    assert_eq!(
        c[0].src_tags,
        tags(&[
            ("unattributed", "no_process"),
            ("netns", "11"),
            ("host", "node1"),
            ("uid", "0")
        ])
    );
    // 10.1.0.2:9999 has no socket on this host, but the address is local.
    assert_eq!(c[0].dst_tags, tags(&[("unattributed", "no_socket")]));
    assert_eq!(c[1].src_tags, tags(&[("unattributed", "no_socket")]));
    assert_eq!(c[1].dst_tags, tags(&[("unattributed", "remote")]));
}

#[test]
fn listener_and_unconnected_udp_stand_for_ends_never_seen_connected() {
    let mut f = world();
    // Sockets that show 10.9.9.9 and fd00::1 are addresses of namespace 1.
    f.sockets.get_mut(&1).unwrap().extend([
        sock(Proto::Udp, "10.9.9.9:53000", "192.0.2.53:53", 5001),
        sock(Proto::Udp, "[fd00::1]:53000", "[fd00::53]:53", 5002),
    ]);
    let mut r = Resolver::new(f, Options::default());
    r.refresh(0, &[]);
    let mut c = vec![
        // A connection to the server whose accepted socket no pass saw.
        conn("tcp", "10.1.0.1:40100", "10.1.0.2:8080"),
        // UDP to the dual-stack [::]:5353 socket, over IPv4 and IPv6.
        conn("udp", "192.0.2.9:5353", "10.9.9.9:5353"),
        conn("udp", "[fd00::9]:5353", "[fd00::1]:5353"),
    ];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["process"], "fp-server");
    assert_eq!(c[0].src_tags["unattributed"], "no_socket");
    assert_eq!(c[1].dst_tags["process"], "mdns");
    assert_eq!(c[2].dst_tags["process"], "mdns");
    // An address no socket of the namespace ever used is not its.
    let mut c = vec![conn("udp", "192.0.2.9:5353", "10.9.9.10:5353")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["unattributed"], "remote");
    // The client side of a TCP port does not match a listener elsewhere.
    let mut c = vec![conn("tcp", "10.1.0.2:8080", "10.1.0.1:1")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["process"], "fp-server");
}

#[test]
fn a_server_socket_first_seen_in_time_wait_takes_the_listeners_owner() {
    let mut f = world();
    // The server answered and closed before any pass: only TIME_WAIT left.
    f.sockets
        .get_mut(&22)
        .unwrap()
        .push(sock(Proto::Tcp, "10.1.0.2:8080", "10.1.0.1:40900", 0));
    let mut r = Resolver::new(f, Options::default());
    r.refresh(0, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40900", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["process"], "fp-server");
    assert_eq!(c[0].dst_tags["netns"], "22");
}

#[test]
fn ipv4_mapped_socket_matches_an_ipv4_connection() {
    let mut f = world();
    f.sockets.get_mut(&22).unwrap().push(sock(
        Proto::Tcp,
        "[::ffff:10.1.0.2]:8443",
        "[::ffff:10.1.0.1]:40500",
        2002,
    ));
    f.fds.get_mut(&200).unwrap().push(2002);
    let mut r = Resolver::new(f, Options::default());
    r.refresh(0, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40500", "10.1.0.2:8443")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["pid"], "200");
}

#[test]
fn rules_name_services_before_the_environment() {
    let opts = Options {
        rules: vec![
            ServiceRule {
                port: Some(8080),
                service: "payments-api".into(),
                ..ServiceRule::default()
            },
            ServiceRule {
                container: Some("4f2d*".into()),
                service: "shop".into(),
                ..ServiceRule::default()
            },
        ],
        ..Options::default()
    };
    let mut r = Resolver::new(world(), opts);
    r.refresh(0, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["service"], "payments-api");
    assert_eq!(c[0].src_tags["service"], "shop");
}

#[test]
fn new_sockets_of_a_known_process_cost_one_fd_read() {
    let mut r = Resolver::new(world(), Options::default());
    r.refresh(0, &[]);
    // The first pass had to read every process of the client's namespace.
    assert!(r.host.fd_reads.contains(&100));
    r.host.fd_reads.clear();
    let f = &mut r.host;
    f.sockets
        .get_mut(&11)
        .unwrap()
        .push(sock(Proto::Tcp, "10.1.0.1:40001", "10.1.0.2:8080", 1003));
    f.fds.get_mut(&101).unwrap().push(1003);
    let st = r.refresh(1_000_000, &[]);
    assert_eq!(r.host.fd_reads, vec![101], "only the recent owner is read");
    assert_eq!(st.full_scans, 0);
    assert_eq!(st.attributed, 1);
    // Nothing new: no fd reads at all.
    r.host.fd_reads.clear();
    r.refresh(2_000_000, &[]);
    assert!(r.host.fd_reads.is_empty());
    // Namespaces are listed once per second, not per pass.
    assert_eq!(r.host.namespace_listings, 1);
}

#[test]
fn an_orphan_inode_is_not_searched_for_on_every_pass() {
    let mut f = world();
    f.sockets
        .get_mut(&22)
        .unwrap()
        .push(sock(Proto::Udp, "10.1.0.2:7000", "0.0.0.0:0", 2999));
    let mut r = Resolver::new(f, Options::default());
    let st = r.refresh(0, &[]);
    assert_eq!(st.full_scans, 3, "every namespace once: nothing was known");
    let st = r.refresh(1_000_000, &[]);
    assert_eq!(st.full_scans, 0);
    // The next listing (a new process may hold it) gives it one more look.
    let st = r.refresh(1_000_000_000, &[]);
    assert_eq!(r.host.namespace_listings, 2);
    assert_eq!(st.full_scans, 1);
    // Then it is given up.
    for t in 1..=20 {
        let st = r.refresh(1_000_000_000 + t * 100_000_000, &[]);
        assert_eq!(st.full_scans, 0);
    }
    assert_eq!(r.host.namespace_listings, 4, "once per second");
}

#[test]
fn processes_vanishing_mid_pass_are_not_errors() {
    let mut f = world();
    // Listed, but gone before its fds or status are read.
    f.namespaces[1].pids.insert(0, 999);
    f.procs.remove(&200);
    let mut r = Resolver::new(f, Options::default());
    let st = r.refresh(0, &[]);
    assert_eq!(st.errors, 0);
    assert!(r.take_error().is_none());
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["pid"], "101");
    assert_eq!(c[0].dst_tags["unattributed"], "no_process");
    // The process shows up readable again: the next pass attributes it.
    r.host
        .procs
        .insert(200, proc_info(200, "fp-server", String::new(), None));
    r.refresh(1_000_000, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags["pid"], "200");
}

#[test]
fn a_reused_tuple_takes_the_new_owner() {
    let mut r = Resolver::new(world(), Options::default());
    r.refresh(0, &[]);
    let f = &mut r.host;
    f.sockets.insert(
        11,
        vec![sock(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080", 1009)],
    );
    f.fds.insert(100, vec![1009]);
    f.fds.insert(101, vec![]);
    f.procs
        .insert(100, proc_info(100, "fp-other", String::new(), None));
    r.refresh(1_000_000, &[]);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["process"], "fp-other");
}

#[test]
fn the_same_tuple_in_two_namespaces_prefers_the_probes_own() {
    let mut f = world();
    // Loopback traffic in two namespaces with identical 5-tuples.
    f.sockets.get_mut(&11).unwrap().push(sock(
        Proto::Tcp,
        "127.0.0.1:50000",
        "127.0.0.1:6379",
        1100,
    ));
    f.sockets.get_mut(&22).unwrap().push(sock(
        Proto::Tcp,
        "127.0.0.1:50000",
        "127.0.0.1:6379",
        2100,
    ));
    f.fds.get_mut(&101).unwrap().push(1100);
    f.fds.get_mut(&200).unwrap().push(2100);
    for own in [11, 22] {
        let opts = Options {
            own_netns: Some(own),
            ..Options::default()
        };
        let mut r = Resolver::new(world_with(&f), opts);
        r.refresh(0, &[]);
        let mut c = vec![conn("tcp", "127.0.0.1:50000", "127.0.0.1:6379")];
        r.tag(&mut c);
        assert_eq!(c[0].src_tags["netns"], own.to_string());
        assert_eq!(c[0].dst_tags["unattributed"], "no_socket");
    }
}

fn world_with(f: &Fake) -> Fake {
    Fake {
        namespaces: f.namespaces.clone(),
        sockets: f.sockets.clone(),
        fds: f.fds.clone(),
        procs: f.procs.clone(),
        ..Fake::default()
    }
}

/// Dumps once, then only lookups of what the probe saw.
fn lookup_only() -> Options {
    Options {
        dumps_every_ns: u64::MAX,
        ..Options::default()
    }
}

fn ends(proto: Proto, a: &str, b: &str) -> Vec<Tuple> {
    Tuple::ends(proto, addr(a), addr(b)).to_vec()
}

#[test]
fn new_connections_are_found_by_lookup_in_any_namespace() {
    let mut f = world();
    // Nothing to dump at the start.
    let later_11 = f.sockets.insert(11, vec![]).unwrap();
    let later_22 = f.sockets.get(&22).unwrap().clone();
    f.sockets.insert(22, vec![later_22[0]]);
    let mut r = Resolver::new(f, lookup_only());
    r.refresh(0, &[]);
    assert_eq!(r.host.dumps, 3);
    // The connection appears; the probe reports its 5-tuple.
    r.host.sockets.insert(11, later_11);
    r.host.sockets.insert(22, later_22);
    let seen = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080");
    let st = r.refresh(1_000_000, &seen);
    assert_eq!(r.host.dumps, 3, "no dump between dumps_every_ns");
    assert_eq!(st.lookups, 2);
    assert_eq!(st.attributed, 2);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["process"], "fp-client");
    assert_eq!(c[0].dst_tags["process"], "fp-server");
    assert_eq!(c[0].dst_tags["netns"], "22");
    // Settled: the same tuples again cost nothing.
    let n = r.host.lookups;
    let st = r.refresh(2_000_000, &seen);
    assert_eq!((st.lookups, r.host.lookups), (0, n));
}

/// [`world`] with the server's connected socket still in the accept queue
/// (handshake done, no inode yet), and that socket as it is once accepted.
fn world_with_server_unaccepted() -> (Fake, SocketEntry) {
    let mut f = world();
    let accepted = f.sockets.get_mut(&22).unwrap().pop().unwrap();
    f.sockets.get_mut(&22).unwrap().push(SocketEntry {
        inode: 0,
        ..accepted
    });
    (f, accepted)
}

#[test]
fn a_socket_still_in_the_accept_queue_is_looked_up_again() {
    let (f, accepted) = world_with_server_unaccepted();
    let mut r = Resolver::new(f, lookup_only());
    let seen = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080");
    r.refresh(0, &seen);
    *r.host.sockets.get_mut(&22).unwrap().last_mut().unwrap() = accepted;
    let st = r.refresh(1_000_000, &seen);
    assert_eq!(st.lookups, 1, "only the server end was unsettled");
    assert_eq!(st.attributed, 1);
}

/// A caller that names each tuple once, when it is new: the resolver asks
/// again on its own until the socket is settled.
#[test]
fn an_unsettled_tuple_is_looked_up_again_without_being_named_again() {
    let (f, accepted) = world_with_server_unaccepted();
    let mut r = Resolver::new(f, lookup_only());
    r.refresh(0, &ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080"));
    *r.host.sockets.get_mut(&22).unwrap().last_mut().unwrap() = accepted;
    let st = r.refresh(1_000_000, &[]);
    assert_eq!((st.lookups, st.attributed), (1, 1));
    let st = r.refresh(2_000_000, &[]);
    assert_eq!(st.lookups, 0, "settled");
}

/// An owner as the kernel's record gives it (process `fp-recorded`).
fn recorded_owner() -> Arc<Owner> {
    Arc::new(Owner::new(
        &proc_info(105, "fp-recorded", String::new(), None),
        None,
        None,
    ))
}

/// What the recorded owners say: `owner` owns the end `t`, in namespace 11.
fn recorded_for(t: Tuple, owner: &Arc<Owner>) -> impl Fn(&Tuple) -> Option<Recorded> + Copy + '_ {
    move |x: &Tuple| {
        (*x == t).then(|| Recorded {
            owner: owner.clone(),
            netns: Some(11),
        })
    }
}

/// Tuples the caller names already (the kernel recorded their owner) are
/// not looked up (counted as skipped at each pass) and are named from the
/// record.
#[test]
fn named_tuples_are_not_looked_up() {
    let mut f = world();
    // Nothing to dump at the start: only lookups find these sockets.
    let later_11 = f.sockets.insert(11, vec![]).unwrap();
    let later_22 = f.sockets.insert(22, vec![]).unwrap();
    let mut r = Resolver::new(f, lookup_only());
    r.refresh(0, &[]);
    r.host.sockets.insert(11, later_11);
    r.host.sockets.insert(22, later_22);
    let seen = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080");
    let client = seen[0];
    let owner = recorded_owner();
    let recorded = recorded_for(client, &owner);
    let st = r.refresh_skipping(0, &seen, recorded, |_| false);
    assert_eq!((st.lookups, st.skipped), (1, 1));
    let st = r.refresh_skipping(1_000_000, &seen, recorded, |_| false);
    assert_eq!((st.lookups, st.skipped), (0, 1));
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag_recorded(&mut c, recorded);
    assert_eq!(c[0].dst_tags["process"], "fp-server");
    // Named from the record, with the tags a found socket gives.
    assert_eq!(c[0].src_tags["process"], "fp-recorded");
    assert_eq!(c[0].src_tags["netns"], "11");
}

#[test]
fn a_remote_end_on_a_listening_port_is_not_the_listener() {
    let mut r = Resolver::new(world(), lookup_only());
    // 10.1.0.2 talks to a web server elsewhere whose port is also 8080: the
    // local wildcard listener on 8080 must not claim that remote end.
    let seen = ends(Proto::Tcp, "10.1.0.2:41000", "198.51.100.1:8080");
    r.refresh(0, &seen);
    let mut c = vec![conn("tcp", "10.1.0.2:41000", "198.51.100.1:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].dst_tags, tags(&[("unattributed", "remote")]));
    // Given up after LOOKUP_TRIES passes.
    for t in 1..10 {
        r.refresh(t, &seen);
    }
    let n = r.host.lookups;
    r.refresh(100, &seen);
    assert_eq!(r.host.lookups, n);
}

#[test]
fn a_socket_of_a_process_newer_than_the_listing_is_found_in_the_same_pass() {
    let mut r = Resolver::new(world(), lookup_only());
    r.refresh(0, &[]);
    // A new client process starts in namespace 11 and connects at once.
    let f = &mut r.host;
    f.namespaces[1].pids.push(102);
    f.fds.insert(102, vec![1050]);
    f.procs
        .insert(102, proc_info(102, "fp-newcomer", String::new(), None));
    f.sockets
        .get_mut(&11)
        .unwrap()
        .push(sock(Proto::Tcp, "10.1.0.1:40777", "10.1.0.2:8080", 1050));
    let seen = ends(Proto::Tcp, "10.1.0.1:40777", "10.1.0.2:8080");
    r.refresh(1_000_000, &seen);
    assert_eq!(
        r.host.namespace_listings, 2,
        "listed again for the unknown inode"
    );
    let mut c = vec![conn("tcp", "10.1.0.1:40777", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["process"], "fp-newcomer");
}

#[test]
fn lack_of_privilege_is_counted_not_reported() {
    let mut f = world();
    f.forbidden.push(100);
    let mut r = Resolver::new(f, Options::default());
    let st = r.refresh(0, &[]);
    assert_eq!(st.errors, 0);
    assert!(r.take_error().is_none());
    assert!(r.denied > 0);
    // The others are still read.
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag(&mut c);
    assert_eq!(c[0].src_tags["pid"], "101");
}

/// What the resolver remembers follows the connections: a retired one's
/// sockets are forgotten at once, any other socket once it has not been
/// seen for `forget_after_ns`; a socket that still exists is found again.
#[test]
fn remembered_sockets_are_bounded_by_forget_and_age() {
    let s = 1_000_000_000;
    let opts = Options {
        dumps_every_ns: 10 * s,
        forget_after_ns: 60 * s,
        ..Options::default()
    };
    let mut r = Resolver::new(world(), opts);
    let seen = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080");
    r.refresh(0, &seen);
    let with_all = r.remembered();
    assert!(with_all >= 2, "{with_all}");
    // The connection is retired: its two ends go.
    r.forget(&seen);
    assert!(r.remembered() < with_all);
    // Its sockets still exist, so a dump finds them again; once they are
    // gone (closed), they age out after forget_after_ns.
    r.refresh(10 * s, &[]);
    assert!(r.remembered() > 0);
    r.host.sockets.values_mut().for_each(Vec::clear);
    r.refresh(20 * s, &[]);
    assert!(r.remembered() > 0, "not yet: seen 10 s ago");
    r.refresh(80 * s, &[]);
    assert_eq!(r.remembered(), 0);
}

/// A dump that meets a socket the kernel recorded keeps nothing of it and
/// reads no process for it: the record names that end.
#[test]
fn dumps_leave_recorded_sockets_to_their_record() {
    let client = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080")[0];
    let owner = recorded_owner();
    let recorded = recorded_for(client, &owner);
    let mut plain = Resolver::new(world(), Options::default());
    let all = plain.refresh(0, &[]);
    let mut r = Resolver::new(world(), Options::default());
    let st = r.refresh_skipping(0, &[], recorded, |_| false);
    // The client's socket is neither remembered nor searched for.
    assert_eq!(r.remembered() + 1, plain.remembered());
    assert_eq!(st.attributed + 1, all.attributed);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    r.tag_recorded(&mut c, recorded);
    assert_eq!(c[0].src_tags["process"], "fp-recorded");
    assert_eq!(c[0].src_tags["netns"], "11");
    assert_eq!(c[0].dst_tags["process"], "fp-server");
}

/// A dump that meets the socket of an end the listing holds named keeps
/// nothing of it and reads no process for it; an end that comes with a
/// `pid` (kept from the last reading) is left as it is.
#[test]
fn dumps_leave_settled_ends_alone_and_tags_keep_a_pid() {
    let client = ends(Proto::Tcp, "10.1.0.1:40000", "10.1.0.2:8080")[0];
    let mut plain = Resolver::new(world(), Options::default());
    let all = plain.refresh(0, &[]);
    let opts = Options {
        dumps_every_ns: 10,
        ..Options::default()
    };
    let mut r = Resolver::new(world(), opts);
    assert!(r.dump_due(0));
    let st = r.refresh_skipping(0, &[], |_| None, |t| *t == client);
    assert!(!r.dump_due(9) && r.dump_due(10));
    assert_eq!(r.remembered() + 1, plain.remembered());
    assert_eq!(st.attributed + 1, all.attributed);
    let mut c = vec![conn("tcp", "10.1.0.1:40000", "10.1.0.2:8080")];
    c[0].src_tags.insert("pid".into(), "7".into());
    r.tag(&mut c);
    assert_eq!(c[0].src_tags.len(), 1, "{:?}", c[0].src_tags);
    assert_eq!(c[0].dst_tags["process"], "fp-server");
    // Seen again (the source lists every key now and then): not looked up.
    let st = r.refresh_skipping(5, &[client], |_| None, |t| *t == client);
    assert_eq!((st.lookups, st.skipped), (0, 1));
}
