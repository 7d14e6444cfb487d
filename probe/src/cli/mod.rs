//! The command line: `flowprobe replay | run | query | top` (`clap`). The flags of
//! `run` live with the settings they feed ([`crate::settings::RunFlags`]).
//! Shell completions and man pages are made from this definition
//! ([`generate`]: the hidden `completions` and `man` commands).

pub mod generate;
pub mod query_flags;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use self::query_flags::QueryFlags;
use crate::export::print::Format;
use crate::settings::{DecapFlags, FleetFlags, RunFlags};

#[derive(Parser)]
#[command(name = "flowprobe", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Count connections in pcap/pcapng files, as the live probe would.
    ///
    /// Reads Ethernet (with up to 4 VLAN tags, PPPoE, MPLS, 802.2
    /// LLC/SNAP), Linux cooked v1/v2, NFLOG, raw IP and BSD loopback
    /// captures; pcapng files may mix interfaces and link types. Tunnelled
    /// packets (VXLAN, Geneve, GRE, IP in IP) count as the connection they
    /// carry, tagged with the tunnel (docs/tunnels.md).
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
        /// Count a connection once per interface it was captured on (a
        /// pcapng file may hold several), instead of once: by default each
        /// direction is counted on the first interface that saw it.
        #[arg(long)]
        per_interface: bool,
        #[command(flatten)]
        decap: DecapFlags,
        #[command(flatten)]
        query: QueryFlags,
        /// With --fleet: this host's addresses (repeat for several), where
        /// a connection's local end is decided.
        #[arg(long = "host-addr", value_name = "IP")]
        host_addrs: Vec<std::net::IpAddr>,
        /// --fleet: publish the capture to NATS JetStream as the agent of
        /// --host-id with --host-addr would have (intervals from packet
        /// time), instead of printing it.
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// Count connections on live interfaces: the tc eBPF program, XDP, or
    /// AF_PACKET rings (--backend).
    ///
    /// Needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (AF_PACKET
    /// alone: CAP_NET_RAW; attribution: docs/service.md). The tc backend
    /// attaches to clsact ingress and egress of every interface of the
    /// current network namespace that is up (lo included), and of every
    /// interface that comes up later (adding the clsact qdisc where there is
    /// none); --iface limits it to the named ones. Counts until --duration has passed or
    /// SIGINT/SIGTERM arrives, detaches, removes only what it added, and
    /// prints every connection seen, each end tagged with the process,
    /// container and service that own its socket. At start it removes the
    /// filters a killed run left in the namespace. With --listen it serves
    /// /metrics (Prometheus) and /query (for `flowprobe query`).
    Run {
        #[command(flatten)]
        flags: RunFlags,
    },
    /// The fleet process: consume what `run --fleet` agents publish to NATS
    /// JetStream and serve /query, /metrics and /health over all hosts
    /// (`flowprobe query --agent` works against it unchanged).
    ///
    /// Each connection is counted once (the client's view when its host is
    /// monitored, the server's otherwise) and its remote end is tagged by
    /// the remote host's own agent (docs/fleet.md).
    Fleet {
        #[command(flatten)]
        cmd: crate::fleet::FleetCmd,
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
        query: QueryFlags,
    },
    /// The rows of a query in the terminal, refreshed live from an agent
    /// (--agent) or played from captures on their own clock (--replay).
    ///
    /// Takes the query flags of `query` and `replay`; keys change them in
    /// place (`/` filter, `g` group-by, `s` sort, Enter the row's
    /// connections; `?` lists every key). The header shows the backend,
    /// the totals, the capture's health and the `flowprobe query` command
    /// that prints the same rows. A replay ends on the rows `flowprobe
    /// replay` prints with the same flags. docs/top.md.
    Top {
        /// The agent: ADDR:PORT, or PORT alone for 127.0.0.1:PORT
        /// (default 127.0.0.1:9911).
        #[arg(long, value_name = "ADDR:PORT", conflicts_with = "replay")]
        agent: Option<String>,
        /// Play these capture files (read in order into one table) instead
        /// of asking an agent.
        #[arg(long, value_name = "FILE", num_args = 1..)]
        replay: Vec<PathBuf>,
        /// Seconds between two questions to the agent.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        refresh: f64,
        /// Replay speed: capture seconds per second (`+`/`-` change it).
        #[arg(long, value_name = "FACTOR", default_value_t = 1.0)]
        speed: f64,
        #[command(flatten)]
        query: QueryFlags,
    },
    /// Print the completion script for SHELL (for packaging:
    /// docs/service.md).
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page flowprobe(1); with --dir, write it and one page
    /// per command (flowprobe-run(1), ...) into DIR.
    #[command(hide = true)]
    Man {
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}
