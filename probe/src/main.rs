//! `flowprobe`: per-connection bytes, packets and TCP retransmits, from
//! eBPF on live interfaces or from capture files.

mod capture;
mod ingest;
mod output;
mod replay;

use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    },
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
        Cmd::Replay {
            files,
            format,
            quiet,
        } => {
            let mut table = FlowTable::new();
            let mut stats = FrameStats::default();
            let outcomes = replay::replay(&files, &mut table, &mut stats)?;
            let conns = table.connections();
            let mut out = io::BufWriter::new(io::stdout().lock());
            output::write(&mut out, format, &conns)?;
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
