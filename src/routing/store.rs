//! The one place that touches arc-swap. The control plane publishes whole tables through the
//! single [`RouteWriter`]; the data plane reads through cloned [`RouteReader`]s. A reader never
//! waits: `load` is a few atomic operations, and a table stays alive while a request holds it.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use tokio::sync::watch;

use super::RoutingTable;

/// Creates the store, empty until the first table is published.
pub fn channel() -> (RouteWriter, RouteReader) {
    let table = Arc::new(ArcSwapOption::empty());
    let (version_tx, version_rx) = watch::channel(0);
    (RouteWriter { table: table.clone(), version: version_tx }, RouteReader { table, version: version_rx })
}

/// Publishes tables. There is one.
pub struct RouteWriter {
    table: Arc<ArcSwapOption<RoutingTable>>,
    version: watch::Sender<u64>,
}

impl RouteWriter {
    /// Swaps `table` in; requests that already loaded the previous one finish on it.
    pub fn publish(&self, table: Arc<RoutingTable>) {
        let version = table.version;
        self.table.store(Some(table));
        self.version.send_replace(version);
    }

    pub fn reader(&self) -> RouteReader {
        RouteReader { table: self.table.clone(), version: self.version.subscribe() }
    }
}

/// Reads the table in force.
#[derive(Clone)]
pub struct RouteReader {
    table: Arc<ArcSwapOption<RoutingTable>>,
    version: watch::Receiver<u64>,
}

impl RouteReader {
    /// The table in force, if one was loaded. Hold the guard only briefly: clone what you need
    /// from it and drop it before awaiting.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Option<Arc<RoutingTable>>> {
        self.table.load()
    }

    /// The table in force, as an owned `Arc`.
    pub fn current(&self) -> Option<Arc<RoutingTable>> {
        self.table.load_full()
    }

    pub fn is_loaded(&self) -> bool {
        self.table.load().is_some()
    }

    /// Waits until a table with at least this version is in force.
    pub async fn wait_for_version(&mut self, version: u64) {
        let _ = self.version.wait_for(|v| *v >= version).await;
    }
}
