//! `update::update` with two threads on one connection, as
//! tc ingress does when one flow's packets are handled on two CPUs (veth,
//! RPS, several RX queues). The totals must not depend on the interleaving.
//!
//! Like the kernel, the threads read the shared state with plain (volatile)
//! loads while others update it atomically; that is what the BPF program
//! does, and x86-64 gives those loads the same meaning.

use std::cell::UnsafeCell;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;

use probe_common::parse::{tcp_flags as f, TcpHeader};
use probe_common::update::{update, Fixed, Updated};
use probe_common::{CoreAtomics, DirCounters, FlowEntry, FlowKey, L4Proto, Parsed};

/// Lock spins that never give up: a userspace thread can be preempted while
/// it holds the lock, which a BPF program cannot.
const FOREVER: u32 = u32::MAX;

/// One connection's map value, shared by the threads.
struct Shared(UnsafeCell<FlowEntry>);

// SAFETY: every concurrent write goes through `update::update`.
unsafe impl Sync for Shared {}

impl Shared {
    fn new() -> Shared {
        Shared(UnsafeCell::new(FlowEntry::default()))
    }

    /// One segment from A (direction 0), as the eBPF program handles it;
    /// `spins` 0 makes every update a contended one.
    fn observe(&self, seq: u32, len: u32, flags: u8, spins: u32) -> Updated {
        self.observe_dir(0, seq, 1, len, flags, spins)
    }

    /// One segment in direction `dir`, acknowledging `ack`.
    fn observe_dir(
        &self,
        dir: usize,
        seq: u32,
        ack: u32,
        len: u32,
        flags: u8,
        spins: u32,
    ) -> Updated {
        let p = Parsed {
            key: FlowKey {
                proto: L4Proto::Tcp as u8,
                family: 4,
                ..FlowKey::default()
            },
            l3_len: len + 40,
            payload_len: len,
            l3_offset: 0,
            tcp: TcpHeader {
                seq,
                ack,
                flags,
                window: 1000,
            },
            tunnel: 0,
        };
        // SAFETY: `self` outlives the call; writers all use `update`.
        unsafe {
            update(
                self.0.get(),
                dir,
                1,
                &p.pkt(),
                0,
                &Fixed(0),
                spins,
                &CoreAtomics,
            )
        }
    }

    fn totals(&self) -> DirCounters {
        self.totals_of(0)
    }

    fn totals_of(&self, dir: usize) -> DirCounters {
        // SAFETY: called after the threads were joined.
        let mut e = unsafe { *self.0.get() };
        e.fold_late();
        e.counters[dir]
    }
}

/// Data segments after a SYN at ISN 1000: lengths vary so that a wrong
/// split of bytes shows.
fn segments(n: usize) -> Vec<(u32, u32)> {
    let mut seq = 1001u32;
    (0..n)
        .map(|i| {
            let len = 100 + (i as u32 * 37) % 1300;
            let s = (seq, len);
            seq = seq.wrapping_add(len);
            s
        })
        .collect()
}

/// Runs `parts[0]` and `parts[1]` (each in order) on two threads at once,
/// after the SYN, many times over; checks `expect` on every outcome.
/// `spins[i]` is thread `i`'s (0: every update contended).
fn race(
    parts: [Vec<(u32, u32)>; 2],
    spins: [u32; 2],
    rounds: usize,
    expect: impl Fn(&DirCounters),
) {
    let want = |spins: u32| {
        if spins == 0 {
            Updated::Contended
        } else {
            Updated::Locked
        }
    };
    for _ in 0..rounds {
        let shared = Shared::new();
        assert_eq!(shared.observe(1000, 0, f::SYN, spins[0]), want(spins[0]));
        let start = Barrier::new(2);
        std::thread::scope(|s| {
            for (part, &spins) in parts.iter().zip(spins.iter()) {
                let (shared, start) = (&shared, &start);
                s.spawn(move || {
                    start.wait();
                    for &(seq, len) in part {
                        assert_eq!(
                            shared.observe(seq, len, f::PSH | f::ACK, spins),
                            want(spins)
                        );
                    }
                });
            }
        });
        expect(&shared.totals());
    }
}

#[test]
fn two_cpus_seeing_every_segment_count_each_byte_new_once() {
    // Every segment twice (an original and its copy), one copy per thread:
    // whichever thread is ahead, each byte is new exactly once.
    let segs = segments(2000);
    let total: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
    race([segs.clone(), segs.clone()], [FOREVER; 2], 200, |c| {
        assert_eq!(c.bytes, 2 * total);
        assert_eq!(c.retransmitted_bytes, total, "{c:?}");
        assert_eq!(c.retransmits, segs.len() as u64, "{c:?}");
        assert_eq!(c.packets, 2 * segs.len() as u64 + 1);
    });
}

#[test]
fn a_contended_update_still_counts_every_byte() {
    // Lock never taken (spins 0): packets and bytes exact, no verdicts.
    let segs = segments(2000);
    let total: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
    race([segs.clone(), segs.clone()], [0; 2], 50, |c| {
        assert_eq!(c.bytes, 2 * total);
        assert_eq!(c.packets, 2 * segs.len() as u64 + 1);
        assert_eq!((c.retransmits, c.retransmitted_bytes), (0, 0));
    });
}

#[test]
fn a_contended_writer_beside_the_lock_holder_loses_no_count() {
    // One thread always under the lock (plain adds to `counters`), the other
    // never (atomic adds to `late`): folded together, every packet and byte.
    let segs = segments(2000);
    let total: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
    let l3: u64 = segs.iter().map(|&(_, l)| l as u64 + 40).sum();
    race([segs.clone(), segs.clone()], [FOREVER, 0], 200, |c| {
        assert_eq!(c.bytes, 2 * total);
        assert_eq!(c.l3_bytes, 2 * l3 + 40);
        assert_eq!(c.packets, 2 * segs.len() as u64 + 1);
    });
}

#[test]
fn two_cpus_splitting_a_flow_count_no_retransmission() {
    // Odd segments on one thread, even on the other: pure reordering. (The
    // lock-free fallback is not held to this: its hole is best effort.)
    let segs = segments(2000);
    let total: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
    let odd: Vec<_> = segs.iter().copied().step_by(2).collect();
    let even: Vec<_> = segs.iter().copied().skip(1).step_by(2).collect();
    race([odd, even], [FOREVER; 2], 200, |c| {
        assert_eq!(c.bytes, total);
        assert_eq!(
            (c.retransmits, c.retransmitted_bytes),
            (0, 0),
            "reordering across CPUs counted as retransmission: {c:?}"
        );
    });
}

#[test]
fn acks_racing_the_data_they_acknowledge_never_make_reordering_a_retransmission() {
    // Data in direction 0 split over two threads (odd and even segments,
    // so holes open and fill), while a third thread sends direction 1's
    // ACKs, each covering only data both data threads have recorded (as
    // on the wire: the receiver acknowledges what it got). The directions
    // take different locks, and the data's tracker reads the ACK
    // (`tcp::Peer`) while the ACK thread may be writing it: whatever the
    // interleaving, no byte may count as retransmitted, and both
    // directions' counts are exact.
    let segs = segments(2000);
    let total: u64 = segs.iter().map(|&(_, l)| l as u64).sum();
    let parts: [Vec<(u32, u32)>; 2] = [
        segs.iter().copied().step_by(2).collect(),
        segs.iter().copied().skip(1).step_by(2).collect(),
    ];
    for _ in 0..100 {
        let shared = Shared::new();
        assert_eq!(shared.observe(1000, 0, f::SYN, FOREVER), Updated::Locked);
        // How many of its segments each data thread has recorded.
        let done = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let start = Barrier::new(3);
        let acks = std::thread::scope(|s| {
            for (t, part) in parts.iter().enumerate() {
                let (shared, start, done) = (&shared, &start, &done);
                s.spawn(move || {
                    start.wait();
                    for (i, &(seq, len)) in part.iter().enumerate() {
                        let how = shared.observe(seq, len, f::PSH | f::ACK, FOREVER);
                        assert_eq!(how, Updated::Locked);
                        done[t].store(i + 1, Ordering::Release);
                    }
                });
            }
            let (shared, start, done, segs) = (&shared, &start, &done, &segs);
            s.spawn(move || {
                start.wait();
                let mut acks = 0u64;
                loop {
                    // Segments 0..n all recorded: even ones by thread 0,
                    // odd ones by thread 1.
                    let (e, o) = (
                        done[0].load(Ordering::Acquire),
                        done[1].load(Ordering::Acquire),
                    );
                    let n = (2 * e).min(2 * o + 1).min(segs.len());
                    let ack = match n {
                        0 => 1001,
                        n => segs[n - 1].0.wrapping_add(segs[n - 1].1),
                    };
                    let how = shared.observe_dir(1, 5000, ack, 0, f::ACK, FOREVER);
                    assert_eq!(how, Updated::Locked);
                    acks += 1;
                    if n == segs.len() {
                        return acks;
                    }
                }
            })
            .join()
            .unwrap()
        });
        let (data, back) = (shared.totals_of(0), shared.totals_of(1));
        assert_eq!(data.bytes, total, "{data:?}");
        assert_eq!(data.packets, segs.len() as u64 + 1, "{data:?}");
        assert_eq!(
            (data.retransmits, data.retransmitted_bytes),
            (0, 0),
            "reordering with racing ACKs counted as retransmission: {data:?}"
        );
        assert_eq!(back.packets, acks, "{back:?}");
        assert_eq!(
            (back.retransmits, back.probes, back.bytes),
            (0, 0, 0),
            "{back:?}"
        );
    }
}
