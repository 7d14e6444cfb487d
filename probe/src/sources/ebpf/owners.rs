//! The socket-owner programs (`probe-ebpf/src/owners.rs`: cgroup/connect4|6,
//! cgroup/sendmsg4|6 and a sock_ops program): loaded with the
//! object, attached to the cgroup v2 root (so they run for every process
//! below it, in every network namespace), and their ring buffer handed to
//! enrichment as an [`OwnerFeed`]. Attached through BPF links: closing
//! them (at exit, or when the process is killed) detaches them.

use std::fs::File;

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::Ebpf;
use probe_common::contract;
use probe_common::owner::SockOwner;

use crate::os::cgroup2;
use crate::sources::OwnerFeed;

/// The drained ring; `Send` so that enrichment's thread can own it.
pub struct OwnerRing(RingBuf<MapData>);

// SAFETY: the ring's mappings and file descriptor belong to this value
// alone; it is used by one thread at a time (moved, never shared).
unsafe impl Send for OwnerRing {}

impl OwnerRing {
    fn drain(&mut self, out: &mut Vec<SockOwner>) {
        while let Some(item) = self.0.next() {
            if item.len() >= size_of::<SockOwner>() {
                // SAFETY: the program writes whole `SockOwner`s; the item
                // holds at least that many bytes, read unaligned.
                out.push(unsafe { item.as_ptr().cast::<SockOwner>().read_unaligned() });
            }
        }
    }

    pub fn into_feed(mut self) -> OwnerFeed {
        Box::new(move |out| {
            self.drain(out);
            Ok(())
        })
    }
}

/// Loads the four programs, attaches them to the cgroup2 root (mounting
/// one when none is visible) and takes the ring. The caller goes on
/// without them on error: sock_diag and procfs remain.
pub fn attach(ebpf: &mut Ebpf) -> Result<OwnerRing> {
    let root = cgroup2::root().context("finding or mounting a cgroup2 hierarchy")?;
    let dir = File::open(&root).with_context(|| format!("opening {}", root.display()))?;
    for name in contract::OWNER_PROGRAMS {
        if name == contract::SOCKOPS_PROGRAM {
            let prog: &mut SockOps = ebpf
                .program_mut(name)
                .with_context(|| format!("the eBPF object has no program {name}"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel rejected {name}"))?;
            prog.attach(&dir, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to {}", root.display()))?;
            continue;
        }
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("the eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel rejected {name}"))?;
        // Through a BPF link, which the kernel always attaches beside
        // others (multi); `Single` asks for no flag, which links require.
        prog.attach(&dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", root.display()))?;
    }
    let map = ebpf
        .take_map(contract::OWNERS)
        .with_context(|| format!("the eBPF object has no map {}", contract::OWNERS))?;
    Ok(OwnerRing(RingBuf::try_from(map)?))
}
