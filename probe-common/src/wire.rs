//! `#[repr(C)]` types that cross the kernel/userspace boundary.
//!
//! Layouts are explicit (no implicit padding) so that a BPF map value written
//! by the eBPF program reads back identically in userspace.

/// IP protocol numbers flowprobe keeps per-connection state for.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    Tcp = 6,
    Udp = 17,
}

impl L4Proto {
    pub const fn name(self) -> &'static str {
        match self {
            L4Proto::Tcp => "tcp",
            L4Proto::Udp => "udp",
        }
    }
}

/// One direction of a connection as it appeared on the wire: `src` sent it.
///
/// IPv4 addresses are stored as IPv4-mapped IPv6 (`::ffff:a.b.c.d`) so that
/// keys of both families have one size and one comparison.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// IP protocol number ([`L4Proto`] as `u8`, kept raw for `Pod`).
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The same connection seen in the other direction.
    pub const fn reversed(&self) -> FlowKey {
        FlowKey {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }
}

/// Both directions of a connection under one key: endpoint `lo` is the
/// smaller (address, port). `iface` is where it was seen (interface index
/// live, pcapng interface number in replay). This is the key of the kernel's
/// connection map and of the userspace table, so both join the same way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub lo: [u8; 16],
    pub hi: [u8; 16],
    pub lo_port: u16,
    pub hi_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub iface: u32,
}

impl ConnKey {
    /// The canonical key of `k`, and the direction `k` travels in:
    /// 0 for lo → hi, 1 for hi → lo.
    #[inline(always)]
    pub fn of(k: &FlowKey, iface: u32) -> (ConnKey, usize) {
        let forward = (k.src, k.sport) <= (k.dst, k.dport);
        let (lo, lo_port, hi, hi_port) = if forward {
            (k.src, k.sport, k.dst, k.dport)
        } else {
            (k.dst, k.dport, k.src, k.sport)
        };
        let key = ConnKey {
            lo,
            hi,
            lo_port,
            hi_port,
            proto: k.proto,
            family: k.family,
            _pad: [0; 2],
            iface,
        };
        (key, if forward { 0 } else { 1 })
    }
}

/// Maps a 4-byte IPv4 address into the 16-byte key space.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Monotonic counters for one direction of one connection.
///
/// Field meanings are the README's "What every number means".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirCounters {
    /// Wire segments (`gso_segs` where known, frames otherwise).
    pub packets: u64,
    /// TCP/UDP payload bytes, retransmissions included.
    pub bytes: u64,
    /// Sum of the IP packets' total lengths, headers included.
    pub l3_bytes: u64,
    /// Retransmitted segments (SYN and FIN retransmissions included).
    pub retransmits: u64,
    /// Payload bytes at or below the highest sequence already seen.
    pub retransmitted_bytes: u64,
    /// Keepalives and zero-window probes (never counted as retransmits).
    pub probes: u64,
    /// Segments that started beyond the highest sequence seen: data lost
    /// upstream of the capture point, or reordered.
    pub gaps: u64,
    /// Retransmitted segments whose data had already been acknowledged when
    /// the retransmission was seen.
    pub spurious: u64,
}

impl DirCounters {
    /// Adds one frame or GSO super-packet of `segs` wire segments. `tcp` is
    /// the tracker's verdict, `None` for UDP.
    #[inline(always)]
    pub fn record(
        &mut self,
        segs: u32,
        payload_len: u32,
        l3_len: u32,
        tcp: Option<&crate::tcp::Verdict>,
    ) {
        self.packets += segs as u64;
        self.bytes += payload_len as u64;
        self.l3_bytes += l3_len as u64;
        if let Some(v) = tcp {
            match v.kind {
                crate::tcp::VerdictKind::Retransmit => {
                    self.retransmits += segs as u64;
                    self.spurious += v.spurious as u64 * segs as u64;
                }
                crate::tcp::VerdictKind::Probe => self.probes += 1,
                _ => {}
            }
            self.retransmitted_bytes += v.retransmitted_bytes as u64;
            self.gaps += v.gap as u64;
        }
    }
}
