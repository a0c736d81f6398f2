//! Local rate limiting per rule (README: "Rule documents", `rate_limit`): GCRA through the
//! `governor` crate, one limit for the rule's whole traffic or one per key (a header's value or
//! the client's address) in a bounded table. A limiter is kept across table builds while its
//! rule's limit stays the same, so that rebuilding routes (an instance came or went) does not
//! refill every bucket.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use http::HeaderName;

/// Keys a per-key limiter tracks at most; past that, keys not seen lately are forgotten, and
/// while the table is still full new keys share one limit.
pub const MAX_KEYS: usize = 10_000;

/// A rule's limit, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub key: Option<RateKey>,
}

/// What a per-key limit is keyed by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RateKey {
    /// The value of this request header (requests without it share one limit).
    Header(HeaderName),
    /// The client's address.
    SourceIp,
}

/// How a rule's refusals are counted; the metrics registry provides it.
pub trait RuleStats: Send + Sync {
    /// A request refused by the rule's rate limit.
    fn rate_limited(&self);
}

/// A [`RuleStats`] that counts nothing.
pub struct NoRuleStats;

impl RuleStats for NoRuleStats {
    fn rate_limited(&self) {}
}

/// The limiter of one rule on one listener.
pub struct RouteLimiter {
    pub limit: RateLimit,
    inner: Inner,
    stats: Arc<dyn RuleStats>,
}

enum Inner {
    Whole(DefaultDirectRateLimiter),
    PerKey(DefaultKeyedRateLimiter<Box<[u8]>>),
}

impl RouteLimiter {
    pub fn new(limit: RateLimit, stats: Arc<dyn RuleStats>) -> Self {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        let inner = match limit.key {
            None => Inner::Whole(governor::RateLimiter::direct(quota)),
            Some(_) => Inner::PerKey(governor::RateLimiter::keyed(quota)),
        };
        RouteLimiter { limit, inner, stats }
    }

    /// Lets a request through, or says how long until one would pass (counted as refused).
    /// `key` gives the request's key for a per-key limit.
    pub fn check<'k>(&self, key: impl FnOnce(&RateKey) -> Option<&'k [u8]>) -> Result<(), Duration> {
        let outcome = match (&self.inner, &self.limit.key) {
            (Inner::Whole(l), _) => l.check(),
            (Inner::PerKey(l), Some(k)) => {
                let key = key(k).unwrap_or_default();
                if l.len() >= MAX_KEYS {
                    // Forget keys whose buckets are full again; if none is, newcomers share the
                    // empty key's limit (that of requests without one).
                    l.retain_recent();
                }
                if l.len() < MAX_KEYS { l.check_key(&Box::from(key)) } else { l.check_key(&Box::from(&b""[..])) }
            }
            (Inner::PerKey(l), None) => l.check_key(&Box::from(&b""[..])),
        };
        outcome.map_err(|not_until| {
            self.stats.rate_limited();
            not_until.wait_time_from(DefaultClock::default().now())
        })
    }
}

impl std::fmt::Debug for RouteLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteLimiter").field("limit", &self.limit).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32, key: Option<RateKey>) -> RouteLimiter {
        let limit =
            RateLimit { per_second: NonZeroU32::new(per_second).unwrap(), burst: NonZeroU32::new(burst).unwrap(), key };
        RouteLimiter::new(limit, Arc::new(NoRuleStats))
    }

    #[test]
    fn a_burst_passes_then_requests_wait_their_turn() {
        let l = limiter(5, 5, None);
        for _ in 0..5 {
            assert!(l.check(|_| None).is_ok());
        }
        let wait = l.check(|_| None).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "{wait:?}");
    }

    #[test]
    fn each_key_has_its_own_limit() {
        let l = limiter(1, 1, Some(RateKey::SourceIp));
        assert!(l.check(|_| Some(b"10.0.0.1")).is_ok());
        assert!(l.check(|_| Some(b"10.0.0.1")).is_err());
        assert!(l.check(|_| Some(b"10.0.0.2")).is_ok());
    }

    #[test]
    fn the_key_table_stays_bounded() {
        let l = limiter(1, 1, Some(RateKey::SourceIp));
        for i in 0..(MAX_KEYS + 100) {
            let _ = l.check(|_| Some(i.to_string().into_bytes().leak()));
        }
        let Inner::PerKey(k) = &l.inner else { panic!("keyed") };
        assert!(k.len() <= MAX_KEYS + 1, "{} keys", k.len());
    }
}
