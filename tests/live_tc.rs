//! `flowprobe run` on a live veth against each socket's `TCP_INFO` (root).
//!
//! Two fresh network namespaces joined by a veth, offloads left on (so the
//! tc program sees GSO super-packets). Loss is induced in each receiver's
//! INPUT chain (`iptables -m statistic`), downstream of the probe and of the
//! sender's transmit path, so the kernel counts real retransmissions.
//! `flowprobe run --iface <veth>` runs inside each namespace while
//! `fixtures/capture/tcpapp.py` drives several TCP connections in parallel
//! and records every socket's `TCP_INFO`, beside a UDP echo. For every
//! connection and both directions, at the sending side's probe and at the
//! receiving side's: `bytes − retransmitted_bytes` = bytes the application
//! wrote, `retransmits` = `tcpi_total_retrans`, `retransmitted_bytes` =
//! `tcpi_bytes_retrans`, `bytes` = `tcpi_bytes_sent`; the retransmits each
//! side sent = its namespace's `RetransSegs` delta; UDP datagrams and bytes
//! once each way.
//! Also: closed connections drained from a map much smaller than their
//! number; `--backend xdp` on a forwarding gateway namespace between client
//! and server namespaces; the fixture captures pushed through the loaded program with
//! `BPF_PROG_TEST_RUN` equal `flowprobe replay` of them; without `--iface`
//! a veth created while `run` runs is attached within a second and its
//! traffic counted, with nothing of ours left after exit; the next start
//! after a `kill -9` removes what the killed run left, and only that; the
//! rtnetlink clsact helpers the run uses instead of `tc` agree with `tc`.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` (the root tier of
//! `scripts/test.sh` sets it after building the eBPF object); otherwise it
//! is skipped with a message. Set but not root: skipped, or a failure when
//! `CI=true`.

mod common;
// `flowprobe run`'s clsact helpers, compiled into this test as they are (the
// binary has no library); the binary does not use everything the test does.
#[allow(dead_code)]
#[path = "../probe/src/tc_netlink.rs"]
mod tc_netlink;

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::Ebpf;
use common::root::{
    conn_args, drop_in_input, enabled, record, sh, sh_out, tcpapp_exchange, veth_pair, wait_for,
    KillOnDrop, Netns, LO_EXCHANGE,
};
use common::{json_lines, repo_root};
use serde_json::Value;

const VETH_A: &str = "fpl0";
const VETH_B: &str = "fpl1";

fn setup(tag: &str, v6: bool) -> (Netns, &'static str, &'static str) {
    let ns = Netns::create("fpl", tag);
    let (ca, sa, plen, ipt) = if v6 {
        ("fd77::1", "fd77::2", "64", "ip6tables")
    } else {
        ("10.78.0.1", "10.78.0.2", "24", "iptables")
    };
    veth_pair(&ns, VETH_A, VETH_B, ca, sa, plen);
    for n in [&ns.a, &ns.b] {
        // Every 13th large TCP packet dropped in the receiver's INPUT chain.
        drop_in_input(n, ipt);
    }
    (ns, ca, sa)
}

/// (client port, client writes, server writes): several in parallel.
const CONNS: [(u16, u64, u64); 4] = [
    (40000, 600_000, 200_000),
    (40001, 2_000_000, 50_000),
    (40002, 100_000, 900_000),
    (40003, 1_000_000, 1_000_000),
];

/// One UDP exchange beside them: the client sends this many datagrams
/// (1 to 1400 bytes) from this port and the server echoes each.
const UDP_PORT: u16 = 41000;
const UDP_DATAGRAMS: u64 = 30;

/// `flowprobe run` on `dev` inside `ns`; output in `dir/TAG.json`,
/// stderr in `dir/TAG.err`.
fn spawn_flowprobe(
    ns: &str,
    dev: &str,
    duration: Option<&str>,
    dir: &Path,
    tag: &str,
) -> KillOnDrop {
    let mut args = vec![
        "netns",
        "exec",
        ns,
        env!("CARGO_BIN_EXE_flowprobe"),
        "run",
        "--iface",
        dev,
        "--format",
        "json",
    ];
    if let Some(d) = duration {
        args.extend(["--duration", d]);
    }
    KillOnDrop(
        Command::new("ip")
            .args(&args)
            .stdout(fs::File::create(dir.join(format!("{tag}.json"))).unwrap())
            .stderr(fs::File::create(dir.join(format!("{tag}.err"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn traffic(ns: &Netns, ca: &str, sa: &str, dir: &Path) {
    let mut args = conn_args(&CONNS);
    args.extend(["--udp".to_owned(), format!("{UDP_PORT}:{UDP_DATAGRAMS}")]);
    tcpapp_exchange(&ns.a, ca, &ns.b, sa, dir, &args);
}

/// Checks both probes' output against both sides' TCP_INFO.
///
/// Each direction is exact where the probe sees it at the sender's egress
/// (one socket's segments leave in order, under its lock): `bytes −
/// retransmitted_bytes` = written, `retransmits` = `tcpi_total_retrans`,
/// `retransmitted_bytes` = `tcpi_bytes_retrans`, `bytes` =
/// `tcpi_bytes_sent`. At the receiver's ingress (before the INPUT-chain
/// loss) every byte sent passes, so `bytes` = `tcpi_bytes_sent` there too;
/// but veth delivers one socket's skbs on whichever CPU sent them (the
/// application's, or the one handling the peer's ACK), so two can be
/// processed out of order, and a reordered segment counts as a
/// retransmission there, as the README says. So at ingress retransmits are
/// only printed.
/// `Tcp: RetransSegs` of network namespace `ns` (/proc/net/snmp is per
/// namespace).
fn retrans_segs(ns: &str) -> u64 {
    let snmp = sh_out(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// `mib`: the (client, server) namespaces' RetransSegs deltas.
fn check(dir: &Path, ca: &str, sa: &str, mib: (u64, u64)) {
    let read = |tag: &str| {
        let err = fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap();
        let out = fs::read_to_string(dir.join(format!("{tag}.json"))).unwrap();
        eprintln!("flowprobe in the {tag} namespace: {err}");
        (json_lines(&out), out)
    };
    let (at_client, out_c) = read("probe-client");
    let (at_server, out_s) = read("probe-server");
    let truth = |side: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(dir.join(format!("{side}.json"))).unwrap())
            .unwrap()
    };
    let (client, server) = (truth("client"), truth("server"));
    let n = |v: &Value| v.as_u64().unwrap();
    let mut total_retrans = 0;
    // Retransmits flowprobe saw each side send: (client, server).
    let mut seen = (0, 0);
    let mut failures = Vec::new();
    for (port, c_bytes, s_bytes) in CONNS {
        let rc = record(&at_client, port, ca, sa, &out_c);
        let rs = record(&at_server, port, ca, sa, &out_s);
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        assert_eq!(ct["app_bytes_written"], c_bytes);
        assert_eq!(st["app_bytes_written"], s_bytes);
        // (direction, sender's truth, written, record at sender's egress,
        // record at receiver's ingress)
        for (dir, t, written, egress, ingress) in [
            ("client->server", ct, c_bytes, &rc["sent"], &rs["sent"]),
            (
                "server->client",
                st,
                s_bytes,
                &rs["received"],
                &rc["received"],
            ),
        ] {
            // At the sender's egress and, through the receiver's INPUT
            // drops (after tc ingress) and veth's reordering, at the
            // receiver's ingress: the same numbers.
            for (at, r) in [("egress", egress), ("ingress", ingress)] {
                let got = (
                    n(&r["bytes"]) - n(&r["retransmitted_bytes"]),
                    n(&r["retransmits"]),
                    n(&r["retransmitted_bytes"]),
                    n(&r["bytes"]),
                );
                let want = (
                    written,
                    n(&t["tcpi_total_retrans"]),
                    n(&t["tcpi_bytes_retrans"]),
                    n(&t["tcpi_bytes_sent"]),
                );
                eprintln!(
                    "port {port} {dir} at {at}: (bytes-retx_bytes, retransmits, retx_bytes, bytes) \
                     flowprobe {got:?}, kernel {want:?}, gaps {}",
                    r["gaps"]
                );
                if got != want {
                    failures.push(format!(
                        "port {port} {dir} at {at}: flowprobe {got:?} != kernel {want:?}"
                    ));
                }
            }
            let retx = n(&egress["retransmits"]);
            if dir == "client->server" {
                seen.0 += retx;
            } else {
                seen.1 += retx;
            }
            total_retrans += n(&t["tcpi_total_retrans"]);
        }
    }
    // UDP: every datagram once each way, at both probes.
    let cu = &client["udp"];
    assert_eq!(n(&cu["datagrams_written"]), UDP_DATAGRAMS);
    for (at, conns, out) in [
        ("client", &at_client, &out_c),
        ("server", &at_server, &out_s),
    ] {
        let u = conns
            .iter()
            .find(|c| c["proto"] == "udp" && c["sport"] == UDP_PORT)
            .unwrap_or_else(|| panic!("no UDP record at the {at} probe:\n{out}"));
        assert_eq!(u["src"], ca, "UDP initiator at the {at} probe: {u}");
        for d in ["sent", "received"] {
            let got = (n(&u[d]["packets"]), n(&u[d]["bytes"]));
            let want = (UDP_DATAGRAMS, n(&cu["app_bytes_written"]));
            if got != want {
                failures.push(format!("UDP {d} at the {at} probe: {got:?} != {want:?}"));
            }
        }
    }
    if seen != mib {
        failures.push(format!(
            "retransmits seen per sending side {seen:?} != the namespaces' RetransSegs deltas {mib:?}"
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        total_retrans > 0,
        "the loss scenario produced no retransmissions"
    );
}

fn no_filters_left(ns: &str, dev: &str) {
    for hook in ["ingress", "egress"] {
        let f = sh_out(&[
            "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, hook,
        ]);
        assert!(f.trim().is_empty(), "filters left on {dev} {hook}: {f}");
    }
    let q = sh_out(&["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev]);
    assert!(
        !q.contains("clsact"),
        "the clsact qdisc we added is left: {q}"
    );
}

fn attached(ns: &str, dev: &str) -> bool {
    let f = sh_out(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, "egress",
    ]);
    f.contains("bpf")
}

/// One probe per namespace, traffic, then `stop` ends both probes.
fn live_run(v6: bool, duration: Option<&str>, stop: impl Fn(&Child)) {
    let dir = tempfile::tempdir().unwrap();
    let (ns, ca, sa) = setup(if v6 { "v6" } else { "v4" }, v6);
    let mut probes = [
        spawn_flowprobe(&ns.a, VETH_A, duration, dir.path(), "probe-client"),
        spawn_flowprobe(&ns.b, VETH_B, duration, dir.path(), "probe-server"),
    ];
    wait_for("flowprobe to attach", || {
        attached(&ns.a, VETH_A) && attached(&ns.b, VETH_B)
    });
    let before = (retrans_segs(&ns.a), retrans_segs(&ns.b));
    traffic(&ns, ca, sa, dir.path());
    let mib = (
        retrans_segs(&ns.a) - before.0,
        retrans_segs(&ns.b) - before.1,
    );
    for (p, tag) in probes.iter_mut().zip(["probe-client", "probe-server"]) {
        stop(p);
        let st = p.wait().unwrap();
        assert!(
            st.success(),
            "flowprobe run failed: {}",
            fs::read_to_string(dir.path().join(format!("{tag}.err"))).unwrap()
        );
    }
    check(dir.path(), ca, sa, mib);
    no_filters_left(&ns.a, VETH_A);
    no_filters_left(&ns.b, VETH_B);
}

#[test]
fn ipv4_counts_equal_tcp_info_with_duration() {
    if !enabled("live_tc") {
        return;
    }
    live_run(false, Some("8"), |_| {});
}

#[test]
fn ipv6_counts_equal_tcp_info_until_sigint() {
    if !enabled("live_tc") {
        return;
    }
    // `ip netns exec` execs flowprobe, so the child's pid is flowprobe's.
    live_run(true, None, |p| sh(&["kill", "-INT", &p.id().to_string()]));
}

fn ours_on(ns: &str, dev: &str, hook: &str) -> bool {
    sh_out(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, hook,
    ])
    .split_whitespace()
    .any(|w| w == "flowprobe_tc")
}

fn ifindex(ns: &str, dev: &str) -> u64 {
    let out = sh_out(&["ip", "-n", ns, "-o", "link", "show", dev]);
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// Interface churn, without --iface: a veth created while `run` runs is
/// attached within a second of coming up and its traffic counted; one
/// deleted while it runs does not disturb it; `--interval` prints
/// snapshots; after exit none of our filters and no clsact we added remain.
#[test]
fn follows_interfaces_that_appear_and_go() {
    if !enabled("live_tc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fpl", "churn");
    let probe = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args([
            "run",
            "--duration",
            "12",
            "--interval",
            "1",
            "--format",
            "json",
        ])
        .stdout(fs::File::create(dir.path().join("probe-client.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("probe-client.err")).unwrap())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    wait_for("flowprobe to attach to lo", || {
        ours_on(&ns.a, "lo", "ingress")
    });
    // Loopback: one hook (ingress) only, else every packet counts twice.
    assert!(!ours_on(&ns.a, "lo", "egress"), "attached to lo egress");
    let lo = Command::new("ip")
        .args(["netns", "exec", &ns.a, "python3", "-c"])
        .arg(LO_EXCHANGE)
        .status()
        .unwrap();
    assert!(lo.success(), "the loopback exchange failed");

    // One that comes and goes again.
    sh(&[
        "ip", "-n", &ns.a, "link", "add", "fpd0", "type", "veth", "peer", "name", "fpd1",
    ]);
    sh(&["ip", "-n", &ns.a, "link", "set", "fpd0", "up"]);
    wait_for("flowprobe to attach to fpd0", || {
        ours_on(&ns.a, "fpd0", "ingress")
    });
    sh(&["ip", "-n", &ns.a, "link", "del", "fpd0"]);

    // The one that carries the traffic; its peer in the other namespace.
    let (ca, sa) = ("10.79.0.1", "10.79.0.2");
    sh(&[
        "ip", "-n", &ns.a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B, "netns",
        &ns.b,
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.a,
        "addr",
        "add",
        "10.79.0.1/24",
        "dev",
        VETH_A,
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.b,
        "addr",
        "add",
        "10.79.0.2/24",
        "dev",
        VETH_B,
    ]);
    sh(&["ip", "-n", &ns.b, "link", "set", VETH_B, "up"]);
    sh(&["ip", "-n", &ns.a, "link", "set", VETH_A, "up"]);
    let up = Instant::now();
    while !(ours_on(&ns.a, VETH_A, "ingress") && ours_on(&ns.a, VETH_A, "egress")) {
        assert!(
            up.elapsed() < Duration::from_secs(1),
            "{VETH_A} not attached within 1 s of coming up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{VETH_A} attached {:?} after it came up", up.elapsed());
    let index = ifindex(&ns.a, VETH_A);
    traffic(&ns, ca, sa, dir.path());

    let st = probe.0.wait().unwrap();
    let err = fs::read_to_string(dir.path().join("probe-client.err")).unwrap();
    assert!(st.success(), "flowprobe run failed: {err}");
    eprintln!("flowprobe: {err}");
    assert_eq!(err.lines().count(), 1, "only the summary line: {err}");

    let out = fs::read_to_string(dir.path().join("probe-client.json")).unwrap();
    let lines = json_lines(&out);
    let (snapshots, last): (Vec<Value>, Vec<Value>) =
        lines.into_iter().partition(|c| c.get("snapshot").is_some());
    assert!(
        snapshots.iter().any(|c| c["sport"] == CONNS[0].0),
        "no snapshot with the traffic:\n{out}"
    );
    let truth = |side: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(dir.path().join(format!("{side}.json"))).unwrap())
            .unwrap()
    };
    let (client, server) = (truth("client"), truth("server"));
    let n = |v: &Value| v.as_u64().unwrap();
    for (port, c_bytes, s_bytes) in CONNS {
        let r = record(&last, port, ca, sa, &out);
        assert_eq!(n(&r["iface"]), index, "iface of {r}");
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        assert_eq!(ct["app_bytes_written"], c_bytes);
        assert_eq!(st["app_bytes_written"], s_bytes);
        let sent = &r["sent"];
        assert_eq!(
            (
                n(&sent["bytes"]) - n(&sent["retransmitted_bytes"]),
                n(&sent["bytes"]),
                n(&r["received"]["bytes"]),
            ),
            (
                c_bytes,
                n(&ct["tcpi_bytes_sent"]),
                n(&st["tcpi_bytes_sent"])
            ),
            "port {port}: (sent bytes - retransmitted, sent bytes, received bytes) vs (written, client tcpi_bytes_sent, server tcpi_bytes_sent)"
        );
    }
    let r = last
        .iter()
        .find(|c| c["dport"] == 5555)
        .unwrap_or_else(|| panic!("no loopback connection in:\n{out}"));
    assert_eq!(
        [
            &r["src"],
            &r["sent"]["bytes"],
            &r["received"]["bytes"],
            &r["sent"]["retransmits"],
            &r["received"]["retransmits"],
        ],
        [
            &Value::from("127.0.0.1"),
            &Value::from(3000),
            &Value::from(700),
            &Value::from(0),
            &Value::from(0),
        ],
        "loopback {r}"
    );
    no_filters_left(&ns.a, VETH_A);
    no_filters_left(&ns.a, "lo");
}

/// A veth pair with both ends in namespace `ns`, up.
fn veth_in(ns: &str, a: &str, b: &str) {
    sh(&[
        "ip", "-n", ns, "link", "add", a, "type", "veth", "peer", "name", b,
    ]);
    for d in [a, b] {
        sh(&["ip", "-n", ns, "link", "set", d, "up"]);
    }
}

/// Someone else's filter on `dev`'s clsact `hook`: the empty tc-baseline
/// program, loaded by tc, so named after the file.
fn baseline_filter(ns: &str, dev: &str, hook: &str, prio: &str) {
    let baseline = repo_root().join("target/ebpf/bpfel-unknown-none/release/tc-baseline");
    let obj = baseline.to_str().unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "filter",
        "add",
        "dev",
        dev,
        hook,
        "prio",
        prio,
        "bpf",
        "da",
        "obj",
        obj,
        "sec",
        "classifier",
    ]);
}

/// After `kill -9` the filters and the clsact qdisc stay; the next start
/// removes them and says so in one line, and leaves another program's
/// filter and the clsact qdisc it sits in alone.
#[test]
fn next_run_removes_what_a_killed_run_left() {
    if !enabled("live_tc") {
        return;
    }
    let ns = Netns::create("fpl", "kill");
    veth_in(&ns.a, "fpk0", "fpk1");
    // Someone else's clsact and filter on fpk1: they must survive.
    let exec = ["ip", "netns", "exec", &ns.a];
    sh(&[&exec[..], &["tc", "qdisc", "add", "dev", "fpk1", "clsact"]].concat());
    baseline_filter(&ns.a, "fpk1", "ingress", "1");
    let probe = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args(["run", "--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    wait_for("flowprobe to attach", || {
        ["lo", "fpk0", "fpk1"]
            .iter()
            .all(|d| ours_on(&ns.a, d, "ingress") && (*d == "lo" || ours_on(&ns.a, d, "egress")))
    });
    // `ip netns exec` execs flowprobe, so the child's pid is flowprobe's.
    sh(&["kill", "-9", &probe.0.id().to_string()]);
    let _ = probe.0.wait();
    assert!(ours_on(&ns.a, "fpk0", "egress"), "kill -9 left nothing?");

    let out = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args(["run", "--duration", "0", "--format", "json", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    eprintln!("second run: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("flowprobe: removed what a killed flowprobe run left:"),
        "{err}"
    );
    for d in ["lo", "fpk0", "fpk1"] {
        assert!(err.contains(d), "{err}");
    }
    no_filters_left(&ns.a, "lo");
    no_filters_left(&ns.a, "fpk0");
    // fpk1: ours gone, the other filter and its clsact still there.
    assert!(!ours_on(&ns.a, "fpk1", "ingress") && !ours_on(&ns.a, "fpk1", "egress"));
    let theirs = sh_out(
        &[
            &exec[..],
            &["tc", "filter", "show", "dev", "fpk1", "ingress"],
        ]
        .concat(),
    );
    assert!(
        theirs.contains("tc-baseline"),
        "the other filter is gone: {theirs}"
    );
    let q = sh_out(&[&exec[..], &["tc", "qdisc", "show", "dev", "fpk1"]].concat());
    assert!(q.contains("clsact"), "the other clsact is gone: {q}");
}

/// Runs `f` on a thread that joins network namespace `ns` first.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a valid descriptor; only this thread, which
            // ends after `f`.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// probe/src/tc_netlink.rs against the tc binary on a veth in a fresh
/// namespace: an empty clsact reads empty, one with a bpf filter does not
/// (and lists it), `clsact_del` removes the qdisc, and it refuses an
/// `ingress` qdisc (same handle) and a missing one in one line.
#[test]
fn clsact_over_netlink_agrees_with_tc() {
    use tc_netlink::{clsact_del, clsact_is_empty, filters_on, Hook};
    if !enabled("live_tc") {
        return;
    }
    let ns = Netns::create("fpl", "nltc");
    veth_in(&ns.a, "fpt0", "fpt1");
    let index = ifindex(&ns.a, "fpt0") as u32;
    let tc = |args: &[&str]| sh(&[&["ip", "netns", "exec", &ns.a, "tc"][..], args].concat());
    let qdiscs = || {
        sh_out(&[
            "ip", "netns", "exec", &ns.a, "tc", "qdisc", "show", "dev", "fpt0",
        ])
    };

    tc(&["qdisc", "add", "dev", "fpt0", "clsact"]);
    assert!(in_netns(&ns.a, || clsact_is_empty(index).unwrap()));

    baseline_filter(&ns.a, "fpt0", "egress", "7");
    let (empty, ingress, egress) = in_netns(&ns.a, || {
        (
            clsact_is_empty(index).unwrap(),
            filters_on(index, Hook::Ingress).unwrap(),
            filters_on(index, Hook::Egress).unwrap(),
        )
    });
    assert!(!empty);
    assert!(ingress.is_empty(), "{ingress:?}");
    // One entry a line of `tc filter show`: the priority's (handle 0),
    // then the filter's.
    let shown = sh_out(&[
        "ip", "netns", "exec", &ns.a, "tc", "filter", "show", "dev", "fpt0", "egress",
    ]);
    let lines = shown.lines().filter(|l| l.starts_with("filter")).count();
    assert_eq!(egress.len(), lines, "{egress:?} vs tc's\n{shown}");
    assert_eq!(egress[0].handle, 0, "{egress:?}");
    // ETH_P_ALL: `protocol all`, tc's default.
    assert!(
        egress
            .iter()
            .any(
                |f| (f.kind.as_str(), f.priority, f.protocol, f.chain) == ("bpf", 7, 3, 0)
                    && f.handle != 0
            ),
        "{egress:?}"
    );

    in_netns(&ns.a, || clsact_del(index)).unwrap();
    let q = qdiscs();
    assert!(!q.contains("clsact"), "clsact still there: {q}");

    // Refused as `tc qdisc del` is refused, in one line: no clsact any more
    // (the ingress queue stays, with handle 0), and an `ingress` qdisc,
    // which has the same handle.
    let refused = |what: &str| {
        let ours = in_netns(&ns.a, || clsact_del(index))
            .unwrap_err()
            .to_string();
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.a, "tc", "qdisc", "del", "dev", "fpt0", "clsact",
            ])
            .output()
            .unwrap();
        let theirs = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: {ours} (tc: {})", theirs.trim());
        let text = theirs
            .trim()
            .trim_start_matches("Error: ")
            .trim_end_matches('.');
        assert!(
            !out.status.success() && !ours.contains('\n') && ours.starts_with(text),
            "{what}: {ours} vs tc's {theirs}"
        );
    };
    refused("no clsact");
    tc(&["qdisc", "add", "dev", "fpt0", "ingress"]);
    refused("an ingress qdisc");
    let q = qdiscs();
    assert!(q.contains("ingress"), "the ingress qdisc is gone: {q}");
}

/// Runs everywhere: without root, or with an object that is not there,
/// `run --backend tc` says in one line what is missing (and never touches
/// an interface; `auto` would count with AF_PACKET instead).
#[test]
fn run_explains_what_is_missing() {
    let out = common::flowprobe(&[
        "run",
        "--backend",
        "tc",
        "--iface",
        "lo",
        "--duration",
        "0",
        "--ebpf-object",
        "/nonexistent/probe-ebpf",
    ]);
    assert!(!out.status.success());
    let err = common::stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        assert!(err.contains("reading /nonexistent/probe-ebpf"), "{err}");
    } else {
        assert!(err.contains("needs root"), "{err}");
    }
}

/// A kernel table slot as an aya map value (the orphan rule keeps `Pod`
/// off the `probe_common` type).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct SlotPod(probe_common::table::Slot);
// SAFETY: `repr(C)`, `Copy`, no pointers; padding is explicit fields.
unsafe impl aya::Pod for SlotPod {}

/// The connections in the kernel table, read slot by slot through the
/// `bpf` system call: an independent reader beside `flowprobe`'s mmap one.
fn table_entries(ebpf: &Ebpf) -> Vec<(probe_common::ConnKey, probe_common::FlowEntry)> {
    use aya::maps::{Array, MapData};
    let slots: Array<&MapData, SlotPod> = Array::try_from(ebpf.map("CONNS").unwrap()).unwrap();
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out pointer.
    assert_eq!(
        unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) },
        0
    );
    let tick_ns = res.tv_sec as u64 * 1_000_000_000 + res.tv_nsec as u64;
    (0..slots.len())
        .filter_map(|i| {
            let s = slots.get(&i, 0).unwrap().0;
            (s.state == probe_common::table::state::LIVE).then(|| {
                let mut e = s.entry;
                e.fold_late();
                e.jiffies_to_ns(tick_ns);
                (s.key, e)
            })
        })
        .collect()
}

/// The frames of a little-endian Ethernet pcap (the fixtures' format; read
/// here by hand because their records may claim more than the snap length,
/// which pcap-file rejects).
fn pcap_frames(b: &[u8]) -> Vec<&[u8]> {
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    assert!(
        matches!(u32_at(0), 0xa1b2_c3d4 | 0xa1b2_3c4d),
        "not a little-endian pcap"
    );
    assert_eq!(u32_at(20), 1, "link type must be Ethernet");
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let incl = u32_at(o + 8) as usize;
        out.push(&b[o + 16..o + 16 + incl]);
        o += 16 + incl;
    }
    out
}

/// The fixture captures pushed frame by frame through the loaded program
/// (`BPF_PROG_TEST_RUN`) give the same connections and counters as
/// `flowprobe replay` of the same file: the kernel runs the same parser,
/// tracker and orientation rule.
#[test]
fn fixtures_through_the_kernel_program_equal_replay() {
    if !enabled("live_tc") {
        return;
    }
    let object = repo_root().join("target/ebpf/bpfel-unknown-none/release/probe-ebpf");
    assert!(
        object.is_file(),
        "{} missing: cargo xtask build-ebpf --release",
        object.display()
    );
    let fixtures = repo_root().join("fixtures/pcaps");
    let mut caps: Vec<PathBuf> = fs::read_dir(&fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
        .collect();
    caps.sort();
    assert!(!caps.is_empty());
    for cap in caps {
        let mut ebpf = aya::Ebpf::load_file(&object).unwrap();
        let frames = push_frames(&mut ebpf, &fs::read(&cap).unwrap());
        let kernel: Vec<Value> = table_entries(&ebpf)
            .iter()
            .map(|(k, e)| serde_json::to_value(flowtable::Connection::from_entry(k, e, 0)).unwrap())
            .collect();
        let out = common::flowprobe(&[
            "replay",
            "--format",
            "json",
            "--quiet",
            cap.to_str().unwrap(),
        ]);
        assert!(out.status.success());
        let replay = json_lines(&common::stdout(&out));
        let id = |c: &Value| {
            ["proto", "src", "sport", "dst", "dport"]
                .map(|f| c[f].to_string())
                .join(" ")
        };
        assert_eq!(
            kernel.len(),
            replay.len(),
            "{}: connection count",
            cap.display()
        );
        for r in &replay {
            let k = kernel
                .iter()
                .find(|k| id(k) == id(r))
                .unwrap_or_else(|| panic!("{}: kernel lacks {}", cap.display(), id(r)));
            for dir in ["sent", "received"] {
                assert_eq!(k[dir], r[dir], "{}: {} {dir}", cap.display(), id(r));
            }
        }
        eprintln!(
            "{}: {frames} frames, {} connections equal",
            cap.display(),
            kernel.len()
        );
    }
}

/// A full connection table is counted in `CONN_STATS`, never silent: with
/// room for one connection, the packets of the others are counted there.
#[test]
fn full_connection_map_is_counted() {
    use aya::maps::{MapData, PerCpuArray};

    if !enabled("live_tc") {
        return;
    }
    let object = repo_root().join("target/ebpf/bpfel-unknown-none/release/probe-ebpf");
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries("CONNS", 1)
        .map_max_entries("OCCUPIED", 1)
        .override_global("CONNS_MASK", &0u32, true)
        .load_file(&object)
        .unwrap();
    push_frames(
        &mut ebpf,
        &fs::read(repo_root().join("fixtures/pcaps/tcp4_loss.pcap")).unwrap(),
    );
    let conns = table_entries(&ebpf);
    assert_eq!(conns.len(), 1);
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("CONN_STATS").unwrap()).unwrap();
    let full: u64 = stats.get(&0, 0).unwrap().iter().sum();
    let other: u64 = stats.get(&1, 0).unwrap().iter().sum();
    let kept: u64 = conns
        .iter()
        .map(|(_, e)| e.counters[0].packets + e.counters[1].packets)
        .sum();
    // tcp4_loss: 1124 frames, one segment each, all tracked.
    assert_eq!((kept + full, other), (1124, 0));
    assert!(full > 0);
}

/// Loads `flowprobe_tc` and runs every frame of the pcap `cap` through it
/// with `BPF_PROG_TEST_RUN`; returns the number of frames.
fn push_frames(ebpf: &mut Ebpf, cap: &[u8]) -> usize {
    let prog: &mut SchedClassifier = ebpf
        .program_mut("flowprobe_tc")
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().unwrap();
    let mut frames = 0;
    for frame in pcap_frames(cap) {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::default()
            })
            .unwrap();
        assert_eq!(r.return_value, 0, "the program must return TC_ACT_OK");
        frames += 1;
    }
    frames
}

/// Closed connections leave the kernel map while `run` runs, so a map much
/// smaller than the number of connections loses none: 120 short
/// connections through a map of 16, each reported once with exactly the
/// bytes its client wrote (retransmissions from the INPUT drops aside).
#[test]
fn closed_connections_are_drained_and_lose_nothing() {
    if !enabled("live_tc") {
        return;
    }
    const N: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let (ns, ca, sa) = setup("drain", false);
    let probe = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.a,
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
        ])
        .args(["--iface", VETH_A, "--format", "json", "--max-conns", "16"])
        .args(["--closed-timeout", "0.1"])
        .stdout(fs::File::create(dir.path().join("probe.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("probe.err")).unwrap())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    wait_for("flowprobe to attach", || attached(&ns.a, VETH_A));

    let ready = dir.path().join("ready");
    let server = format!(
        "import socket\n\
         s = socket.create_server(('{sa}', 6000), backlog=128)\n\
         open('{}', 'w').close()\n\
         for _ in range({N}):\n\
         \x20   c, _ = s.accept()\n\
         \x20   while c.recv(65536): pass\n\
         \x20   c.close()\n",
        ready.display()
    );
    let mut server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", &ns.b, "python3", "-c", &server])
            .spawn()
            .unwrap(),
    );
    wait_for("the server", || ready.exists());
    // Each client writes 3000 + 37 i bytes, waits for the server's FIN,
    // closes; about 40 connections a second.
    let client = format!(
        "import socket, time\n\
         for i in range({N}):\n\
         \x20   c = socket.create_connection(('{sa}', 6000), source_address=('{ca}', 42000 + i))\n\
         \x20   c.sendall(b'x' * (3000 + 37 * i))\n\
         \x20   c.shutdown(socket.SHUT_WR)\n\
         \x20   c.recv(1)\n\
         \x20   c.close()\n\
         \x20   time.sleep(0.02)\n"
    );
    let st = Command::new("ip")
        .args(["netns", "exec", &ns.a, "python3", "-c", &client])
        .status()
        .unwrap();
    assert!(st.success(), "client failed");
    assert!(server.wait().unwrap().success(), "server failed");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(probe.wait().unwrap().success());

    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(!err.contains("not counted"), "{err}");
    let out = fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let conns = json_lines(&out);
    for i in 0..N {
        let port = 42000 + i as u64;
        let mine: Vec<&Value> = conns
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["sport"] == port && c["dport"] == 6000)
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "connection from port {port}: {mine:?}\n{err}"
        );
        let s = &mine[0]["sent"];
        let new = s["bytes"].as_u64().unwrap() - s["retransmitted_bytes"].as_u64().unwrap();
        assert_eq!(new, 3000 + 37 * i as u64, "port {port}: {}", mine[0]);
        assert_eq!(mine[0]["src"], ca);
    }
}

/// `--backend xdp` on a gateway: client and server in their own namespaces,
/// routed through a third with forwarding on, loss in each receiver's INPUT
/// (behind the gateway). XDP on the gateway's two interfaces receives every
/// packet of both directions once, and keys them without the interface, so
/// each connection is one record whose both directions equal the sending
/// sockets' TCP_INFO; UDP too.
#[test]
fn xdp_on_a_gateway_counts_both_directions() {
    if !enabled("live_tc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fpl", "xgw");
    let gw = Netns::create("fpl", "xgwg");
    let g = &gw.a;
    let (ca, sa) = ("10.79.1.1", "10.79.2.1");
    sh(&[
        "ip", "-n", &ns.a, "link", "add", VETH_A, "type", "veth", "peer", "name", "g0", "netns", g,
    ]);
    sh(&[
        "ip", "-n", &ns.b, "link", "add", VETH_B, "type", "veth", "peer", "name", "g1", "netns", g,
    ]);
    for (n, dev, cidr) in [
        (&ns.a, VETH_A, "10.79.1.1/24"),
        (g, "g0", "10.79.1.254/24"),
        (g, "g1", "10.79.2.254/24"),
        (&ns.b, VETH_B, "10.79.2.1/24"),
    ] {
        sh(&["ip", "-n", n, "addr", "add", cidr, "dev", dev]);
        sh(&["ip", "-n", n, "link", "set", dev, "up"]);
    }
    sh(&[
        "ip",
        "-n",
        &ns.a,
        "route",
        "add",
        "default",
        "via",
        "10.79.1.254",
    ]);
    sh(&[
        "ip",
        "-n",
        &ns.b,
        "route",
        "add",
        "default",
        "via",
        "10.79.2.254",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        g,
        "sysctl",
        "-q",
        "-w",
        "net.ipv4.ip_forward=1",
    ]);
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, "iptables");
    }
    let probe = Command::new("ip")
        .args(["netns", "exec", g, env!("CARGO_BIN_EXE_flowprobe"), "run"])
        .args(["--backend", "xdp", "--format", "json"])
        .stdout(fs::File::create(dir.path().join("gw.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("gw.err")).unwrap())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    let xdp_on = |dev: &str| sh_out(&["ip", "-n", g, "link", "show", dev]).contains("xdp");
    wait_for("XDP on both gateway interfaces", || {
        xdp_on("g0") && xdp_on("g1")
    });
    traffic(&ns, ca, sa, dir.path());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(probe.wait().unwrap().success());
    let err = fs::read_to_string(dir.path().join("gw.err")).unwrap();
    eprintln!("flowprobe on the gateway: {err}");
    assert!(err.contains("backend xdp"), "{err}");
    assert!(!xdp_on("g0") && !xdp_on("g1"), "XDP left attached");

    let out = fs::read_to_string(dir.path().join("gw.json")).unwrap();
    let conns = json_lines(&out);
    let truth = |side: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(dir.path().join(format!("{side}.json"))).unwrap())
            .unwrap()
    };
    let (client, server) = (truth("client"), truth("server"));
    let n = |v: &Value| v.as_u64().unwrap();
    let mut failures = Vec::new();
    let mut retrans = 0;
    for (port, c_bytes, s_bytes) in CONNS {
        let r = record(&conns, port, ca, sa, &out);
        assert_eq!(
            r["iface"], 0,
            "XDP keys connections without the interface: {r}"
        );
        let (ct, st) = (
            &client["tcp"][port.to_string()],
            &server["tcp"][port.to_string()],
        );
        for (d, t, written) in [("sent", ct, c_bytes), ("received", st, s_bytes)] {
            let got = (
                n(&r[d]["bytes"]) - n(&r[d]["retransmitted_bytes"]),
                n(&r[d]["retransmits"]),
                n(&r[d]["retransmitted_bytes"]),
                n(&r[d]["bytes"]),
            );
            let want = (
                written,
                n(&t["tcpi_total_retrans"]),
                n(&t["tcpi_bytes_retrans"]),
                n(&t["tcpi_bytes_sent"]),
            );
            retrans += want.1;
            eprintln!("port {port} {d}: flowprobe {got:?}, kernel {want:?}");
            if got != want {
                failures.push(format!(
                    "port {port} {d}: flowprobe {got:?} != kernel {want:?}"
                ));
            }
        }
    }
    let u = conns
        .iter()
        .find(|c| c["proto"] == "udp" && c["sport"] == UDP_PORT)
        .unwrap_or_else(|| panic!("no UDP record:\n{out}"));
    for d in ["sent", "received"] {
        let got = (n(&u[d]["packets"]), n(&u[d]["bytes"]));
        let want = (UDP_DATAGRAMS, n(&client["udp"]["app_bytes_written"]));
        if got != want {
            failures.push(format!("UDP {d}: {got:?} != {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(retrans > 0, "the loss scenario produced no retransmissions");
}
