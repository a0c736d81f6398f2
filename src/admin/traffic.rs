//! Request rates for the dashboard, from successive samples of the counters the data plane keeps
//! anyway. A sample is taken when the page is rendered (at most one a second), so watching costs
//! nothing on the request path, and nothing at all while nobody watches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::IntCounterVec;
use prometheus::core::Collector;

use crate::metrics::Metrics;

/// Rates are averaged over the samples of about this long.
pub const WINDOW: Duration = Duration::from_secs(15);
/// Samples closer together than this add nothing.
const MIN_SPACING: Duration = Duration::from_secs(1);

/// One service's counters, summed over listeners.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    /// HTTP requests by status code.
    pub codes: BTreeMap<u16, u64>,
    pub connect_errors: u64,
    pub retries: u64,
    pub tcp_connections: u64,
}

impl Counts {
    /// Requests answered with a status in `class` (4 for 4xx, 5 for 5xx).
    pub fn class(&self, class: u16) -> u64 {
        self.codes.iter().filter(|(c, _)| **c / 100 == class).map(|(_, n)| n).sum()
    }

    fn since(&self, earlier: &Counts) -> Counts {
        Counts {
            requests: self.requests.saturating_sub(earlier.requests),
            codes: self
                .codes
                .iter()
                .map(|(c, n)| (*c, n.saturating_sub(earlier.codes.get(c).copied().unwrap_or(0))))
                .collect(),
            connect_errors: self.connect_errors.saturating_sub(earlier.connect_errors),
            retries: self.retries.saturating_sub(earlier.retries),
            tcp_connections: self.tcp_connections.saturating_sub(earlier.tcp_connections),
        }
    }
}

/// What the dashboard shows of one service's traffic (the `service` label: a service name, a
/// static address, or "" for requests no rule matched).
#[derive(Debug)]
pub struct ServiceTraffic {
    pub service: String,
    /// Since the process started.
    pub total: Counts,
    /// Over `rates_over`, when an earlier sample exists.
    pub recent: Option<Counts>,
}

/// What [`Traffic::observe`] found.
#[derive(Debug)]
pub struct TrafficView {
    pub services: Vec<ServiceTraffic>,
    /// The span the `recent` counts cover; None on the first look.
    pub rates_over: Option<Duration>,
}

impl TrafficView {
    /// `n` over the sampled span, per second.
    pub fn per_second(&self, n: u64) -> Option<f64> {
        self.rates_over.map(|d| n as f64 / d.as_secs_f64())
    }
}

struct Sample {
    at: Instant,
    services: BTreeMap<String, Counts>,
}

/// The samples taken so far.
#[derive(Default)]
pub struct Traffic {
    samples: Mutex<VecDeque<Sample>>,
}

impl Traffic {
    /// Reads the counters now, keeps the sample, and compares it with the oldest sample of the
    /// last [`WINDOW`].
    pub fn observe(&self, metrics: &Metrics, now: Instant) -> TrafficView {
        let current = read(metrics);
        let Ok(mut samples) = self.samples.lock() else {
            return view(&current, None, None);
        };
        while samples.front().is_some_and(|s| now.saturating_duration_since(s.at) > WINDOW) {
            samples.pop_front();
        }
        let base = samples.front().filter(|s| now.saturating_duration_since(s.at) >= MIN_SPACING);
        let result = view(&current, base.map(|s| &s.services), base.map(|s| now.saturating_duration_since(s.at)));
        if samples.back().is_none_or(|s| now.saturating_duration_since(s.at) >= MIN_SPACING) {
            samples.push_back(Sample { at: now, services: current });
        }
        result
    }
}

fn view(
    current: &BTreeMap<String, Counts>,
    base: Option<&BTreeMap<String, Counts>>,
    over: Option<Duration>,
) -> TrafficView {
    let services = current
        .iter()
        .map(|(name, total)| ServiceTraffic {
            service: name.clone(),
            total: total.clone(),
            recent: base.map(|b| total.since(b.get(name).unwrap_or(&Counts::default()))),
        })
        .collect();
    TrafficView { services, rates_over: over }
}

/// Every service's counters, summed over listeners.
fn read(m: &Metrics) -> BTreeMap<String, Counts> {
    let mut out: BTreeMap<String, Counts> = BTreeMap::new();
    each(&m.http_requests, |labels, n| {
        let c = out.entry(label(labels, "service")).or_default();
        c.requests += n;
        if let Ok(code) = label(labels, "code").parse() {
            *c.codes.entry(code).or_default() += n;
        }
    });
    each(&m.upstream_connect_errors, |labels, n| out.entry(label(labels, "service")).or_default().connect_errors += n);
    each(&m.retries, |labels, n| out.entry(label(labels, "service")).or_default().retries += n);
    each(&m.tcp_connections, |labels, n| out.entry(label(labels, "service")).or_default().tcp_connections += n);
    out
}

fn each(counter: &IntCounterVec, mut f: impl FnMut(&[prometheus::proto::LabelPair], u64)) {
    for family in counter.collect() {
        for m in family.get_metric() {
            f(m.get_label(), m.get_counter().get_value() as u64);
        }
    }
}

fn label(labels: &[prometheus::proto::LabelPair], name: &str) -> String {
    labels.iter().find(|l| l.name() == name).map(|l| l.value().to_owned()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::RouteStats;
    use crate::routing::table::TargetStats;

    #[test]
    fn rates_come_from_two_samples_a_second_or_more_apart() {
        let m = Metrics::new(true);
        let users = RouteStats::new(&m, "http", "users");
        let t0 = Instant::now();
        let traffic = Traffic::default();
        for _ in 0..10 {
            users.observe(200, Duration::ZERO);
        }
        let first = traffic.observe(&m, t0);
        assert_eq!(first.rates_over, None, "nothing to compare with yet");
        assert_eq!(first.services[0].total.requests, 10);

        for code in [200, 200, 503, 404] {
            users.observe(code, Duration::ZERO);
        }
        users.connect_failed();
        // Half a second later: too close to the first sample to be a rate of its own.
        assert_eq!(traffic.observe(&m, t0 + Duration::from_millis(500)).rates_over, None);
        let later = traffic.observe(&m, t0 + Duration::from_secs(2));
        assert_eq!(later.rates_over, Some(Duration::from_secs(2)));
        let s = &later.services[0];
        assert_eq!(s.service, "users");
        let recent = s.recent.as_ref().unwrap();
        assert_eq!((recent.requests, recent.class(5), recent.class(4), recent.connect_errors), (4, 1, 1, 1));
        assert_eq!(later.per_second(recent.requests), Some(2.0));
        assert_eq!(s.total.codes, BTreeMap::from([(200, 12), (404, 1), (503, 1)]));

        // Past the window the oldest sample is dropped: rates cover the recent past only.
        let much_later = traffic.observe(&m, t0 + WINDOW + Duration::from_secs(1));
        assert_eq!(much_later.rates_over, Some(WINDOW - Duration::from_secs(1)));
        assert_eq!(much_later.services[0].recent.as_ref().unwrap().requests, 0);
    }
}
