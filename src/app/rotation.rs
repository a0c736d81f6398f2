//! TLS files reloaded when their contents change (README: "TLS"): polled, so that the symlink
//! swaps of Kubernetes Secrets are seen, and on SIGHUP. A change that does not load keeps the
//! files in force, logged and counted; each certificate's expiry is a gauge, with a warning once
//! it is within a week.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use crate::metrics::Metrics;
use crate::tls::{ServerTls, TlsError, UpstreamTls};

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
}

impl Rotation {
    pub fn new(upstream: Option<Arc<UpstreamTls>>, metrics: Arc<Metrics>) -> Arc<Rotation> {
        let r = Arc::new(Rotation { servers: Mutex::default(), upstream, metrics, warned: Mutex::default() });
        if let Some(u) = &r.upstream {
            if let (Some(file), Some(t)) = (&u.files().cert_file, u.current().not_after) {
                r.expiry(file, t);
            }
        }
        r
    }

    /// A listener's TLS, newly loaded: polled from now on (until it is dropped).
    pub fn add(&self, tls: &Arc<ServerTls>) {
        self.expiry(&tls.files().cert_file, tls.current().not_after.unwrap_or(0));
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        servers.retain(|w| w.strong_count() > 0);
        servers.push(Arc::downgrade(tls));
    }

    /// Reads every file again and swaps in what changed and loads.
    pub fn check(&self) {
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
        if let Some(u) = &self.upstream {
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

    /// Polls every [`POLL`] until the returned task is aborted.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                let Some(r) = me.upgrade() else { return };
                // File reads block: off the runtime's threads.
                let _ = tokio::task::spawn_blocking(move || r.check()).await;
            }
        })
    }
}
