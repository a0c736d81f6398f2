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

#[test]
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
