#![allow(clippy::unwrap_used)]
//! Dubbo providers where Dubbo registers them: providers registered by Apache Dubbo's own Python
//! implementation (called through zkroute by Dubbo's own consumer), and Java-shaped provider URLs written as Java Dubbo writes them, routed by
//! subset and by listener protocol, with configurators, tag rules, warm-up and name clashes.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zkroute::discovery::dubbo::url::encode;

const API: &str = "com.foo.Api";

/// Registers a provider URL as Dubbo does (an ephemeral node named by the encoded URL); returns
/// the node's path.
async fn register(zk: &ZkClient, service: &str, url: &str) -> String {
    let path = format!("/dubbo/{service}/providers/{}", encode(url));
    zk.put_ephemeral(&path, "").await;
    path
}

/// A Java-shaped `rest://` provider URL for `addr` with extra parameters.
fn rest(addr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "rest://{addr}/{API}?anyhost=true&application=shop&dubbo=2.0.2&interface={API}&methods=sayHello,sayHi\
         &side=provider&release=3.2.0{extra}"
    )
}

/// zkroute following `chroot` with `dubbo_root = "/dubbo"`, and extra TOML.
async fn proxy(chroot: &Chroot, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"2s\"\ndubbo_root = \"/dubbo\"\n\
         [admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}{extra}",
        chroot.connect
    ))
    .await
}

fn rule(prefix: &str, subset: &str) -> String {
    format!(
        r#"{{"listener":"http","match":{{"path_prefix":"{prefix}"}},"backends":[{{"service":"{API}","subset":{subset}}}]}}"#
    )
}

/// Who answered `n` GETs of `path` with `headers`.
async fn answers(proxy: &Proxy, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    let mut who_answered = Vec::new();
    for _ in 0..n {
        let resp = send(proxy.listener("http"), request("GET", "h", path, headers, "")).await.unwrap();
        who_answered.push(who(&resp));
    }
    who_answered.sort();
    who_answered.dedup();
    who_answered
}

/// Who answered `n` requests of `path` with `headers` over one HTTP/2 connection with prior
/// knowledge (h2c), as a Triple consumer sends them.
async fn h2c_answers(proxy: &Proxy, path: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    let stream = tokio::net::TcpStream::connect(proxy.listener("http")).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut who_answered = Vec::new();
    for _ in 0..n {
        let mut req = http::Request::get(format!("http://h{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp =
            sender.send_request(req.body(http_body_util::Full::new(bytes::Bytes::new())).unwrap()).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = http_body_util::BodyExt::collect(body).await.unwrap().to_bytes();
        who_answered.push(who(&http::Response::from_parts(parts, body)));
    }
    who_answered.sort();
    who_answered.dedup();
    who_answered
}

fn instance<'a>(c: &'a Value, service: &str, addr: &str) -> &'a Value {
    instances(c, service).into_iter().find(|i| i["address"] == addr).unwrap_or(&Value::Null)
}

/// The endpoints of the first target of route `id` of listener `listener` in `/config`.
fn route_endpoints<'a>(c: &'a Value, listener: &str, id: &str) -> &'a Value {
    let l = c["listeners"].as_array().unwrap().iter().find(|l| l["name"] == listener).unwrap();
    let r = l["routes"].as_array().unwrap().iter().find(|r| r["id"] == id).unwrap();
    &r["targets"][0]["endpoints"]
}

fn sorted(v: &Value) -> Vec<String> {
    let mut a: Vec<String> = v.as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_owned()).collect();
    a.sort();
    a
}

// ---- Apache Dubbo's own Python providers ---------------------------------------------------

/// A Triple provider of Apache Dubbo's Python implementation (`tests/peers/dubbo_provider.py`),
/// registered by Dubbo's own code; killed when dropped.
struct PythonProvider {
    child: Child,
    port: u16,
}

impl PythonProvider {
    fn start(zk: &Zk, root: &str, service: &str, name: &str) -> PythonProvider {
        let port = free_port();
        let child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/dubbo_provider.py"))
            .args(["--zookeeper", &zk.connect_string(), "--root", root, "--service", service])
            .args(["--port", &port.to_string(), "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 with apache-dubbo (tests/deps.sh installs it)");
        PythonProvider { child, port }
    }
}

impl Drop for PythonProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_registered_by_dubbos_python_implementation_are_instances_of_their_interface() {
    let server = Zk::shared();
    let chroot = server.chroot();
    let zk = chroot.client().await;
    let service = "org.apache.dubbo.samples.Greeter";
    // Dubbo's registry root is its group: the test's chroot, then /dubbo, as zkroute sees it.
    let root = format!("{}/dubbo", &chroot.connect[chroot.connect.find('/').unwrap() + 1..]);
    let a = PythonProvider::start(server, &root, service, "a");
    let b = PythonProvider::start(server, &root, service, "b");
    let providers = format!("/dubbo/{service}/providers");
    eventually("both providers registered by Dubbo", Duration::from_secs(60), || async {
        let nodes = zk.0.list_children(&providers).await.unwrap_or_default();
        (nodes.len() == 2).then_some(())
    })
    .await;

    let tcp =
        format!("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"{service}\"\n");
    zk.put(
        "/zkroute/rules/greeter",
        &format!(
            r#"{{"listener":"http","match":{{"path_prefix":"/{service}/"}},"backends":[{{"service":"{service}"}}]}}"#
        ),
    )
    .await;
    let proxy = proxy(&chroot, &tcp).await;
    let want = vec![format!("127.0.0.1:{}", a.port), format!("127.0.0.1:{}", b.port)];
    let mut want_sorted = want.clone();
    want_sorted.sort();
    let c = proxy.config_until("both Python providers", |c| addresses(c, service) == want_sorted).await;
    for addr in &want {
        let i = instance(&c, service, addr);
        assert_eq!((i["format"].as_str(), i["protocol"].as_str()), (Some("dubbo"), Some("h2")), "{i}");
        assert_eq!(i["metadata"]["service"], service);
    }
    // HTTP routes take the Triple (HTTP/2) providers; a TCP listener takes none of them.
    assert_eq!(sorted(&route_endpoints(&c, "http", "greeter")["addresses"]), want_sorted);
    assert_eq!(route_endpoints(&c, "tcp", "listener:tcp")["total"], 0);

    // Dubbo's own consumer, pointed at zkroute by a direct URL (through the registry it would go
    // around the sidecar), is answered by both providers over HTTP/2.
    let url = format!("tri://{}/{service}", proxy.listener("http"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers/dubbo_consumer.py"))
            .args(["--url", &url, "--method", "sayHi", "--calls", "20"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let answers = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{answers}{}", String::from_utf8_lossy(&out.stderr));
    let mut by: Vec<&str> = answers.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(by.len(), 20, "{answers}");
    assert!(answers.lines().all(|l| l.starts_with("a:call ") || l.starts_with("b:call ")), "{answers}");
    by.sort();
    by.dedup();
    assert_eq!(by, ["a", "b"], "{answers}");
    proxy.stop().await;
}

// ---- Java-shaped providers -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn java_shaped_providers_route_by_subset_and_by_the_listeners_protocol() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let v1 = Backend::http("v1").await;
    let v2 = Backend::http("v2").await;
    let binary = TcpServer::echo().await;
    register(&zk, API, &rest(v1.addr, "&version=1.0.0&group=g1&timestamp=1700000000000&weight=100&note=a%2Cb")).await;
    register(&zk, API, &rest(v2.addr, "&version=2.0.0&group=g1")).await;
    // The same interface exported over Dubbo's binary protocol: TCP listeners only.
    register(
        &zk,
        API,
        &format!("dubbo://{}/{API}?application=shop&interface={API}&version=1.0.0&group=g1", binary.addr),
    )
    .await;
    zk.put(&format!("/dubbo/{API}/providers/not%ZZa-url"), "").await;
    zk.put("/zkroute/rules/v1", &rule("/v1/", r#"{"version":"1.0.0","group":"g1"}"#)).await;
    zk.put("/zkroute/rules/v2", &rule("/v2/", r#"{"version":"2.0.0"}"#)).await;
    let tcp =
        format!("[[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"{API}\"\n");
    let proxy = proxy(&chroot, &tcp).await;
    let c = proxy.config_until("three providers", |c| addresses(c, API).len() == 3).await;

    let i = instance(&c, API, &v1.addr.to_string());
    assert_eq!((i["protocol"].as_str(), i["weight"].as_u64()), (Some("http1"), Some(100)));
    assert_eq!(i["metadata"]["methods"], "sayHello,sayHi", "%2C in the node name is a comma");
    assert_eq!(i["metadata"]["note"], "a%2Cb", "a double-encoded value keeps one level, as Dubbo sees it");
    assert_eq!(
        (i["metadata"]["application"].as_str(), i["metadata"]["release"].as_str()),
        (Some("shop"), Some("3.2.0"))
    );
    assert_eq!(instance(&c, API, &binary.addr.to_string())["protocol"], "tcp");
    // The bad node is skipped on its own: listed, counted, the rest routed.
    let bad = c["invalid"].as_array().unwrap().iter().find(|n| n["path"].as_str().unwrap().ends_with("not%ZZa-url"));
    assert!(bad.unwrap()["reason"].as_str().unwrap().contains("percent-encoding"), "{c:#}");
    assert_eq!(proxy.metric(r#"zkroute_invalid_nodes{kind="instance"}"#).await, Some(1.0));

    // Subsets on version and group; the binary provider of version 1.0.0 is never an HTTP endpoint.
    assert_eq!(answers(&proxy, "/v1/x", &[], 10).await, ["v1"]);
    assert_eq!(answers(&proxy, "/v2/x", &[], 10).await, ["v2"]);
    assert_eq!(sorted(&route_endpoints(&c, "http", "v1")["addresses"]), [v1.addr.to_string()]);
    // The TCP listener relays to the binary provider only.
    assert_eq!(sorted(&route_endpoints(&c, "tcp", "listener:tcp")["addresses"]), [binary.addr.to_string()]);
    let mut s = tokio::net::TcpStream::connect(proxy.listener("tcp")).await.unwrap();
    s.write_all(b"dubbo bytes").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"dubbo bytes");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configurators_disable_an_address_and_change_a_weight() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    register(&zk, API, &rest(a.addr, "")).await;
    register(&zk, API, &rest(b.addr, "")).await;
    zk.put("/zkroute/rules/api", &rule(&format!("/{API}/"), "{}")).await;
    zk.put(&format!("/zkroute/policies/{API}"), r#"{"lb":"round_robin"}"#).await;
    let proxy = proxy(&chroot, "").await;
    proxy.config_until("two providers", |c| addresses(c, API).len() == 2).await;
    let path = format!("/{API}/x");
    assert_eq!(answers(&proxy, &path, &[], 10).await, ["a", "b"]);

    // dubbo-admin's "disable": an override URL for a's address.
    let disable = format!(
        "/dubbo/{API}/configurators/{}",
        encode(&format!("override://{}/{API}?category=configurators&disabled=true&dynamic=false&enabled=true", a.addr))
    );
    zk.put(&disable, "").await;
    proxy.config_until("a disabled", |c| instance(c, API, &a.addr.to_string())["enabled"] == false).await;
    assert_eq!(answers(&proxy, &path, &[], 10).await, ["b"]);

    // dubbo-admin's weight, as YAML under config/dubbo, keyed as Dubbo's consumers look it up.
    let yaml = format!(
        "configVersion: v2.7\nscope: service\nkey: {API}\nenabled: true\nconfigs:\n  - addresses: [\"{}\"]\n    \
         side: provider\n    parameters:\n      weight: 300\n",
        b.addr
    );
    zk.put(&format!("/dubbo/config/dubbo/{API}::.configurators"), &yaml).await;
    proxy.config_until("b weighs 300", |c| instance(c, API, &b.addr.to_string())["weight"] == 300).await;
    zk.delete(&disable).await;
    proxy.config_until("a enabled again", |c| instance(c, API, &a.addr.to_string())["enabled"] == true).await;
    // Round robin visits every unit of weight once per round: 100 to a, 300 to b in 400 requests.
    let (mut to_a, mut to_b) = (0, 0);
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    for _ in 0..400 {
        match who(&client.send(request("GET", "h", &path, &[], "")).await.unwrap()).as_str() {
            "a" => to_a += 1,
            "b" => to_b += 1,
            other => panic!("{other}"),
        }
    }
    assert_eq!((to_a, to_b), (100, 300));

    // A YAML document that does not parse is listed; the weight in force stays.
    zk.put(&format!("/dubbo/config/dubbo/{API}::.configurators"), "configs: [[[").await;
    let c = proxy
        .config_until("the bad configurator listed", |c| {
            c["invalid"].as_array().unwrap().iter().any(|n| n["kind"] == "dubbo_config")
        })
        .await;
    assert_eq!(instance(&c, API, &b.addr.to_string())["weight"], 300);
    assert_eq!(proxy.metric(r#"zkroute_invalid_nodes{kind="dubbo_config"}"#).await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_rule_routes_requests_by_their_dubbo_tag() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let plain = Backend::http("plain").await;
    let gray = Backend::http("gray").await;
    let blue = Backend::http("blue").await;
    register(&zk, API, &rest(plain.addr, "")).await;
    register(&zk, API, &rest(gray.addr, "")).await;
    register(&zk, API, &rest(blue.addr, "&dubbo.tag=blue")).await;
    zk.put("/zkroute/rules/api", &rule(&format!("/{API}/"), "{}")).await;
    let tag_rule = |force: bool, gray_address: String| {
        format!(
            "force: {force}\nenabled: true\nkey: shop\ntags:\n  - name: gray\n    addresses: [\"{gray_address}\"]\n  \
             - name: blue\n"
        )
    };
    zk.put("/dubbo/config/dubbo/shop.tag-router", &tag_rule(false, gray.addr.to_string())).await;
    let proxy = proxy(&chroot, "").await;
    proxy
        .config_until("the tag rule applied", |c| {
            instance(c, API, &gray.addr.to_string())["tags"]["assigned"][0] == "gray"
        })
        .await;
    let path = format!("/{API}/x");
    assert_eq!(answers(&proxy, &path, &[], 10).await, ["plain"], "no tag: untagged instances only");
    assert_eq!(answers(&proxy, &path, &[("dubbo.tag", "gray")], 10).await, ["gray"], "the rule's address");
    assert_eq!(answers(&proxy, &path, &[("dubbo.tag", "blue")], 10).await, ["blue"], "the instance's own tag");
    assert_eq!(answers(&proxy, &path, &[("dubbo.tag", "red")], 10).await, ["plain"], "nothing red: untagged");
    let forced = answers(&proxy, &path, &[("dubbo.tag", "red"), ("dubbo.force.tag", "true")], 3).await;
    assert_eq!(forced, ["error:no_healthy_upstream"], "unless the request forces its tag");
    // The same over HTTP/2 with prior knowledge, as a Triple consumer sends its tag.
    assert_eq!(h2c_answers(&proxy, &path, &[("dubbo.tag", "gray")], 10).await, ["gray"]);
    assert_eq!(h2c_answers(&proxy, &path, &[], 10).await, ["plain"]);

    // The gray address serves nothing now: without force the untagged ones (the gray backend among
    // them: it is no longer tagged), with force nothing.
    zk.put("/dubbo/config/dubbo/shop.tag-router", &tag_rule(false, "127.0.0.1:1".into())).await;
    proxy.config_until("gray moved", |c| instance(c, API, &gray.addr.to_string())["tags"]["assigned"].is_null()).await;
    assert_eq!(answers(&proxy, &path, &[("dubbo.tag", "gray")], 20).await, ["gray", "plain"]);
    zk.put("/dubbo/config/dubbo/shop.tag-router", &tag_rule(true, "127.0.0.1:1".into())).await;
    proxy.config_until("force", |c| instance(c, API, &gray.addr.to_string())["tags"]["rule"]["force"] == true).await;
    assert_eq!(answers(&proxy, &path, &[("dubbo.tag", "gray")], 3).await, ["error:no_healthy_upstream"]);
    proxy.stop().await;
}

/// Dubbo's warm-up weight (its `AbstractLoadBalance.calculateWarmupWeight`): `uptime / (warmup /
/// weight)` in single precision, cut to an integer, between 1 and the weight, while the uptime is
/// strictly between zero and the warm-up.
fn dubbo_warmup_weight(uptime_ms: i64, warmup_ms: i64, weight: u32) -> u32 {
    if uptime_ms <= 0 || uptime_ms >= warmup_ms {
        return if uptime_ms < 0 { 1 } else { weight };
    }
    ((uptime_ms as f32 / (warmup_ms as f32 / weight as f32)) as u32).clamp(1, weight)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_ramps_weights_as_dubbos_load_balancer_does() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let (old, mid, fresh) = (Backend::http("old").await, Backend::http("mid").await, Backend::http("fresh").await);
    // Started long ago: full weight. Started 153 s into a 600 s warm-up: 25 of 100 (it stays 25
    // from 150 s to 156 s of uptime, whatever the machine's pace). Started now, with a 3 s warm-up.
    register(&zk, API, &rest(old.addr, "&timestamp=1700000000000")).await;
    let started = now_ms() - 153_000;
    register(&zk, API, &rest(mid.addr, &format!("&timestamp={started}&warmup=600000&weight=100"))).await;
    register(&zk, API, &rest(fresh.addr, &format!("&timestamp={}&warmup=3000&weight=200", now_ms()))).await;
    zk.put("/zkroute/rules/api", &rule(&format!("/{API}/"), "{}")).await;
    let proxy = proxy(&chroot, "").await;
    let c = proxy.config_until("three providers", |c| addresses(c, API).len() == 3).await;
    let expected = dubbo_warmup_weight(now_ms() - started, 600_000, 100);
    assert_eq!(expected, 25);
    assert_eq!(instance(&c, API, &mid.addr.to_string())["effective_weight"], expected);
    assert_eq!(instance(&c, API, &old.addr.to_string())["effective_weight"], 100);
    assert_eq!(instance(&c, API, &mid.addr.to_string())["weight"], 100, "the registered weight stays shown");
    // The route's endpoints carry the ramped weights too.
    let endpoints = route_endpoints(&c, "http", "api");
    let weight_of = |addr: &str| {
        let i = endpoints["addresses"].as_array().unwrap().iter().position(|a| a == addr).unwrap();
        endpoints["weights"][i].as_u64().unwrap()
    };
    assert_eq!(weight_of(&mid.addr.to_string()), 25);

    // The fresh provider climbs to its full weight as the table is rebuilt, without other changes.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = proxy.config().await;
        let w = instance(&c, API, &fresh.addr.to_string())["effective_weight"].as_u64().unwrap();
        seen.insert(w);
        if w == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never reached full weight: saw {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(seen.iter().any(|w| *w > 1 && *w < 200), "no step of the ramp was seen: {seen:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_path_service_of_the_same_name_wins_the_clash() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let native = Backend::http("native").await;
    let dubbo = Backend::http("dubbo").await;
    zk.put(&format!("/zkroute/services/{API}/i1"), &native.addr.to_string()).await;
    let node = register(&zk, API, &rest(dubbo.addr, "")).await;
    zk.put("/zkroute/rules/api", &rule(&format!("/{API}/"), "{}")).await;
    let proxy = proxy(&chroot, "").await;
    let c = proxy
        .config_until("the clash listed", |c| c["invalid"].as_array().unwrap().iter().any(|n| n["path"] == node))
        .await;
    assert_eq!(addresses(&c, API), [native.addr.to_string()]);
    let listed = c["invalid"].as_array().unwrap().iter().find(|n| n["path"] == node).unwrap();
    assert!(listed["reason"].as_str().unwrap().contains("services_path"), "{listed}");
    assert_eq!(answers(&proxy, &format!("/{API}/x"), &[], 5).await, ["native"]);
    // The services_path instances go: the Dubbo provider takes the name.
    zk.delete(&format!("/zkroute/services/{API}/i1")).await;
    proxy.config_until("the Dubbo provider", |c| addresses(c, API) == [dubbo.addr.to_string()]).await;
    assert_eq!(answers(&proxy, &format!("/{API}/x"), &[], 5).await, ["dubbo"]);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_lists_dubbo_services_and_providers() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let a = Backend::http("a").await;
    register(&zk, API, &rest(a.addr, "&version=1.0.0")).await;
    zk.put(&format!("/dubbo/{API}/providers/garbage"), "").await;
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_zkroute"))
            .arg("ctl")
            .args(["--zookeeper-connect", &chroot.connect, "--zookeeper-session-timeout", "2s"])
            .args(["--zookeeper-dubbo-root", "/dubbo"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = ctl(&["--json", "services"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v, serde_json::json!([{"service": API, "instances": 1, "invalid": 1, "source": "dubbo"}]));
    let out = ctl(&["instances", API]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&a.addr.to_string()) && text.contains("protocol=http1") && text.contains("version=1.0.0"),
        "{text}"
    );
    assert!(text.contains("invalid") && text.contains("not a URL"), "{text}");
}
