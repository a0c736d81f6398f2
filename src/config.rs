//! Local configuration (README: "Configuration"): a TOML file, every key also a flag and a `ZKROUTE_*`
//! variable. Flags and variables override the file. Loading is pure apart from reading the file;
//! every error names the file, the key and the reason.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::routing::build::{Defaults, ListenerSpec};
use crate::routing::documents::{HealthCheckDoc, OutlierDoc, Policy, PolicyDoc};
use crate::routing::table::Protocol;
use crate::routing::{Addr, MAX_WEIGHT, ServiceName};

/// A value that does not validate: which key (the whole path, `proxy.lb`), and why. A
/// [`ConfigError`] once the file it came from is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct KeyError {
    pub key: String,
    pub reason: String,
}

impl KeyError {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        KeyError { key: key.into(), reason: reason.into() }
    }
}

/// A configuration problem: where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}: {key}: {reason}")]
pub struct ConfigError {
    /// The file, or "command line or environment" for a flag or `ZKROUTE_*` variable.
    pub source_name: String,
    pub key: String,
    pub reason: String,
}

/// A duration written as humantime text ("10s", "1m 30s", "250ms").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(HumanDuration)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not a duration ({e}); write e.g. \"10s\"")))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

fn secs(s: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(s))
}

/// The whole local configuration.
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub zookeeper: ZookeeperConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default, rename = "register")]
    pub registrations: Vec<RegisterConfig>,
    #[serde(default, rename = "static")]
    pub static_file: Option<StaticConfig>,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// This sidecar's identity and trust towards upstreams (README: "TLS").
    #[serde(default)]
    pub tls: Option<crate::tls::UpstreamFiles>,
    /// The file this was loaded from, for messages.
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ZookeeperConfig {
    /// Ensemble and optional chroot: "zk1:2181,zk2:2181,zk3:2181/prod".
    pub connect: String,
    pub session_timeout: HumanDuration,
    /// How long a start waits for ZooKeeper before serving from the snapshot.
    pub startup_timeout: HumanDuration,
    /// Longest random delay before the full read that follows a reconnect; by default a quarter
    /// of the session timeout, at most 2s.
    pub resync_jitter: Option<HumanDuration>,
    pub services_path: String,
    pub rules_path: String,
    pub policies_path: String,
    /// Dubbo's registry root (usually `/dubbo`): its providers are followed too. Unset: not.
    pub dubbo_root: Option<String>,
    /// Last-known-good table, for a cold start without ZooKeeper.
    pub snapshot: Option<PathBuf>,
    /// A snapshot written longer ago than this is not served.
    pub snapshot_max_age: HumanDuration,
    /// Digest credentials, "user:password". Never logged.
    #[serde(skip_serializing)]
    pub auth: Option<String>,
    /// A file holding the digest credentials, "user:password".
    pub auth_file: Option<PathBuf>,
    /// TLS to the servers' `secureClientPort` (README: "ZooKeeper over TLS"): `ca_file` (default
    /// the system's roots), `cert_file` and `key_file` (the client certificate).
    #[serde(skip_serializing)]
    pub tls: Option<crate::tls::UpstreamFiles>,
}

impl Default for ZookeeperConfig {
    fn default() -> Self {
        ZookeeperConfig {
            connect: "127.0.0.1:2181".into(),
            session_timeout: secs(10),
            startup_timeout: secs(3),
            resync_jitter: None,
            services_path: "/zkroute/services".into(),
            rules_path: "/zkroute/rules".into(),
            policies_path: "/zkroute/policies".into(),
            dubbo_root: None,
            snapshot: None,
            snapshot_max_age: secs(24 * 3600),
            auth: None,
            auth_file: None,
            tls: None,
        }
    }
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Serve `/config` and the dashboard (the whole table, with addresses). Off on hosts where
    /// that is sensitive.
    pub config_endpoint: bool,
    /// What `/drain` requires in `x-zkroute-drain-token` when `bind` is not a loopback address
    /// (README: "Stopping"); unset, `/drain` is refused there.
    #[serde(skip_serializing)]
    pub drain_token: Option<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { bind: SocketAddr::from(([127, 0, 0, 1], 9901)), config_endpoint: true, drain_token: None }
    }
}

/// Data-plane defaults and limits.
#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Whole-request timeout when a rule sets none.
    pub timeout: HumanDuration,
    /// Extra attempts when a rule or policy sets none.
    pub retries: u32,
    pub connect_timeout: HumanDuration,
    /// `p2c`, `round_robin`, or `ring_hash` (then with `hash_on`).
    pub lb: String,
    pub hash_on: Option<String>,
    pub panic_threshold_percent: u32,
    pub protect_from_empty: bool,
    /// How long health, outlier and pool state outlives an endpoint's removal.
    pub state_retention: HumanDuration,
    /// How long in-flight requests and connections may finish after SIGTERM.
    pub drain_timeout: HumanDuration,
    /// On SIGTERM, how long listeners keep accepting after the local app is deregistered (so
    /// that the app's own late outbound calls still go through); `/ready` is 503 meanwhile.
    pub shutdown_delay: HumanDuration,
    /// Closes an idle downstream HTTP keep-alive connection.
    pub idle_timeout: HumanDuration,
    /// Closes a TCP connection with no bytes either way for this long.
    pub tcp_idle_timeout: HumanDuration,
    /// Bytes that the TCP relay buffers of all connections together may grow into for bulk
    /// transfers, beyond the 16 KiB each direction starts with.
    pub tcp_relay_memory: usize,
    /// TCP congestion control for connections with both ends on this host; empty keeps the
    /// system's (`net.ipv4.tcp_congestion_control`). Unset: cubic where the kernel allows it.
    pub loopback_congestion: Option<String>,
    /// Time a client has to send a request's headers (slowloris).
    pub header_read_timeout: HumanDuration,
    /// Largest request header section; larger ones get 431.
    pub max_header_bytes: usize,
    /// Most open downstream connections per listener; more are refused.
    pub max_connections: usize,
    /// Resets an HTTP/2 stream with no bytes either way for this long.
    pub stream_idle_timeout: HumanDuration,
    /// Most concurrent streams a client may open on one HTTP/2 connection.
    pub h2_max_concurrent_streams: u32,
    /// Drops request header fields whose names hold an underscore, as nginx does.
    pub drop_underscore_headers: bool,
    /// Adds `x-request-id` to requests without one, and logs it in the access log.
    pub request_id: bool,
    /// This host's zone: requests stay in it while it is healthy enough (README: "Zone-aware
    /// routing"). Unset: zones are not used.
    pub zone: Option<String>,
    /// Idle upstream connections kept per endpoint.
    pub pool_max_idle: usize,
    /// Closes an idle upstream connection after this long.
    pub pool_idle_timeout: HumanDuration,
    /// Default active health check for services whose policy has none.
    #[serde(skip_serializing)]
    pub health_check: Option<HealthCheckDoc>,
    /// Default outlier detection for services whose policy has none.
    #[serde(skip_serializing)]
    pub outlier: Option<OutlierDoc>,
    /// Runtime worker threads; 0 means one per CPU, 1 runs everything on a single thread.
    pub workers: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        // What a rule or policy may leave out defaults to the routing table's own defaults.
        let d = Defaults::default();
        ProxyConfig {
            timeout: HumanDuration(d.timeout),
            retries: d.retries,
            connect_timeout: HumanDuration(d.connect_timeout),
            lb: d.lb.name().into(),
            hash_on: None,
            panic_threshold_percent: d.panic_threshold_percent,
            protect_from_empty: d.protect_from_empty,
            state_retention: secs(30),
            drain_timeout: secs(15),
            shutdown_delay: secs(0),
            idle_timeout: secs(60),
            tcp_idle_timeout: secs(3600),
            tcp_relay_memory: 64 << 20,
            loopback_congestion: None,
            header_read_timeout: secs(10),
            max_header_bytes: 64 * 1024,
            max_connections: 10_000,
            stream_idle_timeout: secs(300),
            h2_max_concurrent_streams: 100,
            drop_underscore_headers: false,
            request_id: false,
            zone: None,
            pool_max_idle: 64,
            pool_idle_timeout: secs(30),
            health_check: None,
            outlier: None,
            workers: 0,
        }
    }
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    /// Port-per-service: route everything to this service, no rule node needed.
    pub service: Option<String>,
    /// ServerSet named endpoint of `service` to send to.
    pub endpoint: Option<String>,
    /// Terminates TLS with these files (README: "TLS").
    #[serde(default)]
    pub tls: Option<crate::tls::ServerFiles>,
}

fn default_protocol() -> Protocol {
    Protocol::Http
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    pub service: String,
    pub address: String,
    pub port: u16,
    /// Node name; by default derived from address and port, so it is stable across restarts.
    pub id: Option<String>,
    pub health_check: Option<RegisterCheck>,
    #[serde(default)]
    pub payload: RegisterPayload,
    /// The payload's `@class` (Jackson's type id, which Curator readers resolve); `""` writes
    /// none, for a plain Curator `ServiceDiscovery` that lacks the class. Default: Spring Cloud
    /// Zookeeper's `ZookeeperInstance`.
    #[serde(default = "default_payload_class")]
    pub payload_class: String,
    /// On deregistration, how long the node stays marked `"enabled": false` (draining) before it
    /// is deleted, so that other sidecars stop sending to it first.
    #[serde(default = "default_drain_delay")]
    pub drain_delay: HumanDuration,
}

/// Spring Cloud Zookeeper's payload class: what its consumers need to read a registration.
pub const SPRING_PAYLOAD_CLASS: &str = "org.springframework.cloud.zookeeper.discovery.ZookeeperInstance";

fn default_payload_class() -> String {
    SPRING_PAYLOAD_CLASS.to_owned()
}

fn default_drain_delay() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterCheck {
    /// `http` (GET `url`, 2xx passes) or `tcp` (connect to `address`:`port`).
    pub kind: String,
    pub url: Option<String>,
    #[serde(default = "default_register_interval")]
    pub interval: HumanDuration,
    #[serde(default = "default_register_timeout")]
    pub timeout: HumanDuration,
    /// Passing checks in a row before registering.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failing checks in a row before deregistering.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_register_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_register_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    2
}

#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterPayload {
    pub weight: Option<u32>,
    pub zone: Option<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct StaticConfig {
    /// Services, rules and policies in one TOML file, reloaded when it changes.
    pub file: PathBuf,
}

#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Deserialize, Serialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// "stdout" or a file path; off when absent.
    pub access_log: Option<String>,
}

#[derive(Deserialize, Serialize, Debug, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Record data-plane metrics (the families stay registered either way).
    pub enabled: bool,
    /// Label upstream metrics with instance addresses too.
    pub per_instance: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { enabled: true, per_instance: false }
    }
}

// ---- keys, flags and variables --------------------------------------------------------------

#[derive(Clone, Copy)]
enum ValueKind {
    Str,
    Int,
    Bool,
    /// An inline TOML table, or an array of them, appended to an array of tables.
    Tables,
}

/// Every scalar key, settable as `--a-b` and `ZKROUTE_A_B` for key `a.b`.
const KEYS: &[(&str, ValueKind, &str)] = &[
    ("zookeeper.connect", ValueKind::Str, "ZooKeeper ensemble and chroot, e.g. zk1:2181,zk2:2181/prod"),
    ("zookeeper.session_timeout", ValueKind::Str, "ZooKeeper session timeout"),
    ("zookeeper.startup_timeout", ValueKind::Str, "wait this long for ZooKeeper at start before using the snapshot"),
    (
        "zookeeper.resync_jitter",
        ValueKind::Str,
        "longest random delay before the full read after a reconnect [default: session_timeout/4, at most 2s]",
    ),
    ("zookeeper.services_path", ValueKind::Str, "naming nodes"),
    ("zookeeper.rules_path", ValueKind::Str, "rule nodes"),
    ("zookeeper.policies_path", ValueKind::Str, "policy nodes"),
    (
        "zookeeper.dubbo_root",
        ValueKind::Str,
        "also route to the Dubbo providers registered under this root, e.g. /dubbo",
    ),
    ("zookeeper.snapshot", ValueKind::Str, "last-known-good table file, for a cold start without ZooKeeper"),
    ("zookeeper.snapshot_max_age", ValueKind::Str, "never serve a snapshot older than this"),
    ("zookeeper.auth", ValueKind::Str, "digest credentials user:password (prefer auth_file)"),
    ("zookeeper.auth_file", ValueKind::Str, "file holding digest credentials user:password"),
    ("admin.bind", ValueKind::Str, "admin address for / /metrics /healthz /ready /config"),
    ("admin.config_endpoint", ValueKind::Bool, "serve /config and the dashboard at /"),
    (
        "admin.drain_token",
        ValueKind::Str,
        "what /drain needs in x-zkroute-drain-token when admin.bind is not loopback [default: unset, refused there]",
    ),
    ("proxy.timeout", ValueKind::Str, "default whole-request timeout"),
    ("proxy.retries", ValueKind::Int, "default extra attempts"),
    ("proxy.connect_timeout", ValueKind::Str, "default upstream connect timeout"),
    ("proxy.lb", ValueKind::Str, "default balancer: p2c, round_robin, ring_hash"),
    ("proxy.hash_on", ValueKind::Str, "default ring_hash key: header:<name> or source_ip"),
    ("proxy.panic_threshold_percent", ValueKind::Int, "below this healthy share, use every instance"),
    ("proxy.protect_from_empty", ValueKind::Bool, "keep a service's last instances if all vanish at once"),
    ("proxy.state_retention", ValueKind::Str, "keep a removed endpoint's state this long"),
    ("proxy.drain_timeout", ValueKind::Str, "let in-flight work finish this long on SIGTERM"),
    ("proxy.shutdown_delay", ValueKind::Str, "keep accepting this long after deregistering on SIGTERM"),
    ("proxy.idle_timeout", ValueKind::Str, "close idle client HTTP connections after"),
    ("proxy.tcp_idle_timeout", ValueKind::Str, "close TCP connections idle for"),
    ("proxy.tcp_relay_memory", ValueKind::Int, "bytes all TCP relay buffers may grow into for bulk transfers"),
    (
        "proxy.loopback_congestion",
        ValueKind::Str,
        "TCP congestion control on loopback connections, \"\" = the system's [default: cubic if allowed]",
    ),
    ("proxy.header_read_timeout", ValueKind::Str, "time to receive request headers"),
    ("proxy.max_header_bytes", ValueKind::Int, "largest request header section"),
    ("proxy.max_connections", ValueKind::Int, "most client connections per listener"),
    ("proxy.stream_idle_timeout", ValueKind::Str, "reset HTTP/2 streams with no bytes either way for"),
    ("proxy.h2_max_concurrent_streams", ValueKind::Int, "most streams per HTTP/2 client connection"),
    ("proxy.drop_underscore_headers", ValueKind::Bool, "drop request headers with an underscore in their name"),
    ("proxy.request_id", ValueKind::Bool, "add x-request-id to requests without one, and log it"),
    ("proxy.zone", ValueKind::Str, "this host's zone, for zone-aware routing [default: unset, zones not used]"),
    ("proxy.pool_max_idle", ValueKind::Int, "idle upstream connections kept per endpoint"),
    ("proxy.pool_idle_timeout", ValueKind::Str, "close idle upstream connections after"),
    ("proxy.workers", ValueKind::Int, "runtime worker threads, 0 = one per CPU"),
    ("static.file", ValueKind::Str, "serve services and rules from this TOML file instead of ZooKeeper"),
    ("log.format", ValueKind::Str, "text or json"),
    ("log.access_log", ValueKind::Str, "access log: stdout or a file path [default: off]"),
    ("metrics.enabled", ValueKind::Bool, "record data-plane metrics"),
    ("metrics.per_instance", ValueKind::Bool, "label upstream metrics by instance address"),
    ("listener", ValueKind::Tables, "a listener as an inline table: '{name=\"http\", bind=\"127.0.0.1:15001\"}'"),
    ("register", ValueKind::Tables, "an instance to register, as an inline table"),
];

fn flag_name(key: &str) -> String {
    key.replace(['.', '_'], "-")
}

fn env_name(key: &str) -> String {
    format!("ZKROUTE_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// The defaults of the file's sections, as TOML values: stated once, in the `Default` impls
/// (and, for what rules and policies may leave out, the routing table's [`Defaults`]).
fn default_values() -> toml::Table {
    #[derive(Serialize)]
    struct Sections {
        zookeeper: ZookeeperConfig,
        admin: AdminConfig,
        proxy: ProxyConfig,
        log: LogConfig,
        metrics: MetricsConfig,
    }
    let c = Config::default();
    let sections = Sections { zookeeper: c.zookeeper, admin: c.admin, proxy: c.proxy, log: c.log, metrics: c.metrics };
    toml::Table::try_from(sections).unwrap_or_default()
}

/// A key's default as the file would write it; None where it has no value by default.
fn default_text(defaults: &toml::Table, key: &str) -> Option<String> {
    let (section, name) = key.split_once('.')?;
    match defaults.get(section)?.get(name)? {
        toml::Value::String(s) => Some(s.clone()),
        v => Some(v.to_string()),
    }
}

/// `--config` plus one flag per key; parsed by clap, merged over the file by [`Config::load`].
#[derive(Debug, Clone, Default)]
pub struct ConfigArgs {
    pub config: Option<PathBuf>,
    overrides: Vec<(&'static str, Vec<String>)>,
}

impl ConfigArgs {
    /// The same flags and variables over another file.
    pub fn with_file(mut self, file: PathBuf) -> Self {
        self.config = Some(file);
        self
    }

    /// Sets a key as if given as a flag (for tests and embedding).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        if let Some((k, _, _)) = KEYS.iter().find(|(k, _, _)| *k == key) {
            self.overrides.push((k, vec![value.into()]));
        }
        self
    }
}

impl FromArgMatches for ConfigArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut args = ConfigArgs { config: m.get_one::<PathBuf>("config").cloned(), overrides: Vec::new() };
        for (key, _, _) in KEYS {
            if let Some(values) = m.get_many::<String>(key) {
                args.overrides.push((key, values.cloned().collect()));
            }
        }
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl Args for ConfigArgs {
    fn augment_args(cmd: Command) -> Command {
        let cmd = cmd.arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .env("ZKROUTE_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .global(true)
                .help("TOML configuration file (see the README's Configuration section)"),
        );
        let defaults = default_values();
        KEYS.iter().fold(cmd, |cmd, (key, kind, help)| {
            // A default that is a value comes from the `Default` impls; one that is not (it
            // depends on another key, or means "off") is stated in the help text.
            let help = match default_text(&defaults, key) {
                Some(value) => format!("{help} [default: {value}]"),
                None => (*help).to_owned(),
            };
            // Table keys stay on the top-level command: `ctl route` has a `--listener` of its own.
            let arg = Arg::new(*key)
                .long(flag_name(key))
                .env(env_name(key))
                // Values are not echoed into --help: some are credentials (auth, drain_token).
                .hide_env_values(true)
                .help(help)
                .global(!matches!(kind, ValueKind::Tables))
                .help_heading("Configuration keys (each also a ZKROUTE_* variable)");
            let arg = match kind {
                ValueKind::Tables => arg.action(ArgAction::Append).value_name("TABLE"),
                ValueKind::Bool => arg.value_name("BOOL"),
                _ => arg.value_name("VALUE"),
            };
            cmd.arg(arg)
        })
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

const FROM_FLAGS: &str = "command line or environment";

impl Config {
    /// Reads the file (if any), applies flags and variables, and validates.
    pub fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
        let (text, name) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    source_name: path.display().to_string(),
                    key: "(file)".into(),
                    reason: format!("cannot read: {e}"),
                })?;
                (text, path.display().to_string())
            }
            None => (String::new(), FROM_FLAGS.to_owned()),
        };
        let mut config = Config::parse_with(&text, &name, &args.overrides)?;
        config.file = args.config.clone();
        Ok(config)
    }

    /// Parses a configuration from TOML text alone (for tests and `check-config`).
    pub fn from_toml(text: &str, source_name: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, source_name, &[])
    }

    fn parse_with(text: &str, name: &str, overrides: &[(&'static str, Vec<String>)]) -> Result<Config, ConfigError> {
        let err = |key: String, reason: String| ConfigError { source_name: name.to_owned(), key, reason };
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let key = e.span().map(|s| key_at(text, s.start)).unwrap_or_else(|| "(file)".into());
            err(key, e.message().trim().to_owned())
        })?;
        let mut overridden = HashSet::new();
        for (key, values) in overrides {
            apply_override(&mut table, key, values).map_err(|reason| ConfigError {
                source_name: FROM_FLAGS.into(),
                key: (*key).into(),
                reason,
            })?;
            overridden.insert(*key);
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(
            |e: serde_path_to_error::Error<_>| {
                let key = e.path().to_string();
                let key = if key == "." { "(top level)".to_owned() } else { key };
                let source_name = if overridden.iter().any(|k| key.starts_with(k)) { FROM_FLAGS } else { name };
                ConfigError { source_name: source_name.into(), key, reason: e.into_inner().message().to_owned() }
            },
        )?;
        config.validate().map_err(|KeyError { key, reason }| {
            let source_name = if overridden.iter().any(|k| key.starts_with(k)) { FROM_FLAGS } else { name };
            ConfigError { source_name: source_name.into(), key, reason }
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), KeyError> {
        let zk = &self.zookeeper;
        if self.static_file.is_none() && zk.connect.trim().is_empty() {
            return Err(KeyError::new("zookeeper.connect", "is empty"));
        }
        for (key, path) in [
            ("zookeeper.services_path", &zk.services_path),
            ("zookeeper.rules_path", &zk.rules_path),
            ("zookeeper.policies_path", &zk.policies_path),
        ]
        .into_iter()
        .chain(zk.dubbo_root.as_ref().map(|d| ("zookeeper.dubbo_root", d)))
        {
            if !path.starts_with('/') || (path.len() > 1 && path.ends_with('/')) {
                return Err(KeyError::new(
                    key,
                    format!("{path:?} must be an absolute ZooKeeper path without a trailing '/'"),
                ));
            }
        }
        if zk.session_timeout.0 < Duration::from_millis(100) {
            return Err(KeyError::new("zookeeper.session_timeout", "must be at least 100ms"));
        }
        if let Some(auth) = &zk.auth {
            if !auth.contains(':') {
                return Err(KeyError::new("zookeeper.auth", "must be user:password"));
            }
        }
        if zk.auth.is_some() && zk.auth_file.is_some() {
            return Err(KeyError::new("zookeeper.auth_file", "give either auth or auth_file, not both"));
        }
        if let Some(tls) = &zk.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                let missing =
                    if tls.cert_file.is_none() { "zookeeper.tls.cert_file" } else { "zookeeper.tls.key_file" };
                return Err(KeyError::new(missing, "cert_file and key_file go together"));
            }
            crate::tls::UpstreamTls::load(tls).map_err(|e| KeyError::new("zookeeper.tls", e.to_string()))?;
        }
        let p = &self.proxy;
        self.defaults()?;
        for (key, d) in [
            ("proxy.timeout", p.timeout),
            ("proxy.connect_timeout", p.connect_timeout),
            ("proxy.idle_timeout", p.idle_timeout),
            ("proxy.tcp_idle_timeout", p.tcp_idle_timeout),
            ("proxy.header_read_timeout", p.header_read_timeout),
            ("proxy.pool_idle_timeout", p.pool_idle_timeout),
            ("proxy.stream_idle_timeout", p.stream_idle_timeout),
        ] {
            if d.0.is_zero() {
                return Err(KeyError::new(key, "must be greater than zero"));
            }
        }
        if p.max_header_bytes < 1024 {
            return Err(KeyError::new("proxy.max_header_bytes", "must be at least 1024"));
        }
        if p.max_connections == 0 {
            return Err(KeyError::new("proxy.max_connections", "must be at least 1"));
        }
        if p.h2_max_concurrent_streams == 0 {
            return Err(KeyError::new("proxy.h2_max_concurrent_streams", "must be at least 1"));
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        binds.insert(self.admin.bind);
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listener[{i}].{k}");
            if l.name.is_empty() || !names.insert(l.name.as_str()) {
                return Err(KeyError::new(key("name"), format!("{:?} is empty or used by another listener", l.name)));
            }
            if l.bind.port() != 0 && !binds.insert(l.bind) {
                return Err(KeyError::new(
                    key("bind"),
                    format!("{} is already used by the admin port or another listener", l.bind),
                ));
            }
            if let Some(s) = &l.service {
                if s.is_empty() || s.contains('/') {
                    return Err(KeyError::new(key("service"), format!("{s:?} is not a service name")));
                }
            } else if l.endpoint.is_some() {
                return Err(KeyError::new(key("endpoint"), "applies only with service"));
            }
            if let Some(tls) = &l.tls {
                crate::tls::check_server(tls).map_err(|e| KeyError::new(key("tls"), e.to_string()))?;
            }
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                let missing = if tls.cert_file.is_none() { "tls.cert_file" } else { "tls.key_file" };
                return Err(KeyError::new(missing, "cert_file and key_file go together"));
            }
            crate::tls::UpstreamTls::load(tls).map_err(|e| KeyError::new("tls", e.to_string()))?;
        }
        for (i, r) in self.registrations.iter().enumerate() {
            let key = |k: &str| format!("register[{i}].{k}");
            if r.service.is_empty() || r.service.contains('/') {
                return Err(KeyError::new(key("service"), format!("{:?} is not a service name", r.service)));
            }
            if r.port == 0 {
                return Err(KeyError::new(key("port"), "must be in 1..=65535"));
            }
            Addr::from_parts(&r.address, r.port).map_err(|e| KeyError::new(key("address"), e.to_string()))?;
            if let Some(id) = &r.id {
                if id.is_empty() || id.contains('/') {
                    return Err(KeyError::new(key("id"), format!("{id:?} is not a node name")));
                }
            }
            if r.payload.weight.is_some_and(|w| w > MAX_WEIGHT) {
                return Err(KeyError::new(key("payload.weight"), format!("must be at most {MAX_WEIGHT}")));
            }
            if let Some(hc) = &r.health_check {
                match (hc.kind.as_str(), &hc.url) {
                    ("http", Some(url)) if url.starts_with("http://") => {}
                    ("http", _) => {
                        return Err(KeyError::new(key("health_check.url"), "kind http needs url = \"http://...\""));
                    }
                    ("tcp", _) => {}
                    (other, _) => {
                        return Err(KeyError::new(
                            key("health_check.kind"),
                            format!("{other:?} is neither \"http\" nor \"tcp\""),
                        ));
                    }
                }
                if hc.rise == 0 || hc.fall == 0 {
                    return Err(KeyError::new(key("health_check"), "rise and fall must be at least 1"));
                }
            }
        }
        if let Some(s) = &self.static_file {
            if !s.file.is_file() {
                return Err(KeyError::new("static.file", format!("{} is not a readable file", s.file.display())));
            }
        }
        if self.proxy.zone.as_deref().is_some_and(|z| z.trim().is_empty()) {
            return Err(KeyError::new("proxy.zone", "is empty: name the zone, or leave the key out"));
        }
        if let Some(a) = &self.log.access_log {
            if a.is_empty() {
                return Err(KeyError::new("log.access_log", "is empty: use \"stdout\" or a path"));
            }
        }
        Ok(())
    }

    /// Data-plane defaults, as the table builder takes them.
    pub fn defaults(&self) -> Result<Defaults, KeyError> {
        let p = &self.proxy;
        let doc = PolicyDoc {
            lb: Some(p.lb.clone()),
            hash_on: p.hash_on.clone(),
            health_check: p.health_check.clone(),
            outlier: p.outlier.clone(),
            panic_threshold_percent: Some(p.panic_threshold_percent),
            ..PolicyDoc::default()
        };
        let policy = Policy::from_doc(doc).map_err(|e| KeyError::new(format!("proxy.{}", e.field), e.reason))?;
        Ok(Defaults {
            lb: policy.lb.unwrap_or_default(),
            connect_timeout: p.connect_timeout.0,
            timeout: p.timeout.0,
            retries: p.retries,
            panic_threshold_percent: p.panic_threshold_percent,
            protect_from_empty: p.protect_from_empty,
            health_check: policy.health_check,
            outlier: policy.outlier,
            zone: p.zone.as_deref().map(Arc::from),
            ..Defaults::default()
        })
    }

    /// The listeners as the table builder sees them.
    pub fn listener_specs(&self) -> Vec<ListenerSpec> {
        self.listeners
            .iter()
            .map(|l| ListenerSpec {
                name: l.name.clone().into_boxed_str(),
                protocol: l.protocol,
                service: l.service.as_deref().map(ServiceName::new),
                endpoint: l.endpoint.clone(),
            })
            .collect()
    }

    /// Where the config came from, for messages.
    pub fn source_name(&self) -> String {
        self.file.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| FROM_FLAGS.into())
    }
}

fn apply_override(table: &mut toml::Table, key: &str, values: &[String]) -> Result<(), String> {
    let kind = KEYS.iter().find(|(k, _, _)| *k == key).map(|(_, k, _)| *k).ok_or("unknown key")?;
    let (section, leaf) = match key.split_once('.') {
        Some((s, l)) => (Some(s), l),
        None => (None, key),
    };
    let target = match section {
        None => &mut *table,
        Some(s) => table
            .entry(s)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("[{s}] in the file is not a table"))?,
    };
    let last = values.last().map(String::as_str).unwrap_or_default();
    let value = match kind {
        ValueKind::Str => toml::Value::String(last.to_owned()),
        ValueKind::Int => toml::Value::Integer(last.trim().parse().map_err(|_| format!("{last:?} is not an integer"))?),
        ValueKind::Bool => toml::Value::Boolean(match last.trim() {
            "true" | "1" | "yes" | "on" => true,
            "false" | "0" | "no" | "off" => false,
            other => return Err(format!("{other:?} is not true or false")),
        }),
        ValueKind::Tables => {
            let mut items = Vec::new();
            for v in values {
                let wrapped: toml::Table =
                    format!("v = {v}").parse().map_err(|e: toml::de::Error| format!("{v:?}: {}", e.message()))?;
                match wrapped.get("v") {
                    Some(toml::Value::Table(t)) => items.push(toml::Value::Table(t.clone())),
                    Some(toml::Value::Array(a)) => items.extend(a.iter().cloned()),
                    _ => return Err(format!("{v:?} is not an inline table {{...}} or an array of them")),
                }
            }
            // Flags replace the file's entries rather than adding to them.
            toml::Value::Array(items)
        }
    };
    target.insert(leaf.to_owned(), value);
    Ok(())
}

/// The dotted key of the line holding byte `offset`, best effort, for TOML syntax errors.
fn key_at(text: &str, offset: usize) -> String {
    let mut section = String::new();
    let mut key = String::new();
    for line in text[..offset.min(text.len())].lines().chain(text[offset.min(text.len())..].lines().take(1)) {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
            section = s.trim().to_owned();
            key.clear();
        } else if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = s.trim().to_owned();
            key.clear();
        } else if let Some((k, _)) = t.split_once('=') {
            key = k.trim().to_owned();
        }
    }
    match (section.is_empty(), key.is_empty()) {
        (true, true) => "(file)".into(),
        (true, false) => key,
        (false, true) => section,
        (false, false) => format!("{section}.{key}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(text: &str) -> ConfigError {
        Config::from_toml(text, "zk.toml").expect_err(text)
    }

    #[test]
    fn each_default_is_stated_once_and_the_help_shows_it() {
        let defaults = default_values();
        let derived = KEYS.iter().filter(|(key, _, _)| default_text(&defaults, key).is_some()).count();
        assert!(derived > 30, "{derived} keys have defaults from the Default impls");
        for (key, _, help) in KEYS {
            if default_text(&defaults, key).is_some() {
                assert!(!help.contains("[default:"), "{key}: its help restates a default the Default impls hold");
            }
        }
        for (key, value) in [
            ("proxy.timeout", "15s"),
            ("proxy.lb", "p2c"),
            ("proxy.tcp_idle_timeout", "1h"),
            ("proxy.tcp_relay_memory", "67108864"),
            ("admin.config_endpoint", "true"),
            ("zookeeper.services_path", "/zkroute/services"),
            ("log.format", "text"),
        ] {
            assert_eq!(default_text(&defaults, key).as_deref(), Some(value), "{key}");
        }
        assert_eq!(default_text(&defaults, "zookeeper.auth"), None, "credentials are never shown");
        assert_eq!(default_text(&defaults, "admin.drain_token"), None);
        let help = ConfigArgs::augment_args(Command::new("zkroute")).render_long_help().to_string();
        assert!(help.contains("default whole-request timeout [default: 15s]"), "{help}");
        // The routing table's defaults are the configuration's.
        let (table, config) = (Defaults::default(), ProxyConfig::default());
        assert_eq!((table.timeout, table.retries, table.lb.name()), (config.timeout.0, config.retries, &*config.lb));
    }

    #[test]
    fn the_contract_example_loads() {
        let c = Config::from_toml(
            r#"
            [zookeeper]
            connect = "zk1:2181,zk2:2181,zk3:2181/prod"
            session_timeout = "10s"
            services_path = "/zkroute/services"
            rules_path = "/zkroute/rules"
            policies_path = "/zkroute/policies"
            snapshot = "/var/lib/zkroute/snapshot.json"

            [admin]
            bind = "127.0.0.1:9901"

            [[listener]]
            name = "http"
            bind = "127.0.0.1:15001"
            protocol = "http"

            [[listener]]
            name = "payments"
            bind = "127.0.0.1:15002"
            protocol = "tcp"
            service = "payments"

            [[register]]
            service = "users"
            address = "10.0.0.5"
            port = 8080
            health_check = { kind = "http", url = "http://127.0.0.1:8080/health", interval = "2s" }
            payload = { weight = 100, zone = "a", metadata = { version = "v2" } }
            "#,
            "zkroute.toml",
        )
        .unwrap();
        assert_eq!(c.zookeeper.connect, "zk1:2181,zk2:2181,zk3:2181/prod");
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[1].protocol, Protocol::Tcp);
        assert_eq!(c.registrations[0].payload.metadata["version"], "v2");
        assert_eq!(c.registrations[0].health_check.as_ref().unwrap().interval, HumanDuration(Duration::from_secs(2)));
    }

    #[test]
    fn zookeeper_tls_errors_name_the_key_and_the_file() {
        let e = bad("[zookeeper.tls]\ncert_file = \"/c.crt\"\n");
        assert_eq!(e.key, "zookeeper.tls.key_file", "{e}");
        let e = bad("[zookeeper.tls]\nca_file = \"/nonexistent/zk-ca.crt\"\n");
        assert_eq!(e.key, "zookeeper.tls", "{e}");
        assert!(e.reason.contains("/nonexistent/zk-ca.crt") && e.reason.contains("cannot read"), "{e}");
        let e = bad("[zookeeper.tls]\nca_file = \"/c.crt\"\nserver_name = \"zk\"\n");
        assert!(e.reason.contains("unknown field `server_name`"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.crt");
        std::fs::write(&not_pem, "not a certificate").unwrap();
        let e = bad(&format!("[zookeeper.tls]\nca_file = {:?}\n", not_pem.display().to_string()));
        assert_eq!(e.key, "zookeeper.tls", "{e}");
        assert!(e.reason.contains(&not_pem.display().to_string()), "{e}");
    }

    #[test]
    fn errors_name_the_file_the_key_and_the_reason() {
        let e = bad("[zookeeper]\nsession_timeout = \"ten seconds\"\n");
        assert_eq!((e.source_name.as_str(), e.key.as_str()), ("zk.toml", "zookeeper.session_timeout"));
        assert!(e.reason.contains("not a duration"), "{e}");

        let e = bad("[[listener]]\nname = \"a\"\nbind = \"nowhere\"\n");
        assert_eq!(e.key, "listener[0].bind");

        let e = bad("[zookeeper]\nconect = \"x\"\n");
        assert!(e.reason.contains("unknown field `conect`"), "{e}");

        let e = bad("[admin\nbind = 1");
        assert_eq!(e.source_name, "zk.toml");

        let e = bad(
            "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:2\"\n",
        );
        assert_eq!(e.key, "listener[1].name");

        let e = bad("[proxy]\nlb = \"random\"\n");
        assert_eq!(e.key, "proxy.lb");

        let e = bad("[zookeeper]\nrules_path = \"rules\"\n");
        assert_eq!(e.key, "zookeeper.rules_path");

        let e = bad("[zookeeper]\ndubbo_root = \"/dubbo/\"\n");
        assert_eq!(e.key, "zookeeper.dubbo_root");

        let e = bad("[[register]]\nservice = \"a\"\naddress = \"10.0.0.1\"\nport = 70000\n");
        assert_eq!(e.key, "register[0].port");

        let e = bad("[static]\nfile = \"/nonexistent/routes.toml\"\n");
        assert_eq!(e.key, "static.file");
    }

    #[test]
    fn flags_and_variables_override_the_file() {
        let args = ConfigArgs::default()
            .set("zookeeper.connect", "127.0.0.1:1/x")
            .set("proxy.retries", "3")
            .set("admin.config_endpoint", "false")
            .set("listener", r#"{name="http", bind="127.0.0.1:15001"}"#);
        let c = Config::parse_with("[zookeeper]\nconnect = \"a:1\"\n", "f.toml", &args.overrides).unwrap();
        assert_eq!(c.zookeeper.connect, "127.0.0.1:1/x");
        assert_eq!(c.proxy.retries, 3);
        assert!(!c.admin.config_endpoint);
        assert_eq!(c.listeners[0].name, "http");

        let args = ConfigArgs::default().set("proxy.retries", "many");
        let e = Config::parse_with("", "f.toml", &args.overrides).unwrap_err();
        assert_eq!((e.source_name.as_str(), e.key.as_str()), (FROM_FLAGS, "proxy.retries"));

        let args = ConfigArgs::default().set("zookeeper.session_timeout", "soon");
        let e = Config::parse_with("", "f.toml", &args.overrides).unwrap_err();
        assert_eq!((e.source_name.as_str(), e.key.as_str()), (FROM_FLAGS, "zookeeper.session_timeout"));
    }

    #[test]
    fn proxy_zone_turns_zone_aware_routing_on_for_the_table() {
        assert_eq!(env_name("proxy.zone"), "ZKROUTE_PROXY_ZONE");
        let parse = |toml: &str, args: ConfigArgs| Config::parse_with(toml, "f.toml", &args.overrides);
        let c = parse("", ConfigArgs::default()).unwrap();
        assert_eq!(c.defaults().unwrap().zone, None, "no zone by default");
        let c = parse("[proxy]\nzone = \"eu-1a\"\n", ConfigArgs::default().set("proxy.zone", "eu-1b")).unwrap();
        let d = c.defaults().unwrap();
        assert_eq!(d.zone.as_deref(), Some("eu-1b"), "the flag or variable wins over the file");
        assert_eq!(d.zone_min_healthy_percent, Defaults::default().zone_min_healthy_percent);
        let e = parse("[proxy]\nzone = \" \"\n", ConfigArgs::default()).unwrap_err();
        assert_eq!(e.key, "proxy.zone");
    }

    #[test]
    fn resync_jitter_is_a_quarter_of_the_session_timeout_at_most_2s_unless_set() {
        let jitter = |toml: &str| {
            let c = Config::parse_with(toml, "f.toml", &ConfigArgs::default().overrides).unwrap();
            crate::zookeeper::ZkSettings::from_config(&c.zookeeper).unwrap().resync_jitter
        };
        assert_eq!(jitter("[zookeeper]\nsession_timeout = \"4s\"\n"), Duration::from_secs(1));
        assert_eq!(jitter("[zookeeper]\nsession_timeout = \"30s\"\n"), Duration::from_secs(2));
        assert_eq!(jitter("[zookeeper]\nresync_jitter = \"0s\"\n"), Duration::ZERO);
        assert_eq!(jitter("[zookeeper]\nresync_jitter = \"20s\"\n"), Duration::from_secs(20));
    }

    #[test]
    fn every_key_has_a_flag_and_a_variable() {
        assert_eq!(flag_name("zookeeper.session_timeout"), "zookeeper-session-timeout");
        assert_eq!(env_name("zookeeper.session_timeout"), "ZKROUTE_ZOOKEEPER_SESSION_TIMEOUT");
        // Every scalar field of every section is reachable by a flag.
        let cmd = ConfigArgs::augment_args(Command::new("t"));
        for (key, _, _) in KEYS {
            assert!(cmd.get_arguments().any(|a| a.get_id() == *key), "{key}");
        }
    }
}
