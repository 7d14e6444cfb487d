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

/// Sequence state of one direction, and what its own segments told the
/// other direction (the highest ACK and the last window it sent).
///
/// A direction's segments write only their own `TcpDir` (and [`Holes`]):
/// in the kernel's table each direction has its own lock and cache line,
/// so that the data of one direction and the ACKs of the other, often
/// handled on two CPUs, do not pass one line back and forth. What the
/// reverse direction sent is read ([`Peer`]) only where a decision needs
/// it, none of them on the common path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpDir {
    /// Highest ACK this direction sent (valid with `FLAG_ACK_SENT`): how
    /// much of the reverse direction's data the peer has.
    pub ack: u32,
    /// `FLAG_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// Highest sequence end seen (`seq + len + SYN + FIN`).
    pub snd_max: u32,
}

/// What the tracker of one direction reads of the reverse direction's
/// [`TcpDir`]: the ACK and the window it sent. One word (`ack` in the low
/// half, `flags` above), so that it passes to the tracker's out-of-line
/// helpers in one register (a BPF function takes at most five).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peer(u64);

impl Peer {
    #[inline(always)]
    pub fn new(ack: u32, flags: u8) -> Peer {
        Peer((flags as u64) << 32 | ack as u64)
    }

    /// The reverse direction's state as the tracker sees it.
    #[inline(always)]
    pub fn of(r: &TcpDir) -> Peer {
        Peer::new(r.ack, r.flags)
    }

    #[inline(always)]
    fn flags(self) -> u8 {
        (self.0 >> 32) as u8
    }

    /// The highest ACK the peer sent for this direction's data.
    #[inline(always)]
    fn ack(self) -> Option<u32> {
        (self.flags() & TcpDir::FLAG_ACK_SENT != 0).then_some(self.0 as u32)
    }

    /// The peer's last segment advertised a zero window.
    #[inline(always)]
    fn win0(self) -> bool {
        self.flags() & TcpDir::FLAG_WIN0_SENT != 0
    }
}

/// Holes below a direction's `snd_max`: sequence space this tap has not
/// seen, each left by a segment that started beyond `snd_max` (a gap), as
/// `[lo, hi)`; hole `i` is open while its flag (`FLAG_HOLE`, `FLAG_HOLE1`)
/// is set in the direction's [`TcpDir::flags`] and its `hi` is after both
/// its `lo` and the peer's ACK (which proves everything below it arrived).
/// Data that lands
/// inside one is seen here for the first time, so it is new, not
/// retransmitted: that is reordering between the sender and this tap (veth
/// or RPS deliver one flow on several CPUs), or the retransmission of a loss
/// upstream of the tap. Hole 0 is the older (lower) one. A third gap merges
/// the two into hole 0, which then also covers the seen data between them.
///
/// Only gaps and copies touch them (and read the [`Peer`]).
pub type Holes = [[u32; 2]; 2];

impl TcpDir {
    /// `snd_max` is valid: at least one non-RST segment was seen.
    pub const FLAG_INIT: u8 = 1;
    /// This direction sent an ACK: `ack` is valid.
    pub const FLAG_ACK_SENT: u8 = 2;
    /// This direction's last segment with an ACK advertised a zero window.
    pub const FLAG_WIN0_SENT: u8 = 4;
    /// The last segment of this direction was a 1-byte zero-window probe.
    pub const FLAG_LAST_ZWP: u8 = 8;
    /// Hole 0 is open (see [`Holes`]).
    pub const FLAG_HOLE: u8 = 16;
    /// This direction sent a FIN.
    pub const FLAG_FIN: u8 = 32;
    /// This direction sent an RST.
    pub const FLAG_RST: u8 = 64;
    /// Hole 1 is open.
    pub const FLAG_HOLE1: u8 = 128;

    /// The two directions' `flags` say the connection is over and its
    /// 5-tuple free again: an RST either way, or a FIN each way. Both bits
    /// stay set once set, so a read that races the update of either
    /// direction can only be late, never wrong.
    #[inline(always)]
    pub const fn closed(f0: u8, f1: u8) -> bool {
        (f0 | f1) & TcpDir::FLAG_RST != 0 || f0 & f1 & TcpDir::FLAG_FIN != 0
    }

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
}

impl Verdict {
    const fn of(kind: VerdictKind) -> Verdict {
        Verdict {
            kind,
            retransmitted_bytes: 0,
            gap: false,
        }
    }
}

/// Classifies one segment sent in direction `d` (whose holes are `holes`);
/// `peer` reads the reverse direction of the same connection, called only
/// for the rare decisions that need its ACK or window.
#[inline(always)]
pub fn track(seg: &Segment, d: &mut TcpDir, holes: &mut Holes, peer: impl Fn() -> Peer) -> Verdict {
    let h = &seg.hdr;
    let syn = h.flags & tcp_flags::SYN != 0;
    let fin = h.flags & tcp_flags::FIN != 0;

    if h.flags & tcp_flags::ACK != 0 {
        if !d.has(TcpDir::FLAG_ACK_SENT) || seq_after(h.ack, d.ack) {
            d.ack = h.ack;
            d.flags |= TcpDir::FLAG_ACK_SENT;
        }
        // The window in d's segment is what d offers to the reverse direction.
        if h.window == 0 {
            d.flags |= TcpDir::FLAG_WIN0_SENT;
        } else {
            d.flags &= !TcpDir::FLAG_WIN0_SENT;
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
        if h.seq == d.snd_max.wrapping_sub(1) && peer().ack() == Some(d.snd_max) {
            return Verdict::of(VerdictKind::Probe);
        }
        // 1-byte zero-window probe at snd_max: does not advance, since the
        // receiver may drop the byte and it will be sent again.
        if h.seq == d.snd_max && peer().win0() {
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
            v.retransmitted_bytes = overlap - fill_hole(d, holes, h.seq, overlap, peer());
        } else if seq_after(h.seq, d.snd_max)
            && !(d.has(TcpDir::FLAG_LAST_ZWP) && h.seq == d.snd_max.wrapping_add(1))
        {
            v.gap = true;
            open_hole(d, holes, d.snd_max, h.seq, peer());
        }
        d.snd_max = end;
        d.flags &= !TcpDir::FLAG_LAST_ZWP;
        return v;
    }

    // At or below snd_max: seen before, but for what lies in the hole.
    let unseen = fill_hole(d, holes, h.seq, len, peer());
    if unseen != 0 {
        let mut v = Verdict::of(VerdictKind::New);
        v.retransmitted_bytes = len - unseen;
        return v;
    }
    let mut v = Verdict::of(VerdictKind::Retransmit);
    v.retransmitted_bytes = len;
    v
}

const HOLE_FLAGS: [u8; 2] = [TcpDir::FLAG_HOLE, TcpDir::FLAG_HOLE1];

/// Where hole `i` begins: its `lo`, or the peer's ACK if that is further
/// (the peer received everything below its ACK).
#[inline(always)]
fn hole_start(holes: &Holes, i: usize, peer: Peer) -> u32 {
    let lo = holes[i][0];
    match peer.ack() {
        Some(a) if seq_after(a, lo) => a,
        _ => lo,
    }
}

/// Hole `i` is open; a hole the peer's ACK has closed is forgotten, so that
/// it cannot look open again once sequence numbers wrap.
#[inline(always)]
fn hole_open(d: &mut TcpDir, holes: &Holes, i: usize, peer: Peer) -> bool {
    if !d.has(HOLE_FLAGS[i]) {
        return false;
    }
    if seq_after(holes[i][1], hole_start(holes, i, peer)) {
        return true;
    }
    d.flags &= !HOLE_FLAGS[i];
    false
}

/// TCP's largest window (a 65535-byte field scaled by at most 2^14): no
/// segment further than this below `snd_max` can still be in flight.
const MAX_WINDOW: u32 = 1 << 30;

/// Trims the holes to the last [`MAX_WINDOW`] below `snd_max`, and forgets
/// one wholly below it. Without the peer's ACKs (a tap that sees one
/// direction, such as XDP on one interface) nothing else ever closes a
/// hole that was only partly filled, and a merge can stretch one over the
/// whole stream: once it spans 2^31 bytes, the wrapping comparisons call it
/// empty, and forgetting it took the fresh gaps merged into it along
/// (their first copies then counted as retransmissions). Distances are
/// taken down from `snd_max`, unsigned, so a hole is recognised as stale
/// for up to 4 GiB of data without any gap or fill.
fn forget_stale(d: &mut TcpDir, holes: &mut Holes) {
    let floor = d.snd_max.wrapping_sub(MAX_WINDOW);
    for (h, flag) in holes.iter_mut().zip(HOLE_FLAGS) {
        if d.flags & flag == 0 {
            continue;
        }
        if d.snd_max.wrapping_sub(h[1]) > MAX_WINDOW {
            d.flags &= !flag;
        } else if d.snd_max.wrapping_sub(h[0]) > MAX_WINDOW {
            h[0] = floor;
        }
    }
}

/// Records the hole `[lo, hi)` a gap just left (above every open hole).
// Not inlined, like `fill_hole`: only gaps and copies get here, and the
// eBPF program's common path stays short (its code is fetched afresh for
// nearly every packet at load).
#[inline(never)]
fn open_hole(d: &mut TcpDir, holes: &mut Holes, lo: u32, hi: u32, peer: Peer) {
    forget_stale(d, holes);
    let slot = match (hole_open(d, holes, 0, peer), hole_open(d, holes, 1, peer)) {
        (false, false) => 0,
        (true, false) => 1,
        (false, true) => {
            // Keep hole 0 the older one.
            holes[0] = holes[1];
            d.flags |= TcpDir::FLAG_HOLE;
            1
        }
        (true, true) => {
            // A third hole: the two older ones become one.
            holes[0][1] = holes[1][1];
            1
        }
    };
    holes[slot] = [lo, hi];
    d.flags |= HOLE_FLAGS[slot];
}

/// How many of the payload bytes `[seq, seq + len)` lie in open holes
/// (first seen now). A segment that covers a hole's start or end moves that
/// edge past it, closing the hole when nothing is left; one strictly inside
/// leaves the hole as is.
#[inline(never)]
fn fill_hole(d: &mut TcpDir, holes: &mut Holes, seq: u32, len: u32, peer: Peer) -> u32 {
    forget_stale(d, holes);
    let data_end = seq.wrapping_add(len);
    let mut unseen = 0;
    // An index, not an iterator: `d` is borrowed mutably in the body.
    #[allow(clippy::needless_range_loop)]
    for i in 0..2 {
        if !hole_open(d, holes, i, peer) {
            continue;
        }
        let start = hole_start(holes, i, peer);
        let end = holes[i][1];
        let lo = if seq_after(start, seq) { start } else { seq };
        let hi = if seq_after(data_end, end) {
            end
        } else {
            data_end
        };
        if !seq_after(hi, lo) {
            continue;
        }
        unseen += hi.wrapping_sub(lo);
        if lo == start {
            holes[i][0] = hi;
        } else if hi == end {
            holes[i][1] = lo;
        }
        if !seq_after(holes[i][1], holes[i][0]) {
            d.flags &= !HOLE_FLAGS[i];
        }
    }
    unseen
}
