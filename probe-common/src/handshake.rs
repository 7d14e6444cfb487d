//! Handshake round-trip times in the kernel's entry: the SYN timed until the
//! SYN/ACK that acknowledges it (the leg towards the responder), the
//! SYN/ACK until the ACK of it (towards the initiator). Two timestamps and
//! two sequence ends per connection, and the precise clock read only for
//! those few packets. Karn's rule: a retransmitted SYN or SYN/ACK spoils its
//! leg (the answer could be to either copy). Data RTTs stay with the
//! userspace flow table, which sees every packet's time.

use crate::parse::{tcp_flags, TcpHeader};
use crate::tcp::{seq_after, Verdict, VerdictKind};
use crate::wire::FlowEntry;

/// `FlowEntry::hs_flags` bits, per direction `d`: `TIMED << d` (its SYN is
/// being timed), `DONE << d` (`hs_ns[d]` holds the sample), `SPOILED << d`.
pub const TIMED: u8 = 1;
pub const DONE: u8 = 4;
pub const SPOILED: u8 = 16;

/// One TCP segment sent in direction `dir` (0 or 1) with the tracker's
/// `verdict`; `clock` reads the precise clock (called only when a time is
/// taken).
#[inline(always)]
pub fn observe(
    e: &mut FlowEntry,
    dir: usize,
    h: &TcpHeader,
    verdict: &Verdict,
    clock: impl Fn() -> u64,
) {
    let dir = dir & 1;
    let back = 1 - dir;
    let f = e.hs_flags;
    if f & (TIMED << back) != 0
        && h.flags & tcp_flags::ACK != 0
        && !seq_after(e.hs_end[back], h.ack)
    {
        let now = clock();
        e.hs_ns[back] = now.saturating_sub(e.hs_ns[back]).max(1);
        e.hs_flags = (f & !(TIMED << back)) | (DONE << back);
    }
    if h.flags & tcp_flags::SYN == 0 {
        return;
    }
    let f = e.hs_flags;
    if verdict.kind == VerdictKind::Retransmit {
        if f & (TIMED << dir) != 0 {
            e.hs_flags = (f & !(TIMED << dir)) | (SPOILED << dir);
        }
    } else if f & ((TIMED | DONE | SPOILED) << dir) == 0 {
        e.hs_ns[dir] = clock();
        e.hs_end[dir] = h.seq.wrapping_add(1);
        e.hs_flags = f | (TIMED << dir);
    }
}

/// The handshake sample of direction `dir`'s leg, in nanoseconds.
#[inline(always)]
pub fn sample_ns(e: &FlowEntry, dir: usize) -> Option<u64> {
    (e.hs_flags & (DONE << (dir & 1)) != 0).then_some(e.hs_ns[dir & 1])
}
