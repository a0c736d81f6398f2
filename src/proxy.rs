//! The data plane: listeners that take local HTTP requests and TCP connections, match them
//! against the routing table in force, pick an endpoint and forward. It reads the table through a
//! [`RouteReader`](crate::routing::RouteReader) and endpoint state through the table; it never
//! waits on the control plane and never imports it.

pub(crate) mod attempt;
pub mod balance;
pub(crate) mod error;
pub(crate) mod grpc;
pub(crate) mod http;
mod lazy_timeout;
pub(crate) mod stream;
pub(crate) mod tcp;
pub(crate) mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::net::Listener;
use tokio::sync::Notify;
use tracing::debug;

use crate::metrics::Metrics;
use crate::shutdown::{LastingWait, Shutdown};

/// A listener's accept loop: until shutdown, each connection runs `handle` on a task of its own,
/// and connections beyond `max` open ones are closed at once and counted.
pub async fn accept_loop<F, Fut>(
    listener: &Listener,
    name: &str,
    max: usize,
    tracker: &Arc<Tracker>,
    metrics: &Metrics,
    shutdown: Shutdown,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let refused = metrics.connections_refused.with_label_values(&[name]);
    // One wait for the signal for the loop's life: a wait made afresh for every connection
    // joined and left the signal's waiters, two locks and about 400 instructions per accepted
    // connection.
    let mut wait = LastingWait::new(shutdown.clone());
    let mut stopped = std::pin::pin!(wait.triggered(&shutdown));
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    debug!(listener = %name, error = %e, "accept failed");
                    // Out of descriptors and the like: let the situation ease.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            () = &mut stopped => return,
        };
        let Some(tracked) = tracker.try_track(max) else {
            refused.inc();
            continue;
        };
        tokio::spawn(Counted { work: handle(stream, peer), _tracked: tracked });
    }
}

pin_project_lite::pin_project! {
    /// A connection's task: its work, counted open until it ends. A struct, not an `async` block,
    /// which would keep the work twice (the capture and the future it is awaited as) in the task
    /// of every held connection (docs/PERFORMANCE.md, "Memory per held connection").
    struct Counted<F> {
        #[pin]
        work: F,
        // Dropped after the work.
        _tracked: Tracked,
    }
}

impl<F: Future<Output = ()>> Future for Counted<F> {
    type Output = ();

    #[inline]
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        self.project().work.poll(cx)
    }
}

/// Per-listener limits, from the local configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    /// An HTTP/2 stream with nothing happening on it for this long is reset.
    pub stream_idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub drop_underscore_headers: bool,
    /// Adds `x-request-id` to requests that have none (`proxy.request_id`).
    pub request_id: bool,
    pub tcp_idle_timeout: Duration,
    /// Shared by every TCP listener: what their relay buffers may grow into.
    pub tcp_relay_memory: Arc<tcp::RelayMemory>,
    /// For upstream connections to this host.
    pub congestion: crate::net::LoopbackCongestion,
}

/// Counts a listener's open connections, for the connection limit and for draining.
#[derive(Default, Debug)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

/// One open connection, until dropped.
#[derive(Debug)]
pub struct Tracked(Arc<Tracker>);

impl Tracker {
    pub fn new() -> Arc<Self> {
        Arc::new(Tracker::default())
    }

    /// Counts a new connection unless `max` are open already.
    pub fn try_track(self: &Arc<Self>, max: usize) -> Option<Tracked> {
        let mut n = self.active.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match self.active.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Tracked(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Waits until no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
