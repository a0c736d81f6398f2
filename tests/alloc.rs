#![allow(clippy::unwrap_used)]
//! The request path's routing decision allocates nothing: counted with a global allocator.
//!
//! The counts are process-wide, so this binary runs without the libtest harness (`harness =
//! false` in Cargo.toml): the harness's own thread allocates while it reports a finished test,
//! and that landed in a concurrent measurement now and then. Here one thread runs the checks in
//! turn and nothing else runs beside them.

use std::alloc::System;

use http::{HeaderMap, HeaderValue, Method};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use zkroute::proxy::balance::{self, PickInput, Tried};

#[path = "../benches/support/fixture.rs"]
mod fixture;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn main() {
    let checks: [(&str, fn()); 2] = [
        ("matching_and_picking_allocate_nothing", matching_and_picking_allocate_nothing),
        (
            "a_client_address_is_written_and_hashed_without_allocating",
            a_client_address_is_written_and_hashed_without_allocating,
        ),
    ];
    // Enough of libtest's command line for `cargo test -- <filter>` and cargo-nextest (`--list`,
    // then one run per name); other flags are ignored.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            checks.iter().for_each(|(name, _)| println!("{name}: test"));
        }
        return;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    for (name, check) in checks {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        check();
        println!("test {name} ... ok");
    }
}

fn matching_and_picking_allocate_nothing() {
    let mut b = fixture::catalog(1_000, 10, 1_000);
    let (table, _) = b.build();
    let listener = table.listener(0).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("t999"));
    let cases = [("svc-800.internal:8080", "/u"), ("A.B.ZONE801.example", "/u"), ("h", "/api/802/x"), ("h", "/n")];
    // Warm up lazily created state (thread-local RNG).
    let _ = fastrand::u32(..);
    let region = Region::new(GLOBAL);
    let mut picked = 0;
    for _ in 0..1000 {
        for (host, path) in cases {
            let route = listener.route(Some(host), path, &Method::GET, &headers).unwrap();
            let (_, target) = route.target_at(fastrand::u32(..)).unwrap();
            picked += balance::pick(&target.set, PickInput::default(), &Tried::default()).unwrap();
        }
    }
    let stats = region.change();
    assert!(picked > 0);
    assert_eq!(stats.allocations, 0, "{stats:?}");
    assert_eq!(stats.reallocations, 0, "{stats:?}");
}

fn a_client_address_is_written_and_hashed_without_allocating() {
    use zkroute::net::IpText;
    use zkroute::routing::table::hash_bytes;
    let ips: Vec<std::net::IpAddr> = ["10.1.2.3", "255.255.255.255", "fe80::1:2", "2001:db8:85a3::8a2e:370:7334"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let region = Region::new(GLOBAL);
    let mut sum = 0u64;
    for _ in 0..100 {
        for &ip in &ips {
            sum = sum.wrapping_add(hash_bytes(IpText::new(ip).as_bytes()));
        }
    }
    let stats = region.change();
    assert_ne!(sum, 0);
    assert_eq!(stats.allocations, 0, "{stats:?}");
}
