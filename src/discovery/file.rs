//! The static file provider (README: "Configuration"): the same instance, rule and policy documents as
//! ZooKeeper would hold, from one local TOML file, re-read when it changes or is replaced. For
//! local development, demos, and tests of the data plane without ZooKeeper.
//!
//! ```toml
//! [services.users]                      # one key per instance node: its data
//! i1 = "127.0.0.1:8081"                 # any instance format, as text ...
//! i2 = { host = "127.0.0.1", port = 8082, weight = 10 }   # ... or as a table (JSON formats)
//!
//! [rules.users-default]                 # one table per rule node
//! listener = "http"
//! backends = [{ service = "users" }]
//!
//! [policies.users]                      # one table per policy node
//! lb = "round_robin"
//! ```

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{info, warn};

use super::{Update, UpdateSender, instance_change, policy_change, rule_change};
use crate::routing::build::{Change, RawNode, Resync};
use crate::routing::{Origin, ServiceName, SourceKind};
use crate::shutdown::Shutdown;

/// How often the file's metadata is checked.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Parses the static file's text into a full read.
pub fn parse(text: &str, file_name: &str) -> Result<Resync, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| e.to_string())?;
    let mut resync =
        Resync { source: SourceKind::File, instances: Vec::new(), rules: Vec::new(), policies: Vec::new() };
    for (section, value) in &table {
        let entries = value.as_table().ok_or_else(|| format!("[{section}] must be a table"))?;
        match section.as_str() {
            "services" => {
                for (service, instances) in entries {
                    let instances =
                        instances.as_table().ok_or_else(|| format!("services.{service} must be a table"))?;
                    let name = ServiceName::new(service);
                    for (id, data) in instances {
                        let raw = raw(file_name, &format!("services.{service}.{id}"), data);
                        if let Change::Instance { service, id, doc: Some(doc) } =
                            instance_change(name.clone(), id, Some(raw))
                        {
                            resync.instances.push((service, id, doc));
                        }
                    }
                }
            }
            "rules" => {
                for (id, data) in entries {
                    if let Change::Rule { id, doc: Some(doc) } =
                        rule_change(id, Some(raw(file_name, &format!("rules.{id}"), data)))
                    {
                        resync.rules.push((id, doc));
                    }
                }
            }
            "policies" => {
                for (service, data) in entries {
                    let raw = raw(file_name, &format!("policies.{service}"), data);
                    if let Change::Policy { service, doc: Some(doc) } =
                        policy_change(ServiceName::new(service), Some(raw))
                    {
                        resync.policies.push((service, doc));
                    }
                }
            }
            other => return Err(format!("unknown section [{other}]: expected services, rules or policies")),
        }
    }
    Ok(resync)
}

/// A TOML value as the node data it stands for: strings as they are, tables as JSON.
fn raw(file_name: &str, key: &str, value: &toml::Value) -> RawNode {
    let data = match value {
        toml::Value::String(s) => s.clone().into_bytes(),
        other => serde_json::to_vec(other).unwrap_or_default(),
    };
    RawNode {
        origin: Origin {
            source: SourceKind::File,
            path: format!("{file_name}#{key}").into(),
            mzxid: None,
            version: None,
        },
        data,
    }
}

/// What tells one version of the file from another without reading it. An edit in place changes
/// the modification time or the length, but two edits of the same length within one tick of the
/// kernel's file clock (a few milliseconds) leave both alike; a file written anew and renamed over
/// the path, as editors and deployment tools save, is another inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    modified: SystemTime,
    len: u64,
}

impl Stamp {
    /// The stamp of the file the path leads to now (through symbolic links), if there is one.
    fn of(path: &Path) -> Option<Stamp> {
        let m = std::fs::metadata(path).ok()?;
        let modified = m.modified().unwrap_or(SystemTime::UNIX_EPOCH);
        Some(Stamp { dev: m.dev(), ino: m.ino(), modified, len: m.len() })
    }
}

/// Follows the file, sending a full read whenever its content changes.
pub struct FileSource {
    pub path: PathBuf,
    pub updates: UpdateSender,
}

impl FileSource {
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut last_stamp: Option<Stamp> = None;
        let mut last_text: Option<String> = None;
        loop {
            let stamp = Stamp::of(&self.path);
            if stamp.is_some() && stamp != last_stamp {
                last_stamp = stamp;
                self.reload(&mut last_text).await;
            } else if stamp.is_none() && last_stamp.is_some() {
                warn!(file = %self.path.display(), "static file is gone; keeping the table in force");
                last_stamp = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL_INTERVAL) => {}
                _ = shutdown.wait() => return,
            }
        }
    }

    async fn reload(&self, last_text: &mut Option<String>) {
        let observed = Instant::now();
        let text = match tokio::fs::read_to_string(&self.path).await {
            Ok(t) => t,
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "cannot read the static file; keeping the table in force");
                return;
            }
        };
        if last_text.as_ref() == Some(&text) {
            return;
        }
        match parse(&text, &display_name(&self.path)) {
            Ok(resync) => {
                info!(file = %self.path.display(), instances = resync.instances.len(), rules = resync.rules.len(), "static file loaded");
                self.updates.send(Update::new(vec![Change::Resync(resync)], Some(observed)));
            }
            Err(e) => {
                warn!(file = %self.path.display(), error = %e, "static file is invalid; keeping the table in force")
            }
        }
        *last_text = Some(text);
    }
}

fn display_name(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_come_from_strings_and_tables() {
        let r = parse(
            r#"
            [services.users]
            i1 = "127.0.0.1:8081"
            i2 = { host = "127.0.0.1", port = 8082, weight = 10 }
            bad = "nowhere"
            [rules.r1]
            listener = "http"
            backends = [{ service = "users" }]
            [policies.users]
            lb = "round_robin"
            "#,
            "routes.toml",
        )
        .unwrap();
        assert_eq!(r.instances.len(), 3);
        let bad = r.instances.iter().find(|(_, id, _)| &**id == "bad").unwrap();
        assert!(bad.2.parsed.is_err());
        assert_eq!(&*bad.2.origin.path, "routes.toml#services.users.bad");
        let i2 = r.instances.iter().find(|(_, id, _)| &**id == "i2").unwrap();
        assert_eq!(i2.2.parsed.as_ref().unwrap().weight, 10);
        assert!(r.rules[0].1.parsed.is_ok());
        assert!(r.policies[0].1.parsed.is_ok());
    }

    #[test]
    fn an_unknown_section_is_an_error() {
        assert!(parse("[servics.a]\nx = \"1.2.3.4:5\"\n", "f").unwrap_err().contains("servics"));
    }

    /// The ids of the instances in the next full read the source sends.
    async fn next_read(updates: &mut tokio::sync::mpsc::UnboundedReceiver<Update>) -> Vec<String> {
        let update = tokio::time::timeout(Duration::from_secs(5), updates.recv())
            .await
            .expect("a read within 5 s")
            .expect("the source runs");
        match &update.changes[..] {
            [Change::Resync(r)] => r.instances.iter().map(|(_, id, _)| id.to_string()).collect(),
            other => panic!("expected one full read, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_file_replaced_by_one_of_the_same_length_and_time_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, "[services.s]\na = \"10.0.0.1:80\"\n").unwrap();
        let (sender, mut updates) = crate::discovery::updates();
        let (trigger, shutdown) = crate::shutdown::channel();
        let source = tokio::spawn(FileSource { path: path.clone(), updates: sender }.run(shutdown));
        assert_eq!(next_read(&mut updates).await, ["a"]);

        // A save by rename within the tick of the first write: the new file has the old one's
        // length, and its modification time is set to the old one's so that the test does not
        // depend on the clock's granularity.
        let old = std::fs::metadata(&path).unwrap();
        let new = dir.path().join("routes.toml.new");
        std::fs::write(&new, "[services.s]\nb = \"10.0.0.2:80\"\n").unwrap();
        std::fs::File::options().write(true).open(&new).unwrap().set_modified(old.modified().unwrap()).unwrap();
        std::fs::rename(&new, &path).unwrap();
        let replaced = std::fs::metadata(&path).unwrap();
        assert_eq!((replaced.len(), replaced.modified().unwrap()), (old.len(), old.modified().unwrap()));
        assert_eq!(next_read(&mut updates).await, ["b"]);

        trigger.trigger();
        source.await.unwrap();
    }
}
