use super::*;

fn url(text: &str) -> DubboUrl {
    DubboUrl::parse(text).unwrap()
}

fn provider() -> (DubboUrl, Params) {
    let u = url("dubbo://10.0.0.5:20880/com.foo.Api?application=shop&interface=com.foo.Api&side=provider&weight=100");
    let p = u.params.clone();
    (u, p)
}

/// The provider's parameters after `overrides`, applied in Dubbo's order.
fn configured(overrides: &[&str]) -> Params {
    let (u, mut params) = provider();
    let mut list: Vec<Override> = overrides.iter().filter_map(|o| Override::from_url(url(o)).unwrap()).collect();
    list.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
    let target = Target { host: &u.host, port: u.port, interface: "com.foo.Api" };
    for o in &list {
        o.apply(&target, &mut params);
    }
    params
}

#[test]
fn override_urls_as_dubbo_applies_them() {
    let p = configured(&["override://0.0.0.0/com.foo.Api?category=configurators&disabled=true"]);
    assert_eq!(p.get("disabled").map(String::as_str), Some("true"), "0.0.0.0: every provider");
    assert!(!p.contains_key("category"), "conditions are not applied");
    let p = configured(&["override://10.0.0.5:20880/com.foo.Api?category=configurators&weight=200"]);
    assert_eq!(p["weight"], "200", "this address");
    for other in [
        "override://10.0.0.6:20880/com.foo.Api?weight=200",
        "override://10.0.0.5:20881/com.foo.Api?weight=200",
        "override://10.0.0.5/com.foo.Api?weight=200",
        "override://0.0.0.0/com.foo.Other?weight=200",
        "override://0.0.0.0/com.foo.Api?weight=200&application=other",
        "override://0.0.0.0/com.foo.Api?weight=200&enabled=false",
        "override://0.0.0.0/com.foo.Api?version=2.0&weight=200",
        "override://0.0.0.0/com.foo.Api?weight=200&~side=consumer",
        "override://0.0.0.0/com.foo.Api?weight=200&configVersion=v2.7&side=consumer",
    ] {
        assert_eq!(configured(&[other])["weight"], "100", "{other} must not apply");
    }
    // A specific address sorts after 0.0.0.0 and wins; absent:// only fills gaps.
    let p = configured(&[
        "override://10.0.0.5:20880/com.foo.Api?weight=300",
        "override://0.0.0.0/com.foo.Api?weight=50",
        "absent://0.0.0.0/com.foo.Api?weight=1&dubbo.tag=gray",
    ]);
    assert_eq!((p["weight"].as_str(), p["dubbo.tag"].as_str()), ("300", "gray"));
    assert_eq!(Override::from_url(url("empty://0.0.0.0/com.foo.Api")).unwrap(), None);
    assert!(Override::from_url(url("dubbo://0.0.0.0/com.foo.Api?weight=1")).is_err());
}

#[test]
fn dubbo_admin_configurators_become_overrides() {
    let doc = Configurators::parse(
        br#"configVersion: v2.7
scope: service
key: com.foo.Api
enabled: true
configs:
  - addresses: ["10.0.0.5:20880"]
    side: provider
    parameters:
      weight: 400
  - addresses: ["0.0.0.0"]
    side: consumer
    parameters:
      timeout: 6000
"#,
    )
    .unwrap();
    assert!(!doc.application_scope());
    let (u, mut params) = provider();
    let target = Target { host: &u.host, port: u.port, interface: "com.foo.Api" };
    doc.overrides.iter().for_each(|o| o.apply(&target, &mut params));
    assert_eq!(params["weight"], "400");
    assert!(!params.contains_key("timeout"), "consumer-side items are for consumers");
    let (_, mut params) = provider();
    let other = Target { host: "10.0.0.6", port: 20880, interface: "com.foo.Api" };
    doc.overrides.iter().for_each(|o| o.apply(&other, &mut params));
    assert_eq!(params["weight"], "100", "another address");

    let app = Configurators::parse(
        b"configVersion: v2.7\nscope: application\nkey: shop\nconfigs:\n  - side: provider\n    parameters:\n      disabled: true\n",
    )
    .unwrap();
    assert!(app.application_scope());
    let (_, mut params) = provider();
    app.overrides.iter().for_each(|o| o.apply(&target, &mut params));
    assert_eq!(params["disabled"], "true");

    let json = Configurators::parse(br#"["override://0.0.0.0/com.foo.Api?weight=7"]"#).unwrap();
    assert_eq!(json.overrides.len(), 1);
    for (bad, why) in [
        ("configVersion: v2.7\nconfigs: []\n", "key"),
        ("configVersion: v2.7\nkey: a\nconfigs:\n  - parameters: {}\n", "at least one parameter"),
        (
            "configVersion: v3.0\nkey: a\nconfigs:\n  - parameters: {a: 1}\n    match: {address: {wildcard: '*'}}\n",
            "match",
        ),
        ("[[[", "not a configurator"),
    ] {
        let err = Configurators::parse(bad.as_bytes()).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[test]
fn tag_rules_by_address_and_by_parameters() {
    let rule = TagRuleDoc::parse(
        br#"force: true
enabled: true
key: shop
tags:
  - name: gray
    addresses: ["10.0.0.5:20880", "10.0.1.*", "192.168.0.0/16", "0.0.0.0:20999"]
  - name: blue
"#,
    )
    .unwrap();
    assert!(rule.force && rule.enabled);
    let gray = &rule.tags[0];
    for (host, port, yes) in [
        ("10.0.0.5", 20880, true),
        ("10.0.0.5", 20881, false),
        ("10.0.1.9", 1, true),
        ("10.0.2.9", 1, false),
        ("192.168.7.7", 5, true),
        ("172.16.0.1", 20999, true),
    ] {
        assert_eq!(gray.address_matches(host, port), yes, "{host}:{port}");
    }
    assert!(!rule.tags[1].has_addresses() && !rule.by_match(&rule.tags[1]));

    let v3 = TagRuleDoc::parse(
        b"configVersion: v3.0\nkey: shop\ntags:\n  - name: canary\n    match:\n      - key: env\n        value:\n          exact: canary\n",
    )
    .unwrap();
    let canary = &v3.tags[0];
    assert!(v3.by_match(canary));
    let (_, mut params) = provider();
    assert!(!canary.params_match(&params));
    params.insert("env".into(), "canary".into());
    assert!(canary.params_match(&params));

    for (bad, why) in [
        ("key: a\n", "tags"),
        ("tags:\n  - name: ''\n", "name"),
        ("tags:\n  - name: a\n    addresses: ['10.0.1-x.1']\n", "addresses"),
        (
            "configVersion: v3.0\ntags:\n  - name: a\n    match:\n      - key: k\n        value: {regex: '.*'}\n",
            "regex",
        ),
    ] {
        let err = TagRuleDoc::parse(bad.as_bytes()).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}
