//! The one path from a captured frame to the flow table, shared by every
//! userspace source: parse, then track and count.

use flowtable::{FlowTable, FrameStats, Observation};
use probe_common::{parse_frame_ex, Decap, Encap, LinkType};

/// One frame as a source hands it over.
pub struct Captured<'a> {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub iface: u32,
    /// `None`: a link type the parser does not know.
    pub link: Option<LinkType>,
    /// The captured bytes (possibly cut to a snap length).
    pub data: &'a [u8],
    /// The frame's length before any cut.
    pub wire_len: u32,
    /// For a GSO/GRO super-packet, the payload size of each wire segment
    /// (AF_PACKET's virtio-net header); 0 for a plain frame.
    pub gso_size: u32,
    /// Which tunnels to look into.
    pub decap: Decap,
}

#[expect(
    clippy::too_many_arguments,
    reason = "a captured frame's fields, as the file reader has them"
)]
pub fn frame(
    table: &mut FlowTable,
    stats: &mut FrameStats,
    ts_ns: u64,
    iface: u32,
    link: Option<LinkType>,
    data: &[u8],
    wire_len: u32,
    decap: Decap,
) {
    captured(
        table,
        stats,
        &Captured {
            ts_ns,
            iface,
            link,
            data,
            wire_len,
            gso_size: 0,
            decap,
        },
    );
}

pub fn captured(table: &mut FlowTable, stats: &mut FrameStats, c: &Captured) {
    stats.frames += 1;
    let Some(link) = c.link else {
        stats.unsupported_link += 1;
        return;
    };
    let mut encap = Encap::default();
    match parse_frame_ex(c.data, link, c.wire_len, &c.decap, &mut encap) {
        Ok(parsed) => {
            stats.tracked += 1;
            let counted = table.observe(&Observation {
                ts_ns: c.ts_ns,
                iface: c.iface,
                segs: segs(parsed.payload_len, c.gso_size),
                parsed: &parsed,
                encap: &encap,
            });
            if !counted {
                stats.duplicate += 1;
            }
        }
        Err(why) => stats.skip(why),
    }
}

/// Wire segments of a super-packet: every segment but the last carries
/// `gso_size` bytes, which is how the kernel computes `gso_segs` (TCP:
/// `tcp_set_skb_tso_segs`; GRO merges only full-size segments but the last).
fn segs(payload_len: u32, gso_size: u32) -> u32 {
    if gso_size == 0 {
        1
    } else {
        payload_len.div_ceil(gso_size).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::segs;

    #[test]
    fn super_packets_count_their_wire_segments() {
        for (payload, gso, want) in [
            (0, 0, 1),
            (1448, 0, 1),
            (0, 1448, 1),
            (1448, 1448, 1),
            (1449, 1448, 2),
            (65160, 1448, 45),
            (65161, 1448, 46),
        ] {
            assert_eq!(segs(payload, gso), want, "{payload} / {gso}");
        }
    }
}
