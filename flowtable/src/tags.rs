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

/// Tag name → value, sorted by name.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tags(Arc<BTreeMap<String, String>>);

impl Tags {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The same set (not only equal): nothing was changed since one was
    /// copied from the other.
    pub fn same(a: &Tags, b: &Tags) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl Deref for Tags {
    type Target = BTreeMap<String, String>;
    fn deref(&self) -> &BTreeMap<String, String> {
        &self.0
    }
}

impl DerefMut for Tags {
    /// Copies the set first when another holder shares it.
    fn deref_mut(&mut self) -> &mut BTreeMap<String, String> {
        Arc::make_mut(&mut self.0)
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(m: BTreeMap<String, String>) -> Tags {
        Tags(Arc::new(m))
    }
}

impl<const N: usize> From<[(String, String); N]> for Tags {
    fn from(pairs: [(String, String); N]) -> Tags {
        pairs.into_iter().collect()
    }
}

impl FromIterator<(String, String)> for Tags {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(it: I) -> Tags {
        Tags(Arc::new(it.into_iter().collect()))
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Tags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
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
