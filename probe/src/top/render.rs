//! Drawing: a pure function of ([`Data`], [`View`]) onto a ratatui frame,
//! so screens are tested as text with `TestBackend`.
//!
//! The numbers are the query rows' own, printed as `flowprobe query
//! --format table` prints them (bytes and packets whole, `BANDWIDTH` in SI
//! units, RTT in µs, `-` for none). Every tag value, and everything else
//! that came from outside (the command line, errors), goes through
//! [`text`] first: control characters and escape sequences are shown as
//! text, never sent to the terminal.

use std::fmt::Write as _;

use ratatui::layout::Rect;
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Clear, Paragraph};
use ratatui::Frame;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use super::model::{Data, Row};
use super::view::{self, Local, Mode, View, COLUMNS};
use crate::export::print::rate;

/// Lines above the table besides the command (title, totals, capture
/// health, status, the table's header); one below (keys or the editor).
const ABOVE: u16 = 5;
const BELOW: u16 = 1;
/// The command wraps over at most this many lines.
const COMMAND_LINES: usize = 4;

/// Table rows that fit in a terminal of `width` × `height`.
pub fn page_size(data: &Data, view: &View, width: u16, height: u16) -> usize {
    let cmd = command_lines(data, view, width).len() as u16;
    usize::from(height.saturating_sub(ABOVE + cmd + BELOW)).max(1)
}

/// The active query as the command that prints the same rows, `$ ` first,
/// wrapped at blanks into lines of `width` (continuations indented by two
/// blanks), so that it can be read whole, and copied.
pub fn command_lines(data: &Data, view: &View, cols: u16) -> Vec<String> {
    let mut cmd = data.command.clone();
    cmd.extend(view.flags.args());
    let full = format!("$ {}", text(&shell(&cmd)));
    let w = usize::from(cols).max(8);
    let mut lines: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in full.split(' ') {
        let indent = if lines.is_empty() { 0 } else { 2 };
        if !cur.is_empty() && indent + width(&cur) + 1 + width(word) > w {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    lines.push(cur);
    let n = lines.len();
    let mut out: Vec<String> = lines
        .into_iter()
        .enumerate()
        .map(|(i, l)| if i == 0 { l } else { format!("  {l}") })
        .take(COMMAND_LINES)
        .collect();
    if n > COMMAND_LINES {
        let last = out.last_mut().expect("at least one line");
        *last = fit(&format!("{last} …"), w.saturating_sub(1)) + "…";
    }
    out
}

/// `s` with every control character (C0, DEL, C1), the bidirectional and
/// zero-width formatting characters and the backslash escaped, so a value
/// a process chose (its name, command line, environment) prints as the
/// characters it is made of and cannot move the cursor, change colours
/// or reorder the line.
pub fn text(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        let u = c as u32;
        let format = matches!(u, 0x200B..=0x200F | 0x2028..=0x202E | 0x2060..=0x2069 | 0xFEFF);
        if c == '\\' {
            o.push_str("\\\\");
        } else if c.is_control() || format {
            if u < 0x100 {
                let _ = write!(o, "\\x{u:02x}");
            } else {
                let _ = write!(o, "\\u{{{u:x}}}");
            }
        } else {
            o.push(c);
        }
    }
    o
}

/// `args` as a shell would take them back: words of safe characters as
/// they are, others in single quotes.
pub fn shell(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let safe = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:,=@%+[]".contains(c));
            if safe {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn opt(v: Option<u64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// A table column: header, alignment, when it goes as the terminal
/// narrows (higher first), and each row's cell.
struct Col {
    head: String,
    tag: bool,
    drop: u8,
    cells: Vec<String>,
}

/// The metric columns, in screen order (headers as `flowprobe query
/// --format table` names them, `RETX%` besides).
fn metric_cols(rows: &[&Row]) -> Vec<Col> {
    type Cell = fn(&Row) -> String;
    // In the order of view::COLUMNS (a test checks it).
    let defs: [(&str, u8, Cell); 12] = [
        ("CONNS", 1, |r| r.conns.to_string()),
        ("SENT_BYTES", 1, |r| r.sent.bytes.to_string()),
        ("RECV_BYTES", 1, |r| r.received.bytes.to_string()),
        ("BANDWIDTH", 2, |r| {
            r.bandwidth_bytes_per_s.map_or_else(|| "-".to_owned(), rate)
        }),
        ("S_RETX", 2, |r| r.sent.retransmits.to_string()),
        ("R_RETX", 2, |r| r.received.retransmits.to_string()),
        ("RETX%", 3, |r| retx_pct(r)),
        ("RTT_P50_US", 4, |r| opt(r.rtt_dst.p50_us)),
        ("RTT_P99_US", 3, |r| opt(r.rtt_dst.p99_us)),
        ("SENT_PKTS", 5, |r| r.sent.packets.to_string()),
        ("RECV_PKTS", 5, |r| r.received.packets.to_string()),
        ("SECONDS", 6, |r| format!("{:.3}", r.seconds)),
    ];
    defs.iter()
        .map(|(head, drop, cell)| Col {
            head: (*head).to_owned(),
            tag: false,
            drop: *drop,
            cells: rows.iter().map(|r| cell(r)).collect(),
        })
        .collect()
}

/// Retransmitted payload bytes as a share of all payload bytes, both
/// directions, in percent; none without bytes.
pub fn retx_ratio(r: &Row) -> Option<f64> {
    r.retransmit_pct
}

/// [`retx_ratio`] with one decimal, `-` without bytes.
pub fn retx_pct(r: &Row) -> String {
    retx_ratio(r).map_or_else(|| "-".to_owned(), |p| format!("{p:.1}"))
}

fn width(s: &str) -> usize {
    UnicodeWidthStr::width(s)
}

/// `s` cut to `w` columns, with `…` when cut.
fn fit(s: &str, w: usize) -> String {
    if width(s) <= w {
        return s.to_owned();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let cw = c.width().unwrap_or(0);
        if used + cw + 1 > w {
            break;
        }
        out.push(c);
        used += cw;
    }
    out.push('…');
    out
}

fn pad(s: &str, w: usize, right: bool) -> String {
    let s = fit(s, w);
    let fill = " ".repeat(w.saturating_sub(width(&s)));
    if right {
        fill + &s
    } else {
        s + &fill
    }
}

/// The columns that fit in `avail` and their widths: metric columns go,
/// highest `drop` first (the rightmost of equals first), then tag columns
/// are cut (not below 6).
fn fit_columns(mut cols: Vec<Col>, avail: usize) -> (Vec<Col>, Vec<usize>) {
    let natural = |c: &Col| {
        c.cells
            .iter()
            .map(|s| width(s))
            .chain([width(&c.head)])
            .max()
            .unwrap_or(0)
    };
    let mut widths: Vec<usize> = cols
        .iter()
        .map(|c| {
            if c.tag {
                natural(c).min(40)
            } else {
                natural(c)
            }
        })
        .collect();
    let total = |w: &[usize]| w.iter().sum::<usize>() + w.len().saturating_sub(1);
    while total(&widths) > avail {
        let victim = cols
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.tag)
            .max_by_key(|(i, c)| (c.drop, *i))
            .map(|(i, _)| i);
        match victim {
            // Keep at least the first metric column.
            Some(i) if cols.iter().filter(|c| !c.tag).count() > 1 => {
                cols.remove(i);
                widths.remove(i);
            }
            _ => break,
        }
    }
    while total(&widths) > avail {
        let Some(i) = (0..cols.len())
            .filter(|&i| cols[i].tag && widths[i] > 6)
            .max_by_key(|&i| widths[i])
        else {
            break;
        };
        widths[i] -= 1;
    }
    (cols, widths)
}

fn dim() -> Style {
    Style::default().add_modifier(Modifier::DIM)
}

fn bad() -> Style {
    Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED)
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame, data: &Data, view: &View) {
    let area = f.area();
    let mut lines: Vec<Line> = Vec::new();
    let h = &data.health;

    // 1: what is shown.
    let mut title = format!("flowprobe top · {}", text(&data.source));
    if !h.backend.is_empty() && data.playback.is_none() {
        let _ = write!(title, " · {}", text(&h.backend));
    }
    if !h.interfaces.is_empty() {
        let ifaces: Vec<String> = h
            .interfaces
            .iter()
            .map(|i| format!("{}({})", text(&i.iface), text(&i.mode)))
            .collect();
        let _ = write!(title, " · {}", ifaces.join(" "));
    }
    lines.push(Line::from(Span::styled(
        title,
        Style::default().add_modifier(Modifier::BOLD),
    )));

    // 2: the totals of the selection, as /query sums them.
    lines.push(Line::from(match &data.totals {
        Some(t) => format!(
            "total {} conns  sent {}  recv {}  {}  retx {}/{}  rtt {}/{} µs",
            t.conns,
            t.sent.bytes,
            t.received.bytes,
            t.bandwidth_bytes_per_s.map_or_else(|| "-".to_owned(), rate),
            t.sent.retransmits,
            t.received.retransmits,
            opt(t.rtt_dst.p50_us),
            opt(t.rtt_dst.p99_us),
        ),
        None => "total: no connection selected".to_owned(),
    }));

    // 3: capture health; any loss stands out.
    let mut spans = Vec::new();
    // A replay says first where it is.
    if let Some(p) = &data.playback {
        let state = if p.done {
            "end"
        } else if view.paused {
            "paused"
        } else {
            "playing"
        };
        spans.push(Span::raw(format!(
            "{state} {:.3}/{:.3} s ×{} frame {}/{} · ",
            p.at_s, p.length_s, p.speed, p.frame, p.frames
        )));
    }
    spans.push(Span::raw(format!("{} connections ·", h.connections)));
    let item = |spans: &mut Vec<Span>, label: &str, n: u64| {
        let s = format!(" {label} {n}");
        spans.push(if n > 0 {
            Span::styled(s, bad())
        } else {
            Span::raw(s)
        });
    };
    if let Some(m) = &h.map {
        let pct = if m.capacity > 0 {
            m.entries as f64 * 100.0 / m.capacity as f64
        } else {
            0.0
        };
        spans.push(Span::raw(format!(
            " table {}/{} ({pct:.1}%)",
            m.entries, m.capacity
        )));
        item(&mut spans, "full", m.full);
        item(&mut spans, "insert_failed", m.insert_failed);
        item(&mut spans, "contended", m.contended);
    }
    if let Some(r) = &h.rings {
        item(&mut spans, "ring drops", r.drops);
        item(&mut spans, "freezes", r.freezes);
    }
    if let Some(p) = &h.packets {
        spans.push(Span::raw(format!(" tracked {}", p.tracked)));
        let skipped: u64 = p.skipped.values().sum();
        spans.push(Span::raw(format!(" skipped {skipped}")));
    }
    if let Some(e) = &h.export {
        item(&mut spans, "export failed", e.failed_writes);
    }
    lines.push(Line::from(spans));

    // 4: the query as a command that prints the same rows.
    for l in command_lines(data, view, area.width) {
        lines.push(Line::from(Span::styled(l, dim())));
    }

    // 5: a message first (a bad filter, what a key did), then the state.
    let mut status = Vec::new();
    if let Some(e) = &data.error {
        status.push(Span::styled(text(e), bad()));
        status.push(Span::raw(" "));
    } else if let Some(m) = &view.message {
        let s = text(&m.text);
        status.push(if m.error {
            Span::styled(s, bad())
        } else {
            Span::raw(s)
        });
        status.push(Span::raw(" "));
    }
    if view.paused && data.playback.is_none() {
        status.push(Span::styled("paused ", bad()));
    }
    let (sort_i, desc) = view.sort();
    if view.local.is_some() {
        // The rows the query gave, in another order than its own.
        let s = view.flags.sort().unwrap_or("bytes");
        status.push(Span::raw(format!(
            "ordered on screen (query: sort {}) ",
            text(s)
        )));
    } else if sort_i.is_none() {
        let s = view.flags.sort().unwrap_or("bytes");
        status.push(Span::raw(format!("sort {} ", text(s))));
    }
    if view.frozen.is_some() {
        status.push(Span::styled("order frozen ", bad()));
    }
    if !view.back.is_empty() {
        status.push(Span::raw(format!(
            "drill-down {} (Esc: back) ",
            view.back.len()
        )));
    }
    lines.push(Line::from(status));

    // The table.
    let a = &data.answer;
    let rows = view::ordered(a, view);
    let mut cols: Vec<Col> = a
        .src_keys
        .iter()
        .map(|k| format!("SRC.{k}"))
        .chain(a.dst_keys.iter().map(|k| format!("DST.{k}")))
        .enumerate()
        .map(|(i, head)| Col {
            head: text(&head.to_uppercase()),
            tag: true,
            drop: 0,
            cells: rows
                .iter()
                .map(|r| {
                    if r.other {
                        "(other)".to_owned()
                    } else {
                        a.cells(r)[i]
                            .as_deref()
                            .map_or_else(|| "-".to_owned(), text)
                    }
                })
                .collect(),
        })
        .collect();
    cols.extend(metric_cols(&rows));
    // The column the rows are ordered by carries the direction.
    let marked = match view.local {
        Some((Local::Tag(i), d)) => Some((i, d)),
        Some((Local::Column(h), d)) => cols
            .iter()
            .position(|c| !c.tag && c.head == h)
            .map(|i| (i, d)),
        None => sort_i.and_then(|i| {
            let tags = cols.iter().filter(|c| c.tag).count();
            cols.iter()
                .position(|c| !c.tag && c.head == COLUMNS[i].0)
                .filter(|p| *p >= tags)
                .map(|p| (p, desc))
        }),
    };
    if let Some(c) = marked.and_then(|(i, d)| cols.get_mut(i).map(|c| (c, d))) {
        let (c, d) = c;
        c.head.push(if d { '▼' } else { '▲' });
        // The sort column stays as long as any does.
        c.drop = 0;
    }
    let (cols, widths) = fit_columns(cols, usize::from(area.width));
    let line_of = |cells: Vec<String>| -> String {
        cells
            .iter()
            .zip(&cols)
            .zip(&widths)
            .map(|((s, c), w)| pad(s, *w, !c.tag))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let header = line_of(cols.iter().map(|c| c.head.clone()).collect());
    lines.push(Line::from(Span::styled(
        header,
        Style::default().add_modifier(Modifier::UNDERLINED),
    )));
    let page = page_size(data, view, area.width, area.height);
    if data.pending {
        lines.push(Line::from(Span::styled("(asking…)", dim())));
    } else if rows.is_empty() {
        lines.push(Line::from(Span::styled("(no rows)", dim())));
    }
    for i in view.offset..(view.offset + page).min(rows.len()) {
        let l = line_of(cols.iter().map(|c| c.cells[i].clone()).collect());
        lines.push(if i == view.selected {
            Line::from(Span::styled(
                l,
                Style::default().add_modifier(Modifier::REVERSED),
            ))
        } else {
            Line::from(l)
        });
    }
    let body = Rect {
        height: area.height.saturating_sub(BELOW),
        ..area
    };
    f.render_widget(Paragraph::new(lines), body);

    // The last line: keys, or the line being edited.
    let foot = Rect {
        y: area.y + area.height.saturating_sub(1),
        height: area.height.min(1),
        ..area
    };
    let (foot_line, cursor) = match &view.mode {
        Mode::Filter(l) => edit_line("filter (Enter apply, Esc cancel): ", l, area.width),
        Mode::Export(l) => edit_line("export rows to (.csv or .jsonl): ", l, area.width),
        Mode::Group {
            src,
            dst,
            dst_field,
        } => {
            let (p, l) = if *dst_field {
                (
                    format!("group src: {} dst (Tab, Enter, Esc): ", text(&src.text)),
                    dst,
                )
            } else {
                ("group src (Tab: dst, Enter, Esc): ".to_owned(), src)
            };
            edit_line(&p, l, area.width)
        }
        _ => (
            Line::from(Span::styled(
                fit(
                    "?:help q:quit /:filter g:group s/r:sort Enter:drill f:freeze p:pause e:export",
                    usize::from(area.width),
                ),
                dim(),
            )),
            None,
        ),
    };
    f.render_widget(Paragraph::new(foot_line), foot);
    if let Some(x) = cursor {
        f.set_cursor_position((foot.x + x, foot.y));
    }
    if view.mode == Mode::Help {
        help(f, area, data.playback.is_some());
    }
}

fn edit_line(prompt: &str, l: &view::Line, w: u16) -> (Line<'static>, Option<u16>) {
    let shown = text(&l.text);
    let before: String = text(&l.text.chars().take(l.cursor).collect::<String>());
    let x = (width(prompt) + width(&before)).min(usize::from(w.saturating_sub(1)));
    (
        Line::from(vec![
            Span::styled(prompt.to_owned(), bad()),
            Span::raw(shown),
        ]),
        Some(x as u16),
    )
}

const HELP: &[(&str, &str)] = &[
    ("q, Ctrl-C", "quit"),
    ("/", "edit the filter (--where); a bad one shows the error"),
    ("g", "edit the group-by (--src, --dst); Tab switches end"),
    ("s S  r", "sort by the next/previous column; reverse"),
    ("↑ ↓ PgUp PgDn", "move; Home End: first, last row"),
    ("Enter", "the row's connections; Esc back"),
    ("f", "freeze the order of the rows"),
    ("p, space", "pause"),
    ("e", "export the rows (.jsonl or .csv)"),
];
const HELP_REPLAY: &[(&str, &str)] = &[
    (".", "step one frame (paused)"),
    ("+ -", "play faster, slower"),
    ("[ ]", "seek back, forward 5 %"),
    ("{ }", "start, end"),
];

fn help(f: &mut Frame, area: Rect, replay: bool) {
    let mut lines: Vec<Line> = HELP
        .iter()
        .chain(if replay { HELP_REPLAY } else { &[] })
        .map(|(k, what)| Line::from(format!("{k:<14} {what}")))
        .collect();
    lines.push(Line::from(Span::styled("any key closes this", dim())));
    let w = area.width.min(72);
    let h = (lines.len() as u16 + 2).min(area.height);
    let r = Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    };
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(" keys ")),
        r,
    );
}
