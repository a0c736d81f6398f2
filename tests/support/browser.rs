//! Debian's Chromium, headless, for tests of what a browser shows: the DOM after the page loaded,
//! and screenshots. Each run gets a fresh profile and every background service switched off, so
//! it reaches nothing but the page it is given.

use std::path::Path;
use std::process::Command;

/// Longest a browser run may take before it is killed.
const TIMEOUT: &str = "60";

/// Runs Chromium headless on `url` with `args`, returning its standard output.
fn chromium(url: &str, args: &[String]) -> String {
    super::deps::ensure();
    let profile = tempfile::tempdir().expect("profile dir");
    let out = Command::new("timeout")
        .args([TIMEOUT, "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        out.status.success(),
        "chromium {args:?} {url}: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The DOM of `url` after it loaded (and any script ran), serialized.
pub async fn dump_dom(url: &str) -> String {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || chromium(&url, &["--dump-dom".to_owned()])).await.expect("chromium task")
}

/// A PNG screenshot of `url` at `width` x `height`, written to `path`.
pub async fn screenshot(url: &str, path: &Path, width: u32, height: u32) {
    let (url, path) = (url.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        chromium(&url, &[format!("--screenshot={}", path.display()), format!("--window-size={width},{height}")])
    })
    .await
    .expect("chromium task");
}

/// The text a reader sees in serialized HTML: tags, styles and scripts left out, entities decoded.
pub fn visible_text(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(open) = rest.find('<') {
        text.push_str(&rest[..open]);
        rest = &rest[open..];
        // Element content that is not text a reader sees.
        for (start, end) in [("<style", "</style>"), ("<script", "</script>"), ("<title", "</title>")] {
            if rest.starts_with(start) {
                rest = rest.find(end).map(|e| &rest[e..]).unwrap_or("");
            }
        }
        rest = rest.find('>').map(|close| &rest[close + 1..]).unwrap_or("");
        text.push(' ');
    }
    text.push_str(rest);
    let decoded = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    decoded.split_whitespace().collect::<Vec<_>>().join(" ")
}
