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
//! the same connection's tail, and [`Drainer::connections`] adds it to the
//! drained record (its tracker starts afresh, so a retransmission in that
//! tail counts as new data).

use std::collections::HashMap;
use std::time::Duration;

use flowtable::Connection;
use probe_common::{initiator::evidence, ConnKey, FlowEntry};

use super::kernel_table::KernelTable;

pub struct Drainer {
    pub closed_after: Duration,
    pub idle_after: Duration,
    /// Drained entries in the order they were drained.
    done: Vec<(ConnKey, FlowEntry)>,
}

impl Drainer {
    pub fn new(closed_after: Duration, idle_after: Duration) -> Drainer {
        Drainer {
            closed_after,
            idle_after,
            done: Vec::new(),
        }
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
        let moved = table.drain(due);
        let n = moved.len();
        self.done.extend(moved);
        n
    }

    /// Every drained connection plus the map's current entries, as
    /// connections; a map entry that continues a drained one (same key, not
    /// opened by a SYN) is added to it.
    pub fn connections(
        &self,
        live: impl Iterator<Item = (ConnKey, FlowEntry)>,
        clock_offset_ns: u64,
    ) -> Vec<Connection> {
        let mut all: Vec<(ConnKey, FlowEntry)> = self.done.clone();
        for (k, e) in live {
            all.push((k, e));
        }
        let mut merged: Vec<(ConnKey, FlowEntry)> = Vec::with_capacity(all.len());
        // Index of the latest record per key, to find what a tail continues.
        let mut latest: HashMap<ConnKey, usize> = HashMap::new();
        for (k, e) in all {
            match latest.get(&k) {
                // A tail starts later, so the drained record keeps its
                // first_seen.
                Some(&i) if e.evidence < evidence::SYN => merged[i].1.absorb(&e),
                _ => {
                    latest.insert(k, merged.len());
                    merged.push((k, e));
                }
            }
        }
        merged
            .iter()
            .map(|(k, e)| Connection::from_entry(k, e, clock_offset_ns))
            .collect()
    }
}

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
        ConnKey::of(&k, 3).0
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
        let mut d = Drainer::new(Duration::from_secs(2), Duration::from_secs(300));
        d.done = done;
        d
    }

    #[test]
    fn a_tail_after_the_drain_adds_to_the_drained_record() {
        let k = key();
        let d = drainer_with(vec![(k, entry(1000, tcp_flags::SYN, 500))]);
        // A late ACK made a new entry after the drain: no SYN.
        let tail = entry(5000, tcp_flags::ACK, 7);
        let conns = d.connections([(k, tail)].into_iter(), 0);
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].sent.bytes, 507);
        assert_eq!(conns[0].sent.packets, 2);
        assert_eq!((conns[0].first_seen, conns[0].last_seen), (1000, 5010));
    }

    #[test]
    fn a_new_syn_on_the_same_key_is_a_new_connection() {
        let k = key();
        let d = drainer_with(vec![(k, entry(1000, tcp_flags::SYN, 500))]);
        let next = entry(9000, tcp_flags::SYN, 40);
        let conns = d.connections([(k, next)].into_iter(), 0);
        assert_eq!(conns.len(), 2);
        assert_eq!(
            conns.iter().map(|c| c.sent.bytes).collect::<Vec<_>>(),
            [500, 40]
        );
    }
}
