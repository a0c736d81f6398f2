//! HTTP listeners: accept, tell HTTP/1 from HTTP/2 prior knowledge (h2c) by the connection
//! preface, and hand the connection to the engine for its protocol.

pub mod codec;
pub mod edit;
pub mod h1;
pub mod h2;
pub mod head;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpStream;

use crate::net::Listener;

use self::codec::IoBuf;
use super::stream::{ClientStream, ClientTls};
use super::upstream::Pools;
use super::{Limits, Tracker};
use crate::metrics::{ConnGauges, ConnState, Counted, Metrics};
use crate::routing::RouteReader;
use crate::routing::table::ListenerId;
use crate::shutdown::Shutdown;

/// The HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Everything an HTTP listener's connections share.
pub struct HttpContext {
    pub listener: ListenerId,
    pub name: Arc<str>,
    pub routes: RouteReader,
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub tracker: Arc<Tracker>,
    /// Told when passive outlier detection ejects an endpoint.
    pub health: crate::health::HealthReporter,
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
    /// A TLS listener's server side; None serves in clear.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// This sidecar's `[tls]`, for services whose policy turns TLS on (None: it did not load).
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// `zkroute_connections{listener,state}` of this listener.
    pub conn_gauges: ConnGauges,
}

/// Accepts connections until shutdown. The socket may outlive this loop: a configuration reload
/// serves it again with a new context.
pub async fn serve(listener: Arc<Listener>, ctx: Arc<HttpContext>) {
    let c = ctx.clone();
    super::accept_loop(
        &listener,
        &c.name,
        c.limits.max_connections,
        &c.tracker,
        &c.metrics,
        c.shutdown.clone(),
        |s, peer| serve_connection(s, peer, ctx.clone()),
    )
    .await;
}

/// A connection's engine, HTTP/1 or HTTP/2, boxed: its future is large, and inline it would be
/// part of the task of every connection from its accept on, a silent one included.
type Engine = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A connection's task. Written as a function returning an `async` block, as are the two below:
/// an `async fn` keeps each argument twice (beside the local it is moved into), here 72 bytes of
/// the task of every held connection.
#[allow(clippy::manual_async_fn)] // an async block stores its captures once
fn serve_connection(tcp: TcpStream, peer: SocketAddr, ctx: Arc<HttpContext>) -> impl Future<Output = ()> + Send {
    async move {
        let counted = ctx.conn_gauges.count(ConnState::Idle);
        // A client that connects and stays silent holds this task alone: no buffer, no TLS state,
        // and not the state of the rest (boxed below, allocated with the first bytes), which
        // would double the task of every connection (docs/PERFORMANCE.md, "Memory per held
        // connection"). Readiness is polled, not awaited with `readable()`, whose future carries
        // its own waiter (152 bytes): the socket's read waker slot holds the task's.
        let ready = std::future::poll_fn(|cx| tcp.poll_read_ready(cx));
        if !matches!(super::lazy_timeout::timeout(ctx.limits.idle_timeout, ready).await, Ok(Ok(()))) {
            return;
        }
        // The engine is awaited here, once the connection has told its protocol, and not inside
        // the future that found it: each of the many polls of a busy connection's task then goes
        // through one future less to reach it.
        if let Some(engine) = Box::pin(start_connection(tcp, peer, ctx, counted)).await {
            engine.await;
        }
    }
}

/// The TLS handshake on a TLS listener, then the engine for the protocol the client speaks.
#[allow(clippy::manual_async_fn)] // an async block stores its captures once
fn start_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    counted: Counted,
) -> impl Future<Output = Option<Engine>> + Send {
    async move {
        let Some(tls) = ctx.tls.clone() else {
            return engine_for(ClientStream::Plain(tcp), peer, ctx, None, counted).await;
        };
        // Boxed on its own: the engine's start does not carry the handshake's state after it.
        match Box::pin(super::stream::accept_tls(&tls, tcp, ctx.limits.header_read_timeout)).await {
            Ok((stream, info)) => engine_for(stream, peer, ctx, Some(info), counted).await,
            Err(e) => {
                ctx.metrics.tls_handshake_errors.with_label_values(&[&ctx.name]).inc();
                tracing::debug!(listener = %ctx.name, client = %peer, error = %e, "TLS handshake failed");
                None
            }
        }
    }
}

/// Reads a connection's first bytes and returns the engine for them: HTTP/2 after its preface,
/// HTTP/1 otherwise. None when the client sent nothing in time.
#[allow(clippy::manual_async_fn)] // an async block stores its captures once
fn engine_for(
    mut stream: ClientStream,
    peer: SocketAddr,
    ctx: Arc<HttpContext>,
    tls: Option<ClientTls>,
    mut counted: Counted,
) -> impl Future<Output = Option<Engine>> + Send {
    async move {
        let mut buf = IoBuf::lazy(h1::FIRST_BUF);
        let first = async {
            if let ClientStream::Plain(tcp) = &mut stream {
                first_read(tcp, &mut buf).await
            } else {
                buf.read_from(&mut stream).await
            }
        };
        if !matches!(super::lazy_timeout::timeout(ctx.limits.idle_timeout, first).await, Ok(Ok(1..))) {
            return None;
        }
        // Read until the bytes either are the HTTP/2 preface or cannot be: the first within the idle
        // timeout, the rest of the preface within the header timeout, as for a request head.
        let mut header_deadline = None;
        loop {
            let filled = buf.filled();
            let n = filled.len().min(H2_PREFACE.len());
            if filled[..n] != H2_PREFACE[..n] {
                break;
            }
            if n == H2_PREFACE.len() {
                counted.set(ConnState::Active);
                let engine: Engine = Box::pin(h2::serve(stream, peer, buf, ctx, tls.map(Arc::new)));
                return Some(engine);
            }
            let read = match header_deadline {
                None if buf.is_empty() => {
                    super::lazy_timeout::timeout(ctx.limits.idle_timeout, buf.read_from(&mut stream)).await
                }
                None => {
                    counted.set(ConnState::ReadingHead);
                    let deadline = tokio::time::Instant::now() + ctx.limits.header_read_timeout;
                    header_deadline = Some(deadline);
                    super::lazy_timeout::timeout_at(deadline, buf.read_from(&mut stream)).await
                }
                Some(deadline) => super::lazy_timeout::timeout_at(deadline, buf.read_from(&mut stream)).await,
            };
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
        let first = h1::first_head(&mut stream, &mut buf, &mut counted, &ctx.limits, header_deadline).await;
        let mut conn = h1::Connection::new(ctx, stream, peer, buf, counted);
        if let Some(tls) = tls {
            conn = conn.with_tls(tls);
        }
        let engine: Engine = match first {
            Ok(()) => Box::pin(conn.run()),
            Err(e) => Box::pin(conn.refuse(e)),
        };
        Some(engine)
    }
}

/// Waits for a new connection's first bytes and reads them: a client that connects and stays
/// silent holds no buffer (readiness may come without bytes: the buffer goes back then).
fn first_read<'a>(stream: &'a mut TcpStream, buf: &'a mut IoBuf) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| {
        std::task::ready!(stream.poll_read_ready(cx))?;
        buf.poll_read_or_release(stream, cx)
    })
}
