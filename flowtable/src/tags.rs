//! The tags of one end of a connection, shared between readings.
//!
//! A long run lists the same connections tick after tick with the same
//! tags; enrichment keeps what it gave each one (`probe/src/enrich/memo.rs`)
//! and hands the same sets again. So a set is reference-counted: a copy of
//! a reading, a snapshot or a memo costs a pointer, and a set is copied only
//! when one holder changes it (`DerefMut` is `Arc::make_mut`). Read it as a
//! `BTreeMap`; build it from one.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use serde::{Serialize, Serializer};

/// Tag name → value, sorted by name. Empty, it allocates nothing (most
/// ends have no tags before enrichment).
#[derive(Clone, Default)]
pub struct Tags(Option<Arc<BTreeMap<String, String>>>);

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

impl Tags {
    pub fn is_empty(&self) -> bool {
        self.deref().is_empty()
    }

    /// The same set (not only equal): nothing was changed since one was
    /// copied from the other.
    pub fn same(a: &Tags, b: &Tags) -> bool {
        match (&a.0, &b.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => a.is_empty() && b.is_empty(),
        }
    }
}

impl Deref for Tags {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &BTreeMap<String, String> {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl DerefMut for Tags {
    /// Copies the set first when another holder shares it.
    fn deref_mut(&mut self) -> &mut BTreeMap<String, String> {
        Arc::make_mut(self.0.get_or_insert_with(Default::default))
    }
}

impl PartialEq for Tags {
    fn eq(&self, o: &Tags) -> bool {
        **self == **o
    }
}

impl Eq for Tags {}

impl PartialOrd for Tags {
    fn partial_cmp(&self, o: &Tags) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Tags {
    fn cmp(&self, o: &Tags) -> std::cmp::Ordering {
        (**self).cmp(&**o)
    }
}

impl std::hash::Hash for Tags {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h);
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(m: BTreeMap<String, String>) -> Tags {
        Tags((!m.is_empty()).then(|| Arc::new(m)))
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
        self.deref().fmt(f)
    }
}

impl Serialize for Tags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.deref().serialize(s)
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
    }
}
