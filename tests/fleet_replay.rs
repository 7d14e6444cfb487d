//! The fleet without root: captures of the same connections taken at the
//! client host and at the server host, written here, replayed as two hosts
//! (`replay --fleet`) into a `nats-server -js` started on loopback, and
//! queried through `flowprobe fleet` with `flowprobe query --agent`.
//!
//! Hosts: alpha (10.9.0.1) and beta (10.9.0.2) are monitored; 10.9.0.3 is
//! an unmonitored client of beta, 10.9.0.4 an unmonitored server alpha
//! talks to. One data segment of alpha → beta is lost between them: alpha's
//! capture has it twice, beta's once. The answer must count every
//! connection once, `bytes − retransmitted_bytes` equal to what the
//! generator's applications wrote, and tag each end with its own host.
//!
//! Needs `nats-server` (Debian's package; scripts/test.sh installs it);
//! without it the tests fail, saying so.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{flowprobe, json_lines, stderr, stdout};
use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapPacket, PcapWriter};
use serde_json::Value;

const ALPHA: &str = "10.9.0.1";
const BETA: &str = "10.9.0.2";
const OUTSIDER: &str = "10.9.0.3";
const EXTERNAL: &str = "10.9.0.4";
/// Capture start, µs since the epoch, on a whole second (intervals align).
const T0: u64 = 1_700_000_000_000_000;
/// Data segments are this far apart: a connection spans several 1 s
/// intervals.
const SLOT_US: u64 = 250_000;
/// What the server's capture adds to every time (one-way delay).
const SKEW_US: u64 = 150;

struct Conn {
    client: &'static str,
    sport: u16,
    server: &'static str,
    dport: u16,
    start_us: u64,
    /// Data segments of `len` bytes from the client, one per slot.
    n: u32,
    len: u32,
    /// The response's bytes.
    resp: u32,
    /// This segment's first copy is lost after the client's capture point
    /// (resent 200 ms later).
    lost: Option<u32>,
}

#[rustfmt::skip]
const CONNS: &[Conn] = &[
    Conn { client: ALPHA, sport: 40000, server: BETA, dport: 5432, start_us: 100_000, n: 10, len: 1000, resp: 4000, lost: Some(3) },
    Conn { client: ALPHA, sport: 40001, server: BETA, dport: 5432, start_us: 900_000, n: 4, len: 500, resp: 3000, lost: None },
    Conn { client: OUTSIDER, sport: 50000, server: BETA, dport: 80, start_us: 300_000, n: 3, len: 700, resp: 200, lost: None },
    Conn { client: ALPHA, sport: 40002, server: EXTERNAL, dport: 443, start_us: 1_500_000, n: 2, len: 100, resp: 50, lost: None },
];

impl Conn {
    /// What the client's application wrote, and the server's.
    fn written(&self) -> (u64, u64) {
        (u64::from(self.n * self.len), u64::from(self.resp))
    }
}

/// `(µs, seen at the server's capture point, frame)`; the client's sees all.
fn frames(c: &Conn) -> Vec<(u64, bool, Vec<u8>)> {
    let cl: IpAddr = c.client.parse().unwrap();
    let sv: IpAddr = c.server.parse().unwrap();
    let mut out = Vec::new();
    let mut pkt = |t: u64,
                   from_client: bool,
                   syn: bool,
                   fin: bool,
                   seq: u32,
                   ack: Option<u32>,
                   len: u32,
                   at_server: bool| {
        let (s, d, sp, dp) = if from_client {
            (cl, sv, c.sport, c.dport)
        } else {
            (sv, cl, c.dport, c.sport)
        };
        let (IpAddr::V4(s), IpAddr::V4(d)) = (s, d) else {
            unreachable!()
        };
        let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(s.octets(), d.octets(), 64)
            .tcp(sp, dp, seq, 64000);
        if syn {
            b = b.syn();
        }
        if fin {
            b = b.fin();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut buf = Vec::new();
        b.write(&mut buf, &vec![0x55; len as usize]).unwrap();
        out.push((T0 + c.start_us + t, at_server, buf));
    };
    let (mut cs, mut ss) = (1000u32, 900_000u32);
    pkt(0, true, true, false, cs, None, 0, true);
    pkt(100, false, true, false, ss, Some(cs + 1), 0, true);
    cs += 1;
    ss += 1;
    pkt(200, true, false, false, cs, Some(ss), 0, true);
    for k in 0..c.n {
        let at = u64::from(k + 1) * SLOT_US;
        let lost = c.lost == Some(k);
        // The first copy of a lost segment never reaches the server.
        pkt(at, true, false, false, cs, Some(ss), c.len, !lost);
        let mut ack_at = at + 100;
        if lost {
            pkt(at + 200_000, true, false, false, cs, Some(ss), c.len, true);
            ack_at = at + 200_100;
        }
        cs += c.len;
        pkt(ack_at, false, false, false, ss, Some(cs), 0, true);
    }
    let at = u64::from(c.n + 1) * SLOT_US;
    pkt(at, false, false, false, ss, Some(cs), c.resp, true);
    ss += c.resp;
    pkt(at + 100, true, false, false, cs, Some(ss), 0, true);
    pkt(at + 200, true, false, true, cs, Some(ss), 0, true);
    pkt(at + 300, false, false, true, ss, Some(cs + 1), 0, true);
    pkt(at + 400, true, false, false, cs + 1, Some(ss + 1), 0, true);
    out
}

/// The capture taken at `host`: the connections it is an end of, as its
/// interface saw them.
fn write_capture(path: &Path, host: &str) {
    let mut all: Vec<(u64, Vec<u8>)> = Vec::new();
    for c in CONNS {
        for (t, at_server, f) in frames(c) {
            if c.client == host {
                all.push((t, f));
            } else if c.server == host && at_server {
                all.push((t + SKEW_US, f));
            }
        }
    }
    all.sort_by_key(|f| f.0);
    let mut w = PcapWriter::new(std::fs::File::create(path).unwrap()).unwrap();
    for (us, data) in &all {
        w.write_packet(&PcapPacket::new(
            Duration::from_micros(*us),
            data.len() as u32,
            data,
        ))
        .unwrap();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `nats-server -js` on a free loopback port with its store in a temp
/// directory; killed on drop.
struct NatsServer {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl NatsServer {
    fn start(auth: &[&str]) -> NatsServer {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .args(auth)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (apt-get install nats-server; scripts/test.sh installs it)");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        wait_for("nats-server", Duration::from_secs(10), || {
            TcpStream::connect(addr).is_ok()
        });
        NatsServer {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fleet {
    child: Child,
    addr: String,
}

impl Fleet {
    fn start(url: &str, extra: &[&str]) -> Fleet {
        let addr = format!("127.0.0.1:{}", free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_flowprobe"))
            .args(["fleet", "--nats", url, "--listen", &addr])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Fleet { child, addr }
    }

    fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(&self.addr).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
    }

    /// Waits until the window took `n` messages.
    fn wait_messages(&self, n: u64) {
        wait_for(
            &format!("{n} messages in the fleet"),
            Duration::from_secs(20),
            || {
                self.get("/health")
                    .and_then(|h| serde_json::from_str::<Value>(&h).ok())
                    .is_some_and(|h| h["stats"]["messages"].as_u64() >= Some(n))
            },
        );
        // One rebuild later, the answer has them.
        std::thread::sleep(Duration::from_millis(500));
    }

    fn query(&self, args: &[&str]) -> String {
        let mut a = vec!["query", "--agent", &self.addr];
        a.extend(args);
        let out = flowprobe(&a);
        assert!(out.status.success(), "{a:?}: {}", stderr(&out));
        stdout(&out)
    }

    fn metric(&self, line_start: &str) -> u64 {
        let m = self.get("/metrics").unwrap();
        common::metric(&m, line_start).unwrap_or_else(|| panic!("no {line_start} in\n{m}"))
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn captures(dir: &Path) -> (PathBuf, PathBuf) {
    let a = dir.join("alpha.pcap");
    let b = dir.join("beta.pcap");
    write_capture(&a, ALPHA);
    write_capture(&b, BETA);
    (a, b)
}

fn publish(url: &str, host: &str, addr: &str, file: &Path, auth: &[&str]) -> u64 {
    let mut a = vec![
        "replay",
        "--fleet",
        url,
        "--host-id",
        host,
        "--host-addr",
        addr,
        "--fleet-interval",
        "1",
    ];
    a.extend(auth);
    a.push(file.to_str().unwrap());
    let out = flowprobe(&a);
    assert!(out.status.success(), "{a:?}: {}", stderr(&out));
    // "published N intervals ..."
    let e = stderr(&out);
    e.split_whitespace()
        .nth(2)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{e}"))
}

const QUERY: &[&str] = &[
    "--src",
    "host,view",
    "--dst",
    "host,unresolved,port",
    "--format",
    "json",
];

/// The rows' numbers against what the generator's applications wrote.
fn check_ground_truth(rows: &[Value]) {
    let find = |src_host: Option<&str>, dst_host: Option<&str>, port: &str| -> &Value {
        rows.iter()
            .find(|r| {
                r["src"]["host"].as_str() == src_host
                    && r["dst"]["host"].as_str() == dst_host
                    && r["dst"]["port"] == port
            })
            .unwrap_or_else(|| panic!("no row {src_host:?} -> {dst_host:?}:{port} in {rows:#?}"))
    };
    let n = |v: &Value| v.as_u64().unwrap();
    let app = |r: &Value, dir: &str| n(&r[dir]["bytes"]) - n(&r[dir]["retransmitted_bytes"]);
    let wrote = |idx: &[usize]| {
        idx.iter().fold((0, 0), |s, &i| {
            let w = CONNS[i].written();
            (s.0 + w.0, s.1 + w.1)
        })
    };
    // alpha → beta: the client's view, counted once, its retransmission in.
    let r = find(Some("alpha"), Some("beta"), "5432");
    assert_eq!(r["src"]["view"], "client");
    assert_eq!(n(&r["conns"]), 2);
    assert_eq!((app(r, "sent"), app(r, "received")), wrote(&[0, 1]));
    assert_eq!(n(&r["sent"]["retransmits"]), 1);
    assert_eq!(n(&r["sent"]["retransmitted_bytes"]), 1000);
    // The unmonitored client: beta's view, the client unresolved.
    let r = find(None, Some("beta"), "80");
    assert_eq!(r["src"]["view"], "server");
    assert_eq!(r["dst"]["unresolved"], Value::Null);
    assert_eq!(n(&r["conns"]), 1);
    assert_eq!((app(r, "sent"), app(r, "received")), wrote(&[2]));
    // The unmonitored server: alpha's view, the server unresolved.
    let r = find(Some("alpha"), None, "443");
    assert_eq!(r["dst"]["unresolved"], "not_monitored");
    assert_eq!((app(r, "sent"), app(r, "received")), wrote(&[3]));
    assert_eq!(rows.len(), 3, "{rows:#?}");
}

#[test]
fn two_hosts_joined_counted_once_golden() {
    let nats = NatsServer::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = captures(dir.path());
    let url = nats.url();
    let sent = publish(&url, "alpha", ALPHA, &a, &[]) + publish(&url, "beta", BETA, &b, &[]);
    let limits = ["--max-message-bytes", "200000"];
    let fleet = Fleet::start(&url, &limits);
    fleet.wait_messages(sent);
    let text = fleet.query(QUERY);
    let rows = json_lines(&text);
    check_ground_truth(&rows);
    let golden = common::repo_root().join("fixtures/goldens/fleet.replay.golden.json");
    assert!(common::golden(&golden, &text), "the fleet's answer changed");
    // The same table through the same flags.
    let table = fleet.query(&["--src", "host", "--dst", "host"]);
    assert!(table.starts_with("SRC.HOST"), "{table}");

    // Published again: the stream keeps one copy (Nats-Msg-Id).
    publish(&url, "alpha", ALPHA, &a, &[]);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(fleet.metric("flowprobe_fleet_messages_total"), sent);
    assert_eq!(fleet.query(QUERY), text);

    // Bad messages straight into the stream: rejected, counted, no change.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = async_nats::connect(url.as_str()).await.unwrap();
        let js = async_nats::jetstream::new(c);
        let good = std::fs::read_to_string(&golden).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("flowprobe.rows.evil", b"not json".to_vec()),
            (
                "flowprobe.rows.evil",
                br#"{"schema":99,"host":"evil"}"#.to_vec(),
            ),
            ("flowprobe.rows.evil", vec![b' '; 300_000]),
            // A row of the golden answer is no message.
            (
                "flowprobe.rows.evil",
                good.lines().next().unwrap().as_bytes().to_vec(),
            ),
        ];
        for (subject, payload) in cases {
            js.publish(subject, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        // An agent publishing under another host's subject.
        let mut m: Value = serde_json::json!({
            "schema": 1, "host": "alpha", "network": "default", "run": 1, "seq": 0,
            "start_ns": 1, "end_ns": 2, "addresses": [], "rows": []
        });
        m["host"] = "alpha".into();
        js.publish("flowprobe.rows.mallory", m.to_string().into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    fleet.wait_messages(sent + 5);
    let rejected =
        |r: &str| fleet.metric(&format!("flowprobe_fleet_rejected_total{{reason=\"{r}\"}}"));
    assert_eq!(rejected("malformed"), 2);
    assert_eq!(rejected("schema"), 1);
    assert_eq!(rejected("oversized"), 1);
    assert_eq!(rejected("host_mismatch"), 1);
    assert_eq!(fleet.query(QUERY), text);
    drop(fleet);

    // A new fleet process rebuilds the same answer from the stream.
    let fleet = Fleet::start(&url, &limits);
    fleet.wait_messages(sent + 5);
    assert_eq!(fleet.query(QUERY), text);
}

#[test]
fn authentication_is_required_and_used() {
    let nats = NatsServer::start(&["--user", "agent", "--pass", "s3cret"]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = captures(dir.path());
    let url = nats.url();
    // Without the password: one line, no wait.
    let out = flowprobe(&[
        "replay",
        "--fleet",
        &url,
        "--host-id",
        "alpha",
        "--host-addr",
        ALPHA,
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.starts_with("flowprobe: cannot connect to ") && e.lines().count() == 1,
        "{e}"
    );
    let auth = ["--nats-user", "agent", "--nats-password", "s3cret"];
    let sent = publish(&url, "alpha", ALPHA, &a, &auth) + publish(&url, "beta", BETA, &b, &auth);
    // The password in the address works too.
    let fleet = Fleet::start(&format!("nats://agent:s3cret@127.0.0.1:{}", nats.port), &[]);
    fleet.wait_messages(sent);
    check_ground_truth(&json_lines(&fleet.query(QUERY)));
}

/// The NATS permissions docs/fleet.md gives an agent: it publishes under
/// its own host id and nothing else; the fleet process (its own user)
/// makes the stream and buckets.
#[test]
fn an_agent_publishes_only_under_its_own_host_id() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        format!(
            r#"
listen: 127.0.0.1:{port}
jetstream {{ store_dir: "{store}" }}
authorization {{
  users = [
    {{ user: fleet, password: fleetpw }}
    {{ user: alpha, password: alphapw, permissions: {{
        publish: {{ allow: [
          "flowprobe.rows.alpha",
          "$KV.flowprobe-presence.alpha",
          "$KV.flowprobe-endpoints.alpha.>",
          "$JS.API.INFO",
          "$JS.API.STREAM.INFO.FLOWPROBE",
          "$JS.API.STREAM.INFO.KV_flowprobe-presence",
          "$JS.API.STREAM.INFO.KV_flowprobe-endpoints"
        ] }}
        subscribe: {{ allow: ["_INBOX.>"] }}
    }} }}
  ]
}}
"#,
            store = dir.path().join("js").display()
        ),
    )
    .unwrap();
    let mut child = Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server");
    let _kill = scopeguard(move || {
        let _ = child.kill();
        let _ = child.wait();
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for("nats-server", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok()
    });
    let url = format!("nats://127.0.0.1:{port}");
    let (a, _) = captures(dir.path());
    // The fleet makes the stream and the buckets.
    let fleet = Fleet::start(
        &url,
        &["--nats-user", "fleet", "--nats-password", "fleetpw"],
    );
    wait_for("the fleet's stream", Duration::from_secs(20), || {
        fleet
            .get("/health")
            .and_then(|h| serde_json::from_str::<Value>(&h).ok())
            .is_some_and(|h| h["stream"]["connected"] == true)
    });
    let login = ["--nats-user", "alpha", "--nats-password", "alphapw"];
    let sent = publish(&url, "alpha", ALPHA, &a, &login);
    fleet.wait_messages(sent);
    // Under another host's id: refused, said in one line, soon.
    let t = Instant::now();
    let mut args = vec![
        "replay",
        "--fleet",
        &url,
        "--host-id",
        "beta",
        "--host-addr",
        BETA,
    ];
    args.extend(login);
    args.push(a.to_str().unwrap());
    let out = flowprobe(&args);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.starts_with("flowprobe: fleet: NATS at ")
            && e.contains("Permissions Violation")
            && e.lines().count() == 1,
        "{e}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "took {:?}",
        t.elapsed()
    );
    assert_eq!(fleet.metric("flowprobe_fleet_messages_total"), sent);
}

/// Runs `f` on drop.
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct G<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for G<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f()
            }
        }
    }
    G(Some(f))
}

/// TLS with a private CA: `--nats-tls-ca` trusts it; without it the
/// server's certificate is refused in one line.
#[test]
fn tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ssl = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (scripts/test.sh installs it)");
        assert!(st.success(), "openssl {args:?}");
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=flowprobe-test-ca",
        "-days",
        "2",
    ]);
    ssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    std::fs::write(
        d.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    ssl(&[
        "x509",
        "-req",
        "-in",
        "srv.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "srv.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ]);
    let port = free_port();
    std::fs::write(
        d.join("nats.conf"),
        format!(
            "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{js}\" }}\ntls {{ cert_file: \"{c}\", key_file: \"{k}\" }}\n",
            js = d.join("js").display(),
            c = d.join("srv.pem").display(),
            k = d.join("srv.key").display()
        ),
    )
    .unwrap();
    let mut child = Command::new("nats-server")
        .arg("-c")
        .arg(d.join("nats.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server");
    let _kill = scopeguard(move || {
        let _ = child.kill();
        let _ = child.wait();
    });
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_for("nats-server", Duration::from_secs(10), || {
        TcpStream::connect(addr).is_ok()
    });
    let (a, b) = captures(d);
    let url = format!("tls://127.0.0.1:{port}");
    let out = flowprobe(&[
        "replay",
        "--fleet",
        &url,
        "--host-id",
        "alpha",
        "--host-addr",
        ALPHA,
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("invalid peer certificate") && e.lines().count() == 1,
        "{e}"
    );
    let ca = d.join("ca.pem");
    let tls = ["--nats-tls-ca", ca.to_str().unwrap()];
    let sent = publish(&url, "alpha", ALPHA, &a, &tls) + publish(&url, "beta", BETA, &b, &tls);
    let fleet = Fleet::start(&url, &tls);
    fleet.wait_messages(sent);
    check_ground_truth(&json_lines(&fleet.query(QUERY)));
}
