//! Helpers of the root tests: the gate, shell commands, waiting, and
//! throwaway network namespaces.

use std::fs;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Whether the root tests of binary `name` run; `false` after printing why
/// not. They run with `FLOWPROBE_LIVE_TESTS=1` as root (the root tier of
/// `scripts/test.sh`); with `CI=true` a skip for want of root is a failure.
pub fn enabled(name: &str) -> bool {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if std::env::var("FLOWPROBE_LIVE_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "{name}: skipped (set FLOWPROBE_LIVE_TESTS=1 as root; the root tier of scripts/test.sh does)"
        );
        return false;
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            !ci,
            "{name}: CI=true but not root: the live tests cannot run"
        );
        eprintln!("{name}: skipped (needs root)");
        return false;
    }
    true
}

/// Runs a command that must succeed.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A command's stdout, whatever its status.
pub fn sh_out(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ok` every 50 ms for up to 20 s.
pub fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two fresh network namespaces, deleted on drop.
pub struct Netns {
    pub a: String,
    pub b: String,
}

impl Netns {
    /// Named after `tag` and this process (`prefix-tag-a-PID`), lo up.
    pub fn create(prefix: &str, tag: &str) -> Netns {
        let id = std::process::id();
        let ns = Netns {
            a: format!("{prefix}-{tag}-a-{id}"),
            b: format!("{prefix}-{tag}-b-{id}"),
        };
        for n in [&ns.a, &ns.b] {
            sh(&["ip", "netns", "add", n]);
            sh(&["ip", "-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            // flowprobe's lock and clsact files for this namespace (see
            // probe/src/live/stale.rs): named after the namespace's inode.
            if let Ok(m) = fs::metadata(format!("/run/netns/{ns}")) {
                use std::os::unix::fs::MetadataExt;
                for ext in ["lock", "clsact"] {
                    let _ = fs::remove_file(format!("/run/flowprobe/netns-{}.{ext}", m.ino()));
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Drops every 13th TCP packet of 500 bytes or more in the INPUT chain of
/// namespace `ns` (`ipt`: `iptables` or `ip6tables`): after tc ingress and
/// AF_PACKET, so the sender retransmits for real and the probe sees both
/// copies.
pub fn drop_in_input(ns: &str, ipt: &str) {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        ipt,
        "-w",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "-m",
        "length",
        "--length",
        "500:65535",
        "-m",
        "statistic",
        "--mode",
        "nth",
        "--every",
        "13",
        "--packet",
        "0",
        "-j",
        "DROP",
    ]);
}

/// `--conn PORT:CLIENT_BYTES:SERVER_BYTES` arguments of `tcpapp.py`.
pub fn conn_args(conns: &[(u16, u64, u64)]) -> Vec<String> {
    conns
        .iter()
        .flat_map(|(p, c, s)| ["--conn".to_owned(), format!("{p}:{c}:{s}")])
        .collect()
}

/// `fixtures/capture/tcpapp.py` with `args` (its `--conn`/`--udp`
/// exchanges): the server at `server_addr` in `server_ns`, the client from
/// `client_addr` in `client_ns`; each writes its own socket's `TCP_INFO`
/// to `dir/server.json` and `dir/client.json`. Returns when both are done.
pub fn tcpapp_exchange(
    client_ns: &str,
    client_addr: &str,
    server_ns: &str,
    server_addr: &str,
    dir: &std::path::Path,
    args: &[String],
) {
    use std::process::Stdio;
    let app = super::repo_root().join("fixtures/capture/tcpapp.py");
    let ready = dir.join("ready");
    let mut server = KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", server_ns, "python3"])
            .arg(&app)
            .args(["server", "--addr", server_addr, "--ready"])
            .arg(&ready)
            .arg("--out")
            .arg(dir.join("server.json"))
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let up = Instant::now() + Duration::from_secs(20);
    while !ready.exists() {
        if Instant::now() > up {
            let _ = server.kill();
            panic!("the tcpapp server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let client = Command::new("ip")
        .args(["netns", "exec", client_ns, "python3"])
        .arg(&app)
        .args([
            "client",
            "--server",
            server_addr,
            "--local",
            client_addr,
            "--out",
        ])
        .arg(dir.join("client.json"))
        .args(args)
        .status()
        .unwrap();
    assert!(client.success(), "tcpapp client failed");
    assert!(server.wait().unwrap().success(), "tcpapp server failed");
}

/// Kills the child on drop: a failed assertion must not leave a probe or an
/// application running.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Names `a_dev` (in `ns.a`) and `b_dev` (in `ns.b`) a veth pair, gives them
/// `ca` and `sa` in a /`plen` (IPv6 without duplicate address detection) and
/// waits until both are up. Created inside A with the peer directly in B:
/// the root namespace's interfaces are never touched.
pub fn veth_pair(ns: &Netns, a_dev: &str, b_dev: &str, ca: &str, sa: &str, plen: &str) {
    sh(&[
        "ip", "-n", &ns.a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns",
        &ns.b,
    ]);
    for (n, dev, addr) in [(&ns.a, a_dev, ca), (&ns.b, b_dev, sa)] {
        let cidr = format!("{addr}/{plen}");
        let mut add = vec!["ip", "-n", n, "addr", "add", &cidr, "dev", dev];
        if addr.contains(':') {
            add.push("nodad");
        }
        sh(&add);
        sh(&["ip", "-n", n, "link", "set", dev, "up"]);
    }
    wait_for("the veth to come up", || {
        let up =
            |n: &str, d: &str| sh_out(&["ip", "-n", n, "link", "show", d]).contains("LOWER_UP");
        up(&ns.a, a_dev) && up(&ns.b, b_dev)
    });
}

/// The record of the TCP connection from client port `port` in one probe's
/// output (`out`, for the failure message), checked for orientation: client
/// `ca` to server `sa` port 5001.
pub fn record<'a>(
    conns: &'a [serde_json::Value],
    port: u16,
    ca: &str,
    sa: &str,
    out: &str,
) -> &'a serde_json::Value {
    let c = conns
        .iter()
        .find(|c| c["proto"] == "tcp" && c["sport"] == port)
        .unwrap_or_else(|| panic!("no connection from port {port} in:\n{out}"));
    assert_eq!(
        (c["src"].as_str(), c["dst"].as_str(), c["dport"].as_u64()),
        (Some(ca), Some(sa), Some(5001)),
        "orientation of {c}"
    );
    c
}

/// Python for loopback: 3000 bytes to 127.0.0.1:5555, 700 back, closed.
pub const LO_EXCHANGE: &str = "
import socket
s = socket.socket(); s.bind(('127.0.0.1', 5555)); s.listen()
c = socket.create_connection(('127.0.0.1', 5555)); a, _ = s.accept()
c.sendall(b'x' * 3000)
got = 0
while got < 3000: got += len(a.recv(65536))
a.sendall(b'y' * 700)
got = 0
while got < 700: got += len(c.recv(65536))
c.close(); a.close(); s.close()
";
