//! One health probe: a TCP connect, or an HTTP GET whose 2xx status passes. Shared by the active
//! checks of backends and by the registration's check of the local app.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::routing::{Addr, AddrError};

/// What to ask.
pub enum Probe<'a> {
    Tcp,
    /// GET `path` with this Host header.
    Http {
        host: &'a str,
        path: &'a str,
    },
}

/// What a probe that passed saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    Connected,
    Http(u16),
}

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Passed::Connected => f.write_str("connected"),
            Passed::Http(status) => write!(f, "HTTP {status}"),
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("send: {0}")]
    Send(io::Error),
    #[error("read: {0}")]
    Read(io::Error),
    #[error("closed before a status line")]
    Closed,
    #[error("not an HTTP response")]
    NotHttp,
    /// An answer outside 2xx.
    #[error("HTTP {0}")]
    Status(u16),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{url}: {reason}")]
    BadUrl { url: String, reason: &'static str },
    #[error("{0}")]
    BadAddress(#[from] AddrError),
}

/// Probes `addr` within `timeout`.
pub async fn probe(addr: &Addr, probe: Probe<'_>, timeout: Duration, user_agent: &str) -> Result<Passed, ProbeError> {
    let attempt = async {
        let mut stream = crate::net::connect(addr, timeout, &Default::default()).await.map_err(ProbeError::Connect)?;
        let Probe::Http { host, path } = probe else { return Ok(Passed::Connected) };
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(ProbeError::Send)?;
        // "HTTP/1.x NNN" is all that is needed.
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            match stream.read(&mut head[n..]).await {
                Ok(0) => return Err(ProbeError::Closed),
                Ok(m) => n += m,
                Err(e) => return Err(ProbeError::Read(e)),
            }
        }
        let status = std::str::from_utf8(&head[..n])
            .ok()
            .and_then(|line| line.strip_prefix("HTTP/1."))
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or(ProbeError::NotHttp)?;
        if (200..300).contains(&status) { Ok(Passed::Http(status)) } else { Err(ProbeError::Status(status)) }
    };
    tokio::time::timeout(timeout, attempt).await.unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// Splits `http://host:port/path` into the address, the Host header and the path.
pub fn parse_url(url: &str) -> Result<(Addr, &str, &str), ProbeError> {
    let rest =
        url.strip_prefix("http://").ok_or(ProbeError::BadUrl { url: url.to_owned(), reason: "not an http:// URL" })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = authority.parse::<Addr>()?;
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
