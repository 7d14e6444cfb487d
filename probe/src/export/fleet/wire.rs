//! What an agent publishes to the fleet, and the checks the fleet process
//! makes on every message (docs/fleet.md, "Messages").
//!
//! One message per host and interval on `flowprobe.rows.<host>`, JSON, with
//! `Nats-Msg-Id: <host>.<run>.<seq>` so that a resend is suppressed by the
//! stream. Its rows are the interval's rollup groups (`flowtable::rollup`)
//! seen from this host: `view` says which end is local. Counters keep the
//! contract's orientation: `sent` is initiator → responder.

use std::collections::BTreeMap;
use std::net::IpAddr;

use flowtable::rollup::Aggregate;
use flowtable::DirStats;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The version of this format; the fleet rejects any other.
pub const SCHEMA: u32 = 1;
/// The stream and its subjects.
pub const STREAM: &str = "FLOWPROBE";
pub const SUBJECT_PREFIX: &str = "flowprobe.rows.";
/// KV buckets: presence (key: host id) and the endpoint directory (key:
/// `<host>.<proto>.<address>.<port>`, the address with `.` and `:` as `-`).
pub const PRESENCE_BUCKET: &str = "flowprobe-presence";
pub const ENDPOINTS_BUCKET: &str = "flowprobe-endpoints";
/// Host ids and network ids: subject tokens (so that NATS permissions can
/// name them), at most this long.
pub const MAX_ID_LEN: usize = 64;
/// (value, count) pairs per RTT leg a row carries; beyond, neighbouring
/// pairs are merged (into the larger value) until it fits.
pub const MAX_RTT_BUCKETS: usize = 512;
/// Tags per end, and the length of a tag key or value.
pub const MAX_TAGS: usize = 32;
pub const MAX_TAG_LEN: usize = 256;

/// Which end of the connection is on the publishing host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum View {
    /// The local end initiated.
    Client,
    /// The remote end initiated.
    Server,
    /// Both ends are on this host.
    Local,
}

impl View {
    pub fn name(self) -> &'static str {
        match self {
            View::Client => "client",
            View::Server => "server",
            View::Local => "local",
        }
    }
}

/// One end: address, port (an initiator port of 1024 or more reads 1024,
/// `ephemeral`) and, for an end on the publishing host, its tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub ip: IpAddr,
    pub port: u16,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// RTT samples of one leg: (microseconds, count) pairs and the exact max.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RttLeg {
    pub max_us: u64,
    pub buckets: Vec<(u64, u64)>,
}

impl RttLeg {
    fn of(h: &Option<Box<Histogram<u64>>>, max: u64) -> Option<RttLeg> {
        let h = h.as_ref()?;
        let mut buckets: Vec<(u64, u64)> = h
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect();
        if buckets.is_empty() {
            return None;
        }
        // Bounded: neighbours merge pairwise until it fits.
        while buckets.len() > MAX_RTT_BUCKETS {
            buckets = buckets
                .chunks(2)
                .map(|c| (c[c.len() - 1].0, c.iter().map(|x| x.1).sum()))
                .collect();
        }
        Some(RttLeg {
            max_us: max,
            buckets,
        })
    }
}

/// What a group of connections added in the interval, seen from here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub view: View,
    pub proto: String,
    pub local: End,
    pub remote: End,
    /// Connections that began in the interval.
    pub conns: u64,
    /// Initiator → responder, and back.
    pub sent: DirStats,
    pub received: DirStats,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Responder's leg (SYN → SYN/ACK and data → ACK) and initiator's leg.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_dst: Option<RttLeg>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_src: Option<RttLeg>,
}

/// What the rows left out (beyond `--fleet-top`), per view: counters only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folded {
    pub groups: u64,
    pub conns: u64,
    pub sent: DirStats,
    pub received: DirStats,
}

/// One host's interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub schema: u32,
    pub host: String,
    /// Addresses are comparable only within one network id.
    pub network: String,
    /// When this agent (or replay) started, Unix ns: with `seq`, which
    /// intervals of a run the fleet has.
    pub run: u64,
    /// 0, 1, 2, … per interval of the run.
    pub seq: u64,
    /// `[start_ns, end_ns)`, Unix ns, aligned to the interval length.
    pub start_ns: u64,
    pub end_ns: u64,
    /// The host's addresses (its end of a `client` row is one of them).
    pub addresses: Vec<IpAddr>,
    pub rows: Vec<Row>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub folded: BTreeMap<View, Folded>,
    /// Intervals of this run the agent's spool had to drop so far (never
    /// sent: the fleet says those are missing).
    #[serde(default)]
    pub spool_dropped: u64,
}

/// Why a message was rejected; the names are the `reason` label in the
/// fleet's /metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reject {
    Oversized,
    Malformed,
    Schema,
    HostMismatch,
    TooManyRows,
    Invalid,
}

impl Reject {
    pub const ALL: [Reject; 6] = [
        Reject::Oversized,
        Reject::Malformed,
        Reject::Schema,
        Reject::HostMismatch,
        Reject::TooManyRows,
        Reject::Invalid,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Reject::Oversized => "oversized",
            Reject::Malformed => "malformed",
            Reject::Schema => "schema",
            Reject::HostMismatch => "host_mismatch",
            Reject::TooManyRows => "too_many_rows",
            Reject::Invalid => "invalid",
        }
    }
}

/// A host or network id: 1 to [`MAX_ID_LEN`] of `A-Za-z0-9_-`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The host name as a host id: other characters become `_`.
pub fn host_id_of(name: &str) -> String {
    let mut id: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_ID_LEN)
        .collect();
    if id.is_empty() {
        id.push_str("unknown");
    }
    id
}

pub fn subject(host: &str) -> String {
    format!("{SUBJECT_PREFIX}{host}")
}

pub fn msg_id(m: &Message) -> String {
    format!("{}.{}.{}", m.host, m.run, m.seq)
}

/// An endpoint directory key (see [`ENDPOINTS_BUCKET`]).
pub fn endpoint_key(host: &str, proto: &str, ip: IpAddr, port: u16) -> String {
    let a: String = ip
        .to_string()
        .chars()
        .map(|c| if c == '.' || c == ':' { '-' } else { c })
        .collect();
    format!("{host}.{proto}.{a}.{port}")
}

/// An endpoint directory value: a listener and its owner's tags.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub schema: u32,
    pub host: String,
    pub network: String,
    pub proto: String,
    pub ip: IpAddr,
    pub port: u16,
    pub tags: BTreeMap<String, String>,
}

/// A presence value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Presence {
    pub schema: u32,
    pub host: String,
    pub network: String,
    pub addresses: Vec<IpAddr>,
    pub run: u64,
    /// Unix ns of the agent's clock when written.
    pub at_ns: u64,
}

/// Checks one message as it came off the stream: size, JSON, schema, that
/// the subject's host is the message's, and every field.
pub fn check(
    subject: &str,
    payload: &[u8],
    max_bytes: usize,
    max_rows: usize,
) -> Result<Message, Reject> {
    if payload.len() > max_bytes {
        return Err(Reject::Oversized);
    }
    // The schema first, so that a later format is said as such.
    #[derive(Deserialize)]
    struct Version {
        schema: u32,
    }
    let v: Version = serde_json::from_slice(payload).map_err(|_| Reject::Malformed)?;
    if v.schema != SCHEMA {
        return Err(Reject::Schema);
    }
    let m: Message = serde_json::from_slice(payload).map_err(|_| Reject::Malformed)?;
    if subject.strip_prefix(SUBJECT_PREFIX) != Some(m.host.as_str()) {
        return Err(Reject::HostMismatch);
    }
    if m.rows.len() > max_rows {
        return Err(Reject::TooManyRows);
    }
    let tags_ok = |t: &BTreeMap<String, String>| {
        t.len() <= MAX_TAGS
            && t.iter()
                .all(|(k, v)| !k.is_empty() && k.len() <= MAX_TAG_LEN && v.len() <= MAX_TAG_LEN)
    };
    let ok = valid_id(&m.host)
        && valid_id(&m.network)
        && m.end_ns > m.start_ns
        // At most a day per interval.
        && m.end_ns - m.start_ns <= 86_400_000_000_000
        && m.addresses.len() <= 1024
        && m.rows.iter().all(|r| {
            matches!(r.proto.as_str(), "tcp" | "udp")
                && tags_ok(&r.local.tags)
                && tags_ok(&r.remote.tags)
                && (r.view == View::Local
                    || r.remote.tags.keys().all(|k| {
                        k == flowtable::nat::NAT_IP || k == flowtable::nat::NAT_PORT
                    }))
                && r.first_seen_ns <= r.last_seen_ns
                && [&r.rtt_dst, &r.rtt_src]
                    .iter()
                    .all(|l| l.as_ref().is_none_or(|l| l.buckets.len() <= MAX_RTT_BUCKETS))
        });
    if !ok {
        return Err(Reject::Invalid);
    }
    Ok(m)
}

/// A remote end keeps only what this host's NAT step said of it: its
/// address beyond a translation here (`nat.ip`, `nat.port`).
fn nat_only(mut e: End, tags: &BTreeMap<String, String>) -> End {
    for k in [flowtable::nat::NAT_IP, flowtable::nat::NAT_PORT] {
        if let Some(v) = tags.get(k) {
            e.tags.insert(k.to_owned(), v.clone());
        }
    }
    e
}

/// A rollup group as a row seen from a host with addresses `local`:
/// `None` when neither end is local (forwarded traffic).
pub fn row_of(a: &Aggregate, is_local: impl Fn(&IpAddr) -> bool) -> Option<Row> {
    let c = &a.conn;
    let (src_local, dst_local) = (is_local(&c.src), is_local(&c.dst));
    let end = |ip, port, tags: &BTreeMap<String, String>| End {
        ip,
        port,
        tags: tags.clone(),
    };
    let bare = |ip, port| End {
        ip,
        port,
        tags: BTreeMap::new(),
    };
    let (view, local, remote) = match (src_local, dst_local) {
        (true, true) => (
            View::Local,
            end(c.src, c.sport, &c.src_tags),
            end(c.dst, c.dport, &c.dst_tags),
        ),
        (true, false) => (
            View::Client,
            end(c.src, c.sport, &c.src_tags),
            nat_only(bare(c.dst, c.dport), &c.dst_tags),
        ),
        (false, true) => (
            View::Server,
            end(c.dst, c.dport, &c.dst_tags),
            nat_only(bare(c.src, c.sport), &c.src_tags),
        ),
        (false, false) => return None,
    };
    Some(Row {
        view,
        proto: c.proto.name().to_owned(),
        local,
        remote,
        conns: a.conns,
        sent: c.sent.clone(),
        received: c.received.clone(),
        first_seen_ns: c.first_seen,
        last_seen_ns: c.last_seen,
        rtt_dst: RttLeg::of(&a.rtt_dst, a.rtt_dst_max),
        rtt_src: RttLeg::of(&a.rtt_src, a.rtt_src_max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn message() -> Message {
        Message {
            schema: SCHEMA,
            host: "a".into(),
            network: "default".into(),
            run: 1,
            seq: 0,
            start_ns: 10,
            end_ns: 20,
            addresses: vec!["10.0.0.1".parse().unwrap()],
            rows: vec![],
            folded: BTreeMap::new(),
            spool_dropped: 0,
        }
    }

    #[test]
    fn every_bad_message_is_rejected_by_reason() {
        let good = serde_json::to_vec(&message()).unwrap();
        let subj = "flowprobe.rows.a";
        assert_eq!(check(subj, &good, 1 << 20, 10).unwrap(), message());
        assert_eq!(check(subj, &good, 10, 10), Err(Reject::Oversized));
        assert_eq!(
            check(subj, b"{\"schema\":1,", 1 << 20, 10),
            Err(Reject::Malformed)
        );
        assert_eq!(check(subj, b"[1,2]", 1 << 20, 10), Err(Reject::Malformed));
        assert_eq!(
            check(subj, br#"{"schema":2}"#, 1 << 20, 10),
            Err(Reject::Schema)
        );
        assert_eq!(
            check(subj, br#"{"schema":1}"#, 1 << 20, 10),
            Err(Reject::Malformed)
        );
        assert_eq!(
            check("flowprobe.rows.b", &good, 1 << 20, 10),
            Err(Reject::HostMismatch)
        );
        let mut m = message();
        m.start_ns = 20;
        let bad = serde_json::to_vec(&m).unwrap();
        assert_eq!(check(subj, &bad, 1 << 20, 10), Err(Reject::Invalid));
        let mut m = message();
        m.host = "a.b".into();
        let bad = serde_json::to_vec(&m).unwrap();
        assert_eq!(
            check("flowprobe.rows.a.b", &bad, 1 << 20, 10),
            Err(Reject::Invalid)
        );
        let mut m = message();
        let row = Row {
            view: View::Client,
            proto: "tcp".into(),
            local: End {
                ip: "10.0.0.1".parse().unwrap(),
                port: 1024,
                tags: BTreeMap::new(),
            },
            remote: End {
                ip: "10.0.0.2".parse().unwrap(),
                port: 80,
                tags: BTreeMap::new(),
            },
            conns: 1,
            sent: DirStats::default(),
            received: DirStats::default(),
            first_seen_ns: 1,
            last_seen_ns: 2,
            rtt_dst: None,
            rtt_src: None,
        };
        m.rows = vec![row.clone(); 11];
        let bad = serde_json::to_vec(&m).unwrap();
        assert_eq!(check(subj, &bad, 1 << 20, 10), Err(Reject::TooManyRows));
        let mut r = row;
        r.proto = "sctp".into();
        m.rows = vec![r];
        let bad = serde_json::to_vec(&m).unwrap();
        assert_eq!(check(subj, &bad, 1 << 20, 10), Err(Reject::Invalid));
    }

    #[test]
    fn ids() {
        assert_eq!(host_id_of("web-1.example.com"), "web-1_example_com");
        assert!(valid_id("web-1_example_com"));
        assert!(!valid_id("a.b") && !valid_id("") && !valid_id("*") && !valid_id(">"));
        assert_eq!(
            endpoint_key("h", "tcp", "fd00::1".parse().unwrap(), 80),
            "h.tcp.fd00--1.80"
        );
    }
}
