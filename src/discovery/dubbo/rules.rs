//! Dubbo governance as its consumers apply it to provider URLs (README: "Dubbo"): configurators
//! (override URLs under `<service>/configurators`, and the YAML documents dubbo-admin writes at
//! `config/dubbo/<key>.configurators`) and tag rules (`config/dubbo/<application>.tag-router`).
//! Dubbo's YAML documents are foreign: keys zkroute does not use are ignored, as Dubbo ignores
//! them, but a feature that would change the result and that zkroute does not implement
//! (`match` conditions of configurators, `regex` tag matches) makes the document invalid.

use std::net::IpAddr;

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::url::{DubboUrl, Params, param};

/// The host of an override for every provider.
const ANYHOST: &str = "0.0.0.0";

/// Parameters of an override that select what it applies to and are not applied themselves.
const CONDITION_KEYS: &[&str] = &[
    "category",
    "check",
    "dynamic",
    "enabled",
    "group",
    "version",
    "application",
    "side",
    "configVersion",
    "compatible_config",
    "interfaces",
];

/// A configurator: parameters to set on the provider URLs it matches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Override {
    /// `absent://`: sets only parameters the provider does not have.
    absent: bool,
    host: String,
    port: u16,
    /// Every parameter, conditions included.
    params: Params,
    /// `[group/]interface[:version]`, or `*`.
    service_key: String,
}

/// A provider as configurators see it.
pub struct Target<'a> {
    pub host: &'a str,
    pub port: u16,
    /// The interface (its `interface` parameter, its path, or the service directory's name).
    pub interface: &'a str,
}

impl Override {
    /// From an override URL; None for one that changes nothing (`empty://`, or no parameter).
    pub fn from_url(url: DubboUrl) -> Result<Option<Override>, String> {
        let absent = match url.scheme.as_str() {
            "override" => false,
            "absent" => true,
            "empty" => return Ok(None),
            other => return Err(format!("{other}:// is not a configurator (override:// or absent://)")),
        };
        let mut effective = url.params.clone();
        effective.remove("anyhost");
        if effective.is_empty() {
            return Ok(None);
        }
        let interface = url.param("interface").map(str::to_owned).unwrap_or_else(|| url.path.clone());
        let service_key = service_key(&interface, url.param("group"), url.param("version"));
        let host = if url.host.is_empty() { ANYHOST.to_owned() } else { url.host };
        Ok(Some(Override { absent, host, port: url.port, params: url.params, service_key }))
    }

    /// The order Dubbo applies configurators in (later ones win): by host, then `priority`.
    pub fn order_key(&self) -> (&str, i64) {
        (&self.host, self.params.get("priority").and_then(|p| p.parse().ok()).unwrap_or(0))
    }

    /// Applies this configurator to a provider's parameters, if it matches the provider.
    pub fn apply(&self, target: &Target<'_>, params: &mut Params) {
        if self.params.get("enabled").is_some_and(|e| !e.is_empty() && !e.eq_ignore_ascii_case("true")) {
            return;
        }
        let v27 = self.params.get("configVersion").is_some_and(|v| !v.is_empty());
        let matches = if v27 {
            // Rules written for consumers are not applied to providers.
            self.params.get("side").is_none_or(|s| s == "provider") && self.host_matches(target.host)
        } else if self.port != 0 {
            self.port == target.port && self.host_matches(target.host)
        } else {
            // Without a port, an override is for every provider (0.0.0.0) or for one consumer.
            self.host == ANYHOST
        };
        if !matches || !self.conditions_hold(target, params, v27) {
            return;
        }
        for (k, v) in &self.params {
            if k.starts_with('~') || CONDITION_KEYS.contains(&k.as_str()) {
                continue;
            }
            if self.absent {
                params.entry(k.clone()).or_insert_with(|| v.clone());
            } else {
                params.insert(k.clone(), v.clone());
            }
        }
    }

    fn host_matches(&self, host: &str) -> bool {
        self.host == ANYHOST || self.host == host
    }

    fn conditions_hold(&self, target: &Target<'_>, params: &Params, v27: bool) -> bool {
        if let Some(list) = self.params.get("providerAddresses").filter(|l| !l.is_empty()) {
            let address = format!("{}:{}", target.host, target.port);
            let any_port = format!("{ANYHOST}:{}", target.port);
            let ok = list
                .split(',')
                .map(str::trim)
                .any(|a| a == address || a == ANYHOST || a == "0.0.0.0:*" || a == any_port || a == target.host);
            if !ok {
                return false;
            }
        }
        if let Some(app) = self.params.get("application").filter(|a| !a.is_empty() && *a != "*") {
            if param(params, "application") != Some(app.as_str()) {
                return false;
            }
        }
        if self.service_key != "*" {
            let current = service_key(target.interface, param(params, "group"), param(params, "version"));
            if self.service_key != current {
                return false;
            }
        }
        if v27 {
            return true;
        }
        // Before 2.7: `~key` conditions, and `application` and `side` must match the provider.
        self.params.iter().all(|(k, v)| {
            let key = match k.strip_prefix('~') {
                Some(key) => key,
                None if k == "application" || k == "side" => k.as_str(),
                None => return true,
            };
            let current = match key {
                "side" => Some(param(params, "side").unwrap_or("provider")),
                _ => param(params, key),
            };
            v == "*" || Some(v.as_str()) == current
        })
    }
}

/// `[group/]interface[:version]`, as Dubbo keys services.
fn service_key(interface: &str, group: Option<&str>, version: Option<&str>) -> String {
    let mut key = String::new();
    if let Some(g) = group {
        key.push_str(g);
        key.push('/');
    }
    key.push_str(interface);
    if let Some(v) = version {
        key.push(':');
        key.push_str(v);
    }
    key
}

/// A dubbo-admin configurator document: configurators for one service, or (`scope:
/// application`) for every service of one application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Configurators {
    pub overrides: Vec<Override>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDoc {
    config_version: Option<String>,
    scope: Option<String>,
    key: Option<String>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    configs: Vec<ConfigItem>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigItem {
    #[serde(rename = "type")]
    kind: Option<String>,
    enabled: Option<bool>,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    provider_addresses: Vec<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    applications: Vec<String>,
    #[serde(default)]
    parameters: std::collections::BTreeMap<String, Value>,
    side: Option<String>,
    #[serde(rename = "match")]
    match_: Option<Value>,
}

fn yes() -> bool {
    true
}

impl Configurators {
    /// Parses a `*.configurators` node: dubbo-admin's YAML, or a JSON list of override URLs.
    pub fn parse(data: &[u8]) -> Result<Configurators, String> {
        let text = std::str::from_utf8(data).map_err(|_| "not UTF-8".to_owned())?;
        if let Ok(urls) = serde_json::from_str::<Vec<String>>(text) {
            let mut overrides = Vec::new();
            for (i, u) in urls.iter().enumerate() {
                let url = DubboUrl::parse(u).map_err(|e| format!("[{i}]: {e}"))?;
                overrides.extend(Override::from_url(url).map_err(|e| format!("[{i}]: {e}"))?);
            }
            return Ok(Configurators { overrides });
        }
        let doc: ConfigDoc = serde_yaml_ng::from_str(text).map_err(|e| format!("not a configurator document: {e}"))?;
        let key = doc.key.filter(|k| !k.trim().is_empty()).ok_or("key: missing")?;
        let version = doc.config_version.unwrap_or_default();
        let app_scope = doc.scope.as_deref() == Some("application");
        let mut overrides = Vec::new();
        for (i, item) in doc.configs.into_iter().enumerate() {
            let field = |f: &str| format!("configs[{i}].{f}");
            if item.match_.is_some() {
                return Err(format!("{}: match conditions are not supported by zkroute", field("match")));
            }
            if item.parameters.is_empty() {
                return Err(format!("{}: at least one parameter to change is needed", field("parameters")));
            }
            let mut params = Params::new();
            for (k, v) in &item.parameters {
                params.insert(
                    k.clone(),
                    scalar(v).ok_or_else(|| format!("{}: not a scalar", field(&format!("parameters.{k}"))))?,
                );
            }
            params.insert(
                "category".into(),
                if app_scope { "appdynamicconfigurators" } else { "dynamicconfigurators" }.into(),
            );
            if let Some(side) = &item.side {
                params.insert("side".into(), side.clone());
            }
            let addresses = if item.addresses.is_empty() { vec![ANYHOST.to_owned()] } else { item.addresses.clone() };
            if !item.provider_addresses.is_empty() {
                params.insert("providerAddresses".into(), item.provider_addresses.join(","));
            } else if item.side.as_deref() == Some("provider") {
                params.insert("providerAddresses".into(), addresses.join(","));
            }
            let enabled = match item.kind.as_deref() {
                None | Some("general") => doc.enabled,
                _ => item.enabled.unwrap_or(true),
            };
            params.insert("enabled".into(), enabled.to_string());
            params.insert("configVersion".into(), version.clone());
            // One configurator per address, and per service (application scope) or per
            // application (service scope).
            let (services, apps): (Vec<String>, Vec<Option<String>>) = if app_scope {
                let services = if item.services.is_empty() { vec!["*".to_owned()] } else { item.services.clone() };
                (services, vec![Some(key.clone())])
            } else {
                let apps = if item.applications.is_empty() {
                    vec![None]
                } else {
                    item.applications.iter().cloned().map(Some).collect()
                };
                (vec![key.clone()], apps)
            };
            for address in &addresses {
                let (host, port) = host_port(address).map_err(|e| format!("{}: {e}", field("addresses")))?;
                for service in &services {
                    for app in &apps {
                        let mut p = params.clone();
                        if let Some(app) = app {
                            p.insert("application".into(), app.clone());
                        }
                        let (interface, group, version) = split_service_key(service);
                        let service_key =
                            if interface == "*" { "*".to_owned() } else { service_key(interface, group, version) };
                        overrides.push(Override { absent: false, host: host.clone(), port, params: p, service_key });
                    }
                }
            }
        }
        Ok(Configurators { overrides })
    }

    /// Whether it applies per application.
    pub fn application_scope(&self) -> bool {
        self.overrides.iter().any(|o| o.params.get("category").is_some_and(|c| c == "appdynamicconfigurators"))
    }
}

/// `group/interface:version` into its parts.
fn split_service_key(key: &str) -> (&str, Option<&str>, Option<&str>) {
    let (group, rest) = match key.split_once('/') {
        Some((g, r)) if !g.is_empty() => (Some(g), r),
        _ => (None, key),
    };
    match rest.split_once(':') {
        Some((i, v)) if !i.is_empty() => (i, group, Some(v)),
        _ => (rest, group, None),
    }
}

fn host_port(address: &str) -> Result<(String, u16), String> {
    let url = DubboUrl::parse(&format!("x://{}", address.trim()))?;
    Ok((url.host, url.port))
}

/// A YAML scalar as Dubbo reads it into a URL parameter.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An application's tag rule (`<application>.tag-router`), as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagRuleDoc {
    pub force: bool,
    pub enabled: bool,
    pub tags: Vec<TagDef>,
    /// `configVersion` v3.0: tags may select instances by parameter matches.
    v3: bool,
}

/// One tag of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagDef {
    pub name: String,
    addresses: Vec<AddressPattern>,
    matches: Vec<(String, StringMatch)>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TagRuleYaml {
    config_version: Option<String>,
    #[serde(default)]
    force: bool,
    #[serde(default = "yes")]
    enabled: bool,
    tags: Option<Vec<TagYaml>>,
}

#[derive(Deserialize)]
struct TagYaml {
    name: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default, rename = "match")]
    matches: Vec<ParamMatchYaml>,
}

#[derive(Deserialize)]
struct ParamMatchYaml {
    key: String,
    value: StringMatchYaml,
}

#[derive(Deserialize)]
struct StringMatchYaml {
    exact: Option<String>,
    prefix: Option<String>,
    regex: Option<String>,
    noempty: Option<String>,
    empty: Option<String>,
    wildcard: Option<String>,
}

/// A parameter match of a v3.0 tag.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StringMatch {
    Exact(String),
    Prefix(String),
    Wildcard(String),
    Empty,
    NotEmpty,
}

impl StringMatch {
    fn matches(&self, input: Option<&str>) -> bool {
        match (self, input) {
            (StringMatch::Exact(e), Some(i)) => i == e,
            (StringMatch::Prefix(p), Some(i)) => i.starts_with(p.as_str()),
            (StringMatch::Wildcard(w), Some(i)) => w == "*" || w == i,
            (StringMatch::Empty, i) => i.is_none_or(str::is_empty),
            (StringMatch::NotEmpty, Some(i)) => !i.is_empty(),
            _ => false,
        }
    }
}

impl TagRuleDoc {
    pub fn parse(data: &[u8]) -> Result<TagRuleDoc, String> {
        let text = std::str::from_utf8(data).map_err(|_| "not UTF-8".to_owned())?;
        let doc: TagRuleYaml = serde_yaml_ng::from_str(text).map_err(|e| format!("not a tag rule: {e}"))?;
        let v3 = doc.config_version.as_deref().is_some_and(|v| v.starts_with("v3.0"));
        let tags = doc.tags.ok_or("tags: missing")?;
        let mut out = Vec::new();
        for (i, t) in tags.into_iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(format!("tags[{i}].name: empty"));
            }
            let addresses = t
                .addresses
                .iter()
                .map(|a| AddressPattern::parse(a).map_err(|e| format!("tags[{i}].addresses: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            let mut matches = Vec::new();
            for (j, m) in t.matches.into_iter().enumerate() {
                let v = m.value;
                let sm = if let Some(e) = v.exact {
                    StringMatch::Exact(e)
                } else if let Some(p) = v.prefix {
                    StringMatch::Prefix(p)
                } else if v.regex.is_some() {
                    return Err(format!(
                        "tags[{i}].match[{j}].value.regex: regex matches are not supported by zkroute"
                    ));
                } else if let Some(w) = v.wildcard {
                    StringMatch::Wildcard(w)
                } else if v.empty.is_some() {
                    StringMatch::Empty
                } else if v.noempty.is_some() {
                    StringMatch::NotEmpty
                } else {
                    return Err(format!("tags[{i}].match[{j}].value: no condition"));
                };
                matches.push((m.key, sm));
            }
            out.push(TagDef { name: t.name, addresses, matches });
        }
        Ok(TagRuleDoc { force: doc.force, enabled: doc.enabled, tags: out, v3 })
    }

    /// Whether `tag` selects by parameter matches (v3.0, without addresses).
    pub fn by_match(&self, tag: &TagDef) -> bool {
        self.v3 && tag.addresses.is_empty() && !tag.matches.is_empty()
    }
}

impl TagDef {
    /// Whether the tag lists addresses.
    pub fn has_addresses(&self) -> bool {
        !self.addresses.is_empty()
    }

    /// Whether one of the tag's addresses is `host:port`.
    pub fn address_matches(&self, host: &str, port: u16) -> bool {
        self.addresses.iter().any(|a| a.matches(host, port))
    }

    /// Whether every parameter match holds for a provider's parameters (as registered).
    pub fn params_match(&self, params: &Params) -> bool {
        self.matches.iter().all(|(k, m)| m.matches(params.get(k).map(String::as_str)))
    }
}

/// A tag rule address, as Dubbo's `NetUtils.matchIpExpression` reads it: `host`, `host:port`,
/// `0.0.0.0:port`, IPv4 with `*` or `a-b` per octet, or a CIDR block.
#[derive(Clone, Debug, PartialEq, Eq)]
enum AddressPattern {
    Cidr(IpAddr, u8),
    Host { octets: Option<Vec<(u8, u8)>>, literal: String, port: Option<u16> },
}

impl AddressPattern {
    fn parse(text: &str) -> Result<AddressPattern, String> {
        let text = text.trim();
        if let Some((ip, bits)) = text.split_once('/') {
            let ip: IpAddr = ip.parse().map_err(|_| format!("{text:?}: {ip:?} is not an IP address"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let bits: u8 =
                bits.parse().ok().filter(|b| *b <= max).ok_or_else(|| format!("{text:?}: bad prefix length"))?;
            return Ok(AddressPattern::Cidr(ip, bits));
        }
        let (host, port) = host_port(text).map_err(|e| format!("{text:?}: {e}"))?;
        let port = (port != 0).then_some(port);
        let octets = if host.split('.').count() == 4 && host.bytes().any(|b| b == b'*' || b == b'-') {
            let ranges = host
                .split('.')
                .map(|o| match o {
                    "*" => Some((0, 255)),
                    o => match o.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => o.parse().ok().map(|n| (n, n)),
                    },
                })
                .collect::<Option<Vec<(u8, u8)>>>()
                .ok_or_else(|| format!("{text:?} is not an address pattern"))?;
            Some(ranges)
        } else {
            None
        };
        Ok(AddressPattern::Host { octets, literal: host, port })
    }

    fn matches(&self, host: &str, port: u16) -> bool {
        match self {
            AddressPattern::Cidr(net, bits) => match (host.parse::<IpAddr>(), net) {
                (Ok(IpAddr::V4(h)), IpAddr::V4(n)) => {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*bits)).unwrap_or(0);
                    u32::from(h) & mask == u32::from(*n) & mask
                }
                (Ok(IpAddr::V6(h)), IpAddr::V6(n)) => {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*bits)).unwrap_or(0);
                    u128::from(h) & mask == u128::from(*n) & mask
                }
                _ => false,
            },
            AddressPattern::Host { octets, literal, port: want } => {
                if want.is_some_and(|p| p != port) {
                    return false;
                }
                if literal == ANYHOST && want.is_some() {
                    return true;
                }
                match octets {
                    None => literal == host,
                    Some(ranges) => {
                        let parts: Vec<Option<u8>> = host.split('.').map(|o| o.parse().ok()).collect();
                        parts.len() == 4
                            && parts.iter().zip(ranges).all(|(o, (lo, hi))| o.is_some_and(|o| (*lo..=*hi).contains(&o)))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
