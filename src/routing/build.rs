//! Documents to [`RoutingTable`]. The [`Builder`] keeps the parsed documents (the catalog),
//! applies changes to it, and builds tables. Builds are incremental: only services that changed
//! are rebuilt, the rest are shared with the previous table by `Arc`. Pure apart from logging.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::warn;

use super::documents::{Backend, HealthCheck, LbPolicy, Outlier, Policy, Rule};
use super::rate_limit::RouteLimiter;
use super::table::{
    Endpoint, EndpointSet, InstanceEntry, InvalidNode, ListenerRoutes, Protocol, Rejected, Route, RoutingTable,
    RuleStatus, ServiceEntry, ServiceMapBuilder, ServicePolicy, StatsSource, Target, TargetStats, ZoneMatch,
};
use super::tags::{self, InstanceTags};
use super::{Addr, EndpointKey, Instance, InstanceProtocol, NodeKind, Origin, ServiceName, SourceKind, epoch_ms};
use crate::endpoint::StateRegistry;

/// Instances removed this shortly before their service became empty count as having vanished
/// together, for `protect_from_empty`.
pub const PROTECT_WINDOW: Duration = Duration::from_secs(10);

/// A local listener as the table needs to know it.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    pub name: Box<str>,
    pub protocol: Protocol,
    /// Port-per-service: everything not matched by a rule goes to this service.
    pub service: Option<ServiceName>,
    /// ServerSet named endpoint to use for `service`.
    pub endpoint: Option<String>,
}

/// Local defaults for everything a rule or policy may leave out. [`Defaults::default`] holds the
/// values zkroute uses when the configuration sets none: the configuration's own defaults
/// (`[proxy]`) are taken from it.
#[derive(Clone, Debug)]
pub struct Defaults {
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub panic_threshold_percent: u32,
    pub protect_from_empty: bool,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    /// This host's zone (`proxy.zone`): zone-aware routing is on where a policy does not turn it
    /// off. None: off everywhere.
    pub zone: Option<Arc<str>>,
    pub zone_min_healthy_percent: u32,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            lb: LbPolicy::default(),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(15),
            retries: 1,
            panic_threshold_percent: 50,
            protect_from_empty: false,
            health_check: None,
            outlier: None,
            zone: None,
            zone_min_healthy_percent: 70,
        }
    }
}

/// A document read from a source: where from, and what it parsed to (or why it did not).
#[derive(Clone, Debug)]
pub struct Doc<T> {
    pub origin: Origin,
    pub parsed: Result<Arc<T>, String>,
}

/// The raw bytes of a node, as a source read them.
#[derive(Clone, Debug)]
pub struct RawNode {
    pub origin: Origin,
    pub data: Vec<u8>,
}

/// One change to the catalog.
#[derive(Debug)]
pub enum Change {
    /// An instance node was created or changed (`Some`), or deleted (`None`).
    Instance {
        service: ServiceName,
        id: Arc<str>,
        doc: Option<Doc<Instance>>,
    },
    Rule {
        id: Arc<str>,
        doc: Option<Doc<Rule>>,
    },
    Policy {
        service: ServiceName,
        doc: Option<Doc<Policy>>,
    },
    /// Everything the source holds, replacing the catalog.
    Resync(Resync),
    /// Directories (roots, service directories) a full read could not list, each with the
    /// reason; replaces the previous list. Listed as invalid, like nodes that do not parse.
    Unreadable(Vec<InvalidNode>),
    /// Dubbo configuration nodes (configurators, tag rules) that do not parse now, each with the
    /// reason; replaces the previous list.
    ConfigInvalid(Vec<InvalidNode>),
    /// Active checks or outlier detection changed some endpoints of these services.
    Health(Vec<ServiceName>),
    /// The local configuration was reloaded: the listeners, by [`ListenerId`](super::table::ListenerId),
    /// and the defaults.
    Local {
        listeners: Vec<ListenerSpec>,
        defaults: Defaults,
    },
}

/// A full read of a source.
#[derive(Debug)]
pub struct Resync {
    pub source: SourceKind,
    pub instances: Vec<(ServiceName, Arc<str>, Doc<Instance>)>,
    pub rules: Vec<(Arc<str>, Doc<Rule>)>,
    pub policies: Vec<(ServiceName, Doc<Policy>)>,
}

/// What one build changed, for the swap's log line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    pub instances_added: usize,
    pub instances_removed: usize,
    pub instances_changed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    pub rules_changed: usize,
    pub policies_changed: usize,
    /// Services whose documents changed.
    pub services: BTreeSet<ServiceName>,
    /// Services rebuilt (documents or health changed), for incremental consumers of tables.
    pub rebuilt: BTreeSet<ServiceName>,
    /// Every listener's routes were rebuilt (rules changed, or a full read).
    pub routes_rebuilt: bool,
    /// The local listeners or defaults changed (a configuration reload).
    pub local: bool,
}

impl Delta {
    /// Whether nothing but endpoint health changed (health-only rebuilds are empty).
    pub fn is_empty(&self) -> bool {
        Delta { rebuilt: BTreeSet::new(), routes_rebuilt: false, ..self.clone() } == Delta::default()
    }
}

#[derive(Default)]
struct PolicySlot {
    active: Option<(Arc<Policy>, Origin)>,
    rejected: Option<Rejected>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum SetKey {
    /// `listener` is set only for a service whose instances state protocols or tags.
    Subset {
        service: ServiceName,
        subset: BTreeMap<String, String>,
        endpoint: Option<String>,
        listener: Option<Protocol>,
    },
    Address(Addr),
    Empty(ServiceName),
}

/// Owns the catalog and builds tables from it.
pub struct Builder {
    listeners: Arc<[ListenerSpec]>,
    stats_source: Arc<dyn StatsSource>,
    /// Metric children per (listener, service label), kept across builds.
    stats: HashMap<(usize, Arc<str>), Arc<dyn TargetStats>>,
    /// Rate limiters per (listener, rule id), kept across builds while the rule's limit holds.
    limiters: HashMap<(usize, Arc<str>), Arc<RouteLimiter>>,
    defaults: Defaults,
    states: Arc<StateRegistry>,
    source: SourceKind,
    version: u64,
    instances: BTreeMap<ServiceName, BTreeMap<Arc<str>, Doc<Instance>>>,
    rules: Arc<BTreeMap<Arc<str>, RuleStatus>>,
    policies: BTreeMap<ServiceName, PolicySlot>,
    invalid: Invalids,
    invalid_view: Arc<[InvalidNode]>,
    /// Keys in `invalid` of the directories the last full read could not list.
    unreadable: BTreeSet<(NodeKind, String)>,
    /// Keys in `invalid` of the Dubbo configuration nodes that do not parse.
    config_invalid: BTreeSet<(NodeKind, String)>,
    /// Services with instances warming up, and how often their weights are recomputed.
    warming: BTreeMap<ServiceName, Duration>,
    /// The time of the build in progress, for warm-up weights.
    now_ms: i64,
    // From the last build.
    services: ServiceMapBuilder,
    /// Each listener's routes, reused when rules did not change.
    listener_routes: Vec<ListenerRoutes>,
    invalid_changed: bool,
    sets: HashMap<SetKey, Arc<EndpointSet>>,
    /// Instances removed from each service lately, for `protect_from_empty`.
    removed: HashMap<ServiceName, Vec<(Instant, InstanceEntry)>>,
    // Since the last build.
    dirty_services: BTreeSet<ServiceName>,
    dirty_all: bool,
    dirty_routes: bool,
    delta: Delta,
}

impl Builder {
    pub fn new(
        listeners: Vec<ListenerSpec>,
        defaults: Defaults,
        states: Arc<StateRegistry>,
        stats_source: Arc<dyn StatsSource>,
    ) -> Self {
        Builder {
            listeners: listeners.into(),
            stats_source,
            stats: HashMap::new(),
            limiters: HashMap::new(),
            defaults,
            states,
            source: SourceKind::Zookeeper,
            version: 0,
            instances: BTreeMap::new(),
            rules: Arc::default(),
            policies: BTreeMap::new(),
            invalid: Invalids::default(),
            invalid_view: Arc::from(Vec::new()),
            unreadable: BTreeSet::new(),
            config_invalid: BTreeSet::new(),
            warming: BTreeMap::new(),
            now_ms: 0,
            services: ServiceMapBuilder::default(),
            listener_routes: Vec::new(),
            invalid_changed: true,
            sets: HashMap::new(),
            removed: HashMap::new(),
            dirty_services: BTreeSet::new(),
            dirty_all: true,
            dirty_routes: true,
            delta: Delta::default(),
        }
    }

    /// Whether changes were applied since the last build.
    pub fn is_dirty(&self) -> bool {
        // Invalid nodes alone (a Dubbo configuration node that does not parse) are worth a table:
        // `/config` and the gauge show them.
        self.dirty_all || self.dirty_routes || !self.dirty_services.is_empty() || self.invalid_changed
    }

    /// How many invalid-node log lines were written (each invalid node version is logged once).
    pub fn invalid_logs(&self) -> u64 {
        self.invalid.logged
    }

    /// The version the next build will carry.
    pub fn next_version(&self) -> u64 {
        self.version + 1
    }

    /// Continues version numbers after a table loaded from elsewhere (a snapshot).
    pub fn set_version(&mut self, version: u64) {
        self.version = self.version.max(version);
    }

    pub fn apply(&mut self, change: Change) {
        self.invalid_changed |= !matches!(change, Change::Health(_));
        match change {
            Change::Instance { service, id, doc } => self.apply_instance(service, id, doc),
            Change::Rule { id, doc } => self.apply_rule(id, doc),
            Change::Policy { service, doc } => self.apply_policy(service, doc),
            Change::Resync(resync) => self.apply_resync(resync),
            Change::Unreadable(nodes) => replace_listed(&mut self.invalid, &mut self.unreadable, nodes),
            Change::ConfigInvalid(nodes) => replace_listed(&mut self.invalid, &mut self.config_invalid, nodes),
            Change::Health(services) => self.dirty_services.extend(services),
            Change::Local { listeners, defaults } => self.set_local(listeners, defaults),
        }
    }

    /// New listeners and defaults: every service and route is rebuilt with them. Metric children
    /// and endpoint sets are made afresh, since both name or embed what changed (the counts
    /// behind the metrics carry on).
    fn set_local(&mut self, listeners: Vec<ListenerSpec>, defaults: Defaults) {
        self.listeners = listeners.into();
        self.defaults = defaults;
        self.stats.clear();
        self.sets.clear();
        self.dirty_all = true;
        self.delta.local = true;
    }

    fn apply_instance(&mut self, service: ServiceName, id: Arc<str>, doc: Option<Doc<Instance>>) {
        let docs = self.instances.entry(service.clone()).or_default();
        match doc {
            Some(doc) => {
                self.invalid.note(NodeKind::Instance, &doc.origin, doc.parsed.as_ref().err(), false);
                let old = docs.insert(id, doc.clone());
                match (&old, &doc.parsed) {
                    (None, Ok(_)) | (Some(Doc { parsed: Err(_), .. }), Ok(_)) => self.delta.instances_added += 1,
                    (Some(Doc { parsed: Ok(a), .. }), Ok(b)) if a != b => self.delta.instances_changed += 1,
                    (Some(Doc { parsed: Ok(_), .. }), Err(_)) => self.delta.instances_removed += 1,
                    _ => {}
                }
            }
            None => {
                if let Some(old) = docs.remove(&id) {
                    self.invalid.note(NodeKind::Instance, &old.origin, None, false);
                    if old.parsed.is_ok() {
                        self.delta.instances_removed += 1;
                    }
                }
            }
        }
        if docs.is_empty() {
            self.instances.remove(&service);
        }
        self.delta.services.insert(service.clone());
        self.dirty_services.insert(service);
    }

    fn apply_rule(&mut self, id: Arc<str>, doc: Option<Doc<Rule>>) {
        let rules = Arc::make_mut(&mut self.rules);
        match doc {
            None => {
                if let Some(old) = rules.remove(&id) {
                    if old.active.is_some() {
                        self.delta.rules_removed += 1;
                    }
                    if let Some(r) = old.rejected.as_ref().map(|r| &r.origin).or(old.active.as_ref().map(|a| &a.1)) {
                        self.invalid.remove(NodeKind::Rule, &r.path);
                    }
                }
            }
            Some(doc) => {
                let parsed = doc.parsed.and_then(|rule| check_rule_for_listeners(&self.listeners, rule));
                let slot = rules.entry(id).or_insert(RuleStatus { active: None, rejected: None });
                match parsed {
                    Ok(rule) => {
                        if slot.active.is_none() {
                            self.delta.rules_added += 1;
                        } else {
                            self.delta.rules_changed += 1;
                        }
                        slot.active = Some((rule, doc.origin.clone()));
                        slot.rejected = None;
                        self.invalid.note(NodeKind::Rule, &doc.origin, None, false);
                    }
                    Err(reason) => {
                        let keeps = slot.active.is_some();
                        self.invalid.note(NodeKind::Rule, &doc.origin, Some(&reason), keeps);
                        slot.rejected = Some(Rejected { origin: doc.origin, reason });
                    }
                }
            }
        }
        self.dirty_routes = true;
    }

    fn apply_policy(&mut self, service: ServiceName, doc: Option<Doc<Policy>>) {
        match doc {
            None => {
                if let Some(old) = self.policies.remove(&service) {
                    if let Some(o) = old.rejected.as_ref().map(|r| &r.origin).or(old.active.as_ref().map(|a| &a.1)) {
                        self.invalid.remove(NodeKind::Policy, &o.path);
                    }
                }
            }
            Some(doc) => {
                let slot = self.policies.entry(service.clone()).or_default();
                match doc.parsed {
                    Ok(policy) => {
                        self.invalid.note(NodeKind::Policy, &doc.origin, None, false);
                        slot.active = Some((policy, doc.origin));
                        slot.rejected = None;
                    }
                    Err(reason) => {
                        let keeps = slot.active.is_some();
                        self.invalid.note(NodeKind::Policy, &doc.origin, Some(&reason), keeps);
                        slot.rejected = Some(Rejected { origin: doc.origin, reason });
                    }
                }
            }
        }
        self.delta.policies_changed += 1;
        self.delta.services.insert(service.clone());
        self.dirty_services.insert(service);
    }

    /// How soon the weights of instances warming up should be recomputed, if any are.
    pub fn warmup_step(&self) -> Option<Duration> {
        self.warming.values().min().copied()
    }

    /// Marks the services with instances warming up for a rebuild at their new weights.
    pub fn warm_up(&mut self) {
        self.dirty_services.extend(self.warming.keys().cloned());
    }

    fn apply_resync(&mut self, resync: Resync) {
        self.source = resync.source;
        // Apply as individual changes against the old catalog, so that a bad rule keeps its
        // previous version and a bad node already logged is not logged again.
        let mut seen_instances: BTreeMap<ServiceName, BTreeSet<Arc<str>>> = BTreeMap::new();
        for (service, id, doc) in resync.instances {
            seen_instances.entry(service.clone()).or_default().insert(id.clone());
            let unchanged =
                self.instances.get(&service).and_then(|docs| docs.get(&id)).is_some_and(|old| same_doc(old, &doc));
            if !unchanged {
                self.apply_instance(service, id, Some(doc));
            }
        }
        let gone: Vec<(ServiceName, Arc<str>)> = self
            .instances
            .iter()
            .flat_map(|(s, docs)| docs.keys().map(move |id| (s.clone(), id.clone())))
            .filter(|(s, id)| !seen_instances.get(s).is_some_and(|ids| ids.contains(id)))
            .collect();
        for (service, id) in gone {
            self.apply_instance(service, id, None);
        }

        let seen_rules: BTreeSet<Arc<str>> = resync.rules.iter().map(|(id, _)| id.clone()).collect();
        for (id, doc) in resync.rules {
            let unchanged = self.rules.get(&id).is_some_and(|old| match (&doc.parsed, &old.rejected, &old.active) {
                (Err(reason), Some(rej), _) => rej.origin == doc.origin && rej.reason == *reason,
                (Ok(new), None, Some((rule, origin))) => *origin == doc.origin && rule.doc == new.doc,
                _ => false,
            });
            if !unchanged {
                self.apply_rule(id, Some(doc));
            }
        }
        let gone: Vec<Arc<str>> = self.rules.keys().filter(|id| !seen_rules.contains(*id)).cloned().collect();
        for id in gone {
            self.apply_rule(id, None);
        }

        let seen_policies: BTreeSet<ServiceName> = resync.policies.iter().map(|(s, _)| s.clone()).collect();
        for (service, doc) in resync.policies {
            let unchanged =
                self.policies.get(&service).is_some_and(|old| match (&doc.parsed, &old.rejected, &old.active) {
                    (Err(reason), Some(rej), _) => rej.origin == doc.origin && rej.reason == *reason,
                    (Ok(new), None, Some((policy, origin))) => *origin == doc.origin && policy == new,
                    _ => false,
                });
            if !unchanged {
                self.apply_policy(service, Some(doc));
            }
        }
        let gone: Vec<ServiceName> = self.policies.keys().filter(|s| !seen_policies.contains(*s)).cloned().collect();
        for service in gone {
            self.apply_policy(service, None);
        }
        self.dirty_routes = true;
    }

    /// Builds a table from the catalog, reusing what did not change since the last build.
    pub fn build(&mut self) -> (RoutingTable, Delta) {
        self.now_ms = epoch_ms(SystemTime::now());
        let rebuild: BTreeSet<ServiceName> = if self.dirty_all {
            self.services.keys().chain(self.instances.keys()).chain(self.policies.keys()).cloned().collect()
        } else {
            std::mem::take(&mut self.dirty_services)
        };
        for name in &rebuild {
            self.sets.retain(|k, _| match k {
                SetKey::Subset { service, .. } | SetKey::Empty(service) => service != name,
                SetKey::Address(_) => true,
            });
            let old = self.services.remove(name.as_str());
            let new = self.build_service(name, old.as_deref());
            match new.as_ref().and_then(|s| warmup_step(&s.instances, self.now_ms)) {
                Some(step) => self.warming.insert(name.clone(), step),
                None => self.warming.remove(name),
            };
            if let Some(old) = old.as_ref().filter(|o| !o.protected) {
                self.note_removed(name, old, new.as_ref());
            }
            if let Some(entry) = new {
                self.services.insert(name.clone(), Arc::new(entry));
            }
        }
        let routes_rebuilt = self.dirty_all || self.dirty_routes || self.listener_routes.len() != self.listeners.len();
        if routes_rebuilt {
            self.listener_routes = self.build_listeners();
        } else if !rebuild.is_empty() {
            self.refresh_routes(&rebuild);
        }
        self.dirty_all = false;
        self.dirty_routes = false;
        self.dirty_services.clear();
        if std::mem::take(&mut self.invalid_changed) {
            self.invalid_view = self.invalid.nodes.values().cloned().collect::<Vec<_>>().into();
        }
        self.version += 1;
        let table = RoutingTable {
            version: self.version,
            built_at: SystemTime::now(),
            source: self.source,
            listeners: self.listener_routes.clone().into_boxed_slice(),
            services: self.services.freeze(),
            rules: self.rules.clone(),
            invalid: self.invalid_view.clone(),
        };
        let mut delta = std::mem::take(&mut self.delta);
        delta.rebuilt = rebuild;
        delta.routes_rebuilt = routes_rebuilt;
        (table, delta)
    }

    /// Remembers the instances a rebuild removed, for `protect_from_empty`.
    fn note_removed(&mut self, name: &ServiceName, old: &ServiceEntry, new: Option<&ServiceEntry>) {
        let now = Instant::now();
        let kept: HashSet<&str> = new.map(|n| n.instances.iter().map(|i| &*i.id).collect()).unwrap_or_default();
        let list = self.removed.entry(name.clone()).or_default();
        list.retain(|(at, i)| now.duration_since(*at) < PROTECT_WINDOW && !kept.contains(&*i.id));
        for i in old.instances.iter().filter(|i| !kept.contains(&*i.id)) {
            list.push((now, i.clone()));
        }
        if list.is_empty() {
            self.removed.remove(name);
        }
    }

    fn resolve_policy(&self, name: &ServiceName) -> (ServicePolicy, Option<(Arc<Policy>, Origin)>) {
        let d = &self.defaults;
        let slot = self.policies.get(name).and_then(|s| s.active.as_ref());
        let p = slot.map(|(p, _)| &**p);
        let policy = ServicePolicy {
            lb: p.and_then(|p| p.lb.clone()).unwrap_or_else(|| d.lb.clone()),
            connect_timeout: p.and_then(|p| p.connect_timeout).unwrap_or(d.connect_timeout),
            retries: p.and_then(|p| p.retries).unwrap_or(d.retries),
            health_check: p.and_then(|p| p.health_check.clone()).or_else(|| d.health_check.clone()),
            outlier: p.and_then(|p| p.outlier.clone()).or_else(|| d.outlier.clone()),
            panic_threshold_percent: p.and_then(|p| p.panic_threshold_percent).unwrap_or(d.panic_threshold_percent),
            protect_from_empty: p.and_then(|p| p.protect_from_empty).unwrap_or(d.protect_from_empty),
            tls: p.and_then(|p| p.tls.clone()).flatten(),
            circuit_breaker: p.and_then(|p| p.circuit_breaker),
            retry_budget: p.and_then(|p| p.retry_budget),
            protocol: p.and_then(|p| p.protocol),
            zone: d.zone.clone().filter(|_| p.and_then(|p| p.zone_aware).unwrap_or(true)),
            zone_min_healthy_percent: p.and_then(|p| p.zone_min_healthy_percent).unwrap_or(d.zone_min_healthy_percent),
        };
        (policy, slot.cloned())
    }

    fn build_service(&self, name: &ServiceName, old: Option<&ServiceEntry>) -> Option<ServiceEntry> {
        let docs = self.instances.get(name);
        let has_policy = self.policies.contains_key(name);
        let (policy, policy_source) = self.resolve_policy(name);
        let policy = match old {
            Some(o) if *o.policy == policy => o.policy.clone(),
            _ => Arc::new(policy),
        };
        let mut instances: Vec<InstanceEntry> = docs
            .into_iter()
            .flatten()
            .filter_map(|(id, doc)| {
                let instance = doc.parsed.as_ref().ok()?.clone();
                let key = EndpointKey { service: Some(name.clone()), addr: instance.addr.clone() };
                Some(InstanceEntry {
                    id: id.clone(),
                    instance,
                    origin: doc.origin.clone(),
                    state: self.states.get(&key),
                })
            })
            .collect();
        let mut protected = false;
        if instances.is_empty() && policy.protect_from_empty {
            // Instances that vanished in a burst: those removed shortly before, or the set
            // already protected. Each is kept while it stays usable (health checks can end it).
            let unknown_ok = policy.unknown_is_healthy();
            let recent = self.removed.get(name).into_iter().flatten().map(|(_, i)| i);
            let candidates: Vec<&InstanceEntry> = match old {
                Some(o) if o.protected => o.instances.iter().collect(),
                Some(o) => o.instances.iter().chain(recent).collect(),
                None => recent.collect(),
            };
            let mut seen = HashSet::new();
            instances = candidates
                .into_iter()
                .filter(|i| i.state.is_usable(unknown_ok) && seen.insert(i.id.clone()))
                .map(|i| InstanceEntry {
                    id: i.id.clone(),
                    instance: i.instance.clone(),
                    origin: i.origin.clone(),
                    state: self.states.get(&i.state.key),
                })
                .collect();
            protected = !instances.is_empty();
            if protected && !old.is_some_and(|o| o.protected) {
                warn!(service = %name, instances = instances.len(),
                    "every instance vanished from the registry at once: keeping the last ones (protect_from_empty)");
            }
        }
        if instances.is_empty() && !has_policy {
            return None;
        }
        let none = BTreeMap::new();
        let set = |listener| Arc::new(self.instance_set(name, &policy, &instances, listener, &none, None));
        let all = set(None);
        let routed = is_split(&instances).then(|| Box::new([set(Some(Protocol::Http)), set(Some(Protocol::Tcp))]));
        Some(ServiceEntry {
            name: name.clone(),
            policy,
            policy_origin: policy_source.as_ref().map(|(_, o)| o.clone()),
            policy_doc: policy_source.map(|(p, _)| p),
            instances: instances.into_boxed_slice(),
            protected,
            all,
            routed,
        })
    }

    /// The endpoints of a service's instances whose metadata has `subset`, mapped to the named
    /// `endpoint` if one is given, weighed now. With a `listener`, for a service whose instances
    /// state protocols or tags: only the instances that serve what it speaks, tag-routed.
    fn instance_set(
        &self,
        name: &ServiceName,
        policy: &Arc<ServicePolicy>,
        instances: &[InstanceEntry],
        listener: Option<Protocol>,
        subset: &BTreeMap<String, String>,
        endpoint: Option<&str>,
    ) -> EndpointSet {
        let no_tags = InstanceTags::default();
        let mut seen = HashSet::new();
        let members: Vec<(Endpoint, &InstanceTags)> = instances
            .iter()
            .filter_map(|i| {
                let inst = &i.instance;
                if listener.is_some_and(|l| !InstanceProtocol::serves(inst.protocol, l)) {
                    return None;
                }
                if !subset.iter().all(|(k, v)| inst.metadata.get(k) == Some(v.as_str())) {
                    return None;
                }
                let (addr, state) = match endpoint {
                    None => (inst.addr.clone(), i.state.clone()),
                    Some(named) => {
                        let addr = inst.named.get(named)?.clone();
                        let state = self.states.get(&EndpointKey { service: Some(name.clone()), addr: addr.clone() });
                        (addr, state)
                    }
                };
                // Two instance nodes with one address are one endpoint: the first, by node id.
                if !seen.insert(addr.clone()) {
                    return None;
                }
                let weight = inst.weight_at(self.now_ms);
                // An instance that states its protocol wins over the policy's default.
                let protocol = inst.protocol.or(policy.protocol);
                let zone = ZoneMatch::of(self.defaults.zone.as_deref(), inst.zone.as_deref());
                let e =
                    Endpoint { addr, weight, draining: !inst.enabled, protocol, state, tls_port: inst.ssl_port, zone };
                Some((e, inst.tags.as_deref().unwrap_or(&no_tags)))
            })
            .collect();
        let gate = (policy.circuit_breaker.is_some() || policy.retry_budget.is_some()).then(|| self.states.gate(name));
        let make = |endpoints| {
            let mut set = EndpointSet::build(Some(name.clone()), Arc::from(name.as_str()), policy.clone(), endpoints);
            set.gate = gate.clone();
            set
        };
        let tagged = listener.is_some() && members.iter().any(|(_, t)| t.matters());
        if tagged { tags::split(members, make) } else { make(members.into_iter().map(|(e, _)| e).collect()) }
    }

    fn build_listeners(&mut self) -> Vec<ListenerRoutes> {
        let rules = self.rules.clone();
        let mut by_listener: HashMap<&str, Vec<Arc<Rule>>> = HashMap::new();
        for status in rules.values() {
            if let Some((rule, _)) = &status.active {
                by_listener.entry(&rule.listener).or_default().push(rule.clone());
            }
        }
        let mut used_sets: HashSet<SetKey> = HashSet::new();
        let listeners = self.listeners.clone();
        let mut out = Vec::with_capacity(listeners.len());
        for (id, spec) in listeners.iter().enumerate() {
            let mut list = by_listener.remove(&*spec.name).unwrap_or_default();
            list.sort_by(|a, b| b.priority.cmp(&a.priority).then_with(|| a.id.cmp(&b.id)));
            let mut routes = Vec::with_capacity(list.len() + 1);
            for rule in list {
                routes.push(self.route(id, spec, Some(rule), &mut used_sets));
            }
            if spec.service.is_some() {
                routes.push(self.route(id, spec, None, &mut used_sets));
            }
            let no_route = self.stats_for(id, &spec.name, &Arc::from(""));
            out.push(ListenerRoutes::new(spec.name.clone(), spec.protocol, routes, no_route));
        }
        self.sets.retain(|k, _| used_sets.contains(k));
        // Limiters of rules gone (or moved to another listener) go with them.
        self.limiters.retain(|(id, rule), _| {
            out.get(*id).is_some_and(|l| l.routes.iter().any(|r| r.id == *rule && r.limiter.is_some()))
        });
        out
    }

    /// Rules unchanged: rebuilds only the routes that send to a rebuilt service, and keeps each
    /// listener's index.
    fn refresh_routes(&mut self, rebuilt: &BTreeSet<ServiceName>) {
        let listeners = self.listeners.clone();
        let mut used = HashSet::new();
        let previous = std::mem::take(&mut self.listener_routes);
        self.listener_routes = previous
            .iter()
            .zip(listeners.iter())
            .enumerate()
            .map(|(id, (prev, spec))| {
                let touched = |r: &Arc<Route>| {
                    r.targets.iter().any(|t| t.set.service.as_ref().is_some_and(|s| rebuilt.contains(s)))
                };
                if !prev.routes.iter().any(touched) {
                    return prev.with_routes(prev.routes.to_vec());
                }
                let routes = prev
                    .routes
                    .iter()
                    .map(|r| if touched(r) { self.route(id, spec, r.rule.clone(), &mut used) } else { r.clone() })
                    .collect();
                prev.with_routes(routes)
            })
            .collect();
    }

    /// Compiles one route of listener `id`: a rule, or (None) the listener's own service.
    fn route(
        &mut self,
        id: usize,
        spec: &ListenerSpec,
        rule: Option<Arc<Rule>>,
        used: &mut HashSet<SetKey>,
    ) -> Arc<Route> {
        match rule {
            Some(rule) => {
                let targets = self.targets(id, spec, &rule.backends, used);
                let (timeout, retries) = self.route_limits(rule.timeout, rule.retries, &targets);
                let limiter = self.limiter(id, &spec.name, &rule);
                Arc::new(Route::new(rule.id.clone(), Some(rule), targets, timeout, retries).with_limiter(limiter))
            }
            None => {
                let backend = Backend::Service {
                    service: spec.service.clone().unwrap_or_else(|| ServiceName::new("")),
                    subset: BTreeMap::new(),
                    endpoint: spec.endpoint.clone(),
                    weight: 1,
                };
                let targets = self.targets(id, spec, &[backend], used);
                let (timeout, retries) = self.route_limits(None, None, &targets);
                Arc::new(Route::new(Arc::from(format!("listener:{}", spec.name)), None, targets, timeout, retries))
            }
        }
    }

    /// The rate limiter of `rule` on listener `id`: the one it had while its limit is the same.
    fn limiter(&mut self, id: usize, listener: &str, rule: &Rule) -> Option<Arc<RouteLimiter>> {
        let key = (id, rule.id.clone());
        let Some(limit) = &rule.rate_limit else {
            self.limiters.remove(&key);
            return None;
        };
        if let Some(l) = self.limiters.get(&key).filter(|l| l.limit == *limit) {
            return Some(l.clone());
        }
        let l = Arc::new(RouteLimiter::new(limit.clone(), self.stats_source.rule_stats(listener, &rule.id)));
        self.limiters.insert(key, l.clone());
        Some(l)
    }

    fn route_limits(&self, timeout: Option<Duration>, retries: Option<u32>, targets: &[Target]) -> (Duration, u32) {
        let policy_retries = targets.iter().find(|t| t.set.service.is_some()).map(|t| t.set.policy.retries);
        (timeout.unwrap_or(self.defaults.timeout), retries.or(policy_retries).unwrap_or(self.defaults.retries))
    }

    fn stats_for(&mut self, id: usize, listener: &str, label: &Arc<str>) -> Arc<dyn TargetStats> {
        let source = &self.stats_source;
        self.stats.entry((id, label.clone())).or_insert_with(|| source.target_stats(listener, label)).clone()
    }

    fn targets(
        &mut self,
        id: usize,
        spec: &ListenerSpec,
        backends: &[Backend],
        used: &mut HashSet<SetKey>,
    ) -> Vec<Target> {
        let listener = &*spec.name;
        backends
            .iter()
            .map(|b| {
                let set = match b {
                    Backend::Service { service, subset, endpoint, .. } => match self.services.get(service.as_str()) {
                        Some(entry) if subset.is_empty() && endpoint.is_none() => entry.routed(spec.protocol).clone(),
                        Some(entry) => {
                            let entry = entry.clone();
                            let protocol = entry.is_split().then_some(spec.protocol);
                            let key = SetKey::Subset {
                                service: service.clone(),
                                subset: subset.clone(),
                                endpoint: endpoint.clone(),
                                listener: protocol,
                            };
                            used.insert(key.clone());
                            match self.sets.get(&key) {
                                Some(set) => set.clone(),
                                None => {
                                    let set = Arc::new(self.instance_set(
                                        &entry.name,
                                        &entry.policy,
                                        &entry.instances,
                                        protocol,
                                        subset,
                                        endpoint.as_deref(),
                                    ));
                                    self.sets.insert(key, set.clone());
                                    set
                                }
                            }
                        }
                        None => {
                            let key = SetKey::Empty(service.clone());
                            used.insert(key.clone());
                            let (policy, _) = self.resolve_policy(service);
                            self.sets
                                .entry(key)
                                .or_insert_with(|| {
                                    Arc::new(EndpointSet::build(
                                        Some(service.clone()),
                                        Arc::from(service.as_str()),
                                        Arc::new(policy),
                                        Vec::new(),
                                    ))
                                })
                                .clone()
                        }
                    },
                    Backend::Address { addr, .. } => {
                        let key = SetKey::Address(addr.clone());
                        used.insert(key.clone());
                        let ekey = EndpointKey { service: None, addr: addr.clone() };
                        let d = &self.defaults;
                        let states = &self.states;
                        self.sets
                            .entry(key)
                            .or_insert_with(|| {
                                let policy = ServicePolicy {
                                    lb: LbPolicy::RoundRobin,
                                    connect_timeout: d.connect_timeout,
                                    retries: d.retries,
                                    health_check: None,
                                    outlier: None,
                                    panic_threshold_percent: 0,
                                    protect_from_empty: false,
                                    tls: None,
                                    circuit_breaker: None,
                                    retry_budget: None,
                                    protocol: None,
                                    zone: None,
                                    zone_min_healthy_percent: d.zone_min_healthy_percent,
                                };
                                let endpoint = Endpoint {
                                    addr: addr.clone(),
                                    weight: 1,
                                    draining: false,
                                    protocol: None,
                                    state: states.get(&ekey),
                                    tls_port: None,
                                    zone: ZoneMatch::Unset,
                                };
                                Arc::new(EndpointSet::build(
                                    None,
                                    Arc::from(addr.to_string()),
                                    Arc::new(policy),
                                    vec![endpoint],
                                ))
                            })
                            .clone()
                    }
                };
                let stats = self.stats_for(id, listener, &set.label);
                Target { backend: b.clone(), weight: b.weight(), set, stats }
            })
            .collect()
    }
}

/// Whether a service's instances state protocols or tags, so that its routes differ by listener.
fn is_split(instances: &[InstanceEntry]) -> bool {
    instances.iter().any(|i| i.instance.protocol.is_some() || i.instance.tags.as_ref().is_some_and(|t| t.matters()))
}

/// How often to recompute the weights of instances warming up at `now_ms` (a twentieth of the
/// shortest ramp, between 100 ms and 1 s), if any are.
fn warmup_step(instances: &[InstanceEntry], now_ms: i64) -> Option<Duration> {
    instances
        .iter()
        .filter_map(|i| i.instance.warmup.filter(|w| i.instance.weight > 0 && w.ramping(now_ms)))
        .map(|w| Duration::from_millis(u64::try_from(w.period_ms / 20).unwrap_or(0)))
        .min()
        .map(|d| d.clamp(Duration::from_millis(100), Duration::from_secs(1)))
}

/// Replaces one list of invalid nodes (`listed` holds their keys in `invalid`) with `nodes`.
fn replace_listed(invalid: &mut Invalids, listed: &mut BTreeSet<(NodeKind, String)>, nodes: Vec<InvalidNode>) {
    let now: BTreeSet<(NodeKind, String)> = nodes.iter().map(|n| (n.kind, n.path.clone())).collect();
    for gone in listed.difference(&now) {
        invalid.nodes.remove(gone);
    }
    for node in nodes {
        invalid.note_node(node);
    }
    *listed = now;
}

/// Whether a re-read instance document is the one already in the catalog.
pub(crate) fn same_doc(old: &Doc<Instance>, new: &Doc<Instance>) -> bool {
    old.origin == new.origin
        && match (&old.parsed, &new.parsed) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a == b,
            _ => false,
        }
}

/// TCP listeners take only rules that match everything.
fn check_rule_for_listeners(listeners: &[ListenerSpec], rule: Arc<Rule>) -> Result<Arc<Rule>, String> {
    let tcp = listeners.iter().any(|l| *l.name == *rule.listener && l.protocol == Protocol::Tcp);
    if tcp && !rule.matcher.is_catch_all() {
        return Err(format!("listener {:?} is a tcp listener: its rules must not have a match", rule.listener));
    }
    Ok(rule)
}

/// The nodes skipped as invalid now, each invalid version logged once.
#[derive(Default)]
struct Invalids {
    nodes: BTreeMap<(NodeKind, String), InvalidNode>,
    /// Log lines written so far.
    logged: u64,
}

impl Invalids {
    /// Records (or, without a reason, clears) a node's invalid state.
    fn note(&mut self, kind: NodeKind, origin: &Origin, reason: Option<&String>, previous_in_force: bool) {
        let key = (kind, origin.path.to_string());
        let Some(reason) = reason else {
            self.nodes.remove(&key);
            return;
        };
        let fresh = InvalidNode {
            kind,
            path: origin.path.to_string(),
            reason: reason.clone(),
            previous_in_force,
            version: origin.version,
            mzxid: origin.mzxid,
        };
        self.note_node(fresh);
    }

    /// Records an invalid node, logging it unless this version was recorded for this reason.
    fn note_node(&mut self, fresh: InvalidNode) {
        let key = (fresh.kind, fresh.path.clone());
        let (kind, reason, previous_in_force) = (fresh.kind, &fresh.reason, fresh.previous_in_force);
        let seen = self
            .nodes
            .get(&key)
            .is_some_and(|old| old.version == fresh.version && old.mzxid == fresh.mzxid && old.reason == fresh.reason);
        if !seen {
            self.logged += 1;
            let (path, version) = (&fresh.path, fresh.version);
            if previous_in_force {
                warn!(kind = kind.as_str(), %path, ?version, %reason,
                    "invalid node skipped; its previous version stays in force");
            } else {
                warn!(kind = kind.as_str(), %path, ?version, %reason, "invalid node skipped");
            }
        }
        self.nodes.insert(key, fresh);
    }

    fn remove(&mut self, kind: NodeKind, path: &str) {
        self.nodes.remove(&(kind, path.to_owned()));
    }
}

#[cfg(test)]
mod tests;
