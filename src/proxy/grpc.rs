//! Requests to HTTP/2 upstreams, and gRPC's terms for them (README: "gRPC and HTTP/2 upstreams"):
//! the upstream request with `te: trailers` kept, the exchange on a shared connection's stream
//! with its retry rule (only a stream the upstream never processed goes elsewhere), the response
//! body with its trailers, zkroute's own failures as trailers-only gRPC answers, `grpc-timeout`,
//! and `zkroute_grpc_requests_total`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::IntCounterVec;

use super::attempt::Outcome;
use super::error::ProxyError;
use super::upstream::h2::{ReplayBody, RequestBody, Stream, never_processed};
use crate::endpoint::InFlight;
use crate::metrics::Metrics;
use crate::net::IpText;
use crate::proxy::http::head::{self, FORWARDED_CLIENT_CERT};
use crate::proxy::stream::ClientTls;

/// The request header that carries a gRPC call's deadline.
pub const TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
const STATUS: HeaderName = HeaderName::from_static("grpc-status");
const MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// Whether a request is a gRPC call (`content-type: application/grpc`, `+proto` and the like).
#[inline]
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The gRPC status of a failure zkroute answers itself (the README's table): no route is
/// UNIMPLEMENTED, anything that kept the call from an upstream UNAVAILABLE, a timeout
/// DEADLINE_EXCEEDED, a malformed request INTERNAL.
pub fn status_of(err: &ProxyError) -> u8 {
    match err {
        ProxyError::NoRoute | ProxyError::MethodNotAllowed => 12,
        ProxyError::NoHealthyUpstream
        | ProxyError::NotReady
        | ProxyError::ConnectFailed
        | ProxyError::UpstreamReset
        | ProxyError::Overflow => 14,
        // A local rate limit: RESOURCE_EXHAUSTED, which gRPC clients do not retry on their own.
        ProxyError::RateLimited { .. } => 8,
        ProxyError::Timeout | ProxyError::HeaderTimeout => 4,
        ProxyError::BadRequest(_) | ProxyError::HeadersTooLarge => 13,
    }
}

/// zkroute's own answer to a gRPC call: trailers-only (HTTP 200, `content-type:
/// application/grpc`, `grpc-status`, `grpc-message`), with `x-zkroute-error` as on every answer.
pub fn answer(err: ProxyError) -> Response<()> {
    let mut resp = Response::new(());
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert(STATUS, HeaderValue::from(u16::from(status_of(&err))));
    // The message is percent-encoded (gRPC's HTTP/2 protocol); zkroute's are plain ASCII text.
    let message: String = err
        .to_string()
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) && b != b'%' { char::from(b).to_string() } else { format!("%{b:02X}") })
        .collect();
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert(MESSAGE, v);
    }
    h.insert(HeaderName::from_static("x-zkroute-error"), HeaderValue::from_static(err.rescue().code));
    resp
}

/// Counts gRPC calls by their status in `zkroute_grpc_requests_total`.
#[derive(Clone)]
pub struct Counter(Option<Arc<CounterInner>>);

struct CounterInner {
    family: IntCounterVec,
    listener: Arc<str>,
    service: Arc<str>,
}

impl Counter {
    pub fn new(metrics: &Metrics, listener: &Arc<str>, service: &Arc<str>) -> Counter {
        Counter(metrics.enabled.then(|| {
            Arc::new(CounterInner {
                family: metrics.grpc_requests.clone(),
                listener: listener.clone(),
                service: service.clone(),
            })
        }))
    }

    /// Counts a call that ended with `status`.
    pub fn count(&self, status: u8) {
        if self.0.is_some() {
            self.count_label(&status.to_string());
        }
    }

    /// Counts a call by its `grpc-status` value as received, `none` when it ended without one.
    fn count_label(&self, status: &str) {
        if let Some(c) = &self.0 {
            c.family.with_label_values(&[&*c.listener, &*c.service, status]).inc();
        }
    }
}

/// The authority for a request that has none going to an HTTP/2 upstream: the backend's name, as
/// an HTTP/1.1 upstream gets it for Host ([`head::host_for_hostless`]), else the endpoint's
/// address (an HTTP/2 request keeps an authority: hyper's client needs one).
pub fn authority_for_hostless(backend: &crate::routing::Backend, endpoint: &crate::routing::table::Endpoint) -> String {
    let name = head::host_for_hostless(backend);
    if name.is_empty() { endpoint.addr.to_string() } else { name }
}

/// The request as it goes to an HTTP/2 upstream: hop-by-hop fields removed but `te: trailers`
/// (which gRPC requires), the authority as the client sent it (else `hostless`),
/// `x-forwarded-for` and `x-forwarded-proto` added. A request that came over TLS (`tls`) goes
/// with `x-forwarded-proto: https`, and any `x-forwarded-client-cert` the client sent is replaced
/// by the one its TLS handshake gives (or dropped), as on HTTP/1.1 upstreams.
pub fn upstream_request(
    parts: &http::request::Parts,
    host: Option<&str>,
    hostless: &str,
    client_ip: &IpText,
    (drop_underscore, tls): (bool, Option<&ClientTls>),
    body: RequestBody,
) -> Request<RequestBody> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri = Uri::builder().scheme("http").authority(host.unwrap_or(hostless)).path_and_query(path).build();
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri.unwrap_or_else(|_| Uri::from_static("/"));
    *req.version_mut() = http::Version::HTTP_2;
    let headers = req.headers_mut();
    headers.reserve(parts.headers.len() + 2);
    let mut xff = Vec::new();
    for (name, value) in &parts.headers {
        match name.as_str() {
            "te" => {
                if value.as_bytes().eq_ignore_ascii_case(b"trailers") {
                    headers.append(name.clone(), value.clone());
                }
                continue;
            }
            "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "trailer"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "host"
            | "x-forwarded-proto" => continue,
            FORWARDED_CLIENT_CERT if tls.is_some() => continue,
            "x-forwarded-for" => {
                xff.extend_from_slice(value.as_bytes());
                xff.extend_from_slice(b", ");
                continue;
            }
            n if drop_underscore && n.contains('_') => continue,
            _ => {}
        }
        headers.append(name.clone(), value.clone());
    }
    xff.extend_from_slice(client_ip.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&xff) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    let proto = if tls.is_some() { "https" } else { "http" };
    headers.insert(HeaderName::from_static("x-forwarded-proto"), HeaderValue::from_static(proto));
    if let Some(cert) = tls.and_then(|t| t.forwarded_client_cert.as_deref()) {
        if let Ok(v) = HeaderValue::from_str(cert) {
            headers.insert(HeaderName::from_static(FORWARDED_CLIENT_CERT), v);
        }
    }
    req
}

/// What an exchange with an HTTP/2 upstream needs besides the stream and the request.
pub struct Exchange<'a> {
    pub deadline: tokio::time::Instant,
    /// `deadline` is the try's own (`per_try_timeout`), sooner than the request's: running out
    /// of it before the response head may send the request elsewhere.
    pub per_try: bool,
    /// Another endpoint may take the request if this one never processes it.
    pub may_retry: bool,
    /// The request's body as kept for another try (None when it has none).
    pub replay: Option<&'a ReplayBody>,
    /// Set for a gRPC call.
    pub grpc: Option<Counter>,
}

/// Sends a request on an HTTP/2 stream and turns the response head into the client's response,
/// whose body (and trailers) then stream from the upstream. The stream is reset (CANCEL) when the
/// client goes away: dropping the response or its body does it.
pub fn exchange<'a>(
    stream: Stream,
    in_flight: InFlight,
    req: Request<RequestBody>,
    ex: Exchange<'a>,
) -> impl Future<Output = Outcome<Response<ResponseBody>>> + 'a {
    let sent = tokio::time::timeout_at(ex.deadline, stream.send.clone().send_request(req));
    Exchanging { sent, held: Some((stream, in_flight)), ex }
}

pin_project_lite::pin_project! {
    /// [`exchange`] on its way: the request sent, and what the answer will need, each stored
    /// once. An `async fn` kept its arguments twice, the request (248 bytes) among them beside the
    /// future it had moved into: 808 bytes in the task of every open stream to an HTTP/2 upstream.
    struct Exchanging<'a, F> {
        #[pin]
        sent: tokio::time::Timeout<F>,
        held: Option<(Stream, InFlight)>,
        ex: Exchange<'a>,
    }
}

impl<F> Future for Exchanging<'_, F>
where
    F: Future<Output = hyper::Result<Response<Incoming>>>,
{
    type Output = Outcome<Response<ResponseBody>>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let sent = std::task::ready!(this.sent.poll(cx));
        let ex = this.ex;
        Poll::Ready(match sent {
            Err(_) => {
                let again = ex.replay.is_none_or(|r| r.again().is_some());
                if ex.per_try && ex.may_retry && again {
                    Outcome::Retry(ProxyError::Timeout)
                } else {
                    Outcome::Fail { error: ProxyError::Timeout, upstream_fault: true }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 upstream exchange failed");
                // Only a request the upstream never processed may go elsewhere, and only with its
                // body still at hand.
                let again = ex.replay.is_none_or(|r| r.again().is_some());
                if ex.may_retry && again && never_processed(&e) {
                    Outcome::Retry(ProxyError::UpstreamReset)
                } else {
                    Outcome::Fail { error: ProxyError::UpstreamReset, upstream_fault: true }
                }
            }
            Ok(Ok(resp)) => {
                let Some((stream, in_flight)) = this.held.take() else {
                    // Polled again after it answered: not done by its callers.
                    return Poll::Ready(Outcome::Fail { error: ProxyError::UpstreamReset, upstream_fault: true });
                };
                let status = resp.status().as_u16();
                let (parts, body) = resp.into_parts();
                let mut grpc = ex.grpc.take();
                if let (Some(c), Some(s)) = (&grpc, parts.headers.get(STATUS)) {
                    // Trailers-only: the status is in the head.
                    c.count_label(s.to_str().unwrap_or("invalid"));
                    grpc = None;
                }
                let body = ResponseBody { body, _stream: stream, in_flight: Some(in_flight), grpc };
                let mut response = Response::from_parts(parts, body);
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    return Poll::Ready(Outcome::Fail { error: ProxyError::UpstreamReset, upstream_fault: true });
                }
                strip_response(response.headers_mut());
                Outcome::Answered { status, upstream_fault: status >= 500, value: response }
            }
        })
    }
}

fn strip_response(headers: &mut HeaderMap) {
    for name in ["connection", "keep-alive", "transfer-encoding", "upgrade", "proxy-connection"] {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// A response body from an HTTP/2 upstream, trailers included. It holds the request's stream
/// slot and its place in the endpoint's in-flight count until it ends, and counts a gRPC call by
/// the `grpc-status` of its trailers.
pub struct ResponseBody {
    body: Incoming,
    _stream: Stream,
    in_flight: Option<InFlight>,
    /// Set while a gRPC call's status is still to be counted.
    grpc: Option<Counter>,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.in_flight = None;
                if let Some(c) = this.grpc.take() {
                    c.count_label("none");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(trailers), Some(_)) = (frame.trailers_ref(), &this.grpc) {
                    let status = trailers.get(STATUS).map_or("none", |s| s.to_str().unwrap_or("invalid"));
                    if let Some(c) = this.grpc.take() {
                        c.count_label(status);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.in_flight = None;
                if let Some(c) = this.grpc.take() {
                    c.count_label("none");
                }
                Poll::Ready(Some(Err(io::Error::other(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away before the call ended: it saw CANCELLED.
        if let Some(c) = self.grpc.take() {
            c.count(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"2M"), Some(Duration::from_secs(120)));
        assert_eq!(parse_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_timeout(b"250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout(b"99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_timeout(b"7n"), Some(Duration::from_nanos(7)));
        for bad in [&b""[..], b"S", b"123456789S", b"10x", b"-1S", b"1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn own_failures_map_to_grpc_statuses() {
        assert_eq!(status_of(&ProxyError::NoRoute), 12);
        assert_eq!(status_of(&ProxyError::NoHealthyUpstream), 14);
        assert_eq!(status_of(&ProxyError::ConnectFailed), 14);
        assert_eq!(status_of(&ProxyError::UpstreamReset), 14);
        assert_eq!(status_of(&ProxyError::Timeout), 4);
        let a = answer(ProxyError::ConnectFailed);
        assert_eq!(a.status(), 200);
        assert_eq!(a.headers()["content-type"], "application/grpc");
        assert_eq!(a.headers()["grpc-status"], "14");
        assert_eq!(a.headers()["x-zkroute-error"], "upstream_connect_failed");
        assert!(a.headers()["grpc-message"].to_str().unwrap().contains("connect"));
    }
}
