//! The admin port (README: "What it serves"): `/` (the dashboard), `/metrics`, `/healthz`,
//! `/ready`, `/config`, and `/drain` (README: "Stopping"). Loopback by default and never a
//! data-plane port.

mod dashboard;
mod html;
pub mod traffic;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::debug;

use crate::discovery::swaps::SwapLog;
use crate::endpoint::{EndpointState, Health};
use crate::metrics::Metrics;
use crate::proxy::Tracker;
use crate::routing::documents::{Backend, CheckKind, HashOn, LbPolicy};
use crate::routing::table::{EndpointSet, ListenerRoutes, ServiceEntry, ServicePolicy, ZONE_SCALE, ZoneSplit};
use crate::routing::{RouteReader, RoutingTable};

/// A local listener as `/config` and the dashboard show it.
#[derive(Clone, Debug)]
pub struct ListenerInfo {
    pub bind: SocketAddr,
    /// Set once a configuration reload removed it: its connections, until they are gone.
    pub draining: Option<Arc<Tracker>>,
}

impl ListenerInfo {
    /// Removed and drained: nothing to show.
    fn is_gone(&self) -> bool {
        self.draining.as_ref().is_some_and(|t| t.active() == 0)
    }
}

/// The local listeners by table slot ([`ListenerId`](crate::routing::table::ListenerId)); None
/// for a free slot.
pub type ListenerBook = Arc<Mutex<Vec<Option<ListenerInfo>>>>;

/// The listeners to show: each table slot with its listener, if it has one still.
pub fn shown_listeners<'a>(table: &'a RoutingTable, book: &ListenerBook) -> Vec<(&'a ListenerRoutes, ListenerInfo)> {
    let book = book.lock().map(|b| b.clone()).unwrap_or_default();
    table.listeners.iter().zip(book).filter_map(|(l, info)| info.filter(|i| !i.is_gone()).map(|i| (l, i))).collect()
}

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub routes: RouteReader,
    pub metrics: Arc<Metrics>,
    pub config_endpoint: bool,
    /// Set when draining starts: `/ready` answers 503 from then on.
    pub draining: Arc<AtomicBool>,
    /// The local listeners, by table slot.
    pub listeners: ListenerBook,
    /// Extra sections for `/config` (registration state), rendered on request.
    pub extra: Arc<dyn Fn() -> Vec<(&'static str, Value)> + Send + Sync>,
    /// The last table swaps, for `/config` and the dashboard.
    pub swaps: SwapLog,
    /// Counter samples for the dashboard's rates.
    pub traffic: Arc<traffic::Traffic>,
    /// Where `/drain` requests go, and who may send them.
    pub drain: DrainDoor,
}

/// A `/drain` request on its way to the app, answered with the text of the response.
pub type DrainRequest = tokio::sync::oneshot::Sender<String>;

/// `/drain`: the channel to the app, which deregisters the local app and answers, and the rules
/// of who may ask (README: "Stopping").
#[derive(Clone)]
pub struct DrainDoor {
    pub requests: tokio::sync::mpsc::Sender<DrainRequest>,
    /// Required in `x-zkroute-drain-token` unless the admin port binds to loopback.
    pub token: Option<Arc<str>>,
    pub loopback: bool,
}

impl DrainDoor {
    /// Why a `/drain` request is refused (403), if it is. A request from a web page (one that
    /// carries `Origin`, or `Sec-Fetch-Site` other than `none`) never drains: a page's script
    /// or image can reach a loopback port. Off loopback, the token must match.
    fn refusal(&self, headers: &http::HeaderMap) -> Option<&'static str> {
        let from_page = headers.contains_key(header::ORIGIN)
            || headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() != b"none");
        if from_page {
            return Some("refused: /drain is not for web pages\n");
        }
        if self.loopback {
            return None;
        }
        let Some(token) = &self.token else {
            return Some("refused: the admin port is not on loopback and admin.drain_token is not set\n");
        };
        match headers.get("x-zkroute-drain-token") {
            Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => None,
            _ => Some("refused: x-zkroute-drain-token is missing or wrong\n"),
        }
    }

    /// Asks the app to drain and waits for its answer.
    async fn drain(&self) -> Response<Full<Bytes>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        if self.requests.send(reply).await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n");
        }
        match answer.await {
            Ok(done) => text(StatusCode::OK, done),
            Err(_) => text(StatusCode::SERVICE_UNAVAILABLE, "stopping\n"),
        }
    }
}

/// Compares two secrets in time that depends on their lengths only.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the admin endpoints until the task is stopped; it keeps answering while the proxy
/// drains, so that `/ready` can say so.
pub async fn serve(listener: TcpListener, state: AdminState) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                async move {
                    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
                    if path == "/drain" {
                        return Ok(drain(&state.drain, &req).await);
                    }
                    if matches!(path.as_str(), "/healthz" | "/ready") {
                        return Ok::<_, Infallible>(handle(&state, &method, &path));
                    }
                    // Rendering a large table takes a while: not on a thread that serves requests.
                    let rendered = tokio::task::spawn_blocking(move || handle(&state, &method, &path)).await;
                    Ok(rendered.unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "rendering failed\n")))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `/drain`, GET (what Kubernetes' `httpGet` hooks send) or POST: deregisters the local app as at
/// SIGTERM and answers once that is done; the listeners keep serving.
async fn drain(door: &DrainDoor, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST\n");
    }
    if let Some(why) = door.refusal(req.headers()) {
        tracing::warn!(reason = why.trim_end(), "/drain refused");
        return text(StatusCode::FORBIDDEN, why);
    }
    door.drain().await
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn handle(state: &AdminState, method: &Method, path: &str) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match path {
        "/" if state.config_endpoint => dashboard_page(state),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/ready" => {
            if state.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.routes.is_loaded() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "no routing table loaded yet\n")
            }
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/config" if state.config_endpoint => {
            let mut doc = match state.routes.current() {
                Some(table) => config_json(&table, &shown_listeners(&table, &state.listeners)),
                None => json!({ "loaded": false }),
            };
            if let Value::Object(map) = &mut doc {
                map.extend(status_sections(state));
            }
            let mut body = serde_json::to_vec_pretty(&doc).unwrap_or_default();
            body.push(b'\n');
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
            r
        }
        "/config" | "/" => {
            text(StatusCode::NOT_FOUND, "/config and the dashboard are switched off (admin.config_endpoint = false)\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try / /metrics /healthz /ready /config /drain\n"),
    }
}

/// The sections of `/config` that are not the routing table: the last swaps and the extra
/// sections (registrations, ...). The dashboard shows them too.
pub fn status_sections(state: &AdminState) -> serde_json::Map<String, Value> {
    let mut map = serde_json::Map::new();
    map.insert("recent_swaps".into(), serde_json::to_value(state.swaps.recent()).unwrap_or_default());
    for (k, v) in (state.extra)() {
        map.insert(k.to_owned(), v);
    }
    map
}

fn dashboard_page(state: &AdminState) -> Response<Full<Bytes>> {
    let table = state.routes.current();
    let status = status_sections(state);
    let swaps = state.swaps.recent();
    let traffic = state.traffic.observe(&state.metrics, std::time::Instant::now());
    let page = dashboard::Page {
        table: table.as_deref(),
        listeners: &table.as_deref().map(|t| shown_listeners(t, &state.listeners)).unwrap_or_default(),
        status: &status,
        swaps: &swaps,
        traffic: &traffic,
        metrics: &state.metrics,
        draining: state.draining.load(Ordering::Relaxed),
        now: std::time::SystemTime::now(),
    };
    let mut r = text(StatusCode::OK, dashboard::render(&page));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/html; charset=utf-8"));
    // Defence in depth behind the escaping: the page has no script and loads nothing.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, header::HeaderValue::from_static("nosniff"));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

/// The whole table as JSON.
pub fn config_json(table: &RoutingTable, listeners: &[(&ListenerRoutes, ListenerInfo)]) -> Value {
    json!({
        "loaded": true,
        "version": table.version,
        "built_at": humantime::format_rfc3339_millis(table.built_at).to_string(),
        "source": table.source,
        "listeners": listeners.iter().map(|(l, info)| listener_json(l, info)).collect::<Vec<_>>(),
        "services": table.services.sorted().into_iter().map(|(n, s)| (n.to_string(), service_json(s))).collect::<serde_json::Map<_, _>>(),
        "rules": table.rules.iter().map(|(id, st)| {
            let mut v = serde_json::Map::new();
            if let Some((rule, origin)) = &st.active {
                v.insert("in_force".into(), json!({ "document": rule.doc, "origin": origin }));
            }
            if let Some(rej) = &st.rejected {
                v.insert("rejected".into(), json!(rej));
            }
            (id.to_string(), Value::Object(v))
        }).collect::<serde_json::Map<_, _>>(),
        "invalid": &*table.invalid,
    })
}

fn listener_json(l: &ListenerRoutes, info: &ListenerInfo) -> Value {
    let mut v = json!({
        "name": &*l.name,
        "protocol": l.protocol,
        "bind": info.bind.to_string(),
        "routes": l.routes.iter().map(|r| json!({
            "id": &*r.id,
            "priority": r.rule.as_ref().map(|r| r.priority),
            "match": r.rule.as_ref().and_then(|r| r.doc.match_.clone()),
            "timeout": humantime::format_duration(r.timeout).to_string(),
            "retries": r.retries,
            "targets": r.targets.iter().map(|t| {
                let mut v = match &t.backend {
                    Backend::Service { service, subset, endpoint, .. } => json!({
                        "service": service, "subset": subset, "endpoint": endpoint,
                    }),
                    Backend::Address { addr, .. } => json!({ "address": addr }),
                };
                v["weight"] = json!(t.weight);
                v["endpoints"] = set_json(&t.set);
                v
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if let Some(tracker) = &info.draining {
        v["draining"] = json!(true);
        v["open_connections"] = json!(tracker.active());
    }
    v
}

fn set_json(set: &EndpointSet) -> Value {
    let mut v = json!({
        "total": set.endpoints.len(),
        "available": set.available.len(),
        "panic": set.panic,
        "addresses": set.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>(),
        "weights": set.endpoints.iter().map(|e| e.weight).collect::<Vec<_>>(),
    });
    if let Some(z) = &set.zones {
        v["zones"] = zone_split_json(set, z);
    }
    if let Some(split) = &set.tags {
        // Requests with a tag (Dubbo tag routing); the addresses above take those without one.
        let tags: serde_json::Map<String, Value> = split.tags().map(|(tag, s)| (tag.to_owned(), set_json(s))).collect();
        v["tags"] = Value::Object(tags);
        v["tag_failover"] = json!(split.failover().endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>());
    }
    v
}

/// A set's zone split (README: "Zone-aware routing"): the share that stays in this host's zone,
/// and the endpoints each side draws from.
fn zone_split_json(set: &EndpointSet, z: &ZoneSplit) -> Value {
    let addrs = |l: &crate::routing::table::WeightedList| {
        (0..l.len()).filter_map(|n| l.nth(n)).map(|i| set.endpoints[i].addr.to_string()).collect::<Vec<_>>()
    };
    json!({
        "local_share_percent": f64::from(z.local_share) * 100.0 / f64::from(ZONE_SCALE),
        "local_healthy": z.local_healthy,
        "local_total": z.local_total,
        "local": addrs(&z.local),
        "elsewhere": addrs(&z.remote),
    })
}

/// A service's instances by zone (`""`: no zone), each with how many there are and how many are
/// healthy.
fn zones_json(s: &ServiceEntry) -> Value {
    let unknown_ok = s.policy.unknown_is_healthy();
    let mut zones: std::collections::BTreeMap<&str, (usize, usize)> = std::collections::BTreeMap::new();
    for i in s.instances.iter() {
        let entry = zones.entry(i.instance.zone.as_deref().unwrap_or("")).or_default();
        entry.0 += 1;
        if i.instance.enabled && i.state.is_usable(unknown_ok) {
            entry.1 += 1;
        }
    }
    zones
        .into_iter()
        .map(|(z, (total, healthy))| (z.to_owned(), json!({"instances": total, "healthy": healthy})))
        .collect()
}

fn policy_json(p: &ServicePolicy) -> Value {
    let human = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let lb = match &p.lb {
        LbPolicy::RoundRobin => json!("round_robin"),
        LbPolicy::P2c => json!("p2c"),
        LbPolicy::RingHash(HashOn::SourceIp) => json!({ "ring_hash": "source_ip" }),
        LbPolicy::RingHash(HashOn::Header(name)) => json!({ "ring_hash": format!("header:{name}") }),
    };
    // The same keys as the policy document, with the defaults filled in.
    let health_check = p.health_check.as_ref().map(|h| {
        let (kind, path, service) = match &h.kind {
            CheckKind::Http { path } => ("http", Some(path), None),
            CheckKind::Tcp => ("tcp", None, None),
            CheckKind::Grpc { service } => ("grpc", None, Some(service)),
        };
        json!({
            "kind": kind,
            "path": path,
            "service": service,
            "interval": human(h.interval),
            "timeout": human(h.timeout),
            "healthy_threshold": h.healthy_threshold,
            "unhealthy_threshold": h.unhealthy_threshold,
            "initially_healthy": h.initially_healthy,
        })
    });
    let outlier = p.outlier.as_ref().map(|o| {
        json!({
            "consecutive_failures": o.consecutive_failures,
            "base_ejection": human(o.base_ejection),
            "max_ejection": human(o.max_ejection),
            "max_ejection_percent": o.max_ejection_percent,
        })
    });
    json!({
        "lb": lb,
        "connect_timeout": human(p.connect_timeout),
        "retries": p.retries,
        "health_check": health_check,
        "outlier": outlier,
        "panic_threshold_percent": p.panic_threshold_percent,
        "protect_from_empty": p.protect_from_empty,
        "circuit_breaker": p.circuit_breaker.map(|c| json!({
            "max_connections": c.max_connections,
            "max_pending": c.max_pending,
            "max_requests": c.max_requests,
            "max_retries": c.max_retries,
        })),
        "retry_budget": p.retry_budget.map(|b| json!({"percent": b.percent, "min_per_second": b.min_per_second})),
        "protocol": upstream_protocol(p.protocol),
        "zone_aware": p.zone.is_some(),
        "zone_min_healthy_percent": p.zone_min_healthy_percent,
    })
}

/// The protocol zkroute speaks to an endpoint, as `/config` shows it.
fn upstream_protocol(p: Option<crate::routing::InstanceProtocol>) -> &'static str {
    match p {
        Some(crate::routing::InstanceProtocol::H2) => "h2",
        Some(crate::routing::InstanceProtocol::Tcp) => "tcp",
        Some(crate::routing::InstanceProtocol::Http1) | None => "http1",
    }
}

/// An endpoint's state, and why.
#[derive(Serialize)]
struct StateView {
    state: &'static str,
    health: Health,
    #[serde(skip_serializing_if = "Option::is_none")]
    ejected_until: Option<String>,
    ejections: u32,
    in_flight: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_check: Option<crate::endpoint::CheckReport>,
}

fn state_view(s: &EndpointState, enabled: bool, unknown_ok: bool) -> StateView {
    let ejected = s.ejected_until();
    let state = if !enabled {
        "draining"
    } else if ejected.is_some() {
        "ejected"
    } else if s.is_usable(unknown_ok) {
        "healthy"
    } else {
        "unhealthy"
    };
    StateView {
        state,
        health: s.health(),
        ejected_until: ejected.map(|t| humantime::format_rfc3339_millis(t).to_string()),
        ejections: s.ejections(),
        in_flight: s.in_flight(),
        last_check: s.last_check(),
    }
}

fn service_json(s: &ServiceEntry) -> Value {
    let unknown_ok = s.policy.unknown_is_healthy();
    json!({
        "policy": policy_json(&s.policy),
        "policy_origin": s.policy_origin,
        "protected": s.protected,
        "panic": s.all.panic,
        "zones": zones_json(s),
        "zone_split": s.all.zones.as_ref().map(|z| zone_split_json(&s.all, z)),
        "instances": s.instances.iter().map(|i| {
            let mut v = serde_json::to_value(&*i.instance).unwrap_or(Value::Null);
            v["id"] = json!(&*i.id);
            v["address"] = json!(i.instance.addr);
            v["origin"] = json!(i.origin);
            v["health"] = json!(state_view(&i.state, i.instance.enabled, unknown_ok));
            // The instance's own protocol wins over the policy's.
            v["protocol_in_force"] = json!(upstream_protocol(i.instance.protocol.or(s.policy.protocol)));
            if i.instance.warmup.is_some() {
                // The weight as ramped when the table was built.
                let built = s.all.endpoints.iter().find(|e| e.addr == i.instance.addr).map(|e| e.weight);
                v["effective_weight"] = json!(built);
            }
            v
        }).collect::<Vec<_>>(),
    })
}
