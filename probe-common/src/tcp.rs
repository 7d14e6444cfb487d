//! Per-direction TCP sequence tracker: which segments are retransmissions.
//!
//! One O(1) state per direction: the highest sequence end seen (`snd_max`),
//! compared with wrapping 32-bit arithmetic. A segment whose data does not
//! reach past `snd_max` is a retransmission; bytes below `snd_max` in a
//! segment that does reach past it are retransmitted bytes (repacketised
//! overlap). Keepalives and zero-window probes are told apart and never count
//! as retransmissions. The reasoning and its ground truths are in
//! `TCP-ANALYSIS.md` §5 (shared design notes) and the README.
//!
//! The tracker only decides; it does not count. The caller adds the
//! [`Verdict`] to its counters (plain adds in userspace, atomic adds in eBPF).

use crate::parse::{tcp_flags, TcpHeader};

/// `a` is after `b` in sequence space (RFC 793 / Linux `after()`).
#[inline(always)]
pub const fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Sequence state of one direction, plus what the other direction told us
/// about it (its ACKs and window).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpDir {
    /// Highest sequence end seen (`seq + len + SYN + FIN`).
    pub snd_max: u32,
    /// Highest ACK the peer sent for this direction's data.
    pub peer_ack: u32,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// A hole below `snd_max`: sequence space this tap has not seen, left by
    /// a segment that started beyond `snd_max` (a gap). Open while
    /// `FLAG_HOLE` is set and `hole_hi` is after both `hole_lo` and the
    /// peer's ACK (which proves everything below it arrived). Data that lands wholly inside it is
    /// seen here for the first time, so it is new, not retransmitted: that is
    /// reordering between the sender and this tap (veth or RPS deliver one
    /// flow on several CPUs), or the retransmission of a loss upstream of
    /// the tap. One hole per direction: several gaps widen it to cover them
    /// all, which errs on the side of "new" inside it.
    pub hole_lo: u32,
    pub hole_hi: u32,
}

impl TcpDir {
    /// `snd_max` is valid: at least one non-RST segment was seen.
    pub const FLAG_INIT: u8 = 1;
    /// `peer_ack` is valid.
    pub const FLAG_PEER_ACK: u8 = 2;
    /// The peer's last segment advertised a zero window to this direction.
    pub const FLAG_PEER_WIN0: u8 = 4;
    /// The last segment of this direction was a 1-byte zero-window probe.
    pub const FLAG_LAST_ZWP: u8 = 8;
    /// `hole_lo..hole_hi` is a hole (see `hole_lo`).
    pub const FLAG_HOLE: u8 = 16;
    /// This direction sent a FIN.
    pub const FLAG_FIN: u8 = 32;
    /// This direction sent an RST.
    pub const FLAG_RST: u8 = 64;

    #[inline(always)]
    fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
}

/// What the tracker needs from one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub hdr: TcpHeader,
    pub payload_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerdictKind {
    /// Advances the sequence (new data, SYN or FIN), or the first segment of
    /// a direction seen mid-stream.
    New,
    /// Carries data, SYN or FIN entirely at or below `snd_max`.
    Retransmit,
    /// Keepalive or zero-window probe.
    Probe,
    /// No data, SYN or FIN: a pure ACK or window update.
    AckOnly,
    /// RST: never moves sequence state (its sequence is often arbitrary).
    Reset,
}

/// The decision for one segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub kind: VerdictKind,
    /// Payload bytes of this segment that lie at or below `snd_max`. For a
    /// retransmission all of its payload, for a repacketised overlap part.
    pub retransmitted_bytes: u32,
    /// The segment starts beyond `snd_max`: a hole upstream of the tap.
    pub gap: bool,
    /// A retransmission of data the peer had already acknowledged.
    pub spurious: bool,
}

impl Verdict {
    const fn of(kind: VerdictKind) -> Verdict {
        Verdict {
            kind,
            retransmitted_bytes: 0,
            gap: false,
            spurious: false,
        }
    }
}

/// Classifies one segment sent in direction `d`; `r` is the reverse
/// direction of the same connection (its ACK state is updated from this
/// segment).
#[inline(always)]
pub fn track(seg: &Segment, d: &mut TcpDir, r: &mut TcpDir) -> Verdict {
    let h = &seg.hdr;
    let syn = h.flags & tcp_flags::SYN != 0;
    let fin = h.flags & tcp_flags::FIN != 0;

    if h.flags & tcp_flags::ACK != 0 {
        if !r.has(TcpDir::FLAG_PEER_ACK) || seq_after(h.ack, r.peer_ack) {
            r.peer_ack = h.ack;
            r.flags |= TcpDir::FLAG_PEER_ACK;
        }
        // The window in d's segment is what d offers to r.
        if h.window == 0 {
            r.flags |= TcpDir::FLAG_PEER_WIN0;
        } else {
            r.flags &= !TcpDir::FLAG_PEER_WIN0;
        }
    }
    if h.flags & tcp_flags::RST != 0 {
        d.flags |= TcpDir::FLAG_RST;
        return Verdict::of(VerdictKind::Reset);
    }
    if fin {
        d.flags |= TcpDir::FLAG_FIN;
    }

    let len = seg.payload_len;
    let end = h
        .seq
        .wrapping_add(len)
        .wrapping_add(syn as u32)
        .wrapping_add(fin as u32);

    if !d.has(TcpDir::FLAG_INIT) {
        // Mid-stream start: no history, so nothing can be called a retransmit.
        d.flags |= TcpDir::FLAG_INIT;
        d.snd_max = end;
        return Verdict::of(VerdictKind::New);
    }

    if len == 0 && !syn && !fin {
        // Linux keepalives and zero-window probes: seq = snd_una - 1, no data.
        if h.seq == d.snd_max.wrapping_sub(1) {
            return Verdict::of(VerdictKind::Probe);
        }
        return Verdict::of(VerdictKind::AckOnly);
    }

    if len == 1 && !syn && !fin {
        // BSD 1-byte keepalive: the last byte again once everything is acked.
        // Before that, the same segment is a genuine 1-byte retransmission.
        if h.seq == d.snd_max.wrapping_sub(1)
            && d.has(TcpDir::FLAG_PEER_ACK)
            && d.peer_ack == d.snd_max
        {
            return Verdict::of(VerdictKind::Probe);
        }
        // 1-byte zero-window probe at snd_max: does not advance, since the
        // receiver may drop the byte and it will be sent again.
        if h.seq == d.snd_max && d.has(TcpDir::FLAG_PEER_WIN0) {
            d.flags |= TcpDir::FLAG_LAST_ZWP;
            return Verdict::of(VerdictKind::Probe);
        }
    }

    if seq_after(end, d.snd_max) {
        let mut v = Verdict::of(VerdictKind::New);
        if seq_after(d.snd_max, h.seq) {
            // Repacketised: the head of this segment was sent before, but
            // for what of it lies in the hole.
            let overlap = d.snd_max.wrapping_sub(h.seq);
            let overlap = if overlap < len { overlap } else { len };
            v.retransmitted_bytes = overlap - fill_hole(d, h.seq, overlap);
        } else if seq_after(h.seq, d.snd_max)
            && !(d.has(TcpDir::FLAG_LAST_ZWP) && h.seq == d.snd_max.wrapping_add(1))
        {
            v.gap = true;
            if !hole_open(d) {
                d.hole_lo = d.snd_max;
                d.flags |= TcpDir::FLAG_HOLE;
            }
            d.hole_hi = h.seq;
        }
        d.snd_max = end;
        d.flags &= !TcpDir::FLAG_LAST_ZWP;
        return v;
    }

    // At or below snd_max: seen before, but for what lies in the hole.
    let unseen = fill_hole(d, h.seq, len);
    if unseen != 0 {
        let mut v = Verdict::of(VerdictKind::New);
        v.retransmitted_bytes = len - unseen;
        return v;
    }
    let mut v = Verdict::of(VerdictKind::Retransmit);
    v.retransmitted_bytes = len;
    v.spurious = d.has(TcpDir::FLAG_PEER_ACK) && !seq_after(end, d.peer_ack);
    v
}

/// How many of the payload bytes `[seq, seq + len)` lie in the open hole
/// (first seen now). A segment that covers the hole's start moves the start
/// past it, closing the hole when it reaches the end; one further in leaves
/// the hole as is (it still covers what is missing before).
#[inline(always)]
fn fill_hole(d: &mut TcpDir, seq: u32, len: u32) -> u32 {
    if !hole_open(d) {
        // Closed by the peer's ACK (or never open): forget it, so that it
        // cannot look open again once sequence numbers wrap.
        d.flags &= !TcpDir::FLAG_HOLE;
        return 0;
    }
    let start = hole_start(d);
    let data_end = seq.wrapping_add(len);
    let lo = if seq_after(start, seq) { start } else { seq };
    let hi = if seq_after(data_end, d.hole_hi) {
        d.hole_hi
    } else {
        data_end
    };
    if !seq_after(hi, lo) {
        return 0;
    }
    if lo == start {
        d.hole_lo = hi;
        if hi == d.hole_hi {
            d.flags &= !TcpDir::FLAG_HOLE;
        }
    }
    hi.wrapping_sub(lo)
}

/// Where the hole begins: its start, or the peer's ACK if that is further
/// (the peer received everything below its ACK).
#[inline(always)]
fn hole_start(d: &TcpDir) -> u32 {
    if d.has(TcpDir::FLAG_PEER_ACK) && seq_after(d.peer_ack, d.hole_lo) {
        d.peer_ack
    } else {
        d.hole_lo
    }
}

#[inline(always)]
fn hole_open(d: &TcpDir) -> bool {
    d.has(TcpDir::FLAG_HOLE) && seq_after(d.hole_hi, hole_start(d))
}
