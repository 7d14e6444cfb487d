//! The program's own counters (`PARSE_STATS`, `CONN_STATS`: per-CPU
//! arrays), summed over CPUs.

use anyhow::{Context, Result};
use aya::maps::{MapData, PerCpuArray};
use aya::Ebpf;
use flowtable::FrameStats;
use probe_common::contract::{self, ConnStat};
use probe_common::ParseError;

use crate::sources::{OwnerHealth, TableHealth};

fn per_cpu_sum(ebpf: &Ebpf, map: &str, idx: u32) -> Result<u64> {
    let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(
        ebpf.map(map)
            .with_context(|| format!("the eBPF object has no map {map}"))?,
    )?;
    Ok(m.get(&idx, 0)?.iter().sum())
}

/// `PARSE_STATS`: tracked, and skipped by reason.
pub fn frames(ebpf: &Ebpf) -> Result<FrameStats> {
    let mut s = FrameStats {
        tracked: per_cpu_sum(ebpf, contract::PARSE_STATS, contract::PARSE_TRACKED)?,
        ..FrameStats::default()
    };
    for e in ParseError::ALL {
        s.skipped[e as usize] =
            per_cpu_sum(ebpf, contract::PARSE_STATS, contract::parse_skipped(e))?;
    }
    s.frames = s.tracked + s.skipped.iter().sum::<u64>();
    s.duplicate = conn_stat(ebpf, ConnStat::Duplicate)?;
    Ok(s)
}

fn conn_stat(ebpf: &Ebpf, s: ConnStat) -> Result<u64> {
    per_cpu_sum(ebpf, contract::CONN_STATS, s.index())
}

/// `CONN_STATS` and the table's fill.
pub fn table(ebpf: &Ebpf, entries: usize, capacity: u32) -> Result<TableHealth> {
    Ok(TableHealth {
        entries,
        capacity,
        full: conn_stat(ebpf, ConnStat::Full)?,
        insert_failed: conn_stat(ebpf, ConnStat::InsertFailed)?,
        contended: conn_stat(ebpf, ConnStat::Contended)?,
    })
}

/// `OWNER_STATS`: the socket-owner programs' records.
pub fn owners(ebpf: &Ebpf) -> Result<OwnerHealth> {
    use probe_common::owner::{OWNER_STAT_DROPPED, OWNER_STAT_RECORDED};
    Ok(OwnerHealth {
        recorded: per_cpu_sum(ebpf, contract::OWNER_STATS, OWNER_STAT_RECORDED)?,
        dropped: per_cpu_sum(ebpf, contract::OWNER_STATS, OWNER_STAT_DROPPED)?,
    })
}
