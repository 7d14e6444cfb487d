//! A flood of new 5-tuples into a small kernel table: what finds no slot
//! is counted (`/metrics`, `/health`) and said on stderr, the agent stays
//! up, and once the flood has drained out (idle timeout) connections are
//! counted exactly again.

use std::time::Duration;

use super::{check_once, setup, traffic, CONNS, VETH_A};
use crate::common::root::{enabled, http_get, python_ok, spawn_flowprobe, stop, wait_for_within};
use crate::common::{json_lines, metric};

const METRICS: &str = "http://127.0.0.1:9486/metrics";
/// New UDP 5-tuples sent, eight times the table's 256 slots.
const FLOOD: u32 = 2048;

fn gauge(ns: &str, name: &str) -> Option<u64> {
    metric(&http_get(ns, METRICS)?, name)
}

#[test]
fn a_flood_fills_the_table_and_it_recovers() {
    if !enabled("live_tc") {
        return;
    }
    let (ns, ca, sa) = setup("flood", false);
    let dir = tempfile::tempdir().unwrap();
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &[
            "run",
            "--iface",
            VETH_A,
            "--format",
            "json",
            "--listen",
            "127.0.0.1:9486",
            "--max-conns",
            "256",
            "--idle-timeout",
            "2",
        ],
        dir.path(),
        "probe",
    );
    wait_for_within("the agent", Duration::from_secs(60), || {
        gauge(&ns.a, "flowprobe_table_capacity") == Some(256)
    });
    python_ok(
        &ns.a,
        &format!(
            "import socket\n\
             for p in range(30000, 30000 + {FLOOD}):\n\
             \x20   s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             \x20   s.bind(('{ca}', p)); s.sendto(b'x', ('{sa}', 9)); s.close()\n"
        ),
        "the flood",
    );
    wait_for_within("the refusals counted", Duration::from_secs(10), || {
        gauge(&ns.a, "flowprobe_map_full_total").is_some_and(|n| n > 0)
    });
    let full = gauge(&ns.a, "flowprobe_map_full_total").unwrap();
    // Each datagram crosses the veth's egress here once: every one that
    // found no slot is counted, none twice.
    assert!(
        full <= u64::from(FLOOD) && full >= u64::from(FLOOD) - 256,
        "{full} refused of {FLOOD} new tuples into 256 slots"
    );
    // Drained out after the idle timeout: the table has room again.
    wait_for_within("the flood to drain", Duration::from_secs(30), || {
        gauge(&ns.a, "flowprobe_table_connections").is_some_and(|n| n < 16)
    });
    traffic(&ns, ca, sa, dir.path());
    std::thread::sleep(Duration::from_millis(1500));
    // Nothing of the exchange was refused.
    assert_eq!(gauge(&ns.a, "flowprobe_map_full_total"), Some(full));
    let st = stop(&mut probe, libc::SIGINT, Duration::from_secs(30));
    let err = std::fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe failed: {err}");
    assert!(err.contains("the connection table was full"), "{err}");
    let raw = std::fs::read_to_string(dir.path().join("probe.json")).unwrap();
    check_once(&json_lines(&raw), &raw, dir.path(), &CONNS, ca, sa);
}
