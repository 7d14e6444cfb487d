//! The fleet live (root): a `nats-server -js` in its own network namespace
//! on a test bridge, three "hosts" (namespaces on veths into that bridge),
//! each with `flowprobe run --fleet`, and one unmonitored client.
//! `fixtures/capture/tcpapp.py` moves known bytes over TCP between them,
//! with every 13th large packet dropped in each receiver's INPUT chain (real
//! retransmissions), each application tagged with a service by
//! `OTEL_SERVICE_NAME`. Half-way, nats-server is stopped for several
//! seconds while traffic goes on, then started again on the same store.
//! Then one agent is killed and its host goes on talking: the server's
//! view of that takes over. At the end `flowprobe fleet` (started last: it rebuilds its window from
//! the stream) must answer, per host pair and per service pair, one row
//! each: `bytes − retransmitted_bytes` each way = what the applications
//! wrote, `retransmits` sent = the client sockets' `tcpi_total_retrans`,
//! counted once; the remote end tagged by its own host's agent; the
//! unmonitored client's row from the server's view.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` as root (the root tier of
//! `scripts/test.sh`); skipped with a message otherwise (a failure with
//! `CI=true` and not root).

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::json_lines;
use common::root::{
    addr_up, drop_in_input, enabled, link_up, lower_up, sh, truth, veth, wait_for, wait_for_rings,
    KillOnDrop, Namespace, Procs,
};
use serde_json::Value;

const BRIDGE: &str = "fpfbr0";
const NATS_IP: &str = "10.93.0.1";
const FLEET: &str = "127.0.0.1:9912";

/// (name, address, monitored).
const HOSTS: [(&str, &str, bool); 4] = [
    ("h1", "10.93.0.11", true),
    ("h2", "10.93.0.12", true),
    ("h3", "10.93.0.13", true),
    ("u", "10.93.0.14", false),
];

fn service(host: &str) -> String {
    format!("svc-{host}")
}

/// One tcpapp exchange from `client` to `server` (indexes into HOSTS), the
/// applications tagged with their host's service; the sockets' truth in
/// `dir`.
fn exchange(ns: &[Namespace], client: usize, server: usize, conns: &[(u16, u64, u64)], dir: &Path) {
    exchange_between(
        (&ns[client].name, HOSTS[client].1, &service(HOSTS[client].0)),
        (&ns[server].name, HOSTS[server].1, &service(HOSTS[server].0)),
        conns,
        dir,
    );
}

/// One tcpapp exchange between (namespace, address, service) ends.
fn exchange_between(
    client: (&str, &str, &str),
    server: (&str, &str, &str),
    conns: &[(u16, u64, u64)],
    dir: &Path,
) {
    fs::create_dir_all(dir).unwrap();
    let app = common::repo_root().join("fixtures/capture/tcpapp.py");
    let args = common::root::conn_args(conns);
    let ready = dir.join("ready");
    let mut srv = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", server.0, "python3"])
            .arg(&app)
            .args(["server", "--addr", server.1, "--ready"])
            .arg(&ready)
            .arg("--out")
            .arg(dir.join("server.json"))
            .args(&args)
            .env("OTEL_SERVICE_NAME", server.2)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the tcpapp server", || ready.exists());
    let st = Command::new("ip")
        .args(["netns", "exec", client.0, "python3"])
        .arg(&app)
        .args(["client", "--server", server.1, "--local", client.1, "--out"])
        .arg(dir.join("client.json"))
        .args(&args)
        // Each connection stays open 2 s once its data is acknowledged:
        // long enough for attribution to find the client's process.
        .args(["--keepalive", "60:60:2"])
        .env("OTEL_SERVICE_NAME", client.2)
        .status()
        .unwrap();
    assert!(st.success(), "tcpapp client failed");
    assert!(srv.wait().unwrap().success(), "tcpapp server failed");
}

/// What the applications of a pair wrote and the client sockets' retransmits.
#[derive(Default, Debug, PartialEq, Eq, Clone, Copy)]
struct Truth {
    conns: u64,
    client_wrote: u64,
    server_wrote: u64,
    client_retrans: u64,
}

fn add_truth(t: &mut Truth, dir: &Path, conns: &[(u16, u64, u64)]) {
    let client = truth(dir, "client");
    for &(port, c, s) in conns {
        t.conns += 1;
        t.client_wrote += c;
        t.server_wrote += s;
        t.client_retrans += client["tcp"][port.to_string()]["tcpi_total_retrans"]
            .as_u64()
            .unwrap();
    }
}

fn nats_server(procs: &mut Procs, ns: &str, store: &Path, log: &Path) {
    let store = store.to_str().unwrap().to_owned();
    procs.spawn(
        "nats",
        ns,
        &[
            "nats-server",
            "-js",
            "-a",
            NATS_IP,
            "-p",
            "4222",
            "-sd",
            &store,
        ],
        log,
    );
    wait_for("nats-server", || {
        Command::new("ip")
            .args(["netns", "exec", ns, "python3", "-c"])
            .arg(format!(
                "import socket; socket.create_connection(('{NATS_IP}', 4222), timeout=1)"
            ))
            .status()
            .is_ok_and(|s| s.success())
    });
}

fn query(ns: &str, args: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(env!("CARGO_BIN_EXE_flowprobe"))
        // The agents' own connections to NATS are counted too: not these.
        .args(["query", "--agent", FLEET, "--format", "json"])
        .args(["--where", "dst.port != 4222"])
        .args(args);
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "query {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(&String::from_utf8(out.stdout).unwrap())
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap()
}

/// The row's numbers against the truth: counted once, exactly.
fn check_row(what: &str, r: &Value, t: &Truth, retransmits: bool) -> Vec<String> {
    let app = |d: &str| n(&r[d]["bytes"]) - n(&r[d]["retransmitted_bytes"]);
    let got = Truth {
        conns: n(&r["conns"]),
        client_wrote: app("sent"),
        server_wrote: app("received"),
        client_retrans: if retransmits {
            n(&r["sent"]["retransmits"])
        } else {
            t.client_retrans
        },
    };
    eprintln!("{what}: fleet {got:?}, applications and kernel {t:?}");
    if &got != t {
        vec![format!("{what}: fleet {got:?} != {t:?}")]
    } else {
        Vec::new()
    }
}

#[test]
fn three_hosts_one_query_counted_once_through_a_nats_outage() {
    if !enabled("live_fleet") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let nats_ns = Namespace::create("fpfl", "nats");
    let hosts: Vec<Namespace> = HOSTS
        .iter()
        .map(|(h, _, _)| Namespace::create("fpfl", h))
        .collect();
    let b = nats_ns.name.as_str();
    sh(&["ip", "-n", b, "link", "add", BRIDGE, "type", "bridge"]);
    addr_up(b, BRIDGE, &format!("{NATS_IP}/24"));
    for (i, ns) in hosts.iter().enumerate() {
        let port = format!("fpfp{i}");
        veth(b, &port, &ns.name, "eth0");
        sh(&["ip", "-n", b, "link", "set", &port, "master", BRIDGE]);
        link_up(b, &port);
        addr_up(&ns.name, "eth0", &format!("{}/24", HOSTS[i].1));
        drop_in_input(&ns.name, "iptables");
    }
    wait_for("the bridge ports", || {
        (0..hosts.len()).all(|i| lower_up(b, &format!("fpfp{i}")))
    });

    let mut procs = Procs::default();
    let store = d.join("js");
    nats_server(&mut procs, b, &store, &d.join("nats1"));
    let url = format!("nats://{NATS_IP}:4222");
    let mut agents = Procs::default();
    for (i, (h, _, monitored)) in HOSTS.iter().enumerate() {
        if !monitored {
            continue;
        }
        agents.spawn(
            h,
            &hosts[i].name,
            &[
                env!("CARGO_BIN_EXE_flowprobe"),
                "run",
                // AF_PACKET: counting starts at once (the eBPF program's
                // load can take a minute on a loaded machine); the fleet's
                // part is the same for every backend.
                "--backend",
                "afpacket",
                "--iface",
                "eth0",
                "--fleet",
                &url,
                "--host-id",
                h,
                "--fleet-interval",
                "1",
                "--format",
                "json",
            ],
            &d.join(format!("agent-{h}")),
        );
    }
    // Attached: the agents said they publish.
    wait_for("the agents", || {
        HOSTS.iter().filter(|h| h.2).all(|(h, _, _)| {
            fs::read_to_string(d.join(format!("agent-{h}.err")))
                .is_ok_and(|e| e.contains("publishing to the fleet"))
        })
    });
    for (i, h) in HOSTS.iter().enumerate() {
        if h.2 {
            wait_for_rings(&hosts[i].name, 1);
        }
    }

    let (h1, h2, h3, u) = (0, 1, 2, 3);
    let mut t_h1 = Truth::default();
    let mut t_h3 = Truth::default();
    let mut t_u = Truth::default();
    // NATS up.
    let c = [(41000, 600_000, 80_000), (41001, 90_000, 700_000)];
    exchange(&hosts, h1, h2, &c, &d.join("p1-h1"));
    add_truth(&mut t_h1, &d.join("p1-h1"), &c);
    let c = [(41100, 400_000, 30_000)];
    exchange(&hosts, h3, h2, &c, &d.join("p1-h3"));
    add_truth(&mut t_h3, &d.join("p1-h3"), &c);
    let c = [(41200, 300_000, 50_000)];
    exchange(&hosts, u, h2, &c, &d.join("p1-u"));
    add_truth(&mut t_u, &d.join("p1-u"), &c);

    // NATS down for several seconds while traffic goes on.
    procs.stop("nats", libc::SIGKILL);
    let down = Instant::now();
    let c = [(41010, 500_000, 20_000)];
    exchange(&hosts, h1, h2, &c, &d.join("p2-h1"));
    add_truth(&mut t_h1, &d.join("p2-h1"), &c);
    let c = [(41110, 50_000, 450_000)];
    exchange(&hosts, h3, h2, &c, &d.join("p2-h3"));
    add_truth(&mut t_h3, &d.join("p2-h3"), &c);
    std::thread::sleep(Duration::from_secs(5).saturating_sub(down.elapsed()));
    nats_server(&mut procs, b, &store, &d.join("nats2"));

    let c = [(41020, 250_000, 250_000)];
    exchange(&hosts, h1, h2, &c, &d.join("p3-h1"));
    add_truth(&mut t_h1, &d.join("p3-h1"), &c);

    // h1's agent dies (once its intervals are out): the server's view of
    // h1's next connection counts instead.
    std::thread::sleep(Duration::from_secs(6));
    agents.stop("h1", libc::SIGKILL);
    let c = [(41030, 350_000, 120_000)];
    exchange(&hosts, h1, h2, &c, &d.join("p4-h1"));
    add_truth(&mut t_h1, &d.join("p4-h1"), &c);

    // Intervals more, then the agents end (publishing what is open).
    std::thread::sleep(Duration::from_secs(3));
    for (h, _, monitored) in HOSTS {
        if monitored && h != "h1" {
            let st = agents.stop(h, libc::SIGTERM);
            let err = fs::read_to_string(d.join(format!("agent-{h}.err"))).unwrap();
            assert!(st.success(), "agent {h}: {err}");
            assert!(!err.contains("could not be published"), "agent {h}: {err}");
        }
    }

    // The fleet process, started last, rebuilds everything from the stream.
    procs.spawn(
        "fleet",
        b,
        &[
            env!("CARGO_BIN_EXE_flowprobe"),
            "fleet",
            "--nats",
            &url,
            "--listen",
            FLEET,
        ],
        &d.join("fleet"),
    );
    let mut last = String::new();
    common::root::wait_for_within("the fleet's window", Duration::from_secs(30), || {
        let out = Command::new("ip")
            .args(["netns", "exec", b, "python3", "-c"])
            .arg(format!(
                "import urllib.request; print(urllib.request.urlopen('http://{FLEET}/health', timeout=5).read().decode())"
            ))
            .output()
            .unwrap();
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(last.trim()).is_ok_and(|h| {
            h["hosts"].as_array().is_some_and(|a| a.len() == 3)
                && h["stats"]["accepted"] == h["stats"]["messages"]
                && n(&h["stats"]["messages"]) > 0
        })
    });
    std::thread::sleep(Duration::from_secs(2));
    let health: Value = serde_json::from_str(last.trim()).unwrap();
    eprintln!("fleet health: {health}");
    for h in health["hosts"].as_array().unwrap() {
        assert_eq!(h["spool_dropped"], 0, "{h}");
        assert_eq!(h["missing"], serde_json::json!([]), "{h}");
    }
    assert_eq!(
        health["stats"]["duplicates"], 0,
        "resends were suppressed by the stream"
    );

    let mut failures = Vec::new();
    // By host: one row per pair, exact.
    let rows = query(b, &["--src", "host", "--dst", "host"]);
    let find = |rows: &[Value], k: &str, src: Option<&str>, dst: &str| -> Option<Value> {
        rows.iter()
            .find(|r| r["src"][k].as_str() == src && r["dst"][k].as_str() == Some(dst))
            .cloned()
    };
    eprintln!("{rows:#?}");
    assert_eq!(rows.len(), 3, "{rows:#?}");
    for (what, src, t, retx) in [
        ("h1 -> h2", Some("h1"), &t_h1, true),
        ("h3 -> h2", Some("h3"), &t_h3, true),
        ("unmonitored -> h2", None, &t_u, false),
    ] {
        match find(&rows, "host", src, "h2") {
            Some(r) => failures.extend(check_row(what, &r, t, retx)),
            None => failures.push(format!("no row {what}")),
        }
    }
    // By service: the client's service from its own agent, the server's
    // from its own.
    let rows = query(b, &["--src", "service", "--dst", "service"]);
    eprintln!("{rows:#?}");
    for (what, src, t, retx) in [
        ("svc-h1 -> svc-h2", Some("svc-h1"), &t_h1, true),
        ("svc-h3 -> svc-h2", Some("svc-h3"), &t_h3, true),
        ("unmonitored -> svc-h2", None, &t_u, false),
    ] {
        match find(&rows, "service", src, "svc-h2") {
            Some(r) => failures.extend(check_row(what, &r, t, retx)),
            None => failures.push(format!("no row {what}")),
        }
    }
    // The unmonitored client's row is the server's view.
    let rows = query(b, &["--src", "view,unresolved", "--dst", "host"]);
    assert!(
        rows.iter().any(|r| r["src"]["view"] == "server"
            && r["src"]["unresolved"] == "not_monitored"
            && r["dst"]["host"] == "h2"),
        "{rows:#?}"
    );
    // With its agent dead, h1's last connection is h2's view, tagged h1.
    let rows = query(b, &["--src", "host,view", "--dst", "host"]);
    assert!(
        rows.iter().any(|r| r["src"]["host"] == "h1"
            && r["src"]["view"] == "server"
            && r["dst"]["host"] == "h2"
            && n(&r["conns"]) >= 1),
        "{rows:#?}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    drop(agents);
    drop(procs);
}

/// The metrics-only path: two agents scraped by Debian's Prometheus; the
/// client agent's `dst_ip`/`dst_port` series joined in PromQL to the
/// server agent's `flowprobe_listener_info` name the server's service,
/// and the joined sum equals the client agent's own query.
#[test]
fn prometheus_joins_two_agents_by_listener_owner() {
    if !enabled("live_fleet") {
        return;
    }
    assert!(
        Path::new("/usr/bin/prometheus").exists(),
        "needs Debian's prometheus (the setup tier of scripts/test.sh installs it)"
    );
    let (a_ip, b_ip) = ("10.94.0.1", "10.94.0.2");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = common::root::Netns::create("fpfp", "prom");
    common::root::veth_pair(&ns, "fpp0", "fpp1", a_ip, b_ip, "24");
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, "iptables");
    }
    let mut procs = Procs::default();
    for (name, n, ip, dev) in [("a", &ns.a, a_ip, "fpp0"), ("b", &ns.b, b_ip, "fpp1")] {
        let listen = format!("{ip}:9911");
        procs.spawn(
            name,
            n,
            &[
                env!("CARGO_BIN_EXE_flowprobe"),
                "run",
                "--backend",
                "afpacket",
                "--iface",
                dev,
                "--listen",
                &listen,
                "--metrics-labels",
                "src.service,dst.ip,dst.port",
                "--format",
                "json",
            ],
            &d.join(format!("agent-{name}")),
        );
        wait_for_rings(n, 1);
    }
    fs::write(
        d.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: flowprobe\n    static_configs:\n      - targets: ['{a_ip}:9911', '{b_ip}:9911']\n"
        ),
    )
    .unwrap();
    let config = format!("--config.file={}", d.join("prometheus.yml").display());
    let data = format!("--storage.tsdb.path={}", d.join("data").display());
    procs.spawn(
        "prometheus",
        &ns.a,
        &[
            "/usr/bin/prometheus",
            &config,
            &data,
            "--web.listen-address=127.0.0.1:9090",
        ],
        &d.join("prometheus"),
    );
    let promql = |q: &str| -> Vec<Value> {
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
        common::root::http_get(
            &ns.a,
            &format!("http://127.0.0.1:9090/api/v1/query?query={enc}"),
        )
        .and_then(|b| serde_json::from_str::<Value>(&b).ok())
        .and_then(|v| v["data"]["result"].as_array().cloned())
        .unwrap_or_default()
    };
    common::root::wait_for_within(
        "prometheus to scrape both agents",
        Duration::from_secs(60),
        || {
            promql("sum(up{job=\"flowprobe\"})")
                .first()
                .is_some_and(|s| s["value"][1] == "2")
        },
    );

    let conns = [(42000, 500_000, 60_000), (42001, 80_000, 300_000)];
    exchange_between(
        (&ns.a, a_ip, "svc-a"),
        (&ns.b, b_ip, "svc-b"),
        &conns,
        &d.join("x"),
    );

    // The client agent's own row for the pair.
    let agent_sent = || -> Option<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &ns.a])
            .arg(env!("CARGO_BIN_EXE_flowprobe"))
            .args([
                "query",
                "--agent",
                &format!("{a_ip}:9911"),
                "--format",
                "json",
            ])
            .args(["--src", "service", "--dst", "ip,port"])
            .args(["--where", "src.service = svc-a and dst.port = 5001"])
            .output()
            .ok()?;
        let rows = json_lines(&String::from_utf8_lossy(&out.stdout));
        rows.first().map(|r| n(&r["sent"]["bytes"]))
    };
    let written: u64 = conns.iter().map(|c| c.1).sum();
    common::root::wait_for_within(
        "the agent to see every byte",
        Duration::from_secs(30),
        || agent_sent().is_some_and(|b| b >= written),
    );
    // The client agent's series (on one machine the server's agent may
    // find the client's socket too, and have the same series).
    let q = format!(
        "sum by (src_service, owner_service) (flowprobe_sent_bytes_total{{src_service=\"svc-a\", instance=\"{a_ip}:9911\"}} \
         * on (dst_ip, dst_port) group_left(owner_service) flowprobe_listener_info)"
    );
    let until = Instant::now() + Duration::from_secs(30);
    let (last, want) = loop {
        // Both move until the last retransmission is counted and scraped.
        let want = agent_sent().unwrap();
        let last = promql(&q);
        if last.len() == 1 && last[0]["value"][1].as_str() == Some(want.to_string().as_str()) {
            break (last, want);
        }
        assert!(
            Instant::now() < until,
            "the PromQL join: {last:?} (want {want})\nlisteners: {:?}\nsent: {:?}",
            promql("flowprobe_listener_info"),
            promql("flowprobe_sent_bytes_total")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(last[0]["metric"]["owner_service"], "svc-b", "{last:?}");
    eprintln!("PromQL join: {last:?}; the client agent's own query: {want} bytes sent");
}
