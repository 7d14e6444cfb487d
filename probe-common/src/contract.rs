//! The contract between the eBPF object and everything that loads or reads
//! it (`probe`, the live tests, `xtask`, the scripts through
//! `cargo xtask contract`), written once: the names of its maps, programs
//! and the globals the loader overrides, and the layout of its two
//! statistics arrays.
//!
//! The eBPF program (`probe-ebpf`) sizes and indexes its statistics with
//! these items and checks at compile time that its maps, globals and
//! programs carry these names (aya's `#[btf_map]` takes the identifier or a
//! literal, not a constant); `cargo xtask check-ebpf` checks the built
//! object for every name here. Both sides are built from one commit, so a
//! layout may change freely as long as it changes here.

use crate::parse::ParseError;

/// The connection table: an mmapable array of [`crate::slots::Slot`]s,
/// sized by the loader (with [`CONNS_MASK`] to match).
pub const CONNS: &str = "CONNS";
/// One bit per [`CONNS`] slot taken and not drained since (`u64` words).
pub const OCCUPIED: &str = "OCCUPIED";
/// Per-CPU `u64` counters of parse outcomes, laid out as
/// [`PARSE_STATS_LEN`] says.
pub const PARSE_STATS: &str = "PARSE_STATS";
/// Per-CPU `u64` counters of connection-table events, indexed by
/// [`ConnStat`].
pub const CONN_STATS: &str = "CONN_STATS";
/// Per CPU, what the general parser made of the frame it is on (the
/// `Parsed`, its outer [`crate::parse::Encap`], the word
/// `PacketBytes::opaque` passes offsets through): kept in map memory,
/// which the verifier does not track. The eBPF program's own.
pub const SCRATCH: &str = "SCRATCH";
/// Every map of the object.
pub const MAPS: [&str; 5] = [CONNS, OCCUPIED, PARSE_STATS, CONN_STATS, SCRATCH];

/// The tc classifier (ingress and egress).
pub const TC_PROGRAM: &str = "flowprobe_tc";
/// The XDP program (ingress, for gateways).
pub const XDP_PROGRAM: &str = "flowprobe_xdp";
/// Every program of the object.
pub const PROGRAMS: [&str; 2] = [TC_PROGRAM, XDP_PROGRAM];
/// The empty classifier, the yardstick of per-packet cost: in an object of
/// its own (`tc-baseline`), not in the probe's.
pub const BASELINE_PROGRAM: &str = "flowprobe_tc_baseline";

/// Socket owners recorded by the cgroup programs at connect or first send
/// (a ring buffer of [`crate::owner::SockOwner`]s, drained by userspace).
pub const OWNERS: &str = "OWNERS";
/// Per socket (socket-local storage, `u32`), non-zero once its owner was
/// recorded: the first `sendmsg` of a socket is recorded, not every
/// datagram.
pub const OWNER_SEEN: &str = "OWNER_SEEN";
/// Per-CPU `u64` counters of owner records (`crate::owner::OWNER_STAT_*`).
pub const OWNER_STATS: &str = "OWNER_STATS";
/// The owner maps, apart from [`MAPS`] (attribution may run without them).
pub const OWNER_MAPS: [&str; 3] = [OWNERS, OWNER_SEEN, OWNER_STATS];
/// `cgroup/connect4`, `cgroup/connect6`, `cgroup/sendmsg4`,
/// `cgroup/sendmsg6`: attached to the cgroup v2 root.
pub const CONNECT4_PROGRAM: &str = "flowprobe_connect4";
pub const CONNECT6_PROGRAM: &str = "flowprobe_connect6";
pub const SENDMSG4_PROGRAM: &str = "flowprobe_sendmsg4";
pub const SENDMSG6_PROGRAM: &str = "flowprobe_sendmsg6";
/// `sock_ops`: a TCP socket's 4-tuple once `connect` chose its port.
pub const SOCKOPS_PROGRAM: &str = "flowprobe_sockops";
/// Every owner program.
pub const OWNER_PROGRAMS: [&str; 5] = [
    CONNECT4_PROGRAM,
    CONNECT6_PROGRAM,
    SENDMSG4_PROGRAM,
    SENDMSG6_PROGRAM,
    SOCKOPS_PROGRAM,
];

/// `u32`: [`CONNS`]'s slot count − 1 (a power of two − 1).
pub const CONNS_MASK: &str = "CONNS_MASK";
/// `u64`: the per-run seed of [`crate::slots::hash`].
pub const CONNS_SEED: &str = "CONNS_SEED";
/// `u8`: 1 releases a lock with a plain store (where the CPU keeps stores
/// in order), 0 with an atomic exchange.
pub const UNLOCK_BY_STORE: &str = "UNLOCK_BY_STORE";
/// Non-zero: connections are keyed per interface (`--per-interface`), each
/// interface counting what it sees; zero: one record per connection on the
/// host, each direction counted at the first interface that sees it
/// ([`crate::entry::DirState::claim`]).
pub const PER_IFACE: &str = "PER_IFACE";
/// `u8`: non-zero turns decapsulation off (`--no-decap`,
/// [`crate::parse::Decap::enabled`]).
pub const NO_DECAP: &str = "NO_DECAP";
/// `u16`: VXLAN's UDP port ([`crate::parse::Decap::vxlan_port`]).
pub const VXLAN_PORT: &str = "VXLAN_PORT";
/// `u16`: Geneve's UDP port ([`crate::parse::Decap::geneve_port`]).
pub const GENEVE_PORT: &str = "GENEVE_PORT";
/// Every global the loader overrides (read-only data of the object).
pub const GLOBALS: [&str; 7] = [
    CONNS_MASK,
    CONNS_SEED,
    UNLOCK_BY_STORE,
    PER_IFACE,
    NO_DECAP,
    VXLAN_PORT,
    GENEVE_PORT,
];

/// [`PARSE_STATS`] index of frames that parsed to a TCP/UDP flow.
pub const PARSE_TRACKED: u32 = 0;
/// [`PARSE_STATS`]'s length: [`PARSE_TRACKED`], then one index per
/// [`ParseError`] ([`parse_skipped`]).
pub const PARSE_STATS_LEN: usize = ParseError::COUNT + 1;

// `parse_stat_name` and the loaders index `ParseError::ALL` by
// discriminant.
const _: () = {
    let mut i = 0;
    while i < ParseError::COUNT {
        assert!(ParseError::ALL[i] as usize == i);
        i += 1;
    }
};

/// [`PARSE_STATS`] index of frames skipped for `e`.
#[inline(always)]
pub const fn parse_skipped(e: ParseError) -> u32 {
    e as u32 + 1
}

/// The stable name of [`PARSE_STATS`] index `index`: `tracked`, or the
/// [`ParseError::name`] of its reason; `None` past the end.
pub const fn parse_stat_name(index: u32) -> Option<&'static str> {
    match index {
        PARSE_TRACKED => Some("tracked"),
        i if (i as usize) < PARSE_STATS_LEN => Some(ParseError::ALL[i as usize - 1].name()),
        _ => None,
    }
}

/// [`CONN_STATS`] indices: connection-table events that lose data or the
/// tracker's verdict, so that none is silent.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConnStat {
    /// A new connection found every slot of its probe sequence taken: its
    /// packet was not counted.
    Full = 0,
    /// The slots changed under two tries (`slots::Located::Busy`): the
    /// packet was not counted.
    InsertFailed = 1,
    /// The entry's lock stayed taken: the packet was counted, without the
    /// tracker's verdict ([`crate::update::update_contended`]).
    Contended = 2,
    /// A packet of a direction already counted at another interface of
    /// this host: the same packet, seen again on its way (not a loss).
    Duplicate = 3,
}

impl ConnStat {
    /// Every index, in order.
    pub const ALL: [ConnStat; 4] = [
        ConnStat::Full,
        ConnStat::InsertFailed,
        ConnStat::Contended,
        ConnStat::Duplicate,
    ];

    /// Its index in [`CONN_STATS`].
    #[inline(always)]
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Stable snake_case name (as in `/health`'s `map` object).
    pub const fn name(self) -> &'static str {
        match self {
            ConnStat::Full => "full",
            ConnStat::InsertFailed => "insert_failed",
            ConnStat::Contended => "contended",
            ConnStat::Duplicate => "duplicate",
        }
    }
}

/// [`CONN_STATS`]'s length.
pub const CONN_STATS_LEN: usize = ConnStat::ALL.len();

const _: () = {
    let mut i = 0;
    while i < CONN_STATS_LEN {
        assert!(ConnStat::ALL[i].index() as usize == i);
        i += 1;
    }
};

/// `a == b`, in a constant: for the eBPF program's compile-time checks
/// that an item's identifier is the name given here.
pub const fn same_name(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
