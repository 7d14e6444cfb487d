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
//! ([`crate::sources::ingest`]) into its own [`FlowTable`]; snapshots and the final
//! output merge the tables. `--iface` is a filter in the kernel ([`filter`]).
//!
//! Where it looks: AF_PACKET's taps are where tcpdump's are. On ingress,
//! before tc ingress and netfilter; on egress, after tc egress, and before
//! segmentation when the device does TSO/GSO (veth, most NICs), so it sees
//! the same super-packets as tc egress. tc counts such a packet as its
//! `gso_segs`; here the virtio-net header's `gso_size` gives the same number
//! ([`crate::sources::ingest::Captured::gso_size`]), so `packets` and `retransmits`
//! (segments) equal tc's, and bytes are exact either way (lengths come from
//! the IP header or `tp_len`, not from the cut copy).

mod filter;
mod merge;
mod ring;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use flowtable::{FlowTable, FrameStats};
use probe_common::Decap;

pub use ring::KernelStats;
use ring::{Cursor, Frame, Ring};

use crate::os::clock::realtime_ns;
use crate::os::links::{Event, Link};
use crate::sources::{ingest, AfpacketHealth, Health, KeyFeed, Links, Reading, Source};

/// One ring's table.
#[derive(Default)]
struct Shard {
    table: FlowTable,
    frames: FrameStats,
    decap: Decap,
}

/// The rings and their reader threads.
pub struct AfpacketSource {
    rings: Arc<[Ring]>,
    shards: Arc<[Mutex<Shard>]>,
    /// Set to stop the readers; a reader that fails sets it too.
    done: Arc<AtomicBool>,
    workers: Vec<JoinHandle<Result<()>>>,
    named: Named,
    kernel: KernelStats,
    /// The kernel's counters are 32-bit: read often enough not to wrap.
    next_stats: Instant,
    retire: Retire,
    /// Split records among the retired ones so far.
    split_retired: u64,
}

/// When a connection leaves the tables: over (`closed`/`idle`, as the
/// eBPF source drains) and then listed for `keep_ended`.
#[derive(Clone, Copy, Debug)]
pub struct Retire {
    pub closed: Duration,
    pub idle: Duration,
    pub keep_ended: Duration,
}

/// Opens one ring per CPU in one fanout group; `only`: the interfaces
/// named with --iface (empty: every interface); `per_iface`: key
/// connections per interface (`--per-interface`); `decap`: which tunnels
/// to look into.
pub fn open(
    only: &[String],
    per_iface: bool,
    decap: Decap,
    retire: Retire,
) -> Result<AfpacketSource> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    let blocks = ring::blocks_per_ring(n);
    let rings = (0..n)
        .map(|_| Ring::open(blocks))
        .collect::<Result<Vec<_>>>()?;
    let group = rings[0].join_fanout(None)?;
    for r in &rings[1..] {
        r.join_fanout(Some(group))?;
    }
    // The fanout hash is the flow's, so every copy of a connection's
    // packets, whatever the interface, reaches the same ring's table.
    let shards: Vec<Mutex<Shard>> = rings
        .iter()
        .map(|_| {
            Mutex::new(Shard {
                table: if per_iface {
                    FlowTable::per_interface()
                } else {
                    FlowTable::new()
                },
                frames: FrameStats::default(),
                decap,
            })
        })
        .collect();
    Ok(AfpacketSource {
        rings: rings.into(),
        shards: shards.into(),
        done: Arc::new(AtomicBool::new(false)),
        workers: Vec::new(),
        named: Named::new(only),
        kernel: KernelStats::default(),
        next_stats: Instant::now() + Duration::from_secs(1),
        retire,
        split_retired: 0,
    })
}

impl AfpacketSource {
    fn set_filters(&self) -> Result<()> {
        let only = self.named.indexes();
        for r in self.rings.iter() {
            r.set_filter(only.as_deref())?;
        }
        Ok(())
    }

    fn add_kernel_stats(&mut self) -> Result<()> {
        for r in self.rings.iter() {
            self.kernel.add(&r.stats()?);
        }
        Ok(())
    }

    /// Waits for the readers (they stop once `done` is set); the first
    /// reader's error.
    fn join(&mut self) -> Result<()> {
        let mut first_err = None;
        for w in std::mem::take(&mut self.workers) {
            let r = w
                .join()
                .map_err(|_| anyhow!("an AF_PACKET reader thread panicked"))
                .and_then(|r| r);
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn reading(&mut self) -> Result<Reading> {
        let now = realtime_ns();
        let r = self.retire;
        let ns = |d: Duration| d.as_nanos() as u64;
        let (closed, idle) = (ns(r.closed + r.keep_ended), ns(r.idle + r.keep_ended));
        let mut per_ring = Vec::new();
        let mut retired_per_ring = Vec::new();
        for sh in self.shards.iter() {
            let mut sh = lock(sh)?;
            retired_per_ring.push(sh.table.retire(now, closed, idle));
            per_ring.push(sh.table.connections());
        }
        let (conns, split) = merge::merge(per_ring);
        let (retired, split_retired) = merge::merge(retired_per_ring);
        // Retired records are not listed again: keep their merges counted.
        self.split_retired += split_retired;
        let split = split + self.split_retired;
        let mut frames = FrameStats::default();
        for sh in self.shards.iter() {
            frames.merge(&lock(sh)?.frames);
        }
        Ok(Reading {
            conns,
            retired,
            health: Health::Afpacket(AfpacketHealth {
                rings: self.rings.len(),
                kernel: self.kernel,
                frames,
                split,
            }),
            nat: None,
            attrib: None,
        })
    }
}

impl Source for AfpacketSource {
    fn start(&mut self, links: &[Link]) -> Result<()> {
        self.named.resync(links);
        // Only now that every ring is in the group: before, a ring could get
        // a packet that another also got through the group.
        self.set_filters()?;
        for i in 0..self.rings.len() {
            let (rings, shards, done) =
                (self.rings.clone(), self.shards.clone(), self.done.clone());
            let w = std::thread::Builder::new()
                .name(format!("afpacket-{i}"))
                .spawn(move || {
                    let res = read_ring(&rings[i], &shards, i, &done);
                    if res.is_err() {
                        // Stop the run rather than count on with one ring fewer.
                        done.store(true, Ordering::Release);
                    }
                    res
                })?;
            self.workers.push(w);
        }
        Ok(())
    }

    fn links(&mut self, change: Links<'_>) -> Result<()> {
        let before = self.named.indexes();
        match change {
            Links::Events(events) => {
                for ev in events {
                    match ev {
                        Event::New(l) => self.named.new_link(l),
                        Event::Del(l) => self.named.del_link(l),
                    }
                }
            }
            Links::Resync(now) => self.named.resync(now),
        }
        if self.named.indexes() != before {
            self.set_filters()?;
        }
        Ok(())
    }

    fn poll(&mut self) -> Result<()> {
        if self.done.load(Ordering::Acquire) {
            // A reader failed: its error ends the run.
            self.join()?;
            bail!("an AF_PACKET reader stopped");
        }
        if Instant::now() >= self.next_stats {
            self.add_kernel_stats()?;
            self.next_stats = Instant::now() + Duration::from_secs(1);
        }
        Ok(())
    }

    fn read(&mut self) -> Result<Reading> {
        self.reading()
    }

    fn finish(mut self: Box<Self>) -> Result<Reading> {
        self.done.store(true, Ordering::Release);
        self.join()?;
        self.add_kernel_stats()?;
        self.reading()
    }

    fn key_feed(&self) -> Option<KeyFeed> {
        None
    }
}

/// One ring's thread: waits for blocks and counts their frames, until
/// `done`.
/// `home`: this ring's own table, where its frames without a connection
/// are counted; a frame with one goes to the table of its connection
/// ([`ingest::shard_of`]), whichever ring the kernel put it in.
fn read_ring(ring: &Ring, shards: &[Mutex<Shard>], home: usize, done: &AtomicBool) -> Result<()> {
    let mut cur = Cursor::default();
    let mut failed = false;
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
        let decap = lock(&shards[home])?.decap;
        ring.drain(&mut cur, |f| {
            if observe(shards, home, decap, f).is_err() {
                failed = true;
            }
        });
        if failed {
            return Err(anyhow!("an AF_PACKET reader thread panicked"));
        }
        if stopping {
            return Ok(());
        }
    }
}

/// One frame into the table of its connection. The kernel's fanout hash
/// keeps a plain connection's two directions in one ring, but not a
/// tunnelled one's: the outer headers differ per direction (a VXLAN
/// sender picks its UDP source port from the inner flow's one-way hash),
/// so its directions can arrive in two rings. Each direction of a
/// connection still comes through one ring, in order.
fn observe(shards: &[Mutex<Shard>], home: usize, decap: Decap, f: &Frame) -> Result<()> {
    // On a loopback interface every packet is seen twice: leaving
    // (PACKET_OUTGOING) and coming back in (PACKET_HOST). Counting both
    // would count it twice, the second time as a retransmission. Keep the
    // incoming copy: the one tc ingress, the tc backend's only hook on lo,
    // sees too.
    if f.hatype == libc::ARPHRD_LOOPBACK && f.pkttype == libc::PACKET_OUTGOING {
        return Ok(());
    }
    let c = ingest::Captured {
        ts_ns: f.ts_ns,
        iface: f.ifindex,
        link: f.link(),
        data: f.data,
        wire_len: f.wire_len,
        gso_size: f.gso_size.into(),
        decap,
    };
    let parsed = {
        let mut sh = lock(&shards[home])?;
        sh.frames.frames += 1;
        ingest::parse(&mut sh.frames, &c)
    };
    if let Some((p, encap)) = parsed {
        let mut sh = lock(&shards[ingest::shard_of(&p, shards.len())])?;
        let sh = &mut *sh;
        ingest::count(&mut sh.table, &mut sh.frames, &c, &p, &encap);
    }
    Ok(())
}

fn lock(m: &Mutex<Shard>) -> Result<std::sync::MutexGuard<'_, Shard>> {
    m.lock()
        .map_err(|_| anyhow!("an AF_PACKET reader thread panicked"))
}

/// The interfaces named with --iface and their current indexes (a named
/// interface created again has a new index).
struct Named {
    /// Empty: every interface.
    names: Vec<String>,
    index: BTreeMap<String, u32>,
}

impl Named {
    fn new(names: &[String]) -> Named {
        Named {
            names: names.to_vec(),
            index: BTreeMap::new(),
        }
    }

    fn resync(&mut self, links: &[Link]) {
        self.index.clear();
        for l in links {
            self.new_link(l);
        }
    }

    fn new_link(&mut self, l: &Link) {
        if self.names.contains(&l.name) {
            self.index.insert(l.name.clone(), l.index);
        }
        // Renamed away from a named one.
        self.index
            .retain(|name, &mut i| i != l.index || *name == l.name);
    }

    fn del_link(&mut self, l: &Link) {
        self.index.retain(|_, &mut i| i != l.index);
    }

    /// The filter's interface list: `None` for every interface.
    fn indexes(&self) -> Option<Vec<u32>> {
        (!self.names.is_empty()).then(|| self.index.values().copied().collect())
    }
}
