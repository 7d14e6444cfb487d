//! flowprobe's tc classifier.
//!
//! The common packet (untagged Ethernet, IPv4 without options, TCP) is read
//! with a handful of loads ([`fast_tc`]); everything else goes through the
//! very same `parse_frame` that userspace runs, directly on the skb's
//! linear data (`data`/`data_end`, no copy; `bpf_skb_pull_data` only when
//! the headers are not all linear). The outcome is counted in
//! `PARSE_STATS`, and the connection's slot in `CONNS` is found or made
//! (`probe_common::slots`) and updated under its own lock with
//! `probe_common::update`: the very tracker and counters replay runs.
//! Ingress and egress share one entry.
//!
//! The program fails open: whatever happens, it returns `TC_ACT_OK`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
// `asm!` for the BPF target: an empty one is the compiler barrier before a
// plain-store unlock (`Bpf::unlock`).
#![feature(asm_experimental_arch)]
#![allow(internal_features)]

use core::ffi::c_void;
use core::intrinsics::{atomic_cxchg, atomic_or, atomic_xadd, atomic_xchg, AtomicOrdering};

use aya_ebpf::{
    bindings::{__sk_buff, xdp_action::XDP_PASS, xdp_md, BPF_F_MMAPABLE, TC_ACT_OK},
    btf_maps::{Array, PerCpuArray},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_ns, bpf_loop, bpf_skb_cgroup_id,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use probe_common::{
    contract::{self, ConnStat, PARSE_STATS_LEN, PARSE_TRACKED},
    parse::{tcp_flags, TcpHeader},
    parse_frame_ex,
    slots::{self, locate, Located, Slot, Slots},
    update::{update_contended, update_locked, Clock, Pkt},
    Atomics, ConnKey, Decap, Encap, FlowEntry, LinkType, PacketBytes, ParseError, Parsed,
};

/// Bytes made linear with `bpf_skb_pull_data` when the headers are not:
/// Ethernet + VLAN tags + IPv6 + a tunnel header + the tunnelled Ethernet
/// and IPv6 headers + the TCP header fields the tracker reads.
const SNAP: usize = 256;

/// Frames by parse outcome: [`PARSE_TRACKED`], or skipped for a
/// [`ParseError`] (`contract::parse_skipped`).
#[btf_map]
static PARSE_STATS: PerCpuArray<u64, PARSE_STATS_LEN> = PerCpuArray::new();

/// Default capacity of `CONNS` (a power of two); userspace sets its own
/// before loading, with `CONNS_MASK` to match.
const MAX_CONNS: usize = 65536;

/// One slot per connection and interface, both directions (see
/// `probe_common::slots`). Userspace maps it and drains entries in place.
#[btf_map]
static CONNS: Array<Slot, MAX_CONNS, { BPF_F_MMAPABLE as usize }> = Array::new();

/// Bit `i` set: slot `i` of `CONNS` was taken by a connection and not
/// drained since; so that userspace reads the few slots in use, not all.
#[btf_map]
static OCCUPIED: Array<u64, { MAX_CONNS / 64 }, { BPF_F_MMAPABLE as usize }> = Array::new();

/// `CONNS`'s slot count − 1, and the per-run hash seed: set by userspace
/// before loading (read-only data, so the verifier sees constants).
#[unsafe(no_mangle)]
static CONNS_MASK: u32 = MAX_CONNS as u32 - 1;
#[unsafe(no_mangle)]
static CONNS_SEED: u64 = 0;

/// 1: a plain store releases a lock ([`Bpf::unlock`]), because the CPU
/// keeps stores in order and never moves one before an earlier load (x86,
/// "TSO"). Set by userspace for the host it runs on; 0 (the default, and
/// what `tc` loading the object leaves) releases with an atomic exchange,
/// correct everywhere. Read-only data: the verifier drops the branch not
/// taken.
#[unsafe(no_mangle)]
static UNLOCK_BY_STORE: u8 = 0;

/// 1: connections are keyed per interface (`--per-interface`); 0 (the
/// default): one entry per connection on the host, each direction counted
/// at the first interface that sees it (`DirState::claim`), so that a
/// packet crossing a container's veth, a bridge port and an uplink counts
/// once.
#[unsafe(no_mangle)]
static PER_IFACE: u8 = 0;

/// Non-zero: no decapsulation (`--no-decap`); the UDP ports of VXLAN and
/// Geneve (0: not looked into). Read-only data, set by userspace.
#[unsafe(no_mangle)]
static NO_DECAP: u8 = 0;
#[unsafe(no_mangle)]
static VXLAN_PORT: u16 = Decap::DEFAULT.vxlan_port;
#[unsafe(no_mangle)]
static GENEVE_PORT: u16 = Decap::DEFAULT.geneve_port;

/// The decapsulations the globals ask for.
#[inline(always)]
fn decap() -> Decap {
    // SAFETY: plain globals (see `Table::mask`).
    unsafe {
        Decap {
            enabled: core::ptr::read_volatile(&raw const NO_DECAP) == 0,
            vxlan_port: core::ptr::read_volatile(&raw const VXLAN_PORT),
            geneve_port: core::ptr::read_volatile(&raw const GENEVE_PORT),
        }
    }
}

/// What the general parser makes of the frame it is on (this CPU's), kept
/// in map memory rather than on the stack: the stack's deepest call chain
/// has no room for the outer layers, and the verifier does not track map
/// memory, so the many ways through the parser (each writing other
/// constants) meet in one state where the connection update is called.
#[repr(C)]
struct Scratch {
    parsed: Parsed,
    /// The frame's outer layers, until `count` copies them into a new entry.
    encap: Encap,
    /// [`Linear::opaque`]'s word.
    opaque: u64,
}

#[btf_map]
static SCRATCH: PerCpuArray<Scratch, 1> = PerCpuArray::new();

/// The interface word of a key and the `seen_at` of a packet seen at
/// `ifindex` ([`PER_IFACE`]).
#[inline(always)]
fn scope(ifindex: u32) -> (u32, u32) {
    // SAFETY: a plain global (see `Table::mask`).
    if unsafe { core::ptr::read_volatile(&raw const PER_IFACE) } != 0 {
        (ifindex, 0)
    } else {
        (0, ifindex.wrapping_add(1))
    }
}

/// Tries for an entry's lock before counting the packet without a verdict.
/// The holder is a tc program on another CPU, done within a few hundred
/// nanoseconds unless the hypervisor stops its virtual CPU: on a 2-vCPU VM
/// at 12 Gbit/s over veth, 64 and 1024 tries (tens of microseconds) still
/// gave up a few times in 5 s; 16384 (about a millisecond, spent only when
/// the holder is stalled) did not in 20 s.
const LOCK_SPINS: u32 = 16384;

/// Connection-table events that lose data or the tracker's verdict, so
/// that none is silent: indexed by [`ConnStat`].
#[btf_map]
static CONN_STATS: PerCpuArray<u64, { contract::CONN_STATS_LEN }> = PerCpuArray::new();

/// `$item` (a map, a global or a program) is the one the contract names
/// `$name`: aya names maps after their identifiers, which a constant
/// cannot give.
macro_rules! named {
    (static $item:ident, $name:expr) => {
        const _: () = {
            let _ = &raw const $item;
            assert!(contract::same_name(stringify!($item), $name));
        };
    };
    (fn $item:ident, $name:expr) => {
        const _: () = {
            let _ = $item;
            assert!(contract::same_name(stringify!($item), $name));
        };
    };
}
named!(static CONNS, contract::CONNS);
named!(static OCCUPIED, contract::OCCUPIED);
named!(static PARSE_STATS, contract::PARSE_STATS);
named!(static CONN_STATS, contract::CONN_STATS);
named!(static CONNS_MASK, contract::CONNS_MASK);
named!(static CONNS_SEED, contract::CONNS_SEED);
named!(static UNLOCK_BY_STORE, contract::UNLOCK_BY_STORE);
named!(static PER_IFACE, contract::PER_IFACE);
named!(static NO_DECAP, contract::NO_DECAP);
named!(static VXLAN_PORT, contract::VXLAN_PORT);
named!(static GENEVE_PORT, contract::GENEVE_PORT);
named!(static SCRATCH, contract::SCRATCH);
named!(fn flowprobe_tc, contract::TC_PROGRAM);
named!(fn flowprobe_xdp, contract::XDP_PROGRAM);

// The socket-owner programs (cgroup hooks), after `named!`.
mod owners;

/// Largest header offset the parser may ask for; a bound the verifier needs
/// for variable offsets into the packet (IPv6 extension headers).
const MAX_OFF: usize = 0x3fff;

/// The skb's linear data, read in place (direct packet access): every load
/// is checked against `data_end`, the check the verifier demands.
struct Linear {
    data: usize,
    end: usize,
    /// This CPU's [`Scratch::opaque`].
    opaque: *mut u64,
}

impl PacketBytes for Linear {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        if off > MAX_OFF {
            return None;
        }
        let start = self.data + off;
        if start + N > self.end {
            return None;
        }
        // SAFETY: `[start, start + N)` lies inside the linear packet data.
        Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
    }

    /// Through this CPU's [`Scratch::opaque`]: the verifier does not track
    /// values in map memory, so what comes back is a number it knows
    /// nothing of (`load` bounds it again).
    #[inline(always)]
    fn opaque(&self, off: usize) -> usize {
        // SAFETY: a per-CPU array slot, this CPU's while it runs.
        unsafe {
            core::ptr::write_volatile(self.opaque, off as u64);
            core::ptr::read_volatile(self.opaque) as usize
        }
    }
}

#[classifier]
pub fn flowprobe_tc(ctx: TcContext) -> i32 {
    if !fast_tc(ctx.skb.skb) {
        slow_tc(&ctx);
    }
    TC_ACT_OK
}

/// Untagged Ethernet, IPv4 without options or fragments, TCP: nearly every
/// packet, read with ten loads instead of the general parser (which
/// `tests/live_tc/test_run.rs` holds to the same counts through
/// `BPF_PROG_TEST_RUN`). Returns false, having done nothing, for anything
/// else.
///
/// Takes the raw `__sk_buff` and loads `data`/`data_end` itself, volatile,
/// for the reason given at [`parse_xdp`].
#[inline(never)]
fn fast_tc(skb: *mut __sk_buff) -> bool {
    // SAFETY: the program's own context, valid while it runs.
    let (data, end, ifindex) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).data) as usize,
            core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
            (*skb).ifindex,
        )
    };
    fast::<true>(data, end, ifindex, skb)
}

/// [`fast_tc`] at XDP: the same common packet, one segment, keyed without
/// the interface (see [`flowprobe_xdp`]).
#[inline(never)]
fn fast_xdp(ctx: *mut xdp_md) -> bool {
    // SAFETY: the program's own context, valid while it runs.
    let (data, end, ifindex) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx).data_end) as usize,
            (*ctx).ingress_ifindex,
        )
    };
    fast::<false>(data, end, ifindex, core::ptr::null_mut())
}

/// The fast path's parse and count of the frame in `[data, end)`, seen at
/// `ifindex`; `TC`: `skb` is its `__sk_buff` (GSO segments, the socket).
#[inline(always)]
fn fast<const TC: bool>(data: usize, end: usize, ifindex: u32, skb: *mut __sk_buff) -> bool {
    if data + 54 > end {
        return false;
    }
    // Unaligned loads (the target allows them; x86 and arm64 do them at
    // full speed), values in network order: compared as little-endian words.
    // SAFETY: every offset read lies below 54, checked against data_end.
    let rd16 = |o: usize| unsafe { core::ptr::read_unaligned((data + o) as *const u16) };
    // SAFETY: as above.
    let rd32 = |o: usize| unsafe { core::ptr::read_unaligned((data + o) as *const u32) };
    // Ethertype 0x0800; version 4 with a 20-byte header.
    if rd16(12) != 0x0008 || rd16(14) & 0xff != 0x45 {
        return false;
    }
    // Neither more fragments nor an offset; protocol 6.
    let frag_proto = rd32(20);
    if frag_proto & 0xff3f != 0 || frag_proto >> 24 != 6 {
        return false;
    }
    let tot_len = u16::from_be(rd16(16)) as u32;
    let off_flags = rd16(46);
    let doff = ((off_flags & 0xf0) >> 2) as u32;
    // tot_len 0 is IPv4 BIG TCP: the general parser takes the length from
    // the skb.
    if tot_len < 40 || doff < 20 || doff > tot_len - 20 {
        return false;
    }
    let (saddr, daddr, ports) = (rd32(26), rd32(30), rd32(34));
    let (sport, dport) = (u16::from_be(ports as u16), u16::from_be((ports >> 16) as u16));
    // `ConnKey::of`: the endpoint with the smaller (address, port) is lo.
    let s = (u32::from_be(saddr) as u64) << 16 | sport as u64;
    let d = (u32::from_be(daddr) as u64) << 16 | dport as u64;
    let forward = s <= d;
    let (lo, lo_port, hi, hi_port) = if forward {
        (saddr, sport, daddr, dport)
    } else {
        (daddr, dport, saddr, sport)
    };
    let (key_iface, seen_at) = scope(ifindex);
    // XDP keys without the interface: a forwarded connection's two
    // directions enter through two.
    let key_iface = if TC { key_iface } else { 0 };
    let payload_len = tot_len - 20 - doff;
    // A segment without payload is never a GSO super-packet: its segment
    // count (in skb_shared_info, a cache line of its own at the end of the
    // buffer) is only read for data.
    let segs = if !TC || payload_len == 0 {
        1
    } else {
        // SAFETY: the program's own context.
        unsafe { (*skb).gso_segs }.max(1)
    };
    // The key as its six words: IPv4-mapped addresses (::ffff:a.b.c.d),
    // ports, protocol 6, family 4, the interface.
    let key = ConnKey::from_words([
        0,
        0xffff_0000 | (lo as u64) << 32,
        0,
        0xffff_0000 | (hi as u64) << 32,
        lo_port as u64 | (hi_port as u64) << 16 | 6 << 32 | 4 << 40,
        key_iface as u64,
    ]);
    let p = Pkt {
        is_tcp: true,
        tcp: TcpHeader {
            seq: u32::from_be(rd32(38)),
            ack: u32::from_be(rd32(42)),
            flags: (off_flags >> 8) as u8,
            window: u16::from_be(rd16(48)),
        },
        payload_len,
        l3_len: tot_len,
    };
    bump(&PARSE_STATS, PARSE_TRACKED);
    count::<TC, false>(&key, Seen::new(if forward { 0 } else { 1 }, segs), &p, seen_at, skb);
    true
}

/// Every other frame: the general parser.
#[inline(never)]
fn slow_tc(ctx: &TcContext) {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let idx = parse_skb(ctx, s);
    bump(&PARSE_STATS, idx);
    if idx == PARSE_TRACKED {
        // SAFETY: the program's own `__sk_buff`, valid while it runs.
        let (ifindex, gso_segs) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_segs) };
        // SAFETY: `parse_skb` wrote it when it returned PARSE_TRACKED.
        let p = unsafe { &(*s).parsed };
        let (key_iface, seen_at) = scope(ifindex);
        let (key, dir) = ConnKey::of(&p.key, key_iface, p.tunnel);
        count_call::<true>(&key, Seen::new(dir, gso_segs.max(1)), &p.pkt(), seen_at, ctx.skb.skb);
    }
}


/// The local socket behind a packet this host sends (tc egress carries it;
/// ingress before the socket lookup and forwarded packets do not): its
/// cookie and cgroup v2 id, once per direction. Userspace joins them to a
/// process and container even when the socket and the process were gone
/// before it looked (`probe/src/attrib`). Two helper calls, made for the
/// first packet with a socket only (the caller checks `sk_noted` and the
/// socket); the caller holds the entry's lock.
#[inline(never)]
fn note_socket(skb: *mut __sk_buff, entry: *mut FlowEntry, dir: usize) {
    let dir = dir & 1;
    // SAFETY: the program's own `__sk_buff`; `entry` a live, locked slot's.
    unsafe {
        let cookie = bpf_get_socket_cookie(skb.cast());
        if cookie == 0 {
            return;
        }
        (*entry).sk_cgroup[dir] = bpf_skb_cgroup_id(skb);
        (*entry).sk_cookie[dir] = cookie;
        (*entry).sk_noted[dir] = 1;
    }
}

/// The same count at XDP, for gateways: ingress only, every frame one
/// segment (no GSO before the driver's receive path). A forwarded
/// connection enters through two interfaces, one per direction, so its key
/// has interface 0 here: both directions meet in one entry.
#[xdp]
pub fn flowprobe_xdp(ctx: XdpContext) -> u32 {
    if fast_xdp(ctx.ctx) {
        return XDP_PASS;
    }
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return XDP_PASS;
    };
    let idx = parse_xdp(ctx.ctx, s);
    bump(&PARSE_STATS, idx);
    if idx == PARSE_TRACKED {
        // SAFETY: `parse_xdp` wrote it when it returned PARSE_TRACKED.
        let p = unsafe { &(*s).parsed };
        // The key has interface 0 whatever PER_IFACE says: the two
        // directions of a forwarded connection enter on two interfaces.
        // SAFETY: the program's own context.
        let (_, seen_at) = scope(unsafe { (*ctx.ctx).ingress_ifindex });
        let (key, dir) = ConnKey::of(&p.key, 0, p.tunnel);
        count_call::<false>(&key, Seen::new(dir, 1), &p.pkt(), seen_at, core::ptr::null_mut());
    }
    XDP_PASS
}

/// [`parse_skb`] for an XDP frame: its linear data is all there is (the
/// fragments of a multi-buffer frame hold payload, not headers).
///
/// Takes the raw context and loads `data`/`data_end` itself, volatile: the
/// verifier knows them as packet pointers only as loads from the context,
/// and LLVM would otherwise hoist the loads into the caller and pass them
/// here as plain 32-bit numbers.
#[inline(never)]
fn parse_xdp(ctx: *mut xdp_md, s: *mut Scratch) -> u32 {
    // SAFETY: the program's own context, valid while it runs.
    let (data, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx).data_end) as usize,
        )
    };
    let len = end.saturating_sub(data) as u32;
    parse_linear(data, end, len, s)
}

/// Parses the skb's headers in place into `s`; returns the `PARSE_STATS`
/// index of the outcome (`s.parsed` is written only for [`PARSE_TRACKED`]).
///
/// Not inlined: the parser's frame and the connection update's frame need
/// not fit into the 512-byte BPF stack together.
#[inline(never)]
fn parse_skb(ctx: &TcContext, s: *mut Scratch) -> u32 {
    let skb_len = ctx.len();
    let idx = parse_skb_once(ctx.skb.skb, skb_len, s);
    let truncated = [ParseError::TruncatedL2, ParseError::TruncatedL3, ParseError::TruncatedL4]
        .map(contract::parse_skipped);
    if (idx == truncated[0] || idx == truncated[1] || idx == truncated[2])
        && ((ctx.data_end() - ctx.data()) as u32) < skb_len
    {
        // The headers are not all in the linear data (rare: the stack
        // usually keeps them there). Pull up to SNAP bytes and retry.
        if ctx.pull_data(skb_len.min(SNAP as u32)).is_ok() {
            return parse_skb_once(ctx.skb.skb, skb_len, s);
        }
    }
    idx
}

/// One [`parse_linear`] of the skb's linear data as it is now.
///
/// Takes the raw `__sk_buff` and loads `data`/`data_end` itself, volatile,
/// for the reason given at [`parse_xdp`].
#[inline(never)]
fn parse_skb_once(skb: *mut __sk_buff, skb_len: u32, s: *mut Scratch) -> u32 {
    // SAFETY: the program's own context, valid while it runs.
    let (data, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*skb).data) as usize,
            core::ptr::read_volatile(&raw const (*skb).data_end) as usize,
        )
    };
    parse_linear(data, end, skb_len, s)
}

/// `parse_frame_ex` of the Ethernet frame in `[data, end)` into this CPU's
/// scratch `s`, with the decapsulations the globals ask for.
#[inline(always)]
fn parse_linear(data: usize, end: usize, wire_len: u32, s: *mut Scratch) -> u32 {
    // SAFETY: this CPU's scratch slot, used by this program run only.
    let s = unsafe { &mut *s };
    s.encap = Encap::default();
    let b = Linear {
        data,
        end,
        opaque: &raw mut s.opaque,
    };
    match parse_frame_ex(&b, LinkType::Ethernet, wire_len, &decap(), &mut s.encap) {
        Ok(p) => {
            s.parsed = p;
            PARSE_TRACKED
        }
        Err(e) => contract::parse_skipped(e),
    }
}

#[inline(always)]
fn bump<const N: usize>(stats: &PerCpuArray<u64, N>, idx: u32) {
    if let Some(count) = stats.get_ptr_mut(idx) {
        // SAFETY: a per-CPU array slot, written only by this CPU while the
        // program runs (preemption is disabled), read only by userspace.
        unsafe { *count += 1 };
    }
}

/// BPF atomics (`-C target-cpu=v3`) for the shared tracker and counters.
struct Bpf;

impl Atomics for Bpf {
    #[inline(always)]
    unsafe fn add_u64(&self, p: *mut u64, v: u64) {
        // SAFETY: the caller passes a field of a live map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
    }
    #[inline(always)]
    unsafe fn cas_u32(&self, p: *mut u32, old: u32, new: u32) -> u32 {
        // SAFETY: as above.
        unsafe {
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
                .0
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: as above.
        unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(p, v) }
    }
    /// At iperf3 load the exchange cost about 25 ns a packet, a sixth of
    /// the program's run time (`bench/tc.sh`, 1.85× the empty program with
    /// a plain store against 2.11× with the exchange). A store-release
    /// instruction needs `-mcpu=v4`, which kernels before 6.15 reject; so
    /// the plain store is used where the hardware makes it one (see
    /// [`UNLOCK_BY_STORE`]), the exchange elsewhere.
    #[inline(always)]
    unsafe fn unlock(&self, p: *mut u32) {
        // SAFETY: a plain global (see `Table::mask`).
        if unsafe { core::ptr::read_volatile(&raw const UNLOCK_BY_STORE) } != 0 {
            // SAFETY: an empty `asm!` that may touch any memory: LLVM keeps
            // every load and store of the update before it. Then one store,
            // which the CPU makes visible only after the update's stores.
            unsafe {
                core::arch::asm!("", options(nostack, preserves_flags));
                core::ptr::write_volatile(p, 0);
            }
        } else {
            // SAFETY: as above.
            unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(p, 0) };
        }
    }
    #[inline(always)]
    unsafe fn add_u32(&self, p: *mut u32, v: u32) {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) };
    }
    #[inline(always)]
    unsafe fn try_lock(&self, p: *mut u32, spins: u32) -> bool {
        // SAFETY: as above.
        if unsafe { self.cas_u32(p, 0, 1) } == 0 {
            return true;
        }
        let mut spin = Spin { lock: p, got: 0 };
        // SAFETY: `spin` outlives the call; `try_once` matches the callback
        // signature bpf_loop expects.
        unsafe {
            bpf_loop(
                spins,
                try_once as *mut c_void,
                (&raw mut spin).cast::<c_void>(),
                0,
            )
        };
        spin.got != 0
    }
}

/// The kernel's clocks: `jiffies` for every packet's `last_seen_ns` (one
/// load: the verifier inlines `bpf_jiffies64`; `bpf_ktime_get_coarse_ns`
/// cost about 35 ns a packet at load), CLOCK_MONOTONIC for a new entry's
/// `first_seen_ns` and handshake times. Userspace turns the jiffies into
/// CLOCK_MONOTONIC nanoseconds against `first_seen_j`
/// (`probe/src/live/table.rs`).
struct Ktime;

impl Clock for Ktime {
    #[inline(always)]
    fn coarse_ns(&self) -> u64 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_jiffies64() }
    }
    #[inline(always)]
    fn precise_ns(&self) -> u64 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    }
}

/// `bpf_loop` state of one lock attempt.
#[repr(C)]
struct Spin {
    lock: *mut u32,
    got: u32,
}

/// One try for the lock; returns 1 (stop) once taken.
extern "C" fn try_once(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `ctx` is the caller's `Spin` (see `Bpf::try_lock`).
    let spin = unsafe { &mut *ctx.cast::<Spin>() };
    // SAFETY: `spin.lock` is a map value's lock word.
    if unsafe { Bpf.cas_u32(spin.lock, 0, 1) } == 0 {
        spin.got = 1;
        return 1;
    }
    0
}

/// `CONNS` as `probe_common::slots` sees it.
struct Table;

impl Slots for Table {
    #[inline(always)]
    fn slot(&self, i: u32) -> Option<*mut Slot> {
        CONNS.get_ptr_mut(i)
    }
    #[inline(always)]
    fn mask(&self) -> u32 {
        // SAFETY: a plain global; volatile so that the value userspace
        // wrote into the object is read, not the default.
        unsafe { core::ptr::read_volatile(&raw const CONNS_MASK) }
    }
}

/// Records one packet of connection `key` travelling in direction `dir`:
/// finds or makes its slot, updates it under its lock. `TC`: `skb` is the
/// packet's `__sk_buff` (for [`note_socket`]); XDP passes null. `ENC`: the
/// general parser read the frame, and a new entry takes its outer layers
/// from [`SCRATCH`] (the fast path's frames have none).
///
/// Inlined into the fast path (one stream of instructions for the common
/// packet); the general parser and XDP call it through [`count_call`].
#[inline(always)]
fn count<const TC: bool, const ENC: bool>(
    key: &ConnKey,
    seen: Seen,
    p: &Pkt,
    seen_at: u32,
    skb: *mut __sk_buff,
) {
    let (dir, segs) = (seen.dir(), seen.segs());
    // SAFETY: a plain global (see `Table::mask`).
    let seed = unsafe { core::ptr::read_volatile(&raw const CONNS_SEED) };
    let flags = if p.is_tcp { Some(p.tcp.flags) } else { None };
    // A pure SYN may open a new connection on a 5-tuple used before.
    let syn = (p.is_tcp && p.tcp.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN)
        .then_some(p.tcp.seq);
    // SAFETY: `Table` hands out `CONNS` slots, written only through
    // `probe_common::slots` and `update` (and userspace's drain).
    let located = unsafe {
        let h = slots::hash(key, seed);
        locate(&Table, key, h, dir, syn, LOCK_SPINS, &Bpf, |e| {
            e.init(Ktime.precise_ns(), dir, key, flags);
            e.first_seen_j = Ktime.coarse_ns();
            if ENC {
                // This CPU's slot, written by the parser of this very frame.
                if let Some(s) = SCRATCH.get_ptr(0) {
                    e.encap = (*s).encap.in_key_order(dir);
                }
            }
        })
    };
    let slot = match located {
        Located::Found(s) => s,
        other => match unusual(other, seen, p, seen_at) {
            Some(s) => s,
            None => return,
        },
    };
    // SAFETY: `locate` returned the slot with its lock held by us.
    let counted = unsafe {
        let e = &raw mut (*slot).entry;
        let counted = update_locked(e, dir, segs, p, seen_at, &Ktime);
        if counted && TC && (*e).sk_noted[dir & 1] == 0 && !(*skb).__bindgen_anon_2.sk.is_null()
        {
            note_socket(skb, e, dir);
        }
        Bpf.unlock(&raw mut (*e).dir[dir & 1].lock);
        counted
    };
    if !counted {
        bump(&CONN_STATS, ConnStat::Duplicate.index());
    }
}

/// [`count`] as a function of its own: its own stack frame, beside the
/// general parser's.
#[inline(never)]
fn count_call<const TC: bool>(
    key: &ConnKey,
    seen: Seen,
    p: &Pkt,
    seen_at: u32,
    skb: *mut __sk_buff,
) {
    count::<TC, true>(key, seen, p, seen_at, skb)
}

/// A packet's direction and segment count in one argument: a BPF function
/// takes five arguments at most.
#[derive(Clone, Copy)]
struct Seen(u64);

impl Seen {
    #[inline(always)]
    fn new(dir: usize, segs: u32) -> Seen {
        Seen((segs as u64) << 1 | (dir & 1) as u64)
    }
    #[inline(always)]
    fn dir(self) -> usize {
        (self.0 & 1) as usize
    }
    #[inline(always)]
    fn segs(self) -> u32 {
        (self.0 >> 1) as u32
    }
}

/// Everything [`count`] meets but an existing entry: a new one (marked in
/// `OCCUPIED`, returned for the update), a held lock, a full probe
/// sequence. Not inlined, to keep the common path short.
#[inline(never)]
fn unusual(located: Located, seen: Seen, p: &Pkt, seen_at: u32) -> Option<*mut Slot> {
    let (dir, segs) = (seen.dir(), seen.segs());
    match located {
        Located::Found(s) => Some(s),
        Located::New(s, idx) => {
            if let Some(w) = OCCUPIED.get_ptr_mut(idx >> 6) {
                // SAFETY: a live map value; userspace clears bits atomically.
                unsafe { atomic_or::<u64, u64, { AtomicOrdering::SeqCst }>(w, 1 << (idx & 63)) };
            }
            Some(s)
        }
        Located::Contended(s) => {
            // SAFETY: a live slot, its writer registration ours; counted
            // atomically without its lock.
            let counted = unsafe {
                let counted = update_contended(&raw mut (*s).entry, dir, segs, p, seen_at, &Ktime, &Bpf);
                slots::contended_done(s, &Bpf);
                counted
            };
            let stat = if counted {
                ConnStat::Contended
            } else {
                ConnStat::Duplicate
            };
            bump(&CONN_STATS, stat.index());
            None
        }
        Located::Full => {
            bump(&CONN_STATS, ConnStat::Full.index());
            None
        }
        Located::Busy => {
            bump(&CONN_STATS, ConnStat::InsertFailed.index());
            None
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable panic
    // path (it would be an infinite loop).
    loop {}
}
