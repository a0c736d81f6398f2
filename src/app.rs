//! Wires everything: the one module that imports all others. [`App::start`] binds every port,
//! starts the control plane and the data plane, and returns a handle that tests and `main` use
//! to find the bound addresses, to reload the configuration ([`App::reload`], on SIGHUP) and to
//! shut down.

mod listeners;
mod registrations;
mod reload;
mod rotation;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info;

use crate::access_log::{AccessLog, Sink};
use crate::admin::{self, AdminState, DrainDoor, DrainRequest};
use crate::config::{Config, KeyError, LogFormat, ProxyConfig};
use crate::discovery::file::FileSource;
use crate::discovery::snapshot;
use crate::discovery::zk::{ZkSource, ZkStatus, ZkStatusHandle};
use crate::discovery::{self, Control, OnPublish, UpdateSender};
use crate::endpoint::StateRegistry;
use crate::health::checker::Checker;
use crate::health::{BackendGauges, HealthReporter};
use crate::metrics::Metrics;
use crate::net::{DEFAULT_LOOPBACK_CONGESTION, LoopbackCongestion};
use crate::proxy::Limits;
use crate::proxy::tcp::RelayMemory;
use crate::proxy::upstream::{PoolSettings, Pools};
use crate::routing::SourceKind;
use crate::routing::build::{Delta, Resync};
use crate::routing::{Builder, RouteReader, RoutingTable, store};
use crate::shutdown::{self, Shutdown, Trigger};
use crate::zookeeper::{ZkSettings, inline};
use listeners::{Bound, Listeners, Shared};
use registrations::LocalRegistrations;

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
    /// The listeners, serving and draining, on their table slots.
    local: Listeners,
    registrations: LocalRegistrations,
    /// The configuration in force (keys that change only at restart as they were at the start).
    config: Arc<Config>,
    relay_memory: Arc<RelayMemory>,
    pools: Arc<Pools>,
    /// The last reload, for `/config`.
    last_reload: Arc<Mutex<Option<reload::Outcome>>>,
    /// TLS files, checked again on SIGHUP.
    rotation: Arc<rotation::Rotation>,
    /// `/drain` requests, answered by [`App::drain`].
    drain_requests: tokio::sync::mpsc::Receiver<DrainRequest>,
    /// Set by `/drain`: the local app is deregistered and stays so until the restart.
    drained: Arc<AtomicBool>,
}

impl App {
    /// Binds the admin port and every listener, then starts discovery and serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::with_options(config.metrics.enabled, config.metrics.per_instance));
        for result in reload::RESULTS {
            metrics.config_reloads.with_label_values(&[result]);
        }
        let states = Arc::new(StateRegistry::new(config.proxy.state_retention.0));
        let (writer, routes) = store::channel();
        let defaults = config.defaults()?;
        let (updates, update_rx) = discovery::updates();
        let (trigger, shutdown) = shutdown::channel();
        let draining = Arc::new(AtomicBool::new(false));

        let admin_listener = TcpListener::bind(config.admin.bind)
            .await
            .with_context(|| format!("admin.bind: cannot listen on {}", config.admin.bind))?;
        let admin_addr = admin_listener.local_addr()?;

        let congestion = congestion(&config.proxy)?;
        // Bind every listener before anything starts, so a bad one fails the start.
        let mut bound = Vec::new();
        for l in &config.listeners {
            let socket = Bound::bind(l, &congestion)
                .with_context(|| format!("listener {:?}: cannot listen on {}", l.name, l.bind))?;
            bound.push(socket);
        }

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
        let p = &config.proxy;
        let pools = Pools::new(pool_settings(p));
        tasks.push(pools.spawn_sweeper());
        let relay_memory = RelayMemory::new(p.tcp_relay_memory, metrics.tcp_relay_buffer_bytes.clone());
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
        // Upstream TLS: the `[tls]` files, or the system's roots alone (whose absence matters
        // only to a service whose policy turns TLS on, and is reported on each handshake then).
        let upstream_tls = match crate::tls::UpstreamTls::load(&config.tls.clone().unwrap_or_default()) {
            Ok(t) => Some(Arc::new(t)),
            Err(e) if config.tls.is_some() => return Err(anyhow::anyhow!("tls: {e}")),
            Err(e) => {
                tracing::debug!(error = %e, "no system CA bundle: upstream TLS needs [tls] ca_file");
                None
            }
        };
        let rotation = rotation::Rotation::new(upstream_tls.clone(), metrics.clone());
        let mut local = Listeners::new(Shared {
            routes: routes.clone(),
            pools: pools.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            access_log,
            upstream_tls: upstream_tls.clone(),
            rotation: rotation.clone(),
        });
        for b in bound {
            local.add(b);
        }

        let builder = Builder::new(local.specs(), defaults, states.clone(), metrics.clone());
        let swaps = crate::discovery::swaps::SwapLog::default();
        let control = Control {
            builder,
            writer,
            metrics: metrics.clone(),
            states: states.clone(),
            on_publish,
            swaps: swaps.clone(),
        };
        if follows_zk {
            // On the thread that sees ZooKeeper's bytes, as the source is (README, "How it works").
            tasks.push(tokio::spawn(inline::spawn(control.run(update_rx))));
        } else {
            tasks.push(tokio::spawn(control.run(update_rx)));
        }
        tasks.push(spawn_source(&config, updates.clone(), metrics.clone(), zk_status.clone(), shutdown.clone())?);
        local.serve(&limits(p, &relay_memory, congestion));

        let owner = crate::register::owner_token(config.zookeeper.snapshot.as_deref());
        let mut registrations = LocalRegistrations::new(metrics.clone(), owner);
        if !config.registrations.is_empty() {
            let settings = ZkSettings::from_config(&config.zookeeper)?;
            registrations.update(&config.registrations, Some(&settings), Duration::ZERO).await;
        }
        let registrations_section = registrations.section();
        let (drain_tx, drain_requests) = tokio::sync::mpsc::channel(4);
        let drained = Arc::new(AtomicBool::new(false));
        let drained_section = drained.clone();
        let last_reload: Arc<Mutex<Option<reload::Outcome>>> = Arc::default();
        let reload_section = last_reload.clone();
        let admin_state = AdminState {
            routes: routes.clone(),
            metrics: metrics.clone(),
            config_endpoint: config.admin.config_endpoint,
            draining: draining.clone(),
            listeners: local.book(),
            extra: Arc::new(move || {
                let mut sections = Vec::new();
                if let Some(s) = zk_status.as_ref().and_then(|s| s.lock().ok()) {
                    sections.push(("zookeeper", serde_json::to_value(&*s).unwrap_or_default()));
                }
                if let Some(r) = registrations_section() {
                    sections.push(("registrations", r));
                }
                if drained_section.load(std::sync::atomic::Ordering::Relaxed) {
                    sections.push(("drained", serde_json::Value::Bool(true)));
                }
                if let Some(r) = reload_section.lock().ok().and_then(|r| r.clone()) {
                    sections.push(("config_reload", serde_json::to_value(r).unwrap_or_default()));
                }
                sections
            }),
            swaps,
            traffic: Arc::default(),
            drain: DrainDoor {
                requests: drain_tx,
                token: config.admin.drain_token.as_deref().map(Arc::from),
                loopback: admin_addr.ip().is_loopback(),
            },
        };
        tasks.push(tokio::spawn(admin::serve(admin_listener, admin_state)));
        info!(admin = %admin_addr, "zkroute started");
        Ok(App {
            admin_addr,
            listeners: local.addresses(),
            routes,
            metrics,
            states,
            updates,
            draining,
            trigger,
            tasks,
            local,
            registrations,
            config,
            relay_memory,
            pools,
            last_reload,
            rotation,
            drain_requests,
            drained,
        })
    }

    /// The next `/drain` request, to answer with [`App::drain`].
    pub async fn drain_request(&mut self) -> Option<DrainRequest> {
        self.drain_requests.recv().await
    }

    /// Deregisters the local app as at SIGTERM (each entry marked draining for its
    /// `drain_delay`, then deleted) while the listeners keep serving, and says what it did. It
    /// stays deregistered until the restart: a reload does not register it again.
    pub async fn drain(&mut self) -> String {
        if self.drained.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return "already drained\n".into();
        }
        let timeout = Duration::from_secs(5).min(self.config.proxy.drain_timeout.0);
        let changed = self.registrations.update(&[], None, timeout).await;
        info!(deregistered = ?changed.removed, "/drain: the local app is deregistered; listeners keep serving");
        match changed.removed.is_empty() {
            true => "drained: nothing was registered\n".into(),
            false => format!("drained: deregistered {}\n", changed.removed.join(", ")),
        }
    }

    /// A shutdown signal tied to this app.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.trigger.subscribe()
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Stops as [`App::stop_after`] with the `proxy.shutdown_delay` and `proxy.drain_timeout` in
    /// force.
    pub async fn stop_as_configured(self) {
        let p = &self.config.proxy;
        let (delay, drain) = (p.shutdown_delay.0, p.drain_timeout.0);
        self.stop_after(delay, drain).await
    }

    /// Stops: `/ready` turns 503, listeners stop accepting, open connections finish their
    /// in-flight work within `drain_timeout`, then every task is stopped.
    pub async fn stop(self, drain_timeout: Duration) {
        self.stop_after(Duration::ZERO, drain_timeout).await
    }

    /// As [`App::stop`], keeping the listeners open `delay` after deregistering.
    pub async fn stop_after(mut self, delay: Duration, drain_timeout: Duration) {
        // `/drain` from now on answers 503 "stopping": the stop deregisters anyway.
        self.drain_requests.close();
        // The local app leaves the registry first, so that other sidecars stop sending to it.
        self.registrations.deregister_all(Duration::from_secs(5).min(drain_timeout)).await;
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        if !delay.is_zero() {
            tracing::info!(?delay, "deregistered; listeners keep accepting for proxy.shutdown_delay");
            tokio::time::sleep(delay).await;
        }
        self.trigger.trigger();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        for tracker in self.local.drain_all() {
            if tokio::time::timeout_at(deadline, tracker.wait_idle()).await.is_err() {
                tracing::warn!(open = tracker.active(), "drain timeout: closing the remaining connections");
            }
        }
        self.local.abort();
        for task in self.tasks {
            task.abort();
        }
    }
}

/// The congestion control for loopback connections, from `proxy.loopback_congestion`.
fn congestion(p: &ProxyConfig) -> Result<LoopbackCongestion, KeyError> {
    let wanted = p.loopback_congestion.as_deref();
    LoopbackCongestion::configured(wanted, DEFAULT_LOOPBACK_CONGESTION).map_err(|e| {
        KeyError::new(
            "proxy.loopback_congestion",
            format!(
                "cannot use {:?}: {e} (net.ipv4.tcp_allowed_congestion_control lists what may be; \"\" keeps the \
                 system's choice)",
                wanted.unwrap_or_default()
            ),
        )
    })
}

fn pool_settings(p: &ProxyConfig) -> PoolSettings {
    PoolSettings { max_idle: p.pool_max_idle, idle_timeout: p.pool_idle_timeout.0 }
}

/// The per-listener limits of `[proxy]`.
fn limits(p: &ProxyConfig, relay_memory: &Arc<RelayMemory>, congestion: LoopbackCongestion) -> Limits {
    Limits {
        header_read_timeout: p.header_read_timeout.0,
        idle_timeout: p.idle_timeout.0,
        max_header_bytes: p.max_header_bytes,
        max_connections: p.max_connections,
        stream_idle_timeout: p.stream_idle_timeout.0,
        h2_max_concurrent_streams: p.h2_max_concurrent_streams,
        drop_underscore_headers: p.drop_underscore_headers,
        request_id: p.request_id,
        tcp_idle_timeout: p.tcp_idle_timeout.0,
        tcp_relay_memory: relay_memory.clone(),
        congestion,
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
    let source = ZkSource { settings: ZkSettings::from_config(&config.zookeeper)?, updates, metrics, status };
    Ok(tokio::spawn(inline::spawn(source.run(shutdown))))
}
