//! The view state of `top` and what each key does to it. Input handling
//! only: drawing is [`super::render`], fetching is the loop's.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::model::{Answer, Data, Row};
use crate::cli::query_flags::QueryFlags;

/// The columns after the group-by ones, in screen order: (header, its
/// `--sort` metric). The renderer draws these headers in this order. A
/// column without a metric of the query engine (`RETX%`, `SECONDS`), like
/// a group-by column, is ordered here, on the screen only ([`Local`]).
pub const COLUMNS: &[(&str, Option<&str>)] = &[
    ("CONNS", Some("conns")),
    ("SENT_BYTES", Some("sent_bytes")),
    ("RECV_BYTES", Some("received_bytes")),
    ("BANDWIDTH", Some("bandwidth")),
    ("S_RETX", Some("sent_retransmits")),
    ("R_RETX", Some("received_retransmits")),
    ("RETX%", None),
    ("RTT_P50_US", Some("rtt_p50")),
    ("RTT_P99_US", Some("rtt_p99")),
    ("SENT_PKTS", Some("sent_packets")),
    ("RECV_PKTS", Some("received_packets")),
    ("SECONDS", None),
];

/// An order the query cannot give: by a group-by column (its index among
/// them) or by a column of [`COLUMNS`] without a metric; the rows the
/// query returned, reordered on the screen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Local {
    Tag(usize),
    Column(&'static str),
}

/// A line being edited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    /// Cursor, in characters.
    pub cursor: usize,
}

impl Line {
    pub fn new(text: &str) -> Line {
        Line {
            text: text.to_owned(),
            cursor: text.chars().count(),
        }
    }

    fn byte(&self, c: usize) -> usize {
        self.text
            .char_indices()
            .nth(c)
            .map_or(self.text.len(), |(i, _)| i)
    }

    /// Edits the line; `false` for a key that is not an edit.
    fn key(&mut self, k: KeyEvent) -> bool {
        let n = self.text.chars().count();
        match k.code {
            KeyCode::Char('u') if k.modifiers.contains(KeyModifiers::CONTROL) => {
                self.text.clear();
                self.cursor = 0;
            }
            KeyCode::Char(c) if !k.modifiers.contains(KeyModifiers::CONTROL) => {
                let at = self.byte(self.cursor);
                self.text.insert(at, c);
                self.cursor += 1;
            }
            KeyCode::Backspace if self.cursor > 0 => {
                self.cursor -= 1;
                let at = self.byte(self.cursor);
                self.text.remove(at);
            }
            KeyCode::Delete if self.cursor < n => {
                let at = self.byte(self.cursor);
                self.text.remove(at);
            }
            KeyCode::Left => self.cursor = self.cursor.saturating_sub(1),
            KeyCode::Right => self.cursor = (self.cursor + 1).min(n),
            KeyCode::Home => self.cursor = 0,
            KeyCode::End => self.cursor = n,
            _ => return false,
        }
        true
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Table,
    Help,
    /// `/`: the filter, all `--where` clauses joined with `and`.
    Filter(Line),
    /// `g`: the group-by keys of both ends; `dst_field` is the one edited.
    Group {
        src: Line,
        dst: Line,
        dst_field: bool,
    },
    /// `e`: the file to write the rows to (`.csv`: CSV, else JSON lines).
    Export(Line),
}

/// A message under the header: an error (a bad filter, a failed export) or
/// what a key did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub error: bool,
    pub text: String,
}

/// Replay controls (ignored against an agent).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Play {
    Step,
    Faster,
    Slower,
    /// Seek by this fraction of the capture's length.
    Seek(f64),
    Start,
    End,
}

/// What the loop must do after a key.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    None,
    /// The query changed: ask again now.
    Query,
    Quit,
    Export(String),
    Play(Play),
}

/// Everything about the screen that is not data.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// The active query.
    pub flags: QueryFlags,
    /// Drill-down history: the queries (and selected rows) to go back to.
    pub back: Vec<(QueryFlags, usize)>,
    pub selected: usize,
    /// First row shown.
    pub offset: usize,
    /// Rows that fit on the screen (set by the renderer's caller).
    pub page: usize,
    pub paused: bool,
    /// Freeze order: the row keys in the order they had when frozen.
    pub frozen: Option<Vec<Vec<Option<String>>>>,
    /// Ordered on the screen by a column the query cannot sort by
    /// (descending when true); `None`: the query's order.
    pub local: Option<(Local, bool)>,
    pub mode: Mode,
    pub message: Option<Message>,
}

impl View {
    pub fn new(flags: QueryFlags) -> View {
        View {
            flags,
            page: 10,
            ..View::default()
        }
    }

    fn say(&mut self, error: bool, text: impl Into<String>) {
        self.message = Some(Message {
            error,
            text: text.into(),
        });
    }

    /// The query's sort as (index into [`COLUMNS`], descending); no index
    /// for `bytes`, the default, which has no column of its own.
    pub fn sort(&self) -> (Option<usize>, bool) {
        let s = self.flags.sort().unwrap_or("bytes");
        let (m, desc) = match s.strip_suffix(":asc") {
            Some(m) => (m, false),
            None => (s.strip_suffix(":desc").unwrap_or(s), true),
        };
        (COLUMNS.iter().position(|(_, x)| *x == Some(m)), desc)
    }

    /// The sort on the screen as a position among all columns (group-by
    /// ones first, `tags` of them) and its direction.
    fn position(&self, tags: usize) -> (Option<usize>, bool) {
        match self.local {
            Some((Local::Tag(i), d)) => (Some(i), d),
            Some((Local::Column(h), d)) => (
                COLUMNS.iter().position(|(x, _)| *x == h).map(|i| tags + i),
                d,
            ),
            None => {
                let (i, d) = self.sort();
                (i.map(|i| tags + i), d)
            }
        }
    }

    /// Sorts by the column at `p` (as in [`View::position`]): through the
    /// query when it has a metric, else on the screen.
    fn sort_by(&mut self, p: usize, tags: usize, desc: bool) -> Effect {
        if p < tags {
            self.local = Some((Local::Tag(p), desc));
            return Effect::None;
        }
        let (head, metric) = COLUMNS[p - tags];
        let Some(m) = metric else {
            self.local = Some((Local::Column(head), desc));
            return Effect::None;
        };
        self.local = None;
        let mut flags = self.flags.clone();
        flags.set_sort(Some(if desc {
            m.to_owned()
        } else {
            format!("{m}:asc")
        }));
        self.requery(flags)
    }

    /// Handles one key; `data` is what is on the screen (for Enter and the
    /// row count).
    pub fn key(&mut self, k: KeyEvent, data: &Data) -> Effect {
        if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
            return Effect::Quit;
        }
        // A terminal sends Esc as the byte that also starts Alt-key
        // sequences: Esc and a key typed right after it arrive as Alt-key.
        // No key here is an Alt-key, so it is Esc, then the key.
        if k.modifiers.contains(KeyModifiers::ALT) {
            let esc = self.key(KeyEvent::new(KeyCode::Esc, KeyModifiers::NONE), data);
            let plain = KeyEvent::new(k.code, k.modifiers - KeyModifiers::ALT);
            return match self.key(plain, data) {
                Effect::None => esc,
                e => e,
            };
        }
        match std::mem::take(&mut self.mode) {
            Mode::Table => self.table_key(k, data),
            Mode::Help => Effect::None,
            Mode::Filter(mut line) => match k.code {
                KeyCode::Esc => Effect::None,
                KeyCode::Enter => {
                    let text = line.text.trim().to_owned();
                    let mut flags = self.flags.clone();
                    flags.set_wheres(if text.is_empty() {
                        Vec::new()
                    } else {
                        vec![text]
                    });
                    match flags.clone().spec() {
                        Ok(_) => self.requery(flags),
                        Err(e) => {
                            if let flowtable::query::QueryError::Filter(f) = &e {
                                // The parser's column is 1-based, in characters
                                // of the trimmed text.
                                let lead =
                                    line.text.chars().take_while(|c| c.is_whitespace()).count();
                                line.cursor = (lead + f.column - 1).min(line.text.chars().count());
                            }
                            self.say(true, e.to_string());
                            self.mode = Mode::Filter(line);
                            Effect::None
                        }
                    }
                }
                _ => {
                    line.key(k);
                    self.mode = Mode::Filter(line);
                    Effect::None
                }
            },
            Mode::Group {
                mut src,
                mut dst,
                dst_field,
            } => match k.code {
                KeyCode::Esc => Effect::None,
                KeyCode::Tab | KeyCode::BackTab => {
                    self.mode = Mode::Group {
                        src,
                        dst,
                        dst_field: !dst_field,
                    };
                    Effect::None
                }
                KeyCode::Enter => {
                    let mut flags = self.flags.clone();
                    flags.set_group(
                        Some(src.text.trim().to_owned()),
                        Some(dst.text.trim().to_owned()),
                    );
                    match flags.clone().spec() {
                        Ok(_) => self.requery(flags),
                        Err(e) => {
                            self.say(true, e.to_string());
                            self.mode = Mode::Group {
                                src,
                                dst,
                                dst_field,
                            };
                            Effect::None
                        }
                    }
                }
                _ => {
                    if dst_field {
                        dst.key(k);
                    } else {
                        src.key(k);
                    }
                    self.mode = Mode::Group {
                        src,
                        dst,
                        dst_field,
                    };
                    Effect::None
                }
            },
            Mode::Export(mut line) => match k.code {
                KeyCode::Esc => Effect::None,
                KeyCode::Enter if !line.text.trim().is_empty() => {
                    Effect::Export(line.text.trim().to_owned())
                }
                _ => {
                    line.key(k);
                    self.mode = Mode::Export(line);
                    Effect::None
                }
            },
        }
    }

    /// A new query: rows start at the top again.
    fn requery(&mut self, flags: QueryFlags) -> Effect {
        let keys = |f: &QueryFlags| f.clone().spec().ok().map(|q| (q.src, q.dst));
        if keys(&flags) != keys(&self.flags) {
            self.local = None;
        }
        self.flags = flags;
        self.selected = 0;
        self.offset = 0;
        self.frozen = None;
        self.message = None;
        Effect::Query
    }

    fn table_key(&mut self, k: KeyEvent, data: &Data) -> Effect {
        let n = data.answer.rows.len();
        let page = self.page.max(1);
        match k.code {
            KeyCode::Char('q') => return Effect::Quit,
            KeyCode::Char('?') | KeyCode::F(1) => self.mode = Mode::Help,
            KeyCode::Char('/') => {
                self.mode = Mode::Filter(Line::new(&self.flags.wheres().join(" and ")));
            }
            KeyCode::Char('g') => {
                let (s, d) = match self.flags.clone().spec() {
                    Ok(q) => (join(&q.src), join(&q.dst)),
                    Err(_) => Default::default(),
                };
                self.mode = Mode::Group {
                    src: Line::new(&s),
                    dst: Line::new(&d),
                    dst_field: false,
                };
            }
            KeyCode::Char('e') => self.mode = Mode::Export(Line::new("flowprobe-top.jsonl")),
            KeyCode::Char('s') | KeyCode::Char('S') | KeyCode::Char('>') | KeyCode::Char('<') => {
                let fwd = matches!(k.code, KeyCode::Char('s') | KeyCode::Char('>'));
                let tags = data.answer.src_keys.len() + data.answer.dst_keys.len();
                let n = tags + COLUMNS.len();
                let (p, desc) = self.position(tags);
                let next = match (p, fwd) {
                    (None, true) => tags,
                    (None, false) => n - 1,
                    (Some(p), true) => (p + 1) % n,
                    (Some(p), false) => (p + n - 1) % n,
                };
                return self.sort_by(next, tags, desc);
            }
            KeyCode::Char('r') => {
                if let Some((l, d)) = self.local {
                    self.local = Some((l, !d));
                    return Effect::None;
                }
                let (i, desc) = self.sort();
                let mut flags = self.flags.clone();
                flags.set_sort(Some(match i {
                    Some(i) => {
                        let m = COLUMNS[i].1.expect("a query sort has a metric");
                        if desc {
                            format!("{m}:asc")
                        } else {
                            m.to_owned()
                        }
                    }
                    // `bytes`, the default, has no column of its own.
                    None => if desc { "bytes:asc" } else { "bytes" }.to_owned(),
                }));
                return self.requery(flags);
            }
            KeyCode::Char('p') | KeyCode::Char(' ') => {
                self.paused = !self.paused;
            }
            KeyCode::Char('f') => {
                self.frozen = match self.frozen {
                    Some(_) => None,
                    None => Some(
                        data.answer
                            .rows
                            .iter()
                            .map(|r| data.answer.cells(r))
                            .collect(),
                    ),
                };
            }
            KeyCode::Down | KeyCode::Char('j') => {
                self.selected = (self.selected + 1).min(n.saturating_sub(1))
            }
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::PageDown => self.selected = (self.selected + page).min(n.saturating_sub(1)),
            KeyCode::PageUp => self.selected = self.selected.saturating_sub(page),
            KeyCode::Home => self.selected = 0,
            KeyCode::End => self.selected = n.saturating_sub(1),
            KeyCode::Enter => return self.drill(data),
            KeyCode::Esc | KeyCode::Backspace => {
                if let Some((flags, sel)) = self.back.pop() {
                    let e = self.requery(flags);
                    self.selected = sel;
                    return e;
                }
            }
            KeyCode::Char('.') => return Effect::Play(Play::Step),
            KeyCode::Char('+') | KeyCode::Char('=') => return Effect::Play(Play::Faster),
            KeyCode::Char('-') => return Effect::Play(Play::Slower),
            KeyCode::Char('[') => return Effect::Play(Play::Seek(-0.05)),
            KeyCode::Char(']') => return Effect::Play(Play::Seek(0.05)),
            KeyCode::Char('{') => return Effect::Play(Play::Start),
            KeyCode::Char('}') => return Effect::Play(Play::End),
            _ => {}
        }
        self.scroll();
        Effect::None
    }

    /// Keeps the selection on the screen.
    pub fn scroll(&mut self) {
        let page = self.page.max(1);
        if self.selected < self.offset {
            self.offset = self.selected;
        } else if self.selected >= self.offset + page {
            self.offset = self.selected + 1 - page;
        }
    }

    /// Enter: the selected row's connections, as a query whose filter is
    /// the row's tag values, one row per connection (both ends' address
    /// and port, ports as they are).
    fn drill(&mut self, data: &Data) -> Effect {
        let rows = ordered(&data.answer, self);
        let Some(row) = rows.get(self.selected) else {
            return Effect::None;
        };
        if row.other {
            self.say(
                false,
                "the (other) row sums the rows after --top: nothing to drill into",
            );
            return Effect::None;
        }
        let mut clauses = Vec::new();
        let mut loose = Vec::new();
        let q = &data.answer;
        for (side, keys, vals) in [
            ("src", &q.src_keys, &row.src),
            ("dst", &q.dst_keys, &row.dst),
        ] {
            for k in keys {
                let v = vals.get(k).cloned().flatten();
                match drill_clause(side, k, v.as_deref()) {
                    Some(c) => clauses.push(c),
                    None => loose.push(format!("{side}.{k}")),
                }
            }
        }
        let mut wheres = self.flags.wheres().to_vec();
        if !clauses.is_empty() {
            wheres.push(clauses.join(" and "));
        }
        let mut flags = self.flags.clone();
        flags.set_wheres(wheres);
        flags.set_group(Some("ip,port".to_owned()), Some("ip,port".to_owned()));
        flags.set_raw_ports(true);
        flags.set_top(None);
        self.back.push((self.flags.clone(), self.selected));
        let e = self.requery(flags);
        if !loose.is_empty() {
            self.say(
                false,
                format!(
                    "{} = ephemeral is no filter: connections from every port (Esc: back)",
                    loose.join(", ")
                ),
            );
        }
        e
    }
}

fn join(keys: &[flowtable::query::TagKey]) -> String {
    keys.iter()
        .map(|k| k.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The `--where` clause that selects a row's value of `side.key`; `None`
/// for the initiator's `ephemeral` port group, which the filter cannot
/// say (ports compare raw). An end without the tag compares as "".
pub fn drill_clause(side: &str, key: &str, value: Option<&str>) -> Option<String> {
    let quote = |v: &str| {
        let word = !v.is_empty()
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:-_/".contains(c))
            && !["and", "in", "not"]
                .iter()
                .any(|k| v.eq_ignore_ascii_case(k));
        if word {
            v.to_owned()
        } else {
            format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
        }
    };
    if key.starts_with("ip/") {
        // The value is the network itself.
        return Some(match value {
            Some(v) => format!("{side}.ip in {v}"),
            None => format!("{side}.{key} = \"\""),
        });
    }
    match (key, value) {
        ("port", Some(flowtable::query::EPHEMERAL)) => None,
        (_, v) => Some(format!("{side}.{key} = {}", quote(v.unwrap_or("")))),
    }
}

/// The rows in the order shown: the query's; with the order frozen, the
/// rows known when it was frozen first, in that order, then new ones;
/// with a [`Local`] order, by that column (a missing value last either
/// way, the `other` row last).
pub fn ordered<'a>(a: &'a Answer, view: &View) -> Vec<&'a Row> {
    let mut rows: Vec<&Row> = a.rows.iter().collect();
    if let Some(order) = &view.frozen {
        let rank = |r: &Row| {
            if r.other {
                return usize::MAX;
            }
            let cells = a.cells(r);
            order
                .iter()
                .position(|k| *k == cells)
                .unwrap_or(order.len())
        };
        rows.sort_by_key(|r| rank(r));
    } else if let Some((by, desc)) = view.local {
        rows.sort_by(|x, y| {
            let (kx, ky) = (local_key(a, x, by), local_key(a, y, by));
            x.other.cmp(&y.other).then_with(|| match (kx, ky) {
                (Some(p), Some(q)) => {
                    let o = cmp_key(&p, &q);
                    if desc {
                        o.reverse()
                    } else {
                        o
                    }
                }
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            })
        });
    }
    rows
}

/// A value to order rows by: numbers as numbers, addresses and networks
/// as addresses, anything else as text (in that order when they mix).
#[derive(Clone, Debug, PartialEq)]
enum Key {
    Num(f64),
    Addr(std::net::IpAddr, u8),
    Text(String),
}

fn cmp_key(a: &Key, b: &Key) -> std::cmp::Ordering {
    let rank = |k: &Key| match k {
        Key::Num(_) => 0,
        Key::Addr(..) => 1,
        Key::Text(_) => 2,
    };
    match (a, b) {
        (Key::Num(x), Key::Num(y)) => x.total_cmp(y),
        (Key::Addr(x, l), Key::Addr(y, m)) => (x, l).cmp(&(y, m)),
        (Key::Text(x), Key::Text(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)),
    }
}

fn local_key(a: &Answer, r: &Row, by: Local) -> Option<Key> {
    match by {
        Local::Tag(i) => {
            let v = a.cells(r).get(i).cloned().flatten()?;
            let (addr, len) = v.split_once('/').unwrap_or((&v, ""));
            Some(if let Ok(n) = v.parse::<f64>() {
                Key::Num(n)
            } else if let Ok(ip) = addr.parse() {
                Key::Addr(ip, len.parse().unwrap_or(128))
            } else {
                Key::Text(v)
            })
        }
        Local::Column("SECONDS") => Some(Key::Num(r.seconds)),
        Local::Column(_) => super::render::retx_ratio(r).map(Key::Num),
    }
}
