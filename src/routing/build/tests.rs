//! Table builder tests from in-memory documents.

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Method};

use super::*;
use crate::discovery::{instance_change, policy_change, rule_change};
use crate::endpoint::Health;
use crate::metrics::Metrics;
use crate::routing::table;
use crate::routing::table::Protocol;

fn raw(path: &str, version: i32, data: &str) -> RawNode {
    RawNode {
        origin: Origin {
            source: SourceKind::Zookeeper,
            path: path.into(),
            mzxid: Some(version.into()),
            version: Some(version),
        },
        data: data.as_bytes().to_vec(),
    }
}

fn listeners() -> Vec<ListenerSpec> {
    vec![
        ListenerSpec { name: "http".into(), protocol: Protocol::Http, service: None, endpoint: None },
        ListenerSpec {
            name: "tcp".into(),
            protocol: Protocol::Tcp,
            service: Some(ServiceName::new("db")),
            endpoint: None,
        },
    ]
}

fn builder() -> Builder {
    let mut b = Builder::new(
        listeners(),
        Defaults::default(),
        Arc::new(StateRegistry::new(Duration::from_secs(30))),
        Arc::new(Metrics::new(true)),
    );
    b.apply(Change::Resync(Resync {
        source: SourceKind::Zookeeper,
        instances: vec![],
        rules: vec![],
        policies: vec![],
    }));
    b
}

fn instance(b: &mut Builder, service: &str, id: &str, data: &str) {
    let path = format!("/s/{service}/{id}");
    b.apply(instance_change(ServiceName::new(service), id, Some(raw(&path, 1, data))));
}

fn rule(b: &mut Builder, id: &str, version: i32, data: &str) {
    b.apply(rule_change(id, Some(raw(&format!("/r/{id}"), version, data))));
}

fn route_id(t: &RoutingTable, host: &str, path: &str, method: Method, headers: &HeaderMap) -> Option<String> {
    t.listener(0)?.route(Some(host), path, &method, headers).map(|r| r.id.to_string())
}

#[test]
fn documents_build_a_table_with_every_service_rule_and_endpoint() {
    let mut b = builder();
    instance(&mut b, "users", "a", "10.0.0.1:80");
    instance(&mut b, "users", "b", r#"{"address":"10.0.0.2","port":80,"payload":{"metadata":{"version":"v2"}}}"#);
    instance(&mut b, "db", "x", r#"{"host":"10.0.1.1","port":5432}"#);
    rule(&mut b, "r1", 1, r#"{"listener":"http","backends":[{"service":"users"}]}"#);
    let (t, delta) = b.build();
    assert_eq!(t.version, 1);
    assert_eq!(delta.instances_added, 3);
    assert_eq!(delta.rules_added, 1);
    let users = t.service("users").unwrap();
    assert_eq!(users.instances.len(), 2);
    assert_eq!(users.all.available.len(), 2);
    assert_eq!(route_id(&t, "any", "/", Method::GET, &HeaderMap::new()).as_deref(), Some("r1"));
    // The tcp listener's own service route.
    let tcp = t.listener(1).unwrap();
    assert_eq!(&*tcp.first().unwrap().id, "listener:tcp");
    assert_eq!(tcp.first().unwrap().targets[0].set.endpoints[0].addr.to_string(), "10.0.1.1:5432");
}

#[test]
fn matchers_and_priorities_pick_the_first_matching_rule() {
    let mut b = builder();
    instance(&mut b, "a", "1", "10.0.0.1:80");
    rule(&mut b, "catchall", 1, r#"{"listener":"http","priority":-1,"backends":[{"service":"a"}]}"#);
    rule(&mut b, "exact", 1, r#"{"listener":"http","match":{"host":"Api.Example.com"},"backends":[{"service":"a"}]}"#);
    rule(&mut b, "wild", 1, r#"{"listener":"http","match":{"host":"*.example.com"},"backends":[{"service":"a"}]}"#);
    rule(
        &mut b,
        "v1",
        1,
        r#"{"listener":"http","priority":10,"match":{"host":"api.example.com","path_prefix":"/v1/"},"backends":[{"service":"a"}]}"#,
    );
    rule(
        &mut b,
        "post",
        1,
        r#"{"listener":"http","priority":10,"match":{"method":"POST"},"backends":[{"service":"a"}]}"#,
    );
    rule(
        &mut b,
        "canary",
        1,
        r#"{"listener":"http","priority":20,"match":{"headers":{"x-canary":"true"}},"backends":[{"service":"a"}]}"#,
    );
    rule(
        &mut b,
        "b-same-prio",
        1,
        r#"{"listener":"http","priority":10,"match":{"path_prefix":"/same"},"backends":[{"service":"a"}]}"#,
    );
    rule(
        &mut b,
        "a-same-prio",
        1,
        r#"{"listener":"http","priority":10,"match":{"path_prefix":"/same"},"backends":[{"service":"a"}]}"#,
    );
    let (t, _) = b.build();
    let none = HeaderMap::new();
    let r = |host: &str, path: &str, m: Method, h: &HeaderMap| route_id(&t, host, path, m, h);
    assert_eq!(r("api.example.com:8080", "/v1/users", Method::GET, &none).as_deref(), Some("v1"));
    assert_eq!(r("API.EXAMPLE.COM", "/v2", Method::GET, &none).as_deref(), Some("exact"));
    assert_eq!(r("x.y.example.com", "/", Method::GET, &none).as_deref(), Some("wild"));
    assert_eq!(r("example.com", "/", Method::GET, &none).as_deref(), Some("catchall"), "*. needs a subdomain");
    assert_eq!(r("other", "/", Method::POST, &none).as_deref(), Some("post"));
    assert_eq!(r("other", "/same/x", Method::GET, &none).as_deref(), Some("a-same-prio"), "equal priority: by id");
    assert_eq!(r("other", "/v1x", Method::GET, &none).as_deref(), Some("catchall"));
    let mut canary = HeaderMap::new();
    canary.append("x-canary", HeaderValue::from_static("false"));
    canary.append("x-canary", HeaderValue::from_static("true"));
    assert_eq!(r("api.example.com", "/v1/", Method::POST, &canary).as_deref(), Some("canary"));
    let mut wrong = HeaderMap::new();
    wrong.insert("x-canary", HeaderValue::from_static("TRUE"));
    assert_eq!(r("other", "/", Method::GET, &wrong).as_deref(), Some("catchall"), "header values are exact");
}

#[test]
fn an_invalid_instance_is_skipped_and_everything_else_builds() {
    let mut b = builder();
    instance(&mut b, "users", "good", "10.0.0.1:80");
    instance(&mut b, "users", "bad", r#"{"address":"10.0.0.2","port":99999}"#);
    instance(&mut b, "users", "garbage", "!!!");
    instance(&mut b, "other", "x", "10.0.0.9:80");
    let (t, _) = b.build();
    assert_eq!(t.service("users").unwrap().instances.len(), 1);
    assert_eq!(t.service("other").unwrap().instances.len(), 1);
    assert_eq!(t.invalid_count(NodeKind::Instance), 2);
    assert!(t.invalid.iter().any(|n| n.path == "/s/users/bad" && n.reason.contains("port")));
    // Fixing the node clears it.
    instance(&mut b, "users", "bad", r#"{"address":"10.0.0.2","port":81}"#);
    let (t, _) = b.build();
    assert_eq!(t.service("users").unwrap().instances.len(), 2);
    assert_eq!(t.invalid_count(NodeKind::Instance), 1);
    // Deleting the other invalid one clears it too.
    b.apply(instance_change(ServiceName::new("users"), "garbage", None));
    let (t, _) = b.build();
    assert_eq!(t.invalid_count(NodeKind::Instance), 0);
}

#[test]
fn a_bad_rule_version_keeps_the_previous_one_in_force() {
    let mut b = builder();
    instance(&mut b, "a", "1", "10.0.0.1:80");
    instance(&mut b, "b", "1", "10.0.0.2:80");
    rule(&mut b, "r", 1, r#"{"listener":"http","backends":[{"service":"a"}]}"#);
    rule(&mut b, "other", 1, r#"{"listener":"http","match":{"path_prefix":"/o"},"backends":[{"service":"b"}]}"#);
    let (t, _) = b.build();
    assert_eq!(t.listener(0).unwrap().routes.len(), 2);
    rule(&mut b, "r", 2, r#"{"listener":"http","backends":[]}"#);
    let (t, _) = b.build();
    let status = &t.rules["r"];
    assert!(status.rejected.as_ref().unwrap().reason.contains("backends"));
    assert_eq!(status.active.as_ref().unwrap().1.version, Some(1), "version 1 stays in force");
    assert_eq!(t.listener(0).unwrap().routes.len(), 2);
    assert_eq!(t.invalid_count(NodeKind::Rule), 1);
    assert!(t.invalid[0].previous_in_force);
    // A good version 3 replaces it; deleting removes it.
    rule(&mut b, "r", 3, r#"{"listener":"http","backends":[{"service":"b"}]}"#);
    let (t, _) = b.build();
    assert_eq!(t.invalid_count(NodeKind::Rule), 0);
    let r = t.listener(0).unwrap().route(None, "/", &Method::GET, &HeaderMap::new()).unwrap();
    assert_eq!(r.targets[0].set.label.as_ref(), "b");
    b.apply(rule_change("r", None));
    let (t, _) = b.build();
    assert_eq!(t.listener(0).unwrap().routes.len(), 1);
    assert!(!t.rules.contains_key("r"));
}

#[test]
fn a_new_rule_that_is_invalid_is_not_in_force() {
    let mut b = builder();
    rule(&mut b, "r", 1, r#"{"listener":"http","backends":[{"service":"a","weight":-3}]}"#);
    let (t, _) = b.build();
    assert!(t.rules["r"].active.is_none());
    assert!(!t.invalid[0].previous_in_force);
    assert!(t.listener(0).unwrap().routes.is_empty());
}

#[test]
fn tcp_listeners_refuse_rules_with_a_match() {
    let mut b = builder();
    rule(&mut b, "t", 1, r#"{"listener":"tcp","match":{"path_prefix":"/"},"backends":[{"service":"db"}]}"#);
    let (t, _) = b.build();
    assert!(t.rules["t"].rejected.as_ref().unwrap().reason.contains("tcp listener"));
}

#[test]
fn a_change_to_one_service_leaves_the_others_shared() {
    let mut b = builder();
    for s in 0..50 {
        for i in 0..3 {
            instance(&mut b, &format!("s{s}"), &format!("i{i}"), &format!("10.0.{s}.{i}:80"));
        }
    }
    let (t1, _) = b.build();
    instance(&mut b, "s7", "i9", "10.0.7.9:80");
    assert!(b.dirty_services.len() == 1 && !b.dirty_all);
    let (t2, delta) = b.build();
    assert_eq!(delta.services.iter().map(|s| s.as_str()).collect::<Vec<_>>(), ["s7"]);
    for (name, entry) in t2.services.iter() {
        let same = Arc::ptr_eq(entry, t1.services.get(name.as_str()).unwrap());
        assert_eq!(same, name.as_str() != "s7", "{name}");
    }
    assert_eq!(t2.service("s7").unwrap().instances.len(), 4);
}

#[test]
fn endpoint_state_is_shared_across_builds_and_delete_recreate() {
    let mut b = builder();
    instance(&mut b, "a", "1", "10.0.0.1:80");
    let (t1, _) = b.build();
    let s1 = t1.service("a").unwrap().all.endpoints[0].state.clone();
    s1.set_health(Health::Unhealthy);
    b.apply(instance_change(ServiceName::new("a"), "1", None));
    let (t2, _) = b.build();
    assert!(t2.service("a").is_none());
    // Curator re-registers under a new node id: same address, same state.
    instance(&mut b, "a", "2", "10.0.0.1:80");
    let (t3, _) = b.build();
    let s3 = &t3.service("a").unwrap().all.endpoints[0].state;
    assert!(Arc::ptr_eq(&s1, s3));
    assert_eq!(t3.service("a").unwrap().all.available.len(), 0, "still unhealthy");
}

#[test]
fn subsets_and_named_endpoints_narrow_a_service() {
    let mut b = builder();
    instance(&mut b, "u", "1", r#"{"address":"10.0.0.1","port":80,"payload":{"metadata":{"version":"v1"}}}"#);
    instance(&mut b, "u", "2", r#"{"address":"10.0.0.2","port":80,"payload":{"metadata":{"version":"v2"}}}"#);
    instance(
        &mut b,
        "u",
        "3",
        r#"{"serviceEndpoint":{"host":"10.0.0.3","port":9000},"additionalEndpoints":{"http":{"host":"10.0.0.3","port":8080}}}"#,
    );
    rule(
        &mut b,
        "r",
        1,
        r#"{"listener":"http","backends":[{"service":"u","subset":{"version":"v2"},"weight":5},{"service":"u","endpoint":"http","weight":5},{"address":"192.168.1.7:8080","weight":0}]}"#,
    );
    let (t, _) = b.build();
    let r = t.listener(0).unwrap().first().unwrap();
    let addrs = |i: usize| r.targets[i].set.endpoints.iter().map(|e| e.addr.to_string()).collect::<Vec<_>>();
    assert_eq!(addrs(0), ["10.0.0.2:80"]);
    assert_eq!(addrs(1), ["10.0.0.3:8080"]);
    assert_eq!(addrs(2), ["192.168.1.7:8080"]);
    // Weight 0 never chosen; weights 5/5 split by position.
    assert_eq!(r.target_at(0).unwrap().0, 0);
    assert_eq!(r.target_at(5).unwrap().0, 1);
    assert_eq!(r.target_at(9).unwrap().0, 1);
}

#[test]
fn weights_draining_and_health_shape_the_available_list() {
    let mut b = builder();
    instance(&mut b, "u", "1", r#"{"host":"10.0.0.1","port":80,"weight":10}"#);
    instance(&mut b, "u", "2", r#"{"host":"10.0.0.2","port":80,"weight":0}"#);
    instance(&mut b, "u", "3", r#"{"address":"10.0.0.3","port":80,"enabled":false}"#);
    instance(&mut b, "u", "4", r#"{"host":"10.0.0.4","port":80,"weight":30}"#);
    let (t, _) = b.build();
    let set = &t.service("u").unwrap().all;
    assert_eq!(set.available.len(), 2);
    assert_eq!(set.available.total_weight(), 40);
    let at = |p| set.endpoints[set.available.at(p).unwrap()].addr.to_string();
    assert_eq!(at(0), "10.0.0.1:80");
    assert_eq!(at(9), "10.0.0.1:80");
    assert_eq!(at(10), "10.0.0.4:80");
    assert_eq!(at(39), "10.0.0.4:80");
    // An unhealthy endpoint leaves the list at the next build; below 50% healthy is panic.
    set.endpoints[3].state.set_health(Health::Unhealthy);
    b.apply(Change::Health(vec![ServiceName::new("u")]));
    let (t, _) = b.build();
    let set = &t.service("u").unwrap().all;
    assert_eq!(set.available.len(), 1);
    assert!(!set.panic, "1 of 2 is 50%: not below the threshold");
    set.endpoints[0].state.set_health(Health::Unhealthy);
    b.apply(Change::Health(vec![ServiceName::new("u")]));
    let (t, _) = b.build();
    let set = &t.service("u").unwrap().all;
    assert!(set.panic);
    assert_eq!(set.active().len(), 2, "panic mode spreads over every non-draining endpoint");
}

#[test]
fn protect_from_empty_keeps_the_last_instances() {
    let mut b = builder();
    b.apply(policy_change(ServiceName::new("u"), Some(raw("/p/u", 1, r#"{"protect_from_empty":true}"#))));
    instance(&mut b, "u", "1", "10.0.0.1:80");
    instance(&mut b, "u", "2", "10.0.0.2:80");
    instance(&mut b, "v", "1", "10.0.1.1:80");
    let _ = b.build();
    for id in ["1", "2"] {
        b.apply(instance_change(ServiceName::new("u"), id, None));
    }
    b.apply(instance_change(ServiceName::new("v"), "1", None));
    let (t, _) = b.build();
    let u = t.service("u").unwrap();
    assert!(u.protected);
    assert_eq!(u.all.available.len(), 2);
    assert!(t.service("v").is_none(), "unprotected services empty out");
    // Health checks failing them ends the protection.
    for e in u.all.endpoints.iter() {
        e.state.set_health(Health::Unhealthy);
    }
    b.apply(Change::Health(vec![ServiceName::new("u")]));
    let (t, _) = b.build();
    assert!(t.service("u").unwrap().instances.is_empty());
    assert!(!t.service("u").unwrap().protected);
}

#[test]
fn a_resync_replaces_the_catalog_and_reports_only_differences() {
    let mut b = builder();
    instance(&mut b, "u", "1", "10.0.0.1:80");
    instance(&mut b, "u", "2", "10.0.0.2:80");
    rule(&mut b, "r", 1, r#"{"listener":"http","backends":[{"service":"u"}]}"#);
    let _ = b.build();
    let keep = instance_change(ServiceName::new("u"), "1", Some(raw("/s/u/1", 1, "10.0.0.1:80")));
    let Change::Instance { service, id, doc: Some(doc) } = keep else { unreachable!() };
    let Change::Rule { id: rid, doc: Some(rdoc) } =
        rule_change("r", Some(raw("/r/r", 2, r#"{"listener":"http","backends":[]}"#)))
    else {
        unreachable!()
    };
    b.apply(Change::Resync(Resync {
        source: SourceKind::Zookeeper,
        instances: vec![(service, id, doc)],
        rules: vec![(rid, rdoc)],
        policies: vec![],
    }));
    let (t, delta) = b.build();
    assert_eq!(delta.instances_removed, 1);
    assert_eq!(delta.instances_added, 0);
    assert_eq!(t.service("u").unwrap().instances.len(), 1);
    assert!(t.rules["r"].active.is_some(), "the bad new version keeps the old one across a resync");
}

#[test]
fn ring_hash_keeps_keys_on_endpoints_that_stay() {
    let mut b = builder();
    b.apply(policy_change(
        ServiceName::new("u"),
        Some(raw("/p/u", 1, r#"{"lb":"ring_hash","hash_on":"header:x-user"}"#)),
    ));
    for i in 1..=5 {
        instance(&mut b, "u", &i.to_string(), &format!("10.0.0.{i}:80"));
    }
    let (t1, _) = b.build();
    b.apply(instance_change(ServiceName::new("u"), "3", None));
    let (t2, _) = b.build();
    let owner = |t: &RoutingTable, key: &str| {
        let set = &t.service("u").unwrap().all;
        let i = set.ring.as_ref().unwrap().owner(table::hash_bytes(key.as_bytes())).unwrap();
        set.endpoints[i].addr.to_string()
    };
    let mut moved = 0;
    for k in 0..1000 {
        let key = format!("user-{k}");
        let (a, b) = (owner(&t1, &key), owner(&t2, &key));
        if a != "10.0.0.3:80" {
            assert_eq!(a, b, "{key} moved although its endpoint stayed");
        } else {
            moved += 1;
        }
    }
    assert!(moved > 100 && moved < 300, "about a fifth of the keys were on the removed endpoint: {moved}");
}

#[test]
fn an_invalid_node_is_logged_once_per_version() {
    let mut b = builder();
    let bad = |v: i32| instance_change(ServiceName::new("u"), "x", Some(raw("/s/u/x", v, "nonsense")));
    b.apply(bad(1));
    assert_eq!(b.invalid_logs(), 1);
    // Read again (a resync, or a duplicate event): the same version is not logged again.
    b.apply(bad(1));
    let _ = b.build();
    b.apply(bad(1));
    assert_eq!(b.invalid_logs(), 1);
    b.apply(bad(2));
    assert_eq!(b.invalid_logs(), 2, "a new version of the node is logged");
    let (t, _) = b.build();
    assert_eq!(t.invalid_count(NodeKind::Instance), 1, "counted once, however often logged");
}

#[test]
fn an_instance_change_rebuilds_only_the_routes_that_send_to_its_service() {
    let mut b = builder();
    instance(&mut b, "a", "1", "10.0.0.1:80");
    instance(&mut b, "b", "1", "10.0.0.2:80");
    instance(&mut b, "elsewhere", "1", "10.0.0.3:80");
    rule(&mut b, "ra", 1, r#"{"listener":"http","match":{"path_prefix":"/a"},"backends":[{"service":"a"}]}"#);
    rule(&mut b, "rb", 1, r#"{"listener":"http","match":{"path_prefix":"/b"},"backends":[{"service":"b"}]}"#);
    let (t1, _) = b.build();
    // A service no rule sends to: every route is shared.
    instance(&mut b, "elsewhere", "2", "10.0.0.4:80");
    let (t2, delta) = b.build();
    assert_eq!(delta.rebuilt.len(), 1);
    let routes = |t: &RoutingTable| t.listener(0).unwrap().routes.to_vec();
    for (r1, r2) in routes(&t1).iter().zip(routes(&t2).iter()) {
        assert!(Arc::ptr_eq(r1, r2), "{} rebuilt", r1.id);
    }
    // Service b changes: only rb is rebuilt, and lookups see its new endpoints.
    instance(&mut b, "b", "2", "10.0.0.5:80");
    let (t3, _) = b.build();
    let (r2, r3) = (routes(&t2), routes(&t3));
    assert!(Arc::ptr_eq(&r2[0], &r3[0]), "ra kept");
    assert!(!Arc::ptr_eq(&r2[1], &r3[1]), "rb rebuilt");
    let rb = t3.listener(0).unwrap().route(None, "/b/x", &Method::GET, &HeaderMap::new()).unwrap();
    assert_eq!(rb.targets[0].set.endpoints.len(), 2);
    // A rule change rebuilds everything, in the new order.
    rule(&mut b, "rc", 1, r#"{"listener":"http","priority":9,"backends":[{"service":"a"}]}"#);
    let (t4, _) = b.build();
    assert_eq!(&*t4.listener(0).unwrap().routes[0].id, "rc");
}

#[test]
fn a_local_change_rebuilds_every_route_with_the_new_listeners_and_defaults() {
    let mut b = builder();
    instance(&mut b, "users", "a", "10.0.0.1:80");
    rule(&mut b, "r1", 1, r#"{"listener":"admin","backends":[{"service":"users"}]}"#);
    rule(&mut b, "r2", 1, r#"{"listener":"http","backends":[{"address":"10.0.9.9:80"}]}"#);
    let (t, _) = b.build();
    assert_eq!(t.listeners.len(), 2);
    assert_eq!(t.listener(0).unwrap().routes[0].timeout, Duration::from_secs(15));

    // A third listener takes the rule written for it; every route gets the new defaults.
    let mut specs = listeners();
    specs.push(ListenerSpec { name: "admin".into(), protocol: Protocol::Http, service: None, endpoint: None });
    let defaults = Defaults {
        timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(50),
        ..Defaults::default()
    };
    b.apply(Change::Local { listeners: specs, defaults });
    assert!(b.is_dirty());
    let (t, delta) = b.build();
    assert!(delta.local && !delta.is_empty());
    assert_eq!(t.listeners.len(), 3);
    let admin = t.listener(2).unwrap();
    assert_eq!((&*admin.name, &*admin.routes[0].id), ("admin", "r1"));
    assert_eq!(admin.routes[0].timeout, Duration::from_millis(500));
    assert_eq!(t.service("users").unwrap().policy.connect_timeout, Duration::from_millis(50));
    let http = t.listener(0).unwrap();
    assert_eq!(http.routes[0].timeout, Duration::from_millis(500));
    assert_eq!(http.routes[0].targets[0].set.policy.connect_timeout, Duration::from_millis(50), "static targets too");
    let (_, delta) = b.build();
    assert!(!delta.local, "reported once");
}

/// An instance stating `protocol`, as the Dubbo source makes them.
fn stated(b: &mut Builder, service: &str, id: &str, addr: &str, protocol: crate::routing::InstanceProtocol) {
    let instance =
        Instance { protocol: Some(protocol), ..Instance::at(crate::routing::Format::Dubbo, addr.parse().unwrap()) };
    let origin = raw(&format!("/d/{service}/{id}"), 1, "").origin;
    b.apply(Change::Instance {
        service: ServiceName::new(service),
        id: Arc::from(id),
        doc: Some(Doc { origin, parsed: Ok(Arc::new(instance)) }),
    });
}

#[test]
fn http_listeners_take_the_http_instances_and_tcp_listeners_the_tcp_only_ones() {
    use crate::routing::InstanceProtocol::{H2, Http1, Tcp};
    let mut b = builder();
    // One provider exporting one interface over Dubbo's binary protocol, Triple and REST.
    stated(&mut b, "db", "dubbo", "10.0.0.1:20880", Tcp);
    stated(&mut b, "db", "tri", "10.0.0.1:50051", H2);
    stated(&mut b, "db", "rest", "10.0.0.1:8080", Http1);
    rule(&mut b, "r1", 1, r#"{"listener":"http","backends":[{"service":"db"}]}"#);
    let (t, _) = b.build();
    let endpoints = |listener: usize| -> Vec<(String, Option<crate::routing::InstanceProtocol>)> {
        let set = &t.listener(listener).unwrap().first().unwrap().targets[0].set;
        set.endpoints.iter().map(|e| (e.addr.to_string(), e.protocol)).collect()
    };
    // By node id: rest, then tri.
    assert_eq!(endpoints(0), [("10.0.0.1:8080".to_owned(), Some(Http1)), ("10.0.0.1:50051".to_owned(), Some(H2))]);
    assert_eq!(endpoints(1), [("10.0.0.1:20880".to_owned(), Some(Tcp))]);
    // Every instance is still the service's, for health checks and /config.
    assert_eq!(t.service("db").unwrap().all.endpoints.len(), 3);
    // A service whose instances state nothing serves both kinds of listener from one set.
    instance(&mut b, "users", "a", "10.0.0.9:80");
    let (t, _) = b.build();
    let users = t.service("users").unwrap();
    assert!(!users.is_split());
    assert!(Arc::ptr_eq(users.routed(Protocol::Http), users.routed(Protocol::Tcp)));
}

#[test]
fn an_instance_stating_its_protocol_wins_over_the_policy_default() {
    use crate::routing::InstanceProtocol::{H2, Http1};
    let mut b = builder();
    instance(&mut b, "g", "plain", "10.0.0.1:80");
    stated(&mut b, "g", "rest", "10.0.0.2:80", Http1);
    rule(&mut b, "r1", 1, r#"{"listener":"http","backends":[{"service":"g"}]}"#);
    let protocols = |t: &RoutingTable| -> Vec<Option<crate::routing::InstanceProtocol>> {
        t.service("g").unwrap().all.endpoints.iter().map(|e| e.protocol).collect()
    };
    let (t, _) = b.build();
    assert_eq!(protocols(&t), [None, Some(Http1)], "no policy: what the instances say");
    b.apply(policy_change(ServiceName::new("g"), Some(raw("/p/g", 1, r#"{"protocol":"grpc"}"#))));
    let (t, _) = b.build();
    assert_eq!(protocols(&t), [Some(H2), Some(Http1)]);
    assert_eq!(t.service("g").unwrap().policy.protocol, Some(H2));
}
