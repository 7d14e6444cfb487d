//! The kernel's connection table (`CONNS`, an mmapable BPF array of
//! `probe_common::slots::Slot`s) read and drained in place, through a
//! shared mapping: no system call per entry or per batch. `OCCUPIED`, a
//! bitmap the program sets when it fills a slot, says which of the (by
//! default 65536) slots to look at.
//!
//! Every entry leaves here in userspace's terms: contended counts folded in
//! (`FlowEntry::fold_late`), `last_seen_ns` turned from jiffies into
//! CLOCK_MONOTONIC nanoseconds, and two entries of one key (a rare insert
//! race, see `probe_common::slots`) added together.

use std::collections::HashMap;
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
        })
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

    /// The key in slot `i` if it holds a connection.
    fn key(&self, i: usize) -> Option<ConnKey> {
        let s = self.slot(i);
        // SAFETY: a slot of the mapping; state first, with acquire (see
        // `read`).
        unsafe {
            let st = AtomicU32::from_ptr(&raw mut (*s).state).load(Ordering::Acquire);
            (st == state::LIVE || st == state::DRAINING)
                .then(|| std::ptr::read_volatile(&raw const (*s).key))
        }
    }

    /// The key and entry in slot `i` if it holds a connection, as
    /// userspace uses them. Read without the lock: counters may be a packet
    /// apart from each other, as with any snapshot of a live map.
    fn read(&self, i: usize) -> Option<(ConnKey, FlowEntry)> {
        let s = self.slot(i);
        // SAFETY: a slot of the mapping; the state is read first, with
        // acquire, so the key and entry read after it are the published ones.
        unsafe {
            let st = AtomicU32::from_ptr(&raw mut (*s).state).load(Ordering::Acquire);
            if st != state::LIVE && st != state::DRAINING {
                return None;
            }
            let key = std::ptr::read_volatile(&raw const (*s).key);
            let entry = std::ptr::read_volatile(&raw const (*s).entry);
            Some((key, self.userspace(entry)))
        }
    }

    fn userspace(&self, mut e: FlowEntry) -> FlowEntry {
        e.fold_late();
        e.jiffies_to_ns(self.tick_ns);
        e
    }

    /// Every key now in the table, once each, in `out` (replacing what it
    /// held).
    pub fn keys(&mut self, out: &mut Vec<ConnKey>) -> Result<()> {
        out.clear();
        out.extend(self.occupied().filter_map(|i| self.key(i)));
        // A key held by two slots (see the module comment) once.
        out.sort_unstable();
        out.dedup();
        Ok(())
    }

    /// Every connection now in the table, appended to `out` (one per key).
    pub fn entries(&mut self, out: &mut Vec<(ConnKey, FlowEntry)>) -> Result<()> {
        let mut at: HashMap<ConnKey, usize> = HashMap::new();
        for (k, e) in self.occupied().filter_map(|i| self.read(i)) {
            match at.get(&k) {
                Some(&j) => out[j].1.absorb(&e),
                None => {
                    at.insert(k, out.len());
                    out.push((k, e));
                }
            }
        }
        Ok(())
    }

    /// Takes every connection for which `due` holds out of the table, each
    /// with its final counts (see `probe_common::slots::drain`).
    pub fn drain(&mut self, due: impl Fn(&FlowEntry) -> bool) -> Vec<(ConnKey, FlowEntry)> {
        let candidates: Vec<usize> = self
            .occupied()
            .filter(|&i| self.read(i).is_some_and(|(_, e)| due(&e)))
            .collect();
        let mut out = Vec::new();
        for i in candidates {
            let word = self.word(i / 64);
            let bit = 1u64 << (i % 64);
            // SAFETY: a slot of the live table, shared with the kernel.
            let taken = unsafe {
                slots::drain(
                    self.slot(i),
                    &CoreAtomics,
                    |e| due(&self.userspace(*e)),
                    std::thread::yield_now,
                    || {
                        word.fetch_and(!bit, Ordering::SeqCst);
                    },
                )
            };
            if let Some((k, e)) = taken {
                out.push((k, self.userspace(e)));
            }
        }
        out
    }
}
