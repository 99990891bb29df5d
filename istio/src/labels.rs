//! String maps for labels, annotations and selectors: a sorted vector instead of a `BTreeMap`.
//!
//! Why: a control plane holds one WorkloadEntry per VM, each with two small maps. A
//! `BTreeMap<String, String>` allocates a full 11-slot node (about 540 bytes) even for one
//! label; a sorted `Vec` holds exactly what it has. Lookups stay logarithmic, and the JSON form
//! is the same object (keys sorted).

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Labels(Vec<(String, String)>);

type Pair = (String, String);

fn as_refs(p: &Pair) -> (&String, &String) {
    (&p.0, &p.1)
}

pub type Iter<'a> =
    std::iter::Map<std::slice::Iter<'a, Pair>, fn(&'a Pair) -> (&'a String, &'a String)>;

impl Labels {
    pub fn new() -> Self {
        Labels(Vec::new())
    }

    fn find(&self, k: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(key, _)| key.as_str().cmp(k))
    }

    pub fn get(&self, k: &str) -> Option<&String> {
        self.find(k)
            .ok()
            .and_then(|i| self.0.get(i))
            .map(|(_, v)| v)
    }

    pub fn contains_key(&self, k: &str) -> bool {
        self.find(k).is_ok()
    }

    /// Sets `k`; returns the value it replaced.
    pub fn insert(&mut self, k: String, v: String) -> Option<String> {
        match self.find(&k) {
            Ok(i) => self
                .0
                .get_mut(i)
                .map(|slot| std::mem::replace(&mut slot.1, v)),
            Err(i) => {
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    pub fn remove(&mut self, k: &str) -> Option<String> {
        self.find(k).ok().map(|i| self.0.remove(i).1)
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Pairs in key order.
    pub fn iter(&self) -> Iter<'_> {
        self.0
            .iter()
            .map(as_refs as fn(&Pair) -> (&String, &String))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Extend<Pair> for Labels {
    fn extend<I: IntoIterator<Item = Pair>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl FromIterator<Pair> for Labels {
    fn from_iter<I: IntoIterator<Item = Pair>>(iter: I) -> Self {
        let mut l = Labels::new();
        l.extend(iter);
        l.0.shrink_to_fit();
        l
    }
}

impl<const N: usize> From<[Pair; N]> for Labels {
    fn from(a: [Pair; N]) -> Self {
        a.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl Serialize for Labels {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Labels;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Labels, A::Error> {
                let mut l = Labels(Vec::with_capacity(a.size_hint().unwrap_or(0).min(64)));
                while let Some((k, v)) = a.next_entry::<String, String>()? {
                    l.insert(k, v);
                }
                l.0.shrink_to_fit();
                Ok(l)
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut l = Labels::new();
        assert_eq!(l.insert("b".into(), "2".into()), None);
        assert_eq!(l.insert("a".into(), "1".into()), None);
        assert_eq!(l.insert("b".into(), "3".into()), Some("2".into()));
        assert_eq!(l.get("b").map(String::as_str), Some("3"));
        assert!(l.contains_key("a") && !l.contains_key("c"));
        assert_eq!(l.keys().map(String::as_str).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(l.remove("a"), Some("1".into()));
        assert_eq!(l.len(), 1);
        let json = serde_json::to_string(&Labels::from([
            ("z".to_string(), "1".to_string()),
            ("y".to_string(), "2".to_string()),
        ]))
        .unwrap();
        assert_eq!(json, r#"{"y":"2","z":"1"}"#);
        let back: Labels = serde_json::from_str(r#"{"z":"1","y":"2","z":"3"}"#).unwrap();
        assert_eq!(
            back.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            ["y=2", "z=3"]
        );
        assert!(serde_json::from_str::<Labels>(r#"{"a":1}"#).is_err());
    }
}
