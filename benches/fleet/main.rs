//! The fleet run (not a timed test): N real zkroute sidecars on one ZooKeeper ensemble, on
//! loopback, measured in one run and printed as a table (`docs/OPERATIONS.md` reads it):
//!
//! - a single change: from the write's acknowledgement to the last sidecar's table swap that
//!   includes it (each swap's log line names the zxid it applied);
//! - a deploy wave: every instance node replaced over a few seconds, as a rolling restart does;
//! - an ensemble restart and a leader loss: time until every sidecar (and the median one)
//!   re-added its watches and re-read, stale sidecars after a change that follows, the servers' peak load; and the restart
//!   again with a fleet started without resync jitter;
//! - what each sidecar costs the servers: watches, bytes per full read, requests per change, beside
//!   the peers' approaches (Curator's ServiceCache and Synapse's re-list on change) for the same
//!   changes.
//!
//! `cargo build --release && cargo bench --bench fleet`. Sizes from the environment:
//! `ZKROUTE_FLEET_SIDECARS` (1000), `ZKROUTE_FLEET_SETUPS` (standalone,ensemble,observers),
//! `ZKROUTE_FLEET_CHANGES` (20, after `ZKROUTE_FLEET_WARMUP` unmeasured ones, 20, so that the
//! server's JIT has compiled the path a change takes, as in a long-running server),
//! `ZKROUTE_FLEET_SERVICES` (50), `ZKROUTE_FLEET_INSTANCES` (1000,
//! all replaced by the wave), `ZKROUTE_FLEET_WAVE_SECS` (10), `ZKROUTE_FLEET_PEERS` (20 watchers of
//! each kind; 0 skips them), `ZKROUTE_FLEET_TIMEOUT` (1800 s for the whole run), `ZKROUTE_BIN`, `ZKROUTE_FLEET_JVM` (more
//! options for the servers' JVMs, e.g. `-Dzookeeper.nio.numWorkerThreads=0`);
//! `ZKROUTE_FLEET_ONLY=single` stops each setup after the single changes (and the idle window
//! before them, `ZKROUTE_FLEET_IDLE_SECS`, 5), for comparing a sidecar's CPU per change between
//! builds. `ZKROUTE_FLEET_WATCHER=floor` (with `ZKROUTE_FLEET_ONLY=single`) runs the floor
//! watchers of `floor.rs` in the sidecars' place: the least a watcher that reads each changed
//! node costs, on the same machine.

#![allow(clippy::unwrap_used)]

#[path = "../../tests/support/mod.rs"]
mod support;

mod floor;
mod peers;
mod servers;
mod sidecars;

use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use zookeeper_client::{Acls, Client, CreateMode, Stat};

use servers::{Servers, Setup, client_sockets, cpu_seconds};
use sidecars::{Fleet, Program, Sidecar};
use support::{rss_kib, smaps_kib, status_kib};

/// Every session's timeout: sidecars and peers alike.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The chroot the fleet's tree lives under.
const CHROOT: &str = "/fleet";
/// The node every single change rewrites.
const PROBE: &str = "/zkroute/services/probe/p";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Params {
    sidecars: usize,
    setups: Vec<Setup>,
    changes: usize,
    /// Single changes made and not measured before the measured ones.
    warmup: usize,
    services: usize,
    instances: usize,
    wave: Duration,
    peers: usize,
    /// Only the single changes: the deploy wave, the peers and the restarts are skipped.
    single_only: bool,
    program: Program,
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench --no-run` probes
    }
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, connect] = &args[..]
        && flag == "--floor-watcher"
    {
        floor::run(connect, SESSION_TIMEOUT);
    }
    let setups = std::env::var("ZKROUTE_FLEET_SETUPS").unwrap_or_else(|_| "standalone,ensemble,observers".into());
    let p = Params {
        sidecars: env_usize("ZKROUTE_FLEET_SIDECARS", 1000),
        setups: setups.split(',').map(|s| Setup::parse(s).unwrap_or_else(|| panic!("unknown setup {s}"))).collect(),
        changes: env_usize("ZKROUTE_FLEET_CHANGES", 20).max(2),
        warmup: env_usize("ZKROUTE_FLEET_WARMUP", 20),
        services: env_usize("ZKROUTE_FLEET_SERVICES", 50).max(2),
        instances: env_usize("ZKROUTE_FLEET_INSTANCES", 1000),
        wave: Duration::from_secs(env_usize("ZKROUTE_FLEET_WAVE_SECS", 10) as u64),
        peers: env_usize("ZKROUTE_FLEET_PEERS", 20),
        single_only: std::env::var("ZKROUTE_FLEET_ONLY").is_ok_and(|v| v == "single"),
        program: match std::env::var("ZKROUTE_FLEET_WATCHER").as_deref() {
            Ok("floor") => Program::Floor,
            Ok("zkroute") | Err(_) => Program::Zkroute(
                std::env::var("ZKROUTE_BIN")
                    .unwrap_or_else(|_| format!("{}/target/release/zkroute", env!("CARGO_MANIFEST_DIR"))),
            ),
            Ok(other) => panic!("ZKROUTE_FLEET_WATCHER: {other}: zkroute or floor"),
        },
    };
    match &p.program {
        Program::Zkroute(binary) => {
            assert!(std::path::Path::new(binary).exists(), "build the release binary first: cargo build --release")
        }
        // It follows neither a restart nor the wave's many nodes as a sidecar would.
        Program::Floor => assert!(p.single_only, "ZKROUTE_FLEET_WATCHER=floor needs ZKROUTE_FLEET_ONLY=single"),
    }
    raise_fd_limit();
    // The servers as in production: the full JIT (tests stop at C1 to start fast) and room for
    // thousands of sessions.
    let extra = std::env::var("ZKROUTE_FLEET_JVM").unwrap_or_default();
    let jvm: Vec<&str> = ["-Xmx1g", "-XX:+UseSerialGC"].into_iter().chain(extra.split_whitespace()).collect();
    support::zk::set_jvm_options(&jvm);
    // Bounded in time: past the limit the process exits, and the watchdogs of the sidecars,
    // the servers and the peers' JVMs (each holding a pipe from this process) stop them all.
    let limit = Duration::from_secs(env_usize("ZKROUTE_FLEET_TIMEOUT", 1800) as u64);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("fleet: the run took longer than {limit:?}; stopping");
        std::process::exit(2);
    });
    let classes = tempfile::tempdir().unwrap();
    if p.peers > 0 && !p.single_only {
        peers::ensure_installed();
        peers::compile(classes.path());
    }
    let started = Instant::now();
    let mut columns = Vec::new();
    for (i, setup) in p.setups.iter().enumerate() {
        eprintln!("== {} with {} sidecars", setup.label(), p.sidecars);
        let peers_dir = (i == 0 && p.peers > 0 && !p.single_only).then(|| classes.path());
        columns.push((setup.label(), run_setup(&p, *setup, peers_dir)));
    }
    println!(
        "\n{} sidecars, {} services x {} instances, {} single changes, session timeout {:?}; run took {:.0?}\n",
        p.sidecars,
        p.services,
        p.instances / p.services,
        p.changes,
        SESSION_TIMEOUT,
        started.elapsed()
    );
    print_table(&columns);
}

/// Raises the soft limit on open files to the hard one, for this process and what it starts.
fn raise_fd_limit() {
    let pid = std::process::id().to_string();
    let hard = Command::new("sh").args(["-c", "ulimit -Hn"]).output().ok();
    let hard = hard.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()).unwrap_or_default();
    let _ = Command::new("prlimit").args(["--pid", &pid, &format!("--nofile={hard}:{hard}")]).status();
}

/// Figures of one setup, in print order: (row, value).
type Column = Vec<(String, String)>;

fn print_table(columns: &[(&str, Column)]) {
    let mut rows: Vec<&str> = Vec::new();
    for (_, col) in columns {
        for (row, _) in col {
            if !rows.contains(&row.as_str()) {
                rows.push(row);
            }
        }
    }
    print!("| |");
    for (label, _) in columns {
        print!(" {label} |");
    }
    println!();
    println!("|---|{}", "---|".repeat(columns.len()));
    for row in rows {
        print!("| {row} |");
        for (_, col) in columns {
            let v = col.iter().find(|(r, _)| r == row).map_or("-", |(_, v)| v.as_str());
            print!(" {v} |");
        }
        println!();
    }
}

/// The bench's own ZooKeeper client: writes what a registry and an operator write.
struct Writer {
    rt: tokio::runtime::Runtime,
    /// Replaced by a new session when the old one expires (a thousand sidecars on two cores can
    /// starve this process through a leader election).
    client: std::cell::RefCell<Client>,
    connect: String,
}

impl Writer {
    fn connect(servers: &Servers) -> Writer {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let all = servers.all_connect();
        rt.block_on(async {
            let root = Client::connect(&all).await.expect("connect");
            match root.create(CHROOT, b"", &persistent()).await {
                Ok(_) | Err(zookeeper_client::Error::NodeExists) => {}
                Err(e) => panic!("create {CHROOT}: {e}"),
            }
            root
        });
        let connect = format!("{all}{CHROOT}");
        let client = rt.block_on(Writer::session(&connect));
        Writer { rt, client: std::cell::RefCell::new(client), connect }
    }

    /// A session with the longest timeout the servers allow.
    async fn session(connect: &str) -> Client {
        Client::connector().with_session_timeout(Duration::from_secs(20)).connect(connect).await.expect("connect")
    }

    /// Retries through connection loss (the servers restart under it), for up to 30 s.
    fn retry<T, F>(&self, what: &str, op: impl Fn(Client) -> F) -> T
    where
        F: std::future::Future<Output = Result<T, zookeeper_client::Error>>,
    {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let client = self.client.borrow().clone();
            match self.rt.block_on(op(client)) {
                Ok(v) => return v,
                Err(zookeeper_client::Error::SessionExpired) if Instant::now() < deadline => {
                    eprintln!("the bench's own ZooKeeper session expired: starting another");
                    *self.client.borrow_mut() = self.rt.block_on(Writer::session(&self.connect));
                }
                Err(e) if Instant::now() < deadline && retriable(&e) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }

    fn set(&self, path: &str, data: &[u8]) -> Stat {
        self.retry(path, |c| async move { c.set_data(path, data, None).await })
    }

    fn create(&self, path: &str, data: &[u8]) -> Stat {
        self.retry(path, |c| async move {
            match c.create(path, data, &persistent()).await {
                Ok((stat, _)) => Ok(stat),
                // A retried create that went through the first time.
                Err(zookeeper_client::Error::NodeExists) => c.get_data(path).await.map(|(_, s)| s),
                Err(e) => Err(e),
            }
        })
    }

    fn delete(&self, path: &str) {
        self.retry(path, |c| async move {
            match c.delete(path, None).await {
                Ok(()) | Err(zookeeper_client::Error::NoNode) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// Creates the services and their instances, in multi-write batches.
    fn populate(&self, services: usize, per_service: usize) {
        let c = self.client.borrow().clone();
        self.rt.block_on(async {
            c.mkdir("/zkroute/services", &persistent()).await.unwrap();
            let mut batch = c.new_multi_writer();
            let mut in_batch = 0;
            for s in 0..services {
                batch.add_create(&format!("/zkroute/services/svc-{s}"), b"", &persistent()).unwrap();
                for i in 0..per_service {
                    let doc = instance_doc(s, &format!("i{i}"), i);
                    batch
                        .add_create(&format!("/zkroute/services/svc-{s}/i{i}"), doc.as_bytes(), &persistent())
                        .unwrap();
                }
                in_batch += per_service + 1;
                if in_batch >= 500 {
                    batch.commit().await.unwrap();
                    in_batch = 0;
                }
            }
            batch.add_create("/zkroute/services/probe", b"", &persistent()).unwrap();
            batch.add_create(PROBE, instance_doc(0, "p", 0).as_bytes(), &persistent()).unwrap();
            batch.commit().await.unwrap();
        });
    }
}

fn retriable(e: &zookeeper_client::Error) -> bool {
    use zookeeper_client::Error::*;
    matches!(e, ConnectionLoss | Timeout | SessionMoved | Throttled)
}

fn persistent() -> zookeeper_client::CreateOptions<'static> {
    CreateMode::Persistent.with_acls(Acls::anyone_all())
}

/// A Curator x-discovery instance document, as Curator's ServiceDiscovery writes one.
fn instance_doc(service: usize, id: &str, n: usize) -> String {
    format!(
        r#"{{"name":"svc-{service}","id":"{id}","address":"127.0.0.1","port":{},"sslPort":null,"payload":null,"registrationTimeUTC":1764680000000,"serviceType":"DYNAMIC","uriSpec":null}}"#,
        20000 + n % 40000
    )
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

fn since(later: SystemTime, earlier: SystemTime) -> Duration {
    later.duration_since(earlier).unwrap_or_default()
}

fn percentile<T: Copy + Ord>(sorted: &[T], p: f64) -> T {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn median_u64(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    if v.is_empty() { 0 } else { percentile(&v, 0.5) }
}

fn fleet_cpu(fleet: &Fleet) -> f64 {
    fleet.pids().into_iter().map(cpu_seconds).sum()
}

fn run_setup(p: &Params, setup: Setup, peers_dir: Option<&std::path::Path>) -> Column {
    let mut col = Column::new();
    let mut put = |row: &str, v: String| {
        // As they come, so that a run that fails later keeps what it measured.
        eprintln!("  {row}: {v}");
        col.push((row.to_owned(), v));
    };
    let mut servers = Servers::start(setup);
    let writer = Writer::connect(&servers);
    let per_service = (p.instances / p.services).max(1);
    writer.populate(p.services, per_service);
    let connect = format!("{}{CHROOT}", servers.client_connect());

    let mut fleet = start_fleet(p, &connect, "", &mut put);
    let pids: HashSet<u32> = fleet.pids().into_iter().collect();
    let sockets = client_sockets(&servers.client_ports());
    let full_read = median_u64(sockets.iter().filter(|s| pids.contains(&s.pid)).map(|s| s.bytes_received).collect());
    put("bytes received per full read, per sidecar (KiB)", format!("{:.1}", full_read as f64 / 1024.0));
    put("ZooKeeper watches per sidecar (wchs)", format!("{:.1}", servers.watches() as f64 / p.sidecars as f64));

    idle_cpu(p, &fleet, &mut put);
    single_changes(p, &servers, &writer, &mut fleet, &mut put);
    if p.single_only {
        fleet.stop();
        return col;
    }
    if let Some(dir) = peers_dir {
        compare_peers(p, &servers, &writer, &mut fleet, dir, &mut put);
    }
    deploy_wave(p, &servers, &writer, &mut fleet, per_service, &mut put);
    let rss: Vec<u64> = fleet.pids().into_iter().map(rss_kib).collect();
    put(
        "sidecar RSS after the wave, median / max (MB)",
        format!(
            "{:.1} / {:.1}",
            median_u64(rss.clone()) as f64 / 1024.0,
            rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0
        ),
    );

    resync("ensemble restart", Fault::Restart, &mut servers, &writer, &mut fleet, &mut put);
    if setup != Setup::Standalone {
        resync("leader loss", Fault::LeaderLoss, &mut servers, &writer, &mut fleet, &mut put);
    }
    fleet.stop();
    eprintln!("restarting the fleet with resync_jitter = \"0s\"");
    let mut fleet = start_fleet(p, &connect, "resync_jitter = \"0s\"", &mut |_, _| {});
    resync("ensemble restart, no resync jitter", Fault::Restart, &mut servers, &writer, &mut fleet, &mut put);
    fleet.stop();
    col
}

fn start_fleet(p: &Params, connect: &str, extra: &str, put: &mut impl FnMut(&str, String)) -> Fleet {
    let started = Instant::now();
    let mut fleet = Fleet::start(&p.program, p.sidecars, connect, extra);
    let missing = fleet.wait_all(Duration::from_secs(120 + p.sidecars as u64 / 10), |s| {
        !s.full_reads.is_empty() && !s.swaps.is_empty()
    });
    assert_eq!(missing, 0, "{missing} sidecars never read ZooKeeper");
    put("fleet started, every sidecar's first table (s)", secs(started.elapsed()));
    let pids = fleet.pids();
    let mb = |field| median_u64(pids.iter().map(|&p| status_kib(p, field)).collect()) as f64 / 1024.0;
    put("sidecar RSS after start, median (MB)", format!("{:.1}", mb("VmRSS")));
    // What each sidecar holds alone; the rest is code, shared by every sidecar on a host.
    put("of it private (RssAnon), median (MB)", format!("{:.1}", mb("RssAnon")));
    // The binary's pages split among the fleet: what each sidecar costs the host.
    let pss = median_u64(pids.iter().map(|&p| smaps_kib(p, "Pss")).collect()) as f64 / 1024.0;
    put("proportional (Pss, shared pages split among the fleet), median (MB)", format!("{pss:.1}"));
    fleet
}

/// Waits until every sidecar applied `zxid`; the time from `ack` to each one's swap.
fn propagation(fleet: &mut Fleet, zxid: i64, ack: SystemTime, within: Duration) -> (Vec<Duration>, usize) {
    let stale = fleet.wait_all(within, |s| s.applied(zxid).is_some());
    let mut lat: Vec<Duration> = fleet.sidecars.iter().filter_map(|s| s.applied(zxid)).map(|t| since(t, ack)).collect();
    lat.sort_unstable();
    (lat, stale)
}

/// The fleet's CPU while nothing changes (timers, pings, polled files), from the fleet's start
/// on: part of every figure per change.
fn idle_cpu(p: &Params, fleet: &Fleet, put: &mut impl FnMut(&str, String)) {
    let window = Duration::from_secs(env_usize("ZKROUTE_FLEET_IDLE_SECS", 5).max(1) as u64);
    let cpu0 = fleet_cpu(fleet);
    std::thread::sleep(window);
    let cpu1 = fleet_cpu(fleet);
    put(
        "idle: CPU per sidecar (us per s)",
        format!("{:.0}", (cpu1 - cpu0) / window.as_secs_f64() / p.sidecars as f64 * 1e6),
    );
}

fn single_changes(
    p: &Params,
    servers: &Servers,
    writer: &Writer,
    fleet: &mut Fleet,
    put: &mut impl FnMut(&str, String),
) {
    eprintln!("{} single changes after {} unmeasured", p.changes, p.warmup);
    for k in 0..p.warmup {
        let stat = writer.set(PROBE, instance_doc(0, "p", 1000 + k).as_bytes());
        propagation(fleet, stat.mzxid, SystemTime::now(), Duration::from_secs(30));
    }
    let (mut last, mut median) = (Vec::new(), Vec::new());
    let mut stale_total = 0;
    let (fleet_cpu0, zk_cpu0, jit0) = (fleet_cpu(fleet), servers.cpu_seconds(), servers.jit_cpu_seconds());
    for k in 0..p.changes {
        let stat = writer.set(PROBE, instance_doc(0, "p", 2 + k).as_bytes());
        let ack = SystemTime::now();
        let (lat, stale) = propagation(fleet, stat.mzxid, ack, Duration::from_secs(30));
        stale_total += stale;
        if let (Some(l), false) = (lat.last(), lat.is_empty()) {
            last.push(*l);
            median.push(percentile(&lat, 0.5));
        }
    }
    let (fleet_cpu1, zk_cpu1, jit1) = (fleet_cpu(fleet), servers.cpu_seconds(), servers.jit_cpu_seconds());
    last.sort_unstable();
    median.sort_unstable();
    put(
        "single change: ack to last sidecar's swap, p50 / p99 / max (ms)",
        format!("{} / {} / {}", ms(percentile(&last, 0.5)), ms(percentile(&last, 0.99)), ms(last[last.len() - 1])),
    );
    put("single change: ack to median sidecar's swap, p50 (ms)", ms(percentile(&median, 0.5)));
    put("single change: sidecars stale after 30 s", stale_total.to_string());
    let changes = p.changes as f64;
    put(
        "single change: CPU per sidecar (us)",
        format!("{:.0}", (fleet_cpu1 - fleet_cpu0) / changes / p.sidecars as f64 * 1e6),
    );
    put("single change: ensemble CPU (ms)", format!("{:.1}", (zk_cpu1 - zk_cpu0) / changes * 1e3));
    put("single change: of it, the JIT compiling (ms)", format!("{:.1}", (jit1 - jit0) / changes * 1e3));
}

fn deploy_wave(
    p: &Params,
    servers: &Servers,
    writer: &Writer,
    fleet: &mut Fleet,
    per_service: usize,
    put: &mut impl FnMut(&str, String),
) {
    let nodes: Vec<(usize, usize)> = (0..p.services).flat_map(|s| (0..per_service).map(move |i| (s, i))).collect();
    eprintln!("deploy wave: {} instance nodes replaced over {:?}", nodes.len(), p.wave);
    let step = p.wave / nodes.len().max(1) as u32;
    let (t0, i0) = (SystemTime::now(), Instant::now());
    let (zk_cpu0, packets0, fleet_cpu0) = (servers.cpu_seconds(), servers.packets_received(), fleet_cpu(fleet));
    // Paced, not waiting for one replacement before the next: a registry's writes come from
    // many instances at once. The client keeps them in order. The registry runs elsewhere in
    // production: here it is given a higher priority than the sidecars, or a thousand of them
    // on two cores starve it and the wave runs slower than asked.
    let boost = Boost::raise();
    let creates: Vec<(SystemTime, i64)> = writer.rt.block_on(async {
        let mut tick = tokio::time::interval(step.max(Duration::from_millis(1)));
        let mut replaced = Vec::with_capacity(nodes.len());
        for (n, (s, i)) in nodes.iter().enumerate() {
            tick.tick().await;
            let c = writer.client.borrow().clone();
            let (old, id) = (format!("/zkroute/services/svc-{s}/i{i}"), format!("i{i}-b"));
            let (new, doc) = (format!("/zkroute/services/svc-{s}/{id}"), instance_doc(*s, &id, n));
            replaced.push(tokio::spawn(async move {
                let deleted = c.delete(&old, None);
                let created = c.create(&new, doc.as_bytes(), &persistent());
                deleted.await.expect("delete");
                let (stat, _) = created.await.expect("create");
                (SystemTime::now(), stat.mzxid)
            }));
        }
        let mut out = Vec::with_capacity(replaced.len());
        for r in replaced {
            out.push(r.await.expect("replacement"));
        }
        out
    });
    drop(boost);
    let (writes, writes_done) = (i0.elapsed(), SystemTime::now());
    let (last_ack, last) = creates.last().copied().unwrap_or((writes_done, 0));
    // Past 60 s a sidecar counts as stale, but the wait goes on: a fleet that is only behind (a
    // machine short of CPU) catches up, one that lost an event does not.
    let lost = fleet.wait_all(WAVE_CATCH_UP, |s| s.applied(last).is_some());
    let (t1, duration) = (SystemTime::now(), i0.elapsed());
    let applied: Vec<Option<SystemTime>> = fleet.sidecars.iter().map(|s| s.applied(last)).collect();
    let stale = applied.iter().filter(|a| a.is_none_or(|t| since(t, writes_done) > Duration::from_secs(60))).count();
    let (zk_cpu1, packets1, fleet_cpu1) = (servers.cpu_seconds(), servers.packets_received(), fleet_cpu(fleet));
    let mut lat = Vec::with_capacity(creates.len() * fleet.len());
    for s in &fleet.sidecars {
        lat.extend(applied_after(s, &creates));
    }
    lat.sort_unstable();
    let mut swaps: Vec<u64> = fleet.sidecars.iter().map(|s| s.swaps_between(t0, t1) as u64).collect();
    swaps.sort_unstable();
    put("wave: writes took (s)", secs(writes));
    put(
        "wave: swaps per sidecar, median / max",
        format!("{} / {}", percentile(&swaps, 0.5), swaps.last().copied().unwrap_or(0)),
    );
    put(
        "wave: create ack to each sidecar's swap, p50 / p99 / max (ms)",
        format!("{} / {} / {}", ms(percentile(&lat, 0.5)), ms(percentile(&lat, 0.99)), ms(lat[lat.len() - 1])),
    );
    put("wave: sidecars stale after 60 s", stale.to_string());
    put(
        "wave: the last write reached every sidecar after (s)",
        match applied.iter().copied().collect::<Option<Vec<_>>>() {
            Some(all) => secs(all.into_iter().map(|t| since(t, last_ack)).max().unwrap_or_default()),
            None => format!("never: {lost} sidecars without it after {}", secs(WAVE_CATCH_UP)),
        },
    );
    let d = duration.as_secs_f64();
    put("wave: ensemble CPU (cores)", format!("{:.2}", (zk_cpu1 - zk_cpu0) / d));
    put("wave: ensemble packets received per s", format!("{:.0}", packets1.saturating_sub(packets0) as f64 / d));
    put("wave: fleet CPU (cores)", format!("{:.2}", (fleet_cpu1 - fleet_cpu0) / d));
}

/// How long the wave's last write may take to reach every sidecar before those without it count
/// as having lost it.
const WAVE_CATCH_UP: Duration = Duration::from_secs(300);

/// This process's threads at a higher scheduling priority (nice -10) until dropped; a no-op
/// where the priority cannot be raised.
struct Boost;

impl Boost {
    fn raise() -> Boost {
        Boost::renice("-10");
        Boost
    }

    fn renice(nice: &str) {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
        let tids: Vec<String> = tasks.filter_map(|t| Some(t.ok()?.file_name().to_str()?.to_owned())).collect();
        let _ =
            Command::new("renice").args(["-n", nice, "-p"]).args(&tids).stdout(std::process::Stdio::null()).status();
    }
}

impl Drop for Boost {
    fn drop(&mut self) {
        Boost::renice("0");
    }
}

/// For each create (ack time, zxid) in order, the time from its ack to the sidecar's first swap
/// at or past its zxid.
fn applied_after(s: &Sidecar, creates: &[(SystemTime, i64)]) -> Vec<Duration> {
    let mut out = Vec::with_capacity(creates.len());
    let (mut j, mut high) = (0, i64::MIN);
    for (ack, zxid) in creates {
        while high < *zxid && j < s.swaps.len() {
            high = high.max(s.swaps[j].zxid.unwrap_or(i64::MIN));
            j += 1;
        }
        if high >= *zxid {
            out.push(since(s.swaps[j - 1].at, *ack));
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Every member killed (SIGKILL) and started again; sessions survive in the servers' logs.
    Restart,
    /// The leader killed; the others elect a new one, and it is started again afterwards.
    LeaderLoss,
}

fn resync(
    name: &str,
    fault: Fault,
    servers: &mut Servers,
    writer: &Writer,
    fleet: &mut Fleet,
    put: &mut impl FnMut(&str, String),
) {
    eprintln!("{name}");
    let rate = servers::PacketRate::start(servers);
    let t0 = SystemTime::now();
    let killed = match fault {
        Fault::Restart => {
            for m in &mut servers.members {
                m.kill();
            }
            for m in &mut servers.members {
                m.restart();
            }
            None
        }
        Fault::LeaderLoss => {
            let leader = servers.leader().expect("a leader");
            servers.members[leader].kill();
            Some(leader)
        }
    };
    let serving = SystemTime::now();
    // Restarted servers are new processes, whose CPU counts from their start; after a leader
    // loss, the survivors' from now.
    let cpu_before = if fault == Fault::Restart { 0.0 } else { servers.cpu_seconds() };
    let deadline = Instant::now() + SESSION_TIMEOUT * 4;
    let mut missing = fleet.len();
    while Instant::now() < deadline {
        fleet.poll();
        missing = fleet.sidecars.iter().filter(|s| s.full_read_since(t0).is_none()).count();
        if missing == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut reads: Vec<SystemTime> = fleet.sidecars.iter().filter_map(|s| s.full_read_since(t0)).collect();
    reads.sort_unstable();
    let done = reads.last().copied().unwrap_or(t0);
    // The median beside the last: a few sidecars whose first connection went unanswered wait
    // out the client's connection timeout (docs/OPERATIONS.md, "Session timeouts").
    let median = reads.get(reads.len() / 2).copied().unwrap_or(t0);
    let cpu = servers.cpu_seconds() - cpu_before;
    let peak_packets = rate.stop();
    let stat = writer.set(PROBE, instance_doc(0, "p", 1).as_bytes());
    let ack = SystemTime::now();
    let (lat, stale) = propagation(fleet, stat.mzxid, ack, Duration::from_secs(30));
    if let Some(i) = killed {
        servers.members[i].restart();
        servers.wait_serving(Duration::from_secs(60));
    }
    let from = if fault == Fault::Restart { " from kill / from servers up" } else { "" };
    let value = if fault == Fault::Restart {
        format!("{} / {}", secs(since(done, t0)), secs(since(done, serving)))
    } else {
        secs(since(done, t0))
    };
    put(&format!("{name}: every sidecar re-read (s){from}"), value);
    put(&format!("{name}: the median sidecar re-read (s){from}"), {
        if fault == Fault::Restart {
            format!("{} / {}", secs(since(median, t0)), secs(since(median, serving)))
        } else {
            secs(since(median, t0))
        }
    });
    put(&format!("{name}: sidecars not resynced after {:?}", SESSION_TIMEOUT * 4), missing.to_string());
    put(
        &format!("{name}: then a change, last sidecar (ms) / stale after 30 s"),
        format!("{} / {stale}", lat.last().map_or("-".into(), |l| ms(*l))),
    );
    let what = if fault == Fault::Restart { "CPU-s (with the servers' start)" } else { "CPU-s" };
    put(
        &format!("{name}: peak packets per s (100 ms windows) / ensemble {what} until all re-read"),
        format!("{peak_packets:.0} / {cpu:.2}"),
    );
}

/// Requests and bytes per change per watcher: the fleet and each peer kind, from the servers'
/// per-connection counts (`cons`) and the client sockets' byte counts (`ss`), less what the
/// same connections did while idle for as long (pings).
fn compare_peers(
    p: &Params,
    servers: &Servers,
    writer: &Writer,
    fleet: &mut Fleet,
    classes: &std::path::Path,
    put: &mut impl FnMut(&str, String),
) {
    eprintln!("peers: {} Curator ServiceCache and {} re-list watchers", p.peers, p.peers);
    let connect = format!("{}{CHROOT}", servers.client_connect());
    let mut watches = vec![servers.watches()];
    let kinds = ["curator", "relist"].map(|kind| {
        let jvm = peers::PeerJvm::start(classes, kind, p.peers, &connect, "/zkroute/services");
        watches.push(servers.watches());
        jvm
    });
    let fleet_pids: HashSet<u32> = fleet.pids().into_iter().collect();
    let owners: Vec<(String, HashSet<u32>, usize)> = std::iter::once(("zkroute".to_owned(), fleet_pids, fleet.len()))
        .chain(kinds.iter().map(|k| (k.kind.to_owned(), HashSet::from([k.pid()]), k.count)))
        .collect();
    let ports = servers.client_ports();
    let snapshot = || -> Vec<(u64, u64)> {
        let packets = servers.packets_by_client_port();
        let sockets = client_sockets(&ports);
        owners
            .iter()
            .map(|(_, pids, _)| {
                let mine: Vec<_> = sockets.iter().filter(|s| pids.contains(&s.pid)).collect();
                let requests = mine.iter().filter_map(|s| packets.get(&s.local_port)).sum();
                (requests, mine.iter().map(|s| s.bytes_received).sum())
            })
            .collect()
    };
    let start = snapshot();
    let idle = Duration::from_secs(3);
    std::thread::sleep(idle);
    let before = snapshot();
    let t = Instant::now();
    let base = (p.instances / p.services).max(1) * p.services + 1; // and the probe
    let half = p.changes / 2;
    let since_start = SystemTime::now();
    for k in 0..half * 2 {
        let (instances, zxid) = if k < half {
            let stat =
                writer.create(&format!("/zkroute/services/svc-1/peer-{k}"), instance_doc(1, "peer", k).as_bytes());
            (base + k + 1, Some(stat.mzxid))
        } else {
            writer.delete(&format!("/zkroute/services/svc-1/peer-{}", k - half));
            (base + 2 * half - k - 1, None)
        };
        let removals = (k + 1).saturating_sub(half);
        let stale = fleet.wait_all(Duration::from_secs(30), |s| match zxid {
            Some(z) => s.applied(z).is_some(),
            None => s.swaps.iter().filter(|w| w.at >= since_start && w.removed > 0).count() >= removals,
        });
        let peers_stale: usize = kinds.iter().map(|j| j.wait_all(instances as u64, Duration::from_secs(30))).sum();
        assert_eq!((stale, peers_stale), (0, 0), "change {k} did not reach every watcher");
    }
    let window = t.elapsed();
    let after = snapshot();
    let changes = (half * 2) as f64;
    for (i, (kind, _, count)) in owners.iter().enumerate() {
        let scale = window.as_secs_f64() / idle.as_secs_f64();
        let per = |now: u64, then: u64, idle_now: u64, idle_then: u64| {
            let idle = idle_now.saturating_sub(idle_then) as f64 * scale;
            (now.saturating_sub(then) as f64 - idle).max(0.0) / changes / *count as f64
        };
        let requests = per(after[i].0, before[i].0, before[i].0, start[i].0);
        let bytes = per(after[i].1, before[i].1, before[i].1, start[i].1);
        put(
            &format!("per change per watcher, {kind}: requests / bytes received"),
            format!("{requests:.1} / {bytes:.0}"),
        );
        let idle_rate = before[i].0.saturating_sub(start[i].0) as f64 / idle.as_secs_f64() / *count as f64;
        put(&format!("idle, per watcher, {kind}: packets per s (pings)"), format!("{idle_rate:.2}"));
        if i > 0 {
            let added = watches[i].saturating_sub(watches[i - 1]) as f64 / *count as f64;
            put(&format!("ZooKeeper watches per watcher, {kind}"), format!("{added:.1}"));
            // The fleet's own is measured right after its start.
            put(
                &format!("full read per watcher, {kind}: bytes received (KiB)"),
                format!("{:.1}", start[i].1 as f64 / *count as f64 / 1024.0),
            );
        }
    }
    drop(kinds);
}
