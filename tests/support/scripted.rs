//! A raw HTTP/1 upstream for tests of hostile responses: each request it reads is answered by a
//! script with exactly the bytes the test gives, and everything it receives is logged per
//! connection, with whether the proxy closed it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::routes::Routes;
use super::{HTTP_LISTENER, Proxy, eventually};

/// zkroute with listener `http` routing everything to `upstream` (service `s`, rule `r`, on the
/// static file source), with `[proxy]` keys; returns once the route is in force.
pub async fn proxy_to(upstream: SocketAddr, proxy: &str) -> (Proxy, Routes) {
    proxy_with_policy(upstream, "", proxy).await
}

/// The same, with a policy document for service `s` (JSON), if not empty.
pub async fn proxy_with_policy(upstream: SocketAddr, policy: &str, proxy: &str) -> (Proxy, Routes) {
    let routes = Routes::new();
    routes.instance("s", "a", upstream);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    if !policy.is_empty() {
        routes.policy("s", policy);
    }
    let p = routes.proxy(&format!("{HTTP_LISTENER}[proxy]\n{proxy}\n")).await;
    (p, routes)
}

/// One request as the upstream read it.
pub struct Req<'a> {
    /// Which connection (0 for the first accepted), and which request on it.
    pub conn: usize,
    pub n: usize,
    pub head: &'a str,
}

impl Req<'_> {
    /// The request target.
    pub fn path(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }
}

/// What the upstream does, in order, for one request.
pub enum Act {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Waits.
    Sleep(Duration),
    /// Closes the connection.
    Close,
    /// Answers nothing more on this connection, reading (and logging) until the proxy closes it.
    Hold,
    /// Writes these bytes over and over for this long, or until the proxy stops taking them.
    Repeat(Vec<u8>, Duration),
    /// Closes the connection unless the next request begins within this long.
    CloseIfIdle(Duration),
}

/// `Act::Send` of text.
pub fn send(text: impl AsRef<[u8]>) -> Act {
    Act::Send(text.as_ref().to_vec())
}

/// What one connection received.
#[derive(Default)]
pub struct ConnLog {
    received: Mutex<Vec<u8>>,
    requests: AtomicUsize,
    /// The proxy closed (or reset) the connection.
    closed: AtomicBool,
}

/// A scripted upstream; stops when dropped.
pub struct Upstream {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<ConnLog>>>>,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type Script = dyn Fn(&Req<'_>) -> Vec<Act> + Send + Sync;

impl Upstream {
    /// Answers every request with what `script` says.
    pub async fn start(script: impl Fn(&Req<'_>) -> Vec<Act> + Send + Sync + 'static) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<Arc<ConnLog>>>> = Arc::default();
        let script: Arc<Script> = Arc::new(script);
        let all = conns.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let log = Arc::new(ConnLog::default());
                let index = {
                    let mut all = all.lock().expect("lock");
                    all.push(log.clone());
                    all.len() - 1
                };
                tokio::spawn(serve(stream, index, log, script.clone()));
            }
        });
        Upstream { addr, conns, task }
    }

    /// Answers every request with `bytes`, keeping the connection.
    pub async fn answering(bytes: &'static [u8]) -> Upstream {
        Upstream::start(move |_| vec![send(bytes)]).await
    }

    /// Connections accepted so far.
    pub fn conns(&self) -> usize {
        self.conns.lock().expect("lock").len()
    }

    fn conn(&self, i: usize) -> Arc<ConnLog> {
        self.conns.lock().expect("lock")[i].clone()
    }

    /// Requests read on every connection.
    pub fn requests(&self) -> usize {
        self.conns.lock().expect("lock").iter().map(|c| c.requests.load(Ordering::SeqCst)).sum()
    }

    /// Requests read on connection `i`.
    pub fn requests_on(&self, i: usize) -> usize {
        self.conn(i).requests.load(Ordering::SeqCst)
    }

    /// What connection `i` received, as text.
    pub fn received(&self, i: usize) -> String {
        String::from_utf8_lossy(&self.conn(i).received.lock().expect("lock")).into_owned()
    }

    /// What every connection received, in order of connection.
    pub fn all_received(&self) -> String {
        (0..self.conns()).map(|i| self.received(i)).collect()
    }

    /// Whether the proxy has closed connection `i`.
    pub fn is_closed(&self, i: usize) -> bool {
        self.conn(i).closed.load(Ordering::SeqCst)
    }

    /// Waits until the proxy closes connection `i`; panics after `within`.
    pub async fn wait_closed(&self, i: usize, within: Duration) {
        eventually(&format!("the proxy closing upstream connection {i}"), within, || async {
            (self.conns() > i && self.is_closed(i)).then_some(())
        })
        .await;
    }

    /// Waits until `n` requests have arrived in all; panics after `within`.
    pub async fn wait_requests(&self, n: usize, within: Duration) {
        eventually(&format!("{n} requests at the upstream"), within, || async { (self.requests() >= n).then_some(()) })
            .await;
    }
}

async fn serve(mut stream: TcpStream, conn: usize, log: Arc<ConnLog>, script: Arc<Script>) {
    let mut buf = Vec::new();
    let mut n = 0;
    let mut idle_close = None;
    loop {
        let head_len = match idle_close.take() {
            None => read_until_head(&mut stream, &mut buf, &log).await,
            Some(wait) => match tokio::time::timeout(wait, read_until_head(&mut stream, &mut buf, &log)).await {
                Ok(read) => read,
                Err(_) => return,
            },
        };
        let Some(head_len) = head_len else {
            log.closed.store(true, Ordering::SeqCst);
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
        buf.drain(..head_len);
        if !skip_body(&mut stream, &mut buf, &head, &log).await {
            log.closed.store(true, Ordering::SeqCst);
            return;
        }
        log.requests.fetch_add(1, Ordering::SeqCst);
        let acts = script(&Req { conn, n, head: &head });
        n += 1;
        for act in acts {
            match act {
                Act::Send(bytes) => {
                    if stream.write_all(&bytes).await.is_err() {
                        log.closed.store(true, Ordering::SeqCst);
                        return;
                    }
                }
                Act::Sleep(d) => tokio::time::sleep(d).await,
                Act::Close => return,
                Act::CloseIfIdle(d) => idle_close = Some(d),
                Act::Repeat(bytes, d) => {
                    let until = tokio::time::Instant::now() + d;
                    while tokio::time::Instant::now() < until {
                        match tokio::time::timeout_at(until, stream.write_all(&bytes)).await {
                            Ok(Ok(())) => {}
                            Ok(Err(_)) => {
                                log.closed.store(true, Ordering::SeqCst);
                                return;
                            }
                            Err(_) => break,
                        }
                    }
                }
                Act::Hold => {
                    let mut scratch = [0u8; 4096];
                    loop {
                        match stream.read(&mut scratch).await {
                            Ok(0) | Err(_) => {
                                log.closed.store(true, Ordering::SeqCst);
                                return;
                            }
                            Ok(k) => log.received.lock().expect("lock").extend_from_slice(&scratch[..k]),
                        }
                    }
                }
            }
        }
    }
}

/// Reads until `buf` holds a whole head; its length, or None at EOF.
async fn read_until_head(stream: &mut TcpStream, buf: &mut Vec<u8>, log: &ConnLog) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end + 4);
        }
        read_more(stream, buf, log).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>, log: &ConnLog) -> Option<()> {
    let mut scratch = [0u8; 16 * 1024];
    match stream.read(&mut scratch).await {
        Ok(0) | Err(_) => None,
        Ok(k) => {
            buf.extend_from_slice(&scratch[..k]);
            log.received.lock().expect("lock").extend_from_slice(&scratch[..k]);
            Some(())
        }
    }
}

/// Reads past the request's body (Content-Length, or chunked up to its last chunk); false at EOF.
async fn skip_body(stream: &mut TcpStream, buf: &mut Vec<u8>, head: &str, log: &ConnLog) -> bool {
    let lower = head.to_ascii_lowercase();
    let field = |name: &str| {
        lower.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(':')).map(|v| v.trim().to_owned()))
    };
    if let Some(n) = field("content-length").and_then(|v| v.parse::<usize>().ok()) {
        while buf.len() < n {
            if read_more(stream, buf, log).await.is_none() {
                return false;
            }
        }
        buf.drain(..n);
    } else if field("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
        loop {
            let end = if buf.starts_with(b"0\r\n\r\n") {
                Some(5)
            } else {
                buf.windows(7).position(|w| w == b"\r\n0\r\n\r\n").map(|p| p + 7)
            };
            if let Some(end) = end {
                buf.drain(..end);
                break;
            }
            if read_more(stream, buf, log).await.is_none() {
                return false;
            }
        }
    }
    true
}
