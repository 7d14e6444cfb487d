//! The agent side of `flowprobe run --listen`: an HTTP server with
//! `/metrics` (Prometheus), `/query` (the query engine over the live
//! connections) and `/connections`, and the client `flowprobe query` uses.
//!
//! The run loop owns the kernel maps; it hands a [`Snapshot`] to
//! [`Latest::publish`] at each tick, and the server, on its own thread with
//! a current-thread tokio runtime, answers every request from the latest
//! one. So a scrape never touches the kernel and never blocks the loop for
//! longer than swapping an `Arc`.

pub mod client;
mod health;
mod http;
pub mod metrics;
mod web;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use flowtable::Connection;

use super::jsonl::ExportStatus;
use crate::sources::{Health, Reading};

pub use metrics::MetricLabels;

/// What the run loop saw at one tick; before the first, nothing.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every connection so far, those moved out of the kernel map included.
    pub conns: Vec<Connection>,
    /// What the source says about itself; `None` until the first tick.
    pub health: Option<Health>,
    /// `--export-jsonl`: how writing it fares.
    pub export: Option<ExportStatus>,
}

impl From<Reading> for Snapshot {
    fn from(r: Reading) -> Snapshot {
        Snapshot {
            conns: r.conns,
            health: Some(r.health),
            export: None,
        }
    }
}

/// The latest snapshot, shared between the run loop and the server.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<Arc<Snapshot>>>);

impl Latest {
    pub fn publish(&self, s: Snapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    pub fn get(&self) -> Arc<Snapshot> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// `--listen`: `PORT` alone means loopback (an agent is not exposed to the
/// network unless asked), `ADDR:PORT` as given.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Some(port) = s.strip_prefix(':') {
        if let Ok(port) = port.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    s.parse()
        .map_err(|_| format!("`{s}` is not ADDR:PORT or PORT (e.g. 127.0.0.1:9911, [::1]:9911)"))
}

/// Binds `addr` now, so that a port in use fails `flowprobe run` at start,
/// and serves on a background thread until the process exits.
pub fn start(addr: SocketAddr, shared: Latest, labels: MetricLabels) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("--listen {addr}: the port is in use (another flowprobe?)")
        } else {
            anyhow::anyhow!("--listen {addr}: {e}")
        }
    })?;
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the agent's runtime")?;
    std::thread::Builder::new()
        .name("agent-http".to_owned())
        .spawn(move || {
            if let Err(e) = rt.block_on(http::serve(listener, shared, labels)) {
                eprintln!("flowprobe: agent endpoint stopped: {e:#}");
            }
        })
        .context("starting the agent's thread")?;
    Ok(bound)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::IpAddr;

    use flowtable::query::{origin, QueryArgs, QuerySpec};
    use flowtable::DirStats;

    use super::*;
    use crate::export::print::{self as output, Format};

    /// Five connections to two services from two clients.
    pub(crate) fn conns() -> Vec<Connection> {
        (0..5u8)
            .map(|i| Connection {
                proto: "tcp",
                src: IpAddr::from([10, 0, 0, 1 + i % 2]),
                sport: 40000 + u16::from(i),
                dst: IpAddr::from([10, 0, 1, 1]),
                dport: [80, 443][usize::from(i % 2)],
                iface: 2,
                first_seen: 1_000_000_000 * u64::from(i),
                last_seen: 1_000_000_000 * u64::from(i + 2),
                sent: DirStats {
                    packets: 2,
                    bytes: 100 * u64::from(i + 1),
                    ..DirStats::default()
                },
                received: DirStats {
                    packets: 1,
                    bytes: 1000,
                    ..DirStats::default()
                },
                rtt: None,
                src_tags: Default::default(),
                dst_tags: Default::default(),
            })
            .collect()
    }

    /// A served snapshot answers as the same query run here.
    #[test]
    fn query_over_http_equals_the_local_query() {
        let shared = Latest::default();
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            shared.clone(),
            MetricLabels::default(),
        )
        .unwrap();
        shared.publish(Snapshot {
            conns: conns(),
            ..Snapshot::default()
        });
        let args = QueryArgs {
            src: Some("ip".to_owned()),
            dst: Some("port".to_owned()),
            wheres: vec!["dst.port in (80, 443)".to_owned()],
            sort: Some("sent_bytes:asc".to_owned()),
            top: Some(2),
            ..QueryArgs::default()
        };
        let c = conns();
        let local = QuerySpec::parse(&args).unwrap().run(&c, origin(&c));
        for (format, name) in [(Format::Json, "json"), (Format::Table, "table")] {
            let mut want = Vec::new();
            output::write_query(&mut want, format, &local).unwrap();
            let path = format!(
                "/query?src=ip&dst=port&where={}&sort=sent_bytes%3Aasc&top=2&format={name}",
                client::encode("dst.port in (80, 443)")
            );
            let got = client::get(addr, &path).unwrap();
            assert_eq!(
                String::from_utf8(got).unwrap(),
                String::from_utf8(want).unwrap()
            );
        }
        let metrics = client::get(addr, "/metrics").unwrap();
        assert_eq!(
            String::from_utf8(metrics).unwrap(),
            metrics::encode(&shared.get(), &MetricLabels::default())
        );

        let err = client::get(addr, "/query?sort=speed")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("400 Bad Request") && err.contains("speed"),
            "{err}"
        );
        let err = client::get(addr, "/query?color=red")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown parameter `color`"), "{err}");

        // The port is taken now: a second agent says so in one line.
        let err = start(addr, Latest::default(), MetricLabels::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--listen {addr}: the port is in use (another flowprobe?)")
        );
    }

    #[test]
    fn unreachable_agent() {
        // Bound and dropped: nothing listens there now.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let err = client::get(addr, "/query").unwrap_err().to_string();
        assert!(
            err.starts_with(&format!("cannot reach the agent at {addr}:")),
            "{err}"
        );
        assert!(err.contains("is `flowprobe run --listen"), "{err}");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9911").unwrap().to_string(), "127.0.0.1:9911");
        assert_eq!(parse_listen(":9911").unwrap().to_string(), "127.0.0.1:9911");
        assert_eq!(
            parse_listen("0.0.0.0:80").unwrap().to_string(),
            "0.0.0.0:80"
        );
        assert_eq!(parse_listen("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert!(parse_listen("localhost").is_err());
    }
}
