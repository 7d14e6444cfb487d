//! A VXLAN tunnel between two namespaces, lossy TCP and a UDP echo through
//! it, `flowprobe run` on the underlay interface only (which carries
//! nothing but the tunnel): every inner connection is counted as itself,
//! tagged with the tunnel, and its payload and retransmissions equal the
//! sockets' `TCP_INFO` (`counts::check`), with the tc backend and with
//! AF_PACKET.

use std::fs;

use super::counts::{check, retrans_segs};
use super::{no_filters_left, traffic, CONNS};
use crate::common::json_lines;
use crate::common::root::{
    addr_up, drop_in_input, enabled, sh, sh_out, spawn_flowprobe, tc_attached, veth_pair, wait_for,
    wait_for_rings, Netns,
};

const UNDER_A: &str = "fpu0";
const UNDER_B: &str = "fpu1";
const VNI: &str = "4242";

/// The namespaces, a veth underlay between them (10.79.0.0/24), and in each
/// a VXLAN device on it (VNI 4242, UDP 4789) with the overlay addresses
/// 10.80.0.1 (client) and .2 (server); every 13th large inner TCP packet
/// dropped in each receiver's INPUT chain (after decapsulation, so after
/// the probe on the underlay saw it). Returns the overlay addresses.
fn setup(tag: &str) -> (Netns, &'static str, &'static str) {
    let ns = Netns::create("fpv", tag);
    let (ua, ub) = ("10.79.0.1", "10.79.0.2");
    veth_pair(&ns, UNDER_A, UNDER_B, ua, ub, "24");
    for (n, dev, local, remote, overlay) in [
        (&ns.a, UNDER_A, ua, ub, "10.80.0.1/24"),
        (&ns.b, UNDER_B, ub, ua, "10.80.0.2/24"),
    ] {
        sh(&[
            "ip", "-n", n, "link", "add", "vx0", "type", "vxlan", "id", VNI, "local", local,
            "remote", remote, "dstport", "4789", "dev", dev,
        ]);
        addr_up(n, "vx0", overlay);
        drop_in_input(n, "iptables");
    }
    wait_for("the VXLAN devices to come up", || {
        [&ns.a, &ns.b]
            .iter()
            .all(|n| sh_out(&["ip", "-n", n, "link", "show", "vx0"]).contains("LOWER_UP"))
    });
    (ns, "10.80.0.1", "10.80.0.2")
}

fn run(tag: &str, backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (ns, ca, sa) = setup(tag);
    let mut probes = [
        (&ns.a, UNDER_A, "probe-client"),
        (&ns.b, UNDER_B, "probe-server"),
    ]
    .map(|(n, dev, t)| {
        let args = [
            "run",
            "--backend",
            backend,
            "--iface",
            dev,
            "--format",
            "json",
        ];
        spawn_flowprobe(n, &[], &args, dir.path(), t)
    });
    if backend == "tc" {
        wait_for("flowprobe to attach", || {
            tc_attached(&ns.a, UNDER_A, "egress") && tc_attached(&ns.b, UNDER_B, "egress")
        });
    } else {
        wait_for_rings(&ns.a, 1);
        wait_for_rings(&ns.b, 1);
    }
    let before = (retrans_segs(&ns.a), retrans_segs(&ns.b));
    traffic(&ns, ca, sa, dir.path());
    let mib = (
        retrans_segs(&ns.a) - before.0,
        retrans_segs(&ns.b) - before.1,
    );
    for (p, tag) in probes.iter_mut().zip(["probe-client", "probe-server"]) {
        sh(&["kill", "-INT", &p.id().to_string()]);
        let st = p.wait().unwrap();
        let err = fs::read_to_string(dir.path().join(format!("{tag}.err"))).unwrap();
        assert!(st.success(), "flowprobe run failed: {err}");
        // Every inner connection (the four TCP ones and the UDP echo), and
        // nothing else: the tunnel itself is no connection of its own.
        let out = fs::read_to_string(dir.path().join(format!("{tag}.json"))).unwrap();
        let conns = json_lines(&out);
        assert_eq!(conns.len(), CONNS.len() + 1, "{tag}:\n{out}");
        for c in &conns {
            for side in ["src_tags", "dst_tags"] {
                assert_eq!(c[side]["tunnel"], "vxlan", "{tag}: {c}");
                assert_eq!(c[side]["vni"], VNI, "{tag}: {c}");
            }
            assert_eq!(c["src_tags"]["outer_ip"], "10.79.0.1", "{tag}: {c}");
            assert_eq!(c["dst_tags"]["outer_ip"], "10.79.0.2", "{tag}: {c}");
        }
    }
    check(dir.path(), ca, sa, mib);
    if backend == "tc" {
        no_filters_left(&ns.a, UNDER_A);
        no_filters_left(&ns.b, UNDER_B);
    }
}

#[test]
fn vxlan_inner_connections_equal_tcp_info() {
    if !enabled("live_tc") {
        return;
    }
    run("tc", "tc");
}

#[test]
fn vxlan_inner_connections_equal_tcp_info_afpacket() {
    if !enabled("live_tc") {
        return;
    }
    run("afp", "afpacket");
}
