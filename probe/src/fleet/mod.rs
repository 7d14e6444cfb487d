//! `flowprobe fleet`: the fleet process. It consumes the agents' stream
//! with a durable JetStream consumer (made anew from the stream's start at
//! each connection, so a restarted fleet rebuilds its window from the
//! stream), watches the presence and endpoint KV buckets, keeps a bounded
//! [`join::Window`] and serves `/query`, `/metrics` and `/health` over all
//! hosts through the agent's HTTP server (`export::agent::View`).
//!
//! ```text
//! stream FLOWPROBE ──consumer──▶ wire::check ──▶ Window ──join──▶ Joined ──▶ /query
//! KV presence, endpoints ──watch──────────────────▲
//! ```

pub mod join;
pub mod store;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{self, consumer, kv};
use flowtable::query::{QueryResult, QuerySpec};
use futures_util::StreamExt;
use prometheus_client::registry::Registry;
use serde::Serialize;

use self::join::{Joined, Limits, Window};
use crate::export::agent::metrics::{counter, gauge, Series};
use crate::export::agent::{self, Latest, MetricLabels, Snapshot, View};
use crate::export::fleet::nats::{self, Nats, NatsFlags, StreamBounds};
use crate::export::fleet::wire::{self, Reject};
use crate::export::history::lock;
use crate::os::signals::Stop;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:9912";
pub const DEFAULT_WINDOW_S: f64 = 600.0;
pub const DEFAULT_MAX_HOSTS: usize = 10_000;
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 20;
pub const DEFAULT_MAX_ROWS: usize = 10_000;
pub const DEFAULT_MAX_GROUPS: usize = 20_000;
pub const DEFAULT_MAX_ENDPOINTS: usize = 100_000;
pub const DEFAULT_CONSUMER: &str = "flowprobe-fleet";
/// How often the joined answer is rebuilt while messages come in.
const REBUILD: Duration = Duration::from_millis(200);
/// Messages and entries held while a join has the window (it runs on a
/// thread of its own, so that the connection's heartbeats go on); beyond,
/// the consumer waits.
const MAX_PENDING: usize = 64;

/// The flags of `flowprobe fleet`.
#[derive(clap::Args, Debug)]
pub struct FleetCmd {
    /// The NATS server the agents publish to: nats://HOST:PORT (or
    /// tls://HOST:PORT).
    #[arg(long, value_name = "URL")]
    pub nats: String,
    /// Serve /query, /metrics and /health here: ADDR:PORT, or PORT alone
    /// for 127.0.0.1:PORT.
    #[arg(long, value_name = "ADDR:PORT", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Keep intervals that ended this long before the newest one.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_WINDOW_S)]
    pub window: f64,
    /// Hosts kept; messages of more hosts are refused (counted).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_HOSTS)]
    pub max_hosts: usize,
    /// A larger message is rejected (counted).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// A message with more rows is rejected (counted).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ROWS)]
    pub max_rows: usize,
    /// Groups per joined interval; the rest are folded into `other`
    /// (counted).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_GROUPS)]
    pub max_groups: usize,
    /// Endpoint directory entries kept (counted beyond).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_ENDPOINTS)]
    pub max_endpoints: usize,
    /// When this process makes the stream (it is not there yet): how long
    /// it keeps messages.
    #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
    pub stream_max_age: f64,
    /// When this process makes the stream: its bound in bytes (the oldest
    /// messages go first).
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 30)]
    pub stream_max_bytes: i64,
    /// The durable consumer's name (one per fleet process on a stream).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_CONSUMER)]
    pub consumer: String,
    #[command(flatten)]
    pub auth: NatsFlags,
}

/// What the fleet's routes answer from.
struct FleetView {
    joined: Joined,
    window: WindowReport,
    stream: StreamReport,
}

/// The window's state for /health and /metrics, copied at each rebuild.
#[derive(Clone, Debug, Default, Serialize)]
struct WindowReport {
    hosts: Vec<HostReport>,
    stats: join::Stats,
    join: join::JoinStats,
    intervals: usize,
    /// Rows held, the bytes of their packed form, distinct tag sets.
    rows: u64,
    row_bytes: u64,
    tag_sets: usize,
    endpoints: usize,
    presence: usize,
    limits: LimitsReport,
}

#[derive(Clone, Debug, Default, Serialize)]
struct LimitsReport {
    window_s: f64,
    max_hosts: usize,
    max_message_bytes: usize,
    max_rows: usize,
    max_groups: usize,
    max_endpoints: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
struct HostReport {
    host: String,
    network: String,
    addresses: Vec<std::net::IpAddr>,
    intervals: usize,
    first_start_ns: u64,
    last_end_ns: u64,
    /// Intervals missing between the first and the last of a run (the
    /// agent could not publish them, or its spool dropped them).
    missing: Vec<Missing>,
    spool_dropped: u64,
    /// A presence entry is in the KV bucket (not expired).
    present: bool,
}

#[derive(Clone, Debug, Serialize)]
struct Missing {
    run: u64,
    /// Between these two published intervals' starts.
    after_ns: u64,
    before_ns: u64,
    intervals: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
struct StreamReport {
    connected: bool,
    sessions: u64,
    last_error: Option<String>,
}

impl View for FleetView {
    fn query(&self, spec: &QuerySpec) -> Result<QueryResult, String> {
        if spec.window.is_some() {
            return Err(
                "window: the fleet answers over the intervals it holds; use last (e.g. last=5m)"
                    .to_owned(),
            );
        }
        let j = &self.joined;
        let from = spec
            .last
            .map_or(0, |l| j.now_ns.saturating_sub(l.as_nanos() as u64));
        let intervals: Vec<_> = j
            .intervals
            .iter()
            .filter(|i| i.end_ns > from)
            .cloned()
            .collect();
        let start = intervals.first().map_or(from, |i| i.start_ns.max(from));
        Ok(spec.run_rollups(&intervals, (start, j.now_ns.max(start))))
    }

    fn metrics(&self) -> String {
        let w = &self.window;
        let st = &w.stats;
        let mut reg = Registry::with_prefix("flowprobe_fleet");
        reg.register(
            "hosts",
            "Hosts with intervals in the window",
            gauge(w.hosts.len() as u64),
        );
        reg.register(
            "hosts_max",
            "The bound of those (--max-hosts)",
            gauge(w.limits.max_hosts as u64),
        );
        reg.register(
            "intervals",
            "Host intervals in the window",
            gauge(w.intervals as u64),
        );
        reg.register("rows", "Rows held in the window", gauge(w.rows));
        reg.register(
            "row_bytes",
            "Bytes of the rows held, as packed",
            gauge(w.row_bytes),
        );
        reg.register(
            "tag_sets",
            "Distinct tag sets the rows and the directory hold (each once)",
            gauge(w.tag_sets as u64),
        );
        reg.register(
            "messages",
            "Messages consumed from the stream",
            counter(st.messages),
        );
        reg.register(
            "accepted",
            "Messages taken into the window",
            counter(st.accepted),
        );
        reg.register(
            "duplicates",
            "Messages of an interval already held (not counted again)",
            counter(st.duplicates),
        );
        reg.register(
            "too_old",
            "Messages older than the window when they came",
            counter(st.too_old),
        );
        reg.register(
            "hosts_refused",
            "Messages of hosts beyond --max-hosts",
            counter(st.hosts_refused),
        );
        reg.register(
            "expired_intervals",
            "Host intervals dropped from the window's far end",
            counter(st.expired_intervals),
        );
        let rejected = Reject::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason".to_owned(), r.name().to_owned())],
                    counter(st.rejected.get(r.name()).copied().unwrap_or(0)),
                )
            })
            .collect();
        reg.register(
            "rejected",
            "Messages rejected by the checks, by reason (never counted)",
            Series(rejected),
        );
        reg.register(
            "kv_rejected",
            "Presence or directory entries rejected (bad value, key not under its host)",
            counter(st.kv_rejected),
        );
        reg.register(
            "endpoints",
            "Endpoint directory entries held",
            gauge(w.endpoints as u64),
        );
        reg.register(
            "endpoints_refused",
            "Directory entries beyond --max-endpoints",
            counter(st.endpoints_refused),
        );
        let j = &w.join;
        reg.register(
            "folded_groups",
            "Groups folded into `other` beyond --max-groups in the current answer",
            gauge(j.folded_groups),
        );
        reg.register(
            "joined_rows",
            "Server-view rows left to the client host's row in the current answer",
            gauge(j.joined_rows),
        );
        reg.register(
            "server_folded_bytes",
            "Bytes of agents' folded server-view counters, not counted, in the current answer",
            gauge(j.server_folded_bytes),
        );
        let how = [
            ("counterpart", j.by_counterpart),
            ("directory", j.by_directory),
            ("address", j.by_address),
            ("unresolved", j.unresolved),
        ]
        .iter()
        .map(|(k, v)| (vec![("by".to_owned(), (*k).to_owned())], gauge(*v)))
        .collect();
        reg.register(
            "remote_ends",
            "Remote ends of the counted rows in the current answer, by how they were tagged",
            Series(how),
        );
        let missing = w
            .hosts
            .iter()
            .map(|h| {
                (
                    vec![("host".to_owned(), h.host.clone())],
                    gauge(h.missing.iter().map(|m| m.intervals).sum::<u64>() + h.spool_dropped),
                )
            })
            .collect();
        reg.register(
            "host_missing_intervals",
            "Intervals of a host the window lacks (not published, or dropped by its spool)",
            Series(missing),
        );
        reg.register(
            "connected",
            "1 while the stream is consumed",
            gauge(u64::from(self.stream.connected)),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg)
            .expect("writing to a String cannot fail");
        out
    }

    fn health(&self) -> String {
        #[derive(Serialize)]
        struct H<'a> {
            role: &'static str,
            now_ns: u64,
            stream: &'a StreamReport,
            #[serde(flatten)]
            window: &'a WindowReport,
        }
        let mut t = serde_json::to_string(&H {
            role: "fleet",
            now_ns: self.joined.now_ns,
            stream: &self.stream,
            window: &self.window,
        })
        .expect("plain data serialises");
        t.push('\n');
        t
    }
}

fn report(w: &Window, joined: &Joined, limits: LimitsReport) -> WindowReport {
    let hosts = w
        .hosts
        .iter()
        .map(|(id, h)| {
            let mut missing = Vec::new();
            let mut prev: Option<(u64, u64, u64)> = None;
            for m in h.intervals.values() {
                if let Some((run, seq, start)) = prev {
                    if run == m.run && m.seq > seq + 1 {
                        missing.push(Missing {
                            run,
                            after_ns: start,
                            before_ns: m.start_ns,
                            intervals: m.seq - seq - 1,
                        });
                    }
                }
                prev = Some((m.run, m.seq, m.start_ns));
            }
            HostReport {
                host: id.clone(),
                network: h.network.clone(),
                addresses: h.addresses.clone(),
                intervals: h.intervals.len(),
                first_start_ns: h.intervals.values().map(|m| m.start_ns).min().unwrap_or(0),
                last_end_ns: h.intervals.values().map(|m| m.end_ns).max().unwrap_or(0),
                missing,
                spool_dropped: h.spool_dropped,
                present: w.presence.contains_key(id),
            }
        })
        .collect();
    WindowReport {
        hosts,
        stats: w.stats.clone(),
        join: joined.stats,
        intervals: w.hosts.values().map(|h| h.intervals.len()).sum(),
        rows: w.rows,
        row_bytes: w.row_bytes,
        tag_sets: w.tags.count(),
        endpoints: w.endpoints.len(),
        presence: w.presence.len(),
        limits,
    }
}

/// Runs the fleet process until SIGINT/SIGTERM.
pub fn run(c: FleetCmd) -> Result<()> {
    crate::os::alloc::for_a_daemon();
    let nats = Nats::new(&c.nats, c.auth.clone(), "--nats").map_err(|e| anyhow!(e))?;
    let listen: SocketAddr =
        agent::parse_listen(&c.listen).map_err(|e| anyhow!("--listen: {e}"))?;
    if !(c.window.is_finite() && c.window > 0.0) {
        anyhow::bail!("--window: must be a positive number of seconds");
    }
    for (v, name) in [
        (c.max_hosts, "--max-hosts"),
        (c.max_message_bytes, "--max-message-bytes"),
        (c.max_rows, "--max-rows"),
        (c.max_groups, "--max-groups"),
        (c.max_endpoints, "--max-endpoints"),
    ] {
        if v == 0 {
            anyhow::bail!("{name}: must be at least 1");
        }
    }
    if !(c.stream_max_age.is_finite() && c.stream_max_age >= 1.0) {
        anyhow::bail!("--stream-max-age: must be at least 1 second");
    }
    if c.stream_max_bytes < 1 << 20 {
        anyhow::bail!("--stream-max-bytes: must be at least 1048576");
    }
    if !wire::valid_id(&c.consumer) {
        anyhow::bail!(
            "--consumer: `{}` is not a consumer name (letters, digits, `_`, `-`)",
            c.consumer
        );
    }
    let limits = Limits {
        window_ns: (c.window * 1e9) as u64,
        max_hosts: c.max_hosts,
        max_groups: c.max_groups,
        max_endpoints: c.max_endpoints,
    };
    let limits_report = LimitsReport {
        window_s: c.window,
        max_hosts: c.max_hosts,
        max_message_bytes: c.max_message_bytes,
        max_rows: c.max_rows,
        max_groups: c.max_groups,
        max_endpoints: c.max_endpoints,
    };
    let stop = Stop::on_signals()?;
    let latest = Latest::default();
    let state = Shared {
        window: Arc::new(Mutex::new(Window::new(limits))),
        stream: Arc::new(Mutex::new(StreamReport::default())),
        latest: latest.clone(),
        limits: limits_report,
    };
    state.publish();
    let bound = agent::start(listen, latest, MetricLabels::default())?;
    eprintln!(
        "flowprobe: fleet: consuming {} at {}; serving http://{bound}/query, /metrics and /health",
        wire::STREAM,
        nats.redacted()
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the fleet's runtime")?;
    rt.block_on(consume(nats, c, state, stop));
    Ok(())
}

#[derive(Clone)]
struct Shared {
    window: Arc<Mutex<Window>>,
    stream: Arc<Mutex<StreamReport>>,
    latest: Latest,
    limits: LimitsReport,
}

impl Shared {
    /// Joins the window and hands the answer to the HTTP server.
    fn publish(&self) {
        let (joined, report) = {
            let mut w = lock(&self.window);
            let j = w.join();
            let r = report(&w, &j, self.limits.clone());
            (j, r)
        };
        let view = FleetView {
            joined,
            window: report,
            stream: lock(&self.stream).clone(),
        };
        self.latest.publish(Snapshot {
            view: Some(Arc::new(view)),
            ..Snapshot::default()
        });
    }
}

async fn consume(nats: Nats, c: FleetCmd, state: Shared, stop: Stop) {
    let mut said: Option<String> = None;
    while !stop.requested() {
        let r = session(&nats, &c, &state, &stop).await;
        {
            let mut s = lock(&state.stream);
            s.connected = false;
            if let Err(e) = &r {
                s.last_error = Some(format!("{e:#}"));
            }
        }
        state.publish();
        if let Err(e) = r {
            let e = format!("{e:#}");
            if said.as_ref() != Some(&e) {
                eprintln!("flowprobe: fleet: {e}; trying again");
                said = Some(e);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// One connection: a fresh durable consumer from the stream's start (the
/// window is rebuilt), the KV watchers, and the message loop.
async fn session(nats: &Nats, c: &FleetCmd, state: &Shared, stop: &Stop) -> Result<()> {
    let client = nats.connect("flowprobe-fleet").await?;
    let js = jetstream::new(client);
    let bounds = StreamBounds {
        max_age: Duration::from_secs_f64(c.stream_max_age),
        max_bytes: c.stream_max_bytes,
        ..StreamBounds::default()
    };
    let stream = nats::stream(&js, bounds).await?;
    // A consumer left by an earlier fleet process starts where it was;
    // this one must see the whole stream again.
    let _ = stream.delete_consumer(&c.consumer).await;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some(c.consumer.clone()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("consumer {}: {e}", c.consumer))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow!("consumer {}: {e}", c.consumer))?;
    let presence = nats::bucket(&js, wire::PRESENCE_BUCKET, bounds.ttl).await?;
    let endpoints = nats::bucket(&js, wire::ENDPOINTS_BUCKET, bounds.ttl).await?;
    let mut watch_p = presence
        .watch_with_history(">")
        .await
        .map_err(|e| anyhow!("watching presence: {e}"))?;
    // With history: the latest value of every key first, then updates.
    let mut watch_e = endpoints
        .watch_with_history(">")
        .await
        .map_err(|e| anyhow!("watching endpoints: {e}"))?;
    lock(&state.window).restart();
    {
        let mut s = lock(&state.stream);
        s.connected = true;
        s.sessions += 1;
        s.last_error = None;
    }
    let (max_bytes, max_rows) = (c.max_message_bytes, c.max_rows);
    let mut dirty = true;
    let mut next_join = Instant::now();
    let mut tick = tokio::time::interval(REBUILD);
    let mut pending = Pending::default();
    let mut joining: Option<(Instant, tokio::task::JoinHandle<()>)> = None;
    let result = loop {
        if stop.requested() {
            break Ok(());
        }
        tokio::select! {
            m = messages.next() => {
                let m = match m {
                    Some(Ok(m)) => m,
                    Some(Err(e)) => break Err(anyhow!("consuming: {e}")),
                    None => break Err(anyhow!("the consumer ended")),
                };
                pending.0.push(Input::Message(wire::check(
                    m.subject.as_str(),
                    &m.payload,
                    max_bytes,
                    max_rows,
                )));
                // While a join has the window, the next messages wait here
                // (at most MAX_PENDING), the connection's tasks go on.
                while !pending.apply(state) && pending.0.len() >= MAX_PENDING {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                dirty = true;
                if let Err(e) = m.ack().await {
                    break Err(anyhow!("acknowledging: {e}"));
                }
            }
            e = watch_p.next() => {
                let e = match e {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => break Err(anyhow!("presence: {e}")),
                    None => break Err(anyhow!("the presence watch ended")),
                };
                pending.0.push(Input::Entry(true, e));
                pending.apply(state);
                dirty = true;
            }
            e = watch_e.next() => {
                let e = match e {
                    Some(Ok(e)) => e,
                    Some(Err(e)) => break Err(anyhow!("endpoints: {e}")),
                    None => break Err(anyhow!("the endpoint watch ended")),
                };
                pending.0.push(Input::Entry(false, e));
                pending.apply(state);
                dirty = true;
            }
            _ = tick.tick() => {
                pending.apply(state);
                if let Some((t, h)) = &joining {
                    if !h.is_finished() {
                        continue;
                    }
                    // A large window takes a while to join: at most a
                    // third of the time goes to joining.
                    next_join = Instant::now() + t.elapsed() * 2;
                    joining = None;
                }
                if dirty && Instant::now() >= next_join {
                    let s = state.clone();
                    joining = Some((
                        Instant::now(),
                        tokio::task::spawn_blocking(move || s.publish()),
                    ));
                    dirty = false;
                }
            }
        }
    };
    // What waited is taken before the session ends.
    if let Some((_, h)) = joining {
        let _ = h.await;
    }
    pending.apply(state);
    result
}

/// A checked message, or a presence (`true`) or directory entry.
enum Input {
    Message(Result<wire::Message, Reject>),
    Entry(bool, kv::Entry),
}

/// What came while a join had the window, in order.
#[derive(Default)]
struct Pending(Vec<Input>);

impl Pending {
    /// Hands everything to the window unless a join has it; true when
    /// nothing waits any more.
    fn apply(&mut self, state: &Shared) -> bool {
        if self.0.is_empty() {
            return true;
        }
        let mut w = match state.window.try_lock() {
            Ok(w) => w,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
        };
        for i in self.0.drain(..) {
            match i {
                Input::Message(Ok(m)) => w.insert(m),
                Input::Message(Err(r)) => w.reject(r),
                Input::Entry(presence, e) => entry(&mut w, presence, e),
            }
        }
        true
    }
}

/// A presence or directory entry: checked, then put or removed.
fn entry(w: &mut Window, presence: bool, e: kv::Entry) {
    if e.operation != kv::Operation::Put {
        w.remove_key(presence, &e.key);
        return;
    }
    if e.value.len() > 64 << 10 {
        w.stats.kv_rejected += 1;
        return;
    }
    if presence {
        match serde_json::from_slice::<wire::Presence>(&e.value) {
            Ok(p) if p.schema == wire::SCHEMA && wire::valid_id(&p.network) => {
                w.put_presence(&e.key, p)
            }
            _ => w.stats.kv_rejected += 1,
        }
    } else {
        match serde_json::from_slice::<wire::Endpoint>(&e.value) {
            Ok(p) if p.schema == wire::SCHEMA && wire::valid_id(&p.network) => {
                w.put_endpoint(&e.key, p)
            }
            _ => w.stats.kv_rejected += 1,
        }
    }
}
