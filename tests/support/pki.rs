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
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                csr.to_str().unwrap(),
                "-CA",
                self.cert.to_str().unwrap(),
                "-CAkey",
                self.key.to_str().unwrap(),
                "-set_serial",
                &fastrand::u32(1..).to_string(),
                "-days",
                "30",
                "-extfile",
                ext.to_str().unwrap(),
                "-out",
                cert.to_str().unwrap(),
            ],
        );
        Issued { cert, key }
    }
}
