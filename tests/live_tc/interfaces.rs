//! Without `--iface`, `run` follows interfaces that appear and go.

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{no_filters_left, traffic, CONNS, VETH_A, VETH_B};
use crate::common::json_lines;
use crate::common::root::{
    addr_up, check_lo_exchange, enabled, ifindex, link_up, python_ok, record, sh, spawn_flowprobe,
    tc_attached, truth, veth, wait_for, Netns, LO_EXCHANGE,
};

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
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &[
            "run",
            "--duration",
            "12",
            "--interval",
            "1",
            "--format",
            "json",
        ],
        dir.path(),
        "probe-client",
    );
    wait_for("flowprobe to attach to lo", || {
        tc_attached(&ns.a, "lo", "ingress")
    });
    // Loopback: one hook (ingress) only, else every packet counts twice.
    assert!(!tc_attached(&ns.a, "lo", "egress"), "attached to lo egress");
    python_ok(&ns.a, LO_EXCHANGE, "the loopback exchange");

    // One that comes and goes again.
    veth(&ns.a, "fpd0", &ns.a, "fpd1");
    link_up(&ns.a, "fpd0");
    wait_for("flowprobe to attach to fpd0", || {
        tc_attached(&ns.a, "fpd0", "ingress")
    });
    sh(&["ip", "-n", &ns.a, "link", "del", "fpd0"]);

    // The one that carries the traffic; its peer in the other namespace.
    let (ca, sa) = ("10.79.0.1", "10.79.0.2");
    veth(&ns.a, VETH_A, &ns.b, VETH_B);
    addr_up(&ns.b, VETH_B, &format!("{sa}/24"));
    addr_up(&ns.a, VETH_A, &format!("{ca}/24"));
    let up = Instant::now();
    while !(tc_attached(&ns.a, VETH_A, "ingress") && tc_attached(&ns.a, VETH_A, "egress")) {
        assert!(
            up.elapsed() < Duration::from_secs(1),
            "{VETH_A} not attached within 1 s of coming up"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("{VETH_A} attached {:?} after it came up", up.elapsed());
    let index = u64::from(ifindex(&ns.a, VETH_A));
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
    let (client, server) = (truth(dir.path(), "client"), truth(dir.path(), "server"));
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
    check_lo_exchange(r);
    no_filters_left(&ns.a, VETH_A);
    no_filters_left(&ns.a, "lo");
}
