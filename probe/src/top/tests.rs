//! `top` without a terminal: screens drawn into ratatui's `TestBackend`
//! (goldens per fixture capture at 80×24 and 160×40), their numbers
//! against `flowprobe replay`'s table for the same flags, the agent's
//! answers against the local query, keys, hostile tag values, export.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::Parser;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use flowtable::query::origin;
use flowtable::{FlowTable, FrameStats};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

use super::model::{Answer, Data, Row};
use super::render::shell;
use super::replay::Player;
use super::view::{Effect, Mode, View};
use super::*;
use crate::cli::query_flags::QueryFlags;
use crate::export::agent;
use crate::export::print::{self as output, Format};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    q: QueryFlags,
}

fn flags(args: &[&str]) -> QueryFlags {
    Cli::try_parse_from([&["t"][..], args].concat()).unwrap().q
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The screen as text, one line per row, trailing blanks cut.
fn screen(data: &Data, view: &View, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    let mut v = view.clone();
    v.page = render::page_size(data, view, w, h);
    t.draw(|f| render::draw(f, data, &v)).unwrap();
    let buf = t.backend().buffer();
    let mut out = String::new();
    for y in 0..h {
        let mut line = String::new();
        for x in 0..w {
            line.push_str(buf[(x, y)].symbol());
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Cells of a table line: split at blanks, a rate's unit kept with its
/// number (`5.17 MB/s`).
fn cells(line: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in line.split_whitespace() {
        if w.ends_with("B/s") && !out.is_empty() {
            let last = out.last_mut().unwrap();
            last.push(' ');
            last.push_str(w);
        } else {
            out.push(w.trim_end_matches(['▼', '▲']).to_owned());
        }
    }
    out
}

/// A table as rows of header → cell, from its header line on (to the
/// first blank line).
fn table(lines: &[&str]) -> Vec<BTreeMap<String, String>> {
    let head = cells(lines[0]);
    lines[1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| head.iter().cloned().zip(cells(l)).collect())
        .collect()
}

/// The table part of a screen: from the line with `CONNS` on.
fn screen_table(s: &str) -> Vec<BTreeMap<String, String>> {
    let lines: Vec<&str> = s.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("CONNS"))
        .expect("a table header");
    table(&lines[at..])
}

/// A replay of `files` played to its end, as `top --replay` ends.
fn played(files: &[PathBuf], f: &QueryFlags) -> Data {
    let mut p = Player::open(files).unwrap();
    p.end();
    let mut data = replay_data(files, &p);
    refresh_replay(&mut data, &p, f);
    data
}

/// `flowprobe replay --format table` with these flags (what `main` does).
fn replay_table(files: &[PathBuf], f: &QueryFlags) -> String {
    let mut t = FlowTable::new();
    let mut stats = FrameStats::default();
    crate::sources::file::replay(files, &mut t, &mut stats, probe_common::Decap::DEFAULT).unwrap();
    let conns = t.connections();
    let mut out = Vec::new();
    let q = f.clone().spec().unwrap().run(&conns, origin(&conns));
    output::write_query(&mut out, Format::Table, &q).unwrap();
    String::from_utf8(out).unwrap()
}

/// Every cell on the screen equals the cell of the same column in
/// `flowprobe replay`'s table, row for row; returns how many were compared.
fn assert_same_numbers(screen: &str, table_text: &str) -> usize {
    let got = screen_table(screen);
    let want = table(&table_text.lines().collect::<Vec<_>>());
    assert_eq!(got.len(), want.len(), "rows\n{screen}\n{table_text}");
    let mut n = 0;
    for (g, w) in got.iter().zip(&want) {
        for (k, v) in g {
            // A tag cut to fit a narrow screen ends in `…`.
            if v.ends_with('…') {
                continue;
            }
            if let Some(wv) = w.get(k) {
                assert_eq!(v, wv, "column {k}\n{screen}\n{table_text}");
                n += 1;
            }
        }
    }
    n
}

fn captures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(root().join("fixtures/pcaps"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcap"))
        .collect();
    v.sort();
    v
}

/// Goldens at 80×24 and 160×40 for every fixture capture, played to the
/// end; the numbers on both screens equal `flowprobe replay`'s.
#[test]
fn fixture_screens() {
    let f = flags(&["--src", "ip", "--dst", "ip,port"]);
    for cap in captures() {
        let name = cap.file_stem().unwrap().to_string_lossy().into_owned();
        // Relative names, as a user in the repository would type them.
        let rel = PathBuf::from("fixtures/pcaps").join(cap.file_name().unwrap());
        let mut data = played(std::slice::from_ref(&cap), &f);
        data.source = format!("replay {}", rel.display());
        data.command = vec![
            "flowprobe".into(),
            "replay".into(),
            rel.display().to_string(),
        ];
        let view = View::new(f.clone());
        let want = replay_table(std::slice::from_ref(&cap), &f);
        let mut golden = String::new();
        for (w, h) in [(80, 24), (160, 40)] {
            let s = screen(&data, &view, w, h);
            assert!(assert_same_numbers(&s, &want) > 0, "{name} {w}x{h}");
            golden.push_str(&format!("=== {w}x{h}\n{s}"));
        }
        expect_test::expect_file![root().join(format!("fixtures/goldens/top/{name}.txt"))]
            .assert_eq(&golden);
    }
}

/// The default query, several files, and a narrow screen: columns go,
/// nothing wraps, the numbers left are still `flowprobe replay`'s.
#[test]
fn narrow_screens_drop_columns() {
    let files = vec![
        root().join("fixtures/pcaps/tcp4_loss.pcap"),
        root().join("fixtures/pcaps/tcp6_loss.pcap"),
    ];
    let f = flags(&[
        "--src",
        "ip/16,port",
        "--dst",
        "ip,port",
        "--raw-ports",
        "--top",
        "3",
    ]);
    let data = played(&files, &f);
    let want = replay_table(&files, &f);
    let view = View::new(f);
    let mut before = usize::MAX;
    for w in [200, 120, 80, 60, 40] {
        let s = screen(&data, &view, w, 24);
        for l in s.lines() {
            assert!(l.chars().count() <= usize::from(w), "{l}");
        }
        let head = screen_table(&s)[0].len();
        assert!(head <= before, "{w}: {head} columns, {before} before");
        before = head;
        assert_same_numbers(&s, &want);
    }
    // Tiny terminals draw what fits, the help too, and do not panic.
    let mut v = view.clone();
    for (w, h) in [(1, 1), (10, 3), (20, 8), (0, 0)] {
        screen(&data, &v, w, h);
        v.mode = Mode::Help;
        screen(&data, &v, w, h);
        v.mode = Mode::Table;
    }
}

/// Playing on its own clock: a paused replay has counted nothing, steps
/// count frame by frame, seeking back starts over, and the end is
/// `flowprobe replay`'s totals.
#[test]
fn replay_clock() {
    let files = vec![root().join("fixtures/pcaps/tcp4_loss.pcap")];
    let mut p = Player::open(&files).unwrap();
    assert_eq!(p.playback().frame, 0);
    p.step();
    assert!(p.playback().frame >= 1);
    let one = p.playback().frame;
    p.step();
    assert!(p.playback().frame > one);
    p.seek(0.5);
    let half = p.playback();
    assert!(half.frame > one && !half.done, "{half:?}");
    p.seek(-0.25);
    let back = p.playback();
    assert!(
        back.frame <= half.frame && back.at_s < half.at_s,
        "{back:?}"
    );
    p.seek(-1.0);
    let start = p.playback();
    assert!(start.frame < half.frame && start.at_s == 0.0, "{start:?}");
    p.advance(std::time::Duration::from_secs(10));
    assert!(p.done());
    let f = flags(&["--dst", "port"]);
    let mut data = replay_data(&files, &p);
    refresh_replay(&mut data, &p, &f);
    assert_same_numbers(
        &screen(&data, &View::new(f.clone()), 160, 40),
        &replay_table(&files, &f),
    );
    p.start();
    assert_eq!(p.playback().frame, 0);
    assert!(p.connections().is_empty());
}

/// Against an agent, `top` reads the rows `/query` serves: the same as
/// the query run here over the same connections.
#[test]
fn agent_answers_are_the_local_query() {
    let shared = agent::Latest::default();
    let addr = agent::start(
        "127.0.0.1:0".parse().unwrap(),
        shared.clone(),
        agent::MetricLabels::default(),
    )
    .unwrap();
    let conns = agent::tests::conns();
    shared.publish(agent::Snapshot {
        conns: conns.clone().into(),
        ..agent::Snapshot::default()
    });
    for args in [
        &["--src", "ip", "--dst", "port"][..],
        &["--dst", "port", "--sort", "conns:asc", "--top", "1"],
        &["--where", "dst.port = 443", "--src", "ip"],
    ] {
        let f = flags(args);
        let (rows, totals, health) = ask(addr, &f).unwrap();
        let (lrows, ltotals) = answer(&f, &conns).unwrap();
        assert_eq!(rows.rows, lrows.rows, "{args:?}");
        assert_eq!(rows.raw, lrows.raw, "{args:?}");
        assert_eq!(totals, ltotals, "{args:?}");
        assert_eq!(health.connections, 5);
    }
    let f = flags(&["--src", "ip"]);
    let (a, t, _) = ask(addr, &f).unwrap();
    let t = t.unwrap();
    assert_eq!((t.conns, t.sent.bytes), (5, 1500));
    assert_eq!(a.rows.len(), 2);

    // `/health` of a tc agent that lost packets: the header says where it
    // is attached, the table's fill and each refusal as /health counts it.
    use crate::sources::{AttachMode, EbpfHealth, Health as SourceHealth, Hook, TableHealth};
    shared.publish(agent::Snapshot {
        conns: conns.clone().into(),
        health: Some(SourceHealth::Ebpf(EbpfHealth {
            hook: Hook::Tc,
            attached: vec![("eth0".to_owned(), AttachMode::Clsact)],
            xdp_modes: Vec::new(),
            stats: FrameStats::default(),
            table: TableHealth {
                entries: 5,
                capacity: 64,
                full: 7,
                insert_failed: 0,
                contended: 2,
            },
            owners: None,
        })),
        ..agent::Snapshot::default()
    });
    let (answer, totals, health) = ask(addr, &f).unwrap();
    let data = Data {
        source: format!("agent {addr}"),
        command: vec!["flowprobe".into(), "query".into()],
        answer,
        totals,
        health,
        ..Data::default()
    };
    let s = screen(&data, &View::new(f), 100, 12);
    let lines: Vec<&str> = s.lines().collect();
    assert_eq!(
        lines[0],
        format!("flowprobe top · agent {addr} · tc · eth0(clsact)")
    );
    assert_eq!(
        lines[1],
        "total 5 conns  sent 1500  recv 5000  1.08 kB/s  retx 0/0  rtt -/- µs"
    );
    assert_eq!(
        lines[2],
        "5 connections · table 5/64 (7.8%) full 7 insert_failed 0 contended 2 tracked 0 skipped 0"
    );
}

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

fn typed(v: &mut View, data: &Data, s: &str) {
    for c in s.chars() {
        v.key(key(KeyCode::Char(c)), data);
    }
}

/// `/` with a bad filter keeps the editor, shows the parser's error and
/// puts the cursor on its column; a good one asks again. `g`, sort keys,
/// Enter and Esc change the query as the command line shows.
#[test]
fn keys_change_the_query() {
    let files = vec![root().join("fixtures/pcaps/tcp4_loss.pcap")];
    let f = flags(&["--src", "ip", "--dst", "port"]);
    let data = played(&files, &f);
    let mut v = View::new(f);

    v.key(key(KeyCode::Char('/')), &data);
    typed(&mut v, &data, "dst.port = 5001 or x");
    assert_eq!(v.key(key(KeyCode::Enter), &data), Effect::None);
    let msg = v.message.clone().unwrap();
    assert!(
        msg.error && msg.text.contains("at column 17 (`or`)"),
        "{msg:?}"
    );
    assert!(
        matches!(&v.mode, Mode::Filter(l) if l.cursor == 16),
        "{:?}",
        v.mode
    );
    let s = screen(&data, &v, 120, 24);
    assert!(
        s.contains("expected `and` between conditions at column 17"),
        "{s}"
    );
    // Esc then `s` typed fast arrive as Alt-s: cancel, then sort.
    let mut w = v.clone();
    assert_eq!(
        w.key(KeyEvent::new(KeyCode::Char('s'), KeyModifiers::ALT), &data),
        Effect::Query
    );
    assert_eq!((w.mode, w.flags.sort()), (Mode::Table, Some("conns")));
    v.key(
        KeyEvent::new(KeyCode::Char('u'), KeyModifiers::CONTROL),
        &data,
    );
    typed(&mut v, &data, "dst.port = 5001");
    assert_eq!(v.key(key(KeyCode::Enter), &data), Effect::Query);
    assert_eq!(v.flags.wheres(), ["dst.port = 5001"]);
    assert_eq!(v.mode, Mode::Table);

    v.key(key(KeyCode::Char('g')), &data);
    assert!(
        matches!(&v.mode, Mode::Group { src, dst, .. } if src.text == "ip" && dst.text == "port")
    );
    typed(&mut v, &data, "/24");
    v.key(key(KeyCode::Tab), &data);
    typed(&mut v, &data, ",proto");
    assert_eq!(v.key(key(KeyCode::Enter), &data), Effect::Query);
    assert_eq!(
        shell(&v.flags.args()),
        "--src ip/24 --dst port,proto --where 'dst.port = 5001'"
    );

    assert_eq!(v.key(key(KeyCode::Char('s')), &data), Effect::Query);
    assert_eq!(v.flags.sort(), Some("conns"));
    v.key(key(KeyCode::Char('s')), &data);
    v.key(key(KeyCode::Char('r')), &data);
    assert_eq!(v.flags.sort(), Some("sent_bytes:asc"));
    v.key(key(KeyCode::Char('S')), &data);
    assert_eq!(v.flags.sort(), Some("conns:asc"));

    // Drill into the first row of `--src ip --dst port`, then back.
    let f = flags(&["--src", "ip", "--dst", "port", "--top", "1"]);
    let data = played(&files, &f);
    let mut v = View::new(f.clone());
    assert_eq!(v.key(key(KeyCode::Enter), &data), Effect::Query);
    assert_eq!(
        shell(&v.flags.args()),
        "--src ip,port --dst ip,port --where 'src.ip = 10.77.0.1 and dst.port = 5001' --raw-ports"
    );
    let drilled = played(&files, &v.flags);
    assert_eq!(drilled.answer.rows.len(), 3);
    assert_eq!(
        drilled.totals.as_ref().unwrap().conns,
        data.answer.rows[0].conns
    );
    assert_eq!(
        drilled.totals.as_ref().unwrap().sent,
        data.answer.rows[0].sent
    );
    // The `other` row has nothing to drill into.
    let mut o = View::new(f.clone());
    o.selected = 1;
    assert_eq!(o.key(key(KeyCode::Enter), &data), Effect::None);
    assert_eq!(v.key(key(KeyCode::Esc), &drilled), Effect::Query);
    assert_eq!(v.flags, f);
    // Esc then q typed fast (Alt-q): back, then quit.
    v.key(key(KeyCode::Enter), &data);
    assert_ne!(v.flags, f);
    assert_eq!(
        v.key(
            KeyEvent::new(KeyCode::Char('q'), KeyModifiers::ALT),
            &drilled
        ),
        Effect::Quit
    );
    assert_eq!(v.flags, f);

    // Freeze: the order stays when the sort changes underneath.
    let f = flags(&["--src", "ip", "--dst", "port"]);
    let data = played(&files, &f);
    let mut v = View::new(f.clone());
    v.key(key(KeyCode::Char('f')), &data);
    let asc = played(
        &files,
        &flags(&["--src", "ip", "--dst", "port", "--sort", "bytes:asc"]),
    );
    let order: Vec<u64> = view::ordered(&asc.answer, &v)
        .iter()
        .map(|r| r.conns)
        .collect();
    assert_eq!(order, [3, 1]);
    assert!(screen(&asc, &v, 80, 24).contains("order frozen"));
    assert_eq!(v.key(key(KeyCode::Char('q')), &data), Effect::Quit);
}

#[test]
fn drill_clauses() {
    use super::view::drill_clause;
    assert_eq!(
        drill_clause("src", "ip/24", Some("10.0.0.0/24")).unwrap(),
        "src.ip in 10.0.0.0/24"
    );
    assert_eq!(drill_clause("src", "port", Some("ephemeral")), None);
    assert_eq!(
        drill_clause("dst", "port", Some("80")).unwrap(),
        "dst.port = 80"
    );
    assert_eq!(
        drill_clause("dst", "service", None).unwrap(),
        "dst.service = \"\""
    );
    assert_eq!(
        drill_clause("dst", "service", Some("and")).unwrap(),
        "dst.service = \"and\""
    );
    let c = drill_clause("src", "process", Some("a\"b\\c")).unwrap();
    assert_eq!(c, r#"src.process = "a\"b\\c""#);
    // Each parses and selects exactly that value.
    for c in [
        c,
        drill_clause("src", "ip/24", Some("10.0.0.0/24")).unwrap(),
    ] {
        flowtable::query::Filter::parse(&c).unwrap();
    }
}

/// Tag values a process chose (its name, command line, environment)
/// reach the terminal as text: no control character, no escape sequence,
/// no bidirectional override in any cell; the characters shown say what
/// the bytes were.
#[test]
fn hostile_values_are_text() {
    let evil = [
        "\u{1b}[2J\u{1b}[31mred",
        "bell\u{7}\rover",
        "osc\u{1b}]0;title\u{7}",
        "\u{9b}31m c1",
        "rtl\u{202e}txt",
        "new\nline\ttab\\",
    ];
    let mut rows = Vec::new();
    let mut raw = Vec::new();
    for (i, e) in evil.iter().enumerate() {
        let v = serde_json::json!({
            "src": {"process": e}, "dst": {"service": format!("svc{i}")},
            "conns": 1, "sent": {"bytes": 10}, "received": {"bytes": 5},
            "seconds": 1.0, "bandwidth_bytes_per_s": 15.0
        });
        rows.push(serde_json::from_value::<Row>(v.clone()).unwrap());
        raw.push(v);
    }
    let data = Data {
        source: "agent 127.0.0.1:9911".into(),
        command: vec!["flowprobe".into(), "query".into()],
        answer: Answer {
            src_keys: vec!["process".into()],
            dst_keys: vec!["service".into()],
            rows,
            raw,
        },
        error: Some("agent said \u{1b}[5mblink".into()),
        ..Data::default()
    };
    let mut view = View::new(flags(&[
        "--src",
        "process",
        "--dst",
        "service",
        "--where",
        "src.process ~ \"\u{1b}*\"",
    ]));
    for (w, h) in [(80, 24), (160, 40)] {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        view.page = render::page_size(&data, &view, w, h);
        t.draw(|f| render::draw(f, &data, &view)).unwrap();
        for c in t.backend().buffer().content() {
            for ch in c.symbol().chars() {
                assert!(
                    !ch.is_control() && !matches!(ch as u32, 0x202a..=0x202e | 0x2066..=0x2069),
                    "{ch:?} reached the terminal"
                );
            }
        }
    }
    let s = screen(&data, &view, 160, 40);
    for shown in [
        r"\x1b[2J\x1b[31mred",
        r"bell\x07\x0dover",
        r"osc\x1b]0;title\x07",
        r"\x9b31m c1",
        r"rtl\u{202e}txt",
        r"new\x0aline\x09tab\\",
        r"agent said \x1b[5mblink",
        r#"--where 'src.process ~ "\x1b*"'"#,
    ] {
        assert!(s.contains(shown), "{shown} not on\n{s}");
    }
    // The editor shows what is typed the same way.
    view.key(key(KeyCode::Char('/')), &data);
    let s = screen(&data, &view, 160, 40);
    assert!(
        s.contains(r#"filter (Enter apply, Esc cancel): src.process ~ "\x1b*""#),
        "{s}"
    );
}

#[test]
fn export_rows() {
    let files = vec![root().join("fixtures/pcaps/tcp4_loss.pcap")];
    let f = flags(&["--src", "ip", "--dst", "port"]);
    let data = played(&files, &f);
    let dir = tempfile::tempdir().unwrap();
    let (j, c) = (dir.path().join("rows.jsonl"), dir.path().join("rows.csv"));
    export::write(&j, &data.answer, &[0, 1]).unwrap();
    export::write(&c, &data.answer, &[1, 0]).unwrap();
    // JSON lines: `flowprobe replay --format json` with the same flags.
    let mut t = FlowTable::new();
    let mut stats = FrameStats::default();
    crate::sources::file::replay(&files, &mut t, &mut stats, probe_common::Decap::DEFAULT).unwrap();
    let conns = t.connections();
    let mut want = Vec::new();
    output::write_query(
        &mut want,
        Format::Json,
        &f.clone().spec().unwrap().run(&conns, origin(&conns)),
    )
    .unwrap();
    let got = std::fs::read_to_string(&j).unwrap();
    let norm = |s: &str| -> Vec<serde_json::Value> {
        s.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    assert_eq!(norm(&got), norm(std::str::from_utf8(&want).unwrap()));
    let csv = std::fs::read_to_string(&c).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("src.ip,dst.port,other,conns,sent.packets,sent.bytes,sent.l3_bytes,"),
        "{}",
        lines[0]
    );
    // The same file the agent's `/query.csv` gives for these rows.
    let raw: Vec<&serde_json::Value> = [1, 0].iter().map(|&i| &data.answer.raw[i]).collect();
    assert_eq!(csv, crate::export::csv::rows(&["ip"], &["port"], raw));
    assert!(
        lines[1].starts_with("10.77.0.1,5002,,1,20,14388,"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].starts_with("10.77.0.1,5001,,3,600,636304,"),
        "{}",
        lines[2]
    );
    assert_eq!(lines.len(), 3);
}

#[test]
fn shell_quoting() {
    let a: Vec<String> = ["--where", "a = 'b'", "--src", "ip/24", ""]
        .map(String::from)
        .to_vec();
    assert_eq!(shell(&a), r#"--where 'a = '\''b'\''' --src ip/24 ''"#);
}

/// A command longer than the screen wraps at blanks, each line within the
/// width, and reads back whole.
#[test]
fn long_commands_wrap() {
    let f = flags(&[
        "--src",
        "ip,port",
        "--dst",
        "ip,port",
        "--where",
        "src.ip in 10.0.0.0/8 and dst.port in (80, 443, 8080) and dst.service ~ \"web*\"",
        "--sort",
        "retransmits",
    ]);
    let data = Data {
        command: ["flowprobe", "query", "--agent", "127.0.0.1:9911"]
            .map(String::from)
            .to_vec(),
        ..Data::default()
    };
    let view = View::new(f.clone());
    let lines = render::command_lines(&data, &view, 60);
    assert!(lines.len() > 1, "{lines:?}");
    for l in &lines {
        assert!(l.chars().count() <= 60, "{l}");
    }
    let mut joined = lines[0].clone();
    for l in &lines[1..] {
        joined.push(' ');
        joined.push_str(l.strip_prefix("  ").unwrap());
    }
    let mut want = data.command.clone();
    want.extend(f.args());
    assert_eq!(joined, format!("$ {}", shell(&want)));
    // On the screen, and the table below it.
    let s = screen(&data, &view, 60, 24);
    for l in &lines {
        assert!(s.contains(l.as_str()), "{l}\n{s}");
    }
    assert!(s.contains("(no rows)"), "{s}");
}

/// Columns the query cannot sort by (the group-by ones, `RETX%`,
/// `SECONDS`) order the rows on the screen; the others go through
/// `--sort`. Every column is reached by `s`/`S`.
#[test]
fn every_column_sorts() {
    let files = vec![root().join("fixtures/pcaps/tcp4_loss.pcap")];
    let f = flags(&["--src", "ip", "--dst", "port"]);
    let data = played(&files, &f);
    let mut v = View::new(f.clone());
    // The headers after the group-by are view::COLUMNS, in order.
    let s = screen(&data, &v, 200, 24);
    let head: Vec<String> = cells(s.lines().find(|l| l.contains("CONNS")).unwrap());
    let want: Vec<&str> = view::COLUMNS.iter().map(|(h, _)| *h).collect();
    assert_eq!(head[2..], want[..]);
    let ports = |v: &View| -> Vec<String> {
        view::ordered(&data.answer, v)
            .iter()
            .map(|r| r.dst["port"].clone().unwrap())
            .collect()
    };

    // Backwards from `bytes`: SECONDS, on the screen, longest first.
    assert_eq!(v.key(key(KeyCode::Char('S')), &data), Effect::None);
    assert_eq!(v.local, Some((view::Local::Column("SECONDS"), true)));
    assert_eq!(v.flags, f, "the query is unchanged");
    assert_eq!(ports(&v), ["5001", "5002"]);
    let s = screen(&data, &v, 200, 24);
    assert!(
        s.contains("SECONDS▼") && s.contains("ordered on screen (query: sort bytes)"),
        "{s}"
    );
    v.key(key(KeyCode::Char('r')), &data);
    assert_eq!(ports(&v), ["5002", "5001"]);
    // Then RECV_PKTS through the query, ascending as the order was.
    assert_eq!(v.key(key(KeyCode::Char('S')), &data), Effect::Query);
    assert_eq!(
        (v.local, v.flags.sort()),
        (None, Some("received_packets:asc"))
    );
    // From CONNS backwards: the last group-by column, numbers as numbers.
    let mut v = View::new(flags(&["--src", "ip", "--dst", "port", "--sort", "conns"]));
    v.key(key(KeyCode::Char('S')), &data);
    assert_eq!(v.local, Some((view::Local::Tag(1), true)));
    assert_eq!(ports(&v), ["5002", "5001"]);
    assert!(screen(&data, &v, 200, 24).contains("DST.PORT▼"));
    // RETX%: 5.2 % before 0.0 %.
    let mut v = View::new(flags(&[
        "--src",
        "ip",
        "--dst",
        "port",
        "--sort",
        "received_retransmits",
    ]));
    v.key(key(KeyCode::Char('s')), &data);
    assert_eq!(v.local, Some((view::Local::Column("RETX%"), true)));
    assert_eq!(ports(&v), ["5001", "5002"]);
    // A new group-by drops an order by a group-by column.
    let mut v = View::new(f);
    v.local = Some((view::Local::Tag(0), true));
    v.key(key(KeyCode::Char('g')), &data);
    typed(&mut v, &data, "/24");
    v.key(key(KeyCode::Enter), &data);
    assert_eq!(v.local, None);
}

/// A flag of the query reaches the agent's URL, the command shown and
/// the totals' query without `top` knowing it (`--last`, for one).
#[test]
fn query_flags_pass_through() {
    let f = flags(&["--dst", "port", "--last", "5m", "--top", "3"]);
    assert_eq!(shell(&f.args()), "--dst port --top 3 --last 5m");
    assert_eq!(f.params(), "dst=port&top=3&last=5m");
    assert_eq!(f.totals().params(), "src=&dst=&last=5m");
    // top --replay refuses it, as replay does.
    let err = run(
        Target::Replay(vec![root().join("fixtures/pcaps/tcp4_loss.pcap")]),
        f,
        std::time::Duration::from_secs(1),
        1.0,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--last is answered by a running agent"),
        "{err}"
    );
}
