//! Frames → parser → tracker → flow table, as replay runs them. The input
//! is a sequence of `[link type][length: 2 bytes][frame]`. Checked beyond
//! "no panic": every frame that parses is counted exactly once (the
//! packets of all connections add up to them), and a TCP payload never
//! exceeds its IP length (a UDP first fragment's does by design: its UDP
//! length covers the fragments that follow).
#![no_main]

use flowtable::{FlowTable, Observation};
use libfuzzer_sys::fuzz_target;
use probe_common::{parse_frame, LinkType};

const LINKS: [LinkType; 5] = [
    LinkType::Ethernet,
    LinkType::RawIp,
    LinkType::LinuxSll,
    LinkType::LinuxSll2,
    LinkType::Null,
];

fuzz_target!(|data: &[u8]| {
    let mut table = FlowTable::new();
    let mut parsed_frames = 0u64;
    let mut rest = data;
    let mut ts = 1_700_000_000_000_000_000u64;
    while rest.len() >= 3 {
        let link = LINKS[usize::from(rest[0]) % LINKS.len()];
        let len = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let frame = &rest[3..3 + len];
        rest = &rest[3 + len..];
        ts += 1_000_000;
        if let Ok(p) = parse_frame(frame, link, frame.len() as u32) {
            if p.key.proto == 6 {
                assert!(p.payload_len <= p.l3_len, "{p:?}");
            }
            parsed_frames += 1;
            let counted = table.observe(&Observation {
                ts_ns: ts,
                iface: 0,
                segs: 1,
                parsed: &p,
            });
            assert!(counted, "one interface: nothing is a copy");
        }
    }
    let conns = table.connections();
    let packets: u64 = conns
        .iter()
        .map(|c| c.sent.packets + c.received.packets)
        .sum();
    assert_eq!(packets, parsed_frames);
});
