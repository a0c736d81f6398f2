//! ZooKeeper source (README: "How it works", "Faults"). One persistent recursive watch per tree (services, rules,
//! policies); a changed node is re-read on its own, and whatever changed while one read was in
//! flight is read in the next batch, so bursts coalesce. Full reads (first, after reconnect, after
//! session expiry) go through multi-read in batches.
//!
//! zookeeper-client 0.11 does not re-register persistent watches after a reconnect (its
//! `resend_watches` never sends them) and ZooKeeper does not replay what changed while a client
//! was away (ZOOKEEPER-4698), so after every reconnect the watches are added again (the new ones
//! before the old are dropped, which would remove the server-side watch) and everything is re-read.
//! Session expiry is terminal for a client: a new one is built, with backoff.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use zookeeper_client::{AddWatchMode, Client, EventType, MultiReadResult, SessionState, Stat};

use super::{Update, UpdateSender, instance_change, policy_change, rule_change};
use crate::metrics::Metrics;
use crate::routing::build::{Change, RawNode, Resync};
use crate::routing::{Origin, ServiceName, SourceKind};
use crate::shutdown::Shutdown;

/// Operations per multi-read request: keeps a reply well under ZooKeeper's 1 MB `jute.maxbuffer`
/// for documents of a few hundred bytes.
const MULTI_READ_BATCH: usize = 250;

/// Longest random delay before the full read that follows a reconnect.
const MAX_RESYNC_SPREAD: Duration = Duration::from_secs(2);

/// Where the three trees live, relative to the chroot.
#[derive(Clone, Debug)]
pub struct Paths {
    pub services: String,
    pub rules: String,
    pub policies: String,
}

/// How to reach ZooKeeper.
#[derive(Clone)]
pub struct ZkSettings {
    pub connect: String,
    pub session_timeout: Duration,
    pub paths: Paths,
    /// Digest credentials, "user:password".
    pub auth: Option<Vec<u8>>,
}

impl std::fmt::Debug for ZkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkSettings")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field("paths", &self.paths)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ZkSettings {
    /// Connects a new session (blocks for about the session timeout when no server answers).
    pub async fn connect(&self) -> Result<Client, zookeeper_client::Error> {
        let mut connector = Client::connector().with_session_timeout(self.session_timeout);
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth);
        }
        connector.connect(&self.connect).await
    }
}

/// Exponential backoff with full jitter, so that a fleet of sidecars does not reconnect in step.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, attempt: 0 }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], the ceiling doubling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A node event from one of the watches.
struct NodeEvent {
    path: String,
    at: Instant,
}

enum SessionEnd {
    Expired,
    Failed,
    Shutdown,
}

/// Reads and follows the three trees, sending updates to the control loop.
pub struct ZkSource {
    pub settings: ZkSettings,
    pub updates: UpdateSender,
    pub metrics: Arc<Metrics>,
}

impl ZkSource {
    /// Runs until shutdown: connect, follow, and on expiry start over with a new session.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let client = tokio::select! {
                c = self.settings.connect() => c,
                _ = shutdown.wait() => return,
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(connect = %self.settings.connect, error = %e, retry_in = ?delay, "cannot reach ZooKeeper");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => continue,
                        _ = shutdown.wait() => return,
                    }
                }
            };
            info!(connect = %self.settings.connect, session = ?client.session_id(), "ZooKeeper session established");
            self.metrics.zk_connected.set(1);
            let end = self.follow(&client, &mut shutdown).await;
            self.metrics.zk_connected.set(0);
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Expired => {
                    self.metrics.zk_session_expirations.inc();
                    warn!("ZooKeeper session expired: starting a new one; the table in force keeps serving");
                    backoff.reset();
                }
                SessionEnd::Failed => {}
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    /// Follows one session until it ends.
    async fn follow(&self, client: &Client, shutdown: &mut Shutdown) -> SessionEnd {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut state = client.state_watcher();
        let mut forwarders = Vec::new();
        let mut need_sync = true;
        let mut first = true;
        let mut resync_backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            if need_sync && client.state() == SessionState::SyncConnected {
                if !first {
                    // After an ensemble member goes away every sidecar reconnects at once: spread
                    // their full reads out rather than hitting the servers together.
                    let spread = (self.settings.session_timeout / 4).min(MAX_RESYNC_SPREAD);
                    tokio::time::sleep(spread.mul_f64(fastrand::f64())).await;
                }
                first = false;
                match self.watch_and_read(client, &events_tx, &mut forwarders).await {
                    Ok(()) => {
                        need_sync = false;
                        resync_backoff.reset();
                    }
                    Err(e) => match session_end(&e) {
                        Some(end) => return end,
                        None => {
                            let delay = resync_backoff.next_delay();
                            warn!(error = %e, retry_in = ?delay, "full read of ZooKeeper failed");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                    },
                }
            }
            tokio::select! {
                s = state.changed() => match s {
                    SessionState::Disconnected => {
                        self.metrics.zk_connected.set(0);
                        warn!("disconnected from ZooKeeper; serving the table in force while reconnecting");
                        need_sync = true;
                    }
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        self.metrics.zk_connected.set(1);
                        if need_sync {
                            info!("reconnected to ZooKeeper: adding the watches again and re-reading everything");
                        }
                    }
                    SessionState::Expired => return SessionEnd::Expired,
                    SessionState::AuthFailed => {
                        warn!("ZooKeeper authentication failed");
                        return SessionEnd::Failed;
                    }
                    SessionState::Closed => return SessionEnd::Failed,
                },
                Some(first) = events.recv() => {
                    let mut at = first.at;
                    let mut paths = BTreeSet::from([first.path]);
                    while let Ok(more) = events.try_recv() {
                        at = at.min(more.at);
                        paths.insert(more.path);
                    }
                    match self.read_changes(client, paths).await {
                        Ok(changes) if changes.is_empty() => {}
                        Ok(changes) => {
                            self.updates.send(Update::new(changes, Some(at)));
                        }
                        Err(e) => match session_end(&e) {
                            Some(end) => return end,
                            None => {
                                warn!(error = %e, "reading changed nodes failed; re-reading everything");
                                need_sync = true;
                            }
                        },
                    }
                }
                _ = shutdown.wait() => return SessionEnd::Shutdown,
            }
        }
    }

    /// Adds the three watches (again) and reads everything.
    async fn watch_and_read(
        &self,
        client: &Client,
        events: &mpsc::UnboundedSender<NodeEvent>,
        forwarders: &mut Vec<JoinHandle<()>>,
    ) -> Result<(), zookeeper_client::Error> {
        let started = Instant::now();
        let paths = &self.settings.paths;
        let mut fresh = Vec::with_capacity(3);
        for root in [&paths.services, &paths.rules, &paths.policies] {
            let mut watcher = client.watch(root, AddWatchMode::PersistentRecursive).await?;
            let tx = events.clone();
            fresh.push(tokio::spawn(async move {
                loop {
                    let event = watcher.changed().await;
                    if event.event_type == EventType::Session {
                        if event.session_state.is_terminated() {
                            // Polling again after a terminal event panics.
                            return;
                        }
                        continue;
                    }
                    if tx.send(NodeEvent { path: event.path, at: Instant::now() }).is_err() {
                        return;
                    }
                }
            }));
        }
        // The new watchers exist: dropping the old ones now keeps the server-side watches.
        for old in std::mem::replace(forwarders, fresh) {
            old.abort();
        }
        let resync = read_all(client, paths).await?;
        let nodes = resync.instances.len() + resync.rules.len() + resync.policies.len();
        self.metrics.zk_nodes_read.inc_by(nodes as u64);
        info!(
            instances = resync.instances.len(),
            rules = resync.rules.len(),
            policies = resync.policies.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "read everything from ZooKeeper"
        );
        self.updates.send(Update::new(vec![Change::Resync(resync)], Some(started)));
        Ok(())
    }

    /// Re-reads changed nodes in one multi-read.
    async fn read_changes(
        &self,
        client: &Client,
        paths: BTreeSet<String>,
    ) -> Result<Vec<Change>, zookeeper_client::Error> {
        let wanted: Vec<(String, NodeRef)> =
            paths.into_iter().filter_map(|p| classify(&self.settings.paths, &p).map(|r| (p, r))).collect();
        let data = read_data(client, wanted.iter().map(|(p, _)| p.as_str())).await?;
        self.metrics.zk_nodes_read.inc_by(wanted.len() as u64);
        debug!(nodes = wanted.len(), "re-read changed nodes");
        Ok(wanted.into_iter().zip(data).map(|((_, node), raw)| node.into_change(raw)).collect())
    }
}

fn session_end(e: &zookeeper_client::Error) -> Option<SessionEnd> {
    match e {
        zookeeper_client::Error::SessionExpired => Some(SessionEnd::Expired),
        zookeeper_client::Error::ClientClosed | zookeeper_client::Error::AuthFailed => Some(SessionEnd::Failed),
        _ => None,
    }
}

/// What a path under one of the trees is.
#[derive(Debug, PartialEq, Eq)]
enum NodeRef {
    Instance(ServiceName, String),
    Rule(String),
    Policy(ServiceName),
}

impl NodeRef {
    fn into_change(self, raw: Option<RawNode>) -> Change {
        match self {
            NodeRef::Instance(service, id) => instance_change(service, &id, raw),
            NodeRef::Rule(id) => rule_change(&id, raw),
            NodeRef::Policy(service) => policy_change(service, raw),
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
    let mut roots = [(&paths.services, 0u8), (&paths.rules, 1), (&paths.policies, 2)];
    roots.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
    for (root, kind) in roots {
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

fn join(root: &str, child: &str) -> String {
    if root == "/" { format!("/{child}") } else { format!("{root}/{child}") }
}

fn origin(path: &str, stat: &Stat) -> Origin {
    Origin {
        source: SourceKind::Zookeeper,
        path: Arc::from(path),
        mzxid: Some(stat.mzxid),
        version: Some(stat.version),
    }
}

/// Children of `path`; none if it does not exist.
async fn children(client: &Client, path: &str) -> Result<Vec<String>, zookeeper_client::Error> {
    match client.list_children(path).await {
        Ok(c) => Ok(c),
        Err(zookeeper_client::Error::NoNode) => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Reads the data of many nodes with multi-read, in batches; None for a node that is gone.
async fn read_data<'a>(
    client: &Client,
    paths: impl Iterator<Item = &'a str>,
) -> Result<Vec<Option<RawNode>>, zookeeper_client::Error> {
    let paths: Vec<&str> = paths.collect();
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(MULTI_READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for p in batch {
            reader.add_get_data(p)?;
        }
        let results = reader.commit().await?;
        for (p, result) in batch.iter().zip(results) {
            out.push(match result {
                MultiReadResult::Data { data, stat } => Some(RawNode { origin: origin(p, &stat), data }),
                MultiReadResult::Error { err: zookeeper_client::Error::NoNode } => None,
                MultiReadResult::Error { err } => return Err(err),
                MultiReadResult::Children { .. } => None,
                #[allow(unreachable_patterns)]
                _ => None,
            });
        }
    }
    Ok(out)
}

/// Lists the children of many nodes with multi-read, in batches; empty for a node that is gone.
async fn read_children(client: &Client, paths: &[String]) -> Result<Vec<Vec<String>>, zookeeper_client::Error> {
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(MULTI_READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for p in batch {
            reader.add_get_children(p)?;
        }
        for result in reader.commit().await? {
            out.push(match result {
                MultiReadResult::Children { children } => children,
                MultiReadResult::Error { err: zookeeper_client::Error::NoNode } => Vec::new(),
                MultiReadResult::Error { err } => return Err(err),
                _ => Vec::new(),
            });
        }
    }
    Ok(out)
}

/// Reads the three trees in full.
pub async fn read_all(client: &Client, paths: &Paths) -> Result<Resync, zookeeper_client::Error> {
    let services = children(client, &paths.services).await?;
    let service_paths: Vec<String> = services.iter().map(|s| join(&paths.services, s)).collect();
    let instance_ids = read_children(client, &service_paths).await?;
    let names: Vec<ServiceName> = services.iter().map(|s| ServiceName::new(s)).collect();
    let refs: Vec<(usize, String)> =
        instance_ids.into_iter().enumerate().flat_map(|(s, ids)| ids.into_iter().map(move |id| (s, id))).collect();
    // Read and parse batch by batch, so that the raw bytes of only one batch are alive at a time.
    let mut instances = Vec::with_capacity(refs.len());
    for batch in refs.chunks(MULTI_READ_BATCH) {
        let batch_paths: Vec<String> = batch.iter().map(|(s, id)| join(&service_paths[*s], id)).collect();
        let data = read_data(client, batch_paths.iter().map(String::as_str)).await?;
        for ((s, id), raw) in batch.iter().zip(data) {
            if let Change::Instance { service, id, doc: Some(doc) } = instance_change(names[*s].clone(), id, raw) {
                instances.push((service, id, doc));
            }
        }
    }

    let rule_ids = children(client, &paths.rules).await?;
    let data = read_data(
        client,
        rule_ids.iter().map(|id| join(&paths.rules, id)).collect::<Vec<_>>().iter().map(String::as_str),
    )
    .await?;
    let rules = rule_ids
        .iter()
        .zip(data)
        .filter_map(|(id, raw)| match rule_change(id, Some(raw?)) {
            Change::Rule { id, doc: Some(doc) } => Some((id, doc)),
            _ => None,
        })
        .collect();

    let policy_names = children(client, &paths.policies).await?;
    let policy_paths: Vec<String> = policy_names.iter().map(|s| join(&paths.policies, s)).collect();
    let data = read_data(client, policy_paths.iter().map(String::as_str)).await?;
    let policies = policy_names
        .iter()
        .zip(data)
        .filter_map(|(name, raw)| match policy_change(ServiceName::new(name), Some(raw?)) {
            Change::Policy { service, doc: Some(doc) } => Some((service, doc)),
            _ => None,
        })
        .collect();
    Ok(Resync { source: SourceKind::Zookeeper, instances, rules, policies })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths {
            services: "/zkroute/services".into(),
            rules: "/zkroute/rules".into(),
            policies: "/zkroute/policies".into(),
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
    }

    #[test]
    fn a_root_chroot_tree_works() {
        let p = Paths { services: "/".into(), rules: "/r".into(), policies: "/p".into() };
        assert_eq!(classify(&p, "/r/x"), Some(NodeRef::Rule("x".into())));
        assert_eq!(classify(&p, "/svc/i"), Some(NodeRef::Instance(ServiceName::new("svc"), "i".into())));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100), "{d:?}");
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
