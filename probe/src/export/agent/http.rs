//! The agent's HTTP/1 routes.

use std::convert::Infallible;
use std::net::TcpListener;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flowtable::query::{origin, QueryArgs, QueryResult, QuerySpec};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

use super::health;
use super::metrics::{self, MetricLabels};
use super::web;
use super::Latest;
use crate::export::history::lock;
use crate::export::print::{self as output, Format};

/// The server's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Clients served at once; one more is answered `503` and closed.
    pub clients: usize,
    /// A client has this long to send a request's head.
    pub head_timeout: Duration,
    /// A connection's whole life (keep-alive included).
    pub conn_timeout: Duration,
    /// Bytes of a request's head (request line and headers) at most; at
    /// least 8192 (hyper's minimum).
    pub head_bytes: usize,
}

pub const LIMITS: Limits = Limits {
    clients: 128,
    head_timeout: Duration::from_secs(10),
    conn_timeout: Duration::from_secs(60),
    head_bytes: 16 * 1024,
};

/// What the server refused or cut short, for `/metrics`.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections open now.
    pub clients: AtomicU64,
    /// Connections answered `503` because `Limits::clients` were open.
    pub refused: AtomicU64,
    /// Connections closed for a timeout (of the head or the connection).
    pub timed_out: AtomicU64,
    /// Connections closed on a malformed or oversized request.
    pub malformed: AtomicU64,
}

pub async fn serve(
    listener: TcpListener,
    shared: Latest,
    labels: MetricLabels,
    stats: Arc<ServerStats>,
    limits: Limits,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener).context("listening")?;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.clients));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            // Out of descriptors and the like: this client is lost, the
            // next may not be; wait a little rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Relaxed);
            // Best effort, never waiting: a full socket buffer drops it.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let (shared, labels, stats) = (shared.clone(), labels.clone(), stats.clone());
        stats.clients.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            let st = stats.clone();
            let svc = service_fn(move |req| {
                let resp = route(&req, &shared, &labels, &st);
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(limits.head_bytes)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(limits.conn_timeout, conn).await {
                Err(_) => {
                    stats.timed_out.fetch_add(1, Relaxed);
                }
                Ok(Err(e)) if e.is_timeout() => {
                    stats.timed_out.fetch_add(1, Relaxed);
                }
                Ok(Err(e)) if e.is_parse() || e.is_parse_too_large() => {
                    stats.malformed.fetch_add(1, Relaxed);
                }
                // A client that hangs up mid-request is its own problem.
                Ok(_) => {}
            }
            stats.clients.fetch_sub(1, Relaxed);
            drop(permit);
        });
    }
}

const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 32\r\nconnection: close\r\n\r\ntoo many clients, try again soon\n";

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response<Full<Bytes>> {
    let mut msg = msg.into();
    msg.push('\n');
    text(status, "text/plain; charset=utf-8", msg)
}

fn route(
    req: &Request<Incoming>,
    shared: &Latest,
    labels: &MetricLabels,
    stats: &ServerStats,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(StatusCode::METHOD_NOT_ALLOWED, "only GET");
    }
    let snap = shared.get();
    if let Some(view) = &snap.view {
        return match req.uri().path() {
            "/metrics" => text(StatusCode::OK, metrics::CONTENT_TYPE, view.metrics()),
            "/health" => text(StatusCode::OK, "application/json", view.health()),
            "/query" => match query(req.uri().query().unwrap_or(""), shared) {
                Ok((format, body)) => text(StatusCode::OK, content_type(format), body),
                Err(msg) => error(StatusCode::BAD_REQUEST, msg),
            },
            "/" => text(
                StatusCode::OK,
                "text/plain; charset=utf-8",
                "flowprobe fleet: /metrics, /query, /health\n",
            ),
            p => error(
                StatusCode::NOT_FOUND,
                format!("no {p} here: /metrics, /query, /health (the fleet lists no connections: use /query)"),
            ),
        };
    }
    // The page (`/`), its assets, `/map.svg` and `/query.csv`.
    if let Some(resp) = web::route(req.uri().path(), req.uri().query().unwrap_or(""), shared) {
        return resp;
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics::encode_served(&shared.get(), labels, stats),
        ),
        "/query" => match query(req.uri().query().unwrap_or(""), shared) {
            Ok((format, body)) => text(StatusCode::OK, content_type(format), body),
            Err(msg) => error(StatusCode::BAD_REQUEST, msg),
        },
        "/health" => text(
            StatusCode::OK,
            "application/json",
            health::encode(&shared.get()),
        ),
        "/connections" => match page(req.uri().query().unwrap_or("")) {
            Ok((offset, limit)) => {
                let snap = shared.get();
                let total = snap.conns.len();
                let from = offset.min(total);
                let to = from.saturating_add(limit).min(total);
                let mut body = Vec::new();
                match output::write(&mut body, Format::Json, &snap.conns[from..to]) {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, "application/x-ndjson", body);
                        let h = hyper::header::HeaderValue::from(total);
                        r.headers_mut().insert("x-total-count", h);
                        r
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                }
            }
            Err(msg) => error(StatusCode::BAD_REQUEST, msg),
        },
        p => error(
            StatusCode::NOT_FOUND,
            format!("no {p} here: /, /metrics, /query, /connections, /health"),
        ),
    }
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => "application/x-ndjson",
        Format::Table => "text/plain; charset=utf-8",
    }
}

/// `/query?src=..&dst=..&where=..&sort=..&top=..&window=..&last=..&raw_ports=1&format=json|table`:
/// the flags of `flowprobe replay`, one parameter each (`where` repeated).
fn query(raw: &str, shared: &Latest) -> Result<(Format, Vec<u8>), String> {
    let (format, result) = run_query(raw, shared)?;
    let mut body = Vec::new();
    output::write_query(&mut body, format, &result).map_err(|e| e.to_string())?;
    Ok((format, body))
}

/// The parameters of `/query` parsed and run over the latest snapshot: what
/// `/query` answers and the page shows.
pub(super) fn run_query(raw: &str, shared: &Latest) -> Result<(Format, QueryResult), String> {
    let mut a = QueryArgs::default();
    let mut format = Format::Json;
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        match k.as_str() {
            "src" => a.src = Some(v),
            "dst" => a.dst = Some(v),
            "where" => a.wheres.push(v),
            "sort" => a.sort = Some(v),
            "top" => {
                a.top = Some(
                    v.parse()
                        .map_err(|_| format!("top: `{v}` is not a number"))?,
                )
            }
            "window" => a.window = Some(v),
            "last" => a.last = Some(v),
            "raw_ports" => a.raw_ports = matches!(v.as_str(), "" | "1" | "true"),
            "format" => {
                format = match v.as_str() {
                    "json" => Format::Json,
                    "table" => Format::Table,
                    _ => return Err(format!("format: `{v}` is not json or table")),
                }
            }
            _ => {
                return Err(format!(
                "unknown parameter `{k}` (src, dst, where, sort, top, window, last, raw_ports, format)"
            ))
            }
        }
    }
    let spec = QuerySpec::parse(&a).map_err(|e| e.to_string())?;
    let snap = shared.get();
    let result = match (spec.last, &snap.rollups) {
        _ if snap.view.is_some() => snap.view.as_ref().expect("checked").query(&spec)?,
        (None, _) => spec.run(&snap.conns, origin(&snap.conns)),
        (Some(last), Some(r)) => lock(r).query(&spec, last),
        (Some(_), None) => {
            return Err("last: no rollups yet (the agent has not read its source)".to_owned())
        }
    };
    Ok((format, result))
}

/// `/connections?offset=N&limit=M`: a page of the listing, in its order
/// (first seen first); `X-Total-Count` gives its length. Default: all.
fn page(raw: &str) -> Result<(usize, usize), String> {
    let (mut offset, mut limit) = (0, usize::MAX);
    for pair in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n = || {
            v.parse::<usize>()
                .map_err(|_| format!("{k}: `{v}` is not a number"))
        };
        match k {
            "offset" => offset = n()?,
            "limit" => limit = n()?,
            _ => return Err(format!("unknown parameter `{k}` (offset, limit)")),
        }
    }
    Ok((offset, limit))
}

/// Percent-decoding of a query component (`+` is a space, as browsers and
/// curl's --data-urlencode send it).
pub(super) fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in `{s}`"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("`{s}` is not UTF-8"))
}

/// The inverse of [`decode`], for the client.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_round_trip() {
        for s in [
            "dst.port=5432",
            "src.ip in 10.0.0.0/8 and dst.port in (80, 443)",
            "é&+%",
        ] {
            assert_eq!(decode(&encode(s)).unwrap(), s);
        }
        assert_eq!(decode("a+b%2Cc").unwrap(), "a b,c");
        assert!(decode("%zz").is_err());
    }
}
