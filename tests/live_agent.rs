//! `flowprobe run --listen` scraped by a real Prometheus server (root).
//!
//! Two fresh network namespaces joined by a veth, with loss in each
//! receiver's INPUT chain (as in tests/live_tc/) so that there are real
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
use std::process::Command;
use std::time::Duration;

use common::json_lines;
use common::root::{
    conn_args, drop_in_input, enabled, http_get, tcpapp_exchange, truth, veth_pair,
    wait_for_within, Netns, Procs,
};
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

/// The namespaces (client A, server B) joined by a veth, every 13th large
/// TCP packet dropped in each receiver's INPUT chain (after tc ingress: the
/// senders retransmit for real).
fn namespaces() -> Netns {
    let ns = Netns::create("fpag", "prom");
    veth_pair(&ns, VETH_A, VETH_B, CLIENT, SERVER, "24");
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, "iptables");
    }
    ns
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
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "flowprobe query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&String::from_utf8_lossy(&out.stdout))
}

fn traffic(ns: &Netns, dir: &Path) -> (Value, Value) {
    tcpapp_exchange(&ns.a, CLIENT, &ns.b, SERVER, dir, &conn_args(&CONNS));
    (truth(dir, "client"), truth(dir, "server"))
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
    let ns = namespaces();
    let mut procs = Procs::default();

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
    let ns_a = ns.a.clone();
    procs.spawn(
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
    wait_for_within("the agent's /metrics", Duration::from_secs(30), || {
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
    procs.spawn(
        "prometheus",
        &ns_a,
        &["/usr/bin/prometheus", &config, &data, &listen],
        &d.join("prometheus"),
    );
    wait_for_within(
        "prometheus to scrape the agent",
        Duration::from_secs(60),
        || single(&ns_a, "up{job=\"flowprobe\"}") == Some(1),
    );

    let (client, server) = traffic(&ns, d);

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
    wait_for_within(
        "the agent to see every byte",
        Duration::from_secs(30),
        || {
            agent_row().is_some_and(|r| {
                n(&r["sent"]["bytes"]) - n(&r["sent"]["retransmitted_bytes"]) == written.0
                    && n(&r["received"]["bytes"]) == bytes_sent.1
            })
        },
    );
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
    wait_for_within(
        "prometheus to scrape the final numbers",
        Duration::from_secs(30),
        || {
            want.iter().all(|(m, v)| {
                single(&ns_a, &format!("sum by (src_service, dst_service) ({m})")) == Some(*v)
            })
        },
    );
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
    wait_for_within(
        "the closed connections to be drained and scraped",
        Duration::from_secs(30),
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
    let status = procs.stop("flowprobe", libc::SIGTERM);
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
