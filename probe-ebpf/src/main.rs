//! flowprobe's tc classifier.
//!
//! It copies the first bytes of each packet into a per-CPU buffer with one
//! `bpf_skb_load_bytes`, runs the very same `parse_frame` that userspace runs
//! on `&[u8]`, counts the outcome in `PARSE_STATS`, and updates the
//! connection's entry in `CONNS` with the shared tracker
//! (`probe_common::tcp::track_shared`) and atomic counter adds
//! (`DirCounters::record_shared`). Ingress and egress share one entry.
//!
//! The program fails open: whatever happens, it returns `TC_ACT_OK`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_OK},
    btf_maps::{HashMap, PerCpuArray},
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use probe_common::{
    parse::tcp_flags,
    parse_frame,
    tcp::{track_shared, Segment},
    wire::evidence,
    Atomics, ConnKey, DirCounters, FlowEntry, L4Proto, LinkType, ParseError, Parsed,
};

/// Bytes copied from the front of each packet: Ethernet + 2 VLAN tags +
/// IPv6 + extension headers + the TCP header fields the tracker reads.
const SNAP: usize = 128;

/// Index 0: frames that parsed to a TCP/UDP flow ("tracked");
/// index `e as u32 + 1`: frames rejected with [`ParseError`] `e`.
pub const STATS_TRACKED: u32 = 0;
const STATS_LEN: usize = ParseError::COUNT + 1;

#[btf_map]
static PARSE_STATS: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();

/// Default capacity of `CONNS`; userspace may set another before loading.
const MAX_CONNS: usize = 65536;

/// One entry per connection and interface, both directions (see
/// `probe_common::FlowEntry`). Userspace reads and removes entries.
#[btf_map]
static CONNS: HashMap<ConnKey, FlowEntry, MAX_CONNS> = HashMap::new();

/// Connection-map events that lose data, so that none is silent.
/// Index 0: a new connection was not inserted because `CONNS` is full;
/// 1: the insert failed for another reason; 2: the entry was missing right
/// after a successful insert (removed by userspace in between).
pub const CONN_STATS_FULL: u32 = 0;
pub const CONN_STATS_INSERT_FAILED: u32 = 1;
pub const CONN_STATS_LOST_ENTRY: u32 = 2;
const CONN_STATS_LEN: usize = 3;

#[btf_map]
static CONN_STATS: PerCpuArray<u64, CONN_STATS_LEN> = PerCpuArray::new();

/// Scratch space for the packet's first bytes.
#[btf_map]
static FRAME: PerCpuArray<[u8; SNAP], 1> = PerCpuArray::new();

/// Scratch space for the parse result.
#[btf_map]
static PARSED: PerCpuArray<Parsed, 1> = PerCpuArray::new();

/// Scratch space for a new `CONNS` value.
#[btf_map]
static NEW_ENTRY: PerCpuArray<FlowEntry, 1> = PerCpuArray::new();

const E2BIG: i32 = 7;
const EEXIST: i32 = 17;

#[classifier]
pub fn flowprobe_tc(ctx: TcContext) -> i32 {
    observe(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn observe(ctx: &TcContext) {
    let skb_len = ctx.len();
    // The helper wants a length the verifier can prove is in [1, SNAP].
    let n = (skb_len as usize).min(SNAP);
    if n == 0 {
        return;
    }
    // The packet bytes and the parse result live in per-CPU slots, and the
    // parser and the connection update run as separate BPF functions: with
    // alu32 (target-cpu v3) LLVM spills the parser's byte arrays widely, and
    // together with the connection state they would exceed the 512-byte
    // BPF stack.
    let Some(buf) = FRAME.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of SNAP bytes, used only by this program run
    // (preemption is disabled), and `n <= SNAP`.
    if unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, buf.cast(), n as u32) } != 0 {
        return;
    }
    let idx = parse_into_slot(n as u32, skb_len);
    bump(&PARSE_STATS, idx);
    if idx == STATS_TRACKED {
        track_conn(ctx);
    }
}

/// Parses the first `n` bytes of `FRAME` into `PARSED`; returns the
/// `PARSE_STATS` index of the outcome.
#[inline(never)]
fn parse_into_slot(n: u32, skb_len: u32) -> u32 {
    let (Some(buf), Some(out)) = (FRAME.get_ptr(0), PARSED.get_ptr_mut(0)) else {
        return STATS_TRACKED + 1 + ParseError::COUNT as u32;
    };
    // SAFETY: this CPU's slots, used only by this program run.
    let buf = unsafe { &*buf };
    let Some(frame) = buf.get(..n as usize) else {
        return STATS_TRACKED + 1 + ParseError::COUNT as u32;
    };
    match parse_frame(frame, LinkType::Ethernet, skb_len) {
        Ok(p) => {
            // SAFETY: as above.
            unsafe { *out = p };
            STATS_TRACKED
        }
        Err(e) => e as u32 + 1,
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
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                p, old, new,
            )
            .0
        }
    }
}

// Not inlined: a separate BPF function gets its own stack frame, so the
// parser's frame and this one need not fit into 512 bytes together.
#[inline(never)]
fn track_conn(ctx: &TcContext) {
    let Some(p) = PARSED.get_ptr(0) else {
        return;
    };
    // SAFETY: this CPU's slot, written by `parse_into_slot` in this run.
    let p: &Parsed = unsafe { &*p };
    // SAFETY: the program's own `__sk_buff`, valid while it runs.
    let (ifindex, gso_segs) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_segs) };
    let segs = if gso_segs == 0 { 1 } else { gso_segs };
    let (key, dir) = ConnKey::of(&p.key, ifindex);
    let dir = dir & 1;
    let is_tcp = p.key.proto == L4Proto::Tcp as u8;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };

    let entry = match CONNS.get_ptr_mut(key) {
        Some(e) => e,
        None => {
            let flags = if is_tcp { Some(p.tcp.flags) } else { None };
            // Built in a per-CPU slot: a FlowEntry on the stack with the
            // packet buffer exceeds the 512-byte BPF stack.
            let Some(fresh) = NEW_ENTRY.get_ptr_mut(0) else {
                bump(&CONN_STATS, CONN_STATS_INSERT_FAILED);
                return;
            };
            // SAFETY: this CPU's slot, used only here while the program runs.
            let fresh = unsafe {
                *fresh = FlowEntry::new(now, dir, &key, flags);
                &*fresh
            };
            match CONNS.insert(key, fresh, BPF_NOEXIST as u64) {
                Ok(()) => {}
                // Another CPU inserted it first: use theirs.
                Err(e) if e == -EEXIST => {}
                Err(e) if e == -E2BIG => {
                    bump(&CONN_STATS, CONN_STATS_FULL);
                    return;
                }
                Err(_) => {
                    bump(&CONN_STATS, CONN_STATS_INSERT_FAILED);
                    return;
                }
            }
            match CONNS.get_ptr_mut(key) {
                Some(e) => e,
                None => {
                    bump(&CONN_STATS, CONN_STATS_LOST_ENTRY);
                    return;
                }
            }
        }
    };

    // SAFETY: `entry` points to a live map value; every field shared with
    // other CPUs is updated atomically (counters, sequence state) or is a
    // single aligned store of a value any writer may win (timestamps,
    // initiator upgrade).
    unsafe {
        core::ptr::write_volatile(&raw mut (*entry).last_seen_ns, now);
        let verdict = if is_tcp {
            let f = p.tcp.flags;
            if f & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN
                && (*entry).evidence < evidence::SYN
            {
                (*entry).initiator = dir as u8;
                (*entry).evidence = evidence::SYN;
            }
            let seg = Segment {
                hdr: p.tcp,
                payload_len: p.payload_len,
            };
            let tcp = (&raw mut (*entry).tcp).cast::<probe_common::TcpDir>();
            Some(track_shared(&seg, tcp.add(dir), tcp.add(1 - dir), &Bpf))
        } else {
            None
        };
        let counters = (&raw mut (*entry).counters).cast::<DirCounters>();
        DirCounters::record_shared(
            counters.add(dir),
            segs,
            p.payload_len,
            p.l3_len,
            verdict.as_ref(),
            &Bpf,
        );
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable panic
    // path (it would be an infinite loop).
    loop {}
}
