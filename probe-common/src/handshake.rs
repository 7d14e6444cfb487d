//! Handshake round-trip times in the kernel's entry: the SYN timed until the
//! SYN/ACK that acknowledges it (the leg towards the responder), the
//! SYN/ACK until the ACK of it (towards the initiator). Two timestamps and
//! two sequence ends per connection, and the precise clock read only for
//! those few packets. Karn's rule: a retransmitted SYN or SYN/ACK spoils its
//! leg (the answer could be to either copy). Data RTTs stay with the
//! userspace flow table, which sees every packet's time.

use crate::entry::FlowEntry;
use crate::parse::{tcp_flags, TcpHeader};
use crate::tcp::{seq_after, Verdict, VerdictKind};

/// `FlowEntry::hs_flags[d]` bits, for the leg direction `d`'s SYN starts:
/// its SYN is being timed, `hs_ns` holds the sample, or it was spoiled.
pub const TIMED: u8 = 1;
pub const DONE: u8 = 2;
pub const SPOILED: u8 = 4;

/// One TCP segment sent in direction `dir` (0 or 1) with the tracker's
/// `verdict`; `clock` reads the precise clock (called only when a time is
/// taken).
///
/// A leg's byte and time are written by its SYN's direction (start, spoil)
/// and by the answer's (done), which hold different locks in the kernel's
/// table; the three happen one after the other on the wire, and where a
/// retransmitted SYN meets the answer, whichever byte lands last is a
/// consistent outcome (spoiled, or done with its time).
///
/// # Safety
/// `e` points to a live entry whose direction `dir` the caller holds.
#[inline(always)]
pub unsafe fn observe(
    e: *mut FlowEntry,
    dir: usize,
    h: &TcpHeader,
    verdict: &Verdict,
    clock: impl Fn() -> u64,
) {
    // The common case inline: no SYN, and no leg waiting for an answer.
    // SAFETY: caller's contract.
    if h.flags & tcp_flags::SYN == 0 && unsafe { (*e).hs_flags[(dir & 1) ^ 1] } & TIMED == 0 {
        return;
    }
    // SAFETY: caller's contract.
    unsafe { observe_slow(e, dir, h, verdict, clock) }
}

/// [`observe`] for the few segments of a handshake: out of line, so that
/// the common path's frame and code stay small.
///
/// # Safety
/// As [`observe`].
#[inline(never)]
unsafe fn observe_slow(
    e: *mut FlowEntry,
    dir: usize,
    h: &TcpHeader,
    verdict: &Verdict,
    clock: impl Fn() -> u64,
) {
    let dir = dir & 1;
    let back = 1 - dir;
    // SAFETY: caller's contract; each byte and time written here is one
    // plain store (see above).
    unsafe {
        let flags = &raw mut (*e).hs_flags;
        let fb = (*flags)[back];
        if fb & TIMED != 0
            && h.flags & tcp_flags::ACK != 0
            && !seq_after((*e).dir[back].hs_end, h.ack)
        {
            let now = clock();
            let t = &raw mut (*e).dir[back].hs_ns;
            *t = now.saturating_sub(*t).max(1);
            (*flags)[back] = DONE;
        }
        if h.flags & tcp_flags::SYN == 0 {
            return;
        }
        let f = (*flags)[dir];
        if verdict.kind == VerdictKind::Retransmit {
            if f & TIMED != 0 {
                (*flags)[dir] = SPOILED;
            }
        } else if f == 0 {
            (*e).dir[dir].hs_ns = clock();
            (*e).dir[dir].hs_end = h.seq.wrapping_add(1);
            (*flags)[dir] = TIMED;
        }
    }
}

/// The handshake sample of direction `dir`'s leg, in nanoseconds.
#[inline(always)]
pub fn sample_ns(e: &FlowEntry, dir: usize) -> Option<u64> {
    (e.hs_flags[dir & 1] & DONE != 0).then_some(e.dir[dir & 1].hs_ns)
}
