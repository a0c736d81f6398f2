//! The peers' watchers (`Peers.java` beside this file), compiled at run time against Debian's
//! Curator and ZooKeeper jars: one JVM per kind, holding every watcher of that kind.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const JARS: &[&str] = &[
    "curator-client",
    "curator-framework",
    "curator-recipes",
    "curator-x-discovery",
    "zookeeper",
    "zookeeper-jute",
    "jackson-core",
    "jackson-databind",
    "jackson-annotations",
    "guava",
    "slf4j-api",
    "slf4j-nop",
];

/// Installs what the peers need from Debian if it is missing.
pub fn ensure_installed() {
    if Path::new("/usr/share/java/curator-recipes.jar").exists()
        && Path::new("/usr/share/java/curator-x-discovery.jar").exists()
        && Command::new("javac").arg("-version").output().is_ok_and(|o| o.status.success())
    {
        return;
    }
    eprintln!("installing the peers' Curator and a JDK from Debian");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q default-jdk-headless libcurator-discovery-java libcurator-recipes-java"])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "could not install default-jdk-headless libcurator-discovery-java libcurator-recipes-java");
}

fn classpath() -> String {
    JARS.iter().map(|j| format!("/usr/share/java/{j}.jar")).collect::<Vec<_>>().join(":")
}

/// Compiles `Peers.java` into `dir`.
pub fn compile(dir: &Path) {
    let source = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/fleet/Peers.java");
    let status = Command::new("javac")
        .args(["-nowarn", "-cp", &classpath(), "-d"])
        .arg(dir)
        .arg(source)
        .status()
        .expect("javac");
    assert!(status.success(), "javac {source} failed");
}

/// One JVM running `count` watchers of one kind.
pub struct PeerJvm {
    pub kind: &'static str,
    pub count: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    /// Each watcher's latest count of instances.
    seen: Arc<Mutex<Vec<Option<u64>>>>,
}

impl PeerJvm {
    /// Starts the JVM and waits until every watcher holds every service.
    pub fn start(classes: &Path, kind: &'static str, count: usize, connect: &str, base: &str) -> PeerJvm {
        let mut child = Command::new("java")
            .args(["-Xmx512m", "-XX:+UseSerialGC", "-cp"])
            .arg(format!("{}:{}", classes.display(), classpath()))
            .args(["Peers", kind, connect, base, &count.to_string()])
            .arg(crate::SESSION_TIMEOUT.as_millis().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("java");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped");
        let seen = Arc::new(Mutex::new(vec![None; count]));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let shared = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let f: Vec<&str> = line.split_whitespace().collect();
                match f.as_slice() {
                    ["ready"] => {
                        let _ = ready_tx.send(());
                    }
                    ["seen", w, n] => {
                        if let (Ok(w), Ok(n)) = (w.parse::<usize>(), n.parse::<u64>()) {
                            if let Some(slot) = shared.lock().expect("lock").get_mut(w) {
                                *slot = Some(n);
                            }
                        }
                    }
                    _ => eprintln!("{kind}: {line}"),
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("{kind} watchers did not start"));
        PeerJvm { kind, count, child, stdin, seen }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Until every watcher's view holds `instances`; returns how many do not.
    pub fn wait_all(&self, instances: u64, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let missing = self.seen.lock().expect("lock").iter().filter(|s| **s != Some(instances)).count();
            if missing == 0 || Instant::now() >= deadline {
                return missing;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for PeerJvm {
    fn drop(&mut self) {
        // Closing standard input ends the JVM; a kill makes sure.
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
