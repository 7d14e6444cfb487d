//! Header parser: link layer → IPv4/IPv6 → TCP/UDP, over any byte source.
//!
//! Contract (as in smoltcp's `wire`): every read is bounds-checked through
//! [`PacketBytes::load`], nothing here can panic, and every loop has a
//! constant bound so the eBPF verifier accepts the same code.
//!
//! Lengths come from the IP header, never from the frame: Ethernet pads
//! short frames, and captures cut frames at the snap length. Only the headers
//! themselves must be present in the captured bytes.

use crate::key::{v4_mapped, FlowKey};

/// Random access to the bytes of one frame.
///
/// Userspace implements it for a slice; the eBPF program for the skb.
pub trait PacketBytes {
    /// The `N` bytes at `off`, or `None` when fewer were captured.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;
}

impl PacketBytes for [u8] {
    #[inline(always)]
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]> {
        let end = off.checked_add(N)?;
        let s = self.get(off..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Some(out)
    }
}

/// How a frame begins (pcap `LINKTYPE_*`, or the hook it came from).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkType {
    /// Ethernet II, with up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags.
    Ethernet,
    /// No link header: the frame starts with an IPv4 or IPv6 header.
    RawIp,
    /// Linux cooked capture v1 (`LINKTYPE_LINUX_SLL`, 16-byte header).
    LinuxSll,
    /// Linux cooked capture v2 (`LINKTYPE_LINUX_SLL2`, 20-byte header).
    LinuxSll2,
    /// BSD loopback: a 4-byte address family, in host (`Null`) or network
    /// (`Loop`) byte order. Both orders are accepted for both.
    Null,
}

/// How many VLAN tags are stripped before giving up (QinQ = 2).
pub const MAX_VLAN_TAGS: usize = 2;
/// How many IPv6 extension headers are walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ_OLD: u16 = 0x9100;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_NONE: u8 = 59;
const IPPROTO_DSTOPTS: u8 = 60;

/// TCP flag bits as they sit in the 14th header byte.
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// The headers of one TCP segment that the tracker needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpHeader {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
}

/// A frame that carried a TCP or UDP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub key: FlowKey,
    /// IP total length (IPv4 `tot_len`; IPv6 40 + `payload_len`).
    pub l3_len: u32,
    /// Transport payload length.
    pub payload_len: u32,
    /// Offset of the IP header within the frame.
    pub l3_offset: u16,
    /// Zeroed for UDP.
    pub tcp: TcpHeader,
}

/// Why a frame produced no connection update. Every reason is counted.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParseError {
    /// Not IPv4/IPv6 (ARP, LLDP, …): normal traffic, not a defect.
    NotIp = 0,
    /// IP, but neither TCP nor UDP (ICMP, GRE, …).
    OtherL4,
    /// An IPv4/IPv6 fragment other than the first: carries no ports.
    Fragment,
    /// IPv6 ESP or "no next header": the transport header is not visible.
    Ipv6NoTransport,
    /// More IPv6 extension headers than [`MAX_IPV6_EXT_HEADERS`], or more
    /// VLAN tags than [`MAX_VLAN_TAGS`].
    TooManyHeaders,
    /// Frame ends inside the link-layer header.
    TruncatedL2,
    /// Frame ends inside the IP header or its extension headers.
    TruncatedL3,
    /// Frame ends inside the TCP/UDP header.
    TruncatedL4,
    /// IP header is inconsistent (version, header length, total length).
    BadL3,
    /// TCP/UDP header is inconsistent with the IP length (data offset, length).
    BadL4,
}

impl ParseError {
    pub const ALL: [ParseError; 10] = [
        ParseError::NotIp,
        ParseError::OtherL4,
        ParseError::Fragment,
        ParseError::Ipv6NoTransport,
        ParseError::TooManyHeaders,
        ParseError::TruncatedL2,
        ParseError::TruncatedL3,
        ParseError::TruncatedL4,
        ParseError::BadL3,
        ParseError::BadL4,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// Stable snake_case name, used as a metric label and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            ParseError::NotIp => "not_ip",
            ParseError::OtherL4 => "other_l4",
            ParseError::Fragment => "ip_fragment",
            ParseError::Ipv6NoTransport => "ipv6_no_transport",
            ParseError::TooManyHeaders => "too_many_headers",
            ParseError::TruncatedL2 => "truncated_l2",
            ParseError::TruncatedL3 => "truncated_l3",
            ParseError::TruncatedL4 => "truncated_l4",
            ParseError::BadL3 => "bad_l3",
            ParseError::BadL4 => "bad_l4",
        }
    }

    /// Malformed input, as opposed to traffic flowprobe does not track.
    pub const fn is_malformed(self) -> bool {
        matches!(
            self,
            ParseError::TruncatedL2
                | ParseError::TruncatedL3
                | ParseError::TruncatedL4
                | ParseError::BadL3
                | ParseError::BadL4
        )
    }
}

type Result<T> = core::result::Result<T, ParseError>;

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

#[inline(always)]
fn be32(b: [u8; 4]) -> u32 {
    u32::from_be_bytes(b)
}

/// Parses one frame.
///
/// `wire_len` is the frame's length on the wire (pcap `orig_len`,
/// `skb->len`); it is only consulted when the IP header does not carry the
/// length (IPv4 and IPv6 BIG TCP / jumbograms).
#[inline(always)]
pub fn parse_frame<B: PacketBytes + ?Sized>(
    b: &B,
    link: LinkType,
    wire_len: u32,
) -> Result<Parsed> {
    let (l3, ethertype) = match link {
        LinkType::Ethernet => ethernet(b)?,
        LinkType::LinuxSll => {
            let p: [u8; 2] = b.load(14).ok_or(ParseError::TruncatedL2)?;
            (16, be16(p))
        }
        LinkType::LinuxSll2 => {
            let p: [u8; 2] = b.load(0).ok_or(ParseError::TruncatedL2)?;
            (20, be16(p))
        }
        LinkType::Null => {
            let f: [u8; 4] = b.load(0).ok_or(ParseError::TruncatedL2)?;
            (4, null_family(f)?)
        }
        LinkType::RawIp => {
            let v: [u8; 1] = b.load(0).ok_or(ParseError::TruncatedL3)?;
            match v[0] >> 4 {
                4 => (0, ETH_P_IPV4),
                6 => (0, ETH_P_IPV6),
                _ => return Err(ParseError::BadL3),
            }
        }
    };
    match ethertype {
        ETH_P_IPV4 => ipv4(b, l3, wire_len),
        ETH_P_IPV6 => ipv6(b, l3, wire_len),
        _ => Err(ParseError::NotIp),
    }
}

/// Returns the offset of the L3 header and its ethertype.
#[inline(always)]
fn ethernet<B: PacketBytes + ?Sized>(b: &B) -> Result<(usize, u16)> {
    let t: [u8; 2] = b.load(12).ok_or(ParseError::TruncatedL2)?;
    let mut ethertype = be16(t);
    let mut off = 14;
    let mut tags = 0;
    while tags <= MAX_VLAN_TAGS {
        if !matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD) {
            return Ok((off, ethertype));
        }
        if tags == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyHeaders);
        }
        // A tag is TCI (2 bytes) followed by the next ethertype.
        let t: [u8; 2] = b.load(off + 2).ok_or(ParseError::TruncatedL2)?;
        ethertype = be16(t);
        off += 4;
        tags += 1;
    }
    Err(ParseError::TooManyHeaders)
}

/// BSD loopback family values: AF_INET is 2 everywhere; AF_INET6 is 10
/// (Linux), 24 (NetBSD/OpenBSD), 28 (FreeBSD) or 30 (macOS).
#[inline(always)]
fn null_family(f: [u8; 4]) -> Result<u16> {
    let le = u32::from_le_bytes(f);
    let be = u32::from_be_bytes(f);
    let fam = if le < 256 { le } else { be };
    match fam {
        2 => Ok(ETH_P_IPV4),
        10 | 24 | 28 | 30 => Ok(ETH_P_IPV6),
        _ => Err(ParseError::NotIp),
    }
}

#[inline(always)]
fn ipv4<B: PacketBytes + ?Sized>(b: &B, off: usize, wire_len: u32) -> Result<Parsed> {
    // version/ihl, tos, tot_len, id, frag_off, ttl, protocol, check, saddr, daddr
    let h: [u8; 20] = b.load(off).ok_or(ParseError::TruncatedL3)?;
    if h[0] >> 4 != 4 {
        return Err(ParseError::BadL3);
    }
    let ihl = ((h[0] & 0x0f) as u32) * 4;
    if ihl < 20 {
        return Err(ParseError::BadL3);
    }
    let mut tot_len = be16([h[2], h[3]]) as u32;
    if tot_len == 0 {
        // IPv4 BIG TCP (GSO packets over 64 KiB) leaves tot_len at 0.
        tot_len = wire_len.saturating_sub(off as u32);
    }
    if tot_len < ihl {
        return Err(ParseError::BadL3);
    }
    let frag = be16([h[6], h[7]]);
    if frag & 0x1fff != 0 {
        return Err(ParseError::Fragment);
    }
    let more_fragments = frag & 0x2000 != 0;
    let mut src = [0u8; 4];
    let mut dst = [0u8; 4];
    src.copy_from_slice(&h[12..16]);
    dst.copy_from_slice(&h[16..20]);
    transport(
        b,
        off,
        off + ihl as usize,
        h[9],
        tot_len,
        tot_len - ihl,
        more_fragments,
        v4_mapped(src),
        v4_mapped(dst),
        4,
    )
}

#[inline(always)]
fn ipv6<B: PacketBytes + ?Sized>(b: &B, off: usize, wire_len: u32) -> Result<Parsed> {
    let h: [u8; 40] = b.load(off).ok_or(ParseError::TruncatedL3)?;
    if h[0] >> 4 != 6 {
        return Err(ParseError::BadL3);
    }
    let mut payload_len = be16([h[4], h[5]]) as u32;
    if payload_len == 0 {
        // Jumbogram / IPv6 BIG TCP: the length is only in the skb.
        payload_len = wire_len.saturating_sub(off as u32 + 40);
    }
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    src.copy_from_slice(&h[8..24]);
    dst.copy_from_slice(&h[24..40]);

    let mut next = h[6];
    let mut pos = off + 40;
    let mut ext_len: u32 = 0;
    let mut more_fragments = false;
    let mut i = 0;
    while i < MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => break,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT | IPPROTO_AH => {
                let e: [u8; 4] = b.load(pos).ok_or(ParseError::TruncatedL3)?;
                let len = match next {
                    IPPROTO_FRAGMENT => {
                        let frag = be16([e[2], e[3]]);
                        if frag & 0xfff8 != 0 {
                            return Err(ParseError::Fragment);
                        }
                        more_fragments = frag & 1 != 0;
                        8
                    }
                    IPPROTO_AH => (e[1] as u32 + 2) * 4,
                    _ => (e[1] as u32 + 1) * 8,
                };
                next = e[0];
                pos += len as usize;
                ext_len += len;
            }
            IPPROTO_ESP | IPPROTO_NONE => return Err(ParseError::Ipv6NoTransport),
            _ => return Err(ParseError::OtherL4),
        }
        i += 1;
    }
    if !matches!(next, IPPROTO_TCP | IPPROTO_UDP) {
        return Err(ParseError::TooManyHeaders);
    }
    if ext_len > payload_len {
        return Err(ParseError::BadL3);
    }
    transport(
        b,
        off,
        pos,
        next,
        40 + payload_len,
        payload_len - ext_len,
        more_fragments,
        src,
        dst,
        6,
    )
}

/// Parses the TCP/UDP header at `off`; `l4_len` is the transport header plus
/// payload as the IP header states it.
#[allow(clippy::too_many_arguments)] // one call per IP version; a struct would only rename them
#[inline(always)]
fn transport<B: PacketBytes + ?Sized>(
    b: &B,
    l3_offset: usize,
    off: usize,
    proto: u8,
    l3_len: u32,
    l4_len: u32,
    more_fragments: bool,
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
) -> Result<Parsed> {
    let (sport, dport, payload_len, tcp) = match proto {
        IPPROTO_TCP => {
            // ports, seq, ack, data offset + flags, window: all the tracker needs.
            let t: [u8; 16] = b.load(off).ok_or(ParseError::TruncatedL4)?;
            let doff = ((t[12] >> 4) as u32) * 4;
            if doff < 20 || doff > l4_len {
                return Err(ParseError::BadL4);
            }
            let tcp = TcpHeader {
                seq: be32([t[4], t[5], t[6], t[7]]),
                ack: be32([t[8], t[9], t[10], t[11]]),
                flags: t[13],
                window: be16([t[14], t[15]]),
            };
            (be16([t[0], t[1]]), be16([t[2], t[3]]), l4_len - doff, tcp)
        }
        IPPROTO_UDP => {
            let u: [u8; 8] = b.load(off).ok_or(ParseError::TruncatedL4)?;
            let udp_len = be16([u[4], u[5]]) as u32;
            let payload = if more_fragments {
                // The first fragment of a datagram: its UDP length covers
                // the fragments that follow, which carry no ports.
                if udp_len < 8 {
                    return Err(ParseError::BadL4);
                }
                udp_len - 8
            } else {
                if l4_len < 8 {
                    return Err(ParseError::BadL4);
                }
                l4_len - 8
            };
            (
                be16([u[0], u[1]]),
                be16([u[2], u[3]]),
                payload,
                TcpHeader::default(),
            )
        }
        _ => return Err(ParseError::OtherL4),
    };
    Ok(Parsed {
        key: FlowKey {
            src,
            dst,
            sport,
            dport,
            proto,
            family,
            _pad: [0; 2],
        },
        l3_len,
        payload_len,
        l3_offset: l3_offset as u16,
        tcp,
    })
}
