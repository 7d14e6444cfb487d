//! `flowprobe run`: the tc eBPF program on live interfaces.
//!
//! Loads the classifier, attaches it to clsact ingress and egress of each
//! interface (adding the clsact qdisc where there is none, and remembering
//! that), waits for `--duration` or SIGINT/SIGTERM, detaches, reads the
//! kernel's connection map and turns every entry into a [`Connection`].
//! It removes only what it added.
//!
//! Which interfaces: without `--iface`, every interface of the current
//! network namespace that is up, lo included (loopback traffic is traffic
//! too; on a loopback interface ingress only, which sees every packet
//! once), and every interface that comes up while it runs; with `--iface`,
//! the named ones (also when they are re-created). It learns of changes from
//! rtnetlink link events ([`links`]). An interface that goes down stays
//! attached; one that is deleted or leaves the namespace is forgotten (its
//! filters and qdisc went with it). What a killed run left is removed at
//! start ([`stale`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, PerCpuArray};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use flowtable::{sort_connections, Connection, FrameStats};
use probe_common::ParseError;

use crate::clock::{monotonic_ns, realtime_ns};

/// The tc program, built and embedded by `build.rs`; empty when it could
/// not be built, and then [`MISSING`] says why.
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf.o"));
const MISSING: &str = env!("FLOWPROBE_EBPF_MISSING");
const PROGRAM: &str = "flowprobe_tc";

mod drain;
pub(crate) mod links;
mod stale;
pub(crate) mod table;
mod xdp;

/// Where the program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc clsact ingress and egress: everything an interface receives and
    /// sends.
    Tc,
    /// XDP: what an interface receives (see [`xdp`]).
    Xdp,
}

pub struct Options {
    pub hook: Hook,
    /// Only these interfaces; empty: every interface that is up.
    pub ifaces: Vec<String>,
    pub duration: Option<Duration>,
    pub ebpf_object: Option<PathBuf>,
    pub max_conns: u32,
    /// Call `on_snapshot` with every connection this often while running.
    pub interval: Option<Duration>,
    /// Move a closed connection out of the kernel map this long after its
    /// last packet; any connection after `idle_timeout` ([`drain`]).
    pub closed_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The eBPF backend cannot run here at all (no object, not root, the
/// kernel refuses the program or its maps), as opposed to failing on an
/// interface: `--backend auto` counts with AF_PACKET instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

fn unavailable(e: anyhow::Error) -> anyhow::Error {
    Unavailable(format!("{e:#}")).into()
}

/// What a run saw, for the summary line.
pub struct Outcome {
    pub conns: Vec<Connection>,
    /// Packets the program saw: tracked, or skipped by reason.
    pub stats: FrameStats,
    /// Packets of new connections not counted: every slot they may take in
    /// the table was in use.
    pub map_full: u64,
    /// Packets of new connections not counted: their slots kept changing.
    pub insert_failed: u64,
    /// Packets whose connection entry stayed locked by another CPU, so
    /// they were counted without the tracker: counts exact, retransmit call
    /// lost.
    pub contended: u64,
    pub hook: Hook,
    /// XDP: (interface, "native" or "generic") for every attachment.
    pub xdp_modes: Vec<(String, &'static str)>,
    /// Entries in the kernel map at the read (for the agent's table fill).
    pub in_map: usize,
    /// Interfaces attached at the read; empty in the final outcome (read
    /// after detaching).
    pub attached: Vec<String>,
}

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

pub(crate) fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let prev = unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
        if prev == libc::SIG_ERR {
            bail!("cannot install a handler for signal {sig}");
        }
    }
    Ok(())
}

/// One interface we attached to, and what to undo there.
struct Attached {
    index: u32,
    iface: String,
    created_clsact: bool,
    links: Vec<aya::programs::tc::SchedClassifierLinkId>,
    xdp: Option<(aya::programs::xdp::XdpLinkId, &'static str)>,
}

/// The interfaces we are attached to, and which ones we want.
struct Attachments {
    hook: Hook,
    /// Named with --iface; empty: all that are up.
    only: Vec<String>,
    list: Vec<Attached>,
    lock: Option<stale::NetnsLock>,
}

impl Attachments {
    fn wanted(&self, l: &links::Link) -> bool {
        if self.only.is_empty() {
            l.up
        } else {
            self.only.contains(&l.name)
        }
    }

    fn record_clsact(&self) {
        if let Some(lock) = &self.lock {
            let names: Vec<String> = self
                .list
                .iter()
                .filter(|a| a.created_clsact)
                .map(|a| a.iface.clone())
                .collect();
            lock.record_clsact(&names);
        }
    }

    /// Attaches to `l` unless already attached there.
    fn attach(&mut self, ebpf: &mut Ebpf, l: &links::Link) -> Result<()> {
        if self.list.iter().any(|a| a.index == l.index) {
            return Ok(());
        }
        let r = match self.hook {
            Hook::Tc => attach_one(ebpf, l, &mut self.list),
            Hook::Xdp => xdp::attach(ebpf, &l.name).map(|link| {
                self.list.push(Attached {
                    index: l.index,
                    iface: l.name.clone(),
                    created_clsact: false,
                    links: Vec::new(),
                    xdp: Some(link),
                })
            }),
        };
        self.record_clsact();
        r
    }

    /// `l` is gone: its filters and qdisc went with it; forget them.
    fn forget(&mut self, ebpf: &mut Ebpf, index: u32) {
        let Some(pos) = self.list.iter().position(|a| a.index == index) else {
            return;
        };
        let a = self.list.remove(pos);
        if let Some((id, _)) = a.xdp {
            xdp::forget(ebpf, id);
        }
        if let Some(prog) = ebpf
            .program_mut(PROGRAM)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        {
            for id in a.links {
                // Dropping the link tries a detach; the device is gone, so
                // that fails, and the failure is ignored.
                drop(prog.take_link(id));
            }
        }
        self.record_clsact();
    }
}

pub fn run(opts: &Options, on_snapshot: &mut dyn FnMut(&Outcome) -> Result<()>) -> Result<Outcome> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(unavailable(anyhow::anyhow!(
            "`flowprobe run` needs root (CAP_BPF and CAP_NET_ADMIN) to load the eBPF program \
             and attach it to interfaces; run it with sudo"
        )));
    }
    let (bytes, origin) = match &opts.ebpf_object {
        Some(path) => (
            std::fs::read(path)
                .with_context(|| format!("reading {}", path.display()))
                .map_err(unavailable)?,
            path.display().to_string(),
        ),
        None if EMBEDDED.is_empty() => {
            return Err(unavailable(anyhow::anyhow!(
                "this flowprobe has no eBPF program for live capture: {MISSING} \
                 (or pass --ebpf-object; replay works without it)"
            )))
        }
        None => (EMBEDDED.to_vec(), "the embedded eBPF program".to_owned()),
    };
    let mut ebpf = load(&bytes, &origin, opts.max_conns, opts.hook).map_err(unavailable)?;
    install_signal_handlers()?;
    // Joins connections to processes while it runs; `collect` tags them.
    let _attrib = crate::attrib::start(Some(&ebpf));

    // Subscribe before the dump, so that no link change falls between.
    let mut watcher = links::Watcher::subscribe()?;
    let all = links::dump()?;
    for name in &opts.ifaces {
        if !all.iter().any(|l| &l.name == name) {
            bail!("no interface {name} in this network namespace");
        }
    }
    let lock = stale::lock()?;
    if let Some(lock) = &lock {
        if let Some(line) = lock.clean(&all, PROGRAM) {
            eprintln!("flowprobe: {line}");
        }
    }
    let mut att = Attachments {
        hook: opts.hook,
        only: opts.ifaces.clone(),
        list: Vec::new(),
        lock,
    };

    let mut res: Result<()> = Ok(());
    for l in &all {
        if att.wanted(l) {
            if let Err(e) = att.attach(&mut ebpf, l) {
                if att.only.is_empty() {
                    // Not named by the user: say so and count the others.
                    eprintln!("flowprobe: {e:#}");
                    continue;
                }
                res = Err(e);
                break;
            }
        }
    }
    let mut drainer = drain::Drainer::new(opts.closed_timeout, opts.idle_timeout);
    let mut reader = table::ConnTable::open(&ebpf)?;
    if res.is_ok() {
        res = follow(
            &mut ebpf,
            &mut att,
            &mut watcher,
            &mut drainer,
            &mut reader,
            opts,
            on_snapshot,
        );
    }
    let xdp_modes = xdp_modes(&att.list);
    // Detach before reading: the map then holds the final state.
    let cleanup = detach_all(&mut ebpf, std::mem::take(&mut att.list));
    drop(att);
    res?;
    cleanup?;
    let mut o = collect(&ebpf, &mut reader, &drainer)?;
    o.hook = opts.hook;
    o.xdp_modes = xdp_modes;
    Ok(o)
}

/// (interface, "native" or "generic") of every XDP attachment.
fn xdp_modes(list: &[Attached]) -> Vec<(String, &'static str)> {
    list.iter()
        .filter_map(|a| a.xdp.as_ref().map(|(_, mode)| (a.iface.clone(), *mode)))
        .collect()
}

/// Until --duration or a signal: follows link events, prints snapshots.
fn follow(
    ebpf: &mut Ebpf,
    att: &mut Attachments,
    watcher: &mut links::Watcher,
    drainer: &mut drain::Drainer,
    reader: &mut table::ConnTable,
    opts: &Options,
    on_snapshot: &mut dyn FnMut(&Outcome) -> Result<()>,
) -> Result<()> {
    let start = Instant::now();
    let mut next_snapshot = opts.interval.map(|i| start + i);
    let mut next_drain = start + drainer.every();
    while !STOP.load(Ordering::SeqCst) {
        if opts.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let events = match watcher.poll() {
            Ok(ev) => ev,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Events were lost: start over from a fresh dump.
                let now = links::dump()?;
                let gone: Vec<u32> = att
                    .list
                    .iter()
                    .filter(|a| !now.iter().any(|l| l.index == a.index))
                    .map(|a| a.index)
                    .collect();
                for index in gone {
                    att.forget(ebpf, index);
                }
                now.into_iter().map(links::Event::New).collect()
            }
            Err(e) => return Err(e).context("reading rtnetlink link events"),
        };
        for ev in events {
            match ev {
                links::Event::New(l) => {
                    if att.wanted(&l) {
                        if let Err(e) = att.attach(ebpf, &l) {
                            // It may be gone again already; keep running.
                            eprintln!("flowprobe: {e:#}");
                        }
                    }
                }
                links::Event::Del(l) => {
                    att.forget(ebpf, l.index);
                }
            }
        }
        if Instant::now() >= next_drain {
            drainer.pass(reader, monotonic_ns());
            next_drain = Instant::now() + drainer.every();
        }
        if let (Some(at), Some(every)) = (next_snapshot, opts.interval) {
            if Instant::now() >= at {
                let mut o = collect(ebpf, reader, drainer)?;
                o.attached = att.list.iter().map(|a| a.iface.clone()).collect();
                o.hook = att.hook;
                o.xdp_modes = xdp_modes(&att.list);
                on_snapshot(&o)?;
                next_snapshot = Some(at + every);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The program may release a connection's lock with a plain store: the
/// kernel runs on this CPU architecture, and on x86 a store is never seen
/// before the stores and loads that precede it (the kernel's own
/// `spin_unlock` is one store there). Elsewhere it keeps the exchange.
const UNLOCK_BY_STORE: u8 = cfg!(any(target_arch = "x86_64", target_arch = "x86")) as u8;

fn load(object: &[u8], origin: &str, max_conns: u32, hook: Hook) -> Result<Ebpf> {
    // The table's size is a power of two (its index is a hash masked with
    // CONNS_MASK); OCCUPIED has a bit per slot; the seed keeps anyone from
    // choosing 5-tuples that share a probe sequence.
    let slots = max_conns.max(1).next_power_of_two();
    let mask = slots - 1;
    let seed = random_seed();
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("CONNS", slots)
        .map_max_entries("OCCUPIED", slots.div_ceil(64))
        .override_global("CONNS_MASK", &mask, true)
        .override_global("CONNS_SEED", &seed, true)
        .override_global("UNLOCK_BY_STORE", &UNLOCK_BY_STORE, true)
        .load(object)
        .with_context(|| format!("loading {origin}"))?;
    if hook == Hook::Xdp {
        xdp::load(&mut ebpf)?;
        return Ok(ebpf);
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("{origin} has no program {PROGRAM}"))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("the kernel rejected {PROGRAM}"))?;
    Ok(ebpf)
}

fn attach_one(ebpf: &mut Ebpf, l: &links::Link, attached: &mut Vec<Attached>) -> Result<()> {
    let iface = &l.name;
    let created_clsact = match tc::qdisc_add_clsact(iface) {
        Ok(()) => true,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(tc::TcError::AlreadyAttached) => false,
        Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}")),
    };
    let mut a = Attached {
        index: l.index,
        iface: iface.clone(),
        created_clsact,
        links: Vec::new(),
        xdp: None,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .context("program vanished")?
        .try_into()?;
    // On a loopback interface every packet leaves through egress and comes
    // back through ingress of the same interface: one hook sees each once
    // (both would count it twice, the second time as a retransmission).
    let hooks: &[TcAttachType] = if l.loopback {
        &[TcAttachType::Ingress]
    } else {
        &[TcAttachType::Ingress, TcAttachType::Egress]
    };
    for &hook in hooks {
        match prog.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default()))
        {
            Ok(id) => a.links.push(id),
            Err(e) => {
                attached.push(a);
                return Err(e).with_context(|| format!("attaching to {iface} {hook:?}"));
            }
        }
    }
    attached.push(a);
    Ok(())
}

/// 64 random bits from the kernel.
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: `b` is a valid buffer of 8 bytes.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // No entropy source at all: any seed still spreads keys well.
        return monotonic_ns().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    u64::from_ne_bytes(b)
}

/// Whether `index` is still an interface of this namespace.
fn exists(index: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes.
    !unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) }.is_null()
}

fn detach_all(ebpf: &mut Ebpf, attached: Vec<Attached>) -> Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let mut attached = attached;
    for a in attached.iter_mut() {
        if let Some((id, _)) = a.xdp.take() {
            if let Err(e) = xdp::detach(ebpf, id) {
                if exists(a.index) {
                    eprintln!("flowprobe: detaching XDP from {}: {e:#}", a.iface);
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    if attached
        .iter()
        .all(|a| a.links.is_empty() && !a.created_clsact)
    {
        return match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        };
    }
    let prog: Option<&mut SchedClassifier> =
        ebpf.program_mut(PROGRAM).and_then(|p| p.try_into().ok());
    let Some(prog) = prog else {
        bail!("program {PROGRAM} vanished before detaching");
    };
    for a in attached {
        for id in a.links {
            if let Err(e) = prog.detach(id) {
                if !exists(a.index) {
                    // Went away just now, and its filters with it.
                    continue;
                }
                eprintln!("flowprobe: detaching from {}: {e}", a.iface);
                first_err.get_or_insert_with(|| anyhow::anyhow!("detaching from {}: {e}", a.iface));
            }
        }
        if a.created_clsact && exists(a.index) {
            if !stale::clsact_is_empty(&a.iface) {
                eprintln!(
                    "flowprobe: left the clsact qdisc we added on {}: others added filters to it",
                    a.iface
                );
                continue;
            }
            if let Err(e) = crate::tc_netlink::clsact_del(a.index) {
                let msg = format!("removing the clsact qdisc we added to {}: {e}", a.iface);
                eprintln!("flowprobe: {msg}");
                first_err.get_or_insert_with(|| anyhow::anyhow!(msg));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC, taken once per process: turns
/// `bpf_ktime_get_ns` stamps into Unix time. Once, so that a connection's
/// times read the same in every snapshot (the two clock reads are tens of
/// nanoseconds apart, and NTP slews the difference).
fn clock_offset_ns() -> u64 {
    static OFFSET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *OFFSET.get_or_init(|| realtime_ns().wrapping_sub(monotonic_ns()))
}

fn per_cpu_sum(ebpf: &Ebpf, map: &str, idx: u32) -> Result<u64> {
    let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(map)
            .with_context(|| format!("the eBPF object has no map {map}"))?,
    )?;
    Ok(m.get(&idx, 0)?.iter().sum())
}

/// `PARSE_STATS`: index 0 tracked, `e as u32 + 1` skipped for `e`.
fn parse_stats(ebpf: &Ebpf) -> Result<FrameStats> {
    let mut s = FrameStats {
        tracked: per_cpu_sum(ebpf, "PARSE_STATS", 0)?,
        ..FrameStats::default()
    };
    for e in ParseError::ALL {
        s.skipped[e as usize] = per_cpu_sum(ebpf, "PARSE_STATS", e as u32 + 1)?;
    }
    s.frames = s.tracked + s.skipped.iter().sum::<u64>();
    Ok(s)
}

fn collect(
    ebpf: &Ebpf,
    reader: &mut table::ConnTable,
    drainer: &drain::Drainer,
) -> Result<Outcome> {
    let mut live = Vec::new();
    reader.entries(&mut live)?;
    let in_map = live.len();
    let mut conns = drainer.connections(live.into_iter(), clock_offset_ns());
    crate::attrib::tag(&mut conns);
    sort_connections(&mut conns);
    Ok(Outcome {
        conns,
        stats: parse_stats(ebpf)?,
        map_full: per_cpu_sum(ebpf, "CONN_STATS", 0)?,
        insert_failed: per_cpu_sum(ebpf, "CONN_STATS", 1)? + per_cpu_sum(ebpf, "CONN_STATS", 2)?,
        contended: per_cpu_sum(ebpf, "CONN_STATS", 3)?,
        hook: Hook::Tc,
        xdp_modes: Vec::new(),
        in_map,
        attached: Vec::new(),
    })
}
