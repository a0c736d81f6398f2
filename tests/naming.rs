#![allow(clippy::unwrap_used)]
//! Naming: health-gated registration of the local app, and the operator CLI `zkroute ctl`.

mod support;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use support::*;
use zkroute::discovery::formats::parse_instance;
use zkroute::routing::Format;

fn register_toml(backend: &Backend, interval: &str) -> String {
    format!(
        "[[register]]\nservice = \"users\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         health_check = {{ kind = \"http\", url = \"http://{addr}/health\", interval = \"{interval}\", rise = 1, fall = 1 }}\n\
         payload = {{ weight = 40, zone = \"a\", metadata = {{ version = \"v2\" }} }}\n",
        port = backend.addr.port(),
        addr = backend.addr,
    )
}

fn node_path(backend: &Backend) -> String {
    format!("/zkroute/services/users/127.0.0.1:{}", backend.addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registered_node_is_a_curator_document_present_while_the_app_is_healthy() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let proxy = Proxy::with_zk(&chroot, &format!("{HTTP_LISTENER}{}", register_toml(&app, "100ms"))).await;
    let path = node_path(&app);
    let data = eventually("registered", Duration::from_secs(10), || async { zk.get(&path).await }).await;

    // A plain read sees a Curator x-discovery document...
    let doc: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(doc["name"], "users");
    assert_eq!(doc["id"], format!("127.0.0.1:{}", app.addr.port()));
    assert_eq!(doc["address"], "127.0.0.1");
    assert_eq!(doc["port"], app.addr.port());
    assert_eq!(doc["serviceType"], "DYNAMIC");
    assert_eq!(doc["payload"]["@class"], "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance");
    assert!(doc["registrationTimeUTC"].as_u64().unwrap() > 0);
    // ... which the project's own parser reads back whole.
    let i = parse_instance(data.as_bytes()).unwrap();
    assert_eq!(i.format, Format::Curator);
    assert_eq!(i.addr.to_string(), app.addr.to_string());
    assert_eq!((i.weight, i.zone.as_deref(), i.metadata.get("version")), (40, Some("a"), Some("v2")));
    // It is ephemeral.
    let (_, stat) = zk.0.get_data(&path).await.unwrap();
    assert_ne!(stat.ephemeral_owner, 0);
    // And zkroute discovers it like any other instance.
    proxy.config_until("the registered instance", |c| addresses(c, "users") == [app.addr.to_string()]).await;
    assert_eq!(proxy.metric(r#"zkroute_registered{service="users"}"#).await, Some(1.0));
    let c = proxy.config().await;
    assert_eq!(c["registrations"][0]["registered"], true);

    app.set_healthy(false);
    eventually("deregistered", Duration::from_secs(10), || async { zk.get(&path).await.is_none().then_some(()) }).await;
    assert_eq!(proxy.metric(r#"zkroute_registered{service="users"}"#).await, Some(0.0));
    app.set_healthy(true);
    eventually("registered again", Duration::from_secs(10), || async { zk.get(&path).await }).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_follows_a_session_expiry_into_the_new_session() {
    let server = Zk::start();
    let chroot = server.chroot();
    let app = Backend::http("app").await;
    let proxy = Proxy::with_zk(&chroot, &register_toml(&app, "100ms")).await;
    let path = node_path(&app);
    let first = eventually("registered", Duration::from_secs(10), || owner_of(&chroot, &path)).await;

    server.pause();
    tokio::time::sleep(Duration::from_secs(4)).await; // the fault: longer than the 2s session timeout
    server.resume();
    let second = eventually("registered in a new session", Duration::from_secs(30), || async {
        owner_of(&chroot, &path).await.filter(|o| *o != first)
    })
    .await;
    assert_ne!(first, second);
    proxy.stop().await;
}

async fn owner_of(chroot: &Chroot, path: &str) -> Option<i64> {
    let zk = tokio::time::timeout(Duration::from_secs(5), chroot.client()).await.ok()?;
    zk.0.get_data(path).await.ok().map(|(_, s)| s.ephemeral_owner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_removes_the_node_before_the_process_exits() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    zk.put("/zkroute/services/web/1", &app.addr.to_string()).await;
    let mut bin = Binary::start_with(&chroot, "10s", &register_toml(&app, "100ms"), &[]).await;
    let path = node_path(&app);
    eventually("registered", Duration::from_secs(10), || async { zk.get(&path).await }).await;
    eventually("the web route", Duration::from_secs(10), || async {
        (send(bin.http, request("GET", "h", "/", &[], "")).await.ok()?.status() == 200).then_some(())
    })
    .await;
    // An in-flight request keeps the process draining; the node must be gone meanwhile.
    let http = bin.http;
    // Longer than the default drain_delay (2 s) the node is kept draining before its deletion.
    let slow = tokio::spawn(async move { send(http, request("GET", "h", "/?sleep_ms=4000", &[], "")).await });
    eventually("the slow request in flight", Duration::from_secs(5), || async { (app.requests() >= 2).then_some(()) })
        .await;
    bin.sigterm();
    eventually("deregistered while draining", Duration::from_secs(5), || async {
        zk.get(&path).await.is_none().then_some(())
    })
    .await;
    assert!(bin.child.try_wait().unwrap().is_none(), "still running: draining the slow request");
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(bin.wait_exit(Duration::from_secs(5)).code(), Some(0));
}

// ---- zkroute ctl ---------------------------------------------------------------------------

fn ctl(chroot: &Chroot, args: &[&str], stdin: Option<&str>) -> Output {
    ctl_with(chroot, &[], args, stdin)
}

/// `zkroute ctl` with extra settings flags.
fn ctl_with(chroot: &Chroot, settings: &[&str], args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zkroute"));
    cmd.args(["--listener", r#"{name="http", bind="127.0.0.1:1"}"#])
        .arg("ctl")
        .args(["--zookeeper-connect", &chroot.connect, "--zookeeper-session-timeout", "2s"])
        .args(settings)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_refuses_an_invalid_rule_and_leaves_zookeeper_unchanged() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let good = r#"{"listener":"http","backends":[{"service":"users"}]}"#;
    let out = ctl(&chroot, &["put", "rule", "r1", "-"], Some(good));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("needs zkroute 0.1 or later"), "says which version it needs: {}", text(&out));
    assert_eq!(zk.get("/zkroute/rules/r1").await.as_deref(), Some(good));

    let bad = r#"{"listener":"http","backends":[{"service":"users","weight":99999}]}"#;
    let out = ctl(&chroot, &["put", "rule", "r1", "-"], Some(bad));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("backends[0].weight"), "{}", text(&out));
    assert_eq!(zk.get("/zkroute/rules/r1").await.as_deref(), Some(good), "unchanged");
    let out = ctl(&chroot, &["put", "rule", "r2", "-"], Some("{not json"));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(zk.get("/zkroute/rules/r2").await, None, "nothing created");
    let out = ctl(&chroot, &["put", "policy", "users", "-"], Some(r#"{"lb":"random"}"#));
    assert_eq!(out.status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_detects_a_concurrent_modification() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/rules/r1", r#"{"listener":"http","backends":[{"service":"a"}]}"#).await;
    let out = ctl(&chroot, &["--json", "get", "rule", "r1"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let read: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let version = read["version"].as_i64().unwrap().to_string();
    // Another operator changes it meanwhile.
    zk.put("/zkroute/rules/r1", r#"{"listener":"http","backends":[{"service":"b"}]}"#).await;
    let mine = r#"{"listener":"http","backends":[{"service":"c"}]}"#;
    let out = ctl(&chroot, &["put", "rule", "r1", "-", "--expect-version", &version], Some(mine));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("changed concurrently"), "{}", text(&out));
    assert!(zk.get("/zkroute/rules/r1").await.unwrap().contains("\"b\""), "the other operator's write stands");
    let out = ctl(&chroot, &["delete", "rule", "r1", "--expect-version", &version], None);
    assert_eq!(out.status.code(), Some(1));
    let out = ctl(&chroot, &["delete", "rule", "r1"], None);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(zk.get("/zkroute/rules/r1").await, None);
    let out = ctl(&chroot, &["get", "rule", "r1"], None);
    assert_eq!(out.status.code(), Some(1), "not found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_services_instances_and_rules_with_parse_errors() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/users/a", r#"{"host":"10.0.0.1","port":80,"labels":{"az":"b"}}"#).await;
    zk.put("/zkroute/services/users/b", "10.0.0.2:80").await;
    zk.put("/zkroute/services/users/c", "garbage").await;
    zk.put("/zkroute/rules/good", r#"{"listener":"http","backends":[{"service":"users"}]}"#).await;
    zk.put("/zkroute/rules/bad", r#"{"listener":"http"}"#).await;
    let out = ctl(&chroot, &["--json", "services"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([{"service": "users", "instances": 2, "invalid": 1}]));
    let out = ctl(&chroot, &["instances", "users"], None);
    let t = text(&out);
    assert!(
        t.contains("nerve") && t.contains("10.0.0.2:80") && t.contains("invalid") && t.contains("host:port"),
        "{t}"
    );
    let out = ctl(&chroot, &["--json", "rules"], None);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "bad");
    assert_eq!(v[0]["valid"], false);
    assert_eq!(v[1]["valid"], true);
    let out = ctl(&chroot, &["instances", "nobody"], None);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn ctl_exits_2_when_zookeeper_cannot_be_reached() {
    let dead = Chroot { connect: format!("127.0.0.1:{}", free_port()) };
    let out = ctl(&dead, &["rules"], None);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_route_agrees_with_the_proxy() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let users = Backend::http("users").await;
    let admin = Backend::http("admin").await;
    let canary = Backend::http("canary").await;
    zk.put("/zkroute/services/users/1", &users.addr.to_string()).await;
    zk.put("/zkroute/services/admin/1", &admin.addr.to_string()).await;
    zk.put("/zkroute/services/canary/1", &canary.addr.to_string()).await;
    zk.put(
        "/zkroute/rules/users",
        r#"{"listener":"http","match":{"host":"*.example.com"},"backends":[{"service":"users"}]}"#,
    )
    .await;
    zk.put(
        "/zkroute/rules/admin",
        r#"{"listener":"http","priority":5,"match":{"path_prefix":"/admin"},"backends":[{"service":"admin"}]}"#,
    )
    .await;
    zk.put(
        "/zkroute/rules/canary",
        r#"{"listener":"http","priority":9,"match":{"headers":{"x-canary":"1"}},"backends":[{"service":"canary"}]}"#,
    )
    .await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("three rules", |c| c["listeners"][0]["routes"].as_array().is_some_and(|r| r.len() == 3)).await;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)]);
    let cases: [Case<'_>; 4] = [
        ("a.example.com", "/", &[]),
        ("a.example.com", "/admin/x", &[]),
        ("other", "/x", &[("x-canary", "1")]),
        ("other", "/x", &[]),
    ];
    for (host, path, headers) in cases {
        let mut args = vec!["--json", "route", "--listener", "http", "--host", host, "--path", path];
        let header_args: Vec<String> = headers.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for h in &header_args {
            args.push("--header");
            args.push(h);
        }
        let out = ctl(&chroot, &args, None);
        let r = send(proxy.listener("http"), request("GET", host, path, headers, "")).await.unwrap();
        if out.status.code() == Some(1) {
            assert_eq!(r.status(), 404, "ctl says no route for {host}{path}");
            continue;
        }
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["targets"][0]["service"].as_str().unwrap(), who(&r), "{host}{path} {headers:?}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_only_zkroute_does_not_follow_the_naming_tree() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    for i in 0..20 {
        zk.put(&format!("/zkroute/services/other/{i}"), "10.0.0.1:80").await;
    }
    let app = Backend::http("app").await;
    // No [[listener]]: only registration.
    let proxy = Proxy::with_zk(&chroot, &register_toml(&app, "100ms")).await;
    eventually("registered", Duration::from_secs(10), || async { zk.get(&node_path(&app)).await }).await;
    assert_eq!(get(proxy.admin(), "/ready").await.unwrap().status(), 200);
    assert_eq!(proxy.config().await["source"], "none");
    assert_eq!(proxy.metric("zkroute_zk_nodes_read_total").await, Some(0.0), "nothing read");
    proxy.stop().await;
}

// ---- registrations under faults --------------------------------------------------------------

/// A register-only zkroute whose owner token lives beside `snapshot`.
async fn registrar(chroot: &Chroot, app: &Backend, snapshot: &std::path::Path, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"2s\"\nsnapshot = \"{}\"\n{extra}\n[admin]\nbind = \"127.0.0.1:0\"\n\
         [[register]]\nservice = \"users\"\naddress = \"127.0.0.1\"\nport = {}\nid = \"shared\"\ndrain_delay = \"0s\"\n",
        chroot.connect,
        snapshot.display(),
        app.addr.port()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_registrations_with_one_id_never_take_the_node_from_each_other() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let dir = tempfile::tempdir().unwrap();
    let path = "/zkroute/services/users/shared";
    let first = registrar(&chroot, &app, &dir.path().join("a.json"), "").await;
    let holder = eventually("the first registration", Duration::from_secs(10), || owner_of(&chroot, path)).await;
    let second = registrar(&chroot, &app, &dir.path().join("b.json"), "").await;
    eventually("the conflict shown", Duration::from_secs(10), || async {
        let c = second.config().await;
        (c["registrations"][0]["conflict"] == true).then_some(())
    })
    .await;
    assert_eq!(second.metric(r#"zkroute_registration_conflict{service="users"}"#).await, Some(1.0));
    assert_eq!(second.metric(r#"zkroute_registered{service="users"}"#).await, Some(0.0));
    // Over more than one verification round of both (10 s), the node stays where it is.
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        assert_eq!(zk.0.get_data(path).await.unwrap().1.ephemeral_owner, holder, "the node changed hands");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The holder leaves: the other takes over, at once rather than at its next check.
    first.stop().await;
    let taker = eventually("the takeover", Duration::from_secs(5), || async {
        owner_of(&chroot, path).await.filter(|o| *o != holder)
    })
    .await;
    assert_ne!(taker, holder);
    eventually("the conflict cleared", Duration::from_secs(5), || async {
        let c = second.config().await;
        (c["registrations"][0]["conflict"] == false && c["registrations"][0]["registered"] == true).then_some(())
    })
    .await;
    assert_eq!(second.metric(r#"zkroute_registration_conflict{service="users"}"#).await, Some(0.0));
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_sidecar_replaces_its_predecessors_node_at_once() {
    let chroot = Zk::shared().chroot();
    let app = Backend::http("app").await;
    let path = node_path(&app);
    // A session timeout of 10 s: the killed process's node outlives the restart by far.
    let args = ["--zookeeper-session-timeout", "10s"];
    let mut first = Binary::start_with(&chroot, "2s", &register_toml(&app, "100ms"), &args).await;
    let before = eventually("registered", Duration::from_secs(10), || owner_of(&chroot, &path)).await;
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    let started = std::time::Instant::now();
    let _second = Binary::start_with(&chroot, "2s", &register_toml(&app, "100ms"), &args).await;
    eventually("registered by the restarted sidecar", Duration::from_secs(8), || async {
        owner_of(&chroot, &path).await.filter(|o| *o != before)
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(8), "before the old session's 10 s ran out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_the_node_draining_for_drain_delay_before_deleting_it() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let register = format!("{}drain_delay = \"1500ms\"\n", register_toml(&app, "100ms"));
    let mut bin = Binary::start_with(&chroot, "5s", &register, &[]).await;
    let path = node_path(&app);
    eventually("registered", Duration::from_secs(10), || async { zk.get(&path).await }).await;
    bin.sigterm();
    let signalled = std::time::Instant::now();
    eventually("marked draining", Duration::from_secs(5), || async {
        let doc: serde_json::Value = serde_json::from_str(&zk.get(&path).await?).ok()?;
        (doc["enabled"] == false).then_some(())
    })
    .await;
    // Other sidecars see it draining for the drain delay, then it goes.
    eventually("deleted", Duration::from_secs(10), || async { zk.get(&path).await.is_none().then_some(()) }).await;
    assert!(signalled.elapsed() >= Duration::from_millis(1400), "kept draining: {:?}", signalled.elapsed());
    assert_eq!(bin.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_credentials_created_leaves_are_creator_only_and_world_readable() {
    use zookeeper_client::{Acl, Permission};
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let dir = tempfile::tempdir().unwrap();
    let auth = dir.path().join("auth");
    std::fs::write(&auth, "ops:s3cret\n").unwrap();
    let proxy = Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"2s\"\nauth_file = \"{}\"\n[admin]\nbind = \"127.0.0.1:0\"\n{}",
        chroot.connect,
        auth.display(),
        register_toml(&app, "100ms")
    ))
    .await;
    let path = node_path(&app);
    eventually("registered", Duration::from_secs(10), || async { zk.get(&path).await }).await;
    let out = ctl_with(&chroot, &["--zookeeper-auth", "ops:s3cret"], &["put", "rule", "r1", "-"], Some(RULE_A));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    let digest = |acls: &[Acl]| acls.iter().any(|a| a.scheme() == "digest" && a.permission() == Permission::ALL);
    let world = |acls: &[Acl], p: Permission| {
        acls.iter().any(|a| a.scheme() == "world" && a.id() == "anyone" && a.permission() == p)
    };
    for leaf in [path.as_str(), "/zkroute/rules/r1"] {
        let (acls, _) = zk.0.get_acl(leaf).await.unwrap();
        assert!(digest(&acls) && world(&acls, Permission::READ) && acls.len() == 2, "{leaf}: {acls:?}");
        assert!(zk.get(leaf).await.is_some(), "{leaf}: readable by anyone");
        // (Deleting is the parent's ACL's business in ZooKeeper.)
        assert!(matches!(zk.0.set_data(leaf, b"x", None).await, Err(zookeeper_client::Error::NoAuth)), "{leaf}");
    }
    for parent in ["/zkroute/services/users", "/zkroute/rules"] {
        let (acls, _) = zk.0.get_acl(parent).await.unwrap();
        assert!(world(&acls, Permission::ALL), "{parent}: {acls:?}");
    }
    proxy.stop().await;
}

const RULE_A: &str = r#"{"listener":"http","backends":[{"service":"a"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_put_over_an_existing_node_needs_the_version_read_or_force() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let out = ctl(&chroot, &["put", "rule", "r1", "-"], Some(RULE_A));
    assert_eq!(out.status.code(), Some(0), "creating needs neither: {}", text(&out));
    // Someone changes it; an operator who has not read it since must not overwrite that.
    let theirs = r#"{"listener":"http","backends":[{"service":"theirs"}]}"#;
    zk.put("/zkroute/rules/r1", theirs).await;
    let mine = r#"{"listener":"http","backends":[{"service":"mine"}]}"#;
    let out = ctl(&chroot, &["put", "rule", "r1", "-"], Some(mine));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--expect-version 1"), "{}", text(&out));
    assert_eq!(zk.get("/zkroute/rules/r1").await.as_deref(), Some(theirs));
    // `get` prints the version; writing with it succeeds.
    let out = ctl(&chroot, &["get", "rule", "r1"], None);
    assert!(text(&out).contains("version 1"), "{}", text(&out));
    let out = ctl(&chroot, &["put", "rule", "r1", "-", "--expect-version", "1"], Some(mine));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = ctl(&chroot, &["put", "rule", "r1", "-", "--force"], Some(RULE_A));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(zk.get("/zkroute/rules/r1").await.as_deref(), Some(RULE_A));
}

// ---- read by Curator itself ---------------------------------------------------------------

/// Curator's own `ServiceDiscovery` (Debian's libcurator-discovery-java), reading `service`
/// under `/zkroute/services` of `chroot` with an `Object` payload, as a plain Curator consumer
/// does (`tests/peers/CuratorRead.java`): its output and whether it succeeded.
fn curator_read(chroot: &Chroot, service: &str) -> (bool, String) {
    let jars = [
        "curator-client",
        "curator-framework",
        "curator-recipes",
        "curator-x-discovery",
        "zookeeper",
        "zookeeper-jute",
        "jackson-core",
        "jackson-databind",
        "jackson-annotations",
        "guava",
        "slf4j-api",
        "slf4j-nop",
    ];
    let classpath: Vec<String> = jars.iter().map(|j| format!("/usr/share/java/{j}.jar")).collect();
    let out = Command::new("java")
        .args(["-cp", &classpath.join(":")])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/CuratorRead.java"))
        .args([&chroot.connect, "/zkroute/services", service])
        .output()
        .expect("java from default-jdk-headless (tests/deps.sh installs it)");
    (out.status.success(), text(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curators_own_service_discovery_reads_a_registration_without_payload_class() {
    support::deps::ensure();
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let entry = |service: &str, class: Option<&str>| {
        let class = class.map(|c| format!("payload_class = \"{c}\"\n")).unwrap_or_default();
        format!(
            "[[register]]\nservice = \"{service}\"\naddress = \"127.0.0.1\"\nport = {}\n{class}\
             payload = {{ weight = 40, metadata = {{ version = \"v2\" }} }}\n",
            app.addr.port()
        )
    };
    let registrations = format!("{}{}", entry("plain", Some("")), entry("spring", None));
    let proxy = Proxy::with_zk(&chroot, &format!("{HTTP_LISTENER}{registrations}")).await;
    for service in ["plain", "spring"] {
        let path = format!("/zkroute/services/{service}/127.0.0.1:{}", app.addr.port());
        eventually("registered", Duration::from_secs(10), || async { zk.get(&path).await }).await;
    }
    // Without @class, Curator reads the registration, payload and all.
    let (ok, out) = curator_read(&chroot, "plain");
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("127.0.0.1:{} enabled=true", app.addr.port())) && out.contains("version=v2"),
        "{out}"
    );
    // With Spring Cloud's class (the default, which Spring consumers need), a plain Curator reader
    // cannot resolve the type: the reason `payload_class = ""` exists.
    let (ok, out) = curator_read(&chroot, "spring");
    assert!(!ok && out.contains("ZookeeperInstance"), "{out}");
    // zkroute reads both alike.
    proxy
        .config_until("both registrations", |c| addresses(c, "plain").len() == 1 && addresses(c, "spring").len() == 1)
        .await;
    proxy.stop().await;
}
