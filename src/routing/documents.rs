//! Rule and policy documents (README: "Rule documents", "Policy documents"): parsed from JSON and
//! validated into the forms the table builder compiles. The proxy, the static file provider and
//! `zkroute ctl put` all validate through here, so a document is accepted or refused the same way
//! everywhere.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

use super::rate_limit::{RateKey, RateLimit};
use super::{Addr, InstanceProtocol, MAX_WEIGHT, ServiceName};
use crate::endpoint::breaker::{BreakerLimits, BudgetLimits};
use std::num::NonZeroU32;

/// Why a document (instance, rule or policy) was refused: the field (a JSON path, empty for the whole document) and the
/// reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{reason}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct DocError {
    pub field: String,
    pub reason: String,
}

impl DocError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        DocError { field: field.into(), reason: reason.into() }
    }

    /// The same error, for a field nested in `parent` (`parent.field`).
    pub fn within(mut self, parent: &str) -> Self {
        self.field = if self.field.is_empty() { parent.to_owned() } else { format!("{parent}.{}", self.field) };
        self
    }
}

fn from_json<T: serde::de::DeserializeOwned>(data: &[u8]) -> Result<T, DocError> {
    let text = std::str::from_utf8(data).map_err(|_| DocError::new("", "not UTF-8"))?;
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        DocError::new(field, e.into_inner().to_string())
    })
}

fn duration(field: &str, text: &str) -> Result<Duration, DocError> {
    humantime::parse_duration(text).map_err(|e| DocError::new(field, format!("{text:?} is not a duration: {e}")))
}

// ---- rules ----------------------------------------------------------------------------------

/// A rule document as written (README: "Rule documents"). Unknown fields are refused: a misspelt `priorty`
/// would otherwise be silently ignored.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleDoc {
    pub listener: String,
    #[serde(default)]
    pub priority: i32,
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub match_: Option<MatchDoc>,
    pub backends: Vec<BackendDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Option<HeaderEditsDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Option<HeaderEditsDoc>,
}

/// Header edits as written: fields set (replacing any of the name), added, removed.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsDoc {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Header edits, validated: applied to a head as it is forwarded. Besides the edits as written it
/// holds what an HTTP/1 head writer needs of them, made once here rather than per request: the
/// names it leaves out, and the bytes it ends the head with. (No `Default`: its head end would
/// lack the empty line.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEdits {
    pub set: Box<[(HeaderName, HeaderValue)]>,
    pub add: Box<[(HeaderName, HeaderValue)]>,
    pub remove: Box<[HeaderName]>,
    /// The names of `remove` and `set` (lower case, as `HeaderName` keeps them).
    dropped: Box<[Box<[u8]>]>,
    /// Bit `n % 64` is set for each name in `dropped` `n` bytes long, so that most fields are
    /// passed by one test of their name's length (a longer name may share a bit: its name is
    /// then compared).
    dropped_lengths: u64,
    /// `set`, then `add`, as HTTP/1 field lines (`name: value\r\n` each), and the empty line.
    head_end: Box<[u8]>,
    /// Which of the fields a request writer adds itself the edits drop.
    pub drops_own: OwnFields,
}

/// The fields zkroute writes into a forwarded request itself, each flagged when a rule's edits
/// drop it (remove it, or set it anew): decided when the rule is built, not per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OwnFields {
    pub host: bool,
    pub forwarded_for: bool,
    pub forwarded_proto: bool,
    /// `x-forwarded-client-cert`.
    pub client_cert: bool,
}

impl HeaderEdits {
    fn new(
        set: Box<[(HeaderName, HeaderValue)]>,
        add: Box<[(HeaderName, HeaderValue)]>,
        remove: Box<[HeaderName]>,
    ) -> Self {
        let dropped: Box<[Box<[u8]>]> =
            remove.iter().chain(set.iter().map(|(n, _)| n)).map(|n| n.as_str().as_bytes().into()).collect();
        let dropped_lengths = dropped.iter().fold(0, |bits, n| bits | 1 << (n.len() % 64));
        let mut head_end = Vec::new();
        for (name, value) in set.iter().chain(add.iter()) {
            for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
                head_end.extend_from_slice(part);
            }
        }
        head_end.extend_from_slice(b"\r\n");
        let mut edits = HeaderEdits {
            set,
            add,
            remove,
            dropped,
            dropped_lengths,
            head_end: head_end.into(),
            drops_own: OwnFields::default(),
        };
        edits.drops_own = OwnFields {
            host: edits.drops(b"host"),
            forwarded_for: edits.drops(b"x-forwarded-for"),
            forwarded_proto: edits.drops(b"x-forwarded-proto"),
            client_cert: edits.drops(b"x-forwarded-client-cert"),
        };
        edits
    }

    /// Whether a field named `name` (any case) is dropped from the head: removed, or set anew.
    #[inline(always)]
    pub fn drops(&self, name: &[u8]) -> bool {
        self.may_drop_length(name.len()) && self.names_dropped(name)
    }

    /// Whether a field whose name is `len` bytes long may be dropped: false rules it out.
    #[inline(always)]
    pub fn may_drop_length(&self, len: usize) -> bool {
        (self.dropped_lengths >> (len % 64)) & 1 != 0
    }

    /// Whether a field named `name` is dropped, name by name.
    #[inline(never)]
    pub fn names_dropped(&self, name: &[u8]) -> bool {
        self.dropped.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// What ends an HTTP/1 head: the fields `set` and `add` put in, then the empty line.
    #[inline]
    pub fn head_end(&self) -> &[u8] {
        &self.head_end
    }
}

/// Fields that frame a message or belong to one connection: a rule may not edit them.
const UNEDITABLE: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

fn header_edits(field: &str, d: &HeaderEditsDoc) -> Result<HeaderEdits, DocError> {
    let name = |k: &str| {
        let n = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| DocError::new(format!("{field}.{k}"), "not a valid header name"))?;
        if UNEDITABLE.contains(&n.as_str()) {
            return Err(DocError::new(format!("{field}.{k}"), "frames the message or the connection: not editable"));
        }
        Ok(n)
    };
    let pairs = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| {
                let value = HeaderValue::from_str(v)
                    .map_err(|_| DocError::new(format!("{field}.{k}"), "not a valid header value"))?;
                Ok((name(k)?, value))
            })
            .collect::<Result<Vec<_>, DocError>>()
    };
    Ok(HeaderEdits::new(
        pairs(&d.set)?.into(),
        pairs(&d.add)?.into(),
        d.remove.iter().map(|k| name(k)).collect::<Result<Vec<_>, _>>()?.into(),
    ))
}

/// A rule's local rate limit as written.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitDoc {
    pub per_second: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct MatchDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BackendDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub subset: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default = "default_backend_weight")]
    pub weight: u32,
}

/// Backend weight when a rule gives none: the same scale as instance weights.
pub const DEFAULT_BACKEND_WEIGHT: u32 = 100;

fn default_backend_weight() -> u32 {
    DEFAULT_BACKEND_WEIGHT
}

/// How a rule matches the Host header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// Lower-cased host, compared without the port.
    Exact(Box<str>),
    /// `*.example.com`, stored as `example.com`: matches any strict subdomain.
    Subdomain(Box<str>),
}

/// A rule's match section compiled for lookup: no parsing or allocation when a request is matched.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<Box<str>>,
    pub method: Option<Method>,
    pub headers: Box<[(HeaderName, HeaderValue)]>,
}

impl Matcher {
    /// Whether anything is matched at all (TCP listeners take only rules that match everything).
    pub fn is_catch_all(&self) -> bool {
        self.host.is_none() && self.path_prefix.is_none() && self.method.is_none() && self.headers.is_empty()
    }

    /// Matches everything except the host, which the listener's host index has already checked.
    #[inline]
    pub fn matches_rest(&self, path: &str, method: &Method, headers: &impl HeaderLookup) -> bool {
        if let Some(prefix) = &self.path_prefix {
            if !path.as_bytes().starts_with(prefix.as_bytes()) {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if m != method {
                return false;
            }
        }
        self.headers.iter().all(|(name, want)| headers.has_value(name, want))
    }
}

/// Header lookup for rule matching, over whatever form a request's headers are in.
pub trait HeaderLookup {
    /// Calls `f` with each value of the fields named `name` until it returns true.
    fn for_each_value(&self, name: &HeaderName, f: impl FnMut(&[u8]) -> bool);

    /// Whether some field named `name` has exactly the value `value`.
    fn has_value(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        let mut found = false;
        self.for_each_value(name, |v| {
            found = v == value.as_bytes();
            found
        });
        found
    }
}

/// The headers of a request that has none (a TCP connection).
pub struct NoHeaders;

impl HeaderLookup for NoHeaders {
    fn for_each_value(&self, _: &HeaderName, _: impl FnMut(&[u8]) -> bool) {}
}

impl HeaderLookup for HeaderMap {
    fn for_each_value(&self, name: &HeaderName, mut f: impl FnMut(&[u8]) -> bool) {
        for v in self.get_all(name) {
            if f(v.as_bytes()) {
                return;
            }
        }
    }
}

/// A backend target of a rule, validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    Service { service: ServiceName, subset: BTreeMap<String, String>, endpoint: Option<String>, weight: u32 },
    Address { addr: Addr, weight: u32 },
}

impl Backend {
    pub fn weight(&self) -> u32 {
        match self {
            Backend::Service { weight, .. } | Backend::Address { weight, .. } => *weight,
        }
    }

    /// What the backend is called: the service's name, or the address as written. The Host of a
    /// request forwarded without one (nginx sends its upstream's name so).
    pub fn name(&self) -> String {
        match self {
            Backend::Service { service, .. } => service.as_str().to_owned(),
            Backend::Address { addr, .. } => addr.to_string(),
        }
    }
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: Arc<str>,
    pub listener: Box<str>,
    pub priority: i32,
    pub matcher: Matcher,
    pub backends: Vec<Backend>,
    pub timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub rate_limit: Option<RateLimit>,
    /// Each attempt's share of `timeout`.
    pub per_try_timeout: Option<Duration>,
    pub request_headers: Option<Arc<HeaderEdits>>,
    pub response_headers: Option<Arc<HeaderEdits>>,
    /// The document as written, for `/config` and snapshots.
    pub doc: RuleDoc,
}

/// Most retries a rule may ask for.
pub const MAX_RETRIES: u32 = 10;

impl Rule {
    /// Parses and validates a rule node's data.
    pub fn parse(id: &str, data: &[u8]) -> Result<Rule, DocError> {
        Rule::from_doc(id, from_json(data)?)
    }

    pub fn from_doc(id: &str, doc: RuleDoc) -> Result<Rule, DocError> {
        if doc.listener.trim().is_empty() {
            return Err(DocError::new("listener", "must name a local listener"));
        }
        let matcher = match &doc.match_ {
            None => Matcher::default(),
            Some(m) => compile_match(m)?,
        };
        if doc.backends.is_empty() {
            return Err(DocError::new("backends", "must list at least one target"));
        }
        let backends = doc
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| compile_backend(&format!("backends[{i}]"), b))
            .collect::<Result<Vec<_>, _>>()?;
        if backends.iter().all(|b| b.weight() == 0) {
            return Err(DocError::new("backends", "every target has weight 0: nothing would get traffic"));
        }
        let timeout = doc.timeout.as_deref().map(|t| duration("timeout", t)).transpose()?;
        if timeout == Some(Duration::ZERO) {
            return Err(DocError::new("timeout", "must be greater than zero"));
        }
        if let Some(r) = doc.retries {
            if r > MAX_RETRIES {
                return Err(DocError::new("retries", format!("{r} is more than the limit of {MAX_RETRIES}")));
            }
        }
        let rate_limit = doc.rate_limit.as_ref().map(rate_limit).transpose()?;
        let per_try_timeout = doc.per_try_timeout.as_deref().map(|t| duration("per_try_timeout", t)).transpose()?;
        if per_try_timeout == Some(Duration::ZERO) {
            return Err(DocError::new("per_try_timeout", "must be greater than zero"));
        }
        let edits =
            |field, d: &Option<HeaderEditsDoc>| d.as_ref().map(|d| header_edits(field, d).map(Arc::new)).transpose();
        let request_headers = edits("request_headers", &doc.request_headers)?;
        let response_headers = edits("response_headers", &doc.response_headers)?;
        Ok(Rule {
            id: Arc::from(id),
            listener: doc.listener.clone().into_boxed_str(),
            priority: doc.priority,
            matcher,
            backends,
            timeout,
            retries: doc.retries,
            rate_limit,
            per_try_timeout,
            request_headers,
            response_headers,
            doc,
        })
    }
}

fn rate_limit(d: &RateLimitDoc) -> Result<RateLimit, DocError> {
    let at_least_1 = |field: &str, v: u32| {
        NonZeroU32::new(v).ok_or_else(|| DocError::new(format!("rate_limit.{field}"), "must be at least 1"))
    };
    let per_second = at_least_1("per_second", d.per_second)?;
    let burst = at_least_1("burst", d.burst.unwrap_or(d.per_second))?;
    let key = match d.key.as_deref() {
        None => None,
        Some("source_ip") => Some(RateKey::SourceIp),
        Some(s) => match s.strip_prefix("header:") {
            Some(name) => Some(RateKey::Header(
                HeaderName::from_bytes(name.trim().as_bytes())
                    .map_err(|_| DocError::new("rate_limit.key", format!("{name:?} is not a valid header name")))?,
            )),
            None => {
                return Err(DocError::new(
                    "rate_limit.key",
                    format!("{s:?} is neither \"header:<name>\" nor \"source_ip\""),
                ));
            }
        },
    };
    Ok(RateLimit { per_second, burst, key })
}

fn compile_match(m: &MatchDoc) -> Result<Matcher, DocError> {
    let host = match &m.host {
        None => None,
        Some(h) => Some(compile_host(h)?),
    };
    let path_prefix = match &m.path_prefix {
        None => None,
        Some(p) if !p.starts_with('/') => {
            return Err(DocError::new("match.path_prefix", format!("{p:?} must start with '/'")));
        }
        Some(p) => Some(p.clone().into_boxed_str()),
    };
    let method = match &m.method {
        None => None,
        Some(s) => {
            let upper = s.to_ascii_uppercase();
            Some(
                Method::from_bytes(upper.as_bytes())
                    .map_err(|_| DocError::new("match.method", format!("{s:?} is not an HTTP method")))?,
            )
        }
    };
    let headers = m
        .headers
        .iter()
        .map(|(k, v)| {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| DocError::new(format!("match.headers.{k}"), "not a valid header name"))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| DocError::new(format!("match.headers.{k}"), "not a valid header value"))?;
            Ok((name, value))
        })
        .collect::<Result<Vec<_>, DocError>>()?;
    Ok(Matcher { host, path_prefix, method, headers: headers.into_boxed_slice() })
}

fn compile_host(h: &str) -> Result<HostMatch, DocError> {
    let lower = h.trim().to_ascii_lowercase();
    let bad = |why: &str| DocError::new("match.host", format!("{h:?} {why}"));
    let (wild, name) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    if name.is_empty() {
        return Err(bad("is empty"));
    }
    if name.contains(':') && !name.starts_with('[') {
        return Err(bad("must not carry a port (the port is ignored when matching)"));
    }
    if name.contains('*') {
        return Err(bad("may use '*' only as a leading '*.'"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b)) {
        return Err(bad("is not a host name"));
    }
    let name = name.to_owned().into_boxed_str();
    Ok(if wild { HostMatch::Subdomain(name) } else { HostMatch::Exact(name) })
}

fn compile_backend(field: &str, b: &BackendDoc) -> Result<Backend, DocError> {
    if b.weight > MAX_WEIGHT {
        return Err(DocError::new(format!("{field}.weight"), format!("{} is more than {MAX_WEIGHT}", b.weight)));
    }
    match (&b.service, &b.address) {
        (Some(service), None) => {
            if service.is_empty() || service.contains('/') {
                return Err(DocError::new(format!("{field}.service"), format!("{service:?} is not a service name")));
            }
            Ok(Backend::Service {
                service: ServiceName::new(service),
                subset: b.subset.clone(),
                endpoint: b.endpoint.clone(),
                weight: b.weight,
            })
        }
        (None, Some(address)) => {
            if !b.subset.is_empty() || b.endpoint.is_some() {
                return Err(DocError::new(field, "subset and endpoint apply only to service targets"));
            }
            let addr = address.parse::<Addr>().map_err(|e| DocError::new(format!("{field}.address"), e.to_string()))?;
            Ok(Backend::Address { addr, weight: b.weight })
        }
        (Some(_), Some(_)) => Err(DocError::new(field, "give either service or address, not both")),
        (None, None) => Err(DocError::new(field, "needs a service or an address")),
    }
}

// ---- policies -------------------------------------------------------------------------------

/// A per-service policy document as written (README: "Policy documents").
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier: Option<OutlierDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub panic_threshold_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protect_from_empty: Option<bool>,
    /// `false`, or `{"server_name": "..."}` (`{}`: verify against each instance's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreakerDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetDoc>,
    /// How the service's endpoints are spoken to: `http1`, `h2` or its alias `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Zone-aware routing when `proxy.zone` is set (README: "Zone-aware routing").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_aware: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone_min_healthy_percent: Option<u32>,
}

/// A service's retry budget as written.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
}

/// A service's circuit breaker as written: each limit absent is no limit.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retries: Option<u32>,
}

/// TLS to a service's instances (policy key `tls`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPolicy {
    /// Sent as SNI and verified; None: each instance's registered host name (or IP address).
    pub server_name: Option<std::sync::Arc<str>>,
}

fn tls_policy(v: &serde_json::Value) -> Result<Option<TlsPolicy>, DocError> {
    match v {
        serde_json::Value::Bool(false) => Ok(None),
        serde_json::Value::Object(m) => {
            if let Some(k) = m.keys().find(|k| *k != "server_name") {
                return Err(DocError::new(format!("tls.{k}"), "unknown key"));
            }
            let server_name = match m.get("server_name") {
                None => None,
                Some(serde_json::Value::String(n))
                    if rustls::pki_types::ServerName::try_from(n.as_str()).is_ok() && !n.is_empty() =>
                {
                    Some(std::sync::Arc::from(n.as_str()))
                }
                Some(other) => {
                    return Err(DocError::new("tls.server_name", format!("{other} is not a DNS name or IP address")));
                }
            };
            Ok(Some(TlsPolicy { server_name }))
        }
        other => Err(DocError::new("tls", format!("{other} is neither false nor {{\"server_name\": ...}}"))),
    }
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckDoc {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_threshold: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy_threshold: Option<u32>,
    /// Whether a new instance takes traffic before its first check passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initially_healthy: Option<bool>,
    /// The service a `grpc` check asks about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDoc {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

/// The load balancer of a service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LbPolicy {
    RoundRobin,
    #[default]
    P2c,
    RingHash(HashOn),
}

impl LbPolicy {
    /// The name a policy document's `lb` gives it.
    pub fn name(&self) -> &'static str {
        match self {
            LbPolicy::RoundRobin => "round_robin",
            LbPolicy::P2c => "p2c",
            LbPolicy::RingHash(_) => "ring_hash",
        }
    }
}

/// What `ring_hash` hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(HeaderName),
    SourceIp,
}

/// The kind of active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// GET this path; a 2xx answer is healthy.
    Http { path: Box<str> },
    /// A TCP connect that succeeds is healthy.
    Tcp,
    /// gRPC's `grpc.health.v1.Health/Check` for `service` (empty: the server) answers SERVING.
    Grpc { service: Box<str> },
}

/// Active health checking for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub initially_healthy: bool,
}

/// Passive outlier detection for a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// A validated per-service policy. Fields left out fall back to the local defaults.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub lb: Option<LbPolicy>,
    pub connect_timeout: Option<Duration>,
    pub retries: Option<u32>,
    pub health_check: Option<HealthCheck>,
    pub outlier: Option<Outlier>,
    pub panic_threshold_percent: Option<u32>,
    pub protect_from_empty: Option<bool>,
    /// None: the key is absent; Some(None): `"tls": false`.
    pub tls: Option<Option<TlsPolicy>>,
    pub circuit_breaker: Option<BreakerLimits>,
    pub retry_budget: Option<BudgetLimits>,
    /// The upstream protocol of instances that do not state their own.
    pub protocol: Option<InstanceProtocol>,
    pub zone_aware: Option<bool>,
    pub zone_min_healthy_percent: Option<u32>,
    pub doc: PolicyDoc,
}

impl Policy {
    /// Parses and validates a policy node's data.
    pub fn parse(data: &[u8]) -> Result<Policy, DocError> {
        Policy::from_doc(from_json(data)?)
    }

    pub fn from_doc(doc: PolicyDoc) -> Result<Policy, DocError> {
        let lb = match doc.lb.as_deref() {
            None => {
                if doc.hash_on.is_some() {
                    return Err(DocError::new("hash_on", "applies only to lb = \"ring_hash\""));
                }
                None
            }
            Some("round_robin") => Some(LbPolicy::RoundRobin),
            Some("p2c") => Some(LbPolicy::P2c),
            Some("ring_hash") => Some(LbPolicy::RingHash(hash_on(doc.hash_on.as_deref())?)),
            Some(other) => {
                return Err(DocError::new("lb", format!("{other:?} is not one of round_robin, p2c, ring_hash")));
            }
        };
        if doc.hash_on.is_some() && !matches!(lb, Some(LbPolicy::RingHash(_))) {
            return Err(DocError::new("hash_on", "applies only to lb = \"ring_hash\""));
        }
        let connect_timeout = doc.connect_timeout.as_deref().map(|t| duration("connect_timeout", t)).transpose()?;
        if connect_timeout == Some(Duration::ZERO) {
            return Err(DocError::new("connect_timeout", "must be greater than zero"));
        }
        if let Some(r) = doc.retries {
            if r > MAX_RETRIES {
                return Err(DocError::new("retries", format!("{r} is more than the limit of {MAX_RETRIES}")));
            }
        }
        let health_check = doc.health_check.as_ref().map(health_check).transpose()?;
        let outlier = doc.outlier.as_ref().map(outlier).transpose()?;
        if let Some(p) = doc.panic_threshold_percent {
            if p > 100 {
                return Err(DocError::new("panic_threshold_percent", format!("{p} is more than 100")));
            }
        }
        if let Some(p) = doc.zone_min_healthy_percent {
            if p > 100 {
                return Err(DocError::new("zone_min_healthy_percent", format!("{p} is more than 100")));
            }
        }
        let circuit_breaker = doc.circuit_breaker.as_ref().map(circuit_breaker).transpose()?;
        let retry_budget = doc.retry_budget.as_ref().map(retry_budget).transpose()?;
        let protocol = match doc.protocol.as_deref() {
            None => None,
            Some(p) => Some(
                InstanceProtocol::parse_upstream(p)
                    .ok_or_else(|| DocError::new("protocol", format!("{p:?} is not one of http1, h2, grpc")))?,
            ),
        };
        Ok(Policy {
            protocol,
            lb,
            connect_timeout,
            retries: doc.retries,
            health_check,
            outlier,
            panic_threshold_percent: doc.panic_threshold_percent,
            protect_from_empty: doc.protect_from_empty,
            tls: doc.tls.as_ref().map(tls_policy).transpose()?,
            circuit_breaker,
            retry_budget,
            zone_aware: doc.zone_aware,
            zone_min_healthy_percent: doc.zone_min_healthy_percent,
            doc,
        })
    }
}

fn hash_on(s: Option<&str>) -> Result<HashOn, DocError> {
    match s {
        None => Err(DocError::new("hash_on", "ring_hash needs \"header:<name>\" or \"source_ip\"")),
        Some("source_ip") => Ok(HashOn::SourceIp),
        Some(s) => match s.strip_prefix("header:") {
            Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                .map(HashOn::Header)
                .map_err(|_| DocError::new("hash_on", format!("{name:?} is not a valid header name"))),
            None => Err(DocError::new("hash_on", format!("{s:?} is neither \"header:<name>\" nor \"source_ip\""))),
        },
    }
}

fn health_check(d: &HealthCheckDoc) -> Result<HealthCheck, DocError> {
    let kind = match d.kind.as_str() {
        "http" => {
            let path = d.path.clone().unwrap_or_else(|| "/health".into());
            if !path.starts_with('/') {
                return Err(DocError::new("health_check.path", format!("{path:?} must start with '/'")));
            }
            CheckKind::Http { path: path.into_boxed_str() }
        }
        "tcp" => {
            if d.path.is_some() {
                return Err(DocError::new("health_check.path", "applies only to kind = \"http\""));
            }
            CheckKind::Tcp
        }
        "grpc" => {
            if d.path.is_some() {
                return Err(DocError::new("health_check.path", "applies only to kind = \"http\""));
            }
            CheckKind::Grpc { service: d.service.clone().unwrap_or_default().into_boxed_str() }
        }
        other => {
            return Err(DocError::new(
                "health_check.kind",
                format!("{other:?} is not one of \"http\", \"tcp\", \"grpc\""),
            ));
        }
    };
    if d.service.is_some() && !matches!(kind, CheckKind::Grpc { .. }) {
        return Err(DocError::new("health_check.service", "applies only to kind = \"grpc\""));
    }
    let interval = d.interval.as_deref().map(|t| duration("health_check.interval", t)).transpose()?;
    let interval = interval.unwrap_or(Duration::from_secs(5));
    let timeout = d.timeout.as_deref().map(|t| duration("health_check.timeout", t)).transpose()?;
    let timeout = timeout.unwrap_or(Duration::from_secs(1));
    if interval < Duration::from_millis(10) {
        return Err(DocError::new("health_check.interval", "must be at least 10ms"));
    }
    if timeout.is_zero() {
        return Err(DocError::new("health_check.timeout", "must be greater than zero"));
    }
    let threshold = |field: &str, v: Option<u32>, default: u32| match v.unwrap_or(default) {
        0 => Err(DocError::new(field, "must be at least 1")),
        n => Ok(n),
    };
    Ok(HealthCheck {
        kind,
        interval,
        timeout,
        healthy_threshold: threshold("health_check.healthy_threshold", d.healthy_threshold, 2)?,
        unhealthy_threshold: threshold("health_check.unhealthy_threshold", d.unhealthy_threshold, 3)?,
        // A new endpoint waits for its first passing check unless the policy says otherwise.
        initially_healthy: d.initially_healthy.unwrap_or(false),
    })
}

fn circuit_breaker(d: &CircuitBreakerDoc) -> Result<BreakerLimits, DocError> {
    // A limit of 0 connections or requests would refuse everything: leave the service out instead.
    for (field, v) in [("max_connections", d.max_connections), ("max_requests", d.max_requests)] {
        if v == Some(0) {
            return Err(DocError::new(format!("circuit_breaker.{field}"), "must be at least 1"));
        }
    }
    Ok(BreakerLimits {
        max_connections: d.max_connections,
        max_pending: d.max_pending,
        max_requests: d.max_requests,
        max_retries: d.max_retries,
    })
}

/// linkerd's defaults: retries may add a fifth to the load, and ten a second are always allowed.
const DEFAULT_BUDGET: BudgetLimits = BudgetLimits { percent: 20, min_per_second: 10 };

fn retry_budget(d: &RetryBudgetDoc) -> Result<BudgetLimits, DocError> {
    let percent = d.percent.unwrap_or(DEFAULT_BUDGET.percent);
    if percent > 1000 {
        return Err(DocError::new("retry_budget.percent", format!("{percent} is more than 1000")));
    }
    Ok(BudgetLimits { percent, min_per_second: d.min_per_second.unwrap_or(DEFAULT_BUDGET.min_per_second) })
}

fn outlier(d: &OutlierDoc) -> Result<Outlier, DocError> {
    let base = d.base_ejection.as_deref().map(|t| duration("outlier.base_ejection", t)).transpose()?;
    let base = base.unwrap_or(Duration::from_secs(30));
    let max = d.max_ejection.as_deref().map(|t| duration("outlier.max_ejection", t)).transpose()?;
    let max = max.unwrap_or(Duration::from_secs(300)).max(base);
    let consecutive_failures = d.consecutive_failures.unwrap_or(5);
    if consecutive_failures == 0 {
        return Err(DocError::new("outlier.consecutive_failures", "must be at least 1"));
    }
    let max_ejection_percent = d.max_ejection_percent.unwrap_or(10);
    if max_ejection_percent > 100 {
        return Err(DocError::new("outlier.max_ejection_percent", format!("{max_ejection_percent} is more than 100")));
    }
    Ok(Outlier { consecutive_failures, base_ejection: base, max_ejection: max, max_ejection_percent })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Result<Rule, DocError> {
        Rule::parse("r1", json.as_bytes())
    }

    #[test]
    fn the_contract_example_rule_validates() {
        let r = rule(
            r#"{"listener":"http","priority":100,
                "match":{"host":"Users.Internal","path_prefix":"/v1/","method":"get","headers":{"X-Canary":"true"}},
                "backends":[{"service":"users","weight":95},
                            {"service":"users","subset":{"version":"v2"},"weight":5},
                            {"address":"192.168.1.7:8080","weight":0}],
                "timeout":"5s","retries":2}"#,
        )
        .unwrap();
        assert_eq!(r.priority, 100);
        assert_eq!(r.matcher.host, Some(HostMatch::Exact("users.internal".into())));
        assert_eq!(r.matcher.method, Some(Method::GET));
        assert_eq!(r.matcher.headers[0].0, "x-canary");
        assert_eq!(r.backends.len(), 3);
        assert_eq!(r.timeout, Some(Duration::from_secs(5)));
        assert_eq!(r.retries, Some(2));
    }

    #[test]
    fn wildcard_hosts_compile_to_a_subdomain_match() {
        let r = rule(r#"{"listener":"http","match":{"host":"*.Example.com"},"backends":[{"service":"a"}]}"#).unwrap();
        assert_eq!(r.matcher.host, Some(HostMatch::Subdomain("example.com".into())));
        assert_eq!(r.backends[0].weight(), DEFAULT_BACKEND_WEIGHT);
    }

    #[test]
    fn malformed_rules_are_refused_with_the_field_and_reason() {
        let cases = [
            ("not json", ""),
            (r#"{"listener":"http"}"#, "missing field `backends`"),
            (r#"{"listener":"http","backends":[]}"#, "backends"),
            (r#"{"listener":"","backends":[{"service":"a"}]}"#, "listener"),
            (r#"{"listener":"http","priorty":3,"backends":[{"service":"a"}]}"#, "unknown field `priorty`"),
            (r#"{"listener":"http","backends":[{"service":"a","weight":10001}]}"#, "backends[0].weight"),
            (r#"{"listener":"http","backends":[{"service":"a","weight":0}]}"#, "weight 0"),
            (r#"{"listener":"http","backends":[{"service":"a","address":"1.2.3.4:5"}]}"#, "not both"),
            (r#"{"listener":"http","backends":[{}]}"#, "needs a service"),
            (r#"{"listener":"http","backends":[{"address":"1.2.3.4"}]}"#, "backends[0].address"),
            (r#"{"listener":"http","backends":[{"address":"1.2.3.4:5","subset":{"a":"b"}}]}"#, "only to service"),
            (r#"{"listener":"http","match":{"path_prefix":"v1"},"backends":[{"service":"a"}]}"#, "path_prefix"),
            (r#"{"listener":"http","match":{"host":"a.*.com"},"backends":[{"service":"a"}]}"#, "match.host"),
            (r#"{"listener":"http","match":{"host":"a.com:80"},"backends":[{"service":"a"}]}"#, "port"),
            (r#"{"listener":"http","match":{"method":"G T"},"backends":[{"service":"a"}]}"#, "match.method"),
            (r#"{"listener":"http","match":{"headers":{"a b":"c"}},"backends":[{"service":"a"}]}"#, "match.headers"),
            (r#"{"listener":"http","timeout":"soon","backends":[{"service":"a"}]}"#, "timeout"),
            (r#"{"listener":"http","retries":99,"backends":[{"service":"a"}]}"#, "retries"),
            (r#"{"listener":"http","backends":[{"service":"a","weight":-1}]}"#, "weight"),
            (r#"{"listener":"http","rate_limit":{"per_second":0},"backends":[{"service":"a"}]}"#, "per_second"),
            (r#"{"listener":"http","per_try_timeout":"0s","backends":[{"service":"a"}]}"#, "per_try_timeout"),
            (
                r#"{"listener":"http","request_headers":{"remove":["Content-Length"]},"backends":[{"service":"a"}]}"#,
                "not editable",
            ),
            (
                r#"{"listener":"http","response_headers":{"set":{"a b":"c"}},"backends":[{"service":"a"}]}"#,
                "response_headers.a b",
            ),
            (r#"{"listener":"http","request_headers":{"sett":{}},"backends":[{"service":"a"}]}"#, "sett"),
            (r#"{"listener":"http","rate_limit":{"per_second":1,"key":"ip"},"backends":[{"service":"a"}]}"#, "key"),
            (r#"{"listener":"http","rate_limit":{"per_second":1,"brust":2},"backends":[{"service":"a"}]}"#, "brust"),
        ];
        for (json, needle) in cases {
            let err = rule(json).expect_err(json).to_string();
            assert!(err.contains(needle), "{json}: error {err:?} should mention {needle:?}");
        }
    }

    #[test]
    fn the_contract_example_policy_validates() {
        let p = Policy::parse(
            br#"{"lb":"p2c","connect_timeout":"1s",
                "health_check":{"kind":"http","path":"/health","interval":"5s","timeout":"1s",
                                "healthy_threshold":2,"unhealthy_threshold":3},
                "outlier":{"consecutive_failures":5,"base_ejection":"30s","max_ejection_percent":50},
                "panic_threshold_percent":50}"#,
        )
        .unwrap();
        assert_eq!(p.lb, Some(LbPolicy::P2c));
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(1)));
        let hc = p.health_check.unwrap();
        assert_eq!(hc.kind, CheckKind::Http { path: "/health".into() });
        assert_eq!((hc.healthy_threshold, hc.unhealthy_threshold), (2, 3));
        assert_eq!(p.outlier.unwrap().max_ejection_percent, 50);
        assert_eq!(p.panic_threshold_percent, Some(50));
    }

    #[test]
    fn ring_hash_needs_something_to_hash_on() {
        let p = Policy::parse(br#"{"lb":"ring_hash","hash_on":"header:X-User"}"#).unwrap();
        assert_eq!(p.lb, Some(LbPolicy::RingHash(HashOn::Header(HeaderName::from_static("x-user")))));
        let p = Policy::parse(br#"{"lb":"ring_hash","hash_on":"source_ip"}"#).unwrap();
        assert_eq!(p.lb, Some(LbPolicy::RingHash(HashOn::SourceIp)));
        assert!(Policy::parse(br#"{"lb":"ring_hash"}"#).unwrap_err().to_string().contains("hash_on"));
        assert!(Policy::parse(br#"{"lb":"p2c","hash_on":"source_ip"}"#).is_err());
        assert!(Policy::parse(br#"{"lb":"random"}"#).unwrap_err().to_string().contains("lb"));
    }

    #[test]
    fn the_upstream_protocol_is_http1_h2_or_grpc() {
        let protocol = |json: &str| Policy::parse(json.as_bytes()).unwrap().protocol;
        assert_eq!(protocol(r#"{"protocol":"http1"}"#), Some(InstanceProtocol::Http1));
        assert_eq!(protocol(r#"{"protocol":"h2"}"#), Some(InstanceProtocol::H2));
        assert_eq!(protocol(r#"{"protocol":"grpc"}"#), Some(InstanceProtocol::H2));
        assert_eq!(protocol("{}"), None);
    }

    #[test]
    fn malformed_policies_are_refused() {
        for (json, needle) in [
            (r#"{"health_check":{"kind":"udp"}}"#, "health_check.kind"),
            (r#"{"health_check":{"kind":"http","interval":"1ms"}}"#, "interval"),
            (r#"{"health_check":{"kind":"tcp","healthy_threshold":0}}"#, "healthy_threshold"),
            (r#"{"outlier":{"max_ejection_percent":101}}"#, "max_ejection_percent"),
            (r#"{"panic_threshold_percent":150}"#, "panic_threshold_percent"),
            (r#"{"connect_timeout":"0s"}"#, "connect_timeout"),
            (r#"{"lbb":"p2c"}"#, "unknown field"),
            (r#"{"circuit_breaker":{"max_requests":0}}"#, "circuit_breaker.max_requests"),
            (r#"{"circuit_breaker":{"max_conns":1}}"#, "unknown field"),
            (r#"{"retry_budget":{"percent":5000}}"#, "retry_budget.percent"),
            (r#"{"zone_min_healthy_percent":101}"#, "zone_min_healthy_percent"),
            (r#"{"zone_aware":"yes"}"#, "zone_aware"),
            (r#"{"protocol":"h3"}"#, "protocol"),
            (r#"{"health_check":{"kind":"http","service":"x"}}"#, "health_check.service"),
        ] {
            let err = Policy::parse(json.as_bytes()).expect_err(json).to_string();
            assert!(err.contains(needle), "{json}: {err:?} should mention {needle:?}");
        }
    }
}
