#![allow(clippy::unwrap_used)]
//! Health: active checks, outlier ejection, panic mode, protection from empty registries, and
//! state kept outside the table. Short intervals; every wait is a poll with a deadline. Routes come
//! from a static file (the documents ZooKeeper would hold).

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// A zkroute routing every request on listener `http` to service `s` without retries, with
/// `policy` and each backend as an instance (id = backend name), once its table holds them.
async fn setup(policy: &str, backends: &[&Backend]) -> (Routes, Proxy) {
    let routes = Routes::new();
    routes.policy("s", policy);
    routes.rule("r", r#"{"listener":"http","retries":0,"backends":[{"service":"s"}]}"#);
    routes.backends("s", backends);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let c = proxy.config().await;
    assert_eq!(addresses(&c, "s").len(), backends.len());
    assert!(!c["listeners"][0]["routes"].as_array().unwrap().is_empty());
    (routes, proxy)
}

/// Which backends answer `n` requests, by name.
async fn spread(proxy: &Proxy, n: usize) -> HashMap<String, usize> {
    let mut client = KeepAlive::connect(proxy.listener("http")).await;
    let mut seen = HashMap::new();
    for _ in 0..n {
        let r = client.send(request("GET", "h", "/", &[], "")).await.unwrap();
        *seen.entry(who(&r)).or_insert(0) += 1;
    }
    seen
}

fn instance<'a>(c: &'a Value, id: &str) -> &'a Value {
    instances(c, "s").into_iter().find(|i| i["id"] == id).unwrap()
}

const CHECKED: &str = r#"{"health_check":{"kind":"http","path":"/health","interval":"100ms","timeout":"500ms","healthy_threshold":2,"unhealthy_threshold":2}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_leaves_rotation_and_comes_back() {
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    let (_routes, proxy) = setup(CHECKED, &[&a, &b]).await;
    proxy
        .config_until("both checked healthy", |c| instances(c, "s").iter().all(|i| i["health"]["health"] == "healthy"))
        .await;
    assert_eq!(spread(&proxy, 40).await.len(), 2);

    a.set_healthy(false);
    let c = proxy.config_until("a unhealthy", |c| instance(c, "a")["health"]["state"] == "unhealthy").await;
    assert_eq!(instance(&c, "a")["health"]["last_check"]["detail"], "HTTP 503");
    assert_eq!(spread(&proxy, 40).await, HashMap::from([("b".to_owned(), 40)]));
    assert!(proxy.metric(r#"zkroute_health_checks_total{result="unhealthy",service="s"}"#).await.unwrap() >= 2.0);
    assert_eq!(proxy.metric(r#"zkroute_backends{service="s",state="unhealthy"}"#).await, Some(1.0));

    a.set_healthy(true);
    proxy.config_until("a healthy again", |c| instance(c, "a")["health"]["state"] == "healthy").await;
    assert_eq!(spread(&proxy, 40).await.len(), 2);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_takes_traffic_only_after_its_first_passing_check() {
    let a = Backend::http("a").await;
    // An instance whose health endpoint never answers: its first check cannot finish for 30s.
    let unproven = RawBackend::start(Misbehave::Hold).await;
    let routes = Routes::new();
    routes.policy("s", r#"{"health_check":{"kind":"http","path":"/health","interval":"100ms","timeout":"30s"}}"#);
    routes.rule("r", r#"{"listener":"http","retries":0,"backends":[{"service":"s"}]}"#);
    routes.backends("s", &[&a]);
    routes.instance("s", "unproven", unproven.addr);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let c = proxy
        .config_until("a checked, the other still unproven", |c| {
            addresses(c, "s").len() == 2 && instance(c, "a")["health"]["state"] == "healthy"
        })
        .await;
    assert_eq!(instance(&c, "unproven")["health"]["health"], "unknown");
    assert_eq!(instance(&c, "unproven")["health"]["state"], "unhealthy", "unproven: no traffic");
    assert_eq!(spread(&proxy, 20).await, HashMap::from([("a".to_owned(), 20)]));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_check_against_a_closed_port_fails() {
    let a = Backend::http("a").await;
    let routes = Routes::new();
    routes.policy("s", r#"{"health_check":{"kind":"tcp","interval":"100ms","timeout":"300ms"}}"#);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    routes.backends("s", &[&a]);
    routes.instance("s", "closed", refused_addr());
    let proxy = routes.proxy(HTTP_LISTENER).await;
    let c = proxy
        .config_until("the closed port judged", |c| {
            addresses(c, "s").len() == 2 && instance(c, "closed")["health"]["health"] == "unhealthy"
        })
        .await;
    assert!(instance(&c, "closed")["health"]["last_check"]["detail"].as_str().unwrap().starts_with("connect"));
    proxy.config_until("a healthy", |c| instance(c, "a")["health"]["state"] == "healthy").await;
    assert_eq!(spread(&proxy, 20).await, HashMap::from([("a".to_owned(), 20)]));
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_stop_when_the_instance_goes() {
    let a = Backend::http("a").await;
    let (routes, proxy) = setup(CHECKED, &[&a]).await;
    eventually("checks running", Duration::from_secs(5), || async { (a.health_checks() >= 3).then_some(()) }).await;
    routes.remove_instance("s", "a");
    proxy.config_until("the instance gone", |c| addresses(c, "s").is_empty()).await;
    let after = a.health_checks();
    // Five intervals with no event to poll for: the absence of checks is the thing tested.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(a.health_checks() <= after + 1, "checks continued: {} -> {}", after, a.health_checks());
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_keep_running_when_the_rules_change() {
    // A rule change rebuilds every listener's routes, and the checker then looks at every
    // service: the loops it keeps must keep running.
    let a = Backend::http("a").await;
    let (routes, proxy) = setup(CHECKED, &[&a]).await;
    eventually("checks running", Duration::from_secs(5), || async { (a.health_checks() >= 2).then_some(()) }).await;
    routes.rule("other", r#"{"listener":"http","match":{"path_prefix":"/other"},"backends":[{"service":"s"}]}"#);
    proxy.config_until("the second rule", |c| c["rules"]["other"]["in_force"].is_object()).await;
    let after = a.health_checks();
    eventually("checks after the rule change", Duration::from_secs(5), || async {
        (a.health_checks() >= after + 3).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_answering_5xx_is_ejected_and_returns_after_its_ejection() {
    let bad = Backend::http("bad").await;
    let good = Backend::http("good").await;
    let (_routes, proxy) = setup(
        r#"{"outlier":{"consecutive_failures":3,"base_ejection":"600ms","max_ejection_percent":50}}"#,
        &[&bad, &good],
    )
    .await;
    bad.state.force_status.store(500, std::sync::atomic::Ordering::SeqCst);
    // Send until three 5xx in a row from `bad` eject it.
    let c = eventually("bad ejected", Duration::from_secs(10), || async {
        let _ = spread(&proxy, 5).await;
        let c = proxy.config().await;
        (instance(&c, "bad")["health"]["state"] == "ejected").then_some(c)
    })
    .await;
    assert!(instance(&c, "bad")["health"]["ejected_until"].is_string());
    assert_eq!(instance(&c, "bad")["health"]["ejections"], 1);
    let seen = spread(&proxy, 30).await;
    assert_eq!(seen.get("bad"), None, "ejected: no traffic ({seen:?})");
    assert_eq!(proxy.metric(r#"zkroute_backends{service="s",state="ejected"}"#).await, Some(1.0));
    bad.state.force_status.store(0, std::sync::atomic::Ordering::SeqCst);
    proxy.config_until("bad back after its ejection", |c| instance(c, "bad")["health"]["state"] == "healthy").await;
    let seen = spread(&proxy, 40).await;
    assert!(seen.get("bad").copied().unwrap_or(0) > 0, "back in rotation ({seen:?})");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_more_than_the_configured_share_is_ejected() {
    let backends: Vec<Backend> = futures_join(["a", "b", "c", "d"]).await;
    for b in &backends {
        b.state.force_status.store(503, std::sync::atomic::Ordering::SeqCst);
    }
    let refs: Vec<&Backend> = backends.iter().collect();
    let (_routes, proxy) =
        setup(r#"{"outlier":{"consecutive_failures":2,"base_ejection":"30s","max_ejection_percent":50}}"#, &refs).await;
    for _ in 0..10 {
        let _ = spread(&proxy, 20).await;
    }
    let c = proxy.config().await;
    let ejected = instances(&c, "s").iter().filter(|i| i["health"]["state"] == "ejected").count();
    assert_eq!(ejected, 2, "half of four, and no more");
    proxy.stop().await;
}

async fn futures_join(names: [&str; 4]) -> Vec<Backend> {
    let mut v = Vec::new();
    for n in names {
        v.push(Backend::http(n).await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_spreads_over_every_instance_and_disengages() {
    let backends = futures_join(["a", "b", "c", "d"]).await;
    let refs: Vec<&Backend> = backends.iter().collect();
    let (_routes, proxy) = setup(
        r#"{"panic_threshold_percent":50,"health_check":{"kind":"http","interval":"100ms","timeout":"500ms","healthy_threshold":1,"unhealthy_threshold":1}}"#,
        &refs,
    )
    .await;
    proxy.config_until("all healthy", |c| instances(c, "s").iter().all(|i| i["health"]["state"] == "healthy")).await;
    // Three of four fail: 25% healthy is below 50%.
    for b in &backends[1..] {
        b.set_healthy(false);
    }
    let c = proxy.config_until("panic", |c| c["services"]["s"]["panic"] == true).await;
    assert_eq!(instances(&c, "s").iter().filter(|i| i["health"]["state"] == "unhealthy").count(), 3);
    let seen = spread(&proxy, 80).await;
    assert_eq!(seen.len(), 4, "traffic over all instances, not crushing the one healthy: {seen:?}");
    for b in &backends[1..] {
        b.set_healthy(true);
    }
    proxy.config_until("panic over", |c| c["services"]["s"]["panic"] == false).await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protect_from_empty_keeps_traffic_flowing_when_every_node_vanishes() {
    for protect in [true, false] {
        let a = Backend::http("a").await;
        let b = Backend::http("b").await;
        let (routes, proxy) = setup(&format!(r#"{{"protect_from_empty":{protect}}}"#), &[&a, &b]).await;
        assert_eq!(spread(&proxy, 10).await.values().sum::<usize>(), 10);
        // One by one, as a registry's expiring sessions delete them.
        routes.remove_instance("s", "a");
        routes.remove_instance("s", "b");
        if protect {
            let c = proxy.config_until("protected", |c| c["services"]["s"]["protected"] == true).await;
            assert_eq!(addresses(&c, "s").len(), 2, "the last instances are kept");
            let seen = spread(&proxy, 20).await;
            assert_eq!(seen.values().sum::<usize>(), 20);
            assert!(seen.keys().all(|k| k == "a" || k == "b"), "{seen:?}");
        } else {
            proxy.config_until("emptied", |c| addresses(c, "s").is_empty()).await;
            let r = send(proxy.listener("http"), request("GET", "h", "/", &[], "")).await.unwrap();
            assert_eq!((r.status().as_u16(), who(&r)), (503, "error:no_healthy_upstream".to_owned()));
        }
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_state_survives_delete_and_recreate_of_the_node() {
    let bad = Backend::http("bad").await;
    let good = Backend::http("good").await;
    let (routes, proxy) = setup(
        r#"{"outlier":{"consecutive_failures":2,"base_ejection":"60s","max_ejection_percent":50}}"#,
        &[&bad, &good],
    )
    .await;
    bad.state.force_status.store(500, std::sync::atomic::Ordering::SeqCst);
    let before = eventually("bad ejected", Duration::from_secs(10), || async {
        let _ = spread(&proxy, 5).await;
        let c = proxy.config().await;
        instance(&c, "bad")["health"]["ejected_until"].as_str().map(str::to_owned)
    })
    .await;
    // Curator re-registers by deleting the node and creating it again, here under a new id.
    routes.remove_instance("s", "bad");
    proxy.config_until("deleted", |c| addresses(c, "s").len() == 1).await;
    routes.instance("s", "bad-again", bad.addr);
    let c = proxy.config_until("re-created", |c| addresses(c, "s").len() == 2).await;
    let again = instance(&c, "bad-again");
    assert_eq!(again["health"]["state"], "ejected", "the ejection is kept");
    assert_eq!(again["health"]["ejected_until"].as_str(), Some(before.as_str()));
    assert_eq!(spread(&proxy, 20).await.get("bad"), None);
    proxy.stop().await;
}
