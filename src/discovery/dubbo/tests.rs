use super::url::encode;
use super::*;
use crate::routing::SourceKind;

const API: &str = "org.apache.dubbo.demo.DemoService";

fn catalog() -> Catalog {
    Catalog::new(&Paths {
        services: "/services".into(),
        rules: "/rules".into(),
        policies: "/policies".into(),
        dubbo: Some("/dubbo".into()),
    })
}

fn data(path: &str, data: &str) -> Read {
    let origin = Origin { source: SourceKind::Zookeeper, path: Arc::from(path), mzxid: Some(1), version: Some(0) };
    Read::Data(RawNode { origin, data: data.as_bytes().to_vec() })
}

fn provider(url: &str) -> (DubboRef, Read) {
    (DubboRef::Provider(ServiceName::new(API), encode(url)), data("/dubbo/p", ""))
}

fn config(name: &str, text: &str) -> (DubboRef, Read) {
    (DubboRef::Config(name.to_owned()), data(&format!("/dubbo/config/dubbo/{name}"), text))
}

/// The service's instances by address and protocol.
fn instances(docs: &[(ServiceName, Arc<str>, Doc<Instance>)]) -> Vec<Result<Arc<Instance>, String>> {
    docs.iter().map(|(_, _, d)| d.parsed.clone()).collect()
}

const JAVA: &str = "dubbo://10.0.0.5:20880/org.apache.dubbo.demo.DemoService?anyhost=true&application=demo-provider\
    &dubbo=2.0.2&interface=org.apache.dubbo.demo.DemoService&methods=sayHello,sayHi&side=provider\
    &timestamp=1700000000000&version=1.0.0&group=g1&weight=100&release=3.2.0";

#[test]
fn a_java_provider_url_becomes_an_instance_with_every_parameter() {
    let mut c = catalog();
    let (docs, invalid) = c.replace(vec![provider(JAVA)], BTreeMap::new());
    assert!(invalid.is_empty());
    let i = instances(&docs).remove(0).unwrap();
    assert_eq!(
        (i.format, i.addr.to_string(), i.protocol),
        (Format::Dubbo, "10.0.0.5:20880".into(), Some(InstanceProtocol::Tcp))
    );
    assert_eq!(i.metadata.get("methods"), Some("sayHello,sayHi"));
    assert_eq!((i.metadata.get("version"), i.metadata.get("group")), (Some("1.0.0"), Some("g1")));
    assert_eq!((i.metadata.get("application"), i.metadata.get("release")), (Some("demo-provider"), Some("3.2.0")));
    assert_eq!(i.warmup, Some(Warmup { start_ms: 1_700_000_000_000, period_ms: DEFAULT_WARMUP_MS }));
    assert!(i.enabled);
    assert_eq!(i.weight, 100);
}

#[test]
fn protocols_weights_and_switches() {
    let mut c = catalog();
    let (docs, _) = c.replace(
        vec![
            provider("tri://127.0.0.1:50071?service=org.apache.dubbo.samples.Greeter"),
            provider("rest://10.0.0.7:8080/x?weight=7&disabled=true"),
            provider("http://10.0.0.8:8080/x?enabled=false&warmup=60000&timestamp=5"),
            provider("dubbo://10.0.0.9:20880/x?weight=-3"),
            provider("dubbo://10.0.0.10/x"),
            provider("dubbo://10.0.0.11:1/x?weight=10001"),
            provider("dubbo://10.0.0.12:1/x?weight=heavy"),
            provider("dubbo://10.0.0.13:1/x?zone=eu-1a"),
        ],
        BTreeMap::new(),
    );
    let by_addr: BTreeMap<String, Result<Arc<Instance>, String>> = docs
        .iter()
        .map(|(_, id, d)| (url::decode(id).unwrap(), d.parsed.clone()))
        .map(|(u, p)| (DubboUrl::parse(&u).unwrap().host, p))
        .collect();
    let ok = |h: &str| by_addr[h].clone().unwrap();
    assert_eq!((ok("127.0.0.1").protocol, ok("127.0.0.1").warmup), (Some(InstanceProtocol::H2), None));
    assert_eq!(
        (ok("10.0.0.7").protocol, ok("10.0.0.7").weight, ok("10.0.0.7").enabled),
        (Some(InstanceProtocol::Http1), 7, false)
    );
    assert_eq!(ok("10.0.0.8").warmup, Some(Warmup { start_ms: 5, period_ms: 60_000 }));
    assert!(!ok("10.0.0.8").enabled);
    assert_eq!(ok("10.0.0.9").weight, 0, "a negative weight counts as 0");
    assert!(by_addr["10.0.0.10"].clone().unwrap_err().contains("no port"));
    assert!(by_addr["10.0.0.11"].clone().unwrap_err().contains("weight"));
    assert!(by_addr["10.0.0.12"].clone().unwrap_err().contains("weight"));
    assert_eq!((ok("10.0.0.13").zone.as_deref(), ok("10.0.0.9").zone.as_deref()), (Some("eu-1a"), None));
}

#[test]
fn configurators_apply_and_changes_reach_only_the_instances_they_change() {
    let mut c = catalog();
    let other =
        "dubbo://10.0.0.6:20880/org.apache.dubbo.demo.DemoService?application=demo-provider&version=1.0.0&group=g1";
    c.replace(vec![provider(JAVA), provider(other)], BTreeMap::new());
    let disable =
        encode(&format!("override://10.0.0.5:20880/{API}?category=configurators&disabled=true&group=g1&version=1.0.0"));
    let changes = c.update(vec![(DubboRef::Override(ServiceName::new(API), disable.clone()), data("/o", ""))]);
    assert_eq!(changes.len(), 1, "only the overridden provider changes: {changes:?}");
    let Change::Instance { doc: Some(doc), .. } = &changes[0] else { panic!("{changes:?}") };
    assert!(!doc.parsed.as_ref().unwrap().enabled);
    // dubbo-admin's YAML: a weight for every provider of the service key.
    let yaml = format!(
        "configVersion: v2.7\nscope: service\nkey: g1/{API}:1.0.0\nconfigs:\n  - side: provider\n    addresses: [0.0.0.0]\n    parameters:\n      weight: 250\n"
    );
    let changes = c.update(vec![config(&format!("{API}:1.0.0:g1.configurators"), &yaml)]);
    let weights: Vec<u32> = changes
        .iter()
        .filter_map(|ch| match ch {
            Change::Instance { doc: Some(d), .. } => Some(d.parsed.as_ref().unwrap().weight),
            _ => None,
        })
        .collect();
    assert_eq!(weights, [250, 250]);
    assert!(matches!(changes.last(), Some(Change::ConfigInvalid(v)) if v.is_empty()));
    // The override goes: the provider is enabled again.
    let changes = c.update(vec![(DubboRef::Override(ServiceName::new(API), disable), Read::Gone)]);
    let Change::Instance { doc: Some(doc), .. } = &changes[0] else { panic!("{changes:?}") };
    assert!(doc.parsed.as_ref().unwrap().enabled);
}

#[test]
fn a_bad_configuration_node_is_listed_and_its_previous_version_stays() {
    let mut c = catalog();
    c.replace(vec![provider(JAVA)], BTreeMap::new());
    let rule = "force: false\nkey: demo-provider\ntags:\n  - name: gray\n    addresses: [\"10.0.0.5:20880\"]\n";
    let changes = c.update(vec![config("demo-provider.tag-router", rule)]);
    let Change::Instance { doc: Some(doc), .. } = &changes[0] else { panic!("{changes:?}") };
    let tags = doc.parsed.as_ref().unwrap().tags.clone().unwrap();
    assert_eq!(&*tags.assigned, [Box::from("gray")]);
    assert_eq!(tags.rule.as_ref().unwrap().application.as_ref(), "demo-provider");
    let changes = c.update(vec![config("demo-provider.tag-router", "tags: [[[")]);
    assert_eq!(changes.len(), 1, "the instances keep the rule in force: {changes:?}");
    let Change::ConfigInvalid(invalid) = &changes[0] else { panic!("{changes:?}") };
    assert_eq!(invalid.len(), 1);
    assert_eq!((invalid[0].kind, invalid[0].previous_in_force), (NodeKind::DubboConfig, true));
    assert!(invalid[0].path.ends_with("demo-provider.tag-router"));
}

#[test]
fn a_services_path_service_of_the_same_name_wins() {
    let mut c = catalog();
    let native = BTreeMap::from([(ServiceName::new(API), BTreeSet::from([Arc::from("i1")]))]);
    let (docs, _) = c.replace(vec![provider(JAVA)], native);
    let err = instances(&docs).remove(0).unwrap_err();
    assert!(err.contains("services_path") && err.contains("/services/"), "{err}");
    let changes = c.native_changed(&ServiceName::new(API), "i1", false);
    let Change::Instance { doc: Some(doc), .. } = &changes[0] else { panic!("{changes:?}") };
    assert!(doc.parsed.is_ok(), "routable once the services_path instances are gone");
    let changes = c.native_changed(&ServiceName::new(API), "i2", true);
    assert!(matches!(&changes[0], Change::Instance { doc: Some(d), .. } if d.parsed.is_err()));
    assert!(c.native_changed(&ServiceName::new("unrelated"), "x", true).is_empty());
}
