//! One AF_PACKET socket with a memory-mapped TPACKET_V3 receive ring.
//!
//! The kernel fills fixed-size blocks with many frames and hands a block to
//! us when it is full or when `RETIRE_MS` has passed since its first frame;
//! we read every frame of the block in place and hand the block back. One
//! `poll()` per block instead of one `recvfrom()` per packet, and no copy
//! beyond the kernel's (snap-length-cut) copy into the ring.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

use super::filter;
use crate::os::mmap::Mapping;

/// Bytes kept of each frame: every header the parser reads (Ethernet, two
/// VLAN tags, IPv6 with a few extension headers, TCP with options) and
/// no payload. Lengths come from the IP header, or from `tp_len` for
/// BIG TCP, so the cut does not change any count.
pub const SNAPLEN: u32 = 256;
/// A block is handed to us at the latest this long after its first frame,
/// so a quiet ring still delivers within a snapshot's precision.
pub const RETIRE_MS: u32 = 20;
/// 256 KiB blocks.
const BLOCK_SIZE: u32 = 1 << 18;
/// About 64 MiB of rings in all, split over the CPUs: on 2 CPUs 32 MiB per
/// ring, about 95 000 frames of headers (a frame takes its 68-byte header,
/// the virtio-net header, alignment and up to SNAPLEN bytes), which is
/// 200 ms of 450 000 frames per second, the most a 2-CPU VM pushed through a
/// veth: the reader thread competes with the traffic for the CPUs, and with
/// 8 MiB rings it fell behind long enough to drop 0.15 % of the frames in
/// one of 7 runs (`bench/afpacket.sh`). On many CPUs at least 8 blocks
/// (2 MiB) per ring.
const MAX_BLOCKS: u32 = 128;
const MIN_BLOCKS: u32 = 8;
const TOTAL_BYTES: u64 = 64 << 20;

/// Blocks per ring for `rings` rings.
pub fn blocks_per_ring(rings: usize) -> u32 {
    let each = TOTAL_BYTES / (rings.max(1) as u64) / u64::from(BLOCK_SIZE);
    (each as u32).clamp(MIN_BLOCKS, MAX_BLOCKS)
}

/// Frame size only matters to the kernel's TPACKET_V1/V2 bookkeeping; V3
/// packs frames back to back, but `tp_frame_size` must still divide the
/// block size and hold a header.
const FRAME_SIZE: u32 = 1 << 11;

/// `ARPHRD_RAWIP` and `ARPHRD_TUNNEL6` (linux/if_arp.h), which libc lacks.
const ARPHRD_RAWIP: u16 = 519;
const ARPHRD_TUNNEL6: u16 = 769;

/// One frame of a block, as the parser and the table need it.
pub struct Frame<'a> {
    /// Kernel receive time, nanoseconds since the Unix epoch.
    pub ts_ns: u64,
    pub ifindex: u32,
    /// `sll_pkttype`: `PACKET_OUTGOING` for what this host sends.
    pub pkttype: u8,
    /// `sll_hatype` (`ARPHRD_*`): the link header the frame starts with.
    pub hatype: u16,
    /// The frame's length before the snap length cut (`skb->len`).
    pub wire_len: u32,
    /// The first `SNAPLEN` bytes at most, from the link header on.
    pub data: &'a [u8],
    /// For a GSO/GRO super-packet, the payload bytes of each wire segment
    /// (the virtio-net header's `gso_size`); 0 otherwise or unknown.
    pub gso_size: u16,
}

impl Frame<'_> {
    /// The link header the frame starts with, by device type; `None` for
    /// types the parser does not know (GRE, InfiniBand, …).
    pub fn link(&self) -> Option<probe_common::LinkType> {
        use probe_common::LinkType;
        match self.hatype {
            // lo has a zeroed Ethernet header on every frame.
            libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => Some(LinkType::Ethernet),
            // tun, WireGuard, ipip, sit and ip6tnl have no link header.
            libc::ARPHRD_NONE
            | ARPHRD_RAWIP
            | libc::ARPHRD_TUNNEL
            | ARPHRD_TUNNEL6
            | libc::ARPHRD_SIT => Some(LinkType::RawIp),
            _ => None,
        }
    }
}

/// Kernel counters of one socket since the previous read
/// (`PACKET_STATISTICS` resets them on every read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Frames that passed the filter, dropped ones included.
    pub packets: u64,
    /// Frames dropped because the ring was full.
    pub drops: u64,
    /// Times the ring was full and the kernel froze the queue.
    pub freeze_q: u64,
}

impl KernelStats {
    pub fn add(&mut self, o: &KernelStats) {
        self.packets += o.packets;
        self.drops += o.drops;
        self.freeze_q += o.freeze_q;
    }
}

/// A bound socket and its mapped ring.
pub struct Ring {
    fd: OwnedFd,
    map: Mapping,
    blocks: u32,
    /// Each frame is preceded by a `virtio_net_hdr`.
    vnet: bool,
}

/// `struct virtio_net_hdr` (linux/virtio_net.h), which the kernel writes
/// just before each frame's link header when `PACKET_VNET_HDR` is on; in
/// the host's byte order on little-endian hosts (`vio_le()`), which are
/// the only ones the kernel's legacy virtio layout is native to.
#[repr(C)]
#[derive(Clone, Copy)]
struct VirtioNetHdr {
    flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`; 0: not a super-packet.
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

/// `PACKET_VNET_HDR` on a receive ring: Linux 5.6 (58d19b19cd99,
/// "packet: vnet_hdr support for tpacket_rcv"). Older kernels accept the
/// option but write no header into the ring, so do not ask them.
fn ring_has_vnet_hdr() -> bool {
    // SAFETY: all-zero is a valid utsname; `uname` fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid out-pointer.
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    kernel_at_least(&release, (5, 6))
}

fn kernel_at_least(release: &str, want: (u32, u32)) -> bool {
    let mut it = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let major = it.next().unwrap_or(0);
    let minor = it.next().unwrap_or(0);
    (major, minor) >= want
}

// SAFETY: the mapping belongs to the socket, not to a thread. Each block is
// touched by one side at a time: the kernel until it sets TP_STATUS_USER,
// then only the one thread that drains this ring ([`Ring::drain`] takes
// `&mut Cursor`, owned by that thread) until it stores TP_STATUS_KERNEL.
// Other threads only call getsockopt/setsockopt on the fd.
unsafe impl Send for Ring {}
// SAFETY: as above; shared access is limited to socket options.
unsafe impl Sync for Ring {}

/// Where a ring's reader is: the next block to read.
#[derive(Default)]
pub struct Cursor {
    block: u32,
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points to a live `T` of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Ring {
    /// A socket with its ring, bound to every interface of the current
    /// network namespace, and a filter that lets nothing in yet: between
    /// `bind` and joining the fanout group a socket gets every packet
    /// directly, besides the group's copy, so every ring joins first and
    /// then gets its real filter ([`Ring::set_filter`]).
    pub fn open(blocks: u32) -> Result<Ring> {
        // Protocol 0: nothing is delivered before `bind` below.
        // SAFETY: plain syscall.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EPERM) {
                bail!("AF_PACKET sockets need CAP_NET_RAW: run flowprobe as root, or give it CAP_NET_RAW (docs/service.md)");
            }
            return Err(e).context("opening an AF_PACKET socket");
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let v3: libc::c_int = libc::tpacket_versions::TPACKET_V3 as libc::c_int;
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VERSION, &v3)
            .context("selecting TPACKET_V3 (needs Linux 3.2)")?;
        set_filter_on(&fd, Some(&[]))?;
        // The virtio-net header carries the GSO segment size of a
        // super-packet, so that it counts as the wire segments it stands
        // for, as tc counts `gso_segs`: retransmitted segments must match
        // the kernel's count, which is per segment. Cost: a frame whose GSO
        // type virtio cannot express (SCTP, a tunnel without TCP or UDP
        // inside) is dropped by the kernel and shows in the drop count.
        let vnet = ring_has_vnet_hdr();
        if vnet {
            let on: libc::c_int = 1;
            setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, &on)
                .context("enabling PACKET_VNET_HDR")?;
        }

        let req = libc::tpacket_req3 {
            tp_block_size: BLOCK_SIZE,
            tp_block_nr: blocks,
            tp_frame_size: FRAME_SIZE,
            tp_frame_nr: BLOCK_SIZE / FRAME_SIZE * blocks,
            tp_retire_blk_tov: RETIRE_MS,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_RX_RING, &req)
            .context("setting up the PACKET_RX_RING")?;
        let map = Mapping::shared(fd.as_fd(), BLOCK_SIZE as usize * blocks as usize)
            .context("mapping the AF_PACKET ring")?;
        let ring = Ring {
            fd,
            map,
            blocks,
            vnet,
        };

        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
        sll.sll_ifindex = 0; // every interface, including those that appear later
                             // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                ring.fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error()).context("binding the AF_PACKET socket");
        }
        Ok(ring)
    }

    /// Joins fanout group `id` with hash mode, or creates a new group with a
    /// kernel-chosen unique id when `id` is `None`; returns the group id.
    pub fn join_fanout(&self, id: Option<u16>) -> Result<u16> {
        let (id, flags) = match id {
            Some(id) => (id, 0),
            None => (0, libc::PACKET_FANOUT_FLAG_UNIQUEID),
        };
        let arg: u32 = u32::from(id) | ((libc::PACKET_FANOUT_HASH | flags) << 16);
        setsockopt(&self.fd, libc::SOL_PACKET, libc::PACKET_FANOUT, &arg)
            .context("joining the PACKET_FANOUT group (unique ids need Linux 4.3)")?;
        let mut got: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: `got` and `len` are valid out-pointers of the size passed.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_FANOUT,
                (&mut got as *mut u32).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error()).context("reading the PACKET_FANOUT group id");
        }
        Ok(got as u16)
    }

    /// Replaces the filter (only these interfaces, or all).
    pub fn set_filter(&self, ifindexes: Option<&[u32]>) -> Result<()> {
        set_filter_on(&self.fd, ifindexes)
    }

    /// Counters since the previous call.
    pub fn stats(&self) -> Result<KernelStats> {
        // SAFETY: all-zero is valid for this plain C struct.
        let mut st: libc::tpacket_stats_v3 = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats_v3>() as libc::socklen_t;
        // SAFETY: `st` and `len` are valid out-pointers of the size passed.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&mut st as *mut libc::tpacket_stats_v3).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error()).context("reading PACKET_STATISTICS");
        }
        Ok(KernelStats {
            packets: st.tp_packets.into(),
            drops: st.tp_drops.into(),
            freeze_q: st.tp_freeze_q_cnt.into(),
        })
    }

    /// Waits up to `timeout_ms` for a block.
    pub fn wait(&self, timeout_ms: i32) -> Result<()> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLERR,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e).context("poll on the AF_PACKET ring");
            }
        }
        Ok(())
    }

    fn block(&self, i: u32) -> *mut u8 {
        // SAFETY: `i < self.blocks`, so the offset is inside the mapping.
        unsafe { self.map.as_ptr().add(i as usize * BLOCK_SIZE as usize) }
    }

    /// Calls `f` with every frame of every block the kernel has handed
    /// over, oldest first, and gives the blocks back. Returns the number of
    /// blocks read.
    pub fn drain(&self, cur: &mut Cursor, mut f: impl FnMut(&Frame)) -> usize {
        let mut blocks = 0;
        loop {
            let b = self.block(cur.block);
            let desc = b.cast::<libc::tpacket_block_desc>();
            // SAFETY: the block descriptor is at the start of the block, and
            // the status word is read atomically: the kernel writes it.
            let status_ptr = unsafe { &raw mut (*desc).hdr.bh1.block_status };
            // SAFETY: a u32 in the mapping, aligned (blocks are page aligned);
            // only ever accessed atomically by us.
            let status = unsafe { AtomicU32::from_ptr(status_ptr) };
            if status.load(Ordering::Acquire) & libc::TP_STATUS_USER == 0 {
                return blocks;
            }
            // SAFETY: the block is ours until we store TP_STATUS_KERNEL.
            let (num, first) = unsafe {
                let h = &(*desc).hdr.bh1;
                (h.num_pkts, h.offset_to_first_pkt)
            };
            read_block(b, num, first, self.vnet, &mut f);
            status.store(libc::TP_STATUS_KERNEL, Ordering::Release);
            cur.block = (cur.block + 1) % self.blocks;
            blocks += 1;
        }
    }
}

/// Where `sockaddr_ll` sits after a `tpacket3_hdr` (linux/if_packet.h:
/// `TPACKET_ALIGN(sizeof(struct tpacket3_hdr))`).
const SLL_OFFSET: usize = (size_of::<libc::tpacket3_hdr>() + libc::TPACKET_ALIGNMENT - 1)
    & !(libc::TPACKET_ALIGNMENT - 1);

fn read_block(b: *mut u8, num: u32, first: u32, vnet: bool, f: &mut impl FnMut(&Frame)) {
    let size = BLOCK_SIZE as usize;
    let mut off = first as usize;
    for _ in 0..num {
        // A corrupt offset would read outside the block: stop at it.
        if off + SLL_OFFSET + size_of::<libc::sockaddr_ll>() > size {
            return;
        }
        // SAFETY: in bounds (checked above); the kernel aligns frames to
        // TPACKET_ALIGNMENT (16), enough for both structs.
        let (h, sll) = unsafe {
            let p = b.add(off);
            (
                &*p.cast::<libc::tpacket3_hdr>(),
                &*p.add(SLL_OFFSET).cast::<libc::sockaddr_ll>(),
            )
        };
        let mac = off + h.tp_mac as usize;
        let cap = h.tp_snaplen as usize;
        if mac + cap > size {
            return;
        }
        // SAFETY: in bounds (checked above), and the block is ours.
        let data = unsafe { std::slice::from_raw_parts(b.add(mac), cap) };
        let vh = size_of::<VirtioNetHdr>();
        let gso_size =
            if vnet && h.tp_mac as usize >= SLL_OFFSET + size_of::<libc::sockaddr_ll>() + vh {
                // SAFETY: between the sockaddr_ll and the frame (checked), in
                // the block; unaligned read of a plain C struct.
                let v = unsafe { b.add(mac - vh).cast::<VirtioNetHdr>().read_unaligned() };
                if v.gso_type == 0 {
                    0
                } else {
                    u16::from_le(v.gso_size)
                }
            } else {
                0
            };
        f(&Frame {
            ts_ns: u64::from(h.tp_sec) * 1_000_000_000 + u64::from(h.tp_nsec),
            ifindex: sll.sll_ifindex as u32,
            pkttype: sll.sll_pkttype,
            hatype: sll.sll_hatype,
            wire_len: h.tp_len,
            data,
            gso_size,
        });
        if h.tp_next_offset == 0 {
            return;
        }
        off += h.tp_next_offset as usize;
    }
}

fn set_filter_on(fd: &OwnedFd, ifindexes: Option<&[u32]>) -> Result<()> {
    let mut prog = filter::program(ifindexes, SNAPLEN);
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    setsockopt(fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
        .context("attaching the snap-length/interface filter to the AF_PACKET socket")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ring_sizes() {
        use super::blocks_per_ring;
        assert_eq!(blocks_per_ring(1), 128);
        assert_eq!(blocks_per_ring(2), 128);
        assert_eq!(blocks_per_ring(16), 16);
        assert_eq!(blocks_per_ring(64), 8);
        assert_eq!(blocks_per_ring(512), 8);
    }

    #[test]
    fn kernel_versions() {
        for (r, want) in [
            ("6.18.0-1-amd64", true),
            ("5.6.0", true),
            ("5.10.200-foo", true),
            ("5.5.19", false),
            ("4.19.0-20-amd64", false),
            ("garbage", false),
        ] {
            assert_eq!(super::kernel_at_least(r, (5, 6)), want, "{r}");
        }
    }
}
