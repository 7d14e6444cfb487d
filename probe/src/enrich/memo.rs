//! What attribution gave each listed connection, kept between ticks.
//!
//! A run lists the same connections at every tick, and an end whose
//! process was found keeps its tags for good. Joining every listed end
//! again each tick was a quarter of the agent's CPU at 1000 connections a
//! second, and made two fresh tag maps per connection per tick. So an end
//! is *settled* once it carries a `pid`, or is `remote` and no socket dump
//! has run since it was found remote (a dump is how a new container's
//! address becomes known as local). A connection whose ends are both
//! settled gets the same tag sets again ([`flowtable::Tags`], shared), as
//! long as what came in (the source's and NAT's tags) is unchanged; every
//! other one is joined afresh, as before.
//!
//! Bounded by the listing: an entry not handed in for [`KEEP_CALLS`] calls
//! is dropped, and a retired connection's entry with it. One entry per
//! 5-tuple and interface: two records listed at once on one (a reused
//! 5-tuple, rare) may both be joined afresh at every tick, as before.

use std::hash::{Hash, Hasher};

use flowtable::attrib::{REMOTE, UNATTRIBUTED};
use flowtable::delta::{key, Key, SAME_RECORD_NS};
use flowtable::{Connection, Tags};
use rustc_hash::FxHashMap;

/// Calls without a connection before its entry goes: `tag` is called for
/// the listed and the retired connections of each tick.
const KEEP_CALLS: u64 = 4;

struct Entry {
    first_seen: u64,
    /// A digest of the tags and sockets the connection came in with.
    input: u64,
    /// The socket dump the remote ends were judged after.
    dump: Option<u64>,
    src: Tags,
    dst: Tags,
    /// The call that last handed it in.
    call: u64,
}

/// The connections of one [`Memo::reuse`] left to join.
#[derive(Default)]
pub struct Pending {
    /// How many, at the front.
    pub todo: usize,
    inputs: Vec<u64>,
    swaps: Vec<(usize, usize)>,
}

#[derive(Default)]
pub struct Memo {
    entries: FxHashMap<Key, Entry>,
    call: u64,
    /// Connections given their memorised tags, and joined afresh.
    pub reused: u64,
    pub joined: u64,
}

fn digest(c: &Connection) -> u64 {
    // SipHash: the digest stands for the tags themselves.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    c.src_tags.hash(&mut h);
    c.dst_tags.hash(&mut h);
    h.finish()
}

/// An end that no later pass, record or dump can name differently.
fn settled(t: &Tags) -> bool {
    t.contains_key("pid") || has_remote(t)
}

fn has_remote(t: &Tags) -> bool {
    t.get(UNATTRIBUTED).is_some_and(|r| r == REMOTE)
}

impl Memo {
    /// Gives each connection of `conns` whose ends were settled its tags
    /// again, and moves the others to the front (in their order), to be
    /// joined (`conns[..p.todo]`), then handed to [`Memo::keep`], which
    /// puts every connection back in its place. `dump` is the resolver's
    /// last socket dump.
    pub fn reuse(&mut self, conns: &mut [Connection], dump: Option<u64>) -> Pending {
        self.call += 1;
        let call = self.call;
        let mut p = Pending::default();
        for i in 0..conns.len() {
            let c = &mut conns[i];
            let input = digest(c);
            if let Some(e) = self.find(c) {
                let fresh = e.dump == dump || !(has_remote(&e.src) || has_remote(&e.dst));
                if e.input == input && fresh {
                    e.call = call;
                    c.src_tags = e.src.clone();
                    c.dst_tags = e.dst.clone();
                    self.reused += 1;
                    continue;
                }
            }
            conns.swap(p.todo, i);
            p.swaps.push((p.todo, i));
            p.inputs.push(input);
            p.todo += 1;
        }
        self.joined += p.todo as u64;
        p
    }

    /// Remembers the tags the joined connections (the front of `conns`
    /// after [`Memo::reuse`]) got, for those whose ends are settled, and
    /// puts `conns` back in order.
    pub fn keep(&mut self, conns: &mut [Connection], p: Pending, dump: Option<u64>) {
        let call = self.call;
        for (c, &input) in conns[..p.todo].iter().zip(&p.inputs) {
            if !(settled(&c.src_tags) && settled(&c.dst_tags)) {
                continue;
            }
            let e = Entry {
                first_seen: c.first_seen,
                input,
                dump,
                src: c.src_tags.clone(),
                dst: c.dst_tags.clone(),
                call,
            };
            self.entries.insert(key(c), e);
        }
        self.entries.retain(|_, e| call - e.call < KEEP_CALLS);
        for &(a, b) in p.swaps.iter().rev() {
            conns.swap(a, b);
        }
    }

    /// Forgets connections listed for the last time.
    pub fn forget(&mut self, retired: &[Connection]) {
        for c in retired {
            if self.find(c).is_some() {
                self.entries.remove(&key(c));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    fn find(&mut self, c: &Connection) -> Option<&mut Entry> {
        self.entries
            .get_mut(&key(c))
            .filter(|e| e.first_seen.abs_diff(c.first_seen) < SAME_RECORD_NS)
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
            proto: "tcp",
            src: [10, 0, 0, 1].into(),
            sport,
            dst: [10, 0, 0, 2].into(),
            dport: 80,
            iface: 2,
            first_seen: 1_000_000_000,
            last_seen: 0,
            sent: DirStats::default(),
            received: DirStats::default(),
            rtt: None,
            src_tags: tags(src),
            dst_tags: Tags::default(),
        }
    }

    /// One tick: reuse, then "join" the rest by `join`, then keep.
    fn tick(
        m: &mut Memo,
        conns: &mut [Connection],
        dump: Option<u64>,
        join: impl Fn(&mut Connection),
    ) -> usize {
        let p = m.reuse(conns, dump);
        let n = p.todo;
        conns[..n].iter_mut().for_each(join);
        m.keep(conns, p, dump);
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

    #[test]
    fn entries_go_with_the_listing() {
        let mut m = Memo::default();
        let name = |c: &mut Connection| {
            c.src_tags.insert("pid".into(), "7".into());
            c.dst_tags.insert("pid".into(), "8".into());
        };
        let mut conns = vec![conn(1, &[]), conn(2, &[])];
        tick(&mut m, &mut conns, None, name);
        assert_eq!(m.len(), 2);
        m.forget(&conns[..1]);
        assert_eq!(m.len(), 1);
        for _ in 0..KEEP_CALLS {
            tick(&mut m, &mut [], None, name);
        }
        assert_eq!(m.len(), 0, "not listed any more");
    }
}
