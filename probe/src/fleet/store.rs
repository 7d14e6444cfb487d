//! The fleet window's compact row store: what a held message costs.
//!
//! A message's rows are packed into one byte buffer ([`Rows`]): per row a
//! flags byte (view, protocol, address families, RTT legs), the two ends'
//! addresses (4 or 16 bytes), ports and tag set ids as LEB128 varints, the
//! counters as varints (most are small), the times (the last as a
//! difference to the first) and each RTT leg's exact `(µs, count)` pairs as
//! the wire carried them (values as differences). An end's tags repeat
//! across rows, intervals and hosts: each distinct tag set is stored once
//! in the window's [`Interner`], counted by the rows that use it and freed
//! with the last of them.
//!
//! Lossless: every field of a checked [`wire::Row`] is read back as it
//! came (the join's answers are those of the rows as parsed), and RTT
//! pairs are the agent's HdrHistogram buckets (two significant digits:
//! within 1 % of the samples, exact below 256 µs), which the join records
//! into each group's histogram as it did before.
//!
//! [`wire::Row`]: crate::export::fleet::wire::Row

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use flowtable::nat::{NAT_IP, NAT_PORT};
use flowtable::DirStats;
use rustc_hash::FxHashMap;

use crate::export::fleet::wire::{Row, RttLeg, View};

pub type Tags = BTreeMap<String, String>;
/// A tag set's id in the [`Interner`]; [`Interner::EMPTY`] is no tags.
pub type TagId = u32;

struct Set {
    tags: Arc<Tags>,
    /// The end's address beyond a NAT on its host (`nat.ip`, `nat.port`).
    nat: (Option<IpAddr>, Option<u16>),
    refs: u64,
}

/// Distinct tag sets, each held once, counted by their users.
pub struct Interner {
    ids: FxHashMap<Arc<Tags>, TagId>,
    sets: Vec<Option<Set>>,
    /// Per id, how many times it was given to a set: an id and its
    /// generation name one set for the window's life.
    gens: Vec<u32>,
    free: Vec<TagId>,
}

impl Default for Interner {
    fn default() -> Interner {
        Interner::new()
    }
}

impl Interner {
    /// No tags: always there, never counted.
    pub const EMPTY: TagId = 0;

    pub fn new() -> Interner {
        let empty = Arc::new(Tags::new());
        let mut ids = FxHashMap::default();
        ids.insert(empty.clone(), Self::EMPTY);
        Interner {
            ids,
            sets: vec![Some(Set {
                tags: empty,
                nat: (None, None),
                refs: 0,
            })],
            gens: vec![0],
            free: Vec::new(),
        }
    }

    /// The id of `t`, taking one reference (give it back with
    /// [`Interner::release`]).
    pub fn intern(&mut self, t: &Tags) -> TagId {
        if t.is_empty() {
            return Self::EMPTY;
        }
        if let Some(&id) = self.ids.get(t) {
            if let Some(s) = &mut self.sets[id as usize] {
                s.refs += 1;
            }
            return id;
        }
        let tags = Arc::new(t.clone());
        let nat = (
            t.get(NAT_IP).and_then(|v| v.parse().ok()),
            t.get(NAT_PORT).and_then(|v| v.parse().ok()),
        );
        let set = Set {
            tags: tags.clone(),
            nat,
            refs: 1,
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.sets[id as usize] = Some(set);
                self.gens[id as usize] = self.gens[id as usize].wrapping_add(1);
                id
            }
            None => {
                self.sets.push(Some(set));
                self.gens.push(0);
                (self.sets.len() - 1) as TagId
            }
        };
        self.ids.insert(tags, id);
        id
    }

    /// Gives back one reference; the set goes with its last.
    pub fn release(&mut self, id: TagId) {
        if id == Self::EMPTY {
            return;
        }
        let Some(slot) = self.sets.get_mut(id as usize) else {
            return;
        };
        let gone = match slot {
            Some(s) => {
                s.refs = s.refs.saturating_sub(1);
                s.refs == 0
            }
            None => false,
        };
        if gone {
            if let Some(s) = slot.take() {
                self.ids.remove(&*s.tags);
            }
            self.free.push(id);
        }
    }

    fn set(&self, id: TagId) -> Option<&Set> {
        self.sets.get(id as usize).and_then(Option::as_ref)
    }

    /// The tags of `id` (none for an id not held).
    pub fn get(&self, id: TagId) -> &Tags {
        match self.set(id) {
            Some(s) => &s.tags,
            None => self.sets[0].as_ref().map(|s| &*s.tags).expect("EMPTY"),
        }
    }

    /// How many sets had `id` before the one it names now.
    pub fn generation(&self, id: TagId) -> u32 {
        self.gens.get(id as usize).copied().unwrap_or(0)
    }

    /// `nat.ip` and `nat.port` of `id`, parsed.
    pub fn nat(&self, id: TagId) -> (Option<IpAddr>, Option<u16>) {
        self.set(id).map_or((None, None), |s| s.nat)
    }

    /// Distinct tag sets held (without the empty one).
    pub fn count(&self) -> usize {
        self.ids.len() - 1
    }
}

/// One end of a packed row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PEnd {
    pub ip: IpAddr,
    pub port: u16,
    pub tags: TagId,
}

/// One RTT leg of a packed row: the exact max and the `(µs, count)` pairs.
#[derive(Clone, Copy, Debug)]
pub struct Leg<'a> {
    pub max_us: u64,
    n: u64,
    bytes: &'a [u8],
}

impl Leg<'_> {
    /// The pairs, in the order the wire had them.
    pub fn pairs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut r = Reader(self.bytes);
        let mut prev = 0u64;
        (0..self.n).map(move |_| {
            prev = prev.wrapping_add(r.varint());
            (prev, r.varint())
        })
    }
}

/// A packed row, read back.
#[derive(Clone, Debug)]
pub struct Packed<'a> {
    pub view: View,
    pub udp: bool,
    pub local: PEnd,
    pub remote: PEnd,
    pub conns: u64,
    pub sent: DirStats,
    pub received: DirStats,
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub rtt_dst: Option<Leg<'a>>,
    pub rtt_src: Option<Leg<'a>>,
}

const VIEW_MASK: u8 = 0b11;
const UDP: u8 = 1 << 2;
const LOCAL_V6: u8 = 1 << 3;
const REMOTE_V6: u8 = 1 << 4;
const RTT_DST: u8 = 1 << 5;
const RTT_SRC: u8 = 1 << 6;

/// A message's rows, packed (see the module's doc).
#[derive(Debug, Default)]
pub struct Rows {
    buf: Box<[u8]>,
    len: u32,
}

impl Rows {
    /// Packs `rows` (checked by `wire::check`: `tcp` or `udp`), interning
    /// their tags.
    pub fn pack(rows: &[Row], tags: &mut Interner) -> Rows {
        let mut b = Vec::with_capacity(rows.len() * 64);
        for r in rows {
            let view = match r.view {
                View::Client => 0,
                View::Server => 1,
                View::Local => 2,
            };
            let mut flags = view;
            if r.proto == "udp" {
                flags |= UDP;
            }
            if r.local.ip.is_ipv6() {
                flags |= LOCAL_V6;
            }
            if r.remote.ip.is_ipv6() {
                flags |= REMOTE_V6;
            }
            if r.rtt_dst.is_some() {
                flags |= RTT_DST;
            }
            if r.rtt_src.is_some() {
                flags |= RTT_SRC;
            }
            b.push(flags);
            for e in [&r.local, &r.remote] {
                match e.ip {
                    IpAddr::V4(a) => b.extend_from_slice(&a.octets()),
                    IpAddr::V6(a) => b.extend_from_slice(&a.octets()),
                }
                put(&mut b, u64::from(e.port));
                put(&mut b, u64::from(tags.intern(&e.tags)));
            }
            put(&mut b, r.conns);
            for d in [&r.sent, &r.received] {
                for v in [
                    d.packets,
                    d.bytes,
                    d.l3_bytes,
                    d.retransmits(),
                    d.retransmitted_bytes(),
                    d.probes(),
                    d.gaps(),
                ] {
                    put(&mut b, v);
                }
            }
            put(&mut b, r.first_seen_ns);
            // Checked: first ≤ last.
            put(&mut b, r.last_seen_ns.wrapping_sub(r.first_seen_ns));
            for l in [&r.rtt_dst, &r.rtt_src].into_iter().flatten() {
                put_leg(&mut b, l);
            }
        }
        Rows {
            buf: b.into_boxed_slice(),
            len: rows.len() as u32,
        }
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the packed rows take.
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = Packed<'_>> + '_ {
        let mut r = Reader(&self.buf);
        (0..self.len).map(move |_| r.row())
    }

    /// Gives back the rows' tag references (before dropping them).
    pub fn release(&self, tags: &mut Interner) {
        if self.is_empty() {
            return;
        }
        for p in self.iter() {
            tags.release(p.local.tags);
            tags.release(p.remote.tags);
        }
    }
}

fn put_leg(b: &mut Vec<u8>, l: &RttLeg) {
    put(b, l.max_us);
    put(b, l.buckets.len() as u64);
    let mut prev = 0u64;
    for &(v, n) in &l.buckets {
        put(b, v.wrapping_sub(prev));
        put(b, n);
        prev = v;
    }
}

/// LEB128.
fn put(b: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        b.push((v as u8) | 0x80);
        v >>= 7;
    }
    b.push(v as u8);
}

/// Reads what [`Rows::pack`] wrote; past the end it reads zeros (it
/// cannot be, the bytes are ours), never panics.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&x, rest)) => {
                self.0 = rest;
                x
            }
            None => 0,
        }
    }

    fn varint(&mut self) -> u64 {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let x = self.byte();
            if shift < 64 {
                v |= u64::from(x & 0x7f) << shift;
            }
            if x & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.0.len());
        a[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        a
    }

    fn end(&mut self, v6: bool) -> PEnd {
        let ip = if v6 {
            IpAddr::from(self.array::<16>())
        } else {
            IpAddr::from(self.array::<4>())
        };
        PEnd {
            ip,
            port: self.varint() as u16,
            tags: self.varint() as TagId,
        }
    }

    fn dir(&mut self) -> DirStats {
        let d = DirStats::counts(self.varint(), self.varint(), self.varint());
        d.with_loss(flowtable::Loss {
            retransmits: self.varint(),
            retransmitted_bytes: self.varint(),
            probes: self.varint(),
            gaps: self.varint(),
        })
    }

    fn leg(&mut self) -> Leg<'a> {
        let max_us = self.varint();
        let n = self.varint();
        let start = self.0;
        for _ in 0..n {
            self.varint();
            self.varint();
        }
        let used = start.len() - self.0.len();
        Leg {
            max_us,
            n,
            bytes: &start[..used],
        }
    }

    fn row(&mut self) -> Packed<'a> {
        let flags = self.byte();
        let view = match flags & VIEW_MASK {
            0 => View::Client,
            1 => View::Server,
            _ => View::Local,
        };
        let local = self.end(flags & LOCAL_V6 != 0);
        let remote = self.end(flags & REMOTE_V6 != 0);
        let conns = self.varint();
        let sent = self.dir();
        let received = self.dir();
        let first_seen_ns = self.varint();
        let last_seen_ns = first_seen_ns.wrapping_add(self.varint());
        let rtt_dst = (flags & RTT_DST != 0).then(|| self.leg());
        let rtt_src = (flags & RTT_SRC != 0).then(|| self.leg());
        Packed {
            view,
            udp: flags & UDP != 0,
            local,
            remote,
            conns,
            sent,
            received,
            first_seen_ns,
            last_seen_ns,
            rtt_dst,
            rtt_src,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::fleet::wire::End;
    use flowtable::new_histogram;

    fn tags(kv: &[(&str, &str)]) -> Tags {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn interner_holds_each_set_once_and_frees_it_with_its_last_user() {
        let mut i = Interner::new();
        let a = tags(&[("service", "api"), ("process", "x")]);
        let b = tags(&[("service", "db")]);
        assert_eq!(i.intern(&Tags::new()), Interner::EMPTY);
        let ia = i.intern(&a);
        let ib = i.intern(&b);
        assert_eq!(i.intern(&a.clone()), ia);
        assert_ne!(ia, ib);
        assert_eq!(i.count(), 2);
        assert_eq!(i.get(ia), &a);
        assert_eq!(i.get(ib), &b);
        // a has two users: one release keeps it.
        i.release(ia);
        assert_eq!(i.get(ia), &a);
        i.release(ia);
        assert_eq!(i.count(), 1);
        assert!(i.get(ia).is_empty());
        // Its id is used again, in a new generation; b is untouched.
        let c = tags(&[(NAT_IP, "10.0.0.9"), (NAT_PORT, "8080")]);
        assert_eq!(i.generation(ia), 0);
        let ic = i.intern(&c);
        assert_eq!(ic, ia);
        assert_eq!(i.generation(ic), 1);
        assert_eq!(i.nat(ic), (Some("10.0.0.9".parse().unwrap()), Some(8080)));
        assert_eq!(i.get(ib), &b);
        i.release(ib);
        i.release(ic);
        i.release(Interner::EMPTY);
        assert_eq!(i.count(), 0);
        assert_eq!(i.get(Interner::EMPTY), &Tags::new());
    }

    fn row(i: u64) -> Row {
        let d = |x: u64| {
            DirStats::counts(x, x * 1000 + 7, x * 1052).with_loss(flowtable::Loss {
                retransmits: x % 3,
                retransmitted_bytes: u64::MAX - x,
                probes: 1,
                gaps: 0,
            })
        };
        Row {
            view: [View::Client, View::Server, View::Local][(i % 3) as usize],
            proto: if i.is_multiple_of(2) { "tcp" } else { "udp" }.into(),
            local: End {
                ip: if i.is_multiple_of(4) {
                    "fd00::1".parse().unwrap()
                } else {
                    "10.0.0.1".parse().unwrap()
                },
                port: 1024,
                tags: tags(&[("service", "api")]),
            },
            remote: End {
                ip: "192.0.2.9".parse().unwrap(),
                port: (i * 977) as u16,
                tags: if i.is_multiple_of(5) {
                    tags(&[(NAT_IP, "10.0.0.2")])
                } else {
                    Tags::new()
                },
            },
            conns: i,
            sent: d(i),
            received: d(i * 31),
            first_seen_ns: 1_800_000_000_000_000_000 + i,
            last_seen_ns: 1_800_000_000_000_000_000 + i * i,
            rtt_dst: (i % 2 == 1).then(|| RttLeg {
                max_us: 1000 + i,
                buckets: vec![(100, 3), (250, i), (1_000_000, 1)],
            }),
            rtt_src: (i % 3 == 1).then(|| RttLeg {
                max_us: 9,
                buckets: vec![(9, 1)],
            }),
        }
    }

    /// Every field comes back as it went in.
    #[test]
    fn rows_read_back_exactly() {
        let mut i = Interner::new();
        let rows: Vec<Row> = (0..50).map(row).collect();
        let p = Rows::pack(&rows, &mut i);
        assert_eq!(p.len(), 50);
        let back: Vec<Row> = p
            .iter()
            .map(|x| {
                let leg = |l: Option<Leg<'_>>| {
                    l.map(|l| RttLeg {
                        max_us: l.max_us,
                        buckets: l.pairs().collect(),
                    })
                };
                Row {
                    view: x.view,
                    proto: if x.udp { "udp" } else { "tcp" }.into(),
                    local: End {
                        ip: x.local.ip,
                        port: x.local.port,
                        tags: i.get(x.local.tags).clone(),
                    },
                    remote: End {
                        ip: x.remote.ip,
                        port: x.remote.port,
                        tags: i.get(x.remote.tags).clone(),
                    },
                    conns: x.conns,
                    sent: x.sent,
                    received: x.received,
                    first_seen_ns: x.first_seen_ns,
                    last_seen_ns: x.last_seen_ns,
                    rtt_dst: leg(x.rtt_dst),
                    rtt_src: leg(x.rtt_src),
                }
            })
            .collect();
        assert_eq!(back, rows);
        assert_eq!(i.count(), 2);
        p.release(&mut i);
        assert_eq!(i.count(), 0);
    }

    /// The RTT pairs are the agent's HdrHistogram buckets: recorded back,
    /// p50/p90/p99 are those of the agent's histogram, within 1 % of the
    /// exact percentiles of the samples (two significant digits), and the
    /// max is exact.
    #[test]
    fn rtt_pairs_keep_percentiles_within_one_percent() {
        // A small deterministic generator: log-uniform 50 µs .. 5 s.
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..20 {
            // At most 500 samples: within the wire's 512 pairs uncut.
            let n = 100 + (next() % 400) as usize;
            let mut samples: Vec<u64> = (0..n)
                .map(|_| {
                    let f = (next() % 1_000_000) as f64 / 1e6;
                    (50.0 * 1e5f64.powf(f)) as u64
                })
                .collect();
            let mut h = new_histogram();
            for &v in &samples {
                h.record(v).unwrap();
            }
            let max = *samples.iter().max().unwrap();
            let buckets: Vec<(u64, u64)> = h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect();
            // The wire's bound, as the agent's RttLeg::of would cut it.
            assert!(buckets.len() <= crate::export::fleet::wire::MAX_RTT_BUCKETS);
            let leg = RttLeg {
                max_us: max,
                buckets,
            };
            let row = Row {
                rtt_dst: Some(leg),
                ..self::row(0)
            };
            let mut i = Interner::new();
            let p = Rows::pack(std::slice::from_ref(&row), &mut i);
            let back = p.iter().next().unwrap().rtt_dst.unwrap();
            assert_eq!(back.max_us, max);
            let mut g = new_histogram();
            for (v, c) in back.pairs() {
                g.record_n(v, c).unwrap();
            }
            samples.sort_unstable();
            for q in [0.5, 0.9, 0.99] {
                assert_eq!(
                    g.value_at_quantile(q),
                    h.value_at_quantile(q),
                    "{round} {q}"
                );
                // The exact percentile: the sample of rank ⌈q·n⌉.
                let rank = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
                let exact = samples[rank] as f64;
                let got = g.value_at_quantile(q) as f64;
                assert!(
                    (got - exact).abs() <= exact * 0.01,
                    "round {round} q {q}: {got} vs exact {exact}"
                );
            }
        }
    }
}
