//! What the resolver asks of the operating system, as a trait, so that the
//! whole join runs on a fake in tests (the flow table does no OS calls).
//!
//! Every method may fail with [`std::io::ErrorKind::NotFound`] because the
//! process or namespace went away between two reads: that is normal on a
//! live host and the resolver treats it as "gone", not as an error.

use std::io;
use std::net::{IpAddr, SocketAddr};

use crate::conn::octets;

/// Transport protocol of a socket: a connection's.
pub use crate::conn::Proto;

/// A socket's addresses as one key: protocol, local end, remote end.
/// IPv4-mapped IPv6 addresses are stored as IPv4 (see [`Tuple::new`]), so a
/// dual-stack socket and a packet's IPv4 header give the same key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub proto: Proto,
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl Tuple {
    pub fn new(proto: Proto, local: SocketAddr, remote: SocketAddr) -> Tuple {
        Tuple {
            proto,
            local: canonical(local),
            remote: canonical(remote),
        }
    }
}

impl Tuple {
    /// Both ends' views of one connection between `a` and `b`.
    pub fn ends(proto: Proto, a: SocketAddr, b: SocketAddr) -> [Tuple; 2] {
        [Tuple::new(proto, a, b), Tuple::new(proto, b, a)]
    }
}

/// A protocol and two ends packed as a map key, 38 bytes where
/// `(Proto, SocketAddr, SocketAddr)` takes 68 (an IPv6 address's flow
/// label and scope are left out): for maps that hold an entry per
/// connection or per end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packed {
    proto: Proto,
    /// Bit 0: the first address is IPv6, bit 1: the second.
    v6: u8,
    ports: [u16; 2],
    /// IPv4 as IPv4-mapped IPv6.
    addrs: [[u8; 16]; 2],
}

impl Packed {
    pub fn new(proto: Proto, a: SocketAddr, b: SocketAddr) -> Packed {
        let ((xf, x), (yf, y)) = (octets(a.ip()), octets(b.ip()));
        Packed {
            proto,
            v6: u8::from(xf == 6) | u8::from(yf == 6) << 1,
            ports: [a.port(), b.port()],
            addrs: [x, y],
        }
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// Socket state, as far as attribution cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketState {
    /// A TCP socket in LISTEN (remote end unspecified).
    Listen,
    /// Anything else: connected TCP in any state, or UDP.
    Other,
}

/// One socket of a network namespace (sock_diag or `/proc/net/*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketEntry {
    pub tuple: Tuple,
    /// sockfs inode; 0 when no file refers to the socket (TIME_WAIT, or a
    /// connection still in the listener's accept queue).
    pub inode: u64,
    pub uid: u32,
    /// The kernel's socket cookie (0 when the source does not know it).
    pub cookie: u64,
    pub state: SocketState,
}

/// A network namespace in which processes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    /// Inode of `/proc/<pid>/ns/net`: the namespace's identity.
    pub id: u64,
    /// Processes in it (any of them opens the namespace).
    pub pids: Vec<u32>,
}

/// What the resolver needs to know about one process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// `/proc/<pid>/comm`.
    pub comm: String,
    /// `/proc/<pid>/cmdline`, split at NULs.
    pub cmdline: Vec<String>,
    /// Target of `/proc/<pid>/exe` (None for kernel threads or when hidden).
    pub exe: Option<String>,
    /// Real uid from `/proc/<pid>/status`.
    pub uid: u32,
    /// `/proc/<pid>/cgroup`, verbatim.
    pub cgroup: String,
    /// Only the environment variables that name a service
    /// ([`crate::attrib::SERVICE_ENV`]); a Host must not hand over the rest
    /// (secrets live there).
    pub env: Vec<(String, String)>,
}

/// The operating system, as seen by the resolver.
pub trait Host {
    /// Every network namespace in which at least one process lives.
    fn namespaces(&mut self) -> io::Result<Vec<Netns>>;
    /// TCP and UDP sockets (v4 and v6) of one namespace.
    fn sockets(&mut self, netns: &Netns) -> io::Result<Vec<SocketEntry>>;
    /// The socket that would receive a packet from `t.remote` to `t.local`
    /// in one namespace, as the kernel's own lookup finds it: the connected
    /// socket, else a listener or an unconnected UDP socket bound to the
    /// local port. One hash lookup, where [`Host::sockets`] walks every
    /// socket of the host.
    fn lookup(&mut self, netns: &Netns, t: &Tuple) -> io::Result<Option<SocketEntry>>;
    /// Inodes of the sockets `pid` holds open (`/proc/<pid>/fd`).
    fn socket_inodes(&mut self, pid: u32) -> io::Result<Vec<u64>>;
    fn process(&mut self, pid: u32) -> io::Result<ProcessInfo>;
    /// The network namespace `pid` is in now (its [`Netns::id`]).
    fn netns_of(&mut self, pid: u32) -> io::Result<u64>;
    /// The name of `uid` on this host, if it has one.
    fn user_name(&mut self, uid: u32) -> Option<String>;
    /// This host's name.
    fn host_name(&mut self) -> Option<String>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_ends_are_as_distinct_as_the_ends() {
        let p =
            |proto, a: &str, b: &str| Packed::new(proto, a.parse().unwrap(), b.parse().unwrap());
        let tcp = |a, b| p(Proto::Tcp, a, b);
        assert_eq!(
            tcp("10.0.0.1:1", "10.0.0.2:2"),
            tcp("10.0.0.1:1", "10.0.0.2:2")
        );
        assert_ne!(
            tcp("10.0.0.1:1", "10.0.0.2:2"),
            tcp("10.0.0.2:2", "10.0.0.1:1")
        );
        assert_ne!(
            tcp("10.0.0.1:1", "10.0.0.2:2"),
            tcp("[::ffff:10.0.0.1]:1", "10.0.0.2:2")
        );
        assert_ne!(tcp("0.0.0.0:1", "0.0.0.0:0"), tcp("[::]:1", "0.0.0.0:0"));
        assert_ne!(
            tcp("10.0.0.1:1", "10.0.0.2:2"),
            p(Proto::Udp, "10.0.0.1:1", "10.0.0.2:2")
        );
        assert_eq!(std::mem::size_of::<Packed>(), 38);
    }
}
