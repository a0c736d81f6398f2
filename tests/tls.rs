#![allow(clippy::unwrap_used)]
//! TLS (README: "TLS") with real clients: curl (OpenSSL) through HTTPS listeners, HTTP/2 by ALPN,
//! mutual TLS, and a rustls client through a TCP listener that terminates TLS. Certificates are
//! made by `openssl` in each test.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use support::pki::{Ca, Issued, Validity, tls_listener, toml_path};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What curl did: its exit code and what it printed (response head and body with `-i`).
struct Curl {
    code: i32,
    out: String,
}

impl Curl {
    fn ok(&self) -> bool {
        self.code == 0
    }
    /// A response header's value (the first), lower-case name.
    fn header(&self, name: &str) -> Option<String> {
        self.out.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

async fn curl(args: Vec<String>) -> Curl {
    deps::ensure();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("curl").args(["-sS", "-i", "--max-time", "10"]).args(&args).output().unwrap();
        Curl { code: out.status.code().unwrap_or(-1), out: String::from_utf8_lossy(&out.stdout).into_owned() }
    })
    .await
    .unwrap()
}

fn https(addr: SocketAddr, path: &str) -> String {
    format!("https://127.0.0.1:{}{path}", addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_gets_through_an_https_listener_on_http_1_1_and_on_h2_by_alpn() {
    let ca = Ca::new("server");
    let server = ca.issue("proxy", &["DNS:localhost", "IP:127.0.0.1"]);
    let backend = Backend::http("a").await;
    let routes = Routes::new();
    routes.backends("users", &[&backend]);
    routes.rule("r", r#"{"listener":"https","backends":[{"service":"users"}]}"#);
    let proxy = routes.proxy(&tls_listener("https", "http", &server, None, None)).await;
    let addr = proxy.listener("https");
    let cacert = ca.cert.display().to_string();

    for (flag, status_line) in [("--http1.1", "HTTP/1.1 200"), ("--http2", "HTTP/2 200")] {
        let got = curl(vec![flag.into(), "--cacert".into(), cacert.clone(), https(addr, "/x")]).await;
        assert!(got.ok(), "curl {flag}: exit {} {}", got.code, got.out);
        assert!(got.out.starts_with(status_line), "{flag}: {}", got.out);
        assert_eq!(got.header("x-backend").as_deref(), Some("a"));
        assert_eq!(got.header("x-echo-x-forwarded-proto").as_deref(), Some("https"), "{flag}");
    }
    // Keep-alive: several requests on one TLS connection.
    let got =
        curl(vec!["--http1.1".into(), "--cacert".into(), cacert.clone(), https(addr, "/1"), https(addr, "/2")]).await;
    assert!(got.ok() && got.out.matches("HTTP/1.1 200").count() == 2, "{}", got.out);

    // A client that does not trust the CA gives up, and plain HTTP is not served.
    let untrusting = curl(vec![https(addr, "/")]).await;
    assert!(!untrusting.ok(), "{}", untrusting.out);
    assert!(get(addr, "/").await.is_err(), "a TLS listener does not answer in clear");
    eventually("the failed handshakes counted", Duration::from_secs(5), || async {
        let n = proxy.metric(r#"zkroute_tls_handshake_errors_total{listener="https"}"#).await.unwrap_or(0.0);
        (n >= 2.0).then_some(())
    })
    .await;
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_of_its_ca_and_tells_the_app_who_called() {
    let server_ca = Ca::new("server");
    let client_ca = Ca::new("clients");
    let other_ca = Ca::new("other");
    let server = server_ca.issue("proxy", &["IP:127.0.0.1"]);
    let client = client_ca.issue("orders", &["URI:spiffe://example.org/orders", "DNS:orders.internal"]);
    let stranger = other_ca.issue("orders", &["URI:spiffe://example.org/orders"]);
    let backend = Backend::http("a").await;
    let routes = Routes::new();
    routes.backends("users", &[&backend]);
    routes.rule("r", r#"{"listener":"mtls","backends":[{"service":"users"}]}"#);
    let proxy = routes.proxy(&tls_listener("mtls", "http", &server, Some(&client_ca), None)).await;
    let addr = proxy.listener("mtls");
    let base = |extra: &[&str]| {
        let mut v: Vec<String> = vec!["--http1.1".into(), "--cacert".into(), server_ca.cert.display().to_string()];
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push(https(addr, "/"));
        v
    };

    let without = curl(base(&[])).await;
    assert!(!without.ok() || !without.out.contains("200"), "no client certificate: refused, got {}", without.out);
    let (c, k) = (stranger.cert.display().to_string(), stranger.key.display().to_string());
    let other = curl(base(&["--cert", &c, "--key", &k])).await;
    assert!(!other.ok() || !other.out.contains("200"), "another CA's client: refused, got {}", other.out);
    assert_eq!(backend.requests(), 0);

    let (c, k) = (client.cert.display().to_string(), client.key.display().to_string());
    let good = curl(base(&["--cert", &c, "--key", &k, "-H", "x-forwarded-client-cert: By=forged;Hash=00"])).await;
    assert!(good.ok() && good.out.starts_with("HTTP/1.1 200"), "{}", good.out);
    let xfcc = good.header("x-echo-x-forwarded-client-cert").expect("x-forwarded-client-cert reaches the app");
    assert!(!xfcc.contains("forged"), "the client's own header is removed: {xfcc}");
    let der = pem_der(&client.cert);
    let hash = openssl_sha256(&der);
    assert_eq!(
        xfcc,
        format!(
            "Hash={hash};Subject=\"CN=orders,O=zkroute tests\";URI=spiffe://example.org/orders;DNS=orders.internal"
        )
    );
    proxy.stop().await;
}

/// The DER bytes of a PEM certificate file, by `openssl x509`.
fn pem_der(path: &std::path::Path) -> Vec<u8> {
    let out =
        Command::new("openssl").args(["x509", "-outform", "DER", "-in", path.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

fn openssl_sha256(der: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(der).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap().split_whitespace().next().unwrap().to_owned()
}

/// A rustls client trusting `ca`, presenting `identity` if given.
fn client_config(ca: &Ca, identity: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&ca.cert).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some(id) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(&id.cert).unwrap().map(|c| c.unwrap()).collect(),
                PrivateKeyDer::from_pem_file(&id.key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_listener_terminates_tls_and_relays_plain_bytes_with_half_close() {
    let ca = Ca::new("server");
    let server = ca.issue("db", &["DNS:db.internal"]);
    let echo = TcpServer::echo().await;
    let routes = Routes::new();
    routes.instance("db", "1", echo.addr);
    let proxy = routes.proxy(&tls_listener("db", "tcp", &server, None, Some("db"))).await;
    proxy.config_until("the db instance", |c| addresses(c, "db").len() == 1).await;

    let tcp = tokio::net::TcpStream::connect(proxy.listener("db")).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(&ca, None));
    let name = rustls::pki_types::ServerName::try_from("db.internal").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"hello in confidence").await.unwrap();
    tls.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, b"hello in confidence");
    proxy.stop().await;
}

/// The upstream side: a Python (OpenSSL) HTTPS server that requires client certificates of
/// `clients`, with a certificate of `servers` for `users.internal` and 127.0.0.1.
struct Upstream {
    servers: Ca,
    clients: Ca,
    sidecar: Issued,
    backend: support::pki::TlsBackend,
}

impl Upstream {
    fn start() -> Upstream {
        let servers = Ca::new("servers");
        let clients = Ca::new("clients");
        let server = servers.issue("users", &["DNS:users.internal", "IP:127.0.0.1"]);
        let sidecar = clients.issue("sidecar-a", &["URI:spiffe://example.org/a"]);
        let backend = support::pki::TlsBackend::start(&server, Some(&clients.cert));
        Upstream { servers, clients, sidecar, backend }
    }

    /// `[tls]` trusting `ca`, presenting the sidecar's certificate.
    fn tls_section(&self, ca: &Ca) -> String {
        format!(
            "[tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
            toml_path(&ca.cert),
            toml_path(&self.sidecar.cert),
            toml_path(&self.sidecar.key)
        )
    }
}

/// Routes for service `users` at `instance` under `policy`, and a zkroute with listener `http`
/// and `extra` TOML.
async fn through(instance: &str, policy: &str, extra: &str) -> (Routes, Proxy) {
    let routes = Routes::new();
    routes.instance("users", "1", instance);
    routes.policy("users", policy);
    routes.rule("r", r#"{"listener":"http","backends":[{"service":"users"}]}"#);
    let proxy = routes.proxy(&format!("{HTTP_LISTENER}{extra}")).await;
    (routes, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn originates_mutual_tls_with_the_policy_server_name_to_a_server_that_requires_a_client_certificate() {
    let up = Upstream::start();
    let (_routes, proxy) = through(
        &up.backend.addr.to_string(),
        r#"{"tls":{"server_name":"users.internal"}}"#,
        &up.tls_section(&up.servers),
    )
    .await;
    let addr = proxy.listener("http");
    let mut conn = KeepAlive::connect(addr).await;
    for _ in 0..3 {
        let r = conn.send(request("GET", "users", "/", &[], "")).await.unwrap();
        assert_eq!(r.status(), 200, "{r:?}");
        assert_eq!(r.body(), "tls-backend client=sidecar-a");
        assert_eq!(r.headers()["x-sni"], "users.internal");
        assert_eq!(r.headers()["x-alpn"], "http/1.1");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_server_name_an_instance_registered_by_ip_is_verified_against_its_ip_and_sent_no_sni() {
    let up = Upstream::start();
    let (_routes, proxy) = through(&up.backend.addr.to_string(), r#"{"tls":{}}"#, &up.tls_section(&up.servers)).await;
    let r = get(proxy.listener("http"), "/").await.unwrap();
    assert_eq!((r.status().as_u16(), r.headers()["x-sni"].to_str().unwrap()), (200, "-"), "{r:?}");

    // `"tls": false` is plain TCP: the TLS server does not answer it as HTTP.
    let (_r2, plain) = through(&up.backend.addr.to_string(), r#"{"tls":false}"#, &up.tls_section(&up.servers)).await;
    assert_ne!(get(plain.listener("http"), "/").await.map(|r| r.status().as_u16()).unwrap_or(0), 200);
    proxy.stop().await;
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_mismatch_and_an_unknown_ca_are_refused_and_counted_by_reason() {
    let up = Upstream::start();
    let addr = up.backend.addr.to_string();
    let (_r1, mismatch) =
        through(&addr, r#"{"tls":{"server_name":"orders.internal"}}"#, &up.tls_section(&up.servers)).await;
    let r = get(mismatch.listener("http"), "/").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers()["x-zkroute-error"].to_str().unwrap()),
        (502, "upstream_connect_failed")
    );
    assert!(
        mismatch.metric(r#"zkroute_upstream_tls_errors_total{reason="name_mismatch",service="users"}"#).await
            >= Some(1.0)
    );

    let stranger = Ca::new("stranger");
    let (_r2, unknown) =
        through(&addr, r#"{"tls":{"server_name":"users.internal"}}"#, &up.tls_section(&stranger)).await;
    let r = get(unknown.listener("http"), "/").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers()["x-zkroute-error"].to_str().unwrap()),
        (502, "upstream_connect_failed")
    );
    assert!(
        unknown.metric(r#"zkroute_upstream_tls_errors_total{reason="unknown_ca",service="users"}"#).await >= Some(1.0)
    );
    assert!(
        unknown.metric(r#"zkroute_upstream_connect_errors_total{service="users"}"#).await >= Some(1.0),
        "the connect-error counter keeps counting failed handshakes as connect failures"
    );

    // No client certificate: the server refuses the sidecar (after the handshake, in TLS 1.3).
    let no_identity = format!("[tls]\nca_file = {}\n", toml_path(&up.servers.cert));
    let (_r3, anonymous) = through(&addr, r#"{"tls":{"server_name":"users.internal"}}"#, &no_identity).await;
    assert_eq!(get(anonymous.listener("http"), "/").await.unwrap().status(), 502);
    let _ = &up.clients;
    mismatch.stop().await;
    unknown.stop().await;
    anonymous.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_curator_instance_with_an_ssl_port_is_reached_there_when_tls_is_on() {
    let up = Upstream::start();
    let closed = refused_addr();
    let doc = format!(
        r#"{{"name":"users","id":"1","address":"127.0.0.1","port":{},"sslPort":{},"payload":null}}"#,
        closed.port(),
        up.backend.addr.port()
    );
    let (_routes, proxy) =
        through(&doc, r#"{"tls":{"server_name":"users.internal"}}"#, &up.tls_section(&up.servers)).await;
    let r = get(proxy.listener("http"), "/").await.unwrap();
    assert_eq!(r.status(), 200, "{r:?}");
    assert_eq!(r.body(), "tls-backend client=sidecar-a");
    proxy.stop().await;
}

/// A TLS connection to `addr` trusting `ca`, and the certificate the server presented (DER).
async fn tls_connect(addr: SocketAddr, ca: &Ca) -> (tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Vec<u8>) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, None));
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = connector.connect(name, tcp).await.unwrap();
    let der = tls.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec();
    (tls, der)
}

/// Replaces `to` with `from`'s contents by a rename, as Secret volumes and deploy tools do.
fn replace(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_files_serve_new_handshakes_while_open_connections_keep_working_and_bad_ones_are_counted() {
    let ca = Ca::new("server");
    let first = ca.issue("first", &["IP:127.0.0.1"]);
    let second = ca.issue("second", &["IP:127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let live = Issued { cert: dir.path().join("tls.crt"), key: dir.path().join("tls.key") };
    replace(&first.cert, &live.cert);
    replace(&first.key, &live.key);
    let backend = Backend::http("a").await;
    let routes = Routes::new();
    routes.backends("users", &[&backend]);
    routes.rule("r", r#"{"listener":"https","backends":[{"service":"users"}]}"#);
    let proxy = routes.proxy(&tls_listener("https", "http", &live, None, None)).await;
    let addr = proxy.listener("https");
    let expiry = format!(r#"zkroute_tls_certificate_expiry_timestamp_seconds{{file="{}"}}"#, live.cert.display());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let first_expiry = proxy.metric(&expiry).await.expect("the expiry gauge");
    assert!(first_expiry > now + 20.0 * 86_400.0 && first_expiry < now + 31.0 * 86_400.0, "{first_expiry}");

    let (old, der) = tls_connect(addr, &ca).await;
    assert_eq!(der, pem_der(&first.cert));
    let (mut old, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(old)).await.unwrap();
    tokio::spawn(conn);
    let r = old.send_request(request("GET", "users", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200);

    replace(&second.cert, &live.cert);
    replace(&second.key, &live.key);
    eventually("a new handshake presents the new certificate", Duration::from_secs(15), || async {
        (tls_connect(addr, &ca).await.1 == pem_der(&second.cert)).then_some(())
    })
    .await;
    old.ready().await.unwrap();
    let r = old.send_request(request("GET", "users", "/", &[], "")).await.unwrap();
    assert_eq!(r.status(), 200, "a connection made before the swap keeps working");

    // A key that does not load: counted, and the certificate in force stays.
    std::fs::write(live.key.with_extension("new"), "not a key").unwrap();
    std::fs::rename(live.key.with_extension("new"), &live.key).unwrap();
    let errors = format!(r#"zkroute_tls_file_errors_total{{file="{}"}}"#, live.key.display());
    eventually("the bad key counted", Duration::from_secs(15), || async {
        (proxy.metric(&errors).await >= Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(tls_connect(addr, &ca).await.1, pem_der(&second.cert));
    proxy.stop().await;
}

/// The deploy/mtls configurations load once their certificate paths point at real files.
#[test]
fn the_sidecar_to_sidecar_configurations_in_deploy_load() {
    let ca = Ca::new("mesh");
    let host = ca.issue("b", &["DNS:users.mesh.internal"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&ca.cert, dir.path().join("ca.crt")).unwrap();
    std::fs::copy(&host.cert, dir.path().join("tls.crt")).unwrap();
    std::fs::copy(&host.key, dir.path().join("tls.key")).unwrap();
    for file in ["host-a.toml", "host-b.toml"] {
        let text = std::fs::read_to_string(format!("{}/deploy/mtls/{file}", env!("CARGO_MANIFEST_DIR"))).unwrap();
        let text = text.replace("/etc/zkroute/tls/", &format!("{}/", dir.path().display()));
        zkroute::Config::from_toml(&text, file).unwrap_or_else(|e| panic!("{file}: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_a_originates_mutual_tls_to_sidecar_b_which_forwards_to_its_local_app() {
    let mesh = Ca::new("mesh");
    let b_cert = mesh.issue("b", &["DNS:users.mesh.internal"]);
    let a_cert = mesh.issue("a", &["URI:spiffe://mesh/a"]);
    let app_b = Backend::http("app-b").await;

    // Host B: mutual TLS in, the local app behind.
    let routes_b = Routes::new();
    routes_b.rule("inbound", &format!(r#"{{"listener":"inbound","backends":[{{"address":"{}"}}]}}"#, app_b.addr));
    let b = routes_b.proxy(&tls_listener("inbound", "http", &b_cert, Some(&mesh), None)).await;

    // Host A: the app's calls in clear, mutual TLS out to B.
    let routes_a = Routes::new();
    routes_a.instance("users", "b", b.listener("inbound"));
    routes_a.policy("users", r#"{"tls":{"server_name":"users.mesh.internal"}}"#);
    routes_a.rule("to-users", r#"{"listener":"outbound","backends":[{"service":"users"}]}"#);
    let a = routes_a.proxy(&support::pki::outbound_with_identity("outbound", &mesh, &a_cert)).await;

    let r = get(a.listener("outbound"), "/orders").await.unwrap();
    assert_eq!(r.status(), 200, "{r:?}");
    assert_eq!(r.headers()["x-backend"], "app-b");
    assert_eq!(r.headers()["x-echo-x-forwarded-proto"], "https");
    let xfcc = r.headers()["x-echo-x-forwarded-client-cert"].to_str().unwrap();
    assert!(xfcc.contains("URI=spiffe://mesh/a") && xfcc.contains("CN=a,O=zkroute tests"), "{xfcc}");

    // B's port takes nobody without a mesh certificate: plain HTTP gets no answer.
    assert!(get(b.listener("inbound"), "/").await.is_err());
    a.stop().await;
    b.stop().await;
}

/// `[zookeeper]` over mutual TLS to `connect`, trusting `ca` and presenting `identity`; a short
/// session timeout so that a failure shows quickly.
fn zk_tls_config(connect: &str, ca: &Ca, identity: &Issued) -> String {
    format!(
        "[zookeeper]\nconnect = \"{connect}\"\nsession_timeout = \"2s\"\nstartup_timeout = \"1s\"\n\
         [zookeeper.tls]\nca_file = {}\ncert_file = {}\nkey_file = {}\n[admin]\nbind = \"127.0.0.1:0\"\n{HTTP_LISTENER}",
        toml_path(&ca.cert),
        toml_path(&identity.cert),
        toml_path(&identity.key),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zookeeper_over_mutual_tls_discovers_an_instance_and_a_server_of_an_unknown_ca_is_named_as_such() {
    let servers = Ca::new("zk-servers");
    let clients = Ca::new("zk-clients");
    let zk = Zk::start_secure(&servers.issue("zk", &["DNS:localhost", "IP:127.0.0.1"]), &clients.cert);
    let sidecar = clients.issue("sidecar", &["DNS:localhost", "IP:127.0.0.1"]);
    // The test writes through the plain port; zkroute reads through the TLS one only.
    let chroot = zk.chroot();
    let writer = chroot.client().await;
    let backend = Backend::http("a").await;
    writer.put("/zkroute/services/users/a", &backend.addr.to_string()).await;
    writer.put("/zkroute/rules/r", r#"{"listener":"http","backends":[{"service":"users"}]}"#).await;
    let secure = chroot.connect.replace(&format!(":{}/", zk.port), &format!(":{}/", zk.secure_port.unwrap()));
    assert_ne!(secure, chroot.connect);

    let proxy = Proxy::start(&zk_tls_config(&secure, &servers, &sidecar)).await;
    let addr = proxy.listener("http");
    let r = eventually("a request reaches the instance discovered over TLS", Duration::from_secs(20), || async {
        get(addr, "/").await.ok().filter(|r| r.status() == 200)
    })
    .await;
    assert_eq!(who(&r), "a");
    let c = proxy.config().await;
    assert_eq!(c["zookeeper"]["state"], "connected", "{:#}", c["zookeeper"]);
    assert!(zk.log().contains("secure: true"), "the server serves TLS on its secure port; its log:\n{}", zk.log());

    // A sidecar that trusts another CA refuses the server, and says so.
    let stranger = Ca::new("stranger");
    let refused = Proxy::start(&zk_tls_config(&secure, &stranger, &sidecar)).await;
    let status = eventually("the unknown CA named", Duration::from_secs(20), || async {
        let z = refused.config().await["zookeeper"].clone();
        z["error"].as_str().filter(|e| e.contains("unknown_ca")).map(str::to_owned)
    })
    .await;
    assert!(status.contains(&format!("TLS handshake with 127.0.0.1:{} failed", zk.secure_port.unwrap())), "{status}");
    assert_eq!(refused.config().await["zookeeper"]["connected"], false);
    assert_ne!(get(refused.listener("http"), "/").await.unwrap().status(), 200, "nothing was discovered");
    proxy.stop().await;
    refused.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_upstream_certificate_is_refused_and_counted_as_expired() {
    let servers = Ca::new("servers");
    let expired = servers.issue_with(
        "users",
        &["DNS:users.internal", "IP:127.0.0.1"],
        Validity::Between("200101000000Z", "200201000000Z"),
    );
    let backend = support::pki::TlsBackend::start(&expired, None);
    let trust = format!("[tls]\nca_file = {}\n", toml_path(&servers.cert));
    let (_routes, proxy) =
        through(&backend.addr.to_string(), r#"{"tls":{"server_name":"users.internal"}}"#, &trust).await;
    let r = get(proxy.listener("http"), "/").await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers()["x-zkroute-error"].to_str().unwrap()),
        (502, "upstream_connect_failed"),
        "{r:?}"
    );
    assert!(
        proxy.metric(r#"zkroute_upstream_tls_errors_total{reason="expired",service="users"}"#).await >= Some(1.0),
        "{}",
        proxy.metrics().await
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_within_7_days_of_its_end_is_warned_about_in_the_log_and_a_later_one_is_not() {
    let ca = Ca::new("server");
    let soon = ca.issue_with("soon", &["IP:127.0.0.1"], Validity::Days(3));
    let later = ca.issue("later", &["IP:127.0.0.1"]);
    let routes = Routes::new();
    let extra = tls_listener("soon", "http", &soon, None, Some("web"))
        + &tls_listener("later", "http", &later, None, Some("web"));
    let zkroute = Binary::start_with(&routes, "1s", &extra, &[]).await;
    let warning = "TLS certificate expires within 7 days";
    let line = eventually("the expiry warning", Duration::from_secs(15), || async {
        zkroute.log().lines().find(|l| l.contains(warning)).map(str::to_owned)
    })
    .await;
    assert!(line.contains(&soon.cert.display().to_string()), "{line}");
    let expiry =
        |c: &Issued| format!(r#"zkroute_tls_certificate_expiry_timestamp_seconds{{file="{}"}}"#, c.cert.display());
    let metrics = String::from_utf8_lossy(get(zkroute.admin, "/metrics").await.unwrap().body()).into_owned();
    assert!(metric_value(&metrics, &expiry(&soon)).unwrap() < metric_value(&metrics, &expiry(&later)).unwrap());
    assert!(line.contains("in_hours=71") || line.contains("in_hours=72"), "three days ahead: {line}");
    // Both listeners were loaded before zkroute was ready: the 30-day certificate was not warned about.
    let log = zkroute.log();
    assert_eq!(log.matches(warning).count(), 1, "{log}");
    assert!(!log.contains(&later.cert.display().to_string()), "{log}");
}
