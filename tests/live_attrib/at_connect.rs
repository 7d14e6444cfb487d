//! Attribution at the first packet: a client container that starts, opens
//! hundreds of connections of a few milliseconds each (TCP, and UDP to a
//! DNS-like server, connected and not) and exits, all between two resolver
//! passes, is attributed from what the cgroup programs recorded when it
//! connected: pid, process, container, service on every end. Once with
//! `nsenter --net` (cgroupfs visible to the agent; a Docker container),
//! once with `ip netns exec` (cgroupfs hidden; a Kubernetes pod: pod UID
//! and QoS class too), once on XDP.

use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::container_id;
use crate::common::json_lines;
use crate::common::root::{
    enabled, python, sh_out, tc_attached, veth_pair, wait_for, KillOnDrop, Netns,
};

const TCP: usize = 300;
const UDP: usize = 200;
/// Processes of one connection each, after the bulk client.
const SHORT: usize = 20;

/// The client: names itself, then opens its connections as fast as it can.
const CLIENT: &str = r#"
import ctypes, os, socket, sys
ctypes.CDLL(None).prctl(15, b"checkout-cli", 0, 0, 0)
host, tcp, udp, pids = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
connected = sys.argv[5] == "1"
with open(pids, "a") as f:
    f.write(f"{os.getpid()}\n")
for i in range(tcp):
    c = socket.create_connection((host, 7200))
    c.sendall(b"x" * 100)
    c.recv(100)
    c.close()
udp_ports = set()
for i in range(udp):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    if i % 2 and connected:
        u.connect((host, 5353))
        u.send(b"q" * 40)
        u.recv(512)
    else:
        u.sendto(b"q" * 40, (host, 5353))
        u.recvfrom(512)
    udp_ports.add(u.getsockname()[1])
    u.close()
with open(pids + ".udp", "a") as f:
    f.write("".join(f"{p}\n" for p in udp_ports))
"#;

const SERVERS: &str = r#"
import socket, sys, threading
host, ready = sys.argv[1], sys.argv[2]
t = socket.create_server((host, 7200), backlog=512)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((host, 5353))
def echo(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
def tcp():
    while True:
        c, _ = t.accept()
        threading.Thread(target=echo, args=(c,), daemon=True).start()
def udp():
    while True:
        d, a = u.recvfrom(512)
        u.sendto(d, a)
threading.Thread(target=tcp, daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
open(ready, "w").close()
threading.Event().wait()
"#;

#[derive(Clone, Copy)]
enum Enter {
    /// `nsenter --net`: the agent keeps the host's mounts.
    Nsenter,
    /// `ip netns exec`: a fresh /sys without cgroup mounts.
    IpNetnsExec,
}

#[test]
fn a_short_lived_container_is_attributed_at_connect_with_mounts_visible() {
    scenario(Enter::Nsenter, "tc", "acn");
}

#[test]
fn a_short_lived_container_is_attributed_at_connect_with_mounts_hidden() {
    scenario(Enter::IpNetnsExec, "tc", "acx");
}

/// XDP takes no socket cookie: ends are joined by their port and peer
/// (`sock_ops` gives a TCP socket's port after `connect`, `sendmsg` an
/// unconnected UDP socket's). A connected UDP socket's port is chosen
/// after its only hook ran: the client sends unconnected here.
#[test]
fn a_short_lived_container_is_attributed_at_connect_on_xdp_by_port() {
    scenario(Enter::Nsenter, "xdp", "acd");
}

fn scenario(enter: Enter, backend: &str, tag: &str) {
    if !enabled("live_attrib") {
        return;
    }
    let unified = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2")
                .then(|| pre.split_whitespace().nth(4).map(str::to_owned))?
        })
        .expect("no cgroup2 mount on this host for the test's container cgroup");
    let dir = tempfile::tempdir().unwrap();
    // a: the host (agent, servers); b: the container (client).
    let ns = Netns::create("fpa", tag);
    let (host_ip, client_ip) = ("10.83.0.1", "10.83.0.2");
    let host_dev = format!("{tag}h0");
    veth_pair(
        &ns,
        &host_dev,
        &format!("{tag}c0"),
        host_ip,
        client_ip,
        "24",
    );
    let id = container_id(if matches!(enter, Enter::Nsenter) {
        11
    } else {
        12
    });
    // With mounts hidden, a Kubernetes pod (systemd driver, containerd);
    // otherwise a Docker container.
    let pod = "1234abcd-5678-90ab-cdef-1234567890ab";
    let kube = matches!(enter, Enter::IpNetnsExec);
    let top = PathBuf::from(&unified).join(format!("flowprobe-test-{tag}-{}", std::process::id()));
    let mut dirs = vec![top.clone()];
    if kube {
        let q = top.join("kubepods.slice/kubepods-burstable.slice");
        let p = q.join(format!(
            "kubepods-burstable-pod{}.slice",
            pod.replace('-', "_")
        ));
        dirs.extend([
            top.join("kubepods.slice"),
            q,
            p.clone(),
            p.join(format!("cri-containerd-{id}.scope")),
        ]);
    } else {
        dirs.push(top.join(format!("docker-{id}.scope")));
    }
    let cg = dirs.last().unwrap().clone();
    fs::create_dir_all(&cg).unwrap();
    struct Rm(Vec<PathBuf>);
    impl Drop for Rm {
        fn drop(&mut self) {
            for d in self.0.iter().rev() {
                let _ = fs::remove_dir(d);
            }
        }
    }
    let _rm = Rm(dirs);

    let ready = dir.path().join("ready");
    let mut servers = python(&ns.a, SERVERS);
    servers.args([host_ip, &ready.display().to_string()]);
    let _servers = KillOnDrop(servers.spawn().unwrap());
    wait_for("the servers", || ready.exists());

    let probe_args = [
        env!("CARGO_BIN_EXE_flowprobe"),
        "run",
        "--backend",
        backend,
        "--iface",
        host_dev.as_str(),
        "--format",
        "json",
    ];
    let mut probe = match enter {
        Enter::Nsenter => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", ns.a)).args(probe_args);
            c
        }
        Enter::IpNetnsExec => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.a]).args(probe_args);
            c
        }
    };
    // No resolver pass during the test: only the one at the report, when
    // every client socket is closed and every client process gone.
    probe
        .env("FLOWPROBE_ATTRIB_INTERVAL_MS", "600000")
        .env("FLOWPROBE_ATTRIB_STATS", "1")
        .stdout(fs::File::create(dir.path().join("out.json")).unwrap())
        .stderr(fs::File::create(dir.path().join("out.err")).unwrap());
    let mut probe = KillOnDrop(probe.spawn().unwrap());
    wait_for("flowprobe to attach", || {
        if backend == "xdp" {
            sh_out(&["ip", "-n", &ns.a, "link", "show", &host_dev]).contains("xdp")
        } else {
            tc_attached(&ns.a, &host_dev, "ingress")
        }
    });
    // Give the cgroup programs their moment to attach after tc.
    let err = dir.path().join("out.err");
    std::thread::sleep(Duration::from_millis(300));

    let script = dir.path().join("client.py");
    fs::write(&script, CLIENT).unwrap();
    let pids = dir.path().join("pids");
    // The container: its cgroup, its network namespace, its service.
    let client = format!(
        "echo $$ > {cg}/cgroup.procs && exec ip netns exec {b} sh -c '\
         python3 {s} {h} {TCP} {UDP} {p} {c} && \
         for i in $(seq {SHORT}); do python3 {s} {h} 1 0 {p} {c} || exit 1; done'",
        cg = cg.display(),
        b = ns.b,
        s = script.display(),
        h = host_ip,
        p = pids.display(),
        c = u8::from(backend == "tc"),
    );
    let st = Command::new("sh")
        .args(["-c", &client])
        .env("OTEL_SERVICE_NAME", "checkout")
        .status()
        .unwrap();
    assert!(st.success(), "the client failed");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(
        probe.wait().unwrap().success(),
        "{}",
        fs::read_to_string(&err).unwrap_or_default()
    );

    let pid_list: HashSet<String> = fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(pid_list.len(), 1 + SHORT);
    let out = fs::read_to_string(dir.path().join("out.json")).unwrap();
    let stderr = fs::read_to_string(&err).unwrap_or_default();
    let conns = json_lines(&out);
    let ends: Vec<&serde_json::Value> = conns
        .iter()
        .filter(|c| c["src"] == client_ip && (c["dport"] == 7200 || c["dport"] == 5353))
        .map(|c| &c["src_tags"])
        .collect();
    let tcp = conns
        .iter()
        .filter(|c| c["src"] == client_ip && c["proto"] == "tcp")
        .count();
    let udp = conns
        .iter()
        .filter(|c| c["src"] == client_ip && c["proto"] == "udp")
        .count();
    // UDP has no start: two sockets that drew the same port one after the
    // other are one 5-tuple, one record.
    let udp_tuples = fs::read_to_string(pids.with_extension("udp"))
        .unwrap()
        .lines()
        .collect::<HashSet<_>>()
        .len();
    assert_eq!(
        (tcp, udp),
        (TCP + SHORT, udp_tuples),
        "client connections, once each:\n{stderr}"
    );
    let good = |t: &serde_json::Value| {
        t["pid"].as_str().is_some_and(|p| pid_list.contains(p))
            && t["process"] == "checkout-cli"
            && t["container"] == id.as_str()
            && t["runtime"] == if kube { "containerd" } else { "docker" }
            && (!kube || (t["pod"] == pod && t["qos"] == "burstable"))
            && t["service"] == "checkout"
    };
    // The resolver's passes (one per report) found a handful of sockets
    // (the servers'), not the client's: those were gone.
    let by_pass: usize = stderr
        .split_once(" sockets attributed")
        .and_then(|(pre, _)| pre.rsplit(' ').next()?.parse().ok())
        .expect("FLOWPROBE_ATTRIB_STATS line");
    assert!(
        by_pass < ends.len() / 10,
        "passes saw {by_pass} sockets: the test is to prove attribution without them\n{stderr}"
    );
    // Settled connections take their tags from the last reading at the
    // next ticks instead of being joined again at each.
    let (reused, joined): (usize, usize) = stderr
        .split_once(" connection readings given their settled tags again, ")
        .and_then(|(pre, post)| {
            let reused = pre.rsplit(' ').next()?.parse().ok()?;
            let joined = post.split(' ').next()?.parse().ok()?;
            Some((reused, joined))
        })
        .expect("FLOWPROBE_ATTRIB_STATS memo line");
    assert!(
        reused > 0 && joined <= 2 * conns.len(),
        "{reused} readings reused, {joined} joined afresh for {} connections\n{stderr}",
        conns.len()
    );
    let bad: Vec<&&serde_json::Value> = ends.iter().filter(|t| !good(t)).collect();
    let share = (ends.len() - bad.len()) as f64 / ends.len() as f64;
    eprintln!(
        "attributed at connect: {} of {} container ends ({:.2} %)\n{stderr}",
        ends.len() - bad.len(),
        ends.len(),
        100.0 * share
    );
    assert!(
        share >= 0.999,
        "{} of {} container ends lack pid, process, container or service, e.g. {}\n{stderr}",
        bad.len(),
        ends.len(),
        bad.first().map(ToString::to_string).unwrap_or_default()
    );
}
