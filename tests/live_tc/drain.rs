//! Closed connections are drained from the kernel map while `run` runs.

use std::fs;
use std::time::Duration;

use serde_json::Value;

use super::{setup, VETH_A};
use crate::common::json_lines;
use crate::common::root::{
    enabled, python, python_ok, spawn_flowprobe, tc_attached, wait_for, KillOnDrop,
};

/// Closed connections leave the kernel map while `run` runs, so a map much
/// smaller than the number of connections loses none: 120 short
/// connections through a map of 16, each reported once with exactly the
/// bytes its client wrote (retransmissions from the INPUT drops aside).
#[test]
fn closed_connections_are_drained_and_lose_nothing() {
    if !enabled("live_tc") {
        return;
    }
    const N: usize = 120;
    let dir = tempfile::tempdir().unwrap();
    let (ns, ca, sa) = setup("drain", false);
    let mut probe = spawn_flowprobe(
        &ns.a,
        &[],
        &[
            "run",
            "--iface",
            VETH_A,
            "--format",
            "json",
            "--max-conns",
            "16",
            "--closed-timeout",
            "0.1",
        ],
        dir.path(),
        "probe",
    );
    wait_for("flowprobe to attach", || {
        tc_attached(&ns.a, VETH_A, "egress")
    });

    let ready = dir.path().join("ready");
    let server = format!(
        "import socket\n\
         s = socket.create_server(('{sa}', 6000), backlog=128)\n\
         open('{}', 'w').close()\n\
         for _ in range({N}):\n\
         \x20   c, _ = s.accept()\n\
         \x20   while c.recv(65536): pass\n\
         \x20   c.close()\n",
        ready.display()
    );
    let mut server = KillOnDrop(python(&ns.b, &server).spawn().unwrap());
    wait_for("the server", || ready.exists());
    // Each client writes 3000 + 37 i bytes, waits for the server's FIN,
    // closes; about 40 connections a second.
    let client = format!(
        "import socket, time\n\
         for i in range({N}):\n\
         \x20   c = socket.create_connection(('{sa}', 6000), source_address=('{ca}', 42000 + i))\n\
         \x20   c.sendall(b'x' * (3000 + 37 * i))\n\
         \x20   c.shutdown(socket.SHUT_WR)\n\
         \x20   c.recv(1)\n\
         \x20   c.close()\n\
         \x20   time.sleep(0.02)\n"
    );
    python_ok(&ns.a, &client, "client");
    assert!(server.wait().unwrap().success(), "server failed");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(probe.id() as i32, libc::SIGINT) };
    assert!(probe.wait().unwrap().success());

    let err = fs::read_to_string(dir.path().join("probe.err")).unwrap();
    assert!(!err.contains("not counted"), "{err}");
    let out = fs::read_to_string(dir.path().join("probe.json")).unwrap();
    let conns = json_lines(&out);
    for i in 0..N {
        let port = 42000 + i as u64;
        let mine: Vec<&Value> = conns
            .iter()
            .filter(|c| c["proto"] == "tcp" && c["sport"] == port && c["dport"] == 6000)
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "connection from port {port}: {mine:?}\n{err}"
        );
        let s = &mine[0]["sent"];
        let new = s["bytes"].as_u64().unwrap() - s["retransmitted_bytes"].as_u64().unwrap();
        assert_eq!(new, 3000 + 37 * i as u64, "port {port}: {}", mine[0]);
        assert_eq!(mine[0]["src"], ca);
    }
}
