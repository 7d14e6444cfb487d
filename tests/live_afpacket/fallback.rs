//! Without the capabilities eBPF needs, `run` (auto) falls back to
//! AF_PACKET and says so; `--backend tc` fails.

use std::process::Command;

use super::{
    counts, finish, kernel_drops, n, setup, spawn_run, traffic, wait_for_rings, CONNS, VETH_A,
};
use crate::common::root::{enabled, record, sh_out, truth};

/// Runs flowprobe without the capabilities eBPF needs, keeping CAP_NET_RAW
/// (and CAP_NET_ADMIN, so that only eBPF itself is missing).
const NO_BPF: [&str; 4] = [
    "setpriv",
    "--inh-caps=-bpf,-sys_admin,-perfmon",
    "--bounding-set=-bpf,-sys_admin,-perfmon",
    "--",
];

#[test]
fn auto_falls_back_to_afpacket_without_bpf_capabilities() {
    if !enabled("live_afpacket") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let (ns, ca, sa) = setup("fb", false);

    // --backend tc: an error, no fallback.
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.a])
        .args(NO_BPF)
        .arg(env!("CARGO_BIN_EXE_flowprobe"))
        .args(["run", "--backend", "tc", "--duration", "0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tc without CAP_BPF ran: {err}");
    assert!(!err.contains("AF_PACKET"), "tc fell back: {err}");

    let mut p = spawn_run(&ns.a, &NO_BPF, &["--iface", VETH_A], dir, "auto");
    wait_for_rings(&ns.a, 1);
    traffic(&ns, ca, sa, dir);
    let (conns, out, err) = finish(&mut p, dir, "auto");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(
        lines.len(),
        3,
        "one fallback line, what attribution lacks, and the summary: {err}"
    );
    assert!(
        lines[0].starts_with("flowprobe: cannot use eBPF (")
            && lines[0].contains("missing: CAP_BPF and CAP_PERFMON")
            && lines[0].ends_with("); counting with AF_PACKET instead"),
        "fallback line: {}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("flowprobe: attribution is partial: without CAP_SYS_ADMIN"),
        "attribution line: {}",
        lines[1]
    );
    assert!(
        lines[2].contains("(backend afpacket,"),
        "summary: {}",
        lines[2]
    );
    assert_eq!(kernel_drops(&err), 0);
    assert!(
        !sh_out(&["ip", "netns", "exec", &ns.a, "tc", "qdisc", "show", "dev", VETH_A])
            .contains("clsact"),
        "a clsact qdisc was added"
    );

    let (client, server) = (truth(dir, "client"), truth(dir, "server"));
    let mut total_retrans = 0;
    for (port, c_bytes, _) in CONNS {
        let r = record(&conns, port, ca, sa, &out);
        let ct = &client["tcp"][port.to_string()];
        let st = &server["tcp"][port.to_string()];
        total_retrans += n(&ct["tcpi_total_retrans"]);
        let sent = counts(&r["sent"]);
        assert_eq!(
            (sent, sent.0 - sent.2, n(&r["received"]["bytes"])),
            (
                (
                    n(&ct["tcpi_bytes_sent"]),
                    n(&ct["tcpi_total_retrans"]),
                    n(&ct["tcpi_bytes_retrans"])
                ),
                c_bytes,
                n(&st["tcpi_bytes_sent"])
            ),
            "port {port}: ((bytes, retransmits, retx_bytes) sent, written, bytes received)"
        );
    }
    assert!(total_retrans > 0, "no retransmissions client->server");
}
