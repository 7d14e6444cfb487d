//! Tunnels and encapsulations on replay (docs/tunnels.md), over the
//! captures `tests/common/encap.rs` generates into `fixtures/tunnels/`:
//!
//! - the committed captures are exactly the generator's output
//!   (`UPDATE_EXPECT=1` rewrites them, with the goldens);
//! - `flowprobe replay` of each equals its golden, and counts the one
//!   conversation the generator wrapped (known to the byte: what each side
//!   wrote, the one retransmission) as the inner connection, tagged with
//!   the layers around it; two VXLAN networks carrying the same 5-tuple
//!   are two connections; `--no-decap` counts the tunnel instead;
//! - etherparse, given the bytes from where the parser found the inner IP
//!   header, reads the same 5-tuple and payload length;
//! - tshark, decoding the same layers itself, sums the same packets,
//!   payload bytes and retransmissions per inner direction;
//! - every malformed encapsulation is skipped for its own reason.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Command;

use common::encap::{self, Capture};
use common::{flowprobe, golden, json_lines, repo_root, stderr, stdout};
use probe_common::{parse_frame, LinkType};
use serde_json::Value;

fn dir() -> PathBuf {
    repo_root().join("fixtures/tunnels")
}

fn path(c: &Capture) -> PathBuf {
    dir().join(format!("{}.pcap", c.name))
}

fn replay(args: &[&str], c: &Capture) -> Vec<Value> {
    let p = path(c);
    let mut a = vec!["replay", "--format", "json", "--quiet"];
    a.extend_from_slice(args);
    a.push(p.to_str().unwrap());
    let out = flowprobe(&a);
    assert!(out.status.success(), "{}: {}", p.display(), stderr(&out));
    json_lines(&stdout(&out))
}

fn link(c: &Capture) -> LinkType {
    match c.link {
        encap::LINKTYPE_NFLOG => LinkType::Nflog,
        _ => LinkType::Ethernet,
    }
}

#[test]
fn the_captures_are_the_generators() {
    let update = std::env::var("UPDATE_EXPECT").as_deref() == Ok("1");
    fs::create_dir_all(dir()).unwrap();
    for c in encap::captures() {
        let want = encap::pcap(c.link, &c.frames);
        let p = path(&c);
        if update {
            fs::write(&p, &want).unwrap();
        }
        let have = fs::read(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_EXPECT=1 writes it)", p.display()));
        assert!(
            have == want,
            "{}: not what tests/common/encap.rs writes (UPDATE_EXPECT=1)",
            p.display()
        );
    }
}

#[test]
fn replay_matches_golden_files() {
    let failures: Vec<&str> = encap::captures()
        .iter()
        .filter(|c| {
            let out = flowprobe(&[
                "replay",
                "--format",
                "json",
                "--quiet",
                path(c).to_str().unwrap(),
            ]);
            assert!(out.status.success(), "{}", stderr(&out));
            !golden(
                &dir().join(format!("{}.expected.json", c.name)),
                &stdout(&out),
            )
        })
        .map(|c| c.name)
        .collect();
    assert!(
        failures.is_empty(),
        "differ from their goldens (diffs above): {failures:?}"
    );
}

/// The tags each capture's connection carries (both ends but `outer_ip`).
fn expected_tags(name: &str) -> Vec<(&'static str, &'static str)> {
    match name {
        "vlan4" => vec![("vlan", "10.20.30.40")],
        "qinq_pppoe" => vec![("vlan", "100.200"), ("pppoe_session", "4660")],
        "mpls" => vec![("mpls_label", "1000")],
        "mpls6" => vec![("mpls_label", "16")],
        "gre" => vec![("tunnel", "gre"), ("vni", "1234")],
        "gretap" => vec![("tunnel", "gretap"), ("vni", "77")],
        "ipip" => vec![("tunnel", "ipip")],
        "sit" => vec![("tunnel", "sit")],
        "ip4in6" => vec![("tunnel", "4in6")],
        "ip6in6" => vec![("tunnel", "6in6")],
        "geneve6" => vec![("tunnel", "geneve"), ("vni", "703710")],
        "vxlan_two_vnis" => vec![("tunnel", "vxlan")],
        _ => vec![],
    }
}

#[test]
fn replay_counts_the_inner_conversation() {
    for c in encap::captures().iter().filter(|c| c.conns > 0) {
        let conns = replay(&[], c);
        assert_eq!(conns.len(), c.conns, "{}: connections", c.name);
        let mut vnis = Vec::new();
        for k in &conns {
            let v6 = k["src"].as_str().unwrap().contains(':');
            let (cl, sv) = if v6 {
                ("fd00:1::1", "fd00:2::2")
            } else {
                ("10.1.0.1", "10.2.0.2")
            };
            let what = format!("{}: {k}", c.name);
            assert_eq!(k["proto"], "tcp", "{what}");
            assert_eq!(
                (k["src"].as_str().unwrap(), k["sport"].as_u64().unwrap()),
                (cl, 40000),
                "{what}"
            );
            assert_eq!(
                (k["dst"].as_str().unwrap(), k["dport"].as_u64().unwrap()),
                (sv, 80),
                "{what}"
            );
            let (s, r) = (&k["sent"], &k["received"]);
            assert_eq!(
                s["bytes"],
                encap::CLIENT_WROTE + encap::CLIENT_RETRANS_BYTES,
                "{what}"
            );
            assert_eq!(s["retransmits"], encap::CLIENT_RETRANS, "{what}");
            assert_eq!(
                s["retransmitted_bytes"],
                encap::CLIENT_RETRANS_BYTES,
                "{what}"
            );
            assert_eq!(s["packets"], encap::CLIENT_PACKETS, "{what}");
            assert_eq!(r["bytes"], encap::SERVER_WROTE, "{what}");
            assert_eq!(r["retransmits"], 0, "{what}");
            assert_eq!(r["packets"], encap::SERVER_PACKETS, "{what}");
            for side in ["src_tags", "dst_tags"] {
                for (tag, val) in expected_tags(c.name) {
                    assert_eq!(k[side][tag], val, "{what}: {side}.{tag}");
                }
            }
            if k["src_tags"].get("tunnel").is_some() {
                // The client's tunnel endpoint is A, the server's B.
                let (a, b) = if k["src_tags"]["outer_ip"].as_str().unwrap().contains(':') {
                    ("2001:db8::1", "2001:db8::2")
                } else {
                    ("192.0.2.1", "192.0.2.2")
                };
                assert_eq!(
                    (
                        k["src_tags"]["outer_ip"].as_str(),
                        k["dst_tags"]["outer_ip"].as_str()
                    ),
                    (Some(a), Some(b)),
                    "{what}"
                );
            } else {
                assert!(k["src_tags"].get("outer_ip").is_none(), "{what}");
            }
            if let Some(v) = k["src_tags"].get("vni") {
                vnis.push(v.as_str().unwrap().to_owned());
            }
        }
        if c.name == "vxlan_two_vnis" {
            vnis.sort();
            assert_eq!(vnis, ["42", "43"]);
        }
    }
}

#[test]
fn no_decap_counts_the_tunnel_itself() {
    let caps = encap::captures();
    let vx = caps.iter().find(|c| c.name == "vxlan_two_vnis").unwrap();
    let conns = replay(&["--no-decap"], vx);
    // Both ends send from a source port of their own to 4789: per VNI, one
    // UDP flow each way between the tunnel endpoints.
    assert_eq!(conns.len(), 4);
    for k in &conns {
        assert_eq!(
            (k["proto"].as_str(), k["dport"].as_u64()),
            (Some("udp"), Some(4789)),
            "{k}"
        );
        assert!(k.get("src_tags").is_none(), "{k}");
    }
    // Another port for VXLAN: not a tunnel either.
    assert!(replay(&["--vxlan-port", "4790"], vx)
        .iter()
        .all(|k| k["proto"] == "udp"));
    let gre = caps.iter().find(|c| c.name == "gre").unwrap();
    let out = flowprobe(&["replay", "--no-decap", path(gre).to_str().unwrap()]);
    assert!(stderr(&out).contains("12 other_l4"), "{}", stderr(&out));
}

#[test]
fn malformed_encapsulations_are_skipped_by_reason() {
    for (i, (reason, frame)) in encap::malformed().iter().enumerate() {
        let got = parse_frame(&frame[..], LinkType::Ethernet, frame.len() as u32);
        assert_eq!(
            got.map_err(|e| e.name()),
            Err(*reason),
            "malformed frame {i}"
        );
    }
    let caps = encap::captures();
    let bad = caps.iter().find(|c| c.name == "malformed").unwrap();
    let out = flowprobe(&["replay", path(bad).to_str().unwrap()]);
    let err = stderr(&out);
    for want in [
        "1 truncated_tunnel",
        "4 bad_tunnel",
        "2 tunnel_nested",
        "1 mpls_no_bottom",
        "1 bad_l2",
        "1 too_many_headers",
    ] {
        assert!(err.contains(want), "{want} in {err}");
    }
    assert!(err.contains("0 connections"), "{err}");
}

/// etherparse reads the packet at the offset where the parser found the
/// inner IP header as the parser did: the same 5-tuple and payload length.
#[test]
fn etherparse_reads_the_inner_packet_alike() {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let mut checked = 0;
    for c in encap::captures().iter().filter(|c| c.conns > 0) {
        for (i, f) in c.frames.iter().enumerate() {
            let ours = parse_frame(&f[..], link(c), f.len() as u32)
                .unwrap_or_else(|e| panic!("{} frame {i}: {}", c.name, e.name()));
            let theirs = SlicedPacket::from_ip(&f[ours.l3_offset as usize..])
                .unwrap_or_else(|e| panic!("{} frame {i}: etherparse: {e}", c.name));
            let (src, dst) = match theirs.net.as_ref().unwrap() {
                NetSlice::Ipv4(v4) => (
                    std::net::IpAddr::from(v4.header().source_addr()),
                    std::net::IpAddr::from(v4.header().destination_addr()),
                ),
                NetSlice::Ipv6(v6) => (
                    std::net::IpAddr::from(v6.header().source_addr()),
                    std::net::IpAddr::from(v6.header().destination_addr()),
                ),
                other => panic!("{other:?}"),
            };
            let ip = |a: &[u8; 16], fam: u8| -> std::net::IpAddr {
                if fam == 4 {
                    std::net::IpAddr::from([a[12], a[13], a[14], a[15]])
                } else {
                    std::net::IpAddr::from(*a)
                }
            };
            assert_eq!(
                (
                    ip(&ours.key.src, ours.key.family),
                    ip(&ours.key.dst, ours.key.family)
                ),
                (src, dst)
            );
            let Some(TransportSlice::Tcp(t)) = theirs.transport.as_ref() else {
                panic!("{} frame {i}: not TCP to etherparse", c.name);
            };
            assert_eq!(
                (ours.key.sport, ours.key.dport),
                (t.source_port(), t.destination_port())
            );
            assert_eq!(ours.payload_len as usize, t.payload().len());
            assert_eq!(ours.tcp.seq, t.sequence_number());
            checked += 1;
        }
    }
    assert!(checked > 100, "{checked}");
}

/// Per inner direction (TCP ports), what tshark decodes: frames, `tcp.len`
/// summed, frames it flags as retransmissions.
fn tshark_sums(p: &std::path::Path) -> Option<BTreeMap<(u64, u64), [u64; 3]>> {
    let out = match Command::new("tshark")
        .args([
            "-n",
            "-r",
            p.to_str().unwrap(),
            "-T",
            "fields",
            "-E",
            "separator=;",
        ])
        .args([
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "tcp.len",
            "-e",
            "tcp.analysis.retransmission",
        ])
        .output()
    {
        Ok(o) => o,
        Err(e) if e.kind() == ErrorKind::NotFound => return None,
        Err(e) => panic!("tshark: {e}"),
    };
    assert!(
        out.status.success(),
        "tshark: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut sums: BTreeMap<(u64, u64), [u64; 3]> = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let f: Vec<&str> = line.split(';').collect();
        if f[0].is_empty() {
            continue;
        }
        let n = |s: &str| s.parse::<u64>().unwrap();
        let e = sums.entry((n(f[0]), n(f[1]))).or_default();
        e[0] += 1;
        e[1] += n(f[2]);
        e[2] += u64::from(!f[3].is_empty());
    }
    Some(sums)
}

#[test]
fn tshark_agrees_per_inner_direction() {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    for c in encap::captures().iter().filter(|c| c.conns > 0) {
        let Some(theirs) = tshark_sums(&path(c)) else {
            assert!(!ci, "tshark missing (CI=true)");
            eprintln!("tshark_agrees_per_inner_direction: skipped (no tshark)");
            return;
        };
        let mut ours: BTreeMap<(u64, u64), [u64; 3]> = BTreeMap::new();
        for k in replay(&[], c) {
            let (sp, dp) = (k["sport"].as_u64().unwrap(), k["dport"].as_u64().unwrap());
            for (key, d) in [((sp, dp), &k["sent"]), ((dp, sp), &k["received"])] {
                let e = ours.entry(key).or_default();
                e[0] += d["packets"].as_u64().unwrap();
                e[1] += d["bytes"].as_u64().unwrap();
                e[2] += d["retransmits"].as_u64().unwrap();
            }
        }
        if c.conns > 1 {
            // tshark joins the networks' copies of one 5-tuple into one
            // stream, so it calls every second copy a retransmission:
            // only frames and bytes compare.
            for v in ours.values_mut().chain(theirs.clone().values_mut()) {
                v[2] = 0;
            }
            let theirs: BTreeMap<_, _> = theirs
                .into_iter()
                .map(|(k, v)| (k, [v[0], v[1], 0]))
                .collect();
            assert_eq!(ours, theirs, "{}", c.name);
        } else {
            assert_eq!(ours, theirs, "{}", c.name);
        }
    }
}

/// Every generated frame cut at every length, and with each of its first
/// 160 bytes replaced by 0x00, 0xff and its bit-flip: the parser never
/// panics, and what it accepts lies inside the bytes it was given (a
/// deterministic sweep over the encapsulations beside the proptest fuzzing
/// in `probe-common/tests/oracle.rs`).
#[test]
fn mangled_encapsulations_never_panic() {
    let mut parsed = 0usize;
    let mut check = |f: &[u8], link: LinkType| {
        if let Ok(p) = parse_frame(f, link, f.len() as u32) {
            assert!((p.l3_offset as usize) < f.len());
            parsed += 1;
        }
    };
    let caps = encap::captures();
    for c in &caps {
        for f in &c.frames {
            for n in 0..f.len() {
                check(&f[..n], link(c));
            }
            for i in 0..f.len().min(160) {
                for v in [0u8, 0xff, !f[i]] {
                    let mut g = f.clone();
                    g[i] = v;
                    check(&g, link(c));
                }
            }
        }
    }
    assert!(parsed > 1000, "{parsed}");
}
