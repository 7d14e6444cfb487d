//! The export's disk fills up while connections are counted: the intervals
//! that cannot be written are counted (`/health`, `/metrics`) and said once
//! on stderr, the agent keeps counting, and once there is room again the
//! file catches up: every connection's lines, summed, equal its sockets'
//! `TCP_INFO`. A real full filesystem (a tmpfs of its own, filled with
//! `dd`), not a mock of `write`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::{against_tcp_info, setup, traffic, CONNS, UDP_DATAGRAMS, UDP_PORT, VETH_A};
use crate::common::root::{enabled, http_get, sh, spawn_flowprobe, stop, truth, wait_for_within};
use crate::common::{json_lines, metric};

const AGENT: &str = "http://127.0.0.1:9484";

/// Unmounts the test's filesystem, however the test ends.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

fn export_health(ns: &str) -> Option<Value> {
    let h: Value = serde_json::from_str(&http_get(ns, &format!("{AGENT}/health"))?).ok()?;
    Some(h["export"].clone())
}

#[test]
fn a_full_disk_delays_the_export_and_loses_nothing() {
    if !enabled("live_tc") {
        return;
    }
    let (ns, ca, sa) = setup("df", false);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    fs::create_dir(&disk).unwrap();
    sh(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=1m",
        "fp-disk-full",
        disk.to_str().unwrap(),
    ]);
    let _mounted = Mounted(&disk);
    let export = disk.join("export.jsonl");
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &[
            "run",
            "--iface",
            VETH_A,
            "--format",
            "json",
            "--listen",
            "127.0.0.1:9484",
            "--export-jsonl",
            export.to_str().unwrap(),
        ],
        dir.path(),
        "probe",
    );
    wait_for_within("flowprobe's first reading", Duration::from_secs(60), || {
        export_health(&ns.a).is_some_and(|e| e.is_object())
    });

    // Fill the filesystem to the last block; `dd` fails when it is full.
    let filler = disk.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "status=none"])
        .arg(format!("of={}", filler.display()))
        .status()
        .unwrap();
    traffic(&ns, ca, sa, dir.path());
    wait_for_within(
        "three intervals not written",
        Duration::from_secs(30),
        || export_health(&ns.a).is_some_and(|e| e["failed_writes"].as_u64() >= Some(3)),
    );
    let health = export_health(&ns.a).unwrap();
    assert_eq!(health["behind"], true, "{health}");
    assert!(
        health["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left on device")),
        "{health}"
    );
    let metrics = http_get(&ns.a, &format!("{AGENT}/metrics")).unwrap();
    assert!(
        metric(&metrics, "flowprobe_export_failed_writes_total") >= Some(3),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "flowprobe_export_behind"),
        Some(1),
        "{metrics}"
    );

    // Room again: the file catches up by itself, before any stop.
    fs::remove_file(&filler).unwrap();
    wait_for_within("the export to catch up", Duration::from_secs(30), || {
        export_health(&ns.a).is_some_and(|e| e["behind"] == false)
    });
    let caught_up = fs::read_to_string(&export).unwrap();
    let st = stop(&mut probe, libc::SIGINT, Duration::from_secs(30));
    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(st.success(), "flowprobe failed: {err}");
    // Said when it started failing and when it recovered, not per interval.
    let said = err.lines().filter(|l| l.contains("--export-jsonl")).count();
    assert!((2..=3).contains(&said), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("written again"), "{err}");

    // Every connection's lines, summed, equal its sockets' TCP_INFO; they
    // were all in the file already when it caught up.
    let text = fs::read_to_string(&export).unwrap();
    assert!(text.starts_with(&caught_up));
    let lines = json_lines(&text);
    let (client, server) = (truth(dir.path(), "client"), truth(dir.path(), "server"));
    let n = |v: &Value| v.as_u64().unwrap();
    let mut failures = Vec::new();
    for &(port, c_bytes, s_bytes) in &CONNS {
        let mine: Vec<&Value> = lines
            .iter()
            .filter(|l| l["proto"] == "tcp" && l["sport"] == port && l["src"] == ca)
            .collect();
        assert!(!mine.is_empty(), "port {port}: no lines in\n{text}");
        assert!(mine.iter().all(|l| l["dst"] == sa && l["dport"] == 5001));
        // The connection's lines summed into one record, compared as a
        // listed record is.
        let sum = |side: &str, f: &str| -> u64 { mine.iter().map(|l| n(&l[side][f])).sum() };
        let dir = |side: &str| {
            json!({
                "bytes": sum(side, "bytes"),
                "retransmits": sum(side, "retransmits"),
                "retransmitted_bytes": sum(side, "retransmitted_bytes"),
            })
        };
        let summed = json!({"sent": dir("sent"), "received": dir("received")});
        failures.extend(against_tcp_info(
            &summed,
            (&client, &server),
            (port, c_bytes, s_bytes),
            ca,
        ));
    }
    // UDP: every datagram once each way.
    let udp: Vec<&Value> = lines
        .iter()
        .filter(|l| l["proto"] == "udp" && l["sport"] == UDP_PORT && l["src"] == ca)
        .collect();
    let cu = &client["udp"];
    for d in ["sent", "received"] {
        let got: (u64, u64) = udp.iter().fold((0, 0), |(p, b), l| {
            (p + n(&l[d]["packets"]), b + n(&l[d]["bytes"]))
        });
        let want = (UDP_DATAGRAMS, n(&cu["app_bytes_written"]));
        if got != want {
            failures.push(format!("UDP {d}: export {got:?} != written {want:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
