//! The per-connection record every front end prints: the JSON contract.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, UNIX_EPOCH};

use probe_common::{DirCounters, L4Proto};
use serde::{Deserialize, Serialize, Serializer};

use crate::rtt::Rtts;
use crate::tags::Tags;

/// A connection's transport protocol, shown as `tcp` or `udp` (one byte
/// in a [`Connection`], where a name took sixteen).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// From its name as shown (`"tcp"` or `"udp"`).
    pub fn from_name(name: &str) -> Option<Proto> {
        match name {
            "tcp" => Some(Proto::Tcp),
            "udp" => Some(Proto::Udp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }

    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => L4Proto::Tcp as u8,
            Proto::Udp => L4Proto::Udp as u8,
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Proto {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// One connection, oriented from its initiator (`src`) to its responder.
///
/// Serialises to the JSON contract documented in the README; fields may be
/// added, never renamed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Connection {
    pub proto: Proto,
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
///
/// The four counters of data sent again or missed ([`Loss`]) are zero for
/// most connections, so they are kept apart, in a box made only when one
/// is not: a direction takes 32 bytes of a listed [`Connection`], not 56.
/// Serialises as the seven counters, as it always did.
#[derive(Clone, Debug, Default)]
pub struct DirStats {
    pub packets: u64,
    pub bytes: u64,
    pub l3_bytes: u64,
    loss: Option<Box<Loss>>,
}

/// Data sent again or missed, in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loss {
    pub retransmits: u64,
    pub retransmitted_bytes: u64,
    pub probes: u64,
    pub gaps: u64,
}

impl Loss {
    fn is_zero(&self) -> bool {
        *self == Loss::default()
    }

    fn add(&mut self, o: &Loss) {
        self.retransmits += o.retransmits;
        self.retransmitted_bytes += o.retransmitted_bytes;
        self.probes += o.probes;
        self.gaps += o.gaps;
    }

    /// `self - before`, per counter, never below zero.
    pub fn saturating_sub(&self, before: &Loss) -> Loss {
        Loss {
            retransmits: self.retransmits.saturating_sub(before.retransmits),
            retransmitted_bytes: self
                .retransmitted_bytes
                .saturating_sub(before.retransmitted_bytes),
            probes: self.probes.saturating_sub(before.probes),
            gaps: self.gaps.saturating_sub(before.gaps),
        }
    }
}

impl DirStats {
    /// Packets and bytes, nothing lost.
    pub fn counts(packets: u64, bytes: u64, l3_bytes: u64) -> DirStats {
        DirStats {
            packets,
            bytes,
            l3_bytes,
            loss: None,
        }
    }

    pub fn with_loss(mut self, loss: Loss) -> DirStats {
        self.set_loss(loss);
        self
    }

    pub fn loss(&self) -> Loss {
        self.loss.as_deref().copied().unwrap_or_default()
    }

    pub fn set_loss(&mut self, loss: Loss) {
        self.loss = (!loss.is_zero()).then(|| Box::new(loss));
    }

    pub fn retransmits(&self) -> u64 {
        self.loss.as_ref().map_or(0, |l| l.retransmits)
    }

    pub fn retransmitted_bytes(&self) -> u64 {
        self.loss.as_ref().map_or(0, |l| l.retransmitted_bytes)
    }

    pub fn probes(&self) -> u64 {
        self.loss.as_ref().map_or(0, |l| l.probes)
    }

    pub fn gaps(&self) -> u64 {
        self.loss.as_ref().map_or(0, |l| l.gaps)
    }

    /// Adds every counter of `o` (another record's same direction).
    pub fn add(&mut self, o: &DirStats) {
        self.packets += o.packets;
        self.bytes += o.bytes;
        self.l3_bytes += o.l3_bytes;
        if let Some(l) = &o.loss {
            match &mut self.loss {
                Some(mine) => mine.add(l),
                None => self.loss = Some(l.clone()),
            }
        }
    }
}

impl PartialEq for DirStats {
    fn eq(&self, o: &DirStats) -> bool {
        (self.packets, self.bytes, self.l3_bytes) == (o.packets, o.bytes, o.l3_bytes)
            && self.loss() == o.loss()
    }
}

impl Eq for DirStats {}

/// [`DirStats`] as it is written: all seven counters.
#[derive(Serialize, Deserialize)]
struct Flat {
    packets: u64,
    bytes: u64,
    l3_bytes: u64,
    retransmits: u64,
    retransmitted_bytes: u64,
    probes: u64,
    gaps: u64,
}

impl Serialize for DirStats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let l = self.loss();
        Flat {
            packets: self.packets,
            bytes: self.bytes,
            l3_bytes: self.l3_bytes,
            retransmits: l.retransmits,
            retransmitted_bytes: l.retransmitted_bytes,
            probes: l.probes,
            gaps: l.gaps,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for DirStats {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<DirStats, D::Error> {
        let f = Flat::deserialize(d)?;
        Ok(
            DirStats::counts(f.packets, f.bytes, f.l3_bytes).with_loss(Loss {
                retransmits: f.retransmits,
                retransmitted_bytes: f.retransmitted_bytes,
                probes: f.probes,
                gaps: f.gaps,
            }),
        )
    }
}

impl From<&DirCounters> for DirStats {
    fn from(c: &DirCounters) -> DirStats {
        DirStats::counts(c.packets, c.bytes, c.l3_bytes).with_loss(Loss {
            retransmits: c.retransmits,
            retransmitted_bytes: c.retransmitted_bytes,
            probes: c.probes,
            gaps: c.gaps,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The loss counters are boxed only while one is not zero, and a
    /// direction compares, adds and serialises as the seven counters it
    /// always was.
    #[test]
    fn a_direction_is_its_seven_counters() {
        let plain = DirStats::counts(3, 300, 456);
        let lost = Loss {
            retransmits: 1,
            retransmitted_bytes: 100,
            probes: 0,
            gaps: 2,
        };
        let lossy = plain.clone().with_loss(lost);
        assert!(plain.loss.is_none() && lossy.loss.is_some());
        let zero = plain.clone().with_loss(Loss::default());
        assert!(zero.loss.is_none());
        assert_eq!(zero, plain);
        assert_ne!(lossy, plain);
        let json = serde_json::to_string(&lossy).unwrap();
        assert_eq!(
            json,
            r#"{"packets":3,"bytes":300,"l3_bytes":456,"retransmits":1,"retransmitted_bytes":100,"probes":0,"gaps":2}"#
        );
        assert_eq!(serde_json::from_str::<DirStats>(&json).unwrap(), lossy);
        let back: DirStats = serde_json::from_str(&serde_json::to_string(&plain).unwrap()).unwrap();
        assert!(back.loss.is_none());
        let mut sum = plain.clone();
        sum.add(&plain);
        assert!(sum.loss.is_none());
        sum.add(&lossy);
        sum.add(&lossy);
        assert_eq!((sum.packets, sum.bytes, sum.l3_bytes), (12, 1200, 1824));
        assert_eq!(
            (
                sum.retransmits(),
                sum.retransmitted_bytes(),
                sum.probes(),
                sum.gaps()
            ),
            (2, 200, 0, 4)
        );
        assert_eq!(lossy.loss(), lost, "the added-to boxes are copies");
    }
}
