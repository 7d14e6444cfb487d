//! Golden replay tests over `fixtures/pcaps/`.
//!
//! For every `NAME.pcap`/`NAME.pcapng`, the JSON output of `flowprobe
//! replay` must equal `NAME.expected.json` byte for byte (an `expect-test`
//! golden, one per capture). Regenerate the expected files with
//! `UPDATE_EXPECT=1 cargo test -p flowprobe --test replay_golden` and review
//! the diff.
//!
//! Where a capture of real kernel traffic has a `NAME.truth.json` (recorded
//! from each socket's TCP_INFO by `fixtures/capture/capture.sh`), the output
//! must also agree with the kernel: per connection and direction,
//! `bytes − retransmitted_bytes` = what the application wrote, `retransmits`
//! = `tcpi_total_retrans`, `retransmitted_bytes` = `tcpi_bytes_retrans` and
//! `bytes` = `tcpi_bytes_sent`. Summed per side, `retransmits` = the
//! namespace's `TcpRetransSegs` delta, and where the truth records a
//! `TCPKeepAlive_delta` (TcpExt), the `probes` a side sent = that delta.

mod common;

use std::fs;

use common::{captures, flowprobe, golden, json_lines, stderr, stdout};
use serde_json::Value;

fn replay(p: &std::path::Path) -> String {
    let out = flowprobe(&["replay", "--format", "json", "--quiet", p.to_str().unwrap()]);
    assert!(out.status.success(), "{}: {}", p.display(), stderr(&out));
    stdout(&out)
}

#[test]
fn replay_matches_golden_files() {
    let caps = captures();
    assert!(!caps.is_empty(), "no fixtures found");
    let failures: Vec<String> = caps
        .iter()
        .filter(|cap| !golden(&cap.with_extension("expected.json"), &replay(cap)))
        .map(|cap| cap.display().to_string())
        .collect();
    assert!(
        failures.is_empty(),
        "differ from their goldens (diffs above): {}",
        failures.join(", ")
    );
}

/// The connection in `conns` between two endpoints, oriented as given.
fn find<'a>(conns: &'a [Value], proto: &str, client: &Value, server: &Value) -> &'a Value {
    conns
        .iter()
        .find(|c| {
            c["proto"] == proto
                && c["src"] == client["addr"]
                && c["sport"] == client["port"]
                && c["dst"] == server["addr"]
                && c["dport"] == server["port"]
        })
        .unwrap_or_else(|| panic!("no {proto} connection {client} -> {server}"))
}

#[test]
fn replay_agrees_with_kernel_truth() {
    let mut checked = 0;
    let mut checked_keepalive = 0;
    for cap in captures() {
        let truth_path = cap.with_extension("truth.json");
        let Ok(truth) = fs::read_to_string(&truth_path) else {
            continue;
        };
        let truth: Value = serde_json::from_str(&truth).unwrap();
        let conns = json_lines(&replay(&cap));
        let name = cap.file_name().unwrap().to_string_lossy().into_owned();
        let mut retrans_by_side = [0u64; 2];
        let mut probes_by_side = [0u64; 2];
        for t in truth["connections"].as_array().unwrap() {
            let proto = t["proto"].as_str().unwrap();
            let c = find(&conns, proto, &t["client"], &t["server"]);
            for (i, (dir, side)) in [("sent", "client"), ("received", "server")]
                .into_iter()
                .enumerate()
            {
                let d = &c[dir];
                let s = &t[side];
                let ctx = format!(
                    "{name} {proto} {}:{} {side}",
                    t["client"]["port"], t["server"]["port"]
                );
                let app = s["app_bytes_written"].as_u64().unwrap();
                let bytes = d["bytes"].as_u64().unwrap();
                let retx_bytes = d["retransmitted_bytes"].as_u64().unwrap();
                assert_eq!(
                    bytes - retx_bytes,
                    app,
                    "{ctx}: bytes - retransmitted_bytes = app bytes"
                );
                if proto == "tcp" {
                    assert_eq!(
                        d["retransmits"], s["tcpi_total_retrans"],
                        "{ctx}: retransmits"
                    );
                    assert_eq!(
                        d["retransmitted_bytes"], s["tcpi_bytes_retrans"],
                        "{ctx}: retransmitted_bytes"
                    );
                    assert_eq!(
                        d["bytes"], s["tcpi_bytes_sent"],
                        "{ctx}: bytes = tcpi_bytes_sent"
                    );
                    retrans_by_side[i] += d["retransmits"].as_u64().unwrap();
                    probes_by_side[i] += d["probes"].as_u64().unwrap();
                } else {
                    assert_eq!(d["packets"], s["datagrams_written"], "{ctx}: datagrams");
                }
                checked += 1;
            }
        }
        let ns = &truth["netns"];
        assert_eq!(
            retrans_by_side,
            [
                ns["client"]["TcpRetransSegs_delta"].as_u64().unwrap(),
                ns["server"]["TcpRetransSegs_delta"].as_u64().unwrap()
            ],
            "{name}: retransmits summed per side = the namespace's TcpRetransSegs"
        );
        // Keepalives (and zero-window probes) are probes, never retransmits.
        for (i, side) in ["client", "server"].into_iter().enumerate() {
            if let Some(ka) = ns[side].get("TCPKeepAlive_delta") {
                assert_eq!(
                    probes_by_side[i],
                    ka.as_u64().unwrap(),
                    "{name}: probes sent by the {side} = its namespace's TCPKeepAlive"
                );
                checked_keepalive += 1;
            }
        }
    }
    assert!(checked > 0, "no fixture has a truth file");
    eprintln!("{checked} directions checked, {checked_keepalive} sides with TCPKeepAlive");
}
