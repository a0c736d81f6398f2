#![allow(clippy::unwrap_used)]
//! gRPC through zkroute with real gRPC on both sides: servers and clients from Python's grpcio
//! (tests/peers/grpc_peer.py, raw bytes, no generated code), routes from the static file. The
//! four call shapes, trailing metadata, statuses, cancellation, zkroute's own gRPC answers,
//! deadlines and a GOAWAY under load.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use support::*;

const PEER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/grpc_peer.py");

/// A grpcio server: its port, its stdin (to stop it), and the lines it prints.
struct GrpcServer {
    child: Child,
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl GrpcServer {
    fn start(name: &str) -> GrpcServer {
        deps::ensure();
        let mut child = Command::new("python3")
            .args([PEER, "serve", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 with grpcio (tests/deps.sh installs it)");
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let first = lines.recv_timeout(Duration::from_secs(30)).expect("the server's port");
        let port: u16 = first.strip_prefix("port ").unwrap().parse().unwrap();
        GrpcServer { child, stdin, addr: SocketAddr::from(([127, 0, 0, 1], port)), lines }
    }

    /// Waits for a line the server prints.
    fn expect_line(&self, line: &str, within: Duration) {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l == line => return,
                Ok(_) => {}
                Err(_) => panic!("the server did not print {line:?} within {within:?}"),
            }
        }
    }

    /// Waits for a line the server prints that `pred` accepts; that line.
    fn expect_line_where(&self, what: &str, pred: impl Fn(&str) -> bool, within: Duration) -> String {
        let deadline = std::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if pred(&l) => return l,
                Ok(_) => {}
                Err(_) => panic!("the server did not print {what} within {within:?}"),
            }
        }
    }

    /// A graceful stop: GOAWAY, in-flight calls finish.
    fn stop_gracefully(&mut self) {
        self.tell("stop");
    }

    /// Sends the server a command (`stop`, `sick`, `well`).
    fn tell(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a grpcio client scenario through `addr`; its JSON result.
async fn call(addr: SocketAddr, what: &str, n: u64) -> Value {
    let (what, n) = (what.to_owned(), n.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").args([PEER, "call", &addr.to_string(), &what, &n]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// zkroute routing every request on `http` to service `echo`, spoken to over HTTP/2 because
/// its policy says `grpc`.
async fn grpc_proxy(servers: &[&GrpcServer]) -> (Routes, Proxy) {
    let routes = Routes::new();
    for (i, s) in servers.iter().enumerate() {
        routes.instance("echo", &i.to_string(), s.addr);
    }
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"echo"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    (routes, proxy)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_calls_on_one_channel_are_balanced_and_keep_trailing_metadata() {
    let (a, b) = (GrpcServer::start("a"), GrpcServer::start("b"));
    let (_routes, proxy) = grpc_proxy(&[&a, &b]).await;
    let r = call(proxy.listener("http"), "unary", 40).await;
    let answers = strings(&r["answers"]);
    assert_eq!(answers.len(), 40);
    for name in ["a", "b"] {
        assert!(answers.iter().filter(|x| *x == name).count() >= 5, "{name} took too few of {answers:?}");
    }
    // Each answer's trailing metadata came from the server that answered.
    assert_eq!(strings(&r["trailers"]), answers);
    a.expect_line("metadata x-test-hello=world", Duration::from_secs(5));
    let config = proxy.config().await;
    let echo = &config["services"]["echo"];
    assert_eq!(echo["policy"]["protocol"], "h2", "{echo}");
    assert_eq!(echo["instances"][0]["protocol_in_force"], "h2", "{echo}");
    let ok = proxy.metric(r#"zkroute_grpc_requests_total{grpc_status="0",listener="http",service="echo"}"#).await;
    assert_eq!(ok, Some(40.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_arrives_with_its_status_and_message_unchanged() {
    let a = GrpcServer::start("a");
    let (_routes, proxy) = grpc_proxy(&[&a]).await;
    let r = call(proxy.listener("http"), "fail", 1).await;
    assert_eq!(r["code"], "FAILED_PRECONDITION", "{r}");
    assert_eq!(r["details"], "precondition failed: caf\u{e9} 50% off", "{r}");
    let counted = proxy.metric(r#"zkroute_grpc_requests_total{grpc_status="9",listener="http",service="echo"}"#).await;
    assert_eq!(counted, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_go_through_in_every_direction() {
    let a = GrpcServer::start("a");
    let (_routes, proxy) = grpc_proxy(&[&a]).await;
    let addr = proxy.listener("http");
    let r = call(addr, "server_stream", 10_000).await;
    assert_eq!((r["count"].as_u64(), r["last"].as_str()), (Some(10_000), Some("9999")), "{r}");
    let r = call(addr, "client_stream", 500).await;
    assert_eq!(r["total"], 1000, "{r}");
    let r = call(addr, "bidi", 5).await;
    assert_eq!(strings(&r["echoed"]), ["a:0", "a:1", "a:2", "a:3", "a:4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_call_is_cancelled_at_the_server() {
    let a = GrpcServer::start("a");
    let (_routes, proxy) = grpc_proxy(&[&a]).await;
    let r = call(proxy.listener("http"), "cancel", 1000).await;
    assert_eq!(r["cancelled"], true);
    a.expect_line("hanging", Duration::from_secs(5));
    a.expect_line("cancelled", Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_down_is_unavailable_in_grpc_terms_from_zkroute() {
    let a = GrpcServer::start("a");
    let addr = a.addr;
    drop(a);
    let routes = Routes::new();
    routes.instance("echo", "0", addr);
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule("r", r#"{"listener":"http","match":{"path_prefix":"/test."},"backends":[{"service":"echo"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let r = call(proxy.listener("http"), "unavailable", 1).await;
    assert_eq!(r["code"], "UNAVAILABLE", "{r}");
    // zkroute's own message, not grpcio's rendering of a bare HTTP 502.
    assert!(r["details"].as_str().unwrap().contains("connect to an upstream"), "{r}");
    let counted = proxy.metric(r#"zkroute_grpc_requests_total{grpc_status="14",listener="http",service="echo"}"#).await;
    assert_eq!(counted, Some(1.0));

    routes.remove_rule("r");
    routes.rule("r2", r#"{"listener":"http","match":{"path_prefix":"/other."},"backends":[{"service":"echo"}]}"#);
    proxy.config_until("the new rule", |c| routes.shown_in(c)).await;
    let r = call(proxy.listener("http"), "unimplemented", 1).await;
    assert_eq!(r["code"], "UNIMPLEMENTED", "{r}");
    assert!(r["details"].as_str().unwrap().contains("no rule matches"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_expiry_is_deadline_exceeded_from_zkroute() {
    let a = GrpcServer::start("a");
    let (_routes, proxy) = grpc_proxy(&[&a]).await;
    // grpcio's own deadline: the client sees DEADLINE_EXCEEDED, whichever side's timer fires first.
    let r = call(proxy.listener("http"), "deadline", 300).await;
    assert_eq!(r["code"], "DEADLINE_EXCEEDED", "{r}");

    // A call whose grpc-timeout is shorter than the client waits, to a server that does not
    // keep gRPC deadlines itself (a bare HTTP/2 server taking 3 s): zkroute's timer fires, and
    // zkroute answers (trailers-only) and counts it.
    drop(proxy);
    let routes = Routes::new();
    routes.instance("echo", "0", slow_h2_server().await);
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"echo"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let exceeded = r#"zkroute_grpc_requests_total{grpc_status="4",listener="http",service="echo"}"#;
    let before = proxy.metric(exceeded).await.unwrap_or(0.0);
    let stream = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let message = [&[0u8, 0, 0, 0, 4][..], b"3000"].concat();
    let req = http::Request::post(format!("http://{}/test.Echo/Slow", proxy.listener("http")))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(http_body_util::Full::new(bytes::Bytes::from(message)))
        .unwrap();
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4", "{resp:?}");
    assert!(resp.headers().contains_key("x-zkroute-error"), "{resp:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
    assert_eq!(proxy.metric(exceeded).await, Some(before + 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_during_load_loses_no_call() {
    let (mut a, b) = (GrpcServer::start("a"), GrpcServer::start("b"));
    let (_routes, proxy) = grpc_proxy(&[&a, &b]).await;
    let addr = proxy.listener("http");
    let load = tokio::spawn(call(addr, "load", 3000));
    // Once calls are flowing to both, a stops gracefully: GOAWAY, its in-flight calls finish.
    eventually("calls answered by a", Duration::from_secs(20), || async {
        let n = proxy.metric(r#"zkroute_grpc_requests_total{grpc_status="0",listener="http",service="echo"}"#).await;
        (n.unwrap_or(0.0) >= 200.0).then_some(())
    })
    .await;
    a.stop_gracefully();
    a.expect_line("stopped", Duration::from_secs(20));
    let r = load.await.unwrap();
    // grpcio's server itself answers CANCELLED to a call that reaches it between its two GOAWAYs
    // (it accepts the stream but no longer runs handlers), as it would to a client of its own;
    // zkroute relays that answer. Every other call is answered: none fails in zkroute.
    let errors = r["errors"].as_array().unwrap();
    assert!(errors.len() <= 8 && errors.iter().all(|e| e == "CANCELLED: CANCELLED"), "{r}");
    let answered: u64 = r["answers"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(answered + errors.len() as u64, 3000, "{r}");
    assert!(r["answers"]["b"].as_u64().unwrap() > 0, "{r}");
}

/// Reads an HTTP/1.1 response whose chunked body ends with trailers, within 10 s.
async fn read_chunked_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got);
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            if body.contains("0\r\n") && body.ends_with("\r\n\r\n") {
                return text.into_owned();
            }
        }
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await.expect("the whole response").unwrap();
        assert!(n > 0, "closed early: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_client_calls_a_grpc_server_and_gets_its_trailers_chunked() {
    use tokio::io::AsyncWriteExt;
    let a = GrpcServer::start("a");
    let routes = Routes::new();
    routes.instance("echo", "0", a.addr);
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"echo"}]}"#);
    let log = routes.path().with_file_name("access.log");
    let proxy = routes.proxy(&format!("{HTTP_LISTENER}[log]\naccess_log = {:?}\n", log.display().to_string())).await;
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    // One length-prefixed gRPC message ("x"), in a chunked body that ends with a trailer.
    let request = "POST /test.Echo/Who HTTP/1.1\r\nhost: echo\r\ncontent-type: application/grpc\r\nte: trailers\r\n\
                   x-test-one: 1\r\ntransfer-encoding: chunked\r\n\r\n6\r\n\0\0\0\0\x01x\r\n0\r\nx-checksum: 7\r\n\r\n";
    s.write_all(request.as_bytes()).await.unwrap();
    let text = read_chunked_response(&mut s).await;
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert!(head.contains("transfer-encoding: chunked"), "{text:?}");
    // The answer ("a", framed), then the trailers as chunked trailer fields.
    assert!(body.starts_with("6\r\n\0\0\0\0\x01a\r\n0\r\n"), "{body:?}");
    assert!(body.contains("grpc-status: 0\r\n") && body.contains("x-served-by: a\r\n"), "{body:?}");
    a.expect_line("metadata x-test-one=1", Duration::from_secs(5));
    // The connection stays open for the next call.
    s.write_all(request.as_bytes()).await.unwrap();
    let again = read_chunked_response(&mut s).await;
    assert!(again.contains("x-served-by: a\r\n"), "{again:?}");
    // The access log has each call's grpc-status.
    eventually("two access log lines with grpc=0", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().filter(|l| l.contains("POST") && l.ends_with(" grpc=0")).count() == 2).then_some(())
    })
    .await;
}

/// The health state `/config` shows for each instance of `service`, by address.
fn states(config: &Value, service: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = instances(config, service)
        .iter()
        .map(|i| (i["address"].as_str().unwrap().to_owned(), i["health"]["state"].as_str().unwrap().to_owned()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_checks_take_a_not_serving_server_out_and_back() {
    let (a, mut b) = (GrpcServer::start("a"), GrpcServer::start("b"));
    let routes = Routes::new();
    routes.instance("echo", "0", a.addr);
    routes.instance("echo", "1", b.addr);
    routes.policy(
        "echo",
        r#"{"protocol":"grpc","health_check":{"kind":"grpc","service":"test.Echo","interval":"100ms",
            "healthy_threshold":1,"unhealthy_threshold":1}}"#,
    );
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"echo"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    // In the order `states` gives (by address).
    let sorted = |mut v: Vec<(String, String)>| {
        v.sort();
        v
    };
    let both = sorted(vec![(a.addr.to_string(), "healthy".to_owned()), (b.addr.to_string(), "healthy".to_owned())]);
    proxy.config_until("both SERVING", |c| states(c, "echo") == both).await;
    b.expect_line("health test.Echo", Duration::from_secs(5));

    b.tell("sick");
    let want = sorted(vec![(a.addr.to_string(), "healthy".to_owned()), (b.addr.to_string(), "unhealthy".to_owned())]);
    let c = proxy.config_until("b NOT_SERVING", |c| states(c, "echo") == want).await;
    let b_view = instances(&c, "echo").into_iter().find(|i| i["address"] == b.addr.to_string()).unwrap().clone();
    assert!(b_view["health"]["last_check"]["detail"].as_str().unwrap().contains("not SERVING"), "{b_view}");
    let r = call(proxy.listener("http"), "unary", 10).await;
    assert_eq!(strings(&r["answers"]), vec!["a"; 10]);

    b.tell("well");
    proxy.config_until("b SERVING again", |c| states(c, "echo") == both).await;
}

/// An HTTP/2 server (hyper, prior knowledge; HTTP/1.1 is refused) answering each request with the
/// status and body `answer` gives it.
async fn h2_server<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: std::future::Future<Output = (u16, bytes::Bytes)> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| async move {
                let (status, body) = answer(req).await;
                let resp = http::Response::builder().status(status).body(http_body_util::Full::new(body));
                Ok::<_, std::convert::Infallible>(resp.unwrap())
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// An HTTP/2 server that answers every request 200 after three seconds, knowing nothing of gRPC
/// deadlines.
async fn slow_h2_server() -> SocketAddr {
    h2_server(|_| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        (200, bytes::Bytes::new())
    })
    .await
}

/// An HTTP/2-only server answering `/health`.
async fn h2_only_health_server() -> SocketAddr {
    h2_server(|req| async move { (if req.uri().path() == "/health" { 200 } else { 404 }, bytes::Bytes::new()) }).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_checks_go_over_http2_to_services_that_speak_it() {
    let server = h2_only_health_server().await;
    let routes = Routes::new();
    routes.instance("h2only", "0", server);
    // The same server as an HTTP/1.1 service: its checks fail, which shows the server refuses
    // HTTP/1.1 and that the h2 service's checks pass only because they go over HTTP/2.
    routes.instance("h1view", "0", server);
    let check = r#""health_check":{"kind":"http","path":"/health","interval":"100ms","healthy_threshold":1,"unhealthy_threshold":1}"#;
    routes.policy("h2only", &format!(r#"{{"protocol":"h2",{check}}}"#));
    routes.policy("h1view", &format!("{{{check}}}"));
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"h2only"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let c = proxy
        .config_until("both checked", |c| {
            states(c, "h2only") == [(server.to_string(), "healthy".to_owned())]
                && states(c, "h1view") == [(server.to_string(), "unhealthy".to_owned())]
        })
        .await;
    assert_eq!(instances(&c, "h2only")[0]["health"]["last_check"]["detail"], "HTTP 200");
    // And requests reach it over HTTP/2.
    let resp = send(proxy.listener("http"), request("GET", "h", "/health", &[], "")).await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_edits_grpc_metadata_and_its_rate_limit_is_resource_exhausted() {
    let a = GrpcServer::start("a");
    let routes = Routes::new();
    routes.instance("echo", "0", a.addr);
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule(
        "r",
        r#"{"listener":"http","backends":[{"service":"echo"}],
            "request_headers":{"set":{"x-test-edited":"by-zkroute"}},
            "rate_limit":{"per_second":1,"burst":3}}"#,
    );
    let proxy = routes.proxy(HTTP_LISTENER).await;
    // Three calls within the burst reach the server with the rule's metadata; the rest of a rapid
    // run are refused by zkroute as gRPC answers a client understands.
    let r = call(proxy.listener("http"), "unary", 3).await;
    assert_eq!(strings(&r["answers"]), vec!["a"; 3], "{r}");
    a.expect_line("metadata x-test-edited=by-zkroute", Duration::from_secs(5));
    let r = call(proxy.listener("http"), "until_error", 10).await;
    assert_eq!(r["code"], "RESOURCE_EXHAUSTED", "{r}");
    let refused = r#"zkroute_grpc_requests_total{grpc_status="8",listener="http",service="echo"}"#;
    assert!(proxy.metric(refused).await >= Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_crosses_hosts_over_mutual_tls_with_h2_by_alpn_and_the_app_learns_the_caller() {
    use support::pki::Ca;
    let mesh = Ca::new("mesh");
    let b_cert = mesh.issue("b", &["DNS:users.mesh.internal"]);
    let a_cert = mesh.issue("a", &["URI:spiffe://mesh/a"]);
    let app_b = GrpcServer::start("app-b");

    // Host B: a mutual TLS listener (HTTP/2 by ALPN) in front of its local gRPC app.
    let routes_b = Routes::new();
    routes_b.instance("local", "0", app_b.addr);
    routes_b.policy("local", r#"{"protocol":"grpc"}"#);
    routes_b.rule("inbound", r#"{"listener":"inbound","backends":[{"service":"local"}]}"#);
    let b = routes_b.proxy(&support::pki::tls_listener("inbound", "http", &b_cert, Some(&mesh), None)).await;

    // Host A: the app's calls in clear (h2c), mutual TLS out to B over HTTP/2.
    let routes_a = Routes::new();
    routes_a.instance("users", "b", b.listener("inbound"));
    routes_a.policy("users", r#"{"protocol":"grpc","tls":{"server_name":"users.mesh.internal"}}"#);
    routes_a.rule("to-users", r#"{"listener":"outbound","backends":[{"service":"users"}]}"#);
    let a = routes_a.proxy(&support::pki::outbound_with_identity("outbound", &mesh, &a_cert)).await;

    let r = call(a.listener("outbound"), "unary", 5).await;
    assert_eq!(strings(&r["answers"]), vec!["app-b"; 5], "{r}");
    assert_eq!(strings(&r["trailers"]), vec!["app-b"; 5], "{r}");
    app_b.expect_line("metadata x-forwarded-proto=https", Duration::from_secs(5));
    let xfcc = app_b.expect_line_where(
        "the caller's certificate",
        |l| l.starts_with("metadata x-forwarded-client-cert="),
        Duration::from_secs(5),
    );
    assert!(xfcc.contains("URI=spiffe://mesh/a"), "{xfcc}");
    let config = a.config().await;
    assert_eq!(config["services"]["users"]["instances"][0]["protocol_in_force"], "h2", "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_grpc_call_over_h2c_with_its_grpc_status() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let a = GrpcServer::start("a");
    let routes = Routes::new();
    routes.instance("echo", "0", a.addr);
    routes.policy("echo", r#"{"protocol":"grpc"}"#);
    routes.rule("r", r#"{"listener":"http","match":{"path_prefix":"/test."},"backends":[{"service":"echo"}]}"#);
    let config = format!("{HTTP_LISTENER}[log]\nformat = \"json\"\naccess_log = \"{}\"\n", log.display());
    let proxy = routes.proxy(&config).await;
    let addr = proxy.listener("http");
    assert_eq!(strings(&call(addr, "unary", 1).await["answers"]), vec!["a"]);
    assert_eq!(call(addr, "fail", 1).await["code"], "FAILED_PRECONDITION");
    // Routed nowhere: zkroute's own trailers-only answer.
    routes.remove_rule("r");
    routes.rule("r2", r#"{"listener":"http","match":{"path_prefix":"/other."},"backends":[{"service":"echo"}]}"#);
    proxy.config_until("the new rule", |c| routes.shown_in(c)).await;
    assert_eq!(call(addr, "until_error", 1).await["code"], "UNIMPLEMENTED");

    let lines = eventually("three access log lines", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= 3).then_some(lines)
    })
    .await;
    let (ok, failed, unrouted) = (&lines[0], &lines[1], &lines[2]);
    assert_eq!((&ok["method"], &ok["path"], &ok["status"]), (&"POST".into(), &"/test.Echo/Who".into(), &200.into()));
    assert_eq!(ok["grpc_status"], 0, "{ok}");
    assert_eq!(ok["upstream"], a.addr.to_string(), "{ok}");
    assert!(ok["bytes_out"].as_u64().unwrap() > 0, "{ok}");
    assert_eq!(failed["grpc_status"], 9, "{failed}");
    assert_eq!(unrouted["grpc_status"], 12, "{unrouted}");
    assert!(unrouted["upstream"].is_null(), "{unrouted}");
}

/// An HTTP/2 server that answers each request with the authority it was sent to.
async fn authority_echo_h2_server() -> SocketAddr {
    h2_server(|req| async move {
        (200, bytes::Bytes::from(req.uri().authority().map_or("none", |a| a.as_str()).to_owned()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_host_reaches_an_h2_upstream_with_the_services_name_as_authority() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let routes = Routes::new();
    routes.instance("users", "0", authority_echo_h2_server().await);
    routes.policy("users", r#"{"protocol":"h2"}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"users"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    // HTTP/1.0 allows a request without Host; the HTTP/1.1 upstream path sends the service's name.
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(b"GET /who HTTP/1.0\r\n\r\n").await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text)).await.unwrap().unwrap();
    assert!(text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.ends_with("\r\n\r\nusers"), "the service's name as the authority: {text:?}");
    // A client's own Host is the authority, unchanged.
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(b"GET /who HTTP/1.0\r\nhost: api.test\r\n\r\n").await.unwrap();
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut text)).await.unwrap().unwrap();
    assert!(text.ends_with("\r\n\r\napi.test"), "{text:?}");
}
