//! The zkroute binary as a child process, for tests of signals, exit codes and logs.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{RouteSource, eventually, free_port, get};

/// The zkroute binary, started with a config following a ZooKeeper chroot or a routes file:
/// admin, an HTTP listener `http` (service `web`) and a TCP listener `tcp` (service `echo`) on free
/// ports.
pub struct Binary {
    pub child: Child,
    pub admin: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
    pub tcp: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
}

impl Binary {
    pub async fn start(routes: &impl RouteSource, drain: &str) -> Binary {
        Binary::start_with(routes, drain, "", &[]).await
    }

    /// With extra TOML and extra command-line arguments.
    pub async fn start_with(routes: &impl RouteSource, drain: &str, extra: &str, args: &[&str]) -> Binary {
        Binary::start_with_env(routes, drain, extra, args, &[]).await
    }

    /// With extra TOML, command-line arguments and environment variables.
    pub async fn start_with_env(
        routes: &impl RouteSource,
        drain: &str,
        extra: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Binary {
        let dir = tempfile::tempdir().unwrap();
        let (admin, http, tcp) = (free_port(), free_port(), free_port());
        let config = format!(
            "{}[admin]\nbind = \"127.0.0.1:{admin}\"\n\
             [proxy]\ndrain_timeout = \"{drain}\"\n\
             [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:{http}\"\nservice = \"web\"\n\
             [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{tcp}\"\nprotocol = \"tcp\"\nservice = \"echo\"\n{extra}",
            routes.source_config()
        );
        let ip = |p| std::net::SocketAddr::from(([127, 0, 0, 1], p));
        let (admin, http, tcp) = (ip(admin), ip(http), ip(tcp));
        Binary::spawn(dir, &config, args, env, admin, http, tcp).await
    }

    /// With a whole configuration of the caller's, whose admin port answers at `admin` (the
    /// `http` and `tcp` fields are then unused placeholders).
    pub async fn start_config(config: &str, admin: std::net::SocketAddr) -> Binary {
        let unused = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        Binary::spawn(tempfile::tempdir().unwrap(), config, &[], &[], admin, unused, unused).await
    }

    async fn spawn(
        dir: tempfile::TempDir,
        config: &str,
        args: &[&str],
        env: &[(&str, &str)],
        admin: std::net::SocketAddr,
        http: std::net::SocketAddr,
        tcp: std::net::SocketAddr,
    ) -> Binary {
        let path = dir.path().join("zkroute.toml");
        std::fs::write(&path, config).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_zkroute"))
            .arg("--config")
            .arg(&path)
            .args(args)
            .envs(env.iter().copied())
            // More detail when chasing a failure: ZKROUTE_TEST_LOG=info,zkroute::proxy=debug
            // (tests that read this log expect info lines; the default).
            .env("RUST_LOG", std::env::var("ZKROUTE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("zkroute.log")).unwrap())
            .spawn()
            .unwrap();
        let b = Binary { child, admin, http, tcp, dir };
        eventually("zkroute ready", Duration::from_secs(15), || async {
            (get(b.admin, "/ready").await.ok()?.status() == 200).then_some(())
        })
        .await;
        b
    }

    pub fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the exit, up to `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "zkroute did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Binary {
    /// The configuration file it runs with.
    pub fn config_file(&self) -> std::path::PathBuf {
        self.dir.path().join("zkroute.toml")
    }

    /// The configuration file's text.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.config_file()).unwrap()
    }

    /// Writes `config` over the configuration file and sends SIGHUP.
    pub fn reload(&self, config: &str) {
        std::fs::write(self.config_file(), config).unwrap();
        self.signal("HUP");
    }

    /// What the process logged to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("zkroute.log")).unwrap_or_default()
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // A failed test shows what the process said last.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL).collect();
            eprintln!("--- the last {} lines zkroute logged ---", tail.len());
            tail.iter().rev().for_each(|l| eprintln!("{l}"));
        }
    }
}

/// Lines of a failed test's zkroute log that are shown.
const LOG_TAIL: usize = 60;
