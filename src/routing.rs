//! Routing domain: the names, addresses and documents that the control plane turns into an
//! immutable [`RoutingTable`], and that the data plane reads. Nothing here does I/O.

pub mod build;
pub mod documents;
pub mod index;
pub mod key_versions;
pub mod rate_limit;
pub mod store;
pub mod table;
pub mod tags;

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
    /// A Dubbo provider URL (README: "Dubbo").
    Dubbo,
}

/// The protocol an instance serves, when its registry states one: which listeners may route to
/// it, and how the proxy speaks to it. An instance that states none is taken to serve whatever
/// the listener speaks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceProtocol {
    /// HTTP/1.1 (Dubbo `rest://`, `http://`).
    Http1,
    /// HTTP/2 with prior knowledge (Dubbo `tri://`, gRPC): HTTP listeners forward to these over
    /// shared HTTP/2 connections.
    H2,
    /// Opaque bytes (Dubbo's binary `dubbo://`): TCP listeners only.
    Tcp,
}

impl InstanceProtocol {
    /// The protocol named by a policy's `protocol` or a Curator instance's metadata `protocol`:
    /// `http1`, `h2`, or `grpc` (HTTP/2 too).
    pub fn parse_upstream(name: &str) -> Option<InstanceProtocol> {
        match name {
            "http1" => Some(InstanceProtocol::Http1),
            "h2" | "grpc" => Some(InstanceProtocol::H2),
            _ => None,
        }
    }

    /// Whether a listener speaking `listener` may send to an instance serving `protocol`.
    pub fn serves(protocol: Option<InstanceProtocol>, listener: table::Protocol) -> bool {
        matches!(
            (protocol, listener),
            (None, _)
                | (Some(InstanceProtocol::Tcp), table::Protocol::Tcp)
                | (Some(InstanceProtocol::Http1 | InstanceProtocol::H2), table::Protocol::Http)
        )
    }
}

/// A weight ramp after an instance starts (Dubbo's warm-up): from 1 to the full weight over
/// `period_ms`, counted from `start_ms` (the instance's own clock, milliseconds since the epoch).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Warmup {
    pub start_ms: i64,
    pub period_ms: i64,
}

impl Warmup {
    /// The weight at `now_ms`, as Dubbo's load balancer computes it: with `uptime` the time since
    /// the start, a weight `w` counts as `uptime / (period / w)` (in single-precision floating
    /// point, cut to an integer, at least 1 and at most `w`) while `uptime` is strictly between
    /// zero and the period; as 1 before the start (a clock ahead of this one); in full after.
    pub fn weight_at(&self, weight: u32, now_ms: i64) -> u32 {
        if weight == 0 {
            return 0;
        }
        let uptime = now_ms.saturating_sub(self.start_ms);
        if uptime < 0 {
            return 1;
        }
        if uptime == 0 || uptime >= self.period_ms {
            return weight;
        }
        let ramped = (uptime as f32 / (self.period_ms as f32 / weight as f32)) as u32;
        ramped.clamp(1, weight)
    }

    /// Whether the ramp still changes the weight at `now_ms` or later.
    pub fn ramping(&self, now_ms: i64) -> bool {
        now_ms < self.start_ms.saturating_add(self.period_ms)
    }
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
    /// The protocol the registry says the instance serves, if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<InstanceProtocol>,
    /// A weight ramp after the instance started, if the registry asks for one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<Warmup>,
    /// Dubbo tag routing: the instance's tags and its application's tag rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<Box<tags::InstanceTags>>,
    /// The port for TLS (Curator's `sslPort`), when the registry gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_port: Option<u16>,
}

impl Instance {
    /// An instance at `addr` with every routing attribute at its default.
    pub fn at(format: Format, addr: Addr) -> Instance {
        Instance {
            format,
            addr,
            named: BTreeMap::new(),
            weight: DEFAULT_WEIGHT,
            zone: None,
            metadata: Labels::default(),
            enabled: true,
            protocol: None,
            warmup: None,
            tags: None,
            ssl_port: None,
        }
    }

    /// The weight at `now_ms` (milliseconds since the epoch): the registered weight, ramped while
    /// the instance warms up.
    pub fn weight_at(&self, now_ms: i64) -> u32 {
        match &self.warmup {
            Some(w) => w.weight_at(self.weight, now_ms),
            None => self.weight,
        }
    }
}

/// Milliseconds since the epoch, for warm-up ramps.
pub fn epoch_ms(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
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
    /// Dubbo governance: configurators and tag rules (README: "Dubbo").
    DubboConfig,
}

impl NodeKind {
    pub const ALL: [NodeKind; 4] = [NodeKind::Instance, NodeKind::Rule, NodeKind::Policy, NodeKind::DubboConfig];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Instance => "instance",
            NodeKind::Rule => "rule",
            NodeKind::Policy => "policy",
            NodeKind::DubboConfig => "dubbo_config",
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

    #[test]
    fn warm_up_ramps_as_dubbo_computes_it() {
        // Ten minutes, weight 100: one unit of weight per six seconds of uptime.
        let w = Warmup { start_ms: 1_000_000, period_ms: 600_000 };
        let at = |uptime: i64| w.weight_at(100, 1_000_000 + uptime);
        assert_eq!(at(-5), 1, "a start in the future counts as weight 1");
        assert_eq!(at(0), 100, "Dubbo ramps only for an uptime above zero");
        assert_eq!(at(1), 1, "at least 1");
        assert_eq!(at(5_999), 1);
        assert_eq!(at(6_000), 1);
        assert_eq!(at(12_000), 2);
        assert_eq!(at(150_000), 25);
        assert_eq!(at(599_999), 99);
        assert_eq!(at(600_000), 100);
        assert_eq!(w.weight_at(0, 1_000_100), 0, "weight 0 stays 0");
        assert!(w.ramping(1_599_999) && !w.ramping(1_600_000));
        // Single precision, as Dubbo's float division: 7 of weight 3 over 10 s.
        assert_eq!(Warmup { start_ms: 0, period_ms: 10_000 }.weight_at(3, 7_000), 2);
    }

    #[test]
    fn protocols_decide_which_listeners_route_to_an_instance() {
        use table::Protocol::{Http, Tcp};
        for (p, http, tcp) in [
            (None, true, true),
            (Some(InstanceProtocol::Http1), true, false),
            (Some(InstanceProtocol::H2), true, false),
            (Some(InstanceProtocol::Tcp), false, true),
        ] {
            assert_eq!((InstanceProtocol::serves(p, Http), InstanceProtocol::serves(p, Tcp)), (http, tcp), "{p:?}");
        }
    }
}
