//! Naming: registering the local app in ZooKeeper (README: "Registering the local app"), the way Curator
//! and SmartStack Nerve do. Each entry gets an ephemeral node holding a Curator x-discovery
//! document (so Curator, Spring Cloud Zookeeper and zkroute itself all discover it), present only
//! while the app passes its health check (with rise and fall thresholds, so a flapping app does
//! not churn ZooKeeper). The node lives in a session of its own: after an expiry it is created
//! again in a new one.
//!
//! Whose node is it? While a node exists ZooKeeper counts its owner session as alive, so a
//! restarted sidecar cannot tell its own predecessor's node from a rival's by the session alone.
//! Each node therefore carries an owner token (see [`owner_token`]): a node with this sidecar's
//! token is replaced at once (its predecessor, or its own expired session), one with another
//! token is left alone until it goes (its owner deregisters or its session ends), and the
//! conflict is logged once and shown in `/config` and `zkroute_registration_conflict`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use zookeeper_client::{Acls, Client, CreateMode, SessionState, Stat};

use crate::config::{HumanDuration, RegisterCheck, RegisterConfig};
use crate::health::probe;
use crate::metrics::Metrics;
use crate::routing::Addr;
use crate::zookeeper::{Backoff, ZkSettings};

/// What `/config` shows of one registration.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub service: String,
    pub id: String,
    pub path: String,
    /// The node exists in ZooKeeper now.
    pub registered: bool,
    /// The local app passes its check (with rise and fall applied).
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_check: Option<String>,
    /// Another owner (same id, another sidecar or app) holds the node: this one waits for it to go.
    pub conflict: bool,
    /// The session (hex) holding the node in a conflict.
    pub conflict_owner: Option<String>,
}

/// The top-level field of the node's document holding the owner token. Curator's
/// `JsonInstanceSerializer` ignores unknown fields (it turns `FAIL_ON_UNKNOWN_PROPERTIES` off),
/// and so do zkroute's own parser and Spring Cloud Zookeeper, which reads through Curator.
pub const OWNER_FIELD: &str = "zkrouteOwner";

/// This sidecar's owner token. With `zookeeper.snapshot` set, a random token kept in a file
/// beside it (`<snapshot>.owner`), created on first use: each sidecar with its own state keeps
/// its own token across restarts. Otherwise the host name: a restart on the same host is
/// recognized, another host is not (two sidecars on one host registering the same id cannot be
/// told apart without a snapshot path each).
pub fn owner_token(snapshot: Option<&Path>) -> String {
    if let Some(snapshot) = snapshot {
        let mut name = snapshot.as_os_str().to_owned();
        name.push(".owner");
        let file = std::path::PathBuf::from(name);
        match std::fs::read_to_string(&file) {
            Ok(t) if !t.trim().is_empty() => return t.trim().to_owned(),
            _ => {
                let token = format!("{:032x}", fastrand::u128(..));
                match crate::discovery::snapshot::write_atomic(&file, token.as_bytes()) {
                    Ok(()) => return token,
                    Err(e) => {
                        warn!(file = %file.display(), error = %e, "cannot keep the registration owner token; using the host name")
                    }
                }
            }
        }
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".into());
    format!("host:{host}")
}

/// The owner token a node's document carries, if any.
fn token_of(data: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(data).ok()?;
    doc.get(OWNER_FIELD)?.as_str().map(str::to_owned)
}

/// The stable node name of an entry: configured, or `address:port`.
pub fn instance_id(r: &RegisterConfig) -> String {
    r.id.clone().unwrap_or_else(|| format!("{}:{}", r.address, r.port))
}

/// The Curator x-discovery document of an entry. `payload` is Spring Cloud's ZookeeperInstance
/// with `metadata`, plus `weight` and `zone` where zkroute reads them, typed by the entry's
/// `payload_class` (none when empty); `owner` is the token.
pub fn document(r: &RegisterConfig, enabled: bool, registered_at: SystemTime, owner: &str) -> Vec<u8> {
    let id = instance_id(r);
    let mut payload = json!({
        "id": r.service,
        "name": r.service,
        "metadata": r.payload.metadata,
    });
    if !r.payload_class.is_empty() {
        payload["@class"] = json!(r.payload_class);
    }
    if let Some(w) = r.payload.weight {
        payload["weight"] = json!(w);
    }
    if let Some(z) = &r.payload.zone {
        payload["zone"] = json!(z);
    }
    let millis = registered_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let doc = json!({
        "name": r.service,
        "id": id,
        "address": r.address,
        "port": r.port,
        "sslPort": null,
        "payload": payload,
        "registrationTimeUTC": millis,
        "serviceType": "DYNAMIC",
        "uriSpec": {"parts": [
            {"value": "scheme", "variable": true}, {"value": "://", "variable": false},
            {"value": "address", "variable": true}, {"value": ":", "variable": false},
            {"value": "port", "variable": true}
        ]},
        "enabled": enabled,
        OWNER_FIELD: owner,
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The running registrations.
pub struct Registrations {
    status: Arc<Mutex<Vec<Status>>>,
    stop: mpsc::UnboundedSender<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// The longest `drain_delay` of the entries.
    max_drain: Duration,
}

impl Registrations {
    /// Starts a health loop per entry and the session that keeps the nodes, which carry `owner`
    /// (see [`owner_token`]).
    pub fn start(
        settings: ZkSettings,
        entries: Vec<RegisterConfig>,
        metrics: Arc<Metrics>,
        owner: String,
    ) -> Registrations {
        let status: Arc<Mutex<Vec<Status>>> = Arc::new(Mutex::new(
            entries
                .iter()
                .map(|e| Status {
                    service: e.service.clone(),
                    id: instance_id(e),
                    path: format!("{}/{}/{}", settings.paths.services, e.service, instance_id(e)),
                    registered: false,
                    healthy: false,
                    last_check: None,
                    conflict: false,
                    conflict_owner: None,
                })
                .collect(),
        ));
        for e in &entries {
            metrics.registered.with_label_values(&[e.service.as_str()]).set(0);
            metrics.registration_conflict.with_label_values(&[e.service.as_str()]).set(0);
        }
        let max_drain = entries.iter().map(|e| e.drain_delay.0).max().unwrap_or_default();
        let mut tasks = Vec::new();
        let mut wants = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let (tx, rx) = watch::channel(entry.health_check.is_none());
            wants.push(rx);
            if let Some(check) = entry.health_check.clone() {
                tasks.push(tokio::spawn(health_loop(entry.clone(), check, tx, status.clone(), i)));
            } else if let Ok(mut s) = status.lock() {
                s[i].healthy = true;
            }
        }
        let (stop, stop_rx) = mpsc::unbounded_channel();
        let written = vec![None; entries.len()];
        let session = Session {
            settings,
            entries,
            wants,
            status: status.clone(),
            metrics,
            registered_at: SystemTime::now(),
            owner,
            written,
        };
        tasks.push(tokio::spawn(session.run(stop_rx)));
        Registrations { status, stop, tasks, max_drain }
    }

    /// A handle on the status, for `/config`.
    pub fn status_handle(&self) -> Arc<Mutex<Vec<Status>>> {
        self.status.clone()
    }

    /// Deregisters every entry: marks its node as draining (`enabled: false`), keeps it so for
    /// the entry's `drain_delay`, then deletes it (with the version it wrote). Waits for that, up
    /// to the longest `drain_delay` plus `timeout` for ZooKeeper to answer. Registration stops
    /// for good. This is the one way out, for SIGTERM as for an operator's drain.
    pub async fn deregister(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.stop.send(tx).is_ok() {
            let _ = tokio::time::timeout(self.max_drain + timeout, rx).await;
        }
    }
}

impl Drop for Registrations {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Checks the local app and publishes whether it should be registered.
async fn health_loop(
    entry: RegisterConfig,
    check: RegisterCheck,
    want: watch::Sender<bool>,
    status: Arc<Mutex<Vec<Status>>>,
    i: usize,
) {
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut healthy = false;
    loop {
        let result = check_app(&entry, &check).await;
        match &result {
            Ok(_) => {
                passes += 1;
                fails = 0;
            }
            Err(_) => {
                fails += 1;
                passes = 0;
            }
        }
        if !healthy && passes >= check.rise {
            healthy = true;
            info!(service = %entry.service, "local app passes its check: registering");
        } else if healthy && fails >= check.fall {
            healthy = false;
            warn!(service = %entry.service, "local app fails its check: deregistering");
        }
        if let Ok(mut s) = status.lock() {
            s[i].healthy = healthy;
            s[i].last_check = Some(match &result {
                Ok(d) => format!("ok: {d}"),
                Err(d) => format!("failed: {d}"),
            });
        }
        want.send_if_modified(|w| std::mem::replace(w, healthy) != healthy);
        tokio::time::sleep(check.interval.0).await;
    }
}

async fn check_app(entry: &RegisterConfig, check: &RegisterCheck) -> Result<probe::Passed, probe::ProbeError> {
    let HumanDuration(timeout) = check.timeout;
    match (check.kind.as_str(), &check.url) {
        ("http", Some(url)) => {
            let (addr, host, path) = probe::parse_url(url)?;
            probe::probe(&addr, probe::Probe::Http { host, path }, timeout, "zkroute-register").await
        }
        _ => {
            let addr = Addr::from_parts(&entry.address, entry.port)?;
            probe::probe(&addr, probe::Probe::Tcp, timeout, "zkroute-register").await
        }
    }
}

struct Session {
    settings: ZkSettings,
    entries: Vec<RegisterConfig>,
    wants: Vec<watch::Receiver<bool>>,
    status: Arc<Mutex<Vec<Status>>>,
    metrics: Arc<Metrics>,
    registered_at: SystemTime,
    owner: String,
    /// Per entry: the session and node version of what this process last wrote.
    written: Vec<Option<(i64, i32)>>,
}

enum End {
    Expired,
    Stopped,
}

impl Session {
    async fn run(mut self, mut stop: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let client = tokio::select! {
                c = self.settings.connect() => c,
                Some(ack) = stop.recv() => { let _ = ack.send(()); return; }
            };
            let client = match client {
                Ok(c) => c,
                Err(e) => {
                    let delay = backoff.next_delay();
                    warn!(error = %e, retry_in = ?delay, "registration: cannot reach ZooKeeper");
                    tokio::time::sleep(delay).await;
                    continue;
                }
            };
            backoff.reset();
            match self.serve(&client, &mut stop).await {
                End::Stopped => return,
                End::Expired => {
                    warn!("registration session expired: registering again in a new session");
                    self.set_all_registered(false);
                }
            }
        }
    }

    async fn serve(&mut self, client: &Client, stop: &mut mpsc::UnboundedReceiver<oneshot::Sender<()>>) -> End {
        let mut state = client.state_watcher();
        let mut verify = tokio::time::interval(Duration::from_secs(10));
        // A node held by another owner wakes the loop when it changes or goes.
        let (kick_tx, mut kick) = mpsc::unbounded_channel::<()>();
        loop {
            if client.state() == SessionState::SyncConnected {
                for i in 0..self.entries.len() {
                    let want = *self.wants[i].borrow_and_update();
                    if let Err(e) = self.reconcile(client, i, want, &kick_tx).await {
                        if e == zookeeper_client::Error::SessionExpired {
                            return End::Expired;
                        }
                        warn!(service = %self.entries[i].service, error = %e, "registration: ZooKeeper write failed");
                    }
                }
            }
            let changed = async {
                // An entry without a check has no sender: it never changes.
                let futures = self.wants.iter_mut().map(|w| {
                    Box::pin(async move {
                        if w.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    })
                });
                futures_select_all(futures).await
            };
            tokio::select! {
                _ = changed => {}
                s = state.changed() => match s {
                    SessionState::Expired => return End::Expired,
                    SessionState::Closed | SessionState::AuthFailed => return End::Expired,
                    _ => {}
                },
                _ = verify.tick() => {}
                Some(()) = kick.recv() => {}
                Some(ack) = stop.recv() => {
                    self.deregister_all(client).await;
                    let _ = ack.send(());
                    return End::Stopped;
                }
            }
        }
    }

    fn path(&self, i: usize) -> String {
        let e = &self.entries[i];
        format!("{}/{}/{}", self.settings.paths.services, e.service, instance_id(e))
    }

    fn set_registered(&self, i: usize, registered: bool) {
        self.metrics.registered.with_label_values(&[self.entries[i].service.as_str()]).set(i64::from(registered));
        if let Ok(mut s) = self.status.lock() {
            s[i].registered = registered;
        }
    }

    fn set_all_registered(&self, registered: bool) {
        for i in 0..self.entries.len() {
            self.set_registered(i, registered);
        }
    }

    /// Records whether another owner holds entry `i`'s node; logs a new conflict once.
    fn set_conflict(&self, i: usize, holder: Option<i64>) {
        let service = self.entries[i].service.as_str();
        self.metrics.registration_conflict.with_label_values(&[service]).set(i64::from(holder.is_some()));
        let holder = holder.map(|h| format!("{h:#x}"));
        if let Ok(mut s) = self.status.lock() {
            if s[i].conflict_owner != holder {
                if let Some(h) = &holder {
                    warn!(path = %s[i].path, holder = %h,
                        "registration: another owner holds this node (the same id registered elsewhere); \
                         waiting for it to go rather than taking it");
                } else if s[i].conflict {
                    info!(path = %s[i].path, "registration: the other owner's node is gone");
                }
            }
            s[i].conflict = holder.is_some();
            s[i].conflict_owner = holder;
        }
    }

    /// Makes the node exist (ours) or not, as wanted.
    async fn reconcile(
        &mut self,
        client: &Client,
        i: usize,
        want: bool,
        kick: &mpsc::UnboundedSender<()>,
    ) -> Result<(), zookeeper_client::Error> {
        let path = self.path(i);
        let node = match client.get_data(&path).await {
            Ok(n) => Some(n),
            Err(zookeeper_client::Error::NoNode) => None,
            Err(e) => return Err(e),
        };
        let session = client.session_id().0;
        let ours = node.as_ref().is_some_and(|(_, s)| s.ephemeral_owner == session);
        match (want, node) {
            (true, Some(_)) if ours => self.set_conflict(i, None),
            (false, None) => {
                self.set_conflict(i, None);
                self.set_registered(i, false);
            }
            (true, None) => {
                self.set_conflict(i, None);
                self.create(client, i, &path).await?;
            }
            (true, Some((data, stat))) => {
                if token_of(&data).as_deref() == Some(self.owner.as_str()) {
                    // Our predecessor's (a restart, or our own expired session's, whose deletion
                    // is not atomic with the expiry): replace it, as Curator does.
                    info!(%path, previous = format!("{:#x}", stat.ephemeral_owner),
                        "registration: replacing the node a previous session of this sidecar left");
                    match client.delete(&path, Some(stat.version)).await {
                        Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
                        Err(e) => return Err(e),
                    }
                    self.set_conflict(i, None);
                    self.create(client, i, &path).await?;
                } else {
                    self.set_registered(i, false);
                    self.set_conflict(i, Some(stat.ephemeral_owner));
                    self.wake_when_changed(client, &path, kick).await?;
                }
            }
            (false, Some((_, stat))) => {
                if ours {
                    self.delete_ours(client, i, &path, stat).await?;
                    info!(%path, "deregistered");
                }
                self.set_conflict(i, None);
                self.set_registered(i, false);
            }
        }
        Ok(())
    }

    /// Kicks the loop when the node at `path` changes or goes.
    async fn wake_when_changed(
        &self,
        client: &Client,
        path: &str,
        kick: &mpsc::UnboundedSender<()>,
    ) -> Result<(), zookeeper_client::Error> {
        let (_, watcher) = client.check_and_watch_stat(path).await?;
        let kick = kick.clone();
        tokio::spawn(async move {
            watcher.changed().await;
            let _ = kick.send(());
        });
        Ok(())
    }

    /// Deletes our node with the version this process wrote; a node changed since by someone
    /// else is left to go with the session.
    async fn delete_ours(
        &mut self,
        client: &Client,
        i: usize,
        path: &str,
        stat: Stat,
    ) -> Result<(), zookeeper_client::Error> {
        let version = match self.written[i] {
            Some((session, version)) if session == stat.ephemeral_owner => version,
            _ => stat.version,
        };
        match client.delete(path, Some(version)).await {
            Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
            Err(zookeeper_client::Error::BadVersion) => {
                warn!(%path, "registration: the node was changed by someone else; it goes with the session");
            }
            Err(e) => return Err(e),
        }
        self.written[i] = None;
        Ok(())
    }

    async fn create(&mut self, client: &Client, i: usize, path: &str) -> Result<(), zookeeper_client::Error> {
        let parent = &path[..path.rfind('/').unwrap_or(0)];
        if !parent.is_empty() {
            match client.mkdir(parent, &CreateMode::Persistent.with_acls(Acls::anyone_all())).await {
                Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => return Err(e),
            }
        }
        let data = document(&self.entries[i], true, self.registered_at, &self.owner);
        let mode = CreateMode::Ephemeral.with_acls(self.settings.leaf_acls());
        match client.create(path, &data, &mode).await {
            Ok((stat, _)) => {
                info!(%path, "registered");
                self.written[i] = Some((stat.ephemeral_owner, stat.version));
                self.set_registered(i, true);
                Ok(())
            }
            // Another writer raced us; the next pass looks at who owns it.
            Err(zookeeper_client::Error::NodeExists) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Draining first (`enabled: false`, so discovery stops sending new traffic) for each
    /// entry's `drain_delay`, then removal. Every entry drains at the same time.
    async fn deregister_all(&mut self, client: &Client) {
        let started = tokio::time::Instant::now();
        let session = client.session_id().0;
        let mut draining = Vec::new();
        for i in 0..self.entries.len() {
            let path = self.path(i);
            let Ok(Some(stat)) = client.check_stat(&path).await else { continue };
            if stat.ephemeral_owner != session {
                continue;
            }
            let doc = document(&self.entries[i], false, self.registered_at, &self.owner);
            let version = self.written[i].map_or(stat.version, |(_, v)| v);
            match client.set_data(&path, &doc, Some(version)).await {
                Ok(stat) => {
                    self.written[i] = Some((session, stat.version));
                    info!(%path, drain_delay = %self.entries[i].drain_delay, "draining: marked enabled=false");
                }
                Err(e) => warn!(%path, error = %e, "registration: cannot mark the node as draining"),
            }
            draining.push((started + self.entries[i].drain_delay.0, i, path));
        }
        draining.sort_by_key(|(at, _, _)| *at);
        for (at, i, path) in draining {
            tokio::time::sleep_until(at).await;
            if let Ok(Some(stat)) = client.check_stat(&path).await {
                if let Err(e) = self.delete_ours(client, i, &path, stat).await {
                    warn!(%path, error = %e, "registration: cannot delete the node; it goes with the session");
                }
            }
            self.set_registered(i, false);
            info!(%path, "deregistered for shutdown");
        }
    }
}

/// Resolves when any of the futures does.
async fn futures_select_all<F: std::future::Future + Unpin>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<F> = futures.collect();
    if futures.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(move |cx| {
        for f in futures.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}
