//! Which interfaces the program is attached to, and undoing it.
//!
//! Without `--iface`, every interface of the namespace that is up, lo
//! included (on a loopback interface ingress only, which sees every packet
//! once), and every interface that comes up later; with `--iface`, the named
//! ones (also when they are re-created). An interface that goes down stays
//! attached; one that is deleted or leaves the namespace is forgotten (its
//! filters and qdisc went with it). Only what this run added is removed.
//!
//! A run that adopts a state directory's table ([`super::pins`]) takes the
//! filters of the run that is gone over ([`Attachments::adopt`]): each is
//! replaced in place (same priority and handle, one netlink change) by this
//! run's program, which counts into the same maps, so no packet goes
//! uncounted; from then on they are this run's own.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
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
    /// Where the clsact qdiscs this run added are recorded: the state
    /// directory's file, else the namespace lock's.
    record: Option<PathBuf>,
    /// Interfaces where the run adopted from had added the clsact qdisc.
    inherited_clsact: Vec<String>,
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
            record: None,
            inherited_clsact: Vec::new(),
            xdp_modes: Vec::new(),
        }
    }

    /// Records the clsact qdiscs this run adds in `path` (a state
    /// directory's) rather than beside the namespace lock.
    pub fn record_in(&mut self, path: PathBuf) {
        self.record = Some(path);
    }

    /// Takes the namespace's lock and removes what a killed run left (not
    /// the filters of a state directory's run: see [`stale`]).
    pub fn clean_stale(&mut self, links: &[Link]) -> Result<()> {
        self.lock = stale::lock()?;
        if let Some(lock) = &self.lock {
            if self.record.is_none() {
                self.record = Some(lock.clsact_path().to_owned());
            }
            if let Some(line) = lock.clean(links, PROGRAM, &stale::protected_maps()) {
                eprintln!("flowprobe: {line}");
            }
        }
        Ok(())
    }

    /// Takes over the filters whose program uses the map `conns` (the
    /// adopted table): on a wanted interface the first on each hook is
    /// replaced in place by this run's program, any other removed;
    /// `ours_clsact` are the interfaces where the run that is gone had
    /// added the clsact qdisc. Returns the hooks taken over and the
    /// filters removed.
    pub fn adopt(
        &mut self,
        ebpf: &mut Ebpf,
        links: &[Link],
        conns: u32,
        ours_clsact: &[String],
        take: bool,
    ) -> Result<(usize, usize)> {
        self.inherited_clsact = ours_clsact.to_vec();
        let maps = super::pins::program_maps();
        let uses = |id: Option<u32>| {
            id.and_then(|id| maps.get(&id))
                .is_some_and(|m| m.contains(&conns))
        };
        let (mut taken, mut removed) = (0, 0);
        for l in links {
            let wanted = take && self.hook == Hook::Tc && self.wanted(l);
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let mut first = wanted && !(l.loopback && hook == TcAttachType::Egress);
                for f in stale::filters(l, hook, PROGRAM) {
                    if !uses(f.bpf_id) {
                        continue;
                    }
                    if !first {
                        removed += usize::from(stale::remove_filter(l, hook, &f));
                        continue;
                    }
                    first = false;
                    let prog: &mut SchedClassifier = ebpf
                        .program_mut(PROGRAM)
                        .context("program vanished")?
                        .try_into()?;
                    let link = SchedClassifierLink::attached(
                        &l.name,
                        hook,
                        f.priority,
                        TcHandle::from(f.handle),
                        None,
                    )
                    .with_context(|| format!("taking over the filter on {} {hook:?}", l.name))?;
                    let id = prog
                        .attach_to_link(link)
                        .with_context(|| format!("replacing the filter on {} {hook:?}", l.name))?;
                    taken += 1;
                    match self.list.iter_mut().find(|a| a.index == l.index) {
                        Some(a) => a.links.push(id),
                        None => self.list.push(Attached {
                            index: l.index,
                            iface: l.name.clone(),
                            created_clsact: ours_clsact.contains(&l.name),
                            links: vec![id],
                            xdp: None,
                        }),
                    }
                }
            }
        }
        self.record_clsact();
        Ok((taken, removed))
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
        if let Some(path) = &self.record {
            let names: Vec<String> = self
                .list
                .iter()
                .filter(|a| a.created_clsact)
                .map(|a| a.iface.clone())
                .collect();
            stale::record_clsact(path, &names);
        }
    }

    /// Attaches to `l` unless already attached there.
    fn attach(&mut self, ebpf: &mut Ebpf, l: &Link) -> Result<()> {
        if self.list.iter().any(|a| a.index == l.index) {
            return Ok(());
        }
        let r = match self.hook {
            Hook::Tc => attach_tc(ebpf, l, &mut self.list).map(|()| {
                if let Some(a) = self.list.last_mut() {
                    a.created_clsact |= self.inherited_clsact.contains(&a.iface);
                }
            }),
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
