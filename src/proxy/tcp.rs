//! TCP listeners (CONTRACT 4): each connection goes to an endpoint chosen by the listener's rule
//! (or its `service`), with connect failover, then bytes flow both ways until both sides have
//! closed, honouring half-close, with an idle timeout. On Linux the bytes move with `splice(2)`
//! through a pipe per direction, so they never enter user space.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use rustix::pipe::{PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tracing::debug;

use super::balance::{self, PickInput, Tried};
use super::upstream;
use super::{Limits, Tracker};
use crate::access_log::{self, AccessLog};
use crate::health::OutlierSink;
use crate::metrics::Metrics;
use crate::routing::RouteReader;
use crate::routing::docs::{HashOn, LbPolicy};
use crate::routing::table::{ListenerId, hash_bytes};
use crate::shutdown::Shutdown;

/// The pipe size asked for: the most one splice call moves.
const PIPE_SIZE: usize = 1 << 20;

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
        LbPolicy::RingHash(HashOn::SourceIp | HashOn::Header(_)) => Some(hash_bytes(peer.ip().to_string().as_bytes())),
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
async fn pump(src: &TcpStream, dst: &TcpStream, bytes: (&IntCounter, &AtomicU64), last: &Activity) -> io::Result<()> {
    let result = match Pipe::new() {
        Ok(pipe) => splice_loop(src, dst, &pipe, bytes, last).await,
        Err(_) => copy_loop(src, dst, bytes, last).await,
    };
    // Half-close: the other side sees EOF and may still answer.
    let _ = rustix::net::shutdown(dst.as_fd(), rustix::net::Shutdown::Write);
    result
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes the pipe holds at most.
    capacity: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (read, write) = rustix::pipe::pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // Best effort: a larger pipe moves more per call; the kernel caps it per user.
        let capacity = rustix::pipe::fcntl_setpipe_size(&write, PIPE_SIZE)
            .or_else(|_| rustix::pipe::fcntl_getpipe_size(&write))
            .unwrap_or(64 * 1024);
        Ok(Pipe { read, write, capacity })
    }
}

/// Moves bytes from `src` to `dst` through the pipe: fill it with what `src` has, drain it into
/// `dst` as far as `dst` takes, and wait only when neither can move, so reading and writing
/// overlap instead of taking turns.
async fn splice_loop(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    bytes: (&IntCounter, &AtomicU64),
    last: &Activity,
) -> io::Result<()> {
    let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
    let (mut in_pipe, mut eof) = (0usize, false);
    loop {
        let mut moved = false;
        if !eof && in_pipe < pipe.capacity {
            let room = pipe.capacity - in_pipe;
            let mut got = 0;
            // A short read drained the socket: report it as WouldBlock too, so that tokio clears
            // the readiness and the next attempt waits instead of failing with EAGAIN.
            match src.try_io(Interest::READABLE, || {
                got = rustix::pipe::splice(src.as_fd(), None, &pipe.write, None, room, flags)?;
                if got > 0 && got < room { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
            }) {
                Ok(()) if got == 0 => eof = true,
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if got > 0 {
                in_pipe += got;
                moved = true;
                bytes.0.inc_by(got as u64);
                bytes.1.fetch_add(got as u64, Ordering::Relaxed);
            }
        }
        if in_pipe > 0 {
            let mut put = 0;
            // Likewise a short write: the send buffer is full.
            match dst.try_io(Interest::WRITABLE, || {
                put = rustix::pipe::splice(&pipe.read, None, dst.as_fd(), None, in_pipe, flags)?;
                if put < in_pipe { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
            }) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if put > 0 {
                in_pipe -= put;
                moved = true;
            }
        }
        if eof && in_pipe == 0 {
            return Ok(());
        }
        if moved {
            last.touch();
            // Counts against the task's cooperative budget, yielding only when it is spent, so a
            // fast stream cannot starve the other direction or other connections.
            tokio::task::consume_budget().await;
            continue;
        }
        // Neither side can move: wait for the one (or either) that would unblock this direction.
        let can_read = !eof && in_pipe < pipe.capacity;
        match (can_read, in_pipe > 0) {
            (true, false) => src.readable().await?,
            (false, true) => dst.writable().await?,
            _ => {
                tokio::select! {
                    r = src.readable() => r?,
                    w = dst.writable() => w?,
                }
            }
        }
    }
}

/// The portable path: a buffer in user space.
async fn copy_loop(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: (&IntCounter, &AtomicU64),
    last: &Activity,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        src.readable().await?;
        let n = match src.try_read(&mut buf) {
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
    }
}
