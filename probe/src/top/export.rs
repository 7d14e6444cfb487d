//! `e` in `top`: the rows on the screen to a file, as JSON lines (each
//! row's object exactly as `/query` gave it) or CSV (`.csv`).

use std::io::Write;
use std::path::Path;

use super::model::{Answer, Row};

/// The CSV columns after the group-by keys.
const HEAD: &[&str] = &[
    "other",
    "conns",
    "sent_packets",
    "sent_bytes",
    "sent_retransmits",
    "sent_retransmitted_bytes",
    "received_packets",
    "received_bytes",
    "received_retransmits",
    "received_retransmitted_bytes",
    "seconds",
    "bandwidth_bytes_per_s",
    "rtt_dst_p50_us",
    "rtt_dst_p90_us",
    "rtt_dst_p99_us",
    "rtt_dst_max_us",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn csv_row(a: &Answer, r: &Row) -> String {
    let o = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut cells: Vec<String> = a
        .cells(r)
        .into_iter()
        .map(|v| csv_field(v.as_deref().unwrap_or("")))
        .collect();
    cells.extend([
        r.other.to_string(),
        r.conns.to_string(),
        r.sent.packets.to_string(),
        r.sent.bytes.to_string(),
        r.sent.retransmits.to_string(),
        r.sent.retransmitted_bytes.to_string(),
        r.received.packets.to_string(),
        r.received.bytes.to_string(),
        r.received.retransmits.to_string(),
        r.received.retransmitted_bytes.to_string(),
        r.seconds.to_string(),
        r.bandwidth_bytes_per_s
            .map(|v| v.to_string())
            .unwrap_or_default(),
        o(r.rtt_dst.p50_us),
        o(r.rtt_dst.p90_us),
        o(r.rtt_dst.p99_us),
        o(r.rtt_dst.max_us),
    ]);
    cells.join(",")
}

/// The text of the file: `rows` (indexes into `a.rows`, in screen order).
pub fn render(a: &Answer, rows: &[usize], csv: bool) -> String {
    let mut out = String::new();
    if csv {
        let head: Vec<String> = a
            .src_keys
            .iter()
            .map(|k| csv_field(&format!("src.{k}")))
            .chain(a.dst_keys.iter().map(|k| csv_field(&format!("dst.{k}"))))
            .chain(HEAD.iter().map(|h| (*h).to_owned()))
            .collect();
        out.push_str(&head.join(","));
        out.push('\n');
        for &i in rows {
            out.push_str(&csv_row(a, &a.rows[i]));
            out.push('\n');
        }
    } else {
        for &i in rows {
            out.push_str(&a.raw[i].to_string());
            out.push('\n');
        }
    }
    out
}

/// Writes the rows to `path`; CSV when it ends in `.csv`.
pub fn write(path: &Path, a: &Answer, rows: &[usize]) -> std::io::Result<()> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let mut f = std::fs::File::create(path)?;
    f.write_all(render(a, rows, csv).as_bytes())?;
    f.sync_all()
}
