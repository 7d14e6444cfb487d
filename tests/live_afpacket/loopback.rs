//! On lo, AF_PACKET sees each packet twice: it counts once.

use std::fs;

use serde_json::Value;

use super::{finish, spawn_run, wait_for_rings};
use crate::common::root::{check_lo_exchange, enabled, python_ok, wait_for, Netns, LO_EXCHANGE};

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
    let mut p = spawn_run(
        &ns.a,
        &[],
        &["--backend", "afpacket", "--interval", "0.2"],
        dir,
        "lo",
    );
    wait_for_rings(&ns.a, 1);
    python_ok(&ns.a, LO_EXCHANGE, "the loopback exchange");
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
    check_lo_exchange(r);
    assert_eq!(r["iface"], 1, "loopback {r}");
}
