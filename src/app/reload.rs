//! Reloading the local configuration (SIGHUP): the file is read again with the same flags and
//! `ZKROUTE_*` variables over it, and validated; then listeners are added, removed (they drain)
//! and changed, `[proxy]` settings apply (the table is rebuilt with the new defaults), and
//! registrations are added and removed. Keys that cannot change at run time are reported and
//! left as they are. A file that does not load, or a listener that cannot bind, changes nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::{error, info, warn};

use super::listeners::Bound;
use super::{App, congestion, limits, pool_settings};
use crate::config::{Config, ConfigArgs, ConfigError};
use crate::discovery::Update;
use crate::routing::Change;
use crate::zookeeper::ZkSettings;

/// The values of `zkroute_config_reloads_total{result}`.
pub const RESULTS: [&str; 2] = ["ok", "error"];

/// How long a reload waits for the table with new listeners before they accept connections.
const TABLE_WAIT: Duration = Duration::from_secs(5);

/// The last reload, as `/config` shows it (`config_reload`).
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub at: String,
    /// `ok`, or `error` when nothing changed.
    pub result: &'static str,
    pub file: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Keys whose new value waits for a restart.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub restart_needed: Vec<String>,
}

/// What a reload changed, for its log line.
#[derive(Debug, Default)]
struct Report {
    listeners_added: Vec<String>,
    listeners_removed: Vec<String>,
    listeners_changed: Vec<String>,
    registrations_added: Vec<String>,
    registrations_removed: Vec<String>,
    restart_needed: Vec<String>,
}

/// What happens to one listener of the new configuration.
enum Plan {
    /// Same address and protocol: it keeps its socket, slot and connections.
    Keep,
    /// A new address, or a new listener: bound here, before anything changes.
    Bind(Box<Bound>),
    /// A new protocol on the same address: the socket serves on, under a new slot.
    Rebind,
}

impl App {
    /// Reads the configuration again as at the start (`args`: the same flags and variables) and
    /// applies what changed. Logs the outcome, counts it in `zkroute_config_reloads_total`, and
    /// returns whether it applied.
    pub async fn reload(&mut self, args: &ConfigArgs) -> bool {
        let file = args.config.as_ref().map(|f| f.display().to_string()).unwrap_or_else(|| self.config.source_name());
        // TLS files whose contents changed, whatever becomes of the configuration.
        self.rotation.check();
        let outcome = match Config::load(args) {
            Ok(new) => self.apply(new).await,
            Err(e) => Err(e),
        };
        let (result, error, restart_needed) = match outcome {
            Ok(report) => {
                info!(
                    file = %file,
                    listeners_added = ?report.listeners_added,
                    listeners_removed = ?report.listeners_removed,
                    listeners_changed = ?report.listeners_changed,
                    registrations_added = ?report.registrations_added,
                    registrations_removed = ?report.registrations_removed,
                    "configuration reloaded"
                );
                ("ok", None, report.restart_needed)
            }
            Err(e) => {
                error!(file = %e.source_name, key = %e.key, reason = %e.reason, "configuration reload refused: nothing changed");
                ("error", Some(e.to_string()), Vec::new())
            }
        };
        self.metrics.config_reloads.with_label_values(&[result]).inc();
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        if let Ok(mut last) = self.last_reload.lock() {
            *last = Some(Outcome { at, result, file, error, restart_needed });
        }
        result == "ok"
    }

    async fn apply(&mut self, new: Config) -> Result<Report, ConfigError> {
        let refuse = |key: String, reason: String| ConfigError { source_name: new.source_name(), key, reason };
        let mut report = Report { restart_needed: restart_only(&self.config, &new), ..Report::default() };
        let mut next = new.clone();
        keep_restart_only(&self.config, &mut next);
        let registration_only = self.config.listeners.is_empty() && self.config.static_file.is_none();
        if registration_only && !next.listeners.is_empty() {
            // It does not follow ZooKeeper: listeners would have nothing to route.
            report.restart_needed.push("listener (a zkroute started without listeners only registers)".into());
            next.listeners.clear();
        }

        // Everything that can fail, before anything changes.
        let defaults = next.defaults().map_err(|e| refuse(e.key, e.reason))?;
        let congestion = congestion(&next.proxy).map_err(|e| refuse(e.key, e.reason))?;
        let mut plans = Vec::new();
        for (i, l) in next.listeners.iter().enumerate() {
            let plan = match self.local.serving(&l.name) {
                Some((old, _)) if old.bind == l.bind && old.protocol == l.protocol => {
                    if old.service != l.service || old.endpoint != l.endpoint || old.tls != l.tls {
                        report.listeners_changed.push(l.name.clone());
                    }
                    Plan::Keep
                }
                Some((old, _)) if old.bind == l.bind => Plan::Rebind,
                _ => Plan::Bind(Box::new(Bound::bind(l, &congestion).map_err(|e| {
                    refuse(format!("listener[{i}].bind"), format!("cannot listen on {}: {e}", l.bind))
                })?)),
            };
            plans.push((l, plan));
        }
        let drained = self.drained.load(std::sync::atomic::Ordering::Relaxed);
        let registrations_change = next.registrations != self.config.registrations && !drained;
        if drained && next.registrations != self.config.registrations {
            report.restart_needed.push("register (deregistered by /drain until the restart)".into());
            next.registrations = self.config.registrations.clone();
        }
        let zk = match registrations_change && !next.registrations.is_empty() {
            true => Some(
                ZkSettings::from_config(&self.config.zookeeper).map_err(|e| refuse(e.key().into(), e.to_string()))?,
            ),
            false => None,
        };

        // Listeners: the removed drain, the new take slots, and the table learns of both before
        // any new one accepts a connection.
        let gone: Vec<String> =
            self.listeners.keys().filter(|name| !next.listeners.iter().any(|l| &l.name == *name)).cloned().collect();
        for name in &gone {
            self.local.remove(name);
        }
        report.listeners_removed = gone;
        for (l, plan) in plans {
            if let Plan::Keep = plan {
                // Same socket and connections; a new `service` or `endpoint` goes to the table.
                self.local.reconfigure(l);
                continue;
            }
            let released = self.local.remove(&l.name);
            let list = if released.is_some() { &mut report.listeners_changed } else { &mut report.listeners_added };
            list.push(l.name.clone());
            let bound = match (plan, released) {
                (Plan::Bind(bound), _) => *bound,
                (Plan::Rebind, Some(released)) => released.rebind(l),
                // Rebind is planned only for a listener that serves.
                (Plan::Rebind | Plan::Keep, _) => continue,
            };
            self.local.add(bound);
        }
        self.updates.send(Update::new(vec![Change::Local { listeners: self.local.specs(), defaults }], None));
        self.wait_for_table().await;

        let p = &next.proxy;
        self.relay_memory.set_limit(p.tcp_relay_memory);
        self.pools.set(pool_settings(p));
        self.states.set_retention(p.state_retention.0);
        self.local.serve(&limits(p, &self.relay_memory, congestion));
        self.listeners = self.local.addresses();

        if registrations_change {
            let timeout = Duration::from_secs(5).min(p.drain_timeout.0);
            let changed = self.registrations.update(&next.registrations, zk.as_ref(), timeout).await;
            report.registrations_added = changed.added;
            report.registrations_removed = changed.removed;
        }
        for key in &report.restart_needed {
            warn!(file = %new.source_name(), key = %key, "changes only at restart: left as it is");
        }
        self.config = Arc::new(next);
        Ok(report)
    }

    /// Waits (a bounded while) until the table in force has every serving listener in its slot.
    /// Without a table yet, listeners answer `not_ready` anyway: nothing to wait for.
    async fn wait_for_table(&mut self) {
        let deadline = tokio::time::Instant::now() + TABLE_WAIT;
        loop {
            let Some(table) = self.routes.current() else { return };
            if self.local.are_in(&table) {
                return;
            }
            let next = table.version + 1;
            if tokio::time::timeout_at(deadline, self.routes.wait_for_version(next)).await.is_err() {
                warn!("the routing table did not take the new listeners in time: they start anyway");
                return;
            }
        }
    }
}

/// The keys of `new` that differ from `old` and change only at restart: the admin port, how and
/// where ZooKeeper is read, the static file, logging, metrics and the runtime's threads.
fn restart_only(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    // Each named key that differs; the section's name if only a key not listed here does.
    macro_rules! compare {
        ($section:literal, $old:expr, $new:expr, [$($key:ident),*]) => {{
            let before = keys.len();
            $(if $old.$key != $new.$key {
                keys.push(concat!($section, ".", stringify!($key)).to_owned());
            })*
            if keys.len() == before && format!("{:?}", $old) != format!("{:?}", $new) {
                keys.push($section.to_owned());
            }
        }};
    }
    compare!(
        "zookeeper",
        old.zookeeper,
        new.zookeeper,
        [
            connect,
            session_timeout,
            startup_timeout,
            services_path,
            rules_path,
            policies_path,
            dubbo_root,
            snapshot,
            auth,
            auth_file,
            tls
        ]
    );
    compare!("admin", old.admin, new.admin, [bind, config_endpoint]);
    compare!("log", old.log, new.log, [format, access_log]);
    compare!("metrics", old.metrics, new.metrics, [enabled, per_instance]);
    if format!("{:?}", old.static_file) != format!("{:?}", new.static_file) {
        keys.push("static.file".into());
    }
    if old.proxy.workers != new.proxy.workers {
        keys.push("proxy.workers".into());
    }
    // The files' contents are reloaded (polled, and on SIGHUP); other file names need a restart.
    if old.tls != new.tls {
        keys.push("tls".into());
    }
    keys
}

/// `new` with the keys that change only at restart as they are in `old`.
fn keep_restart_only(old: &Config, new: &mut Config) {
    new.zookeeper = old.zookeeper.clone();
    new.admin = old.admin.clone();
    new.log = old.log.clone();
    new.metrics = old.metrics.clone();
    new.static_file = old.static_file.clone();
    new.proxy.workers = old.proxy.workers;
    new.tls = old.tls.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(text, "zkroute.toml").unwrap()
    }

    #[test]
    fn keys_that_change_only_at_restart_are_named() {
        let old = config("[zookeeper]\nconnect = \"a:1\"\n[proxy]\ntimeout = \"1s\"\n");
        let new = config(
            "[zookeeper]\nconnect = \"b:1\"\nrules_path = \"/r\"\n[admin]\nbind = \"127.0.0.1:1\"\n[proxy]\ntimeout = \
             \"2s\"\nworkers = 3\n[metrics]\nenabled = false\n",
        );
        assert_eq!(
            restart_only(&old, &new),
            ["zookeeper.connect", "zookeeper.rules_path", "admin.bind", "metrics.enabled", "proxy.workers"]
        );
        let mut next = new.clone();
        keep_restart_only(&old, &mut next);
        assert_eq!((next.zookeeper.connect.as_str(), next.proxy.workers), ("a:1", 0));
        assert_eq!(next.proxy.timeout, new.proxy.timeout, "the rest is the new file's");
        assert!(restart_only(&old, &next).is_empty());

        // `[zookeeper.tls]` with the system's roots (where this system has a bundle).
        if crate::tls::system_roots_file().is_some() {
            let tls = config("[zookeeper]\nconnect = \"a:1\"\n[zookeeper.tls]\n[proxy]\ntimeout = \"1s\"\n");
            assert_eq!(restart_only(&old, &tls), ["zookeeper.tls"]);
        }
    }
}
