//! NAT undone, the first step of enrichment: each reading's connections
//! joined through this namespace's conntrack ([`super::conntrack`]) by
//! [`flowtable::nat::NatJoin`] before attribution tags them (so that the
//! responder's socket is looked up beyond the translation).
//!
//! It runs on the run loop's thread at each reading, synchronously: one
//! lookup (two for a connection conntrack does not know) per connection
//! the first time it is listed, none after. `FLOWPROBE_NAT=off` turns it
//! off; so does `--per-interface` (each interface's view as it is).
//! `FLOWPROBE_ATTRIB_STATS=1` prints its CPU time and lookups at exit.

use std::io;
use std::net::SocketAddr;

use flowtable::attrib::Proto;
use flowtable::nat::{Conntrack, NatJoin, NatStats, Translation};

use super::conntrack::CtSocket;
use crate::os::clock::thread_cpu_ns;
use crate::sources::Reading;

/// At most this many answers (one per listed record) and this many
/// translated connections remembered, each memory cleared when full (and
/// counted): room for 1000 new connections a second, two records each,
/// listed for the default --keep-ended of 60 s, twice over.
pub const NAT_MEMORY: usize = 1 << 18;

/// The table, opened on first use; after an error that will not go away
/// (no permission, no ctnetlink in the kernel) it is not asked again.
#[derive(Default)]
struct Table {
    sock: Option<CtSocket>,
    broken: Option<io::ErrorKind>,
    /// The first error, said once on stderr.
    said: bool,
}

impl Conntrack for Table {
    fn lookup(
        &mut self,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<Translation>> {
        if let Some(k) = self.broken {
            return Err(k.into());
        }
        let r = match &mut self.sock {
            Some(s) => s.lookup(proto, src, dst),
            None => CtSocket::open().and_then(|mut s| {
                let r = s.lookup(proto, src, dst);
                self.sock = Some(s);
                r
            }),
        };
        if let Err(e) = &r {
            let lasting = e.kind() == io::ErrorKind::PermissionDenied
                || matches!(
                    e.raw_os_error(),
                    Some(libc::EPROTONOSUPPORT | libc::EOPNOTSUPP | libc::EAFNOSUPPORT)
                );
            if !self.said {
                self.said = true;
                eprintln!(
                    "flowprobe: NAT: cannot read conntrack over netlink ({e}){}: a connection this host translates is listed once per tuple (counted: NAT unresolved in the summary, flowprobe_nat_unresolved_connections in /metrics)",
                    if lasting { "" } else { ", trying again" }
                );
            }
            if lasting {
                self.broken = Some(e.kind());
            }
            // Open afresh next time.
            self.sock = None;
        }
        r
    }
}

pub struct Nat {
    join: NatJoin,
    table: Table,
    /// Thread CPU time spent undoing, ns, and the last stats (said at exit
    /// with `FLOWPROBE_ATTRIB_STATS=1`, beside attribution's cost).
    cpu_ns: u64,
    last: NatStats,
}

impl Nat {
    /// The step, unless `FLOWPROBE_NAT=off` or `per_interface`.
    pub fn start(per_interface: bool) -> Option<Nat> {
        if per_interface || std::env::var("FLOWPROBE_NAT").as_deref() == Ok("off") {
            return None;
        }
        Some(Nat {
            join: NatJoin::new(NAT_MEMORY),
            table: Table::default(),
            cpu_ns: 0,
            last: NatStats::default(),
        })
    }

    /// Undoes the translations in `r` and says what it did in `r.nat`.
    /// The reading's listed connections as the sinks keep them
    /// ([`flowtable::nat::NatJoin::remember`]).
    pub fn remember(&mut self, listed: std::sync::Arc<Vec<flowtable::Connection>>) {
        self.join.remember(listed);
    }

    pub fn undo(&mut self, r: &mut Reading) {
        let t0 = thread_cpu_ns();
        let st: NatStats = self
            .join
            .undo(&mut self.table, &mut r.conns, &mut r.retired);
        self.cpu_ns += thread_cpu_ns().saturating_sub(t0);
        self.last = st;
        r.nat = Some(st);
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        if std::env::var("FLOWPROBE_ATTRIB_STATS").as_deref() == Ok("1") {
            let s = &self.last;
            eprintln!(
                "flowprobe: NAT: CPU {:.3} s; {} conntrack lookups ({} failed), {} packets seen again after a translation, memory {} of {} (cleared {} times)",
                self.cpu_ns as f64 / 1e9,
                s.lookups,
                s.lookup_errors,
                s.duplicate_packets,
                s.cache_entries,
                s.cache_max,
                s.cache_cleared
            );
        }
    }
}
