//! Tag routing as Dubbo's tag router does it (README: "Dubbo"): a request's `dubbo.tag` header
//! selects the instances with that tag; a tag that no instance serves falls back to the untagged
//! instances unless the application's tag rule says `force: true` (or the request says
//! `dubbo.force.tag: true`); a request without a tag goes only to untagged instances.
//!
//! An instance is tagged by its own `dubbo.tag` parameter or by its application's tag rule
//! (`<application>.tag-router`), which the Dubbo source turns into [`InstanceTags`]. Every choice
//! is made when the table is built: an endpoint set carries one set per tag, and a request only
//! looks its tag up.

use std::collections::BTreeSet;
use std::sync::Arc;

use http::HeaderName;
use serde::{Deserialize, Serialize};

use super::documents::HeaderLookup;
use super::table::{Endpoint, EndpointSet, TagSplit};

/// The request header that carries a request's tag (Dubbo's `dubbo.tag` attachment, which Triple
/// sends as a header).
pub const TAG_HEADER: HeaderName = HeaderName::from_static("dubbo.tag");

/// The request header that forbids falling back to untagged instances (`dubbo.force.tag`).
pub const FORCE_TAG_HEADER: HeaderName = HeaderName::from_static("dubbo.force.tag");

/// How one instance takes part in tag routing.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct InstanceTags {
    /// Its own tag: its `dubbo.tag` parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own: Option<Box<str>>,
    /// The tags its service's tag rule gives its address.
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub assigned: Box<[Box<str>]>,
    /// The tag rule in force for its service (the same for every instance of the service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<Arc<TagRule>>,
}

impl InstanceTags {
    /// Whether this takes part in routing at all: without a tag or a rule, nothing is split.
    pub fn matters(&self) -> bool {
        self.own.is_some() || self.rule.is_some()
    }
}

/// What routing needs of an application's tag rule.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TagRule {
    /// The application whose rule it is.
    pub application: Box<str>,
    /// A tag whose addresses serve nothing gets nothing, rather than the untagged instances.
    pub force: bool,
    /// Every tag the rule names.
    pub tags: Box<[RuleTag]>,
}

/// A tag of a rule.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RuleTag {
    pub name: Box<str>,
    /// The rule gives the tag addresses (or, for a tag defined by parameter matches, some
    /// instance of the service matched): requests with it are routed by the rule, not by the
    /// instances' own tags.
    pub addressed: bool,
}

impl TagRule {
    fn tag(&self, name: &str) -> Option<&RuleTag> {
        self.tags.iter().find(|t| &*t.name == name)
    }
}

impl EndpointSet {
    /// The set a request goes to: for a tag-routed set, the one its `dubbo.tag` header selects.
    #[inline(always)]
    pub fn for_request<'a>(self: &'a Arc<Self>, headers: &impl HeaderLookup) -> &'a Arc<EndpointSet> {
        match &self.tags {
            None => self,
            Some(split) => self.for_tag(split, headers),
        }
    }

    /// [`EndpointSet::for_request`] for a tag-routed set: kept out of line, so that the request
    /// path of every other set is one pointer test.
    #[inline(never)]
    fn for_tag<'a>(self: &'a Arc<Self>, split: &'a TagSplit, headers: &impl HeaderLookup) -> &'a Arc<EndpointSet> {
        let mut force = false;
        headers.for_each_value(&FORCE_TAG_HEADER, |v| {
            force = v.eq_ignore_ascii_case(b"true");
            true
        });
        let mut chosen = self;
        headers.for_each_value(&TAG_HEADER, |tag| {
            // Dubbo ignores an empty tag.
            if !tag.is_empty() {
                chosen = split.select(tag, force);
            }
            true
        });
        chosen
    }
}

/// Builds a tag-routed set over `members` (each endpoint with its instance's tags): the set for
/// requests without a tag, holding the sets for requests with one. `make` builds a plain set
/// from endpoints.
pub fn split(members: Vec<(Endpoint, &InstanceTags)>, make: impl Fn(Vec<Endpoint>) -> EndpointSet) -> EndpointSet {
    let rule = members.iter().find_map(|(_, t)| t.rule.clone());
    let rule = rule.as_deref();
    let in_any = |t: &InstanceTags| !t.assigned.is_empty();
    let select = |keep: &dyn Fn(&InstanceTags) -> bool| -> Vec<Endpoint> {
        members.iter().filter(|(_, t)| keep(t)).map(|(e, _)| e.clone()).collect()
    };
    // Without a tag: neither tagged by the rule nor by a tag the rule names.
    let untagged = select(&|t| {
        !in_any(t)
            && match (t.own.as_deref(), rule) {
                (None, _) => true,
                // With a rule, an own tag the rule does not name is no tag.
                (Some(own), Some(r)) => r.tag(own).is_none(),
                (Some(_), None) => false,
            }
    });
    let failover = Arc::new(make(select(&|t| !in_any(t) && t.own.is_none())));
    let mut names: BTreeSet<&str> = members.iter().filter_map(|(_, t)| t.own.as_deref()).collect();
    if let Some(r) = rule {
        names.extend(r.tags.iter().map(|t| &*t.name));
    }
    let mut by_tag = Vec::new();
    for name in names {
        let by_rule = rule.and_then(|r| r.tag(name)).filter(|t| t.addressed);
        let chosen = match by_rule {
            Some(_) => select(&|t| t.assigned.iter().any(|a| &**a == name)),
            None => select(&|t| t.own.as_deref() == Some(name)),
        };
        let forced = by_rule.is_some() && rule.is_some_and(|r| r.force);
        if !chosen.is_empty() || forced {
            by_tag.push((Box::from(name), Arc::new(make(chosen))));
        }
    }
    let mut set = make(untagged);
    set.tags =
        Some(Box::new(TagSplit { by_tag: by_tag.into_boxed_slice(), failover, none: Arc::new(make(Vec::new())) }));
    set
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;
    use crate::endpoint::StateRegistry;
    use crate::routing::table::ServicePolicy;
    use crate::routing::{Addr, EndpointKey, LbPolicy, ServiceName};

    fn policy() -> Arc<ServicePolicy> {
        Arc::new(ServicePolicy {
            lb: LbPolicy::RoundRobin,
            connect_timeout: std::time::Duration::from_secs(1),
            retries: 0,
            health_check: None,
            outlier: None,
            panic_threshold_percent: 0,
            protect_from_empty: false,
            tls: None,
            circuit_breaker: None,
            retry_budget: None,
            protocol: None,
            zone: None,
            zone_min_healthy_percent: 70,
        })
    }

    fn tags(own: Option<&str>, assigned: &[&str], rule: Option<&Arc<TagRule>>) -> InstanceTags {
        InstanceTags {
            own: own.map(Box::from),
            assigned: assigned.iter().map(|a| Box::from(*a)).collect(),
            rule: rule.cloned(),
        }
    }

    /// A split over instances named by their port, and the ports a request with `tag` (and
    /// `force`) reaches.
    fn routed(members: &[(u16, InstanceTags)]) -> impl Fn(Option<&str>, bool) -> Vec<u16> + use<> {
        let states = StateRegistry::new(std::time::Duration::from_secs(1));
        let service = ServiceName::new("s");
        let list = members
            .iter()
            .map(|(port, t)| {
                let addr: Addr = format!("10.0.0.1:{port}").parse().unwrap();
                let state = states.get(&EndpointKey { service: Some(service.clone()), addr: addr.clone() });
                (
                    Endpoint {
                        addr,
                        weight: 100,
                        draining: false,
                        protocol: None,
                        state,
                        tls_port: None,
                        zone: Default::default(),
                    },
                    t,
                )
            })
            .collect();
        let set = Arc::new(split(list, |e| EndpointSet::build(Some(service.clone()), Arc::from("s"), policy(), e)));
        move |tag, force| {
            let mut h = HeaderMap::new();
            if let Some(tag) = tag {
                h.insert(TAG_HEADER, HeaderValue::from_str(tag).unwrap());
            }
            if force {
                h.insert(FORCE_TAG_HEADER, HeaderValue::from_static("true"));
            }
            set.for_request(&h).endpoints.iter().map(|e| e.addr.port).collect()
        }
    }

    #[test]
    fn own_tags_without_a_rule() {
        let r = routed(&[(1, tags(None, &[], None)), (2, tags(Some("gray"), &[], None))]);
        assert_eq!(r(None, false), [1], "no tag: untagged only");
        assert_eq!(r(Some(""), false), [1], "an empty tag is no tag");
        assert_eq!(r(Some("gray"), false), [2]);
        assert_eq!(r(Some("blue"), false), [1], "nothing tagged blue: the untagged ones");
        assert_eq!(r(Some("blue"), true), Vec::<u16>::new(), "unless the request forces its tag");
    }

    #[test]
    fn a_rule_tags_addresses_and_may_force() {
        let rule = |force| {
            Arc::new(TagRule {
                application: "app".into(),
                force,
                tags: vec![
                    RuleTag { name: "gray".into(), addressed: true },
                    RuleTag { name: "empty".into(), addressed: true },
                    RuleTag { name: "named".into(), addressed: false },
                ]
                .into(),
            })
        };
        for force in [false, true] {
            let rule = rule(force);
            let r = routed(&[
                (1, tags(None, &[], Some(&rule))),
                (2, tags(None, &["gray"], Some(&rule))),
                (3, tags(Some("named"), &[], Some(&rule))),
                (4, tags(Some("own"), &[], Some(&rule))),
            ]);
            assert_eq!(r(Some("gray"), false), [2], "the rule's addresses");
            // A tag the rule names but whose addresses serve nothing: nothing if forced.
            let expect_empty: &[u16] = if force { &[] } else { &[1] };
            assert_eq!(r(Some("empty"), false), expect_empty, "force {force}");
            // A tag without addresses in the rule: the instances' own tags decide.
            assert_eq!(r(Some("named"), false), [3]);
            assert_eq!(r(Some("own"), false), [4]);
            assert_eq!(r(Some("other"), false), [1], "failover: neither in the rule nor tagged");
            // No tag: not in the rule's addresses, and no own tag the rule names (an own tag it
            // does not name is still taken, as Dubbo does).
            assert_eq!(r(None, false), [1, 4]);
        }
    }

    #[test]
    fn a_service_of_tagged_instances_only_serves_no_untagged_request() {
        let r = routed(&[(1, tags(Some("a"), &[], None))]);
        assert_eq!(r(None, false), Vec::<u16>::new(), "only tagged instances: untagged requests get none");
    }
}
