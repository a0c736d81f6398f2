//! TLS on rustls with the ring provider (README: "TLS"): a listener's server configuration,
//! loaded from PEM files and swapped whole when they change, and what a client certificate tells
//! the app (`x-forwarded-client-cert`). Below the data plane: it knows files and certificates,
//! not routes.

pub mod x509;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A TLS file that could not be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {file}: {reason}")]
    Read { file: String, reason: String },
    #[error("{file} holds no PEM certificate")]
    NoCertificate { file: String },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

impl TlsError {
    /// The file it is about.
    pub fn file(&self) -> &str {
        match self {
            TlsError::Read { file, .. } | TlsError::NoCertificate { file } | TlsError::Invalid { file, .. } => file,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read { file: path.display().to_string(), reason: e.to_string() })
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem).collect::<Result<_, _>>().map_err(|e| {
        TlsError::Invalid { file: path.display().to_string(), reason: format!("not PEM certificates: {e}") }
    })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { file: path.display().to_string() });
    }
    Ok(certs)
}

fn key(path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Invalid {
        file: path.display().to_string(),
        reason: format!("no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

fn roots(path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in certs(path, pem)? {
        store.add(c).map_err(|e| TlsError::Invalid { file: path.display().to_string(), reason: e.to_string() })?;
    }
    Ok(store)
}

/// The crypto provider every configuration uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The files of a TLS listener (`tls` of a `[[listener]]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, clients must present a certificate that chains to one of these roots.
    pub client_ca_file: Option<PathBuf>,
}

impl ServerFiles {
    fn paths(&self) -> impl Iterator<Item = &Path> + Clone {
        [Some(self.cert_file.as_path()), Some(self.key_file.as_path()), self.client_ca_file.as_deref()]
            .into_iter()
            .flatten()
    }
}

/// What was read of the files, to build from.
struct Contents(Vec<Vec<u8>>);

/// Which version of a set of files was last tried, so that a poll reads them only when one
/// changed: each file's stamp (through any symlink, as a Kubernetes Secret's swap changes it),
/// and a digest of the contents, which a touch without a change leaves equal. The contents are
/// not kept (a system CA bundle is hundreds of kilobytes).
struct Tried {
    stamps: Option<Vec<Stamp>>,
    digest: u64,
}

/// What identifies a file's version without reading it.
#[derive(PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).ok()?;
        Some(Stamp {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl Tried {
    /// Reads `paths` for the first time.
    fn first<'p>(paths: impl Iterator<Item = &'p Path> + Clone) -> Result<(Tried, Contents), TlsError> {
        // Stamped before reading, so that a write during the read is seen at the next poll.
        let stamps = paths.clone().map(Stamp::of).collect();
        let contents = Contents(paths.map(read).collect::<Result<_, _>>()?);
        let digest = {
            use std::hash::{Hash, Hasher};
            let mut h = std::hash::DefaultHasher::new();
            contents.0.hash(&mut h);
            h.finish()
        };
        Ok((Tried { stamps, digest }, contents))
    }

    /// What `paths` hold now, if it differs from what was last tried (which it then becomes). A
    /// file that cannot be stamped is read, for the error to name it.
    fn changed<'p>(&mut self, paths: impl Iterator<Item = &'p Path> + Clone) -> Result<Option<Contents>, TlsError> {
        let stamps: Option<Vec<Stamp>> = paths.clone().map(Stamp::of).collect();
        if stamps.is_some() && stamps == self.stamps {
            return Ok(None);
        }
        let (now, contents) = Tried::first(paths)?;
        let same = now.digest == self.digest;
        *self = now;
        Ok((!same).then_some(contents))
    }
}

/// A listener's server side of TLS: the configuration in force, replaced whole when its files
/// change. Handshakes take it with one atomic load; connections keep the one they began with.
pub struct ServerTls {
    files: ServerFiles,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<Loaded>,
    /// The files' version last tried, so that a file that fails is not retried (and logged)
    /// until it changes again.
    tried: Mutex<Tried>,
}

/// A configuration in force and what the app is told about it.
pub struct Loaded {
    pub config: Arc<ServerConfig>,
    /// The first URI subjectAltName of this listener's certificate: `By=` in
    /// `x-forwarded-client-cert`.
    pub by: Option<String>,
    /// notAfter of the listener's certificate, Unix seconds.
    pub not_after: Option<i64>,
}

impl ServerTls {
    /// Loads `files`; `alpn` is offered in that order (empty: no ALPN).
    pub fn load(files: &ServerFiles, alpn: &[&[u8]]) -> Result<ServerTls, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let (tried, contents) = Tried::first(files.paths())?;
        let loaded = build(files, &alpn, &contents)?;
        Ok(ServerTls { files: files.clone(), alpn, current: ArcSwap::from_pointee(loaded), tried: Mutex::new(tried) })
    }

    pub fn files(&self) -> &ServerFiles {
        &self.files
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca_file.is_some()
    }

    /// Reads the files again and, if their contents changed, builds and swaps in a new
    /// configuration. Ok(true): swapped; Ok(false): unchanged (or unchanged since a failure);
    /// Err: the new contents do not load, and the configuration in force stays.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
        let Some(contents) = tried.changed(self.files.paths())? else { return Ok(false) };
        self.current.store(Arc::new(build(&self.files, &self.alpn, &contents)?));
        Ok(true)
    }
}

fn build(files: &ServerFiles, alpn: &[Vec<u8>], contents: &Contents) -> Result<Loaded, TlsError> {
    let chain = certs(&files.cert_file, &contents.0[0])?;
    let key = key(&files.key_file, &contents.0[1])?;
    let provider = provider();
    let invalid = |file: &Path, e: &dyn std::fmt::Display| TlsError::Invalid {
        file: file.display().to_string(),
        reason: e.to_string(),
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(&files.cert_file, &e))?;
    let builder = match &files.client_ca_file {
        Some(ca) => {
            let roots = roots(ca, &contents.0[2])?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| invalid(ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let info = x509::parse(&chain[0]);
    let mut config = builder.with_single_cert(chain, key).map_err(|e| invalid(&files.key_file, &e))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Loaded {
        config: Arc::new(config),
        by: info.as_ref().and_then(|i| i.uri.first().cloned()),
        not_after: info.map(|i| i.not_after),
    })
}

/// Checks that `files` load, for configuration validation.
pub fn check_server(files: &ServerFiles) -> Result<(), TlsError> {
    ServerTls::load(files, &[]).map(drop)
}

/// The value of `x-forwarded-client-cert` for a client certificate, in Envoy's format:
/// `By=<our URI SAN>;Hash=<SHA-256 of the DER, hex>;Subject="<RFC 4514>";URI=<each>;DNS=<each>`.
pub fn forwarded_client_cert(by: Option<&str>, der: &[u8]) -> String {
    let mut out = String::with_capacity(256);
    let mut pair = |key: &str, value: &str, always_quote: bool| {
        if !out.is_empty() {
            out.push(';');
        }
        out.push_str(key);
        out.push('=');
        if always_quote || value.contains([',', ';', '=', '"']) {
            out.push('"');
            for c in value.chars() {
                if c == '"' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
            out.push('"');
        } else {
            out.push_str(value);
        }
    };
    if let Some(by) = by {
        pair("By", by, false);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    pair("Hash", &hex, false);
    if let Some(info) = x509::parse(der) {
        pair("Subject", &info.subject, true);
        for u in &info.uri {
            pair("URI", u, false);
        }
        for d in &info.dns {
            pair("DNS", d, false);
        }
    }
    out
}

/// This sidecar's identity and trust towards upstreams (the `[tls]` section).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFiles {
    /// Roots upstream certificates must chain to; unset: the system's.
    pub ca_file: Option<PathBuf>,
    /// The client certificate presented when an upstream asks (mutual TLS), with its key.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl UpstreamFiles {
    /// The files read: the CA bundle (given or the system's), then certificate and key if set.
    fn paths(&self) -> Vec<PathBuf> {
        let ca = self.ca_file.clone().or_else(system_roots_file);
        [ca, self.cert_file.clone(), self.key_file.clone()].into_iter().flatten().collect()
    }
}

/// Where this system keeps its CA bundle: `SSL_CERT_FILE` if set, else the first of the usual
/// places (Debian and Ubuntu, Fedora and RHEL, Alpine and others) that exists.
pub fn system_roots_file() -> Option<PathBuf> {
    if let Some(f) = std::env::var_os("SSL_CERT_FILE") {
        return Some(PathBuf::from(f));
    }
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt", "/etc/ssl/cert.pem"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The ALPN an upstream connection asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// None (TCP listeners relay whatever the app speaks).
    None,
    Http1,
    /// For HTTP/2 upstreams (services whose instances state h2): offers `h2` only.
    H2,
}

/// Client configurations built from the `[tls]` files, one per ALPN.
pub struct UpstreamConfigs {
    none: Arc<rustls::ClientConfig>,
    http1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
    /// notAfter of the client certificate, if one is set.
    pub not_after: Option<i64>,
}

impl UpstreamConfigs {
    pub fn get(&self, alpn: Alpn) -> &Arc<rustls::ClientConfig> {
        match alpn {
            Alpn::None => &self.none,
            Alpn::Http1 => &self.http1,
            Alpn::H2 => &self.h2,
        }
    }
}

/// The upstream side of TLS: configurations in force, replaced whole when the files change.
pub struct UpstreamTls {
    files: UpstreamFiles,
    current: ArcSwap<UpstreamConfigs>,
    tried: Mutex<Tried>,
}

impl UpstreamTls {
    pub fn load(files: &UpstreamFiles) -> Result<UpstreamTls, TlsError> {
        let (tried, contents) = Tried::first(files.paths().iter().map(PathBuf::as_path))?;
        let built = build_upstream(files, &contents)?;
        Ok(UpstreamTls { files: files.clone(), current: ArcSwap::from_pointee(built), tried: Mutex::new(tried) })
    }

    pub fn files(&self) -> &UpstreamFiles {
        &self.files
    }

    /// The configurations for the next handshake.
    pub fn current(&self) -> arc_swap::Guard<Arc<UpstreamConfigs>> {
        self.current.load()
    }

    /// As [`ServerTls::reload`].
    pub fn reload(&self) -> Result<bool, TlsError> {
        let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
        let Some(contents) = tried.changed(self.files.paths().iter().map(PathBuf::as_path))? else { return Ok(false) };
        self.current.store(Arc::new(build_upstream(&self.files, &contents)?));
        Ok(true)
    }
}

fn build_upstream(files: &UpstreamFiles, contents: &Contents) -> Result<UpstreamConfigs, TlsError> {
    let paths = files.paths();
    let mut roots = RootCertStore::empty();
    let mut at = 0;
    if files.ca_file.is_some() {
        roots = self::roots(&paths[0], &contents.0[0])?;
        at = 1;
    } else if paths.len() > usize::from(files.cert_file.is_some()) + usize::from(files.key_file.is_some()) {
        // The system's bundle: certificates it holds that do not parse are skipped, as browsers do.
        let certs = CertificateDer::pem_slice_iter(&contents.0[0]).filter_map(Result::ok);
        roots.add_parsable_certificates(certs);
        at = 1;
    }
    // One store for the three configurations (the system's holds over a hundred roots).
    let roots = Arc::new(roots);
    let invalid = |file: &Path, e: &dyn std::fmt::Display| TlsError::Invalid {
        file: file.display().to_string(),
        reason: e.to_string(),
    };
    let mut not_after = None;
    let make = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&paths[0], &e))?
            .with_root_certificates(roots.clone());
        let mut config = match (&files.cert_file, &files.key_file) {
            (Some(c), Some(k)) => {
                let chain = certs(c, &contents.0[at])?;
                let key = key(k, &contents.0[at + 1])?;
                builder.with_client_auth_cert(chain, key).map_err(|e| invalid(k, &e))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    };
    let none = make(&[])?;
    let http1 = make(&[b"http/1.1"])?;
    let h2 = make(&[b"h2"])?;
    if let Some(c) = &files.cert_file {
        not_after = certs(c, &contents.0[at])?.first().and_then(|d| x509::parse(d)).map(|i| i.not_after);
    }
    Ok(UpstreamConfigs { none, http1, h2, not_after })
}

/// Why an upstream TLS handshake failed, as the `reason` label of
/// `zkroute_upstream_tls_errors_total`.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    if e.kind() == std::io::ErrorKind::TimedOut {
        return "timeout";
    }
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "unknown_ca",
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => "name_mismatch",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            _ => "bad_certificate",
        },
        Some(Error::AlertReceived(_)) => "alert_received",
        Some(Error::NoApplicationProtocol) => "no_application_protocol",
        Some(_) => "handshake",
        None => "io",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn files_are_read_again_only_when_a_stamp_moves_and_reloaded_only_when_their_contents_changed() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("ca.crt");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, "one").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let paths = [link.clone()];
        let (mut tried, contents) = Tried::first(paths.iter().map(PathBuf::as_path)).unwrap();
        assert_eq!(contents.0, vec![b"one".to_vec()]);
        assert!(tried.changed(paths.iter().map(PathBuf::as_path)).unwrap().is_none(), "nothing moved");
        // The same contents in a new file (a Secret swapped to an equal version): read, not new.
        std::fs::write(&b, "one").unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        assert!(tried.changed(paths.iter().map(PathBuf::as_path)).unwrap().is_none(), "equal contents");
        // New contents behind the link.
        std::fs::write(&a, "two").unwrap();
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let changed = tried.changed(paths.iter().map(PathBuf::as_path)).unwrap();
        assert_eq!(changed.map(|c| c.0), Some(vec![b"two".to_vec()]));
        assert!(tried.changed(paths.iter().map(PathBuf::as_path)).unwrap().is_none());
        // A file gone is an error that names it, every time it is polled.
        std::fs::remove_file(&a).unwrap();
        for _ in 0..2 {
            let e = tried.changed(paths.iter().map(PathBuf::as_path)).err().unwrap();
            assert_eq!(e.file(), link.display().to_string());
        }
    }
}
