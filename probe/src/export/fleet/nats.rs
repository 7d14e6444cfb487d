//! The NATS side of the fleet: connection options (address, user and
//! password, token, credentials file, TLS), the stream and KV buckets, and
//! the sender thread that empties an agent's [`Spool`] into JetStream.
//!
//! The sender runs on its own thread with a current-thread tokio runtime,
//! like the agent's HTTP server, so that `run`'s loop only ever pushes to
//! the spool under a mutex. A message leaves the spool when JetStream has
//! acknowledged it; until then it is sent again (same `Nats-Msg-Id`, so
//! the stream keeps one copy) every [`RETRY`].

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use async_nats::jetstream::{self, kv, stream};
use async_nats::{ConnectOptions, HeaderMap};

use super::wire;

/// Between two tries of the same message, or of connecting.
const RETRY: Duration = Duration::from_millis(500);
/// How long JetStream has to acknowledge a publish.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);

/// Where NATS is and how to log in: the flags of `run --fleet` and
/// `flowprobe fleet` (and `replay --fleet`).
#[derive(clap::Args, Clone, Debug, Default)]
#[command(next_help_heading = "NATS")]
pub struct NatsFlags {
    /// User name (with --nats-password); a nats://USER:PASS@HOST:PORT
    /// address works too.
    #[arg(long, value_name = "USER")]
    pub nats_user: Option<String>,
    #[arg(long, value_name = "PASSWORD")]
    pub nats_password: Option<String>,
    /// Token authentication.
    #[arg(long, value_name = "TOKEN")]
    pub nats_token: Option<String>,
    /// A NATS credentials file (JWT and NKey seed).
    #[arg(long, value_name = "PATH")]
    pub nats_creds: Option<PathBuf>,
    /// Require TLS, trusting this CA certificate (PEM) besides the
    /// system's; a tls:// address requires TLS too.
    #[arg(long, value_name = "PATH")]
    pub nats_tls_ca: Option<PathBuf>,
}

/// A NATS server and how to log in, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nats {
    pub url: String,
    pub user: Option<(String, String)>,
    pub token: Option<String>,
    pub creds: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
}

impl Nats {
    /// `what` names the flag or field of the address, for errors.
    pub fn new(url: &str, f: NatsFlags, what: &str) -> Result<Nats, String> {
        let ok_scheme = ["nats://", "tls://"].iter().any(|s| url.starts_with(s));
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or("");
        let hostport = rest.rsplit('@').next().unwrap_or("");
        if !ok_scheme || hostport.is_empty() || !hostport.contains(':') {
            return Err(format!(
                "{what}: `{url}` is not nats://HOST:PORT (or tls://HOST:PORT)"
            ));
        }
        let mut user = match (f.nats_user, f.nats_password) {
            (Some(u), Some(p)) => Some((u, p)),
            (None, None) => None,
            _ => return Err("--nats-user and --nats-password go together".to_owned()),
        };
        // USER:PASS@ in the address: a login like the flags (the client
        // does not take it from the address itself).
        let mut plain = url.to_owned();
        if let Some((login, host)) = rest.rsplit_once('@') {
            let Some((u, p)) = login.split_once(':') else {
                return Err(format!(
                    "{what}: the login in the address is USER:PASSWORD@"
                ));
            };
            if user.is_some() {
                return Err(format!(
                    "{what}: a login in the address and --nats-user: give one"
                ));
            }
            user = Some((decode(u), decode(p)));
            let scheme = url.split_once("://").map_or("nats", |(s, _)| s);
            plain = format!("{scheme}://{host}");
        }
        let ways = usize::from(user.is_some())
            + usize::from(f.nats_token.is_some())
            + usize::from(f.nats_creds.is_some());
        if ways > 1 {
            return Err(
                "give one of --nats-user/--nats-password, --nats-token, --nats-creds".to_owned(),
            );
        }
        Ok(Nats {
            url: plain,
            user,
            token: f.nats_token,
            creds: f.nats_creds,
            tls_ca: f.nats_tls_ca,
        })
    }

    /// Connects once (no retry here: callers retry on their own terms).
    pub async fn connect(&self, name: &str) -> Result<async_nats::Client> {
        self.connect_with(name, |_| {}).await
    }

    /// [`Nats::connect`], handing every error the server sends later (a
    /// permissions violation, say) to `on_error`.
    pub async fn connect_with(
        &self,
        name: &str,
        on_error: impl Fn(String) + Send + Sync + 'static,
    ) -> Result<async_nats::Client> {
        let on_error = Arc::new(on_error);
        let mut o = ConnectOptions::new()
            .event_callback(move |e| {
                let on_error = on_error.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = e {
                        on_error(e.to_string());
                    }
                }
            })
            .name(name)
            .connection_timeout(Duration::from_secs(2))
            // Reconnects forever: an agent outlives NATS outages.
            .max_reconnects(None);
        if let Some((u, p)) = &self.user {
            o = o.user_and_password(u.clone(), p.clone());
        }
        if let Some(t) = &self.token {
            o = o.token(t.clone());
        }
        if let Some(c) = &self.creds {
            o = o
                .credentials_file(c)
                .await
                .with_context(|| format!("--nats-creds {}", c.display()))?;
        }
        if let Some(ca) = &self.tls_ca {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        o.connect(self.url.as_str())
            .await
            .map_err(|e| anyhow!("cannot connect to {}: {e}", self.redacted()))
    }

    /// The address (never with a password in it), for messages.
    pub fn redacted(&self) -> String {
        self.url.clone()
    }
}

/// Percent-decoding of a login in an address (`%40` for `@`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How long the stream keeps messages and its other bounds; the first
/// process that creates it sets them.
#[derive(Clone, Copy, Debug)]
pub struct StreamBounds {
    pub max_age: Duration,
    pub max_bytes: i64,
    pub max_msg_size: i32,
    /// Presence and directory entries expire after this.
    pub ttl: Duration,
}

impl Default for StreamBounds {
    fn default() -> StreamBounds {
        StreamBounds {
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            max_msg_size: 1 << 20,
            ttl: Duration::from_secs(60),
        }
    }
}

/// The stream, created if missing.
pub async fn stream(js: &jetstream::Context, b: StreamBounds) -> Result<stream::Stream> {
    let config = |max_bytes| stream::Config {
        name: wire::STREAM.to_owned(),
        subjects: vec![format!("{}>", wire::SUBJECT_PREFIX)],
        max_age: b.max_age,
        max_bytes,
        max_message_size: b.max_msg_size,
        storage: stream::StorageType::File,
        discard: stream::DiscardPolicy::Old,
        // Resends after an outage of up to this long are suppressed.
        duplicate_window: b.max_age.min(Duration::from_secs(600)),
        ..Default::default()
    };
    let mut max_bytes = b.max_bytes;
    loop {
        match js.get_or_create_stream(config(max_bytes)).await {
            Ok(s) => {
                if max_bytes < b.max_bytes {
                    eprintln!(
                        "flowprobe: fleet: the NATS server has no room for {} MiB: stream {} made with at most {} MiB",
                        b.max_bytes >> 20,
                        wire::STREAM,
                        max_bytes >> 20
                    );
                }
                return Ok(s);
            }
            // JetStream's storage left (error 10047): a smaller bound, down
            // to MIN_STREAM_BYTES, said on stderr.
            Err(e) if e.to_string().contains("10047") && max_bytes / 2 >= MIN_STREAM_BYTES => {
                max_bytes /= 2;
            }
            Err(e) => return Err(anyhow!("stream {}: {e}", wire::STREAM)),
        }
    }
}

/// The smallest bound of the stream's bytes tried when the server has
/// less room than asked.
const MIN_STREAM_BYTES: i64 = 16 << 20;

/// A KV bucket, created (with entries expiring after `ttl`) if missing.
pub async fn bucket(js: &jetstream::Context, name: &str, ttl: Duration) -> Result<kv::Store> {
    if let Ok(s) = js.get_key_value(name).await {
        return Ok(s);
    }
    // The stream a KV bucket is, as `create_key_value` makes it (history
    // 1): that call first reads the account info, which async-nats 0.52
    // cannot parse from a 2.9 server.
    let created = js
        .create_stream(stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: 1,
            max_age: ttl,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: 1,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await;
    match (created, js.get_key_value(name).await) {
        (_, Ok(s)) => Ok(s),
        (Err(e), Err(_)) => Err(anyhow!("KV bucket {name}: {e}")),
        (Ok(_), Err(e)) => Err(anyhow!("KV bucket {name}: {e}")),
    }
}

/// One message on its way.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub id: String,
    pub payload: Vec<u8>,
}

/// A KV put on its way (the latest value per key wins).
#[derive(Clone, Debug)]
pub struct Put {
    pub bucket: &'static str,
    pub key: String,
    pub value: Vec<u8>,
}

/// What the sender reports (the agent's /metrics and /health).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpoolStatus {
    /// Interval messages waiting.
    pub queued: usize,
    pub max: usize,
    /// Acknowledged by JetStream.
    pub sent: u64,
    /// Dropped from a full spool (the oldest first): those intervals are
    /// missing in the fleet, and the next messages say how many.
    pub dropped: u64,
    /// Publishes and KV puts that failed (then tried again).
    pub failures: u64,
    pub kv_puts: u64,
    pub connected: bool,
    pub last_error: Option<String>,
    /// What NATS refused (permissions, authorization): publishing stops
    /// being tried at the end instead of waiting it out.
    pub refused: Option<String>,
}

#[derive(Default)]
struct SpoolState {
    msgs: VecDeque<Outgoing>,
    /// The latest value waiting per (bucket, key).
    puts: std::collections::BTreeMap<(&'static str, String), Vec<u8>>,
    status: SpoolStatus,
    closing: bool,
    /// Say nothing on stderr (the caller reports).
    quiet: bool,
}

/// The bounded queue between `run`'s loop and the sender thread.
pub struct Spool {
    state: Mutex<SpoolState>,
    changed: Condvar,
}

impl Spool {
    pub fn new(max: usize) -> Arc<Spool> {
        Arc::new(Spool {
            state: Mutex::new(SpoolState {
                status: SpoolStatus {
                    max,
                    ..SpoolStatus::default()
                },
                ..SpoolState::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `m`; a full spool drops its oldest message (counted).
    pub fn push(&self, m: Outgoing) {
        let mut s = self.lock();
        while s.msgs.len() >= s.status.max.max(1) {
            s.msgs.pop_front();
            s.status.dropped += 1;
        }
        s.msgs.push_back(m);
        s.status.queued = s.msgs.len();
        self.changed.notify_all();
    }

    /// Queues KV puts: the newest per (bucket, key) replaces a waiting one,
    /// and at most `max` keys wait (more are dropped, counted as failures;
    /// the next interval puts them again).
    pub fn put(&self, puts: Vec<Put>, max: usize) {
        let mut s = self.lock();
        for p in puts {
            let k = (p.bucket, p.key);
            if s.puts.len() >= max && !s.puts.contains_key(&k) {
                s.status.failures += 1;
                continue;
            }
            s.puts.insert(k, p.value);
        }
        self.changed.notify_all();
    }

    pub fn status(&self) -> SpoolStatus {
        self.lock().status.clone()
    }

    /// The messages waiting, oldest first (tests).
    #[cfg(test)]
    pub fn waiting(&self) -> Vec<Outgoing> {
        self.lock().msgs.iter().cloned().collect()
    }

    /// From now on the caller reports refusals.
    pub fn quiet(&self) {
        self.lock().quiet = true;
    }

    /// Intervals dropped so far (what the next message says).
    pub fn dropped(&self) -> u64 {
        self.lock().status.dropped
    }

    /// Waits until every queued message was acknowledged, or `timeout`;
    /// returns how many are left. The sender stops once it is empty.
    pub fn close(&self, timeout: Duration) -> usize {
        let until = Instant::now() + timeout;
        let mut s = self.lock();
        s.closing = true;
        self.changed.notify_all();
        while !(s.msgs.is_empty() && s.puts.is_empty()) && s.status.refused.is_none() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        s.msgs.len()
    }

    fn front(&self) -> (Option<Outgoing>, Option<Put>, bool) {
        let s = self.lock();
        let put = s.puts.iter().next().map(|((bucket, key), value)| Put {
            bucket,
            key: key.clone(),
            value: value.clone(),
        });
        (s.msgs.front().cloned(), put, s.closing)
    }

    fn sent(&self, id: &str) {
        let mut s = self.lock();
        // Only if it is still the front: a full spool may have dropped it.
        if s.msgs.front().is_some_and(|m| m.id == id) {
            s.msgs.pop_front();
        }
        s.status.sent += 1;
        s.status.queued = s.msgs.len();
        self.changed.notify_all();
    }

    fn put_done(&self, p: &Put) {
        let mut s = self.lock();
        let k = (p.bucket, p.key.clone());
        // Not if a newer value came meanwhile.
        if s.puts.get(&k) == Some(&p.value) {
            s.puts.remove(&k);
        }
        s.status.kv_puts += 1;
        self.changed.notify_all();
    }

    fn failed(&self, e: String) {
        let mut s = self.lock();
        s.status.failures += 1;
        s.status.last_error = Some(e);
    }

    fn refused(&self, e: String) {
        let mut s = self.lock();
        if s.status.refused.is_none() && !s.quiet {
            eprintln!("flowprobe: fleet: NATS refused: {e}");
        }
        s.status.refused = Some(e.clone());
        s.status.last_error = Some(e);
        self.changed.notify_all();
    }

    fn connected(&self, yes: bool) {
        self.lock().status.connected = yes;
    }
}

/// Starts the sender thread: it connects (again and again until it can),
/// makes sure the stream and buckets exist, then empties the spool.
pub fn start_sender(nats: Nats, bounds: StreamBounds, spool: Arc<Spool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the fleet publisher's runtime")?;
    std::thread::Builder::new()
        .name("fleet-publish".to_owned())
        .spawn(move || rt.block_on(send(nats, bounds, spool)))
        .context("starting the fleet publisher's thread")?;
    Ok(())
}

async fn send(nats: Nats, bounds: StreamBounds, spool: Arc<Spool>) {
    let mut said = false;
    loop {
        match session(&nats, bounds, &spool).await {
            Ok(()) => return,
            Err(e) => {
                let e = format!("{e:#}");
                if !said {
                    eprintln!(
                        "flowprobe: fleet: {e}; counting goes on, intervals wait in the spool (counted in /health and /metrics)"
                    );
                    said = true;
                }
                spool.connected(false);
                spool.failed(e);
                if spool.front().2 && spool.front().0.is_none() {
                    return;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// One connection's life: returns when closing and empty, errs when the
/// set-up fails (the caller tries again).
async fn session(nats: &Nats, bounds: StreamBounds, spool: &Arc<Spool>) -> Result<()> {
    let errors = spool.clone();
    let client = nats
        .connect_with("flowprobe-agent", move |e| {
            if e.to_lowercase().contains("permission") || e.to_lowercase().contains("authorization")
            {
                errors.refused(e);
            } else {
                errors.failed(e);
            }
        })
        .await?;
    let mut js = jetstream::new(client);
    js.set_timeout(ACK_TIMEOUT);
    stream(&js, bounds).await?;
    let presence = bucket(&js, wire::PRESENCE_BUCKET, bounds.ttl).await?;
    let endpoints = bucket(&js, wire::ENDPOINTS_BUCKET, bounds.ttl).await?;
    spool.connected(true);
    loop {
        let (msg, put, closing) = spool.front();
        if msg.is_none() && put.is_none() {
            if closing {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        if let Some(m) = msg {
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", m.id.as_str());
            let acked = async {
                js.publish_with_headers(m.subject.clone(), h, m.payload.clone().into())
                    .await?
                    .await
                    .map_err(|e| anyhow!("{e}"))
            };
            match tokio::time::timeout(ACK_TIMEOUT, acked).await {
                Ok(Ok(_)) => {
                    spool.connected(true);
                    spool.sent(&m.id);
                }
                Ok(Err(e)) => {
                    spool.connected(false);
                    spool.failed(format!("publishing: {e}"));
                    tokio::time::sleep(RETRY).await;
                }
                Err(_) => {
                    spool.connected(false);
                    spool.failed("publishing: no acknowledgement in time".to_owned());
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        if let Some(p) = put {
            let store = if p.bucket == wire::PRESENCE_BUCKET {
                &presence
            } else {
                &endpoints
            };
            match tokio::time::timeout(ACK_TIMEOUT, store.put(&p.key, p.value.clone().into())).await
            {
                Ok(Ok(_)) => spool.put_done(&p),
                Ok(Err(e)) => {
                    spool.failed(format!("KV {} {}: {e}", p.bucket, p.key));
                    tokio::time::sleep(RETRY).await;
                }
                Err(_) => {
                    spool.failed(format!(
                        "KV {} {}: no acknowledgement in time",
                        p.bucket, p.key
                    ));
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }
}

/// Connects once and says why not (for `replay --fleet`, which has no
/// reason to wait for NATS).
pub fn check_reachable(nats: &Nats) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let c = nats.connect("flowprobe-replay").await?;
        c.flush()
            .await
            .map_err(|e| anyhow!("cannot connect to {}: {e}", nats.redacted()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_logins() {
        let n = Nats::new(
            "nats://u:p%40x@10.0.0.1:4222",
            NatsFlags::default(),
            "--fleet",
        )
        .unwrap();
        assert_eq!(n.redacted(), "nats://10.0.0.1:4222");
        assert_eq!(n.user, Some(("u".to_owned(), "p@x".to_owned())));
        for bad in ["10.0.0.1:4222", "nats://", "http://a:1", "nats://host"] {
            let e = Nats::new(bad, NatsFlags::default(), "--fleet").unwrap_err();
            assert!(e.starts_with("--fleet: `"), "{e}");
        }
        let e = Nats::new(
            "nats://a:1",
            NatsFlags {
                nats_user: Some("u".into()),
                ..NatsFlags::default()
            },
            "--fleet",
        )
        .unwrap_err();
        assert_eq!(e, "--nats-user and --nats-password go together");
        let e = Nats::new(
            "nats://a:1",
            NatsFlags {
                nats_token: Some("t".into()),
                nats_creds: Some("c".into()),
                ..NatsFlags::default()
            },
            "--fleet",
        )
        .unwrap_err();
        assert!(e.starts_with("give one of"), "{e}");
    }

    #[test]
    fn a_full_spool_drops_the_oldest_and_counts() {
        let s = Spool::new(2);
        for i in 0..3 {
            s.push(Outgoing {
                subject: "s".into(),
                id: i.to_string(),
                payload: vec![],
            });
        }
        let st = s.status();
        assert_eq!((st.queued, st.dropped), (2, 1));
        assert_eq!(s.front().0.unwrap().id, "1");
        s.sent("1");
        assert_eq!(s.front().0.unwrap().id, "2");
    }
}
