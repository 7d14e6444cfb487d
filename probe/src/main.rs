//! `flowprobe`: per-connection bytes, packets and TCP retransmits, from
//! eBPF on live interfaces or from capture files.

mod afpacket;
mod agent;
mod attrib;
mod capture;
mod clock;
mod config;
mod export;
mod ingest;
mod live;
mod mmap;
mod output;
mod query;
mod replay;
mod tc_netlink;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

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
    /// Count connections on live interfaces: the tc eBPF program, XDP, or
    /// AF_PACKET rings (--backend).
    ///
    /// Needs root (AF_PACKET alone: CAP_NET_RAW). The tc backend attaches to
    /// clsact ingress and egress of every interface of the current network
    /// namespace that is up (lo included), and of every interface that comes
    /// up later (adding the clsact qdisc where there is none); --iface limits
    /// it to the named ones. Counts until --duration has passed or
    /// SIGINT/SIGTERM arrives, detaches, removes only what it added, and
    /// prints every connection seen, each end tagged with the process,
    /// container and service that own its socket. At start it removes the
    /// filters a killed run left in the namespace. With --listen it serves
    /// /metrics (Prometheus) and /query (for `flowprobe query`).
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
        /// line before each table). It is also the period of
        /// --export-jsonl and of the agent's updates (default for those: 1).
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
        /// are keyed without the interface, iface 0) [default: auto].
        #[arg(long, value_enum)]
        backend: Option<Backend>,
        /// Capacity of the kernel's connection table (tc and XDP backends;
        /// connections open at the same time; closed ones are moved out, see
        /// --closed-timeout), rounded up to a power of two; 384 bytes each
        /// [default: 65536].
        #[arg(long, value_name = "N")]
        max_conns: Option<u32>,
        /// Move a TCP connection that closed (FIN both ways or RST) out of
        /// the kernel map this long after its last packet. It is still
        /// reported [default: 2].
        #[arg(long, value_name = "SECS")]
        closed_timeout: Option<f64>,
        /// Move any connection without a packet for this long out of the
        /// kernel map (UDP, or TCP whose end was not seen). A later packet
        /// adds to the same record [default: 300].
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<f64>,
        /// Do not print the summary line on stderr.
        #[arg(short, long)]
        quiet: bool,
        /// Read settings from this TOML file (README, "Config file"); flags
        /// given here win over it.
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Serve /metrics, /query and /connections over HTTP here: ADDR:PORT,
        /// or PORT alone for 127.0.0.1:PORT.
        #[arg(long, value_name = "ADDR:PORT")]
        listen: Option<String>,
        /// Labels of the per-group metrics: src.KEY and dst.KEY tag keys,
        /// comma-separated, e.g. src.service,dst.service,dst.port
        /// [default: src.service,dst.service].
        #[arg(long, value_name = "LABELS")]
        metrics_labels: Option<String>,
        /// At each --interval, append one JSON line per connection whose
        /// counters changed, with the change, to PATH (`-`: stdout).
        #[arg(long, value_name = "PATH")]
        export_jsonl: Option<String>,
    },
    /// Query a running `flowprobe run --listen`: the query flags of
    /// `replay`, answered from the agent's live connections.
    Query {
        /// The agent: ADDR:PORT, or PORT alone for 127.0.0.1:PORT.
        #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9911")]
        agent: String,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        query: query::QueryFlags,
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
            config,
            listen,
            metrics_labels,
            export_jsonl,
        } => {
            let file = match &config {
                Some(p) => config::RunConfig::load(p)?,
                None => config::RunConfig::default(),
            };
            // A flag wins over the file, the file over the default.
            let ifaces = if ifaces.is_empty() {
                file.interfaces.unwrap_or_default()
            } else {
                ifaces
            };
            let ebpf_object = ebpf_object.or(file.ebpf_object);
            let backend = match (backend, &file.backend) {
                (Some(b), _) => b,
                // Validated when the file was read.
                (None, Some(b)) => clap::ValueEnum::from_str(b, false)
                    .map_err(|e| anyhow::anyhow!("config backend: {e}"))?,
                (None, None) => Backend::Auto,
            };
            let max_conns = max_conns.or(file.max_conns).unwrap_or(65536);
            if max_conns == 0 {
                anyhow::bail!("--max-conns must be at least 1");
            }
            if max_conns > 1 << 24 {
                anyhow::bail!("--max-conns {max_conns}: at most 16777216 (6 GiB of kernel memory)");
            }
            // The kernel table's size is a power of two.
            let max_conns = max_conns.next_power_of_two();
            let interval = interval.or(file.interval);
            let listen = listen.or(file.listen);
            let metrics_labels = metrics_labels.or(file.metrics_labels);
            let export_jsonl = export_jsonl.or(file.export.and_then(|e| e.jsonl));

            let secs = |v: f64, flag: &str| -> anyhow::Result<Duration> {
                if v.is_finite() && v >= 0.0 {
                    Ok(Duration::from_secs_f64(v))
                } else {
                    anyhow::bail!("{flag} must be a non-negative number of seconds")
                }
            };
            let closed_timeout = secs(
                closed_timeout.or(file.closed_timeout).unwrap_or(2.0),
                "--closed-timeout",
            )?;
            let idle_timeout = secs(
                idle_timeout.or(file.idle_timeout).unwrap_or(300.0),
                "--idle-timeout",
            )?;
            let duration = match duration {
                Some(d) if !(d.is_finite() && d >= 0.0) => {
                    anyhow::bail!("--duration must be a non-negative number of seconds")
                }
                Some(d) => Some(Duration::from_secs_f64(d)),
                None => None,
            };
            let interval = match interval {
                Some(i) if !(i.is_finite() && i >= 0.01) => {
                    anyhow::bail!("--interval must be at least 0.01 seconds")
                }
                Some(i) => Some(Duration::from_secs_f64(i)),
                None => None,
            };
            let labels: agent::MetricLabels = match &metrics_labels {
                Some(m) => m
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--metrics-labels: {e}"))?,
                None => agent::MetricLabels::default(),
            };
            let shared = match &listen {
                Some(l) => {
                    let addr =
                        agent::parse_listen(l).map_err(|e| anyhow::anyhow!("--listen: {e}"))?;
                    let shared = agent::Shared::default();
                    // Until the first tick: no connections, nothing known
                    // of the backend yet (auto may fall back).
                    shared.publish(agent::Snapshot::default());
                    let bound = agent::start(addr, shared.clone(), labels)?;
                    if !quiet {
                        eprintln!("flowprobe: serving http://{bound}/metrics and /query");
                    }
                    Some(shared)
                }
                None => None,
            };
            let mut export = match &export_jsonl {
                Some(p) => Some((export::Deltas::default(), export_sink(p)?)),
                None => None,
            };
            // Snapshots are printed only when asked for; the agent and the
            // export tick every second unless --interval says otherwise.
            let print_snapshots = interval.is_some();
            let tick = interval.or_else(|| {
                (shared.is_some() || export.is_some()).then_some(Duration::from_secs(1))
            });

            let mut snapshots = 0u64;
            // Each tick of either backend: the connections so far, and with
            // the eBPF backends what the kernel maps say about themselves.
            let mut on_tick =
                |conns: &[flowtable::Connection], health: Health| -> anyhow::Result<()> {
                    if let Some(shared) = &shared {
                        shared.publish(match health {
                            Health::Ebpf(o) => agent_snapshot(o, max_conns),
                            Health::Afpacket(k) => agent::Snapshot {
                                conns: conns.to_vec(),
                                backend: "afpacket",
                                rings: Some([k.packets, k.drops, k.freeze_q]),
                                ..agent::Snapshot::default()
                            },
                        });
                    }
                    if let Some((deltas, out)) = &mut export {
                        deltas
                            .write(out, conns, SystemTime::now())
                            .map_err(|e| anyhow::anyhow!("--export-jsonl: {e}"))?;
                    }
                    if print_snapshots {
                        snapshots += 1;
                        let mut out = io::BufWriter::new(io::stdout().lock());
                        output::write_snapshot(&mut out, format, snapshots, conns)?;
                        out.flush()?;
                    }
                    Ok(())
                };
            type OnTick<'a> =
                dyn FnMut(&[flowtable::Connection], Health) -> anyhow::Result<()> + 'a;
            let ebpf = |hook: live::Hook, on_tick: &mut OnTick| {
                live::run(
                    &live::Options {
                        hook,
                        ifaces: ifaces.clone(),
                        duration,
                        ebpf_object: ebpf_object.clone(),
                        max_conns,
                        interval: tick,
                        closed_timeout,
                        idle_timeout,
                    },
                    &mut |o: &live::Outcome| on_tick(&o.conns, Health::Ebpf(o)),
                )
            };
            let afpacket = |on_tick: &mut OnTick| {
                afpacket::run(
                    &afpacket::Options {
                        ifaces: ifaces.clone(),
                        duration,
                        interval: tick,
                    },
                    &mut |c: &[flowtable::Connection], k: &afpacket::KernelStats| {
                        on_tick(c, Health::Afpacket(k))
                    },
                )
            };
            let ran = match backend {
                Backend::Tc => Ran::Tc(ebpf(live::Hook::Tc, &mut on_tick)?),
                Backend::Xdp => Ran::Tc(ebpf(live::Hook::Xdp, &mut on_tick)?),
                Backend::Afpacket => Ran::Afpacket(afpacket(&mut on_tick)?),
                Backend::Auto => match ebpf(live::Hook::Tc, &mut on_tick) {
                    Ok(o) => Ran::Tc(o),
                    Err(e) => match e.downcast_ref::<live::Unavailable>() {
                        Some(why) => {
                            // One line, however long the kernel's reason.
                            let why = why.0.lines().next().unwrap_or_default();
                            eprintln!("flowprobe: cannot use eBPF ({why}); counting with AF_PACKET instead");
                            Ran::Afpacket(afpacket(&mut on_tick)?)
                        }
                        None => return Err(e),
                    },
                },
            };
            let conns = match &ran {
                Ran::Tc(o) => &o.conns,
                Ran::Afpacket(o) => &o.conns,
            };
            // The last lines: the export then sums to the totals below.
            if let Some((deltas, out)) = &mut export {
                deltas
                    .write(out, conns, SystemTime::now())
                    .map_err(|e| anyhow::anyhow!("--export-jsonl: {e}"))?;
            }
            let health = backend_health(&ran);
            let mut out = io::BufWriter::new(io::stdout().lock());
            if format == Format::Table {
                writeln!(out, "# {health}")?;
            }
            output::write(&mut out, format, conns)?;
            out.flush()?;
            match &ran {
                Ran::Tc(o) => tc_summary(o, &health, quiet),
                Ran::Afpacket(o) => afpacket_summary(o, &health, quiet),
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Query {
            agent: addr,
            format,
            query,
        } => {
            let addr: SocketAddr =
                agent::parse_listen(&addr).map_err(|e| anyhow::anyhow!("--agent: {e}"))?;
            // Same parse as the agent's: a typo fails here, with the flag's name.
            query.clone().spec()?;
            let fmt = match format {
                Format::Json => "json",
                Format::Table => "table",
            };
            let path = format!("/query?{}&format={fmt}", query.params());
            let body = agent::client::get(addr, &path)?;
            io::stdout().lock().write_all(&body)?;
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

/// What the agent serves from one run-loop read.
fn agent_snapshot(o: &live::Outcome, capacity: u32) -> agent::Snapshot {
    agent::Snapshot {
        conns: o.conns.clone(),
        stats: o.stats.clone(),
        map_full: o.map_full,
        insert_failed: o.insert_failed,
        contended: o.contended,
        attached: o.attached.clone(),
        xdp_modes: o.xdp_modes.clone(),
        rings: None,
        in_map: o.in_map,
        capacity,
        backend: match o.hook {
            live::Hook::Tc => "tc",
            live::Hook::Xdp => "xdp",
        },
    }
}

/// `--export-jsonl PATH`: appended to (a restart does not lose what an
/// earlier run wrote); `-` is stdout.
fn export_sink(path: &str) -> anyhow::Result<Box<dyn Write>> {
    if path == "-" {
        return Ok(Box::new(io::stdout()));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| anyhow::anyhow!("--export-jsonl {path}: {e}"))?;
    Ok(Box::new(io::BufWriter::new(f)))
}

/// What a backend says about itself at each tick, for the agent.
enum Health<'a> {
    /// tc or XDP: the kernel map and the program's counters.
    Ebpf(&'a live::Outcome),
    /// AF_PACKET: the rings' kernel counters.
    Afpacket(&'a afpacket::KernelStats),
}

/// What `flowprobe run` ran, and what it saw.
enum Ran {
    Tc(live::Outcome),
    Afpacket(afpacket::Outcome),
}

/// Which backend ran and how it fared: the stderr summary's tail and the
/// table's header line.
fn backend_health(ran: &Ran) -> String {
    match ran {
        Ran::Tc(o) if o.hook == live::Hook::Xdp => {
            let modes: Vec<String> = o
                .xdp_modes
                .iter()
                .map(|(iface, mode)| format!("{mode} on {iface}"))
                .collect();
            format!("backend xdp: {}", modes.join(", "))
        }
        Ran::Tc(_) => "backend tc".to_owned(),
        Ran::Afpacket(o) => {
            let k = &o.kernel;
            let split = if o.split > 0 {
                format!(", {} connection parts merged across rings", o.split)
            } else {
                String::new()
            };
            format!(
                "backend afpacket, {} rings; kernel: {} packets, {} dropped, {} queue freezes{split}",
                o.rings, k.packets, k.drops, k.freeze_q
            )
        }
    }
}

fn tc_summary(o: &live::Outcome, health: &str, quiet: bool) {
    if !quiet {
        eprintln!(
            "flowprobe: {} ({health})",
            output::summary(o.conns.len(), &o.stats)
        );
    }
    if o.map_full > 0 {
        eprintln!(
            "flowprobe: {} packets of new connections were not counted: the connection table was full (raise --max-conns; keep it at most half full)",
            o.map_full
        );
    }
    if o.contended > 0 {
        eprintln!(
            "flowprobe: {} packets found their connection entry locked by another CPU for too long: counted, but without the retransmit check",
            o.contended
        );
    }
    if o.insert_failed > 0 {
        eprintln!(
            "flowprobe: {} packets of new connections were not counted: their slots in the connection table kept changing (insert retried once)",
            o.insert_failed
        );
    }
}

fn afpacket_summary(o: &afpacket::Outcome, health: &str, quiet: bool) {
    let k = &o.kernel;
    if !quiet {
        eprintln!(
            "flowprobe: {} ({health})",
            output::summary(o.conns.len(), &o.frames)
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
