#![allow(clippy::unwrap_used)]
//! The request path's routing decision allocates nothing: counted with a global allocator.

use std::alloc::System;

use http::{HeaderMap, HeaderValue, Method};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use zkroute::proxy::balance::{self, PickInput, Tried};

#[path = "../benches/support/fixture.rs"]
mod fixture;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The allocator's counts are process-wide: one test at a time, so no other test's allocations
/// are counted.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn matching_and_picking_allocate_nothing() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

#[test]
fn a_client_address_is_written_and_hashed_without_allocating() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    use zkroute::proxy::http::codec::IpText;
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
