//! Parser edge cases. Frames are assembled here byte by byte (not with the
//! parser's own code), so every expected value is visible in the test.

use probe_common::parse::{tcp_flags, LinkType, ParseError, Parsed};
use probe_common::{key::v4_mapped, parse_frame};

const MAC: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
const A4: [u8; 4] = [10, 77, 0, 1];
const B4: [u8; 4] = [10, 77, 0, 2];
const A6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

fn tcp_hdr(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, doff_words: u8) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(seq.to_be_bytes());
    h.extend(ack.to_be_bytes());
    h.push(doff_words << 4);
    h.push(flags);
    h.extend(4096u16.to_be_bytes()); // window
    h.extend([0, 0, 0, 0]); // checksum, urgent
    h.resize(doff_words.max(5) as usize * 4, 1); // options: NOPs
    h
}

fn udp_hdr(sport: u16, dport: u16, payload: usize) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(sport.to_be_bytes());
    h.extend(dport.to_be_bytes());
    h.extend(((payload + 8) as u16).to_be_bytes());
    h.extend([0, 0]);
    h
}

/// IPv4 header with `opt_words` 32-bit option words and a fragment field.
fn ipv4(proto: u8, l4: &[u8], payload: usize, opt_words: u8, frag: u16) -> Vec<u8> {
    let ihl = 5 + opt_words;
    let tot = ihl as usize * 4 + l4.len() + payload;
    let mut h = vec![0x40 | ihl, 0];
    h.extend((tot as u16).to_be_bytes());
    h.extend([0, 1]);
    h.extend(frag.to_be_bytes());
    h.extend([64, proto, 0, 0]);
    h.extend(A4);
    h.extend(B4);
    h.resize(ihl as usize * 4, 1);
    h.extend(l4);
    h.extend(std::iter::repeat_n(0xab, payload));
    h
}

/// IPv6 with extension headers given as (next-header number, bytes).
fn ipv6(exts: &[(u8, Vec<u8>)], proto: u8, l4: &[u8], payload: usize) -> Vec<u8> {
    let ext_len: usize = exts.iter().map(|(_, e)| e.len()).sum();
    let plen = ext_len + l4.len() + payload;
    let first = exts.first().map(|(n, _)| *n).unwrap_or(proto);
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((plen as u16).to_be_bytes());
    h.extend([first, 64]);
    h.extend(A6);
    h.extend(B6);
    for (i, (_, e)) in exts.iter().enumerate() {
        let next = exts.get(i + 1).map(|(n, _)| *n).unwrap_or(proto);
        let mut e = e.clone();
        e[0] = next;
        h.extend(e);
    }
    h.extend(l4);
    h.extend(std::iter::repeat_n(0xcd, payload));
    h
}

/// A generic extension header of `units` 8-byte units (HBH, routing, dest).
fn ext8(units: u8) -> Vec<u8> {
    let mut e = vec![0, units - 1];
    e.resize(units as usize * 8, 0);
    e
}

fn frag_ext(offset_units: u16, more: bool) -> Vec<u8> {
    let v = (offset_units << 3) | more as u16;
    let mut e = vec![0, 0];
    e.extend(v.to_be_bytes());
    e.extend([0, 0, 0, 7]);
    e
}

fn eth(ethertype: u16, vlans: &[u16], l3: &[u8]) -> Vec<u8> {
    let mut f = MAC.to_vec();
    for tpid in vlans {
        f.extend(tpid.to_be_bytes());
        f.extend(100u16.to_be_bytes());
    }
    f.extend(ethertype.to_be_bytes());
    f.extend(l3);
    f
}

fn parse(frame: &[u8]) -> Result<Parsed, ParseError> {
    parse_frame(frame, LinkType::Ethernet, frame.len() as u32)
}

fn tcp4(payload: usize) -> Vec<u8> {
    eth(
        0x0800,
        &[],
        &ipv4(
            6,
            &tcp_hdr(40000, 5001, 7, 9, tcp_flags::ACK, 5),
            payload,
            0,
            0,
        ),
    )
}

#[test]
fn ipv4_tcp_fields() {
    let p = parse(&tcp4(100)).unwrap();
    assert_eq!(p.key.src, v4_mapped(A4));
    assert_eq!(p.key.dst, v4_mapped(B4));
    assert_eq!(
        (p.key.sport, p.key.dport, p.key.proto, p.key.family),
        (40000, 5001, 6, 4)
    );
    assert_eq!(
        (p.tcp.seq, p.tcp.ack, p.tcp.flags, p.tcp.window),
        (7, 9, tcp_flags::ACK, 4096)
    );
    assert_eq!((p.payload_len, p.l3_len, p.l3_offset), (100, 140, 14));
}

#[test]
fn ethernet_padding_is_not_payload() {
    // A pure ACK is 54 bytes; Ethernet pads it to 60.
    let mut f = tcp4(0);
    f.resize(60, 0);
    assert_eq!(parse(&f).unwrap().payload_len, 0);
}

#[test]
fn snaplen_cut_frame_keeps_ip_lengths() {
    let f = tcp4(1448);
    let cut = &f[..128];
    let p = parse_frame(cut, LinkType::Ethernet, f.len() as u32).unwrap();
    assert_eq!((p.payload_len, p.l3_len), (1448, 1488));
}

#[test]
fn truncation_names_the_layer() {
    let f = tcp4(0);
    assert_eq!(parse(&f[..13]), Err(ParseError::TruncatedL2));
    assert_eq!(parse(&f[..14 + 19]), Err(ParseError::TruncatedL3));
    assert_eq!(parse(&f[..14 + 20 + 15]), Err(ParseError::TruncatedL4));
    // 16 bytes of TCP header are all the tracker needs.
    assert!(parse(&f[..14 + 20 + 16]).is_ok());
}

#[test]
fn tcp_options_are_skipped_by_data_offset() {
    let f = eth(
        0x0800,
        &[],
        &ipv4(6, &tcp_hdr(1, 2, 0, 0, tcp_flags::SYN, 10), 0, 0, 0),
    );
    assert_eq!(parse(&f).unwrap().payload_len, 0);
    let f = eth(
        0x0800,
        &[],
        &ipv4(6, &tcp_hdr(1, 2, 0, 0, tcp_flags::ACK, 8), 30, 0, 0),
    );
    assert_eq!(parse(&f).unwrap().payload_len, 30);
}

#[test]
fn bad_tcp_data_offset() {
    let f = eth(0x0800, &[], &ipv4(6, &tcp_hdr(1, 2, 0, 0, 0, 4), 10, 0, 0));
    assert_eq!(parse(&f), Err(ParseError::BadL4));
    // data offset points past the IP packet's end
    let mut l4 = tcp_hdr(1, 2, 0, 0, 0, 5);
    l4[12] = 15 << 4;
    let f = eth(0x0800, &[], &ipv4(6, &l4, 10, 0, 0));
    assert_eq!(parse(&f), Err(ParseError::BadL4));
}

#[test]
fn ipv4_options() {
    let f = eth(0x0800, &[], &ipv4(6, &tcp_hdr(1, 2, 0, 0, 0, 5), 50, 3, 0));
    let p = parse(&f).unwrap();
    assert_eq!((p.payload_len, p.l3_len), (50, 32 + 20 + 50));
}

#[test]
fn ipv4_inconsistent_headers() {
    let mut f = tcp4(10);
    f[14] = 0x44; // ihl 4 < 5
    assert_eq!(parse(&f), Err(ParseError::BadL3));
    let mut f = tcp4(10);
    f[14] = 0x65; // version 6 behind ethertype 0x0800
    assert_eq!(parse(&f), Err(ParseError::BadL3));
    let mut f = tcp4(10);
    f[16..18].copy_from_slice(&10u16.to_be_bytes()); // tot_len < ihl
    assert_eq!(parse(&f), Err(ParseError::BadL3));
}

#[test]
fn ipv4_big_tcp_takes_length_from_the_frame() {
    let mut f = tcp4(1000);
    f[16..18].copy_from_slice(&0u16.to_be_bytes());
    let p = parse(&f).unwrap();
    assert_eq!((p.payload_len, p.l3_len), (1000, 1040));
}

#[test]
fn ipv4_fragments() {
    // non-first fragment: no ports, counted not parsed
    let f = eth(0x0800, &[], &ipv4(17, &[], 200, 0, 185));
    assert_eq!(parse(&f), Err(ParseError::Fragment));
    // first fragment (MF): UDP length covers the whole datagram
    let mut l4 = udp_hdr(53, 5353, 3000);
    l4.truncate(8);
    let f = eth(0x0800, &[], &ipv4(17, &l4, 1472, 0, 0x2000));
    let p = parse(&f).unwrap();
    assert_eq!((p.payload_len, p.l3_len), (3000, 1500));
}

#[test]
fn vlan_and_qinq_tags() {
    let l3 = ipv4(6, &tcp_hdr(1, 2, 0, 0, 0, 5), 10, 0, 0);
    for tags in [
        &[][..],
        &[0x8100],
        &[0x88a8, 0x8100],
        &[0x9100, 0x8100],
        &[0x88a8, 0x8100, 0x8100],
        &[0x88a8, 0x8100, 0x8100, 0x8100],
    ] {
        let p = parse(&eth(0x0800, tags, &l3)).unwrap();
        assert_eq!(
            (p.payload_len, p.l3_offset as usize),
            (10, 14 + 4 * tags.len())
        );
    }
    // MAX_VLAN_TAGS is 4.
    assert_eq!(
        parse(&eth(0x0800, &[0x88a8, 0x8100, 0x8100, 0x8100, 0x8100], &l3)),
        Err(ParseError::TooManyHeaders)
    );
    assert_eq!(
        parse(&eth(0x0800, &[0x8100], &[])[..17]),
        Err(ParseError::TruncatedL2)
    );
}

#[test]
fn not_ip_and_other_protocols() {
    assert_eq!(parse(&eth(0x0806, &[], &[0; 28])), Err(ParseError::NotIp));
    let icmp = eth(0x0800, &[], &ipv4(1, &[8, 0, 0, 0, 0, 1, 0, 1], 0, 0, 0));
    assert_eq!(parse(&icmp), Err(ParseError::OtherL4));
}

#[test]
fn ipv6_tcp_and_udp() {
    let f = eth(
        0x86dd,
        &[],
        &ipv6(&[], 6, &tcp_hdr(443, 50000, 1, 2, tcp_flags::ACK, 8), 77),
    );
    let p = parse(&f).unwrap();
    assert_eq!((p.key.src, p.key.dst, p.key.family), (A6, B6, 6));
    assert_eq!((p.payload_len, p.l3_len), (77, 40 + 32 + 77));
    let f = eth(0x86dd, &[], &ipv6(&[], 17, &udp_hdr(53, 5353, 9), 9));
    assert_eq!(parse(&f).unwrap().payload_len, 9);
}

#[test]
fn ipv6_extension_headers() {
    let exts = vec![
        (0, ext8(1)),
        (60, ext8(2)),
        (44, frag_ext(0, false)),
        (43, ext8(3)),
    ];
    let f = eth(0x86dd, &[], &ipv6(&exts, 6, &tcp_hdr(1, 2, 0, 0, 0, 5), 33));
    let p = parse(&f).unwrap();
    assert_eq!(
        (p.payload_len, p.l3_len),
        (33, 40 + 8 + 16 + 8 + 24 + 20 + 33)
    );

    // AH: length in 4-byte units minus 2
    let mut ah = vec![0, 4];
    ah.resize(24, 0);
    let f = eth(0x86dd, &[], &ipv6(&[(51, ah)], 17, &udp_hdr(1, 2, 5), 5));
    assert_eq!(parse(&f).unwrap().payload_len, 5);
}

#[test]
fn ipv6_fragments_esp_and_limits() {
    let f = eth(
        0x86dd,
        &[],
        &ipv6(&[(44, frag_ext(100, false))], 6, &[], 100),
    );
    assert_eq!(parse(&f), Err(ParseError::Fragment));
    let f = eth(
        0x86dd,
        &[],
        &ipv6(&[(44, frag_ext(0, true))], 17, &udp_hdr(1, 2, 3000), 1000),
    );
    assert_eq!(parse(&f).unwrap().payload_len, 3000);
    let f = eth(0x86dd, &[], &ipv6(&[(50, vec![0; 16])], 6, &[], 0));
    assert_eq!(parse(&f), Err(ParseError::Ipv6NoTransport));
    let seven: Vec<(u8, Vec<u8>)> = (0..7).map(|_| (60, ext8(1))).collect();
    let f = eth(0x86dd, &[], &ipv6(&seven, 6, &tcp_hdr(1, 2, 0, 0, 0, 5), 0));
    assert_eq!(parse(&f), Err(ParseError::TooManyHeaders));
    let six: Vec<(u8, Vec<u8>)> = (0..6).map(|_| (60, ext8(1))).collect();
    let f = eth(0x86dd, &[], &ipv6(&six, 6, &tcp_hdr(1, 2, 0, 0, 0, 5), 0));
    assert!(parse(&f).is_ok());
    // extension header cut off by the snap length
    let exts = vec![(0, ext8(1)), (60, ext8(2))];
    let f = eth(0x86dd, &[], &ipv6(&exts, 6, &tcp_hdr(1, 2, 0, 0, 0, 5), 0));
    assert_eq!(
        parse_frame(&f[..14 + 40 + 10], LinkType::Ethernet, f.len() as u32),
        Err(ParseError::TruncatedL3)
    );
}

#[test]
fn every_link_type_gives_the_same_answer() {
    let l3 = ipv4(6, &tcp_hdr(40000, 5001, 7, 9, tcp_flags::ACK, 5), 100, 0, 0);
    let want = parse(&eth(0x0800, &[], &l3)).unwrap();
    let mut sll = vec![0, 4, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
    sll.extend(0x0800u16.to_be_bytes());
    sll.extend(&l3);
    let mut sll2 = 0x0800u16.to_be_bytes().to_vec();
    sll2.extend([0, 0, 0, 0, 0, 2, 0, 1, 4, 6, 2, 0, 0, 0, 0, 1, 0, 0]);
    sll2.extend(&l3);
    let mut null_le = 2u32.to_le_bytes().to_vec();
    null_le.extend(&l3);
    let mut loop_be = 2u32.to_be_bytes().to_vec();
    loop_be.extend(&l3);
    for (link, frame) in [
        (LinkType::RawIp, l3.clone()),
        (LinkType::LinuxSll, sll),
        (LinkType::LinuxSll2, sll2),
        (LinkType::Null, null_le),
        (LinkType::Null, loop_be),
    ] {
        let got = parse_frame(&frame[..], link, frame.len() as u32).unwrap();
        assert_eq!(
            (got.key, got.payload_len, got.l3_len, got.tcp),
            (want.key, 100, 140, want.tcp),
            "{link:?}"
        );
    }
    let v6 = ipv6(&[], 17, &udp_hdr(1, 2, 4), 4);
    let mut null6 = 30u32.to_le_bytes().to_vec();
    null6.extend(&v6);
    assert_eq!(
        parse_frame(&null6[..], LinkType::Null, 0)
            .unwrap()
            .key
            .family,
        6
    );
    assert_eq!(
        parse_frame(&v6[..], LinkType::RawIp, 0).unwrap().key.family,
        6
    );
    assert_eq!(
        parse_frame(&[0x50u8][..], LinkType::RawIp, 1),
        Err(ParseError::BadL3)
    );
}

#[test]
fn a_tunnel_digest_is_the_same_both_ways_and_tells_tunnels_apart() {
    use probe_common::parse::tunnel_id;
    use probe_common::TunnelKind;
    let (a, b, c) = ([1u8; 16], [2u8; 16], [3u8; 16]);
    let id = tunnel_id(TunnelKind::Vxlan, Some(42), &a, &b);
    assert_ne!(id, 0);
    assert_eq!(id, tunnel_id(TunnelKind::Vxlan, Some(42), &b, &a));
    for other in [
        tunnel_id(TunnelKind::Vxlan, Some(43), &a, &b),
        tunnel_id(TunnelKind::Geneve, Some(42), &a, &b),
        tunnel_id(TunnelKind::Vxlan, None, &a, &b),
        tunnel_id(TunnelKind::Vxlan, Some(42), &a, &c),
    ] {
        assert_ne!(id, other);
    }
}
