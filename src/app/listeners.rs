//! The local listeners, each on a slot of its own. A slot's index is the [`ListenerId`] that the
//! routing table and the listener's connections use. A listener keeps its slot while it serves
//! and, once removed by a configuration reload, while its connections drain; only a drained slot
//! is given to a new listener, so that no connection ever finds another listener's routes under
//! its id.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::net::Listener;
use tokio::task::JoinHandle;

use crate::access_log::AccessLog;
use crate::admin::{ListenerBook, ListenerInfo};
use crate::config::ListenerConfig;
use crate::health::HealthReporter;
use crate::metrics::Metrics;
use crate::net::LoopbackCongestion;
use crate::proxy::http::HttpContext;
use crate::proxy::tcp::TcpContext;
use crate::proxy::upstream::Pools;
use crate::proxy::{self, Limits, Tracker};
use crate::routing::RouteReader;
use crate::routing::build::ListenerSpec;
use crate::routing::table::{ListenerId, Protocol};
use crate::shutdown::{self, Trigger};
use crate::tls::ServerTls;

/// What every listener's connections share, whatever the configuration.
#[derive(Clone)]
pub struct Shared {
    pub routes: RouteReader,
    pub pools: Arc<Pools>,
    pub metrics: Arc<Metrics>,
    pub health: HealthReporter,
    pub access_log: Option<Arc<AccessLog>>,
    /// This sidecar's `[tls]` (upstream identity and trust), if it loaded.
    pub upstream_tls: Option<Arc<crate::tls::UpstreamTls>>,
    /// Polls the TLS files of every listener.
    pub rotation: Arc<super::rotation::Rotation>,
}

/// A listener's socket, bound but not yet serving.
pub struct Bound {
    pub config: ListenerConfig,
    socket: Arc<Listener>,
    addr: SocketAddr,
}

impl Bound {
    /// Binds `config.bind` with what accepted connections should inherit.
    pub fn bind(config: &ListenerConfig, congestion: &LoopbackCongestion) -> std::io::Result<Bound> {
        let socket = crate::net::listen(config.bind, congestion)?;
        let addr = socket.local_addr()?;
        Ok(Bound { config: config.clone(), socket: Arc::new(socket), addr })
    }
}

/// A removed listener's socket, still listening (until its accept loop sees the drain and this
/// is dropped): a listener of another protocol on the same address may take it over.
pub struct Released {
    socket: Arc<Listener>,
    addr: SocketAddr,
}

impl Released {
    /// The socket under a new configuration.
    pub fn rebind(self, config: &ListenerConfig) -> Bound {
        Bound { config: config.clone(), socket: self.socket, addr: self.addr }
    }
}

struct Serving {
    config: ListenerConfig,
    socket: Arc<Listener>,
    addr: SocketAddr,
    tracker: Arc<Tracker>,
    /// A TLS listener's server side, loaded from `config.tls`.
    tls: Option<Arc<ServerTls>>,
    /// Stops accepting and drains the connections (the `shutdown` of their contexts).
    drain: Trigger,
    /// None until it serves.
    accept: Option<JoinHandle<()>>,
}

struct Draining {
    spec: ListenerSpec,
    addr: SocketAddr,
    tracker: Arc<Tracker>,
    accept: Option<JoinHandle<()>>,
}

impl Draining {
    fn is_done(&self) -> bool {
        self.accept.as_ref().is_none_or(JoinHandle::is_finished) && self.tracker.active() == 0
    }
}

enum Slot {
    Serving(Serving),
    Draining(Draining),
    Free,
}

/// Every listener slot.
pub struct Listeners {
    shared: Shared,
    slots: Vec<Slot>,
    /// What the admin server shows of them.
    book: ListenerBook,
}

/// A spec no rule can name (rules need a listener name): a free slot's.
fn free_spec() -> ListenerSpec {
    ListenerSpec { name: "".into(), protocol: Protocol::Http, service: None, endpoint: None }
}

impl Listeners {
    pub fn new(shared: Shared) -> Self {
        Listeners { shared, slots: Vec::new(), book: Arc::new(Mutex::new(Vec::new())) }
    }

    pub fn book(&self) -> ListenerBook {
        self.book.clone()
    }

    /// The serving listener named `name`: its configuration and the address it is bound to.
    pub fn serving(&self, name: &str) -> Option<(&ListenerConfig, SocketAddr)> {
        self.slots.iter().find_map(|s| match s {
            Slot::Serving(l) if l.config.name == name => Some((&l.config, l.addr)),
            _ => None,
        })
    }

    /// The serving listeners' bound addresses, by name.
    pub fn addresses(&self) -> BTreeMap<String, SocketAddr> {
        self.serving_iter().map(|l| (l.config.name.clone(), l.addr)).collect()
    }

    fn serving_iter(&self) -> impl Iterator<Item = &Serving> {
        self.slots.iter().filter_map(|s| match s {
            Slot::Serving(l) => Some(l),
            _ => None,
        })
    }

    /// The slots as the table builder takes them: serving and draining listeners in their slots,
    /// free slots under a name no rule can have.
    pub fn specs(&self) -> Vec<ListenerSpec> {
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Serving(l) => spec(&l.config),
                Slot::Draining(d) => d.spec.clone(),
                Slot::Free => free_spec(),
            })
            .collect()
    }

    /// Whether `table` has every serving listener in its slot.
    pub fn are_in(&self, table: &crate::routing::RoutingTable) -> bool {
        self.slots.iter().enumerate().all(|(id, s)| match s {
            Slot::Serving(l) => table.listener(id).is_some_and(|r| *r.name == *l.config.name),
            _ => true,
        })
    }

    /// A serving listener's new configuration, with the same address and protocol.
    pub fn reconfigure(&mut self, config: &ListenerConfig) {
        for slot in &mut self.slots {
            if let Slot::Serving(l) = slot {
                if l.config.name == config.name {
                    l.config = config.clone();
                }
            }
        }
    }

    /// Takes a slot for `bound` (a drained one if any): the table must hold its spec before it
    /// [`serve`](Listeners::serve)s. Returns the slot's id.
    pub fn add(&mut self, bound: Bound) -> ListenerId {
        let serving = Serving {
            config: bound.config,
            socket: bound.socket,
            addr: bound.addr,
            tracker: Tracker::new(),
            tls: None,
            drain: shutdown::channel().0,
            accept: None,
        };
        for (id, slot) in self.slots.iter_mut().enumerate() {
            let free = match slot {
                Slot::Free => true,
                Slot::Draining(d) => d.is_done(),
                Slot::Serving(_) => false,
            };
            if free {
                *slot = Slot::Serving(serving);
                return id;
            }
        }
        self.slots.push(Slot::Serving(serving));
        self.slots.len() - 1
    }

    /// Starts (or, with new limits, restarts) the accept loop of every serving listener: new
    /// connections get `limits`, connections already open keep theirs.
    pub fn serve(&mut self, limits: &Limits) {
        let shared = self.shared.clone();
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if let Slot::Serving(l) = slot {
                // A name the new configuration gives may apply to a socket already listening.
                limits.congestion.apply(&*l.socket, l.addr.ip());
                if !load_tls(l, &shared.rotation) {
                    continue;
                }
                if let Some(old) = l.accept.take() {
                    old.abort();
                }
                l.accept = Some(spawn(&shared, id, l, limits));
            }
        }
        self.publish_book();
    }

    /// Stops the listener named `name` from accepting and drains its connections: idle ones
    /// close at once, the others after their exchange in flight. Its slot keeps routing what
    /// they still send until they are gone. None if no such listener serves.
    pub fn remove(&mut self, name: &str) -> Option<Released> {
        let slot = self.slots.iter_mut().find(|s| matches!(s, Slot::Serving(l) if l.config.name == name))?;
        let Slot::Serving(l) = std::mem::replace(slot, Slot::Free) else { return None };
        l.drain.trigger();
        *slot = Slot::Draining(Draining { spec: spec(&l.config), addr: l.addr, tracker: l.tracker, accept: l.accept });
        self.publish_book();
        // The accept loop, once it sees the drain, holds the socket no longer: it closes when
        // this is dropped, unless another listener takes it over.
        Some(Released { socket: l.socket, addr: l.addr })
    }

    /// Drains every listener (at shutdown), returning their trackers to wait on.
    pub fn drain_all(&mut self) -> Vec<Arc<Tracker>> {
        let names: Vec<String> = self.serving_iter().map(|l| l.config.name.clone()).collect();
        for name in names {
            self.remove(&name);
        }
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Draining(d) => Some(d.tracker.clone()),
                _ => None,
            })
            .collect()
    }

    /// Stops every accept loop at once (after draining).
    pub fn abort(&self) {
        for s in &self.slots {
            let accept = match s {
                Slot::Serving(l) => &l.accept,
                Slot::Draining(d) => &d.accept,
                Slot::Free => &None,
            };
            if let Some(a) = accept {
                a.abort();
            }
        }
    }

    fn publish_book(&self) {
        let view = self
            .slots
            .iter()
            .map(|s| match s {
                Slot::Serving(l) => Some(ListenerInfo { bind: l.addr, draining: None }),
                Slot::Draining(d) => Some(ListenerInfo { bind: d.addr, draining: Some(d.tracker.clone()) }),
                Slot::Free => None,
            })
            .collect();
        if let Ok(mut book) = self.book.lock() {
            *book = view;
        }
    }
}

/// Loads `l`'s TLS files if it has none loaded or their names changed. False if they do not
/// load and nothing loaded before stands in for them: the listener must not serve in clear.
fn load_tls(l: &mut Serving, rotation: &Arc<super::rotation::Rotation>) -> bool {
    let Some(files) = &l.config.tls else {
        l.tls = None;
        return true;
    };
    if l.tls.as_ref().is_some_and(|t| t.files() == files) {
        return true;
    }
    let alpn: &[&[u8]] = match l.config.protocol {
        Protocol::Http => &[b"h2", b"http/1.1"],
        Protocol::Tcp => &[],
    };
    match ServerTls::load(files, alpn) {
        Ok(t) => {
            let t = Arc::new(t);
            rotation.add(&t);
            l.tls = Some(t);
            true
        }
        Err(e) => {
            tracing::error!(listener = %l.config.name, error = %e, "TLS files do not load: the listener keeps what it had");
            l.tls.is_some()
        }
    }
}

/// The listener as the table builder sees it.
pub fn spec(l: &ListenerConfig) -> ListenerSpec {
    ListenerSpec {
        name: l.name.clone().into_boxed_str(),
        protocol: l.protocol,
        service: l.service.as_deref().map(crate::routing::ServiceName::new),
        endpoint: l.endpoint.clone(),
    }
}

/// Starts the accept loop of listener `l` on slot `id`.
fn spawn(shared: &Shared, id: ListenerId, l: &Serving, limits: &Limits) -> JoinHandle<()> {
    let drain = l.drain.subscribe();
    let name: Arc<str> = Arc::from(l.config.name.as_str());
    match l.config.protocol {
        Protocol::Http => {
            let conn_gauges = crate::metrics::ConnGauges::new(&shared.metrics, &name);
            let ctx = Arc::new(HttpContext {
                conn_gauges,
                listener: id,
                name,
                routes: shared.routes.clone(),
                pools: shared.pools.clone(),
                metrics: shared.metrics.clone(),
                limits: limits.clone(),
                shutdown: drain,
                tracker: l.tracker.clone(),
                health: shared.health.clone(),
                access_log: shared.access_log.clone(),
                tls: l.tls.clone(),
                upstream_tls: shared.upstream_tls.clone(),
            });
            tokio::spawn(proxy::http::serve(l.socket.clone(), ctx))
        }
        Protocol::Tcp => {
            let ctx = Arc::new(
                TcpContext::new(
                    id,
                    name,
                    shared.routes.clone(),
                    shared.metrics.clone(),
                    limits.clone(),
                    drain,
                    l.tracker.clone(),
                    shared.health.clone(),
                    shared.access_log.clone(),
                )
                .with_tls(l.tls.clone())
                .with_upstream_tls(shared.upstream_tls.clone()),
            );
            tokio::spawn(proxy::tcp::serve(l.socket.clone(), ctx))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::tcp::RelayMemory;
    use crate::proxy::upstream::PoolSettings;

    fn listeners() -> Listeners {
        let metrics = Arc::new(Metrics::new(true));
        Listeners::new(Shared {
            routes: crate::routing::store::channel().1,
            pools: Pools::new(PoolSettings { max_idle: 1, idle_timeout: Duration::from_secs(1) }),
            metrics: metrics.clone(),
            health: HealthReporter::none(),
            access_log: None,
            upstream_tls: None,
            rotation: crate::app::rotation::Rotation::new(None, metrics.clone()),
        })
    }

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 1024,
            max_connections: 10,
            stream_idle_timeout: Duration::from_secs(300),
            h2_max_concurrent_streams: 100,
            drop_underscore_headers: false,
            request_id: false,
            tcp_idle_timeout: Duration::from_secs(60),
            tcp_relay_memory: RelayMemory::new(0, Metrics::new(true).tcp_relay_buffer_bytes.clone()),
            congestion: LoopbackCongestion::default(),
        }
    }

    fn bound(name: &str) -> Bound {
        let config = ListenerConfig {
            name: name.into(),
            bind: "127.0.0.1:0".parse().unwrap(),
            protocol: Protocol::Http,
            service: None,
            endpoint: None,
            tls: None,
        };
        Bound::bind(&config, &LoopbackCongestion::default()).unwrap()
    }

    fn names(l: &Listeners) -> Vec<String> {
        l.specs().iter().map(|s| s.name.to_string()).collect()
    }

    #[tokio::test]
    async fn a_removed_listener_keeps_its_slot_until_its_connections_are_gone() {
        let mut l = listeners();
        assert_eq!((l.add(bound("a")), l.add(bound("b"))), (0, 1));
        l.serve(&limits());
        let (_, a) = l.serving("a").unwrap();
        // A connection in the middle of a request head: it stays open through the drain.
        let mut open = tokio::net::TcpStream::connect(a).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut open, b"GET / HTTP/1.1\r\n").await.unwrap();
        let tracker = match &l.slots[0] {
            Slot::Serving(s) => s.tracker.clone(),
            _ => unreachable!(),
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while tracker.active() == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();

        assert!(l.remove("a").is_some());
        assert_eq!(names(&l), ["a", "b"], "draining, it still routes under its slot");
        assert_eq!(l.add(bound("c")), 2, "not the slot of a listener still draining");
        assert!(l.addresses().keys().eq(["b", "c"]));

        drop(open);
        tokio::time::timeout(Duration::from_secs(5), tracker.wait_idle()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(&l.slots[0], Slot::Draining(d) if d.is_done()) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        assert_eq!(l.add(bound("d")), 0, "a drained slot is taken again");
        assert_eq!(names(&l), ["d", "b", "c"]);
        assert!(tokio::net::TcpStream::connect(a).await.is_err(), "a's socket is closed");
    }
}
