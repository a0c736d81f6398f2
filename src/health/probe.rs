//! One health probe: a TCP connect, an HTTP GET whose 2xx status passes (over HTTP/1.1, or over
//! HTTP/2 to an endpoint that speaks it), or gRPC's `grpc.health.v1.Health/Check` answered
//! SERVING. Shared by the active checks of backends and by the registration's check of the local
//! app.

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
    /// The same GET over HTTP/2 with prior knowledge.
    Http2 {
        host: &'a str,
        path: &'a str,
    },
    /// `grpc.health.v1.Health/Check` for `service` ("" asks about the server as a whole).
    Grpc {
        host: &'a str,
        service: &'a str,
    },
}

/// What a probe that passed saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passed {
    Connected,
    Http(u16),
    /// gRPC health: SERVING.
    Serving,
}

impl std::fmt::Display for Passed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Passed::Connected => f.write_str("connected"),
            Passed::Http(status) => write!(f, "HTTP {status}"),
            Passed::Serving => f.write_str("SERVING"),
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
    #[error("HTTP/2: {0}")]
    Http2(String),
    /// A gRPC health answer other than SERVING, or a gRPC error status.
    #[error("gRPC health: {0}")]
    NotServing(String),
}

/// Probes `addr` within `timeout`.
pub async fn probe(addr: &Addr, probe: Probe<'_>, timeout: Duration, user_agent: &str) -> Result<Passed, ProbeError> {
    let attempt = async {
        let mut stream = crate::net::connect(addr, timeout, &Default::default()).await.map_err(ProbeError::Connect)?;
        let (host, path) = match probe {
            Probe::Tcp => return Ok(Passed::Connected),
            Probe::Http2 { host, path } => return over_h2(stream, host, path, None, user_agent).await,
            Probe::Grpc { host, service } => {
                return over_h2(stream, host, "/grpc.health.v1.Health/Check", Some(service), user_agent).await;
            }
            Probe::Http { host, path } => (host, path),
        };
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

/// A GET of `path`, or with `grpc_service` a gRPC health check, on one HTTP/2 connection.
async fn over_h2(
    stream: tokio::net::TcpStream,
    host: &str,
    path: &str,
    grpc_service: Option<&str>,
    user_agent: &str,
) -> Result<Passed, ProbeError> {
    use http_body_util::{BodyExt, Full};
    let h2 = |e: hyper::Error| ProbeError::Http2(e.to_string());
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake::<_, Full<bytes::Bytes>>(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(h2)?;
    let conn = tokio::spawn(conn);
    let uri = format!("http://{host}{path}");
    let mut req = http::Request::builder().uri(uri).header(http::header::USER_AGENT, user_agent);
    let body = match grpc_service {
        None => Full::default(),
        Some(service) => {
            req = req.method(http::Method::POST).header("content-type", "application/grpc").header("te", "trailers");
            Full::new(bytes::Bytes::from(health_request(service)))
        }
    };
    let req = req.body(body).map_err(|e| ProbeError::Http2(e.to_string()))?;
    let resp = send.send_request(req).await.map_err(h2)?;
    let status = resp.status().as_u16();
    let result = match grpc_service {
        None if (200..300).contains(&status) => Ok(Passed::Http(status)),
        None => Err(ProbeError::Status(status)),
        Some(_) => {
            let head_status = resp.headers().get("grpc-status").cloned();
            let collected = resp.into_body().collect().await.map_err(h2)?;
            let grpc_status = collected.trailers().and_then(|t| t.get("grpc-status").cloned()).or(head_status);
            match grpc_status.as_ref().map(|v| v.as_bytes()) {
                Some(b"0") if serving(&collected.to_bytes()) => Ok(Passed::Serving),
                Some(b"0") => Err(ProbeError::NotServing("not SERVING".into())),
                Some(other) => Err(ProbeError::NotServing(format!("grpc-status {}", String::from_utf8_lossy(other)))),
                None => Err(ProbeError::NotServing(format!("HTTP {status} without grpc-status"))),
            }
        }
    };
    conn.abort();
    result
}

/// A length-prefixed `HealthCheckRequest { service }` (protobuf field 1, a string).
fn health_request(service: &str) -> Vec<u8> {
    let mut msg = Vec::with_capacity(service.len() + 3);
    if !service.is_empty() {
        msg.push(0x0a);
        let mut n = service.len();
        while n >= 0x80 {
            msg.push((n as u8 & 0x7f) | 0x80);
            n >>= 7;
        }
        msg.push(n as u8);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    framed
}

/// Whether a length-prefixed `HealthCheckResponse` says SERVING (field 1, varint 1).
fn serving(framed: &[u8]) -> bool {
    framed.get(5..).is_some_and(|m| m.windows(2).any(|w| w == [0x08, 0x01]))
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
    fn grpc_health_messages_encode_and_decode() {
        assert_eq!(health_request(""), [0, 0, 0, 0, 0]);
        assert_eq!(health_request("echo"), [0, 0, 0, 0, 6, 0x0a, 4, b'e', b'c', b'h', b'o']);
        assert!(serving(&[0, 0, 0, 0, 2, 0x08, 0x01]));
        assert!(!serving(&[0, 0, 0, 0, 2, 0x08, 0x02]));
        assert!(!serving(&[0, 0, 0, 0, 0]));
    }

    #[test]
    fn urls_split_into_address_host_and_path() {
        let (addr, host, path) = parse_url("http://127.0.0.1:8080/health?x=1").unwrap();
        assert_eq!((addr.to_string().as_str(), host, path), ("127.0.0.1:8080", "127.0.0.1:8080", "/health?x=1"));
        assert_eq!(parse_url("http://localhost:81").unwrap().2, "/");
        assert!(parse_url("https://a:1/").is_err());
        assert!(parse_url("http://nohost/").is_err());
    }
}
