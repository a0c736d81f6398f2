#![allow(clippy::unwrap_used)]
//! Zone-aware routing end to end (README: "Zone-aware routing"): a zkroute in zone `a` in front
//! of real backends in zones `a` and `b` (Curator documents with `payload.zone`, from a static
//! routes file), health from real active checks, answers counted per backend.

mod support;

use std::collections::BTreeMap;

use serde_json::Value;
use support::*;

/// Health checks every 50 ms that take an endpoint out at its first failure and back at its first
/// pass; endpoints take traffic before their first check.
const CHECKED: &str = r#""health_check":{"kind":"http","path":"/health","interval":"50ms","timeout":"1s",
    "healthy_threshold":1,"unhealthy_threshold":1,"initially_healthy":true}"#;

/// A Curator instance document for `b`, in `zone` (None: no zone).
fn curator(b: &Backend, zone: Option<&str>) -> String {
    let payload = zone.map_or("null".to_owned(), |z| format!(r#"{{"zone":"{z}"}}"#));
    format!(r#"{{"name":"s","id":"{}","address":"127.0.0.1","port":{},"payload":{payload}}}"#, b.name, b.addr.port())
}

/// A zkroute in zone `a` (`proxy.zone`) whose listener `http` sends everything to service `s`:
/// `members` with their zones, under `policy`.
async fn zoned(members: &[(&Backend, Option<&str>)], policy: &str) -> (Routes, Proxy) {
    let routes = Routes::new();
    for (b, zone) in members {
        routes.instance("s", &b.name, curator(b, *zone));
    }
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"s"}]}"#);
    routes.policy("s", policy);
    let proxy = routes.proxy(&format!("[proxy]\nzone = \"a\"\n{HTTP_LISTENER}")).await;
    (routes, proxy)
}

/// `n` GETs of `path` on one keep-alive connection: answers per backend.
async fn spread(proxy: &Proxy, n: usize, path: &str) -> BTreeMap<String, usize> {
    let mut conn = KeepAlive::connect(proxy.listener("http")).await;
    let mut seen = BTreeMap::new();
    for _ in 0..n {
        let r = conn.send(request("GET", "s", path, &[], "")).await.unwrap();
        *seen.entry(who(&r)).or_insert(0) += 1;
    }
    seen
}

fn count(seen: &BTreeMap<String, usize>, names: &[&str]) -> usize {
    names.iter().map(|n| seen.get(*n).copied().unwrap_or(0)).sum()
}

/// The service's zone split as `/config` shows it, once `check` holds for it.
async fn split_until(proxy: &Proxy, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let config = proxy.config_until(what, |c| check(&c["services"]["s"]["zone_split"])).await;
    config["services"]["s"]["zone_split"].clone()
}

const CROSS_ZONE: &str = r#"zkroute_cross_zone_requests_total{service="s"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_traffic_stays_in_the_local_zone_while_it_is_healthy() {
    let (a1, a2, b1, b2) =
        (Backend::http("a1").await, Backend::http("a2").await, Backend::http("b1").await, Backend::http("b2").await);
    let members = [(&a1, Some("a")), (&a2, Some("a")), (&b1, Some("b")), (&b2, Some("b"))];
    let (_routes, proxy) = zoned(&members, &format!("{{{CHECKED}}}")).await;
    let split = split_until(&proxy, "the zone split", |z| z["local_total"] == 2).await;
    assert_eq!(split["local_share_percent"], 100.0, "{split}");
    let seen = spread(&proxy, 300, "/").await;
    assert_eq!(count(&seen, &["a1", "a2"]), 300, "every answer from zone a: {seen:?}");
    assert!(count(&seen, &["a1"]) > 50 && count(&seen, &["a2"]) > 50, "both local endpoints share: {seen:?}");
    assert_eq!(b1.requests() + b2.requests(), 0, "zone b saw nothing");
    assert_eq!(proxy.metric(CROSS_ZONE).await.unwrap_or(0.0), 0.0);
    let config = proxy.config().await;
    let zones = &config["services"]["s"]["zones"];
    assert_eq!((zones["a"]["instances"].as_u64(), zones["b"]["healthy"].as_u64()), (Some(2), Some(2)), "{zones}");
    assert_eq!(config["services"]["s"]["policy"]["zone_aware"], true, "on by default with proxy.zone");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_spills_over_in_proportion_when_the_local_zone_loses_instances() {
    let mut local = Vec::new();
    for name in ["a1", "a2", "a3", "a4"] {
        local.push(Backend::http(name).await);
    }
    let (b1, b2) = (Backend::http("b1").await, Backend::http("b2").await);
    let mut members: Vec<(&Backend, Option<&str>)> = local.iter().map(|b| (b, Some("a"))).collect();
    members.extend([(&b1, Some("b")), (&b2, Some("b"))]);
    // No panic mode: it would spread over every zone once zone a is down (README: "Health").
    let (_routes, proxy) = zoned(&members, &format!(r#"{{{CHECKED},"panic_threshold_percent":0}}"#)).await;
    split_until(&proxy, "four healthy in zone a", |z| z["local_healthy"] == 4).await;

    // Half of zone a fails its checks: 50% healthy against the 70% threshold keeps 50/70 of the
    // requests local and sends (70 - 50)/70 = 2/7 to zone b.
    local[0].set_healthy(false);
    local[1].set_healthy(false);
    let split = split_until(&proxy, "two healthy in zone a", |z| z["local_healthy"] == 2).await;
    assert_eq!(split["local_share_percent"], 71.42, "{split}");
    let (a1_before, a2_before) = (local[0].requests(), local[1].requests());
    let n = 700;
    let seen = spread(&proxy, n, "/").await;
    let elsewhere = count(&seen, &["b1", "b2"]);
    // Binomial(700, 2/7): mean 200, standard deviation 12; 5 deviations either side.
    assert!((140..=260).contains(&elsewhere), "about 200 of 700 to zone b, got {elsewhere}: {seen:?}");
    assert_eq!(count(&seen, &["a3", "a4"]) + elsewhere, n, "the unhealthy ones took nothing: {seen:?}");
    assert_eq!((local[0].requests(), local[1].requests()), (a1_before, a2_before));
    assert_eq!(proxy.metric(CROSS_ZONE).await, Some(elsewhere as f64), "each cross-zone answer counted");

    // Zone a recovers: everything stays local again.
    local[0].set_healthy(true);
    local[1].set_healthy(true);
    let split = split_until(&proxy, "zone a healthy again", |z| z["local_healthy"] == 4).await;
    assert_eq!(split["local_share_percent"], 100.0);
    let seen = spread(&proxy, 200, "/").await;
    assert_eq!(count(&seen, &["a1", "a2", "a3", "a4"]), 200, "{seen:?}");

    // The whole zone fails: everything leaves it.
    for b in &local {
        b.set_healthy(false);
    }
    split_until(&proxy, "zone a down", |z| z["local_healthy"] == 0).await;
    let seen = spread(&proxy, 100, "/").await;
    assert_eq!(count(&seen, &["b1", "b2"]), 100, "{seen:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zone_aware_false_spreads_over_every_zone() {
    let (a1, b1, b2) = (Backend::http("a1").await, Backend::http("b1").await, Backend::http("b2").await);
    let members = [(&a1, Some("a")), (&b1, Some("b")), (&b2, Some("b"))];
    let (_routes, proxy) = zoned(&members, r#"{"zone_aware":false}"#).await;
    let config = proxy.config().await;
    assert_eq!(config["services"]["s"]["policy"]["zone_aware"], false);
    assert!(config["services"]["s"]["zone_split"].is_null(), "no split when off");
    let seen = spread(&proxy, 300, "/").await;
    let elsewhere = count(&seen, &["b1", "b2"]);
    // Binomial(300, 2/3): mean 200, standard deviation 8.2.
    assert!((150..=250).contains(&elsewhere), "zone b takes its share, about 200 of 300: {seen:?}");
    assert_eq!(proxy.metric(CROSS_ZONE).await, Some(elsewhere as f64), "counted even when off");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_without_a_zone_are_elsewhere_and_a_service_without_local_ones_ignores_zones() {
    let (a1, n1, n2) = (Backend::http("a1").await, Backend::http("n1").await, Backend::http("n2").await);
    let (_routes, proxy) = zoned(&[(&a1, Some("a")), (&n1, None), (&n2, None)], &format!("{{{CHECKED}}}")).await;
    let seen = spread(&proxy, 100, "/").await;
    assert_eq!(count(&seen, &["a1"]), 100, "zone a healthy: the zoneless ones take nothing: {seen:?}");
    // The local endpoint fails: the zoneless ones are where the requests spill to.
    a1.set_healthy(false);
    split_until(&proxy, "zone a down", |z| z["local_healthy"] == 0).await;
    let seen = spread(&proxy, 100, "/").await;
    assert_eq!(count(&seen, &["n1", "n2"]), 100, "{seen:?}");
    proxy.stop().await;

    // No instance in zone a at all: routing as without zones, every instance takes a share.
    let (b1, n3) = (Backend::http("b1").await, Backend::http("n3").await);
    let (_routes, proxy) = zoned(&[(&b1, Some("b")), (&n3, None)], "{}").await;
    let config = proxy.config().await;
    assert!(config["services"]["s"]["zone_split"].is_null(), "{}", config["services"]["s"]);
    let seen = spread(&proxy, 200, "/").await;
    assert!(count(&seen, &["b1"]) > 50 && count(&seen, &["n3"]) > 50, "{seen:?}");
    proxy.stop().await;
}
