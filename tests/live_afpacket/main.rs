//! `flowprobe run --backend afpacket` on live interfaces (root), one module
//! per topic:
//!
//! - `parity`: two fresh network namespaces joined by a veth, offloads on
//!   (so both AF_PACKET and tc see GSO super-packets at the sender), loss
//!   induced in each receiver's INPUT chain (`iptables -m statistic`),
//!   downstream of every probe. In each namespace `flowprobe run --backend
//!   afpacket` and `flowprobe run --backend tc` run at the same time while
//!   `fixtures/capture/tcpapp.py` drives several TCP connections in
//!   parallel and records every socket's `TCP_INFO`. For every connection
//!   and direction, at the sending side: afpacket and tc agree on `bytes`,
//!   `retransmits` and `retransmitted_bytes`, and both equal the socket's
//!   truth (`bytes − retransmitted_bytes` = written, `retransmits` =
//!   `tcpi_total_retrans`, `retransmitted_bytes` = `tcpi_bytes_retrans`);
//!   at the receiving side both see every byte sent and the same packets.
//!   At the sender every counter, `packets` included, is the same in both
//!   (a GSO super-packet counts its wire segments in both: `gso_segs` at
//!   tc, the virtio-net header's `gso_size` at AF_PACKET). The kernel
//!   dropped nothing from the rings, and no connection was split across
//!   rings.
//! - `fallback`: with CAP_BPF and CAP_SYS_ADMIN taken away, `flowprobe run`
//!   (auto) says in one line that it cannot use eBPF and counts with
//!   AF_PACKET, correctly; `--backend tc` fails instead.
//! - `loopback`: on loopback, where AF_PACKET sees every packet twice, each
//!   counts once.
//! - `reattach`: `--iface` follows a named interface created again.
//! - `fragments`: UDP connections that the fanout splits across rings
//!   (first fragments hash by address only) are merged whole.
//! - `churn`: as `live_tc`'s, with AF_PACKET (`tests/common/churn.rs`).
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` (the root tier of
//! `scripts/test.sh`, after building the eBPF object); otherwise skipped
//! with a message. Set but not root: skipped, or a failure when `CI=true`.

#[path = "../common/mod.rs"]
mod common;

mod churn;
mod fallback;
mod fragments;
mod loopback;
mod parity;
mod reattach;

use std::fs;
use std::path::Path;
use std::process::Child;

use common::json_lines;
pub use common::root::wait_for_rings;
use common::root::{
    conn_args, drop_in_input, sh, spawn_flowprobe, tcpapp_exchange, veth_pair, KillOnDrop, Netns,
};
use serde_json::Value;

const VETH_A: &str = "fpa0";
const VETH_B: &str = "fpa1";

/// The namespaces, a veth between them, and every 13th large TCP packet
/// dropped in each receiver's INPUT chain. Returns the client's and the
/// server's address.
fn setup(tag: &str, v6: bool) -> (Netns, &'static str, &'static str) {
    let ns = Netns::create("fpa", tag);
    let (ca, sa) = add_veth(&ns, v6);
    let ipt = if v6 { "ip6tables" } else { "iptables" };
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, ipt);
    }
    (ns, ca, sa)
}

/// The veth between the namespaces, addressed and up.
fn add_veth(ns: &Netns, v6: bool) -> (&'static str, &'static str) {
    let (ca, sa, plen) = if v6 {
        ("fd78::1", "fd78::2", "64")
    } else {
        ("10.80.0.1", "10.80.0.2", "24")
    };
    veth_pair(ns, VETH_A, VETH_B, ca, sa, plen);
    (ca, sa)
}

/// (client port, client writes, server writes): several in parallel.
const CONNS: [(u16, u64, u64); 4] = [
    (41000, 600_000, 200_000),
    (41001, 2_000_000, 50_000),
    (41002, 100_000, 900_000),
    (41003, 1_000_000, 1_000_000),
];

/// `prefix flowprobe run ARGS --format json` inside `ns`; output in
/// `dir/TAG.json`, stderr in `dir/TAG.err`.
fn spawn_run(ns: &str, prefix: &[&str], args: &[&str], dir: &Path, tag: &str) -> KillOnDrop {
    let mut run = vec!["run"];
    run.extend(args);
    run.extend(["--format", "json"]);
    spawn_flowprobe(ns, prefix, &run, dir, tag)
}

fn traffic(ns: &Netns, ca: &str, sa: &str, dir: &Path) {
    tcpapp_exchange(&ns.a, ca, &ns.b, sa, dir, &conn_args(&CONNS));
}

/// Stops a probe with SIGINT and returns its (JSON lines, raw output,
/// stderr), after checking it exited well.
fn finish(p: &mut Child, dir: &Path, tag: &str) -> (Vec<Value>, String, String) {
    // `ip netns exec` execs flowprobe (and setpriv execs it too), so the
    // child's pid is flowprobe's.
    sh(&["kill", "-INT", &p.id().to_string()]);
    outcome(p, dir, tag)
}

/// Waits for a probe to exit and returns its (JSON lines, raw output,
/// stderr), after checking it exited well.
fn outcome(p: &mut Child, dir: &Path, tag: &str) -> (Vec<Value>, String, String) {
    let st = p.wait().unwrap();
    let err = fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap();
    assert!(st.success(), "flowprobe ({tag}) failed: {err}");
    let out = fs::read_to_string(dir.join(format!("{tag}.json"))).unwrap();
    eprintln!("{tag}: {}", err.trim());
    (json_lines(&out), out, err)
}

/// The kernel's drop count from an afpacket summary line.
fn kernel_drops(err: &str) -> u64 {
    let line = err
        .lines()
        .find(|l| l.contains("backend afpacket"))
        .unwrap_or_else(|| panic!("no afpacket summary line in: {err}"));
    let (_, rest) = line
        .split_once("packets, ")
        .unwrap_or_else(|| panic!("no kernel counts in: {line}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// (bytes, retransmits, retransmitted_bytes) of one direction.
fn counts(d: &Value) -> (u64, u64, u64) {
    (
        n(&d["bytes"]),
        n(&d["retransmits"]),
        n(&d["retransmitted_bytes"]),
    )
}
