//! The dashboard at the admin port's `/`: one HTML page rendered here, from the table in force,
//! the status sections of `/config`, the last swaps and the request counters. No script, no
//! external asset (it works offline, and its Content-Security-Policy forbids both); it reloads
//! itself every few seconds. Every string that came from a client, a file or ZooKeeper is
//! escaped by [`Html`].

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value};

use super::html::Html;
use super::traffic::{Counts, TrafficView};
use super::{ListenerInfo, state_view};
use crate::discovery::swaps::SwapRecord;
use crate::endpoint::CheckReport;
use crate::metrics::Metrics;
use crate::routing::documents::{Backend, CheckKind, HashOn, LbPolicy};
use crate::routing::table::{ListenerRoutes, Route, ServiceEntry};
use crate::routing::{Format, RoutingTable, SourceKind};

/// Seconds between the page's reloads.
pub const REFRESH_SECONDS: u32 = 5;
/// Instance rows per service, and in all; the rest are counted (`/config` has them all).
const ROWS_PER_SERVICE: usize = 100;
const ROWS_IN_ALL: usize = 1000;

/// What the page is rendered from.
pub struct Page<'a> {
    pub table: Option<&'a RoutingTable>,
    /// The listeners to show, with their addresses.
    pub listeners: &'a [(&'a ListenerRoutes, ListenerInfo)],
    /// The sections of `/config` that are not the table (`zookeeper`, `registrations`, ...).
    pub status: &'a Map<String, Value>,
    pub swaps: &'a [SwapRecord],
    pub traffic: &'a TrafficView,
    pub metrics: &'a Metrics,
    pub draining: bool,
    pub now: SystemTime,
}

/// Sections of `status` rendered in a place of their own; others are shown generically.
const KNOWN_STATUS: &[&str] = &["zookeeper", "registrations", "recent_swaps"];

/// The whole page.
pub fn render(p: &Page<'_>) -> String {
    let mut h = Html::with_capacity(64 * 1024);
    h.raw("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .raw("<meta http-equiv=\"refresh\" content=\"")
        .fmt(format_args!("{REFRESH_SECONDS}"))
        .raw("\"><title>zkroute</title><style>")
        .raw(STYLE)
        .raw("</style></head><body>");
    header(&mut h, p);
    zookeeper(&mut h, p);
    traffic(&mut h, p);
    services(&mut h, p);
    listeners(&mut h, p);
    invalid(&mut h, p);
    registrations(&mut h, p);
    swaps(&mut h, p);
    for (key, value) in p.status.iter().filter(|(k, _)| !KNOWN_STATUS.contains(&k.as_str())) {
        h.raw("<section><h2>").text(key).raw("</h2>");
        generic(&mut h, value);
        h.raw("</section>");
    }
    h.raw("<footer>zkroute ")
        .text(env!("CARGO_PKG_VERSION"))
        .raw(" · reloads every ")
        .fmt(format_args!("{REFRESH_SECONDS}"))
        .raw(" s · rendered ")
        .text(&clock(p.now))
        .raw(" · <a href=\"/config\">/config</a> · <a href=\"/metrics\">/metrics</a></footer></body></html>\n");
    h.finish()
}

fn header(h: &mut Html, p: &Page<'_>) {
    h.raw("<header><h1>zkroute</h1>");
    match (p.draining, p.table.is_some()) {
        (true, _) => h.raw("<span class=\"badge warn\">draining</span>"),
        (false, true) => h.raw("<span class=\"badge ok\">ready</span>"),
        (false, false) => h.raw("<span class=\"badge bad\">no routing table yet</span>"),
    };
    if let Some(t) = p.table {
        h.raw("<span class=\"meta\">table v")
            .fmt(format_args!("{}", t.version))
            .raw(" · built ")
            .text(&ago(p.now, t.built_at))
            .raw(" · source ")
            .text(&t.source.to_string())
            .raw("</span>");
    }
    h.raw("</header>");
    let Some(t) = p.table else { return };
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    let mut instances = 0;
    for s in t.services.values() {
        let unknown_ok = s.policy.unknown_is_healthy();
        for i in s.instances.iter() {
            instances += 1;
            *states.entry(state_view(&i.state, i.instance.enabled, unknown_ok).state).or_default() += 1;
        }
    }
    let rules = t.rules.values().filter(|r| r.active.is_some()).count();
    h.raw("<div class=\"cards\">");
    card(h, "services", &t.services.len().to_string(), "");
    let mut detail = String::new();
    for (state, n) in &states {
        detail.push_str(&format!("{n} {state} "));
    }
    card(h, "instances", &instances.to_string(), detail.trim_end());
    card(h, "rules in force", &rules.to_string(), "");
    card(h, "invalid nodes", &t.invalid.len().to_string(), if t.invalid.is_empty() { "" } else { "see below" });
    h.raw("</div>");
}

fn card(h: &mut Html, label: &str, value: &str, detail: &str) {
    h.raw("<div class=\"card\"><div class=\"value\">")
        .text(value)
        .raw("</div><div class=\"label\">")
        .text(label)
        .raw("</div><div class=\"detail\">")
        .text(detail)
        .raw("</div></div>");
}

fn zookeeper(h: &mut Html, p: &Page<'_>) {
    h.raw("<section id=\"zookeeper\"><h2>ZooKeeper</h2>");
    let source = p.table.map(|t| t.source);
    let follows = matches!(source, Some(SourceKind::Zookeeper | SourceKind::Snapshot));
    match p.status.get("zookeeper") {
        Some(Value::Object(zk)) => {
            h.raw("<table class=\"kv\">");
            kv(h, "snapshot in use", &yes_no(p.metrics.snapshot_in_use.get() == 1));
            for (k, v) in zk {
                h.raw("<tr><th>").text(k).raw("</th><td>");
                scalar(h, v);
                h.raw("</td></tr>");
            }
            h.raw("</table>");
        }
        _ if follows || source.is_none() => {
            h.raw("<table class=\"kv\">");
            kv(h, "connected", &yes_no(p.metrics.zk_connected.get() == 1));
            kv(h, "session expirations", &p.metrics.zk_session_expirations.get().to_string());
            kv(h, "snapshot in use", &yes_no(p.metrics.snapshot_in_use.get() == 1));
            h.raw("</table>");
        }
        _ => {
            let why = match source {
                Some(SourceKind::File) => "routes come from the static file",
                _ => "no listeners: this zkroute only registers",
            };
            h.raw("<p class=\"muted\">Not following ZooKeeper: ").text(why).raw(".</p>");
        }
    }
    h.raw("</section>");
}

fn kv(h: &mut Html, key: &str, value: &str) {
    h.raw("<tr><th>").text(key).raw("</th><td>").text(value).raw("</td></tr>");
}

fn traffic(h: &mut Html, p: &Page<'_>) {
    let t = p.traffic;
    h.raw("<section id=\"traffic\"><h2>Traffic</h2>");
    if !p.metrics.enabled {
        h.raw("<p class=\"muted\">metrics.enabled = false: requests are not counted.</p></section>");
        return;
    }
    match t.rates_over {
        Some(d) => h.raw("<p class=\"muted\">Rates over the last ").fmt(format_args!("{:.0} s", d.as_secs_f64())),
        None => h.raw("<p class=\"muted\">Rates appear from the next reload; counts are since the start"),
    };
    h.raw(".</p>");
    // Label sets are made when a table is built: a service that took no traffic has zeros.
    let active: Vec<_> = t.services.iter().filter(|s| s.total != Counts::default()).collect();
    if active.is_empty() {
        h.raw("<p class=\"muted\">No requests yet.</p></section>");
        return;
    }
    h.raw(
        "<table><thead><tr><th>service</th><th class=\"num\">req/s</th><th class=\"num\">4xx/s</th>\
         <th class=\"num\">5xx/s</th><th class=\"num\">connect errors/s</th><th class=\"num\">retries/s</th>\
         <th class=\"num\">TCP conn/s</th><th>status codes since start</th></tr></thead><tbody>",
    );
    for s in active {
        h.raw("<tr><td>");
        if s.service.is_empty() {
            h.raw("<span class=\"muted\">(no route)</span>");
        } else {
            h.text(&s.service);
        }
        h.raw("</td>");
        let rate = |h: &mut Html, n: Option<u64>, alarming: bool| {
            match n.and_then(|n| t.per_second(n)) {
                Some(r) if r > 0.0 && alarming => h.raw("<td class=\"num bad\">").fmt(format_args!("{r:.1}")),
                Some(r) => h.raw("<td class=\"num\">").fmt(format_args!("{r:.1}")),
                None => h.raw("<td class=\"num muted\">–"),
            };
            h.raw("</td>");
        };
        let r = s.recent.as_ref();
        rate(h, r.map(|r| r.requests), false);
        rate(h, r.map(|r| r.class(4)), false);
        rate(h, r.map(|r| r.class(5)), true);
        rate(h, r.map(|r| r.connect_errors), true);
        rate(h, r.map(|r| r.retries), false);
        rate(h, r.map(|r| r.tcp_connections), false);
        h.raw("<td>");
        for (code, n) in &s.total.codes {
            let class = match code / 100 {
                5 => "<span class=\"code bad\">",
                4 => "<span class=\"code warn\">",
                _ => "<span class=\"code\">",
            };
            h.raw(class).fmt(format_args!("{code}")).raw("</span> ").fmt(format_args!("{n} "));
        }
        h.raw("</td></tr>");
    }
    h.raw("</tbody></table></section>");
}

fn services(h: &mut Html, p: &Page<'_>) {
    h.raw("<section id=\"services\"><h2>Services</h2>");
    let Some(t) = p.table else {
        h.raw("<p class=\"muted\">No routing table loaded yet.</p></section>");
        return;
    };
    if t.services.is_empty() {
        h.raw("<p class=\"muted\">No services.</p>");
    }
    let mut budget = ROWS_IN_ALL;
    for (name, s) in t.services.sorted() {
        h.raw("<div class=\"service\"><h3>").text(name.as_str()).raw("</h3> ");
        service_badges(h, s);
        let shown = s.instances.len().min(ROWS_PER_SERVICE).min(budget);
        budget -= shown;
        if s.instances.is_empty() {
            h.raw("<p class=\"muted\">No instances.</p></div>");
            continue;
        }
        h.raw(
            "<table><thead><tr><th>instance</th><th>address</th><th>format</th><th>zone · metadata</th>\
             <th class=\"num\">weight</th><th>state</th><th>last check</th><th class=\"num\">in flight</th>\
             <th>origin</th></tr></thead><tbody>",
        );
        let unknown_ok = s.policy.unknown_is_healthy();
        for i in s.instances.iter().take(shown) {
            let inst = &i.instance;
            let v = state_view(&i.state, inst.enabled, unknown_ok);
            h.raw("<tr><td>").text(&i.id).raw("</td><td class=\"nowrap\">").text(&inst.addr.to_string());
            h.raw("</td><td>");
            h.text(format_name(inst.format)).raw("</td><td>");
            h.text(inst.zone.as_deref().unwrap_or(""));
            for (k, val) in inst.metadata.iter() {
                h.raw(" <span class=\"tag\">").text(k).raw("=").text(val).raw("</span>");
            }
            h.raw("</td><td class=\"num\">").fmt(format_args!("{}", inst.weight)).raw("</td><td>");
            h.raw(match v.state {
                "healthy" => "<span class=\"badge ok\">",
                "ejected" | "draining" => "<span class=\"badge warn\">",
                _ => "<span class=\"badge bad\">",
            })
            .text(v.state)
            .raw("</span>");
            if s.protected {
                h.raw(" <span class=\"badge info\">protected</span>");
            }
            if let Some(until) = i.state.ejected_until() {
                h.raw(" <span class=\"small\">for ")
                    .text(&left(p.now, until))
                    .raw(" more (ejection ")
                    .fmt(format_args!("{}", v.ejections))
                    .raw(")</span>");
            }
            h.raw("</td><td>");
            last_check(h, p.now, v.last_check.as_ref());
            h.raw("</td><td class=\"num\">").fmt(format_args!("{}", v.in_flight)).raw("</td><td class=\"path\">");
            h.text(&i.origin.path);
            if let Some(version) = i.origin.version {
                h.raw(" <span class=\"small\">v").fmt(format_args!("{version}")).raw("</span>");
            }
            h.raw("</td></tr>");
        }
        h.raw("</tbody></table>");
        if shown < s.instances.len() {
            h.raw("<p class=\"muted\">")
                .fmt(format_args!("{} more instances", s.instances.len() - shown))
                .raw(": see <a href=\"/config\">/config</a>.</p>");
        }
        h.raw("</div>");
    }
    h.raw("</section>");
}

fn service_badges(h: &mut Html, s: &ServiceEntry) {
    let pol = &s.policy;
    let lb = match &pol.lb {
        LbPolicy::P2c => "p2c".to_owned(),
        LbPolicy::RoundRobin => "round_robin".to_owned(),
        LbPolicy::RingHash(HashOn::SourceIp) => "ring_hash on source_ip".to_owned(),
        LbPolicy::RingHash(HashOn::Header(name)) => format!("ring_hash on header {name}"),
    };
    h.raw("<span class=\"tag\">").text(&lb).raw("</span>");
    if let Some(hc) = &pol.health_check {
        let kind = match &hc.kind {
            CheckKind::Http { path } => format!("http {path}"),
            CheckKind::Tcp => "tcp".to_owned(),
            CheckKind::Grpc { service } => format!("grpc {service}"),
        };
        h.raw(" <span class=\"tag\">checked: ").text(&kind).raw("</span>");
    }
    if pol.outlier.is_some() {
        h.raw(" <span class=\"tag\">outlier detection</span>");
    }
    if s.all.panic {
        h.raw(" <span class=\"badge bad\">panic: spreading over every instance</span>");
    }
    if s.protected {
        h.raw(" <span class=\"badge info\">protected: the registry shows none</span>");
    }
    if let Some(o) = &s.policy_origin {
        h.raw(" <span class=\"small\">policy ").text(&o.path).raw("</span>");
    }
}

fn last_check(h: &mut Html, now: SystemTime, check: Option<&CheckReport>) {
    match check {
        None => h.raw("<span class=\"muted\">–</span>"),
        Some(c) => h
            .raw(if c.ok { "<span class=\"ok-text\">" } else { "<span class=\"bad-text\">" })
            .text(&c.detail)
            .raw("</span> <span class=\"small\">")
            .text(&ago(now, c.at))
            .raw("</span>"),
    };
}

fn listeners(h: &mut Html, p: &Page<'_>) {
    h.raw("<section id=\"listeners\"><h2>Listeners and rules</h2>");
    if p.table.is_none() {
        h.raw("</section>");
        return;
    }
    if p.listeners.is_empty() {
        h.raw("<p class=\"muted\">No listeners: this zkroute only registers.</p>");
    }
    for (l, info) in p.listeners {
        listener(h, l, info);
    }
    h.raw("</section>");
}

fn listener(h: &mut Html, l: &ListenerRoutes, info: &ListenerInfo) {
    let protocol = match l.protocol {
        crate::routing::table::Protocol::Http => "http",
        crate::routing::table::Protocol::Tcp => "tcp",
    };
    h.raw("<div class=\"listener\"><h3>").text(&l.name).raw("</h3> <span class=\"tag\">").text(protocol);
    h.raw("</span> <span class=\"small\">").text(&info.bind.to_string()).raw("</span>");
    if let Some(tracker) = &info.draining {
        h.raw(" <span class=\"badge warn\">removed: draining ")
            .fmt(format_args!("{}", tracker.active()))
            .raw(" connections</span>");
    }
    if l.routes.is_empty() {
        h.raw("<p class=\"muted\">No rules: every request is answered 404 no_route.</p></div>");
        return;
    }
    h.raw(
        "<table><thead><tr><th class=\"num\">#</th><th>rule</th><th class=\"num\">priority</th><th>match</th>\
         <th>targets (weight share, endpoints available)</th><th>timeout</th><th class=\"num\">retries</th>\
         </tr></thead><tbody>",
    );
    for (n, r) in l.routes.iter().enumerate() {
        h.raw("<tr><td class=\"num\">").fmt(format_args!("{}", n + 1)).raw("</td><td>").text(&r.id);
        h.raw("</td><td class=\"num\">");
        if let Some(rule) = &r.rule {
            h.fmt(format_args!("{}", rule.priority));
        }
        h.raw("</td><td>");
        route_match(h, r);
        h.raw("</td><td>");
        targets(h, r);
        h.raw("</td><td>").text(&humantime::format_duration(r.timeout).to_string());
        h.raw("</td><td class=\"num\">").fmt(format_args!("{}", r.retries)).raw("</td></tr>");
    }
    h.raw("</tbody></table></div>");
}

fn route_match(h: &mut Html, r: &Route) {
    let Some(m) = r.rule.as_ref().and_then(|r| r.doc.match_.as_ref()) else {
        h.raw("<span class=\"muted\">everything</span>");
        return;
    };
    let mut tag = |k: &str, v: &str| {
        h.raw("<span class=\"tag\">").text(k).raw(" ").text(v).raw("</span> ");
    };
    if let Some(v) = &m.host {
        tag("host", v);
    }
    if let Some(v) = &m.path_prefix {
        tag("path", v);
    }
    if let Some(v) = &m.method {
        tag("method", v);
    }
    for (k, v) in &m.headers {
        tag(k, v);
    }
}

fn targets(h: &mut Html, r: &Route) {
    let total: u64 = r.targets.iter().map(|t| u64::from(t.weight)).sum();
    for t in r.targets.iter() {
        let share = if total == 0 { 0.0 } else { 100.0 * f64::from(t.weight) / total as f64 };
        h.raw("<div class=\"target\"><span class=\"share\">").fmt(format_args!("{share:.0}%")).raw("</span> ");
        match &t.backend {
            Backend::Service { service, subset, endpoint, .. } => {
                h.text(service.as_str());
                for (k, v) in subset {
                    h.raw(" <span class=\"tag\">").text(k).raw("=").text(v).raw("</span>");
                }
                if let Some(e) = endpoint {
                    h.raw(" <span class=\"tag\">endpoint ").text(e).raw("</span>");
                }
            }
            Backend::Address { addr, .. } => {
                h.text(&addr.to_string());
            }
        }
        let (available, all) = (t.set.available.len(), t.set.endpoints.len());
        h.raw(if available == 0 { " <span class=\"bad-text small\">" } else { " <span class=\"small\">" })
            .fmt(format_args!("{available}/{all} available"))
            .raw("</span>");
        if t.set.panic {
            h.raw(" <span class=\"badge bad\">panic</span>");
        }
        h.raw("</div>");
    }
}

fn invalid(h: &mut Html, p: &Page<'_>) {
    h.raw("<section id=\"invalid\"><h2>Invalid nodes</h2>");
    let nodes = p.table.map(|t| &*t.invalid).unwrap_or_default();
    if nodes.is_empty() {
        h.raw("<p class=\"muted\">None.</p></section>");
        return;
    }
    h.raw("<table><thead><tr><th>kind</th><th>path</th><th>reason</th><th>version</th><th>in force</th></tr></thead><tbody>");
    for n in nodes {
        h.raw("<tr><td>").text(n.kind.as_str()).raw("</td><td class=\"path\">").text(&n.path);
        h.raw("</td><td class=\"bad-text\">").text(&n.reason).raw("</td><td>");
        if let Some(v) = n.version {
            h.fmt(format_args!("{v}"));
        }
        h.raw("</td><td>")
            .raw(if n.previous_in_force { "the previous version" } else { "<span class=\"muted\">nothing</span>" })
            .raw("</td></tr>");
    }
    h.raw("</tbody></table></section>");
}

fn registrations(h: &mut Html, p: &Page<'_>) {
    let Some(regs) = p.status.get("registrations") else { return };
    h.raw("<section id=\"registrations\"><h2>Registrations</h2>");
    generic(h, regs);
    h.raw("</section>");
}

fn swaps(h: &mut Html, p: &Page<'_>) {
    h.raw("<section id=\"swaps\"><h2>Recent table swaps</h2>");
    if p.swaps.is_empty() {
        h.raw("<p class=\"muted\">None yet.</p></section>");
        return;
    }
    h.raw(
        "<table><thead><tr><th class=\"num\">version</th><th>when</th><th>what changed</th><th>services</th>\
         <th class=\"num\">build</th><th class=\"num\">event to swap</th></tr></thead><tbody>",
    );
    for s in p.swaps {
        h.raw("<tr><td class=\"num\">").fmt(format_args!("{}", s.version)).raw("</td><td>").text(&clock(s.at));
        h.raw(" <span class=\"small\">").text(&ago(p.now, s.at)).raw("</span></td><td>").text(&changes(s));
        h.raw("</td><td>");
        for name in &s.services {
            h.raw("<span class=\"tag\">").text(name).raw("</span> ");
        }
        if s.more_services > 0 {
            h.fmt(format_args!("and {} more", s.more_services));
        }
        h.raw("</td><td class=\"num\">").text(&micros(s.build_us)).raw("</td><td class=\"num\">");
        h.text(&s.propagation_us.map(micros).unwrap_or_default()).raw("</td></tr>");
    }
    h.raw("</tbody></table></section>");
}

/// "+2 −1 ~1 instances, +1 rules" or "health".
fn changes(s: &SwapRecord) -> String {
    if s.health_only {
        return "endpoint health".to_owned();
    }
    let mut parts = Vec::new();
    for (what, added, removed, changed) in [
        ("instances", s.instances_added, s.instances_removed, s.instances_changed),
        ("rules", s.rules_added, s.rules_removed, s.rules_changed),
        ("policies", 0, 0, s.policies_changed),
    ] {
        let mut part = String::new();
        for (sign, n) in [("+", added), ("−", removed), ("~", changed)] {
            if n > 0 {
                part.push_str(&format!("{sign}{n} "));
            }
        }
        if !part.is_empty() {
            parts.push(format!("{part}{what}"));
        }
    }
    if s.local {
        parts.insert(0, "local configuration reloaded".to_owned());
    }
    if parts.is_empty() { "full read, nothing new".to_owned() } else { parts.join(", ") }
}

/// Any JSON value: objects as key/value tables, arrays of objects as tables.
fn generic(h: &mut Html, v: &Value) {
    match v {
        Value::Object(map) => {
            h.raw("<table class=\"kv\">");
            for (k, v) in map {
                h.raw("<tr><th>").text(k).raw("</th><td>");
                scalar(h, v);
                h.raw("</td></tr>");
            }
            h.raw("</table>");
        }
        Value::Array(items) if items.iter().all(Value::is_object) && !items.is_empty() => {
            // What a row is about first, then the other keys in order.
            let mut columns: Vec<&str> =
                ["service", "name", "id"].into_iter().filter(|k| items.iter().any(|i| i.get(k).is_some())).collect();
            for item in items.iter().filter_map(Value::as_object) {
                for k in item.keys() {
                    if !columns.contains(&k.as_str()) {
                        columns.push(k);
                    }
                }
            }
            h.raw("<table><thead><tr>");
            for c in &columns {
                h.element("<th>", c, "</th>");
            }
            h.raw("</tr></thead><tbody>");
            for item in items {
                h.raw("<tr>");
                for c in &columns {
                    h.raw("<td>");
                    scalar(h, &item[*c]);
                    h.raw("</td>");
                }
                h.raw("</tr>");
            }
            h.raw("</tbody></table>");
        }
        Value::Array(items) if items.is_empty() => {
            h.raw("<p class=\"muted\">None.</p>");
        }
        other => {
            h.raw("<p>");
            scalar(h, other);
            h.raw("</p>");
        }
    }
}

/// A JSON value in a table cell: strings as text, booleans as yes/no, the rest as JSON.
fn scalar(h: &mut Html, v: &Value) {
    match v {
        Value::Null => h.raw("<span class=\"muted\">–</span>"),
        Value::Bool(true) => h.raw("<span class=\"ok-text\">yes</span>"),
        Value::Bool(false) => h.raw("no"),
        Value::String(s) => h.text(s),
        other => h.text(&other.to_string()),
    };
}

fn yes_no(b: bool) -> String {
    (if b { "yes" } else { "no" }).to_owned()
}

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Curator => "curator",
        Format::Serverset => "serverset",
        Format::Nerve => "nerve",
        Format::Plain => "plain",
        Format::Dubbo => "dubbo",
    }
}

/// "14:03:07" (UTC), the time of day of `t`.
fn clock(t: SystemTime) -> String {
    let s = humantime::format_rfc3339_seconds(t).to_string();
    s.get(11..19).map(|c| format!("{c}Z")).unwrap_or(s)
}

/// "3 s ago", "2 min ago".
fn ago(now: SystemTime, then: SystemTime) -> String {
    match now.duration_since(then) {
        Ok(d) => format!("{} ago", short(d)),
        Err(_) => "just now".to_owned(),
    }
}

/// "27 s" until `until`.
fn left(now: SystemTime, until: SystemTime) -> String {
    short(until.duration_since(now).unwrap_or_default())
}

fn short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{} ms", d.as_millis()),
        1..120 => format!("{s} s"),
        120..7200 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

fn micros(us: u64) -> String {
    if us < 10_000 { format!("{:.2} ms", us as f64 / 1000.0) } else { format!("{} ms", us / 1000) }
}

const STYLE: &str = r#"
:root{--fg:#1d2330;--muted:#6b7385;--line:#e3e6ec;--bg:#f6f7f9;--ok:#1a7f37;--okbg:#dcf5e3;--warn:#9a6700;--warnbg:#fff1c7;--bad:#c62828;--badbg:#fde2e1;--info:#5b3cc4;--infobg:#ece6ff}
*{box-sizing:border-box}
body{margin:0;padding:16px 24px 32px;font:13px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans",sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:baseline;gap:12px;flex-wrap:wrap}
h1{font-size:20px;margin:0}
h2{font-size:15px;margin:0 0 8px}
h3{font-size:14px;margin:0;display:inline}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin-top:14px}
.meta,.small,.muted{color:var(--muted)}
.small{font-size:12px}
table{border-collapse:collapse;width:100%;margin-top:6px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);font-size:12px;white-space:nowrap}
td{overflow-wrap:anywhere}
table.kv{width:auto}
table.kv th{padding-right:24px}
.num{text-align:right;font-variant-numeric:tabular-nums}
.path{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.badge{white-space:nowrap;display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ok{color:var(--ok);background:var(--okbg)}.warn{color:var(--warn);background:var(--warnbg)}
.bad{color:var(--bad);background:var(--badbg)}.info{color:var(--info);background:var(--infobg)}
td.bad{background:none}
.ok-text{color:var(--ok)}.bad-text{color:var(--bad)}
.tag{display:inline-block;padding:0 6px;border-radius:4px;background:var(--bg);border:1px solid var(--line);font-size:12px}
.code{font-weight:600}.code.warn,.code.bad{background:none}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin-top:12px}
.card{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 16px;min-width:140px}
.card .value{font-size:22px;font-weight:600}
.card .label{color:var(--muted)}
.card .detail{font-size:12px;color:var(--muted)}
.service,.listener{margin:10px 0 16px}
.target,.nowrap{white-space:nowrap}
.share{display:inline-block;min-width:3em;font-variant-numeric:tabular-nums}
footer{margin-top:16px;color:var(--muted);font-size:12px}
a{color:var(--info)}
"#;
