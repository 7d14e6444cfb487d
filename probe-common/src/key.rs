//! Connection keys: the `#[repr(C)]` keys that cross the kernel/userspace
//! boundary ([`FlowKey`] for one direction, [`ConnKey`] for both), and
//! the IPv4-mapped address form they store.
//!
//! Layouts are explicit (no implicit padding) so that a key written by the
//! eBPF program reads back identically in userspace. Depends on nothing
//! else in the crate.

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
///
/// 8-byte aligned, like [`ConnKey`]: the eBPF backend copies and compares
/// the address arrays with byte loads and stores unless it can prove them
/// aligned.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
/// live, pcapng interface number in replay); `tunnel` which tunnel carried
/// it (0: none; `parse::tunnel_id`), in the word that was padding, so
/// that keys outside tunnels are built, hashed and compared as before. This is the key of the kernel's
/// connection map and of the userspace table, so both join the same way.
///
/// 8-byte aligned (so that the eBPF program copies and hashes its addresses
/// with 8-byte loads, not byte by byte), with no padding left implicit:
/// the kernel hashes and compares all 48 bytes.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub lo: [u8; 16],
    pub hi: [u8; 16],
    pub lo_port: u16,
    pub hi_port: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
    pub iface: u32,
    pub tunnel: u32,
}

impl ConnKey {
    /// The canonical key of `k` seen at `iface` inside `tunnel` (0: none),
    /// and the direction `k` travels in: 0 for lo → hi, 1 for hi → lo.
    #[inline(always)]
    pub fn of(k: &FlowKey, iface: u32, tunnel: u32) -> (ConnKey, usize) {
        // Lexicographic byte order, compared as big-endian halves: comparing
        // the arrays directly would call `memcmp`, which the eBPF verifier
        // checks as a separate global function and rejects.
        let forward = (be_halves(&k.src), k.sport) <= (be_halves(&k.dst), k.dport);
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
            tunnel,
        };
        (key, if forward { 0 } else { 1 })
    }
}

impl ConnKey {
    /// The key whose memory is these six little-endian words (the eBPF fast
    /// path builds keys this way: six register stores instead of byte
    /// copies).
    #[inline(always)]
    pub fn from_words(w: [u64; 6]) -> ConnKey {
        // SAFETY: 48 bytes either way; every bit pattern is a valid ConnKey.
        unsafe { core::mem::transmute::<[u64; 6], ConnKey>(w) }
    }
}

/// A 16-byte address as two big-endian `u64`s: same order as its bytes.
#[inline(always)]
fn be_halves(a: &[u8; 16]) -> (u64, u64) {
    (
        u64::from_be_bytes([a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]]),
        u64::from_be_bytes([a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15]]),
    )
}

/// Maps a 4-byte IPv4 address into the 16-byte key space.
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

// The kernel table's key layout is part of the userspace/kernel contract:
// no implicit padding, a fixed size.
const _: () = assert!(core::mem::size_of::<ConnKey>() == 48);
