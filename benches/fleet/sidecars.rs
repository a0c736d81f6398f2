//! N zkroute processes (`proxy.workers = 1`, one TCP listener each, so each follows ZooKeeper),
//! logging JSON to a file apiece. Their "routing table swapped" lines (time and `zxid`) and "read
//! everything" lines are what the bench times changes and resyncs by.

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// One table swap, as logged.
#[derive(Clone, Copy, Debug)]
pub struct Swap {
    pub at: SystemTime,
    /// The highest mzxid the swap's changes were read from (none for deletions only).
    pub zxid: Option<i64>,
    pub removed: u64,
}

pub struct Sidecar {
    child: Child,
    log: PathBuf,
    /// The log, open for reading from where the last poll stopped.
    reader: Option<File>,
    partial: Vec<u8>,
    pub swaps: Vec<Swap>,
    /// When each full read of ZooKeeper finished.
    pub full_reads: Vec<SystemTime>,
}

impl Sidecar {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first swap at or after `zxid`.
    pub fn applied(&self, zxid: i64) -> Option<SystemTime> {
        self.swaps.iter().find(|s| s.zxid.is_some_and(|z| z >= zxid)).map(|s| s.at)
    }

    pub fn swaps_between(&self, from: SystemTime, to: SystemTime) -> usize {
        self.swaps.iter().filter(|s| s.at >= from && s.at <= to).count()
    }

    pub fn full_read_since(&self, t: SystemTime) -> Option<SystemTime> {
        self.full_reads.iter().copied().find(|r| *r >= t)
    }

    /// Reads the lines logged since the last call.
    fn poll(&mut self) {
        if self.reader.is_none() {
            self.reader = File::open(&self.log).ok();
        }
        let Some(f) = &mut self.reader else { return };
        if f.read_to_end(&mut self.partial).is_err() {
            return;
        }
        let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') else { return };
        let complete: Vec<u8> = self.partial.drain(..=end).collect();
        for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else { continue };
            let Some(at) = v["timestamp"].as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok()) else {
                continue;
            };
            match v["message"].as_str() {
                Some("routing table swapped") => self.swaps.push(Swap {
                    at,
                    zxid: v["zxid"].as_i64(),
                    removed: v["instances_removed"].as_u64().unwrap_or(0),
                }),
                Some("read everything from ZooKeeper") => self.full_reads.push(at),
                _ => {}
            }
        }
    }
}

/// What each member of the fleet runs.
pub enum Program {
    /// zkroute, from this path.
    Zkroute(String),
    /// The floor watcher (`floor.rs`), this bench's own binary.
    Floor,
}

/// The fleet, in one process group that a watchdog kills if the bench dies first.
pub struct Fleet {
    pub sidecars: Vec<Sidecar>,
    watchdog: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts `n` sidecars following `connect`; `extra` is appended to the `[zookeeper]` table.
    pub fn start(program: &Program, n: usize, connect: &str, extra: &str) -> Fleet {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut sidecars: Vec<Sidecar> = Vec::with_capacity(n);
        let mut watchdog = None;
        for i in 0..n {
            let config = dir.path().join(format!("{i}.toml"));
            let log = dir.path().join(format!("{i}.log"));
            std::fs::write(
                &config,
                format!(
                    "[zookeeper]\nconnect = \"{connect}\"\nsession_timeout = \"{}s\"\n{extra}\n\
                     [admin]\nbind = \"127.0.0.1:0\"\n[proxy]\nworkers = 1\ndrain_timeout = \"0s\"\n\
                     [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\nservice = \"svc-0\"\n\
                     [log]\nformat = \"json\"\n",
                    crate::SESSION_TIMEOUT.as_secs(),
                ),
            )
            .expect("sidecar config");
            let group = sidecars.first().map_or(0, |s| s.pid() as i32);
            let mut command = match program {
                Program::Zkroute(binary) => {
                    let mut c = Command::new(binary);
                    c.arg("--config").arg(&config).env("RUST_LOG", "info");
                    c
                }
                Program::Floor => {
                    let mut c = Command::new(std::env::current_exe().expect("the bench's path"));
                    c.args(["--floor-watcher", connect]);
                    c
                }
            };
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&log).expect("sidecar log"))
                .process_group(group)
                .spawn()
                .expect("start zkroute");
            if watchdog.is_none() {
                // Kills the whole group when the bench's end of the pipe closes, however it ends.
                watchdog = Some(
                    Command::new("sh")
                        .args(["-c", &format!("trap '' INT TERM; read _; kill -9 -{} 2>/dev/null", child.id())])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .spawn()
                        .expect("watchdog"),
                );
            }
            sidecars.push(Sidecar {
                child,
                log,
                reader: None,
                partial: Vec::new(),
                swaps: Vec::new(),
                full_reads: Vec::new(),
            });
        }
        Fleet { sidecars, watchdog, _dir: dir }
    }

    pub fn len(&self) -> usize {
        self.sidecars.len()
    }

    pub fn pids(&self) -> Vec<u32> {
        self.sidecars.iter().map(Sidecar::pid).collect()
    }

    pub fn poll(&mut self) {
        for s in &mut self.sidecars {
            s.poll();
        }
    }

    /// Polls the logs until `done` holds for every sidecar or `within` passes; returns how many
    /// it does not hold for.
    pub fn wait_all(&mut self, within: Duration, done: impl Fn(&Sidecar) -> bool) -> usize {
        let deadline = Instant::now() + within;
        loop {
            self.poll();
            self.assert_running();
            let missing = self.sidecars.iter().filter(|s| !done(s)).count();
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            // Reading every log costs the machine the sidecars share: less often for more.
            std::thread::sleep(Duration::from_millis((self.sidecars.len() as u64 / 20).clamp(5, 50)));
        }
    }

    /// Panics with its log if a sidecar has exited.
    fn assert_running(&mut self) {
        for s in &mut self.sidecars {
            if let Ok(Some(status)) = s.child.try_wait() {
                let log = std::fs::read_to_string(&s.log).unwrap_or_default();
                panic!("sidecar {} exited ({status}):\n{log}", s.child.id());
            }
        }
    }

    /// SIGTERM to all, then SIGKILL to those still running after a few seconds.
    pub fn stop(mut self) {
        for s in &self.sidecars {
            let _ = Command::new("kill").args(["-TERM", &s.pid().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for s in &mut self.sidecars {
            while Instant::now() < deadline && matches!(s.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for s in &mut self.sidecars {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
    }
}
