//! HTTP/2 with prior knowledge (h2c) from the client: hyper serves the connection (held to the
//! client limits of `h2/connection.rs`), and each request is balanced on its own and forwarded
//! as HTTP/1.1 through the same per-endpoint pools as the HTTP/1 engine, or over a shared HTTP/2
//! connection to an endpoint that speaks HTTP/2 ([`crate::proxy::upstream::h2`]), trailers
//! included. gRPC requests get gRPC's terms (README: "gRPC and HTTP/2 upstreams"): `te: trailers`
//! kept, `grpc-timeout` honoured, zkroute's own failures as trailers-only answers.

mod connection;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::timeout_at;

use super::HttpContext;
use super::codec::{BodyLen, ChunkedScanner, Field, IoBuf, write_body_data};
use super::edit;
use super::head::{self, Parse, ResponseHead, ResponseMode};
use crate::access_log::{AccessLog, Entry};
use crate::endpoint::InFlight;
use crate::net::IpText;
use crate::proxy::attempt::{Attempts, Connected, Outcome, choose_target, hash_key, rate_limit};
use crate::proxy::error::{self, ProxyError};
use crate::proxy::grpc;
use crate::proxy::stream::{ClientStream, ClientTls};
use crate::proxy::upstream::h2::{self as up_h2, ReplayBody, RequestBody};
use crate::proxy::upstream::{AnyProtocol, Conn, Pool, PooledHttp1, TlsOrigin, Upstream};
use crate::routing::documents::HeaderEdits;

/// Serves an HTTP/2 connection whose first bytes (the preface, at least) are in `prefix`: h2c,
/// or h2 over TLS when `tls` is set (what the upstream requests say of the client's TLS).
pub async fn serve(
    stream: impl Into<ClientStream>,
    peer: SocketAddr,
    prefix: IoBuf,
    ctx: Arc<HttpContext>,
    tls: Option<Arc<ClientTls>>,
) {
    let stream = stream.into();
    let (limits, shutdown) = (ctx.limits.clone(), ctx.shutdown.clone());
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (parts, body) = req.into_parts();
        let logged = ctx.access_log.clone().map(|log| Logged::capture(log, &ctx.name, peer, &parts));
        Respond { handling: handle(ctx.clone(), IpText::new(peer.ip()), parts, Some(body), tls.clone()), logged }
    });
    connection::serve(stream, prefix, &limits, shutdown, service).await;
}

pin_project_lite::pin_project! {
    /// A stream's answer, followed for the access log when there is one. A struct, not an `async`
    /// block, which would keep the request it moved into `handle` (264 bytes) and the handling
    /// twice in every open stream's task. The log line is boxed (the box its response body
    /// will carry): inline, its 216 bytes would be part of every stream's task, the log on or off.
    struct Respond<F> {
        #[pin]
        handling: F,
        logged: Option<Box<Logged>>,
    }
}

impl<F: Future<Output = Response<H2Body>>> Future for Respond<F> {
    type Output = Result<Response<H2Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.handling.poll(cx));
        Poll::Ready(Ok(match this.logged.take() {
            Some(logged) => logged.follow(response),
            None => response,
        }))
    }
}

/// The response body to an h2 client: the proxy's own answer, or the upstream's body.
pub enum H2Body {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
    /// From an HTTP/2 upstream, trailers included.
    H2(Box<grpc::ResponseBody>),
    /// Any of the others, followed for the access log.
    Logged(Box<Logged>),
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            H2Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            H2Body::Upstream(u) => u.poll_data(cx),
            H2Body::H2(b) => Pin::new(&mut **b).poll_frame(cx),
            H2Body::Logged(l) => {
                let polled = Pin::new(&mut l.body).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    if let Some(data) = frame.data_ref() {
                        l.line.bytes_out += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        l.line.grpc_status = l.line.grpc_status.or_else(|| grpc_status(trailers));
                    }
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            H2Body::Full(b) => b.is_none(),
            H2Body::Upstream(u) => u.done,
            H2Body::H2(b) => b.is_end_stream(),
            H2Body::Logged(l) => l.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            H2Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            H2Body::Upstream(u) => match u.len {
                BodyLen::Length(_) => SizeHint::with_exact(u.remaining),
                _ => SizeHint::default(),
            },
            H2Body::H2(b) => b.size_hint(),
            H2Body::Logged(l) => l.body.size_hint(),
        }
    }
}

/// What `handle` tells the access log of a response it got from an upstream (a response
/// extension, set only while the log is on).
#[derive(Clone)]
struct Forwarded {
    upstream: String,
    request_id: Option<String>,
}

/// An h2 request's access log line (README: "Observability"), written when its response body
/// ends or is dropped (the client reset the stream): bytes out and a gRPC status from the
/// trailers are known only then.
pub struct LogLine {
    log: Arc<AccessLog>,
    listener: Arc<str>,
    peer: SocketAddr,
    method: Method,
    host: String,
    path: String,
    started: Instant,
    status: u16,
    upstream: Option<String>,
    request_id: Option<String>,
    /// The request's declared `content-length` (an h2 body is not counted as it streams).
    bytes_in: u64,
    bytes_out: u64,
    grpc_status: Option<u16>,
}

/// A response body followed for the access log.
pub struct Logged {
    body: H2Body,
    line: LogLine,
}

impl Logged {
    /// The line of a request that has just come, boxed with no body yet.
    fn capture(log: Arc<AccessLog>, listener: &Arc<str>, peer: SocketAddr, req: &http::request::Parts) -> Box<Logged> {
        let headers = &req.headers;
        let text = |name| headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok()).map(str::to_owned);
        let line = LogLine {
            log,
            listener: listener.clone(),
            peer,
            method: req.method.clone(),
            host: req.uri.authority().map(|a| a.to_string()).or_else(|| text(header::HOST)).unwrap_or_default(),
            path: req.uri.path_and_query().map_or_else(String::new, |p| p.to_string()),
            started: Instant::now(),
            status: 0,
            upstream: None,
            request_id: text(HeaderName::from_static("x-request-id")),
            bytes_in: text(header::CONTENT_LENGTH).and_then(|l| l.parse().ok()).unwrap_or(0),
            bytes_out: 0,
            grpc_status: None,
        };
        Box::new(Logged { body: H2Body::Full(None), line })
    }

    /// The response, whose body now carries this line (in this box) until it ends.
    fn follow(mut self: Box<Self>, mut response: Response<H2Body>) -> Response<H2Body> {
        let line = &mut self.line;
        line.status = response.status().as_u16();
        line.grpc_status = grpc_status(response.headers());
        if let Some(f) = response.extensions_mut().remove::<Forwarded>() {
            line.upstream = Some(f.upstream);
            if line.request_id.is_none() {
                line.request_id = f.request_id;
            }
        }
        response.map(|body| {
            self.body = body;
            H2Body::Logged(self)
        })
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        self.log.record(&Entry {
            time: std::time::SystemTime::now(),
            listener: &self.listener,
            client: Some(self.peer),
            method: self.method.as_str(),
            host: &self.host,
            path: &self.path,
            status: self.status,
            upstream: self.upstream.take(),
            duration: self.started.elapsed(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            request_id: self.request_id.as_deref(),
            grpc_status: self.grpc_status,
        });
    }
}

/// A gRPC status in a header block (trailers, or a trailers-only head).
fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// A response body read from an upstream HTTP/1.1 connection; the connection goes back to the
/// pool once the body is complete.
pub struct UpstreamBody {
    conn: Option<Conn>,
    pool: Option<Arc<Pool>>,
    len: BodyLen,
    remaining: u64,
    scanner: ChunkedScanner,
    reusable: bool,
    done: bool,
    _in_flight: Option<InFlight>,
}

impl UpstreamBody {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            if !conn.buf.is_empty() {
                let (data, finished) = match self.len {
                    BodyLen::None => (Bytes::new(), true),
                    BodyLen::Length(_) => {
                        let take = (conn.buf.len() as u64).min(self.remaining) as usize;
                        let data = Bytes::copy_from_slice(&conn.buf.filled()[..take]);
                        conn.buf.consume(take);
                        self.remaining -= take as u64;
                        (data, self.remaining == 0)
                    }
                    BodyLen::Chunked => {
                        let filled = conn.buf.filled();
                        let mut data = BytesMut::new();
                        let used = match self.scanner.scan(filled, |r| data.extend_from_slice(&filled[r])) {
                            Ok(u) => u,
                            Err(e) => return Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, e.0)))),
                        };
                        conn.buf.consume(used);
                        (data.freeze(), self.scanner.is_done())
                    }
                    BodyLen::UntilClose => {
                        let data = Bytes::copy_from_slice(conn.buf.filled());
                        conn.buf.consume(data.len());
                        (data, false)
                    }
                };
                if finished {
                    self.finish();
                }
                if !data.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                continue;
            }
            if self.len == BodyLen::None
                || (self.len != BodyLen::UntilClose && self.remaining == 0 && self.len != BodyLen::Chunked)
            {
                self.finish();
                continue;
            }
            match conn.buf.poll_read_from(cx, &mut conn.stream) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if self.len == BodyLen::UntilClose {
                        self.reusable = false;
                        self.finish();
                        continue;
                    }
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "upstream closed mid-body",
                    ))));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }

    fn finish(&mut self) {
        self.done = true;
        self._in_flight = None;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.as_ref()) {
            if self.reusable && conn.buf.is_empty() {
                pool.checkin(conn);
            }
        }
    }
}

/// zkroute's own answer: in gRPC's terms to a gRPC request, counted as such.
fn answer_for(err: ProxyError, grpc: Option<&grpc::Counter>) -> Response<H2Body> {
    match grpc {
        Some(counter) => {
            counter.count(grpc::status_of(&err));
            grpc::answer(err).map(|()| H2Body::Full(None))
        }
        None => answer(err),
    }
}

fn answer(err: ProxyError) -> Response<H2Body> {
    let r = err.rescue();
    let mut resp = Response::new(H2Body::Full(Some(Bytes::from(error::body_text(&err)))));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(HeaderName::from_static("x-zkroute-error"), HeaderValue::from_static(r.code));
    if let Some(secs) = err.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "trailer"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// The host to route by and forward: `:authority`, else Host (RFC 9113 section 8.3.1). Either
/// is held to the rules of HTTP/1 (no userinfo, RFC 9110 section 7.2).
fn request_host(parts: &http::request::Parts) -> Result<Option<&str>, ProxyError> {
    let host = match parts.uri.authority() {
        Some(authority) => authority.as_str(),
        None => {
            let mut hosts = parts.headers.get_all(header::HOST).iter();
            match (hosts.next(), hosts.next()) {
                (None, _) => return Ok(None),
                (Some(h), None) => h.to_str().map_err(|_| ProxyError::BadRequest("invalid Host header"))?,
                (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Host header")),
            }
        }
    };
    if !head::is_valid_host(host.as_bytes()) {
        return Err(ProxyError::BadRequest("invalid :authority or Host"));
    }
    Ok(Some(host))
}

// A function returning an `async` block, not an `async fn`, which would keep each argument twice
// (the request's 224-byte head among them) in every open stream's task; the request comes split,
// and its body (`raw`, None once it went to an HTTP/2 endpoint) is used where it was captured, for
// the same reason.
#[allow(clippy::manual_async_fn)] // an async block stores its captures once
fn handle(
    ctx: Arc<HttpContext>,
    client_ip: IpText,
    parts: http::request::Parts,
    mut raw: Option<Incoming>,
    tls: Option<Arc<ClientTls>>,
) -> impl Future<Output = Response<H2Body>> + Send {
    async move {
        let started = Instant::now();
        let is_grpc = grpc::is_grpc(&parts.headers);
        if parts.method == Method::CONNECT {
            // A tunnel to where the client says (RFC 9113 section 8.5): zkroute routes by its table
            // only, as it answers CONNECT on HTTP/1.
            return answer(ProxyError::MethodNotAllowed);
        }
        let host = match request_host(&parts) {
            Ok(h) => h,
            Err(e) => return answer(e),
        };
        let route = {
            let guard = ctx.routes.load();
            let Some(table) = guard.as_ref() else { return answer(ProxyError::NotReady) };
            let Some(listener) = table.listener(ctx.listener) else { return answer(ProxyError::NotReady) };
            match listener.route(host, parts.uri.path(), &parts.method, &parts.headers) {
                Some(r) => r.clone(),
                None => {
                    listener.no_route.observe(404, started.elapsed());
                    let counter = is_grpc.then(|| grpc::Counter::new(&ctx.metrics, &ctx.name, &Arc::from("")));
                    return answer_for(ProxyError::NoRoute, counter.as_ref());
                }
            }
        };
        let Some(target) = choose_target(&route, &parts.headers) else {
            let counter = is_grpc.then(|| grpc::Counter::new(&ctx.metrics, &ctx.name, &route.targets[0].set.label));
            return answer_for(ProxyError::NoHealthyUpstream, counter.as_ref());
        };
        let counter = is_grpc.then(|| grpc::Counter::new(&ctx.metrics, &ctx.name, &target.set.label));
        // A tag-routed service: the endpoints of the request's tag.
        let set = target.set.for_request(&parts.headers);
        if let Err(e) = rate_limit(&route, |name| parts.headers.get(name).map(|v| v.as_bytes()), &client_ip) {
            target.stats.observe(e.rescue().status, started.elapsed());
            return answer_for(e, counter.as_ref());
        }
        let hash = hash_key(&set.policy.lb, |name| parts.headers.get(name).map(|v| v.as_bytes()), &client_ip);

        let has_body = raw.as_ref().is_some_and(|b| !b.is_end_stream());
        let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let drop_underscore = ctx.limits.drop_underscore_headers;
        let rule = route.rule.as_deref();
        let request_edits = rule.and_then(|r| r.request_headers.as_deref());
        let response_edits = rule.and_then(|r| r.response_headers.as_deref());
        // One id for every try of the request.
        let request_id =
            (ctx.limits.request_id && !parts.headers.contains_key("x-request-id")).then(edit::new_request_id);

        // gRPC's own deadline bounds the request too, within the route's timeout.
        let mut timeout = route.timeout;
        if is_grpc {
            if let Some(t) = parts.headers.get(grpc::TIMEOUT).and_then(|v| grpc::parse_timeout(v.as_bytes())) {
                timeout = timeout.min(t);
            }
        }
        let deadline = tokio::time::Instant::from_std(started + timeout);
        let mut attempts = Attempts::new(&target, set, hash, route.retries, started, Some(deadline))
            .with_per_try_timeout(route.per_try_timeout);
        // The HTTP/1.1 form of the request, made when an HTTP/1.1 endpoint is tried.
        let mut req_head = Vec::new();
        // The body (`raw`): as it came, until an HTTP/2 endpoint is tried, which keeps it for a retry.
        let mut replay: Option<ReplayBody> = None;
        loop {
            let Some(Connected { attempt, in_flight, conn }) = ({
                let connector =
                    AnyProtocol::new(PooledHttp1::new(&ctx.pools, &ctx.limits.congestion, started), |alpn| {
                        TlsOrigin::for_set(set, ctx.upstream_tls.as_ref(), &ctx.metrics, alpn)
                    });
                // A pooled connection (or a stream on a shared HTTP/2 one) needs no future. A new
                // one's is boxed: inline it would be half of every open stream's task (1.9 KB),
                // which the connection no longer needs once made.
                let mut connected = attempts.reuse(&connector);
                if connected.is_none() {
                    connected = Box::pin(attempts.connection(&connector, &ctx.health)).await;
                }
                connected
            }) else {
                break;
            };
            let upstream = ctx.access_log.is_some().then(|| attempt.endpoint.addr.to_string());
            let outcome = match conn {
                Upstream::Http1(conn) => {
                    if req_head.is_empty() {
                        let hostless;
                        let host = match host {
                            Some(h) => h,
                            None => {
                                hostless = head::host_for_hostless(&target.backend);
                                &hostless
                            }
                        };
                        write_head(
                            &mut req_head,
                            &parts,
                            host,
                            has_body,
                            length,
                            &client_ip,
                            drop_underscore,
                            tls.as_deref(),
                            request_edits,
                        );
                        if let Some(id) = &request_id {
                            edit::insert_field(&mut req_head, b"x-request-id", id.as_bytes());
                        }
                    }
                    let Some(body) = raw.as_mut() else {
                        // The body went to an HTTP/2 endpoint and is not at hand as a stream.
                        let fail = Outcome::<()>::Fail { error: ProxyError::UpstreamReset, upstream_fault: false };
                        let _ = attempts.settle(attempt, fail, &ctx.health);
                        break;
                    };
                    let pool = ctx.pools.of(&attempt.endpoint.state).cloned();
                    let may_retry = attempts.may_retry() && !has_body && parts.method.is_idempotent();
                    let (try_deadline, per_try) = attempts.try_deadline(deadline);
                    let mut request =
                        Http1Request { head: &req_head, body, has_body, chunked: length.is_none(), response_edits };
                    exchange(conn, pool, in_flight, &mut request, &parts.method, try_deadline, (may_retry, per_try))
                        .await
                }
                Upstream::H2(stream) => {
                    let body = if !has_body {
                        Some(RequestBody::Empty)
                    } else if let Some(b) = raw.take() {
                        let r = ReplayBody::new(up_h2::from_incoming(b));
                        let again = r.again();
                        replay = again;
                        Some(RequestBody::Replay(r))
                    } else {
                        replay.as_ref().and_then(ReplayBody::again).map(RequestBody::Replay)
                    };
                    match body {
                        Some(body) => {
                            // Made in a block: the request, moved into the exchange, would
                            // otherwise keep its place (248 bytes) beside it while it runs.
                            let exchange = {
                                let hostless = if host.is_none() {
                                    grpc::authority_for_hostless(&target.backend, attempt.endpoint)
                                } else {
                                    String::new()
                                };
                                let mut req = grpc::upstream_request(
                                    &parts,
                                    host,
                                    &hostless,
                                    &client_ip,
                                    (drop_underscore, tls.as_deref()),
                                    body,
                                );
                                if let Some(edits) = request_edits {
                                    edit::edit_map(req.headers_mut(), edits);
                                }
                                if let Some(id) =
                                    request_id.as_deref().and_then(|id| http::HeaderValue::from_str(id).ok())
                                {
                                    req.headers_mut().insert("x-request-id", id);
                                }
                                let may_retry = attempts.may_retry();
                                let (deadline, per_try) = attempts.try_deadline(deadline);
                                let replay = replay.as_ref();
                                let ex = grpc::Exchange { deadline, per_try, may_retry, replay, grpc: counter.clone() };
                                grpc::exchange(stream, in_flight, req, ex)
                            };
                            exchange.await.map(|mut response| {
                                if let Some(edits) = response_edits {
                                    edit::edit_map(response.headers_mut(), edits);
                                }
                                response.map(|b| H2Body::H2(Box::new(b)))
                            })
                        }
                        None => Outcome::Fail { error: ProxyError::UpstreamReset, upstream_fault: false },
                    }
                }
            };
            if let Some(mut response) = attempts.settle(attempt, outcome, &ctx.health) {
                if let Some(upstream) = upstream {
                    response.extensions_mut().insert(Forwarded { upstream, request_id: request_id.clone() });
                }
                return response;
            }
        }
        answer_for(attempts.failure(), counter.as_ref())
    }
}

/// An h2 request as it goes to an HTTP/1.1 upstream.
struct Http1Request<'a> {
    head: &'a [u8],
    body: &'a mut Incoming,
    has_body: bool,
    /// Its length is unknown: the body goes chunked.
    chunked: bool,
    /// The rule's edits of the response's header fields.
    response_edits: Option<&'a HeaderEdits>,
}

/// Sends an h2 request on an HTTP/1.1 upstream connection and turns the response head into the
/// h2 response, whose body then streams from the connection. `may_retry`: another endpoint may
/// take the request if this one fails it before answering (it has no body, which would be gone).
async fn exchange(
    mut conn: Conn,
    pool: Option<Arc<Pool>>,
    in_flight: InFlight,
    request: &mut Http1Request<'_>,
    method: &Method,
    deadline: tokio::time::Instant,
    (may_retry, per_try): (bool, bool),
) -> Outcome<Response<H2Body>> {
    let retry_or_fail =
        |error| if may_retry { Outcome::Retry(error) } else { Outcome::Fail { error, upstream_fault: true } };
    if conn.stream.write_all(request.head).await.is_err() || conn.stream.flush().await.is_err() {
        // Nothing was acted on: a pooled connection the upstream had closed, or a reset.
        return if request.has_body {
            Outcome::Fail { error: ProxyError::UpstreamReset, upstream_fault: true }
        } else {
            Outcome::Retry(ProxyError::UpstreamReset)
        };
    }
    // The body goes up while the response head is awaited.
    let mut fields: Vec<Field> = Vec::with_capacity(16);
    let head_request = method == Method::HEAD;
    let (resp, pumping, body_ok) = {
        let (mut us_r, mut us_w) = conn.stream.split();
        let conn_buf = &mut conn.buf;
        let fields = &mut fields;
        let read = async {
            loop {
                if !conn_buf.is_empty() {
                    match head::parse_response(conn_buf.filled(), fields, head_request) {
                        // Interim answers are not relayed over HTTP/2; the final one may
                        // be in the buffer already.
                        Ok(Parse::Complete(h)) if h.is_interim() => {
                            conn_buf.consume(h.len);
                            continue;
                        }
                        Ok(Parse::Complete(h)) => return Ok(h),
                        Ok(Parse::Partial) if conn_buf.len() >= head::MAX_RESPONSE_HEAD => {
                            return Err(ProxyError::UpstreamReset);
                        }
                        Ok(Parse::Partial) => {
                            if conn_buf.is_full() {
                                conn_buf.grow(head::MAX_RESPONSE_HEAD);
                            }
                        }
                        Err(_) => return Err(ProxyError::UpstreamReset),
                    }
                }
                match timeout_at(deadline, conn_buf.read_from(&mut us_r)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::UpstreamReset),
                    Ok(Ok(_)) => {}
                    Err(_) => return Err(ProxyError::Timeout),
                }
            }
        };
        let pump = pump_body(request.body, &mut us_w, request.has_body, request.chunked);
        tokio::pin!(read);
        tokio::pin!(pump);
        let mut pumping = request.has_body;
        let mut body_ok = !request.has_body;
        let resp = loop {
            tokio::select! {
                biased;
                r = &mut read => break r,
                p = &mut pump, if pumping => { pumping = false; body_ok = p.is_ok(); }
            }
        };
        (resp, pumping, body_ok)
    };
    // HTTP/2 has no 101 (RFC 9113 section 8.6), and no h2 request asks for an upgrade: a
    // switch is an invalid response, and its connection is dropped.
    let resp = resp.and_then(|h| if h.status == 101 { Err(ProxyError::UpstreamReset) } else { Ok(h) });
    let resp_head = match resp {
        Ok(h) => h,
        // A try's own timeout (`per_try_timeout`) may go to another endpoint.
        Err(ProxyError::Timeout) if per_try && may_retry => return Outcome::Retry(ProxyError::Timeout),
        // A timeout is the upstream's fault once it had the whole request.
        Err(ProxyError::Timeout) => {
            return Outcome::Fail { error: ProxyError::Timeout, upstream_fault: body_ok && !pumping };
        }
        Err(e) => return retry_or_fail(e),
    };
    if may_retry && matches!(resp_head.status, 502..=504) {
        // Let another endpoint answer an idempotent request this one failed.
        return Outcome::Retry(ProxyError::UpstreamReset);
    }
    let mut response = Response::new(H2Body::Full(None));
    *response.status_mut() = StatusCode::from_u16(resp_head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    copy_fields(headers, conn.buf.filled(), &resp_head, &fields);
    if let Some(edits) = request.response_edits {
        edit::edit_map(headers, edits);
    }
    conn.buf.consume(resp_head.len);
    let remaining = match resp_head.body {
        BodyLen::Length(n) => n,
        _ => 0,
    };
    let status = resp_head.status;
    let mut upstream_body = UpstreamBody {
        conn: Some(conn),
        pool,
        len: resp_head.body,
        remaining,
        scanner: ChunkedScanner::default(),
        reusable: !resp_head.close && body_ok && !pumping,
        done: false,
        _in_flight: Some(in_flight),
    };
    if resp_head.body == BodyLen::None {
        // The stream ends with its HEADERS frame: a DATA frame after them would contradict a
        // Content-Length kept for a HEAD or 304 (RFC 9110 section 8.6).
        upstream_body.finish();
    }
    *response.body_mut() = H2Body::Upstream(Box::new(upstream_body));
    Outcome::Answered { status, upstream_fault: status >= 500, value: response }
}

/// Writes the HTTP/1.1 request head for an h2 request: always with a Host (the request's
/// authority, else [`head::host_for_hostless`]), and its `cookie` fields joined into one with "; "
/// (RFC 9113 section 8.2.3). The rule's `edits` as for an HTTP/1 request
/// (`head::write_request_as`): the fields they remove or set are left out, the proxy's own too,
/// and those they set or add go last.
#[allow(clippy::too_many_arguments)]
fn write_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    host: &str,
    has_body: bool,
    length: Option<u64>,
    client_ip: &IpText,
    drop_underscore: bool,
    tls: Option<&ClientTls>,
    edits: Option<&HeaderEdits>,
) {
    let drops = |name: &str| edits.is_some_and(|e| e.drops(name.as_bytes()));
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !drops("host") {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(host.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let mut xff = Vec::new();
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let Some(first) = cookies.next().filter(|_| !drops("cookie")) {
        out.extend_from_slice(b"cookie: ");
        out.extend_from_slice(first.as_bytes());
        for more in cookies {
            out.extend_from_slice(b"; ");
            out.extend_from_slice(more.as_bytes());
        }
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in &parts.headers {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::COOKIE
            || name.as_str() == "x-forwarded-proto"
            || (tls.is_some() && name.as_str() == head::FORWARDED_CLIENT_CERT)
            || (drop_underscore && name.as_str().contains('_'))
            || drops(name.as_str())
        {
            continue;
        }
        if name.as_str() == "x-forwarded-for" {
            xff.extend_from_slice(value.as_bytes());
            xff.extend_from_slice(b", ");
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match (has_body, length) {
        (_, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            super::codec::push_decimal(out, n);
            out.extend_from_slice(b"\r\n");
        }
        (true, None) => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        (false, None) => {}
    }
    if !drops("x-forwarded-for") {
        out.extend_from_slice(b"x-forwarded-for: ");
        out.extend_from_slice(&xff);
        out.extend_from_slice(client_ip.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !drops("x-forwarded-proto") {
        out.extend_from_slice(if tls.is_some() {
            b"x-forwarded-proto: https\r\n"
        } else {
            b"x-forwarded-proto: http\r\n"
        });
    }
    if let Some(cert) = tls.and_then(|t| t.forwarded_client_cert.as_deref()) {
        if !drops(head::FORWARDED_CLIENT_CERT) {
            out.extend_from_slice(head::FORWARDED_CLIENT_CERT.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(cert.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(edits.map_or(b"\r\n", |e| e.head_end()));
}

/// Sends the h2 request body upstream, chunk-encoding it when its length is unknown.
async fn pump_body<W: AsyncWrite + Unpin>(
    body: &mut Incoming,
    us: &mut W,
    has_body: bool,
    chunked: bool,
) -> io::Result<()> {
    if !has_body {
        return Ok(());
    }
    let mut frame_head = Vec::with_capacity(20);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(io::Error::other)?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        write_body_data(us, &mut frame_head, &data, chunked).await?;
        // Under TLS, what the socket did not take waits in the session until flushed.
        us.flush().await?;
    }
    if chunked {
        us.write_all(b"0\r\n\r\n").await?;
        us.flush().await?;
    }
    Ok(())
}

/// Response fields for the h2 client: those an HTTP/1 client would get, without the ones
/// HTTP/2 forbids (RFC 9113 section 8.2.2) and without Transfer-Encoding, whose framing h2
/// replaces.
fn copy_fields(headers: &mut HeaderMap, buf: &[u8], head: &ResponseHead, fields: &[Field]) {
    const MODE: ResponseMode = ResponseMode { close: false, keep_alive_10: false, drop_te: true, upgrade: false };
    for f in fields {
        if !head::keep_response_field(buf, head, fields, f, MODE) {
            continue;
        }
        // A 204 has no content to give a length of (RFC 9110 section 8.6); an h2 client would
        // hold the stream to it.
        if head.status == 204 && f.kind == super::codec::Known::ContentLength {
            continue;
        }
        let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&buf[f.name.clone()]), HeaderValue::from_bytes(&buf[f.value.clone()]))
        else {
            continue;
        };
        if is_hop_by_hop(&name) {
            continue;
        }
        headers.append(name, value);
    }
}
