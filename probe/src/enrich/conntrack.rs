//! The conntrack table of this network namespace over ctnetlink
//! (`NETLINK_NETFILTER`, `IPCTNL_MSG_CT_GET` of one tuple) through
//! `netlink-packet-netfilter`: the two tuples of the entry a connection's
//! packets belong to, which is how a translated connection is joined to
//! its original addresses ([`flowtable::nat`]). One kernel hash lookup per
//! question, never a dump of the table (a gateway's holds millions).
//!
//! Reading it needs CAP_NET_ADMIN in the namespace (nfnetlink checks it for
//! every message); without, every lookup fails with `EPERM`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;

use flowtable::attrib::Proto;
use flowtable::nat::Translation;
use netlink_packet_core_09::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr as NlAddr};

pub struct CtSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
    req: Vec<u8>,
}

impl CtSocket {
    /// A ctnetlink socket of the calling thread's network namespace.
    pub fn open() -> io::Result<CtSocket> {
        let sock = Socket::new(NETLINK_NETFILTER)?;
        // The kernel answers at once; should it not, the run loop waits a
        // second at most (an error, counted), not forever.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: setsockopt(2) on our own socket with a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const tv).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(CtSocket {
            sock,
            seq: 0,
            buf: vec![0u8; 16 * 1024],
            req: Vec::new(),
        })
    }

    /// The entry one of whose directions is `src → dst`, if any.
    pub fn lookup(
        &mut self,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<Translation>> {
        let family = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => NetfilterProtoFamily::IPv4,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => NetfilterProtoFamily::IPv6,
            // A connection has one family; nothing to ask.
            _ => return Ok(None),
        };
        self.seq = self.seq.wrapping_add(1);
        encode(&mut self.req, self.seq, family, proto, src, dst);
        self.sock.send_to(&self.req, &NlAddr::new(0, 0), 0)?;
        loop {
            let n = loop {
                match self.sock.recv(&mut &mut self.buf[..], 0) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if let Some(answer) = parse_answer(&self.buf[..n], self.seq)? {
                return Ok(answer);
            }
        }
    }
}

/// `IPCTNL_MSG_CT_GET` of the tuple `src → dst` into `out`.
fn encode(
    out: &mut Vec<u8>,
    seq: u32,
    family: NetfilterProtoFamily,
    proto: Proto,
    src: SocketAddr,
    dst: SocketAddr,
) {
    let tuple = vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(src.ip()),
            IPTuple::DestinationAddress(dst.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(match proto {
                Proto::Tcp => Protocol::Tcp,
                Proto::Udp => Protocol::Udp,
            }),
            ProtoTuple::SourcePort(src.port()),
            ProtoTuple::DestinationPort(dst.port()),
        ]),
    ];
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST;
    hdr.sequence_number = seq;
    let mut msg = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleOrig(tuple)]),
        )),
    );
    msg.finalize();
    out.clear();
    out.resize(msg.buffer_len(), 0);
    msg.serialize(out);
}

/// The answer to request `seq` in one datagram: `Some(None)` when the
/// table has no such entry, `None` when the datagram does not answer it.
fn parse_answer(mut b: &[u8], seq: u32) -> io::Result<Option<Option<Translation>>> {
    while b.len() >= 16 {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < 16 || len > b.len() {
            return Err(malformed());
        }
        let msg =
            NetlinkMessage::<NetfilterMessage>::deserialize(&b[..len]).map_err(|_| malformed())?;
        if msg.header.sequence_number == seq {
            match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_none() => return Ok(Some(None)),
                NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => return Ok(Some(None)),
                NetlinkPayload::Error(e) => return Err(e.to_io()),
                NetlinkPayload::Done(_) => return Ok(Some(None)),
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(m),
                    ..
                }) => {
                    return Ok(Some(match m {
                        ConntrackMessage::New(a) | ConntrackMessage::Get(a) => translation(&a),
                        _ => None,
                    }))
                }
                _ => {}
            }
        }
        b = b.get((len + 3) & !3..).unwrap_or(&[]);
    }
    Ok(None)
}

/// The two tuples of an entry's attributes.
fn translation(attrs: &[ConntrackAttribute]) -> Option<Translation> {
    let (mut orig, mut reply) = (None, None);
    for a in attrs {
        match a {
            ConntrackAttribute::CtaTupleOrig(t) => orig = tuple(t),
            ConntrackAttribute::CtaTupleReply(t) => reply = tuple(t),
            _ => {}
        }
    }
    let ((p, o0, o1), (q, r0, r1)) = (orig?, reply?);
    (p == q).then_some(Translation {
        proto: p,
        orig: (o0, o1),
        reply: (r0, r1),
    })
}

fn tuple(t: &[Tuple]) -> Option<(Proto, SocketAddr, SocketAddr)> {
    let (mut src, mut dst, mut proto, mut sport, mut dport) = (None, None, None, None, None);
    for part in t {
        match part {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(ps) => {
                for p in ps {
                    match p {
                        ProtoTuple::Protocol(Protocol::Tcp) => proto = Some(Proto::Tcp),
                        ProtoTuple::Protocol(Protocol::Udp) => proto = Some(Proto::Udp),
                        ProtoTuple::SourcePort(n) => sport = Some(*n),
                        ProtoTuple::DestinationPort(n) => dport = Some(*n),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some((
        proto?,
        SocketAddr::new(src?, sport?),
        SocketAddr::new(dst?, dport?),
    ))
}

fn malformed() -> io::Error {
    io::Error::other("ctnetlink: malformed netlink message")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// An entry as the kernel sends it (`IPCTNL_MSG_CT_NEW`, both tuples,
    /// status and more), made with the crate's own encoder.
    fn answer(seq: u32, orig: (&str, &str), reply: (&str, &str)) -> Vec<u8> {
        let t = |(s, d): (&str, &str)| {
            let (s, d) = (addr(s), addr(d));
            vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(s.ip()),
                    IPTuple::DestinationAddress(d.ip()),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Tcp),
                    ProtoTuple::SourcePort(s.port()),
                    ProtoTuple::DestinationPort(d.port()),
                ]),
            ]
        };
        let mut hdr = NetlinkHeader::default();
        hdr.sequence_number = seq;
        let mut msg = NetlinkMessage::new(
            hdr,
            NetlinkPayload::from(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                ConntrackMessage::New(vec![
                    ConntrackAttribute::CtaTupleOrig(t(orig)),
                    ConntrackAttribute::CtaTupleReply(t(reply)),
                    ConntrackAttribute::CtaTimeout(120),
                    ConntrackAttribute::CtaMark(0),
                ]),
            )),
        );
        msg.finalize();
        let mut out = vec![0; msg.buffer_len()];
        msg.serialize(&mut out);
        out
    }

    #[test]
    fn reads_both_tuples_of_an_entry() {
        let b = answer(
            7,
            ("10.90.0.2:40020", "192.0.2.2:5001"),
            ("192.0.2.2:5001", "192.0.2.1:40020"),
        );
        let t = parse_answer(&b, 7).unwrap().unwrap().unwrap();
        assert_eq!(t.proto, Proto::Tcp);
        assert_eq!(t.orig, (addr("10.90.0.2:40020"), addr("192.0.2.2:5001")));
        assert_eq!(t.reply, (addr("192.0.2.2:5001"), addr("192.0.2.1:40020")));
        assert!(t.translates());
        // Another request's answer is not this one's.
        assert_eq!(parse_answer(&b, 8).unwrap(), None);
        // Cut short: an error, never a panic.
        for n in [17, 30, b.len() - 1] {
            let _ = parse_answer(&b[..n], 7);
        }
    }

    #[test]
    fn no_entry_is_an_answer_and_other_errors_are_errors() {
        let err = |code: i32| {
            let mut b = vec![0u8; 36];
            b[0..4].copy_from_slice(&36u32.to_ne_bytes());
            b[4..6].copy_from_slice(&2u16.to_ne_bytes()); // NLMSG_ERROR
            b[8..12].copy_from_slice(&3u32.to_ne_bytes());
            b[16..20].copy_from_slice(&code.to_ne_bytes());
            b[20..24].copy_from_slice(&20u32.to_ne_bytes());
            b
        };
        assert_eq!(parse_answer(&err(-libc::ENOENT), 3).unwrap(), Some(None));
        let e = parse_answer(&err(-libc::EPERM), 3).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn asks_for_one_tuple() {
        let mut b = Vec::new();
        encode(
            &mut b,
            9,
            NetfilterProtoFamily::IPv4,
            Proto::Udp,
            addr("10.0.0.1:53000"),
            addr("10.0.0.2:53"),
        );
        // nlmsghdr: type = NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET.
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), 1 << 8 | 1);
        assert_eq!(u32::from_ne_bytes([b[8], b[9], b[10], b[11]]), 9);
        // nfgenmsg: AF_INET.
        assert_eq!(b[16], libc::AF_INET as u8);
    }
}
