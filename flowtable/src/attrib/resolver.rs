//! The join: (network namespace, 5-tuple) → socket inode → process → tags.
//!
//! [`Resolver::refresh`] is one pass over the host: every namespace in
//! which processes live is asked for the sockets of the 5-tuples the probe
//! has just seen (one kernel hash lookup each, [`Host::lookup`]), and, less
//! often, for all of its sockets ([`Host::sockets`], a walk of the kernel's
//! whole socket hash table, whatever the namespace); then the owner of each
//! socket not seen before is found. Owners are found by reading `/proc/<pid>/fd` of the processes
//! that owned sockets in that namespace lately (most recent first), and only
//! when that fails of every process in the namespace, so a steady stream of
//! connections from a few processes costs a few directory reads per pass.
//! What a pass learnt is kept for the run, keyed by 5-tuple: a connection
//! stays attributed after its socket closed, and [`Resolver::tag`] can
//! label every connection a probe reports, whenever it reports.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

// Fx, not SipHash, as the flow table itself (table.rs): every pass checks
// every key of the kernel map against these sets.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use smallvec::SmallVec;

use super::host::{Host, Netns, Packed, ProcessInfo, Proto, SocketEntry, SocketState, Tuple};
use super::owner::Owner;
use super::rules::{self, ServiceRule};
use crate::{Connection, Interner, Tags};

/// The tag an end gets when its owner is unknown, and the reasons.
pub const UNATTRIBUTED: &str = "unattributed";
/// A socket was seen, but no process held it when looked for (it closed,
/// or it sat in TIME_WAIT or the accept queue whenever a pass saw it).
pub const NO_PROCESS: &str = "no_process";
/// The address is this host's, but no pass saw a socket with this 5-tuple:
/// it opened and closed between two passes.
pub const NO_SOCKET: &str = "no_socket";
/// No namespace of this host has ever used the address: the end is on
/// another machine.
pub const REMOTE: &str = "remote";

/// Passes a 5-tuple is looked up for before the resolver settles for what
/// it found: the server's socket of a new connection sits in the accept
/// queue (no inode) until the server accepts it.
pub const LOOKUP_TRIES: u32 = 5;

/// Full scans for one inode before it is given up as held by no process we
/// can see: one at once, one after the next namespace listing.
const ORPHAN_TRIES: u32 = 2;

#[derive(Clone, Debug)]
pub struct Options {
    pub rules: Vec<ServiceRule>,
    /// List the namespaces (a walk of `/proc`) at most this often; more
    /// often when a socket's owner was not found (a process may be new).
    pub namespaces_every_ns: u64,
    /// The namespace the probe runs in: where a 5-tuple found in several
    /// namespaces (private addresses reused) is taken from.
    pub own_netns: Option<u64>,
    /// Dump every socket of every namespace at most this often (0: every
    /// pass). New connections are looked up one by one in between.
    pub dumps_every_ns: u64,
    /// A 5-tuple's sockets not seen for this long are forgotten (those of
    /// connections the run retired are forgotten at once, [`Resolver::forget`]).
    pub forget_after_ns: u64,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            rules: Vec::new(),
            namespaces_every_ns: 1_000_000_000,
            own_netns: None,
            dumps_every_ns: 0,
            forget_after_ns: 600_000_000_000,
        }
    }
}

/// What one pass did, for cost accounting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassStats {
    pub namespaces: usize,
    /// Sockets the dumps returned.
    pub sockets: usize,
    /// 5-tuples looked up (each in every namespace until found).
    pub lookups: usize,
    /// 5-tuples not looked up: the caller knew their socket's owner
    /// already (the kernel's record of it, [`Resolver::refresh_skipping`]);
    /// counted at every pass that was handed them.
    pub skipped: usize,
    /// Sockets whose owner this pass found.
    pub attributed: usize,
    /// `/proc/<pid>/fd` directories read.
    pub fd_scans: usize,
    /// Namespaces whose every process had to be read.
    pub full_scans: usize,
    /// Failures other than "it went away" (permissions, netlink errors).
    pub errors: usize,
}

/// How attribution fares over a run, and what its bounded memories hold:
/// the agent's `/metrics` (`flowprobe_attribution_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttribHealth {
    /// 5-tuples the resolver remembers (sockets seen and settled lookups),
    /// forgotten with their connections.
    pub remembered: u64,
    /// Sockets looked up one by one, and those joined to a process.
    pub lookups: u64,
    pub attributed: u64,
    /// Failures, and reads refused for lack of a capability.
    pub errors: u64,
    pub denied: u64,
    /// Socket owners the kernel recorded; held now, their bound, and those
    /// forgotten for room before their connection was listed.
    pub owners_recorded: u64,
    pub owners_held: u64,
    pub owners_limit: u64,
    pub owners_forgotten: u64,
    /// Listeners recorded: held now, their bound, forgotten for room.
    pub listeners_held: u64,
    pub listeners_limit: u64,
    pub listeners_forgotten: u64,
    /// Listed connections whose settled tags are kept between ticks.
    pub settled: u64,
    /// Distinct tag sets the ends share: held now, their bound, and those
    /// let go for room (an end keeps its set; later ends get a copy).
    pub tag_sets: u64,
    pub tag_sets_limit: u64,
    pub tag_sets_let_go: u64,
    /// Network namespace ids learnt for recorded sockets: held now, their
    /// bound, and how often all were forgotten for room (learnt again from
    /// later records).
    pub netns_ids: u64,
    pub netns_ids_limit: u64,
    pub netns_ids_cleared: u64,
}

/// The owner of an end's socket as the kernel recorded it (the cgroup
/// programs), and the socket's network namespace when known: what a
/// caller of [`Resolver::refresh_skipping`] names an end with instead of a
/// lookup.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub owner: Arc<Owner>,
    pub netns: Option<u64>,
}

/// The resolver's maps hold a tuple packed (38 bytes, where a `Tuple`
/// takes 68): two of them have an entry per end.
type Key = Packed;

fn key(t: &Tuple) -> Key {
    Packed::new(t.proto, t.local, t.remote)
}

/// One socket with this 5-tuple in one namespace, and its owner once known.
#[derive(Clone, Debug)]
struct Sighting {
    netns: u64,
    /// When a lookup or dump last found it.
    seen_ns: u64,
    inode: u64,
    uid: u32,
    state: SocketState,
    owner: Option<Arc<Owner>>,
}

pub struct Resolver<H> {
    pub(super) host: H,
    opts: Options,
    host_name: Option<String>,
    namespaces: Vec<Netns>,
    namespaces_at: Option<u64>,
    /// Bumped at each namespace listing: an inode no process held gets one
    /// more look per listing (its process may not have been listed yet).
    generation: u64,
    /// The namespaces were listed during this pass already.
    listed_now: bool,
    now_ns: u64,
    /// Nearly always one sighting a tuple, kept in the map's own entry.
    sockets: HashMap<Key, SmallVec<[Sighting; 1]>>,
    /// Owner of each inode seen in the last fd scans, for sockets alive now.
    inode_pid: HashMap<u64, u32>,
    /// Per namespace, processes that owned sockets, most recent first.
    hot: HashMap<u64, Vec<u32>>,
    /// Inodes full scans did not find: the generation of the last try and
    /// how many tries. A socket held by a process of another namespace (or
    /// a hidden one) would otherwise cost a full scan on every pass.
    orphans: HashMap<u64, (u64, u32)>,
    procs: HashMap<u32, Arc<Owner>>,
    users: HashMap<u32, Option<String>>,
    /// Addresses some socket of this host used as its local address, and
    /// the same per namespace.
    local_ips: HashSet<IpAddr>,
    netns_ips: HashSet<(u64, IpAddr)>,
    dumped_at: Option<u64>,
    /// 5-tuples given to [`Resolver::refresh`] that need no more lookups,
    /// and those still being looked up with their tries so far.
    looked_up: HashMap<Key, u64>,
    asking: HashMap<Tuple, u32>,
    /// The ends' tag sets, one per distinct set.
    sets: Interner,
    last_error: Option<String>,
    /// Failures for lack of privilege (no CAP_SYS_ADMIN for `setns`, no
    /// CAP_SYS_PTRACE for other users' fds): counted, never said, since a
    /// probe run without them attributes what it can.
    pub denied: usize,
}

impl<H: Host> Resolver<H> {
    pub fn new(mut host: H, opts: Options) -> Resolver<H> {
        let host_name = host.host_name();
        Resolver {
            host,
            opts,
            host_name,
            namespaces: Vec::new(),
            namespaces_at: None,
            generation: 0,
            listed_now: false,
            now_ns: 0,
            sockets: HashMap::default(),
            inode_pid: HashMap::default(),
            hot: HashMap::default(),
            orphans: HashMap::default(),
            procs: HashMap::default(),
            users: HashMap::default(),
            local_ips: HashSet::default(),
            netns_ips: HashSet::default(),
            dumped_at: None,
            looked_up: HashMap::default(),
            asking: HashMap::default(),
            sets: Interner::default(),
            last_error: None,
            denied: 0,
        }
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    /// The last failure that was not a process or namespace going away
    /// (taken: each is reported once).
    pub fn take_error(&mut self) -> Option<String> {
        self.last_error.take()
    }

    /// One pass at `now_ns` (any monotonic clock; only differences
    /// matter). `seen` are 5-tuples the probe saw (each end's view; repeats
    /// are cheap), new ones at least: each is looked up until its socket is
    /// found, at most [`LOOKUP_TRIES`] passes, whether `seen` names it
    /// again or not.
    pub fn refresh(&mut self, now_ns: u64, seen: &[Tuple]) -> PassStats {
        self.refresh_skipping(now_ns, seen, |_| None, |_| false)
    }

    /// [`Resolver::refresh`], but a 5-tuple for which `recorded` gives its
    /// socket's owner is not looked up (a lookup is the costliest thing a
    /// pass does), nor kept or searched for when a dump meets its socket:
    /// [`Resolver::tag_recorded`] names it from that record. Counted in
    /// [`PassStats::skipped`]. Nor is a 5-tuple `settled` says is an end
    /// the run has named for good (its tags kept with the listing,
    /// `probe/src/enrich/memo.rs`), and a dump that meets its socket keeps
    /// nothing of it either.
    pub fn refresh_skipping(
        &mut self,
        now_ns: u64,
        seen: &[Tuple],
        recorded: impl Fn(&Tuple) -> Option<Recorded>,
        settled: impl Fn(&Tuple) -> bool,
    ) -> PassStats {
        let mut st = PassStats::default();
        self.now_ns = now_ns;
        self.listed_now = false;
        let due = self
            .namespaces_at
            .is_none_or(|at| now_ns.saturating_sub(at) >= self.opts.namespaces_every_ns);
        if due {
            self.list_namespaces(&mut st);
        }
        let namespaces = std::mem::take(&mut self.namespaces);
        if self.dump_due(now_ns) {
            let mut live_inodes = HashSet::default();
            for ns in &namespaces {
                self.dump_netns(ns, &mut st, &mut live_inodes, &recorded, &settled);
            }
            self.dumped_at = Some(now_ns);
            self.inode_pid.retain(|i, _| live_inodes.contains(i));
            self.orphans.retain(|i, _| live_inodes.contains(i));
            self.age_out();
        }
        self.find_sockets(&namespaces, seen, &recorded, &settled, &mut st);
        st.namespaces = namespaces.len();
        // Unless a search for a new process listed them afresh meanwhile.
        if !self.listed_now || self.namespaces.is_empty() {
            self.namespaces = namespaces;
        }
        st
    }

    /// Forgets sockets and settled lookups older than `forget_after_ns`: a
    /// socket that still exists is found again by the dumps.
    fn age_out(&mut self) {
        let (now, ttl) = (self.now_ns, self.opts.forget_after_ns);
        let fresh = |at: u64| now.saturating_sub(at) < ttl;
        self.sockets.retain(|_, list| {
            list.retain(|x| fresh(x.seen_ns));
            !list.is_empty()
        });
        self.looked_up.retain(|_, at| fresh(*at));
    }

    /// Forgets the 5-tuples of connections the run no longer lists: their
    /// sockets, lookups and owners (an owner stays while another socket
    /// or process refers to it).
    pub fn forget(&mut self, tuples: &[Tuple]) {
        for t in tuples {
            self.sockets.remove(&key(t));
            self.looked_up.remove(&key(t));
            self.asking.remove(t);
        }
    }

    /// A pass at `now_ns` would dump every socket.
    pub fn dump_due(&self, now_ns: u64) -> bool {
        self.dumped_at
            .is_none_or(|at| now_ns.saturating_sub(at) >= self.opts.dumps_every_ns)
    }

    /// When the last dump of every socket ran (monotonic ns): until the
    /// next, no address changes from remote to local.
    pub fn dumped_at(&self) -> Option<u64> {
        self.dumped_at
    }

    /// The shared tag sets: how many now, and how many were let go.
    pub fn tag_sets(&self) -> (usize, u64) {
        (self.sets.len(), self.sets.let_go)
    }

    /// 5-tuples remembered now (sockets and settled lookups).
    pub fn remembered(&self) -> usize {
        self.sockets.len() + self.looked_up.len()
    }

    /// Lists the namespaces and their processes now.
    fn list_namespaces(&mut self, st: &mut PassStats) {
        self.listed_now = true;
        match self.host.namespaces() {
            Ok(mut list) => {
                let alive: HashSet<u32> =
                    list.iter().flat_map(|n| n.pids.iter().copied()).collect();
                // A pid not listed has exited; its number may come back as
                // another process.
                self.procs.retain(|pid, _| alive.contains(pid));
                for pids in self.hot.values_mut() {
                    pids.retain(|p| alive.contains(p));
                }
                // Own namespace first: see `pick`.
                let own = self.opts.own_netns;
                list.sort_by_key(|n| Some(n.id) != own);
                self.namespaces = list;
                self.namespaces_at = Some(self.now_ns);
                self.generation += 1;
            }
            Err(e) => self.error(st, &e, "listing network namespaces".to_owned()),
        }
    }

    /// Looks up each 5-tuple not settled yet in every namespace, then finds
    /// the owners of what turned up: those of `seen` and those still being
    /// asked about (the caller may name a tuple once only, when it is new).
    fn find_sockets(
        &mut self,
        namespaces: &[Netns],
        seen: &[Tuple],
        recorded: &impl Fn(&Tuple) -> Option<Recorded>,
        settled: &impl Fn(&Tuple) -> bool,
        st: &mut PassStats,
    ) {
        let mut pending: Vec<Vec<(Tuple, u64)>> = vec![Vec::new(); namespaces.len()];
        let todo: Vec<Tuple> = self
            .asking
            .keys()
            .copied()
            .chain(
                seen.iter()
                    .filter(|t| !self.asking.contains_key(t))
                    .copied(),
            )
            .collect();
        for t in &todo {
            if self.looked_up.contains_key(&key(t)) {
                continue;
            }
            if settled(t) {
                self.asking.remove(t);
                st.skipped += 1;
                continue;
            }
            // Not remembered here: the record names the end whenever it
            // is tagged ([`Resolver::tag_recorded`]), as cheaply as a
            // memory of it would.
            if let Some(r) = recorded(t) {
                self.asking.remove(t);
                self.learn_recorded(t, &r);
                st.skipped += 1;
                continue;
            }
            st.lookups += 1;
            let mut best: Option<(usize, SocketEntry)> = None;
            for (i, ns) in namespaces.iter().enumerate() {
                match self.host.lookup(ns, t) {
                    Ok(Some(e)) => {
                        let exact = e.tuple == *t;
                        if exact || best.is_none() {
                            best = Some((i, e));
                        }
                        if exact {
                            break;
                        }
                    }
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => self.error(
                        st,
                        &e,
                        format!("looking up a socket in network namespace {}", ns.id),
                    ),
                }
            }
            let tries = self.asking.entry(*t).or_insert(0);
            *tries += 1;
            // Settled: the connected socket itself, with an inode to find
            // its process by. A listener, TIME_WAIT or nothing: try again
            // next pass (the accept may not have happened yet), a few times.
            let settled = best
                .as_ref()
                .is_some_and(|(_, e)| e.tuple == *t && e.inode != 0);
            if settled || *tries >= LOOKUP_TRIES {
                self.asking.remove(t);
                self.looked_up.insert(key(t), self.now_ns);
            }
            if let Some((i, e)) = best {
                self.learn_ip(namespaces[i].id, &e);
                if self.see(namespaces[i].id, &e) {
                    pending[i].push((e.tuple, e.inode));
                }
            }
        }
        for (ns, p) in namespaces.iter().zip(pending) {
            if !p.is_empty() {
                self.attribute(ns, p, st);
            }
        }
    }

    /// What a lookup of the recorded end `t` would have taught: its
    /// address is this host's (in the record's namespace).
    fn learn_recorded(&mut self, t: &Tuple, r: &Recorded) {
        let ip = t.local.ip();
        if !ip.is_unspecified() {
            self.local_ips.insert(ip);
            if let Some(ns) = r.netns {
                self.netns_ips.insert((ns, ip));
            }
        }
    }

    fn learn_ip(&mut self, netns: u64, s: &SocketEntry) {
        let ip = s.tuple.local.ip();
        if !ip.is_unspecified() {
            self.local_ips.insert(ip);
            self.netns_ips.insert((netns, ip));
        }
    }

    fn error(&mut self, st: &mut PassStats, e: &io::Error, what: String) {
        if e.kind() == io::ErrorKind::PermissionDenied {
            self.denied += 1;
            return;
        }
        st.errors += 1;
        self.last_error = Some(format!("{what}: {e}"));
    }

    fn dump_netns(
        &mut self,
        ns: &Netns,
        st: &mut PassStats,
        live_inodes: &mut HashSet<u64>,
        recorded: &impl Fn(&Tuple) -> Option<Recorded>,
        settled: &impl Fn(&Tuple) -> bool,
    ) {
        let socks = match self.host.sockets(ns) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                return self.error(st, &e, format!("sockets of network namespace {}", ns.id));
            }
        };
        st.sockets += socks.len();
        let mut pending: Vec<(Tuple, u64)> = Vec::new();
        for s in &socks {
            if s.inode == 0 && !self.sockets.contains_key(&key(&s.tuple)) {
                // TIME_WAIT or not yet accepted, never seen before: nothing
                // to learn (a busy host has tens of thousands in TIME_WAIT).
                continue;
            }
            if s.inode != 0 {
                live_inodes.insert(s.inode);
            }
            self.learn_ip(ns.id, s);
            // The kernel's record names it, or the listing holds its end
            // named: nothing to keep or to find.
            if (settled(&s.tuple) || recorded(&s.tuple).is_some())
                && !self.sockets.contains_key(&key(&s.tuple))
            {
                continue;
            }
            if self.see(ns.id, s) {
                pending.push((s.tuple, s.inode));
            }
        }
        if !pending.is_empty() {
            self.attribute(ns, pending, st);
        }
    }

    /// Finds the owners of sockets `pending` of namespace `ns` (5-tuple and
    /// inode) and records them.
    fn attribute(&mut self, ns: &Netns, pending: Vec<(Tuple, u64)>, st: &mut PassStats) {
        let mut want: HashSet<u64> = pending
            .iter()
            .map(|&(_, i)| i)
            .filter(|i| !self.inode_pid.contains_key(i))
            .filter(|i| {
                self.orphans
                    .get(i)
                    .is_none_or(|&(g, tries)| g != self.generation && tries < ORPHAN_TRIES)
            })
            .collect();
        if !want.is_empty() {
            self.find_owners(ns, &mut want, st);
        }
        for (tuple, inode) in pending {
            let Some(&pid) = self.inode_pid.get(&inode) else {
                continue;
            };
            let Some(owner) = self.owner(pid, st) else {
                continue;
            };
            if let Some(s) = self
                .sockets
                .get_mut(&key(&tuple))
                .and_then(|l| l.iter_mut().find(|s| s.netns == ns.id && s.inode == inode))
            {
                s.owner = Some(owner);
                st.attributed += 1;
            }
        }
    }

    /// Records socket `s` of namespace `netns`; true when its owner is
    /// still to be found.
    fn see(&mut self, netns: u64, s: &SocketEntry) -> bool {
        let list = self.sockets.entry(key(&s.tuple)).or_default();
        let pos = match list.iter().position(|x| x.netns == netns) {
            Some(p) => p,
            None => {
                list.push(Sighting {
                    netns,
                    seen_ns: 0,
                    inode: s.inode,
                    uid: s.uid,
                    state: s.state,
                    owner: None,
                });
                list.len() - 1
            }
        };
        let x = &mut list[pos];
        x.seen_ns = self.now_ns;
        if s.inode != 0 && x.inode != s.inode {
            if x.inode != 0 {
                // Another socket on the same 5-tuple: a new owner.
                x.owner = None;
            }
            x.inode = s.inode;
            x.uid = s.uid;
            x.state = s.state;
        }
        // Inode 0 (TIME_WAIT, accept queue): nobody holds it; keep what an
        // earlier pass learnt.
        x.owner.is_none() && s.inode != 0
    }

    /// Reads fd tables until every inode in `want` has its process: the
    /// namespace's recent owners first, then (once per namespace listing
    /// for a given inode) all of its processes.
    fn find_owners(&mut self, ns: &Netns, want: &mut HashSet<u64>, st: &mut PassStats) {
        let hot = self.hot.get(&ns.id).cloned().unwrap_or_default();
        let mut scanned = HashSet::default();
        for pid in hot {
            if want.is_empty() {
                return;
            }
            scanned.insert(pid);
            self.scan(ns.id, pid, want, st);
        }
        if want.is_empty() {
            return;
        }
        st.full_scans += 1;
        for &pid in &ns.pids {
            if want.is_empty() {
                return;
            }
            if scanned.insert(pid) {
                self.scan(ns.id, pid, want, st);
            }
        }
        if !want.is_empty() && !self.listed_now {
            // Its process may be newer than the listing (a client that
            // just started): list again and read the newcomers.
            self.list_namespaces(st);
            let fresh: Vec<u32> = self
                .namespaces
                .iter()
                .find(|n| n.id == ns.id)
                .map(|n| n.pids.clone())
                .unwrap_or_default();
            for pid in fresh {
                if want.is_empty() {
                    return;
                }
                if scanned.insert(pid) {
                    self.scan(ns.id, pid, want, st);
                }
            }
        }
        for &i in want.iter() {
            let o = self.orphans.entry(i).or_insert((self.generation, 0));
            *o = (self.generation, o.1 + 1);
        }
    }

    fn scan(&mut self, netns: u64, pid: u32, want: &mut HashSet<u64>, st: &mut PassStats) {
        st.fd_scans += 1;
        let hot = self.hot.entry(netns).or_default();
        match self.host.socket_inodes(pid) {
            Ok(inodes) => {
                let mut hit = false;
                for i in inodes {
                    hit |= want.remove(&i);
                    self.inode_pid.insert(i, pid);
                }
                if hit {
                    hot.retain(|&p| p != pid);
                    hot.insert(0, pid);
                }
            }
            Err(e) => {
                hot.retain(|&p| p != pid);
                if e.kind() != io::ErrorKind::NotFound {
                    self.error(st, &e, format!("fds of process {pid}"));
                }
            }
        }
    }

    fn owner(&mut self, pid: u32, st: &mut PassStats) -> Option<Arc<Owner>> {
        if let Some(o) = self.procs.get(&pid) {
            return Some(o.clone());
        }
        let p = match self.host.process(pid) {
            Ok(p) => p,
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    self.error(st, &e, format!("process {pid}"));
                }
                return None;
            }
        };
        let user = self.user(p.uid);
        let o = Arc::new(Owner::new(&p, user, self.host_name.as_deref()));
        self.procs.insert(pid, o.clone());
        Some(o)
    }

    /// The owner of process `pid`, read now through the host (once per
    /// pid, as for sockets a pass finds); `None` when it is gone. For the
    /// socket owners the kernel recorded at connect time.
    pub fn process_owner(&mut self, pid: u32) -> Option<Arc<Owner>> {
        let mut st = PassStats::default();
        self.owner(pid, &mut st)
    }

    /// The network namespace of process `pid`: the one the last listing
    /// of them saw it in, else (a process newer than the listing) the one
    /// the host says; `None` when it is gone. For ends the kernel
    /// recorded, named without a socket of the resolver's.
    pub fn netns_of(&mut self, pid: u32) -> Option<u64> {
        self.namespaces
            .iter()
            .find(|n| n.pids.contains(&pid))
            .map(|n| n.id)
            .or_else(|| self.host.netns_of(pid).ok())
    }

    /// The owner a pass found for the socket at `t`'s end, or for the
    /// listener (or unconnected UDP socket) that stands for it, as
    /// [`Resolver::tag`] would name the end: for a socket the kernel
    /// recorded as accepted by a listener it did not record (one listening
    /// since before the run).
    pub fn owner_of_end(&self, t: &Tuple) -> Option<Recorded> {
        let s = self.sighting(t)?;
        Some(Recorded {
            owner: s.owner.clone()?,
            netns: Some(s.netns),
        })
    }

    /// An owner made from what the kernel recorded of a process that was
    /// gone before it could be read: `p` (pid, comm, uid, its cgroup as
    /// `/proc/<pid>/cgroup` would say it, a service variable learnt from
    /// another process of that cgroup).
    pub fn recorded_owner(&mut self, p: &ProcessInfo) -> Owner {
        let user = self.user(p.uid);
        Owner::new(p, user, self.host_name.as_deref())
    }

    /// The set equal to `m`, shared with every end that has it.
    pub fn intern(&mut self, m: BTreeMap<String, String>) -> Tags {
        self.sets.intern(m)
    }

    /// The tags of an end at local port `port` the kernel recorded as `r`'s:
    /// its namespace when known, and [`Resolver::owner_tags`].
    pub fn recorded_tags(&self, r: &Recorded, port: u16) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        if let Some(n) = r.netns {
            tags.insert("netns".to_owned(), n.to_string());
        }
        tags.extend(self.owner_tags(&r.owner, port));
        tags
    }

    /// The tags an end at local port `port` owned by `o` carries: the
    /// owner's, and its service (rules first, then the environment).
    pub fn owner_tags(&self, o: &Owner, port: u16) -> BTreeMap<String, String> {
        let mut tags = o.tags.clone();
        let service = rules::service(
            &self.opts.rules,
            Some(&o.process),
            o.container.as_deref(),
            port,
        )
        .map(str::to_owned)
        .or_else(|| o.env_service.clone());
        if let Some(svc) = service {
            tags.insert("service".to_owned(), svc);
        }
        tags
    }

    fn user(&mut self, uid: u32) -> Option<String> {
        if let Some(u) = self.users.get(&uid) {
            return u.clone();
        }
        let u = self.host.user_name(uid);
        self.users.insert(uid, u.clone());
        u
    }

    /// Adds each end's tags to every connection (see the README,
    /// "Attribution"): an end whose socket a pass saw gets its owner's tags,
    /// `netns` and `service`; any other end an [`UNATTRIBUTED`] reason.
    pub fn tag(&mut self, conns: &mut [Connection]) {
        self.tag_recorded(conns, |_| None);
    }

    /// [`Resolver::tag`], where an end whose socket the kernel recorded
    /// (`recorded`, as for [`Resolver::refresh_skipping`]) is named from
    /// that record unless a pass found the socket's owner. An end that
    /// already has a `pid` (its tags kept from the last reading) is left
    /// as it is.
    pub fn tag_recorded(
        &mut self,
        conns: &mut [Connection],
        recorded: impl Fn(&Tuple) -> Option<Recorded>,
    ) {
        for c in conns {
            let proto = c.proto;
            let src = SocketAddr::new(c.src, c.sport);
            let dst = SocketAddr::new(c.dst, c.dport);
            // The responder's socket sees the connection beyond any
            // translation this host made (`crate::nat`).
            let (src_far, dst_far) = crate::nat::beyond(c);
            for (tags, local, remote) in [
                (&mut c.src_tags, src, dst),
                (&mut c.dst_tags, dst_far, src_far),
            ] {
                if !tags.contains_key("pid") {
                    let set = self.intern(self.end_tags(proto, local, remote, &recorded));
                    tags.add_shared(&set);
                }
            }
        }
    }

    /// Tags of the end at `local` talking to `remote` (named from
    /// `recorded` when no pass found its socket's owner).
    fn end_tags(
        &self,
        proto: Proto,
        local: SocketAddr,
        remote: SocketAddr,
        recorded: &impl Fn(&Tuple) -> Option<Recorded>,
    ) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        let t = Tuple::new(proto, local, remote);
        let found = self.pick(self.sockets.get(&key(&t)), |s| s.owner.is_some());
        if found.is_none() {
            if let Some(r) = recorded(&t) {
                return self.recorded_tags(&r, t.local.port());
            }
        }
        let Some(s) = self.sighting(&t) else {
            let ip = t.local.ip();
            let why = if ip.is_loopback() || self.local_ips.contains(&ip) {
                NO_SOCKET
            } else {
                REMOTE
            };
            tags.insert(UNATTRIBUTED.to_owned(), why.to_owned());
            return tags;
        };
        tags.insert("netns".to_owned(), s.netns.to_string());
        match &s.owner {
            Some(o) => {
                tags.extend(self.owner_tags(o, t.local.port()));
            }
            None => {
                tags.insert(UNATTRIBUTED.to_owned(), NO_PROCESS.to_owned());
                if let Some(h) = &self.host_name {
                    tags.insert("host".to_owned(), h.clone());
                }
                if s.inode != 0 {
                    tags.insert("uid".to_owned(), s.uid.to_string());
                }
            }
        }
        tags
    }

    /// The socket of this 5-tuple: the connected one, else one bound to the
    /// local address without a peer (an unconnected UDP server, a TCP
    /// listener whose accepted socket no pass saw), also bound to the
    /// wildcard address or, for IPv4, to `::` (dual-stack).
    fn sighting(&self, t: &Tuple) -> Option<&Sighting> {
        let exact = self.pick(self.sockets.get(&key(t)), |_| true);
        if let Some(s) = exact.filter(|s| s.owner.is_some()) {
            return Some(s);
        }
        let v4_any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let v6_any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let port = t.local.port();
        let v4 = t.local.is_ipv4().then(|| SocketAddr::new(v4_any, port));
        let locals = [Some(t.local), v4, Some(SocketAddr::new(v6_any, port))];
        // A socket without a peer only stands for an end when a process owns
        // it, and for TCP only when it listens; it stands for a connected
        // socket seen without an owner (closed by the server before a pass
        // found it: TIME_WAIT) only in that socket's namespace.
        let ip = t.local.ip();
        let usable = |s: &Sighting| {
            s.owner.is_some()
                && (t.proto == Proto::Udp || s.state == SocketState::Listen)
                && exact.is_none_or(|e| e.netns == s.netns)
                // A wildcard socket takes the traffic of its own namespace's
                // addresses only; a remote end on the same port is not it.
                && (ip.is_loopback() || self.netns_ips.contains(&(s.netns, ip)))
        };
        for local in locals.into_iter().flatten() {
            for any in [v4_any, v6_any] {
                let wild = Tuple {
                    proto: t.proto,
                    local,
                    remote: SocketAddr::new(any, 0),
                };
                if let Some(s) = self.pick(self.sockets.get(&key(&wild)), usable) {
                    return Some(s);
                }
            }
        }
        exact
    }

    /// Among the usable sightings of one tuple: the one in the probe's own
    /// namespace, else one with an owner, else any.
    fn pick<'a>(
        &self,
        list: Option<&'a SmallVec<[Sighting; 1]>>,
        usable: impl Fn(&Sighting) -> bool,
    ) -> Option<&'a Sighting> {
        let all = || list.into_iter().flatten().filter(|s| usable(s));
        let own = self.opts.own_netns;
        all()
            .find(|s| own.is_some_and(|n| s.netns == n))
            .or_else(|| all().find(|s| s.owner.is_some()))
            .or_else(|| all().next())
    }
}
