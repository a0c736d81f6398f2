#![allow(clippy::unwrap_used)]
//! The pod stop sequence of the README's "Stopping" section, played with real processes: the
//! app's preStop calls `/drain` on its zkroute, the app finishes and exits, and only then does its
//! zkroute get SIGTERM. Neither the calls into the app (through another host's zkroute) nor the
//! app's own outbound calls (through its zkroute) may fail at any step. And who may call `/drain`.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::*;

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

async fn drain(admin: SocketAddr, headers: &[(&str, &str)]) -> (u16, String) {
    let host = admin.to_string();
    let r = send(admin, request("POST", &host, "/drain", headers, "")).await.unwrap();
    (r.status().as_u16(), String::from_utf8_lossy(r.body()).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_then_app_exit_then_sigterm_loses_no_request_either_way() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    // The app on this host, another instance of it elsewhere, and a service the app calls.
    let app = Backend::http("app").await;
    let other = Backend::http("other").await;
    let remote = Backend::http("remote").await;
    zk.put("/zkroute/services/app/other", &other.addr.to_string()).await;
    zk.put("/zkroute/services/remote/r1", &remote.addr.to_string()).await;

    // The app's sidecar: registers it, and carries its outbound calls. No retries anywhere, so
    // that a request sent to an app that is gone fails instead of being hidden by a retry.
    let (admin, outbound) = (local(free_port()), local(free_port()));
    let sidecar = Binary::start_config(
        &format!(
            "{}[admin]\nbind = \"{admin}\"\n[proxy]\nretries = 0\ndrain_timeout = \"5s\"\n\
             [[listener]]\nname = \"out\"\nbind = \"{outbound}\"\nservice = \"remote\"\n\
             [[register]]\nservice = \"app\"\naddress = \"127.0.0.1\"\nport = {}\nid = \"here\"\n\
             drain_delay = \"1s\"\n",
            chroot.source_config(),
            app.addr.port()
        ),
        admin,
    )
    .await;
    // Another host's sidecar, calling the app.
    let (caller_admin, inbound) = (local(free_port()), local(free_port()));
    let _caller = Binary::start_config(
        &format!(
            "{}[admin]\nbind = \"{caller_admin}\"\n[proxy]\nretries = 0\n\
             [[listener]]\nname = \"in\"\nbind = \"{inbound}\"\nservice = \"app\"\n",
            chroot.source_config()
        ),
        caller_admin,
    )
    .await;
    eventually("the caller sees both instances of the app", Duration::from_secs(15), || async {
        let c: serde_json::Value = serde_json::from_slice(get(caller_admin, "/config").await.ok()?.body()).ok()?;
        (addresses(&c, "app").len() == 2).then_some(())
    })
    .await;

    let calls_in = Load::start(inbound, "app", "/", 4);
    let calls_out = Load::start(outbound, "remote", "/", 2);
    eventually("traffic reaches the app both ways", Duration::from_secs(10), || async {
        (app.requests() > 20 && remote.requests() > 20).then_some(())
    })
    .await;

    // preStop: /drain answers once the app is marked draining, kept so for drain_delay, and gone.
    let (status, body) = drain(admin, &[]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("deregistered") && body.contains("here"), "{body}");
    assert!(zk.get("/zkroute/services/app/here").await.is_none(), "the node is deleted when /drain answers");
    assert_eq!(drain(admin, &[]).await, (200, "already drained\n".to_owned()));
    let config: serde_json::Value = serde_json::from_slice(get(admin, "/config").await.unwrap().body()).unwrap();
    assert_eq!(config["drained"], true);
    assert_eq!(get(admin, "/ready").await.unwrap().status(), 200, "the sidecar still serves the app");

    // The app's grace period: nothing reaches it any more, and its outbound calls still work.
    let (app_seen, other_seen, remote_seen) = (app.requests(), other.requests(), remote.requests());
    eventually("the calls go to the other instance, and out", Duration::from_secs(10), || async {
        (other.requests() > other_seen + 50 && remote.requests() > remote_seen + 50).then_some(())
    })
    .await;
    assert_eq!(app.requests(), app_seen, "no call reached the app after /drain answered");

    // The app exits; then the sidecar gets SIGTERM, and exits 0.
    let outbound_report = calls_out.stop().await;
    app.kill();
    let more = other.requests();
    eventually("calls still flow after the app exits", Duration::from_secs(10), || async {
        (other.requests() > more + 20).then_some(())
    })
    .await;
    let mut sidecar = sidecar;
    sidecar.sigterm();
    assert_eq!(sidecar.wait_exit(Duration::from_secs(10)).code(), Some(0));
    let inbound_report = calls_in.stop().await;

    assert!(outbound_report.failures.is_empty(), "outbound failures: {:?}", outbound_report.failures);
    assert!(inbound_report.failures.is_empty(), "inbound failures: {:?}", inbound_report.failures);
    assert!(outbound_report.ok > 100 && inbound_report.ok > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_after_drain_does_not_register_the_app_again() {
    let chroot = Zk::shared().chroot();
    let zk = chroot.client().await;
    let app = Backend::http("app").await;
    let admin = local(free_port());
    let entry = |id: &str| {
        format!(
            "[[register]]\nservice = \"app\"\naddress = \"127.0.0.1\"\nport = {}\nid = \"{id}\"\ndrain_delay = \"0s\"\n",
            app.addr.port()
        )
    };
    let base = format!("{}[admin]\nbind = \"{admin}\"\n", chroot.source_config());
    let bin = Binary::start_config(&format!("{base}{}", entry("one")), admin).await;
    eventually("registered", Duration::from_secs(10), || async { zk.get("/zkroute/services/app/one").await }).await;
    assert_eq!(drain(admin, &[]).await.0, 200);
    assert!(zk.get("/zkroute/services/app/one").await.is_none());

    let reloads = |text: String| async move {
        let m = String::from_utf8_lossy(get(admin, "/metrics").await.ok()?.body()).into_owned();
        metric_value(&m, &text)
    };
    let before = reloads("zkroute_config_reloads_total{result=\"ok\"}".into()).await.unwrap_or(0.0);
    bin.reload(&format!("{base}{}", entry("two")));
    eventually("the reload applied", Duration::from_secs(10), || async {
        let now = reloads("zkroute_config_reloads_total{result=\"ok\"}".into()).await?;
        (now > before).then_some(())
    })
    .await;
    let config: serde_json::Value = serde_json::from_slice(get(admin, "/config").await.unwrap().body()).unwrap();
    let waiting = config["config_reload"]["restart_needed"].to_string();
    assert!(waiting.contains("/drain"), "{config}");
    assert!(zk.get("/zkroute/services/app/two").await.is_none(), "drained until the restart");
    assert!(zk.get("/zkroute/services/app/one").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_drain_needs_the_token_and_no_web_page_can_drain() {
    let routes = Routes::new();
    // The wildcard address is not loopback; the test still reaches it on 127.0.0.1.
    let port = free_port();
    let with_token = |token: &str| {
        format!("{}[admin]\nbind = \"0.0.0.0:{port}\"\ndrain_token = \"{token}\"\n", routes.source_config())
    };
    let bin = Binary::start_config(&with_token("s3cret"), local(port)).await;
    let admin = local(port);
    let refused = |(status, body): (u16, String)| {
        assert_eq!(status, 403, "{body}");
        body
    };
    assert!(refused(drain(admin, &[]).await).contains("x-zkroute-drain-token"));
    refused(drain(admin, &[("x-zkroute-drain-token", "s3cre")]).await);
    refused(drain(admin, &[("x-zkroute-drain-token", "s3cret"), ("origin", "http://evil.example")]).await);
    refused(drain(admin, &[("x-zkroute-drain-token", "s3cret"), ("sec-fetch-site", "cross-site")]).await);
    let host = admin.to_string();
    let put = send(admin, request("PUT", &host, "/drain", &[("x-zkroute-drain-token", "s3cret")], "")).await.unwrap();
    assert_eq!(put.status(), 405);
    // GET, as Kubernetes' httpGet hook sends it.
    let ok = send(admin, request("GET", &host, "/drain", &[("x-zkroute-drain-token", "s3cret")], "")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(String::from_utf8_lossy(ok.body()), "drained: nothing was registered\n");
    drop(bin);

    // Without a token configured, off loopback, nobody may drain.
    let port = free_port();
    let config = format!("{}[admin]\nbind = \"0.0.0.0:{port}\"\n", routes.source_config());
    let _bin = Binary::start_config(&config, local(port)).await;
    assert!(refused(drain(local(port), &[("x-zkroute-drain-token", "")]).await).contains("admin.drain_token"));

    // On loopback no token is needed, but a web page is still refused.
    let port = free_port();
    let config = format!("{}[admin]\nbind = \"127.0.0.1:{port}\"\n", routes.source_config());
    let _bin = Binary::start_config(&config, local(port)).await;
    refused(drain(local(port), &[("origin", "http://127.0.0.1:8000")]).await);
    assert_eq!(drain(local(port), &[]).await.0, 200);
}
