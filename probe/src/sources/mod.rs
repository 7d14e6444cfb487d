//! Where connections come from: the first stage of the pipeline.
//!
//! Live sources ([`ebpf`]: the tc or XDP program; [`afpacket`]: memory-mapped
//! rings) sit behind [`Source`], which the run loop (`crate::run`) drives:
//! it hands each source the interfaces and their changes, asks it for a
//! [`Reading`] at every tick, and for the final one at the end. [`file`]
//! reads captures for `flowprobe replay`. [`ingest`] is the one way from a
//! captured frame into a `FlowTable`, shared by the userspace sources.
//!
//! A source never imports another source, and nothing here knows about
//! enrichment or exporters (the architecture test checks both).

pub mod afpacket;
pub mod ebpf;
pub mod file;
pub mod ingest;

use anyhow::Result;
use flowtable::attrib::AttribHealth;
use flowtable::nat::NatStats;
use flowtable::{Connection, FrameStats};
use probe_common::owner::SockOwner;
use probe_common::ConnKey;

use crate::os::links::{Event, Link};

/// A live source: tc/XDP or AF_PACKET.
pub trait Source {
    /// Starts counting on the interfaces of the namespace, `links` from a
    /// fresh dump (those it wants among them).
    fn start(&mut self, links: &[Link]) -> Result<()>;
    /// Link events since the last call; [`Links::Resync`] after lost events.
    fn links(&mut self, change: Links<'_>) -> Result<()>;
    /// Periodic work between ticks (moving closed connections out of the
    /// kernel table, reading 32-bit kernel counters before they wrap).
    /// An error stops the run.
    fn poll(&mut self) -> Result<()>;
    /// The connections it lists now and what it says about itself.
    fn read(&mut self) -> Result<Reading>;
    /// Stops counting (detaches, joins readers) and gives the final reading.
    fn finish(self: Box<Self>) -> Result<Reading>;
    /// The connection keys new to the source since the feed's last call,
    /// for enrichment to follow between ticks (a connection may open and
    /// close between two), read on enrichment's own thread. `None`: it has
    /// no cheap way to list them.
    fn key_feed(&self) -> Option<KeyFeed>;
    /// The socket owners the kernel recorded at connect or first send
    /// (the eBPF source's cgroup programs), handed over once, for
    /// enrichment's thread to drain. `None`: the source has none.
    fn owner_feed(&mut self) -> Option<OwnerFeed> {
        None
    }
    /// It continues the counts of a run that is gone (`run --state-dir`,
    /// docs/restart.md): the export continues from the baseline that run
    /// recorded.
    fn adopted(&self) -> bool {
        false
    }
    /// It keeps its state for a later run (`run --state-dir`).
    fn keeps_state(&self) -> bool {
        false
    }
    /// Adopted: `released` is what the run that is gone had recorded as
    /// retired for good (its [`Source::releasing`] at its last save);
    /// the rest of what it held is listed again.
    fn resume(&mut self, _released: &[(u32, u64)]) {}
    /// What the source holds for connections it retired, to be saved with
    /// the sinks' state before [`Source::committed`] lets it go.
    fn releasing(&self) -> Vec<(u32, u64)> {
        Vec::new()
    }
    /// The retired connections so far are recorded for good (the sinks'
    /// state saved with [`Source::releasing`]): what the source held for
    /// them may go.
    fn committed(&mut self) {}
}

/// Appends the keys a source took in since the last call (the first
/// call: all it holds), at most `max` of them: the rest come at the next
/// calls. A key may come again (now and then all of them do); none is
/// left out for long.
pub type KeyFeed = Box<dyn FnMut(&mut Vec<ConnKey>, usize) -> Result<()> + Send>;

/// Appends the socket owners recorded since the last call.
pub type OwnerFeed = Box<dyn FnMut(&mut Vec<SockOwner>) -> Result<()> + Send>;

/// What changed in the namespace's interfaces.
pub enum Links<'a> {
    Events(&'a [Event]),
    /// Events were lost: the whole list now.
    Resync(&'a [Link]),
}

/// One read of a source.
#[derive(Clone, Debug)]
pub struct Reading {
    /// Open connections and those that ended less than `--keep-ended` ago.
    pub conns: Vec<Connection>,
    /// Connections listed for the last time, with their final counters:
    /// each ended connection is in exactly one reading's `retired` (if the
    /// run lasts long enough), and in no `conns` after it.
    pub retired: Vec<Connection>,
    pub health: Health,
    /// What undoing NAT did (set by enrichment, `crate::enrich::nat`;
    /// `None` from a source, or when the step is off).
    pub nat: Option<NatStats>,
    /// How attribution fares (set by enrichment; `None` from a source, or
    /// when it is off).
    pub attrib: Option<AttribHealth>,
}

/// What a source says about itself: the summary line, the table header,
/// `/health` and `/metrics` are all made from this one value.
#[derive(Clone, Debug)]
pub enum Health {
    Ebpf(EbpfHealth),
    Afpacket(AfpacketHealth),
}

/// Where the eBPF program runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// tc clsact ingress and egress: everything an interface receives and
    /// sends.
    Tc,
    /// XDP: what an interface receives.
    Xdp,
}

/// How the program is attached to one interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Clsact,
    XdpNative,
    XdpGeneric,
}

impl AttachMode {
    pub fn name(self) -> &'static str {
        match self {
            AttachMode::Clsact => "clsact",
            AttachMode::XdpNative => "native",
            AttachMode::XdpGeneric => "generic",
        }
    }
}

#[derive(Clone, Debug)]
pub struct EbpfHealth {
    pub hook: Hook,
    /// Interfaces attached at the read, with their mode; empty in the final
    /// reading (taken after detaching).
    pub attached: Vec<(String, AttachMode)>,
    /// XDP: every attachment made during the run, for the summary.
    pub xdp_modes: Vec<(String, AttachMode)>,
    /// Packets the program saw: tracked, or skipped by reason.
    pub stats: FrameStats,
    pub table: TableHealth,
    /// The socket-owner programs' records; `None` when they are not
    /// attached.
    pub owners: Option<OwnerHealth>,
}

/// What the socket-owner programs (cgroup/connect, sendmsg) recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerHealth {
    /// Sockets whose owner was recorded.
    pub recorded: u64,
    /// Records the ring buffer had no room for: those sockets are found by
    /// sock_diag only.
    pub dropped: u64,
}

/// The kernel's connection table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableHealth {
    /// Entries in the table at the read.
    pub entries: usize,
    pub capacity: u32,
    /// Packets of new connections not counted: every slot they may take
    /// was in use.
    pub full: u64,
    /// Packets of new connections not counted: their slots kept changing.
    pub insert_failed: u64,
    /// Packets whose entry stayed locked by another CPU: counted without
    /// the retransmit check.
    pub contended: u64,
}

#[derive(Clone, Debug, Default)]
pub struct AfpacketHealth {
    pub rings: usize,
    /// The kernel's `PACKET_STATISTICS`, summed over the rings.
    pub kernel: afpacket::KernelStats,
    /// Frames read from the rings, and why those not counted were not.
    pub frames: FrameStats,
    /// Records of connections split across rings and merged.
    pub split: u64,
}

impl Health {
    pub fn backend(&self) -> &'static str {
        match self {
            Health::Ebpf(h) if h.hook == Hook::Xdp => "xdp",
            Health::Ebpf(_) => "tc",
            Health::Afpacket(_) => "afpacket",
        }
    }

    /// Frames seen, tracked or skipped by reason.
    pub fn frames(&self) -> &FrameStats {
        match self {
            Health::Ebpf(h) => &h.stats,
            Health::Afpacket(h) => &h.frames,
        }
    }

    /// One line: which backend ran and how it fared (the table's header
    /// and the summary's tail).
    pub fn describe(&self) -> String {
        match self {
            Health::Ebpf(h) if h.hook == Hook::Xdp => {
                let modes: Vec<String> = h
                    .xdp_modes
                    .iter()
                    .map(|(iface, mode)| format!("{} on {iface}", mode.name()))
                    .collect();
                format!("backend xdp: {}", modes.join(", "))
            }
            Health::Ebpf(_) => "backend tc".to_owned(),
            Health::Afpacket(h) => {
                let k = &h.kernel;
                let split = if h.split > 0 {
                    format!(", {} connection parts merged across rings", h.split)
                } else {
                    String::new()
                };
                format!(
                    "backend afpacket, {} rings; kernel: {} packets, {} dropped, {} queue freezes{split}",
                    h.rings, k.packets, k.drops, k.freeze_q
                )
            }
        }
    }

    /// Everything [`Health::losses`] speaks of, added up: it grows when
    /// something more was lost.
    pub fn loss_count(&self) -> u64 {
        match self {
            Health::Ebpf(h) => h.table.full + h.table.insert_failed + h.table.contended,
            Health::Afpacket(h) => h.kernel.drops,
        }
    }

    /// What was lost, one line each: said on stderr even with `--quiet`.
    pub fn losses(&self, quiet: bool) -> Vec<String> {
        let mut out = Vec::new();
        match self {
            Health::Ebpf(h) => {
                let t = &h.table;
                if t.full > 0 {
                    out.push(format!(
                        "{} packets of new connections were not counted: the connection table was full (raise --max-conns; keep it at most half full)",
                        t.full
                    ));
                }
                if t.contended > 0 {
                    out.push(format!(
                        "{} packets found their connection entry locked by another CPU for too long: counted, but without the retransmit check",
                        t.contended
                    ));
                }
                if t.insert_failed > 0 {
                    out.push(format!(
                        "{} packets of new connections were not counted: their slots in the connection table kept changing (insert retried once)",
                        t.insert_failed
                    ));
                }
            }
            // Without --quiet the summary line already says it.
            Health::Afpacket(h) if quiet && h.kernel.drops > 0 => out.push(format!(
                "the kernel dropped {} of {} packets: the AF_PACKET rings were full",
                h.kernel.drops, h.kernel.packets
            )),
            Health::Afpacket(_) => {}
        }
        out
    }
}

/// Why a live source cannot run here at all (as opposed to failing on one
/// interface): `--backend auto` then tries the next one.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The capabilities it lacks, named (`CAP_BPF and CAP_PERFMON`).
    #[error("`flowprobe run` needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN, to load the eBPF program and attach it to interfaces; missing: {0} (sudo, or docs/service.md)")]
    MissingCaps(String),
    #[error("this flowprobe has no eBPF program for live capture: {0} (or pass --ebpf-object; replay works without it)")]
    NoProgram(&'static str),
    #[error("reading {path}: {error}")]
    Object { path: String, error: std::io::Error },
    /// The kernel refused the object, a program or a map.
    #[error("{0}")]
    Refused(String),
}
