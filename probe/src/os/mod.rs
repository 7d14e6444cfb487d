//! Operating-system helpers any stage may use: capabilities, clocks, shared
//! mappings, rtnetlink links and clsact qdiscs, signals. Nothing here knows
//! about connections.

pub mod addrs;
pub mod alloc;
pub mod caps;
pub mod cgroup2;
pub mod clock;
pub mod clsact;
pub mod links;
pub mod mmap;
pub mod signals;
pub mod statedir;
