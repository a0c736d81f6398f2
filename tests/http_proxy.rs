#![allow(clippy::unwrap_used)]
//! The HTTP data plane end to end: real backends, a real client, routes from a static file (the
//! documents ZooKeeper would hold; ZooKeeper itself is the subject of other test files).

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use support::*;
use zkroute::discovery::{Update, instance_change, rule_change};
use zkroute::routing::{Origin, RawNode, ServiceName, SourceKind};

async fn call(proxy: &Proxy, host: &str, path: &str, headers: &[(&str, &str)]) -> Response<Bytes> {
    send(proxy.listener("http"), request("GET", host, path, headers, "")).await.unwrap()
}

/// Routes of the `http` listener in a `/config` document.
fn route_count(c: &serde_json::Value) -> usize {
    c["listeners"][0]["routes"].as_array().map_or(0, Vec::len)
}

/// Polls until a GET answers from `backend` (the table caught up).
async fn until_answered_by(proxy: &Proxy, host: &str, path: &str, backend: &str) {
    eventually(&format!("{host}{path} answered by {backend}"), Duration::from_secs(10), || async {
        (who(&call(proxy, host, path, &[]).await) == backend).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_matcher_routes_to_its_backend() {
    let routes = Routes::new();
    let names = ["exact", "wild", "prefix", "method", "header", "default"];
    let mut backends = HashMap::new();
    for n in names {
        let b = Backend::http(n).await;
        routes.instance(n, "1", b.addr);
        backends.insert(n, b);
    }
    routes.rule("exact", r#"{"listener":"http","match":{"host":"api.example.com"},"backends":[{"service":"exact"}]}"#);
    routes.rule("wild", r#"{"listener":"http","match":{"host":"*.example.com"},"backends":[{"service":"wild"}]}"#);
    routes.rule(
        "prefix",
        r#"{"listener":"http","priority":5,"match":{"path_prefix":"/v2/"},"backends":[{"service":"prefix"}]}"#,
    );
    routes.rule(
        "method",
        r#"{"listener":"http","priority":5,"match":{"method":"DELETE"},"backends":[{"service":"method"}]}"#,
    );
    routes.rule(
        "header",
        r#"{"listener":"http","priority":9,"match":{"headers":{"x-canary":"true"}},"backends":[{"service":"header"}]}"#,
    );
    routes.rule("default", r#"{"listener":"http","priority":-10,"backends":[{"service":"default"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;

    assert_eq!(who(&call(&proxy, "API.Example.com:8080", "/x", &[]).await), "exact");
    assert_eq!(who(&call(&proxy, "deep.a.example.com", "/", &[]).await), "wild");
    assert_eq!(who(&call(&proxy, "example.com", "/", &[]).await), "default");
    assert_eq!(who(&call(&proxy, "api.example.com", "/v2/users", &[]).await), "prefix", "priority 5 beats 0");
    assert_eq!(who(&call(&proxy, "other", "/v2", &[]).await), "default", "prefix is on bytes: /v2 is not /v2/");
    let del = send(proxy.listener("http"), request("DELETE", "other", "/", &[], "")).await.unwrap();
    assert_eq!(who(&del), "method");
    assert_eq!(who(&call(&proxy, "api.example.com", "/v2/", &[("x-canary", "true")]).await), "header");
    assert_eq!(who(&call(&proxy, "other", "/", &[("x-canary", "false")]).await), "default");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_priorities_are_ordered_by_rule_id() {
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    let routes = Routes::new();
    routes.backends("a", &[&a]);
    routes.backends("b", &[&b]);
    routes.rule("r-b", r#"{"listener":"http","priority":1,"backends":[{"service":"b"}]}"#);
    routes.rule("r-a", r#"{"listener":"http","priority":1,"backends":[{"service":"a"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    until_answered_by(&proxy, "h", "/", "a").await;
    routes.rule("r-b", r#"{"listener":"http","priority":2,"backends":[{"service":"b"}]}"#);
    until_answered_by(&proxy, "h", "/", "b").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_holds_over_2000_requests() {
    let main = Backend::http("main").await;
    let canary = Backend::http("canary").await;
    let routes = Routes::new();
    routes.backends("main", &[&main]);
    routes.backends("canary", &[&canary]);
    routes.rule(
        "split",
        r#"{"listener":"http","backends":[{"service":"main","weight":90},{"service":"canary","weight":10}]}"#,
    );
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let (m0, c0) = (main.requests(), canary.requests());
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    for _ in 0..2000 {
        let r = client.send(request("GET", "h", "/", &[], "")).await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let (m, c) = (main.requests() - m0, canary.requests() - c0);
    assert_eq!(m + c, 2000);
    // Binomial(2000, 0.1): mean 200, sd 13.4; five sd either way.
    assert!((133..=267).contains(&c), "canary got {c} of 2000");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subsets_select_instances_by_metadata() {
    let v1 = Backend::http("v1").await;
    let v2 = Backend::http("v2").await;
    let routes = Routes::new();
    for (id, b, version) in [("1", &v1, "v1"), ("2", &v2, "v2")] {
        let doc = format!(
            r#"{{"name":"users","id":"{id}","address":"127.0.0.1","port":{},"payload":{{"metadata":{{"version":"{version}"}}}}}}"#,
            b.addr.port()
        );
        routes.instance("users", id, doc);
    }
    routes.rule("canary", r#"{"listener":"http","priority":1,"match":{"headers":{"x-version":"2"}},"backends":[{"service":"users","subset":{"version":"v2"}}]}"#);
    routes.rule("stable", r#"{"listener":"http","backends":[{"service":"users","subset":{"version":"v1"}}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    for _ in 0..20 {
        assert_eq!(who(&call(&proxy, "h", "/", &[]).await), "v1");
        assert_eq!(who(&call(&proxy, "h", "/", &[("x-version", "2")]).await), "v2");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2c_prefers_the_less_loaded_instance() {
    let slow = Backend::http("slow").await;
    let fast = Backend::http("fast").await;
    let (_routes, proxy) = Routes::serving("s", &[&slow, &fast]).await;
    // The slow instance holds each request 50ms, so requests pile up on it. A random or
    // round-robin choice would still send it half the requests; p2c sends new ones to the
    // instance with fewer in flight.
    slow.state.delay_ms.store(50, std::sync::atomic::Ordering::SeqCst);
    let (s0, f0) = (slow.requests(), fast.requests());
    let addr = proxy.listener("http");
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(tokio::spawn(async move {
            let mut c = KeepAlive::connect(addr).await;
            for _ in 0..25 {
                assert_eq!(c.send(request("GET", "h", "/", &[], "")).await.unwrap().status(), 200);
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
    let (to_slow, to_fast) = (slow.requests() - s0, fast.requests() - f0);
    assert_eq!(to_slow + to_fast, 400);
    assert!(to_fast * 100 >= 400 * 75, "fast got {to_fast}, slow {to_slow} of 400");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_a_key_on_its_instance_across_a_table_swap() {
    let (a, b, c) = (Backend::http("a").await, Backend::http("b").await, Backend::http("c").await);
    let routes = Routes::new();
    routes.backends("s", &[&a, &b, &c]);
    routes.policy("s", r#"{"lb":"ring_hash","hash_on":"header:x-user"}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let config = proxy.config().await;
    assert!(config["services"]["s"]["policy"]["lb"].is_object());
    assert_eq!((addresses(&config, "s").len(), route_count(&config)), (3, 1));
    let owner = |user: String| {
        let proxy = &proxy;
        async move { who(&call(proxy, "h", "/", &[("x-user", &user)]).await) }
    };
    let mut before = HashMap::new();
    for k in 0..60 {
        let o = owner(format!("user-{k}")).await;
        assert_eq!(owner(format!("user-{k}")).await, o, "sticky within a table");
        before.insert(k, o);
    }
    let distinct: std::collections::HashSet<_> = before.values().collect();
    assert!(distinct.len() >= 2, "keys spread over instances: {distinct:?}");
    // A swap that leaves the instances in place: a new rule, and a fourth instance.
    let v = proxy.metric("zkroute_table_version").await.unwrap();
    let d = Backend::http("d").await;
    routes.backends("s", &[&d]);
    routes.rule("other", r#"{"listener":"http","match":{"path_prefix":"/other"},"backends":[{"service":"s"}]}"#);
    proxy.config_until("the swap", |c| addresses(c, "s").len() == 4 && c["version"].as_f64().unwrap() > v).await;
    for (k, o) in &before {
        let now = owner(format!("user-{k}")).await;
        assert!(now == *o || now == "d", "user-{k} moved from {o} to {now}, not to the new instance");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_on_another_instance() {
    let live = Backend::http("live").await;
    let routes = Routes::new();
    routes.instance("s", "dead", refused_addr());
    routes.backends("s", &[&live]);
    routes.rule("r", r#"{"listener":"http","retries":1,"backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    until_answered_by(&proxy, "h", "/", "live").await;
    for _ in 0..50 {
        let r = send(proxy.listener("http"), request("POST", "h", "/", &[], "body")).await.unwrap();
        assert_eq!(who(&r), "live", "connect failures are retried, POST included");
    }
    assert!(proxy.metric(r#"zkroute_upstream_connect_errors_total{service="s"}"#).await.unwrap() >= 1.0);
    assert!(proxy.metric(r#"zkroute_retries_total{service="s"}"#).await.unwrap() >= 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_that_reached_a_backend_is_not_retried() {
    let a = RawBackend::start(Misbehave::Drop).await;
    let b = RawBackend::start(Misbehave::Drop).await;
    let routes = Routes::new();
    routes.instance("s", "a", a.addr);
    routes.instance("s", "b", b.addr);
    routes.rule("r", r#"{"listener":"http","retries":3,"backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let r = send(proxy.listener("http"), request("POST", "h", "/", &[], "once")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(who(&r), "error:upstream_reset");
    let total =
        a.requests.load(std::sync::atomic::Ordering::SeqCst) + b.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(total, 1, "the POST reached one backend once");
    // A GET is idempotent: it is retried on the other instance.
    let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 502);
    let total2 =
        a.requests.load(std::sync::atomic::Ordering::SeqCst) + b.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(total2 - total, 2, "the GET was tried on both instances");
    proxy.stop().await;
}

/// HTTP/1 and h2c requests go through one attempt loop: the same retries, the same accounting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_request_is_retried_and_counted_as_an_http1_one_is() {
    use support::h2client::{h2_client, h2_get, h2_send};
    let a = RawBackend::start(Misbehave::Drop).await;
    let b = RawBackend::start(Misbehave::Drop).await;
    let routes = Routes::new();
    routes.instance("s", "a", a.addr);
    routes.instance("s", "b", b.addr);
    routes.rule("r", r#"{"listener":"http","retries":3,"backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let requests =
        || a.requests.load(std::sync::atomic::Ordering::SeqCst) + b.requests.load(std::sync::atomic::Ordering::SeqCst);
    let mut h2c = h2_client(proxy.listener("http")).await;
    let r = h2_send(&mut h2c, h2_get("http://h/")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(r.headers()["x-zkroute-error"], "upstream_reset");
    assert_eq!(requests(), 2, "the idempotent GET was tried on both instances, as over HTTP/1");
    assert_eq!(proxy.metric(r#"zkroute_retries_total{service="s"}"#).await, Some(1.0));
    let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(requests(), 4);
    assert_eq!(proxy.metric(r#"zkroute_retries_total{service="s"}"#).await, Some(2.0), "one retry each");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_line_without_a_reason_is_relayed() {
    // "HTTP/1.1 200" with no reason phrase (and no space) is common enough; it once made the
    // proxy slice outside its buffer.
    let bare = RawBackend::start(Misbehave::Answer(b"HTTP/1.1 200\r\nX-Empty:\r\nContent-Length: 2\r\n\r\nok")).await;
    let routes = Routes::new();
    routes.instance("s", "a", bare.addr);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    for _ in 0..2 {
        let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers().get("x-empty").map(|v| v.as_bytes()), Some(&b""[..]));
        assert_eq!(r.body().as_ref(), b"ok");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_attempts_than_retries_plus_one() {
    let backends = [
        RawBackend::start(Misbehave::Drop).await,
        RawBackend::start(Misbehave::Drop).await,
        RawBackend::start(Misbehave::Drop).await,
        RawBackend::start(Misbehave::Drop).await,
    ];
    let routes = Routes::new();
    routes.rule("r", r#"{"listener":"http","retries":2,"backends":[{"service":"s"}]}"#);
    for (i, b) in backends.iter().enumerate() {
        routes.instance("s", &i.to_string(), b.addr);
    }
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let count = || backends.iter().map(|b| b.requests.load(std::sync::atomic::Ordering::SeqCst)).sum::<usize>();
    for n in 1..=5 {
        let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
        assert_eq!(r.status(), 502);
        assert_eq!(count(), 3 * n, "retries 2: three attempts per request");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_across_table_swaps() {
    let b = Backend::http("b").await;
    let (routes, proxy) = Routes::serving("s", &[&b]).await;
    until_answered_by(&proxy, "h", "/", "b").await;
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    let c0 = b.connections();
    for i in 0..100 {
        if i == 50 {
            // A swap that keeps the instance: its pool stays.
            let v = proxy.metric("zkroute_table_version").await.unwrap();
            routes.rule("other", r#"{"listener":"http","match":{"path_prefix":"/o"},"backends":[{"service":"s"}]}"#);
            proxy.config_until("the swap", |c| c["version"].as_f64().unwrap() > v).await;
        }
        assert_eq!(client.send(request("GET", "h", "/", &[], "")).await.unwrap().status(), 200);
    }
    assert!(b.connections() - c0 <= 1, "100 sequential requests used {} upstream connections", b.connections() - c0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_on_the_table_it_started_on() {
    let b = Backend::http("b").await;
    let (routes, proxy) = Routes::serving("s", &[&b]).await;
    until_answered_by(&proxy, "h", "/", "b").await;
    let addr = proxy.listener("http");
    let slow = tokio::spawn(async move { send(addr, request("GET", "h", "/?sleep_ms=1000", &[], "")).await });
    eventually("the slow request reached the backend", Duration::from_secs(5), || async {
        (b.requests() >= 2).then_some(())
    })
    .await;
    // Remove the instance and the rule: the new table has no route at all.
    routes.remove_instance("s", "b");
    routes.remove_rule("r");
    proxy.config_until("the swap", |c| route_count(c) == 0).await;
    assert_eq!(call(&proxy, "h", "/", &[]).await.status(), 404, "new requests see the new table");
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status(), who(&r)), (http::StatusCode::OK, "b".to_owned()), "the request in flight finished");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_answer_has_its_status_and_reason() {
    let slow = Backend::http("slow").await;
    let routes = Routes::new();
    routes.backends("slow", &[&slow]);
    routes.instance("dead", "1", refused_addr());
    routes.rule("empty", r#"{"listener":"http","match":{"path_prefix":"/empty"},"backends":[{"service":"nobody"}]}"#);
    routes.rule(
        "dead",
        r#"{"listener":"http","match":{"path_prefix":"/dead"},"retries":0,"backends":[{"service":"dead"}]}"#,
    );
    routes.rule("slow", r#"{"listener":"http","match":{"path_prefix":"/slow"},"timeout":"200ms","retries":0,"backends":[{"service":"slow"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let config = proxy.config().await;
    assert_eq!((route_count(&config), addresses(&config, "dead").len()), (3, 1));
    let cases = [
        ("/nothing", 404, "no_route"),
        ("/empty", 503, "no_healthy_upstream"),
        ("/dead", 502, "upstream_connect_failed"),
        ("/slow?sleep_ms=2000", 504, "upstream_timeout"),
    ];
    for (path, status, code) in cases {
        let r = call(&proxy, "h", path, &[]).await;
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["x-zkroute-error"], code, "{path}");
        let body = String::from_utf8_lossy(r.body());
        assert!(body.starts_with(code) && body.ends_with('\n') && body.lines().count() == 1, "{path}: {body:?}");
    }
    // Malformed and oversized requests, on raw sockets.
    let bad = raw_exchange(
        proxy.listener("http"),
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400 ") && bad.contains("x-zkroute-error: bad_request"), "{bad}");
    let garbage = raw_exchange(proxy.listener("http"), b"\x01\x02 nonsense\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "x".repeat(70 * 1024));
    let big = raw_exchange(proxy.listener("http"), big.as_bytes()).await;
    assert!(big.starts_with("HTTP/1.1 431 ") && big.contains("x-zkroute-error: headers_too_large"), "{big}");
    assert_eq!(proxy.metric(r#"zkroute_http_requests_total{code="404",listener="http",service=""}"#).await, Some(1.0));
    assert_eq!(
        proxy.metric(r#"zkroute_http_requests_total{code="504",listener="http",service="slow"}"#).await,
        Some(1.0)
    );
    proxy.stop().await;
}

/// Writes `bytes` on a fresh connection and reads the answer until the proxy closes it.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_are_added_removed_and_host_is_kept() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = Routes::serving("s", &[&b]).await;
    let r = call(
        &proxy,
        "users.internal:15001",
        "/",
        &[
            ("connection", "x-private"),
            ("x-private", "1"),
            ("keep-alive", "5"),
            ("x-forwarded-for", "10.9.9.9"),
            ("x-other", "kept"),
        ],
    )
    .await;
    let h = r.headers();
    assert_eq!(h["x-echo-host"], "users.internal:15001");
    assert_eq!(h["x-echo-x-forwarded-for"], "10.9.9.9, 127.0.0.1");
    assert_eq!(h["x-echo-x-forwarded-proto"], "http");
    assert_eq!(h["x-echo-x-other"], "kept");
    assert!(h.get("x-echo-x-private").is_none(), "named in Connection: removed");
    assert!(h.get("x-echo-keep-alive").is_none());
    assert!(h.get("x-echo-connection").is_none());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_of_every_framing_pass_through() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = Routes::serving("s", &[&b]).await;
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    for size in [0usize, 1, 100, 16 * 1024, 16 * 1024 + 1, 1024 * 1024 + 7] {
        let body: String = (0..size).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let r = client.send(request("POST", "h", "/?echo=1", &[], &body)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.body().len(), size);
        assert!(r.body() == body.as_bytes(), "size {size}");
    }
    // A chunked request body, on a raw socket, then a second request on the same connection.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(b"POST /?echo=1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await.unwrap().unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("hello world"), "{out}");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 2, "{out}");
    // HEAD gets no body.
    let r = send(proxy.listener("http"), request("HEAD", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.body().is_empty());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_requests_go_through() {
    let b = Backend::http("b").await;
    let routes = Routes::new();
    routes.backends("s", &[&b]);
    routes.rule("r", r#"{"listener":"http","match":{"path_prefix":"/api"},"backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let stream = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut handles = Vec::new();
    for i in 0..20 {
        let mut s = sender.clone();
        handles.push(tokio::spawn(async move {
            let req = http::Request::post(format!("http://h/api?echo=1&i={i}"))
                .body(http_body_util::Full::new(Bytes::from(format!("req-{i}"))))
                .unwrap();
            let resp = s.send_request(req).await.unwrap();
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            (status, body)
        }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let (status, body) = h.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, format!("req-{i}"));
    }
    let resp = sender
        .send_request(http::Request::get("http://h/none").body(http_body_util::Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["x-zkroute-error"], "no_route");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_echoes_end_to_end() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = Backend::http("b").await;
    let (_routes, proxy) = Routes::serving("s", &[&b]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket") && head.contains("connection: upgrade"), "{head}");
    for msg in [&b"ping"[..], b"a longer frame of bytes", &[0u8, 255, 7]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_upstream_request() {
    use tokio::io::AsyncWriteExt;
    let hold = RawBackend::start(Misbehave::Hold).await;
    let routes = Routes::new();
    routes.instance("s", "1", hold.addr);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let mut s = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
    eventually("the request reached the backend", Duration::from_secs(5), || async {
        (hold.requests.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    drop(s);
    eventually("the backend saw the upstream connection close", Duration::from_secs(5), || async {
        (hold.hangups.load(std::sync::atomic::Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_table_swaps_fails_no_request() {
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    let (routes, proxy) = Routes::serving("s", &[&a, &b]).await;
    let updates_before = proxy.metric("zkroute_table_updates_total").await.unwrap();

    let addr = proxy.listener("http");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut client = KeepAlive::connect(addr).await;
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match client.send(request("GET", "h", "/", &[], "")).await {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status(), who(&r))),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        }));
    }
    // One change per millisecond for two seconds: an unrelated rule changes, and a third
    // (draining) instance changes; every change is a new table for the same two live instances.
    // The file source looks at its file every 200 ms, so the flood goes to the control loop
    // directly, one change at a time as ZooKeeper's watches deliver them.
    routes.rule("other", r#"{"listener":"http","match":{"path_prefix":"/x"},"backends":[{"service":"s"}]}"#);
    routes.instance("s", "drain", format!(r#"{{"address":"127.0.0.1","port":{},"enabled":false}}"#, a.addr.port()));
    proxy.config_until("the other rule and the draining instance", |c| routes.shown_in(c)).await;
    let started = Instant::now();
    let mut n = 0u32;
    let tick = tokio::time::interval(Duration::from_millis(1));
    tokio::pin!(tick);
    while started.elapsed() < Duration::from_secs(2) {
        tick.as_mut().tick().await;
        let change = if n % 2 == 0 {
            let rule =
                format!(r#"{{"listener":"http","match":{{"path_prefix":"/x{n}"}},"backends":[{{"service":"s"}}]}}"#);
            rule_change("other", Some(node("rules.other", rule)))
        } else {
            let drain = format!(
                r#"{{"address":"127.0.0.1","port":{},"enabled":false,"payload":{{"weight":{n}}}}}"#,
                a.addr.port()
            );
            instance_change(ServiceName::new("s"), "drain", Some(node("services.s.drain", drain)))
        };
        assert!(proxy.app.updates.send(Update::new(vec![change], Some(Instant::now()))), "the control loop runs");
        n += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.await.unwrap();
        assert!(failed.is_empty(), "failed requests during swaps: {:?}", &failed[..failed.len().min(5)]);
        total += ok;
    }
    let swaps = proxy.metric("zkroute_table_updates_total").await.unwrap() - updates_before;
    assert!(total > 500, "steady traffic: {total} requests");
    assert!(n > 1000, "changes written: {n}");
    assert!(swaps > 50.0, "the table was swapped many times: {swaps}");
    proxy.stop().await;
}

/// A node of the routes file as the file source passes it on.
fn node(key: &str, data: String) -> RawNode {
    let origin =
        Origin { source: SourceKind::File, path: format!("routes.toml#{key}").into(), mzxid: None, version: None };
    RawNode { origin, data: data.into_bytes() }
}
