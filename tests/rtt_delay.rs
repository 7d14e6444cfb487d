//! Handshake RTT against a known added delay (root).
//!
//! Three fresh network namespaces: client — bridge — server, joined by two
//! veths. In the middle one `fixtures/delay/delaybridge.py` forwards
//! Ethernet frames between its two ports with AF_PACKET sockets and holds
//! every frame from the client's side for DELAY_MS before sending it on
//! (frames back to the client pass at once). The kernel here has no netem,
//! so this userspace hop is the delay. tcpdump records the client's veth
//! while `fixtures/capture/tcpapp.py` opens connections; `flowprobe replay`
//! of that capture must report, per connection, a handshake RTT (SYN →
//! SYN/ACK at the client, the `dst` leg) within 10 % of the delay, and so
//! must their median. Live, the tc program keeps no per-segment timestamps
//! (no RTT), but `flowprobe run --backend afpacket` on the same veth does:
//! its agent's `/connections` must show the same handshakes, and its
//! `/metrics` an RTT histogram.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` as root (the root tier of
//! `scripts/test.sh`).

mod common;

use std::fs;

use common::root::{
    addr, enabled, http_get, link_up, sh, tcpapp_exchange, veth, wait_for, Namespace, Netns, Procs,
};
use common::{json_lines, repo_root};

const DELAY_MS: u64 = 100;
/// Connections opened at once. Their SYNs queue in the bridge, each a few
/// hundred microseconds behind the previous one (Python), so a few keep
/// that bias well under the 10 %.
const CONNS: u16 = 5;
const CLIENT: &str = "10.80.0.1";
const SERVER: &str = "10.80.0.2";
const AGENT: &str = "127.0.0.1:9911";
/// The tc backend's agent, beside the AF_PACKET one.
const AGENT_TC: &str = "127.0.0.1:9912";

/// Client and server namespaces (`ns.a`, `ns.b`) and the bridge's between
/// them, joined by two veths (`rc0`—`rm0`, `rs0`—`rm1`), offloads off.
fn namespaces() -> (Netns, Namespace) {
    let ns = Netns::create("fprt", "cs");
    let bridge = Namespace::create("fprt", "m");
    let (c, s, m) = (&ns.a, &ns.b, &bridge.name);
    veth(c, "rc0", m, "rm0");
    veth(s, "rs0", m, "rm1");
    addr(c, "rc0", &format!("{CLIENT}/24"));
    addr(s, "rs0", &format!("{SERVER}/24"));
    for (n, dev) in [(c, "rc0"), (m, "rm0"), (m, "rm1"), (s, "rs0")] {
        // The bridge sends frames on as it read them: no merged
        // super-packets, no checksum left to the hardware.
        sh(&[
            "ip", "netns", "exec", n, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off",
            "gso", "off", "gro", "off",
        ]);
        link_up(n, dev);
    }
    (ns, bridge)
}

/// The handshake RTTs (µs, sorted) of the CONNS test connections, once the
/// agent at `agent` (reached from namespace `ns`) shows every one.
fn agent_handshakes(ns: &str, agent: &str, who: &str) -> Vec<u64> {
    let mut rtts: Vec<u64> = Vec::new();
    wait_for(&format!("{who} to show every handshake"), || {
        rtts = http_get(ns, &format!("http://{agent}/connections"))
            .map(|b| json_lines(&b))
            .unwrap_or_default()
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["dport"] == 5001)
            .filter_map(|c| c["rtt"]["dst"]["handshake_us"].as_u64())
            .collect();
        rtts.len() == usize::from(CONNS)
    });
    rtts.sort_unstable();
    rtts
}

#[test]
fn handshake_rtt_equals_the_added_delay() {
    if !enabled("rtt_delay") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ns, bridge) = namespaces();
    let mut procs = Procs::default();
    let (c, m, s) = (ns.a.clone(), bridge.name.clone(), ns.b.clone());

    let ready = d.join("bridge.ready");
    let bridge = repo_root().join("fixtures/delay/delaybridge.py");
    procs.spawn(
        "bridge",
        &m,
        &[
            "python3",
            bridge.to_str().unwrap(),
            "rm0",
            "rm1",
            "--delay-ms",
            &DELAY_MS.to_string(),
            "--ready",
            ready.to_str().unwrap(),
        ],
        &d.join("bridge"),
    );
    wait_for("the bridge", || ready.exists());
    // Resolves the neighbours before the capture: no ARP wait in a SYN's time.
    sh(&[
        "ip", "netns", "exec", &c, "ping", "-c", "2", "-i", "0.2", "-W", "5", SERVER,
    ]);

    // The AF_PACKET backend times segments live (the tc program does not):
    // its agent's /connections must show the same handshakes.
    procs.spawn(
        "flowprobe-afpacket",
        &c,
        &[
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
            "--backend",
            "afpacket",
            "--iface",
            "rc0",
            "--listen",
            AGENT,
            "--interval",
            "0.2",
            "--format",
            "json",
        ],
        &d.join("flowprobe"),
    );
    wait_for("the afpacket agent", || {
        http_get(&c, &format!("http://{AGENT}/metrics"))
            .is_some_and(|m| m.contains("flowprobe_backend{backend=\"afpacket\"} 1"))
    });
    // The tc program times the handshake in the kernel (SYN → SYN/ACK, the
    // precise clock read for those packets only).
    procs.spawn(
        "flowprobe-tc",
        &c,
        &[
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
            "--backend",
            "tc",
            "--iface",
            "rc0",
            "--listen",
            AGENT_TC,
            "--interval",
            "0.2",
            "--format",
            "json",
        ],
        &d.join("flowprobe-tc"),
    );
    wait_for("the tc agent", || {
        http_get(&c, &format!("http://{AGENT_TC}/metrics"))
            .is_some_and(|m| m.contains("flowprobe_backend{backend=\"tc\"} 1"))
    });

    let pcap = d.join("client.pcap");
    procs.spawn(
        "tcpdump",
        &c,
        &[
            "tcpdump",
            "-i",
            "rc0",
            "--immediate-mode",
            "-U",
            "-s",
            "128",
            "-w",
            pcap.to_str().unwrap(),
            "tcp",
        ],
        &d.join("tcpdump"),
    );
    wait_for("tcpdump", || {
        fs::read_to_string(d.join("tcpdump.err")).is_ok_and(|e| e.contains("listening on"))
    });

    let conns: Vec<String> = (0..CONNS)
        .flat_map(|i| ["--conn".to_owned(), format!("{}:20000:5000", 42000 + i)])
        .collect();
    tcpapp_exchange(&c, CLIENT, &s, SERVER, d, &conns);
    // SIGINT: tcpdump writes what it has and exits.
    procs.stop("tcpdump", libc::SIGINT);

    let out = common::flowprobe(&[
        "replay",
        "--quiet",
        "--format",
        "json",
        pcap.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let mut hs: Vec<u64> = json_lines(&common::stdout(&out))
        .iter()
        .filter(|c| c["proto"] == "tcp")
        .map(|c| {
            c["rtt"]["dst"]["handshake_us"]
                .as_u64()
                .unwrap_or_else(|| panic!("no handshake RTT in {c}"))
        })
        .collect();
    assert_eq!(
        hs.len(),
        usize::from(CONNS),
        "{hs:?}; tcpdump: {}",
        fs::read_to_string(d.join("tcpdump.err")).unwrap_or_default()
    );
    hs.sort_unstable();
    let p50 = hs[hs.len() / 2];
    let want = DELAY_MS * 1000;
    let q = common::flowprobe(&[
        "replay",
        "--quiet",
        "--src",
        "ip",
        "--dst",
        "ip",
        "--format",
        "json",
        pcap.to_str().unwrap(),
    ]);
    eprintln!(
        "added delay {want} µs; handshake RTT per connection {hs:?} µs, median {p50} µs; \
         query row: {}",
        common::stdout(&q).trim()
    );
    let within = |v: u64| v.abs_diff(want) * 10 <= want;
    assert!(
        within(p50),
        "handshake RTT median {p50} µs is not within 10 % of {want} µs"
    );

    // Live, from the agent of `run --backend afpacket`.
    let live = agent_handshakes(&c, AGENT, "the agent");
    let live_p50 = live[live.len() / 2];
    let metrics = http_get(&c, &format!("http://{AGENT}/metrics")).unwrap();
    let hist: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("flowprobe_rtt_seconds_count") && l.contains("leg=\"dst\""))
        .collect();
    eprintln!(
        "run --backend afpacket: handshake RTT per connection {live:?} µs, median {live_p50} µs; {hist:?}"
    );
    assert!(
        within(live_p50),
        "live handshake RTT median {live_p50} µs is not within 10 % of {want} µs"
    );
    assert_eq!(hist.len(), 1, "one RTT histogram series: {hist:?}");
    // The rings' own losses are in /metrics too (none at this rate).
    assert!(
        metrics.contains("flowprobe_ring_drops_total 0\n")
            && metrics.contains("flowprobe_ring_packets_total "),
        "no AF_PACKET ring counters in /metrics:\n{metrics}"
    );
    let health = http_get(&c, &format!("http://{AGENT}/health")).unwrap();
    assert!(
        health.contains("\"backend\":\"afpacket\"") && health.contains("\"drops\":0"),
        "{health}"
    );

    // Live, from the tc program's handshake times.
    let tc = agent_handshakes(&c, AGENT_TC, "the tc agent");
    let tc_p50 = tc[tc.len() / 2];
    eprintln!("run --backend tc: handshake RTT per connection {tc:?} µs, median {tc_p50} µs");
    assert!(
        within(tc_p50),
        "tc handshake RTT median {tc_p50} µs is not within 10 % of {want} µs"
    );
}
