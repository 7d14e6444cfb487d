//! The kernel's connection table: an array of [`Slot`]s (a BPF array map,
//! mmapped by userspace), open addressing with up to [`PROBES`] probes at
//! triangular offsets (+0, +1, +3, +6, …: no primary clustering, and every
//! slot of a power-of-two table is reachable).
//!
//! Why not the kernel's hash map: at iperf3 load one `bpf_map_lookup_elem`
//! on a `BPF_MAP_TYPE_HASH` with 48-byte keys cost about 120 ns of the
//! program's run time on the reference VM, an array slot and a 48-byte
//! compare about 3 ns (`bench/tc.sh`, `alt` builds). An array also lets
//! userspace read every connection from memory instead of copying the map
//! through system calls, and lays each slot out on whole cache lines.
//!
//! Concurrency. A slot's `state` says what it holds; its entry's two lock
//! words, one per direction ([`crate::update`]), serialise what writes to
//! it:
//! - The kernel looks a key up without a lock, takes the lock of the
//!   packet's direction in the slot it found and checks again (`LIVE` and
//!   the same key) before updating.
//! - It inserts into the first `EMPTY` or `FREE` slot of the key's probe
//!   sequence: takes both of that slot's locks, direction 0's first (so two
//!   inserters cannot each hold one), checks it is still not `LIVE` (or
//!   `LIVE` with this very key: another CPU inserted it first), writes the
//!   key and a fresh entry, publishes `LIVE`, and keeps only its
//!   direction's lock.
//! - Userspace drains a slot ([`drain`]): `LIVE` → `DRAINING` with a
//!   compare-exchange, waits until both locks are free and no contended writer
//!   ([`Located::Contended`]) is counting into it, reads the final entry,
//!   and only then marks the slot `FREE`. A kernel CPU that takes the lock
//!   after the first step sees `DRAINING` and inserts the connection anew;
//!   one that took it before finishes before userspace reads. `DRAINING`
//!   slots are neither matched nor reused, so nothing writes into a slot
//!   while userspace reads its final state.
//! - Lookups stop at the first `EMPTY` slot: nothing is ever inserted past
//!   one, and slots never become `EMPTY` again (drained ones are `FREE`).
//! - A pure SYN (SYN without ACK) that is not a retransmission of the
//!   SYN the key's connection began with (another sequence number), or
//!   that comes after that connection is over (FIN each way or an RST), or
//!   on a connection whose start was never seen (no SYN: it began before
//!   the program, or it is a late packet of a connection userspace had
//!   drained already), opens a new connection on that 5-tuple (see
//!   `over`: the sequence number covers an end the table missed, such as
//!   a FIN counted without the tracker, `update_contended`). Clients reuse ports (after `TIME_WAIT`, or a second after
//!   the close with `tcp_tw_reuse`): at 1000 connections a second, often
//!   before the old entry is drained. The kernel marks the old slot
//!   `ENDED` (`LIVE` → `ENDED`, a compare-exchange, so a drain that began
//!   first wins) and inserts a new entry for the SYN. `ENDED` slots are neither matched nor
//!   reused; userspace drains them at its next pass, whatever their age,
//!   as two records of one key. A CPU that found the old slot before it
//!   was ended and takes its lock after sees it is no longer `LIVE` and
//!   looks again, as after a drain.
//!
//! One race is left, and it duplicates rather than loses: two CPUs that
//! insert the same new key while userspace frees a slot earlier in its
//! probe sequence can pick different free slots. Userspace adds entries
//! with equal keys together, so counts stay exact.

use crate::atomics::Atomics;
use crate::entry::{DirState, FlowEntry};
use crate::initiator::evidence;
use crate::key::ConnKey;
use crate::tcp::TcpDir;

/// One connection's place in the kernel table: 512 bytes, eight cache lines
/// ([`FlowEntry`] says which fields share one).
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    pub key: ConnKey,
    /// [`state`].
    pub state: u32,
    /// Writers counting into the entry without its lock
    /// ([`Located::Contended`]); [`drain`] waits for them too.
    pub writers: u32,
    pub entry: FlowEntry,
}

const _: () = assert!(core::mem::size_of::<Slot>() == 512);
const _: () = assert!(core::mem::offset_of!(Slot, entry) == 56);

/// [`Slot::state`] values.
pub mod state {
    /// Never used: zero, as the array starts. Ends every probe sequence.
    pub const EMPTY: u32 = 0;
    /// Holds a connection.
    pub const LIVE: u32 = 1;
    /// Userspace is taking the connection out; not to be matched or reused.
    pub const DRAINING: u32 = 2;
    /// Drained: may be reused, but probe sequences go on past it.
    pub const FREE: u32 = 3;
    /// Holds a connection that is over and whose 5-tuple a new connection
    /// took ([`super::locate`] with a `syn`): not matched, not reused;
    /// userspace drains it at once ([`super::drain`]).
    pub const ENDED: u32 = 4;
}

/// Slots tried per key: a new connection that finds these all taken is
/// counted as a table-full event. A table half full turns none away
/// (`tests/slots.rs`: 4096 keys into 8192 slots under 20 seeds); `run`'s
/// default of 65536 slots leaves that margin for 32768 connections open at
/// once.
pub const PROBES: u32 = 32;

/// The slot index a key's probe sequence starts at (before masking), for a
/// per-run random `seed` (so that nobody can choose 5-tuples that collide).
#[inline(always)]
pub fn hash(key: &ConnKey, seed: u64) -> u32 {
    let w = words(key);
    // The words folded with rotations (so that equal words in different
    // places do not cancel), then one multiply-xorshift: the high half of
    // the product depends on every input bit.
    let x = (seed ^ w[0] ^ w[1].rotate_left(17) ^ w[2].rotate_left(31) ^ w[3].rotate_left(47))
        .wrapping_add(w[4] ^ w[5].rotate_left(23));
    let h = (x ^ (x >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32
}

/// The key as six words (it is 48 bytes, 8-byte aligned).
#[inline(always)]
fn words(k: &ConnKey) -> &[u64; 6] {
    // SAFETY: `ConnKey` is `repr(C, align(8))`, 48 bytes, no padding bytes
    // left uninitialised (the pads are fields).
    unsafe { &*(k as *const ConnKey).cast::<[u64; 6]>() }
}

#[inline(always)]
fn same(a: &[u64; 6], b: &[u64; 6]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3] && a[4] == b[4] && a[5] == b[5]
}

/// Slot `s` holds the connection whose key is `want`.
///
/// # Safety
/// `s` is a valid slot.
#[inline(always)]
unsafe fn holds(s: *const Slot, want: &[u64; 6]) -> bool {
    // SAFETY: caller's contract.
    unsafe {
        core::ptr::read_volatile(&raw const (*s).state) == state::LIVE
            && same(words(&(*s).key), want)
    }
}

/// [`same`], reading `b` from memory at each call: for [`locate_slow`],
/// which then keeps no copy of the key in its stack frame (the deepest
/// call chain of the tc program is at the verifier's 512-byte limit).
///
/// # Safety
/// `b` is valid for reads.
#[inline(always)]
unsafe fn same_reread(a: &[u64; 6], b: *const [u64; 6]) -> bool {
    // SAFETY: caller's contract.
    let w = |i: usize| unsafe { core::ptr::read_volatile(b.cast::<u64>().add(i)) };
    a[0] == w(0) && a[1] == w(1) && a[2] == w(2) && a[3] == w(3) && a[4] == w(4) && a[5] == w(5)
}

/// [`holds`] with [`same_reread`].
///
/// # Safety
/// `s` is a valid slot, `want` valid for reads.
#[inline(always)]
unsafe fn holds_reread(s: *const Slot, want: *const [u64; 6]) -> bool {
    // SAFETY: caller's contract.
    unsafe {
        core::ptr::read_volatile(&raw const (*s).state) == state::LIVE
            && same_reread(words(&(*s).key), want)
    }
}

/// The table's memory: slot `i` for `i` within `mask`.
pub trait Slots {
    /// `None` only when `i` is out of range (the verifier wants the check).
    fn slot(&self, i: u32) -> Option<*mut Slot>;
    /// Slot count − 1 (a power of two − 1).
    fn mask(&self) -> u32;
}

/// Where [`locate`] left a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Located {
    /// An existing entry, the lock of the caller's direction held by the
    /// caller now.
    Found(*mut Slot),
    /// A new entry at index `.1`, initialised, that lock held.
    New(*mut Slot, u32),
    /// An existing entry whose lock stayed taken for `spins` tries: count
    /// without a verdict ([`crate::update::update_contended`]), then call
    /// [`contended_done`]. The caller is registered in `writers`, so the
    /// slot is not drained meanwhile.
    Contended(*mut Slot),
    /// All [`PROBES`] slots hold other connections.
    Full,
    /// The slots kept changing under us (two tries); not counted.
    Busy,
}

/// Finds `key` (hashed to `h`) for a packet in direction `dir`, or
/// inserts it with `init` (called on the zeroed entry, its locks held); on
/// success the caller holds that direction's lock and must release it
/// (`Atomics::unlock(&entry.dir[dir].lock)`). `syn`: the packet is a pure
/// SYN (SYN without ACK) with this sequence number, which starts a new
/// entry when the key's entry holds a connection that is [`over`] for it
/// (the module comment).
///
/// # Safety
/// Every slot `t` hands out is valid, 64-byte aligned, and written only
/// through this module and [`crate::update`] (and userspace's [`drain`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn locate<T: Slots, A: Atomics>(
    t: &T,
    key: &ConnKey,
    h: u32,
    dir: usize,
    syn: Option<u32>,
    spins: u32,
    a: &A,
    init: impl Fn(&mut FlowEntry),
) -> Located {
    // The common case first, in few instructions: the key in its home slot,
    // the lock free at the first try, not a SYN.
    let want = words(key);
    if syn.is_none() {
        if let Some(s) = t.slot(h & t.mask()) {
            // SAFETY: caller's contract; checked again under the lock.
            unsafe {
                if holds(s, want) {
                    let lock = &raw mut (*s).entry.dir[dir & 1].lock;
                    if a.cas_u32(lock, 0, 1) == 0 {
                        if core::ptr::read_volatile(&raw const (*s).state) == state::LIVE {
                            return Located::Found(s);
                        }
                        a.unlock(lock);
                    }
                }
            }
        }
    }
    let way = match syn {
        Some(seq) => (seq as u64) << 32 | 2 | (dir & 1) as u64,
        None => (dir & 1) as u64,
    };
    // SAFETY: caller's contract.
    unsafe { locate_slow(t, key, h, way, spins, a, init) }
}

/// For a pure SYN with sequence number `seq` in direction `dir`, the
/// connection in slot `s` is over: it closed ([`TcpDir::closed`]), its
/// start was never seen (its [`evidence`] is less than a SYN), or it began
/// with another SYN from that side (not a retransmission: another
/// sequence number; [`crate::handshake`] keeps its end). The SYN then
/// opens a new connection. Read without a lock: the flags stay set once
/// set, and the SYN's end is written once, by its own direction.
///
/// Not inlined: rare (a SYN on a key in use), and out of `locate_slow`'s
/// stack frame.
///
/// # Safety
/// `s` is a valid slot.
#[inline(never)]
unsafe fn over(s: *const Slot, dir: usize, seq: u32) -> bool {
    // SAFETY: caller's contract; plain loads of single fields.
    unsafe {
        let e = &raw const (*s).entry;
        let d = &raw const (*e).dir[dir & 1];
        core::ptr::read_volatile(&raw const (*e).evidence) < evidence::SYN
            || TcpDir::closed(
                core::ptr::read_volatile(&raw const (*e).dir[0].tcp.flags),
                core::ptr::read_volatile(&raw const (*e).dir[1].tcp.flags),
            )
            || core::ptr::read_volatile(&raw const (*e).hs_flags[dir & 1]) != 0
                && core::ptr::read_volatile(&raw const (*d).hs_end) != seq.wrapping_add(1)
    }
}

/// [`locate`] in full: every probe, the lock spin, the insert. Not inlined:
/// rare (a new connection, a collision, a held lock, a SYN), and kept out
/// of the common path's instruction stream. `way`: the direction in bit 0,
/// bit 1 set for a pure SYN, whose sequence number is the high half (one
/// argument: a BPF function takes at most five).
///
/// # Safety
/// As [`locate`].
#[inline(never)]
unsafe fn locate_slow<T: Slots, A: Atomics>(
    t: &T,
    key: &ConnKey,
    h: u32,
    way: u64,
    spins: u32,
    a: &A,
    init: impl Fn(&mut FlowEntry),
) -> Located {
    let dir = (way & 1) as usize;
    let want: *const [u64; 6] = words(key);
    let mask = t.mask();
    let mut attempt = 0;
    while attempt < 2 {
        attempt += 1;
        // Null for none (an `Option` here leaves an undefined payload that
        // LLVM spills, which the verifier rejects as an uninitialised read).
        let (mut free, mut free_idx): (*mut Slot, u32) = (core::ptr::null_mut(), 0);
        let mut hit: *mut Slot = core::ptr::null_mut();
        let (mut i, mut off) = (0, 0u32);
        while i < PROBES {
            let idx = h.wrapping_add(off) & mask;
            i += 1;
            off = off.wrapping_add(i);
            let Some(s) = t.slot(idx) else { break };
            // SAFETY: caller's contract; read without the lock, checked again
            // under it.
            let st = unsafe { core::ptr::read_volatile(&raw const (*s).state) };
            if st == state::LIVE {
                // SAFETY: as above.
                if unsafe { same_reread(words(&(*s).key), want) } {
                    hit = s;
                    break;
                }
            } else if st == state::EMPTY || st == state::FREE {
                if free.is_null() {
                    (free, free_idx) = (s, idx);
                }
                if st == state::EMPTY {
                    break;
                }
            }
        }
        if !hit.is_null() {
            let s = hit;
            // Out of the probe loop: the verifier walks this once.
            // SAFETY: caller's contract.
            if way & 2 != 0 && unsafe { over(s, dir, (way >> 32) as u32) } {
                // A new connection on this 5-tuple: the old one is set
                // aside whole (a drain that began first wins), and the
                // next try finds a slot for the new one.
                // SAFETY: as above.
                unsafe { a.cas_u32(&raw mut (*s).state, state::LIVE, state::ENDED) };
                continue;
            }
            // SAFETY: caller's contract.
            let lock = unsafe { &raw mut (*s).entry.dir[dir].lock };
            // SAFETY: as above.
            if !unsafe { a.try_lock(lock, spins) } {
                // Register as a writer, then check the slot is still this
                // connection's: a drain that began before the registration
                // is seen here, one that begins after it waits for us.
                // SAFETY: caller's contract.
                unsafe {
                    let writers = &raw mut (*s).writers;
                    a.add_u32(writers, 1);
                    if holds_reread(s, want) {
                        return Located::Contended(s);
                    }
                    a.add_u32(writers, u32::MAX);
                }
                continue;
            }
            // SAFETY: we hold the lock.
            if unsafe { holds_reread(s, want) } {
                return Located::Found(s);
            }
            // Drained since we looked: again.
            // SAFETY: we hold the lock.
            unsafe { a.unlock(lock) };
            continue;
        }
        if free.is_null() {
            return Located::Full;
        }
        let (s, idx) = (free, free_idx);
        // Insert: both locks, direction 0's first, as every inserter takes
        // them (so that two cannot each hold one).
        // SAFETY: caller's contract.
        let (l0, l1) = unsafe {
            (
                &raw mut (*s).entry.dir[0].lock,
                &raw mut (*s).entry.dir[1].lock,
            )
        };
        // SAFETY: as above.
        if !unsafe { a.try_lock(l0, spins) } {
            continue;
        }
        // SAFETY: as above.
        if !unsafe { a.try_lock(l1, spins) } {
            // SAFETY: we hold it.
            unsafe { a.unlock(l0) };
            continue;
        }
        let other = if dir == 0 { l1 } else { l0 };
        // SAFETY: we hold both locks.
        if unsafe { holds_reread(s, want) } {
            // Another CPU inserted this very key first.
            // SAFETY: we hold it.
            unsafe { a.unlock(other) };
            return Located::Found(s);
        }
        // SAFETY: as above.
        let st = unsafe { core::ptr::read_volatile(&raw const (*s).state) };
        if st != state::EMPTY && st != state::FREE {
            // Taken by another key since we looked: again.
            // SAFETY: we hold them.
            unsafe {
                a.unlock(l1);
                a.unlock(l0);
            }
            continue;
        }
        // SAFETY: we hold both locks of a slot no one else writes (not
        // LIVE, so not matched; locked, so not inserted into).
        unsafe {
            (*s).key = *key;
            zero_entry(&raw mut (*s).entry);
            init(&mut (*s).entry);
            // Publish: the key and entry are written before LIVE is seen.
            a.xchg_u32(&raw mut (*s).state, state::LIVE);
            a.unlock(other);
        }
        return Located::New(s, idx);
    }
    Located::Busy
}

/// Ends a [`Located::Contended`] update.
///
/// # Safety
/// `s` came from that [`Located::Contended`].
#[inline(always)]
pub unsafe fn contended_done<A: Atomics>(s: *mut Slot, a: &A) {
    // SAFETY: caller's contract.
    unsafe { a.add_u32(&raw mut (*s).writers, u32::MAX) };
}

/// Zeroes everything of `e` but the words that hold its locks (held by
/// the caller), with volatile stores: a plain loop would become a `memset`
/// call, which the BPF target makes a byte loop.
#[inline(always)]
unsafe fn zero_entry(e: *mut FlowEntry) {
    const WORDS: usize = core::mem::size_of::<FlowEntry>() / 8;
    const LOCK_WORD: [usize; 2] = [
        core::mem::offset_of!(FlowEntry, dir) / 8,
        (core::mem::offset_of!(FlowEntry, dir) + core::mem::size_of::<DirState>()) / 8,
    ];
    let w = e.cast::<u64>();
    // SAFETY: `e` is a valid, 8-byte aligned FlowEntry (caller's contract).
    unsafe {
        let mut i = 0;
        while i < WORDS {
            if i != LOCK_WORD[0] && i != LOCK_WORD[1] {
                core::ptr::write_volatile(w.add(i), 0);
            }
            i += 1;
        }
    }
}

/// Userspace: takes the connection out of slot `s` if it is `LIVE` and
/// `due` says so, or `ENDED` (whatever `due` says: nothing adds to it any
/// more), returning its key, final entry and whether it was `ENDED`; the
/// slot is `FREE` afterwards. `pause` runs while a kernel CPU holds a lock (microseconds);
/// `release` runs right before the slot becomes `FREE` (and reusable), for
/// the caller's own bookkeeping of occupied slots.
///
/// # Safety
/// `s` is a slot of the live table, shared with the kernel.
pub unsafe fn drain<A: Atomics>(
    s: *mut Slot,
    a: &A,
    due: impl Fn(&FlowEntry) -> bool,
    pause: impl FnMut(),
    release: impl FnOnce(),
) -> Option<(ConnKey, FlowEntry, bool)> {
    // SAFETY: caller's contract.
    unsafe {
        let got = take(s, a, due, pause)?;
        release();
        free(s, a);
        Some(got)
    }
}

/// Userspace: [`drain`]'s first half. The slot is left `DRAINING` with its
/// final entry: the kernel neither matches nor reuses it, so it keeps that
/// entry, frozen, until [`free`] (a restarted agent finds it there, which
/// is how `run --state-dir` keeps a drained connection until its last
/// counts are recorded).
///
/// # Safety
/// `s` is a slot of the live table, shared with the kernel.
pub unsafe fn take<A: Atomics>(
    s: *mut Slot,
    a: &A,
    due: impl Fn(&FlowEntry) -> bool,
    mut pause: impl FnMut(),
) -> Option<(ConnKey, FlowEntry, bool)> {
    // SAFETY: caller's contract.
    unsafe {
        let st = &raw mut (*s).state;
        let ended = match a.cas_u32(st, state::LIVE, state::DRAINING) {
            state::LIVE => false,
            state::ENDED => {
                if a.cas_u32(st, state::ENDED, state::DRAINING) != state::ENDED {
                    return None;
                }
                true
            }
            _ => return None,
        };
        while core::ptr::read_volatile(&raw const (*s).entry.dir[0].lock) != 0
            || core::ptr::read_volatile(&raw const (*s).entry.dir[1].lock) != 0
            || core::ptr::read_volatile(&raw const (*s).writers) != 0
        {
            pause();
        }
        let key = core::ptr::read_volatile(&raw const (*s).key);
        let entry = core::ptr::read_volatile(&raw const (*s).entry);
        if !ended && !due(&entry) {
            // A packet came since the caller looked: leave it.
            a.xchg_u32(st, state::LIVE);
            return None;
        }
        Some((key, entry, ended))
    }
}

/// Userspace: [`drain`]'s second half, a slot [`take`] left `DRAINING`
/// becomes `FREE` (reusable).
///
/// # Safety
/// `s` is a slot of the live table, shared with the kernel, `DRAINING`.
pub unsafe fn free<A: Atomics>(s: *mut Slot, a: &A) {
    // SAFETY: caller's contract.
    unsafe {
        a.xchg_u32(&raw mut (*s).state, state::FREE);
    }
}
