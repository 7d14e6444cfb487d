//! Who owns a socket, recorded where the kernel runs in the owner's own
//! context without kprobes: `cgroup/connect4|6` (TCP, connected UDP) and
//! `cgroup/sendmsg4|6` (the first datagram of an unconnected UDP socket),
//! attached to the cgroup v2 root by userspace. Each records the caller
//! (tgid, tid, uid, `comm`, cgroup id), the socket (cookie, network
//! namespace cookie) and its addresses into the `OWNERS` ring buffer; a
//! record that finds the ring full is counted in `OWNER_STATS`, never
//! silent. Userspace joins a record to the connection whose tc entry holds
//! the same socket cookie (`note_socket`), so that an end is attributed
//! even when its socket and process are gone before any userspace pass.
//!
//! The passive side runs no connect or send hook: `sock_ops` records a
//! listener at `listen(2)` (`BPF_SOCK_OPS_TCP_LISTEN_CB`, in the calling
//! process's context: its owner, as `connect` does) and each connection
//! it accepts once established (`BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`, in
//! softirq, where the current task is nobody's: only the socket, its
//! 4-tuple and its network namespace); userspace gives the accepted socket
//! the owner of the listener on that port in that namespace, so a server
//! gone before any userspace pass still names its ends.
//!
//! The programs never refuse: they return 1 (go on) whatever happens.

use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr, bpf_sock_ops, BPF_RB_NO_WAKEUP, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    btf_maps::{PerCpuArray, RingBuf, SkStorage},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
};
use probe_common::{
    contract,
    owner::{
        SockOwner, OWNER_ACCEPT, OWNER_CONNECT, OWNER_LISTEN, OWNER_SENDMSG, OWNER_STATS_LEN,
        OWNER_STAT_DROPPED, OWNER_STAT_RECORDED, OWNER_TUPLE,
    },
};

/// Room for about 40000 records between two drains. Userspace drains
/// every 10 ms, but not while its resolver is busy (a socket dump or a
/// tick's join, a few hundred ms at 20000 connections opened at once,
/// three records each): 1 MiB lost records then (`bench/open.sh`). Of no
/// value type (records are reserved as [`SockOwner`]s): libbpf, as `tc`
/// and `bpftool` load the object, wants a ring buffer's value size to be 0.
#[btf_map]
static OWNERS: RingBuf<(), { 1 << 22 }> = RingBuf::new();

/// Per socket, non-zero once its owner was recorded by `sendmsg`: an
/// unconnected UDP socket is recorded at its first datagram, not at every
/// one. Socket-local storage: freed with the socket, nothing to evict.
/// (`connect` records every time: a connected socket's sends do not run
/// the `sendmsg` hook.)
#[btf_map]
static OWNER_SEEN: SkStorage<u32> = SkStorage::new();

/// `OWNER_STAT_RECORDED`, `OWNER_STAT_DROPPED`.
#[btf_map]
static OWNER_STATS: PerCpuArray<u64, OWNER_STATS_LEN> = PerCpuArray::new();

named!(static OWNERS, contract::OWNERS);
named!(static OWNER_SEEN, contract::OWNER_SEEN);
named!(static OWNER_STATS, contract::OWNER_STATS);
named!(fn flowprobe_connect4, contract::CONNECT4_PROGRAM);
named!(fn flowprobe_connect6, contract::CONNECT6_PROGRAM);
named!(fn flowprobe_sendmsg4, contract::SENDMSG4_PROGRAM);
named!(fn flowprobe_sendmsg6, contract::SENDMSG6_PROGRAM);
named!(fn flowprobe_sockops, contract::SOCKOPS_PROGRAM);

/// A TCP socket's addresses once `connect` chose its local port, for the
/// join by 4-tuple where the tc program did not see the socket; a
/// listener with its owner; an accepted socket with its addresses.
#[sock_ops]
pub fn flowprobe_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => tuple(ctx.ops, OWNER_TUPLE),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => tuple(ctx.ops, OWNER_ACCEPT),
        BPF_SOCK_OPS_TCP_LISTEN_CB => tuple(ctx.ops, OWNER_LISTEN),
        _ => {}
    }
    1
}

#[inline(always)]
fn tuple(ops: *mut bpf_sock_ops, kind: u8) {
    let Some(mut e) = OWNERS.reserve_untyped::<SockOwner>(0) else {
        stat(OWNER_STAT_DROPPED);
        return;
    };
    // SAFETY: the program's own context; `o` the reserved record.
    unsafe {
        let o = e.as_mut_ptr();
        o.write_bytes(0, 1);
        (*o).cookie = bpf_get_socket_cookie(ops.cast());
        (*o).netns_cookie = bpf_get_netns_cookie(ops.cast());
        (*o).kind = kind;
        if kind == OWNER_LISTEN {
            // `listen(2)` runs this in the listening process.
            let pid_tgid = bpf_get_current_pid_tgid();
            (*o).tgid = (pid_tgid >> 32) as u32;
            (*o).tid = pid_tgid as u32;
            (*o).uid = bpf_get_current_uid_gid() as u32;
            (*o).cgroup_id = bpf_get_current_cgroup_id();
            if bpf_get_current_comm((&raw mut (*o).comm).cast(), 16) != 0 {
                (*o).comm = [0; 16];
            }
        }
        (*o).proto = 6;
        (*o).local_port = (*ops).local_port as u16;
        // Network order in the upper half (the kernel shifts it there for
        // sock_ops, unlike every other context).
        (*o).remote_port = u16::from_be(((*ops).remote_port >> 16) as u16);
        let remote = (&raw mut (*o).remote).cast::<u32>();
        let local = (&raw mut (*o).local).cast::<u32>();
        if (*ops).family == 2 {
            (*o).family = 4;
            put_mapped(remote, (*ops).remote_ip4);
            put_mapped(local, (*ops).local_ip4);
        } else {
            (*o).family = 6;
            for i in 0..4 {
                remote.add(i).write((*ops).remote_ip6[i]);
                local.add(i).write((*ops).local_ip6[i]);
            }
        }
    }
    e.submit(BPF_RB_NO_WAKEUP.into());
}

#[cgroup_sock_addr(connect4)]
pub fn flowprobe_connect4(ctx: SockAddrContext) -> i32 {
    record(ctx.sock_addr, OWNER_CONNECT, 4);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn flowprobe_connect6(ctx: SockAddrContext) -> i32 {
    record(ctx.sock_addr, OWNER_CONNECT, 6);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn flowprobe_sendmsg4(ctx: SockAddrContext) -> i32 {
    record(ctx.sock_addr, OWNER_SENDMSG, 4);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn flowprobe_sendmsg6(ctx: SockAddrContext) -> i32 {
    record(ctx.sock_addr, OWNER_SENDMSG, 6);
    1
}

fn stat(idx: u32) {
    if let Some(count) = OWNER_STATS.get_ptr_mut(idx) {
        // SAFETY: a per-CPU slot; atomic because cgroup programs run with
        // migration, not preemption, disabled.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(count, 1) };
    }
}

#[inline(always)]
fn record(ctx: *mut bpf_sock_addr, kind: u8, family: u8) {
    // SAFETY: the program's own context, valid while it runs; `sk` is
    // never null in these hooks, checked anyway.
    unsafe {
        if kind == OWNER_SENDMSG {
            let seen = OWNER_SEEN.get_or_insert_ptr_mut(&SockAddrContext::new(ctx), None);
            if !seen.is_null() {
                if *seen != 0 {
                    return;
                }
                *seen = 1;
            }
        }
        let cookie = bpf_get_socket_cookie(ctx.cast());
        let Some(mut e) = OWNERS.reserve_untyped::<SockOwner>(0) else {
            stat(OWNER_STAT_DROPPED);
            return;
        };
        let o = e.as_mut_ptr();
        let pid_tgid = bpf_get_current_pid_tgid();
        (*o).cookie = cookie;
        (*o).netns_cookie = bpf_get_netns_cookie(ctx.cast());
        (*o).cgroup_id = bpf_get_current_cgroup_id();
        (*o).tgid = (pid_tgid >> 32) as u32;
        (*o).tid = pid_tgid as u32;
        (*o).uid = bpf_get_current_uid_gid() as u32;
        (*o).kind = kind;
        (*o).proto = (*ctx).protocol as u8;
        (*o).family = family;
        (*o)._pad = 0;
        (*o)._pad2 = 0;
        if bpf_get_current_comm((&raw mut (*o).comm).cast(), 16) != 0 {
            (*o).comm = [0; 16];
        }
        (*o).remote_port = u16::from_be((*ctx).user_port as u16);
        let sk = (*ctx).__bindgen_anon_1.sk;
        (*o).local_port = if sk.is_null() { 0 } else { (*sk).src_port as u16 };
        // Written as 32-bit words straight into the ring's memory (4-byte
        // aligned): no byte arrays on the stack, whose unaligned copies the
        // verifier refuses.
        let remote = (&raw mut (*o).remote).cast::<u32>();
        let local = (&raw mut (*o).local).cast::<u32>();
        if family == 4 {
            let src = if kind == OWNER_SENDMSG {
                (*ctx).msg_src_ip4
            } else {
                0
            };
            put_mapped(remote, (*ctx).user_ip4);
            put_mapped(local, src);
        } else {
            remote.write((*ctx).user_ip6[0]);
            remote.add(1).write((*ctx).user_ip6[1]);
            remote.add(2).write((*ctx).user_ip6[2]);
            remote.add(3).write((*ctx).user_ip6[3]);
            for i in 0..4 {
                local.add(i).write(0);
            }
        }
        e.submit(BPF_RB_NO_WAKEUP.into());
        stat(OWNER_STAT_RECORDED);
    }
}

/// An IPv4 address (network order in a `u32`, as the context holds it),
/// IPv4-mapped, as four words at `w`.
///
/// # Safety
/// `w` points at 16 writable bytes, 4-byte aligned.
#[inline(always)]
unsafe fn put_mapped(w: *mut u32, a: u32) {
    // SAFETY: the caller's.
    unsafe {
        w.write(0);
        w.add(1).write(0);
        w.add(2).write(u32::from_ne_bytes([0, 0, 0xff, 0xff]));
        w.add(3).write(a);
    }
}
