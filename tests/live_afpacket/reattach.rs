//! `--iface` follows a named interface deleted and created again.

use super::{
    add_veth, counts, finish, n, setup, spawn_run, traffic, wait_for_rings, CONNS, VETH_A,
};
use crate::common::root::{enabled, ifindex, record, sh, sh_out, truth, wait_for};

/// The classic BPF filters of the packet sockets in `ns` (`ss -0 -b`).
fn packet_filters(ns: &str) -> Vec<String> {
    sh_out(&["ip", "netns", "exec", ns, "ss", "-0", "-b", "-n"])
        .lines()
        .filter(|l| l.contains("bpf filter"))
        .map(str::to_owned)
        .collect()
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
    let mut p = spawn_run(
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
