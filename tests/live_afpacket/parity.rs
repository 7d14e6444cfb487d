//! afpacket and tc side by side in both namespaces, against `TCP_INFO`.

use super::{
    counts, finish, kernel_drops, n, setup, spawn_run, traffic, wait_for_rings, CONNS, VETH_A,
    VETH_B,
};
use crate::common::root::{enabled, record, tc_attached, truth, wait_for};
use serde_json::Value;

/// afpacket and tc side by side in both namespaces, against TCP_INFO.
fn parity(v6: bool) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ns, ca, sa) = setup(if v6 { "v6" } else { "v4" }, v6);
    // The client side with every interface (ifindex-0 binding, lo
    // included), the server side with --iface (the kernel filter).
    let mut probes = vec![
        (
            spawn_run(&ns.a, &[], &["--backend", "afpacket"], dir, "afp-client"),
            "afp-client",
        ),
        (
            spawn_run(&ns.a, &[], &["--backend", "tc"], dir, "tc-client"),
            "tc-client",
        ),
        (
            spawn_run(
                &ns.b,
                &[],
                &["--backend", "afpacket", "--iface", VETH_B],
                dir,
                "afp-server",
            ),
            "afp-server",
        ),
        (
            spawn_run(
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
        tc_attached(&ns.a, VETH_A, "egress") && tc_attached(&ns.b, VETH_B, "egress")
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
            // orders one socket's packets across CPUs; see live_tc/counts.rs).
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
