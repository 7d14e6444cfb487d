//! TCP and UDP sockets of one network namespace through sock_diag netlink
//! (`NETLINK_SOCK_DIAG`, `inet_diag_req_v2`): address, port, state, uid,
//! inode and cookie of every socket, v4 and v6, in four dumps.
//!
//! A netlink socket answers for the namespace it was created in, so
//! [`DiagSocket::open_in`] creates it on a short-lived thread that first
//! joins the namespace (`setns`); the thread exits, the socket stays bound
//! to that namespace, and the calling thread never leaves its own.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use flowtable::attrib::{Proto, SocketEntry, SocketState, Tuple};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const TCP_LISTEN: u8 = 10;
const TCP_TIME_WAIT: u32 = 6;
const TCP_NEW_SYN_RECV: u32 = 12;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct InetDiagSockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Request {
    nlh: libc::nlmsghdr,
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`, as the kernel sends it.
const MSG_LEN: usize = 4 + size_of::<InetDiagSockId>() + 5 * 4;

pub struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    /// Receive buffer, kept: a pass makes four dumps per namespace.
    buf: Vec<u8>,
}

impl DiagSocket {
    /// A sock_diag socket of the calling thread's namespace.
    pub fn open() -> io::Result<DiagSocket> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(DiagSocket {
            fd,
            seq: 0,
            buf: vec![0u8; 32 * 1024],
        })
    }

    /// A sock_diag socket of the namespace `netns` (an open
    /// `/proc/<pid>/ns/net`).
    pub fn open_in(netns: &File) -> io::Result<DiagSocket> {
        let ns = netns.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns(2) on a valid descriptor; it changes only
                // this thread, which ends right after.
                if unsafe { libc::setns(ns, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                DiagSocket::open()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the setns thread panicked")))
        })
    }

    /// Every TCP and UDP socket, v4 and v6.
    pub fn sockets(&mut self) -> io::Result<Vec<SocketEntry>> {
        let mut out = Vec::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            for family in [libc::AF_INET, libc::AF_INET6] {
                self.dump(family as u8, proto, &mut out)?;
            }
        }
        Ok(out)
    }

    fn dump(&mut self, family: u8, proto: Proto, out: &mut Vec<SocketEntry>) -> io::Result<()> {
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_DUMP;
        // Not TIME_WAIT nor not-yet-accepted sockets: no process holds them
        // (the kernel still walks its table, but sends and we parse less).
        let states = match proto {
            Proto::Tcp => !(1 << TCP_TIME_WAIT | 1 << TCP_NEW_SYN_RECV),
            Proto::Udp => u32::MAX,
        };
        self.send(
            family,
            proto,
            flags as u16,
            states,
            InetDiagSockId::default(),
        )?;
        loop {
            let n = self.recv()?;
            if parse_batch(&self.buf[..n], self.seq, proto, out)? {
                return Ok(());
            }
        }
    }

    /// The socket the kernel would deliver a packet from `t.remote` to
    /// `t.local` to: one hash lookup, not a walk.
    pub fn lookup(&mut self, t: &Tuple) -> io::Result<Option<SocketEntry>> {
        let (family, bytes) = match (t.local.ip(), t.remote.ip()) {
            (IpAddr::V4(l), IpAddr::V4(r)) => (libc::AF_INET, (pad4(l.octets()), pad4(r.octets()))),
            (l, r) => (libc::AF_INET6, (v6(l).octets(), v6(r).octets())),
        };
        let (local, remote) = bytes;
        let ends = [
            (t.local.port().to_be_bytes(), local),
            (t.remote.port().to_be_bytes(), remote),
        ];
        // TCP takes `src` as the local end; UDP the other way round ("src
        // and dst are swapped for historical reasons", udp_diag.c).
        let (src, dst) = match t.proto {
            Proto::Tcp => (ends[0], ends[1]),
            Proto::Udp => (ends[1], ends[0]),
        };
        let id = InetDiagSockId {
            sport: src.0,
            dport: dst.0,
            src: src.1,
            dst: dst.1,
            ifindex: 0,
            // INET_DIAG_NOCOOKIE: any socket.
            cookie: [u32::MAX; 2],
        };
        self.send(
            family as u8,
            t.proto,
            libc::NLM_F_REQUEST as u16,
            u32::MAX,
            id,
        )?;
        let mut out = Vec::new();
        loop {
            let n = self.recv()?;
            match parse_batch(&self.buf[..n], self.seq, t.proto, &mut out) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
                Err(e) => return Err(e),
                // One answer, no NLMSG_DONE after it.
                Ok(_) if !out.is_empty() => return Ok(out.pop()),
                Ok(true) => return Ok(None),
                Ok(false) => continue,
            }
        }
    }

    fn send(
        &mut self,
        family: u8,
        proto: Proto,
        flags: u16,
        states: u32,
        id: InetDiagSockId,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let req = Request {
            nlh: libc::nlmsghdr {
                nlmsg_len: size_of::<Request>() as u32,
                nlmsg_type: SOCK_DIAG_BY_FAMILY,
                nlmsg_flags: flags,
                nlmsg_seq: self.seq,
                nlmsg_pid: 0,
            },
            family,
            protocol: match proto {
                Proto::Tcp => libc::IPPROTO_TCP as u8,
                Proto::Udp => libc::IPPROTO_UDP as u8,
            },
            ext: 0,
            pad: 0,
            states,
            id,
        };
        let mut dest: libc::sockaddr_nl = unsafe_zeroed_nl();
        dest.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `req` and `dest` are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                (&req as *const Request).cast(),
                size_of::<Request>(),
                0,
                (&dest as *const libc::sockaddr_nl).cast(),
                size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One datagram into `self.buf`; its length.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: `buf` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// An IPv4 address in the 16-byte field: first four bytes.
fn pad4(a: [u8; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a);
    b
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn unsafe_zeroed_nl() -> libc::sockaddr_nl {
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// One datagram of netlink messages; true at the end of the dump.
fn parse_batch(
    mut b: &[u8],
    seq: u32,
    proto: Proto,
    out: &mut Vec<SocketEntry>,
) -> io::Result<bool> {
    const HDR: usize = size_of::<libc::nlmsghdr>();
    while b.len() >= HDR {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let mseq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        if len < HDR || len > b.len() {
            return Err(io::Error::other("sock_diag: malformed netlink message"));
        }
        let body = &b[HDR..len];
        if mseq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let code = body
                        .get(..4)
                        .map(|e| i32::from_ne_bytes([e[0], e[1], e[2], e[3]]))
                        .unwrap_or(0);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return Ok(true);
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse_msg(body, proto) {
                        out.push(s);
                    }
                }
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        b = b.get(step..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `inet_diag_msg`.
fn parse_msg(m: &[u8], proto: Proto) -> Option<SocketEntry> {
    if m.len() < MSG_LEN {
        return None;
    }
    let family = m[0];
    let state = m[1];
    let id = &m[4..4 + size_of::<InetDiagSockId>()];
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let addr = |a: &[u8]| -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
        } else {
            let mut v = [0u8; 16];
            v.copy_from_slice(&a[..16]);
            IpAddr::V6(Ipv6Addr::from(v))
        }
    };
    let src = addr(&id[4..20]);
    let dst = addr(&id[20..36]);
    let cookie_lo = u32::from_ne_bytes([id[40], id[41], id[42], id[43]]) as u64;
    let cookie_hi = u32::from_ne_bytes([id[44], id[45], id[46], id[47]]) as u64;
    let tail = &m[4 + size_of::<InetDiagSockId>()..];
    let word = |i: usize| {
        u32::from_ne_bytes([
            tail[i * 4],
            tail[i * 4 + 1],
            tail[i * 4 + 2],
            tail[i * 4 + 3],
        ])
    };
    // expires, rqueue, wqueue, uid, inode
    let uid = word(3);
    let inode = word(4) as u64;
    Some(SocketEntry {
        tuple: Tuple::new(
            proto,
            SocketAddr::new(src, sport),
            SocketAddr::new(dst, dport),
        ),
        inode,
        uid,
        cookie: cookie_lo | cookie_hi << 32,
        state: if proto == Proto::Tcp && state == TCP_LISTEN {
            SocketState::Listen
        } else {
            SocketState::Other
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::fs::MetadataExt;

    fn inode_of(fd: i32) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino()
    }

    /// Runs without privileges: a process may dump its own namespace.
    #[test]
    fn finds_our_own_tcp_and_udp_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (srv, _) = l.accept().unwrap();
        let u = UdpSocket::bind("[::1]:0").unwrap();
        let all = DiagSocket::open().unwrap().sockets().unwrap();
        let find = |local: SocketAddr, remote: SocketAddr, p: Proto| {
            all.iter()
                .find(|s| s.tuple == Tuple::new(p, local, remote))
                .copied()
                .unwrap_or_else(|| panic!("no {p:?} {local} -> {remote} in the dump"))
        };
        let any6: SocketAddr = "[::]:0".parse().unwrap();
        let any4: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let s = find(c.local_addr().unwrap(), c.peer_addr().unwrap(), Proto::Tcp);
        assert_eq!(s.inode, inode_of(c.as_raw_fd()));
        assert_ne!(s.cookie, 0);
        let s = find(
            srv.local_addr().unwrap(),
            srv.peer_addr().unwrap(),
            Proto::Tcp,
        );
        assert_eq!(s.inode, inode_of(srv.as_raw_fd()));
        let s = find(l.local_addr().unwrap(), any4, Proto::Tcp);
        assert_eq!(s.state, SocketState::Listen);
        let s = find(u.local_addr().unwrap(), any6, Proto::Udp);
        assert_eq!(s.inode, inode_of(u.as_raw_fd()));
        // SAFETY: no preconditions.
        assert_eq!(s.uid, unsafe { libc::getuid() });
    }

    #[test]
    fn looks_up_one_socket_by_its_5_tuple() {
        let mut d = DiagSocket::open().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (srv, _) = l.accept().unwrap();
        let (cl, cr) = (c.local_addr().unwrap(), c.peer_addr().unwrap());
        let t = Tuple::new(Proto::Tcp, cl, cr);
        let s = d.lookup(&t).unwrap().unwrap();
        assert_eq!((s.tuple, s.inode), (t, inode_of(c.as_raw_fd())));
        let t = Tuple::new(Proto::Tcp, cr, cl);
        let s = d.lookup(&t).unwrap().unwrap();
        assert_eq!((s.tuple, s.inode), (t, inode_of(srv.as_raw_fd())));
        // An unknown peer of the listening port: the listener.
        let t = Tuple::new(Proto::Tcp, cr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(d.lookup(&t).unwrap().unwrap().state, SocketState::Listen);
        // Nothing on that port at all.
        let t = Tuple::new(Proto::Tcp, "127.0.0.1:1".parse().unwrap(), cl);
        assert_eq!(d.lookup(&t).unwrap(), None);

        // UDP: connected, and an unconnected server taking any peer.
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        a.connect(b.local_addr().unwrap()).unwrap();
        let t = Tuple::new(Proto::Udp, a.local_addr().unwrap(), b.local_addr().unwrap());
        let s = d.lookup(&t).unwrap().unwrap();
        assert_eq!((s.tuple, s.inode), (t, inode_of(a.as_raw_fd())));
        let t = Tuple::new(Proto::Udp, b.local_addr().unwrap(), a.local_addr().unwrap());
        assert_eq!(
            d.lookup(&t).unwrap().unwrap().inode,
            inode_of(b.as_raw_fd())
        );
        // IPv6, and a dual-stack socket reached over IPv4.
        let l6 = TcpListener::bind("[::]:0").unwrap();
        let port = l6.local_addr().unwrap().port();
        let c4 = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (s6, _) = l6.accept().unwrap();
        let t = Tuple::new(
            Proto::Tcp,
            c4.peer_addr().unwrap(),
            c4.local_addr().unwrap(),
        );
        let s = d.lookup(&t).unwrap().unwrap();
        assert_eq!((s.tuple, s.inode), (t, inode_of(s6.as_raw_fd())));
    }
}
