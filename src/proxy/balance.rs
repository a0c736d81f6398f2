//! Choosing an endpoint from a set (README: "Policy documents"): `p2c` on requests in flight, `round_robin`,
//! and `ring_hash`, all honouring instance weights. The set's lists were computed when the table
//! was built; here an endpoint is only re-checked (it may have been ejected since) and, if it is
//! no longer usable, another is drawn.

use std::sync::atomic::Ordering;

use crate::routing::documents::LbPolicy;
use crate::routing::table::{EndpointSet, WeightedList};

/// Draws before falling back to a scan of the list.
const DRAWS: usize = 4;

/// Per-request input to the choice.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickInput {
    /// For `ring_hash`: the hash of the request's key, if it has one.
    pub hash: Option<u64>,
}

/// Endpoints already tried by this request (indices into the set), skipped while others remain.
#[derive(Default, Debug)]
pub struct Tried {
    list: [u32; 8],
    len: usize,
}

impl Tried {
    pub fn push(&mut self, i: usize) {
        if self.len < self.list.len() {
            self.list[self.len] = i as u32;
            self.len += 1;
        }
    }

    #[inline]
    pub fn contains(&self, i: usize) -> bool {
        self.list[..self.len].contains(&(i as u32))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

/// Picks an endpoint index of `set`, or None when no endpoint may take the request. With zones
/// (README: "Zone-aware routing"), from the zone the split draws, then from anywhere when that
/// zone has nothing left to try.
#[inline]
pub fn pick(set: &EndpointSet, input: PickInput, tried: &Tried) -> Option<usize> {
    let list = match &set.zones {
        Some(zones) => zones.draw(),
        None => set.active(),
    };
    match pick_from(set, list, input, tried) {
        None if set.zones.is_some() => pick_anywhere(set, input, tried),
        found => found,
    }
}

/// The zone drawn had nothing left to try: any zone.
#[cold]
#[inline(never)]
fn pick_anywhere(set: &EndpointSet, input: PickInput, tried: &Tried) -> Option<usize> {
    pick_from(set, set.active(), input, tried)
}

#[inline(always)]
fn pick_from(set: &EndpointSet, list: &WeightedList, input: PickInput, tried: &Tried) -> Option<usize> {
    if list.is_empty() {
        return None;
    }
    let check_usable = !set.panic;
    let unknown_ok = set.policy.unknown_is_healthy();
    let ok = |i: usize| !tried.contains(i) && (!check_usable || set.endpoints[i].state.is_usable(unknown_ok));
    let first = match &set.policy.lb {
        LbPolicy::RingHash(_) => match (input.hash, &set.ring) {
            (Some(h), Some(ring)) => ring.owner(h).filter(|&i| ok(i)),
            _ => None,
        },
        LbPolicy::RoundRobin => round_robin(set, list).filter(|&i| ok(i)),
        LbPolicy::P2c => None,
    };
    if first.is_some() {
        return first;
    }
    for _ in 0..DRAWS {
        if let Some(i) = p2c(set, list).filter(|&i| ok(i)) {
            return Some(i);
        }
    }
    // Everything drawn was tried or unusable: take the first that is neither, if any.
    (0..list.len()).filter_map(|n| list.nth(n)).find(|&i| ok(i))
}

/// Weighted round robin without shared mutable state: position `n * step mod total` visits every
/// weight unit once per `total` picks (`step` coprime with `total`), spreading each endpoint's
/// turns out instead of serving them in a block.
fn round_robin(set: &EndpointSet, list: &WeightedList) -> Option<usize> {
    let total = list.total_weight();
    let n = set.rr.fetch_add(1, Ordering::Relaxed);
    list.at(n.wrapping_mul(list.rr_step()) % total)
}

/// Power of two choices: two weighted random draws, the one with fewer requests in flight per
/// unit of weight wins.
fn p2c(set: &EndpointSet, list: &WeightedList) -> Option<usize> {
    let total = list.total_weight();
    let a = list.at(fastrand::u64(0..total))?;
    if list.len() == 1 {
        return Some(a);
    }
    let mut b = list.at(fastrand::u64(0..total))?;
    if b == a {
        b = list.at(fastrand::u64(0..total))?;
    }
    let (ea, eb) = (&set.endpoints[a], &set.endpoints[b]);
    let load = |e: &crate::routing::table::Endpoint, other_weight: u32| {
        u64::from(e.state.in_flight()) * u64::from(other_weight)
    };
    if load(eb, ea.weight) < load(ea, eb.weight) { Some(b) } else { Some(a) }
}
