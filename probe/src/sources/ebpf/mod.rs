//! The eBPF source: the tc classifier (`flowprobe_tc`, clsact ingress and
//! egress) or the same code at XDP (`flowprobe_xdp`, [`xdp`]), counting in
//! the kernel's connection table, which userspace reads in place
//! ([`kernel_table`]) and drains of closed and idle connections while it
//! runs ([`drain`]).
//!
//! Loading is [`open`]: what fails there means eBPF cannot run here at all
//! ([`Unavailable`]). Attaching follows the namespace's interfaces
//! ([`attach`]); what a killed run left is removed first ([`stale`]).
//! With a state directory (`run --state-dir`) the table is pinned and a
//! later start adopts it, filters and all ([`pins`], docs/restart.md).

mod attach;
mod drain;
mod kernel_table;
mod owners;
mod pins;
mod stale;
mod stats;
mod xdp;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use aya::programs::SchedClassifier;
use aya::{Ebpf, EbpfLoader};
use probe_common::contract;

use self::attach::Attachments;
use self::drain::Drainer;
use self::kernel_table::KernelTable;
use crate::os::caps::{self, CapSet};
use crate::os::clock::{monotonic_ns, realtime_ns};
use crate::os::links::{Event, Link};
use crate::os::statedir::StateDir;
use crate::sources::{
    EbpfHealth, Health, Hook, KeyFeed, Links, OwnerFeed, Reading, Source, Unavailable,
};

/// The program, built and embedded by `build.rs`; empty when it could not
/// be built, and then [`MISSING`] says why.
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf.o"));
const MISSING: &str = env!("FLOWPROBE_EBPF_MISSING");
const PROGRAM: &str = contract::TC_PROGRAM;

pub struct Options {
    pub hook: Hook,
    /// Only these interfaces; empty: every interface that is up.
    pub only: Vec<String>,
    pub object: Option<PathBuf>,
    /// Slots of the kernel table (a power of two).
    pub capacity: u32,
    /// Key connections per interface (`--per-interface`) instead of one
    /// record per connection on the host.
    pub per_iface: bool,
    /// Which tunnels the program looks into.
    pub decap: probe_common::Decap,
    /// Attach the socket-owner programs to the cgroup2 root (attribution
    /// at connect time); off with `FLOWPROBE_ATTRIB=off`.
    pub owners: bool,
    /// Move a closed connection out of the kernel table this long after its
    /// last packet; any connection after `idle_timeout` ([`drain`]).
    pub closed_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a drained connection stays listed before it is retired.
    pub keep_ended: Duration,
    /// `--state-dir`: keep the kernel state for a later run, and adopt
    /// what an earlier one kept (tc only).
    pub state: Option<Arc<StateDir>>,
}

/// What a run with a state directory keeps, and what it adopted.
struct Kept {
    state: Arc<StateDir>,
    pins: PathBuf,
    /// The saved values of the run adopted from.
    adopted: Option<pins::Saved>,
    /// The table of a run whose state did not match: its filters go.
    dropped_conns: Option<u32>,
    /// Drained records taken back from the kernel at start.
    restored: usize,
}

const CLSACT_RECORD: &str = "clsact";

pub struct EbpfSource {
    ebpf: Ebpf,
    hook: Hook,
    capacity: u32,
    att: Attachments,
    table: KernelTable,
    drainer: Drainer,
    next_drain: Instant,
    /// The socket-owner programs' ring, until enrichment takes it.
    owners: Option<owners::OwnerRing>,
    /// The socket-owner programs are attached: their counters are read.
    owners_attached: bool,
    kept: Option<Kept>,
}

/// Loads the program and maps its table; attaches nothing yet.
pub fn open(opts: &Options) -> Result<EbpfSource> {
    // Capabilities, not the uid: root without CAP_BPF cannot load it, and a
    // service user with the capabilities (docs/service.md) can.
    let have = CapSet::effective().context("reading our capabilities")?;
    let missing = caps::missing_for_ebpf(have);
    if !missing.is_empty() {
        return Err(Unavailable::MissingCaps(caps::names(&missing)).into());
    }
    let (bytes, origin) = match &opts.object {
        Some(path) => (
            std::fs::read(path).map_err(|error| Unavailable::Object {
                path: path.display().to_string(),
                error,
            })?,
            path.display().to_string(),
        ),
        None if EMBEDDED.is_empty() => return Err(Unavailable::NoProgram(MISSING).into()),
        None => (EMBEDDED.to_vec(), "the embedded eBPF program".to_owned()),
    };
    let state = match (&opts.state, opts.hook) {
        (Some(s), Hook::Tc) => Some(s.clone()),
        (Some(s), Hook::Xdp) => {
            eprintln!(
                "flowprobe: --state-dir {}: the XDP hook is not kept across restarts; this run keeps nothing",
                s.dir().display()
            );
            None
        }
        (None, _) => None,
    };
    let slots = opts.capacity.max(1).next_power_of_two();
    // A state directory without a usable bpffs (not mounted where this
    // run sees it, or not writable for it) keeps nothing, said in one
    // line: counting matters more than keeping.
    let cannot_keep = |s: &StateDir, e: &anyhow::Error| {
        eprintln!(
            "flowprobe: --state-dir {}: the kernel table cannot be kept ({e:#}); this run keeps nothing for the next one",
            s.dir().display()
        )
    };
    let plan = match &state {
        Some(s) => match pins::plan(s, stale::netns_inode()?, &fingerprint(&bytes, slots, opts)) {
            Ok(p) => Some(p),
            Err(e) => {
                cannot_keep(s, &e);
                None
            }
        },
        None => None,
    };
    let mut adopted = plan.as_ref().and_then(|p| p.adopt.clone());
    let mut seed = adopted.as_ref().map_or_else(random_seed, |a| a.seed);
    if let Some(a) = &adopted {
        // The times of the adopted table's records read as before.
        let _ = CLOCK_OFFSET.set(a.clock_offset_ns);
    }
    let pin_dir = plan.as_ref().map(|p| p.pins.clone());
    let mut keep = true;
    let mut ebpf = match load(&bytes, &origin, opts, seed, pin_dir.as_deref()) {
        Ok(e) => e,
        Err(e) if adopted.is_some() => {
            // Say it and count afresh rather than not at all (the pins'
            // owner changed, a map of another shape...).
            eprintln!(
                "flowprobe: --state-dir: the kept kernel table could not be adopted ({e:#}); starting afresh"
            );
            if let Some(dir) = &pin_dir {
                pins::remove(dir);
                let _ = std::fs::create_dir_all(dir);
            }
            adopted = None;
            seed = random_seed();
            load(&bytes, &origin, opts, seed, pin_dir.as_deref())
                .map_err(|e| Unavailable::Refused(format!("{e:#}")))?
        }
        Err(e) if pin_dir.is_some() => {
            // Loaded unpinned, it counts; only the keeping failed.
            let loaded = load(&bytes, &origin, opts, seed, None)
                .map_err(|_| Unavailable::Refused(format!("{e:#}")))?;
            if let Some(s) = &state {
                cannot_keep(s, &e);
            }
            if let Some(dir) = &pin_dir {
                pins::remove(dir);
            }
            keep = false;
            loaded
        }
        Err(e) => return Err(Unavailable::Refused(format!("{e:#}")).into()),
    };
    let kept = match (state.filter(|_| keep), plan) {
        (Some(state), Some(plan)) => {
            pins::save(
                &state,
                &pins::Saved {
                    fingerprint: fingerprint(&bytes, slots, opts),
                    seed,
                    clock_offset_ns: clock_offset_ns(),
                    pins: plan.pins.clone(),
                },
            )?;
            Some(Kept {
                state,
                pins: plan.pins,
                adopted,
                dropped_conns: plan.dropped_conns,
                restored: 0,
            })
        }
        _ => None,
    };
    let owners = if opts.owners {
        owners::attach(&mut ebpf)
            .map_err(|e| {
                eprintln!(
                    "flowprobe: attribution: socket owners are not recorded at connect ({e:#}); \
                     sockets are found by sock_diag only"
                )
            })
            .ok()
    } else {
        None
    };
    if let Some(k) = &kept {
        stale::keep(&k.state.id(), Some(conns_id(&ebpf)?))?;
    }
    let mut table = KernelTable::open(&ebpf)?;
    let drainer = Drainer::new(opts.closed_timeout, opts.idle_timeout, opts.keep_ended);
    let mut att = Attachments::new(opts.hook, opts.only.clone());
    if let Some(k) = &kept {
        table.hold_drained();
        att.record_in(k.state.path(CLSACT_RECORD));
    }
    let next_drain = Instant::now() + drainer.every();
    Ok(EbpfSource {
        kept,
        att,
        hook: opts.hook,
        capacity: opts.capacity,
        ebpf,
        table,
        drainer,
        next_drain,
        owners_attached: owners.is_some(),
        owners,
    })
}

impl EbpfSource {
    /// With a state directory: takes over the filters of the run adopted
    /// from (or removes those of a state that did not match), saying in
    /// one line what was adopted.
    fn adopt(&mut self, links: &[Link]) -> Result<()> {
        let Some(k) = &self.kept else { return Ok(()) };
        let recorded = k.state.read(CLSACT_RECORD)?.unwrap_or_default();
        let recorded: Vec<String> = String::from_utf8_lossy(&recorded)
            .lines()
            .map(str::to_owned)
            .collect();
        if let Some(old) = k.dropped_conns {
            self.att
                .adopt(&mut self.ebpf, links, old, &recorded, false)?;
        }
        if k.adopted.is_none() {
            return Ok(());
        }
        let conns = conns_id(&self.ebpf)?;
        let (taken, removed) = self
            .att
            .adopt(&mut self.ebpf, links, conns, &recorded, true)?;
        let mut live = Vec::new();
        self.table.order(&mut live);
        let mut line = format!(
            "flowprobe: adopted the kernel table kept in {}: {} connections open, {} drained not yet retired; its filters taken over on {taken} hooks",
            k.state.dir().display(),
            live.len(),
            k.restored,
        );
        if removed > 0 {
            line += &format!(" ({removed} more removed)");
        }
        eprintln!("{line}");
        Ok(())
    }

    fn reading(&mut self) -> Result<Reading> {
        let mut live = Vec::new();
        self.table.order(&mut live);
        let entries = live.len();
        let table = &self.table;
        let listing =
            self.drainer
                .read(&live, |i| table.entry(i), clock_offset_ns(), monotonic_ns());
        // In drain order then the map's: the run loop sorts once tagged.
        Ok(Reading {
            conns: listing.conns,
            retired: listing.retired,
            health: Health::Ebpf(EbpfHealth {
                hook: self.hook,
                attached: self.att.current(),
                xdp_modes: self.att.xdp_modes.clone(),
                stats: stats::frames(&self.ebpf)?,
                table: stats::table(&self.ebpf, entries, self.capacity)?,
                owners: if self.owners_attached {
                    Some(stats::owners(&self.ebpf)?)
                } else {
                    None
                },
            }),
            nat: None,
            attrib: None,
        })
    }
}

impl Source for EbpfSource {
    fn start(&mut self, links: &[Link]) -> Result<()> {
        self.adopt(links)?;
        self.att.clean_stale(links)?;
        self.att.attach_all(&mut self.ebpf, links)
    }

    fn adopted(&self) -> bool {
        self.kept.as_ref().is_some_and(|k| k.adopted.is_some())
    }

    fn keeps_state(&self) -> bool {
        self.kept.is_some()
    }

    fn resume(&mut self, released: &[(u32, u64)]) {
        let Some(k) = &mut self.kept else { return };
        if k.adopted.is_none() {
            return;
        }
        // Retired and recorded by the run that is gone: not listed again.
        self.table.free(released.iter().copied());
        k.restored = self.drainer.restore(&mut self.table, monotonic_ns());
    }

    fn releasing(&self) -> Vec<(u32, u64)> {
        self.drainer.releasing().to_vec()
    }

    fn committed(&mut self) {
        if self.kept.is_some() {
            self.drainer.committed(&mut self.table);
        }
    }

    fn links(&mut self, change: Links<'_>) -> Result<()> {
        match change {
            Links::Events(events) => {
                for ev in events {
                    match ev {
                        Event::New(l) => self.att.on_new(&mut self.ebpf, l),
                        Event::Del(l) => self.att.forget(&mut self.ebpf, l.index),
                    }
                }
            }
            Links::Resync(now) => self.att.resync(&mut self.ebpf, now),
        }
        Ok(())
    }

    fn poll(&mut self) -> Result<()> {
        if Instant::now() >= self.next_drain {
            self.drainer.pass(&mut self.table, monotonic_ns());
            self.next_drain = Instant::now() + self.drainer.every();
        }
        Ok(())
    }

    fn read(&mut self) -> Result<Reading> {
        self.reading()
    }

    fn finish(mut self: Box<Self>) -> Result<Reading> {
        // Detach before reading: the table then holds the final state.
        self.att.detach_all(&mut self.ebpf)?;
        let r = self.reading();
        // A stop, not a crash: nothing is kept.
        if let Some(k) = &self.kept {
            pins::forget(&k.state, &k.pins);
            k.state.remove(CLSACT_RECORD);
            let _ = stale::keep(&k.state.id(), None);
        }
        r
    }

    fn owner_feed(&mut self) -> Option<OwnerFeed> {
        self.owners.take().map(owners::OwnerRing::into_feed)
    }

    fn key_feed(&self) -> Option<KeyFeed> {
        match KernelTable::open(&self.ebpf) {
            Ok(t) => {
                // The bitmap at the last call, and when every key was last
                // listed.
                let (mut before, mut all_at) = (Vec::new(), Instant::now());
                Some(Box::new(move |out, max| {
                    if all_at.elapsed() >= ALL_KEYS_EVERY {
                        before.clear();
                        all_at = Instant::now();
                    }
                    t.new_keys(&mut before, out, max);
                    Ok(())
                }))
            }
            Err(e) => {
                eprintln!(
                    "flowprobe: attribution: {e:#}; connections are joined at each report only"
                );
                None
            }
        }
    }
}

/// Between two calls of the key feed that list every key, not only the
/// slots that became occupied since the last call: a slot drained and
/// taken by a new connection between two calls has its bit set at both,
/// so its new key is not new to the bitmap. Listing all of them this
/// often bounds how late such a key comes; the resolver passes over keys
/// it settled already at the cost of a hash lookup each.
const ALL_KEYS_EVERY: Duration = Duration::from_secs(1);

/// The program may release a connection's lock with a plain store: the
/// kernel runs on this CPU architecture, and on x86 a store is never seen
/// before the stores and loads that precede it (the kernel's own
/// `spin_unlock` is one store there). Elsewhere it keeps the exchange.
const UNLOCK_BY_STORE: u8 = cfg!(any(target_arch = "x86_64", target_arch = "x86")) as u8;

/// The id of the loaded object's `CONNS`.
fn conns_id(ebpf: &Ebpf) -> Result<u32> {
    match ebpf.map(contract::CONNS) {
        Some(aya::maps::Map::Array(m)) => Ok(m.info()?.id()),
        _ => anyhow::bail!("the eBPF object has no array {}", contract::CONNS),
    }
}

/// The settings a kept table was made with: a later run adopts it only
/// with the same ones (the program object included).
fn fingerprint(object: &[u8], slots: u32, opts: &Options) -> String {
    format!(
        "hook={:?} slots={slots} per_interface={} decap={}:{}:{} unlock_by_store={UNLOCK_BY_STORE} object={:016x}",
        opts.hook,
        opts.per_iface,
        opts.decap.enabled,
        opts.decap.vxlan_port,
        opts.decap.geneve_port,
        crate::os::statedir::fnv1a(object),
    )
}

/// Loads the object; with `pins`, the maps of [`pins::PINNED`] are opened
/// there, or made and pinned there when absent.
fn load(
    object: &[u8],
    origin: &str,
    opts: &Options,
    seed: u64,
    pins: Option<&std::path::Path>,
) -> Result<Ebpf> {
    // The table's size is a power of two (its index is a hash masked with
    // CONNS_MASK); OCCUPIED has a bit per slot; the seed keeps anyone from
    // choosing 5-tuples that share a probe sequence.
    let slots = opts.capacity.max(1).next_power_of_two();
    let mask = slots - 1;
    let mut loader = EbpfLoader::new();
    if let Some(dir) = pins {
        for m in pins::PINNED {
            loader.map_pin_path(m, dir.join(m));
        }
    }
    let mut ebpf = loader
        .map_max_entries(contract::CONNS, slots)
        .map_max_entries(contract::OCCUPIED, slots.div_ceil(64))
        .override_global(contract::CONNS_MASK, &mask, true)
        .override_global(contract::CONNS_SEED, &seed, true)
        .override_global(contract::UNLOCK_BY_STORE, &UNLOCK_BY_STORE, true)
        .override_global(contract::PER_IFACE, &u8::from(opts.per_iface), true)
        .override_global(contract::NO_DECAP, &u8::from(!opts.decap.enabled), true)
        .override_global(contract::VXLAN_PORT, &opts.decap.vxlan_port, true)
        .override_global(contract::GENEVE_PORT, &opts.decap.geneve_port, true)
        .load(object)
        .with_context(|| format!("loading {origin}"))?;
    if opts.hook == Hook::Xdp {
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

/// CLOCK_REALTIME − CLOCK_MONOTONIC, taken once per process: turns
/// `bpf_ktime_get_ns` stamps into Unix time. Once, so that a connection's
/// times read the same in every snapshot (the two clock reads are tens of
/// nanoseconds apart, and NTP slews the difference).
/// A run that adopts a kept table takes the offset of the run that kept
/// it, so that its records' times, and with them their identity in the
/// export (`flowtable::delta`), read the same.
fn clock_offset_ns() -> u64 {
    *CLOCK_OFFSET.get_or_init(|| realtime_ns().wrapping_sub(monotonic_ns()))
}

static CLOCK_OFFSET: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
