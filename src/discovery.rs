//! The control plane. A source (ZooKeeper, or the static file) reads documents and sends
//! [`Update`]s; the control loop applies them to the [`Builder`], coalescing whatever arrived
//! meanwhile into one build, and publishes the table. Health changes arrive the same way.
//! Nothing here runs on the request path, and nothing here imports the proxy.

pub mod dubbo;
pub mod file;
pub mod formats;
pub(crate) mod snapshot;
pub(crate) mod swaps;
pub(crate) mod zk;

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::endpoint::StateRegistry;
use crate::metrics::Metrics;
use crate::routing::build::{Change, Delta, Doc, RawNode};
use crate::routing::{Builder, NodeKind, Policy, RouteWriter, RoutingTable, Rule, ServiceName, SourceKind};

/// A batch of changes from one source read.
#[derive(Debug)]
pub struct Update {
    pub changes: Vec<Change>,
    /// When the earliest event behind these changes arrived (for propagation time).
    pub observed_at: Option<Instant>,
}

impl Update {
    pub fn new(changes: Vec<Change>, observed_at: Option<Instant>) -> Self {
        Update { changes, observed_at }
    }
}

/// Where sources and health checkers send updates.
#[derive(Clone)]
pub struct UpdateSender(mpsc::UnboundedSender<Update>);

impl UpdateSender {
    /// Sends; false once the control loop has stopped.
    pub fn send(&self, update: Update) -> bool {
        self.0.send(update).is_ok()
    }

    /// Tells the control loop that endpoints of these services changed health.
    pub fn health_changed(&self, services: Vec<ServiceName>) {
        let _ = self.0.send(Update::new(vec![Change::Health(services)], None));
    }
}

/// Parses an instance node into a change.
pub fn instance_change(service: ServiceName, id: &str, node: Option<RawNode>) -> Change {
    let doc = node.map(|n| Doc {
        parsed: formats::parse_instance(&n.data).map(Arc::new).map_err(|e| e.to_string()),
        origin: n.origin,
    });
    Change::Instance { service, id: Arc::from(id), doc }
}

/// Parses a rule node into a change.
pub fn rule_change(id: &str, node: Option<RawNode>) -> Change {
    let doc = node
        .map(|n| Doc { parsed: Rule::parse(id, &n.data).map(Arc::new).map_err(|e| e.to_string()), origin: n.origin });
    Change::Rule { id: Arc::from(id), doc }
}

/// Parses a policy node into a change.
pub fn policy_change(service: ServiceName, node: Option<RawNode>) -> Change {
    let doc =
        node.map(|n| Doc { parsed: Policy::parse(&n.data).map(Arc::new).map_err(|e| e.to_string()), origin: n.origin });
    Change::Policy { service, doc }
}

/// Called with every table published, after the swap, and what changed since the previous one
/// (snapshot writing, health checks, gauges).
pub type OnPublish = Box<dyn FnMut(&Arc<RoutingTable>, &Delta) + Send>;

/// The control loop: owns the builder and the writer.
pub struct Control {
    pub builder: Builder,
    pub writer: RouteWriter,
    pub metrics: Arc<Metrics>,
    pub states: Arc<StateRegistry>,
    pub on_publish: Vec<OnPublish>,
    /// The last swaps, for `/config` and the dashboard.
    pub swaps: swaps::SwapLog,
}

impl Control {
    /// Runs until every sender is dropped.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Update>) {
        let mut synced = false;
        let mut live = false;
        let mut sweeps = SweepSchedule::new(Instant::now());
        let sweep = tokio::time::sleep_until(sweeps.next.into());
        tokio::pin!(sweep);
        // When the weights of instances warming up are next recomputed.
        let mut warm_due: Option<tokio::time::Instant> = None;
        // Resolved once: a lookup by label per swap hashes and locks.
        let invalid = NodeKind::ALL.map(|k| self.metrics.invalid_nodes.with_label_values(&[k.as_str()]));
        loop {
            let first = tokio::select! {
                u = rx.recv() => match u { Some(u) => u, None => return },
                () = &mut sweep => {
                    sweeps.tick(&self.states, Instant::now());
                    sweep.as_mut().reset(sweeps.next.into());
                    continue;
                }
                _ = tokio::time::sleep_until(warm_due.unwrap_or_else(tokio::time::Instant::now)), if warm_due.is_some() => {
                    self.builder.warm_up();
                    if synced && self.builder.is_dirty() {
                        let table = self.publish(None, None, false, &invalid);
                        if sweeps.published(&table, Instant::now()) {
                            sweep.as_mut().reset(sweeps.next.into());
                        }
                    }
                    warm_due = self.builder.warmup_step().map(|step| tokio::time::Instant::now() + step);
                    continue;
                }
            };
            let mut observed_at = first.observed_at;
            let mut zxid = None;
            let mut pending = vec![first];
            while let Ok(more) = rx.try_recv() {
                observed_at = match (observed_at, more.observed_at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                pending.push(more);
            }
            for update in pending {
                for change in update.changes {
                    if let Change::Resync(r) = &change {
                        if r.source == SourceKind::Snapshot {
                            if live {
                                // ZooKeeper answered first: the snapshot is out of date.
                                continue;
                            }
                            warn!("serving the routing table from the snapshot until ZooKeeper answers");
                        } else {
                            live = true;
                        }
                        synced = true;
                    }
                    zxid = zxid.max(highest_mzxid(&change));
                    self.builder.apply(change);
                }
            }
            if synced && self.builder.is_dirty() {
                let table = self.publish(observed_at, zxid, true, &invalid);
                if sweeps.published(&table, Instant::now()) {
                    sweep.as_mut().reset(sweeps.next.into());
                }
            }
            if warm_due.is_none() {
                warm_due = self.builder.warmup_step().map(|step| tokio::time::Instant::now() + step);
            }
        }
    }

    /// Builds and swaps a table. `zxid`: the highest mzxid of the nodes this swap's changes came
    /// from (none when they were only deletions or health), so that a writer can tell when a
    /// sidecar applied its write. `record`: list the swap in `recent_swaps` (not done for the
    /// scheduled rebuilds of a warm-up ramp, which would crowd out every other swap). `invalid`:
    /// the `zkroute_invalid_nodes` gauge of each [`NodeKind::ALL`].
    fn publish(
        &mut self,
        observed_at: Option<Instant>,
        zxid: Option<i64>,
        record: bool,
        invalid: &[IntGauge; 4],
    ) -> Arc<RoutingTable> {
        let started = Instant::now();
        let (table, delta) = self.builder.build();
        let table = Arc::new(table);
        self.writer.publish(table.clone());
        let m = &self.metrics;
        m.table_build_duration.observe(started.elapsed().as_secs_f64());
        if let Some(at) = observed_at {
            m.discovery_propagation.observe(at.elapsed().as_secs_f64());
        }
        m.table_version.set(i64::try_from(table.version).unwrap_or(i64::MAX));
        m.table_updates.inc();
        if let Some(z) = zxid {
            m.table_zxid.set(m.table_zxid.get().max(z));
        }
        for (kind, gauge) in NodeKind::ALL.into_iter().zip(invalid) {
            gauge.set(table.invalid_count(kind) as i64);
        }
        m.snapshot_in_use.set(i64::from(table.source == SourceKind::Snapshot));
        if delta.is_empty() {
            debug!(version = table.version, "routing table rebuilt (health)");
        } else {
            info!(
                version = table.version,
                source = %table.source,
                services = table.services.len(),
                instances_added = delta.instances_added,
                instances_removed = delta.instances_removed,
                instances_changed = delta.instances_changed,
                rules_added = delta.rules_added,
                rules_removed = delta.rules_removed,
                rules_changed = delta.rules_changed,
                policies_changed = delta.policies_changed,
                changed_services = ?delta.services.iter().take(8).map(|s| s.as_str()).collect::<Vec<_>>(),
                build_us = started.elapsed().as_micros() as u64,
                zxid,
                "routing table swapped"
            );
        }
        if record {
            self.swaps.record(swaps::SwapRecord::new(
                &table,
                &delta,
                started.elapsed(),
                observed_at.map(|at| at.elapsed()),
            ));
        }
        for hook in &mut self.on_publish {
            hook(&table, &delta);
        }
        table
    }
}

/// When the control loop walks the endpoint states to forget those no table holds any more
/// ([`StateRegistry::sweep`]). A walk touches every state, so it happens only when a state may
/// have been let go since the last walk: after a swap (the builder and the new table hold what
/// they use), when a replaced table ends (the last request on it finished), while a state waits
/// out its retention, and at least every [`Self::FORCED`] for holders that are none of these (a
/// health probe that ends after its table). While one of the first three may come, the loop
/// looks every [`Self::TICK`]; otherwise it sleeps until the forced walk, so that an idle sidecar
/// does not wake for nothing.
struct SweepSchedule {
    due: bool,
    /// When the states were last walked.
    walked: Instant,
    /// When the loop should call [`Self::tick`] next.
    next: Instant,
    current: Weak<RoutingTable>,
    /// Tables replaced while something still held them.
    retired: Vec<Weak<RoutingTable>>,
}

impl SweepSchedule {
    const TICK: Duration = Duration::from_secs(3);
    const FORCED: Duration = Duration::from_secs(30);

    fn new(now: Instant) -> Self {
        SweepSchedule { due: true, walked: now, next: now + Self::TICK, current: Weak::new(), retired: Vec::new() }
    }

    /// A table was swapped in; returns whether that brought the next tick forward.
    fn published(&mut self, table: &Arc<RoutingTable>, now: Instant) -> bool {
        let previous = std::mem::replace(&mut self.current, Arc::downgrade(table));
        if previous.strong_count() > 0 {
            self.retired.push(previous);
        }
        self.due = true;
        let sooner = now + Self::TICK;
        let moved = sooner < self.next;
        self.next = self.next.min(sooner);
        moved
    }

    /// Walks the states if a walk is due, and sets the next tick; returns whether it walked.
    fn tick(&mut self, states: &StateRegistry, now: Instant) -> bool {
        let held = self.retired.len();
        self.retired.retain(|t| t.strong_count() > 0);
        let walk = self.due || self.retired.len() < held || now >= self.walked + Self::FORCED;
        if walk {
            self.due = states.sweep();
            self.walked = now;
        }
        self.next = if self.due || !self.retired.is_empty() { now + Self::TICK } else { self.walked + Self::FORCED };
        walk
    }
}

/// Instances the registry holds in `table` (those kept by `protect_from_empty` not counted).
pub fn registered_instances(table: &RoutingTable) -> usize {
    table.services.values().filter(|s| !s.protected).map(|s| s.instances.len()).sum()
}

/// Whether any service holds a registered instance: the first one found answers, where
/// [`registered_instances`] walks every service (each publish asks; a table of 10,000 services
/// would be walked per change).
pub fn has_registered_instances(table: &RoutingTable) -> bool {
    table.services.values().any(|s| !s.protected && !s.instances.is_empty())
}

/// Watches for a registry that suddenly holds no instance at all although it held some (a
/// services root deleted or emptied, a wrong chroot): warns once and raises
/// `zkroute_services_empty` until instances are back. The snapshot writer, for its part, never
/// writes such a table.
pub fn empty_registry_alarm(metrics: Arc<Metrics>, status: Option<zk::ZkStatusHandle>) -> OnPublish {
    let mut had_instances = false;
    let mut raised = false;
    Box::new(move |table: &Arc<RoutingTable>, _: &Delta| {
        let any = has_registered_instances(table);
        let now_empty = !any && had_instances && table.source != SourceKind::Snapshot;
        if now_empty != raised {
            raised = now_empty;
            metrics.services_empty.set(i64::from(raised));
            if let Some(s) = status.as_ref().and_then(|s| s.lock().ok()).as_deref_mut() {
                s.services_empty = raised;
            }
            if raised {
                warn!(
                    "the registry holds no instance any more (services_path missing or emptied): routing to services                      has stopped unless protect_from_empty keeps them; the snapshot keeps the last table with instances"
                );
            } else {
                info!(instances = registered_instances(table), "the registry holds instances again");
            }
        }
        had_instances |= any;
    })
}

/// The highest mzxid among the nodes a change was read from; none for a deletion, health, or
/// nodes that could not be read.
fn highest_mzxid(change: &Change) -> Option<i64> {
    match change {
        Change::Instance { doc, .. } => doc.as_ref()?.origin.mzxid,
        Change::Rule { doc, .. } => doc.as_ref()?.origin.mzxid,
        Change::Policy { doc, .. } => doc.as_ref()?.origin.mzxid,
        Change::Resync(r) => {
            let instances = r.instances.iter().map(|(_, _, d)| d.origin.mzxid);
            let rules = r.rules.iter().map(|(_, d)| d.origin.mzxid);
            instances.chain(rules).chain(r.policies.iter().map(|(_, d)| d.origin.mzxid)).max().flatten()
        }
        Change::Health(_) | Change::Unreadable(_) | Change::Local { .. } | Change::ConfigInvalid(_) => None,
    }
}

/// Creates the update channel.
pub fn updates() -> (UpdateSender, mpsc::UnboundedReceiver<Update>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (UpdateSender(tx), rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::build::{Defaults, Resync};
    use crate::routing::{Origin, SourceKind};

    #[test]
    fn states_are_walked_only_when_one_may_have_been_let_go() {
        let states = Arc::new(StateRegistry::new(Duration::ZERO));
        let mut b = Builder::new(vec![], Defaults::default(), states.clone(), Arc::new(Metrics::new(true)));
        b.apply(Change::Resync(Resync {
            source: SourceKind::File,
            instances: vec![],
            rules: vec![],
            policies: vec![],
        }));
        let node = |host: u8| {
            let origin = Origin { source: SourceKind::File, path: "/s/1".into(), mzxid: None, version: None };
            Some(RawNode { origin, data: format!("10.0.0.{host}:80").into_bytes() })
        };
        let s = || ServiceName::new("s");
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let mut sweeps = SweepSchedule::new(t0);

        b.apply(instance_change(s(), "1", node(1)));
        let first = Arc::new(b.build().0);
        assert!(!sweeps.published(&first, at(1)), "the first tick is already sooner");
        assert!(sweeps.tick(&states, at(3)), "a swap may let states go");
        assert_eq!(sweeps.next, at(33), "nothing can be let go: the next look is the forced walk");
        assert!(!sweeps.tick(&states, at(6)), "nothing happened since");

        // The instance moves while a request still holds the table with its old address.
        b.apply(instance_change(s(), "1", node(2)));
        let second = Arc::new(b.build().0);
        assert!(sweeps.published(&second, at(7)), "a swap brings the next look forward");
        assert_eq!(sweeps.next, at(10));
        assert!(sweeps.tick(&states, at(10)));
        assert_eq!(states.len(), 2, "the first table still holds the old address's state");
        assert_eq!(sweeps.next, at(13), "while a replaced table is held, look again soon");
        assert!(!sweeps.tick(&states, at(13)), "nothing happened since");

        drop(first);
        assert!(sweeps.tick(&states, at(16)), "the replaced table ended");
        assert_eq!(states.len(), 1, "the old address's state is forgotten as soon as its table ends");
        assert_eq!(sweeps.next, at(46));

        assert!(!sweeps.tick(&states, at(45)));
        assert!(sweeps.tick(&states, at(46)), "a walk at least every FORCED");
    }
}
