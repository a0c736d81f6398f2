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
    fn paths(&self) -> impl Iterator<Item = &Path> {
        [Some(self.cert_file.as_path()), Some(self.key_file.as_path()), self.client_ca_file.as_deref()]
            .into_iter()
            .flatten()
    }
}

/// What was read of the files, to build from and to compare with their next contents.
#[derive(PartialEq, Eq)]
struct Contents(Vec<Vec<u8>>);

/// A listener's server side of TLS: the configuration in force, replaced whole when its files
/// change. Handshakes take it with one atomic load; connections keep the one they began with.
pub struct ServerTls {
    files: ServerFiles,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<Loaded>,
    /// Contents last tried, so that a file that fails is not retried (and logged) until it
    /// changes again.
    tried: Mutex<Option<Contents>>,
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
        let contents = Contents(files.paths().map(read).collect::<Result<_, _>>()?);
        let loaded = build(files, &alpn, &contents)?;
        Ok(ServerTls {
            files: files.clone(),
            alpn,
            current: ArcSwap::from_pointee(loaded),
            tried: Mutex::new(Some(contents)),
        })
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
        let contents = Contents(self.files.paths().map(read).collect::<Result<_, _>>()?);
        let mut tried = self.tried.lock().unwrap_or_else(|p| p.into_inner());
        if tried.as_ref() == Some(&contents) {
            return Ok(false);
        }
        let built = build(&self.files, &self.alpn, &contents);
        *tried = Some(contents);
        self.current.store(Arc::new(built?));
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
