//! `flowprobe run`: the pipeline, in one place.
//!
//! ```text
//! source (tc | xdp | afpacket) ──read──▶ enrich (NAT, then attribution) ──▶ sinks (agent, export, printer)
//!     ▲ link events (rtnetlink)
//! ```
//!
//! It opens the sinks (so that a port in use fails before anything is
//! loaded), picks the source (`auto`: eBPF, else AF_PACKET with the reason
//! said), starts enrichment with the source's key feed, then until
//! `--duration` or SIGINT/SIGTERM: hands link events to the source, lets it
//! do its periodic work, and at every tick reads it, tags the reading and
//! gives it to the sinks; the reading as the sinks keep it goes back to
//! enrichment, which takes what it gave each connection from it at the
//! next tick (no stage keeps a record per connection of its own). At the
//! end the source stops (detaches) and its final reading goes the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flowtable::sort_connections;

use crate::enrich::nat::Nat;
use crate::enrich::{self, Attribution};
use crate::export::{SinkOptions, Sinks};
use crate::os::links::{self, Watcher};
use crate::os::signals::Stop;
use crate::os::statedir::StateDir;
use crate::settings::{Backend, RunSettings};
use crate::sources::{afpacket, ebpf, Hook, Links, Reading, Source, Unavailable};

/// How often the loop looks at link events, the stop flag and the clock.
const POLL: Duration = Duration::from_millis(50);

/// How often the interfaces are listed afresh whatever the events said:
/// an overflowing event socket reports its loss once, and events lost
/// again while catching up would otherwise be missed for good (seen with
/// 500 interfaces made at once).
const RESYNC: Duration = Duration::from_secs(5);

pub fn run(s: RunSettings) -> Result<()> {
    crate::os::alloc::for_a_daemon();
    let stop = Stop::on_signals()?;
    // Before anything is loaded: a live holder refuses this run.
    let state = match &s.state_dir {
        Some(d) => Some(Arc::new(StateDir::lock(d)?)),
        None => None,
    };
    let mut sinks = Sinks::open(SinkOptions {
        listen: s.listen.clone(),
        export_jsonl: s.export_jsonl.as_deref(),
        print_snapshots: s.interval.is_some(),
        format: s.format,
        quiet: s.quiet,
        rollups: s.rollups,
        list_max: s.list_max,
        fleet: s.fleet.clone(),
        state: state.clone(),
    })?;
    // Subscribe before the dump, so that no link change falls between.
    let mut watcher = Watcher::subscribe()?;
    let all = links::dump()?;
    for name in &s.ifaces {
        if !all.iter().any(|l| &l.name == name) {
            bail!("no interface {name} in this network namespace");
        }
    }
    let mut source = open_source(&s, state.clone())?;
    let released = sinks.resume(source.adopted(), source.keeps_state())?;
    source.resume(&released);
    // A socket is remembered until its connection is retired, at the most
    // for as long as an idle connection can stay listed.
    let enrich = enrich::start(
        source.key_feed(),
        source.owner_feed(),
        s.idle_timeout + s.keep_ended + Duration::from_secs(60),
        s.capacity as usize,
    );
    let mut nat = Nat::start(s.per_interface);
    let counted = source.start(&all).and_then(|()| {
        follow(
            source.as_mut(),
            &mut watcher,
            (&mut nat, &enrich),
            &mut sinks,
            &s,
            &stop,
        )
    });
    let last = source.finish();
    counted?;
    let last = tagged(last?, (&mut nat, &enrich));
    let r = sinks.finish(&last);
    if let Some(state) = state {
        state.clear();
    }
    r
}

/// The source the settings ask for; `auto` falls back to AF_PACKET when eBPF
/// is [`Unavailable`] here, saying why in one line.
fn open_source(s: &RunSettings, state: Option<Arc<StateDir>>) -> Result<Box<dyn Source>> {
    let ebpf = |hook| -> Result<Box<dyn Source>> {
        Ok(Box::new(ebpf::open(&ebpf::Options {
            hook,
            only: s.ifaces.clone(),
            object: s.ebpf_object.clone(),
            capacity: s.capacity,
            per_iface: s.per_interface,
            decap: s.decap,
            owners: enrich::enabled() && enrich::at_connect(),
            closed_timeout: s.closed_timeout,
            idle_timeout: s.idle_timeout,
            keep_ended: s.keep_ended,
            state: state.clone(),
        })?))
    };
    let retire = afpacket::Retire {
        closed: s.closed_timeout,
        idle: s.idle_timeout,
        keep_ended: s.keep_ended,
    };
    let afpacket = || -> Result<Box<dyn Source>> {
        Ok(Box::new(afpacket::open(
            &s.ifaces,
            s.per_interface,
            s.decap,
            retire,
        )?))
    };
    match s.backend {
        Backend::Tc => ebpf(Hook::Tc),
        Backend::Xdp => ebpf(Hook::Xdp),
        Backend::Afpacket => afpacket(),
        Backend::Auto => ebpf(Hook::Tc).or_else(|e| match e.downcast_ref::<Unavailable>() {
            Some(why) => {
                // One line, however long the kernel's reason.
                let why = why.to_string();
                let why = why.lines().next().unwrap_or_default();
                eprintln!("flowprobe: cannot use eBPF ({why}); counting with AF_PACKET instead");
                afpacket()
            }
            None => Err(e),
        }),
    }
}

/// Until --duration or a signal: link events to the source, its periodic
/// work, and at each tick a reading through enrichment to the sinks.
fn follow(
    source: &mut dyn Source,
    watcher: &mut Watcher,
    (nat, enrich): (&mut Option<Nat>, &Attribution),
    sinks: &mut Sinks,
    s: &RunSettings,
    stop: &Stop,
) -> Result<()> {
    let start = Instant::now();
    // Every run reads at each tick, sinks or not: what ended is retired
    // from the source into the bounded history as it goes.
    let every = Some(s.tick());
    let mut next_tick = every.map(|e| start + e);
    let mut next_resync = start + RESYNC;
    while !stop.requested() {
        if s.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        match watcher.poll() {
            Ok(events) if events.is_empty() => {}
            Ok(events) => source.links(Links::Events(&events))?,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // Events were lost: start over from a fresh dump.
                source.links(Links::Resync(&links::dump()?))?;
            }
            Err(e) => return Err(e).context("reading rtnetlink link events"),
        }
        if Instant::now() >= next_resync {
            source.links(Links::Resync(&links::dump()?))?;
            next_resync = Instant::now() + RESYNC;
        }
        source.poll()?;
        if let (Some(at), Some(every)) = (next_tick, every) {
            if Instant::now() >= at {
                let r = tagged(source.read()?, (&mut *nat, enrich));
                let releasing = source.releasing();
                let tick = sinks.tick(r, &releasing)?;
                if tick.committed {
                    source.committed();
                }
                // What the next reading is taken against.
                if let Some(nat) = nat.as_mut() {
                    nat.remember(Arc::clone(&tick.conns));
                }
                enrich.remember(tick.conns);
                next_tick = Some(at + every);
            }
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// Enrichment of one reading: NAT undone first (one record per
/// connection, the responder's address beyond the translation known), then
/// attribution.
fn tagged(mut r: Reading, (nat, enrich): (&mut Option<Nat>, &Attribution)) -> Reading {
    if let Some(nat) = nat {
        nat.undo(&mut r);
    }
    enrich.tag(&mut r.conns);
    enrich.tag_and_forget(&mut r.retired);
    r.attrib = enrich.health();
    sort_connections(&mut r.conns);
    r
}
