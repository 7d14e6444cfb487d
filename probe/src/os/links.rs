//! The interfaces of the current network namespace, from rtnetlink: a dump
//! at start and the link events (`RTNLGRP_LINK`) after it.

use std::io;

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlag, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// `RTMGRP_LINK`: the multicast group bit of `RTNLGRP_LINK` (1).
const RTMGRP_LINK: u32 = 1;

/// One interface as rtnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFF_UP`: administratively up.
    pub up: bool,
    /// `IFF_LOOPBACK`: every packet passes its egress and then its ingress.
    pub loopback: bool,
}

#[derive(Debug)]
pub enum Event {
    /// A new interface, or a change to one (flags, name).
    New(Link),
    /// The interface is gone from this namespace (deleted or moved away).
    Del(Link),
}

fn link_of(m: &LinkMessage) -> Option<Link> {
    let name = m.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })?;
    Some(Link {
        index: m.header.index,
        name,
        up: m.header.flags.contains(&LinkFlag::Up),
        loopback: m.header.flags.contains(&LinkFlag::Loopback),
    })
}

/// Calls `f` with each rtnetlink message in one datagram.
fn each_message(
    buf: &[u8],
    mut f: impl FnMut(NetlinkMessage<RouteNetlinkMessage>) -> Result<bool>,
) -> Result<bool> {
    let mut off = 0;
    while off < buf.len() {
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..])
            .map_err(|e| anyhow::anyhow!("decoding an rtnetlink message: {e}"))?;
        let len = msg.header.length as usize;
        if !f(msg)? {
            return Ok(false);
        }
        if len == 0 {
            break;
        }
        off += (len + 3) & !3;
    }
    Ok(true)
}

/// Every interface of the current network namespace (`RTM_GETLINK` dump).
pub fn dump() -> Result<Vec<Link>> {
    let mut sock = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
    sock.bind_auto().context("binding an rtnetlink socket")?;
    sock.connect(&SocketAddr::new(0, 0))
        .context("connecting an rtnetlink socket")?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_DUMP | NLM_F_REQUEST;
    let mut req = NetlinkMessage::new(
        hdr,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.finalize();
    let mut out = vec![0; req.header.length as usize];
    req.serialize(&mut out[..]);
    sock.send(&out, 0)
        .context("asking rtnetlink for the links")?;

    let mut links = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = sock
            .recv(&mut &mut buf[..], 0)
            .context("reading the link dump")?;
        let more = each_message(&buf[..n], |msg| match msg.payload {
            NetlinkPayload::Done(_) => Ok(false),
            NetlinkPayload::Error(e) => bail!("rtnetlink link dump: {e:?}"),
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                links.extend(link_of(&m));
                Ok(true)
            }
            _ => Ok(true),
        })?;
        if !more {
            return Ok(links);
        }
    }
}

/// Subscribed to the link events of the current network namespace;
/// non-blocking.
pub struct Watcher {
    sock: Socket,
    buf: Vec<u8>,
}

/// The event socket's receive buffer.
const RCVBUF: usize = 4 << 20;

impl Watcher {
    /// Subscribe before dumping, so that no change falls between the two.
    pub fn subscribe() -> Result<Self> {
        let mut sock = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        sock.bind(&SocketAddr::new(0, RTMGRP_LINK))
            .context("subscribing to rtnetlink link events")?;
        // Hundreds of interfaces made at once send more events than the
        // default buffer holds; lost ones are made up for by a resync, but
        // fewer losses mean fewer dumps. (Best effort: the kernel caps it.)
        let _ = sock.set_rx_buf_sz(RCVBUF);
        sock.set_non_blocking(true)?;
        Ok(Watcher {
            sock,
            buf: vec![0u8; 1 << 16],
        })
    }

    /// The events that arrived since the last call. `Err` with
    /// `ENOBUFS` means events were lost: the caller should dump again.
    pub fn poll(&mut self) -> io::Result<Vec<Event>> {
        let mut events = Vec::new();
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(events),
                Err(e) => return Err(e),
            };
            let r = each_message(&self.buf[..n], |msg| {
                match msg.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                        events.extend(link_of(&m).map(Event::New));
                    }
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                        events.extend(link_of(&m).map(Event::Del));
                    }
                    _ => {}
                }
                Ok(true)
            });
            if let Err(e) = r {
                return Err(io::Error::other(format!("{e:#}")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_lists_loopback() {
        let links = dump().unwrap();
        assert!(links.iter().any(|l| l.name == "lo"), "{links:?}");
    }
}
