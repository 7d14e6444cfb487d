//! A full connection table is counted in `CONN_STATS`, never silent.

use std::fs;

use super::ebpf_object;
use super::test_run::{push_frames, table_entries};
use crate::common::repo_root;
use crate::common::root::enabled;

/// A full connection table is counted in `CONN_STATS`, never silent: with
/// room for one connection, the packets of the others are counted there.
#[test]
fn full_connection_map_is_counted() {
    use aya::maps::{MapData, PerCpuArray};

    if !enabled("live_tc") {
        return;
    }
    let object = ebpf_object("probe-ebpf");
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries("CONNS", 1)
        .map_max_entries("OCCUPIED", 1)
        .override_global("CONNS_MASK", &0u32, true)
        .load_file(&object)
        .unwrap();
    push_frames(
        &mut ebpf,
        &fs::read(repo_root().join("fixtures/pcaps/tcp4_loss.pcap")).unwrap(),
    );
    let conns = table_entries(&ebpf);
    assert_eq!(conns.len(), 1);
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map("CONN_STATS").unwrap()).unwrap();
    let full: u64 = stats.get(&0, 0).unwrap().iter().sum();
    let other: u64 = stats.get(&1, 0).unwrap().iter().sum();
    let kept: u64 = conns
        .iter()
        .map(|(_, e)| e.counters[0].packets + e.counters[1].packets)
        .sum();
    // tcp4_loss: 1124 frames, one segment each, all tracked.
    assert_eq!((kept + full, other), (1124, 0));
    assert!(full > 0);
}
