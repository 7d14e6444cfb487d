//! What attribution gave each listed connection, kept between ticks.
//!
//! A run lists the same connections at every tick, and an end whose
//! process was found keeps its tags for good. Joining every listed end
//! again each tick was a quarter of the agent's CPU at 1000 connections a
//! second, and made two fresh tag maps per connection per tick. So an end
//! is *settled* once it carries a `pid`, or is `remote` and no socket dump
//! has run since it was found remote (a dump is how a new container's
//! address becomes known as local). A connection whose ends were both
//! settled in the last reading gets the same tag sets again
//! ([`flowtable::Tags`], shared), as long as what came in (the source's and
//! NAT's tags) is still among them; every other one is joined afresh, but
//! for an end with a `pid`, which keeps its set there too (so a remote end
//! judged again after a dump needs nothing of its peer's socket).
//!
//! An end with a `pid` is named for good by the listing: the socket
//! records it was named from can go ([`super::owners::Owners::release`]),
//! and the resolver need not look its socket up, nor keep or search it
//! when a dump meets it ([`Memo::named_ends`], 8 bytes an end).
//!
//! The memory is the last tagged reading itself, shared with the sinks
//! ([`Memo::remember`], [`flowtable::delta::Last`]): nothing per
//! connection of its own (a map of its own took 220 bytes per open
//! connection).

use std::hash::BuildHasher;
use std::sync::Arc;

use flowtable::attrib::{Tuple, REMOTE, UNATTRIBUTED};
use flowtable::delta::Last;
use flowtable::{Connection, Tags};

/// The connections of one [`Memo::reuse`] left to join.
#[derive(Default)]
pub struct Pending {
    /// How many, at the front.
    pub todo: usize,
    swaps: Vec<(usize, usize)>,
}

#[derive(Default)]
pub struct Memo {
    /// The last reading's listed connections, tagged.
    before: Last,
    /// The socket dump the remote ends of `before` were judged after.
    before_dump: Option<u64>,
    /// The dump the last listed connections were judged after, for
    /// `before_dump` when they come back as the next `before`.
    judged: Option<u64>,
    /// Listed connections settled at the last call for them.
    settled: usize,
    /// Connections given their tags again, and joined afresh.
    pub reused: u64,
    pub joined: u64,
}

/// An end that no later pass, record or dump can name differently.
fn settled(t: &Tags) -> bool {
    named(t) || has_remote(t)
}

/// An end named by its process: settled whatever dumps come.
pub fn named(t: &Tags) -> bool {
    t.contains_key("pid")
}

/// Both ends of `c` are [`settled`].
fn both_settled(c: &Connection) -> bool {
    settled(&c.src_tags) && settled(&c.dst_tags)
}

fn has_remote(t: &Tags) -> bool {
    t.get(UNATTRIBUTED).is_some_and(|r| r == REMOTE)
}

/// What came in (`now`: the source's and NAT's tags and socket) is all
/// still in what an end was given (`given`).
fn still_in(now: &Tags, given: &Tags) -> bool {
    let s = now.socket();
    (s == Default::default() || s == given.socket())
        && now.iter().all(|(k, v)| given.get(k) == Some(v))
}

impl Memo {
    /// Gives each connection of `conns` whose ends were settled in the last
    /// reading its tags again, and moves the others to the front (in their
    /// order), to be joined (`conns[..p.todo]`), then handed to
    /// [`Memo::keep`], which puts every connection back in its place.
    /// `dump` is the resolver's last socket dump.
    pub fn reuse(&mut self, conns: &mut [Connection], dump: Option<u64>) -> Pending {
        let fresh_remote = self.before_dump == dump;
        let mut p = Pending::default();
        for i in 0..conns.len() {
            let c = &mut conns[i];
            if let Some(b) = self.before.find(c) {
                let fresh = fresh_remote || !(has_remote(&b.src_tags) || has_remote(&b.dst_tags));
                if fresh
                    && both_settled(b)
                    && still_in(&c.src_tags, &b.src_tags)
                    && still_in(&c.dst_tags, &b.dst_tags)
                {
                    c.src_tags = b.src_tags.clone();
                    c.dst_tags = b.dst_tags.clone();
                    self.reused += 1;
                    continue;
                }
                for (now, given) in [
                    (&mut c.src_tags, &b.src_tags),
                    (&mut c.dst_tags, &b.dst_tags),
                ] {
                    if named(given) && still_in(now, given) {
                        *now = given.clone();
                    }
                }
            }
            conns.swap(p.todo, i);
            p.swaps.push((p.todo, i));
            p.todo += 1;
        }
        self.joined += p.todo as u64;
        p
    }

    /// Puts `conns` back in order after [`Memo::reuse`]. `listed`: they
    /// are the reading's listed connections (not those it retires), judged
    /// after `dump`.
    pub fn keep(&mut self, conns: &mut [Connection], p: Pending, dump: Option<u64>, listed: bool) {
        if listed {
            self.judged = dump;
            let joined = &conns[..p.todo];
            self.settled = conns.len() - p.todo + joined.iter().filter(|c| both_settled(c)).count();
        }
        for &(a, b) in p.swaps.iter().rev() {
            conns.swap(a, b);
        }
    }

    /// The reading's listed connections as the sinks keep them, tagged:
    /// what the next reading's are reused from.
    pub fn remember(&mut self, listed: Arc<Vec<Connection>>) {
        self.before = Last::new(listed);
        self.before_dump = self.judged;
    }

    /// The 5-tuples of the last reading's ends named by their process (as
    /// `ends` gives a connection's two), by hash: what the resolver leaves
    /// alone.
    pub fn named_ends(&self, ends: impl Fn(&Connection) -> [Tuple; 2]) -> NamedEnds {
        let conns = self.before.conns();
        let mut hashes = Vec::with_capacity(2 * conns.len());
        for c in conns.iter() {
            let [src, dst] = ends(c);
            for (t, tags) in [(src, &c.src_tags), (dst, &c.dst_tags)] {
                if named(tags) {
                    hashes.push(NamedEnds::hash(&t));
                }
            }
        }
        hashes.sort_unstable();
        hashes.shrink_to_fit();
        NamedEnds(hashes)
    }

    /// Listed connections settled at the last call for them.
    pub fn len(&self) -> usize {
        self.settled
    }
}

/// [`Memo::named_ends`], sorted: built once a tick.
#[derive(Default)]
pub struct NamedEnds(Vec<u64>);

impl NamedEnds {
    fn hash(t: &Tuple) -> u64 {
        rustc_hash::FxBuildHasher.hash_one(t)
    }

    /// `t` is a named end's (or, at odds of one in 2^64, shares its hash).
    pub fn contains(&self, t: &Tuple) -> bool {
        self.0.binary_search(&Self::hash(t)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowtable::DirStats;

    fn conn(sport: u16, src: &[(&str, &str)]) -> Connection {
        let tags = |p: &[(&str, &str)]| -> Tags {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Connection {
            proto: flowtable::Proto::Tcp,
            src: [10, 0, 0, 1].into(),
            sport,
            dst: [10, 0, 0, 2].into(),
            dport: 80,
            iface: 2,
            first_seen: 1_000_000_000,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: Default::default(),
            src_tags: tags(src),
            dst_tags: Tags::default(),
        }
    }

    /// One tick: reuse, then "join" the rest by `join`, keep, and the
    /// sinks' copy remembered. Returns how many were joined.
    fn tick(
        m: &mut Memo,
        conns: &mut [Connection],
        dump: Option<u64>,
        join: impl Fn(&mut Connection),
    ) -> usize {
        let p = m.reuse(conns, dump);
        let n = p.todo;
        conns[..n].iter_mut().for_each(join);
        m.keep(conns, p, dump, true);
        m.remember(Arc::new(conns.to_vec()));
        n
    }

    #[test]
    fn settled_ends_get_the_same_sets_and_the_rest_is_joined_again() {
        let mut m = Memo::default();
        let name = |c: &mut Connection| {
            if c.sport == 1 {
                c.src_tags.insert("pid".into(), "7".into());
                c.dst_tags.insert(UNATTRIBUTED.into(), REMOTE.into());
            } else {
                c.src_tags.insert(UNATTRIBUTED.into(), "no_socket".into());
            }
        };
        let mut conns = vec![conn(1, &[("socket_cookie", "9")]), conn(2, &[])];
        assert_eq!(tick(&mut m, &mut conns, Some(5), name), 2);
        let kept = conns[0].src_tags.clone();
        // The next reading: fresh maps from the source, same content.
        let mut next = vec![conn(1, &[("socket_cookie", "9")]), conn(2, &[])];
        assert_eq!(
            tick(&mut m, &mut next, Some(5), name),
            1,
            "only the unsettled one"
        );
        assert_eq!(
            (next[0].sport, next[1].sport),
            (1, 2),
            "in their order again"
        );
        assert!(Tags::same(&next[0].src_tags, &kept));
        assert_eq!(next[0].dst_tags.get(UNATTRIBUTED).unwrap(), REMOTE);
        assert_eq!(next[1].src_tags.get(UNATTRIBUTED).unwrap(), "no_socket");
        assert_eq!((m.reused, m.joined), (1, 3));

        // A dump since: the remote end is judged again.
        let mut after_dump = vec![conn(1, &[("socket_cookie", "9")])];
        assert_eq!(tick(&mut m, &mut after_dump, Some(6), name), 1);
        // What came in changed (a cookie seen later): joined again.
        let mut changed = vec![conn(1, &[("socket_cookie", "10")])];
        assert_eq!(tick(&mut m, &mut changed, Some(6), name), 1);
    }

    /// A "join" that finds both ends' processes.
    fn both_pids(c: &mut Connection) {
        c.src_tags.insert("pid".into(), "7".into());
        c.dst_tags.insert("pid".into(), "8".into());
    }

    #[test]
    fn only_the_last_reading_is_remembered() {
        let mut m = Memo::default();
        let name = both_pids;
        let fresh = || vec![conn(1, &[]), conn(2, &[])];
        assert_eq!(tick(&mut m, &mut fresh(), None, name), 2);
        assert_eq!(m.len(), 2);
        assert_eq!(tick(&mut m, &mut fresh(), None, name), 0);
        // The retired connections of a tick are given their tags from the
        // same reading, and change nothing in it.
        let mut retired = vec![conn(2, &[])];
        let p = m.reuse(&mut retired, Some(9));
        assert_eq!(p.todo, 0);
        m.keep(&mut retired, p, Some(9), false);
        assert_eq!(retired[0].dst_tags.get("pid").unwrap(), "8");
        assert_eq!(m.len(), 2);
        // Not listed once: joined afresh.
        tick(&mut m, &mut [], None, name);
        assert_eq!(m.len(), 0);
        assert_eq!(tick(&mut m, &mut fresh(), None, name), 2);
    }

    /// An end named by its process keeps its set while its connection is
    /// joined again (its peer is remote, and a dump came), and is among
    /// the ends a dump leaves alone.
    #[test]
    fn a_named_end_keeps_its_set_while_its_peer_is_judged_again() {
        use flowtable::attrib::Proto;
        let mut m = Memo::default();
        // As the join does: an end with a pid is left as it is.
        let name = |c: &mut Connection| {
            if !named(&c.src_tags) {
                c.src_tags.insert("pid".into(), "7".into());
            }
            c.dst_tags.insert(UNATTRIBUTED.into(), REMOTE.into());
        };
        let mut first = vec![conn(1, &[])];
        tick(&mut m, &mut first, Some(5), name);
        let kept = first[0].src_tags.clone();
        let mut after_dump = vec![conn(1, &[])];
        assert_eq!(tick(&mut m, &mut after_dump, Some(6), name), 1);
        assert!(Tags::same(&after_dump[0].src_tags, &kept));
        assert_eq!(after_dump[0].dst_tags.get(UNATTRIBUTED).unwrap(), REMOTE);
        let ends = |c: &Connection| {
            let (a, b) = ((c.src, c.sport).into(), (c.dst, c.dport).into());
            [Tuple::new(Proto::Tcp, a, b), Tuple::new(Proto::Tcp, b, a)]
        };
        let named = m.named_ends(ends);
        let [src, dst] = ends(&after_dump[0]);
        assert!(named.contains(&src) && !named.contains(&dst));
    }

    /// A tag that came in since (a NAT answer) makes a settled connection
    /// joined again; tags that came in as before do not.
    #[test]
    fn what_came_in_must_still_be_among_the_tags() {
        let mut m = Memo::default();
        let name = both_pids;
        let with = |t: &[(&str, &str)]| vec![conn(1, t)];
        assert_eq!(tick(&mut m, &mut with(&[("vlan", "5")]), None, name), 1);
        assert_eq!(tick(&mut m, &mut with(&[("vlan", "5")]), None, name), 0);
        let nat = [("vlan", "5"), ("nat.ip", "10.0.0.9")];
        assert_eq!(tick(&mut m, &mut with(&nat), None, name), 1);
        let mut again = with(&nat);
        assert_eq!(tick(&mut m, &mut again, None, name), 0);
        assert_eq!(again[0].src_tags.get("nat.ip").unwrap(), "10.0.0.9");
    }
}
