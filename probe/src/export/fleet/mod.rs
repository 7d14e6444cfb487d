//! The fleet publisher (`run --fleet`, `replay --fleet`): per interval, this
//! host's rows to the JetStream stream, its presence and the endpoints it
//! serves to KV buckets (docs/fleet.md).
//!
//! The rows come from a [`Rollups`] of their own (interval
//! `--fleet-interval`): each closed interval's groups, seen from this host
//! ([`wire::row_of`]), the `--fleet-top` largest kept and the rest folded
//! per view. [`nats`] sends them from a bounded spool on its own thread.

pub mod nats;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use flowtable::rollup::{Interval, RollupSettings, Rollups};
use flowtable::Connection;

use self::nats::{Nats, Outgoing, Put, Spool, SpoolStatus, StreamBounds};
use self::wire::{Endpoint, Folded, Message, Presence, Row, View, SCHEMA};

/// Defaults of the settings (docs/fleet.md, "Settings").
pub const DEFAULT_INTERVAL_S: f64 = 10.0;
pub const DEFAULT_TOP: usize = 1000;
pub const DEFAULT_SPOOL: usize = 360;
pub const DEFAULT_NETWORK: &str = "default";
/// Endpoints (listeners seen serving) the directory keeps per host.
pub const MAX_ENDPOINTS: usize = 10_000;
/// Ticks a reading waits for attribution before the fleet's rollups take
/// it (`run`; a replay has no attribution).
pub const TAG_LAG_TICKS: usize = 3;
/// Empty intervals sent for a stretch without readings, at most (a host
/// that was suspended longer shows as missing in the fleet).
const MAX_FILL: usize = 360;
/// Groups an open fleet interval holds before it folds new ones.
const MAX_GROUPS: usize = 50_000;

/// What the publisher needs.
#[derive(Clone, Debug)]
pub struct FleetOptions {
    pub nats: Nats,
    pub host_id: String,
    pub network: String,
    pub interval: Duration,
    pub top: usize,
    pub spool: usize,
    pub bounds: StreamBounds,
}

/// What the publisher did, for /health and /metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FleetStatus {
    pub host_id: String,
    pub intervals: u64,
    pub rows: u64,
    /// Groups folded into a view's `folded` counters by --fleet-top.
    pub folded_groups: u64,
    /// Groups with neither end on this host (forwarded): not published.
    pub foreign_groups: u64,
    pub endpoints: usize,
    pub endpoints_dropped: u64,
    pub spool: SpoolStatus,
}

/// Builds interval messages and hands them to the spool.
pub struct Publisher {
    o: FleetOptions,
    rollups: Rollups,
    run: u64,
    seq: u64,
    last_start: Option<u64>,
    addresses: Vec<IpAddr>,
    /// Endpoints seen serving, and what was last put for each.
    endpoints: BTreeMap<(String, IpAddr, u16), BTreeMap<String, String>>,
    spool: Arc<Spool>,
    status: FleetStatus,
    /// Readings wait this many ticks before they are rolled up, so that
    /// they go with the tags attribution found meanwhile (0: at once).
    lag: usize,
    delayed: std::collections::VecDeque<(u64, Vec<Connection>, Vec<Connection>)>,
}

impl Publisher {
    /// Starts the sender thread; `run` is this run's id (its start, Unix
    /// ns; a replay's first interval).
    pub fn start(o: FleetOptions, run: u64, lag: usize) -> Result<Publisher> {
        let spool = Spool::new(o.spool);
        nats::start_sender(o.nats.clone(), o.bounds, spool.clone())?;
        Ok(Publisher {
            rollups: Rollups::new(RollupSettings {
                interval: o.interval,
                keep: 4,
                top: usize::MAX,
                max_groups: MAX_GROUPS,
            }),
            status: FleetStatus {
                host_id: o.host_id.clone(),
                ..FleetStatus::default()
            },
            o,
            run,
            seq: 0,
            last_start: None,
            addresses: Vec::new(),
            endpoints: BTreeMap::new(),
            spool,
            lag,
            delayed: Default::default(),
        })
    }

    /// This host's addresses (where `client`, `server` and `local` views
    /// are decided), as of now.
    pub fn set_addresses(&mut self, mut a: Vec<IpAddr>) {
        a.sort();
        a.dedup();
        self.addresses = a;
    }

    /// One reading at `now_ns`: into the rollups; every interval that
    /// closed goes out.
    pub fn update(&mut self, now_ns: u64, conns: &[Connection], retired: &[Connection]) {
        if self.lag == 0 {
            self.rollups.update(now_ns, conns.to_vec(), retired);
            self.send_closed(now_ns);
            return;
        }
        self.delayed
            .push_back((now_ns, conns.to_vec(), retired.to_vec()));
        if self.delayed.len() > self.lag {
            self.feed_oldest(conns, retired);
        }
    }

    /// The oldest delayed reading into the rollups, each of its records
    /// with the tags the newest reading (`conns`, `retired`) gives it:
    /// attribution that came after a short connection's bytes still tags
    /// them.
    fn feed_oldest(&mut self, conns: &[Connection], retired: &[Connection]) {
        let Some((at, mut old, mut old_retired)) = self.delayed.pop_front() else {
            return;
        };
        type Key = (flowtable::Proto, IpAddr, u16, IpAddr, u16, u32);
        let mut latest: std::collections::HashMap<Key, Vec<&Connection>> = Default::default();
        for c in conns.iter().chain(retired) {
            if !(c.src_tags.is_empty() && c.dst_tags.is_empty()) {
                latest
                    .entry((c.proto, c.src, c.sport, c.dst, c.dport, c.iface))
                    .or_default()
                    .push(c);
            }
        }
        for c in old.iter_mut().chain(old_retired.iter_mut()) {
            let k = (c.proto, c.src, c.sport, c.dst, c.dport, c.iface);
            let same = latest.get(&k).and_then(|v| {
                v.iter().find(|n| {
                    n.first_seen.abs_diff(c.first_seen) < flowtable::delta::SAME_RECORD_NS
                })
            });
            if let Some(n) = same {
                c.src_tags.clone_from(&n.src_tags);
                c.dst_tags.clone_from(&n.dst_tags);
            }
        }
        self.rollups.update(at, old, &old_retired);
        self.send_closed(at);
    }

    /// The end: the open interval closes and goes out too; waits up to
    /// `timeout` for JetStream to take everything, and returns how many
    /// interval messages it did not.
    pub fn finish(mut self, timeout: Duration, now_ns: u64) -> (usize, FleetStatus) {
        let newest = self.delayed.back().cloned();
        if let Some((_, conns, retired)) = newest {
            while !self.delayed.is_empty() {
                self.feed_oldest(&conns, &retired);
            }
        }
        self.rollups.close_open();
        self.send_closed(now_ns);
        let left = self.spool.close(timeout);
        (left, self.status())
    }

    pub fn status(&self) -> FleetStatus {
        let mut s = self.status.clone();
        s.spool = self.spool.status();
        s.endpoints = self.endpoints.len();
        s
    }

    fn send_closed(&mut self, now_ns: u64) {
        let len = (self.o.interval.as_nanos() as u64).max(1);
        let mut closed = Vec::new();
        for i in self.rollups.closed_after(self.last_start) {
            // An interval without a reading (a late tick) goes out empty:
            // the fleet must know that this host was there and had nothing
            // then, or it would count the server's view of it too.
            if let Some(prev) = self.last_start {
                let mut t = prev + len;
                let mut filled = 0;
                while t < i.start_ns && filled < MAX_FILL {
                    closed.push(Arc::new(Interval {
                        start_ns: t,
                        end_ns: t + len,
                        rows: Vec::new(),
                        folded: None,
                    }));
                    t += len;
                    filled += 1;
                }
            }
            self.last_start = Some(i.start_ns);
            closed.push(i);
        }
        for i in closed {
            let m = self.message(&i);
            self.seq += 1;
            self.status.intervals += 1;
            self.status.rows += m.rows.len() as u64;
            let payload = serde_json::to_vec(&m).expect("a message serialises");
            self.spool.push(Outgoing {
                subject: wire::subject(&m.host),
                id: wire::msg_id(&m),
                payload,
            });
            self.directory(&m, now_ns);
        }
    }

    /// The message of one closed interval: its groups as rows, the top
    /// kept, the rest folded per view.
    fn message(&mut self, i: &Interval) -> Message {
        let addrs: BTreeSet<IpAddr> = self.addresses.iter().copied().collect();
        let mut rows: Vec<Row> = Vec::new();
        for a in &i.rows {
            match wire::row_of(a, |ip| addrs.contains(ip)) {
                Some(r) => rows.push(r),
                None => self.status.foreign_groups += 1,
            }
        }
        // Most bytes first (the rollups' order), ties as they came.
        let mut folded: BTreeMap<View, Folded> = BTreeMap::new();
        if rows.len() > self.o.top {
            for r in rows.split_off(self.o.top) {
                let f = folded.entry(r.view).or_default();
                f.groups += 1;
                f.conns += r.conns;
                f.sent.add(&r.sent);
                f.received.add(&r.received);
                self.status.folded_groups += 1;
            }
        }
        // What the rollups folded while the interval was open (their
        // `max_groups`): its view is not known; the client view is the
        // one the fleet always counts.
        if let Some(a) = &i.folded {
            let f = folded.entry(View::Client).or_default();
            f.conns += a.conns;
            f.sent.add(&a.conn.sent);
            f.received.add(&a.conn.received);
        }
        Message {
            schema: SCHEMA,
            host: self.o.host_id.clone(),
            network: self.o.network.clone(),
            run: self.run,
            seq: self.seq,
            start_ns: i.start_ns,
            end_ns: i.end_ns,
            addresses: self.addresses.clone(),
            rows,
            folded,
            spool_dropped: self.spool.dropped(),
        }
    }

    /// Presence, and the endpoints this interval's server rows show
    /// (bounded; new or changed ones are put, all of them again when the
    /// presence is).
    fn directory(&mut self, m: &Message, now_ns: u64) {
        let mut puts = Vec::new();
        for r in m.rows.iter().filter(|r| r.view == View::Server) {
            let k = (r.proto.clone(), r.local.ip, r.local.port);
            let changed = self.endpoints.get(&k) != Some(&r.local.tags);
            if !changed {
                continue;
            }
            if !self.endpoints.contains_key(&k) && self.endpoints.len() >= MAX_ENDPOINTS {
                self.status.endpoints_dropped += 1;
                continue;
            }
            self.endpoints.insert(k, r.local.tags.clone());
        }
        // All of them each interval: the bucket's entries expire after
        // the TTL, so a live host's must be refreshed.
        for ((proto, ip, port), tags) in &self.endpoints {
            let e = Endpoint {
                schema: SCHEMA,
                host: self.o.host_id.clone(),
                network: self.o.network.clone(),
                proto: proto.clone(),
                ip: *ip,
                port: *port,
                tags: tags.clone(),
            };
            puts.push(Put {
                bucket: wire::ENDPOINTS_BUCKET,
                key: wire::endpoint_key(&self.o.host_id, proto, *ip, *port),
                value: serde_json::to_vec(&e).expect("serialises"),
            });
        }
        let p = Presence {
            schema: SCHEMA,
            host: self.o.host_id.clone(),
            network: self.o.network.clone(),
            addresses: self.addresses.clone(),
            run: self.run,
            at_ns: now_ns,
        };
        puts.push(Put {
            bucket: wire::PRESENCE_BUCKET,
            key: self.o.host_id.clone(),
            value: serde_json::to_vec(&p).expect("serialises"),
        });
        self.spool.put(puts, MAX_ENDPOINTS + 1);
    }
}

/// `replay --fleet`: publishes `files` as host `o.host_id` with addresses
/// `addresses` would have: intervals from packet time (so the same capture
/// gives the same messages, ids included), empty ones between the first
/// packet and the last too. Waits for JetStream to take every message.
pub fn publish_capture(
    files: &[std::path::PathBuf],
    o: FleetOptions,
    addresses: Vec<IpAddr>,
    decap: probe_common::Decap,
) -> Result<(FleetStatus, Vec<crate::sources::file::FileOutcome>)> {
    use flowtable::{FlowTable, FrameStats};
    nats::check_reachable(&o.nats)?;
    let len = (o.interval.as_nanos() as u64).max(1);
    let mut table = FlowTable::new();
    let mut stats = FrameStats::default();
    let mut publisher: Option<Publisher> = None;
    let mut next: Option<u64> = None;
    let mut last_ts = 0;
    let mut failed: Option<anyhow::Error> = None;
    let outcomes = crate::sources::file::replay_timed(
        files,
        &mut table,
        &mut stats,
        decap,
        &mut |t: &FlowTable, ts: u64| {
            last_ts = last_ts.max(ts);
            let boundary = *next.get_or_insert(ts - ts % len + len);
            if publisher.is_none() && failed.is_none() {
                // The run id: the first interval's start.
                match Publisher::start(o.clone(), boundary - len, 0) {
                    Ok(mut p) => {
                        p.spool.quiet();
                        p.set_addresses(addresses.clone());
                        publisher = Some(p);
                    }
                    Err(e) => failed = Some(e),
                }
            }
            let Some(p) = &mut publisher else { return };
            let mut b = boundary;
            if ts >= b {
                let conns = t.connections();
                while ts >= b {
                    p.update(b - 1, &conns, &[]);
                    b += len;
                }
                next = Some(b);
            }
        },
    )?;
    if let Some(e) = failed {
        return Err(e);
    }
    let Some(mut p) = publisher else {
        anyhow::bail!("no packets: nothing to publish");
    };
    p.update(last_ts, &table.connections(), &[]);
    let (left, status) = p.finish(Duration::from_secs(30), last_ts);
    if let Some(e) = &status.spool.refused {
        anyhow::bail!("fleet: NATS at {} refused: {e}", o.nats.redacted());
    }
    if left > 0 {
        anyhow::bail!(
            "fleet: {left} interval messages were not taken by JetStream at {} ({})",
            o.nats.redacted(),
            status
                .spool
                .last_error
                .as_deref()
                .unwrap_or("no error said")
        );
    }
    Ok((status, outcomes))
}

#[cfg(test)]
mod tests {
    use flowtable::DirStats;

    use super::*;

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn conn(src: &str, sport: u16, dst: &str, dport: u16, bytes: u64) -> Connection {
        Connection {
            proto: flowtable::Proto::Tcp,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            iface: 2,
            first_seen: T0 + u64::from(sport),
            last_seen: T0 + S,
            sent: DirStats::counts(1, bytes, 0),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
    }

    fn publisher(top: usize, lag: usize) -> Publisher {
        let nats = Nats::new("nats://127.0.0.1:1", Default::default(), "--fleet").unwrap();
        let mut p = Publisher::start(
            FleetOptions {
                nats,
                host_id: "h".into(),
                network: "default".into(),
                interval: Duration::from_secs(1),
                top,
                spool: 100,
                bounds: StreamBounds::default(),
            },
            T0,
            lag,
        )
        .unwrap();
        p.set_addresses(vec![
            "10.0.0.1".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ]);
        p
    }

    fn messages(p: &Publisher) -> Vec<Message> {
        p.spool
            .waiting()
            .iter()
            .map(|o| serde_json::from_slice(&o.payload).unwrap())
            .collect()
    }

    /// Views from the host's addresses, top-K with the rest folded per
    /// view, forwarded groups left out, empty intervals filled, ids.
    #[test]
    fn messages_per_interval() {
        let mut p = publisher(2, 0);
        let conns = [
            conn("10.0.0.1", 40000, "10.0.0.2", 80, 500),
            conn("10.0.0.3", 40001, "10.0.0.1", 22, 400),
            conn("127.0.0.1", 40002, "127.0.0.1", 5432, 300),
            conn("10.0.0.1", 40003, "10.0.0.4", 443, 200),
            conn("10.0.0.8", 40004, "10.0.0.9", 53, 100),
        ];
        p.update(T0 + S / 2, &conns, &[]);
        // No reading in [T0+1s, T0+3s): filled with empty intervals once
        // the next one closes.
        p.update(T0 + 3 * S + S / 2, &conns, &[]);
        p.update(T0 + 4 * S + S / 2, &conns, &[]);
        let m = messages(&p);
        assert_eq!(m.len(), 4);
        let views: Vec<(View, u16, u16)> = m[0]
            .rows
            .iter()
            .map(|r| (r.view, r.local.port, r.remote.port))
            .collect();
        // Ephemeral initiator ports read 1024.
        assert_eq!(views, [(View::Client, 1024, 80), (View::Server, 22, 1024)]);
        assert_eq!(m[0].folded[&View::Local].sent.bytes, 300);
        assert_eq!(m[0].folded[&View::Client].sent.bytes, 200);
        assert_eq!(p.status().foreign_groups, 1);
        assert!(m[1].rows.is_empty() && m[2].rows.is_empty() && m[3].rows.is_empty());
        assert_eq!(
            m.iter().map(|m| (m.seq, m.start_ns)).collect::<Vec<_>>(),
            [(0, T0), (1, T0 + S), (2, T0 + 2 * S), (3, T0 + 3 * S)]
        );
        assert_eq!(
            p.spool.waiting()[1].id,
            format!("h.{T0}.1"),
            "Nats-Msg-Id: host.run.seq"
        );
    }

    /// A reading waits `lag` ticks and goes with the newest tags.
    #[test]
    fn late_tags_reach_early_bytes() {
        let mut p = publisher(10, 2);
        let bare = conn("10.0.0.1", 40000, "10.0.0.2", 80, 500);
        let mut tagged = bare.clone();
        tagged
            .src_tags
            .insert("service".to_owned(), "api".to_owned());
        p.update(T0 + S / 2, std::slice::from_ref(&bare), &[]);
        p.update(T0 + S + S / 2, std::slice::from_ref(&tagged), &[]);
        p.update(T0 + 2 * S + S / 2, std::slice::from_ref(&tagged), &[]);
        p.update(T0 + 3 * S + S / 2, std::slice::from_ref(&tagged), &[]);
        let m = messages(&p);
        assert_eq!(m[0].rows.len(), 1);
        assert_eq!(m[0].rows[0].local.tags["service"], "api");
        assert_eq!(m[0].rows[0].sent.bytes, 500);
    }
}
