//! The per-connection record every front end prints: the JSON contract.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, UNIX_EPOCH};

use probe_common::DirCounters;
use serde::{Deserialize, Serialize, Serializer};

use crate::rtt::Rtts;
use crate::tags::Tags;

/// One connection, oriented from its initiator (`src`) to its responder.
///
/// Serialises to the JSON contract documented in the README; fields may be
/// added, never renamed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub proto: &'static str,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    /// Where it was seen: pcapng interface number, or interface index live.
    pub iface: u32,
    #[serde(serialize_with = "rfc3339")]
    pub first_seen: u64,
    #[serde(serialize_with = "rfc3339")]
    pub last_seen: u64,
    /// src → dst.
    pub sent: DirStats,
    /// dst → src.
    pub received: DirStats,
    /// Round-trip times from packet timestamps (TCP, userspace table only;
    /// absent when no segment was answered).
    #[serde(skip_serializing_if = "Rtts::is_none")]
    pub rtt: Rtts,
    /// Tags of the initiator's end (process attribution fills them; a query
    /// groups and filters by them like `ip` or `port`).
    #[serde(skip_serializing_if = "Tags::is_empty")]
    pub src_tags: Tags,
    /// Tags of the responder's end.
    #[serde(skip_serializing_if = "Tags::is_empty")]
    pub dst_tags: Tags,
}

/// Counters of one direction; see the README for exact meanings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    pub l3_bytes: u64,
    pub retransmits: u64,
    pub retransmitted_bytes: u64,
    pub probes: u64,
    pub gaps: u64,
}

impl DirStats {
    /// Adds every counter of `o` (another record's same direction).
    pub fn add(&mut self, o: &DirStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.l3_bytes += o.l3_bytes;
        self.retransmits += o.retransmits;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.probes += o.probes;
        self.gaps += o.gaps;
    }
}

impl From<&DirCounters> for DirStats {
    fn from(c: &DirCounters) -> DirStats {
        DirStats {
            packets: c.packets,
            bytes: c.bytes,
            l3_bytes: c.l3_bytes,
            retransmits: c.retransmits,
            retransmitted_bytes: c.retransmitted_bytes,
            probes: c.probes,
            gaps: c.gaps,
        }
    }
}

/// Renders the stored 16-byte address in its own family.
/// `a` as [`ip`] reads it back: its family (4 or 6) and 16 bytes, an IPv4
/// address mapped.
pub(crate) fn octets(a: IpAddr) -> (u8, [u8; 16]) {
    match a {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
        IpAddr::V6(v6) => (6, v6.octets()),
    }
}

pub(crate) fn ip(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == 4 {
        IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*a))
    }
}

/// Nanoseconds since the Unix epoch as RFC 3339 UTC with nanoseconds:
/// exact (a JSON float is not) and sortable as text.
pub(crate) fn rfc3339<S: Serializer>(ns: &u64, s: S) -> Result<S::Ok, S::Error> {
    let t = UNIX_EPOCH + Duration::from_nanos(*ns);
    s.collect_str(&humantime::format_rfc3339_nanos(t))
}
