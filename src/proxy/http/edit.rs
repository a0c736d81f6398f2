//! What the proxy puts in heads besides what it copies: a rule's header edits (README: "Rule
//! documents", `request_headers`, `response_headers`) on an HTTP/2 header map, and `x-request-id`.
//! HTTP/1 heads get their edits as they are written (`head.rs`), not here.

use crate::routing::documents::HeaderEdits;

/// A new `x-request-id`: 128 random bits as 32 hex digits.
pub fn new_request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Appends a field to the head that `out` holds whole (and nothing after it).
pub fn insert_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    debug_assert!(out.ends_with(b"\r\n\r\n"));
    let at = out.len() - 2;
    let line = [name, b": ", value, b"\r\n"].concat();
    out.splice(at..at, line);
}

/// A rule's edits on a header map: requests and responses of HTTP/2 clients and upstreams.
pub fn edit_map(headers: &mut http::HeaderMap, edits: &HeaderEdits) {
    for name in edits.remove.iter() {
        headers.remove(name);
    }
    for (name, value) in edits.set.iter() {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in edits.add.iter() {
        headers.append(name.clone(), value.clone());
    }
}
