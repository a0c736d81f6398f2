//! A large routing catalog built in memory, shared by the benches and the allocation test.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use zkroute::discovery::{instance_change, rule_change};
use zkroute::endpoint::StateRegistry;
use zkroute::metrics::Metrics;
use zkroute::routing::build::{Change, Defaults, ListenerSpec, RawNode, Resync};
use zkroute::routing::table::Protocol;
use zkroute::routing::{Builder, Origin, ServiceName, SourceKind};

pub fn raw(path: String, data: String) -> RawNode {
    RawNode {
        origin: Origin { source: SourceKind::Zookeeper, path: path.into(), mzxid: Some(1), version: Some(0) },
        data: data.into_bytes(),
    }
}

/// A builder holding `services` services of `per_service` Curator instances, and `rules` rules
/// of every match kind on listener `http`.
pub fn catalog(services: usize, per_service: usize, rules: usize) -> Builder {
    let listeners = vec![ListenerSpec { name: "http".into(), protocol: Protocol::Http, service: None, endpoint: None }];
    let mut b = Builder::new(
        listeners,
        Defaults::default(),
        Arc::new(StateRegistry::new(Duration::from_secs(30))),
        Arc::new(Metrics::new(true)),
    );
    let mut resync =
        Resync { source: SourceKind::Zookeeper, instances: Vec::new(), rules: Vec::new(), policies: Vec::new() };
    for s in 0..services {
        let name = ServiceName::new(&format!("svc-{s}"));
        for i in 0..per_service {
            let id = format!("{i:08x}-instance");
            let data = format!(
                r#"{{"name":"svc-{s}","id":"{id}","address":"10.{}.{}.{}","port":{},"payload":{{"@class":"x","metadata":{{"version":"v{}"}}}},"serviceType":"DYNAMIC"}}"#,
                s / 250,
                s % 250,
                i % 250,
                8000 + i / 250,
                i % 2
            );
            if let Change::Instance { service, id, doc: Some(doc) } =
                instance_change(name.clone(), &id, Some(raw(format!("/s/svc-{s}/{id}"), data)))
            {
                resync.instances.push((service, id, doc));
            }
        }
    }
    for r in 0..rules {
        let svc = r % services.max(1);
        let m = match r % 4 {
            0 => format!(r#""host":"svc-{r}.internal""#),
            1 => format!(r#""host":"*.zone{r}.example""#),
            2 => format!(r#""path_prefix":"/api/{r}/""#),
            _ => format!(r#""headers":{{"x-tenant":"t{r}"}}"#),
        };
        let json = format!(
            r#"{{"listener":"http","priority":{},"match":{{{m}}},"backends":[{{"service":"svc-{svc}"}}]}}"#,
            r % 7
        );
        if let Change::Rule { id, doc: Some(doc) } =
            rule_change(&format!("rule-{r:05}"), Some(raw(format!("/r/rule-{r:05}"), json)))
        {
            resync.rules.push((id, doc));
        }
    }
    b.apply(Change::Resync(resync));
    b
}
