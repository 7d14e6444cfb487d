//! The query engine: group connections by tags of their two ends, filter,
//! sum, sort and cut, over a time window.
//!
//! CLI-agnostic: a [`QuerySpec`] is parsed from the strings a user typed
//! ([`QueryArgs`]), so `flowprobe replay` and a later query of the live
//! agent share it. What every number means is in the README ("Queries"):
//!
//! - a row sums whole connections: the counters are per connection, so a
//!   connection that overlaps the window is counted entirely;
//! - `seconds` is the window's length (its overlap with the capture) when
//!   a window is given, else the span from the first packet to the last of
//!   the row's connections; `bandwidth = (sent.bytes + received.bytes) /
//!   seconds`, none when `seconds` is 0;
//! - `--top N` keeps N rows and sums the rest into one `other` row, so the
//!   rows always add up to the total of the selected connections.

mod filter;
mod metric;
mod tag;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

pub use filter::{glob, Filter, FilterError};
pub use metric::{Metric, MetricError, Sort};
pub use tag::{parse_keys, value, IpNet, Side, TagError, TagKey, EPHEMERAL, EPHEMERAL_MIN};

use crate::conn::{rfc3339, Connection, DirStats};
use crate::rollup::{Aggregate, Interval};
use crate::rtt::{new_histogram, Percentiles};

/// A time window relative to the first packet (seconds as `START..END`,
/// either side may be left out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    pub start_ns: Option<u64>,
    pub end_ns: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--window {given:?}: {message}")]
pub struct WindowError {
    pub given: String,
    pub message: &'static str,
}

impl FromStr for Window {
    type Err = WindowError;

    fn from_str(s: &str) -> Result<Window, WindowError> {
        let fail = |message| WindowError {
            given: s.to_owned(),
            message,
        };
        let (a, b) = s.split_once("..").ok_or_else(|| {
            fail("expected START..END in seconds from the first packet (e.g. 1.5..3, 2.., ..10)")
        })?;
        let secs = |x: &str| -> Result<Option<u64>, WindowError> {
            let x = x.trim();
            if x.is_empty() {
                return Ok(None);
            }
            match x.parse::<f64>() {
                Ok(v) if (0.0..1e9).contains(&v) => Ok(Some((v * 1e9).round() as u64)),
                _ => Err(fail("START and END are non-negative numbers of seconds")),
            }
        };
        let w = Window {
            start_ns: secs(a)?,
            end_ns: secs(b)?,
        };
        if let (Some(a), Some(b)) = (w.start_ns, w.end_ns) {
            if b <= a {
                return Err(fail("END must be after START"));
            }
        }
        Ok(w)
    }
}

/// The strings of a query, as typed.
#[derive(Clone, Debug, Default)]
pub struct QueryArgs {
    /// Comma-separated tag keys of the initiator's end.
    pub src: Option<String>,
    /// Comma-separated tag keys of the responder's end.
    pub dst: Option<String>,
    /// Filter expressions, all of which must hold.
    pub wheres: Vec<String>,
    pub sort: Option<String>,
    pub top: Option<usize>,
    pub window: Option<String>,
    /// A range back from now (`5m`, `30s`), answered from the rollups.
    pub last: Option<String>,
    /// Do not collapse the initiator's ports into `ephemeral`.
    pub raw_ports: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("--{side}: {err}")]
    Tag { side: &'static str, err: TagError },
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error(transparent)]
    Sort(#[from] MetricError),
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("--top must be at least 1")]
    TopZero,
    #[error("--last {given:?}: {message}")]
    Last { given: String, message: String },
}

/// A parsed query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuerySpec {
    pub src: Vec<TagKey>,
    pub dst: Vec<TagKey>,
    pub filter: Filter,
    pub sort: Sort,
    pub top: Option<usize>,
    /// `None`: no window; `..` is the whole capture.
    pub window: Option<Window>,
    /// `--last`: the range back from the latest reading, over the rollups.
    pub last: Option<Duration>,
    pub raw_ports: bool,
}

impl Default for QuerySpec {
    /// The seed's default: `service` → `service`, by bytes.
    fn default() -> QuerySpec {
        let service = || vec![TagKey::Custom("service".to_owned())];
        QuerySpec {
            src: service(),
            dst: service(),
            filter: Filter::default(),
            sort: Sort::default(),
            top: None,
            window: None,
            last: None,
            raw_ports: false,
        }
    }
}

impl QuerySpec {
    /// Neither side given: `service` → `service`. One side given: the
    /// other groups by nothing (all its ends are one group).
    pub fn parse(a: &QueryArgs) -> Result<QuerySpec, QueryError> {
        let keys = |s: &Option<String>, side| -> Result<Vec<TagKey>, QueryError> {
            parse_keys(s.as_deref().unwrap_or("")).map_err(|err| QueryError::Tag { side, err })
        };
        let mut q = QuerySpec::default();
        if a.src.is_some() || a.dst.is_some() {
            q.src = keys(&a.src, "src")?;
            q.dst = keys(&a.dst, "dst")?;
        }
        q.filter = Filter::parse_all(&a.wheres)?;
        if let Some(s) = &a.sort {
            q.sort = s.parse()?;
        }
        q.top = match a.top {
            Some(0) => return Err(QueryError::TopZero),
            t => t,
        };
        if let Some(w) = &a.window {
            q.window = Some(w.parse()?);
        }
        q.raw_ports = a.raw_ports;
        if let Some(l) = &a.last {
            let fail = |message: &str| QueryError::Last {
                given: l.clone(),
                message: message.to_owned(),
            };
            let d = humantime::parse_duration(l.trim())
                .map_err(|e| fail(&format!("{e} (e.g. 30s, 5m, 1h)")))?;
            if d.is_zero() {
                return Err(fail("must be more than 0"));
            }
            if q.window.is_some() {
                return Err(fail(
                    "--window counts from the first packet, --last back from now: give one",
                ));
            }
            if q.raw_ports {
                return Err(fail("the rollups behind --last keep no initiator ports above 1023; leave out --raw-ports"));
            }
            q.last = Some(d);
        }
        Ok(q)
    }

    /// Runs the query over `conns`. Window offsets count from `origin_ns`
    /// (for a capture: its first packet, [`origin`]); the window ends at
    /// the last packet at the latest.
    pub fn run(&self, conns: &[Connection], origin_ns: u64) -> QueryResult {
        let last = conns.iter().map(|c| c.last_seen).max().unwrap_or(origin_ns);
        let window = self.window.map(|w| {
            let start = origin_ns.saturating_add(w.start_ns.unwrap_or(0));
            let end = w
                .end_ns
                .map_or(last, |e| origin_ns.saturating_add(e).min(last));
            (start, end.max(start))
        });
        let items = conns
            .iter()
            .filter(|c| window.is_none_or(|(ws, we)| c.first_seen <= we && c.last_seen >= ws))
            .map(Item::Conn);
        self.group(items, window)
    }

    /// Runs the query over interval rollups that cover `range` (Unix
    /// nanoseconds): rows sum what their groups added in those intervals,
    /// `seconds` is the range's length. What the rollups folded has no
    /// tags: it goes to the `other` row when the query has no filter, and
    /// is left out when it has one (a filter cannot see into it).
    pub fn run_rollups(&self, intervals: &[Arc<Interval>], range: (u64, u64)) -> QueryResult {
        let rows = intervals.iter().flat_map(|i| i.rows.iter().map(Item::Agg));
        let mut result = self.group(rows, Some(range));
        if self.filter == Filter::default() {
            let folded: Vec<&Aggregate> =
                intervals.iter().filter_map(|i| i.folded.as_ref()).collect();
            if !folded.is_empty() {
                if result.rows.last().is_none_or(|r| !r.other) {
                    let mut other =
                        Row::new(vec![None; self.src.len()], vec![None; self.dst.len()]);
                    other.other = true;
                    result.rows.push(other);
                }
                let other = result.rows.last_mut().expect("pushed above");
                for a in folded {
                    other.add(Item::Agg(a));
                }
                other.finish(Some(range));
            }
        }
        result
    }

    /// Groups, sorts and cuts `items`; `window` is the span bandwidth is
    /// over (when `None`, each row's own).
    fn group<'a>(
        &self,
        items: impl Iterator<Item = Item<'a>>,
        window: Option<(u64, u64)>,
    ) -> QueryResult {
        let mut groups: BTreeMap<(TagValues, TagValues), Row> = BTreeMap::new();
        for it in items {
            let c = it.conn();
            if !self.filter.matches(c) {
                continue;
            }
            let collapse = !self.raw_ports;
            let src: Vec<_> = self
                .src
                .iter()
                .map(|k| value(c, Side::Src, k, collapse))
                .collect();
            let dst: Vec<_> = self
                .dst
                .iter()
                .map(|k| value(c, Side::Dst, k, collapse))
                .collect();
            groups
                .entry((src.clone(), dst.clone()))
                .or_insert_with(|| Row::new(src, dst))
                .add(it);
        }

        let sort = self.sort;
        // Each key once: RTT percentiles walk a histogram.
        let mut keyed: Vec<(Option<f64>, Row)> = groups
            .into_values()
            .map(|mut r| {
                r.finish(window);
                (r.metric(sort.metric), r)
            })
            .collect();
        keyed.sort_by(|(ka, a), (kb, b)| {
            cmp_metric(*ka, *kb, sort.descending)
                .then_with(|| (&a.src, &a.dst).cmp(&(&b.src, &b.dst)))
        });
        let mut rows: Vec<Row> = keyed.into_iter().map(|(_, r)| r).collect();
        if let Some(n) = self.top {
            if rows.len() > n {
                let rest = rows.split_off(n);
                let mut other = Row::new(vec![None; self.src.len()], vec![None; self.dst.len()]);
                other.other = true;
                for r in &rest {
                    other.merge(r);
                }
                other.finish(window);
                rows.push(other);
            }
        }
        QueryResult {
            src_keys: self.src.clone(),
            dst_keys: self.dst.clone(),
            window,
            rows,
        }
    }
}

/// What a row sums: connections, or groups of them from the rollups.
#[derive(Clone, Copy)]
enum Item<'a> {
    Conn(&'a Connection),
    Agg(&'a Aggregate),
}

impl<'a> Item<'a> {
    /// The addresses, ports and tags grouping and filters look at.
    fn conn(self) -> &'a Connection {
        match self {
            Item::Conn(c) => c,
            Item::Agg(a) => &a.conn,
        }
    }
}

/// One end's values of the query's keys, in their order.
type TagValues = Vec<Option<String>>;

/// Where window offsets of a capture count from: its first packet.
pub fn origin(conns: &[Connection]) -> u64 {
    conns.iter().map(|c| c.first_seen).min().unwrap_or(0)
}

/// Rows without a value (no RTT sample, no bandwidth) go last either way.
fn cmp_metric(a: Option<f64>, b: Option<f64>, descending: bool) -> Ordering {
    match (a, b) {
        (Some(x), Some(y)) => {
            let o = x.total_cmp(&y);
            if descending {
                o.reverse()
            } else {
                o
            }
        }
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The answer: rows in order, the `other` row (if any) last.
#[derive(Clone, Debug)]
pub struct QueryResult {
    pub src_keys: Vec<TagKey>,
    pub dst_keys: Vec<TagKey>,
    /// The resolved window, Unix nanoseconds, when one was asked for.
    pub window: Option<(u64, u64)>,
    pub rows: Vec<Row>,
}

impl QueryResult {
    /// Adds the rows of `o`, a result of the same query, row by row (by
    /// their tag values); a row of `o` without a match is added after the
    /// others. For sums that outlive the connections they were made of
    /// (the metrics of connections no longer listed). Bandwidth spans are
    /// each row's own afterwards.
    pub fn absorb(&mut self, o: &QueryResult) {
        type RowKey<'a> = (&'a [Option<String>], &'a [Option<String>], bool);
        let mut at: BTreeMap<RowKey<'_>, usize> = BTreeMap::new();
        for (i, r) in self.rows.iter().enumerate() {
            at.insert((&r.src, &r.dst, r.other), i);
        }
        let mut merges = Vec::new();
        let mut new = Vec::new();
        for r in &o.rows {
            match at.get(&(&r.src[..], &r.dst[..], r.other)) {
                Some(&i) => merges.push((i, r)),
                None => new.push(r.clone()),
            }
        }
        for (i, r) in merges {
            self.rows[i].merge(r);
        }
        self.rows.extend(new);
        for r in &mut self.rows {
            r.finish(None);
        }
    }

    /// Keeps at most `n` rows besides `other`: the rest (the latest added)
    /// are summed into the `other` row. Returns how many rows it folded.
    pub fn cap(&mut self, n: usize) -> usize {
        let other_at = self.rows.iter().position(|r| r.other);
        let mut other = match other_at {
            Some(i) => self.rows.remove(i),
            None => {
                let mut o = Row::new(
                    vec![None; self.src_keys.len()],
                    vec![None; self.dst_keys.len()],
                );
                o.other = true;
                o
            }
        };
        let folded = self.rows.len().saturating_sub(n);
        for r in self.rows.drain(n.min(self.rows.len())..) {
            other.merge(&r);
        }
        if other_at.is_some() || folded > 0 {
            other.finish(None);
            self.rows.push(other);
        }
        folded
    }
}

/// A [`Row`] as saved by a run that keeps its state for the next one
/// (the sums of retired connections behind `/metrics`, docs/restart.md);
/// the RTT histograms as (value, count) pairs of their buckets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SavedRow {
    pub src: Vec<Option<String>>,
    pub dst: Vec<Option<String>>,
    pub other: bool,
    pub conns: u64,
    pub sent: DirStats,
    pub received: DirStats,
    pub first_seen: u64,
    pub last_seen: u64,
    pub span_ns: u64,
    pub rtt_dst: Vec<(u64, u64)>,
    pub rtt_dst_max: u64,
    pub rtt_src: Vec<(u64, u64)>,
    pub rtt_src_max: u64,
}

fn buckets(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn histogram(b: &[(u64, u64)]) -> Histogram<u64> {
    let mut h = new_histogram();
    for &(v, n) in b {
        // Auto-resizing: cannot run out of range.
        let _ = h.record_n(v, n);
    }
    h
}

impl QueryResult {
    /// Its rows, to save.
    pub fn saved_rows(&self) -> Vec<SavedRow> {
        self.rows
            .iter()
            .map(|r| SavedRow {
                src: r.src.clone(),
                dst: r.dst.clone(),
                other: r.other,
                conns: r.conns,
                sent: r.sent.clone(),
                received: r.received.clone(),
                first_seen: r.first_seen,
                last_seen: r.last_seen,
                span_ns: r.span_ns,
                rtt_dst: buckets(&r.rtt_dst),
                rtt_dst_max: r.rtt_dst_max,
                rtt_src: buckets(&r.rtt_src),
                rtt_src_max: r.rtt_src_max,
            })
            .collect()
    }

    /// Adds saved rows of the same query (see [`QueryResult::absorb`]);
    /// rows whose key count differs from this query's are skipped.
    pub fn restore_rows(&mut self, rows: &[SavedRow]) {
        let (ns, nd) = (self.src_keys.len(), self.dst_keys.len());
        let o = QueryResult {
            src_keys: self.src_keys.clone(),
            dst_keys: self.dst_keys.clone(),
            window: None,
            rows: rows
                .iter()
                .filter(|r| r.src.len() == ns && r.dst.len() == nd)
                .map(|r| Row {
                    src: r.src.clone(),
                    dst: r.dst.clone(),
                    other: r.other,
                    conns: r.conns,
                    sent: r.sent.clone(),
                    received: r.received.clone(),
                    first_seen: r.first_seen,
                    last_seen: r.last_seen,
                    span_ns: r.span_ns,
                    rtt_dst: histogram(&r.rtt_dst),
                    rtt_dst_max: r.rtt_dst_max,
                    rtt_src: histogram(&r.rtt_src),
                    rtt_src_max: r.rtt_src_max,
                })
                .collect(),
        };
        self.absorb(&o);
    }
}

/// One group: sums over its connections.
#[derive(Clone, Debug)]
pub struct Row {
    /// Values of the `src` keys, in their order; `None` = the end lacks it
    /// (or, in the `other` row, many values).
    pub src: Vec<Option<String>>,
    pub dst: Vec<Option<String>>,
    /// The `--top` remainder.
    pub other: bool,
    pub conns: u64,
    pub sent: DirStats,
    pub received: DirStats,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Bandwidth's denominator, nanoseconds (see the module doc).
    pub span_ns: u64,
    pub rtt_dst: Histogram<u64>,
    pub rtt_dst_max: u64,
    pub rtt_src: Histogram<u64>,
    pub rtt_src_max: u64,
}

impl Row {
    fn new(src: Vec<Option<String>>, dst: Vec<Option<String>>) -> Row {
        Row {
            src,
            dst,
            other: false,
            conns: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            first_seen: u64::MAX,
            last_seen: 0,
            span_ns: 0,
            rtt_dst: new_histogram(),
            rtt_dst_max: 0,
            rtt_src: new_histogram(),
            rtt_src_max: 0,
        }
    }

    fn add(&mut self, it: Item<'_>) {
        let c = it.conn();
        self.sent.add(&c.sent);
        self.received.add(&c.received);
        self.first_seen = self.first_seen.min(c.first_seen);
        self.last_seen = self.last_seen.max(c.last_seen);
        match it {
            Item::Conn(c) => {
                self.conns += 1;
                if let Some(r) = c.rtt.get() {
                    r.dst.merge_into(&mut self.rtt_dst, &mut self.rtt_dst_max);
                    r.src.merge_into(&mut self.rtt_src, &mut self.rtt_src_max);
                }
            }
            Item::Agg(a) => {
                self.conns += a.conns;
                // Both auto-resize, so adding cannot run out of range.
                if let Some(h) = &a.rtt_dst {
                    let _ = self.rtt_dst.add(&**h);
                    self.rtt_dst_max = self.rtt_dst_max.max(a.rtt_dst_max);
                }
                if let Some(h) = &a.rtt_src {
                    let _ = self.rtt_src.add(&**h);
                    self.rtt_src_max = self.rtt_src_max.max(a.rtt_src_max);
                }
            }
        }
    }

    /// Adds another row's sums (the `other` row; the map's folded edges).
    pub fn merge(&mut self, o: &Row) {
        self.conns += o.conns;
        self.sent.add(&o.sent);
        self.received.add(&o.received);
        self.first_seen = self.first_seen.min(o.first_seen);
        self.last_seen = self.last_seen.max(o.last_seen);
        // Both auto-resize, so adding cannot run out of range.
        let _ = self.rtt_dst.add(&o.rtt_dst);
        let _ = self.rtt_src.add(&o.rtt_src);
        self.rtt_dst_max = self.rtt_dst_max.max(o.rtt_dst_max);
        self.rtt_src_max = self.rtt_src_max.max(o.rtt_src_max);
    }

    /// Sets the bandwidth's span after adding or merging: the window's
    /// length ([`QueryResult::window`]) or the row's own span.
    pub fn finish(&mut self, window: Option<(u64, u64)>) {
        self.span_ns = match window {
            Some((s, e)) => e - s,
            None => self.last_seen.saturating_sub(self.first_seen),
        };
    }

    pub fn bytes(&self) -> u64 {
        self.sent.bytes + self.received.bytes
    }

    pub fn seconds(&self) -> f64 {
        self.span_ns as f64 / 1e9
    }

    /// Bytes per second over [`Row::seconds`]; none over an empty span.
    pub fn bandwidth(&self) -> Option<f64> {
        self.rate(self.bytes())
    }

    /// `bytes` per second over [`Row::seconds`] (a direction's rate).
    pub fn rate(&self, bytes: u64) -> Option<f64> {
        (self.span_ns > 0).then(|| bytes as f64 * 1e9 / self.span_ns as f64)
    }

    /// Retransmitted bytes over bytes (both directions), in percent: the
    /// share of what was sent that was sent again; none without bytes.
    pub fn retransmit_pct(&self) -> Option<f64> {
        let retx = self.sent.retransmitted_bytes() + self.received.retransmitted_bytes();
        (self.bytes() > 0).then(|| 100.0 * retx as f64 / self.bytes() as f64)
    }

    pub fn rtt_dst(&self) -> Percentiles {
        Percentiles::of(Some(&self.rtt_dst), self.rtt_dst_max)
    }

    pub fn rtt_src(&self) -> Percentiles {
        Percentiles::of(Some(&self.rtt_src), self.rtt_src_max)
    }

    pub fn metric(&self, m: Metric) -> Option<f64> {
        let rtt = || self.rtt_dst();
        let n = |v: u64| Some(v as f64);
        match m {
            Metric::Bytes => n(self.bytes()),
            Metric::SentBytes => n(self.sent.bytes),
            Metric::ReceivedBytes => n(self.received.bytes),
            Metric::Packets => n(self.sent.packets + self.received.packets),
            Metric::SentPackets => n(self.sent.packets),
            Metric::ReceivedPackets => n(self.received.packets),
            Metric::Retransmits => n(self.sent.retransmits() + self.received.retransmits()),
            Metric::SentRetransmits => n(self.sent.retransmits()),
            Metric::ReceivedRetransmits => n(self.received.retransmits()),
            Metric::RetransmitPct => self.retransmit_pct(),
            Metric::RetransmittedBytes => {
                n(self.sent.retransmitted_bytes() + self.received.retransmitted_bytes())
            }
            Metric::Conns => n(self.conns),
            Metric::Bandwidth => self.bandwidth(),
            Metric::RttP50 => rtt().p50.map(|v| v as f64),
            Metric::RttP90 => rtt().p90.map(|v| v as f64),
            Metric::RttP99 => rtt().p99.map(|v| v as f64),
            Metric::RttMax => rtt().max.map(|v| v as f64),
        }
    }

    /// The row as its JSON object, with the query's key names.
    pub fn json<'a>(&'a self, q: &'a QueryResult) -> RowJson<'a> {
        RowJson { row: self, q }
    }
}

/// Serialises a [`Row`] to the stable JSON row contract (README, "Queries").
pub struct RowJson<'a> {
    row: &'a Row,
    q: &'a QueryResult,
}

struct Tags<'a>(&'a [TagKey], &'a [Option<String>]);

impl Serialize for Tags<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter().zip(self.1) {
            m.serialize_entry(&k.to_string(), v)?;
        }
        m.end()
    }
}

struct Pct(Percentiles);

impl Serialize for Pct {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(5))?;
        m.serialize_entry("samples", &self.0.samples)?;
        m.serialize_entry("p50_us", &self.0.p50)?;
        m.serialize_entry("p90_us", &self.0.p90)?;
        m.serialize_entry("p99_us", &self.0.p99)?;
        m.serialize_entry("max_us", &self.0.max)?;
        m.end()
    }
}

struct Time(u64);

impl Serialize for Time {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        rfc3339(&self.0, s)
    }
}

impl Serialize for RowJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.row;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("src", &Tags(&self.q.src_keys, &r.src))?;
        m.serialize_entry("dst", &Tags(&self.q.dst_keys, &r.dst))?;
        if r.other {
            m.serialize_entry("other", &true)?;
        }
        m.serialize_entry("conns", &r.conns)?;
        m.serialize_entry("sent", &r.sent)?;
        m.serialize_entry("received", &r.received)?;
        m.serialize_entry("first_seen", &Time(r.first_seen))?;
        m.serialize_entry("last_seen", &Time(r.last_seen))?;
        m.serialize_entry("seconds", &r.seconds())?;
        m.serialize_entry("bandwidth_bytes_per_s", &r.bandwidth())?;
        m.serialize_entry("sent_bytes_per_s", &r.rate(r.sent.bytes))?;
        m.serialize_entry("received_bytes_per_s", &r.rate(r.received.bytes))?;
        m.serialize_entry("retransmit_pct", &r.retransmit_pct())?;
        m.serialize_entry("rtt_dst", &Pct(r.rtt_dst()))?;
        m.serialize_entry("rtt_src", &Pct(r.rtt_src()))?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(src: &str, sport: u16, dst: &str, dport: u16, t: (u64, u64), bytes: u64) -> Connection {
        Connection {
            proto: crate::Proto::Tcp,
            src: src.parse().unwrap(),
            sport,
            dst: dst.parse().unwrap(),
            dport,
            iface: 0,
            first_seen: t.0,
            last_seen: t.1,
            sent: DirStats::counts(1, bytes, 0),
            received: DirStats::counts(2, 10, 0).with_loss(crate::Loss {
                retransmits: 1,
                ..Default::default()
            }),
            rtt: Default::default(),
            src_tags: Default::default(),
            dst_tags: Default::default(),
        }
    }

    fn args(src: &str, dst: &str) -> QueryArgs {
        QueryArgs {
            src: Some(src.to_owned()),
            dst: Some(dst.to_owned()),
            ..QueryArgs::default()
        }
    }

    fn sample() -> Vec<Connection> {
        let s = 1_000_000_000;
        let mut v = vec![
            conn("10.0.1.1", 40000, "10.9.0.1", 80, (s, 3 * s), 1000),
            conn("10.0.1.2", 40001, "10.9.0.1", 80, (2 * s, 4 * s), 500),
            conn("10.0.2.1", 53, "10.9.0.2", 53, (5 * s, 5 * s), 70),
            conn("fd00::1", 50000, "fd09::1", 443, (6 * s, 8 * s), 3000),
        ];
        v[0].dst_tags.insert("service".into(), "web".into());
        v[1].dst_tags.insert("service".into(), "web".into());
        v[3].dst_tags.insert("service".into(), "api".into());
        v
    }

    fn vals(v: &[Option<String>]) -> Vec<Option<&str>> {
        v.iter().map(|x| x.as_deref()).collect()
    }

    fn keys(r: &Row) -> (Vec<Option<&str>>, Vec<Option<&str>>) {
        (vals(&r.src), vals(&r.dst))
    }

    #[test]
    fn groups_by_prefix_and_port_collapsing_initiator_ports() {
        let c = sample();
        let q = QuerySpec::parse(&args("ip/24,port", "port")).unwrap();
        let r = q.run(&c, origin(&c));
        let got: Vec<_> = r
            .rows
            .iter()
            .map(|r| (keys(r), r.conns, r.bytes()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    (
                        vec![Some("fd00::/24"), Some("ephemeral")],
                        vec![Some("443")]
                    ),
                    1,
                    3010
                ),
                (
                    (
                        vec![Some("10.0.1.0/24"), Some("ephemeral")],
                        vec![Some("80")]
                    ),
                    2,
                    1520
                ),
                (
                    (vec![Some("10.0.2.0/24"), Some("53")], vec![Some("53")]),
                    1,
                    80
                ),
            ]
        );
        let raw = QuerySpec::parse(&QueryArgs {
            raw_ports: true,
            ..args("port", "")
        })
        .unwrap()
        .run(&c, 0);
        assert_eq!(raw.rows.len(), 4);
    }

    #[test]
    fn missing_tags_group_together() {
        let c = sample();
        let r = QuerySpec::parse(&QueryArgs {
            sort: Some("conns".into()),
            ..args("", "service")
        })
        .unwrap()
        .run(&c, 0);
        let got: Vec<_> = r.rows.iter().map(|r| (keys(r).1, r.conns)).collect();
        assert_eq!(
            got,
            // Ties in order of the keys, unknown first.
            vec![
                (vec![Some("web")], 2),
                (vec![None], 1),
                (vec![Some("api")], 1)
            ]
        );
        let json = serde_json::to_value(r.rows[1].json(&r)).unwrap();
        assert_eq!(json["dst"], serde_json::json!({"service": null}));
        assert_eq!(json["src"], serde_json::json!({}));
    }

    #[test]
    fn top_n_sums_the_rest_into_other() {
        let c = sample();
        let r = QuerySpec::parse(&QueryArgs {
            top: Some(1),
            ..args("ip", "")
        })
        .unwrap()
        .run(&c, 0);
        assert_eq!(r.rows.len(), 2);
        let other = &r.rows[1];
        assert!(other.other);
        assert_eq!(
            (other.conns, other.bytes(), other.received.retransmits()),
            (3, 1600, 3)
        );
        let json = serde_json::to_value(other.json(&r)).unwrap();
        assert_eq!(json["other"], true);
        assert_eq!(json["src"]["ip"], serde_json::Value::Null);
    }

    #[test]
    fn window_overlap_whole_connections_and_bandwidth() {
        let c = sample();
        let s = 1_000_000_000;
        let run = |w: &str| {
            QuerySpec::parse(&QueryArgs {
                window: Some(w.into()),
                ..args("", "")
            })
            .unwrap()
            .run(&c, origin(&c))
        };
        // 2.5 s .. 4 s after the first packet (at 1 s): 3.5 s .. 5 s.
        let r = run("2.5..4");
        assert_eq!(r.window, Some((3 * s + s / 2, 5 * s)));
        let row = &r.rows[0];
        assert_eq!((row.conns, row.bytes()), (2, 500 + 10 + 70 + 10));
        assert_eq!(row.bandwidth(), Some(590.0 / 1.5));
        // The window ends at the last packet (8 s).
        let r = run("6..");
        assert_eq!(r.window, Some((7 * s, 8 * s)));
        assert_eq!(r.rows[0].bandwidth(), Some(3010.0));
        // `..` is the whole capture, 1 s .. 8 s.
        let r = run("..");
        assert_eq!(r.window, Some((s, 8 * s)));
        assert_eq!(r.rows[0].bandwidth(), Some(4610.0 / 7.0));
        // Without a window: the rows' own span.
        let r = QuerySpec::parse(&args("", "")).unwrap().run(&c, 0);
        assert_eq!(r.rows[0].span_ns, 7 * s);
        assert_eq!(r.rows[0].bandwidth(), Some(4610.0 / 7.0));
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = |a: QueryArgs| QuerySpec::parse(&a).unwrap_err().to_string();
        assert_eq!(
            e(args("ip/33x", "")),
            "--src: tag key `ip/33x`: the prefix length must be 0 to 128 (as in ip/24)"
        );
        assert_eq!(
            e(QueryArgs {
                window: Some("3..1".into()),
                ..QueryArgs::default()
            }),
            "--window \"3..1\": END must be after START"
        );
        assert_eq!(
            e(QueryArgs {
                top: Some(0),
                ..QueryArgs::default()
            }),
            "--top must be at least 1"
        );
        assert!("5".parse::<Window>().is_err());
        assert!("-1..".parse::<Window>().is_err());
        // Defaults: service -> service, by bytes.
        let d = QuerySpec::parse(&QueryArgs::default()).unwrap();
        assert_eq!(d, QuerySpec::default());
    }
}
