//! The one path from a captured frame to the flow table, shared by every
//! userspace source: parse, then track and count.

use flowtable::{FlowTable, FrameStats, Observation};
use probe_common::{parse_frame_ex, Decap, Encap, LinkType, Parsed};

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
    if let Some((parsed, encap)) = parse(stats, c) {
        count(table, stats, c, &parsed, &encap);
    }
}

/// The parse half of [`captured`]: the frame's connection, or `None` with
/// the reason counted in `stats` (which has counted the frame already).
pub fn parse(stats: &mut FrameStats, c: &Captured) -> Option<(Parsed, Encap)> {
    let Some(link) = c.link else {
        stats.unsupported_link += 1;
        return None;
    };
    let mut encap = Encap::default();
    match parse_frame_ex(c.data, link, c.wire_len, &c.decap, &mut encap) {
        Ok(parsed) => Some((parsed, encap)),
        Err(why) => {
            stats.skip(why);
            None
        }
    }
}

/// The count half of [`captured`]: a parsed frame into `table`.
pub fn count(
    table: &mut FlowTable,
    stats: &mut FrameStats,
    c: &Captured,
    parsed: &Parsed,
    encap: &Encap,
) {
    stats.tracked += 1;
    let counted = table.observe(&Observation {
        ts_ns: c.ts_ns,
        iface: c.iface,
        segs: segs(parsed.payload_len, c.gso_size),
        parsed,
        encap,
    });
    if !counted {
        stats.duplicate += 1;
    }
}

/// Which of `n` tables a parsed frame's connection belongs in: the same
/// for both directions and every interface (the key without them).
pub fn shard_of(parsed: &Parsed, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let (key, _) = probe_common::ConnKey::of(&parsed.key, 0, 0);
    let mut h = std::hash::DefaultHasher::new();
    (key.lo, key.hi, key.lo_port, key.hi_port, key.proto).hash(&mut h);
    (h.finish() % n.max(1) as u64) as usize
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
