#![allow(clippy::unwrap_used)]
//! Hostile requests and responses as a whole: the regression corpus (`tests/corpus/hostile.toml`)
//! replayed through zkroute with the outcome each case owes, and upstream answers edited at
//! random read by strict clients. Every engine change runs against both.

mod support;

use std::time::Duration;

use support::h2client::{h2_client, h2_get, h2_send};
use support::scripted::{Act, Upstream, proxy_to, send};
use support::wire::Wire;

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
const WAIT: Duration = Duration::from_secs(10);

// ---- the regression corpus ------------------------------------------------------------------

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Corpus {
    request: Vec<RequestCase>,
    response: Vec<ResponseCase>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RequestCase {
    name: String,
    send: String,
    status: u16,
    forwarded: Option<bool>,
    #[serde(default)]
    upstream_has: Vec<String>,
    #[serde(default)]
    upstream_lacks: Vec<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ResponseCase {
    name: String,
    answer: String,
    #[serde(default)]
    close: bool,
    status: u16,
    body: Option<String>,
    #[serde(default)]
    client_lacks: Vec<String>,
    #[serde(default = "yes")]
    pooled: bool,
    #[serde(default)]
    truncated: bool,
    #[serde(default)]
    h2_reset: bool,
}

fn yes() -> bool {
    true
}

/// The corpus's escapes: \r \n \t \\ and \xHH.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'\\') => out.push(b'\\'),
            Some(b'x') => {
                let hex = [bytes.next().unwrap(), bytes.next().unwrap()];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
            }
            other => panic!("unknown escape \\{:?} in {text:?}", other.map(char::from)),
        }
    }
    out
}

fn load_corpus() -> Corpus {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/hostile.toml");
    toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What each upstream connection received beyond what `before` held of it.
fn received_since(upstream: &Upstream, before: &[usize]) -> String {
    (0..upstream.conns())
        .map(|i| {
            let all = upstream.received(i);
            all[before.get(i).copied().unwrap_or(0).min(all.len())..].to_owned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostile_corpus_is_answered_as_recorded() {
    let corpus = load_corpus();
    let mut failures = Vec::new();

    // Requests.
    let upstream = Upstream::answering(OK).await;
    let (proxy, _routes) = proxy_to(upstream.addr, "").await;
    let addr = proxy.listener("http");
    for case in &corpus.request {
        let before: Vec<usize> = (0..upstream.conns()).map(|i| upstream.received(i).len()).collect();
        let requests = upstream.requests();
        let resp = Wire::exchange(addr, unescape(&case.send)).await;
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("request {:?}: {what}", case.name));
            }
        };
        match resp {
            Ok(r) => check(r.status == case.status, format!("status {} (wanted {})", r.status, case.status)),
            Err(e) => check(false, e),
        }
        let forwarded = upstream.requests() > requests;
        check(forwarded == case.forwarded.unwrap_or(case.status < 400), format!("forwarded: {forwarded}"));
        let seen = received_since(&upstream, &before);
        for has in &case.upstream_has {
            let has = String::from_utf8(unescape(has)).unwrap();
            check(seen.contains(&has), format!("the upstream got no {has:?} in {seen:?}"));
        }
        for lacks in &case.upstream_lacks {
            let lacks = String::from_utf8(unescape(lacks)).unwrap();
            check(!seen.contains(&lacks), format!("the upstream got {lacks:?} in {seen:?}"));
        }
    }
    proxy.stop().await;

    // Responses: over HTTP/1.1 with a second request behind each, then over h2c.
    let answers: Vec<(Vec<u8>, bool)> = corpus.response.iter().map(|c| (unescape(&c.answer), c.close)).collect();
    let upstream = Upstream::start(move |r| {
        let Some(i) = r.path().strip_prefix("/case/").and_then(|n| n.parse::<usize>().ok()) else {
            return vec![send(OK)];
        };
        let (bytes, close) = &answers[i];
        let mut acts = vec![Act::Send(bytes.clone())];
        if *close {
            acts.push(Act::Close);
        }
        acts
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "idle_timeout = \"2s\"\n").await;
    let addr = proxy.listener("http");
    for (i, case) in corpus.response.iter().enumerate() {
        let mut check = |ok: bool, what: String| {
            if !ok {
                failures.push(format!("response {:?}: {what}", case.name));
            }
        };
        let mut client = Wire::connect(addr).await;
        client.send(format!("GET /case/{i} HTTP/1.1\r\nHost: h\r\n\r\n")).await;
        match client.response(false).await {
            Err(e) => check(case.truncated && e.starts_with("closed inside"), format!("HTTP/1.1: {e}")),
            Ok(r) => {
                check(!case.truncated, format!("not truncated: {:?}", r.body_text()));
                check(r.status == case.status, format!("HTTP/1.1 status {} (wanted {})", r.status, case.status));
                if let Some(body) = &case.body {
                    check(r.body_text() == *body, format!("HTTP/1.1 body {:?}", r.body_text()));
                }
                for name in &case.client_lacks {
                    check(r.header(name).is_none(), format!("the client got {name}: {}", r.head));
                }
                if r.closes() {
                    check(client.closes_within(WAIT).await.is_ok(), "closed after the response".into());
                } else {
                    // The client connection is still in step: a second request gets its answer.
                    client.send(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n").await;
                    match client.response(false).await {
                        Ok(next) => check(next.body_text() == "ok", format!("the next answer {:?}", next.body_text())),
                        Err(e) => check(false, format!("the next answer: {e}")),
                    }
                }
            }
        }
        if !case.pooled {
            // Another request goes where the pool sends it: never behind this one.
            Wire::exchange(addr, b"GET /after HTTP/1.1\r\nHost: h\r\n\r\n").await.ok();
            let marker = format!("GET /case/{i} ");
            let conn = (0..upstream.conns()).find(|&c| upstream.received(c).contains(&marker));
            match conn.map(|c| upstream.received(c)) {
                Some(seen) => {
                    let after = &seen[seen.find(&marker).unwrap()..];
                    let more = after.split_once("\r\n\r\n").map_or("", |(_, rest)| rest);
                    check(more.is_empty(), format!("its connection was used again for {more:?}"));
                }
                None => check(false, "the request never reached the upstream".into()),
            }
        }
        let mut h2c = h2_client(addr).await;
        match h2_send(&mut h2c, h2_get(&format!("http://h/case/{i}"))).await {
            Err(_) if case.truncated || case.h2_reset => {}
            Ok(r) if case.truncated || case.h2_reset => check(false, format!("h2: not reset: {r:?}")),
            Ok(r) => {
                check(r.status().as_u16() == case.status, format!("h2 status {}", r.status()));
                if let Some(body) = &case.body {
                    check(r.body() == body.as_bytes(), format!("h2 body {:?}", r.body()));
                }
            }
            Err(e) => check(false, format!("h2: {e}")),
        }
    }
    proxy.stop().await;
    assert!(failures.is_empty(), "{} corpus cases failed:\n{}", failures.len(), failures.join("\n"));
}

// ---- responses edited at random -------------------------------------------------------------

/// What a strict client makes of `bytes` as the whole answer to a request: Some(true) when it
/// is one complete, well-framed response (after any interim ones) with nothing after it, on a
/// connection the upstream may keep; Some(false) when it is anything else. Written apart from
/// zkroute's parser, so that the two can disagree.
fn complete_and_clean(bytes: &[u8], head_request: bool) -> bool {
    let mut rest = bytes;
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = resp.parse(rest) else { return false };
        let (Some(status), Some(minor)) = (resp.code, resp.version) else { return false };
        let named = |n: &'static str| resp.headers.iter().filter(move |h| h.name.eq_ignore_ascii_case(n));
        let tokens = |n: &'static str| {
            named(n)
                .flat_map(|h| h.value.split(|&b| b == b','))
                .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
                .filter(|t| !t.is_empty())
                .collect::<Vec<_>>()
        };
        let connection = tokens("connection");
        let codings = tokens("transfer-encoding");
        let lengths: Vec<&[u8]> = named("content-length").map(|h| h.value).collect();
        let te = named("transfer-encoding").next().is_some();
        let body = &rest[len..];
        if (100..200).contains(&status) {
            if status == 101 {
                return false;
            }
            rest = body;
            continue;
        }
        let kept = if minor == 0 { connection.iter().any(|t| t == "keep-alive") } else { true };
        if !kept || connection.iter().any(|t| t == "close") || te && (!lengths.is_empty() || minor == 0) {
            return false;
        }
        if head_request || status == 204 || status == 304 {
            return body.is_empty();
        }
        if te {
            return codings.last().map(String::as_str) == Some("chunked")
                && codings.iter().filter(|c| *c == "chunked").count() == 1
                && chunked_exactly(body);
        }
        let Some(first) = lengths.first() else { return false };
        if lengths.iter().any(|l| l != first) || first.is_empty() || !first.iter().all(u8::is_ascii_digit) {
            return false;
        }
        return std::str::from_utf8(first).ok().and_then(|n| n.parse::<usize>().ok()) == Some(body.len());
    }
}

/// Whether `body` is one strict chunked body, to its last byte.
fn chunked_exactly(mut body: &[u8]) -> bool {
    loop {
        let Some(line) = body.windows(2).position(|w| w == b"\r\n") else { return false };
        let Ok(size) = usize::from_str_radix(&String::from_utf8_lossy(&body[..line]), 16) else { return false };
        if line == 0 || !body[..line].iter().all(u8::is_ascii_hexdigit) {
            return false;
        }
        body = &body[line + 2..];
        if size == 0 {
            return body == b"\r\n";
        }
        if body.len() < size + 2 || &body[size..size + 2] != b"\r\n" {
            return false;
        }
        body = &body[size + 2..];
    }
}

/// Upstream answers edited at random (bytes replaced, inserted, removed) go through zkroute to
/// clients that read them strictly, each followed by a second request on the same connection:
/// no client ever gets a response it can frame two ways, bytes beyond a response's end, or a
/// body delimited by a close that does not come; and no second request ever gets bytes of an
/// earlier answer, which it would if a connection left dirty went back to the pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_edited_at_random_reach_clients_framed_once_and_leave_no_dirty_connection() {
    const BASES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
    ];
    const ROUNDS: usize = 240;
    const CLIENTS: usize = 4;
    let alphabet = b"\r\n :,;0125aAcCdeEghiklnoprsTtuz-";
    let mut rng = fastrand::Rng::with_seed(9112);
    let answers: Vec<Vec<u8>> = (0..ROUNDS)
        .map(|i| {
            let base = BASES[i % BASES.len()];
            if i % 5 == 0 { base.to_vec() } else { edit_at_random(&mut rng, base, alphabet) }
        })
        .collect();
    let answers = std::sync::Arc::new(answers);
    let script_answers = answers.clone();
    let upstream = Upstream::start(move |r| {
        let path = r.path();
        if let Some(i) = path.strip_prefix("/r/").and_then(|n| n.parse::<usize>().ok()) {
            let head_request = r.head.starts_with("HEAD ");
            let bytes = script_answers[i].clone();
            // A connection whose answer a strict client would not end cleanly is closed soon
            // after, unless zkroute sends another request at once (it must not).
            let clean = complete_and_clean(&bytes, head_request);
            let mut acts = vec![Act::Send(bytes)];
            if !clean {
                acts.push(Act::CloseIfIdle(Duration::from_millis(200)));
            }
            return acts;
        }
        let check = path.trim_start_matches("/check/");
        vec![send(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Check: {check}\r\n\r\n{check}", check.len()))]
    })
    .await;
    let (proxy, _routes) = proxy_to(upstream.addr, "idle_timeout = \"1s\"\ntimeout = \"5s\"\nretries = 0\n").await;
    let addr = proxy.listener("http");
    let mut loops = Vec::new();
    for c in 0..CLIENTS {
        let answers = answers.clone();
        loops.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            for i in (c..ROUNDS).step_by(CLIENTS) {
                let (method, version) = match i % 7 {
                    3 => ("HEAD", "HTTP/1.1"),
                    5 => ("GET", "HTTP/1.0"),
                    _ => ("GET", "HTTP/1.1"),
                };
                let keep = if version == "HTTP/1.0" { "Connection: keep-alive\r\n" } else { "" };
                let request = |path: &str| format!("{method} {path} {version}\r\nHost: h\r\n{keep}\r\n");
                let shown =
                    || format!("round {i}, {method} {version}, answer {:?}", String::from_utf8_lossy(&answers[i]));
                let mut client = Wire::connect(addr).await;
                client.send(request(&format!("/r/{i}"))).await;
                let resp = match client.response(method == "HEAD").await {
                    Ok(r) => r,
                    // The upstream broke off inside a body that had begun: cut off, then closed.
                    Err(e) if e.starts_with("closed inside") || e.starts_with("closed after") => continue,
                    Err(e) => {
                        failures.push(format!("{}: {e}", shown()));
                        continue;
                    }
                };
                if version == "HTTP/1.0" && resp.header("transfer-encoding").is_some() {
                    failures.push(format!("{}: Transfer-Encoding to HTTP/1.0: {}", shown(), resp.head));
                }
                if resp.status == 101 || resp.closes() {
                    if let Err(e) = client.closes_within(WAIT).await {
                        failures.push(format!("{}: after a closing response: {e}", shown()));
                    }
                    continue;
                }
                client.send(request(&format!("/check/{i}"))).await;
                match client.response(method == "HEAD").await {
                    Ok(r) if r.status == 200 && r.header("x-check") == Some(&i.to_string()) => {}
                    Ok(r) => {
                        failures.push(format!("{}: the next answer was {:?} {:?}", shown(), r.head, r.body_text()))
                    }
                    Err(e) => failures.push(format!("{}: the next answer: {e}", shown())),
                }
            }
            failures
        }));
    }
    let mut failures = Vec::new();
    for l in loops {
        failures.extend(l.await.unwrap());
    }
    assert!(failures.is_empty(), "{} of {ROUNDS} rounds failed:\n{}", failures.len(), failures.join("\n"));
    proxy.stop().await;
}

/// `base` with one to three bytes replaced, inserted or removed, drawn from `alphabet`.
fn edit_at_random(rng: &mut fastrand::Rng, base: &[u8], alphabet: &[u8]) -> Vec<u8> {
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
