//! The last stage: where readings go. [`print`] writes tables and JSON
//! lines to stdout, [`jsonl`] appends per-interval deltas to a file, and
//! [`agent`] serves the latest reading over HTTP. [`Sinks`] is the set a
//! `flowprobe run` writes to at each tick and at the end.

pub mod agent;
pub mod csv;
pub mod escape;
pub mod fleet;
pub mod history;
pub mod jsonl;
pub mod print;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, Result};

use self::agent::{Latest, MetricLabels, Snapshot};
use self::fleet::{FleetOptions, Publisher};
use self::history::History;
use self::jsonl::{Export, Said};
use self::print::Format;
use crate::os::statedir::StateDir;
use crate::sources::Reading;
use flowtable::Connection;

/// The sinks' state in the state directory (docs/restart.md).
const SINKS_STATE: &str = "export.json";

/// What the sinks' state was made of: the export's version, the retired
/// connections counted, the held slots released.
type SavedVersion = (Option<u64>, u64, usize);

/// What a tick did.
pub struct Tick {
    /// What the reading retired is recorded for good (see [`Sinks::save`]).
    pub committed: bool,
    /// The reading's listed connections, as the sinks keep them.
    pub conns: Arc<Vec<Connection>>,
}

/// What a restarted run needs to continue the sinks' counts exactly.
#[derive(serde::Serialize, serde::Deserialize, Default)]
struct Saved {
    /// The export's baseline.
    export: Option<jsonl::Saved>,
    /// `/metrics`' sums over retired connections.
    metrics: Option<Vec<flowtable::query::SavedRow>>,
    /// What the source held for connections retired by this save: the
    /// next run lets it go instead of listing them again.
    released: Vec<(u32, u64)>,
}

/// While losses grow, they are said on stderr at most this often (and in
/// full at the end).
const LOSS_REPEAT: Duration = Duration::from_secs(60);
/// At the end, how long the fleet publisher may take to send what waits.
const FLEET_FLUSH: Duration = Duration::from_secs(10);

/// The sinks that are on.
pub struct Sinks {
    agent: Option<Latest>,
    history: History,
    export: Option<Export>,
    fleet: Option<Publisher>,
    /// The source's loss count last said on stderr, and when.
    losses_said: (u64, Option<Instant>),
    /// `--interval`: print every tick's connections, numbered.
    snapshots: Option<u64>,
    format: Format,
    quiet: bool,
    /// `--state-dir`: the sinks' state is saved there after each tick
    /// that changed it, and what changed last saved.
    state: Option<(Arc<StateDir>, Option<SavedVersion>)>,
}

/// What the sinks need to know.
pub struct SinkOptions<'a> {
    pub listen: Option<(SocketAddr, MetricLabels)>,
    pub export_jsonl: Option<&'a str>,
    pub print_snapshots: bool,
    pub format: Format,
    pub quiet: bool,
    pub rollups: flowtable::rollup::RollupSettings,
    pub list_max: usize,
    pub fleet: Option<FleetOptions>,
    pub state: Option<Arc<StateDir>>,
}

impl Sinks {
    /// Binds the agent's port (a port in use fails here, before anything is
    /// loaded) and opens the export.
    pub fn open(o: SinkOptions<'_>) -> Result<Sinks> {
        let history = History::new(
            o.rollups,
            o.list_max,
            o.listen.as_ref().map(|(_, labels)| labels.spec()),
        );
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
        let fleet = match o.fleet {
            Some(f) => {
                let host = f.host_id.clone();
                let to = f.nats.redacted();
                let mut p =
                    Publisher::start(f, crate::os::clock::realtime_ns(), fleet::TAG_LAG_TICKS)?;
                p.set_addresses(crate::os::addrs::local());
                if !o.quiet {
                    eprintln!("flowprobe: publishing to the fleet at {to} as host {host}");
                }
                Some(p)
            }
            None => None,
        };
        Ok(Sinks {
            fleet,
            agent,
            history,
            export,
            losses_said: (0, None),
            snapshots: o.print_snapshots.then_some(0),
            format: o.format,
            quiet: o.quiet,
            state: o.state.map(|s| (s, None)),
        })
    }

    /// The source adopted the kernel state of a run that is gone: the
    /// export and the metric sums continue from what that run saved
    /// (`adopted`), or start afresh (not adopted, or nothing kept: the
    /// saved state is dropped; `keep` false: nothing is saved either).
    /// Returns what the run that is gone released (see [`Saved`]).
    pub fn resume(&mut self, adopted: bool, keep: bool) -> Result<Vec<(u32, u64)>> {
        let Some((state, _)) = &self.state else {
            return Ok(Vec::new());
        };
        let bytes = state.read(SINKS_STATE)?;
        state.remove(SINKS_STATE);
        let mut released = Vec::new();
        if let (Some(bytes), true) = (bytes, adopted) {
            let saved: Saved = serde_json::from_slice(&bytes)
                .map_err(|e| anyhow!("{}: {e}", state.path(SINKS_STATE).display()))?;
            if let (Some(e), Some(s)) = (&mut self.export, &saved.export) {
                let line = e.resume(s)?;
                if !line.is_empty() && !self.quiet {
                    eprintln!("flowprobe: {line}");
                }
            }
            if let Some(rows) = &saved.metrics {
                self.history.restore_metrics(rows);
            }
            released = saved.released;
        }
        if !keep {
            self.state = None;
        }
        Ok(released)
    }

    /// Saves the sinks' state with `releasing` when it changed. Whether
    /// everything the readings so far retired is recorded for good (the
    /// export's lines written, and the state saved).
    fn save(&mut self, releasing: &[(u32, u64)]) -> bool {
        let Some((state, done)) = &mut self.state else {
            return true;
        };
        if self.export.as_ref().is_some_and(|e| e.status().behind) {
            return false;
        }
        let export = self.export.as_ref().and_then(Export::saved);
        let version = (
            export.as_ref().map(|e| e.1),
            self.history.bounds().retired,
            releasing.len(),
        );
        if *done == Some(version) && releasing.is_empty() {
            return true;
        }
        let saved = Saved {
            export: export.map(|e| e.0),
            metrics: self.history.saved_metrics(),
            released: releasing.to_vec(),
        };
        let bytes = match serde_json::to_vec(&saved) {
            Ok(b) => b,
            Err(_) => return false,
        };
        match state.write(SINKS_STATE, &bytes) {
            Ok(()) => {
                *done = Some(version);
                true
            }
            Err(err) => {
                eprintln!(
                    "flowprobe: saving the export's baseline in {}: {err}",
                    state.path(SINKS_STATE).display()
                );
                false
            }
        }
    }

    /// One reading to every sink; with a state directory their state is
    /// saved with `releasing` (what the source holds for the connections
    /// it retired). The agent's snapshot, the rollups and the export then
    /// share the reading's connections, and the run loop hands them to
    /// enrichment ([`Tick::conns`]): not copied (at thousands of listed
    /// connections a copy per tick was a good part of the agent's CPU), and
    /// the last reading is what the next one's changes, tags and NAT
    /// answers are taken against (`flowtable::delta::Last`).
    pub fn tick(&mut self, mut r: Reading, releasing: &[(u32, u64)]) -> Result<Tick> {
        // One copy of the reading for every sink that keeps it.
        let conns = Arc::new(std::mem::take(&mut r.conns));
        self.export(&conns, &r.retired);
        let now = crate::os::clock::realtime_ns();
        self.history.update(&conns, &r.retired, now);
        let committed = self.save(releasing);
        if let Some(f) = &mut self.fleet {
            f.set_addresses(crate::os::addrs::local());
            f.update(now, &conns, &r.retired);
        }
        self.say_losses(&r);
        if let Some(n) = &mut self.snapshots {
            *n += 1;
            let mut out = io::BufWriter::new(io::stdout().lock());
            print::write_snapshot(&mut out, self.format, *n, &conns)?;
            out.flush()?;
        }
        if let Some(latest) = &self.agent {
            latest.publish(Snapshot {
                conns: Arc::clone(&conns),
                health: Some(r.health),
                export: self.export.as_ref().map(|e| e.status().clone()),
                rollups: Some(self.history.rollups()),
                retired_totals: self.history.metric_totals(),
                bounds: self.history.bounds(),
                fleet: self.fleet.as_ref().map(Publisher::status),
                view: None,
                local_addrs: crate::os::addrs::local(),
                nat: r.nat,
                attrib: r.attrib,
            });
        }
        Ok(Tick { committed, conns })
    }

    /// The final reading: the export's last lines (so that it sums to the
    /// totals), the connections on stdout, the summary and any loss on
    /// stderr.
    pub fn finish(mut self, r: &Reading) -> Result<()> {
        if self.export.is_some() {
            self.export(&Arc::new(r.conns.clone()), &r.retired);
        }
        // A stop, not a crash: nothing is kept.
        if let Some((state, _)) = self.state.take() {
            state.remove(SINKS_STATE);
        }
        if let Some(mut f) = self.fleet.take() {
            let now = crate::os::clock::realtime_ns();
            f.update(now, &r.conns, &r.retired);
            let (left, status) = f.finish(FLEET_FLUSH, now);
            if left > 0 || status.spool.dropped > 0 {
                eprintln!(
                    "flowprobe: fleet: {left} interval messages could not be published before the end, {} were dropped from the spool ({})",
                    status.spool.dropped,
                    status.spool.last_error.as_deref().unwrap_or("no error said")
                );
            }
        }
        let health = r.health.describe();
        let history =
            std::mem::replace(&mut self.history, History::new(Default::default(), 0, None));
        let (mut all, unlisted) = history.into_listed();
        all.extend(r.retired.iter().cloned());
        all.extend(r.conns.iter().cloned());
        flowtable::sort_connections(&mut all);
        let mut out = io::BufWriter::new(io::stdout().lock());
        if self.format == Format::Table {
            writeln!(out, "# {health}")?;
        }
        print::write(&mut out, self.format, &all)?;
        out.flush()?;
        if !self.quiet {
            // Translated connections among all those listed, not only the
            // last reading's.
            let nat = r.nat.map(|mut n| {
                n.translated = all.iter().filter(|c| flowtable::nat::translated(c)).count() as u64;
                n
            });
            eprintln!(
                "flowprobe: {} ({health})",
                print::summary(
                    all.len() + unlisted.conns as usize,
                    r.health.frames(),
                    nat.as_ref()
                )
            );
        }
        if unlisted.conns > 0 {
            eprintln!(
                "flowprobe: {} connections that ended more than --keep-ended before the end are not listed (over --list-max); together they sent {} and received {} bytes; `flowprobe query --agent ... --last` has them by group",
                unlisted.conns, unlisted.sent.bytes, unlisted.received.bytes
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
    fn export(&mut self, conns: &Arc<Vec<Connection>>, retired: &[Connection]) {
        let Some(e) = &mut self.export else { return };
        match e.write(conns, retired, SystemTime::now()) {
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
