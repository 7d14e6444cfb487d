//! The kernel state a `run --state-dir` keeps across a restart
//! (docs/restart.md): the maps whose contents matter pinned under bpffs,
//! in `flowprobe/<state dir id>-<netns inode>/`, and beside them, in the
//! state directory, `kernel.json`: the settings fingerprint they were made
//! with and what a later load must repeat (the table's hash seed, the
//! clock offset its times were read with).
//!
//! A start with the state directory reuses the pins when the fingerprint
//! matches (aya's `map_pin_path`: a pinned map is opened, not created),
//! else says so in one line and starts afresh. The filters of the run that
//! is gone are recognised by their program's maps (it uses the pinned
//! `CONNS`), also by runs without a state directory, which leave them
//! alone ([`protected_maps`]).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::maps::MapInfo;
use probe_common::contract;
use serde::{Deserialize, Serialize};

use crate::os::statedir::StateDir;

/// The maps kept: the table, its bitmap and the program's counters. The
/// owners' ring (socket owners recorded at connect, not yet read) and the
/// per-CPU scratch are not: attribution falls back to sock_diag for the
/// sockets whose owner record is lost.
pub const PINNED: [&str; 4] = [
    contract::CONNS,
    contract::OCCUPIED,
    contract::PARSE_STATS,
    contract::CONN_STATS,
];

const KERNEL: &str = "kernel.json";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a later load must repeat, with the settings it belongs to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Saved {
    pub fingerprint: String,
    pub seed: u64,
    pub clock_offset_ns: u64,
    pub pins: PathBuf,
}

/// How this start goes.
pub struct Plan {
    /// Where the maps are pinned.
    pub pins: PathBuf,
    /// `Some`: adopt (the saved values); `None`: start afresh.
    pub adopt: Option<Saved>,
    /// The `CONNS` id of pins dropped for a mismatch: their filters are
    /// removed at start.
    pub dropped_conns: Option<u32>,
}

/// The bpffs to pin in: `/sys/fs/bpf`, or PID 1's when ours is not one
/// (`ip netns exec` mounts a fresh sysfs over /sys).
pub fn bpffs() -> Result<PathBuf> {
    for p in ["/sys/fs/bpf", "/proc/1/root/sys/fs/bpf"] {
        if is_bpffs(Path::new(p)) {
            return Ok(PathBuf::from(p));
        }
    }
    anyhow::bail!("no bpffs mounted at /sys/fs/bpf (mount -t bpf bpf /sys/fs/bpf)")
}

fn is_bpffs(p: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid path and out pointer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0) && st.f_type as i64 == BPF_FS_MAGIC
}

/// Where flowprobe's pins live.
pub fn root() -> Option<PathBuf> {
    bpffs().ok().map(|b| b.join("flowprobe"))
}

/// Decides adoption: the saved fingerprint is `fingerprint` and the pins
/// are there. A mismatch or a half-made state is said in one line and
/// removed.
pub fn plan(state: &StateDir, netns: u64, fingerprint: &str) -> Result<Plan> {
    let root = root().context("--state-dir keeps the kernel table pinned in bpffs")?;
    let pins = root.join(format!("{}-{netns}", state.id()));
    let saved: Option<Saved> = state
        .read(KERNEL)?
        .and_then(|b| serde_json::from_slice(&b).ok());
    let have_pins = pins.join(contract::CONNS).exists();
    let adopt = match saved {
        Some(s) if s.fingerprint == fingerprint && s.pins == pins && have_pins => Some(s),
        Some(s) => {
            eprintln!(
                "flowprobe: --state-dir {}: {}; starting afresh",
                state.dir().display(),
                if s.pins != pins {
                    "the state left there is of another network namespace".to_owned()
                } else if !have_pins {
                    "its pinned kernel table is gone (a reboot?)".to_owned()
                } else {
                    format!(
                        "the kernel table left there was made with other settings ({} now, {} then)",
                        fingerprint, s.fingerprint
                    )
                }
            );
            None
        }
        None => None,
    };
    let mut dropped_conns = None;
    if adopt.is_none() {
        state.remove(KERNEL);
        dropped_conns = MapInfo::from_pin(pins.join(contract::CONNS))
            .ok()
            .map(|i| i.id());
        remove(&pins);
    }
    fs::create_dir_all(&pins).with_context(|| format!("creating {}", pins.display()))?;
    Ok(Plan {
        pins,
        adopt,
        dropped_conns,
    })
}

pub fn save(state: &StateDir, saved: &Saved) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(saved)?;
    state
        .write(KERNEL, &bytes)
        .with_context(|| format!("writing {}", state.path(KERNEL).display()))
}

/// A clean stop: the pins and `kernel.json` go.
pub fn forget(state: &StateDir, pins: &Path) {
    remove(pins);
    state.remove(KERNEL);
}

pub fn remove(pins: &Path) {
    if let Ok(dir) = fs::read_dir(pins) {
        for e in dir.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
    let _ = fs::remove_dir(pins);
}

/// The ids of every pinned `CONNS` under bpffs `flowprobe/`: a filter whose
/// program uses one belongs to a state directory's run, dead or alive.
pub fn protected_maps() -> Vec<u32> {
    let Some(root) = root() else {
        return Vec::new();
    };
    let Ok(dir) = fs::read_dir(root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| MapInfo::from_pin(e.path().join(contract::CONNS)).ok())
        .map(|i| i.id())
        .collect()
}

/// The maps each loaded program uses, by program id.
pub fn program_maps() -> HashMap<u32, Vec<u32>> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| Some((p.id(), p.map_ids().ok().flatten()?)))
        .collect()
}
