//! Which end of a connection initiated it ([`initiator_of`]), and how
//! good the [`evidence`] for that is.

use crate::key::ConnKey;

/// How a connection's initiator was decided ([`crate::FlowEntry::evidence`]); a
/// larger value is better evidence.
pub mod evidence {
    /// Equal ports: the sender of the first packet seen.
    pub const FIRST_PACKET: u8 = 0;
    /// The side with the higher (ephemeral) port.
    pub const PORT: u8 = 1;
    /// The side that sent the SYN.
    pub const SYN: u8 = 2;
}

/// The initiator of a connection whose first packet seen travels in
/// direction `dir` of `key` (see [`ConnKey::of`]): the SYN sender; failing
/// that, the side with the higher (ephemeral) port; failing that (equal
/// ports), the sender of that first packet. `tcp_flags` is `None` for UDP.
/// Returns (the initiator's direction index, [`evidence`]).
#[inline(always)]
pub fn initiator_of(dir: usize, key: &ConnKey, tcp_flags: Option<u8>) -> (usize, u8) {
    use crate::parse::tcp_flags as f;
    if let Some(flags) = tcp_flags {
        if flags & f::SYN != 0 {
            let syn_sender = if flags & f::ACK == 0 { dir } else { 1 - dir };
            return (syn_sender, evidence::SYN);
        }
    }
    if key.lo_port > key.hi_port {
        (0, evidence::PORT)
    } else if key.lo_port < key.hi_port {
        (1, evidence::PORT)
    } else {
        (dir, evidence::FIRST_PACKET)
    }
}
