//! `/health`: the backend and how it fares, as one JSON object, from the
//! same snapshot as `/metrics` (for tools that read JSON, not Prometheus).

use serde::Serialize;

use super::Snapshot;
use crate::export::jsonl::ExportStatus;
use crate::sources::Health;

#[derive(Serialize)]
struct Json<'a> {
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
    /// `--export-jsonl`: intervals that could not be written.
    #[serde(skip_serializing_if = "Option::is_none")]
    export: Option<&'a ExportStatus>,
    /// `--fleet`: what was published, what waits, what was dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<&'a crate::export::fleet::FleetStatus>,
    /// What undoing NAT did.
    #[serde(skip_serializing_if = "Option::is_none")]
    nat: Option<&'a flowtable::nat::NatStats>,
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
    /// Copies of packets already counted at another interface.
    duplicate: u64,
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
    let ebpf = match &s.health {
        Some(Health::Ebpf(h)) => Some(h),
        _ => None,
    };
    let h = Json {
        backend: s.health.as_ref().map_or("", Health::backend),
        connections: s.conns.len(),
        interfaces: ebpf
            .map(|h| {
                h.attached
                    .iter()
                    .map(|(iface, mode)| Interface {
                        iface,
                        mode: mode.name(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        map: ebpf.map(|h| Map {
            entries: h.table.entries,
            capacity: h.table.capacity,
            full: h.table.full,
            insert_failed: h.table.insert_failed,
            contended: h.table.contended,
        }),
        packets: ebpf.map(|h| Packets {
            tracked: h.stats.tracked,
            duplicate: h.stats.duplicate,
            skipped: h
                .stats
                .skipped_by_reason()
                .map(|(r, n)| (r.name(), n))
                .collect(),
        }),
        rings: match &s.health {
            Some(Health::Afpacket(a)) => Some(Rings {
                packets: a.kernel.packets,
                drops: a.kernel.drops,
                freezes: a.kernel.freeze_q,
            }),
            _ => None,
        },
        export: s.export.as_ref(),
        fleet: s.fleet.as_ref(),
        nat: s.nat.as_ref(),
    };
    let mut text = serde_json::to_string(&h).expect("plain data serialises");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use flowtable::FrameStats;

    use super::*;
    use crate::sources::afpacket::KernelStats;
    use crate::sources::{AfpacketHealth, AttachMode, EbpfHealth, Hook, TableHealth};

    #[test]
    fn tc_and_afpacket_and_the_export_say_what_they_have() {
        let tc = Snapshot {
            health: Some(Health::Ebpf(EbpfHealth {
                hook: Hook::Xdp,
                attached: vec![
                    ("g0".to_owned(), AttachMode::XdpNative),
                    ("lo".to_owned(), AttachMode::XdpGeneric),
                ],
                xdp_modes: Vec::new(),
                stats: FrameStats::default(),
                table: TableHealth {
                    entries: 3,
                    capacity: 64,
                    full: 2,
                    ..TableHealth::default()
                },
                owners: None,
            })),
            ..Default::default()
        };
        assert_eq!(
            encode(&tc),
            "{\"backend\":\"xdp\",\"connections\":0,\"interfaces\":[{\"iface\":\"g0\",\"mode\":\"native\"},\
             {\"iface\":\"lo\",\"mode\":\"generic\"}],\"map\":{\"entries\":3,\"capacity\":64,\"full\":2,\
             \"insert_failed\":0,\"contended\":0},\"packets\":{\"tracked\":0,\"duplicate\":0,\"skipped\":{}}}\n"
        );
        let af = Snapshot {
            export: Some(ExportStatus {
                failed_writes: 3,
                behind: true,
                last_error: Some("No space left on device (os error 28)".to_owned()),
                ..Default::default()
            }),
            health: Some(Health::Afpacket(AfpacketHealth {
                kernel: KernelStats {
                    packets: 100,
                    drops: 2,
                    freeze_q: 1,
                },
                ..AfpacketHealth::default()
            })),
            ..Default::default()
        };
        assert_eq!(
            encode(&af),
            "{\"backend\":\"afpacket\",\"connections\":0,\"rings\":{\"packets\":100,\"drops\":2,\"freezes\":1},\
             \"export\":{\"failed_writes\":3,\"behind\":true,\"last_error\":\"No space left on device (os error 28)\",\"tracked\":0,\"pending\":0,\"dropped\":0}}\n"
        );
    }
}
