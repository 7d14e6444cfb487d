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
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use flowtable::attrib::{Proto, SocketEntry, SocketState, Tuple};
use netlink_packet_core::{
    ErrorBuffer, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NLMSG_DONE, NLMSG_ERROR, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY, TCP_LISTEN, TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::{
    ExtensionFlags, InetRequest, InetResponseBuffer, InetResponseHeader, SocketId, StateFlags,
};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_utils::Parseable;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

/// Not among the crate's constants (Linux 4.4+).
const TCP_NEW_SYN_RECV: u8 = 12;

pub struct DiagSocket {
    sock: Socket,
    seq: u32,
    /// Receive buffer, kept: a pass makes four dumps per namespace.
    buf: Vec<u8>,
    /// Send buffer, kept for the same reason.
    req: Vec<u8>,
}

impl DiagSocket {
    /// A sock_diag socket of the calling thread's namespace.
    pub fn open() -> io::Result<DiagSocket> {
        Ok(DiagSocket {
            sock: Socket::new(NETLINK_SOCK_DIAG)?,
            seq: 0,
            buf: vec![0u8; 32 * 1024],
            req: Vec::new(),
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
            for family in [AF_INET, AF_INET6] {
                self.dump(family, proto, &mut out)?;
            }
        }
        Ok(out)
    }

    fn dump(&mut self, family: u8, proto: Proto, out: &mut Vec<SocketEntry>) -> io::Result<()> {
        // Not TIME_WAIT nor not-yet-accepted sockets: no process holds them
        // (the kernel still walks its table, but sends and we parse less).
        let states = match proto {
            Proto::Tcp => !(1 << TCP_TIME_WAIT | 1 << TCP_NEW_SYN_RECV),
            Proto::Udp => u32::MAX,
        };
        let id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        self.send(family, proto, NLM_F_REQUEST | NLM_F_DUMP, states, id)?;
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
        let (family, id) = lookup_id(t);
        self.send(family, t.proto, NLM_F_REQUEST, u32::MAX, id)?;
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
        id: SocketId,
    ) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        encode(
            &mut self.req,
            self.seq,
            flags,
            request(family, proto, states, id),
        );
        // To the kernel (port 0); the socket is bound on this first send.
        self.sock.send_to(&self.req, &NlAddr::new(0, 0), 0)?;
        Ok(())
    }

    /// One datagram into `self.buf`; its length.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The address family and socket id that ask for `t`.
fn lookup_id(t: &Tuple) -> (u8, SocketId) {
    let (family, local, remote) = match (t.local.ip(), t.remote.ip()) {
        (l @ IpAddr::V4(_), r @ IpAddr::V4(_)) => (AF_INET, l, r),
        (l, r) => (AF_INET6, IpAddr::V6(v6(l)), IpAddr::V6(v6(r))),
    };
    let ends = [(t.local.port(), local), (t.remote.port(), remote)];
    // TCP takes `src` as the local end; UDP the other way round ("src
    // and dst are swapped for historical reasons", udp_diag.c).
    let (src, dst) = match t.proto {
        Proto::Tcp => (ends[0], ends[1]),
        Proto::Udp => (ends[1], ends[0]),
    };
    let id = SocketId {
        source_port: src.0,
        destination_port: dst.0,
        source_address: src.1,
        destination_address: dst.1,
        interface_id: 0,
        // INET_DIAG_NOCOOKIE: any socket.
        cookie: [0xff; 8],
    };
    (family, id)
}

fn request(family: u8, proto: Proto, states: u32, id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol: match proto {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        },
        extensions: ExtensionFlags::empty(),
        // SAFETY: bitflags 1 calls this unsafe only because bits without a
        // constant are kept; the kernel reads them (states past
        // TCP_CLOSING, such as TCP_BOUND_INACTIVE, are dumped too).
        states: unsafe { StateFlags::from_bits_unchecked(states) },
        socket_id: id,
    }
}

/// `req` as one netlink message into `out`.
fn encode(out: &mut Vec<u8>, seq: u32, flags: u16, req: InetRequest) {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    hdr.sequence_number = seq;
    let mut msg = NetlinkMessage::new(hdr, SockDiagMessage::InetRequest(req).into());
    msg.finalize();
    out.resize(msg.buffer_len(), 0);
    msg.serialize(out);
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn malformed() -> io::Error {
    io::Error::other("sock_diag: malformed netlink message")
}

/// One datagram of netlink messages; true at the end of the dump.
fn parse_batch(
    mut b: &[u8],
    seq: u32,
    proto: Proto,
    out: &mut Vec<SocketEntry>,
) -> io::Result<bool> {
    while b.len() >= netlink_packet_core::NETLINK_HEADER_LEN {
        let msg = NetlinkBuffer::new_checked(b).map_err(|_| malformed())?;
        let len = msg.length() as usize;
        if msg.sequence_number() == seq {
            match msg.message_type() {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    // No code (short message) reads as an acknowledgement.
                    let code = ErrorBuffer::new_checked(msg.payload())
                        .ok()
                        .and_then(|e| e.code());
                    return match code {
                        Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                        None => Ok(true),
                    };
                }
                SOCK_DIAG_BY_FAMILY => out.extend(parse_msg(msg.payload(), proto)),
                _ => {}
            }
        }
        // Messages are 4-byte aligned.
        let step = (len + 3) & !3;
        b = b.get(step..).unwrap_or(&[]);
    }
    Ok(false)
}

/// One `inet_diag_msg`: the fixed part only; the attributes after it are
/// not parsed (none asked for, and a dump is thousands of these).
fn parse_msg(m: &[u8], proto: Proto) -> Option<SocketEntry> {
    let h = InetResponseHeader::parse(&InetResponseBuffer::new_checked(m).ok()?).ok()?;
    let id = &h.socket_id;
    // `idiag_cookie` is two host-order u32s, low word first.
    let c = id.cookie;
    let cookie_lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64;
    let cookie_hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]) as u64;
    Some(SocketEntry {
        tuple: Tuple::new(
            proto,
            SocketAddr::new(id.source_address, id.source_port),
            SocketAddr::new(id.destination_address, id.destination_port),
        ),
        inode: h.inode as u64,
        uid: h.uid,
        cookie: cookie_lo | cookie_hi << 32,
        state: if proto == Proto::Tcp && h.state == TCP_LISTEN {
            SocketState::Listen
        } else {
            SocketState::Other
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
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

    /// `inet_diag_req_v2` as the kernel reads it, field by field.
    fn req_v2(flags: u16, family: u8, proto: u8, states: u32, id: [&[u8]; 6]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(72u32.to_ne_bytes());
        b.extend(20u16.to_ne_bytes()); // SOCK_DIAG_BY_FAMILY
        b.extend(flags.to_ne_bytes());
        b.extend(9u32.to_ne_bytes()); // sequence
        b.extend(0u32.to_ne_bytes()); // port id
        b.extend([family, proto, 0, 0]);
        b.extend(states.to_ne_bytes());
        for f in id {
            b.extend(f);
        }
        b
    }

    /// The requests are byte for byte what the hand-made struct sent: a
    /// TCP dump with its state mask (bits without a constant in the crate
    /// kept), a UDP lookup of an IPv6 socket with an IPv4-mapped peer.
    #[test]
    fn requests_are_unchanged_on_the_wire() {
        let mut b = Vec::new();
        let states = !(1u32 << 6 | 1 << 12);
        let dump = request(AF_INET, Proto::Tcp, states, SocketId::new_v4());
        encode(&mut b, 9, NLM_F_REQUEST | NLM_F_DUMP, dump);
        let zero = [0u8; 16];
        let want = req_v2(
            0x301,
            2,
            6,
            states,
            [&[0, 0], &[0, 0], &zero, &zero, &[0; 4], &[0; 8]],
        );
        assert_eq!(b, want);

        let local: SocketAddr = "[2001:db8::1]:53".parse().unwrap();
        let t = Tuple::new(Proto::Udp, local, "10.0.0.1:5000".parse().unwrap());
        let (family, id) = lookup_id(&t);
        encode(
            &mut b,
            9,
            NLM_F_REQUEST,
            request(family, Proto::Udp, u32::MAX, id),
        );
        let mapped = Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped().octets();
        let l6 = "2001:db8::1".parse::<Ipv6Addr>().unwrap().octets();
        let want = req_v2(
            1,
            10,
            17,
            u32::MAX,
            // UDP: the remote end is `src`.
            [
                &5000u16.to_be_bytes(),
                &53u16.to_be_bytes(),
                &mapped,
                &l6,
                &[0; 4],
                &[0xff; 8],
            ],
        );
        assert_eq!(b, want);
    }

    /// An error answer is the errno; a short one an acknowledgement.
    #[test]
    fn error_answers() {
        let msg = |seq: u32, code: &[u8]| {
            let mut b = Vec::new();
            b.extend((16 + code.len() as u32).to_ne_bytes());
            b.extend(2u16.to_ne_bytes()); // NLMSG_ERROR
            b.extend(0u16.to_ne_bytes());
            b.extend(seq.to_ne_bytes());
            b.extend(0u32.to_ne_bytes());
            b.extend(code);
            b
        };
        let mut out = Vec::new();
        let e = parse_batch(
            &msg(3, &(-libc::ENOENT).to_ne_bytes()),
            3,
            Proto::Tcp,
            &mut out,
        );
        assert_eq!(e.unwrap_err().raw_os_error(), Some(libc::ENOENT));
        assert!(parse_batch(&msg(3, &[]), 3, Proto::Tcp, &mut out).unwrap());
        // Another request's answer is passed over.
        let e = msg(2, &(-libc::EPERM).to_ne_bytes());
        assert!(!parse_batch(&e, 3, Proto::Tcp, &mut out).unwrap());
        let mut cut = msg(3, &[0; 4]);
        cut.truncate(18);
        cut[0] = 40;
        assert!(parse_batch(&cut, 3, Proto::Tcp, &mut out).is_err());
        assert!(out.is_empty());
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
