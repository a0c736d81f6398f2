//! How a listener's routes are indexed for lookup. Each route is filed under its most selective
//! condition: exact host, host suffix, a header value, a path prefix (in a byte trie), the method,
//! or nowhere (matches any request). A lookup visits only the lists whose condition the request
//! meets, and in each list stops at the first route that matches in full or that comes after the
//! best found so far; so a thousand rules cost a few hash probes, not a thousand comparisons.

use std::collections::HashMap;

use http::{HeaderName, Method};

use super::documents::{HeaderLookup, HostMatch, Matcher};

/// Longest Host header (without port) that host rules can match.
const MAX_HOST: usize = 255;

/// Routes by the value of one header.
type ByValue<L> = HashMap<Box<[u8]>, L>;
/// Route lists per indexed header name.
type ByHeader = Box<[(HeaderName, ByValue<Box<[u32]>>)]>;

/// The index of one listener's routes (numbered in match order).
#[derive(Default)]
pub struct RouteIndex {
    exact: HashMap<Box<str>, Box<[u32]>>,
    subdomain: HashMap<Box<str>, Box<[u32]>>,
    by_header: ByHeader,
    by_path: PrefixTrie,
    by_method: Box<[(Method, Box<[u32]>)]>,
    anything: Box<[u32]>,
}

impl RouteIndex {
    /// Indexes routes given in match order by their matchers (None matches everything).
    pub fn new<'a>(matchers: impl Iterator<Item = Option<&'a Matcher>>) -> Self {
        let mut exact: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut subdomain: HashMap<Box<str>, Vec<u32>> = HashMap::new();
        let mut by_header: Vec<(HeaderName, ByValue<Vec<u32>>)> = Vec::new();
        let mut by_path = PrefixTrie::default();
        let mut by_method: Vec<(Method, Vec<u32>)> = Vec::new();
        let mut anything = Vec::new();
        for (i, m) in matchers.enumerate() {
            let i = i as u32;
            let Some(m) = m else {
                anything.push(i);
                continue;
            };
            if let Some(host) = &m.host {
                match host {
                    HostMatch::Exact(h) => exact.entry(h.clone()).or_default().push(i),
                    HostMatch::Subdomain(h) => subdomain.entry(h.clone()).or_default().push(i),
                }
            } else if let Some((name, value)) = m.headers.first() {
                let pos = match by_header.iter().position(|(n, _)| n == name) {
                    Some(p) => p,
                    None => {
                        by_header.push((name.clone(), HashMap::new()));
                        by_header.len() - 1
                    }
                };
                by_header[pos].1.entry(value.as_bytes().into()).or_default().push(i);
            } else if let Some(prefix) = &m.path_prefix {
                by_path.insert(prefix.as_bytes(), i);
            } else if let Some(method) = &m.method {
                match by_method.iter_mut().find(|(m, _)| m == method) {
                    Some((_, list)) => list.push(i),
                    None => by_method.push((method.clone(), vec![i])),
                }
            } else {
                anything.push(i);
            }
        }
        let freeze = |m: HashMap<Box<str>, Vec<u32>>| m.into_iter().map(|(k, v)| (k, v.into_boxed_slice())).collect();
        RouteIndex {
            exact: freeze(exact),
            subdomain: freeze(subdomain),
            by_header: by_header
                .into_iter()
                .map(|(n, m)| (n, m.into_iter().map(|(k, v)| (k, v.into_boxed_slice())).collect()))
                .collect(),
            by_path: by_path.freeze(),
            by_method: by_method.into_iter().map(|(m, v)| (m, v.into_boxed_slice())).collect(),
            anything: anything.into_boxed_slice(),
        }
    }

    /// The first route in match order for which `matches(i)` holds, among those whose indexed
    /// condition the request meets. `matches` checks everything but the host, which is read
    /// (as text) only when some route is indexed by host.
    #[inline]
    pub fn lookup(
        &self,
        host: Option<&[u8]>,
        path: &str,
        method: &Method,
        headers: &impl HeaderLookup,
        matches: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let mut best = u32::MAX;
        let mut check = |list: &[u32]| {
            for &i in list {
                if i >= best {
                    return;
                }
                if matches(i) {
                    best = i;
                    return;
                }
            }
        };
        if !self.exact.is_empty() || !self.subdomain.is_empty() {
            let mut buf = [0u8; MAX_HOST];
            let host = host.and_then(|h| std::str::from_utf8(h).ok());
            if let Some(host) = host.and_then(|h| normalize_host(h, &mut buf)) {
                if let Some(list) = self.exact.get(host) {
                    check(list);
                }
                if !self.subdomain.is_empty() {
                    let mut rest = host;
                    while let Some(dot) = rest.find('.') {
                        rest = &rest[dot + 1..];
                        if let Some(list) = self.subdomain.get(rest) {
                            check(list);
                        }
                    }
                }
            }
        }
        for (name, values) in self.by_header.iter() {
            headers.for_each_value(name, |v| {
                if let Some(list) = values.get(v) {
                    check(list);
                }
                false
            });
        }
        self.by_path.for_each_prefix(path.as_bytes(), |list| check(list));
        for (m, list) in self.by_method.iter() {
            if m == method {
                check(list);
            }
        }
        check(&self.anything);
        (best != u32::MAX).then_some(best)
    }
}

/// A byte trie of path prefixes; each node lists the routes whose prefix ends there.
#[derive(Default)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    /// Sorted by byte.
    edges: Vec<(u8, u32)>,
    routes: Vec<u32>,
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &[u8], route: u32) {
        if self.nodes.is_empty() {
            self.nodes.push(TrieNode::default());
        }
        let mut node = 0usize;
        for &b in prefix {
            node = match self.nodes[node].edges.binary_search_by_key(&b, |e| e.0) {
                Ok(i) => self.nodes[node].edges[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].edges.insert(i, (b, next as u32));
                    next
                }
            };
        }
        self.nodes[node].routes.push(route);
    }

    fn freeze(mut self) -> Self {
        for n in &mut self.nodes {
            n.edges.shrink_to_fit();
            n.routes.shrink_to_fit();
        }
        self
    }

    /// Calls `f` with the routes of every prefix of `path`, shortest first.
    #[inline]
    fn for_each_prefix(&self, path: &[u8], mut f: impl FnMut(&[u32])) {
        let Some(root) = self.nodes.first() else { return };
        if !root.routes.is_empty() {
            f(&root.routes);
        }
        let mut node = root;
        for &b in path {
            match node.edges.binary_search_by_key(&b, |e| e.0) {
                Ok(i) => node = &self.nodes[node.edges[i].1 as usize],
                Err(_) => return,
            }
            if !node.routes.is_empty() {
                f(&node.routes);
            }
        }
    }
}

/// The host without port or trailing dot, in lower case: borrowed when it already is, else
/// lowered into `buf`. None when it cannot match any host rule.
pub(super) fn normalize_host<'a>(host: &'a str, buf: &'a mut [u8; MAX_HOST]) -> Option<&'a str> {
    let host = if let Some(rest) = host.strip_prefix('[') {
        &host[..rest.find(']')? + 2]
    } else {
        match host.rfind(':') {
            Some(i) if host[i + 1..].bytes().all(|b| b.is_ascii_digit()) => &host[..i],
            _ => host,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > MAX_HOST {
        return None;
    }
    if !host.bytes().any(|b| b.is_ascii_uppercase()) {
        return Some(host);
    }
    let out = &mut buf[..host.len()];
    for (o, b) in out.iter_mut().zip(host.bytes()) {
        *o = b.to_ascii_lowercase();
    }
    std::str::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalised_without_allocating() {
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(normalize_host("Users.Internal:8080", &mut buf), Some("users.internal"));
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(normalize_host("users.internal.", &mut buf), Some("users.internal"));
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(normalize_host("[::1]:80", &mut buf), Some("[::1]"));
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(normalize_host("", &mut buf), None);
        let long = "a".repeat(300);
        let mut buf = [0u8; MAX_HOST];
        assert_eq!(normalize_host(&long, &mut buf), None);
    }

    #[test]
    fn the_trie_reports_every_prefix_of_a_path() {
        let mut t = PrefixTrie::default();
        for (i, p) in ["/", "/api", "/api/", "/apix", "/b"].iter().enumerate() {
            t.insert(p.as_bytes(), i as u32);
        }
        let mut seen = Vec::new();
        t.for_each_prefix(b"/api/v1", |l| seen.extend_from_slice(l));
        assert_eq!(seen, [0, 1, 2]);
        seen.clear();
        t.for_each_prefix(b"/c", |l| seen.extend_from_slice(l));
        assert_eq!(seen, [0]);
    }
}
