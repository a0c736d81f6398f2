//! HTTP/2 with prior knowledge (h2c) from the client: hyper serves the connection (held to the
//! client limits of `h2/connection.rs`), and each request is forwarded as HTTP/1.1 through the
//! same per-endpoint pools as the HTTP/1 engine. Upstreams speak HTTP/1.1, so trailers are not
//! forwarded (gRPC needs HTTP/2 end to end and is not supported yet).

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
use tokio::net::TcpStream;
use tokio::time::timeout_at;

use super::HttpContext;
use super::codec::{BodyLen, ChunkedScanner, Field, IoBuf, push_hex};
use super::head::{self, Parse, ResponseHead, ResponseMode};
use crate::endpoint::InFlight;
use crate::proxy::balance::{self, PickInput, Tried};
use crate::proxy::error::{self, ProxyError};
use crate::proxy::upstream::{Conn, Pool};
use crate::routing::documents::{HashOn, LbPolicy};
use crate::routing::table::hash_bytes;

/// Serves an h2c connection whose first bytes (the preface, at least) are in `prefix`.
pub async fn serve(stream: TcpStream, peer: SocketAddr, prefix: IoBuf, ctx: Arc<HttpContext>) {
    let (limits, shutdown) = (ctx.limits.clone(), ctx.shutdown.clone());
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(ctx, peer, req).await) }
    });
    connection::serve(stream, prefix, &limits, shutdown, service).await;
}

/// The response body to an h2 client: the proxy's own answer, or the upstream's body.
pub enum H2Body {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            H2Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            H2Body::Upstream(u) => u.poll_data(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            H2Body::Full(b) => b.is_none(),
            H2Body::Upstream(u) => u.done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            H2Body::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            H2Body::Upstream(u) => match u.len {
                BodyLen::Length(_) => SizeHint::with_exact(u.remaining),
                _ => SizeHint::default(),
            },
        }
    }
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

fn answer(err: ProxyError) -> Response<H2Body> {
    let r = err.rescue();
    let mut resp = Response::new(H2Body::Full(Some(Bytes::from(error::body_text(&err)))));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    h.insert(HeaderName::from_static("x-zkroute-error"), HeaderValue::from_static(r.code));
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

async fn handle(ctx: Arc<HttpContext>, peer: SocketAddr, req: Request<Incoming>) -> Response<H2Body> {
    let started = Instant::now();
    let (parts, mut body) = req.into_parts();
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
                return answer(ProxyError::NoRoute);
            }
        }
    };
    let Some((_, target)) = route.target_at(fastrand::u32(..)) else { return answer(ProxyError::NoHealthyUpstream) };
    let target = if target.set.active().is_empty() {
        route.targets.iter().find(|t| t.weight > 0 && !t.set.active().is_empty()).unwrap_or(target)
    } else {
        target
    };
    let hash = match &target.set.policy.lb {
        LbPolicy::RingHash(HashOn::Header(name)) => parts.headers.get(name).map(|v| hash_bytes(v.as_bytes())),
        LbPolicy::RingHash(HashOn::SourceIp) => Some(hash_bytes(super::codec::IpText::new(peer.ip()).as_bytes())),
        _ => None,
    };

    let has_body = !body.is_end_stream();
    let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut req_head = Vec::with_capacity(512);
    let drop_underscore = ctx.limits.drop_underscore_headers;
    write_head(&mut req_head, &parts, host, has_body, length, &peer, drop_underscore);

    let deadline = tokio::time::Instant::from_std(started + route.timeout);
    let mut tried = Tried::default();
    let mut attempts_left = route.retries;
    let mut last_error = ProxyError::NoHealthyUpstream;
    while let Some(i) = balance::pick(&target.set, PickInput { hash }, &tried) {
        tried.push(i);
        let endpoint = &target.set.endpoints[i];
        let in_flight = endpoint.state.start_request();
        let pool = ctx.pools.of(&endpoint.state).cloned();
        let mut conn = match pool.as_ref().and_then(|p| p.checkout(Instant::now())) {
            Some(c) => c,
            None => {
                let timeout = target
                    .set
                    .policy
                    .connect_timeout
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
                match crate::net::connect(&endpoint.addr, timeout, &ctx.limits.congestion).await {
                    Ok(s) => Conn::new(s),
                    Err(_) => {
                        target.stats.connect_failed();
                        ctx.outlier_failure(&target.set, i);
                        last_error = ProxyError::ConnectFailed;
                        if attempts_left > 0 {
                            attempts_left -= 1;
                            target.stats.retried();
                            continue;
                        }
                        break;
                    }
                }
            }
        };
        if conn.stream.write_all(&req_head).await.is_err() {
            last_error = ProxyError::UpstreamReset;
            if attempts_left > 0 && !has_body {
                attempts_left -= 1;
                continue;
            }
            break;
        }
        // The body goes up while the response head is awaited.
        let mut fields: Vec<Field> = Vec::with_capacity(16);
        let head_request = parts.method == http::Method::HEAD;
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
            let pump = pump_body(&mut body, &mut us_w, has_body, length.is_none());
            tokio::pin!(read);
            tokio::pin!(pump);
            let mut pumping = has_body;
            let mut body_ok = !has_body;
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
            Err(e) => {
                // A timeout is the upstream's fault once it had the whole request.
                if e != ProxyError::Timeout || (body_ok && !pumping) {
                    ctx.outlier_failure(&target.set, i);
                }
                target.stats.observe(e.rescue().status, started.elapsed());
                return answer(e);
            }
        };
        let mut response = Response::new(H2Body::Full(None));
        *response.status_mut() = StatusCode::from_u16(resp_head.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let headers = response.headers_mut();
        copy_fields(headers, conn.buf.filled(), &resp_head, &fields);
        conn.buf.consume(resp_head.len);
        if resp_head.status < 500 {
            endpoint.state.record_success();
        } else {
            ctx.outlier_failure(&target.set, i);
        }
        target.stats.observe(resp_head.status, started.elapsed());
        let remaining = match resp_head.body {
            BodyLen::Length(n) => n,
            _ => 0,
        };
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
        return response;
    }
    target.stats.observe(last_error.rescue().status, started.elapsed());
    answer(last_error)
}

/// Writes the HTTP/1.1 request head for an h2 request: always with a Host (empty when the request
/// has no authority, RFC 9112 section 3.2), and its `cookie` fields joined into one with "; "
/// (RFC 9113 section 8.2.3).
fn write_head(
    out: &mut Vec<u8>,
    parts: &http::request::Parts,
    host: Option<&str>,
    has_body: bool,
    length: Option<u64>,
    peer: &SocketAddr,
    drop_underscore: bool,
) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut xff = Vec::new();
    let mut cookies = parts.headers.get_all(header::COOKIE).iter();
    if let Some(first) = cookies.next() {
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
            || (drop_underscore && name.as_str().contains('_'))
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
    out.extend_from_slice(b"x-forwarded-for: ");
    out.extend_from_slice(&xff);
    out.extend_from_slice(super::codec::IpText::new(peer.ip()).as_bytes());
    out.extend_from_slice(b"\r\nx-forwarded-proto: http\r\n\r\n");
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
        if chunked {
            frame_head.clear();
            push_hex(&mut frame_head, data.len() as u64);
            frame_head.extend_from_slice(b"\r\n");
            us.write_all(&frame_head).await?;
            us.write_all(&data).await?;
            us.write_all(b"\r\n").await?;
        } else {
            us.write_all(&data).await?;
        }
    }
    if chunked {
        us.write_all(b"0\r\n\r\n").await?;
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
