//! zkroute: a sidecar routing proxy driven by ZooKeeper.
//!
//! The modules, from the bottom up; each imports only modules listed above it, so the import
//! graph has no cycle and no arrow pointing up:
//! - [`names`]: service names, addresses, endpoint keys: the vocabulary everything is keyed by.
//! - [`shutdown`], [`config`] (the local TOML file, flags and `ZKROUTE_*` variables, validated),
//!   [`access_log`], [`net`] (sockets: listen and connect as zkroute wants them), [`tls`] (rustls
//!   configurations for listeners, upstreams and ZooKeeper, from certificate files): leaves.
//! - [`endpoint`]: per-endpoint state (health, ejection, in-flight, pools) kept outside the table
//!   by endpoint key, so it survives table swaps.
//! - [`routing`]: the domain and the immutable [`routing::RoutingTable`], built from documents by
//!   [`routing::Builder`]; no I/O. [`routing::store`] is the only place that touches arc-swap.
//! - [`metrics`]: every metric family, registered once; it counts routes through the
//!   [`routing::table::TargetStats`] interface, so routing knows no metric type.
//! - [`zookeeper`]: session plumbing (settings, credentials, ACLs, backoff, batched multi-reads)
//!   shared by discovery, registration and `ctl`.
//! - [`health`]: active checks and passive outlier detection; they write endpoint state and tell
//!   the control loop which services to rebuild.
//! - [`discovery`]: the control plane. A source ([`discovery::zk`] or [`discovery::file`]) reads
//!   naming, rule and policy nodes ([`discovery::formats`] parses every instance format,
//!   [`discovery::dubbo`] turns Dubbo's providers and governance into instances); the control
//!   loop builds and publishes each table whole. It never imports the data plane.
//! - [`proxy`]: the data plane. Listeners, matching, balancing, forwarding; it reads the table and
//!   endpoint state and never waits on the control plane.
//! - [`register`]: registers the local app in ZooKeeper (naming). [`admin`]: the dashboard at
//!   `/`, `/metrics`, `/healthz`, `/ready`, `/config`, `/drain`. [`ctl`]: the operator CLI.
//! - [`app`] wires them all and reloads the configuration on SIGHUP; `main` is flags, telemetry,
//!   config, run, signal, drain.
//!
//! Modules that only the crate uses are `pub(crate)`; the public ones are what `main`, the
//! integration tests and the benches drive.

// The map above names internal modules too: CI renders the docs with
// `--document-private-items`, where those links resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod access_log;
pub(crate) mod admin;
pub mod app;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod endpoint;
pub(crate) mod health;
pub mod metrics;
pub(crate) mod names;
pub mod net;
pub mod proxy;
pub(crate) mod register;
pub mod routing;
pub(crate) mod shutdown;
pub mod tls;
pub mod zookeeper;

pub use app::App;
pub use config::{Config, ConfigArgs, ConfigError};
