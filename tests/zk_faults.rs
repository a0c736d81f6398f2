#![allow(clippy::unwrap_used)]
//! ZooKeeper under faults, made at chosen moments by a proxy between zkroute and a real server
//! (`support::zk_fault`): a connection dropped mid-read, a stall past the session timeout, an
//! older server's answer, unreadable nodes, a lagging follower.

mod support;

use std::time::Duration;

use support::zk_fault::op;
use support::*;
use zookeeper_client::{Acls, CreateMode};

/// An instance document of about `size` bytes, at `10.0.<i / 250>.<i % 250>:80`.
fn padded_instance(i: usize, size: usize) -> String {
    format!(
        r#"{{"address":"10.0.{}.{}","port":80,"payload":{{"metadata":{{"pad":"{}"}}}}}}"#,
        i / 250,
        i % 250,
        "x".repeat(size.saturating_sub(80))
    )
}

/// Creates `n` instances of service `web`, sent back to back.
async fn many_instances(zk: &ZkClient, n: usize, size: usize) {
    zk.put("/zkroute/services/web/0", &padded_instance(0, size)).await;
    let acl = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let docs: Vec<(String, String)> =
        (1..n).map(|i| (format!("/zkroute/services/web/{i}"), padded_instance(i, size))).collect();
    let writes: Vec<_> = docs.iter().map(|(p, d)| zk.0.create(p, d.as_bytes(), &acl)).collect();
    for w in writes {
        w.await.unwrap();
    }
}

async fn has_address(proxy: &Proxy, service: &str, addr: &str, what: &str) {
    eventually(what, Duration::from_secs(10), || async {
        addresses(&proxy.config().await, service).iter().any(|a| a == addr).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_reconnect_during_the_full_read_re_adds_the_watches() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    // 300 instances of 1 KB: the first multi-read batch's reply is far above 100 KB, the
    // connection is dropped right after it, when no request is outstanding, and the client
    // reconnects at once; the rest of the read goes through the new connection.
    many_instances(&zk, 300, 1000).await;
    let faults = FaultProxy::start(server.addr()).await;
    faults.arm(When::AfterReplyAbove(100_000), Action::Drop);
    let proxy = Proxy::with_zk(&chroot.via(&faults), HTTP_LISTENER).await;
    eventually("300 instances", Duration::from_secs(10), || async {
        (instances(&proxy.config().await, "web").len() == 300).then_some(())
    })
    .await;
    assert_eq!(faults.struck(), 1, "the connection was dropped mid-read");
    assert!(faults.accepted() >= 2, "and the client reconnected");
    // The watches were lost with the connection: a later change arrives only if they were
    // added again.
    zk.put("/zkroute/services/web/late", "10.9.9.9:80").await;
    has_address(&proxy, "web", "10.9.9.9:80", "a change made after the reconnect").await;
    proxy.stop().await;
}

/// A client with digest credentials, creating nodes only it may read.
async fn owner_client(chroot: &Chroot) -> zookeeper_client::Client {
    zookeeper_client::Client::connector().with_auth("digest", b"owner:pw").connect(&chroot.connect).await.unwrap()
}

/// Creates `path` readable by its creator only (parents open).
async fn create_private(owner: &zookeeper_client::Client, path: &str, data: &str) {
    let parent = &path[..path.rfind('/').unwrap()];
    match owner.mkdir(parent, &CreateMode::Persistent.with_acls(Acls::anyone_all())).await {
        Ok(()) | Err(zookeeper_client::Error::NodeExists) => {}
        Err(e) => panic!("mkdir {parent}: {e}"),
    }
    owner.create(path, data.as_bytes(), &CreateMode::Persistent.with_acls(Acls::creator_all())).await.unwrap();
}

fn invalid_paths(c: &serde_json::Value) -> Vec<(String, String)> {
    c["invalid"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["path"].as_str().unwrap().to_owned(), n["reason"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_nodes_at_a_cold_start_are_skipped_and_listed() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/web/a", "10.0.0.1:80").await;
    zk.put("/zkroute/services/web/b", "10.0.0.2:80").await;
    zk.put("/zkroute/rules/web", r#"{"listener":"http","backends":[{"service":"web"}]}"#).await;
    let owner = owner_client(&chroot).await;
    create_private(&owner, "/zkroute/services/web/secret", "10.0.0.3:80").await;
    create_private(&owner, "/zkroute/rules/secret", r#"{"listener":"http","backends":[{"service":"x"}]}"#).await;
    create_private(&owner, "/zkroute/services/hidden", "").await;

    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    let c = proxy.config_until("the readable nodes", |c| addresses(c, "web").len() == 2).await;
    assert_eq!(get(proxy.admin(), "/ready").await.unwrap().status(), 200);
    let invalid = invalid_paths(&c);
    for path in ["/zkroute/services/web/secret", "/zkroute/rules/secret", "/zkroute/services/hidden"] {
        let (_, reason) = invalid.iter().find(|(p, _)| p == path).unwrap_or_else(|| panic!("{path} in {invalid:?}"));
        assert!(reason.contains("NoAuth"), "{reason}");
    }
    let m = proxy.metrics().await;
    assert_eq!(metric_value(&m, r#"zkroute_invalid_nodes{kind="instance"}"#), Some(2.0));
    assert_eq!(metric_value(&m, r#"zkroute_invalid_nodes{kind="rule"}"#), Some(1.0));
    // Discovery goes on.
    zk.put("/zkroute/services/web/c", "10.0.0.4:80").await;
    has_address(&proxy, "web", "10.0.0.4:80", "a later change").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_node_on_a_running_proxy_neither_freezes_the_table_nor_the_full_reads() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/web/a", "10.0.0.1:80").await;
    let faults = FaultProxy::start(server.addr()).await;
    let proxy = Proxy::with_zk(&chroot.via(&faults), HTTP_LISTENER).await;
    proxy.config_until("the first table", |c| addresses(c, "web").len() == 1).await;

    // Created while the proxy runs (whether the server tells this session about a node it may not
    // read depends on its version)...
    let owner = owner_client(&chroot).await;
    create_private(&owner, "/zkroute/services/web/secret", "10.0.0.3:80").await;
    zk.put("/zkroute/services/web/b", "10.0.0.2:80").await;
    proxy.config_until("the change after the unreadable node", |c| addresses(c, "web").len() == 2).await;

    // ... then met by the full read after a reconnect.
    faults.arm(When::AfterReplies(1), Action::Drop);
    zk.put("/zkroute/services/web/c", "10.0.0.4:80").await; // a reply to carry the fault
    eventually("the connection dropped", Duration::from_secs(10), || async { (faults.struck() == 1).then_some(()) })
        .await;
    zk.put("/zkroute/services/web/d", "10.0.0.5:80").await;
    has_address(&proxy, "web", "10.0.0.5:80", "a change after the full read").await;
    let c = proxy.config().await;
    assert!(invalid_paths(&c).iter().any(|(p, _)| p == "/zkroute/services/web/secret"));
    assert_eq!(proxy.metric(r#"zkroute_invalid_nodes{kind="instance"}"#).await, Some(1.0));
    let zk_status = &c["zookeeper"];
    assert!(zk_status["full_reads"].as_u64().unwrap() >= 2, "{zk_status}");
    assert_eq!((zk_status["state"].as_str(), zk_status["connected"].as_bool()), (Some("connected"), Some(true)));
    assert!(zk_status["session_id"].as_str().unwrap().starts_with("0x"), "{zk_status}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_persistent_watches_fails_clearly_instead_of_looping() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let faults = FaultProxy::start(server.addr()).await;
    // The real server answers AddWatch as one older than 3.6 does: UNIMPLEMENTED.
    faults.make_unknown(op::ADD_WATCH);
    let proxy = Proxy::with_zk(&chroot.via(&faults), HTTP_LISTENER).await;
    let status = eventually("the failure", Duration::from_secs(10), || async {
        let c = proxy.config().await;
        (c["zookeeper"]["state"] == "failed").then(|| c["zookeeper"].clone())
    })
    .await;
    assert!(status["error"].as_str().unwrap().contains("ZooKeeper 3.6 or later is required"), "{status}");
    assert_eq!(status["server_unsupported"], true);
    assert_eq!(proxy.metric("zkroute_zk_server_unsupported").await, Some(1.0));
    tokio::time::sleep(Duration::from_secs(3)).await; // the point: nothing more happens meanwhile
    let attempts = faults.requests().iter().filter(|r| r.op == op::ADD_WATCH).count();
    assert_eq!(attempts, 1, "one attempt, no retry loop");
    assert_eq!(get(proxy.admin(), "/ready").await.unwrap().status(), 503);
    proxy.stop().await;
}

/// Waits for the expiry a stall of the connection past the 2 s session timeout causes.
async fn expired(proxy: &Proxy) {
    eventually("the session expiry", Duration::from_secs(20), || async {
        (proxy.metric("zkroute_zk_session_expirations_total").await >= Some(1.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_past_the_session_timeout_expires_the_session_and_the_new_one_syncs_before_reading() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/web/a", "10.0.0.1:80").await;
    let faults = FaultProxy::start(server.addr()).await;
    let proxy = Proxy::with_zk(&chroot.via(&faults), HTTP_LISTENER).await;
    proxy.config_until("the first table", |c| addresses(c, "web").len() == 1).await;

    faults.stall_for(Duration::from_secs(4)); // the 2 s session expires on the server meanwhile
    expired(&proxy).await;
    zk.put("/zkroute/services/web/b", "10.0.0.2:80").await;
    has_address(&proxy, "web", "10.0.0.2:80", "a change through the new session").await;
    // The new session's first read came after a sync, so a lagging server could not answer it
    // with older state.
    let requests = faults.requests();
    // (Connections the client gave up on during the stall may have sent only their connect request.)
    let reads = [op::GET_CHILDREN2, op::MULTI_READ, op::GET_DATA];
    let last_session = requests.iter().filter(|r| reads.contains(&r.op)).map(|r| r.conn).max().unwrap();
    let ops: Vec<i32> = requests.iter().filter(|r| r.conn == last_session).map(|r| r.op).collect();
    let sync = ops.iter().position(|o| *o == op::SYNC).unwrap_or_else(|| panic!("no sync in {ops:?}"));
    let first_read = ops.iter().position(|o| reads.contains(o));
    assert!(first_read.is_some_and(|r| sync < r), "sync before the first read: {ops:?}");
    let c = proxy.config().await;
    assert_eq!(c["zookeeper"]["session_expirations"], 1);
    assert_eq!(c["zookeeper"]["state"], "connected");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_during_the_full_read_after_an_expiry_re_adds_the_watches() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    many_instances(&zk, 300, 1000).await;
    let faults = FaultProxy::start(server.addr()).await;
    let proxy = Proxy::with_zk(&chroot.via(&faults), HTTP_LISTENER).await;
    proxy.config_until("300 instances", |c| instances(c, "web").len() == 300).await;

    // The new session's full read is cut after its first large reply.
    faults.arm(When::AfterReplyAbove(100_000), Action::Drop);
    faults.stall_for(Duration::from_secs(4));
    expired(&proxy).await;
    eventually("the drop", Duration::from_secs(20), || async { (faults.struck() == 1).then_some(()) }).await;
    zk.put("/zkroute/services/web/late", "10.9.9.9:80").await;
    has_address(&proxy, "web", "10.9.9.9:80", "a change made after the drop").await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_registry_raises_the_alarm_and_keeps_the_last_good_snapshot() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/web/a", "10.0.0.1:80").await;
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot.json");
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"2s\"\nsnapshot = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}",
        chroot.connect,
        snap.display()
    ))
    .await;
    eventually("the snapshot written", Duration::from_secs(10), || async {
        std::fs::read_to_string(&snap).ok()?.contains("10.0.0.1:80").then_some(())
    })
    .await;
    assert_eq!(proxy.metric("zkroute_services_empty").await, Some(0.0));

    // The whole services tree goes.
    zk.delete("/zkroute/services/web/a").await;
    zk.delete("/zkroute/services/web").await;
    zk.delete("/zkroute/services").await;
    eventually("the alarm", Duration::from_secs(10), || async {
        (proxy.metric("zkroute_services_empty").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(proxy.config().await["zookeeper"]["services_empty"], true);
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the writer's 1 s: nothing is written
    assert!(std::fs::read_to_string(&snap).unwrap().contains("10.0.0.1:80"), "the last good snapshot stays");

    zk.put("/zkroute/services/web/b", "10.0.0.2:80").await;
    eventually("the alarm cleared", Duration::from_secs(10), || async {
        (proxy.metric("zkroute_services_empty").await == Some(0.0)).then_some(())
    })
    .await;
    proxy.stop().await;
}
