//! A container host with NAT, in namespaces: a bridge in the "host"
//! namespace with two "containers" on veths into it, an "uplink" veth from
//! the host into an "outside" namespace, the containers' traffic to the
//! outside MASQUERADEd to the uplink's address, a port of the uplink
//! published to container 2 (DNAT 8080 → 5001), and a Kubernetes-style
//! Service: a ClusterIP that container 1 connects to, DNATed to container
//! 2 (with `bridge-nf-call-iptables`, as kubelet sets it, so that the
//! bridged answer is translated back). `flowprobe run` on its
//! defaults in the host namespace attaches to every interface: a
//! container-to-outside packet crosses the container's bridge port and the
//! bridge before the translation and the uplink after it; a published-port
//! packet the uplink before and the bridge and the container's port after;
//! a ClusterIP packet the client's port and the bridge before, the bridge
//! and the server's port after.
//! Every connection must come out once, under its original tuple, with the
//! other side's addresses as `nat.ip`/`nat.port` tags of the end the
//! translation changed, and each direction counted once and exactly:
//! `bytes − retransmitted_bytes` = what the application wrote,
//! `retransmits` = the sender's `tcpi_total_retrans` (every 13th large
//! packet dropped in each receiver's INPUT chain).

use std::fs;
use std::path::Path;

use serde_json::Value;

use super::against_tcp_info;
use crate::common::json_lines;
use crate::common::root::{
    conn_args, enabled, netns_inode, sh, spawn_flowprobe, tc_attached, tcpapp_exchange,
    tcpapp_exchange_via, truth, wait_for, wait_for_rings, BridgeHost, Namespace, Procs, Uplink,
};

const BRIDGE: &str = "fpnbr0";
const UPLINK: &str = "fpnup0";
const HOST: &str = "10.92.0.1";
const C1: &str = "10.92.0.2";
const C2: &str = "10.92.0.3";
/// The host's address on the uplink (TEST-NET-1), and the outside's.
const HOST_UP: &str = "192.0.2.1";
const OUT: &str = "192.0.2.2";
const PUBLISHED: u16 = 8080;
/// The Service's ClusterIP and port, DNATed to container 2's port 5001.
const CLUSTER_IP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;

/// (client port, client writes, server writes) per path.
const MASQ: [(u16, u64, u64); 3] = [
    (40100, 600_000, 200_000),
    (40101, 1_500_000, 50_000),
    (40102, 100_000, 900_000),
];
const DNAT: [(u16, u64, u64); 3] = [
    (40110, 700_000, 300_000),
    (40111, 50_000, 1_200_000),
    (40112, 1_000_000, 1_000_000),
];
const SERVICE: [(u16, u64, u64); 2] = [(40130, 400_000, 600_000), (40131, 900_000, 80_000)];
const BRIDGED: [(u16, u64, u64); 2] = [(40120, 800_000, 100_000), (40121, 60_000, 700_000)];
/// A UDP exchange through the MASQUERADE: client port, datagrams.
const UDP: (u16, u64) = (41100, 20);

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

fn tag<'a>(c: &'a Value, side: &str, key: &str) -> Option<&'a str> {
    c[format!("{side}_tags")][key].as_str()
}

/// One path's connections: from `ca` to `sa` port `sp` as the client sent
/// them, each once in `out`, both directions equal to the sockets'
/// `TCP_INFO` in `dir`, the translated end tagged with `nat`: (`src` or
/// `dst`, its address beyond the translation, its port there (0: the
/// client's own port)).
fn check_once(
    out: &[Value],
    raw: &str,
    dir: &Path,
    conns: &[(u16, u64, u64)],
    (ca, sa, sp): (&str, &str, u16),
    nat: Option<(&str, &str, u16)>,
) {
    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
    let mut failures = Vec::new();
    for &(port, c_bytes, s_bytes) in conns {
        // Under any tuple: the client's port is in every view of it.
        let recs: Vec<&Value> = out
            .iter()
            .filter(|c| c["proto"] == "tcp" && (c["sport"] == port || c["dport"] == port))
            .collect();
        assert_eq!(
            recs.len(),
            1,
            "port {port}: {} records in\n{raw}",
            recs.len()
        );
        let r = recs[0];
        assert_eq!(
            (
                r["src"].as_str(),
                n(&r["sport"]),
                r["dst"].as_str(),
                n(&r["dport"])
            ),
            (Some(ca), u64::from(port), Some(sa), u64::from(sp)),
            "the original tuple: {r}"
        );
        match nat {
            Some((side, ip, nport)) => {
                let nport = if nport == 0 { port } else { nport };
                assert_eq!(
                    (tag(r, side, "nat.ip"), tag(r, side, "nat.port")),
                    (Some(ip), Some(nport.to_string().as_str())),
                    "{side} beyond the translation: {r}"
                );
                let other = if side == "src" { "dst" } else { "src" };
                assert_eq!(tag(r, other, "nat.ip"), None, "{r}");
            }
            None => {
                assert_eq!(
                    (tag(r, "src", "nat.ip"), tag(r, "dst", "nat.ip")),
                    (None, None),
                    "{r}"
                )
            }
        }
        failures.extend(against_tcp_info(
            r,
            (&client, &server),
            (port, c_bytes, s_bytes),
            ca,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The NAT tests use the same addresses (and attribution looks at every
/// namespace of the host, where the same 5-tuple in two test hosts is
/// ambiguous): one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn nat_masquerade_and_dnat_are_one_connection_each() {
    if !enabled("live_tc") {
        return;
    }
    let _one = one_at_a_time();
    natted("tc");
}

/// The AF_PACKET backend sees the same views and undoes the same NAT.
#[test]
fn nat_masquerade_and_dnat_are_one_connection_each_by_afpacket() {
    if !enabled("live_tc") {
        return;
    }
    let _one = one_at_a_time();
    natted("afpacket");
}

/// The container host's namespaces (deleted on drop), the Service's
/// ClusterIP, and a process in each "container" and the outside (stopped
/// first).
struct ContainerHost {
    _procs: Procs,
    host: Namespace,
    c1: Namespace,
    c2: Namespace,
    outside: Namespace,
}

impl ContainerHost {
    fn build(tag: &str, dir: &Path) -> ContainerHost {
        let t = BridgeHost::build(
            ("fpnat", &format!("{tag}-")),
            BRIDGE,
            (HOST, ["fpnp1", "fpnp2"], [C1, C2]),
            Some(Uplink {
                dev: UPLINK,
                host_ip: HOST_UP,
                outside_ip: OUT,
                containers: "10.92.0.0/24",
                published: PUBLISHED,
            }),
        );
        let outside = t.outside.expect("built with an uplink");
        // The Service: what kube-proxy writes for a ClusterIP (iptables
        // mode); the bridge already passes frames between its ports
        // through netfilter, as kubelet sets it.
        let svc = SERVICE_PORT.to_string();
        let to = format!("{C2}:5001");
        sh(&[
            "ip",
            "netns",
            "exec",
            &t.host.name,
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            CLUSTER_IP,
            "-p",
            "tcp",
            "--dport",
            &svc,
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ]);
        // A container lives before it serves: a process in each namespace from
        // the start (attribution lists the namespaces with processes once a
        // second, and one that appeared with its first connection is missed).
        let mut procs = Procs::default();
        for ns in [&t.c1.name, &t.c2.name, &outside.name] {
            procs.spawn(ns, ns, &["sleep", "600"], &dir.join(ns));
        }
        ContainerHost {
            _procs: procs,
            host: t.host,
            c1: t.c1,
            c2: t.c2,
            outside,
        }
    }
}

fn natted(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ch = ContainerHost::build(backend, dir.path());
    let (h, c1, c2, outside) = (ch.host.name.as_str(), &ch.c1, &ch.c2, &ch.outside);

    let args = ["run", "--format", "json", "--backend", backend];
    let mut probe = spawn_flowprobe(h, &[], &args, dir.path(), "probe");
    if backend == "tc" {
        wait_for(
            "flowprobe to attach to the bridge, its ports and the uplink",
            || {
                ["fpnp1", "fpnp2", BRIDGE, UPLINK]
                    .iter()
                    .all(|d| tc_attached(h, d, "egress"))
            },
        );
    } else {
        wait_for_rings(h, 1);
    }

    // Container 1 to the outside, through the MASQUERADE (TCP and UDP).
    let masq = dir.path().join("masq");
    fs::create_dir(&masq).unwrap();
    // Each connection stays open 2.5 s after its data (no keepalive
    // probe within it), so that attribution sees both sockets: the
    // responder's is looked up beyond the translation.
    let pause = ["--keepalive", "30:30:2.5"];
    let mut args = conn_args(&MASQ);
    args.extend(["--udp".to_owned(), format!("{}:{}", UDP.0, UDP.1)]);
    tcpapp_exchange_via(
        (&c1.name, C1, None, &pause),
        (&outside.name, OUT),
        &masq,
        &args,
    );
    // The outside to the published port, translated to container 2.
    let dnat = dir.path().join("dnat");
    fs::create_dir(&dnat).unwrap();
    tcpapp_exchange_via(
        (&outside.name, OUT, Some((HOST_UP, PUBLISHED)), &pause),
        (&c2.name, C2),
        &dnat,
        &conn_args(&DNAT),
    );
    // Container 1 to the Service, translated to container 2.
    let service = dir.path().join("service");
    fs::create_dir(&service).unwrap();
    tcpapp_exchange_via(
        (&c1.name, C1, Some((CLUSTER_IP, SERVICE_PORT)), &pause),
        (&c2.name, C2),
        &service,
        &conn_args(&SERVICE),
    );
    // Container to container: bridged, no translation.
    let bridged = dir.path().join("bridged");
    fs::create_dir(&bridged).unwrap();
    tcpapp_exchange(&c1.name, C1, &c2.name, C2, &bridged, &conn_args(&BRIDGED));

    sh(&["kill", "-INT", &probe.id().to_string()]);
    let st = probe.wait().unwrap();
    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe run failed: {err}");
    eprintln!("{err}");
    let raw = fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let out = json_lines(&raw);

    check_once(
        &out,
        &raw,
        &masq,
        &MASQ,
        (C1, OUT, 5001),
        Some(("src", HOST_UP, 0)),
    );
    check_once(
        &out,
        &raw,
        &dnat,
        &DNAT,
        (OUT, HOST_UP, PUBLISHED),
        Some(("dst", C2, 5001)),
    );
    check_once(
        &out,
        &raw,
        &service,
        &SERVICE,
        (C1, CLUSTER_IP, SERVICE_PORT),
        Some(("dst", C2, 5001)),
    );
    check_once(&out, &raw, &bridged, &BRIDGED, (C1, C2, 5001), None);
    // Each responder's socket is found beyond the translation, in its own
    // namespace: the outside's server (it sees the uplink's address), and
    // container 2's behind the published port. (Its process is
    // attribution's business, tested elsewhere.)
    for (conns, ns) in [
        (&MASQ[..], &outside.name),
        (&DNAT[..], &c2.name),
        (&SERVICE[..], &c2.name),
    ] {
        let want = netns_inode(ns).unwrap().to_string();
        for (port, _, _) in conns {
            let r = out.iter().find(|c| c["sport"] == *port).unwrap();
            assert_eq!(tag(r, "dst", "netns"), Some(want.as_str()), "{r}");
        }
    }
    // UDP through the MASQUERADE: once, each datagram once each way.
    let u: Vec<&Value> = out
        .iter()
        .filter(|c| c["proto"] == "udp" && (c["sport"] == UDP.0 || c["dport"] == UDP.0))
        .collect();
    assert_eq!(u.len(), 1, "UDP records in\n{raw}");
    assert_eq!(
        (u[0]["src"].as_str(), tag(u[0], "src", "nat.ip")),
        (Some(C1), Some(HOST_UP)),
        "{}",
        u[0]
    );
    for d in ["sent", "received"] {
        assert_eq!(n(&u[0][d]["packets"]), UDP.1, "UDP {d}: {}", u[0]);
    }
    // The copies after the translation were seen, and said.
    assert!(
        err.contains("packets seen again after the translation"),
        "{err}"
    );
    let translated = MASQ.len() + DNAT.len() + SERVICE.len() + 1;
    assert!(
        err.contains(&format!("{translated} translated by NAT on this host")),
        "{err}"
    );
    assert!(!err.contains("NAT unresolved"), "{err}");
}

/// Without CAP_NET_ADMIN (`--backend afpacket` needs CAP_NET_RAW only)
/// conntrack cannot be read: the translated connections are listed once
/// per tuple, as the interfaces saw them, and the output says so.
#[test]
fn nat_unresolved_without_cap_net_admin_is_said() {
    if !enabled("live_tc") {
        return;
    }
    let _one = one_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let ch = ContainerHost::build("noadmin", dir.path());
    let h = ch.host.name.as_str();
    let caps = "-all,+net_raw";
    let prefix = [
        "setpriv",
        "--inh-caps",
        caps,
        "--ambient-caps",
        caps,
        "--bounding-set",
        caps,
        "--",
    ];
    let args = ["run", "--format", "json", "--backend", "afpacket"];
    let mut probe = spawn_flowprobe(h, &prefix, &args, dir.path(), "probe");
    wait_for_rings(h, 1);
    let masq = dir.path().join("masq");
    fs::create_dir(&masq).unwrap();
    tcpapp_exchange(
        &ch.c1.name,
        C1,
        &ch.outside.name,
        OUT,
        &masq,
        &conn_args(&MASQ),
    );
    sh(&["kill", "-INT", &probe.id().to_string()]);
    let st = probe.wait().unwrap();
    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe run failed: {err}");
    eprintln!("{err}");
    let raw = fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let out = json_lines(&raw);
    for (port, c_bytes, _) in MASQ {
        // Before the translation (the container's address) and after it
        // (the uplink's): one record each, neither tagged.
        let mut srcs: Vec<&str> = out
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["sport"] == port)
            .map(|c| {
                assert_eq!(tag(c, "src", "nat.ip"), None, "{c}");
                assert_eq!(
                    n(&c["sent"]["bytes"]) - n(&c["sent"]["retransmitted_bytes"]),
                    c_bytes,
                    "{c}"
                );
                c["src"].as_str().unwrap()
            })
            .collect();
        srcs.sort();
        assert_eq!(srcs, [C1, HOST_UP], "port {port} in\n{raw}");
    }
    assert!(
        err.contains("flowprobe: NAT: cannot read conntrack over netlink"),
        "{err}"
    );
    assert!(err.contains("NAT unresolved for"), "{err}");
}
