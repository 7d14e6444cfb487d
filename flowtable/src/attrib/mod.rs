//! Who is talking: each end of a connection joined to the process,
//! container and service that own its socket.
//!
//! The operating system comes in through [`Host`] (the `flowprobe` binary
//! implements it with sock_diag netlink and procfs; tests use a fake), so
//! this module stays free of OS calls like the rest of the flow table.
//! [`Resolver::refresh`] runs a pass; [`Resolver::tag`] fills
//! `src_tags` / `dst_tags`.

mod cgroup;
mod host;
mod owner;
mod resolver;
mod rules;
#[cfg(test)]
mod tests;

pub use cgroup::{parse as parse_cgroup, CgroupInfo};
pub use host::{Host, Netns, Packed, ProcessInfo, Proto, SocketEntry, SocketState, Tuple};
pub use owner::{Owner, SERVICE_ENV};
pub use resolver::{
    AttribHealth, Options, PassStats, Recorded, Resolver, NO_PROCESS, NO_SOCKET, REMOTE,
    UNATTRIBUTED,
};
pub use rules::ServiceRule;
