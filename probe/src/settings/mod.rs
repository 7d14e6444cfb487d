//! The settings of `flowprobe run`: the flags ([`RunFlags`]) over the config
//! file ([`file::RunConfig`]) over the defaults, merged and checked once into
//! [`RunSettings`]. An error names where the value came from: the flag, or
//! the file's field.

pub mod file;

pub use file::Backend;

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use probe_common::Decap;

use crate::export::agent::{parse_listen, MetricLabels};
use crate::export::print::Format;

/// The kernel table's default capacity (connections open at once).
pub const DEFAULT_MAX_CONNS: u32 = 65536;
/// The largest capacity: 2^24 slots.
pub const MAX_MAX_CONNS: u32 = 1 << 24;
pub const DEFAULT_CLOSED_TIMEOUT_S: f64 = 2.0;
pub const DEFAULT_IDLE_TIMEOUT_S: f64 = 300.0;
/// The agent's and the export's period when `--interval` is not given.
pub const DEFAULT_TICK: Duration = Duration::from_secs(1);
/// How long a connection that ended stays listed (`--keep-ended`). The
/// work of each tick and the memory grow with what is listed: at 1000
/// connections a second, 60 s listed took 18 % of a core and 230 MB, 10 s
/// 6 % and 150 MB (bench/README.md, churn.sh); history is in the rollups.
pub const DEFAULT_KEEP_ENDED_S: f64 = 10.0;
/// Connections that left the listing kept for the final output.
pub const DEFAULT_LIST_MAX: usize = 10_000;
pub const DEFAULT_ROLLUP_INTERVAL_S: f64 = 10.0;
pub const DEFAULT_ROLLUP_KEEP_S: f64 = 600.0;
pub const DEFAULT_ROLLUP_TOP: usize = 200;
/// Bytes of kernel memory per slot of the connection table.
pub const SLOT_BYTES: usize = size_of::<probe_common::slots::Slot>();

fn max_conns_help() -> String {
    format!(
        "Capacity of the kernel's connection table (tc and XDP backends; \
         connections open at the same time; closed ones are moved out, see \
         --closed-timeout), rounded up to a power of two; {SLOT_BYTES} bytes \
         each [default: {DEFAULT_MAX_CONNS}]"
    )
}

fn closed_timeout_help() -> String {
    format!(
        "Move a TCP connection that closed (FIN both ways or RST) out of the \
         kernel map this long after its last packet. It is still reported \
         [default: {DEFAULT_CLOSED_TIMEOUT_S}]"
    )
}

fn idle_timeout_help() -> String {
    format!(
        "Move any connection without a packet for this long out of the kernel \
         map (UDP, or TCP whose end was not seen). A later packet adds to the \
         same record [default: {DEFAULT_IDLE_TIMEOUT_S}]"
    )
}

/// Which tunnels to look into: the flags `run` and `replay` share.
#[derive(clap::Args, Debug, Default, Clone)]
pub struct DecapFlags {
    /// Do not look inside tunnels (VXLAN, Geneve, GRE, IP in IP): count
    /// each tunnel as the one UDP/GRE/IP flow between its endpoints.
    /// VLAN, MPLS and PPPoE are always read (docs/tunnels.md).
    #[arg(long)]
    pub no_decap: bool,
    /// UDP destination port of VXLAN; 0 turns VXLAN off [default: 4789].
    #[arg(long, value_name = "PORT")]
    pub vxlan_port: Option<u16>,
    /// UDP destination port of Geneve; 0 turns Geneve off [default: 6081].
    #[arg(long, value_name = "PORT")]
    pub geneve_port: Option<u16>,
}

impl DecapFlags {
    /// The settings, the flags over the config file's `decap`,
    /// `vxlan_port` and `geneve_port` over the defaults.
    pub fn decap(
        &self,
        file_decap: Option<bool>,
        file_vxlan: Option<u16>,
        file_geneve: Option<u16>,
    ) -> Decap {
        let d = Decap::DEFAULT;
        Decap {
            enabled: !self.no_decap && file_decap.unwrap_or(true),
            vxlan_port: self.vxlan_port.or(file_vxlan).unwrap_or(d.vxlan_port),
            geneve_port: self.geneve_port.or(file_geneve).unwrap_or(d.geneve_port),
        }
    }
}

/// The flags of `flowprobe run`.
#[derive(clap::Args, Debug, Default)]
pub struct RunFlags {
    /// Only this interface (repeat for several; default: every
    /// interface that is up, and those that come up while running).
    #[arg(short, long = "iface", value_name = "IFACE")]
    pub ifaces: Vec<String>,
    /// Stop after this many seconds (default: at SIGINT/SIGTERM).
    #[arg(short, long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Print the connections listed (open, or ended less than
    /// --keep-ended ago) this often while running (JSON:
    /// each line with a "snapshot" number; table: a "# snapshot N"
    /// line before each table). It is also the period of
    /// --export-jsonl and of the agent's updates (default for those: 1).
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
    /// Load this eBPF object instead of the one built into flowprobe
    /// (for example target/ebpf/bpfel-unknown-none/release/probe-ebpf
    /// from `cargo xtask build-ebpf --release`).
    #[arg(long, value_name = "PATH")]
    pub ebpf_object: Option<PathBuf>,
    /// tc: the eBPF program; afpacket: memory-mapped AF_PACKET rings
    /// (needs only CAP_NET_RAW; same counts, in userspace); auto: tc,
    /// or afpacket (saying why) when the eBPF program cannot be loaded;
    /// xdp: the eBPF program at XDP, received packets only (for
    /// gateways, where every forwarded packet is received; connections
    /// are keyed without the interface, iface 0) [default: auto].
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Count a connection once per interface it crosses, keyed by
    /// interface (as tcpdump -i IFACE would see it), instead of once per
    /// host: by default each direction is counted at the first interface
    /// that sees it, so a packet that crosses a container's veth, a bridge
    /// and an uplink counts once.
    #[arg(long)]
    pub per_interface: bool,
    #[command(flatten)]
    pub decap: DecapFlags,
    #[arg(long, value_name = "N", help = max_conns_help())]
    pub max_conns: Option<u32>,
    #[arg(long, value_name = "SECS", help = closed_timeout_help())]
    pub closed_timeout: Option<f64>,
    #[arg(long, value_name = "SECS", help = idle_timeout_help())]
    pub idle_timeout: Option<f64>,
    /// Do not print the summary line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// Read settings from this TOML file (docs/run-and-backends.md);
    /// flags given here win over it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Serve /metrics, /query, /connections and /health over HTTP here:
    /// ADDR:PORT, or PORT alone for 127.0.0.1:PORT.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Labels of the per-group metrics: src.KEY and dst.KEY tag keys,
    /// comma-separated, e.g. src.service,dst.service,dst.port
    /// [default: src.service,dst.service].
    #[arg(long, value_name = "LABELS")]
    pub metrics_labels: Option<String>,
    /// At each --interval, append one JSON line per connection whose
    /// counters changed, with the change, to PATH (`-`: stdout).
    #[arg(long, value_name = "PATH")]
    pub export_jsonl: Option<String>,
    /// Keep the kernel's connection table (pinned in bpffs) and the
    /// export's baseline here, so that a run started after this one was
    /// killed continues its counts exactly (docs/restart.md); a clean
    /// stop removes them. tc only.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub bounds: BoundFlags,
    #[command(flatten)]
    pub fleet: FleetFlags,
}

/// `--fleet`: publish to NATS JetStream for `flowprobe fleet`
/// (docs/fleet.md).
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Fleet")]
pub struct FleetFlags {
    /// Also publish this host's rows per interval, its presence and the
    /// endpoints it serves to NATS JetStream at nats://HOST:PORT (or
    /// tls://HOST:PORT), for `flowprobe fleet`.
    #[arg(long, value_name = "URL")]
    pub fleet: Option<String>,
    /// This host's id in the fleet: letters, digits, `_` and `-`
    /// [default: the host name, other characters as `_`].
    #[arg(long, value_name = "ID")]
    pub host_id: Option<String>,
    /// Length of one published interval [default: 10].
    #[arg(long, value_name = "SECS")]
    pub fleet_interval: Option<f64>,
    /// Rows per interval message, by bytes; the rest are folded per view
    /// [default: 1000].
    #[arg(long, value_name = "N")]
    pub fleet_top: Option<usize>,
    /// Interval messages kept while NATS cannot take them; beyond, the
    /// oldest are dropped, counted and marked missing [default: 360].
    #[arg(long, value_name = "N")]
    pub fleet_spool: Option<usize>,
    /// Network id: addresses are compared only within one [default:
    /// default].
    #[arg(long, value_name = "ID")]
    pub network: Option<String>,
    #[command(flatten)]
    pub nats: crate::export::fleet::nats::NatsFlags,
}

impl FleetFlags {
    /// The publisher's options, the flags over the config's `[fleet]`
    /// table; `None` without an address.
    pub fn options(
        self,
        file: Option<file::Fleet>,
    ) -> Result<Option<crate::export::fleet::FleetOptions>, String> {
        use crate::export::fleet::{self, nats, wire};
        let file = file.unwrap_or_default();
        let Some((url, from)) = pick(self.fleet, file.url, ("--fleet", "fleet.url")) else {
            return Ok(None);
        };
        let flags = nats::NatsFlags {
            nats_user: self.nats.nats_user.or(file.user),
            nats_password: self.nats.nats_password.or(file.password),
            nats_token: self.nats.nats_token.or(file.token),
            nats_creds: self.nats.nats_creds.or(file.creds),
            nats_tls_ca: self.nats.nats_tls_ca.or(file.tls_ca),
        };
        let nats = nats::Nats::new(&url, flags, &from.to_string())?;
        let host_id = match pick(self.host_id, file.host_id, ("--host-id", "fleet.host_id")) {
            Some((h, from)) if !wire::valid_id(&h) => {
                return Err(format!(
                    "{from}: `{h}` is not a host id (1 to 64 letters, digits, `_` or `-`)"
                ))
            }
            Some((h, _)) => h,
            None => wire::host_id_of(
                &crate::enrich::host_name().unwrap_or_else(|| "unknown".to_owned()),
            ),
        };
        let network = match pick(self.network, file.network, ("--network", "fleet.network")) {
            Some((n, from)) if !wire::valid_id(&n) => {
                return Err(format!(
                    "{from}: `{n}` is not a network id (1 to 64 letters, digits, `_` or `-`)"
                ))
            }
            Some((n, _)) => n,
            None => fleet::DEFAULT_NETWORK.to_owned(),
        };
        let interval = seconds(
            pick(
                self.fleet_interval,
                file.interval,
                ("--fleet-interval", "fleet.interval"),
            ),
            0.1,
        )?
        .unwrap_or(Duration::from_secs_f64(fleet::DEFAULT_INTERVAL_S));
        let top = match pick(self.fleet_top, file.top, ("--fleet-top", "fleet.top")) {
            Some((0, from)) => return Err(format!("{from}: must be at least 1")),
            Some((n, _)) => n,
            None => fleet::DEFAULT_TOP,
        };
        let spool = match pick(
            self.fleet_spool,
            file.spool,
            ("--fleet-spool", "fleet.spool"),
        ) {
            Some((0, from)) => return Err(format!("{from}: must be at least 1")),
            Some((n, _)) => n,
            None => fleet::DEFAULT_SPOOL,
        };
        Ok(Some(fleet::FleetOptions {
            nats,
            host_id,
            network,
            interval,
            top,
            spool,
            bounds: nats::StreamBounds::default(),
        }))
    }
}

/// What a long run keeps (docs/run-and-backends.md, "Memory").
#[derive(clap::Args, Debug, Default)]
#[command(next_help_heading = "Memory bounds")]
pub struct BoundFlags {
    /// A connection that ended stays listed (/connections, /query without
    /// --last, snapshots) this long; after that it is in the totals and
    /// the rollups only [default: 10].
    #[arg(long, value_name = "SECS")]
    pub keep_ended: Option<f64>,
    /// The final output lists at most this many connections that left the
    /// listing; the rest are summed in one line [default: 10000].
    #[arg(long, value_name = "N")]
    pub list_max: Option<usize>,
    /// Length of one rollup interval, what `query --last` is made of
    /// [default: 10].
    #[arg(long, value_name = "SECS")]
    pub rollup_interval: Option<f64>,
    /// How far back the rollups go [default: 600].
    #[arg(long, value_name = "SECS")]
    pub rollup_keep: Option<f64>,
    /// Groups each rollup interval keeps, by bytes; the rest are summed
    /// into `other` [default: 200].
    #[arg(long, value_name = "N")]
    pub rollup_top: Option<usize>,
}

/// Everything `flowprobe run` needs, checked.
#[derive(Debug)]
pub struct RunSettings {
    pub backend: Backend,
    /// Only these interfaces; empty: every interface that is up.
    pub ifaces: Vec<String>,
    pub ebpf_object: Option<PathBuf>,
    /// One record per connection and interface instead of per host.
    pub per_interface: bool,
    /// Which tunnels to look into.
    pub decap: Decap,
    /// Slots of the kernel table: a power of two.
    pub capacity: u32,
    pub closed_timeout: Duration,
    pub idle_timeout: Duration,
    pub duration: Option<Duration>,
    /// `--interval`: print snapshots this often.
    pub interval: Option<Duration>,
    pub listen: Option<(SocketAddr, MetricLabels)>,
    pub export_jsonl: Option<String>,
    /// `--state-dir`: what a killed run keeps for the next one.
    pub state_dir: Option<PathBuf>,
    pub format: Format,
    pub quiet: bool,
    pub keep_ended: Duration,
    pub list_max: usize,
    pub rollups: flowtable::rollup::RollupSettings,
    pub fleet: Option<crate::export::fleet::FleetOptions>,
}

impl RunSettings {
    /// How often the sources are read while running: `--interval`, else
    /// [`DEFAULT_TICK`] when a sink wants ticks.
    pub fn tick(&self) -> Duration {
        self.interval.unwrap_or(DEFAULT_TICK)
    }
}

/// Where a value came from.
#[derive(Clone, Copy)]
enum From {
    Flag(&'static str),
    Field(&'static str),
}

impl fmt::Display for From {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            From::Flag(name) => write!(f, "{name}"),
            From::Field(name) => write!(f, "config field `{name}`"),
        }
    }
}

/// The flag's value, else the file's.
fn pick<T>(
    flag: Option<T>,
    file: Option<T>,
    names: (&'static str, &'static str),
) -> Option<(T, From)> {
    match (flag, file) {
        (Some(v), _) => Some((v, From::Flag(names.0))),
        (None, Some(v)) => Some((v, From::Field(names.1))),
        (None, None) => None,
    }
}

fn seconds(v: Option<(f64, From)>, min: f64) -> Result<Option<Duration>, String> {
    match v {
        Some((s, from)) if !(s.is_finite() && s >= min) => Err(if min > 0.0 {
            format!("{from}: must be at least {min} seconds")
        } else {
            format!("{from}: must be a non-negative number of seconds")
        }),
        Some((s, _)) => Ok(Some(Duration::from_secs_f64(s))),
        None => Ok(None),
    }
}

impl RunFlags {
    /// Reads `--config` if given, merges, checks.
    pub fn settings(self) -> Result<RunSettings> {
        let file = match &self.config {
            Some(p) => file::RunConfig::load(p)?,
            None => file::RunConfig::default(),
        };
        self.merge(file).map_err(|e| anyhow::anyhow!(e))
    }

    fn merge(self, file: file::RunConfig) -> Result<RunSettings, String> {
        let ifaces = match pick(
            (!self.ifaces.is_empty()).then_some(self.ifaces),
            file.interfaces,
            ("--iface", "interfaces"),
        ) {
            Some((ifaces, from)) => {
                if ifaces
                    .iter()
                    .any(|i| i.is_empty() || i.len() >= libc::IF_NAMESIZE)
                {
                    return Err(format!("{from}: an interface name has 1 to 15 characters"));
                }
                ifaces
            }
            None => Vec::new(),
        };
        let capacity = match pick(self.max_conns, file.max_conns, ("--max-conns", "max_conns")) {
            Some((0, from)) => return Err(format!("{from}: must be at least 1")),
            Some((n, from)) if n > MAX_MAX_CONNS => {
                return Err(format!(
                    "{from}: {n} is more than {MAX_MAX_CONNS} ({} GiB of kernel memory)",
                    (u64::from(MAX_MAX_CONNS) * SLOT_BYTES as u64) >> 30
                ))
            }
            Some((n, _)) => n,
            None => DEFAULT_MAX_CONNS,
        }
        // The kernel table's size is a power of two.
        .next_power_of_two();
        let closed_timeout = seconds(
            pick(
                self.closed_timeout,
                file.closed_timeout,
                ("--closed-timeout", "closed_timeout"),
            ),
            0.0,
        )?
        .unwrap_or(Duration::from_secs_f64(DEFAULT_CLOSED_TIMEOUT_S));
        let idle_timeout = seconds(
            pick(
                self.idle_timeout,
                file.idle_timeout,
                ("--idle-timeout", "idle_timeout"),
            ),
            0.0,
        )?
        .unwrap_or(Duration::from_secs_f64(DEFAULT_IDLE_TIMEOUT_S));
        let duration = seconds(self.duration.map(|d| (d, From::Flag("--duration"))), 0.0)?;
        let interval = seconds(
            pick(self.interval, file.interval, ("--interval", "interval")),
            0.01,
        )?;
        let labels = match pick(
            self.metrics_labels,
            file.metrics_labels,
            ("--metrics-labels", "metrics_labels"),
        ) {
            Some((m, from)) => m.parse().map_err(|e| format!("{from}: {e}"))?,
            None => MetricLabels::default(),
        };
        let listen = match pick(self.listen, file.listen, ("--listen", "listen")) {
            Some((l, from)) => Some((
                parse_listen(&l).map_err(|e| format!("{from}: {e}"))?,
                labels,
            )),
            None => None,
        };
        let export_jsonl = match pick(
            self.export_jsonl,
            file.export.and_then(|e| e.jsonl),
            ("--export-jsonl", "export.jsonl"),
        ) {
            Some((p, from)) if p.is_empty() => {
                return Err(format!("{from}: a path, or \"-\" for stdout"))
            }
            Some((p, _)) => Some(p),
            None => None,
        };
        let b = self.bounds;
        let keep_ended = seconds(
            pick(
                b.keep_ended,
                file.keep_ended,
                ("--keep-ended", "keep_ended"),
            ),
            0.0,
        )?
        .unwrap_or(Duration::from_secs_f64(DEFAULT_KEEP_ENDED_S));
        let list_max = pick(b.list_max, file.list_max, ("--list-max", "list_max"))
            .map_or(DEFAULT_LIST_MAX, |(n, _)| n);
        let rollup_interval = seconds(
            pick(
                b.rollup_interval,
                file.rollup_interval,
                ("--rollup-interval", "rollup_interval"),
            ),
            0.1,
        )?
        .unwrap_or(Duration::from_secs_f64(DEFAULT_ROLLUP_INTERVAL_S));
        let rollup_keep = seconds(
            pick(
                b.rollup_keep,
                file.rollup_keep,
                ("--rollup-keep", "rollup_keep"),
            ),
            0.0,
        )?
        .unwrap_or(Duration::from_secs_f64(DEFAULT_ROLLUP_KEEP_S));
        let rollup_top = match pick(
            b.rollup_top,
            file.rollup_top,
            ("--rollup-top", "rollup_top"),
        ) {
            Some((0, from)) => return Err(format!("{from}: must be at least 1")),
            Some((n, _)) => n,
            None => DEFAULT_ROLLUP_TOP,
        };
        let rollups = flowtable::rollup::RollupSettings {
            interval: rollup_interval,
            keep: (rollup_keep.as_secs_f64() / rollup_interval.as_secs_f64()).ceil() as usize,
            top: rollup_top,
            ..flowtable::rollup::RollupSettings::default()
        };
        let fleet = self.fleet.options(file.fleet)?;
        Ok(RunSettings {
            fleet,
            keep_ended,
            list_max,
            rollups,
            backend: self.backend.or(file.backend).unwrap_or(Backend::Auto),
            ifaces,
            ebpf_object: self.ebpf_object.or(file.ebpf_object),
            state_dir: self.state_dir.or(file.state_dir),
            per_interface: self.per_interface || file.per_interface.unwrap_or(false),
            decap: self
                .decap
                .decap(file.decap, file.vxlan_port, file.geneve_port),
            capacity,
            closed_timeout,
            idle_timeout,
            duration,
            interval,
            listen,
            export_jsonl,
            format: self.format,
            quiet: self.quiet,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> file::RunConfig {
        file::RunConfig::parse(text).unwrap()
    }

    /// Decapsulation: on by default on the IANA ports; the file's fields
    /// under the flags.
    #[test]
    fn decap_settings_merge() {
        let d = RunFlags::default().merge(file("")).unwrap().decap;
        assert_eq!(d, Decap::DEFAULT);
        let f = "decap = false\nvxlan_port = 8472\ngeneve_port = 0";
        let d = RunFlags::default().merge(file(f)).unwrap().decap;
        assert_eq!((d.enabled, d.vxlan_port, d.geneve_port), (false, 8472, 0));
        let flags = RunFlags {
            decap: DecapFlags {
                no_decap: false,
                vxlan_port: Some(4790),
                geneve_port: None,
            },
            ..RunFlags::default()
        };
        let d = flags
            .merge(file("vxlan_port = 8472\ngeneve_port = 7000"))
            .unwrap()
            .decap;
        assert_eq!((d.enabled, d.vxlan_port, d.geneve_port), (true, 4790, 7000));
    }

    /// dist/flowprobe.toml, the service's config, is what the unit promises:
    /// the tc backend and the agent on loopback.
    #[test]
    fn the_service_config_reads() {
        let text = include_str!("../../../dist/flowprobe.toml");
        let s = RunFlags::default().merge(file(text)).unwrap();
        assert_eq!(s.backend, Backend::Tc);
        let (addr, _) = s.listen.unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:9911");
        assert!(addr.ip().is_loopback());
        // The commented-out fields are valid too.
        let uncommented: String = text
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|l| l.contains(" = ") || l.starts_with('['))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let all = file(&uncommented);
        assert!(
            all.interfaces.is_some() && all.export.is_some(),
            "{uncommented}"
        );
        RunFlags::default().merge(all).unwrap();
    }

    #[test]
    fn fleet_settings_from_the_file_and_the_flags() {
        let f =
            file("[fleet]\nurl = \"nats://u:p@10.0.0.5:4222\"\nhost_id = \"web-1\"\ninterval = 5");
        let s = RunFlags {
            fleet: FleetFlags {
                network: Some("dc-2".to_owned()),
                ..FleetFlags::default()
            },
            ..RunFlags::default()
        }
        .merge(f)
        .unwrap();
        let fl = s.fleet.unwrap();
        assert_eq!(fl.nats.url, "nats://10.0.0.5:4222");
        assert_eq!(fl.nats.user, Some(("u".to_owned(), "p".to_owned())));
        assert_eq!(
            (fl.host_id.as_str(), fl.network.as_str(), fl.interval),
            ("web-1", "dc-2", Duration::from_secs(5))
        );
        assert_eq!(fl.top, crate::export::fleet::DEFAULT_TOP);
        assert!(RunFlags::default().merge(file("")).unwrap().fleet.is_none());
    }

    #[test]
    fn a_flag_wins_over_the_file() {
        let f = file("max_conns = 1000\nbackend = \"xdp\"\ninterval = 5\ninterfaces = [\"eth0\"]");
        let s = RunFlags {
            max_conns: Some(3000),
            ..RunFlags::default()
        }
        .merge(f)
        .unwrap();
        assert_eq!(s.capacity, 4096, "a power of two");
        assert_eq!(s.backend, Backend::Xdp);
        assert_eq!(s.interval, Some(Duration::from_secs(5)));
        assert_eq!(s.ifaces, ["eth0"]);
        assert_eq!(s.closed_timeout, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_flag_or_the_field() {
        for (text, flags, want) in [
            ("max_conns = 0", RunFlags::default(), "config field `max_conns`: must be at least 1"),
            (
                "",
                RunFlags {
                    max_conns: Some(0),
                    ..RunFlags::default()
                },
                "--max-conns: must be at least 1",
            ),
            (
                "max_conns = 16777217",
                RunFlags::default(),
                "config field `max_conns`: 16777217 is more than 16777216 (8 GiB of kernel memory)",
            ),
            (
                "idle_timeout = -3.0",
                RunFlags::default(),
                "config field `idle_timeout`: must be a non-negative number of seconds",
            ),
            (
                "interval = 0.001",
                RunFlags::default(),
                "config field `interval`: must be at least 0.01 seconds",
            ),
            (
                "",
                RunFlags {
                    duration: Some(f64::NAN),
                    ..RunFlags::default()
                },
                "--duration: must be a non-negative number of seconds",
            ),
            (
                "listen = \"localhost\"",
                RunFlags::default(),
                "config field `listen`: `localhost` is not ADDR:PORT or PORT (e.g. 127.0.0.1:9911, [::1]:9911)",
            ),
            (
                "metrics_labels = \"service\"",
                RunFlags::default(),
                "config field `metrics_labels`: metrics label `service`: expected src.KEY or dst.KEY (e.g. dst.port)",
            ),
            (
                "[export]\njsonl = \"\"",
                RunFlags::default(),
                "config field `export.jsonl`: a path, or \"-\" for stdout",
            ),
            (
                "[fleet]\nurl = \"localhost:4222\"",
                RunFlags::default(),
                "config field `fleet.url`: `localhost:4222` is not nats://HOST:PORT (or tls://HOST:PORT)",
            ),
            (
                "[fleet]\nurl = \"nats://n:4222\"\nhost_id = \"web.1\"",
                RunFlags::default(),
                "config field `fleet.host_id`: `web.1` is not a host id (1 to 64 letters, digits, `_` or `-`)",
            ),
            (
                "[fleet]\nurl = \"nats://n:4222\"\ninterval = 0",
                RunFlags::default(),
                "config field `fleet.interval`: must be at least 0.1 seconds",
            ),
            (
                "[fleet]\nurl = \"nats://n:4222\"",
                RunFlags {
                    fleet: FleetFlags {
                        fleet_top: Some(0),
                        ..FleetFlags::default()
                    },
                    ..RunFlags::default()
                },
                "--fleet-top: must be at least 1",
            ),
            (
                "interfaces = [\"a-very-long-interface-name\"]",
                RunFlags::default(),
                "config field `interfaces`: an interface name has 1 to 15 characters",
            ),
        ] {
            assert_eq!(flags.merge(file(text)).unwrap_err(), want, "{text}");
        }
    }
}
