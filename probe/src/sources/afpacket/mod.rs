//! `flowprobe run --backend afpacket`: counting from AF_PACKET rings, for
//! hosts where the eBPF program cannot be loaded.
//!
//! One socket with a TPACKET_V3 ring per CPU ([`ring`]), all bound to every
//! interface of the network namespace (interface index 0, so interfaces
//! that appear later are included without any work) and joined in one
//! `PACKET_FANOUT_HASH` group, so the kernel spreads connections over the
//! rings and keeps each connection on one ([`merge`] says why that holds
//! and what happens when it does not). One thread per ring reads frames in
//! place and feeds them through the same parser as replay
//! ([`crate::ingest`]) into its own [`FlowTable`]; snapshots and the final
//! output merge the tables. `--iface` is a filter in the kernel ([`filter`]).
//!
//! Where it looks: AF_PACKET's taps are where tcpdump's are. On ingress,
//! before tc ingress and netfilter; on egress, after tc egress, and before
//! segmentation when the device does TSO/GSO (veth, most NICs), so it sees
//! the same super-packets as tc egress. tc counts such a packet as its
//! `gso_segs`; here the virtio-net header's `gso_size` gives the same number
//! ([`crate::ingest::Captured::gso_size`]), so `packets` and `retransmits`
//! (segments) equal tc's, and bytes are exact either way (lengths come from
//! the IP header or `tp_len`, not from the cut copy).

mod filter;
mod merge;
mod ring;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use flowtable::{Connection, FlowTable, FrameStats};

use crate::live::{self, links};
pub use ring::KernelStats;
use ring::{Cursor, Frame, Ring};

pub struct Options {
    /// Only these interfaces; empty: every interface.
    pub ifaces: Vec<String>,
    pub duration: Option<Duration>,
    /// Call `on_snapshot` with every connection this often while running.
    pub interval: Option<Duration>,
}

/// What a run saw, for the summary line.
pub struct Outcome {
    pub conns: Vec<Connection>,
    /// Frames read from the rings, and why those not counted were not.
    pub frames: FrameStats,
    /// The kernel's `PACKET_STATISTICS`, summed over the rings.
    pub kernel: KernelStats,
    pub rings: usize,
    /// Records of connections that were split across rings and merged.
    pub split: u64,
}

/// One ring's table.
#[derive(Default)]
struct Shard {
    table: FlowTable,
    frames: FrameStats,
}

pub fn run(
    opts: &Options,
    on_snapshot: &mut dyn FnMut(&[Connection], &KernelStats) -> Result<()>,
) -> Result<Outcome> {
    let mut named = Named::new(&opts.ifaces)?;

    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let only = named.indexes();
    let blocks = ring::blocks_per_ring(n);
    let rings = (0..n)
        .map(|_| Ring::open(blocks))
        .collect::<Result<Vec<_>>>()?;
    let group = rings[0].join_fanout(None)?;
    for r in &rings[1..] {
        r.join_fanout(Some(group))?;
    }
    // Only now that every ring is in the group: before, a ring could get a
    // packet that another also got through the group.
    for r in &rings {
        r.set_filter(only.as_deref())?;
    }
    live::install_signal_handlers()?;
    // Joins connections to processes while it runs; `collect` tags them.
    let _attrib = crate::attrib::start(None);

    let shards: Vec<Mutex<Shard>> = rings.iter().map(|_| Mutex::default()).collect();
    let done = AtomicBool::new(false);
    let mut kernel = KernelStats::default();
    std::thread::scope(|s| -> Result<()> {
        let workers: Vec<_> = rings
            .iter()
            .zip(&shards)
            .map(|(r, sh)| {
                let done = &done;
                s.spawn(move || {
                    let res = read_ring(r, sh, done);
                    if res.is_err() {
                        // Stop the run rather than count on with one ring fewer.
                        done.store(true, Ordering::Release);
                    }
                    res
                })
            })
            .collect();
        let res = follow(
            &rings,
            &shards,
            &done,
            &mut named,
            &mut kernel,
            opts,
            on_snapshot,
        );
        done.store(true, Ordering::Release);
        for w in workers {
            w.join()
                .map_err(|_| anyhow!("an AF_PACKET reader thread panicked"))??;
        }
        res
    })?;
    add_kernel_stats(&rings, &mut kernel)?;
    let (conns, split) = collect(&shards)?;
    let mut frames = FrameStats::default();
    for sh in &shards {
        frames.merge(&lock(sh)?.frames);
    }
    Ok(Outcome {
        conns,
        frames,
        kernel,
        rings: rings.len(),
        split,
    })
}

/// Until --duration or a signal: follows the named interfaces, reads the
/// kernel counters, prints snapshots.
fn follow(
    rings: &[Ring],
    shards: &[Mutex<Shard>],
    failed: &AtomicBool,
    named: &mut Named,
    kernel: &mut KernelStats,
    opts: &Options,
    on_snapshot: &mut dyn FnMut(&[Connection], &KernelStats) -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    let mut next_snapshot = opts.interval.map(|i| start + i);
    // The kernel's counters are 32-bit: read them often enough not to wrap.
    let mut next_stats = start + Duration::from_secs(1);
    while !live::STOP.load(Ordering::SeqCst) && !failed.load(Ordering::Acquire) {
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if let Some(now) = named.follow()? {
            for r in rings {
                r.set_filter(Some(&now))?;
            }
        }
        let now = Instant::now();
        if now >= next_stats {
            add_kernel_stats(rings, kernel)?;
            next_stats = now + Duration::from_secs(1);
        }
        if let (Some(at), Some(every)) = (next_snapshot, opts.interval) {
            if now >= at {
                on_snapshot(&collect(shards)?.0, kernel)?;
                next_snapshot = Some(at + every);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One ring's thread: waits for blocks and counts their frames, until
/// `done`.
fn read_ring(ring: &Ring, shard: &Mutex<Shard>, done: &AtomicBool) -> Result<()> {
    let mut cur = Cursor::default();
    loop {
        let stopping = done.load(Ordering::Acquire);
        if stopping {
            // The kernel hands over a partly filled block only when its
            // retire timer fires (every RETIRE_MS; a block can wait up to
            // two periods): wait for that, so the last frames before the
            // stop are counted.
            std::thread::sleep(Duration::from_millis(3 * u64::from(ring::RETIRE_MS)));
        } else {
            ring.wait(50)?;
        }
        {
            let mut sh = lock(shard)?;
            let sh = &mut *sh;
            ring.drain(&mut cur, |f| observe(sh, f));
        }
        if stopping {
            return Ok(());
        }
    }
}

fn observe(sh: &mut Shard, f: &Frame) {
    // On a loopback interface every packet is seen twice: leaving
    // (PACKET_OUTGOING) and coming back in (PACKET_HOST). Counting both
    // would count it twice, the second time as a retransmission. Keep the
    // incoming copy: the one tc ingress, the tc backend's only hook on lo,
    // sees too.
    if f.hatype == libc::ARPHRD_LOOPBACK && f.pkttype == libc::PACKET_OUTGOING {
        return;
    }
    crate::ingest::captured(
        &mut sh.table,
        &mut sh.frames,
        &crate::ingest::Captured {
            ts_ns: f.ts_ns,
            iface: f.ifindex,
            link: f.link(),
            data: f.data,
            wire_len: f.wire_len,
            gso_size: f.gso_size.into(),
        },
    );
}

fn lock(m: &Mutex<Shard>) -> Result<std::sync::MutexGuard<'_, Shard>> {
    m.lock()
        .map_err(|_| anyhow!("an AF_PACKET reader thread panicked"))
}

fn collect(shards: &[Mutex<Shard>]) -> Result<(Vec<Connection>, u64)> {
    let per_ring = shards
        .iter()
        .map(|sh| Ok(lock(sh)?.table.connections()))
        .collect::<Result<Vec<_>>>()?;
    let (mut conns, split) = merge::merge(per_ring);
    crate::attrib::tag(&mut conns);
    Ok((conns, split))
}

fn add_kernel_stats(rings: &[Ring], total: &mut KernelStats) -> Result<()> {
    for r in rings {
        total.add(&r.stats()?);
    }
    Ok(())
}

/// The interfaces named with --iface, their current indexes, and the link
/// events that change them (a named interface created again has a new
/// index).
struct Named {
    /// Empty: every interface.
    names: Vec<String>,
    index: BTreeMap<String, u32>,
    /// Only with names: without, the rings are bound to every interface.
    watcher: Option<links::Watcher>,
}

impl Named {
    /// Every name must be an interface now.
    fn new(names: &[String]) -> Result<Named> {
        // Subscribe before the dump, so that no link change falls between.
        let watcher = if names.is_empty() {
            None
        } else {
            Some(links::Watcher::subscribe()?)
        };
        let mut n = Named {
            names: names.to_vec(),
            index: BTreeMap::new(),
            watcher,
        };
        let all = links::dump()?;
        for name in names {
            if !all.iter().any(|l| &l.name == name) {
                bail!("no interface {name} in this network namespace");
            }
        }
        for l in &all {
            n.new_link(l);
        }
        Ok(n)
    }

    /// Applies the link events since the last call; the new index list
    /// when it changed.
    fn follow(&mut self) -> Result<Option<Vec<u32>>> {
        let Some(w) = &mut self.watcher else {
            return Ok(None);
        };
        let before: Vec<u32> = self.index.values().copied().collect();
        match w.poll() {
            Ok(events) => {
                for ev in events {
                    match ev {
                        links::Event::New(l) => self.new_link(&l),
                        links::Event::Del(l) => self.del_link(&l),
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Events were lost: start over from a fresh dump.
                self.index.clear();
                for l in links::dump()? {
                    self.new_link(&l);
                }
            }
            Err(e) => return Err(e).context("reading rtnetlink link events"),
        }
        let now: Vec<u32> = self.index.values().copied().collect();
        Ok((now != before).then_some(now))
    }

    fn new_link(&mut self, l: &links::Link) {
        if self.names.contains(&l.name) {
            self.index.insert(l.name.clone(), l.index);
        }
        // Renamed away from a named one.
        self.index
            .retain(|name, &mut i| i != l.index || *name == l.name);
    }

    fn del_link(&mut self, l: &links::Link) {
        self.index.retain(|_, &mut i| i != l.index);
    }

    /// The filter's interface list: `None` for every interface.
    fn indexes(&self) -> Option<Vec<u32>> {
        (!self.names.is_empty()).then(|| self.index.values().copied().collect())
    }
}
