//! Request and response heads: parsed with httparse into byte ranges of the buffer they arrived
//! in, checked against request smuggling (RFC 9112 sections 6.1 and 6.3), and written back out
//! with hop-by-hop fields removed and the forwarding fields added. A rule's header edits (README:
//! "Rule documents", `request_headers`, `response_headers`) are applied in the same pass: the
//! writer knows every field as it copies it, so an edited head is not gone over again.

use std::mem::MaybeUninit;
use std::ops::Range;

use http::Method;

use super::codec::{BodyLen, Field, Known, MAX_HEADERS, classify, parse_content_length, tokens, trim};
use crate::proxy::error::ProxyError;
use crate::routing::documents::{HeaderEdits, HeaderLookup, OwnFields};

/// A parsed request head. Ranges index the buffer it was parsed from.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub len: usize,
    pub method: Method,
    /// HTTP/1.`minor`.
    pub minor: u8,
    /// What to forward as the request target: origin-form (path and query) or `*`.
    pub target: Range<usize>,
    /// The path alone, for matching.
    pub path: Range<usize>,
    /// The authority of an absolute-form target, which replaces Host (RFC 9112 section 3.2.2).
    pub authority: Option<Range<usize>>,
    pub host: Option<Range<usize>>,
    pub body: BodyLen,
    /// The client asked to close after this exchange (or speaks HTTP/1.0 without keep-alive).
    pub close: bool,
    /// An HTTP/1.0 client asked for keep-alive.
    pub keep_alive: bool,
    /// A protocol upgrade (WebSocket) is requested.
    pub upgrade: bool,
    /// Connection names fields to remove besides the hop-by-hop ones.
    names_fields: bool,
}

impl RequestHead {
    /// The host to route by.
    pub fn route_host<'b>(&self, buf: &'b [u8]) -> Option<&'b str> {
        std::str::from_utf8(self.route_host_bytes(buf)?).ok()
    }

    /// [`RequestHead::route_host`] as bytes, not yet read as text (a valid Host is ASCII).
    #[inline]
    pub fn route_host_bytes<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        let r = self.authority.clone().or_else(|| self.host.clone())?;
        buf.get(r)
    }

    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b str {
        match std::str::from_utf8(&buf[self.path.clone()]) {
            Ok("") | Err(_) => "/",
            Ok(p) => p,
        }
    }

    pub fn is_idempotent(&self) -> bool {
        matches!(
            self.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        )
    }
}

/// Whether a Connection field lists `name` (RFC 9110 section 7.6.1).
fn listed_in_connection(buf: &[u8], fields: &[Field], name: &[u8]) -> bool {
    fields
        .iter()
        .filter(|f| f.kind == Known::Connection)
        .any(|f| tokens(&buf[f.value.clone()]).any(|t| t.eq_ignore_ascii_case(name)))
}

/// Result of parsing what has arrived so far.
pub enum Parse<T> {
    Complete(T),
    Partial,
}

fn offset(base: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - base.as_ptr() as usize
}

fn range(base: &[u8], part: &[u8]) -> Range<usize> {
    let start = offset(base, part);
    start..start + part.len()
}

/// The range of `part` when it lies in `base`. httparse hands out a static `""` for some empty
/// parts (a status line without a reason), which must not be taken for a range of the buffer.
fn range_in(base: &[u8], part: &[u8]) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    (start + part.len() <= base.len()).then(|| start..start + part.len())
}

/// A field's name and value ranges; an empty value sits right after the colon, wherever
/// httparse points it.
fn field_ranges(base: &[u8], h: &httparse::Header<'_>) -> (Range<usize>, Range<usize>) {
    let name = range(base, h.name.as_bytes());
    let value = range_in(base, h.value).unwrap_or(name.end + 1..name.end + 1);
    (name, value)
}

/// Parses a request head from `buf`, filling `fields`. Errors are answered and close the
/// connection.
pub fn parse_request(buf: &[u8], fields: &mut Vec<Field>) -> Result<Parse<RequestHead>, ProxyError> {
    parse_request_on(buf, fields, &mut KnownHost::default())
}

/// [`parse_request`] for a connection whose last valid Host is `known`: a Host that repeats it is
/// not validated again, and a new valid one takes its place.
pub fn parse_request_on(
    buf: &[u8],
    fields: &mut Vec<Field>,
    known: &mut KnownHost,
) -> Result<Parse<RequestHead>, ProxyError> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(ProxyError::HeadersTooLarge),
        Err(httparse::Error::Version) => return Err(ProxyError::BadRequest("unsupported HTTP version")),
        Err(_) => return Err(ProxyError::BadRequest("unparsable request head")),
    };
    let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else {
        return Err(ProxyError::BadRequest("incomplete request line"));
    };
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| ProxyError::BadRequest("invalid method"))?;
    if method == Method::CONNECT {
        return Err(ProxyError::MethodNotAllowed);
    }
    let target_bytes = target.as_bytes();
    let target_range = range(buf, target_bytes);
    let (target, authority) = if target_bytes.first() == Some(&b'/') {
        (target_range, None)
    } else if target_bytes == b"*" {
        if method != Method::OPTIONS {
            return Err(ProxyError::BadRequest("'*' is a target for OPTIONS only"));
        }
        (target_range, None)
    } else {
        // Absolute form: the authority replaces Host; only the path and query are forwarded.
        let rest = strip_scheme(target_bytes).ok_or(ProxyError::BadRequest("invalid request target"))?;
        let auth_len = rest.iter().position(|&b| b == b'/' || b == b'?').unwrap_or(rest.len());
        let auth = &rest[..auth_len];
        if auth.is_empty() || !is_valid_host(auth) {
            return Err(ProxyError::BadRequest("invalid authority in request target"));
        }
        // "http://h" and "http://h?q" have the path "/": the slash is added when forwarding.
        (range(buf, &rest[auth_len..]), Some(range(buf, auth)))
    };
    let path_end = buf[target.clone()].iter().position(|&b| b == b'?').map_or(target.end, |q| target.start + q);
    let path = target.start..path_end;

    fields.clear();
    let mut host = None;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut te_seen = false;
    let mut close = minor == 0;
    let mut keep_alive = false;
    let mut conn_upgrade = false;
    let mut upgrade_header = false;
    let mut names_fields = false;
    for h in req.headers.iter() {
        let (name, value) = field_ranges(buf, h);
        let mut kind = classify(h.name.as_bytes());
        match kind {
            Known::Host => {
                if host.is_some() {
                    return Err(ProxyError::BadRequest("more than one Host header"));
                }
                if !known.is_valid(h.value) {
                    return Err(ProxyError::BadRequest("invalid Host header"));
                }
                host = Some(value.clone());
            }
            Known::ContentLength => {
                let n = parse_content_length(h.value).ok_or(ProxyError::BadRequest("invalid Content-Length"))?;
                if content_length.is_some_and(|c| c != n) {
                    return Err(ProxyError::BadRequest("conflicting Content-Length headers"));
                }
                if content_length.is_some() {
                    // The same length again ("7" and "07"): it goes on once.
                    kind = Known::HopByHop;
                }
                content_length = Some(n);
            }
            Known::TransferEncoding => {
                for t in tokens(h.value) {
                    if chunked || !t.eq_ignore_ascii_case(b"chunked") {
                        return Err(ProxyError::BadRequest("unsupported Transfer-Encoding (only a single chunked)"));
                    }
                    chunked = true;
                }
                te_seen = true;
            }
            Known::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        keep_alive = true;
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        conn_upgrade = true;
                    } else {
                        names_fields = true;
                    }
                }
            }
            Known::Upgrade => upgrade_header = true,
            _ => {}
        }
        fields.push(Field { name, value, kind });
    }
    if te_seen && !chunked {
        return Err(ProxyError::BadRequest("empty Transfer-Encoding"));
    }
    if chunked && content_length.is_some() {
        return Err(ProxyError::BadRequest("both Content-Length and Transfer-Encoding"));
    }
    if chunked && minor == 0 {
        return Err(ProxyError::BadRequest("Transfer-Encoding in an HTTP/1.0 request"));
    }
    if minor == 1 && host.is_none() && authority.is_none() {
        return Err(ProxyError::BadRequest("missing Host header"));
    }
    if minor == 0 && keep_alive && !listed_in_connection(buf, fields, b"close") {
        close = false;
    }
    let body = if chunked {
        BodyLen::Chunked
    } else {
        match content_length {
            Some(0) | None => BodyLen::None,
            Some(n) => BodyLen::Length(n),
        }
    };
    Ok(Parse::Complete(RequestHead {
        len,
        method,
        minor,
        target,
        path,
        authority,
        host,
        body,
        close,
        keep_alive,
        // RFC 9110 section 7.8: an Upgrade in an HTTP/1.0 request is ignored.
        upgrade: conn_upgrade && upgrade_header && minor >= 1,
        names_fields,
    }))
}

/// Bytes of a `reg-name` besides percent-encodings: unreserved and sub-delims (RFC 3986
/// section 3.2.2).
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~!$&'()*+,;=";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
};

/// The Host for a request that has none (HTTP/1.0 allows that; an HTTP/1.1 request must carry
/// one) going to `backend`: its name, as nginx sends its upstream's name, where that is a valid
/// Host; else empty, as RFC 9112 section 3.2 has a client send for a target without an
/// authority. Not empty where it can be: nginx and other servers refuse an empty Host with 400.
pub fn host_for_hostless(backend: &crate::routing::Backend) -> String {
    let name = backend.name();
    if is_valid_host(name.as_bytes()) { name } else { String::new() }
}

/// Whether `v` is `uri-host [":" port]`, the value of Host and of an authority without userinfo
/// (RFC 9110 section 7.2, RFC 3986 section 3.2). Empty is valid: it is what a client sends for a
/// target without an authority (RFC 9112 section 3.2). Slashes, spaces, `@` and every control or
/// non-ASCII byte are not, so that a Host can neither reach past the authority nor forge fields
/// in a log line.
pub fn is_valid_host(v: &[u8]) -> bool {
    // The common case in one pass, for the request path: a reg-name without escapes, then
    // nothing or a port. The rest (escapes, IP-literals, anything invalid) takes the long way.
    let host_len = v.iter().take_while(|&&b| REG_NAME[usize::from(b)]).count();
    match v.get(host_len) {
        None => true,
        Some(b':') => v[host_len + 1..].iter().all(u8::is_ascii_digit),
        Some(_) => is_valid_authority(v),
    }
}

/// The last valid Host a connection sent, for [`parse_request_on`]. A client sends the same Host
/// on each request of a keep-alive connection: comparing it with the last one costs less than
/// validating it again (docs/PERFORMANCE.md, "HTTP/1 before and after"). A Host longer than the
/// copy kept is validated every time.
pub struct KnownHost {
    len: u8,
    bytes: [u8; KNOWN_HOST],
}

/// The longest Host [`KnownHost`] keeps.
const KNOWN_HOST: usize = 63;

impl Default for KnownHost {
    fn default() -> Self {
        KnownHost { len: 0, bytes: [0; KNOWN_HOST] }
    }
}

impl KnownHost {
    /// Whether `v` is a valid Host ([`is_valid_host`]); a valid one is kept for the next call.
    #[inline(always)]
    pub fn is_valid(&mut self, v: &[u8]) -> bool {
        if v.len() == usize::from(self.len) && same_bytes(v, &self.bytes[..v.len()]) {
            return true;
        }
        self.learn(v)
    }

    #[inline(never)]
    fn learn(&mut self, v: &[u8]) -> bool {
        if !is_valid_host(v) {
            return false;
        }
        if let Some(kept) = self.bytes.get_mut(..v.len()) {
            kept.copy_from_slice(v);
            self.len = v.len() as u8;
        }
        true
    }
}

/// Whether `a` and `b`, of the same length, hold the same bytes: eight at a time, the last eight
/// overlapping, where a slice comparison would call `memcmp` (as long as the Host it saves).
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], i: usize| s.get(i..i + 8).map(|w| u64::from_ne_bytes(w.try_into().unwrap_or_default()));
    if n < 8 {
        return a.iter().zip(b).all(|(x, y)| x == y);
    }
    let mut i = 0;
    while i + 8 < n {
        if word(a, i) != word(b, i) {
            return false;
        }
        i += 8;
    }
    word(a, n - 8) == word(b, n - 8)
}

/// [`is_valid_host`] in full.
fn is_valid_authority(v: &[u8]) -> bool {
    let (host, port) = match v {
        // IP-literal: an IPv6 address or IPvFuture, which add ':' to the reg-name bytes.
        [b'[', rest @ ..] => {
            let Some(end) = rest.iter().position(|&b| b == b']') else { return false };
            if end == 0 || !rest[..end].iter().all(|&b| b == b':' || REG_NAME[usize::from(b)]) {
                return false;
            }
            match &rest[end + 1..] {
                [] => return true,
                [b':', port @ ..] => (&[][..], port),
                _ => return false,
            }
        }
        _ => match v.iter().position(|&b| b == b':') {
            Some(colon) => (&v[..colon], &v[colon + 1..]),
            None => (v, &[][..]),
        },
    };
    let mut i = 0;
    while i < host.len() {
        match host[i] {
            b'%' => {
                if !(host.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                    && host.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                {
                    return false;
                }
                i += 3;
            }
            b if REG_NAME[usize::from(b)] => i += 1,
            _ => return false,
        }
    }
    port.iter().all(u8::is_ascii_digit)
}

fn strip_scheme(target: &[u8]) -> Option<&[u8]> {
    for scheme in [&b"http://"[..], b"https://"] {
        if target.len() > scheme.len() && target[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return Some(&target[scheme.len()..]);
        }
    }
    None
}

/// Header lookup over parsed fields, for rule matching.
pub struct Fields<'a> {
    pub buf: &'a [u8],
    pub fields: &'a [Field],
}

impl HeaderLookup for Fields<'_> {
    fn for_each_value(&self, name: &http::HeaderName, mut f: impl FnMut(&[u8]) -> bool) {
        let name = name.as_str().as_bytes();
        for field in self.fields {
            if self.buf[field.name.clone()].eq_ignore_ascii_case(name) && f(trim(&self.buf[field.value.clone()])) {
                return;
            }
        }
    }
}

impl Fields<'_> {
    /// The first value of `name` (lower case), trimmed.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|f| self.buf[f.name.clone()].eq_ignore_ascii_case(name))
            .map(|f| trim(&self.buf[f.value.clone()]))
    }
}

/// [`write_request_as`] for a request that did not come over TLS.
#[cfg(test)]
pub fn write_request(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    client_ip: &[u8],
    drop_underscore: bool,
) {
    write_request_as(out, buf, head, fields, client_ip, drop_underscore, None, b"")
}

/// A rule's header edits as a head writer applies them while it copies the fields: names it
/// leaves out, and lines it ends the head with (README: a field `set` replaces every field of its
/// name, `add` goes beside them, `remove` drops them). The heads of requests without edits are
/// written by the writer's copy for [`NoEdits`], in which the edits' tests fold away.
trait Edits {
    /// Whether fields named `name` (any case) are left out.
    fn drops(&self, name: &[u8]) -> bool;
    /// Whether the field `f` of the head in `buf` is left out. (Without edits its name is not
    /// even looked at: no bounds check per field.)
    #[inline(always)]
    fn drops_field(&self, buf: &[u8], f: &Field) -> bool {
        self.drops(&buf[f.name.clone()])
    }
    /// The last bytes of the head: the fields set and added, and the empty line.
    fn head_end(&self) -> &[u8];
    /// Which of the fields the request writer adds itself are left out.
    fn drops_own(&self) -> OwnFields;
}

struct NoEdits;

impl Edits for NoEdits {
    #[inline(always)]
    fn drops(&self, _: &[u8]) -> bool {
        false
    }

    #[inline(always)]
    fn drops_field(&self, _: &[u8], _: &Field) -> bool {
        false
    }

    #[inline(always)]
    fn head_end(&self) -> &[u8] {
        b"\r\n"
    }

    #[inline(always)]
    fn drops_own(&self) -> OwnFields {
        OwnFields::default()
    }
}

impl Edits for HeaderEdits {
    #[inline(always)]
    fn drops(&self, name: &[u8]) -> bool {
        HeaderEdits::drops(self, name)
    }

    /// The name's length comes from its range: the name is sliced only when its length is one
    /// of those dropped.
    #[inline(always)]
    fn drops_field(&self, buf: &[u8], f: &Field) -> bool {
        self.may_drop_length(f.name.end.wrapping_sub(f.name.start)) && self.names_dropped(&buf[f.name.clone()])
    }

    #[inline(always)]
    fn head_end(&self) -> &[u8] {
        HeaderEdits::head_end(self)
    }

    #[inline(always)]
    fn drops_own(&self) -> OwnFields {
        self.drops_own
    }
}

/// A request that came over TLS.
#[derive(Clone, Copy, Debug, Default)]
pub struct Secure<'a> {
    /// `x-forwarded-client-cert` to send; None sends none.
    pub client_cert: Option<&'a str>,
}

/// The name of the header that carries the client certificate's identity (Envoy's).
pub const FORWARDED_CLIENT_CERT: &str = "x-forwarded-client-cert";

/// Writes the request to forward upstream: request line, the client's fields without hop-by-hop
/// ones (and, with `drop_underscore`, without those whose names hold an underscore), framing,
/// Host (`hostless`, from [`host_for_hostless`], for an HTTP/1.0 request without one), and
/// `x-forwarded-for` / `x-forwarded-proto`. For a request that came over TLS (`secure`
/// set) it goes with `x-forwarded-proto: https`, and any `x-forwarded-client-cert` the client
/// sent is replaced by the one `secure` gives (or dropped).
#[allow(clippy::too_many_arguments)]
pub fn write_request_as(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    client_ip: &[u8],
    drop_underscore: bool,
    secure: Option<Secure<'_>>,
    hostless: &[u8],
) {
    write_request_with(out, buf, head, fields, client_ip, drop_underscore, secure, hostless, &NoEdits)
}

/// [`write_request_as`] with a rule's `request_headers`: the fields they remove or set are left
/// out, the proxy's own too, and those they set or add go last. A copy of the writer of its own,
/// called (not inlined), so that requests without edits go on through the same code as before.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
pub fn write_request_edited(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    client_ip: &[u8],
    drop_underscore: bool,
    secure: Option<Secure<'_>>,
    hostless: &[u8],
    edits: &HeaderEdits,
) {
    write_request_with(out, buf, head, fields, client_ip, drop_underscore, secure, hostless, edits)
}

#[allow(clippy::too_many_arguments)]
fn write_request_with(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &RequestHead,
    fields: &[Field],
    client_ip: &[u8],
    drop_underscore: bool,
    secure: Option<Secure<'_>>,
    hostless: &[u8],
    edits: &impl Edits,
) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = &buf[head.target.clone()];
    if !target.starts_with(b"/") && target != b"*" {
        out.push(b'/');
    }
    out.extend_from_slice(target);
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for: [Option<Range<usize>>; 4] = Default::default();
    let mut n_xff = 0;
    let mut kept = KeptFields::new(buf);
    for f in fields {
        match f.kind {
            Known::Host if head.authority.is_some() => continue,
            Known::Connection | Known::HopByHop | Known::XForwardedProto | Known::TransferEncoding => continue,
            Known::ContentLength => {
                if head.body == BodyLen::None {
                    // Content-Length: 0 stays as the client sent it.
                    if !matches!(parse_content_length(&buf[f.value.clone()]), Some(0)) {
                        continue;
                    }
                }
            }
            Known::Upgrade if !head.upgrade => continue,
            Known::XForwardedFor => {
                if n_xff < forwarded_for.len() {
                    forwarded_for[n_xff] = Some(f.value.clone());
                    n_xff += 1;
                }
                continue;
            }
            // Connection may name fields to drop (RFC 9110 section 7.6.1), but never the ones
            // that frame and address the request, nor the Upgrade it asks for.
            Known::Host | Known::Upgrade => {}
            Known::Other | Known::Expect => {
                let name = &buf[f.name.clone()];
                if (drop_underscore && name.contains(&b'_'))
                    || (head.names_fields && listed_in_connection(buf, fields, name))
                    || (secure.is_some() && name.eq_ignore_ascii_case(FORWARDED_CLIENT_CERT.as_bytes()))
                {
                    continue;
                }
            }
        }
        if edits.drops_field(buf, f) {
            continue;
        }
        kept.push(out, f);
    }
    kept.finish(out);
    let own = edits.drops_own();
    if own.host {
        // Set by the rule, or removed.
    } else if let Some(auth) = &head.authority {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(&buf[auth.clone()]);
        out.extend_from_slice(b"\r\n");
    } else if head.host.is_none() {
        // An HTTP/1.0 request without Host: an HTTP/1.1 request carries one all the same.
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(hostless);
        out.extend_from_slice(b"\r\n");
    }
    if head.body == BodyLen::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if head.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    }
    let (xff, xfp) = (!own.forwarded_for, !own.forwarded_proto);
    let cert = secure.and_then(|s| s.client_cert).filter(|_| !own.client_cert);
    if xff {
        out.extend_from_slice(b"x-forwarded-for: ");
        for r in forwarded_for[..n_xff].iter().flatten() {
            out.extend_from_slice(trim(&buf[r.clone()]));
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(client_ip);
    }
    // The line end of x-forwarded-for goes with the next line, in one copy.
    let proto: &[u8] =
        if secure.is_some() { b"\r\nx-forwarded-proto: https\r\n" } else { b"\r\nx-forwarded-proto: http\r\n" };
    match (xff, xfp) {
        (true, true) => out.extend_from_slice(proto),
        (true, false) => out.extend_from_slice(b"\r\n"),
        (false, true) => out.extend_from_slice(&proto[2..]),
        (false, false) => {}
    }
    if let Some(cert) = cert {
        out.extend_from_slice(FORWARDED_CLIENT_CERT.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(cert.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(edits.head_end());
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    /// HTTP/1.`minor` (already weighed into `close`; the tests check it against the rest).
    #[cfg(test)]
    pub minor: u8,
    pub reason: Range<usize>,
    pub body: BodyLen,
    /// The upstream connection cannot serve another request: the upstream will close, the body
    /// is delimited by the close, or the framing was suspect (RFC 9112 sections 6.1 and 6.3).
    pub close: bool,
    /// A Transfer-Encoding field is present: it frames the body, and Content-Length is not
    /// forwarded (RFC 9112 section 6.3).
    pub has_te: bool,
    /// Connection names fields to remove besides the hop-by-hop ones.
    names_fields: bool,
}

impl ResponseHead {
    pub fn is_interim(&self) -> bool {
        (100..200).contains(&self.status) && self.status != 101
    }
}

/// Longest response head accepted from an upstream.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Parses a response head to a request (HEAD requests get no body whatever the fields say).
pub fn parse_response(
    buf: &[u8],
    fields: &mut Vec<Field>,
    head_request: bool,
) -> Result<Parse<ResponseHead>, &'static str> {
    let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parse::Partial),
        Err(_) => return Err("unparsable response head"),
    };
    let (Some(status), Some(minor)) = (resp.code, resp.version) else { return Err("incomplete status line") };
    if !(100..=599).contains(&status) {
        return Err("status code out of range");
    }
    let reason = resp.reason.and_then(|r| range_in(buf, r.as_bytes())).unwrap_or(0..0);
    fields.clear();
    let mut content_length: Option<u64> = None;
    let mut has_te = false;
    let mut chunked_seen = false;
    let mut chunked_last = None;
    let mut close = minor == 0;
    let mut names_fields = false;
    for h in resp.headers.iter() {
        let mut kind = classify(h.name.as_bytes());
        match kind {
            Known::ContentLength => {
                let n = parse_content_length(h.value).ok_or("invalid Content-Length")?;
                if content_length.is_some_and(|c| c != n) {
                    return Err("conflicting Content-Length headers");
                }
                if content_length.is_some() {
                    // The same length again ("7" and "07"): it goes on once.
                    kind = Known::HopByHop;
                }
                content_length = Some(n);
            }
            Known::TransferEncoding => {
                has_te = true;
                for t in tokens(h.value) {
                    let chunked = t.eq_ignore_ascii_case(b"chunked");
                    if chunked && chunked_seen {
                        // RFC 9112 section 6.1: never applied twice, so no reading is right.
                        return Err("chunked applied more than once");
                    }
                    chunked_seen |= chunked;
                    chunked_last = Some(chunked);
                }
            }
            Known::Connection => {
                for t in tokens(h.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if t.eq_ignore_ascii_case(b"keep-alive") {
                        if minor == 0 {
                            close = false;
                        }
                    } else if t.eq_ignore_ascii_case(b"upgrade") {
                        // Kept for a 101; removed with the other hop-by-hop fields otherwise.
                    } else {
                        names_fields = true;
                    }
                }
            }
            _ => {}
        }
        let (name, value) = field_ranges(buf, h);
        fields.push(Field { name, value, kind });
    }
    if has_te {
        if chunked_last.is_none() {
            return Err("empty Transfer-Encoding");
        }
        // RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length, and the pair may be a
        // response splitting attempt; section 6.1: Transfer-Encoding in an HTTP/1.0 message means
        // the framing is faulty. Either way the connection serves nothing after this response.
        if content_length.is_some() || minor == 0 {
            close = true;
        }
    }
    let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        BodyLen::None
    } else if let Some(chunked) = chunked_last {
        // Chunked not last: the body ends with the connection (RFC 9112 section 6.3).
        if chunked { BodyLen::Chunked } else { BodyLen::UntilClose }
    } else {
        match content_length {
            Some(0) => BodyLen::None,
            Some(n) => BodyLen::Length(n),
            None => BodyLen::UntilClose,
        }
    };
    if body == BodyLen::UntilClose {
        close = true;
    }
    Ok(Parse::Complete(ResponseHead {
        len,
        status,
        #[cfg(test)]
        minor,
        reason,
        body,
        close,
        has_te,
        names_fields,
    }))
}

/// Copies the fields a head keeps. Fields that lie next to each other in the received head,
/// separated by exactly CRLF, go out as one copy of their raw lines; a field dropped in between,
/// or any other line ending, starts a new piece.
struct KeptFields<'b> {
    buf: &'b [u8],
    /// From the first name to the last value of the piece not yet written.
    run: Option<Range<usize>>,
}

impl<'b> KeptFields<'b> {
    fn new(buf: &'b [u8]) -> Self {
        KeptFields { buf, run: None }
    }

    #[inline]
    fn push(&mut self, out: &mut Vec<u8>, f: &Field) {
        if let Some(run) = &mut self.run {
            if f.name.start == run.end + 2 && self.buf[run.end] == b'\r' {
                run.end = f.value.end;
                return;
            }
        }
        self.finish(out);
        self.run = Some(f.name.start..f.value.end);
    }

    #[inline]
    fn finish(&mut self, out: &mut Vec<u8>) {
        if let Some(run) = self.run.take() {
            out.extend_from_slice(&self.buf[run]);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// How the response goes back to the client.
#[derive(Clone, Copy, Debug)]
pub struct ResponseMode {
    /// Close the client connection after this response.
    pub close: bool,
    /// The client speaks HTTP/1.0 and asked for keep-alive.
    pub keep_alive_10: bool,
    /// Transfer-Encoding does not go out: the client speaks HTTP/1.0 (RFC 9112 section 6.1; a
    /// chunked body goes out de-chunked) or HTTP/2.
    pub drop_te: bool,
    /// A 101 to an upgrade request: keep Upgrade and say so.
    pub upgrade: bool,
}

/// Whether a field of an upstream's response goes on to the client: not the hop-by-hop ones,
/// nor those Connection names (RFC 9110 section 7.6.1) unless they frame the message, nor a
/// Content-Length that Transfer-Encoding overrides (RFC 9112 section 6.3).
#[inline]
pub fn keep_response_field(buf: &[u8], head: &ResponseHead, fields: &[Field], f: &Field, mode: ResponseMode) -> bool {
    match f.kind {
        Known::Connection | Known::HopByHop => false,
        Known::Upgrade => mode.upgrade,
        Known::TransferEncoding => !mode.drop_te,
        Known::ContentLength => !head.has_te,
        _ => !(head.names_fields && listed_in_connection(buf, fields, &buf[f.name.clone()])),
    }
}

/// Writes the response head for the client.
pub fn write_response_head(out: &mut Vec<u8>, buf: &[u8], head: &ResponseHead, fields: &[Field], mode: ResponseMode) {
    write_response_with(out, buf, head, fields, mode, &NoEdits)
}

/// [`write_response_head`] with a rule's `response_headers`: the fields they remove or set are
/// left out, and those they set or add go last. A copy of the writer of its own, as
/// [`write_request_edited`] is.
#[inline(never)]
pub fn write_response_edited(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    fields: &[Field],
    mode: ResponseMode,
    edits: &HeaderEdits,
) {
    write_response_with(out, buf, head, fields, mode, edits)
}

fn write_response_with(
    out: &mut Vec<u8>,
    buf: &[u8],
    head: &ResponseHead,
    fields: &[Field],
    mode: ResponseMode,
    edits: &impl Edits,
) {
    let status = head.status; // 100..=599, checked when parsed
    let code = [b'0' + (status / 100) as u8, b'0' + (status / 10 % 10) as u8, b'0' + (status % 10) as u8];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&code);
    out.push(b' ');
    out.extend_from_slice(&buf[head.reason.clone()]);
    out.extend_from_slice(b"\r\n");
    let mut kept = KeptFields::new(buf);
    for f in fields {
        if keep_response_field(buf, head, fields, f, mode) && !edits.drops_field(buf, f) {
            kept.push(out, f);
        }
    }
    kept.finish(out);
    if mode.upgrade {
        out.extend_from_slice(b"connection: upgrade\r\n");
    } else if mode.close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if mode.keep_alive_10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(edits.head_end());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &str) -> Result<(RequestHead, Vec<Field>), ProxyError> {
        let mut fields = Vec::new();
        match parse_request(text.as_bytes(), &mut fields)? {
            Parse::Complete(h) => Ok((h, fields)),
            Parse::Partial => panic!("partial: {text:?}"),
        }
    }

    fn forwarded(text: &str) -> String {
        let (h, f) = req(text).unwrap();
        let mut out = Vec::new();
        write_request(&mut out, text.as_bytes(), &h, &f, b"127.0.0.1", false);
        String::from_utf8(out).unwrap()
    }

    /// A rule's edits, from the JSON of its `request_headers`.
    fn edits(json: &str) -> HeaderEdits {
        use crate::routing::documents::{Rule, RuleDoc};
        let mut doc: RuleDoc = serde_json::from_str(r#"{"listener":"http","backends":[{"service":"a"}]}"#).unwrap();
        doc.request_headers = Some(serde_json::from_str(json).unwrap());
        (*Rule::from_doc("r", doc).unwrap().request_headers.unwrap()).clone()
    }

    /// `edits` applied the long way to a whole head written without them, as the README says
    /// they apply: the fields named by `remove` or `set` taken out, then those of `set` and `add`
    /// put last.
    fn edited_afterwards(head: &[u8], edits: &HeaderEdits) -> String {
        let text = std::str::from_utf8(head).unwrap();
        let mut lines = text.strip_suffix("\r\n\r\n").unwrap().split("\r\n");
        let mut out = format!("{}\r\n", lines.next().unwrap());
        let dropped: Vec<&str> =
            edits.remove.iter().chain(edits.set.iter().map(|(n, _)| n)).map(|n| n.as_str()).collect();
        for line in lines {
            let name = line.split(':').next().unwrap().trim();
            if !dropped.iter().any(|d| d.eq_ignore_ascii_case(name)) {
                out.push_str(line);
                out.push_str("\r\n");
            }
        }
        for (name, value) in edits.set.iter().chain(edits.add.iter()) {
            out.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
        out + "\r\n"
    }

    #[test]
    fn a_rules_edits_are_applied_as_a_head_is_written() {
        let e = edits(r#"{"set":{"x-env":"prod"},"add":{"x-tag":"b"},"remove":["X-Secret"]}"#);
        let text = "GET / HTTP/1.1\r\nhost: a\r\nX-Env: dev\r\nx-secret: s\r\nx-tag: a\r\n\r\n";
        let (h, f) = req(text).unwrap();
        let mut out = Vec::new();
        write_request_edited(&mut out, text.as_bytes(), &h, &f, b"127.0.0.1", false, None, b"", &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET / HTTP/1.1\r\nhost: a\r\nx-tag: a\r\nx-forwarded-for: 127.0.0.1\r\nx-forwarded-proto: http\r\n\
             x-env: prod\r\nx-tag: b\r\n\r\n"
        );

        // The proxy's own fields are edited like the client's.
        let e = edits(
            r#"{"set":{"Host":"b","x-forwarded-proto":"h3"},"remove":["x-forwarded-for","x-forwarded-client-cert"]}"#,
        );
        let text = "GET http://a/p HTTP/1.1\r\nX-Forwarded-For: 10.0.0.1\r\nx-a: 1\r\n\r\n";
        let (h, f) = req(text).unwrap();
        let mut out = Vec::new();
        let secure = Some(Secure { client_cert: Some("By=spiffe://a") });
        write_request_edited(&mut out, text.as_bytes(), &h, &f, b"127.0.0.1", false, secure, b"", &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /p HTTP/1.1\r\nx-a: 1\r\nhost: b\r\nx-forwarded-proto: h3\r\n\r\n"
        );

        let text = "HTTP/1.1 200 OK\r\nserver: nginx\r\nx-long-secret-field: 0123456789\r\nb: 2\r\nContent-Length: 2\r\n\r\nhi";
        let e = edits(r#"{"add":{"x-b":"a rather longer value"},"set":{"B":"3"},"remove":["x-long-secret-field"]}"#);
        let (r, f) = response(text.as_bytes(), false).unwrap();
        let mut out = Vec::new();
        write_response_edited(&mut out, text.as_bytes(), &r, &f, KEEP_ALIVE, &e);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nserver: nginx\r\nContent-Length: 2\r\nb: 3\r\nx-b: a rather longer value\r\n\r\n"
        );
        let mut out = Vec::new();
        write_response_edited(&mut out, text.as_bytes(), &r, &f, KEEP_ALIVE, &edits(r#"{"remove":["nothing-here"]}"#));
        assert_eq!(String::from_utf8(out).unwrap(), written(text.as_bytes(), KEEP_ALIVE), "nothing to edit");
    }

    /// Heads and edits drawn at random: what the writers make with the edits is the head they make
    /// without them, edited the long way afterwards.
    #[test]
    fn heads_written_with_edits_are_heads_edited_afterwards() {
        const REQUESTS: &[&str] = &[
            "GET /a?b=1 HTTP/1.1\r\nHost: a\r\nX-Env: dev\r\nx-tag: 1\r\nX-Tag: 2\r\nCookie: c=1\r\nX-Forwarded-For: 10.0.0.1\r\n\
             x-another-name-longer-than-sixty-three-bytes-that-no-edit-ever-names: 1\r\n\r\n",
            "POST http://b.test/v HTTP/1.1\r\nHost: evil\r\nContent-Length: 3\r\nConnection: x-tag\r\nx-tag: 1\r\nx_env: u\r\n\r\n",
            "GET / HTTP/1.0\r\nConnection: keep-alive\r\nX-Forwarded-Client-Cert: forged\r\nTraceparent: 00-ab-cd-01\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nx-env: a\r\nx-forwarded-proto: https\r\n\r\n",
        ];
        const RESPONSES: &[&str] = &[
            "HTTP/1.1 200 OK\r\nServer: b\r\nX-Env: 1\r\nContent-Length: 0\r\nx-tag: a\r\n\r\n",
            "HTTP/1.1 204 No Content\r\nConnection: x-env, close\r\nX-Env: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nHost: h\r\nx-forwarded-for: r\r\n\
             x-a-name-longer-than-sixty-three-bytes-which-share-one-bit-of-mask: 1\r\n\r\n",
        ];
        const NAMES: &[&str] = &[
            "x-env",
            "X-Tag",
            "host",
            "cookie",
            "set-cookie",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-client-cert",
            "traceparent",
            "server",
            "x-missing",
            "x-a-name-longer-than-sixty-three-bytes-which-share-one-bit-of-mask",
        ];
        let mut rng = fastrand::Rng::with_seed(9110);
        let pick = |rng: &mut fastrand::Rng| -> serde_json::Map<String, serde_json::Value> {
            (0..rng.usize(0..3))
                .map(|_| (NAMES[rng.usize(..NAMES.len())].to_owned(), format!("v{}", rng.u8(..)).into()))
                .collect()
        };
        let (mut fields, mut plain, mut edited) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..2_000 {
            let remove: Vec<&str> = (0..rng.usize(0..3)).map(|_| NAMES[rng.usize(..NAMES.len())]).collect();
            let json = serde_json::json!({ "set": pick(&mut rng), "add": pick(&mut rng), "remove": remove });
            let e = edits(&json.to_string());

            let text = REQUESTS[round % REQUESTS.len()].as_bytes();
            let Ok(Parse::Complete(h)) = parse_request(text, &mut fields) else { panic!("{round}") };
            let secure = (round % 3 != 0).then_some(Secure { client_cert: (round % 2 == 0).then_some("By=x") });
            let drop_underscore = round % 5 == 0;
            plain.clear();
            edited.clear();
            write_request_as(&mut plain, text, &h, &fields, b"127.0.0.1", drop_underscore, secure, b"");
            write_request_edited(&mut edited, text, &h, &fields, b"127.0.0.1", drop_underscore, secure, b"", &e);
            assert_eq!(String::from_utf8(edited.clone()).unwrap(), edited_afterwards(&plain, &e), "{json}");

            let text = RESPONSES[round % RESPONSES.len()].as_bytes();
            let Ok(Parse::Complete(r)) = parse_response(text, &mut fields, false) else { panic!("{round}") };
            let mode = ResponseMode {
                close: round % 2 == 0,
                keep_alive_10: round % 7 == 1,
                drop_te: round % 3 == 0,
                upgrade: false,
            };
            plain.clear();
            edited.clear();
            write_response_head(&mut plain, text, &r, &fields, mode);
            write_response_edited(&mut edited, text, &r, &fields, mode, &e);
            assert_eq!(String::from_utf8(edited.clone()).unwrap(), edited_afterwards(&plain, &e), "{json}");
        }
    }

    #[test]
    fn hop_by_hop_fields_are_removed_and_forwarding_fields_added() {
        let out = forwarded(
            "GET /a?b=1 HTTP/1.1\r\nHost: users.internal\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n\
             X-Secret: 1\r\nTE: trailers\r\nProxy-Connection: x\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\n\
             Accept: */*\r\n\r\n",
        );
        assert_eq!(
            out,
            "GET /a?b=1 HTTP/1.1\r\nHost: users.internal\r\nAccept: */*\r\n\
             x-forwarded-for: 10.1.1.1, 127.0.0.1\r\nx-forwarded-proto: http\r\n\r\n"
        );
    }

    #[test]
    fn every_field_a_connection_header_names_is_removed() {
        let names: Vec<String> = (0..12).map(|i| format!("X-Opt-{i}")).collect();
        let mut text = format!("GET / HTTP/1.1\r\nHost: a\r\nConnection: {}\r\n", names.join(", "));
        for n in &names {
            text.push_str(&format!("{n}: v\r\n"));
        }
        text.push_str("Accept: */*\r\n\r\n");
        let out = forwarded(&text);
        assert!(!out.contains("X-Opt"), "{out}");
        assert!(out.starts_with("GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n"), "{out}");
    }

    #[test]
    fn kept_fields_go_out_with_crlf_whatever_the_line_endings_received() {
        // Bare LF line ends, an empty value and trailing spaces: each field still ends in CRLF,
        // and a dropped field between two kept ones leaves no trace.
        let text =
            "HTTP/1.1 200 OK\nServer: b  \nX-Empty:\r\nX-A: 1\r\nKeep-Alive: 5\r\nX-B: 2\nContent-Length: 0\r\n\r\n";
        let mut f = Vec::new();
        let Parse::Complete(r) = parse_response(text.as_bytes(), &mut f, false).unwrap() else { panic!() };
        let mut out = Vec::new();
        let mode = ResponseMode { close: true, keep_alive_10: false, drop_te: false, upgrade: false };
        write_response_head(&mut out, text.as_bytes(), &r, &f, mode);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: b\r\nX-Empty:\r\nX-A: 1\r\nX-B: 2\r\nContent-Length: 0\r\nconnection: close\r\n\r\n"
        );
        let forwarded = forwarded("GET / HTTP/1.1\nHost: a\nX-A: 1 \r\nTE: x\r\nX-B:\n\n");
        assert!(forwarded.starts_with("GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nX-B:\r\nx-forwarded-for"), "{forwarded}");
    }

    #[test]
    fn absolute_form_targets_forward_the_path_and_replace_host() {
        let (h, _) = req("GET http://Users.Internal:8080/v1/x?q HTTP/1.1\r\nHost: evil\r\n\r\n").unwrap();
        let buf = b"GET http://Users.Internal:8080/v1/x?q HTTP/1.1\r\nHost: evil\r\n\r\n";
        assert_eq!(h.route_host(buf), Some("Users.Internal:8080"));
        assert_eq!(h.path(buf), "/v1/x");
        let out = forwarded("GET http://a.b/v1?q HTTP/1.1\r\nHost: evil\r\n\r\n");
        assert!(out.starts_with("GET /v1?q HTTP/1.1\r\n"), "{out}");
        assert!(out.contains("host: a.b\r\n") && !out.contains("evil"), "{out}");
        let out = forwarded("GET http://a.b HTTP/1.1\r\n\r\n");
        assert!(out.starts_with("GET / HTTP/1.1\r\n"), "{out}");
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let bad = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for text in bad {
            assert!(matches!(req(text), Err(ProxyError::BadRequest(_))), "{text:?}: {:?}", req(text).map(|r| r.0));
        }
        assert_eq!(req("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n").unwrap_err(), ProxyError::MethodNotAllowed);
    }

    #[test]
    fn framing_and_connection_flags() {
        let (h, _) = req("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").unwrap();
        assert_eq!(h.body, BodyLen::Chunked);
        let (h, _) = req("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\nContent-Length: 12\r\n\r\n").unwrap();
        assert_eq!(h.body, BodyLen::Length(12));
        let (h, _) = req("GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(h.close);
        let (h, _) = req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").unwrap();
        assert!(!h.close && h.keep_alive);
        let (h, _) = req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").unwrap();
        assert!(h.close);
        let (h, _) = req("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
        assert!(h.upgrade);
        let out = forwarded("GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(out.contains("Upgrade: websocket\r\n") && out.contains("connection: upgrade\r\n"), "{out}");
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let parse = |text: &str, head: bool| {
            let mut f = Vec::new();
            match parse_response(text.as_bytes(), &mut f, head).unwrap() {
                Parse::Complete(r) => r,
                Parse::Partial => panic!("partial"),
            }
        };
        assert_eq!(parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false).body, BodyLen::Length(3));
        assert_eq!(parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true).body, BodyLen::None);
        assert_eq!(parse("HTTP/1.1 204 No Content\r\n\r\n", false).body, BodyLen::None);
        assert_eq!(parse("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", false).body, BodyLen::None);
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n", false).body,
            BodyLen::Chunked
        );
        let r = parse("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.body, r.close), (BodyLen::UntilClose, true));
        let r = parse("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false);
        assert!(r.close);
        let r = parse("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n", false);
        assert!(!r.close);
        assert!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                &mut Vec::new(),
                false
            )
            .is_err()
        );
    }

    #[test]
    fn status_lines_without_a_reason_and_empty_values_are_relayed() {
        for (text, line) in [
            (&b"HTTP/1.1 200\r\nX-Empty:\r\nContent-Length: 0\r\n\r\n"[..], &b"HTTP/1.1 200 \r\n"[..]),
            (b"HTTP/1.1 404 \r\nX-Empty:   \r\n\r\n", b"HTTP/1.1 404 \r\n"),
            (b"HTTP/1.1 200 \xd6k\r\nX-Empty:\r\n\r\n", b"HTTP/1.1 200 "),
        ] {
            let mut f = Vec::new();
            let Parse::Complete(r) = parse_response(text, &mut f, false).unwrap() else { panic!() };
            let mut out = Vec::new();
            let mode = ResponseMode { close: false, keep_alive_10: false, drop_te: false, upgrade: false };
            write_response_head(&mut out, text, &r, &f, mode);
            assert!(out.starts_with(line), "{:?}", String::from_utf8_lossy(&out));
            // What goes out parses again, with the empty field in it.
            let mut again = Vec::new();
            let Ok(Parse::Complete(_)) = parse_response(&out, &mut again, false) else { panic!("{out:?}") };
            assert!(again.iter().any(|f| &out[f.name.clone()] == b"X-Empty" && f.value.is_empty()), "{out:?}");
        }
        let forwarded = forwarded("GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n");
        assert!(forwarded.contains("\r\nX-Empty:\r\n"), "{forwarded}");
    }

    /// Heads edited at random (bytes replaced, inserted, removed) are parsed and, when accepted,
    /// written out again, without a panic: with `panic = "abort"` a panic here ends the process.
    #[test]
    fn no_head_a_peer_sends_makes_parsing_or_writing_panic() {
        const REQUESTS: &[&[u8]] = &[
            b"GET /a?b=1 HTTP/1.1\r\nHost: users.internal\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Forwarded-For: 10.0.0.1\r\n\r\n",
            b"POST http://a.b/v1?q HTTP/1.1\r\nHost: evil\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET /ws HTTP/1.0\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Empty:\r\n\r\n",
        ];
        const RESPONSES: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nServer: b\r\nConnection: X-Internal, close\r\nX-Internal: 1\r\nContent-Length: 2\r\n\r\nhi",
            b"HTTP/1.0 101 Switching\r\nUpgrade: websocket\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"HTTP/1.1 204\r\nX-Empty:\r\nKeep-Alive: 5\r\n\r\n",
        ];
        let alphabet = b"\x00\t\n\r :/?,@*\x7f\x80\xffaZ09-";
        let mut rng = fastrand::Rng::with_seed(7230);
        let mut edit = |base: &[u8]| super::super::codec::edited_at_random(&mut rng, base, alphabet);
        let (mut fields, mut out) = (Vec::new(), Vec::new());
        for round in 0..50_000 {
            let text = edit(REQUESTS[round % REQUESTS.len()]);
            if let Ok(Parse::Complete(h)) = parse_request(&text, &mut fields) {
                let _ = (h.route_host(&text), h.path(&text), Fields { buf: &text, fields: &fields }.get(b"host"));
                out.clear();
                write_request(&mut out, &text, &h, &fields, b"127.0.0.1", round % 5 == 0);
            }
            let text = edit(RESPONSES[round % RESPONSES.len()]);
            if let Ok(Parse::Complete(r)) = parse_response(&text, &mut fields, round % 2 == 0) {
                let mode = ResponseMode { close: round % 3 == 0, keep_alive_10: false, drop_te: true, upgrade: true };
                out.clear();
                write_response_head(&mut out, &text, &r, &fields, mode);
            }
        }
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields() {
        let text = "HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nServer: b\r\n\r\nhi";
        let mut f = Vec::new();
        let Parse::Complete(r) = parse_response(text.as_bytes(), &mut f, false).unwrap() else { panic!() };
        let mut out = Vec::new();
        let mode = ResponseMode { close: false, keep_alive_10: false, drop_te: false, upgrade: false };
        write_response_head(&mut out, text.as_bytes(), &r, &f, mode);
        assert_eq!(String::from_utf8(out).unwrap(), "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: b\r\n\r\n");
    }

    fn response(text: &[u8], head_request: bool) -> Result<(ResponseHead, Vec<Field>), &'static str> {
        let mut f = Vec::new();
        match parse_response(text, &mut f, head_request)? {
            Parse::Complete(r) => Ok((r, f)),
            Parse::Partial => panic!("partial: {:?}", String::from_utf8_lossy(text)),
        }
    }

    fn written(text: &[u8], mode: ResponseMode) -> String {
        let (r, f) = response(text, false).unwrap();
        let mut out = Vec::new();
        write_response_head(&mut out, text, &r, &f, mode);
        String::from_utf8(out).unwrap()
    }

    const KEEP_ALIVE: ResponseMode =
        ResponseMode { close: false, keep_alive_10: false, drop_te: false, upgrade: false };

    #[test]
    fn a_host_is_an_authority_and_nothing_more() {
        // The fast path and the full check agree on everything.
        let mut rng = fastrand::Rng::with_seed(3986);
        let alphabet = b"aZ09-._~%[]:@/ !\"\x7f\xe9";
        for _ in 0..100_000 {
            let text: Vec<u8> = (0..rng.usize(0..12)).map(|_| alphabet[rng.usize(..alphabet.len())]).collect();
            assert_eq!(is_valid_host(&text), is_valid_authority(&text), "{:?}", String::from_utf8_lossy(&text));
        }
        for good in [
            "a",
            "a.test",
            "A.Test:8080",
            "a:",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8080",
            "",
            "a%2Db",
            "a_b~c",
            "x!$&'()*+,;=",
        ] {
            assert!(is_valid_host(good.as_bytes()), "{good:?}");
            let text = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(req(&text).is_ok(), "{text:?}");
        }
        for bad in [
            &b"a.test/../x y"[..],
            b"a b",
            b"user@a",
            b"a/b",
            b"a?b",
            b"a#b",
            b"a\\b",
            b"a:80x",
            b"a:8:0",
            b"[::1",
            b"[]",
            b"[::1]x",
            b"a%2",
            b"a%zz",
            b"a\"b",
            b"caf\xc3\xa9",
            b"a\x7f",
        ] {
            assert!(!is_valid_host(bad), "{:?}", String::from_utf8_lossy(bad));
            let mut text = b"GET / HTTP/1.1\r\nHost: ".to_vec();
            text.extend_from_slice(bad);
            text.extend_from_slice(b"\r\n\r\n");
            let mut fields = Vec::new();
            assert!(
                matches!(parse_request(&text, &mut fields), Err(ProxyError::BadRequest(_))),
                "{:?}",
                String::from_utf8_lossy(&text)
            );
        }
        assert!(req("GET http://a%zz/ HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(req("GET http://a:1:2/ HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        let mut rng = fastrand::Rng::with_seed(14);
        for _ in 0..20_000 {
            let n = rng.usize(0..40);
            let a: Vec<u8> = (0..n).map(|_| rng.u8(b'a'..b'd')).collect();
            let mut b = a.clone();
            if rng.bool() && n > 0 {
                b[rng.usize(..n)] = rng.u8(b'a'..b'd');
            }
            assert_eq!(same_bytes(&a, &b), a == b, "{a:?} {b:?}");
        }
        assert!(!same_bytes(b"ab", b"abc"));
    }

    #[test]
    fn a_connection_s_known_host_passes_its_repeats_and_nothing_else() {
        let mut known = KnownHost::default();
        let mut fields = Vec::new();
        let mut parse = |host: &[u8], known: &mut KnownHost| {
            let mut text = b"GET / HTTP/1.1\r\nHost: ".to_vec();
            text.extend_from_slice(host);
            text.extend_from_slice(b"\r\n\r\n");
            parse_request_on(&text, &mut fields, known).map(|_| ())
        };
        assert!(parse(b"a.test:8080", &mut known).is_ok());
        assert_eq!(&known.bytes[..usize::from(known.len)], b"a.test:8080", "a valid Host is kept");
        assert!(parse(b"a.test:8080", &mut known).is_ok(), "its repeat passes");
        // Invalid Hosts after a valid one, the same length and not: each is still refused, and
        // the one kept stays.
        for bad in [&b"a.test:808/"[..], b"a@test:8080", b"a b", b"a.test:80800/x"] {
            assert!(matches!(parse(bad, &mut known), Err(ProxyError::BadRequest(_))), "{bad:?}");
            assert_eq!(&known.bytes[..usize::from(known.len)], b"a.test:8080");
        }
        // Another valid Host takes its place; one too long to keep is validated every time.
        assert!(parse(b"b.test", &mut known).is_ok());
        assert_eq!(&known.bytes[..usize::from(known.len)], b"b.test");
        let long = [b'a'; KNOWN_HOST + 1];
        assert!(parse(&long, &mut known).is_ok());
        assert_eq!(&known.bytes[..usize::from(known.len)], b"b.test");
        let mut long_bad = long;
        long_bad[KNOWN_HOST] = b'/';
        assert!(parse(&long_bad, &mut known).is_err());
    }

    #[test]
    fn connection_never_takes_away_host_framing_or_the_upgrade_asked_for() {
        let out = forwarded(
            "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, host, content-length, transfer-encoding, foo\r\n\
             Upgrade: websocket\r\nFoo: 1\r\nContent-Length: 0\r\n\r\n",
        );
        assert!(out.contains("\r\nHost: a\r\n"), "{out}");
        assert!(out.contains("\r\nUpgrade: websocket\r\n") && out.contains("\r\nconnection: upgrade\r\n"), "{out}");
        assert!(out.contains("\r\nContent-Length: 0\r\n"), "{out}");
        assert!(!out.contains("Foo"), "{out}");
        let out = written(
            b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding, x-a\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n",
            KEEP_ALIVE,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n");
        let out = written(
            b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            KEEP_ALIVE,
        );
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
    }

    #[test]
    fn a_request_forwarded_as_http_1_1_always_has_a_host_and_an_http_1_0_one_no_upgrade() {
        let out = forwarded("GET /ws HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(out.starts_with("GET /ws HTTP/1.1\r\nhost: \r\n"), "{out}");
        assert!(!out.to_ascii_lowercase().contains("upgrade"), "{out}");
        let out = forwarded("GET / HTTP/1.0\r\nHost: a.test\r\n\r\n");
        assert!(out.contains("\r\nHost: a.test\r\n") && !out.contains("host: \r\n"), "{out}");
    }

    #[test]
    fn a_request_without_host_is_given_the_backends_name_where_that_is_a_valid_host() {
        use crate::routing::{Addr, Backend, ServiceName};
        let service = |name: &str| Backend::Service {
            service: ServiceName::new(name),
            subset: Default::default(),
            endpoint: None,
            weight: 1,
        };
        assert_eq!(host_for_hostless(&service("users.v1")), "users.v1");
        assert_eq!(host_for_hostless(&service("a b@c")), "", "not a Host: empty, as RFC 9112 section 3.2 allows");
        let addr = Backend::Address { addr: Addr::from_parts("10.0.0.1", 8080).unwrap(), weight: 1 };
        assert_eq!(host_for_hostless(&addr), "10.0.0.1:8080");
    }

    #[test]
    fn underscored_names_are_dropped_when_asked() {
        let text = "GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nX-Real: 1\r\n\r\n";
        let (h, f) = req(text).unwrap();
        let mut out = Vec::new();
        write_request(&mut out, text.as_bytes(), &h, &f, b"127.0.0.1", true);
        let out = String::from_utf8(out).unwrap();
        assert!(!out.contains("6.6.6.6") && out.contains("X-Real: 1"), "{out}");
        assert!(forwarded(text).contains("X_Forwarded_For: 6.6.6.6\r\n"), "kept by default, as Envoy and HAProxy do");
    }

    #[test]
    fn transfer_encoding_overrides_content_length_and_the_connection_is_not_reused() {
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (r, _) = response(text, false).unwrap();
        assert_eq!((r.body, r.close, r.has_te), (BodyLen::Chunked, true, true));
        assert_eq!(written(text, KEEP_ALIVE), "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        let to_http_1_0 = ResponseMode { close: true, keep_alive_10: false, drop_te: true, upgrade: false };
        assert_eq!(written(text, to_http_1_0), "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
        let (r, _) =
            response(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", false)
                .unwrap();
        assert!(r.close, "Transfer-Encoding in HTTP/1.0 is faulty framing");
        let (r, _) = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.close), (BodyLen::UntilClose, true));
        let (r, _) = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false).unwrap();
        assert_eq!((r.body, r.close), (BodyLen::Chunked, false));
        for bad in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\r\nContent-Length: 1\r\n\r\n",
        ] {
            assert!(response(bad, false).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// How a strict HTTP/1.1 client frames a response it receives (RFC 9112 section 6.3),
    /// written apart from the parser under test: None if it must refuse the response.
    fn client_framing(head: &[u8], head_request: bool) -> Option<(BodyLen, bool)> {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(_)) = resp.parse(head) else { return None };
        let status = resp.code?;
        let named = |n: &'static str| resp.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(n));
        let lengths: Vec<&[u8]> = named("content-length").map(|h| h.value).collect();
        let codings: Vec<&[u8]> =
            named("transfer-encoding").flat_map(|h| h.value.split(|&b| b == b',')).map(trim).collect();
        let close = named("connection").any(|h| h.value.eq_ignore_ascii_case(b"close"));
        if !lengths.is_empty() && !codings.is_empty() {
            return None; // ambiguous: a smuggling shape
        }
        if lengths.windows(2).any(|w| w[0] != w[1]) {
            return None;
        }
        let body = if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            BodyLen::None
        } else if let Some(last) = codings.last() {
            if last.eq_ignore_ascii_case(b"chunked") { BodyLen::Chunked } else { BodyLen::UntilClose }
        } else if let Some(n) = lengths.first() {
            match parse_content_length(n)? {
                0 => BodyLen::None,
                n => BodyLen::Length(n),
            }
        } else {
            BodyLen::UntilClose
        };
        Some((body, close))
    }

    /// Response heads edited at random, relayed to HTTP/1.1 and HTTP/1.0 clients as the engine
    /// relays them: whatever a strict client makes of the head that goes out is what the engine
    /// then sends (the same length, chunked only if still chunked, a close-delimited body only
    /// with `connection: close`), never a head with two readings; and a connection whose framing
    /// was suspect is never kept.
    #[test]
    fn heads_edited_at_random_go_out_framed_as_they_are_relayed() {
        const RESPONSES: &[&[u8]] = &[
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nConnection: x-a\r\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\nContent-Length: 12\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\nContent-Length: 7\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        ];
        let alphabet = b"\t\r\n :,0159aAcCdeEgGhiklnprsTtuz-";
        let mut rng = fastrand::Rng::with_seed(9110);
        let (mut fields, mut out) = (Vec::new(), Vec::new());
        let mut relayed = 0;
        for round in 0..50_000 {
            let text = super::super::codec::edited_at_random(&mut rng, RESPONSES[round % RESPONSES.len()], alphabet);
            let head_request = round % 7 == 0;
            let Ok(Parse::Complete(r)) = parse_response(&text, &mut fields, head_request) else { continue };
            let suspect = r.has_te && (fields.iter().any(|f| f.kind == Known::ContentLength) || r.minor == 0);
            assert!(!suspect || r.close, "kept a connection after {:?}", String::from_utf8_lossy(&text));
            if r.status == 101 {
                continue; // a switch: no HTTP framing follows
            }
            for client_minor in [0u8, 1] {
                // As the HTTP/1 engine decides it.
                let dechunk = client_minor == 0 && r.body == BodyLen::Chunked;
                let close = dechunk || r.body == BodyLen::UntilClose || round % 3 == 0;
                let mode = ResponseMode {
                    close,
                    keep_alive_10: client_minor == 0 && !close,
                    drop_te: client_minor == 0,
                    upgrade: false,
                };
                out.clear();
                write_response_head(&mut out, &text, &r, &fields, mode);
                let sent = if dechunk { BodyLen::UntilClose } else { r.body };
                let seen = client_framing(&out, head_request);
                let shown = || format!("{:?}\n->\n{:?}", String::from_utf8_lossy(&text), String::from_utf8_lossy(&out));
                let Some((framing, says_close)) = seen else { panic!("a head with two readings:\n{}", shown()) };
                assert_eq!(framing, sent, "framed one way, relayed another:\n{}", shown());
                assert_eq!(says_close, close, "{}", shown());
                if client_minor == 0 {
                    let mut again = Vec::new();
                    let Ok(Parse::Complete(_)) = parse_response(&out, &mut again, head_request) else {
                        panic!("{}", shown())
                    };
                    let te = again.iter().any(|f| f.kind == Known::TransferEncoding);
                    assert!(!te, "Transfer-Encoding to HTTP/1.0:\n{}", shown());
                }
                relayed += 1;
            }
        }
        assert!(relayed > 10_000, "enough heads were accepted to mean something: {relayed}");
    }
}
