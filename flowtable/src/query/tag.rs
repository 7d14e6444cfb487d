//! Tag keys and the value a connection's end has for each.
//!
//! Built-in keys come from the connection itself (`ip`, `ip/NN`, `port`,
//! `proto`, `iface`); every other key is looked up in the end's tags
//! (`Connection::src_tags` / `dst_tags`, filled by process attribution). A
//! key an end lacks has no value (`None`): it groups as one "unknown" value
//! and compares as the empty string in filters.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::conn::Connection;

/// Which end of a connection: the initiator (`src`) or the responder (`dst`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    Src,
    Dst,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Src => "src",
            Side::Dst => "dst",
        }
    }
}

/// What an initiator's port groups as unless raw ports are asked for.
pub const EPHEMERAL: &str = "ephemeral";

/// Initiator ports from here up are picked by the client's OS per
/// connection, so they name no service; below, a client bound a
/// well-known port on purpose (DNS or NTP between servers: 53 → 53).
pub const EPHEMERAL_MIN: u16 = 1024;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TagKey {
    /// The address.
    Ip,
    /// The network of that many leading bits (capped at 32 for IPv4).
    IpPrefix(u8),
    Port,
    /// `tcp` or `udp`: the same at both ends.
    Proto,
    /// Where the connection was seen: the same at both ends.
    Iface,
    /// Any other tag, from the end's tag map.
    Custom(String),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    #[error("empty tag key")]
    Empty,
    #[error("tag key `{key}`: the prefix length must be 0 to 128 (as in ip/24)")]
    BadPrefix { key: String },
    #[error("tag key `{key}`: only letters, digits, `_`, `-`, `.` and `:` may form a key")]
    BadChar { key: String },
    #[error("tag key `{key}` is given twice")]
    Twice { key: String },
}

impl FromStr for TagKey {
    type Err = TagError;

    fn from_str(s: &str) -> Result<TagKey, TagError> {
        let bad_prefix = || TagError::BadPrefix { key: s.to_owned() };
        Ok(match s {
            "" => return Err(TagError::Empty),
            "ip" => TagKey::Ip,
            "port" => TagKey::Port,
            "proto" => TagKey::Proto,
            "iface" => TagKey::Iface,
            _ => {
                if let Some(n) = s.strip_prefix("ip/") {
                    let n: u8 = n.parse().map_err(|_| bad_prefix())?;
                    if n > 128 {
                        return Err(bad_prefix());
                    }
                    TagKey::IpPrefix(n)
                } else if s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
                {
                    TagKey::Custom(s.to_owned())
                } else {
                    return Err(TagError::BadChar { key: s.to_owned() });
                }
            }
        })
    }
}

impl fmt::Display for TagKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagKey::Ip => f.write_str("ip"),
            TagKey::IpPrefix(n) => write!(f, "ip/{n}"),
            TagKey::Port => f.write_str("port"),
            TagKey::Proto => f.write_str("proto"),
            TagKey::Iface => f.write_str("iface"),
            TagKey::Custom(k) => f.write_str(k),
        }
    }
}

/// Comma-separated tag keys (`ip/24,port`); the empty string is no key.
pub fn parse_keys(s: &str) -> Result<Vec<TagKey>, TagError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<TagKey> = s
        .split(',')
        .map(|k| k.trim().parse())
        .collect::<Result<_, _>>()?;
    // A row names its values by key, so each key may appear once.
    for (i, k) in keys.iter().enumerate() {
        if keys[..i].contains(k) {
            return Err(TagError::Twice { key: k.to_string() });
        }
    }
    Ok(keys)
}

/// An IPv4 or IPv6 network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub len: u8,
}

impl IpNet {
    /// The network of `addr`'s first `len` bits (capped to its family).
    pub fn of(addr: IpAddr, len: u8) -> IpNet {
        match addr {
            IpAddr::V4(a) => {
                let len = len.min(32);
                let mask = u32::MAX.checked_shl(32 - len as u32).unwrap_or(0);
                IpNet {
                    addr: IpAddr::from((u32::from(a) & mask).to_be_bytes()),
                    len,
                }
            }
            IpAddr::V6(a) => {
                let len = len.min(128);
                let mask = u128::MAX.checked_shl(128 - len as u32).unwrap_or(0);
                IpNet {
                    addr: IpAddr::from((u128::from(a) & mask).to_be_bytes()),
                    len,
                }
            }
        }
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        a.is_ipv4() == self.addr.is_ipv4() && IpNet::of(a, self.len) == *self
    }
}

impl FromStr for IpNet {
    type Err = ();

    /// `ADDR/LEN`; host bits must be zero, so a typo (`10.1.2.3/8`) is not
    /// silently read as another network.
    fn from_str(s: &str) -> Result<IpNet, ()> {
        let (a, n) = s.split_once('/').ok_or(())?;
        let addr: IpAddr = a.parse().map_err(|_| ())?;
        let len: u8 = n.parse().map_err(|_| ())?;
        if len > if addr.is_ipv4() { 32 } else { 128 } {
            return Err(());
        }
        let net = IpNet::of(addr, len);
        if net.addr != addr {
            return Err(());
        }
        Ok(net)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The value of `key` at `side` of `c`. With `collapse_ephemeral`, an
/// initiator's port of [`EPHEMERAL_MIN`] or more reads as [`EPHEMERAL`].
pub fn value(c: &Connection, side: Side, key: &TagKey, collapse_ephemeral: bool) -> Option<String> {
    let (ip, port, tags) = match side {
        Side::Src => (c.src, c.sport, &c.src_tags),
        Side::Dst => (c.dst, c.dport, &c.dst_tags),
    };
    Some(match key {
        TagKey::Ip => ip.to_string(),
        TagKey::IpPrefix(n) => IpNet::of(ip, *n).to_string(),
        TagKey::Port if collapse_ephemeral && side == Side::Src && port >= EPHEMERAL_MIN => {
            EPHEMERAL.to_owned()
        }
        TagKey::Port => port.to_string(),
        TagKey::Proto => c.proto.name().to_owned(),
        TagKey::Iface => c.iface.to_string(),
        TagKey::Custom(k) => return tags.value(k).map(std::borrow::Cow::into_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_print_back() {
        for k in [
            "ip", "ip/24", "ip/64", "port", "proto", "iface", "service", "k8s.pod",
        ] {
            assert_eq!(k.parse::<TagKey>().unwrap().to_string(), k);
        }
        assert_eq!(
            parse_keys(" ip/16 , port").unwrap(),
            vec![TagKey::IpPrefix(16), TagKey::Port]
        );
        assert_eq!(parse_keys("").unwrap(), vec![]);
        assert_eq!(
            "ip/129".parse::<TagKey>().unwrap_err().to_string(),
            "tag key `ip/129`: the prefix length must be 0 to 128 (as in ip/24)"
        );
        assert!(matches!(parse_keys("ip,,port"), Err(TagError::Empty)));
        assert_eq!(
            parse_keys("ip,port,ip").unwrap_err().to_string(),
            "tag key `ip` is given twice"
        );
        assert!(matches!(
            "a b".parse::<TagKey>(),
            Err(TagError::BadChar { .. })
        ));
    }

    #[test]
    fn networks() {
        let a: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(IpNet::of(a, 24).to_string(), "10.1.2.0/24");
        assert_eq!(IpNet::of(a, 0).to_string(), "0.0.0.0/0");
        assert_eq!(IpNet::of(a, 64).to_string(), "10.1.2.3/32");
        let b: IpAddr = "fd77:1:2:3::9".parse().unwrap();
        assert_eq!(IpNet::of(b, 48).to_string(), "fd77:1:2::/48");
        let net: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(net.contains(a));
        assert!(!net.contains(b));
        assert!(!net.contains("11.0.0.1".parse().unwrap()));
        assert!("10.1.2.3/8".parse::<IpNet>().is_err());
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("fd77::/16".parse::<IpNet>().unwrap().contains(b));
    }
}
