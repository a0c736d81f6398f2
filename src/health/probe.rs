//! One health probe: a TCP connect, or an HTTP GET whose 2xx status passes. Shared by the active
//! checks of backends and by the registration's check of the local app.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::routing::Addr;

/// What to ask.
pub enum Probe<'a> {
    Tcp,
    /// GET `path` with this Host header.
    Http {
        host: &'a str,
        path: &'a str,
    },
}

/// Probes `addr` within `timeout`: Ok with what passed, Err with what was seen.
pub async fn probe(addr: &Addr, probe: Probe<'_>, timeout: Duration, user_agent: &str) -> Result<String, String> {
    let attempt = async {
        let mut stream = crate::proxy::upstream::connect(addr, timeout, &Default::default())
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let Probe::Http { host, path } = probe else { return Ok("connected".to_owned()) };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        // "HTTP/1.x NNN" is all that is needed.
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match stream.read(&mut head[n..]).await {
                Ok(0) => return Err("closed before a status line".to_owned()),
                Ok(m) => n += m,
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        let status = std::str::from_utf8(&head[..n])
            .ok()
            .and_then(|line| line.strip_prefix("HTTP/1."))
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| "not an HTTP response".to_owned())?;
        if (200..300).contains(&status) { Ok(format!("HTTP {status}")) } else { Err(format!("HTTP {status}")) }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
}

/// Splits `http://host:port/path` into the address, the Host header and the path.
pub fn parse_url(url: &str) -> Result<(Addr, &str, &str), String> {
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority.parse::<Addr>().map_err(|e| format!("{url}: {e}"))?;
    Ok((addr, authority, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_host_and_path() {
        let (addr, host, path) = parse_url("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!((addr.to_string().as_str(), host, path), ("127.0.0.1:8080", "127.0.0.1:8080", "/health?x=1"));
        assert_eq!(parse_url("http://localhost:81").unwrap().2, "/");
        assert!(parse_url("https://a:1/").is_err());
        assert!(parse_url("http://nohost/").is_err());
    }
}
