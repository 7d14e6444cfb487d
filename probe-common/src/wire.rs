//! `#[repr(C)]` types that cross the kernel/userspace boundary.
//!
//! Layouts are explicit (no implicit padding) so that a BPF map value written
//! by the eBPF program reads back identically in userspace.

/// IP protocol numbers flowprobe keeps per-connection state for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    Tcp = 6,
    Udp = 17,
}

impl L4Proto {
    pub const fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

/// One direction of a connection as it appeared on the wire: `src` sent it.
///
/// IPv4 addresses are stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so that
/// keys of both families have one size and one comparison.
///
/// 8-byte aligned, like [`ConnKey`]: the eBPF backend copies and compares
/// the address arrays with byte loads and stores unless it can prove them
/// aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number ([`L4Proto`] as `u8`, kept raw for `Pod`).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The same connection seen in the other direction.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Both directions of a connection under one key: endpoint `lo` is the
/// smaller (address, port). `iface` is where it was seen (interface index
/// live, pcapng interface number in replay). This is the key of the kernel's
/// connection map and of the userspace table, so both join the same way.
///
/// 8-byte aligned (so that the eBPF program copies and hashes its addresses
/// with 8-byte loads, not byte by byte), with the tail padding explicit and
/// zero: the kernel hashes and compares all 48 bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub lo: [u8; 16],
    pub hi: [u8; 16],
    pub lo_port: u16,
    pub hi_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub iface: u32,
    pub _pad2: [u8; 4],
}

impl ConnKey {
    /// The canonical key of `k`, and the direction `k` travels in:
    /// 0 for lo → hi, 1 for hi → lo.
    #[inline(always)]
    pub fn of(k: &FlowKey, iface: u32) -> (ConnKey, usize) {
        // Lexicographic byte order, compared as big-endian halves: comparing
        // the arrays directly would call `memcmp`, which the eBPF verifier
        // checks as a separate global function and rejects.
        let forward = (be_halves(&k.src), k.sport) <= (be_halves(&k.dst), k.dport);
        let (lo, lo_port, hi, hi_port) = if forward {
            (k.src, k.sport, k.dst, k.dport)
        } else {
            (k.dst, k.dport, k.src, k.sport)
        };
        let key = ConnKey {
            lo,
            hi,
            lo_port,
            hi_port,
            proto: k.proto,
            family: k.family,
            _pad: [0; 2],
            iface,
            _pad2: [0; 4],
        };
        (key, if forward { 0 } else { 1 })
    }
}

impl ConnKey {
    /// The key whose memory is these six little-endian words (the eBPF fast
    /// path builds keys this way: six register stores instead of byte
    /// copies).
    #[inline(always)]
    pub fn from_words(w: [u64; 6]) -> ConnKey {
        // SAFETY: 48 bytes either way; every bit pattern is a valid ConnKey.
        unsafe { core::mem::transmute::<[u64; 6], ConnKey>(w) }
    }
}

/// A 16-byte address as two big-endian `u64`s: same order as its bytes.
#[inline(always)]
fn be_halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// Maps a 4-byte IPv4 address into the 16-byte key space.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

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
    /// Retransmitted segments whose data had already been acknowledged when
    /// the retransmission was seen.
    pub spurious: u64,
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
        self.spurious += o.spurious;
    }

    /// Adds one frame or GSO super-packet of `segs` wire segments. `tcp` is
    /// the tracker's verdict, `None` for UDP.
    #[inline(always)]
    pub fn record(
        &mut self,
        segs: u32,
        payload_len: u32,
        l3_len: u32,
        tcp: Option<&crate::tcp::Verdict>,
    ) {
        // Only what a verdict changes is touched: in the eBPF program every
        // instruction of this common path is fetched afresh nearly every
        // packet.
        self.packets += segs as u64;
        self.bytes += payload_len as u64;
        self.l3_bytes += l3_len as u64;
        let Some(v) = tcp else { return };
        match v.kind {
            crate::tcp::VerdictKind::Retransmit => {
                self.retransmits += segs as u64;
                if v.spurious {
                    self.spurious += segs as u64;
                }
            }
            crate::tcp::VerdictKind::Probe => self.probes += 1,
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

/// The atomic operations the shared-state variants need. The eBPF program
/// implements them with BPF atomics; userspace with `core::sync::atomic`;
/// [`Plain`] with ordinary loads and stores (one thread only).
pub trait Atomics {
    /// `*p += v`, atomically.
    ///
    /// # Safety
    /// `p` must be valid and 8-byte aligned.
    unsafe fn add_u64(&self, p: *mut u64, v: u64);
    /// If `*p == old` then `*p = new`, atomically; returns the value `*p`
    /// had before (so the swap happened iff it equals `old`). A full
    /// barrier (it takes [`crate::shared`]'s lock).
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32;
    /// `*p = v`, atomically, returning the old value; a full barrier (it
    /// releases [`crate::shared`]'s lock, so no store may move past it).
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32;

    /// Releases the lock word `*p` (1 → 0) that [`Atomics::try_lock`] or
    /// [`Atomics::cas_u32`] took: every load and store before it happens
    /// before the next holder's. The default is [`Atomics::xchg_u32`], a
    /// full barrier; a release store is enough, and much cheaper.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned, and the lock held by the
    /// caller.
    #[inline(always)]
    unsafe fn unlock(&self, p: *mut u32) {
        // SAFETY: caller's contract.
        unsafe { self.xchg_u32(p, 0) };
    }

    /// `*p += v` (wrapping), atomically, with a full barrier. The default
    /// loops on [`Atomics::cas_u32`]; the eBPF program overrides it with one
    /// atomic add.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    unsafe fn add_u32(&self, p: *mut u32, v: u32) {
        loop {
            // SAFETY: caller's contract.
            let cur = unsafe { core::ptr::read_volatile(p) };
            // SAFETY: as above.
            if unsafe { self.cas_u32(p, cur, cur.wrapping_add(v)) } == cur {
                return;
            }
        }
    }

    /// Takes the lock word `*p` (0 → 1) within `spins` tries; false if it
    /// stayed taken. The eBPF program overrides it with `bpf_loop`, whose
    /// body the verifier walks once instead of once per try.
    ///
    /// # Safety
    /// `p` must be valid and 4-byte aligned.
    #[inline(always)]
    unsafe fn try_lock(&self, p: *mut u32, spins: u32) -> bool {
        for _ in 0..spins {
            // SAFETY: caller's contract.
            if unsafe { self.cas_u32(p, 0, 1) } == 0 {
                return true;
            }
        }
        false
    }
}

/// [`Atomics`] over `core::sync::atomic`: userspace threads, and userspace
/// beside the kernel on memory they share (the mmapped connection table).
/// Not on the BPF target, whose `core` has no such atomics (the eBPF
/// program has its own implementation).
#[cfg(not(target_arch = "bpf"))]
pub struct CoreAtomics;

#[cfg(not(target_arch = "bpf"))]
impl Atomics for CoreAtomics {
    #[inline(always)]
    unsafe fn add_u64(&self, p: *mut u64, v: u64) {
        // SAFETY: caller's contract (valid, 8-byte aligned).
        unsafe { core::sync::atomic::AtomicU64::from_ptr(p) }
            .fetch_add(v, core::sync::atomic::Ordering::SeqCst);
    }
    #[inline(always)]
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32 {
        use core::sync::atomic::Ordering::SeqCst;
        // SAFETY: caller's contract (valid, 4-byte aligned).
        match unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .compare_exchange(old, new, SeqCst, SeqCst)
        {
            Ok(v) | Err(v) => v,
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .swap(v, core::sync::atomic::Ordering::SeqCst)
    }
    #[inline(always)]
    unsafe fn unlock(&self, p: *mut u32) {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .store(0, core::sync::atomic::Ordering::Release);
    }
    #[inline(always)]
    unsafe fn add_u32(&self, p: *mut u32, v: u32) {
        // SAFETY: as above.
        unsafe { core::sync::atomic::AtomicU32::from_ptr(p) }
            .fetch_add(v, core::sync::atomic::Ordering::SeqCst);
    }
}

/// [`Atomics`] for memory no one else touches (tests, single thread).
pub struct Plain;

impl Atomics for Plain {
    #[inline(always)]
    unsafe fn add_u64(&self, p: *mut u64, v: u64) {
        // SAFETY: caller's contract.
        unsafe { *p = (*p).wrapping_add(v) };
    }
    #[inline(always)]
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32 {
        // SAFETY: caller's contract.
        unsafe {
            let cur = *p;
            if cur == old {
                *p = new;
            }
            cur
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: caller's contract.
        unsafe { core::mem::replace(&mut *p, v) }
    }
}

/// How a connection's initiator was decided ([`FlowEntry::evidence`]); a
/// larger value is better evidence.
pub mod evidence {
    /// Equal ports: the sender of the first packet seen.
    pub const FIRST_PACKET: u8 = 0;
    /// The side with the higher (ephemeral) port.
    pub const PORT: u8 = 1;
    /// The side that sent the SYN.
    pub const SYN: u8 = 2;
}

/// The initiator of a connection whose first packet seen travels in
/// direction `dir` of `key` (see [`ConnKey::of`]): the SYN sender; failing
/// that, the side with the higher (ephemeral) port; failing that (equal
/// ports), the sender of that first packet. `tcp_flags` is `None` for UDP.
/// Returns (the initiator's direction index, [`evidence`]).
#[inline(always)]
pub fn initiator_of(dir: usize, key: &ConnKey, tcp_flags: Option<u8>) -> (usize, u8) {
    use crate::parse::tcp_flags as f;
    if let Some(flags) = tcp_flags {
        if flags & f::SYN != 0 {
            let syn_sender = if flags & f::ACK == 0 { dir } else { 1 - dir };
            return (syn_sender, evidence::SYN);
        }
    }
    if key.lo_port > key.hi_port {
        (0, evidence::PORT)
    } else if key.lo_port < key.hi_port {
        (1, evidence::PORT)
    } else {
        (dir, evidence::FIRST_PACKET)
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
    /// ([`crate::shared`]). Alone in its 8-byte word, which a new slot's
    /// zeroing skips ([`crate::table`]).
    pub lock: u32,
    pub _pad: u32,
    /// The tracker's state; 8-byte aligned, so that the reverse direction
    /// reads its `ack` and `flags` in one load ([`crate::shared`]).
    pub tcp: crate::tcp::TcpDir,
    pub _pad2: u32,
    /// CLOCK_MONOTONIC of this direction's last packet (0: none yet). In a
    /// kernel table slot: the kernel's `jiffies` instead (one load a
    /// packet), which the reader turns into nanoseconds with
    /// [`FlowEntry::jiffies_to_ns`] before anything else sees the entry.
    pub last_seen_ns: u64,
    /// The tracker's reordering holes.
    pub holes: crate::tcp::Holes,
    /// The sequence end of this direction's SYN, which the answer must
    /// acknowledge.
    pub hs_end: u32,
    pub _pad3: u32,
    /// When this direction's SYN was sent (while timed), then the
    /// handshake sample in nanoseconds ([`crate::handshake`]).
    pub hs_ns: u64,
}

/// Everything the tc program knows about one connection: the value of a
/// kernel table slot ([`crate::table::Slot`]) and of the userspace flow
/// table. Direction index 0 is `lo → hi` of the key, as in
/// [`ConnKey::of`].
///
/// Field order is cache-line order in a [`crate::table::Slot`] (the entry
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
    /// the lock ([`crate::shared::update_contended`]), added atomically:
    /// apart from `counters`, which the lock holder adds to with plain
    /// adds. Readers fold them in with [`FlowEntry::fold_late`].
    pub late: [[u64; 3]; 2],
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
    /// (a kernel table slot, [`crate::table::locate`]).
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
        use crate::tcp::TcpDir;
        let (f0, f1) = (self.dir[0].tcp.flags, self.dir[1].tcp.flags);
        (f0 | f1) & TcpDir::FLAG_RST != 0 || f0 & f1 & TcpDir::FLAG_FIN != 0
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

// The kernel map's key and value layouts are part of the userspace/kernel
// contract: no implicit padding, fixed sizes.
const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);
const _: () = assert!(core::mem::size_of::<DirCounters>() == 64);
const _: () = assert!(core::mem::size_of::<crate::tcp::TcpDir>() == 12);
const _: () = assert!(core::mem::offset_of!(crate::tcp::TcpDir, flags) == 4);
const _: () = assert!(core::mem::size_of::<DirState>() == 64);
const _: () = assert!(core::mem::offset_of!(DirState, tcp) == 8);
const _: () = assert!(core::mem::size_of::<FlowEntry>() == 360);
// The cache-line plan above, as offsets in a slot (entry at 56).
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, dir) == 64);
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, counters) == 192);
const _: () = assert!(56 + core::mem::offset_of!(FlowEntry, first_seen_ns) == 320);
