//! `/metrics`: the Prometheus exposition of a snapshot.
//!
//! The per-group series come from running the query engine over the
//! snapshot's connections with the configured label keys as its group-by,
//! so a PromQL sum equals `flowprobe query` by construction. The snapshot
//! keeps connections that left the kernel map (`live::drain`), so each
//! group's sums only grow: the counters are monotonic across drains.
//!
//! A fresh registry is built for every scrape from constant values: the
//! numbers are totals the kernel already keeps, there is nothing to
//! increment.

use std::fmt;

use flowtable::query::{QuerySpec, Side, TagKey};
use flowtable::Connection;
use hdrhistogram::Histogram;
use probe_common::ParseError;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use super::http::ServerStats;
use super::Snapshot;
use crate::sources::Health;

/// The group-by of the per-group series: keys of each end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricLabels {
    keys: Vec<(Side, TagKey)>,
}

impl Default for MetricLabels {
    /// `src_service`, `dst_service`: one series per service pair, a bound
    /// that does not grow with clients or ports.
    fn default() -> MetricLabels {
        "src.service,dst.service".parse().expect("valid default")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabelsError {
    #[error("metrics label `{given}`: expected src.KEY or dst.KEY (e.g. dst.port)")]
    NoSide { given: String },
    #[error("metrics label `{given}`: {err}")]
    Key {
        given: String,
        err: flowtable::query::TagError,
    },
    #[error("metrics label `{given}` is given twice")]
    Twice { given: String },
}

impl std::str::FromStr for MetricLabels {
    type Err = LabelsError;

    fn from_str(s: &str) -> Result<MetricLabels, LabelsError> {
        let mut keys = Vec::new();
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let no_side = || LabelsError::NoSide {
                given: item.to_owned(),
            };
            let (side, key) = item.split_once('.').ok_or_else(no_side)?;
            let side = match side {
                "src" => Side::Src,
                "dst" => Side::Dst,
                _ => return Err(no_side()),
            };
            let key: TagKey = key.parse().map_err(|err| LabelsError::Key {
                given: item.to_owned(),
                err,
            })?;
            if keys.contains(&(side, key.clone())) {
                return Err(LabelsError::Twice {
                    given: item.to_owned(),
                });
            }
            keys.push((side, key));
        }
        Ok(MetricLabels { keys })
    }
}

impl MetricLabels {
    /// The query whose rows are the series: no filter, no top, ephemeral
    /// initiator ports collapsed (bounded cardinality).
    pub fn spec(&self) -> QuerySpec {
        let side = |s: Side| {
            self.keys
                .iter()
                .filter(|(k, _)| *k == s)
                .map(|(_, t)| t.clone())
                .collect()
        };
        QuerySpec {
            src: side(Side::Src),
            dst: side(Side::Dst),
            ..QuerySpec::default()
        }
    }

    /// Label names: `src_service`, `dst_port`, `src_ip_24` (a Prometheus
    /// label name allows only letters, digits and `_`).
    pub fn names(&self) -> (Vec<String>, Vec<String>) {
        let name = |side: Side, k: &TagKey| {
            let k: String = k
                .to_string()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("{}_{k}", side.name())
        };
        let spec = self.spec();
        (
            spec.src.iter().map(|k| name(Side::Src, k)).collect(),
            spec.dst.iter().map(|k| name(Side::Dst, k)).collect(),
        )
    }
}

impl fmt::Display for MetricLabels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = self
            .keys
            .iter()
            .map(|(s, k)| format!("{}.{k}", s.name()))
            .collect();
        f.write_str(&items.join(","))
    }
}

pub type Labels = Vec<(String, String)>;

/// Series of one metric, each with its labels and a constant value.
#[derive(Debug)]
pub struct Series<M>(pub Vec<(Labels, M)>);

impl<M: TypedMetric> TypedMetric for Series<M> {
    const TYPE: MetricType = M::TYPE;
}

impl<M: EncodeMetric + TypedMetric> EncodeMetric for Series<M> {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        for (labels, m) in &self.0 {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }
}

/// Upper bounds of the RTT histogram, seconds: 100 µs (same host) to 10 s.
const RTT_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A histogram from the flow table's hdrhistogram of microseconds.
#[derive(Debug)]
struct RttHistogram {
    sum: f64,
    count: u64,
    /// Non-cumulative counts per bound of [`RTT_BUCKETS`], then `+Inf`.
    buckets: Vec<(f64, u64)>,
}

impl RttHistogram {
    fn of(h: &Histogram<u64>) -> RttHistogram {
        let mut buckets: Vec<(f64, u64)> = RTT_BUCKETS
            .iter()
            .map(|&b| (b, 0))
            .chain([(f64::MAX, 0)])
            .collect();
        let mut sum = 0.0;
        for v in h.iter_recorded() {
            // The middle of hdrhistogram's bucket: within its 1 % precision.
            let secs = h.median_equivalent(v.value_iterated_to()) as f64 / 1e6;
            let n = v.count_at_value();
            sum += secs * n as f64;
            let i = buckets
                .iter()
                .position(|&(b, _)| secs <= b)
                .unwrap_or(buckets.len() - 1);
            buckets[i].1 += n;
        }
        RttHistogram {
            sum,
            count: h.len(),
            buckets,
        }
    }
}

impl TypedMetric for RttHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for RttHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

pub fn counter(v: u64) -> ConstCounter<u64> {
    ConstCounter::new(v)
}

pub fn gauge(v: u64) -> ConstGauge<i64> {
    ConstGauge::new(v.min(i64::MAX as u64) as i64)
}

/// Group series from the query rows: the listed connections plus the sums
/// of those no longer listed, so that no counter goes down.
fn groups(reg: &mut Registry, s: &Snapshot, labels: &MetricLabels) {
    let conns: &[Connection] = &s.conns;
    let mut q = labels.spec().run(conns, flowtable::query::origin(conns));
    if let Some(t) = &s.retired_totals {
        q.absorb(t);
    }
    let (src_names, dst_names) = labels.names();
    let label_set = |src: &[Option<String>], dst: &[Option<String>]| -> Labels {
        let pairs = src_names.iter().zip(src).chain(dst_names.iter().zip(dst));
        // A missing tag is an empty value: Prometheus reads it as absent.
        pairs
            .map(|(n, v)| (n.clone(), v.clone().unwrap_or_default()))
            .collect()
    };
    let with = |l: &Labels, k: &str, v: &str| -> Labels {
        let mut l = l.clone();
        l.push((k.to_owned(), v.to_owned()));
        l
    };

    let mut sent_bytes = Vec::new();
    let mut received_bytes = Vec::new();
    let mut sent_packets = Vec::new();
    let mut received_packets = Vec::new();
    let mut retransmits = Vec::new();
    let mut retransmitted_bytes = Vec::new();
    let mut conns_total = Vec::new();
    let mut rtt = Vec::new();
    for r in &q.rows {
        let l = label_set(&r.src, &r.dst);
        sent_bytes.push((l.clone(), counter(r.sent.bytes)));
        received_bytes.push((l.clone(), counter(r.received.bytes)));
        sent_packets.push((l.clone(), counter(r.sent.packets)));
        received_packets.push((l.clone(), counter(r.received.packets)));
        for (dir, d) in [("sent", &r.sent), ("received", &r.received)] {
            let dl = with(&l, "direction", dir);
            retransmits.push((dl.clone(), counter(d.retransmits())));
            retransmitted_bytes.push((dl, counter(d.retransmitted_bytes())));
        }
        conns_total.push((l.clone(), counter(r.conns)));
        for (leg, h) in [("dst", &r.rtt_dst), ("src", &r.rtt_src)] {
            if !h.is_empty() {
                rtt.push((with(&l, "leg", leg), RttHistogram::of(h)));
            }
        }
    }
    reg.register(
        "sent_bytes",
        "Bytes from initiator to responder (`sent.bytes` of a connection), retransmissions included",
        Series(sent_bytes),
    );
    reg.register(
        "received_bytes",
        "Bytes from responder to initiator, retransmissions included",
        Series(received_bytes),
    );
    reg.register(
        "sent_packets",
        "Packets from initiator to responder",
        Series(sent_packets),
    );
    reg.register(
        "received_packets",
        "Packets from responder to initiator",
        Series(received_packets),
    );
    reg.register(
        "retransmits",
        "TCP segments that repeat sequence space already sent, by direction (sent: initiator to responder)",
        Series(retransmits),
    );
    reg.register(
        "retransmitted_bytes",
        "Bytes of those retransmitted segments, by direction",
        Series(retransmitted_bytes),
    );
    reg.register(
        "connections",
        "Connections seen, closed ones included",
        Series(conns_total),
    );
    reg.register_with_unit(
        "rtt",
        "Round-trip time samples; leg=dst timed on sent segments (initiator to responder and back), leg=src on received ones. Present where the flow table measures RTT",
        Unit::Seconds,
        Series(rtt),
    );
}

/// The agent's HTTP server: its clients and what it refused.
fn server(reg: &mut Registry, h: &ServerStats) {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    reg.register(
        "http_clients",
        "Connections to the agent's HTTP server open now",
        gauge(get(&h.clients)),
    );
    reg.register(
        "http_clients_max",
        "The bound of those; one more is answered 503",
        gauge(super::http::LIMITS.clients as u64),
    );
    reg.register(
        "http_refused",
        "Connections answered 503: the server had its most clients",
        counter(get(&h.refused)),
    );
    reg.register(
        "http_timed_out",
        "Connections closed because the request's head took over 10 s or the connection over 60 s",
        counter(get(&h.timed_out)),
    );
    reg.register(
        "http_malformed",
        "Connections closed on a malformed request or a head over 16 KiB",
        counter(get(&h.malformed)),
    );
}

/// What the run keeps beyond the listing, and what its bounds folded.
fn bounds(reg: &mut Registry, s: &Snapshot) {
    let b = &s.bounds;
    reg.register(
        "listed_connections",
        "Connections listed now (/connections): open ones and those that ended less than --keep-ended ago",
        gauge(s.conns.len() as u64),
    );
    reg.register(
        "retired_connections",
        "Connections that left the listing; their counts stay in the group series and the rollups",
        counter(b.retired),
    );
    reg.register(
        "final_listed_connections",
        "Connections that left the listing kept for the final output",
        gauge(b.listed_ended as u64),
    );
    reg.register(
        "final_list_max",
        "The bound of those (--list-max)",
        gauge(b.list_max as u64),
    );
    reg.register(
        "unlisted_connections",
        "Connections beyond --list-max: summed in one line of the final output, not listed",
        counter(b.unlisted),
    );
    reg.register(
        "metrics_folded_series",
        "Group series of connections no longer listed folded into the empty-label group (more than 10000 groups)",
        counter(b.folded_series),
    );
    let r = &b.rollups;
    reg.register(
        "rollup_intervals",
        "Closed rollup intervals kept (--rollup-keep / --rollup-interval at most)",
        gauge(r.intervals as u64),
    );
    if let Some(rs) = &b.rollup_settings {
        reg.register(
            "rollup_intervals_max",
            "The bound of rollup intervals",
            gauge(rs.keep as u64),
        );
    }
    reg.register(
        "rollup_groups",
        "Groups held by the rollups (kept intervals and the open one)",
        gauge(r.groups as u64),
    );
    reg.register(
        "rollup_tracked_connections",
        "Connections of the last reading, whose counters the next reading's changes are taken against",
        gauge(r.tracked as u64),
    );
    reg.register(
        "rollup_folded_groups",
        "Groups summed into `other` by --rollup-top (or while an interval was open, beyond 20000 groups)",
        counter(r.folded_groups),
    );
    reg.register(
        "rollup_dropped_intervals",
        "Rollup intervals dropped from the far end of the ring",
        counter(r.dropped_intervals),
    );
}

/// `--export-jsonl`: how writing it fares.
fn export(reg: &mut Registry, s: &Snapshot) {
    let Some(e) = &s.export else { return };
    reg.register(
        "export_tracked_connections",
        "Connections --export-jsonl remembers the last counters of",
        gauge(e.tracked as u64),
    );
    reg.register(
        "export_pending_connections",
        "Ended connections whose last --export-jsonl lines wait for a write that works",
        gauge(e.pending as u64),
    );
    reg.register(
        "export_dropped_connections",
        "Ended connections whose last --export-jsonl lines were dropped while the file could not be written",
        counter(e.dropped),
    );
    reg.register(
        "export_failed_writes",
        "Intervals whose --export-jsonl lines could not be written; each one's change went with the next interval written",
        counter(e.failed_writes),
    );
    reg.register(
        "export_behind",
        "1 when the last --export-jsonl write failed: changes are waiting for the next",
        gauge(u64::from(e.behind)),
    );
}

/// Series of `flowprobe_listener_info` at most; more are counted.
pub const MAX_LISTENERS: usize = 1000;

/// The metrics-only way to tag a remote end: for each local address and
/// port that answered a listed connection, its owner's tags, so that
/// PromQL can join another agent's `dst_ip`/`dst_port` series to them
/// (`* on (dst_ip, dst_port) group_left(owner_service) flowprobe_listener_info`).
fn listeners(reg: &mut Registry, s: &Snapshot) {
    if s.local_addrs.is_empty() {
        return;
    }
    let mut seen: std::collections::BTreeMap<(flowtable::Proto, std::net::IpAddr, u16), Labels> =
        std::collections::BTreeMap::new();
    let mut dropped = 0u64;
    for c in s.conns.iter() {
        if !s.local_addrs.contains(&c.dst) || c.dst_tags.is_empty() {
            continue;
        }
        let k = (c.proto, c.dst, c.dport);
        if seen.contains_key(&k) {
            continue;
        }
        if seen.len() >= MAX_LISTENERS {
            dropped += 1;
            continue;
        }
        let tag = |t: &str| c.dst_tags.get(t).cloned().unwrap_or_default();
        seen.insert(
            k,
            vec![
                ("proto".to_owned(), c.proto.name().to_owned()),
                ("dst_ip".to_owned(), c.dst.to_string()),
                ("dst_port".to_owned(), c.dport.to_string()),
                ("owner_service".to_owned(), tag("service")),
                ("owner_process".to_owned(), tag("process")),
                ("owner_container".to_owned(), tag("container")),
                ("owner_host".to_owned(), tag("host")),
            ],
        );
    }
    reg.register(
        "listener_info",
        "1 per local address and port that answered a listed connection, labelled with its owner (for PromQL joins of other agents' dst_ip/dst_port series)",
        Series(seen.into_values().map(|l| (l, gauge(1))).collect()),
    );
    reg.register(
        "listener_info_dropped",
        "Listeners not exported: more than 1000",
        gauge(dropped),
    );
}

/// `--fleet`: what was published, what waits in the spool, what it dropped.
fn fleet(reg: &mut Registry, s: &Snapshot) {
    let Some(f) = &s.fleet else { return };
    reg.register(
        "fleet_intervals",
        "Fleet interval messages made (each goes to the spool)",
        counter(f.intervals),
    );
    reg.register("fleet_rows", "Rows in those messages", counter(f.rows));
    reg.register(
        "fleet_folded_groups",
        "Groups beyond --fleet-top, sent as their view's folded counters",
        counter(f.folded_groups),
    );
    reg.register(
        "fleet_foreign_groups",
        "Groups with neither end on this host (forwarded traffic): not published",
        counter(f.foreign_groups),
    );
    reg.register(
        "fleet_endpoints",
        "Endpoints (listeners seen serving) in this host's directory entries",
        gauge(f.endpoints as u64),
    );
    reg.register(
        "fleet_endpoints_dropped",
        "Endpoints not put in the directory: more than 10000",
        counter(f.endpoints_dropped),
    );
    let sp = &f.spool;
    reg.register(
        "fleet_spool_messages",
        "Interval messages waiting for JetStream's acknowledgement",
        gauge(sp.queued as u64),
    );
    reg.register(
        "fleet_spool_max",
        "The bound of those (--fleet-spool)",
        gauge(sp.max as u64),
    );
    reg.register(
        "fleet_spool_dropped",
        "Interval messages dropped from a full spool (the fleet marks those intervals missing)",
        counter(sp.dropped),
    );
    reg.register(
        "fleet_published",
        "Interval messages acknowledged by JetStream",
        counter(sp.sent),
    );
    reg.register(
        "fleet_publish_failures",
        "Publishes and KV puts that failed and were tried again",
        counter(sp.failures),
    );
    reg.register(
        "fleet_connected",
        "1 while the last publish to NATS worked",
        gauge(u64::from(sp.connected)),
    );
}

/// What undoing NAT did (when the step runs: not with --per-interface).
fn nat(reg: &mut Registry, s: &Snapshot) {
    let Some(n) = &s.nat else { return };
    reg.register(
        "nat_translated_connections",
        "Connections listed now that this host's netfilter translated (SNAT, MASQUERADE, DNAT), each with the addresses beyond the translation as nat.ip/nat.port tags",
        gauge(n.translated),
    );
    reg.register(
        "nat_unresolved_connections",
        "Connections of the last reading that could not be checked against conntrack (no permission, conntrack unreadable): a translated one among them is listed once per tuple",
        gauge(n.unresolved),
    );
    reg.register(
        "packets_nat_duplicate",
        "Packets of a translated connection seen again after the translation: counted once, in the view before it",
        counter(n.duplicate_packets),
    );
    reg.register(
        "nat_lookups",
        "Conntrack lookups (ctnetlink) made",
        counter(n.lookups),
    );
    reg.register(
        "nat_lookup_errors",
        "Conntrack lookups that failed",
        counter(n.lookup_errors),
    );
    reg.register(
        "nat_memory_entries",
        "Entries of the NAT join's memory (answers and translated connections)",
        gauge(n.cache_entries),
    );
    reg.register(
        "nat_memory_limit",
        "Bound of each of the NAT join's two memories",
        gauge(n.cache_max),
    );
    reg.register(
        "nat_memory_cleared",
        "Times a NAT memory was full and cleared (what it held is asked again)",
        counter(n.cache_cleared),
    );
}

/// Attribution's work and its bounded memories.
fn attribution(reg: &mut Registry, s: &Snapshot) {
    let Some(a) = &s.attrib else { return };
    let counters = [
        ("attribution_lookups", "Sockets looked up one by one (sock_diag) to join their connection to a process", a.lookups),
        ("attribution_sockets_attributed", "Sockets the resolver's passes joined to a process", a.attributed),
        ("attribution_errors", "Attribution failures other than a socket or process gone (said once on stderr)", a.errors),
        ("attribution_denied", "Reads attribution was refused for lack of a capability (docs/service.md)", a.denied),
        ("attribution_owner_records", "Socket owners the kernel recorded at connect, first send or accept", a.owners_recorded),
        ("attribution_owners_forgotten", "Recorded socket owners forgotten for room (attribution_owners_limit) before their connection was retired: such an end is joined by the resolver's passes only", a.owners_forgotten),
        ("attribution_listeners_forgotten", "Recorded listeners forgotten for room (attribution_listeners_limit): their accepted sockets are joined by the resolver's passes only", a.listeners_forgotten),
        ("attribution_tag_sets_let_go", "Shared tag sets let go for room (attribution_tag_sets_limit): ends keep theirs, later ends of the same owner get a set of their own", a.tag_sets_let_go),
        ("attribution_netns_ids_cleared", "Times the namespace ids learnt for recorded sockets were all forgotten for room (attribution_netns_ids_limit): learnt again from later records", a.netns_ids_cleared),
    ];
    for (name, help, v) in counters {
        reg.register(name, help, counter(v));
    }
    let gauges = [
        ("attribution_remembered_tuples", "5-tuples the resolver remembers (sockets seen, lookups settled), forgotten with their connections", a.remembered),
        ("attribution_owners", "Recorded socket owners held", a.owners_held),
        ("attribution_owners_limit", "Bound of the recorded socket owners held (the oldest forgotten first)", a.owners_limit),
        ("attribution_listeners", "Recorded listeners held", a.listeners_held),
        ("attribution_listeners_limit", "Bound of the recorded listeners held (the oldest forgotten first)", a.listeners_limit),
        ("attribution_settled_connections", "Listed connections whose ends are settled (a process, or remote): their tags are kept and handed again at each reading instead of joined afresh", a.settled),
        ("attribution_tag_sets", "Distinct tag sets the ends share (one per owner, or per reason not attributed)", a.tag_sets),
        ("attribution_tag_sets_limit", "Bound of the shared tag sets (beyond it, sets no end holds are let go)", a.tag_sets_limit),
        ("attribution_netns_ids", "Network namespace ids learnt for recorded sockets (by namespace cookie)", a.netns_ids),
        ("attribution_netns_ids_limit", "Bound of the namespace ids learnt (beyond it, all are forgotten and learnt again)", a.netns_ids_limit),
    ];
    for (name, help, v) in gauges {
        reg.register(name, help, gauge(v));
    }
}

/// Health of the agent itself.
fn health(reg: &mut Registry, s: &Snapshot) {
    let Some(h) = &s.health else { return };
    reg.register(
        "backend",
        "1 for the capture backend in use (tc, xdp or afpacket)",
        Series(vec![(
            vec![("backend".to_owned(), h.backend().to_owned())],
            gauge(1),
        )]),
    );
    let h = match h {
        Health::Afpacket(a) => {
            let k = &a.kernel;
            reg.register(
                "ring_packets",
                "Packets the kernel offered the AF_PACKET rings (PACKET_STATISTICS), dropped ones included",
                counter(k.packets),
            );
            reg.register(
                "ring_drops",
                "Packets the kernel dropped because an AF_PACKET ring was full: not counted",
                counter(k.drops),
            );
            reg.register(
                "ring_freezes",
                "Times an AF_PACKET ring was full and the kernel froze its queue",
                counter(k.freeze_q),
            );
            return;
        }
        // The rest describes the eBPF program and its maps.
        Health::Ebpf(h) => h,
    };
    reg.register(
        "attached_interfaces",
        "Interfaces the eBPF program (tc or xdp) is attached to",
        ConstGauge::new(h.attached.len() as i64),
    );
    let ifaces = h
        .attached
        .iter()
        .map(|(iface, mode)| {
            (
                vec![
                    ("iface".to_owned(), iface.clone()),
                    ("mode".to_owned(), mode.name().to_owned()),
                ],
                gauge(1),
            )
        })
        .collect();
    reg.register(
        "interface_attached",
        "1 for each interface the eBPF program is attached to; mode: clsact (tc), native or generic (xdp)",
        Series(ifaces),
    );
    if let Some(o) = &h.owners {
        reg.register(
            "owner_records",
            "Sockets whose owner the cgroup programs recorded at connect or first send",
            counter(o.recorded),
        );
        reg.register(
            "owner_records_dropped",
            "Socket owners the cgroup programs could not record (ring buffer full): those ends are found by sock_diag only",
            counter(o.dropped),
        );
    }
    let t = &h.table;
    reg.register(
        "table_connections",
        "Connections in the kernel's map now (closed and idle ones are moved out)",
        gauge(t.entries as u64),
    );
    reg.register(
        "table_capacity",
        "Capacity of the kernel's connection map (--max-conns)",
        gauge(u64::from(t.capacity)),
    );
    reg.register(
        "tracked_connections",
        "Connections the agent lists, including those moved out of the kernel map less than --keep-ended ago",
        gauge(s.conns.len() as u64),
    );
    reg.register(
        "map_full",
        "Packets of new connections not counted: every slot they may take in the kernel table was in use",
        counter(t.full),
    );
    reg.register(
        "map_insert_failed",
        "Packets of new connections not counted: their slots kept changing under two tries",
        counter(t.insert_failed),
    );
    reg.register(
        "map_contended",
        "Packets whose entry stayed locked by another CPU: counted, without the retransmit check",
        counter(t.contended),
    );
    reg.register(
        "packets_tracked",
        "Packets that parsed to a TCP/UDP connection",
        counter(h.stats.tracked),
    );
    reg.register(
        "packets_duplicate",
        "Of those, copies not counted again: the packet was counted at another interface of this host first",
        counter(h.stats.duplicate),
    );
    let skipped = ParseError::ALL
        .iter()
        .map(|&e| {
            (
                vec![("reason".to_owned(), e.name().to_owned())],
                counter(h.stats.skipped(e)),
            )
        })
        .collect();
    reg.register(
        "packets_skipped",
        "Packets that carry no TCP/UDP connection, by reason",
        Series(skipped),
    );
}

/// The OpenMetrics text of `s` (Prometheus scrapes it as such).
#[cfg(test)]
pub fn encode(s: &Snapshot, labels: &MetricLabels) -> String {
    encode_with(s, labels, None)
}

/// [`encode`] with the server's own counters, as `/metrics` serves it.
pub fn encode_served(s: &Snapshot, labels: &MetricLabels, http: &ServerStats) -> String {
    encode_with(s, labels, Some(http))
}

fn encode_with(s: &Snapshot, labels: &MetricLabels, http: Option<&ServerStats>) -> String {
    let mut reg = Registry::with_prefix("flowprobe");
    groups(&mut reg, s, labels);
    health(&mut reg, s);
    export(&mut reg, s);
    bounds(&mut reg, s);
    nat(&mut reg, s);
    attribution(&mut reg, s);
    if let Some(h) = http {
        server(&mut reg, h);
    }
    fleet(&mut reg, s);
    listeners(&mut reg, s);
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)
        .expect("writing to a String cannot fail");
    out
}

/// The Content-Type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use flowtable::DirStats;

    use super::*;
    use crate::sources::afpacket::KernelStats;
    use crate::sources::{AfpacketHealth, AttachMode, EbpfHealth, Hook, OwnerHealth, TableHealth};

    /// A golden file under `fixtures/goldens/` (an `expect-test` file:
    /// `UPDATE_EXPECT=1 cargo test -p flowprobe` rewrites it). The path is
    /// absolute, so it does not depend on where this source file sits.
    macro_rules! golden {
        ($name:literal) => {
            expect_test::expect_file![concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../fixtures/goldens/",
                $name
            )]
        };
    }

    fn conn(
        src_service: &str,
        dst_service: Option<&str>,
        dport: u16,
        sent: (u64, u64, u64, u64),
        received: (u64, u64),
    ) -> Connection {
        let tags = |s: Option<&str>| {
            s.map(|s| [("service".to_owned(), s.to_owned())].into())
                .unwrap_or_default()
        };
        Connection {
            proto: flowtable::Proto::Tcp,
            src: IpAddr::from([10, 0, 0, 1]),
            sport: 40000 + dport,
            dst: IpAddr::from([10, 0, 0, 2]),
            dport,
            iface: 2,
            first_seen: 1_000_000_000,
            last_seen: 2_000_000_000,
            sent: DirStats::counts(sent.0, sent.1, 0).with_loss(flowtable::Loss {
                retransmits: sent.2,
                retransmitted_bytes: sent.3,
                ..Default::default()
            }),
            received: DirStats::counts(received.0, received.1, 0),
            rtt: Default::default(),
            src_tags: tags(Some(src_service)),
            dst_tags: tags(dst_service),
        }
    }

    fn snapshot() -> Snapshot {
        let mut stats = flowtable::FrameStats {
            tracked: 42,
            ..Default::default()
        };
        stats.skip(ParseError::NotIp);
        stats.skip(ParseError::NotIp);
        Snapshot {
            nat: Some(flowtable::nat::NatStats {
                translated: 1,
                folded: 1,
                unresolved: 2,
                duplicate_packets: 18,
                lookups: 9,
                lookup_errors: 2,
                cache_entries: 4,
                cache_max: 131072,
                cache_cleared: 0,
            }),
            attrib: Some(flowtable::attrib::AttribHealth {
                remembered: 6,
                lookups: 7,
                attributed: 3,
                owners_recorded: 5,
                owners_held: 4,
                owners_limit: 65536,
                owners_forgotten: 1,
                listeners_held: 1,
                listeners_limit: 4096,
                settled: 2,
                tag_sets: 3,
                tag_sets_limit: 4096,
                netns_ids: 2,
                netns_ids_limit: 4096,
                ..Default::default()
            }),
            conns: vec![
                conn("web", Some("db"), 5432, (10, 1000, 1, 100), (8, 4000)),
                conn("web", Some("db"), 5432, (5, 500, 0, 0), (5, 600)),
                conn("web", None, 443, (3, 300, 0, 0), (2, 200)),
            ]
            .into(),
            health: Some(Health::Ebpf(EbpfHealth {
                hook: Hook::Tc,
                // One as an XDP run would say it; the golden shows both modes.
                attached: vec![
                    ("veth0".to_owned(), AttachMode::Clsact),
                    ("eth1".to_owned(), AttachMode::XdpNative),
                ],
                xdp_modes: Vec::new(),
                stats,
                table: TableHealth {
                    entries: 2,
                    capacity: 1024,
                    full: 1,
                    insert_failed: 0,
                    contended: 3,
                },
                owners: Some(OwnerHealth {
                    recorded: 7,
                    dropped: 1,
                }),
            })),
            ..Default::default()
        }
    }

    #[test]
    fn exposition_golden() {
        let labels: MetricLabels = "src.service,dst.service,dst.port".parse().unwrap();
        let got = encode(&snapshot(), &labels);
        golden!("metrics.golden.txt").assert_eq(&got);
    }

    /// A real capture through the flow table: RTT histograms included.
    #[test]
    fn exposition_of_a_capture_golden() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut table = flowtable::FlowTable::new();
        let mut stats = flowtable::FrameStats::default();
        let files = [root.join("fixtures/pcaps/tcp4_loss.pcap")];
        crate::sources::file::replay(&files, &mut table, &mut stats, probe_common::Decap::DEFAULT)
            .unwrap();
        let s = Snapshot {
            conns: table.connections().into(),
            health: Some(Health::Ebpf(EbpfHealth {
                hook: Hook::Tc,
                attached: Vec::new(),
                xdp_modes: Vec::new(),
                stats,
                table: TableHealth {
                    capacity: 65536,
                    ..TableHealth::default()
                },
                owners: None,
            })),
            ..Default::default()
        };
        let labels: MetricLabels = "src.ip/24,dst.port".parse().unwrap();
        let got = encode(&s, &labels);
        golden!("metrics.capture.golden.txt").assert_eq(&got);
    }

    #[test]
    fn sums_equal_the_query() {
        // The default labels (services) over the same snapshot: one series
        // per service pair, equal to the rows of `--src service --dst service`.
        let text = encode(&snapshot(), &MetricLabels::default());
        assert!(text
            .contains("flowprobe_sent_bytes_total{src_service=\"web\",dst_service=\"db\"} 1500\n"));
        assert!(
            text.contains("flowprobe_sent_bytes_total{src_service=\"web\",dst_service=\"\"} 300\n")
        );
        assert!(text.contains(
            "flowprobe_retransmits_total{src_service=\"web\",dst_service=\"db\",direction=\"sent\"} 1\n"
        ));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn afpacket_has_no_kernel_map_series() {
        let s = Snapshot {
            nat: None,
            export: Some(crate::export::jsonl::ExportStatus {
                failed_writes: 2,
                behind: true,
                last_error: None,
                ..Default::default()
            }),
            health: Some(Health::Afpacket(AfpacketHealth {
                kernel: KernelStats {
                    packets: 1200,
                    drops: 7,
                    freeze_q: 1,
                },
                ..AfpacketHealth::default()
            })),
            ..snapshot()
        };
        let text = encode(&s, &MetricLabels::default());
        assert!(text.contains("flowprobe_backend{backend=\"afpacket\"} 1\n"));
        // Its own losses are never silent.
        for line in [
            "flowprobe_ring_packets_total 1200\n",
            "flowprobe_ring_drops_total 7\n",
            "flowprobe_ring_freezes_total 1\n",
            "flowprobe_export_failed_writes_total 2\n",
            "flowprobe_export_behind 1\n",
        ] {
            assert!(text.contains(line), "{line}{text}");
        }
        assert!(text.contains("flowprobe_sent_bytes_total{"));
        for absent in [
            "flowprobe_table_capacity",
            "flowprobe_map_full",
            "flowprobe_attached",
        ] {
            assert!(!text.contains(absent), "{absent}");
        }
    }

    #[test]
    fn rtt_histogram_from_the_flow_table() {
        let mut h = Histogram::<u64>::new(2).unwrap();
        for us in [80, 300, 300, 20_000] {
            h.record(us).unwrap();
        }
        let r = RttHistogram::of(&h);
        assert_eq!(r.count, 4);
        let counts: Vec<u64> = r.buckets.iter().map(|b| b.1).collect();
        // ≤100 µs: 1; ≤500 µs: 2; ≤25 ms: 1.
        assert_eq!(counts[0], 1);
        assert_eq!(counts[2], 2);
        assert_eq!(counts[7], 1);
        assert!((r.sum - 0.02068).abs() < 0.0005, "{}", r.sum);
    }

    #[test]
    fn labels_parse() {
        let l: MetricLabels = "src.ip/24, dst.port,dst.k8s.pod".parse().unwrap();
        assert_eq!(
            l.names(),
            (
                vec!["src_ip_24".to_owned()],
                vec!["dst_port".to_owned(), "dst_k8s_pod".to_owned()]
            )
        );
        assert_eq!(l.to_string(), "src.ip/24,dst.port,dst.k8s.pod");
        for (bad, msg) in [
            (
                "service",
                "metrics label `service`: expected src.KEY or dst.KEY (e.g. dst.port)",
            ),
            (
                "dst.port,dst.port",
                "metrics label `dst.port` is given twice",
            ),
            (
                "peer.port",
                "metrics label `peer.port`: expected src.KEY or dst.KEY (e.g. dst.port)",
            ),
        ] {
            assert_eq!(bad.parse::<MetricLabels>().unwrap_err().to_string(), msg);
        }
    }

    /// Local responders are listed with their owner's tags; remote ones
    /// and untagged ones are not.
    #[test]
    fn listener_info_names_local_listeners_owners() {
        let mut conns = crate::export::agent::tests::conns();
        for c in &mut conns {
            c.dst_tags
                .insert("service".into(), format!("svc-{}", c.dport));
            c.dst_tags.insert("host".into(), "b".into());
        }
        conns[0].dst = "10.9.9.9".parse().unwrap();
        let s = Snapshot {
            conns: conns.into(),
            local_addrs: vec!["10.0.1.1".parse().unwrap()],
            ..Snapshot::default()
        };
        let text = encode(&s, &MetricLabels::default());
        let info: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("flowprobe_listener_info{"))
            .collect();
        assert_eq!(
            info,
            [
                "flowprobe_listener_info{proto=\"tcp\",dst_ip=\"10.0.1.1\",dst_port=\"80\",owner_service=\"svc-80\",owner_process=\"\",owner_container=\"\",owner_host=\"b\"} 1",
                "flowprobe_listener_info{proto=\"tcp\",dst_ip=\"10.0.1.1\",dst_port=\"443\",owner_service=\"svc-443\",owner_process=\"\",owner_container=\"\",owner_host=\"b\"} 1",
            ]
        );
    }
}
