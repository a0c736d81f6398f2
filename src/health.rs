//! Endpoint health: passive outlier detection from real traffic (here) and active checks
//! ([`checker`]). Both write the endpoint state that lives outside the table, then tell the control
//! plane which services changed, so the next table rebuilds their available lists. The request
//! path only reads atomics.

use tokio::sync::mpsc;
use tracing::warn;

use crate::routing::ServiceName;
use crate::routing::table::EndpointSet;

/// Where health changes are reported: the control loop rebuilds the named services.
#[derive(Clone, Debug, Default)]
pub struct OutlierSink {
    tx: Option<mpsc::UnboundedSender<ServiceName>>,
}

impl OutlierSink {
    pub fn new(tx: mpsc::UnboundedSender<ServiceName>) -> Self {
        OutlierSink { tx: Some(tx) }
    }

    /// A sink that reports nowhere (tests, benches).
    pub fn none() -> Self {
        OutlierSink { tx: None }
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
