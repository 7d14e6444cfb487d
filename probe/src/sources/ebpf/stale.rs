//! What a killed run left behind, and how the next run recognises it.
//!
//! Our filters are the tc bpf filters named after the program
//! (`flowprobe_tc`, the name aya gives the filter). A run holds an exclusive
//! `flock` on `/run/flowprobe/netns-<inode>.lock`, one per network namespace
//! (the inode of `/proc/self/ns/net`), for as long as it runs; the kernel
//! drops the lock when the process dies, however it dies. So a run that
//! gets the lock knows that every `flowprobe_tc` filter in its namespace
//! was left by a run that is gone, and removes it. A run that does not get
//! the lock (another one is running in the namespace) leaves every filter
//! alone. Next to the lock, `netns-<inode>.clsact` lists the interfaces
//! where the running run added the clsact qdisc; the next run removes
//! such a qdisc after the stale filters, if no filter is left in it.
//!
//! Filters whose program uses a table kept for a state directory
//! (`run --state-dir`, [`super::pins`]) are not stale: they belong to a
//! daemon that will adopt them when it starts again, and stay. Such a run
//! names its table's map id in `netns-<inode>.kept-<state id>` beside the
//! lock (a run that cannot see bpffs, as under `ip netns exec`, still
//! finds it there), and every table pinned under bpffs counts too.

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use aya::programs::links::Link as _;
use aya::programs::tc::{SchedClassifierLink, TcHandle};
use aya::programs::TcAttachType;

use crate::os::clsact;
use crate::os::links::Link;

const DIR: &str = "/run/flowprobe";

/// The namespace's lock, held while it lives, and the clsact record.
pub struct NetnsLock {
    _file: fs::File,
    clsact_path: PathBuf,
}

/// The map ids of the tables kept for state directories in this
/// namespace: recorded beside the lock, and pinned under bpffs.
pub fn protected_maps() -> Vec<u32> {
    let mut ids = super::pins::protected_maps();
    let prefix = netns_inode().map(|ino| format!("netns-{ino}.kept-"));
    if let (Ok(prefix), Ok(dir)) = (prefix, fs::read_dir(DIR)) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let text = fs::read_to_string(e.path()).unwrap_or_default();
                ids.extend(
                    text.split_whitespace()
                        .filter_map(|w| w.parse::<u32>().ok()),
                );
            }
        }
    }
    ids
}

/// Records `conns`, the map id of the table kept for state directory
/// `state_id`, beside the lock; `None` forgets it (a clean stop).
pub fn keep(state_id: &str, conns: Option<u32>) -> Result<()> {
    let path = PathBuf::from(format!("{DIR}/netns-{}.kept-{state_id}", netns_inode()?));
    match conns {
        Some(id) => {
            fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
            fs::write(&path, format!("{id}\n"))
                .with_context(|| format!("writing {}", path.display()))
        }
        None => {
            let _ = fs::remove_file(path);
            Ok(())
        }
    }
}

/// This network namespace's inode.
pub fn netns_inode() -> Result<u64> {
    Ok(fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino())
}

/// `Some` with the lock, `None` when another run holds it.
pub fn lock() -> Result<Option<NetnsLock>> {
    let ino = netns_inode()?;
    fs::create_dir_all(DIR).with_context(|| format!("creating {DIR}"))?;
    let path = PathBuf::from(format!("{DIR}/netns-{ino}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: a valid fd.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Ok(None);
    }
    Ok(Some(NetnsLock {
        _file: file,
        clsact_path: PathBuf::from(format!("{DIR}/netns-{ino}.clsact")),
    }))
}

impl NetnsLock {
    /// Removes every filter of ours on `links` (all left by dead runs,
    /// since we hold the lock), then the clsact qdiscs a dead run recorded
    /// as its own if they are empty now. Returns one line for stderr when
    /// it removed anything.
    pub fn clean(&self, links: &[Link], program: &str, protected: &[u32]) -> Option<String> {
        let mut cleaned = Vec::new();
        let maps = super::pins::program_maps();
        let kept = |id: Option<u32>| {
            id.and_then(|id| maps.get(&id))
                .is_some_and(|m| m.iter().any(|m| protected.contains(m)))
        };
        for l in links {
            let mut hooks = Vec::new();
            for (hook, name) in [
                (TcAttachType::Ingress, "ingress"),
                (TcAttachType::Egress, "egress"),
            ] {
                let mut removed = false;
                for f in filters(l, hook, program) {
                    if !kept(f.bpf_id) && remove_filter(l, hook, &f) {
                        removed = true;
                    }
                }
                if removed {
                    hooks.push(name);
                }
            }
            if !hooks.is_empty() {
                cleaned.push(format!("{} {}", l.name, hooks.join("+")));
            }
        }
        let recorded = fs::read_to_string(&self.clsact_path).unwrap_or_default();
        let mut qdiscs = Vec::new();
        for name in recorded.lines() {
            let Some(l) = links.iter().find(|l| l.name == name) else {
                continue;
            };
            // Someone else may have put filters in it since; a failed dump
            // counts as not empty.
            let empty = clsact::clsact_is_empty(l.index).unwrap_or(false);
            if empty && clsact::clsact_del(l.index).is_ok() {
                qdiscs.push(name.to_owned());
            }
        }
        let _ = fs::remove_file(&self.clsact_path);
        if cleaned.is_empty() && qdiscs.is_empty() {
            return None;
        }
        let mut line = String::from("removed what a killed flowprobe run left:");
        if !cleaned.is_empty() {
            line += &format!(" {program} filters on {}", cleaned.join(", "));
        }
        if !qdiscs.is_empty() {
            if !cleaned.is_empty() {
                line += ";";
            }
            line += &format!(" the clsact qdisc it added on {}", qdiscs.join(", "));
        }
        Some(line)
    }

    /// Where this run records the interfaces where it added the clsact
    /// qdisc (a run with a state directory records them there instead).
    pub fn clsact_path(&self) -> &Path {
        &self.clsact_path
    }
}

/// Records the interfaces where this run added the clsact qdisc in `path`.
pub fn record_clsact(path: &Path, ifaces: &[String]) {
    let write = || -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        for i in ifaces {
            writeln!(f, "{i}")?;
        }
        fs::rename(tmp, path)
    };
    if let Err(e) = write() {
        eprintln!(
            "flowprobe: recording our clsact qdiscs in {}: {e}",
            path.display()
        );
    }
}

fn clsact_hook(hook: TcAttachType) -> clsact::Hook {
    match hook {
        TcAttachType::Egress => clsact::Hook::Egress,
        _ => clsact::Hook::Ingress,
    }
}

/// The `program` filters on one hook of `l` (a failed dump: none).
pub fn filters(l: &Link, hook: TcAttachType, program: &str) -> Vec<clsact::Filter> {
    clsact::filters_on(l.index, clsact_hook(hook))
        .unwrap_or_default()
        .into_iter()
        .filter(|f| f.handle != 0 && f.bpf_name.as_deref() == Some(program))
        .collect()
}

/// Removes one filter; whether it went.
pub fn remove_filter(l: &Link, hook: TcAttachType, f: &clsact::Filter) -> bool {
    SchedClassifierLink::attached(&l.name, hook, f.priority, TcHandle::from(f.handle), None)
        .is_ok_and(|link| link.detach().is_ok())
}

impl Drop for NetnsLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.clsact_path);
    }
}
