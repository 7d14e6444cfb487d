//! How connections are printed: the JSON-lines contract and a table.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::IpAddr;

use flowtable::nat::NatStats;
use flowtable::query::QueryResult;
use flowtable::{Connection, DirStats, FrameStats, Percentiles};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON object per connection per line (the stable contract).
    Json,
}

pub fn write(out: &mut impl Write, format: Format, conns: &[Connection]) -> io::Result<()> {
    match format {
        Format::Json => {
            for c in conns {
                serde_json::to_writer(&mut *out, c)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
        Format::Table => table(out, conns),
    }
}

/// One periodic snapshot of `flowprobe run --interval`: in JSON every
/// connection's object with `"snapshot": n` added; as a table, a
/// `# snapshot n` line, then the table.
pub fn write_snapshot(
    out: &mut impl Write,
    format: Format,
    n: u64,
    conns: &[Connection],
) -> io::Result<()> {
    match format {
        Format::Json => {
            for c in conns {
                let mut v = serde_json::to_value(c)?;
                if let Some(o) = v.as_object_mut() {
                    o.insert("snapshot".to_owned(), n.into());
                }
                serde_json::to_writer(&mut *out, &v)?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
        Format::Table => {
            writeln!(out, "# snapshot {n}")?;
            table(out, conns)
        }
    }
}

fn endpoint(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// Who an end is, in one table cell: `process[pid]/service/container`
/// (the container id cut to 12 digits, as `docker ps` shows it; `-` for a
/// missing part), or `(reason)` when it is not attributed.
fn owner(tags: &BTreeMap<String, String>) -> String {
    if let Some(why) = tags.get("unattributed") {
        return format!("({why})");
    }
    let get = |k: &str| tags.get(k).map(String::as_str).unwrap_or("-");
    let container = get("container");
    format!(
        "{}[{}]/{}/{}",
        get("process"),
        get("pid"),
        get("service"),
        &container[..container.len().min(12)]
    )
}

fn table(out: &mut impl Write, conns: &[Connection]) -> io::Result<()> {
    let rows: Vec<[String; 2]> = conns
        .iter()
        .map(|c| [endpoint(c.src, c.sport), endpoint(c.dst, c.dport)])
        .collect();
    let ws = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(6);
    let wd = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(11);
    // Owner columns only when some end is attributed (`run`), so replay
    // tables stay as they were.
    let owners: Option<Vec<[String; 2]>> = conns
        .iter()
        .any(|c| !c.src_tags.is_empty() || !c.dst_tags.is_empty())
        .then(|| {
            conns
                .iter()
                .map(|c| [owner(&c.src_tags), owner(&c.dst_tags)])
                .collect()
        });
    let wo = owners
        .iter()
        .flatten()
        .map(|r| r[0].len())
        .max()
        .unwrap_or(0)
        .max(9);
    write!(
        out,
        "{:<5} {:<ws$} {:<wd$} {:>9} {:>12} {:>7} {:>10} {:>9} {:>12} {:>7} {:>10} {:>10}",
        "PROTO",
        "SOURCE",
        "DESTINATION",
        "SENT_PKTS",
        "SENT_BYTES",
        "S_RETX",
        "S_RETX_B",
        "RECV_PKTS",
        "RECV_BYTES",
        "R_RETX",
        "R_RETX_B",
        "DURATION_S",
    )?;
    if owners.is_some() {
        write!(out, " {:<wo$} DST_OWNER", "SRC_OWNER")?;
    }
    writeln!(out)?;
    for (i, (c, [s, d])) in conns.iter().zip(&rows).enumerate() {
        let dur = c.last_seen.saturating_sub(c.first_seen) as f64 / 1e9;
        let dir = |x: &DirStats| (x.packets, x.bytes, x.retransmits(), x.retransmitted_bytes());
        let (sp, sb, sr, srb) = dir(&c.sent);
        let (rp, rb, rr, rrb) = dir(&c.received);
        write!(
            out,
            "{:<5} {s:<ws$} {d:<wd$} {sp:>9} {sb:>12} {sr:>7} {srb:>10} {rp:>9} {rb:>12} {rr:>7} {rrb:>10} {dur:>10.3}",
            c.proto
        )?;
        if let Some([so, dso]) = owners.as_ref().and_then(|o| o.get(i)) {
            write!(out, " {so:<wo$} {dso}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

/// A query's rows: in JSON one object per row per line (the row contract
/// of the README, "Queries"); as a table, one column per tag key, then the
/// sums. A tag an end lacks shows as `-`, the `--top` remainder as `(other)`.
pub fn write_query(out: &mut impl Write, format: Format, q: &QueryResult) -> io::Result<()> {
    match format {
        Format::Json => {
            for r in &q.rows {
                serde_json::to_writer(&mut *out, &r.json(q))?;
                out.write_all(b"\n")?;
            }
            Ok(())
        }
        Format::Table => query_table(out, q),
    }
}

fn query_table(out: &mut impl Write, q: &QueryResult) -> io::Result<()> {
    let mut header: Vec<String> = q
        .src_keys
        .iter()
        .map(|k| format!("SRC.{k}").to_uppercase())
        .chain(q.dst_keys.iter().map(|k| format!("DST.{k}").to_uppercase()))
        .collect();
    let tag_cols = header.len();
    header.extend(
        [
            "CONNS",
            "SENT_PKTS",
            "SENT_BYTES",
            "S_RETX",
            "S_RETX_B",
            "RECV_PKTS",
            "RECV_BYTES",
            "R_RETX",
            "R_RETX_B",
            "SECONDS",
            "BANDWIDTH",
            "RTT_P50_US",
            "RTT_P90_US",
            "RTT_P99_US",
            "RTT_MAX_US",
        ]
        .map(String::from),
    );
    let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let rows: Vec<Vec<String>> = q
        .rows
        .iter()
        .map(|r| {
            let mut cells: Vec<String> = r
                .src
                .iter()
                .chain(&r.dst)
                .map(|v| match (r.other, v) {
                    (true, _) => "(other)".to_owned(),
                    (false, Some(v)) => v.clone(),
                    (false, None) => "-".to_owned(),
                })
                .collect();
            let Percentiles {
                p50, p90, p99, max, ..
            } = r.rtt_dst();
            cells.extend([
                r.conns.to_string(),
                r.sent.packets.to_string(),
                r.sent.bytes.to_string(),
                r.sent.retransmits().to_string(),
                r.sent.retransmitted_bytes().to_string(),
                r.received.packets.to_string(),
                r.received.bytes.to_string(),
                r.received.retransmits().to_string(),
                r.received.retransmitted_bytes().to_string(),
                format!("{:.3}", r.seconds()),
                r.bandwidth().map_or_else(|| "-".to_owned(), rate),
                opt(p50),
                opt(p90),
                opt(p99),
                opt(max),
            ]);
            cells
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in std::iter::once(&header).chain(&rows) {
        let mut s = String::new();
        for (i, (cell, w)) in line.iter().zip(&widths).enumerate() {
            if i > 0 {
                s.push(' ');
            }
            // Tags read left to right, numbers line up on the right.
            if i < tag_cols {
                s.push_str(&format!("{cell:<w$}"));
            } else {
                s.push_str(&format!("{cell:>w$}"));
            }
        }
        writeln!(out, "{}", s.trim_end())?;
    }
    Ok(())
}

/// Bytes per second in SI units (`12.3 MB/s`).
pub fn rate(bps: f64) -> String {
    const UNITS: [&str; 5] = ["B/s", "kB/s", "MB/s", "GB/s", "TB/s"];
    let mut v = bps;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// One line for stderr: what was read and what was skipped, by reason,
/// and what undoing NAT did.
pub fn summary(conns: usize, s: &FrameStats, nat: Option<&NatStats>) -> String {
    let mut line = format!(
        "{conns} connection{}, {} frame{} ({} tracked",
        if conns == 1 { "" } else { "s" },
        s.frames,
        if s.frames == 1 { "" } else { "s" },
        s.tracked
    );
    if s.duplicate > 0 {
        line.push_str(&format!(
            ", {} seen again on another interface",
            s.duplicate
        ));
    }
    let mut skipped: Vec<String> = s
        .skipped_by_reason()
        .map(|(r, n)| format!("{n} {}", r.name()))
        .collect();
    if s.unsupported_link > 0 {
        skipped.push(format!("{} unsupported_link", s.unsupported_link));
    }
    if !skipped.is_empty() {
        line.push_str(", skipped ");
        line.push_str(&skipped.join(", "));
    }
    line.push(')');
    if let Some(n) = nat {
        if n.translated > 0 {
            line.push_str(&format!(
                "; {} translated by NAT on this host ({} of their packets seen again after the translation)",
                n.translated, n.duplicate_packets
            ));
        }
        if n.unresolved > 0 {
            line.push_str(&format!(
                "; NAT unresolved for {} connections of the last reading (conntrack could not be read: a translated one is listed once per tuple)",
                n.unresolved
            ));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_summary_says_what_nat_did() {
        let nat = NatStats {
            translated: 7,
            duplicate_packets: 5900,
            ..NatStats::default()
        };
        let s = FrameStats::default();
        assert_eq!(
            summary(9, &s, Some(&nat)),
            "9 connections, 0 frames (0 tracked); 7 translated by NAT on this host (5900 of their packets seen again after the translation)"
        );
        let nat = NatStats {
            unresolved: 3,
            ..NatStats::default()
        };
        assert!(summary(3, &s, Some(&nat)).ends_with(
            "; NAT unresolved for 3 connections of the last reading (conntrack could not be read: a translated one is listed once per tuple)"
        ));
        assert_eq!(summary(1, &s, None), "1 connection, 0 frames (0 tracked)");
    }

    use super::*;

    #[test]
    fn owner_cells() {
        let tags = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            owner(&tags(&[
                ("process", "nginx"),
                ("pid", "42"),
                ("service", "web"),
                (
                    "container",
                    "4f2d9b3c1a0e8f7d6c5b4a39281706f5e4d3c2b1a0998877665544332211aabb"
                ),
            ])),
            "nginx[42]/web/4f2d9b3c1a0e"
        );
        assert_eq!(
            owner(&tags(&[("process", "sshd"), ("pid", "7")])),
            "sshd[7]/-/-"
        );
        assert_eq!(owner(&tags(&[("unattributed", "remote")])), "(remote)");
    }
}
