//! Socket owners the kernel recorded at connect or first send (the eBPF
//! source's cgroup programs, handed over as an
//! [`OwnerFeed`](crate::sources::OwnerFeed)), joined to connection ends by
//! the socket cookie the tc program took from the same socket's packets.
//!
//! Each record is turned into an owner when it is drained (every
//! [`DRAIN_EVERY`]): the process's own tags while it lives (read once per
//! pid, as for sockets a pass finds), else what the kernel recorded (pid,
//! `comm`, uid) with the container from its cgroup id and the service a
//! process of the same cgroup declared earlier. So an end is attributed
//! even when its socket and its process were gone before any resolver
//! pass.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use flowtable::attrib::{Host, Owner, ProcessInfo, Resolver, SERVICE_ENV, UNATTRIBUTED};
use flowtable::Connection;
use probe_common::owner::SockOwner;

use super::cgroupid::CgroupIds;

/// Between drains of the ring: a process that lives this long after its
/// first connect is read whole (command line, environment).
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// Sockets remembered at most; the oldest are forgotten first (counted).
/// Each is also forgotten when its connection is retired.
pub const MAX_SOCKETS: usize = 1 << 18;

/// Tag key of the socket cookie (`Connection::from_entry`).
pub const SOCKET_COOKIE: &str = "socket_cookie";

#[derive(Default)]
pub struct Owners {
    by_cookie: HashMap<u64, Arc<Owner>>,
    order: VecDeque<u64>,
    /// Per cgroup id, the service a process of it declared.
    cgroup_service: HashMap<u64, String>,
    pub recorded: u64,
    /// Records of processes gone before they could be read.
    pub gone: u64,
    /// Sockets forgotten to stay within [`MAX_SOCKETS`].
    pub evicted: u64,
}

impl Owners {
    /// Turns drained records into owners.
    pub fn ingest<H: Host>(
        &mut self,
        records: &[SockOwner],
        r: &mut Resolver<H>,
        cgroups: &mut CgroupIds,
    ) {
        for rec in records {
            self.recorded += 1;
            if self.by_cookie.contains_key(&rec.cookie) {
                continue;
            }
            let owner = match r.process_owner(rec.tgid) {
                Some(o) => {
                    if let Some(svc) = &o.env_service {
                        self.cgroup_service.insert(rec.cgroup_id, svc.clone());
                    }
                    o
                }
                None => {
                    self.gone += 1;
                    let cgroup = cgroups
                        .path_of(rec.cgroup_id)
                        .map(|p| format!("0::{p}\n"))
                        .unwrap_or_default();
                    let env = self
                        .cgroup_service
                        .get(&rec.cgroup_id)
                        .map(|s| vec![(SERVICE_ENV[0].to_owned(), s.clone())])
                        .unwrap_or_default();
                    let p = ProcessInfo {
                        pid: rec.tgid,
                        comm: String::from_utf8_lossy(rec.comm_bytes()).into_owned(),
                        uid: rec.uid,
                        cgroup,
                        env,
                        ..ProcessInfo::default()
                    };
                    Arc::new(r.recorded_owner(&p))
                }
            };
            self.by_cookie.insert(rec.cookie, owner);
            self.order.push_back(rec.cookie);
            while self.order.len() > MAX_SOCKETS {
                if let Some(old) = self.order.pop_front() {
                    if self.by_cookie.remove(&old).is_some() {
                        self.evicted += 1;
                    }
                }
            }
        }
    }

    /// Gives every end without an owning process whose socket cookie was
    /// recorded its owner's tags (and drops its `unattributed` reason).
    pub fn tag<H: Host>(&self, r: &Resolver<H>, conns: &mut [Connection]) {
        for c in conns {
            for (tags, port) in [(&mut c.src_tags, c.sport), (&mut c.dst_tags, c.dport)] {
                fill(&self.by_cookie, r, tags, port);
            }
        }
    }

    /// Forgets the sockets of connections listed for the last time.
    pub fn forget(&mut self, retired: &[Connection]) {
        for c in retired {
            for tags in [&c.src_tags, &c.dst_tags] {
                if let Some(k) = cookie(tags) {
                    self.by_cookie.remove(&k);
                }
            }
        }
        if self.order.len() > 2 * self.by_cookie.len() + 1024 {
            let live = &self.by_cookie;
            self.order.retain(|k| live.contains_key(k));
        }
    }
}

fn cookie(tags: &BTreeMap<String, String>) -> Option<u64> {
    tags.get(SOCKET_COOKIE)
        .and_then(|v| v.parse().ok())
        .filter(|&k| k != 0)
}

fn fill<H: Host>(
    by_cookie: &HashMap<u64, Arc<Owner>>,
    r: &Resolver<H>,
    tags: &mut BTreeMap<String, String>,
    port: u16,
) {
    if tags.contains_key("pid") {
        return;
    }
    let Some(o) = cookie(tags).and_then(|k| by_cookie.get(&k)) else {
        return;
    };
    tags.remove(UNATTRIBUTED);
    tags.extend(r.owner_tags(o, port));
}
