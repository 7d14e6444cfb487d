//! Query rows as CSV: one writer for the agent's `/query.csv` and `top`'s
//! export, so both files have the same columns and the same escaping.
//! Rows are taken as `/query` serialises them (the [query row
//! contract](../../../docs/json-contract.md#query-row)): the columns are
//! paths into that JSON, so a number here is the number `/query` gives.

use std::fmt::Display;

use serde_json::Value;

use super::escape;

/// The columns after the tags and `other`, as paths into the row's JSON
/// (`("sent", "bytes")` is `sent.bytes`). New columns go at the end.
pub const COLUMNS: &[(&str, &str)] = &[
    ("conns", ""),
    ("sent", "packets"),
    ("sent", "bytes"),
    ("sent", "l3_bytes"),
    ("sent", "retransmits"),
    ("sent", "retransmitted_bytes"),
    ("sent", "probes"),
    ("sent", "gaps"),
    ("received", "packets"),
    ("received", "bytes"),
    ("received", "l3_bytes"),
    ("received", "retransmits"),
    ("received", "retransmitted_bytes"),
    ("received", "probes"),
    ("received", "gaps"),
    ("first_seen", ""),
    ("last_seen", ""),
    ("seconds", ""),
    ("bandwidth_bytes_per_s", ""),
    ("rtt_dst", "samples"),
    ("rtt_dst", "p50_us"),
    ("rtt_dst", "p90_us"),
    ("rtt_dst", "p99_us"),
    ("rtt_dst", "max_us"),
    ("rtt_src", "samples"),
    ("rtt_src", "p50_us"),
    ("rtt_src", "p90_us"),
    ("rtt_src", "p99_us"),
    ("rtt_src", "max_us"),
    ("sent_bytes_per_s", ""),
    ("received_bytes_per_s", ""),
    ("retransmit_pct", ""),
];

/// A header, then one CRLF-terminated line per row: each group-by key's
/// value (`src.KEY`, `dst.KEY`), `other` (`true` or empty), then
/// [`COLUMNS`], numbers as JSON writes them and `null` as an empty field.
/// Every text goes through [`escape::csv`], so a tag value a spreadsheet
/// would run as a formula stays text.
pub fn rows<'a, K: Display>(
    src_keys: &[K],
    dst_keys: &[K],
    rows: impl IntoIterator<Item = &'a Value>,
) -> String {
    let mut head: Vec<String> = Vec::new();
    for (side, keys) in [("src", src_keys), ("dst", dst_keys)] {
        head.extend(keys.iter().map(|k| escape::csv(&format!("{side}.{k}"))));
    }
    head.push("other".to_owned());
    head.extend(COLUMNS.iter().map(|&(a, b)| {
        if b.is_empty() {
            a.to_owned()
        } else {
            format!("{a}.{b}")
        }
    }));
    let mut out = head.join(",");
    out.push_str("\r\n");
    for row in rows {
        let mut cells: Vec<String> = Vec::with_capacity(head.len());
        for (side, keys) in [("src", src_keys), ("dst", dst_keys)] {
            cells.extend(keys.iter().map(|k| cell(&row[side][k.to_string()])));
        }
        cells.push(if row["other"] == Value::Bool(true) {
            "true".to_owned()
        } else {
            String::new()
        });
        for &(a, b) in COLUMNS {
            cells.push(cell(if b.is_empty() { &row[a] } else { &row[a][b] }));
        }
        out.push_str(&cells.join(","));
        out.push_str("\r\n");
    }
    out
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => escape::csv(s),
        n => escape::csv(&n.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tags_counters_and_missing_values() {
        let row = json!({
            "src": {"service": "=cmd|' /C calc'!A0"},
            "dst": {"port": "5001"},
            "other": false,
            "conns": 2,
            "sent": {"bytes": 10, "packets": 1},
            "rtt_dst": {"p50_us": null},
        });
        let out = rows(&["service"], &["port"], [&row]);
        let lines: Vec<&str> = out.split("\r\n").collect();
        assert!(lines[0].starts_with("src.service,dst.port,other,conns,sent.packets,sent.bytes,"));
        assert_eq!(lines[0].split(',').count(), 3 + COLUMNS.len());
        assert!(
            lines[1].starts_with("'=cmd|' /C calc'!A0,5001,,2,1,10,,"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[1].split(',').count(), 3 + COLUMNS.len());
        assert_eq!(lines[2], "");
    }
}
