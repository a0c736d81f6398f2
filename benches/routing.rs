#![allow(clippy::unwrap_used)]
//! The routing decisions on the request path, and table builds on the control path.
//!
//! `cargo bench --bench routing`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use zkroute::discovery::instance_change;
use zkroute::proxy::balance::{self, PickInput, Tried};
use zkroute::routing::ServiceName;

#[path = "support/fixture.rs"]
mod fixture;

fn match_and_pick(c: &mut Criterion) {
    let mut b = fixture::catalog(1_000, 10, 1_000);
    let (table, _) = b.build();
    let listener = table.listener(0).unwrap();
    let mut headers = HeaderMap::new();
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    headers.insert("x-tenant", HeaderValue::from_static("t999"));
    let decide = |host: &str, path: &str| {
        let route = listener.route(Some(host), path, &Method::GET, &headers).unwrap();
        let (_, target) = route.target_at(fastrand::u32(..)).unwrap();
        balance::pick(&target.set, PickInput::default(), &Tried::default()).unwrap()
    };
    c.bench_function("match+pick exact host (1k rules, 10k instances)", |bench| {
        bench.iter(|| decide(black_box("svc-800.internal:8080"), black_box("/users")))
    });
    c.bench_function("match+pick wildcard host", |bench| {
        bench.iter(|| decide(black_box("a.b.zone801.example"), black_box("/users")))
    });
    c.bench_function("match+pick path prefix", |bench| {
        bench.iter(|| decide(black_box("unknown.host"), black_box("/api/802/users")))
    });
    c.bench_function("match+pick header value", |bench| {
        bench.iter(|| decide(black_box("unknown.host"), black_box("/nothing")))
    });
}

fn builds(c: &mut Criterion) {
    let mut group = c.benchmark_group("table build");
    group.sample_size(10);
    group.bench_function("full build, 10k services x 10 instances", |bench| {
        bench.iter_batched(|| fixture::catalog(10_000, 10, 1_000), |mut b| b.build(), criterion::BatchSize::LargeInput)
    });
    let mut b = fixture::catalog(10_000, 10, 1_000);
    let _ = b.build();
    let mut n = 0u32;
    group.bench_function("one instance change applied, 10k services x 10 instances", |bench| {
        bench.iter(|| {
            n += 1;
            let data = format!("10.200.0.{}:{}", n % 250, 9000 + n % 1000);
            b.apply(instance_change(
                ServiceName::new("svc-4242"),
                "changing",
                Some(fixture::raw("/s/svc-4242/changing".into(), data)),
            ));
            b.build()
        })
    });
    group.finish();
}

criterion_group!(benches, match_and_pick, builds);
criterion_main!(benches);
