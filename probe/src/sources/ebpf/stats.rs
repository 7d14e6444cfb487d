//! The program's own counters (`PARSE_STATS`, `CONN_STATS`: per-CPU
//! arrays), summed over CPUs.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use aya::Ebpf;
use flowtable::FrameStats;
use probe_common::ParseError;

use crate::sources::TableHealth;

fn per_cpu_sum(ebpf: &Ebpf, map: &str, idx: u32) -> Result<u64> {
    let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(map)
            .with_context(|| format!("the eBPF object has no map {map}"))?,
    )?;
    Ok(m.get(&idx, 0)?.iter().sum())
}

/// `PARSE_STATS`: index 0 tracked, `e as u32 + 1` skipped for `e`.
pub fn frames(ebpf: &Ebpf) -> Result<FrameStats> {
    let mut s = FrameStats {
        tracked: per_cpu_sum(ebpf, "PARSE_STATS", 0)?,
        ..FrameStats::default()
    };
    for e in ParseError::ALL {
        s.skipped[e as usize] = per_cpu_sum(ebpf, "PARSE_STATS", e as u32 + 1)?;
    }
    s.frames = s.tracked + s.skipped.iter().sum::<u64>();
    Ok(s)
}

/// `CONN_STATS` and the table's fill.
pub fn table(ebpf: &Ebpf, entries: usize, capacity: u32) -> Result<TableHealth> {
    Ok(TableHealth {
        entries,
        capacity,
        full: per_cpu_sum(ebpf, "CONN_STATS", 0)?,
        insert_failed: per_cpu_sum(ebpf, "CONN_STATS", 1)? + per_cpu_sum(ebpf, "CONN_STATS", 2)?,
        contended: per_cpu_sum(ebpf, "CONN_STATS", 3)?,
    })
}
