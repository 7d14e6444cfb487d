//! Both probes' counts equal each socket's `TCP_INFO`, IPv4 and IPv6.

use std::fs;
use std::path::Path;
use std::process::Child;

use serde_json::Value;

use super::{
    no_filters_left, setup, spawn_probe, traffic, CONNS, UDP_DATAGRAMS, UDP_PORT, VETH_A, VETH_B,
};
use crate::common::json_lines;
use crate::common::root::{enabled, record, sh, sh_out, tc_attached, truth, wait_for};

/// `Tcp: RetransSegs` of network namespace `ns` (/proc/net/snmp is per
/// namespace).
pub(super) fn retrans_segs(ns: &str) -> u64 {
    let snmp = sh_out(&["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"]);
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap(), tcp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "RetransSegs")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
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
///
/// `mib`: the (client, server) namespaces' RetransSegs deltas.
pub(super) fn check(dir: &Path, ca: &str, sa: &str, mib: (u64, u64)) {
    let read = |tag: &str| {
        let err = fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap();
        let out = fs::read_to_string(dir.join(format!("{tag}.json"))).unwrap();
        eprintln!("flowprobe in the {tag} namespace: {err}");
        (json_lines(&out), out)
    };
    let (at_client, out_c) = read("probe-client");
    let (at_server, out_s) = read("probe-server");
    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
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

/// One probe per namespace, traffic, then `stop` ends both probes.
fn live_run(v6: bool, duration: Option<&str>, stop: impl Fn(&Child)) {
    let dir = tempfile::tempdir().unwrap();
    let (ns, ca, sa) = setup(if v6 { "v6" } else { "v4" }, v6);
    let mut probes = [
        spawn_probe(&ns.a, VETH_A, duration, dir.path(), "probe-client"),
        spawn_probe(&ns.b, VETH_B, duration, dir.path(), "probe-server"),
    ];
    wait_for("flowprobe to attach", || {
        tc_attached(&ns.a, VETH_A, "egress") && tc_attached(&ns.b, VETH_B, "egress")
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
