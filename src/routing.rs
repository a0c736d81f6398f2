//! Routing domain: the names, addresses and documents that the control plane turns into an
//! immutable [`RoutingTable`], and that the data plane reads. Nothing here does I/O.

pub mod build;
pub mod documents;
pub mod index;
pub mod key_versions;
pub mod store;
pub mod table;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use build::{Builder, Change, RawNode, Resync};
pub use documents::{Backend, LbPolicy, Policy, Rule};
pub use store::{RouteReader, RouteWriter};
pub use table::RoutingTable;

// The vocabulary shared with endpoint state lives in a leaf module; re-exported here, where the
// rest of the domain is.
pub use crate::names::{Addr, AddrError, EndpointKey, Host, ServiceName, parse_port, port_from_i64};

/// Which registry format an instance node was written in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Curator,
    Serverset,
    Nerve,
    Plain,
}

/// Instance weight when a document gives none.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest accepted instance or backend weight.
pub const MAX_WEIGHT: u32 = 10_000;

/// One service instance, parsed from a naming node.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Instance {
    pub format: Format,
    pub addr: Addr,
    /// ServerSet `additionalEndpoints`, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub named: BTreeMap<String, Addr>,
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    pub metadata: Labels,
    /// False when the registry marks the instance as not taking traffic (Curator
    /// `enabled: false`, ServerSet status other than ALIVE): it drains.
    pub enabled: bool,
}

/// A small string map (instance metadata), one sorted boxed slice: a fraction of a `BTreeMap`'s
/// size for the few entries an instance carries, which matters at a hundred thousand instances.
#[derive(Clone, PartialEq, Eq, Default, Debug)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok().map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Labels {
    /// Later entries win over earlier ones with the same key.
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Labels(map.into_iter().map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str())).collect())
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, String>::deserialize(d)?.into_iter().collect())
    }
}

/// Where a document came from, shown in `/config`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Origin {
    pub source: SourceKind,
    /// ZooKeeper path (relative to the chroot) or `file#key`; shared, not copied, by tables.
    pub path: Arc<str>,
    /// The zxid of the last change to the node, as read (ZooKeeper only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mzxid: Option<i64>,
    /// The node's data version (ZooKeeper only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
}

/// The kind of source a document or a table came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Zookeeper,
    File,
    Snapshot,
    /// Nothing to route (no listeners): nothing is read.
    None,
}

impl fmt::Display for SourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceKind::Zookeeper => "zookeeper",
            SourceKind::File => "file",
            SourceKind::Snapshot => "snapshot",
            SourceKind::None => "none",
        })
    }
}

/// The kind of node, as used in the `zkroute_invalid_nodes{kind}` metric.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    Instance,
    Rule,
    Policy,
}

impl NodeKind {
    pub const ALL: [NodeKind; 3] = [NodeKind::Instance, NodeKind::Rule, NodeKind::Policy];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Instance => "instance",
            NodeKind::Rule => "rule",
            NodeKind::Policy => "policy",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_a_sorted_map() {
        let l: Labels =
            [("b".to_owned(), "2".to_owned()), ("a".to_owned(), "1".to_owned()), ("b".to_owned(), "3".to_owned())]
                .into_iter()
                .collect();
        assert_eq!(l.len(), 2);
        assert_eq!((l.get("a"), l.get("b"), l.get("c")), (Some("1"), Some("3"), None));
        assert_eq!(serde_json::to_string(&l).unwrap(), r#"{"a":"1","b":"3"}"#);
        assert_eq!(serde_json::from_str::<Labels>(r#"{"b":"3","a":"1"}"#).unwrap(), l);
    }
}
