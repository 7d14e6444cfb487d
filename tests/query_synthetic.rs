//! Queries on a capture written here, where every answer is known by
//! construction: subnets (IPv4 and IPv6) for `ip/NN` buckets and CIDR
//! filters, exact byte counts, and timestamps chosen so that every RTT
//! sample is known to the microsecond.
//!
//! Each connection: SYN, SYN/ACK after `a` µs, ACK after `b` µs; then `n`
//! data segments of `len` bytes from the client, one every 2 ms,
//! each acknowledged `a` µs later; one response of `resp` bytes
//! acknowledged `b` µs later; FIN/ACK, FIN/ACK `a` µs later, ACK `b` µs
//! later. So the `dst` leg has `n + 2` samples of exactly `a` (one fewer
//! when a segment is sent twice: Karn), the `src` leg 3 of exactly `b`.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use common::{flowprobe, json_lines, stderr, stdout};
use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapPacket, PcapWriter};
use serde_json::Value;

struct Spec {
    client: &'static str,
    sport: u16,
    dport: u16,
    a: u64,
    b: u64,
    n: u32,
    len: u32,
    resp: u32,
    /// The second data segment is sent again 300 µs later.
    retx: bool,
}

const S4: &str = "192.168.50.1";
const S6: &str = "fd00:50::1";
/// Data segments are this far apart, longer than any RTT here, so each is
/// acknowledged before the next one is sent (and timed).
const SLOT_US: u64 = 2000;
/// Start of the first connection (µs since the epoch); the others follow
/// every 20 ms.
const T0: u64 = 1_700_000_000_000_000;
const GAP_US: u64 = 20_000;

#[rustfmt::skip]
const CONNS: &[Spec] = &[
    Spec { client: "10.1.0.1", sport: 40000, dport: 80, a: 100, b: 10, n: 3, len: 1000, resp: 500, retx: false },
    Spec { client: "10.1.0.2", sport: 40001, dport: 80, a: 200, b: 20, n: 3, len: 1000, resp: 500, retx: false },
    Spec { client: "10.1.1.7", sport: 50000, dport: 80, a: 150, b: 5, n: 2, len: 700, resp: 300, retx: true },
    Spec { client: "10.2.0.9", sport: 40002, dport: 443, a: 1200, b: 30, n: 4, len: 1400, resp: 100, retx: false },
    Spec { client: "fd00:1::1", sport: 40003, dport: 443, a: 90, b: 9, n: 2, len: 1200, resp: 1200, retx: false },
    Spec { client: "fd00:1::2", sport: 40004, dport: 443, a: 90, b: 9, n: 1, len: 100, resp: 100, retx: false },
    Spec { client: "fd00:2::5", sport: 40005, dport: 443, a: 250, b: 25, n: 2, len: 500, resp: 50, retx: false },
];

impl Spec {
    fn server(&self) -> &'static str {
        if self.client.contains(':') {
            S6
        } else {
            S4
        }
    }
    fn start_us(&self, i: usize) -> u64 {
        T0 + i as u64 * GAP_US
    }
    /// Time of the last packet after the start.
    fn duration_us(&self) -> u64 {
        self.a + self.b + (self.n as u64 + 2) * SLOT_US + self.a + self.b
    }
    fn sent_bytes(&self) -> u64 {
        (self.n * self.len + if self.retx { self.len } else { 0 }) as u64
    }
    fn bytes(&self) -> u64 {
        self.sent_bytes() + self.resp as u64
    }
    fn dst_samples(&self) -> u64 {
        self.n as u64 + 2 - self.retx as u64
    }
}

#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
    FinAck,
}

/// Frames of one connection: `(µs, bytes)`.
fn frames(i: usize, c: &Spec) -> Vec<(u64, Vec<u8>)> {
    let t0 = c.start_us(i);
    let cl: IpAddr = c.client.parse().unwrap();
    let sv: IpAddr = c.server().parse().unwrap();
    let mut out = Vec::new();
    let mut pkt = |t: u64, from_client: bool, f: Flags, seq: u32, ack: u32, len: u32| {
        let (s, d, sp, dp) = if from_client {
            (cl, sv, c.sport, c.dport)
        } else {
            (sv, cl, c.dport, c.sport)
        };
        let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
        let ip = match (s, d) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
            _ => unreachable!(),
        };
        let mut b = ip.tcp(sp, dp, seq, 64000);
        b = match f {
            Flags::Syn => b.syn(),
            Flags::SynAck => b.syn().ack(ack),
            Flags::Ack => b.ack(ack),
            Flags::FinAck => b.fin().ack(ack),
        };
        let mut buf = Vec::new();
        b.write(&mut buf, &vec![0x55; len as usize]).unwrap();
        out.push((t0 + t, buf));
    };
    let (mut cs, mut ss) = (1000u32, 900_000u32);
    pkt(0, true, Flags::Syn, cs, 0, 0);
    pkt(c.a, false, Flags::SynAck, ss, cs + 1, 0);
    cs += 1;
    ss += 1;
    let t = c.a + c.b;
    pkt(t, true, Flags::Ack, cs, ss, 0);
    for k in 0..c.n as u64 {
        let at = t + (k + 1) * SLOT_US;
        pkt(at, true, Flags::Ack, cs, ss, c.len);
        let mut ack_at = at + c.a;
        if c.retx && k == 1 {
            pkt(at + 300, true, Flags::Ack, cs, ss, c.len);
            ack_at = at + 300 + c.a;
        }
        cs += c.len;
        pkt(ack_at, false, Flags::Ack, ss, cs, 0);
    }
    let at = t + (c.n as u64 + 1) * SLOT_US;
    pkt(at, false, Flags::Ack, ss, cs, c.resp);
    ss += c.resp;
    pkt(at + c.b, true, Flags::Ack, cs, ss, 0);
    let at = t + (c.n as u64 + 2) * SLOT_US;
    pkt(at, true, Flags::FinAck, cs, ss, 0);
    pkt(at + c.a, false, Flags::FinAck, ss, cs + 1, 0);
    pkt(at + c.a + c.b, true, Flags::Ack, cs + 1, ss + 1, 0);
    out
}

fn write_capture(path: &Path) {
    let mut all: Vec<(u64, Vec<u8>)> = CONNS
        .iter()
        .enumerate()
        .flat_map(|(i, c)| frames(i, c))
        .collect();
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

fn query(path: &Path, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["replay", "--format", "json", "--quiet"];
    a.extend(args);
    a.push(path.to_str().unwrap());
    let out = flowprobe(&a);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    json_lines(&stdout(&out))
}

fn capture() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("subnets.pcap");
    write_capture(&p);
    (dir, p)
}

/// What a row over the connections `idx` must hold, from the specs alone:
/// `(conns, sent bytes, received bytes, sent retransmits)`.
fn sums(idx: &[usize]) -> (u64, u64, u64, u64) {
    idx.iter().fold((0, 0, 0, 0), |s, &i| {
        let c = &CONNS[i];
        (
            s.0 + 1,
            s.1 + c.sent_bytes(),
            s.2 + c.resp as u64,
            s.3 + c.retx as u64,
        )
    })
}

fn row_sums(r: &Value) -> (u64, u64, u64, u64) {
    let n = |v: &Value| v.as_u64().unwrap();
    (
        n(&r["conns"]),
        n(&r["sent"]["bytes"]),
        n(&r["received"]["bytes"]),
        n(&r["sent"]["retransmits"]),
    )
}

/// Bandwidth of connections `idx` without a window: bytes over the span
/// from the first one's SYN to the last one's final ACK.
fn bandwidth(idx: &[usize]) -> f64 {
    let first = idx.iter().map(|&i| CONNS[i].start_us(i)).min().unwrap();
    let last = idx
        .iter()
        .map(|&i| CONNS[i].start_us(i) + CONNS[i].duration_us())
        .max()
        .unwrap();
    let bytes: u64 = idx.iter().map(|&i| CONNS[i].bytes()).sum();
    bytes as f64 / ((last - first) as f64 / 1e6)
}

fn assert_rows(ctx: &str, rows: &[Value], want: &[(Value, &[usize])]) {
    assert_eq!(rows.len(), want.len(), "{ctx}: {rows:#?}");
    for (r, (key, idx)) in rows.iter().zip(want) {
        assert_eq!(&r["src"], key, "{ctx}");
        assert_eq!(row_sums(r), sums(idx), "{ctx} {key}");
        let bw = r["bandwidth_bytes_per_s"].as_f64().unwrap();
        let want_bw = bandwidth(idx);
        assert!(
            (bw - want_bw).abs() <= want_bw * 1e-12,
            "{ctx} {key}: {bw} vs {want_bw}"
        );
    }
}

#[test]
fn cidr_buckets_and_filters() {
    let (_d, p) = capture();
    let j = |s: &str| serde_json::json!({ "ip/24": s });
    // Sorted by bytes, descending.
    assert_rows(
        "ip/24",
        &query(&p, &["--src", "ip/24", "--sort", "bytes"]),
        &[
            (j("10.1.0.0/24"), &[0, 1]),
            (j("10.2.0.0/24"), &[3]),
            (j("fd00::/24"), &[4, 5, 6]),
            (j("10.1.1.0/24"), &[2]),
        ],
    );
    let j = |s: &str| serde_json::json!({ "ip/48": s });
    // An IPv4 address has 32 bits: ip/48 is the host there.
    assert_rows(
        "ip/48",
        &query(
            &p,
            &[
                "--src",
                "ip/48",
                "--sort",
                "conns:asc",
                "--where",
                "dst.port = 443",
            ],
        ),
        &[
            (j("10.2.0.9/32"), &[3]),
            (j("fd00:2::/48"), &[6]),
            (j("fd00:1::/48"), &[4, 5]),
        ],
    );
    let j = |s: &str| serde_json::json!({ "ip/16": s });
    assert_rows(
        "ip/16 in 10.1.0.0/16",
        &query(&p, &["--src", "ip/16", "--where", "src.ip in 10.1.0.0/16"]),
        &[(j("10.1.0.0/16"), &[0, 1, 2])],
    );
    assert_rows(
        "in list",
        &query(
            &p,
            &[
                "--src",
                "ip/16",
                "--where",
                "src.ip in (10.2.0.9, fd00:2::/32) and dst.port != 80",
            ],
        ),
        &[(j("10.2.0.0/16"), &[3]), (j("fd00::/16"), &[6])],
    );
    // The responder side, and ports that never collapse there; by bytes:
    // 9100, 5700, 4850.
    let rows = query(&p, &["--src", "", "--dst", "ip,port"]);
    let keys: Vec<String> = rows.iter().map(|r| r["dst"].to_string()).collect();
    assert_eq!(
        keys,
        [
            r#"{"ip":"192.168.50.1","port":"80"}"#,
            r#"{"ip":"192.168.50.1","port":"443"}"#,
            r#"{"ip":"fd00:50::1","port":"443"}"#,
        ]
    );
}

#[test]
fn rtt_is_exact_per_connection_and_per_row() {
    let (_d, p) = capture();
    let conns = query(&p, &[]);
    assert_eq!(conns.len(), CONNS.len());
    for c in &conns {
        let spec = CONNS
            .iter()
            .find(|s| c["sport"] == s.sport)
            .expect("a connection of the spec");
        let r = &c["rtt"];
        let ctx = format!("{}:{}", spec.client, spec.sport);
        assert_eq!(r["dst"]["handshake_us"], spec.a, "{ctx}");
        assert_eq!(r["src"]["handshake_us"], spec.b, "{ctx}");
        assert_eq!(r["dst"]["samples"], spec.dst_samples(), "{ctx}: Karn");
        assert_eq!(r["src"]["samples"], 3, "{ctx}");
        for q in ["p50_us", "p90_us", "p99_us", "max_us"] {
            assert_eq!(r["dst"][q], spec.a, "{ctx} {q}");
            assert_eq!(r["src"][q], spec.b, "{ctx} {q}");
        }
    }
    // 10.1.0.0/24: 5 samples of 100 µs and 5 of 200 µs.
    let rows = query(
        &p,
        &["--src", "ip/24", "--dst", "port", "--sort", "rtt_p50:asc"],
    );
    let by = |k: &str| {
        rows.iter()
            .find(|r| r["src"]["ip/24"] == k)
            .unwrap_or_else(|| panic!("no row {k}"))
    };
    let r = &by("10.1.0.0/24")["rtt_dst"];
    assert_eq!(
        (&r["samples"], &r["p50_us"], &r["p90_us"], &r["max_us"]),
        (&10.into(), &100.into(), &200.into(), &200.into())
    );
    // fd00::/24: 4 + 3 samples of 90 µs, 4 of 250 µs.
    let r = &by("fd00::/24")["rtt_dst"];
    assert_eq!(
        (&r["samples"], &r["p50_us"], &r["p99_us"], &r["max_us"]),
        (&11.into(), &90.into(), &250.into(), &250.into())
    );
    let r = &by("fd00::/24")["rtt_src"];
    assert_eq!(
        (&r["samples"], &r["p50_us"], &r["max_us"]),
        (&9.into(), &9.into(), &25.into())
    );
    // 1200 µs lies in a wider bucket; percentiles never exceed the exact max.
    let r = &by("10.2.0.0/24")["rtt_dst"];
    assert_eq!((&r["p50_us"], &r["max_us"]), (&1200.into(), &1200.into()));
    // Ascending by p50: 90 (fd00), 100..200 (10.1.0), 150 (10.1.1), 1200.
    let order: Vec<&Value> = rows.iter().map(|r| &r["src"]["ip/24"]).collect();
    assert_eq!(
        order,
        ["fd00::/24", "10.1.0.0/24", "10.1.1.0/24", "10.2.0.0/24"]
    );
}

#[test]
fn window_and_top() {
    let (_d, p) = capture();
    // 20 ms .. 45 ms after the first packet: connections 1 and 2 overlap it
    // (whole-connection counts), bandwidth over the 25 ms.
    let rows = query(&p, &["--src", "", "--window", "0.02..0.045"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(row_sums(&rows[0]), sums(&[1, 2]));
    assert_eq!(rows[0]["seconds"], 0.025);
    let bw = rows[0]["bandwidth_bytes_per_s"].as_f64().unwrap();
    let want = (CONNS[1].bytes() + CONNS[2].bytes()) as f64 / 0.025;
    assert!((bw - want).abs() <= want * 1e-12, "{bw} vs {want}");
    // A window past the last packet ends at it.
    let rows = query(&p, &["--src", "", "--window", "0.121.."]);
    let end = CONNS[6].start_us(6) + CONNS[6].duration_us();
    let want_s = (end - (T0 + 121_000)) as f64 / 1e6;
    assert!((rows[0]["seconds"].as_f64().unwrap() - want_s).abs() < 1e-12);
    assert_eq!(row_sums(&rows[0]), sums(&[6]));

    // Top 2 by the largest RTT, the other five summed.
    let rows = query(&p, &["--src", "ip", "--sort", "rtt_max", "--top", "2"]);
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["src"]["ip"], "10.2.0.9");
    assert_eq!(rows[1]["src"]["ip"], "fd00:2::5");
    assert_eq!(rows[2]["other"], true);
    assert_eq!(rows[2]["src"]["ip"], Value::Null);
    assert_eq!(row_sums(&rows[2]), sums(&[0, 1, 2, 4, 5]));
    assert_eq!(rows[2]["rtt_dst"]["max_us"], 200);
}

#[test]
fn ephemeral_ports_collapse_unless_raw() {
    let (_d, p) = capture();
    let rows = query(&p, &["--src", "port", "--dst", "port", "--sort", "conns"]);
    let keys: Vec<(String, String, u64)> = rows
        .iter()
        .map(|r| {
            (
                r["src"]["port"].as_str().unwrap().to_owned(),
                r["dst"]["port"].as_str().unwrap().to_owned(),
                r["conns"].as_u64().unwrap(),
            )
        })
        .collect();
    let s = |a: &str, b: &str, n| (a.to_owned(), b.to_owned(), n);
    assert_eq!(keys, [s("ephemeral", "443", 4), s("ephemeral", "80", 3)]);
    let rows = query(&p, &["--src", "port", "--raw-ports"]);
    assert_eq!(rows.len(), CONNS.len());
    // The filter sees raw ports either way.
    let rows = query(&p, &["--src", "port", "--where", "src.port = 50000"]);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["src"]["port"], "ephemeral");
}

#[test]
fn table_output_has_units_and_placeholders() {
    let (_d, p) = capture();
    let out = flowprobe(&[
        "replay",
        "--quiet",
        "--src",
        "ip/24,service",
        "--dst",
        "port",
        "--top",
        "2",
        p.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("SRC.IP/24   SRC.SERVICE DST.PORT CONNS"),
        "{text}"
    );
    assert!(
        lines[0].ends_with("BANDWIDTH RTT_P50_US RTT_P90_US RTT_P99_US RTT_MAX_US"),
        "{text}"
    );
    // No process attribution yet: the service tag is unknown.
    assert!(
        lines[1].starts_with("10.1.0.0/24 -           80 "),
        "{text}"
    );
    assert!(
        lines[2].starts_with("10.2.0.0/24 -           443"),
        "{text}"
    );
    assert!(lines[1].contains(" kB/s "), "{text}");
    assert!(
        lines[3].starts_with("(other)     (other)     (other)"),
        "{text}"
    );
}

#[test]
fn bad_query_flags_fail_before_reading() {
    for (args, msg) in [
        (
            &["--where", "src.ip = 10.0.0.0/8"][..],
            "column 10 (`10.0.0.0/8`)",
        ),
        (&["--sort", "speed"], "unknown metric `speed`"),
        (&["--window", "2..1"], "END must be after START"),
        (&["--src", "ip/99x"], "--src: tag key `ip/99x`"),
        (&["--top", "0"], "--top must be at least 1"),
    ] {
        let mut a = vec!["replay"];
        a.extend(args);
        a.push("/nonexistent.pcap");
        let out = flowprobe(&a);
        assert!(!out.status.success());
        let e = stderr(&out);
        assert!(e.contains(msg), "{args:?}: {e}");
        assert!(!e.contains("nonexistent"), "{args:?}: {e}");
    }
}
