//! The access log (off by default): one line per HTTP request or TCP connection, as text or
//! JSON, written by a task of its own so that the request path only formats a line and hands it
//! over. When the writer falls behind, lines are dropped and counted rather than slowing traffic.

use std::fmt::Write as _;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;
use tracing::warn;

/// Lines waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// Where access lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    pub fn parse(value: &str) -> Sink {
        if value == "stdout" { Sink::Stdout } else { Sink::File(PathBuf::from(value)) }
    }
}

/// One access log entry.
#[derive(Serialize, Debug)]
pub struct Entry<'a> {
    #[serde(skip)]
    pub time: SystemTime,
    pub listener: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<SocketAddr>,
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub upstream: Option<String>,
    #[serde(skip)]
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// The request's `x-request-id` (with `proxy.request_id`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<&'a str>,
    /// A gRPC call's `grpc-status` (README: "gRPC and HTTP/2 upstreams").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u16>,
}

/// The access log handle shared by listeners.
#[derive(Debug)]
pub struct AccessLog {
    tx: mpsc::Sender<String>,
    json: bool,
    dropped: prometheus::IntCounter,
}

impl AccessLog {
    /// Opens the sink and starts the writer task.
    pub fn start(sink: Sink, json: bool, dropped: prometheus::IntCounter) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match &sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        tokio::task::spawn_blocking(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(line) = rx.blocking_recv() {
                buf.extend_from_slice(line.as_bytes());
                while let Ok(more) = rx.try_recv() {
                    buf.extend_from_slice(more.as_bytes());
                    if buf.len() > 60 * 1024 {
                        break;
                    }
                }
                if let Err(e) = out.write_all(&buf).and_then(|_| out.flush()) {
                    warn!(error = %e, "access log write failed");
                }
                buf.clear();
            }
        });
        Ok(AccessLog { tx, json, dropped })
    }

    /// Formats and queues one line; never waits.
    pub fn record(&self, e: &Entry<'_>) {
        let line = self.format(e);
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }

    fn format(&self, e: &Entry<'_>) -> String {
        format_line(e, self.json)
    }
}

/// One access log line, JSON or text.
fn format_line(e: &Entry<'_>, json: bool) -> String {
    let time = humantime::format_rfc3339_millis(e.time);
    let ms = e.duration.as_secs_f64() * 1e3;
    if json {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        v["time"] = serde_json::Value::String(time.to_string());
        v["duration_ms"] = serde_json::json!((ms * 1000.0).round() / 1000.0);
        let mut line = v.to_string();
        line.push('\n');
        line
    } else {
        let client = e.client.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        let upstream = e.upstream.as_deref().unwrap_or("-");
        let status = if e.status == 0 { "-".to_owned() } else { e.status.to_string() };
        let mut line = format!("{time} {} {client} ", e.listener);
        for value in [e.method, e.host, e.path] {
            push_escaped(&mut line, value);
            line.push(' ');
        }
        let _ = write!(line, "{status} {upstream} {ms:.3}ms in={} out={}", e.bytes_in, e.bytes_out);
        if let Some(id) = e.request_id {
            line.push_str(" id=");
            push_escaped(&mut line, id);
        }
        if let Some(g) = e.grpc_status {
            let _ = write!(line, " grpc={g}");
        }
        line.push('\n');
        line
    }
}

/// Appends a value the client chose (method, host, path) as one field of a text line: bytes
/// outside visible ASCII, and `"` and `\`, as `\xHH` (as nginx's `escape=default`), so that no
/// value can split a field or a line; `-` for an empty one.
fn push_escaped(line: &mut String, value: &str) {
    if value.is_empty() {
        line.push('-');
    }
    for &b in value.as_bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' {
            line.push(char::from(b));
        } else {
            let _ = write!(line, "\\x{b:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_values_cannot_split_fields_or_lines() {
        let entry = Entry {
            time: SystemTime::UNIX_EPOCH,
            listener: "http",
            client: None,
            method: "GET",
            host: "",
            path: "/a b\"c\\d\n\u{e9}\t",
            status: 200,
            upstream: None,
            duration: Duration::ZERO,
            bytes_in: 0,
            bytes_out: 0,
            request_id: None,
            grpc_status: None,
        };
        let line = format_line(&entry, false);
        assert_eq!(
            line,
            "1970-01-01T00:00:00.000Z http - GET - /a\\x20b\\x22c\\x5cd\\x0a\\xc3\\xa9\\x09 200 - 0.000ms in=0 out=0\n"
        );
        let json: serde_json::Value = serde_json::from_str(&format_line(&entry, true)).expect("JSON");
        assert_eq!(json["path"], entry.path, "JSON escapes by itself and keeps the value");
        assert!(json.get("grpc_status").is_none());
        let grpc = Entry { grpc_status: Some(14), ..entry };
        assert!(format_line(&grpc, false).ends_with(" in=0 out=0 grpc=14\n"));
        let json: serde_json::Value = serde_json::from_str(&format_line(&grpc, true)).expect("JSON");
        assert_eq!(json["grpc_status"], 14);
    }
}
