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
//! Memory is one small entry per record the source still lists: a record
//! the source retires (`Reading::retired` in `flowprobe run`) is
//! [`forget`](Deltas::forget)-ten once its last change was taken.

use std::net::IpAddr;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::conn::{ip, octets, Connection, DirStats};

/// A connection's 5-tuple and interface; several records can share it.
/// Packed in 44 bytes (a tuple of them takes 64): one is held per listed
/// record, here and in the run's memo.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    ips: [[u8; 16]; 2],
    iface: u32,
    ports: [u16; 2],
    /// Index in [`PROTOS`].
    proto: u8,
    /// Bit 0: the source address is IPv6, bit 1: the destination.
    v6: u8,
}

/// The protocols a [`Connection`] has.
const PROTOS: [&str; 2] = ["tcp", "udp"];

pub fn key(c: &Connection) -> Key {
    Key::new(c.proto, c.src, c.sport, c.dst, c.dport, c.iface)
}

impl Key {
    fn new(proto: &str, src: IpAddr, sport: u16, dst: IpAddr, dport: u16, iface: u32) -> Key {
        let ((sf, s), (df, d)) = (octets(src), octets(dst));
        Key {
            ips: [s, d],
            iface,
            ports: [sport, dport],
            proto: PROTOS
                .iter()
                .position(|p| *p == proto)
                .map_or(u8::MAX, |i| i as u8),
            v6: u8::from(sf == 6) | u8::from(df == 6) << 1,
        }
    }

    fn ip(&self, i: usize) -> IpAddr {
        let family = if self.v6 >> i & 1 == 1 { 6 } else { 4 };
        ip(family, &self.ips[i])
    }
}

/// Two readings of one record differ in `first_seen` by less than this.
pub const SAME_RECORD_NS: u64 = 1_000_000;

/// One record's `first_seen` and counters when last taken.
type Prev = (u64, DirStats, DirStats);

/// A key's records: nearly always one, kept in the map's own entry (a
/// `Vec` would allocate room for four).
type Records = SmallVec<[Prev; 1]>;

/// The counters of every record when its change was last taken.
#[derive(Default)]
pub struct Deltas {
    prev: FxHashMap<Key, Records>,
    records: usize,
}

/// One record's change since it was last taken (its totals the first time).
pub struct Change<'a> {
    pub conn: &'a Connection,
    pub sent: DirStats,
    pub received: DirStats,
    /// The index among its key's records ([`since`]: 0), `None` for a
    /// new record.
    found: Option<usize>,
}

impl Change<'_> {
    /// Its first change: the record is new.
    pub fn is_new(&self) -> bool {
        self.found.is_none()
    }
}

/// `now - before`, per counter (a counter never shrinks; saturating keeps a
/// record read torn across a drain from going negative).
pub fn sub(now: &DirStats, before: &DirStats) -> DirStats {
    DirStats {
        packets: now.packets.saturating_sub(before.packets),
        bytes: now.bytes.saturating_sub(before.bytes),
        l3_bytes: now.l3_bytes.saturating_sub(before.l3_bytes),
        retransmits: now.retransmits.saturating_sub(before.retransmits),
        retransmitted_bytes: now
            .retransmitted_bytes
            .saturating_sub(before.retransmitted_bytes),
        probes: now.probes.saturating_sub(before.probes),
        gaps: now.gaps.saturating_sub(before.gaps),
    }
}

/// The records of `conns` that changed since `before`, the reading that
/// came before them (a record not in it is new: its totals count), in
/// their order. For a stage that keeps the last reading anyway: nothing of
/// its own is kept between readings, and what it indexes here is freed on
/// return. A record that the source stops listing must be retired, not
/// left out: listed again, it would count as new.
pub fn since<'a>(
    before: &[Connection],
    conns: impl IntoIterator<Item = &'a Connection>,
) -> Vec<Change<'a>> {
    let mut index: FxHashMap<Key, SmallVec<[u32; 1]>> = FxHashMap::default();
    index.reserve(before.len());
    for (i, c) in before.iter().enumerate() {
        index.entry(key(c)).or_default().push(i as u32);
    }
    let mut out = Vec::new();
    for c in conns {
        let found = index.get(&key(c)).and_then(|at| {
            at.iter()
                .map(|&i| &before[i as usize])
                .find(|b| b.first_seen.abs_diff(c.first_seen) < SAME_RECORD_NS)
        });
        let (sent, received) = match found {
            Some(b) => (b.sent, b.received),
            None => Default::default(),
        };
        if (c.sent, c.received) == (sent, received) {
            continue;
        }
        out.push(Change {
            conn: c,
            sent: sub(&c.sent, &sent),
            received: sub(&c.received, &received),
            found: found.map(|_| 0),
        });
    }
    out
}

/// One record as last taken, to save and [`Deltas::restore`] (a restarted
/// agent continues the deltas of the one before, docs/restart.md).
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

fn taken(k: &Key, p: &Prev) -> Taken {
    Taken {
        proto: PROTOS
            .get(usize::from(k.proto))
            .unwrap_or(&"other")
            .to_string(),
        src: k.ip(0),
        sport: k.ports[0],
        dst: k.ip(1),
        dport: k.ports[1],
        iface: k.iface,
        first_seen: p.0,
        sent: p.1,
        received: p.2,
    }
}

impl Deltas {
    /// Every record as last taken.
    pub fn saved(&self) -> Vec<Taken> {
        let mut out: Vec<Taken> = self
            .prev
            .iter()
            .flat_map(|(k, records)| records.iter().map(move |p| taken(k, p)))
            .collect();
        out.sort_by_key(|t| (t.first_seen, t.sport, t.dport));
        out
    }

    /// The records of `conns` as last taken.
    pub fn saved_of<'a>(&self, conns: impl IntoIterator<Item = &'a Connection>) -> Vec<Taken> {
        let mut out = Vec::new();
        for c in conns {
            let k = key(c);
            if let Some(records) = self.prev.get(&k) {
                out.extend(
                    records
                        .iter()
                        .filter(|r| r.0.abs_diff(c.first_seen) < SAME_RECORD_NS)
                        .map(|p| taken(&k, p)),
                );
            }
        }
        out
    }

    /// Takes `saved` records as taken (added to those it has); those of an
    /// unknown protocol are skipped. Returns how many it took.
    pub fn restore(&mut self, saved: &[Taken]) -> usize {
        let mut n = 0;
        for t in saved {
            if !PROTOS.contains(&t.proto.as_str()) {
                continue;
            }
            let k = Key::new(&t.proto, t.src, t.sport, t.dst, t.dport, t.iface);
            self.prev
                .entry(k)
                .or_default()
                .push((t.first_seen, t.sent, t.received));
            self.records += 1;
            n += 1;
        }
        n
    }

    /// Forgets every record none of `conns` is (after a restart: the
    /// records the source no longer has). Returns how many it forgot.
    pub fn retain<'a>(&mut self, conns: impl IntoIterator<Item = &'a Connection>) -> usize {
        let mut listed: FxHashMap<Key, Vec<u64>> = FxHashMap::default();
        for c in conns {
            listed.entry(key(c)).or_default().push(c.first_seen);
        }
        let before = self.records;
        let mut empty: FxHashSet<Key> = FxHashSet::default();
        for (k, records) in &mut self.prev {
            let seen = listed.get(k).map(Vec::as_slice).unwrap_or_default();
            records.retain(|r| seen.iter().any(|f| r.0.abs_diff(*f) < SAME_RECORD_NS));
            if records.is_empty() {
                empty.insert(*k);
            }
        }
        self.prev.retain(|k, _| !empty.contains(k));
        self.records = self.prev.values().map(|r| r.len()).sum();
        before - self.records
    }

    /// The records of `conns` that changed since they were last taken, in
    /// their order. Nothing is taken until [`Deltas::commit`].
    pub fn changes<'a>(&self, conns: impl IntoIterator<Item = &'a Connection>) -> Vec<Change<'a>> {
        let mut out = Vec::new();
        for c in conns {
            let found = self.prev.get(&key(c)).and_then(|records| {
                records
                    .iter()
                    .position(|r| r.0.abs_diff(c.first_seen) < SAME_RECORD_NS)
            });
            let before = match found {
                Some(i) => self.prev[&key(c)][i],
                None => (c.first_seen, DirStats::default(), DirStats::default()),
            };
            if (c.sent, c.received) == (before.1, before.2) {
                continue;
            }
            out.push(Change {
                conn: c,
                sent: sub(&c.sent, &before.1),
                received: sub(&c.received, &before.2),
                found,
            });
        }
        out
    }

    /// Takes `changes`: the next [`Deltas::changes`] counts from here.
    pub fn commit(&mut self, changes: &[Change<'_>]) {
        for ch in changes {
            let c = ch.conn;
            let now = (c.first_seen, c.sent, c.received);
            let records = self.prev.entry(key(c)).or_default();
            match ch.found {
                Some(i) => records[i] = now,
                None => {
                    records.push(now);
                    self.records += 1;
                }
            }
        }
    }

    /// Forgets records the source will not list again.
    pub fn forget<'a>(&mut self, retired: impl IntoIterator<Item = &'a Connection>) {
        for c in retired {
            let k = key(c);
            let Some(records) = self.prev.get_mut(&k) else {
                continue;
            };
            let before = records.len();
            records.retain(|r| r.0.abs_diff(c.first_seen) >= SAME_RECORD_NS);
            self.records -= before - records.len();
            if records.is_empty() {
                self.prev.remove(&k);
            }
        }
    }

    /// Records remembered now.
    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn conn(sport: u16, sent_bytes: u64) -> Connection {
        Connection {
            proto: "tcp",
            src: IpAddr::from([10, 0, 0, 1]),
            sport,
            dst: IpAddr::from([10, 0, 0, 2]),
            dport: 80,
            iface: 2,
            first_seen: 1_700_000_000_000_000_000,
            last_seen: 1_700_000_001_000_000_000,
            sent: DirStats {
                packets: sent_bytes / 100,
                bytes: sent_bytes,
                ..DirStats::default()
            },
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
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
            (c.src, c.dst, c.proto) = (src.parse().unwrap(), dst.parse().unwrap(), proto);
            let mut d = Deltas::default();
            let ch = d.changes([&c]);
            d.commit(&ch);
            let saved = d.saved();
            let t = &saved[0];
            assert_eq!(
                (t.proto.as_str(), t.src, t.sport, t.dst, t.dport, t.iface),
                (c.proto, c.src, c.sport, c.dst, c.dport, c.iface)
            );
            let mut again = Deltas::default();
            assert_eq!(again.restore(&saved), 1);
            assert!(
                again.changes([&c]).is_empty(),
                "{src} -> {dst}: restored as taken"
            );
        }
    }

    fn take(d: &mut Deltas, conns: &[Connection]) -> Vec<(u16, u64)> {
        let ch = d.changes(conns);
        let got = ch.iter().map(|c| (c.conn.sport, c.sent.bytes)).collect();
        d.commit(&ch);
        got
    }

    #[test]
    fn saved_records_restore_and_unlisted_ones_are_forgotten() {
        let mut d = Deltas::default();
        take(&mut d, &[conn(1, 100), conn(2, 50)]);
        let saved = d.saved();
        assert_eq!(saved.len(), 2);
        assert_eq!(d.saved_of(&[conn(2, 70)]), [saved[1].clone()]);
        let mut e = Deltas::default();
        assert_eq!(e.restore(&saved), 2);
        // The restored baseline goes on where the first stopped.
        assert_eq!(take(&mut e, &[conn(1, 130), conn(2, 50)]), [(1, 30)]);
        assert_eq!(e.retain(&[conn(1, 130)]), 1);
        assert_eq!(e.len(), 1);
        assert_eq!(take(&mut e, &[conn(2, 60)]), [(2, 60)]);
    }

    #[test]
    fn changes_sum_to_totals_and_forgotten_records_free_their_entry() {
        let mut d = Deltas::default();
        assert_eq!(
            take(&mut d, &[conn(1, 100), conn(2, 50)]),
            [(1, 100), (2, 50)]
        );
        assert_eq!(take(&mut d, &[conn(1, 250), conn(2, 50)]), [(1, 150)]);
        // Not committed: the next call counts from the same point.
        assert_eq!(d.changes(&[conn(1, 300)]).len(), 1);
        assert_eq!(take(&mut d, &[conn(1, 400)]), [(1, 150)]);
        assert_eq!(d.len(), 2);
        d.forget(&[conn(1, 400)]);
        assert_eq!(d.len(), 1);
        // A jittered first_seen is the same record; a reuse is not.
        let mut jitter = conn(2, 50);
        jitter.first_seen += 20;
        assert!(d.changes(&[jitter]).is_empty());
        let mut reused = conn(2, 10);
        reused.first_seen += 1_000_000_000;
        assert_eq!(take(&mut d, &[reused]), [(2, 10)]);
        assert_eq!(d.len(), 2);
    }
}
