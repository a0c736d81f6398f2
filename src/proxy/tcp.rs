//! TCP listeners (README: "What it serves"): each connection goes to an endpoint chosen by the listener's rule
//! (or its `service`), with connect failover, then bytes flow both ways until both sides have
//! closed, honouring half-close, with an idle timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::net::Listener;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::attempt::{Attempts, Connect, ConnectTimeout, Connected, choose_target, hash_key};
use super::stream::{ClientStream, Stream, UpstreamStream};
use super::upstream::TlsOrigin;
use super::{Limits, Tracker};
use crate::access_log::{self, AccessLog};
use crate::endpoint::InFlight;
use crate::endpoint::breaker::Slot;
use crate::health::HealthReporter;
use crate::metrics::Metrics;
use crate::net::IpText;
use crate::routing::RouteReader;
use crate::routing::documents::NoHeaders;
use crate::routing::table::{Endpoint, ListenerId};
use crate::shutdown::Shutdown;
use crate::tls::Alpn;

/// Everything a TCP listener's connections share.
pub struct TcpContext {
    pub listener: ListenerId,
    pub name: Arc<str>,
    pub routes: RouteReader,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub tracker: Arc<Tracker>,
    pub health: HealthReporter,
    pub access_log: Option<Arc<AccessLog>>,
    /// A TLS listener's server side: connections are decrypted, and plain bytes relayed.
    tls: Option<Arc<crate::tls::ServerTls>>,
    /// This sidecar's `[tls]`, for services whose policy turns TLS on.
    upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    rx: IntCounter,
    tx: IntCounter,
    active: IntGauge,
    rejected: Rejected,
}

/// Connections closed without reaching an upstream, by reason (`zkroute_tcp_connections_rejected_total`).
struct Rejected {
    no_route: IntCounter,
    no_healthy_upstream: IntCounter,
    upstream_connect_failed: IntCounter,
    overflow: IntCounter,
}

impl TcpContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listener: ListenerId,
        name: Arc<str>,
        routes: RouteReader,
        metrics: Arc<Metrics>,
        limits: Limits,
        shutdown: Shutdown,
        tracker: Arc<Tracker>,
        health: HealthReporter,
        access_log: Option<Arc<AccessLog>>,
    ) -> Self {
        let rx = metrics.tcp_bytes.with_label_values(&[&name, "rx"]);
        let tx = metrics.tcp_bytes.with_label_values(&[&name, "tx"]);
        let active = metrics.tcp_active_connections.with_label_values(&[&name]);
        let reason = |r: &str| metrics.tcp_rejected.with_label_values(&[&name, r]);
        let rejected = Rejected {
            no_route: reason("no_route"),
            no_healthy_upstream: reason("no_healthy_upstream"),
            upstream_connect_failed: reason("upstream_connect_failed"),
            overflow: reason("overflow"),
        };
        TcpContext {
            listener,
            name,
            routes,
            metrics,
            limits,
            shutdown,
            tracker,
            health,
            access_log,
            tls: None,
            upstream_tls: None,
            rx,
            tx,
            active,
            rejected,
        }
    }
}

impl TcpContext {
    /// Terminates TLS on the listener's connections when `tls` is set.
    pub fn with_tls(mut self, tls: Option<Arc<crate::tls::ServerTls>>) -> Self {
        self.tls = tls;
        self
    }

    /// Originates TLS to services whose policy asks for it, with this `[tls]`.
    pub fn with_upstream_tls(mut self, tls: Option<Arc<crate::tls::UpstreamTls>>) -> Self {
        self.upstream_tls = tls;
        self
    }
}

/// Accepts connections until shutdown. The socket may outlive this loop: a configuration reload
/// serves it again with a new context.
pub async fn serve(listener: Arc<Listener>, ctx: Arc<TcpContext>) {
    let c = ctx.clone();
    super::accept_loop(
        &listener,
        &c.name,
        c.limits.max_connections,
        &c.tracker,
        &c.metrics,
        c.shutdown.clone(),
        |s, peer| handle(s, peer, ctx.clone()),
    )
    .await;
}

/// A connection's task. A relay may last hours, and its task holds for all that time the largest
/// state it ever had: so the TLS handshake and the way to an upstream (transient), and the relay
/// of a TLS stream (rarer, and larger), are boxed, and what stays is the plain relay's state
/// (docs/PERFORMANCE.md, "Memory per held connection").
fn handle(client: TcpStream, peer: SocketAddr, ctx: Arc<TcpContext>) -> impl Future<Output = ()> + Send {
    let opening = Box::pin(open(client, peer, ctx));
    async move {
        let Some(Opened { ctx, peer, mut client, mut upstream, in_flight, _slot }) = opening.await else {
            return;
        };
        ctx.active.inc();
        let moved = RelayedBytes::default();
        let limits = &ctx.limits;
        let counters = Some((&ctx.rx, &ctx.tx));
        let result = match (&mut client, &mut upstream) {
            (Stream::Plain(client), Stream::Plain(upstream)) => {
                relay(client, upstream, limits.tcp_idle_timeout, &limits.tcp_relay_memory, counters, &moved).await
            }
            (client, upstream) => Box::pin(relay_io(client, upstream, limits.tcp_idle_timeout, counters, &moved)).await,
        };
        ctx.active.dec();
        if let Err(e) = result {
            debug!(listener = %ctx.name, error = %e, "TCP relay ended");
        }
        if let Some(log) = &ctx.access_log {
            log.record(&access_log::Entry {
                time: std::time::SystemTime::now(),
                listener: &ctx.name,
                client: Some(peer),
                method: "TCP",
                host: "-",
                path: "-",
                status: 0,
                upstream: Some(in_flight.state().key.addr.to_string()),
                duration: moved.since_start(),
                bytes_in: moved.rx.load(Ordering::Relaxed),
                bytes_out: moved.tx.load(Ordering::Relaxed),
                request_id: None,
                grpc_status: None,
            });
        }
    }
}

/// A client connection with its upstream, ready to relay.
struct Opened {
    ctx: Arc<TcpContext>,
    peer: SocketAddr,
    client: ClientStream,
    upstream: UpstreamStream,
    /// The connection's place in its endpoint's in-flight count, while it lasts.
    in_flight: InFlight,
    /// Its place under the service's `max_connections`, if the service has one.
    _slot: Option<Slot>,
}

/// The TLS handshake on a TLS listener, then the route, the target and a connection to one of its
/// endpoints (with failover). None when the connection goes nowhere: it is closed and counted.
async fn open(client: TcpStream, peer: SocketAddr, ctx: Arc<TcpContext>) -> Option<Opened> {
    let client = match &ctx.tls {
        None => ClientStream::Plain(client),
        Some(tls) => match super::stream::accept_tls(tls, client, ctx.limits.header_read_timeout).await {
            Ok((stream, _)) => stream,
            Err(e) => {
                ctx.metrics.tls_handshake_errors.with_label_values(&[&ctx.name]).inc();
                debug!(listener = %ctx.name, client = %peer, error = %e, "TLS handshake failed");
                return None;
            }
        },
    };
    let route = {
        let guard = ctx.routes.load();
        match guard.as_ref().and_then(|t| t.listener(ctx.listener)).and_then(|l| l.first()) {
            Some(r) => r.clone(),
            None => {
                debug!(listener = %ctx.name, "no route for a TCP connection: closing it");
                ctx.rejected.no_route.inc();
                return None;
            }
        }
    };
    let Some(target) = choose_target(&route, &NoHeaders) else {
        ctx.rejected.no_healthy_upstream.inc();
        return None;
    };
    target.stats.tcp_accepted();
    let client_ip = IpText::new(peer.ip());
    let hash = hash_key(&target.set.policy.lb, |_| Some(client_ip.as_bytes()), &client_ip);
    let mut attempts = Attempts::new(&target, &target.set, hash, route.retries, std::time::Instant::now(), None);
    let tls_origin = TlsOrigin::for_set(&target.set, ctx.upstream_tls.as_ref(), &ctx.metrics, Alpn::None);
    let Some(Connected { attempt, in_flight, conn: (upstream, slot) }) =
        attempts.connection(&NewConnection(&ctx, tls_origin), &ctx.health).await
    else {
        debug!(listener = %ctx.name, "no endpoint could be reached: closing the client connection");
        if attempts.overflowed() {
            ctx.rejected.overflow.inc();
        } else if attempts.tried_any() {
            ctx.rejected.upstream_connect_failed.inc();
        } else {
            ctx.rejected.no_healthy_upstream.inc();
        }
        return None;
    };
    attempts.established(attempt);
    // The relay may last hours: it keeps no part of the table alive (the route and target are
    // dropped here).
    Some(Opened { ctx, peer, client, upstream, in_flight, _slot: slot })
}

/// A TCP listener's upstream connections: always new ones, under TLS if the policy says.
struct NewConnection<'a>(&'a TcpContext, Option<TlsOrigin<'a>>);

impl Connect for NewConnection<'_> {
    /// The connection, with its place under the service's `max_connections` while it lasts.
    type Conn = (UpstreamStream, Option<Slot>);
    fn reuse(&self, _: &Endpoint) -> Option<Self::Conn> {
        None
    }
    async fn connect(&self, endpoint: &Endpoint, timeout: ConnectTimeout) -> io::Result<Self::Conn> {
        let congestion = &self.0.limits.congestion;
        let stream = match &self.1 {
            None => crate::net::connect(&endpoint.addr, timeout.get(), congestion).await.map(Stream::Plain),
            Some(tls) => tls.connect(endpoint, timeout, congestion).await,
        };
        stream.map(|s| (s, None))
    }
    fn hold(&self, conn: &mut Self::Conn, slot: Slot) {
        conn.1 = Some(slot);
    }
}

/// Bytes a connection moved each way: `rx` from the client, `tx` to it; when bytes last moved,
/// for the relay's idle timeout; and whether each direction holds a buffer, for the relay's
/// watchdog to ask for it back when no byte moves that way.
pub(crate) struct RelayedBytes {
    pub rx: AtomicU64,
    pub tx: AtomicU64,
    last: Activity,
    /// `rx`'s direction, then `tx`'s.
    bufs: [BufState; 2],
}

impl Default for RelayedBytes {
    fn default() -> Self {
        RelayedBytes { rx: AtomicU64::new(0), tx: AtomicU64::new(0), last: Activity::new(), bufs: Default::default() }
    }
}

impl RelayedBytes {
    /// Notes bytes moved outside the relay (what a tunnel sends before it): its idle time runs
    /// from now.
    pub fn touch(&self) {
        self.last.touch();
    }

    /// The time since these counts began (with the relay, on a TCP listener).
    pub fn since_start(&self) -> Duration {
        self.last.start.elapsed()
    }

    fn counts(&self) -> [u64; 2] {
        [self.rx.load(Ordering::Relaxed), self.tx.load(Ordering::Relaxed)]
    }

    fn holds_a_buffer(&self) -> bool {
        self.bufs.iter().any(|b| b.held.load(Ordering::Relaxed))
    }

    /// Asks each direction that holds a buffer and has moved no byte since the counts were
    /// `seen` to give it back, or every one that holds a buffer when neither direction has read
    /// a byte for a [`BUF_KEEP`] by `now` (a count may have moved since `seen` with bytes read
    /// before it); true if any was asked.
    fn want_quiet_buffers(&self, seen: [u64; 2], now: Instant) -> bool {
        let all_quiet = self.last.get() + BUF_KEEP <= now;
        let mut asked = false;
        for ((buf, count), then) in self.bufs.iter().zip(self.counts()).zip(seen) {
            if (all_quiet || count == then) && buf.held.load(Ordering::Relaxed) {
                buf.wanted.store(true, Ordering::Relaxed);
                asked = true;
            }
        }
        asked
    }

    /// Withdraws what [`Self::want_quiet_buffers`] asked: a direction that was writing, not
    /// waiting for bytes, keeps its buffer until a later check.
    fn clear_wants(&self) {
        for buf in &self.bufs {
            buf.wanted.store(false, Ordering::Relaxed);
        }
    }
}

/// One direction's buffer, as the relay's watchdog sees it. The relay's futures all run in one
/// task, so these are never touched at the same time; atomics only keep the futures `Send`.
#[derive(Default)]
struct BufState {
    /// The direction holds a buffer ([`RelayBuf`] keeps this up to date).
    held: AtomicBool,
    /// The watchdog wants it back: no byte has moved this way since its last look, or neither way
    /// for a [`BUF_KEEP`].
    wanted: AtomicBool,
}

/// Copies both ways until both directions have ended, or no byte has moved either way for
/// `idle`. TCP listeners relay this way, and so do HTTP connections after a protocol switch
/// (WebSocket); `listener` counts the bytes of a TCP listener, received and sent.
pub(crate) fn relay<'a>(
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    idle: Duration,
    memory: &'a RelayMemory,
    listener: Option<(&'a IntCounter, &'a IntCounter)>,
    moved: &'a RelayedBytes,
) -> impl Future<Output = io::Result<()>> + 'a {
    let last = &moved.last;
    BothWays::new(
        pump(client, upstream, (listener.map(|l| l.0), &moved.rx), last, memory, &moved.bufs[0]),
        pump(upstream, client, (listener.map(|l| l.1), &moved.tx), last, memory, &moved.bufs[1]),
        moved,
        idle,
    )
}

pin_project_lite::pin_project! {
    /// Both directions of a relay, until both end or neither has moved a byte for `idle`. A
    /// struct, not an `async fn` that joins the two: that kept each direction twice (its argument
    /// and the joined future), 1 KiB more in the task of every relayed connection
    /// (docs/PERFORMANCE.md, "Memory per held connection").
    ///
    /// Its one timer also takes back the buffers of directions that went quiet. While a direction
    /// holds a buffer, the timer fires a [`BUF_KEEP`] after the last bytes moved either way, so
    /// at most about once a `BUF_KEEP` (a timer set and cancelled around every wait for bytes
    /// cost a quarter more instructions per small message); each direction that moved no byte
    /// since the timer was set (every direction, once neither has read a byte for a `BUF_KEEP`)
    /// is asked for its buffer, which it gives back if it is waiting for bytes. A relay that goes
    /// quiet gives its buffers back a `BUF_KEEP` after its last bytes; a direction quiet while
    /// the other still moves bytes, one to two after its own. While no buffer is held, the timer
    /// waits for the idle timeout alone.
    struct BothWays<'a, U, D> {
        #[pin]
        up: U,
        #[pin]
        down: D,
        up_ended: Option<io::Result<()>>,
        down_ended: Option<io::Result<()>>,
        // Fires `idle` after the last byte moved either way, or earlier for a buffer check.
        #[pin]
        watchdog: Sleep,
        moved: &'a RelayedBytes,
        idle: Duration,
        // The byte counts each way when the watchdog was set for a buffer check; None when it is
        // set for the idle timeout alone.
        check: Option<[u64; 2]>,
    }
}

impl<'a, U, D> BothWays<'a, U, D> {
    fn new(up: U, down: D, moved: &'a RelayedBytes, idle: Duration) -> Self {
        // The first check comes BUF_KEEP after the start, so that a direction that takes a buffer
        // before it needs the timer set no earlier (a short connection costs no extra timer
        // work); one that holds none then waits for the idle timeout alone.
        let start = moved.last.get();
        let watchdog = tokio::time::sleep_until(start + idle.min(BUF_KEEP));
        BothWays { up, down, up_ended: None, down_ended: None, watchdog, moved, idle, check: Some(moved.counts()) }
    }
}

/// Sets the watchdog for the idle timeout and, while a direction holds a buffer, for a buffer
/// check [`BUF_KEEP`] after the last bytes moved, so that a relay that goes quiet gives its
/// buffers back a `BUF_KEEP` after its last bytes. When that is already past (`now` is later: a
/// direction still writing out what it read then), the check is a `BUF_KEEP` from `now`.
fn arm(watchdog: Pin<&mut Sleep>, check: &mut Option<[u64; 2]>, moved: &RelayedBytes, idle: Duration, now: Instant) {
    let last = moved.last.get();
    let idle_at = last + idle;
    if moved.holds_a_buffer() {
        *check = Some(moved.counts());
        let at = if last + BUF_KEEP > now { last + BUF_KEEP } else { now + BUF_KEEP };
        watchdog.reset(idle_at.min(at));
    } else {
        *check = None;
        watchdog.reset(idle_at);
    }
}

impl<U, D> Future for BothWays<'_, U, D>
where
    U: Future<Output = io::Result<()>>,
    D: Future<Output = io::Result<()>>,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let moved = *this.moved;
        // When a check has just asked quiet directions for their buffers.
        let mut asked = None;
        loop {
            if this.up_ended.is_none() {
                if let Poll::Ready(r) = this.up.as_mut().poll(cx) {
                    *this.up_ended = Some(r);
                }
            }
            if this.down_ended.is_none() {
                if let Poll::Ready(r) = this.down.as_mut().poll(cx) {
                    *this.down_ended = Some(r);
                }
            }
            if let (Some(_), Some(_)) = (&this.up_ended, &this.down_ended) {
                let (Some(up), Some(down)) = (this.up_ended.take(), this.down_ended.take()) else { unreachable!() };
                return Poll::Ready(up.and(down));
            }
            if let Some(now) = asked.take() {
                moved.clear_wants();
                arm(this.watchdog.as_mut(), this.check, moved, *this.idle, now);
            } else if this.check.is_none() && moved.holds_a_buffer() {
                // A direction took a buffer since the last check, as its bytes moved (`last` is
                // now, and no clock is read).
                arm(this.watchdog.as_mut(), this.check, moved, *this.idle, moved.last.get());
            }
            loop {
                if this.watchdog.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                if moved.last.get() + *this.idle <= now {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")));
                }
                if this.check.take().is_some_and(|seen| moved.want_quiet_buffers(seen, now)) {
                    // Poll the directions again at once: one waiting for bytes gives its buffer
                    // back.
                    asked = Some(now);
                    break;
                }
                arm(this.watchdog.as_mut(), this.check, moved, *this.idle, now);
            }
        }
    }
}

/// [`relay`] for streams that are not bare sockets (TLS): the same idle timeout, counters and
/// half-close, through plain reads and writes of a fixed 64 KiB buffer each way.
pub(crate) async fn relay_io<C, U>(
    client: &mut C,
    upstream: &mut U,
    idle: Duration,
    listener: Option<(&IntCounter, &IntCounter)>,
    moved: &RelayedBytes,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let last = &moved.last;
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    // Its buffers are not RelayBufs and are never given back: the watchdog's first buffer check
    // finds none held, and it waits for the idle timeout alone from then on.
    BothWays::new(
        pump_io(&mut cr, &mut uw, (listener.map(|l| l.0), &moved.rx), last),
        pump_io(&mut ur, &mut cw, (listener.map(|l| l.1), &moved.tx), last),
        moved,
        idle,
    )
    .await
}

/// One direction of [`relay_io`].
async fn pump_io<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    src: &mut R,
    dst: &mut W,
    bytes: (Option<&IntCounter>, &AtomicU64),
    last: &Activity,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    let copied = async {
        loop {
            let n = src.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            last.touch();
            dst.write_all(&buf[..n]).await?;
            dst.flush().await?;
            if let Some(counter) = bytes.0 {
                counter.inc_by(n as u64);
            }
            bytes.1.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let result = copied.await;
    // Half-close (for TLS, after a close_notify): the other side sees EOF and may still answer.
    let _ = dst.shutdown().await;
    result
}

/// When bytes last moved either way.
struct Activity {
    start: Instant,
    millis: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), millis: AtomicU64::new(0) }
    }

    fn get(&self) -> Instant {
        self.start + Duration::from_millis(self.millis.load(Ordering::Relaxed))
    }

    fn touch(&self) {
        self.millis.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// The buffer a direction starts with, once its first bytes arrive.
const BUF_MIN: usize = 16 * 1024;
/// The most a buffer grows to: one read and one write move up to this much.
///
/// Measured here (`docs/PERFORMANCE.md`), 4 MiB against 1 MiB moved bulk data with the same proxy
/// CPU and 20 to 25% more throughput: the receiver gets fewer, larger writes.
const BUF_MAX: usize = 4 << 20;
/// How long a direction keeps its buffer with no bytes moving: one of these after the relay's
/// last bytes, up to two while the other direction still moves bytes ([`BothWays`]).
const BUF_KEEP: Duration = Duration::from_secs(1);

/// One direction: `src` to `dst` until `src` ends, then half-close `dst`.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: (Option<&IntCounter>, &AtomicU64),
    last: &Activity,
    memory: &RelayMemory,
    state: &BufState,
) -> io::Result<()> {
    let mut buf = RelayBuf::new(memory, state);
    let copied = async {
        loop {
            // The waits poll the sockets' readiness (`poll_read_ready`, `poll_write_ready`), whose
            // wakers live in each socket's registration: `readable()` and `writable()` carry a
            // waiter node of their own (152 bytes in this future) and lock the socket's waiter
            // list to add and remove it on every wait. This direction is the only reader of `src`
            // and the only writer of `dst`, as each slot needs.
            //
            // Nothing to read: the buffer goes back if the relay's watchdog wants it.
            std::future::poll_fn(|cx| {
                let ready = src.poll_read_ready(cx);
                if ready.is_pending() {
                    buf.release_if_wanted();
                }
                ready
            })
            .await?;
            let n = match buf.read_from(src) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            last.touch();
            let mut off = 0;
            while off < n {
                std::future::poll_fn(|cx| dst.poll_write_ready(cx)).await?;
                match dst.try_write(&buf.filled(n)[off..]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            if let Some(counter) = bytes.0 {
                counter.inc_by(n as u64);
            }
            bytes.1.fetch_add(n as u64, Ordering::Relaxed);
            // A full read means more was waiting: a bulk stream, which moves cheaper in larger steps.
            if n == buf.capacity() {
                buf.grow();
            }
        }
    };
    let result = copied.await;
    // Half-close: the other side sees EOF and may still answer.
    let _ = rustix::net::shutdown(dst.as_fd(), rustix::net::Shutdown::Write);
    result
}

/// What the relay buffers of all TCP connections may grow into together
/// (`proxy.tcp_relay_memory`), so that many bulk streams at once cannot take the host's memory.
///
/// The 16 KiB a direction starts with (`BUF_MIN`) are not counted: `proxy.max_connections` bounds
/// those. A buffer that grows past it takes its whole new size from here, and gives it back when
/// it shrinks or its connection ends; with nothing left, buffers stay the size they are.
#[derive(Debug)]
pub struct RelayMemory {
    /// A configuration reload may change it; buffers grown past a lowered limit keep their size.
    limit: AtomicUsize,
    used: AtomicUsize,
    /// `zkroute_tcp_relay_buffer_bytes`.
    gauge: IntGauge,
}

impl RelayMemory {
    pub fn new(limit: usize, gauge: IntGauge) -> Arc<Self> {
        Arc::new(RelayMemory { limit: AtomicUsize::new(limit), used: AtomicUsize::new(0), gauge })
    }

    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes taken now (the gauge shows the same to operators).
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes if they fit under the limit.
    fn take(&self, n: usize) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            match used.checked_add(n) {
                Some(after) if after <= limit => {}
                _ => return false,
            }
            match self.used.compare_exchange_weak(used, used + n, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        self.gauge.add(n as i64);
        true
    }

    fn give(&self, n: usize) {
        if n > 0 {
            self.used.fetch_sub(n, Ordering::Relaxed);
            self.gauge.sub(n as i64);
        }
    }
}

/// One direction's buffer: nothing while the connection waits, [`BUF_MIN`] once bytes arrive,
/// four times larger after each read that fills it, up to [`BUF_MAX`] and as far as the shared
/// [`RelayMemory`] allows; nothing again once the direction has been quiet for a while
/// ([`BothWays`]).
///
/// A grown buffer is an anonymous memory mapping of its own, not heap memory: unmapping it gives
/// the pages back to the system at once, where the allocator would keep a freed 4 MiB block
/// (glibc raises its mmap threshold to the size of the last freed mapping) and the process would
/// stay 4 to 8 MB larger after every bulk transfer. The kernel zero-fills its pages as the first
/// read touches them, so nothing is zeroed in user space either.
struct RelayBuf<'a> {
    /// The first buffer, heap-allocated on the first bytes; empty once grown.
    small: Vec<u8>,
    /// A grown buffer; its length is what it holds of `memory`.
    grown: Option<memmap2::MmapMut>,
    memory: &'a RelayMemory,
    /// Tells the relay's watchdog whether a buffer is held, and says when it is wanted back.
    state: &'a BufState,
}

impl<'a> RelayBuf<'a> {
    fn new(memory: &'a RelayMemory, state: &'a BufState) -> Self {
        RelayBuf { small: Vec::new(), grown: None, memory, state }
    }

    fn capacity(&self) -> usize {
        self.grown.as_ref().map_or(self.small.capacity(), |m| m.len())
    }

    fn granted(&self) -> usize {
        self.grown.as_ref().map_or(0, |m| m.len())
    }

    /// One non-blocking read from `src` into the whole buffer, allocated if it was not.
    fn read_from(&mut self, src: &TcpStream) -> io::Result<usize> {
        match &mut self.grown {
            Some(map) => src.try_read(map),
            None if self.small.capacity() == 0 => self.first_read(src),
            None => {
                // Into the spare capacity, which is never zeroed.
                self.small.clear();
                src.try_read_buf(&mut self.small)
            }
        }
    }

    /// A read into a new first buffer, kept only if bytes came: readiness may come without any
    /// (tokio's `readable` allows false positives, and a relayed client's socket is reported
    /// readable once with nothing to read), and a buffer taken then would stay with a silent
    /// connection for its whole life.
    #[cold]
    fn first_read(&mut self, src: &TcpStream) -> io::Result<usize> {
        let mut buf = Vec::with_capacity(BUF_MIN);
        let read = src.try_read_buf(&mut buf);
        if matches!(read, Ok(n) if n > 0) {
            self.small = buf;
            self.state.held.store(true, Ordering::Relaxed);
        }
        read
    }

    /// The first `n` bytes, as the last read left them.
    fn filled(&self, n: usize) -> &[u8] {
        match &self.grown {
            Some(map) => &map[..n],
            None => &self.small[..n],
        }
    }

    /// Replaces the (written out) buffer with one four times larger, if the memory allows.
    fn grow(&mut self) {
        let (now, next) = (self.capacity(), (self.capacity() * 4).min(BUF_MAX));
        // The old buffer goes as the new one comes: the step takes only the difference.
        if next <= now || !self.memory.take(next - self.granted()) {
            return;
        }
        match memmap2::MmapMut::map_anon(next) {
            Ok(map) => {
                self.small = Vec::new();
                self.grown = Some(map);
            }
            // Out of address space or mappings: keep going at the size it is.
            Err(_) => self.memory.give(next - self.granted()),
        }
    }

    /// Gives the buffer back if the relay's watchdog wants it (called while no bytes wait).
    fn release_if_wanted(&mut self) {
        if self.state.wanted.load(Ordering::Relaxed) {
            self.state.wanted.store(false, Ordering::Relaxed);
            self.release();
        }
    }

    /// Gives the buffer back; the next read starts small again.
    #[cold]
    fn release(&mut self) {
        self.memory.give(self.granted());
        self.grown = None;
        self.small = Vec::new();
        self.state.held.store(false, Ordering::Relaxed);
    }
}

impl Drop for RelayBuf<'_> {
    fn drop(&mut self) {
        self.memory.give(self.granted());
        self.state.held.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(limit: usize) -> Arc<RelayMemory> {
        RelayMemory::new(limit, IntGauge::new("g", "g").expect("gauge"))
    }

    /// A connected pair of loopback sockets.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let near = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        (near, listener.accept().await.expect("accept").0)
    }

    #[test]
    fn the_watchdog_wants_back_the_buffers_of_quiet_directions() {
        let moved = RelayedBytes::default();
        let wanted = || moved.bufs.each_ref().map(|b| b.wanted.load(Ordering::Relaxed));
        let seen = moved.counts();
        let now = moved.last.get();
        assert!(!moved.want_quiet_buffers(seen, now), "no buffer is held");
        moved.bufs[0].held.store(true, Ordering::Relaxed);
        moved.bufs[1].held.store(true, Ordering::Relaxed);
        moved.tx.fetch_add(1, Ordering::Relaxed);
        assert!(moved.want_quiet_buffers(seen, now));
        assert_eq!(wanted(), [true, false], "the direction that moved a byte keeps its buffer");
        moved.clear_wants();
        assert_eq!(wanted(), [false, false]);
        // Its bytes were read a BUF_KEEP ago, with nothing read either way since.
        assert!(moved.want_quiet_buffers(seen, now + BUF_KEEP));
        assert_eq!(wanted(), [true, true], "a relay quiet for a BUF_KEEP gives back every buffer");
    }

    #[tokio::test]
    async fn a_quiet_direction_gives_its_buffer_back_while_the_connection_stays_open() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, client_side) = pair().await;
        let (upstream_side, mut upstream) = pair().await;
        let m = memory(64 << 20);
        let moved = RelayedBytes::default();
        let held = || moved.bufs.each_ref().map(|b| b.held.load(Ordering::Relaxed));
        let relaying = relay(&client_side, &upstream_side, Duration::from_secs(3600), &m, None, &moved);
        let checks = async {
            // A bulk burst one way grows that direction's buffer.
            let burst = vec![7u8; 1 << 20];
            let mut arrived = vec![0u8; burst.len()];
            let (sent, read) = tokio::join!(client.write_all(&burst), upstream.read_exact(&mut arrived));
            sent.expect("write");
            read.expect("read");
            assert_eq!(held(), [true, false]);
            assert!(m.used() > 0, "the burst grew no buffer");
            let quiet = std::time::Instant::now();
            let deadline = quiet + Duration::from_secs(10);
            while held() != [false, false] || m.used() > 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{:?} held, {} bytes grown, after 10 s",
                    held(),
                    m.used()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            println!("given back {:?} after the last bytes", quiet.elapsed());
            // The connection still relays, from a new first buffer, each way.
            let mut one = [0u8; 1];
            client.write_all(b"x").await.expect("write");
            upstream.read_exact(&mut one).await.expect("read");
            upstream.write_all(b"y").await.expect("write");
            client.read_exact(&mut one).await.expect("read");
            assert_eq!((one, held(), m.used()), ([b'y'], [true, true], 0));
        };
        tokio::select! {
            ended = relaying => panic!("the relay ended: {ended:?}"),
            () = checks => {}
        }
    }

    /// Grows `buf` as a stream of full reads would, and returns the sizes it went through.
    fn fill_repeatedly(buf: &mut RelayBuf<'_>) -> Vec<usize> {
        let mut sizes = Vec::new();
        for _ in 0..8 {
            if buf.capacity() == 0 {
                buf.small = Vec::with_capacity(BUF_MIN);
            }
            sizes.push(buf.capacity());
            buf.grow();
        }
        sizes
    }

    #[test]
    fn a_bulk_stream_grows_its_buffer_fourfold_up_to_the_most() {
        let state = BufState::default();
        let m = memory(64 << 20);
        let mut buf = RelayBuf::new(&m, &state);
        assert_eq!(buf.capacity(), 0, "nothing is allocated before bytes arrive");
        let k = 1024;
        assert_eq!(
            fill_repeatedly(&mut buf),
            [16 * k, 64 * k, 256 * k, 1024 * k, 4096 * k, 4096 * k, 4096 * k, 4096 * k]
        );
        assert_eq!(m.used(), BUF_MAX);
        assert_eq!(m.gauge.get(), BUF_MAX as i64);
        buf.release();
        assert_eq!((m.used(), m.gauge.get(), buf.capacity()), (0, 0, 0));
        assert_eq!(fill_repeatedly(&mut buf)[0], BUF_MIN, "after a pause it starts small again");
    }

    #[test]
    fn buffers_stop_growing_when_the_shared_memory_is_taken() {
        let state = BufState::default();
        let m = memory(5 << 20);
        let mut first = RelayBuf::new(&m, &state);
        fill_repeatedly(&mut first);
        assert_eq!(m.used(), 4 << 20);
        // 1 MiB is left: a second stream reaches 1 MiB, and cannot take the 4 MiB step.
        let mut second = RelayBuf::new(&m, &state);
        let sizes = fill_repeatedly(&mut second);
        assert_eq!(sizes.last(), Some(&(1 << 20)));
        assert_eq!(m.used(), 5 << 20);
        // A third stays at the size every connection starts with, and still moves bytes.
        let mut third = RelayBuf::new(&m, &state);
        assert_eq!(fill_repeatedly(&mut third), [BUF_MIN; 8]);
        drop(first);
        assert_eq!(m.used(), 1 << 20, "a connection's end gives its buffer back");
        drop(second);
        assert_eq!((m.used(), m.gauge.get()), (0, 0));
    }

    #[test]
    fn with_no_relay_memory_buffers_keep_their_first_size() {
        let state = BufState::default();
        let m = memory(0);
        let mut buf = RelayBuf::new(&m, &state);
        assert_eq!(fill_repeatedly(&mut buf), [BUF_MIN; 8]);
        assert_eq!(m.used(), 0);
    }
}
