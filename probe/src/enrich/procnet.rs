//! The fallback when sock_diag is not there (a kernel without `inet_diag`):
//! `/proc/<pid>/net/{tcp,tcp6,udp,udp6}`, which show the sockets of that
//! process's network namespace. No cookie in this format.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flowtable::attrib::{Proto, SocketEntry, SocketState, Tuple};

use super::procfs::gone_is_not_found;

pub fn sockets(pid: u32) -> io::Result<Vec<SocketEntry>> {
    let mut out = Vec::new();
    for (file, proto) in [
        ("tcp", Proto::Tcp),
        ("tcp6", Proto::Tcp),
        ("udp", Proto::Udp),
        ("udp6", Proto::Udp),
    ] {
        let text = match std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            Ok(t) => t,
            // A kernel without IPv6 has no tcp6.
            Err(e) if e.kind() == io::ErrorKind::NotFound && file.ends_with('6') => continue,
            Err(e) => return Err(gone_is_not_found(e)),
        };
        out.extend(text.lines().skip(1).filter_map(|l| parse_line(l, proto)));
    }
    Ok(out)
}

/// `sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode …`
fn parse_line(line: &str, proto: Proto) -> Option<SocketEntry> {
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 10 {
        return None;
    }
    let local = endpoint(f[1])?;
    let remote = endpoint(f[2])?;
    let state = u8::from_str_radix(f[3], 16).ok()?;
    Some(SocketEntry {
        tuple: Tuple::new(proto, local, remote),
        inode: f[9].parse().ok()?,
        uid: f[7].parse().ok()?,
        cookie: 0,
        state: if proto == Proto::Tcp && state == 0x0A {
            SocketState::Listen
        } else {
            SocketState::Other
        },
    })
}

/// `0100007F:1F90`: the address as the kernel's 32-bit words printed in
/// host byte order, then the port.
fn endpoint(s: &str) -> Option<SocketAddr> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        Some(
            u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16)
                .ok()?
                .to_ne_bytes(),
        )
    };
    let ip = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_kernel_lines() {
        let v4 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41234 1 0000000000000000 100 0 0 10 0";
        let s = parse_line(v4, Proto::Tcp).unwrap();
        assert_eq!(s.tuple.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.tuple.remote, "0.0.0.0:0".parse().unwrap());
        assert_eq!(s.state, SocketState::Listen);
        assert_eq!(s.inode, 41234);
        let v6 = "   1: 000000FD000000000000000001000000:0035 00000000000000000000000001000000:C350 01 00000000:00000000 00:00000000 00000000  1000        0 777 2 0000000000000000 20 4 30 10 -1";
        let s = parse_line(v6, Proto::Udp).unwrap();
        assert_eq!(s.tuple.local, "[fd00::1]:53".parse().unwrap());
        assert_eq!(s.tuple.remote, "[::1]:50000".parse().unwrap());
        assert_eq!(s.uid, 1000);
        assert_eq!(s.inode, 777);
    }

    #[test]
    fn reads_our_own_namespace() {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let all = sockets(std::process::id()).unwrap();
        let want = Tuple::new(
            Proto::Udp,
            u.local_addr().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
        );
        assert!(all.iter().any(|s| s.tuple == want));
    }
}
