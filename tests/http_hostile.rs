#![allow(clippy::unwrap_used)]
//! Hostile input to the HTTP engine from both sides: what upstreams send back, h2c connections
//! that stall or flood, and client faults. Each test puts a raw upstream behind zkroute that
//! sends exactly the bytes in question and logs what it receives, with raw client sockets (or
//! an h2 client) in front. Routes come from the static file source: ZooKeeper is not the
//! subject here.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::h2client::{error_code, h2_client, h2_get, h2_send};
use support::h2frames as h2;
use support::routes::Routes;
use support::scripted::{Act, Upstream, proxy_to, proxy_with_policy, send};
use support::wire::Wire;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n";
const WAIT: Duration = Duration::from_secs(10);

// ---- 1. an unsolicited 101 ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_101_is_a_bad_gateway_and_its_connection_is_dropped() {
    let upstream = Upstream::start(|r| match r.conn {
        0 => vec![send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\n"), Act::Hold],
        _ => vec![send(OK)],
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let addr = proxy.listener("http");
    let resp = Wire::exchange(addr, GET).await.unwrap();
    assert_eq!((resp.status, resp.header("x-zkroute-error")), (502, Some("upstream_reset")), "{}", resp.head);
    upstream.wait_closed(0, WAIT).await;
    // The next client's request goes to a fresh connection, never into the switched one.
    let resp = Wire::exchange(addr, GET).await.unwrap();
    assert_eq!((resp.status, resp.body_text().as_str()), (200, "ok"));
    assert_eq!(upstream.requests_on(0), 1, "{:?}", upstream.received(0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsolicited_101_never_reaches_an_h2_client() {
    let upstream = Upstream::start(|_| {
        vec![send("HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\n"), Act::Hold]
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut h2c = h2_client(proxy.listener("http")).await;
    let resp = h2_send(&mut h2c, h2_get("http://h/")).await.unwrap();
    assert_eq!((resp.status().as_u16(), error_code(&resp)), (502, Some("upstream_reset")));
    upstream.wait_closed(0, WAIT).await;
    proxy.stop().await;
}

// ---- 2. Content-Length with Transfer-Encoding -----------------------------------------------

const BOTH_LENGTHS: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_lengths_goes_out_framed_by_transfer_encoding_alone() {
    let upstream = Upstream::answering(BOTH_LENGTHS).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let addr = proxy.listener("http");

    // HTTP/1.1: chunked, no Content-Length, and the client connection stays usable.
    let mut client = Wire::connect(addr).await;
    client.send(GET).await;
    let resp = client.response(false).await.unwrap();
    assert_eq!((resp.status, resp.body_text().as_str()), (200, "hello"));
    assert_eq!(resp.header("content-length"), None, "{}", resp.head);
    upstream.wait_closed(0, WAIT).await;
    client.send(GET).await;
    assert_eq!(client.response(false).await.unwrap().body_text(), "hello");
    assert_eq!((upstream.conns(), upstream.requests_on(0)), (2, 1), "that upstream connection was not reused");

    // HTTP/1.0: neither field, the body de-chunked and ended by the close.
    let resp = Wire::exchange(addr, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    assert_eq!((resp.status, resp.body_text().as_str()), (200, "hello"));
    assert!(resp.header("content-length").is_none() && resp.header("transfer-encoding").is_none(), "{}", resp.head);
    assert!(resp.closes(), "{}", resp.head);

    // HTTP/2: the body is what the chunks carried, with no stale length.
    let mut h2c = h2_client(addr).await;
    let resp = h2_send(&mut h2c, h2_get("http://h/")).await.unwrap();
    assert_eq!((resp.status().as_u16(), resp.body().as_ref()), (200, &b"hello"[..]));
    assert!(resp.headers().get("content-length").is_none(), "{:?}", resp.headers());
    proxy.stop().await;
}

// ---- 3. framing fields named in Connection --------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_the_framing_of_a_response() {
    let upstream = Upstream::start(|r| {
        vec![send(match r.path() {
            "/cl" => &b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello"[..],
            _ => b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        })]
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut client = Wire::connect(proxy.listener("http")).await;
    for path in ["/cl", "/te", "/cl"] {
        client.send(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n")).await;
        let resp = client.response(false).await.unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!((resp.status, resp.body_text().as_str()), (200, "hello"), "{path}");
        assert!(!resp.closes(), "{path}: {}", resp.head);
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cannot_strip_host_and_every_forwarded_request_has_one() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let addr = proxy.listener("http");
    let resp = Wire::exchange(addr, b"GET /named HTTP/1.1\r\nHost: a.test\r\nConnection: host\r\n\r\n").await.unwrap();
    assert_eq!(resp.status, 200);
    let resp = Wire::exchange(addr, b"GET /http10 HTTP/1.0\r\n\r\n").await.unwrap();
    assert_eq!(resp.status, 200);
    // An h2 request without :authority or Host, in raw frames (clients always send one).
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = h2::client_start();
    let block = h2::block(&[(":method", "GET"), (":scheme", "http"), (":path", "/h2")]);
    out.extend(h2::frame(h2::HEADERS, h2::END_HEADERS | h2::END_STREAM, 1, &block));
    s.write_all(&out).await.unwrap();
    upstream.wait_requests(3, WAIT).await;
    let seen = upstream.all_received();
    let head_of = |path: &str| {
        let start = seen.find(&format!("GET {path} ")).unwrap_or_else(|| panic!("{path} in {seen:?}"));
        seen[start..].split("\r\n\r\n").next().unwrap().to_owned()
    };
    assert!(head_of("/named").contains("\r\nHost: a.test\r\n"), "{}", head_of("/named"));
    for path in ["/http10", "/h2"] {
        let head = head_of(path);
        assert!(head.starts_with(&format!("GET {path} HTTP/1.1\r\n")), "{head}");
        assert_eq!(head.to_ascii_lowercase().matches("\r\nhost:").count(), 1, "{head}");
        // The service's name, as nginx sends its upstream's: nginx itself refuses an empty Host.
        assert!(head.contains("\r\nhost: s\r\n"), "the service's name for a target without authority: {head}");
    }
    proxy.stop().await;
}

// ---- 4. h2c client timeouts and limits ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_h2c_clients_are_closed_at_the_idle_timeout() {
    let upstream = Upstream::answering(OK).await;
    // After the GOAWAY, a client that never answers it is dropped within the header timeout.
    let limits = "idle_timeout = \"1s\"\nheader_read_timeout = \"1s\"\nmax_connections = 5\n";
    let (proxy, _routes) = proxy_to(upstream.addr, limits).await;
    let addr = proxy.listener("http");
    let mut silent = Vec::new();
    for _ in 0..5 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&h2::client_start()).await.unwrap();
        silent.push(s);
    }
    let started = Instant::now();
    for mut s in silent {
        let (frames, closed) = h2::frames_until_close(&mut s, WAIT).await;
        assert!(closed, "an idle h2c connection was closed");
        assert!(frames.iter().any(|f| f.kind == h2::GOAWAY), "with a GOAWAY first: {frames:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(8), "closed after {:?}", started.elapsed());
    let resp = Wire::exchange(addr, GET).await.unwrap();
    assert_eq!(resp.status, 200, "the listener has room again");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preface_sent_a_byte_at_a_time_is_cut_off_at_the_header_timeout() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "header_read_timeout = \"500ms\"\nidle_timeout = \"60s\"\n").await;
    let s = TcpStream::connect(proxy.listener("http")).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for b in h2::PREFACE {
            if w.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        std::future::pending::<()>().await;
    });
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(3), r.read(&mut byte)).await;
    trickle.abort();
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "cut off: {closed:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "at the header timeout: {:?}", started.elapsed());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_header_block_left_open_is_cut_off_at_the_header_timeout() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "header_read_timeout = \"500ms\"\nidle_timeout = \"60s\"\n").await;
    let mut s = TcpStream::connect(proxy.listener("http")).await.unwrap();
    let mut out = h2::client_start();
    let block = h2::block(&[(":method", "GET"), (":scheme", "http"), (":authority", "h"), (":path", "/")]);
    // HEADERS without END_HEADERS: the block goes on in CONTINUATION frames that never come.
    out.extend(h2::frame(h2::HEADERS, h2::END_STREAM, 1, &block[..block.len() / 2]));
    s.write_all(&out).await.unwrap();
    let started = Instant::now();
    let (_, closed) = h2::frames_until_close(&mut s, Duration::from_secs(5)).await;
    assert!(closed && started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    assert_eq!(upstream.requests(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upstream_body_resets_its_h2_stream_at_the_stream_idle_timeout() {
    let upstream =
        Upstream::start(|_| vec![send("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789"), Act::Hold]).await;
    let (proxy, _routes) =
        proxy_to(upstream.addr, "stream_idle_timeout = \"1s\"\nidle_timeout = \"60s\"\ntimeout = \"60s\"\n").await;
    let mut h2c = h2_client(proxy.listener("http")).await;
    let started = Instant::now();
    let resp = h2c.send_request(h2_get("http://h/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect()).await.expect("the stream ends");
    assert!(body.is_err(), "reset, not completed");
    assert!(started.elapsed() < Duration::from_secs(5), "reset after {:?}", started.elapsed());
    upstream.wait_closed(0, WAIT).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_client_that_stops_reading_has_its_stream_reset_and_the_upstream_freed() {
    let mut big = b"HTTP/1.1 200 OK\r\nContent-Length: 16777216\r\n\r\n".to_vec();
    big.resize(big.len() + (16 << 20), b'x');
    let big: &'static [u8] = Box::leak(big.into_boxed_slice());
    let upstream = Upstream::start(move |_| vec![send(big), Act::Hold]).await;
    let (proxy, _routes) =
        proxy_to(upstream.addr, "stream_idle_timeout = \"1s\"\nidle_timeout = \"60s\"\ntimeout = \"60s\"\n").await;
    let mut h2c = h2_client(proxy.listener("http")).await;
    let resp = h2c.send_request(h2_get("http://h/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The body is never read: flow control stops the stream once the client's window is full.
    upstream.wait_closed(0, WAIT).await;
    drop(resp);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_streams_beyond_the_limit_are_refused() {
    let upstream = Upstream::start(|_| vec![Act::Hold]).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "h2_max_concurrent_streams = 2\n").await;
    let mut s = TcpStream::connect(proxy.listener("http")).await.unwrap();
    s.write_all(&h2::client_start()).await.unwrap();
    let settings = h2::read_frame(&mut s, WAIT).await.unwrap().unwrap();
    assert_eq!(settings.kind, h2::SETTINGS);
    assert!(settings.settings().contains(&(h2::SETTINGS_MAX_CONCURRENT_STREAMS, 2)), "{:?}", settings.settings());
    // Acknowledged, the limit is in force: the third stream at once is refused.
    s.write_all(&h2::frame(h2::SETTINGS, 0x1, 0, &[])).await.unwrap();
    for id in [1, 3, 5] {
        s.write_all(&h2::get(id, "h", "/")).await.unwrap();
    }
    let refused = loop {
        let f = h2::read_frame(&mut s, WAIT).await.unwrap().expect("the connection stays");
        if f.kind == h2::RST_STREAM {
            break f;
        }
    };
    assert_eq!((refused.stream, refused.error_code()), (5, Some(h2::REFUSED_STREAM)));
    upstream.wait_requests(2, WAIT).await;
    assert_eq!(upstream.requests(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_flood_is_stopped() {
    // CVE-2023-44487: streams opened and reset at once, thousands in a row. hyper's h2 counts
    // the resets of streams not yet accepted and answers a flood with GOAWAY.
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut s = TcpStream::connect(proxy.listener("http")).await.unwrap();
    let mut out = h2::client_start();
    out.extend(h2::frame(h2::SETTINGS, 0x1, 0, &[]));
    const STREAMS: u32 = 5000;
    for i in 0..STREAMS {
        let id = 2 * i + 1;
        out.extend(h2::get(id, "h", "/"));
        out.extend(h2::rst_stream(id, h2::CANCEL));
    }
    let (mut r, mut w) = s.split();
    let write = async {
        let _ = w.write_all(&out).await;
    };
    let read = h2::frames_until_close(&mut r, WAIT);
    let ((), (frames, closed)) = tokio::join!(write, read);
    let goaway = frames.iter().find(|f| f.kind == h2::GOAWAY);
    assert!(closed, "the connection was closed");
    assert_eq!(goaway.and_then(|f| f.error_code()), Some(h2::ENHANCE_YOUR_CALM), "{goaway:?}");
    let reached = upstream.requests();
    assert!(reached < 500, "{reached} of {STREAMS} reset streams reached the upstream");
    proxy.stop().await;
}

// ---- 5. client faults are not upstream faults -----------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_bodies_do_not_eject_a_healthy_upstream() {
    let upstream = Upstream::answering(OK).await;
    let policy = r#"{"outlier":{"consecutive_failures":3,"max_ejection_percent":100}}"#;
    let (proxy, _routes) = proxy_with_policy(upstream.addr, policy, "").await;
    let addr = proxy.listener("http");
    for round in 0..6 {
        // A chunked body that is fine when the request goes up, and turns malformed later.
        let mut client = Wire::connect(addr).await;
        client.send(b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await;
        eventually("the first chunk upstream", WAIT, || async {
            (upstream.conns() > round && upstream.received(round).contains("hello")).then_some(())
        })
        .await;
        client.send(b"zz\r\nnot a chunk\r\n").await;
        let resp = client.response(false).await.unwrap();
        assert_eq!((resp.status, resp.header("x-zkroute-error")), (400, Some("bad_request")));
        upstream.wait_closed(round, WAIT).await;
    }
    let c = proxy.config().await;
    let instance = &instances(&c, "s")[0];
    assert_eq!(instance["health"]["state"], "healthy", "{instance:#}");
    let ejected = proxy.metric(r#"zkroute_backends{service="s",state="ejected"}"#).await;
    assert_eq!(ejected, Some(0.0));
    assert_eq!(Wire::exchange(addr, GET).await.unwrap().status, 200);
    proxy.stop().await;
}

// ---- 6. WebSocket tunnels time out ----------------------------------------------------------

const SWITCH: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_closes_after_the_tcp_idle_timeout() {
    let upstream = Upstream::start(|_| vec![send(SWITCH), Act::Hold]).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "tcp_idle_timeout = \"1s\"\nidle_timeout = \"60s\"\n").await;
    let mut client = Wire::connect(proxy.listener("http")).await;
    client.send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").await;
    let resp = client.response(false).await.unwrap();
    assert_eq!(resp.status, 101);
    client.send(b"ping").await;
    eventually("bytes through the tunnel", WAIT, || async { upstream.received(0).ends_with("ping").then_some(()) })
        .await;
    let quiet = Instant::now();
    client.closes_within(WAIT).await.unwrap();
    upstream.wait_closed(0, WAIT).await;
    let idle = quiet.elapsed();
    assert!(idle >= Duration::from_millis(900) && idle < Duration::from_secs(5), "closed after {idle:?} idle");
    proxy.stop().await;
}

// ---- 7. CONNECT over h2c --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_connect_is_answered_405() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut h2c = h2_client(proxy.listener("http")).await;
    let req = http::Request::connect(upstream.addr.to_string()).body(Full::new(Bytes::new())).unwrap();
    let resp = h2_send(&mut h2c, req).await.unwrap();
    assert_eq!((resp.status().as_u16(), error_code(&resp)), (405, Some("method_not_allowed")));
    assert_eq!(upstream.conns(), 0, "nothing reached the upstream");
    proxy.stop().await;
}

// ---- 8. h2 to HTTP/1.1 translation ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_cookies_are_joined_and_an_authority_with_userinfo_is_refused() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let addr = proxy.listener("http");
    let mut h2c = h2_client(addr).await;
    let req = http::Request::get("http://h/cookies")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2_send(&mut h2c, req).await.unwrap().status(), 200);
    let head = upstream.all_received();
    assert_eq!(head.to_ascii_lowercase().matches("\r\ncookie:").count(), 1, "{head}");
    assert!(head.contains("\r\ncookie: a=1; b=2; c=3\r\n"), "{head}");

    // :authority with userinfo, in raw frames: refused before routing, as on HTTP/1.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = h2::client_start();
    out.extend(h2::get(1, "user:secret@h", "/userinfo"));
    s.write_all(&out).await.unwrap();
    let headers = loop {
        let f = h2::read_frame(&mut s, WAIT).await.unwrap().expect("an answer");
        if f.kind == h2::HEADERS {
            break f;
        }
    };
    // HPACK: 0x8c is the static table's ":status: 400".
    assert_eq!(headers.payload.first(), Some(&0x8c), "{headers:?}");
    assert_eq!(upstream.requests(), 1, "the refused request was not forwarded");
    let resp = Wire::exchange(addr, b"GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
    assert_eq!(resp.status, 400, "the same on HTTP/1");
    proxy.stop().await;
}

// ---- 9. Upgrade with other Connection tokens ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_goes_through_when_connection_lists_other_tokens() {
    let upstream = Upstream::start(|r| {
        if r.head.to_ascii_lowercase().contains("\r\nupgrade: websocket\r\n") {
            vec![send(SWITCH), Act::Hold]
        } else {
            vec![send("HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")]
        }
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut client = Wire::connect(proxy.listener("http")).await;
    client
        .send(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, foo\r\nUpgrade: websocket\r\nFoo: private\r\n\r\n")
        .await;
    let resp = client.response(false).await.unwrap();
    assert_eq!(resp.status, 101, "{}", resp.head);
    client.send(b"through").await;
    eventually("bytes through the tunnel", WAIT, || async { upstream.received(0).ends_with("through").then_some(()) })
        .await;
    let head = upstream.received(0);
    assert!(head.contains("\r\nconnection: upgrade\r\n") && !head.contains("Foo: private"), "{head}");
    proxy.stop().await;
}

// ---- 10. Host validation and the access log -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_host_is_refused_and_client_values_are_escaped_in_the_access_log() {
    let upstream = Upstream::answering(OK).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let (proxy, _routes) = proxy_to(upstream.addr, &format!("[log]\naccess_log = \"{}\"\n", log.display())).await;
    let addr = proxy.listener("http");
    for host in [&b"a.test/../x y"[..], b"a.test 200 10.0.0.1:80", b"user@a.test", b"a.test\x7f"] {
        let mut req = b"GET / HTTP/1.1\r\nHost: ".to_vec();
        req.extend_from_slice(host);
        req.extend_from_slice(b"\r\n\r\n");
        let resp = Wire::exchange(addr, &req).await.unwrap();
        assert_eq!((resp.status, resp.header("x-zkroute-error")), (400, Some("bad_request")), "{host:?}");
    }
    assert_eq!(upstream.conns(), 0, "no invalid Host was forwarded");
    let resp = Wire::exchange(addr, b"GET /caf\xc3\xa9/\"q\"\\x HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    assert_eq!(resp.status, 200);
    let line = eventually("the access log line", WAIT, || async {
        std::fs::read_to_string(&log).ok().filter(|t| t.ends_with('\n')).map(|t| t.lines().last().unwrap().to_owned())
    })
    .await;
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 11, "{line}");
    assert_eq!(&fields[3..6], ["GET", "a.test", r"/caf\xc3\xa9/\x22q\x22\x5cx"], "{line}");
    assert!(line.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{line:?}");
    proxy.stop().await;
}

// ---- Also: underscores, interim answers, late bytes -----------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_with_underscores_are_dropped_when_configured() {
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "drop_underscore_headers = true\n").await;
    let addr = proxy.listener("http");
    let req = b"GET /h1 HTTP/1.1\r\nHost: h\r\nX_Forwarded_For: 6.6.6.6\r\nX-Kept: 1\r\n\r\n";
    assert_eq!(Wire::exchange(addr, req).await.unwrap().status, 200);
    let mut h2c = h2_client(addr).await;
    let req = http::Request::get("http://h/h2")
        .header("x_forwarded_for", "6.6.6.6")
        .header("x-kept", "1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2_send(&mut h2c, req).await.unwrap().status(), 200);
    let seen = upstream.all_received();
    assert_eq!(seen.to_ascii_lowercase().matches("x-kept: 1").count(), 2, "{seen}");
    assert!(!seen.contains("6.6.6.6"), "{seen}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interim_answers_to_a_client_that_does_not_read_end_at_the_route_timeout() {
    let flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(2000);
    let upstream = Upstream::start(move |_| vec![Act::Repeat(flood.clone(), Duration::from_secs(60))]).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "timeout = \"1s\"\nidle_timeout = \"60s\"\n").await;
    let mut client = TcpStream::connect(proxy.listener("http")).await.unwrap();
    client.write_all(GET).await.unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await; // the fault: nothing is read
    let mut scratch = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match client.read(&mut scratch).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the exchange ended (after {:?})", started.elapsed());
    upstream.wait_closed(0, WAIT).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_byte_after_a_response_keeps_its_connection_out_of_the_pool() {
    let upstream = Upstream::start(|r| match (r.conn, r.n) {
        (0, 0) => vec![
            send(OK),
            Act::Sleep(Duration::from_millis(100)),
            send("HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged"),
        ],
        _ => vec![send("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngenuine")],
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let mut client = Wire::connect(proxy.listener("http")).await;
    client.send(GET).await;
    assert_eq!(client.response(false).await.unwrap().body_text(), "ok");
    tokio::time::sleep(Duration::from_millis(400)).await; // the late bytes arrive meanwhile
    client.send(GET).await;
    assert_eq!(client.response(false).await.unwrap().body_text(), "genuine");
    assert_eq!(upstream.requests_on(0), 1, "the dirty connection served nothing more");
    upstream.wait_closed(0, WAIT).await;
    proxy.stop().await;
}

// ---- a proxy's own answers on kept connections ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_the_proxy_leaves_nothing_behind_on_a_kept_connection() {
    let upstream = Upstream::answering(OK).await;
    let routes = Routes::new();
    routes.instance("s", "a", upstream.addr);
    routes.rule("r", r#"{"listener":"http","match":{"path_prefix":"/api"},"backends":[{"service":"s"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let mut client = Wire::connect(proxy.listener("http")).await;
    client.send(b"GET /nothing HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let resp = client.response(false).await.unwrap();
    assert_eq!((resp.status, resp.header("x-zkroute-error")), (404, Some("no_route")));
    client.send(b"GET /api HTTP/1.1\r\nHost: h\r\n\r\n").await;
    let resp = client.response(false).await.unwrap();
    assert_eq!((resp.status, resp.body_text().as_str()), (200, "ok"), "{}", resp.head);
    assert!(client.stray_bytes(Duration::from_millis(200)).await.is_empty());
    proxy.stop().await;
}
