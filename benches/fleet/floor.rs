//! The floor: the least any watcher that reads a changed node can do per change, to set
//! zkroute's figures against on the same machine in the same run (`ZKROUTE_FLEET_WATCHER=floor`).
//!
//! Each watcher is this bench's own binary started with `--floor-watcher <connect>`: one thread,
//! blocking on one socket, speaking ZooKeeper's wire protocol by hand. It sets the persistent
//! recursive watch zkroute sets on the services, and on each created or changed node asks for it
//! (`getData`, no watch) and logs the answer's mzxid in the line a sidecar logs on a swap. There
//! is nothing else: no table, no runtime, no allocator's background thread, no second thread.
//! A change costs it two wake-ups (the notification, the answer) and six system calls: two reads
//! for each (a length, then the rest), the request's write and the log line's. It does not follow a restart: a lost connection ends it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

const NOTIFICATION: i32 = -1;
const PING: i32 = -2;
const OP_GET_DATA: i32 = 4;
const OP_PING: i32 = 11;
const OP_ADD_WATCH: i32 = 106;
const PERSISTENT_RECURSIVE: i32 = 1;
const NODE_CREATED: i32 = 1;
const NODE_DATA_CHANGED: i32 = 3;

/// Runs a watcher until its connection ends; `connect` is `host:port[,...][/chroot]` and only
/// its first server is used.
pub fn run(connect: &str, session_timeout: Duration) -> ! {
    let (hosts, chroot) = connect.split_at(connect.find('/').unwrap_or(connect.len()));
    let server = hosts.split(',').next().expect("a server");
    let mut w = Watcher { sock: TcpStream::connect(server).expect("connect"), frame: Vec::new(), xid: 0 };
    w.sock.set_nodelay(true).unwrap();
    w.handshake(session_timeout);
    w.request(OP_ADD_WATCH, |b| {
        put_str(b, &format!("{chroot}/zkroute/services"));
        b.extend_from_slice(&PERSISTENT_RECURSIVE.to_be_bytes());
    });
    w.read_frame().expect("addWatch answered");
    log("read everything from ZooKeeper", None);
    log("routing table swapped", Some(0));
    // Pings at a third of the session timeout, when nothing else came.
    w.sock.set_read_timeout(Some(session_timeout / 3)).unwrap();
    loop {
        match w.read_frame() {
            Some(()) => w.answer(),
            None => w.send(PING, OP_PING, &[]),
        }
    }
}

struct Watcher {
    sock: TcpStream,
    /// The frame last read, without its length.
    frame: Vec<u8>,
    xid: i32,
}

impl Watcher {
    fn handshake(&mut self, session_timeout: Duration) {
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&0i32.to_be_bytes()); // protocol version
        b.extend_from_slice(&0i64.to_be_bytes()); // last zxid seen
        b.extend_from_slice(&(session_timeout.as_millis() as i32).to_be_bytes());
        b.extend_from_slice(&0i64.to_be_bytes()); // session id
        b.extend_from_slice(&16i32.to_be_bytes());
        b.extend_from_slice(&[0; 16]); // password
        b.push(0); // not read-only
        self.write_frame(&b);
        self.read_frame().expect("session established");
    }

    /// Acts on the frame last read: a notification of a created or changed node asks for the
    /// node, its answer is logged; pings' answers and other events are let be.
    fn answer(&mut self) {
        let xid = i32_at(&self.frame, 0);
        let body = &self.frame[16..];
        if xid == NOTIFICATION {
            let kind = i32_at(body, 0);
            if kind == NODE_CREATED || kind == NODE_DATA_CHANGED {
                let path = str_at(body, 8).to_owned();
                self.request(OP_GET_DATA, |b| {
                    put_str(b, &path);
                    b.push(0); // no watch: the persistent one covers it
                });
            }
        } else if xid > 0 && i32_at(&self.frame, 12) == 0 {
            // data (length and bytes), then the Stat: czxid, mzxid, ...
            let len = i32_at(body, 0).max(0) as usize;
            let mzxid = i64::from_be_bytes(body[4 + len + 8..4 + len + 16].try_into().unwrap());
            log("routing table swapped", Some(mzxid));
        }
    }

    fn request(&mut self, op: i32, body: impl FnOnce(&mut Vec<u8>)) {
        self.xid += 1;
        let mut b = Vec::with_capacity(64);
        body(&mut b);
        self.send(self.xid, op, &b);
    }

    fn send(&mut self, xid: i32, op: i32, body: &[u8]) {
        let mut b = Vec::with_capacity(8 + body.len());
        b.extend_from_slice(&xid.to_be_bytes());
        b.extend_from_slice(&op.to_be_bytes());
        b.extend_from_slice(body);
        self.write_frame(&b);
    }

    fn write_frame(&mut self, body: &[u8]) {
        let mut b = Vec::with_capacity(4 + body.len());
        b.extend_from_slice(&(body.len() as i32).to_be_bytes());
        b.extend_from_slice(body);
        self.sock.write_all(&b).unwrap_or_else(|e| exit(&format!("write: {e}")));
    }

    /// Reads one frame into `self.frame`; None when the read timed out before it began.
    fn read_frame(&mut self) -> Option<()> {
        let mut len = [0u8; 4];
        match self.sock.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return None;
            }
            Err(e) => exit(&format!("read: {e}")),
        }
        self.frame.resize(i32::from_be_bytes(len) as usize, 0);
        self.sock.read_exact(&mut self.frame).unwrap_or_else(|e| exit(&format!("read: {e}")));
        Some(())
    }
}

/// One JSON line on standard error, in the shape the fleet reads from zkroute's log.
fn log(message: &str, zxid: Option<i64>) {
    let at = humantime::format_rfc3339_micros(SystemTime::now());
    let zxid = zxid.map_or(String::new(), |z| format!(",\"zxid\":{z}"));
    let line = format!("{{\"timestamp\":\"{at}\",\"message\":\"{message}\"{zxid}}}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

fn exit(why: &str) -> ! {
    eprintln!("floor watcher: {why}");
    std::process::exit(1)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as i32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn i32_at(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// A string as the wire carries it (length, then bytes), at `at`.
fn str_at(b: &[u8], at: usize) -> &str {
    let len = i32_at(b, at) as usize;
    std::str::from_utf8(&b[at + 4..at + 4 + len]).unwrap_or("")
}
