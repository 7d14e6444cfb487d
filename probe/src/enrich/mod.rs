//! Enrichment, the stage after the sources: first NAT undone ([`nat`]: a
//! connection this host translated is one record, with both addresses),
//! then each end of a connection joined to the process, container and
//! service that own its socket. A resolver
//! pass runs every [`INTERVAL`] on a thread of its own, so that a
//! connection is joined to its process while its socket still exists, and
//! once more at every report ([`Attribution::tag`]). Each pass reads the
//! keys new to the source since the last one (a [`KeyFeed`] the run loop
//! got from the source: for eBPF, a second mapping of the kernel's table)
//! and looks up the sockets of keys it has not settled yet, but for ends
//! whose socket owner the kernel recorded ([`owners`]: named from that,
//! without a sock_diag lookup); every [`DUMP_EVERY`] it also dumps all
//! sockets (a walk of the kernel's whole socket hash table per namespace,
//! too costly to do every pass). The join itself lives in [`flowtable::attrib`]; this
//! module is the operating system side ([`host::ProcHost`]).
//!
//! `FLOWPROBE_ATTRIB=off` turns it off; `FLOWPROBE_ATTRIB_STATS=1` prints
//! its CPU cost at exit (the benchmark reads that line);
//! `FLOWPROBE_ATTRIB_INTERVAL_MS` changes the pass interval.

mod cgroupid;
mod conntrack;
mod host;
mod memo;
pub mod nat;
mod owners;
mod procfs;
mod procnet;
mod sockdiag;

/// This host's name (`/proc/sys/kernel/hostname`).
pub fn host_name() -> Option<String> {
    procfs::host_name()
}

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flowtable::attrib::{AttribHealth, Options, PassStats, Proto, Resolver, Tuple};
use flowtable::Connection;
use probe_common::ConnKey;

use self::host::ProcHost;
use crate::os::caps::{self, CapSet};
use crate::os::clock::{monotonic_ns, thread_cpu_ns};
use crate::sources::{KeyFeed, OwnerFeed};

/// Between passes. A connection that opens and closes within one interval
/// can be missed; 20 ms sees a 50 ms connection twice or more.
pub const INTERVAL: Duration = Duration::from_millis(20);

/// Between dumps of every socket. Lookups find every connection the probe
/// sees; dumps add sockets without traffic yet (listeners, idle
/// connections older than the run). A dump walks the kernel's whole TCP
/// hash table, with every namespace's TIME_WAIT sockets in it (about 60000
/// at 1000 connections a second), once per namespace and family: costly.
pub const DUMP_EVERY: Duration = Duration::from_secs(10);

/// Between dumps when there is no kernel map to follow (AF_PACKET): dumps
/// are then the only way to see a socket before the report, so a
/// connection shorter than this may go unattributed.
pub const DUMP_EVERY_WITHOUT_MAP: Duration = Duration::from_secs(1);

struct State {
    resolver: Mutex<Resolver<ProcHost>>,
    cgroups: Mutex<cgroupid::CgroupIds>,
    owners: Mutex<owners::Owners>,
    owner_feed: Mutex<Option<OwnerFeed>>,
    memo: Mutex<memo::Memo>,
    /// The ends the last reading names by their process ([`memo`]).
    named: Mutex<Arc<memo::NamedEnds>>,
    stop: AtomicBool,
    /// Thread CPU time spent in passes, ns.
    cpu_ns: AtomicU64,
    passes: AtomicU64,
    totals: Mutex<PassStats>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding it leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Running attribution; stops (and reports its cost when asked) on drop.
pub struct Attribution {
    shared: Option<Arc<State>>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the resolver thread, unless `FLOWPROBE_ATTRIB=off`. With a key
/// feed (the eBPF source) it follows the source's connections as they
/// appear; without (AF_PACKET) it dumps every socket each
/// [`DUMP_EVERY_WITHOUT_MAP`] and looks up what each report holds. The
/// recorded socket owners are bounded by the kernel table's capacity
/// ([`owners::socket_bound`]).
pub fn start(
    feed: Option<KeyFeed>,
    owner_feed: Option<OwnerFeed>,
    forget_after: Duration,
    table_capacity: usize,
) -> Attribution {
    if !enabled() {
        return Attribution {
            shared: None,
            thread: None,
        };
    }
    let interval = std::env::var("FLOWPROBE_ATTRIB_INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(INTERVAL);
    let host = ProcHost::new();
    let mut feed = feed;
    let dump_every = if feed.is_some() {
        DUMP_EVERY
    } else {
        DUMP_EVERY_WITHOUT_MAP
    };
    if let Some(line) = partial(CapSet::effective().ok(), dump_every, owner_feed.is_some()) {
        eprintln!("flowprobe: {line}");
    }
    let opts = Options {
        own_netns: host.own_netns(),
        dumps_every_ns: dump_every.as_nanos() as u64,
        forget_after_ns: forget_after.as_nanos() as u64,
        ..Options::default()
    };
    let shared = Arc::new(State {
        resolver: Mutex::new(Resolver::new(host, opts)),
        cgroups: Mutex::new(cgroupid::CgroupIds::default()),
        owners: Mutex::new(owners::Owners::new(owners::socket_bound(table_capacity))),
        owner_feed: Mutex::new(owner_feed),
        memo: Mutex::new(memo::Memo::default()),
        named: Mutex::default(),
        stop: AtomicBool::new(false),
        cpu_ns: AtomicU64::new(0),
        passes: AtomicU64::new(0),
        totals: Mutex::new(PassStats::default()),
        started: Instant::now(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name("attrib".to_owned())
        .spawn(move || {
            let (mut keys, mut seen) = (Vec::new(), Vec::new());
            let mut next_pass = Instant::now();
            while !s.stop.load(Ordering::Relaxed) {
                let draining = drain_owners(&s);
                let now = Instant::now();
                if now < next_pass {
                    std::thread::park_timeout((next_pass - now).min(owners::DRAIN_EVERY));
                    continue;
                }
                next_pass = now + interval;
                let t0 = thread_cpu_ns();
                keys.clear();
                seen.clear();
                if let Some(f) = &mut feed {
                    if let Err(e) = f(&mut keys, SMALL_FEED) {
                        eprintln!("flowprobe: attribution: {e:#}; joining at each report only");
                        feed = None;
                    }
                }
                s.cpu_ns
                    .fetch_add(thread_cpu_ns().saturating_sub(t0), Ordering::Relaxed);
                // The owners of the keys just read: a client's socket is
                // recorded before its first packet, so none of them needs a
                // lookup.
                drain_owners(&s);
                // A slice of the keys at a time (every key comes once a
                // second, and each is two 5-tuples to look at): the run
                // loop's `tag` may take the resolver in between, and no
                // buffer holds every key. One pass at least: dumps and
                // retries are due without keys.
                let none: &[ConnKey] = &[];
                for chunk in keys
                    .chunks(SEEN_AT_ONCE)
                    .chain(keys.is_empty().then_some(none))
                {
                    seen.clear();
                    seen.extend(chunk.iter().filter_map(key_ends).flatten());
                    pass(&s, &mut lock(&s.resolver), &seen);
                }
                if !draining {
                    std::thread::park_timeout(interval);
                }
            }
        })
        .map_err(|e| eprintln!("flowprobe: attribution: cannot start its thread: {e}"))
        .ok();
    Attribution {
        shared: Some(shared),
        thread,
    }
}

/// Keys the attribution thread looks at in one pass at most (the rest at
/// the next ones), and keeps room for between passes.
const SMALL_FEED: usize = 4096;

/// Keys turned into 5-tuples for one pass (two each, 68 bytes a tuple:
/// the buffer stays below the allocator's mmap threshold, and is reused).
const SEEN_AT_ONCE: usize = 1024;

/// Attribution runs (`FLOWPROBE_ATTRIB` is not `off`).
pub fn enabled() -> bool {
    std::env::var("FLOWPROBE_ATTRIB").as_deref() != Ok("off")
}

/// The socket-owner programs are wanted (`FLOWPROBE_ATTRIB_CONNECT` is not
/// `off`; off, for benchmarks, ends are found by sock_diag only).
pub fn at_connect() -> bool {
    std::env::var("FLOWPROBE_ATTRIB_CONNECT").as_deref() != Ok("off")
}

/// What attribution cannot do with the capabilities `have` (unknown: all
/// of them, for lack of a better guess), in one line; `None` when it lacks
/// nothing. Said once at start: the denials themselves are only counted.
fn partial(have: Option<CapSet>, dump_every: Duration, at_connect: bool) -> Option<String> {
    let lacks = |c: &[caps::Cap]| -> Vec<caps::Cap> {
        c.iter()
            .copied()
            .filter(|&c| !have.is_some_and(|h| h.has(c)))
            .collect()
    };
    let mut parts = Vec::new();
    let procs = lacks(&[caps::SYS_PTRACE, caps::DAC_READ_SEARCH]);
    if !procs.is_empty() {
        parts.push(format!(
            "without {} the sockets of other users' processes are not joined to them{}",
            caps::names(&procs),
            if at_connect {
                " (but for those they connect while it runs, named from what the kernel recorded: pid, process, container)"
            } else {
                ""
            }
        ));
    }
    if !lacks(&[caps::SYS_ADMIN]).is_empty() {
        parts.push(format!(
            "without CAP_SYS_ADMIN sockets in other network namespaces are seen only by the dumps every {} s",
            dump_every.as_secs()
        ));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "attribution is partial: {} (docs/service.md)",
            parts.join("; ")
        )
    })
}

/// Turns the socket owners recorded since the last call into owners;
/// false when there is no feed (any more).
fn drain_owners(s: &State) -> bool {
    let mut feed = lock(&s.owner_feed);
    let Some(f) = feed.as_mut() else {
        return false;
    };
    let t0 = thread_cpu_ns();
    let mut recs = Vec::new();
    if let Err(e) = f(&mut recs) {
        eprintln!("flowprobe: attribution: socket owners: {e:#}");
        *feed = None;
    }
    drop(feed);
    if !recs.is_empty() {
        let mut r = lock(&s.resolver);
        lock(&s.owners).ingest(&recs, &mut r, &mut lock(&s.cgroups));
    }
    s.cpu_ns
        .fetch_add(thread_cpu_ns().saturating_sub(t0), Ordering::Relaxed);
    true
}

/// One resolver pass, timed in thread CPU time; failures said once each.
/// An end whose socket owner the kernel recorded is named from that
/// record, not looked up; nor is an end the listing names
/// ([`memo::NamedEnds`]), whose socket a dump leaves alone too. The named
/// ends are read with the records held: a socket is released only once
/// its end is among them ([`Attribution::remember`]), so every socket is
/// one or the other.
fn pass(s: &State, r: &mut Resolver<ProcHost>, seen: &[Tuple]) {
    let t0 = thread_cpu_ns();
    let owners = lock(&s.owners);
    let named = Arc::clone(&lock(&s.named));
    let st = r.refresh_skipping(
        monotonic_ns(),
        seen,
        |t| owners.recorded(t),
        |t| named.contains(t),
    );
    drop(owners);
    s.cpu_ns
        .fetch_add(thread_cpu_ns().saturating_sub(t0), Ordering::Relaxed);
    s.passes.fetch_add(1, Ordering::Relaxed);
    let mut t = lock(&s.totals);
    t.sockets = t.sockets.max(st.sockets);
    t.namespaces = t.namespaces.max(st.namespaces);
    t.attributed += st.attributed;
    t.lookups += st.lookups;
    t.skipped += st.skipped;
    t.fd_scans += st.fd_scans;
    t.full_scans += st.full_scans;
    t.errors += st.errors;
    if let Some(e) = r.take_error() {
        if t.errors == st.errors {
            eprintln!("flowprobe: attribution: {e}");
        }
    }
}

impl Attribution {
    /// Fills `src_tags` / `dst_tags` of `conns` after one more pass (a
    /// connection that started since the last pass is caught now, if its socket
    /// still exists); connections settled at an earlier call get the same
    /// tags again ([`memo`]). Does nothing when attribution is off.
    pub fn tag(&self, conns: &mut [Connection]) {
        self.tag_some(conns, true);
    }

    /// The reading's listed connections as the sinks keep them, tagged:
    /// the next reading's settled ends are given their tags from them.
    pub fn remember(&self, listed: Arc<Vec<Connection>>) {
        if let Some(s) = &self.shared {
            // Named first, released after: a pass sees each socket as one
            // or the other (see `pass`).
            let mut memo = lock(&s.memo);
            memo.remember(Arc::clone(&listed));
            *lock(&s.named) = Arc::new(memo.named_ends(ends));
            drop(memo);
            lock(&s.owners).release(&listed);
        }
    }

    /// [`Attribution::tag`]; `listed`: `conns` are the reading's listed
    /// connections, not those it retires.
    fn tag_some(&self, conns: &mut [Connection], listed: bool) {
        let Some(s) = &self.shared else {
            return;
        };
        drain_owners(s);
        let mut memo = lock(&s.memo);
        let dump = lock(&s.resolver).dumped_at();
        let p = memo.reuse(conns, dump);
        let todo = p.todo;
        join(s, &mut conns[..todo]);
        // Judged after this call's pass, and its dump if one was due.
        let dump = lock(&s.resolver).dumped_at();
        memo.keep(conns, p, dump, listed);
    }

    /// How it fares, for `/metrics`; `None` when it is off.
    pub fn health(&self) -> Option<AttribHealth> {
        let s = self.shared.as_ref()?;
        let r = lock(&s.resolver);
        let t = lock(&s.totals);
        let o = lock(&s.owners);
        let (sets, sets_let_go) = r.tag_sets();
        Some(AttribHealth {
            remembered: r.remembered() as u64,
            lookups: t.lookups as u64,
            attributed: t.attributed as u64,
            errors: t.errors as u64,
            denied: r.denied as u64,
            owners_recorded: o.recorded,
            owners_held: o.held() as u64,
            owners_limit: o.limit() as u64,
            owners_forgotten: o.evicted,
            listeners_held: o.listeners_held() as u64,
            listeners_limit: owners::MAX_LISTENERS as u64,
            listeners_forgotten: o.listeners_evicted,
            settled: lock(&s.memo).len() as u64,
            tag_sets: sets as u64,
            tag_sets_limit: flowtable::Interner::MAX as u64,
            tag_sets_let_go: sets_let_go,
            netns_ids: o.netns_held() as u64,
            netns_ids_limit: owners::MAX_NETNS as u64,
            netns_ids_cleared: o.netns_cleared,
        })
    }

    /// Tags `retired` connections (listed for the last time), then forgets
    /// their sockets: what the resolver remembers follows the listing.
    pub fn tag_and_forget(&self, retired: &mut [Connection]) {
        if retired.is_empty() {
            return;
        }
        self.tag_some(retired, false);
        if let Some(s) = &self.shared {
            lock(&s.resolver).forget(&tuples(retired));
            lock(&s.owners).forget(retired);
        }
    }
}

/// Joins each end of `conns` to its owner afresh, but for ends given
/// their process's tags from the last reading ([`memo`]).
fn join(s: &State, conns: &mut [Connection]) {
    let seen: Vec<Tuple> = conns
        .iter()
        .flat_map(|c| ends(c).into_iter().zip([&c.src_tags, &c.dst_tags]))
        .filter(|(_, tags)| !memo::named(tags))
        .map(|(t, _)| t)
        .collect();
    let mut r = lock(&s.resolver);
    pass(s, &mut r, &seen);
    let owners = lock(&s.owners);
    // Ends whose socket the kernel recorded, named from that record (the
    // resolver keeps no copy of it).
    r.tag_recorded(conns, |t| owners.recorded(t));
    // Ends no pass found a process for: the owner the kernel recorded
    // for their socket, by its cookie, or by port and peer at connect time.
    owners.tag(&mut r, conns);
    drop(owners);
    // Ends the resolver found no process for: their container from the
    // cgroup id the tc program saw on the socket.
    lock(&s.cgroups).tag(conns);
}

/// Both ends' 5-tuples of each connection: the initiator's as it sent
/// them, the responder's beyond any translation (`flowtable::nat`).
fn tuples(conns: &[Connection]) -> Vec<Tuple> {
    conns.iter().flat_map(ends).collect()
}

/// The initiator's and the responder's 5-tuple of `c` ([`tuples`]).
fn ends(c: &Connection) -> [Tuple; 2] {
    let (src_far, dst_far) = flowtable::nat::beyond(c);
    [
        Tuple::new(c.proto, (c.src, c.sport).into(), (c.dst, c.dport).into()),
        Tuple::new(c.proto, dst_far, src_far),
    ]
}

/// Both ends' 5-tuples of a map key (addresses as `conn.rs` renders them).
fn key_ends(k: &ConnKey) -> Option<[Tuple; 2]> {
    let proto = match k.proto as i32 {
        libc::IPPROTO_TCP => Proto::Tcp,
        libc::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let ip = |a: &[u8; 16]| -> std::net::IpAddr {
        if k.family == 4 {
            std::net::Ipv4Addr::new(a[12], a[13], a[14], a[15]).into()
        } else {
            std::net::Ipv6Addr::from(*a).into()
        }
    };
    Some(Tuple::ends(
        proto,
        (ip(&k.lo), k.lo_port).into(),
        (ip(&k.hi), k.hi_port).into(),
    ))
}

impl Drop for Attribution {
    fn drop(&mut self) {
        let Some(s) = self.shared.take() else { return };
        s.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        if let Some(w) = &lock(&s.resolver).host().warning {
            eprintln!("flowprobe: attribution: {w}");
        }
        if std::env::var("FLOWPROBE_ATTRIB_STATS").as_deref() == Ok("1") {
            let wall = s.started.elapsed().as_secs_f64();
            let cpu = s.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9;
            let t = lock(&s.totals);
            eprintln!(
                "flowprobe: attribution: {} passes in {wall:.2} s, resolver CPU {:.3} s = {:.2}% of one core; \
                 up to {} namespaces and {} sockets per dump; {} lookups, {} skipped (owner recorded, or end named), {} sockets attributed, {} fd tables read, {} full scans, {} errors, {} denied",
                s.passes.load(Ordering::Relaxed),
                cpu,
                100.0 * cpu / wall.max(1e-9),
                t.namespaces,
                t.sockets,
                t.lookups,
                t.skipped,
                t.attributed,
                t.fd_scans,
                t.full_scans,
                t.errors,
                lock(&s.resolver).denied,
            );
            let o = lock(&s.owners);
            eprintln!(
                "flowprobe: attribution: {} socket owners recorded at connect, {} of processes gone before read, {} forgotten for room, {} once their end was named; \
                 {} listeners recorded, {} accepted sockets joined to their listener's owner ({} to one a pass found), {} to none; {} listeners forgotten for room",
                o.recorded, o.gone, o.evicted, o.released, o.listens, o.accepted, o.accepted_by_pass, o.accepted_unknown, o.listeners_evicted
            );
            let m = lock(&s.memo);
            eprintln!(
                "flowprobe: attribution: {} connection readings given their settled tags again, {} joined afresh; {} remembered at exit",
                m.reused, m.joined, m.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_partial_attribution_lacks() {
        let set = |c: &[caps::Cap]| Some(CapSet(c.iter().map(|c| 1 << c.bit).sum()));
        let all = [caps::SYS_PTRACE, caps::DAC_READ_SEARCH, caps::SYS_ADMIN];
        assert_eq!(partial(set(&all), DUMP_EVERY, false), None);
        assert_eq!(
            partial(set(&all[..2]), DUMP_EVERY, false).unwrap(),
            "attribution is partial: without CAP_SYS_ADMIN sockets in other network namespaces are seen only by the dumps every 10 s (docs/service.md)"
        );
        let none = partial(None, DUMP_EVERY_WITHOUT_MAP, false).unwrap();
        assert!(
            none.contains("without CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH the sockets")
                && none.contains("CAP_SYS_ADMIN sockets in other network namespaces are seen only by the dumps every 1 s"),
            "{none}"
        );
        assert!(partial(set(&all[1..]), DUMP_EVERY, true)
            .unwrap()
            .contains("without CAP_SYS_PTRACE the"));
    }
}
