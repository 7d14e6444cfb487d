//! Code shared by every place flowprobe sees packets: the tc eBPF program,
//! the AF_PACKET ring and the pcap/pcapng reader.
//!
//! Architecture invariants:
//! - `no_std`, no allocation, and no panicking path: the same functions are
//!   compiled for `bpfel-unknown-none`, where a panic is a verifier rejection.
//!   Every load from packet bytes goes through [`parse::PacketBytes::load`],
//!   which returns `Option`.
//! - No clock and no OS: time, interface and segment counts are passed in.
#![no_std]

pub mod handshake;
pub mod parse;
pub mod shared;
pub mod table;
pub mod tcp;
pub mod wire;

pub use parse::{parse_frame, LinkType, PacketBytes, ParseError, Parsed};
pub use tcp::{Segment, TcpDir, Verdict, VerdictKind};
#[cfg(not(target_arch = "bpf"))]
pub use wire::CoreAtomics;
pub use wire::{Atomics, ConnKey, DirCounters, FlowEntry, FlowKey, L4Proto, Plain};
