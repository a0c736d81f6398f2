//! The immutable routing table and its lookups. Everything a request needs is resolved when the
//! table is built: matchers compiled, hosts indexed, endpoint sets filtered by subset and health,
//! weights accumulated, hash rings laid out. A lookup parses nothing and allocates nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::Method;
use serde::Serialize;

use super::documents::{Backend, HeaderLookup, HealthCheck, LbPolicy, Outlier, Rule};
use super::index::RouteIndex;
use super::{Addr, Instance, NodeKind, Origin, ServiceName, SourceKind};
use crate::endpoint::EndpointState;

/// Index of a listener in the local configuration's listener list.
pub type ListenerId = usize;

/// What a listener speaks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    Http,
    Tcp,
}

/// A routing table: one consistent view of services, rules and policies, published whole.
pub struct RoutingTable {
    pub version: u64,
    pub built_at: SystemTime,
    pub source: SourceKind,
    /// Routes per local listener, indexed by [`ListenerId`].
    pub listeners: Box<[ListenerRoutes]>,
    pub services: ServiceMap,
    /// Every rule node seen, in force or not, for `/config`.
    pub rules: Arc<BTreeMap<Arc<str>, RuleStatus>>,
    /// Nodes skipped because they did not parse or validate.
    pub invalid: Arc<[InvalidNode]>,
}

impl RoutingTable {
    pub fn listener(&self, id: ListenerId) -> Option<&ListenerRoutes> {
        self.listeners.get(id)
    }

    pub fn listener_by_name(&self, name: &str) -> Option<&ListenerRoutes> {
        self.listeners.iter().find(|l| &*l.name == name)
    }

    pub fn service(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(name)
    }

    pub fn invalid_count(&self, kind: NodeKind) -> usize {
        self.invalid.iter().filter(|n| n.kind == kind).count()
    }
}

/// Shards of the service map: a change to one service copies one shard of a few dozen entries,
/// and every other shard is shared with the previous table.
const SHARDS: usize = 256;

type Shard = BTreeMap<ServiceName, Arc<ServiceEntry>>;

fn shard_of(name: &str) -> usize {
    (hash_bytes(name.as_bytes()) as usize) & (SHARDS - 1)
}

/// Services by name, shared between tables shard by shard.
#[derive(Clone)]
pub struct ServiceMap {
    shards: Arc<[Arc<Shard>]>,
    len: usize,
}

impl Default for ServiceMap {
    fn default() -> Self {
        ServiceMapBuilder::default().freeze()
    }
}

impl<'a> IntoIterator for &'a ServiceMap {
    type Item = (&'a ServiceName, &'a Arc<ServiceEntry>);
    type IntoIter = Box<dyn Iterator<Item = Self::Item> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl ServiceMap {
    pub fn get(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.shards[shard_of(name)].get(name)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every service, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, &Arc<ServiceEntry>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.iter().map(|(_, v)| v)
    }

    /// Every service, by name.
    pub fn sorted(&self) -> Vec<(&ServiceName, &Arc<ServiceEntry>)> {
        let mut all: Vec<_> = self.iter().collect();
        all.sort_unstable_by(|a, b| a.0.cmp(b.0));
        all
    }
}

/// The builder's side of a [`ServiceMap`]: changed in place, frozen into tables.
#[derive(Clone)]
pub struct ServiceMapBuilder {
    shards: Vec<Arc<Shard>>,
    len: usize,
}

impl Default for ServiceMapBuilder {
    fn default() -> Self {
        ServiceMapBuilder { shards: (0..SHARDS).map(|_| Arc::default()).collect(), len: 0 }
    }
}

impl ServiceMapBuilder {
    pub fn get(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        self.shards[shard_of(name)].get(name)
    }

    pub fn insert(&mut self, name: ServiceName, entry: Arc<ServiceEntry>) {
        if Arc::make_mut(&mut self.shards[shard_of(name.as_str())]).insert(name, entry).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Arc<ServiceEntry>> {
        let shard = &mut self.shards[shard_of(name)];
        if !shard.contains_key(name) {
            return None;
        }
        let removed = Arc::make_mut(shard).remove(name);
        self.len -= usize::from(removed.is_some());
        removed
    }

    pub fn keys(&self) -> impl Iterator<Item = &ServiceName> {
        self.shards.iter().flat_map(|s| s.keys())
    }

    /// The map as a table holds it; shares every shard.
    pub fn freeze(&self) -> ServiceMap {
        ServiceMap { shards: self.shards.iter().cloned().collect(), len: self.len }
    }
}

/// A rule node's state: the version in force (if any) and the reason its latest version was
/// refused (if it was).
#[derive(Clone, Debug)]
pub struct RuleStatus {
    pub active: Option<(Arc<Rule>, Origin)>,
    pub rejected: Option<Rejected>,
}

/// A node version that was refused.
#[derive(Clone, Debug, Serialize)]
pub struct Rejected {
    pub origin: Origin,
    pub reason: String,
}

/// A node skipped from the table, for `/config` and the `zkroute_invalid_nodes` gauge.
#[derive(Clone, Debug, Serialize)]
pub struct InvalidNode {
    pub kind: NodeKind,
    pub path: String,
    pub reason: String,
    /// True for a rule or policy whose previous version stays in force.
    pub previous_in_force: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mzxid: Option<i64>,
}

/// Service policy after the local defaults have been applied.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    pub panic_threshold_percent: u32,
    pub protect_from_empty: bool,
    /// TLS to the instances (policy key `tls`); None: plain TCP.
    pub tls: Option<super::documents::TlsPolicy>,
    /// Limits of the service's circuit breaker, if it has one.
    pub circuit_breaker: Option<crate::endpoint::breaker::BreakerLimits>,
    /// The service's retry budget, if it has one.
    pub retry_budget: Option<crate::endpoint::breaker::BudgetLimits>,
    /// The upstream protocol of instances that state none (None: HTTP/1.1).
    pub protocol: Option<super::InstanceProtocol>,
    /// This host's zone (`proxy.zone`) when zone-aware routing is on for the service; None: off.
    pub zone: Option<Arc<str>>,
    /// The healthy share of the local zone below which requests spill over to other zones.
    pub zone_min_healthy_percent: u32,
}

impl ServicePolicy {
    /// Whether an endpoint that active checks have not judged yet takes traffic.
    pub fn unknown_is_healthy(&self) -> bool {
        self.health_check.as_ref().is_none_or(|hc| hc.initially_healthy)
    }
}

/// One service as the table sees it.
pub struct ServiceEntry {
    pub name: ServiceName,
    pub policy: Arc<ServicePolicy>,
    pub policy_origin: Option<Origin>,
    /// The policy document in force, if the service has one.
    pub policy_doc: Option<Arc<super::documents::Policy>>,
    /// Instances by node id.
    pub instances: Box<[InstanceEntry]>,
    /// True when the registry shows no instances and `protect_from_empty` kept the last ones.
    pub protected: bool,
    /// Every instance's main endpoint.
    pub all: Arc<EndpointSet>,
    /// What HTTP and TCP routes to the whole service send to, when they differ from `all`:
    /// instances state protocols (HTTP listeners take the HTTP ones, TCP listeners the TCP-only
    /// ones), or Dubbo tags split the service.
    pub routed: Option<Box<[Arc<EndpointSet>; 2]>>,
}

impl ServiceEntry {
    /// Whether instances state protocols or tags, so that routes see more than `all`.
    pub fn is_split(&self) -> bool {
        self.routed.is_some()
    }

    /// The set a route of a `listener` listener to the whole service sends to.
    pub fn routed(&self, listener: Protocol) -> &Arc<EndpointSet> {
        match (&self.routed, listener) {
            (None, _) => &self.all,
            (Some(sets), Protocol::Http) => &sets[0],
            (Some(sets), Protocol::Tcp) => &sets[1],
        }
    }
}

/// An instance node in the table.
#[derive(Clone)]
pub struct InstanceEntry {
    pub id: Arc<str>,
    pub instance: Arc<Instance>,
    pub origin: Origin,
    pub state: Arc<EndpointState>,
}

/// One backend endpoint in a set.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: Addr,
    pub weight: u32,
    /// The registry marks it as not taking new traffic.
    pub draining: bool,
    /// What it serves: what its registry says, else its service policy's `protocol` (None:
    /// whatever the listener speaks). HTTP listeners speak HTTP/2 to `H2` endpoints and
    /// HTTP/1.1 to the others.
    pub protocol: Option<super::InstanceProtocol>,
    pub state: Arc<EndpointState>,
    /// The port to use when the service's policy turns TLS on (Curator's `sslPort`); None: the
    /// address's own.
    pub tls_port: Option<u16>,
    /// Where the endpoint is against this host's zone (`proxy.zone`).
    pub zone: ZoneMatch,
}

/// Where an endpoint is against this host's zone.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum ZoneMatch {
    /// `proxy.zone` is not set.
    #[default]
    Unset,
    /// In this host's zone.
    Local,
    /// In another zone, or in none: requests to it count as cross-zone.
    Other,
}

impl ZoneMatch {
    /// How an instance in `zone` stands against this host's `local` zone.
    pub fn of(local: Option<&str>, zone: Option<&str>) -> ZoneMatch {
        match local {
            None => ZoneMatch::Unset,
            Some(l) if zone == Some(l) => ZoneMatch::Local,
            Some(_) => ZoneMatch::Other,
        }
    }
}

/// Requests are split between zones in parts per [`ZONE_SCALE`].
pub const ZONE_SCALE: u32 = 10_000;

/// Zone-aware routing of a set (README: "Zone-aware routing"), computed when the table is built
/// (health changes rebuild it): the local zone's available endpoints take `local_share` of the
/// requests, the available endpoints elsewhere the rest.
#[derive(Debug)]
pub struct ZoneSplit {
    pub local: WeightedList,
    pub remote: WeightedList,
    /// Parts per [`ZONE_SCALE`] that stay in the local zone.
    pub local_share: u32,
    /// The local zone's endpoints that are available, and all that are not draining.
    pub local_healthy: usize,
    pub local_total: usize,
}

impl ZoneSplit {
    /// The split of `endpoints` (of which `available` are usable, `everyone` not draining) when
    /// zone-aware routing is on with threshold `min_healthy_percent`; None when no endpoint is
    /// in the local zone (routing then ignores zones).
    ///
    /// The rule, Envoy's locality failover: with `h` the local zone's healthy share and `t` the
    /// threshold, `min(1, h / t)` of the requests stay local and the rest go elsewhere, so at
    /// 50% healthy and a 70% threshold (70 - 50) / 70 = 2/7 leave the zone. All stay local when
    /// nothing elsewhere is available; all leave when nothing local is.
    pub fn new(
        endpoints: &[Endpoint],
        available: &WeightedList,
        everyone: &WeightedList,
        min_healthy_percent: u32,
    ) -> Option<ZoneSplit> {
        let is_local = |i: usize| endpoints[i].zone == ZoneMatch::Local;
        let count = |list: &WeightedList| (0..list.len()).filter_map(|n| list.nth(n)).filter(|&i| is_local(i)).count();
        let local_total = count(everyone);
        if local_total == 0 {
            return None;
        }
        let local_healthy = count(available);
        let (local, remote) = (available.sub(endpoints, is_local), available.sub(endpoints, |i| !is_local(i)));
        let local_share = if remote.is_empty() {
            ZONE_SCALE
        } else if local.is_empty() {
            0
        } else if min_healthy_percent == 0 {
            ZONE_SCALE
        } else {
            // h / t with h = healthy / total: healthy * 100 / (total * t), in parts per scale.
            let share = (local_healthy as u64) * 100 * u64::from(ZONE_SCALE)
                / ((local_total as u64) * u64::from(min_healthy_percent));
            share.min(u64::from(ZONE_SCALE)) as u32
        };
        Some(ZoneSplit { local, remote, local_share, local_healthy, local_total })
    }

    /// The list this request draws from.
    #[inline]
    pub fn draw(&self) -> &WeightedList {
        if self.local_share >= ZONE_SCALE || fastrand::u32(0..ZONE_SCALE) < self.local_share {
            &self.local
        } else {
            &self.remote
        }
    }
}

/// Weighted choice over some of a set's endpoints: cumulative weights, searched in O(log n).
#[derive(Default, Debug)]
pub struct WeightedList {
    indices: Box<[u32]>,
    cumulative: Box<[u64]>,
    /// Round-robin stride: coprime with the total weight, about 0.618 of it.
    rr_step: u64,
}

impl WeightedList {
    pub fn new(endpoints: &[Endpoint], include: impl Fn(&Endpoint) -> bool) -> Self {
        let mut indices = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for (i, e) in endpoints.iter().enumerate() {
            if e.weight > 0 && include(e) {
                total += u64::from(e.weight);
                indices.push(i as u32);
                cumulative.push(total);
            }
        }
        WeightedList { indices: indices.into(), cumulative: cumulative.into(), rr_step: stride(total) }
    }

    /// The members of this list for which `keep` holds (by endpoint index), as a list of their own.
    pub fn sub(&self, endpoints: &[Endpoint], keep: impl Fn(usize) -> bool) -> Self {
        let mut indices = Vec::new();
        let mut cumulative = Vec::new();
        let mut total = 0u64;
        for i in self.indices.iter().map(|&i| i as usize).filter(|&i| keep(i)) {
            total += u64::from(endpoints[i].weight);
            indices.push(i as u32);
            cumulative.push(total);
        }
        WeightedList { indices: indices.into(), cumulative: cumulative.into(), rr_step: stride(total) }
    }

    /// The round-robin stride for this list.
    #[inline]
    pub fn rr_step(&self) -> u64 {
        self.rr_step
    }

    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    pub fn total_weight(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The endpoint index at weighted position `point` (taken modulo the total weight).
    #[inline]
    pub fn at(&self, point: u64) -> Option<usize> {
        let total = self.total_weight();
        if total == 0 {
            return None;
        }
        let p = point % total;
        let i = self.cumulative.partition_point(|&c| c <= p);
        self.indices.get(i).map(|&i| i as usize)
    }

    /// The endpoint index of the `n`th member, unweighted.
    #[inline]
    pub fn nth(&self, n: usize) -> Option<usize> {
        self.indices.get(n).map(|&i| i as usize)
    }
}

/// A stride coprime with `total` near its golden-ratio fraction: `n * stride mod total` then visits
/// every position once per `total` steps while spreading neighbours apart.
fn stride(total: u64) -> u64 {
    if total <= 2 {
        return 1;
    }
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let start = ((total as f64) * 0.618_033_988_75) as u64;
    (start.max(1)..total).chain(1..start.max(1)).find(|&s| gcd(s, total) == 1).unwrap_or(1)
}

/// A consistent-hash ring over a set's endpoints: a point's owner changes only when the owner
/// itself leaves the set.
#[derive(Default, Debug)]
pub struct Ring {
    points: Box<[(u64, u32)]>,
}

/// Ring points per 100 units of weight.
const RING_POINTS_PER_100: u64 = 64;
const RING_MAX_POINTS_PER_ENDPOINT: u64 = 2048;

impl Ring {
    pub fn new(endpoints: &[Endpoint], list: &WeightedList) -> Self {
        let mut points = Vec::new();
        for n in 0..list.len() {
            let Some(i) = list.nth(n) else { continue };
            let e = &endpoints[i];
            let count = (u64::from(e.weight) * RING_POINTS_PER_100 / 100).clamp(1, RING_MAX_POINTS_PER_ENDPOINT);
            let name = e.addr.to_string();
            for k in 0..count {
                points.push((hash_pair(name.as_bytes(), k), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points: points.into() }
    }

    /// The endpoint index owning `hash`.
    #[inline]
    pub fn owner(&self, hash: u64) -> Option<usize> {
        if self.points.is_empty() {
            return None;
        }
        let i = self.points.partition_point(|&(h, _)| h < hash);
        let (_, e) = self.points[if i == self.points.len() { 0 } else { i }];
        Some(e as usize)
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// A stable 64-bit hash (FNV-1a, then a SplitMix finaliser for spread): the same on every host,
/// so every sidecar maps a key to the same endpoint.
#[inline]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

fn hash_pair(bytes: &[u8], k: u64) -> u64 {
    mix64(hash_bytes(bytes) ^ k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The endpoints a target may send to, with everything balancing needs precomputed.
pub struct EndpointSet {
    /// None for a static address target.
    pub service: Option<ServiceName>,
    /// The `service` label of metrics: the service name, or the static address.
    pub label: Arc<str>,
    pub policy: Arc<ServicePolicy>,
    pub endpoints: Box<[Endpoint]>,
    /// Endpoints usable when the table was built (healthy, not ejected, not draining, weight > 0).
    pub available: WeightedList,
    /// Every endpoint that is not draining and has weight > 0: used in panic mode.
    pub everyone: WeightedList,
    /// The healthy share was below the panic threshold when the table was built.
    pub panic: bool,
    /// For `ring_hash`: the ring over the list in use.
    pub ring: Option<Ring>,
    /// Round-robin position.
    pub rr: std::sync::atomic::AtomicU64,
    /// For a tag-routed set (Dubbo's tag router): the sets requests with a tag go to; this set
    /// takes those without one.
    pub tags: Option<Box<TagSplit>>,
    /// The service's circuit-breaking counts, when its policy has a breaker (shared by every set
    /// of the service, kept across tables).
    pub gate: Option<Arc<crate::endpoint::breaker::ServiceGate>>,
    /// Zone-aware routing, when it is on and some endpoint is in this host's zone (never for
    /// `ring_hash`, whose keys must map alike on every host, nor in panic mode).
    pub zones: Option<Box<ZoneSplit>>,
}

impl EndpointSet {
    pub fn build(
        service: Option<ServiceName>,
        label: Arc<str>,
        policy: Arc<ServicePolicy>,
        endpoints: Vec<Endpoint>,
    ) -> EndpointSet {
        let unknown_ok = policy.unknown_is_healthy();
        let available = WeightedList::new(&endpoints, |e| !e.draining && e.state.is_usable(unknown_ok));
        let everyone = WeightedList::new(&endpoints, |e| !e.draining);
        let panic = !everyone.is_empty()
            && (available.len() as u64) * 100 < (everyone.len() as u64) * u64::from(policy.panic_threshold_percent);
        let ring_hash = matches!(policy.lb, LbPolicy::RingHash(_));
        let ring = ring_hash.then(|| Ring::new(&endpoints, if panic { &everyone } else { &available }));
        let zones = match policy.zone {
            Some(_) if !ring_hash && !panic => {
                ZoneSplit::new(&endpoints, &available, &everyone, policy.zone_min_healthy_percent).map(Box::new)
            }
            _ => None,
        };
        EndpointSet {
            service,
            label,
            policy,
            endpoints: endpoints.into_boxed_slice(),
            available,
            everyone,
            panic,
            ring,
            rr: std::sync::atomic::AtomicU64::new(0),
            tags: None,
            gate: None,
            zones,
        }
    }

    /// The list balancing draws from: the available endpoints, or all of them in panic mode.
    #[inline]
    pub fn active(&self) -> &WeightedList {
        if self.panic { &self.everyone } else { &self.available }
    }
}

/// How a route's traffic is counted: resolved once per listener and service when a table is
/// built, so that recording a request costs a few atomic adds and no label lookup. The metrics
/// registry provides them ([`StatsSource`]); the routing domain knows only this interface.
pub trait TargetStats: Send + Sync {
    /// A request answered with `code`, which took `elapsed` to its response head.
    fn observe(&self, code: u16, elapsed: std::time::Duration);
    /// The same answer, by endpoint (only where per-endpoint metrics are kept).
    fn observe_endpoint(&self, endpoint: &Addr, code: u16);
    /// A request answered by `endpoint`: [`TargetStats::observe`] and
    /// [`TargetStats::observe_endpoint`] in one call, as the request path records it.
    fn observe_answer(&self, endpoint: &Addr, code: u16, elapsed: std::time::Duration) {
        self.observe(code, elapsed);
        self.observe_endpoint(endpoint, code);
    }
    /// A failed connection attempt to an endpoint.
    fn connect_failed(&self);
    /// An extra attempt after a failed one.
    fn retried(&self);
    /// A TCP connection taken by the route.
    fn tcp_accepted(&self);
    /// A request or connection refused by the service's circuit breaker, past `limit`
    /// (`max_requests`, ...).
    fn overflow(&self, limit: &'static str) {
        let _ = limit;
    }
    /// An attempt sent to an endpoint outside this host's zone (`proxy.zone`).
    fn cross_zone(&self) {}
}

/// Makes the [`TargetStats`] of each listener and service, for the table builder.
pub trait StatsSource: Send + Sync {
    /// `service` is empty for the requests of `listener` that no rule matched.
    fn target_stats(&self, listener: &str, service: &str) -> Arc<dyn TargetStats>;
    /// How rule `rule` on `listener` counts its refusals.
    fn rule_stats(&self, listener: &str, rule: &str) -> Arc<dyn super::rate_limit::RuleStats> {
        let _ = (listener, rule);
        Arc::new(super::rate_limit::NoRuleStats)
    }
}

/// One weighted target of a route.
pub struct Target {
    pub backend: Backend,
    pub weight: u32,
    pub set: Arc<EndpointSet>,
    /// How this listener's requests to the target's service are counted.
    pub stats: Arc<dyn TargetStats>,
}

/// A rule compiled for one listener.
pub struct Route {
    /// The rule id, or `listener:<name>` for a listener's own `service` route.
    pub id: Arc<str>,
    pub rule: Option<Arc<Rule>>,
    pub targets: Box<[Target]>,
    cumulative: Box<[u32]>,
    /// Whole-request timeout.
    pub timeout: Duration,
    /// Extra attempts after the first.
    pub retries: u32,
    /// The rule's local rate limit, if it has one.
    pub limiter: Option<Arc<super::rate_limit::RouteLimiter>>,
    /// Each attempt's share of the timeout, if the rule limits it.
    pub per_try_timeout: Option<Duration>,
}

impl Route {
    pub fn new(id: Arc<str>, rule: Option<Arc<Rule>>, targets: Vec<Target>, timeout: Duration, retries: u32) -> Self {
        let mut total = 0u32;
        let cumulative = targets
            .iter()
            .map(|t| {
                total = total.saturating_add(t.weight);
                total
            })
            .collect();
        let per_try_timeout = rule.as_ref().and_then(|r| r.per_try_timeout).filter(|t| *t < timeout);
        Route {
            id,
            rule,
            targets: targets.into_boxed_slice(),
            cumulative,
            timeout,
            retries,
            limiter: None,
            per_try_timeout,
        }
    }

    /// The same route, rate-limited by `limiter`.
    pub fn with_limiter(mut self, limiter: Option<Arc<super::rate_limit::RouteLimiter>>) -> Self {
        self.limiter = limiter;
        self
    }

    /// The target at weighted position `point`.
    #[inline]
    pub fn target_at(&self, point: u32) -> Option<(usize, &Target)> {
        let total = *self.cumulative.last()?;
        if total == 0 {
            return None;
        }
        let p = point % total;
        let i = self.cumulative.partition_point(|&c| c <= p);
        self.targets.get(i).map(|t| (i, t))
    }

    fn matches_rest(&self, path: &str, method: &Method, headers: &impl HeaderLookup) -> bool {
        self.rule.as_ref().is_none_or(|r| r.matcher.matches_rest(path, method, headers))
    }
}

/// The routes of one listener, indexed for lookup.
#[derive(Clone)]
pub struct ListenerRoutes {
    pub name: Box<str>,
    pub protocol: Protocol,
    /// In match order: priority, highest first, then rule id.
    pub routes: Box<[Arc<Route>]>,
    index: Arc<RouteIndex>,
    /// Metrics of requests no rule matched.
    pub no_route: Arc<dyn TargetStats>,
}

impl ListenerRoutes {
    /// Indexes `routes`, which must already be in match order.
    pub fn new(name: Box<str>, protocol: Protocol, routes: Vec<Arc<Route>>, no_route: Arc<dyn TargetStats>) -> Self {
        let index = Arc::new(RouteIndex::new(routes.iter().map(|r| r.rule.as_ref().map(|r| &r.matcher))));
        ListenerRoutes { name, protocol, routes: routes.into_boxed_slice(), index, no_route }
    }

    /// The same rules in the same order with some routes rebuilt (new endpoint sets): the index
    /// of the previous table still holds.
    pub fn with_routes(&self, routes: Vec<Arc<Route>>) -> Self {
        debug_assert_eq!(routes.len(), self.routes.len());
        ListenerRoutes {
            name: self.name.clone(),
            protocol: self.protocol,
            routes: routes.into_boxed_slice(),
            index: self.index.clone(),
            no_route: self.no_route.clone(),
        }
    }

    /// The first route, in match order, that matches the request.
    ///
    /// `host` is the Host header (or the URI authority) as received: the port is dropped and case
    /// ignored here, without allocating.
    #[inline]
    pub fn route(
        &self,
        host: Option<&str>,
        path: &str,
        method: &Method,
        headers: &impl HeaderLookup,
    ) -> Option<&Arc<Route>> {
        self.route_by_bytes(host.map(str::as_bytes), path, method, headers)
    }

    /// [`ListenerRoutes::route`] with the host as the bytes received: a listener without routes by
    /// host never reads them as text.
    #[inline]
    pub fn route_by_bytes(
        &self,
        host: Option<&[u8]>,
        path: &str,
        method: &Method,
        headers: &impl HeaderLookup,
    ) -> Option<&Arc<Route>> {
        let i = self
            .index
            .lookup(host, path, method, headers, |i| self.routes[i as usize].matches_rest(path, method, headers))?;
        self.routes.get(i as usize)
    }

    /// The route of a TCP listener: its first rule (TCP rules match everything).
    pub fn first(&self) -> Option<&Arc<Route>> {
        self.routes.first()
    }
}

/// The sets a tag-routed endpoint set hands requests with a tag to (built by `tags::split`). The set that holds it is the
/// one for requests without a tag.
pub struct TagSplit {
    /// Each tag that selects something (or nothing, by force), sorted by name.
    pub(super) by_tag: Box<[(Box<str>, Arc<EndpointSet>)]>,
    /// A tag nothing serves: the untagged instances.
    pub(super) failover: Arc<EndpointSet>,
    /// A tag nothing serves, with `dubbo.force.tag: true`: nothing.
    pub(super) none: Arc<EndpointSet>,
}

impl TagSplit {
    /// The set for a request with `tag`.
    #[inline]
    pub fn select(&self, tag: &[u8], force: bool) -> &Arc<EndpointSet> {
        match self.by_tag.binary_search_by(|(name, _)| name.as_bytes().cmp(tag)) {
            Ok(i) => &self.by_tag[i].1,
            Err(_) if force => &self.none,
            Err(_) => &self.failover,
        }
    }

    /// Each tag and the set it selects, for `/config`.
    pub fn tags(&self) -> impl Iterator<Item = (&str, &Arc<EndpointSet>)> {
        self.by_tag.iter().map(|(name, set)| (&**name, set))
    }

    /// The set a tag nothing serves falls back to.
    pub fn failover(&self) -> &Arc<EndpointSet> {
        &self.failover
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_visit_every_position_once_per_round() {
        for total in 1..200u64 {
            let s = stride(total);
            let mut seen: Vec<u64> = (0..total).map(|n| n * s % total).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..total).collect::<Vec<_>>(), "total {total}, stride {s}");
        }
    }

    /// The zone split of endpoints given as (zone, healthy), in parts per [`ZONE_SCALE`] with the
    /// local and remote list sizes; None when no endpoint is local.
    fn split(members: &[(ZoneMatch, bool)], min_healthy_percent: u32) -> Option<(u32, usize, usize)> {
        let states = crate::endpoint::StateRegistry::new(Duration::from_secs(1));
        let endpoints: Vec<Endpoint> = members
            .iter()
            .enumerate()
            .map(|(n, (zone, _))| {
                let addr: Addr = format!("10.0.0.1:{}", 1000 + n).parse().unwrap();
                let state = states.get(&crate::names::EndpointKey { service: None, addr: addr.clone() });
                Endpoint { addr, weight: 100, draining: false, protocol: None, state, tls_port: None, zone: *zone }
            })
            .collect();
        let healthy = |e: &Endpoint| endpoints.iter().position(|x| x.addr == e.addr).is_some_and(|i| members[i].1);
        let available = WeightedList::new(&endpoints, healthy);
        let everyone = WeightedList::new(&endpoints, |_| true);
        ZoneSplit::new(&endpoints, &available, &everyone, min_healthy_percent)
            .map(|z| (z.local_share, z.local.len(), z.remote.len()))
    }

    #[test]
    fn the_local_zone_takes_its_healthy_share_over_the_threshold() {
        use ZoneMatch::{Local, Other};
        let four_local = |healthy: usize| {
            let mut m: Vec<(ZoneMatch, bool)> = (0..4).map(|i| (Local, i < healthy)).collect();
            m.extend([(Other, true), (Other, true)]);
            m
        };
        assert_eq!(split(&four_local(4), 70), Some((ZONE_SCALE, 4, 2)), "healthy: everything stays");
        assert_eq!(split(&four_local(3), 70), Some((ZONE_SCALE, 3, 2)), "75% is over the 70% threshold");
        // 50% healthy against 70%: 50/70 stay, (70 - 50)/70 leave.
        assert_eq!(split(&four_local(2), 70), Some((7_142, 2, 2)));
        assert_eq!(split(&four_local(1), 70), Some((3_571, 1, 2)));
        assert_eq!(split(&four_local(0), 70), Some((0, 0, 2)), "nothing local: everything leaves");
        assert_eq!(split(&four_local(2), 100), Some((5_000, 2, 2)));
        assert_eq!(split(&four_local(1), 0), Some((ZONE_SCALE, 1, 2)), "threshold 0: local while any is");
        let nowhere_else = [(Local, true), (Local, false), (Other, false)];
        assert_eq!(split(&nowhere_else, 70), Some((ZONE_SCALE, 1, 0)), "nothing elsewhere to spill to");
        assert_eq!(split(&[(Other, true), (Other, true)], 70), None, "no local endpoint: zones play no part");
        assert_eq!(split(&[(ZoneMatch::Unset, true)], 70), None);
    }

    #[test]
    fn hashes_are_stable_across_runs() {
        // Every sidecar must map a key to the same point: pin the function's output.
        assert_eq!(hash_bytes(b""), mix64(0xcbf2_9ce4_8422_2325));
        assert_ne!(hash_bytes(b"user-1"), hash_bytes(b"user-2"));
        assert_eq!(hash_bytes(b"user-1"), hash_bytes(b"user-1"));
    }
}
