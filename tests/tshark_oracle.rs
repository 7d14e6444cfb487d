//! tshark as an oracle for `flowprobe replay --format json` on every capture
//! in `fixtures/pcaps/` (or `FLOWPROBE_FIXTURES`, as in `replay_golden`).
//!
//! One `tshark -T fields` pass per file gives one row per frame; the rows are
//! summed here per TCP/UDP conversation (`tcp.stream`/`udp.stream` and the
//! pcapng interface) and direction, and must equal flowprobe's `sent` and
//! `received` counters:
//!
//! | flowprobe | tshark, summed over the direction's frames |
//! |---|---|
//! | `packets` | frames whose outermost transport (after IPv4/IPv6 and IPv6 extension headers) is TCP or UDP |
//! | `l3_bytes` | `ip.len`, or `ipv6.plen + 40` |
//! | `bytes` | `tcp.len`, or `udp.length - 8` |
//! | `retransmits` | frames flagged `tcp.analysis.retransmission`, `.out_of_order` or `.spurious_retransmission` |
//! | `retransmitted_bytes` | `tcp.len` of those frames |
//! | `gaps` | frames flagged `tcp.analysis.lost_segment` |
//!
//! tshark sorts retransmissions into kinds by timing: on a fast link (the
//! fixtures' veth) it calls some real retransmissions "out-of-order", and a
//! retransmission of already-acknowledged data "spurious"; flowprobe, like the
//! kernel's `tcpi_total_retrans`, counts them all. The retransmit rows are
//! only an oracle for captures taken upstream of any loss (the fixtures are
//! sender-side captures, see `fixtures/capture/README.md`): there tshark
//! reports no lost segments, and every segment at or below the highest
//! sequence seen is a retransmission. Where the tap itself saw a hole (the
//! fresh captures of `scripts/test.sh` can hold one: veth delivers a flow's
//! segments from the sender's CPU, so they can reach the tap out of order),
//! flowprobe counts the segment that fills it as new data, seen here for the
//! first time, and tshark as out-of-order: in such a direction flowprobe may
//! count fewer, by at most the flagged frames and bytes that fall in a hole
//! tshark reported (`tcp.analysis.lost_segment`: from the highest `tcp.nxtseq`
//! before that frame to its `tcp.seq`). The kernel-truth test
//! (`replay_golden`) holds the exact count on the same captures. tshark also counts a segment that
//! carries old and new data as a retransmission of its whole length, where
//! flowprobe counts only the old part in `retransmitted_bytes`; the kernel
//! never sends such segments in the fixtures.
//!
//! Without tshark the test fails when `CI=true` and is skipped otherwise.

mod common;

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;

use common::{captures, flowprobe, json_lines, stderr, stdout};
use serde_json::Value;

/// tshark's version line, or `None` when it cannot be run.
fn tshark_version() -> Option<String> {
    match Command::new("tshark").arg("--version").output() {
        Ok(o) if o.status.success() => Some(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("tshark")
                .to_owned(),
        ),
        Ok(o) => panic!(
            "`tshark --version` failed ({}): {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if e.kind() == ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run tshark: {e}"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// One direction's counters, in flowprobe's terms.
#[derive(Clone, Default, PartialEq, Eq)]
struct Dir {
    packets: u64,
    l3_bytes: u64,
    bytes: u64,
    retransmits: u64,
    retransmitted_bytes: u64,
    gaps: u64,
    /// Frames counted in `retransmits` that overlap a hole, and their bytes
    /// in it: how far below tshark flowprobe may be (see the module doc).
    hole_fills: u64,
    hole_fill_bytes: u64,
    /// Relative sequence state for finding the holes: the highest
    /// `tcp.nxtseq` so far and the holes as `[lo, hi)`.
    nxt_max: u64,
    holes: Vec<(u64, u64)>,
}

const FIELDS: [&str; 6] = [
    "packets",
    "l3_bytes",
    "bytes",
    "retransmits",
    "retransmitted_bytes",
    "gaps",
];

impl Dir {
    fn values(&self) -> [u64; 6] {
        [
            self.packets,
            self.l3_bytes,
            self.bytes,
            self.retransmits,
            self.retransmitted_bytes,
            self.gaps,
        ]
    }

    fn from_json(v: &Value) -> Dir {
        let f = |k: &str| {
            v[k].as_u64()
                .unwrap_or_else(|| panic!("no counter {k} in {v}"))
        };
        Dir {
            packets: f("packets"),
            l3_bytes: f("l3_bytes"),
            bytes: f("bytes"),
            retransmits: f("retransmits"),
            retransmitted_bytes: f("retransmitted_bytes"),
            gaps: f("gaps"),
            ..Dir::default()
        }
    }

    /// Whether flowprobe's `got` for `field` is what tshark's view allows.
    fn allows(&self, field: &str, want: u64, got: u64) -> bool {
        let slack = match field {
            "retransmits" => self.hole_fills,
            "retransmitted_bytes" => self.hole_fill_bytes,
            _ => 0,
        };
        got <= want && want - got <= slack
    }
}

impl fmt::Debug for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in FIELDS.iter().zip(self.values()) {
            m.entry(k, &v);
        }
        if self.gaps > 0 {
            m.entry(&"hole_fills", &self.hole_fills);
            m.entry(&"hole_fill_bytes", &self.hole_fill_bytes);
        }
        m.finish()
    }
}

/// Endpoints of a conversation in a direction-independent order.
type Pair = (SocketAddr, SocketAddr);

fn canonical(a: SocketAddr, b: SocketAddr) -> Pair {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// A conversation as tshark sees it: `a` sent its first frame to `b`.
struct Conv {
    first_frame: u64,
    a: SocketAddr,
    b: SocketAddr,
    a_to_b: Dir,
    b_to_a: Dir,
}

/// The fields of one row, in order.
const TSHARK_FIELDS: [&str; 23] = [
    "frame.number",
    "frame.interface_id",
    "frame.protocols",
    "ip.src",
    "ip.dst",
    "ip.len",
    "ipv6.src",
    "ipv6.dst",
    "ipv6.plen",
    "tcp.stream",
    "tcp.srcport",
    "tcp.dstport",
    "tcp.len",
    "tcp.seq",
    "tcp.nxtseq",
    "tcp.analysis.retransmission",
    "tcp.analysis.out_of_order",
    "tcp.analysis.spurious_retransmission",
    "tcp.analysis.lost_segment",
    "udp.stream",
    "udp.srcport",
    "udp.dstport",
    "udp.length",
];

/// The transport right after the outermost IP header (IPv6 extension
/// headers skipped), if that is TCP or UDP. ICMP errors quoting a TCP header,
/// tunnels and non-first fragments give `None`, as they update no connection
/// in flowprobe.
fn outer_transport(protocols: &str) -> Option<Proto> {
    let mut it = protocols
        .split(':')
        .skip_while(|p| *p != "ip" && *p != "ipv6");
    it.next()?;
    match it.find(|p| !p.starts_with("ipv6."))? {
        "tcp" => Some(Proto::Tcp),
        "udp" => Some(Proto::Udp),
        _ => None,
    }
}

/// Runs tshark once on `cap` and sums its rows per (interface, protocol,
/// stream).
fn tshark_conversations(cap: &Path, config_dir: &Path) -> BTreeMap<(u32, Proto, u64), Conv> {
    let mut cmd = Command::new("tshark");
    // A fresh configuration directory: personal preferences, "decode as"
    // rules or disabled protocols must not change the oracle.
    cmd.env("WIRESHARK_CONFIG_DIR", config_dir)
        .args(["-n", "-r"])
        .arg(cap)
        .args([
            "-o",
            "tcp.analyze_sequence_numbers:TRUE",
            // Keep fragments as they are on the wire: flowprobe counts the
            // first fragment of a datagram and no other.
            "-o",
            "ip.defragment:FALSE",
            "-o",
            "ipv6.defragment:FALSE",
            "-T",
            "fields",
            "-E",
            "separator=,",
            "-E",
            "occurrence=f",
        ]);
    for f in TSHARK_FIELDS {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().expect("run tshark");
    assert!(
        out.status.success(),
        "tshark failed on {} ({}): {}",
        cap.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("tshark prints UTF-8");

    let mut convs = BTreeMap::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split(',').collect();
        assert_eq!(
            cols.len(),
            TSHARK_FIELDS.len(),
            "{}: unexpected tshark row {line:?}",
            cap.display()
        );
        let row: BTreeMap<&str, &str> = TSHARK_FIELDS.iter().copied().zip(cols).collect();
        let Some(proto) = outer_transport(row["frame.protocols"]) else {
            continue;
        };
        let num = |k: &str| -> u64 {
            row[k]
                .parse()
                .unwrap_or_else(|_| panic!("{}: field {k} in row {line:?}", cap.display()))
        };
        let ip = |k4: &str, k6: &str| -> IpAddr {
            let s = if row[k4].is_empty() { row[k6] } else { row[k4] };
            s.parse()
                .unwrap_or_else(|_| panic!("{}: address in row {line:?}", cap.display()))
        };
        let flag = |k: &str| !row[k].is_empty();

        let frame = num("frame.number");
        let iface = match row["frame.interface_id"] {
            "" => 0, // pcap: one interface, which tshark leaves unnumbered
            s => s.parse().unwrap(),
        };
        let l3_bytes = if row["ip.len"].is_empty() {
            40 + num("ipv6.plen")
        } else {
            num("ip.len")
        };
        let (p, stream, bytes) = match proto {
            Proto::Tcp => ("tcp", num("tcp.stream"), num("tcp.len")),
            Proto::Udp => ("udp", num("udp.stream"), num("udp.length") - 8),
        };
        let port = |k: &str| -> u16 {
            let k = format!("{p}.{k}");
            row[k.as_str()]
                .parse()
                .unwrap_or_else(|_| panic!("{}: field {k} in row {line:?}", cap.display()))
        };
        let src = SocketAddr::new(ip("ip.src", "ipv6.src"), port("srcport"));
        let dst = SocketAddr::new(ip("ip.dst", "ipv6.dst"), port("dstport"));

        let c = convs.entry((iface, proto, stream)).or_insert_with(|| Conv {
            first_frame: frame,
            a: src,
            b: dst,
            a_to_b: Dir::default(),
            b_to_a: Dir::default(),
        });
        let d = if (src, dst) == (c.a, c.b) {
            &mut c.a_to_b
        } else if (src, dst) == (c.b, c.a) {
            &mut c.b_to_a
        } else {
            panic!(
                "{}: frame {frame} {src} -> {dst} is in {p} stream {stream} of {} <-> {}",
                cap.display(),
                c.a,
                c.b
            );
        };
        d.packets += 1;
        d.l3_bytes += l3_bytes;
        d.bytes += bytes;
        if proto == Proto::Tcp {
            let seq = num("tcp.seq");
            // Empty on frames that carry no sequence space in some versions.
            let nxt = if row["tcp.nxtseq"].is_empty() {
                seq
            } else {
                num("tcp.nxtseq")
            };
            if flag("tcp.analysis.lost_segment") {
                d.gaps += 1;
                if seq > d.nxt_max {
                    d.holes.push((d.nxt_max, seq));
                }
            }
            if flag("tcp.analysis.retransmission")
                || flag("tcp.analysis.out_of_order")
                || flag("tcp.analysis.spurious_retransmission")
            {
                d.retransmits += 1;
                d.retransmitted_bytes += bytes;
                let in_holes: u64 = d
                    .holes
                    .iter()
                    .map(|&(lo, hi)| hi.min(seq + bytes).saturating_sub(lo.max(seq)))
                    .sum();
                if in_holes > 0 {
                    d.hole_fills += 1;
                    d.hole_fill_bytes += in_holes;
                }
            }
            d.nxt_max = d.nxt_max.max(nxt);
        }
    }
    convs
}

fn replay(p: &Path) -> Vec<Value> {
    let out = flowprobe(&["replay", "--format", "json", "--quiet", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}: {}", p.display(), stderr(&out));
    json_lines(&stdout(&out))
}

fn endpoint(c: &Value, addr: &str, port: &str) -> SocketAddr {
    let a: IpAddr = c[addr]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad {addr} in {c}"));
    let p = c[port]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or_else(|| panic!("bad {port} in {c}"));
    SocketAddr::new(a, p)
}

/// Compares one file; returns the number of directions compared and pushes
/// a line per disagreement.
fn check_file(cap: &Path, config_dir: &Path, failures: &mut Vec<String>) -> usize {
    let name = cap.file_name().unwrap().to_string_lossy().into_owned();

    // tshark's conversations, grouped by endpoints; several per group when a
    // 5-tuple is reused, in order of their first frame.
    let mut theirs: BTreeMap<(u32, Proto, Pair), Vec<Conv>> = BTreeMap::new();
    for ((iface, proto, _), c) in tshark_conversations(cap, config_dir) {
        theirs
            .entry((iface, proto, canonical(c.a, c.b)))
            .or_default()
            .push(c);
    }
    for v in theirs.values_mut() {
        v.sort_by_key(|c| c.first_frame);
    }

    // flowprobe's, grouped the same way; output order is first-seen order.
    let mut ours: BTreeMap<(u32, Proto, Pair), Vec<Value>> = BTreeMap::new();
    for c in replay(cap) {
        let proto = match c["proto"].as_str() {
            Some("tcp") => Proto::Tcp,
            Some("udp") => Proto::Udp,
            _ => panic!("{name}: unexpected proto in {c}"),
        };
        let iface = c["iface"].as_u64().expect("iface") as u32;
        let pair = canonical(endpoint(&c, "src", "sport"), endpoint(&c, "dst", "dport"));
        ours.entry((iface, proto, pair)).or_default().push(c);
    }

    let mut compared = 0;
    let keys: std::collections::BTreeSet<_> = theirs.keys().chain(ours.keys()).copied().collect();
    for key in keys {
        let (iface, proto, (x, y)) = key;
        let ctx = format!("{name} iface {iface} {} {x} <-> {y}", proto.name());
        let t = theirs.get(&key).map_or(&[][..], |v| v.as_slice());
        let o = ours.get(&key).map_or(&[][..], |v| v.as_slice());
        if t.len() != o.len() {
            failures.push(format!(
                "{ctx}: tshark has {} conversation(s), flowprobe {}",
                t.len(),
                o.len()
            ));
            continue;
        }
        for (i, (t, o)) in t.iter().zip(o).enumerate() {
            let src = endpoint(o, "src", "sport");
            let dst = endpoint(o, "dst", "dport");
            let (t_sent, t_recv) = if (src, dst) == (t.a, t.b) {
                (&t.a_to_b, &t.b_to_a)
            } else {
                (&t.b_to_a, &t.a_to_b)
            };
            for (dir, want, from, to) in
                [("sent", t_sent, src, dst), ("received", t_recv, dst, src)]
            {
                let got = Dir::from_json(&o[dir]);
                compared += 1;
                eprintln!("{ctx} #{i} {dir} {from} -> {to}: tshark {want:?}");
                for ((field, w), g) in FIELDS.iter().zip(want.values()).zip(got.values()) {
                    if !want.allows(field, w, g) {
                        let hint = if field.starts_with("retransmit") && want.gaps > 0 {
                            " (tshark saw lost segments: flowprobe may count fewer by the hole fills shown)"
                        } else {
                            ""
                        };
                        failures.push(format!(
                            "{ctx} #{i} {dir} ({from} -> {to}): {field}: tshark {w}, flowprobe {g}{hint}"
                        ));
                    }
                }
            }
        }
    }
    compared
}

#[test]
fn replay_agrees_with_tshark() {
    let Some(version) = tshark_version() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("tshark is not installed but CI=true: install it (apt-get install tshark)");
        }
        // Straight to stderr, so the skip shows without --nocapture.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED tshark_oracle: tshark is not installed (apt-get install tshark); \
             with CI=true this is a failure"
        );
        return;
    };
    eprintln!("{version}");

    let caps = captures();
    assert!(!caps.is_empty(), "no captures found");
    let config_dir = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for cap in &caps {
        let n = check_file(cap, config_dir.path(), &mut failures);
        assert!(
            n > 0,
            "{}: no TCP/UDP conversation to compare",
            cap.display()
        );
    }
    assert!(
        failures.is_empty(),
        "flowprobe and {version} disagree:\n{}",
        failures.join("\n")
    );
}
