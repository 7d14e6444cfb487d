//! `flowprobe`: per-connection bytes, packets and TCP retransmits, from
//! eBPF or AF_PACKET on live interfaces, or from capture files.
//!
//! The stages, in the order a packet meets them: [`sources`] → [`enrich`] →
//! [`export`]; [`run`] is the pipeline of `flowprobe run`, [`os`] the
//! operating-system helpers every stage may use, [`top`] the terminal UI
//! over an agent or a replay. ARCHITECTURE.md has the map.

mod cli;
mod enrich;
mod export;
mod fleet;
mod os;
mod run;
mod settings;
mod sources;
mod top;

#[cfg(test)]
mod architecture;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;
use flowtable::query::origin;
use flowtable::{FlowTable, FrameStats};

use crate::cli::{Cli, Cmd};
use crate::export::agent;
use crate::export::print::{self as output, Format};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("flowprobe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run { flags } => {
            run::run(flags.settings()?)?;
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
        Cmd::Fleet { cmd } => {
            fleet::run(cmd)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Top {
            agent: addr,
            replay,
            refresh,
            speed,
            query,
        } => {
            let target = if replay.is_empty() {
                let addr = addr.as_deref().unwrap_or("127.0.0.1:9911");
                top::Target::Agent(
                    agent::parse_listen(addr).map_err(|e| anyhow::anyhow!("--agent: {e}"))?,
                )
            } else {
                top::Target::Replay(replay)
            };
            if !(refresh > 0.0 && refresh.is_finite()) {
                anyhow::bail!("--refresh: give a number of seconds above 0");
            }
            if !(speed > 0.0 && speed.is_finite()) {
                anyhow::bail!("--speed: give a factor above 0");
            }
            top::run(
                target,
                query,
                std::time::Duration::from_secs_f64(refresh),
                speed,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => {
            cli::generate::completions(shell, &mut io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir: None } => {
            cli::generate::man(&mut io::stdout().lock())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Man { dir: Some(dir) } => {
            for page in cli::generate::man_pages(&dir)? {
                println!("{}", page.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Replay {
            files,
            format,
            quiet,
            per_interface,
            decap,
            query,
            host_addrs,
            fleet,
        } => {
            if fleet.fleet.is_some() {
                if fleet.host_id.is_none() {
                    anyhow::bail!(
                        "replay --fleet needs --host-id: the host the capture was taken on"
                    );
                }
                if host_addrs.is_empty() {
                    anyhow::bail!("replay --fleet needs --host-addr: the addresses of the host the capture was taken on (repeat for several)");
                }
                if query.given() || per_interface {
                    anyhow::bail!("replay --fleet publishes the capture; query it with `flowprobe query --agent` against `flowprobe fleet`");
                }
                let o = fleet
                    .options(None)
                    .map_err(|e| anyhow::anyhow!(e))?
                    .expect("--fleet given");
                let host = o.host_id.clone();
                let (status, outcomes) = export::fleet::publish_capture(
                    &files,
                    o,
                    host_addrs,
                    decap.decap(None, None, None),
                )?;
                let mut code = ExitCode::SUCCESS;
                for o in &outcomes {
                    if let Some(e) = &o.error {
                        eprintln!("flowprobe: {}: {e}", o.path.display());
                        if o.frames == 0 {
                            code = ExitCode::FAILURE;
                        }
                    }
                }
                if !quiet {
                    eprintln!(
                        "flowprobe: published {} intervals ({} rows, {} groups folded, {} forwarded groups left out) as host {host}",
                        status.intervals, status.rows, status.folded_groups, status.foreign_groups
                    );
                }
                let _ = format;
                return Ok(code);
            }
            // Parse the query before reading gigabytes, so a typo fails fast.
            let spec = query.given().then(|| query.spec()).transpose()?;
            if spec.as_ref().is_some_and(|q| q.last.is_some()) {
                anyhow::bail!("--last is answered by a running agent's rollups (flowprobe query --agent); for a capture, use --window");
            }
            let mut table = if per_interface {
                FlowTable::per_interface()
            } else {
                FlowTable::new()
            };
            let mut stats = FrameStats::default();
            let outcomes = sources::file::replay(
                &files,
                &mut table,
                &mut stats,
                decap.decap(None, None, None),
            )?;
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
                eprintln!("flowprobe: {}", output::summary(conns.len(), &stats, None));
            }
            Ok(if unreadable {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
