//! `flowprobe`: per-connection bytes, packets and TCP retransmits, from
//! eBPF on live interfaces or from capture files.

mod afpacket;
mod capture;
mod ingest;
mod live;
mod output;
mod query;
mod replay;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flowtable::query::origin;
use flowtable::{FlowTable, FrameStats};

use crate::output::Format;

#[derive(Parser)]
#[command(name = "flowprobe", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Count connections in pcap/pcapng files, as the live probe would.
    ///
    /// Reads Ethernet (with VLAN/QinQ tags), Linux cooked v1/v2, raw IP and
    /// BSD loopback captures; pcapng files may mix interfaces and link types.
    /// Prints one row (or JSON object) per connection, oriented from the side
    /// that opened it. Frames that carry no TCP/UDP connection are counted by
    /// reason on stderr.
    Replay {
        /// Capture files, read in order into one table.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Do not print the summary line on stderr.
        #[arg(short, long)]
        quiet: bool,
        #[command(flatten)]
        query: query::QueryFlags,
    },
    /// Count connections on live interfaces with the tc eBPF program, or
    /// AF_PACKET rings where eBPF cannot be loaded.
    ///
    /// Needs root. The tc backend attaches to clsact ingress and egress of every interface
    /// of the current network namespace that is up (lo included), and of
    /// every interface that comes up later (adding the clsact qdisc where
    /// there is none); --iface limits it to the named ones. Counts until
    /// --duration has passed or SIGINT/SIGTERM arrives, detaches, removes only
    /// what it added, and prints every connection seen. At start it removes
    /// the filters a killed run left in the namespace.
    Run {
        /// Only this interface (repeat for several; default: every
        /// interface that is up, and those that come up while running).
        #[arg(short, long = "iface", value_name = "IFACE")]
        ifaces: Vec<String>,
        /// Stop after this many seconds (default: at SIGINT/SIGTERM).
        #[arg(short, long, value_name = "SECS")]
        duration: Option<f64>,
        /// Print every connection so far this often while running (JSON:
        /// each line with a "snapshot" number; table: a "# snapshot N"
        /// line before each table).
        #[arg(long, value_name = "SECS")]
        interval: Option<f64>,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Load this eBPF object instead of the one built into flowprobe
        /// (for example target/ebpf/bpfel-unknown-none/release/probe-ebpf
        /// from `cargo xtask build-ebpf --release`).
        #[arg(long, value_name = "PATH")]
        ebpf_object: Option<PathBuf>,
        /// tc: the eBPF program; afpacket: memory-mapped AF_PACKET rings
        /// (needs only CAP_NET_RAW; same counts, in userspace); auto: tc,
        /// or afpacket (saying why) when the eBPF program cannot be loaded;
        /// xdp: the eBPF program at XDP, received packets only (for
        /// gateways, where every forwarded packet is received; connections
        /// are keyed without the interface, iface 0).
        #[arg(long, value_enum, default_value_t = Backend::Auto)]
        backend: Backend,
        /// Capacity of the kernel's connection map (tc backend; connections
        /// open at the same time; closed ones are moved out, see
        /// --closed-timeout).
        #[arg(long, value_name = "N", default_value_t = 65536)]
        max_conns: u32,
        /// Move a TCP connection that closed (FIN both ways or RST) out of
        /// the kernel map this long after its last packet. It is still
        /// reported.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        closed_timeout: f64,
        /// Move any connection without a packet for this long out of the
        /// kernel map (UDP, or TCP whose end was not seen). A later packet
        /// adds to the same record.
        #[arg(long, value_name = "SECS", default_value_t = 300.0)]
        idle_timeout: f64,
        /// Do not print the summary line on stderr.
        #[arg(short, long)]
        quiet: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Auto,
    Tc,
    Afpacket,
    Xdp,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowprobe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            ifaces,
            duration,
            interval,
            format,
            ebpf_object,
            backend,
            max_conns,
            closed_timeout,
            idle_timeout,
            quiet,
        } => {
            let secs = |v: f64, flag: &str| -> anyhow::Result<std::time::Duration> {
                if v.is_finite() && v >= 0.0 {
                    Ok(std::time::Duration::from_secs_f64(v))
                } else {
                    anyhow::bail!("{flag} must be a non-negative number of seconds")
                }
            };
            let closed_timeout = secs(closed_timeout, "--closed-timeout")?;
            let idle_timeout = secs(idle_timeout, "--idle-timeout")?;
            let duration = match duration {
                Some(d) if !(d.is_finite() && d >= 0.0) => {
                    anyhow::bail!("--duration must be a non-negative number of seconds")
                }
                Some(d) => Some(std::time::Duration::from_secs_f64(d)),
                None => None,
            };
            let interval = match interval {
                Some(i) if !(i.is_finite() && i >= 0.01) => {
                    anyhow::bail!("--interval must be at least 0.01 seconds")
                }
                Some(i) => Some(std::time::Duration::from_secs_f64(i)),
                None => None,
            };
            let mut snapshots = 0u64;
            let mut on_snapshot = |conns: &[flowtable::Connection]| -> anyhow::Result<()> {
                snapshots += 1;
                let mut out = io::BufWriter::new(io::stdout().lock());
                output::write_snapshot(&mut out, format, snapshots, conns)?;
                out.flush()?;
                Ok(())
            };
            let ebpf = |hook: live::Hook,
                        on_snapshot: &mut dyn FnMut(
                &[flowtable::Connection],
            ) -> anyhow::Result<()>| {
                live::run(
                    &live::Options {
                        hook,
                        ifaces: ifaces.clone(),
                        duration,
                        ebpf_object: ebpf_object.clone(),
                        max_conns,
                        interval,
                        closed_timeout,
                        idle_timeout,
                    },
                    &mut |o: &live::Outcome| on_snapshot(&o.conns),
                )
            };
            let afpacket =
                |on_snapshot: &mut dyn FnMut(&[flowtable::Connection]) -> anyhow::Result<()>| {
                    afpacket::run(
                        &afpacket::Options {
                            ifaces: ifaces.clone(),
                            duration,
                            interval,
                        },
                        on_snapshot,
                    )
                };
            let ran = match backend {
                Backend::Tc => Ran::Tc(ebpf(live::Hook::Tc, &mut on_snapshot)?),
                Backend::Xdp => Ran::Tc(ebpf(live::Hook::Xdp, &mut on_snapshot)?),
                Backend::Afpacket => Ran::Afpacket(afpacket(&mut on_snapshot)?),
                Backend::Auto => match ebpf(live::Hook::Tc, &mut on_snapshot) {
                    Ok(o) => Ran::Tc(o),
                    Err(e) => match e.downcast_ref::<live::Unavailable>() {
                        Some(why) => {
                            // One line, however long the kernel's reason.
                            let why = why.0.lines().next().unwrap_or_default();
                            eprintln!("flowprobe: cannot use eBPF ({why}); counting with AF_PACKET instead");
                            Ran::Afpacket(afpacket(&mut on_snapshot)?)
                        }
                        None => return Err(e),
                    },
                },
            };
            let conns = match &ran {
                Ran::Tc(o) => &o.conns,
                Ran::Afpacket(o) => &o.conns,
            };
            let mut out = io::BufWriter::new(io::stdout().lock());
            output::write(&mut out, format, conns)?;
            out.flush()?;
            match &ran {
                Ran::Tc(o) => tc_summary(o, quiet),
                Ran::Afpacket(o) => afpacket_summary(o, quiet),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay {
            files,
            format,
            quiet,
            query,
        } => {
            // Parse the query before reading gigabytes, so a typo fails fast.
            let spec = query.given().then(|| query.spec()).transpose()?;
            let mut table = FlowTable::new();
            let mut stats = FrameStats::default();
            let outcomes = replay::replay(&files, &mut table, &mut stats)?;
            let conns = table.connections();
            let mut out = io::BufWriter::new(io::stdout().lock());
            match &spec {
                Some(q) => output::write_query(&mut out, format, &q.run(&conns, origin(&conns)))?,
                None => output::write(&mut out, format, &conns)?,
            }
            out.flush()?;

            let mut unreadable = false;
            for o in &outcomes {
                if let Some(e) = &o.error {
                    if o.frames == 0 {
                        unreadable = true;
                        eprintln!("flowprobe: {}: {e}", o.path.display());
                    } else {
                        eprintln!(
                            "flowprobe: {}: {e}; counted the {} frames before it",
                            o.path.display(),
                            o.frames
                        );
                    }
                }
            }
            if !quiet {
                eprintln!("flowprobe: {}", output::summary(conns.len(), &stats));
            }
            Ok(if unreadable {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

/// What `flowprobe run` ran, and what it saw.
enum Ran {
    Tc(live::Outcome),
    Afpacket(afpacket::Outcome),
}

fn tc_summary(o: &live::Outcome, quiet: bool) {
    if !quiet {
        let backend = if o.hook == live::Hook::Tc {
            "tc".to_owned()
        } else {
            let modes: Vec<String> = o
                .xdp_modes
                .iter()
                .map(|(iface, mode)| format!("{mode} on {iface}"))
                .collect();
            format!("xdp: {}", modes.join(", "))
        };
        eprintln!(
            "flowprobe: {} (backend {backend})",
            output::summary(o.conns.len(), &o.stats)
        );
    }
    if o.map_full > 0 {
        eprintln!(
            "flowprobe: {} packets of new connections were not counted: the connection map was full (raise --max-conns)",
            o.map_full
        );
    }
    if o.contended > 0 {
        eprintln!(
            "flowprobe: {} packets found their connection entry locked by another CPU (counted without the lock; their retransmit call is best effort)",
            o.contended
        );
    }
    if o.insert_failed > 0 {
        eprintln!(
            "flowprobe: {} packets of new connections were not counted: connection map insert failed",
            o.insert_failed
        );
    }
}

fn afpacket_summary(o: &afpacket::Outcome, quiet: bool) {
    let k = &o.kernel;
    if !quiet {
        let split = if o.split > 0 {
            format!(", {} connection parts merged across rings", o.split)
        } else {
            String::new()
        };
        eprintln!(
            "flowprobe: {} (backend afpacket, {} rings; kernel: {} packets, {} dropped, {} queue freezes{split})",
            output::summary(o.conns.len(), &o.frames),
            o.rings,
            k.packets,
            k.drops,
            k.freeze_q
        );
    }
    if quiet && k.drops > 0 {
        // Lost counts are never silent.
        eprintln!(
            "flowprobe: the kernel dropped {} of {} packets: the AF_PACKET rings were full",
            k.drops, k.packets
        );
    }
}
