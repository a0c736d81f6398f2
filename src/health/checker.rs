//! Active health checks (README: "Health"): one loop per endpoint of every service whose policy asks
//! for checks, shared by all listeners. After each table swap the loops are reconciled with the
//! table: new endpoints get a loop, removed ones lose theirs. Results go to the endpoint state
//! (outside the table) and, when an endpoint changes state, to the control loop, which rebuilds
//! that service's lists.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounter;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::{HealthReporter, probe};
use crate::endpoint::{CheckReport, EndpointState, Health};
use crate::metrics::Metrics;
use crate::routing::build::Delta;
use crate::routing::documents::{CheckKind, HealthCheck};
use crate::routing::table::EndpointSet;
use crate::routing::{Addr, EndpointKey, RoutingTable, ServiceName};

struct Loop {
    check: HealthCheck,
    h2: bool,
    task: JoinHandle<()>,
}

impl Drop for Loop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The check loops, one per endpoint, by service.
pub struct Checker {
    loops: HashMap<ServiceName, HashMap<EndpointKey, Loop>>,
    health: HealthReporter,
    metrics: Arc<Metrics>,
    /// A first table was reconciled in full.
    started: bool,
}

/// Per endpoint: its state, address, check, and whether it speaks HTTP/2 (an `http` check goes
/// over HTTP/2 to it).
type Wanted = HashMap<EndpointKey, (Arc<EndpointState>, Addr, HealthCheck, bool)>;

impl Checker {
    pub fn new(health: HealthReporter, metrics: Arc<Metrics>) -> Self {
        Checker { loops: HashMap::new(), health, metrics, started: false }
    }

    /// Starts and stops loops so that exactly the endpoints of `table` whose service asks for
    /// checks have one. Only the services `delta` rebuilt are looked at, unless routes changed.
    pub fn reconcile(&mut self, table: &RoutingTable, delta: &Delta) {
        let full = delta.routes_rebuilt || !std::mem::replace(&mut self.started, true);
        // A set: a service named twice would be reconciled a second time against nothing wanted,
        // stopping the loops the first pass kept.
        let services: BTreeSet<ServiceName> = if full {
            table.services.iter().map(|(n, _)| n.clone()).chain(self.loops.keys().cloned()).collect()
        } else {
            delta.rebuilt.clone()
        };
        let mut wanted: HashMap<ServiceName, Wanted> = HashMap::new();
        let mut add = |set: &EndpointSet, only: Option<&std::collections::HashSet<&ServiceName>>| {
            let (Some(hc), Some(service)) = (&set.policy.health_check, &set.service) else { return };
            if only.is_some_and(|o| !o.contains(service)) {
                return;
            }
            let w = wanted.entry(service.clone()).or_default();
            for e in set.endpoints.iter() {
                let h2 = e.protocol == Some(crate::routing::InstanceProtocol::H2);
                w.entry(e.state.key.clone()).or_insert_with(|| (e.state.clone(), e.addr.clone(), hc.clone(), h2));
            }
        };
        let only: std::collections::HashSet<&ServiceName> = services.iter().collect();
        for name in &services {
            if let Some(s) = table.service(name.as_str()) {
                add(&s.all, None);
            }
        }
        // Subsets share the service's endpoints; named endpoints have addresses of their own.
        for listener in table.listeners.iter() {
            for route in listener.routes.iter() {
                for target in route.targets.iter() {
                    add(&target.set, Some(&only));
                }
            }
        }
        for name in services {
            let want = wanted.remove(&name).unwrap_or_default();
            let loops = self.loops.entry(name.clone()).or_default();
            loops.retain(|key, l| want.get(key).is_some_and(|(_, _, hc, h2)| *hc == l.check && *h2 == l.h2));
            for (key, (state, addr, check, h2)) in want {
                if loops.contains_key(&key) {
                    continue;
                }
                let probe = Probe {
                    state,
                    addr,
                    check: check.clone(),
                    h2,
                    health: self.health.clone(),
                    ok: self.metrics.health_checks.with_label_values(&[name.as_str(), "healthy"]),
                    failed: self.metrics.health_checks.with_label_values(&[name.as_str(), "unhealthy"]),
                    service: name.clone(),
                };
                debug!(endpoint = %key, "health check loop started");
                loops.insert(key, Loop { check, h2, task: tokio::spawn(probe.run()) });
            }
            if loops.is_empty() {
                self.loops.remove(&name);
            }
        }
    }
}

struct Probe {
    state: Arc<EndpointState>,
    addr: Addr,
    check: HealthCheck,
    h2: bool,
    service: ServiceName,
    health: HealthReporter,
    ok: IntCounter,
    failed: IntCounter,
}

impl Probe {
    async fn run(self) {
        // Spread the first checks of many endpoints over a tenth of an interval.
        tokio::time::sleep(jitter(self.check.interval / 10)).await;
        let (mut passes, mut fails) = (0u32, 0u32);
        loop {
            let result = self.probe_once().await;
            let ok = result.is_ok();
            if ok {
                self.ok.inc();
                passes += 1;
                fails = 0;
            } else {
                self.failed.inc();
                fails += 1;
                passes = 0;
            }
            let detail = match &result {
                Ok(passed) => passed.to_string(),
                Err(e) => e.to_string(),
            };
            debug!(endpoint = %self.state.key, ok, %detail, "health check");
            self.state.record_check(CheckReport { at: SystemTime::now(), ok, detail: detail.clone() });
            let current = match self.state.health() {
                Health::Unknown if self.check.initially_healthy => Health::Healthy,
                h => h,
            };
            let next = match current {
                // The first result decides for an endpoint that starts unproven.
                Health::Unknown => {
                    if ok {
                        Health::Healthy
                    } else {
                        Health::Unhealthy
                    }
                }
                Health::Healthy if fails >= self.check.unhealthy_threshold => Health::Unhealthy,
                Health::Unhealthy if passes >= self.check.healthy_threshold => Health::Healthy,
                h => h,
            };
            if self.state.set_health(next) {
                match next {
                    Health::Unhealthy => warn!(endpoint = %self.state.key, %detail, "endpoint unhealthy"),
                    _ => info!(endpoint = %self.state.key, %detail, "endpoint healthy"),
                }
                self.health.service_changed(&self.service);
            }
            let interval = self.check.interval;
            tokio::time::sleep(interval - interval / 10 + jitter(interval / 5)).await;
        }
    }

    /// One check: Ok or Err with what was seen.
    async fn probe_once(&self) -> Result<probe::Passed, probe::ProbeError> {
        let host = self.addr.to_string();
        let probe = match &self.check.kind {
            CheckKind::Http { path } if self.h2 => probe::Probe::Http2 { host: &host, path },
            CheckKind::Http { path } => probe::Probe::Http { host: &host, path },
            CheckKind::Tcp => probe::Probe::Tcp,
            CheckKind::Grpc { service } => probe::Probe::Grpc { host: &host, service },
        };
        probe::probe(&self.addr, probe, self.check.timeout, "zkroute-health-check").await
    }
}

/// A random duration in [0, max).
fn jitter(max: Duration) -> Duration {
    if max.is_zero() { Duration::ZERO } else { max.mul_f64(fastrand::f64()) }
}
