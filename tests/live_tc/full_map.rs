//! A full connection table is counted in `CONN_STATS`, never silent.

use std::fs;

use probe_common::contract::{self, ConnStat};

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
        .map_max_entries(contract::CONNS, 1)
        .map_max_entries(contract::OCCUPIED, 1)
        .override_global(contract::CONNS_MASK, &0u32, true)
        .load_file(&object)
        .unwrap();
    push_frames(
        &mut ebpf,
        &fs::read(repo_root().join("fixtures/pcaps/tcp4_loss.pcap")).unwrap(),
    );
    let conns = table_entries(&ebpf);
    assert_eq!(conns.len(), 1);
    let stats: PerCpuArray<&MapData, u64> =
        PerCpuArray::try_from(ebpf.map(contract::CONN_STATS).unwrap()).unwrap();
    let count = |s: ConnStat| -> u64 { stats.get(&s.index(), 0).unwrap().iter().sum() };
    let full = count(ConnStat::Full);
    let other = count(ConnStat::InsertFailed) + count(ConnStat::Contended);
    let kept: u64 = conns
        .iter()
        .map(|(_, e)| e.counters[0].packets + e.counters[1].packets)
        .sum();
    // tcp4_loss: 1124 frames, one segment each, all tracked.
    assert_eq!((kept + full, other), (1124, 0));
    assert!(full > 0);
}
