//! One connection list from the per-ring tables.
//!
//! Since a ring's reader puts every frame into the table of its connection
//! (`ingest::shard_of`, whichever ring it came through), a connection is
//! in one table and nothing below merges; it stays as the check that says
//! so (`split` stays 0). What follows is why the rings alone would split.
//!
//! `PACKET_FANOUT_HASH` picks a ring by `__skb_get_hash_symmetric()`
//! (net/packet/af_packet.c, `fanout_demux_hash`): the same hash for both
//! directions of a 5-tuple, so every segment of a TCP connection, either
//! way, lands in one ring and one tracker sees the whole connection (the
//! tracker needs both directions: ACKs and windows tell keepalives and
//! zero-window probes from retransmissions). What can still split is
//! traffic whose hash leaves out the ports: IP fragments (with
//! `PACKET_FANOUT_FLAG_DEFRAG` off, which we keep off so that we never
//! reassemble), i.e. the first fragment of a large UDP datagram lands where
//! the addresses alone hash, while its unfragmented datagrams land where
//! the 5-tuple hashes. Such a connection appears in two rings' tables and
//! is added up here, direction by direction; the count of such merges is
//! reported so a test can assert it is zero for TCP. (Measured on 2 rings:
//! of 12 UDP 5-tuples each sending fragmented and unfragmented datagrams,
//! 6 to 8 were split; `tests/live_afpacket/fragments.rs` checks their merged counts.)

use std::collections::HashMap;
use std::net::IpAddr;

use flowtable::{sort_connections, Connection};

/// Both endpoints in a canonical order, protocol and interface.
type Key = (flowtable::Proto, (IpAddr, u16), (IpAddr, u16), u32);

fn key(c: &Connection) -> Key {
    let a = (c.src, c.sport);
    let b = (c.dst, c.dport);
    (c.proto, a.min(b), a.max(b), c.iface)
}

/// How far apart two connections' lifetimes are (0 when they overlap).
fn distance(a: &Connection, b: &Connection) -> u64 {
    b.first_seen
        .saturating_sub(a.last_seen)
        .max(a.first_seen.saturating_sub(b.last_seen))
}

/// The connections of every ring as one sorted list, and how many records
/// were parts of a connection split across rings.
///
/// Within one ring, two records with the same 5-tuple are two connections
/// (the port was reused); across rings, a record joins the record of
/// another ring with the same 5-tuple that is closest in time. The
/// orientation is that of the part seen first.
pub fn merge(per_ring: Vec<Vec<Connection>>) -> (Vec<Connection>, u64) {
    let mut all: Vec<(usize, Connection)> = per_ring
        .into_iter()
        .enumerate()
        .flat_map(|(r, conns)| conns.into_iter().map(move |c| (r, c)))
        .collect();
    all.sort_by_key(|(_, c)| c.first_seen);
    let mut out: Vec<Connection> = Vec::with_capacity(all.len());
    // Indices into `out`, and the rings each record is made of.
    let mut by_key: HashMap<Key, Vec<(usize, Vec<usize>)>> = HashMap::new();
    let mut split = 0;
    for (ring, c) in all {
        let slot = by_key.entry(key(&c)).or_default();
        let partner = slot
            .iter_mut()
            .filter(|(_, rings)| !rings.contains(&ring))
            .min_by_key(|(i, _)| distance(&out[*i], &c));
        match partner {
            Some((i, rings)) => {
                let o = &mut out[*i];
                let same_way = (o.src, o.sport) == (c.src, c.sport);
                if same_way {
                    o.sent.add(&c.sent);
                    o.received.add(&c.received);
                } else {
                    o.sent.add(&c.received);
                    o.received.add(&c.sent);
                }
                // Round-trip times need both directions of one part (a
                // split TCP connection would have none); keep the first
                // part's, or take the other's, turned to this orientation.
                if o.rtt.is_none() {
                    o.rtt = c.rtt;
                    if !same_way {
                        o.rtt.turn();
                    }
                }
                o.first_seen = o.first_seen.min(c.first_seen);
                o.last_seen = o.last_seen.max(c.last_seen);
                rings.push(ring);
                split += 1;
            }
            None => {
                slot.push((out.len(), vec![ring]));
                out.push(c);
            }
        }
    }
    sort_connections(&mut out);
    (out, split)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::DirStats;

    fn conn(sport: u16, dport: u16, first: u64, last: u64, sent: u64, recv: u64) -> Connection {
        let st = |bytes| DirStats::counts(1, bytes, 0);
        Connection {
            proto: flowtable::Proto::Udp,
            src: [10, 0, 0, sport as u8].into(),
            sport,
            dst: [10, 0, 0, dport as u8].into(),
            dport,
            iface: 2,
            first_seen: first,
            last_seen: last,
            sent: st(sent),
            received: st(recv),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
    }

    #[test]
    fn disjoint_rings_are_concatenated() {
        let (out, split) = merge(vec![
            vec![conn(1, 2, 10, 20, 5, 6)],
            vec![conn(3, 4, 5, 30, 7, 8)],
        ]);
        assert_eq!(split, 0);
        assert_eq!(out.iter().map(|c| c.sport).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn a_split_connection_is_added_up_in_the_first_part_s_orientation() {
        // Ring 1 saw only the reverse direction, later.
        let (out, split) = merge(vec![
            vec![conn(1, 2, 10, 20, 100, 0)],
            vec![conn(2, 1, 15, 40, 30, 0)],
        ]);
        assert_eq!(split, 1);
        assert_eq!(out.len(), 1);
        let c = &out[0];
        assert_eq!((c.sport, c.first_seen, c.last_seen), (1, 10, 40));
        assert_eq!((c.sent.bytes, c.received.bytes), (100, 30));
        assert_eq!((c.sent.packets, c.received.packets), (2, 2));
    }

    #[test]
    fn port_reuse_within_one_ring_stays_two_connections() {
        let (out, split) = merge(vec![vec![
            conn(1, 2, 10, 20, 100, 0),
            conn(1, 2, 50, 60, 7, 0),
        ]]);
        assert_eq!((out.len(), split), (2, 0));
    }
}
