//! Header parser: link layer → IPv4/IPv6 → TCP/UDP, over any byte source,
//! through one level of tunnel (VXLAN, Geneve, GRE, IP in IP) when the
//! frame is one.
//!
//! Contract (as in smoltcp's `wire`): every read is bounds-checked through
//! [`PacketBytes::load`], nothing here can panic, and every loop has a
//! constant bound so the eBPF verifier accepts the same code.
//!
//! Lengths come from the IP header, never from the frame: Ethernet pads
//! short frames, and captures cut frames at the snap length. Only the headers
//! themselves must be present in the captured bytes.
//!
//! The way through a frame:
//!
//! ```text
//! link  Ethernet / SLL / SLL2 / NFLOG / BSD loopback / raw IP
//!   │   then up to MAX_LINK_HEADERS of: VLAN (≤ MAX_VLAN_TAGS), PPPoE
//!   │   session, 802.2 LLC/SNAP, an MPLS stack (to its bottom label)
//! IPv4 / IPv6 (bounded extension-header walk)
//!   │   IP proto 4 / 41 (IPIP, SIT, 4in6, 6in6), GRE (47, version 0),
//!   │   UDP to the VXLAN or Geneve port ([`Decap`]):  one level down,
//!   │   the outer layers noted in an [`Encap`]
//! TCP / UDP  →  Parsed (the inner 5-tuple; `tunnel` tells tunnels apart)
//! ```

use crate::key::{v4_mapped, FlowKey};

/// Random access to the bytes of one frame.
///
/// Userspace implements it for a slice; the eBPF program for the skb.
pub trait PacketBytes {
    /// The `N` bytes at `off`, or `None` when fewer were captured.
    fn load<const N: usize>(&self, off: usize) -> Option<[u8; N]>;

    /// `off`, as a value the eBPF verifier does not know: the identity in
    /// userspace. The parser passes every header offset through it where
    /// paths meet (each link header, each tunnel), so that the verifier
    /// sees one state there instead of one per way of arriving (a constant
    /// offset for each combination of VLAN tags, PPPoE, SNAP, MPLS labels
    /// and tunnel headers), which it would otherwise explore one by one.
    #[inline(always)]
    fn opaque(&self, off: usize) -> usize {
        off
    }
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
    /// Ethernet II (or 802.3 with an 802.2 LLC/SNAP header), with up to
    /// [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags, PPPoE and MPLS.
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
    /// Linux netfilter log (`LINKTYPE_NFLOG`, 239): a 4-byte header, then
    /// type-length-value attributes, one of which is the IP packet.
    Nflog,
}

/// How many VLAN tags are stripped before giving up (QinQ = 2).
pub const MAX_VLAN_TAGS: usize = 4;
/// How many link-layer headers after the first (VLAN tags, PPPoE, LLC/SNAP,
/// an MPLS stack) are walked before giving up.
pub const MAX_LINK_HEADERS: usize = 8;
/// How many MPLS labels are walked looking for the bottom of the stack.
pub const MAX_MPLS_LABELS: usize = 8;
/// How many NFLOG attributes are walked looking for the packet.
pub const MAX_NFLOG_TLVS: usize = 16;
/// How many IPv6 extension headers are walked before giving up.
pub const MAX_IPV6_EXT_HEADERS: usize = 6;
/// Tunnels taken apart per frame: a tunnel inside a tunnel is skipped
/// ([`ParseError::TunnelNested`]).
pub const MAX_TUNNEL_DEPTH: usize = 1;

const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_P_QINQ_OLD: u16 = 0x9100;
const ETH_P_MPLS_UC: u16 = 0x8847;
const ETH_P_MPLS_MC: u16 = 0x8848;
const ETH_P_PPPOE_SESSION: u16 = 0x8864;
/// Transparent Ethernet bridging (GRE, Geneve): an Ethernet frame follows.
const ETH_P_TEB: u16 = 0x6558;
/// Below this, the Ethernet type field is an 802.3 length: LLC follows.
const ETH_P_802_3_MIN: u16 = 0x0600;

const PPP_IPV4: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
/// NFLOG attribute holding the packet (`NFULA_PAYLOAD`).
const NFULA_PAYLOAD: u16 = 9;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_GRE: u8 = 47;
const IPPROTO_ESP: u8 = 50;
const IPPROTO_AH: u8 = 51;
const IPPROTO_NONE: u8 = 59;
const IPPROTO_DSTOPTS: u8 = 60;

/// GRE flag bits flowprobe reads past: checksum, key, sequence number
/// (RFC 2890). Any other bit set (routing, strict source route, recursion,
/// reserved) or a version other than 0 is [`ParseError::BadTunnel`].
const GRE_CSUM: u16 = 0x8000;
const GRE_KEY: u16 = 0x2000;
const GRE_SEQ: u16 = 0x1000;

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
    /// The innermost 5-tuple: inside a tunnel, the tunnelled packet's.
    pub key: FlowKey,
    /// IP total length (IPv4 `tot_len`; IPv6 40 + `payload_len`).
    pub l3_len: u32,
    /// Transport payload length.
    pub payload_len: u32,
    /// Offset of the (innermost) IP header within the frame.
    pub l3_offset: u16,
    /// Zeroed for UDP.
    pub tcp: TcpHeader,
    /// 0 outside a tunnel; inside one, a non-zero digest of the tunnel
    /// ([`tunnel_id`]: its kind, VNI or key and its two endpoints, the same
    /// both ways), so that two tunnels carrying the same inner 5-tuple are
    /// two connections ([`crate::ConnKey::tunnel`]).
    pub tunnel: u32,
}

/// Which decapsulations run, and on which UDP ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decap {
    /// false: tunnels are flows of their own (the outer UDP/GRE/IP
    /// packet), as before decapsulation existed.
    pub enabled: bool,
    /// VXLAN's UDP destination port (IANA: 4789); 0 turns VXLAN off.
    pub vxlan_port: u16,
    /// Geneve's UDP destination port (IANA: 6081); 0 turns Geneve off.
    pub geneve_port: u16,
}

impl Decap {
    /// Every decapsulation, on the IANA ports.
    pub const DEFAULT: Decap = Decap {
        enabled: true,
        vxlan_port: 4789,
        geneve_port: 6081,
    };
    /// No decapsulation.
    pub const OFF: Decap = Decap {
        enabled: false,
        vxlan_port: 0,
        geneve_port: 0,
    };
}

impl Default for Decap {
    fn default() -> Decap {
        Decap::DEFAULT
    }
}

/// The tunnels flowprobe looks into ([`Encap::kind`]).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TunnelKind {
    /// VXLAN (RFC 7348): UDP, an 8-byte header with a 24-bit VNI, Ethernet.
    Vxlan = 1,
    /// Geneve (RFC 8926): UDP, a header with options and a VNI, then
    /// Ethernet or IP.
    Geneve = 2,
    /// GRE (RFC 2784/2890) carrying IPv4 or IPv6, with an optional key.
    Gre = 3,
    /// GRE carrying Ethernet (transparent Ethernet bridging, `gretap`).
    GreTap = 4,
    /// IPv4 in IPv4 (IP protocol 4).
    Ipip = 5,
    /// IPv6 in IPv4 (SIT, 6in4: IP protocol 41).
    Sit = 6,
    /// IPv4 in IPv6.
    Ip4in6 = 7,
    /// IPv6 in IPv6.
    Ip6in6 = 8,
}

impl TunnelKind {
    pub const ALL: [TunnelKind; 8] = [
        TunnelKind::Vxlan,
        TunnelKind::Geneve,
        TunnelKind::Gre,
        TunnelKind::GreTap,
        TunnelKind::Ipip,
        TunnelKind::Sit,
        TunnelKind::Ip4in6,
        TunnelKind::Ip6in6,
    ];

    /// The kind stored as `v` ([`Encap::kind`]).
    pub const fn from_u8(v: u8) -> Option<TunnelKind> {
        match v {
            1 => Some(TunnelKind::Vxlan),
            2 => Some(TunnelKind::Geneve),
            3 => Some(TunnelKind::Gre),
            4 => Some(TunnelKind::GreTap),
            5 => Some(TunnelKind::Ipip),
            6 => Some(TunnelKind::Sit),
            7 => Some(TunnelKind::Ip4in6),
            8 => Some(TunnelKind::Ip6in6),
            _ => None,
        }
    }

    /// Stable name (the `tunnel` tag's value).
    pub const fn name(self) -> &'static str {
        match self {
            TunnelKind::Vxlan => "vxlan",
            TunnelKind::Geneve => "geneve",
            TunnelKind::Gre => "gre",
            TunnelKind::GreTap => "gretap",
            TunnelKind::Ipip => "ipip",
            TunnelKind::Sit => "sit",
            TunnelKind::Ip4in6 => "4in6",
            TunnelKind::Ip6in6 => "6in6",
        }
    }
}

/// What wrapped a connection's packet: the outer layers the parser walked
/// through. Written by [`parse_frame_ex`] into a zeroed `Encap`; kept in
/// the connection's entry from its first packet
/// ([`crate::FlowEntry::encap`]). 64 bytes, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Encap {
    /// [`TunnelKind`] as `u8`; 0: no tunnel.
    pub kind: u8,
    /// The tunnel's outer IP family (4 or 6); 0: no tunnel.
    pub outer_family: u8,
    /// VLAN tags before the (outer) IP header; their ids are in `vlan`,
    /// outermost first (at most [`MAX_VLAN_TAGS`]).
    pub vlans: u8,
    /// [`encap_flags`].
    pub flags: u8,
    /// The VXLAN or Geneve VNI, or the GRE key ([`encap_flags::VNI`]).
    pub vni: u32,
    /// The top MPLS label ([`encap_flags::MPLS`]).
    pub mpls: u32,
    /// The PPPoE session id ([`encap_flags::PPPOE`]).
    pub pppoe_session: u16,
    pub _pad: u16,
    pub vlan: [u16; MAX_VLAN_TAGS],
    pub _pad2: [u8; 8],
    /// The tunnel's outer source and destination (IPv4-mapped like keys).
    pub outer_src: [u8; 16],
    pub outer_dst: [u8; 16],
}

/// [`Encap::flags`] bits.
pub mod encap_flags {
    /// `vni` holds a VNI (VXLAN, Geneve) or a GRE key.
    pub const VNI: u8 = 1;
    /// `mpls` holds the top label of an MPLS stack.
    pub const MPLS: u8 = 2;
    /// `pppoe_session` holds a PPPoE session id.
    pub const PPPOE: u8 = 4;
}

impl Encap {
    /// Nothing wrapped the packet but plain Ethernet (or another link
    /// header).
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.kind == 0 && self.vlans == 0 && self.flags == 0
    }

    /// The layers of a packet travelling in direction `dir` of its key
    /// ([`crate::ConnKey::of`]) with the outer source on the key's `lo` end:
    /// as they are for direction 0, reversed for 1.
    #[inline(always)]
    pub fn in_key_order(&self, dir: usize) -> Encap {
        if dir & 1 == 0 {
            *self
        } else {
            self.reversed()
        }
    }

    /// The same layers seen from the other direction: outer source and
    /// destination swapped.
    #[inline(always)]
    pub fn reversed(&self) -> Encap {
        let mut e = *self;
        e.outer_src = self.outer_dst;
        e.outer_dst = self.outer_src;
        e
    }
}

const _: () = assert!(core::mem::size_of::<Encap>() == 64);

/// Why a frame produced no connection update. Every reason is counted.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ParseError {
    /// Not IPv4/IPv6 (ARP, LLDP, …): normal traffic, not a defect. Also a
    /// PPPoE, LLC, MPLS or tunnel payload that is not IP.
    NotIp = 0,
    /// IP, but neither TCP nor UDP (ICMP, …).
    OtherL4,
    /// An IPv4/IPv6 fragment other than the first: carries no ports.
    Fragment,
    /// IPv6 ESP or "no next header": the transport header is not visible.
    Ipv6NoTransport,
    /// More IPv6 extension headers than [`MAX_IPV6_EXT_HEADERS`], more
    /// VLAN tags than [`MAX_VLAN_TAGS`], more link headers than
    /// [`MAX_LINK_HEADERS`] or NFLOG attributes than [`MAX_NFLOG_TLVS`].
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
    /// A tunnel inside a tunnel: more than [`MAX_TUNNEL_DEPTH`] levels.
    TunnelNested,
    /// Frame ends inside a tunnel header (VXLAN, Geneve, GRE).
    TruncatedTunnel,
    /// A tunnel header flowprobe does not read: GRE with a version other
    /// than 0 or flags other than checksum, key and sequence; VXLAN without
    /// its VNI flag; Geneve of another version; a tunnel header longer than
    /// its packet.
    BadTunnel,
    /// An MPLS stack without a bottom label within [`MAX_MPLS_LABELS`].
    MplsNoBottom,
    /// A malformed PPPoE session header (version, type or code), or an
    /// NFLOG attribute shorter than its own header.
    BadL2,
}

impl ParseError {
    pub const ALL: [ParseError; 15] = [
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
        ParseError::TunnelNested,
        ParseError::TruncatedTunnel,
        ParseError::BadTunnel,
        ParseError::MplsNoBottom,
        ParseError::BadL2,
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
            ParseError::TunnelNested => "tunnel_nested",
            ParseError::TruncatedTunnel => "truncated_tunnel",
            ParseError::BadTunnel => "bad_tunnel",
            ParseError::MplsNoBottom => "mpls_no_bottom",
            ParseError::BadL2 => "bad_l2",
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
                | ParseError::TruncatedTunnel
                | ParseError::BadTunnel
                | ParseError::MplsNoBottom
                | ParseError::BadL2
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

/// Parses one frame, decapsulating tunnels on the IANA ports.
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
    parse_frame_ex(b, link, wire_len, &Decap::DEFAULT, &mut Encap::default())
}

/// [`parse_frame`] with the decapsulations `decap` allows; the outer
/// layers are written into `enc`, which the caller zeroes (only the fields
/// found are written).
#[inline(always)]
pub fn parse_frame_ex<B: PacketBytes + ?Sized>(
    b: &B,
    link: LinkType,
    wire_len: u32,
    decap: &Decap,
    enc: &mut Encap,
) -> Result<Parsed> {
    let (l3, ethertype) = match link {
        LinkType::Ethernet => ethernet(b, 0, enc, true)?,
        LinkType::LinuxSll => {
            let p: [u8; 2] = b.load(14).ok_or(ParseError::TruncatedL2)?;
            link_chain(b, 16, be16(p), enc, true)?
        }
        LinkType::LinuxSll2 => {
            let p: [u8; 2] = b.load(0).ok_or(ParseError::TruncatedL2)?;
            link_chain(b, 20, be16(p), enc, true)?
        }
        LinkType::Null => {
            let f: [u8; 4] = b.load(0).ok_or(ParseError::TruncatedL2)?;
            (4, null_family(f)?)
        }
        LinkType::RawIp => (0, ip_version(b, 0)?),
        LinkType::Nflog => nflog(b)?,
    };
    let outer = ip(b, b.opaque(l3), ethertype, wire_len)?;
    let Some(t) = tunnel(b, &outer, decap)? else {
        return transport(b, &outer, 0);
    };
    enc.kind = t.kind as u8;
    enc.outer_family = outer.family;
    enc.outer_src = outer.src;
    enc.outer_dst = outer.dst;
    if let Some(vni) = t.vni {
        enc.vni = vni;
        enc.flags |= encap_flags::VNI;
    }
    let id = tunnel_id(t.kind, t.vni, &outer.src, &outer.dst);
    let off = b.opaque(t.off);
    let (l3, ethertype) = match t.inner {
        Inner::Ethernet => ethernet(b, off, enc, false)?,
        Inner::Ip(ethertype) => (off, ethertype),
    };
    let l3 = b.opaque(l3);
    // The inner packet's own lengths are its IP header's; only a BIG TCP
    // inner header (length 0) falls back on what the outer one leaves.
    let inner_wire = (outer.l3_offset as u32 + outer.l3_len).saturating_sub(l3 as u32);
    let inner = ip(b, l3, ethertype, inner_wire.saturating_add(l3 as u32))?;
    if tunnel(b, &inner, decap)?.is_some() {
        return Err(ParseError::TunnelNested);
    }
    transport(b, &inner, id)
}

/// A digest of one tunnel: its kind, VNI or key, and its two endpoints in
/// either order (so both directions agree). Never 0, which means "no
/// tunnel". Two different tunnels share a digest with a chance of 2⁻³²;
/// their connections with equal inner 5-tuples would then be one.
#[inline(always)]
pub fn tunnel_id(kind: TunnelKind, vni: Option<u32>, a: &[u8; 16], b: &[u8; 16]) -> u32 {
    let v = match vni {
        Some(v) => v as u64 | 1 << 32,
        None => 0,
    };
    let x = (addr_mix(a).wrapping_add(addr_mix(b)) ^ v ^ (kind as u64) << 40)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let h = ((x ^ (x >> 29)) >> 32) as u32;
    if h == 0 {
        1
    } else {
        h
    }
}

/// One address mixed into a word: a multiply-xorshift of its two halves,
/// so that sums of two addresses rarely meet.
#[inline(always)]
fn addr_mix(a: &[u8; 16]) -> u64 {
    let hi = u64::from_le_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]);
    let lo = u64::from_le_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]);
    let x = (hi ^ lo.rotate_left(29)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^ (x >> 33)
}

/// The ethertype for the IP version in the first byte at `off`.
#[inline(always)]
fn ip_version<B: PacketBytes + ?Sized>(b: &B, off: usize) -> Result<u16> {
    let v: [u8; 1] = b.load(off).ok_or(ParseError::TruncatedL3)?;
    match v[0] >> 4 {
        4 => Ok(ETH_P_IPV4),
        6 => Ok(ETH_P_IPV6),
        _ => Err(ParseError::BadL3),
    }
}

/// The Ethernet header at `off`, then what follows it up to the IP header:
/// its offset and ethertype. `record`: note VLAN ids, the MPLS label and
/// the PPPoE session in `enc` (the outer frame's; a tunnelled Ethernet
/// frame's are not kept).
#[inline(always)]
fn ethernet<B: PacketBytes + ?Sized>(
    b: &B,
    off: usize,
    enc: &mut Encap,
    record: bool,
) -> Result<(usize, u16)> {
    let t: [u8; 2] = b.load(off + 12).ok_or(ParseError::TruncatedL2)?;
    link_chain(b, off + 14, be16(t), enc, record)
}

/// The headers between a link header and IP, starting with `ethertype`'s
/// at `off`: VLAN tags, PPPoE session, 802.2 LLC/SNAP, an MPLS stack.
/// Returns the IP header's offset and ethertype.
#[inline(always)]
fn link_chain<B: PacketBytes + ?Sized>(
    b: &B,
    off: usize,
    ethertype: u16,
    enc: &mut Encap,
    record: bool,
) -> Result<(usize, u16)> {
    let mut off = off;
    let mut ethertype = ethertype;
    let mut tags = 0;
    let mut i = 0;
    while i <= MAX_LINK_HEADERS {
        off = b.opaque(off);
        match ethertype {
            ETH_P_IPV4 | ETH_P_IPV6 => return Ok((off, ethertype)),
            _ if i == MAX_LINK_HEADERS => break,
            ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_OLD => {
                if tags == MAX_VLAN_TAGS {
                    return Err(ParseError::TooManyHeaders);
                }
                // A tag is TCI (2 bytes) followed by the next ethertype.
                let t: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedL2)?;
                if record {
                    enc.vlan[tags & (MAX_VLAN_TAGS - 1)] = be16([t[0], t[1]]) & 0x0fff;
                    enc.vlans = tags as u8 + 1;
                }
                ethertype = be16([t[2], t[3]]);
                off += 4;
                tags += 1;
            }
            ETH_P_PPPOE_SESSION => {
                // ver/type 0x11, code 0, session id, length, PPP protocol.
                let p: [u8; 8] = b.load(off).ok_or(ParseError::TruncatedL2)?;
                if p[0] != 0x11 || p[1] != 0 {
                    return Err(ParseError::BadL2);
                }
                if record {
                    enc.pppoe_session = be16([p[2], p[3]]);
                    enc.flags |= encap_flags::PPPOE;
                }
                ethertype = match be16([p[6], p[7]]) {
                    PPP_IPV4 => ETH_P_IPV4,
                    PPP_IPV6 => ETH_P_IPV6,
                    _ => return Err(ParseError::NotIp),
                };
                off += 8;
            }
            ETH_P_MPLS_UC | ETH_P_MPLS_MC => return mpls(b, off, enc, record),
            t if t < ETH_P_802_3_MIN => {
                // 802.3 length, then 802.2 LLC: only SNAP (AA AA 03) with
                // an RFC 1042 or 802.1H OUI carries an ethertype.
                let l: [u8; 8] = b.load(off).ok_or(ParseError::TruncatedL2)?;
                if l[0] != 0xaa || l[1] != 0xaa || l[2] != 0x03 || l[3] != 0 || l[4] != 0 {
                    return Err(ParseError::NotIp);
                }
                if l[5] != 0 && l[5] != 0xf8 {
                    return Err(ParseError::NotIp);
                }
                ethertype = be16([l[6], l[7]]);
                off += 8;
            }
            _ => return Err(ParseError::NotIp),
        }
        i += 1;
    }
    Err(ParseError::TooManyHeaders)
}

/// An MPLS label stack at `off`, walked to its bottom label; the packet
/// after it is IP if its first nibble says so.
#[inline(always)]
fn mpls<B: PacketBytes + ?Sized>(
    b: &B,
    off: usize,
    enc: &mut Encap,
    record: bool,
) -> Result<(usize, u16)> {
    let mut off = off;
    let mut i = 0;
    while i < MAX_MPLS_LABELS {
        off = b.opaque(off);
        let l: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedL2)?;
        let w = be32(l);
        if i == 0 && record {
            enc.mpls = w >> 12;
            enc.flags |= encap_flags::MPLS;
        }
        off += 4;
        if w & 0x100 != 0 {
            // Bottom of stack. No type field: IP by its version nibble
            // (a pseudowire's control word starts with 0).
            // Four bytes, not one: every IP header is longer, and the eBPF
            // verifier misreads LLVM's form of a one-byte bounds check.
            let v: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedL3)?;
            return match v[0] >> 4 {
                4 => Ok((off, ETH_P_IPV4)),
                6 => Ok((off, ETH_P_IPV6)),
                _ => Err(ParseError::NotIp),
            };
        }
        i += 1;
    }
    Err(ParseError::MplsNoBottom)
}

/// `LINKTYPE_NFLOG`: family, version, resource id, then attributes (length
/// and type in the capturing host's order, little-endian on every Linux
/// host that writes these captures; padded to 4 bytes) until the payload.
#[inline(always)]
fn nflog<B: PacketBytes + ?Sized>(b: &B) -> Result<(usize, u16)> {
    let mut off = 4;
    let mut i = 0;
    while i < MAX_NFLOG_TLVS {
        let t: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedL2)?;
        let len = u16::from_le_bytes([t[0], t[1]]) as usize;
        let kind = u16::from_le_bytes([t[2], t[3]]) & 0x7fff;
        if len < 4 {
            return Err(ParseError::BadL2);
        }
        if kind == NFULA_PAYLOAD {
            return Ok((off + 4, ip_version(b, off + 4)?));
        }
        off += (len + 3) & !3;
        i += 1;
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

/// An IP header, read up to the header of its payload.
#[derive(Clone, Copy)]
struct Ip {
    src: [u8; 16],
    dst: [u8; 16],
    family: u8,
    /// The payload's protocol (after IPv6 extension headers).
    proto: u8,
    more_fragments: bool,
    l3_offset: usize,
    /// Where the payload (TCP, UDP, a tunnel) begins.
    l4_offset: usize,
    /// IP total length.
    l3_len: u32,
    /// Payload length as the IP header states it.
    l4_len: u32,
}

#[inline(always)]
fn ip<B: PacketBytes + ?Sized>(b: &B, off: usize, ethertype: u16, wire_len: u32) -> Result<Ip> {
    match ethertype {
        ETH_P_IPV4 => ipv4(b, off, wire_len),
        ETH_P_IPV6 => ipv6(b, off, wire_len),
        _ => Err(ParseError::NotIp),
    }
}

/// What follows a tunnel header.
#[derive(Clone, Copy)]
enum Inner {
    Ethernet,
    /// An IP header of this ethertype.
    Ip(u16),
}

/// A tunnel header found after an IP header.
#[derive(Clone, Copy)]
struct Tunnel {
    kind: TunnelKind,
    vni: Option<u32>,
    /// Where the tunnelled frame or packet begins.
    off: usize,
    inner: Inner,
}

/// The tunnel `ip` carries, if `decap` takes it apart; `None` for a
/// packet to count as it is.
#[inline(always)]
fn tunnel<B: PacketBytes + ?Sized>(b: &B, ip: &Ip, decap: &Decap) -> Result<Option<Tunnel>> {
    if !decap.enabled {
        return Ok(None);
    }
    let off = ip.l4_offset;
    let v4 = ip.family == 4;
    let t = match ip.proto {
        IPPROTO_IPIP => Tunnel {
            kind: if v4 {
                TunnelKind::Ipip
            } else {
                TunnelKind::Ip4in6
            },
            vni: None,
            off,
            inner: Inner::Ip(ETH_P_IPV4),
        },
        IPPROTO_IPV6 => Tunnel {
            kind: if v4 {
                TunnelKind::Sit
            } else {
                TunnelKind::Ip6in6
            },
            vni: None,
            off,
            inner: Inner::Ip(ETH_P_IPV6),
        },
        IPPROTO_GRE => gre(b, off)?,
        IPPROTO_UDP => {
            let u: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedL4)?;
            let dport = be16([u[2], u[3]]);
            if dport == 0 {
                return Ok(None);
            }
            if dport == decap.vxlan_port {
                vxlan(b, off + 8)?
            } else if dport == decap.geneve_port {
                geneve(b, off + 8)?
            } else {
                return Ok(None);
            }
        }
        _ => return Ok(None),
    };
    if t.off >= ip.l3_offset + ip.l3_len as usize {
        // The tunnel header says its payload starts past its packet.
        return Err(ParseError::BadTunnel);
    }
    Ok(Some(t))
}

/// A GRE header (version 0) at `off`.
#[inline(always)]
fn gre<B: PacketBytes + ?Sized>(b: &B, off: usize) -> Result<Tunnel> {
    let h: [u8; 8] = match b.load(off) {
        Some(h) => h,
        None => {
            // A GRE header without options is 4 bytes: the inner header
            // would then be cut short anyway.
            let h: [u8; 4] = b.load(off).ok_or(ParseError::TruncatedTunnel)?;
            [h[0], h[1], h[2], h[3], 0, 0, 0, 0]
        }
    };
    let flags = be16([h[0], h[1]]);
    if flags & !(GRE_CSUM | GRE_KEY | GRE_SEQ) != 0 {
        // Routing present, strict source route, recursion, reserved bits
        // or a version other than 0 (PPTP's enhanced GRE is version 1).
        return Err(ParseError::BadTunnel);
    }
    let mut len = 4;
    if flags & GRE_CSUM != 0 {
        len += 4;
    }
    let vni = if flags & GRE_KEY != 0 {
        let k: [u8; 4] = b.load(off + len).ok_or(ParseError::TruncatedTunnel)?;
        len += 4;
        Some(be32(k))
    } else {
        None
    };
    if flags & GRE_SEQ != 0 {
        len += 4;
    }
    let (kind, inner) = match be16([h[2], h[3]]) {
        ETH_P_IPV4 => (TunnelKind::Gre, Inner::Ip(ETH_P_IPV4)),
        ETH_P_IPV6 => (TunnelKind::Gre, Inner::Ip(ETH_P_IPV6)),
        ETH_P_TEB => (TunnelKind::GreTap, Inner::Ethernet),
        _ => return Err(ParseError::NotIp),
    };
    Ok(Tunnel {
        kind,
        vni,
        off: off + len,
        inner,
    })
}

/// A VXLAN header at `off` (after its UDP header): flags (the I bit says
/// the VNI is valid), reserved, the 24-bit VNI, reserved; then Ethernet.
#[inline(always)]
fn vxlan<B: PacketBytes + ?Sized>(b: &B, off: usize) -> Result<Tunnel> {
    let h: [u8; 8] = b.load(off).ok_or(ParseError::TruncatedTunnel)?;
    if h[0] & 0x08 == 0 {
        return Err(ParseError::BadTunnel);
    }
    Ok(Tunnel {
        kind: TunnelKind::Vxlan,
        vni: Some(be32([h[4], h[5], h[6], h[7]]) >> 8),
        off: off + 8,
        inner: Inner::Ethernet,
    })
}

/// A Geneve header at `off` (after its UDP header): version and options
/// length (in 4-byte words), flags, protocol type, 24-bit VNI; options;
/// then Ethernet or IP.
#[inline(always)]
fn geneve<B: PacketBytes + ?Sized>(b: &B, off: usize) -> Result<Tunnel> {
    let h: [u8; 8] = b.load(off).ok_or(ParseError::TruncatedTunnel)?;
    if h[0] >> 6 != 0 {
        return Err(ParseError::BadTunnel);
    }
    let opts = ((h[0] & 0x3f) as usize) * 4;
    let inner = match be16([h[2], h[3]]) {
        ETH_P_TEB => Inner::Ethernet,
        ETH_P_IPV4 => Inner::Ip(ETH_P_IPV4),
        ETH_P_IPV6 => Inner::Ip(ETH_P_IPV6),
        _ => return Err(ParseError::NotIp),
    };
    Ok(Tunnel {
        kind: TunnelKind::Geneve,
        vni: Some(be32([h[4], h[5], h[6], h[7]]) >> 8),
        off: off + 8 + opts,
        inner,
    })
}

#[inline(always)]
fn ipv4<B: PacketBytes + ?Sized>(b: &B, off: usize, wire_len: u32) -> Result<Ip> {
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
    Ok(Ip {
        src: v4_mapped(src),
        dst: v4_mapped(dst),
        family: 4,
        proto: h[9],
        more_fragments,
        l3_offset: off,
        l4_offset: b.opaque(off + ihl as usize),
        l3_len: tot_len,
        l4_len: tot_len - ihl,
    })
}

#[inline(always)]
fn ipv6<B: PacketBytes + ?Sized>(b: &B, off: usize, wire_len: u32) -> Result<Ip> {
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
        pos = b.opaque(pos);
        match next {
            IPPROTO_TCP | IPPROTO_UDP | IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE => break,
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
    if !matches!(
        next,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE
    ) {
        return Err(ParseError::TooManyHeaders);
    }
    let ext_len = b.opaque(ext_len as usize) as u32;
    if ext_len > payload_len {
        return Err(ParseError::BadL3);
    }
    Ok(Ip {
        src,
        dst,
        family: 6,
        proto: next,
        more_fragments,
        l3_offset: off,
        l4_offset: b.opaque(pos),
        l3_len: 40 + payload_len,
        l4_len: payload_len - ext_len,
    })
}

/// Parses the TCP/UDP header after `ip`; `tunnel` is the [`tunnel_id`]
/// of the tunnel it came through (0: none).
#[inline(always)]
fn transport<B: PacketBytes + ?Sized>(b: &B, ip: &Ip, tunnel: u32) -> Result<Parsed> {
    let (off, l4_len) = (ip.l4_offset, ip.l4_len);
    let (sport, dport, payload_len, tcp) = match ip.proto {
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
            let payload = if ip.more_fragments {
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
            src: ip.src,
            dst: ip.dst,
            sport,
            dport,
            proto: ip.proto,
            family: ip.family,
            _pad: [0; 2],
        },
        l3_len: ip.l3_len,
        payload_len,
        l3_offset: ip.l3_offset as u16,
        tcp,
        tunnel,
    })
}
