//! ZooKeeper session plumbing shared by discovery, registration and `zkroute ctl`: how to reach
//! the ensemble (connect string, session timeout, credentials, the trees' paths), the ACLs of
//! nodes zkroute creates, reconnect backoff, and batched multi-reads that read each node on its
//! own (a node this session may not read is reported, not fatal). What to do with the nodes is
//! the caller's: [`crate::discovery::zk`] follows the trees, [`crate::register`] keeps
//! registrations, [`crate::ctl`] reads and writes documents.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use zookeeper_client::{Acl, Acls, Client, MultiReadResult, Permission, Stat};

use crate::config::ZookeeperConfig;
use crate::routing::build::RawNode;
use crate::routing::{Origin, SourceKind};

/// Operations per multi-read request: keeps a reply well under ZooKeeper's 1 MB `jute.maxbuffer`
/// for documents of a few hundred bytes.
pub(crate) const MULTI_READ_BATCH: usize = 250;

/// What zkroute says when the server answers UNIMPLEMENTED.
pub const REQUIRES_3_6: &str = "ZooKeeper 3.6 or later is required: persistent recursive watches \
                                (AddWatch) and multi-read (the server answered UNIMPLEMENTED)";

/// Where the trees live, relative to the chroot.
#[derive(Clone, Debug)]
pub struct Paths {
    pub services: String,
    pub rules: String,
    pub policies: String,
    /// Dubbo's registry root, when zkroute follows Dubbo providers too.
    pub dubbo: Option<String>,
}

/// How to reach ZooKeeper.
#[derive(Clone)]
pub struct ZkSettings {
    pub connect: String,
    pub session_timeout: Duration,
    /// Longest random delay before the full read that follows a reconnect.
    pub resync_jitter: Duration,
    pub paths: Paths,
    /// Digest credentials, "user:password".
    pub auth: Option<Vec<u8>>,
}

impl std::fmt::Debug for ZkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkSettings")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field("resync_jitter", &self.resync_jitter)
            .field("paths", &self.paths)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Creator (the digest identity) may do anything, anyone may read.
static CREATOR_ALL_WORLD_READ: [Acl; 2] =
    [Acl::new_const(Permission::ALL, "auth", ""), Acl::new_const(Permission::READ, "world", "anyone")];

impl ZkSettings {
    /// Connects a new session (blocks for about the session timeout when no server answers).
    pub async fn connect(&self) -> Result<Client, zookeeper_client::Error> {
        let mut connector = Client::connector().with_session_timeout(self.session_timeout);
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth);
        }
        connector.connect(&self.connect).await
    }

    /// The ACL of leaf nodes zkroute creates (registrations, `ctl put`): with credentials, only
    /// their identity may change or delete the node and anyone may read it; without, it is open.
    /// Parent paths always get the open ACL, so that other registrants can add their children.
    pub fn leaf_acls(&self) -> Acls<'static> {
        if self.auth.is_some() { Acls::new(&CREATOR_ALL_WORLD_READ) } else { Acls::anyone_all() }
    }
}

/// Longest random delay before the full read that follows a reconnect, unless configured: a
/// quarter of the session timeout, at most 2s.
pub fn default_resync_jitter(session_timeout: Duration) -> Duration {
    (session_timeout / 4).min(Duration::from_secs(2))
}

/// Exponential backoff with full jitter, so that a fleet of sidecars does not reconnect in step.
#[derive(Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max, attempt: 0 }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], the ceiling doubling up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(fastrand::f64())
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// `zookeeper.auth_file` could not be read.
#[derive(Debug, thiserror::Error)]
#[error("zookeeper.auth_file: cannot read {path}: {source}")]
pub struct AuthFileError {
    pub path: std::path::PathBuf,
    pub source: std::io::Error,
}

impl ZkSettings {
    /// From the `[zookeeper]` section; reads `auth_file` if one is given.
    pub fn from_config(zk: &ZookeeperConfig) -> Result<ZkSettings, AuthFileError> {
        let auth = match (&zk.auth, &zk.auth_file) {
            (Some(a), _) => Some(a.clone().into_bytes()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| AuthFileError { path: path.clone(), source })?
                    .trim()
                    .as_bytes()
                    .to_vec(),
            ),
            (None, None) => None,
        };
        Ok(ZkSettings {
            connect: zk.connect.clone(),
            session_timeout: zk.session_timeout.0,
            resync_jitter: zk.resync_jitter.map_or_else(|| default_resync_jitter(zk.session_timeout.0), |j| j.0),
            paths: Paths {
                services: zk.services_path.clone(),
                rules: zk.rules_path.clone(),
                policies: zk.policies_path.clone(),
                dubbo: zk.dubbo_root.clone(),
            },
            auth,
        })
    }
}

/// Now, as RFC 3339 UTC with milliseconds.
pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Why a node cannot be read, for `/config` and the log.
pub(crate) fn unreadable_reason(e: &zookeeper_client::Error) -> String {
    match e {
        zookeeper_client::Error::NoAuth => {
            "unreadable: its ACL does not let zkroute read it (NoAuth; see zookeeper.auth)".into()
        }
        e => format!("unreadable: {e}"),
    }
}

/// One node's outcome in a read.
#[derive(Debug)]
pub(crate) enum NodeRead {
    Data(RawNode),
    Gone,
    Unreadable(String),
}

pub(crate) fn join(root: &str, child: &str) -> String {
    if root == "/" { format!("/{child}") } else { format!("{root}/{child}") }
}

pub(crate) fn origin(path: &str, stat: &Stat) -> Origin {
    Origin {
        source: SourceKind::Zookeeper,
        path: Arc::from(path),
        mzxid: Some(stat.mzxid),
        version: Some(stat.version),
    }
}

/// A directory's children: none if it does not exist, the reason if this session may not list it.
pub(crate) async fn children(
    client: &Client,
    path: &str,
) -> Result<Result<Vec<String>, String>, zookeeper_client::Error> {
    match client.list_children(path).await {
        Ok(c) => Ok(Ok(c)),
        Err(zookeeper_client::Error::NoNode) => Ok(Ok(Vec::new())),
        Err(e @ zookeeper_client::Error::NoAuth) => Ok(Err(unreadable_reason(&e))),
        Err(e) => Err(e),
    }
}

/// Reads the data of many nodes with multi-read, in batches. Only the request can fail; each
/// node is read, gone or unreadable on its own.
pub(crate) async fn read_data(client: &Client, paths: &[&str]) -> Result<Vec<NodeRead>, zookeeper_client::Error> {
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(MULTI_READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for p in batch {
            reader.add_get_data(p)?;
        }
        let results = reader.commit().await?;
        for (p, result) in batch.iter().zip(results) {
            out.push(match result {
                MultiReadResult::Data { data, stat } => NodeRead::Data(RawNode { origin: origin(p, &stat), data }),
                MultiReadResult::Error { err: zookeeper_client::Error::NoNode } => NodeRead::Gone,
                MultiReadResult::Error { err } => NodeRead::Unreadable(unreadable_reason(&err)),
                _ => NodeRead::Gone,
            });
        }
    }
    Ok(out)
}

/// Lists the children of many nodes with multi-read, in batches; empty for a node that is gone,
/// the reason for one this session may not list.
pub(crate) async fn read_children(
    client: &Client,
    paths: &[String],
) -> Result<Vec<Result<Vec<String>, String>>, zookeeper_client::Error> {
    let mut out = Vec::with_capacity(paths.len());
    for batch in paths.chunks(MULTI_READ_BATCH) {
        let mut reader = client.new_multi_reader();
        for p in batch {
            reader.add_get_children(p)?;
        }
        for result in reader.commit().await? {
            out.push(match result {
                MultiReadResult::Children { children } => Ok(children),
                MultiReadResult::Error { err: zookeeper_client::Error::NoNode } => Ok(Vec::new()),
                MultiReadResult::Error { err } => Err(unreadable_reason(&err)),
                _ => Ok(Vec::new()),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100), "{d:?}");
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800), "{d:?}");
        assert!(d.iter().all(|x| *x <= Duration::from_secs(1)), "{d:?}");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
