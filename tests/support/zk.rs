//! A throwaway ZooKeeper server from Debian's `zookeeper` package, on a free loopback port with
//! its own data directory. Dropped, it stops; if the test process dies first, a watchdog process
//! kills it, so no server outlives the test binary.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use zookeeper_client::{Acls, Client, CreateMode, Error};

const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";

/// JVM options for the servers: quick to start and small, for tests.
const TEST_JVM: &[&str] = &["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"];
static JVM: OnceLock<Vec<String>> = OnceLock::new();

/// Replaces the JVM options of every server this process starts from now on (a bench runs the
/// servers with the full JIT and a larger heap, as in production).
pub fn set_jvm_options(options: &[&str]) {
    let _ = JVM.set(options.iter().map(|o| (*o).to_owned()).collect());
}
const SLF4J_JAR: &str = "/usr/share/java/slf4j-simple.jar";
/// Netty's codec classes: `zookeeper.jar`'s manifest leaves them out, and the Netty connection
/// factory (the one that serves TLS) needs them.
const NETTY_CODEC_JAR: &str = "/usr/share/java/netty-codec.jar";

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

struct Running {
    java: Child,
    watchdog: Child,
}

impl Running {
    fn stop(mut self, signal: &str) {
        let _ = Command::new("kill").args([signal, &self.java.id().to_string()]).status();
        let _ = self.java.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// One ZooKeeper server (standalone) or a member of an ensemble.
pub struct Zk {
    pub port: u16,
    /// The TLS port (`secureClientPort`) of a server started by [`Zk::start_secure`].
    pub secure_port: Option<u16>,
    dir: tempfile::TempDir,
    running: Option<Running>,
    /// Where `java` writes its log, for failure messages.
    log: PathBuf,
    main_class: &'static str,
}

const STANDALONE_MAIN: &str = "org.apache.zookeeper.server.ZooKeeperServerMain";
const QUORUM_MAIN: &str = "org.apache.zookeeper.server.quorum.QuorumPeerMain";

static SHARED: OnceLock<Zk> = OnceLock::new();
static CHROOTS: AtomicU32 = AtomicU32::new(0);

impl Zk {
    /// Starts a standalone server and waits until it answers.
    pub fn start() -> Zk {
        Zk::start_with(|_| String::new(), None)
    }

    /// A standalone server that also serves TLS on [`Zk::secure_port`] (Netty, PEM key and trust
    /// stores, as the README's "ZooKeeper over TLS" sets it up), presenting `server` and requiring
    /// a client certificate that chains to `client_ca`. The plain port stays open for the test's
    /// own client.
    pub fn start_secure(server: &super::pki::Issued, client_ca: &std::path::Path) -> Zk {
        let secure_port = free_port();
        Zk::start_with(
            |dir| {
                // ZooKeeper's PEM key store is one file: the private key, then the certificate.
                let key_store = dir.join("zk-keystore.pem");
                let pem = std::fs::read_to_string(&server.key).expect("server key")
                    + &std::fs::read_to_string(&server.cert).expect("server certificate");
                std::fs::write(&key_store, pem).expect("key store");
                format!(
                    "secureClientPort={secure_port}\nsecureClientPortAddress=127.0.0.1\n\
                     serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
                     ssl.keyStore.location={}\nssl.keyStore.type=PEM\n\
                     ssl.trustStore.location={}\nssl.trustStore.type=PEM\nssl.clientAuth=need\n",
                    key_store.display(),
                    client_ca.display()
                )
            },
            Some(secure_port),
        )
    }

    fn start_with(extra: impl FnOnce(&std::path::Path) -> String, secure_port: Option<u16>) -> Zk {
        super::deps::ensure();
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let cfg = format!(
            "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
             4lw.commands.whitelist=*\nmaxSessionTimeout=20000\nmaxClientCnxns=0\n{}",
            dir.path().join("data").display(),
            extra(dir.path()),
        );
        std::fs::create_dir_all(dir.path().join("data")).expect("data dir");
        std::fs::write(dir.path().join("zoo.cfg"), cfg).expect("zoo.cfg");
        let log = dir.path().join("zk.log");
        let mut zk = Zk { port, secure_port, dir, running: None, log, main_class: STANDALONE_MAIN };
        zk.launch(STANDALONE_MAIN);
        zk.wait_until_serving();
        zk
    }

    /// The server shared by every test of this binary; each test takes its own chroot.
    pub fn shared() -> &'static Zk {
        SHARED.get_or_init(Zk::start)
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.running.as_ref().map(|r| r.java.id())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:port`.
    pub fn connect_string(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn launch(&mut self, main_class: &str) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("zk log");
        let java = Command::new("java")
            .args(JVM.get().map_or_else(|| TEST_JVM.iter().map(|o| (*o).to_owned()).collect(), Vec::clone))
            .arg("-Dzookeeper.admin.enableServer=false")
            .arg("-cp")
            .arg(format!("{ZK_JAR}:{SLF4J_JAR}:{NETTY_CODEC_JAR}"))
            .arg(main_class)
            .arg(self.dir.path().join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("java: is the zookeeper package installed?");
        // Kills the server when this process's end of the pipe closes, whatever way it exits.
        let mut watchdog = Command::new("sh")
            .args(["-c", &format!("read _; kill -9 {} 2>/dev/null", java.id())])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("watchdog");
        // Keep the pipe open: the Child holds its stdin.
        let _ = watchdog.stdin.as_mut().map(|s| s.flush());
        self.running = Some(Running { java, watchdog });
    }

    /// Waits until the server answers `ruok` with `imok` and serves a session.
    pub fn wait_until_serving(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if four_letter(self.addr(), "ruok").as_deref() == Some("imok") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "ZooKeeper on {} did not start; log:\n{}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Stops the server (SIGTERM, waiting for it), keeping its data.
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop("-TERM");
        }
    }

    /// Kills the server (SIGKILL), keeping its data.
    pub fn kill(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop("-KILL");
        }
    }

    /// Starts the stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        self.launch(self.main_class);
        self.wait_until_serving();
    }

    /// Freezes the server (SIGSTOP): clients see silence, and sessions expire on the server
    /// after it resumes.
    pub fn pause(&self) {
        if let Some(r) = &self.running {
            let _ = Command::new("kill").args(["-STOP", &r.java.id().to_string()]).status();
        }
    }

    pub fn resume(&self) {
        if let Some(r) = &self.running {
            let _ = Command::new("kill").args(["-CONT", &r.java.id().to_string()]).status();
        }
    }

    /// What the server logged, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A fresh chroot for one test, created on the server: `127.0.0.1:port/t<n>-<pid>`.
    pub fn chroot(&self) -> Chroot {
        let n = CHROOTS.fetch_add(1, Ordering::Relaxed);
        let path = format!("/t{n}-{}", std::process::id());
        block_on(async {
            let c = Client::connect(&self.connect_string()).await.expect("connect");
            c.create(&path, b"", &CreateMode::Persistent.with_acls(Acls::anyone_all())).await.expect("create chroot");
        });
        Chroot { connect: format!("{}{path}", self.connect_string()) }
    }
}

impl Drop for Zk {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A chroot on a server, for one test.
#[derive(Clone, Debug)]
pub struct Chroot {
    /// The connect string with the chroot.
    pub connect: String,
}

impl Chroot {
    /// The same chroot reached through `proxy` (which forwards to this chroot's server).
    pub fn via(&self, proxy: &super::FaultProxy) -> Chroot {
        let path = self.connect.find('/').map_or("", |i| &self.connect[i..]);
        Chroot { connect: proxy.connect_string(path) }
    }

    pub async fn client(&self) -> ZkClient {
        ZkClient(Client::connect(&self.connect).await.expect("connect to the chroot"))
    }
}

/// A test's own ZooKeeper client, writing what users and registries write.
pub struct ZkClient(pub Client);

impl ZkClient {
    /// Creates the node (and its parents) or sets its data.
    pub async fn put(&self, path: &str, data: &str) {
        self.put_mode(path, data, CreateMode::Persistent).await
    }

    /// Creates an ephemeral node (parents persistent).
    pub async fn put_ephemeral(&self, path: &str, data: &str) {
        self.put_mode(path, data, CreateMode::Ephemeral).await
    }

    async fn put_mode(&self, path: &str, data: &str, mode: CreateMode) {
        let parent = &path[..path.rfind('/').expect("absolute path")];
        if !parent.is_empty() {
            match self.0.mkdir(parent, &CreateMode::Persistent.with_acls(Acls::anyone_all())).await {
                Ok(()) | Err(Error::NodeExists) => {}
                Err(e) => panic!("mkdir {parent}: {e}"),
            }
        }
        match self.0.create(path, data.as_bytes(), &mode.with_acls(Acls::anyone_all())).await {
            Ok(_) => {}
            Err(Error::NodeExists) => {
                self.0.set_data(path, data.as_bytes(), None).await.unwrap_or_else(|e| panic!("set {path}: {e}"));
            }
            Err(e) => panic!("create {path}: {e}"),
        }
    }

    pub async fn delete(&self, path: &str) {
        match self.0.delete(path, None).await {
            Ok(()) | Err(Error::NoNode) => {}
            Err(e) => panic!("delete {path}: {e}"),
        }
    }

    pub async fn get(&self, path: &str) -> Option<String> {
        match self.0.get_data(path).await {
            Ok((data, _)) => Some(String::from_utf8_lossy(&data).into_owned()),
            Err(Error::NoNode) => None,
            Err(e) => panic!("get {path}: {e}"),
        }
    }
}

/// Sends a four-letter command and reads the answer.
pub fn four_letter(addr: SocketAddr, cmd: &str) -> Option<String> {
    use std::io::Read;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(cmd.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

fn block_on<F: std::future::Future + Send>(f: F) -> F::Output
where
    F::Output: Send,
{
    // Called from sync contexts or from inside a test's runtime: use a thread of our own.
    std::thread::scope(|s| {
        s.spawn(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(f))
            .join()
            .expect("block_on")
    })
}

/// Installs what the tests need from Debian if it is missing (the README's commands do this too):
/// the zookeeper package, and iproute2 for `ss`, which shows sockets' TCP state.
/// An ensemble on loopback: voting members first, then observers.
pub struct Ensemble {
    pub members: Vec<Zk>,
    /// How many of `members` (the last ones) are observers.
    pub observers: usize,
}

impl Ensemble {
    pub fn start(n: usize) -> Ensemble {
        Ensemble::with_observers(n, 0)
    }

    /// `voters` voting members and `observers` observers, which serve clients but do not vote.
    pub fn with_observers(voters: usize, observers: usize) -> Ensemble {
        super::deps::ensure();
        let n = voters + observers;
        let ports: Vec<(u16, u16, u16)> = (0..n).map(|_| (free_port(), free_port(), free_port())).collect();
        let servers: String = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer, election))| {
                let role = if i >= voters { ":observer" } else { "" };
                format!("server.{}=127.0.0.1:{peer}:{election}{role}\n", i + 1)
            })
            .collect();
        let mut members = Vec::new();
        for (i, (client, _, _)) in ports.iter().enumerate() {
            let dir = tempfile::tempdir().expect("temp dir");
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).expect("data dir");
            std::fs::write(data.join("myid"), format!("{}\n", i + 1)).expect("myid");
            let cfg = format!(
                "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={client}\nclientPortAddress=127.0.0.1\n\
                 admin.enableServer=false\n4lw.commands.whitelist=*\nmaxSessionTimeout=20000\nmaxClientCnxns=0\n{}{servers}",
                data.display(),
                if i >= voters { "peerType=observer\n" } else { "" },
            );
            std::fs::write(dir.path().join("zoo.cfg"), cfg).expect("zoo.cfg");
            let log = dir.path().join("zk.log");
            let mut zk = Zk { port: *client, secure_port: None, dir, running: None, log, main_class: QUORUM_MAIN };
            zk.launch(QUORUM_MAIN);
            members.push(zk);
        }
        let e = Ensemble { members, observers };
        let deadline = Instant::now() + Duration::from_secs(60);
        while e.leader().is_none() {
            assert!(Instant::now() < deadline, "the ensemble elected no leader");
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// `127.0.0.1:p1,127.0.0.1:p2,...`
    pub fn connect_string(&self) -> String {
        self.members.iter().map(|m| m.connect_string()).collect::<Vec<_>>().join(",")
    }

    /// The index of the member that says it leads.
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.running.is_some() && four_letter(m.addr(), "srvr").is_some_and(|s| s.contains("Mode: leader"))
        })
    }

    /// A fresh chroot on the ensemble.
    pub fn chroot(&self) -> Chroot {
        let n = CHROOTS.fetch_add(1, Ordering::Relaxed);
        let path = format!("/t{n}-{}", std::process::id());
        let connect = self.connect_string();
        block_on(async {
            let c = Client::connect(&connect).await.expect("connect");
            c.create(&path, b"", &CreateMode::Persistent.with_acls(Acls::anyone_all())).await.expect("create chroot");
        });
        Chroot { connect: format!("{connect}{path}") }
    }
}
