//! flowprobe's tc classifier.
//!
//! It runs the very same `parse_frame` that userspace runs, directly on the
//! skb's linear data (`data`/`data_end`, no copy; `bpf_skb_pull_data` only
//! when the headers are not all linear), counts the outcome in
//! `PARSE_STATS`, and updates the connection's entry in `CONNS` with
//! `probe_common::shared::update`: under the entry's own lock, the very
//! tracker and counters replay runs. Ingress and egress share one entry.
//!
//! The program fails open: whatever happens, it returns `TC_ACT_OK`.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use core::ffi::c_void;
use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xchg, AtomicOrdering};

use aya_ebpf::{
    bindings::{xdp_action::XDP_PASS, xdp_md, BPF_NOEXIST, TC_ACT_OK},
    btf_maps::{HashMap, PerCpuArray},
    helpers::generated::{
        bpf_get_socket_cookie, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_loop, bpf_skb_cgroup_id,
    },
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
};
use probe_common::{
    parse_frame,
    shared::{update, Clock, Updated},
    Atomics, ConnKey, FlowEntry, L4Proto, LinkType, PacketBytes, ParseError, Parsed,
};

/// Bytes made linear with `bpf_skb_pull_data` when the headers are not:
/// Ethernet + 2 VLAN tags + IPv6 + extension headers + the TCP header fields
/// the tracker reads.
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
/// after a successful insert (removed by userspace in between); 3: the
/// entry's lock stayed taken and the lock-free update ran instead (counts
/// exact, reordering call best effort; see `probe_common::shared`).
pub const CONN_STATS_FULL: u32 = 0;
pub const CONN_STATS_INSERT_FAILED: u32 = 1;
pub const CONN_STATS_LOST_ENTRY: u32 = 2;
pub const CONN_STATS_CONTENDED: u32 = 3;
const CONN_STATS_LEN: usize = 4;

/// Tries for an entry's lock before counting the packet without a verdict.
/// The holder is a tc program on another CPU, done within a few hundred
/// nanoseconds unless the hypervisor stops its virtual CPU: on a 2-vCPU VM
/// at 12 Gbit/s over veth, 64 and 1024 tries (tens of microseconds) still
/// gave up a few times in 5 s; 16384 (about a millisecond, spent only when
/// the holder is stalled) did not in 20 s.
const LOCK_SPINS: u32 = 16384;

#[btf_map]
static CONN_STATS: PerCpuArray<u64, CONN_STATS_LEN> = PerCpuArray::new();

/// Scratch space for a new `CONNS` value.
#[btf_map]
static NEW_ENTRY: PerCpuArray<FlowEntry, 1> = PerCpuArray::new();

const E2BIG: i32 = 7;
const EEXIST: i32 = 17;

/// Largest header offset the parser may ask for; a bound the verifier needs
/// for variable offsets into the packet (IPv6 extension headers).
const MAX_OFF: usize = 0x3fff;

/// The skb's linear data, read in place (direct packet access): every load
/// is checked against `data_end`, the check the verifier demands.
struct Linear {
    data: usize,
    end: usize,
}

impl Linear {
    #[inline(always)]
    fn of(ctx: &TcContext) -> Linear {
        Linear {
            data: ctx.data(),
            end: ctx.data_end(),
        }
    }
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
}

#[classifier]
pub fn flowprobe_tc(ctx: TcContext) -> i32 {
    let mut p = core::mem::MaybeUninit::<Parsed>::uninit();
    let idx = parse_skb(&ctx, &mut p);
    bump(&PARSE_STATS, idx);
    if idx == STATS_TRACKED {
        // SAFETY: the program's own `__sk_buff`, valid while it runs.
        let (ifindex, gso_segs) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).gso_segs) };
        // SAFETY: `parse_skb` wrote it when it returned STATS_TRACKED.
        if let Some((entry, dir)) =
            track_conn(unsafe { p.assume_init_ref() }, ifindex, gso_segs.max(1))
        {
            note_socket(&ctx, entry, dir);
        }
    }
    TC_ACT_OK
}

/// The local socket behind a packet this host sends (tc egress carries it;
/// ingress before the socket lookup and forwarded packets do not): its
/// cookie and cgroup v2 id, once per direction. Userspace joins them to a
/// process and container even when the socket and the process were gone
/// before it looked (`probe/src/attrib`). Two helper calls, made for the
/// first packet with a socket only.
#[inline(always)]
fn note_socket(ctx: &TcContext, entry: *mut FlowEntry, dir: usize) {
    let dir = dir & 1;
    // SAFETY: the program's own `__sk_buff`; `entry` a live map value.
    unsafe {
        if (*ctx.skb.skb).__bindgen_anon_2.sk.is_null() || (*entry).sk_cookie[dir] != 0 {
            return;
        }
        let cookie = bpf_get_socket_cookie(ctx.skb.skb.cast());
        if cookie == 0 {
            return;
        }
        // Written once, by whichever CPU gets here first; a racing writer
        // writes the same socket's values.
        core::ptr::write_volatile(&raw mut (*entry).sk_cgroup[dir], bpf_skb_cgroup_id(ctx.skb.skb));
        core::ptr::write_volatile(&raw mut (*entry).sk_cookie[dir], cookie);
    }
}

/// The same count at XDP, for gateways: ingress only, every frame one
/// segment (no GSO before the driver's receive path). A forwarded
/// connection enters through two interfaces, one per direction, so its key
/// has interface 0 here: both directions meet in one entry.
#[xdp]
pub fn flowprobe_xdp(ctx: XdpContext) -> u32 {
    let mut p = core::mem::MaybeUninit::<Parsed>::uninit();
    let idx = parse_xdp(ctx.ctx, &mut p);
    bump(&PARSE_STATS, idx);
    if idx == STATS_TRACKED {
        // SAFETY: `parse_xdp` wrote it when it returned STATS_TRACKED.
        track_conn(unsafe { p.assume_init_ref() }, 0, 1);
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
fn parse_xdp(ctx: *mut xdp_md, out: &mut core::mem::MaybeUninit<Parsed>) -> u32 {
    // SAFETY: the program's own context, valid while it runs.
    let (data, end) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*ctx).data) as usize,
            core::ptr::read_volatile(&raw const (*ctx).data_end) as usize,
        )
    };
    let len = end.saturating_sub(data) as u32;
    match parse_frame(&Linear { data, end }, LinkType::Ethernet, len) {
        Ok(p) => {
            out.write(p);
            STATS_TRACKED
        }
        Err(e) => e as u32 + 1,
    }
}

/// Parses the skb's headers in place into `out`; returns the `PARSE_STATS`
/// index of the outcome (`out` is written only for [`STATS_TRACKED`]).
///
/// Not inlined: the parser's frame and the connection update's frame need
/// not fit into the 512-byte BPF stack together.
#[inline(never)]
fn parse_skb(ctx: &TcContext, out: &mut core::mem::MaybeUninit<Parsed>) -> u32 {
    let skb_len = ctx.len();
    let parsed = match parse_frame(&Linear::of(ctx), LinkType::Ethernet, skb_len) {
        Err(e @ (ParseError::TruncatedL2 | ParseError::TruncatedL3 | ParseError::TruncatedL4))
            if ((ctx.data_end() - ctx.data()) as u32) < skb_len =>
        {
            // The headers are not all in the linear data (rare: the stack
            // usually keeps them there). Pull up to SNAP bytes and retry.
            match ctx.pull_data(skb_len.min(SNAP as u32)) {
                Ok(()) => parse_frame(&Linear::of(ctx), LinkType::Ethernet, skb_len),
                Err(_) => Err(e),
            }
        }
        r => r,
    };
    match parsed {
        Ok(p) => {
            out.write(p);
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
            atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new)
                .0
        }
    }
    #[inline(always)]
    unsafe fn xchg_u32(&self, p: *mut u32, v: u32) -> u32 {
        // SAFETY: as above.
        unsafe { atomic_xchg::<u32, { AtomicOrdering::SeqCst }>(p, v) }
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

/// The kernel's CLOCK_MONOTONIC. The coarse clock (the last tick) costs a
/// load; the precise one about 25 ns a packet, so it is read only for a new
/// entry's first_seen and for handshake times; userspace keeps last_seen
/// from lagging first_seen.
struct Ktime;

impl Clock for Ktime {
    #[inline(always)]
    fn coarse_ns(&self) -> u64 {
        // SAFETY: helper without preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
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

// Not inlined: a separate BPF function gets its own stack frame, so the
// parser's frame and this one need not fit into 512 bytes together.
#[inline(never)]
fn track_conn(p: &Parsed, ifindex: u32, segs: u32) -> Option<(*mut FlowEntry, usize)> {
    let (key, dir) = ConnKey::of(&p.key, ifindex);
    let dir = dir & 1;
    let is_tcp = p.key.proto == L4Proto::Tcp as u8;
    let entry = match CONNS.get_ptr_mut(key) {
        Some(e) => e,
        None => {
            let flags = if is_tcp { Some(p.tcp.flags) } else { None };
            // Built in a per-CPU slot: only new connections take this path,
            // and this function's frame stays small.
            let Some(fresh) = NEW_ENTRY.get_ptr_mut(0) else {
                bump(&CONN_STATS, CONN_STATS_INSERT_FAILED);
                return None;
            };
            // SAFETY: this CPU's slot, used only here while the program runs.
            let fresh = unsafe {
                *fresh = FlowEntry::new(Ktime.precise_ns(), dir, &key, flags);
                &*fresh
            };
            match CONNS.insert(key, fresh, BPF_NOEXIST as u64) {
                Ok(()) => {}
                // Another CPU inserted it first: use theirs.
                Err(e) if e == -EEXIST => {}
                Err(e) if e == -E2BIG => {
                    bump(&CONN_STATS, CONN_STATS_FULL);
                    return None;
                }
                Err(_) => {
                    bump(&CONN_STATS, CONN_STATS_INSERT_FAILED);
                    return None;
                }
            }
            match CONNS.get_ptr_mut(key) {
                Some(e) => e,
                None => {
                    bump(&CONN_STATS, CONN_STATS_LOST_ENTRY);
                    return None;
                }
            }
        }
    };

    // SAFETY: `entry` points to a live map value, updated only by `update`.
    if unsafe { update(entry, dir, segs, p, &Ktime, LOCK_SPINS, &Bpf) } == Updated::Contended {
        bump(&CONN_STATS, CONN_STATS_CONTENDED);
    }
    Some((entry, dir))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable panic
    // path (it would be an infinite loop).
    loop {}
}
