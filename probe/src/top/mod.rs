//! `flowprobe top`: the rows of a query, live from an agent or from a
//! capture played on its own clock, in the terminal (ratatui, crossterm).
//!
//! One event loop: it fetches (the agent's `/query` and `/health` on a
//! worker thread, or the replay's query run here), hands keys to
//! [`view::View::key`], and draws with [`render::draw`], a pure function
//! of ([`model::Data`], [`view::View`]). The numbers are those of the
//! query engine's JSON rows in both modes; `top` adds none of its own but
//! `RETX%` (retransmitted bytes over bytes of the row).

pub mod export;
pub mod model;
pub mod render;
pub mod replay;
pub mod view;

#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyEventKind};
use flowtable::query::origin;
use flowtable::Connection;

use self::model::{Answer, Data, Health, Row};
use self::replay::Player;
use self::view::{Effect, Play, View};
use crate::cli::query_flags::QueryFlags;
use crate::export::agent::client;
use crate::export::print::{self as output, Format};

/// Where the rows come from.
pub enum Target {
    Agent(SocketAddr),
    Replay(Vec<PathBuf>),
}

/// The group-by keys of `flags` as the rows name them.
fn keys(flags: &QueryFlags) -> Result<(Vec<String>, Vec<String>), String> {
    let q = flags.clone().spec().map_err(|e| e.to_string())?;
    let names = |k: &[flowtable::query::TagKey]| k.iter().map(|k| k.to_string()).collect();
    Ok((names(&q.src), names(&q.dst)))
}

/// The query over `conns`, as the JSON lines `/query` would answer, parsed
/// back: the rows and the one totals row.
pub fn answer(flags: &QueryFlags, conns: &[Connection]) -> Result<(Answer, Option<Row>), String> {
    let run = |f: &QueryFlags| -> Result<Answer, String> {
        let (s, d) = keys(f)?;
        let spec = f.clone().spec().map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        output::write_query(&mut body, Format::Json, &spec.run(conns, origin(conns)))
            .map_err(|e| e.to_string())?;
        Answer::parse(s, d, &body)
    };
    let rows = run(flags)?;
    let totals = run(&flags.totals())?.rows.into_iter().next();
    Ok((rows, totals))
}

/// What a replay of `files` shows before the first frame.
fn replay_data(files: &[PathBuf], p: &Player) -> Data {
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    Data {
        source: format!("replay {}", names.join(" ")),
        command: ["flowprobe", "replay"]
            .map(String::from)
            .into_iter()
            .chain(names)
            .collect(),
        error: (!p.warnings.is_empty()).then(|| p.warnings.join("; ")),
        ..Data::default()
    }
}

/// The query over what the replay has played so far.
fn refresh_replay(data: &mut Data, p: &Player, flags: &QueryFlags) {
    data.playback = Some(p.playback());
    data.health = p.health();
    match answer(flags, &p.connections()) {
        Ok((a, t)) => {
            data.answer = a;
            data.totals = t;
        }
        Err(e) => data.error = Some(e),
    }
}

/// One round of questions to the agent: the rows, the totals, `/health`.
fn ask(addr: SocketAddr, flags: &QueryFlags) -> Result<(Answer, Option<Row>, Health), String> {
    let get = |path: String| client::get(addr, &path).map_err(|e| format!("{e:#}"));
    let query = |f: &QueryFlags| -> Result<Answer, String> {
        let (s, d) = keys(f)?;
        Answer::parse(s, d, &get(format!("/query?{}&format=json", f.params()))?)
    };
    let rows = query(flags)?;
    let totals = query(&flags.totals())?.rows.into_iter().next();
    let health: Health = serde_json::from_slice(&get("/health".to_owned())?)
        .map_err(|e| format!("/health is not what flowprobe serves: {e}"))?;
    Ok((rows, totals, health))
}

type Answered = (QueryFlags, Result<(Answer, Option<Row>, Health), String>);

/// The agent's questions on their own thread, so a slow agent never
/// holds the keys; the loop sends a query and takes answers when they come.
fn asker(addr: SocketAddr) -> (mpsc::Sender<QueryFlags>, mpsc::Receiver<Answered>) {
    let (qtx, qrx) = mpsc::channel::<QueryFlags>();
    let (atx, arx) = mpsc::channel();
    std::thread::spawn(move || {
        while let Ok(mut f) = qrx.recv() {
            // Only the latest question matters.
            while let Ok(newer) = qrx.try_recv() {
                f = newer;
            }
            let r = ask(addr, &f);
            if atx.send((f, r)).is_err() {
                break;
            }
        }
    });
    (qtx, arx)
}

/// Runs `top` until `q`; the terminal is restored on the way out, on an
/// error and on a panic (ratatui's hook).
pub fn run(
    target: Target,
    mut flags: QueryFlags,
    refresh: Duration,
    speed: f64,
) -> anyhow::Result<()> {
    if !flags.given() {
        // Say the default, so that the command shown gives these rows in
        // `replay` too (which prints connections without query flags).
        flags.set_group(Some("service".to_owned()), Some("service".to_owned()));
    }
    let spec = flags.clone().spec()?;
    if matches!(target, Target::Replay(_)) && spec.last.is_some() {
        anyhow::bail!("--last is answered by a running agent's rollups (top --agent); for a capture, use --window");
    }
    let mut data = Data::default();
    let mut player = None;
    let mut agent = None;
    match &target {
        Target::Agent(addr) => {
            data.source = format!("agent {addr}");
            data.command = ["flowprobe", "query", "--agent", &addr.to_string()]
                .map(String::from)
                .to_vec();
            agent = Some(asker(*addr));
            data.pending = true;
        }
        Target::Replay(files) => {
            let mut p = Player::open(files)?;
            p.speed = speed;
            data = replay_data(files, &p);
            player = Some(p);
        }
    }
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "top draws on a terminal: run it in one (`flowprobe query` prints the same rows)"
        );
    }
    // Raw mode and the alternate screen; ratatui's panic hook restores
    // both before a panic's message is printed.
    // SIGTERM (and SIGINT, which raw mode only delivers from elsewhere)
    // end the loop like `q`, so the terminal is restored.
    let stop = crate::os::signals::Stop::on_signals()?;
    let mut terminal = ratatui::try_init()?;
    let result = event_loop(
        &stop,
        &mut terminal,
        data,
        View::new(flags),
        player,
        agent,
        refresh,
    );
    ratatui::restore();
    result
}

fn event_loop(
    stop: &crate::os::signals::Stop,
    terminal: &mut ratatui::DefaultTerminal,
    mut data: Data,
    mut view: View,
    mut player: Option<Player>,
    agent: Option<(mpsc::Sender<QueryFlags>, mpsc::Receiver<Answered>)>,
    refresh: Duration,
) -> anyhow::Result<()> {
    let mut asked: Option<Instant> = None;
    let mut in_flight = false;
    let mut stale = true;
    let mut shown = view.flags.clone();
    let mut last_tick = Instant::now();
    while !stop.requested() {
        let now = Instant::now();
        if let Some(p) = &mut player {
            if !view.paused && !p.done() {
                p.advance(now - last_tick);
                stale = true;
            }
            if stale {
                refresh_replay(&mut data, p, &view.flags);
                stale = false;
            }
        }
        last_tick = now;
        if let Some((tx, rx)) = &agent {
            while let Ok((f, r)) = rx.try_recv() {
                in_flight = false;
                if f != view.flags {
                    continue;
                }
                data.pending = false;
                match r {
                    Ok((a, t, h)) => {
                        data.answer = a;
                        data.totals = t;
                        data.health = h;
                        data.error = None;
                    }
                    Err(e) => data.error = Some(e),
                }
            }
            let due = asked.is_none_or(|t| t.elapsed() >= refresh) && !view.paused;
            // A changed query goes at once; a refresh waits for the last answer.
            if stale || (due && !in_flight) {
                tx.send(view.flags.clone())?;
                in_flight = true;
                asked = Some(Instant::now());
                stale = false;
            }
        }

        let size = terminal.size()?;
        view.page = render::page_size(&data, &view, size.width, size.height);
        view.selected = view.selected.min(data.answer.rows.len().saturating_sub(1));
        view.scroll();
        terminal.draw(|f| render::draw(f, &data, &view))?;

        if !event::poll(Duration::from_millis(100))? {
            continue;
        }
        let Event::Key(k) = event::read()? else {
            continue;
        };
        if k.kind != KeyEventKind::Press {
            continue;
        }
        match view.key(k, &data) {
            Effect::None => {}
            Effect::Quit => return Ok(()),
            // Seen below, by comparing the query.
            Effect::Query => {}
            Effect::Export(path) => {
                let rows: Vec<usize> = view::ordered(&data.answer, &view)
                    .iter()
                    .filter_map(|r| data.answer.rows.iter().position(|x| std::ptr::eq(x, *r)))
                    .collect();
                let (error, text) =
                    match export::write(std::path::Path::new(&path), &data.answer, &rows) {
                        Ok(()) => (false, format!("{} rows written to {path}", rows.len())),
                        Err(e) => (true, format!("{path}: {e}")),
                    };
                view.message = Some(view::Message { error, text });
            }
            Effect::Play(p) => {
                if let Some(pl) = &mut player {
                    match p {
                        Play::Step => pl.step(),
                        Play::Faster => pl.speed = (pl.speed * 2.0).min(1024.0),
                        Play::Slower => pl.speed = (pl.speed / 2.0).max(1.0 / 1024.0),
                        Play::Seek(x) => pl.seek(x),
                        Play::Start => pl.start(),
                        Play::End => pl.end(),
                    }
                    stale = true;
                }
            }
        }
        if view.flags != shown {
            // A new query: until its answer comes, its columns and no rows
            // (a replay answers at once, above).
            shown = view.flags.clone();
            stale = true;
            if agent.is_some() {
                let (src_keys, dst_keys) = keys(&view.flags).unwrap_or_default();
                data.answer = Answer {
                    src_keys,
                    dst_keys,
                    ..Answer::default()
                };
                data.totals = None;
                data.pending = true;
            }
        }
    }
    Ok(())
}
