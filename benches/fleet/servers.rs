//! The ZooKeeper side: a standalone server, a three-node ensemble, or one with observers that the
//! sidecars are pointed at; and what the servers say about their load (CPU from /proc, packets
//! from `mntr`, watches from `wchs`, per-connection requests from `cons`, per-socket bytes from
//! `ss`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::support::zk::four_letter;
use crate::support::{Ensemble, Zk};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    Standalone,
    Ensemble,
    /// Three voters, two observers; the sidecars connect to the observers only.
    Observers,
}

impl Setup {
    pub fn parse(s: &str) -> Option<Setup> {
        match s.trim() {
            "standalone" => Some(Setup::Standalone),
            "ensemble" => Some(Setup::Ensemble),
            "observers" => Some(Setup::Observers),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Setup::Standalone => "standalone",
            Setup::Ensemble => "3 voters",
            Setup::Observers => "3 voters + 2 observers",
        }
    }
}

pub struct Servers {
    pub members: Vec<Zk>,
    /// Members that are observers (the last ones).
    observers: usize,
}

impl Servers {
    pub fn start(setup: Setup) -> Servers {
        let (members, observers) = match setup {
            Setup::Standalone => (vec![Zk::start()], 0),
            Setup::Ensemble => (Ensemble::start(3).members, 0),
            Setup::Observers => {
                let e = Ensemble::with_observers(3, 2);
                (e.members, e.observers)
            }
        };
        let s = Servers { members, observers };
        s.wait_serving(Duration::from_secs(60));
        s
    }

    /// What the sidecars connect to: every member, or the observers only.
    pub fn client_connect(&self) -> String {
        let from = if self.observers > 0 { self.members.len() - self.observers } else { 0 };
        self.members[from..].iter().map(Zk::connect_string).collect::<Vec<_>>().join(",")
    }

    /// Every member, for the bench's own writes.
    pub fn all_connect(&self) -> String {
        self.members.iter().map(Zk::connect_string).collect::<Vec<_>>().join(",")
    }

    pub fn client_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.port).collect()
    }

    /// Until every member says it leads, follows, observes or stands alone.
    pub fn wait_serving(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for m in &self.members {
            loop {
                let mode = four_letter(m.addr(), "srvr").unwrap_or_default();
                if ["leader", "follower", "observer", "standalone"].iter().any(|r| mode.contains(&format!("Mode: {r}")))
                {
                    break;
                }
                assert!(Instant::now() < deadline, "ZooKeeper on {} is not serving: {mode}", m.port);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.pid().is_some() && four_letter(m.addr(), "srvr").is_some_and(|s| s.contains("Mode: leader"))
        })
    }

    /// CPU seconds used by the server processes so far.
    pub fn cpu_seconds(&self) -> f64 {
        self.members.iter().filter_map(Zk::pid).map(cpu_seconds).sum()
    }

    /// CPU seconds the servers' JIT compiler threads used so far: a server still compiling its
    /// hot paths is not the long-running server of production.
    pub fn jit_cpu_seconds(&self) -> f64 {
        let jit = |comm: &str| comm.starts_with("C1 Compiler") || comm.starts_with("C2 Compiler");
        self.members.iter().filter_map(Zk::pid).map(|pid| thread_cpu_seconds(pid, jit)).sum()
    }

    /// Packets received by all members so far (requests and pings); a restarted member counts
    /// from zero.
    pub fn packets_received(&self) -> u64 {
        self.members.iter().filter_map(|m| mntr(m.addr(), "zk_packets_received")).sum()
    }

    /// Watches on all members (`wchs`).
    pub fn watches(&self) -> u64 {
        self.members
            .iter()
            .filter_map(|m| four_letter(m.addr(), "wchs"))
            .filter_map(|s| s.lines().find_map(|l| l.strip_prefix("Total watches:")?.trim().parse::<u64>().ok()))
            .sum()
    }

    /// Packets received per client connection, by the client's port (`cons` on every member).
    pub fn packets_by_client_port(&self) -> HashMap<u16, u64> {
        let mut out = HashMap::new();
        for m in &self.members {
            let Some(text) = four_letter(m.addr(), "cons") else { continue };
            for line in text.lines() {
                let Some(port) = line.trim().strip_prefix("/127.0.0.1:").and_then(|r| r.split('[').next()) else {
                    continue;
                };
                let recved = line.split("recved=").nth(1).and_then(|r| r.split(',').next());
                if let (Ok(port), Some(Ok(n))) = (port.parse::<u16>(), recved.map(str::parse::<u64>)) {
                    out.insert(port, n);
                }
            }
        }
        out
    }
}

/// Packets the servers receive per second, in windows of 100 ms, polled from a thread of its own
/// (so that it keeps counting while the bench waits for servers to start).
pub struct PacketRate {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<f64>,
}

impl PacketRate {
    pub fn start(servers: &Servers) -> PacketRate {
        let addrs: Vec<SocketAddr> = servers.members.iter().map(Zk::addr).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let mut last: Vec<u64> = addrs.iter().map(|a| mntr(*a, "zk_packets_received").unwrap_or(0)).collect();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut at) = (0f64, Instant::now());
            while !stopped.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                let mut packets = 0;
                for (addr, last) in addrs.iter().zip(&mut last) {
                    // A server that is down, or was restarted, counts from zero again.
                    let now = mntr(*addr, "zk_packets_received").unwrap_or(0);
                    packets += if now >= *last { now - *last } else { now };
                    *last = now;
                }
                peak = peak.max(packets as f64 / at.elapsed().as_secs_f64());
                at = Instant::now();
            }
            peak
        });
        PacketRate { stop, thread }
    }

    /// The highest rate seen.
    pub fn stop(self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0.0)
    }
}

/// One client socket to ZooKeeper, as `ss` sees it.
#[derive(Clone, Copy, Debug)]
pub struct ClientSocket {
    pub local_port: u16,
    pub pid: u32,
    /// Bytes the client received from the server.
    pub bytes_received: u64,
}

/// Established client sockets to any of `server_ports`, with their owning process.
pub fn client_sockets(server_ports: &[u16]) -> Vec<ClientSocket> {
    let out = Command::new("ss").args(["-tinpH", "state", "established"]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sockets = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let info = match lines.peek() {
            Some(next) if next.starts_with(char::is_whitespace) => lines.next().unwrap_or_default(),
            _ => "",
        };
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Recv-Q Send-Q Local Peer Process
        let (Some(local), Some(peer)) = (fields.get(2), fields.get(3)) else { continue };
        let port = |a: &str| a.rsplit(':').next().and_then(|p| p.parse::<u16>().ok());
        let (Some(local_port), Some(peer_port)) = (port(local), port(peer)) else { continue };
        if !server_ports.contains(&peer_port) {
            continue;
        }
        let Some(pid) = line.split("pid=").nth(1).and_then(|r| r.split(',').next()).and_then(|p| p.parse().ok()) else {
            continue;
        };
        let bytes_received = info
            .split_whitespace()
            .find_map(|f| f.strip_prefix("bytes_received:"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        sockets.push(ClientSocket { local_port, pid, bytes_received });
    }
    sockets
}

fn mntr(addr: SocketAddr, key: &str) -> Option<u64> {
    let text = four_letter(addr, "mntr")?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('\t')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// CPU seconds a process's threads have run so far (the scheduler's own count, in nanoseconds:
/// the ticks of /proc/PID/stat are too coarse for a sidecar's share of one change); 0 once it is
/// gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    thread_cpu_seconds(pid, |_| true)
}

/// As [`cpu_seconds`], for the threads whose name (`comm`) `which` accepts.
pub fn thread_cpu_seconds(pid: u32, which: impl Fn(&str) -> bool) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0.0 };
    let ns: u64 = tasks
        .filter_map(Result::ok)
        .filter(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| which(c.trim_end())))
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 / 1e9
}
