//! One packet's update of a [`FlowEntry`] that several CPUs share (the
//! kernel's connection map: tc ingress and egress, and ingress on several
//! CPUs when veth or RPS spread a flow).
//!
//! The update takes the lock word of the packet's direction
//! ([`DirState`]) with a compare-exchange, runs the plain
//! tracker, the very code replay runs, adds the counts, and releases the
//! lock ([`Atomics::unlock`]: a release store). That makes each packet's
//! decision one indivisible step among the packets of its direction,
//! whatever the interleaving. Packets of the two directions run side by
//! side: a direction's decision reads of the other only the highest ACK
//! and last window it sent ([`crate::tcp::Peer`], one load, rarely), which
//! is what the other direction had sent at some moment during the update,
//! so the outcome is that of one order of the two; and when the order
//! matters (an ACK that covers data, a retransmission after an ACK) the
//! wire has already fixed it. One lock per direction keeps the two CPUs
//! that often handle a connection's data and its ACKs off each other's
//! cache line (`bench/tc.sh`: about 6 ns a packet).
//!
//! A BPF program cannot sleep or be preempted by another tc program on its
//! CPU, so the lock is held for a few dozen instructions; but a virtual CPU
//! can be descheduled by its hypervisor while it holds it. A CPU that still
//! finds the lock taken after `spins` tries counts the packet without the
//! tracker and says so, so that the caller can count that, and adds its
//! packet to the entry's `late` counters, atomically, apart from the
//! counters the lock holder adds to with plain adds; readers fold them
//! together ([`FlowEntry::fold_late`]).
//! Counts stay exact when the two paths meet; only the tracker's call on
//! that packet is lost.

use crate::atomics::Atomics;
use crate::entry::{DirState, FlowEntry};
use crate::handshake;
use crate::key::L4Proto;
use crate::parse::{Parsed, TcpHeader};
use crate::tcp::{track, Peer, Segment};

/// The clocks an update reads: the coarse one for every packet's
/// `last_seen`, the precise one only when a handshake time is taken
/// ([`crate::handshake`]).
pub trait Clock {
    fn coarse_ns(&self) -> u64;
    fn precise_ns(&self) -> u64;
}

/// One clock for both (userspace, tests).
pub struct Fixed(pub u64);

impl Clock for Fixed {
    #[inline(always)]
    fn coarse_ns(&self) -> u64 {
        self.0
    }
    #[inline(always)]
    fn precise_ns(&self) -> u64 {
        self.0
    }
}

/// How [`update`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Updated {
    /// Under the entry's lock: exact.
    Locked,
    /// Not counted: the direction is counted at another interface of this
    /// host, which saw the same packet first ([`DirState::claim`]).
    Elsewhere,
    /// The lock stayed taken: packets and bytes counted, but not the
    /// tracker's verdict (a retransmission counts as new data).
    Contended,
}

/// What an update needs of one packet: [`Parsed`] without the addresses
/// (the caller has found the entry already).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub is_tcp: bool,
    /// Zeroed for UDP.
    pub tcp: TcpHeader,
    pub payload_len: u32,
    pub l3_len: u32,
}

impl Parsed {
    #[inline(always)]
    pub fn pkt(&self) -> Pkt {
        Pkt {
            is_tcp: self.key.proto == L4Proto::Tcp as u8,
            tcp: self.tcp,
            payload_len: self.payload_len,
            l3_len: self.l3_len,
        }
    }
}

/// Records one packet (or GSO super-packet of `segs` segments) travelling
/// in direction `dir` (0 or 1, as in [`crate::ConnKey::of`]), seen at
/// `seen_at` (interface index + 1, or 0 with keys per interface: see
/// [`DirState::claim`]): takes the direction's lock, [`update_locked`],
/// releases it; or, when the lock stays taken for `spins` tries,
/// [`update_contended`].
///
/// # Safety
/// `e` must point to a live `FlowEntry`, 8-byte aligned, that other writers
/// update only through this module.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the packet's parts as the kernel's callers hold them"
)]
pub unsafe fn update<A: Atomics, C: Clock>(
    e: *mut FlowEntry,
    dir: usize,
    segs: u32,
    p: &Pkt,
    seen_at: u32,
    clock: &C,
    spins: u32,
    a: &A,
) -> Updated {
    // SAFETY: caller's contract.
    let lock = unsafe { &raw mut (*e).dir[dir & 1].lock };
    // SAFETY: as above.
    if unsafe { a.try_lock(lock, spins) } {
        // SAFETY: we hold the lock.
        let counted = unsafe {
            let counted = update_locked(e, dir, segs, p, seen_at, clock);
            a.unlock(lock);
            counted
        };
        return if counted {
            Updated::Locked
        } else {
            Updated::Elsewhere
        };
    }
    // SAFETY: caller's contract.
    if unsafe { update_contended(e, dir, segs, p, seen_at, clock, a) } {
        Updated::Contended
    } else {
        Updated::Elsewhere
    }
}

/// The [`Peer`] view of direction `dir`, read while its own CPU may be
/// writing it: `ack` and `flags` in one 8-byte load, so that they belong
/// to one moment.
///
/// # Safety
/// `e` points to a live entry.
#[inline(always)]
unsafe fn read_peer(e: *const FlowEntry, dir: usize) -> Peer {
    // SAFETY: caller's contract; `tcp` is 8-byte aligned in `DirState`
    // (asserted in `entry`), `ack` and `flags` its first 5 bytes.
    let b = unsafe { core::ptr::read_volatile((&raw const (*e).dir[dir & 1].tcp).cast::<u64>()) }
        .to_ne_bytes();
    Peer::new(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]), b[4])
}

/// The update itself, by the holder of direction `dir`'s lock: the
/// tracker's verdict, the handshake, the counters. It writes the
/// direction's own [`DirState`] and counters, and reads the reverse
/// direction's state only when the tracker asks ([`Peer`]). False, having
/// changed nothing, when the direction is counted at another interface
/// ([`DirState::claim`]).
///
/// # Safety
/// As [`update`], and the caller holds `(*e).dir[dir].lock`.
#[inline(always)]
pub unsafe fn update_locked<C: Clock>(
    e: *mut FlowEntry,
    dir: usize,
    segs: u32,
    p: &Pkt,
    seen_at: u32,
    clock: &C,
) -> bool {
    let dir = dir & 1;
    let seg = Segment {
        hdr: p.tcp,
        payload_len: p.payload_len,
    };
    // SAFETY: we hold the direction's lock; every other writer of its
    // state and counters takes it too (or is a fallback, see the module
    // comment). References only to what is ours: the reverse direction
    // is written meanwhile by its own lock holder.
    unsafe {
        let s: &mut DirState = &mut (*e).dir[dir];
        if !s.claim(seen_at) {
            return false;
        }
        s.last_seen_ns = clock.coarse_ns();
        // Plain adds: every writer of `counters` holds the lock (a
        // contended writer adds to `late` instead). Two calls rather than
        // one with an `Option<Verdict>`: LLVM spills the undefined payload
        // of a `None`, which the verifier rejects as an uninitialised read.
        if p.is_tcp {
            note_syn(e, dir, p.tcp.flags);
            let v = track(&seg, &mut s.tcp, &mut s.holes, move || {
                read_peer(e, dir ^ 1)
            });
            handshake::observe(e, dir, &p.tcp, &v, || clock.precise_ns());
            (*e).counters[dir].record(segs, p.payload_len, p.l3_len, Some(&v));
        } else {
            (*e).counters[dir].record(segs, p.payload_len, p.l3_len, None);
        }
    }
    true
}

/// [`FlowEntry::note_syn`] through a pointer: a pure SYN, rare, writes the
/// initiator bytes of the shared first line.
///
/// # Safety
/// `e` points to a live entry.
#[inline(always)]
unsafe fn note_syn(e: *mut FlowEntry, dir: usize, tcp_flags: u8) {
    use crate::parse::tcp_flags as f;
    if tcp_flags & (f::SYN | f::ACK) == f::SYN {
        // SAFETY: caller's contract; two byte stores.
        unsafe { (*e).note_syn(dir, tcp_flags) };
    }
}

/// The lock stayed taken: counts the packet, atomically, without a tracker
/// verdict (the sequence state belongs to the lock holder). False, having
/// changed nothing, when another interface has claimed the direction (the
/// claim is written once, under the lock, before the first count).
///
/// # Safety
/// As [`update`].
#[inline(always)]
pub unsafe fn update_contended<A: Atomics, C: Clock>(
    e: *mut FlowEntry,
    dir: usize,
    segs: u32,
    p: &Pkt,
    seen_at: u32,
    clock: &C,
    a: &A,
) -> bool {
    // SAFETY: caller's contract; an aligned u32 read.
    let claimed = unsafe { core::ptr::read_volatile(&raw const (*e).dir[dir & 1].seen_at) };
    if claimed != 0 && claimed != seen_at {
        return false;
    }
    // SAFETY: caller's contract; `late` is only ever added to atomically,
    // and the timestamp is one aligned store any writer may win.
    unsafe {
        core::ptr::write_volatile(&raw mut (*e).dir[dir & 1].last_seen_ns, clock.coarse_ns());
        let late = (&raw mut (*e).late)
            .cast::<[u64; 3]>()
            .add(dir & 1)
            .cast::<u64>();
        a.add_u64(late, segs as u64);
        if p.payload_len != 0 {
            a.add_u64(late.add(1), p.payload_len as u64);
        }
        a.add_u64(late.add(2), p.l3_len as u64);
    }
    true
}
