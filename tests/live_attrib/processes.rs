//! Every connection's ends
//! carry the pid, process name, container, pod and service of the
//! processes that own their sockets, across network namespaces.
//!
//! Two fresh network namespaces joined by a veth stand for two container
//! hosts' worth of network; three processes stand for containers, each in a
//! cgroup whose path has a real runtime's shape (docker's systemd scope in
//! the v1 `pids` hierarchy, a Kubernetes cgroupfs pod path, podman's scope
//! in the cgroup2 hierarchy), each with its own name (`prctl`) and service
//! variable (`OTEL_SERVICE_NAME` or `DD_SERVICE`):
//!
//! - `fpa-client` (namespace A, docker) talks to `fpa-server` (namespace B,
//!   Kubernetes pod) over TCP and UDP, and to `fpa-cache` (namespace A,
//!   podman) over loopback;
//! - then it opens 500 TCP connections to `fpa-server` that live 50 ms each,
//!   10 at a time: the attributed fraction is printed and must reach
//!   [`SHORT_MIN`].
//!
//! `flowprobe run` runs in namespace A only: the server's end is found by
//! searching every namespace of the host.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::container_id;
use crate::common::root::{
    enabled, netns_inode, sh_out, tc_attached, veth_pair, wait_for, KillOnDrop, Netns,
};
use crate::common::{json_lines, repo_root};

/// Short-lived connections whose both ends must be attributed. A pass runs
/// every 20 ms and a 50 ms connection is looked up from the moment its
/// first packet is in the kernel map, so all should be; the margin is for a
/// pass delayed by more than the connection's life on 2 shared vCPUs.
const SHORT_MIN: f64 = 0.98;

/// A cgroup directory tree made for the test; removed (leaf first) on drop,
/// after the processes in it are gone.
struct Cgroup {
    /// Created directories, outermost first.
    dirs: Vec<PathBuf>,
}

impl Cgroup {
    /// `root/rel`, creating every missing level.
    fn create(root: &str, rel: &str) -> Cgroup {
        let mut dirs = Vec::new();
        let mut p = PathBuf::from(root);
        for seg in rel.split('/') {
            p.push(seg);
            if !p.exists() {
                fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
                dirs.push(p.clone());
            }
        }
        Cgroup { dirs }
    }

    fn procs(&self) -> PathBuf {
        self.dirs.last().unwrap().join("cgroup.procs")
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for d in self.dirs.iter().rev() {
            // A killed process leaves its cgroup a moment after the kill.
            for _ in 0..100 {
                if fs::remove_dir(d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn app() -> PathBuf {
    repo_root().join("tests/live_attrib/app.py")
}

/// `app.py NAME PROCS ARGS…` in namespace `ns`, with `env`.
fn spawn_app(ns: &str, env: (&str, &str), name: &str, cg: &Cgroup, args: &[&str]) -> Child {
    // nsenter, not `ip netns exec`: that one mounts a fresh /sys, without
    // the cgroup hierarchies the app must write to.
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["--", "env", &format!("{}={}", env.0, env.1)])
        .arg("/usr/bin/python3")
        .arg(app())
        .arg(name)
        .arg(cg.procs())
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .unwrap()
}

struct Expect<'a> {
    pid: u64,
    process: &'a str,
    container: &'a str,
    runtime: Option<&'a str>,
    pod: Option<&'a str>,
    service: &'a str,
    netns: u64,
}

/// Differences between an end's tags and what it should carry.
fn mismatches(tags: &Value, e: &Expect) -> Vec<String> {
    let mut want = vec![
        ("pid", e.pid.to_string()),
        ("process", e.process.to_owned()),
        ("container", e.container.to_owned()),
        ("service", e.service.to_owned()),
        ("netns", e.netns.to_string()),
    ];
    if let Some(r) = e.runtime {
        want.push(("runtime", r.to_owned()));
    }
    if let Some(p) = e.pod {
        want.push(("pod", p.to_owned()));
        want.push(("qos", "burstable".to_owned()));
    }
    want.into_iter()
        .filter(|(k, v)| tags[*k].as_str() != Some(v.as_str()))
        .map(|(k, v)| format!("{k}: want {v}, got {}", tags[k]))
        .collect()
}

#[test]
fn every_end_carries_its_process_container_and_service() {
    if !enabled("live_attrib") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fpa", "attrib");
    veth_pair(&ns, "fpa0", "fpa1", "10.81.0.1", "10.81.0.2", "24");
    let (ns_a, ns_b) = (netns_inode(&ns.a).unwrap(), netns_inode(&ns.b).unwrap());
    let id = std::process::id();
    let (client_id, server_id, cache_id) = (container_id(1), container_id(2), container_id(3));
    let pod = format!("{:08x}-7e57-4a11-8b0b-{:012x}", id, 0xf10f_u64);
    let cg_client = Cgroup::create(
        "/sys/fs/cgroup/pids",
        &format!("fpa-{id}/system.slice/docker-{client_id}.scope"),
    );
    let cg_server = Cgroup::create(
        "/sys/fs/cgroup/pids",
        &format!("fpa-{id}/kubepods/burstable/pod{pod}/{server_id}"),
    );
    let cg_cache = Cgroup::create(
        "/sys/fs/cgroup/unified",
        &format!("fpa-{id}/machine.slice/libpod-{cache_id}.scope"),
    );

    let ready = dir.path().join("ready");
    let ready_s = ready.to_str().unwrap();
    let server = KillOnDrop(spawn_app(
        &ns.b,
        ("OTEL_SERVICE_NAME", "fpa-payments"),
        "fpa-server",
        &cg_server,
        &[
            "server",
            "--tcp",
            "10.81.0.2:8080",
            "--udp",
            "10.81.0.2:5353",
            "--ready",
            ready_s,
        ],
    ));
    wait_for("the server", || ready.exists());
    fs::remove_file(&ready).unwrap();
    let cache = KillOnDrop(spawn_app(
        &ns.a,
        ("DD_SERVICE", "fpa-cache-svc"),
        "fpa-cache",
        &cg_cache,
        &["server", "--tcp", "127.0.0.1:9090", "--ready", ready_s],
    ));
    wait_for("the cache", || ready.exists());

    let out = dir.path().join("probe.json");
    let err = dir.path().join("probe.err");
    let probe = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args(["run", "--format", "json", "--duration", "120"])
        .env("FLOWPROBE_ATTRIB_STATS", "1")
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let probe = KillOnDrop(probe);
    wait_for("flowprobe to attach", || {
        tc_attached(&ns.a, "fpa0", "ingress")
            && tc_attached(&ns.a, "fpa0", "egress")
            && tc_attached(&ns.a, "lo", "ingress")
    });

    let ports_file = dir.path().join("client.json");
    let t0 = Instant::now();
    let client = spawn_app(
        &ns.a,
        ("OTEL_SERVICE_NAME", "fpa-checkout"),
        "fpa-client",
        &cg_client,
        &[
            "client",
            "--server",
            "10.81.0.2",
            "--loop",
            "127.0.0.1:9090",
            "--long",
            "3",
            "--udp-n",
            "2",
            "--short",
            "500",
            "--short-ms",
            "50",
            "--parallel",
            "10",
            "--out",
            ports_file.to_str().unwrap(),
        ],
    )
    .wait_with_output()
    .unwrap();
    assert!(client.status.success(), "the client failed");
    eprintln!("client done in {:.1} s", t0.elapsed().as_secs_f64());
    let ports: Value = serde_json::from_str(&fs::read_to_string(&ports_file).unwrap()).unwrap();

    let mut probe = probe;
    // SAFETY: kill(2) on our child's pid.
    unsafe { libc::kill(probe.0.id() as i32, libc::SIGINT) };
    assert!(
        probe.0.wait().unwrap().success(),
        "flowprobe failed: {}",
        fs::read_to_string(&err).unwrap()
    );
    let stderr = fs::read_to_string(&err).unwrap();
    eprintln!("{stderr}");
    let text = fs::read_to_string(&out).unwrap();
    let conns = json_lines(&text);
    drop((server, cache));

    let client_e = Expect {
        pid: ports["pid"].as_u64().unwrap(),
        process: "fpa-client",
        container: &client_id,
        runtime: Some("docker"),
        pod: None,
        service: "fpa-checkout",
        netns: ns_a,
    };
    // `ip netns exec` execs the command: the child's pid is python's.
    let server_pid = {
        let s = sh_out(&[
            "pgrep",
            "-f",
            &format!("fpa-server {}", cg_server.procs().display()),
        ]);
        s.split_whitespace()
            .next()
            .map(|p| p.parse().unwrap())
            .unwrap_or(0)
    };
    let _ = server_pid;
    let find = |proto: &str, sport: u64, dport: u64| -> &Value {
        conns
            .iter()
            .find(|c| c["proto"] == proto && c["sport"] == sport && c["dport"] == dport)
            .unwrap_or_else(|| {
                panic!("no {proto} connection from port {sport} to {dport} in:\n{text}")
            })
    };
    let server_e = |pid: u64| Expect {
        pid,
        process: "fpa-server",
        container: &server_id,
        runtime: None,
        pod: Some(&pod),
        service: "fpa-payments",
        netns: ns_b,
    };
    let cache_e = |pid: u64| Expect {
        pid,
        process: "fpa-cache",
        container: &cache_id,
        runtime: Some("podman"),
        pod: None,
        service: "fpa-cache-svc",
        netns: ns_a,
    };
    let pid_of = |c: &Value| {
        c["dst_tags"]["pid"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };

    // Long-lived TCP, UDP and loopback: every end, exactly.
    let mut failures = Vec::new();
    for (kind, proto, dport) in [
        ("long", "tcp", 8080),
        ("udp", "udp", 5353),
        ("loop", "tcp", 9090),
    ] {
        let list = ports[kind].as_array().unwrap();
        assert!(!list.is_empty());
        for p in list {
            let c = find(proto, p.as_u64().unwrap(), dport);
            let dst = if kind == "loop" {
                cache_e(pid_of(c))
            } else {
                server_e(pid_of(c))
            };
            for (end, tags, e) in [
                ("src", &c["src_tags"], &client_e),
                ("dst", &c["dst_tags"], &dst),
            ] {
                for m in mismatches(tags, e) {
                    failures.push(format!("{kind} {proto} port {p} {end}: {m}"));
                }
            }
        }
    }
    // The server ends all belong to one process each.
    let server_pids: std::collections::BTreeSet<u64> = ports["long"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| pid_of(find("tcp", p.as_u64().unwrap(), 8080)))
        .collect();
    assert_eq!(server_pids.len(), 1, "{server_pids:?}");
    let server_pid = *server_pids.iter().next().unwrap();
    assert!(failures.is_empty(), "{}\n{text}", failures.join("\n"));

    // Short-lived: all counted; the fraction attributed at both ends.
    let short = ports["short"].as_array().unwrap();
    assert_eq!(short.len(), 500);
    let (mut src_ok, mut dst_ok, mut both_ok) = (0, 0, 0);
    let mut misses = Vec::new();
    for p in short {
        let c = find("tcp", p.as_u64().unwrap(), 8080);
        let s = mismatches(&c["src_tags"], &client_e).is_empty();
        let d = mismatches(&c["dst_tags"], &server_e(server_pid)).is_empty();
        src_ok += s as usize;
        dst_ok += d as usize;
        both_ok += (s && d) as usize;
        if !(s && d) {
            misses.push(format!(
                "port {p}: src {} dst {}",
                c["src_tags"], c["dst_tags"]
            ));
        }
    }
    let n = short.len() as f64;
    let frac = both_ok as f64 / n;
    eprintln!(
        "short-lived connections (50 ms, 10 at a time): {} of {}; attributed: client end {:.1} %, server end {:.1} %, both {:.1} %",
        short.len(),
        short.len(),
        100.0 * src_ok as f64 / n,
        100.0 * dst_ok as f64 / n,
        100.0 * frac
    );
    for m in misses.iter().take(10) {
        eprintln!("  not attributed: {m}");
    }
    assert!(
        frac >= SHORT_MIN,
        "attributed {:.1} % < {:.1} %",
        100.0 * frac,
        100.0 * SHORT_MIN
    );
    // Processes (dropped above) before their cgroups; these last to first,
    // since the later ones sit inside directories the first one created.
    drop(cg_cache);
    drop(cg_server);
    drop(cg_client);
}
