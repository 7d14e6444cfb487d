//! The page's HTML: the form, the tabs, and the table or the map. Every
//! value goes through [`html`]; numbers are the row's JSON values (in
//! `data-v`, exact) formatted for people (the cell's text).

use std::fmt::Write;

use flowtable::query::{Metric, QueryResult, Sort};

use super::{human, retransmit_percent, Params, RowView, View, MAP_IGNORES};
use crate::export::escape::html;

/// The table's metric columns: header, sort metric, what the cell shows.
enum Cell {
    Conns,
    Bytes(&'static str),
    Rate,
    Retransmits,
    RetransmitPercent,
    Rtt(&'static str),
}

const COLUMNS: &[(&str, Option<Metric>, Cell)] = &[
    ("conns", Some(Metric::Conns), Cell::Conns),
    ("sent", Some(Metric::SentBytes), Cell::Bytes("sent")),
    (
        "received",
        Some(Metric::ReceivedBytes),
        Cell::Bytes("received"),
    ),
    ("throughput", Some(Metric::Bandwidth), Cell::Rate),
    ("retransmits", Some(Metric::Retransmits), Cell::Retransmits),
    ("retrans %", None, Cell::RetransmitPercent),
    ("RTT p50", Some(Metric::RttP50), Cell::Rtt("p50_us")),
    ("RTT p99", Some(Metric::RttP99), Cell::Rtt("p99_us")),
];

/// The time range input: the `/query` parameter it sets (`last`: back
/// from now, over the agent's rollups), and its hint.
const RANGE: (&str, &str) = ("last", "e.g. 5m (empty: since start)");

/// The whole page for `p`, with the query's result or its error.
pub fn render(p: &Params, result: Result<&QueryResult, &str>) -> String {
    let mut o = String::with_capacity(64 * 1024);
    o.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width\">",
        "<title>flowprobe</title><link rel=\"stylesheet\" href=\"/app.css\">",
        "<script src=\"/app.js\" defer></script></head>\n"
    ));
    let _ = writeln!(o, "<body data-refresh=\"{}\">", p.refresh);
    form(&mut o, p);
    nav(&mut o, p);
    o.push_str("<main id=\"data\">\n");
    match result {
        Err(e) => {
            let _ = writeln!(o, "<p class=\"error\" id=\"error\">{}</p>", html(e));
        }
        Ok(r) if p.view == View::Map => {
            let src = format!("/map.svg?{}", map_query(p));
            let _ = writeln!(
                o,
                "<object id=\"map\" type=\"image/svg+xml\" data=\"{0}\"><a href=\"{0}\">the map</a></object>",
                html(&src)
            );
            summary(&mut o, r);
        }
        Ok(r) => {
            summary(&mut o, r);
            table(&mut o, p, r);
        }
    }
    o.push_str("</main>\n<aside id=\"panel\" hidden><button id=\"close\" type=\"button\">close</button><div id=\"panel-body\"></div></aside>\n</body></html>\n");
    o
}

/// The map's parameters: the query's (without sort and top) and the
/// map's own.
fn map_query(p: &Params) -> String {
    let mut q = p.query_string(MAP_IGNORES);
    let mut add = |k: &str, v: &str| {
        if !q.is_empty() {
            q.push('&');
        }
        q.push_str(&format!("{k}={}", super::encode(v)));
    };
    if p.color == super::Color::RttP99 {
        add("color", "rtt");
    }
    if p.nodes != super::map::DEFAULT_NODES {
        add("nodes", &p.nodes.to_string());
    }
    if let Some(f) = &p.focus {
        add("focus", f);
    }
    q
}

fn form(o: &mut String, p: &Params) {
    let wheres: Vec<&str> = p
        .query
        .iter()
        .filter(|(k, _)| k == "where")
        .map(|(_, v)| v.as_str())
        .collect();
    let (src, dst) = match (p.get("src"), p.get("dst")) {
        (None, None) => ("service", "service"),
        (s, d) => (s.unwrap_or(""), d.unwrap_or("")),
    };
    o.push_str("<header><h1><a href=\"/\">flowprobe</a></h1>\n<form id=\"query\" method=\"get\" action=\"/\">\n");
    let input = |o: &mut String, label: &str, name: &str, value: &str, hint: &str| {
        let _ = writeln!(
            o,
            "<label>{label} <input name=\"{name}\" id=\"in-{name}\" value=\"{}\" placeholder=\"{}\"></label>",
            html(value),
            html(hint)
        );
    };
    input(
        o,
        "search for",
        "where",
        &wheres.join(" and "),
        "dst.port = 443 and src.service ~ \"web*\"",
    );
    input(o, "view clients as", "src", src, "service");
    input(o, "view servers as", "dst", dst, "service");
    // The time range: one value passed through to /query as it is.
    input(
        o,
        "time range",
        RANGE.0,
        p.get(RANGE.0).unwrap_or(""),
        RANGE.1,
    );
    for key in ["sort", "top", "raw_ports", "window"] {
        if let Some(v) = p.get(key) {
            let _ = writeln!(
                o,
                "<input type=\"hidden\" name=\"{key}\" value=\"{}\">",
                html(v)
            );
        }
    }
    if p.view == View::Map {
        o.push_str("<input type=\"hidden\" name=\"view\" value=\"map\">\n");
    }
    o.push_str("<button type=\"submit\">show</button>\n</form></header>\n");
}

fn nav(o: &mut String, p: &Params) {
    let tab = |o: &mut String, view: View, name: &str| {
        let class = if p.view == view {
            " class=\"active\""
        } else {
            ""
        };
        let _ = write!(
            o,
            "<a id=\"tab-{name}\"{class} href=\"{}\">{name}</a> ",
            html(&p.url_with(&p.query, view, p.focus.as_deref()))
        );
    };
    o.push_str("<nav>");
    tab(o, View::Table, "table");
    tab(o, View::Map, "map");
    let q = p.query_string(&[]);
    let sep = if q.is_empty() { "" } else { "&" };
    let _ = write!(
        o,
        "<span class=\"downloads\">download <a id=\"dl-json\" download=\"flowprobe-rows.json\" href=\"{}\">JSON</a> \
         <a id=\"dl-csv\" download=\"flowprobe-rows.csv\" href=\"{}\">CSV</a></span> ",
        html(&format!("/query?{q}{sep}format=json")),
        html(&format!("/query.csv?{q}"))
    );
    o.push_str("<button id=\"pause\" type=\"button\" hidden>pause</button> <span id=\"status\"></span></nav>\n");
}

fn summary(o: &mut String, r: &QueryResult) {
    let conns: u64 = r.rows.iter().map(|r| r.conns).sum();
    let _ = writeln!(
        o,
        "<p class=\"summary\" id=\"summary\">{} rows, {} connections</p>",
        r.rows.len(),
        conns
    );
}

fn table(o: &mut String, p: &Params, r: &QueryResult) {
    let sort: Sort = p
        .get("sort")
        .and_then(|s| s.parse().ok())
        .unwrap_or_default();
    o.push_str("<table id=\"rows\"><thead><tr>");
    for k in &r.src_keys {
        let _ = write!(o, "<th class=\"tag\">client {}</th>", html(&k.to_string()));
    }
    for k in &r.dst_keys {
        let _ = write!(o, "<th class=\"tag\">server {}</th>", html(&k.to_string()));
    }
    for (name, metric, _) in COLUMNS {
        match metric {
            Some(m) => {
                let (arrow, next) = if *m == sort.metric {
                    if sort.descending {
                        (" ▼", format!("{m}:asc"))
                    } else {
                        (" ▲", format!("{m}:desc"))
                    }
                } else {
                    ("", format!("{m}:desc"))
                };
                let url = p.url_with(&p.query_with("sort", &next), View::Table, None);
                let _ = write!(
                    o,
                    "<th class=\"num\"><a data-sort=\"{m}\" href=\"{}\">{name}{arrow}</a></th>",
                    html(&url)
                );
            }
            None => {
                let _ = write!(o, "<th class=\"num\">{name}</th>");
            }
        }
    }
    o.push_str("<th></th></tr></thead>\n<tbody>\n");
    for v in RowView::of(r) {
        row(o, p, r, &v);
    }
    o.push_str("</tbody></table>\n");
}

fn row(o: &mut String, p: &Params, r: &QueryResult, v: &RowView) {
    let drill = p.drill(r, v.row).map(|q| p.url_with(&q, View::Table, None));
    o.push_str(if drill.is_some() {
        "<tr class=\"drill\">"
    } else {
        "<tr class=\"other\">"
    });
    for (side, keys, vals) in [
        ("src", &r.src_keys, &v.row.src),
        ("dst", &r.dst_keys, &v.row.dst),
    ] {
        for (k, val) in keys.iter().zip(vals) {
            let key = html(&format!("{side}.{k}"));
            match val {
                // A long value is cut by the style sheet: whole on hover.
                Some(s) if s.chars().count() > 40 => {
                    let s = html(s);
                    let _ = write!(o, "<td data-k=\"{key}\" title=\"{s}\">{s}</td>");
                }
                Some(s) => {
                    let _ = write!(o, "<td data-k=\"{key}\">{}</td>", html(s));
                }
                None if v.row.other => {
                    let _ = write!(o, "<td data-k=\"{key}\" class=\"unknown\">(other)</td>");
                }
                None => {
                    let _ = write!(o, "<td data-k=\"{key}\" class=\"unknown\">(unknown)</td>");
                }
            }
        }
    }
    for (name, _, cell) in COLUMNS {
        let (exact, text) = match cell {
            Cell::Conns => {
                let n = v.field("conns", "");
                (n.to_string(), n.to_string())
            }
            Cell::Bytes(dir) => {
                let n = v.field(dir, "bytes");
                (n.to_string(), human::bytes(n.as_f64().unwrap_or(0.0)))
            }
            Cell::Rate => {
                let n = v.field("bandwidth_bytes_per_s", "");
                (n.to_string(), human::rate(n.as_f64()))
            }
            Cell::Retransmits => {
                let n = v.row.metric(Metric::Retransmits).unwrap_or(0.0) as u64;
                (n.to_string(), n.to_string())
            }
            Cell::RetransmitPercent => {
                let pct = retransmit_percent(v.row);
                (
                    pct.map_or_else(|| "null".to_owned(), |x| x.to_string()),
                    human::percent(pct),
                )
            }
            Cell::Rtt(field) => {
                let n = v.field("rtt_dst", field);
                (n.to_string(), human::micros(n.as_u64()))
            }
        };
        let _ = write!(
            o,
            "<td data-c=\"{}\" data-v=\"{}\">{}</td>",
            html(name),
            html(&exact),
            html(&text)
        );
    }
    match drill {
        Some(url) => {
            let _ = write!(
                o,
                "<td><a class=\"drill\" href=\"{}\">connections</a></td>",
                html(&url)
            );
        }
        None => o.push_str("<td></td>"),
    }
    o.push_str("</tr>\n");
}
