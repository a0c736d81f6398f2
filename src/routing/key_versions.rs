//! The zkroute version that introduced each key of the rule and policy documents.
//!
//! Documents refuse unknown keys, so a sidecar older than a key refuses a document that uses it
//! and keeps that document's previous version in force. A fleet upgraded one host at a time stays
//! consistent as long as no document uses a key before every sidecar knows it: `zkroute ctl put`
//! says which version a document needs, and the README lists every key with its version (a test
//! keeps the two lists equal).

use serde_json::Value;

use super::NodeKind;

/// A zkroute release, major and minor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u16, pub u16);

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// The first release, whose keys every zkroute knows.
pub const FIRST: Version = Version(0, 1);

/// The release of upstream protection and traffic policy.
pub const V0_3: Version = Version(0, 3);

/// Every document key as a path (`match.host`, `backends[].weight`) with the version that
/// introduced it. A key missing here counts as [`FIRST`].
pub const KEYS: &[(NodeKind, &str, Version)] = &[
    (NodeKind::Rule, "listener", FIRST),
    (NodeKind::Rule, "priority", FIRST),
    (NodeKind::Rule, "match", FIRST),
    (NodeKind::Rule, "match.host", FIRST),
    (NodeKind::Rule, "match.path_prefix", FIRST),
    (NodeKind::Rule, "match.method", FIRST),
    (NodeKind::Rule, "match.headers", FIRST),
    (NodeKind::Rule, "backends", FIRST),
    (NodeKind::Rule, "backends[].service", FIRST),
    (NodeKind::Rule, "backends[].subset", FIRST),
    (NodeKind::Rule, "backends[].endpoint", FIRST),
    (NodeKind::Rule, "backends[].address", FIRST),
    (NodeKind::Rule, "backends[].weight", FIRST),
    (NodeKind::Rule, "timeout", FIRST),
    (NodeKind::Rule, "retries", FIRST),
    (NodeKind::Rule, "rate_limit", V0_3),
    (NodeKind::Rule, "rate_limit.per_second", V0_3),
    (NodeKind::Rule, "rate_limit.burst", V0_3),
    (NodeKind::Rule, "rate_limit.key", V0_3),
    (NodeKind::Rule, "per_try_timeout", V0_3),
    (NodeKind::Rule, "request_headers", V0_3),
    (NodeKind::Rule, "request_headers.set", V0_3),
    (NodeKind::Rule, "request_headers.add", V0_3),
    (NodeKind::Rule, "request_headers.remove", V0_3),
    (NodeKind::Rule, "response_headers", V0_3),
    (NodeKind::Rule, "response_headers.set", V0_3),
    (NodeKind::Rule, "response_headers.add", V0_3),
    (NodeKind::Rule, "response_headers.remove", V0_3),
    (NodeKind::Policy, "lb", FIRST),
    (NodeKind::Policy, "hash_on", FIRST),
    (NodeKind::Policy, "connect_timeout", FIRST),
    (NodeKind::Policy, "retries", FIRST),
    (NodeKind::Policy, "health_check", FIRST),
    (NodeKind::Policy, "health_check.kind", FIRST),
    (NodeKind::Policy, "health_check.path", FIRST),
    (NodeKind::Policy, "health_check.interval", FIRST),
    (NodeKind::Policy, "health_check.timeout", FIRST),
    (NodeKind::Policy, "health_check.healthy_threshold", FIRST),
    (NodeKind::Policy, "health_check.unhealthy_threshold", FIRST),
    (NodeKind::Policy, "health_check.initially_healthy", FIRST),
    (NodeKind::Policy, "outlier", FIRST),
    (NodeKind::Policy, "outlier.consecutive_failures", FIRST),
    (NodeKind::Policy, "outlier.base_ejection", FIRST),
    (NodeKind::Policy, "outlier.max_ejection", FIRST),
    (NodeKind::Policy, "outlier.max_ejection_percent", FIRST),
    (NodeKind::Policy, "panic_threshold_percent", FIRST),
    (NodeKind::Policy, "protect_from_empty", FIRST),
    (NodeKind::Policy, "tls", V0_3),
    (NodeKind::Policy, "tls.server_name", V0_3),
    (NodeKind::Policy, "circuit_breaker", V0_3),
    (NodeKind::Policy, "circuit_breaker.max_connections", V0_3),
    (NodeKind::Policy, "circuit_breaker.max_pending", V0_3),
    (NodeKind::Policy, "circuit_breaker.max_requests", V0_3),
    (NodeKind::Policy, "circuit_breaker.max_retries", V0_3),
    (NodeKind::Policy, "retry_budget", V0_3),
    (NodeKind::Policy, "retry_budget.percent", V0_3),
    (NodeKind::Policy, "retry_budget.min_per_second", V0_3),
    (NodeKind::Policy, "protocol", V0_3),
    (NodeKind::Policy, "health_check.service", V0_3),
    (NodeKind::Policy, "zone_aware", V0_3),
    (NodeKind::Policy, "zone_min_healthy_percent", V0_3),
];

/// Keys whose values are maps of free names (header names, metadata), not document keys.
const FREE_MAPS: &[(NodeKind, &str)] = &[
    (NodeKind::Rule, "match.headers"),
    (NodeKind::Rule, "backends[].subset"),
    (NodeKind::Rule, "request_headers.set"),
    (NodeKind::Rule, "request_headers.add"),
    (NodeKind::Rule, "response_headers.set"),
    (NodeKind::Rule, "response_headers.add"),
];

/// The oldest zkroute that accepts every key `doc` uses, and the key that needs it (None when
/// every key is from the first release).
pub fn required(kind: NodeKind, doc: &Value) -> (Version, Option<String>) {
    required_by(KEYS, kind, doc)
}

fn required_by(keys: &[(NodeKind, &str, Version)], kind: NodeKind, doc: &Value) -> (Version, Option<String>) {
    let mut need = (FIRST, None);
    walk(keys, kind, doc, &mut String::new(), &mut need);
    need
}

fn walk(
    keys: &[(NodeKind, &str, Version)],
    kind: NodeKind,
    value: &Value,
    path: &mut String,
    need: &mut (Version, Option<String>),
) {
    match value {
        Value::Object(map) => {
            if FREE_MAPS.contains(&(kind, path.as_str())) {
                return;
            }
            for (key, child) in map {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                let since = keys.iter().find(|(k, p, _)| *k == kind && p == path).map_or(FIRST, |(_, _, v)| *v);
                if since > need.0 {
                    *need = (since, Some(path.clone()));
                }
                walk(keys, kind, child, path, need);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            path.push_str("[]");
            for item in items {
                walk(keys, kind, item, path, need);
            }
            path.truncate(path.len() - 2);
        }
        _ => {}
    }
}

/// This build's version.
pub fn this_build() -> Version {
    let mut parts = env!("CARGO_PKG_VERSION").split('.').map(|p| p.parse::<u16>().unwrap_or(0));
    Version(parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::documents::{
        BackendDoc, CircuitBreakerDoc, HeaderEditsDoc, HealthCheckDoc, MatchDoc, OutlierDoc, PolicyDoc, RateLimitDoc,
        RetryBudgetDoc, RuleDoc,
    };

    /// The fields a document struct accepts, read from serde's refusal of an unknown one.
    fn fields<T: serde::de::DeserializeOwned + std::fmt::Debug>() -> Vec<String> {
        let err = serde_json::from_str::<T>(r#"{"zz_not_a_key": 1}"#).unwrap_err().to_string();
        // serde lists several fields as "one of `a`, `b`", two as "`a` or `b`".
        let list = err.split("expected ").nth(1).unwrap_or_else(|| panic!("unexpected error: {err}"));
        let list = list.strip_prefix("one of ").unwrap_or(list);
        let list = list.split(" at line").next().unwrap_or(list);
        list.split(", ").flat_map(|f| f.split(" or ")).map(|f| f.trim_matches('`').to_owned()).collect()
    }

    fn listed(kind: NodeKind, prefix: &str, fields: Vec<String>) -> Vec<String> {
        fields
            .into_iter()
            .map(|f| format!("{prefix}{f}"))
            .filter(|path| !KEYS.iter().any(|(k, p, _)| *k == kind && p == path))
            .collect()
    }

    #[test]
    fn every_document_key_has_a_version() {
        let mut missing = Vec::new();
        missing.extend(listed(NodeKind::Rule, "", fields::<RuleDoc>()));
        missing.extend(listed(NodeKind::Rule, "match.", fields::<MatchDoc>()));
        missing.extend(listed(NodeKind::Rule, "backends[].", fields::<BackendDoc>()));
        missing.extend(listed(NodeKind::Rule, "rate_limit.", fields::<RateLimitDoc>()));
        missing.extend(listed(NodeKind::Rule, "request_headers.", fields::<HeaderEditsDoc>()));
        missing.extend(listed(NodeKind::Rule, "response_headers.", fields::<HeaderEditsDoc>()));
        missing.extend(listed(NodeKind::Policy, "", fields::<PolicyDoc>()));
        missing.extend(listed(NodeKind::Policy, "health_check.", fields::<HealthCheckDoc>()));
        missing.extend(listed(NodeKind::Policy, "outlier.", fields::<OutlierDoc>()));
        missing.extend(listed(NodeKind::Policy, "circuit_breaker.", fields::<CircuitBreakerDoc>()));
        missing.extend(listed(NodeKind::Policy, "retry_budget.", fields::<RetryBudgetDoc>()));
        assert!(missing.is_empty(), "keys without an entry in KEYS: {missing:?}");
    }

    #[test]
    fn no_key_is_newer_than_this_build() {
        let newest = KEYS.iter().map(|(_, _, v)| *v).max().unwrap_or(FIRST);
        assert!(newest <= this_build(), "{newest} is newer than this build ({})", this_build());
    }

    #[test]
    fn a_document_needs_the_version_of_its_newest_key() {
        let doc = serde_json::json!({"listener": "http", "backends": [{"service": "a", "weight": 5}],
                                     "match": {"headers": {"x-anything": "1"}}});
        assert_eq!(required(NodeKind::Rule, &doc), (FIRST, None));
        // A key introduced later, nested in an array, is found and named; free maps are not keys.
        let newer = Version(FIRST.0, FIRST.1 + 1);
        let keys = [(NodeKind::Rule, "backends[].weight", newer), (NodeKind::Rule, "match.headers.x-anything", newer)];
        assert_eq!(required_by(&keys, NodeKind::Rule, &doc), (newer, Some("backends[].weight".to_owned())));
        assert_eq!(required_by(&keys, NodeKind::Policy, &doc), (FIRST, None));
    }

    #[test]
    fn the_readme_lists_every_key_with_its_version() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"));
        let section = readme.split("### Document keys by version").nth(1).expect("the README's key section");
        let rows: Vec<(String, String, String)> = section
            .lines()
            .skip_while(|l| !l.starts_with("| document"))
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
                (cells[0].to_owned(), cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
            })
            .collect();
        let expected: Vec<(String, String, String)> =
            KEYS.iter().map(|(k, p, v)| (k.as_str().to_owned(), (*p).to_owned(), v.to_string())).collect();
        assert_eq!(rows, expected, "the README's table and KEYS differ");
    }
}
