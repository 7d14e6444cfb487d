//! Which interfaces the program is attached to, and undoing it.
//!
//! Without `--iface`, every interface of the namespace that is up, lo
//! included (on a loopback interface ingress only, which sees every packet
//! once), and every interface that comes up later; with `--iface`, the named
//! ones (also when they are re-created). An interface that goes down stays
//! attached; one that is deleted or leaves the namespace is forgotten (its
//! filters and qdisc went with it). Only what this run added is removed.

use anyhow::{bail, Context, Result};
use aya::programs::tc::{NlOptions, TcAttachOptions};
use aya::programs::{tc, SchedClassifier, TcAttachType};
use aya::Ebpf;

use super::{stale, xdp, PROGRAM};
use crate::os::clsact;
use crate::os::links::Link;
use crate::sources::{AttachMode, Hook};

/// One interface we attached to, and what to undo there.
struct Attached {
    index: u32,
    iface: String,
    created_clsact: bool,
    links: Vec<aya::programs::tc::SchedClassifierLinkId>,
    xdp: Option<(aya::programs::xdp::XdpLinkId, AttachMode)>,
}

/// The interfaces we are attached to, and which ones we want.
pub struct Attachments {
    hook: Hook,
    /// Named with --iface; empty: all that are up.
    only: Vec<String>,
    list: Vec<Attached>,
    lock: Option<stale::NetnsLock>,
    /// XDP: every attachment made, for the final summary.
    pub xdp_modes: Vec<(String, AttachMode)>,
}

impl Attachments {
    pub fn new(hook: Hook, only: Vec<String>) -> Attachments {
        Attachments {
            hook,
            only,
            list: Vec::new(),
            lock: None,
            xdp_modes: Vec::new(),
        }
    }

    /// Takes the namespace's lock and removes what a killed run left.
    pub fn clean_stale(&mut self, links: &[Link]) -> Result<()> {
        self.lock = stale::lock()?;
        if let Some(lock) = &self.lock {
            if let Some(line) = lock.clean(links, PROGRAM) {
                eprintln!("flowprobe: {line}");
            }
        }
        Ok(())
    }

    pub fn wanted(&self, l: &Link) -> bool {
        if self.only.is_empty() {
            l.up
        } else {
            self.only.contains(&l.name)
        }
    }

    /// Interfaces attached now, with their mode.
    pub fn current(&self) -> Vec<(String, AttachMode)> {
        self.list
            .iter()
            .map(|a| {
                let mode = a.xdp.as_ref().map_or(AttachMode::Clsact, |(_, m)| *m);
                (a.iface.clone(), mode)
            })
            .collect()
    }

    /// Attaches to every wanted link of a fresh dump. An interface the user
    /// did not name that fails is said and skipped; a named one fails the
    /// run.
    pub fn attach_all(&mut self, ebpf: &mut Ebpf, links: &[Link]) -> Result<()> {
        for l in links {
            if !self.wanted(l) {
                continue;
            }
            if let Err(e) = self.attach(ebpf, l) {
                if !self.only.is_empty() {
                    return Err(e);
                }
                eprintln!("flowprobe: {e:#}");
            }
        }
        Ok(())
    }

    /// A link appeared or changed: attach if wanted (it may be gone again
    /// already; that is said, not fatal).
    pub fn on_new(&mut self, ebpf: &mut Ebpf, l: &Link) {
        if self.wanted(l) {
            if let Err(e) = self.attach(ebpf, l) {
                eprintln!("flowprobe: {e:#}");
            }
        }
    }

    /// After lost events: forget what is gone, attach what is wanted.
    pub fn resync(&mut self, ebpf: &mut Ebpf, now: &[Link]) {
        let gone: Vec<u32> = self
            .list
            .iter()
            .filter(|a| !now.iter().any(|l| l.index == a.index))
            .map(|a| a.index)
            .collect();
        for index in gone {
            self.forget(ebpf, index);
        }
        for l in now {
            self.on_new(ebpf, l);
        }
    }

    fn record_clsact(&self) {
        if let Some(lock) = &self.lock {
            let names: Vec<String> = self
                .list
                .iter()
                .filter(|a| a.created_clsact)
                .map(|a| a.iface.clone())
                .collect();
            lock.record_clsact(&names);
        }
    }

    /// Attaches to `l` unless already attached there.
    fn attach(&mut self, ebpf: &mut Ebpf, l: &Link) -> Result<()> {
        if self.list.iter().any(|a| a.index == l.index) {
            return Ok(());
        }
        let r = match self.hook {
            Hook::Tc => attach_tc(ebpf, l, &mut self.list),
            Hook::Xdp => xdp::attach(ebpf, &l.name).map(|(id, mode)| {
                self.xdp_modes.push((l.name.clone(), mode));
                self.list.push(Attached {
                    index: l.index,
                    iface: l.name.clone(),
                    created_clsact: false,
                    links: Vec::new(),
                    xdp: Some((id, mode)),
                })
            }),
        };
        self.record_clsact();
        r
    }

    /// `index` is gone: its filters and qdisc went with it; forget them.
    pub fn forget(&mut self, ebpf: &mut Ebpf, index: u32) {
        let Some(pos) = self.list.iter().position(|a| a.index == index) else {
            return;
        };
        let a = self.list.remove(pos);
        if let Some((id, _)) = a.xdp {
            xdp::forget(ebpf, id);
        }
        if let Some(prog) = ebpf
            .program_mut(PROGRAM)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        {
            for id in a.links {
                // Dropping the link tries a detach; the device is gone, so
                // that fails, and the failure is ignored.
                drop(prog.take_link(id));
            }
        }
        self.record_clsact();
    }

    /// Detaches everywhere and removes the clsact qdiscs we added.
    pub fn detach_all(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let list = std::mem::take(&mut self.list);
        let r = detach_all(ebpf, list);
        self.lock = None;
        r
    }
}

fn attach_tc(ebpf: &mut Ebpf, l: &Link, attached: &mut Vec<Attached>) -> Result<()> {
    let iface = &l.name;
    let created_clsact = match tc::qdisc_add_clsact(iface) {
        Ok(()) => true,
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(tc::TcError::AlreadyAttached) => false,
        Err(e) => return Err(e).with_context(|| format!("adding the clsact qdisc to {iface}")),
    };
    let mut a = Attached {
        index: l.index,
        iface: iface.clone(),
        created_clsact,
        links: Vec::new(),
        xdp: None,
    };
    let prog: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .context("program vanished")?
        .try_into()?;
    // On a loopback interface every packet leaves through egress and comes
    // back through ingress of the same interface: one hook sees each once
    // (both would count it twice, the second time as a retransmission).
    let hooks: &[TcAttachType] = if l.loopback {
        &[TcAttachType::Ingress]
    } else {
        &[TcAttachType::Ingress, TcAttachType::Egress]
    };
    for &hook in hooks {
        match prog.attach_with_options(iface, hook, TcAttachOptions::Netlink(NlOptions::default()))
        {
            Ok(id) => a.links.push(id),
            Err(e) => {
                attached.push(a);
                return Err(e).with_context(|| format!("attaching to {iface} {hook:?}"));
            }
        }
    }
    attached.push(a);
    Ok(())
}

/// Whether `index` is still an interface of this namespace.
fn exists(index: u32) -> bool {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes.
    !unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) }.is_null()
}

fn detach_all(ebpf: &mut Ebpf, attached: Vec<Attached>) -> Result<()> {
    let mut first_err: Option<anyhow::Error> = None;
    let mut attached = attached;
    for a in attached.iter_mut() {
        if let Some((id, _)) = a.xdp.take() {
            if let Err(e) = xdp::detach(ebpf, id) {
                if exists(a.index) {
                    eprintln!("flowprobe: detaching XDP from {}: {e:#}", a.iface);
                    first_err.get_or_insert(e);
                }
            }
        }
    }
    if attached
        .iter()
        .all(|a| a.links.is_empty() && !a.created_clsact)
    {
        return match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        };
    }
    let prog: Option<&mut SchedClassifier> =
        ebpf.program_mut(PROGRAM).and_then(|p| p.try_into().ok());
    let Some(prog) = prog else {
        bail!("program {PROGRAM} vanished before detaching");
    };
    for a in attached {
        for id in a.links {
            if let Err(e) = prog.detach(id) {
                if !exists(a.index) {
                    // Went away just now, and its filters with it.
                    continue;
                }
                eprintln!("flowprobe: detaching from {}: {e}", a.iface);
                first_err.get_or_insert_with(|| anyhow::anyhow!("detaching from {}: {e}", a.iface));
            }
        }
        if a.created_clsact && exists(a.index) {
            // Unknown (netlink failed) counts as not empty: never remove a
            // qdisc that may hold someone else's filters.
            if !clsact::clsact_is_empty(a.index).unwrap_or(false) {
                eprintln!(
                    "flowprobe: left the clsact qdisc we added on {}: others added filters to it",
                    a.iface
                );
                continue;
            }
            if let Err(e) = clsact::clsact_del(a.index) {
                let msg = format!("removing the clsact qdisc we added to {}: {e}", a.iface);
                eprintln!("flowprobe: {msg}");
                first_err.get_or_insert_with(|| anyhow::anyhow!(msg));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
