//! UDP connections that the fanout splits across rings are merged whole.

use serde_json::Value;

use super::{add_veth, n, outcome, spawn_run, wait_for_rings, VETH_B};
use crate::common::root::{enabled, python_ok, Netns};

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
    let mut p = spawn_run(
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
    python_ok(&ns.a, UDP_FRAGMENTS, "the UDP sender");
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
