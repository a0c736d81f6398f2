#![allow(clippy::unwrap_used)]
//! SIGHUP on the real binary: the configuration file is read again; listeners come and go (the
//! removed drain, the others keep their connections), `[proxy]` settings apply, registrations
//! follow the file unless a variable gives them, TLS files are read again, and a file that does
//! not load changes nothing.
//! Routes come from a static file; registrations need ZooKeeper.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends the new configuration with SIGHUP and waits until the reload is counted with `result`.
async fn reload(bin: &Binary, config: &str, result: &str) {
    let sample = format!(r#"zkroute_config_reloads_total{{result="{result}"}}"#);
    let count = |m: &str| metric_value(m, &sample).unwrap_or(0.0);
    let before = count(&metrics(bin).await);
    bin.reload(config);
    eventually(&format!("a reload counted as {result}"), Duration::from_secs(15), || async {
        (count(&metrics(bin).await) > before).then_some(())
    })
    .await;
}

async fn metrics(bin: &Binary) -> String {
    String::from_utf8_lossy(get(bin.admin, "/metrics").await.unwrap().body()).into_owned()
}

async fn config(bin: &Binary) -> Value {
    serde_json::from_slice(get(bin.admin, "/config").await.unwrap().body()).unwrap()
}

fn listener_toml(name: &str, addr: SocketAddr, protocol: &str, service: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\nbind = \"{addr}\"\nprotocol = \"{protocol}\"\nservice = \"{service}\"\n")
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The binary's `[[listener]]` table for `name`, as written.
fn without_listener(config: &str, name: &str) -> String {
    let start = config.find(&format!("[[listener]]\nname = \"{name}\"")).unwrap();
    let end = config[start + 1..].find("[[").map(|e| start + 1 + e).unwrap_or(config.len());
    format!("{}{}", &config[..start], &config[end..])
}

/// Routes with a web backend as service `web` and an echo server as service `echo`, and the
/// binary following them with an extra HTTP listener `api` (service `web`) beside its `http` and
/// `tcp` ones.
struct Sidecar {
    web: Backend,
    routes: Routes,
    bin: Binary,
    api: SocketAddr,
    _echo: TcpServer,
}

async fn sidecar() -> Sidecar {
    let web = Backend::http("web").await;
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("web", "1", web.addr);
    routes.instance("echo", "1", echo.addr);
    let api = local(free_port());
    let bin = Binary::start_with(&routes, "10s", &listener_toml("api", api, "http", "web"), &[]).await;
    eventually("both services in the table", Duration::from_secs(10), || async {
        let c = config(&bin).await;
        (addresses(&c, "web").len() == 1 && addresses(&c, "echo").len() == 1).then_some(())
    })
    .await;
    Sidecar { web, routes, bin, api, _echo: echo }
}

async fn served(addr: SocketAddr) -> Option<String> {
    let r = send(addr, request("GET", "h", "/", &[], "")).await.ok()?;
    Some(who(&r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_added_accepts_and_one_removed_drains_while_the_others_keep_their_connections() {
    let Sidecar { web, bin, api, .. } = &sidecar().await;
    let api = *api;

    // On `http`, which goes: an idle keep-alive connection, and a request in flight.
    let http = bin.http;
    let mut idle = idle_keep_alive(http).await;
    let slow = in_flight(http, web, 1500).await;
    // On `api` and `tcp`, which stay: keep-alive connections that have been used.
    let mut api_client = KeepAlive::connect(api).await;
    assert_eq!(who(&api_client.send(request("GET", "h", "/", &[], "")).await.unwrap()), "web");
    let mut tcp = TcpStream::connect(bin.tcp).await.unwrap();
    let mut one = [0u8; 1];
    tcp.write_all(b"a").await.unwrap();
    tcp.read_exact(&mut one).await.unwrap();

    let added = local(free_port());
    let config_text =
        format!("{}{}", without_listener(&bin.config(), "http"), listener_toml("added", added, "http", "web"));
    reload(bin, &config_text, "ok").await;

    assert_eq!(served(added).await.as_deref(), Some("web"), "the new listener accepts and routes");
    eventually("http refuses new connections", Duration::from_secs(5), || async {
        TcpStream::connect(http).await.is_err().then_some(())
    })
    .await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest))
        .await
        .expect("the removed listener's idle keep-alive connection is closed at once")
        .unwrap();
    let r = slow.await.unwrap().unwrap();
    assert_eq!((r.status().as_u16(), who(&r)), (200, "web".to_owned()), "the request in flight finishes");
    assert_eq!(
        who(&api_client.send(request("GET", "h", "/", &[], "")).await.unwrap()),
        "web",
        "api's connection stays"
    );
    tcp.write_all(b"b").await.unwrap();
    tcp.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"b", "tcp's connection stays");

    let c = eventually("the drained listener gone from /config", Duration::from_secs(5), || async {
        let c = config(bin).await;
        let names: Vec<String> =
            c["listeners"].as_array()?.iter().filter_map(|l| l["name"].as_str().map(str::to_owned)).collect();
        (names == ["tcp", "api", "added"]).then_some(c)
    })
    .await;
    assert_eq!(c["listeners"][2]["bind"], added.to_string());
    assert!(bin.log().contains("configuration reloaded"), "{}", bin.log());

    // Its slot, drained, goes to the next listener added, which routes its own rules.
    let third = local(free_port());
    reload(bin, &format!("{config_text}{}", listener_toml("third", third, "tcp", "echo")), "ok").await;
    let mut s = TcpStream::connect(third).await.unwrap();
    s.write_all(b"z").await.unwrap();
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"z");
    assert_eq!(served(added).await.as_deref(), Some("web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_switched_to_tcp_or_sent_elsewhere_serves_the_new_way() {
    let Sidecar { routes, bin, api, .. } = &sidecar().await;
    let api = *api;
    let other = Backend::http("other").await;
    routes.instance("other", "1", other.addr);
    eventually("other in the table", Duration::from_secs(10), || async {
        routes.shown_in(&config(bin).await).then_some(())
    })
    .await;
    let mut kept = KeepAlive::connect(bin.http).await;
    assert_eq!(who(&kept.send(request("GET", "h", "/", &[], "")).await.unwrap()), "web");
    let moved = local(free_port());
    let old_tcp = bin.tcp;
    // `tcp` moves to a new port; `api` becomes a TCP listener to echo on the same port; `http`
    // sends to another service.
    let text = bin
        .config()
        .replace(&format!("bind = \"{old_tcp}\""), &format!("bind = \"{moved}\""))
        .replace(&listener_toml("api", api, "http", "web"), &listener_toml("api", api, "tcp", "echo"))
        .replace("service = \"web\"", "service = \"other\"");
    reload(bin, &text, "ok").await;
    let r = kept.send(request("GET", "h", "/", &[], "")).await.unwrap();
    assert_eq!(who(&r), "other", "the same connection, routed by the new listener configuration");
    for addr in [moved, api] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"q").await.unwrap();
        let mut one = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut one)).await.unwrap().unwrap();
        assert_eq!(&one, b"q", "{addr} relays to echo");
    }
    eventually("the old port closed", Duration::from_secs(5), || async {
        TcpStream::connect(old_tcp).await.is_err().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_timeout_applies_and_an_invalid_file_changes_nothing() {
    let Sidecar { bin, api, .. } = &sidecar().await;
    let api = *api;
    let slow = || async move { send(api, request("GET", "h", "/?sleep_ms=1000", &[], "")).await.unwrap() };
    assert_eq!(slow().await.status(), 200, "within the default 15 s");

    let original = bin.config();
    let short = original.replace("drain_timeout = \"10s\"", "drain_timeout = \"10s\"\ntimeout = \"300ms\"");
    assert_ne!(short, original);
    reload(bin, &short, "ok").await;
    let r = slow().await;
    assert_eq!((r.status().as_u16(), who(&r)), (504, "error:upstream_timeout".to_owned()), "the new timeout");

    // A file that does not validate: its other changes (timeout back, api gone) do not happen.
    let broken = without_listener(&original, "api").replace("[admin]\n", "[admin]\ncolour = \"red\"\n");
    reload(bin, &broken, "error").await;
    let r = slow().await;
    assert_eq!(r.status(), 504, "the timeout in force stays");
    assert_eq!(served(api).await.as_deref(), Some("web"), "the listener stays");
    let log = bin.log();
    let file = bin.config_file().display().to_string();
    let line = log.lines().find(|l| l.contains("configuration reload refused")).unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&file) && line.contains("key=admin") && line.contains("colour"),
        "file, key and reason: {line}"
    );
    let c = config(bin).await;
    assert_eq!(c["config_reload"]["result"], "error");
    assert!(c["config_reload"]["error"].as_str().unwrap().contains("unknown field `colour`"), "{c:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_change_only_at_restart_are_reported_and_left() {
    let Sidecar { bin, .. } = &sidecar().await;
    let other = local(free_port());
    let text = bin.config().replace(&format!("bind = \"{}\"", bin.admin), &format!("bind = \"{other}\""));
    reload(bin, &text, "ok").await;
    assert!(TcpStream::connect(other).await.is_err(), "no admin port on the new address");
    let c = config(bin).await;
    assert_eq!(c["config_reload"]["restart_needed"], serde_json::json!(["admin.bind"]));
    let log = bin.log();
    assert!(log.lines().any(|l| l.contains("changes only at restart") && l.contains("admin.bind")), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrations_follow_the_file_but_not_over_a_variable() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let entry = |id: &str| {
        format!("[[register]]\nservice = \"app\"\naddress = \"127.0.0.1\"\nport = {}\nid = \"{id}\"\n", app.addr.port())
    };
    let node = |id: &str| format!("/zkroute/services/app/{id}");
    let bin = Binary::start(&chroot, "10s").await;
    let base = bin.config();

    reload(&bin, &format!("{base}{}{}", entry("one"), entry("two")), "ok").await;
    for id in ["one", "two"] {
        eventually(&format!("{id} registered"), Duration::from_secs(10), || async { zk.get(&node(id)).await }).await;
    }
    let two_session = zk.0.check_stat(&node("two")).await.unwrap().unwrap().ephemeral_owner;
    reload(&bin, &format!("{base}{}", entry("two")), "ok").await;
    eventually("one deregistered", Duration::from_secs(10), || async {
        zk.get(&node("one")).await.is_none().then_some(())
    })
    .await;
    let still = zk.0.check_stat(&node("two")).await.unwrap().unwrap().ephemeral_owner;
    assert_eq!(still, two_session, "the unchanged entry keeps its node");
    drop(bin);

    // Given by a variable, the registrations are the variable's at every reload.
    let fixed = format!("{{service=\"app\", address=\"127.0.0.1\", port={}, id=\"env\"}}", app.addr.port());
    let bin = Binary::start_with_env(&chroot, "10s", "", &[], &[("ZKROUTE_REGISTER", &fixed)]).await;
    eventually("env registered", Duration::from_secs(10), || async { zk.get(&node("env")).await }).await;
    reload(&bin, &format!("{}{}", bin.config(), entry("file")), "ok").await;
    assert!(zk.get(&node("env")).await.is_some());
    assert!(zk.get(&node("file")).await.is_none(), "the file's entry is overridden");
}

/// The certificate (DER) a TLS listener at `addr` presents to a client trusting `ca`.
async fn served_certificate(addr: SocketAddr, ca: &std::path::Path) -> Option<Vec<u8>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.ok()?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await.ok()?;
    Some(tls.get_ref().1.peer_certificates()?[0].as_ref().to_vec())
}

fn der_of(pem: &std::path::Path) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in", pem.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reads_replaced_tls_files_at_once() {
    let ca = support::pki::Ca::new("server");
    let (first, second) = (ca.issue("first", &["IP:127.0.0.1"]), ca.issue("second", &["IP:127.0.0.1"]));
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let web = Backend::http("web").await;
    let routes = Routes::new();
    routes.instance("web", "1", web.addr);
    let https = local(free_port());
    let listener = format!(
        "{}[listener.tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        listener_toml("https", https, "http", "web"),
        cert.display().to_string(),
        key.display().to_string()
    );
    let bin = Binary::start_with(&routes, "10s", &listener, &[]).await;
    let served = eventually("the first certificate served", Duration::from_secs(10), || async {
        served_certificate(https, &ca.cert).await
    })
    .await;
    assert_eq!(served, der_of(&first.cert));

    // Replaced by renames, as deploy tools do; SIGHUP reads them before the reload is counted,
    // without waiting for the next poll.
    for (from, to) in [(&second.cert, &cert), (&second.key, &key)] {
        std::fs::copy(from, to.with_extension("new")).unwrap();
        std::fs::rename(to.with_extension("new"), to).unwrap();
    }
    reload(&bin, &bin.config(), "ok").await;
    assert_eq!(served_certificate(https, &ca.cert).await, Some(der_of(&second.cert)));
}
