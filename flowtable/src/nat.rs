//! NAT undone: a connection this host's netfilter translated (SNAT or
//! MASQUERADE to an uplink, DNAT of a published port or of a Kubernetes
//! Service's ClusterIP to a pod) is one connection, whatever tuples its
//! packets carried on the interfaces they crossed.
//!
//! A source keys connections by the 5-tuple its packets carry where they
//! were seen, so a translated connection comes out as two records: the
//! *original* view (the tuple the initiator sent, seen before the
//! translation, e.g. on a container's bridge port) and the *translated*
//! view (after it, e.g. on the uplink). Conntrack knows both tuples of
//! every connection it tracks ([`Translation`]: its original and reply
//! directions). [`NatJoin::undo`] asks it about each record (through
//! [`Conntrack`], so that this module stays free of OS calls) and
//!
//! - orients every translated record as conntrack's original direction
//!   (the initiator's addresses as it sent them);
//! - tags each end whose address the translation changed with the address
//!   it has on the other side: [`NAT_IP`] and [`NAT_PORT`] (the source's
//!   public address after SNAT, a DNAT's actual destination);
//! - counts once: the original view keeps the counts, the translated
//!   view's packets are duplicates ([`NatStats::duplicate_packets`], as
//!   `FrameStats::duplicate`) and its record is dropped. A direction the
//!   original view never saw (XDP sees what an interface receives: a
//!   gateway sees the request before the translation and the answer
//!   after) is taken from the translated view.
//!
//! What it cannot ask (no permission, conntrack unreadable) is counted
//! ([`NatStats::unresolved`]); every memory it keeps has a bound
//! ([`NatJoin::new`]) and a count of the times it was cleared.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;
use serde::Serialize;

use crate::attrib::{Packed, Proto};
use crate::conn::{Connection, DirStats};
use crate::delta::Last;

/// The tag of an end whose address was translated: its address on the
/// other side of the translation.
pub const NAT_IP: &str = "nat.ip";
/// Its port there.
pub const NAT_PORT: &str = "nat.port";

/// A translated view's connection is remembered this many readings after
/// it was last listed…
const GRACE_READINGS: u64 = 16;
/// …and this long in packet time after its last packet, so that a view
/// retired a few readings after the other one is still recognised.
const GRACE_NS: u64 = 30_000_000_000;

/// One conntrack entry: the tuples of its two directions as packets carry
/// them (source, destination). Without translation `reply` is `orig`
/// reversed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Translation {
    pub proto: Proto,
    /// What the initiator sent: its address, the address it sent to.
    pub orig: (SocketAddr, SocketAddr),
    /// What the responder sends: its own address, the address it answers.
    pub reply: (SocketAddr, SocketAddr),
}

impl Translation {
    /// The initiator's and the responder's addresses beyond the
    /// translation (what the responder sees).
    pub fn beyond(&self) -> (SocketAddr, SocketAddr) {
        (self.reply.1, self.reply.0)
    }

    /// Whether the entry changes any address or port.
    pub fn translates(&self) -> bool {
        self.orig != self.beyond()
    }

    /// Which view a record from `a` to `b` is, and whether it is oriented
    /// the other way round (from the responder).
    fn view_of(&self, a: SocketAddr, b: SocketAddr) -> Option<(View, bool)> {
        let (o, x) = (self.orig, self.beyond());
        if (a, b) == o {
            Some((View::Original, false))
        } else if (b, a) == o {
            Some((View::Original, true))
        } else if (a, b) == x {
            Some((View::Translated, false))
        } else if (b, a) == x {
            Some((View::Translated, true))
        } else {
            None
        }
    }
}

/// Conntrack, as the join sees it.
pub trait Conntrack {
    /// The entry one of whose two directions is `src → dst` (the kernel's
    /// own lookup finds either), if the table has one.
    fn lookup(
        &mut self,
        proto: Proto,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> io::Result<Option<Translation>>;
}

/// What the join did: per reading (`translated`, `folded`, `unresolved`,
/// `cache_entries`) or since the start (the rest, monotonic).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NatStats {
    /// Connections listed with a translation.
    pub translated: u64,
    /// Translated views folded into their connection in this reading.
    pub folded: u64,
    /// Connections that could not be checked in this reading (conntrack
    /// could not be read: no permission, or an error): a translated one
    /// among them is listed once per tuple.
    pub unresolved: u64,
    /// Packets of translated views, counted already in their original
    /// view, since the start.
    pub duplicate_packets: u64,
    /// Conntrack lookups made, and those that failed, since the start.
    pub lookups: u64,
    pub lookup_errors: u64,
    /// Entries of the join's memory now, its bound, and how many times it
    /// was full and cleared (then what it forgot is asked again).
    pub cache_entries: u64,
    pub cache_max: u64,
    pub cache_cleared: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum View {
    Original,
    Translated,
}

/// A record as the source keyed it.
type RecKey = (Proto, SocketAddr, SocketAddr);

/// A translated connection: its protocol and original tuple.
type ConnId = (Proto, SocketAddr, SocketAddr);

/// What the views of one translated connection showed.
#[derive(Clone, Debug, Default)]
struct Joined {
    original_seen: bool,
    /// The translated view's last counters, in the original orientation
    /// (sent, received).
    translated: Option<[DirStats; 2]>,
    /// The directions the original view took from the translated one.
    borrowed: [bool; 2],
    last_reading: u64,
    last_seen: u64,
}

/// The join, with its bounded memory: conntrack's answer per record (so
/// that each record is asked about once, not at every reading) and what
/// each translated connection's views showed.
pub struct NatJoin {
    /// Translated records' answers, and untranslated ones' until they are
    /// settled. A settled untranslated record's answer is the last
    /// reading ([`NatJoin::remember`]): listed there as it came, without
    /// a translation's tags (most records; 80 bytes each in this map).
    /// Boxed: an unsettled record's answer is a pointer's size.
    answers: HashMap<Packed, Option<Box<Translation>>>,
    /// `None` until [`NatJoin::remember`] is first called.
    last: Option<Last>,
    joined: HashMap<ConnId, Joined>,
    max: usize,
    reading: u64,
    /// The latest packet time seen in any reading.
    newest: u64,
    stats: NatStats,
    /// Duplicate packets of translated views that were retired.
    dup_retired: u64,
}

impl NatJoin {
    /// A join that remembers at most `max` answers and `max` translated
    /// connections (each memory is cleared when full, and counted).
    pub fn new(max: usize) -> NatJoin {
        NatJoin {
            answers: HashMap::default(),
            last: None,
            joined: HashMap::default(),
            max: max.max(1),
            reading: 0,
            newest: 0,
            stats: NatStats {
                cache_max: max.max(1) as u64,
                ..NatStats::default()
            },
            dup_retired: 0,
        }
    }

    /// The reading's listed connections as the sinks keep them: the
    /// answer of each settled untranslated record among them (see
    /// `answers`). Without it (a caller that keeps no reading), the
    /// answers map keeps every settled answer.
    pub fn remember(&mut self, listed: Arc<Vec<Connection>>) {
        self.last = Some(Last::new(listed));
    }

    /// Undoes the translations in one reading: `conns` listed now,
    /// `retired` listed for the last time (see the module doc).
    pub fn undo(
        &mut self,
        ct: &mut impl Conntrack,
        conns: &mut Vec<Connection>,
        retired: &mut Vec<Connection>,
    ) -> NatStats {
        self.reading += 1;
        self.stats.unresolved = 0;
        let retired_keys: Vec<Option<RecKey>> = retired.iter().map(rec_key).collect();
        let views_c = self.classify(ct, conns, false);
        let views_r = self.classify(ct, retired, true);

        // What each view showed.
        let mut newest = self.newest;
        for (c, v) in conns
            .iter()
            .zip(&views_c)
            .chain(retired.iter().zip(&views_r))
        {
            newest = newest.max(c.last_seen);
            let Some((id, view)) = v else { continue };
            if !self.joined.contains_key(id) && self.joined.len() >= self.max {
                self.joined.clear();
                self.stats.cache_cleared += 1;
            }
            let j = self.joined.entry(*id).or_default();
            j.last_reading = self.reading;
            j.last_seen = j.last_seen.max(c.last_seen);
            match view {
                View::Original => j.original_seen = true,
                View::Translated => j.translated = Some([c.sent.clone(), c.received.clone()]),
            }
        }

        // The original view keeps the counts; a direction it never saw
        // comes from the translated view.
        for (c, v) in conns
            .iter_mut()
            .zip(&views_c)
            .chain(retired.iter_mut().zip(&views_r))
        {
            let Some((id, View::Original)) = v else {
                continue;
            };
            let Some(j) = self.joined.get_mut(id) else {
                continue;
            };
            let Some(t) = &j.translated else { continue };
            for (d, mine) in [&mut c.sent, &mut c.received].into_iter().enumerate() {
                // Decided again at each reading: a direction the original
                // view had not seen yet at one reading (its first packet
                // was on its way) is its own at the next.
                j.borrowed[d] = mine.packets == 0 && t[d].packets > 0;
                if j.borrowed[d] {
                    *mine = t[d].clone();
                }
            }
        }

        // Translated views of connections whose original view was seen:
        // their packets are duplicates.
        let mut folded = 0;
        let mut dup_now = 0;
        for (list, views, retiring) in [
            (&mut *conns, &views_c, false),
            (&mut *retired, &views_r, true),
        ] {
            let mut i = 0;
            list.retain(|c| {
                let v = views[i];
                i += 1;
                let Some((id, View::Translated)) = v else {
                    return true;
                };
                let Some(j) = self.joined.get(&id) else {
                    return true;
                };
                if !j.original_seen {
                    return true;
                }
                let dup: u64 = [&c.sent, &c.received]
                    .into_iter()
                    .zip(j.borrowed)
                    .filter(|(_, b)| !b)
                    .map(|(d, _)| d.packets)
                    .sum();
                if retiring {
                    self.dup_retired += dup;
                } else {
                    dup_now += dup;
                }
                folded += 1;
                false
            });
        }

        // Forget: the answers of retired records, and connections no view
        // of which was listed for a while.
        for k in retired_keys.into_iter().flatten() {
            self.answers.remove(&packed(k));
        }
        self.newest = newest;
        let reading = self.reading;
        self.joined.retain(|_, j| {
            j.last_reading + GRACE_READINGS > reading
                || newest.saturating_sub(j.last_seen) < GRACE_NS
        });

        self.stats.translated = conns.iter().filter(|c| translated(c)).count() as u64;
        self.stats.folded = folded;
        self.stats.duplicate_packets = self.dup_retired + dup_now;
        self.stats.cache_entries = (self.answers.len() + self.joined.len()) as u64;
        self.stats
    }

    /// Each record's connection and view, when it is translated; oriented
    /// and tagged (see the module doc).
    fn classify(
        &mut self,
        ct: &mut impl Conntrack,
        list: &mut [Connection],
        retiring: bool,
    ) -> Vec<Option<(ConnId, View)>> {
        list.iter_mut()
            .map(|c| {
                let t = self.answer(ct, c, retiring)?;
                let (view, reversed) = t.view_of(
                    SocketAddr::new(c.src, c.sport),
                    SocketAddr::new(c.dst, c.dport),
                )?;
                if reversed {
                    swap_ends(c);
                }
                set_tuple(c, t.orig);
                let (src_far, dst_far) = t.beyond();
                if src_far != t.orig.0 {
                    tag(&mut c.src_tags, src_far);
                }
                if dst_far != t.orig.1 {
                    tag(&mut c.dst_tags, dst_far);
                }
                Some(((t.proto, t.orig.0, t.orig.1), view))
            })
            .collect()
    }

    /// Conntrack's translation of `c`'s connection (remembered; a record
    /// with traffic one way only is asked again at the next reading, in
    /// case its entry was not confirmed yet). `None` also when it could
    /// not be asked (counted).
    fn answer(
        &mut self,
        ct: &mut impl Conntrack,
        c: &Connection,
        retiring: bool,
    ) -> Option<Translation> {
        let key = rec_key(c)?;
        if let Some(a) = self.answers.get(&packed(key)) {
            return a.as_deref().copied();
        }
        let last = self.last.as_mut();
        if last
            .and_then(|l| l.find(c))
            .is_some_and(settled_untranslated)
        {
            return None;
        }
        let (proto, a, b) = key;
        self.stats.lookups += 1;
        let found = match ct.lookup(proto, a, b) {
            Ok(None) => {
                self.stats.lookups += 1;
                ct.lookup(proto, b, a)
            }
            r => r,
        };
        let found = match found {
            Ok(f) => f.filter(|t| t.translates() && t.view_of(a, b).is_some()),
            Err(_) => {
                self.stats.lookup_errors += 1;
                self.stats.unresolved += 1;
                return None;
            }
        };
        let settled = found.is_some() || seen_both_ways(c);
        // An untranslated record's answer is kept by the next reading.
        if settled && !retiring && (found.is_some() || self.last.is_none()) {
            if self.answers.len() >= self.max {
                self.answers.clear();
                self.stats.cache_cleared += 1;
            }
            self.answers.insert(packed(key), found.map(Box::new));
        }
        found
    }
}

/// A record that both directions' packets passed, listed without a
/// translation: conntrack's answer for it will not change.
fn settled_untranslated(c: &Connection) -> bool {
    seen_both_ways(c) && !translated(c)
}

/// Packets of `c` passed both ways: conntrack has confirmed its entry.
fn seen_both_ways(c: &Connection) -> bool {
    c.sent.packets > 0 && c.received.packets > 0
}

/// The addresses the two ends of `c` have beyond any translation: the
/// initiator's (its [`NAT_IP`] tag, else its own) and the responder's. The
/// responder's socket is bound to the second and talks to the first.
pub fn beyond(c: &Connection) -> (SocketAddr, SocketAddr) {
    let far = |tags: &BTreeMap<String, String>, own: SocketAddr| -> SocketAddr {
        let ip = tags.get(NAT_IP).and_then(|v| v.parse().ok());
        let port = tags.get(NAT_PORT).and_then(|v| v.parse().ok());
        match (ip, port) {
            (Some(ip), Some(port)) => SocketAddr::new(ip, port),
            _ => own,
        }
    };
    (
        far(&c.src_tags, SocketAddr::new(c.src, c.sport)),
        far(&c.dst_tags, SocketAddr::new(c.dst, c.dport)),
    )
}

/// Whether the join found `c` translated (an end has a [`NAT_IP`] tag).
pub fn translated(c: &Connection) -> bool {
    c.src_tags.contains_key(NAT_IP) || c.dst_tags.contains_key(NAT_IP)
}

/// As the answers are kept: packed, for their one entry per connection.
fn packed((proto, a, b): RecKey) -> Packed {
    Packed::new(proto, a, b)
}

fn rec_key(c: &Connection) -> Option<RecKey> {
    Some((
        c.proto,
        SocketAddr::new(c.src, c.sport),
        SocketAddr::new(c.dst, c.dport),
    ))
}

fn tag(tags: &mut BTreeMap<String, String>, a: SocketAddr) {
    tags.insert(NAT_IP.to_owned(), a.ip().to_string());
    tags.insert(NAT_PORT.to_owned(), a.port().to_string());
}

fn set_tuple(c: &mut Connection, (src, dst): (SocketAddr, SocketAddr)) {
    (c.src, c.sport, c.dst, c.dport) = (src.ip(), src.port(), dst.ip(), dst.port());
}

/// Turns `c` round: its responder becomes its source.
fn swap_ends(c: &mut Connection) {
    std::mem::swap(&mut c.src, &mut c.dst);
    std::mem::swap(&mut c.sport, &mut c.dport);
    std::mem::swap(&mut c.sent, &mut c.received);
    std::mem::swap(&mut c.src_tags, &mut c.dst_tags);
    c.rtt.turn();
}

#[cfg(test)]
mod tests;
