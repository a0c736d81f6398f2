//! Circuit breaking per service (README: "Policy documents", `circuit_breaker`): counts of a
//! service's upstream connections, requests waiting for one, requests and retries in flight. The
//! counts live in a [`ServiceGate`] kept by service name outside the routing table, so a table
//! swap keeps them, as it keeps endpoint state. A request takes a [`Slot`] under a limit and gives
//! it back when the slot drops; an absent limit takes no slot and counts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

/// The limits of a service's circuit breaker; None is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BreakerLimits {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
}

/// Which limit a slot counts against; its name is the `limit` label of `zkroute_overflow_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
    Retries,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "max_connections",
            Limit::Pending => "max_pending",
            Limit::Requests => "max_requests",
            Limit::Retries => "max_retries",
        }
    }
}

/// The counts of one service.
#[derive(Debug, Default)]
pub struct ServiceGate {
    counts: [AtomicU32; 4],
    /// Woken when a connection closes or goes back to a pool idle, for requests waiting for one.
    freed: Notify,
}

impl ServiceGate {
    /// A slot under `limit` if fewer than `max` are taken.
    pub fn take(self: &Arc<Self>, limit: Limit, max: u32) -> Option<Slot> {
        let count = &self.counts[limit as usize];
        let mut n = count.load(Ordering::Relaxed);
        loop {
            if n >= max {
                return None;
            }
            match count.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(Slot { gate: self.clone(), limit }),
                Err(now) => n = now,
            }
        }
    }

    /// Whether a slot under `limit` is free now (it may be taken before the caller takes it).
    pub fn has_room(&self, limit: Limit, max: u32) -> bool {
        self.count(limit) < max
    }

    /// The slots taken under `limit`.
    pub fn count(&self, limit: Limit) -> u32 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }

    /// Tells waiting requests that a connection may be had: one went back to a pool, or closed.
    pub fn connection_freed(&self) {
        self.freed.notify_waiters();
    }

    /// Resolves at the next [`ServiceGate::connection_freed`] after it was enabled (or first polled).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

/// One unit of a limit, taken until dropped. A connection's slot stays with the connection,
/// pooled or not.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<ServiceGate>,
    limit: Limit,
}

impl Slot {
    pub fn gate(&self) -> &Arc<ServiceGate> {
        &self.gate
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.counts[self.limit as usize].fetch_sub(1, Ordering::AcqRel);
        if self.limit == Limit::Connections {
            self.gate.connection_freed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_up_to_the_limit_and_free_on_drop() {
        let gate = Arc::new(ServiceGate::default());
        let a = gate.take(Limit::Requests, 2).expect("first");
        let b = gate.take(Limit::Requests, 2).expect("second");
        assert!(gate.take(Limit::Requests, 2).is_none(), "a third is over the limit");
        assert!(gate.take(Limit::Retries, 1).is_some(), "limits count apart");
        drop(a);
        assert_eq!(gate.count(Limit::Requests), 1);
        assert!(gate.take(Limit::Requests, 2).is_some());
        drop(b);
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_waiting_requests() {
        let gate = Arc::new(ServiceGate::default());
        let conn = gate.take(Limit::Connections, 1).expect("a connection");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let freed = gate.freed();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if gate.has_room(Limit::Connections, 1) {
                    return;
                }
                freed.await;
            })
        };
        drop(conn);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").expect("ran");
    }
}
