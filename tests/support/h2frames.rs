//! Raw HTTP/2 frames (RFC 9113 section 6), for tests that need a byte-exact shape no client
//! library sends: a header block left open, a request without `:authority`, a reset flood.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The preface and an empty SETTINGS frame: what a client sends first.
pub fn client_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out
}

/// An HPACK header block of literal fields, not indexed and not Huffman-coded (RFC 7541
/// section 6.2.2): every field goes exactly as written.
pub fn block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        integer(&mut out, name.len());
        out.extend_from_slice(name.as_bytes());
        integer(&mut out, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// An HPACK integer with a 7-bit prefix and the Huffman bit clear.
fn integer(out: &mut Vec<u8>, mut n: usize) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// A GET for `path` on `stream`, with the request ending with its headers.
pub fn get(stream: u32, authority: &str, path: &str) -> Vec<u8> {
    let b = block(&[(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", path)]);
    frame(HEADERS, END_HEADERS | END_STREAM, stream, &b)
}

pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// A frame as received.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        Some(u32::from_be_bytes(self.payload.get(at..at + 4)?.try_into().ok()?))
    }

    /// The parameters of a SETTINGS frame.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32::from_be_bytes([c[2], c[3], c[4], c[5]])))
            .collect()
    }
}

/// The next frame, None when the connection closed; Err if none arrived within `within`.
pub async fn read_frame(s: &mut (impl AsyncRead + Unpin), within: Duration) -> Result<Option<Frame>, String> {
    let mut head = [0u8; 9];
    match tokio::time::timeout(within, s.read_exact(&mut head)).await {
        Err(_) => return Err(format!("no frame within {within:?}")),
        Ok(Err(_)) => return Ok(None),
        Ok(Ok(_)) => {}
    }
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    match tokio::time::timeout(within, s.read_exact(&mut payload)).await {
        Err(_) => return Err("a frame cut short".into()),
        Ok(Err(_)) => return Ok(None),
        Ok(Ok(_)) => {}
    }
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    Ok(Some(Frame { kind: head[3], flags: head[4], stream, payload }))
}

/// Reads frames until the connection closes (or `within` passes with nothing more), returning
/// them all.
pub async fn frames_until_close(s: &mut (impl AsyncRead + Unpin), within: Duration) -> (Vec<Frame>, bool) {
    let mut all = Vec::new();
    loop {
        match read_frame(s, within).await {
            Ok(Some(f)) => all.push(f),
            Ok(None) => return (all, true),
            Err(_) => return (all, false),
        }
    }
}
