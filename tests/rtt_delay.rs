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
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::root::{enabled, sh, wait_for, KillOnDrop};
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

/// The namespaces and the processes in them, undone on drop (also on a
/// panic): SIGTERM, then SIGKILL, then the namespaces.
struct World {
    ns: [String; 3],
    children: Vec<Child>,
}

impl World {
    fn new() -> World {
        let id = std::process::id();
        let w = World {
            ns: ["c", "m", "s"].map(|r| format!("fprt-{r}-{id}")),
            children: Vec::new(),
        };
        for n in &w.ns {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        let [c, m, s] = &w.ns;
        sh(&[
            "ip", "-n", c, "link", "add", "rc0", "type", "veth", "peer", "name", "rm0", "netns", m,
        ]);
        sh(&[
            "ip", "-n", s, "link", "add", "rs0", "type", "veth", "peer", "name", "rm1", "netns", m,
        ]);
        sh(&[
            "ip",
            "-n",
            c,
            "addr",
            "add",
            &format!("{CLIENT}/24"),
            "dev",
            "rc0",
        ]);
        sh(&[
            "ip",
            "-n",
            s,
            "addr",
            "add",
            &format!("{SERVER}/24"),
            "dev",
            "rs0",
        ]);
        for (n, dev) in [(c, "rc0"), (m, "rm0"), (m, "rm1"), (s, "rs0")] {
            // The bridge sends frames on as it read them: no merged
            // super-packets, no checksum left to the hardware.
            sh(&[
                "ip", "netns", "exec", n, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso",
                "off", "gso", "off", "gro", "off",
            ]);
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
        }
        w
    }

    fn spawn(&mut self, ns: &str, cmd: &[&str], log: &Path) {
        let c = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(fs::File::create(log.with_extension("out")).unwrap())
            .stderr(fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", cmd.join(" ")));
        self.children.push(c);
    }
}

fn stop(c: &mut Child, sig: libc::c_int) {
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(c.id() as libc::pid_t, sig) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for c in &mut self.children {
            stop(c, libc::SIGTERM);
        }
        for n in &self.ns {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// GET from inside namespace `ns` (the agent listens on its loopback).
fn http_get(ns: &str, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
        .arg(url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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
    let mut w = World::new();
    let [c, m, s] = w.ns.clone();

    let ready = d.join("bridge.ready");
    let bridge = repo_root().join("fixtures/delay/delaybridge.py");
    w.spawn(
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
    w.spawn(
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
    w.spawn(
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
    w.spawn(
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
    let app = repo_root().join("fixtures/capture/tcpapp.py");
    let sready = d.join("server.ready");
    let server = Command::new("ip")
        .args(["netns", "exec", &s, "python3"])
        .arg(&app)
        .args(["server", "--addr", SERVER, "--ready"])
        .arg(&sready)
        .arg("--out")
        .arg(d.join("server.json"))
        .args(&conns)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = KillOnDrop(server);
    wait_for("the server", || sready.exists());
    let client = Command::new("ip")
        .args(["netns", "exec", &c, "python3"])
        .arg(&app)
        .args(["client", "--server", SERVER, "--local", CLIENT, "--out"])
        .arg(d.join("client.json"))
        .args(&conns)
        .status()
        .unwrap();
    assert!(client.success(), "tcpapp client failed");
    assert!(server.wait().unwrap().success(), "tcpapp server failed");
    // SIGINT: tcpdump writes what it has and exits.
    let mut tcpdump = w.children.pop().unwrap();
    stop(&mut tcpdump, libc::SIGINT);

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
