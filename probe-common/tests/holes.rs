//! The tracker's holes against random one-direction streams: a tap that
//! misses some segments (dropped before it, as on a veth whose XDP ring is
//! full), sees their retransmissions later in any order, sometimes dropped
//! again, and now and then a second copy of a segment. Whatever the order,
//! the first copy of a segment the tap sees is new data, never a
//! retransmission (the claim `tcp::Holes` makes), and a second copy of a
//! segment outside every hole is one.

use std::collections::HashSet;

use probe_common::parse::{tcp_flags as f, TcpHeader};
use probe_common::tcp::{track, Holes, Peer, Segment, TcpDir, VerdictKind as K};

const MSS: u32 = 1000;

/// xorshift64: the same streams on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.next() % 100 < pct
    }
}

/// The tap's side: the tracker, and what it has seen.
struct Tap {
    d: TcpDir,
    holes: Holes,
    seen: HashSet<u32>,
    log: Vec<String>,
}

impl Tap {
    /// Segment `i` (`[1 + i·MSS, 1 + (i+1)·MSS)`) reaches the tap.
    fn see(&mut self, i: u32) -> (bool, K, u32) {
        let seg = Segment {
            hdr: TcpHeader {
                seq: 1 + i * MSS,
                ack: 1,
                flags: f::ACK,
                window: 100,
            },
            payload_len: MSS,
        };
        // The reverse direction is never seen (XDP on one interface).
        let v = track(&seg, &mut self.d, &mut self.holes, Peer::default);
        let first = self.seen.insert(i);
        self.log.push(format!(
            "{i}: {:?} {} holes {:?} flags {:#x} snd_max {}",
            v.kind, v.retransmitted_bytes, self.holes, self.d.flags, self.d.snd_max
        ));
        (first, v.kind, v.retransmitted_bytes)
    }
}

#[test]
fn first_copies_behind_drops_are_new_in_any_order() {
    for seed in 1..3000u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut tap = Tap {
            d: TcpDir::default(),
            holes: Holes::default(),
            seen: HashSet::new(),
            log: Vec::new(),
        };
        // Sent but never seen, to be retransmitted.
        let mut lost: Vec<u32> = Vec::new();
        let mut next = 0u32;
        for _ in 0..200 {
            let i = if next > 2 && rng.chance(5) {
                // A copy of a segment sent before, unless it is lost.
                let i = (rng.next() % next as u64) as u32;
                if lost.contains(&i) {
                    continue;
                }
                i
            } else if !lost.is_empty() && rng.chance(30) {
                lost.remove((rng.next() % lost.len() as u64) as usize)
            } else {
                next += 1;
                next - 1
            };
            // The first segment (the connection's start) always arrives.
            if i > 0 && rng.chance(20) {
                lost.push(i);
                continue;
            }
            // In an open hole before the tracker sees it (a merged hole
            // also covers seen data: a copy there counts as new).
            let s = 1 + i * MSS;
            let in_hole = tap
                .holes
                .iter()
                .zip([TcpDir::FLAG_HOLE, TcpDir::FLAG_HOLE1])
                .any(|(&[lo, hi], flag)| tap.d.flags & flag != 0 && lo <= s && s < hi);
            let (first, kind, retx_bytes) = tap.see(i);
            assert!(
                !first || (kind == K::New && retx_bytes == 0),
                "seed {seed}: the first copy of {i} was {kind:?}\n{}",
                tap.log.join("\n")
            );
            assert!(
                first || kind == K::Retransmit || in_hole,
                "seed {seed}: a second copy of {i}, outside every hole, was {kind:?}\n{}",
                tap.log.join("\n")
            );
        }
    }
}

#[test]
fn a_hole_never_filled_does_not_swallow_later_gaps_as_the_stream_wraps() {
    // One segment lost for good near the start (a tap that missed it, and
    // whose retransmission it missed too), then, all through 5 GB of
    // 1 MB segments, two losses at a time retransmitted a little later: the
    // third gap merges into the old hole, which grows with the stream.
    // Without the peer's ACKs nothing closes it; every first copy must
    // still be new once the stream has gone past 2^31 and 2^32 bytes.
    const BIG: u32 = 1_000_000;
    let mut tap = Tap {
        d: TcpDir::default(),
        holes: Holes::default(),
        seen: HashSet::new(),
        log: Vec::new(),
    };
    let see = |tap: &mut Tap, i: u32| {
        let seg = Segment {
            hdr: TcpHeader {
                seq: 7u32.wrapping_add(i.wrapping_mul(BIG)),
                ack: 1,
                flags: f::ACK,
                window: 100,
            },
            payload_len: BIG,
        };
        let v = track(&seg, &mut tap.d, &mut tap.holes, Peer::default);
        tap.log
            .push(format!("{i}: {:?} holes {:?}", v.kind, tap.holes));
        assert!(
            v.kind == K::New && v.retransmitted_bytes == 0,
            "the only copy of {i} was {v:?}\n{}",
            tap.log[tap.log.len().saturating_sub(20)..].join("\n")
        );
    };
    let mut late = Vec::new();
    for i in 0..5000u32 {
        if i == 1 {
            continue;
        }
        if i % 50 == 10 || i % 50 == 12 {
            late.push(i);
            continue;
        }
        see(&mut tap, i);
        if i % 50 == 15 {
            for j in late.drain(..) {
                see(&mut tap, j);
            }
        }
    }
}
