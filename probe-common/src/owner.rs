//! What the cgroup-attached programs (`cgroup/connect4|6`,
//! `cgroup/sendmsg4|6`) record of a socket, in the calling process's
//! context, when it connects or first sends: the record crosses the
//! kernel boundary through the `OWNERS` ring buffer
//! ([`crate::contract::OWNERS`]) and is joined in userspace to the
//! connection whose tc entry carries the same socket cookie.

/// [`SockOwner::kind`]: `connect(2)` (TCP, or connected UDP).
pub const OWNER_CONNECT: u8 = 1;
/// [`SockOwner::kind`]: the first `sendmsg(2)` with an address (unconnected
/// UDP) of a socket.
pub const OWNER_SENDMSG: u8 = 2;

/// [`SockOwner::kind`]: a TCP socket's addresses once `connect` chose its
/// local port (`sock_ops` `BPF_SOCK_OPS_TCP_CONNECT_CB`): only `cookie`,
/// `proto`, `family` and the addresses are set; userspace adds the tuple to
/// the owner the same cookie's [`OWNER_CONNECT`] record gave.
pub const OWNER_TUPLE: u8 = 3;

/// [`SockOwner::kind`]: a TCP listener at `listen(2)` (`sock_ops`
/// `BPF_SOCK_OPS_TCP_LISTEN_CB`, in the listening process): the owner
/// fields as for [`OWNER_CONNECT`], `netns_cookie`, the local address and
/// port.
pub const OWNER_LISTEN: u8 = 4;

/// [`SockOwner::kind`]: a TCP connection a listener accepted, once
/// established (`sock_ops` `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`, in
/// softirq: no owner fields): `cookie`, `netns_cookie`, `proto`, `family`
/// and both addresses; userspace gives it the owner of the
/// [`OWNER_LISTEN`] record of the same namespace and local port.
pub const OWNER_ACCEPT: u8 = 5;

/// One socket's owner, as the kernel saw it at connect or first send.
/// Addresses are IPv4-mapped IPv6 for IPv4 (as [`crate::FlowKey`]), in
/// network order; ports in host order (`local_port` 0 when the socket had
/// none yet: `connect` binds after the hook runs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    /// `bpf_get_socket_cookie`: unique for the life of the system.
    pub cookie: u64,
    /// `bpf_get_netns_cookie` of the socket's network namespace.
    pub netns_cookie: u64,
    /// `bpf_get_current_cgroup_id`: the caller's cgroup v2 id.
    pub cgroup_id: u64,
    /// Thread-group id (the pid userspace calls a process) and thread id.
    pub tgid: u32,
    pub tid: u32,
    /// Real uid of the caller.
    pub uid: u32,
    /// [`OWNER_CONNECT`], [`OWNER_SENDMSG`], [`OWNER_TUPLE`], [`OWNER_LISTEN`]
    /// or [`OWNER_ACCEPT`].
    pub kind: u8,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
    /// The caller's `comm` (NUL-padded).
    pub comm: [u8; 16],
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad2: u32,
}

impl SockOwner {
    /// `comm` up to its first NUL.
    pub fn comm_bytes(&self) -> &[u8] {
        let mut n = 0;
        while n < self.comm.len() && self.comm[n] != 0 {
            n += 1;
        }
        self.comm.split_at(n).0
    }
}

/// `OWNER_STATS` indices ([`crate::contract::OWNER_STATS`]).
pub const OWNER_STAT_RECORDED: u32 = 0;
/// A record the ring buffer had no room for (userspace too slow): lost.
pub const OWNER_STAT_DROPPED: u32 = 1;
/// `OWNER_STATS`'s length.
pub const OWNER_STATS_LEN: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_has_no_hidden_padding() {
        assert_eq!(core::mem::size_of::<SockOwner>(), 96);
        let mut o = SockOwner::default();
        o.comm[..4].copy_from_slice(b"curl");
        assert_eq!(o.comm_bytes(), b"curl");
        o.comm = [b'x'; 16];
        assert_eq!(o.comm_bytes().len(), 16);
    }
}
