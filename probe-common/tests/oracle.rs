//! Differential test: on generated valid packets, our parser and etherparse
//! agree on addresses, ports, protocol, payload length and TCP fields; on
//! arbitrary bytes our parser never panics.

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use probe_common::key::v4_mapped;
use probe_common::parse::LinkType;
use probe_common::parse_frame;
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Spec {
    vlans: u8,
    v6: bool,
    src: [u8; 16],
    dst: [u8; 16],
    tcp: bool,
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    payload: Vec<u8>,
    padding: usize,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        (
            0u8..=2,
            any::<bool>(),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<bool>(),
        ),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u8>(),
            any::<u16>(),
        ),
        (proptest::collection::vec(any::<u8>(), 0..300), 0usize..40),
    )
        .prop_map(
            |(
                (vlans, v6, src, dst, tcp),
                (sport, dport, seq, ack, flags, window),
                (payload, padding),
            )| Spec {
                vlans,
                v6,
                src,
                dst,
                tcp,
                sport,
                dport,
                seq,
                ack,
                flags,
                window,
                payload,
                padding,
            },
        )
}

fn build(s: &Spec) -> Vec<u8> {
    let l2 = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let src4: [u8; 4] = s.src[..4].try_into().unwrap();
    let dst4: [u8; 4] = s.dst[..4].try_into().unwrap();
    // Each arm ends in a different builder type, hence the repetition.
    macro_rules! finish {
        ($ip:expr) => {{
            let mut out = Vec::new();
            if s.tcp {
                let mut b = $ip.tcp(s.sport, s.dport, s.seq, s.window);
                if s.flags & 0x01 != 0 {
                    b = b.fin();
                }
                if s.flags & 0x02 != 0 {
                    b = b.syn();
                }
                if s.flags & 0x04 != 0 {
                    b = b.rst();
                }
                if s.flags & 0x08 != 0 {
                    b = b.psh();
                }
                if s.flags & 0x10 != 0 {
                    b = b.ack(s.ack);
                }
                b.write(&mut out, &s.payload).unwrap();
            } else {
                $ip.udp(s.sport, s.dport)
                    .write(&mut out, &s.payload)
                    .unwrap();
            }
            out
        }};
    }
    let mut frame = match (s.vlans, s.v6) {
        (0, false) => finish!(l2.ipv4(src4, dst4, 64)),
        (0, true) => finish!(l2.ipv6(s.src, s.dst, 64)),
        (1, false) => finish!(l2.single_vlan(7.try_into().unwrap()).ipv4(src4, dst4, 64)),
        (1, true) => finish!(l2.single_vlan(7.try_into().unwrap()).ipv6(s.src, s.dst, 64)),
        (_, false) => finish!(l2
            .double_vlan(7.try_into().unwrap(), 9.try_into().unwrap())
            .ipv4(src4, dst4, 64)),
        (_, true) => finish!(l2
            .double_vlan(7.try_into().unwrap(), 9.try_into().unwrap())
            .ipv6(s.src, s.dst, 64)),
    };
    frame.extend(std::iter::repeat_n(0u8, s.padding));
    frame
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn agrees_with_etherparse(s in spec()) {
        let frame = build(&s);
        // etherparse opens no tunnel: compare the plain layers, with a UDP
        // port that happens to be VXLAN's or Geneve's read as plain UDP.
        let mut encap = probe_common::Encap::default();
        let ours = probe_common::parse_frame_ex(
            &frame[..],
            LinkType::Ethernet,
            frame.len() as u32,
            &probe_common::Decap::OFF,
            &mut encap,
        )
        .expect("valid packet");
        let theirs = SlicedPacket::from_ethernet(&frame).expect("etherparse accepts what it built");

        let (src, dst, family): ([u8; 16], [u8; 16], u8) = match theirs.net.as_ref().unwrap() {
            NetSlice::Ipv4(ip) => (
                v4_mapped(ip.header().source()),
                v4_mapped(ip.header().destination()),
                4,
            ),
            NetSlice::Ipv6(ip) => (ip.header().source(), ip.header().destination(), 6),
            NetSlice::Arp(_) => unreachable!(),
        };
        prop_assert_eq!((ours.key.src, ours.key.dst, ours.key.family), (src, dst, family));

        match theirs.transport.as_ref().unwrap() {
            TransportSlice::Tcp(t) => {
                prop_assert_eq!(ours.key.proto, 6);
                prop_assert_eq!((ours.key.sport, ours.key.dport), (t.source_port(), t.destination_port()));
                prop_assert_eq!(ours.payload_len as usize, t.payload().len());
                prop_assert_eq!((ours.tcp.seq, ours.tcp.window), (t.sequence_number(), t.window_size()));
                if t.ack() {
                    prop_assert_eq!(ours.tcp.ack, t.acknowledgment_number());
                }
                let flags = t.fin() as u8 | (t.syn() as u8) << 1 | (t.rst() as u8) << 2
                    | (t.psh() as u8) << 3 | (t.ack() as u8) << 4;
                prop_assert_eq!(ours.tcp.flags & 0x1f, flags);
            }
            TransportSlice::Udp(u) => {
                prop_assert_eq!(ours.key.proto, 17);
                prop_assert_eq!((ours.key.sport, ours.key.dport), (u.source_port(), u.destination_port()));
                prop_assert_eq!(ours.payload_len as usize, u.payload().len());
            }
            other => prop_assert!(false, "unexpected transport {other:?}"),
        }
        let l3_len = theirs.net.as_ref().and_then(|n| n.ip_payload_ref()).map(|p| p.payload.len()).unwrap()
            + if s.v6 { 40 } else { 20 };
        prop_assert_eq!(ours.l3_len as usize, l3_len);
    }

    #[test]
    fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200), wire in any::<u32>()) {
        for link in [LinkType::Ethernet, LinkType::RawIp, LinkType::LinuxSll, LinkType::LinuxSll2, LinkType::Null, LinkType::Nflog] {
            let _ = parse_frame(&bytes[..], link, wire);
        }
    }

    #[test]
    fn never_panics_on_cut_valid_packets(s in spec(), cut in 0usize..400) {
        let frame = build(&s);
        let n = cut.min(frame.len());
        let _ = parse_frame(&frame[..n], LinkType::Ethernet, frame.len() as u32);
    }
}
