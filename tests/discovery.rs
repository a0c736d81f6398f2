#![allow(clippy::unwrap_used)]
//! ZooKeeper discovery end to end: a real server, a real zkroute, and `/config` read over HTTP.

mod support;

use std::time::Duration;

use support::{HTTP_LISTENER, Proxy, Zk, addresses, eventually, get, instances};

const CURATOR: &str = r#"{"name":"users","id":"c1","address":"10.0.0.1","port":8080,"sslPort":null,
    "payload":{"@class":"x","metadata":{"version":"v1"}},"registrationTimeUTC":1732700000000,"serviceType":"DYNAMIC"}"#;
const SERVERSET: &str = r#"{"serviceEndpoint":{"host":"10.0.0.2","port":8080},
    "additionalEndpoints":{"http":{"host":"10.0.0.2","port":8081}},"status":"ALIVE","shard":0}"#;
const NERVE: &str = r#"{"host":"10.0.0.3","port":8080,"name":"i-0abc","weight":10,"labels":{"az":"a"}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_of_every_format_is_added_changed_and_removed() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/users/c1", CURATOR).await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    let c = proxy.config_until("the curator instance", |c| addresses(c, "users").len() == 1).await;
    let i = instances(&c, "users")[0];
    assert_eq!(i["format"], "curator");
    assert_eq!(i["metadata"]["version"], "v1");
    assert_eq!(i["origin"]["path"], "/zkroute/services/users/c1");
    assert!(i["origin"]["mzxid"].as_i64().unwrap() > 0, "the mzxid it was read at");

    zk.put_ephemeral("/zkroute/services/users/s1", SERVERSET).await;
    zk.put_ephemeral("/zkroute/services/users/n1", NERVE).await;
    zk.put_ephemeral("/zkroute/services/users/p1", "10.0.0.4:8080").await;
    zk.put_ephemeral("/zkroute/services/users/p2", "ip=10.0.0.5:8080").await;
    let c = proxy.config_until("all five formats", |c| addresses(c, "users").len() == 5).await;
    assert_eq!(
        addresses(&c, "users"),
        ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080", "10.0.0.4:8080", "10.0.0.5:8080"]
    );
    let formats: Vec<&str> = instances(&c, "users").iter().map(|i| i["format"].as_str().unwrap()).collect();
    assert_eq!(formats, ["curator", "nerve", "plain", "plain", "serverset"]);

    // Changes.
    zk.put("/zkroute/services/users/c1", &CURATOR.replace("10.0.0.1", "10.0.1.1")).await;
    zk.put("/zkroute/services/users/s1", &SERVERSET.replace("ALIVE", "DEAD")).await;
    zk.put("/zkroute/services/users/n1", &NERVE.replace("\"weight\":10", "\"weight\":20")).await;
    zk.put("/zkroute/services/users/p1", "10.0.1.4:8080").await;
    let c = proxy
        .config_until("the changes", |c| {
            let a = addresses(c, "users");
            a.contains(&"10.0.1.1:8080".into())
                && a.contains(&"10.0.1.4:8080".into())
                && instances(c, "users").iter().any(|i| i["weight"] == 20)
                && instances(c, "users").iter().any(|i| i["enabled"] == false)
        })
        .await;
    let s1 = instances(&c, "users").into_iter().find(|i| i["id"] == "s1").unwrap();
    assert_eq!(s1["health"]["state"], "draining", "a ServerSet member that is not ALIVE drains");

    // Removals.
    for id in ["c1", "s1", "n1", "p1"] {
        zk.delete(&format!("/zkroute/services/users/{id}")).await;
    }
    let c = proxy.config_until("the removals", |c| addresses(c, "users").len() == 1).await;
    assert_eq!(addresses(&c, "users"), ["10.0.0.5:8080"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_instance_and_rule_nodes_leave_everything_else_intact() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/users/good", "10.0.0.1:80").await;
    zk.put("/zkroute/rules/r-good", r#"{"listener":"http","backends":[{"service":"users"}]}"#).await;
    let proxy = Proxy::with_zk(&chroot, "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n").await;
    proxy.config_until("the first table", |c| addresses(c, "users").len() == 1).await;

    zk.put("/zkroute/services/users/bad-port", r#"{"address":"10.0.0.2","port":99999}"#).await;
    zk.put("/zkroute/services/users/garbage", "{{{").await;
    zk.put("/zkroute/rules/r-bad", r#"{"listener":"http","backends":[]}"#).await;
    zk.put("/zkroute/services/users/later", "10.0.0.3:80").await;
    let c = proxy.config_until("the valid node after the invalid ones", |c| addresses(c, "users").len() == 2).await;
    assert_eq!(addresses(&c, "users"), ["10.0.0.1:80", "10.0.0.3:80"]);
    let invalid = c["invalid"].as_array().unwrap();
    let paths: Vec<&str> = invalid.iter().map(|n| n["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/zkroute/services/users/bad-port", "/zkroute/services/users/garbage", "/zkroute/rules/r-bad"]);
    assert!(invalid[0]["reason"].as_str().unwrap().contains("port"));
    assert!(c["rules"]["r-good"]["in_force"].is_object());
    assert!(c["rules"]["r-bad"]["in_force"].is_null());
    assert_eq!(c["listeners"][0]["routes"].as_array().unwrap().len(), 1);
    assert_eq!(proxy.metric("zkroute_invalid_nodes{kind=\"instance\"}").await, Some(2.0));
    assert_eq!(proxy.metric("zkroute_invalid_nodes{kind=\"rule\"}").await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_change_replaces_the_old_rule_and_a_delete_removes_it() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/rules/r1", r#"{"listener":"http","match":{"path_prefix":"/a"},"backends":[{"service":"a"}]}"#)
        .await;
    let proxy = Proxy::with_zk(&chroot, "[[listener]]\nname = \"http\"\nbind = \"127.0.0.1:0\"\n").await;
    let route = |c: &serde_json::Value| c["listeners"][0]["routes"][0].clone();
    proxy.config_until("rule v1", |c| route(c)["match"]["path_prefix"] == "/a").await;

    zk.put(
        "/zkroute/rules/r1",
        r#"{"listener":"http","priority":5,"match":{"path_prefix":"/b"},"backends":[{"service":"b"}]}"#,
    )
    .await;
    let c = proxy.config_until("rule v2", |c| route(c)["match"]["path_prefix"] == "/b").await;
    assert_eq!(c["listeners"][0]["routes"].as_array().unwrap().len(), 1, "replaced, not added");
    assert_eq!(route(&c)["targets"][0]["service"], "b");
    assert_eq!(c["rules"]["r1"]["in_force"]["origin"]["version"], 1);

    // An invalid version 3 keeps version 2 in force.
    zk.put("/zkroute/rules/r1", r#"{"listener":"http","backends":[{"service":"b","weight":"heavy"}]}"#).await;
    let c = proxy.config_until("rule v3 rejected", |c| c["rules"]["r1"]["rejected"].is_object()).await;
    assert_eq!(route(&c)["match"]["path_prefix"], "/b");

    zk.delete("/zkroute/rules/r1").await;
    let c = proxy.config_until("rule deleted", |c| c["listeners"][0]["routes"].as_array().unwrap().is_empty()).await;
    assert!(c["rules"].as_object().unwrap().is_empty());
    assert!(c["invalid"].as_array().unwrap().is_empty(), "a deleted node is no longer invalid");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_are_read_and_a_bad_policy_keeps_the_previous_one() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/users/a", "10.0.0.1:80").await;
    zk.put("/zkroute/policies/users", r#"{"lb":"round_robin"}"#).await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("the policy", |c| c["services"]["users"]["policy"]["lb"] == "round_robin").await;
    zk.put("/zkroute/policies/users", r#"{"lb":"random"}"#).await;
    let c = proxy.config_until("the bad policy", |c| !c["invalid"].as_array().unwrap().is_empty()).await;
    assert_eq!(c["services"]["users"]["policy"]["lb"], "round_robin");
    assert_eq!(c["invalid"][0]["kind"], "policy");
    // /config shows a policy in the document's own keys, defaults filled in.
    zk.put(
        "/zkroute/policies/users",
        r#"{"lb":"ring_hash","hash_on":"header:x-user","health_check":{"kind":"http","path":"/up","interval":"2s"},"outlier":{"consecutive_failures":3}}"#,
    )
    .await;
    let c = proxy.config_until("the third policy", |c| c["services"]["users"]["policy"]["lb"].is_object()).await;
    let policy = &c["services"]["users"]["policy"];
    assert_eq!(policy["lb"]["ring_hash"], "header:x-user");
    let check = &policy["health_check"];
    assert_eq!(
        (check["kind"].as_str(), check["path"].as_str(), check["interval"].as_str()),
        (Some("http"), Some("/up"), Some("2s"))
    );
    assert!(check["healthy_threshold"].as_u64().is_some() && check["timeout"].is_string(), "{check}");
    assert_eq!(policy["outlier"]["consecutive_failures"], 3);
    assert!(policy["outlier"]["base_ejection"].is_string());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_string_with_several_hosts_and_a_chroot_works() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/s/a", "10.0.0.1:80").await;
    let dead = support::free_port();
    let (hosts, path) = chroot.connect.split_once('/').unwrap();
    let connect = format!("127.0.0.1:{dead},{hosts}/{path}");
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{connect}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}"
    ))
    .await;
    proxy.config_until("the service through the second host", |c| addresses(c, "s").len() == 1).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_turns_200_once_the_first_table_is_loaded() {
    let chroot = Zk::shared().chroot();
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    eventually("ready", Duration::from_secs(10), || async {
        (get(proxy.admin(), "/ready").await.ok()?.status() == 200).then_some(())
    })
    .await;
    assert_eq!(get(proxy.admin(), "/healthz").await.unwrap().status(), 200);
    assert_eq!(get(proxy.admin(), "/nope").await.unwrap().status(), 404);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_restarted_the_table_keeps_serving_and_later_changes_arrive() {
    let mut server = Zk::start();
    let chroot = server.chroot();
    {
        let zk = chroot.client().await;
        zk.put("/zkroute/services/s/a", "10.0.0.1:80").await;
    }
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("the first table", |c| addresses(c, "s").len() == 1).await;
    assert_eq!(proxy.metric("zkroute_zk_connected").await, Some(1.0));

    server.stop();
    eventually("zk_connected = 0", Duration::from_secs(10), || async {
        (proxy.metric("zkroute_zk_connected").await == Some(0.0)).then_some(())
    })
    .await;
    // Still serving the table in force.
    let c = proxy.config().await;
    assert_eq!(addresses(&c, "s"), ["10.0.0.1:80"]);
    assert_eq!(get(proxy.admin(), "/ready").await.unwrap().status(), 200);

    server.restart();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/s/b", "10.0.0.2:80").await;
    proxy.config_until("a change made after the restart", |c| addresses(c, "s").len() == 2).await;
    // Later changes keep arriving: the watch was added again on the same session.
    zk.put("/zkroute/services/s/c", "10.0.0.3:80").await;
    proxy.config_until("a second change after the restart", |c| addresses(c, "s").len() == 3).await;
    assert_eq!(proxy.metric("zkroute_zk_session_expirations_total").await, Some(0.0), "same session");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_moves_to_a_new_session_and_changes_arrive() {
    let server = Zk::start();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/s/a", "10.0.0.1:80").await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("the first table", |c| addresses(c, "s").len() == 1).await;

    // Freeze the server past the 2s session timeout: on resume it expires the session.
    server.pause();
    tokio::time::sleep(Duration::from_secs(4)).await; // the fault itself: time must pass
    server.resume();
    eventually("the session expiry", Duration::from_secs(20), || async {
        (proxy.metric("zkroute_zk_session_expirations_total").await >= Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(addresses(&proxy.config().await, "s"), ["10.0.0.1:80"], "the table in force keeps serving");

    let zk = chroot.client().await; // the test's own session expired too
    zk.put("/zkroute/services/s/b", "10.0.0.2:80").await;
    proxy.config_until("a change through the new session", |c| addresses(c, "s").len() == 2).await;
    eventually("zk_connected = 1", Duration::from_secs(10), || async {
        (proxy.metric("zkroute_zk_connected").await == Some(1.0)).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_static_file_provider_reloads_on_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("routes.toml");
    std::fs::write(&file, "[services.s]\na = \"10.0.0.1:80\"\n[rules.r]\nlisten = 1\n").unwrap();
    let proxy =
        Proxy::start(&format!("[static]\nfile = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\n", file.display())).await;
    let c = proxy.config_until("the file's table", |c| addresses(c, "s").len() == 1).await;
    assert_eq!(c["source"], "file");
    assert_eq!(c["invalid"][0]["path"], "routes.toml#rules.r", "an invalid document is skipped on its own");

    std::fs::write(&file, "[services.s]\na = \"10.0.0.1:80\"\nb = { host = \"10.0.0.2\", port = 80 }\n").unwrap();
    let c = proxy.config_until("the reloaded file", |c| addresses(c, "s").len() == 2).await;
    assert!(c["invalid"].as_array().unwrap().is_empty());

    // A broken file keeps the table in force.
    std::fs::write(&file, "[services.s\n").unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await; // no event to poll: give the poller its turns
    assert_eq!(addresses(&proxy.config().await, "s").len(), 2);
    std::fs::write(&file, "[services.s]\nc = \"10.0.0.3:80\"\n").unwrap();
    let c = proxy.config_until("the repaired file", |c| addresses(c, "s") == ["10.0.0.3:80"]).await;
    assert_eq!(c["services"]["s"]["instances"][0]["origin"]["source"], "file");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_to_one_node_rereads_that_node_only() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    for s in 0..20 {
        for i in 0..5 {
            zk.put(&format!("/zkroute/services/s{s}/i{i}"), &format!("10.0.{s}.{i}:80")).await;
        }
    }
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("100 instances", |c| c["services"].as_object().is_some_and(|s| s.len() == 20)).await;
    let read = proxy.metric("zkroute_zk_nodes_read_total").await.unwrap();
    assert_eq!(read, 100.0, "the first read reads every node once");
    zk.put("/zkroute/services/s7/i2", "10.0.99.99:80").await;
    proxy.config_until("the change", |c| addresses(c, "s7").contains(&"10.0.99.99:80".to_owned())).await;
    assert_eq!(proxy.metric("zkroute_zk_nodes_read_total").await.unwrap() - read, 1.0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_node_is_dropped_without_a_read_and_a_recreated_one_is_read() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/s/a", "10.0.0.1:80").await;
    zk.put("/zkroute/services/s/b", "10.0.0.2:80").await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("both instances", |c| addresses(c, "s").len() == 2).await;
    let read = proxy.metric("zkroute_zk_nodes_read_total").await.unwrap();
    zk.delete("/zkroute/services/s/a").await;
    proxy.config_until("the deletion", |c| addresses(c, "s") == ["10.0.0.2:80"]).await;
    assert_eq!(proxy.metric("zkroute_zk_nodes_read_total").await.unwrap(), read, "a deletion needs no read");
    // Deleted and created again at once: the re-creation's event has the node read.
    zk.delete("/zkroute/services/s/b").await;
    zk.put("/zkroute/services/s/b", "10.0.0.3:80").await;
    proxy.config_until("the re-created node", |c| addresses(c, "s") == ["10.0.0.3:80"]).await;
    proxy.stop().await;
}

/// An idle sidecar pings at the pace docs/OPERATIONS.md gives ("What one sidecar costs the
/// ensemble"): every 3/10 of the session timeout, as the client does with a connection timeout
/// of 3/5 of it; without one it pings every 2/10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_pings_every_three_tenths_of_the_session_timeout() {
    // A server of its own: its `cons` then lists this sidecar's connection and the asking one.
    let server = Zk::start();
    let chroot = server.chroot();
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("the first table", |c| c["zookeeper"]["full_reads"] == 1).await;
    let received = || {
        let cons = support::zk::four_letter(server.addr(), "cons").expect("cons");
        let counts = cons.lines().filter_map(|l| l.split("recved=").nth(1)?.split(',').next()?.parse::<u64>().ok());
        counts.max().expect("the sidecar's connection")
    };
    // Nothing changes: every packet the server receives from here on is a ping. The session
    // timeout is 2 s (tests/support/routes.rs), so one every 600 ms, 7 or 8 in 4.5 s; 11 at
    // the client's own pace, 400 ms.
    let before = received();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let pings = received() - before;
    assert!((5..=9).contains(&pings), "{pings} pings in 4.5 s");
    proxy.stop().await;
}

/// A change reaches the table without waking the runtime's thread: zookeeper-client's session
/// and the discovery tasks run on the thread that sees the session socket's bytes, async-io's
/// (docs/PERFORMANCE.md, "A fleet of sidecars on one ensemble"). Run as tokio tasks, each
/// change woke the runtime's thread at least twice, for the notification and for the read's
/// answer, and each ping's answer once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_the_table_without_waking_the_runtime_thread() {
    use support::{Binary, RouteSource, free_port};
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let node = "/zkroute/services/users/n1";
    zk.put(node, NERVE).await;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        "{}[admin]\nbind = \"{admin}\"\n[proxy]\nworkers = 1\n\
         [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:{}\"\nservice = \"users\"\n",
        chroot.source_config(),
        free_port()
    );
    let sidecar = Binary::start_config(&config, admin).await;
    let swaps = || sidecar.log().matches("routing table swapped").count();
    let first =
        eventually("the first table", Duration::from_secs(10), || async { Some(swaps()).filter(|&n| n > 0) }).await;
    // With one worker the runtime runs on the process's main thread.
    let pid = sidecar.child.id();
    let woken = || {
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")).unwrap();
        line.trim().parse::<u64>().unwrap()
    };
    // Only the log file is read from here on: nothing asks the runtime's thread for anything.
    let before = woken();
    let changes = 20;
    for i in 1..=changes {
        zk.put(node, &NERVE.replace("\"weight\":10", &format!("\"weight\":{}", 10 + i))).await;
        eventually("the change's swap", Duration::from_secs(10), || async { (swaps() >= first + i).then_some(()) })
            .await;
    }
    let woken = woken() - before;
    assert!(woken < changes as u64, "the runtime's thread woke {woken} times for {changes} changes");
}
