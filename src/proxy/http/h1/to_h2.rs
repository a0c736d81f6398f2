//! An HTTP/1.1 client's request to a service whose endpoints all speak HTTP/2: the head becomes
//! an HTTP/2 request, the body (chunked trailers included) streams up through a channel while the
//! response is awaited, and the response goes back chunked with the upstream's trailers as
//! chunked trailer fields (README: "gRPC and HTTP/2 upstreams").

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Uri};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use tokio::io::AsyncRead;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{AfterExchange, Connection, ExchangeRecord, Pending};
use crate::proxy::attempt::{Attempts, Connected, Outcome, TargetRef};
use crate::proxy::error::ProxyError;
use crate::proxy::grpc;
use crate::proxy::http::codec::{BodyLen, ChunkedScanner, IoBuf, Known, push_decimal, write_body_data};
use crate::proxy::http::edit;
use crate::proxy::http::head::RequestHead;
use crate::proxy::lazy_timeout::timeout;
use crate::proxy::upstream::h2::{ReplayBody, RequestBody};
use crate::proxy::upstream::{AnyProtocol, PooledHttp1, TlsOrigin, Upstream};
use crate::routing::documents::HeaderEdits;
use crate::routing::table::{EndpointSet, Route};

type Sent = io::Result<Frame<Bytes>>;

/// The client's body as the HTTP/2 request's, fed by the connection's pump.
struct ChannelBody(mpsc::Receiver<Sent>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;
    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        self.0.poll_recv(cx)
    }
}

/// Reads the client's request body and sends it as frames: the data, then the chunked trailers.
struct Pump {
    pending: Pending,
    /// The bytes after the last data of a chunked body: the last chunk and the trailers.
    tail: Vec<u8>,
    tx: Option<mpsc::Sender<Sent>>,
}

impl Pump {
    fn done(&self) -> bool {
        self.tx.is_none()
    }

    async fn run<R: AsyncRead + Unpin>(&mut self, rd: &mut R, buf: &mut IoBuf) -> io::Result<()> {
        while let Some(tx) = self.tx.as_ref() {
            if buf.is_empty() && !matches!(self.pending, Pending::None) && buf.read_from(rd).await? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "client closed mid-body"));
            }
            let frame = match &mut self.pending {
                Pending::None => None,
                Pending::Length(n) => {
                    let take = (buf.len() as u64).min(*n) as usize;
                    let data = Bytes::copy_from_slice(&buf.filled()[..take]);
                    buf.consume(take);
                    *n -= take as u64;
                    if *n == 0 {
                        self.pending = Pending::None;
                    }
                    Some(Frame::data(data))
                }
                Pending::Chunked(scanner) => {
                    let filled = buf.filled();
                    let mut data = Vec::new();
                    let mut last_data_end = None;
                    let used = scanner
                        .scan(filled, |r| {
                            last_data_end = Some(r.end);
                            data.extend_from_slice(&filled[r]);
                        })
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?;
                    match last_data_end {
                        Some(end) => {
                            self.tail.clear();
                            self.tail.extend_from_slice(&filled[end..used]);
                        }
                        None => self.tail.extend_from_slice(&filled[..used]),
                    }
                    buf.consume(used);
                    let finished = scanner.is_done();
                    if finished {
                        self.pending = Pending::None;
                    }
                    (!data.is_empty()).then(|| Frame::data(Bytes::from(data)))
                }
            };
            if let Some(f) = frame {
                // If the upstream stream is gone, the body is read on all the same, to keep the
                // connection.
                let _ = tx.send(Ok(f)).await;
            }
            if matches!(self.pending, Pending::None) {
                if let Some(trailers) = parse_trailers(&self.tail) {
                    let _ = tx.send(Ok(Frame::trailers(trailers))).await;
                }
                self.tx = None;
            }
        }
        Ok(())
    }
}

/// The trailer fields of a chunked body's end (`\r\n0\r\nname: value\r\n\r\n`), if any.
fn parse_trailers(tail: &[u8]) -> Option<HeaderMap> {
    let mut map = HeaderMap::new();
    let mut lines = tail.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).filter(|l| !l.is_empty());
    // The last chunk's size line comes first.
    lines.next()?;
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
        let name = HeaderName::from_bytes(&line[..colon]);
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            map.append(name, value);
        }
    }
    (!map.is_empty()).then_some(map)
}

/// Whether every endpoint of a set speaks HTTP/2 (HTTP/1.1 clients then reach it over HTTP/2;
/// a set that mixes protocols is reached over HTTP/1.1, as before HTTP/2 upstreams existed).
pub(super) fn all_h2(set: &EndpointSet) -> bool {
    !set.endpoints.is_empty() && set.endpoints.iter().all(crate::proxy::upstream::speaks_h2)
}

impl Connection {
    /// Proxies one request to HTTP/2 endpoints; the head is in the buffer.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn proxy_h2(
        &mut self,
        head: &RequestHead,
        route: &Route,
        target: &TargetRef,
        set: &EndpointSet,
        hash: Option<u64>,
        started: Instant,
        done: &mut ExchangeRecord,
    ) -> AfterExchange {
        let head_only = head.method == http::Method::HEAD;
        let buf = self.buf.filled();
        let host = head.route_host(buf).map(str::to_owned);
        let (mut parts, ()) = Request::new(()).into_parts();
        parts.method = head.method.clone();
        parts.uri = match Uri::try_from(&buf[head.target.clone()]) {
            Ok(u) if u.path().starts_with('/') => u,
            _ => {
                self.answer(&ProxyError::BadRequest("request target"), true, head_only).await;
                return AfterExchange::Close;
            }
        };
        for f in &self.fields {
            let name = &buf[f.name.clone()];
            let keep = match f.kind {
                Known::Other | Known::XForwardedFor => true,
                Known::HopByHop => name.eq_ignore_ascii_case(b"te"),
                _ => false,
            };
            if !keep {
                continue;
            }
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(&buf[f.value.clone()])) {
                parts.headers.append(n, v);
            }
        }
        if let BodyLen::Length(n) = head.body {
            parts.headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let rule = route.rule.as_deref();
        if let Some(edits) = rule.and_then(|r| r.request_headers.as_deref()) {
            edit::edit_map(&mut parts.headers, edits);
        }
        let response_edits = rule.and_then(|r| r.response_headers.as_deref());
        if self.ctx.limits.request_id {
            let id = match parts.headers.get("x-request-id") {
                Some(id) => String::from_utf8_lossy(id.as_bytes()).into_owned(),
                None => {
                    let id = edit::new_request_id();
                    if let Ok(v) = HeaderValue::from_str(&id) {
                        parts.headers.insert("x-request-id", v);
                    }
                    id
                }
            };
            if self.ctx.access_log.is_some() {
                done.request_id = Some(id);
            }
        }
        let is_grpc = grpc::is_grpc(&parts.headers);
        let counter = is_grpc.then(|| grpc::Counter::new(&self.ctx.metrics, &self.ctx.name, &target.set.label));
        self.buf.consume(head.len);

        let has_body = !matches!(head.body, BodyLen::None | BodyLen::Length(0));
        if has_body {
            // The body streams through the buffer: in reads of its full size.
            self.buf.at_least(super::CLIENT_BUF);
        }
        let (tx, rx) = mpsc::channel(8);
        let mut pump = Pump {
            pending: match head.body {
                BodyLen::Length(n) if n > 0 => Pending::Length(n),
                BodyLen::Chunked => Pending::Chunked(ChunkedScanner::default()),
                _ => Pending::None,
            },
            tail: Vec::new(),
            tx: has_body.then_some(tx),
        };
        let mut source = Some(rx);
        let mut replay: Option<ReplayBody> = None;

        let mut timeout_d = route.timeout;
        if let Some(t) = is_grpc.then(|| parts.headers.get(grpc::TIMEOUT)).flatten() {
            if let Some(t) = grpc::parse_timeout(t.as_bytes()) {
                timeout_d = timeout_d.min(t);
            }
        }
        let deadline = tokio::time::Instant::from_std(started + timeout_d);
        let ctx = self.ctx.clone();
        let mut attempts = Attempts::new(target, set, hash, route.retries, started, Some(deadline))
            .with_per_try_timeout(route.per_try_timeout);
        let connector = AnyProtocol::new(PooledHttp1::new(&ctx.pools, &ctx.limits.congestion, started), |alpn| {
            TlsOrigin::for_set(set, ctx.upstream_tls.as_ref(), &ctx.metrics, alpn)
        });
        let drop_underscore = ctx.limits.drop_underscore_headers;
        let tls = self.tls.as_deref();
        let mut pump_failed = false;
        while let Some(Connected { attempt, in_flight, conn }) = attempts.connection(&connector, &ctx.health).await {
            if ctx.access_log.is_some() {
                done.upstream = Some(attempt.endpoint.addr.clone());
            }
            let Upstream::H2(stream) = conn else {
                // The set changed under the request: an HTTP/1.1 endpoint is not for this path.
                let _ = attempts.settle(attempt, Outcome::<()>::Retry(ProxyError::UpstreamReset), &ctx.health);
                continue;
            };
            let body = if !has_body {
                Some(RequestBody::Empty)
            } else if let Some(rx) = source.take() {
                let r = ReplayBody::new(Box::pin(ChannelBody(rx)));
                replay = r.again();
                Some(RequestBody::Replay(r))
            } else {
                replay.as_ref().and_then(ReplayBody::again).map(RequestBody::Replay)
            };
            let Some(body) = body else { break };
            let hostless = if host.is_none() {
                grpc::authority_for_hostless(&target.backend, attempt.endpoint)
            } else {
                String::new()
            };
            let req = grpc::upstream_request(
                &parts,
                host.as_deref(),
                &hostless,
                &self.client_ip,
                (drop_underscore, tls),
                body,
            );
            let (try_deadline, per_try) = attempts.try_deadline(deadline);
            let ex = grpc::Exchange {
                deadline: try_deadline,
                per_try,
                may_retry: attempts.may_retry(),
                replay: replay.as_ref(),
                grpc: counter.clone(),
            };
            let exchange = grpc::exchange(stream, in_flight, req, ex);
            tokio::pin!(exchange);
            let outcome = {
                let (mut rd, _) = self.stream.split();
                let mut pump_on = !pump.done();
                let pumping = pump.run(&mut rd, &mut self.buf);
                tokio::pin!(pumping);
                loop {
                    tokio::select! {
                        biased;
                        o = &mut exchange => break o,
                        r = &mut pumping, if pump_on => {
                            pump_on = false;
                            pump_failed = r.is_err();
                        }
                    }
                }
            };
            if let Some(response) = attempts.settle(attempt, outcome, &ctx.health) {
                done.status = response.status().as_u16();
                return self.relay_h2(response, &mut pump, head, head_only, response_edits, done).await;
            }
        }
        let error = attempts.failure();
        done.status = error.rescue().status;
        if let Some(c) = &counter {
            c.count(grpc::status_of(&error));
            done.grpc_status = Some(u16::from(grpc::status_of(&error)));
        }
        let close = head.close || !pump.done() || pump_failed;
        self.answer(&error, close, head_only).await;
        if close { AfterExchange::Close } else { AfterExchange::KeepAlive }
    }

    /// Writes an HTTP/2 upstream's response to the HTTP/1.1 client: chunked unless its length is
    /// known, trailers as chunked trailer fields; the request body's rest is read meanwhile.
    async fn relay_h2(
        &mut self,
        response: http::Response<grpc::ResponseBody>,
        pump: &mut Pump,
        head: &RequestHead,
        head_only: bool,
        response_edits: Option<&HeaderEdits>,
        done: &mut ExchangeRecord,
    ) -> AfterExchange {
        let (mut parts, mut body) = response.into_parts();
        if let Some(edits) = response_edits {
            edit::edit_map(&mut parts.headers, edits);
        }
        let status = parts.status.as_u16();
        let grpc_status = |h: &HeaderMap| h.get("grpc-status").and_then(|v| v.to_str().ok()?.parse::<u16>().ok());
        done.grpc_status = grpc_status(&parts.headers);
        let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
        let length = parts.headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let chunked = !no_body && length.is_none();
        let out = &mut self.out;
        out.clear();
        out.extend_from_slice(b"HTTP/1.1 ");
        push_decimal(out, u64::from(status));
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
        for (name, value) in &parts.headers {
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if head.close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        let idle = self.ctx.limits.idle_timeout;
        let (mut rd, mut wr) = self.stream.split();
        if !matches!(timeout(idle, wr.write_all(out)).await, Ok(Ok(()))) {
            return AfterExchange::Close;
        }
        let mut complete = no_body;
        let mut pump_on = !pump.done();
        let pumping = pump.run(&mut rd, &mut self.buf);
        tokio::pin!(pumping);
        let mut pump_ok = true;
        let mut chunk_head = Vec::with_capacity(20);
        while !complete {
            let frame = loop {
                tokio::select! {
                    biased;
                    f = timeout(idle, body.frame()) => break f,
                    r = &mut pumping, if pump_on => { pump_on = false; pump_ok = r.is_ok(); }
                }
            };
            let frame = match frame {
                Ok(Some(Ok(f))) => f,
                Ok(None) => {
                    if chunked && timeout(idle, wr.write_all(b"0\r\n\r\n")).await.is_err() {
                        return AfterExchange::Close;
                    }
                    complete = true;
                    continue;
                }
                // A reset or a stall mid-body: the client can only tell from the connection.
                Ok(Some(Err(_))) | Err(_) => return AfterExchange::Close,
            };
            match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    done.bytes_out += data.len() as u64;
                    let write = write_body_data(&mut wr, &mut chunk_head, &data, chunked);
                    if !matches!(timeout(idle, write).await, Ok(Ok(()))) {
                        return AfterExchange::Close;
                    }
                }
                Err(frame) => {
                    let Ok(trailers) = frame.into_trailers() else { continue };
                    done.grpc_status = done.grpc_status.or(grpc_status(&trailers));
                    if chunked {
                        let mut end = b"0\r\n".to_vec();
                        for (name, value) in &trailers {
                            end.extend_from_slice(name.as_str().as_bytes());
                            end.extend_from_slice(b": ");
                            end.extend_from_slice(value.as_bytes());
                            end.extend_from_slice(b"\r\n");
                        }
                        end.extend_from_slice(b"\r\n");
                        if !matches!(timeout(idle, wr.write_all(&end)).await, Ok(Ok(()))) {
                            return AfterExchange::Close;
                        }
                    }
                    complete = true;
                }
            }
        }
        if pump_on {
            // The response is over; the rest of the request body is still read, to keep the
            // connection, within the idle timeout.
            pump_ok = matches!(timeout(idle, &mut pumping).await, Ok(Ok(())));
        }
        if head.close || !pump_ok { AfterExchange::Close } else { AfterExchange::KeepAlive }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_trailers_are_read_from_the_end_of_the_body() {
        let t = parse_trailers(b"\r\n0\r\ngrpc-status: 0\r\nX-Checksum:  abc \r\n\r\n").unwrap();
        assert_eq!(t["grpc-status"], "0");
        assert_eq!(t["x-checksum"], "abc");
        assert!(parse_trailers(b"\r\n0\r\n\r\n").is_none());
        assert!(parse_trailers(b"0;ext=1\r\n\r\n").is_none());
    }
}
