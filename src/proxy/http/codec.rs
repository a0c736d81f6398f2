//! HTTP/1 framing for the proxy's own engine: an I/O buffer, request and response heads parsed
//! into byte ranges (no header map, no allocation), the body length rules of RFC 9112 section 6,
//! and a streaming chunked-body scanner that checks the syntax while the bytes pass through.

use std::io;
use std::ops::Range;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A read buffer: `data[start..]` is filled and not yet consumed. Reads go into the spare
/// capacity, which is never zeroed (tokio's `read_buf` fills uninitialised memory safely), so a
/// new connection's buffer costs an allocation and nothing more. A buffer made with
/// [`IoBuf::lazy`] holds no storage until its first read, and gives it back with
/// [`IoBuf::release`]: a client connection that waits holds no buffer.
pub struct IoBuf {
    data: Vec<u8>,
    start: usize,
    /// The capacity a read allocates when the buffer holds no storage.
    size: usize,
}

impl IoBuf {
    pub fn new(capacity: usize) -> Self {
        IoBuf { data: Vec::with_capacity(capacity), start: 0, size: capacity }
    }

    /// A buffer that allocates `capacity` bytes at its first read, not before.
    pub fn lazy(capacity: usize) -> Self {
        IoBuf { data: Vec::new(), start: 0, size: capacity }
    }

    /// Gives the storage back when nothing is buffered; the next read allocates it again.
    #[inline]
    pub fn release(&mut self) {
        if self.is_empty() && self.data.capacity() != 0 {
            self.data = Vec::new();
            self.start = 0;
        }
    }

    #[inline]
    pub fn filled(&self) -> &[u8] {
        &self.data[self.start..]
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.start == self.data.len()
    }

    /// Bytes of storage held (0 while a lazy buffer holds none).
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }

    /// Drops `n` filled bytes from the front.
    #[inline]
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len());
        self.start += n;
        if self.start == self.data.len() {
            self.start = 0;
            self.data.clear();
        }
    }

    /// Whether no more bytes fit, even after compaction (a buffer without storage gets it at
    /// its next read).
    pub fn is_full(&self) -> bool {
        self.len() == self.data.capacity() && self.data.capacity() != 0
    }

    /// Reads once from `r` into the free space (compacting first if needed); 0 means EOF.
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<usize> {
        self.make_room()?;
        // With spare capacity, a Vec reads into exactly that and never grows.
        r.read_buf(&mut self.data).await
    }

    /// Reads what `r` has without waiting (Pending when nothing, the task to be woken when bytes
    /// come), allocating the storage only then and giving it back when nothing came. A read
    /// shorter than the space clears the socket's readiness, as [`IoBuf::read_from`]'s does;
    /// tokio's `try_read` leaves it set, which cost every new connection a `recvfrom` that found
    /// nothing (docs/PERFORMANCE.md, "Memory per held connection").
    pub fn poll_read_or_release<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if let Err(e) = self.make_room() {
            return Poll::Ready(Err(e));
        }
        let read = std::pin::pin!(r.read_buf(&mut self.data)).poll(cx);
        if !matches!(read, Poll::Ready(Ok(_))) {
            self.release();
        }
        read
    }

    /// Spare capacity for a read: storage allocated if there is none, filled bytes moved to the
    /// front if they reach the end.
    #[inline]
    fn make_room(&mut self) -> io::Result<()> {
        if self.data.len() == self.data.capacity() {
            if self.data.capacity() == 0 {
                self.data.reserve_exact(self.size);
            } else if self.start == 0 {
                return Err(io::Error::new(io::ErrorKind::OutOfMemory, "buffer full"));
            } else {
                self.data.drain(..self.start);
                self.start = 0;
            }
        }
        Ok(())
    }

    /// Polls one read from `r` into the free space (compacting first if needed); 0 means EOF.
    pub fn poll_read_from<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        r: &mut R,
    ) -> std::task::Poll<io::Result<usize>> {
        // A read that is not ready leaves no bytes behind, so the future may be dropped.
        std::pin::pin!(self.read_from(r)).poll(cx)
    }

    /// Replaces the storage with a larger one (for long heads), keeping the filled bytes.
    pub fn grow(&mut self, capacity: usize) {
        if capacity <= self.data.capacity() {
            return;
        }
        let mut data = Vec::with_capacity(capacity);
        data.extend_from_slice(self.filled());
        self.data = data;
        self.start = 0;
    }

    /// Room for `capacity` bytes from now on (a request body after its head): a smaller storage
    /// is replaced (at the next read when nothing is buffered), and storage allocated again
    /// after a [`IoBuf::release`] is this size.
    pub fn at_least(&mut self, capacity: usize) {
        self.size = self.size.max(capacity);
        if self.data.capacity() < capacity {
            if self.is_empty() {
                self.data = Vec::new();
                self.start = 0;
            } else {
                self.grow(capacity);
            }
        }
    }

    /// Shrinks back to `capacity` when empty, so pooled connections do not hold large buffers.
    pub fn shrink(&mut self, capacity: usize) {
        if self.data.capacity() > capacity && self.is_empty() {
            self.data = Vec::with_capacity(capacity);
            self.start = 0;
        }
    }
}

/// Most header fields accepted in one head.
pub const MAX_HEADERS: usize = 100;

/// A header field, as byte ranges of the head it was parsed from, and its kind.
#[derive(Clone, Debug)]
pub struct Field {
    pub name: Range<usize>,
    pub value: Range<usize>,
    pub kind: Known,
}

/// How long a message body is (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyLen {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body ends when the connection closes.
    UntilClose,
}

/// Headers the proxy handles itself, by kind, found while parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Known {
    Other,
    Host,
    ContentLength,
    TransferEncoding,
    Connection,
    /// Hop-by-hop headers removed when forwarding (RFC 9110 section 7.6.1, and the old
    /// `Keep-Alive` and `Proxy-Connection`); also a repeated Content-Length, forwarded once.
    HopByHop,
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
}

/// Classifies a header name (case-insensitively) without allocating.
#[inline]
pub fn classify(name: &[u8]) -> Known {
    // Dispatch on length first: one comparison for most headers.
    let eq = |lower: &[u8]| eq_folded(name, lower);
    match name.len() {
        2 if eq(b"te") => Known::HopByHop,
        4 if eq(b"host") => Known::Host,
        6 if eq(b"expect") => Known::Expect,
        7 if eq(b"upgrade") => Known::Upgrade,
        7 if eq(b"trailer") => Known::HopByHop,
        10 if eq(b"connection") => Known::Connection,
        10 if eq(b"keep-alive") => Known::HopByHop,
        14 if eq(b"content-length") => Known::ContentLength,
        15 if eq(b"x-forwarded-for") => Known::XForwardedFor,
        16 if eq(b"proxy-connection") => Known::HopByHop,
        17 if eq(b"transfer-encoding") => Known::TransferEncoding,
        17 if eq(b"x-forwarded-proto") => Known::XForwardedProto,
        19 if eq(b"proxy-authorization") => Known::HopByHop,
        18 if eq(b"proxy-authenticate") => Known::HopByHop,
        _ => Known::Other,
    }
}

/// `name == lower` ignoring ASCII case, where `lower` is lower case: its letters match either
/// case, every other byte only itself. No early exit, so that a comparison of known length
/// compiles to a few wide operations instead of a loop with two case conversions per byte.
#[inline(always)]
fn eq_folded(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len()
        && name.iter().zip(lower).fold(0, |diff, (&b, &l)| diff | ((b | (u8::from(l.is_ascii_lowercase()) << 5)) ^ l))
            == 0
}

/// Comma-separated list elements of a header value, trimmed, empty ones skipped.
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(trim).filter(|t| !t.is_empty())
}

pub fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Parses a Content-Length value: digits only, no sign, no overflow.
pub fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |acc, &d| acc.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

/// What went wrong in a chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ChunkState {
    /// Reading the hex size; `digits` so far.
    Size,
    /// After `;`: a chunk extension, ignored up to CR.
    Ext,
    /// Expecting LF after the size line's CR.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// Longest chunk extension and trailer section accepted.
const MAX_CHUNK_EXT: u32 = 1024;
const MAX_TRAILERS: u32 = 16 * 1024;

/// Follows a chunked body through the bytes that carry it, checking its syntax strictly (CRLF
/// line ends, hex sizes without overflow), so that a malformed body is refused and the body's end
/// is found exactly: nothing after it is taken for body, nothing of it for the next message.
#[derive(Clone, Debug)]
pub struct ChunkedScanner {
    state: ChunkState,
    size: u64,
    digits: u8,
    /// Bytes of extension or trailer seen (to bound them).
    extra: u32,
}

impl Default for ChunkedScanner {
    fn default() -> Self {
        ChunkedScanner { state: ChunkState::Size, size: 0, digits: 0, extra: 0 }
    }
}

impl ChunkedScanner {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Scans `buf`: returns how many bytes belong to the body (all of `buf` unless the body ends
    /// inside it) and calls `data` with the payload ranges (for de-chunking).
    pub fn scan(&mut self, buf: &[u8], mut data: impl FnMut(Range<usize>)) -> Result<usize, ChunkError> {
        use ChunkState::*;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            match self.state {
                Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        if self.digits == 16 {
                            return Err(ChunkError("chunk size too large"));
                        }
                        let d = (b as char).to_digit(16).unwrap_or(0);
                        self.size = (self.size << 4) | u64::from(d);
                        self.digits += 1;
                    }
                    b';' | b' ' | b'\t' if self.digits > 0 => {
                        self.state = Ext;
                        self.extra = 0;
                    }
                    b'\r' if self.digits > 0 => self.state = SizeLf,
                    _ => return Err(ChunkError("invalid chunk size")),
                },
                Ext => match b {
                    b'\r' => self.state = SizeLf,
                    b'\n' => return Err(ChunkError("bare LF in chunk extension")),
                    _ => {
                        self.extra += 1;
                        if self.extra > MAX_CHUNK_EXT {
                            return Err(ChunkError("chunk extension too long"));
                        }
                    }
                },
                SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after chunk size"));
                    }
                    if self.size == 0 {
                        self.state = TrailerStart;
                        self.extra = 0;
                    } else {
                        self.state = Data;
                    }
                }
                Data => {
                    let take = (buf.len() - i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                    data(i..i + take);
                    self.size -= take as u64;
                    i += take;
                    if self.size == 0 {
                        self.state = DataCr;
                    }
                    continue;
                }
                DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError("chunk data longer than its size"));
                    }
                    self.state = DataLf;
                }
                DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after chunk data"));
                    }
                    self.state = Size;
                    self.size = 0;
                    self.digits = 0;
                }
                TrailerStart => match b {
                    b'\r' => self.state = FinalLf,
                    b'\n' => return Err(ChunkError("bare LF in trailers")),
                    _ => {
                        self.state = Trailer;
                        self.bump_trailer()?;
                    }
                },
                Trailer => match b {
                    b'\r' => self.state = TrailerLf,
                    b'\n' => return Err(ChunkError("bare LF in trailers")),
                    _ => self.bump_trailer()?,
                },
                TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF after trailer"));
                    }
                    self.state = TrailerStart;
                }
                FinalLf => {
                    if b != b'\n' {
                        return Err(ChunkError("expected LF at the end of the body"));
                    }
                    self.state = Done;
                    return Ok(i + 1);
                }
                Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn bump_trailer(&mut self) -> Result<(), ChunkError> {
        self.extra += 1;
        if self.extra > MAX_TRAILERS { Err(ChunkError("trailers too long")) } else { Ok(()) }
    }
}

/// Writes `n` in decimal into `out`.
#[inline]
pub fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Writes `data`, one piece of a body, to `w`: as a chunk (RFC 9112 section 7.1) when the body
/// is `chunked`, its size line built in `size_line` (a buffer kept between chunks), else as it is.
pub async fn write_body_data<W: AsyncWrite + Unpin + ?Sized>(
    w: &mut W,
    size_line: &mut Vec<u8>,
    data: &[u8],
    chunked: bool,
) -> io::Result<()> {
    if !chunked {
        return w.write_all(data).await;
    }
    size_line.clear();
    push_hex(size_line, data.len() as u64);
    size_line.extend_from_slice(b"\r\n");
    w.write_all(size_line).await?;
    w.write_all(data).await?;
    w.write_all(b"\r\n").await
}

/// Writes `n` in lower-case hex into `out` (chunk sizes).
pub fn push_hex(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = HEX[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `base` with one to three bytes replaced, inserted or removed, the new ones drawn from
/// `alphabet`: input for tests that no peer's bytes make the parsers panic.
#[cfg(test)]
pub fn edited_at_random(rng: &mut fastrand::Rng, base: &[u8], alphabet: &[u8]) -> Vec<u8> {
    let mut text = base.to_vec();
    for _ in 0..rng.usize(1..=3) {
        let i = rng.usize(..text.len());
        let b = alphabet[rng.usize(..alphabet.len())];
        match rng.u8(..3) {
            0 => text[i] = b,
            1 => text.insert(i, b),
            _ => _ = text.remove(i),
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut s = ChunkedScanner::default();
        let mut payload = Vec::new();
        let n = s.scan(input, |r| payload.extend_from_slice(&input[r]))?;
        Ok((n, payload, s.is_done()))
    }

    #[tokio::test]
    async fn a_lazy_buffer_allocates_at_its_first_read_and_gives_the_storage_back_when_empty() {
        let mut b = IoBuf::lazy(64);
        assert_eq!(b.capacity(), 0);
        assert!(!b.is_full(), "a buffer without storage still takes a read");
        let mut src: &[u8] = b"hello";
        assert_eq!(b.read_from(&mut src).await.unwrap(), 5);
        assert_eq!(b.capacity(), 64);
        b.release();
        assert_eq!((b.filled(), b.capacity()), (&b"hello"[..], 64), "bytes still buffered keep the storage");
        b.consume(5);
        b.release();
        assert_eq!(b.capacity(), 0);
        let mut src: &[u8] = b"again";
        assert_eq!(b.read_from(&mut src).await.unwrap(), 5);
        assert_eq!((b.filled(), b.capacity()), (&b"again"[..], 64));
    }

    #[tokio::test]
    async fn a_buffer_made_larger_keeps_its_bytes_and_stays_larger() {
        let mut b = IoBuf::lazy(8);
        let mut src: &[u8] = b"0123456789";
        assert_eq!(b.read_from(&mut src).await.unwrap(), 8);
        assert!(b.is_full());
        b.at_least(32);
        assert_eq!((b.filled(), b.capacity()), (&b"01234567"[..], 32));
        assert_eq!(b.read_from(&mut src).await.unwrap(), 2);
        b.consume(10);
        b.release();
        let mut src: &[u8] = b"x";
        b.read_from(&mut src).await.unwrap();
        assert_eq!(b.capacity(), 32, "storage allocated again is the larger size");
        // Empty: the storage goes, and the next read allocates the larger size.
        let mut b = IoBuf::lazy(8);
        let mut src: &[u8] = b"ab";
        b.read_from(&mut src).await.unwrap();
        b.consume(2);
        b.at_least(64);
        assert_eq!(b.capacity(), 0);
        let mut src: &[u8] = b"cd";
        b.read_from(&mut src).await.unwrap();
        assert_eq!((b.filled(), b.capacity()), (&b"cd"[..], 64));
    }

    #[test]
    fn a_chunked_body_is_followed_to_its_exact_end() {
        let body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: 1\r\n\r\nGET /next";
        let (n, payload, done) = scan_all(body).unwrap();
        assert!(done);
        assert_eq!(&body[n..], b"GET /next");
        assert_eq!(payload, b"hello world");
    }

    #[test]
    fn split_anywhere_the_scan_gives_the_same_answer() {
        let body = b"a\r\n0123456789\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..body.len() {
            let mut s = ChunkedScanner::default();
            let mut payload = Vec::new();
            let (a, b) = body.split_at(cut);
            assert_eq!(s.scan(a, |r| payload.extend_from_slice(&a[r])).unwrap(), a.len());
            let n = s.scan(b, |r| payload.extend_from_slice(&b[r])).unwrap();
            assert_eq!(n, b.len());
            assert!(s.is_done(), "cut at {cut}");
            assert_eq!(payload, b"0123456789abc");
        }
    }

    /// Chunked bodies edited at random and cut at random: the scanner never panics, never claims
    /// more than it was given, and hands out payload ranges inside what it was given.
    #[test]
    fn no_chunked_body_makes_the_scanner_panic() {
        let base = b"5\r\nhello\r\n6;ext=1\r\n world\r\nff\r\n0\r\nx-trailer: 1\r\n\r\nGET /next";
        let alphabet = b"\x00\t\n\r ;=:0fFgx";
        let mut rng = fastrand::Rng::with_seed(9112);
        for _ in 0..50_000 {
            let body = edited_at_random(&mut rng, base, alphabet);
            let mut s = ChunkedScanner::default();
            let (a, b) = body.split_at(rng.usize(..=body.len()));
            for part in [a, b] {
                match s.scan(part, |r| assert!(r.end <= part.len() && r.start <= r.end)) {
                    Ok(n) => assert!(n <= part.len()),
                    Err(_) => break,
                }
                if s.is_done() {
                    break;
                }
            }
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello\r\n",
            b"5\r\nhelloX\r\n",
            b"5\r\nhello\n",
            b"-5\r\n",
            b"\r\n",
            b"11111111111111111\r\n",
            b"0\r\nbad\ntrailer",
            b"0\r\n\n",
        ] {
            assert!(scan_all(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn content_length_is_strict() {
        assert_eq!(parse_content_length(b" 42 "), Some(42));
        assert_eq!(parse_content_length(b"0"), Some(0));
        for bad in [&b""[..], b"+1", b"-1", b"1,1", b"0x10", b"99999999999999999999", b"1 2"] {
            assert_eq!(parse_content_length(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn header_names_are_classified_case_insensitively() {
        assert_eq!(classify(b"Content-Length"), Known::ContentLength);
        assert_eq!(classify(b"TRANSFER-ENCODING"), Known::TransferEncoding);
        assert_eq!(classify(b"keep-alive"), Known::HopByHop);
        assert_eq!(classify(b"X-Forwarded-For"), Known::XForwardedFor);
        assert_eq!(classify(b"content-type"), Known::Other);
        // Only letters fold, and only to their other case: '-' (0x2d) is not '\r' (0x0d), 'e' is not '%' or 0xe5.
        assert_eq!(classify(b"Keep\rAlive"), Known::Other);
        assert_eq!(classify(b"%xpect"), Known::Other);
        assert_eq!(classify(b"\xe5xpect"), Known::Other);
        assert_eq!(classify(b"HoSt"), Known::Host);
        assert_eq!(tokens(b" close , Upgrade,,").collect::<Vec<_>>(), [&b"close"[..], b"Upgrade"]);
    }

    #[test]
    fn numbers_are_written_without_allocating_strings() {
        let mut v = Vec::new();
        push_decimal(&mut v, 0);
        v.push(b' ');
        push_decimal(&mut v, 18446744073709551615);
        v.push(b' ');
        push_hex(&mut v, 255);
        assert_eq!(v, b"0 18446744073709551615 ff");
    }
}
