//! The tags of one end of a connection, shared between readings and
//! between the connections of one process.
//!
//! A long run lists the same connections tick after tick with the same
//! tags, and every socket of a process carries the same process, container
//! and service tags. So the set is reference-counted: a copy of a reading,
//! a snapshot or enrichment's memo (`probe/src/enrich/memo.rs`) costs a
//! pointer, the ends of one process can share one set, and a set is copied
//! only when one holder changes it (`DerefMut` is `Arc::make_mut`). What
//! names one socket (its cookie and cgroup id, the only tags most ends have
//! before enrichment) is kept beside the set, not in it ([`Socket`]), and
//! shown as the `socket_cookie` and `cgroup_id` tags ([`Tags::value`],
//! serialisation). Read the set as a `BTreeMap`; build it from one.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

/// The tag names a [`Socket`] is shown as.
pub const SOCKET_COOKIE: &str = "socket_cookie";
pub const CGROUP_ID: &str = "cgroup_id";

/// The local socket the tc program saw sending from an end (zero: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Socket {
    /// `bpf_get_socket_cookie`: unique for the life of the system.
    pub cookie: u64,
    /// The socket's cgroup v2 id.
    pub cgroup: u64,
}

/// Tag name → value, sorted by name, and the end's socket. Empty, it
/// allocates nothing.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tags {
    set: Option<Arc<BTreeMap<String, String>>>,
    socket: Socket,
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

impl Tags {
    /// No tag at all, the socket's included.
    pub fn is_empty(&self) -> bool {
        self.deref().is_empty() && self.socket.cookie == 0
    }

    pub fn socket(&self) -> Socket {
        self.socket
    }

    pub fn with_socket(mut self, socket: Socket) -> Tags {
        self.socket = socket;
        self
    }

    /// The same set (not only equal) and socket: nothing was changed since
    /// one was copied from the other.
    pub fn same(a: &Tags, b: &Tags) -> bool {
        a.socket == b.socket
            && match (&a.set, &b.set) {
                (Some(x), Some(y)) => Arc::ptr_eq(x, y),
                _ => a.deref().is_empty() && b.deref().is_empty(),
            }
    }

    /// Adds every tag of `shared` (an owner's set, kept for many ends):
    /// into an empty set by sharing it, else by copying.
    pub fn add_shared(&mut self, shared: &Tags) {
        if self.set.as_ref().is_none_or(|s| s.is_empty()) {
            self.set = shared.set.clone();
        } else {
            self.extend(shared.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }

    /// Takes `shared`'s set instead of its own, keeping its socket.
    pub fn replace_set(&mut self, shared: &Tags) {
        self.set = shared.set.clone();
    }

    /// The value of tag `key`, the socket's included.
    pub fn value(&self, key: &str) -> Option<Cow<'_, str>> {
        match key {
            SOCKET_COOKIE if self.socket.cookie != 0 => {
                Some(Cow::Owned(self.socket.cookie.to_string()))
            }
            CGROUP_ID if self.socket.cookie != 0 => {
                Some(Cow::Owned(self.socket.cgroup.to_string()))
            }
            _ => self.get(key).map(|v| Cow::Borrowed(v.as_str())),
        }
    }
}

/// Tag sets made once and handed to every end they fit: the ends of one
/// process, or of one reason not to be attributed, share one set.
///
/// Bounded: beyond [`Interner::MAX`] sets, those no end holds any more are
/// let go (a set still held is only not shared with later ends).
#[derive(Default)]
pub struct Interner {
    sets: std::collections::HashSet<Tags>,
    /// Sets let go for room.
    pub let_go: u64,
}

impl Interner {
    pub const MAX: usize = 4096;

    /// The set equal to `m`, shared.
    pub fn intern(&mut self, m: BTreeMap<String, String>) -> Tags {
        let t = Tags::from(m);
        if let Some(known) = self.sets.get(&t) {
            return known.clone();
        }
        if self.sets.len() >= Self::MAX {
            let before = self.sets.len();
            self.sets
                .retain(|s| s.set.as_ref().is_some_and(|a| Arc::strong_count(a) > 1));
            if self.sets.len() >= Self::MAX {
                self.sets.clear();
            }
            self.let_go += (before - self.sets.len()) as u64;
        }
        self.sets.insert(t.clone());
        t
    }

    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }
}

impl Deref for Tags {
    type Target = BTreeMap<String, String>;
    /// The set, without the socket's tags.
    fn deref(&self) -> &BTreeMap<String, String> {
        self.set.as_deref().unwrap_or(&EMPTY)
    }
}

impl DerefMut for Tags {
    /// Copies the set first when another holder shares it.
    fn deref_mut(&mut self) -> &mut BTreeMap<String, String> {
        Arc::make_mut(self.set.get_or_insert_with(Default::default))
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(m: BTreeMap<String, String>) -> Tags {
        Tags {
            set: (!m.is_empty()).then(|| Arc::new(m)),
            socket: Socket::default(),
        }
    }
}

impl<const N: usize> From<[(String, String); N]> for Tags {
    fn from(pairs: [(String, String); N]) -> Tags {
        pairs.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Tags {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Tags {
        it.into_iter().collect::<BTreeMap<_, _>>().into()
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.deref().iter()
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.all()).finish()
    }
}

impl Tags {
    /// Every tag, the socket's included, sorted by name.
    fn all(&self) -> Vec<(&str, Cow<'_, str>)> {
        let mut all: Vec<(&str, Cow<'_, str>)> = self
            .iter()
            .map(|(k, v)| (k.as_str(), Cow::Borrowed(v.as_str())))
            .collect();
        if self.socket.cookie != 0 {
            for k in [SOCKET_COOKIE, CGROUP_ID] {
                if !self.contains_key(k) {
                    let v = self.value(k).unwrap_or_default();
                    let at = all.partition_point(|(x, _)| *x < k);
                    all.insert(at, (k, v));
                }
            }
        }
        all
    }
}

impl Serialize for Tags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let all = self.all();
        let mut m = s.serialize_map(Some(all.len()))?;
        for (k, v) in all {
            m.serialize_entry(k, &v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_shares_the_set_until_one_side_changes_it() {
        let a: Tags = [("pid".to_owned(), "1".to_owned())].into_iter().collect();
        let mut b = a.clone();
        assert!(Tags::same(&a, &b));
        assert_eq!(b.get("pid").map(String::as_str), Some("1"));
        b.insert("process".to_owned(), "curl".to_owned());
        assert!(!Tags::same(&a, &b));
        assert_eq!((a.len(), b.len()), (1, 2));
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"pid":"1","process":"curl"}"#
        );
        let mut none = Tags::default();
        assert!(none.is_empty() && Tags::same(&none, &Tags::default()));
        none.insert("pid".to_owned(), "1".to_owned());
        assert_eq!(none, a);
    }

    #[test]
    fn equal_sets_are_one_and_unheld_ones_go_when_full() {
        let mut i = Interner::default();
        let m = |v: usize| BTreeMap::from([("pid".to_owned(), v.to_string())]);
        let a = i.intern(m(1));
        assert!(Tags::same(&a, &i.intern(m(1))));
        let held: Vec<Tags> = (2..Interner::MAX + 1).map(|v| i.intern(m(v))).collect();
        assert_eq!(i.len(), Interner::MAX);
        drop(held);
        i.intern(m(0));
        assert_eq!(i.len(), 2, "only `a` was still held, and the new one");
        assert_eq!(i.let_go, Interner::MAX as u64 - 1);
        assert!(Tags::same(&a, &i.intern(m(1))));
    }

    #[test]
    fn the_socket_shows_as_two_tags_in_their_place() {
        let socket = Socket {
            cookie: 77,
            cgroup: 5,
        };
        let mut t = Tags::default().with_socket(socket);
        assert!(!t.is_empty());
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"cgroup_id":"5","socket_cookie":"77"}"#
        );
        let owner: Tags = [
            ("pid".to_owned(), "1".to_owned()),
            ("container".to_owned(), "c1".to_owned()),
        ]
        .into();
        t.add_shared(&owner);
        assert!(
            Tags::same(&t, &owner.clone().with_socket(socket)),
            "shared, not copied"
        );
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"cgroup_id":"5","container":"c1","pid":"1","socket_cookie":"77"}"#
        );
        assert_eq!(t.value("socket_cookie").as_deref(), Some("77"));
        assert_eq!(t.value("pid").as_deref(), Some("1"));
        assert_eq!(t.get("socket_cookie"), None, "not in the set");
    }
}
