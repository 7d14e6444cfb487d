//! The last stage: where readings go. [`print`] writes tables and JSON
//! lines to stdout, [`jsonl`] appends per-interval deltas to a file, and
//! [`agent`] serves the latest reading over HTTP. [`Sinks`] is the set a
//! `flowprobe run` writes to at each tick and at the end.

pub mod agent;
pub mod jsonl;
pub mod print;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::SystemTime;

use anyhow::{anyhow, Result};

use self::agent::{Latest, MetricLabels};
use self::print::Format;
use crate::sources::Reading;

/// The sinks that are on.
pub struct Sinks {
    agent: Option<Latest>,
    export: Option<(jsonl::Deltas, Box<dyn Write>)>,
    /// `--interval`: print every tick's connections, numbered.
    snapshots: Option<u64>,
    format: Format,
    quiet: bool,
}

/// What the sinks need to know.
pub struct SinkOptions<'a> {
    pub listen: Option<(SocketAddr, MetricLabels)>,
    pub export_jsonl: Option<&'a str>,
    pub print_snapshots: bool,
    pub format: Format,
    pub quiet: bool,
}

impl Sinks {
    /// Binds the agent's port (a port in use fails here, before anything is
    /// loaded) and opens the export.
    pub fn open(o: SinkOptions<'_>) -> Result<Sinks> {
        let agent = match o.listen {
            Some((addr, labels)) => {
                let latest = Latest::default();
                let bound = agent::start(addr, latest.clone(), labels)?;
                if !o.quiet {
                    eprintln!("flowprobe: serving http://{bound}/metrics and /query");
                }
                Some(latest)
            }
            None => None,
        };
        let export = match o.export_jsonl {
            Some(p) => Some((jsonl::Deltas::default(), jsonl::sink(p)?)),
            None => None,
        };
        Ok(Sinks {
            agent,
            export,
            snapshots: o.print_snapshots.then_some(0),
            format: o.format,
            quiet: o.quiet,
        })
    }

    /// Whether anything wants a reading every tick.
    pub fn want_ticks(&self) -> bool {
        self.agent.is_some() || self.export.is_some() || self.snapshots.is_some()
    }

    pub fn tick(&mut self, r: &Reading) -> Result<()> {
        if let Some(latest) = &self.agent {
            latest.publish(r.clone().into());
        }
        self.export(r)?;
        if let Some(n) = &mut self.snapshots {
            *n += 1;
            let mut out = io::BufWriter::new(io::stdout().lock());
            print::write_snapshot(&mut out, self.format, *n, &r.conns)?;
            out.flush()?;
        }
        Ok(())
    }

    /// The final reading: the export's last lines (so that it sums to the
    /// totals), the connections on stdout, the summary and any loss on
    /// stderr.
    pub fn finish(&mut self, r: &Reading) -> Result<()> {
        self.export(r)?;
        let health = r.health.describe();
        let mut out = io::BufWriter::new(io::stdout().lock());
        if self.format == Format::Table {
            writeln!(out, "# {health}")?;
        }
        print::write(&mut out, self.format, &r.conns)?;
        out.flush()?;
        if !self.quiet {
            eprintln!(
                "flowprobe: {} ({health})",
                print::summary(r.conns.len(), r.health.frames())
            );
        }
        for line in r.health.losses(self.quiet) {
            eprintln!("flowprobe: {line}");
        }
        Ok(())
    }

    fn export(&mut self, r: &Reading) -> Result<()> {
        if let Some((deltas, out)) = &mut self.export {
            deltas
                .write(out, &r.conns, SystemTime::now())
                .map_err(|e| anyhow!("--export-jsonl: {e}"))?;
        }
        Ok(())
    }
}
