//! Churn with reused 5-tuples, the root test twin of `bench/churn.sh`: a
//! client makes [`CONNS`] short TCP connections at [`RATE`] a second
//! through a veth, from an ephemeral range so narrow (with
//! `tcp_tw_reuse`) that every port serves several connections, each a
//! second or two after the last, sooner than a closed connection leaves the
//! kernel table. `flowprobe run --listen … --export-jsonl F` counts them in
//! the client's namespace. Every connection made must be in the final
//! output and in the export (its delta lines summed) exactly once, with
//! the bytes written each way, and `/health` must show nothing lost.
//!
//! Connections leave the listing a second after they end (`--keep-ended
//! 1`), so most of them are retired while it runs: the listing stays far
//! below the connections made, and nothing retired is lost from the final
//! output, the export, the metrics or the rollups (`query --last` sums to
//! the final output's bytes and counts every connection). The agent's RSS
//! is flat after the first window.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use super::repo_root;
use super::root::{
    http_get, rss_kb, sh, spawn_flowprobe, stop, veth_pair, wait_for, wait_for_within, Netns, Procs,
};

/// Connections made, and started a second.
pub const CONNS: u32 = 3000;
pub const RATE: u32 = 300;
/// 1000 ports, of which connect() takes the 500 even ones first: each
/// comes back after about 1.7 s (`tcp_tw_reuse` waits 1 s), before the
/// closed timeout (2 s) drains the connection that used it last.
const PORTS: &str = "40000 40999";
const SERVER: &str = "10.79.0.2:8080";
const HEALTH: &str = "http://127.0.0.1:9481/health";

fn check_field(v: &Value, path: &str) -> u64 {
    path.split('.')
        .fold(v, |v, k| &v[k])
        .as_u64()
        .unwrap_or_else(|| panic!("no {path} in {v}"))
}

/// The scenario with `flowprobe run --backend BACKEND`; `tag` names the
/// namespaces.
/// Memory stops growing once the first `--keep-ended` window is listed:
/// from 40 % of the load (4 s in, a third of the connections made, most
/// of them retired) to its end, RSS grows by less than [`GROWTH_KB`]. A
/// connection kept for good would add its size times the 1800 made
/// meanwhile (the daemon grew 6.4 kB each, 11 MB here).
fn flat_after_the_first_window(rss: &[u64]) {
    eprintln!("churn: the agent's RSS every 0.5 s of the load (kB): {rss:?}");
    assert!(
        rss.len() >= 10,
        "too few RSS samples over the load: {rss:?}"
    );
    let from = rss[rss.len() * 2 / 5];
    let end = *rss.last().unwrap();
    assert!(
        end.saturating_sub(from) < GROWTH_KB,
        "RSS grew {} kB after the first window (every 0.5 s, kB: {rss:?})",
        end.saturating_sub(from)
    );
}

/// 2.2 kB per connection made after the first window, at most.
const GROWTH_KB: u64 = 4096;

pub fn churn(backend: &str, tag: &str) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let ns = Netns::create("fpc", tag);
    veth_pair(&ns, "fpc0", "fpc1", "10.79.0.1", "10.79.0.2", "24");
    sh(&[
        "ip",
        "netns",
        "exec",
        &ns.a,
        "sysctl",
        "-qw",
        &format!("net.ipv4.ip_local_port_range={PORTS}"),
        "net.ipv4.tcp_tw_reuse=1",
    ]);
    let script = repo_root().join("bench/churn.py");
    let script = script.to_str().unwrap();
    let ready = dir.join("ready");
    let mut procs = Procs::default();
    procs.spawn(
        "server",
        &ns.b,
        &["python3", script, "server", SERVER, ready.to_str().unwrap()],
        &dir.join("server"),
    );
    wait_for("the churn server", || ready.exists());

    let export = dir.join("export.jsonl");
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &[
            "run",
            "--backend",
            backend,
            "--iface",
            "fpc0",
            "--format",
            "json",
            "--listen",
            "127.0.0.1:9481",
            "--export-jsonl",
            export.to_str().unwrap(),
            "--keep-ended",
            "1",
            "--rollup-interval",
            "1",
        ],
        dir,
        "probe",
    );
    // The first reading comes after the source started (attached).
    let started = format!("\"backend\":\"{backend}\"");
    wait_for_within("flowprobe's first reading", Duration::from_secs(60), || {
        http_get(&ns.a, HEALTH).is_some_and(|h| h.contains(&started))
    });

    let made = dir.join("made.json");
    let mut client = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.a, "python3", script, "client", SERVER])
        .args([RATE.to_string(), CONNS.to_string()])
        .arg(&made)
        .stderr(fs::File::create(dir.join("client.err")).unwrap())
        .spawn()
        .unwrap();
    // The agent's RSS every half second of the load (`ip netns exec`
    // execs it: the child's pid is its own).
    let mut rss = Vec::new();
    let client = loop {
        if let Some(st) = client.try_wait().unwrap() {
            break st;
        }
        rss.push(rss_kb(probe.id()));
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(client.success(), "the churn client failed");
    flat_after_the_first_window(&rss);
    // One tick more, so that /health has seen the last connections.
    std::thread::sleep(Duration::from_millis(1500));
    let health: Value = serde_json::from_str(&http_get(&ns.a, HEALTH).unwrap()).unwrap();
    let metrics = http_get(&ns.a, "http://127.0.0.1:9481/metrics").unwrap();
    // One row (no group-by), and `other` if an interval folded groups.
    let last: Vec<Value> = http_get(&ns.a, "http://127.0.0.1:9481/query?src=&dst=&last=1h")
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let st = stop(&mut probe, libc::SIGINT, Duration::from_secs(30));
    let err = fs::read_to_string(dir.join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe failed: {err}");
    assert!(!err.contains("not counted"), "{err}");

    // Nothing lost, as /health says.
    match backend {
        "afpacket" => assert_eq!(check_field(&health, "rings.drops"), 0, "{health}"),
        _ => {
            for k in ["map.full", "map.insert_failed"] {
                assert_eq!(check_field(&health, k), 0, "{k}: {health}");
            }
        }
    }
    assert_eq!(check_field(&health, "export.failed_writes"), 0, "{health}");

    let out = std::process::Command::new("python3")
        .args([script, "check"])
        .args([&made, &dir.join("probe.json"), &export])
        .arg(SERVER.rsplit(':').next().unwrap())
        .output()
        .unwrap();
    let res: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "churn.py check: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| check_field(&res, k);
    let client_err = fs::read_to_string(dir.join("client.err")).unwrap();
    assert!(
        n("made") * 100 >= u64::from(CONNS) * 95,
        "only {} of {CONNS} connections made: {client_err}",
        n("made")
    );
    assert!(
        n("reused") * 2 >= n("made"),
        "ports were not reused enough to test reuse: {res}"
    );
    // The listing was bounded: most connections were retired, and their
    // counts stayed.
    let gauge = |name: &str| -> u64 {
        super::metric(&metrics, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let (listed, retired) = (
        gauge("flowprobe_listed_connections"),
        gauge("flowprobe_retired_connections_total"),
    );
    assert!(
        retired * 2 > n("made") && listed * 2 < n("made"),
        "listed {listed}, retired {retired} of {}",
        n("made")
    );
    // The rollups: every connection began in the last hour, every byte of
    // the final output is in them.
    let records: Vec<Value> = fs::read_to_string(dir.join("probe.json"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let bytes = |v: &Value| check_field(v, "sent.bytes") + check_field(v, "received.bytes");
    let total: u64 = records.iter().map(bytes).sum();
    let sum = |f: &dyn Fn(&Value) -> u64| -> u64 { last.iter().map(f).sum() };
    assert_eq!(
        (sum(&bytes), sum(&|v| check_field(v, "conns"))),
        (total, records.len() as u64),
        "query --last 1h against the final output: {last:?}"
    );
    for part in ["final", "export"] {
        assert_eq!(
            (n(&format!("{part}.missing")), n(&format!("{part}.extra"))),
            (0, 0),
            "{part}: every connection made, once, with its bytes: {res}\n{err}"
        );
    }
}
