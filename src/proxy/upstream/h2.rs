//! HTTP/2 to upstreams (README: "gRPC and HTTP/2 upstreams"): a few hyper HTTP/2 client
//! connections per endpoint, shared by every client connection and opened as streams need them.
//! A connection takes new streams while it has fewer open than the upstream's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; once every one is full (or closing after a GOAWAY) a new one
//! is made. A GOAWAY drains its connection: hyper keeps the streams the upstream accepted, and the
//! connection is dropped from the set once it closes. The set lives in the endpoint's pool
//! (outside the routing table), so connections survive table swaps while the endpoint remains.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::super::attempt::ConnectTimeout;
use super::super::stream::UpstreamStream;
use super::TlsOrigin;
use crate::net::LoopbackCongestion;
use crate::routing::table::Endpoint;

/// Streams a connection takes before the upstream's SETTINGS say how many it allows (RFC 9113
/// section 6.5.2 recommends at least 100).
const INITIAL_STREAMS: usize = 100;
/// A request body kept for a retry up to this size; a longer one is not sent again.
const REPLAY_LIMIT: usize = 64 * 1024;

/// One HTTP/2 connection to an endpoint.
struct H2Conn {
    send: SendRequest<RequestBody>,
    /// Streams open on it (a slot is held from the request until its response body ends).
    open: AtomicUsize,
    /// The upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, as the connection last saw it.
    max: Arc<AtomicUsize>,
    /// It runs over TLS (the service's policy said so when it was made).
    tls: bool,
}

impl H2Conn {
    fn usable(&self) -> bool {
        !self.send.is_closed() && self.send.is_ready()
    }

    fn try_claim(self: &Arc<Self>) -> Option<Stream> {
        let max = self.max.load(Ordering::Relaxed).max(1);
        let mut n = self.open.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self.open.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Stream { send: self.send.clone(), conn: self.clone() }),
                Err(now) => n = now,
            }
        }
    }
}

/// A stream slot on a shared connection, held until the exchange is over.
pub struct Stream {
    pub send: SendRequest<RequestBody>,
    conn: Arc<H2Conn>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.conn.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The HTTP/2 connections of one endpoint.
#[derive(Default)]
pub struct H2Conns {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// One connect at a time per endpoint: a burst of requests shares the connection it makes
    /// instead of opening one each.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Conns {
    /// A stream on a connection with room for it, over TLS or not as `tls` says (a policy that
    /// turned TLS on or off leaves the connections of the other kind unused); closed connections
    /// are forgotten.
    pub fn checkout(&self, tls: bool) -> Option<Stream> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.send.is_closed());
        conns.iter().filter(|c| c.tls == tls && c.usable()).find_map(|c| c.try_claim())
    }

    /// A stream on a connection with room, or on a new connection to `endpoint`.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        timeout: ConnectTimeout,
        congestion: &LoopbackCongestion,
        tls: Option<&TlsOrigin<'_>>,
    ) -> io::Result<Stream> {
        let _one = self.connecting.lock().await;
        // Another request may have connected while this one waited.
        if let Some(s) = self.checkout(tls.is_some()) {
            return Ok(s);
        }
        let limit = timeout.get();
        let made = async {
            let tcp = match tls {
                None => UpstreamStream::Plain(crate::net::connect(&endpoint.addr, limit, congestion).await?),
                Some(tls) => tls.connect(endpoint, timeout, congestion).await?,
            };
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_max_send_streams(INITIAL_STREAMS)
                .handshake::<_, RequestBody>(TokioIo::new(tcp))
                .await
                .map_err(io::Error::other)?;
            let max = Arc::new(AtomicUsize::new(INITIAL_STREAMS));
            tokio::spawn(Driven { conn, max: max.clone() });
            Ok::<_, io::Error>(Arc::new(H2Conn { send, open: AtomicUsize::new(0), max, tls: tls.is_some() }))
        };
        let conn = tokio::time::timeout(limit, made)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out"))??;
        let stream = conn.try_claim().ok_or_else(|| io::Error::other("new HTTP/2 connection takes no stream"))?;
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        Ok(stream)
    }
}

/// Drives a connection and keeps its peer's stream limit where [`H2Conns`] reads it.
struct Driven {
    conn: http2::Connection<TokioIo<UpstreamStream>, RequestBody, TokioExecutor>,
    max: Arc<AtomicUsize>,
}

impl Future for Driven {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let r = Pin::new(&mut this.conn).poll(cx);
        this.max.store(this.conn.current_max_send_streams(), Ordering::Relaxed);
        match r {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Whether an HTTP/2 exchange failed before the upstream processed the request, so that it may
/// go to another endpoint: the stream was refused (REFUSED_STREAM), it was beyond a GOAWAY's last
/// stream, or it was never sent (the connection closed first).
pub fn never_processed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2.is_go_away() && h2.is_remote());
        }
        source = s.source();
    }
    false
}

/// A request body sent upstream over HTTP/2: none, or the client's, kept while it is small so
/// that a refused stream can be sent again.
pub enum RequestBody {
    Empty,
    Replay(ReplayBody),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Replay(r) => r.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Replay(r) => r.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Replay(r) => r.size_hint(),
        }
    }
}

/// A client's request body, of any client protocol.
pub type SourceBody = Pin<Box<dyn Body<Data = Bytes, Error = io::Error> + Send>>;

struct Replay {
    source: Option<SourceBody>,
    /// Data sent so far, while it fits [`REPLAY_LIMIT`].
    sent: Vec<Bytes>,
    sent_len: usize,
    trailers: Option<HeaderMap>,
    ended: bool,
    /// False once data beyond the limit went out: the body cannot be sent again.
    replayable: bool,
    hint: SizeHint,
}

/// One sending of a client's body; [`ReplayBody::again`] makes another from what was kept.
pub struct ReplayBody {
    shared: Arc<Mutex<Replay>>,
    next: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    pub fn new(source: SourceBody) -> Self {
        let hint = source.size_hint();
        let ended = source.is_end_stream();
        let replay = Replay {
            source: Some(source),
            sent: Vec::new(),
            sent_len: 0,
            trailers: None,
            ended,
            replayable: true,
            hint,
        };
        ReplayBody { shared: Arc::new(Mutex::new(replay)), next: 0, trailers_sent: false }
    }

    /// The same body from its start, if all of it that was sent is kept.
    pub fn again(&self) -> Option<ReplayBody> {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.replayable.then(|| ReplayBody { shared: self.shared.clone(), next: 0, trailers_sent: false })
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if self.next < s.sent.len() {
            self.next += 1;
            return Poll::Ready(Some(Ok(Frame::data(s.sent[self.next - 1].clone()))));
        }
        if s.ended {
            if !self.trailers_sent {
                self.trailers_sent = true;
                if let Some(t) = s.trailers.clone() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
            }
            return Poll::Ready(None);
        }
        let Some(source) = s.source.as_mut() else { return Poll::Ready(None) };
        match source.as_mut().poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.ended = true;
                s.source = None;
                self.trailers_sent = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if s.replayable && s.sent_len + data.len() <= REPLAY_LIMIT {
                        s.sent_len += data.len();
                        s.sent.push(data.clone());
                        self.next = s.sent.len();
                    } else {
                        s.replayable = false;
                        s.sent.clear();
                        self.next = 0;
                    }
                    if s.source.as_ref().is_some_and(|b| b.is_end_stream()) {
                        s.ended = true;
                        s.source = None;
                        self.trailers_sent = true;
                    }
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                Err(frame) => match frame.into_trailers() {
                    Ok(t) => {
                        s.trailers = Some(t.clone());
                        s.ended = true;
                        s.source = None;
                        self.trailers_sent = true;
                        Poll::Ready(Some(Ok(Frame::trailers(t))))
                    }
                    Err(_) => Poll::Ready(None),
                },
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        s.ended && self.next >= s.sent.len() && (self.trailers_sent || s.trailers.is_none())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared.lock().map(|s| s.hint).unwrap_or_default()
    }
}

/// The body of an HTTP/1.1 or h2c client's request as a [`SourceBody`].
pub fn from_incoming(body: Incoming) -> SourceBody {
    use http_body_util::BodyExt;
    Box::pin(body.map_err(io::Error::other))
}
