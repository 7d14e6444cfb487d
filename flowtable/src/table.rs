//! Joins the two directions of each connection and counts them.

use probe_common::parse::tcp_flags;
use probe_common::parse::{encap_flags, Encap};
use probe_common::tcp::{track, Peer, Segment};
use probe_common::{ConnKey, FlowEntry, L4Proto, Parsed, TunnelKind};
use rustc_hash::FxHashMap;

use crate::conn::{ip, Connection, DirStats, Proto};
use crate::rtt::{RttTimer, Rtts};
use crate::tags::{Socket, Tags};

/// One parsed frame (or GSO super-packet) offered to the table.
#[derive(Clone, Copy, Debug)]
pub struct Observation<'a> {
    /// Capture time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    /// Where it was seen (pcapng interface number, interface index).
    pub iface: u32,
    /// Wire segments it stands for (`gso_segs`; 1 for a captured frame).
    pub segs: u32,
    pub parsed: &'a Parsed,
    /// The layers that wrapped it (`parse_frame_ex`): kept for a new
    /// connection.
    pub encap: &'a Encap,
}

/// A connection in the table: the very record the kernel keeps
/// ([`FlowEntry`], here with Unix-time timestamps).
#[derive(Clone, Debug)]
struct Flow {
    entry: FlowEntry,
    /// Userspace-only: the kernel entry has no room (nor clock) for it.
    rtt: RttTimer,
}

impl Flow {
    fn new(ts: u64, dir: usize, key: &ConnKey, p: &Parsed, encap: &Encap) -> Flow {
        let flags = (p.key.proto == L4Proto::Tcp as u8).then_some(p.tcp.flags);
        let mut entry = FlowEntry::new(ts, dir, key, flags);
        entry.encap = encap.in_key_order(dir);
        Flow {
            entry,
            rtt: RttTimer::default(),
        }
    }

    fn connection(&self, k: &ConnKey) -> Connection {
        let mut c = Connection::from_entry(k, &self.entry, 0);
        c.rtt = Rtts::full(self.rtt.rtt((self.entry.initiator & 1) as usize));
        c
    }
}

/// Connections keyed by 5-tuple, both directions in one entry: one record
/// per connection however many interfaces its packets cross, each direction
/// counted at the first interface that saw it (as the kernel does, see
/// `DirState::claim`); or, [`FlowTable::per_interface`], one record per
/// connection and interface.
#[derive(Default)]
pub struct FlowTable {
    live: FxHashMap<ConnKey, Flow>,
    /// Connections whose 5-tuple was reused by a later connection.
    ended: Vec<(ConnKey, Flow)>,
    per_iface: bool,
}

impl FlowTable {
    pub fn new() -> FlowTable {
        FlowTable::default()
    }

    /// A table that keys connections per interface too: each interface
    /// counts what it sees (`--per-interface`).
    pub fn per_interface() -> FlowTable {
        FlowTable {
            per_iface: true,
            ..FlowTable::default()
        }
    }

    /// Number of distinct connections seen so far.
    pub fn len(&self) -> usize {
        self.live.len() + self.ended.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts one frame; false when it was not counted because its
    /// direction is counted at another interface (a copy of a packet seen
    /// there first).
    pub fn observe(&mut self, o: &Observation) -> bool {
        let p = o.parsed;
        let (key_iface, seen_at) = if self.per_iface {
            (o.iface, 0)
        } else {
            (0, o.iface.wrapping_add(1))
        };
        let (key, dir) = ConnKey::of(&p.key, key_iface, p.tunnel);
        let is_tcp = p.key.proto == L4Proto::Tcp as u8;
        let pure_syn = is_tcp && p.tcp.flags & (tcp_flags::SYN | tcp_flags::ACK) == tcp_flags::SYN;

        let flow = match self.live.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let f = e.into_mut();
                let claim = f.entry.dir[dir & 1].seen_at;
                if pure_syn && f.entry.closed() && (claim == 0 || claim == seen_at) {
                    // Same 5-tuple, new connection (port reuse after close);
                    // a SYN at another interface than the one counting its
                    // direction is a copy of the old one's.
                    let old = core::mem::replace(f, Flow::new(o.ts_ns, dir, &key, p, o.encap));
                    self.ended.push((key, old));
                } else if is_tcp {
                    f.entry.note_syn(dir, p.tcp.flags);
                }
                f
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Flow::new(o.ts_ns, dir, &key, p, o.encap))
            }
        };

        let e = &mut flow.entry;
        let [d0, d1] = &mut e.dir;
        let (d, r) = if dir & 1 == 0 { (d0, d1) } else { (d1, d0) };
        if !d.claim(seen_at) {
            return false;
        }
        d.last_seen_ns = d.last_seen_ns.max(o.ts_ns);
        e.first_seen_ns = e.first_seen_ns.min(o.ts_ns);

        let verdict = if is_tcp {
            let seg = Segment {
                hdr: p.tcp,
                payload_len: p.payload_len,
            };
            let v = track(&seg, &mut d.tcp, &mut d.holes, || Peer::of(&r.tcp));
            flow.rtt.observe(dir, o.ts_ns, &seg, &v);
            Some(v)
        } else {
            None
        };
        e.counters[dir].record(o.segs, p.payload_len, p.l3_len, verdict.as_ref());
        true
    }

    /// Every connection seen, oriented from its initiator, in a stable order:
    /// first seen, then protocol, addresses and ports.
    pub fn connections(&self) -> Vec<Connection> {
        let mut out: Vec<Connection> = self
            .ended
            .iter()
            .map(|(k, f)| f.connection(k))
            .chain(self.live.iter().map(|(k, f)| f.connection(k)))
            .collect();
        sort_connections(&mut out);
        out
    }
}

impl FlowTable {
    /// Takes out the connections that are over as of `now_ns` (the
    /// packets' clock): closed and quiet for `closed_ns`, quiet for
    /// `idle_ns` whatever their state, or set aside by a later connection
    /// on their 5-tuple and quiet for `closed_ns`. A later packet of one
    /// starts a record of its own.
    pub fn retire(&mut self, now_ns: u64, closed_ns: u64, idle_ns: u64) -> Vec<Connection> {
        let quiet =
            |f: &Flow| now_ns.saturating_sub(f.entry.last_seen_ns().max(f.entry.first_seen_ns));
        let over = |f: &Flow| {
            let q = quiet(f);
            q >= idle_ns || (f.entry.closed() && q >= closed_ns)
        };
        let mut out = Vec::new();
        self.ended.retain(|(k, f)| {
            let go = quiet(f) >= closed_ns;
            if go {
                out.push(f.connection(k));
            }
            !go
        });
        self.live.retain(|k, f| {
            let go = over(f);
            if go {
                out.push(f.connection(k));
            }
            !go
        });
        sort_connections(&mut out);
        out
    }
}

impl Connection {
    /// A connection from its key and entry (the kernel's `CONNS` map or the
    /// [`FlowTable`]), with `clock_offset_ns` added to the entry's timestamps
    /// to make them Unix time (the kernel's are monotonic; the table's
    /// already are). Oriented by the entry's initiator.
    pub fn from_entry(k: &ConnKey, e: &FlowEntry, clock_offset_ns: u64) -> Connection {
        let initiator = (e.initiator & 1) as usize;
        let lo = (ip(k.family, &k.lo), k.lo_port);
        let hi = (ip(k.family, &k.hi), k.hi_port);
        let ((src, sport), (dst, dport)) = if initiator == 0 { (lo, hi) } else { (hi, lo) };
        let proto = if k.proto == L4Proto::Tcp as u8 {
            Proto::Tcp
        } else {
            Proto::Udp
        };
        Connection {
            proto,
            src,
            sport,
            dst,
            dport,
            iface: iface(k, e, initiator),
            first_seen: e.first_seen_ns.wrapping_add(clock_offset_ns),
            // Live, last_seen comes from the kernel's coarse clock (the last
            // tick), which can lag the precise first_seen of a new entry.
            last_seen: e
                .last_seen_ns()
                .max(e.first_seen_ns)
                .wrapping_add(clock_offset_ns),
            sent: DirStats::from(&e.counters[initiator]),
            received: DirStats::from(&e.counters[1 - initiator]),
            rtt: handshake_rtt(e, initiator),
            src_tags: Tags::from(end_tags(e, initiator)).with_socket(socket(e, initiator)),
            dst_tags: Tags::from(end_tags(e, 1 - initiator)).with_socket(socket(e, 1 - initiator)),
        }
    }
}

/// The tags of the end that sends in direction `dir`: the layers that
/// wrapped the connection ([`encap_tags`]).
fn end_tags(e: &FlowEntry, dir: usize) -> std::collections::BTreeMap<String, String> {
    let mut tags = std::collections::BTreeMap::new();
    encap_tags(&e.encap, dir, &mut tags);
    tags
}

/// What wrapped the connection's first packet, as tags of the end sending
/// in direction `dir` (the key's: `encap.outer_src` is the `lo` end's):
/// `tunnel` (its kind), `vni` (VXLAN/Geneve VNI or GRE key) and `outer_ip`
/// (this end's tunnel endpoint); `vlan` (ids outermost first, joined by
/// `.`), `mpls_label` (the top label), `pppoe_session`. The same at both
/// ends but `outer_ip`.
pub fn encap_tags(
    encap: &Encap,
    dir: usize,
    tags: &mut std::collections::BTreeMap<String, String>,
) {
    if let Some(kind) = TunnelKind::from_u8(encap.kind) {
        tags.insert("tunnel".to_owned(), kind.name().to_owned());
        let outer = if dir & 1 == 0 {
            &encap.outer_src
        } else {
            &encap.outer_dst
        };
        tags.insert(
            "outer_ip".to_owned(),
            ip(encap.outer_family, outer).to_string(),
        );
    }
    if encap.flags & encap_flags::VNI != 0 {
        tags.insert("vni".to_owned(), encap.vni.to_string());
    }
    if encap.vlans != 0 {
        let n = (encap.vlans as usize).min(encap.vlan.len());
        let ids: Vec<String> = encap.vlan[..n].iter().map(u16::to_string).collect();
        tags.insert("vlan".to_owned(), ids.join("."));
    }
    if encap.flags & encap_flags::MPLS != 0 {
        tags.insert("mpls_label".to_owned(), encap.mpls.to_string());
    }
    if encap.flags & encap_flags::PPPOE != 0 {
        tags.insert("pppoe_session".to_owned(), encap.pppoe_session.to_string());
    }
}

/// The local socket the tc program saw sending in direction `dir` (none
/// in the table's own entries).
fn socket(e: &FlowEntry, dir: usize) -> Socket {
    let d = dir & 1;
    Socket {
        cookie: e.sk_cookie[d],
        cgroup: if e.sk_cookie[d] != 0 {
            e.sk_cgroup[d]
        } else {
            0
        },
    }
}

/// The handshake samples the kernel's entry keeps (none in the table's own
/// entries: it times every packet itself, see [`crate::rtt`]).
fn handshake_rtt(e: &FlowEntry, initiator: usize) -> Rtts {
    let us = |d: usize| probe_common::handshake::sample_ns(e, d).map(|ns| (ns + 500) / 1000);
    Rtts::handshake(us(initiator), us(1 - initiator))
}

/// Sorts connections the way [`FlowTable::connections`] does: first seen,
/// then protocol, addresses and ports, then interface, then tags (two
/// tunnels carrying the same 5-tuple differ there).
pub fn sort_connections(conns: &mut [Connection]) {
    conns.sort_by(|a, b| {
        (
            a.first_seen,
            a.proto,
            a.src,
            a.sport,
            a.dst,
            a.dport,
            a.iface,
            &a.src_tags,
            &a.dst_tags,
        )
            .cmp(&(
                b.first_seen,
                b.proto,
                b.src,
                b.sport,
                b.dst,
                b.dport,
                b.iface,
                &b.src_tags,
                &b.dst_tags,
            ))
    });
}

/// Where a connection was counted: the key's interface with keys per
/// interface, else the interface that claimed the initiator's direction
/// (the responder's, if the initiator's was never seen).
fn iface(k: &ConnKey, e: &FlowEntry, initiator: usize) -> u32 {
    let at = match e.dir[initiator].seen_at {
        0 => e.dir[1 - initiator].seen_at,
        at => at,
    };
    if at == 0 {
        k.iface
    } else {
        at - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::key::v4_mapped;
    use probe_common::parse::TcpHeader;
    use probe_common::FlowKey;

    const C: [u8; 4] = [10, 0, 0, 1];
    const S: [u8; 4] = [10, 0, 0, 2];

    #[expect(
        clippy::too_many_arguments,
        reason = "one positional row per packet reads like a capture"
    )]
    fn pkt(
        from: [u8; 4],
        sport: u16,
        to: [u8; 4],
        dport: u16,
        proto: u8,
        flags: u8,
        seq: u32,
        len: u32,
    ) -> Parsed {
        Parsed {
            key: FlowKey {
                src: v4_mapped(from),
                dst: v4_mapped(to),
                sport,
                dport,
                proto,
                family: 4,
                _pad: [0; 2],
            },
            l3_len: 40 + len,
            payload_len: len,
            l3_offset: 14,
            tcp: TcpHeader {
                seq,
                ack: 0,
                flags,
                window: 1000,
            },
            tunnel: 0,
        }
    }

    fn feed(t: &mut FlowTable, pkts: &[Parsed]) {
        for (i, p) in pkts.iter().enumerate() {
            t.observe(&Observation {
                ts_ns: 1000 + i as u64,
                iface: 0,
                segs: 1,
                parsed: p,
                encap: &Encap::default(),
            });
        }
    }

    const SYN: u8 = tcp_flags::SYN;
    const SA: u8 = tcp_flags::SYN | tcp_flags::ACK;
    const ACK: u8 = tcp_flags::ACK;
    const FA: u8 = tcp_flags::FIN | tcp_flags::ACK;

    #[test]
    fn syn_sender_is_initiator_even_from_the_low_port() {
        let mut t = FlowTable::new();
        // A client on a low port talking to a server on a high port.
        feed(
            &mut t,
            &[
                pkt(C, 80, S, 40000, 6, SYN, 1, 0),
                pkt(S, 40000, C, 80, 6, SA, 9, 0),
            ],
        );
        let c = &t.connections()[0];
        assert_eq!(
            (c.sport, c.dport, c.sent.packets, c.received.packets),
            (80, 40000, 1, 1)
        );
    }

    #[test]
    fn syn_ack_seen_first_still_names_the_client() {
        let mut t = FlowTable::new();
        feed(&mut t, &[pkt(S, 5001, C, 40000, 6, SA, 9, 0)]);
        let c = &t.connections()[0];
        assert_eq!(
            (c.src, c.sport, c.received.packets),
            (std::net::IpAddr::from(C), 40000, 1)
        );
    }

    #[test]
    fn without_syn_the_higher_port_initiates() {
        let mut t = FlowTable::new();
        feed(
            &mut t,
            &[
                pkt(S, 53, C, 50000, 17, 0, 0, 20),
                pkt(C, 50000, S, 53, 17, 0, 0, 10),
            ],
        );
        let c = &t.connections()[0];
        assert_eq!(
            (c.proto, c.sport, c.sent.bytes, c.received.bytes),
            (Proto::Udp, 50000, 10, 20)
        );
    }

    #[test]
    fn port_reuse_after_close_is_a_new_connection() {
        let mut t = FlowTable::new();
        feed(
            &mut t,
            &[
                pkt(C, 40000, S, 80, 6, SYN, 100, 0),
                pkt(S, 80, C, 40000, 6, SA, 900, 0),
                pkt(C, 40000, S, 80, 6, FA, 101, 0),
                pkt(S, 80, C, 40000, 6, FA, 901, 0),
                // New connection, new ISN; its sequence is not a retransmit.
                pkt(C, 40000, S, 80, 6, SYN, 50, 0),
                pkt(C, 40000, S, 80, 6, ACK, 51, 10),
            ],
        );
        let conns = t.connections();
        assert_eq!(conns.len(), 2);
        assert_eq!((conns[0].sent.packets, conns[1].sent.packets), (2, 2));
        assert_eq!(conns[1].sent.retransmits(), 0);
        assert!(conns[0].first_seen < conns[1].first_seen);
    }

    #[test]
    fn syn_retransmit_is_not_a_new_connection() {
        let mut t = FlowTable::new();
        feed(
            &mut t,
            &[
                pkt(C, 40000, S, 80, 6, SYN, 100, 0),
                pkt(C, 40000, S, 80, 6, SYN, 100, 0),
            ],
        );
        let conns = t.connections();
        assert_eq!((conns.len(), conns[0].sent.retransmits()), (1, 1));
    }

    /// What the kernel program does per packet (probe-ebpf `track_conn`):
    /// `FlowEntry::new` for a new key, then `update::update`, with plain
    /// memory instead of BPF atomics.
    fn kernel_like(pkts: &[Parsed]) -> Vec<Connection> {
        use probe_common::update::{update, Fixed, Updated};
        use probe_common::Plain;
        let mut map: FxHashMap<ConnKey, FlowEntry> = FxHashMap::default();
        for (i, p) in pkts.iter().enumerate() {
            let ts = 1000 + i as u64;
            let (key, dir) = ConnKey::of(&p.key, 0, p.tunnel);
            let is_tcp = p.key.proto == L4Proto::Tcp as u8;
            let e = map
                .entry(key)
                .or_insert_with(|| FlowEntry::new(ts, dir, &key, is_tcp.then_some(p.tcp.flags)));
            // SAFETY: a live map value, no other writer.
            let how = unsafe { update(e, dir, 1, &p.pkt(), 0, &Fixed(ts), 1, &Plain) };
            assert_eq!(how, Updated::Locked);
        }
        let mut out: Vec<Connection> = map
            .iter()
            .map(|(k, e)| Connection::from_entry(k, e, 0))
            .collect();
        sort_connections(&mut out);
        out
    }

    #[test]
    fn kernel_entries_orient_and_count_like_the_table() {
        let cases: [&[Parsed]; 3] = [
            &[
                pkt(C, 80, S, 40000, 6, SYN, 1, 0),
                pkt(S, 40000, C, 80, 6, SA, 9, 0),
                pkt(C, 80, S, 40000, 6, ACK, 2, 100),
                pkt(C, 80, S, 40000, 6, ACK, 2, 100),
            ],
            &[pkt(S, 5001, C, 40000, 6, SA, 9, 0)],
            &[
                pkt(S, 53, C, 50000, 17, 0, 0, 20),
                pkt(C, 50000, S, 53, 17, 0, 0, 10),
            ],
        ];
        for pkts in cases {
            let mut t = FlowTable::new();
            feed(&mut t, pkts);
            let mut table = t.connections();
            // RTT timing is the table's own; the kernel entry has none.
            table.iter_mut().for_each(|c| c.rtt = Rtts::None);
            assert_eq!(kernel_like(pkts), table);
        }
    }

    #[test]
    fn kernel_handshake_rtt_equals_the_tables() {
        use probe_common::update::{update, Fixed};
        use probe_common::Plain;
        let syn = pkt(C, 40000, S, 80, 6, SYN, 100, 0);
        let mut sa = pkt(S, 80, C, 40000, 6, SA, 900, 0);
        sa.tcp.ack = 101;
        let mut ack = pkt(C, 40000, S, 80, 6, ACK, 101, 0);
        ack.tcp.ack = 901;
        // SYN/ACK 250 µs after the SYN, the ACK 50 µs after that.
        let times = [1_000_000u64, 1_250_000, 1_300_000];
        let pkts = [syn, sa, ack];

        let mut t = FlowTable::new();
        for (p, &ts) in pkts.iter().zip(&times) {
            t.observe(&Observation {
                ts_ns: ts,
                iface: 0,
                segs: 1,
                parsed: p,
                encap: &Encap::default(),
            });
        }
        let table = t.connections()[0].rtt.get().unwrap().into_owned();

        let (key, dir0) = ConnKey::of(&pkts[0].key, 0, pkts[0].tunnel);
        let mut e = FlowEntry::new(times[0], dir0, &key, Some(SYN));
        for (p, &ts) in pkts.iter().zip(&times) {
            let dir = ConnKey::of(&p.key, 0, p.tunnel).1;
            // SAFETY: a live local, no other writer.
            unsafe { update(&mut e, dir, 1, &p.pkt(), 0, &Fixed(ts), 1, &Plain) };
        }
        let kernel = Connection::from_entry(&key, &e, 0)
            .rtt
            .get()
            .unwrap()
            .into_owned();
        let legs = |r: &crate::Rtt| (r.dst.handshake_us, r.src.handshake_us);
        assert_eq!(legs(&kernel), (Some(250), Some(50)));
        assert_eq!(legs(&table), legs(&kernel));
    }
}
