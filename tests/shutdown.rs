#![allow(clippy::unwrap_used)]
//! SIGTERM on the real binary: drain in-flight work, refuse new connections, exit 0. Routes come
//! from a static file.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A TCP connection through the binary's `tcp` listener that has echoed one byte.
async fn relayed_tcp(bin: &Binary) -> TcpStream {
    eventually("a relayed TCP connection", Duration::from_secs(10), || async {
        let mut s = TcpStream::connect(bin.tcp).await.ok()?;
        s.write_all(b"a").await.ok()?;
        let mut one = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut one)).await.ok()?.ok()?;
        Some(s)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_work_refuses_new_connections_and_exits_zero() {
    let web = Backend::http("web").await;
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("web", "1", web.addr);
    routes.instance("echo", "1", echo.addr);
    let mut bin = Binary::start(&routes, "10s").await;
    eventually("both services in the table", Duration::from_secs(10), || async {
        let c: serde_json::Value = serde_json::from_slice(get(bin.admin, "/config").await.ok()?.body()).ok()?;
        (addresses(&c, "web").len() == 1 && addresses(&c, "echo").len() == 1).then_some(())
    })
    .await;

    let mut tcp = TcpStream::connect(bin.tcp).await.unwrap();
    let mut one = [0u8; 1];
    tcp.write_all(b"a").await.unwrap();
    tcp.read_exact(&mut one).await.unwrap();
    let mut idle = idle_keep_alive(bin.http).await;
    let slow = in_flight(bin.http, &web, 1500).await;

    bin.sigterm();
    eventually("/ready turns 503", Duration::from_secs(5), || async {
        (get(bin.admin, "/ready").await.ok()?.status() == 503).then_some(())
    })
    .await;
    eventually("new connections refused", Duration::from_secs(5), || async {
        TcpStream::connect(bin.http).await.is_err().then_some(())
    })
    .await;
    assert!(TcpStream::connect(bin.tcp).await.is_err());
    // The idle keep-alive connection is closed when draining starts, not at the drain timeout.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("an idle keep-alive connection is closed at once when draining starts")
        .unwrap();

    // In-flight work finishes.
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status().as_u16(), who(&r)), (200, "web".to_owned()));
    tcp.write_all(b"b").await.unwrap();
    tcp.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"b", "the open TCP connection still works while draining");
    drop(tcp);

    let status = bin.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_still_open_at_the_drain_timeout_is_closed_and_the_exit_is_zero() {
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("echo", "1", echo.addr);
    let mut bin = Binary::start(&routes, "1s").await;
    let mut tcp = relayed_tcp(&bin).await;
    let started = Instant::now();
    bin.sigterm();
    let status = bin.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() >= Duration::from_millis(900), "waited for the drain timeout: {:?}", started.elapsed());
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the connection was closed when the process exited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shutdown_delay_listeners_keep_accepting_after_deregistration() {
    let web = Backend::http("web").await;
    let routes = Routes::new();
    routes.instance("web", "1", web.addr);
    let mut bin = Binary::start_with(&routes, "5s", "", &["--proxy-shutdown-delay", "1500ms"]).await;
    eventually("the web route", Duration::from_secs(10), || async {
        (send(bin.http, request("GET", "h", "/", &[], "")).await.ok()?.status() == 200).then_some(())
    })
    .await;
    let started = Instant::now();
    bin.sigterm();
    eventually("/ready turns 503", Duration::from_secs(5), || async {
        (get(bin.admin, "/ready").await.ok()?.status() == 503).then_some(())
    })
    .await;
    // Still accepting during the delay.
    let r = send(bin.http, request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(started.elapsed() < Duration::from_millis(1500), "answered within the delay");
    eventually("new connections refused after the delay", Duration::from_secs(5), || async {
        TcpStream::connect(bin.http).await.is_err().then_some(())
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(bin.wait_exit(Duration::from_secs(5)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_like_sigterm() {
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("echo", "1", echo.addr);
    let mut bin = Binary::start(&routes, "10s").await;
    let mut tcp = relayed_tcp(&bin).await;
    bin.signal("INT");
    eventually("/ready turns 503", Duration::from_secs(5), || async {
        (get(bin.admin, "/ready").await.ok()?.status() == 503).then_some(())
    })
    .await;
    eventually("new connections refused", Duration::from_secs(5), || async {
        TcpStream::connect(bin.tcp).await.is_err().then_some(())
    })
    .await;
    let mut one = [0u8; 1];
    tcp.write_all(b"b").await.unwrap();
    tcp.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"b", "the open connection still works while draining");
    drop(tcp);
    // Within 5 s of the last connection closing, well before the 10 s drain timeout.
    assert_eq!(bin.wait_exit(Duration::from_secs(5)).code(), Some(0));
}
