//! The last-known-good snapshot (README: "Faults and hostile input"): after each swap the table's source documents are
//! written atomically (temporary file, fsync, rename) by a task of their own, at most once a
//! second; at a cold start with ZooKeeper down they are loaded and served until ZooKeeper
//! answers. A snapshot that does not decode, or is older than `zookeeper.snapshot_max_age`, is
//! ignored with a message saying why. Its instances are validated again when it is read, one by
//! one, as ZooKeeper's would be; instances only kept by `protect_from_empty` are not written, and
//! neither is a table without instances.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::routing::build::{Doc, Resync};
use crate::routing::documents::{Policy, PolicyDoc, Rule, RuleDoc};
use crate::routing::{Instance, Origin, RoutingTable, ServiceName, SourceKind};

/// Bumped when the file's shape changes incompatibly.
const FORMAT: u32 = 1;
/// Least time between two writes.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// The file; `I` is the instance as written ([`Instance`]) or as read back (any JSON, validated
/// one by one).
#[derive(Serialize, Deserialize)]
struct File<I> {
    format: u32,
    table_version: u64,
    written_at: String,
    instances: Vec<InstanceRecord<I>>,
    rules: Vec<RuleRecord>,
    policies: Vec<PolicyRecord>,
}

#[derive(Serialize, Deserialize)]
struct InstanceRecord<I> {
    service: ServiceName,
    id: String,
    origin: Origin,
    instance: I,
}

#[derive(Serialize, Deserialize)]
struct RuleRecord {
    id: String,
    origin: Origin,
    document: RuleDoc,
}

#[derive(Serialize, Deserialize)]
struct PolicyRecord {
    service: ServiceName,
    origin: Origin,
    document: PolicyDoc,
}

/// The table's valid source documents, as the snapshot file holds them.
pub fn encode(table: &RoutingTable) -> Vec<u8> {
    let mut file: File<Instance> = File {
        format: FORMAT,
        table_version: table.version,
        written_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        instances: Vec::new(),
        rules: Vec::new(),
        policies: Vec::new(),
    };
    for (name, service) in &table.services {
        // Instances kept by protect_from_empty are no longer in the registry: a snapshot that
        // listed them would present them as registered at the next cold start.
        let registered = if service.protected { &[][..] } else { &service.instances[..] };
        for i in registered {
            file.instances.push(InstanceRecord {
                service: name.clone(),
                id: i.id.to_string(),
                origin: i.origin.clone(),
                instance: (*i.instance).clone(),
            });
        }
        if let (Some(doc), Some(origin)) = (&service.policy_doc, &service.policy_origin) {
            file.policies.push(PolicyRecord {
                service: name.clone(),
                origin: origin.clone(),
                document: doc.doc.clone(),
            });
        }
    }
    for (id, status) in table.rules.iter() {
        if let Some((rule, origin)) = &status.active {
            file.rules.push(RuleRecord { id: id.to_string(), origin: origin.clone(), document: rule.doc.clone() });
        }
    }
    serde_json::to_vec(&file).unwrap_or_default()
}

/// A snapshot file's documents, validated again, as a full read from the snapshot; refused when
/// it was written more than `max_age` ago.
pub fn decode(bytes: &[u8], max_age: Duration) -> Result<(Resync, u64), String> {
    let file: File<serde_json::Value> =
        serde_json::from_slice(bytes).map_err(|e| format!("not a zkroute snapshot: {e}"))?;
    if file.format != FORMAT {
        return Err(format!("snapshot format {} is not {FORMAT}", file.format));
    }
    let written = humantime::parse_rfc3339(&file.written_at)
        .map_err(|e| format!("written_at {:?} is not a time: {e}", file.written_at))?;
    let age = SystemTime::now().duration_since(written).unwrap_or_default();
    if age > max_age {
        let age = humantime::format_duration(Duration::from_secs(age.as_secs()));
        let max = humantime::format_duration(max_age);
        return Err(format!("it is {age} old, older than zookeeper.snapshot_max_age ({max})"));
    }
    let origin = |o: Origin| Origin { source: SourceKind::Snapshot, ..o };
    let mut resync =
        Resync { source: SourceKind::Snapshot, instances: Vec::new(), rules: Vec::new(), policies: Vec::new() };
    for r in file.instances {
        let parsed = serde_json::from_value::<Instance>(r.instance)
            .map_err(|e| format!("snapshot instance: {e}"))
            .and_then(|i| crate::discovery::formats::validate(&i).map(|()| Arc::new(i)).map_err(|e| e.to_string()));
        resync.instances.push((r.service, Arc::from(r.id.as_str()), Doc { origin: origin(r.origin), parsed }));
    }
    for r in file.rules {
        let parsed = Rule::from_doc(&r.id, r.document).map(Arc::new).map_err(|e| e.to_string());
        resync.rules.push((Arc::from(r.id.as_str()), Doc { origin: origin(r.origin), parsed }));
    }
    for r in file.policies {
        let parsed = Policy::from_doc(r.document).map(Arc::new).map_err(|e| e.to_string());
        resync.policies.push((r.service, Doc { origin: origin(r.origin), parsed }));
    }
    Ok((resync, file.table_version))
}

/// Reads and decodes the snapshot at `path`; None (with a warning) when it is absent, corrupt or
/// older than `max_age`.
pub fn load(path: &Path, max_age: Duration) -> Option<(Resync, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            warn!(snapshot = %path.display(), "no snapshot to serve from");
            return None;
        }
        Err(e) => {
            warn!(snapshot = %path.display(), error = %e, "cannot read the snapshot; ignoring it");
            return None;
        }
    };
    match decode(&bytes, max_age) {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(snapshot = %path.display(), reason = %e, "ignoring the snapshot");
            None
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it (named after this process, so
/// that two processes writing one path never share it), fsync, rename, fsync of the directory. A
/// crash leaves the old snapshot or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("snapshot");
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes the latest table published, at most once per second, off the control loop.
pub struct Writer {
    tx: watch::Sender<Option<Arc<RoutingTable>>>,
}

impl Writer {
    pub fn start(path: PathBuf) -> Writer {
        let (tx, mut rx) = watch::channel::<Option<Arc<RoutingTable>>>(None);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(table) = rx.borrow_and_update().clone() else { continue };
                let path = path.clone();
                let started = std::time::Instant::now();
                let written = tokio::task::spawn_blocking(move || write_atomic(&path, &encode(&table))).await;
                match written {
                    Ok(Ok(())) => debug!(took_ms = started.elapsed().as_millis() as u64, "snapshot written"),
                    Ok(Err(e)) => warn!(error = %e, "cannot write the snapshot"),
                    Err(_) => {}
                }
                tokio::time::sleep(MIN_INTERVAL).await;
            }
        });
        Writer { tx }
    }

    /// Takes a newly published table. Tables loaded from the snapshot itself are not written,
    /// nor tables without a registered instance: an emptied registry must not replace the last
    /// good snapshot.
    pub fn offer(&self, table: &Arc<RoutingTable>) {
        if table.source == SourceKind::Snapshot {
            return;
        }
        if !crate::discovery::has_registered_instances(table) {
            debug!(version = table.version, "not writing a table without instances over the snapshot");
            return;
        }
        self.tx.send_replace(Some(table.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::{instance_change, policy_change, rule_change};
    use crate::endpoint::StateRegistry;
    use crate::metrics::Metrics;
    use crate::routing::build::{Change, Defaults, RawNode};
    use crate::routing::{Builder, NodeKind};

    const DAY: Duration = Duration::from_secs(86_400);

    fn raw(path: &str, data: &str) -> Option<RawNode> {
        Some(RawNode {
            origin: Origin { source: SourceKind::Zookeeper, path: path.into(), mzxid: Some(7), version: Some(2) },
            data: data.as_bytes().to_vec(),
        })
    }

    fn builder() -> Builder {
        Builder::new(
            vec![],
            Defaults::default(),
            Arc::new(StateRegistry::new(Duration::from_secs(1))),
            Arc::new(Metrics::new(false)),
        )
    }

    #[test]
    fn a_snapshot_round_trips_every_valid_document() {
        let mut b = builder();
        b.apply(Change::Resync(Resync {
            source: SourceKind::Zookeeper,
            instances: vec![],
            rules: vec![],
            policies: vec![],
        }));
        b.apply(instance_change(
            ServiceName::new("u"),
            "a",
            raw("/s/u/a", r#"{"address":"10.0.0.1","port":80,"payload":{"metadata":{"v":"2"},"weight":7}}"#),
        ));
        b.apply(instance_change(ServiceName::new("u"), "b", raw("/s/u/b", r#"{"serviceEndpoint":{"host":"10.0.0.2","port":81},"additionalEndpoints":{"http":{"host":"10.0.0.2","port":82}}}"#)));
        b.apply(instance_change(ServiceName::new("u"), "bad", raw("/s/u/bad", "nonsense")));
        b.apply(rule_change(
            "r",
            raw("/r/r", r#"{"listener":"http","match":{"host":"*.x"},"backends":[{"service":"u","weight":3}]}"#),
        ));
        b.apply(policy_change(ServiceName::new("u"), raw("/p/u", r#"{"lb":"ring_hash","hash_on":"header:x-user"}"#)));
        let (t1, _) = b.build();
        let bytes = encode(&t1);
        let (resync, version) = decode(&bytes, DAY).unwrap();
        assert_eq!(version, t1.version);
        assert_eq!(resync.instances.len(), 2, "the invalid node is not in the snapshot");
        let mut b2 = builder();
        b2.apply(Change::Resync(resync));
        let (t2, _) = b2.build();
        assert_eq!(t2.source, SourceKind::Snapshot);
        let (u1, u2) = (t1.service("u").unwrap(), t2.service("u").unwrap());
        let instances = |s: &crate::routing::table::ServiceEntry| {
            s.instances
                .iter()
                .map(|i| (i.id.to_string(), (*i.instance).clone(), i.origin.path.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(instances(u1), instances(u2));
        assert_eq!(u2.policy, u1.policy);
        assert_eq!(t2.rules["r"].active.as_ref().unwrap().0.doc, t1.rules["r"].active.as_ref().unwrap().0.doc);
        assert_eq!(t2.invalid_count(NodeKind::Instance), 0);
    }

    #[test]
    fn a_corrupt_snapshot_is_refused_with_a_reason() {
        assert!(decode(b"{", DAY).unwrap_err().contains("not a zkroute snapshot"));
        assert!(
            decode(br#"{"format":99,"table_version":1,"written_at":"x","instances":[],"rules":[],"policies":[]}"#, DAY)
                .unwrap_err()
                .contains("format")
        );
    }

    fn snapshot_file(written_at: &str, instance: &str) -> Vec<u8> {
        format!(
            r#"{{"format":1,"table_version":3,"written_at":"{written_at}","rules":[],"policies":[],"instances":[
                {{"service":"u","id":"good","origin":{{"source":"zookeeper","path":"/s/u/good"}},
                  "instance":{{"format":"plain","addr":"10.0.0.1:80","weight":100,"enabled":true}}}},
                {{"service":"u","id":"bad","origin":{{"source":"zookeeper","path":"/s/u/bad"}},"instance":{instance}}}]}}"#
        )
        .into_bytes()
    }

    #[test]
    fn a_snapshot_older_than_the_maximum_age_is_refused_naming_its_age() {
        let two_days_ago = humantime::format_rfc3339(SystemTime::now() - 2 * DAY).to_string();
        let ok = r#"{"format":"plain","addr":"10.0.0.2:80","weight":1,"enabled":true}"#;
        let e = decode(&snapshot_file(&two_days_ago, ok), DAY).unwrap_err();
        assert!(e.contains("2days") && e.contains("snapshot_max_age (1day)"), "{e}");
        assert!(decode(&snapshot_file(&two_days_ago, ok), 3 * DAY).is_ok());
    }

    #[test]
    fn snapshot_instances_are_validated_again_one_by_one() {
        let now = humantime::format_rfc3339(SystemTime::now()).to_string();
        for bad in [
            r#"{"format":"plain","addr":"10.0.0.2:80","weight":99999,"enabled":true}"#,
            r#"{"format":"plain","addr":"10.0.0.2:0","weight":1,"enabled":true}"#,
            r#"{"format":"plain","addr":"not an address","weight":1,"enabled":true}"#,
        ] {
            let (resync, _) = decode(&snapshot_file(&now, bad), DAY).unwrap();
            let docs: Vec<(&str, bool)> = resync.instances.iter().map(|(_, id, d)| (&**id, d.parsed.is_ok())).collect();
            assert_eq!(docs, [("good", true), ("bad", false)], "{bad}");
        }
    }

    #[test]
    fn instances_kept_by_protect_from_empty_are_not_saved() {
        let mut b = builder();
        b.apply(Change::Resync(Resync {
            source: SourceKind::Zookeeper,
            instances: vec![],
            rules: vec![],
            policies: vec![],
        }));
        b.apply(policy_change(ServiceName::new("u"), raw("/p/u", r#"{"protect_from_empty":true}"#)));
        b.apply(instance_change(ServiceName::new("u"), "a", raw("/s/u/a", "10.0.0.1:80")));
        b.build();
        b.apply(instance_change(ServiceName::new("u"), "a", None));
        let (t, _) = b.build();
        assert!(t.service("u").unwrap().protected, "the last instance is kept");
        let (resync, _) = decode(&encode(&t), DAY).unwrap();
        assert!(resync.instances.is_empty(), "but not saved as registered");
    }

    #[test]
    fn the_temporary_file_is_this_processs_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        // Another process's temporary file in the way (a directory: it cannot be replaced).
        std::fs::create_dir(dir.path().join(".snap.json.tmp")).unwrap();
        write_atomic(&path, b"one").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
    }

    #[test]
    fn writes_are_atomic_renames() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
