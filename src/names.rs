//! The names everything else is keyed by: service names, endpoint addresses, and the endpoint
//! key that joins them. A leaf: routing (the table) and endpoint state (kept outside the table)
//! both build on it without importing each other.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A service name as it appears under `services_path` (one znode level).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    pub fn new(name: &str) -> Self {
        ServiceName(Arc::from(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// The host part of an address: an IP literal (the common case, connected without resolving)
/// or a DNS name, resolved when a connection is made.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub enum Host {
    Ip(IpAddr),
    Name(Arc<str>),
}

/// Where a backend listens.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Addr {
    pub host: Host,
    pub port: u16,
}

impl Addr {
    pub fn from_socket(addr: SocketAddr) -> Self {
        Addr { host: Host::Ip(addr.ip()), port: addr.port() }
    }

    /// Builds an address from a host string and a port, as instance documents carry them.
    pub fn from_parts(host: &str, port: u16) -> Result<Self, AddrError> {
        let host = host.trim();
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Addr { host: Host::Ip(ip), port });
        }
        if !is_dns_name(bare) {
            return Err(AddrError::BadHost(host.to_owned()));
        }
        Ok(Addr { host: Host::Name(Arc::from(bare.to_ascii_lowercase())), port })
    }

    /// The socket address, when the host is an IP literal.
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        match self.host {
            Host::Ip(ip) => Some(SocketAddr::new(ip, self.port)),
            Host::Name(_) => None,
        }
    }
}

fn is_dns_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Why an address did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    #[error("expected host:port, got {0:?}")]
    Shape(String),
    #[error("port {0:?} is not a number in 1..=65535")]
    BadPort(String),
    #[error("host {0:?} is neither an IP address nor a DNS name")]
    BadHost(String),
}

impl FromStr for Addr {
    type Err = AddrError;

    /// Parses `host:port`, `[v6]:port` or `v6-literal` forms are not accepted without brackets.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Ok(sa) = s.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(AddrError::BadPort("0".into()));
            }
            return Ok(Addr::from_socket(sa));
        }
        let (host, port) = s.rsplit_once(':').ok_or_else(|| AddrError::Shape(s.to_owned()))?;
        if host.contains(':') && !host.starts_with('[') {
            return Err(AddrError::Shape(s.to_owned()));
        }
        let port = parse_port(port)?;
        Addr::from_parts(host, port)
    }
}

/// Parses a port in 1..=65535.
pub fn parse_port(s: &str) -> Result<u16, AddrError> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(AddrError::BadPort(s.to_owned())),
    }
}

/// Checks a port number from a JSON document.
pub fn port_from_i64(p: i64) -> Result<u16, AddrError> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(AddrError::BadPort(p.to_string())),
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Host::Ip(ip) => write!(f, "{ip}:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

impl Serialize for Addr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Addr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The stable identity of a backend endpoint: the service it serves and the address it listens
/// on. Health, outlier, in-flight and pool state is keyed by it, so it survives table swaps and a
/// registry's delete-and-re-create of the instance node.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize)]
pub struct EndpointKey {
    pub service: Option<ServiceName>,
    pub addr: Addr,
}

impl fmt::Display for EndpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.service {
            Some(s) => write!(f, "{s}/{}", self.addr),
            None => write!(f, "static/{}", self.addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_in_every_written_form() {
        assert_eq!("10.0.0.5:8080".parse::<Addr>().unwrap().to_string(), "10.0.0.5:8080");
        assert_eq!("[::1]:80".parse::<Addr>().unwrap().to_string(), "[::1]:80");
        assert_eq!("Users-1.Internal:81".parse::<Addr>().unwrap().to_string(), "users-1.internal:81");
        assert!(matches!("10.0.0.5".parse::<Addr>(), Err(AddrError::Shape(_))));
        assert!(matches!("10.0.0.5:0".parse::<Addr>(), Err(AddrError::BadPort(_))));
        assert!(matches!("10.0.0.5:70000".parse::<Addr>(), Err(AddrError::BadPort(_))));
        assert!(matches!("::1:80".parse::<Addr>(), Err(AddrError::Shape(_))));
        assert!(matches!("bad host:80".parse::<Addr>(), Err(AddrError::BadHost(_))));
    }
}
