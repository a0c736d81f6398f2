//! TCP listeners (CONTRACT 4): each connection goes to an endpoint chosen by the listener's rule
//! (or its `service`), with connect failover, then bytes flow both ways until both sides have
//! closed, honouring half-close, with an idle timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::debug;

use super::balance::{self, PickInput, Tried};
use super::upstream;
use super::{Limits, Tracker};
use crate::access_log::{self, AccessLog};
use crate::health::OutlierSink;
use crate::metrics::Metrics;
use crate::proxy::http::codec::IpText;
use crate::routing::RouteReader;
use crate::routing::docs::{HashOn, LbPolicy};
use crate::routing::table::{ListenerId, hash_bytes};
use crate::shutdown::Shutdown;

/// Everything a TCP listener's connections share.
pub struct TcpContext {
    pub listener: ListenerId,
    pub name: Arc<str>,
    pub routes: RouteReader,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub shutdown: Shutdown,
    pub tracker: Arc<Tracker>,
    pub outliers: OutlierSink,
    pub access_log: Option<Arc<AccessLog>>,
    rx: IntCounter,
    tx: IntCounter,
    active: IntGauge,
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
        outliers: OutlierSink,
        access_log: Option<Arc<AccessLog>>,
    ) -> Self {
        let rx = metrics.tcp_bytes.with_label_values(&[&name, "rx"]);
        let tx = metrics.tcp_bytes.with_label_values(&[&name, "tx"]);
        let active = metrics.tcp_active_connections.with_label_values(&[&name]);
        TcpContext { listener, name, routes, metrics, limits, shutdown, tracker, outliers, access_log, rx, tx, active }
    }
}

/// Accepts connections until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<TcpContext>) {
    let c = ctx.clone();
    super::accept_loop(
        listener,
        &c.name,
        c.limits.max_connections,
        &c.tracker,
        &c.metrics,
        c.shutdown.clone(),
        |s, peer| {
            let ctx = ctx.clone();
            async move { handle(s, peer, &ctx).await }
        },
    )
    .await;
}

async fn handle(client: TcpStream, peer: SocketAddr, ctx: &TcpContext) {
    let route = {
        let guard = ctx.routes.load();
        match guard.as_ref().and_then(|t| t.listener(ctx.listener)).and_then(|l| l.first()) {
            Some(r) => r.clone(),
            None => {
                debug!(listener = %ctx.name, "no route for a TCP connection: closing it");
                return;
            }
        }
    };
    let Some((_, first)) = route.target_at(fastrand::u32(..)) else { return };
    let target = if first.set.active().is_empty() {
        route.targets.iter().find(|t| t.weight > 0 && !t.set.active().is_empty()).unwrap_or(first)
    } else {
        first
    };
    target.stats.tcp_accepted();
    let hash = match &target.set.policy.lb {
        LbPolicy::RingHash(HashOn::SourceIp | HashOn::Header(_)) => Some(hash_bytes(IpText::new(peer.ip()).as_bytes())),
        _ => None,
    };
    let mut tried = Tried::default();
    let mut attempts_left = route.retries;
    let upstream = loop {
        let Some(i) = balance::pick(&target.set, PickInput { hash }, &tried) else {
            debug!(listener = %ctx.name, "no endpoint could be reached: closing the client connection");
            return;
        };
        tried.push(i);
        let endpoint = &target.set.endpoints[i];
        match upstream::connect(&endpoint.addr, target.set.policy.connect_timeout).await {
            Ok(s) => {
                endpoint.state.record_success();
                break (s, endpoint.state.start_request());
            }
            Err(e) => {
                debug!(endpoint = %endpoint.addr, error = %e, "upstream connect failed");
                target.stats.connect_failed();
                ctx.outliers.failure(&target.set, i);
                if attempts_left == 0 {
                    return;
                }
                attempts_left -= 1;
                target.stats.retried();
            }
        }
    };
    let ((upstream, in_flight), started) = (upstream, Instant::now());
    drop(route);
    let _ = client.set_nodelay(true);
    ctx.active.inc();
    let moved = Moved::default();
    let result = relay(&client, &upstream, ctx, &moved).await;
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
            duration: started.elapsed(),
            bytes_in: moved.rx.load(Ordering::Relaxed),
            bytes_out: moved.tx.load(Ordering::Relaxed),
        });
    }
}

/// Bytes a connection moved each way.
#[derive(Default)]
struct Moved {
    rx: AtomicU64,
    tx: AtomicU64,
}

/// Copies both ways until both directions have ended, or the connection idles out.
async fn relay(client: &TcpStream, upstream: &TcpStream, ctx: &TcpContext, moved: &Moved) -> io::Result<()> {
    let last = Activity::new();
    let idle = ctx.limits.tcp_idle_timeout;
    let up = pump(client, upstream, (&ctx.rx, &moved.rx), &last);
    let down = pump(upstream, client, (&ctx.tx, &moved.tx), &last);
    let watchdog = async {
        loop {
            tokio::time::sleep_until(last.get() + idle).await;
            if last.get() + idle <= Instant::now() {
                return;
            }
        }
    };
    let both = async {
        let (a, b) = tokio::join!(up, down);
        a.and(b)
    };
    tokio::select! {
        r = both => r,
        _ = watchdog => Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout")),
    }
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

/// One direction: `src` to `dst` until `src` ends, then half-close `dst`.
///
/// The bytes pass through a buffer in user space that starts small, so that the many connections
/// that carry little cost little, and grows while reads keep filling it, up to [`BUF_MAX`]. Measured
/// on these machines, a 1 MiB buffer moved bulk data with as little proxy CPU as `splice(2)` and
/// 15 to 30% more throughput: with splice the load core did more work per byte, likely because
/// the sender's pages stay referenced until the receiver has read them (`docs/PERFORMANCE.md`).
async fn pump(src: &TcpStream, dst: &TcpStream, bytes: (&IntCounter, &AtomicU64), last: &Activity) -> io::Result<()> {
    let result = copy_loop(src, dst, bytes, last).await;
    // Half-close: the other side sees EOF and may still answer.
    let _ = rustix::net::shutdown(dst.as_fd(), rustix::net::Shutdown::Write);
    result
}

/// The buffer a direction starts with, once its first bytes arrive.
const BUF_MIN: usize = 16 * 1024;
/// The most a buffer grows to: one read and one write move up to this much.
const BUF_MAX: usize = 1 << 20;
/// How long a grown buffer is kept while no bytes arrive.
const BUF_KEEP: Duration = Duration::from_secs(1);

async fn copy_loop(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: (&IntCounter, &AtomicU64),
    last: &Activity,
) -> io::Result<()> {
    // Allocated when the first bytes arrive: a connection that waits holds no buffer. Reads go
    // into its spare capacity, which is never zeroed.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() > BUF_MIN {
            // A buffer grown for a burst is kept through short pauses and given back after a long one.
            match tokio::time::timeout(BUF_KEEP, src.readable()).await {
                Ok(ready) => ready?,
                Err(_) => {
                    buf = Vec::new();
                    src.readable().await?;
                }
            }
        } else {
            src.readable().await?;
        }
        if buf.capacity() == 0 {
            buf = Vec::with_capacity(BUF_MIN);
        }
        buf.clear();
        let n = match src.try_read_buf(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        last.touch();
        let mut off = 0;
        while off < n {
            dst.writable().await?;
            match dst.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        bytes.0.inc_by(n as u64);
        bytes.1.fetch_add(n as u64, Ordering::Relaxed);
        // A full read means more was waiting: a bulk stream, which moves cheaper in larger steps.
        if n == buf.capacity() && buf.capacity() < BUF_MAX {
            buf = Vec::with_capacity((buf.capacity() * 4).min(BUF_MAX));
        }
    }
}
