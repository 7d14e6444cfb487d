//! Moves connections that are over from the kernel's map to userspace while
//! `run` runs, so that the map holds only live connections and a busy host
//! does not fill it.
//!
//! A connection is drained once it has been quiet for `closed_after` after
//! closing (FIN both ways or an RST; the wait lets late ACKs and
//! retransmitted FINs land in the same entry), or for `idle_after` whatever
//! its state (UDP, or TCP whose end was not seen). Its slot is taken out of
//! use first, then read once no CPU is updating it
//! (`probe_common::slots::drain`), so no count is lost. A packet that comes
//! after that makes a new entry; if that one did not start with a SYN it is
//! the same connection's tail, added to the drained record when it is
//! drained in turn, and meanwhile in [`Drainer::connections`] (its tracker
//! starts afresh, so a retransmission in that tail counts as new data).
//! A SYN on the 5-tuple of a connection that is over, or of such a tail,
//! opens a new connection: the kernel sets the old entry aside (`ENDED`)
//! and the next pass drains it, whatever its age, before the new one.
//!
//! A drained record is listed for `keep` after it was drained, then
//! retired: given once more in [`Listing::retired`] and forgotten, so
//! that memory holds the connections of the last `keep`, not of the whole
//! run. A tail that comes after its record retired is a record of its own.
//!
//! With `run --state-dir` (docs/restart.md) the kernel keeps each drained
//! record's slots `DRAINING` until the record retired and its last counts
//! were recorded ([`Drainer::committed`]); a run that adopts the table
//! takes those slots back as drained records ([`Drainer::restore`]), so a
//! restart loses no drained connection and lists none twice.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use flowtable::Connection;
use probe_common::{initiator::evidence, ConnKey, FlowEntry};

use super::kernel_table::{key_hash, Drained, Held, KernelTable, Listed};

pub struct Drainer {
    pub closed_after: Duration,
    pub idle_after: Duration,
    /// How long a drained record is listed before it is retired.
    pub keep: Duration,
    /// Drained connections in the order they were drained, each with the
    /// tails drained after it added in, and when it was drained
    /// (monotonic ns), and the kernel slots still holding it.
    done: VecDeque<(ConnKey, FlowEntry, u64, Vec<Held>)>,
    /// Held slots of retired records, to free once recorded.
    retired_slots: Vec<Held>,
    /// The number of the first record in `done` (records are numbered in
    /// drain order from 0 and leave from the front).
    base: usize,
    /// The number of each key's latest record: what a tail continues.
    latest: HashMap<ConnKey, usize>,
}

/// The connections of one read.
pub struct Listing {
    /// Drained records not yet retired, then the map's entries.
    pub conns: Vec<Connection>,
    /// Records listed for the last time.
    pub retired: Vec<Connection>,
}

/// `e`, a later entry of a key, continues that key's latest record rather
/// than starting a connection of its own: it did not start with a SYN (a
/// SYN on a 5-tuple whose connection is over makes the kernel start a new
/// entry, `probe_common::slots`).
fn is_tail(e: &FlowEntry) -> bool {
    e.evidence < evidence::SYN
}

impl Drainer {
    pub fn new(closed_after: Duration, idle_after: Duration, keep: Duration) -> Drainer {
        Drainer {
            closed_after,
            idle_after,
            keep,
            done: VecDeque::new(),
            retired_slots: Vec::new(),
            base: 0,
            latest: HashMap::new(),
        }
    }

    /// Drained records held now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.done.len()
    }

    /// How often to look: often enough that a closed connection leaves
    /// within about `closed_after`, never more than once per 50 ms.
    pub fn every(&self) -> Duration {
        (self.closed_after / 2).clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// One pass over the table at `now_ns` (CLOCK_MONOTONIC, the clock of
    /// the kernel's timestamps). Returns how many entries it moved.
    pub fn pass(&mut self, table: &mut KernelTable, now_ns: u64) -> usize {
        let (idle, closed) = (self.idle_after, self.closed_after);
        let due = |e: &FlowEntry| {
            let quiet =
                Duration::from_nanos(now_ns.saturating_sub(e.last_seen_ns().max(e.first_seen_ns)));
            quiet >= idle || (e.closed() && quiet >= closed)
        };
        let mut moved = Vec::new();
        table.drain(due, &mut moved);
        let n = moved.len();
        self.absorb(moved, now_ns);
        n
    }

    /// Keeps entries drained in one pass (in the order they began, so that
    /// a tail follows what it continues): a tail is added to its key's
    /// latest record, anything else is a record of its own.
    fn absorb(&mut self, moved: Vec<Drained>, now_ns: u64) {
        for (k, e, slots) in moved {
            match self.latest.get(&k) {
                // A tail starts later, so the drained record keeps its
                // first_seen.
                Some(&n) if is_tail(&e) => {
                    let d = &mut self.done[n - self.base];
                    d.1.absorb(&e);
                    d.3.extend(slots);
                }
                _ => {
                    self.latest.insert(k, self.base + self.done.len());
                    self.done.push_back((k, e, now_ns, slots));
                }
            }
        }
    }

    /// Takes the records a run that is gone drained and had not retired
    /// (slots the kernel still holds `DRAINING`) as drained now. Returns
    /// how many records.
    pub fn restore(&mut self, table: &mut KernelTable, now_ns: u64) -> usize {
        let mut held = Vec::new();
        table.held(&mut held);
        let n = held.len();
        self.absorb(held, now_ns);
        n
    }

    /// The held slots of the records retired so far: freed once their
    /// last counts are recorded ([`Drainer::committed`]).
    pub fn releasing(&self) -> &[Held] {
        &self.retired_slots
    }

    /// The last counts of every record retired so far are recorded: their
    /// held slots are freed.
    pub fn committed(&mut self, table: &mut KernelTable) {
        table.free(self.retired_slots.drain(..));
    }

    /// The drained records not yet retired plus the map's current entries
    /// (`live`, in the order they began, as [`KernelTable::order`] lists
    /// them, each read by `entry`), as connections. Two live slots of one
    /// key (an insert race) are one connection; an entry that continues a
    /// record (same key, not opened by a SYN: a tail) is added to the
    /// key's latest record, live or drained. Records drained `keep` or
    /// longer before `now_ns` are retired first.
    ///
    /// Only an entry whose key another slot or a drained record has can
    /// add to another record, which is rare: those are found by hash and
    /// read twice; every other entry is read once, when its connection is
    /// made.
    pub fn read(
        &mut self,
        live: &[Listed],
        entry: impl Fn(u32) -> Option<(ConnKey, FlowEntry, bool)>,
        clock_offset_ns: u64,
        now_ns: u64,
    ) -> Listing {
        let keep = self.keep.as_nanos() as u64;
        let mut retired = Vec::new();
        while let Some((k, e, at, _)) = self.done.front() {
            if now_ns.saturating_sub(*at) < keep {
                break;
            }
            retired.push(Connection::from_entry(k, e, clock_offset_ns));
            if self.latest.get(k) == Some(&self.base) {
                self.latest.remove(k);
            }
            if let Some((_, _, _, slots)) = self.done.pop_front() {
                self.retired_slots.extend(slots);
            }
            self.base += 1;
        }
        let shared: HashSet<u64> = {
            let mut h: Vec<u64> = live.iter().map(|l| l.2).collect();
            h.sort_unstable();
            h.windows(2)
                .filter(|w| w[0] == w[1])
                .map(|w| w[0])
                .chain(self.latest.keys().map(key_hash))
                .collect()
        };
        // Per listed slot: a record of its own, none (added to a drained
        // record, or gone), or the position of the record it adds to.
        let mut into = vec![OWN; live.len()];
        // Drained records that a live tail adds to, by number.
        let mut grown: HashMap<usize, FlowEntry> = HashMap::new();
        // The latest record of a key among `live`, and whether it is open
        // (not `ENDED`).
        let mut latest_own: HashMap<ConnKey, (u32, bool)> = HashMap::new();
        for (pos, &(_, slot, hash)) in live.iter().enumerate() {
            if !shared.contains(&hash) {
                continue;
            }
            let Some((k, e, ended)) = entry(slot) else {
                into[pos] = GONE;
                continue;
            };
            let tail = is_tail(&e);
            if let Some(&(j, open)) = latest_own.get(&k) {
                if tail || (open && !ended) {
                    into[pos] = j;
                    continue;
                }
            }
            if tail {
                if let Some(&n) = self.latest.get(&k) {
                    grown
                        .entry(n)
                        .or_insert(self.done[n - self.base].1)
                        .absorb(&e);
                    into[pos] = GONE;
                    continue;
                }
            }
            latest_own.insert(k, (pos as u32, !ended));
        }
        // (record, entry added to it), by record.
        let mut adds: Vec<(u32, u32)> = (0..live.len() as u32)
            .filter(|&p| into[p as usize] < GONE)
            .map(|p| (into[p as usize], p))
            .collect();
        adds.sort_unstable();
        let own = into.iter().filter(|&&j| j == OWN).count();
        let mut conns = Vec::with_capacity(self.done.len() + own);
        conns.extend(self.done.iter().enumerate().map(|(i, (k, e, _, _))| {
            let e = grown.get(&(self.base + i)).unwrap_or(e);
            Connection::from_entry(k, e, clock_offset_ns)
        }));
        let mut adds = adds.into_iter().peekable();
        for (pos, &(_, slot, _)) in live.iter().enumerate() {
            if into[pos] != OWN {
                continue;
            }
            let Some((k, mut e, _)) = entry(slot) else {
                continue;
            };
            while let Some((j, p)) = adds.next_if(|&(j, _)| j as usize <= pos) {
                if j as usize == pos {
                    if let Some((_, t, _)) = entry(live[p as usize].1) {
                        e.absorb(&t);
                    }
                }
            }
            conns.push(Connection::from_entry(&k, &e, clock_offset_ns));
        }
        Listing { conns, retired }
    }
}

/// [`Drainer::read`]'s marks for a listed slot: a record of its own, or
/// none.
const OWN: u32 = u32::MAX;
const GONE: u32 = u32::MAX - 1;

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::parse::tcp_flags;
    use probe_common::{ConnKey, FlowKey, L4Proto};

    fn key() -> ConnKey {
        let k = FlowKey {
            src: probe_common::key::v4_mapped([10, 0, 0, 1]),
            dst: probe_common::key::v4_mapped([10, 0, 0, 2]),
            sport: 40000,
            dport: 80,
            proto: L4Proto::Tcp as u8,
            family: 4,
            _pad: [0; 2],
        };
        ConnKey::of(&k, 3, 0).0
    }

    fn entry(first: u64, flags: u8, bytes: u64) -> FlowEntry {
        let k = key();
        let mut e = FlowEntry::new(first, 1, &k, Some(flags));
        e.dir[1].last_seen_ns = first + 10;
        e.counters[1].bytes = bytes;
        e.counters[1].packets = 1;
        e
    }

    fn drainer_with(done: Vec<(ConnKey, FlowEntry)>) -> Drainer {
        let mut d = Drainer::new(
            Duration::from_secs(2),
            Duration::from_secs(300),
            Duration::from_secs(60),
        );
        d.absorb(held(done), 0);
        d
    }

    fn held(records: Vec<(ConnKey, FlowEntry)>) -> Vec<Drained> {
        records
            .into_iter()
            .map(|(k, e)| (k, e, Vec::new()))
            .collect()
    }

    /// `d.read` of a table holding `live` (key, entry, ended), a slot each.
    fn read(d: &mut Drainer, live: &[(ConnKey, FlowEntry, bool)], now_ns: u64) -> Listing {
        let mut listed: Vec<Listed> = live
            .iter()
            .enumerate()
            .map(|(i, (k, e, _))| (e.first_seen_ns, i as u32, key_hash(k)))
            .collect();
        listed.sort_unstable();
        d.read(&listed, |i| live.get(i as usize).copied(), 0, now_ns)
    }

    fn bytes(conns: &[Connection]) -> Vec<(u64, u64)> {
        conns.iter().map(|c| (c.first_seen, c.sent.bytes)).collect()
    }

    #[test]
    fn reused_5_tuples_drained_and_live_stay_apart_and_tails_find_theirs() {
        let k = key();
        // Drained in one pass: a connection, its tail, the next connection
        // on the 5-tuple (which the kernel started at its SYN), its tail.
        let mut d = drainer_with(vec![
            (k, entry(1000, tcp_flags::SYN, 500)),
            (k, entry(3000, tcp_flags::ACK, 1)),
            (k, entry(4000, tcp_flags::SYN, 40)),
            (k, entry(6000, tcp_flags::ACK, 2)),
        ]);
        assert_eq!(
            bytes(&read(&mut d, &[], 0).conns),
            [(1000, 501), (4000, 42)]
        );
        // A later pass: a tail of the second.
        d.absorb(
            held(vec![(k, entry(7000, tcp_flags::FIN | tcp_flags::ACK, 3))]),
            0,
        );
        // In the map: a third connection the kernel ended when a fourth's
        // SYN came, a tail of the third, and the fourth.
        let live = [
            (k, entry(8000, tcp_flags::SYN, 70), true),
            (k, entry(8500, tcp_flags::ACK, 4), true),
            (k, entry(9000, tcp_flags::SYN, 90), false),
        ];
        assert_eq!(
            bytes(&read(&mut d, &live, 0).conns),
            [(1000, 501), (4000, 45), (8000, 74), (9000, 90)]
        );
        // Read again, nothing changed: the same records.
        let live = [
            (k, entry(9000, tcp_flags::SYN, 90), false),
            (k, entry(9500, tcp_flags::ACK, 5), false),
        ];
        assert_eq!(
            bytes(&read(&mut d, &live, 0).conns),
            [(1000, 501), (4000, 45), (9000, 95)]
        );
    }

    #[test]
    fn two_live_slots_of_one_key_are_one_connection_and_others_stay_apart() {
        let k = key();
        let mut other = k;
        other.lo_port += 1;
        let mut d = drainer_with(Vec::new());
        // An insert race: two slots of `k`, both opened by a SYN; another
        // key's connection began between them.
        let live = [
            (k, entry(1000, tcp_flags::SYN, 10), false),
            (other, entry(1500, tcp_flags::SYN, 7), false),
            (k, entry(2000, tcp_flags::SYN, 20), false),
        ];
        let conns = read(&mut d, &live, 0).conns;
        assert_eq!(bytes(&conns), [(1000, 30), (1500, 7)]);
        let high = |c: &Connection| c.sport.max(c.dport);
        assert_eq!((high(&conns[0]), high(&conns[1])), (40000, 40001));
    }

    #[test]
    fn a_tail_after_the_drain_adds_to_the_drained_record() {
        let k = key();
        let mut d = drainer_with(vec![(k, entry(1000, tcp_flags::SYN, 500))]);
        // A late ACK made a new entry after the drain: no SYN.
        let tail = entry(5000, tcp_flags::ACK, 7);
        let conns = read(&mut d, &[(k, tail, false)], 0).conns;
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].sent.bytes, 507);
        assert_eq!(conns[0].sent.packets, 2);
        assert_eq!((conns[0].first_seen, conns[0].last_seen), (1000, 5010));
    }

    #[test]
    fn a_new_syn_on_the_same_key_is_a_new_connection() {
        let k = key();
        let mut d = drainer_with(vec![(k, entry(1000, tcp_flags::SYN, 500))]);
        let next = entry(9000, tcp_flags::SYN, 40);
        let conns = read(&mut d, &[(k, next, false)], 0).conns;
        assert_eq!(conns.len(), 2);
        assert_eq!(
            conns.iter().map(|c| c.sent.bytes).collect::<Vec<_>>(),
            [500, 40]
        );
    }

    #[test]
    fn records_retire_once_after_keep_and_a_later_tail_is_its_own() {
        let k = key();
        let s = 1_000_000_000;
        let mut d = drainer_with(vec![(k, entry(1000, tcp_flags::SYN, 500))]);
        // Drained at 0, kept 60 s: listed at 59 s.
        let l = read(&mut d, &[], 59 * s);
        assert_eq!((bytes(&l.conns), l.retired.len()), (vec![(1000, 500)], 0));
        // At 60 s it is given once as retired, then never again.
        let l = read(&mut d, &[], 60 * s);
        assert!(l.conns.is_empty());
        assert_eq!(bytes(&l.retired), [(1000, 500)]);
        assert_eq!(d.held(), 0);
        // A tail after that is a record of its own (oriented by what it
        // saw: an ACK alone says nothing of who began).
        let tail = entry(70 * s, tcp_flags::ACK, 7);
        let l = read(&mut d, &[(k, tail, false)], 71 * s);
        assert_eq!((l.conns.len(), l.retired.len()), (1, 0));
        let c = &l.conns[0];
        assert_eq!((c.first_seen, c.sent.bytes + c.received.bytes), (70 * s, 7));
    }
}
