//! Dubbo URLs as registries hold them: a provider or override URL, percent-encoded once into a
//! ZooKeeper node name (`dubbo%3A%2F%2F10.0.0.5%3A20880%2Fcom.foo.Api%3Fversion%3D1.0%26...`).
//!
//! The name is decoded exactly once, as Dubbo's own registry reads it: a `%2C` in `methods` is a
//! comma, and a value its writer encoded a second time (`%252C`) keeps one level of encoding,
//! which is what Dubbo's consumers see too (they decode such values only where they read them as
//! URLs). Parameters are separated by `&` or `;`; a later one wins over an earlier one of the
//! same name; a parameter written without `=` has its name as its value.

use std::collections::BTreeMap;

/// A parsed Dubbo URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DubboUrl {
    /// `dubbo`, `tri`, `rest`, `override`, ...
    pub scheme: String,
    /// Without brackets for an IPv6 literal.
    pub host: String,
    /// 0 when the URL gives none.
    pub port: u16,
    /// The path without its leading `/` (the interface, for Java-written URLs).
    pub path: String,
    pub params: Params,
}

/// URL parameters, by name.
pub type Params = BTreeMap<String, String>;

/// Encodes a URL into a node name as Java Dubbo does (`URLEncoder`: letters, digits and `.-_*`
/// kept, a space as `+`, every other byte as `%XX`).
pub fn encode(url: &str) -> String {
    let mut out = String::with_capacity(url.len() * 3 / 2);
    for b in url.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes a node name: `%XX` escapes, and `+` as a space (Java's `URLEncoder`, which Dubbo uses,
/// writes a space as `+` and a `+` as `%2B`).
pub fn decode(name: &str) -> Result<String, String> {
    let bytes = name.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                let byte = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                    format!(
                        "bad percent-encoding at byte {i}: {:?}",
                        String::from_utf8_lossy(&bytes[i..bytes.len().min(i + 3)])
                    )
                })?;
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| "not UTF-8 once decoded".to_owned())
}

impl DubboUrl {
    /// Parses a decoded URL: `scheme://[user[:password]@]host[:port][/path][?params]`.
    pub fn parse(text: &str) -> Result<DubboUrl, String> {
        let text = text.trim();
        let (scheme, rest) = text.split_once("://").ok_or_else(|| format!("{text:?} is not a URL (no \"://\")"))?;
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
            return Err(format!("{scheme:?} is not a URL scheme"));
        }
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match body.split_once('/') {
            Some((a, p)) => (a, p),
            None => (body, ""),
        };
        // Credentials are not Dubbo's business here; the address is what follows them.
        let address = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        let (host, port) = split_host_port(address)?;
        let mut params = Params::new();
        for pair in query.unwrap_or("").split(['&', ';']).filter(|p| !p.is_empty()) {
            let (name, value) = match pair.split_once('=') {
                Some((n, v)) => (n.trim(), v.trim()),
                None => (pair.trim(), pair.trim()),
            };
            if !name.is_empty() {
                params.insert(name.to_owned(), value.to_owned());
            }
        }
        Ok(DubboUrl { scheme: scheme.to_ascii_lowercase(), host, port, path: path.to_owned(), params })
    }

    /// A parameter as Dubbo reads it: the named one, or else its `default.` form.
    pub fn param(&self, name: &str) -> Option<&str> {
        param(&self.params, name)
    }
}

/// A parameter as Dubbo reads it: the named one if not empty, or else its `default.` form.
pub fn param<'a>(params: &'a Params, name: &str) -> Option<&'a str> {
    let value = params.get(name).map(String::as_str).filter(|v| !v.is_empty());
    value.or_else(|| params.get(&format!("default.{name}")).map(String::as_str).filter(|v| !v.is_empty()))
}

/// `host[:port]`, `[v6][:port]`; the port 0 when absent.
fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let bad_port = |p: &str| format!("port {p:?} is not a number in 0..=65535");
    if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("{address:?}: unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad_port(p))?,
            None if after.is_empty() => 0,
            None => return Err(format!("{address:?} is not host:port")),
        };
        return Ok((host.to_owned(), port));
    }
    match address.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Ok((address.to_owned(), 0)),
        Some((host, p)) => Ok((host.to_owned(), p.parse().map_err(|_| bad_port(p))?)),
        None => Ok((address.to_owned(), 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> DubboUrl {
        DubboUrl::parse(&decode(name).unwrap()).unwrap()
    }

    #[test]
    fn java_provider_urls_decode_once() {
        let u = node(
            "dubbo%3A%2F%2F10.0.0.5%3A20880%2Forg.apache.dubbo.demo.DemoService%3Fanyhost%3Dtrue%26application%3D\
             demo-provider%26dubbo%3D2.0.2%26interface%3Dorg.apache.dubbo.demo.DemoService%26methods%3DsayHello%2C\
             sayHi%26side%3Dprovider%26timestamp%3D1700000000000%26version%3D1.0.0%26group%3Dg1%26weight%3D100\
             %26note%3Da%252Cb%26label%3Dtwo+words",
        );
        assert_eq!((u.scheme.as_str(), u.host.as_str(), u.port), ("dubbo", "10.0.0.5", 20880));
        assert_eq!(u.path, "org.apache.dubbo.demo.DemoService");
        assert_eq!(u.param("methods"), Some("sayHello,sayHi"), "%2C is a comma");
        assert_eq!(u.param("note"), Some("a%2Cb"), "a double-encoded value keeps one level, as Dubbo sees it");
        assert_eq!(u.param("label"), Some("two words"), "+ is a space");
        assert_eq!((u.param("version"), u.param("group"), u.param("weight")), (Some("1.0.0"), Some("g1"), Some("100")));
    }

    #[test]
    fn encoding_and_decoding_round_trip() {
        let url = "dubbo://10.0.0.5:20880/a.B?methods=x,y&note=two words&pct=100%";
        assert_eq!(
            encode(url),
            "dubbo%3A%2F%2F10.0.0.5%3A20880%2Fa.B%3Fmethods%3Dx%2Cy%26note%3Dtwo+words%26pct%3D100%25"
        );
        assert_eq!(decode(&encode(url)).unwrap(), url);
    }

    #[test]
    fn python_provider_urls_have_no_path() {
        let u = node("tri%3A%2F%2F127.0.0.1%3A50071%3Fservice%3Dorg.apache.dubbo.samples.Greeter");
        assert_eq!((u.scheme.as_str(), u.host.as_str(), u.port, u.path.as_str()), ("tri", "127.0.0.1", 50071, ""));
        assert_eq!(u.param("service"), Some("org.apache.dubbo.samples.Greeter"));
    }

    #[test]
    fn odd_but_valid_shapes() {
        let u = DubboUrl::parse("override://0.0.0.0/com.foo.Api?category=configurators;disabled=true&&flag").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("0.0.0.0", 0));
        assert_eq!((u.param("disabled"), u.param("flag")), (Some("true"), Some("flag")));
        let u = DubboUrl::parse("tri://user:pw@[::1]:50051/x?default.weight=7&weight=").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 50051));
        assert_eq!(u.param("weight"), Some("7"), "an empty parameter falls back to its default. form");
    }

    #[test]
    fn malformed_names_say_why() {
        assert!(decode("dubbo%3A%2").unwrap_err().contains("percent"));
        assert!(decode("dubbo%ZZ").unwrap_err().contains("percent"));
        assert!(decode("%FF%FE").unwrap_err().contains("UTF-8"));
        assert!(DubboUrl::parse("10.0.0.5:20880").unwrap_err().contains("not a URL"));
        assert!(DubboUrl::parse("dubbo://10.0.0.5:port/x").unwrap_err().contains("port"));
        assert!(DubboUrl::parse("dubbo://10.0.0.5:70000/x").unwrap_err().contains("port"));
    }
}
