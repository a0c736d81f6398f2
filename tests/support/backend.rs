//! Real backends for data-plane tests: an HTTP server (hyper) that says who it is and echoes what
//! it received, and raw TCP servers for misbehaviour.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// What a backend saw and how it behaves.
#[derive(Default)]
pub struct BackendState {
    pub requests: AtomicUsize,
    /// Health endpoint (`/health`) answers 200 while true, 503 otherwise.
    pub healthy: AtomicBool,
    /// Every request answers this status when non-zero.
    pub force_status: AtomicUsize,
    /// Every request waits this many milliseconds before answering.
    pub delay_ms: AtomicUsize,
    /// Connections accepted.
    pub connections: AtomicUsize,
    /// Health checks answered.
    pub health_checks: AtomicUsize,
}

/// A running HTTP backend; stops when dropped.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    pub state: Arc<BackendState>,
    task: JoinHandle<()>,
    /// Every connection's task, so that a kill closes them too.
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Backend {
    /// An HTTP/1.1 (and h2c) backend named `name` on a free loopback port.
    ///
    /// It answers with body `name`, header `x-backend: name`, and `x-echo-<header>` for every
    /// request header. Query parameters: `sleep_ms=N` delays the answer, `status=N` sets the
    /// status, `echo=1` answers with the request body.
    pub async fn http(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Backend::serve(name, listener)
    }

    /// The same on a given port (to bring a backend back where it was).
    pub async fn http_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).await.unwrap();
        Backend::serve(name, listener)
    }

    fn serve(name: &str, listener: TcpListener) -> Backend {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(BackendState { healthy: AtomicBool::new(true), ..Default::default() });
        let connections = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (n, s, conns) = (name.to_owned(), state.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                s.connections.fetch_add(1, Ordering::SeqCst);
                let (n, s) = (n.clone(), s.clone());
                let handle = tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let (n, s) = (n.clone(), s.clone());
                        async move { Ok::<_, Infallible>(answer(&n, &s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
                conns.lock().unwrap().push(handle.abort_handle());
            }
        });
        Backend { name: name.to_owned(), addr, state, task, connections }
    }

    /// Kills the backend: the listener and every open connection close at once.
    pub fn kill(&self) {
        self.task.abort();
        for c in self.connections.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn health_checks(&self) -> usize {
        self.state.health_checks.load(Ordering::SeqCst)
    }

    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.healthy.store(healthy, Ordering::SeqCst);
    }
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

async fn answer(name: &str, state: &BackendState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/health" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let ok = state.healthy.load(Ordering::SeqCst);
        let mut r = Response::new(Full::new(Bytes::from(if ok { "ok" } else { "sick" })));
        *r.status_mut() = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        return r;
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    if req.headers().get("upgrade").is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket")) {
        return websocket_echo(req);
    }
    let q = query(&req);
    let delay = q.get("sleep_ms").and_then(|v| v.parse().ok()).unwrap_or(state.delay_ms.load(Ordering::SeqCst) as u64);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut builder = Response::builder().header("x-backend", name);
    for (k, v) in req.headers() {
        builder = builder.header(format!("x-echo-{k}"), v.clone());
    }
    let status = q.get("status").and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        match state.force_status.load(Ordering::SeqCst) {
            0 => 200,
            s => s as u16,
        }
    });
    let echo = q.contains_key("echo");
    let body = if echo {
        req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default()
    } else {
        Bytes::from(name.to_owned())
    };
    builder.status(status).body(Full::new(body)).unwrap()
}

/// Answers 101 and echoes every byte back on the upgraded connection.
fn websocket_echo(req: Request<Incoming>) -> Response<Full<Bytes>> {
    tokio::spawn(async move {
        if let Ok(upgraded) = hyper::upgrade::on(req).await {
            let mut io = TokioIo::new(upgraded);
            let mut buf = [0u8; 1024];
            loop {
                match io.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if io.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A raw TCP server that reads one request head and then does `then`.
pub struct RawBackend {
    pub addr: SocketAddr,
    /// Requests read.
    pub requests: Arc<AtomicUsize>,
    /// Connections on which the client hung up while the backend was still holding the request.
    pub hangups: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a [`RawBackend`] does after reading a request.
#[derive(Clone, Copy)]
pub enum Misbehave {
    /// Close the connection without answering.
    Drop,
    /// Hold the request, never answering, and note when the client hangs up.
    Hold,
    /// Answer every request on the connection with these bytes.
    Answer(&'static [u8]),
}

impl RawBackend {
    pub async fn start(then: Misbehave) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let hangups = Arc::new(AtomicUsize::new(0));
        let (r, h) = (requests.clone(), hangups.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else { return };
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        r.fetch_add(1, Ordering::SeqCst);
                        let Misbehave::Answer(bytes) = then else { break };
                        head.clear();
                        if stream.write_all(bytes).await.is_err() {
                            return;
                        }
                    }
                    match then {
                        Misbehave::Answer(_) => {}
                        Misbehave::Drop => drop(stream),
                        Misbehave::Hold => loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => {
                                    h.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Ok(_) => {}
                            }
                        },
                    }
                });
            }
        });
        RawBackend { addr, requests, hangups, task }
    }
}

/// A loopback address where nothing listens (connections are refused).
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}
