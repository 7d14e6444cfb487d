//! flowprobe's tc classifier.
//!
//! For now it proves that the shared `probe_common` parser passes the
//! verifier: it copies the first bytes of each packet into a stack buffer
//! with one `bpf_skb_load_bytes`, runs the very same `parse_frame` that
//! userspace runs on `&[u8]`, and counts the outcome in `PARSE_STATS`.
//! Per-connection maps come later.
//!
//! The program fails open: whatever happens, it returns `TC_ACT_OK`.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    btf_maps::PerCpuArray,
    helpers::generated::bpf_skb_load_bytes,
    macros::{btf_map, classifier},
    programs::TcContext,
};
use probe_common::{parse_frame, LinkType, ParseError};

/// Bytes copied from the front of each packet: Ethernet + 2 VLAN tags +
/// IPv6 + extension headers + the TCP header fields the tracker reads.
const SNAP: usize = 128;

/// Index 0: frames that parsed to a TCP/UDP flow ("tracked");
/// index `e as u32 + 1`: frames rejected with [`ParseError`] `e`.
pub const STATS_TRACKED: u32 = 0;
const STATS_LEN: usize = ParseError::COUNT + 1;

#[btf_map]
static PARSE_STATS: PerCpuArray<u64, STATS_LEN> = PerCpuArray::new();

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
    let mut buf = [0u8; SNAP];
    // SAFETY: `buf` is a live stack buffer of SNAP bytes and `n <= SNAP`.
    let ret =
        unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, buf.as_mut_ptr().cast(), n as u32) };
    if ret != 0 {
        return;
    }
    let Some(frame) = buf.get(..n) else { return };
    let idx = match parse_frame(frame, LinkType::Ethernet, skb_len) {
        Ok(_) => STATS_TRACKED,
        Err(e) => e as u32 + 1,
    };
    if let Some(count) = PARSE_STATS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU array slot, written only by this CPU while the
        // program runs (preemption is disabled), read only by userspace.
        unsafe { *count += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects any program with a reachable panic
    // path (it would be an infinite loop).
    loop {}
}
