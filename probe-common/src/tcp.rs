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
        return Verdict::of(VerdictKind::Reset);
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

/// [`track`] on state that other CPUs update at the same time (a kernel map
/// value shared by tc ingress and egress, and by ingress on several CPUs):
/// decides from a snapshot with the very same [`track`], then commits.
///
/// The decision rests on `snd_max`, so that is committed first, with a
/// compare-exchange from the snapshot's value; if another CPU moved it in
/// between, the segment is decided again on fresh state. Every byte is thus
/// counted new exactly once, whichever CPUs see which copies (up to
/// `REDECIDE_TRIES` collisions in a row, after which it keeps the last
/// decision and only moves `snd_max` forward). `peer_ack` only ever moves forward;
/// the hole bounds are committed from the snapshot and lose a collision
/// (they only steer the "new or retransmitted" call for reordered data);
/// the flag bits that changed are set or cleared without touching others.
///
/// Without contention (the normal case: one socket's segments are sent under
/// its lock) the result is exactly that of [`track`].
///
/// # Safety
/// `d` and `r` must point to live `TcpDir`s (4-byte aligned).
#[inline(always)]
pub unsafe fn track_shared<A: crate::wire::Atomics>(
    seg: &Segment,
    d: *mut TcpDir,
    r: *mut TcpDir,
    a: &A,
) -> Verdict {
    let mut tries = 0;
    loop {
        // SAFETY: caller's contract; volatile so that each field is read once.
        let (d0, r0) = unsafe { (core::ptr::read_volatile(d), core::ptr::read_volatile(r)) };
        let (mut d1, mut r1) = (d0, r0);
        let v = track(seg, &mut d1, &mut r1);
        // SAFETY: field pointers of live `TcpDir`s (caller's contract).
        unsafe {
            // The hole before `snd_max`: a CPU that sees the new `snd_max`
            // must also see the hole below it, or it would take a reordered
            // segment in the hole for a retransmission.
            if d1.hole_lo != d0.hole_lo {
                a.cas_u32(&raw mut (*d).hole_lo, d0.hole_lo, d1.hole_lo);
            }
            if d1.hole_hi != d0.hole_hi {
                a.cas_u32(&raw mut (*d).hole_hi, d0.hole_hi, d1.hole_hi);
            }
            let hole_set = (d1.flags & !d0.flags) & TcpDir::FLAG_HOLE;
            if hole_set != 0 {
                commit_flags(d, d0.flags, d0.flags | hole_set, a);
            }
            if d1.snd_max != d0.snd_max {
                if tries < REDECIDE_TRIES {
                    let cur = a.cas_u32(&raw mut (*d).snd_max, d0.snd_max, d1.snd_max);
                    if cur != d0.snd_max {
                        tries += 1;
                        continue;
                    }
                } else {
                    // The first segment of a direction sets snd_max without
                    // comparing (FLAG_INIT is committed below).
                    let init = d0.flags & TcpDir::FLAG_INIT == 0;
                    advance_or_init(&raw mut (*d).snd_max, d0.snd_max, d1.snd_max, init, a);
                }
            }
            if r1.peer_ack != r0.peer_ack {
                advance(&raw mut (*r).peer_ack, r0.peer_ack, r1.peer_ack, a);
            }
            commit_flags(d, d0.flags | hole_set, d1.flags, a);
            commit_flags(r, r0.flags, r1.flags, a);
        }
        return v;
    }
}

/// How often [`track_shared`] decides again after a collision. Each retry
/// is another copy of the tracker for the verifier to walk (one costs about
/// a second of load time), and the function only runs when the entry's lock
/// is contended, which a BPF program practically never sees.
const REDECIDE_TRIES: usize = 1;

/// Bound on compare-exchange retries; each retry means another CPU moved the
/// value meanwhile, so more than a few cannot happen in practice.
const CAS_TRIES: usize = 4;

/// Moves `*p` from `old` to `new` unless another CPU has already moved it at
/// or beyond `new`.
#[inline(always)]
unsafe fn advance<A: crate::wire::Atomics>(p: *mut u32, old: u32, new: u32, a: &A) {
    // SAFETY: caller's contract.
    unsafe { advance_or_init(p, old, new, false, a) }
}

#[inline(always)]
unsafe fn advance_or_init<A: crate::wire::Atomics>(
    p: *mut u32,
    old: u32,
    new: u32,
    init: bool,
    a: &A,
) {
    let mut expected = old;
    for _ in 0..CAS_TRIES {
        // SAFETY: caller's contract.
        let cur = unsafe { a.cas_u32(p, expected, new) };
        if cur == expected || (!init && !seq_after(new, cur)) {
            return;
        }
        expected = cur;
    }
}

/// Sets the flag bits `after` has and `before` had not, and clears those it
/// lost, in the 32-bit word that holds `flags` (and padding).
#[inline(always)]
unsafe fn commit_flags<A: crate::wire::Atomics>(t: *mut TcpDir, before: u8, after: u8, a: &A) {
    if before == after {
        return;
    }
    let set = u32::from_ne_bytes([after & !before, 0, 0, 0]);
    let clear = u32::from_ne_bytes([before & !after, 0, 0, 0]);
    // `flags` and `_pad` form one aligned u32 (offset 8 of a repr(C) struct
    // of u32 alignment).
    // SAFETY: caller's contract; the word lies inside the `TcpDir`.
    let p = unsafe { (&raw mut (*t).flags).cast::<u32>() };
    // SAFETY: as above.
    let mut expected = unsafe { core::ptr::read_volatile(p) };
    for _ in 0..CAS_TRIES {
        let new = (expected | set) & !clear;
        // SAFETY: as above.
        let cur = unsafe { a.cas_u32(p, expected, new) };
        if cur == expected {
            return;
        }
        expected = cur;
    }
}
