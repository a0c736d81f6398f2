//! An HTTP/2 (h2c, prior knowledge) client for tests: hyper's.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

pub type H2Sender = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

/// A new h2c connection to `addr`.
pub async fn h2_client(addr: SocketAddr) -> H2Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    sender
}

/// One request, its body collected (within 15 s).
pub async fn h2_send(sender: &mut H2Sender, req: http::Request<Full<Bytes>>) -> Result<http::Response<Bytes>, String> {
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = tokio::time::timeout(Duration::from_secs(15), body.collect())
        .await
        .map_err(|_| "body stalled".to_owned())?
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

/// A GET of `uri` (absolute: `http://host/path`).
pub fn h2_get(uri: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(uri).body(Full::new(Bytes::new())).expect("request")
}

/// The `x-zkroute-error` of an answer.
pub fn error_code(resp: &http::Response<Bytes>) -> Option<&str> {
    resp.headers().get("x-zkroute-error").and_then(|v| v.to_str().ok())
}
