//! Endpoint health: passive outlier detection from real traffic (here) and active checks
//! ([`checker`]). Both write the endpoint state that lives outside the table, then tell the control
//! plane which services changed, so the next table rebuilds their available lists. The request
//! path only reads atomics.

pub mod checker;
pub mod probe;

use tokio::sync::mpsc;
use tracing::warn;

use crate::routing::ServiceName;
use crate::routing::table::EndpointSet;

/// Passive health: counts failed exchanges, ejects outliers, and reports health changes to the
/// control loop, which rebuilds the named services.
#[derive(Clone, Debug, Default)]
pub struct HealthReporter {
    tx: Option<mpsc::UnboundedSender<ServiceName>>,
}

impl HealthReporter {
    pub fn new(tx: mpsc::UnboundedSender<ServiceName>) -> Self {
        HealthReporter { tx: Some(tx) }
    }

    /// A reporter that reports nowhere (tests).
    #[cfg(test)]
    pub fn none() -> Self {
        HealthReporter { tx: None }
    }

    /// Counts a failed exchange with endpoint `index` of `set` (a connect failure, a reset or a
    /// 5xx answer); ejects it when its policy's run of failures is reached, unless that would
    /// eject more than the allowed share of the set.
    pub fn failure(&self, set: &EndpointSet, index: usize) {
        let Some(endpoint) = set.endpoints.get(index) else { return };
        let run = endpoint.state.record_failure();
        let Some(outlier) = &set.policy.outlier else { return };
        if run < outlier.consecutive_failures || endpoint.state.is_ejected() {
            return;
        }
        let total = set.endpoints.len();
        let ejected = set.endpoints.iter().filter(|e| e.state.is_ejected()).count();
        if (ejected + 1) * 100 > total * outlier.max_ejection_percent as usize {
            return;
        }
        let length = endpoint.state.eject(outlier.base_ejection, outlier.max_ejection);
        warn!(endpoint = %endpoint.state.key, failures = run, ejected_for = ?length, "endpoint ejected (outlier detection)");
        self.changed(set);
        // Bring it back into the table when the ejection ends.
        if let (Some(tx), Some(service)) = (self.tx.clone(), set.service.clone()) {
            tokio::spawn(async move {
                tokio::time::sleep(length).await;
                let _ = tx.send(service);
            });
        }
    }

    /// Reports that endpoints of the set's service changed health.
    pub fn changed(&self, set: &EndpointSet) {
        if let (Some(tx), Some(service)) = (&self.tx, &set.service) {
            let _ = tx.send(service.clone());
        }
    }

    /// Reports that endpoints of `service` changed health.
    pub fn service_changed(&self, service: &ServiceName) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(service.clone());
        }
    }
}

/// Counts of a service's endpoints by state, for `zkroute_backends{service,state}`.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCounts {
    pub healthy: i64,
    pub unhealthy: i64,
    pub ejected: i64,
    pub draining: i64,
}

impl StateCounts {
    pub fn of(set: &EndpointSet) -> Self {
        let unknown_ok = set.policy.unknown_is_healthy();
        let mut c = StateCounts::default();
        for e in set.endpoints.iter() {
            if e.draining {
                c.draining += 1;
            } else if e.state.is_ejected() {
                c.ejected += 1;
            } else if e.state.is_usable(unknown_ok) {
                c.healthy += 1;
            } else {
                c.unhealthy += 1;
            }
        }
        c
    }
}

/// The states `zkroute_backends` counts, in the order of its gauges per service.
const BACKEND_STATES: [&str; 4] = ["healthy", "unhealthy", "ejected", "draining"];

/// Keeps `zkroute_backends` in line with each table published.
pub struct BackendGauges {
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Each service's gauges, resolved once: a lookup by labels hashes and locks.
    services: std::collections::HashMap<ServiceName, [prometheus::IntGauge; 4]>,
}

impl BackendGauges {
    pub fn new(metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        BackendGauges { metrics, services: Default::default() }
    }

    /// Updates the gauges of the services a table rebuilt (all of them the first time).
    pub fn update(&mut self, table: &crate::routing::RoutingTable, delta: &crate::routing::build::Delta) {
        let g = &self.metrics.backends;
        let names: Vec<ServiceName> = if self.services.is_empty() || delta.routes_rebuilt {
            table.services.iter().map(|(n, _)| n.clone()).chain(self.services.keys().cloned()).collect()
        } else {
            delta.rebuilt.iter().cloned().collect()
        };
        for name in names {
            match table.service(name.as_str()) {
                Some(service) => {
                    let c = StateCounts::of(&service.all);
                    let gauges = self
                        .services
                        .entry(name)
                        .or_insert_with_key(|n| BACKEND_STATES.map(|state| g.with_label_values(&[n.as_str(), state])));
                    for (gauge, n) in gauges.iter().zip([c.healthy, c.unhealthy, c.ejected, c.draining]) {
                        gauge.set(n);
                    }
                }
                None => {
                    if self.services.remove(&name).is_some() {
                        for state in BACKEND_STATES {
                            let _ = g.remove_label_values(&[name.as_str(), state]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use prometheus::core::Collector;

    use super::*;
    use crate::discovery::instance_change;
    use crate::endpoint::StateRegistry;
    use crate::metrics::Metrics;
    use crate::routing::build::{Builder, Change, Defaults, RawNode, Resync};
    use crate::routing::{Origin, SourceKind};

    /// Endpoints `zkroute_backends` counts for `service` over all states; none without a series.
    fn counted(metrics: &Metrics, service: &str) -> Option<f64> {
        let families = metrics.backends.collect();
        let series: Vec<f64> = families
            .iter()
            .flat_map(|f| f.get_metric())
            .filter(|m| m.get_label().iter().any(|l| l.name() == "service" && l.value() == service))
            .map(|m| m.get_gauge().get_value())
            .collect();
        (!series.is_empty()).then(|| series.iter().sum())
    }

    #[test]
    fn a_service_that_goes_loses_its_backend_series_and_gets_them_back_when_it_returns() {
        let metrics = Arc::new(Metrics::new(true));
        let states = Arc::new(StateRegistry::new(Duration::from_secs(30)));
        let mut b = Builder::new(vec![], Defaults::default(), states, metrics.clone());
        b.apply(Change::Resync(Resync {
            source: SourceKind::File,
            instances: vec![],
            rules: vec![],
            policies: vec![],
        }));
        let node = |id: &str| {
            let origin =
                Origin { source: SourceKind::File, path: format!("/s/{id}").into(), mzxid: None, version: None };
            Some(RawNode { origin, data: format!("10.0.0.{id}:80").into_bytes() })
        };
        let s = || ServiceName::new("s");
        let mut gauges = BackendGauges::new(metrics.clone());
        let mut publish = |b: &mut Builder| {
            let (table, delta) = b.build();
            gauges.update(&table, &delta);
        };

        b.apply(instance_change(s(), "1", node("1")));
        publish(&mut b);
        assert_eq!(counted(&metrics, "s"), Some(1.0));

        b.apply(instance_change(s(), "1", None));
        publish(&mut b);
        assert_eq!(counted(&metrics, "s"), None, "a service without instances keeps no series");

        b.apply(instance_change(s(), "1", node("1")));
        b.apply(instance_change(s(), "2", node("2")));
        publish(&mut b);
        assert_eq!(counted(&metrics, "s"), Some(2.0), "the series are back with the service");
    }
}
