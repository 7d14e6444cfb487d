//! `flowprobe run`: the tc eBPF program on live interfaces.
//!
//! Loads the classifier, attaches it to clsact ingress and egress of each
//! interface (adding the clsact qdisc where there is none, and remembering
//! that), waits for `--duration` or SIGINT/SIGTERM, detaches, reads the
//! kernel's connection map and turns every entry into a [`Connection`].
//! It removes only what it added.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};
use flowtable::{sort_connections, Connection};
use probe_common::{ConnKey, FlowEntry};

/// Where `cargo xtask build-ebpf --release` leaves the object, in this
/// source tree.
const DEFAULT_OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/ebpf/bpfel-unknown-none/release/probe-ebpf"
);
const PROGRAM: &str = "flowprobe_tc";

/// `ConnKey` as a map key for aya (the orphan rule keeps `Pod` off the
/// `probe_common` type itself).
#[derive(Clone, Copy)]
#[repr(transparent)]
struct Key(ConnKey);
// SAFETY: `ConnKey` is `repr(C)`, `Copy`, without padding or pointers.
unsafe impl Pod for Key {}

#[derive(Clone, Copy)]
#[repr(transparent)]
struct Entry(FlowEntry);
// SAFETY: `FlowEntry` is `repr(C)`, `Copy`, without padding or pointers.
unsafe impl Pod for Entry {}

pub struct Options {
    pub ifaces: Vec<String>,
    pub duration: Option<Duration>,
    pub ebpf_object: Option<PathBuf>,
    pub max_conns: u32,
}

/// What a run saw, for the summary line.
pub struct Outcome {
    pub conns: Vec<Connection>,
    /// Packets the program parsed into a connection update.
    pub tracked: u64,
    /// New connections not counted because the map was full.
    pub map_full: u64,
    /// New connections not counted for another map error.
    pub insert_failed: u64,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() -> Result<()> {
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
    iface: String,
    created_clsact: bool,
    links: Vec<aya::programs::tc::SchedClassifierLinkId>,
}

pub fn run(opts: &Options) -> Result<Outcome> {
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`flowprobe run` needs root (CAP_BPF and CAP_NET_ADMIN) to load the eBPF program \
             and attach it to interfaces; run it with sudo"
        );
    }
    if opts.ifaces.is_empty() {
        bail!("give at least one interface with --iface");
    }
    let object = opts
        .ebpf_object
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_OBJECT));
    if !object.is_file() {
        bail!(
            "no eBPF object at {}: build it with `cargo xtask build-ebpf --release` \
             (needs the nightly toolchain: scripts/setup-ebpf-toolchain.sh), or pass --ebpf-object",
            object.display()
        );
    }
    let mut ebpf = load(&object, opts.max_conns)?;
    install_signal_handlers()?;

    let mut attached: Vec<Attached> = Vec::new();
    let res = attach_all(&mut ebpf, &opts.ifaces, &mut attached);
    if res.is_ok() {
        wait(opts.duration);
    }
    // Detach before reading: the map then holds the final state.
    let cleanup = detach_all(&mut ebpf, attached);
    res?;
    cleanup?;
    collect(&ebpf)
}

fn load(object: &Path, max_conns: u32) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .map_max_entries("CONNS", max_conns)
        .load_file(object)
        .with_context(|| format!("loading {}", object.display()))?;
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("{} has no program {PROGRAM}", object.display()))?
        .try_into()?;
    prog.load()
        .with_context(|| format!("the kernel rejected {PROGRAM}"))?;
    Ok(ebpf)
}

fn attach_all(ebpf: &mut Ebpf, ifaces: &[String], attached: &mut Vec<Attached>) -> Result<()> {
    for iface in ifaces {
        let created_clsact = match tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
            Err(tc::TcError::AlreadyAttached) => false,
            Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}")),
        };
        let mut a = Attached {
            iface: iface.clone(),
            created_clsact,
            links: Vec::new(),
        };
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .context("program vanished")?
            .try_into()?;
        for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
            match prog.attach_with_options(
                iface,
                hook,
                TcAttachOptions::Netlink(NlOptions::default()),
            ) {
                Ok(id) => a.links.push(id),
                Err(e) => {
                    attached.push(a);
                    return Err(e).with_context(|| format!("attaching to {iface} {hook:?}"));
                }
            }
        }
        attached.push(a);
    }
    Ok(())
}

fn wait(duration: Option<Duration>) {
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) {
        if let Some(d) = duration {
            if start.elapsed() >= d {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn detach_all(ebpf: &mut Ebpf, attached: Vec<Attached>) -> Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let prog: Option<&mut SchedClassifier> =
        ebpf.program_mut(PROGRAM).and_then(|p| p.try_into().ok());
    let Some(prog) = prog else {
        bail!("program {PROGRAM} vanished before detaching");
    };
    for a in attached {
        for id in a.links {
            if let Err(e) = prog.detach(id) {
                eprintln!("flowprobe: detaching from {}: {e}", a.iface);
                first_err.get_or_insert_with(|| anyhow::anyhow!("detaching from {}: {e}", a.iface));
            }
        }
        if a.created_clsact {
            let out = Command::new("tc")
                .args(["qdisc", "del", "dev", &a.iface, "clsact"])
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    let msg = format!(
                        "removing the clsact qdisc we added to {}: {}",
                        a.iface,
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                    eprintln!("flowprobe: {msg}");
                    first_err.get_or_insert_with(|| anyhow::anyhow!(msg));
                }
                Err(e) => {
                    eprintln!("flowprobe: running tc to remove the clsact qdisc: {e}");
                    first_err.get_or_insert_with(|| anyhow::anyhow!("running tc: {e}"));
                }
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// CLOCK_REALTIME − CLOCK_MONOTONIC now: turns `bpf_ktime_get_ns` stamps
/// into Unix time.
fn clock_offset_ns() -> u64 {
    fn now(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }
    now(libc::CLOCK_REALTIME).wrapping_sub(now(libc::CLOCK_MONOTONIC))
}

fn per_cpu_sum(ebpf: &Ebpf, map: &str, idx: u32) -> Result<u64> {
    let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(map)
            .with_context(|| format!("the eBPF object has no map {map}"))?,
    )?;
    Ok(m.get(&idx, 0)?.iter().sum())
}

fn collect(ebpf: &Ebpf) -> Result<Outcome> {
    let conns_map: BpfHashMap<&MapData, Key, Entry> = BpfHashMap::try_from(
        ebpf.map("CONNS")
            .context("the eBPF object has no map CONNS")?,
    )?;
    let offset = clock_offset_ns();
    let mut conns = Vec::new();
    for item in conns_map.iter() {
        let (k, e) = item.context("reading the connection map")?;
        conns.push(Connection::from_entry(&k.0, &e.0, offset));
    }
    sort_connections(&mut conns);
    Ok(Outcome {
        conns,
        tracked: per_cpu_sum(ebpf, "PARSE_STATS", 0)?,
        map_full: per_cpu_sum(ebpf, "CONN_STATS", 0)?,
        insert_failed: per_cpu_sum(ebpf, "CONN_STATS", 1)? + per_cpu_sum(ebpf, "CONN_STATS", 2)?,
    })
}
