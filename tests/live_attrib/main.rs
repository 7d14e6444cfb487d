//! Process attribution of `flowprobe run` (root), one module per topic:
//!
//! - `processes`: every connection's ends carry the pid, process name,
//!   container, pod and service of the processes that own their sockets,
//!   across network namespaces, also for 500 short-lived connections.
//! - `cgroup_id`: a client gone before any resolver pass is named by the
//!   cgroup id the tc program took from its socket, and by the owner its
//!   connect recorded; a server whose listening process is gone before any
//!   read is named by the listener `sock_ops` recorded at `listen(2)`.
//! - `at_connect`: a short-lived client container (hundreds of TCP and
//!   UDP connections, then gone) attributed from the cgroup programs'
//!   records, with the cgroup mounts visible to the agent and hidden.
//! - `container_host`: issue 15 whole: two containers (Docker- and
//!   Kubernetes-shaped), a MASQUERADE uplink, a published port, loss; 500
//!   short connections from a client container that just started, to the
//!   other container (a short-lived server), the outside and the published
//!   port: each once, exact per connection and per service pair against
//!   the sockets' `TCP_INFO`, container ends attributed (accepted ones from
//!   the listener `sock_ops` recorded), NATed ones with both addresses; on
//!   tc (mounts visible, hidden, no passes) and AF_PACKET.
//!
//! Runs with `FLOWPROBE_LIVE_TESTS=1` (the root tier of scripts/test.sh).

#[path = "../common/mod.rs"]
mod common;

mod at_connect;
mod cgroup_id;
mod container_host;
mod processes;

/// 64 hex digits, unique per test run and role.
fn container_id(role: u8) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    format!(
        "{:016x}{nanos:016x}{:016x}{role:016x}",
        std::process::id(),
        0xf10f_u64
    )
}
