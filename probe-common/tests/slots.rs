//! `slots::locate` and `slots::drain` with threads on one small table: two
//! "CPUs" insert and update connections while a third, like `flowprobe
//! run`, drains them. Every packet must end up counted exactly once, in a
//! drained record or in a slot still live at the end, whatever the
//! interleaving; and a full probe sequence must be reported, not hidden.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Barrier;

use probe_common::initiator::evidence;
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

/// Connection `n` of protocol `proto` between two hosts.
fn key_of(n: u16, proto: u8) -> ConnKey {
    let k = FlowKey {
        src: probe_common::key::v4_mapped([10, 0, 0, 1]),
        dst: probe_common::key::v4_mapped([10, 0, 0, 2]),
        sport: 20000 + n,
        dport: 80,
        proto,
        family: 4,
        _pad: [0; 2],
    };
    ConnKey::of(&k, 1, 0).0
}

/// A UDP key.
fn key(n: u16) -> ConnKey {
    key_of(n, 17)
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
        let l = locate(
            t,
            k,
            slots::hash(k, seed),
            dir,
            None,
            spins,
            &CoreAtomics,
            |e| e.init(1, dir, k, None),
        );
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
                        if let Some((_, e, _)) = unsafe {
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
    let (k, e, _) = unsafe { slots::drain(s, &CoreAtomics, |_| true, || {}, || {}) }.unwrap();
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

/// A TCP key.
fn tcp_key(n: u16) -> ConnKey {
    key_of(n, 6)
}

/// One TCP segment as the eBPF program counts it: `flags`, `len` payload
/// bytes at `seq`.
fn segment(t: &Table, k: &ConnKey, dir: usize, flags: u8, seq: u32, len: u32) -> Located {
    use probe_common::parse::{tcp_flags as f, TcpHeader};
    let p = Pkt {
        is_tcp: true,
        tcp: TcpHeader {
            seq,
            ack: 1,
            flags,
            window: 1000,
        },
        payload_len: len,
        l3_len: len + 40,
    };
    let syn = (flags & (f::SYN | f::ACK) == f::SYN).then_some(seq);
    // SAFETY: `t`'s slots are only touched through these functions.
    unsafe {
        let l = locate(
            t,
            k,
            slots::hash(k, 7),
            dir,
            syn,
            1 << 20,
            &CoreAtomics,
            |e| e.init(1, dir, k, Some(flags)),
        );
        if let Located::Found(s) | Located::New(s, _) = l {
            update_locked(&raw mut (*s).entry, dir, 1, &p, 0, &Fixed(2));
            CoreAtomics.unlock(&raw mut (*s).entry.dir[dir].lock);
        }
        l
    }
}

/// One short connection on `k` from direction 0, `len` bytes each way
/// from sequence `isn`: SYN, SYN/ACK, data both ways, FIN both ways. A
/// segment the table turns away (full of connections not drained yet) is
/// offered again: here every packet must be counted.
fn short_connection(t: &Table, k: &ConnKey, isn: u32, len: u32) {
    use probe_common::parse::tcp_flags as f;
    for (dir, flags, seq, len) in [
        (0, f::SYN, isn, 0),
        (1, f::SYN | f::ACK, isn, 0),
        (0, f::ACK, isn + 1, len),
        (1, f::ACK, isn + 1, len),
        (0, f::FIN | f::ACK, isn + 1 + len, 0),
        (1, f::FIN | f::ACK, isn + 1 + len, 0),
        (0, f::ACK, isn + 2 + len, 0),
    ] {
        while matches!(
            segment(t, k, dir, flags, seq, len),
            Located::Full | Located::Busy
        ) {
            std::thread::yield_now();
        }
    }
}

/// The states of the slots in use, sorted.
fn states(t: &Table) -> Vec<u32> {
    let mut v: Vec<u32> =
        t.0.iter()
            // SAFETY: no other thread.
            .map(|c| unsafe { (*c.get()).state })
            .filter(|&s| s != state::EMPTY)
            .collect();
    v.sort();
    v
}

#[test]
fn a_syn_after_the_close_starts_a_new_entry_and_ends_the_old() {
    use probe_common::parse::tcp_flags as f;
    let t = Table::new(64);
    let k = tcp_key(1);
    short_connection(&t, &k, 1000, 300);
    // A retransmitted SYN of a connection that is not over is the same
    // connection.
    segment(&t, &tcp_key(2), 0, f::SYN, 5000, 0);
    assert!(matches!(
        segment(&t, &tcp_key(2), 0, f::SYN, 5000, 0),
        Located::Found(_)
    ));
    // The 5-tuple of the first, reused before any drain.
    assert!(matches!(
        segment(&t, &k, 0, f::SYN, 90_000, 0),
        Located::New(..)
    ));
    assert_eq!(states(&t), [state::LIVE, state::LIVE, state::ENDED]);
    // The ENDED slot leaves whatever `due` says, with the first
    // connection's counts only; the new one stays.
    let mut out = Vec::new();
    for c in &t.0 {
        // SAFETY: no other thread.
        if let Some(d) = unsafe { slots::drain(c.get(), &CoreAtomics, |_| false, || {}, || {}) } {
            out.push(d);
        }
    }
    assert_eq!(out.len(), 1);
    let (dk, e, ended) = out[0];
    assert_eq!((dk, ended, bytes(&e)), (k, true, 600));
    assert_eq!(e.counters[0].packets + e.counters[1].packets, 7);
    assert!(matches!(
        segment(&t, &k, 1, f::SYN | f::ACK, 90_000, 0),
        Located::Found(_)
    ));
}

#[test]
fn a_syn_with_another_sequence_number_starts_a_new_entry() {
    use probe_common::parse::tcp_flags as f;
    let t = Table::new(64);
    let k = tcp_key(1);
    // A connection whose end the table missed (say, its FINs were counted
    // without the tracker): a retransmission of its SYN is the same
    // connection, a SYN with another sequence number a new one.
    segment(&t, &k, 0, f::SYN, 1000, 0);
    segment(&t, &k, 1, f::SYN | f::ACK, 50, 0);
    segment(&t, &k, 0, f::ACK, 1001, 300);
    assert!(matches!(
        segment(&t, &k, 0, f::SYN, 1000, 0),
        Located::Found(_)
    ));
    assert!(matches!(
        segment(&t, &k, 0, f::SYN, 900_000, 0),
        Located::New(..)
    ));
    assert_eq!(states(&t), [state::LIVE, state::ENDED]);
}

#[test]
fn a_syn_on_a_tail_starts_a_new_entry() {
    use probe_common::parse::tcp_flags as f;
    let t = Table::new(64);
    let k = tcp_key(1);
    // A late ACK of a connection drained already: no SYN seen.
    segment(&t, &k, 1, f::ACK, 7000, 0);
    assert!(matches!(
        segment(&t, &k, 0, f::SYN, 90_000, 0),
        Located::New(..)
    ));
    assert_eq!(states(&t), [state::LIVE, state::ENDED]);
}

#[test]
fn reused_5_tuples_racing_the_drain_stay_apart() {
    // One "CPU" opens and closes connection after connection on the same
    // 5-tuple, each with its own byte count, while another drains them as
    // `flowprobe run` does with a closed timeout of 0 (a slot whose entry
    // reads closed, or that the kernel ended; a drained entry that did not
    // start with a SYN is a tail, added to the record before it): every
    // connection comes out as one record with its own bytes, never two
    // added together, however the drain and the reuse interleave.
    const N: u32 = 3000;
    let t = Table::new(16);
    let k = tcp_key(1);
    let stop = AtomicBool::new(false);
    let mut drained = Vec::new();
    std::thread::scope(|s| {
        let (t, stop) = (&t, &stop);
        let drainer = s.spawn(move || {
            let mut out: Vec<FlowEntry> = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                for c in &t.0 {
                    let p = c.get();
                    // SAFETY: a slot shared only through `slots`'s
                    // protocol; read as `KernelTable` reads it.
                    let (st, e) = unsafe {
                        (
                            std::ptr::read_volatile(&raw const (*p).state),
                            std::ptr::read_volatile(&raw const (*p).entry),
                        )
                    };
                    if !(st == state::ENDED || st == state::LIVE && e.closed()) {
                        continue;
                    }
                    // SAFETY: as above.
                    let got = unsafe {
                        slots::drain(
                            p,
                            &CoreAtomics,
                            FlowEntry::closed,
                            std::thread::yield_now,
                            || {},
                        )
                    };
                    match got {
                        Some((_, e, _)) if e.evidence < evidence::SYN && !out.is_empty() => {
                            out.last_mut().unwrap().absorb(&e)
                        }
                        Some((_, e, _)) => out.push(e),
                        None => {}
                    }
                }
            }
            out
        });
        for n in 0..N {
            short_connection(t, &k, n * 10_000, 1 + n);
        }
        stop.store(true, Ordering::SeqCst);
        drained = drainer.join().unwrap();
    });
    // What is left in the table: the last connection, and maybe a tail.
    let mut left: Vec<FlowEntry> =
        t.0.iter()
            // SAFETY: every thread has finished.
            .map(|c| unsafe { &*c.get() })
            .filter(|s| s.state == state::LIVE || s.state == state::ENDED)
            .map(|s| s.entry)
            .collect();
    left.sort_by_key(|e| e.evidence < evidence::SYN);
    for e in left {
        match drained.last_mut() {
            Some(last) if e.evidence < evidence::SYN => last.absorb(&e),
            _ => drained.push(e),
        }
    }
    let mut got: Vec<u64> = drained.iter().map(bytes).collect();
    got.sort();
    let want: Vec<u64> = (0..N).map(|n| 2 * (1 + n as u64)).collect();
    assert_eq!(got, want);
}
