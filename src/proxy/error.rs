//! Answers zkroute makes itself (the README's error table): one place maps each failure to its status, its
//! `x-zkroute-error` value (also the metric's view of it) and a one-line body saying why.

use super::http::codec::push_decimal;

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no rule matches this request")]
    NoRoute,
    #[error("no healthy endpoint for the matched route")]
    NoHealthyUpstream,
    #[error("no routing table is loaded yet")]
    NotReady,
    #[error("every attempt to connect to an upstream endpoint failed")]
    ConnectFailed,
    #[error("the upstream did not answer within the timeout")]
    Timeout,
    #[error("the upstream closed the connection or sent an invalid response")]
    UpstreamReset,
    #[error("malformed request: {0}")]
    BadRequest(&'static str),
    #[error("the request header section is too large")]
    HeadersTooLarge,
    #[error("the request headers did not arrive in time")]
    HeaderTimeout,
    #[error("CONNECT is not supported: zkroute routes by its table, not by the request")]
    MethodNotAllowed,
    #[error("the service's circuit breaker is open: too many connections, waiting or concurrent requests")]
    Overflow,
    #[error("the rule's rate limit is reached; retry after the time given")]
    RateLimited {
        /// Whole seconds until a request would pass (at least 1), for `retry-after`.
        retry_after: u32,
    },
}

/// How a [`ProxyError`] is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rescue {
    pub status: u16,
    pub reason: &'static str,
    /// The `x-zkroute-error` value.
    pub code: &'static str,
}

impl ProxyError {
    pub fn rescue(&self) -> Rescue {
        let (status, reason, code) = match self {
            ProxyError::NoRoute => (404, "Not Found", "no_route"),
            ProxyError::NoHealthyUpstream => (503, "Service Unavailable", "no_healthy_upstream"),
            ProxyError::NotReady => (503, "Service Unavailable", "not_ready"),
            ProxyError::ConnectFailed => (502, "Bad Gateway", "upstream_connect_failed"),
            ProxyError::Timeout => (504, "Gateway Timeout", "upstream_timeout"),
            ProxyError::UpstreamReset => (502, "Bad Gateway", "upstream_reset"),
            ProxyError::BadRequest(_) => (400, "Bad Request", "bad_request"),
            ProxyError::HeadersTooLarge => (431, "Request Header Fields Too Large", "headers_too_large"),
            ProxyError::HeaderTimeout => (408, "Request Timeout", "request_header_timeout"),
            ProxyError::MethodNotAllowed => (405, "Method Not Allowed", "method_not_allowed"),
            ProxyError::Overflow => (503, "Service Unavailable", "overflow"),
            ProxyError::RateLimited { .. } => (429, "Too Many Requests", "rate_limited"),
        };
        Rescue { status, reason, code }
    }

    /// The `retry-after` seconds the answer carries, if any.
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            ProxyError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Writes a complete HTTP/1.1 answer for `err` into `out`.
pub fn write_answer(out: &mut Vec<u8>, err: &ProxyError, close: bool, head_only: bool) {
    let r = err.rescue();
    let body_len = r.code.len() + 2 + err.to_string().len() + 1;
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(r.status));
    out.push(b' ');
    out.extend_from_slice(r.reason.as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\nx-zkroute-error: ");
    out.extend_from_slice(r.code.as_bytes());
    if let Some(secs) = err.retry_after() {
        out.extend_from_slice(b"\r\nretry-after: ");
        push_decimal(out, u64::from(secs));
    }
    out.extend_from_slice(b"\r\ncontent-length: ");
    push_decimal(out, body_len as u64);
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    out.extend_from_slice(b"\r\n\r\n");
    if !head_only {
        out.extend_from_slice(r.code.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(err.to_string().as_bytes());
        out.push(b'\n');
    }
}

/// The body of an answer, for HTTP/2.
pub fn body_text(err: &ProxyError) -> String {
    format!("{}: {err}\n", err.rescue().code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_carry_status_header_and_reason() {
        let mut out = Vec::new();
        write_answer(&mut out, &ProxyError::NoRoute, false, false);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("\r\nx-zkroute-error: no_route\r\n"));
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body, "no_route: no rule matches this request\n");
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
