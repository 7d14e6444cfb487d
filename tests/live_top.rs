//! `flowprobe top --agent` in a tmux pane against a live agent (root).
//!
//! Two fresh network namespaces joined by a veth, loss in each receiver's
//! INPUT chain (real retransmissions); in the client's namespace `flowprobe
//! run --listen` on the veth, and `fixtures/capture/tcpapp.py` traffic
//! between the two. Then `flowprobe top --agent` runs in a tmux pane (its
//! own tmux server, its own socket) and the test types as a person would:
//! a filter, a bad filter, sort keys, Enter on a row, Esc, `q`. After each
//! step the rows on the screen (`tmux capture-pane`) equal, cell for cell
//! and in order, what `flowprobe query --format table` prints for the
//! command the screen shows (which is checked to hold what was typed).
//! After `q` top has exited 0 and left the alternate screen.
//!
//! A second test serves a connection from a process whose name, command
//! line and `OTEL_SERVICE_NAME` carry terminal escape sequences (colour,
//! clear screen, a window title, a bell): the agent's rows carry the raw
//! bytes, the screen shows them as text (`\x1b[31m…`) and the pane's title
//! is unchanged.
//!
//! Runs only with `FLOWPROBE_LIVE_TESTS=1` as root (the root tier of
//! `scripts/test.sh`, which installs tmux); skipped with a message
//! otherwise (a failure with `CI=true` and not root).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::root::{
    conn_args, drop_in_input, enabled, http_get, python, tcpapp_exchange, veth_pair,
    wait_for_within, KillOnDrop, Netns, Procs,
};
use serde_json::Value;

const AGENT: &str = "127.0.0.1:9911";
const VETH_A: &str = "fpt0";
const VETH_B: &str = "fpt1";
const CLIENT: &str = "10.81.0.1";
const SERVER: &str = "10.81.0.2";

/// (client port, client writes, server writes), in parallel.
const CONNS: [(u16, u64, u64); 3] = [
    (41000, 700_000, 150_000),
    (41001, 1_500_000, 60_000),
    (41002, 200_000, 800_000),
];

/// A tmux server of its own (`-L`), one session `top`; killed on drop.
struct Tmux {
    socket: String,
    config: PathBuf,
}

impl Tmux {
    fn new(dir: &Path, name: &str) -> Tmux {
        assert!(
            Path::new("/usr/bin/tmux").exists(),
            "live_top needs tmux (the setup tier of scripts/test.sh installs it)"
        );
        let config = dir.join("tmux.conf");
        // The pane stays after its process exits, so its last screen can
        // be read.
        fs::write(&config, "set -g remain-on-exit on\nset -g status off\n").unwrap();
        Tmux {
            socket: format!("{name}-{}", std::process::id()),
            config,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.socket, "-f"])
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn start(&self, w: u16, h: u16, cmd: &str) {
        let (w, h) = (w.to_string(), h.to_string());
        self.run(&["new-session", "-d", "-s", "top", "-x", &w, "-y", &h, cmd]);
    }

    fn keys(&self, keys: &[&str]) {
        let mut a = vec!["send-keys", "-t", "top"];
        a.extend(keys);
        self.run(&a);
    }

    /// Types `s` literally.
    fn type_text(&self, s: &str) {
        self.run(&["send-keys", "-t", "top", "-l", s]);
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn display(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "top", format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// Cells of a table line: split at blanks, a rate's unit kept with its
/// number (`5.17 MB/s`), the sort mark dropped from a header.
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

/// The table from its header line (the first with `CONNS`) to the first
/// blank line, as (header, cells of each row).
fn table(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let lines: Vec<&str> = text.lines().collect();
    let Some(at) = lines.iter().position(|l| l.contains("CONNS")) else {
        return (Vec::new(), Vec::new());
    };
    let rows = lines[at + 1..]
        .iter()
        .take_while(|l| !l.trim().is_empty())
        .map(|l| cells(l))
        .collect();
    (cells(lines[at]), rows)
}

/// The command line the screen shows (`$ flowprobe query …`, wrapped at
/// blanks, continuation lines indented by two).
fn shown_command(screen: &str) -> Option<String> {
    let mut lines = screen.lines().skip_while(|l| !l.starts_with("$ "));
    let mut cmd = lines.next()?.strip_prefix("$ ")?.trim_end().to_owned();
    for l in lines.map_while(|l| l.strip_prefix("  ")) {
        cmd.push(' ');
        cmd.push_str(l.trim_end());
    }
    Some(cmd)
}

/// Runs the shown command in `ns` with `--format table`.
fn run_shown(ns: &str, cmd: &str) -> String {
    let cmd = cmd
        .strip_prefix("flowprobe ")
        .unwrap_or_else(|| panic!("not a flowprobe command: {cmd}"));
    let line = format!("{} {cmd} --format table", env!("CARGO_BIN_EXE_flowprobe"));
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", &line])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{line}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Whether every cell on the screen equals the query's cell of the same
/// column, row for row in the same order (`Err` says what differs).
fn same_numbers(screen: &str, query: &str) -> Result<usize, String> {
    let (sh, srows) = table(screen);
    let (qh, qrows) = table(query);
    if sh.is_empty() || srows.len() != qrows.len() {
        return Err(format!(
            "{} rows on the screen, {} in the query",
            srows.len(),
            qrows.len()
        ));
    }
    let mut n = 0;
    for (s, q) in srows.iter().zip(&qrows) {
        for (h, v) in sh.iter().zip(s) {
            if let Some(j) = qh.iter().position(|x| x == h) {
                if q.get(j) != Some(v) {
                    return Err(format!(
                        "{h}: {v} on the screen, {:?} in the query",
                        q.get(j)
                    ));
                }
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Waits until the screen shows a command containing every one of `want`
/// and its rows equal that command's; returns the screen and the query's
/// table.
fn settle(t: &Tmux, ns: &str, want: &[&str], rows: Option<usize>) -> (String, String) {
    let mut last = (String::new(), String::new(), String::new());
    let ok = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        let s = t.screen();
        let Some(cmd) = shown_command(&s) else {
            return false;
        };
        if !want.iter().all(|w| cmd.contains(w)) {
            last = (
                s,
                String::new(),
                format!("the command lacks one of {want:?}"),
            );
            return false;
        }
        let q = run_shown(ns, &cmd);
        let r = same_numbers(&s, &q);
        let good = r.is_ok() && rows.is_none_or(|n| table(&s).1.len() == n);
        last = (s, q, format!("{r:?}"));
        good
    });
    assert!(
        ok,
        "the screen never matched ({}):\n{}\n--- query:\n{}",
        last.2, last.0, last.1
    );
    let n = same_numbers(&last.0, &last.1).unwrap();
    eprintln!(
        "screen = `{}`: {} rows, {n} cells equal",
        shown_command(&last.0).unwrap(),
        table(&last.0).1.len()
    );
    (last.0, last.1)
}

/// `q`: top exits 0 (the shell around it says so; tmux 3.3's
/// `pane_dead_status` is not always set) and the terminal is back on its
/// main screen, where that line is printed.
fn quit(t: &Tmux) {
    t.keys(&["q"]);
    let mut s = String::new();
    wait_for_within("top to quit", Duration::from_secs(10), || {
        s = t.screen();
        s.contains("top exited")
    });
    assert!(s.contains("top exited 0"), "{s}");
    assert_eq!(t.display("#{alternate_on}"), "0");
}

fn namespaces(tag: &str) -> Netns {
    let ns = Netns::create("fptp", tag);
    veth_pair(&ns, VETH_A, VETH_B, CLIENT, SERVER, "24");
    ns
}

/// `flowprobe run --listen` on the client's veth, ticking every 100 ms.
fn agent(procs: &mut Procs, ns: &str, dir: &Path) {
    procs.spawn(
        "flowprobe",
        ns,
        &[
            env!("CARGO_BIN_EXE_flowprobe"),
            "run",
            "--iface",
            VETH_A,
            "--listen",
            AGENT,
            "--interval",
            "0.1",
            "--format",
            "json",
            // Connections that ended during the test stay on the page.
            "--keep-ended",
            "60",
        ],
        &dir.join("flowprobe"),
    );
    // Loading the program takes seconds of verifier time, more on a
    // machine busy with builds.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let up = loop {
        if http_get(ns, &format!("http://{AGENT}/health")).is_some_and(|h| h.contains("clsact")) {
            break true;
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        up,
        "the agent did not attach within 90 s: {}",
        fs::read_to_string(dir.join("flowprobe.err")).unwrap_or_default()
    );
}

/// `flowprobe query --format json` rows in `ns`.
fn query_json(ns: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            env!("CARGO_BIN_EXE_flowprobe"),
            "query",
            "--agent",
            AGENT,
        ])
        .args(["--format", "json"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::json_lines(&String::from_utf8_lossy(&out.stdout))
}

/// The pane's shell command: top, then its exit status on a line (and a
/// pause: tmux may drop what a pane printed just before it died).
fn top_command(ns: &str, args: &str) -> String {
    format!(
        "ip netns exec {ns} {} top --agent {AGENT} --refresh 0.2 {args}; echo top exited $?; sleep 1",
        env!("CARGO_BIN_EXE_flowprobe")
    )
}

#[test]
fn top_shows_what_query_prints() {
    if !enabled("live_top") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = namespaces("rows");
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, "iptables");
    }
    let mut procs = Procs::default();
    agent(&mut procs, &ns.a, d);
    tcpapp_exchange(&ns.a, CLIENT, &ns.b, SERVER, d, &conn_args(&CONNS));
    // The agent has every connection once its rows stop changing.
    wait_for_within(
        "the agent to count the exchange",
        Duration::from_secs(30),
        || {
            let a = query_json(&ns.a, &["--src", "ip,port", "--dst", "port", "--raw-ports"]);
            std::thread::sleep(Duration::from_millis(300));
            let b = query_json(&ns.a, &["--src", "ip,port", "--dst", "port", "--raw-ports"]);
            a == b && a.iter().filter(|r| r["dst"]["port"] == "5001").count() == CONNS.len()
        },
    );

    let t = Tmux::new(d, "fptop");
    t.start(
        200,
        40,
        &top_command(&ns.a, "--src ip,port --dst ip,port --raw-ports"),
    );
    let (s, _) = settle(
        &t,
        &ns.a,
        &["--src ip,port --dst ip,port --raw-ports"],
        None,
    );
    assert!(
        s.contains(&format!("{VETH_A}(clsact)")) && s.contains(" · tc"),
        "{s}"
    );
    assert!(s.contains("full 0") && s.contains("insert_failed 0"), "{s}");

    // A filter typed in place.
    t.keys(&["/"]);
    t.type_text("dst.port = 5001 and src.port != 41001");
    t.keys(&["Enter"]);
    settle(
        &t,
        &ns.a,
        &["--where 'dst.port = 5001 and src.port != 41001'"],
        Some(2),
    );

    // A bad one: the parser's message with its column; Esc keeps the old.
    t.keys(&["/", "C-u"]);
    t.type_text("dst.port = 5001 or x");
    t.keys(&["Enter"]);
    wait_for_within("the filter's error", Duration::from_secs(10), || {
        t.screen()
            .contains("expected `and` between conditions at column 17 (`or`)")
    });
    t.keys(&["Escape"]);
    wait_for_within("the editor to close", Duration::from_secs(10), || {
        t.screen().contains("?:help q:quit")
    });

    // Sort: the next columns (conns, then sent bytes), then reversed.
    t.keys(&["s", "s"]);
    let (s, _) = settle(
        &t,
        &ns.a,
        &["--sort sent_bytes", "src.port != 41001"],
        Some(2),
    );
    assert!(s.contains("SENT_BYTES▼"), "{s}");
    t.keys(&["r"]);
    settle(&t, &ns.a, &["--sort sent_bytes:asc"], Some(2));

    // Enter: the first row's connections; Esc: back.
    let (s, _) = settle(&t, &ns.a, &["--sort sent_bytes:asc"], Some(2));
    let first = table(&s).1[0].clone();
    t.keys(&["Enter"]);
    let drill = format!(
        "--where 'src.ip = {CLIENT} and src.port = {} and dst.ip = {SERVER} and dst.port = 5001'",
        first[1]
    );
    let (s, _) = settle(&t, &ns.a, &[&drill], Some(1));
    assert_eq!(table(&s).1[0][..4], first[..4], "{s}");
    t.keys(&["Escape"]);
    settle(&t, &ns.a, &["--sort sent_bytes:asc"], Some(2));

    // q: the process exits 0 and the terminal is back on its main screen.
    quit(&t);
    drop(procs);
}

/// The name, command line and service variable of the serving process.
const EVIL_NAME: &str = "\x1b[31mev\x07il";
const EVIL_SERVICE: &str = "\x1b]0;pwned\x07\x1b[2Jsvc";

#[test]
fn hostile_tags_are_text() {
    if !enabled("live_top") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ns = namespaces("evil");
    let mut procs = Procs::default();
    agent(&mut procs, &ns.a, d);

    // A server that names itself EVIL_NAME, with EVIL_SERVICE in its
    // environment, holding one connection until the test is done.
    let server = format!(
        "import ctypes, os, socket, sys, time\n\
         ctypes.CDLL(None).prctl(15, os.environ['EVIL_NAME'].encode(), 0, 0, 0)\n\
         ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         ls.bind(('{SERVER}', 5002)); ls.listen(1)\n\
         open(sys.argv[1], 'w').close()\n\
         c, _ = ls.accept(); c.recv(100000); c.sendall(b'x' * 3000); time.sleep(60)\n"
    );
    let ready = d.join("ready");
    let mut srv = python(&ns.b, &server);
    srv.arg(&ready)
        .arg("\x1b[5m-blink")
        .env("OTEL_SERVICE_NAME", EVIL_SERVICE)
        .env("EVIL_NAME", EVIL_NAME);
    let _srv = KillOnDrop(srv.stdin(Stdio::null()).spawn().unwrap());
    wait_for_within("the server", Duration::from_secs(30), || ready.exists());
    let client = format!(
        "import socket, time\n\
         s = socket.create_connection(('{SERVER}', 5002), source_address=('{CLIENT}', 0))\n\
         s.sendall(b'y' * 1000); s.recv(3000); time.sleep(60)\n"
    );
    let _cli = KillOnDrop(python(&ns.a, &client).stdin(Stdio::null()).spawn().unwrap());

    // The agent's rows carry the bytes as the process chose them.
    wait_for_within(
        "the agent to attribute the server",
        Duration::from_secs(30),
        || {
            query_json(&ns.a, &["--dst", "process,service"])
                .iter()
                .any(|r| r["dst"]["process"] == EVIL_NAME && r["dst"]["service"] == EVIL_SERVICE)
        },
    );

    let t = Tmux::new(d, "fptop-evil");
    t.start(
        160,
        30,
        &top_command(
            &ns.a,
            "--src ip --dst process,service --where 'dst.port = 5002'",
        ),
    );
    let title = t.display("#{pane_title}");
    wait_for_within("the tags on the screen", Duration::from_secs(20), || {
        let s = t.screen();
        s.contains(r"\x1b[31mev\x07il") && s.contains(r"\x1b]0;pwned\x07\x1b[2Jsvc")
    });
    let s = t.screen();
    eprintln!("{s}");
    assert!(!s.contains("pwned\x07"), "{s}");
    // The OSC did not retitle the pane, the clear did not blank the screen.
    assert_eq!(t.display("#{pane_title}"), title);
    assert!(s.contains("flowprobe top · agent"), "{s}");
    // Enter: the row's values become a filter; the agent selects the row
    // by the raw bytes, the command shows them as text.
    t.keys(&["Enter"]);
    wait_for_within("the drill-down", Duration::from_secs(20), || {
        let s = t.screen();
        shown_command(&s).is_some_and(|c| {
            c.contains(r#"dst.process = "\x1b[31mev\x07il" and dst.service = "\x1b]0;pwned\x07\x1b[2Jsvc"'"#)
        }) && table(&s).1.len() == 1
            && s.contains("SRC.PORT")
    });
    eprintln!("{}", t.screen());
    assert_eq!(t.display("#{pane_title}"), title);
    quit(&t);
    drop(procs);
}
