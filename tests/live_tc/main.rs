//! `flowprobe run` with the kernel program on live interfaces (root), one
//! module per topic:
//!
//! - `counts`: two fresh network namespaces joined by a veth, offloads left
//!   on (so the tc program sees GSO super-packets). Loss is induced in each
//!   receiver's INPUT chain (`iptables -m statistic`), downstream of the
//!   probe and of the sender's transmit path, so the kernel counts real
//!   retransmissions. `flowprobe run --iface <veth>` runs inside each
//!   namespace while `fixtures/capture/tcpapp.py` drives several TCP
//!   connections in parallel and records every socket's `TCP_INFO`, beside
//!   a UDP echo. For every connection and both directions, at the sending
//!   side's probe and at the receiving side's: `bytes −
//!   retransmitted_bytes` = bytes the application wrote, `retransmits` =
//!   `tcpi_total_retrans`, `retransmitted_bytes` = `tcpi_bytes_retrans`,
//!   `bytes` = `tcpi_bytes_sent`; the retransmits each side sent = its
//!   namespace's `RetransSegs` delta; UDP datagrams and bytes once each
//!   way; IPv4 and IPv6.
//! - `bridge`: a container host (a bridge, two containers on veths): a
//!   connection whose packets cross two interfaces of the host comes out
//!   once, each direction counted once and exactly.
//! - `nat`: the container host with a MASQUERADE uplink to an "outside"
//!   namespace, a published port (DNAT) and a ClusterIP (DNAT) to a
//!   container: each connection
//!   once, under its original tuple, the translated end tagged with its
//!   address beyond the translation (`nat.ip`, `nat.port`), counts equal to
//!   `TCP_INFO`; tc and afpacket.
//! - `clsact_netlink`: the rtnetlink clsact helpers the run uses instead of
//!   `tc` agree with `tc`.
//! - `interfaces`: without `--iface` a veth created while `run` runs is
//!   attached within a second and its traffic counted, with nothing of ours
//!   left after exit.
//! - `stale_filters`: the next start after a `kill -9` removes what the
//!   killed run left, and only that.
//! - `restart`: `run --state-dir` killed with SIGKILL in the middle of
//!   lossy transfers and started again at once: the filters stay through
//!   the gap and are taken over in place, the export's deltas summed per
//!   connection equal every socket's `TCP_INFO` both ways, `/metrics`
//!   does not go back; a one-shot run while the daemon is dead leaves its
//!   state alone; a clean stop leaves no filter, pin or state.
//! - `missing`: without the program, `run --backend tc` says what is
//!   missing in one line.
//! - `test_run`: the fixture captures pushed through the loaded program with
//!   `BPF_PROG_TEST_RUN` equal `flowprobe replay` of them.
//! - `full_map`: a full connection table is counted, never silent.
//! - `drain`: closed connections drained from a map much smaller than their
//!   number.
//! - `xdp_gateway`: `--backend xdp` on a forwarding gateway namespace between
//!   client and server namespaces; again with the gateway MASQUERADEing
//!   (each view one direction, joined into one record by NAT undone).
//! - `tunnels`: a VXLAN tunnel between the namespaces, lossy TCP through
//!   it, `flowprobe run` (tc and AF_PACKET) on the underlay only: the inner
//!   connections, tagged with the tunnel, equal the sockets' `TCP_INFO`.
//! - `disk_full`: the export's filesystem full (a tmpfs filled with `dd`)
//!   while connections are counted: counted and said once, and once there
//!   is room the file catches up to each socket's `TCP_INFO`.
//! - `netns_gone`: containers (namespaces on veths into the agent's)
//!   each make a lossy exchange and are deleted at once: the agent lets go
//!   of their interfaces (no descriptor kept) and counts each exactly.
//! - `churn`: 3000 short connections from 1000 ports, each port reused
//!   before the connection that used it last has left the kernel table:
//!   every one in the final output and the export once, with its bytes
//!   (`tests/common/churn.rs`).
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` (the root tier of
//! `scripts/test.sh` sets it after building the eBPF object); otherwise it
//! is skipped with a message. Set but not root: skipped, or a failure when
//! `CI=true`.

#[path = "../common/mod.rs"]
mod common;

mod bridge;
mod churn;
// `flowprobe run`'s clsact helpers, compiled into this test as they are (the
// binary has no library); the binary does not use everything the test does.
#[allow(dead_code)]
#[path = "../../probe/src/os/clsact.rs"]
mod clsact;
mod clsact_netlink;
mod counts;
mod disk_full;
mod drain;
mod flood;
mod full_map;
mod interfaces;
mod many_ifaces;
mod missing;
mod nat;
mod netns_gone;
mod restart;
mod stale_filters;
mod test_run;
mod tunnels;
mod xdp_gateway;

use std::path::{Path, PathBuf};

use common::repo_root;
use common::root::{
    conn_args, drop_in_input, sh_out, spawn_flowprobe, tcpapp_exchange, truth, veth_pair,
    KillOnDrop, Netns,
};
use serde_json::Value;

const VETH_A: &str = "fpl0";
const VETH_B: &str = "fpl1";

/// The namespaces, a veth between them (client `ca` in A, server `sa` in
/// B), and every 13th large TCP packet dropped in each receiver's INPUT
/// chain. Returns the client's and the server's address.
fn setup(tag: &str, v6: bool) -> (Netns, &'static str, &'static str) {
    let ns = Netns::create("fpl", tag);
    let (ca, sa, plen, ipt) = if v6 {
        ("fd77::1", "fd77::2", "64", "ip6tables")
    } else {
        ("10.78.0.1", "10.78.0.2", "24", "iptables")
    };
    veth_pair(&ns, VETH_A, VETH_B, ca, sa, plen);
    for n in [&ns.a, &ns.b] {
        // Every 13th large TCP packet dropped in the receiver's INPUT chain.
        drop_in_input(n, ipt);
    }
    (ns, ca, sa)
}

/// (client port, client writes, server writes): several in parallel.
const CONNS: [(u16, u64, u64); 4] = [
    (40000, 600_000, 200_000),
    (40001, 2_000_000, 50_000),
    (40002, 100_000, 900_000),
    (40003, 1_000_000, 1_000_000),
];

/// One UDP exchange beside them: the client sends this many datagrams
/// (1 to 1400 bytes) from this port and the server echoes each.
const UDP_PORT: u16 = 41000;
const UDP_DATAGRAMS: u64 = 30;

/// `flowprobe run` on `dev` inside `ns`; output in `dir/TAG.json`,
/// stderr in `dir/TAG.err`.
fn spawn_probe(ns: &str, dev: &str, duration: Option<&str>, dir: &Path, tag: &str) -> KillOnDrop {
    let mut args = vec!["run", "--iface", dev, "--format", "json"];
    if let Some(d) = duration {
        args.extend(["--duration", d]);
    }
    spawn_flowprobe(ns, &[], &args, dir, tag)
}

/// The four TCP connections of `CONNS` and the UDP exchange, client in
/// `ns.a`; the sockets' truth in `dir`.
fn traffic(ns: &Netns, ca: &str, sa: &str, dir: &Path) {
    let mut args = conn_args(&CONNS);
    args.extend(["--udp".to_owned(), format!("{UDP_PORT}:{UDP_DATAGRAMS}")]);
    tcpapp_exchange(&ns.a, ca, &ns.b, sa, dir, &args);
}

/// None of our filters and no clsact qdisc we added are left on `dev`.
fn no_filters_left(ns: &str, dev: &str) {
    for hook in ["ingress", "egress"] {
        let f = sh_out(&[
            "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, hook,
        ]);
        assert!(f.trim().is_empty(), "filters left on {dev} {hook}: {f}");
    }
    let q = sh_out(&["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", dev]);
    assert!(
        !q.contains("clsact"),
        "the clsact qdisc we added is left: {q}"
    );
}

/// An object `cargo xtask build-ebpf --release` built: `probe-ebpf` or
/// `tc-baseline`.
fn ebpf_object(name: &str) -> PathBuf {
    repo_root()
        .join("target/ebpf/bpfel-unknown-none/release")
        .join(name)
}

/// Someone else's filter on `dev`'s clsact `hook` in `ns`: the empty
/// tc-baseline program, loaded by tc, so named after the file.
fn baseline_filter(ns: &str, dev: &str, hook: &str, prio: &str) {
    let obj = ebpf_object("tc-baseline");
    common::root::sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "filter",
        "add",
        "dev",
        dev,
        hook,
        "prio",
        prio,
        "bpf",
        "da",
        "obj",
        obj.to_str().unwrap(),
        "sec",
        "classifier",
    ]);
}

pub(crate) fn n(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

/// Each connection of `conns` from `ca` to `sa` appears once in `out`, both
/// directions equal to the sockets' `TCP_INFO` in `dir`.
pub(crate) fn check_once(
    out: &[Value],
    raw: &str,
    dir: &Path,
    conns: &[(u16, u64, u64)],
    ca: &str,
    sa: &str,
) {
    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
    let mut failures = Vec::new();
    for &(port, c_bytes, s_bytes) in conns {
        let recs: Vec<&Value> = out
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["sport"] == port && c["src"] == ca)
            .collect();
        assert_eq!(
            recs.len(),
            1,
            "port {port}: {} records in\n{raw}",
            recs.len()
        );
        let r = recs[0];
        assert_eq!((r["dst"].as_str(), n(&r["dport"])), (Some(sa), 5001), "{r}");
        failures.extend(against_tcp_info(
            r,
            (&client, &server),
            (port, c_bytes, s_bytes),
            ca,
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Where record `r` of the connection from client port `port` differs from
/// what its sockets said (`client`, `server`: [`truth`]) and what the
/// applications wrote (`c_bytes`, `s_bytes`): `bytes − retransmitted_bytes`,
/// `retransmits` and `retransmitted_bytes` of each direction. Prints both.
pub(crate) fn against_tcp_info(
    r: &Value,
    (client, server): (&Value, &Value),
    (port, c_bytes, s_bytes): (u16, u64, u64),
    ca: &str,
) -> Vec<String> {
    let key = port.to_string();
    let mut failures = Vec::new();
    for (what, t, written, d) in [
        ("client->server", &client["tcp"][&key], c_bytes, &r["sent"]),
        (
            "server->client",
            &server["tcp"][&key],
            s_bytes,
            &r["received"],
        ),
    ] {
        let got = (
            n(&d["bytes"]) - n(&d["retransmitted_bytes"]),
            n(&d["retransmits"]),
            n(&d["retransmitted_bytes"]),
        );
        let want = (
            written,
            n(&t["tcpi_total_retrans"]),
            n(&t["tcpi_bytes_retrans"]),
        );
        eprintln!("{ca} port {port} {what}: flowprobe {got:?}, kernel {want:?}");
        if got != want {
            failures.push(format!(
                "port {port} {what}: flowprobe {got:?} != kernel {want:?}"
            ));
        }
    }
    failures
}
