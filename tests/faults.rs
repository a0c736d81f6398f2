#![allow(clippy::unwrap_used)]
//! The fault suite (README: "Faults and hostile input"): each case runs under steady load from a
//! client in the test that counts every response, and says in its name what it proves. Cases that
//! stop or pause ZooKeeper get servers of their own.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const RULE: &str = r#"{"listener":"http","retries":2,"backends":[{"service":"web"}]}"#;

/// Two backends of service `web`, a catch-all rule, and a proxy following `chroot`.
async fn setup(chroot: &Chroot, extra: &str) -> (ZkClient, Proxy, Backend, Backend) {
    let zk = chroot.client().await;
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    zk.put("/zkroute/rules/web", RULE).await;
    zk.put("/zkroute/services/web/a", &a.addr.to_string()).await;
    zk.put("/zkroute/services/web/b", &b.addr.to_string()).await;
    let proxy = Proxy::with_zk(chroot, &format!("{HTTP_LISTENER}{extra}")).await;
    proxy
        .config_until("the table", |c| {
            addresses(c, "web").len() == 2 && !c["listeners"][0]["routes"].as_array().unwrap().is_empty()
        })
        .await;
    (zk, proxy, a, b)
}

fn assert_clean(report: &LoadReport) {
    assert!(
        report.failures.is_empty(),
        "failed requests: {} of {}: {:?}",
        report.failures.len(),
        report.ok + report.failures.len() as u64,
        &report.failures[..report.failures.len().min(5)]
    );
    assert!(report.ok > 100, "steady load: only {} requests", report.ok);
}

async fn connected(proxy: &Proxy, want: f64) {
    eventually(&format!("zk_connected = {want}"), Duration::from_secs(30), || async {
        (proxy.metric("zkroute_zk_connected").await == Some(want)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_killed_for_10s_fails_no_request_and_later_changes_arrive() {
    let mut server = Zk::start();
    let chroot = server.chroot();
    let (_, proxy, _a, _b) = setup(&chroot, "").await;
    let load = Load::start(proxy.listener("http"), "h", "/", 4);
    server.kill();
    connected(&proxy, 0.0).await;
    tokio::time::sleep(Duration::from_secs(10)).await; // the fault: ZooKeeper gone for 10 s
    server.restart();
    connected(&proxy, 1.0).await;
    let zk = chroot.client().await;
    let c = Backend::http("c").await;
    zk.put("/zkroute/services/web/c", &c.addr.to_string()).await;
    proxy.config_until("a change after the restart", |c| addresses(c, "web").len() == 3).await;
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_fails_no_request_and_later_changes_arrive() {
    let server = Zk::start();
    let chroot = server.chroot();
    let (_, proxy, _a, _b) = setup(&chroot, "").await;
    let load = Load::start(proxy.listener("http"), "h", "/", 4);
    server.pause();
    tokio::time::sleep(Duration::from_secs(4)).await; // the fault: frozen past the 2 s session timeout
    server.resume();
    eventually("the expiry", Duration::from_secs(30), || async {
        (proxy.metric("zkroute_zk_session_expirations_total").await >= Some(1.0)).then_some(())
    })
    .await;
    connected(&proxy, 1.0).await;
    let zk = chroot.client().await;
    let c = Backend::http("c").await;
    zk.put("/zkroute/services/web/c", &c.addr.to_string()).await;
    proxy.config_until("a change in the new session", |c| addresses(c, "web").len() == 3).await;
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_ensemble_leader_fails_no_request_and_later_changes_arrive() {
    let mut ensemble = Ensemble::start(3);
    let chroot = ensemble.chroot();
    let (_, proxy, _a, _b) = setup(&chroot, "").await;
    let load = Load::start(proxy.listener("http"), "h", "/", 4);
    let leader = ensemble.leader().unwrap();
    ensemble.members[leader].kill();
    // Wait for the survivors to elect a new leader.
    eventually("a new leader", Duration::from_secs(30), || async { ensemble.leader().filter(|l| *l != leader) }).await;
    let zk = eventually("a client of the new quorum", Duration::from_secs(30), || async {
        tokio::time::timeout(Duration::from_secs(5), chroot.client()).await.ok()
    })
    .await;
    let c = Backend::http("c").await;
    zk.put("/zkroute/services/web/c", &c.addr.to_string()).await;
    proxy.config_until("a change after the leader loss", |c| addresses(c, "web").len() == 3).await;
    assert_eq!(
        proxy.metric("zkroute_zk_session_expirations_total").await,
        Some(0.0),
        "the session moved, it did not expire"
    );
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zkroute_restarted_while_zookeeper_is_down_serves_from_the_snapshot() {
    let mut server = Zk::start();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    let web = Backend::http("web").await;
    zk.put("/zkroute/services/web/1", &web.addr.to_string()).await;
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot.json");
    // The Binary's config has its own [zookeeper] table: the snapshot keys come as flags.
    let args = ["--zookeeper-snapshot", snap.to_str().unwrap(), "--zookeeper-startup-timeout", "1s"];
    let mut first = Binary::start_with(&chroot, "2s", "", &args).await;
    eventually("the snapshot written", Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(&snap).ok()?;
        text.contains(&web.addr.to_string()).then_some(())
    })
    .await;
    first.sigterm();
    assert_eq!(first.wait_exit(Duration::from_secs(10)).code(), Some(0));
    server.kill();

    let second = Binary::start_with(&chroot, "2s", "", &args).await;
    let load = Load::start(second.http, "h", "/", 2);
    let c: serde_json::Value = serde_json::from_slice(get(second.admin, "/config").await.unwrap().body()).unwrap();
    assert_eq!(c["source"], "snapshot");
    assert_eq!(addresses(&c, "web"), [web.addr.to_string()]);
    let m = String::from_utf8_lossy(get(second.admin, "/metrics").await.unwrap().body()).into_owned();
    assert_eq!(metric_value(&m, "zkroute_snapshot_in_use"), Some(1.0));
    assert!(second.log().contains("serving the snapshot"), "says so in its log");
    tokio::time::sleep(Duration::from_secs(1)).await; // serve from the snapshot for a while
    // ZooKeeper back: live data replaces the snapshot.
    server.restart();
    eventually("live data", Duration::from_secs(30), || async {
        let c: serde_json::Value = serde_json::from_slice(get(second.admin, "/config").await.ok()?.body()).ok()?;
        (c["source"] == "zookeeper").then_some(())
    })
    .await;
    assert_clean(&load.stop().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_snapshot_is_ignored_with_a_clear_message() {
    let chroot = Chroot { connect: format!("127.0.0.1:{}", free_port()) };
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot.json");
    std::fs::write(&snap, "{ torn").unwrap();
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nsnapshot = \"{}\"\nstartup_timeout = \"200ms\"\n[admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}",
        chroot.connect,
        snap.display()
    ))
    .await;
    // No table: listeners answer 503 and /ready stays 503.
    tokio::time::sleep(Duration::from_millis(600)).await; // past the startup timeout: nothing to poll for
    assert_eq!(get(proxy.admin(), "/ready").await.unwrap().status(), 503);
    let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!((r.status().as_u16(), who(&r)), (503, "error:not_ready".to_owned()));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_killed_mid_load_fails_no_idempotent_request() {
    let chroot = Zk::shared().chroot();
    let (_, proxy, a, b) = setup(&chroot, "").await;
    let load = Load::start(proxy.listener("http"), "h", "/", 4);
    eventually("load on both", Duration::from_secs(5), || async {
        (a.requests() > 50 && b.requests() > 50).then_some(())
    })
    .await;
    a.kill();
    let served = b.requests();
    eventually("the load carries on", Duration::from_secs(5), || async { (b.requests() > served + 300).then_some(()) })
        .await;
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_invalid_nodes_at_once_leave_valid_routing_alone_and_are_counted() {
    let chroot = Zk::shared().chroot();
    let (zk, proxy, _a, _b) = setup(&chroot, "").await;
    let load = Load::start(proxy.listener("http"), "h", "/", 4);
    let acl = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
    for d in 0..10 {
        zk.0.mkdir(&format!("/zkroute/services/junk{d}"), &acl).await.unwrap();
    }
    let nodes: Vec<(String, &[u8])> = (0..500)
        .flat_map(|i| {
            [
                (format!("/zkroute/services/junk{}/n{i}", i % 10), &b"not an instance"[..]),
                (format!("/zkroute/rules/bad{i}"), &br#"{"listener":"http","backends":[]}"#[..]),
            ]
        })
        .collect();
    // Sent back to back without waiting: "at once".
    let writes: Vec<_> = nodes.iter().map(|(path, data)| zk.0.create(path, data, &acl)).collect();
    for w in writes {
        w.await.unwrap();
    }
    eventually("all counted", Duration::from_secs(30), || async {
        let m = proxy.metrics().await;
        (metric_value(&m, r#"zkroute_invalid_nodes{kind="instance"}"#) == Some(500.0)
            && metric_value(&m, r#"zkroute_invalid_nodes{kind="rule"}"#) == Some(500.0))
        .then_some(())
    })
    .await;
    let c = proxy.config().await;
    assert_eq!(addresses(&c, "web").len(), 2);
    assert_eq!(c["listeners"][0]["routes"].as_array().unwrap().len(), 1);
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_clients_are_refused_as_specified_while_normal_requests_succeed() {
    let chroot = Zk::shared().chroot();
    let (_, proxy, _a, _b) =
        setup(&chroot, "[proxy]\nheader_read_timeout = \"500ms\"\nidle_timeout = \"2s\"\nmax_connections = 2000\n")
            .await;
    let addr = proxy.listener("http");
    let load = Load::start(addr, "h", "/", 2);

    // Slowloris: a head trickling in is cut off at the header timeout with 408.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut answer = Vec::new();
    for b in b"GET / HTTP/1.1\r\nHost: h\r\nX-Slow: ".iter() {
        if slow.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408 ") && answer.contains("request_header_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(3), "cut off at the header timeout: {:?}", started.elapsed());

    // Oversized headers: 431.
    let big = format!("GET / HTTP/1.1\r\nHost: h\r\nX-Big: {}\r\n\r\n", "x".repeat(100 * 1024));
    let answer = raw(addr, big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");

    // Smuggling shapes: 400 and the connection closed (that nothing reaches a backend is
    // `smuggled_requests_never_reach_a_backend`, without load to blur the count).
    for attack in [
        &b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /smuggled HTTP/1.1\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    ] {
        let answer = raw(addr, attack).await;
        assert!(answer.starts_with("HTTP/1.1 400 ") && answer.contains("bad_request"), "{answer}");
        assert!(!answer.contains("HTTP/1.1 200"), "nothing after the refusal: {answer}");
    }

    // 5,000 idle connections: beyond the limit they are refused and counted; the load goes on.
    let mut idle = Vec::new();
    for _ in 0..5000 {
        match TcpStream::connect(addr).await {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    // Some of the 3,000 over the limit never reach accept (the kernel's queue overflows first);
    // those that do are refused and counted.
    eventually("connections over the limit refused", Duration::from_secs(10), || async {
        (proxy.metric(r#"zkroute_connections_refused_total{listener="http"}"#).await >= Some(500.0)).then_some(())
    })
    .await;
    // The idle ones are closed at the idle timeout, and new clients get in again.
    eventually("the idle connections closed", Duration::from_secs(15), || async {
        let r = send(addr, request("GET", "h", "/", &[], "")).await.ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    drop(idle);
    assert_clean(&load.stop().await);
    proxy.stop().await;
}

/// Writes `bytes` on a fresh connection and reads until the proxy closes it.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_a_backend() {
    let chroot = Zk::shared().chroot();
    let (_, proxy, a, b) = setup(&chroot, "").await;
    let before = a.requests() + b.requests();
    let answer = raw(
        proxy.listener("http"),
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let answer = raw(
        proxy.listener("http"),
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert_eq!(a.requests() + b.requests(), before, "no request was forwarded");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_never_chooses_the_destination() {
    let chroot = Zk::shared().chroot();
    let (_, proxy, _a, _b) = setup(&chroot, "").await;
    let elsewhere = Backend::http("elsewhere").await;
    // Absolute-form to an address that is not in the table: routed by the table all the same.
    let target = format!("GET http://{}/steal HTTP/1.1\r\nHost: {}\r\n\r\n", elsewhere.addr, elsewhere.addr);
    let answer = raw_one(proxy.listener("http"), target.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
    assert!(answer.contains("x-backend: a") || answer.contains("x-backend: b"), "{answer}");
    assert_eq!(elsewhere.requests(), 0);
    // CONNECT is refused.
    let answer = raw(
        proxy.listener("http"),
        format!("CONNECT {} HTTP/1.1\r\nHost: {}\r\n\r\n", elsewhere.addr, elsewhere.addr).as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 405 ") && answer.contains("method_not_allowed"), "{answer}");
    assert_eq!(elsewhere.requests(), 0);
    proxy.stop().await;
}

/// One request with `Connection: close` semantics: read until the response ends.
async fn raw_one(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    raw(addr, text.as_bytes()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_is_loopback_and_config_can_be_switched_off() {
    let defaults = zkroute::Config::from_toml("", "t.toml").unwrap();
    assert!(defaults.admin.bind.ip().is_loopback());
    let chroot = Zk::shared().chroot();
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\nconfig_endpoint = false\n",
        chroot.connect
    ))
    .await;
    assert_eq!(get(proxy.admin(), "/config").await.unwrap().status(), 404);
    assert_eq!(get(proxy.admin(), "/metrics").await.unwrap().status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_protected_tree_is_read_with_digest_credentials() {
    let chroot = Zk::shared().chroot();
    // The writer authenticates and creates nodes only its identity may read.
    let writer = zookeeper_client::Client::connector()
        .with_auth("digest", b"ops:s3cret")
        .connect(&chroot.connect)
        .await
        .unwrap();
    let acl = zookeeper_client::CreateMode::Persistent.with_acls(zookeeper_client::Acls::creator_all());
    for p in ["/zkroute", "/zkroute/services", "/zkroute/services/web"] {
        writer.create(p, b"", &acl).await.unwrap();
    }
    writer.create("/zkroute/services/web/1", b"10.0.0.1:80", &acl).await.unwrap();
    let anonymous = chroot.client().await;
    assert!(matches!(anonymous.0.get_data("/zkroute/services/web/1").await, Err(zookeeper_client::Error::NoAuth)));

    let dir = tempfile::tempdir().unwrap();
    let auth_file = dir.path().join("zk-auth");
    std::fs::write(&auth_file, "ops:s3cret\n").unwrap();
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nauth_file = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}",
        chroot.connect,
        auth_file.display()
    ))
    .await;
    proxy.config_until("the protected instance", |c| addresses(c, "web") == ["10.0.0.1:80"]).await;
    proxy.stop().await;
}
