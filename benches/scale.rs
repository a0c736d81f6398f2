//! The scale run (not a timed test): a real ZooKeeper holding 10,000 services of 10 instances
//! each, and the release `zkroute` binary following it. Prints the time to the first full table,
//! the RSS after it, and the propagation of 200 single changes (ZooKeeper write returned to the
//! first request routed by the new table), with zkroute's own event-to-swap histogram.
//!
//! `cargo build --release && cargo bench --bench scale` (ZKROUTE_SCALE_SERVICES and
//! ZKROUTE_SCALE_INSTANCES change the size.)

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use zookeeper_client::{Acls, CreateMode};

#[path = "../tests/support/mod.rs"]
mod support;

use support::*;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench --no-run` probes
    }
    let services = env_usize("ZKROUTE_SCALE_SERVICES", 10_000);
    let per_service = env_usize("ZKROUTE_SCALE_INSTANCES", 10);
    let binary = std::env::var("ZKROUTE_BIN")
        .unwrap_or_else(|_| format!("{}/target/release/zkroute", env!("CARGO_MANIFEST_DIR")));
    assert!(std::path::Path::new(&binary).exists(), "build the release binary first: cargo build --release");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(services, per_service, &binary));
}

async fn run(services: usize, per_service: usize, binary: &str) {
    let zk = Zk::start();
    let chroot = zk.chroot();
    let client = chroot.client().await;
    let acl = CreateMode::Persistent.with_acls(Acls::anyone_all());

    // Populate in multi-write batches.
    let started = Instant::now();
    client.0.mkdir("/zkroute/services", &acl).await.unwrap();
    let mut batch = client.0.new_multi_writer();
    let mut in_batch = 0;
    for s in 0..services {
        batch.add_create(&format!("/zkroute/services/svc-{s}"), b"", &acl).unwrap();
        for i in 0..per_service {
            let doc = format!(
                r#"{{"name":"svc-{s}","id":"i{i}","address":"10.{}.{}.{}","port":{},"payload":{{"metadata":{{"v":"{}"}}}},"serviceType":"DYNAMIC"}}"#,
                s / 250 % 250,
                s % 250,
                i % 250,
                8000 + i,
                i % 2
            );
            batch.add_create(&format!("/zkroute/services/svc-{s}/i{i}"), doc.as_bytes(), &acl).unwrap();
        }
        in_batch += per_service + 1;
        if in_batch >= 1000 {
            batch.commit().await.unwrap();
            in_batch = 0;
        }
    }
    batch.commit().await.unwrap();
    let a = Backend::http("a").await;
    let b = Backend::http("b").await;
    client.put("/zkroute/services/probe/p", &a.addr.to_string()).await;
    client.put("/zkroute/rules/probe", r#"{"listener":"http","backends":[{"service":"probe"}]}"#).await;
    let nodes = services * (per_service + 1);
    println!("populated {services} services x {per_service} instances ({nodes} nodes) in {:?}", started.elapsed());

    // Start zkroute and time the first full table.
    let (admin, http) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("zkroute.toml");
    std::fs::write(
        &config,
        format!(
            "[zookeeper]\nconnect = \"{}\"\nsession_timeout = \"10s\"\n[admin]\nbind = \"127.0.0.1:{admin}\"\n[proxy]\nworkers = 1\n\
             [[listener]]\nname = \"http\"\nbind = \"127.0.0.1:{http}\"\n",
            chroot.connect
        ),
    )
    .unwrap();
    let started = Instant::now();
    let mut child = Command::new(binary)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
    let http_addr = std::net::SocketAddr::from(([127, 0, 0, 1], http));
    eventually("the first table", Duration::from_secs(120), || async {
        (get(admin_addr, "/ready").await.ok()?.status() == 200).then_some(())
    })
    .await;
    let first_table = started.elapsed();
    let metrics = String::from_utf8_lossy(get(admin_addr, "/metrics").await.unwrap().body()).into_owned();
    let build = metric_value(&metrics, "zkroute_table_build_duration_seconds_sum").unwrap_or(0.0);
    println!(
        "first full table: {first_table:?} from process start (table build {:.1} ms); RSS {} MiB",
        build * 1e3,
        rss_kib(child.id()) / 1024
    );

    // 200 single changes: the probe instance moves between two backends.
    let mut samples = Vec::with_capacity(200);
    let mut client_conn = KeepAlive::connect(http_addr).await;
    for n in 0..200 {
        let (to, name) = if n % 2 == 0 { (&b, "b") } else { (&a, "a") };
        client.0.set_data("/zkroute/services/probe/p", to.addr.to_string().as_bytes(), None).await.unwrap();
        let written = Instant::now();
        loop {
            let r = client_conn.send(request("GET", "h", "/", &[], "")).await.unwrap();
            if who(&r) == name {
                break;
            }
            assert!(written.elapsed() < Duration::from_secs(10), "change {n} never arrived");
        }
        samples.push(written.elapsed());
    }
    samples.sort();
    let metrics = String::from_utf8_lossy(get(admin_addr, "/metrics").await.unwrap().body()).into_owned();
    let count = metric_value(&metrics, "zkroute_discovery_propagation_seconds_count").unwrap_or(0.0);
    let sum = metric_value(&metrics, "zkroute_discovery_propagation_seconds_sum").unwrap_or(0.0);
    let builds = metric_value(&metrics, "zkroute_table_build_duration_seconds_count").unwrap_or(0.0);
    let build_sum = metric_value(&metrics, "zkroute_table_build_duration_seconds_sum").unwrap_or(0.0);
    println!(
        "propagation of 200 single changes, write returned -> request routed by the new table: p50 {:?} p99 {:?} max {:?}",
        percentile(&samples, 0.5),
        percentile(&samples, 0.99),
        samples[samples.len() - 1]
    );
    println!(
        "zkroute's own view: event -> swap mean {:.2} ms over {count} swaps; table build mean {:.2} ms over {builds} builds",
        sum / count.max(1.0) * 1e3,
        (build_sum - build) / (builds - 1.0).max(1.0) * 1e3
    );
    println!("RSS after the changes: {} MiB", rss_kib(child.id()) / 1024);
    let _ = child.kill();
    let _ = child.wait();
}
