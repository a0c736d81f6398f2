//! Instance documents in every format of the README's "Instance documents", detected per node:
//! Curator x-discovery (also Spring Cloud Zookeeper and Dubbo 3), Finagle ServerSet, SmartStack
//! Nerve, and plain `host:port` / `ip=host:port`. Unknown fields are ignored; anything malformed
//! is an error that names the field.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::routing::documents::DocError;
use crate::routing::{Addr, DEFAULT_WEIGHT, Format, Instance, InstanceProtocol, Labels, MAX_WEIGHT, port_from_i64};

/// Parses an instance node's data, whatever format it is in.
pub fn parse_instance(data: &[u8]) -> Result<Instance, DocError> {
    let text = std::str::from_utf8(data).map_err(|_| DocError::new("", "not UTF-8"))?.trim();
    if text.is_empty() {
        return Err(DocError::new("", "empty node: expected an instance document"));
    }
    if text.starts_with('{') {
        let value: Value = serde_json::from_str(text).map_err(|e| DocError::new("", format!("not valid JSON: {e}")))?;
        let Value::Object(doc) = value else { unreachable!("a JSON text starting with '{{' is an object") };
        return if doc.contains_key("serviceEndpoint") {
            serverset(&doc)
        } else if doc.contains_key("address") {
            curator(&doc)
        } else if doc.contains_key("host") {
            nerve(&doc)
        } else {
            Err(DocError::new(
                "",
                "JSON object is not a Curator (address), ServerSet (serviceEndpoint) or Nerve (host) document",
            ))
        };
    }
    plain(text)
}

/// Checks an instance that did not come through [`parse_instance`] (a snapshot's) as that would.
pub fn validate(i: &Instance) -> Result<(), DocError> {
    if i.weight > MAX_WEIGHT {
        return Err(DocError::new("weight", format!("{} is above {MAX_WEIGHT}", i.weight)));
    }
    for addr in std::iter::once(&i.addr).chain(i.named.values()) {
        addr.to_string().parse::<Addr>().map_err(|e| DocError::new("address", e.to_string()))?;
    }
    Ok(())
}

fn plain(text: &str) -> Result<Instance, DocError> {
    let addr_text = text.strip_prefix("ip=").unwrap_or(text);
    let addr = addr_text.parse::<Addr>().map_err(|e| DocError::new("", format!("plain instance: {e}")))?;
    Ok(Instance::at(Format::Plain, addr))
}

fn curator(doc: &Map<String, Value>) -> Result<Instance, DocError> {
    let address = str_field(doc, "address")?;
    let port = match doc.get("port") {
        Some(Value::Null) | None => {
            return Err(if doc.get("sslPort").is_some_and(|v| !v.is_null()) {
                DocError::new("port", "null (only sslPort is set; zkroute forwards plain TCP)")
            } else {
                DocError::new("port", "missing")
            });
        }
        Some(v) => port(v, "port")?,
    };
    let addr = Addr::from_parts(address, port).map_err(|e| DocError::new("address", e.to_string()))?;
    let enabled = match doc.get("enabled") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(DocError::new("enabled", "must be true or false")),
    };
    let (weight, zone, metadata) = match doc.get("payload") {
        None | Some(Value::Null) => (DEFAULT_WEIGHT, None, Labels::default()),
        Some(Value::Object(payload)) => {
            let metadata = string_map(payload.get("metadata"), "payload.metadata")?;
            // Spring Cloud Zookeeper writes the zone into the metadata.
            let zone = match opt_str(payload.get("zone"), "payload.zone")? {
                Some(z) => Some(z),
                None => metadata.get("zone").map(str::to_owned),
            };
            (weight(payload.get("weight"), "payload.weight")?, zone, metadata)
        }
        // Curator's default serializer allows any payload; only an object carries attributes.
        Some(_) => (DEFAULT_WEIGHT, None, Labels::default()),
    };
    let ssl_port = match doc.get("sslPort") {
        None | Some(Value::Null) => None,
        Some(v) => Some(self::port(v, "sslPort")?),
    };
    // An instance may say it speaks HTTP/2 (README: "gRPC and HTTP/2 upstreams"); any other
    // value is left to the service policy.
    let protocol =
        metadata.get("protocol").and_then(InstanceProtocol::parse_upstream).filter(|p| *p == InstanceProtocol::H2);
    Ok(Instance { weight, zone, metadata, enabled, ssl_port, protocol, ..Instance::at(Format::Curator, addr) })
}

fn serverset(doc: &Map<String, Value>) -> Result<Instance, DocError> {
    let addr = endpoint(doc.get("serviceEndpoint"), "serviceEndpoint")?;
    let mut named = BTreeMap::new();
    match doc.get("additionalEndpoints") {
        None | Some(Value::Null) => {}
        Some(Value::Object(extra)) => {
            for (name, ep) in extra {
                named.insert(name.clone(), endpoint(Some(ep), &format!("additionalEndpoints.{name}"))?);
            }
        }
        Some(_) => return Err(DocError::new("additionalEndpoints", "must be an object")),
    }
    let enabled = match doc.get("status") {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s == "ALIVE",
        Some(_) => return Err(DocError::new("status", "must be a string")),
    };
    Ok(Instance {
        named,
        weight: weight(doc.get("weight"), "weight")?,
        zone: opt_str(doc.get("zone"), "zone")?,
        metadata: string_map(doc.get("metadata"), "metadata")?,
        enabled,
        ..Instance::at(Format::Serverset, addr)
    })
}

fn nerve(doc: &Map<String, Value>) -> Result<Instance, DocError> {
    let host = str_field(doc, "host")?;
    let port = port(doc.get("port").ok_or_else(|| DocError::new("port", "missing"))?, "port")?;
    let addr = Addr::from_parts(host, port).map_err(|e| DocError::new("host", e.to_string()))?;
    let metadata = string_map(doc.get("labels"), "labels")?;
    let zone = match opt_str(doc.get("zone"), "zone")? {
        Some(z) => Some(z),
        None => metadata.get("zone").or_else(|| metadata.get("az")).map(str::to_owned),
    };
    Ok(Instance { weight: weight(doc.get("weight"), "weight")?, zone, metadata, ..Instance::at(Format::Nerve, addr) })
}

fn str_field<'a>(doc: &'a Map<String, Value>, field: &str) -> Result<&'a str, DocError> {
    match doc.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(DocError::new(field, "empty")),
        Some(_) => Err(DocError::new(field, "must be a string")),
        None => Err(DocError::new(field, "missing")),
    }
}

fn opt_str(v: Option<&Value>, field: &str) -> Result<Option<String>, DocError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(DocError::new(field, "must be a string")),
    }
}

fn port(v: &Value, field: &str) -> Result<u16, DocError> {
    let n = match v {
        Value::Number(n) => n.as_i64().ok_or_else(|| DocError::new(field, format!("{n} is not an integer")))?,
        Value::String(s) => {
            s.trim().parse::<i64>().map_err(|_| DocError::new(field, format!("{s:?} is not a number")))?
        }
        _ => return Err(DocError::new(field, "must be a number")),
    };
    port_from_i64(n).map_err(|e| DocError::new(field, e.to_string()))
}

fn endpoint(v: Option<&Value>, field: &str) -> Result<Addr, DocError> {
    let Some(Value::Object(ep)) = v else { return Err(DocError::new(field, "must be an object with host and port")) };
    let host = str_field(ep, "host").map_err(|e| e.within(field))?;
    let port = port(ep.get("port").ok_or_else(|| DocError::new("port", "missing").within(field))?, "port")
        .map_err(|e| e.within(field))?;
    Addr::from_parts(host, port).map_err(|e| DocError::new("host", e.to_string()).within(field))
}

fn weight(v: Option<&Value>, field: &str) -> Result<u32, DocError> {
    let n = match v {
        None | Some(Value::Null) => return Ok(DEFAULT_WEIGHT),
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| DocError::new(field, format!("{n} is not an integer")))?,
        Some(Value::String(s)) => {
            s.trim().parse::<i64>().map_err(|_| DocError::new(field, format!("{s:?} is not an integer")))?
        }
        Some(_) => return Err(DocError::new(field, "must be an integer")),
    };
    match u32::try_from(n) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(DocError::new(field, format!("{n} is outside 0..={MAX_WEIGHT}"))),
    }
}

/// A flat string map; numbers and booleans are taken as their text.
fn string_map(v: Option<&Value>, field: &str) -> Result<Labels, DocError> {
    let Some(v) = v else { return Ok(Labels::default()) };
    let map = match v {
        Value::Null => return Ok(Labels::default()),
        Value::Object(map) => map,
        _ => return Err(DocError::new(field, "must be an object of strings")),
    };
    map.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return Err(DocError::new(k.as_str(), "must be a string").within(field)),
            };
            Ok((k.clone(), v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Instance {
        parse_instance(s.as_bytes()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn errors_name_the_nested_field() {
        let doc =
            r#"{"serviceEndpoint":{"host":"10.0.0.1","port":80},"additionalEndpoints":{"http":{"host":"h","port":0}}}"#;
        let err = parse_instance(doc.as_bytes()).expect_err("port 0");
        assert_eq!(err.field, "additionalEndpoints.http.port");
        let err = parse_instance(br#"{"host":"10.0.0.1","port":80,"labels":{"az":[1]}}"#).expect_err("a list label");
        assert_eq!(err.field, "labels.az");
        let err = parse_instance(b"not an instance").expect_err("garbage");
        assert_eq!(err.field, "");
    }

    fn fails(s: &str, needle: &str) {
        let err = parse_instance(s.as_bytes()).expect_err(s).to_string();
        assert!(err.contains(needle), "{s}: error {err:?} should mention {needle:?}");
    }

    #[test]
    fn curator_metadata_may_say_the_instance_speaks_http2() {
        use crate::routing::InstanceProtocol;
        let with = |p: &str| {
            let doc = format!(r#"{{"address":"10.0.0.5","port":8080,"payload":{{"metadata":{{"protocol":"{p}"}}}}}}"#);
            parse_instance(doc.as_bytes()).unwrap().protocol
        };
        assert_eq!(with("h2"), Some(InstanceProtocol::H2));
        assert_eq!(with("grpc"), Some(InstanceProtocol::H2));
        // Anything else is the service policy's to decide, as is no metadata at all.
        assert_eq!(with("http"), None);
        assert_eq!(with("http1"), None);
        assert_eq!(parse_instance(br#"{"address":"10.0.0.5","port":8080}"#).unwrap().protocol, None);
    }

    #[test]
    fn curator_as_the_contract_writes_it() {
        let i = parse(
            r#"{"name":"users","id":"7f3c","address":"10.0.0.5","port":8080,"sslPort":null,
                "payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
                           "metadata":{"version":"v2","shard":3},"weight":30,"zone":"a"},
                "registrationTimeUTC":1732700000000,"serviceType":"DYNAMIC","uriSpec":null}"#,
        );
        assert_eq!(i.format, Format::Curator);
        assert_eq!(i.addr.to_string(), "10.0.0.5:8080");
        assert_eq!(i.weight, 30);
        assert_eq!(i.zone.as_deref(), Some("a"));
        assert_eq!(i.metadata.get("version"), Some("v2"));
        assert_eq!(i.metadata.get("shard"), Some("3"));
        assert!(i.enabled);
    }

    #[test]
    fn spring_cloud_writes_the_zone_into_the_metadata() {
        let i = parse(r#"{"address":"10.0.0.5","port":8080,"payload":{"metadata":{"zone":"eu-1b"}}}"#);
        assert_eq!(i.zone.as_deref(), Some("eu-1b"));
        let i = parse(r#"{"address":"10.0.0.5","port":8080,"payload":{"zone":"a","metadata":{"zone":"b"}}}"#);
        assert_eq!(i.zone.as_deref(), Some("a"), "payload.zone wins");
    }

    #[test]
    fn curator_disabled_and_without_payload() {
        let i = parse(r#"{"name":"users","id":"1","address":"10.0.0.5","port":8080,"payload":null,"enabled":false}"#);
        assert!(!i.enabled);
        assert_eq!(i.weight, DEFAULT_WEIGHT);
        // Dubbo 3 application-level instances carry their metadata as strings.
        let i = parse(
            r#"{"name":"app","id":"10.0.0.6:20880","address":"10.0.0.6","port":20880,
                "payload":{"@class":"org.apache.dubbo.registry.zookeeper.ZookeeperInstance","id":"x","name":"app",
                           "metadata":{"dubbo.endpoints":"[{\"port\":20880,\"protocol\":\"dubbo\"}]"}}}"#,
        );
        assert_eq!(i.addr.port, 20880);
        assert!(i.metadata.contains_key("dubbo.endpoints"));
    }

    #[test]
    fn serverset_with_named_endpoints_and_status() {
        let i = parse(
            r#"{"serviceEndpoint":{"host":"10.0.0.5","port":8080},
                "additionalEndpoints":{"http":{"host":"10.0.0.5","port":8081}},"status":"ALIVE","shard":0}"#,
        );
        assert_eq!(i.format, Format::Serverset);
        assert_eq!(i.named["http"].to_string(), "10.0.0.5:8081");
        assert!(i.enabled);
        let i = parse(r#"{"serviceEndpoint":{"host":"10.0.0.5","port":8080},"status":"STOPPING"}"#);
        assert!(!i.enabled);
    }

    #[test]
    fn nerve_with_weight_and_labels() {
        let i = parse(r#"{"host":"10.0.0.5","port":8080,"name":"i-0abc","weight":10,"labels":{"az":"a"}}"#);
        assert_eq!(i.format, Format::Nerve);
        assert_eq!(i.weight, 10);
        assert_eq!(i.zone.as_deref(), Some("a"));
        assert_eq!(i.metadata.get("az"), Some("a"));
    }

    #[test]
    fn plain_forms() {
        assert_eq!(parse("10.0.0.5:8080\n").addr.to_string(), "10.0.0.5:8080");
        assert_eq!(parse("ip=10.0.0.5:8080").addr.to_string(), "10.0.0.5:8080");
        assert_eq!(parse("[::1]:9000").addr.to_string(), "[::1]:9000");
        assert_eq!(parse("ip=10.0.0.5:8080").format, Format::Plain);
    }

    #[test]
    fn malformed_documents_name_the_problem() {
        fails("", "empty");
        fails("\u{0}\u{159}", "");
        fails("10.0.0.5", "host:port");
        fails("10.0.0.5:99999", "port");
        fails("{not json", "JSON");
        fails(r#"{"foo":1}"#, "not a Curator");
        fails(r#"{"address":"10.0.0.5"}"#, "port: missing");
        fails(r#"{"address":"10.0.0.5","port":null,"sslPort":8443}"#, "sslPort");
        fails(r#"{"address":"10.0.0.5","port":70000}"#, "port");
        fails(r#"{"address":"10.0.0.5","port":-1}"#, "port");
        fails(r#"{"address":"10.0.0.5","port":80,"payload":{"weight":10001}}"#, "payload.weight");
        fails(r#"{"address":"10.0.0.5","port":80,"payload":{"metadata":{"a":{"b":1}}}}"#, "payload.metadata.a");
        fails(r#"{"address":"bad host","port":80}"#, "address");
        fails(r#"{"serviceEndpoint":{"host":"10.0.0.5"}}"#, "serviceEndpoint.port");
        fails(r#"{"serviceEndpoint":{"host":"h","port":1},"additionalEndpoints":{"x":3}}"#, "additionalEndpoints.x");
        fails(r#"{"host":"10.0.0.5","port":"eighty"}"#, "port");
        fails(r#"{"host":"10.0.0.5","port":80,"weight":-5}"#, "weight");
    }
}
