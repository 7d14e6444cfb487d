//! The recorded sockets, by cookie and by tuple: one record each in a
//! slab, the two indexes holding its position only (4 bytes a slot, where
//! two maps keyed by cookie and by tuple, each with a copy of its key, took
//! 190 bytes a socket; every open connection between two local ends has
//! two).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Arc;

use flowtable::attrib::Owner;
use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;

/// An end by its local port and its peer (protocol number, local port,
/// remote address as the connection renders it, remote port): the join
/// where the tc program did not see the socket. The local address is left
/// out: an unconnected UDP socket's is chosen after the hook.
pub type TupleKey = (u8, u16, IpAddr, u16);

/// A recorded socket: its cookie, its owner, its network namespace's
/// cookie, its local address (unspecified when no record had one) and the
/// tuple it is also known by, once a record gave it.
#[derive(Clone)]
pub struct Sock {
    pub cookie: u64,
    pub owner: Arc<Owner>,
    pub netns_cookie: u64,
    pub local: IpAddr,
    pub tuple: Option<TupleKey>,
}

#[derive(Default)]
pub struct Socks {
    slab: Vec<Option<Sock>>,
    /// Free positions in `slab`.
    free: Vec<u32>,
    by_cookie: HashTable<u32>,
    /// The socket each tuple names (the latest recorded with it).
    by_tuple: HashTable<u32>,
}

/// Slab positions below which [`Socks::compact`] leaves it as it is.
const COMPACT_FROM: usize = 1024;

fn hash<T: std::hash::Hash>(v: &T) -> u64 {
    FxBuildHasher.hash_one(v)
}

impl Socks {
    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    fn at(&self, i: u32) -> &Sock {
        self.slab[i as usize]
            .as_ref()
            .expect("indexed slots hold a socket")
    }

    fn position(&self, cookie: u64) -> Option<u32> {
        let slab = &self.slab;
        self.by_cookie
            .find(hash(&cookie), |&i| {
                slab[i as usize]
                    .as_ref()
                    .is_some_and(|s| s.cookie == cookie)
            })
            .copied()
    }

    pub fn get(&self, cookie: u64) -> Option<&Sock> {
        self.position(cookie).map(|i| self.at(i))
    }

    pub fn contains(&self, cookie: u64) -> bool {
        self.position(cookie).is_some()
    }

    /// The socket `key` names.
    pub fn named(&self, key: &TupleKey) -> Option<&Sock> {
        let slab = &self.slab;
        self.by_tuple
            .find(hash(key), |&i| {
                slab[i as usize]
                    .as_ref()
                    .is_some_and(|s| s.tuple.as_ref() == Some(key))
            })
            .map(|&i| self.at(i))
    }

    /// Remembers `sock`, in place of the socket of its cookie if there is
    /// one (whose tuple it keeps: the tuple that named it still does).
    pub fn insert(&mut self, mut sock: Sock) {
        if let Some(i) = self.position(sock.cookie) {
            let old = self.slab[i as usize].as_mut().expect("indexed");
            sock.tuple = old.tuple;
            *old = sock;
            return;
        }
        let cookie = sock.cookie;
        let i = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(sock);
                i
            }
            None => {
                self.slab.push(Some(sock));
                (self.slab.len() - 1) as u32
            }
        };
        let slab = &self.slab;
        self.by_cookie.insert_unique(hash(&cookie), i, |&j| {
            hash(&slab[j as usize].as_ref().expect("indexed").cookie)
        });
    }

    /// Names socket `cookie` (remembered) by `key` too, with its local
    /// address and namespace as the record giving the tuple says.
    pub fn set_tuple(&mut self, cookie: u64, key: TupleKey, local: IpAddr, netns_cookie: u64) {
        let Some(i) = self.position(cookie) else {
            return;
        };
        self.unindex_tuple(i);
        let s = self.slab[i as usize].as_mut().expect("indexed");
        s.tuple = Some(key);
        s.local = local;
        s.netns_cookie = netns_cookie;
        // A socket named by the same tuple before is not any more.
        let slab = &self.slab;
        let tuple_of = |j: &u32| slab[*j as usize].as_ref().and_then(|s| s.tuple);
        match self.by_tuple.entry(
            hash(&key),
            |j| tuple_of(j) == Some(key),
            |j| hash(&tuple_of(j).expect("indexed")),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = i,
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(i);
            }
        }
    }

    /// Takes socket `i`'s tuple out of the index, if it is the one the
    /// tuple names.
    fn unindex_tuple(&mut self, i: u32) {
        let Some(key) = self.at(i).tuple else { return };
        if let Ok(e) = self.by_tuple.find_entry(hash(&key), |&j| j == i) {
            e.remove();
        }
    }

    /// Gives back the room of forgotten sockets once most of the slab is
    /// free (a burst of sockets recorded, then released or forgotten).
    pub fn compact(&mut self) {
        if self.slab.len() < COMPACT_FROM || self.free.len() * 2 < self.slab.len() {
            return;
        }
        let old = std::mem::take(&mut self.slab);
        let mut moved = vec![u32::MAX; old.len()];
        let mut slab = Vec::with_capacity(self.len());
        for (i, s) in old.into_iter().enumerate() {
            if s.is_some() {
                moved[i] = slab.len() as u32;
                slab.push(s);
            }
        }
        let at = |i: u32| slab[i as usize].as_ref().expect("kept");
        let mut by_cookie = HashTable::with_capacity(slab.len());
        for i in 0..slab.len() as u32 {
            by_cookie.insert_unique(hash(&at(i).cookie), i, |&j| hash(&at(j).cookie));
        }
        // The tuples name the sockets they named.
        let mut by_tuple = HashTable::with_capacity(self.by_tuple.len());
        for &i in self.by_tuple.iter() {
            let i = moved[i as usize];
            let key = at(i).tuple.expect("indexed");
            by_tuple.insert_unique(hash(&key), i, |&j| hash(&at(j).tuple.expect("indexed")));
        }
        self.slab = slab;
        self.free = Vec::new();
        self.by_cookie = by_cookie;
        self.by_tuple = by_tuple;
    }

    /// Forgets socket `cookie`. True when it was remembered.
    pub fn remove(&mut self, cookie: u64) -> bool {
        let Some(i) = self.position(cookie) else {
            return false;
        };
        self.unindex_tuple(i);
        if let Ok(e) = self.by_cookie.find_entry(hash(&cookie), |&j| j == i) {
            e.remove();
        }
        self.slab[i as usize] = None;
        self.free.push(i);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(cookie: u64) -> Sock {
        Sock {
            cookie,
            owner: Arc::new(Owner::new(&Default::default(), None, None)),
            netns_cookie: 1,
            local: IpAddr::from([0, 0, 0, 0]),
            tuple: None,
        }
    }

    const ADDR: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    /// A tuple names the latest socket given it; forgetting the earlier
    /// one leaves the later one named, and positions are reused.
    #[test]
    fn a_tuple_names_its_latest_socket() {
        let mut s = Socks::default();
        let key = (6, 40000, ADDR, 80);
        s.insert(sock(1));
        s.insert(sock(2));
        s.set_tuple(1, key, ADDR, 1);
        assert_eq!(s.named(&key).unwrap().cookie, 1);
        s.set_tuple(2, key, ADDR, 1);
        assert_eq!(s.named(&key).unwrap().cookie, 2);
        assert!(s.remove(1));
        assert_eq!(s.named(&key).unwrap().cookie, 2);
        assert!(!s.remove(1));
        // Known again: its tuple kept.
        s.insert(sock(2));
        assert_eq!(s.get(2).unwrap().tuple, Some(key));
        assert!(s.remove(2));
        assert!(s.named(&key).is_none());
        assert_eq!(s.len(), 0);
        s.insert(sock(3));
        assert_eq!(s.slab.len(), 2, "a free position is used again");
        assert!(s.contains(3) && !s.contains(2));
        // A socket's new tuple: the old one names nothing.
        let other = (6, 40001, ADDR, 80);
        s.set_tuple(3, key, ADDR, 1);
        s.set_tuple(3, other, ADDR, 1);
        assert!(s.named(&key).is_none());
        assert_eq!(s.named(&other).unwrap().cookie, 3);
    }

    /// Once most positions are free the slab shrinks, and every cookie and
    /// tuple still names the socket it named.
    #[test]
    fn compacting_keeps_what_names_what() {
        let mut s = Socks::default();
        let n = 4 * COMPACT_FROM as u64;
        let key = |c: u64| (6, c as u16, ADDR, 80);
        for c in 1..=n {
            s.insert(sock(c));
            s.set_tuple(c, key(c), ADDR, 1);
        }
        // A later socket on socket 5's tuple names it now.
        s.insert(sock(n + 1));
        s.set_tuple(n + 1, key(5), ADDR, 1);
        s.compact();
        assert_eq!(s.slab.len() as u64, n + 1, "nothing free yet");
        for c in (1..=n).filter(|c| c % 4 != 1) {
            assert!(s.remove(c));
        }
        s.compact();
        assert_eq!(s.slab.len(), s.len());
        assert!(s.free.is_empty() && s.slab.capacity() < 2 * s.len());
        for c in (1..=n).filter(|c| c % 4 == 1) {
            assert_eq!(s.get(c).unwrap().cookie, c);
            let named = s.named(&key(c)).unwrap().cookie;
            assert_eq!(named, if c == 5 { n + 1 } else { c });
        }
        assert!(!s.contains(2));
        // Positions are used and freed as before.
        s.insert(sock(n + 2));
        assert!(s.remove(n + 2) && s.remove(1));
        assert!(s.named(&key(1)).is_none());
    }
}
