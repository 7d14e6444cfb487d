//! `/health`: the backend and how it fares, as one JSON object, from the
//! same snapshot as `/metrics` (for tools that read JSON, not Prometheus).

use serde::Serialize;

use super::Snapshot;

#[derive(Serialize)]
struct Health<'a> {
    backend: &'a str,
    connections: usize,
    /// tc and xdp: where the program is attached and how.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    interfaces: Vec<Interface<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    map: Option<Map>,
    #[serde(skip_serializing_if = "Option::is_none")]
    packets: Option<Packets>,
    /// afpacket: the kernel's ring counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    rings: Option<Rings>,
}

#[derive(Serialize)]
struct Interface<'a> {
    iface: &'a str,
    /// `clsact` (tc), `native` or `generic` (xdp).
    mode: &'a str,
}

#[derive(Serialize)]
struct Map {
    entries: usize,
    capacity: u32,
    full: u64,
    insert_failed: u64,
    contended: u64,
}

#[derive(Serialize)]
struct Packets {
    tracked: u64,
    skipped: std::collections::BTreeMap<&'static str, u64>,
}

#[derive(Serialize)]
struct Rings {
    packets: u64,
    drops: u64,
    freezes: u64,
}

/// The JSON text of `s`'s health.
pub fn encode(s: &Snapshot) -> String {
    let ebpf = s.ebpf();
    let h = Health {
        backend: s.backend,
        connections: s.conns.len(),
        interfaces: s
            .attached
            .iter()
            .map(|i| Interface {
                iface: i,
                mode: s
                    .xdp_modes
                    .iter()
                    .find(|(x, _)| x == i)
                    .map_or("clsact", |(_, m)| m),
            })
            .collect(),
        map: ebpf.then_some(Map {
            entries: s.in_map,
            capacity: s.capacity,
            full: s.map_full,
            insert_failed: s.insert_failed,
            contended: s.contended,
        }),
        packets: ebpf.then(|| Packets {
            tracked: s.stats.tracked,
            skipped: s
                .stats
                .skipped_by_reason()
                .map(|(r, n)| (r.name(), n))
                .collect(),
        }),
        rings: s.rings.map(|[packets, drops, freezes]| Rings {
            packets,
            drops,
            freezes,
        }),
    };
    let mut text = serde_json::to_string(&h).expect("plain data serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tc_and_afpacket_say_what_they_have() {
        let tc = Snapshot {
            backend: "xdp",
            attached: vec!["g0".to_owned(), "lo".to_owned()],
            xdp_modes: vec![("g0".to_owned(), "native"), ("lo".to_owned(), "generic")],
            in_map: 3,
            capacity: 64,
            map_full: 2,
            ..Snapshot::default()
        };
        assert_eq!(
            encode(&tc),
            "{\"backend\":\"xdp\",\"connections\":0,\"interfaces\":[{\"iface\":\"g0\",\"mode\":\"native\"},\
             {\"iface\":\"lo\",\"mode\":\"generic\"}],\"map\":{\"entries\":3,\"capacity\":64,\"full\":2,\
             \"insert_failed\":0,\"contended\":0},\"packets\":{\"tracked\":0,\"skipped\":{}}}\n"
        );
        let af = Snapshot {
            backend: "afpacket",
            rings: Some([100, 2, 1]),
            ..Snapshot::default()
        };
        assert_eq!(
            encode(&af),
            "{\"backend\":\"afpacket\",\"connections\":0,\"rings\":{\"packets\":100,\"drops\":2,\"freezes\":1}}\n"
        );
    }
}
