//! The kernel's connection table (`CONNS`, an mmapable BPF array of
//! `probe_common::slots::Slot`s) read and drained in place, through a
//! shared mapping: no system call per entry or per batch. `OCCUPIED`, a
//! bitmap the program sets when it fills a slot, says which of the (by
//! default 65536) slots to look at.
//!
//! Every entry leaves here in userspace's terms: contended counts folded in
//! (`FlowEntry::fold_late`), `last_seen_ns` turned from jiffies into
//! CLOCK_MONOTONIC nanoseconds, and two live entries of one key (a rare
//! insert race, see `probe_common::slots`) added together (by
//! `Drainer::read` for a reading, which reads slot by slot). An `ENDED` slot
//! holds an earlier connection on the 5-tuple of a live one (the kernel set
//! it aside when a new SYN came): a record of its own, drained at the next
//! pass whatever its age.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use aya::maps::{Map, MapData};
use probe_common::contract;
use probe_common::slots::{self, state, Slot};
use probe_common::{ConnKey, CoreAtomics, FlowEntry};

use crate::os::mmap::Mapping;

/// `CONNS` and `OCCUPIED` of a loaded object, mapped.
pub struct KernelTable {
    slots: Mapping,
    bits: Mapping,
    len: usize,
    tick_ns: u64,
    /// `run --state-dir`: a drained slot stays `DRAINING` (its final
    /// entry kept in the kernel) until [`KernelTable::free`], once its
    /// record's last counts are recorded ([`slots::take`]).
    hold: bool,
}

/// A held slot: its index and its entry's `first_seen_ns` (which says the
/// slot still holds that entry).
pub type Held = (u32, u64);

/// A record drained out of the table, with the slots that still hold it
/// (`DRAINING`) until [`KernelTable::free`]; none when freed at once.
pub type Drained = (ConnKey, FlowEntry, Vec<Held>);

/// A slot that holds a connection, as [`KernelTable::order`] lists it:
/// when the connection began, the slot, and its key's [`key_hash`].
pub type Listed = (u64, u32, u64);

/// A key's hash: equal keys have equal hashes, so two slots whose hashes
/// differ hold different connections.
pub fn key_hash(k: &ConnKey) -> u64 {
    rustc_hash::FxBuildHasher.hash_one(k)
}

// SAFETY: the mappings are shared memory that the kernel writes too; every
// access goes through atomics or volatile reads, from whichever thread.
unsafe impl Send for KernelTable {}

fn array_data<'a>(ebpf: &'a aya::Ebpf, name: &str) -> Result<(&'a MapData, usize)> {
    match ebpf.map(name) {
        Some(Map::Array(m)) => Ok((m, m.info()?.max_entries() as usize)),
        Some(_) => bail!("the eBPF object's {name} is not an array (an older object?)"),
        None => bail!("the eBPF object has no map {name}"),
    }
}

/// The jiffy: CLOCK_MONOTONIC_COARSE ticks once a jiffy, so its resolution
/// is the kernel's TICK_NSEC (4 ms at HZ=250).
pub fn tick_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer.
    if unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) } != 0 {
        return 4_000_000;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

impl KernelTable {
    /// Maps `CONNS` and `OCCUPIED` of `ebpf` (each caller its own mapping:
    /// the resolver thread and the run loop).
    pub fn open(ebpf: &aya::Ebpf) -> Result<KernelTable> {
        let (conns, len) = array_data(ebpf, contract::CONNS)?;
        let (occupied, words) = array_data(ebpf, contract::OCCUPIED)?;
        if words * 64 < len {
            bail!("the eBPF object's OCCUPIED has {words} words for {len} slots");
        }
        let slots = Mapping::shared(conns.fd().as_fd(), len * size_of::<Slot>())
            .context("mapping the connection table (CONNS)")?;
        let bits = Mapping::shared(occupied.fd().as_fd(), words * 8)
            .context("mapping the slot bitmap (OCCUPIED)")?;
        Ok(KernelTable {
            slots,
            bits,
            len,
            tick_ns: tick_ns(),
            hold: false,
        })
    }

    /// Drained slots stay `DRAINING` until [`KernelTable::free`].
    pub fn hold_drained(&mut self) {
        self.hold = true;
    }

    fn slot(&self, i: usize) -> *mut Slot {
        debug_assert!(i < self.len);
        // SAFETY: `i` is below the slot count the mapping holds.
        unsafe { self.slots.as_ptr().cast::<Slot>().add(i) }
    }

    fn word(&self, w: usize) -> &AtomicU64 {
        // SAFETY: `w` < len / 64 (rounded up), inside the mapping; aligned.
        unsafe { AtomicU64::from_ptr(self.bits.as_ptr().cast::<u64>().add(w)) }
    }

    /// Indices of the slots the program filled and userspace has not
    /// drained.
    fn occupied(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len.div_ceil(64))
            .flat_map(move |w| {
                let mut bits = self.word(w).load(Ordering::Acquire);
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    Some(w * 64 + b)
                })
            })
            .filter(move |&i| i < self.len)
    }

    /// Slot `i`'s state, read first with acquire: the key and entry read
    /// after it are the published ones.
    fn state(&self, i: usize) -> u32 {
        // SAFETY: a slot of the mapping.
        unsafe { AtomicU32::from_ptr(&raw mut (*self.slot(i)).state).load(Ordering::Acquire) }
    }

    /// The key in slot `i` if it holds a connection.
    fn key(&self, i: usize) -> Option<ConnKey> {
        let s = self.slot(i);
        // SAFETY: a slot of the mapping, its state read first (see `state`).
        holds(self.state(i)).then(|| unsafe { std::ptr::read_volatile(&raw const (*s).key) })
    }

    /// The key and entry in slot `i` if it holds a connection, as
    /// userspace uses them, and whether the kernel ended it (`ENDED`).
    /// Read without the lock: counters may be a packet apart from each
    /// other, as with any snapshot of a live map.
    fn read(&self, i: usize) -> Option<(ConnKey, FlowEntry, bool)> {
        let s = self.slot(i);
        let st = self.state(i);
        if !listed(st) {
            return None;
        }
        // SAFETY: a slot of the mapping, its state read first (see `state`).
        let (key, entry) = unsafe {
            (
                std::ptr::read_volatile(&raw const (*s).key),
                std::ptr::read_volatile(&raw const (*s).entry),
            )
        };
        Some((key, self.userspace(entry), st == state::ENDED))
    }

    fn userspace(&self, mut e: FlowEntry) -> FlowEntry {
        e.fold_late();
        e.jiffies_to_ns(self.tick_ns);
        e
    }

    /// The keys of the slots that became occupied since the last call
    /// (`before`: the bitmap then, one word per 64 slots; empty at first,
    /// when every slot is new), appended to `out` until it holds `max`:
    /// the slots left are still new at the next call (so a caller never
    /// holds every key at once). A slot whose bit is set but whose key is
    /// not published yet stays new for the next call. A key held by two
    /// slots (see the module comment) may come twice.
    pub fn new_keys(&self, before: &mut Vec<u64>, out: &mut Vec<ConnKey>, max: usize) {
        let words = self.len.div_ceil(64);
        before.resize(words, 0);
        for (w, was) in before.iter_mut().enumerate() {
            let now = self.word(w).load(Ordering::Acquire);
            let mut new = now & !*was;
            // A slot freed since is new again once it is taken.
            *was &= now;
            while new != 0 {
                if out.len() >= max {
                    return;
                }
                let b = new.trailing_zeros() as usize;
                new &= new - 1;
                let i = w * 64 + b;
                if let Some(k) = (i < self.len).then(|| self.key(i)).flatten() {
                    *was |= 1 << b;
                    out.push(k);
                }
            }
        }
    }

    /// The slots that hold a connection now, in the order their
    /// connections began, into `out` (cleared). Only keys and start times
    /// are read, and entries are then read one at a time
    /// ([`KernelTable::entry`]): a reading holds no copy of the table (at
    /// half a kilobyte an entry, that was the largest part of a tick).
    pub fn order(&self, out: &mut Vec<Listed>) {
        out.clear();
        let occupied: u32 = (0..self.len.div_ceil(64))
            .map(|w| self.word(w).load(Ordering::Relaxed).count_ones())
            .sum();
        out.reserve(occupied as usize);
        for i in self.occupied() {
            if !listed(self.state(i)) {
                continue;
            }
            let s = self.slot(i);
            // SAFETY: a slot of the mapping, its state read first (see
            // `state`); key and start are written once, before it is
            // published.
            let (key, first) = unsafe {
                (
                    std::ptr::read_volatile(&raw const (*s).key),
                    std::ptr::read_volatile(&raw const (*s).entry.first_seen_ns),
                )
            };
            out.push((first, i as u32, key_hash(&key)));
        }
        out.sort_unstable_by_key(|&(first, i, _)| (first, i));
    }

    /// Slot `i`'s key and entry, as userspace uses them, and whether the
    /// kernel ended it, if it holds a connection (see [`KernelTable::order`]).
    pub fn entry(&self, i: u32) -> Option<(ConnKey, FlowEntry, bool)> {
        ((i as usize) < self.len)
            .then(|| self.read(i as usize))
            .flatten()
    }

    /// Takes every connection for which `due` holds, and every `ENDED` one,
    /// out of the table, each with its final counts (see
    /// `probe_common::slots::drain`), appended to `out` (see [`records`]).
    /// With [`KernelTable::hold_drained`] their slots stay `DRAINING`, and
    /// each record says which.
    pub fn drain(&mut self, due: impl Fn(&FlowEntry) -> bool, out: &mut Vec<Drained>) {
        let candidates: Vec<usize> = self
            .occupied()
            .filter(|&i| self.read(i).is_some_and(|(_, e, ended)| ended || due(&e)))
            .collect();
        let mut taken = Vec::new();
        for i in candidates {
            // SAFETY: a slot of the live table, shared with the kernel.
            let got = unsafe {
                slots::take(
                    self.slot(i),
                    &CoreAtomics,
                    |e| due(&self.userspace(*e)),
                    std::thread::yield_now,
                )
            };
            if let Some((k, e, ended)) = got {
                if !self.hold {
                    self.free_slot(i);
                }
                taken.push((k, self.userspace(e), ended, self.hold.then_some(i as u32)));
            }
        }
        records(taken.into_iter(), out);
    }

    /// The slots a run that is gone took out and did not free (`DRAINING`),
    /// each as a record of its own, appended to `out`: nothing writes to
    /// them, so their entries are final. They stay held.
    pub fn held(&mut self, out: &mut Vec<Drained>) {
        let taken: Vec<_> = self
            .occupied()
            .filter(|&i| self.state(i) == state::DRAINING)
            .map(|i| {
                let s = self.slot(i);
                // SAFETY: a slot of the mapping, its state read first.
                let (k, e) = unsafe {
                    (
                        std::ptr::read_volatile(&raw const (*s).key),
                        std::ptr::read_volatile(&raw const (*s).entry),
                    )
                };
                (k, self.userspace(e), true, Some(i as u32))
            })
            .collect();
        records(taken.into_iter(), out);
    }

    /// Frees slots held `DRAINING` (their records' last counts are
    /// recorded), each only if it still holds the entry it held.
    pub fn free(&mut self, slots: impl IntoIterator<Item = Held>) {
        for (i, first_seen) in slots {
            let i = i as usize;
            if i >= self.len || self.state(i) != state::DRAINING {
                continue;
            }
            let s = self.slot(i);
            // SAFETY: a slot of the mapping; nothing writes a DRAINING one.
            let at = unsafe { std::ptr::read_volatile(&raw const (*s).entry.first_seen_ns) };
            if at == first_seen {
                self.free_slot(i);
            }
        }
    }

    fn free_slot(&self, i: usize) {
        self.word(i / 64)
            .fetch_and(!(1u64 << (i % 64)), Ordering::SeqCst);
        // SAFETY: a `DRAINING` slot of the live table.
        unsafe { slots::free(self.slot(i), &CoreAtomics) };
    }
}

/// A slot in this state holds a connection.
fn holds(st: u32) -> bool {
    st == state::LIVE || st == state::DRAINING || st == state::ENDED
}

/// A slot in this state holds a connection a reading lists: a `DRAINING`
/// one is one this run (or the run it adopted from) took out, its record
/// userspace's now.
fn listed(st: u32) -> bool {
    holds(st) && st != state::DRAINING
}

/// Entries read or drained from slots as connection records, appended to
/// `out` in the order they began (`first_seen_ns`): the live entries of
/// one key (two slots of one connection, a rare insert race) added
/// together; an `ENDED` one (the bool) is an earlier connection on its
/// 5-tuple, a record of its own. Each record lists the held slots it came
/// from (the `Option`).
fn records(
    slots: impl Iterator<Item = (ConnKey, FlowEntry, bool, Option<u32>)>,
    out: &mut Vec<Drained>,
) {
    let start = out.len();
    let mut at: HashMap<ConnKey, usize> = HashMap::new();
    for (k, e, ended, slot) in slots {
        let held = slot.map(|i| (i, e.first_seen_ns));
        if !ended {
            if let Some(&j) = at.get(&k) {
                out[j].1.absorb(&e);
                out[j].2.extend(held);
                continue;
            }
            at.insert(k, out.len());
        }
        out.push((k, e, held.into_iter().collect()));
    }
    out[start..].sort_by_key(|(_, e, _)| e.first_seen_ns);
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_common::{FlowKey, L4Proto};

    fn key(port: u16) -> ConnKey {
        let k = FlowKey {
            src: probe_common::key::v4_mapped([10, 0, 0, 1]),
            dst: probe_common::key::v4_mapped([10, 0, 0, 2]),
            sport: port,
            dport: 80,
            proto: L4Proto::Tcp as u8,
            family: 4,
            _pad: [0; 2],
        };
        ConnKey::of(&k, 3, 0).0
    }

    fn entry(first: u64, bytes: u64) -> FlowEntry {
        let mut e = FlowEntry::new(first, 0, &key(1), None);
        e.counters[0].bytes = bytes;
        e
    }

    #[test]
    fn live_slots_of_a_key_add_up_and_ended_ones_stay_apart_in_time_order() {
        let (a, b) = (key(1), key(2));
        let slots = [
            (a, entry(50, 5), false),
            (b, entry(10, 1), true),
            (a, entry(20, 2), true),
            (b, entry(30, 3), false),
            // A second live slot of `a` (the insert race).
            (a, entry(60, 7), false),
        ];
        let mut out = vec![(b, entry(1, 100), Vec::new())];
        records(
            slots
                .into_iter()
                .enumerate()
                .map(|(i, (k, e, ended))| (k, e, ended, Some(i as u32))),
            &mut out,
        );
        // The two live slots of `a` are one record, held in both.
        assert_eq!(out.last().unwrap().2, [(0, 50), (4, 60)]);
        let got: Vec<(u16, u64, u64)> = out
            .iter()
            .map(|(k, e, _)| {
                (
                    k.hi_port.min(k.lo_port),
                    e.first_seen_ns,
                    e.counters[0].bytes,
                )
            })
            .collect();
        // What `out` held first stays first.
        assert_eq!(
            got,
            [(2, 1, 100), (2, 10, 1), (1, 20, 2), (2, 30, 3), (1, 50, 12)]
        );
    }
}
