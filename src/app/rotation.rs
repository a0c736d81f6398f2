//! TLS files reloaded when their contents change (README: "TLS"): polled, so that the symlink
//! swaps of Kubernetes Secrets are seen, and on SIGHUP. A change that does not load keeps the
//! files in force, logged and counted; each certificate's expiry is a gauge, with a warning once
//! it is within a week. Only files the configuration names are polled: a sidecar without TLS
//! settings has no poll waking it, and reads the system's CA bundle at the start and on SIGHUP.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::tls::{ServerTls, TlsError, UpstreamFiles, UpstreamTls};

/// How often the files are read and compared.
pub const POLL: Duration = Duration::from_secs(2);
/// A certificate this close to its end is warned about.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// Every TLS configuration of the process, for the poll.
pub struct Rotation {
    servers: Mutex<Vec<Weak<ServerTls>>>,
    upstream: Option<Arc<UpstreamTls>>,
    metrics: Arc<Metrics>,
    /// (file, notAfter) already warned about.
    warned: Mutex<HashSet<(String, i64)>>,
    /// The poll, started with the first file the configuration names; stopped with the rotation.
    poll: OnceLock<tokio::task::AbortHandle>,
}

impl Rotation {
    /// Polls `upstream`'s files from now on if the `[tls]` section names any (inside a runtime).
    pub fn new(upstream: Option<Arc<UpstreamTls>>, metrics: Arc<Metrics>) -> Arc<Rotation> {
        let r = Arc::new(Rotation {
            servers: Mutex::default(),
            upstream,
            metrics,
            warned: Mutex::default(),
            poll: OnceLock::new(),
        });
        if let Some(u) = &r.upstream {
            if let (Some(file), Some(t)) = (&u.files().cert_file, u.current().not_after) {
                r.expiry(file, t);
            }
        }
        if r.upstream_named() {
            r.start_polling();
        }
        r
    }

    /// A listener's TLS, newly loaded: polled from now on (until it is dropped).
    pub fn add(self: &Arc<Self>, tls: &Arc<ServerTls>) {
        self.expiry(&tls.files().cert_file, tls.current().not_after.unwrap_or(0));
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        servers.retain(|w| w.strong_count() > 0);
        servers.push(Arc::downgrade(tls));
        drop(servers);
        self.start_polling();
    }

    /// The `[tls]` section names files (else its roots are the system's bundle alone).
    fn upstream_named(&self) -> bool {
        self.upstream.as_ref().is_some_and(|u| *u.files() != UpstreamFiles::default())
    }

    /// Reads every file again, the system's CA bundle too, and swaps in what changed and loads
    /// (SIGHUP).
    pub fn check(&self) {
        self.check_files(true);
    }

    fn check_files(&self, system_bundle: bool) {
        let servers: Vec<Arc<ServerTls>> = {
            let mut s = self.servers.lock().unwrap_or_else(|p| p.into_inner());
            s.retain(|w| w.strong_count() > 0);
            s.iter().filter_map(Weak::upgrade).collect()
        };
        for s in servers {
            let cert = &s.files().cert_file;
            if self.outcome(cert, s.reload()) {
                self.expiry(cert, s.current().not_after.unwrap_or(0));
            }
        }
        if let Some(u) = self.upstream.as_ref().filter(|_| system_bundle || self.upstream_named()) {
            let cert = u.files().cert_file.clone();
            let shown = cert.clone().or_else(|| u.files().ca_file.clone()).unwrap_or_else(|| "system CA bundle".into());
            if self.outcome(&shown, u.reload()) {
                if let (Some(file), Some(t)) = (cert, u.current().not_after) {
                    self.expiry(&file, t);
                }
            }
        }
    }

    /// Logs and counts a reload's outcome; true if new files are in force.
    fn outcome(&self, shown: &Path, result: Result<bool, TlsError>) -> bool {
        match result {
            Ok(true) => {
                info!(file = %shown.display(), "TLS files changed: new handshakes use them");
                true
            }
            Ok(false) => false,
            Err(e) => {
                let file = e.file().to_owned();
                error!(file = %file, error = %e, "TLS files changed but do not load: the previous ones stay in force");
                self.metrics.tls_file_errors.with_label_values(&[&file]).inc();
                false
            }
        }
    }

    fn expiry(&self, file: &Path, not_after: i64) {
        let name = file.display().to_string();
        self.metrics.tls_certificate_expiry.with_label_values(&[&name]).set(not_after);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
        if not_after - now < EXPIRY_WARNING.as_secs() as i64
            && self.warned.lock().unwrap_or_else(|p| p.into_inner()).insert((name.clone(), not_after))
        {
            let in_hours = (not_after - now) / 3600;
            warn!(file = %name, not_after, in_hours, "TLS certificate expires within 7 days (or has expired)");
        }
    }

    /// Polls every [`POLL`] from now on (once), until the rotation is dropped.
    fn start_polling(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.poll.get_or_init(|| {
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(POLL).await;
                    let Some(r) = me.upgrade() else { return };
                    // File reads block: off the runtime's threads.
                    let _ = tokio::task::spawn_blocking(move || r.check_files(false)).await;
                }
            })
            .abort_handle()
        });
    }
}

impl Drop for Rotation {
    fn drop(&mut self) {
        if let Some(poll) = self.poll.get() {
            poll.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn only_files_the_configuration_names_are_polled() {
        let metrics = Arc::new(Metrics::new(true));
        let system = crate::tls::system_roots_file().expect("a system CA bundle (Debian: ca-certificates)");
        // No `[tls]`: the system's bundle alone, read at the start and on SIGHUP, not polled.
        let unnamed = UpstreamTls::load(&UpstreamFiles::default()).unwrap();
        let r = Rotation::new(Some(Arc::new(unnamed)), metrics.clone());
        assert!(r.poll.get().is_none(), "nothing the configuration names: no poll");
        r.check();
        // `[tls] ca_file`: polled, and no longer once the rotation is gone.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.crt");
        std::fs::copy(&system, &ca).unwrap();
        let named = UpstreamTls::load(&UpstreamFiles { ca_file: Some(ca), ..Default::default() }).unwrap();
        let r = Rotation::new(Some(Arc::new(named)), metrics);
        assert!(r.poll.get().is_some(), "a named file: polled");
        let poll = r.poll.get().unwrap().clone();
        drop(r);
        for _ in 0..1000 {
            if poll.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(poll.is_finished(), "the poll stops with the rotation");
    }
}
