//! Test harness: real ZooKeeper servers or a routes file, a zkroute started in this process on
//! port 0, a small HTTP client, and polling with deadlines instead of sleeps.

#![allow(dead_code, unused_imports)] // each test binary uses a different part of the harness

pub mod backend;
pub mod binary;
pub mod browser;
pub mod deps;
pub mod h2client;
pub mod h2frames;
pub mod pki;
pub mod routes;
pub mod scripted;
pub mod tcp;
pub mod wire;
pub mod zk;
pub mod zk_fault;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;
use zkroute::{App, Config};

pub use backend::{Backend, Misbehave, RawBackend, refused_addr};
pub use binary::Binary;
pub use routes::{RouteSource, Routes};
pub use tcp::{Checksum, TcpServer};
pub use zk::{Chroot, Ensemble, Zk, ZkClient, free_port};
pub use zk_fault::{Action, FaultProxy, When};

/// Polls `f` until it returns `Some`, or panics after `timeout` saying what was awaited.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 exchange on a fresh connection; the body collected.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Response::from_parts(parts, body))
}

/// GET `path` from `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Result<Response<Bytes>, String> {
    let req = Request::get(path).header("host", addr.to_string()).body(Full::new(Bytes::new())).expect("request");
    send(addr, req).await
}

/// With `ZKROUTE_TEST_LOG` set (an `EnvFilter`, such as `zkroute=debug`), the in-process zkroutes
/// log to the test's output, which the harness shows for failing tests. Spawned zkroute
/// processes ([`Binary`]) log at that filter too, to their own file, whose last lines a failing
/// test prints.
fn log_if_asked() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if let Ok(filter) = std::env::var("ZKROUTE_TEST_LOG") {
        ONCE.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_test_writer()
                .try_init();
        });
    }
}

/// A zkroute running in this process.
pub struct Proxy {
    pub app: App,
}

impl Proxy {
    /// Starts zkroute from TOML text. Bind addresses may use port 0.
    pub async fn start(toml: &str) -> Proxy {
        log_if_asked();
        let config = Config::from_toml(toml, "test.toml").unwrap_or_else(|e| panic!("test config: {e}"));
        let app = App::start(config).await.expect("zkroute starts");
        Proxy { app }
    }

    /// Starts zkroute following `chroot`, with extra TOML after the `[zookeeper]` keys.
    pub async fn with_zk(chroot: &Chroot, extra: &str) -> Proxy {
        Proxy::following(chroot, extra).await
    }

    /// Starts zkroute reading its routes from `source`, admin on a free port, with extra TOML after.
    pub async fn following(source: &impl RouteSource, extra: &str) -> Proxy {
        Proxy::start(&format!("{}[admin]\nbind = \"127.0.0.1:0\"\n{extra}", source.source_config())).await
    }

    pub fn admin(&self) -> SocketAddr {
        self.app.admin_addr
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.app.listeners[name]
    }

    /// `/config` as JSON.
    pub async fn config(&self) -> Value {
        let resp = get(self.admin(), "/config").await.expect("GET /config");
        assert_eq!(resp.status(), StatusCode::OK);
        serde_json::from_slice(resp.body()).expect("/config is JSON")
    }

    /// Polls `/config` until `check` holds, returning the document.
    pub async fn config_until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = self.config().await;
            if c["loaded"] == true && check(&c) {
                return c;
            }
            assert!(Instant::now() < deadline, "timed out after 10s waiting for {what}; /config last showed:\n{c:#}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `/metrics` as text.
    pub async fn metrics(&self) -> String {
        let resp = get(self.admin(), "/metrics").await.expect("GET /metrics");
        String::from_utf8_lossy(resp.body()).into_owned()
    }

    /// The value of one sample in `/metrics`, e.g. `zkroute_table_version` or
    /// `zkroute_invalid_nodes{kind="rule"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        metric_value(&self.metrics().await, sample)
    }

    pub async fn stop(self) {
        self.app.stop(Duration::from_secs(5)).await;
    }
}

/// Resident memory of a process, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// A memory field of `/proc/PID/status` in KiB (0 once the process is gone): `VmRSS`, or
/// `RssAnon`, its private part (the rest is file pages, such as the binary's code, which every
/// process running the same file shares).
pub fn status_kib(pid: u32, field: &str) -> u64 {
    proc_kib(pid, "status", field)
}

/// A field of `/proc/PID/smaps_rollup` in KiB (0 once the process is gone): `Pss`, the resident
/// set with each shared page divided among the processes that map it, what one more such
/// process costs the host.
pub fn smaps_kib(pid: u32, field: &str) -> u64 {
    proc_kib(pid, "smaps_rollup", field)
}

fn proc_kib(pid: u32, file: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Finds `sample` (name and labels exactly as exposed) in a Prometheus text exposition.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// The instances of `service` in a `/config` document.
pub fn instances<'a>(config: &'a Value, service: &str) -> Vec<&'a Value> {
    config["services"][service]["instances"].as_array().map(|a| a.iter().collect()).unwrap_or_default()
}

/// The instance addresses of `service` in a `/config` document, sorted.
pub fn addresses(config: &Value, service: &str) -> Vec<String> {
    let mut a: Vec<String> =
        instances(config, service).iter().filter_map(|i| i["address"].as_str().map(str::to_owned)).collect();
    a.sort();
    a
}

/// A request to `addr` with `path`, a Host header and extra headers.
pub fn request(method: &str, host: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body.to_owned()))).expect("request")
}

/// Which backend answered (its `x-backend` header), or the proxy's `x-zkroute-error`.
pub fn who(resp: &Response<Bytes>) -> String {
    let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_owned);
    h("x-backend")
        .or_else(|| h("x-zkroute-error").map(|e| format!("error:{e}")))
        .unwrap_or_else(|| format!("status:{}", resp.status()))
}

/// A keep-alive HTTP/1.1 client connection.
pub struct KeepAlive {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl KeepAlive {
    /// Whether the server closed the connection.
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn connect(addr: SocketAddr) -> KeepAlive {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        KeepAlive { sender }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let resp = self.sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Response::from_parts(parts, body))
    }
}

/// A raw keep-alive connection to `addr` that has been answered two GETs and now idles between
/// requests.
pub async fn idle_keep_alive(addr: SocketAddr) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut idle = TcpStream::connect(addr).await.expect("connect");
    // Two requests, the second after the connection waited between them: a connection that has
    // waited before, as most idle ones have.
    for _ in 0..2 {
        idle.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await.expect("write");
        let mut got = Vec::new();
        let end = loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 1024];
            let n = idle.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed before a response head");
            got.extend_from_slice(&chunk[..n]);
        };
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .expect("a content-length")
            .trim()
            .parse()
            .expect("a length");
        let mut body = vec![0u8; (end + len).saturating_sub(got.len())];
        idle.read_exact(&mut body).await.expect("the body");
    }
    idle
}

/// A GET to `addr` that `backend` holds `ms` milliseconds before answering, in flight once this
/// returns (the backend has it).
pub async fn in_flight(
    addr: SocketAddr,
    backend: &Backend,
    ms: u64,
) -> tokio::task::JoinHandle<Result<Response<Bytes>, String>> {
    let before = backend.requests();
    let slow = tokio::spawn(send(addr, request("GET", "h", &format!("/?sleep_ms={ms}"), &[], "")));
    eventually("the slow request reached the backend", Duration::from_secs(5), || async {
        (backend.requests() > before).then_some(())
    })
    .await;
    slow
}

/// TOML for one HTTP listener named `http` on a free port.
pub const HTTP_LISTENER: &str = "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n";

/// Steady load: clients sending GETs in a loop on keep-alive connections, counting every answer.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

/// What a load saw.
#[derive(Debug)]
pub struct LoadReport {
    pub ok: u64,
    pub failures: Vec<String>,
}

impl Load {
    /// `clients` loops of `GET path` with `host`, each on its own connection (reconnecting after
    /// a close).
    pub fn start(addr: SocketAddr, host: &str, path: &str, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, host, path) = (stop.clone(), host.to_owned(), path.to_owned());
                tokio::spawn(async move {
                    let (mut ok, mut failures) = (0u64, Vec::new());
                    let mut client = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let c = match &mut client {
                            Some(c) => c,
                            None => client.insert(KeepAlive::connect(addr).await),
                        };
                        match c.send(request("GET", &host, &path, &[], "")).await {
                            Ok(r) if r.status() == 200 => ok += 1,
                            Ok(r) => failures.push(format!("{} {}", r.status(), who(&r))),
                            Err(e) => {
                                failures.push(e);
                                client = None;
                            }
                        }
                        if let Some(c) = &client {
                            if c.is_closed() {
                                client = None;
                            }
                        }
                    }
                    (ok, failures)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut report = LoadReport { ok: 0, failures: Vec::new() };
        for t in self.tasks {
            let (ok, failures) = t.await.expect("load task");
            report.ok += ok;
            report.failures.extend(failures);
        }
        report
    }
}
