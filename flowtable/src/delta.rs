//! What each connection added since the last time it was looked at: the
//! JSON-lines export writes it, the rollups sum it per interval.
//!
//! A record is known by its 5-tuple, interface and `first_seen` (a reused
//! 5-tuple is a later record). Live times are the kernel's monotonic stamps
//! plus the wall clock's offset read at each reading, so one record's
//! `first_seen` moves by some nanoseconds between readings; a second record
//! of a 5-tuple starts after the first ended, in practice far later than
//! [`SAME_RECORD_NS`].
//!
//! Nothing is kept per record between readings but the last reading
//! itself ([`Last`]), which the agent keeps anyway: each stage that needs
//! a record's counters or tags as they were finds the record there.

use std::net::IpAddr;
use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::conn::{octets, Connection, DirStats, Proto};

/// A connection's 5-tuple and interface; several records can share it.
/// Packed in 44 bytes (a tuple of them takes 64): [`Last`] indexes every
/// record of a reading by one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    ips: [[u8; 16]; 2],
    iface: u32,
    ports: [u16; 2],
    proto: Proto,
    /// Bit 0: the source address is IPv6, bit 1: the destination.
    v6: u8,
}

fn key(c: &Connection) -> Key {
    let ((sf, s), (df, d)) = (octets(c.src), octets(c.dst));
    Key {
        ips: [s, d],
        iface: c.iface,
        ports: [c.sport, c.dport],
        proto: c.proto,
        v6: u8::from(sf == 6) | u8::from(df == 6) << 1,
    }
}

/// Two readings of one record differ in `first_seen` by less than this.
pub const SAME_RECORD_NS: u64 = 1_000_000;

/// One record's change since it was last taken (its totals the first time).
pub struct Change<'a> {
    pub conn: &'a Connection,
    pub sent: DirStats,
    pub received: DirStats,
    /// Not in the last reading.
    new: bool,
}

impl Change<'_> {
    /// Its first change: the record is new.
    pub fn is_new(&self) -> bool {
        self.new
    }
}

/// `now - before`, per counter (a counter never shrinks; saturating keeps a
/// record read torn across a drain from going negative).
pub fn sub(now: &DirStats, before: &DirStats) -> DirStats {
    DirStats::counts(
        now.packets.saturating_sub(before.packets),
        now.bytes.saturating_sub(before.bytes),
        now.l3_bytes.saturating_sub(before.l3_bytes),
    )
    .with_loss(now.loss().saturating_sub(&before.loss()))
}

/// The last reading's listed connections, kept (shared) until the next
/// reading, and found again by key: a stage that needs what a record was
/// at the last reading takes it from there, with nothing of its own kept
/// per record between readings. The index is made at the first
/// [`Last::find`] and goes with it.
#[derive(Default)]
pub struct Last {
    conns: Arc<Vec<Connection>>,
    index: Option<FxHashMap<Key, SmallVec<[u32; 1]>>>,
}

impl Last {
    pub fn new(conns: Arc<Vec<Connection>>) -> Last {
        Last { conns, index: None }
    }

    pub fn conns(&self) -> &Arc<Vec<Connection>> {
        &self.conns
    }

    /// The record `c` is a later reading of.
    pub fn find(&mut self, c: &Connection) -> Option<&Connection> {
        let conns = &self.conns;
        let index = self.index.get_or_insert_with(|| {
            let mut index: FxHashMap<Key, SmallVec<[u32; 1]>> = FxHashMap::default();
            index.reserve(conns.len());
            for (i, c) in conns.iter().enumerate() {
                index.entry(key(c)).or_default().push(i as u32);
            }
            index
        });
        index
            .get(&key(c))?
            .iter()
            .map(|&i| &conns[i as usize])
            .find(|b| b.first_seen.abs_diff(c.first_seen) < SAME_RECORD_NS)
    }
}

/// The records of `conns` that changed since `last`, the reading that came
/// before them (a record not in it is new: its totals count), in their
/// order. A record that the source stops listing must be retired, not
/// left out: listed again, it would count as new.
pub fn since<'a>(
    last: &mut Last,
    conns: impl IntoIterator<Item = &'a Connection>,
) -> Vec<Change<'a>> {
    let mut out = Vec::new();
    for c in conns {
        let found = last.find(c);
        let zero = DirStats::default();
        let (sent, received) = found.map_or((&zero, &zero), |b| (&b.sent, &b.received));
        if (&c.sent, &c.received) == (sent, received) {
            continue;
        }
        out.push(Change {
            conn: c,
            sent: sub(&c.sent, sent),
            received: sub(&c.received, received),
            new: found.is_none(),
        });
    }
    out
}

/// One record as last taken, to save and restore as a [`Last`] (a
/// restarted agent continues the deltas of the one before,
/// docs/restart.md).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taken {
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub iface: u32,
    pub first_seen: u64,
    pub sent: DirStats,
    pub received: DirStats,
}

impl Taken {
    /// `c` as it is now.
    pub fn of(c: &Connection) -> Taken {
        Taken {
            proto: c.proto.name().to_owned(),
            src: c.src,
            sport: c.sport,
            dst: c.dst,
            dport: c.dport,
            iface: c.iface,
            first_seen: c.first_seen,
            sent: c.sent.clone(),
            received: c.received.clone(),
        }
    }

    /// The record as a connection with these counters (and nothing else),
    /// for [`Last`]; `None` for a protocol a connection does not have.
    pub fn connection(&self) -> Option<Connection> {
        let proto = Proto::from_name(&self.proto)?;
        Some(Connection {
            proto,
            src: self.src,
            sport: self.sport,
            dst: self.dst,
            dport: self.dport,
            iface: self.iface,
            first_seen: self.first_seen,
            last_seen: self.first_seen,
            sent: self.sent.clone(),
            received: self.received.clone(),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn conn(sport: u16, sent_bytes: u64) -> Connection {
        Connection {
            proto: crate::Proto::Tcp,
            src: IpAddr::from([10, 0, 0, 1]),
            sport,
            dst: IpAddr::from([10, 0, 0, 2]),
            dport: 80,
            iface: 2,
            first_seen: 1_700_000_000_000_000_000,
            last_seen: 1_700_000_001_000_000_000,
            sent: DirStats::counts(sent_bytes / 100, sent_bytes, 0),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
    }

    fn last(conns: &[Connection]) -> Last {
        Last::new(Arc::new(conns.to_vec()))
    }

    #[test]
    fn saved_records_name_their_connection_as_it_was() {
        // IPv4, IPv6, and an IPv4-mapped IPv6 address, which stays IPv6.
        let ends: [(&str, &str, &'static str); 3] = [
            ("10.0.0.1", "10.0.0.2", "tcp"),
            ("fd00::1", "fd00::2", "udp"),
            ("::ffff:10.0.0.1", "10.0.0.2", "tcp"),
        ];
        for (src, dst, proto) in ends {
            let mut c = conn(4000, 500);
            (c.src, c.dst, c.proto) = (
                src.parse().unwrap(),
                dst.parse().unwrap(),
                Proto::from_name(proto).unwrap(),
            );
            let t = Taken::of(&c);
            let json = serde_json::to_string(&t).unwrap();
            let again: Taken = serde_json::from_str(&json).unwrap();
            let restored = again.connection().unwrap();
            assert_eq!(
                (restored.proto, restored.src, restored.sport, restored.dst),
                (c.proto, c.src, c.sport, c.dst)
            );
            assert!(
                since(&mut last(&[restored]), [&c]).is_empty(),
                "{src} -> {dst}: restored as taken"
            );
        }
        let mut t = Taken::of(&conn(1, 1));
        t.proto = "sctp".to_owned();
        assert!(t.connection().is_none());
    }

    fn take(before: &[Connection], conns: &[Connection]) -> Vec<(u16, u64, bool)> {
        since(&mut last(before), conns)
            .iter()
            .map(|c| (c.conn.sport, c.sent.bytes, c.is_new()))
            .collect()
    }

    #[test]
    fn changes_sum_to_totals() {
        assert_eq!(
            take(&[], &[conn(1, 100), conn(2, 50)]),
            [(1, 100, true), (2, 50, true)]
        );
        assert_eq!(
            take(&[conn(1, 100), conn(2, 50)], &[conn(1, 250), conn(2, 50)]),
            [(1, 150, false)]
        );
        // A jittered first_seen is the same record; a reuse is not.
        let mut jitter = conn(2, 50);
        jitter.first_seen += 20;
        assert!(take(&[conn(2, 50)], &[jitter]).is_empty());
        let mut reused = conn(2, 10);
        reused.first_seen += 1_000_000_000;
        assert_eq!(take(&[conn(2, 50)], &[reused.clone()]), [(2, 10, true)]);
        // Both records of the 5-tuple listed: each found as itself.
        assert_eq!(
            take(&[conn(2, 50), reused.clone()], &[conn(2, 60), reused]),
            [(2, 10, false)]
        );
    }
}
