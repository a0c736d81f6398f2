//! A request's way to an upstream, the same for HTTP/1, HTTP/2 and TCP: the target drawn by
//! weight (another with endpoints when it has none), the ring-hash key, the endpoint picked, a
//! pooled connection taken or a new one made, each outcome recorded (outlier detection, metrics)
//! and the decision to retry. The protocol's own exchange runs between
//! [`Attempts::connection`] and [`Attempts::settle`], so every rule about retries and outliers
//! is written here once:
//!
//! ```text
//! while let Some(Connected { attempt, in_flight, conn }) = attempts.connection(&connector).await {
//!     let outcome = exchange(conn, in_flight, attempts.may_retry()).await;   // the protocol's part
//!     if let Some(done) = attempts.settle(attempt, outcome) { return done; }
//! }
//! answer(attempts.failure())
//! ```

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderName;

use super::balance::{self, PickInput, Tried};
use super::error::ProxyError;
use crate::endpoint::InFlight;
use crate::endpoint::breaker::{Limit, Slot};
use crate::health::HealthReporter;
use crate::net::IpText;
use crate::routing::documents::{HashOn, HeaderLookup, LbPolicy};
use crate::routing::rate_limit::RateKey;
use crate::routing::table::{Endpoint, EndpointSet, Route, Target, ZoneMatch, hash_bytes};

/// A target of a route, chosen for one request, holding the route it belongs to.
#[derive(Clone)]
pub struct TargetRef(Arc<Route>, usize);

impl TargetRef {
    /// The route the target belongs to.
    #[inline]
    pub fn route(&self) -> &Arc<Route> {
        &self.0
    }
}

impl std::ops::Deref for TargetRef {
    type Target = Target;
    fn deref(&self) -> &Target {
        &self.0.targets[self.1]
    }
}

/// The target a request goes to: drawn by weight; when the one drawn has no endpoint to take it
/// (among those of the request's tag, for a tag-routed service), another target with weight that
/// has. None when no target has one (the caller answers `no_healthy_upstream`), except for a
/// route of one target, which is kept so that its own counters see the failure.
#[inline(always)]
pub fn choose_target(route: &Arc<Route>, headers: &impl HeaderLookup) -> Option<TargetRef> {
    let (i, t) = route.target_at(fastrand::u32(..))?;
    let available = |t: &Target| !t.set.for_request(headers).active().is_empty();
    if available(t) || route.targets.len() == 1 {
        return Some(TargetRef(route.clone(), i));
    }
    let fallback = route.targets.iter().position(|t| t.weight > 0 && available(t))?;
    Some(TargetRef(route.clone(), fallback))
}

/// Lets a request through its rule's rate limit, if the rule has one; else the answer to give.
/// `header` reads a request header, for a limit keyed by one.
#[inline]
pub fn rate_limit<'h>(
    route: &Route,
    header: impl FnOnce(&HeaderName) -> Option<&'h [u8]>,
    client_ip: &'h IpText,
) -> Result<(), ProxyError> {
    let Some(limiter) = &route.limiter else { return Ok(()) };
    limiter
        .check(|key| match key {
            RateKey::Header(name) => header(name),
            RateKey::SourceIp => Some(client_ip.as_bytes()),
        })
        .map_err(|wait| ProxyError::RateLimited {
            retry_after: u32::try_from(wait.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1),
        })
}

/// The ring-hash key of a request, when its service hashes: the value of the named header, or the
/// client's address. A TCP connection, which has no headers, passes its client's address as the
/// header's value.
#[inline]
pub fn hash_key<'h>(
    lb: &LbPolicy,
    header: impl FnOnce(&HeaderName) -> Option<&'h [u8]>,
    client_ip: &IpText,
) -> Option<u64> {
    match lb {
        LbPolicy::RingHash(HashOn::Header(name)) => header(name).map(hash_bytes),
        LbPolicy::RingHash(HashOn::SourceIp) => Some(hash_bytes(client_ip.as_bytes())),
        _ => None,
    }
}

/// How a protocol reaches an endpoint: a pooled connection, or a new one within the timeout.
pub trait Connect {
    type Conn;
    /// An idle connection to `endpoint` ready for reuse, if the protocol keeps any.
    fn reuse(&self, endpoint: &Endpoint) -> Option<Self::Conn>;
    /// A new connection.
    fn connect(
        &self,
        endpoint: &Endpoint,
        timeout: ConnectTimeout,
    ) -> impl Future<Output = io::Result<Self::Conn>> + Send;
    /// Keeps `slot`, the connection's place under its service's `max_connections`, for as long
    /// as `conn` stays open, pooled or not. A connector that drops it leaves its connections
    /// uncounted.
    fn hold(&self, conn: &mut Self::Conn, slot: Slot) {
        let _ = (conn, slot);
    }
}

/// The time a new connection may take: the policy's connect timeout, within what is left of the
/// request's. Read only when a connection is made (a pooled one needs no clock reading).
#[derive(Clone, Copy)]
pub struct ConnectTimeout {
    policy: Duration,
    deadline: Option<tokio::time::Instant>,
}

impl ConnectTimeout {
    pub fn get(self) -> Duration {
        match self.deadline {
            Some(d) => self.policy.min(d.saturating_duration_since(tokio::time::Instant::now())),
            None => self.policy,
        }
    }
}

/// How an exchange with one endpoint ended, as the protocol saw it.
pub enum Outcome<T> {
    /// The upstream answered `status`, which went (fully or partly) to the client.
    /// `upstream_fault`: the exchange failed on the upstream's side all the same (a 5xx, a reset
    /// in the middle of the body), which counts against the endpoint.
    Answered { status: u16, upstream_fault: bool, value: T },
    /// Nothing reached the client, and the request can go to another endpoint: the upstream's
    /// fault (a reset, an invalid response, a 502 to 504 for an idempotent request).
    Retry(ProxyError),
    /// Nothing reached the client, and the request cannot be sent again. `upstream_fault`: it
    /// counts against the endpoint (a malformed request body, the client's fault, does not).
    Fail { error: ProxyError, upstream_fault: bool },
    /// The client went away or broke the exchange (counted as 499).
    ClientGone(T),
}

impl<T> Outcome<T> {
    /// The same outcome with its value turned by `f`.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Outcome<U> {
        match self {
            Outcome::Answered { status, upstream_fault, value } => {
                Outcome::Answered { status, upstream_fault, value: f(value) }
            }
            Outcome::Retry(e) => Outcome::Retry(e),
            Outcome::Fail { error, upstream_fault } => Outcome::Fail { error, upstream_fault },
            Outcome::ClientGone(value) => Outcome::ClientGone(f(value)),
        }
    }
}

/// One try at one endpoint.
pub struct Attempt<'t> {
    index: usize,
    pub endpoint: &'t Endpoint,
}

/// A try with its connection: the exchange takes the connection and the request's place in the
/// endpoint's in-flight count (to give it up as soon as the response is over, before a tunnel
/// that follows or a body the client reads slowly), and hands the attempt back to
/// [`Attempts::settle`].
pub struct Connected<'t, C> {
    pub attempt: Attempt<'t>,
    pub in_flight: InFlight,
    pub conn: C,
}

/// The tries of one request at the endpoints of its target, with what they share: the retries
/// left, the deadline, the last error.
pub struct Attempts<'t> {
    target: &'t Target,
    /// The target's endpoints this request may go to (of its tag, for a tag-routed service).
    set: &'t EndpointSet,
    hash: Option<u64>,
    tried: Tried,
    retries_left: u32,
    started: Instant,
    /// The whole request's deadline; None for a TCP connection, which has only connect timeouts.
    deadline: Option<tokio::time::Instant>,
    /// Settled for good: no further try, whatever is left.
    stopped: bool,
    /// An endpoint picked by [`Attempts::reuse`] that had no idle connection: the next
    /// [`Attempts::connection`] connects to it.
    pending: Option<(usize, InFlight)>,
    last_error: ProxyError,
    /// Counted by the service's circuit breaker, if it has one (until then, no try is made).
    admitted: bool,
    /// The request's places under `max_requests` and, once it retries, `max_retries`.
    request_slot: Option<Slot>,
    retry_slot: Option<Slot>,
    /// Each try's share of the deadline (the rule's `per_try_timeout`).
    per_try: Option<Duration>,
    /// The limit that kept the try in progress from being retried, counted if it fails.
    blocked: Option<&'static str>,
}

/// What a request waiting under `max_connections` got.
enum Room<C> {
    /// A place for a new connection (None: the service has no such limit).
    New(Option<Slot>),
    /// A pooled connection that went idle meanwhile.
    Idle(C),
}

impl<'t> Attempts<'t> {
    /// The tries of a request that arrived at `started` at `set`, endpoints of `target`, with
    /// `retries` extra tries allowed.
    #[inline]
    pub fn new(
        target: &'t Target,
        set: &'t EndpointSet,
        hash: Option<u64>,
        retries: u32,
        started: Instant,
        deadline: Option<tokio::time::Instant>,
    ) -> Self {
        Attempts {
            target,
            set,
            hash,
            tried: Tried::default(),
            retries_left: retries,
            started,
            deadline,
            stopped: false,
            pending: None,
            last_error: ProxyError::NoHealthyUpstream,
            admitted: set.gate.is_none(),
            request_slot: None,
            retry_slot: None,
            per_try: None,
            blocked: None,
        }
    }

    /// The same tries, each given at most `per_try` of the deadline (None: the whole of it).
    #[inline]
    pub fn with_per_try_timeout(mut self, per_try: Option<Duration>) -> Self {
        self.per_try = per_try;
        self
    }

    /// The deadline of a try starting now: the request's, or sooner with a per-try timeout.
    /// `cut`: it is sooner, so a try that runs out of time may be retried.
    #[inline]
    pub fn try_deadline(&self, deadline: tokio::time::Instant) -> (tokio::time::Instant, bool) {
        match self.per_try {
            None => (deadline, false),
            Some(t) => {
                let mine = tokio::time::Instant::now() + t;
                if mine < deadline { (mine, true) } else { (deadline, false) }
            }
        }
    }

    /// The next endpoint, with a connection to it from `connect` (a pooled one, or a new one
    /// within the timeout it is given). An endpoint that cannot be reached is counted against, and
    /// another is tried while retries remain. None when the request can go nowhere more: the
    /// caller answers [`Attempts::failure`].
    pub async fn connection<C: Connect>(
        &mut self,
        connector: &C,
        health: &HealthReporter,
    ) -> Option<Connected<'t, C::Conn>> {
        let set = self.set;
        if !self.admitted && !self.admit() {
            return None;
        }
        while !self.stopped {
            let (index, in_flight) = match self.pending.take() {
                Some(p) => p,
                None => {
                    let index = balance::pick(set, PickInput { hash: self.hash }, &self.tried)?;
                    self.picked(index);
                    let in_flight = set.endpoints[index].state.start_request();
                    if let Some(conn) = connector.reuse(&set.endpoints[index]) {
                        return Some(Connected {
                            attempt: Attempt { index, endpoint: &set.endpoints[index] },
                            in_flight,
                            conn,
                        });
                    }
                    (index, in_flight)
                }
            };
            let endpoint = &set.endpoints[index];
            let slot = match self.connection_room(connector, endpoint).await {
                Some(Room::New(slot)) => slot,
                Some(Room::Idle(conn)) => {
                    return Some(Connected { attempt: Attempt { index, endpoint }, in_flight, conn });
                }
                None => return None,
            };
            let timeout = ConnectTimeout { policy: set.policy.connect_timeout, deadline: self.deadline };
            match connector.connect(endpoint, timeout).await {
                Ok(mut conn) => {
                    if let Some(slot) = slot {
                        connector.hold(&mut conn, slot);
                    }
                    return Some(Connected { attempt: Attempt { index, endpoint }, in_flight, conn });
                }
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint.addr, error = %e, "upstream connect failed");
                    self.target.stats.connect_failed();
                    health.failure(set, index);
                    self.last_error = if self.expired() { ProxyError::Timeout } else { ProxyError::ConnectFailed };
                    if self.last_error == ProxyError::Timeout || !self.spend_retry() {
                        self.stopped = true;
                    }
                }
            }
        }
        None
    }

    /// The next endpoint if it has an idle connection to reuse, without awaiting anything (the
    /// common case of a busy endpoint, at the cost of no future); otherwise None, and
    /// [`Attempts::connection`] goes on from the endpoint picked here.
    #[inline]
    pub fn reuse<C: Connect>(&mut self, connector: &C) -> Option<Connected<'t, C::Conn>> {
        if self.stopped || self.pending.is_some() {
            return None;
        }
        // A service with a breaker or a retry budget counts the request here too, so that its
        // requests keep this path (refused, the request is stopped and `connection` says so).
        if !self.admitted && !self.admit() {
            return None;
        }
        let set = self.set;
        let index = balance::pick(set, PickInput { hash: self.hash }, &self.tried)?;
        self.picked(index);
        let endpoint = &set.endpoints[index];
        let in_flight = endpoint.state.start_request();
        match connector.reuse(endpoint) {
            Some(conn) => Some(Connected { attempt: Attempt { index, endpoint }, in_flight, conn }),
            None => {
                self.pending = Some((index, in_flight));
                None
            }
        }
    }

    /// Notes an endpoint picked for the next try.
    #[inline]
    fn picked(&mut self, index: usize) {
        self.tried.push(index);
        if self.set.endpoints[index].zone == ZoneMatch::Other {
            self.target.stats.cross_zone();
        }
    }

    /// Whether a failed exchange could still go to another endpoint: the protocol then reports it
    /// as [`Outcome::Retry`] rather than failing the request.
    #[inline]
    pub fn may_retry(&mut self) -> bool {
        if self.retries_left == 0 || self.set.active().len() <= self.tried.len() {
            return false;
        }
        if self.set.gate.is_none() {
            return true;
        }
        self.blocked = self.retry_blocked();
        self.blocked.is_none()
    }

    /// The limit that keeps this request from retrying now, if any: the service's `max_retries`
    /// (a place may still be taken by another before this request retries) or its retry budget.
    #[cold]
    fn retry_blocked(&self) -> Option<&'static str> {
        let gate = self.set.gate.as_ref()?;
        let policy = &self.set.policy;
        if let Some(max) = policy.circuit_breaker.and_then(|c| c.max_retries) {
            if self.retry_slot.is_none() && !gate.has_room(Limit::Retries, max) {
                return Some(Limit::Retries.as_str());
            }
        }
        match policy.retry_budget {
            Some(b) if !gate.budget_has_room(b) => Some("retry_budget"),
            _ => None,
        }
    }

    /// Whether the request was refused by its service's circuit breaker.
    pub fn overflowed(&self) -> bool {
        self.last_error == ProxyError::Overflow
    }

    /// Counts the request under its service's `max_requests`; false (and the request stopped
    /// with [`ProxyError::Overflow`]) when the limit is reached.
    fn admit(&mut self) -> bool {
        self.admitted = true;
        let Some(gate) = &self.set.gate else { return true };
        if self.set.policy.retry_budget.is_some() {
            gate.deposit(self.started);
        }
        let Some(max) = self.set.policy.circuit_breaker.and_then(|c| c.max_requests) else { return true };
        match gate.take(Limit::Requests, max) {
            Some(slot) => {
                self.request_slot = Some(slot);
                true
            }
            None => {
                self.overflow(Limit::Requests);
                false
            }
        }
    }

    #[cold]
    fn overflow(&mut self, limit: Limit) {
        self.target.stats.overflow(limit.as_str());
        self.last_error = ProxyError::Overflow;
        self.stopped = true;
    }

    /// Under the service's `max_connections`: a place for a new connection to `endpoint`, or,
    /// when every allowed connection is open, a wait (as one of at most `max_pending` waiting
    /// requests, within the request's deadline) for a place or for a pooled connection to it that
    /// went idle. None when the request overflowed or ran out of time (it is then stopped).
    async fn connection_room<C: Connect>(&mut self, connector: &C, endpoint: &Endpoint) -> Option<Room<C::Conn>> {
        let set = self.set;
        let (Some(gate), Some(limits)) = (&set.gate, set.policy.circuit_breaker) else { return Some(Room::New(None)) };
        let Some(max) = limits.max_connections else { return Some(Room::New(None)) };
        if let Some(slot) = gate.take(Limit::Connections, max) {
            return Some(Room::New(Some(slot)));
        }
        // A TCP connection has no request deadline to wait within: it is refused at once.
        let Some(deadline) = self.deadline else {
            self.overflow(Limit::Connections);
            return None;
        };
        let _waiting = match limits.max_pending {
            Some(max_pending) => match gate.take(Limit::Pending, max_pending) {
                Some(slot) => Some(slot),
                None => {
                    self.overflow(Limit::Pending);
                    return None;
                }
            },
            None => None,
        };
        // Counted, so that connections going idle wake someone only while someone waits.
        let _listening = gate.listen();
        loop {
            // Listen before looking, so that a connection freed in between is not missed.
            let freed = gate.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = connector.reuse(endpoint) {
                return Some(Room::Idle(conn));
            }
            if let Some(slot) = gate.take(Limit::Connections, max) {
                return Some(Room::New(Some(slot)));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                self.last_error = ProxyError::Timeout;
                self.stopped = true;
                return None;
            }
        }
    }

    /// Whether any endpoint was tried (a TCP connection closed without one counts as
    /// `no_healthy_upstream`, after failed tries as `upstream_connect_failed`).
    pub fn tried_any(&self) -> bool {
        !self.tried.is_empty()
    }

    /// Records an exchange's outcome: the request's result when it is settled, None when another
    /// endpoint may take it (the caller asks [`Attempts::connection`] again).
    #[inline]
    pub fn settle<T>(&mut self, attempt: Attempt<'t>, outcome: Outcome<T>, health: &HealthReporter) -> Option<T> {
        let Attempt { index, endpoint } = attempt;
        match outcome {
            Outcome::Answered { status, upstream_fault, value } => {
                if upstream_fault {
                    if let Some(limit) = self.blocked.take() {
                        // A failed answer that went to the client because no retry was allowed.
                        self.target.stats.overflow(limit);
                    }
                    health.failure(self.set, index);
                } else {
                    endpoint.state.record_success();
                }
                self.target.stats.observe_answer(&endpoint.addr, status, self.started.elapsed());
                Some(value)
            }
            Outcome::ClientGone(value) => {
                self.target.stats.observe(499, self.started.elapsed());
                Some(value)
            }
            Outcome::Retry(error) => {
                health.failure(self.set, index);
                self.last_error = error;
                if self.expired() || !self.spend_retry() {
                    self.stopped = true;
                }
                None
            }
            Outcome::Fail { error, upstream_fault } => {
                if upstream_fault {
                    health.failure(self.set, index);
                }
                self.last_error = error;
                self.stopped = true;
                None
            }
        }
    }

    /// A TCP connection's upstream is connected: that is its whole exchange as far as health goes.
    pub fn established(&mut self, attempt: Attempt<'t>) {
        attempt.endpoint.state.record_success();
    }

    /// Why the request failed, counted in the target's metrics.
    pub fn failure(&self) -> ProxyError {
        self.target.stats.observe(self.last_error.rescue().status, self.started.elapsed());
        self.last_error
    }

    /// A place under the service's `max_retries` for this request's retries (taken at its first
    /// retry), and a retry from its retry budget; false (counted as an overflow, the last error
    /// standing) when either has none.
    #[cold]
    fn retry_allowed(&mut self) -> bool {
        let Some(gate) = &self.set.gate else { return true };
        let policy = &self.set.policy;
        if let (None, Some(max)) = (&self.retry_slot, policy.circuit_breaker.and_then(|c| c.max_retries)) {
            match gate.take(Limit::Retries, max) {
                Some(slot) => self.retry_slot = Some(slot),
                None => {
                    self.target.stats.overflow(Limit::Retries.as_str());
                    return false;
                }
            }
        }
        if let Some(budget) = policy.retry_budget {
            if !gate.withdraw(budget) {
                self.target.stats.overflow("retry_budget");
                return false;
            }
        }
        true
    }

    #[inline]
    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    fn spend_retry(&mut self) -> bool {
        if self.retries_left == 0 {
            return false;
        }
        if self.set.gate.is_some() && !self.retry_allowed() {
            return false;
        }
        self.retries_left -= 1;
        self.target.stats.retried();
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::Mutex;

    use super::*;
    use crate::discovery::{instance_change, rule_change};
    use crate::endpoint::StateRegistry;
    use crate::metrics::Metrics;
    use crate::names::{Addr, ServiceName};
    use crate::routing::build::{Builder, Change, Defaults, ListenerSpec, RawNode, Resync};
    use crate::routing::documents::NoHeaders;
    use crate::routing::table::{Protocol, RoutingTable};
    use crate::routing::{Origin, SourceKind};

    /// A table with one HTTP route to service `s`, whose endpoints are 10.0.0.1 to 10.0.0.`n`.
    fn table(n: u8, retries: u32) -> RoutingTable {
        let spec = ListenerSpec { name: "http".into(), protocol: Protocol::Http, service: None, endpoint: None };
        let states = Arc::new(StateRegistry::new(Duration::from_secs(30)));
        let mut b = Builder::new(vec![spec], Defaults::default(), states, Arc::new(Metrics::new(true)));
        let resync = Resync { source: SourceKind::File, instances: vec![], rules: vec![], policies: vec![] };
        b.apply(Change::Resync(resync));
        let raw = |data: String| RawNode {
            origin: Origin { source: SourceKind::File, path: "/t".into(), mzxid: None, version: None },
            data: data.into_bytes(),
        };
        for i in 1..=n {
            b.apply(instance_change(ServiceName::new("s"), &i.to_string(), Some(raw(format!("10.0.0.{i}:80")))));
        }
        let rule = format!(r#"{{"listener":"http","retries":{retries},"backends":[{{"service":"s"}}]}}"#);
        b.apply(rule_change("r", Some(raw(rule))));
        b.build().0
    }

    fn target(t: &RoutingTable) -> TargetRef {
        let route = t.listener(0).and_then(|l| l.first()).expect("the route");
        choose_target(route, &NoHeaders).expect("a target")
    }

    /// Connects to every endpoint but those listed, counting what it was asked.
    #[derive(Default)]
    struct Connector {
        refused: HashSet<Addr>,
        asked: Mutex<Vec<Addr>>,
    }

    impl Connect for Connector {
        type Conn = Addr;
        fn reuse(&self, _: &Endpoint) -> Option<Addr> {
            None
        }
        async fn connect(&self, endpoint: &Endpoint, _: ConnectTimeout) -> io::Result<Addr> {
            self.asked.lock().unwrap().push(endpoint.addr.clone());
            if self.refused.contains(&endpoint.addr) {
                Err(io::ErrorKind::ConnectionRefused.into())
            } else {
                Ok(endpoint.addr.clone())
            }
        }
    }

    fn failures(t: &Target) -> Vec<u32> {
        t.set.endpoints.iter().map(|e| e.state.consecutive_failures()).collect()
    }

    #[tokio::test]
    async fn a_refused_connect_counts_against_its_endpoint_and_goes_to_another_while_retries_last() {
        let t = table(2, 1);
        let target = target(&t);
        let refused = ["10.0.0.1:80", "10.0.0.2:80"].iter().map(|a| a.parse().unwrap()).collect();
        let connector = Connector { refused, ..Default::default() };
        let health = HealthReporter::none();
        let mut a = Attempts::new(&target, &target.set, None, 1, Instant::now(), None);
        assert!(a.connection(&connector, &health).await.is_none());
        let asked = connector.asked.lock().unwrap().clone();
        assert_eq!(asked.len(), 2, "a try and one retry, each at another endpoint: {asked:?}");
        assert_ne!(asked[0], asked[1]);
        assert_eq!(a.failure(), ProxyError::ConnectFailed);
        assert_eq!(failures(&target), [1, 1]);

        let mut a = Attempts::new(&target, &target.set, None, 0, Instant::now(), None);
        assert!(a.connection(&connector, &health).await.is_none());
        assert_eq!(connector.asked.lock().unwrap().len(), 3, "no retry: one more try only");
    }

    #[tokio::test]
    async fn an_answer_settles_the_request_and_a_5xx_counts_against_the_endpoint() {
        let t = table(1, 0);
        let target = target(&t);
        let health = HealthReporter::none();
        let connector = Connector::default();
        let mut a = Attempts::new(&target, &target.set, None, 0, Instant::now(), None);
        let c = a.connection(&connector, &health).await.expect("connected");
        let done = a.settle(c.attempt, Outcome::Answered { status: 503, upstream_fault: true, value: "v" }, &health);
        assert_eq!(done, Some("v"));
        assert_eq!(failures(&target), [1]);
        let mut a = Attempts::new(&target, &target.set, None, 0, Instant::now(), None);
        let c = a.connection(&connector, &health).await.expect("connected");
        assert_eq!(
            a.settle(c.attempt, Outcome::Answered { status: 200, upstream_fault: false, value: 1 }, &health),
            Some(1)
        );
        assert_eq!(failures(&target), [0], "a success ends the run of failures");
    }

    #[tokio::test]
    async fn a_retry_goes_to_another_endpoint_while_retries_last_then_the_last_error_stands() {
        let t = table(3, 1);
        let target = target(&t);
        let health = HealthReporter::none();
        let connector = Connector::default();
        let mut a = Attempts::new(&target, &target.set, None, 1, Instant::now(), None);
        let first = a.connection(&connector, &health).await.expect("connected");
        assert!(a.may_retry());
        let first_addr = first.conn.clone();
        assert_eq!(a.settle::<()>(first.attempt, Outcome::Retry(ProxyError::UpstreamReset), &health), None);
        let second = a.connection(&connector, &health).await.expect("a second endpoint");
        assert_ne!(second.conn, first_addr, "never the same endpoint twice");
        assert!(!a.may_retry(), "the one retry is spent");
        assert_eq!(a.settle::<()>(second.attempt, Outcome::Retry(ProxyError::UpstreamReset), &health), None);
        assert!(a.connection(&connector, &health).await.is_none(), "no retry left");
        assert_eq!(a.failure(), ProxyError::UpstreamReset);
        assert_eq!(failures(&target).iter().sum::<u32>(), 2, "both resets count against their endpoints");
    }

    #[tokio::test]
    async fn a_client_fault_stops_the_request_without_blaming_the_upstream() {
        let t = table(2, 3);
        let target = target(&t);
        let health = HealthReporter::none();
        let connector = Connector::default();
        let mut a = Attempts::new(&target, &target.set, None, 3, Instant::now(), None);
        let c = a.connection(&connector, &health).await.expect("connected");
        let bad =
            Outcome::<()>::Fail { error: ProxyError::BadRequest("malformed chunked body"), upstream_fault: false };
        assert_eq!(a.settle(c.attempt, bad, &health), None);
        assert!(a.connection(&connector, &health).await.is_none(), "a failed request is not sent again");
        assert_eq!(a.failure(), ProxyError::BadRequest("malformed chunked body"));
        assert_eq!(failures(&target), [0, 0]);
    }

    #[tokio::test]
    async fn an_idle_connection_is_taken_without_connecting() {
        struct Idle;
        impl Connect for Idle {
            type Conn = &'static str;
            fn reuse(&self, _: &Endpoint) -> Option<&'static str> {
                Some("pooled")
            }
            async fn connect(&self, _: &Endpoint, _: ConnectTimeout) -> io::Result<&'static str> {
                Ok("new")
            }
        }
        let t = table(1, 0);
        let target = target(&t);
        let mut a = Attempts::new(&target, &target.set, None, 0, Instant::now(), None);
        assert_eq!(a.reuse(&Idle).map(|c| c.conn), Some("pooled"));
        let mut a = Attempts::new(&target, &target.set, None, 0, Instant::now(), None);
        assert_eq!(a.connection(&Idle, &HealthReporter::none()).await.map(|c| c.conn), Some("pooled"));
    }
}
