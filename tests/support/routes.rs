//! Routes from a static file that the test edits, for tests whose subject is not ZooKeeper: the
//! instance, rule and policy documents a ZooKeeper would hold, followed by zkroute's file source
//! (README: "Configuration"). ZooKeeper stays in the tests of discovery, registration and faults.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::sync::Mutex;

use serde_json::Value;

use super::{Backend, Chroot, HTTP_LISTENER, Proxy};

/// Where a zkroute under test reads its routes from, as the TOML that says so.
pub trait RouteSource {
    fn source_config(&self) -> String;
}

impl RouteSource for Chroot {
    fn source_config(&self) -> String {
        format!("[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"2s\"\n", self.connect)
    }
}

impl RouteSource for Routes {
    fn source_config(&self) -> String {
        format!("[static]\nfile = {}\n", toml::Value::String(self.path().display().to_string()))
    }
}

/// A static routes file in a directory of its own, removed when dropped. Every edit replaces the
/// file by a rename, as editors and deployment tools save, so the file source sees each one.
pub struct Routes {
    dir: tempfile::TempDir,
    docs: Mutex<Docs>,
}

/// What the file holds, by section and key.
#[derive(Default)]
struct Docs {
    services: BTreeMap<String, BTreeMap<String, String>>,
    rules: BTreeMap<String, toml::Value>,
    policies: BTreeMap<String, toml::Value>,
    versions: usize,
}

impl Default for Routes {
    fn default() -> Routes {
        Routes::new()
    }
}

impl Routes {
    /// An empty routes file.
    pub fn new() -> Routes {
        let routes = Routes { dir: tempfile::tempdir().expect("temp dir"), docs: Mutex::default() };
        routes.edit(|_| {});
        routes
    }

    /// The setup most data-plane tests share: `backends` as the instances of `service` (each
    /// under its name), rule `r` sending every request on listener `http` to `service`, and a
    /// zkroute with that listener, returned once its table holds them.
    pub async fn serving(service: &str, backends: &[&Backend]) -> (Routes, Proxy) {
        let routes = Routes::new();
        routes.backends(service, backends);
        routes.rule("r", &format!(r#"{{"listener":"http","backends":[{{"service":"{service}"}}]}}"#));
        let proxy = routes.proxy(HTTP_LISTENER).await;
        (routes, proxy)
    }

    /// Starts a zkroute following this file, admin on a free port, with `extra` TOML after
    /// (listeners, `[proxy]` keys ...), and waits until its table holds every document written so
    /// far.
    pub async fn proxy(&self, extra: &str) -> Proxy {
        let proxy = Proxy::following(self, extra).await;
        proxy.config_until("the table of the routes file", |c| self.shown_in(c)).await;
        proxy
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join(FILE_NAME)
    }

    /// Sets instance `id` of `service` to `data`: the node's text as a registry writes it,
    /// `host:port` or a JSON document.
    pub fn instance(&self, service: &str, id: &str, data: impl Display) {
        self.edit(|d| {
            d.services.entry(service.to_owned()).or_default().insert(id.to_owned(), data.to_string());
        });
    }

    /// Each backend as an instance of `service`, under the backend's name.
    pub fn backends(&self, service: &str, backends: &[&Backend]) {
        self.edit(|d| {
            let instances = d.services.entry(service.to_owned()).or_default();
            for b in backends {
                instances.insert(b.name.clone(), b.addr.to_string());
            }
        });
    }

    /// Sets rule `id` to `json`, the text a rule node would hold.
    pub fn rule(&self, id: &str, json: &str) {
        self.edit(|d| {
            d.rules.insert(id.to_owned(), document(json));
        });
    }

    /// Sets the policy of `service` to `json`, the text a policy node would hold.
    pub fn policy(&self, service: &str, json: &str) {
        self.edit(|d| {
            d.policies.insert(service.to_owned(), document(json));
        });
    }

    pub fn remove_instance(&self, service: &str, id: &str) {
        self.edit(|d| {
            let removed = d.services.get_mut(service).and_then(|instances| instances.remove(id));
            assert!(removed.is_some(), "no instance {service}/{id} to remove");
            d.services.retain(|_, instances| !instances.is_empty());
        });
    }

    pub fn remove_rule(&self, id: &str) {
        self.edit(|d| assert!(d.rules.remove(id).is_some(), "no rule {id} to remove"));
    }

    pub fn remove_policy(&self, service: &str) {
        self.edit(|d| assert!(d.policies.remove(service).is_some(), "no policy of {service} to remove"));
    }

    /// Whether a `/config` document holds every document of the file: each instance, rule and
    /// policy in force, or listed as invalid or refused.
    pub fn shown_in(&self, config: &Value) -> bool {
        let docs = self.docs.lock().expect("routes");
        let invalid = |key: &str| {
            let path = format!("{FILE_NAME}#{key}");
            config["invalid"].as_array().is_some_and(|a| a.iter().any(|i| i["path"] == path.as_str()))
        };
        let instances_shown = docs.services.iter().all(|(service, instances)| {
            let shown = super::instances(config, service);
            instances
                .keys()
                .all(|id| shown.iter().any(|i| i["id"] == id.as_str()) || invalid(&format!("services.{service}.{id}")))
        });
        let rules_shown = docs.rules.keys().all(|id| config["rules"][id].is_object());
        let policies_shown = docs.policies.keys().all(|service| {
            let key = format!("policies.{service}");
            config["services"][service]["policy_origin"]["path"] == format!("{FILE_NAME}#{key}").as_str()
                || invalid(&key)
                || !docs.services.contains_key(service)
        });
        instances_shown && rules_shown && policies_shown
    }

    /// Applies `change` and writes the file anew: each version in a file of its own, linked to
    /// the routes file's name by a rename. Every version keeps its inode until the test ends, so
    /// no later version can be given the same inode and pass for an earlier one.
    fn edit(&self, change: impl FnOnce(&mut Docs)) {
        let mut docs = self.docs.lock().expect("routes");
        change(&mut docs);
        let services = docs.services.iter().map(|(service, instances)| {
            let instances = instances.iter().map(|(id, data)| (id.clone(), toml::Value::String(data.clone())));
            (service.clone(), toml::Value::Table(instances.collect()))
        });
        let sections = [
            ("services", services.collect::<toml::Table>()),
            ("rules", docs.rules.clone().into_iter().collect()),
            ("policies", docs.policies.clone().into_iter().collect()),
        ];
        let file: toml::Table = sections
            .into_iter()
            .filter(|(_, entries)| !entries.is_empty())
            .map(|(name, entries)| (name.to_owned(), toml::Value::Table(entries)))
            .collect();
        let text = toml::to_string(&file).expect("the routes file as TOML");
        docs.versions += 1;
        let version = self.dir.path().join(format!("{FILE_NAME}.{}", docs.versions));
        let next = self.dir.path().join(format!("{FILE_NAME}.next"));
        std::fs::write(&version, text).expect("write a version of the routes file");
        std::fs::hard_link(&version, &next).expect("link the new version");
        std::fs::rename(&next, self.path()).expect("replace the routes file");
    }
}

const FILE_NAME: &str = "routes.toml";

/// A rule or policy node's JSON text as the file's TOML: a table for a JSON object, as an
/// operator writes it; anything else as the text itself, which the source then refuses as it
/// would refuse the node.
fn document(json: &str) -> toml::Value {
    serde_json::from_str::<Value>(json)
        .ok()
        .filter(Value::is_object)
        .and_then(|v| toml::Value::try_from(v).ok())
        .unwrap_or_else(|| toml::Value::String(json.to_owned()))
}
