//! One h2c client connection and the limits it is held to, as an HTTP/1 connection is to its own:
//! a header block (or any frame but DATA) that has begun must arrive whole within
//! `header_read_timeout` (slowloris; nginx applies `client_header_timeout` the same way), a
//! connection without open streams is closed after `idle_timeout` (GOAWAY, as Envoy drains it),
//! a stream on which nothing happens for `stream_idle_timeout` is reset (Envoy's
//! `stream_idle_timeout`), and at most `h2_max_concurrent_streams` streams are open at once.
//! hyper's server keeps its defences against floods of resets (CVE-2023-44487).

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::proxy::stream::ClientStream;
use hyper::body::Incoming;
use hyper::service::HttpService;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

use super::super::codec::IoBuf;
use crate::proxy::Limits;
use crate::shutdown::Shutdown;

/// Serves an h2c connection whose first bytes (the preface, at least) are in `prefix`, with
/// `service` answering each stream, until the client closes it, it idles out, or shutdown.
pub async fn serve<S, B>(stream: ClientStream, prefix: IoBuf, limits: &Limits, mut shutdown: Shutdown, service: S)
where
    S: HttpService<Incoming, ResBody = B> + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let streams = Arc::new(Streams::default());
    let exec = StreamExec { streams: streams.clone(), idle: limits.stream_idle_timeout };
    let io = ClientIo::new(prefix, stream, limits.header_read_timeout);
    let conn = hyper::server::conn::http2::Builder::new(exec)
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        // A client silent this long is pinged, and dropped if it does not answer within
        // hyper's 20 s: a peer gone without a FIN does not keep its streams forever.
        .keep_alive_interval(limits.idle_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = pin!(conn);

    // The idle time runs while no stream is open, from the end of the last one.
    let mut idle = pin!(tokio::time::sleep(limits.idle_timeout));
    let mut ended = 0;
    loop {
        let quiet = streams.open.load(Ordering::Acquire) == 0;
        if quiet && streams.ended.load(Ordering::Acquire) != ended {
            ended = streams.ended.load(Ordering::Acquire);
            idle.as_mut().reset(Instant::now() + limits.idle_timeout);
        }
        tokio::select! {
            biased;
            _ = conn.as_mut() => return,
            _ = shutdown.wait() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = streams.changed.notified() => {}
            _ = idle.as_mut(), if quiet => break,
        }
    }
    // GOAWAY, then the close once the client has seen it. A client that says nothing more
    // (it never answers the GOAWAY's ping) is dropped once no stream is left open.
    conn.as_mut().graceful_shutdown();
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(limits.header_read_timeout) => {
                if streams.open.load(Ordering::Acquire) == 0 {
                    return;
                }
            }
        }
    }
}

/// The streams of one connection, as its executor sees them.
#[derive(Default)]
struct Streams {
    open: AtomicUsize,
    /// Streams ended so far: the connection's idle time counts from the last end.
    ended: AtomicUsize,
    /// Told when `open` leaves or reaches zero.
    changed: Notify,
}

/// One open stream, until dropped.
struct OpenStream(Arc<Streams>);

impl Streams {
    fn start(self: &Arc<Self>) -> OpenStream {
        if self.open.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_one();
        }
        OpenStream(self.clone())
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.ended.fetch_add(1, Ordering::AcqRel);
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.changed.notify_one();
        }
    }
}

/// Runs each stream hyper hands over (its request, then its response body) as a task that is
/// dropped when nothing has woken it for `idle`: no request data from the client, no response
/// bytes from the upstream, no flow-control window from a client that stopped reading. Dropping
/// the stream resets it (RST_STREAM CANCEL) and closes its upstream connection.
#[derive(Clone)]
struct StreamExec {
    streams: Arc<Streams>,
    idle: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let open = self.streams.start();
        tokio::spawn(StreamTask { stream, quiet: tokio::time::sleep(self.idle), idle: self.idle, _open: open });
    }
}

pin_project_lite::pin_project! {
    /// One stream's task: the stream and its idle timer, each stored once. An `async` block that
    /// pins the stream it captured keeps it twice (the capture and the pinned local), 4 KiB more
    /// in the task of every open stream (docs/PERFORMANCE.md, "Memory per held connection").
    struct StreamTask<F> {
        #[pin]
        stream: F,
        #[pin]
        quiet: Sleep,
        idle: Duration,
        // Dropped after the stream.
        _open: OpenStream,
    }
}

impl<F: Future<Output = ()>> Future for StreamTask<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        // Every poll but the timer's own pushes the timer back, so it fires only after `idle`
        // without one.
        if this.quiet.as_mut().poll(cx).is_ready() || this.stream.poll(cx).is_ready() {
            return Poll::Ready(());
        }
        this.quiet.as_mut().reset(Instant::now() + *this.idle);
        let _ = this.quiet.poll(cx);
        Poll::Pending
    }
}

/// The client side of the connection: first the bytes read while telling HTTP/2 from HTTP/1,
/// then the socket. Reads go through a [`FrameWatch`], and fail once an unfinished header block
/// or frame has waited longer than the header timeout.
struct ClientIo {
    prefix: IoBuf,
    inner: ClientStream,
    frames: FrameWatch,
    header_timeout: Duration,
    deadline: Pin<Box<Sleep>>,
    armed: bool,
}

impl ClientIo {
    fn new(prefix: IoBuf, inner: ClientStream, header_timeout: Duration) -> Self {
        ClientIo {
            prefix,
            inner,
            frames: FrameWatch::default(),
            header_timeout,
            deadline: Box::pin(tokio::time::sleep(header_timeout)),
            armed: false,
        }
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let start = buf.filled().len();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.filled()[..n]);
            this.prefix.consume(n);
            // Read whole: the connection holds it no longer.
            this.prefix.release();
        } else {
            match Pin::new(&mut this.inner).poll_read(cx, buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if this.armed && this.deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "an HTTP/2 header block did not arrive in time",
                        )));
                    }
                    return Poll::Pending;
                }
            }
        }
        match this.frames.scan(&buf.filled()[start..]) {
            Waiting::Nothing => this.armed = false,
            Waiting::Begun => {
                this.deadline.as_mut().reset(Instant::now() + this.header_timeout);
                this.armed = true;
            }
            Waiting::Rest if !this.armed => {
                this.deadline.as_mut().reset(Instant::now() + this.header_timeout);
                this.armed = true;
            }
            Waiting::Rest => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What the connection waits for after the bytes scanned.
#[derive(Debug, PartialEq, Eq)]
enum Waiting {
    /// Nothing begun: the next frame, or more of a DATA frame's payload.
    Nothing,
    /// The rest of a header block or frame that began in these bytes.
    Begun,
    /// The rest of one that began earlier.
    Rest,
}

/// HTTP/2 frame types and flags (RFC 9113 section 6).
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PREFACE_LEN: usize = 24;

/// Follows the frames a client sends, by their 9-byte headers alone, to know whether a header
/// block (a HEADERS frame and its CONTINUATIONs, RFC 9113 section 4.3) or a frame other than
/// DATA is unfinished. It does not check anything: hyper's h2 does.
#[derive(Debug)]
struct FrameWatch {
    /// Preface bytes still to pass (hyper reads the preface through this too).
    preface: usize,
    head: [u8; 9],
    have: usize,
    /// Payload bytes left of the current frame, and whether they are watched (not DATA).
    left: usize,
    watched: bool,
    /// Between a HEADERS frame without END_HEADERS and the CONTINUATION that has it.
    in_block: bool,
}

impl Default for FrameWatch {
    fn default() -> Self {
        FrameWatch { preface: PREFACE_LEN, head: [0; 9], have: 0, left: 0, watched: false, in_block: false }
    }
}

impl FrameWatch {
    fn scan(&mut self, mut bytes: &[u8]) -> Waiting {
        let mut begun = false;
        while !bytes.is_empty() {
            let n = if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                n
            } else if self.left > 0 {
                let n = self.left.min(bytes.len());
                self.left -= n;
                n
            } else {
                if self.have == 0 && !self.in_block {
                    begun = true;
                }
                let n = (9 - self.have).min(bytes.len());
                self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
                self.have += n;
                if self.have == 9 {
                    self.have = 0;
                    let [l0, l1, l2, kind, flags, ..] = self.head;
                    self.left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                    self.watched = kind != DATA;
                    if kind == HEADERS || kind == CONTINUATION {
                        self.in_block = flags & END_HEADERS == 0;
                    }
                }
                n
            };
            bytes = &bytes[n..];
        }
        let unfinished = self.in_block || self.have > 0 || (self.left > 0 && self.watched);
        match (unfinished, begun) {
            (false, _) => Waiting::Nothing,
            (true, true) => Waiting::Begun,
            (true, false) => Waiting::Rest,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags, 0, 0, 0, 1];
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn unfinished_header_blocks_and_frames_are_seen_wherever_the_reads_split() {
        let mut w = FrameWatch::default();
        assert_eq!(w.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), Waiting::Nothing);
        // SETTINGS, whole; then a DATA frame's payload may take its time.
        assert_eq!(w.scan(&frame(0x4, 0, &[0; 6])), Waiting::Nothing);
        let data = frame(DATA, 0, &[7; 100]);
        assert_eq!(w.scan(&data[..20]), Waiting::Nothing);
        assert_eq!(w.scan(&data[20..]), Waiting::Nothing);
        // HEADERS without END_HEADERS: unfinished until the CONTINUATION that ends it.
        assert_eq!(w.scan(&frame(HEADERS, 0, &[1; 10])), Waiting::Begun);
        let cont = frame(CONTINUATION, 0, &[2; 10]);
        assert_eq!(w.scan(&cont), Waiting::Rest);
        let last = frame(CONTINUATION, END_HEADERS, &[3; 10]);
        assert_eq!(w.scan(&last[..12]), Waiting::Rest);
        assert_eq!(w.scan(&last[12..]), Waiting::Nothing);
        // A frame header cut short, and a PING's payload cut short, are unfinished.
        let ping = frame(0x6, 0, &[0; 8]);
        assert_eq!(w.scan(&ping[..4]), Waiting::Begun);
        assert_eq!(w.scan(&ping[4..12]), Waiting::Rest);
        assert_eq!(w.scan(&ping[12..]), Waiting::Nothing);
        // One byte at a time gives the same end.
        let mut all = frame(HEADERS, END_HEADERS, &[9; 5]);
        all.extend(frame(DATA, 1, &[1; 3]));
        let mut last = Waiting::Nothing;
        for b in &all {
            last = w.scan(std::slice::from_ref(b));
        }
        assert_eq!(last, Waiting::Nothing);
    }
}
