//! The rtnetlink clsact helpers `flowprobe run` uses instead of the `tc`
//! program agree with `tc`.

use std::fs;
use std::os::fd::AsRawFd;
use std::process::Command;

use super::baseline_filter;
use crate::common::root::{enabled, ifindex, link_up, sh, sh_out, veth, Netns};

/// Runs `f` on a thread that joins network namespace `ns` first.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = fs::File::open(format!("/run/netns/{ns}")).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns(2) on a valid descriptor; only this thread, which
            // ends after `f`.
            let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// probe/src/os/clsact.rs against the tc binary on a veth in a fresh
/// namespace: an empty clsact reads empty, one with a bpf filter does not
/// (and lists it), `clsact_del` removes the qdisc, and it refuses an
/// `ingress` qdisc (same handle) and a missing one in one line.
#[test]
fn clsact_over_netlink_agrees_with_tc() {
    use super::clsact::{clsact_del, clsact_is_empty, filters_on, Hook};
    if !enabled("live_tc") {
        return;
    }
    let ns = Netns::create("fpl", "nltc");
    veth(&ns.a, "fpt0", &ns.a, "fpt1");
    link_up(&ns.a, "fpt0");
    link_up(&ns.a, "fpt1");
    let index = ifindex(&ns.a, "fpt0");
    let tc = |args: &[&str]| sh(&[&["ip", "netns", "exec", &ns.a, "tc"][..], args].concat());
    let qdiscs = || {
        sh_out(&[
            "ip", "netns", "exec", &ns.a, "tc", "qdisc", "show", "dev", "fpt0",
        ])
    };

    tc(&["qdisc", "add", "dev", "fpt0", "clsact"]);
    assert!(in_netns(&ns.a, || clsact_is_empty(index).unwrap()));

    baseline_filter(&ns.a, "fpt0", "egress", "7");
    let (empty, ingress, egress) = in_netns(&ns.a, || {
        (
            clsact_is_empty(index).unwrap(),
            filters_on(index, Hook::Ingress).unwrap(),
            filters_on(index, Hook::Egress).unwrap(),
        )
    });
    assert!(!empty);
    assert!(ingress.is_empty(), "{ingress:?}");
    // One entry a line of `tc filter show`: the priority's (handle 0),
    // then the filter's.
    let shown = sh_out(&[
        "ip", "netns", "exec", &ns.a, "tc", "filter", "show", "dev", "fpt0", "egress",
    ]);
    let lines = shown.lines().filter(|l| l.starts_with("filter")).count();
    assert_eq!(egress.len(), lines, "{egress:?} vs tc's\n{shown}");
    assert_eq!(egress[0].handle, 0, "{egress:?}");
    // ETH_P_ALL: `protocol all`, tc's default.
    assert!(
        egress
            .iter()
            .any(
                |f| (f.kind.as_str(), f.priority, f.protocol, f.chain) == ("bpf", 7, 3, 0)
                    && f.handle != 0
            ),
        "{egress:?}"
    );

    in_netns(&ns.a, || clsact_del(index)).unwrap();
    let q = qdiscs();
    assert!(!q.contains("clsact"), "clsact still there: {q}");

    // Refused as `tc qdisc del` is refused, in one line: no clsact any more
    // (the ingress queue stays, with handle 0), and an `ingress` qdisc,
    // which has the same handle.
    let refused = |what: &str| {
        let ours = in_netns(&ns.a, || clsact_del(index))
            .unwrap_err()
            .to_string();
        let out = Command::new("ip")
            .args([
                "netns", "exec", &ns.a, "tc", "qdisc", "del", "dev", "fpt0", "clsact",
            ])
            .output()
            .unwrap();
        let theirs = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: {ours} (tc: {})", theirs.trim());
        let text = theirs
            .trim()
            .trim_start_matches("Error: ")
            .trim_end_matches('.');
        assert!(
            !out.status.success() && !ours.contains('\n') && ours.starts_with(text),
            "{what}: {ours} vs tc's {theirs}"
        );
    };
    refused("no clsact");
    tc(&["qdisc", "add", "dev", "fpt0", "ingress"]);
    refused("an ingress qdisc");
    let q = qdiscs();
    assert!(q.contains("ingress"), "the ingress qdisc is gone: {q}");
}
