#![allow(clippy::unwrap_used)]
//! Upstream protection and traffic policy end to end (README: "Policy documents", "Rule
//! documents"): circuit breaking, rate limits, retry budgets, per-try timeouts, with real slow and
//! failing backends, real clients, and routes from a static file.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A zkroute with listener `http` sending every request to service `s` (`backends`), under the
/// policy `policy` and with `rule_extra` keys in the rule.
async fn protected(backends: &[&Backend], policy: &str, rule_extra: &str) -> (Routes, Proxy) {
    let routes = Routes::new();
    routes.backends("s", backends);
    routes.rule("r", &format!(r#"{{"listener":"http","backends":[{{"service":"s"}}]{rule_extra}}}"#));
    if !policy.is_empty() {
        routes.policy("s", policy);
    }
    let proxy = routes.proxy(HTTP_LISTENER).await;
    (routes, proxy)
}

/// `n` GETs of `path` sent at once, each on a connection of its own: each answer with the time
/// it took.
async fn concurrent(proxy: &Proxy, n: usize, path: &str) -> Vec<(Response<Bytes>, Duration)> {
    let addr = proxy.listener("http");
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let path = path.to_owned();
            tokio::spawn(async move {
                let t = Instant::now();
                let r = send(addr, request("GET", "s", &path, &[], "")).await.unwrap();
                (r, t.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn error_code(r: &Response<Bytes>) -> &str {
    r.headers().get("x-zkroute-error").map_or("", |v| v.to_str().unwrap())
}

/// The answers that are overflows, checked to be 503s that came at once.
fn overflows(answers: &[(Response<Bytes>, Duration)], at_once: Duration) -> usize {
    let over: Vec<_> = answers.iter().filter(|(r, _)| error_code(r) == "overflow").collect();
    for (r, took) in &over {
        assert_eq!(r.status(), 503);
        assert!(*took < at_once, "an overflow is answered at once, took {took:?}");
    }
    over.len()
}

fn ok_count(answers: &[(Response<Bytes>, Duration)]) -> usize {
    answers.iter().filter(|(r, _)| r.status() == 200).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_concurrent_requests_against_max_requests_2_get_two_answers_and_four_overflows() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = protected(&[&b], r#"{"circuit_breaker":{"max_requests":2}}"#, "").await;
    let answers = concurrent(&proxy, 6, "/?sleep_ms=1500").await;
    assert_eq!(ok_count(&answers), 2, "two answered");
    assert_eq!(overflows(&answers, Duration::from_millis(1000)), 4, "four refused at once");
    assert_eq!(b.requests(), 2, "the overflows never reached the backend");
    let m = r#"zkroute_overflow_total{limit="max_requests",service="s"}"#;
    assert_eq!(proxy.metric(m).await, Some(4.0));
    // The slots were given back: the next request goes through.
    assert_eq!(call_status(&proxy, "/").await, 200);
    let config = proxy.config().await;
    assert_eq!(config["services"]["s"]["policy"]["circuit_breaker"]["max_requests"], 2, "/config shows the limits");
    proxy.stop().await;
}

async fn call_status(proxy: &Proxy, path: &str) -> u16 {
    send(proxy.listener("http"), request("GET", "s", path, &[], "")).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_the_one_allowed_connection_up_to_max_pending() {
    let b = Backend::http("b").await;
    let policy = r#"{"circuit_breaker":{"max_connections":1,"max_pending":1}}"#;
    let (_routes, proxy) = protected(&[&b], policy, "").await;
    let answers = concurrent(&proxy, 3, "/?sleep_ms=700").await;
    assert_eq!(ok_count(&answers), 2, "one answered at once, one after waiting for the connection");
    assert_eq!(overflows(&answers, Duration::from_millis(600)), 1, "the third found the wait list full");
    let waited = answers.iter().filter(|(r, _)| r.status() == 200).map(|(_, t)| *t).max().unwrap();
    assert!(waited >= Duration::from_millis(1400), "the waiting request went after the first: {waited:?}");
    assert_eq!(b.connections(), 1, "the waiting request took the first one's connection");
    assert_eq!(proxy.metric(r#"zkroute_overflow_total{limit="max_pending",service="s"}"#).await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_times_out_within_its_timeout() {
    let b = Backend::http("b").await;
    let routes = Routes::new();
    routes.backends("s", &[&b]);
    routes.rule("long", r#"{"listener":"http","match":{"path_prefix":"/long"},"backends":[{"service":"s"}]}"#);
    routes.rule("short", r#"{"listener":"http","priority":-1,"timeout":"300ms","backends":[{"service":"s"}]}"#);
    routes.policy("s", r#"{"circuit_breaker":{"max_connections":1}}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let addr = proxy.listener("http");
    // The one connection is busy for 1.5 s; a request meanwhile waits for it (no max_pending:
    // any number may wait), within its own 300 ms.
    let long = tokio::spawn(async move { send(addr, request("GET", "s", "/long?sleep_ms=1500", &[], "")).await });
    eventually("the long request upstream", Duration::from_secs(5), || async { (b.requests() == 1).then_some(()) })
        .await;
    let t = Instant::now();
    let r = send(addr, request("GET", "s", "/", &[], "")).await.unwrap();
    assert_eq!(error_code(&r), "upstream_timeout", "timed out waiting, not refused");
    assert!(t.elapsed() >= Duration::from_millis(290), "it waited: {:?}", t.elapsed());
    assert_eq!(b.requests(), 1, "the waiting request never had a connection");
    assert_eq!(long.await.unwrap().unwrap().status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_are_capped_by_max_retries() {
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    for x in [&a, &b] {
        x.state.force_status.store(503, std::sync::atomic::Ordering::SeqCst);
    }
    let policy = r#"{"circuit_breaker":{"max_retries":1}}"#;
    let (_routes, proxy) = protected(&[&a, &b], policy, r#","retries":1"#).await;
    let answers = concurrent(&proxy, 4, "/?sleep_ms=400").await;
    assert!(answers.iter().all(|(r, _)| r.status().is_server_error()));
    // Four first tries; of the four retries they ask for at about the same time, one may run.
    assert_eq!(a.requests() + b.requests(), 5, "4 tries and 1 retry reached the upstreams");
    assert_eq!(proxy.metric(r#"zkroute_overflow_total{limit="max_retries",service="s"}"#).await, Some(3.0));
    assert_eq!(proxy.metric(r#"zkroute_retries_total{service="s"}"#).await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_circuit_breaker_every_request_goes_through() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = protected(&[&b], "", "").await;
    let answers = concurrent(&proxy, 6, "/?sleep_ms=300").await;
    assert_eq!(ok_count(&answers), 6);
    proxy.stop().await;
}

const TCP_LISTENER: &str =
    "[[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"db\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_past_max_connections_are_closed_and_counted() {
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("db", "1", echo.addr);
    routes.policy("db", r#"{"circuit_breaker":{"max_connections":1}}"#);
    let proxy = routes.proxy(TCP_LISTENER).await;
    let addr = proxy.listener("db");

    let mut first = TcpStream::connect(addr).await.unwrap();
    first.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    first.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping", "the first connection is relayed");

    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the second is closed at once: {read:?}");
    let rejected = r#"zkroute_tcp_connections_rejected_total{listener="db",reason="overflow"}"#;
    assert_eq!(proxy.metric(rejected).await, Some(1.0));
    assert_eq!(proxy.metric(r#"zkroute_overflow_total{limit="max_connections",service="db"}"#).await, Some(1.0));

    drop(first);
    eventually("a connection again once the first closed", Duration::from_secs(5), || async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"pong").await.ok()?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await.ok()?.ok()?;
        (&buf == b"pong").then_some(())
    })
    .await;
    proxy.stop().await;
}

/// `n` GETs one after another on one keep-alive connection, with `headers`: the statuses, and
/// the refusals checked to carry their code and `retry-after`.
async fn rapid(proxy: &Proxy, n: usize, headers: &[(&str, &str)]) -> (usize, usize) {
    let mut conn = KeepAlive::connect(proxy.listener("http")).await;
    let (mut passed, mut refused) = (0, 0);
    for _ in 0..n {
        let r = conn.send(request("GET", "s", "/", headers, "")).await.unwrap();
        match r.status().as_u16() {
            200 => passed += 1,
            429 => {
                assert_eq!(error_code(&r), "rate_limited");
                let after: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=2).contains(&after), "retry-after {after}");
                refused += 1;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    (passed, refused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_of_5_per_second_with_burst_5_passes_5_to_10_of_30_rapid_requests() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = protected(&[&b], "", r#","rate_limit":{"per_second":5,"burst":5}"#).await;
    let t = Instant::now();
    let (passed, refused) = rapid(&proxy, 30, &[]).await;
    // The burst, plus one more per 200 ms the 30 requests took.
    let most = 5 + (t.elapsed().as_millis() / 200) as usize;
    assert!((5..=most.min(10)).contains(&passed), "{passed} passed in {:?}", t.elapsed());
    assert_eq!(passed + refused, 30);
    assert_eq!(b.requests(), passed, "refused requests never reach the backend");
    assert_eq!(proxy.metric(r#"zkroute_rate_limited_total{listener="http",rule="r"}"#).await, Some(refused as f64));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_per_header_gives_each_key_its_own_limit() {
    let b = Backend::http("b").await;
    let rule = r#","rate_limit":{"per_second":1,"burst":3,"key":"header:x-user"}"#;
    let (_routes, proxy) = protected(&[&b], "", rule).await;
    let (alice, _) = rapid(&proxy, 6, &[("x-user", "alice")]).await;
    let (bob, _) = rapid(&proxy, 6, &[("x-user", "bob")]).await;
    assert!((3..=4).contains(&alice), "alice's burst: {alice}");
    assert!((3..=4).contains(&bob), "bob has a limit of his own: {bob}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_h2c_request_gets_429_with_retry_after() {
    let b = Backend::http("b").await;
    let (_routes, proxy) = protected(&[&b], "", r#","rate_limit":{"per_second":1,"burst":1}"#).await;
    let addr = proxy.listener("http");
    let mut statuses = Vec::new();
    let mut client = h2client::h2_client(addr).await;
    for _ in 0..3 {
        let r = h2client::h2_send(&mut client, h2client::h2_get("http://s/")).await.unwrap();
        if r.status() == 429 {
            assert_eq!(error_code(&r), "rate_limited");
            assert!(r.headers().contains_key("retry-after"));
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 2, "{statuses:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_budget_stops_a_retry_storm_when_every_backend_fails() {
    let backends = [Backend::http("a").await, Backend::http("b").await, Backend::http("c").await];
    for b in &backends {
        b.state.force_status.store(503, std::sync::atomic::Ordering::SeqCst);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let policy = r#"{"retry_budget":{"percent":20,"min_per_second":1}}"#;
    let (_routes, proxy) = protected(&refs, policy, r#","retries":2"#).await;
    let mut conn = KeepAlive::connect(proxy.listener("http")).await;
    for _ in 0..50 {
        let r = conn.send(request("GET", "s", "/", &[], "")).await.unwrap();
        assert!(r.status().is_server_error());
    }
    // Without the budget: 50 tries and 100 retries. With it: a reserve of 1/s over the 10 s
    // window, and a fifth of the 50 requests.
    let attempts: usize = backends.iter().map(Backend::requests).sum();
    assert!((50..=70).contains(&attempts), "{attempts} upstream attempts");
    let retries = proxy.metric(r#"zkroute_retries_total{service="s"}"#).await.unwrap();
    assert_eq!(retries as usize, attempts - 50);
    let refused = proxy.metric(r#"zkroute_overflow_total{limit="retry_budget",service="s"}"#).await;
    assert!(refused.is_some_and(|n| n > 0.0), "retries refused by the budget are counted");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_try_timeout_retries_a_slow_first_attempt_on_another_endpoint() {
    let slow = Backend::http("slow").await;
    slow.state.delay_ms.store(1500, std::sync::atomic::Ordering::SeqCst);
    let fast = Backend::http("fast").await;
    let routes = Routes::new();
    // The slow one has nearly all the weight: it takes nearly every first try.
    let instance = |b: &Backend, w: u32| format!(r#"{{"host":"127.0.0.1","port":{},"weight":{w}}}"#, b.addr.port());
    routes.instance("s", "slow", instance(&slow, 10000));
    routes.instance("s", "fast", instance(&fast, 1));
    routes.rule(
        "r",
        r#"{"listener":"http","timeout":"5s","per_try_timeout":"200ms","retries":1,"backends":[{"service":"s"}]}"#,
    );
    let proxy = routes.proxy(HTTP_LISTENER).await;
    for _ in 0..3 {
        let t = Instant::now();
        let r = send(proxy.listener("http"), request("GET", "s", "/", &[], "")).await.unwrap();
        assert_eq!((r.status().as_u16(), who(&r).as_str()), (200, "fast"));
        assert!(t.elapsed() < Duration::from_millis(1200), "the slow try was cut short: {:?}", t.elapsed());
    }
    assert!(slow.requests() >= 1, "the first tries went to the slow endpoint");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_rules_edit_requests_and_responses_and_traceparent_passes_untouched() {
    let b = Backend::http("b").await;
    let edits = r#","request_headers":{"set":{"x-env":"prod"},"add":{"x-tag":"added"},"remove":["x-secret"]},
        "response_headers":{"set":{"x-served-by":"zkroute"},"remove":["x-backend"]}"#;
    let (_routes, proxy) = protected(&[&b], "", edits).await;
    let trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = [("x-env", "dev"), ("x-secret", "s3"), ("x-tag", "mine"), ("traceparent", trace)];
    let r = send(proxy.listener("http"), request("GET", "s", "/", &headers, "")).await.unwrap();
    assert_eq!(r.status(), 200);
    let echoed = |name: &str| -> Vec<&str> {
        r.headers().get_all(format!("x-echo-{name}")).iter().map(|v| v.to_str().unwrap()).collect()
    };
    assert_eq!(echoed("x-env"), ["prod"], "set replaces the client's value");
    assert_eq!(echoed("x-tag"), ["mine", "added"], "add keeps the client's value");
    assert!(echoed("x-secret").is_empty(), "removed before forwarding");
    assert_eq!(echoed("traceparent"), [trace], "traceparent goes through as it came");
    assert_eq!(r.headers()["x-served-by"], "zkroute");
    assert!(r.headers().get("x-backend").is_none(), "removed from the response");
    assert_eq!(r.body(), "b", "the body is untouched");

    // The same over h2c.
    let mut client = h2client::h2_client(proxy.listener("http")).await;
    let req = http::Request::get("http://s/").header("x-secret", "s3").body(http_body_util::Full::new(Bytes::new()));
    let r = h2client::h2_send(&mut client, req.unwrap()).await.unwrap();
    assert!(r.headers().get("x-echo-x-secret").is_none());
    assert_eq!(r.headers()["x-echo-x-env"], "prod");
    assert_eq!(r.headers()["x-served-by"], "zkroute");
    assert!(r.headers().get("x-backend").is_none());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_added_when_absent_kept_when_present_and_logged() {
    let b = Backend::http("b").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let routes = Routes::new();
    routes.backends("s", &[&b]);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    let extra =
        format!("{HTTP_LISTENER}[proxy]\nrequest_id = true\n[log]\naccess_log = {:?}\n", log.display().to_string());
    let proxy = routes.proxy(&extra).await;
    let r = send(proxy.listener("http"), request("GET", "s", "/new", &[], "")).await.unwrap();
    let made = r.headers()["x-echo-x-request-id"].to_str().unwrap().to_owned();
    assert!(made.len() == 32 && made.bytes().all(|c| c.is_ascii_hexdigit()), "{made:?}");
    let r = send(proxy.listener("http"), request("GET", "s", "/kept", &[("x-request-id", "abc-1")], "")).await.unwrap();
    let echoed: Vec<_> = r.headers().get_all("x-echo-x-request-id").iter().collect();
    assert_eq!(echoed, ["abc-1"], "the client's id is kept, not doubled");
    eventually("both ids in the access log", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.contains(&format!("id={made}")) && text.contains("id=abc-1")).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_keeps_its_state_when_the_table_is_rebuilt() {
    let b = Backend::http("b").await;
    let c = Backend::http("c").await;
    let (routes, proxy) = protected(&[&b], "", r#","rate_limit":{"per_second":1,"burst":3}"#).await;
    let t = Instant::now();
    let (passed, _) = rapid(&proxy, 4, &[]).await;
    assert!((3..=4).contains(&passed));
    // A new instance rebuilds the route; the rule's limit is the same, so its budget stays spent:
    // what passes now is what 1/s refilled since, not a fresh burst of 3.
    routes.backends("s", &[&b, &c]);
    proxy.config_until("the new instance", |cfg| addresses(cfg, "s").len() == 2).await;
    let (after, _) = rapid(&proxy, 3, &[]).await;
    let refilled = t.elapsed().as_secs() as usize + 1;
    assert!(after <= refilled, "{after} passed after the rebuild, {refilled} refilled at most");
    if refilled < 3 {
        assert!(after < 3, "the burst was not refilled by the rebuild");
    }
    proxy.stop().await;
}
