//! The generator of `fixtures/tunnels/`: one short TCP conversation with a
//! retransmission, known to the byte, wrapped in each encapsulation the
//! parser reads (docs/tunnels.md), and a capture of malformed ones.
//!
//! The inner packets are built by `etherparse` (a third party's IP and TCP
//! headers and checksums); the outer headers are written here, field by
//! field, from the RFCs. `tests/tunnels.rs` checks that the committed
//! captures are exactly what this writes (`UPDATE_EXPECT=1` rewrites
//! them), then holds `flowprobe replay` of each to its golden, to the
//! conversation's known counts and to tshark; `tests/live_tc/test_run.rs`
//! pushes the Ethernet ones through the kernel program.

use etherparse::PacketBuilder;

/// pcap link types.
pub const LINKTYPE_ETHERNET: u32 = 1;
pub const LINKTYPE_NFLOG: u32 = 239;

const ETH_IPV4: u16 = 0x0800;
const ETH_IPV6: u16 = 0x86dd;
const ETH_TEB: u16 = 0x6558;

/// The inner conversation's ends.
pub const C4: [u8; 4] = [10, 1, 0, 1];
pub const S4: [u8; 4] = [10, 2, 0, 2];
pub const C6: [u8; 16] = [0xfd, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const S6: [u8; 16] = [0xfd, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const CPORT: u16 = 40000;
pub const SPORT: u16 = 80;
/// The tunnel endpoints: the client's side, then the server's.
pub const A4: [u8; 4] = [192, 0, 2, 1];
pub const B4: [u8; 4] = [192, 0, 2, 2];
pub const A6: [u8; 16] = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
pub const B6: [u8; 16] = [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// What the conversation carries, as the sockets would report it: the
/// client wrote 300 bytes (100 + 200, the 200 sent twice), the server 300.
pub const CLIENT_WROTE: u64 = 300;
pub const SERVER_WROTE: u64 = 300;
pub const CLIENT_RETRANS: u64 = 1;
pub const CLIENT_RETRANS_BYTES: u64 = 200;
/// Segments each way (SYN, handshake ACK, data, ACKs, FIN).
pub const CLIENT_PACKETS: u64 = 8;
pub const SERVER_PACKETS: u64 = 4;

/// One segment of the conversation: from the client?, flags, seq, ack,
/// payload length.
struct Seg {
    c2s: bool,
    syn: bool,
    ack: bool,
    fin: bool,
    seq: u32,
    ack_no: u32,
    len: usize,
}

const fn has(f: &[u8], c: u8) -> bool {
    let mut i = 0;
    while i < f.len() {
        if f[i] == c {
            return true;
        }
        i += 1;
    }
    false
}

const fn seg(c2s: bool, flags: &str, seq: u32, ack_no: u32, len: usize) -> Seg {
    let f = flags.as_bytes();
    Seg {
        c2s,
        syn: has(f, b'S'),
        ack: has(f, b'A'),
        fin: has(f, b'F'),
        seq,
        ack_no,
        len,
    }
}

/// SYN, SYN/ACK, ACK; 100 and 200 bytes from the client, the 200 sent
/// again after a partial ACK; 300 bytes back; FIN each way.
const CONVERSATION: [Seg; 12] = [
    seg(true, "S", 1000, 0, 0),
    seg(false, "SA", 5000, 1001, 0),
    seg(true, "A", 1001, 5001, 0),
    seg(true, "A", 1001, 5001, 100),
    seg(true, "A", 1101, 5001, 200),
    seg(false, "A", 5001, 1101, 0),
    seg(true, "A", 1101, 5001, 200),
    seg(false, "A", 5001, 1301, 300),
    seg(true, "A", 1301, 5301, 0),
    seg(true, "FA", 1301, 5301, 0),
    seg(false, "FA", 5301, 1302, 0),
    seg(true, "A", 1302, 5302, 0),
];

/// The inner IP packet of segment `s` (IPv4 or IPv6), by etherparse.
fn inner_ip(s: &Seg, v6: bool) -> Vec<u8> {
    let payload: Vec<u8> = (0..s.len).map(|i| (s.seq as usize + i) as u8).collect();
    let (sp, dp) = if s.c2s {
        (CPORT, SPORT)
    } else {
        (SPORT, CPORT)
    };
    let b = if v6 {
        let (src, dst) = if s.c2s { (C6, S6) } else { (S6, C6) };
        PacketBuilder::ipv6(src, dst, 64).tcp(sp, dp, s.seq, 64240)
    } else {
        let (src, dst) = if s.c2s { (C4, S4) } else { (S4, C4) };
        PacketBuilder::ipv4(src, dst, 64).tcp(sp, dp, s.seq, 64240)
    };
    let b = if s.syn { b.syn() } else { b };
    let b = if s.fin { b.fin() } else { b };
    let b = if s.ack { b.ack(s.ack_no) } else { b };
    let b = if s.len > 0 { b.psh() } else { b };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload)
        .expect("etherparse writes into a Vec");
    out
}

/// The Internet checksum (RFC 1071) of `parts` concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for p in parts {
        for &b in *p {
            match odd.take() {
                Some(h) => sum += u16::from_be_bytes([h, b]) as u32,
                None => odd = Some(b),
            }
        }
    }
    if let Some(h) = odd {
        sum += u16::from_be_bytes([h, 0]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(ethertype: u16, c2s: bool) -> Vec<u8> {
    let (a, b) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let (dst, src) = if c2s { (b, a) } else { (a, b) };
    [&dst[..], &src[..], &ethertype.to_be_bytes()].concat()
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = checksum(&[&h]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    [h, payload.to_vec()].concat()
}

fn ipv6(src: [u8; 16], dst: [u8; 16], next: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[next, 64]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    [h, payload.to_vec()].concat()
}

/// An outer IP packet between the tunnel endpoints, in the segment's
/// direction.
fn outer_ip(v6: bool, c2s: bool, proto: u8, payload: &[u8]) -> Vec<u8> {
    if v6 {
        let (s, d) = if c2s { (A6, B6) } else { (B6, A6) };
        ipv6(s, d, proto, payload)
    } else {
        let (s, d) = if c2s { (A4, B4) } else { (B4, A4) };
        ipv4(s, d, proto, payload)
    }
}

/// A UDP datagram inside an outer IP packet; the checksum is computed
/// (over the IPv6 or IPv4 pseudo-header).
fn outer_udp(v6: bool, c2s: bool, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    let c = if v6 {
        let (s, d) = if c2s { (A6, B6) } else { (B6, A6) };
        let pseudo = [&s[..], &d[..], &(len as u32).to_be_bytes(), &[0, 0, 0, 17]].concat();
        checksum(&[&pseudo, &u, payload])
    } else {
        let (s, d) = if c2s { (A4, B4) } else { (B4, A4) };
        let pseudo = [&s[..], &d[..], &[0, 17], &len.to_be_bytes()].concat();
        checksum(&[&pseudo, &u, payload])
    };
    let c = if c == 0 { 0xffff } else { c };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    outer_ip(v6, c2s, 17, &[u, payload.to_vec()].concat())
}

/// A GRE header (version 0) with the optional checksum (computed), key and
/// sequence number, then `payload`.
fn gre(proto: u16, csum: bool, key: Option<u32>, seq: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let mut flags: u16 = 0;
    if csum {
        flags |= 0x8000;
    }
    if key.is_some() {
        flags |= 0x2000;
    }
    if seq.is_some() {
        flags |= 0x1000;
    }
    let mut g = Vec::new();
    g.extend_from_slice(&flags.to_be_bytes());
    g.extend_from_slice(&proto.to_be_bytes());
    if csum {
        g.extend_from_slice(&[0, 0, 0, 0]);
    }
    if let Some(k) = key {
        g.extend_from_slice(&k.to_be_bytes());
    }
    if let Some(s) = seq {
        g.extend_from_slice(&s.to_be_bytes());
    }
    if csum {
        let c = checksum(&[&g, payload]);
        g[4..6].copy_from_slice(&c.to_be_bytes());
    }
    [g, payload.to_vec()].concat()
}

fn vxlan(vni: u32, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x08, 0, 0, 0];
    h.extend_from_slice(&(vni << 8).to_be_bytes());
    [h, payload.to_vec()].concat()
}

/// A Geneve header with `opts` (a multiple of 4 bytes) before `payload`.
fn geneve(vni: u32, proto: u16, opts: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut h = vec![(opts.len() / 4) as u8, 0];
    h.extend_from_slice(&proto.to_be_bytes());
    h.extend_from_slice(&(vni << 8).to_be_bytes());
    [h, opts.to_vec(), payload.to_vec()].concat()
}

/// 802.1Q/802.1ad tags: (TPID, VLAN id) outermost first, then `ethertype`.
fn vlan_tags(tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    // Ethernet's type field holds the first TPID; each tag is its TCI and
    // the next type.
    for (i, (_, id)) in tags.iter().enumerate() {
        out.extend_from_slice(&id.to_be_bytes());
        let next = tags.get(i + 1).map_or(ethertype, |t| t.0);
        out.extend_from_slice(&next.to_be_bytes());
    }
    out
}

fn mpls(labels: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        let bos = u32::from(i + 1 == labels.len());
        out.extend_from_slice(&(l << 12 | bos << 8 | 64).to_be_bytes());
    }
    [out, payload.to_vec()].concat()
}

fn pppoe(session: u16, ppp_proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x11, 0];
    h.extend_from_slice(&session.to_be_bytes());
    h.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    h.extend_from_slice(&ppp_proto.to_be_bytes());
    [h, payload.to_vec()].concat()
}

/// `LINKTYPE_NFLOG`: header (AF_INET, version 0, resource id 5), a prefix
/// attribute, then the payload attribute (type 9); little-endian TLVs.
fn nflog(ip: &[u8]) -> Vec<u8> {
    let mut out = vec![2, 0, 0, 5];
    let prefix = b"fp\0";
    let tlv = |out: &mut Vec<u8>, kind: u16, v: &[u8]| {
        out.extend_from_slice(&((4 + v.len()) as u16).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(v);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    tlv(&mut out, 10, prefix);
    tlv(&mut out, 9, ip);
    out
}

/// One capture: its name, link type and frames.
pub struct Capture {
    pub name: &'static str,
    pub link: u32,
    pub frames: Vec<Vec<u8>>,
    /// Inner connections it holds (tunnels carrying the same 5-tuple are
    /// several) and the tags each carries.
    pub conns: usize,
}

/// Every encapsulation's capture, then `malformed`.
pub fn captures() -> Vec<Capture> {
    let conv = |v6: bool, wrap: &dyn Fn(&[u8], bool) -> Vec<u8>| -> Vec<Vec<u8>> {
        CONVERSATION
            .iter()
            .map(|s| wrap(&inner_ip(s, v6), s.c2s))
            .collect()
    };
    let eth_ip =
        |ethertype: u16, c2s: bool, rest: &[u8]| [eth(ethertype, c2s), rest.to_vec()].concat();
    let inner_eth = |ip: &[u8], c2s: bool| [eth(ETH_IPV4, c2s), ip.to_vec()].concat();
    let mut caps = vec![
        Capture {
            name: "vlan4",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                let tags = vlan_tags(
                    &[(0x88a8, 10), (0x8100, 20), (0x8100, 30), (0x8100, 40)],
                    ETH_IPV4,
                );
                eth_ip(0x88a8, c2s, &[tags, ip.to_vec()].concat())
            }),
            conns: 1,
        },
        Capture {
            name: "qinq_pppoe",
            link: LINKTYPE_ETHERNET,
            frames: conv(true, &|ip, c2s| {
                let tags = vlan_tags(&[(0x88a8, 100), (0x8100, 200)], 0x8864);
                eth_ip(0x88a8, c2s, &[tags, pppoe(0x1234, 0x0057, ip)].concat())
            }),
            conns: 1,
        },
        Capture {
            name: "mpls",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                eth_ip(0x8847, c2s, &mpls(&[1000, 2000, 3000], ip))
            }),
            conns: 1,
        },
        Capture {
            name: "mpls6",
            link: LINKTYPE_ETHERNET,
            frames: conv(true, &|ip, c2s| eth_ip(0x8847, c2s, &mpls(&[16], ip))),
            conns: 1,
        },
        Capture {
            name: "llc_snap",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                let snap = [0xaa, 0xaa, 0x03, 0, 0, 0, 0x08, 0x00];
                let len = (snap.len() + ip.len()) as u16;
                eth_ip(len, c2s, &[&snap[..], ip].concat())
            }),
            conns: 1,
        },
        Capture {
            name: "nflog",
            link: LINKTYPE_NFLOG,
            frames: conv(false, &|ip, _| nflog(ip)),
            conns: 1,
        },
        Capture {
            name: "gre",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                let g = gre(ETH_IPV4, true, Some(1234), Some(7), ip);
                eth_ip(ETH_IPV4, c2s, &outer_ip(false, c2s, 47, &g))
            }),
            conns: 1,
        },
        Capture {
            name: "gretap",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                let g = gre(ETH_TEB, false, Some(77), None, &inner_eth(ip, c2s));
                eth_ip(ETH_IPV4, c2s, &outer_ip(false, c2s, 47, &g))
            }),
            conns: 1,
        },
        Capture {
            name: "ipip",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                eth_ip(ETH_IPV4, c2s, &outer_ip(false, c2s, 4, ip))
            }),
            conns: 1,
        },
        Capture {
            name: "sit",
            link: LINKTYPE_ETHERNET,
            frames: conv(true, &|ip, c2s| {
                eth_ip(ETH_IPV4, c2s, &outer_ip(false, c2s, 41, ip))
            }),
            conns: 1,
        },
        Capture {
            name: "ip4in6",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                eth_ip(ETH_IPV6, c2s, &outer_ip(true, c2s, 4, ip))
            }),
            conns: 1,
        },
        Capture {
            name: "ip6in6",
            link: LINKTYPE_ETHERNET,
            frames: conv(true, &|ip, c2s| {
                eth_ip(ETH_IPV6, c2s, &outer_ip(true, c2s, 41, ip))
            }),
            conns: 1,
        },
        Capture {
            name: "geneve6",
            link: LINKTYPE_ETHERNET,
            frames: conv(false, &|ip, c2s| {
                // One option: class 0x0102, type 0x80, 4 bytes of data.
                let opts = [0x01, 0x02, 0x80, 0x01, 0xde, 0xad, 0xbe, 0xef];
                let g = geneve(0xabcde, ETH_TEB, &opts, &inner_eth(ip, c2s));
                eth_ip(ETH_IPV6, c2s, &outer_udp(true, c2s, 51000, 6081, &g))
            }),
            conns: 1,
        },
    ];
    // Two VXLAN networks carrying the same inner 5-tuple, interleaved:
    // two connections.
    let vx = |vni: u32| {
        conv(false, &move |ip: &[u8], c2s| {
            let v = vxlan(vni, &inner_eth(ip, c2s));
            eth_ip(
                ETH_IPV4,
                c2s,
                &outer_udp(false, c2s, 50000 + vni as u16, 4789, &v),
            )
        })
    };
    let (a, b) = (vx(42), vx(43));
    caps.push(Capture {
        name: "vxlan_two_vnis",
        link: LINKTYPE_ETHERNET,
        frames: a.into_iter().zip(b).flat_map(|(x, y)| [x, y]).collect(),
        conns: 2,
    });
    caps.push(Capture {
        name: "malformed",
        link: LINKTYPE_ETHERNET,
        frames: malformed().into_iter().map(|(_, f)| f).collect(),
        conns: 0,
    });
    caps
}

/// Malformed encapsulations, one frame each, with the skip reason the
/// parser must give it.
pub fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let ip = inner_ip(&CONVERSATION[3], false);
    let ip6 = inner_ip(&CONVERSATION[3], true);
    let inner_eth = [eth(ETH_IPV4, true), ip.clone()].concat();
    let eth_ip = |ethertype: u16, rest: &[u8]| [eth(ethertype, true), rest.to_vec()].concat();
    let vx = vxlan(42, &inner_eth);
    let mut gre_v1 = gre(ETH_IPV4, false, None, None, &ip);
    gre_v1[1] |= 1;
    let mut gre_routing = gre(ETH_IPV4, false, None, None, &ip);
    gre_routing[0] |= 0x40;
    let mut vx_no_i = vx.clone();
    vx_no_i[0] = 0;
    let mut geneve_v1 = geneve(1, ETH_TEB, &[], &inner_eth);
    geneve_v1[0] |= 0x40;
    let vx_outer = eth_ip(ETH_IPV4, &outer_udp(false, true, 50000, 4789, &vx));
    // Cut inside the VXLAN header: 14 + 20 + 8 + 4 bytes.
    let vx_cut = vx_outer[..14 + 20 + 8 + 4].to_vec();
    let nested = {
        let inner_vx = outer_udp(false, true, 50001, 4789, &vx);
        let outer = vxlan(7, &[eth(ETH_IPV4, true), inner_vx].concat());
        eth_ip(ETH_IPV4, &outer_udp(false, true, 50000, 4789, &outer))
    };
    let nine_labels: Vec<u32> = (1..=9).collect();
    let mut no_bottom = mpls(&nine_labels, &ip);
    // Clear the bottom-of-stack bit of the ninth label: none has it.
    no_bottom[8 * 4 + 2] &= !1;
    let mut bad_pppoe = pppoe(1, 0x0021, &ip);
    bad_pppoe[0] = 0x21;
    let five_tags = vlan_tags(
        &[
            (0x8100, 1),
            (0x8100, 2),
            (0x8100, 3),
            (0x8100, 4),
            (0x8100, 5),
        ],
        ETH_IPV4,
    );
    vec![
        ("truncated_tunnel", vx_cut),
        (
            "bad_tunnel",
            eth_ip(ETH_IPV4, &outer_ip(false, true, 47, &gre_v1)),
        ),
        (
            "bad_tunnel",
            eth_ip(ETH_IPV4, &outer_ip(false, true, 47, &gre_routing)),
        ),
        (
            "bad_tunnel",
            eth_ip(ETH_IPV4, &outer_udp(false, true, 50000, 4789, &vx_no_i)),
        ),
        (
            "bad_tunnel",
            eth_ip(ETH_IPV6, &outer_udp(true, true, 50000, 6081, &geneve_v1)),
        ),
        ("tunnel_nested", nested),
        (
            "tunnel_nested",
            eth_ip(
                ETH_IPV4,
                &outer_ip(false, true, 4, &outer_ip(false, true, 41, &ip6)),
            ),
        ),
        ("mpls_no_bottom", eth_ip(0x8847, &no_bottom)),
        ("bad_l2", eth_ip(0x8864, &bad_pppoe)),
        (
            "too_many_headers",
            eth_ip(0x8100, &[five_tags, ip.clone()].concat()),
        ),
    ]
}

/// `frames` as a little-endian pcap of link type `link`, one frame a
/// millisecond from a fixed time.
pub fn pcap(link: u32, frames: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&link.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        let us = 1_700_000_000_000_000u64 + i as u64 * 1000;
        out.extend_from_slice(&((us / 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&((us % 1_000_000) as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}
