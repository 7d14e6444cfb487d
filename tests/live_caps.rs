//! `flowprobe run` with exactly the service's capabilities, and with one
//! fewer (root).
//!
//! The systemd unit (dist/systemd/flowprobe.service) runs flowprobe as an
//! unprivileged user holding only the capabilities of its
//! `AmbientCapabilities=` ([`common::service_caps`]); the DaemonSet runs it
//! as root with the same set. Here `setpriv` gives flowprobe exactly that
//! set, in a fresh network namespace A joined by a veth to another, B, with
//! `/run/flowprobe` a tmpfs of its own owned by the user (what the unit's
//! `RuntimeDirectory=` makes), and runs the service's config
//! (dist/flowprobe.toml: tc, the agent on 127.0.0.1:9911). A client in A
//! (uid 4321) sends 100000 bytes to a server in B (uid 1234), which answers
//! 30000: users other than flowprobe's, the server in another namespace.
//!
//! - `the_service_set_does_what_the_unit_promises`, as uid 65534 (the
//!   unit) and as uid 0 (the DaemonSet): it attaches, `/health` says tc on
//!   both interfaces, `/metrics` counts the exchange, the final record has
//!   exactly the bytes written each way, both ends carry their process (pid
//!   and uid; the server's netns is B), and stderr has no complaint.
//! - `one_capability_fewer`: the set less each capability, and what breaks
//!   (the set is minimal but for CAP_BPF and CAP_PERFMON, which
//!   CAP_SYS_ADMIN stands in for; the unit lists them so that dropping
//!   CAP_SYS_ADMIN keeps counting): without CAP_NET_ADMIN, or without
//!   CAP_SYS_ADMIN and CAP_BPF or CAP_PERFMON, it does not start and names
//!   the capability; without CAP_SYS_ADMIN the end in B is not looked up;
//!   without CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH the passes join no
//!   socket to its process, and both ends are named from what the cgroup
//!   programs recorded (the client at connect, the server's accepted socket
//!   from its listener); each said in one line on stderr.
//!
//! Runs with `FLOWPROBE_LIVE_TESTS=1` (the root tier of scripts/test.sh).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::root::{
    enabled, http_get, netns_inode, sh_out, stop, tc_attached, veth_pair, wait_for_within,
    KillOnDrop, Netns,
};
use common::{json_lines, repo_root, service_caps};
use serde_json::Value;

const DEV_A: &str = "fpc0";
const DEV_B: &str = "fpc1";
const PROBE_USER: u32 = 65534;
const CLIENT_USER: &str = "4321";
const SERVER_USER: &str = "1234";
const SERVER_PORT: u16 = 7000;
const AGENT: &str = "http://127.0.0.1:9911";
/// What the client writes, and the server.
const UP: u64 = 100_000;
const DOWN: u64 = 30_000;
/// The attribution resolver's dumps (probe/src/enrich: DUMP_EVERY).
const DUMP_EVERY: Duration = Duration::from_secs(10);

/// A client port used once in the whole test binary: the tests run in
/// parallel with the same addresses in other namespaces, and attribution
/// searches them all.
fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(41700);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

const SERVER: &str = "
import socket, sys
ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], 7000)); ls.listen()
c, _ = ls.accept()
got = 0
while got < 100000:
    b = c.recv(65536)
    if not b: sys.exit('short read')
    got += len(b)
c.sendall(b'y' * 30000)
c.recv(1)
c.close()
";

const CLIENT: &str = "
import socket, sys, time
c = socket.create_connection((sys.argv[1], 7000), source_address=(sys.argv[2], int(sys.argv[3])))
c.sendall(b'x' * 100000)
got = 0
while got < 30000: got += len(c.recv(65536))
time.sleep(1)
c.close()
";

/// The namespaces, with `net` (e.g. `10.83.0`) on the veth: A .1, B .2.
struct Setup {
    ns: Netns,
    client: String,
    server: String,
}

fn setup(tag: &str, net: &str) -> Setup {
    let ns = Netns::create("fpc", tag);
    let (client, server) = (format!("{net}.1"), format!("{net}.2"));
    veth_pair(&ns, DEV_A, DEV_B, &client, &server, "24");
    Setup { ns, client, server }
}

/// `setpriv`'s list for exactly `caps` (`-all,+bpf,...`).
fn setpriv_caps(caps: &[String]) -> String {
    let mut s = String::from("-all");
    for c in caps {
        s += ",+";
        s += &c.trim_start_matches("CAP_").to_lowercase();
    }
    s
}

fn without(caps: &[String], drop: &[&str]) -> Vec<String> {
    caps.iter()
        .filter(|c| !drop.contains(&c.as_str()))
        .cloned()
        .collect()
}

struct Probe {
    child: KillOnDrop,
    out: PathBuf,
    err: PathBuf,
    started: Instant,
}

/// `flowprobe run --config dist/flowprobe.toml --format json` in `ns` as
/// `uid` with exactly `caps` (inheritable, ambient and bounding set), its
/// own `/run/flowprobe` owned by `uid`.
fn spawn(ns: &str, uid: u32, caps: &[String], dir: &Path, tag: &str) -> Probe {
    fs::create_dir_all("/run/flowprobe").unwrap();
    let (out, err) = (
        dir.join(format!("{tag}.json")),
        dir.join(format!("{tag}.err")),
    );
    let set = setpriv_caps(caps);
    let uid = uid.to_string();
    // `ip netns exec` gives it a mount namespace of its own (slave of the
    // host's): the mounts stay there. What the unit gives the service:
    // /run/flowprobe (RuntimeDirectory=), /var/lib/flowprobe
    // (StateDirectory=, the config's state_dir) and bpffs with its
    // `flowprobe` directory the user's (ExecStartPre=; here a bpffs of the
    // namespace's own, owned by the user). sh and setpriv exec, so the
    // child's pid is flowprobe's.
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o uid={uid},gid={uid},mode=0755 flowprobe-test /run/flowprobe && \
             mkdir -p /var/lib/flowprobe && \
             mount -t tmpfs -o uid={uid},gid={uid},mode=0700 flowprobe-state /var/lib/flowprobe && \
             mount -t bpf -o uid={uid},gid={uid},mode=0700 bpf /sys/fs/bpf && \
             exec \"$0\" \"$@\""
        ))
        .args([
            "setpriv",
            "--reuid",
            &uid,
            "--regid",
            &uid,
            "--clear-groups",
        ])
        .args([
            "--inh-caps",
            &set,
            "--ambient-caps",
            &set,
            "--bounding-set",
            &set,
        ])
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_flowprobe"))
        .arg("run")
        .arg("--config")
        .arg(repo_root().join("dist/flowprobe.toml"))
        .args(["--format", "json"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    Probe {
        child: KillOnDrop(child),
        out,
        err,
        started: Instant::now(),
    }
}

impl Probe {
    fn stderr(&self) -> String {
        fs::read_to_string(&self.err).unwrap()
    }

    /// Waits until it is attached to both hooks of the veth and to `lo`
    /// ingress (program loads of a debug build on busy CPUs take a while).
    fn wait_attached(&mut self, ns: &str) {
        wait_for_within("flowprobe to attach", Duration::from_secs(90), || {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("flowprobe exited ({st}): {}", self.stderr());
            }
            tc_attached(ns, DEV_A, "ingress")
                && tc_attached(ns, DEV_A, "egress")
                && tc_attached(ns, "lo", "ingress")
        });
    }

    /// Waits for it to fail at start; its stderr.
    fn failure(mut self) -> String {
        let st = stop(&mut self.child.0, 0, Duration::from_secs(90));
        let err = self.stderr();
        assert!(!st.success(), "flowprobe ran: {err}");
        err
    }

    /// SIGINT; its final records and stderr, after checking it exited well.
    fn finish(mut self) -> (Vec<Value>, String, Duration) {
        let ran = self.started.elapsed();
        let st = stop(&mut self.child.0, libc::SIGINT, Duration::from_secs(30));
        let err = self.stderr();
        assert!(st.success(), "flowprobe failed ({st}): {err}");
        eprintln!("{}", err.trim());
        (
            json_lines(&fs::read_to_string(&self.out).unwrap()),
            err,
            ran,
        )
    }
}

/// The server in B as SERVER_USER, the client in A as CLIENT_USER from
/// `port`; returns (client pid, server pid) when both are done.
fn exchange(s: &Setup, port: u16) -> (u32, u32) {
    let py = |ns: &str, user: &str, code: &str, args: &[&str]| {
        Command::new("ip")
            .args([
                "netns", "exec", ns, "setpriv", "--reuid", user, "--regid", user,
            ])
            .args(["--clear-groups", "/usr/bin/python3", "-c", code])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut server = KillOnDrop(py(&s.ns.b, SERVER_USER, SERVER, &[&s.server]));
    wait_for_within("the server to listen", Duration::from_secs(20), || {
        !sh_out(&[
            "ip", "netns", "exec", &s.ns.b, "ss", "-Htln", "sport", "=", ":7000",
        ])
        .trim()
        .is_empty()
    });
    let port = port.to_string();
    let mut client = py(&s.ns.a, CLIENT_USER, CLIENT, &[&s.server, &s.client, &port]);
    let ids = (client.id(), server.id());
    assert!(client.wait().unwrap().success(), "the client failed");
    assert!(server.wait().unwrap().success(), "the server failed");
    ids
}

/// The record of the exchange from client port `port`, checked: exactly
/// the bytes each side wrote (retransmissions apart), oriented client to
/// server.
fn record<'a>(conns: &'a [Value], s: &Setup, port: u16) -> &'a Value {
    let c = conns
        .iter()
        .find(|c| c["proto"] == "tcp" && c["sport"] == port)
        .unwrap_or_else(|| panic!("no connection from port {port} in {conns:?}"));
    let payload =
        |d: &Value| d["bytes"].as_u64().unwrap() - d["retransmitted_bytes"].as_u64().unwrap();
    assert_eq!(
        (
            c["src"].as_str(),
            c["dst"].as_str(),
            c["dport"].as_u64(),
            payload(&c["sent"]),
            payload(&c["received"])
        ),
        (
            Some(s.client.as_str()),
            Some(s.server.as_str()),
            Some(u64::from(SERVER_PORT)),
            UP,
            DOWN
        ),
        "{c}"
    );
    c
}

/// A metric's values summed over its series.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn tag_of<'a>(tags: &'a Value, key: &str) -> Option<&'a str> {
    tags[key].as_str()
}

#[test]
fn the_service_set_does_what_the_unit_promises() {
    if !enabled("live_caps") {
        return;
    }
    let caps = service_caps();
    assert!(!caps.is_empty(), "no AmbientCapabilities= in the unit");
    let dir = tempfile::tempdir().unwrap();
    let s = setup("full", "10.83.0");
    let netns_b = netns_inode(&s.ns.b).unwrap().to_string();
    for uid in [PROBE_USER, 0] {
        let tag = format!("uid{uid}");
        let mut p = spawn(&s.ns.a, uid, &caps, dir.path(), &tag);
        p.wait_attached(&s.ns.a);

        // /health: tc, attached to the veth (from the first read on).
        let mut health = Value::Null;
        wait_for_within("/health to show the veth", Duration::from_secs(20), || {
            health = http_get(&s.ns.a, &format!("{AGENT}/health"))
                .and_then(|b| serde_json::from_str(&b).ok())
                .unwrap_or(Value::Null);
            health["backend"] == "tc"
                && health["interfaces"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|i| i["iface"] == DEV_A && i["mode"] == "clsact")
                })
        });

        let port = next_port();
        let (client_pid, server_pid) = exchange(&s, port);
        // The agent reads the kernel table every second.
        wait_for_within(
            "/metrics to count the exchange",
            Duration::from_secs(20),
            || {
                let m = http_get(&s.ns.a, &format!("{AGENT}/metrics")).unwrap_or_default();
                m.contains("flowprobe_backend{backend=\"tc\"} 1")
                    && metric_sum(&m, "flowprobe_sent_bytes_total") >= UP as f64
                    && metric_sum(&m, "flowprobe_received_bytes_total") >= DOWN as f64
            },
        );

        let (conns, err, _) = p.finish();
        let lines: Vec<&str> = err.lines().collect();
        assert!(
            lines.len() == 2
                && lines[0].starts_with("flowprobe: serving http://127.0.0.1:9911/")
                && lines[1].contains("(backend tc)"),
            "uid {uid}: stderr is the agent's line and the summary only: {err}"
        );
        let r = record(&conns, &s, port);
        let (src, dst) = (&r["src_tags"], &r["dst_tags"]);
        assert_eq!(
            (
                tag_of(src, "pid"),
                tag_of(src, "uid"),
                tag_of(dst, "pid"),
                tag_of(dst, "uid"),
                tag_of(dst, "netns")
            ),
            (
                Some(client_pid.to_string().as_str()),
                Some(CLIENT_USER),
                Some(server_pid.to_string().as_str()),
                Some(SERVER_USER),
                Some(netns_b.as_str())
            ),
            "uid {uid}: both ends joined to their processes: {r}"
        );
        eprintln!(
            "uid {uid} with {}: {UP} bytes up and {DOWN} down counted; client pid {client_pid}, server pid {server_pid} in netns {netns_b}",
            caps.join(" ")
        );
    }
}

/// What one run without `drop` shows.
enum Breaks {
    /// It does not start; stderr names the capability.
    Start(&'static str),
    /// It counts (CAP_SYS_ADMIN stands in).
    Nothing,
    /// It counts; the server's end, in the other namespace, is not looked
    /// up (found only by a dump every 10 s).
    OtherNamespace,
    /// It counts; no end is joined to its process through its sockets
    /// (the client's is, from the kernel's record of its connect).
    OtherUsers,
}

#[test]
fn one_capability_fewer() {
    if !enabled("live_caps") {
        return;
    }
    let caps = service_caps();
    let dir = tempfile::tempdir().unwrap();
    let s = setup("fewer", "10.83.1");
    let cases: [(&[&str], Breaks); 8] = [
        (&["CAP_NET_ADMIN"], Breaks::Start("missing: CAP_NET_ADMIN ")),
        (
            &["CAP_SYS_ADMIN", "CAP_BPF"],
            Breaks::Start("missing: CAP_BPF "),
        ),
        (
            &["CAP_SYS_ADMIN", "CAP_PERFMON"],
            Breaks::Start("missing: CAP_PERFMON "),
        ),
        (&["CAP_BPF"], Breaks::Nothing),
        (&["CAP_PERFMON"], Breaks::Nothing),
        (&["CAP_SYS_ADMIN"], Breaks::OtherNamespace),
        (&["CAP_SYS_PTRACE"], Breaks::OtherUsers),
        (&["CAP_DAC_READ_SEARCH"], Breaks::OtherUsers),
    ];
    // Every capability of the set is dropped in some case.
    for c in &caps {
        assert!(
            cases.iter().any(|(d, _)| d.contains(&c.as_str())),
            "{c} is never dropped"
        );
    }
    for (drop, breaks) in cases {
        let fewer = without(&caps, drop);
        let tag = drop.join("-");
        let what = format!("without {}", drop.join(" and "));
        let mut p = spawn(&s.ns.a, PROBE_USER, &fewer, dir.path(), &tag);
        if let Breaks::Start(msg) = breaks {
            let err = p.failure();
            let last = err.lines().last().unwrap_or_default();
            assert!(
                err.lines().count() <= 2
                    && last.starts_with("flowprobe: `flowprobe run` needs root, or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN")
                    && last.contains(msg),
                "{what}: {err}"
            );
            eprintln!("{what}: {last}");
            continue;
        }
        p.wait_attached(&s.ns.a);
        let port = next_port();
        let (client_pid, server_pid) = exchange(&s, port);
        let (conns, err, ran) = p.finish();
        let r = record(&conns, &s, port);
        let (src, dst) = (&r["src_tags"], &r["dst_tags"]);
        let partial = err
            .lines()
            .find(|l| l.starts_with("flowprobe: attribution is partial: "));
        match breaks {
            Breaks::Start(_) => unreachable!(),
            Breaks::Nothing => {
                assert!(partial.is_none(), "{what}: {err}");
                assert!(tag_of(dst, "pid").is_some(), "{what}: {r}");
            }
            Breaks::OtherNamespace => {
                let line = partial.unwrap_or_else(|| panic!("{what}: nothing said: {err}"));
                assert!(
                    line.contains("without CAP_SYS_ADMIN sockets in other network namespaces"),
                    "{line}"
                );
                assert_eq!(
                    tag_of(src, "pid"),
                    Some(client_pid.to_string().as_str()),
                    "{what}: {r}"
                );
                // Unless a dump came by while the server's socket lived.
                if ran < DUMP_EVERY {
                    assert_eq!(tag_of(dst, "pid"), None, "{what}: {r}");
                } else {
                    eprintln!("{what}: ran {ran:?}, a dump may have found the server: {r}");
                }
            }
            Breaks::OtherUsers => {
                let line = partial.unwrap_or_else(|| panic!("{what}: nothing said: {err}"));
                let cap = drop[0];
                assert!(
                    line.contains(&format!("without {cap} the sockets of other users' processes are not joined to them")),
                    "{line}"
                );
                // Both ends are named from what the cgroup programs
                // recorded, which needs no access to the processes: the
                // client at its connect, the server's accepted socket from
                // its listener at listen(2).
                assert_eq!(
                    (tag_of(src, "pid"), tag_of(dst, "pid")),
                    (
                        Some(client_pid.to_string().as_str()),
                        Some(server_pid.to_string().as_str())
                    ),
                    "{what}: {r}"
                );
            }
        }
        eprintln!("{what}: {}", partial.unwrap_or("(nothing said)"));
    }
}
