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

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::file::FileSource;
use crate::discovery::zk::{Paths, ZkSettings, ZkSource};
use crate::discovery::{self, Control, UpdateSender};
use crate::endpoint::StateRegistry;
use crate::metrics::Metrics;
use crate::routing::{Builder, RouteReader, store};
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
}

impl App {
    /// Binds the admin port and every listener, then starts discovery and serving.
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(config.metrics.enabled));
        let states = Arc::new(StateRegistry::new(config.proxy.state_retention.0));
        let (writer, routes) = store::channel();
        let defaults = config.defaults().map_err(|(k, r)| anyhow::anyhow!("proxy.{k}: {r}"))?;
        let builder = Builder::new(config.listener_specs(), defaults, states.clone());
        let (updates, update_rx) = discovery::updates();
        let (trigger, shutdown) = shutdown::channel();
        let draining = Arc::new(AtomicBool::new(false));

        let admin_listener = TcpListener::bind(config.admin.bind)
            .await
            .with_context(|| format!("admin.bind: cannot listen on {}", config.admin.bind))?;
        let admin_addr = admin_listener.local_addr()?;
        let listeners = BTreeMap::new();

        let mut tasks = Vec::new();
        let control =
            Control { builder, writer, metrics: metrics.clone(), states: states.clone(), on_publish: Vec::new() };
        tasks.push(tokio::spawn(control.run(update_rx)));
        tasks.push(spawn_source(&config, updates.clone(), metrics.clone(), shutdown.clone())?);

        let binds = listeners.iter().map(|(k, v): (&String, &SocketAddr)| (k.clone(), v.to_string())).collect();
        let admin_state = AdminState {
            routes: routes.clone(),
            metrics: metrics.clone(),
            config_endpoint: config.admin.config_endpoint,
            draining: draining.clone(),
            binds: Arc::new(binds),
            extra: Arc::new(Vec::new),
        };
        tasks.push(tokio::spawn(admin::serve(admin_listener, admin_state, shutdown.clone())));
        info!(admin = %admin_addr, "zkroute started");
        Ok(App { admin_addr, listeners, routes, metrics, states, updates, draining, trigger, tasks })
    }

    /// A shutdown signal tied to this app.
    pub fn shutdown_signal(&self) -> Shutdown {
        self.trigger.subscribe()
    }

    /// Stops everything: draining first, then the tasks.
    pub async fn stop(self, drain_timeout: Duration) {
        self.draining.store(true, std::sync::atomic::Ordering::Relaxed);
        self.trigger.trigger();
        let deadline = tokio::time::Instant::now() + drain_timeout;
        for task in self.tasks {
            let _ = tokio::time::timeout_at(deadline, task).await;
        }
    }
}

fn spawn_source(
    config: &Config,
    updates: UpdateSender,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
) -> anyhow::Result<JoinHandle<()>> {
    if let Some(s) = &config.static_file {
        let source = FileSource { path: s.file.clone(), updates };
        return Ok(tokio::spawn(source.run(shutdown)));
    }
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
    let settings = ZkSettings {
        connect: zk.connect.clone(),
        session_timeout: zk.session_timeout.0,
        paths: Paths {
            services: zk.services_path.clone(),
            rules: zk.rules_path.clone(),
            policies: zk.policies_path.clone(),
        },
        auth,
    };
    Ok(tokio::spawn(ZkSource { settings, updates, metrics }.run(shutdown)))
}
