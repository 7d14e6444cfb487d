//! `--backend xdp` on a forwarding gateway between client and server.

use std::fs;

use serde_json::Value;

use super::{traffic, CONNS, UDP_DATAGRAMS, UDP_PORT, VETH_A, VETH_B};
use crate::common::json_lines;
use crate::common::root::{
    addr_up, drop_in_input, enabled, ifindex, record, sh, sh_out, spawn_flowprobe, truth, veth,
    wait_for, Namespace, Netns,
};

/// `--backend xdp` on a gateway: client and server in their own namespaces,
/// routed through a third with forwarding on, loss in each receiver's INPUT
/// (behind the gateway). XDP on the gateway's two interfaces receives every
/// packet of both directions once, and keys them without the interface, so
/// each connection is one record whose both directions equal the sending
/// sockets' TCP_INFO; UDP too. Its `iface` is where the initiator's
/// direction entered: the client's side of the gateway.
#[test]
fn xdp_on_a_gateway_counts_both_directions() {
    if !enabled("live_tc") {
        return;
    }
    gateway(false);
}

/// The same gateway MASQUERADEs to the server's side: XDP sees the
/// request before the translation (entering from the client) and the
/// answer after it (entering from the server), two tuples of one
/// connection. NAT undone joins them: one record under the client's
/// tuple, both directions equal to TCP_INFO, the gateway's address as the
/// client's `nat.ip`.
#[test]
fn nat_xdp_on_a_masquerading_gateway_counts_once() {
    if !enabled("live_tc") {
        return;
    }
    gateway(true);
}

fn gateway(nat: bool) {
    let dir = tempfile::tempdir().unwrap();
    let tag = if nat { "xgwn" } else { "xgw" };
    let ns = Netns::create("fpl", tag);
    let gw = Namespace::create("fpl", &format!("{tag}g"));
    let g = &gw.name;
    let (ca, sa) = ("10.79.1.1", "10.79.2.1");
    veth(&ns.a, VETH_A, g, "g0");
    veth(&ns.b, VETH_B, g, "g1");
    for (n, dev, cidr) in [
        (&ns.a, VETH_A, "10.79.1.1/24"),
        (g, "g0", "10.79.1.254/24"),
        (g, "g1", "10.79.2.254/24"),
        (&ns.b, VETH_B, "10.79.2.1/24"),
    ] {
        addr_up(n, dev, cidr);
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
    if nat {
        sh(&[
            "ip",
            "netns",
            "exec",
            g,
            "iptables",
            "-w",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-o",
            "g1",
            "-j",
            "MASQUERADE",
        ]);
    }
    let mut probe = spawn_flowprobe(
        g,
        &[],
        &["run", "--backend", "xdp", "--format", "json"],
        dir.path(),
        "gw",
    );
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
    let (client, server) = (truth(dir.path(), "client"), truth(dir.path(), "server"));
    let n = |v: &Value| v.as_u64().unwrap();
    let mut failures = Vec::new();
    let mut retrans = 0;
    let client_side = ifindex(g, "g0");
    for (port, c_bytes, s_bytes) in CONNS {
        let r = record(&conns, port, ca, sa, &out);
        assert_eq!(
            r["iface"], client_side,
            "one record, counted where the client's packets enter: {r}"
        );
        let views = conns
            .iter()
            .filter(|c| c["sport"] == port || c["dport"] == port)
            .count();
        assert_eq!(views, 1, "port {port}: one record in\n{out}");
        if nat {
            assert_eq!(
                (
                    r["src_tags"]["nat.ip"].as_str(),
                    r["src_tags"]["nat.port"].as_str()
                ),
                (Some("10.79.2.254"), Some(port.to_string().as_str())),
                "{r}"
            );
        }
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
