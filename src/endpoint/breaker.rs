//! Circuit breaking and retry budgets per service (README: "Policy documents",
//! `circuit_breaker`, `retry_budget`): counts of a service's upstream connections, requests
//! waiting for one, requests and retries in flight, and the requests and retries of the last ten
//! seconds. The counts live in a [`ServiceGate`] kept by service name outside the routing table,
//! so a table swap keeps them, as it keeps endpoint state. A request takes a [`Slot`] under a
//! limit and gives it back when the slot drops; an absent limit takes no slot and counts nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

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

/// A service's retry budget: retries may be at most `percent` of the requests of the last
/// [`BUDGET_WINDOW`], plus `min_per_second` a second (linkerd's and Finagle's budget, tower's
/// `TpsBudget`). Kept here rather than taken from tower: `TpsBudget` locks a mutex on every
/// deposit, that is on every request, while these counters are atomics per one-second slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetLimits {
    pub percent: u32,
    pub min_per_second: u32,
}

/// The time a retry budget looks back over.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
const BUDGET_SLOTS: usize = 10;

/// The counts of one service.
#[derive(Debug)]
pub struct ServiceGate {
    counts: [AtomicU32; 4],
    /// Woken when a connection closes or goes back to a pool idle, for requests waiting for one.
    freed: Notify,
    /// Requests and retries per second of the last ten, for the retry budget.
    window: [BudgetSlot; BUDGET_SLOTS],
    epoch: Instant,
    /// Requests waiting for a connection ([`ServiceGate::listen`]).
    listeners: AtomicU32,
}

/// A request counted as waiting for a connection, until dropped.
#[derive(Debug)]
pub struct Listening {
    gate: Arc<ServiceGate>,
}

impl Drop for Listening {
    fn drop(&mut self) {
        self.gate.listeners.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Default for ServiceGate {
    fn default() -> Self {
        ServiceGate {
            counts: Default::default(),
            freed: Notify::new(),
            window: Default::default(),
            epoch: Instant::now(),
            listeners: AtomicU32::new(0),
        }
    }
}

/// One second of the budget's window: which second it holds (from the gate's epoch, plus one so
/// that 0 is none), and the requests and retries counted in it.
#[derive(Debug, Default)]
struct BudgetSlot {
    second: AtomicU64,
    requests: AtomicU32,
    retries: AtomicU32,
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
    /// With nobody waiting (the common case) this is one atomic load, not `Notify`'s lock.
    pub fn connection_freed(&self) {
        // Pairs with the fence in `listen`: a waiter counted after this load looks at the pool
        // and the counts after they changed, so it cannot miss what freed the connection.
        fence(Ordering::SeqCst);
        if self.listeners.load(Ordering::SeqCst) > 0 {
            self.freed.notify_waiters();
        }
    }

    /// Counts a request waiting for a connection until the guard drops: call before looking at
    /// the pool and the counts, and enable the [`ServiceGate::freed`] future before looking too.
    pub fn listen(self: &Arc<Self>) -> Listening {
        self.listeners.fetch_add(1, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        Listening { gate: self.clone() }
    }

    /// Resolves at the next [`ServiceGate::connection_freed`] after it was enabled (or first polled).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// The slot of the second `at` falls in, cleared first if it held an older second.
    fn slot_at(&self, at: Instant) -> &BudgetSlot {
        let second = at.saturating_duration_since(self.epoch).as_secs() + 1;
        let slot = &self.window[(second % BUDGET_SLOTS as u64) as usize];
        let held = slot.second.load(Ordering::Acquire);
        if held != second && slot.second.compare_exchange(held, second, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            // Counts added by others between the swap and these stores are lost: a second's
            // first few requests may go uncounted, which errs towards fewer retries.
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Counts a request that arrived at `at` into the retry budget.
    pub fn deposit(&self, at: Instant) {
        self.slot_at(at).requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The requests and retries of the window that ends at `now`.
    fn window_counts(&self, now: Instant) -> (u64, u64) {
        let current = now.saturating_duration_since(self.epoch).as_secs() + 1;
        let oldest = current.saturating_sub(BUDGET_SLOTS as u64 - 1);
        self.window.iter().filter(|s| (oldest..=current).contains(&s.second.load(Ordering::Acquire))).fold(
            (0, 0),
            |(q, r), s| {
                (q + u64::from(s.requests.load(Ordering::Relaxed)), r + u64::from(s.retries.load(Ordering::Relaxed)))
            },
        )
    }

    /// Whether the budget has room for a retry now.
    pub fn budget_has_room(&self, budget: BudgetLimits) -> bool {
        let (requests, retries) = self.window_counts(Instant::now());
        let allowed =
            u64::from(budget.min_per_second) * BUDGET_WINDOW.as_secs() + requests * u64::from(budget.percent) / 100;
        retries < allowed
    }

    /// Takes a retry from the budget if it has room.
    pub fn withdraw(&self, budget: BudgetLimits) -> bool {
        if !self.budget_has_room(budget) {
            return false;
        }
        self.slot_at(Instant::now()).retries.fetch_add(1, Ordering::Relaxed);
        true
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

    #[test]
    fn a_retry_budget_allows_its_share_of_requests_plus_the_reserve() {
        let gate = ServiceGate::default();
        let budget = BudgetLimits { percent: 20, min_per_second: 1 };
        let now = Instant::now();
        for _ in 0..100 {
            gate.deposit(now);
        }
        let granted = (0..100).take_while(|_| gate.withdraw(budget)).count();
        assert_eq!(granted, 10 + 20, "a reserve of 1/s over 10 s, and 20% of 100 requests");
        let none = BudgetLimits { percent: 0, min_per_second: 0 };
        assert!(!ServiceGate::default().withdraw(none), "no reserve, no requests: no retry");
    }

    #[tokio::test]
    async fn a_closed_connection_wakes_waiting_requests() {
        let gate = Arc::new(ServiceGate::default());
        let conn = gate.take(Limit::Connections, 1).expect("a connection");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _listening = gate.listen();
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

    #[tokio::test]
    async fn only_a_listening_request_is_woken_and_it_is_woken_once_parked() {
        let gate = Arc::new(ServiceGate::default());
        let conn = gate.take(Limit::Connections, 1).expect("a connection");
        let waiter = {
            let gate = gate.clone();
            tokio::spawn(async move {
                let _listening = gate.listen();
                let freed = gate.freed();
                tokio::pin!(freed);
                freed.as_mut().enable();
                if gate.has_room(Limit::Connections, 1) {
                    return false;
                }
                freed.await;
                true
            })
        };
        // One thread: once it counts as listening, it is parked on `freed`.
        while gate.listeners.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        drop(conn);
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").unwrap();
        assert!(waited, "it waited for the connection and was woken when it closed");
        assert_eq!(gate.listeners.load(Ordering::SeqCst), 0, "no longer counted");
    }
}
