//! A fault-injecting TCP proxy to put between a ZooKeeper client and a real server. It forwards
//! bytes and never answers anything itself; it knows ZooKeeper's framing (a 4-byte big-endian
//! length, then the body) so that a fault can strike at a chosen moment: right after the Nth
//! reply, or after a reply larger than N bytes. A fault drops the connection (both sides closed
//! at once, so the client reconnects at once) or stalls every connection, new ones included, for
//! a while. It also records the operation code of every request, for tests that check what a
//! client asked and in which order.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// ZooKeeper request operation codes the tests look for.
pub mod op {
    pub const GET_DATA: i32 = 4;
    pub const SYNC: i32 = 9;
    pub const GET_CHILDREN2: i32 = 12;
    pub const MULTI_READ: i32 = 22;
    pub const ADD_WATCH: i32 = 106;
    /// Not a ZooKeeper code: the session's connect request, which has no request header.
    pub const CONNECT: i32 = -1000;
}

/// An operation code that no ZooKeeper version assigns.
const UNASSIGNED_OP: i32 = 9999;

/// When an armed fault strikes, counted in server-to-client frames from the moment it is armed.
#[derive(Clone, Copy, Debug)]
pub enum When {
    /// Right after the Nth reply (1 = the next one). Connect responses, pings and watch
    /// notifications are replies too.
    AfterReplies(usize),
    /// Right after the first reply whose body is larger than this many bytes.
    AfterReplyAbove(usize),
}

/// What an armed fault does.
#[derive(Clone, Copy, Debug)]
pub enum Action {
    /// Close both sides of the connection the reply went through.
    Drop,
    /// Forward nothing on any connection, new ones included, for this long.
    Stall(Duration),
}

/// A request seen on the way to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Which connection (0 = the first accepted).
    pub conn: usize,
    pub op: i32,
}

#[derive(Default)]
struct Shared {
    armed: Mutex<Option<(When, Action, usize)>>,
    rewrite: Mutex<Option<(i32, i32)>>,
    requests: Mutex<Vec<Request>>,
    struck: AtomicUsize,
    accepted: AtomicUsize,
}

/// The proxy; stops (with every connection) when dropped.
pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stall: Arc<watch::Sender<Option<Instant>>>,
    task: JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the fault proxy");
        FaultProxy::on(listener, upstream)
    }

    /// Forwards the connections of `listener` to `upstream`.
    pub fn on(listener: TcpListener, upstream: SocketAddr) -> FaultProxy {
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared::default());
        let stall = Arc::new(watch::channel(None).0);
        let (s, st) = (shared.clone(), stall.clone());
        let task = tokio::spawn(async move {
            let mut conns: Vec<JoinHandle<()>> = Vec::new();
            // Aborting this task drops `conns`' handles without stopping them: stop them here.
            struct AbortAll<'a>(&'a mut Vec<JoinHandle<()>>);
            impl Drop for AbortAll<'_> {
                fn drop(&mut self) {
                    self.0.iter().for_each(JoinHandle::abort);
                }
            }
            let guard = AbortAll(&mut conns);
            while let Ok((client, _)) = listener.accept().await {
                let n = s.accepted.fetch_add(1, Ordering::Relaxed);
                let (s, st) = (s.clone(), st.clone());
                guard.0.retain(|t| !t.is_finished());
                guard.0.push(tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    connection(n, client, server, s, st).await;
                }));
            }
        });
        FaultProxy { addr, shared, stall, task }
    }

    /// `127.0.0.1:port` of the proxy, with `chroot` appended (e.g. "/t3-123" or "").
    pub fn connect_string(&self, chroot: &str) -> String {
        format!("{}{chroot}", self.addr)
    }

    /// Arms a fault; it strikes once.
    pub fn arm(&self, when: When, action: Action) {
        *self.shared.armed.lock().expect("lock") = Some((when, action, 0));
    }

    /// How many armed faults have struck so far.
    pub fn struck(&self) -> usize {
        self.shared.struck.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stalls every connection, new ones included, for `d` from now.
    pub fn stall_for(&self, d: Duration) {
        self.stall.send_replace(Some(Instant::now() + d));
    }

    /// Ends a stall now.
    pub fn release(&self) {
        self.stall.send_replace(None);
    }

    /// Makes requests with operation code `op` unknown to the server: their code is replaced by
    /// one no ZooKeeper version assigns, so the real server answers them as a server that
    /// predates the operation does (UNIMPLEMENTED, then it closes the connection).
    pub fn make_unknown(&self, op: i32) {
        *self.shared.rewrite.lock().expect("lock") = Some((op, UNASSIGNED_OP));
    }

    /// Every request seen so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.shared.requests.lock().expect("lock").clone()
    }
}

/// Relays one connection until either side closes or a fault drops it.
async fn connection(
    n: usize,
    client: TcpStream,
    server: TcpStream,
    shared: Arc<Shared>,
    stall: Arc<watch::Sender<Option<Instant>>>,
) {
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    let (drop_tx, drop_rx) = watch::channel(false);
    let up = pump(
        client_r,
        server_w,
        Direction::Requests(n),
        shared.clone(),
        stall.clone(),
        drop_tx.clone(),
        drop_rx.clone(),
    );
    let down = pump(server_r, client_w, Direction::Replies, shared, stall, drop_tx, drop_rx);
    // Either direction ending ends the connection: the halves are dropped, both sockets close.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

#[derive(Clone, Copy)]
enum Direction {
    /// Client to server, on connection n: requests are recorded.
    Requests(usize),
    /// Server to client: faults are evaluated.
    Replies,
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    direction: Direction,
    shared: Arc<Shared>,
    stall: Arc<watch::Sender<Option<Instant>>>,
    drop_tx: watch::Sender<bool>,
    mut drop_rx: watch::Receiver<bool>,
) {
    let mut frames = Frames::default();
    let mut stall_rx = stall.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            _ = drop_rx.wait_for(|d| *d) => return,
        };
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            let until = *stall_rx.borrow_and_update();
            if let Some(until) = until.filter(|u| *u > Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    _ = stall_rx.changed() => {}
                    _ = drop_rx.wait_for(|d| *d) => return,
                }
                continue;
            }
            // Forward frame by frame, so that a fault strikes right after the frame that
            // triggers it, and a request's code can be changed before it leaves.
            let rewrite = match direction {
                Direction::Requests(_) => *shared.rewrite.lock().expect("lock"),
                Direction::Replies => None,
            };
            let step = frames.step(chunk, rewrite);
            let written = if step.head > 0 {
                to.write_all(&frames.head[..step.head]).await
            } else if step.body {
                to.write_all(&chunk[..step.taken]).await
            } else {
                Ok(())
            };
            if written.is_err() {
                return;
            }
            chunk = &chunk[step.taken..];
            let ended = step.ended;
            let Some(frame) = ended else { continue };
            match direction {
                Direction::Requests(conn) => {
                    shared.requests.lock().expect("lock").push(Request { conn, op: frame.op });
                }
                Direction::Replies => match strike(&shared, frame.len) {
                    Some(Action::Drop) => {
                        let _ = to.shutdown().await;
                        drop_tx.send_replace(true);
                        return;
                    }
                    Some(Action::Stall(d)) => {
                        stall.send_replace(Some(Instant::now() + d));
                    }
                    None => {}
                },
            }
        }
    }
}

/// Counts a reply against the armed fault; the action if it strikes now.
fn strike(shared: &Shared, len: usize) -> Option<Action> {
    let mut armed = shared.armed.lock().expect("lock");
    let (when, action, seen) = armed.as_mut()?;
    *seen += 1;
    let now = match *when {
        When::AfterReplies(n) => *seen >= n,
        When::AfterReplyAbove(bytes) => len > bytes,
    };
    if !now {
        return None;
    }
    let action = *action;
    *armed = None;
    shared.struck.fetch_add(1, Ordering::Relaxed);
    Some(action)
}

/// A frame that ended: its body length and, for requests, the operation code.
#[derive(Clone, Copy)]
struct Frame {
    len: usize,
    op: i32,
}

/// What one step of the parser consumed.
struct Step {
    taken: usize,
    /// The frame's head (length and up to 8 body bytes) is complete: write this many bytes of
    /// `Frames::head`.
    head: usize,
    /// The bytes taken are body bytes past the head: write them from the chunk.
    body: bool,
    ended: Option<Frame>,
}

/// Streaming parser of length-prefixed frames. It holds each frame's head (the length and the
/// first 8 body bytes: a request's xid and operation code) until it is complete, so that the
/// code can be read, or changed, before anything of the frame is forwarded.
#[derive(Default)]
struct Frames {
    head: [u8; 12],
    have: usize,
    /// The frame's body length, once its 4 length bytes are in.
    len: Option<usize>,
    /// Body bytes past the head still to come.
    remaining: usize,
    /// Frames completed so far.
    count: usize,
    /// The operation code of the frame in progress, as the client sent it.
    op: i32,
}

fn head_len(len: usize) -> usize {
    4 + len.min(8)
}

impl Frames {
    /// Consumes the next bytes of `chunk`; a request whose code is `rewrite.0` gets `rewrite.1`.
    fn step(&mut self, chunk: &[u8], rewrite: Option<(i32, i32)>) -> Step {
        let in_head = match self.len {
            None => true,
            Some(len) => self.have < head_len(len),
        };
        if !in_head {
            let n = self.remaining.min(chunk.len());
            self.remaining -= n;
            let ended = (self.remaining == 0).then(|| self.end());
            return Step { taken: n, head: 0, body: true, ended };
        }
        let want = self.len.map_or(4, head_len);
        let n = (want - self.have).min(chunk.len());
        self.head[self.have..self.have + n].copy_from_slice(&chunk[..n]);
        self.have += n;
        if self.len.is_none() && self.have == 4 {
            let len = u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]]) as usize;
            self.len = Some(len);
            self.remaining = len - len.min(8);
            if len > 0 {
                return Step { taken: n, head: 0, body: false, ended: None };
            }
        }
        let head = self.have;
        if self.len.is_none_or(|len| head < head_len(len)) {
            return Step { taken: n, head: 0, body: false, ended: None };
        }
        self.op = self.op();
        if let Some((from, to)) = rewrite {
            if self.count > 0 && head == 12 && self.op == from {
                self.head[8..12].copy_from_slice(&to.to_be_bytes());
            }
        }
        let ended = (self.remaining == 0).then(|| self.end());
        Step { taken: n, head, body: false, ended }
    }

    /// The operation code of a request frame (its connect request has none).
    fn op(&self) -> i32 {
        if self.count == 0 {
            op::CONNECT
        } else {
            i32::from_be_bytes([self.head[8], self.head[9], self.head[10], self.head[11]])
        }
    }

    fn end(&mut self) -> Frame {
        let frame = Frame { len: self.len.unwrap_or(0), op: self.op };
        self.count += 1;
        self.have = 0;
        self.len = None;
        frame
    }
}
