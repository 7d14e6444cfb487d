//! The agent side of `flowprobe run --listen`: an HTTP server with
//! `/metrics` (Prometheus), `/query` (the query engine over the live
//! connections) and `/connections`, and the client `flowprobe query` uses.
//!
//! The run loop owns the kernel maps; it hands a [`Snapshot`] to
//! [`Shared::publish`] at each tick, and the server, on its own thread with
//! a current-thread tokio runtime, answers every request from the latest
//! one. So a scrape never touches the kernel and never blocks the loop for
//! longer than swapping an `Arc`.

pub mod client;
mod health;
mod http;
pub mod metrics;

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use flowtable::{Connection, FrameStats};

pub use metrics::MetricLabels;

/// What the run loop saw at one tick.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every connection so far, those moved out of the kernel map included.
    pub conns: Vec<Connection>,
    pub stats: FrameStats,
    pub map_full: u64,
    pub insert_failed: u64,
    pub contended: u64,
    /// Interfaces the program is attached to.
    pub attached: Vec<String>,
    /// XDP: (interface, "native" or "generic") of every attachment.
    pub xdp_modes: Vec<(String, &'static str)>,
    /// AF_PACKET: the kernel's ring counters (packets, drops, queue
    /// freezes), summed over the rings.
    pub rings: Option<[u64; 3]>,
    /// Entries in the kernel map now, and its capacity.
    pub in_map: usize,
    pub capacity: u32,
    /// `tc`, `xdp` (the kernel map and its counters above are real) or
    /// `afpacket` (only `conns` is).
    pub backend: &'static str,
}

impl Snapshot {
    /// Whether the kernel's maps and counters are in this snapshot.
    pub fn ebpf(&self) -> bool {
        matches!(self.backend, "tc" | "xdp")
    }
}

/// The latest snapshot, shared between the run loop and the server.
#[derive(Clone, Default)]
pub struct Shared(Arc<Mutex<Arc<Snapshot>>>);

impl Shared {
    pub fn publish(&self, s: Snapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(s);
    }

    pub fn latest(&self) -> Arc<Snapshot> {
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
pub fn start(addr: SocketAddr, shared: Shared, labels: MetricLabels) -> anyhow::Result<SocketAddr> {
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
mod tests {
    use std::net::IpAddr;

    use flowtable::query::{origin, QueryArgs, QuerySpec};
    use flowtable::DirStats;

    use super::*;
    use crate::output::{self, Format};

    fn conns() -> Vec<Connection> {
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
        let shared = Shared::default();
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            shared.clone(),
            MetricLabels::default(),
        )
        .unwrap();
        shared.publish(Snapshot {
            conns: conns(),
            capacity: 16,
            backend: "tc",
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
            metrics::encode(&shared.latest(), &MetricLabels::default())
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
        let err = start(addr, Shared::default(), MetricLabels::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("--listen {addr}: the port is in use (another flowprobe?)")
        );
    }

    /// `flowprobe query`'s flags, sent as parameters, parse on the agent
    /// to the query they parse to here.
    #[test]
    fn query_flags_survive_the_trip() {
        use clap::Parser;

        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            q: crate::query::QueryFlags,
        }
        let shared = Shared::default();
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
        let c = conns();
        for args in [
            &[
                "--src",
                "ip/24",
                "--dst",
                "ip,port",
                "--where",
                "dst.port in (80, 443)",
            ][..],
            &[
                "--dst",
                "port",
                "--sort",
                "retransmits",
                "--top",
                "1",
                "--raw-ports",
            ],
            &[
                "--src",
                "ip",
                "--where",
                "src.ip in 10.0.0.0/8",
                "--where",
                "dst.port!=443",
            ],
            &["--window", "1..3", "--dst", "ip"],
            &[],
        ] {
            let flags = Cli::try_parse_from([&["t"][..], args].concat()).unwrap().q;
            let path = format!("/query?{}", flags.params());
            let local = flags.spec().unwrap().run(&c, origin(&c));
            let mut want = Vec::new();
            output::write_query(&mut want, Format::Json, &local).unwrap();
            let got = client::get(addr, &path).unwrap();
            assert_eq!(got, want, "{args:?} as {path}");
        }
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
