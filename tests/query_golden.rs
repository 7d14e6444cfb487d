//! `flowprobe replay` queries on the fixture captures, against ground
//! truth computed here, independently of flowtable's query engine.
//!
//! - Golden files: `fixtures/pcaps/NAME.query.expected` holds the JSON rows
//!   of every query in [`QUERIES`] (`expect-test` goldens; regenerate with
//!   `UPDATE_EXPECT=1 cargo test -p flowprobe --test query_golden` and
//!   review the diff). Every golden is also checked by the oracle below, so
//!   none records a number nobody verified.
//! - Oracle: the per-connection JSON of the same file (itself checked
//!   against each socket's TCP_INFO and tshark by `replay_golden` and
//!   `tshark_oracle`) is filtered, windowed and grouped here by a small
//!   model of the documented semantics, with each connection's first and
//!   last packet times read straight from the pcap (`pcap-file` +
//!   `etherparse`, not flowprobe's parser). Every row must equal its group's
//!   sums exactly, the `--top` rows plus the `other` row must add up to the
//!   total, and `bandwidth = bytes / seconds` with `seconds` the window or
//!   the group's first-to-last-packet span.
//! - Every RTT sample: the timing rule (README, "Round-trip times") replayed
//!   over tshark's dissection and retransmission flags gives the same
//!   samples per leg (count, handshake, exact max, percentiles within 1 %).
//! - Handshake RTT: per TCP connection, `rtt.dst.handshake_us` = SYN →
//!   SYN/ACK and `rtt.src.handshake_us` = SYN/ACK → its ACK, from tshark's
//!   frame times and equal to tshark's `tcp.analysis.ack_rtt` on those
//!   frames; none when the timed segment was sent twice (Karn). Without
//!   tshark that test is skipped (a failure with `CI=true`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::path::Path;
use std::process::Command;

use common::{captures, flowprobe, json_lines, stderr, stdout};
use etherparse::{Ipv6ExtensionSlice, LaxNetSlice, LaxSlicedPacket};
use serde_json::Value;

/// One query: its flags, and the same query for the oracle.
struct Query {
    args: &'static [&'static str],
    src: &'static [&'static str],
    dst: &'static [&'static str],
    /// The `--where` clauses, as a predicate on a connection's JSON.
    select: fn(&Value) -> bool,
    /// `--window`, seconds after the first packet.
    window: Option<(Option<f64>, Option<f64>)>,
    top: Option<usize>,
    raw_ports: bool,
    /// The `--sort` metric (descending).
    sort: &'static str,
}

const ALL: fn(&Value) -> bool = |_| true;

const QUERIES: &[Query] = &[
    Query {
        args: &["--dst", "port"],
        src: &[],
        dst: &["port"],
        select: ALL,
        window: None,
        top: None,
        raw_ports: false,
        sort: "bytes",
    },
    Query {
        args: &["--src", "ip", "--dst", "ip,port", "--sort", "conns"],
        src: &["ip"],
        dst: &["ip", "port"],
        select: ALL,
        window: None,
        top: None,
        raw_ports: false,
        sort: "conns",
    },
    Query {
        args: &["--src", "port", "--raw-ports", "--top", "2"],
        src: &["port"],
        dst: &[],
        select: ALL,
        window: None,
        top: Some(2),
        raw_ports: true,
        sort: "bytes",
    },
    Query {
        args: &[
            "--src",
            "ip/24",
            "--dst",
            "proto,port",
            "--where",
            "dst.port = 5001",
            "--where",
            "src.ip in (10.0.0.0/8, fd00::/8)",
            "--sort",
            "retransmits",
        ],
        src: &["ip/24"],
        dst: &["proto", "port"],
        select: |c| c["dport"] == 5001,
        window: None,
        top: None,
        raw_ports: false,
        sort: "retransmits",
    },
    Query {
        args: &[
            "--src",
            "port",
            "--raw-ports",
            "--window",
            "0.005..",
            "--sort",
            "bandwidth",
        ],
        src: &["port"],
        dst: &[],
        select: ALL,
        window: Some((Some(0.005), None)),
        top: None,
        raw_ports: true,
        sort: "bandwidth",
    },
    Query {
        args: &[
            "--src",
            "proto",
            "--dst",
            "port",
            "--where",
            "src.port not in (40001) and proto ~ t*",
            "--window",
            "..0.003",
        ],
        src: &["proto"],
        dst: &["port"],
        select: |c| c["sport"] != 40001 && c["proto"] == "tcp",
        window: Some((None, Some(0.003))),
        top: None,
        raw_ports: false,
        sort: "bytes",
    },
];

fn run_text(cap: &Path, extra: &[&str]) -> String {
    let mut args = vec!["replay", "--format", "json", "--quiet"];
    args.extend(extra);
    args.push(cap.to_str().unwrap());
    let out = flowprobe(&args);
    assert!(out.status.success(), "{}: {}", cap.display(), stderr(&out));
    stdout(&out)
}

fn run(cap: &Path, extra: &[&str]) -> Vec<Value> {
    json_lines(&run_text(cap, extra))
}

/// A connection's identity without orientation: protocol and both ends.
type Tuple = (u8, (IpAddr, u16), (IpAddr, u16));

fn tuple(proto: u8, a: (IpAddr, u16), b: (IpAddr, u16)) -> Tuple {
    (proto, a.min(b), a.max(b))
}

/// First and last packet time (ns) of every TCP/UDP 5-tuple in the pcap,
/// read with etherparse, and the capture's first and last such packet.
fn packet_times(cap: &Path) -> (BTreeMap<Tuple, (u64, u64)>, u64, u64) {
    let mut times: BTreeMap<Tuple, (u64, u64)> = BTreeMap::new();
    for (ts, data) in pcap_records(&fs::read(cap).unwrap()) {
        // flowprobe's definition: a whole packet or the first fragment of
        // one (the later fragments carry no ports); snap-length cut frames
        // count, hence the lax slicer.
        let Ok(s) = LaxSlicedPacket::from_ethernet(data) else {
            continue;
        };
        let (src, dst, first_part, payload): (IpAddr, IpAddr, bool, _) = match &s.net {
            Some(LaxNetSlice::Ipv4(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
                ip.header().fragments_offset().value() == 0,
                ip.payload(),
            ),
            Some(LaxNetSlice::Ipv6(ip)) => (
                ip.header().source_addr().into(),
                ip.header().destination_addr().into(),
                ip.extensions().clone().into_iter().all(|e| match e {
                    Ipv6ExtensionSlice::Fragment(f) => f.fragment_offset().value() == 0,
                    _ => true,
                }),
                ip.payload(),
            ),
            _ => continue,
        };
        let proto = payload.ip_number.0;
        let b = payload.payload;
        if !first_part || !(proto == 6 || proto == 17) || b.len() < 4 {
            continue;
        }
        let (sp, dp) = (
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        );
        let e = times
            .entry(tuple(proto, (src, sp), (dst, dp)))
            .or_insert((ts, ts));
        e.0 = e.0.min(ts);
        e.1 = e.1.max(ts);
    }
    let first = times.values().map(|t| t.0).min().unwrap();
    let last = times.values().map(|t| t.1).max().unwrap();
    (times, first, last)
}

/// `(timestamp ns, frame)` of a little-endian Ethernet pcap, read by hand:
/// the fixtures are snap-length cut, which `pcap-file` refuses.
fn pcap_records(b: &[u8]) -> Vec<(u64, &[u8])> {
    let u32le = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
    let unit = match u32le(0) {
        0xa1b2_c3d4 => 1000,
        0xa1b2_3c4d => 1,
        m => panic!("not a little-endian pcap (magic {m:#x})"),
    };
    assert_eq!(u32le(20), 1, "not Ethernet");
    let mut out = Vec::new();
    let mut o = 24;
    while o + 16 <= b.len() {
        let ts = u32le(o) as u64 * 1_000_000_000 + u32le(o + 4) as u64 * unit;
        let len = u32le(o + 8) as usize;
        out.push((ts, &b[o + 16..o + 16 + len]));
        o += 16 + len;
    }
    assert_eq!(o, b.len(), "trailing bytes");
    out
}

fn conn_tuple(c: &Value) -> Tuple {
    let ep = |a: &str, p: &str| {
        (
            c[a].as_str().unwrap().parse::<IpAddr>().unwrap(),
            c[p].as_u64().unwrap() as u16,
        )
    };
    let proto = if c["proto"] == "tcp" { 6 } else { 17 };
    tuple(proto, ep("src", "sport"), ep("dst", "dport"))
}

/// The oracle's tag value: the README's definitions, written again.
fn tag(c: &Value, side: &str, key: &str, raw_ports: bool) -> Value {
    let (ip, port) = match side {
        "src" => ("src", "sport"),
        _ => ("dst", "dport"),
    };
    let addr: IpAddr = c[ip].as_str().unwrap().parse().unwrap();
    let port_n = c[port].as_u64().unwrap();
    let s = match key {
        "ip" => addr.to_string(),
        "ip/24" => match addr {
            IpAddr::V4(a) => format!("{}/24", std::net::Ipv4Addr::from(u32::from(a) & !0xff)),
            IpAddr::V6(a) => {
                let n = u128::from(a) & (u128::MAX << 104);
                format!("{}/24", std::net::Ipv6Addr::from(n))
            }
        },
        "port" if side == "src" && !raw_ports && port_n >= 1024 => "ephemeral".into(),
        "port" => port_n.to_string(),
        "proto" => c["proto"].as_str().unwrap().into(),
        k => panic!("oracle knows no key {k}"),
    };
    Value::String(s)
}

const DIR_FIELDS: [&str; 7] = [
    "packets",
    "bytes",
    "l3_bytes",
    "retransmits",
    "retransmitted_bytes",
    "probes",
    "gaps",
];

/// What a row must hold: sums over its connections.
#[derive(Default, Clone)]
struct Group {
    conns: u64,
    sent: [u64; 7],
    received: [u64; 7],
    first: u64,
    last: u64,
}

impl Group {
    fn add(&mut self, c: &Value, t: (u64, u64)) {
        if self.conns == 0 {
            (self.first, self.last) = t;
        }
        self.conns += 1;
        for (i, f) in DIR_FIELDS.iter().enumerate() {
            self.sent[i] += c["sent"][f].as_u64().unwrap();
            self.received[i] += c["received"][f].as_u64().unwrap();
        }
        self.first = self.first.min(t.0);
        self.last = self.last.max(t.1);
    }

    fn merge(&mut self, o: &Group) {
        if self.conns == 0 {
            (self.first, self.last) = (o.first, o.last);
        }
        self.conns += o.conns;
        for i in 0..7 {
            self.sent[i] += o.sent[i];
            self.received[i] += o.received[i];
        }
        self.first = self.first.min(o.first);
        self.last = self.last.max(o.last);
    }

    fn bytes(&self) -> u64 {
        self.sent[1] + self.received[1]
    }
}

fn row_group(row: &Value) -> Group {
    let dir = |d: &str| DIR_FIELDS.map(|f| row[d][f].as_u64().unwrap());
    Group {
        conns: row["conns"].as_u64().unwrap(),
        sent: dir("sent"),
        received: dir("received"),
        first: 0,
        last: 0,
    }
}

fn metric(row: &Value, sort: &str) -> f64 {
    let sum =
        |f: &str| (row["sent"][f].as_u64().unwrap() + row["received"][f].as_u64().unwrap()) as f64;
    match sort {
        "bytes" => sum("bytes"),
        "retransmits" => sum("retransmits"),
        "conns" => row["conns"].as_f64().unwrap(),
        "bandwidth" => row["bandwidth_bytes_per_s"]
            .as_f64()
            .unwrap_or(f64::NEG_INFINITY),
        s => panic!("oracle knows no metric {s}"),
    }
}

/// Checks one query's rows on one capture; returns what went wrong.
fn check(cap: &Path, q: &Query, conns: &[Value], rows: &[Value]) -> Vec<String> {
    let ctx = format!(
        "{} {:?}",
        cap.file_name().unwrap().to_string_lossy(),
        q.args
    );
    let mut bad = Vec::new();
    let (times, origin, capture_last) = packet_times(cap);
    assert_eq!(
        times.len(),
        conns.len(),
        "{ctx}: one connection per 5-tuple"
    );
    let window = q.window.map(|(a, b)| {
        let ns = |s: f64| (s * 1e9).round() as u64;
        let start = origin + a.map_or(0, ns);
        let end = b.map_or(capture_last, |b| (origin + ns(b)).min(capture_last));
        (start, end.max(start))
    });

    let mut groups: BTreeMap<(Vec<String>, Vec<String>), Group> = BTreeMap::new();
    for c in conns {
        let t = times[&conn_tuple(c)];
        if let Some((ws, we)) = window {
            if t.0 > we || t.1 < ws {
                continue;
            }
        }
        if !(q.select)(c) {
            continue;
        }
        let key = (
            q.src
                .iter()
                .map(|k| tag(c, "src", k, q.raw_ports).to_string())
                .collect(),
            q.dst
                .iter()
                .map(|k| tag(c, "dst", k, q.raw_ports).to_string())
                .collect(),
        );
        groups.entry(key).or_default().add(c, t);
    }
    let mut total = Group::default();
    groups.values().for_each(|g| total.merge(g));

    let mut shown = Group::default();
    let mut rest = groups.clone();
    let mut other = None;
    for row in rows {
        if row["other"] == true {
            other = Some(row);
            continue;
        }
        let key = (
            q.src
                .iter()
                .map(|k| row["src"][k].to_string())
                .collect::<Vec<_>>(),
            q.dst
                .iter()
                .map(|k| row["dst"][k].to_string())
                .collect::<Vec<_>>(),
        );
        let Some(g) = rest.remove(&key) else {
            bad.push(format!("{ctx}: row {key:?} is no group of the selection"));
            continue;
        };
        let got = row_group(row);
        if (got.conns, got.sent, got.received) != (g.conns, g.sent, g.received) {
            bad.push(format!(
                "{ctx}: row {key:?} sums differ from its connections"
            ));
        }
        check_bandwidth(&ctx, row, &g, window, &mut bad);
        shown.merge(&g);
    }
    match (q.top, other) {
        (Some(n), Some(o)) => {
            if rows.len() != n + 1 {
                bad.push(format!("{ctx}: {} rows, want top {n} + other", rows.len()));
            }
            let mut want = Group::default();
            rest.values().for_each(|g| want.merge(g));
            let got = row_group(o);
            if (got.conns, got.sent, got.received) != (want.conns, want.sent, want.received) {
                bad.push(format!(
                    "{ctx}: `other` is not the sum of the remaining groups"
                ));
            }
            check_bandwidth(&ctx, o, &want, window, &mut bad);
            shown.merge(&want);
        }
        (_, Some(_)) => bad.push(format!("{ctx}: `other` row without --top")),
        _ => {
            if !rest.is_empty() {
                bad.push(format!("{ctx}: groups without a row: {:?}", rest.keys()));
            }
        }
    }
    // The rows add up to every selected connection, exactly.
    if (shown.conns, shown.sent, shown.received) != (total.conns, total.sent, total.received) {
        bad.push(format!(
            "{ctx}: rows do not add up to the selection's total"
        ));
    }
    let ranked: Vec<f64> = rows
        .iter()
        .filter(|r| r["other"] != true)
        .map(|r| metric(r, q.sort))
        .collect();
    if ranked.windows(2).any(|w| w[0] < w[1]) {
        bad.push(format!(
            "{ctx}: rows not sorted by {} descending: {ranked:?}",
            q.sort
        ));
    }
    bad
}

fn check_bandwidth(
    ctx: &str,
    row: &Value,
    g: &Group,
    window: Option<(u64, u64)>,
    bad: &mut Vec<String>,
) {
    let span_ns = match window {
        Some((s, e)) => e - s,
        None => g.last - g.first,
    };
    let secs = row["seconds"].as_f64().unwrap();
    if (secs - span_ns as f64 / 1e9).abs() > 1e-12 {
        bad.push(format!(
            "{ctx}: seconds {secs}, want {}",
            span_ns as f64 / 1e9
        ));
    }
    let want = (span_ns > 0).then(|| g.bytes() as f64 / (span_ns as f64 / 1e9));
    let got = row["bandwidth_bytes_per_s"].as_f64();
    let ok = match (got, want) {
        (Some(a), Some(b)) => (a - b).abs() <= b * 1e-12,
        (None, None) => true,
        _ => false,
    };
    if !ok {
        bad.push(format!("{ctx}: bandwidth {got:?}, want {want:?}"));
    }
}

#[test]
fn queries_match_golden_files_and_the_oracle() {
    let mut failures = Vec::new();
    let mut checked = 0;
    // Always the shipped fixtures: the goldens belong to them.
    let dir = common::repo_root().join("fixtures/pcaps");
    let caps: Vec<_> = captures()
        .into_iter()
        .filter(|c| c.parent() == Some(dir.as_path()))
        .collect();
    for cap in &caps {
        let conns = run(cap, &[]);
        let mut text = String::new();
        for q in QUERIES {
            let out = run_text(cap, q.args);
            failures.extend(check(cap, q, &conns, &json_lines(&out)));
            checked += 1;
            text.push_str(&format!(
                "$ flowprobe replay --format json {}\n",
                q.args.join(" ")
            ));
            text.push_str(&out);
        }
        let golden = cap.with_extension("query.expected");
        if !common::golden(&golden, &text) {
            failures.push(format!(
                "{}: differs from {} (diff above)",
                cap.display(),
                golden.display()
            ));
        }
    }
    assert!(checked > 0, "no fixtures");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// tshark's rows for the handshake frames of a capture.
fn tshark_handshakes(cap: &Path) -> Option<Vec<Vec<String>>> {
    let mut cmd = Command::new("tshark");
    let cfg = tempfile::tempdir().unwrap();
    cmd.env("WIRESHARK_CONFIG_DIR", cfg.path())
        .args(["-n", "-r"])
        .arg(cap)
        .args([
            "-o",
            "tcp.relative_sequence_numbers:TRUE",
            "-T",
            "fields",
            "-E",
            "separator=,",
        ]);
    for f in [
        "frame.time_epoch",
        "ip.src",
        "ipv6.src",
        "tcp.srcport",
        "ip.dst",
        "ipv6.dst",
        "tcp.dstport",
        "tcp.flags",
        "tcp.ack",
        "tcp.analysis.ack_rtt",
    ] {
        cmd.args(["-e", f]);
    }
    cmd.args(["-Y", "tcp"]);
    let out = match cmd.output() {
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        r => r.expect("run tshark"),
    };
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split(',').map(str::to_owned).collect())
            .collect(),
    )
}

/// Seconds with a decimal point (tshark's epoch and ack_rtt) as whole
/// nanoseconds, exactly.
fn ns(s: &str) -> i64 {
    let (i, f) = s.split_once('.').unwrap_or((s, ""));
    let f = format!("{f:0<9}");
    i.parse::<i64>().unwrap() * 1_000_000_000 + f[..9].parse::<i64>().unwrap()
}

#[test]
fn handshake_rtt_matches_tshark() {
    let mut checked = 0;
    for cap in captures() {
        let Some(frames) = tshark_handshakes(&cap) else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("tshark is not installed but CI=true");
            }
            eprintln!("skipped: tshark is not installed");
            return;
        };
        for c in run(&cap, &[]).iter().filter(|c| c["proto"] == "tcp") {
            let ctx = format!("{} {}", cap.display(), c["sport"]);
            let ep = |a: &str, p: &str| (c[a].as_str().unwrap().to_owned(), c[p].to_string());
            let (client, server) = (ep("src", "sport"), ep("dst", "dport"));
            let from = |f: &[String], e: &(String, String)| {
                let src = if f[1].is_empty() { &f[2] } else { &f[1] };
                let src: IpAddr = src.parse().unwrap();
                src.to_string() == e.0 && f[3] == e.1
            };
            let to_us = |d: i64| (d + 500) / 1000;
            let flags = |f: &[String]| {
                u8::from_str_radix(f[7].trim_start_matches("0x"), 16).unwrap() & 0x12
            };
            let mine: Vec<&Vec<String>> = frames
                .iter()
                .filter(|f| {
                    (from(f, &client) && f[6] == server.1) || (from(f, &server) && f[6] == client.1)
                })
                .collect();
            let syns: Vec<_> = mine
                .iter()
                .filter(|f| from(f, &client) && flags(f) == 0x02)
                .collect();
            let synacks: Vec<_> = mine
                .iter()
                .filter(|f| from(f, &server) && flags(f) == 0x12)
                .collect();
            if syns.is_empty() || synacks.is_empty() {
                continue;
            }
            // dst leg: SYN -> first SYN/ACK, unless the SYN went twice.
            let want_dst = (syns.len() == 1).then(|| {
                let d = ns(&synacks[0][0]) - ns(&syns[0][0]);
                assert_eq!(
                    ns(&synacks[0][9]),
                    d,
                    "{ctx}: tshark's ack_rtt on the SYN/ACK"
                );
                to_us(d)
            });
            // src leg: SYN/ACK -> the client's first ACK of it, unless the
            // SYN/ACK went twice.
            let want_src = (synacks.len() == 1).then(|| {
                let t0 = ns(&synacks[0][0]);
                let ack = mine
                    .iter()
                    .find(|f| {
                        from(f, &client) && flags(f) == 0x10 && f[8] == "1" && ns(&f[0]) >= t0
                    })
                    .unwrap_or_else(|| panic!("{ctx}: no ACK of the SYN/ACK"));
                let d = ns(&ack[0]) - t0;
                assert_eq!(ns(&ack[9]), d, "{ctx}: tshark's ack_rtt on the ACK");
                to_us(d)
            });
            let got = |leg: &str| c["rtt"][leg]["handshake_us"].as_i64();
            assert_eq!(got("dst"), want_dst, "{ctx}: SYN -> SYN/ACK");
            assert_eq!(got("src"), want_src, "{ctx}: SYN/ACK -> ACK");
            checked += 1;
        }
    }
    assert!(checked > 0, "no TCP handshake in the fixtures");
    eprintln!("{checked} handshakes checked against tshark");
}

/// One TCP frame as tshark dissects it.
struct TsFrame {
    t_ns: i64,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    flags: u8,
    seq: u32,
    ack: u32,
    len: u32,
    /// tshark: retransmission, out-of-order or spurious retransmission
    /// (what flowprobe counts as retransmits on these sender-side captures,
    /// see `tshark_oracle`), unless the frame only fills a hole tshark
    /// reported (`lost_segment`): that is data the tap sees for the first
    /// time, new to flowprobe (reordering before the tap).
    retransmit: bool,
    /// tshark: keep-alive or zero-window probe.
    probe: bool,
}

/// An address and port.
type End = (IpAddr, u16);
/// Sequence ranges `[lo, hi)` a direction has not shown yet.
type Holes = Vec<(u32, u32)>;

fn tshark_tcp_frames(cap: &Path) -> Option<Vec<TsFrame>> {
    let cfg = tempfile::tempdir().unwrap();
    let fields = [
        "frame.time_epoch",
        "ip.src",
        "ipv6.src",
        "tcp.srcport",
        "ip.dst",
        "ipv6.dst",
        "tcp.dstport",
        "tcp.flags",
        "tcp.seq_raw",
        "tcp.ack_raw",
        "tcp.len",
        "tcp.analysis.retransmission",
        "tcp.analysis.out_of_order",
        "tcp.analysis.spurious_retransmission",
        "tcp.analysis.keep_alive",
        "tcp.analysis.zero_window_probe",
        "tcp.analysis.lost_segment",
    ];
    let mut cmd = Command::new("tshark");
    cmd.env("WIRESHARK_CONFIG_DIR", cfg.path())
        .args(["-n", "-r"])
        .arg(cap)
        .args(["-o", "tcp.analyze_sequence_numbers:TRUE"])
        .args(["-T", "fields", "-E", "separator=,", "-E", "occurrence=f"])
        .args(["-Y", "tcp"]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = match cmd.output() {
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        r => r.expect("run tshark"),
    };
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    // Per direction: the highest end seen and the holes `[lo, hi)` left
    // below it, in wrapping sequence space.
    let mut seen: HashMap<(End, End), (u32, Holes)> = HashMap::new();
    let after = |a: u32, b: u32| (a.wrapping_sub(b) as i32) > 0;
    Some(
        text.lines()
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                assert_eq!(f.len(), fields.len(), "{l}");
                let ip = |a: &str, b: &str| -> IpAddr {
                    if a.is_empty() { b } else { a }.parse().unwrap()
                };
                let (src, dst) = (
                    (ip(f[1], f[2]), f[3].parse().unwrap()),
                    (ip(f[4], f[5]), f[6].parse().unwrap()),
                );
                let (seq, len): (u32, u32) = (f[8].parse().unwrap(), f[10].parse().unwrap());
                let end = seq.wrapping_add(len);
                let mut retransmit = !(f[11].is_empty() && f[12].is_empty() && f[13].is_empty());
                let (max, holes) = seen.entry((src, dst)).or_insert((seq, Vec::new()));
                if !f[16].is_empty() && after(seq, *max) {
                    holes.push((*max, seq));
                }
                if retransmit && len > 0 {
                    // Only the first fill of a hole is new: what it covered
                    // is seen from then on.
                    if let Some(i) = holes
                        .iter()
                        .position(|&(lo, hi)| !after(lo, seq) && !after(end, hi))
                    {
                        retransmit = false;
                        let (lo, hi) = holes.remove(i);
                        holes.extend(
                            [(lo, seq), (end, hi)]
                                .into_iter()
                                .filter(|&(a, b)| after(b, a)),
                        );
                    }
                }
                if after(end, *max) {
                    *max = end;
                }
                TsFrame {
                    t_ns: ns(f[0]),
                    src,
                    dst,
                    flags: u8::from_str_radix(f[7].trim_start_matches("0x"), 16).unwrap(),
                    seq,
                    ack: f[9].parse().unwrap(),
                    len,
                    retransmit,
                    probe: !(f[14].is_empty() && f[15].is_empty()),
                }
            })
            .collect(),
    )
}

/// The documented timing rule (README, "Round-trip times") run over
/// tshark's dissection of one connection's frames: per leg, the samples in
/// whole microseconds and whether the first one timed a SYN.
fn expected_samples(frames: &[&TsFrame], client: (IpAddr, u16)) -> [(Vec<i64>, bool); 2] {
    const FIN: u8 = 0x01;
    const SYN: u8 = 0x02;
    const RST: u8 = 0x04;
    const ACK: u8 = 0x10;
    // Index 0: the client's segments (dst leg); 1: the server's (src leg).
    let mut timed: [Option<(u32, i64, bool)>; 2] = [None, None];
    let mut legs: [(Vec<i64>, bool); 2] = Default::default();
    for f in frames {
        if f.flags & RST != 0 {
            continue;
        }
        let d = usize::from(f.src != client);
        if f.flags & ACK != 0 {
            if let Some((end, t0, syn)) = timed[1 - d] {
                // `ack` at or after `end`, in wrapping sequence space.
                if (f.ack.wrapping_sub(end) as i32) >= 0 {
                    let leg = &mut legs[1 - d];
                    if leg.0.is_empty() {
                        leg.1 = syn;
                    }
                    leg.0.push((f.t_ns - t0 + 500) / 1000);
                    timed[1 - d] = None;
                }
            }
        }
        let (syn, fin) = (f.flags & SYN != 0, f.flags & FIN != 0);
        if f.retransmit {
            timed[d] = None;
        } else if !f.probe && (f.len > 0 || syn || fin) && timed[d].is_none() {
            let end = f.seq.wrapping_add(f.len + syn as u32 + fin as u32);
            timed[d] = Some((end, f.t_ns, syn));
        }
    }
    legs
}

/// Every RTT sample flowprobe takes on the fixtures, data included, equals
/// the timing rule replayed over tshark's dissection and retransmission
/// analysis: the count, the handshake, the exact maximum, and percentiles
/// within the histogram's 1 %.
#[test]
fn rtt_samples_match_the_rule_over_tshark() {
    let mut checked = 0;
    for cap in captures() {
        let Some(frames) = tshark_tcp_frames(&cap) else {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("tshark is not installed but CI=true");
            }
            eprintln!("skipped: tshark is not installed");
            return;
        };
        for c in run(&cap, &[]).iter().filter(|c| c["proto"] == "tcp") {
            let ep = |a: &str, p: &str| -> (IpAddr, u16) {
                (
                    c[a].as_str().unwrap().parse().unwrap(),
                    c[p].as_u64().unwrap() as u16,
                )
            };
            let (client, server) = (ep("src", "sport"), ep("dst", "dport"));
            let mine: Vec<&TsFrame> = frames
                .iter()
                .filter(|f| {
                    (f.src, f.dst) == (client, server) || (f.src, f.dst) == (server, client)
                })
                .collect();
            let want = expected_samples(&mine, client);
            for (leg, (samples, syn)) in ["dst", "src"].iter().zip(want) {
                let ctx = format!("{} {} {leg}", cap.display(), client.1);
                let got = &c["rtt"][leg];
                let n = samples.len() as u64;
                assert_eq!(got["samples"].as_u64().unwrap_or(0), n, "{ctx}: samples");
                if n == 0 {
                    continue;
                }
                let handshake = syn.then(|| samples[0]);
                assert_eq!(got["handshake_us"].as_i64(), handshake, "{ctx}: handshake");
                let mut sorted = samples.clone();
                sorted.sort();
                assert_eq!(got["max_us"].as_i64(), sorted.last().copied(), "{ctx}: max");
                for (q, key) in [(0.5, "p50_us"), (0.9, "p90_us"), (0.99, "p99_us")] {
                    // The histogram's rule: the value at rank ceil(q * n),
                    // reported as the top of its bucket (at most 1 % above,
                    // never above the maximum).
                    let rank = ((q * n as f64).ceil() as usize).max(1);
                    let exact = sorted[rank - 1];
                    let v = got[key].as_i64().unwrap();
                    assert!(
                        v >= exact && v as f64 <= exact as f64 * 1.01 + 1.0,
                        "{ctx}: {key} {v}, exact {exact} (samples {sorted:?})"
                    );
                }
                checked += n;
            }
        }
    }
    assert!(checked > 0, "no RTT samples in the fixtures");
    eprintln!("{checked} RTT samples checked against tshark's dissection");
}
