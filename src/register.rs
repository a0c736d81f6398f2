//! Naming: registering the local app in ZooKeeper (README: "Registering the local app"), the way Curator
//! and SmartStack Nerve do. Each entry gets an ephemeral node holding a Curator x-discovery
//! document (so Curator, Spring Cloud Zookeeper and zkroute itself all discover it), present only
//! while the app passes its health check (with rise and fall thresholds, so a flapping app does
//! not churn ZooKeeper). The node lives in a session of its own: after an expiry it is created
//! again in a new one; a node left by the old session is deleted and replaced, as Curator does.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};
use zookeeper_client::{Acls, Client, CreateMode, SessionState};

use crate::config::{HumanDuration, RegisterCheck, RegisterConfig};
use crate::discovery::zk::{Backoff, ZkSettings};
use crate::health::probe;
use crate::metrics::Metrics;
use crate::routing::Addr;

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
}

/// The stable node name of an entry: configured, or `address:port`.
pub fn instance_id(r: &RegisterConfig) -> String {
    r.id.clone().unwrap_or_else(|| format!("{}:{}", r.address, r.port))
}

/// The Curator x-discovery document of an entry. `payload` is Spring Cloud's ZookeeperInstance
/// with `metadata`, plus `weight` and `zone` where zkroute reads them.
pub fn document(r: &RegisterConfig, enabled: bool, registered_at: SystemTime) -> Vec<u8> {
    let id = instance_id(r);
    let mut payload = json!({
        "@class": "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
        "id": r.service,
        "name": r.service,
        "metadata": r.payload.metadata,
    });
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
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The running registrations.
pub struct Registrations {
    status: Arc<Mutex<Vec<Status>>>,
    stop: mpsc::UnboundedSender<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Registrations {
    /// Starts a health loop per entry and the session that keeps the nodes.
    pub fn start(settings: ZkSettings, entries: Vec<RegisterConfig>, metrics: Arc<Metrics>) -> Registrations {
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
                })
                .collect(),
        ));
        for e in &entries {
            metrics.registered.with_label_values(&[e.service.as_str()]).set(0);
        }
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
        let session =
            Session { settings, entries, wants, status: status.clone(), metrics, registered_at: SystemTime::now() };
        tasks.push(tokio::spawn(session.run(stop_rx)));
        Registrations { status, stop, tasks }
    }

    pub fn status(&self) -> Vec<Status> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// A handle on the status, for `/config`.
    pub fn status_handle(&self) -> Arc<Mutex<Vec<Status>>> {
        self.status.clone()
    }

    /// Marks every node as draining (`enabled: false`), then deletes it; waits up to `timeout`.
    pub async fn deregister(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.stop.send(tx).is_ok() {
            let _ = tokio::time::timeout(timeout, rx).await;
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
        loop {
            if client.state() == SessionState::SyncConnected {
                for i in 0..self.entries.len() {
                    let want = *self.wants[i].borrow_and_update();
                    if let Err(e) = self.reconcile(client, i, want).await {
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

    /// Makes the node exist (ours) or not, as wanted.
    async fn reconcile(&self, client: &Client, i: usize, want: bool) -> Result<(), zookeeper_client::Error> {
        let path = self.path(i);
        let stat = client.check_stat(&path).await?;
        let ours = stat.is_some_and(|s| s.ephemeral_owner == client.session_id().0);
        match (want, stat, ours) {
            (true, _, true) | (false, None, _) => {}
            (true, None, _) => self.create(client, i, &path).await?,
            (true, Some(s), false) => {
                // Left by an expired session of ours (deletion is not atomic with expiry), or by
                // another process claiming this id: replace it, as Curator does.
                info!(%path, owner = s.ephemeral_owner, "registration: replacing a node another session left");
                match client.delete(&path, Some(s.version)).await {
                    Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
                    Err(e) => return Err(e),
                }
                self.create(client, i, &path).await?;
            }
            (false, Some(s), _) => {
                if ours {
                    match client.delete(&path, Some(s.version)).await {
                        Ok(()) | Err(zookeeper_client::Error::NoNode) => {}
                        Err(e) => return Err(e),
                    }
                    info!(%path, "deregistered");
                }
                self.set_registered(i, false);
            }
        }
        Ok(())
    }

    async fn create(&self, client: &Client, i: usize, path: &str) -> Result<(), zookeeper_client::Error> {
        let parent = &path[..path.rfind('/').unwrap_or(0)];
        if !parent.is_empty() {
            match client.mkdir(parent, &CreateMode::Persistent.with_acls(Acls::anyone_all())).await {
                Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => return Err(e),
            }
        }
        let data = document(&self.entries[i], true, self.registered_at);
        match client.create(path, &data, &CreateMode::Ephemeral.with_acls(Acls::anyone_all())).await {
            Ok(_) => {
                info!(%path, "registered");
                self.set_registered(i, true);
                Ok(())
            }
            // Another writer raced us; the next pass looks at who owns it.
            Err(zookeeper_client::Error::NodeExists) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Draining first (`enabled: false`, so discovery stops sending new traffic), then removal.
    async fn deregister_all(&self, client: &Client) {
        for i in 0..self.entries.len() {
            let path = self.path(i);
            let Ok(Some(stat)) = client.check_stat(&path).await else { continue };
            if stat.ephemeral_owner != client.session_id().0 {
                continue;
            }
            let draining = document(&self.entries[i], false, self.registered_at);
            let _ = client.set_data(&path, &draining, Some(stat.version)).await;
            let _ = client.delete(&path, None).await;
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
