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

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::programs::{tc, TcAttachType};

use crate::os::clsact;
use crate::os::links::Link;

const DIR: &str = "/run/flowprobe";

/// The namespace's lock, held while it lives, and the clsact record.
pub struct NetnsLock {
    _file: fs::File,
    clsact_path: PathBuf,
}

/// `Some` with the lock, `None` when another run holds it.
pub fn lock() -> Result<Option<NetnsLock>> {
    let ino = fs::metadata("/proc/self/ns/net")
        .context("reading /proc/self/ns/net")?
        .ino();
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
    pub fn clean(&self, links: &[Link], program: &str) -> Option<String> {
        let mut cleaned = Vec::new();
        for l in links {
            let mut hooks = Vec::new();
            for (hook, name) in [
                (TcAttachType::Ingress, "ingress"),
                (TcAttachType::Egress, "egress"),
            ] {
                if tc::qdisc_detach_program(&l.name, hook, program).is_ok() {
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

    /// Records the interfaces where this run added the clsact qdisc.
    pub fn record_clsact(&self, ifaces: &[String]) {
        let write = || -> std::io::Result<()> {
            let tmp = self.clsact_path.with_extension("tmp");
            let mut f = fs::File::create(&tmp)?;
            for i in ifaces {
                writeln!(f, "{i}")?;
            }
            fs::rename(tmp, &self.clsact_path)
        };
        if let Err(e) = write() {
            eprintln!(
                "flowprobe: recording our clsact qdiscs in {}: {e}",
                self.clsact_path.display()
            );
        }
    }
}

impl Drop for NetnsLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.clsact_path);
    }
}
