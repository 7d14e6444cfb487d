//! The next start after a `kill -9` removes what the killed run left, and
//! only that.

use std::process::{Command, Stdio};

use super::no_filters_left;
use crate::common::root::{
    enabled, link_up, sh, sh_out, tc_attached, veth, wait_for, KillOnDrop, Netns,
};

/// After `kill -9` the filters and the clsact qdisc stay; the next start
/// removes them and says so in one line, and leaves another program's
/// filter and the clsact qdisc it sits in alone.
#[test]
fn next_run_removes_what_a_killed_run_left() {
    if !enabled("live_tc") {
        return;
    }
    let ns = Netns::create("fpl", "kill");
    veth(&ns.a, "fpk0", &ns.a, "fpk1");
    link_up(&ns.a, "fpk0");
    link_up(&ns.a, "fpk1");
    // Someone else's clsact and filter on fpk1: they must survive.
    let exec = ["ip", "netns", "exec", &ns.a];
    sh(&[&exec[..], &["tc", "qdisc", "add", "dev", "fpk1", "clsact"]].concat());
    super::baseline_filter(&ns.a, "fpk1", "ingress", "1");
    let probe = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args(["run", "--format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut probe = KillOnDrop(probe);
    wait_for("flowprobe to attach", || {
        ["lo", "fpk0", "fpk1"].iter().all(|d| {
            tc_attached(&ns.a, d, "ingress") && (*d == "lo" || tc_attached(&ns.a, d, "egress"))
        })
    });
    // `ip netns exec` execs flowprobe, so the child's pid is flowprobe's.
    sh(&["kill", "-9", &probe.0.id().to_string()]);
    let _ = probe.0.wait();
    assert!(
        tc_attached(&ns.a, "fpk0", "egress"),
        "kill -9 left nothing?"
    );

    let out = Command::new("ip")
        .args(["netns", "exec", &ns.a, env!("CARGO_BIN_EXE_flowprobe")])
        .args(["run", "--duration", "0", "--format", "json", "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    eprintln!("second run: {err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("flowprobe: removed what a killed flowprobe run left:"),
        "{err}"
    );
    for d in ["lo", "fpk0", "fpk1"] {
        assert!(err.contains(d), "{err}");
    }
    no_filters_left(&ns.a, "lo");
    no_filters_left(&ns.a, "fpk0");
    // fpk1: ours gone, the other filter and its clsact still there.
    assert!(!tc_attached(&ns.a, "fpk1", "ingress") && !tc_attached(&ns.a, "fpk1", "egress"));
    let theirs = sh_out(
        &[
            &exec[..],
            &["tc", "filter", "show", "dev", "fpk1", "ingress"],
        ]
        .concat(),
    );
    assert!(
        theirs.contains("tc-baseline"),
        "the other filter is gone: {theirs}"
    );
    let q = sh_out(&[&exec[..], &["tc", "qdisc", "show", "dev", "fpk1"]].concat());
    assert!(q.contains("clsact"), "the other clsact is gone: {q}");
}
