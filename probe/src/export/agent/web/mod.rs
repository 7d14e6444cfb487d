//! The agent's web page: `GET /` (the flows table, or the map), its two
//! assets, `GET /map.svg` and `GET /query.csv`.
//!
//! The page is rendered here, in Rust, from the same [`QueryResult`] that
//! `/query` serialises: it works without JavaScript (the form is a GET to
//! `/`, so the URL is the permalink; sorting and drill-down are links), and
//! `app.js` only adds auto-refresh with a pause and a side panel for a
//! row's connections. Nothing is loaded from anywhere but the agent
//! (`Content-Security-Policy: default-src 'self'`, no inline script or
//! style). Every tag value is escaped ([`escape`]).

mod human;
mod map;
mod page;

use flowtable::query::{QueryResult, Row, TagKey};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use serde_json::Value;

use super::http::{decode, run_query};
use super::Latest;
use crate::export::{csv as csv_file, escape};

const APP_JS: &str = include_str!("app.js");
const APP_CSS: &str = include_str!("app.css");
/// No script, style, image or connection from anywhere but the agent, and
/// no inline script or style at all.
const CSP: &str = "default-src 'self'";

/// The page's routes; `None` for the others.
pub(super) fn route(path: &str, raw: &str, shared: &Latest) -> Option<Response<Full<Bytes>>> {
    Some(match path {
        "/" => page(raw, shared),
        "/app.js" => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/app.css" => respond(StatusCode::OK, "text/css; charset=utf-8", APP_CSS),
        "/map.svg" => map_svg(raw, shared),
        "/query.csv" => query_csv(raw, shared),
        _ => return None,
    })
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header(CACHE_CONTROL, "no-store")
        .body(Full::new(body.into()))
        .expect("static headers are valid")
}

fn bad_request(msg: String) -> Response<Full<Bytes>> {
    respond(
        StatusCode::BAD_REQUEST,
        "text/plain; charset=utf-8",
        msg + "\n",
    )
}

fn page(raw: &str, shared: &Latest) -> Response<Full<Bytes>> {
    let p = match Params::parse(raw) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let result = run_query(&p.query_string(&[]), shared).map(|(_, r)| r);
    let status = if result.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let html = page::render(&p, result.as_ref().map_err(String::as_str));
    respond(status, "text/html; charset=utf-8", html)
}

fn map_svg(raw: &str, shared: &Latest) -> Response<Full<Bytes>> {
    let p = match Params::parse(raw) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    match run_query(&p.query_string(MAP_IGNORES), shared) {
        Ok((_, r)) => respond(StatusCode::OK, "image/svg+xml", map::svg(&r, &p)),
        Err(e) => bad_request(e),
    }
}

fn query_csv(raw: &str, shared: &Latest) -> Response<Full<Bytes>> {
    let p = match Params::parse(raw) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    match run_query(&p.query_string(&[]), shared) {
        Ok((_, r)) => {
            let mut resp = respond(StatusCode::OK, "text/csv; charset=utf-8", csv(&r));
            resp.headers_mut().insert(
                CONTENT_DISPOSITION,
                hyper::header::HeaderValue::from_static(
                    "attachment; filename=\"flowprobe-rows.csv\"",
                ),
            );
            resp
        }
        Err(e) => bad_request(e),
    }
}

/// The map draws every pair: the table's sort and top-N do not apply.
const MAP_IGNORES: &[&str] = &["sort", "top"];

/// `/query` parameters a form sends empty when its input is: left out.
const DROPPED_WHEN_EMPTY: &[&str] = &["where", "window", "last", "sort", "top", "raw_ports"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    Table,
    Map,
}

/// What colours the map's edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Color {
    /// Retransmitted segments per segment, both directions.
    Retransmits,
    /// The `dst` leg's RTT p99.
    RttP99,
}

/// A page URL's parameters.
#[derive(Clone, Debug)]
pub struct Params {
    /// Passed to the query engine as `/query` would get them, in order.
    pub query: Vec<(String, String)>,
    pub view: View,
    pub color: Color,
    /// The map's node limit; beyond it the smallest fold into `(other)`.
    pub nodes: usize,
    /// The map shows only the edges of this node (its label).
    pub focus: Option<String>,
    /// Seconds between refreshes of the page's data; 0 = none.
    pub refresh: u32,
}

impl Params {
    pub fn parse(raw: &str) -> Result<Params, String> {
        let mut p = Params {
            query: Vec::new(),
            view: View::Table,
            color: Color::Retransmits,
            nodes: map::DEFAULT_NODES,
            focus: None,
            refresh: 5,
        };
        for pair in raw.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (decode(k)?, decode(v)?);
            match k.as_str() {
                "view" => {
                    p.view = match v.as_str() {
                        "" | "table" => View::Table,
                        "map" => View::Map,
                        _ => return Err(format!("view: `{v}` is not table or map")),
                    }
                }
                "color" => {
                    p.color = match v.as_str() {
                        "" | "retransmits" => Color::Retransmits,
                        "rtt" => Color::RttP99,
                        _ => return Err(format!("color: `{v}` is not retransmits or rtt")),
                    }
                }
                "nodes" => {
                    p.nodes = match v.parse() {
                        Ok(n) if (2..=200).contains(&n) => n,
                        _ => return Err(format!("nodes: `{v}` is not a number from 2 to 200")),
                    }
                }
                "focus" => p.focus = Some(v).filter(|v| !v.is_empty()),
                "refresh" => {
                    p.refresh = v
                        .parse()
                        .map_err(|_| format!("refresh: `{v}` is not a number of seconds"))?
                }
                // The page shows rows; the downloads ask for their formats.
                "format" => {}
                _ if v.is_empty() && DROPPED_WHEN_EMPTY.contains(&k.as_str()) => {}
                _ => p.query.push((k, v)),
            }
        }
        Ok(p)
    }

    /// The query parameters, encoded, without the keys in `drop`.
    pub fn query_string(&self, drop: &[&str]) -> String {
        join(
            self.query
                .iter()
                .filter(|(k, _)| !drop.contains(&k.as_str()))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
    }

    /// The query's value of `key` (the first), if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// This page's URL with the page parameters that differ from the
    /// defaults, `query` replacing the query's.
    pub fn url_with(&self, query: &[(String, String)], view: View, focus: Option<&str>) -> String {
        let mut pairs: Vec<(&str, &str)> = query
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if view == View::Map {
            pairs.push(("view", "map"));
        }
        if self.color == Color::RttP99 {
            pairs.push(("color", "rtt"));
        }
        let nodes = self.nodes.to_string();
        if self.nodes != map::DEFAULT_NODES {
            pairs.push(("nodes", &nodes));
        }
        if let Some(f) = focus {
            pairs.push(("focus", f));
        }
        let refresh = self.refresh.to_string();
        if self.refresh != 5 {
            pairs.push(("refresh", &refresh));
        }
        format!("/?{}", join(pairs.into_iter()))
    }

    /// The query with `key` set to `value` (replacing every earlier one).
    pub fn query_with(&self, key: &str, value: &str) -> Vec<(String, String)> {
        let mut q: Vec<_> = self
            .query
            .iter()
            .filter(|(k, _)| k != key)
            .cloned()
            .collect();
        q.push((key.to_owned(), value.to_owned()));
        q
    }

    /// The query narrowed to one row's connections: grouped by address and
    /// port at both ends, with the row's values as filters.
    pub fn drill(&self, r: &QueryResult, row: &Row) -> Option<Vec<(String, String)>> {
        if row.other {
            return None;
        }
        let mut q: Vec<(String, String)> = self
            .query
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "src" | "dst" | "sort" | "top" | "raw_ports"))
            .cloned()
            .collect();
        let clauses: Vec<String> = [
            ("src", &r.src_keys, &row.src),
            ("dst", &r.dst_keys, &row.dst),
        ]
        .into_iter()
        .flat_map(|(side, keys, vals)| {
            keys.iter()
                .zip(vals)
                .filter_map(move |(k, v)| clause(side, k, v.as_deref()))
        })
        .collect();
        if !clauses.is_empty() {
            q.push(("where".to_owned(), clauses.join(" and ")));
        }
        q.push(("src".to_owned(), "ip,port".to_owned()));
        q.push(("dst".to_owned(), "ip,port".to_owned()));
        q.push(("raw_ports".to_owned(), "1".to_owned()));
        Some(q)
    }
}

/// A `--where` clause that selects an end with tag `k` = `v`; none for a
/// value no clause can express (the collapsed `ephemeral` port).
fn clause(side: &str, k: &TagKey, v: Option<&str>) -> Option<String> {
    let v = v.unwrap_or("");
    Some(match k {
        TagKey::Port if v == flowtable::query::EPHEMERAL => return None,
        TagKey::IpPrefix(_) if !v.is_empty() => format!("{side}.ip in {}", escape::filter_value(v)),
        TagKey::IpPrefix(_) => format!("{side}.ip = \"\""),
        TagKey::Proto | TagKey::Iface => format!("{k} = {}", escape::filter_value(v)),
        _ => format!("{side}.{k} = {}", escape::filter_value(v)),
    })
}

fn join<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encoding of a URL query component as the page writes it: as
/// [`super::http::encode`] (whose `decode` reads it), but a space is `+`
/// and `,:/=()*` stay: shorter links in every row.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~,:/=()*".contains(&b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A row's cells, as `/query` serialises them.
pub struct RowView<'a> {
    pub row: &'a Row,
    pub json: Value,
}

impl<'a> RowView<'a> {
    pub fn of(r: &'a QueryResult) -> Vec<RowView<'a>> {
        r.rows
            .iter()
            .map(|row| RowView {
                row,
                json: serde_json::to_value(row.json(r)).expect("a row serialises"),
            })
            .collect()
    }

    /// `json[a][b]`, or `json[a]` when `b` is empty.
    pub fn field(&self, a: &str, b: &str) -> &Value {
        let v = &self.json[a];
        if b.is_empty() {
            v
        } else {
            &v[b]
        }
    }
}

/// The row's `retransmit_pct` (retransmitted bytes over bytes), as
/// `/query` gives it.
pub fn retransmit_percent(row: &Row) -> Option<f64> {
    row.retransmit_pct()
}

/// The rows as CSV ([`csv::rows`]), as `/query` would give them.
pub fn csv(r: &QueryResult) -> String {
    let rows: Vec<Value> = RowView::of(r).into_iter().map(|v| v.json).collect();
    csv_file::rows(&r.src_keys, &r.dst_keys, &rows)
}

#[cfg(test)]
mod tests;
