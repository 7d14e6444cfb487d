//! Helpers of the root tests: the gate, shell commands, waiting, and
//! throwaway network namespaces.

use std::fs;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
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
pub fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    wait_for_within(what, Duration::from_secs(60), ok);
}

/// Polls `ok` every 50 ms for up to `timeout`.
pub fn wait_for_within(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh network namespace, `lo` up, deleted on drop.
pub struct Namespace {
    pub name: String,
}

impl Namespace {
    /// Named `prefix-tag-PID`.
    pub fn create(prefix: &str, tag: &str) -> Namespace {
        let name = format!("{prefix}-{tag}-{}", std::process::id());
        netns_add(&name);
        Namespace { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        netns_del(&self.name);
    }
}

/// Two fresh network namespaces, `lo` up in each, deleted on drop.
pub struct Netns {
    pub a: String,
    pub b: String,
}

impl Netns {
    /// Named after `tag` and this process (`prefix-tag-a-PID`).
    pub fn create(prefix: &str, tag: &str) -> Netns {
        let id = std::process::id();
        let ns = Netns {
            a: format!("{prefix}-{tag}-a-{id}"),
            b: format!("{prefix}-{tag}-b-{id}"),
        };
        for n in [&ns.a, &ns.b] {
            netns_add(n);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            netns_del(ns);
        }
    }
}

fn netns_add(name: &str) {
    sh(&["ip", "netns", "add", name]);
    sh(&["ip", "-n", name, "link", "set", "lo", "up"]);
}

/// Deletes a namespace and flowprobe's lock and clsact files for it (see
/// probe/src/live/stale.rs: named after the namespace's inode).
fn netns_del(name: &str) {
    if let Some(ino) = netns_inode(name) {
        for ext in ["lock", "clsact"] {
            let _ = fs::remove_file(format!("/run/flowprobe/netns-{ino}.{ext}"));
        }
        // What a `run --state-dir` that did not stop cleanly recorded.
        if let Ok(dir) = fs::read_dir("/run/flowprobe") {
            for e in dir.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(&format!("netns-{ino}.kept-")) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        if let Ok(dir) = fs::read_dir("/sys/fs/bpf/flowprobe") {
            for e in dir.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .ends_with(&format!("-{ino}"))
                {
                    if let Ok(pins) = fs::read_dir(e.path()) {
                        for p in pins.flatten() {
                            let _ = fs::remove_file(p.path());
                        }
                    }
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).output();
}

/// A named namespace's identity (the inode flowprobe tags as `netns`).
pub fn netns_inode(name: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/run/netns/{name}"))
        .ok()
        .map(|m| m.ino())
}

/// A veth pair: `dev` in namespace `ns`, its peer `peer` in `peer_ns`
/// (created inside `ns` with the peer directly in `peer_ns`: the root
/// namespace's interfaces are never touched). Both down, no address.
pub fn veth(ns: &str, dev: &str, peer_ns: &str, peer: &str) {
    let mut cmd = vec![
        "ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", peer,
    ];
    if peer_ns != ns {
        cmd.extend(["netns", peer_ns]);
    }
    sh(&cmd);
}

/// Gives `dev` in `ns` the address `cidr` (IPv6 without duplicate address
/// detection).
pub fn addr(ns: &str, dev: &str, cidr: &str) {
    let mut add = vec!["ip", "-n", ns, "addr", "add", cidr, "dev", dev];
    if cidr.contains(':') {
        add.push("nodad");
    }
    sh(&add);
}

/// [`addr`], then brings `dev` up.
pub fn addr_up(ns: &str, dev: &str, cidr: &str) {
    addr(ns, dev, cidr);
    link_up(ns, dev);
}

pub fn link_up(ns: &str, dev: &str) {
    sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
}

/// Whether `dev` in `ns` has a carrier.
pub fn lower_up(ns: &str, dev: &str) -> bool {
    sh_out(&["ip", "-n", ns, "link", "show", dev]).contains("LOWER_UP")
}

/// The interface index of `dev` in `ns`.
pub fn ifindex(ns: &str, dev: &str) -> u32 {
    let out = sh_out(&["ip", "-n", ns, "-o", "link", "show", dev]);
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// Whether flowprobe's tc program is attached to `dev`'s `hook` (`ingress`
/// or `egress`) in `ns`.
pub fn tc_attached(ns: &str, dev: &str, hook: &str) -> bool {
    sh_out(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, hook,
    ])
    .split_whitespace()
    .any(|w| w == probe_common::contract::TC_PROGRAM)
}

/// How many file descriptors process `pid` holds for good: the fewest of
/// ten counts 50 ms apart. A netlink dump, an HTTP client being answered,
/// a `/proc` directory or a namespace file being read each hold one for an
/// instant (four at once made a leak check fail in CI); a leaked one stays
/// in every count.
pub fn fds(pid: u32) -> usize {
    (0..10)
        .map(|i| {
            if i > 0 {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
        })
        .min()
        .unwrap_or(0)
}

/// Process `pid`'s resident memory (`VmRSS`), kB.
pub fn rss_kb(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// GET from inside namespace `ns` (the servers listen on its loopback).
pub fn http_get(ns: &str, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "python3", "-c"])
        .arg("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())")
        .arg(url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
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
    dir: &Path,
    args: &[String],
) {
    tcpapp_exchange_via(
        (client_ns, client_addr, None, &[]),
        (server_ns, server_addr),
        dir,
        args,
    )
}

/// [`tcpapp_exchange`] with the client (namespace, address, `via`,
/// arguments of its own) connecting to `via` (address, TCP port) instead
/// of the server's own address and port 5001: a published port that the
/// path translates to the server (DNAT).
pub fn tcpapp_exchange_via(
    (client_ns, client_addr, via, client_only): (&str, &str, Option<(&str, u16)>, &[&str]),
    (server_ns, server_addr): (&str, &str),
    dir: &Path,
    args: &[String],
) {
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
    let up = Instant::now() + Duration::from_secs(60);
    while !ready.exists() {
        if Instant::now() > up {
            let _ = server.kill();
            panic!("the tcpapp server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (target, port) = via.unwrap_or((server_addr, 5001));
    let client = Command::new("ip")
        .args(["netns", "exec", client_ns, "python3"])
        .arg(&app)
        .args([
            "client",
            "--server",
            target,
            "--local",
            client_addr,
            "--out",
        ])
        .arg(dir.join("client.json"))
        .args(args)
        .args(["--tcp-port", &port.to_string()])
        .args(client_only)
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

/// Stops `c`: `sig`, then SIGKILL if it has not exited within `timeout`;
/// its exit status.
pub fn stop(c: &mut Child, sig: libc::c_int, timeout: Duration) -> ExitStatus {
    // SAFETY: signalling a child we started.
    unsafe { libc::kill(c.id() as libc::pid_t, sig) };
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            return c.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Named processes started in namespaces; on drop (also when a test
/// panics) each gets SIGTERM, then SIGKILL after 20 s. Declared after the
/// namespaces they run in, it drops first.
#[derive(Default)]
pub struct Procs(Vec<(String, Child)>);

impl Procs {
    /// `cmd` in namespace `ns` (`ip netns exec`, which execs it: the
    /// child's pid is the command's), stdin closed, stdout in `log.out`,
    /// stderr in `log.err`.
    pub fn spawn(&mut self, name: &str, ns: &str, cmd: &[&str], log: &Path) {
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(fs::File::create(log.with_extension("out")).unwrap())
            .stderr(fs::File::create(log.with_extension("err")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", cmd.join(" ")));
        self.0.push((name.to_owned(), child));
    }

    /// Stops `name` with `sig` (SIGKILL after 20 s); its exit status.
    pub fn stop(&mut self, name: &str, sig: libc::c_int) -> ExitStatus {
        let i = self.0.iter().position(|(n, _)| n == name).unwrap();
        let (_, mut c) = self.0.remove(i);
        stop(&mut c, sig, Duration::from_secs(60))
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            stop(c, libc::SIGTERM, Duration::from_secs(60));
        }
    }
}

/// `flowprobe ARGS` in namespace `ns` (`ip netns exec`, which execs it:
/// the child's pid is flowprobe's), behind the command `prefix` (such as
/// `setpriv …`, which execs it too); stdout in `dir/TAG.json`, stderr in
/// `dir/TAG.err`.
pub fn spawn_flowprobe(
    ns: &str,
    prefix: &[&str],
    args: &[&str],
    dir: &Path,
    tag: &str,
) -> KillOnDrop {
    KillOnDrop(
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(prefix)
            .arg(env!("CARGO_BIN_EXE_flowprobe"))
            .args(args)
            .stdout(fs::File::create(dir.join(format!("{tag}.json"))).unwrap())
            .stderr(fs::File::create(dir.join(format!("{tag}.err"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

/// What `tcpapp_exchange` recorded for `side` (`client` or `server`): each
/// socket's `TCP_INFO` and the bytes written.
pub fn truth(dir: &Path, side: &str) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(dir.join(format!("{side}.json"))).unwrap()).unwrap()
}

/// Names `a_dev` (in `ns.a`) and `b_dev` (in `ns.b`) a veth pair, gives them
/// `ca` and `sa` in a /`plen` (IPv6 without duplicate address detection) and
/// waits until both are up.
pub fn veth_pair(ns: &Netns, a_dev: &str, b_dev: &str, ca: &str, sa: &str, plen: &str) {
    veth(&ns.a, a_dev, &ns.b, b_dev);
    addr_up(&ns.a, a_dev, &format!("{ca}/{plen}"));
    addr_up(&ns.b, b_dev, &format!("{sa}/{plen}"));
    wait_for("the veth to come up", || {
        lower_up(&ns.a, a_dev) && lower_up(&ns.b, b_dev)
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

/// `python3 -c CODE` in namespace `ns` (`ip netns exec`, which execs it).
pub fn python(ns: &str, code: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "python3", "-c", code]);
    cmd
}

/// Runs [`python`] to its end; it must succeed (`what` names it).
pub fn python_ok(ns: &str, code: &str, what: &str) {
    let st = python(ns, code).status().unwrap();
    assert!(st.success(), "{what} failed");
}

/// Checks the record of [`LO_EXCHANGE`]: from 127.0.0.1, 3000 bytes sent,
/// 700 received, no retransmission.
pub fn check_lo_exchange(r: &serde_json::Value) {
    let got = [
        &r["src"],
        &r["sent"]["bytes"],
        &r["received"]["bytes"],
        &r["sent"]["retransmits"],
        &r["received"]["retransmits"],
    ];
    assert_eq!(
        got.map(ToString::to_string),
        ["\"127.0.0.1\"", "3000", "700", "0", "0"],
        "loopback {r}"
    );
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

/// Waits until the ring sockets of one afpacket run in `ns` are bound
/// (`/proc/net/packet`: protocol 0003 = ETH_P_ALL, running).
pub fn wait_for_rings(ns: &str, runs: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    wait_for("the AF_PACKET rings", || {
        let t = sh_out(&["ip", "netns", "exec", ns, "cat", "/proc/net/packet"]);
        let bound = t
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(3) == Some(&"0003") && f.get(5) == Some(&"1")
            })
            .count();
        bound >= cpus * runs
    });
}

/// The uplink of a [`BridgeHost`]: a veth `dev` from the host (address
/// `host_ip`) into an "outside" namespace (`outside_ip`, both /24), the
/// containers' traffic out of it MASQUERADEd (from `containers`, a CIDR),
/// and `published` on `host_ip` DNATed to container 2's port 5001.
pub struct Uplink<'a> {
    pub dev: &'a str,
    pub host_ip: &'a str,
    pub outside_ip: &'a str,
    pub containers: &'a str,
    pub published: u16,
}

/// A container host in namespaces, as Docker lays it out: a bridge in the
/// "host" namespace (address `host_ip`/24), two "containers" on veths into
/// it (`ports` on the host's side, `eth0` with `ips` inside, the bridge as
/// default route), every 13th large TCP packet dropped in each container's
/// (and the outside's) INPUT chain, and optionally an [`Uplink`]; with it
/// bridged frames go through netfilter too (kubelet's
/// `bridge-nf-call-iptables`), so that an answer between two containers of
/// the bridge is translated back. Namespaces `PREFIX-TAG{host,c1,c2,out}`,
/// deleted on drop.
pub struct BridgeHost {
    pub host: Namespace,
    pub c1: Namespace,
    pub c2: Namespace,
    pub outside: Option<Namespace>,
}

impl BridgeHost {
    pub fn build(
        (prefix, tag): (&str, &str),
        bridge: &str,
        (host_ip, ports, ips): (&str, [&str; 2], [&str; 2]),
        uplink: Option<Uplink>,
    ) -> BridgeHost {
        let ns = |n: &str| Namespace::create(prefix, &format!("{tag}{n}"));
        let t = BridgeHost {
            host: ns("host"),
            c1: ns("c1"),
            c2: ns("c2"),
            outside: uplink.as_ref().map(|_| ns("out")),
        };
        let h = t.host.name.as_str();
        sh(&["ip", "-n", h, "link", "add", bridge, "type", "bridge"]);
        addr_up(h, bridge, &format!("{host_ip}/24"));
        for ((c, port), ip) in [&t.c1.name, &t.c2.name].into_iter().zip(ports).zip(ips) {
            veth(h, port, c, "eth0");
            sh(&["ip", "-n", h, "link", "set", port, "master", bridge]);
            link_up(h, port);
            addr_up(c, "eth0", &format!("{ip}/24"));
            sh(&["ip", "-n", c, "route", "add", "default", "via", host_ip]);
            drop_in_input(c, "iptables");
        }
        let in_host = |args: &[&str]| {
            let mut cmd = vec!["ip", "netns", "exec", h];
            cmd.extend(args);
            sh(&cmd);
        };
        if let (Some(u), Some(out)) = (&uplink, &t.outside) {
            veth(h, u.dev, &out.name, "eth0");
            addr_up(h, u.dev, &format!("{}/24", u.host_ip));
            addr_up(&out.name, "eth0", &format!("{}/24", u.outside_ip));
            drop_in_input(&out.name, "iptables");
            in_host(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            in_host(&[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                u.containers,
                "-o",
                u.dev,
                "-j",
                "MASQUERADE",
            ]);
            in_host(&[
                "iptables",
                "-w",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                u.host_ip,
                "-p",
                "tcp",
                "--dport",
                &u.published.to_string(),
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{}:5001", ips[1]),
            ]);
            in_host(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"]);
        }
        wait_for("the bridge ports and the uplink to come up", || {
            ports.iter().all(|p| lower_up(h, p))
                && uplink.as_ref().is_none_or(|u| lower_up(h, u.dev))
        });
        t
    }
}
