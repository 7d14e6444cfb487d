//! Interval rollups: what the connections added in each interval, summed
//! per group and kept for a bounded number of intervals. `--last 5m`
//! queries are answered from here, and a long-running agent keeps these
//! instead of every connection it ever saw.
//!
//! A group is everything a query can group by except what names one
//! connection: protocol, both addresses, the responder's port, the
//! interface and both ends' tags, without the initiator's ephemeral port
//! (nor its translated one, `nat.port`) and without `socket_cookie` (one
//! per socket: with it every connection was a group of its own, and a
//! busy interval hit `max_groups`). Each closed interval keeps its `top`
//! groups by bytes and folds the rest into one `folded` aggregate (counted
//! in [`RollupStats::folded_groups`]); while an interval is open, groups
//! beyond `max_groups` are folded at once. The ring keeps `keep`
//! intervals; older ones are dropped (and counted).
//!
//! Time is the readings' (wall clock at each tick), so the rollups are a
//! pure function of the readings they were given.

use std::collections::{BTreeMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use rustc_hash::{FxHashMap, FxHasher};

use crate::conn::{Connection, DirStats, Proto};
use crate::delta::Last;
use crate::query::{QueryResult, QuerySpec, EPHEMERAL_MIN};
use crate::rtt::new_histogram;
use crate::tags::Tags;

/// The bounds of the rollups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollupSettings {
    /// Length of one interval.
    pub interval: Duration,
    /// Closed intervals kept.
    pub keep: usize,
    /// Groups a closed interval keeps; the rest are folded.
    pub top: usize,
    /// Groups an open interval holds before it folds new ones.
    pub max_groups: usize,
}

impl Default for RollupSettings {
    /// Ten-second intervals for ten minutes, 200 groups each.
    fn default() -> RollupSettings {
        RollupSettings {
            interval: Duration::from_secs(10),
            keep: 60,
            top: 200,
            max_groups: 20_000,
        }
    }
}

/// What a group of connections added in one interval.
#[derive(Clone, Debug)]
pub struct Aggregate {
    /// The group's addresses, ports and tags (an initiator port at or above
    /// [`EPHEMERAL_MIN`] reads as `EPHEMERAL_MIN`, i.e. `ephemeral`); its
    /// counters are the interval's sums, its times the span of the
    /// interval's changes. `rtt` is unused: see the histograms.
    pub conn: Connection,
    /// Connections that began in the interval (first seen by the rollups).
    pub conns: u64,
    /// RTT samples of those connections, as they were when first seen.
    pub rtt_dst: Option<Box<Histogram<u64>>>,
    pub rtt_dst_max: u64,
    pub rtt_src: Option<Box<Histogram<u64>>>,
    pub rtt_src_max: u64,
}

impl Aggregate {
    pub fn empty(conn: Connection) -> Aggregate {
        Aggregate {
            conn,
            conns: 0,
            rtt_dst: None,
            rtt_dst_max: 0,
            rtt_src: None,
            rtt_src_max: 0,
        }
    }

    /// The aggregate of what folded groups added: no addresses or tags.
    pub fn folded() -> Aggregate {
        let unspecified = IpAddr::from([0u8; 4]);
        Aggregate::empty(Connection {
            // Never shown: the folded groups are the `other` row, which
            // has no group keys.
            proto: Proto::Tcp,
            src: unspecified,
            sport: 0,
            dst: unspecified,
            dport: 0,
            iface: 0,
            first_seen: u64::MAX,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Tags::default(),
            dst_tags: Tags::default(),
        })
    }

    pub fn add(&mut self, sent: &DirStats, received: &DirStats, first: u64, last: u64) {
        self.conn.sent.add(sent);
        self.conn.received.add(received);
        self.conn.first_seen = self.conn.first_seen.min(first);
        self.conn.last_seen = self.conn.last_seen.max(last);
    }

    /// A connection first seen in this interval.
    fn begin(&mut self, c: &Connection) {
        self.conns += 1;
        if let Some(r) = c.rtt.get() {
            let h = self
                .rtt_dst
                .get_or_insert_with(|| Box::new(new_histogram()));
            r.dst.merge_into(h, &mut self.rtt_dst_max);
            let h = self
                .rtt_src
                .get_or_insert_with(|| Box::new(new_histogram()));
            r.src.merge_into(h, &mut self.rtt_src_max);
        }
    }

    pub fn merge(&mut self, o: &Aggregate) {
        let c = &o.conn;
        self.add(&c.sent, &c.received, c.first_seen, c.last_seen);
        self.conns += o.conns;
        for (mine, max, theirs, their_max) in [
            (
                &mut self.rtt_dst,
                &mut self.rtt_dst_max,
                &o.rtt_dst,
                o.rtt_dst_max,
            ),
            (
                &mut self.rtt_src,
                &mut self.rtt_src_max,
                &o.rtt_src,
                o.rtt_src_max,
            ),
        ] {
            if let Some(t) = theirs {
                // Auto-resizing: adding cannot run out of range.
                let _ = mine
                    .get_or_insert_with(|| Box::new(new_histogram()))
                    .add(&**t);
                *max = (*max).max(their_max);
            }
        }
    }

    pub fn bytes(&self) -> u64 {
        self.conn.sent.bytes + self.conn.received.bytes
    }
}

/// One closed (or, in a query, the open) interval.
#[derive(Clone, Debug)]
pub struct Interval {
    /// Unix nanoseconds, `[start, end)`.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The kept groups, most bytes first.
    pub rows: Vec<Aggregate>,
    /// What the folded groups added, if any were folded.
    pub folded: Option<Aggregate>,
}

/// What the rollups hold and what their bounds folded or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollupStats {
    /// Closed intervals in the ring.
    pub intervals: usize,
    /// Groups kept in the ring and the open interval.
    pub groups: usize,
    /// Connection records of the last reading, which the next one's
    /// changes are taken against.
    pub tracked: usize,
    /// Groups folded so far (by `top` at a close, by `max_groups` while open).
    pub folded_groups: u64,
    /// Intervals dropped from the ring's far end.
    pub dropped_intervals: u64,
}

/// The initiator's port as a group keeps it: ephemeral ones as one.
fn group_port(sport: u16) -> u16 {
    sport.min(EPHEMERAL_MIN)
}

/// A hash of a connection's group (see the module doc), made without
/// copying its tags: groups are found by it, then compared with
/// [`same_group`].
fn group_hash(c: &Connection) -> u64 {
    let mut h = FxHasher::default();
    (c.proto, c.src, group_port(c.sport), c.dst, c.dport, c.iface).hash(&mut h);
    group_tags(&c.src_tags, true).for_each(|t| t.hash(&mut h));
    0xffu8.hash(&mut h);
    group_tags(&c.dst_tags, false).for_each(|t| t.hash(&mut h));
    h.finish()
}

/// Whether `c` belongs to the group `rep` stands for.
fn same_group(rep: &Connection, c: &Connection) -> bool {
    (rep.proto, rep.src, rep.sport, rep.dst, rep.dport, rep.iface)
        == (c.proto, c.src, group_port(c.sport), c.dst, c.dport, c.iface)
        && group_tags(&c.src_tags, true).eq(&rep.src_tags)
        && group_tags(&c.dst_tags, false).eq(&rep.dst_tags)
}

/// The tags of an end that its group keeps (see the module doc).
fn group_tags(
    tags: &BTreeMap<String, String>,
    initiator: bool,
) -> impl Iterator<Item = (&String, &String)> {
    tags.iter().filter(move |(k, v)| match k.as_str() {
        "socket_cookie" => false,
        "nat.port" if initiator => v.parse::<u16>().is_ok_and(|p| p < EPHEMERAL_MIN),
        _ => true,
    })
}

/// The order groups are cut in when their bytes tie: what they are.
fn group_order(a: &Connection, b: &Connection) -> std::cmp::Ordering {
    (
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
            b.proto,
            b.src,
            b.sport,
            b.dst,
            b.dport,
            b.iface,
            &b.src_tags,
            &b.dst_tags,
        ))
}

/// The interval being filled.
struct Open {
    start_ns: u64,
    /// By [`group_hash`]; more than one group per hash only on collisions.
    groups: FxHashMap<u64, Vec<Aggregate>>,
    /// Groups in `groups`.
    len: usize,
    folded: Option<Aggregate>,
    folded_groups: u64,
}

impl Open {
    fn new(start_ns: u64) -> Open {
        Open {
            start_ns,
            groups: FxHashMap::default(),
            len: 0,
            folded: None,
            folded_groups: 0,
        }
    }
}

/// The ring of interval rollups and the open interval.
pub struct Rollups {
    s: RollupSettings,
    /// The last reading's connections (shared with the agent's snapshot):
    /// the next one's changes are taken against them.
    before: Last,
    open: Option<Open>,
    ring: VecDeque<Arc<Interval>>,
    /// The latest reading's time: what `--last` counts back from.
    now_ns: u64,
    stats: RollupStats,
}

impl Rollups {
    pub fn new(s: RollupSettings) -> Rollups {
        Rollups {
            s,
            before: Last::default(),
            open: None,
            ring: VecDeque::new(),
            now_ns: 0,
            stats: RollupStats::default(),
        }
    }

    pub fn settings(&self) -> RollupSettings {
        self.s
    }

    fn interval_ns(&self) -> u64 {
        (self.s.interval.as_nanos() as u64).max(1)
    }

    /// One reading at `now_ns`: what every connection added since the last
    /// one goes to the open interval (closing it first if `now_ns` is past
    /// its end). `retired` are records the source lists for the last time.
    /// `conns` are kept until the next reading.
    pub fn update(
        &mut self,
        now_ns: u64,
        conns: impl Into<Arc<Vec<Connection>>>,
        retired: &[Connection],
    ) {
        let conns = conns.into();
        let len = self.interval_ns();
        self.now_ns = self.now_ns.max(now_ns);
        let aligned = now_ns - now_ns % len;
        match &self.open {
            Some(o) if now_ns < o.start_ns + len => {}
            Some(_) => {
                let o = self.open.take().expect("checked");
                self.close(o, len);
                self.open = Some(Open::new(aligned));
            }
            None => self.open = Some(Open::new(aligned)),
        }
        let changes = crate::delta::since(&mut self.before, conns.iter().chain(retired));
        let max_groups = self.s.max_groups;
        let open = self.open.as_mut().expect("opened above");
        for ch in &changes {
            let c = ch.conn;
            let list = open.groups.entry(group_hash(c)).or_default();
            let agg = match list.iter().position(|a| same_group(&a.conn, c)) {
                Some(i) => &mut list[i],
                None if open.len < max_groups => {
                    let mut rep = c.clone();
                    rep.sport = group_port(c.sport);
                    rep.src_tags = group_tags(&c.src_tags, true)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    rep.dst_tags = group_tags(&c.dst_tags, false)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    rep.sent = DirStats::default();
                    rep.received = DirStats::default();
                    rep.first_seen = u64::MAX;
                    rep.last_seen = 0;
                    rep.rtt = Default::default();
                    open.len += 1;
                    list.push(Aggregate::empty(rep));
                    list.last_mut().expect("pushed")
                }
                None => {
                    open.folded_groups += 1;
                    open.folded.get_or_insert_with(Aggregate::folded)
                }
            };
            agg.add(&ch.sent, &ch.received, c.first_seen, c.last_seen);
            if ch.is_new() {
                agg.begin(c);
            }
        }
        drop(changes);
        self.stats.tracked = conns.len();
        self.before = Last::new(conns);
        self.stats.groups = self.ring.iter().map(|i| i.rows.len()).sum::<usize>()
            + self.open.as_ref().map_or(0, |o| o.len);
    }

    /// Closes `o`: its top groups by bytes are kept, the rest folded.
    fn close(&mut self, o: Open, len: u64) {
        let interval = Rollups::cut(o, len, self.s.top, &mut self.stats.folded_groups);
        self.ring.push_back(Arc::new(interval));
        while self.ring.len() > self.s.keep {
            self.ring.pop_front();
            self.stats.dropped_intervals += 1;
        }
        self.stats.intervals = self.ring.len();
    }

    fn cut(o: Open, len: u64, top: usize, folded_groups: &mut u64) -> Interval {
        let mut rows: Vec<Aggregate> = o.groups.into_values().flatten().collect();
        // Most bytes first; ties by what the group is, so the cut is
        // deterministic.
        rows.sort_by(|a, b| {
            b.bytes()
                .cmp(&a.bytes())
                .then_with(|| group_order(&a.conn, &b.conn))
        });
        let mut folded = o.folded;
        *folded_groups += o.folded_groups;
        if rows.len() > top {
            for r in rows.split_off(top) {
                *folded_groups += 1;
                folded.get_or_insert_with(Aggregate::folded).merge(&r);
            }
        }
        Interval {
            start_ns: o.start_ns,
            end_ns: o.start_ns + len,
            rows,
            folded,
        }
    }

    pub fn stats(&self) -> RollupStats {
        self.stats
    }

    /// Closes the open interval now, whatever its age (the end of a run or
    /// of a replay): its changes are in the ring afterwards.
    pub fn close_open(&mut self) {
        if let Some(o) = self.open.take() {
            let len = self.interval_ns();
            self.close(o, len);
        }
    }

    /// The closed intervals that start after `start_ns`, oldest first:
    /// what a consumer that took everything up to `start_ns` has not seen.
    pub fn closed_after(&self, start_ns: Option<u64>) -> Vec<Arc<Interval>> {
        self.ring
            .iter()
            .filter(|i| start_ns.is_none_or(|s| i.start_ns > s))
            .cloned()
            .collect()
    }

    /// The latest reading's time.
    pub fn now_ns(&self) -> u64 {
        self.now_ns
    }

    /// The intervals that overlap the last `last` before the latest
    /// reading, oldest first, the open one included (cut like a closed
    /// one, `top` alone being no bound on a query), and the range they
    /// cover: from the start of the oldest to the latest reading.
    pub fn view(&self, last: Duration) -> (Vec<Arc<Interval>>, (u64, u64)) {
        let from = self.now_ns.saturating_sub(last.as_nanos() as u64);
        let mut out: Vec<Arc<Interval>> = self
            .ring
            .iter()
            .filter(|i| i.end_ns > from)
            .cloned()
            .collect();
        if let Some(o) = &self.open {
            let copy = Open {
                start_ns: o.start_ns,
                groups: o.groups.clone(),
                len: o.len,
                folded: o.folded.clone(),
                folded_groups: 0,
            };
            let mut ignored = 0;
            out.push(Arc::new(Rollups::cut(
                copy,
                self.interval_ns(),
                usize::MAX,
                &mut ignored,
            )));
        }
        let start = out.first().map_or(from, |i| i.start_ns.max(from));
        (out, (start, self.now_ns.max(start)))
    }

    /// Runs `spec` over the last `last` (see [`QuerySpec::run_rollups`]).
    pub fn query(&self, spec: &QuerySpec, last: Duration) -> QueryResult {
        let (intervals, range) = self.view(last);
        spec.run_rollups(&intervals, range)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::{QueryArgs, QuerySpec};

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_700_000_000 * S;

    fn conn(sport: u16, dport: u16, service: &str, sent: u64) -> Connection {
        Connection {
            proto: crate::Proto::Tcp,
            src: IpAddr::from([10, 0, 0, 1]),
            sport,
            dst: IpAddr::from([10, 0, 0, 2]),
            dport,
            iface: 2,
            first_seen: T0 + u64::from(sport) * 1000,
            last_seen: T0 + S,
            sent: DirStats::counts(1, sent, 0),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: [("service".to_owned(), service.to_owned())].into(),
        }
    }

    fn query(r: &Rollups, dst: &str, last: u64) -> Vec<(Vec<Option<String>>, u64, u64, bool)> {
        let spec = QuerySpec::parse(&QueryArgs {
            src: Some(String::new()),
            dst: Some(dst.to_owned()),
            ..QueryArgs::default()
        })
        .unwrap();
        r.query(&spec, Duration::from_secs(last))
            .rows
            .iter()
            .map(|row| (row.dst.clone(), row.sent.bytes, row.conns, row.other))
            .collect()
    }

    #[test]
    fn deltas_land_in_the_interval_of_their_reading_and_sum_to_totals() {
        let mut r = Rollups::new(RollupSettings::default());
        // Two clients of `db`, one of `web`; read at 1 s, 5 s, 12 s.
        r.update(
            T0 + S,
            vec![conn(40000, 5432, "db", 100), conn(40001, 80, "web", 10)],
            &[],
        );
        r.update(
            T0 + 5 * S,
            vec![conn(40000, 5432, "db", 300), conn(40001, 80, "web", 10)],
            &[],
        );
        r.update(
            T0 + 12 * S,
            vec![conn(40000, 5432, "db", 350), conn(40002, 5432, "db", 7)],
            &[conn(40001, 80, "web", 15)],
        );
        assert_eq!(r.stats().intervals, 1);
        // The retired record is forgotten; the others are remembered.
        assert_eq!(r.stats().tracked, 2);
        let db = || vec![Some("db".to_owned())];
        let web = || vec![Some("web".to_owned())];
        // Everything: totals.
        assert_eq!(
            query(&r, "service", 60),
            [(db(), 357, 2, false), (web(), 15, 1, false)]
        );
        // The last 2 s: only the open interval (from 10 s): 50 + 7 and 5.
        assert_eq!(
            query(&r, "service", 2),
            [(db(), 57, 1, false), (web(), 5, 0, false)]
        );
        let (_, range) = r.view(Duration::from_secs(2));
        assert_eq!(range, (T0 + 10 * S, T0 + 12 * S));
    }

    #[test]
    fn bounds_fold_and_drop_and_say_so() {
        let mut r = Rollups::new(RollupSettings {
            interval: Duration::from_secs(1),
            keep: 2,
            top: 1,
            max_groups: 2,
        });
        // Three groups in the first interval: the third is folded at once
        // (max_groups), the second at the close (top).
        r.update(
            T0,
            vec![
                conn(40000, 1, "a", 300),
                conn(40001, 2, "b", 200),
                conn(40002, 3, "c", 100),
            ],
            &[],
        );
        r.update(T0 + S, vec![], &[]);
        let rows = query(&r, "service", 10);
        assert_eq!(rows[0], (vec![Some("a".to_owned())], 300, 1, false));
        // The folded groups are the `other` row: nothing lost.
        assert_eq!(rows[1], (vec![None], 300, 2, true));
        assert_eq!(r.stats().folded_groups, 2);
        // A filter cannot see into folded groups: they are left out.
        let spec = QuerySpec::parse(&QueryArgs {
            dst: Some("service".to_owned()),
            wheres: vec!["dst.service = b".to_owned()],
            ..QueryArgs::default()
        })
        .unwrap();
        assert!(r.query(&spec, Duration::from_secs(10)).rows.is_empty());
        for t in 2..6 {
            r.update(T0 + t * S, vec![], &[]);
        }
        assert_eq!(r.stats().intervals, 2);
        assert_eq!(r.stats().dropped_intervals, 3);
    }

    /// Connections that differ only in what names one of them (the
    /// initiator's port, its translated port, the socket cookie) are one
    /// group; the responder's translated port is kept.
    #[test]
    fn what_names_one_connection_does_not_split_groups() {
        let mut r = Rollups::new(RollupSettings::default());
        let with = |sport: u16, cookie: &str, nat_port: &str| {
            let mut c = conn(sport, 5432, "db", 10);
            c.src_tags = [
                ("socket_cookie".to_owned(), cookie.to_owned()),
                ("nat.port".to_owned(), nat_port.to_owned()),
                ("service".to_owned(), "web".to_owned()),
            ]
            .into();
            c.dst_tags
                .insert("socket_cookie".to_owned(), format!("9{cookie}"));
            c.dst_tags.insert("nat.port".to_owned(), "5001".to_owned());
            c
        };
        r.update(
            T0 + S,
            vec![
                with(40000, "1", "61000"),
                with(40001, "2", "61001"),
                with(40002, "3", "61002"),
            ],
            &[],
        );
        assert_eq!(r.stats().groups, 1);
        let spec = QuerySpec::parse(&QueryArgs {
            src: Some("service".to_owned()),
            dst: Some("nat.port".to_owned()),
            ..QueryArgs::default()
        })
        .unwrap();
        let rows = r.query(&spec, Duration::from_secs(60)).rows;
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].conns, rows[0].sent.bytes), (3, 30));
        assert_eq!(rows[0].dst, vec![Some("5001".to_owned())]);
    }
}
