#![allow(clippy::unwrap_used)]
//! TCP listeners and port-per-service listeners end to end, with routes from a static file (the
//! documents ZooKeeper would hold).

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TCP_LISTENER: &str =
    "[[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"db\"\n";

/// A proxy with listener `db` for service `db`, whose one instance is at `instance`, and `extra`
/// TOML; once its table holds the instance.
async fn proxy_to(extra: &str, instance: std::net::SocketAddr) -> (Routes, Proxy) {
    let routes = Routes::new();
    routes.instance("db", "1", instance);
    let proxy = routes.proxy(&format!("{TCP_LISTENER}{extra}")).await;
    (routes, proxy)
}

async fn until_instances(proxy: &Proxy, service: &str, n: usize) {
    proxy.config_until(&format!("{n} instances of {service}"), |c| addresses(c, service).len() == n).await;
}

async fn echo_once(addr: std::net::SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(msg).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await.unwrap().unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echo_round_trip_goes_through() {
    let echo = TcpServer::echo().await;
    let (_routes, proxy) = proxy_to("", echo.addr).await;
    assert_eq!(echo_once(proxy.listener("db"), b"hello through the proxy").await, b"hello through the proxy");
    let rx = proxy.metric(r#"zkroute_tcp_bytes_total{direction="rx",listener="db"}"#).await.unwrap();
    let tx = proxy.metric(r#"zkroute_tcp_bytes_total{direction="tx",listener="db"}"#).await.unwrap();
    assert_eq!((rx, tx), (23.0, 23.0));
    assert_eq!(proxy.metric(r#"zkroute_tcp_connections_total{listener="db",service="db"}"#).await, Some(1.0));
    proxy.stop().await;
}

/// Sends `mib` MiB of pseudo-random bytes through `addr` to a checksum server, half-closes, and
/// returns what was sent and what the server says it received.
async fn send_checksummed(addr: std::net::SocketAddr, mib: usize) -> (Checksum, Checksum) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut sent = Checksum::default();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..mib {
        for b in block.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        sent.update(&block);
        s.write_all(&block).await.unwrap();
    }
    // Half-close: the server still answers after our EOF.
    s.shutdown().await.unwrap();
    let mut answer = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut answer)).await.unwrap().unwrap();
    let got = Checksum {
        len: u64::from_be_bytes(answer[..8].try_into().unwrap()),
        hash: u64::from_be_bytes(answer[8..].try_into().unwrap()),
    };
    (sent, got)
}

const RELAY_BUFFER_BYTES: &str = "zkroute_tcp_relay_buffer_bytes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_transfer_arrives_intact() {
    let sink = TcpServer::checksum().await;
    let (_routes, proxy) = proxy_to("", sink.addr).await;
    // Meanwhile, the memory the relay's buffers grew into for the bulk stream, at its most.
    let admin = proxy.admin();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = tokio::spawn({
        let done = done.clone();
        async move {
            let mut most = 0.0f64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let text = String::from_utf8_lossy(get(admin, "/metrics").await.unwrap().body()).into_owned();
                most = most.max(metric_value(&text, RELAY_BUFFER_BYTES).unwrap());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        }
    });
    let (sent, got) = send_checksummed(proxy.listener("db"), 256).await;
    assert_eq!(got, sent);
    assert_eq!(sent.len, 256 << 20);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let grown = watch.await.unwrap();
    assert!(grown > 0.0, "the relay's buffers grew for the bulk stream");
    assert!(grown <= f64::from(8u32 << 20), "at most 4 MiB for each direction, not {grown}");
    // The connection is over: its buffers are given back.
    eventually("relay buffers given back", Duration::from_secs(5), || async {
        (proxy.metric(RELAY_BUFFER_BYTES).await == Some(0.0)).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_relay_memory_a_bulk_transfer_moves_through_small_buffers() {
    let sink = TcpServer::checksum().await;
    let (_routes, proxy) = proxy_to("[proxy]\ntcp_relay_memory = 0\n", sink.addr).await;
    let (sent, got) = send_checksummed(proxy.listener("db"), 32).await;
    assert_eq!(got, sent);
    assert_eq!(sent.len, 32 << 20);
    assert_eq!(proxy.metric(RELAY_BUFFER_BYTES).await, Some(0.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_client_still_receives_the_rest() {
    // The server answers only after it has seen the client's EOF.
    let sink = TcpServer::checksum().await;
    let (_routes, proxy) = proxy_to("", sink.addr).await;
    let mut s = TcpStream::connect(proxy.listener("db")).await.unwrap();
    s.write_all(b"abc").await.unwrap();
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.unwrap().unwrap();
    assert_eq!(answer.len(), 16);
    assert_eq!(u64::from_be_bytes(answer[..8].try_into().unwrap()), 3);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_fails_over_to_another_instance() {
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.policy("db", r#"{"retries":1}"#);
    routes.instance("db", "dead", refused_addr());
    routes.instance("db", "live", echo.addr);
    let proxy = routes.proxy(TCP_LISTENER).await;
    for i in 0..20 {
        let msg = format!("message {i}");
        assert_eq!(echo_once(proxy.listener("db"), msg.as_bytes()).await, msg.as_bytes());
    }
    assert!(proxy.metric(r#"zkroute_upstream_connect_errors_total{service="db"}"#).await.unwrap() >= 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_on_the_source_address_keeps_each_client_on_one_instance() {
    let servers = [TcpServer::echo().await, TcpServer::echo().await, TcpServer::echo().await];
    let routes = Routes::new();
    routes.policy("db", r#"{"lb":"ring_hash","hash_on":"source_ip"}"#);
    for (i, s) in servers.iter().enumerate() {
        routes.instance("db", &i.to_string(), s.addr);
    }
    let proxy = routes.proxy(TCP_LISTENER).await;
    let counts = || servers.iter().map(|s| s.connections.load(std::sync::atomic::Ordering::SeqCst)).collect::<Vec<_>>();
    let mut owners = std::collections::BTreeSet::new();
    // Every address in 127.0.0.0/8 is this host's: eight clients with their own source address.
    for last in 1..=8u8 {
        let source = std::net::Ipv4Addr::new(127, 0, 0, last);
        let mut owner = None;
        for _ in 0..5 {
            let before = counts();
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind((source, 0).into()).unwrap();
            let mut s = socket.connect(proxy.listener("db")).await.unwrap();
            s.write_all(b"ping").await.unwrap();
            s.shutdown().await.unwrap();
            let mut back = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await.unwrap().unwrap();
            assert_eq!(back, b"ping");
            let after = counts();
            let hit: Vec<usize> = (0..3).filter(|&i| after[i] > before[i]).collect();
            assert_eq!(hit.len(), 1, "one connection reaches one instance: {before:?} -> {after:?}");
            assert_eq!(*owner.get_or_insert(hit[0]), hit[0], "client {source} moved between instances");
        }
        owners.insert(owner.unwrap());
    }
    assert!(owners.len() >= 2, "eight clients all hashed to one of three instances: {owners:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_is_closed_at_once_when_no_instance_can_be_reached() {
    let routes = Routes::new();
    routes.instance("db", "dead", refused_addr());
    let proxy = routes.proxy(TCP_LISTENER).await;
    let mut s = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    let rejected =
        |reason: &str| format!(r#"zkroute_tcp_connections_rejected_total{{listener="db",reason="{reason}"}}"#);
    assert_eq!(proxy.metric(&rejected("upstream_connect_failed")).await, Some(1.0));
    assert_eq!(proxy.metric(r#"zkroute_upstream_connect_errors_total{service="db"}"#).await, Some(1.0));

    // With no instance at all, the connection is closed at once too, for another reason.
    routes.remove_instance("db", "dead");
    until_instances(&proxy, "db", 0).await;
    let mut s = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    assert_eq!(proxy.metric(&rejected("no_healthy_upstream")).await, Some(1.0));
    assert_eq!(proxy.metric(&rejected("upstream_connect_failed")).await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let echo = TcpServer::echo().await;
    let (_routes, proxy) = proxy_to("[proxy]\ntcp_idle_timeout = \"1s\"\n", echo.addr).await;
    let mut busy = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let mut idle = TcpStream::connect(proxy.listener("db")).await.unwrap();
    idle.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    idle.read_exact(&mut one).await.unwrap();
    let started = std::time::Instant::now();
    // Keep `busy` talking every 100ms for three idle timeouts. The timeout is ten times the pause,
    // so that a loaded machine stretching a pause does not make `busy` idle.
    while started.elapsed() < Duration::from_secs(3) {
        busy.write_all(b"y").await.unwrap();
        busy.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "the idle connection was closed");
    assert!(started.elapsed() >= Duration::from_secs(1));
    busy.write_all(b"z").await.unwrap();
    busy.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"z", "the busy connection lives on");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_instance_does_not_cut_its_open_connections() {
    let echo = TcpServer::echo().await;
    let (routes, proxy) = proxy_to("", echo.addr).await;
    let mut s = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let mut buf = [0u8; 5];
    s.write_all(b"first").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    routes.remove_instance("db", "1");
    until_instances(&proxy, "db", 0).await;
    s.write_all(b"later").await.unwrap();
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"later");
    // New connections have nowhere to go.
    let mut fresh = TcpStream::connect(proxy.listener("db")).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), fresh.read(&mut buf)).await.unwrap().unwrap_or(0);
    assert_eq!(n, 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_listener_with_a_service_needs_no_rule() {
    let b = Backend::http("users-1").await;
    let routes = Routes::new();
    routes.instance("users", "1", b.addr);
    let proxy = routes
        .proxy(&format!("{TCP_LISTENER}[[listener]]\nname = \"users\"\nbind = \"127.0.0.1:0\"\nservice = \"users\"\n"))
        .await;
    let r = send(proxy.listener("users"), request("GET", "anything", "/any/path", &[], "")).await.unwrap();
    assert_eq!(who(&r), "users-1");
    proxy.stop().await;
}

/// The congestion control of each established socket that `ss` (iproute2) finds for `filter`.
fn congestion_shown(filter: &str) -> Vec<String> {
    let out = std::process::Command::new("ss")
        .args(["-tinH", "state", "established", filter])
        .output()
        .expect("ss from iproute2 runs");
    assert!(out.status.success(), "ss {filter}: {}", String::from_utf8_lossy(&out.stderr));
    // Each socket is an address line, then an indented line of details that starts with the algorithm.
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// The congestion control of the proxy's two sockets of one relayed connection: the one its
/// listener accepted and the one to the instance.
async fn relayed_congestion(extra: &str) -> (Vec<String>, Vec<String>) {
    let echo = TcpServer::echo().await;
    let (_routes, proxy) = proxy_to(extra, echo.addr).await;
    let mut client = TcpStream::connect(proxy.listener("db")).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).await.unwrap();
    let accepted = congestion_shown(&format!("( sport = :{} )", proxy.listener("db").port()));
    let upstream = congestion_shown(&format!("( dport = :{} )", echo.addr.port()));
    drop(client);
    proxy.stop().await;
    (accepted, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_loopback_use_the_configured_congestion_control() {
    // reno differs from any system default worth having, and every kernel has it.
    let reno = vec!["reno".to_owned()];
    assert_eq!(relayed_congestion("[proxy]\nloopback_congestion = \"reno\"\n").await, (reno.clone(), reno));
    // Unset, it is cubic (the tests run as root, to whom every algorithm the kernel has is open).
    let cubic = vec!["cubic".to_owned()];
    assert_eq!(relayed_congestion("").await, (cubic.clone(), cubic));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_congestion_control_the_system_lacks_fails_the_start_naming_the_key() {
    let config = zkroute::Config::from_toml(
        "[admin]\nbind = \"127.0.0.1:0\"\n[proxy]\nloopback_congestion = \"warp\"\n",
        "t.toml",
    )
    .unwrap();
    let err = zkroute::App::start(config).await.err().expect("the start fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("proxy.loopback_congestion") && msg.contains("\"warp\""), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_cannot_bind_fails_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let config = zkroute::Config::from_toml(
        &format!("[admin]\nbind = \"127.0.0.1:0\"\n[[listener]]\nname = \"payments\"\nbind = \"{addr}\"\n"),
        "t.toml",
    )
    .unwrap();
    let err = zkroute::App::start(config).await.err().expect("the start fails");
    let msg = format!("{err:#}");
    assert!(msg.contains("listener \"payments\"") && msg.contains(&addr.to_string()), "{msg}");
}
