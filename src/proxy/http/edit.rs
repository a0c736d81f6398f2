//! A rule's header edits (README: "Rule documents", `request_headers`, `response_headers`)
//! applied to an HTTP/1.1 head already written for forwarding. Only requests of a rule with edits
//! pay for it: the head is written once more.

use crate::routing::documents::HeaderEdits;

/// Rewrites the head that starts at `start` in `out` (anything after it, a body's first bytes,
/// stays): fields named in `remove` or `set` are dropped, then `set` and `add` are appended.
pub fn edit_head(out: &mut Vec<u8>, start: usize, edits: &HeaderEdits) {
    let Some(end) = out[start..].windows(4).position(|w| w == b"\r\n\r\n").map(|p| start + p + 2) else { return };
    let mut edited = Vec::with_capacity(end - start + 64);
    let mut lines = out[start..end].split_inclusive(|&b| b == b'\n');
    if let Some(first) = lines.next() {
        edited.extend_from_slice(first);
    }
    for line in lines {
        let name = line.split(|&b| b == b':').next().unwrap_or(line);
        if !edits.drops(name.trim_ascii()) {
            edited.extend_from_slice(line);
        }
    }
    for (name, value) in edits.set.iter().chain(edits.add.iter()) {
        edited.extend_from_slice(name.as_str().as_bytes());
        edited.extend_from_slice(b": ");
        edited.extend_from_slice(value.as_bytes());
        edited.extend_from_slice(b"\r\n");
    }
    edited.extend_from_slice(&out[end..]);
    out.truncate(start);
    out.extend_from_slice(&edited);
}

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

/// The same edits on an HTTP/2 response's header map.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::documents::{HeaderEditsDoc, Rule, RuleDoc};

    fn edits(json: &str) -> HeaderEdits {
        let mut doc: RuleDoc = serde_json::from_str(r#"{"listener":"http","backends":[{"service":"a"}]}"#).unwrap();
        doc.request_headers = Some(serde_json::from_str::<HeaderEditsDoc>(json).unwrap());
        (*Rule::from_doc("r", doc).unwrap().request_headers.unwrap()).clone()
    }

    #[test]
    fn fields_are_set_added_and_removed_and_the_body_stays() {
        let e = edits(r#"{"set":{"x-env":"prod"},"add":{"x-tag":"b"},"remove":["X-Secret"]}"#);
        let mut out = b"junk".to_vec();
        out.extend_from_slice(b"GET / HTTP/1.1\r\nhost: a\r\nX-Env: dev\r\nx-secret: s\r\nx-tag: a\r\n\r\nbody");
        edit_head(&mut out, 4, &e);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "junkGET / HTTP/1.1\r\nhost: a\r\nx-tag: a\r\nx-env: prod\r\nx-tag: b\r\n\r\nbody");
    }
}
