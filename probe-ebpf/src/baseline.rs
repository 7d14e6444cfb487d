//! An empty tc classifier (`return TC_ACT_OK`), built beside `probe-ebpf`.
//!
//! `bpf_stats_enabled` run time includes the cost of measuring itself
//! (~90 ns per packet on the reference VM), so flowprobe's cost is quoted as
//! a ratio to this program measured in the same run
//! (`scripts/ebpf-netns-smoke.sh`).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use probe_common::contract;

#[classifier]
pub fn flowprobe_tc_baseline(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

// Named as the contract says (see `named!` in main.rs).
const _: () = {
    let _ = flowprobe_tc_baseline;
    assert!(contract::same_name(
        stringify!(flowprobe_tc_baseline),
        contract::BASELINE_PROGRAM
    ));
};

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
