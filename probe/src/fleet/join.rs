//! The fleet's window of interval messages and the join that makes one
//! answer of them (docs/fleet.md, "The join"). Pure: no NATS, no clock;
//! time is the messages' own (the newest interval end is "now").
//!
//! Counted once: a `client` or `local` row always counts; a `server` row
//! counts unless the initiator's address is a host that published the
//! same interval (then that host's `client` row counts). The remote end
//! of a counted row is tagged from the other host's own rows (any
//! interval in the window), else its endpoint directory, else its
//! addresses (`host` only), else `unresolved` with a reason.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use flowtable::rollup::{Aggregate, Interval};
use flowtable::{Connection, DirStats};
use serde::Serialize;

use crate::export::fleet::wire::{End, Endpoint, Message, Presence, Reject, Row, View};
use flowtable::nat::{NAT_IP, NAT_PORT};

/// The fleet's bounds (each a flag of `flowprobe fleet`).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Intervals ending more than this before the newest end are dropped.
    pub window_ns: u64,
    pub max_hosts: usize,
    /// Groups one joined interval keeps; the rest are folded (`other`).
    pub max_groups: usize,
    pub max_endpoints: usize,
}

/// What the window took, refused and dropped (the fleet's /metrics).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub messages: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// Older than the window when they came.
    pub too_old: u64,
    /// From a host beyond `max_hosts`.
    pub hosts_refused: u64,
    /// Intervals dropped from the window's far end.
    pub expired_intervals: u64,
    pub rejected: BTreeMap<&'static str, u64>,
    pub kv_rejected: u64,
    pub endpoints_refused: u64,
}

/// One host as the window knows it.
#[derive(Debug, Default)]
pub struct HostState {
    pub network: String,
    pub addresses: Vec<IpAddr>,
    /// (interval start, run) → message.
    pub intervals: BTreeMap<(u64, u64), Arc<Message>>,
    pub spool_dropped: u64,
}

/// Everything the fleet holds.
pub struct Window {
    pub limits: Limits,
    pub hosts: BTreeMap<String, HostState>,
    /// Latest presence per host (KV).
    pub presence: BTreeMap<String, Presence>,
    /// (network, proto, ip, port) → the endpoint (KV).
    pub endpoints: BTreeMap<(String, String, IpAddr, u16), Endpoint>,
    /// Addresses of hosts whose intervals all left the window.
    pub departed: BTreeMap<(String, IpAddr), String>,
    pub newest_end: u64,
    pub stats: Stats,
}

/// Addresses that say nothing about which host: every host has them.
fn shared_address(ip: &IpAddr) -> bool {
    ip.is_loopback()
        || ip.is_unspecified()
        || match ip {
            IpAddr::V4(a) => a.is_link_local(),
            IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
        }
}

impl Window {
    pub fn new(limits: Limits) -> Window {
        Window {
            limits,
            hosts: BTreeMap::new(),
            presence: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            departed: BTreeMap::new(),
            newest_end: 0,
            stats: Stats::default(),
        }
    }

    /// Forgets the messages (a new consumer delivers them all again);
    /// counters stay.
    pub fn restart(&mut self) {
        self.hosts.clear();
        self.newest_end = 0;
    }

    pub fn reject(&mut self, r: Reject) {
        self.stats.messages += 1;
        *self.stats.rejected.entry(r.name()).or_default() += 1;
    }

    /// One checked message.
    pub fn insert(&mut self, m: Message) {
        self.stats.messages += 1;
        let w = self.limits.window_ns;
        if m.end_ns.saturating_add(w) < self.newest_end {
            self.stats.too_old += 1;
            return;
        }
        if !self.hosts.contains_key(&m.host) && self.hosts.len() >= self.limits.max_hosts {
            self.stats.hosts_refused += 1;
            return;
        }
        let h = self.hosts.entry(m.host.clone()).or_default();
        let key = (m.start_ns, m.run);
        if let Some(old) = h.intervals.get(&key) {
            if old.seq == m.seq {
                self.stats.duplicates += 1;
                return;
            }
        }
        h.network = m.network.clone();
        h.addresses = m.addresses.clone();
        h.spool_dropped = h.spool_dropped.max(m.spool_dropped);
        self.newest_end = self.newest_end.max(m.end_ns);
        h.intervals.insert(key, Arc::new(m));
        self.stats.accepted += 1;
        self.expire();
    }

    /// Drops intervals that ended more than the window before the newest.
    fn expire(&mut self) {
        let from = self.newest_end.saturating_sub(self.limits.window_ns);
        let mut gone = Vec::new();
        for (id, h) in &mut self.hosts {
            let before = h.intervals.len();
            h.intervals.retain(|_, m| m.end_ns >= from);
            self.stats.expired_intervals += (before - h.intervals.len()) as u64;
            if h.intervals.is_empty() {
                gone.push(id.clone());
            }
        }
        for id in gone {
            if let Some(h) = self.hosts.remove(&id) {
                for a in h.addresses {
                    self.departed.insert((h.network.clone(), a), id.clone());
                }
            }
        }
        // Bounded like the hosts: the oldest entries go first.
        while self.departed.len() > self.limits.max_hosts * 16 {
            let k = self.departed.keys().next().cloned().expect("not empty");
            self.departed.remove(&k);
        }
    }

    pub fn put_presence(&mut self, key: &str, p: Presence) {
        if p.host != key || self.presence.len() >= self.limits.max_hosts {
            self.stats.kv_rejected += 1;
            return;
        }
        self.presence.insert(p.host.clone(), p);
    }

    pub fn put_endpoint(&mut self, key: &str, e: Endpoint) {
        // The key starts with the host id: NATS permissions bind it.
        if key.split('.').next() != Some(e.host.as_str()) {
            self.stats.kv_rejected += 1;
            return;
        }
        let k = (e.network.clone(), e.proto.clone(), e.ip, e.port);
        if !self.endpoints.contains_key(&k) && self.endpoints.len() >= self.limits.max_endpoints {
            self.stats.endpoints_refused += 1;
            return;
        }
        self.endpoints.insert(k, e);
    }

    pub fn remove_key(&mut self, bucket_is_presence: bool, key: &str) {
        if bucket_is_presence {
            self.presence.remove(key);
        } else {
            let host = key.split('.').next().unwrap_or("");
            let port: Option<u16> = key.rsplit('.').next().and_then(|p| p.parse().ok());
            self.endpoints
                .retain(|_, e| !(e.host == host && Some(e.port) == port && key_of(e) == key));
        }
    }

    /// The joined intervals, oldest first, and what the join found.
    pub fn join(&self) -> Joined {
        // Which host an address is, per network. An address two hosts
        // claim (a container bridge's, say) names neither: no wrong tag.
        let mut claims: BTreeMap<(&str, IpAddr), BTreeSet<&str>> = BTreeMap::new();
        let presence = self
            .presence
            .iter()
            .map(|(id, p)| (id, &p.network, &p.addresses));
        let hosts = self
            .hosts
            .iter()
            .map(|(id, h)| (id, &h.network, &h.addresses));
        for (id, net, addrs) in presence.chain(hosts) {
            for a in addrs.iter().filter(|a| !shared_address(a)) {
                claims
                    .entry((net.as_str(), *a))
                    .or_default()
                    .insert(id.as_str());
            }
        }
        let mut ambiguous = 0;
        let owner: BTreeMap<(&str, IpAddr), &str> = claims
            .into_iter()
            .filter_map(|(k, ids)| {
                if ids.len() == 1 {
                    ids.into_iter().next().map(|id| (k, id))
                } else {
                    ambiguous += 1;
                    None
                }
            })
            .collect();
        // Which intervals each host published, by start (agents with
        // another --fleet-interval are compared by overlap).
        let published: BTreeMap<&str, Vec<(u64, u64)>> = self
            .hosts
            .iter()
            .map(|(id, h)| {
                let v = h
                    .intervals
                    .values()
                    .map(|m| (m.start_ns, m.end_ns))
                    .collect();
                (id.as_str(), v)
            })
            .collect();
        let covered = |host: &str, start: u64, end: u64| -> bool {
            let Some(v) = published.get(host) else {
                return false;
            };
            // Sorted by start: those starting before `end`, latest first.
            let upto = v.partition_point(|i| i.0 < end);
            v[..upto].iter().rev().take(64).any(|i| i.1 > start)
        };
        // Each end's tags as its own host gave them, from any interval.
        type PairKey<'a> = (&'a str, &'a str, IpAddr, IpAddr, u16);
        let mut server_end: BTreeMap<PairKey<'_>, (&str, &BTreeMap<String, String>)> =
            BTreeMap::new();
        let mut client_end: BTreeMap<PairKey<'_>, (&str, &BTreeMap<String, String>)> =
            BTreeMap::new();
        for (id, h) in &self.hosts {
            for m in h.intervals.values() {
                for r in &m.rows {
                    let net = h.network.as_str();
                    match r.view {
                        View::Server => {
                            let k = (net, r.proto.as_str(), r.remote.ip, r.local.ip, r.local.port);
                            server_end.insert(k, (id.as_str(), &r.local.tags));
                        }
                        View::Client => {
                            let (dst, dport) = wire(&r.remote);
                            let k = (net, r.proto.as_str(), wire(&r.local).0, dst, dport);
                            client_end.insert(k, (id.as_str(), &r.local.tags));
                        }
                        View::Local => {}
                    }
                }
            }
        }
        let tagged = |host: &str, tags: &BTreeMap<String, String>| {
            let mut t = tags.clone();
            t.insert("host".to_owned(), host.to_owned());
            t
        };
        let unresolved = |net: &str, ip: IpAddr| {
            let why = if self.departed.contains_key(&(net.to_owned(), ip)) {
                "expired"
            } else {
                "not_monitored"
            };
            BTreeMap::from([("unresolved".to_owned(), why.to_owned())])
        };

        let mut by_start: BTreeMap<u64, Slot> = BTreeMap::new();
        let mut stats = JoinStats::default();
        for (id, h) in &self.hosts {
            let net = h.network.as_str();
            for m in h.intervals.values() {
                let slot = by_start
                    .entry(m.start_ns)
                    .or_insert_with(|| (m.end_ns, BTreeMap::new(), None));
                slot.0 = slot.0.max(m.end_ns);
                for r in &m.rows {
                    let (src_tags, dst_tags) = match r.view {
                        View::Local => (tagged(id, &r.local.tags), tagged(id, &r.remote.tags)),
                        View::Client => {
                            // The responder where the connection arrives:
                            // beyond a DNAT on this host (a ClusterIP, a
                            // published port) if there was one.
                            let (rip, rport) = wire(&r.remote);
                            let translated = (rip, rport) != (r.remote.ip, r.remote.port);
                            let k = (net, r.proto.as_str(), wire(&r.local).0, rip, rport);
                            let dst = if let Some((h2, t)) = server_end.get(&k) {
                                stats.by_counterpart += 1;
                                tagged(h2, t)
                            } else if let Some(e) =
                                self.endpoints
                                    .get(&(net.to_owned(), r.proto.clone(), rip, rport))
                            {
                                stats.by_directory += 1;
                                tagged(&e.host, &e.tags)
                            } else if let Some(h2) = owner.get(&(net, rip)) {
                                stats.by_address += 1;
                                tagged(h2, &BTreeMap::new())
                            } else if translated {
                                stats.unresolved += 1;
                                BTreeMap::from([("unresolved".to_owned(), "nat".to_owned())])
                            } else {
                                stats.unresolved += 1;
                                unresolved(net, rip)
                            };
                            (tagged(id, &r.local.tags), dst)
                        }
                        View::Server => {
                            let client_host = owner.get(&(net, r.remote.ip)).copied();
                            if client_host.is_some_and(|c| c != id.as_str())
                                && covered(client_host.expect("checked"), m.start_ns, m.end_ns)
                            {
                                stats.joined_rows += 1;
                                continue;
                            }
                            let k = (net, r.proto.as_str(), r.remote.ip, r.local.ip, r.local.port);
                            let src = if let Some((h2, t)) = client_end.get(&k) {
                                stats.by_counterpart += 1;
                                tagged(h2, t)
                            } else if let Some(h2) = client_host {
                                stats.by_address += 1;
                                tagged(h2, &BTreeMap::new())
                            } else {
                                stats.unresolved += 1;
                                unresolved(net, r.remote.ip)
                            };
                            (src, tagged(id, &r.local.tags))
                        }
                    };
                    let (src, sport, dst, dport) = match r.view {
                        View::Server => (r.remote.ip, r.remote.port, r.local.ip, r.local.port),
                        _ => (r.local.ip, r.local.port, r.remote.ip, r.remote.port),
                    };
                    let mut src_tags = src_tags;
                    src_tags.insert("view".to_owned(), r.view.name().to_owned());
                    let key: GroupKey = (
                        r.proto.clone(),
                        src,
                        sport,
                        dst,
                        dport,
                        src_tags.clone(),
                        dst_tags.clone(),
                    );
                    let agg = if let Some(a) = slot.1.get_mut(&key) {
                        a
                    } else if slot.1.len() < self.limits.max_groups {
                        slot.1.entry(key).or_insert_with(|| {
                            Aggregate::empty(Connection {
                                proto: proto_name(&r.proto),
                                src,
                                sport,
                                dst,
                                dport,
                                iface: 0,
                                first_seen: u64::MAX,
                                last_seen: 0,
                                sent: DirStats::default(),
                                received: DirStats::default(),
                                rtt: None,
                                src_tags,
                                dst_tags,
                            })
                        })
                    } else {
                        stats.folded_groups += 1;
                        slot.2.get_or_insert_with(Aggregate::folded)
                    };
                    add_row(agg, r);
                }
                for (view, f) in &m.folded {
                    if *view == View::Server {
                        stats.server_folded_bytes += f.sent.bytes + f.received.bytes;
                        continue;
                    }
                    let a = slot.2.get_or_insert_with(Aggregate::folded);
                    a.add(&f.sent, &f.received, m.start_ns, m.end_ns);
                    a.conns += f.conns;
                }
            }
        }
        let intervals = by_start
            .into_iter()
            .map(|(start, (end, groups, folded))| {
                let mut rows: Vec<Aggregate> = groups.into_values().collect();
                rows.sort_by_key(|a| std::cmp::Reverse(a.bytes()));
                Arc::new(Interval {
                    start_ns: start,
                    end_ns: end,
                    rows,
                    folded,
                })
            })
            .collect();
        stats.ambiguous_addresses = ambiguous;
        Joined {
            intervals,
            now_ns: self.newest_end,
            stats,
        }
    }
}

/// An end as it is on the wire between hosts: its `nat.ip`/`nat.port`
/// (the address beyond a translation on its host) when it has them.
fn wire(e: &End) -> (IpAddr, u16) {
    let ip = e.tags.get(NAT_IP).and_then(|v| v.parse().ok());
    let port = e.tags.get(NAT_PORT).and_then(|v| v.parse().ok());
    (ip.unwrap_or(e.ip), port.unwrap_or(e.port))
}

/// A directory entry's key, as the agent writes it.
fn key_of(e: &Endpoint) -> String {
    crate::export::fleet::wire::endpoint_key(&e.host, &e.proto, e.ip, e.port)
}

fn proto_name(p: &str) -> &'static str {
    if p == "udp" {
        "udp"
    } else {
        "tcp"
    }
}

/// One joined interval while it is made: its end, its groups, what was
/// folded.
type Slot = (u64, BTreeMap<GroupKey, Aggregate>, Option<Aggregate>);

type GroupKey = (
    String,
    IpAddr,
    u16,
    IpAddr,
    u16,
    BTreeMap<String, String>,
    BTreeMap<String, String>,
);

fn add_row(a: &mut Aggregate, r: &Row) {
    a.add(&r.sent, &r.received, r.first_seen_ns, r.last_seen_ns);
    a.conns += r.conns;
    for (leg, hist, max) in [
        (&r.rtt_dst, &mut a.rtt_dst, &mut a.rtt_dst_max),
        (&r.rtt_src, &mut a.rtt_src, &mut a.rtt_src_max),
    ] {
        if let Some(l) = leg {
            let (h, m) = l.histogram();
            match hist {
                Some(mine) => {
                    // Auto-resizing: adding cannot run out of range.
                    let _ = mine.add(&*h);
                }
                None => *hist = Some(h),
            }
            *max = (*max).max(m);
        }
    }
}

/// How the remote ends of the counted rows were tagged.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct JoinStats {
    /// Addresses more than one host has: they name no host.
    pub ambiguous_addresses: u64,
    /// Groups a joined interval folded beyond `max_groups`.
    pub folded_groups: u64,
    /// Server-view rows not counted: the client's host published the
    /// interval (its client row counts).
    pub joined_rows: u64,
    /// Bytes in agents' folded `server` counters: not counted (their
    /// initiators are unknown, they may be counted by the client's host).
    pub server_folded_bytes: u64,
    pub by_counterpart: u64,
    pub by_directory: u64,
    pub by_address: u64,
    pub unresolved: u64,
}

/// One answer's material.
#[derive(Clone, Debug, Default)]
pub struct Joined {
    pub intervals: Vec<Arc<Interval>>,
    pub now_ns: u64,
    pub stats: JoinStats,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fleet::wire::{End, Folded, SCHEMA};

    const S: u64 = 1_000_000_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn row(view: View, local: (&str, u16, &str), remote: (&str, u16), bytes: u64) -> Row {
        Row {
            view,
            proto: "tcp".into(),
            local: End {
                ip: ip(local.0),
                port: local.1,
                tags: BTreeMap::from([("service".to_owned(), local.2.to_owned())]),
            },
            remote: End {
                ip: ip(remote.0),
                port: remote.1,
                tags: BTreeMap::new(),
            },
            conns: 1,
            sent: DirStats {
                bytes,
                ..DirStats::default()
            },
            received: DirStats {
                bytes: 10,
                ..DirStats::default()
            },
            first_seen_ns: 0,
            last_seen_ns: 1,
            rtt_dst: None,
            rtt_src: None,
        }
    }

    fn msg(host: &str, addr: &str, t: u64, rows: Vec<Row>) -> Message {
        Message {
            schema: SCHEMA,
            host: host.into(),
            network: "default".into(),
            run: 1,
            seq: t,
            start_ns: t * 10 * S,
            end_ns: (t + 1) * 10 * S,
            // Every host has the container bridge's address: it names none.
            addresses: vec![ip(addr), ip("127.0.0.1"), ip("172.17.0.1")],
            rows,
            folded: BTreeMap::new(),
            spool_dropped: 0,
        }
    }

    fn window() -> Window {
        Window::new(Limits {
            window_ns: 600 * S,
            max_hosts: 10,
            max_groups: 100,
            max_endpoints: 100,
        })
    }

    /// (src service, src host, dst service or reason, dst host, view, bytes)
    fn rows(w: &mut Window) -> Vec<(String, String, String, String, String, u64)> {
        let j = w.join();
        let g = |t: &BTreeMap<String, String>, k: &str| t.get(k).cloned().unwrap_or_default();
        let mut out: Vec<_> = j
            .intervals
            .iter()
            .flat_map(|i| i.rows.iter())
            .map(|a| {
                let c = &a.conn;
                let dst = c
                    .dst_tags
                    .get("service")
                    .or(c.dst_tags.get("unresolved"))
                    .cloned()
                    .unwrap_or_default();
                (
                    g(&c.src_tags, "service"),
                    g(&c.src_tags, "host"),
                    dst,
                    g(&c.dst_tags, "host"),
                    g(&c.src_tags, "view"),
                    c.sent.bytes,
                )
            })
            .collect();
        out.sort();
        out
    }

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn counted_once_and_tagged_by_the_other_host() {
        let mut w = window();
        // a (10.0.0.1) → b (10.0.0.2:5432); c (10.0.0.3, unmonitored) → b;
        // a → d (10.0.0.4:80, unmonitored).
        w.insert(msg(
            "a",
            "10.0.0.1",
            0,
            vec![
                row(
                    View::Client,
                    ("10.0.0.1", 1024, "api"),
                    ("10.0.0.2", 5432),
                    100,
                ),
                row(View::Client, ("10.0.0.1", 1024, "api"), ("10.0.0.4", 80), 7),
            ],
        ));
        w.insert(msg(
            "b",
            "10.0.0.2",
            0,
            vec![
                row(
                    View::Server,
                    ("10.0.0.2", 5432, "db"),
                    ("10.0.0.1", 1024),
                    100,
                ),
                row(
                    View::Server,
                    ("10.0.0.2", 5432, "db"),
                    ("10.0.0.3", 1024),
                    50,
                ),
            ],
        ));
        assert_eq!(
            rows(&mut w),
            [
                (s(""), s(""), s("db"), s("b"), s("server"), 50),
                (s("api"), s("a"), s("db"), s("b"), s("client"), 100),
                (s("api"), s("a"), s("not_monitored"), s(""), s("client"), 7),
            ]
        );
        assert_eq!(w.join().stats.joined_rows, 1);
        assert_eq!(w.join().stats.ambiguous_addresses, 1);
        // The same message again is a duplicate, counted once.
        w.insert(msg("a", "10.0.0.1", 0, vec![]));
        assert_eq!(w.stats.duplicates, 1);
    }

    #[test]
    fn a_client_host_without_the_interval_leaves_it_to_the_server() {
        let mut w = window();
        // a published interval 0 only; b has the connection in 0 and 1.
        w.insert(msg(
            "a",
            "10.0.0.1",
            0,
            vec![row(
                View::Client,
                ("10.0.0.1", 1024, "api"),
                ("10.0.0.2", 5432),
                100,
            )],
        ));
        for t in 0..2 {
            w.insert(msg(
                "b",
                "10.0.0.2",
                t,
                vec![row(
                    View::Server,
                    ("10.0.0.2", 5432, "db"),
                    ("10.0.0.1", 1024),
                    100,
                )],
            ));
        }
        let r = rows(&mut w);
        assert_eq!(
            r,
            [
                (s("api"), s("a"), s("db"), s("b"), s("client"), 100),
                (s("api"), s("a"), s("db"), s("b"), s("server"), 100),
            ]
        );
    }

    #[test]
    fn bounds_fold_expire_and_refuse() {
        let mut w = Window::new(Limits {
            window_ns: 20 * S,
            max_hosts: 1,
            max_groups: 1,
            max_endpoints: 1,
        });
        let mut m = msg(
            "a",
            "10.0.0.1",
            0,
            vec![
                row(
                    View::Client,
                    ("10.0.0.1", 1024, "api"),
                    ("10.0.0.2", 1),
                    100,
                ),
                row(View::Client, ("10.0.0.1", 1024, "api"), ("10.0.0.2", 2), 50),
            ],
        );
        m.folded.insert(
            View::Client,
            Folded {
                groups: 3,
                conns: 3,
                sent: DirStats {
                    bytes: 9,
                    ..DirStats::default()
                },
                received: DirStats::default(),
            },
        );
        w.insert(m);
        let j = w.join();
        assert_eq!(j.intervals[0].rows.len(), 1);
        assert_eq!(j.intervals[0].folded.as_ref().unwrap().conn.sent.bytes, 59);
        assert_eq!(j.stats.folded_groups, 1);
        w.insert(msg("b", "10.0.0.2", 0, vec![]));
        assert_eq!(w.stats.hosts_refused, 1);
        w.insert(msg("a", "10.0.0.1", 5, vec![]));
        assert_eq!(w.stats.expired_intervals, 1);
        w.insert(msg("a", "10.0.0.1", 1, vec![]));
        assert_eq!(w.stats.too_old, 1);
    }

    #[test]
    fn a_host_gone_from_the_window_is_expired_not_unknown() {
        let mut w = Window::new(Limits {
            window_ns: 20 * S,
            max_hosts: 10,
            max_groups: 100,
            max_endpoints: 100,
        });
        w.insert(msg("b", "10.0.0.2", 0, vec![]));
        w.insert(msg("a", "10.0.0.1", 0, vec![]));
        w.insert(msg(
            "a",
            "10.0.0.1",
            5,
            vec![
                row(View::Client, ("10.0.0.1", 1024, "api"), ("10.0.0.2", 80), 9),
                row(View::Client, ("10.0.0.1", 1024, "api"), ("10.0.0.7", 80), 8),
            ],
        ));
        assert!(!w.hosts.contains_key("b"));
        let r = rows(&mut w);
        assert_eq!(
            r,
            [
                (s("api"), s("a"), s("expired"), s(""), s("client"), 9),
                (s("api"), s("a"), s("not_monitored"), s(""), s("client"), 8),
            ]
        );
    }

    /// Agents with other interval lengths: published intervals compare by
    /// overlap.
    #[test]
    fn other_interval_lengths_overlap() {
        let mut w = window();
        for t in 0..2 {
            let mut m = msg(
                "a",
                "10.0.0.1",
                t,
                vec![row(
                    View::Client,
                    ("10.0.0.1", 1024, "api"),
                    ("10.0.0.2", 5432),
                    50,
                )],
            );
            // a: 5 s intervals.
            m.start_ns = t * 5 * S;
            m.end_ns = (t + 1) * 5 * S;
            w.insert(m);
        }
        w.insert(msg(
            "b",
            "10.0.0.2",
            0,
            vec![row(
                View::Server,
                ("10.0.0.2", 5432, "db"),
                ("10.0.0.1", 1024),
                100,
            )],
        ));
        let j = w.join();
        assert_eq!(j.stats.joined_rows, 1);
        let total: u64 = j
            .intervals
            .iter()
            .flat_map(|i| &i.rows)
            .map(|a| a.conn.sent.bytes)
            .sum();
        assert_eq!(total, 100);
    }

    /// A ClusterIP DNATed on the client's host: the client's row carries
    /// the pod's address (`nat.ip`, `nat.port`); the server's own row of
    /// that address tags it. Unresolved beyond a translation: `nat`.
    #[test]
    fn post_nat_addresses_join_the_server_row() {
        let mut w = window();
        let nat = |r: &mut Row, ip: &str, port: &str| {
            r.remote.tags.insert(NAT_IP.to_owned(), ip.to_owned());
            r.remote.tags.insert(NAT_PORT.to_owned(), port.to_owned());
        };
        let mut to_vip = row(
            View::Client,
            ("10.0.0.1", 1024, "api"),
            ("10.96.0.10", 80),
            70,
        );
        nat(&mut to_vip, "10.0.0.2", "8080");
        let mut to_gone = row(
            View::Client,
            ("10.0.0.1", 1024, "api"),
            ("10.96.0.11", 80),
            5,
        );
        nat(&mut to_gone, "10.244.9.9", "8080");
        w.insert(msg("a", "10.0.0.1", 0, vec![to_vip, to_gone]));
        w.insert(msg(
            "b",
            "10.0.0.2",
            0,
            vec![row(
                View::Server,
                ("10.0.0.2", 8080, "db"),
                ("10.0.0.1", 1024),
                70,
            )],
        ));
        assert_eq!(
            rows(&mut w),
            [
                (s("api"), s("a"), s("db"), s("b"), s("client"), 70),
                (s("api"), s("a"), s("nat"), s(""), s("client"), 5),
            ]
        );
        assert_eq!(w.join().stats.joined_rows, 1);
    }
}
