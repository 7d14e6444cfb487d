//! `flowprobe run --backend afpacket` on a live veth (root).
//!
//! Two fresh network namespaces joined by a veth, offloads on (so both
//! AF_PACKET and tc see GSO super-packets at the sender), loss induced in
//! each receiver's INPUT chain (`iptables -m statistic`), downstream of
//! every probe. In each namespace `flowprobe run --backend afpacket` and
//! `flowprobe run --backend tc` run at the same time while
//! `fixtures/capture/tcpapp.py` drives several TCP connections in parallel
//! and records every socket's `TCP_INFO`. For every connection and
//! direction, at the sending side: afpacket and tc agree on `bytes`,
//! `retransmits` and `retransmitted_bytes`, and both equal the socket's
//! truth (`bytes − retransmitted_bytes` = written, `retransmits` =
//! `tcpi_total_retrans`, `retransmitted_bytes` = `tcpi_bytes_retrans`); at
//! the receiving side both see every byte sent and the same packets. At
//! the sender every counter, `packets` included, is the same in both (a
//! GSO super-packet counts its wire segments in both: `gso_segs` at tc,
//! the virtio-net header's `gso_size` at AF_PACKET). The kernel dropped
//! nothing from the rings, and no connection was split across rings.
//!
//! Also: with CAP_BPF and CAP_SYS_ADMIN taken away, `flowprobe run` (auto)
//! says in one line that it cannot use eBPF and counts with AF_PACKET,
//! correctly; `--backend tc` fails instead. On loopback, where AF_PACKET
//! sees every packet twice, each counts once. `--iface` follows a named
//! interface created again. UDP connections that the fanout splits across
//! rings (first fragments hash by address only) are merged whole.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` (the root tier of
//! `scripts/test.sh`, after building the eBPF object); otherwise skipped
//! with a message. Set but not root: skipped, or a failure when `CI=true`.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Child, Command};

use common::json_lines;
use common::root::{
    conn_args, drop_in_input, enabled, record, sh, sh_out, tcpapp_exchange, veth_pair, wait_for,
    KillOnDrop, Netns, LO_EXCHANGE,
};
use serde_json::Value;

const VETH_A: &str = "fpa0";
const VETH_B: &str = "fpa1";

/// The namespaces, a veth between them, and every 13th large TCP packet
/// dropped in each receiver's INPUT chain. Returns the client's and the
/// server's address.
fn setup(tag: &str, v6: bool) -> (Netns, &'static str, &'static str) {
    let ns = Netns::create("fpa", tag);
    let (ca, sa) = add_veth(&ns, v6);
    let ipt = if v6 { "ip6tables" } else { "iptables" };
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, ipt);
    }
    (ns, ca, sa)
}

/// The veth between the namespaces, addressed and up.
fn add_veth(ns: &Netns, v6: bool) -> (&'static str, &'static str) {
    let (ca, sa, plen) = if v6 {
        ("fd78::1", "fd78::2", "64")
    } else {
        ("10.80.0.1", "10.80.0.2", "24")
    };
    veth_pair(ns, VETH_A, VETH_B, ca, sa, plen);
    (ca, sa)
}

fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = sh_out(&["ip", "-n", ns, "-o", "link", "show", dev]);
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// The classic BPF filters of the packet sockets in `ns` (`ss -0 -b`).
fn packet_filters(ns: &str) -> Vec<String> {
    sh_out(&["ip", "netns", "exec", ns, "ss", "-0", "-b", "-n"])
        .lines()
        .filter(|l| l.contains("bpf filter"))
        .map(str::to_owned)
        .collect()
}

/// (client port, client writes, server writes): several in parallel.
const CONNS: [(u16, u64, u64); 4] = [
    (41000, 600_000, 200_000),
    (41001, 2_000_000, 50_000),
    (41002, 100_000, 900_000),
    (41003, 1_000_000, 1_000_000),
];

/// `prefix flowprobe run ARGS --format json` inside `ns`; output in
/// `dir/TAG.json`, stderr in `dir/TAG.err`.
fn spawn_flowprobe(ns: &str, prefix: &[&str], args: &[&str], dir: &Path, tag: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_flowprobe"))
            .arg("run")
            .args(args)
            .args(["--format", "json"])
            .stdout(fs::File::create(dir.join(format!("{tag}.json"))).unwrap())
            .stderr(fs::File::create(dir.join(format!("{tag}.err"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// Waits until the ring sockets of one afpacket run in `ns` are bound
/// (`/proc/net/packet`: protocol 0003 = ETH_P_ALL, running).
fn wait_for_rings(ns: &str, runs: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    wait_for("the AF_PACKET rings", || {
        let t = sh_out(&["ip", "netns", "exec", ns, "cat", "/proc/net/packet"]);
        let bound = t
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(3) == Some(&"0003") && f.get(5) == Some(&"1")
            })
            .count();
        bound >= cpus * runs
    });
}

fn tc_attached(ns: &str, dev: &str) -> bool {
    sh_out(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "egress",
    ])
    .contains(probe_common::contract::TC_PROGRAM)
}

fn traffic(ns: &Netns, ca: &str, sa: &str, dir: &Path) {
    tcpapp_exchange(&ns.a, ca, &ns.b, sa, dir, &conn_args(&CONNS));
}

/// Stops a probe with SIGINT and returns its (JSON lines, raw output,
/// stderr), after checking it exited well.
fn finish(p: &mut Child, dir: &Path, tag: &str) -> (Vec<Value>, String, String) {
    // `ip netns exec` execs flowprobe (and setpriv execs it too), so the
    // child's pid is flowprobe's.
    sh(&["kill", "-INT", &p.id().to_string()]);
    outcome(p, dir, tag)
}

/// Waits for a probe to exit and returns its (JSON lines, raw output,
/// stderr), after checking it exited well.
fn outcome(p: &mut Child, dir: &Path, tag: &str) -> (Vec<Value>, String, String) {
    let st = p.wait().unwrap();
    let err = fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap();
    assert!(st.success(), "flowprobe ({tag}) failed: {err}");
    let out = fs::read_to_string(dir.join(format!("{tag}.json"))).unwrap();
    eprintln!("{tag}: {}", err.trim());
    (json_lines(&out), out, err)
}

/// The kernel's drop count from an afpacket summary line.
fn kernel_drops(err: &str) -> u64 {
    let line = err
        .lines()
        .find(|l| l.contains("backend afpacket"))
        .unwrap_or_else(|| panic!("no afpacket summary line in: {err}"));
    let (_, rest) = line
        .split_once("packets, ")
        .unwrap_or_else(|| panic!("no kernel counts in: {line}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn truth(dir: &Path, side: &str) -> Value {
    serde_json::from_str(&fs::read_to_string(dir.join(format!("{side}.json"))).unwrap()).unwrap()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// (bytes, retransmits, retransmitted_bytes) of one direction.
fn counts(d: &Value) -> (u64, u64, u64) {
    (
        n(&d["bytes"]),
        n(&d["retransmits"]),
        n(&d["retransmitted_bytes"]),
    )
}

/// afpacket and tc side by side in both namespaces, against TCP_INFO.
fn parity(v6: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ns, ca, sa) = setup(if v6 { "v6" } else { "v4" }, v6);
    // The client side with every interface (ifindex-0 binding, lo
    // included), the server side with --iface (the kernel filter).
    let mut probes = vec![
        (
            spawn_flowprobe(&ns.a, &[], &["--backend", "afpacket"], dir, "afp-client"),
            "afp-client",
        ),
        (
            spawn_flowprobe(&ns.a, &[], &["--backend", "tc"], dir, "tc-client"),
            "tc-client",
        ),
        (
            spawn_flowprobe(
                &ns.b,
                &[],
                &["--backend", "afpacket", "--iface", VETH_B],
                dir,
                "afp-server",
            ),
            "afp-server",
        ),
        (
            spawn_flowprobe(
                &ns.b,
                &[],
                &["--backend", "tc", "--iface", VETH_B],
                dir,
                "tc-server",
            ),
            "tc-server",
        ),
    ];
    wait_for_rings(&ns.a, 1);
    wait_for_rings(&ns.b, 1);
    wait_for("the tc probes to attach", || {
        tc_attached(&ns.a, VETH_A) && tc_attached(&ns.b, VETH_B)
    });
    traffic(&ns, ca, sa, dir);
    let mut outs = std::collections::HashMap::new();
    for (p, tag) in &mut probes {
        outs.insert(*tag, finish(p, dir, tag));
    }
    for tag in ["afp-client", "afp-server"] {
        let err = &outs[tag].2;
        assert_eq!(kernel_drops(err), 0, "{tag}: kernel drops: {err}");
        assert!(
            !err.contains("merged across rings"),
            "{tag}: a TCP connection was split across rings: {err}"
        );
    }
    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
    let rec = |tag: &str, port: u16| -> Value {
        let (conns, out, _) = &outs[tag];
        record(conns, port, ca, sa, out).clone()
    };
    let mut failures = Vec::new();
    let mut total_retrans = 0;
    for (port, c_bytes, s_bytes) in CONNS {
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        assert_eq!(ct["app_bytes_written"], c_bytes);
        assert_eq!(st["app_bytes_written"], s_bytes);
        // (direction, sender's truth, written, the sender's namespace,
        // the receiver's, and which half of the record is this direction)
        for (way, t, written, at_sender, at_receiver, half) in [
            ("client->server", ct, c_bytes, "client", "server", "sent"),
            (
                "server->client",
                st,
                s_bytes,
                "server",
                "client",
                "received",
            ),
        ] {
            let want = (
                n(&t["tcpi_bytes_sent"]),
                n(&t["tcpi_total_retrans"]),
                n(&t["tcpi_bytes_retrans"]),
            );
            total_retrans += want.1;
            let afp = rec(&format!("afp-{at_sender}"), port);
            let tc = rec(&format!("tc-{at_sender}"), port);
            let (afp_s, tc_s) = (counts(&afp[half]), counts(&tc[half]));
            let afp_r = rec(&format!("afp-{at_receiver}"), port);
            let tc_r = rec(&format!("tc-{at_receiver}"), port);
            eprintln!(
                "port {port} {way}: (bytes, retransmits, retx_bytes) at the sender: afpacket {afp_s:?}, tc {tc_s:?}, \
                 TCP_INFO {want:?}; packets afpacket {} tc {}; at the receiver: afpacket {:?}, tc {:?}",
                afp[half]["packets"],
                tc[half]["packets"],
                counts(&afp_r[half]),
                counts(&tc_r[half]),
            );
            if afp_s != want || tc_s != want || afp_s.0 - afp_s.2 != written {
                failures.push(format!(
                    "port {port} {way} at the sender: afpacket {afp_s:?}, tc {tc_s:?}, TCP_INFO {want:?}, written {written}"
                ));
            }
            // Every counter, packets included: the virtio-net header's
            // gso_size makes a super-packet count its wire segments.
            if afp[half] != tc[half] {
                failures.push(format!(
                    "port {port} {way} at the sender: afpacket {} != tc {}",
                    afp[half], tc[half]
                ));
            }
            // Before the INPUT-chain loss, every byte sent passes the
            // receiver's taps (its retransmit count depends on how veth
            // orders one socket's packets across CPUs; see live_tc.rs).
            let at_r = |r: &Value| (n(&r[half]["bytes"]), n(&r[half]["packets"]));
            let (afp_rb, tc_rb) = (at_r(&afp_r), at_r(&tc_r));
            if afp_rb != tc_rb || afp_rb.0 != want.0 {
                failures.push(format!(
                    "port {port} {way} at the receiver: (bytes, packets) afpacket {afp_rb:?}, tc {tc_rb:?}, bytes sent {}",
                    want.0
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        total_retrans > 0,
        "the loss scenario produced no retransmissions"
    );
}

#[test]
fn ipv4_afpacket_equals_tc_and_tcp_info() {
    if !enabled("live_afpacket") {
        return;
    }
    parity(false);
}

#[test]
fn ipv6_afpacket_equals_tc_and_tcp_info() {
    if !enabled("live_afpacket") {
        return;
    }
    parity(true);
}

/// Runs flowprobe without the capabilities eBPF needs, keeping CAP_NET_RAW
/// (and CAP_NET_ADMIN, so that only eBPF itself is missing).
const NO_BPF: [&str; 4] = [
    "setpriv",
    "--inh-caps=-bpf,-sys_admin,-perfmon",
    "--bounding-set=-bpf,-sys_admin,-perfmon",
    "--",
];

#[test]
fn auto_falls_back_to_afpacket_without_bpf_capabilities() {
    if !enabled("live_afpacket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ns, ca, sa) = setup("fb", false);

    // --backend tc: an error, no fallback.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.a])
        .args(NO_BPF)
        .arg(env!("CARGO_BIN_EXE_flowprobe"))
        .args(["run", "--backend", "tc", "--duration", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tc without CAP_BPF ran: {err}");
    assert!(!err.contains("AF_PACKET"), "tc fell back: {err}");

    let mut p = spawn_flowprobe(&ns.a, &NO_BPF, &["--iface", VETH_A], dir, "auto");
    wait_for_rings(&ns.a, 1);
    traffic(&ns, ca, sa, dir);
    let (conns, out, err) = finish(&mut p, dir, "auto");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "one fallback line and the summary: {err}");
    assert!(
        lines[0].starts_with("flowprobe: cannot use eBPF (")
            && lines[0].ends_with("); counting with AF_PACKET instead"),
        "fallback line: {}",
        lines[0]
    );
    assert!(
        lines[1].contains("(backend afpacket,"),
        "summary: {}",
        lines[1]
    );
    assert_eq!(kernel_drops(&err), 0);
    assert!(
        !sh_out(&["ip", "netns", "exec", &ns.a, "tc", "qdisc", "show", "dev", VETH_A])
            .contains("clsact"),
        "a clsact qdisc was added"
    );

    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
    let mut total_retrans = 0;
    for (port, c_bytes, _) in CONNS {
        let r = record(&conns, port, ca, sa, &out);
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        total_retrans += n(&ct["tcpi_total_retrans"]);
        let sent = counts(&r["sent"]);
        assert_eq!(
            (sent, sent.0 - sent.2, n(&r["received"]["bytes"])),
            (
                (
                    n(&ct["tcpi_bytes_sent"]),
                    n(&ct["tcpi_total_retrans"]),
                    n(&ct["tcpi_bytes_retrans"])
                ),
                c_bytes,
                n(&st["tcpi_bytes_sent"])
            ),
            "port {port}: ((bytes, retransmits, retx_bytes) sent, written, bytes received)"
        );
    }
    assert!(total_retrans > 0, "no retransmissions client->server");
}

/// On lo, AF_PACKET sees each packet leave and come back: it counts once,
/// with no false retransmission; `--interval` snapshots work.
#[test]
fn loopback_counts_each_packet_once() {
    if !enabled("live_afpacket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ns = Netns::create("fpa", "lo");
    let mut p = spawn_flowprobe(
        &ns.a,
        &[],
        &["--backend", "afpacket", "--interval", "0.2"],
        dir,
        "lo",
    );
    wait_for_rings(&ns.a, 1);
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.a, "python3", "-c", LO_EXCHANGE])
        .status()
        .unwrap();
    assert!(st.success(), "the loopback exchange failed");
    let snapshot_file = dir.join("lo.json");
    wait_for("a snapshot with the exchange", || {
        fs::read_to_string(&snapshot_file).is_ok_and(|s| s.contains("\"dport\":5555"))
    });
    let (lines, out, _) = finish(&mut p, dir, "lo");
    let last: Vec<&Value> = lines
        .iter()
        .filter(|c| c.get("snapshot").is_none())
        .collect();
    assert_eq!(last.len(), 1, "one connection:\n{out}");
    let r = last[0];
    assert_eq!(
        [
            &r["src"],
            &r["sent"]["bytes"],
            &r["received"]["bytes"],
            &r["sent"]["retransmits"],
            &r["received"]["retransmits"],
            &r["iface"],
        ],
        [
            &Value::from("127.0.0.1"),
            &Value::from(3000),
            &Value::from(700),
            &Value::from(0),
            &Value::from(0),
            &Value::from(1),
        ],
        "loopback {r}"
    );
}

/// With --iface, a named interface deleted and created again (new index)
/// is followed: the rings' filter takes the new index, and its traffic is
/// counted.
#[test]
fn iface_follows_a_named_interface_created_again() {
    if !enabled("live_afpacket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ns, _, _) = setup("re", false);
    let old = ifindex(&ns.a, VETH_A);
    let mut p = spawn_flowprobe(
        &ns.a,
        &[],
        &["--backend", "afpacket", "--iface", VETH_A],
        dir,
        "re",
    );
    wait_for_rings(&ns.a, 1);
    // `jeq #ifindex` in the filter (ss prints `0x15 jt jf k`).
    let has = |index: u32| {
        let f = packet_filters(&ns.a);
        !f.is_empty() && f.iter().all(|l| l.contains(&format!("0x15 1 0 {index},")))
    };
    assert!(has(old), "filters: {:?}", packet_filters(&ns.a));
    sh(&["ip", "-n", &ns.a, "link", "del", VETH_A]);
    let (ca, sa) = add_veth(&ns, false);
    let new = ifindex(&ns.a, VETH_A);
    assert_ne!(old, new);
    wait_for("the filter to follow the new index", || has(new));
    traffic(&ns, ca, sa, dir);
    let (conns, out, _) = finish(&mut p, dir, "re");
    let client = truth(dir, "client");
    for (port, c_bytes, _) in CONNS {
        let r = record(&conns, port, ca, sa, &out);
        let ct = &client["tcp"][port.to_string()];
        let sent = counts(&r["sent"]);
        assert_eq!(
            (n(&r["iface"]), sent.0 - sent.2, sent),
            (
                u64::from(new),
                c_bytes,
                (
                    n(&ct["tcpi_bytes_sent"]),
                    n(&ct["tcpi_total_retrans"]),
                    n(&ct["tcpi_bytes_retrans"])
                )
            ),
            "port {port}: (iface, written, (bytes, retransmits, retx_bytes))"
        );
    }
}

/// From 12 source ports, 5 small and 5 fragmented (4000-byte) UDP
/// datagrams each to one port.
const UDP_FRAGMENTS: &str = "
import socket, time
for p in range(42000, 42012):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('10.80.0.1', p))
    for i in range(5):
        s.sendto(b'a' * 100, ('10.80.0.2', 5002)); s.sendto(b'b' * 4000, ('10.80.0.2', 5002))
        time.sleep(0.002)
";

/// A first IP fragment is hashed by its addresses only, so the fanout can
/// put it in another ring than the unfragmented datagrams of the same
/// 5-tuple: the parts are merged into one connection with every count.
#[test]
fn udp_connections_split_by_fragments_are_merged() {
    if !enabled("live_afpacket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ns = Netns::create("fpa", "frag");
    add_veth(&ns, false);
    let mut p = spawn_flowprobe(
        &ns.b,
        &[],
        &[
            "--backend",
            "afpacket",
            "--iface",
            VETH_B,
            "--duration",
            "3",
        ],
        dir,
        "frag",
    );
    wait_for_rings(&ns.b, 1);
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.a, "python3", "-c", UDP_FRAGMENTS])
        .status()
        .unwrap();
    assert!(st.success(), "the UDP sender failed");
    // Ends by itself after --duration.
    let (conns, out, _) = outcome(&mut p, dir, "frag");
    let udp: Vec<&Value> = conns.iter().filter(|c| c["dport"] == 5002).collect();
    assert_eq!(udp.len(), 12, "one record per source port:\n{out}");
    for c in udp {
        assert_eq!(
            (n(&c["sent"]["packets"]), n(&c["sent"]["bytes"])),
            (10, 5 * 100 + 5 * 4000),
            "{c}"
        );
    }
}
