//! ZooKeeper session plumbing shared by discovery, registration and `zkroute ctl`: how to reach
//! the ensemble (connect string, session timeout, credentials, the trees' paths), the ACLs of
//! nodes zkroute creates, reconnect backoff, and batched multi-reads that read each node on its
//! own (a node this session may not read is reported, not fatal). What to do with the nodes is
//! the caller's: [`crate::discovery::zk`] follows the trees, [`crate::register`] keeps
//! registrations, [`crate::ctl`] reads and writes documents. [`inline`] runs discovery's session
//! and tasks on the thread that sees the session's bytes.

pub(crate) mod inline;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use zookeeper_client::{Acl, Acls, Client, MultiReadResult, Permission, Stat};

use crate::config::ZookeeperConfig;
use crate::routing::build::RawNode;
use crate::routing::{Origin, SourceKind};
use crate::tls::UpstreamFiles;

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
    /// TLS to the servers' `secureClientPort` (README: "ZooKeeper over TLS"); the files are read
    /// again for each new session, so a renewed certificate is used from the next one.
    pub tls: Option<UpstreamFiles>,
}

impl std::fmt::Debug for ZkSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkSettings")
            .field("connect", &self.connect)
            .field("session_timeout", &self.session_timeout)
            .field("resync_jitter", &self.resync_jitter)
            .field("paths", &self.paths)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// Creator (the digest identity) may do anything, anyone may read.
static CREATOR_ALL_WORLD_READ: [Acl; 2] =
    [Acl::new_const(Permission::ALL, "auth", ""), Acl::new_const(Permission::READ, "world", "anyone")];

impl ZkSettings {
    /// Connects a new session (blocks for about the session timeout when no server answers).
    /// Over TLS, a failed session is followed by a handshake of zkroute's own with the servers, so
    /// that the error says why (unknown CA, name mismatch, refused certificate) where the client
    /// library would only time out.
    pub async fn connect(&self) -> Result<Client, ConnectError> {
        // The client wakes every connection timeout / 8 to check on the connection, and pings
        // at the first wake 3 of those after it last sent, in effect every fourth. Unset, it
        // takes a twentieth of the session timeout for that tick: at 10 s a wake every 500 ms
        // and a ping every 2 s, most of an idle sidecar's CPU and of the packets a fleet sends
        // its ensemble. The most it accepts, 3/5 of the session timeout, wakes every 750 ms,
        // pings every 3 s (ZooKeeper's Java client pings after a third of the session timeout)
        // and calls a silent connection lost after 6 s (docs/OPERATIONS.md, "Session timeouts").
        let mut connector = Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_connection_timeout(self.session_timeout * 3 / 5);
        if let Some(auth) = &self.auth {
            connector = connector.with_auth("digest", auth);
        }
        let Some(files) = &self.tls else {
            return connector.connect(&self.connect).await.map_err(ConnectError::from);
        };
        let options = tls_options(files)?;
        // zookeeper-client builds its rustls configuration on the process default provider; make
        // that the ring provider every other configuration of zkroute uses.
        let _ = rustls::crypto::CryptoProvider::install_default(rustls::crypto::ring::default_provider());
        match connector.with_tls(options).secure_connect(&self.connect).await {
            Ok(client) => Ok(client),
            Err(source) => Err(ConnectError { source, tls: diagnose_tls(&self.connect, files).await }),
        }
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

/// A `[zookeeper]` file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("zookeeper.auth_file: cannot read {path}: {source}")]
    AuthFile { path: std::path::PathBuf, source: std::io::Error },
    #[error("{key}: {reason}")]
    Tls { key: &'static str, reason: String },
}

impl SettingsError {
    /// The configuration key it is about.
    pub fn key(&self) -> &'static str {
        match self {
            SettingsError::AuthFile { .. } => "zookeeper.auth_file",
            SettingsError::Tls { key, .. } => key,
        }
    }
}

/// A session that could not be made, and over TLS what a handshake of zkroute's own found.
#[derive(Debug)]
pub struct ConnectError {
    pub source: zookeeper_client::Error,
    /// Why the TLS handshake with a server failed, if it did.
    pub tls: Option<String>,
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.tls {
            Some(tls) => write!(f, "{}; {tls}", self.source),
            None => write!(f, "{}", self.source),
        }
    }
}

impl std::error::Error for ConnectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<zookeeper_client::Error> for ConnectError {
    fn from(source: zookeeper_client::Error) -> Self {
        ConnectError { source, tls: None }
    }
}

impl From<SettingsError> for ConnectError {
    fn from(e: SettingsError) -> Self {
        ConnectError { source: zookeeper_client::Error::BadArguments(&"zookeeper.tls files"), tls: Some(e.to_string()) }
    }
}

/// The client library's TLS options from the `zookeeper.tls` files: the CA bundle (given, or
/// the system's) and, if set, the client certificate and key.
fn tls_options(files: &UpstreamFiles) -> Result<zookeeper_client::TlsOptions, SettingsError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map_err(|e| SettingsError::Tls { key, reason: format!("cannot read {}: {e}", path.display()) })
    };
    let ca_path = files.ca_file.clone().or_else(crate::tls::system_roots_file).ok_or(SettingsError::Tls {
        key: "zookeeper.tls.ca_file",
        reason: "not set, and this system has no CA bundle".into(),
    })?;
    let ca = read("zookeeper.tls.ca_file", &ca_path)?;
    let invalid = |key: &'static str, path: &std::path::Path, e: zookeeper_client::Error| SettingsError::Tls {
        key,
        reason: format!("{}: {e}", path.display()),
    };
    let mut options = zookeeper_client::TlsOptions::new()
        .with_pem_ca(&ca)
        .map_err(|e| invalid("zookeeper.tls.ca_file", &ca_path, e))?;
    if let (Some(cert_path), Some(key_path)) = (&files.cert_file, &files.key_file) {
        let (cert, key) = (read("zookeeper.tls.cert_file", cert_path)?, read("zookeeper.tls.key_file", key_path)?);
        options = options.with_pem_identity(&cert, &key).map_err(|e| invalid("zookeeper.tls.key_file", key_path, e))?;
    }
    Ok(options)
}

/// Handshakes with each server of `connect` as the client library would, and says why the first
/// that fails does; None if every handshake succeeds (the failure was elsewhere).
async fn diagnose_tls(connect: &str, files: &UpstreamFiles) -> Option<String> {
    use rustls::pki_types::ServerName;
    let config = match crate::tls::UpstreamTls::load(files) {
        Ok(tls) => tls.current().get(crate::tls::Alpn::None).clone(),
        Err(e) => return Some(format!("TLS files: {e}")),
    };
    let servers = connect.split_once('/').map_or(connect, |(servers, _chroot)| servers);
    for server in servers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let server = server.strip_prefix("tcp+tls://").unwrap_or(server);
        let host = server.rsplit_once(':').map_or(server, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let Ok(name) = ServerName::try_from(host.to_owned()) else {
            return Some(format!("{host:?} is not a name TLS can verify"));
        };
        let addr = if server.contains(':') { server.to_owned() } else { format!("{server}:2181") };
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect(&addr).await?;
            tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await
        };
        let outcome = tokio::time::timeout(std::time::Duration::from_secs(5), handshake)
            .await
            .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out")));
        if let Err(e) = outcome {
            return Some(format!("TLS handshake with {addr} failed ({}): {e}", crate::tls::failure_reason(&e)));
        }
    }
    None
}

impl ZkSettings {
    /// From the `[zookeeper]` section; reads `auth_file` if one is given, and checks that the
    /// `tls` files load.
    pub fn from_config(zk: &ZookeeperConfig) -> Result<ZkSettings, SettingsError> {
        if let Some(files) = &zk.tls {
            tls_options(files)?;
        }
        let auth = match (&zk.auth, &zk.auth_file) {
            (Some(a), _) => Some(a.clone().into_bytes()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| SettingsError::AuthFile { path: path.clone(), source })?
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
            tls: zk.tls.clone(),
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
