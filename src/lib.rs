//! zkroute: a sidecar routing proxy driven by ZooKeeper.
//!
//! The architecture in a dozen lines:
//! - [`config`] reads the local TOML file, flags and `ZKROUTE_*` variables.
//! - [`discovery`] is the control plane: a source ([`discovery::zk`] or [`discovery::file`]) reads
//!   naming, rule and policy nodes; [`discovery::formats`] parses every instance format; the
//!   control loop feeds them to the [`routing::Builder`] and publishes each table whole.
//! - [`routing`] holds the domain types and the immutable [`routing::RoutingTable`]; it does no I/O.
//!   [`routing::store`] is the only place that touches arc-swap.
//! - [`endpoint`] keeps per-endpoint state (health, ejection, in-flight) outside the table, keyed
//!   by a stable endpoint id, so it survives swaps.
//! - [`admin`] serves the dashboard, `/metrics`, `/healthz`, `/ready`, `/config`; [`metrics`] registers
//!   every family.
//! - [`app`] wires it all together; `main` is flags, telemetry, config, run, signal, drain.

pub mod access_log;
pub mod admin;
pub mod app;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod endpoint;
pub mod health;
pub mod metrics;
pub mod proxy;
pub mod register;
pub mod routing;
pub mod shutdown;

pub use app::App;
pub use config::{Config, ConfigArgs, ConfigError};
