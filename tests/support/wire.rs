//! A raw HTTP/1 client that reads responses as a strict client does (RFC 9112 section 6.3), so
//! that a response framed two ways, or bytes beyond its end, show up as errors.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long one read may wait before the response counts as stuck.
const READ_WAIT: Duration = Duration::from_secs(10);

/// A response as read off the wire.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    /// The head as received, fields as sent.
    pub head: String,
    pub fields: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Interim (1xx) responses read before it.
    pub interim: usize,
}

impl Resp {
    /// The first value of `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.fields.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether the connection closes after this response.
    pub fn closes(&self) -> bool {
        self.header("connection").is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client connection speaking raw bytes.
pub struct Wire {
    pub stream: TcpStream,
    buf: Vec<u8>,
    eof: bool,
}

impl Wire {
    pub async fn connect(addr: SocketAddr) -> Wire {
        Wire { stream: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new(), eof: false }
    }

    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.stream.write_all(bytes.as_ref()).await.expect("write");
    }

    /// One exchange on a fresh connection.
    pub async fn exchange(addr: SocketAddr, bytes: impl AsRef<[u8]>) -> Result<Resp, String> {
        let mut w = Wire::connect(addr).await;
        w.send(bytes).await;
        w.response(false).await
    }

    async fn fill(&mut self) -> Result<usize, String> {
        if self.eof {
            return Ok(0);
        }
        let mut scratch = [0u8; 16 * 1024];
        match tokio::time::timeout(READ_WAIT, self.stream.read(&mut scratch)).await {
            Err(_) => Err(format!("no byte for {READ_WAIT:?}; have {:?}", String::from_utf8_lossy(&self.buf))),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                self.eof = true;
                Ok(0)
            }
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok(0)) => {
                self.eof = true;
                Ok(0)
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&scratch[..n]);
                Ok(n)
            }
        }
    }

    /// Reads the next final response (skipping interim ones) to a request (`head_request`: a
    /// HEAD). Err for a response a strict client refuses, a truncated one, or none.
    pub async fn response(&mut self, head_request: bool) -> Result<Resp, String> {
        let mut interim = 0;
        loop {
            let head_len = loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break end + 4;
                }
                if self.fill().await? == 0 {
                    return Err(if self.buf.is_empty() {
                        "closed without a response".into()
                    } else {
                        format!("closed inside a head: {:?}", String::from_utf8_lossy(&self.buf))
                    });
                }
            };
            let head: Vec<u8> = self.buf.drain(..head_len).collect();
            let text = String::from_utf8_lossy(&head).into_owned();
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&head) {
                Ok(httparse::Status::Complete(_)) => {}
                _ => return Err(format!("unparsable head {text:?}")),
            }
            let status = parsed.code.ok_or("no status")?;
            let fields: Vec<(String, String)> = parsed
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), String::from_utf8_lossy(h.value).into_owned()))
                .collect();
            if (100..200).contains(&status) && status != 101 {
                interim += 1;
                continue;
            }
            let mut resp = Resp { status, head: text, fields, body: Vec::new(), interim };
            self.body(&mut resp, head_request).await?;
            return Ok(resp);
        }
    }

    async fn body(&mut self, resp: &mut Resp, head_request: bool) -> Result<(), String> {
        let lengths: Vec<&str> = resp
            .fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str())
            .collect();
        let codings: Vec<String> = resp
            .fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()).collect::<Vec<_>>())
            .collect();
        if !lengths.is_empty() && !codings.is_empty() {
            return Err(format!("both Content-Length and Transfer-Encoding: {:?}", resp.head));
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!("Content-Length twice, differently: {:?}", resp.head));
        }
        let s = resp.status;
        if head_request || s == 101 || s == 204 || s == 304 {
            return Ok(());
        }
        if let Some(last) = codings.last() {
            if last == "chunked" {
                return self.chunked(resp).await;
            }
            return self.until_close(resp).await;
        }
        if let Some(n) = lengths.first() {
            let n: usize = n.trim().parse().map_err(|_| format!("bad Content-Length {n:?}"))?;
            while self.buf.len() < n {
                if self.fill().await? == 0 {
                    return Err(format!("closed after {} of {n} body bytes", self.buf.len()));
                }
            }
            resp.body = self.buf.drain(..n).collect();
            return Ok(());
        }
        self.until_close(resp).await
    }

    async fn until_close(&mut self, resp: &mut Resp) -> Result<(), String> {
        if !resp.closes() {
            return Err(format!("a body delimited by the close, on a connection kept open: {:?}", resp.head));
        }
        while self.fill().await? > 0 {}
        resp.body = std::mem::take(&mut self.buf);
        Ok(())
    }

    /// The next CRLF-ended line, without its CRLF; `inside` names what a close would cut.
    async fn line(&mut self, inside: &str) -> Result<Vec<u8>, String> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf[..end].to_vec();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.fill().await? == 0 {
                return Err(format!("closed inside {inside}"));
            }
        }
    }

    async fn chunked(&mut self, resp: &mut Resp) -> Result<(), String> {
        loop {
            let line = String::from_utf8_lossy(&self.line("a chunk size").await?).into_owned();
            let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                while !self.line("trailers").await?.is_empty() {}
                return Ok(());
            }
            while self.buf.len() < size + 2 {
                if self.fill().await? == 0 {
                    return Err("closed inside a chunk".into());
                }
            }
            if &self.buf[size..size + 2] != b"\r\n" {
                return Err("chunk data longer than its size".into());
            }
            resp.body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Whether the server closes the connection within `within` without sending anything more.
    pub async fn closes_within(&mut self, within: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        while self.buf.is_empty() && !self.eof {
            let mut scratch = [0u8; 4096];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut scratch)).await {
                Err(_) => return Err(format!("still open after {within:?}")),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&scratch[..n]),
            }
        }
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected bytes: {:?}", String::from_utf8_lossy(&self.buf)))
        }
    }

    /// Bytes that arrived beyond the responses read, waiting up to `within` for some.
    pub async fn stray_bytes(&mut self, within: Duration) -> Vec<u8> {
        if self.buf.is_empty() && !self.eof {
            let mut scratch = [0u8; 4096];
            if let Ok(Ok(n)) = tokio::time::timeout(within, self.stream.read(&mut scratch)).await {
                self.buf.extend_from_slice(&scratch[..n]);
            }
        }
        std::mem::take(&mut self.buf)
    }
}
