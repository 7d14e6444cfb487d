//! The clsact qdisc and its filters over rtnetlink (`netlink-packet-route`'s
//! tc messages), so that no `tc` process runs: whether any filter is left
//! on a clsact hook (`RTM_GETTFILTER` dump, as `tc filter show dev X
//! ingress`), and removing the qdisc (`RTM_DELQDISC`, as `tc qdisc del dev
//! X clsact`). Everything acts in the calling thread's network namespace.
//!
//! Self-contained: rtnetlink crates, libc and thiserror only.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage, TcOption};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_utils::nla::Nla;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `ffff:0000`, the handle of every clsact (and ingress) qdisc.
const CLSACT_HANDLE: TcHandle = TcHandle {
    major: 0xffff,
    minor: 0,
};

/// One of clsact's two filter hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    /// The parent a filter on this hook has: `ffff:fff2` or `ffff:fff3`.
    fn parent(self) -> TcHandle {
        TcHandle {
            major: TcHandle::CLSACT.major,
            minor: match self {
                Hook::Ingress => TcHandle::MIN_INGRESS,
                Hook::Egress => TcHandle::MIN_EGRESS,
            },
        }
    }
}

/// One entry of a filter dump, as `tc filter show` prints it.
// The binary only asks whether there are any; the fields are for tests.
#[allow(dead_code)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// `bpf`, `u32`, `matchall`, ...
    pub kind: String,
    pub priority: u16,
    /// Ethertype in host order (`ETH_P_ALL` = 3 for `protocol all`).
    pub protocol: u16,
    /// 0 for the entry the kernel lists first for each priority, before
    /// the filters in it.
    pub handle: u32,
    pub chain: u32,
    /// A `bpf` filter's name (`TCA_BPF_NAME`: the program's, as aya names
    /// it) and program id (`TCA_BPF_ID`).
    pub bpf_name: Option<String>,
    pub bpf_id: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("rtnetlink socket: {0}")]
    Socket(io::Error),
    /// The kernel refused, with its extended-ack text when it gave one
    /// (the text `tc` would print).
    #[error("{}", kernel_text(.0, .1.as_deref()))]
    Kernel(io::Error, Option<String>),
    #[error("decoding an rtnetlink answer: {0}")]
    Decode(String),
}

fn kernel_text(e: &io::Error, text: Option<&str>) -> String {
    match text {
        Some(t) => format!("{t}: {e}"),
        None => e.to_string(),
    }
}

/// Removes the clsact qdisc of interface `ifindex`, and with it every
/// filter on its two hooks.
pub fn clsact_del(ifindex: u32) -> Result<(), Error> {
    request(
        &encode(del_clsact(ifindex), NLM_F_REQUEST | NLM_F_ACK),
        |_| {},
    )
}

fn del_clsact(ifindex: u32) -> RouteNetlinkMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = TcHandle::CLSACT;
    m.header.handle = CLSACT_HANDLE;
    // As `tc` sends it: the kernel then refuses to delete an `ingress`
    // qdisc, which has the same handle.
    m.attributes.push(TcAttribute::Kind("clsact".into()));
    RouteNetlinkMessage::DelQueueDiscipline(m)
}

/// Every filter on one hook of the clsact qdisc of `ifindex`, all chains;
/// none when the interface has no clsact qdisc.
pub fn filters_on(ifindex: u32, hook: Hook) -> Result<Vec<Filter>, Error> {
    let mut out = Vec::new();
    let req = encode(get_filters(ifindex, hook), NLM_F_REQUEST | NLM_F_DUMP);
    request(&req, |reply| {
        if let RouteNetlinkMessage::NewTrafficFilter(f) = reply {
            out.push(filter_of(&f));
        }
    })?;
    Ok(out)
}

fn get_filters(ifindex: u32, hook: Hook) -> RouteNetlinkMessage {
    let mut m = TcMessage::with_index(ifindex as i32);
    m.header.parent = hook.parent();
    RouteNetlinkMessage::GetTrafficFilter(m)
}

/// No filter at all on either hook of the clsact qdisc of `ifindex`.
pub fn clsact_is_empty(ifindex: u32) -> Result<bool, Error> {
    for hook in [Hook::Ingress, Hook::Egress] {
        if !filters_on(ifindex, hook)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

fn filter_of(m: &TcMessage) -> Filter {
    let mut f = Filter {
        kind: String::new(),
        // tcm_info: priority in the high half, protocol (network order) in
        // the low one.
        priority: (m.header.info >> 16) as u16,
        protocol: u16::from_be(m.header.info as u16),
        handle: m.header.handle.into(),
        chain: 0,
        bpf_name: None,
        bpf_id: None,
    };
    for a in &m.attributes {
        match a {
            TcAttribute::Kind(k) => f.kind.clone_from(k),
            TcAttribute::Chain(c) => f.chain = *c,
            TcAttribute::Options(opts) => {
                for o in opts {
                    if let TcOption::Other(nla) = o {
                        let mut v = vec![0u8; nla.value_len()];
                        nla.emit_value(&mut v);
                        bpf_options(&v, &mut f);
                    }
                }
            }
            _ => {}
        }
    }
    f
}

/// `TCA_BPF_NAME` and `TCA_BPF_ID` from a `bpf` filter's options (which
/// `netlink-packet-route` leaves undecoded).
fn bpf_options(mut a: &[u8], f: &mut Filter) {
    const TCA_BPF_NAME: u16 = 7;
    const TCA_BPF_ID: u16 = 11;
    while a.len() >= 4 {
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        let kind = u16::from_ne_bytes([a[2], a[3]]) & 0x3fff;
        let Some(value) = a.get(4..len) else { return };
        match kind {
            TCA_BPF_NAME => {
                let name = value.split(|&b| b == 0).next().unwrap_or_default();
                f.bpf_name = Some(String::from_utf8_lossy(name).into_owned());
            }
            TCA_BPF_ID if value.len() >= 4 => {
                f.bpf_id = Some(u32::from_ne_bytes([value[0], value[1], value[2], value[3]]));
            }
            _ => {}
        }
        let Some(rest) = a.get(((len + 3) & !3).max(4)..) else {
            return;
        };
        a = rest;
    }
}

fn encode(msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = flags;
    hdr.sequence_number = 1;
    let mut req = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    req.finalize();
    let mut out = vec![0; req.buffer_len()];
    req.serialize(&mut out);
    out
}

/// Sends `req` on a fresh rtnetlink socket (so every answer is to it) and
/// hands each reply to `each` until the dump's end or the kernel's
/// acknowledgement.
fn request(req: &[u8], mut each: impl FnMut(RouteNetlinkMessage)) -> Result<(), Error> {
    let sock = Socket::new(NETLINK_ROUTE).map_err(Error::Socket)?;
    // Best effort: older kernels answer without the text.
    let _ = sock.set_ext_ack(true);
    sock.send_to(req, &SocketAddr::new(0, 0), 0)
        .map_err(Error::Socket)?;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = loop {
            match sock.recv(&mut &mut buf[..], 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => break r.map_err(Error::Socket)?,
            }
        };
        let mut off = 0;
        while off < n {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..n])
                .map_err(|e| Error::Decode(e.to_string()))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::InnerMessage(r) => each(r),
                NetlinkPayload::Done(d) if d.code != 0 => {
                    return Err(Error::Kernel(io::Error::from_raw_os_error(-d.code), None))
                }
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => match e.code {
                    None => return Ok(()),
                    Some(c) => {
                        let text = ext_ack_msg(m.header.flags, &e.header);
                        return Err(Error::Kernel(io::Error::from_raw_os_error(-c.get()), text));
                    }
                },
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += (len + 3) & !3;
        }
    }
}

/// `NLMSGERR_ATTR_MSG` from an error's payload after the code: the request
/// (only its header with `NLM_F_CAPPED`), then attributes if
/// `NLM_F_ACK_TLVS`.
fn ext_ack_msg(flags: u16, payload: &[u8]) -> Option<String> {
    const NLM_F_CAPPED: u16 = 0x100;
    const NLM_F_ACK_TLVS: u16 = 0x200;
    const NLMSGERR_ATTR_MSG: u16 = 1;
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let req_len = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize
    };
    let mut a = payload.get((req_len + 3) & !3..)?;
    while a.len() >= 4 {
        let len = u16::from_ne_bytes([a[0], a[1]]) as usize;
        let kind = u16::from_ne_bytes([a[2], a[3]]);
        let value = a.get(4..len)?;
        if kind == NLMSGERR_ATTR_MSG {
            let text = value.split(|&b| b == 0).next()?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        a = a.get((len + 3) & !3..)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nlmsghdr(len: u32, kind: u16, flags: u16) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(len.to_ne_bytes());
        b.extend(kind.to_ne_bytes());
        b.extend(flags.to_ne_bytes());
        b.extend(1u32.to_ne_bytes()); // sequence
        b.extend(0u32.to_ne_bytes()); // port id
        b
    }

    /// `struct tcmsg`: family and padding, ifindex, handle, parent, info.
    fn tcmsg(ifindex: i32, handle: u32, parent: u32) -> Vec<u8> {
        let mut b = vec![0u8; 4];
        b.extend(ifindex.to_ne_bytes());
        b.extend(handle.to_ne_bytes());
        b.extend(parent.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b
    }

    /// The bytes `tc qdisc del dev <7> clsact` sends (iproute2, strace).
    #[test]
    fn deleting_clsact_asks_what_tc_asks() {
        let mut want = nlmsghdr(48, 37, 0x5); // RTM_DELQDISC, REQUEST|ACK
        want.extend(tcmsg(7, 0xffff_0000, 0xffff_fff1));
        want.extend(11u16.to_ne_bytes());
        want.extend(1u16.to_ne_bytes()); // TCA_KIND
        want.extend(b"clsact\0\0");
        assert_eq!(encode(del_clsact(7), NLM_F_REQUEST | NLM_F_ACK), want);
    }

    /// `tc filter show dev <7> egress`: a dump under `ffff:fff3`.
    #[test]
    fn listing_filters_asks_what_tc_asks() {
        let mut want = nlmsghdr(36, 46, 0x301); // RTM_GETTFILTER, REQUEST|DUMP
        want.extend(tcmsg(7, 0, 0xffff_fff3));
        let got = encode(get_filters(7, Hook::Egress), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(got, want);
        let ingress = encode(get_filters(7, Hook::Ingress), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(ingress[28..32], 0xffff_fff2u32.to_ne_bytes());
    }

    #[test]
    fn a_filter_from_its_message() {
        let mut m = TcMessage::with_index(7);
        // pref 49152, protocol all (ETH_P_ALL, network order).
        m.header.info = 49152 << 16 | u32::from(3u16.to_be());
        m.header.handle = 1.into();
        m.attributes.push(TcAttribute::Kind("bpf".into()));
        m.attributes.push(TcAttribute::Chain(2));
        let f = filter_of(&m);
        assert_eq!(
            f,
            Filter {
                kind: "bpf".into(),
                priority: 49152,
                protocol: 3,
                handle: 1,
                chain: 2,
                bpf_name: None,
                bpf_id: None,
            }
        );
    }

    /// The kernel's text after a capped request header, as in `tc`'s
    /// "Error: Cannot find specified qdisc on specified device."
    #[test]
    fn extended_ack_text() {
        let text = b"Cannot find specified qdisc on specified device\0";
        let mut p = nlmsghdr(48, 37, 0x5);
        p.extend(((4 + text.len()) as u16).to_ne_bytes());
        p.extend(1u16.to_ne_bytes()); // NLMSGERR_ATTR_MSG
        p.extend(text);
        let capped_tlvs = 0x300;
        assert_eq!(
            ext_ack_msg(capped_tlvs, &p).as_deref(),
            Some("Cannot find specified qdisc on specified device")
        );
        assert_eq!(ext_ack_msg(0x100, &p), None);
        let e = Error::Kernel(
            io::Error::from_raw_os_error(libc::ENOENT),
            Some("Gone".into()),
        );
        assert_eq!(
            e.to_string(),
            "Gone: No such file or directory (os error 2)"
        );
    }
}
