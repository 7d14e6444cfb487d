//! The kernel/userspace contract's layouts: every statistics index has one
//! stable name, and the names are those userspace already reports.

use probe_common::contract::{self, ConnStat};
use probe_common::ParseError;

#[test]
fn parse_stats_name_every_index_once() {
    let names: Vec<&str> = (0..contract::PARSE_STATS_LEN as u32)
        .map(|i| contract::parse_stat_name(i).unwrap())
        .collect();
    assert_eq!(names[contract::PARSE_TRACKED as usize], "tracked");
    for e in ParseError::ALL {
        assert_eq!(names[contract::parse_skipped(e) as usize], e.name());
    }
    let mut unique = names.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), names.len(), "{names:?}");
    assert_eq!(
        contract::parse_stat_name(contract::PARSE_STATS_LEN as u32),
        None
    );
}

#[test]
fn conn_stats_have_no_hole() {
    let idx: Vec<u32> = ConnStat::ALL.iter().map(|s| s.index()).collect();
    assert_eq!(
        idx,
        (0..contract::CONN_STATS_LEN as u32).collect::<Vec<_>>()
    );
    let names: Vec<&str> = ConnStat::ALL.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["full", "insert_failed", "contended", "duplicate"]);
}

#[test]
fn names_are_distinct() {
    let mut all: Vec<&str> = contract::MAPS
        .iter()
        .chain(&contract::PROGRAMS)
        .chain(&contract::OWNER_MAPS)
        .chain(&contract::OWNER_PROGRAMS)
        .chain(&contract::GLOBALS)
        .chain(&[contract::BASELINE_PROGRAM])
        .copied()
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n);
    assert!(contract::same_name(contract::CONNS, "CONNS"));
    assert!(!contract::same_name(contract::CONNS, contract::CONNS_MASK));
}
