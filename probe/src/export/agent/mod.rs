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

use flowtable::query::QueryResult;
use flowtable::rollup::Rollups;

use super::fleet::FleetStatus;
use super::history::Bounds;
use super::jsonl::ExportStatus;
use crate::sources::Health;

pub use metrics::MetricLabels;

/// What the run loop saw at one tick; before the first, nothing.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// The connections the source lists: open ones and those that ended
    /// less than `--keep-ended` ago.
    pub conns: Arc<Vec<Connection>>,
    /// What the source says about itself; `None` until the first tick.
    pub health: Option<Health>,
    /// `--export-jsonl`: how writing it fares.
    pub export: Option<ExportStatus>,
    /// The interval rollups `/query?last=` answers from (the run loop
    /// updates them in place).
    pub rollups: Option<Arc<Mutex<Rollups>>>,
    /// `/metrics`' group sums of connections no longer listed.
    pub retired_totals: Option<Arc<QueryResult>>,
    pub bounds: Bounds,
    /// `--fleet`: how publishing fares.
    pub fleet: Option<FleetStatus>,
    /// This host's addresses: the responders among them are listeners
    /// (`flowprobe_listener_info`).
    pub local_addrs: Vec<std::net::IpAddr>,
    /// Set by `flowprobe fleet`: `/query`, `/metrics` and `/health` are
    /// answered by it instead of from the fields above.
    pub view: Option<Arc<dyn View>>,
    /// What undoing NAT did (`None`: the step is off).
    pub nat: Option<flowtable::nat::NatStats>,
    /// How attribution fares (`None`: it is off).
    pub attrib: Option<flowtable::attrib::AttribHealth>,
}

/// What serves the routes when the answers are not one host's
/// connections: the fleet process's joined intervals.
pub trait View: Send + Sync {
    /// The rows of `spec` (a `window` is refused with the reason).
    fn query(&self, spec: &flowtable::query::QuerySpec) -> Result<QueryResult, String>;
    /// The OpenMetrics text.
    fn metrics(&self) -> String;
    /// The JSON text of `/health`.
    fn health(&self) -> String;
}

/// The latest snapshot, shared between the run loop and the server.
#[derive(Clone, Default)]
pub struct Latest(Arc<Mutex<Arc<Snapshot>>>);

impl Latest {
    pub fn publish(&self, s: Snapshot) {
        let old = std::mem::replace(
            &mut *self.0.lock().unwrap_or_else(|p| p.into_inner()),
            Arc::new(s),
        );
        // Freeing the last tick's connections takes a while: not under the
        // lock the HTTP server waits on.
        drop(old);
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
    start_with(addr, shared, labels, http::LIMITS)
}

fn start_with(
    addr: SocketAddr,
    shared: Latest,
    labels: MetricLabels,
    limits: http::Limits,
) -> anyhow::Result<SocketAddr> {
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
        .enable_time()
        .build()
        .context("starting the agent's runtime")?;
    std::thread::Builder::new()
        .name("agent-http".to_owned())
        .spawn(move || {
            let stats = Arc::new(http::ServerStats::default());
            if let Err(e) = rt.block_on(http::serve(listener, shared, labels, stats, limits)) {
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
                proto: flowtable::Proto::Tcp,
                src: IpAddr::from([10, 0, 0, 1 + i % 2]),
                sport: 40000 + u16::from(i),
                dst: IpAddr::from([10, 0, 1, 1]),
                dport: [80, 443][usize::from(i % 2)],
                iface: 2,
                first_seen: 1_000_000_000 * u64::from(i),
                last_seen: 1_000_000_000 * u64::from(i + 2),
                sent: DirStats::counts(2, 100 * u64::from(i + 1), 0),
                received: DirStats::counts(1, 1000, 0),
                rtt: Default::default(),
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
            conns: conns().into(),
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
        // /metrics is the snapshot's exposition plus the server's own
        // series (before the end marker).
        let metrics = String::from_utf8(client::get(addr, "/metrics").unwrap()).unwrap();
        let want = metrics::encode(&shared.get(), &MetricLabels::default());
        let own = |l: &&str| l.contains("flowprobe_http_");
        let theirs: Vec<&str> = metrics.lines().filter(|l| !own(l)).collect();
        assert_eq!(theirs, want.lines().collect::<Vec<_>>());
        assert!(metrics.contains("flowprobe_http_clients 1\n"), "{metrics}");

        // /connections pages.
        let page = client::get(addr, "/connections?offset=1&limit=2").unwrap();
        let mut want = Vec::new();
        output::write(&mut want, Format::Json, &conns()[1..3]).unwrap();
        assert_eq!(page, want);
        let all = client::get(addr, "/connections").unwrap();
        assert_eq!(String::from_utf8(all).unwrap().lines().count(), 5);
        let err = client::get(addr, "/connections?limit=x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("400") && err.contains("limit"), "{err}");

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

    /// `last=` is answered from the rollups, as the same query run on them
    /// here; a bad duration is a 400 naming the parameter.
    #[test]
    fn last_is_answered_from_the_rollups() {
        use flowtable::rollup::{RollupSettings, Rollups};
        let shared = Latest::default();
        let addr = start(
            "127.0.0.1:0".parse().unwrap(),
            shared.clone(),
            MetricLabels::default(),
        )
        .unwrap();
        let mut r = Rollups::new(RollupSettings::default());
        r.update(6_000_000_000, conns(), &[]);
        let args = QueryArgs {
            dst: Some("port".to_owned()),
            last: Some("1m".to_owned()),
            ..QueryArgs::default()
        };
        let spec = QuerySpec::parse(&args).unwrap();
        let local = r.query(&spec, spec.last.unwrap());
        assert_eq!(local.rows.len(), 2);
        let mut want = Vec::new();
        output::write_query(&mut want, Format::Json, &local).unwrap();
        shared.publish(Snapshot {
            rollups: Some(Arc::new(Mutex::new(r))),
            ..Snapshot::default()
        });
        let got = client::get(addr, "/query?dst=port&last=1m").unwrap();
        assert_eq!(
            String::from_utf8(got).unwrap(),
            String::from_utf8(want).unwrap()
        );
        let err = client::get(addr, "/query?last=soon")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("400") && err.contains("--last \"soon\""),
            "{err}"
        );
    }

    /// Clients beyond the bound are answered 503 at once, a client that
    /// sends nothing or too much is closed, and the server goes on.
    #[test]
    fn hostile_clients_are_bounded() {
        use std::io::{Read, Write};
        use std::net::TcpStream;
        use std::time::Duration;
        let limits = http::Limits {
            clients: 4,
            head_timeout: Duration::from_millis(300),
            conn_timeout: Duration::from_secs(5),
            // hyper's least.
            head_bytes: 8192,
        };
        let shared = Latest::default();
        let addr = start_with(
            "127.0.0.1:0".parse().unwrap(),
            shared.clone(),
            MetricLabels::default(),
            limits,
        )
        .unwrap();
        let read_all = |mut s: TcpStream| {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // Four silent clients hold every slot; a fifth is refused.
        let silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        let refused = read_all(TcpStream::connect(addr).unwrap());
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        // The silent ones are closed after the head timeout.
        for s in silent {
            assert!(!read_all(s).contains("200 OK"));
        }
        // A head over the bound is refused, not buffered.
        let mut big = TcpStream::connect(addr).unwrap();
        let _ = write!(
            big,
            "GET /query?where={} HTTP/1.1\r\n",
            "x".repeat(16 * 1024)
        );
        let answer = read_all(big);
        assert!(!answer.contains("200 OK"), "{answer}");
        // Garbage is closed too.
        let mut junk = TcpStream::connect(addr).unwrap();
        junk.write_all(b"\x16\x03\x01 not http\r\n\r\n").unwrap();
        assert!(!read_all(junk).contains("200 OK"));
        // And the server still answers, counting what it refused.
        let metrics = String::from_utf8(client::get(addr, "/metrics").unwrap()).unwrap();
        let value = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {name}: {metrics}"))
        };
        assert_eq!(value("flowprobe_http_refused_total"), 1);
        assert_eq!(value("flowprobe_http_timed_out_total"), 4);
        assert!(value("flowprobe_http_malformed_total") >= 1, "{metrics}");
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
