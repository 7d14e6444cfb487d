//! Containers come and go under a running agent: each a namespace of its
//! own on a veth into the agent's namespace, which makes one lossy
//! exchange with a server there and is deleted at once (its veth goes with
//! it, as when a container runtime tears a sandbox down). The agent keeps
//! running, lets go of each interface (the attached count and its
//! descriptors come back to where they were), and at exit every
//! container's connection is there once, equal to its sockets' `TCP_INFO`.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::common::json_lines;
use crate::common::root::{
    addr_up, drop_in_input, enabled, fds, http_get, spawn_flowprobe, stop, tcpapp_exchange, truth,
    veth, wait_for, wait_for_within, Namespace,
};

const CONTAINERS: u16 = 12;
const METRICS: &str = "http://127.0.0.1:9485/metrics";
/// (client writes, server writes) of each container's connection.
const BYTES: (u64, u64) = (300_000, 120_000);

fn attached(ns: &str) -> Option<u64> {
    crate::common::metric(&http_get(ns, METRICS)?, "flowprobe_attached_interfaces")
}

/// Container `i`: created, joined to the host, one exchange (client port
/// `40300 + i`), deleted. Returns its addresses and truth directory.
fn container(host: &str, i: u16, dir: &Path) -> (String, String) {
    let c = Namespace::create("fpgc", &i.to_string());
    let dev = format!("fpg{i}");
    veth(host, &dev, &c.name, "eth0");
    let (h_ip, c_ip) = (format!("10.102.{i}.1"), format!("10.102.{i}.2"));
    addr_up(host, &dev, &format!("{h_ip}/24"));
    addr_up(&c.name, "eth0", &format!("{c_ip}/24"));
    drop_in_input(&c.name, "iptables");
    wait_for("the container's veth", || {
        attached(host).is_some_and(|n| n >= 2)
    });
    let port = 40300 + i;
    tcpapp_exchange(
        &c.name,
        &c_ip,
        host,
        &h_ip,
        dir,
        &[
            "--conn".to_owned(),
            format!("{port}:{}:{}", BYTES.0, BYTES.1),
        ],
    );
    (c_ip, h_ip)
    // `c` dropped: the namespace, and with it both ends of the veth, go.
}

#[test]
fn containers_deleted_under_a_running_agent() {
    if !enabled("live_tc") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let host = Namespace::create("fpg", "host");
    drop_in_input(&host.name, "iptables");
    let mut probe = spawn_flowprobe(
        &host.name,
        &[],
        &["run", "--format", "json", "--listen", "127.0.0.1:9485"],
        dir.path(),
        "probe",
    );
    let pid = probe.0.id();
    wait_for_within("the agent", Duration::from_secs(60), || {
        attached(&host.name) == Some(1)
    });
    let fds_before = fds(pid);

    let mut made = Vec::new();
    for i in 0..CONTAINERS {
        let d = dir.path().join(format!("c{i}"));
        std::fs::create_dir(&d).unwrap();
        let (c_ip, h_ip) = container(&host.name, i, &d);
        made.push((i, c_ip, h_ip, d));
    }
    // Only `lo` is left, and the descriptors the interfaces took are back.
    wait_for_within(
        "the deleted interfaces let go",
        Duration::from_secs(10),
        || attached(&host.name) == Some(1),
    );
    let fds_after = fds(pid);
    assert!(
        fds_after <= fds_before + 2,
        "descriptors: {fds_before} before the containers, {fds_after} after"
    );

    // Attribution's memories, in /metrics: each container's connect was
    // recorded by the kernel, and nothing was forgotten for room.
    let m = http_get(&host.name, METRICS).expect("/metrics");
    let v = |s: &str| crate::common::metric(&m, s).unwrap_or_else(|| panic!("no {s} in /metrics"));
    assert!(
        v("flowprobe_attribution_owner_records_total") >= u64::from(CONTAINERS),
        "{m}"
    );
    assert_eq!(v("flowprobe_attribution_owners_forgotten_total"), 0);
    assert!(v("flowprobe_attribution_owners") <= v("flowprobe_attribution_owners_limit"));
    // The containers' ends share tag sets, all within their bounds.
    let sets = v("flowprobe_attribution_tag_sets");
    assert!(
        sets >= 1 && sets <= v("flowprobe_attribution_tag_sets_limit"),
        "{m}"
    );
    assert_eq!(v("flowprobe_attribution_tag_sets_let_go_total"), 0);
    assert!(v("flowprobe_attribution_netns_ids") <= v("flowprobe_attribution_netns_ids_limit"));
    assert_eq!(v("flowprobe_attribution_netns_ids_cleared_total"), 0);

    let st = stop(&mut probe, libc::SIGINT, Duration::from_secs(30));
    let err = std::fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe failed: {err}");
    let raw = std::fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let out = json_lines(&raw);
    let n = |v: &Value| v.as_u64().unwrap();
    let mut failures = Vec::new();
    let mut retransmits = 0;
    for (i, c_ip, h_ip, d) in &made {
        let port = 40300 + i;
        let recs: Vec<&Value> = out
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["sport"] == port && c["src"] == c_ip.as_str())
            .collect();
        assert_eq!(
            recs.len(),
            1,
            "container {i}: {} records in\n{raw}",
            recs.len()
        );
        let r = recs[0];
        assert_eq!(
            (r["dst"].as_str(), n(&r["dport"])),
            (Some(h_ip.as_str()), 5001)
        );
        let (client, server) = (truth(d, "client"), truth(d, "server"));
        let (ct, st) = (
            &client["tcp"][port.to_string()],
            &server["tcp"][port.to_string()],
        );
        for (what, t, written, dir) in [
            ("client->server", ct, BYTES.0, &r["sent"]),
            ("server->client", st, BYTES.1, &r["received"]),
        ] {
            let got = (
                n(&dir["bytes"]) - n(&dir["retransmitted_bytes"]),
                n(&dir["retransmits"]),
            );
            let want = (written, n(&t["tcpi_total_retrans"]));
            retransmits += want.1;
            if got != want {
                failures.push(format!(
                    "container {i} {what}: flowprobe {got:?} != kernel {want:?}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{CONTAINERS} containers, {retransmits} retransmits, all exact");
    assert!(retransmits > 0, "the loss rules dropped nothing");
}
