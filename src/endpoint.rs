//! Per-endpoint state that must outlive any one routing table: health, outlier ejection,
//! requests in flight. It is keyed by [`EndpointKey`] in a [`StateRegistry`]; each table built
//! holds `Arc`s into it, so the data plane reaches the state without a lookup, and a table swap or
//! a registry's delete-and-re-create of a node keeps it (for `state_retention` after the
//! endpoint was last seen). [`breaker`] keeps the per-service counts of circuit breaking the
//! same way, by service name.

pub mod breaker;

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::names::{EndpointKey, ServiceName};
use breaker::ServiceGate;

/// What active health checks last concluded.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Not checked yet, or the service has no active checks.
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    fn from_u8(v: u8) -> Health {
        match v {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }
}

/// The last active check of an endpoint, for `/config`.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    #[serde(with = "humantime_serde_compat")]
    pub at: SystemTime,
    pub ok: bool,
    pub detail: String,
}

mod humantime_serde_compat {
    use std::time::SystemTime;

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*t))
    }
}

/// Shared state of one endpoint. Atomics only on the request path.
pub struct EndpointState {
    pub key: EndpointKey,
    clock: Arc<Clock>,
    in_flight: AtomicU32,
    health: AtomicU8,
    /// Milliseconds since `epoch` until which the endpoint is ejected; 0 when not ejected.
    ejected_until: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    last_check: Mutex<Option<Box<CheckReport>>>,
    /// Milliseconds since `clock.epoch` since when no table has held the state; 0 while one does.
    unused_since: AtomicU64,
    /// Data-plane state of the endpoint (its connection pool), created on first use.
    data_plane: OnceLock<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointState").field("key", &self.key).field("health", &self.health()).finish_non_exhaustive()
    }
}

impl EndpointState {
    fn new(key: EndpointKey, clock: Arc<Clock>) -> Self {
        EndpointState {
            key,
            clock,
            unused_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            health: AtomicU8::new(0),
            ejected_until: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            last_check: Mutex::new(None),
            data_plane: OnceLock::new(),
        }
    }

    /// The data plane's own state for this endpoint (its connection pool), made by `init` on
    /// first use. Kept as long as the endpoint state is, so it survives table swaps. None if a
    /// different type was stored first.
    #[inline]
    pub fn data_plane<T: Any + Send + Sync>(&self, init: impl FnOnce() -> T) -> Option<&T> {
        self.data_plane.get_or_init(|| Box::new(init())).downcast_ref::<T>()
    }

    /// A state not tied to any registry, for tests and benches.
    pub fn detached(key: EndpointKey) -> Arc<Self> {
        Arc::new(EndpointState::new(key, Arc::new(Clock::new())))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request or connection in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn health(&self) -> Health {
        Health::from_u8(self.health.load(Ordering::Relaxed))
    }

    /// Records what active checks concluded; returns true when the state changed.
    pub fn set_health(&self, h: Health) -> bool {
        let v = match h {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        };
        self.health.swap(v, Ordering::Relaxed) != v
    }

    pub fn record_check(&self, report: CheckReport) {
        if let Ok(mut last) = self.last_check.lock() {
            *last = Some(Box::new(report));
        }
    }

    pub fn last_check(&self) -> Option<CheckReport> {
        self.last_check.lock().ok().and_then(|l| l.as_deref().cloned())
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Whether outlier detection has the endpoint ejected right now.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }

    /// When the current ejection ends, if ejected.
    pub fn ejected_until(&self) -> Option<SystemTime> {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && self.now_ms() < until).then(|| self.clock.wall + Duration::from_millis(until))
    }

    /// Ejects the endpoint for `base` times the number of its ejections so far, capped at `max`.
    /// Returns the ejection's length.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = base.saturating_mul(n).min(max);
        let until = self.now_ms() + u64::try_from(length.as_millis()).unwrap_or(u64::MAX / 2);
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        length
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// The run of failed exchanges since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Counts a failed exchange; returns the run of consecutive failures so far.
    pub fn record_failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    #[inline]
    pub fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Whether the endpoint may take new traffic right now: not ejected, and healthy (or not
    /// checked yet while the policy starts endpoints as healthy).
    #[inline]
    pub fn is_usable(&self, unknown_is_healthy: bool) -> bool {
        let healthy = match self.health() {
            Health::Healthy => true,
            Health::Unknown => unknown_is_healthy,
            Health::Unhealthy => false,
        };
        healthy && !self.is_ejected()
    }
}

/// A request or connection in flight on an endpoint (for `p2c`), until dropped.
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    pub fn state(&self) -> &Arc<EndpointState> {
        &self.0
    }
}

/// The registry's clock: states count milliseconds from one epoch, shown as wall-clock times.
#[derive(Debug)]
struct Clock {
    epoch: Instant,
    wall: SystemTime,
}

impl Clock {
    fn new() -> Self {
        Clock { epoch: Instant::now(), wall: SystemTime::now() }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    fn ms_at(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

/// A state in the registry's set, found by its key (no second copy of the key).
struct ByKey(Arc<EndpointState>);

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for ByKey {}

impl Hash for ByKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.key.hash(h)
    }
}

impl std::borrow::Borrow<EndpointKey> for ByKey {
    fn borrow(&self) -> &EndpointKey {
        &self.0.key
    }
}

/// All endpoint states, keyed by endpoint. Only the control plane takes its lock, when a table
/// is built; the request path reaches states through the table.
pub struct StateRegistry {
    clock: Arc<Clock>,
    /// Milliseconds; a configuration reload may change it.
    retention_ms: AtomicU64,
    entries: Mutex<HashSet<ByKey>>,
    /// Circuit-breaking counts by service, for services whose policy has a breaker.
    gates: Mutex<HashMap<ServiceName, Arc<ServiceGate>>>,
}

impl StateRegistry {
    pub fn new(retention: Duration) -> Self {
        let registry = StateRegistry {
            clock: Arc::new(Clock::new()),
            retention_ms: AtomicU64::new(0),
            entries: Mutex::new(HashSet::new()),
            gates: Mutex::new(HashMap::new()),
        };
        registry.set_retention(retention);
        registry
    }

    /// How long a state outlives the last table that held it, from the next sweep on.
    pub fn set_retention(&self, retention: Duration) {
        self.retention_ms.store(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The state for `key`, created if new or expired.
    pub fn get(&self, key: &EndpointKey) -> Arc<EndpointState> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = entries.get(key) {
            found.0.unused_since.store(0, Ordering::Relaxed);
            return found.0.clone();
        }
        let state = Arc::new(EndpointState::new(key.clone(), self.clock.clone()));
        entries.insert(ByKey(state.clone()));
        state
    }

    /// The circuit-breaking counts of `service`, created if new.
    pub fn gate(&self, service: &ServiceName) -> Arc<ServiceGate> {
        let mut gates = self.gates.lock().unwrap_or_else(|e| e.into_inner());
        gates.entry(service.clone()).or_default().clone()
    }

    /// Forgets states that no table has held for longer than the retention. A state is in use
    /// while some table (in force, or still finishing requests) holds an `Arc` to it. Returns
    /// whether it kept a state that nothing uses, waiting out its retention: a later sweep is
    /// then due to forget it.
    pub fn sweep(&self) -> bool {
        self.sweep_at(Instant::now())
    }

    fn sweep_at(&self, now: Instant) -> bool {
        let now_ms = self.clock.ms_at(now);
        let retention = self.retention_ms.load(Ordering::Relaxed);
        // A gate nothing holds (no table, no slot) counts nothing: it is made anew when needed.
        self.gates.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, g| Arc::strong_count(g) > 1);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut waiting = false;
        entries.retain(|ByKey(state)| {
            if Arc::strong_count(state) > 1 {
                state.unused_since.store(0, Ordering::Relaxed);
                return true;
            }
            let since = match state.unused_since.load(Ordering::Relaxed) {
                0 => {
                    state.unused_since.store(now_ms, Ordering::Relaxed);
                    now_ms
                }
                t => t,
            };
            let keep = now_ms.saturating_sub(since) < retention;
            waiting |= keep;
            keep
        });
        waiting
    }

    /// Every state currently kept, used or not.
    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::ServiceName;

    fn key(port: u16) -> EndpointKey {
        EndpointKey { service: Some(ServiceName::new("s")), addr: format!("10.0.0.1:{port}").parse().unwrap() }
    }

    #[test]
    fn state_survives_until_retention_after_last_use() {
        let reg = StateRegistry::new(Duration::from_millis(50));
        let a = reg.get(&key(1));
        a.set_health(Health::Unhealthy);
        assert!(!reg.sweep(), "held by a table: no other sweep due");
        assert_eq!(reg.len(), 1, "held by a table: kept");
        let ptr = Arc::as_ptr(&a);
        drop(a);
        assert!(reg.sweep(), "unused, within retention: another sweep is due");
        assert_eq!(Arc::as_ptr(&reg.get(&key(1))), ptr, "re-created within retention keeps its state");
        assert_eq!(reg.get(&key(1)).health(), Health::Unhealthy);
        reg.sweep();
        assert!(!reg.sweep_at(Instant::now() + Duration::from_millis(60)), "forgotten: nothing left to wait for");
        assert!(reg.is_empty());
        assert_eq!(reg.get(&key(1)).health(), Health::Unknown);
    }

    #[test]
    fn ejection_grows_with_each_ejection_and_is_capped() {
        let s = EndpointState::detached(key(2));
        assert_eq!(s.eject(Duration::from_secs(1), Duration::from_secs(3)), Duration::from_secs(1));
        assert!(s.is_ejected());
        assert_eq!(s.eject(Duration::from_secs(1), Duration::from_secs(3)), Duration::from_secs(2));
        assert_eq!(s.eject(Duration::from_secs(1), Duration::from_secs(3)), Duration::from_secs(3));
        assert_eq!(s.eject(Duration::from_secs(1), Duration::from_secs(3)), Duration::from_secs(3));
        assert!(!s.is_usable(true));
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let s = EndpointState::detached(key(3));
        let g1 = s.start_request();
        let g2 = s.start_request();
        assert_eq!(s.in_flight(), 2);
        drop(g1);
        drop(g2);
        assert_eq!(s.in_flight(), 0);
    }
}
