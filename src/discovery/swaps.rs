//! The last routing-table swaps, for `/config` (`recent_swaps`) and the dashboard: what each
//! changed, when, and how long its build took. Written by the control loop once per swap, read by
//! the admin server; never touched on the request path.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::routing::build::Delta;
use crate::routing::{RoutingTable, SourceKind};

/// Swaps kept: enough to see a burst, small enough to be free.
pub const KEPT: usize = 16;

/// Changed services named in one record; the rest are counted.
const NAMED_SERVICES: usize = 8;

/// One table swap.
#[derive(Clone, Debug, Serialize)]
pub struct SwapRecord {
    pub version: u64,
    #[serde(serialize_with = "rfc3339")]
    pub at: SystemTime,
    pub source: SourceKind,
    /// Microseconds from the start of the build to the swap.
    pub build_us: u64,
    /// Microseconds from the first ZooKeeper (or file) event behind it to the swap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation_us: Option<u64>,
    /// True when nothing but endpoint health changed.
    pub health_only: bool,
    /// The local configuration was reloaded (listeners or `[proxy]` defaults).
    pub local: bool,
    pub instances_added: usize,
    pub instances_removed: usize,
    pub instances_changed: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    pub rules_changed: usize,
    pub policies_changed: usize,
    /// The services whose documents changed (for a health-only swap, those rebuilt), the first
    /// few by name.
    pub services: Vec<String>,
    /// How many more services changed than `services` names.
    pub more_services: usize,
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

impl SwapRecord {
    pub fn new(table: &RoutingTable, delta: &Delta, build: Duration, propagation: Option<Duration>) -> Self {
        let health_only = delta.is_empty();
        let changed = if health_only { &delta.rebuilt } else { &delta.services };
        SwapRecord {
            version: table.version,
            at: table.built_at,
            source: table.source,
            build_us: micros(build),
            propagation_us: propagation.map(micros),
            health_only,
            local: delta.local,
            instances_added: delta.instances_added,
            instances_removed: delta.instances_removed,
            instances_changed: delta.instances_changed,
            rules_added: delta.rules_added,
            rules_removed: delta.rules_removed,
            rules_changed: delta.rules_changed,
            policies_changed: delta.policies_changed,
            services: changed.iter().take(NAMED_SERVICES).map(|s| s.to_string()).collect(),
            more_services: changed.len().saturating_sub(NAMED_SERVICES),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// The last [`KEPT`] swaps, shared between the control loop (which writes) and the admin server.
#[derive(Clone, Default)]
pub struct SwapLog(Arc<Mutex<VecDeque<SwapRecord>>>);

impl SwapLog {
    pub fn record(&self, record: SwapRecord) {
        if let Ok(mut log) = self.0.lock() {
            if log.len() == KEPT {
                log.pop_front();
            }
            log.push_back(record);
        }
    }

    /// The kept swaps, newest first.
    pub fn recent(&self) -> Vec<SwapRecord> {
        self.0.lock().map(|log| log.iter().rev().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::ServiceName;

    fn table(version: u64) -> RoutingTable {
        RoutingTable {
            version,
            built_at: SystemTime::UNIX_EPOCH,
            source: SourceKind::File,
            listeners: Box::default(),
            services: Default::default(),
            rules: Arc::default(),
            invalid: Arc::from(Vec::new()),
        }
    }

    #[test]
    fn the_log_keeps_the_last_swaps_newest_first() {
        let log = SwapLog::default();
        for v in 1..=KEPT as u64 + 3 {
            log.record(SwapRecord::new(&table(v), &Delta::default(), Duration::from_micros(5), None));
        }
        let recent = log.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!((recent[0].version, recent[KEPT - 1].version), (KEPT as u64 + 3, 4));
    }

    #[test]
    fn a_record_names_a_few_changed_services_and_counts_the_rest() {
        let mut delta = Delta { instances_added: 12, ..Delta::default() };
        delta.services = (0..12).map(|i| ServiceName::new(&format!("s{i:02}"))).collect();
        let r = SwapRecord::new(&table(7), &delta, Duration::from_micros(250), Some(Duration::from_millis(2)));
        assert!(!r.health_only);
        assert_eq!(r.services.len(), NAMED_SERVICES);
        assert_eq!((r.services[0].as_str(), r.more_services), ("s00", 4));
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["at"], "1970-01-01T00:00:00.000Z");
        assert_eq!((json["build_us"].as_u64(), json["propagation_us"].as_u64()), (Some(250), Some(2000)));

        let mut health = Delta::default();
        health.rebuilt.insert(ServiceName::new("users"));
        let r = SwapRecord::new(&table(8), &health, Duration::ZERO, None);
        assert!(r.health_only);
        assert_eq!(r.services, ["users"]);
        assert!(serde_json::to_value(&r).unwrap().get("propagation_us").is_none());
    }
}
