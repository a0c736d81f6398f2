//! The local app's registrations, each entry with a ZooKeeper session of its own, so that a
//! configuration reload adds or removes one without touching the others' nodes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::config::RegisterConfig;
use crate::metrics::Metrics;
use crate::register::{Registrations, Status};
use crate::zookeeper::ZkSettings;

/// One registration's status, as its session updates it.
type StatusHandle = Arc<Mutex<Vec<Status>>>;

/// The registrations running, and what `/config` shows of them.
pub struct LocalRegistrations {
    metrics: Arc<Metrics>,
    /// This sidecar's owner token, written into every node (README: "Registering the local app").
    owner: String,
    running: Vec<(RegisterConfig, Registrations)>,
    view: Arc<Mutex<Vec<StatusHandle>>>,
}

/// What [`LocalRegistrations::update`] did, by node id.
#[derive(Debug, Default)]
pub struct Changed {
    pub added: Vec<String>,
    pub removed: Vec<String>,
}

impl LocalRegistrations {
    pub fn new(metrics: Arc<Metrics>, owner: String) -> Self {
        LocalRegistrations { metrics, owner, running: Vec::new(), view: Arc::default() }
    }

    /// Makes the running entries `wanted`: entries no longer wanted (or changed) are deregistered
    /// as at shutdown, within `timeout`, then new ones start. Unchanged entries keep their nodes.
    /// `settings` reach ZooKeeper; without them (none are needed when nothing is wanted),
    /// nothing starts.
    pub async fn update(
        &mut self,
        wanted: &[RegisterConfig],
        settings: Option<&ZkSettings>,
        timeout: Duration,
    ) -> Changed {
        let mut changed = Changed::default();
        let (kept, gone): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.running).into_iter().partition(|(c, _)| wanted.contains(c));
        let stops = gone.iter().map(|(c, r)| {
            changed.removed.push(crate::register::instance_id(c));
            r.deregister(timeout)
        });
        futures_join(stops).await;
        self.running = kept;
        for entry in wanted.iter().filter(|_| settings.is_some()) {
            if let (false, Some(settings)) = (self.running.iter().any(|(c, _)| c == entry), settings) {
                changed.added.push(crate::register::instance_id(entry));
                let r = Registrations::start(
                    settings.clone(),
                    vec![entry.clone()],
                    self.metrics.clone(),
                    self.owner.clone(),
                );
                self.running.push((entry.clone(), r));
            }
        }
        if let Ok(mut view) = self.view.lock() {
            *view = self.running.iter().map(|(_, r)| r.status_handle()).collect();
        }
        changed
    }

    /// Deregisters every entry (at shutdown), within `timeout`.
    pub async fn deregister_all(&self, timeout: Duration) {
        futures_join(self.running.iter().map(|(_, r)| r.deregister(timeout))).await;
    }

    /// The `registrations` section of `/config`, rendered on request; None without any.
    pub fn section(&self) -> impl Fn() -> Option<Value> + Send + Sync + 'static {
        let view = self.view.clone();
        move || {
            let handles = view.lock().map(|v| v.clone()).unwrap_or_default();
            if handles.is_empty() {
                return None;
            }
            let all: Vec<Status> =
                handles.iter().flat_map(|h| h.lock().map(|s| s.clone()).unwrap_or_default()).collect();
            Some(serde_json::to_value(all).unwrap_or_default())
        }
    }
}

/// Runs the futures concurrently to completion.
async fn futures_join<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|f| f.as_mut().poll(cx).is_pending());
        if pending.is_empty() { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await
}
