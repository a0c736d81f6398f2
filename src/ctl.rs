//! `zkroute ctl`: read and change what is in ZooKeeper, safely. Documents are validated with the
//! same code the proxy uses before anything is written, and an existing node is overwritten only
//! against the version the operator read (or with `--force`), so two operators cannot silently
//! overwrite each other. `route` answers which
//! rule and targets a request would get, computed from ZooKeeper now by the proxy's own builder.
//!
//! Exit codes: 0 done; 1 not found or refused; 2 usage or connection.

use std::fmt::Write as _;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{Value, json};
use zookeeper_client::{Acls, Client, CreateMode, Error as ZkError};

use crate::config::Config;
use crate::discovery::dubbo::Catalog;
use crate::discovery::formats::parse_instance;
use crate::discovery::zk;
use crate::endpoint::StateRegistry;
use crate::metrics::Metrics;
use crate::routing::build::Builder;
use crate::routing::documents::{Backend, Policy, Rule};
use crate::routing::{NodeKind, key_versions};
use crate::zookeeper::ZkSettings;

/// What a ctl command came to.
#[derive(Debug)]
pub enum Failure {
    /// Not found, or refused (invalid document, concurrent change): exit 1.
    Refused(String),
    /// Usage or connection: exit 2.
    Usage(String),
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 1,
            Failure::Usage(_) => 2,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Refused(m) | Failure::Usage(m) => m,
        }
    }
}

/// A kind of document node.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum DocKind {
    Rule,
    Policy,
}

/// The ctl subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Services under services_path (and Dubbo's, with zookeeper.dubbo_root), with their valid
    /// and invalid instance counts.
    Services,
    /// Instances of a service, in every format (Dubbo providers as the proxy sees them, with
    /// configurators applied), with parse errors shown.
    Instances { service: String },
    /// Rule nodes, valid or not.
    Rules,
    /// Policy nodes, valid or not.
    Policies,
    /// Print one rule or policy document with its version.
    Get { kind: DocKind, name: String },
    /// Validate a document (from FILE, or - for standard input) and write it. Creating a node
    /// needs nothing more; overwriting one needs --expect-version (compare-and-set against the
    /// version `get` printed) or --force.
    Put {
        kind: DocKind,
        name: String,
        file: String,
        /// Overwrite only if the node is still at this version (as `get` printed it).
        #[arg(long, conflicts_with = "force")]
        expect_version: Option<i32>,
        /// Overwrite whatever version the node is at.
        #[arg(long)]
        force: bool,
    },
    /// Delete a rule or policy node, compare-and-set.
    Delete {
        kind: DocKind,
        name: String,
        #[arg(long)]
        expect_version: Option<i32>,
    },
    /// Which rule and targets a request would get, from what is in ZooKeeper now.
    Route {
        #[arg(long)]
        listener: String,
        #[arg(long, default_value = "")]
        host: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value = "GET")]
        method: String,
        /// A request header, `name=value` (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
    },
}

/// Runs a command; returns what to print.
pub async fn run(config: &Config, settings: &ZkSettings, cmd: Command, json_out: bool) -> Result<String, Failure> {
    let client = tokio::time::timeout(settings.session_timeout + Duration::from_secs(1), settings.connect())
        .await
        .map_err(|_| Failure::Usage(format!("cannot reach ZooKeeper at {}: timed out", settings.connect)))?
        .map_err(|e| Failure::Usage(format!("cannot reach ZooKeeper at {}: {e}", settings.connect)))?;
    let paths = &settings.paths;
    let out = match cmd {
        Command::Services => services(&client, settings).await?,
        Command::Instances { service } => instances(&client, settings, &service).await?,
        Command::Rules => documents(&client, &paths.rules, DocKind::Rule).await?,
        Command::Policies => documents(&client, &paths.policies, DocKind::Policy).await?,
        Command::Get { kind, name } => get(&client, &node_path(settings, kind, &name)?, kind, &name).await?,
        Command::Put { kind, name, file, expect_version, force } => {
            let expect = match (expect_version, force) {
                (Some(v), _) => Expect::Version(v),
                (None, true) => Expect::Any,
                (None, false) => Expect::Absent,
            };
            put(&client, settings, &node_path(settings, kind, &name)?, kind, &name, &file, expect).await?
        }
        Command::Delete { kind, name, expect_version } => {
            delete(&client, &node_path(settings, kind, &name)?, expect_version).await?
        }
        Command::Route { listener, host, path, method, headers } => {
            route(&client, config, settings, &listener, &host, &path, &method, &headers).await?
        }
    };
    Ok(if json_out {
        let mut s = serde_json::to_string_pretty(&out.json).unwrap_or_default();
        s.push('\n');
        s
    } else {
        out.text
    })
}

/// A result, for people and for scripts.
struct Output {
    text: String,
    json: Value,
}

fn node_path(settings: &ZkSettings, kind: DocKind, name: &str) -> Result<String, Failure> {
    if name.is_empty() || name.contains('/') {
        return Err(Failure::Usage(format!("{name:?} is not a node name")));
    }
    let root = match kind {
        DocKind::Rule => &settings.paths.rules,
        DocKind::Policy => &settings.paths.policies,
    };
    Ok(format!("{}/{name}", root.trim_end_matches('/')))
}

/// How a node zkroute may not read is listed.
const UNREADABLE: &str = "unreadable: not authorized by the node's ACL (NoAuth)";

fn zk_failure(e: ZkError) -> Failure {
    match e {
        ZkError::NoNode => Failure::Refused("not found".into()),
        ZkError::BadVersion => {
            Failure::Refused("the node was changed concurrently (its version moved): read it again".into())
        }
        ZkError::NodeExists => Failure::Refused("the node was created concurrently: read it again".into()),
        ZkError::NoAuth => Failure::Refused("not authorized by the node's ACL".into()),
        e => Failure::Usage(format!("ZooKeeper: {e}")),
    }
}

async fn children(client: &Client, path: &str) -> Result<Vec<String>, Failure> {
    match client.list_children(path).await {
        Ok(mut c) => {
            c.sort();
            Ok(c)
        }
        Err(ZkError::NoNode) => Ok(Vec::new()),
        Err(e) => Err(zk_failure(e)),
    }
}

/// The Dubbo providers as the proxy sees them (configurators applied, name clashes decided), when
/// zkroute follows Dubbo.
async fn dubbo_catalog(client: &Client, settings: &ZkSettings) -> Result<Option<Catalog>, Failure> {
    if settings.paths.dubbo.is_none() {
        return Ok(None);
    }
    let read = zk::read_all(client, &settings.paths).await.map_err(zk_failure)?;
    let mut catalog = Catalog::new(&settings.paths);
    read.into_changes(&mut catalog);
    Ok(Some(catalog))
}

async fn services(client: &Client, settings: &ZkSettings) -> Result<Output, Failure> {
    let root = &settings.paths.services;
    let mut text = format!("{:<32} {:>9} {:>8}\n", "SERVICE", "INSTANCES", "INVALID");
    let mut list = Vec::new();
    for service in children(client, root).await? {
        let (mut ok, mut bad) = (0, 0);
        for id in children(client, &format!("{root}/{service}")).await? {
            match client.get_data(&format!("{root}/{service}/{id}")).await {
                Ok((data, _)) => match parse_instance(&data) {
                    Ok(_) => ok += 1,
                    Err(_) => bad += 1,
                },
                Err(ZkError::NoNode) => {}
                // Unreadable (its ACL): counted as invalid, as the proxy does.
                Err(ZkError::NoAuth) => bad += 1,
                Err(e) => return Err(zk_failure(e)),
            }
        }
        let _ = writeln!(text, "{service:<32} {ok:>9} {bad:>8}");
        list.push(json!({"service": service, "instances": ok, "invalid": bad}));
    }
    if let Some(catalog) = dubbo_catalog(client, settings).await? {
        for service in catalog.services() {
            let docs = catalog.sent(service).into_iter().flatten();
            let (ok, bad) =
                docs.fold((0, 0), |(ok, bad), (_, d)| if d.parsed.is_ok() { (ok + 1, bad) } else { (ok, bad + 1) });
            let _ = writeln!(text, "{service:<32} {ok:>9} {bad:>8}  (dubbo)");
            list.push(json!({"service": service, "instances": ok, "invalid": bad, "source": "dubbo"}));
        }
    }
    Ok(Output { text, json: Value::Array(list) })
}

async fn instances(client: &Client, settings: &ZkSettings, service: &str) -> Result<Output, Failure> {
    let root = &settings.paths.services;
    let ids = children(client, &format!("{root}/{service}")).await?;
    let catalog = dubbo_catalog(client, settings).await?;
    let dubbo = catalog.as_ref().and_then(|c| c.sent(&crate::routing::ServiceName::new(service)));
    if ids.is_empty() && dubbo.is_none() && matches!(client.check_stat(&format!("{root}/{service}")).await, Ok(None)) {
        return Err(Failure::Refused(format!("no service {service:?} under {root}")));
    }
    let mut text = format!("{:<24} {:<10} {:<22} {:>6} {:<8} DETAIL\n", "ID", "FORMAT", "ADDRESS", "WEIGHT", "ENABLED");
    let mut list = Vec::new();
    for id in ids {
        let path = format!("{root}/{service}/{id}");
        let (data, stat) = match client.get_data(&path).await {
            Ok(d) => d,
            Err(ZkError::NoNode) => continue,
            Err(ZkError::NoAuth) => {
                let _ = writeln!(text, "{id:<24} {:<10} {:<22} {:>6} {:<8} {UNREADABLE}", "invalid", "-", "-", "-");
                list.push(json!({"id": id, "error": UNREADABLE}));
                continue;
            }
            Err(e) => return Err(zk_failure(e)),
        };
        match parse_instance(&data) {
            Ok(i) => {
                let detail = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                let _ = writeln!(
                    text,
                    "{id:<24} {:<10} {:<22} {:>6} {:<8} {detail}",
                    format!("{:?}", i.format).to_lowercase(),
                    i.addr.to_string(),
                    i.weight,
                    i.enabled
                );
                let mut v = serde_json::to_value(&i).unwrap_or_default();
                v["id"] = json!(id);
                v["version"] = json!(stat.version);
                list.push(v);
            }
            Err(e) => {
                let _ = writeln!(text, "{id:<24} {:<10} {:<22} {:>6} {:<8} {e}", "invalid", "-", "-", "-");
                list.push(json!({"id": id, "error": e.to_string(), "version": stat.version}));
            }
        }
    }
    for (id, doc) in dubbo.into_iter().flatten() {
        // The node name is the URL-encoded provider URL: shown decoded, up to its parameters.
        let url = crate::discovery::dubbo::url::decode(id).unwrap_or_else(|_| id.to_string());
        let short = url.split('?').next().unwrap_or(&url);
        match &doc.parsed {
            Ok(i) => {
                let protocol = i.protocol.map(|p| format!("{p:?}").to_lowercase()).unwrap_or_default();
                let detail = i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
                let _ = writeln!(
                    text,
                    "{short:<24} {:<10} {:<22} {:>6} {:<8} protocol={protocol} {detail}",
                    "dubbo",
                    i.addr.to_string(),
                    i.weight,
                    i.enabled
                );
                let mut v = serde_json::to_value(&**i).unwrap_or_default();
                v["id"] = json!(&**id);
                v["source"] = json!("dubbo");
                list.push(v);
            }
            Err(e) => {
                let _ = writeln!(text, "{short:<24} {:<10} {:<22} {:>6} {:<8} {e}", "invalid", "-", "-", "-");
                list.push(json!({"id": &**id, "error": e, "source": "dubbo"}));
            }
        }
    }
    Ok(Output { text, json: Value::Array(list) })
}

fn validate(kind: DocKind, name: &str, data: &[u8]) -> Result<String, String> {
    match kind {
        DocKind::Rule => Rule::parse(name, data).map(|r| describe_rule(&r)).map_err(|e| e.to_string()),
        DocKind::Policy => Policy::parse(data).map(|p| format!("lb {:?}", p.lb)).map_err(|e| e.to_string()),
    }
}

/// The oldest zkroute that accepts a (valid) document, and what to tell the operator about it:
/// older sidecars refuse the document and keep its previous version.
fn needs(kind: DocKind, data: &[u8]) -> (key_versions::Version, String) {
    let node = match kind {
        DocKind::Rule => NodeKind::Rule,
        DocKind::Policy => NodeKind::Policy,
    };
    let doc: Value = serde_json::from_slice(data).unwrap_or(Value::Null);
    let (version, key) = key_versions::required(node, &doc);
    let text = match key {
        Some(key) => format!(
            "needs zkroute {version} or later (it uses `{key}`): older sidecars refuse it and keep the previous version"
        ),
        None => format!("needs zkroute {version} or later"),
    };
    (version, text)
}

fn describe_rule(r: &Rule) -> String {
    let targets: Vec<String> = r
        .backends
        .iter()
        .map(|b| match b {
            Backend::Service { service, weight, .. } => format!("{service}({weight})"),
            Backend::Address { addr, weight } => format!("{addr}({weight})"),
        })
        .collect();
    let m = serde_json::to_string(&r.doc.match_).unwrap_or_default();
    format!("listener={} priority={} match={m} -> {}", r.listener, r.priority, targets.join(" "))
}

async fn documents(client: &Client, root: &str, kind: DocKind) -> Result<Output, Failure> {
    let mut text = String::new();
    let mut list = Vec::new();
    for name in children(client, root).await? {
        let (data, stat) = match client.get_data(&format!("{root}/{name}")).await {
            Ok(d) => d,
            Err(ZkError::NoNode) => continue,
            Err(ZkError::NoAuth) => {
                let _ = writeln!(text, "{name:<24} {:<5} INVALID: {UNREADABLE}", "-");
                list.push(json!({"name": name, "valid": false, "error": UNREADABLE}));
                continue;
            }
            Err(e) => return Err(zk_failure(e)),
        };
        match validate(kind, &name, &data) {
            Ok(summary) => {
                let _ = writeln!(text, "{name:<24} v{:<4} {summary}", stat.version);
                list.push(json!({"name": name, "version": stat.version, "valid": true, "summary": summary}));
            }
            Err(e) => {
                let _ = writeln!(text, "{name:<24} v{:<4} INVALID: {e}", stat.version);
                list.push(json!({"name": name, "version": stat.version, "valid": false, "error": e}));
            }
        }
    }
    Ok(Output { text, json: Value::Array(list) })
}

async fn get(client: &Client, path: &str, kind: DocKind, name: &str) -> Result<Output, Failure> {
    let (data, stat) = client.get_data(path).await.map_err(|e| match e {
        ZkError::NoNode => Failure::Refused(format!("{path}: not found")),
        e => zk_failure(e),
    })?;
    let text_data = String::from_utf8_lossy(&data).into_owned();
    let doc: Value = serde_json::from_slice(&data).unwrap_or(Value::String(text_data.clone()));
    let check = validate(kind, name, &data);
    let pretty = serde_json::to_string_pretty(&doc).unwrap_or(text_data);
    let status = match &check {
        Ok(_) => "valid".to_owned(),
        Err(e) => format!("INVALID: {e}"),
    };
    Ok(Output {
        text: format!("# {path} version {} mzxid {} ({status})\n{pretty}\n", stat.version, stat.mzxid),
        json: json!({"path": path, "version": stat.version, "mzxid": stat.mzxid, "valid": check.is_ok(),
                     "error": check.err(), "document": doc}),
    })
}

/// What `put` may overwrite.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Nothing: the node must not exist yet.
    Absent,
    /// The node at this version (or, if it does not exist, nothing).
    Version(i32),
    /// Anything (`--force`).
    Any,
}

async fn put(
    client: &Client,
    settings: &ZkSettings,
    path: &str,
    kind: DocKind,
    name: &str,
    file: &str,
    expect: Expect,
) -> Result<Output, Failure> {
    let data = if file == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).map_err(|e| Failure::Usage(format!("reading standard input: {e}")))?;
        buf
    } else {
        std::fs::read(file).map_err(|e| Failure::Usage(format!("{file}: {e}")))?
    };
    let summary =
        validate(kind, name, &data).map_err(|e| Failure::Refused(format!("refused, nothing written: {e}")))?;
    let current = client.check_stat(path).await.map_err(zk_failure)?;
    let stat = match (current, expect) {
        (None, Expect::Version(v)) => {
            return Err(Failure::Refused(format!("{path} does not exist (expected version {v})")));
        }
        (None, _) => {
            let parent = &path[..path.rfind('/').unwrap_or(0)];
            if !parent.is_empty() {
                // Parents stay open, so that others can add their own children.
                match client.mkdir(parent, &CreateMode::Persistent.with_acls(Acls::anyone_all())).await {
                    Ok(()) | Err(ZkError::NodeExists) => {}
                    Err(e) => return Err(zk_failure(e)),
                }
            }
            client
                .create(path, &data, &CreateMode::Persistent.with_acls(settings.leaf_acls()))
                .await
                .map_err(zk_failure)?
                .0
        }
        (Some(stat), Expect::Absent) => {
            return Err(Failure::Refused(format!(
                "{path} exists (version {}): read it with `get`, then write with --expect-version {} (or --force)",
                stat.version, stat.version
            )));
        }
        (Some(_), Expect::Version(v)) => client.set_data(path, &data, Some(v)).await.map_err(zk_failure)?,
        (Some(_), Expect::Any) => client.set_data(path, &data, None).await.map_err(zk_failure)?,
    };
    let (version, needs) = needs(kind, &data);
    Ok(Output {
        text: format!("{path}: written, version {} ({summary})\n{needs}\n", stat.version),
        json: json!({"path": path, "version": stat.version, "mzxid": stat.mzxid, "needs": version.to_string()}),
    })
}

async fn delete(client: &Client, path: &str, expect: Option<i32>) -> Result<Output, Failure> {
    let stat = client
        .check_stat(path)
        .await
        .map_err(zk_failure)?
        .ok_or_else(|| Failure::Refused(format!("{path}: not found")))?;
    client.delete(path, Some(expect.unwrap_or(stat.version))).await.map_err(zk_failure)?;
    Ok(Output { text: format!("{path}: deleted\n"), json: json!({"path": path, "deleted": true}) })
}

#[allow(clippy::too_many_arguments)]
async fn route(
    client: &Client,
    config: &Config,
    settings: &ZkSettings,
    listener: &str,
    host: &str,
    path: &str,
    method: &str,
    headers: &[String],
) -> Result<Output, Failure> {
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| Failure::Usage(format!("{method:?} is not a method")))?;
    let mut map = HeaderMap::new();
    for h in headers {
        let (k, v) = h.split_once('=').ok_or_else(|| Failure::Usage(format!("--header {h:?}: expected name=value")))?;
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| Failure::Usage(format!("{k:?} is not a header name")))?;
        let value =
            HeaderValue::from_str(v.trim()).map_err(|_| Failure::Usage(format!("{v:?} is not a header value")))?;
        map.append(name, value);
    }
    let read = zk::read_all(client, &settings.paths).await.map_err(zk_failure)?;
    let defaults = config.defaults().map_err(|e| Failure::Usage(e.to_string()))?;
    let mut builder = Builder::new(
        config.listener_specs(),
        defaults,
        Arc::new(StateRegistry::new(Duration::from_secs(1))),
        Arc::new(Metrics::new(false)),
    );
    for change in read.into_changes(&mut Catalog::new(&settings.paths)) {
        builder.apply(change);
    }
    let (table, _) = builder.build();
    let routes = table
        .listener_by_name(listener)
        .ok_or_else(|| Failure::Usage(format!("no listener {listener:?} in the local configuration")))?;
    let host = (!host.is_empty()).then_some(host);
    let Some(route) = routes.route(host, path, &method, &map) else {
        return Err(Failure::Refused(format!(
            "no rule of listener {listener:?} matches: the proxy answers 404 no_route"
        )));
    };
    let mut text = format!("rule {} (timeout {:?}, retries {})\n", route.id, route.timeout, route.retries);
    let mut targets = Vec::new();
    for t in route.targets.iter() {
        let what = match &t.backend {
            Backend::Service { service, subset, endpoint, .. } => {
                let mut s = format!("service {service}");
                if !subset.is_empty() {
                    let _ = write!(s, " subset {subset:?}");
                }
                if let Some(e) = endpoint {
                    let _ = write!(s, " endpoint {e}");
                }
                s
            }
            Backend::Address { addr, .. } => format!("address {addr}"),
        };
        let endpoints: Vec<String> =
            t.set.endpoints.iter().filter(|e| !e.draining && e.weight > 0).map(|e| e.addr.to_string()).collect();
        let _ = writeln!(
            text,
            "  weight {:>5}  {what}  ->  {}",
            t.weight,
            if endpoints.is_empty() { "(no endpoints)".to_owned() } else { endpoints.join(" ") }
        );
        targets.push(json!({"weight": t.weight, "target": what, "service": t.set.service, "endpoints": endpoints}));
    }
    Ok(Output {
        text,
        json: json!({"rule": &*route.id, "timeout_ms": route.timeout.as_millis() as u64, "retries": route.retries, "targets": targets}),
    })
}
