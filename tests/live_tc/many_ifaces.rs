//! Interfaces by the hundred: 500 created and deleted while `run` runs,
//! twice. Each is attached when it comes up and forgotten when it goes;
//! the second round leaves `run` with the descriptors and (within a
//! margin) the memory it had after the first, and nothing behind at exit.

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::no_filters_left;
use crate::common::root::{
    enabled, fds, http_get, rss_kb, spawn_flowprobe, stop, wait_for_within, Netns,
};

const PAIRS: usize = 250;
const METRICS: &str = "http://127.0.0.1:9483/metrics";

/// `ip -n NS -batch -` with these commands.
fn batch(ns: &str, cmds: &str) {
    let mut c = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(cmds.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "ip -batch failed");
}

fn gauge(ns: &str, name: &str) -> Option<u64> {
    crate::common::metric(&http_get(ns, METRICS)?, name)
}

#[test]
fn five_hundred_interfaces_come_and_go_without_leaks() {
    if !enabled("live_tc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ns = Netns::create("fpm", "many");
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &["run", "--listen", "127.0.0.1:9483", "--quiet"],
        dir.path(),
        "probe",
    );
    let pid = probe.0.id();
    let attached = || gauge(&ns.a, "flowprobe_attached_interfaces");
    wait_for_within("the agent", Duration::from_secs(90), || {
        attached() == Some(1)
    });

    // A descriptor or two come and go (the agent's clients, netlink dumps).
    let before = fds(pid);
    let create: String = (0..PAIRS)
        .map(|i| format!("link add fpm{i}a type veth peer name fpm{i}b\nlink set fpm{i}a up\nlink set fpm{i}b up\n"))
        .collect();
    let delete: String = (0..PAIRS).map(|i| format!("link del fpm{i}a\n")).collect();
    let mut after = Vec::new();
    for round in 0..2 {
        batch(&ns.a, &create);
        wait_for_within(
            &format!("round {round}: {} interfaces attached", 2 * PAIRS + 1),
            Duration::from_secs(120),
            || attached() == Some(2 * PAIRS as u64 + 1),
        );
        batch(&ns.a, &delete);
        wait_for_within(
            &format!("round {round}: only lo attached again"),
            Duration::from_secs(120),
            || attached() == Some(1),
        );
        after.push((fds(pid), rss_kb(pid)));
        eprintln!(
            "round {round}: {} fds, RSS {} kB",
            after[round].0, after[round].1
        );
    }
    let ((fd1, rss1), (fd2, rss2)) = (after[0], after[1]);
    assert!(
        fd1 <= before + 3 && fd2 <= before + 3,
        "descriptors leaked: {before} before, {fd1} and {fd2} after the rounds"
    );
    assert!(
        rss2 < rss1 + 8 * 1024,
        "memory grew by {} kB in the second round",
        rss2 - rss1
    );
    let st = stop(&mut probe.0, libc::SIGINT, Duration::from_secs(60));
    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe failed: {err}");
    no_filters_left(&ns.a, "lo");
}
