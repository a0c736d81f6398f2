//! Sockets as zkroute wants them, for the data plane and the health checks alike: listeners and
//! connections with Nagle off and, where both ends are on this host, the loopback congestion
//! control; connects with a timeout that try each address a name resolves to; a client's address
//! as text without allocating; an accept that does not try the queue when it is empty.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpSocket, TcpStream};

use crate::names::{Addr, Host};

/// Binds and listens on `addr` as `TcpListener::bind` does, with what every accepted connection
/// should have set first, since Linux copies a listener's options into the sockets it accepts:
/// Nagle off (responses and relayed bytes are written whole) and, if `addr` is a loopback one,
/// the loopback congestion control. That saves a system call per connection.
pub fn listen(addr: SocketAddr, congestion: &LoopbackCongestion) -> std::io::Result<Listener> {
    let socket = tcp_socket(addr)?;
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    congestion.apply(&socket, addr.ip());
    socket.bind(addr)?;
    let listener = socket.listen(1024)?.into_std()?;
    // Deprecated for types whose descriptor may change or close while registered; a
    // `std::net::TcpListener` owned by the `AsyncFd` keeps one descriptor open for its life, the
    // condition of the `unsafe` replacement this crate does not use (`unsafe_code` is forbidden).
    #[allow(deprecated)]
    let registered = AsyncFd::new(listener)?;
    Ok(Listener(registered))
}

/// A listening socket. Its `accept` differs from tokio's `TcpListener::accept` in one way: after
/// a connection it asks whether another is queued (a `poll` that does not wait) and, if none
/// is, waits for the next one's readiness event instead of calling `accept4` to find out. The
/// socket's readiness is edge-triggered, so tokio must call until `EAGAIN`, and a failed `accept4`
/// is dear on Linux: it allocates a socket and its file before it looks at the queue, then frees
/// them. Measured per new connection in docs/PERFORMANCE.md ("A new connection per request").
pub struct Listener(AsyncFd<std::net::TcpListener>);

impl Listener {
    /// The next connection, registered with the runtime, and its peer's address.
    pub async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            match rustix::net::acceptfrom_with(self.0.get_ref(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC) {
                Ok((fd, peer)) => {
                    if !queued(self.0.get_ref()) {
                        // A connection queued after the `poll` has its own readiness event, which
                        // this does not clear (tokio clears only the event it was given).
                        ready.clear_ready();
                    }
                    let peer = peer.and_then(|a| SocketAddr::try_from(a).ok());
                    let stream = TcpStream::from_std(std::net::TcpStream::from(fd))?;
                    let peer = match peer {
                        Some(p) => p,
                        None => stream.peer_addr()?,
                    };
                    return Ok((stream, peer));
                }
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }
}

/// Whether a listener's queue holds a connection, without waiting (an error says yes: the next
/// `accept4` reports it).
fn queued(listener: &std::net::TcpListener) -> bool {
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    rustix::event::poll(&mut fds, Some(&Timespec { tv_sec: 0, tv_nsec: 0 })).map_or(true, |n| n > 0)
}

/// A TCP socket of `addr`'s family, to set options on before it binds or connects.
fn tcp_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }
}

/// Connects to `addr` within `timeout`, with Nagle off (requests are written whole), trying each
/// address a name resolves to in turn.
pub async fn connect(addr: &Addr, timeout: Duration, congestion: &LoopbackCongestion) -> io::Result<TcpStream> {
    let attempt = async {
        match &addr.host {
            Host::Ip(ip) => connect_one(SocketAddr::new(*ip, addr.port), congestion).await,
            Host::Name(name) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{name} has no address"));
                for a in tokio::net::lookup_host((&**name, addr.port)).await? {
                    match connect_one(a, congestion).await {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    };
    let stream = tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn connect_one(addr: SocketAddr, congestion: &LoopbackCongestion) -> io::Result<TcpStream> {
    let socket = tcp_socket(addr)?;
    // Before the connect: BBR, once started on a socket, leaves it paced whatever follows.
    congestion.apply(&socket, addr.ip());
    socket.connect(addr).await
}

/// The congestion control of connections with both ends on this host
/// (`proxy.loopback_congestion`): listeners bound to a loopback address, whose accepted
/// connections inherit it, and upstream connections to one.
///
/// A loopback path has no bottleneck to probe for or queue to pace into, but BBR, a common system
/// default, paces every socket it runs from a timer of its own. Measured on the machine of
/// `docs/PERFORMANCE.md`, whose default is BBR, a bulk relay over loopback took a tenth more CPU
/// per GiB, and an HTTP request 1.2 us more kernel time, than with cubic, which sends as the
/// window allows. Connections to other hosts keep the system's choice.
#[derive(Clone, Debug, Default)]
pub struct LoopbackCongestion(Option<Arc<str>>);

/// What loopback connections use when `proxy.loopback_congestion` is not set.
pub const DEFAULT_LOOPBACK_CONGESTION: &str = "cubic";

impl LoopbackCongestion {
    /// From `proxy.loopback_congestion`: a name, which the kernel must offer to this process, or
    /// empty for the system's choice. Unset, `default` where the kernel offers it (one built with
    /// another default may keep cubic for root), the system's choice where it does not.
    pub fn configured(name: Option<&str>, default: &str) -> io::Result<Self> {
        match name {
            Some(name) => Self::new(name),
            None => Ok(Self::new(default).unwrap_or_else(|e| {
                tracing::info!(error = %e, congestion = default, "loopback connections keep the system's congestion control");
                LoopbackCongestion(None)
            })),
        }
    }

    /// `name` for loopback connections, or the system's choice if empty. Fails if the kernel does
    /// not offer `name` to this process.
    pub fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() {
            return Ok(LoopbackCongestion(None));
        }
        let probe = TcpSocket::new_v4()?;
        rustix::net::sockopt::set_tcp_congestion(&probe, name)?;
        Ok(LoopbackCongestion(Some(name.into())))
    }

    /// Sets the algorithm on a socket (before it connects or listens) if `ip`, its peer's or its
    /// own bound address, is a loopback one. A failure leaves the system's choice, which works.
    pub fn apply(&self, socket: &impl AsFd, ip: IpAddr) {
        if let Some(name) = &self.0 {
            if ip.is_loopback() {
                if let Err(e) = rustix::net::sockopt::set_tcp_congestion(socket, name) {
                    tracing::debug!(error = %e, congestion = %name, "cannot set the congestion control");
                }
            }
        }
    }
}

/// An IP address as text, held inline: written once per client connection (or per request on
/// HTTP/2) for `X-Forwarded-For` and the `source_ip` ring hash, without allocating.
#[derive(Clone, Copy)]
pub struct IpText {
    len: u8,
    text: [u8; IpText::MAX],
}

impl IpText {
    /// The longest text of an address: a full IPv6 address with an embedded IPv4 one.
    const MAX: usize = 45;

    pub fn new(ip: std::net::IpAddr) -> Self {
        let mut out = IpText { len: 0, text: [0; Self::MAX] };
        match ip {
            // IPv4 without the formatting machinery: the common case.
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
            }
            std::net::IpAddr::V6(v6) => {
                use std::io::Write;
                let mut rest = &mut out.text[..];
                // Cannot fail: no IPv6 text is longer than MAX.
                let _ = write!(rest, "{v6}");
                out.len = (Self::MAX - rest.len()) as u8;
            }
        }
        out
    }

    fn push(&mut self, b: u8) {
        self.text[usize::from(self.len)] = b;
        self.len += 1;
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.text[..usize::from(self.len)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    fn congestion_of(socket: &impl AsFd) -> String {
        rustix::net::sockopt::tcp_congestion(socket).expect("TCP_CONGESTION")
    }

    /// What a new socket gets on this system, and an algorithm other than that (both are built
    /// into every Linux kernel).
    fn system_and_other() -> (String, &'static str) {
        let system = congestion_of(&TcpSocket::new_v4().expect("socket"));
        let other = if system == "reno" { "cubic" } else { "reno" };
        (system, other)
    }

    async fn backend() -> (TcpListener, Addr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = Addr::from_socket(listener.local_addr().expect("addr"));
        (listener, addr)
    }

    #[tokio::test]
    async fn an_upstream_connection_on_loopback_gets_the_loopback_algorithm() {
        let (system, other) = system_and_other();
        let (_listener, addr) = backend().await;
        let set = LoopbackCongestion::new(other).expect("an algorithm every kernel has");
        let stream = connect(&addr, Duration::from_secs(5), &set).await.expect("connect");
        assert_eq!(congestion_of(&stream), other);
        let kept = connect(&addr, Duration::from_secs(5), &LoopbackCongestion::new("").expect("empty")).await;
        assert_eq!(congestion_of(&kept.expect("connect")), system, "empty keeps the system's choice");
    }

    #[tokio::test]
    async fn a_listener_hands_nodelay_and_the_loopback_algorithm_to_accepted_connections() {
        let (system, other) = system_and_other();
        let set = LoopbackCongestion::new(other).expect("an algorithm every kernel has");
        for (bind, expected) in [("127.0.0.1:0", other), ("0.0.0.0:0", system.as_str())] {
            let listener = listen(bind.parse().expect("address"), &set).expect("listen");
            let port = listener.local_addr().expect("addr").port();
            let _client = TcpStream::connect(("127.0.0.1", port)).await.expect("connect");
            let (accepted, _) = listener.accept().await.expect("accept");
            assert_eq!(congestion_of(&accepted), expected, "a listener on {bind}");
            assert!(accepted.nodelay().expect("TCP_NODELAY"), "Nagle is off on what a listener on {bind} accepts");
        }
    }

    #[tokio::test]
    async fn accept_takes_every_queued_connection_and_one_made_after_the_queue_emptied() {
        let listener = listen("127.0.0.1:0".parse().expect("address"), &LoopbackCongestion::default()).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let within = |f| tokio::time::timeout(Duration::from_secs(5), f);
        // Both queued before the first accept, behind one readiness event: the second must be
        // taken without another.
        let a = TcpStream::connect(addr).await.expect("connect a");
        let b = TcpStream::connect(addr).await.expect("connect b");
        for client in [&a, &b] {
            let (accepted, peer) =
                within(listener.accept()).await.expect("a queued connection is accepted").expect("accept");
            assert_eq!(peer, client.local_addr().expect("addr"));
            assert_eq!(accepted.peer_addr().expect("peer"), peer);
        }
        // The queue is empty: the next accept waits for the next connection's event.
        let (accepted, c) = tokio::join!(within(listener.accept()), async {
            tokio::task::yield_now().await;
            TcpStream::connect(addr).await.expect("connect c")
        });
        let (_, peer) = accepted.expect("a later connection is accepted").expect("accept");
        assert_eq!(peer, c.local_addr().expect("addr"));
    }

    #[test]
    fn an_algorithm_the_system_lacks_fails_when_named_and_falls_back_when_a_default() {
        let e = LoopbackCongestion::new("no-such-algorithm").expect_err("not offered");
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(LoopbackCongestion::configured(Some("no-such-algorithm"), "reno").is_err());
        let unset = LoopbackCongestion::configured(None, "no-such-algorithm").expect("the system's choice");
        assert_eq!(unset.0, None);
        let (_, other) = system_and_other();
        let unset = LoopbackCongestion::configured(None, other).expect("offered");
        assert_eq!(unset.0.as_deref(), Some(other));
        let empty = LoopbackCongestion::configured(Some(""), other).expect("the system's choice");
        assert_eq!(empty.0, None);
    }

    #[test]
    fn addresses_are_written_as_the_standard_library_does() {
        let longest = "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255";
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.0.9",
            "100.9.10.99",
            "::1",
            "fe80::1:2",
            "::ffff:10.0.0.1",
            longest,
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
        }
        for _ in 0..10_000 {
            let v4 = std::net::IpAddr::from(fastrand::u32(..).to_be_bytes());
            let v6 = std::net::IpAddr::from(fastrand::u128(..).to_be_bytes());
            for ip in [v4, v6] {
                assert_eq!(IpText::new(ip).as_bytes(), ip.to_string().as_bytes());
            }
        }
    }
}
