//! Wires everything: the one module that imports all others. [`App::start`] binds every port,
//! starts the control plane and the data plane, and returns a handle that tests and `main` use
//! to find the bound addresses and to shut down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::access_log::{AccessLog, Sink};
use crate::admin::{self, AdminState};
use crate::config::{Config, LogFormat};
use crate::discovery::file::FileSource;
use crate::discovery::snapshot;
use crate::discovery::zk::{Paths, ZkSettings, ZkSource, ZkStatus, ZkStatusHandle, default_resync_jitter};
use crate::discovery::{self, Control, OnPublish, UpdateSender};
use crate::endpoint::StateRegistry;
use crate::health::checker::Checker;
use crate::health::{BackendGauges, HealthReporter};
use crate::metrics::Metrics;
use crate::proxy::http::HttpContext;
use crate::proxy::tcp::{RelayMemory, TcpContext};
use crate::proxy::upstream::{DEFAULT_LOOPBACK_CONGESTION, LoopbackCongestion, PoolSettings, Pools};
use crate::proxy::{self, Limits, Tracker};
use crate::register::Registrations;
use crate::routing::SourceKind;
use crate::routing::build::{Delta, Resync};
use crate::routing::table::Protocol;
use crate::routing::{Builder, RouteReader, RoutingTable, store};
use crate::shutdown::{self, Shutdown, Trigger};

/// A started zkroute.
pub struct App {
    pub admin_addr: SocketAddr,
    /// Bound address of each listener, by name.
    pub listeners: BTreeMap<String, SocketAddr>,
    pub routes: RouteReader,
    pub metrics: Arc<Metrics>,
    pub states: Arc<StateRegistry>,
    pub updates: UpdateSender,
    draining: Arc<AtomicBool>,
    trigger: Trigger,
    tasks: Vec<JoinHandle<()>>,
    /// Open connections per listener, for draining.
    trackers: Vec<Arc<Tracker>>,
    registrations: Option<Registrations>,
}

impl App {
    /// Binds the admin port and every listener, then starts discovery and serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::with_options(config.metrics.enabled, config.metrics.per_instance));
        let states = Arc::new(StateRegistry::new(config.proxy.state_retention.0));
        let (writer, routes) = store::channel();
        let defaults = config.defaults().map_err(|(k, r)| anyhow::anyhow!("proxy.{k}: {r}"))?;
        let builder = Builder::new(config.listener_specs(), defaults, states.clone(), metrics.clone());
        let (updates, update_rx) = discovery::updates();
        let (trigger, shutdown) = shutdown::channel();
        let draining = Arc::new(AtomicBool::new(false));

        let admin_listener = TcpListener::bind(config.admin.bind)
            .await
            .with_context(|| format!("admin.bind: cannot listen on {}", config.admin.bind))?;
        let admin_addr = admin_listener.local_addr()?;

        let wanted = config.proxy.loopback_congestion.as_deref();
        let congestion = LoopbackCongestion::configured(wanted, DEFAULT_LOOPBACK_CONGESTION).with_context(|| {
            format!(
                "proxy.loopback_congestion: cannot use {:?} (net.ipv4.tcp_allowed_congestion_control lists what \
                 may be; \"\" keeps the system's choice)",
                wanted.unwrap_or_default()
            )
        })?;
        // Bind every listener before anything starts, so a bad one fails the start.
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = proxy::listen(l.bind, &congestion)
                .with_context(|| format!("listener {:?}: cannot listen on {}", l.name, l.bind))?;
            bound.push((l, socket));
        }
        let listeners: BTreeMap<String, SocketAddr> =
            bound.iter().map(|(l, s)| Ok((l.name.clone(), s.local_addr()?))).collect::<std::io::Result<_>>()?;

        let mut tasks = Vec::new();
        let (health_tx, health_rx) = tokio::sync::mpsc::unbounded_channel();
        tasks.push(tokio::spawn(forward_health(health_rx, updates.clone())));
        let health = HealthReporter::new(health_tx);
        let mut checker = Checker::new(health.clone(), metrics.clone());
        let mut gauges = BackendGauges::new(metrics.clone());
        let mut on_publish: Vec<OnPublish> = vec![
            Box::new(move |t: &Arc<RoutingTable>, d: &Delta| checker.reconcile(t, d)),
            Box::new(move |t: &Arc<RoutingTable>, d: &Delta| gauges.update(t, d)),
        ];
        let follows_zk = config.static_file.is_none() && !config.listeners.is_empty();
        let zk_status = follows_zk.then(|| ZkStatus::handle(&config.zookeeper.connect));
        on_publish.push(discovery::empty_registry_alarm(metrics.clone(), zk_status.clone()));
        let snapshot = config.zookeeper.snapshot.clone().filter(|_| config.static_file.is_none());
        if let Some(path) = &snapshot {
            let writer = snapshot::Writer::start(path.clone());
            on_publish.push(Box::new(move |t: &Arc<RoutingTable>, _: &Delta| writer.offer(t)));
            tasks.push(tokio::spawn(serve_snapshot_if_late(
                path.clone(),
                config.zookeeper.startup_timeout.0,
                config.zookeeper.snapshot_max_age.0,
                routes.clone(),
                updates.clone(),
            )));
        }
        let control = Control { builder, writer, metrics: metrics.clone(), states: states.clone(), on_publish };
        tasks.push(tokio::spawn(control.run(update_rx)));
        tasks.push(spawn_source(&config, updates.clone(), metrics.clone(), zk_status.clone(), shutdown.clone())?);
        let p = &config.proxy;
        let pools = Pools::new(PoolSettings { max_idle: p.pool_max_idle, idle_timeout: p.pool_idle_timeout.0 });
        tasks.push(pools.spawn_sweeper());
        let limits = Limits {
            header_read_timeout: p.header_read_timeout.0,
            idle_timeout: p.idle_timeout.0,
            max_header_bytes: p.max_header_bytes,
            max_connections: p.max_connections,
            tcp_idle_timeout: p.tcp_idle_timeout.0,
            tcp_relay_memory: RelayMemory::new(p.tcp_relay_memory, metrics.tcp_relay_buffer_bytes.clone()),
            congestion,
        };
        let access_log = match &config.log.access_log {
            Some(sink) => Some(Arc::new(
                AccessLog::start(
                    Sink::parse(sink),
                    config.log.format == LogFormat::Json,
                    metrics.access_log_dropped.clone(),
                )
                .with_context(|| format!("log.access_log: cannot open {sink}"))?,
            )),
            None => None,
        };
        let mut trackers = Vec::new();
        for (id, (l, socket)) in bound.into_iter().enumerate() {
            let tracker = Tracker::new();
            trackers.push(tracker.clone());
            match l.protocol {
                Protocol::Http => {
                    let ctx = Arc::new(HttpContext {
                        listener: id,
                        name: Arc::from(l.name.as_str()),
                        routes: routes.clone(),
                        pools: pools.clone(),
                        metrics: metrics.clone(),
                        limits: limits.clone(),
                        shutdown: shutdown.clone(),
                        tracker,
                        health: health.clone(),
                        access_log: access_log.clone(),
                    });
                    tasks.push(tokio::spawn(crate::proxy::http::serve(socket, ctx)));
                }
                Protocol::Tcp => {
                    let ctx = Arc::new(TcpContext::new(
                        id,
                        Arc::from(l.name.as_str()),
                        routes.clone(),
                        metrics.clone(),
                        limits.clone(),
                        shutdown.clone(),
                        tracker,
                        health.clone(),
                        access_log.clone(),
                    ));
                    tasks.push(tokio::spawn(crate::proxy::tcp::serve(socket, ctx)));
                }
            }
        }

        let registrations = if config.registrations.is_empty() {
            None
        } else {
            let owner = crate::register::owner_token(config.zookeeper.snapshot.as_deref());
            Some(Registrations::start(zk_settings(&config)?, config.registrations.clone(), metrics.clone(), owner))
        };
        let reg_status = registrations.as_ref().map(Registrations::status_handle);
        let binds = listeners.iter().map(|(k, v): (&String, &SocketAddr)| (k.clone(), v.to_string())).collect();
        let admin_state = AdminState {
            routes: routes.clone(),
            metrics: metrics.clone(),
            config_endpoint: config.admin.config_endpoint,
            draining: draining.clone(),
            binds: Arc::new(binds),
            extra: Arc::new(move || {
                let mut extra = Vec::new();
                if let Some(s) = zk_status.as_ref().and_then(|s| s.lock().ok()) {
                    extra.push(("zookeeper", serde_json::to_value(&*s).unwrap_or_default()));
                }
                if let Some(s) = &reg_status {
                    let status = s.lock().map(|s| s.clone()).unwrap_or_default();
                    extra.push(("registrations", serde_json::to_value(status).unwrap_or_default()));
                }
                extra
            }),
        };
        tasks.push(tokio::spawn(admin::serve(admin_listener, admin_state)));
        info!(admin = %admin_addr, "zkroute started");
        Ok(App {
            admin_addr,
            listeners,
            routes,
            metrics,
            states,
            updates,
            draining,
            trigger,
            tasks,
            trackers,
            registrations,
        })
    }

    /// A shutdown signal tied to this app.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.trigger.subscribe()
    }

    /// Stops: `/ready` turns 503, listeners stop accepting, open connections finish their
    /// in-flight work within `drain_timeout`, then every task is stopped.
    pub async fn stop(self, drain_timeout: Duration) {
        self.stop_after(Duration::ZERO, drain_timeout).await
    }

    /// As [`App::stop`], keeping the listeners open `delay` after deregistering.
    pub async fn stop_after(self, delay: Duration, drain_timeout: Duration) {
        // The local app leaves the registry first, so that other sidecars stop sending to it.
        if let Some(r) = &self.registrations {
            r.deregister(Duration::from_secs(5).min(drain_timeout)).await;
        }
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(?delay, "deregistered; listeners keep accepting for proxy.shutdown_delay");
            tokio::time::sleep(delay).await;
        }
        self.trigger.trigger();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        for tracker in &self.trackers {
            if tokio::time::timeout_at(deadline, tracker.wait_idle()).await.is_err() {
                tracing::warn!(open = tracker.active(), "drain timeout: closing the remaining connections");
            }
        }
        for task in self.tasks {
            task.abort();
        }
    }
}

/// At a cold start: if no table arrives from ZooKeeper within `wait`, serve the snapshot.
async fn serve_snapshot_if_late(
    path: std::path::PathBuf,
    wait: Duration,
    max_age: Duration,
    mut routes: RouteReader,
    updates: UpdateSender,
) {
    if tokio::time::timeout(wait, routes.wait_for_version(1)).await.is_ok() {
        return;
    }
    let loaded = tokio::task::spawn_blocking(move || snapshot::load(&path, max_age).map(|r| (r, path))).await;
    if let Ok(Some(((resync, version), path))) = loaded {
        tracing::warn!(
            snapshot = %path.display(),
            table_version = version,
            instances = resync.instances.len(),
            "ZooKeeper did not answer within zookeeper.startup_timeout: serving the snapshot"
        );
        updates.send(crate::discovery::Update::new(vec![crate::routing::Change::Resync(resync)], None));
    }
}

/// Passes health changes to the control loop, several at once when they come in a burst.
async fn forward_health(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::routing::ServiceName>,
    updates: UpdateSender,
) {
    while let Some(first) = rx.recv().await {
        let mut services = vec![first];
        while let Ok(more) = rx.try_recv() {
            if !services.contains(&more) {
                services.push(more);
            }
        }
        updates.health_changed(services);
    }
}

fn spawn_source(
    config: &Config,
    updates: UpdateSender,
    metrics: Arc<Metrics>,
    status: Option<ZkStatusHandle>,
    shutdown: Shutdown,
) -> anyhow::Result<JoinHandle<()>> {
    if config.listeners.is_empty() && config.static_file.is_none() {
        // Registration only: following the whole naming tree would cost ZooKeeper for nothing.
        tracing::info!("no listeners: not following ZooKeeper (registration only)");
        let empty = Resync { source: SourceKind::None, instances: Vec::new(), rules: Vec::new(), policies: Vec::new() };
        updates.send(crate::discovery::Update::new(vec![crate::routing::Change::Resync(empty)], None));
        return Ok(tokio::spawn(async move {
            let mut shutdown = shutdown;
            shutdown.wait().await;
            drop(updates);
        }));
    }
    if let Some(s) = &config.static_file {
        let source = FileSource { path: s.file.clone(), updates };
        return Ok(tokio::spawn(source.run(shutdown)));
    }
    let status = status.unwrap_or_else(|| ZkStatus::handle(&config.zookeeper.connect));
    Ok(tokio::spawn(ZkSource { settings: zk_settings(config)?, updates, metrics, status }.run(shutdown)))
}

/// How to reach ZooKeeper, from the configuration.
pub fn zk_settings(config: &Config) -> anyhow::Result<ZkSettings> {
    let zk = &config.zookeeper;
    let auth = match (&zk.auth, &zk.auth_file) {
        (Some(a), _) => Some(a.clone().into_bytes()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("zookeeper.auth_file: cannot read {}", path.display()))?
                .trim()
                .as_bytes()
                .to_vec(),
        ),
        (None, None) => None,
    };
    Ok(ZkSettings {
        connect: zk.connect.clone(),
        session_timeout: zk.session_timeout.0,
        resync_jitter: zk.resync_jitter.map_or_else(|| default_resync_jitter(zk.session_timeout.0), |j| j.0),
        paths: Paths {
            services: zk.services_path.clone(),
            rules: zk.rules_path.clone(),
            policies: zk.policies_path.clone(),
        },
        auth,
    })
}
