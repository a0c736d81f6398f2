#![allow(clippy::unwrap_used)]
//! Metrics, logs and the access log, read from a running zkroute after real traffic; the Grafana
//! board's queries run in a real Prometheus scraping it. Routes come from a static file, except
//! where the ZooKeeper session is what the metric shows.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// promtool, from Debian's `prometheus` package (`tests/deps.sh` installs it if missing).
fn promtool() -> &'static str {
    deps::ensure();
    "promtool"
}

fn promtool_check(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(promtool());
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_real_traffic_and_pass_promtool() {
    let web = Backend::http("web").await;
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.rule("r", r#"{"listener":"http","retries":1,"backends":[{"service":"web"}]}"#);
    routes.instance("web", "dead", refused_addr());
    routes.instance("web", "live", web.addr);
    routes.instance("db", "1", echo.addr);
    routes.instance("web", "bad", "garbage");
    let proxy = routes
        .proxy(&format!(
            "{HTTP_LISTENER}[[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"db\"\n"
        ))
        .await;
    let c = proxy.config().await;
    assert_eq!((addresses(&c, "web").len(), addresses(&c, "db").len()), (2, 1));

    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    for _ in 0..20 {
        let r = client.send(request("GET", "h", "/", &[], "")).await.unwrap();
        assert_eq!(r.status(), 200, "{}", who(&r));
    }
    let r = client.send(request("GET", "h", "/?status=404", &[], "")).await.unwrap();
    assert_eq!((r.status().as_u16(), who(&r)), (404, "web".to_owned()));
    let mut tcp = tokio::net::TcpStream::connect(proxy.listener("db")).await.unwrap();
    tcp.write_all(b"12345").await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).await.unwrap();

    // A request is counted just after its response is written: the client may ask first.
    let m = eventually("the 21 requests counted", Duration::from_secs(5), || async {
        let m = proxy.metrics().await;
        let v = |s: &str| metric_value(&m, s);
        (v(r#"zkroute_http_requests_total{code="200",listener="http",service="web"}"#) == Some(20.0)
            && v(r#"zkroute_http_requests_total{code="404",listener="http",service="web"}"#) == Some(1.0))
        .then_some(m)
    })
    .await;
    let v = |s: &str| metric_value(&m, s);
    assert!(v(r#"zkroute_http_request_duration_seconds_count{listener="http",service="web"}"#).unwrap() >= 21.0);
    assert!(v(r#"zkroute_upstream_connect_errors_total{service="web"}"#).unwrap() >= 1.0);
    assert!(v(r#"zkroute_retries_total{service="web"}"#).unwrap() >= 1.0);
    eventually("tcp bytes counted", Duration::from_secs(5), || async {
        let m = proxy.metrics().await;
        (metric_value(&m, r#"zkroute_tcp_bytes_total{direction="tx",listener="db"}"#) == Some(5.0)).then_some(())
    })
    .await;
    assert_eq!(v(r#"zkroute_tcp_bytes_total{direction="rx",listener="db"}"#), Some(5.0));
    assert_eq!(v(r#"zkroute_tcp_connections_total{listener="db",service="db"}"#), Some(1.0));
    assert_eq!(v(r#"zkroute_backends{service="web",state="healthy"}"#), Some(2.0));
    assert!(v("zkroute_table_version").unwrap() >= 1.0);
    assert!(v("zkroute_table_updates_total").unwrap() >= 1.0);
    assert!(v("zkroute_table_build_duration_seconds_count").unwrap() >= 1.0);
    assert!(v("zkroute_discovery_propagation_seconds_count").unwrap() >= 1.0);
    assert_eq!(v(r#"zkroute_invalid_nodes{kind="instance"}"#), Some(1.0));
    assert!(v("process_resident_memory_bytes").unwrap() > 0.0);
    assert!(!m.contains(&web.addr.to_string()), "no instance addresses in labels by default");

    let (ok, report) = promtool_check(&["check", "metrics"], Some(&m));
    assert!(ok, "promtool check metrics:\n{report}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zk_connected_shows_the_zookeeper_session() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    zk.put("/zkroute/services/web/live", "10.0.0.1:80").await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    proxy.config_until("the table", |c| addresses(c, "web").len() == 1).await;
    assert_eq!(proxy.metric("zkroute_zk_connected").await, Some(1.0));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_instance_metrics_label_endpoints_when_asked() {
    let web = Backend::http("web").await;
    let routes = Routes::new();
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"web"}]}"#);
    routes.instance("web", "live", web.addr);
    let proxy = routes.proxy(&format!("{HTTP_LISTENER}[metrics]\nper_instance = true\n")).await;
    let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200);
    let sample = format!(r#"zkroute_upstream_requests_total{{code="200",instance="{}",service="web"}}"#, web.addr);
    // Counted just after the response is written: the client may ask first.
    eventually("the per-instance sample", Duration::from_secs(5), || async {
        (proxy.metric(&sample).await == Some(1.0)).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_has_a_line_per_request_with_its_fields() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let web = Backend::http("web").await;
    let routes = Routes::new();
    routes.rule("r", r#"{"listener":"http","match":{"path_prefix":"/api"},"backends":[{"service":"web"}]}"#);
    routes.instance("web", "1", web.addr);
    let proxy =
        routes.proxy(&format!("{HTTP_LISTENER}[log]\nformat = \"json\"\naccess_log = \"{}\"\n", log.display())).await;
    let r = send(proxy.listener("http"), request("POST", "users.internal", "/api/x?y=1", &[], "hello")).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = send(proxy.listener("http"), request("GET", "users.internal", "/nothing", &[], "")).await.unwrap();
    assert_eq!(r.status(), 404);
    let lines = eventually("two access log lines", Duration::from_secs(5), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        (lines.len() >= 2).then_some(lines)
    })
    .await;
    // Each connection writes its line once its exchange is over: the two may come in either order.
    let by_method = |m: &str| lines.iter().find(|l| l["method"] == m).unwrap_or_else(|| panic!("no {m}: {lines:?}"));
    let (first, second) = (by_method("POST"), by_method("GET"));
    assert_eq!(first["listener"], "http");
    assert_eq!(first["method"], "POST");
    assert_eq!(first["host"], "users.internal");
    assert_eq!(first["path"], "/api/x?y=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["upstream"], web.addr.to_string());
    assert_eq!(first["bytes_in"], 5);
    assert_eq!(first["bytes_out"], 3);
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    assert_eq!(second["status"], 404);
    assert!(second["upstream"].is_null());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_one_line_per_table_swap_saying_what_changed() {
    let routes = Routes::new();
    let bin = Binary::start_with(&routes, "5s", "[log]\nformat = \"json\"\n", &[]).await;
    routes.instance("web", "1", "10.0.0.1:80");
    routes.instance("web", "2", "10.0.0.2:80");
    let swap_line = || {
        bin.log().lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| {
            v["message"] == "routing table swapped"
                && v["instances_added"].as_u64().unwrap_or(0) >= 1
                && v["changed_services"].as_str().unwrap_or("").contains("web")
        })
    };
    // Polled by hand rather than with `eventually`, so that a timeout shows what was logged.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(line) = swap_line() {
            break line;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no swap line with the instances in 10 s; the log:\n{}",
            bin.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(line["level"], "INFO");
    assert!(line["version"].as_u64().unwrap() >= 2);
}

#[test]
fn the_alert_rules_and_scrape_config_load() {
    let root = env!("CARGO_MANIFEST_DIR");
    let alerts = format!("{root}/deploy/prometheus/alerts.yml");
    let (ok, report) = promtool_check(&["check", "rules", &alerts], None);
    assert!(ok, "{report}");
    let written =
        std::fs::read_to_string(&alerts).unwrap().lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert!(report.contains(&format!("SUCCESS: {written} rules found")), "every rule loads: {report}");
    let (ok, report) = promtool_check(&["check", "config", &format!("{root}/deploy/prometheus/prometheus.yml")], None);
    assert!(ok, "{report}");
}

#[test]
fn the_grpc_error_rule_fires_on_failures_that_travel_as_http_200() {
    let root = env!("CARGO_MANIFEST_DIR");
    let (ok, report) = promtool_check(&["test", "rules", &format!("{root}/deploy/prometheus/alerts_test.yml")], None);
    assert!(ok && report.contains("SUCCESS"), "{report}");
}

/// A Prometheus server (Debian's `prometheus`, beside promtool) scraping one target every second.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn scraping(target: std::net::SocketAddr) -> Prometheus {
        deps::ensure();
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: zkroute\n    static_configs:\n      \
                 - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        Prometheus { child, addr, _dir: dir }
    }

    /// An instant query's result vector (empty when nothing matched, or on an error).
    async fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let encoded: String = expr
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let r = get(self.addr, &format!("/api/v1/query?query={encoded}")).await?;
        let body: serde_json::Value = serde_json::from_slice(r.body()).map_err(|e| e.to_string())?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every query of the Grafana board, with its panel's title.
fn grafana_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/zkroute.json");
    let board: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push((panel["title"].as_str().unwrap().to_owned(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    for var in board["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["query"]["query"].as_str() {
            queries.push((format!("variable {}", var["name"]), q.to_owned()));
        }
    }
    queries
}

/// The metric names a query uses: zkroute's own and the process collector's.
fn metric_names(expr: &str) -> Vec<&str> {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    expr.split(|c: char| !is_name(c)).filter(|w| w.starts_with("zkroute_") || w.starts_with("process_")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grafana_query_names_exported_metrics_and_returns_data_in_prometheus() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let web = Backend::http("web").await;
    let echo = TcpServer::echo().await;
    let proxy = Proxy::with_zk(
        &chroot,
        &format!(
            "{HTTP_LISTENER}[[listener]]\nname = \"db\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"db\"\n\
             [[listener]]\nname = \"nothing\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"none\"\n\
             [[register]]\nservice = \"app\"\naddress = \"127.0.0.1\"\nport = {}\n",
            web.addr.port()
        ),
    )
    .await;
    zk.put("/zkroute/policies/db", r#"{"health_check":{"kind":"tcp","interval":"200ms"}}"#).await;
    zk.put("/zkroute/rules/r", r#"{"listener":"http","retries":1,"backends":[{"service":"web"}]}"#).await;
    zk.put("/zkroute/services/web/live", &web.addr.to_string()).await;
    zk.put("/zkroute/services/web/dead", &refused_addr().to_string()).await;
    zk.put("/zkroute/services/db/1", &echo.addr.to_string()).await;
    zk.put("/zkroute/services/web/bad", "garbage").await;
    proxy
        .config_until("the table, db checked", |c| {
            addresses(c, "web").len() == 2
                && instances(c, "db").first().is_some_and(|i| i["health"]["state"] == "healthy")
        })
        .await;
    proxy.config_until("the app registered", |c| c["registrations"][0]["registered"] == true).await;

    // Traffic of every kind the board shows: answers and errors, retries, TCP relayed and refused.
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    for path in ["/?status=404", "/?status=500"] {
        client.send(request("GET", "h", path, &[], "")).await.unwrap();
    }
    let mut tcp = tokio::net::TcpStream::connect(proxy.listener("db")).await.unwrap();
    tcp.write_all(b"12345").await.unwrap();
    tcp.shutdown().await.unwrap();
    tcp.read_to_end(&mut Vec::new()).await.unwrap();
    let mut refused = tokio::net::TcpStream::connect(proxy.listener("nothing")).await.unwrap();
    let _ = refused.read_to_end(&mut Vec::new()).await;

    let metrics = eventually("every counter moved", Duration::from_secs(10), || async {
        // Until a request meets the dead instance first and is retried.
        send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
        let m = proxy.metrics().await;
        let v = |s: &str| metric_value(&m, s).unwrap_or(0.0);
        (v(r#"zkroute_retries_total{service="web"}"#) >= 1.0
            && v(r#"zkroute_http_requests_total{code="500",listener="http",service="web"}"#) == 1.0
            && v(r#"zkroute_tcp_bytes_total{direction="tx",listener="db"}"#) == 5.0
            && m.contains("zkroute_tcp_connections_rejected_total{")
            && m.contains("zkroute_health_checks_total{"))
        .then_some(m)
    })
    .await;
    let queries = grafana_queries();
    assert!(queries.len() >= 30, "the board has its queries: {}", queries.len());
    for (panel, expr) in &queries {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{panel}: no zkroute metric in {expr}");
        for name in names {
            let exported = metrics.lines().any(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with([' ', '{'])));
            assert!(exported, "{panel}: {name} is not in /metrics (query {expr})");
        }
    }

    // Each query, with the board's variables at "All", is valid PromQL and finds data.
    let prometheus = Prometheus::scraping(proxy.admin()).await;
    eventually("three scrapes", Duration::from_secs(30), || async {
        let r = prometheus.query("count_over_time(zkroute_table_version[1m])").await.ok()?;
        (r.first()?["value"][1].as_str()?.parse::<f64>().ok()? >= 3.0).then_some(())
    })
    .await;
    for (panel, expr) in &queries {
        let concrete = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*")
            .replace("$service", ".*");
        let promql = match concrete.strip_prefix("label_values(") {
            // A variable's query: the series it takes the label from.
            Some(rest) => rest.rsplit_once(',').unwrap().0.to_owned(),
            None => concrete,
        };
        let result = prometheus.query(&promql).await.unwrap_or_else(|e| panic!("{panel}: {promql}: {e}"));
        assert!(!result.is_empty(), "{panel}: no data for {promql}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_names_the_zxid_of_the_write_it_applied() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let bin = Binary::start_with(&chroot, "5s", "[log]\nformat = \"json\"\n", &[]).await;
    zk.put("/zkroute/services/web/1", "10.0.0.1:80").await;
    let stat = zk.0.set_data("/zkroute/services/web/1", b"10.0.0.9:80", None).await.unwrap();
    let swaps = || -> Vec<serde_json::Value> {
        let lines = bin.log();
        let values = lines.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
        values.filter(|v| v["message"] == "routing table swapped").collect()
    };
    eventually("a swap with the write's zxid", Duration::from_secs(10), || async {
        swaps().iter().any(|v| v["zxid"].as_i64() == Some(stat.mzxid)).then_some(())
    })
    .await;
    assert!(swaps().iter().all(|v| v["zxid"].as_i64().is_some_and(|z| z <= stat.mzxid)), "{:?}", swaps());
    let metrics = String::from_utf8_lossy(get(bin.admin, "/metrics").await.unwrap().body()).into_owned();
    assert_eq!(metric_value(&metrics, "zkroute_table_zxid"), Some(stat.mzxid as f64), "{metrics}");

    // A deletion has no mzxid to report: its swap carries none, and the gauge stays.
    zk.delete("/zkroute/services/web/1").await;
    eventually("the deletion's swap", Duration::from_secs(10), || async {
        swaps().iter().any(|v| v["instances_removed"] == 1).then_some(())
    })
    .await;
    let deletion = swaps().into_iter().find(|v| v["instances_removed"] == 1).unwrap();
    assert!(deletion["zxid"].is_null(), "{deletion}");
    let metrics = String::from_utf8_lossy(get(bin.admin, "/metrics").await.unwrap().body()).into_owned();
    assert_eq!(metric_value(&metrics, "zkroute_table_zxid"), Some(stat.mzxid as f64));
}

/// `zkroute_connections{listener,state}` sees a client connection in each state: idle (connected
/// with nothing sent, and between keep-alive requests), reading_head (part of a head sent),
/// active (a request its upstream holds), tunnel (after a 101); and none once they all close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connections_gauge_shows_each_state() {
    let web = Backend::http("web").await;
    let hold = RawBackend::start(Misbehave::Hold).await;
    let routes = Routes::new();
    routes.instance("web", "1", web.addr);
    routes.instance("hold", "1", hold.addr);
    routes.rule("web", r#"{"listener":"http","backends":[{"service":"web"}]}"#);
    routes.rule(
        "hold",
        r#"{"listener":"http","priority":5,"match":{"path_prefix":"/hold"},"backends":[{"service":"hold"}]}"#,
    );
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let addr = proxy.listener("http");
    let states = |m: &str| {
        ["reading_head", "idle", "active", "tunnel"].map(|s| {
            metric_value(m, &format!(r#"zkroute_connections{{listener="http",state="{s}"}}"#)).map(|v| v as i64)
        })
    };

    let quiet = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut keep_alive = KeepAlive::connect(addr).await;
    let r = keep_alive.send(request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n").await.unwrap();
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nHost: h\r\n\r\n").await.unwrap();
    let mut ws = tokio::net::TcpStream::connect(addr).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));

    let want = [Some(1), Some(2), Some(1), Some(1)];
    eventually("each state counted", Duration::from_secs(5), || async {
        let m = proxy.metrics().await;
        (states(&m) == want).then_some(())
    })
    .await;
    drop((quiet, keep_alive, slow, held, ws));
    eventually("every connection uncounted", Duration::from_secs(5), || async {
        let m = proxy.metrics().await;
        (states(&m) == [Some(0); 4]).then_some(())
    })
    .await;
    proxy.stop().await;
}
