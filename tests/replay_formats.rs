//! One conversation written in every capture format and link type flowprobe
//! reads must give the same connections; broken files must give a clear
//! error and keep what was read.
//!
//! The conversation is built here with etherparse, so the expected numbers
//! follow from what was put on the "wire".

mod common;

use std::borrow::Cow;
use std::fs;
use std::path::Path;
use std::time::Duration;

use common::{flowprobe, json_lines, stderr, stdout};
use etherparse::PacketBuilder;
use pcap_file::pcap::{PcapHeader, PcapPacket, PcapWriter};
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::{Block, PcapNgWriter};
use pcap_file::{DataLink, TsResolution};
use serde_json::Value;

const A: [u8; 4] = [192, 0, 2, 1];
const B: [u8; 4] = [192, 0, 2, 2];
const T0_US: u64 = 1_764_000_000_000_000;

/// (microseconds, IP packet) — A is the client on port 40001.
fn conversation() -> Vec<(u64, Vec<u8>)> {
    let mut pkts = Vec::new();
    let mut at = 0;
    let mut push = |bytes: Vec<u8>| {
        at += 250;
        pkts.push((T0_US + at, bytes));
    };
    let tcp = |from_a: bool, seq: u32, ack: Option<u32>, syn: bool, fin: bool, len: usize| {
        let (s, d, sp, dp) = if from_a {
            (A, B, 40001, 80)
        } else {
            (B, A, 80, 40001)
        };
        let mut b = PacketBuilder::ipv4(s, d, 64).tcp(sp, dp, seq, 65535);
        if syn {
            b = b.syn();
        }
        if fin {
            b = b.fin();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut out = Vec::new();
        b.write(&mut out, &vec![0x5a; len]).unwrap();
        out
    };
    push(tcp(true, 1000, None, true, false, 0));
    push(tcp(false, 9000, Some(1001), true, false, 0));
    push(tcp(true, 1001, Some(9001), false, false, 0));
    push(tcp(true, 1001, Some(9001), false, false, 1000));
    push(tcp(true, 2001, Some(9001), false, false, 1000));
    push(tcp(true, 1001, Some(9001), false, false, 1000)); // retransmission
    push(tcp(false, 9001, Some(3001), false, false, 500));
    push(tcp(true, 3001, Some(9501), false, true, 0));
    push(tcp(false, 9501, Some(3002), false, true, 0));
    push(tcp(true, 3002, Some(9502), false, false, 0));
    let mut udp = Vec::new();
    PacketBuilder::ipv4(B, A, 64)
        .udp(5353, 53)
        .write(&mut udp, &[1; 33])
        .unwrap();
    push(udp);
    pkts
}

fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend(ip);
    f
}

fn sll2(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![
        0x08, 0x00, 0, 0, 0, 0, 0, 3, 0, 1, 4, 6, 2, 0, 0, 0, 0, 1, 0, 0,
    ];
    f.extend(ip);
    f
}

fn sll(ip: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 4, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0, 0x08, 0x00];
    f.extend(ip);
    f
}

fn write_pcap(path: &Path, link: DataLink, res: TsResolution, frames: &[(u64, Vec<u8>)]) {
    let hdr = PcapHeader {
        datalink: link,
        ts_resolution: res,
        ..Default::default()
    };
    let mut w = PcapWriter::with_header(fs::File::create(path).unwrap(), hdr).unwrap();
    for (us, data) in frames {
        let p = PcapPacket::new(Duration::from_micros(*us), data.len() as u32, data);
        w.write_packet(&p).unwrap();
    }
}

/// `ifaces`: link type and `if_tsresol` (None = default microseconds) per
/// interface; frames name their interface.
fn write_pcapng(path: &Path, ifaces: &[(DataLink, Option<u8>)], frames: &[(u32, u64, Vec<u8>)]) {
    let mut w = PcapNgWriter::new(fs::File::create(path).unwrap()).unwrap();
    for (link, res) in ifaces {
        let options = res
            .map(InterfaceDescriptionOption::IfTsResol)
            .into_iter()
            .collect();
        w.write_block(&Block::InterfaceDescription(InterfaceDescriptionBlock {
            linktype: *link,
            snaplen: 0,
            options,
        }))
        .unwrap();
    }
    for (iface, us, data) in frames {
        // pcap-file stores the Duration's nanoseconds as raw timestamp units.
        let units = match ifaces[*iface as usize].1 {
            None | Some(6) => *us,
            Some(9) => us * 1000,
            Some(r) => panic!("test does not use tsresol {r}"),
        };
        w.write_block(&Block::EnhancedPacket(EnhancedPacketBlock {
            interface_id: *iface,
            timestamp: Duration::from_nanos(units),
            original_len: data.len() as u32,
            data: Cow::Borrowed(data),
            options: vec![],
        }))
        .unwrap();
    }
}

fn replay_json(path: &Path) -> Vec<Value> {
    replay_json_with(path, &[]).0
}

/// The connections of `flowprobe replay --format json ARGS PATH`, and its
/// summary line.
fn replay_json_with(path: &Path, args: &[&str]) -> (Vec<Value>, String) {
    let mut all = vec!["replay", "--format", "json"];
    all.extend(args);
    all.push(path.to_str().unwrap());
    let out = flowprobe(&all);
    assert!(out.status.success(), "{}", stderr(&out));
    (json_lines(&stdout(&out)), stderr(&out))
}

fn without_iface(mut v: Vec<Value>) -> Vec<Value> {
    for c in &mut v {
        c.as_object_mut().unwrap().remove("iface");
    }
    v
}

#[test]
fn every_format_and_link_type_gives_the_same_connections() {
    let dir = tempfile::tempdir().unwrap();
    let conv = conversation();
    let map = |f: fn(&[u8]) -> Vec<u8>| conv.iter().map(|(t, ip)| (*t, f(ip))).collect::<Vec<_>>();

    let p = dir.path().join("eth_us.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        TsResolution::MicroSecond,
        &map(ethernet),
    );
    let reference = replay_json(&p);

    // What the conversation put on the wire.
    assert_eq!(reference.len(), 2);
    let tcp = &reference[0];
    assert_eq!(tcp["proto"], "tcp");
    assert_eq!(
        (tcp["src"].as_str(), tcp["sport"].as_u64()),
        (Some("192.0.2.1"), Some(40001))
    );
    assert_eq!(
        (tcp["dst"].as_str(), tcp["dport"].as_u64()),
        (Some("192.0.2.2"), Some(80))
    );
    assert_eq!(tcp["sent"]["packets"], 7);
    assert_eq!(tcp["sent"]["bytes"], 3000);
    assert_eq!(tcp["sent"]["l3_bytes"], 7 * 40 + 3000);
    assert_eq!(tcp["sent"]["retransmits"], 1);
    assert_eq!(tcp["sent"]["retransmitted_bytes"], 1000);
    assert_eq!(tcp["received"]["packets"], 3);
    assert_eq!(tcp["received"]["bytes"], 500);
    assert_eq!(tcp["received"]["retransmits"], 0);
    assert_eq!(tcp["first_seen"], "2025-11-24T16:00:00.000250000Z");
    assert_eq!(tcp["last_seen"], "2025-11-24T16:00:00.002500000Z");
    let udp = &reference[1];
    // No SYN: the ephemeral (higher) port is the initiator.
    assert_eq!(
        (udp["proto"].as_str(), udp["sport"].as_u64()),
        (Some("udp"), Some(5353))
    );
    assert_eq!(
        (
            udp["sent"]["bytes"].as_u64(),
            udp["received"]["packets"].as_u64()
        ),
        (Some(33), Some(0))
    );

    let p = dir.path().join("eth_ns.pcap");
    write_pcap(
        &p,
        DataLink::ETHERNET,
        TsResolution::NanoSecond,
        &map(ethernet),
    );
    assert_eq!(replay_json(&p), reference, "nanosecond pcap");

    for (name, link, f) in [
        (
            "raw.pcap",
            DataLink::RAW,
            (|ip: &[u8]| ip.to_vec()) as fn(&[u8]) -> Vec<u8>,
        ),
        ("ipv4.pcap", DataLink::IPV4, |ip: &[u8]| ip.to_vec()),
        ("sll.pcap", DataLink::LINUX_SLL, sll),
        ("sll2.pcap", DataLink::LINUX_SLL2, sll2),
    ] {
        let p = dir.path().join(name);
        write_pcap(&p, link, TsResolution::MicroSecond, &map(f));
        assert_eq!(replay_json(&p), reference, "{name}");
    }

    for res in [None, Some(6), Some(9)] {
        let p = dir.path().join(format!("eth_{res:?}.pcapng"));
        let frames: Vec<_> = conv.iter().map(|(t, ip)| (0, *t, ethernet(ip))).collect();
        write_pcapng(&p, &[(DataLink::ETHERNET, res)], &frames);
        assert_eq!(replay_json(&p), reference, "pcapng tsresol {res:?}");
    }

    // Two interfaces with different link types and resolutions: the same
    // connection seen on both is one row, counted on the interface that saw
    // each direction first; with --per-interface, two rows, one per
    // interface.
    let p = dir.path().join("two_ifaces.pcapng");
    let mut frames: Vec<_> = conv.iter().map(|(t, ip)| (0, *t, sll2(ip))).collect();
    frames.extend(conv.iter().map(|(t, ip)| (1, *t, ethernet(ip))));
    write_pcapng(
        &p,
        &[(DataLink::LINUX_SLL2, Some(9)), (DataLink::ETHERNET, None)],
        &frames,
    );
    let (once, summary) = replay_json_with(&p, &[]);
    assert_eq!(once, reference, "counted once, on interface 0");
    let copies = conv.len();
    assert!(
        summary.contains(&format!(", {copies} seen again on another interface")),
        "{summary}"
    );
    let (got, _) = replay_json_with(&p, &["--per-interface"]);
    assert_eq!(got.len(), 4);
    let ifaces: Vec<u64> = got.iter().map(|c| c["iface"].as_u64().unwrap()).collect();
    assert_eq!(ifaces, [0, 1, 0, 1]);
    let per_iface = |i: u64| {
        got.iter()
            .filter(|c| c["iface"] == i)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        without_iface(per_iface(0)),
        without_iface(reference.clone())
    );
    assert_eq!(without_iface(per_iface(1)), without_iface(reference));
}

#[test]
fn skipped_frames_are_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut frames: Vec<_> = conversation()
        .iter()
        .map(|(t, ip)| (*t, ethernet(ip)))
        .collect();
    let arp = {
        let mut f = vec![0xff; 6];
        f.extend([2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        f.extend([0; 28]);
        f
    };
    frames.push((T0_US + 10_000, arp));
    frames.push((T0_US + 10_001, ethernet(&conversation()[3].1[..30]))); // cut inside the TCP header
    let p = dir.path().join("mixed.pcap");
    write_pcap(&p, DataLink::ETHERNET, TsResolution::MicroSecond, &frames);
    let out = flowprobe(&["replay", p.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(
        stderr(&out)
            .contains("2 connections, 13 frames (11 tracked, skipped 1 not_ip, 1 truncated_l4)"),
        "{}",
        stderr(&out)
    );
    let table = stdout(&out);
    assert!(table.starts_with("PROTO"), "{table}");
    assert!(table.contains("192.0.2.1:40001"), "{table}");
}

#[test]
fn cut_short_file_names_offset_and_keeps_frames() {
    let dir = tempfile::tempdir().unwrap();
    let conv = conversation();
    let frames: Vec<_> = conv.iter().map(|(t, ip)| (*t, ethernet(ip))).collect();
    let p = dir.path().join("cut.pcap");
    write_pcap(&p, DataLink::ETHERNET, TsResolution::MicroSecond, &frames);
    let full = fs::read(&p).unwrap();
    // 24-byte file header, then 16-byte record header + frame each.
    let third = 24 + frames[..3].iter().map(|(_, f)| 16 + f.len()).sum::<usize>();
    fs::write(&p, &full[..third + 20]).unwrap();

    let out = flowprobe(&["replay", "--format", "json", p.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "frames were read, so this is not a failure"
    );
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "cut.pcap: file is cut short inside the record at offset {third}; counted the 3 frames before it"
        )),
        "{err}"
    );
    let conns = json_lines(&stdout(&out));
    assert_eq!(conns[0]["sent"]["packets"], 2);
    assert_eq!(conns[0]["received"]["packets"], 1);
}

#[test]
fn not_a_capture_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    fs::write(&p, "hello, this is text\n").unwrap();
    let out = flowprobe(&["replay", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("notes.txt: not a pcap or pcapng file (starts with 68656c6c)"),
        "{err}"
    );

    let out = flowprobe(&["replay", dir.path().join("missing.pcap").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("missing.pcap: cannot open"),
        "{}",
        stderr(&out)
    );
}
