//! Tracker cases from TCP-ANALYSIS.md §6.1, one `check` per scenario.
//!
//! Each step is a segment `(dir, seq, ack, flags, len, win)` and the verdict
//! the tracker must give it. Direction 0 is the client (A), 1 the server (B).

use probe_common::parse::{tcp_flags as f, TcpHeader};
use probe_common::tcp::{seq_after, track, Holes, Peer, Segment, TcpDir, VerdictKind as K};
use probe_common::update::{update, Fixed, Updated};
use probe_common::{DirCounters, FlowEntry, FlowKey, L4Proto, Parsed, Plain, Verdict};

const A: usize = 0;
const B: usize = 1;

struct Step {
    dir: usize,
    seq: u32,
    ack: u32,
    flags: u8,
    len: u32,
    win: u16,
    kind: K,
    retx_bytes: u32,
}

#[allow(clippy::too_many_arguments)]
fn s(
    dir: usize,
    seq: u32,
    ack: u32,
    flags: u8,
    len: u32,
    win: u16,
    kind: K,
    retx_bytes: u32,
) -> Step {
    Step {
        dir,
        seq,
        ack,
        flags,
        len,
        win,
        kind,
        retx_bytes,
    }
}

/// Runs the steps through one connection's state; returns both directions'
/// counters so callers can assert totals too.
fn check(steps: &[Step]) -> [DirCounters; 2] {
    let mut st = [TcpDir::default(); 2];
    let mut holes: [Holes; 2] = Default::default();
    let mut c = [DirCounters::default(); 2];
    // The kernel's variant (`update::update` on a map value) runs beside and
    // must agree step by step.
    let mut entry = FlowEntry::default();
    // And the same packets on a host where each crosses two interfaces, its
    // sender's first (interface 1 for direction 0, 2 for direction 1), then
    // the other: counted once each, as on one interface.
    let mut host = FlowEntry::default();
    for (i, step) in steps.iter().enumerate() {
        let seg = Segment {
            hdr: TcpHeader {
                seq: step.seq,
                ack: step.ack,
                flags: step.flags,
                window: step.win,
            },
            payload_len: step.len,
        };
        let [s0, s1] = &mut st;
        let (d, r) = if step.dir == 0 { (s0, s1) } else { (s1, s0) };
        let peer = Peer::of(r);
        let v: Verdict = track(&seg, d, &mut holes[step.dir], || peer);
        assert_eq!(
            (v.kind, v.retransmitted_bytes),
            (step.kind, step.retx_bytes),
            "step {i}: dir {} seq {} len {} flags {:#x}",
            step.dir,
            step.seq,
            step.len,
            step.flags
        );
        c[step.dir].record(1, step.len, step.len + 40, Some(&v));

        let p = Parsed {
            key: FlowKey {
                proto: L4Proto::Tcp as u8,
                ..FlowKey::default()
            },
            l3_len: step.len + 40,
            payload_len: step.len,
            l3_offset: 0,
            tcp: seg.hdr,
            tunnel: 0,
        };
        // SAFETY: a live local, no other writer.
        let how = unsafe {
            update(
                &raw mut entry,
                step.dir,
                1,
                &p.pkt(),
                0,
                &Fixed(0),
                1,
                &Plain,
            )
        };
        assert_eq!(how, Updated::Locked);
        let (first, then) = if step.dir == 0 { (2, 3) } else { (3, 2) };
        for (at, want) in [(first, Updated::Locked), (then, Updated::Elsewhere)] {
            // SAFETY: as above.
            let how = unsafe {
                update(
                    &raw mut host,
                    step.dir,
                    1,
                    &p.pkt(),
                    at,
                    &Fixed(0),
                    1,
                    &Plain,
                )
            };
            assert_eq!(how, want, "step {i} seen at {at}");
        }
        assert_eq!(
            [entry.dir[0].tcp, entry.dir[1].tcp],
            st,
            "step {i}: update::update state differs"
        );
        assert_eq!(
            [entry.dir[0].holes, entry.dir[1].holes],
            holes,
            "step {i}: update::update holes differ"
        );
        assert_eq!(
            [entry.dir[0].lock, entry.dir[1].lock],
            [0, 0],
            "step {i}: lock not released"
        );
    }
    assert_eq!(entry.counters, c, "update::update counts differ");
    assert_eq!(
        host.counters, c,
        "a packet seen at two interfaces counted twice"
    );
    c
}

const W: u16 = 1000;
const SYN: u8 = f::SYN;
const SA: u8 = f::SYN | f::ACK;
const ACK: u8 = f::ACK;
const PA: u8 = f::PSH | f::ACK;
const FA: u8 = f::FIN | f::ACK;

#[test]
fn seq_after_wraps() {
    assert!(seq_after(1, 0));
    assert!(seq_after(0, u32::MAX));
    assert!(seq_after(5, u32::MAX - 5));
    assert!(!seq_after(u32::MAX, 0));
    assert!(!seq_after(7, 7));
}

#[test]
fn handshake_data_and_retransmission() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, ACK, 0, W, K::AckOnly, 0),
        s(A, 101, 501, PA, 1000, W, K::New, 0),
        s(A, 1101, 501, PA, 1000, W, K::New, 0),
        // The first segment is lost downstream and sent again.
        s(A, 101, 501, PA, 1000, W, K::Retransmit, 1000),
        s(B, 501, 2101, ACK, 0, W, K::AckOnly, 0),
    ]);
    assert_eq!(c[A].retransmits, 1);
    assert_eq!(c[A].retransmitted_bytes, 1000);
    assert_eq!(
        c[A].bytes - c[A].retransmitted_bytes,
        2000,
        "what the application wrote"
    );
}

#[test]
fn exact_duplicate_after_ack_is_a_retransmission() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, PA, 100, W, K::New, 0),
        s(B, 501, 201, ACK, 0, W, K::AckOnly, 0),
        s(A, 101, 501, PA, 100, W, K::Retransmit, 100),
    ]);
    assert_eq!((c[A].retransmits, c[A].retransmitted_bytes), (1, 100));
}

#[test]
fn sequence_wrap_new_retransmit_and_overlap() {
    let isn = u32::MAX - 1500;
    let c = check(&[
        s(A, isn, 0, SYN, 0, W, K::New, 0),
        // isn+1 .. isn+1001 (still below 2^32)
        s(A, isn.wrapping_add(1), 0, PA, 1000, W, K::New, 0),
        // crosses the wrap: isn+1001 .. isn+2001 = 499
        s(A, isn.wrapping_add(1001), 0, PA, 1000, W, K::New, 0),
        // entirely after the wrap
        s(A, isn.wrapping_add(2001), 0, PA, 1000, W, K::New, 0),
        // retransmission of the segment that crossed the wrap
        s(
            A,
            isn.wrapping_add(1001),
            0,
            PA,
            1000,
            W,
            K::Retransmit,
            1000,
        ),
        // repacketised: 600 old bytes across the wrap, then 400 new
        s(A, isn.wrapping_add(2401), 0, PA, 1000, W, K::New, 600),
    ]);
    assert_eq!(c[A].retransmits, 1);
    assert_eq!(c[A].retransmitted_bytes, 1600);
    assert_eq!(c[A].bytes - c[A].retransmitted_bytes, 3400);
    assert_eq!(c[A].gaps, 0);
}

#[test]
fn linux_keepalive_and_zero_window_probe_are_not_retransmits() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, PA, 10, W, K::New, 0),
        s(B, 501, 111, ACK, 0, W, K::AckOnly, 0),
        // tcp_xmit_probe_skb(): seq = snd_una - 1, no data
        s(A, 110, 501, ACK, 0, W, K::Probe, 0),
        s(B, 501, 111, ACK, 0, W, K::AckOnly, 0),
        s(A, 110, 501, ACK, 0, W, K::Probe, 0),
        // the peer's window closes; Linux probes the same way
        s(B, 501, 111, ACK, 0, 0, K::AckOnly, 0),
        s(A, 110, 501, ACK, 0, W, K::Probe, 0),
    ]);
    assert_eq!((c[A].probes, c[A].retransmits), (3, 0));
}

#[test]
fn bsd_one_byte_keepalive_only_when_all_acked() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, PA, 10, W, K::New, 0),
        // Not yet acked: the same 1-byte shape is a real retransmission.
        s(A, 110, 501, PA, 1, W, K::Retransmit, 1),
        s(B, 501, 111, ACK, 0, W, K::AckOnly, 0),
        // All acked: garbage byte at snd_max - 1 is a keepalive.
        s(A, 110, 501, ACK, 1, W, K::Probe, 0),
    ]);
    assert_eq!(
        (c[A].probes, c[A].retransmits, c[A].retransmitted_bytes),
        (1, 1, 1)
    );
}

#[test]
fn one_byte_zero_window_probe_then_data() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, PA, 10, W, K::New, 0),
        s(B, 501, 111, ACK, 0, 0, K::AckOnly, 0),
        // 1-byte probe at snd_max while the window is zero: no advance
        s(A, 111, 501, PA, 1, W, K::Probe, 0),
        s(A, 111, 501, PA, 1, W, K::Probe, 0),
        s(B, 501, 111, ACK, 0, W, K::AckOnly, 0),
        // window reopens: the probed byte goes out again as data
        s(A, 111, 501, PA, 100, W, K::New, 0),
    ]);
    assert_eq!((c[A].probes, c[A].retransmits, c[A].gaps), (2, 0, 0));
}

#[test]
fn zero_window_probe_accepted_then_next_byte_is_no_gap() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(A, 101, 501, PA, 10, W, K::New, 0),
        s(B, 501, 111, ACK, 0, 0, K::AckOnly, 0),
        s(A, 111, 501, PA, 1, W, K::Probe, 0),
        // the receiver kept the probe byte; data resumes one byte later
        s(B, 501, 112, ACK, 0, W, K::AckOnly, 0),
        s(A, 112, 501, PA, 100, W, K::New, 0),
    ]);
    assert_eq!(c[A].gaps, 0);
}

#[test]
fn syn_and_fin_retransmissions_count() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 100, 0, SYN, 0, W, K::Retransmit, 0),
        s(B, 500, 101, SA, 0, W, K::New, 0),
        s(B, 500, 101, SA, 0, W, K::Retransmit, 0),
        s(A, 101, 501, PA, 5, W, K::New, 0),
        s(A, 106, 501, FA, 0, W, K::New, 0),
        s(A, 106, 501, FA, 0, W, K::Retransmit, 0),
        // after our FIN, ACKs carry seq = snd_max: not probes
        s(A, 107, 502, ACK, 0, W, K::AckOnly, 0),
    ]);
    assert_eq!((c[A].retransmits, c[B].retransmits), (2, 1));
    assert_eq!(c[A].retransmitted_bytes, 0);
}

#[test]
fn rst_never_moves_state() {
    check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        // an RST with an arbitrary sequence far ahead
        s(A, 900_000, 0, f::RST, 0, W, K::Reset, 0),
        // state unchanged: this is still a retransmission, not a gap
        s(A, 101, 0, PA, 100, W, K::Retransmit, 100),
        s(A, 201, 0, PA, 100, W, K::New, 0),
    ]);
}

#[test]
fn mid_stream_start_has_no_history() {
    let c = check(&[
        // first segment seen is old data: nothing to compare it with
        s(A, 5000, 77, PA, 100, W, K::New, 0),
        s(A, 5100, 77, PA, 100, W, K::New, 0),
        s(A, 5000, 77, PA, 100, W, K::Retransmit, 100),
        // a pure ACK first in a direction initialises it too
        s(B, 77, 5200, ACK, 0, W, K::New, 0),
        s(B, 77, 5200, PA, 10, W, K::New, 0),
    ]);
    assert_eq!(c[A].retransmits, 1);
}

#[test]
fn gap_then_hole_fill_is_new_data() {
    // 201..301 lost before the tap, then retransmitted: this tap sees those
    // bytes once, so they are new here (the gap records the loss).
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        // A second copy of the filler is a retransmission again.
        s(A, 201, 0, PA, 100, W, K::Retransmit, 100),
    ]);
    assert_eq!((c[A].gaps, c[A].retransmits), (1, 1));
    assert_eq!(c[A].bytes - c[A].retransmitted_bytes, 300);
}

#[test]
fn reordering_is_not_retransmission() {
    // A swapped pair (veth or RPS spread one flow over two CPUs).
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
    ]);
    assert_eq!((c[A].gaps, c[A].retransmits), (1, 0));
}

#[test]
fn several_holes_are_covered_by_one() {
    // 1, 3, 5 arrive before 2 and 4: two gaps, one widened hole.
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        s(A, 501, 0, PA, 100, W, K::New, 0),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        s(A, 401, 0, PA, 100, W, K::New, 0),
        s(A, 601, 0, PA, 100, W, K::New, 0),
    ]);
    assert_eq!((c[A].gaps, c[A].retransmits), (2, 0));
    assert_eq!(c[A].bytes, 600);
}

#[test]
fn data_below_the_peers_ack_is_a_retransmission_even_in_a_hole() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(B, 899, 101, SA, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        // B acknowledges everything: the hole is closed.
        s(B, 900, 401, ACK, 0, W, K::AckOnly, 0),
        s(A, 201, 0, PA, 100, W, K::Retransmit, 100),
        s(A, 301, 0, PA, 100, W, K::Retransmit, 100),
    ]);
    assert_eq!((c[A].gaps, c[A].retransmits), (1, 2));
}

#[test]
fn partial_overlap_counts_only_old_bytes() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 1000, W, K::New, 0),
        s(A, 601, 0, PA, 1000, W, K::New, 500),
    ]);
    assert_eq!(c[A].bytes - c[A].retransmitted_bytes, 1500);
    assert_eq!(
        c[A].retransmits, 0,
        "a segment that brings new data is not a retransmitted segment"
    );
}

#[test]
fn a_retransmission_spanning_seen_data_and_the_hole_splits_its_bytes() {
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        // 101..301 again in one segment: 101..201 seen, 201..301 not.
        s(A, 101, 0, PA, 200, W, K::New, 100),
        // The delayed original of 201..301: now a duplicate.
        s(A, 201, 0, PA, 100, W, K::Retransmit, 100),
    ]);
    assert_eq!(c[A].bytes - c[A].retransmitted_bytes, 300);
}

#[test]
fn a_fill_at_a_holes_end_and_the_late_original_after_it() {
    // 101..201 seen, 201..301 missing, 301..401 seen, 401..501 missing,
    // 501..601 seen: two holes. The retransmission of 401..501 fills the
    // second hole; the delayed original of it is then a duplicate.
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        s(A, 501, 0, PA, 100, W, K::New, 0),
        s(A, 401, 0, PA, 100, W, K::New, 0),
        s(A, 401, 0, PA, 100, W, K::Retransmit, 100),
        // A copy of seen data between the holes is a duplicate too.
        s(A, 301, 0, PA, 100, W, K::Retransmit, 100),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        s(A, 201, 0, PA, 100, W, K::Retransmit, 100),
    ]);
    assert_eq!((c[A].gaps, c[A].retransmits), (2, 3));
    assert_eq!(c[A].bytes - c[A].retransmitted_bytes, 500);
}

#[test]
fn a_third_hole_merges_the_two_older_ones() {
    // Holes at 201, 401, 601: the first two become 201..501, which also
    // covers 301..401 (seen): a copy of that counts as new, the documented
    // cost of keeping two holes.
    let c = check(&[
        s(A, 100, 0, SYN, 0, W, K::New, 0),
        s(A, 101, 0, PA, 100, W, K::New, 0),
        s(A, 301, 0, PA, 100, W, K::New, 0),
        s(A, 501, 0, PA, 100, W, K::New, 0),
        s(A, 701, 0, PA, 100, W, K::New, 0),
        s(A, 601, 0, PA, 100, W, K::New, 0),
        s(A, 601, 0, PA, 100, W, K::Retransmit, 100),
        s(A, 201, 0, PA, 100, W, K::New, 0),
        s(A, 401, 0, PA, 100, W, K::New, 0),
    ]);
    assert_eq!(c[A].gaps, 3);
}
