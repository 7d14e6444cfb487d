//! How connections are printed: the JSON-lines contract and a table.

use std::io::{self, Write};
use std::net::IpAddr;

use flowtable::{Connection, DirStats, FrameStats};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
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

fn table(out: &mut impl Write, conns: &[Connection]) -> io::Result<()> {
    let rows: Vec<[String; 2]> = conns
        .iter()
        .map(|c| [endpoint(c.src, c.sport), endpoint(c.dst, c.dport)])
        .collect();
    let ws = rows.iter().map(|r| r[0].len()).max().unwrap_or(0).max(6);
    let wd = rows.iter().map(|r| r[1].len()).max().unwrap_or(0).max(11);
    writeln!(
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
    for (c, [s, d]) in conns.iter().zip(&rows) {
        let dur = c.last_seen.saturating_sub(c.first_seen) as f64 / 1e9;
        let dir = |x: &DirStats| (x.packets, x.bytes, x.retransmits, x.retransmitted_bytes);
        let (sp, sb, sr, srb) = dir(&c.sent);
        let (rp, rb, rr, rrb) = dir(&c.received);
        writeln!(
            out,
            "{:<5} {s:<ws$} {d:<wd$} {sp:>9} {sb:>12} {sr:>7} {srb:>10} {rp:>9} {rb:>12} {rr:>7} {rrb:>10} {dur:>10.3}",
            c.proto
        )?;
    }
    Ok(())
}

/// One line for stderr: what was read and what was skipped, by reason.
pub fn summary(conns: usize, s: &FrameStats) -> String {
    let mut line = format!(
        "{conns} connection{}, {} frame{} ({} tracked",
        if conns == 1 { "" } else { "s" },
        s.frames,
        if s.frames == 1 { "" } else { "s" },
        s.tracked
    );
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
    line
}
