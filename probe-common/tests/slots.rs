//! `slots::locate` and `slots::drain` with threads on one small table: two
//! "CPUs" insert and update connections while a third, like `flowprobe
//! run`, drains them. Every packet must end up counted exactly once, in a
//! drained record or in a slot still live at the end, whatever the
//! interleaving; and a full probe sequence must be reported, not hidden.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

use probe_common::slots::{self, locate, state, Located, Slot, Slots, PROBES};
use probe_common::update::{update_contended, update_locked, Fixed, Pkt};
use probe_common::{Atomics, ConnKey, CoreAtomics, FlowEntry, FlowKey};

struct Table(Vec<UnsafeCell<Slot>>);
// SAFETY: every access goes through `slots` and `update`, as in the kernel.
unsafe impl Sync for Table {}

impl Table {
    fn new(n: usize) -> Table {
        assert!(n.is_power_of_two());
        Table((0..n).map(|_| UnsafeCell::new(Slot::default())).collect())
    }
}

impl Slots for Table {
    fn slot(&self, i: u32) -> Option<*mut Slot> {
        self.0.get(i as usize).map(UnsafeCell::get)
    }
    fn mask(&self) -> u32 {
        self.0.len() as u32 - 1
    }
}

fn key(n: u16) -> ConnKey {
    let k = FlowKey {
        src: probe_common::key::v4_mapped([10, 0, 0, 1]),
        dst: probe_common::key::v4_mapped([10, 0, 0, 2]),
        sport: 20000 + n,
        dport: 80,
        proto: 17,
        family: 4,
        _pad: [0; 2],
    };
    ConnKey::of(&k, 1).0
}

/// One UDP datagram of `len` bytes on connection `k` in direction `dir`,
/// as the eBPF program counts it; `spins` 0 never waits for a held lock.
fn packet(t: &Table, k: &ConnKey, dir: usize, len: u32, spins: u32) -> Located {
    packet_seeded(t, k, dir, len, spins, 7)
}

fn packet_seeded(t: &Table, k: &ConnKey, dir: usize, len: u32, spins: u32, seed: u64) -> Located {
    let p = Pkt {
        is_tcp: false,
        tcp: Default::default(),
        payload_len: len,
        l3_len: len + 28,
    };
    // SAFETY: `t`'s slots are only touched through these functions.
    unsafe {
        let l = locate(t, k, slots::hash(k, seed), dir, spins, &CoreAtomics, |e| {
            e.init(1, dir, k, None)
        });
        match l {
            Located::Found(s) | Located::New(s, _) => {
                update_locked(&raw mut (*s).entry, dir, 1, &p, 0, &Fixed(2));
                CoreAtomics.unlock(&raw mut (*s).entry.dir[dir].lock);
            }
            Located::Contended(s) => {
                // A writer that is slow here (a stalled virtual CPU) widens
                // the window a drain must wait out.
                for _ in 0..500 {
                    std::hint::spin_loop();
                }
                update_contended(&raw mut (*s).entry, dir, 1, &p, 0, &Fixed(2), &CoreAtomics);
                slots::contended_done(s, &CoreAtomics);
            }
            Located::Full | Located::Busy => {}
        }
        l
    }
}

fn bytes(e: &FlowEntry) -> u64 {
    let mut e = *e;
    e.fold_late();
    e.counters[0].bytes + e.counters[1].bytes
}

#[test]
fn inserts_updates_and_drains_racing_lose_no_packet() {
    // 16 connections over a 64-slot table, two writers (one per direction,
    // each with its own lock, both inserting), one drainer that
    // takes out whatever it finds (as if every connection were due). A
    // packet the table turns away (full probe sequence, or slots changing
    // under two tries) is reported, not counted: it may be neither drained
    // nor live, and it must be rare.
    const CONNS: u16 = 16;
    // Writers go on for at least ROUNDS rounds and until the drainer has
    // taken DRAINS entries (however the threads are scheduled), at most
    // MAX_ROUNDS.
    const ROUNDS: usize = 10000;
    const DRAINS: usize = 200;
    const MAX_ROUNDS: usize = 2_000_000;
    let t = Table::new(64);
    let keys: Vec<ConnKey> = (0..CONNS).map(key).collect();
    let stop = AtomicBool::new(false);
    let taken = AtomicUsize::new(0);
    let start = Barrier::new(3);
    let (mut sent, mut refused, mut packets, mut drained) = (0u64, 0u64, 0u64, Vec::new());
    std::thread::scope(|s| {
        let writers: Vec<_> = (0..2u32)
            .map(|w| {
                let (t, keys, start, taken) = (&t, &keys, &start, &taken);
                s.spawn(move || {
                    start.wait();
                    let (mut sent, mut refused, mut r) = (0u64, 0u64, 0);
                    while r < MAX_ROUNDS && (r < ROUNDS || taken.load(Ordering::Relaxed) < DRAINS) {
                        for (i, k) in keys.iter().enumerate() {
                            let len = 1 + ((r * 7 + i * 13) % 1000) as u32 + w;
                            // Every 5th packet of writer 1 never waits.
                            let spins = if w == 1 && r % 5 == 0 { 0 } else { 1 << 20 };
                            match packet(t, k, w as usize, len, spins) {
                                // Without spins a new entry cannot be made
                                // (its slot's lock is never tried): by design.
                                Located::Full | Located::Busy if spins == 0 => {}
                                Located::Full | Located::Busy => refused += 1,
                                _ => sent += len as u64,
                            }
                        }
                        r += 1;
                    }
                    (sent, refused, r)
                })
            })
            .collect();
        let drainer = {
            let (t, stop, start, taken) = (&t, &stop, &start, &taken);
            s.spawn(move || {
                start.wait();
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    for c in &t.0 {
                        // SAFETY: the slot is shared with the writers only
                        // through `slots`'s protocol.
                        if let Some((_, e)) = unsafe {
                            slots::drain(
                                c.get(),
                                &CoreAtomics,
                                |_| true,
                                std::thread::yield_now,
                                || {},
                            )
                        } {
                            out.push(e);
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                out
            })
        };
        for w in writers {
            let (s, r, rounds) = w.join().unwrap();
            sent += s;
            refused += r;
            packets += rounds as u64 * CONNS as u64;
        }
        stop.store(true, Ordering::SeqCst);
        drained = drainer.join().unwrap();
    });
    let live: u64 =
        t.0.iter()
            .map(|c| {
                // SAFETY: every thread has finished.
                let s = unsafe { &*c.get() };
                if s.state == state::LIVE {
                    bytes(&s.entry)
                } else {
                    0
                }
            })
            .sum();
    let out: u64 = drained.iter().map(bytes).sum();
    assert!(
        drained.len() >= DRAINS,
        "the drainer took only {} entries",
        drained.len()
    );
    assert!(
        refused * 100 < packets,
        "{refused} of {packets} packets turned away"
    );
    assert_eq!(
        out + live,
        sent,
        "drained {out} + live {live} != sent {sent}"
    );
}

#[test]
fn a_full_probe_sequence_is_reported() {
    // One slot: the first connection takes it, a second finds no room.
    let t = Table::new(1);
    assert!(matches!(packet(&t, &key(1), 0, 10, 1), Located::New(_, 0)));
    assert!(matches!(packet(&t, &key(1), 1, 10, 1), Located::Found(_)));
    assert_eq!(packet(&t, &key(2), 0, 10, 1), Located::Full);
    // Drained, the slot is free for the next connection; the first one's
    // final count leaves with it.
    let s = t.slot(0).unwrap();
    // SAFETY: no other thread.
    let (k, e) = unsafe { slots::drain(s, &CoreAtomics, |_| true, || {}, || {}) }.unwrap();
    assert_eq!((k, bytes(&e)), (key(1), 20));
    assert!(matches!(packet(&t, &key(2), 1, 10, 1), Located::New(_, 0)));
}

#[test]
fn keys_spread_over_the_table() {
    // 4096 keys of one host pair (ports vary, as for a busy server) into
    // 8192 slots, under 20 seeds: every key finds a slot within PROBES.
    for seed in 0..20u64 {
        let t = Table::new(8192);
        for n in 0..4096 {
            let l = packet_seeded(
                &t,
                &key(n),
                0,
                1,
                1,
                seed.wrapping_mul(0x1234_5678_9abc_def1),
            );
            assert!(
                matches!(l, Located::New(..)),
                "seed {seed}, key {n}: {l:?} (PROBES = {PROBES})"
            );
        }
    }
}
