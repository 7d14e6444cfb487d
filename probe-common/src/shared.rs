//! One packet's update of a [`FlowEntry`] that several CPUs share (the
//! kernel's connection map: tc ingress and egress, and ingress on several
//! CPUs when veth or RPS spread a flow).
//!
//! The update takes the entry's own lock word with a compare-exchange, runs
//! the plain tracker, the very code replay runs, adds the counts, and
//! releases the lock with an exchange. That makes each packet's decision one
//! indivisible step, whatever the interleaving. A BPF program cannot sleep
//! or be preempted by another tc program on its CPU, so the lock is held for
//! a few dozen instructions; but a virtual CPU can be descheduled by its
//! hypervisor while it holds it. A CPU that still finds the lock taken after
//! `spins` tries counts the packet without the tracker and says so, so that
//! the caller can count that. Counters are added atomically on both paths, so they stay exact when
//! the two paths meet; only the tracker's call on that packet is lost.

use crate::handshake;
use crate::parse::Parsed;
use crate::tcp::{track, Segment};
use crate::wire::{Atomics, DirCounters, FlowEntry, L4Proto};

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
    /// The lock stayed taken: packets and bytes counted, but not the
    /// tracker's verdict (a retransmission counts as new data).
    Contended,
}

/// Records one packet (or GSO super-packet of `segs` segments) travelling
/// in direction `dir` (0 or 1, as in [`crate::ConnKey::of`]) at `now_ns`.
///
/// # Safety
/// `e` must point to a live `FlowEntry`, 8-byte aligned, that other writers
/// update only through this function.
#[inline(always)]
pub unsafe fn update<A: Atomics, C: Clock>(
    e: *mut FlowEntry,
    dir: usize,
    segs: u32,
    p: &Parsed,
    clock: &C,
    spins: u32,
    a: &A,
) -> Updated {
    let now_ns = clock.coarse_ns();
    let dir = dir & 1;
    let is_tcp = p.key.proto == L4Proto::Tcp as u8;
    let seg = Segment {
        hdr: p.tcp,
        payload_len: p.payload_len,
    };
    // SAFETY: caller's contract.
    let lock = unsafe { &raw mut (*e).lock };
    // SAFETY: as above.
    if unsafe { a.try_lock(lock, spins) } {
        // SAFETY: we hold the entry's lock; every other writer takes it too
        // (or is a fallback, see the module comment).
        unsafe {
            let e = &mut *e;
            e.last_seen_ns = now_ns;
            let verdict = if is_tcp {
                e.note_syn(dir, p.tcp.flags);
                let [t0, t1] = &mut e.tcp;
                let (d, r) = if dir == 0 { (t0, t1) } else { (t1, t0) };
                let v = track(&seg, d, r);
                handshake::observe(e, dir, &p.tcp, &v, || clock.precise_ns());
                Some(v)
            } else {
                None
            };
            // Atomic adds even under the lock: a fallback writer (below) may
            // add to the same counters meanwhile, and a plain
            // read-modify-write here would overwrite its add.
            let counters = (&raw mut e.counters).cast::<DirCounters>();
            DirCounters::record_shared(
                counters.add(dir),
                segs,
                p.payload_len,
                p.l3_len,
                verdict.as_ref(),
                a,
            );
            a.xchg_u32(lock, 0);
        }
        return Updated::Locked;
    }
    // The lock stayed taken: count the packet, atomically, without a
    // tracker verdict (the sequence state belongs to the lock holder).
    // SAFETY: caller's contract; the counters are only ever added to
    // atomically, and the timestamp is one aligned store any writer may win.
    unsafe {
        core::ptr::write_volatile(&raw mut (*e).last_seen_ns, now_ns);
        let counters = (&raw mut (*e).counters).cast::<DirCounters>();
        DirCounters::record_shared(counters.add(dir), segs, p.payload_len, p.l3_len, None, a);
    }
    Updated::Contended
}
