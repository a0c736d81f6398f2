#![allow(clippy::unwrap_used)]
//! The dashboard at the admin port's `/`, as headless Chromium shows it: services and their
//! instances' states, invalid nodes, and hostile names and documents shown as text.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// The visible text of each table row of a serialized DOM.
fn rows(dom: &str) -> Vec<String> {
    dom.split("<tr")
        .skip(1)
        .map(|r| browser::visible_text(&format!("<tr{}", r.split("</tr>").next().unwrap())))
        .collect()
}

fn row_with<'a>(rows: &'a [String], needle: &str) -> &'a str {
    rows.iter().find(|r| r.contains(needle)).unwrap_or_else(|| panic!("no row with {needle:?} in {rows:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_shows_the_services_the_instance_states_and_the_invalid_nodes() {
    let good = Backend::http("good").await;
    let bad = Backend::http("bad").await;
    let pay = Backend::http("pay").await;
    bad.state.force_status.store(500, Ordering::SeqCst);
    let routes = Routes::new();
    routes.instance("users", "good", good.addr);
    routes.instance("users", "bad", bad.addr);
    routes.instance("users", "broken", "nowhere");
    let curator = serde_json::json!({
        "name": "payments", "id": "p1", "address": "127.0.0.1", "port": pay.addr.port(), "payload": {"zone": "b"},
    });
    routes.instance("payments", "p1", curator);
    routes.policy("users", r#"{"outlier":{"consecutive_failures":2,"base_ejection":"60s","max_ejection_percent":50}}"#);
    routes.rule(
        "users-rule",
        r#"{"listener":"http","priority":10,"match":{"host":"users.internal"},"backends":[{"service":"users"}]}"#,
    );
    routes.rule("payments-rule", r#"{"listener":"http","backends":[{"service":"payments"}]}"#);
    let proxy = routes.proxy(HTTP_LISTENER).await;
    eventually("bad ejected", Duration::from_secs(10), || async {
        for _ in 0..5 {
            let _ = send(proxy.listener("http"), request("GET", "users.internal", "/", &[], "")).await;
        }
        let c = proxy.config().await;
        instances(&c, "users").iter().any(|i| i["id"] == "bad" && i["health"]["state"] == "ejected").then_some(())
    })
    .await;
    let r = send(proxy.listener("http"), request("GET", "shop", "/", &[], "")).await.unwrap();
    assert_eq!(who(&r), "pay");

    let url = format!("http://{}/", proxy.admin());
    let dom = browser::dump_dom(&url).await;
    let text = browser::visible_text(&dom);
    for shown in ["users", "payments", "users-rule", "payments-rule", "routes.toml#services.users.broken"] {
        assert!(text.contains(shown), "the page does not show {shown:?}:\n{text}");
    }
    assert!(
        text.contains(r#"plain instance: expected host:port, got "nowhere""#),
        "the invalid node's reason:\n{text}"
    );
    let rows = rows(&dom);
    let bad_row = row_with(&rows, &bad.addr.to_string());
    assert!(bad_row.starts_with("bad ") && bad_row.contains("ejected"), "{bad_row}");
    assert!(row_with(&rows, &good.addr.to_string()).contains("healthy"));
    let pay_row = row_with(&rows, &pay.addr.to_string());
    assert!(pay_row.contains("curator") && pay_row.contains("healthy"), "{pay_row}");
    // The traffic table counted the 500s, and the last swap is listed.
    assert!(
        rows.iter().any(|r| r.starts_with("users ") && r.contains(" 500 ")),
        "a traffic row for users with its 500s: {rows:#?}"
    );
    assert!(text.contains("Recent table swaps") && text.contains("+3 instances"), "{text}");

    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    browser::screenshot(&url, &png, 1280, 1400).await;
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000, "a screenshot of {} bytes", bytes.len());
    proxy.stop().await;
}

/// Markup that would change the page's title if it ran.
const HOSTILE_NAME: &str = "<img src=x onerror=\"document.title='pwned'\">";
const HOSTILE_DOC: &str = "<script>document.title='pwned'</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_node_names_and_documents_are_shown_as_text_and_run_nothing() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let web = Backend::http("web").await;
    let proxy = Proxy::with_zk(&chroot, HTTP_LISTENER).await;
    zk.put(&format!("/zkroute/services/{HOSTILE_NAME}/{HOSTILE_NAME}"), &web.addr.to_string()).await;
    zk.put("/zkroute/services/web/evil", HOSTILE_DOC).await;
    let curator = serde_json::json!({
        "name": "web", "id": "c1", "address": "127.0.0.1", "port": web.addr.port(),
        "payload": {"zone": HOSTILE_DOC, "metadata": {"version": HOSTILE_NAME}},
    });
    zk.put("/zkroute/services/web/c1", &curator.to_string()).await;
    let rule = serde_json::json!({
        "listener": "http",
        "match": {"headers": {"x-tenant": HOSTILE_DOC}},
        "backends": [{"service": HOSTILE_NAME, "subset": {"version": HOSTILE_NAME}}],
    });
    zk.put(&format!("/zkroute/rules/{HOSTILE_NAME}"), &rule.to_string()).await;
    proxy
        .config_until("every hostile node read", |c| {
            addresses(c, HOSTILE_NAME).len() == 1
                && addresses(c, "web").len() == 1
                && c["invalid"].as_array().is_some_and(|a| !a.is_empty())
                && c["rules"][HOSTILE_NAME]["in_force"].is_object()
        })
        .await;

    let dom = browser::dump_dom(&format!("http://{}/", proxy.admin())).await;
    assert!(dom.contains("<title>zkroute</title>"), "the title is untouched: nothing ran");
    // The page has no element of these kinds of its own: any here would have been injected.
    for tag in ["<img", "<script"] {
        assert!(!dom.contains(tag), "an element {tag} was injected into the page:\n{dom}");
    }
    let text = browser::visible_text(&dom);
    for (what, hostile) in [("a node name", HOSTILE_NAME), ("a document", HOSTILE_DOC)] {
        assert!(text.contains(hostile), "{what} is not shown as text: {hostile:?} in\n{text}");
    }
    assert!(text.contains(&format!("got \"{HOSTILE_DOC}\"")), "the invalid node's reason quotes it:\n{text}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_runs_no_script_loads_nothing_and_is_hidden_with_config() {
    let routes = Routes::new();
    routes.instance("users", "a", "127.0.0.1:1");
    let proxy = routes.proxy("").await;
    let r = get(proxy.admin(), "/").await.unwrap();
    assert_eq!(r.status(), 200);
    let h = |n: &str| r.headers()[n].to_str().unwrap().to_owned();
    assert_eq!(h("content-type"), "text/html; charset=utf-8");
    assert!(h("content-security-policy").starts_with("default-src 'none';"), "{}", h("content-security-policy"));
    let page = String::from_utf8_lossy(r.body());
    assert!(page.contains("Not following ZooKeeper: routes come from the static file"), "{page}");
    for external in ["src=", "<link", "@import", "url("] {
        assert!(!page.contains(external), "the page loads something ({external}):\n{page}");
    }
    proxy.stop().await;

    let proxy = Proxy::following(&routes, "config_endpoint = false\n").await;
    for path in ["/", "/config"] {
        assert_eq!(get(proxy.admin(), path).await.unwrap().status(), 404, "{path}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_lists_the_recent_swaps_with_what_each_changed() {
    let routes = Routes::new();
    routes.instance("users", "a", "127.0.0.1:1");
    let proxy = routes.proxy("").await;
    let c = proxy.config().await;
    assert_eq!(c["recent_swaps"][0]["version"], c["version"]);
    let first = c["version"].as_u64().unwrap();
    routes.instance("users", "b", "127.0.0.1:2");
    routes.instance("db", "x", "127.0.0.1:3");
    let c = proxy.config_until("both new instances", |c| routes.shown_in(c)).await;
    // The file source may have read the two edits at once or one by one: one swap or two.
    let swaps: Vec<&Value> =
        c["recent_swaps"].as_array().unwrap().iter().take_while(|s| s["version"].as_u64() > Some(first)).collect();
    assert_eq!(swaps[0]["version"], c["version"], "newest first");
    let count = |key: &str| swaps.iter().map(|s| s[key].as_u64().unwrap()).sum::<u64>();
    assert_eq!((count("instances_added"), count("instances_removed")), (2, 0));
    let services: BTreeSet<&str> =
        swaps.iter().flat_map(|s| s["services"].as_array().unwrap()).map(|s| s.as_str().unwrap()).collect();
    assert_eq!(services, BTreeSet::from(["db", "users"]));
    for s in &swaps {
        assert_eq!(s["health_only"], false);
        assert!(s["build_us"].is_u64() && s["at"].as_str().unwrap().ends_with('Z'));
    }
    proxy.stop().await;
}
