//! Upstream connections: a pool of idle HTTP/1.1 connections per endpoint (connecting is
//! [`crate::net::connect`]), and its shared HTTP/2 connections ([`h2`]). The pool lives in the endpoint's state (outside the routing table), so it is kept
//! across table swaps for as long as the endpoint stays.

pub mod h2;

use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::attempt::{Connect, ConnectTimeout};
use super::http::codec::IoBuf;
use super::stream::{Stream, UpstreamStream};
use crate::endpoint::EndpointState;
use crate::endpoint::breaker::Slot;
use crate::metrics::Metrics;
use crate::names::{Addr, Host};
use crate::net::LoopbackCongestion;
use crate::routing::documents::TlsPolicy;
use crate::routing::table::{Endpoint, EndpointSet};
use crate::tls::{Alpn, UpstreamTls};

/// Read buffer of an upstream connection.
pub const UPSTREAM_BUF: usize = 16 * 1024;

/// An HTTP/1.1 connection to an upstream endpoint, boxed: it goes from its pool to the exchange
/// and back on every request, which moves a pointer rather than the connection's state.
pub type Conn = Box<UpstreamConn>;

/// What an HTTP/1.1 connection to an upstream endpoint holds.
pub struct UpstreamConn {
    pub stream: UpstreamStream,
    pub buf: IoBuf,
    /// Taken from the pool (it served a request before).
    pub reused: bool,
    idle_since: Instant,
    /// Its place under the service's `max_connections`, while it is open.
    slot: Option<Slot>,
}

impl UpstreamConn {
    pub fn new(stream: impl Into<UpstreamStream>) -> Conn {
        let stream = stream.into();
        Box::new(UpstreamConn {
            stream,
            buf: IoBuf::new(UPSTREAM_BUF),
            reused: false,
            idle_since: Instant::now(),
            slot: None,
        })
    }

    /// Whether an idle connection is still usable: nothing arrived on it while idle (no EOF, no
    /// stray bytes). Costs no system call unless the reactor saw it become readable.
    fn is_clean(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let tcp = match &self.stream {
            Stream::Plain(s) => s,
            // Under TLS, anything that arrived (a close_notify, a session ticket) is not probed
            // for: the connection is simply not reused.
            Stream::Tls(s) => return s.get_ref().0.poll_read_ready(&mut cx).is_pending(),
        };
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }
}

/// How HTTP/1.1 requests reach an endpoint: an idle connection from its pool when one is clean,
/// else a new one.
pub struct PooledHttp1<'a> {
    pools: &'a Pools,
    congestion: &'a LoopbackCongestion,
    /// The request's arrival: a connection idle since before it counts as idle for that long.
    now: Instant,
    /// Set when the service's policy turns TLS on.
    tls: Option<TlsOrigin<'a>>,
}

impl<'a> PooledHttp1<'a> {
    pub fn new(pools: &'a Pools, congestion: &'a LoopbackCongestion, now: Instant) -> Self {
        PooledHttp1 { pools, congestion, now, tls: None }
    }

    /// New connections are TLS ones when `tls` is set (and only such are reused).
    pub fn with_tls(mut self, tls: Option<TlsOrigin<'a>>) -> Self {
        self.tls = tls;
        self
    }
}

impl Connect for PooledHttp1<'_> {
    type Conn = Conn;
    #[inline]
    fn reuse(&self, endpoint: &Endpoint) -> Option<Conn> {
        self.pools.of(&endpoint.state)?.checkout(self.now, self.tls.is_some())
    }

    async fn connect(&self, endpoint: &Endpoint, timeout: ConnectTimeout) -> io::Result<Conn> {
        match &self.tls {
            None => crate::net::connect(&endpoint.addr, timeout.get(), self.congestion).await.map(UpstreamConn::new),
            Some(tls) => tls.connect(endpoint, timeout, self.congestion).await.map(UpstreamConn::new),
        }
    }

    fn hold(&self, conn: &mut Conn, slot: Slot) {
        conn.slot = Some(slot);
    }
}

/// TLS towards one service's instances: its policy, this sidecar's `[tls]`, and where failures
/// are counted. ALPN is chosen by the caller: `http/1.1` for the HTTP/1.1 connector, none for TCP
/// relays; an HTTP/2 connector asks for [`Alpn::H2`].
pub struct TlsOrigin<'a> {
    pub config: Option<&'a UpstreamTls>,
    pub policy: &'a TlsPolicy,
    pub alpn: Alpn,
    pub metrics: &'a Metrics,
    /// The `service` label.
    pub service: &'a str,
}

impl<'a> TlsOrigin<'a> {
    /// TLS for requests to `set`, if its policy turns it on.
    #[inline]
    pub fn for_set(
        set: &'a EndpointSet,
        config: Option<&'a std::sync::Arc<UpstreamTls>>,
        metrics: &'a Metrics,
        alpn: Alpn,
    ) -> Option<TlsOrigin<'a>> {
        let policy = set.policy.tls.as_ref()?;
        Some(TlsOrigin { config: config.map(|c| &**c), policy, alpn, metrics, service: &set.label })
    }

    /// Connects to `endpoint` (its TLS port if it has one) and takes the TLS handshake, both
    /// within `timeout`. The server name is the policy's `server_name`, else the instance's host
    /// name, else its IP address (verified against an IP subjectAltName; no SNI is sent then).
    /// A failed handshake is logged and counted by reason.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        timeout: ConnectTimeout,
        congestion: &LoopbackCongestion,
    ) -> io::Result<UpstreamStream> {
        let addr = match endpoint.tls_port {
            Some(port) => Addr { host: endpoint.addr.host.clone(), port },
            None => endpoint.addr.clone(),
        };
        let tcp = crate::net::connect(&addr, timeout.get(), congestion).await?;
        let result = self.handshake(&addr, tcp, timeout).await;
        if let Err(e) = &result {
            let reason = crate::tls::failure_reason(e);
            self.metrics.upstream_tls_errors.with_label_values(&[self.service, reason]).inc();
            tracing::warn!(service = %self.service, upstream = %addr, reason, error = %e, "upstream TLS handshake failed");
        }
        result
    }

    async fn handshake(&self, addr: &Addr, tcp: TcpStream, timeout: ConnectTimeout) -> io::Result<UpstreamStream> {
        use rustls::pki_types::ServerName;
        let Some(config) = self.config else {
            return Err(io::Error::other("no trust store: [tls] did not load and the system has no CA bundle"));
        };
        let bad_name = |e| io::Error::new(io::ErrorKind::InvalidInput, format!("server name: {e}"));
        let name: ServerName<'static> = match (&self.policy.server_name, &addr.host) {
            (Some(n), _) => ServerName::try_from(n.to_string()).map_err(bad_name)?,
            (None, Host::Name(n)) => ServerName::try_from(n.to_string()).map_err(bad_name)?,
            (None, Host::Ip(ip)) => ServerName::IpAddress((*ip).into()),
        };
        let connector = tokio_rustls::TlsConnector::from(config.current().get(self.alpn).clone());
        let tls = tokio::time::timeout(timeout.get(), connector.connect(name, tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Stream::Tls(Box::new(tls)))
    }
}

/// Whether zkroute speaks HTTP/2 to an endpoint (its instance or its service policy says so).
#[inline]
pub fn speaks_h2(endpoint: &Endpoint) -> bool {
    endpoint.protocol == Some(crate::routing::InstanceProtocol::H2)
}

/// A connection for one request: HTTP/1.1, or a stream on a shared HTTP/2 connection.
pub enum Upstream {
    Http1(Conn),
    H2(h2::Stream),
}

/// How requests reach endpoints of either protocol: [`PooledHttp1`] for HTTP/1.1 ones, a stream
/// on one of the endpoint's HTTP/2 connections for the others; each over TLS when the service's
/// policy says so (ALPN `http/1.1` or `h2`).
pub struct AnyProtocol<'a> {
    http1: PooledHttp1<'a>,
    h2_tls: Option<TlsOrigin<'a>>,
}

impl<'a> AnyProtocol<'a> {
    /// `tls` gives the TLS origin (if the policy turns TLS on) for an ALPN.
    #[inline]
    pub fn new(http1: PooledHttp1<'a>, tls: impl Fn(Alpn) -> Option<TlsOrigin<'a>>) -> Self {
        AnyProtocol { http1: http1.with_tls(tls(Alpn::Http1)), h2_tls: tls(Alpn::H2) }
    }
}

impl Connect for AnyProtocol<'_> {
    type Conn = Upstream;
    #[inline]
    fn reuse(&self, endpoint: &Endpoint) -> Option<Upstream> {
        if speaks_h2(endpoint) {
            self.http1.pools.of(&endpoint.state)?.h2.checkout(self.h2_tls.is_some()).map(Upstream::H2)
        } else {
            self.http1.reuse(endpoint).map(Upstream::Http1)
        }
    }

    async fn connect(&self, endpoint: &Endpoint, timeout: ConnectTimeout) -> io::Result<Upstream> {
        if speaks_h2(endpoint) {
            let pool = self.http1.pools.of(&endpoint.state).ok_or_else(|| io::Error::other("no pool for endpoint"))?;
            let tls = self.h2_tls.as_ref();
            pool.h2.connect(endpoint, timeout, self.http1.congestion, tls).await.map(Upstream::H2)
        } else {
            self.http1.connect(endpoint, timeout).await.map(Upstream::Http1)
        }
    }

    /// An HTTP/1.1 connection keeps its slot; a stream on a shared HTTP/2 connection is not a
    /// connection of its own and takes none.
    fn hold(&self, conn: &mut Upstream, slot: Slot) {
        if let Upstream::Http1(c) = conn {
            self.http1.hold(c, slot);
        }
    }
}

/// Limits of the idle pools.
#[derive(Clone, Copy, Debug)]
pub struct PoolSettings {
    pub max_idle: usize,
    pub idle_timeout: Duration,
}

/// The limits every pool reads, which a configuration reload may change.
#[derive(Debug)]
struct SharedSettings {
    max_idle: AtomicUsize,
    idle_timeout_ms: AtomicU64,
}

impl SharedSettings {
    fn set(&self, s: PoolSettings) {
        self.max_idle.store(s.max_idle, Ordering::Relaxed);
        self.idle_timeout_ms.store(u64::try_from(s.idle_timeout.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn max_idle(&self) -> usize {
        self.max_idle.load(Ordering::Relaxed)
    }

    fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.load(Ordering::Relaxed))
    }
}

/// Idle connections of one endpoint, most recently used first out, and its HTTP/2 connections.
pub struct Pool {
    idle: Mutex<Vec<Conn>>,
    settings: Arc<SharedSettings>,
    pub h2: h2::H2Conns,
}

impl Pool {
    /// An idle connection that is still clean at `now` (the caller's clock reading, which may be
    /// a little old: a connection then counts as idle for less long), if any. `tls`: the kind
    /// wanted; a policy that turned TLS on or off leaves pooled connections of the other kind,
    /// and the one found is then closed.
    #[inline]
    pub fn checkout(&self, now: Instant, tls: bool) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut conn) = idle.pop() {
            if now.duration_since(conn.idle_since) < self.settings.idle_timeout() && conn.is_clean() {
                if conn.is_tls() != tls {
                    return None;
                }
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last exchange completed cleanly.
    pub fn checkin(&self, mut conn: Conn) {
        if !conn.buf.is_empty() {
            return;
        }
        conn.buf.shrink(UPSTREAM_BUF);
        conn.idle_since = Instant::now();
        // A request of the service may be waiting for a connection (circuit breaking).
        let gate = conn.slot.as_ref().map(|s| s.gate().clone());
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < self.settings.max_idle() {
                idle.push(conn);
            }
        }
        if let Some(gate) = gate {
            gate.connection_freed();
        }
    }

    /// Closes connections idle for longer than the timeout.
    fn sweep(&self, now: Instant) -> usize {
        let timeout = self.settings.idle_timeout();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| now.duration_since(c.idle_since) < timeout);
        idle.len()
    }
}

/// How often idle connections are swept: a quarter of their timeout, within 100 ms to 5 s.
fn sweep_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

/// Every pool, for the sweeper. Only touched when an endpoint gets its first pool.
pub struct Pools {
    settings: Arc<SharedSettings>,
    all: Mutex<Vec<Weak<Pool>>>,
}

impl Pools {
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let shared = Arc::new(SharedSettings { max_idle: AtomicUsize::new(0), idle_timeout_ms: AtomicU64::new(0) });
        shared.set(settings);
        Arc::new(Pools { settings: shared, all: Mutex::new(Vec::new()) })
    }

    /// New limits for every pool: a lower `max_idle` applies as connections are checked in, a
    /// shorter `idle_timeout` at the next checkout or sweep.
    pub fn set(&self, settings: PoolSettings) {
        self.settings.set(settings);
    }

    /// The pool of an endpoint, created on first use.
    #[inline]
    pub fn of<'a>(&self, state: &'a EndpointState) -> Option<&'a Arc<Pool>> {
        state.data_plane(|| {
            let pool = Arc::new(Pool {
                idle: Mutex::new(Vec::new()),
                settings: self.settings.clone(),
                h2: Default::default(),
            });
            self.all.lock().unwrap_or_else(|e| e.into_inner()).push(Arc::downgrade(&pool));
            pool
        })
    }

    /// Closes expired idle connections and forgets pools whose endpoint is gone.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let pools: Vec<Arc<Pool>> = {
            let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
            all.retain(|w| w.strong_count() > 0);
            all.iter().filter_map(Weak::upgrade).collect()
        };
        pools.iter().map(|p| p.sweep(now)).sum()
    }

    /// Sweeps every few seconds until the returned task is dropped or aborted.
    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let pools = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(every) = pools.upgrade().map(|p| sweep_interval(p.settings.idle_timeout())) else { return };
                tokio::time::sleep(every).await;
                match pools.upgrade() {
                    Some(p) => {
                        p.sweep();
                    }
                    None => return,
                }
            }
        })
    }
}
