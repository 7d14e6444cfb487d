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
    /// Entries in the kernel map now, and its capacity.
    pub in_map: usize,
    pub capacity: u32,
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
    use super::*;

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
