//! Dubbo providers where Dubbo registers them (README: "Dubbo"), under `zookeeper.dubbo_root`:
//!
//! ```text
//! <root>/<interface>/providers/<URL-encoded provider URL>       ephemeral, one per exported protocol
//! <root>/<interface>/configurators/<URL-encoded override URL>   override:// and absent://
//! <root>/config/dubbo/<key>.configurators                      dubbo-admin's YAML configurators
//! <root>/config/dubbo/<application>.tag-router                 dubbo-admin's tag rules
//! ```
//!
//! The [`Catalog`] holds what was read and turns it into instance documents of the interface's
//! service, as a Dubbo consumer sees its providers: configurators applied (the registry's, then
//! the application's, then the service's), the protocol from the URL's scheme, the weight and its
//! warm-up, and the tags of the application's tag rule. Each change recomputes the instances and
//! only those that changed reach the table builder. A service name that `services_path` also has
//! is the `services_path` one's: the Dubbo providers are then listed as invalid.

mod rules;
pub mod url;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rules::{Configurators, Override, TagRuleDoc, Target};
use url::{DubboUrl, Params, param};

use crate::routing::build::{Change, Doc, RawNode, same_doc};
use crate::routing::table::InvalidNode;
use crate::routing::tags::{InstanceTags, RuleTag, TagRule};
use crate::routing::{
    Addr, Format, Instance, InstanceProtocol, Labels, MAX_WEIGHT, NodeKind, Origin, ServiceName, Warmup,
};
use crate::zookeeper::Paths;

/// Dubbo's default warm-up: ten minutes, for every provider that says when it started.
pub const DEFAULT_WARMUP_MS: i64 = 10 * 60 * 1000;

const CONFIG_DIR: &str = "config/dubbo";
const CONFIGURATORS_SUFFIX: &str = ".configurators";
const TAG_ROUTER_SUFFIX: &str = ".tag-router";

/// A node under the Dubbo root that zkroute reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DubboRef {
    Provider(ServiceName, String),
    Override(ServiceName, String),
    /// A node of `config/dubbo`: configurators or a tag rule, by node name.
    Config(String),
}

impl DubboRef {
    /// What a path under `root` is, if zkroute reads it.
    pub fn classify(root: &str, path: &str) -> Option<DubboRef> {
        let rest = if root == "/" { path.strip_prefix('/')? } else { path.strip_prefix(root)?.strip_prefix('/')? };
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["config", "dubbo", name] if is_config_node(name) => Some(DubboRef::Config((*name).to_owned())),
            [service, "providers", node] if !service.is_empty() && !node.is_empty() => {
                Some(DubboRef::Provider(ServiceName::new(service), (*node).to_owned()))
            }
            [service, "configurators", node] if !service.is_empty() && !node.is_empty() => {
                Some(DubboRef::Override(ServiceName::new(service), (*node).to_owned()))
            }
            _ => None,
        }
    }

    /// The node's path under `root`.
    pub fn path(&self, root: &str) -> String {
        let root = root.trim_end_matches('/');
        match self {
            DubboRef::Provider(s, n) => format!("{root}/{s}/providers/{n}"),
            DubboRef::Override(s, n) => format!("{root}/{s}/configurators/{n}"),
            DubboRef::Config(n) => format!("{root}/{CONFIG_DIR}/{n}"),
        }
    }
}

/// Whether a `config/dubbo` node is one zkroute reads.
pub fn is_config_node(name: &str) -> bool {
    name.ends_with(CONFIGURATORS_SUFFIX) || name.ends_with(TAG_ROUTER_SUFFIX)
}

/// The directories of a full read: the interfaces' `providers` and `configurators`.
pub fn service_dirs(root: &str, services: &[String]) -> Vec<String> {
    let root = root.trim_end_matches('/');
    services.iter().flat_map(|s| [format!("{root}/{s}/providers"), format!("{root}/{s}/configurators")]).collect()
}

/// The directory of dubbo-admin's documents.
pub fn config_dir(root: &str) -> String {
    format!("{}/{CONFIG_DIR}", root.trim_end_matches('/'))
}

/// A node as read: its data (the names of providers and overrides carry everything, but they are
/// read like the services tree's nodes, for their origin), gone, or unreadable.
#[derive(Debug)]
pub enum Read {
    Data(RawNode),
    Gone,
    Unreadable(Origin, String),
}

/// A configuration node's state: the version in force, and why the latest was refused.
struct Slot<T> {
    active: Option<(Arc<T>, Origin)>,
    refused: Option<(Origin, String)>,
}

/// A provider or override node as read.
struct Node {
    origin: Origin,
    url: Result<DubboUrl, String>,
}

/// Everything read under the Dubbo root, and the instances last sent for it.
pub struct Catalog {
    /// Whether zkroute follows Dubbo at all (`zookeeper.dubbo_root` is set).
    enabled: bool,
    services_path: String,
    providers: BTreeMap<ServiceName, BTreeMap<String, Node>>,
    overrides: BTreeMap<ServiceName, BTreeMap<String, Result<Option<Override>, String>>>,
    configurators: BTreeMap<String, Slot<Configurators>>,
    tag_rules: BTreeMap<String, Slot<TagRuleDoc>>,
    /// Services under `services_path` with instance nodes, which win a name clash.
    native: BTreeMap<ServiceName, BTreeSet<Arc<str>>>,
    /// The instance documents last sent, per service.
    sent: BTreeMap<ServiceName, BTreeMap<Arc<str>, Doc<Instance>>>,
}

impl Catalog {
    /// The catalog of what `paths.dubbo` holds (empty, and keeping nothing, without it).
    pub fn new(paths: &Paths) -> Catalog {
        Catalog {
            enabled: paths.dubbo.is_some(),
            services_path: paths.services.clone(),
            providers: BTreeMap::new(),
            overrides: BTreeMap::new(),
            configurators: BTreeMap::new(),
            tag_rules: BTreeMap::new(),
            native: BTreeMap::new(),
            sent: BTreeMap::new(),
        }
    }

    /// Whether zkroute follows Dubbo.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces everything with a full read. `native` lists the `services_path` instances. Returns
    /// every Dubbo instance document (for the full read's catalog) and the invalid configuration
    /// nodes.
    #[allow(clippy::type_complexity)]
    pub fn replace(
        &mut self,
        nodes: Vec<(DubboRef, Read)>,
        native: BTreeMap<ServiceName, BTreeSet<Arc<str>>>,
    ) -> (Vec<(ServiceName, Arc<str>, Doc<Instance>)>, Vec<InvalidNode>) {
        let seen_configs: BTreeSet<String> = nodes
            .iter()
            .filter_map(|(r, _)| if let DubboRef::Config(n) = r { Some(n.clone()) } else { None })
            .collect();
        self.providers.clear();
        self.overrides.clear();
        self.configurators.retain(|n, _| seen_configs.contains(n));
        self.tag_rules.retain(|n, _| seen_configs.contains(&format!("{n}{TAG_ROUTER_SUFFIX}")));
        self.native = if self.enabled { native } else { BTreeMap::new() };
        for (node, read) in nodes {
            self.note(node, read);
        }
        self.sent.clear();
        let services: Vec<ServiceName> = self.providers.keys().cloned().collect();
        let mut all = Vec::new();
        for s in services {
            let docs = self.instances_of(&s);
            all.extend(docs.iter().map(|(id, d)| (s.clone(), id.clone(), d.clone())));
            if !docs.is_empty() {
                self.sent.insert(s, docs);
            }
        }
        (all, self.invalid_configs())
    }

    /// Takes changed nodes; returns the changes for the table builder.
    pub fn update(&mut self, nodes: Vec<(DubboRef, Read)>) -> Vec<Change> {
        let mut affected = BTreeSet::new();
        let mut config_changed = false;
        for (node, read) in nodes {
            match &node {
                DubboRef::Provider(s, _) | DubboRef::Override(s, _) => {
                    affected.insert(s.clone());
                }
                DubboRef::Config(_) => config_changed = true,
            }
            self.note(node, read);
        }
        if config_changed {
            // Configurators and tag rules may apply to any service: recompute them all (only the
            // instances that change reach the builder).
            affected.extend(self.providers.keys().cloned());
            affected.extend(self.sent.keys().cloned());
        }
        let mut changes = self.resend(affected);
        if config_changed {
            changes.push(Change::ConfigInvalid(self.invalid_configs()));
        }
        changes
    }

    /// A `services_path` instance node appeared (`present`) or went: the service may start or
    /// stop clashing with a Dubbo service of the same name.
    pub fn native_changed(&mut self, service: &ServiceName, id: &str, present: bool) -> Vec<Change> {
        if !self.enabled {
            return Vec::new();
        }
        let before = self.native.get(service).is_some_and(|ids| !ids.is_empty());
        let ids = self.native.entry(service.clone()).or_default();
        if present {
            ids.insert(Arc::from(id));
        } else {
            ids.remove(id);
        }
        let after = !ids.is_empty();
        if ids.is_empty() {
            self.native.remove(service);
        }
        if before == after || !self.providers.contains_key(service) {
            return Vec::new();
        }
        self.resend(BTreeSet::from([service.clone()]))
    }

    /// The Dubbo services and their provider nodes, for `zkroute ctl`.
    pub fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.providers.keys()
    }

    /// The instance documents last sent for `service`.
    pub fn sent(&self, service: &ServiceName) -> Option<&BTreeMap<Arc<str>, Doc<Instance>>> {
        self.sent.get(service)
    }

    fn resend(&mut self, services: BTreeSet<ServiceName>) -> Vec<Change> {
        let mut changes = Vec::new();
        for s in services {
            let new = self.instances_of(&s);
            let old = self.sent.remove(&s).unwrap_or_default();
            for (id, doc) in &new {
                if old.get(id).is_none_or(|o| !same_doc(o, doc)) {
                    changes.push(Change::Instance { service: s.clone(), id: id.clone(), doc: Some(doc.clone()) });
                }
            }
            for id in old.keys().filter(|id| !new.contains_key(*id)) {
                changes.push(Change::Instance { service: s.clone(), id: id.clone(), doc: None });
            }
            if !new.is_empty() {
                self.sent.insert(s, new);
            }
        }
        changes
    }

    fn note(&mut self, node: DubboRef, read: Read) {
        match node {
            DubboRef::Provider(s, name) => {
                let providers = self.providers.entry(s.clone()).or_default();
                match read {
                    Read::Gone => {
                        providers.remove(&name);
                    }
                    Read::Data(raw) => {
                        providers.insert(name.clone(), Node { origin: raw.origin, url: parse_name(&name) });
                    }
                    // The name is the provider: Dubbo's consumers never read the data either.
                    Read::Unreadable(origin, _) => {
                        providers.insert(name.clone(), Node { origin, url: parse_name(&name) });
                    }
                }
                if providers.is_empty() {
                    self.providers.remove(&s);
                }
            }
            DubboRef::Override(s, name) => {
                let overrides = self.overrides.entry(s.clone()).or_default();
                if matches!(read, Read::Gone) {
                    overrides.remove(&name);
                } else {
                    overrides.insert(name.clone(), parse_name(&name).and_then(Override::from_url));
                }
                if overrides.is_empty() {
                    self.overrides.remove(&s);
                }
            }
            DubboRef::Config(name) => {
                if let Some(app) = name.strip_suffix(TAG_ROUTER_SUFFIX) {
                    note_config(&mut self.tag_rules, app, read, TagRuleDoc::parse);
                } else {
                    note_config(&mut self.configurators, &name, read, Configurators::parse);
                }
            }
        }
    }

    fn invalid_configs(&self) -> Vec<InvalidNode> {
        fn listed<T>(slots: &BTreeMap<String, Slot<T>>) -> impl Iterator<Item = InvalidNode> + '_ {
            slots.values().filter_map(|slot| {
                let (origin, reason) = slot.refused.as_ref()?;
                Some(InvalidNode {
                    kind: NodeKind::DubboConfig,
                    path: origin.path.to_string(),
                    reason: reason.clone(),
                    previous_in_force: slot.active.is_some(),
                    version: origin.version,
                    mzxid: origin.mzxid,
                })
            })
        }
        listed(&self.configurators).chain(listed(&self.tag_rules)).collect()
    }

    /// The instance documents of a service's providers, as a Dubbo consumer sees them.
    fn instances_of(&self, service: &ServiceName) -> BTreeMap<Arc<str>, Doc<Instance>> {
        let Some(providers) = self.providers.get(service) else { return BTreeMap::new() };
        let clash = self.native.contains_key(service).then(|| {
            format!(
                "the service name {service:?} is also under services_path ({}/{service}), whose instances win: \
                 this Dubbo provider is not routed",
                self.services_path
            )
        });
        // Configurators, each list in Dubbo's order: the registry's, the applications', the services'.
        let mut registry: Vec<&Override> =
            self.overrides.get(service).into_iter().flatten().filter_map(|(_, o)| o.as_ref().ok()?.as_ref()).collect();
        registry.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let documents = self.configurators.values().filter_map(|s| s.active.as_ref().map(|(c, _)| c));
        let (mut apps, mut services): (Vec<&Override>, Vec<&Override>) = (Vec::new(), Vec::new());
        for doc in documents {
            let list = if doc.application_scope() { &mut apps } else { &mut services };
            list.extend(doc.overrides.iter());
        }
        apps.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        services.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        let configurators: Vec<&Override> = registry.into_iter().chain(apps).chain(services).collect();

        let mut configured: Vec<(&String, &Node, Result<Params, String>)> = Vec::new();
        for (name, node) in providers {
            let params = match (&node.url, &clash) {
                (_, Some(reason)) => Err(reason.clone()),
                (Err(e), None) => Err(e.clone()),
                (Ok(url), None) => {
                    let mut params = url.params.clone();
                    let target = Target { host: &url.host, port: url.port, interface: &interface(url, service) };
                    for c in &configurators {
                        c.apply(&target, &mut params);
                    }
                    Ok(params)
                }
            };
            configured.push((name, node, params));
        }
        // The tag rule of the first provider's application, as Dubbo's consumer takes it.
        let rule = configured.iter().find_map(|(_, _, params)| {
            let app = param(params.as_ref().ok()?, "application")?;
            let (doc, _) = self.tag_rules.get(app)?.active.as_ref()?;
            doc.enabled.then(|| (app.to_owned(), doc.clone()))
        });
        let facts = rule.as_ref().map(|(app, doc)| {
            let urls = configured.iter().filter_map(|(_, n, _)| n.url.as_ref().ok());
            let urls: Vec<&DubboUrl> = urls.collect();
            let tags = doc
                .tags
                .iter()
                .map(|t| RuleTag {
                    name: t.name.as_str().into(),
                    addressed: t.has_addresses() || (doc.by_match(t) && urls.iter().any(|u| t.params_match(&u.params))),
                })
                .collect();
            Arc::new(TagRule { application: app.as_str().into(), force: doc.force, tags })
        });

        configured
            .into_iter()
            .map(|(name, node, params)| {
                let parsed = params.and_then(|params| {
                    let url = node.url.as_ref().map_err(Clone::clone)?;
                    let mut i = instance(url, params)?;
                    let assigned = rule.as_ref().map(|(_, doc)| {
                        doc.tags
                            .iter()
                            .filter(|t| {
                                if t.has_addresses() {
                                    t.address_matches(&url.host, url.port)
                                } else {
                                    doc.by_match(t) && t.params_match(&url.params)
                                }
                            })
                            .map(|t| Box::from(t.name.as_str()))
                            .collect()
                    });
                    let own = i.metadata.get("dubbo.tag").filter(|t| !t.is_empty()).map(Box::from);
                    i.tags = Some(Box::new(InstanceTags {
                        own,
                        assigned: assigned.unwrap_or_default(),
                        rule: facts.clone(),
                    }));
                    Ok(Arc::new(i))
                });
                (Arc::from(name.as_str()), Doc { origin: node.origin.clone(), parsed })
            })
            .collect()
    }
}

fn note_config<T>(
    slots: &mut BTreeMap<String, Slot<T>>,
    key: &str,
    read: Read,
    parse: impl Fn(&[u8]) -> Result<T, String>,
) {
    let (origin, parsed) = match read {
        Read::Gone => {
            slots.remove(key);
            return;
        }
        Read::Data(raw) => {
            let parsed = parse(&raw.data);
            (raw.origin, parsed)
        }
        Read::Unreadable(origin, reason) => (origin, Err(reason)),
    };
    let slot = slots.entry(key.to_owned()).or_insert(Slot { active: None, refused: None });
    match parsed {
        Ok(doc) => {
            slot.active = Some((Arc::new(doc), origin));
            slot.refused = None;
        }
        // The version in force, if any, stays: Dubbo keeps its last rule too.
        Err(reason) => slot.refused = Some((origin, reason)),
    }
}

fn parse_name(name: &str) -> Result<DubboUrl, String> {
    DubboUrl::parse(&url::decode(name)?)
}

/// The interface a provider serves: its `interface` parameter, its path, or its directory.
fn interface(url: &DubboUrl, service: &ServiceName) -> String {
    match url.param("interface") {
        Some(i) => i.to_owned(),
        None if !url.path.is_empty() => url.path.clone(),
        None => service.to_string(),
    }
}

/// The protocol a scheme is served over.
fn protocol(scheme: &str) -> InstanceProtocol {
    match scheme {
        "tri" | "grpc" => InstanceProtocol::H2,
        "rest" | "http" => InstanceProtocol::Http1,
        // dubbo://, and any other binary protocol: bytes relayed by TCP listeners.
        _ => InstanceProtocol::Tcp,
    }
}

/// A provider with its configured parameters, as an instance.
fn instance(url: &DubboUrl, params: Params) -> Result<Instance, String> {
    if url.port == 0 {
        return Err(format!("{}://{}: no port", url.scheme, url.host));
    }
    let addr = Addr::from_parts(&url.host, url.port).map_err(|e| e.to_string())?;
    let int = |name: &str| -> Result<Option<i64>, String> {
        param(&params, name)
            .map(|v| v.trim().parse::<i64>().map_err(|_| format!("{name}: {v:?} is not an integer")))
            .transpose()
    };
    let weight = match int("weight")? {
        None => crate::routing::DEFAULT_WEIGHT,
        // Dubbo counts a negative weight as 0.
        Some(w) => u32::try_from(w.max(0))
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| format!("weight: {w} is outside 0..={MAX_WEIGHT}"))?,
    };
    let enabled = match param(&params, "disabled") {
        Some(d) => !d.eq_ignore_ascii_case("true"),
        None => param(&params, "enabled").is_none_or(|e| e.eq_ignore_ascii_case("true")),
    };
    let warmup = match int("timestamp")? {
        Some(start_ms) if start_ms > 0 => {
            Some(Warmup { start_ms, period_ms: int("warmup")?.unwrap_or(DEFAULT_WARMUP_MS) })
        }
        _ => None,
    };
    // The zone Dubbo's zone-aware cluster reads (README: "Zone-aware routing").
    let zone = param(&params, "zone").map(str::trim).filter(|z| !z.is_empty()).map(str::to_owned);
    let metadata: Labels = params.into_iter().collect();
    Ok(Instance {
        weight,
        enabled,
        zone,
        metadata,
        protocol: Some(protocol(&url.scheme)),
        warmup,
        ..Instance::at(Format::Dubbo, addr)
    })
}

#[cfg(test)]
mod tests;
