//! A container host in namespaces: a bridge in the "host" namespace, two
//! "containers" on veths into it. `flowprobe run` on its defaults in the host
//! namespace attaches to every interface, so a container-to-container
//! packet crosses two of them (the client's bridge port, then the server's)
//! and a container-to-host packet two as well (the bridge port, then the
//! bridge). Every connection must come out once, with each direction
//! counted once and exactly: `bytes − retransmitted_bytes` = what the
//! application wrote, `retransmits` = the sender's `tcpi_total_retrans`.

use std::fs;

use serde_json::Value;

use super::{check_once, n, CONNS};
use crate::common::json_lines;
use crate::common::root::{
    conn_args, drop_in_input, enabled, sh, spawn_flowprobe, tc_attached, tcpapp_exchange, wait_for,
    wait_for_rings, BridgeHost,
};

const BRIDGE: &str = "fpbr0";
const HOST: &str = "10.89.0.1";
const C1: &str = "10.89.0.2";
const C2: &str = "10.89.0.3";
/// Container 1 to the host: other client ports than `CONNS`.
const TO_HOST: [(u16, u64, u64); 2] = [(40010, 700_000, 100_000), (40011, 50_000, 800_000)];
const UDP: (u16, u64) = (41000, 20);

#[test]
fn a_bridged_connection_is_counted_once() {
    if !enabled("live_tc") {
        return;
    }
    bridged("tc");
}

/// The AF_PACKET backend sees the same copies (one per interface) and
/// follows the same rule.
#[test]
fn a_bridged_connection_is_counted_once_by_afpacket() {
    if !enabled("live_tc") {
        return;
    }
    bridged("afpacket");
}

fn bridged(backend: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Every 13th large TCP packet dropped where it is received (in each
    // container, and in the host for the connections to it): real
    // retransmissions, after every hook of the host.
    let t = BridgeHost::build(
        ("fpbr", &format!("{backend}-")),
        BRIDGE,
        (HOST, ["fpbp1", "fpbp2"], [C1, C2]),
        None,
    );
    let (h, c1, c2) = (t.host.name.as_str(), &t.c1, &t.c2);
    drop_in_input(h, "iptables");

    let args = ["run", "--format", "json", "--backend", backend];
    let mut probe = spawn_flowprobe(h, &[], &args, dir.path(), "probe");
    if backend == "tc" {
        wait_for("flowprobe to attach to the bridge and its ports", || {
            ["fpbp1", "fpbp2", BRIDGE]
                .iter()
                .all(|d| tc_attached(h, d, "egress"))
        });
    } else {
        wait_for_rings(h, 1);
    }

    // Container to container (bridged), with a UDP exchange beside.
    let c2c = dir.path().join("c2c");
    fs::create_dir(&c2c).unwrap();
    let mut args = conn_args(&CONNS);
    args.extend(["--udp".to_owned(), format!("{}:{}", UDP.0, UDP.1)]);
    tcpapp_exchange(&c1.name, C1, &c2.name, C2, &c2c, &args);
    // Container to the host (bridge port, then the bridge itself).
    let c2h = dir.path().join("c2h");
    fs::create_dir(&c2h).unwrap();
    tcpapp_exchange(&c1.name, C1, h, HOST, &c2h, &conn_args(&TO_HOST));

    sh(&["kill", "-INT", &probe.id().to_string()]);
    let st = probe.wait().unwrap();
    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe run failed: {err}");
    eprintln!("{err}");
    let raw = fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let out = json_lines(&raw);

    check_once(&out, &raw, &c2c, &CONNS, C1, C2);
    check_once(&out, &raw, &c2h, &TO_HOST, C1, HOST);
    // UDP: once, each datagram once each way.
    let u: Vec<&Value> = out
        .iter()
        .filter(|c| c["proto"] == "udp" && c["sport"] == UDP.0)
        .collect();
    assert_eq!(u.len(), 1, "UDP records in\n{raw}");
    for d in ["sent", "received"] {
        assert_eq!(n(&u[0][d]["packets"]), UDP.1, "UDP {d}: {}", u[0]);
    }
    // Every packet crossed two interfaces: the copies were seen, and said.
    assert!(err.contains("seen again on another interface"), "{err}");
}
