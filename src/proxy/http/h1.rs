//! HTTP/1.x client connections, proxied by zkroute's own engine: heads are parsed into ranges of
//! the read buffer and rewritten straight into the upstream request, bodies stream through with
//! their framing checked, upstream connections come from the endpoint's pool. No header map, no
//! per-request task, no allocation on the common path.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::HttpContext;
use super::codec::{BodyLen, ChunkedScanner, Field, IoBuf};
use super::edit;
use super::head::{self, Fields, KnownHost, Parse, RequestHead, ResponseHead, ResponseMode};
use crate::access_log;
use crate::endpoint::InFlight;
use crate::metrics::{ConnState, Counted};
use crate::net::IpText;
use crate::proxy::Limits;
use crate::proxy::attempt::{Attempts, Connected, Outcome, TargetRef, choose_target, hash_key, rate_limit};
use crate::proxy::error::{self, ProxyError};
use crate::proxy::lazy_timeout::{timeout, timeout_at};
use crate::proxy::stream::{ClientStream, ClientTls, Stream};
use crate::proxy::tcp::{RelayedBytes, relay};
use crate::proxy::upstream::{self, Conn, PooledHttp1, TlsOrigin};
use crate::routing::documents::HeaderEdits;
use crate::routing::table::TargetStats;
use crate::shutdown::LastingWait;
use crate::tls::Alpn;

mod to_h2;

/// A client connection's first read buffer: most request heads fit, and a slow client that has
/// sent part of one holds no more (nginx's `client_header_buffer_size` is as large). A head that
/// does not fit grows it to [`CLIENT_BUF`], then up to the header limit.
pub(super) const FIRST_BUF: usize = 1024;
/// Read buffer of a client connection that sends a request body, or a head longer than
/// [`FIRST_BUF`]; held only while a request is read or proxied.
pub(super) const CLIENT_BUF: usize = 16 * 1024;
/// How long a connection waiting for its next request keeps its (empty) read buffer: a quick
/// next request reuses it, a longer wait gives it back (a grown one too).
const BUFFER_HOLD: Duration = Duration::from_secs(1);
/// Body bytes copied into the head's write when already buffered, to send both in one write.
const COALESCE_BODY: usize = 16 * 1024;

/// What the connection does after an exchange.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AfterExchange {
    KeepAlive,
    Close,
}

/// One client connection speaking HTTP/1.x.
pub struct Connection {
    ctx: Arc<HttpContext>,
    stream: ClientStream,
    /// Set on a TLS listener: what the upstream request says of the client's TLS.
    tls: Option<Box<ClientTls>>,
    buf: IoBuf,
    /// Response bytes to the client.
    out: Vec<u8>,
    /// The request as forwarded upstream: head, plus the body when it is small and complete.
    req: Vec<u8>,
    fields: Vec<Field>,
    resp_fields: Vec<Field>,
    /// The client's address as text, for `x-forwarded-for` and hashing.
    client_ip: IpText,
    peer: SocketAddr,
    /// The keep-alive wait between requests, and the deadline of the response being awaited.
    /// One timer each for the connection's life: moving a deadline later only marks the timer,
    /// where a timer per request would enter and leave the timer wheel every time.
    idle_timer: Pin<Box<Sleep>>,
    response_timer: Pin<Box<Sleep>>,
    /// Resolves when draining starts. Made once per connection: a fresh wait would join and
    /// leave the signal's waiter list every time.
    shutdown: LastingWait,
    /// The last valid Host of the connection: a request that repeats it is not validated again.
    known_host: KnownHost,
    /// The connection's place in `zkroute_connections`.
    counted: Counted,
}

/// What a relayed exchange did to the client connection: what comes next on it, and the body
/// bytes each way.
struct Relayed {
    next: AfterExchange,
    bytes_in: u64,
    bytes_out: u64,
}

/// A client that went away: the connection closes.
const GONE: Relayed = Relayed { next: AfterExchange::Close, bytes_in: 0, bytes_out: 0 };

/// What an exchange came to, for the access log.
#[derive(Default)]
struct ExchangeRecord {
    status: u16,
    upstream: Option<crate::routing::Addr>,
    bytes_in: u64,
    bytes_out: u64,
    /// The `x-request-id` forwarded, when the access log is on.
    request_id: Option<String>,
    /// A gRPC call's status, when it ended with one.
    grpc_status: Option<u16>,
}

/// The request line's parts, copied for the access log (only when it is on).
struct RequestLine {
    method: String,
    host: String,
    path: String,
}

impl RequestLine {
    fn capture(buf: &[u8], head: &RequestHead) -> Self {
        RequestLine {
            method: head.method.as_str().to_owned(),
            host: head.route_host(buf).unwrap_or("-").to_owned(),
            path: String::from_utf8_lossy(&buf[head.target.clone()]).into_owned(),
        }
    }
}

/// The request body still to come from the client.
enum Pending {
    None,
    Length(u64),
    Chunked(ChunkedScanner),
}

impl Connection {
    pub fn new(
        ctx: Arc<HttpContext>,
        stream: impl Into<ClientStream>,
        peer: SocketAddr,
        buf: IoBuf,
        counted: Counted,
    ) -> Self {
        Connection {
            counted,
            stream: stream.into(),
            tls: None,
            buf,
            // Allocated with the first complete head (`prepare_exchange`): a client that never
            // sends one, slow or idle, does not hold them.
            out: Vec::new(),
            req: Vec::new(),
            fields: Vec::with_capacity(32),
            resp_fields: Vec::new(),
            client_ip: IpText::new(peer.ip()),
            peer,
            idle_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            response_timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            shutdown: LastingWait::new(ctx.shutdown.clone()),
            ctx,
            known_host: KnownHost::default(),
        }
    }

    /// A connection that came over TLS: requests go upstream with `x-forwarded-proto: https`,
    /// and with the client certificate's `x-forwarded-client-cert` if `tls` holds one.
    pub fn with_tls(mut self, tls: ClientTls) -> Self {
        self.tls = Some(Box::new(tls));
        self
    }

    /// Serves requests until the client or the proxy closes the connection.
    pub async fn run(mut self) {
        loop {
            let head = match self.read_head().await {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => {
                    self.answer(&e, true, false).await;
                    return;
                }
            };
            self.counted.set(ConnState::Active);
            self.prepare_exchange();
            // The exchange is awaited here and not in a function of its own: each poll of a
            // request goes through one future less.
            let started = Instant::now();
            let line = self.ctx.access_log.as_ref().map(|_| RequestLine::capture(self.buf.filled(), &head));
            let (next, done) = self.proxy_request(&head, started).await;
            if let Some(line) = line {
                self.log(&line, &done, started);
            }
            if next == AfterExchange::Close || self.ctx.shutdown.is_triggered() {
                // Dropping the stream closes it, and the FIN follows the response just as after a
                // `shutdown`, which would cost a system call more per connection.
                return;
            }
        }
    }

    /// The vectors an exchange writes, allocated once, with the connection's first complete head.
    #[inline]
    fn prepare_exchange(&mut self) {
        if self.req.capacity() == 0 {
            self.out.reserve(1024);
            self.req.reserve(1024);
            self.resp_fields.reserve(32);
        }
    }

    /// Waits for the next request head: idle keep-alive time for its first byte, then the header
    /// timeout for the rest. None when the client closed or idled out between requests.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, ProxyError> {
        let limits = &self.ctx.limits;
        let mut header_deadline = None;
        loop {
            if !self.buf.is_empty() {
                match head::parse_request_on(self.buf.filled(), &mut self.fields, &mut self.known_host)? {
                    Parse::Complete(h) => return Ok(Some(h)),
                    Parse::Partial => {
                        self.counted.set(ConnState::ReadingHead);
                        if self.buf.len() >= limits.max_header_bytes {
                            return Err(ProxyError::HeadersTooLarge);
                        }
                        if self.buf.is_full() {
                            self.buf.grow(larger_for_head(self.buf.capacity(), limits));
                        }
                    }
                }
            }
            let read = match header_deadline {
                Some(d) => timeout_at(d, self.buf.read_from(&mut self.stream)).await,
                None if self.buf.is_empty() => {
                    // Between requests: idle, or draining. The read buffer is kept for a next
                    // request that comes soon (the keep-alive path allocates nothing) and given
                    // back once the wait lasts `BUFFER_HOLD`: a held connection has no buffer.
                    self.counted.set(ConnState::Idle);
                    let now = tokio::time::Instant::now();
                    let idle_end = now + limits.idle_timeout;
                    let plain = match &self.stream {
                        ClientStream::Plain(s) => s,
                        // TLS may hold decrypted bytes the socket no longer shows: read (into
                        // the buffer, which stays).
                        ClientStream::Tls(_) => {
                            self.idle_timer.as_mut().reset(idle_end);
                            tokio::select! {
                                biased;
                                r = self.buf.read_from(&mut self.stream) => match r {
                                    Ok(0) | Err(_) => return Ok(None),
                                    Ok(_) => continue,
                                },
                                _ = self.idle_timer.as_mut() => return Ok(None),
                                _ = self.shutdown.triggered(&self.ctx.shutdown) => return Ok(None),
                            }
                        }
                    };
                    let mut holding = self.buf.capacity() != 0 && BUFFER_HOLD < limits.idle_timeout;
                    self.idle_timer.as_mut().reset(if holding { now + BUFFER_HOLD } else { idle_end });
                    loop {
                        tokio::select! {
                            biased;
                            r = plain.readable() => {
                                if r.is_err() {
                                    return Ok(None);
                                }
                                break;
                            }
                            _ = self.idle_timer.as_mut() => {
                                if !holding {
                                    return Ok(None);
                                }
                                holding = false;
                                self.buf.release();
                                self.idle_timer.as_mut().reset(idle_end);
                            }
                            // Completes once: the connection ends with it.
                            _ = self.shutdown.triggered(&self.ctx.shutdown) => return Ok(None),
                        }
                    }
                    // A head's first bytes are here. Most heads come whole in this read, so the
                    // header timeout is armed only if it waits, or (below) if another is needed.
                    timeout(limits.header_read_timeout, self.buf.read_from(&mut self.stream)).await
                }
                None => {
                    let d = tokio::time::Instant::now() + limits.header_read_timeout;
                    header_deadline = Some(d);
                    timeout_at(d, self.buf.read_from(&mut self.stream)).await
                }
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(ProxyError::BadRequest("incomplete request head"))
                    };
                }
                Ok(Ok(_)) => {}
                Err(_) => return Err(ProxyError::HeaderTimeout),
            }
        }
    }

    /// Answers a first request head that [`first_head`] found wanting, and closes.
    pub async fn refuse(mut self, err: ProxyError) {
        self.answer(&err, true, false).await;
    }

    /// Writes an answer of the proxy's own.
    async fn answer(&mut self, err: &ProxyError, close: bool, head_only: bool) {
        self.out.clear();
        error::write_answer(&mut self.out, err, close, head_only);
        let _ = timeout(self.ctx.limits.idle_timeout, write_flush(&mut self.stream, &self.out)).await;
        // The next response head is written after whatever `out` holds.
        self.out.clear();
    }

    /// Logs an exchange that began at `started`, when the access log is on.
    #[inline(never)]
    fn log(&self, line: &RequestLine, done: &ExchangeRecord, started: Instant) {
        if let Some(log) = &self.ctx.access_log {
            log.record(&access_log::Entry {
                time: std::time::SystemTime::now(),
                listener: &self.ctx.name,
                client: Some(self.peer),
                method: &line.method,
                host: &line.host,
                path: &line.path,
                status: done.status,
                upstream: done.upstream.as_ref().map(|a| a.to_string()),
                duration: started.elapsed(),
                bytes_in: done.bytes_in,
                bytes_out: done.bytes_out,
                request_id: done.request_id.as_deref(),
                grpc_status: done.grpc_status,
            });
        }
    }

    async fn proxy_request(&mut self, head: &RequestHead, started: Instant) -> (AfterExchange, ExchangeRecord) {
        let head_only = head.method == http::Method::HEAD;
        let mut done = ExchangeRecord::default();
        let target = match self.route(head) {
            Ok(t) => t,
            Err((e, stats)) => {
                let close = head.close || head.body != BodyLen::None;
                done.status = e.rescue().status;
                if let Some(stats) = stats {
                    stats.observe(done.status, started.elapsed());
                }
                self.answer(&e, close, head_only).await;
                return (if close { AfterExchange::Close } else { self.skip_head(head) }, done);
            }
        };
        let route = target.route();
        let fields = Fields { buf: self.buf.filled(), fields: &self.fields };
        if let Err(e) = rate_limit(route, |name| fields.get(name.as_str().as_bytes()), &self.client_ip) {
            let close = head.close || head.body != BodyLen::None;
            done.status = e.rescue().status;
            target.stats.observe(done.status, started.elapsed());
            self.answer(&e, close, head_only).await;
            return (if close { AfterExchange::Close } else { self.skip_head(head) }, done);
        }
        // A tag-routed service: the endpoints of the request's tag.
        let set = target.set.for_request(&fields);
        let hash = hash_key(&set.policy.lb, |name| fields.get(name.as_str().as_bytes()), &self.client_ip);
        if to_h2::all_h2(set) {
            let next = self.proxy_h2(head, route, &target, set, hash, started, &mut done).await;
            return (next, done);
        }

        // The request as forwarded, and as much of its body as has arrived with the head.
        self.req.clear();
        let hostless = if head.host.is_none() && head.authority.is_none() {
            head::host_for_hostless(&target.backend)
        } else {
            String::new()
        };
        let rule = route.rule.as_deref();
        let (buf, client_ip) = (self.buf.filled(), self.client_ip.as_bytes());
        let drop_underscore = self.ctx.limits.drop_underscore_headers;
        let secure = self.tls.as_deref().map(|t| head::Secure { client_cert: t.forwarded_client_cert.as_deref() });
        match rule.and_then(|r| r.request_headers.as_deref()) {
            None => head::write_request_as(
                &mut self.req,
                buf,
                head,
                &self.fields,
                client_ip,
                drop_underscore,
                secure,
                hostless.as_bytes(),
            ),
            Some(edits) => head::write_request_edited(
                &mut self.req,
                buf,
                head,
                &self.fields,
                client_ip,
                drop_underscore,
                secure,
                hostless.as_bytes(),
                edits,
            ),
        }
        // Borrowed from the route, which outlives the exchange.
        let response_edits = rule.and_then(|r| r.response_headers.as_deref());
        if self.ctx.limits.request_id {
            let fields = Fields { buf: self.buf.filled(), fields: &self.fields };
            let id = match fields.get(b"x-request-id") {
                Some(id) => String::from_utf8_lossy(id).into_owned(),
                None => {
                    let id = edit::new_request_id();
                    edit::insert_field(&mut self.req, b"x-request-id", id.as_bytes());
                    id
                }
            };
            if self.ctx.access_log.is_some() {
                done.request_id = Some(id);
            }
        }
        let head_out = self.req.len();
        self.buf.consume(head.len);
        let mut pending = match head.body {
            BodyLen::None | BodyLen::UntilClose => Pending::None,
            BodyLen::Length(n) => {
                let take = (self.buf.len() as u64).min(n) as usize;
                self.req.extend_from_slice(&self.buf.filled()[..take]);
                self.buf.consume(take);
                if take as u64 == n {
                    Pending::None
                } else {
                    // The rest streams through the buffer: in reads of its full size.
                    self.buf.at_least(CLIENT_BUF);
                    Pending::Length(n - take as u64)
                }
            }
            BodyLen::Chunked => {
                let mut scanner = ChunkedScanner::default();
                match scanner.scan(self.buf.filled(), |_| {}) {
                    Ok(used) => {
                        self.req.extend_from_slice(&self.buf.filled()[..used]);
                        self.buf.consume(used);
                    }
                    Err(_) => {
                        done.status = 400;
                        target.stats.observe(400, started.elapsed());
                        self.answer(&ProxyError::BadRequest("malformed chunked body"), true, head_only).await;
                        return (AfterExchange::Close, done);
                    }
                }
                if scanner.is_done() {
                    Pending::None
                } else {
                    self.buf.at_least(CLIENT_BUF);
                    Pending::Chunked(scanner)
                }
            }
        };

        done.bytes_in = (self.req.len() - head_out) as u64;
        let deadline = tokio::time::Instant::from_std(started + route.timeout);
        let mut attempts = Attempts::new(&target, set, hash, route.retries, started, Some(deadline))
            .with_per_try_timeout(route.per_try_timeout);
        loop {
            let ctx = &*self.ctx;
            let tls = TlsOrigin::for_set(set, ctx.upstream_tls.as_ref(), &ctx.metrics, Alpn::Http1);
            let connector = PooledHttp1::new(&ctx.pools, &ctx.limits.congestion, started).with_tls(tls);
            // Taken as it comes: a `match` rebuilding the `Some` would copy the connection.
            let mut connected = attempts.reuse(&connector);
            if connected.is_none() {
                connected = attempts.connection(&connector, &ctx.health).await;
            }
            let Some(Connected { attempt, in_flight, conn }) = connected else { break };
            let pool = ctx.pools.of(&attempt.endpoint.state);
            if ctx.access_log.is_some() {
                done.upstream = Some(attempt.endpoint.addr.clone());
            }
            let may_retry = attempts.may_retry();
            let (try_deadline, cut) = attempts.try_deadline(deadline);
            let retry = (may_retry, cut);
            let outcome =
                self.forward(conn, head, &mut pending, try_deadline, retry, in_flight, pool, response_edits).await;
            if let Some((status, relayed)) = attempts.settle(attempt, outcome, &self.ctx.health) {
                done.status = status;
                done.bytes_in += relayed.bytes_in;
                done.bytes_out = relayed.bytes_out;
                return (if head.close { AfterExchange::Close } else { relayed.next }, done);
            }
        }
        let error = attempts.failure();
        done.status = error.rescue().status;
        let close = head.close || !matches!(pending, Pending::None);
        self.answer(&error, close, head_only).await;
        (if close { AfterExchange::Close } else { AfterExchange::KeepAlive }, done)
    }

    /// Drops a request that was answered without forwarding (it had no body).
    fn skip_head(&mut self, head: &RequestHead) -> AfterExchange {
        self.buf.consume(head.len);
        AfterExchange::KeepAlive
    }

    /// Matches the request to a route and picks the target, which holds the route (one count of
    /// it taken per request, not two).
    #[allow(clippy::type_complexity)]
    fn route(&self, head: &RequestHead) -> Result<TargetRef, (ProxyError, Option<Arc<dyn TargetStats>>)> {
        let guard = self.ctx.routes.load();
        let Some(table) = guard.as_ref() else { return Err((ProxyError::NotReady, None)) };
        let Some(listener) = table.listener(self.ctx.listener) else { return Err((ProxyError::NotReady, None)) };
        let buf = self.buf.filled();
        let headers = Fields { buf, fields: &self.fields };
        let Some(route) = listener.route_by_bytes(head.route_host_bytes(buf), head.path(buf), &head.method, &headers)
        else {
            return Err((ProxyError::NoRoute, Some(listener.no_route.clone())));
        };
        choose_target(route, &headers).ok_or_else(|| {
            let stats = route.targets.first().map(|t| t.stats.clone());
            (ProxyError::NoHealthyUpstream, stats)
        })
    }

    /// Sends the request on `conn` and relays the response. `may_retry`: the caller can try
    /// another endpoint, so a failure that left the client untouched comes back as `Retry`;
    /// `per_try`: `deadline` is the try's own, sooner than the request's, so running out of it
    /// is such a failure too.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        mut conn: Conn,
        head: &RequestHead,
        pending: &mut Pending,
        deadline: tokio::time::Instant,
        (may_retry, per_try): (bool, bool),
        in_flight: InFlight,
        pool: Option<&Arc<upstream::Pool>>,
        response_edits: Option<&HeaderEdits>,
    ) -> Outcome<(u16, Relayed)> {
        // Nothing has been read of the client's body beyond what `req` holds: sending `req`
        // again is the same request.
        let replayable = matches!(pending, Pending::None);
        let idempotent = head.is_idempotent();
        match timeout_at(deadline, write_flush(&mut conn.stream, &self.req)).await {
            Ok(Ok(())) => {}
            // The upstream did not take the request (a pooled connection it had closed, or a
            // reset): nothing was acted on, and the client's body is still unread.
            Ok(Err(_)) => return Outcome::Retry(ProxyError::UpstreamReset),
            Err(_) => return Outcome::Fail { error: ProxyError::Timeout, upstream_fault: true },
        }
        let limits = &self.ctx.limits;
        let idle = limits.idle_timeout;
        let head_request = head.method == http::Method::HEAD;
        let client_minor = head.minor;
        let Connection { stream, buf, out, resp_fields, response_timer, counted, .. } = self;
        response_timer.as_mut().reset(deadline);
        let mut pumped = 0u64;
        let (mut ds_r, mut ds_w) = stream.split();
        let (mut us_r, mut us_w) = conn.stream.split();

        // The rest of the request body (or, without one, a watch for the client going away) runs
        // alongside the wait for the response head.
        let mut body_done = replayable;
        let read = {
            let pump = pump_request(&mut ds_r, buf, &mut us_w, pending, idle, &mut pumped);
            let read = read_response(
                &mut us_r,
                &mut conn.buf,
                resp_fields,
                head_request,
                response_timer.as_mut(),
                &mut ds_w,
                client_minor,
                out,
            );
            tokio::pin!(pump);
            tokio::pin!(read);
            let mut pumping = true;
            loop {
                tokio::select! {
                    biased;
                    r = &mut read => break r,
                    p = &mut pump, if pumping => {
                        pumping = false;
                        match p {
                            Ok(()) => body_done = true,
                            Err(PumpError::ClientGone) => return Outcome::ClientGone((499, GONE)),
                            // The upstream stopped reading: its response may still come.
                            Err(PumpError::Upstream) => {}
                            // The client's fault: the upstream is not blamed for it.
                            Err(PumpError::BadBody) => {
                                return Outcome::Fail {
                                    error: ProxyError::BadRequest("malformed chunked body"),
                                    upstream_fault: false,
                                };
                            }
                        }
                    }
                }
            }
        };
        let retry_or_fail = |error| {
            if may_retry && replayable && idempotent {
                Outcome::Retry(error)
            } else {
                Outcome::Fail { error, upstream_fault: true }
            }
        };
        let resp = match read {
            Ok(r) => r,
            Err(ReadError::Timeout) if per_try && body_done => return retry_or_fail(ProxyError::Timeout),
            // The upstream's fault only if it had the whole request: a client still sending its
            // body when the time ran out may have been the slow one.
            Err(ReadError::Timeout) => return Outcome::Fail { error: ProxyError::Timeout, upstream_fault: body_done },
            Err(ReadError::Closed | ReadError::Invalid) => return retry_or_fail(ProxyError::UpstreamReset),
            Err(ReadError::Client) => return Outcome::ClientGone((499, GONE)),
        };
        if resp.status == 101 && !head.upgrade {
            // A switch the client never asked for (RFC 9110 section 7.8): the connection now
            // speaks something else, so it is dropped, and the answer is an invalid response.
            return retry_or_fail(ProxyError::UpstreamReset);
        }
        if may_retry && replayable && idempotent && matches!(resp.status, 502..=504) {
            // Let another endpoint answer an idempotent request this one failed.
            return Outcome::Retry(ProxyError::UpstreamReset);
        }

        let upgrade = resp.status == 101 && head.upgrade;
        let dechunk = client_minor == 0 && resp.body == BodyLen::Chunked;
        let client_close = head.close
            || !body_done
            || dechunk
            || resp.body == BodyLen::UntilClose
            || (client_minor == 0 && !head.keep_alive);
        let mode = ResponseMode {
            close: client_close && !upgrade,
            keep_alive_10: client_minor == 0 && head.keep_alive && !client_close,
            drop_te: client_minor == 0,
            upgrade,
        };
        match response_edits {
            None => head::write_response_head(out, conn.buf.filled(), &resp, resp_fields, mode),
            Some(edits) => head::write_response_edited(out, conn.buf.filled(), &resp, resp_fields, mode, edits),
        }
        conn.buf.consume(resp.len);
        let status = resp.status;
        let mut bytes_out = 0u64;
        match relay_body(&mut us_r, &mut conn.buf, &mut ds_w, out, resp.body, dechunk, idle, &mut bytes_out).await {
            Ok(()) => {}
            Err(RelayError::Malformed) => {
                out.clear();
                return retry_or_fail(ProxyError::UpstreamReset);
            }
            Err(RelayError::Source) => {
                let relayed = Relayed { next: AfterExchange::Close, bytes_in: pumped, bytes_out };
                return Outcome::Answered { status, upstream_fault: true, value: (status, relayed) };
            }
            Err(RelayError::Destination) => {
                // The client stopped reading: the upstream did its part.
                let relayed = Relayed { next: AfterExchange::Close, bytes_in: pumped, bytes_out };
                return Outcome::Answered { status: 499, upstream_fault: false, value: (499, relayed) };
            }
        }
        if upgrade {
            drop(in_flight);
            counted.set(ConnState::Tunnel);
            let moved = RelayedBytes::default();
            // Boxed: a tunnel's state is large and rare, and inline it would be part of, and copied
            // with, every connection's future.
            Box::pin(tunnel(stream, buf, conn, limits, &moved)).await;
            let relayed = Relayed {
                next: AfterExchange::Close,
                bytes_in: pumped + moved.rx.load(Ordering::Relaxed),
                bytes_out: bytes_out + moved.tx.load(Ordering::Relaxed),
            };
            return Outcome::Answered { status, upstream_fault: false, value: (status, relayed) };
        }
        drop(in_flight);
        if body_done && !resp.close && conn.buf.is_empty() {
            if let Some(pool) = pool {
                pool.checkin(conn);
            }
        }
        let next = if client_close { AfterExchange::Close } else { AfterExchange::KeepAlive };
        let relayed = Relayed { next, bytes_in: pumped, bytes_out };
        Outcome::Answered { status, upstream_fault: status >= 500, value: (status, relayed) }
    }
}

/// The next size of a read buffer too small for the head it holds: [`CLIENT_BUF`], then the
/// header limit.
fn larger_for_head(capacity: usize, limits: &Limits) -> usize {
    if capacity < CLIENT_BUF { CLIENT_BUF } else { limits.max_header_bytes.max(CLIENT_BUF) }
}

/// Reads the rest of a new connection's first request head into `buf` before the engine's
/// connection exists: a slow client that has sent part of a head holds its task and a small
/// buffer, not the engine's state (docs/PERFORMANCE.md, "Memory per held connection"). Ok when
/// the engine takes over (the head is whole, or malformed, or too large: the engine's parse
/// finds out which); an error for [`Connection::refuse`] when the client left or ran out of time.
/// `deadline` is the header timeout if it has begun.
pub(super) async fn first_head(
    stream: &mut ClientStream,
    buf: &mut IoBuf,
    counted: &mut Counted,
    limits: &Limits,
    mut deadline: Option<tokio::time::Instant>,
) -> Result<(), ProxyError> {
    loop {
        let filled = buf.filled();
        if may_hold_whole_head(filled)
            || !matches!(head::parse_request(filled, &mut Vec::new()), Ok(Parse::Partial))
            || filled.len() >= limits.max_header_bytes
        {
            return Ok(());
        }
        if buf.is_full() {
            buf.grow(larger_for_head(buf.capacity(), limits));
        }
        counted.set(ConnState::ReadingHead);
        let d = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + limits.header_read_timeout);
        match timeout_at(d, buf.read_from(stream)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(ProxyError::BadRequest("incomplete request head")),
            Ok(Ok(_)) => {}
            Err(_) => return Err(ProxyError::HeaderTimeout),
        }
    }
}

/// Whether `bytes` may hold a whole head: they have a blank line (httparse ends a line at `\n`
/// or `\r\n`). Most heads come whole and end the bytes read.
fn may_hold_whole_head(bytes: &[u8]) -> bool {
    bytes.ends_with(b"\r\n\r\n")
        || memchr::memmem::find(bytes, b"\n\r\n").is_some()
        || memchr::memmem::find(bytes, b"\n\n").is_some()
}

enum PumpError {
    ClientGone,
    Upstream,
    BadBody,
}

/// Streams the rest of the request body to the upstream; with no body, watches the client so
/// that a client that goes away cancels the upstream request.
async fn pump_request<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    ds: &mut R,
    buf: &mut IoBuf,
    us: &mut W,
    pending: &mut Pending,
    idle: Duration,
    pumped: &mut u64,
) -> Result<(), PumpError> {
    loop {
        match pending {
            Pending::None => {
                // Watch: bytes that arrive are the next (pipelined) request; EOF is a client gone.
                if buf.is_full() {
                    return std::future::pending().await;
                }
                match buf.read_from(ds).await {
                    Ok(0) | Err(_) => return Err(PumpError::ClientGone),
                    Ok(_) => continue,
                }
            }
            Pending::Length(n) => {
                if !buf.is_empty() {
                    let take = (buf.len() as u64).min(*n) as usize;
                    write_flush(us, &buf.filled()[..take]).await.map_err(|_| PumpError::Upstream)?;
                    buf.consume(take);
                    *pumped += take as u64;
                    *n -= take as u64;
                    if *n == 0 {
                        *pending = Pending::None;
                        return Ok(());
                    }
                }
            }
            Pending::Chunked(scanner) => {
                if !buf.is_empty() {
                    let used = scanner.scan(buf.filled(), |_| {}).map_err(|_| PumpError::BadBody)?;
                    write_flush(us, &buf.filled()[..used]).await.map_err(|_| PumpError::Upstream)?;
                    buf.consume(used);
                    *pumped += used as u64;
                    if scanner.is_done() {
                        *pending = Pending::None;
                        return Ok(());
                    }
                }
            }
        }
        match timeout(idle, buf.read_from(ds)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err(PumpError::ClientGone),
            Ok(Ok(_)) => {}
        }
    }
}

enum ReadError {
    Timeout,
    Closed,
    Invalid,
    Client,
}

/// Reads the final response head; interim (1xx) responses are passed to the client.
#[allow(clippy::too_many_arguments)]
async fn read_response<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    us: &mut R,
    buf: &mut IoBuf,
    fields: &mut Vec<Field>,
    head_request: bool,
    mut deadline: Pin<&mut Sleep>,
    ds: &mut W,
    client_minor: u8,
    out: &mut Vec<u8>,
) -> Result<ResponseHead, ReadError> {
    loop {
        if !buf.is_empty() {
            match head::parse_response(buf.filled(), fields, head_request) {
                Ok(Parse::Complete(h)) if h.is_interim() => {
                    if client_minor >= 1 {
                        out.clear();
                        let mode = ResponseMode { close: false, keep_alive_10: false, drop_te: false, upgrade: false };
                        head::write_response_head(out, buf.filled(), &h, fields, mode);
                        // Within the route's timeout like the rest of the wait. A client that does
                        // not take an interim answer in time may have part of it: the exchange
                        // ends there, unanswered.
                        tokio::select! {
                            biased;
                            w = write_flush(ds, out) => w.map_err(|_| ReadError::Client)?,
                            _ = deadline.as_mut() => return Err(ReadError::Client),
                        }
                        out.clear();
                    }
                    buf.consume(h.len);
                    continue;
                }
                Ok(Parse::Complete(h)) => return Ok(h),
                Ok(Parse::Partial) if buf.len() >= head::MAX_RESPONSE_HEAD => return Err(ReadError::Invalid),
                Ok(Parse::Partial) => {
                    if buf.is_full() {
                        buf.grow(head::MAX_RESPONSE_HEAD);
                    }
                }
                Err(_) => return Err(ReadError::Invalid),
            }
        }
        let read = tokio::select! {
            biased;
            r = buf.read_from(us) => r,
            _ = deadline.as_mut() => return Err(ReadError::Timeout),
        };
        match read {
            Ok(0) | Err(_) => return Err(ReadError::Closed),
            Ok(_) => {}
        }
    }
}

enum RelayError {
    /// The body was malformed before anything went to the client: the response is invalid.
    Malformed,
    Source,
    Destination,
}

/// Streams a body from `src` to `dst`; the first write carries `head` too.
#[allow(clippy::too_many_arguments)]
async fn relay_body<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    buf: &mut IoBuf,
    dst: &mut W,
    head: &mut Vec<u8>,
    len: BodyLen,
    dechunk: bool,
    idle: Duration,
    sent: &mut u64,
) -> Result<(), RelayError> {
    let mut remaining = match len {
        BodyLen::Length(n) => n,
        _ => 0,
    };
    let mut scanner = ChunkedScanner::default();
    let mut first = true;
    loop {
        // Take what the buffer holds of the body.
        let (take, done) = match len {
            BodyLen::None => (0, true),
            BodyLen::Length(_) => {
                let take = (buf.len() as u64).min(remaining) as usize;
                remaining -= take as u64;
                (take, remaining == 0)
            }
            BodyLen::Chunked => {
                let filled = buf.filled();
                let malformed = |_| if first { RelayError::Malformed } else { RelayError::Source };
                if dechunk {
                    let used = scanner.scan(filled, |r| head.extend_from_slice(&filled[r])).map_err(malformed)?;
                    buf.consume(used);
                    (0, scanner.is_done())
                } else {
                    let used = scanner.scan(filled, |_| {}).map_err(malformed)?;
                    (used, scanner.is_done())
                }
            }
            BodyLen::UntilClose => (buf.len(), false),
        };
        if first || take > 0 || !head.is_empty() {
            let write = if (first || !head.is_empty()) && take <= COALESCE_BODY {
                head.extend_from_slice(&buf.filled()[..take]);
                let r = timeout(idle, write_flush(dst, head)).await;
                head.clear();
                r
            } else {
                if !head.is_empty() {
                    match timeout(idle, write_flush(dst, head)).await {
                        Ok(Ok(())) => {}
                        _ => return Err(RelayError::Destination),
                    }
                    head.clear();
                }
                timeout(idle, write_flush(dst, &buf.filled()[..take])).await
            };
            match write {
                Ok(Ok(())) => {}
                _ => return Err(RelayError::Destination),
            }
            *sent += take as u64;
            buf.consume(take);
            first = false;
        }
        if done {
            return Ok(());
        }
        match timeout(idle, buf.read_from(src)).await {
            Ok(Ok(0)) => {
                return if len == BodyLen::UntilClose { Ok(()) } else { Err(RelayError::Source) };
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return Err(RelayError::Source),
        }
    }
}

/// After a 101: a relayed connection, as on a TCP listener (half-close honoured), closed after
/// `limits.tcp_idle_timeout` without a byte either way, as HAProxy's `timeout tunnel` does. What
/// either side sent beyond the handshake goes first. Body bytes each way are added to `moved`.
async fn tunnel(
    client: &mut ClientStream,
    client_buf: &mut IoBuf,
    mut conn: Conn,
    limits: &Limits,
    moved: &RelayedBytes,
) {
    let idle = limits.tcp_idle_timeout;
    if !client_buf.is_empty() {
        if !matches!(timeout(idle, write_flush(&mut conn.stream, client_buf.filled())).await, Ok(Ok(()))) {
            return;
        }
        moved.rx.fetch_add(client_buf.len() as u64, Ordering::Relaxed);
        client_buf.consume(client_buf.len());
        moved.touch();
    }
    if !conn.buf.is_empty() {
        if !matches!(timeout(idle, write_flush(client, conn.buf.filled())).await, Ok(Ok(()))) {
            return;
        }
        moved.tx.fetch_add(conn.buf.len() as u64, Ordering::Relaxed);
        conn.buf.consume(conn.buf.len());
        moved.touch();
    }
    match (client, &mut conn.stream) {
        (Stream::Plain(client), Stream::Plain(upstream)) => {
            let _ = relay(client, upstream, idle, &limits.tcp_relay_memory, None, moved).await;
        }
        (client, upstream) => {
            let _ = crate::proxy::tcp::relay_io(client, upstream, idle, None, moved).await;
        }
    }
}

/// Writes `bytes` whole and flushes: TLS keeps what the socket would not take until flushed,
/// where a socket's flush is a no-op. One future polling both, where `write_all` then `flush`
/// would be three state machines on every write of the request path.
fn write_flush<'a, W: AsyncWrite + Unpin>(
    w: &'a mut W,
    mut bytes: &'a [u8],
) -> impl Future<Output = std::io::Result<()>> + 'a {
    std::future::poll_fn(move |cx| {
        while !bytes.is_empty() {
            let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, bytes))?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            bytes = &bytes[n..];
        }
        Pin::new(&mut *w).poll_flush(cx)
    })
}
