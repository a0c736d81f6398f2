#![allow(clippy::unwrap_used)]
//! Hostile input to the HTTP engine from both sides: what upstreams send back, h2c connections
//! that stall or flood, and client faults. Each test puts a raw upstream behind zkroute that
//! sends exactly the bytes in question and logs what it receives, with raw client sockets (or
//! an h2 client) in front. Routes come from the static file source: ZooKeeper is not the
//! subject here.

mod support;

use std::time::Duration;

use support::scripted::Upstream;
use support::wire::Wire;
use support::*;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

// ---- a proxy's own answers on kept connections ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_the_proxy_leaves_nothing_behind_on_a_kept_connection() {
    let upstream = Upstream::answering(OK).await;
    let routes = format!(
        "[services.s]\na = \"{}\"\n[rules.r]\nlistener = \"http\"\nmatch = {{ path_prefix = \"/api\" }}\n\
         backends = [{{ service = \"s\" }}]\n",
        upstream.addr
    );
    let (proxy, _routes) = Proxy::with_static(&routes, HTTP_LISTENER).await;
    proxy.config_until("the route", |c| c["listeners"][0]["routes"].as_array().is_some_and(|r| !r.is_empty())).await;
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
