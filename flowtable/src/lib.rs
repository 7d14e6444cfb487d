//! The userspace flow table.
//!
//! Architecture invariant: no OS calls and no clock. Time comes from the
//! packets (capture or kernel timestamps); lookups of processes and
//! containers come in through a trait ([`attrib::Host`]), conntrack's
//! translations through another ([`nat::Conntrack`]). So a replayed capture gives
//! byte-for-byte the same output every time.

pub mod attrib;
mod conn;
pub mod delta;
pub mod nat;
pub mod query;
pub mod rollup;
mod rtt;
mod stats;
mod table;
mod tags;

pub use conn::{Connection, DirStats, Loss, Proto};
pub use rtt::{new_histogram, Percentiles, Rtt, RttLeg, Rtts};
pub use stats::FrameStats;
pub use table::{sort_connections, FlowTable, Observation};
pub use tags::{Interner, Socket, Tags, CGROUP_ID, SOCKET_COOKIE};
