//! `/map.svg`: the query's pairs as a graph, laid out here and written as
//! SVG. Nodes are the values of the query's keys (with the same keys on
//! both sides, a client and a server with the same values are one node);
//! edges are the rows.
//!
//! - Beyond `nodes` nodes, the smallest (by bytes of their rows) fold into
//!   one `(other)` node; the edges they had are merged with the engine's
//!   own `Row::merge`, so a folded edge's numbers are those `/query` would
//!   give for the union of its rows.
//! - Layout: nodes on a circle, largest first at the top and then
//!   clockwise, ties by label: the same rows give the same bytes (no
//!   randomness, no hash order, coordinates rounded to 0.1).
//! - Edge width: throughput on a log scale, `1 + 2·log10(1 + B/s ÷ 1000)`
//!   px, at most 14. Colour: retransmitted segments per segment
//!   (`retransmits ÷ packets`, both directions) below 1 % green, below 5 %
//!   amber, else red; or (`color=rtt`) the `dst` leg's RTT p99 below 10 ms,
//!   below 100 ms, else red; grey without packets or samples. Dashed: an
//!   end whose values are all unknown.

use std::collections::BTreeMap;
use std::f64::consts::PI;
use std::fmt::Write;

use flowtable::query::{Metric, QueryResult, Row};

use super::{human, retransmit_percent, Color, Params, View};
use crate::export::escape::xml;

pub const DEFAULT_NODES: usize = 16;

/// Retransmit % thresholds (amber from, red from).
pub const RETRANSMIT_PCT: (f64, f64) = (1.0, 5.0);
/// RTT p99 thresholds in µs (amber from, red from).
pub const RTT_P99_US: (u64, u64) = (10_000, 100_000);

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 760.0;
const CX: f64 = 500.0;
const CY: f64 = 350.0;
const RADIUS: f64 = 270.0;
const NODE_R: f64 = 9.0;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Bad,
    None,
}

impl Level {
    const ALL: [Level; 4] = [Level::Ok, Level::Warn, Level::Bad, Level::None];

    fn name(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "warn",
            Level::Bad => "bad",
            Level::None => "none",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Level::Ok => "#2b8a3e",
            Level::Warn => "#e8a100",
            Level::Bad => "#d62828",
            Level::None => "#868e96",
        }
    }

    fn of(row: &Row, color: Color) -> Level {
        match color {
            Color::Retransmits => match retransmit_percent(row) {
                None => Level::None,
                Some(p) if p < RETRANSMIT_PCT.0 => Level::Ok,
                Some(p) if p < RETRANSMIT_PCT.1 => Level::Warn,
                Some(_) => Level::Bad,
            },
            Color::RttP99 => match row.rtt_dst().p99 {
                None => Level::None,
                Some(us) if us < RTT_P99_US.0 => Level::Ok,
                Some(us) if us < RTT_P99_US.1 => Level::Warn,
                Some(_) => Level::Bad,
            },
        }
    }
}

struct Node {
    label: String,
    unknown: bool,
    bytes: u64,
    clients: usize,
    servers: usize,
    folded: usize,
}

struct Edge<'a> {
    row: Row,
    /// The row itself when the edge is exactly one row.
    single: Option<&'a Row>,
}

/// One end's node label: its values joined; `(unknown)` when it has keys
/// and none of them a value.
fn label(vals: &[Option<String>], other: bool) -> (String, bool) {
    if other {
        return ("(other)".to_owned(), false);
    }
    if vals.is_empty() {
        return ("(all)".to_owned(), false);
    }
    if vals.iter().all(Option::is_none) {
        return ("(unknown)".to_owned(), true);
    }
    let s: Vec<&str> = vals.iter().map(|v| v.as_deref().unwrap_or("?")).collect();
    (s.join(" · "), false)
}

/// The SVG of `r` drawn as `p` asks.
pub fn svg(r: &QueryResult, p: &Params) -> String {
    let shared = r.src_keys == r.dst_keys;
    // (side, label) → node; side 0 for both when the keys are the same.
    let mut index: BTreeMap<(u8, String), usize> = BTreeMap::new();
    let mut nodes: Vec<Node> = Vec::new();
    let mut ends: Vec<(usize, usize, &Row)> = Vec::new();
    for row in &r.rows {
        let mut end = |side: u8, vals: &[Option<String>]| {
            let (l, unknown) = label(vals, row.other);
            let key = (if shared { 0 } else { side }, l.clone());
            let i = *index.entry(key).or_insert_with(|| {
                nodes.push(Node {
                    label: l,
                    unknown,
                    bytes: 0,
                    clients: 0,
                    servers: 0,
                    folded: 1,
                });
                nodes.len() - 1
            });
            i
        };
        let a = end(1, &row.src);
        let b = end(2, &row.dst);
        ends.push((a, b, row));
    }
    if let Some(f) = &p.focus {
        ends.retain(|(a, b, _)| &nodes[*a].label == f || &nodes[*b].label == f);
    }
    // Only nodes with an edge left count (and are drawn).
    for (a, b, row) in &ends {
        for (i, client) in [(*a, true), (*b, false)] {
            let n = &mut nodes[i];
            n.bytes = n.bytes.saturating_add(row.bytes());
            if client {
                n.clients += 1;
            } else {
                n.servers += 1;
            }
        }
    }
    let mut order: Vec<usize> = (0..nodes.len())
        .filter(|&i| nodes[i].clients + nodes[i].servers > 0)
        .collect();

    // Rank: bytes descending, then label; keep the first `p.nodes - 1`
    // when there are more than `p.nodes`.
    order.sort_by(|&a, &b| {
        nodes[b]
            .bytes
            .cmp(&nodes[a].bytes)
            .then_with(|| nodes[a].label.cmp(&nodes[b].label))
            .then_with(|| a.cmp(&b))
    });
    let folding = order.len() > p.nodes;
    let kept = if folding { p.nodes - 1 } else { order.len() };
    let mut place = vec![0usize; nodes.len()];
    let mut shown: Vec<Node> = Vec::new();
    for (rank, &i) in order.iter().enumerate() {
        if rank < kept {
            place[i] = shown.len();
            let n = &nodes[i];
            shown.push(Node {
                label: n.label.clone(),
                ..*n
            });
        } else {
            if rank == kept {
                shown.push(Node {
                    label: "(other)".to_owned(),
                    unknown: false,
                    bytes: 0,
                    clients: 0,
                    servers: 0,
                    folded: 0,
                });
            }
            let o = shown.last_mut().expect("pushed above");
            o.folded += 1;
            o.bytes = o.bytes.saturating_add(nodes[i].bytes);
            o.clients += nodes[i].clients;
            o.servers += nodes[i].servers;
            place[i] = kept;
        }
    }

    let mut edges: BTreeMap<(usize, usize), Edge> = BTreeMap::new();
    for (a, b, row) in &ends {
        let k = (place[*a], place[*b]);
        match edges.get_mut(&k) {
            Some(e) => {
                e.row.merge(row);
                e.row.finish(r.window);
                e.single = None;
            }
            None => {
                edges.insert(
                    k,
                    Edge {
                        row: (*row).clone(),
                        single: Some(row),
                    },
                );
            }
        }
    }

    let pos = layout(shown.len());
    let mut o = String::with_capacity(16 * 1024);
    let _ = writeln!(
        o,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    o.push_str("<defs>");
    for l in Level::ALL {
        let _ = write!(
            o,
            "<marker id=\"arrow-{}\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerUnits=\"userSpaceOnUse\" markerWidth=\"12\" markerHeight=\"12\" orient=\"auto\"><path d=\"M0,0L10,5L0,10z\" fill=\"{}\"/></marker>",
            l.name(),
            l.colour()
        );
    }
    o.push_str("</defs>\n");
    let keys = |k: &[flowtable::query::TagKey]| {
        k.iter()
            .map(|k| k.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let _ = writeln!(
        o,
        "<text x=\"10\" y=\"20\" font-size=\"14\">clients by {} → servers by {}: {} pairs, {} nodes</text>",
        xml(&keys(&r.src_keys)),
        xml(&keys(&r.dst_keys)),
        edges.len(),
        shown.len()
    );
    if let Some(f) = &p.focus {
        let _ = writeln!(
            o,
            "<a href=\"{}\" target=\"_top\"><text id=\"clear-focus\" x=\"10\" y=\"40\">focus: {} (show all)</text></a>",
            xml(&p.url_with(&p.query, View::Map, None)),
            xml(f)
        );
    }

    o.push_str("<g id=\"edges\">\n");
    for ((a, b), e) in &edges {
        edge(&mut o, p, r, &shown, &pos, (*a, *b), e);
    }
    o.push_str("</g>\n<g id=\"nodes\">\n");
    for (i, n) in shown.iter().enumerate() {
        node(&mut o, p, n, pos[i], i == kept && folding);
    }
    o.push_str("</g>\n");
    legend(&mut o, p.color, folding.then(|| shown[kept].folded));
    o.push_str("</svg>\n");
    o
}

/// Positions on the circle, the first at the top, clockwise.
fn layout(n: usize) -> Vec<(f64, f64)> {
    if n == 1 {
        return vec![(CX, CY)];
    }
    (0..n)
        .map(|i| {
            let a = -PI / 2.0 + 2.0 * PI * i as f64 / n as f64;
            (CX + RADIUS * a.cos(), CY + RADIUS * a.sin())
        })
        .collect()
}

fn width(bandwidth: Option<f64>) -> f64 {
    match bandwidth {
        Some(b) if b > 0.0 => (1.0 + 2.0 * (1.0 + b / 1000.0).log10()).min(14.0),
        _ => 1.0,
    }
}

fn edge(
    o: &mut String,
    p: &Params,
    r: &QueryResult,
    nodes: &[Node],
    pos: &[(f64, f64)],
    (a, b): (usize, usize),
    e: &Edge,
) {
    let row = &e.row;
    let level = Level::of(row, p.color);
    let w = width(row.bandwidth());
    let (x1, y1) = pos[a];
    let (x2, y2) = pos[b];
    let d = if a == b {
        // A loop along the circle, clockwise of the node: its label is
        // outside, where the loop would cover it.
        let (ox, oy) = unit(x1 - CX, y1 - CY, (0.0, -1.0));
        let (ux, uy) = (-oy, ox);
        let rot = |deg: f64, len: f64| {
            let t = deg * PI / 180.0;
            (
                x1 + len * (ux * t.cos() - uy * t.sin()),
                y1 + len * (ux * t.sin() + uy * t.cos()),
            )
        };
        let (s, c1, c2, t) = (
            rot(35.0, NODE_R),
            rot(30.0, 70.0),
            rot(-30.0, 70.0),
            rot(-35.0, NODE_R + 3.0),
        );
        format!(
            "M{:.1},{:.1}C{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}",
            s.0, s.1, c1.0, c1.1, c2.0, c2.1, t.0, t.1
        )
    } else {
        // Bent to the right of its direction, so a → b and b → a part.
        let (ux, uy) = unit(x2 - x1, y2 - y1, (1.0, 0.0));
        let len = ((x2 - x1).powi(2) + (y2 - y1).powi(2)).sqrt();
        let (mx, my) = (
            (x1 + x2) / 2.0 - uy * len * 0.12,
            (y1 + y2) / 2.0 + ux * len * 0.12,
        );
        let (sx, sy) = unit(mx - x1, my - y1, (ux, uy));
        let (tx, ty) = unit(x2 - mx, y2 - my, (ux, uy));
        format!(
            "M{:.1},{:.1}Q{:.1},{:.1} {:.1},{:.1}",
            x1 + sx * NODE_R,
            y1 + sy * NODE_R,
            mx,
            my,
            x2 - tx * (NODE_R + 2.0),
            y2 - ty * (NODE_R + 2.0)
        )
    };
    let dashed = if nodes[a].unknown || nodes[b].unknown {
        " stroke-dasharray=\"6 4\""
    } else {
        ""
    };
    let retrans = row.metric(Metric::Retransmits).unwrap_or(0.0) as u64;
    let rtt = row.rtt_dst();
    let title = format!(
        "{} → {}\nthroughput {}\nsent {}, received {}\nretransmits {} ({})\nRTT p50 {}, p99 {}\n{}{}",
        nodes[a].label,
        nodes[b].label,
        human::rate(row.bandwidth()),
        human::bytes(row.sent.bytes as f64),
        human::bytes(row.received.bytes as f64),
        retrans,
        human::percent(retransmit_percent(row)),
        human::micros(rtt.p50),
        human::micros(rtt.p99),
        plural(row.conns as usize, "connection"),
        if e.single.is_none() { " (merged pairs)" } else { "" }
    );
    let path = format!(
        "<path class=\"edge\" data-level=\"{}\" d=\"{d}\" fill=\"none\" stroke=\"{}\" stroke-width=\"{w:.1}\"{dashed} marker-end=\"url(#arrow-{})\"><title>{}</title></path>",
        level.name(),
        level.colour(),
        level.name(),
        xml(&title).replace("\\x0a", "&#10;")
    );
    match e.single.and_then(|row| p.drill(r, row)) {
        Some(q) => {
            let _ = writeln!(
                o,
                "<a href=\"{}\" target=\"_top\">{path}</a>",
                xml(&p.url_with(&q, View::Table, None))
            );
        }
        None => {
            let _ = writeln!(o, "{path}");
        }
    }
}

/// The unit vector of (dx, dy), or `fallback` for a zero vector.
fn unit(dx: f64, dy: f64, fallback: (f64, f64)) -> (f64, f64) {
    let l = (dx * dx + dy * dy).sqrt();
    if l < 1e-9 {
        fallback
    } else {
        (dx / l, dy / l)
    }
}

fn node(o: &mut String, p: &Params, n: &Node, (x, y): (f64, f64), other: bool) {
    let dashed = if n.unknown {
        " stroke-dasharray=\"3 2\""
    } else {
        ""
    };
    // The label outside the circle, anchored away from the centre.
    let (ux, uy) = unit(x - CX, y - CY, (0.0, -1.0));
    let (lx, ly) = (x + ux * (NODE_R + 6.0), y + uy * (NODE_R + 6.0) + 4.0);
    let anchor = if ux > 0.3 {
        "start"
    } else if ux < -0.3 {
        "end"
    } else {
        "middle"
    };
    let shown: String = if n.label.chars().count() > 40 {
        n.label.chars().take(39).chain(['…']).collect()
    } else {
        n.label.clone()
    };
    let title = if other {
        format!(
            "(other): {} nodes folded, {}",
            n.folded,
            human::bytes(n.bytes as f64)
        )
    } else {
        format!(
            "{}\n{} as client, {} as server; {}",
            n.label,
            plural(n.clients, "pair"),
            plural(n.servers, "pair"),
            human::bytes(n.bytes as f64)
        )
    };
    let g = format!(
        "<g class=\"node\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"{NODE_R}\" fill=\"#f1f3f5\" stroke=\"#343a40\" stroke-width=\"1.5\"{dashed}/><text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\">{}</text><title>{}</title></g>",
        xml(&shown),
        xml(&title).replace("\\x0a", "&#10;")
    );
    if other {
        let _ = writeln!(o, "{g}");
    } else {
        let _ = writeln!(
            o,
            "<a href=\"{}\" target=\"_top\">{g}</a>",
            xml(&p.url_with(&p.query, View::Map, Some(&n.label)))
        );
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn legend(o: &mut String, color: Color, folded: Option<usize>) {
    let y0 = HEIGHT - 110.0;
    o.push_str("<g id=\"legend\">\n");
    let (what, labels) = match color {
        Color::Retransmits => (
            "colour: retransmitted segments ÷ segments",
            [
                format!("< {} %", RETRANSMIT_PCT.0),
                format!("{} – {} %", RETRANSMIT_PCT.0, RETRANSMIT_PCT.1),
                format!("≥ {} %", RETRANSMIT_PCT.1),
                "no packets".to_owned(),
            ],
        ),
        Color::RttP99 => (
            "colour: RTT p99 (dst leg)",
            [
                format!("< {} ms", RTT_P99_US.0 / 1000),
                format!("{} – {} ms", RTT_P99_US.0 / 1000, RTT_P99_US.1 / 1000),
                format!("≥ {} ms", RTT_P99_US.1 / 1000),
                "no sample".to_owned(),
            ],
        ),
    };
    let _ = writeln!(o, "<text x=\"10\" y=\"{y0:.1}\">{what}</text>");
    for (i, (l, text)) in Level::ALL.iter().zip(&labels).enumerate() {
        let x = 10.0 + 130.0 * i as f64;
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"4\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            y0 + 16.0,
            x + 30.0,
            y0 + 16.0,
            l.colour(),
            x + 36.0,
            y0 + 20.0,
            xml(text)
        );
    }
    let _ = writeln!(
        o,
        "<text x=\"10\" y=\"{:.1}\">width: throughput, 1 + 2·log10(1 + B/s ÷ 1000) px</text>",
        y0 + 44.0
    );
    for (i, (bw, text)) in [(1e3, "1 kB/s"), (1e6, "1 MB/s"), (1e8, "100 MB/s")]
        .iter()
        .enumerate()
    {
        let x = 10.0 + 130.0 * i as f64;
        let _ = writeln!(
            o,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#495057\" stroke-width=\"{:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\">{text}</text>",
            y0 + 62.0,
            x + 30.0,
            y0 + 62.0,
            width(Some(*bw)),
            x + 36.0,
            y0 + 66.0
        );
    }
    let _ = writeln!(
        o,
        "<line x1=\"10\" y1=\"{0:.1}\" x2=\"40\" y2=\"{0:.1}\" stroke=\"#495057\" stroke-width=\"2\" stroke-dasharray=\"6 4\"/><text x=\"46\" y=\"{1:.1}\">an end with unknown values</text>",
        y0 + 88.0,
        y0 + 92.0
    );
    if let Some(n) = folded {
        let _ = writeln!(
            o,
            "<text id=\"folded\" x=\"300\" y=\"{:.1}\">(other): {n} smaller nodes folded</text>",
            y0 + 92.0
        );
    }
    o.push_str("</g>\n");
}
