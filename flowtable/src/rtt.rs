//! Round-trip times as seen at the capture point, from packet timestamps.
//!
//! A segment that passes the capture point in one direction and the ACK
//! that covers it coming back measure the round trip from the capture point
//! to that direction's receiver and back (its *leg*). On the client host the
//! `dst` leg is the whole network RTT the client sees and the `src` leg is
//! the client's own stack delay; on a gateway the two legs add up to the
//! end-to-end RTT.
//!
//! Timing follows classic BSD RTT timing: one timed segment per direction at
//! a time, so the state is O(1) per direction. Karn's rule: when a direction
//! retransmits anything while its segment is timed, the timing is dropped
//! (the ACK could answer either copy, and a retransmitted hole below the
//! timed segment delays the cumulative ACK). The SYN and the SYN/ACK are
//! timed like data, so each leg's first sample is its handshake RTT:
//! SYN → SYN/ACK for `dst`, SYN/ACK → ACK for `src`.
//!
//! Samples are whole microseconds (rounded to nearest) in an
//! [`hdrhistogram`] with two significant digits: percentiles are within 1 %,
//! and values below 256 µs are exact. The maximum and the handshake sample
//! are kept exactly beside it.

use hdrhistogram::Histogram;
use probe_common::parse::tcp_flags;
use probe_common::tcp::{seq_after, Segment, Verdict, VerdictKind};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

/// Significant decimal digits of every RTT histogram.
const SIGFIG: u8 = 2;

/// A new, empty histogram of microseconds. Auto-resizing, so a connection
/// with sub-millisecond samples only holds the few buckets it needs.
/// An empty histogram of RTT microseconds, as every leg and row uses.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("2 significant digits are within hdrhistogram's range")
}

/// Samples a leg keeps inline before it needs a histogram: most
/// connections are short, and a histogram costs kilobytes.
const INLINE: usize = 8;

/// Microseconds; a sample beyond `u32::MAX` µs (71 minutes) is kept as that.
#[derive(Clone, Debug, PartialEq)]
enum Samples {
    Few { len: u8, v: [u32; INLINE] },
    Many(Box<Histogram<u64>>),
}

impl Default for Samples {
    fn default() -> Samples {
        Samples::Few {
            len: 0,
            v: [0; INLINE],
        }
    }
}

/// Records into an auto-resizing histogram. `record` grows it and fails
/// only beyond i64::MAX / 2, where clamping is harmless
/// (`saturating_record` alone would never grow it).
fn record(h: &mut Histogram<u64>, v: u64) {
    if h.record(v).is_err() {
        h.saturating_record(v);
    }
}

/// The RTT samples of one leg.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RttLeg {
    /// The first sample, when it timed a SYN or SYN/ACK (handshake RTT).
    pub handshake_us: Option<u64>,
    /// Exact largest sample.
    pub max_us: u64,
    count: u64,
    samples: Samples,
}

impl Eq for RttLeg {}

impl RttLeg {
    /// A leg with its handshake sample only: what the kernel's entry keeps
    /// (`probe_common::handshake`).
    pub fn handshake(us: u64) -> RttLeg {
        let mut l = RttLeg::default();
        l.record(us, true);
        l
    }

    /// Number of samples, the handshake included.
    pub fn samples(&self) -> u64 {
        self.count
    }

    fn record(&mut self, us: u64, handshake: bool) {
        if handshake && self.count == 0 {
            self.handshake_us = Some(us);
        }
        self.max_us = self.max_us.max(us);
        self.count += 1;
        match &mut self.samples {
            Samples::Few { len, v } if (*len as usize) < INLINE => {
                v[*len as usize] = us.min(u32::MAX as u64) as u32;
                *len += 1;
            }
            Samples::Few { v, .. } => {
                let mut h = new_histogram();
                v.iter().for_each(|&x| record(&mut h, x as u64));
                record(&mut h, us);
                self.samples = Samples::Many(Box::new(h));
            }
            Samples::Many(h) => record(h, us),
        }
    }

    /// Adds this leg's samples to `hist` (for a query row). The handshake is
    /// per connection, so it is not merged.
    pub fn merge_into(&self, hist: &mut Histogram<u64>, max_us: &mut u64) {
        match &self.samples {
            Samples::Few { len, v } => v[..*len as usize]
                .iter()
                .for_each(|&x| record(hist, x as u64)),
            // Both auto-resize, so adding cannot run out of range.
            Samples::Many(h) => {
                let _ = hist.add(&**h);
            }
        }
        if self.count > 0 {
            *max_us = (*max_us).max(self.max_us);
        }
    }

    /// Percentiles of this leg alone, as a row of one connection would
    /// report them.
    pub fn percentiles(&self) -> Percentiles {
        let mut h = new_histogram();
        let mut max = 0;
        self.merge_into(&mut h, &mut max);
        Percentiles::of(Some(&h), max)
    }
}

/// RTT of a connection: the leg towards the responder (`dst`, timed on
/// `sent` segments) and towards the initiator (`src`, timed on `received`
/// segments).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rtt {
    pub dst: RttLeg,
    pub src: RttLeg,
}

/// A connection's round-trip times as its record holds them. The kernel
/// keeps the two handshake samples only, and a live reading lists every
/// connection at every tick: those stay inline (boxed, they took 160 bytes
/// per listed connection, twice over while a reading replaced the last);
/// a userspace table's samples are boxed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Rtts {
    #[default]
    None,
    /// Handshake samples (µs, at most `u32::MAX`) of the `dst` and `src`
    /// legs; one at least.
    Handshake([Option<u32>; 2]),
    Full(Box<Rtt>),
}

impl Rtts {
    /// The handshake samples of the `dst` and `src` legs (µs), if any.
    pub fn handshake(dst: Option<u64>, src: Option<u64>) -> Rtts {
        let us = |v: Option<u64>| v.map(|v| v.min(u32::MAX as u64) as u32);
        match (dst, src) {
            (None, None) => Rtts::None,
            _ => Rtts::Handshake([us(dst), us(src)]),
        }
    }

    pub fn full(r: Option<Rtt>) -> Rtts {
        r.map_or(Rtts::None, |r| Rtts::Full(Box::new(r)))
    }

    pub fn is_none(&self) -> bool {
        matches!(self, Rtts::None)
    }

    /// The samples as an [`Rtt`] (the handshake's made on the spot, with
    /// no allocation).
    pub fn get(&self) -> Option<std::borrow::Cow<'_, Rtt>> {
        use std::borrow::Cow;
        let leg =
            |v: Option<u32>| v.map_or_else(RttLeg::default, |us| RttLeg::handshake(us.into()));
        match self {
            Rtts::None => None,
            Rtts::Handshake([dst, src]) => Some(Cow::Owned(Rtt {
                dst: leg(*dst),
                src: leg(*src),
            })),
            Rtts::Full(r) => Some(Cow::Borrowed(r)),
        }
    }

    /// Swaps the legs: the connection's ends were turned round.
    pub fn turn(&mut self) {
        match self {
            Rtts::None => {}
            Rtts::Handshake(legs) => legs.swap(0, 1),
            Rtts::Full(r) => std::mem::swap(&mut r.src, &mut r.dst),
        }
    }
}

impl Serialize for Rtts {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.get() {
            Some(r) => r.serialize(s),
            None => s.serialize_none(),
        }
    }
}

impl Serialize for RttLeg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("RttLeg", 6)?;
        st.serialize_field("handshake_us", &self.handshake_us)?;
        let p = self.percentiles();
        st.serialize_field("samples", &p.samples)?;
        st.serialize_field("p50_us", &p.p50)?;
        st.serialize_field("p90_us", &p.p90)?;
        st.serialize_field("p99_us", &p.p99)?;
        st.serialize_field("max_us", &p.max)?;
        st.end()
    }
}

/// What a report shows of a histogram; all `None` without samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Percentiles {
    pub samples: u64,
    pub p50: Option<u64>,
    pub p90: Option<u64>,
    pub p99: Option<u64>,
    pub max: Option<u64>,
}

impl Percentiles {
    pub fn of(h: Option<&Histogram<u64>>, exact_max: u64) -> Percentiles {
        match h {
            Some(h) if !h.is_empty() => {
                // hdrhistogram answers with the top of a bucket, which can
                // lie above every sample; the exact maximum bounds it.
                let q = |q: f64| Some(h.value_at_quantile(q).min(exact_max));
                Percentiles {
                    samples: h.len(),
                    p50: q(0.50),
                    p90: q(0.90),
                    p99: q(0.99),
                    max: Some(exact_max),
                }
            }
            _ => Percentiles::default(),
        }
    }
}

/// The one segment a direction has in flight under timing.
#[derive(Clone, Copy, Debug)]
struct Timed {
    /// Sequence end (`seq + len + SYN + FIN`) an ACK must reach.
    end: u32,
    ts_ns: u64,
    syn: bool,
}

/// Per-connection timing state, indexed by direction like `FlowEntry::tcp`.
/// The samples sit behind a box made at the first one, so that the flow
/// table's entries stay small (they are what every packet touches).
#[derive(Clone, Debug, Default)]
pub(crate) struct RttTimer {
    timed: [Option<Timed>; 2],
    legs: Option<Box<[RttLeg; 2]>>,
}

impl RttTimer {
    /// One TCP segment sent in direction `dir` at `ts_ns`, with the
    /// tracker's verdict on it.
    pub(crate) fn observe(&mut self, dir: usize, ts_ns: u64, seg: &Segment, v: &Verdict) {
        let h = &seg.hdr;
        if v.kind == VerdictKind::Reset {
            // An RST's ACK field says nothing about when data arrived.
            return;
        }
        let back = 1 - dir;
        if h.flags & tcp_flags::ACK != 0 {
            if let Some(t) = self.timed[back] {
                if !seq_after(t.end, h.ack) {
                    let us = (ts_ns.saturating_sub(t.ts_ns) + 500) / 1000;
                    self.legs.get_or_insert_with(Default::default)[back].record(us, t.syn);
                    self.timed[back] = None;
                }
            }
        }
        let syn = h.flags & tcp_flags::SYN != 0;
        let fin = h.flags & tcp_flags::FIN != 0;
        if v.kind == VerdictKind::Retransmit || v.retransmitted_bytes > 0 {
            // Karn: no sample across a retransmission.
            self.timed[dir] = None;
        } else if v.kind == VerdictKind::New
            && (seg.payload_len > 0 || syn || fin)
            && self.timed[dir].is_none()
        {
            let end = h
                .seq
                .wrapping_add(seg.payload_len)
                .wrapping_add(syn as u32)
                .wrapping_add(fin as u32);
            self.timed[dir] = Some(Timed { end, ts_ns, syn });
        }
    }

    /// The samples, oriented from the initiator (direction `initiator`).
    pub(crate) fn rtt(&self, initiator: usize) -> Option<Rtt> {
        let legs = self.legs.as_ref()?;
        Some(Rtt {
            dst: legs[initiator].clone(),
            src: legs[1 - initiator].clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::parse::TcpHeader;
    use probe_common::tcp::{track, Peer, TcpDir};

    const SYN: u8 = tcp_flags::SYN;
    const SA: u8 = tcp_flags::SYN | tcp_flags::ACK;
    const ACK: u8 = tcp_flags::ACK;

    /// Runs `(dir, ts_us, flags, seq, ack, len)` segments through the real
    /// tracker and the timer.
    fn run(segs: &[(usize, u64, u8, u32, u32, u32)]) -> RttTimer {
        let mut dirs = [TcpDir::default(); 2];
        let mut holes: [probe_common::tcp::Holes; 2] = Default::default();
        let mut t = RttTimer::default();
        for &(dir, us, flags, seq, ack, len) in segs {
            let seg = Segment {
                hdr: TcpHeader {
                    seq,
                    ack,
                    flags,
                    window: 1000,
                },
                payload_len: len,
            };
            let [d0, d1] = &mut dirs;
            let (d, r) = if dir == 0 { (d0, d1) } else { (d1, d0) };
            let peer = Peer::of(r);
            let v = track(&seg, d, &mut holes[dir], || peer);
            t.observe(dir, us * 1000, &seg, &v);
        }
        t
    }

    /// The samples as the histogram holds them (top of each bucket).
    fn samples(l: &RttLeg) -> Vec<u64> {
        let (mut h, mut max) = (new_histogram(), 0);
        l.merge_into(&mut h, &mut max);
        h.iter_recorded().map(|v| v.value_iterated_to()).collect()
    }

    #[test]
    fn handshake_legs_and_data_samples() {
        let t = run(&[
            (0, 1000, SYN, 100, 0, 0),
            (1, 1150, SA, 900, 101, 0),    // dst leg 150
            (0, 1160, ACK, 101, 901, 0),   // src leg 10
            (0, 1200, ACK, 101, 901, 100), // timed, end 201
            (0, 1210, ACK, 201, 901, 100), // not timed: one at a time
            (1, 1400, ACK, 901, 201, 0),   // dst leg 200
            (1, 1500, ACK, 901, 301, 0),   // nothing timed
            (1, 2000, ACK, 901, 301, 10),  // src leg timed, end 911
            (0, 3000, ACK, 301, 911, 0),   // src leg 1000
        ]);
        let r = t.rtt(0).unwrap();
        assert_eq!(r.dst.handshake_us, Some(150));
        assert_eq!(r.src.handshake_us, Some(10));
        assert_eq!(samples(&r.dst), vec![150, 200]);
        // 1000 µs lies in a 4-µs bucket at two significant digits.
        assert_eq!(samples(&r.src), vec![10, 1003]);
        assert_eq!(r.dst.max_us, 200);
        let p = r.src.percentiles();
        assert_eq!((p.samples, p.p50, p.max), (2, Some(10), Some(1000)));
        // Never above the exact maximum, though its bucket reaches 1003.
        assert_eq!(p.p99, Some(1000));
    }

    #[test]
    fn karn_no_sample_across_a_retransmission() {
        let t = run(&[
            (0, 1000, SYN, 100, 0, 0),
            (0, 2000, SYN, 100, 0, 0), // SYN retransmitted: no handshake sample
            (1, 2100, SA, 900, 101, 0),
            (0, 2110, ACK, 101, 901, 0),
            (0, 3000, ACK, 101, 901, 100),
            (0, 3500, ACK, 101, 901, 100), // retransmitted: timing dropped
            (1, 3600, ACK, 901, 201, 0),
            (0, 3700, ACK, 201, 901, 50), // timed again
            (1, 3730, ACK, 901, 251, 0),
        ]);
        let r = t.rtt(0).unwrap();
        assert_eq!(r.dst.handshake_us, None);
        assert_eq!(samples(&r.dst), vec![30]);
        assert_eq!(r.src.handshake_us, Some(10));
    }

    #[test]
    fn many_samples_move_to_a_histogram_unchanged() {
        let mut l = RttLeg::default();
        let mut all = RttLeg::default();
        for i in 0..(INLINE as u64 + 5) {
            l.record(10 + i, i == 0);
            if i < INLINE as u64 {
                all = l.clone();
            }
        }
        assert!(matches!(all.samples, Samples::Few { .. }));
        assert!(matches!(l.samples, Samples::Many(_)));
        assert_eq!(l.samples(), INLINE as u64 + 5);
        assert_eq!(l.handshake_us, Some(10));
        assert_eq!(
            samples(&l),
            (10..10 + INLINE as u64 + 5).collect::<Vec<_>>()
        );
        let p = l.percentiles();
        assert_eq!((p.p50, p.max), (Some(16), Some(22)));
    }

    #[test]
    fn sequence_wrap() {
        let t = run(&[
            (0, 0, SYN, u32::MAX, 0, 0),
            (1, 40, SA, 7, 0, 0), // acks u32::MAX + 1 = 0
            (0, 45, ACK, 0, 8, 0),
            (0, 100, ACK, 0, 8, 100),
            (1, 133, ACK, 8, 100, 0),
        ]);
        let r = t.rtt(0).unwrap();
        assert_eq!((r.dst.handshake_us, r.dst.samples()), (Some(40), 2));
        assert_eq!((r.dst.max_us, r.src.handshake_us), (40, Some(5)));
        // An ACK short of the timed end gives nothing.
        let t = run(&[
            (0, 0, ACK, 10, 1, 100),
            (1, 50, ACK, 1, 109, 0),
            (1, 60, ACK, 1, 110, 0),
        ]);
        assert_eq!(samples(&t.rtt(0).unwrap().dst), vec![60]);
    }

    #[test]
    fn orientation_follows_the_initiator() {
        let t = run(&[(1, 0, SYN, 5, 0, 0), (0, 70, SA, 9, 6, 0)]);
        assert_eq!(t.rtt(1).unwrap().dst.handshake_us, Some(70));
        assert!(run(&[(0, 0, ACK, 1, 1, 0)]).rtt(0).is_none());
    }
}
