//! A connection, in clear or under TLS, to a client or to an upstream: one type for the engines,
//! so that TLS takes no engine of its own. The clear case keeps the socket's own borrowed halves (no lock, no
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
/// A TLS client-side session over TCP.
pub type TlsClientStream = tokio_rustls::client::TlsStream<TcpStream>;

/// A TCP connection, or a TLS session `T` over one.
pub enum Stream<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client connection.
pub type ClientStream = Stream<TlsServerStream>;
/// An upstream connection.
pub type UpstreamStream = Stream<TlsClientStream>;

/// What a TLS handshake told about the client, for the headers sent upstream.
#[derive(Default, Debug, Clone)]
pub struct ClientTls {
    /// The `x-forwarded-client-cert` value, on a listener that requires client certificates.
    pub forwarded_client_cert: Option<Box<str>>,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Stream<T> {
    /// Borrowed read and write halves, to use both at once within one task.
    pub fn split(&mut self) -> (StreamRead<'_, T>, StreamWrite<'_, T>) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.split();
                (StreamRead::Plain(r), StreamWrite::Plain(w))
            }
            Stream::Tls(s) => {
                let (r, w) = tokio::io::split(&mut **s);
                (StreamRead::Tls(r), StreamWrite::Tls(w))
            }
        }
    }
}

pub enum StreamRead<'a, T> {
    Plain(tcp::ReadHalf<'a>),
    Tls(tokio::io::ReadHalf<&'a mut T>),
}

pub enum StreamWrite<'a, T> {
    Plain(tcp::WriteHalf<'a>),
    Tls(tokio::io::WriteHalf<&'a mut T>),
}

macro_rules! dispatch_read {
    ($t:ty) => {
        impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for $t {
            #[inline(always)]
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
        impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for $t {
            #[inline(always)]
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
                }
            }
            #[inline(always)]
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_flush(cx),
                    Self::Tls(s) => Pin::new(s).poll_flush(cx),
                }
            }
            #[inline(always)]
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
            #[inline(always)]
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

dispatch_read!(Stream<T>);
dispatch_write!(Stream<T>);
dispatch_read!(StreamRead<'_, T>);
dispatch_write!(StreamWrite<'_, T>);

impl<T> From<TcpStream> for Stream<T> {
    fn from(s: TcpStream) -> Self {
        Stream::Plain(s)
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
