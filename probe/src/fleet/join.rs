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
//!
//! The window holds each message's rows packed ([`super::store::Rows`],
//! tag sets interned once for the whole window); the join reads them back
//! and keys everything by addresses and small ids, so that it allocates
//! per joined group, not per row. It is incremental by interval: a joined
//! interval is made again only when a message of an interval overlapping
//! it came or went, or when what tags every interval changed (a
//! counterpart's tags, the hosts' addresses, the directory, a host come or
//! gone); otherwise the last answer's interval is kept as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use flowtable::rollup::{Aggregate, Interval};
use flowtable::{new_histogram, Connection, Proto};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;

use super::store::{Interner, PEnd, Packed, Rows, TagId};
#[cfg(test)]
use crate::export::fleet::wire::Row;
use crate::export::fleet::wire::{Endpoint, Folded, Message, Presence, Reject, View};
#[cfg(test)]
use flowtable::nat::{NAT_IP, NAT_PORT};
#[cfg(test)]
use flowtable::DirStats;

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

/// One host interval as the window holds it.
#[derive(Debug)]
pub struct Held {
    pub run: u64,
    pub seq: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub rows: Rows,
    /// The message's `folded`, in its order.
    pub folded: Vec<(View, Folded)>,
}

/// One host as the window knows it.
#[derive(Debug, Default)]
pub struct HostState {
    pub network: String,
    pub addresses: Vec<IpAddr>,
    /// (interval start, run) → its rows.
    pub intervals: BTreeMap<(u64, u64), Held>,
    pub spool_dropped: u64,
    /// The earliest end of `intervals` (0: to be found again).
    min_end: u64,
    /// This host in the join's maps (used again after the host left).
    idx: u32,
    /// Its network, interned (the join's maps key by it).
    net: TagId,
}

/// A directory entry as the window holds it (key: network, proto, ip,
/// port).
#[derive(Debug)]
pub struct DirEntry {
    pub host: String,
    pub tags: TagId,
}

/// Everything the fleet holds.
pub struct Window {
    pub limits: Limits,
    pub hosts: BTreeMap<String, HostState>,
    /// Latest presence per host (KV).
    pub presence: BTreeMap<String, Presence>,
    /// (network, proto, ip, port) → the endpoint (KV).
    pub endpoints: BTreeMap<(String, String, IpAddr, u16), DirEntry>,
    /// Addresses of hosts whose intervals all left the window.
    pub departed: BTreeMap<(String, IpAddr), String>,
    pub newest_end: u64,
    pub stats: Stats,
    /// Every tag set the rows and the directory use, once.
    pub tags: Interner,
    /// Rows held, and the bytes of their packed form.
    pub rows: u64,
    pub row_bytes: u64,
    /// Host names by [`HostState`] index, and indices free again.
    names: Vec<String>,
    free_idx: Vec<u32>,
    /// Intervals `[start, end)` whose messages came or went since the last
    /// join: joined intervals overlapping them are made again.
    dirty: Vec<(u64, u64)>,
    /// Every joined interval is made again (hosts, directory or departed
    /// addresses changed).
    all_dirty: bool,
    cache: Cache,
}

/// What the last join made, and what it was made with.
#[derive(Default)]
struct Cache {
    owner: Vec<((String, IpAddr), String)>,
    ends: FxHashMap<EndKey, EndVal>,
    /// Joined intervals by start, with their part of the stats.
    slots: BTreeMap<u64, (Arc<Interval>, JoinStats)>,
}

/// A pair as one end's host sees it: server end?, network (id,
/// generation), udp, client address, server address, server port.
type EndKey = (bool, (TagId, u32), bool, IpAddr, IpAddr, u16);
/// That end's host (index) and tags (id, generation).
type EndVal = (u32, TagId, u32);

/// Beyond this many dirty ranges, everything is joined again.
const MAX_DIRTY: usize = 4096;

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
            tags: Interner::new(),
            rows: 0,
            row_bytes: 0,
            names: Vec::new(),
            free_idx: Vec::new(),
            dirty: Vec::new(),
            all_dirty: true,
            cache: Cache::default(),
        }
    }

    fn touch(&mut self, start: u64, end: u64) {
        if self.dirty.len() >= MAX_DIRTY {
            self.all_dirty = true;
            self.dirty.clear();
        }
        if !self.all_dirty {
            self.dirty.push((start, end));
        }
    }

    fn network_id(&mut self, network: &str) -> TagId {
        self.tags
            .intern(&BTreeMap::from([(String::new(), network.to_owned())]))
    }

    /// A host gone: its index and network go back.
    fn forget_host(&mut self, h: &HostState) {
        self.tags.release(h.net);
        if let Some(n) = self.names.get_mut(h.idx as usize) {
            n.clear();
        }
        self.free_idx.push(h.idx);
        self.all_dirty = true;
    }

    /// Forgets the messages (a new consumer delivers them all again);
    /// counters stay.
    pub fn restart(&mut self) {
        for mut h in std::mem::take(&mut self.hosts).into_values() {
            for held in std::mem::take(&mut h.intervals).into_values() {
                self.drop_held(held);
            }
            self.forget_host(&h);
        }
        self.newest_end = 0;
        self.cache = Cache::default();
    }

    fn drop_held(&mut self, h: Held) {
        h.rows.release(&mut self.tags);
        self.rows -= h.rows.len() as u64;
        self.row_bytes -= h.rows.bytes() as u64;
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
        let key = (m.start_ns, m.run);
        if let Some(old) = self.hosts.get(&m.host).and_then(|h| h.intervals.get(&key)) {
            if old.seq == m.seq {
                self.stats.duplicates += 1;
                return;
            }
        }
        let rows = Rows::pack(&m.rows, &mut self.tags);
        self.rows += rows.len() as u64;
        self.row_bytes += rows.bytes() as u64;
        let held = Held {
            run: m.run,
            seq: m.seq,
            start_ns: m.start_ns,
            end_ns: m.end_ns,
            rows,
            folded: m.folded.into_iter().collect(),
        };
        if !self.hosts.contains_key(&m.host) {
            let idx = match self.free_idx.pop() {
                Some(i) => {
                    self.names[i as usize] = m.host.clone();
                    i
                }
                None => {
                    self.names.push(m.host.clone());
                    (self.names.len() - 1) as u32
                }
            };
            let net = self.network_id(&m.network);
            let h = HostState {
                network: m.network.clone(),
                idx,
                net,
                ..HostState::default()
            };
            self.hosts.insert(m.host.clone(), h);
            self.all_dirty = true;
        } else if self
            .hosts
            .get(&m.host)
            .is_some_and(|h| h.network != m.network)
        {
            let net = self.network_id(&m.network);
            if let Some(h) = self.hosts.get_mut(&m.host) {
                self.tags.release(std::mem::replace(&mut h.net, net));
            }
        }
        self.touch(m.start_ns, m.end_ns);
        let h = self.hosts.get_mut(&m.host).expect("made above");
        h.network = m.network;
        h.addresses = m.addresses;
        h.spool_dropped = h.spool_dropped.max(m.spool_dropped);
        h.min_end = if h.intervals.is_empty() {
            m.end_ns
        } else {
            h.min_end.min(m.end_ns)
        };
        self.newest_end = self.newest_end.max(m.end_ns);
        let old = h.intervals.insert(key, held);
        if let Some(old) = old {
            self.touch(old.start_ns, old.end_ns);
            self.drop_held(old);
        }
        self.stats.accepted += 1;
        self.expire();
    }

    /// Drops intervals that ended more than the window before the newest.
    fn expire(&mut self) {
        let from = self.newest_end.saturating_sub(self.limits.window_ns);
        let mut gone = Vec::new();
        let mut dropped = Vec::new();
        for (id, h) in &mut self.hosts {
            // Nothing of this host ends before `from`.
            if h.min_end >= from && h.min_end != 0 {
                continue;
            }
            let old: Vec<(u64, u64)> = h
                .intervals
                .iter()
                .filter(|(_, m)| m.end_ns < from)
                .map(|(k, _)| *k)
                .collect();
            for k in old {
                dropped.extend(h.intervals.remove(&k));
            }
            h.min_end = h.intervals.values().map(|m| m.end_ns).min().unwrap_or(0);
            if h.intervals.is_empty() {
                gone.push(id.clone());
            }
        }
        self.stats.expired_intervals += dropped.len() as u64;
        for held in dropped {
            self.touch(held.start_ns, held.end_ns);
            self.drop_held(held);
        }
        for id in gone {
            if let Some(h) = self.hosts.remove(&id) {
                self.forget_host(&h);
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
        let k = (e.network, e.proto, e.ip, e.port);
        if !self.endpoints.contains_key(&k) && self.endpoints.len() >= self.limits.max_endpoints {
            self.stats.endpoints_refused += 1;
            return;
        }
        let entry = DirEntry {
            host: e.host,
            tags: self.tags.intern(&e.tags),
        };
        let (host, tags) = (entry.host.clone(), entry.tags);
        match self.endpoints.insert(k, entry) {
            Some(old) => {
                if old.host != host || old.tags != tags {
                    self.all_dirty = true;
                }
                self.tags.release(old.tags);
            }
            None => self.all_dirty = true,
        }
    }

    pub fn remove_key(&mut self, bucket_is_presence: bool, key: &str) {
        if bucket_is_presence {
            self.presence.remove(key);
        } else {
            let host = key.split('.').next().unwrap_or("");
            let port: Option<u16> = key.rsplit('.').next().and_then(|p| p.parse().ok());
            let gone: Vec<_> = self
                .endpoints
                .iter()
                .filter(|((_, proto, ip, p), e)| {
                    e.host == host
                        && Some(*p) == port
                        && crate::export::fleet::wire::endpoint_key(&e.host, proto, *ip, *p) == key
                })
                .map(|(k, _)| k.clone())
                .collect();
            for k in gone {
                if let Some(e) = self.endpoints.remove(&k) {
                    self.tags.release(e.tags);
                    self.all_dirty = true;
                }
            }
        }
    }

    /// An end as it is on the wire between hosts: its `nat.ip`/`nat.port`
    /// (the address beyond a translation on its host) when it has them.
    fn wire(&self, e: &PEnd) -> (IpAddr, u16) {
        let (ip, port) = self.tags.nat(e.tags);
        (ip.unwrap_or(e.ip), port.unwrap_or(e.port))
    }

    /// The joined intervals, oldest first, and what the join found.
    pub fn join(&mut self) -> Joined {
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
        let owned: Vec<((String, IpAddr), String)> = claims
            .into_iter()
            .filter_map(|((net, ip), ids)| {
                if ids.len() == 1 {
                    ids.into_iter()
                        .next()
                        .map(|id| ((net.to_owned(), ip), id.to_owned()))
                } else {
                    ambiguous += 1;
                    None
                }
            })
            .collect();
        // Each end's tags as its own host gave them, from any interval
        // (the last one read wins).
        let mut ends: FxHashMap<EndKey, EndVal> = FxHashMap::default();
        ends.reserve(self.cache.ends.len());
        for h in self.hosts.values() {
            let net = (h.net, self.tags.generation(h.net));
            for m in h.intervals.values() {
                for r in m.rows.iter() {
                    let k = match r.view {
                        View::Server => (true, net, r.udp, r.remote.ip, r.local.ip, r.local.port),
                        View::Client => {
                            let (dst, dport) = self.wire(&r.remote);
                            (false, net, r.udp, self.wire(&r.local).0, dst, dport)
                        }
                        View::Local => continue,
                    };
                    let t = r.local.tags;
                    ends.insert(k, (h.idx, t, self.tags.generation(t)));
                }
            }
        }
        // What tags every interval changed: each is made again.
        let all = std::mem::take(&mut self.all_dirty)
            || owned != self.cache.owner
            || ends != self.cache.ends;
        let dirty = std::mem::take(&mut self.dirty);
        let owner: FxHashMap<(&str, IpAddr), &str> = owned
            .iter()
            .map(|((net, ip), id)| ((net.as_str(), *ip), id.as_str()))
            .collect();
        // Which intervals each host published, by start (agents with
        // another --fleet-interval are compared by overlap), with the
        // latest end so far.
        let published: FxHashMap<&str, Vec<(u64, u64)>> = self
            .hosts
            .iter()
            .map(|(id, h)| {
                let mut latest = 0;
                let v = h
                    .intervals
                    .values()
                    .map(|m| {
                        latest = latest.max(m.end_ns);
                        (m.start_ns, latest)
                    })
                    .collect();
                (id.as_str(), v)
            })
            .collect();
        let directory: FxHashMap<(&str, bool, IpAddr, u16), (&str, TagId)> = self
            .endpoints
            .iter()
            .filter(|((_, proto, _, _), _)| proto == "tcp" || proto == "udp")
            .map(|((net, proto, ip, port), e)| {
                (
                    (net.as_str(), proto == "udp", *ip, *port),
                    (e.host.as_str(), e.tags),
                )
            })
            .collect();
        let departed: FxHashSet<(&str, IpAddr)> = self
            .departed
            .keys()
            .map(|(net, ip)| (net.as_str(), *ip))
            .collect();
        let cx = Context {
            owner,
            published,
            ends: &ends,
            directory,
            departed,
        };
        let starts: BTreeSet<u64> = self
            .hosts
            .values()
            .flat_map(|h| h.intervals.keys().map(|k| k.0))
            .collect();
        let mut slots = BTreeMap::new();
        for start in starts {
            let kept = self.cache.slots.get(&start).filter(|(i, _)| {
                !all && !dirty
                    .iter()
                    .any(|&(s, e)| s == start || (s < i.end_ns && e > start))
            });
            let slot = match kept {
                Some(k) => k.clone(),
                None => self.join_slot(&cx, start),
            };
            slots.insert(start, slot);
        }
        drop(cx);
        let mut stats = JoinStats {
            ambiguous_addresses: ambiguous,
            ..JoinStats::default()
        };
        for (_, s) in slots.values() {
            stats.folded_groups += s.folded_groups;
            stats.joined_rows += s.joined_rows;
            stats.server_folded_bytes += s.server_folded_bytes;
            stats.by_counterpart += s.by_counterpart;
            stats.by_directory += s.by_directory;
            stats.by_address += s.by_address;
            stats.unresolved += s.unresolved;
        }
        let intervals = slots.values().map(|(i, _)| i.clone()).collect();
        self.cache = Cache {
            owner: owned,
            ends,
            slots,
        };
        Joined {
            intervals,
            now_ns: self.newest_end,
            stats,
        }
    }

    /// Joins the messages of the intervals that start at `start`.
    fn join_slot(&self, cx: &Context<'_>, start: u64) -> (Arc<Interval>, JoinStats) {
        let covered = |host: &str, start: u64, end: u64| -> bool {
            let Some(v) = cx.published.get(host) else {
                return false;
            };
            // Sorted by start: of those starting before `end`, one ends
            // after `start`.
            let upto = v.partition_point(|i| i.0 < end);
            upto > 0 && v[upto - 1].1 > start
        };
        let end_of = |k: &EndKey| {
            cx.ends.get(k).map(|&(idx, t, _)| {
                let name = self.names.get(idx as usize).map_or("", String::as_str);
                End::Host(name, t)
            })
        };
        let unresolved = |net: &str, ip: IpAddr| {
            if cx.departed.contains(&(net, ip)) {
                End::Unresolved("expired")
            } else {
                End::Unresolved("not_monitored")
            }
        };
        let mut finals = Finals::default();
        let mut slot = Slot::default();
        let mut stats = JoinStats::default();
        for (id, h) in &self.hosts {
            let net = h.network.as_str();
            let net_id = (h.net, self.tags.generation(h.net));
            let me = |tags| End::Host(id.as_str(), tags);
            for m in h
                .intervals
                .range((start, 0)..=(start, u64::MAX))
                .map(|e| e.1)
            {
                slot.end = slot.end.max(m.end_ns);
                for r in m.rows.iter() {
                    let (src_end, dst_end) = match r.view {
                        View::Local => (me(r.local.tags), me(r.remote.tags)),
                        View::Client => {
                            // The responder where the connection arrives:
                            // beyond a DNAT on this host (a ClusterIP, a
                            // published port) if there was one.
                            let (rip, rport) = self.wire(&r.remote);
                            let translated = (rip, rport) != (r.remote.ip, r.remote.port);
                            let k = (true, net_id, r.udp, self.wire(&r.local).0, rip, rport);
                            let dst = if let Some(e) = end_of(&k) {
                                stats.by_counterpart += 1;
                                e
                            } else if let Some(&(h2, t)) =
                                cx.directory.get(&(net, r.udp, rip, rport))
                            {
                                stats.by_directory += 1;
                                End::Host(h2, t)
                            } else if let Some(&h2) = cx.owner.get(&(net, rip)) {
                                stats.by_address += 1;
                                End::Host(h2, Interner::EMPTY)
                            } else if translated {
                                stats.unresolved += 1;
                                End::Unresolved("nat")
                            } else {
                                stats.unresolved += 1;
                                unresolved(net, rip)
                            };
                            (me(r.local.tags), dst)
                        }
                        View::Server => {
                            let client_host = cx.owner.get(&(net, r.remote.ip)).copied();
                            if let Some(c) = client_host {
                                if c != id.as_str() && covered(c, m.start_ns, m.end_ns) {
                                    stats.joined_rows += 1;
                                    continue;
                                }
                            }
                            let k = (false, net_id, r.udp, r.remote.ip, r.local.ip, r.local.port);
                            let src = if let Some(e) = end_of(&k) {
                                stats.by_counterpart += 1;
                                e
                            } else if let Some(h2) = client_host {
                                stats.by_address += 1;
                                End::Host(h2, Interner::EMPTY)
                            } else {
                                stats.unresolved += 1;
                                unresolved(net, r.remote.ip)
                            };
                            (src, me(r.local.tags))
                        }
                    };
                    let (src, sport, dst, dport) = match r.view {
                        View::Server => (r.remote.ip, r.remote.port, r.local.ip, r.local.port),
                        _ => (r.local.ip, r.local.port, r.remote.ip, r.remote.port),
                    };
                    let key: GroupKey = (
                        r.udp,
                        src,
                        sport,
                        dst,
                        dport,
                        finals.id(src_end, Some(r.view), &self.tags),
                        finals.id(dst_end, None, &self.tags),
                    );
                    let agg = if let Some(&i) = slot.index.get(&key) {
                        &mut slot.groups[i]
                    } else if slot.groups.len() < self.limits.max_groups {
                        slot.index.insert(key, slot.groups.len());
                        slot.groups.push(Aggregate::empty(Connection {
                            proto: if r.udp { Proto::Udp } else { Proto::Tcp },
                            src,
                            sport,
                            dst,
                            dport,
                            iface: 0,
                            first_seen: u64::MAX,
                            last_seen: 0,
                            sent: Default::default(),
                            received: Default::default(),
                            rtt: Default::default(),
                            src_tags: finals.sets[key.5 as usize].clone(),
                            dst_tags: finals.sets[key.6 as usize].clone(),
                        }));
                        slot.groups.last_mut().expect("pushed")
                    } else {
                        stats.folded_groups += 1;
                        slot.folded.get_or_insert_with(Aggregate::folded)
                    };
                    add_row(agg, &r);
                }
                for (view, f) in &m.folded {
                    if *view == View::Server {
                        stats.server_folded_bytes += f.sent.bytes + f.received.bytes;
                        continue;
                    }
                    let a = slot.folded.get_or_insert_with(Aggregate::folded);
                    a.add(&f.sent, &f.received, m.start_ns, m.end_ns);
                    a.conns += f.conns;
                }
            }
        }
        let mut rows = slot.groups;
        rows.sort_by_key(|a| std::cmp::Reverse(a.bytes()));
        let interval = Interval {
            start_ns: start,
            end_ns: slot.end,
            rows,
            folded: slot.folded,
        };
        (Arc::new(interval), stats)
    }
}

/// What every joined interval is made with.
struct Context<'a> {
    owner: FxHashMap<(&'a str, IpAddr), &'a str>,
    published: FxHashMap<&'a str, Vec<(u64, u64)>>,
    ends: &'a FxHashMap<EndKey, EndVal>,
    directory: FxHashMap<(&'a str, bool, IpAddr, u16), (&'a str, TagId)>,
    departed: FxHashSet<(&'a str, IpAddr)>,
}

/// An end of a counted row, before its tags are spelled out: a host's own
/// tags (or none: known by address), or why it is unresolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum End<'a> {
    Host(&'a str, TagId),
    Unresolved(&'static str),
}

/// The tag sets of the joined groups' ends, each spelled out once.
#[derive(Default)]
struct Finals<'a> {
    ids: FxHashMap<(End<'a>, Option<View>), u32>,
    sets: Vec<flowtable::Tags>,
}

impl<'a> Finals<'a> {
    /// `end`'s tags with `host` (or `unresolved`), and `view` on the
    /// initiator's end.
    fn id(&mut self, end: End<'a>, view: Option<View>, tags: &Interner) -> u32 {
        if let Some(&id) = self.ids.get(&(end, view)) {
            return id;
        }
        let mut t = match end {
            End::Host(host, id) => {
                let mut t = tags.get(id).clone();
                t.insert("host".to_owned(), host.to_owned());
                t
            }
            End::Unresolved(why) => BTreeMap::from([("unresolved".to_owned(), why.to_owned())]),
        };
        if let Some(v) = view {
            t.insert("view".to_owned(), v.name().to_owned());
        }
        let id = self.sets.len() as u32;
        self.sets.push(t.into());
        self.ids.insert((end, view), id);
        id
    }
}

/// One joined interval while it is made: its end, its groups (in the
/// order they came), what was folded.
#[derive(Default)]
struct Slot {
    end: u64,
    index: FxHashMap<GroupKey, usize>,
    groups: Vec<Aggregate>,
    folded: Option<Aggregate>,
}

/// udp, src, sport, dst, dport, src tags, dst tags (ids of [`Finals`]).
type GroupKey = (bool, IpAddr, u16, IpAddr, u16, u32, u32);

fn add_row(a: &mut Aggregate, r: &Packed<'_>) {
    a.add(&r.sent, &r.received, r.first_seen_ns, r.last_seen_ns);
    a.conns += r.conns;
    for (leg, hist, max) in [
        (r.rtt_dst, &mut a.rtt_dst, &mut a.rtt_dst_max),
        (r.rtt_src, &mut a.rtt_src, &mut a.rtt_src_max),
    ] {
        if let Some(l) = leg {
            let h = hist.get_or_insert_with(|| Box::new(new_histogram()));
            for (v, n) in l.pairs() {
                // Auto-resizing: a large value cannot fail.
                let _ = h.record_n(v, n);
            }
            *max = (*max).max(l.max_us);
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
            sent: DirStats::counts(0, bytes, 0),
            received: DirStats::counts(0, 10, 0),
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
                sent: DirStats::counts(0, 9, 0),
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

    /// Joined after every message or once at the end, the answer is the
    /// same; an interval nothing touched is kept, not made again.
    #[test]
    fn incremental_join_is_the_full_join() {
        let mut msgs = Vec::new();
        for t in 0..4 {
            // a → b:5432 every interval; b's server row from interval 1 on
            // (a counterpart that comes late re-tags every interval); c
            // unmonitored → b; a → d by the directory.
            msgs.push(msg(
                "a",
                "10.0.0.1",
                t,
                vec![
                    row(
                        View::Client,
                        ("10.0.0.1", 1024, "api"),
                        ("10.0.0.2", 5432),
                        100 + t,
                    ),
                    row(View::Client, ("10.0.0.1", 1024, "api"), ("10.0.0.4", 80), 7),
                ],
            ));
            let mut rows = vec![row(
                View::Server,
                ("10.0.0.2", 5432, "db"),
                ("10.0.0.3", 1024),
                50 + t,
            )];
            if t > 0 {
                rows.push(row(
                    View::Server,
                    ("10.0.0.2", 5432, "db"),
                    ("10.0.0.1", 1024),
                    100 + t,
                ));
            }
            msgs.push(msg("b", "10.0.0.2", t, rows));
        }
        let mut once = window();
        let mut each = window();
        for m in msgs.iter().cloned() {
            once.insert(m.clone());
            each.insert(m);
            each.join();
        }
        let dir = |w: &mut Window| {
            w.put_endpoint(
                "d.tcp.10-0-0-4.80",
                Endpoint {
                    schema: SCHEMA,
                    host: "d".into(),
                    network: "default".into(),
                    proto: "tcp".into(),
                    ip: ip("10.0.0.4"),
                    port: 80,
                    tags: BTreeMap::from([("service".to_owned(), "web".to_owned())]),
                },
            )
        };
        dir(&mut once);
        dir(&mut each);
        assert_eq!(rows(&mut each), rows(&mut once));
        assert_eq!(rows(&mut each).len(), 12);
        assert!(rows(&mut each).contains(&(s("api"), s("a"), s("web"), s("d"), s("client"), 7)));
        let (a, b) = (each.join(), once.join());
        assert_eq!(format!("{:?}", a.stats), format!("{:?}", b.stats));
        // A message of interval 4 leaves intervals 0..3 as they were.
        let before = each.join();
        each.insert(msg("a", "10.0.0.1", 4, vec![]));
        let after = each.join();
        assert_eq!(after.intervals.len(), 5);
        for (x, y) in before.intervals.iter().zip(&after.intervals) {
            assert!(Arc::ptr_eq(x, y));
        }
        // Its counterpart's tags changed: every interval is made again.
        each.insert(msg(
            "b",
            "10.0.0.2",
            4,
            vec![row(
                View::Server,
                ("10.0.0.2", 5432, "db2"),
                ("10.0.0.1", 1024),
                1,
            )],
        ));
        let again = each.join();
        assert!(!Arc::ptr_eq(&after.intervals[0], &again.intervals[0]));
        let g = |w: &Joined| -> BTreeSet<String> {
            w.intervals
                .iter()
                .flat_map(|i| &i.rows)
                .filter_map(|a| a.conn.dst_tags.get("service").cloned())
                .collect()
        };
        assert_eq!(g(&again), BTreeSet::from([s("db"), s("db2"), s("web")]));
    }
}
