//! `flowprobe run --listen` scraped by a real Prometheus server (root).
//!
//! Two fresh network namespaces joined by a veth, with loss in each
//! receiver's INPUT chain (as in tests/live_tc.rs) so that there are real
//! retransmissions. In the client's namespace: `flowprobe run --iface <veth>
//! --config FILE` (the file sets `--listen 127.0.0.1:9911`, the metric
//! labels and `--export-jsonl`; a flag overrides it), and Debian's `prometheus`
//! (temporary config and data dir, listening on that namespace's loopback)
//! scraping it every second. `fixtures/capture/tcpapp.py` drives TCP
//! connections with known byte counts and records each socket's TCP_INFO.
//! Then, once Prometheus has scraped the final numbers:
//! `sum by (src_service, dst_service) (flowprobe_sent_bytes_total)` (and
//! the received bytes, the retransmits, the connection count) through
//! Prometheus' HTTP API equal `flowprobe query --agent` (the agent's own
//! query result) and what the applications wrote: `sent.bytes −
//! retransmitted_bytes` = bytes written, retransmits sent = the client
//! sockets' `tcpi_total_retrans`. After SIGTERM, the export's delta lines
//! sum to the final per-connection output.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` as root (the root tier of
//! `scripts/test.sh`); skipped with a message otherwise (a failure with
//! `CI=true` and not root).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::json_lines;
use common::root::{conn_args, drop_in_input, enabled, sh, tcpapp_exchange};
use serde_json::Value;

const AGENT: &str = "127.0.0.1:9911";
const PROMETHEUS: &str = "127.0.0.1:9090";
const VETH_A: &str = "fpa0";
const VETH_B: &str = "fpa1";
const CLIENT: &str = "10.79.0.1";
const SERVER: &str = "10.79.0.2";

/// (client port, client writes, server writes), in parallel.
const CONNS: [(u16, u64, u64); 3] = [
    (41000, 700_000, 150_000),
    (41001, 1_500_000, 60_000),
    (41002, 200_000, 800_000),
];

fn sh_out(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Everything the test started, undone on drop (also when it panics):
/// processes first (SIGTERM, then SIGKILL), then the namespaces.
struct World {
    a: String,
    b: String,
    children: Vec<(String, Child)>,
}

impl World {
    fn new() -> World {
        let id = std::process::id();
        let w = World {
            a: format!("fpag-a-{id}"),
            b: format!("fpag-b-{id}"),
            children: Vec::new(),
        };
        for n in [&w.a, &w.b] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        sh(&[
            "ip", "-n", &w.a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B,
            "netns", &w.b,
        ]);
        for (n, dev, addr) in [(&w.a, VETH_A, CLIENT), (&w.b, VETH_B, SERVER)] {
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                dev,
            ]);
            sh(&["ip", "-n", n, "link", "set", dev, "up"]);
            // Every 13th large TCP packet dropped after tc ingress: the
            // senders retransmit for real.
            drop_in_input(n, "iptables");
        }
        w
    }

    fn spawn(&mut self, name: &str, ns: &str, cmd: &[&str], log: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(fs::File::create(log.with_extension("out")).unwrap())
            .stderr(fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    /// SIGTERM to `name`, and its exit status.
    fn stop(&mut self, name: &str) -> std::process::ExitStatus {
        let i = self.children.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.children.remove(i);
        // SAFETY: signalling a child we started.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = c.try_wait().unwrap() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                return c.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let names: Vec<String> = self.children.iter().map(|(n, _)| n.clone()).collect();
        for n in names {
            let _ = self.stop(&n);
        }
        for ns in [&self.a, &self.b] {
            if let Ok(m) = fs::metadata(format!("/run/netns/{ns}")) {
                use std::os::unix::fs::MetadataExt;
                for ext in ["lock", "clsact"] {
                    let _ = fs::remove_file(format!("/run/flowprobe/netns-{}.{ext}", m.ino()));
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET from inside namespace `ns` (the servers listen on its loopback).
fn http_get(ns: &str, url: &str) -> Option<String> {
    let (ok, out, _) = sh_out(&[
        "ip",
        "netns",
        "exec",
        ns,
        "python3",
        "-c",
        "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())",
        url,
    ]);
    ok.then_some(out)
}

/// A PromQL instant query: each series' labels and value.
fn promql(ns: &str, q: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    let enc: String = q
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    let Some(body) = http_get(ns, &format!("http://{PROMETHEUS}/api/v1/query?query={enc}")) else {
        return Vec::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "success", "{q}: {body}");
    v["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let labels = s["metric"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                .collect();
            (labels, s["value"][1].as_str().unwrap().parse().unwrap())
        })
        .collect()
}

/// The one series of a `sum` (the live traffic has no service tags, so
/// every connection is in one src_service/dst_service group).
fn single(ns: &str, q: &str) -> Option<u64> {
    match promql(ns, q).as_slice() {
        [(_, v)] => Some(*v as u64),
        _ => None,
    }
}

/// `flowprobe query --agent` in the agent's namespace, JSON rows.
fn agent_query(ns: &str, args: &[&str]) -> Vec<Value> {
    let mut cmd = vec![
        "ip",
        "netns",
        "exec",
        ns,
        env!("CARGO_BIN_EXE_flowprobe"),
        "query",
        "--agent",
        AGENT,
        "--format",
        "json",
    ];
    cmd.extend(args);
    let (ok, out, err) = sh_out(&cmd);
    assert!(ok, "flowprobe query failed: {err}");
    json_lines(&out)
}

fn traffic(w: &World, dir: &Path) -> (Value, Value) {
    tcpapp_exchange(&w.a, CLIENT, &w.b, SERVER, dir, &conn_args(&CONNS));
    let read = |f: &str| -> Value {
        serde_json::from_str(&fs::read_to_string(dir.join(f)).unwrap()).unwrap()
    };
    (read("client.json"), read("server.json"))
}

#[test]
fn prometheus_scrape_equals_agent_query_and_app_bytes() {
    if !enabled("live_agent") {
        return;
    }
    assert!(
        Path::new("/usr/bin/prometheus").exists(),
        "live_agent needs Debian's prometheus (the setup tier of scripts/test.sh installs it)"
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut w = World::new();

    // The listener, labels and export come from the config file; the
    // command line's --max-conns wins over the file's.
    let export = d.join("export.jsonl");
    let config = d.join("flowprobe.toml");
    fs::write(
        &config,
        format!(
            "listen = \"{AGENT}\"\nmetrics_labels = \"src.service,dst.service,dst.port\"\n\
             max_conns = 4096\n[export]\njsonl = \"{}\"\n",
            export.display()
        ),
    )
    .unwrap();
    let ns_a = w.a.clone();
    w.spawn(
        "flowprobe",
        &ns_a,
        &[
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
            "--config",
            config.to_str().unwrap(),
            "--iface",
            VETH_A,
            "--format",
            "json",
            "--max-conns",
            "8192",
            // Fast ticks: the export and the agent follow closely.
            "--interval",
            "0.1",
        ],
        &d.join("flowprobe"),
    );
    wait_for("the agent's /metrics", 30, || {
        http_get(&ns_a, &format!("http://{AGENT}/metrics"))
            .is_some_and(|m| m.contains("flowprobe_attached_interfaces 1"))
    });

    fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: flowprobe\n    static_configs:\n      - targets: ['{AGENT}']\n"
        ),
    )
    .unwrap();
    let config = format!("--config.file={}", d.join("prometheus.yml").display());
    let data = format!("--storage.tsdb.path={}", d.join("data").display());
    let listen = format!("--web.listen-address={PROMETHEUS}");
    w.spawn(
        "prometheus",
        &ns_a,
        &["/usr/bin/prometheus", &config, &data, &listen],
        &d.join("prometheus"),
    );
    wait_for("prometheus to scrape the agent", 60, || {
        single(&ns_a, "up{job=\"flowprobe\"}") == Some(1)
    });

    let (client, server) = traffic(&w, d);

    // The truth: what the applications wrote, what the kernel retransmitted.
    let n = |v: &Value| v.as_u64().unwrap();
    let mut written = (0, 0);
    let mut bytes_sent = (0, 0);
    let mut client_retrans = 0;
    for (port, c, s) in CONNS {
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        assert_eq!(n(&ct["app_bytes_written"]), c);
        assert_eq!(n(&st["app_bytes_written"]), s);
        written.0 += c;
        written.1 += s;
        bytes_sent.0 += n(&ct["tcpi_bytes_sent"]);
        bytes_sent.1 += n(&st["tcpi_bytes_sent"]);
        client_retrans += n(&ct["tcpi_total_retrans"]);
    }

    // The agent's numbers settle within a tick or two of the last FIN.
    // (None before its first tick shows the connections.)
    let agent_row = || {
        let rows = agent_query(&ns_a, &["--src", "service", "--dst", "service"]);
        assert!(rows.len() <= 1, "one service pair: {rows:?}");
        rows.first().cloned()
    };
    wait_for("the agent to see every byte", 30, || {
        agent_row().is_some_and(|r| {
            n(&r["sent"]["bytes"]) - n(&r["sent"]["retransmitted_bytes"]) == written.0
                && n(&r["received"]["bytes"]) == bytes_sent.1
        })
    });
    let row = agent_row().unwrap();
    let want = [
        ("flowprobe_sent_bytes_total", n(&row["sent"]["bytes"])),
        (
            "flowprobe_received_bytes_total",
            n(&row["received"]["bytes"]),
        ),
        ("flowprobe_sent_packets_total", n(&row["sent"]["packets"])),
        ("flowprobe_connections_total", n(&row["conns"])),
        (
            "flowprobe_retransmits_total{direction=\"sent\"}",
            n(&row["sent"]["retransmits"]),
        ),
        (
            "flowprobe_retransmitted_bytes_total{direction=\"sent\"}",
            n(&row["sent"]["retransmitted_bytes"]),
        ),
    ];
    // Prometheus has the final numbers once its latest scrape is newer
    // than the agent's last change.
    wait_for("prometheus to scrape the final numbers", 30, || {
        want.iter().all(|(m, v)| {
            single(&ns_a, &format!("sum by (src_service, dst_service) ({m})")) == Some(*v)
        })
    });
    for (m, v) in want {
        eprintln!("PromQL sum by (src_service, dst_service) ({m}) = {v} = agent /query");
    }
    let sent = n(&row["sent"]["bytes"]);
    let retx_bytes = n(&row["sent"]["retransmitted_bytes"]);
    eprintln!(
        "sent.bytes {sent} - retransmitted_bytes {retx_bytes} = {} = bytes the client wrote {}; \
         sent.bytes = tcpi_bytes_sent {}; received.bytes {} = server's tcpi_bytes_sent {}; \
         retransmits sent {} = client tcpi_total_retrans {client_retrans}; conns {}",
        sent - retx_bytes,
        written.0,
        bytes_sent.0,
        n(&row["received"]["bytes"]),
        bytes_sent.1,
        n(&row["sent"]["retransmits"]),
        n(&row["conns"]),
    );
    assert_eq!(sent - retx_bytes, written.0);
    assert_eq!(sent, bytes_sent.0);
    assert_eq!(n(&row["received"]["bytes"]), bytes_sent.1);
    assert_eq!(n(&row["sent"]["retransmits"]), client_retrans);
    assert_eq!(n(&row["conns"]), CONNS.len() as u64);
    assert!(client_retrans > 0, "the loss produced no retransmissions");

    // Grouped by port in PromQL = the agent's --dst port query.
    let by_port = promql(&ns_a, "sum by (dst_port) (flowprobe_sent_bytes_total)");
    let rows = agent_query(&ns_a, &["--dst", "port"]);
    assert_eq!(by_port.len(), 1, "{by_port:?}");
    assert_eq!(
        by_port[0].0.get("dst_port").map(String::as_str),
        Some("5001")
    );
    assert_eq!(by_port[0].1 as u64, n(&rows[0]["sent"]["bytes"]));

    // Health series.
    let metrics = http_get(&ns_a, &format!("http://{AGENT}/metrics")).unwrap();
    for line in [
        "flowprobe_attached_interfaces 1",
        &format!("flowprobe_interface_attached{{iface=\"{VETH_A}\",mode=\"clsact\"}} 1"),
        "flowprobe_table_capacity 8192",
        "flowprobe_map_full_total 0",
    ] {
        assert!(metrics.contains(line), "no `{line}` in:\n{metrics}");
    }
    assert!(metrics.contains("flowprobe_packets_skipped_total{reason=\"not_ip\"}"));
    // The same health as JSON.
    let health: Value =
        serde_json::from_str(&http_get(&ns_a, &format!("http://{AGENT}/health")).unwrap()).unwrap();
    assert_eq!(health["backend"], "tc", "{health}");
    assert_eq!(
        health["interfaces"],
        serde_json::json!([{ "iface": VETH_A, "mode": "clsact" }]),
        "{health}"
    );
    assert_eq!(health["map"]["capacity"], 8192, "{health}");
    assert_eq!(health["map"]["full"], 0, "{health}");
    assert!(
        health["packets"]["tracked"].as_u64().unwrap() > 0,
        "{health}"
    );

    // Monotonic across drains: once the closed connections have left the
    // kernel map (--closed-timeout, 2 s), Prometheus has seen no counter
    // go down and the sums are unchanged.
    wait_for(
        "the closed connections to be drained and scraped",
        30,
        || {
            single(&ns_a, "flowprobe_table_connections") == Some(0)
                && single(&ns_a, "flowprobe_tracked_connections") == Some(CONNS.len() as u64)
        },
    );
    for m in [
        "flowprobe_sent_bytes_total",
        "flowprobe_received_bytes_total",
        "flowprobe_retransmits_total",
        "flowprobe_connections_total",
    ] {
        assert_eq!(
            single(&ns_a, &format!("sum(resets({m}[5m]))")),
            Some(0),
            "{m}"
        );
    }
    assert_eq!(
        single(
            &ns_a,
            "sum by (src_service, dst_service) (flowprobe_sent_bytes_total)"
        ),
        Some(sent)
    );
    eprintln!("after the drain: table_connections 0, no counter reset, sums unchanged");

    // The export: each connection's delta lines sum to its final record.
    let status = w.stop("flowprobe");
    let err = fs::read_to_string(d.join("flowprobe.err")).unwrap();
    assert!(status.success(), "flowprobe run: {status}: {err}");
    // The final records: the lines after the last snapshot, without its number.
    let finals: Vec<Value> = json_lines(&fs::read_to_string(d.join("flowprobe.out")).unwrap())
        .into_iter()
        .filter(|c| c.get("snapshot").is_none())
        .collect();
    assert_eq!(finals.len(), CONNS.len(), "{finals:?}");
    let lines = json_lines(&fs::read_to_string(&export).unwrap());
    assert!(!lines.is_empty());
    for f in finals.iter().filter(|c| c["proto"] == "tcp") {
        for dir in ["sent", "received"] {
            for field in ["bytes", "packets", "retransmits", "retransmitted_bytes"] {
                let sum: u64 = lines
                    .iter()
                    // (sport alone: each client port has one connection;
                    // live first_seen moves by nanoseconds between reads.)
                    .filter(|l| l["sport"] == f["sport"])
                    .map(|l| n(&l[dir][field]))
                    .sum();
                assert_eq!(sum, n(&f[dir][field]), "export {dir}.{field} of {f}");
            }
        }
    }
    eprintln!(
        "export: {} delta lines over {} intervals sum to the final records",
        lines.len(),
        lines.iter().map(|l| n(&l["interval"])).max().unwrap_or(0)
    );
}
