//! Certificates for TLS tests, made by the `openssl` command in a directory of their own: a CA,
//! and EC P-256 certificates it signs with the subjectAltNames a test asks for.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long an issued certificate is valid.
#[derive(Clone, Copy, Debug)]
pub enum Validity {
    /// From now, for this many days.
    Days(u32),
    /// notBefore and notAfter as `YYMMDDHHMMSSZ`, e.g. a window in the past.
    Between(&'static str, &'static str),
}

/// A CA in a temporary directory, removed when dropped.
pub struct Ca {
    dir: tempfile::TempDir,
    name: String,
    pub cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    super::deps::ensure();
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Ca {
    /// A new self-signed CA named `name`.
    pub fn new(name: &str) -> Ca {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = (dir.path().join(format!("{name}-ca.crt")), dir.path().join(format!("{name}-ca.key")));
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN={name} CA"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Ca { dir, name: name.to_owned(), cert, key }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A certificate for `cn` with subjectAltNames `sans` (`DNS:a`, `IP:127.0.0.1`, `URI:...`),
    /// valid 30 days, for server and client use.
    pub fn issue(&self, cn: &str, sans: &[&str]) -> Issued {
        self.issue_with(cn, sans, Validity::Days(30))
    }

    /// As [`Ca::issue`], valid for `validity`.
    pub fn issue_with(&self, cn: &str, sans: &[&str], validity: Validity) -> Issued {
        let dir = self.dir.path();
        let stem = format!("{}-{cn}-{}", self.name, fastrand::u32(..));
        let (cert, key, csr, ext) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
            dir.join(format!("{stem}.csr")),
            dir.join(format!("{stem}.ext")),
        );
        let mut extensions = String::from("basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n");
        if !sans.is_empty() {
            extensions.push_str(&format!("subjectAltName={}\n", sans.join(",")));
        }
        std::fs::write(&ext, extensions).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/O=zkroute tests/CN={cn}"),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                csr.to_str().unwrap(),
            ],
        );
        let (csr, ext, out) = (csr.to_str().unwrap(), ext.to_str().unwrap(), cert.to_str().unwrap());
        let (ca_cert, ca_key) = (self.cert.to_str().unwrap(), self.key.to_str().unwrap());
        match validity {
            Validity::Days(days) => openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    csr,
                    "-CA",
                    ca_cert,
                    "-CAkey",
                    ca_key,
                    "-set_serial",
                    &fastrand::u32(1..).to_string(),
                    "-days",
                    &days.to_string(),
                    "-extfile",
                    ext,
                    "-out",
                    out,
                ],
            ),
            // OpenSSL 3.0's `x509` has no start date: `ca` does, with a database of its own.
            Validity::Between(not_before, not_after) => {
                let db = dir.join(format!("{stem}.db"));
                std::fs::write(&db, "").unwrap();
                let cnf = dir.join(format!("{stem}.cnf"));
                std::fs::write(
                    &cnf,
                    format!(
                        "[ca]\ndefault_ca = d\n[d]\ndatabase = {}\nserial = {}.serial\nnew_certs_dir = {}\ndefault_md = sha256\n\
                         policy = p\nunique_subject = no\n[p]\ncommonName = supplied\norganizationName = optional\n",
                        db.display(),
                        db.display(),
                        dir.display()
                    ),
                )
                .unwrap();
                openssl(
                    dir,
                    &[
                        "ca",
                        "-batch",
                        "-notext",
                        "-config",
                        cnf.to_str().unwrap(),
                        "-cert",
                        ca_cert,
                        "-keyfile",
                        ca_key,
                        "-in",
                        csr,
                        "-out",
                        out,
                        "-extfile",
                        ext,
                        "-startdate",
                        not_before,
                        "-enddate",
                        not_after,
                        "-rand_serial",
                    ],
                );
            }
        }
        Issued { cert, key }
    }
}

/// An HTTPS server of Python's `ssl` module (OpenSSL): answers every GET with 200 and body
/// `tls-backend client=<the client certificate's CN>`, headers `x-sni` (the server name the client
/// sent) and `x-alpn`. With a client CA, a client certificate of it is required. Killed on drop.
pub struct TlsBackend {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
}

const TLS_BACKEND: &str = r#"
import http.server, ssl, sys
cert, key, ca = sys.argv[1:4]
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        cn = ""
        for rdn in (self.connection.getpeercert() or {}).get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    cn = v
        body = ("tls-backend client=" + cn).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-sni", getattr(self.connection, "sni", None) or "-")
        self.send_header("x-alpn", self.connection.selected_alpn_protocol() or "-")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if ca != "-":
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
ctx.set_alpn_protocols(["http/1.1"])
def sni(sock, name, c):
    sock.sni = name
ctx.sni_callback = sni
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl TlsBackend {
    pub fn start(server: &Issued, client_ca: Option<&Path>) -> TlsBackend {
        use std::io::BufRead;
        let ca = client_ca.map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
        let mut child = Command::new("python3")
            .args(["-c", TLS_BACKEND, server.cert.to_str().unwrap(), server.key.to_str().unwrap(), &ca])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("TLS backend did not start: {line:?}"));
        TlsBackend { addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)), child }
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A path as a TOML string.
pub fn toml_path(p: &std::path::Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// A listener section named `name` with `tls` over `server`, requiring client certificates of
/// `client_ca` if given.
pub fn tls_listener(
    name: &str,
    protocol: &str,
    server: &Issued,
    client_ca: Option<&Ca>,
    service: Option<&str>,
) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n{}[listener.tls]\ncert_file = {}\nkey_file = {}\n",
        service.map(|s| format!("service = \"{s}\"\n")).unwrap_or_default(),
        toml_path(&server.cert),
        toml_path(&server.key),
    );
    if let Some(ca) = client_ca {
        s.push_str(&format!("client_ca_file = {}\n", toml_path(&ca.cert)));
    }
    s
}

/// An HTTP listener named `name` on a free port, and the `[tls]` section of a sidecar that trusts
/// `ca` and presents `identity` to upstreams that ask (mutual TLS between sidecars).
pub fn outbound_with_identity(name: &str, ca: &Ca, identity: &Issued) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\n[tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
        toml_path(&ca.cert),
        toml_path(&identity.cert),
        toml_path(&identity.key)
    )
}
