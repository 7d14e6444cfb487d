//! The one path from a captured frame to the flow table, shared by every
//! userspace source: parse, then track and count.

use flowtable::{FlowTable, FrameStats, Observation};
use probe_common::{parse_frame, LinkType};

pub fn frame(
    table: &mut FlowTable,
    stats: &mut FrameStats,
    ts_ns: u64,
    iface: u32,
    link: Option<LinkType>,
    data: &[u8],
    wire_len: u32,
) {
    stats.frames += 1;
    let Some(link) = link else {
        stats.unsupported_link += 1;
        return;
    };
    match parse_frame(data, link, wire_len) {
        Ok(parsed) => {
            stats.tracked += 1;
            table.observe(&Observation {
                ts_ns,
                iface,
                segs: 1,
                parsed: &parsed,
            });
        }
        Err(why) => stats.skip(why),
    }
}
