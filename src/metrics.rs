//! Every metric family of the README's "Observability", registered once at start in a registry owned by the
//! process (not the global one, so several proxies can run in one test binary).

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::names::Addr;
use crate::routing::rate_limit::RuleStats;
use crate::routing::table::{StatsSource, TargetStats};

/// Metric names, in one place.
pub mod names {
    pub const HTTP_REQUESTS: &str = "zkroute_http_requests_total";
    pub const HTTP_REQUEST_DURATION: &str = "zkroute_http_request_duration_seconds";
    pub const UPSTREAM_CONNECT_ERRORS: &str = "zkroute_upstream_connect_errors_total";
    pub const RETRIES: &str = "zkroute_retries_total";
    pub const TCP_CONNECTIONS: &str = "zkroute_tcp_connections_total";
    pub const TCP_ACTIVE_CONNECTIONS: &str = "zkroute_tcp_active_connections";
    pub const CONNECTIONS: &str = "zkroute_connections";
    pub const TCP_BYTES: &str = "zkroute_tcp_bytes_total";
    pub const TCP_REJECTED: &str = "zkroute_tcp_connections_rejected_total";
    pub const TCP_RELAY_BUFFER_BYTES: &str = "zkroute_tcp_relay_buffer_bytes";
    pub const BACKENDS: &str = "zkroute_backends";
    pub const HEALTH_CHECKS: &str = "zkroute_health_checks_total";
    pub const TABLE_VERSION: &str = "zkroute_table_version";
    pub const TABLE_ZXID: &str = "zkroute_table_zxid";
    pub const TABLE_UPDATES: &str = "zkroute_table_updates_total";
    pub const TABLE_BUILD_DURATION: &str = "zkroute_table_build_duration_seconds";
    pub const DISCOVERY_PROPAGATION: &str = "zkroute_discovery_propagation_seconds";
    pub const INVALID_NODES: &str = "zkroute_invalid_nodes";
    pub const ZK_CONNECTED: &str = "zkroute_zk_connected";
    pub const ZK_SESSION_EXPIRATIONS: &str = "zkroute_zk_session_expirations_total";
    pub const REGISTERED: &str = "zkroute_registered";
    pub const SNAPSHOT_IN_USE: &str = "zkroute_snapshot_in_use";
    pub const CONNECTIONS_REFUSED: &str = "zkroute_connections_refused_total";
    pub const ZK_NODES_READ: &str = "zkroute_zk_nodes_read_total";
    pub const ACCESS_LOG_DROPPED: &str = "zkroute_access_log_dropped_total";
    pub const UPSTREAM_REQUESTS: &str = "zkroute_upstream_requests_total";
    pub const SERVICES_EMPTY: &str = "zkroute_services_empty";
    pub const ZK_SERVER_UNSUPPORTED: &str = "zkroute_zk_server_unsupported";
    pub const REGISTRATION_CONFLICT: &str = "zkroute_registration_conflict";
    pub const CONFIG_RELOADS: &str = "zkroute_config_reloads_total";
    pub const TLS_HANDSHAKE_ERRORS: &str = "zkroute_tls_handshake_errors_total";
    pub const TLS_FILE_ERRORS: &str = "zkroute_tls_file_errors_total";
    pub const TLS_CERTIFICATE_EXPIRY: &str = "zkroute_tls_certificate_expiry_timestamp_seconds";
    pub const UPSTREAM_TLS_ERRORS: &str = "zkroute_upstream_tls_errors_total";
    pub const OVERFLOW: &str = "zkroute_overflow_total";
    pub const CROSS_ZONE_REQUESTS: &str = "zkroute_cross_zone_requests_total";
    pub const RATE_LIMITED: &str = "zkroute_rate_limited_total";
    pub const GRPC_REQUESTS: &str = "zkroute_grpc_requests_total";
}

/// Latency buckets for a sidecar: 100 microseconds to 10 seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every family, registered.
pub struct Metrics {
    pub registry: Registry,
    /// False when `metrics.enabled = false`: data-plane recording is skipped.
    pub enabled: bool,
    pub http_requests: IntCounterVec,
    pub http_request_duration: HistogramVec,
    pub upstream_connect_errors: IntCounterVec,
    pub retries: IntCounterVec,
    pub tcp_connections: IntCounterVec,
    pub tcp_active_connections: IntGaugeVec,
    /// HTTP listeners' client connections by what they are doing: see [`ConnState`]. `idle` is
    /// set when the metrics are rendered, from [`Metrics::connections_open`]: read it through
    /// [`Metrics::connections_in`].
    pub connections: IntGaugeVec,
    /// HTTP listeners' client connections open, by listener (not exported itself): the
    /// connections in no other state of `connections` are `idle`.
    connections_open: IntGaugeVec,
    pub tcp_bytes: IntCounterVec,
    /// TCP connections closed at once, never forwarded; `reason` is an `x-zkroute-error` value.
    pub tcp_rejected: IntCounterVec,
    /// Bytes held by TCP relay buffers grown past their first size, all listeners together.
    pub tcp_relay_buffer_bytes: IntGauge,
    pub backends: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub table_version: IntGauge,
    /// The highest mzxid among the ZooKeeper nodes the tables swapped in so far were read from.
    pub table_zxid: IntGauge,
    pub table_updates: IntCounter,
    pub table_build_duration: Histogram,
    pub discovery_propagation: Histogram,
    pub invalid_nodes: IntGaugeVec,
    pub zk_connected: IntGauge,
    /// 1 while no instance is registered although some were (a services root gone or emptied).
    pub services_empty: IntGauge,
    /// 1 when the ZooKeeper server lacks what zkroute needs (3.6 or later).
    pub zk_server_unsupported: IntGauge,
    /// 1 while a registration's node is held by another owner.
    pub registration_conflict: IntGaugeVec,
    pub zk_session_expirations: IntCounter,
    pub registered: IntGaugeVec,
    pub snapshot_in_use: IntGauge,
    pub connections_refused: IntCounterVec,
    /// Client TLS handshakes that failed on a TLS listener.
    pub tls_handshake_errors: IntCounterVec,
    /// Reloads of changed TLS files that failed (the previous files stay in force).
    pub tls_file_errors: IntCounterVec,
    pub tls_certificate_expiry: IntGaugeVec,
    /// Upstream TLS handshakes that failed, by service and reason.
    pub upstream_tls_errors: IntCounterVec,
    pub zk_nodes_read: IntCounter,
    pub access_log_dropped: IntCounter,
    /// Per endpoint; recorded only with `metrics.per_instance = true`.
    pub upstream_requests: IntCounterVec,
    pub per_instance: bool,
    /// Configuration reloads (SIGHUP), by `result`: `ok`, or `error` when nothing changed.
    pub config_reloads: IntCounterVec,
    /// Requests and connections refused by a service's circuit breaker, by the limit reached.
    pub overflow: IntCounterVec,
    /// Requests refused by a rule's rate limit.
    pub rate_limited: IntCounterVec,
    /// Attempts sent to an endpoint outside `proxy.zone`, by service.
    pub cross_zone: IntCounterVec,
    /// gRPC calls by the `grpc-status` they ended with (they travel as HTTP 200).
    pub grpc_requests: IntCounterVec,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let m = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("registered once");
    m
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let m = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(m.clone())).expect("registered once");
    m
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let m = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid metric");
    r.register(Box::new(m.clone())).expect("registered once");
    m
}

impl Metrics {
    pub fn new(enabled: bool) -> Metrics {
        Metrics::with_options(enabled, false)
    }

    /// `per_instance` adds endpoint addresses as labels (`zkroute_upstream_requests_total`).
    pub fn with_options(enabled: bool, per_instance: bool) -> Metrics {
        use names::*;
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("process collector");
        let http_request_duration = HistogramVec::new(
            HistogramOpts::new(HTTP_REQUEST_DURATION, "HTTP request duration, from request head to response head.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["listener", "service"],
        )
        .expect("valid metric");
        r.register(Box::new(http_request_duration.clone())).expect("registered once");
        let simple = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("valid metric");
            r.register(Box::new(m.clone())).expect("registered once");
            m
        };
        let table_version = simple(TABLE_VERSION, "Version of the routing table in force.");
        let table_zxid = simple(TABLE_ZXID, "Highest ZooKeeper mzxid among the nodes the routing table was read from.");
        let zk_connected = simple(ZK_CONNECTED, "1 while connected to ZooKeeper.");
        let services_empty =
            simple(SERVICES_EMPTY, "1 while the registry shows no instance at all although it showed some before.");
        let zk_server_unsupported = simple(
            ZK_SERVER_UNSUPPORTED,
            "1 when the ZooKeeper server answered UNIMPLEMENTED: zkroute needs ZooKeeper 3.6 or later.",
        );
        let snapshot_in_use = simple(SNAPSHOT_IN_USE, "1 while serving a table loaded from the snapshot file.");
        let tcp_relay_buffer_bytes =
            simple(TCP_RELAY_BUFFER_BYTES, "Bytes held by TCP relay buffers grown for bulk transfers.");
        let counter = |name: &str, help: &str| {
            let m = IntCounter::new(name, help).expect("valid metric");
            r.register(Box::new(m.clone())).expect("registered once");
            m
        };
        let table_updates = counter(TABLE_UPDATES, "Routing tables swapped in.");
        let zk_session_expirations = counter(ZK_SESSION_EXPIRATIONS, "ZooKeeper sessions that expired.");
        let zk_nodes_read = counter(ZK_NODES_READ, "ZooKeeper nodes read (data reads, full and incremental).");
        let access_log_dropped =
            counter(ACCESS_LOG_DROPPED, "Access log lines dropped because the writer fell behind.");
        Metrics {
            enabled,
            http_requests: counter_vec(&r, HTTP_REQUESTS, "HTTP requests answered.", &["listener", "service", "code"]),
            http_request_duration,
            upstream_connect_errors: counter_vec(
                &r,
                UPSTREAM_CONNECT_ERRORS,
                "Failed connection attempts to upstream endpoints.",
                &["service"],
            ),
            retries: counter_vec(&r, RETRIES, "Extra attempts made after a failed one.", &["service"]),
            tcp_connections: counter_vec(&r, TCP_CONNECTIONS, "TCP connections accepted.", &["listener", "service"]),
            tcp_active_connections: gauge_vec(&r, TCP_ACTIVE_CONNECTIONS, "TCP connections open.", &["listener"]),
            connections: gauge_vec(
                &r,
                CONNECTIONS,
                "HTTP listeners' client connections open, by state: reading_head, idle, active, tunnel.",
                &["listener", "state"],
            ),
            connections_open: IntGaugeVec::new(Opts::new("connections_open", "unexported"), &["listener"])
                .expect("valid metric"),
            tcp_bytes: counter_vec(&r, TCP_BYTES, "Bytes forwarded by TCP listeners.", &["listener", "direction"]),
            tcp_rejected: counter_vec(
                &r,
                TCP_REJECTED,
                "TCP connections closed without reaching an upstream, by reason.",
                &["listener", "reason"],
            ),
            tcp_relay_buffer_bytes,
            backends: gauge_vec(&r, BACKENDS, "Backend endpoints by state.", &["service", "state"]),
            health_checks: counter_vec(&r, HEALTH_CHECKS, "Active health checks run.", &["service", "result"]),
            table_version,
            table_zxid,
            table_updates,
            table_build_duration: histogram(
                &r,
                TABLE_BUILD_DURATION,
                "Time to build a routing table.",
                LATENCY_BUCKETS,
            ),
            discovery_propagation: histogram(
                &r,
                DISCOVERY_PROPAGATION,
                "From a ZooKeeper event's arrival to the swap of the table that includes it.",
                LATENCY_BUCKETS,
            ),
            invalid_nodes: gauge_vec(&r, INVALID_NODES, "Nodes skipped as invalid, now.", &["kind"]),
            zk_connected,
            services_empty,
            zk_server_unsupported,
            registration_conflict: gauge_vec(
                &r,
                REGISTRATION_CONFLICT,
                "1 while a registration's node is held by another owner (same id from elsewhere).",
                &["service"],
            ),
            zk_session_expirations,
            registered: gauge_vec(&r, REGISTERED, "1 while the local app is registered.", &["service"]),
            snapshot_in_use,
            zk_nodes_read,
            access_log_dropped,
            upstream_requests: counter_vec(
                &r,
                UPSTREAM_REQUESTS,
                "Requests answered by each upstream endpoint (only with metrics.per_instance).",
                &["service", "instance", "code"],
            ),
            per_instance: per_instance && enabled,
            connections_refused: counter_vec(
                &r,
                CONNECTIONS_REFUSED,
                "Client connections refused at a listener's connection limit.",
                &["listener"],
            ),
            tls_handshake_errors: counter_vec(
                &r,
                TLS_HANDSHAKE_ERRORS,
                "Client TLS handshakes that failed on a TLS listener.",
                &["listener"],
            ),
            tls_file_errors: counter_vec(
                &r,
                TLS_FILE_ERRORS,
                "Changed TLS certificate, key or CA files that failed to load; the previous ones stay in force.",
                &["file"],
            ),
            tls_certificate_expiry: gauge_vec(
                &r,
                TLS_CERTIFICATE_EXPIRY,
                "When the certificate in force from this file expires (notAfter), Unix seconds.",
                &["file"],
            ),
            upstream_tls_errors: counter_vec(
                &r,
                UPSTREAM_TLS_ERRORS,
                "Upstream TLS handshakes that failed, by service and reason.",
                &["service", "reason"],
            ),
            config_reloads: counter_vec(
                &r,
                CONFIG_RELOADS,
                "Configuration reloads (SIGHUP), by result: ok, or error when nothing changed.",
                &["result"],
            ),
            overflow: counter_vec(
                &r,
                OVERFLOW,
                "Requests and connections refused by a service's circuit breaker, by the limit reached.",
                &["service", "limit"],
            ),
            cross_zone: counter_vec(
                &r,
                CROSS_ZONE_REQUESTS,
                "Attempts sent to an endpoint outside this host's zone (proxy.zone), retries included.",
                &["service"],
            ),
            rate_limited: counter_vec(
                &r,
                RATE_LIMITED,
                "Requests refused by a rule's local rate limit.",
                &["listener", "rule"],
            ),
            grpc_requests: counter_vec(
                &r,
                GRPC_REQUESTS,
                "gRPC calls answered, by grpc-status (none: ended without one).",
                &["listener", "service", "grpc_status"],
            ),
            registry: r,
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        self.count_idle();
        let mut out = Vec::with_capacity(16 * 1024);
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Metrics {
    /// A listener's connections in `state` now (`zkroute_connections{listener,state}`).
    pub fn connections_in(&self, listener: &str, state: ConnState) -> i64 {
        match state {
            ConnState::Idle => self.idle_connections(listener),
            _ => self.connections.with_label_values(&[listener, state.label()]).get(),
        }
    }

    /// The open connections of `listener` in no other state. The gauges are read one after the
    /// other while connections move: a connection that opens or closes meanwhile may be seen in
    /// one and not the other, so the difference is kept from going below zero.
    fn idle_connections(&self, listener: &str) -> i64 {
        let busy: i64 = ConnState::ALL
            .iter()
            .filter(|&&s| s != ConnState::Idle)
            .map(|s| self.connections.with_label_values(&[listener, s.label()]).get())
            .sum();
        (self.connections_open.with_label_values(&[listener]).get() - busy).max(0)
    }

    /// Sets `zkroute_connections{state="idle"}` of every HTTP listener, for a scrape.
    fn count_idle(&self) {
        use prometheus::core::Collector;
        let listeners: Vec<String> = self
            .connections_open
            .collect()
            .iter()
            .flat_map(|family| family.get_metric())
            .filter_map(|m| m.get_label().iter().find(|l| l.name() == "listener").map(|l| l.value().to_owned()))
            .collect();
        for listener in listeners {
            let idle = self.idle_connections(&listener);
            self.connections.with_label_values(&[&listener, ConnState::Idle.label()]).set(idle);
        }
    }
}

/// Distinct status codes cached per route target; others go through the label lookup.
const CODE_SLOTS: usize = 8;

/// The metric children of one (listener, service) pair, resolved when the table is built so that
/// recording a request is a few atomic adds, with no label hashing.
pub struct RouteStats {
    enabled: bool,
    listener: Box<str>,
    service: Box<str>,
    requests: IntCounterVec,
    codes: [OnceLock<(u16, IntCounter)>; CODE_SLOTS],
    pub duration: Histogram,
    pub connect_errors: IntCounter,
    pub retries: IntCounter,
    pub tcp_connections: IntCounter,
    /// `zkroute_upstream_requests_total`, with `metrics.per_instance` only.
    per_instance: Option<IntCounterVec>,
    overflow: IntCounterVec,
    /// `zkroute_cross_zone_requests_total`, its child made at the first cross-zone attempt.
    cross_zone: IntCounterVec,
    cross_zone_child: OnceLock<IntCounter>,
}

impl RouteStats {
    pub fn new(m: &Metrics, listener: &str, service: &str) -> Self {
        RouteStats {
            enabled: m.enabled,
            listener: listener.into(),
            service: service.into(),
            requests: m.http_requests.clone(),
            codes: Default::default(),
            duration: m.http_request_duration.with_label_values(&[listener, service]),
            connect_errors: m.upstream_connect_errors.with_label_values(&[service]),
            retries: m.retries.with_label_values(&[service]),
            tcp_connections: m.tcp_connections.with_label_values(&[listener, service]),
            per_instance: m.per_instance.then(|| m.upstream_requests.clone()),
            overflow: m.overflow.clone(),
            cross_zone: m.cross_zone.clone(),
            cross_zone_child: OnceLock::new(),
        }
    }

    /// Counts a request answered `code`: through its cached child (no clone of it, which would be
    /// two atomic operations more), or the label lookup once the slots are taken.
    #[inline]
    fn count(&self, code: u16) {
        for slot in &self.codes {
            let (c, counter) = slot.get_or_init(|| (code, self.child(code)));
            if *c == code {
                counter.inc();
                return;
            }
        }
        self.child(code).inc();
    }

    fn child(&self, code: u16) -> IntCounter {
        let mut buf = [0u8; 5];
        self.requests.with_label_values(&[&*self.listener, &*self.service, status_text(code, &mut buf)])
    }
}

impl TargetStats for RouteStats {
    #[inline]
    fn observe(&self, code: u16, elapsed: std::time::Duration) {
        if !self.enabled {
            return;
        }
        self.duration.observe(elapsed.as_secs_f64());
        self.count(code);
    }

    fn observe_endpoint(&self, endpoint: &Addr, code: u16) {
        if let Some(family) = &self.per_instance {
            let (addr, code) = (endpoint.to_string(), code.to_string());
            family.with_label_values(&[&*self.service, addr.as_str(), code.as_str()]).inc();
        }
    }

    #[inline]
    fn observe_answer(&self, endpoint: &Addr, code: u16, elapsed: std::time::Duration) {
        if !self.enabled {
            return;
        }
        self.duration.observe(elapsed.as_secs_f64());
        self.count(code);
        if self.per_instance.is_some() {
            self.observe_endpoint(endpoint, code);
        }
    }

    fn connect_failed(&self) {
        if self.enabled {
            self.connect_errors.inc();
        }
    }

    fn retried(&self) {
        if self.enabled {
            self.retries.inc();
        }
    }

    fn tcp_accepted(&self) {
        if self.enabled {
            self.tcp_connections.inc();
        }
    }

    fn overflow(&self, limit: &'static str) {
        if self.enabled {
            // A refusal is rare: the label lookup is no cost worth resolving ahead.
            self.overflow.with_label_values(&[&*self.service, limit]).inc();
        }
    }

    #[inline]
    fn cross_zone(&self) {
        if self.enabled {
            self.cross_zone_child.get_or_init(|| self.cross_zone.with_label_values(&[&*self.service])).inc();
        }
    }
}

impl StatsSource for Metrics {
    fn target_stats(&self, listener: &str, service: &str) -> Arc<dyn TargetStats> {
        Arc::new(RouteStats::new(self, listener, service))
    }

    fn rule_stats(&self, listener: &str, rule: &str) -> Arc<dyn RuleStats> {
        Arc::new(RuleCounter { enabled: self.enabled, refused: self.rate_limited.with_label_values(&[listener, rule]) })
    }
}

/// A rule's `zkroute_rate_limited_total` child, resolved when the table is built.
struct RuleCounter {
    enabled: bool,
    refused: IntCounter,
}

impl RuleStats for RuleCounter {
    fn rate_limited(&self) {
        if self.enabled {
            self.refused.inc();
        }
    }
}

/// What an HTTP listener's client connection is doing, for `zkroute_connections{listener,state}`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ConnState {
    /// Part of a request head (or of the HTTP/2 preface) has arrived, not all of it.
    ReadingHead,
    /// Waiting for a request: just accepted, or between keep-alive requests.
    Idle,
    /// A request is being proxied; an HTTP/2 connection from its preface on.
    Active,
    /// Relaying bytes both ways after a `101 Switching Protocols`.
    Tunnel,
}

impl ConnState {
    const ALL: [ConnState; 4] = [ConnState::ReadingHead, ConnState::Idle, ConnState::Active, ConnState::Tunnel];

    pub fn label(self) -> &'static str {
        match self {
            ConnState::ReadingHead => "reading_head",
            ConnState::Idle => "idle",
            ConnState::Active => "active",
            ConnState::Tunnel => "tunnel",
        }
    }
}

/// One listener's `zkroute_connections` children, resolved once. `idle`, the state a keep-alive
/// connection returns to after each request, has no count of its own: it is the open connections
/// in no other state, worked out when the metrics are rendered, so a request moves one gauge up
/// and down, not two.
#[derive(Clone)]
pub struct ConnGauges(Arc<StateGauges>);

struct StateGauges {
    /// By [`ConnState`]; the `idle` child is set only when rendered.
    states: [IntGauge; 4],
    open: IntGauge,
}

impl ConnGauges {
    pub fn new(m: &Metrics, listener: &str) -> Self {
        ConnGauges(Arc::new(StateGauges {
            states: ConnState::ALL.map(|s| m.connections.with_label_values(&[listener, s.label()])),
            open: m.connections_open.with_label_values(&[listener]),
        }))
    }

    /// Counts a new connection, in `state` until [`Counted::set`] moves it or it is dropped.
    pub fn count(&self, state: ConnState) -> Counted {
        self.0.open.inc();
        let mut counted = Counted { gauges: self.0.clone(), state: ConnState::Idle };
        counted.set(state);
        counted
    }
}

/// A connection's place in its listener's `zkroute_connections`; dropping it uncounts it.
pub struct Counted {
    gauges: Arc<StateGauges>,
    state: ConnState,
}

impl Counted {
    #[inline]
    pub fn set(&mut self, state: ConnState) {
        if state != self.state {
            if self.state != ConnState::Idle {
                self.gauges.states[self.state as usize].dec();
            }
            if state != ConnState::Idle {
                self.gauges.states[state as usize].inc();
            }
            self.state = state;
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.set(ConnState::Idle);
        self.gauges.open.dec();
    }
}

/// A status code as text, without allocating.
fn status_text(code: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = code;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_stats_count_by_code_past_the_cached_slots() {
        let m = Metrics::new(true);
        let s = RouteStats::new(&m, "http", "users");
        for code in [200, 200, 404, 500, 201, 202, 203, 204, 205, 206, 207, 200] {
            s.observe(code, std::time::Duration::from_millis(1));
        }
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"zkroute_http_requests_total{code="200",listener="http",service="users"} 3"#),
            "{text}"
        );
        assert!(text.contains(r#"zkroute_http_requests_total{code="207",listener="http",service="users"} 1"#));
        assert!(text.contains(r#"zkroute_http_request_duration_seconds_count{listener="http",service="users"} 12"#));
    }

    #[test]
    fn a_connection_is_counted_in_one_state_at_a_time_until_dropped() {
        let m = Metrics::new(true);
        let gauges = ConnGauges::new(&m, "http");
        let value = |s: ConnState| m.connections_in("http", s);
        let rendered = |s: ConnState| {
            let text = String::from_utf8(m.render()).unwrap();
            let line = format!(r#"zkroute_connections{{listener="http",state="{}"}} "#, s.label());
            text.lines().find_map(|l| l.strip_prefix(line.as_str())?.parse::<i64>().ok())
        };
        let mut c = gauges.count(ConnState::Idle);
        assert_eq!(ConnState::ALL.map(value), [0, 1, 0, 0]);
        c.set(ConnState::ReadingHead);
        c.set(ConnState::Active);
        assert_eq!(ConnState::ALL.map(value), [0, 0, 1, 0]);
        let other = gauges.count(ConnState::ReadingHead);
        assert_eq!(ConnState::ALL.map(value), [1, 0, 1, 0]);
        c.set(ConnState::Idle);
        assert_eq!(ConnState::ALL.map(value), [1, 1, 0, 0]);
        assert_eq!(ConnState::ALL.map(rendered), [Some(1), Some(1), Some(0), Some(0)], "idle as scraped");
        c.set(ConnState::Active);
        c.set(ConnState::Tunnel);
        assert_eq!(ConnState::ALL.map(value), [1, 0, 0, 1]);
        drop(other);
        drop(c);
        assert_eq!(ConnState::ALL.map(value), [0, 0, 0, 0]);
        assert_eq!(ConnState::ALL.map(rendered), [Some(0); 4]);
    }

    #[test]
    fn disabled_recording_records_nothing() {
        let m = Metrics::new(false);
        RouteStats::new(&m, "http", "users").observe(200, std::time::Duration::ZERO);
        assert!(!String::from_utf8(m.render()).unwrap().contains("zkroute_http_requests_total{"));
    }
}
