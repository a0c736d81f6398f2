//! A rule's header edits (README: "Rule documents", `request_headers`, `response_headers`)
//! applied to an HTTP/1.1 head already written for forwarding. Only requests of a rule with edits
//! pay for it: the head is written once more.

use crate::routing::documents::HeaderEdits;

/// Rewrites the head that starts at `start` in `out` (anything after it, a body's first bytes,
/// stays): fields named in `remove` or `set` are dropped, then `set` and `add` are appended.
///
/// In place, with no allocation: kept lines move left over dropped ones (line ends found with
/// `memchr`), and the new fields go into the room that leaves, the rest moved once to fit.
pub fn edit_head(out: &mut Vec<u8>, start: usize, edits: &HeaderEdits) {
    let Some(nl) = memchr::memchr(b'\n', &out[start..]) else { return };
    let mut read = start + nl + 1;
    let mut write = read;
    loop {
        let Some(nl) = memchr::memchr(b'\n', &out[read..]) else {
            // No end of head (zkroute writes whole heads): what was dropped stays dropped.
            close_gap(out, write, read);
            return;
        };
        let end = read + nl + 1;
        if end - read <= 2 {
            break; // the empty line that ends the head
        }
        let line = &out[read..end];
        let name = match memchr::memchr(b':', line) {
            Some(colon) => &line[..colon],
            None => line,
        };
        if !edits.drops(name.trim_ascii()) {
            if write != read {
                out.copy_within(read..end, write);
            }
            write += end - read;
        }
        read = end;
    }
    let added: usize = edits.set.iter().chain(edits.add.iter()).map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if added > read - write {
        // Not room enough where fields were dropped: move the rest (the empty line on) right.
        let (len, more) = (out.len(), added - (read - write));
        out.resize(len + more, 0);
        out.copy_within(read..len, read + more);
        read += more;
    }
    for (name, value) in edits.set.iter().chain(edits.add.iter()) {
        for part in [name.as_str().as_bytes(), b": ", value.as_bytes(), b"\r\n"] {
            out[write..write + part.len()].copy_from_slice(part);
            write += part.len();
        }
    }
    close_gap(out, write, read);
}

/// Moves everything from `read` on to `write` (which is not after it), shortening `out`.
fn close_gap(out: &mut Vec<u8>, write: usize, read: usize) {
    if write < read {
        let len = out.len();
        out.copy_within(read..len, write);
        out.truncate(len - (read - write));
    }
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

    #[test]
    fn fields_fit_where_others_were_dropped_or_move_the_rest() {
        let head = "HTTP/1.1 200 OK\r\nserver: nginx\r\nx-long-secret-field: 0123456789\r\nb: 2\r\n\r\n{}";
        let run = |json: &str| {
            let mut out = head.as_bytes().to_vec();
            edit_head(&mut out, 0, &edits(json));
            String::from_utf8(out).unwrap()
        };
        // Room to spare: the new field goes where the removed one was.
        assert_eq!(
            run(r#"{"set":{"x-a":"1"},"remove":["x-long-secret-field"]}"#),
            "HTTP/1.1 200 OK\r\nserver: nginx\r\nb: 2\r\nx-a: 1\r\n\r\n{}"
        );
        // No room: the rest moves right.
        assert_eq!(
            run(r#"{"add":{"x-b":"a rather longer value"},"set":{"B":"3"}}"#),
            "HTTP/1.1 200 OK\r\nserver: nginx\r\nx-long-secret-field: 0123456789\r\nb: 3\r\nx-b: a rather longer value\r\n\r\n{}"
        );
        assert_eq!(run(r#"{"remove":["nothing-here"]}"#), head, "nothing to edit: the head as it was");
        // A head without its end (zkroute never writes one): a dropped field stays dropped.
        let mut out = b"GET / HTTP/1.1\r\nx-a: 1\r\nhost: a\r\n".to_vec();
        edit_head(&mut out, 0, &edits(r#"{"remove":["x-a"]}"#));
        assert_eq!(out, b"GET / HTTP/1.1\r\nhost: a\r\n");
    }
}
