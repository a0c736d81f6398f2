//! A client connection, in clear or under TLS: one type for the engines, so that TLS takes no
//! engine of its own. The clear case keeps the socket's own borrowed halves (no lock, no
//! allocation); a TLS stream splits through tokio's `split`, since reading and writing TLS both
//! touch the one session.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp;

/// A TLS server-side session over TCP.
pub type TlsServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// A client connection.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsServerStream>),
}

/// What a TLS handshake told about the client, for the headers sent upstream.
#[derive(Default, Debug, Clone)]
pub struct ClientTls {
    /// The `x-forwarded-client-cert` value, on a listener that requires client certificates.
    pub forwarded_client_cert: Option<Box<str>>,
}

impl ClientStream {
    /// Borrowed read and write halves, to use both at once within one task.
    pub fn split(&mut self) -> (ClientRead<'_>, ClientWrite<'_>) {
        match self {
            ClientStream::Plain(s) => {
                let (r, w) = s.split();
                (ClientRead::Plain(r), ClientWrite::Plain(w))
            }
            ClientStream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (ClientRead::Tls(r), ClientWrite::Tls(w))
            }
        }
    }

    /// The TCP socket under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(s) => s.get_ref().0,
        }
    }
}

pub enum ClientRead<'a> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut TlsServerStream>),
}

pub enum ClientWrite<'a> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut TlsServerStream>),
}

macro_rules! dispatch_read {
    ($t:ty) => {
        impl AsyncRead for $t {
            #[inline]
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
}

macro_rules! dispatch_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            #[inline]
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            #[inline]
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }
            #[inline]
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
            #[inline]
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }
            #[inline]
            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Plain(s) => s.is_write_vectored(),
                    Self::Tls(s) => s.is_write_vectored(),
                }
            }
        }
    };
}

dispatch_read!(ClientStream);
dispatch_write!(ClientStream);
dispatch_read!(ClientRead<'_>);
dispatch_write!(ClientWrite<'_>);

impl From<TcpStream> for ClientStream {
    fn from(s: TcpStream) -> Self {
        ClientStream::Plain(s)
    }
}

/// Takes the TLS handshake of a client on a TLS listener, within `within`, with the
/// configuration in force now. A client certificate, where the listener requires one, becomes
/// the `x-forwarded-client-cert` value.
pub async fn accept_tls(
    tls: &crate::tls::ServerTls,
    tcp: TcpStream,
    within: std::time::Duration,
) -> io::Result<(ClientStream, ClientTls)> {
    let loaded = tls.current();
    let acceptor = tokio_rustls::TlsAcceptor::from(loaded.config.clone());
    let stream = tokio::time::timeout(within, acceptor.accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let mut info = ClientTls::default();
    if tls.mutual() {
        if let Some(cert) = stream.get_ref().1.peer_certificates().and_then(|c| c.first()) {
            info.forwarded_client_cert =
                Some(crate::tls::forwarded_client_cert(loaded.by.as_deref(), cert.as_ref()).into_boxed_str());
        }
    }
    Ok((ClientStream::Tls(Box::new(stream)), info))
}
