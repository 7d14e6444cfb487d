//! Code shared by every place flowprobe sees packets: the tc eBPF program,
//! the AF_PACKET ring and the pcap/pcapng reader.
//!
//! Architecture invariants:
//! - `no_std`, no allocation, and no panicking path: the same functions are
//!   compiled for `bpfel-unknown-none`, where a panic is a verifier rejection.
//!   Every load from packet bytes goes through [`parse::PacketBytes::load`],
//!   which returns `Option`.
//! - No clock and no OS: time, interface and segment counts are passed in.
//!
//! Modules, each using only those listed before it: [`key`] and
//! [`atomics`] (nothing), [`parse`] (`key`), [`tcp`] (`parse`),
//! [`initiator`] (`key`, `parse`), [`entry`] (`key`, `parse`, `tcp`,
//! `initiator`), [`handshake`] (`parse`, `tcp`, `entry`), [`update`] and
//! [`slots`] (those and `atomics`), [`contract`] (`parse`; the names and
//! layouts the eBPF object and its loaders share), [`owner`] (nothing; the
//! socket-owner records of the cgroup programs).
#![no_std]

pub mod atomics;
pub mod contract;
pub mod entry;
pub mod handshake;
pub mod initiator;
pub mod key;
pub mod owner;
pub mod parse;
pub mod slots;
pub mod tcp;
pub mod update;

#[cfg(not(target_arch = "bpf"))]
pub use atomics::CoreAtomics;
pub use atomics::{Atomics, Plain};
pub use entry::{DirCounters, FlowEntry};
pub use key::{ConnKey, FlowKey, L4Proto};
pub use parse::{
    parse_frame, parse_frame_ex, Decap, Encap, LinkType, PacketBytes, ParseError, Parsed,
    TunnelKind,
};
pub use tcp::{Segment, TcpDir, Verdict, VerdictKind};
