//! The XDP hook (`--backend xdp`): `flowprobe_xdp` on each interface's
//! receive path, native (in the driver) where the driver supports it,
//! generic (in the stack, after the skb is built) otherwise.
//!
//! XDP sees what an interface receives, nothing it sends. That suits a
//! gateway, where every forwarded packet is received on one interface or
//! the other; on a host, what it sends needs tc (`--backend tc`). The
//! program keys connections with interface 0 so that a forwarded
//! connection's two directions, received on two interfaces, meet in one
//! entry.
//!
//! aya attaches through a BPF link, which the kernel removes with the last
//! file descriptor: a killed run leaves nothing behind.

use anyhow::{Context, Result};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;

use crate::sources::AttachMode;

const PROGRAM: &str = probe_common::contract::XDP_PROGRAM;

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp> {
    Ok(ebpf
        .program_mut(PROGRAM)
        .with_context(|| format!("the eBPF object has no program {PROGRAM}"))?
        .try_into()?)
}

pub fn load(ebpf: &mut Ebpf) -> Result<()> {
    program(ebpf)?
        .load()
        .with_context(|| format!("the kernel rejected {PROGRAM}"))
}

/// Attaches to `iface`, native if the driver can, else generic; returns the
/// link and its mode.
pub fn attach(ebpf: &mut Ebpf, iface: &str) -> Result<(XdpLinkId, AttachMode)> {
    let prog = program(ebpf)?;
    match prog.attach(iface, XdpMode::Driver) {
        Ok(id) => Ok((id, AttachMode::XdpNative)),
        Err(native) => match prog.attach(iface, XdpMode::Skb) {
            Ok(id) => Ok((id, AttachMode::XdpGeneric)),
            Err(e) => Err(e)
                .with_context(|| format!("attaching XDP to {iface} (native: {native}; generic)")),
        },
    }
}

pub fn detach(ebpf: &mut Ebpf, id: XdpLinkId) -> Result<()> {
    Ok(program(ebpf)?.detach(id)?)
}

/// The interface is gone, and its XDP program with it: drop the link.
pub fn forget(ebpf: &mut Ebpf, id: XdpLinkId) {
    if let Ok(prog) = program(ebpf) {
        drop(prog.take_link(id));
    }
}
