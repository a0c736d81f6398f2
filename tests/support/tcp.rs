//! TCP servers for the TCP listener tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A TCP server; stops when dropped.
pub struct TcpServer {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TcpServer {
    /// Echoes every byte back; half-closes after the client does.
    pub async fn echo() -> TcpServer {
        TcpServer::start(|mut s| async move {
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await
    }

    /// Reads to EOF, then answers the byte count and checksum (16 bytes) and closes.
    pub async fn checksum() -> TcpServer {
        TcpServer::start(|mut s| async move {
            let mut sum = Checksum::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => sum.update(&buf[..n]),
                    Err(_) => return,
                }
            }
            let _ = s.write_all(&sum.len.to_be_bytes()).await;
            let _ = s.write_all(&sum.hash.to_be_bytes()).await;
            let _ = s.shutdown().await;
        })
        .await
    }

    async fn start<F, Fut>(handler: F) -> TcpServer
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let handler = Arc::new(handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else { return };
                c.fetch_add(1, Ordering::SeqCst);
                let h = handler.clone();
                tokio::spawn(async move { h(s).await });
            }
        });
        TcpServer { addr, connections, task }
    }
}

/// An order-sensitive checksum of a byte stream (FNV-1a over 8-byte words), however it is split.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
pub struct Checksum {
    pub len: u64,
    pub hash: u64,
}

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        if self.len == 0 {
            self.hash = 0xcbf2_9ce4_8422_2325;
        }
        for &b in bytes {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.len += bytes.len() as u64;
    }
}
