//! What flowprobe keeps per connection: [`FlowEntry`], the value of a
//! kernel table slot and of the userspace flow table, with each
//! direction's [`DirState`] and [`DirCounters`].
//!
//! `#[repr(C)]` with explicit padding, so that an entry the eBPF program
//! wrote reads back identically in userspace.

use crate::initiator::{evidence, initiator_of};
use crate::key::ConnKey;
use crate::parse::Encap;
use crate::tcp::{Holes, TcpDir, Verdict, VerdictKind};

/// Monotonic counters for one direction of one connection.
///
/// Field meanings are the README's "What every number means".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Wire segments (`gso_segs` where known, frames otherwise).
    pub packets: u64,
    /// TCP/UDP payload bytes, retransmissions included.
    pub bytes: u64,
    /// Sum of the IP packets' total lengths, headers included.
    pub l3_bytes: u64,
    /// Retransmitted segments (SYN and FIN retransmissions included).
    pub retransmits: u64,
    /// Payload bytes at or below the highest sequence already seen.
    pub retransmitted_bytes: u64,
    /// Keepalives and zero-window probes (never counted as retransmits).
    pub probes: u64,
    /// Segments that started beyond the highest sequence seen: data lost
    /// upstream of the capture point, or reordered.
    pub gaps: u64,
    /// Unused: keeps each direction's counters on a cache line of their
    /// own in a kernel table slot ([`FlowEntry`]).
    pub _pad: u64,
}

impl DirCounters {
    /// Adds every counter of `o` (the same direction of a later entry).
    pub fn add(&mut self, o: &DirCounters) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.l3_bytes += o.l3_bytes;
        self.retransmits += o.retransmits;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.probes += o.probes;
        self.gaps += o.gaps;
    }

    /// Adds one frame or GSO super-packet of `segs` wire segments. `tcp` is
    /// the tracker's verdict, `None` for UDP.
    #[inline(always)]
    pub fn record(&mut self, segs: u32, payload_len: u32, l3_len: u32, tcp: Option<&Verdict>) {
        // Only what a verdict changes is touched: in the eBPF program every
        // instruction of this common path is fetched afresh nearly every
        // packet.
        self.packets += segs as u64;
        self.bytes += payload_len as u64;
        self.l3_bytes += l3_len as u64;
        let Some(v) = tcp else { return };
        match v.kind {
            VerdictKind::Retransmit => self.retransmits += segs as u64,
            VerdictKind::Probe => self.probes += 1,
            _ => {}
        }
        if v.retransmitted_bytes != 0 {
            self.retransmitted_bytes += v.retransmitted_bytes as u64;
        }
        if v.gap {
            self.gaps += 1;
        }
    }
}

/// One direction's own state in a [`FlowEntry`]: everything a packet of
/// that direction writes but its counters, on one cache line of its own in
/// a kernel table slot. Only the direction's own packets write it (under
/// its `lock`), but for the reverse direction's handshake answer
/// (`hs_ns`), so that two CPUs that handle the two directions of one
/// connection each write their own line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirState {
    /// 0 or 1: taken while one CPU updates this direction
    /// ([`crate::update`]). Alone in its 8-byte word, which a new slot's
    /// zeroing skips ([`crate::slots`]).
    pub lock: u32,
    pub _pad: u32,
    /// The tracker's state; 8-byte aligned, so that the reverse direction
    /// reads its `ack` and `flags` in one load ([`crate::update`]).
    pub tcp: TcpDir,
    /// Where this direction is counted: the interface index + 1 of the
    /// first packet that counted for it (0: none yet, or keys per
    /// interface). See [`DirState::claim`].
    pub seen_at: u32,
    /// CLOCK_MONOTONIC of this direction's last packet (0: none yet). In a
    /// kernel table slot: the kernel's `jiffies` instead (one load a
    /// packet), which the reader turns into nanoseconds with
    /// [`FlowEntry::jiffies_to_ns`] before anything else sees the entry.
    pub last_seen_ns: u64,
    /// The tracker's reordering holes.
    pub holes: Holes,
    /// The sequence end of this direction's SYN, which the answer must
    /// acknowledge.
    pub hs_end: u32,
    pub _pad3: u32,
    /// When this direction's SYN was sent (while timed), then the
    /// handshake sample in nanoseconds ([`crate::handshake`]).
    pub hs_ns: u64,
}

impl DirState {
    /// Whether a packet of this direction seen at `at` (interface index +
    /// 1) counts, claiming the direction for `at` if nothing has yet.
    ///
    /// On a host the same packet may cross several interfaces (a
    /// container's veth, then the bridge port of the other container, then
    /// an uplink): the connection is one, and each direction is counted
    /// once, at the first interface that saw it, which is the one nearest
    /// its sender and so keeps retransmits exact (a segment lost between
    /// two interfaces was still sent, and its retransmission is seen first
    /// where the original was). `at == 0` (keys per interface, each
    /// interface its own entry) always counts and claims nothing.
    #[inline(always)]
    pub fn claim(&mut self, at: u32) -> bool {
        if self.seen_at == at {
            return true;
        }
        if self.seen_at == 0 {
            self.seen_at = at;
            return true;
        }
        false
    }
}

/// Everything the tc program knows about one connection: the value of a
/// kernel table slot ([`crate::slots::Slot`]) and of the userspace flow
/// table. Direction index 0 is `lo → hi` of the key, as in
/// [`ConnKey::of`].
///
/// Field order is cache-line order in a [`crate::slots::Slot`] (the entry
/// starts 56 bytes into a 64-byte-aligned slot): the first 8 bytes share
/// the key's line, which stays read-only once the handshake is over; then
/// each direction's [`DirState`] and each direction's counters, a line
/// each; what only new connections, the first packet from a socket and
/// contended writers touch comes last. A packet writes two lines, both its
/// direction's own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEntry {
    /// [`crate::handshake`] state of each direction's leg, a byte each
    /// (the two directions' packets write them under different locks).
    pub hs_flags: [u8; 2],
    /// Direction index the initiator sends in ([`initiator_of`]).
    pub initiator: u8,
    /// [`evidence`] for `initiator`.
    pub evidence: u8,
    /// Non-zero: `sk_cookie[d]` and `sk_cgroup[d]` are set (tc only).
    pub sk_noted: [u8; 2],
    pub _pad: [u8; 2],
    pub dir: [DirState; 2],
    pub counters: [DirCounters; 2],
    /// When the first packet was seen (precise clock).
    pub first_seen_ns: u64,
    /// In a kernel table slot: `jiffies` when `first_seen_ns` was taken.
    pub first_seen_j: u64,
    /// Per direction, when this host sent it from a local socket (tc
    /// only): the socket's cookie (0: none seen) and its cgroup v2 id.
    pub sk_cookie: [u64; 2],
    pub sk_cgroup: [u64; 2],
    /// Per direction, packets, payload bytes and IP bytes counted without
    /// the lock ([`crate::update::update_contended`]), added atomically:
    /// apart from `counters`, which the lock holder adds to with plain
    /// adds. Readers fold them in with [`FlowEntry::fold_late`].
    pub late: [[u64; 3]; 2],
    /// What wrapped the connection's first packet (VLAN tags, MPLS,
    /// PPPoE, a tunnel), with the outer source on the `lo` end's side of
    /// the key ([`Encap::in_key_order`]): written once, when the entry is
    /// made, in the slot's last two cache lines (which no packet of an
    /// existing connection touches but a contended writer's).
    pub encap: Encap,
}

impl FlowEntry {
    /// A new entry for a connection first seen at `now_ns` with a packet in
    /// direction `dir`; counters empty (the caller records the packet).
    #[inline(always)]
    pub fn new(now_ns: u64, dir: usize, key: &ConnKey, tcp_flags: Option<u8>) -> FlowEntry {
        let mut e = FlowEntry::default();
        e.init(now_ns, dir, key, tcp_flags);
        e
    }

    /// What [`FlowEntry::new`] sets, on an entry that is otherwise zero
    /// (a kernel table slot, [`crate::slots::locate`]).
    #[inline(always)]
    pub fn init(&mut self, now_ns: u64, dir: usize, key: &ConnKey, tcp_flags: Option<u8>) {
        let (initiator, evidence) = initiator_of(dir, key, tcp_flags);
        self.first_seen_ns = now_ns;
        self.dir[dir & 1].last_seen_ns = now_ns;
        self.initiator = initiator as u8;
        self.evidence = evidence;
    }

    /// When the last packet either way was seen.
    #[inline(always)]
    pub fn last_seen_ns(&self) -> u64 {
        self.dir[0].last_seen_ns.max(self.dir[1].last_seen_ns)
    }

    /// A kernel table slot's `last_seen_ns` (jiffies) as CLOCK_MONOTONIC
    /// nanoseconds: `first_seen_ns` plus the jiffies since, at `tick_ns` a
    /// jiffy (`clock_getres(CLOCK_MONOTONIC_COARSE)`). Within a tick of the
    /// truth, never before `first_seen_ns`.
    pub fn jiffies_to_ns(&mut self, tick_ns: u64) {
        for d in &mut self.dir {
            if d.last_seen_ns == 0 {
                // No packet this way yet.
                continue;
            }
            let ticks = d.last_seen_ns.wrapping_sub(self.first_seen_j);
            // A jiffy count below first_seen_j cannot happen; if it did,
            // the first packet's time is the best answer.
            let ticks = if (ticks as i64) < 0 { 0 } else { ticks };
            d.last_seen_ns = self.first_seen_ns + ticks * tick_ns;
        }
    }

    /// Adds `o`, another entry of the same key (a later one, or a second
    /// slot of it), to `self`: counters, and the span of both. Direction
    /// indices agree: both are relative to the same key.
    pub fn absorb(&mut self, o: &FlowEntry) {
        for (c, t) in self.counters.iter_mut().zip(o.counters.iter()) {
            c.add(t);
        }
        self.first_seen_ns = self.first_seen_ns.min(o.first_seen_ns);
        for (d, t) in self.dir.iter_mut().zip(o.dir.iter()) {
            d.last_seen_ns = d.last_seen_ns.max(t.last_seen_ns);
        }
    }

    /// Adds `late` into `counters` (and clears it): what a reader of a
    /// kernel entry does before using the counters.
    pub fn fold_late(&mut self) {
        for (c, l) in self.counters.iter_mut().zip(self.late.iter_mut()) {
            c.packets += l[0];
            c.bytes += l[1];
            c.l3_bytes += l[2];
            *l = [0; 3];
        }
    }

    /// The connection is over and its 5-tuple free again: an RST either
    /// way, or a FIN each way (TCP only; UDP never closes).
    #[inline(always)]
    pub fn closed(&self) -> bool {
        TcpDir::closed(self.dir[0].tcp.flags, self.dir[1].tcp.flags)
    }

    /// A pure SYN (no ACK) sent in direction `dir` names the initiator
    /// better than a port or first-packet guess made earlier.
    #[inline(always)]
    pub fn note_syn(&mut self, dir: usize, tcp_flags: u8) {
        use crate::parse::tcp_flags as f;
        if tcp_flags & (f::SYN | f::ACK) == f::SYN && self.evidence < evidence::SYN {
            self.initiator = dir as u8;
            self.evidence = evidence::SYN;
        }
    }
}

// The kernel table's value layout is part of the userspace/kernel
// contract: no implicit padding, fixed sizes.
const _: () = assert!(core::mem::size_of::<DirCounters>() == 64);
const _: () = assert!(core::mem::size_of::<TcpDir>() == 12);
const _: () = assert!(core::mem::offset_of!(TcpDir, flags) == 4);
const _: () = assert!(core::mem::size_of::<DirState>() == 64);
const _: () = assert!(core::mem::offset_of!(DirState, tcp) == 8);
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 424);
// The cache-line plan above, as offsets in a slot (entry at 56).
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, dir) == 64);
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, counters) == 192);
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, first_seen_ns) == 320);
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, encap) == 416);
