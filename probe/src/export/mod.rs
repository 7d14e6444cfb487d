//! The last stage: where readings go. [`print`] writes tables and JSON
//! lines to stdout, [`jsonl`] appends per-interval deltas to a file, and
//! [`agent`] serves the latest reading over HTTP. [`Sinks`] is the set a
//! `flowprobe run` writes to at each tick and at the end.

pub mod agent;
pub mod jsonl;
pub mod print;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};

use self::agent::{Latest, MetricLabels, Snapshot};
use self::jsonl::{Export, Said};
use self::print::Format;
use crate::sources::Reading;

/// While losses grow, they are said on stderr at most this often (and in
/// full at the end).
const LOSS_REPEAT: Duration = Duration::from_secs(60);

/// The sinks that are on.
pub struct Sinks {
    agent: Option<Latest>,
    export: Option<Export>,
    /// The source's loss count last said on stderr, and when.
    losses_said: (u64, Option<Instant>),
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
            Some(p) => Some(Export::open(p)?),
            None => None,
        };
        Ok(Sinks {
            agent,
            export,
            losses_said: (0, None),
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
        self.export(r);
        if let Some(latest) = &self.agent {
            let mut s = Snapshot::from(r.clone());
            s.export = self.export.as_ref().map(|e| e.status().clone());
            latest.publish(s);
        }
        self.say_losses(r);
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
        self.export(r);
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
        match &self.export {
            Some(e) if e.status().behind => Err(anyhow!(
                "--export-jsonl {}: the last lines could not be written ({}): the changes since the last interval written are not in it",
                e.path(),
                e.status().last_error.as_deref().unwrap_or_default()
            )),
            _ => Ok(()),
        }
    }

    /// This interval's export lines; a write that fails is counted and said
    /// (once, and again when writes work again), and does not stop `run`.
    fn export(&mut self, r: &Reading) {
        let Some(e) = &mut self.export else { return };
        match e.write(&r.conns, SystemTime::now()) {
            Said::Nothing => {}
            Said::Failing(why) => eprintln!(
                "flowprobe: --export-jsonl {}: {why}; its lines wait for the next interval that can be written (counted in /health and /metrics)",
                e.path()
            ),
            Said::Recovered(failed) => eprintln!(
                "flowprobe: --export-jsonl {}: written again ({failed} intervals could not be written so far; their changes are in the lines written now)",
                e.path()
            ),
        }
    }

    /// What the source lost, said on stderr when it grew, at most every
    /// [`LOSS_REPEAT`], so that a daemon does not keep it until its exit.
    fn say_losses(&mut self, r: &Reading) {
        let lost = r.health.loss_count();
        let (said, at) = self.losses_said;
        if lost <= said || at.is_some_and(|t| t.elapsed() < LOSS_REPEAT) {
            return;
        }
        for line in r.health.losses(true) {
            eprintln!("flowprobe: so far, {line}");
        }
        self.losses_said = (lost, Some(Instant::now()));
    }
}
