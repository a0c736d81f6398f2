//! ZooKeeper source (README: "How it works", "Faults"). One persistent recursive watch per tree (services, rules,
//! policies); a changed node is re-read on its own, and whatever changed while one read was in
//! flight is read in the next batch, so bursts coalesce. Full reads (first, after reconnect, after
//! session expiry) go through multi-read in batches, after a `sync`.
//!
//! Watches and reconnects: zookeeper-client 0.11.2 does not re-register persistent watches after
//! a reconnect. Its `resend_watches` computes the highest watch kind with `index = index.max(index)`,
//! which never moves from 0, so it sends `SetWatches` with the data, exist and child lists only and
//! the persistent ones are dropped. ZooKeeper does not replay what changed while a client was away
//! either (ZOOKEEPER-4698). So every reconnect, however it is announced, costs the watches: they are
//! added again (the new ones before the old are dropped, which would remove the server-side watch)
//! and everything is re-read. Reconnects are taken from the session events the watchers deliver,
//! one per transition, as well as from the client's state watcher, which keeps only the latest
//! state and so can hide a Disconnected that was followed quickly by SyncConnected. Once the crate
//! re-sends persistent watches, the re-adding can go; the re-read cannot.
//!
//! Only connection and session errors fail a read. A node this session may not read (its ACL, or
//! wrong credentials) is skipped on its own and listed as invalid, like a node that does not parse.
//! Session expiry is terminal for a client: a new one is built, with backoff.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};
use zookeeper_client::{AddWatchMode, Client, EventType, SessionState};

use super::dubbo::{self, Catalog, DubboRef};
use super::{Update, UpdateSender, instance_change, policy_change, rule_change};
use crate::metrics::Metrics;
use crate::routing::build::{Change, Doc, Resync};
use crate::routing::table::InvalidNode;
use crate::routing::{NodeKind, Origin, ServiceName, SourceKind};
use crate::shutdown::Shutdown;
use crate::zookeeper::{
    Backoff, MULTI_READ_BATCH, NodeRead, Paths, REQUIRES_3_6, ZkSettings, children, inline, join, read_children,
    read_data, rfc3339_now,
};

/// How long to wait before trying a server again that lacks what zkroute needs.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(60);

/// What `/config` shows of the discovery session: flat, scalar, self-explanatory keys.
#[derive(Clone, Debug, Serialize)]
pub struct ZkStatus {
    /// "connecting", "connected", "disconnected", "expired" or "failed".
    pub state: &'static str,
    pub connected: bool,
    /// The session id in hex, while there is a session.
    pub session_id: Option<String>,
    /// The connect string (the client does not say which server of it is in use).
    pub server: String,
    /// When the last full read finished (RFC 3339, UTC).
    pub last_full_read: Option<String>,
    pub full_reads: u64,
    /// When the watches were last (re-)added (RFC 3339, UTC).
    pub watches_added: Option<String>,
    pub session_expirations: u64,
    /// The last error, while it lasts.
    pub error: Option<String>,
    /// No instance under the services path although there were some before (as the gauge
    /// `zkroute_services_empty`).
    pub services_empty: bool,
    /// The server lacks what zkroute needs (ZooKeeper 3.6 or later), as the gauge
    /// `zkroute_zk_server_unsupported`.
    pub server_unsupported: bool,
}

/// The discovery session's status, shared with `/config`.
pub type ZkStatusHandle = Arc<Mutex<ZkStatus>>;

impl ZkStatus {
    pub fn handle(connect: &str) -> ZkStatusHandle {
        Arc::new(Mutex::new(ZkStatus {
            state: "connecting",
            connected: false,
            session_id: None,
            server: connect.to_owned(),
            last_full_read: None,
            full_reads: 0,
            watches_added: None,
            session_expirations: 0,
            error: None,
            services_empty: false,
            server_unsupported: false,
        }))
    }
}

/// What the watchers report.
enum Watched {
    /// A node under one of the trees changed; `deleted`: it was deleted, there is nothing to read.
    Node { path: String, deleted: bool, at: Instant },
    /// The session went through a transition (each is reported once).
    Session(SessionState),
}

enum SessionEnd {
    Expired,
    Failed(String),
    /// The server answered UNIMPLEMENTED: it predates 3.6.
    Unsupported,
    Shutdown,
}

/// Reads and follows the three trees, sending updates to the control loop.
pub struct ZkSource {
    pub settings: ZkSettings,
    pub updates: UpdateSender,
    pub metrics: Arc<Metrics>,
    pub status: ZkStatusHandle,
}

/// The watch forwarders of a session; stopped when dropped.
#[derive(Default)]
struct Forwarders(Vec<inline::Handle>);

/// Where a session stands between full reads.
struct Follow {
    connected: bool,
    /// A full read is needed: the first of the session, or anything that may have cost the watches.
    need_sync: bool,
    /// Not before then (the random spread after a reconnect, or a retry's backoff).
    not_before: Instant,
}

impl ZkSource {
    fn set_status(&self, f: impl FnOnce(&mut ZkStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    /// Runs until shutdown: connect, follow, and on expiry start over with a new session.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        // What was read under the Dubbo root, kept across sessions like the table builder's catalog.
        let mut dubbo = Catalog::new(&self.settings.paths);
        loop {
            self.set_status(|s| {
                s.state = if s.state == "expired" || s.state == "failed" { s.state } else { "connecting" };
            });
            let client = tokio::select! {
                c = self.settings.connect() => c,
                _ = shutdown.wait() => return,
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(connect = %self.settings.connect, error = %e, retry_in = ?delay, "cannot reach ZooKeeper");
                    self.set_status(|s| s.error = Some(format!("cannot reach ZooKeeper: {e}")));
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.wait() => return,
                    }
                }
            };
            let session = format!("{:#x}", client.session_id().0);
            info!(connect = %self.settings.connect, %session, "ZooKeeper session established");
            self.metrics.zk_connected.set(1);
            self.set_status(|s| {
                s.state = "connected";
                s.connected = true;
                s.session_id = Some(session);
                s.error = None;
            });
            let end = self.follow(&client, &mut shutdown, &mut dubbo).await;
            self.metrics.zk_connected.set(0);
            self.set_status(|s| {
                s.connected = false;
                s.session_id = None;
            });
            let delay = match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Expired => {
                    self.metrics.zk_session_expirations.inc();
                    warn!("ZooKeeper session expired: starting a new one; the table in force keeps serving");
                    self.set_status(|s| {
                        s.state = "expired";
                        s.session_expirations += 1;
                        s.error = Some("session expired".into());
                    });
                    backoff.reset();
                    backoff.next_delay()
                }
                SessionEnd::Failed(reason) => {
                    self.set_status(|s| {
                        s.state = "failed";
                        s.error = Some(reason);
                    });
                    backoff.next_delay()
                }
                SessionEnd::Unsupported => {
                    error!(connect = %self.settings.connect, retry_in = ?UNSUPPORTED_RETRY, "{REQUIRES_3_6}");
                    self.metrics.zk_server_unsupported.set(1);
                    self.set_status(|s| {
                        s.state = "failed";
                        s.server_unsupported = true;
                        s.error = Some(REQUIRES_3_6.into());
                    });
                    UNSUPPORTED_RETRY
                }
            };
            drop(client);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// Follows one session until it ends.
    async fn follow(&self, client: &Client, shutdown: &mut Shutdown, dubbo: &mut Catalog) -> SessionEnd {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut state = client.state_watcher();
        let mut forwarders = Forwarders::default();
        let mut f = Follow { connected: true, need_sync: true, not_before: Instant::now() };
        let mut retry = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            let due = (f.need_sync && f.connected).then_some(f.not_before);
            tokio::select! {
                biased;
                _ = shutdown.wait() => return SessionEnd::Shutdown,
                s = state.changed() => {
                    if let Some(end) = self.on_session(s, &mut f) {
                        return end;
                    }
                }
                Some(first) = rx.recv() => {
                    let mut at = None;
                    // Per path, whether its latest event was a deletion.
                    let mut paths = BTreeMap::new();
                    let mut next = Some(first);
                    while let Some(w) = next.take().or_else(|| rx.try_recv().ok()) {
                        match w {
                            Watched::Node { path, deleted, at: t } => {
                                at = Some(at.map_or(t, |a: Instant| a.min(t)));
                                paths.insert(path, deleted);
                            }
                            Watched::Session(s) => {
                                if let Some(end) = self.on_session(s, &mut f) {
                                    return end;
                                }
                            }
                        }
                    }
                    // A pending full read reads these nodes too.
                    if paths.is_empty() || f.need_sync {
                        continue;
                    }
                    match self.read_changes(client, paths, dubbo).await {
                        Ok(changes) if changes.is_empty() => {}
                        Ok(changes) => {
                            self.updates.send(Update::new(changes, at.map(Instant::into_std)));
                        }
                        Err(e) => match session_end(&e) {
                            Some(end) => return end,
                            None => {
                                warn!(error = %e, "reading changed nodes failed; re-reading everything");
                                f.need_sync = true;
                            }
                        },
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    let read = tokio::select! {
                        r = self.watch_and_read(client, &tx, &mut forwarders, dubbo) => r,
                        _ = shutdown.wait() => return SessionEnd::Shutdown,
                    };
                    match read {
                        Ok(()) => {
                            f.need_sync = false;
                            retry.reset();
                            self.set_status(|s| s.error = None);
                        }
                        Err(e) => match session_end(&e) {
                            Some(end) => return end,
                            None => {
                                let delay = retry.next_delay();
                                warn!(error = %e, retry_in = ?delay, "full read of ZooKeeper failed");
                                self.set_status(|s| s.error = Some(format!("full read failed: {e}")));
                                f.not_before = Instant::now() + delay;
                            }
                        },
                    }
                }
            }
        }
    }

    /// Takes a session transition; the end of the session, if it is one.
    fn on_session(&self, s: SessionState, f: &mut Follow) -> Option<SessionEnd> {
        match s {
            SessionState::Disconnected => {
                f.need_sync = true;
                if f.connected {
                    f.connected = false;
                    self.metrics.zk_connected.set(0);
                    self.set_status(|s| {
                        s.state = "disconnected";
                        s.connected = false;
                    });
                    warn!("disconnected from ZooKeeper; serving the table in force while reconnecting");
                }
            }
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                // A transition to connected is a reconnect, whether or not the Disconnected
                // before it was seen: the watches are gone.
                f.need_sync = true;
                // After an ensemble member goes away every sidecar reconnects at once: spread
                // their full reads out rather than hitting the servers together.
                f.not_before = Instant::now() + self.settings.resync_jitter.mul_f64(fastrand::f64());
                if !f.connected {
                    f.connected = true;
                    self.metrics.zk_connected.set(1);
                    self.set_status(|s| {
                        s.state = "connected";
                        s.connected = true;
                    });
                    info!("reconnected to ZooKeeper: adding the watches again and re-reading everything");
                }
            }
            SessionState::Expired => return Some(SessionEnd::Expired),
            SessionState::AuthFailed => {
                warn!("ZooKeeper authentication failed");
                return Some(SessionEnd::Failed("authentication failed".into()));
            }
            SessionState::Closed => return Some(SessionEnd::Failed("session closed".into())),
        }
        None
    }

    /// Adds the watches (again), syncs, and reads everything.
    async fn watch_and_read(
        &self,
        client: &Client,
        events: &mpsc::UnboundedSender<Watched>,
        forwarders: &mut Forwarders,
        dubbo: &mut Catalog,
    ) -> Result<(), zookeeper_client::Error> {
        let started = std::time::Instant::now();
        let paths = &self.settings.paths;
        let mut fresh = Forwarders::default();
        let roots = [&paths.services, &paths.rules, &paths.policies].into_iter().chain(paths.dubbo.as_ref());
        for (i, root) in roots.enumerate() {
            let mut watcher = client.watch(root, AddWatchMode::PersistentRecursive).await?;
            let tx = events.clone();
            // Every watcher sees every session transition: one of them reports them.
            let sessions = i == 0;
            fresh.0.push(inline::spawn(async move {
                loop {
                    let event = watcher.changed().await;
                    let watched = if event.event_type == EventType::Session {
                        if !sessions && !event.session_state.is_terminated() {
                            continue;
                        }
                        Watched::Session(event.session_state)
                    } else {
                        let deleted = event.event_type == EventType::NodeDeleted;
                        Watched::Node { path: event.path, deleted, at: Instant::now() }
                    };
                    let terminal = matches!(&watched, Watched::Session(s) if s.is_terminated());
                    if tx.send(watched).is_err() || terminal {
                        // Polling again after a terminal event panics.
                        return;
                    }
                }
            }));
        }
        // The new watchers exist: dropping the old ones now keeps the server-side watches.
        *forwarders = fresh;
        self.set_status(|s| s.watches_added = Some(rfc3339_now()));
        // The server this session reads from may lag behind the leader (a new session can land on
        // any follower): catch it up before reading, so an older state is never published.
        client.sync("/").await?;
        let read = read_all(client, paths).await?;
        let resync = &read.resync;
        let nodes = resync.instances.len() + resync.rules.len() + resync.policies.len() + read.dubbo.len();
        self.metrics.zk_nodes_read.inc_by(nodes as u64);
        info!(
            instances = resync.instances.len(),
            rules = resync.rules.len(),
            policies = resync.policies.len(),
            dubbo_nodes = read.dubbo.len(),
            unreadable_directories = read.unreadable.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "read everything from ZooKeeper"
        );
        self.set_status(|s| {
            s.full_reads += 1;
            s.last_full_read = Some(rfc3339_now());
        });
        self.updates.send(Update::new(read.into_changes(dubbo), Some(started)));
        Ok(())
    }

    /// Re-reads changed nodes in one multi-read. A node whose latest event was its deletion is
    /// not read: events arrive in order, so a re-creation after it brings an event of its own.
    async fn read_changes(
        &self,
        client: &Client,
        paths: BTreeMap<String, bool>,
        dubbo: &mut Catalog,
    ) -> Result<Vec<Change>, zookeeper_client::Error> {
        // A node whose latest event is its deletion is gone: it needs no read.
        let mut reads = Vec::new();
        let mut wanted = Vec::new();
        for (path, deleted) in paths {
            match classify(&self.settings.paths, &path) {
                Some(node) if deleted => reads.push((path, node, NodeRead::Gone)),
                Some(node) => wanted.push((path, node)),
                None => {}
            }
        }
        if !wanted.is_empty() {
            let paths: Vec<&str> = wanted.iter().map(|(p, _)| p.as_str()).collect();
            let data = read_data(client, &paths).await?;
            self.metrics.zk_nodes_read.inc_by(wanted.len() as u64);
            debug!(nodes = wanted.len(), "re-read changed nodes");
            reads.extend(wanted.into_iter().zip(data).map(|((path, node), read)| (path, node, read)));
        }
        let mut changes = Vec::new();
        let mut dubbo_nodes = Vec::new();
        for (path, node, read) in reads {
            match node {
                NodeRef::Dubbo(d) => dubbo_nodes.push((d, dubbo_read(&path, read))),
                NodeRef::Instance(service, id) => {
                    // A services_path service wins a name clash with a Dubbo one.
                    let present = !matches!(read, NodeRead::Gone);
                    changes.extend(dubbo.native_changed(&service, &id, present));
                    changes.push(NodeRef::Instance(service, id).into_change(&path, read));
                }
                node => changes.push(node.into_change(&path, read)),
            }
        }
        if !dubbo_nodes.is_empty() {
            changes.extend(dubbo.update(dubbo_nodes));
        }
        Ok(changes)
    }
}

/// How an error ends the session, if it does; others fail one read, which is tried again.
fn session_end(e: &zookeeper_client::Error) -> Option<SessionEnd> {
    use zookeeper_client::Error;
    match e {
        Error::SessionExpired => Some(SessionEnd::Expired),
        Error::ClientClosed => Some(SessionEnd::Failed("client closed".into())),
        Error::AuthFailed => Some(SessionEnd::Failed("authentication failed".into())),
        Error::Unimplemented => Some(SessionEnd::Unsupported),
        _ => None,
    }
}

/// What a path under one of the trees is.
#[derive(Debug, PartialEq, Eq)]
enum NodeRef {
    Instance(ServiceName, String),
    Rule(String),
    Policy(ServiceName),
    Dubbo(DubboRef),
}

/// A node under the Dubbo root as read.
fn dubbo_read(path: &str, read: NodeRead) -> dubbo::Read {
    match read {
        NodeRead::Data(raw) => dubbo::Read::Data(raw),
        NodeRead::Gone => dubbo::Read::Gone,
        NodeRead::Unreadable(reason) => dubbo::Read::Unreadable(
            Origin { source: SourceKind::Zookeeper, path: Arc::from(path), mzxid: None, version: None },
            reason,
        ),
    }
}

impl NodeRef {
    fn into_change(self, path: &str, read: NodeRead) -> Change {
        let raw = match read {
            NodeRead::Data(raw) => Some(raw),
            NodeRead::Gone => None,
            NodeRead::Unreadable(reason) => {
                // Listed as invalid; a rule or policy keeps its previous version in force.
                let origin =
                    Origin { source: SourceKind::Zookeeper, path: Arc::from(path), mzxid: None, version: None };
                return match self {
                    NodeRef::Instance(service, id) => Change::Instance {
                        service,
                        id: Arc::from(id.as_str()),
                        doc: Some(Doc { origin, parsed: Err(reason) }),
                    },
                    NodeRef::Rule(id) => {
                        Change::Rule { id: Arc::from(id.as_str()), doc: Some(Doc { origin, parsed: Err(reason) }) }
                    }
                    NodeRef::Policy(service) => {
                        Change::Policy { service, doc: Some(Doc { origin, parsed: Err(reason) }) }
                    }
                    NodeRef::Dubbo(_) => unreachable!("Dubbo nodes go through the Dubbo catalog"),
                };
            }
        };
        match self {
            NodeRef::Instance(service, id) => instance_change(service, &id, raw),
            NodeRef::Rule(id) => rule_change(&id, raw),
            NodeRef::Policy(service) => policy_change(service, raw),
            NodeRef::Dubbo(_) => unreachable!("Dubbo nodes go through the Dubbo catalog"),
        }
    }
}

/// Classifies a changed path; None for the roots, service directories and deeper nodes.
fn classify(paths: &Paths, path: &str) -> Option<NodeRef> {
    let under = |root: &str| -> Option<Vec<&str>> {
        let rest = if root == "/" { path.strip_prefix('/')? } else { path.strip_prefix(root)?.strip_prefix('/')? };
        Some(rest.split('/').collect())
    };
    // The most specific root first, in case one tree is configured inside another.
    let mut roots = vec![(&paths.services, 0u8), (&paths.rules, 1), (&paths.policies, 2)];
    roots.extend(paths.dubbo.as_ref().map(|d| (d, 3)));
    roots.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
    for (root, kind) in roots {
        if kind == 3 {
            if under(root).is_some() {
                return DubboRef::classify(root, path).map(NodeRef::Dubbo);
            }
            continue;
        }
        if let Some(parts) = under(root) {
            return match (kind, parts.as_slice()) {
                (0, [service, id]) if !service.is_empty() && !id.is_empty() => {
                    Some(NodeRef::Instance(ServiceName::new(service), (*id).to_owned()))
                }
                (1, [id]) if !id.is_empty() => Some(NodeRef::Rule((*id).to_owned())),
                (2, [service]) if !service.is_empty() => Some(NodeRef::Policy(ServiceName::new(service))),
                _ => None,
            };
        }
    }
    None
}

/// A full read: the documents, the nodes under the Dubbo root, and the directories that could
/// not be listed.
pub struct FullRead {
    pub resync: Resync,
    pub dubbo: Vec<(DubboRef, dubbo::Read)>,
    pub unreadable: Vec<InvalidNode>,
}

impl FullRead {
    /// The changes that replace the catalog with this read; the Dubbo nodes go through `dubbo`,
    /// which becomes this read's.
    pub fn into_changes(mut self, dubbo: &mut Catalog) -> Vec<Change> {
        let mut native: std::collections::BTreeMap<ServiceName, BTreeSet<Arc<str>>> = Default::default();
        if dubbo.is_enabled() {
            for (service, id, _) in &self.resync.instances {
                native.entry(service.clone()).or_default().insert(id.clone());
            }
        }
        let (instances, invalid) = dubbo.replace(self.dubbo, native);
        self.resync.instances.extend(instances);
        vec![Change::Resync(self.resync), Change::Unreadable(self.unreadable), Change::ConfigInvalid(invalid)]
    }
}

fn unreadable_dir(kind: NodeKind, path: &str, reason: String) -> InvalidNode {
    InvalidNode { kind, path: path.to_owned(), reason, previous_in_force: false, version: None, mzxid: None }
}

/// Reads the three trees in full. A node or directory this session may not read is skipped on
/// its own; only connection and session errors fail the read.
pub async fn read_all(client: &Client, paths: &Paths) -> Result<FullRead, zookeeper_client::Error> {
    let mut resync =
        Resync { source: SourceKind::Zookeeper, instances: Vec::new(), rules: Vec::new(), policies: Vec::new() };
    let mut dubbo_nodes = Vec::new();
    let mut unreadable = Vec::new();
    let mut listed = |kind: NodeKind, path: &str, children: Result<Vec<String>, String>| match children {
        Ok(c) => c,
        Err(reason) => {
            unreadable.push(unreadable_dir(kind, path, reason));
            Vec::new()
        }
    };

    // Instances: the service directories, then their children, then the nodes.
    let services = listed(NodeKind::Instance, &paths.services, children(client, &paths.services).await?);
    let service_paths: Vec<String> = services.iter().map(|s| join(&paths.services, s)).collect();
    let mut refs = Vec::new();
    for ((service, path), ids) in services.iter().zip(&service_paths).zip(read_children(client, &service_paths).await?)
    {
        for id in listed(NodeKind::Instance, path, ids) {
            refs.push((join(path, &id), NodeRef::Instance(ServiceName::new(service), id)));
        }
    }
    let rule_ids = listed(NodeKind::Rule, &paths.rules, children(client, &paths.rules).await?);
    refs.extend(rule_ids.into_iter().map(|id| (join(&paths.rules, &id), NodeRef::Rule(id))));
    let policy_names = listed(NodeKind::Policy, &paths.policies, children(client, &paths.policies).await?);
    refs.extend(policy_names.into_iter().map(|s| (join(&paths.policies, &s), NodeRef::Policy(ServiceName::new(&s)))));
    // Dubbo: each interface's providers and configurators, and dubbo-admin's documents.
    if let Some(root) = &paths.dubbo {
        let interfaces = listed(NodeKind::Instance, root, children(client, root).await?);
        let dirs = dubbo::service_dirs(root, &interfaces);
        for (dir, nodes) in dirs.iter().zip(read_children(client, &dirs).await?) {
            for node in listed(NodeKind::Instance, dir, nodes) {
                let path = join(dir, &node);
                if let Some(r) = DubboRef::classify(root, &path) {
                    refs.push((path, NodeRef::Dubbo(r)));
                }
            }
        }
        let config = dubbo::config_dir(root);
        for node in listed(NodeKind::DubboConfig, &config, children(client, &config).await?) {
            if dubbo::is_config_node(&node) {
                refs.push((join(&config, &node), NodeRef::Dubbo(DubboRef::Config(node))));
            }
        }
    }

    // Read and parse batch by batch, so that the raw bytes of only one batch are alive at a time.
    let mut refs = refs.into_iter().peekable();
    while refs.peek().is_some() {
        let batch: Vec<(String, NodeRef)> = refs.by_ref().take(MULTI_READ_BATCH).collect();
        let batch_paths: Vec<&str> = batch.iter().map(|(p, _)| p.as_str()).collect();
        let data = read_data(client, &batch_paths).await?;
        for ((path, node), read) in batch.into_iter().zip(data) {
            if let NodeRef::Dubbo(d) = node {
                dubbo_nodes.push((d, dubbo_read(&path, read)));
                continue;
            }
            match node.into_change(&path, read) {
                Change::Instance { service, id, doc: Some(doc) } => resync.instances.push((service, id, doc)),
                Change::Rule { id, doc: Some(doc) } => resync.rules.push((id, doc)),
                Change::Policy { service, doc: Some(doc) } => resync.policies.push((service, doc)),
                _ => {}
            }
        }
    }
    Ok(FullRead { resync, dubbo: dubbo_nodes, unreadable })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            services: "/zkroute/services".into(),
            rules: "/zkroute/rules".into(),
            policies: "/zkroute/policies".into(),
            dubbo: Some("/dubbo".into()),
        }
    }

    #[test]
    fn paths_are_classified_by_tree_and_depth() {
        let p = paths();
        assert_eq!(
            classify(&p, "/zkroute/services/users/i-1"),
            Some(NodeRef::Instance(ServiceName::new("users"), "i-1".into()))
        );
        assert_eq!(classify(&p, "/zkroute/services/users"), None);
        assert_eq!(classify(&p, "/zkroute/services"), None);
        assert_eq!(classify(&p, "/zkroute/services/users/i-1/deeper"), None);
        assert_eq!(classify(&p, "/zkroute/rules/r1"), Some(NodeRef::Rule("r1".into())));
        assert_eq!(classify(&p, "/zkroute/policies/users"), Some(NodeRef::Policy(ServiceName::new("users"))));
        assert_eq!(classify(&p, "/zkroute/rulesX/r1"), None);
        assert_eq!(classify(&p, "/elsewhere"), None);
        let provider = "/dubbo/com.foo.Api/providers/dubbo%3A%2F%2F10.0.0.5%3A20880";
        assert_eq!(
            classify(&p, provider),
            Some(NodeRef::Dubbo(DubboRef::Provider(
                ServiceName::new("com.foo.Api"),
                "dubbo%3A%2F%2F10.0.0.5%3A20880".into()
            )))
        );
        assert!(matches!(
            classify(&p, "/dubbo/com.foo.Api/configurators/x"),
            Some(NodeRef::Dubbo(DubboRef::Override(..)))
        ));
        assert_eq!(
            classify(&p, "/dubbo/config/dubbo/app.tag-router"),
            Some(NodeRef::Dubbo(DubboRef::Config("app.tag-router".into())))
        );
        for ignored in [
            "/dubbo/com.foo.Api/consumers/x",
            "/dubbo/com.foo.Api/routers/x",
            "/dubbo/config/dubbo/a.condition-router",
            "/dubbo/com.foo.Api/providers",
            "/dubbo/metadata/com.foo.Api/provider/app",
        ] {
            assert_eq!(classify(&p, ignored), None, "{ignored}");
        }
    }

    #[test]
    fn a_root_chroot_tree_works() {
        let p = Paths { services: "/".into(), rules: "/r".into(), policies: "/p".into(), dubbo: None };
        assert_eq!(classify(&p, "/r/x"), Some(NodeRef::Rule("x".into())));
        assert_eq!(classify(&p, "/svc/i"), Some(NodeRef::Instance(ServiceName::new("svc"), "i".into())));
    }
}
