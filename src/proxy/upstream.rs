//! Upstream connections: connecting with a timeout, and a pool of idle HTTP/1.1 connections per
//! endpoint. The pool lives in the endpoint's state (outside the routing table), so it is kept
//! across table swaps for as long as the endpoint stays.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::net::{TcpSocket, TcpStream};

use super::http::codec::IoBuf;
use crate::endpoint::EndpointState;
use crate::routing::{Addr, Host};

/// Read buffer of an upstream connection.
pub const UPSTREAM_BUF: usize = 16 * 1024;

/// Connects to `addr` within `timeout`, with Nagle off (requests are written whole), trying each
/// address a name resolves to in turn.
pub async fn connect(addr: &Addr, timeout: Duration, congestion: &LoopbackCongestion) -> io::Result<TcpStream> {
    let attempt = async {
        match &addr.host {
            Host::Ip(ip) => connect_one(SocketAddr::new(*ip, addr.port), congestion).await,
            Host::Name(name) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address"));
                for a in tokio::net::lookup_host((&**name, addr.port)).await? {
                    match connect_one(a, congestion).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_one(addr: SocketAddr, congestion: &LoopbackCongestion) -> io::Result<TcpStream> {
    let socket = super::tcp_socket(addr)?;
    // Before the connect: BBR, once started on a socket, leaves it paced whatever follows.
    congestion.apply(&socket, addr.ip());
    socket.connect(addr).await
}

/// The congestion control of connections with both ends on this host
/// (`proxy.loopback_congestion`): listeners bound to a loopback address, whose accepted
/// connections inherit it, and upstream connections to one.
///
/// A loopback path has no bottleneck to probe for or queue to pace into, but BBR, a common system
/// default, paces every socket it runs from a timer of its own. Measured on the machine of
/// `docs/PERFORMANCE.md`, whose default is BBR, a bulk relay over loopback took a tenth more CPU
/// per GiB, and an HTTP request 1.2 us more kernel time, than with cubic, which sends as the
/// window allows. Connections to other hosts keep the system's choice.
#[derive(Clone, Debug, Default)]
pub struct LoopbackCongestion(Option<Arc<str>>);

/// What loopback connections use when `proxy.loopback_congestion` is not set.
pub const DEFAULT_LOOPBACK_CONGESTION: &str = "cubic";

impl LoopbackCongestion {
    /// From `proxy.loopback_congestion`: a name, which the kernel must offer to this process, or
    /// empty for the system's choice. Unset, `default` where the kernel offers it (one built with
    /// another default may keep cubic for root), the system's choice where it does not.
    pub fn configured(name: Option<&str>, default: &str) -> io::Result<Self> {
        match name {
            Some(name) => Self::new(name),
            None => Ok(Self::new(default).unwrap_or_else(|e| {
                tracing::info!(error = %e, congestion = default, "loopback connections keep the system's congestion control");
                LoopbackCongestion(None)
            })),
        }
    }

    /// `name` for loopback connections, or the system's choice if empty. Fails if the kernel does
    /// not offer `name` to this process.
    pub fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() {
            return Ok(LoopbackCongestion(None));
        }
        let probe = TcpSocket::new_v4()?;
        rustix::net::sockopt::set_tcp_congestion(&probe, name)?;
        Ok(LoopbackCongestion(Some(name.into())))
    }

    /// Sets the algorithm on a socket (before it connects or listens) if `ip`, its peer's or its
    /// own bound address, is a loopback one. A failure leaves the system's choice, which works.
    pub fn apply(&self, socket: &impl AsFd, ip: IpAddr) {
        if let Some(name) = &self.0 {
            if ip.is_loopback() {
                if let Err(e) = rustix::net::sockopt::set_tcp_congestion(socket, name) {
                    tracing::debug!(error = %e, congestion = %name, "cannot set the congestion control");
                }
            }
        }
    }
}

/// An HTTP/1.1 connection to an upstream endpoint.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: IoBuf,
    /// Taken from the pool (it served a request before).
    pub reused: bool,
    idle_since: Instant,
}

impl Conn {
    pub fn new(stream: TcpStream) -> Self {
        Conn { stream, buf: IoBuf::new(UPSTREAM_BUF), reused: false, idle_since: Instant::now() }
    }

    /// Whether an idle connection is still usable: nothing arrived on it while idle (no EOF, no
    /// stray bytes). Costs no system call unless the reactor saw it become readable.
    fn is_clean(&self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
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

/// Idle connections of one endpoint, most recently used first out.
pub struct Pool {
    idle: Mutex<Vec<Conn>>,
    settings: Arc<SharedSettings>,
}

impl Pool {
    /// An idle connection that is still clean at `now` (the caller's clock reading, which may be
    /// a little old: a connection then counts as idle for less long), if any.
    pub fn checkout(&self, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(mut conn) = idle.pop() {
            if now.duration_since(conn.idle_since) < self.settings.idle_timeout() && conn.is_clean() {
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
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < self.settings.max_idle() {
            idle.push(conn);
        }
    }

    /// Closes connections idle for longer than the timeout.
    fn sweep(&self, now: Instant) -> usize {
        let timeout = self.settings.idle_timeout();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| now.duration_since(c.idle_since) < timeout);
        idle.len()
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|i| i.len()).unwrap_or(0)
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
            let pool = Arc::new(Pool { idle: Mutex::new(Vec::new()), settings: self.settings.clone() });
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn congestion_of(socket: &impl AsFd) -> String {
        rustix::net::sockopt::tcp_congestion(socket).expect("TCP_CONGESTION")
    }

    /// What a new socket gets on this system, and an algorithm other than that (both are built
    /// into every Linux kernel).
    fn system_and_other() -> (String, &'static str) {
        let system = congestion_of(&TcpSocket::new_v4().expect("socket"));
        let other = if system == "reno" { "cubic" } else { "reno" };
        (system, other)
    }

    async fn backend() -> (TcpListener, Addr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = Addr::from_socket(listener.local_addr().expect("addr"));
        (listener, addr)
    }

    #[tokio::test]
    async fn an_upstream_connection_on_loopback_gets_the_loopback_algorithm() {
        let (system, other) = system_and_other();
        let (_listener, addr) = backend().await;
        let set = LoopbackCongestion::new(other).expect("an algorithm every kernel has");
        let stream = connect(&addr, Duration::from_secs(5), &set).await.expect("connect");
        assert_eq!(congestion_of(&stream), other);
        let kept = connect(&addr, Duration::from_secs(5), &LoopbackCongestion::new("").expect("empty")).await;
        assert_eq!(congestion_of(&kept.expect("connect")), system, "empty keeps the system's choice");
    }

    #[tokio::test]
    async fn a_listener_hands_nodelay_and_the_loopback_algorithm_to_accepted_connections() {
        let (system, other) = system_and_other();
        let set = LoopbackCongestion::new(other).expect("an algorithm every kernel has");
        for (bind, expected) in [("127.0.0.1:0", other), ("0.0.0.0:0", system.as_str())] {
            let listener = super::super::listen(bind.parse().expect("address"), &set).expect("listen");
            let port = listener.local_addr().expect("addr").port();
            let _client = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            assert_eq!(congestion_of(&accepted), expected, "a listener on {bind}");
            assert!(accepted.nodelay().expect("TCP_NODELAY"), "Nagle is off on what a listener on {bind} accepts");
        }
    }

    #[test]
    fn an_algorithm_the_system_lacks_fails_when_named_and_falls_back_when_a_default() {
        let e = LoopbackCongestion::new("no-such-algorithm").expect_err("not offered");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(LoopbackCongestion::configured(Some("no-such-algorithm"), "reno").is_err());
        let unset = LoopbackCongestion::configured(None, "no-such-algorithm").expect("the system's choice");
        assert_eq!(unset.0, None);
        let (_, other) = system_and_other();
        let unset = LoopbackCongestion::configured(None, other).expect("offered");
        assert_eq!(unset.0.as_deref(), Some(other));
        let empty = LoopbackCongestion::configured(Some(""), other).expect("the system's choice");
        assert_eq!(empty.0, None);
    }
}
