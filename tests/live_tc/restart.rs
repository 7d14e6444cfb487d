//! `run --state-dir` across a `kill -9` (docs/restart.md): the next run
//! adopts the kernel table and the filters, the export continues exactly,
//! a one-shot run in between takes nothing, a clean stop leaves nothing.
//!
//! The probe runs under `nsenter --net` (not `ip netns exec`, which mounts
//! a fresh /sys over the host's and with it hides bpffs).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::no_filters_left;
use crate::common::json_lines;
use crate::common::root::{
    conn_args, drop_in_input, enabled, http_get, sh_out, stop, tc_attached, tcpapp_exchange, truth,
    veth_pair, wait_for_within, KillOnDrop, Netns,
};

const DEV_A: &str = "fprs0";
const DEV_B: &str = "fprs1";
const CA: &str = "10.97.0.1";
const SA: &str = "10.97.0.2";
const LISTEN: &str = "127.0.0.1:9917";

/// (client port, client writes, server writes), each side writing at
/// [`PACE`]: seconds of traffic each way. The last two end early: the
/// first is drained and retired (`--keep-ended 1.5`) and its slot freed
/// before the kill, the second is drained and held when the kill comes.
const CONNS: [(u16, u64, u64); 5] = [
    (40100, 1_400_000, 900_000),
    (40101, 800_000, 1_400_000),
    (40102, 1_200_000, 600_000),
    (40103, 30_000, 30_000),
    (40104, 300_000, 150_000),
];
const PACE: &str = "300000";

fn setup(tag: &str) -> Netns {
    let ns = Netns::create("fprs", tag);
    veth_pair(&ns, DEV_A, DEV_B, CA, SA, "24");
    for n in [&ns.a, &ns.b] {
        drop_in_input(n, "iptables");
    }
    ns
}

/// `flowprobe run ARGS` in `ns` through `nsenter --net` (it execs, so the
/// child's pid is flowprobe's); stdout and stderr in `dir/TAG.{out,err}`.
fn spawn(ns: &str, args: &[&str], dir: &Path, tag: &str) -> KillOnDrop {
    KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg(env!("CARGO_BIN_EXE_flowprobe"))
            .arg("run")
            .args(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(dir.join(format!("{tag}.out"))).unwrap())
            .stderr(fs::File::create(dir.join(format!("{tag}.err"))).unwrap())
            .spawn()
            .unwrap(),
    )
}

fn err(dir: &Path, tag: &str) -> String {
    fs::read_to_string(dir.join(format!("{tag}.err"))).unwrap_or_default()
}

/// The flowprobe filters on `DEV_A`'s `hook`: (pref, handle, program id).
fn filters(ns: &str, hook: &str) -> Vec<(String, String, String)> {
    let text = sh_out(&[
        "ip", "netns", "exec", ns, "tc", "filter", "show", "dev", DEV_A, hook,
    ]);
    text.lines()
        .filter(|l| l.contains(probe_common::contract::TC_PROGRAM))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let after = |k: &str| {
                let i = w.iter().position(|x| *x == k).unwrap();
                w[i + 1].to_owned()
            };
            (after("pref"), after("handle"), after("id"))
        })
        .collect()
}

/// Waits until the run has loaded and attached (a debug build takes
/// seconds to load) and kept its state.
fn wait_attached(ns: &str, state: &Path, dir: &Path, tag: &str) {
    wait_for_within(
        &format!("{tag} to attach ({})", err(dir, tag)),
        Duration::from_secs(120),
        || tc_attached(ns, DEV_A, "egress") && state.join("kernel.json").exists(),
    );
}

fn netns_ino(ns: &str) -> u64 {
    fs::metadata(format!("/run/netns/{ns}")).unwrap().ino()
}

/// Nothing of the state left: no pins for this namespace under bpffs, no
/// file in the state directory, no record beside the namespace lock.
fn nothing_kept(ns: &str, state: &Path) {
    let ino = netns_ino(ns);
    let pins: Vec<PathBuf> = fs::read_dir("/sys/fs/bpf/flowprobe")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        !pins
            .iter()
            .any(|p| p.to_string_lossy().ends_with(&format!("-{ino}"))),
        "pins left: {pins:?}"
    );
    let left: Vec<PathBuf> = fs::read_dir(state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "state left: {left:?}");
    let kept: Vec<PathBuf> = fs::read_dir("/run/flowprobe")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains(&format!("netns-{ino}.kept-")))
        .collect();
    assert!(kept.is_empty(), "records left: {kept:?}");
}

/// The sum of every `flowprobe_sent_bytes_total` series, once the agent
/// has one.
fn sent_bytes_total(ns: &str) -> Option<u64> {
    let text = http_get(ns, &format!("http://{LISTEN}/metrics"))?;
    let values: Vec<u64> = text
        .lines()
        .filter(|l| l.starts_with("flowprobe_sent_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Kills the run with SIGKILL in the middle of lossy transfers and starts
/// it again at once: the export's deltas, summed per connection, equal
/// every socket's `TCP_INFO` both ways; the filter stayed in place through
/// the gap (same priority and handle, the dead run's program until the new
/// one replaced it); `/metrics` did not go back; a clean stop leaves
/// nothing.
#[test]
fn sigkill_mid_transfer_and_restart_loses_nothing() {
    if !enabled("live_tc") {
        return;
    }
    let ns = setup("restart");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let export = d.join("export.jsonl");
    let args = [
        "--iface",
        DEV_A,
        "--state-dir",
        state.to_str().unwrap(),
        "--export-jsonl",
        export.to_str().unwrap(),
        "--interval",
        "0.2",
        "--closed-timeout",
        "0.3",
        "--keep-ended",
        "1.5",
        "--listen",
        LISTEN,
        "--format",
        "json",
    ];
    let mut first = spawn(&ns.a, &args, d, "run1");
    wait_attached(&ns.a, &state, d, "run1");
    let before_kill = (filters(&ns.a, "ingress"), filters(&ns.a, "egress"));
    assert_eq!(
        (before_kill.0.len(), before_kill.1.len()),
        (1, 1),
        "{before_kill:?}"
    );

    let traffic_start = Instant::now();
    let traffic = {
        let (a, b, d) = (ns.a.clone(), ns.b.clone(), d.to_owned());
        std::thread::spawn(move || {
            let mut args = conn_args(&CONNS);
            args.extend(["--pace".to_owned(), PACE.to_owned()]);
            tcpapp_exchange(&a, CA, &b, SA, &d, &args);
        })
    };
    // Mid-transfer: each connection has lines in the export.
    wait_for_within(
        "every connection in the export",
        Duration::from_secs(60),
        || {
            let text = fs::read_to_string(&export).unwrap_or_default();
            CONNS
                .iter()
                .all(|(p, _, _)| text.contains(&format!("\"sport\":{p}")))
        },
    );
    if let Some(rest) = Duration::from_millis(2600).checked_sub(traffic_start.elapsed()) {
        std::thread::sleep(rest);
    }
    let metrics_before = sent_bytes_total(&ns.a).expect("/metrics before the kill");
    stop(&mut first.0, libc::SIGKILL, Duration::from_secs(10));
    let exported_before = fs::read_to_string(&export).unwrap().lines().count();
    // The filters outlive the process: counting goes on through the gap.
    assert_eq!(
        (filters(&ns.a, "ingress"), filters(&ns.a, "egress")),
        before_kill,
        "the filters changed with the kill"
    );
    assert!(
        !traffic.is_finished(),
        "the transfers ended before the kill"
    );

    let started = Instant::now();
    let mut second = spawn(&ns.a, &args, d, "run2");
    wait_for_within("the second run to adopt", Duration::from_secs(120), || {
        err(d, "run2").contains("adopted the kernel table")
    });
    eprintln!(
        "adopted after {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        err(d, "run2")
    );
    // Taken over in place: same priority and handle, the new program.
    let after = (filters(&ns.a, "ingress"), filters(&ns.a, "egress"));
    for (b, a) in [(&before_kill.0, &after.0), (&before_kill.1, &after.1)] {
        assert_eq!(a.len(), 1, "{after:?}");
        assert_eq!((&a[0].0, &a[0].1), (&b[0].0, &b[0].1), "{after:?}");
        assert_ne!(a[0].2, b[0].2, "still the dead run's program: {after:?}");
    }
    let mut metrics_after = None;
    wait_for_within(
        "/metrics after the restart",
        Duration::from_secs(30),
        || {
            metrics_after = sent_bytes_total(&ns.a);
            metrics_after.is_some()
        },
    );
    let metrics_after = metrics_after.unwrap();
    eprintln!("flowprobe_sent_bytes_total: {metrics_before} before the kill, {metrics_after} after the restart");
    assert!(
        metrics_after >= metrics_before,
        "/metrics went back: {metrics_before} -> {metrics_after}"
    );

    traffic.join().expect("the transfers failed");
    // Let the last segments land in a tick, then a clean stop.
    std::thread::sleep(Duration::from_millis(500));
    let st = stop(&mut second.0, libc::SIGTERM, Duration::from_secs(60));
    assert!(st.success(), "second run: {}", err(d, "run2"));
    eprintln!("first run: {}", err(d, "run1"));
    eprintln!("second run: {}", err(d, "run2"));

    let lines = json_lines(&fs::read_to_string(&export).unwrap());
    eprintln!(
        "{} export lines ({exported_before} when the first run was killed)",
        lines.len()
    );
    check(&lines, d);
    no_filters_left(&ns.a, DEV_A);
    nothing_kept(&ns.a, &state);
}

/// The export's TCP lines summed per connection against both sockets'
/// `TCP_INFO`: `bytes − retransmitted_bytes` = written, `retransmits` =
/// `tcpi_total_retrans`, `retransmitted_bytes` = `tcpi_bytes_retrans`,
/// `bytes` = `tcpi_bytes_sent`, each direction.
fn check(lines: &[Value], d: &Path) {
    let (client, server) = (truth(d, "client"), truth(d, "server"));
    let n = |v: &Value| v.as_u64().unwrap();
    let mut failures = Vec::new();
    let mut retrans = 0;
    for (port, c_bytes, s_bytes) in CONNS {
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["proto"] == "tcp" && l["sport"] == port)
            .collect();
        assert!(!mine.is_empty(), "no line of port {port}");
        for l in &mine {
            assert_eq!(
                (l["src"].as_str(), l["dst"].as_str(), l["dport"].as_u64()),
                (Some(CA), Some(SA), Some(5001)),
                "orientation of {l}"
            );
        }
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        for (way, t, written, side) in [
            ("client->server", ct, c_bytes, "sent"),
            ("server->client", st, s_bytes, "received"),
        ] {
            let sum = |f: &str| mine.iter().map(|l| n(&l[side][f])).sum::<u64>();
            let got = (
                sum("bytes") - sum("retransmitted_bytes"),
                sum("retransmits"),
                sum("retransmitted_bytes"),
                sum("bytes"),
            );
            let want = (
                written,
                n(&t["tcpi_total_retrans"]),
                n(&t["tcpi_bytes_retrans"]),
                n(&t["tcpi_bytes_sent"]),
            );
            eprintln!(
                "port {port} {way}: (bytes-retx_bytes, retransmits, retx_bytes, bytes) \
                 export {got:?}, kernel {want:?} ({} lines)",
                mine.len()
            );
            if got != want {
                failures.push(format!(
                    "port {port} {way}: export {got:?} != kernel {want:?}"
                ));
            }
            retrans += want.1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(retrans > 0, "the loss produced no retransmission");
}

/// A daemon killed; a one-shot run (without --state-dir, under `ip netns
/// exec`, where bpffs is not visible) while it is gone removes none of its
/// filters; the daemon's next start adopts them; a second daemon on the
/// same state directory is refused in one line; a clean stop leaves
/// nothing.
#[test]
fn a_one_shot_run_leaves_a_dead_daemons_state_alone() {
    if !enabled("live_tc") {
        return;
    }
    let ns = setup("oneshot");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    let args = [
        "--iface",
        DEV_A,
        "--state-dir",
        state.to_str().unwrap(),
        "--format",
        "json",
    ];
    let mut daemon = spawn(&ns.a, &args, d, "daemon1");
    wait_attached(&ns.a, &state, d, "daemon1");
    stop(&mut daemon.0, libc::SIGKILL, Duration::from_secs(10));
    let kept = (filters(&ns.a, "ingress"), filters(&ns.a, "egress"));
    assert_eq!((kept.0.len(), kept.1.len()), (1, 1), "{kept:?}");

    let out = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args([
            "run",
            "--iface",
            DEV_A,
            "--duration",
            "0",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let one_shot = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{one_shot}");
    assert!(!one_shot.contains("removed"), "{one_shot}");
    assert_eq!(
        (filters(&ns.a, "ingress"), filters(&ns.a, "egress")),
        kept,
        "the one-shot run changed the daemon's filters: {one_shot}"
    );
    assert!(state.join("kernel.json").exists());

    let mut daemon = spawn(&ns.a, &args, d, "daemon2");
    wait_for_within("the daemon to adopt", Duration::from_secs(120), || {
        err(d, "daemon2").contains("filters taken over on 2 hooks")
    });
    let twice = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.a))
        .arg(env!("CARGO_BIN_EXE_flowprobe"))
        .arg("run")
        .args(args)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&twice.stderr);
    assert!(!twice.status.success());
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("another flowprobe run"), "{e}");
    let st = stop(&mut daemon.0, libc::SIGTERM, Duration::from_secs(60));
    assert!(st.success(), "{}", err(d, "daemon2"));
    no_filters_left(&ns.a, DEV_A);
    nothing_kept(&ns.a, &state);
}
