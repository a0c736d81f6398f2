#![allow(clippy::unwrap_used)]
//! The deployment files under deploy/: every example configuration loads with zkroute's own
//! loader, the Kubernetes and Compose files name the ports, paths and services that the
//! configurations they carry or mount use, the systemd unit verifies, and the command line's help
//! is complete. Nothing here starts a container; external checkers (systemd-analyze, promtool)
//! run where they are installed and are skipped with a note elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use zkroute::routing::table::Protocol;
use zkroute::{Config, ConfigArgs};

/// Static-provider route files in deploy/config/: not configurations themselves.
const ROUTE_FILES: &[&str] = &["routes-static.toml"];

/// The longest a shutdown spends deregistering before it drains (`App::stop`).
const DEREGISTER_BOUND: Duration = Duration::from_secs(5);

/// A stand-in pod IP (TEST-NET-1) for Kubernetes' `status.podIP`.
const POD_IP: &str = "192.0.2.10";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Loads configuration text as zkroute does. A `[static] file` is taken from deploy/config/
/// (by its file name) and copied into `dir` first, since the loader insists that it exists.
fn load_config(text: &str, name: &str, dir: &Path) -> Config {
    let table: toml::Table = text.parse().unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut text = text.to_owned();
    if let Some(file) = table.get("static").and_then(|s| s.get("file")).and_then(|f| f.as_str()) {
        let base = Path::new(file).file_name().unwrap().to_str().unwrap();
        let copy = dir.join(base);
        std::fs::copy(repo(&format!("deploy/config/{base}")), &copy).unwrap();
        text = text.replace(file, copy.to_str().unwrap());
    }
    Config::from_toml(&text, name).unwrap_or_else(|e| panic!("{e}"))
}

/// Every configuration in deploy/config/, by file name.
fn example_configs() -> BTreeMap<String, Config> {
    let dir = tempfile::tempdir().unwrap();
    let mut configs = BTreeMap::new();
    for entry in std::fs::read_dir(repo("deploy/config")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".toml") && !ROUTE_FILES.contains(&name.as_str()) {
            let path = format!("deploy/config/{name}");
            configs.insert(name, load_config(&read(&path), &path, dir.path()));
        }
    }
    configs
}

/// A single-document YAML file, as a JSON value.
fn yaml(path: &str) -> Value {
    serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path} is not YAML: {e}"))
}

fn text<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn array<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array().unwrap_or_else(|| panic!("{what} is not a list: {v}"))
}

/// A duration in YAML: a number of seconds, or text such as "45s".
fn seconds(v: &Value) -> Duration {
    match v {
        Value::Number(n) => Duration::from_secs(n.as_u64().unwrap()),
        other => humantime::parse_duration(text(other, "duration")).unwrap(),
    }
}

/// Kubernetes quantities in Mi, as the manifests write them.
fn mebibytes(v: &Value) -> u64 {
    text(v, "memory").strip_suffix("Mi").unwrap_or_else(|| panic!("{v} is not in Mi")).parse().unwrap()
}

fn zkroute(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zkroute"));
    cmd.args(args).env_remove("RUST_LOG").env_remove("ZKROUTE_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Runs an external checker, or says why it was skipped and returns None.
fn external(program: &str, args: &[&str]) -> Option<Output> {
    match Command::new(program).args(args).output() {
        Ok(out) => Some(out),
        Err(e) => {
            eprintln!("note: skipped {program} {}: {e}", args.join(" "));
            None
        }
    }
}

// ---- deploy/config ----------------------------------------------------------------------------

#[test]
fn every_example_config_loads_and_validates() {
    let configs = example_configs();
    let shapes: BTreeSet<&str> = configs.keys().map(String::as_str).collect();
    for shape in ["http-rules.toml", "port-per-service.toml", "tcp.toml", "register-only.toml", "static.toml"] {
        assert!(shapes.contains(shape), "deploy/config/{shape} is missing: {shapes:?}");
    }
    for (name, c) in &configs {
        assert!(c.admin.bind.ip().is_loopback(), "{name}: the host examples keep the admin port on loopback");
        for l in &c.listeners {
            assert!(l.bind.ip().is_loopback(), "{name}: listener {} must bind loopback", l.name);
        }
    }
}

#[test]
fn each_example_config_has_the_shape_its_name_says() {
    let c = example_configs();

    let rules = &c["http-rules.toml"];
    assert_eq!(rules.listeners.len(), 1);
    assert!(rules.listeners[0].service.is_none(), "http-rules: the listener is routed by rule nodes");
    assert_eq!(rules.listeners[0].protocol, Protocol::Http);

    let per_service = &c["port-per-service.toml"];
    assert!(per_service.listeners.iter().all(|l| l.service.is_some()), "port-per-service: no rule needed");
    let protocols: BTreeSet<_> = per_service.listeners.iter().map(|l| format!("{:?}", l.protocol)).collect();
    assert_eq!(protocols.len(), 2, "port-per-service shows HTTP and TCP: {protocols:?}");

    let tcp = &c["tcp.toml"];
    assert!(!tcp.listeners.is_empty());
    assert!(tcp.listeners.iter().all(|l| l.protocol == Protocol::Tcp));

    let register = &c["register-only.toml"];
    assert!(register.listeners.is_empty(), "register-only has no listeners");
    assert!(!register.registrations.is_empty());
    assert!(register.registrations.iter().all(|r| r.health_check.is_some()), "registrations are health-gated");

    assert!(c["static.toml"].static_file.is_some());
}

#[test]
fn the_static_routes_file_parses_whole_and_routes_only_listeners_of_its_config() {
    let path = "deploy/config/routes-static.toml";
    let text = read(path);
    let resync = zkroute::discovery::file::parse(&text, path).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let entries = |section: &str| table.get(section).and_then(|s| s.as_table()).map(|t| t.len()).unwrap_or(0);
    let instances: usize = table["services"].as_table().unwrap().values().map(|s| s.as_table().unwrap().len()).sum();
    assert_eq!(resync.instances.len(), instances);
    assert_eq!(resync.rules.len(), entries("rules"));
    assert_eq!(resync.policies.len(), entries("policies"));
    for (service, id, doc) in &resync.instances {
        assert!(doc.parsed.is_ok(), "instance {service}/{id}: {:?}", doc.parsed.as_ref().err());
    }
    for (service, doc) in &resync.policies {
        assert!(doc.parsed.is_ok(), "policy {service}: {:?}", doc.parsed.as_ref().err());
    }
    let config = &example_configs()["static.toml"];
    let listeners: BTreeSet<&str> = config.listeners.iter().map(|l| l.name.as_str()).collect();
    for (id, doc) in &resync.rules {
        let rule = doc.parsed.as_ref().unwrap_or_else(|e| panic!("rule {id}: {e}"));
        assert!(listeners.contains(&*rule.listener), "rule {id} names listener {:?}", rule.listener);
    }
    let services: BTreeSet<&str> = resync.instances.iter().map(|(s, _, _)| s.as_str()).collect();
    for l in &config.listeners {
        if let Some(s) = &l.service {
            assert!(services.contains(s.as_str()), "listener {} wants service {s}, not in the file", l.name);
        }
    }
}

// ---- deploy/kubernetes ------------------------------------------------------------------------

struct Pod {
    deployment: Value,
    configmap: Value,
}

/// The native-sidecar manifest (Kubernetes 1.29+) and the one for older clusters.
const NATIVE: &str = "deploy/kubernetes/deployment.yaml";
const PRE_1_29: &str = "deploy/kubernetes/deployment-pre-1.29.yaml";

impl Pod {
    fn read() -> Pod {
        Pod::read_from(NATIVE)
    }

    fn read_from(path: &str) -> Pod {
        let deployment = yaml(path);
        let configmap = yaml("deploy/kubernetes/configmap.yaml");
        assert_eq!(deployment["kind"], "Deployment");
        assert_eq!(configmap["kind"], "ConfigMap");
        Pod { deployment, configmap }
    }

    /// Both manifests, each with the configmap.
    fn both() -> [Pod; 2] {
        [Pod::read_from(NATIVE), Pod::read_from(PRE_1_29)]
    }

    fn spec(&self) -> &Value {
        &self.deployment["spec"]["template"]["spec"]
    }

    /// A container, or an init container (a native sidecar is one).
    fn container(&self, name: &str) -> &Value {
        ["containers", "initContainers"]
            .iter()
            .filter_map(|list| self.spec()[*list].as_array())
            .flatten()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }

    /// The config as zkroute runs it in the pod: the file with the container's `ZKROUTE_*`
    /// variables over it.
    fn effective_config(&self) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zkroute.toml");
        std::fs::write(&file, self.config_text()).unwrap();
        let mut args = ConfigArgs::default().with_file(file);
        for (k, v) in self.env("zkroute") {
            if let Some(key) = k.strip_prefix("ZKROUTE_") {
                let key = key.to_ascii_lowercase().replacen('_', ".", 1);
                args = args.set(&key, v);
            }
        }
        Config::load(&args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The file and the directory that `--config` names in the zkroute container.
    fn config_path(&self) -> PathBuf {
        let args: Vec<&str> =
            array(&self.container("zkroute")["args"], "args").iter().map(|a| text(a, "arg")).collect();
        let at = args.iter().position(|a| *a == "--config").expect("zkroute is given --config");
        PathBuf::from(args[at + 1])
    }

    /// The zkroute.toml that the zkroute container reads, checked to be mounted where --config
    /// points, from this ConfigMap.
    fn config_text(&self) -> String {
        let path = self.config_path();
        let mount = array(&self.container("zkroute")["volumeMounts"], "volumeMounts")
            .iter()
            .find(|m| Path::new(text(&m["mountPath"], "mountPath")) == path.parent().unwrap())
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.parent().unwrap().display()));
        let volume = array(&self.spec()["volumes"], "volumes").iter().find(|v| v["name"] == mount["name"]).unwrap();
        assert_eq!(volume["configMap"]["name"], self.configmap["metadata"]["name"], "the volume is this ConfigMap");
        let key = path.file_name().unwrap().to_str().unwrap();
        text(&self.configmap["data"][key], "the ConfigMap's config").to_owned()
    }

    fn config(&self) -> Config {
        let dir = tempfile::tempdir().unwrap();
        load_config(&self.config_text(), "deploy/kubernetes/configmap.yaml", dir.path())
    }

    fn port(&self, container: &str, name: &str) -> u16 {
        let ports = array(&self.container(container)["ports"], "ports");
        let port = ports.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("{container} has no port {name}"));
        port["containerPort"].as_u64().unwrap().try_into().unwrap()
    }

    /// A container's environment as Kubernetes would set it: `$(NAME)` references expanded,
    /// the pod IP standing in as [`POD_IP`], labels read from the pod template.
    fn env(&self, container: &str) -> BTreeMap<String, String> {
        let labels = &self.deployment["spec"]["template"]["metadata"]["labels"];
        let mut env = BTreeMap::new();
        for var in array(&self.container(container)["env"], "env") {
            let value = if let Some(v) = var["value"].as_str() {
                env.iter().fold(v.to_owned(), |v, (k, val): (&String, &String)| v.replace(&format!("$({k})"), val))
            } else {
                let field = text(&var["valueFrom"]["fieldRef"]["fieldPath"], "fieldPath");
                match field.strip_prefix("metadata.labels['").and_then(|f| f.strip_suffix("']")) {
                    Some(label) => text(&labels[label], "label").to_owned(),
                    None if field == "status.podIP" => POD_IP.to_owned(),
                    None => panic!("unexpected fieldRef {field}"),
                }
            };
            env.insert(text(&var["name"], "name").to_owned(), value);
        }
        env
    }
}

#[test]
fn the_configmap_config_binds_admin_for_probes_and_listens_on_loopback_for_the_app() {
    for pod in Pod::both() {
        let config = pod.config();
        assert_eq!(config.admin.bind, "0.0.0.0:9901".parse::<SocketAddr>().unwrap(), "probed and scraped from outside");
        assert!(!config.listeners.is_empty());
        for l in &config.listeners {
            assert!(l.bind.ip().is_loopback(), "listener {} is for the app only", l.name);
        }
        let app = pod.env("app");
        let listener = config.listeners[0].bind;
        assert_eq!(app["ZKROUTE_URL"], format!("http://{listener}"), "the app is pointed at the listener");
    }
}

#[test]
fn the_pod_registers_its_own_ip_through_zkroute_register() {
    for pod in Pod::both() {
        let env = pod.env("zkroute");
        let register = &env["ZKROUTE_REGISTER"];

        // In-process, as the flag or variable would be applied over the mounted file.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("zkroute.toml");
        std::fs::write(&file, pod.config_text()).unwrap();
        let config = Config::load(&ConfigArgs::default().with_file(file.clone()).set("register", register.as_str()))
            .unwrap_or_else(|e| panic!("{e}"));
        let r = &config.registrations[..];
        assert_eq!(r.len(), 1, "{register}");
        let app_port = pod.port("app", "http");
        assert_eq!((r[0].address.as_str(), r[0].port), (POD_IP, app_port), "registered at the pod IP and app port");
        let check = r[0].health_check.as_ref().expect("health-gated");
        assert_eq!(check.url.as_deref(), Some(format!("http://127.0.0.1:{app_port}/health").as_str()));
        let version = &pod.deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"];
        assert_eq!(r[0].payload.metadata["version"], text(version, "version label"));

        // And through the real variable, as the binary reads it.
        let out = zkroute(&["check-config", file.to_str().unwrap()], &[("ZKROUTE_REGISTER", register)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("1 registrations"), "{stdout}");
    }
}

#[test]
fn the_probes_use_the_admin_port_that_the_configmap_binds() {
    for pod in Pod::both() {
        let config = pod.config();
        let zk = pod.container("zkroute");
        assert_eq!(pod.port("zkroute", "zkroute-admin"), config.admin.bind.port());
        for (probe, path) in [("readinessProbe", "/ready"), ("livenessProbe", "/healthz")] {
            assert_eq!(zk[probe]["httpGet"]["path"], path, "{probe}");
            assert_eq!(zk[probe]["httpGet"]["port"], "zkroute-admin", "{probe}");
        }
    }
}

#[test]
fn the_native_sidecar_is_drained_by_the_apps_pre_stop_and_stopped_after_the_app() {
    let pod = Pod::read_from(NATIVE);
    let config = pod.effective_config();
    let zk = pod.container("zkroute");
    let init = array(&pod.spec()["initContainers"], "initContainers");
    assert!(init.iter().any(|c| c["name"] == "zkroute"), "zkroute is an init container");
    assert_eq!(zk["restartPolicy"], "Always", "a native sidecar: started before the app, stopped after");
    assert_eq!(zk["startupProbe"]["httpGet"]["path"], "/ready", "the app starts once routes are loaded");
    assert!(zk["lifecycle"].is_null(), "zkroute's own SIGTERM comes after the app's exit");

    // The app's preStop drains zkroute, with the token the config requires off loopback.
    let hook = &pod.container("app")["lifecycle"]["preStop"]["httpGet"];
    assert_eq!(hook["path"], "/drain");
    assert_eq!(hook["port"].as_u64(), Some(config.admin.bind.port().into()));
    assert!(!config.admin.bind.ip().is_loopback(), "kubelet's hook comes from the node to the pod IP");
    let headers = array(&hook["httpHeaders"], "httpHeaders");
    let token = headers.iter().find(|h| h["name"] == "x-zkroute-drain-token").expect("the token header");
    assert_eq!(token["value"].as_str(), config.admin.drain_token.as_deref(), "the header matches admin.drain_token");

    // /drain waits drain_delay (and the delete); then the app stops, then zkroute drains.
    let drain_delay = config.registrations.iter().map(|r| r.drain_delay.0).max().expect("a registration");
    assert!(drain_delay >= Duration::from_secs(2), "other sidecars get time to see the draining mark");
    let grace = seconds(&pod.spec()["terminationGracePeriodSeconds"]);
    assert!(grace > drain_delay + DEREGISTER_BOUND + config.proxy.drain_timeout.0, "grace {grace:?}");
}

#[test]
fn before_1_29_zkroute_keeps_accepting_until_the_app_has_stopped() {
    let pod = Pod::read_from(PRE_1_29);
    let config = pod.effective_config();
    let zk = pod.container("zkroute");
    assert!(pod.spec()["initContainers"].is_null(), "no native sidecars before 1.29");
    assert!(zk["lifecycle"].is_null(), "zkroute takes SIGTERM at once: a preStop would delay its deregistration");
    let app_pre_stop = &pod.container("app")["lifecycle"]["preStop"]["exec"]["command"];
    let app_pre_stop: Vec<&str> = array(app_pre_stop, "command").iter().map(|a| text(a, "arg")).collect();
    assert_eq!(app_pre_stop[0], "sleep");
    let app_pre_stop = Duration::from_secs(app_pre_stop[1].parse().unwrap());
    let shutdown_delay = config.proxy.shutdown_delay.0;
    assert!(
        shutdown_delay > app_pre_stop,
        "zkroute accepts ({shutdown_delay:?}) longer than the app lives after SIGTERM ({app_pre_stop:?})"
    );
    let grace = seconds(&pod.spec()["terminationGracePeriodSeconds"]);
    let drain_delay = config.registrations.iter().map(|r| r.drain_delay.0).max().expect("a registration");
    assert!(grace > drain_delay + DEREGISTER_BOUND + shutdown_delay + config.proxy.drain_timeout.0, "grace {grace:?}");
}

#[test]
fn the_sidecar_is_sized_non_root_and_writes_only_its_snapshot_volume() {
    for pod in Pod::both() {
        let zk = pod.container("zkroute");
        let resources = &zk["resources"];
        let (request, limit) = (mebibytes(&resources["requests"]["memory"]), mebibytes(&resources["limits"]["memory"]));
        assert!(request >= 16 && request <= limit, "memory request {request}Mi, limit {limit}Mi");
        assert_eq!(pod.spec()["securityContext"]["runAsNonRoot"], true);
        let security = &zk["securityContext"];
        assert!(security["runAsUser"].as_u64().unwrap() > 0);
        assert_eq!(security["readOnlyRootFilesystem"], true);
        assert_eq!(security["allowPrivilegeEscalation"], false);

        let snapshot = pod.config().zookeeper.snapshot.expect("the ConfigMap keeps a snapshot");
        let mounts = array(&zk["volumeMounts"], "volumeMounts");
        let mount = mounts
            .iter()
            .find(|m| Path::new(text(&m["mountPath"], "mountPath")) == snapshot.parent().unwrap())
            .unwrap_or_else(|| panic!("the snapshot's directory {} is not a volume", snapshot.display()));
        assert!(mount["readOnly"] != true, "the snapshot volume is writable");
        assert_eq!(zk["image"], "zkroute:latest");
    }
}

#[test]
fn the_podmonitor_scrapes_the_named_admin_port_of_the_sidecar_pods() {
    let pod = Pod::read();
    let monitor = yaml("deploy/kubernetes/podmonitor.yaml");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["kind"], "PodMonitor");
    let endpoints = array(&monitor["spec"]["podMetricsEndpoints"], "podMetricsEndpoints");
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], "zkroute-admin");
    assert_eq!(endpoints[0]["path"], "/metrics");
    pod.port("zkroute", "zkroute-admin");
    let labels = &pod.deployment["spec"]["template"]["metadata"]["labels"];
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the pod template carries the selected label {k}");
    }
}

// ---- deploy/compose ---------------------------------------------------------------------------

struct Compose {
    file: Value,
}

impl Compose {
    fn read() -> Compose {
        Compose { file: yaml("deploy/compose/docker-compose.yml") }
    }

    fn service(&self, name: &str) -> &Value {
        let s = &self.file["services"][name];
        assert!(s.is_object(), "no Compose service {name}");
        s
    }

    fn services(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.file["services"].as_object().unwrap().iter()
    }

    /// The file mounted at `target` in `service`, as a path under deploy/compose/.
    fn mounted(&self, service: &str, target: &str) -> String {
        array(&self.service(service)["volumes"], "volumes")
            .iter()
            .find_map(|v| {
                let mut parts = text(v, "volume").split(':');
                let (source, at) = (parts.next()?, parts.next()?);
                (at == target).then(|| format!("deploy/compose/{source}"))
            })
            .unwrap_or_else(|| panic!("{service} mounts nothing at {target}"))
    }

    /// The zkroute configuration of a zkroute service: the file mounted where --config points.
    fn zkroute_config(&self, service: &str) -> Config {
        let command: Vec<&str> =
            array(&self.service(service)["command"], "command").iter().map(|a| text(a, "arg")).collect();
        assert_eq!(command[0], "--config", "{service}");
        let path = self.mounted(service, command[1]);
        let dir = tempfile::tempdir().unwrap();
        load_config(&read(&path), &path, dir.path())
    }

    fn zkroutes(&self) -> Vec<String> {
        self.services().filter(|(_, s)| s["image"] == "zkroute:latest").map(|(n, _)| n.clone()).collect()
    }

    /// Whether `container_port` of `service` is published to the host.
    fn published(&self, service: &str, container_port: u16) -> bool {
        array(&self.service(service)["ports"], "ports")
            .iter()
            .any(|p| text(p, "port").rsplit(':').next() == Some(&container_port.to_string()))
    }
}

#[test]
fn the_compose_services_use_zookeeper_3_8_and_build_zkroute_from_the_repository() {
    let compose = Compose::read();
    assert_eq!(compose.service("zookeeper")["image"], "zookeeper:3.8");
    let zkroutes = compose.zkroutes();
    assert!(zkroutes.len() >= 3, "two registering sidecars and a client: {zkroutes:?}");
    for name in &zkroutes {
        let build = text(&compose.service(name)["build"], "build");
        assert!(repo("deploy/compose").join(build).join("Dockerfile").is_file(), "{name} builds the Dockerfile");
        let config = compose.zkroute_config(name);
        let host = config.zookeeper.connect.split(':').next().unwrap();
        compose.service(host);
    }
}

#[test]
fn each_backend_registers_itself_through_a_sidecar_in_its_network_namespace() {
    let compose = Compose::read();
    let mut registered = BTreeSet::new();
    for name in compose.zkroutes() {
        let Some(mode) = compose.service(&name)["network_mode"].as_str() else { continue };
        let backend = mode.strip_prefix("service:").expect("network_mode: service:<backend>");
        let listen = array(&compose.service(backend)["command"], "command")
            .iter()
            .find_map(|a| text(a, "arg").strip_prefix("-listen="))
            .unwrap_or_else(|| panic!("{backend} says where it listens"));
        let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
        let config = compose.zkroute_config(&name);
        assert!(config.listeners.is_empty(), "{name} only registers");
        let [r] = &config.registrations[..] else { panic!("{name}: one registration") };
        assert_eq!((r.address.as_str(), r.port), (backend, port), "{name} registers what clients reach");
        let url = r.health_check.as_ref().and_then(|c| c.url.clone()).expect("health-gated");
        assert_eq!(url, format!("http://127.0.0.1:{port}/health"), "{name} checks its backend on loopback");
        registered.insert((r.service.clone(), backend.to_owned()));
    }
    let backends: BTreeSet<_> = registered.iter().map(|(_, b)| b.clone()).collect();
    assert_eq!(backends.len(), 2, "two backends: {registered:?}");
    let services: BTreeSet<_> = registered.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(services.len(), 1, "both are instances of one service: {registered:?}");
}

#[test]
fn the_client_zkroute_routes_to_the_registered_service_on_published_ports() {
    let compose = Compose::read();
    let registered: BTreeSet<String> =
        compose.zkroutes().iter().flat_map(|n| compose.zkroute_config(n).registrations).map(|r| r.service).collect();
    let client = compose.zkroute_config("zkroute");
    assert!(client.registrations.is_empty());
    let web = client.listeners.iter().find(|l| l.service.is_some()).expect("a port-per-service listener");
    assert!(registered.contains(web.service.as_ref().unwrap()), "{:?} is a registered service", web.service);
    assert!(compose.published("zkroute", web.bind.port()), "listener {} is published", web.name);
    assert!(compose.published("zkroute", client.admin.bind.port()), "the admin port is published");
}

#[test]
fn compose_prometheus_scrapes_the_admin_port_of_every_zkroute() {
    let compose = Compose::read();
    let config_at = compose.service("prometheus")["command"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config.file="))
        .expect("--config.file");
    let prometheus_yml = compose.mounted("prometheus", config_at);
    let prometheus = yaml(&prometheus_yml);
    let targets: BTreeSet<&str> = array(&prometheus["scrape_configs"], "scrape_configs")
        .iter()
        .flat_map(|job| array(&job["static_configs"], "static_configs"))
        .flat_map(|sc| array(&sc["targets"], "targets"))
        .map(|t| text(t, "target"))
        .collect();
    for name in compose.zkroutes() {
        let admin = compose.zkroute_config(&name).admin.bind;
        assert!(!admin.ip().is_loopback(), "{name}'s admin port is reachable by Prometheus");
        // A sidecar is reached by the name of the service whose network namespace it shares.
        let host = compose.service(&name)["network_mode"].as_str().and_then(|m| m.strip_prefix("service:"));
        let target = format!("{}:{}", host.unwrap_or(&name), admin.port());
        assert!(targets.contains(target.as_str()), "{target} is scraped: {targets:?}");
    }
    for rules in array(&prometheus["rule_files"], "rule_files") {
        let at = Path::new(config_at).parent().unwrap().join(text(rules, "rule file"));
        assert!(repo(&compose.mounted("prometheus", at.to_str().unwrap())).is_file(), "{} is mounted", at.display());
    }
}

#[test]
fn compose_prometheus_config_passes_promtool_where_available() {
    let compose = Compose::read();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo("deploy/compose/prometheus.yml"), dir.path().join("prometheus.yml")).unwrap();
    let alerts = compose.mounted("prometheus", "/etc/prometheus/alerts.yml");
    std::fs::copy(repo(&alerts), dir.path().join("alerts.yml")).unwrap();
    let Some(out) = external("promtool", &["check", "config", dir.path().join("prometheus.yml").to_str().unwrap()])
    else {
        return;
    };
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

// ---- deploy/systemd ---------------------------------------------------------------------------

/// `Key=value` lines of a unit file (the last of a repeated key wins, as for most keys).
fn unit_keys(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_systemd_unit_outwaits_the_longest_drain_and_keeps_the_snapshot_directory() {
    let keys = unit_keys(&read("deploy/systemd/zkroute.service"));
    assert_eq!(keys["ExecStart"], "/usr/local/bin/zkroute --config /etc/zkroute/zkroute.toml");
    assert_eq!(keys["ExecReload"], "/bin/kill -HUP $MAINPID");
    assert_eq!(keys["KillSignal"], "SIGTERM");
    assert_eq!(keys["Restart"], "on-failure");
    assert!(keys["User"] != "root");
    let stop = humantime::parse_duration(&keys["TimeoutStopSec"]).unwrap();
    let state = Path::new("/var/lib").join(&keys["StateDirectory"]);
    for (name, c) in example_configs() {
        let needed =
            c.proxy.drain_timeout.0 + if c.registrations.is_empty() { Duration::ZERO } else { DEREGISTER_BOUND };
        assert!(stop > needed, "TimeoutStopSec {stop:?} must exceed {name}'s drain ({needed:?})");
        if let Some(snapshot) = &c.zookeeper.snapshot {
            assert_eq!(snapshot.parent().unwrap(), state, "{name}'s snapshot is in the writable StateDirectory");
        }
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_where_available() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's program exists: point it at the binary under test.
    let unit = read("deploy/systemd/zkroute.service").replace("/usr/local/bin/zkroute", env!("CARGO_BIN_EXE_zkroute"));
    let path = dir.path().join("zkroute.service");
    std::fs::write(&path, unit).unwrap();
    let Some(out) = external("systemd-analyze", &["verify", path.to_str().unwrap()]) else { return };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("zkroute.service:"), "warnings about the unit: {stderr}");
}

// ---- the command line ---------------------------------------------------------------------------

fn help(args: &[&str]) -> String {
    let out = zkroute(args, &[]);
    assert!(out.status.success(), "zkroute {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scalar keys set in a TOML document, dotted, outside arrays of tables (`[[listener]]` ...)
/// and inline-table values (`[proxy.health_check]`, which have no flag of their own).
fn scalar_keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        match v {
            toml::Value::Table(t) if prefix.is_empty() => scalar_keys(t, &format!("{k}."), out),
            toml::Value::Table(_) | toml::Value::Array(_) => {}
            _ => {
                out.insert(format!("{prefix}{k}"));
            }
        }
    }
}

#[test]
fn help_names_the_subcommands_and_every_key_the_examples_use_as_flag_and_variable() {
    let top = help(&["--help"]);
    for word in ["run", "check-config", "ctl", "--config", "ZKROUTE_CONFIG", "--listener", "ZKROUTE_LISTENER"] {
        assert!(top.contains(word), "{word} missing from zkroute --help");
    }
    assert!(top.contains("--register") && top.contains("ZKROUTE_REGISTER"), "registrations as flags");
    let mut keys = BTreeSet::new();
    for entry in std::fs::read_dir(repo("deploy/config")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".toml") && !ROUTE_FILES.contains(&name.as_str()) {
            scalar_keys(&read(&format!("deploy/config/{name}")).parse().unwrap(), "", &mut keys);
        }
    }
    assert!(keys.len() > 20, "{keys:?}");
    for key in &keys {
        let flag = format!("--{}", key.replace(['.', '_'], "-"));
        let var = format!("ZKROUTE_{}", key.replace('.', "_").to_uppercase());
        assert!(top.contains(&format!("{flag} ")), "{flag} ({key}) missing from zkroute --help");
        assert!(top.contains(&format!("[env: {var}]")), "{var} ({key}) missing from zkroute --help");
    }
    let check = help(&["check-config", "--help"]);
    assert!(check.contains("<FILE>"), "{check}");
}

#[test]
fn ctl_help_names_every_subcommand_and_their_key_flags() {
    let ctl = help(&["ctl", "--help"]);
    for word in ["services", "instances", "rules", "policies", "get", "put", "delete", "route", "--json", "--config"] {
        assert!(ctl.contains(word), "{word} missing from zkroute ctl --help");
    }
    let put = help(&["ctl", "put", "--help"]);
    assert!(put.contains("--expect-version"), "{put}");
    let route = help(&["ctl", "route", "--help"]);
    for flag in ["--listener", "--host", "--path", "--method", "--header"] {
        assert!(route.contains(flag), "{flag} missing from zkroute ctl route --help");
    }
}
