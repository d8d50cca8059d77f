//! The admin HTTP API of an in-process Warren: health and readiness,
//! status, metrics, plugin upload and removal, publishing, authorization,
//! limits, and malformed requests.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use warren::app::{App, AppHandle};
use warren::config::Config;
use warren_it::broker::{Broker, text_header, unique};
use warren_it::config::{WarrenToml, echo_section};
use warren_it::http::{self, Response};
use warren_it::plugins::wasm;
use warren_it::proxy::{Mode, Proxy};
use warren_it::wait;

pub(crate) const TOKEN: &str = "test-token-0123456789abcdef";

/// A plugins directory with copies of the named plugins (`file` ←
/// `crate`).
pub(crate) fn plugins_dir(plugins: &[(&str, &str)]) -> tempfile::TempDir {
    crate::host::plugins_dir(plugins).unwrap()
}

/// Test settings: unique retry/dead-letter names and spool stream, the
/// admin API on a free port with [`TOKEN`]. `extra` is TOML merged in.
pub(crate) fn config(dir: &Path, dlq: &str, extra: &str) -> Config {
    let mut c = crate::host::parse(
        &WarrenToml::isolated(dir)
            .set("amqp.heartbeat-secs", 2)
            .set("amqp.backoff-max-ms", 500)
            .set("amqp.consumer-check-ms", 500)
            .quick_retries(2)
            .dead_letters(&unique("dlx"), dlq)
            .grace_period_ms(10_000)
            .merge(extra),
    );
    if c.admin.bind == "127.0.0.1:9090" {
        c.admin.bind = format!("127.0.0.1:{}", warren_it::ports::free_port().unwrap());
    }
    if c.admin.token.is_none() {
        c.admin.token = Some(warren::config::Secret::new(TOKEN));
    }
    c
}

/// A running Warren and where its admin API listens.
pub(crate) struct Running {
    pub app: App,
    pub handle: AppHandle,
    pub addr: SocketAddr,
}

pub(crate) async fn start(config: Config) -> Running {
    let app = App::start(config).await.expect("warren starts");
    let handle = app.handle();
    let addr = app.admin_addr();
    Running { app, handle, addr }
}

pub(crate) async fn start_ready(config: Config) -> Running {
    let r = start(config).await;
    crate::host::until_ready(&r.handle, "warren ready", Duration::from_secs(30))
        .await
        .unwrap();
    r
}

pub(crate) fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

pub(crate) async fn get(addr: SocketAddr, path: &str) -> Response {
    http::request(addr, "GET", path, &[], None).await.unwrap()
}

/// A request with the right token.
pub(crate) async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Response {
    let auth = bearer();
    http::request(addr, method, path, &[("Authorization", &auth)], body)
        .await
        .unwrap()
}

/// `POST /publish` of the JSON `body`, with the right token.
pub(crate) async fn publish(addr: SocketAddr, body: &[u8]) -> Response {
    let auth = bearer();
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    http::request(addr, "POST", "/publish", &headers, Some(body))
        .await
        .unwrap()
}

/// Prometheus text parsed into `name{labels}` → value. Panics on any line
/// that is not a comment, blank, or a well-formed sample.
pub(crate) fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix('#') {
            let c = c.trim_start();
            assert!(
                c.starts_with("HELP ") || c.starts_with("TYPE "),
                "bad comment line: {line:?}"
            );
            if let Some(t) = c.strip_prefix("TYPE ") {
                let kind = t.split_whitespace().nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "bad TYPE: {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
                && !name.as_bytes()[0].is_ascii_digit(),
            "bad metric name: {line:?}"
        );
        if name_end < series.len() {
            let labels = &series[name_end..];
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels: {line:?}"
            );
            let inner = &labels[1..labels.len() - 1];
            // label="value" pairs, values quoted.
            let mut rest = inner;
            while !rest.is_empty() {
                let (k, v) = rest
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(
                    k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                    "bad label name in {line:?}"
                );
                let close = v
                    .find('"')
                    .unwrap_or_else(|| panic!("unclosed in {line:?}"));
                rest = v[close + 1..].trim_start_matches(',');
            }
        }
        let v: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        out.insert(series.to_string(), v);
    }
    out
}

pub(crate) async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let r = get(addr, "/metrics").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{:?}",
        r.headers
    );
    parse_metrics(&r.text())
}

/// The value of the series named `name` whose labels include every pair
/// in `labels` (0 when absent).
pub(crate) fn metric(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            let n = k.split('{').next().unwrap_or("");
            n == name
                && labels
                    .iter()
                    .all(|(lk, lv)| k.contains(&format!("{lk}=\"{lv}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_ready_status_and_plugins_describe_a_running_warren() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out) = (unique("echo-in"), unique("echo-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]);
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}", prefetch = 10 }}]
            config = {{ routing-key = "{echo_out}" }}
            "#
        ),
    );
    let w = start_ready(cfg).await;
    let live = get(w.addr, "/live").await;
    assert_eq!(live.status, 200);
    let ready = get(w.addr, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json().unwrap()["ready"], true);

    broker.publish_all("", &echo_in, ["a", "b"]).await.unwrap();
    broker
        .collect(&echo_out, 2, Duration::from_secs(30))
        .await
        .unwrap();
    // The broker-side consumer count arrives with the periodic check.
    let status = wait::until(
        "status with broker counts",
        Duration::from_secs(20),
        || async {
            let s = get(w.addr, "/status").await.json().unwrap();
            (s["consumers"][0]["broker_consumers"] == 1).then_some(s)
        },
    )
    .await
    .unwrap();
    assert_eq!(status["ready"], true);
    assert_eq!(status["connection"]["state"], "running");
    assert!(status["connection"]["generation"].as_u64().unwrap() >= 1);
    let c = &status["consumers"][0];
    assert_eq!(c["queue"], echo_in.as_str());
    assert_eq!(c["state"], "running");
    assert_eq!(c["consumers"], 1);
    assert_eq!(c["prefetch"], 10);
    assert!(c["broker_messages"].is_u64(), "{c}");
    let spool = &status["spool"];
    assert_eq!(spool["availability"], "not highly available");
    assert_eq!(spool["highly_available"], false);
    assert!(spool["primary"].is_string(), "{spool}");
    assert!(spool["depth"].is_u64(), "{spool}");
    let p = &status["plugins"][0];
    assert_eq!(p["name"], "echo");
    assert_eq!(p["version"], "0.1.0");
    assert_eq!(p["queues"][0], echo_in.as_str());
    assert!(p["counters"]["ack"].as_u64().unwrap() >= 2, "{p}");
    assert_eq!(status["routes"][0]["queue"], echo_in.as_str());
    assert_eq!(status["failed_plugins"], serde_json::json!([]));

    let plugins = get(w.addr, "/plugins").await.json().unwrap();
    assert_eq!(plugins["plugins"][0]["name"], "echo");
    let missing = get(w.addr, "/nope").await;
    assert_eq!(missing.status, 404);
    assert!(missing.json().unwrap()["error"].is_string());

    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_broker_is_down_and_live_stays_200() {
    let upstream: SocketAddr = "127.0.0.1:5672".parse().unwrap();
    let proxy = Proxy::start(upstream).await.unwrap();
    proxy.set_mode(Mode::Refuse);
    let echo_in = unique("echo-in");
    let dir = plugins_dir(&[("echo", "echo")]);
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}" }}]
            "#
        ),
    );
    let mut cfg = cfg;
    cfg.amqp.url = proxy.amqp_url();
    let w = start(cfg).await;
    // Several looks while the broker cannot be reached.
    for _ in 0..5 {
        let r = get(w.addr, "/ready").await;
        assert_eq!(r.status, 503, "{}", r.text());
        let body = r.json().unwrap();
        assert_eq!(body["ready"], false);
        let reasons = body["reasons"].to_string();
        assert!(reasons.contains("broker connection is"), "{reasons}");
        assert_eq!(get(w.addr, "/live").await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = get(w.addr, "/status").await.json().unwrap();
    assert_ne!(status["connection"]["state"], "running");
    assert!(
        status["connection"]["last_failure"]["class"].is_string(),
        "{}",
        status["connection"]
    );

    proxy.set_mode(Mode::Pass);
    wait::until_true(
        "ready after the broker is back",
        Duration::from_secs(30),
        || async { get(w.addr, "/ready").await.status == 200 },
    )
    .await
    .unwrap();
    assert_eq!(get(w.addr, "/live").await.status, 200);
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploading_the_first_plugin_makes_warren_ready_and_delete_stops_it() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out) = (unique("echo-in"), unique("echo-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &echo_section(&echo_in, &echo_out),
    );
    let w = start(cfg).await;
    let r = get(w.addr, "/ready").await;
    assert_eq!(r.status, 503);
    assert!(r.text().contains("no plugin subscriptions"), "{}", r.text());

    let echo = std::fs::read(wasm("echo").unwrap()).unwrap();
    let put = send(w.addr, "PUT", "/plugins/echo", Some(&echo)).await;
    assert_eq!(put.status, 200, "{}", put.text());
    let report = put.json().unwrap();
    assert_eq!(report["loaded"][0]["name"], "echo");
    assert_eq!(report["routes_started"][0], echo_in.as_str());
    assert!(dir.path().join("echo.wasm").is_file());
    // Only the final file: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    wait::until_true("ready after upload", Duration::from_secs(30), || async {
        get(w.addr, "/ready").await.status == 200
    })
    .await
    .unwrap();
    let got = broker
        .publish_and_collect_one(&echo_in, "x", &echo_out, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);

    // Uploading the same bytes again changes nothing.
    let again = send(w.addr, "PUT", "/plugins/echo", Some(&echo)).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json().unwrap()["unchanged"][0], "echo");

    // Delete: the file goes, the consumer goes, queued messages stay.
    let del = send(w.addr, "DELETE", "/plugins/echo", None).await;
    assert_eq!(del.status, 200, "{}", del.text());
    let report = del.json().unwrap();
    assert_eq!(report["removed"][0]["name"], "echo");
    assert_eq!(report["routes_stopped"][0], echo_in.as_str());
    assert!(!dir.path().join("echo.wasm").exists());
    wait::until_true("consumer gone", Duration::from_secs(20), || async {
        broker.consumer_count(&echo_in).await.unwrap_or(1) == 0
    })
    .await
    .unwrap();
    broker.publish_all("", &echo_in, ["kept"]).await.unwrap();
    assert_eq!(broker.message_count(&echo_in).await.unwrap(), 1);
    assert_eq!(get(w.addr, "/ready").await.status, 503);
    let gone = send(w.addr, "DELETE", "/plugins/echo", None).await;
    assert_eq!(gone.status, 404, "{}", gone.text());
    w.app.shutdown().await;
}

/// A plugins directory with `echo`, consuming a queue of its own, and
/// the test settings for it.
fn echo_setup() -> (tempfile::TempDir, Config) {
    let dir = plugins_dir(&[("echo", "echo")]);
    let echo_in = unique("echo-in");
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}" }}]
            "#
        ),
    );
    (dir, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_need_the_token_and_bad_names_sizes_and_bodies_are_refused() {
    let (dir, mut cfg) = echo_setup();
    cfg.admin.max_body_bytes = 200_000;
    let w = start_ready(cfg).await;
    let listing = || {
        let mut v: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let before = listing();
    let noop = std::fs::read(wasm("noop").unwrap()).unwrap();

    // 401, and nothing changed.
    for auth in [None, Some("Bearer wrong-token-0123456789abcd"), Some(TOKEN)] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        for (method, path, body) in [
            ("POST", "/plugins/reload", None),
            ("PUT", "/plugins/noop", Some(noop.as_slice())),
            ("DELETE", "/plugins/echo", None),
            (
                "POST",
                "/publish",
                Some(br#"{"routing_key":"x","body":"y"}"#.as_slice()),
            ),
        ] {
            let r = http::request(w.addr, method, path, &headers, body)
                .await
                .unwrap();
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}: {}", r.text());
            assert!(r.json().unwrap()["error"].is_string());
        }
    }
    // A large upload without the token is refused before its body is
    // read (the client waits for 100-continue and never sends it).
    let large = vec![7u8; 150_000];
    let r = http::request(w.addr, "PUT", "/plugins/noop", &[], Some(&large))
        .await
        .unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(listing(), before);
    assert_eq!(w.handle.reloader.plugins().len(), 1);
    assert_eq!(w.handle.dispatcher.route_info().len(), 1);

    // Names.
    for path in [
        "/plugins/..%2F..%2Fetc%2Fpasswd",
        "/plugins/..",
        "/plugins/Echo",
        "/plugins/a.b",
        "/plugins/%00",
    ] {
        let r = send(w.addr, "PUT", path, Some(&noop)).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        let r = send(w.addr, "DELETE", path, None).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    // Size.
    let big = vec![0u8; 300_000];
    let r = send(w.addr, "PUT", "/plugins/big", Some(&big)).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(
        r.json().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("max-body-bytes")
    );
    // Not a component, or not a plugin.
    for (bytes, expect) in [
        (b"hello, not wasm".to_vec(), "not a WebAssembly file"),
        (
            std::fs::read(wasm("not-a-plugin").unwrap()).unwrap(),
            "not a warren:plugin",
        ),
        (b"\0asm\x01\0\0\0".to_vec(), "core WebAssembly module"),
    ] {
        let r = send(w.addr, "PUT", "/plugins/junk", Some(&bytes)).await;
        assert_eq!(r.status, 422, "{}", r.text());
        let err = r.json().unwrap()["error"].as_str().unwrap().to_string();
        assert!(err.contains(expect), "{err}");
        assert!(err.contains("junk.wasm"), "names the file: {err}");
    }
    // A component uploaded under another plugin's name.
    let r = send(w.addr, "PUT", "/plugins/other", Some(&noop)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("noop"), "{}", r.text());
    assert_eq!(listing(), before, "no refused upload reached the directory");
    assert_eq!(w.handle.reloader.plugins().len(), 1);

    // Publish bodies.
    for (body, status) in [
        (&b"not json"[..], 400),
        (br#"{"body":"no routing key"}"#, 422),
        (
            br#"{"routing_key":"k","body":"!!","body_encoding":"base64"}"#,
            422,
        ),
        (br#"{"routing_key":"k","headers":{"h":[1]}}"#, 422),
    ] {
        let r = publish(w.addr, body).await;
        assert_eq!(
            r.status,
            status,
            "{}: {}",
            String::from_utf8_lossy(body),
            r.text()
        );
    }
    let r = send(w.addr, "POST", "/publish", Some(br#"{"routing_key":"k"}"#)).await;
    assert_eq!(r.status, 415, "no JSON content type: {}", r.text());
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_without_a_token_probes_and_metrics_answer_and_mutations_are_forbidden() {
    let (dir, mut cfg) = echo_setup();
    let port = warren_it::ports::free_port().unwrap();
    cfg.admin.bind = format!("0.0.0.0:{port}");
    cfg.admin.token = None;
    let w = start_ready(cfg).await;
    assert!(w.addr.ip().is_unspecified(), "bound to {}", w.addr);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for path in ["/live", "/ready", "/metrics", "/status"] {
        let r = get(addr, path).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    }
    let before = std::fs::read_dir(dir.path()).unwrap().count();
    for (method, path, body) in [
        ("POST", "/plugins/reload", None),
        ("DELETE", "/plugins/echo", None),
        (
            "POST",
            "/publish",
            Some(br#"{"routing_key":"x","body":"y"}"#.as_slice()),
        ),
    ] {
        let r = http::request(addr, method, path, &[], body).await.unwrap();
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text());
        let reason = r.json().unwrap()["error"].as_str().unwrap().to_owned();
        assert!(
            reason.contains("admin.token") && reason.contains("loopback"),
            "{reason}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), before);
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_goes_through_the_outbox_and_is_refused_when_nothing_takes_it() {
    let broker = Broker::shared().await.unwrap();
    let q = unique("published");
    broker.declare_queue(&q).await.unwrap();
    let dir = plugins_dir(&[]);
    let w = start(config(dir.path(), &unique("dlq"), "")).await;
    wait::until_true("connected", Duration::from_secs(30), || async {
        w.handle.amqp.status_now().is_running() && w.handle.spool.status().await.primary.is_some()
    })
    .await
    .unwrap();
    let text = format!(
        r#"{{"routing_key":"{q}","body":"hello","headers":{{"x-a":"b","x-n":3,"x-t":true}},"message_id":"m1"}}"#
    );
    let r = publish(w.addr, text.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["placement"], "broker");
    let b64 = format!(r#"{{"routing_key":"{q}","body":"AAEC/w==","body_encoding":"base64"}}"#);
    let r = publish(w.addr, b64.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let got = broker
        .collect(&q, 2, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, b"hello");
    assert_eq!(got[0].header_str("x-a").as_deref(), Some("b"));
    assert_eq!(got[0].header_i64("x-n"), Some(3));
    assert_eq!(got[1].body, vec![0, 1, 2, 255]);
    w.app.shutdown().await;

    // Neither a broker nor a Redis: 503 with both reasons.
    let mut cfg = config(dir.path(), &unique("dlq"), "");
    cfg.amqp.url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        warren_it::ports::free_port().unwrap()
    );
    cfg.spool.url = format!(
        "redis://127.0.0.1:{}",
        warren_it::ports::free_port().unwrap()
    );
    cfg.spool.wait_timeout_ms = 100;
    let w = start(cfg).await;
    let r = publish(w.addr, br#"{"routing_key":"k","body":"x"}"#).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let err = r.json().unwrap()["error"].as_str().unwrap().to_string();
    assert!(err.contains("broker") && err.contains("spool"), "{err}");
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_never_get_a_5xx_or_stop_the_server() {
    let broker = Broker::shared().await.unwrap();
    let sink = unique("fuzz-sink");
    broker.declare_queue(&sink).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]);
    let echo_in = unique("echo-in");
    let mut cfg = config(dir.path(), &unique("dlq"), &echo_section(&echo_in, &sink));
    cfg.admin.max_body_bytes = 64 << 10;
    let w = start_ready(cfg).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_7a11);
    let methods = [
        "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "BREW", "get", "",
    ];
    let paths = [
        "/live",
        "/ready",
        "/status",
        "/metrics",
        "/plugins",
        "/plugins/reload",
        "/plugins/echo",
        "/plugins/zz",
        "/plugins/..%2f",
        "/plugins/%ff%fe",
        "/plugins/a/b",
        "/publish",
        "/publish?x=1",
        "//",
        "*",
        "/%",
        "/plugins/",
        "/live/../status",
    ];
    let bodies: Vec<Vec<u8>> = vec![
        vec![],
        b"{}".to_vec(),
        b"null".to_vec(),
        b"[1,2,3]".to_vec(),
        br#"{"routing_key":1}"#.to_vec(),
        br#"{"routing_key":"k","body":"x","extra":1}"#.to_vec(),
        br#"{"routing_key":"k","body":"x","body_encoding":"rot13"}"#.to_vec(),
        br#"{"routing_key":"k","headers":{"h":1e400}}"#.to_vec(),
        br#"{"routing_key":"k","headers":{"h":18446744073709551615}}"#.to_vec(),
        format!(r#"{{"routing_key":"{sink}","body":"ok"}}"#).into_bytes(),
        b"\0asm\x0d\0\x01\0truncated".to_vec(),
        vec![0xff; 1000],
        "\u{1F600}".repeat(100).into_bytes(),
    ];
    let content_types = [
        "application/json",
        "text/plain",
        "application/octet-stream",
        "json;;",
        "",
    ];
    let auth = bearer();
    let mut statuses = BTreeMap::new();
    for case in 0..300 {
        let method = methods[rng.random_range(0..methods.len())];
        let path = paths[rng.random_range(0..paths.len())];
        let mut body = bodies[rng.random_range(0..bodies.len())].clone();
        if rng.random_bool(0.3) && !body.is_empty() {
            // Flip, cut or extend.
            let i = rng.random_range(0..body.len());
            match rng.random_range(0..3) {
                0 => body[i] ^= 1 << rng.random_range(0..8),
                1 => body.truncate(i),
                _ => body.extend((0..rng.random_range(1..64)).map(|_| rng.random::<u8>())),
            }
        }
        let ct = content_types[rng.random_range(0..content_types.len())];
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if rng.random_bool(0.6) {
            head.push_str(&format!("Authorization: {auth}\r\n"));
        } else if rng.random_bool(0.5) {
            head.push_str("Authorization: Bearer \u{0}\r\n");
        }
        if !ct.is_empty() {
            head.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        match rng.random_range(0..10) {
            // A lying or absurd length, or none at all.
            0 => head.push_str(&format!("Content-Length: {}\r\n", body.len() + 5)),
            1 => head.push_str("Content-Length: 99999999999999999999\r\n"),
            2 => head.push_str("Transfer-Encoding: chunked\r\n"),
            3 => {}
            _ => head.push_str(&format!("Content-Length: {}\r\n", body.len())),
        }
        head.push_str("\r\n");
        let mut request = head.into_bytes();
        request.extend_from_slice(&body);
        if rng.random_bool(0.05) {
            // Pure garbage.
            request = (0..rng.random_range(1..200))
                .map(|_| rng.random::<u8>())
                .collect();
        }
        let response = http::raw(w.addr, &request, Duration::from_secs(5))
            .await
            .unwrap();
        if let Some(status) = http::raw_status(&response) {
            *statuses.entry(status).or_insert(0) += 1;
            let documented_503 =
                status == 503 && (path.starts_with("/ready") || path.starts_with("/publish"));
            assert!(
                status < 500 || documented_503,
                "case {case}: {status} for {:?}",
                String::from_utf8_lossy(&request[..request.len().min(300)])
            );
        }
        assert_eq!(
            get(w.addr, "/live").await.status,
            200,
            "case {case}: server still up"
        );
    }
    // The cases reached the handlers, not only the framing checks.
    assert!(statuses.keys().any(|s| *s == 200), "{statuses:?}");
    assert!(
        statuses.keys().any(|s| (400..500).contains(s)),
        "{statuses:?}"
    );
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_traps_reconnects_and_reloads() {
    let broker = Broker::shared().await.unwrap();
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap())
        .await
        .unwrap();
    let (panic_in, echo_in, echo_out) = (unique("panic"), unique("echo-in"), unique("echo-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dlq = unique("dlq");
    let dir = plugins_dir(&[("panic", "panic"), ("echo", "echo")]);
    let mut cfg = config(
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.panic]
            subscriptions = [{{ queue = "{panic_in}" }}]
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}" }}]
            config = {{ routing-key = "{echo_out}" }}
            "#
        ),
    );
    cfg.amqp.url = proxy.amqp_url();
    let w = start_ready(cfg).await;
    let before = scrape(w.addr).await;
    assert_eq!(
        metric(
            &before,
            "warren_amqp_connection_state",
            &[("state", "running")]
        ),
        1.0
    );
    assert_eq!(
        metric(&before, "warren_consumers", &[("queue", &echo_in)]),
        1.0
    );
    assert!(
        before.contains_key("warren_ready"),
        "readiness gauge (its value is shared by every app in this process)"
    );

    // A trap.
    broker.publish_all("", &panic_in, ["boom"]).await.unwrap();
    broker
        .collect(&dlq, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let traps = |m: &BTreeMap<String, f64>| {
        metric(
            m,
            "warren_traps_total",
            &[("plugin", "panic"), ("kind", "panic")],
        )
    };
    let m = scrape(w.addr).await;
    assert!(traps(&m) >= traps(&before) + 1.0, "trap counted");
    assert!(
        metric(
            &m,
            "warren_deliveries_total",
            &[("plugin", "panic"), ("outcome", "trap")]
        ) >= 1.0
    );

    // A reconnect after a TCP reset.
    let resets = |m: &BTreeMap<String, f64>| {
        metric(m, "warren_amqp_reconnects_total", &[("class", "tcp_reset")])
    };
    let gen_before = w.handle.amqp.status_now().generation;
    proxy.cut();
    wait::until_true("reconnected", Duration::from_secs(30), || async {
        let s = w.handle.amqp.status_now();
        s.generation > gen_before && w.handle.readiness().ready
    })
    .await
    .unwrap();
    let m = scrape(w.addr).await;
    assert!(
        resets(&m) >= resets(&before) + 1.0,
        "reconnect counted as tcp_reset"
    );
    assert!(metric(&m, "warren_amqp_generation", &[]) > gen_before as f64);
    // Queue depth (lag) per queue from the periodic check.
    broker.publish_all("", &echo_in, ["lag"]).await.unwrap();
    let m = wait::until("queue depth sampled", Duration::from_secs(20), || async {
        let m = scrape(w.addr).await;
        m.keys()
            .any(|k| k.starts_with("warren_queue_depth{") && k.contains(&echo_in))
            .then_some(m)
    })
    .await
    .unwrap();
    assert!(
        m.keys().any(|k| k.starts_with("warren_spool_depth")),
        "spool gauge"
    );
    assert!(
        m.keys()
            .any(|k| k.starts_with("warren_handle_seconds_bucket")),
        "histogram"
    );

    // Reloads by result.
    let ok =
        |m: &BTreeMap<String, f64>| metric(m, "warren_plugin_reloads_total", &[("result", "ok")]);
    let r = send(w.addr, "POST", "/plugins/reload", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(ok(&scrape(w.addr).await) >= ok(&m) + 1.0);

    // An output through the spool: an append, then its drain.
    let parked = unique("parked");
    broker.declare_queue(&parked).await.unwrap();
    w.handle
        .spool
        .append(warren::message::OutboundMessage::new(
            "",
            parked.as_str(),
            "spooled",
        ))
        .await
        .unwrap();
    broker
        .collect(&parked, 1, Duration::from_secs(30))
        .await
        .unwrap();
    // Every family described and typed; everything ops/ names exported.
    let text = get(w.addr, "/metrics").await.text();
    crate::ops::check_exposition(&text);
    let m = parse_metrics(&text);
    for name in [
        "warren_spool_append_seconds_count",
        "warren_amqp_confirm_seconds_count",
    ] {
        assert!(metric(&m, name, &[]) >= 1.0, "{name}");
    }
    assert!(
        m.keys()
            .any(|k| k.starts_with("warren_handle_seconds_count{")
                && k.contains(r#"plugin="panic""#)
                && k.contains(&format!(r#"queue="{panic_in}""#))
                && k.contains(r#"outcome="trap""#)),
        "handle time by plugin, queue and outcome"
    );
    w.app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_carry_the_trace_id_also_through_the_spool() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out, parked) = (unique("echo-in"), unique("echo-out"), unique("parked"));
    broker.declare_queue(&echo_out).await.unwrap();
    broker.declare_queue(&parked).await.unwrap();
    let dir = plugins_dir(&[("echo", "echo")]);
    let cfg = config(
        dir.path(),
        &unique("dlq"),
        &echo_section(&echo_in, &echo_out),
    );
    let w = start_ready(cfg).await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = format!("00-{trace}-00f067aa0ba902b7-01");
    let check = |got: &warren_it::broker::Got| {
        let tp = got
            .header_str("traceparent")
            .expect("output has a traceparent");
        let parts: Vec<&str> = tp.split('-').collect();
        assert_eq!(parts.len(), 4, "{tp}");
        assert_eq!(parts[1], trace, "same trace id: {tp}");
        assert_ne!(parts[2], "00f067aa0ba902b7", "a span of its own: {tp}");
        assert_eq!(parts[3], "01");
    };

    // Straight to the broker.
    broker
        .publish_all_with(
            "",
            &echo_in,
            ["direct"],
            text_header("traceparent", &parent),
        )
        .await
        .unwrap();
    let got = broker
        .collect(&echo_out, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    check(&got[0]);

    // Through the spool: with the drainer paused and an entry waiting, the
    // outbox appends the output behind it to keep order.
    w.handle.drainer.pause();
    let appended_before = w.handle.spool.status().await.appended;
    w.handle
        .spool
        .append(warren::message::OutboundMessage::new(
            "",
            parked.as_str(),
            "first",
        ))
        .await
        .unwrap();
    assert!(!w.handle.spool.is_empty());
    broker
        .publish_all_with(
            "",
            &echo_in,
            ["spooled"],
            text_header("traceparent", &parent),
        )
        .await
        .unwrap();
    wait::until_true("output spooled", Duration::from_secs(30), || async {
        w.handle.spool.status().await.appended >= appended_before + 2
    })
    .await
    .unwrap();
    assert_eq!(
        broker.message_count(&echo_out).await.unwrap(),
        0,
        "still in the spool"
    );
    w.handle.drainer.resume();
    let got = broker
        .collect(&echo_out, 1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"spooled");
    check(&got[0]);
    broker
        .collect(&parked, 1, Duration::from_secs(30))
        .await
        .unwrap();
    w.app.shutdown().await;
}

/// The backlog an autoscaler reads, per route: ready at the broker and
/// unacknowledged for this Warren (from the consumer check), and in flight
/// in the plugin; each described with HELP, and all back to 0 once the
/// work is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_gauges_show_ready_unacked_and_in_flight_per_route() {
    let broker = Broker::shared().await.unwrap();
    let input = unique("backlog-in");
    let dlq = unique("dlq");
    let dir = plugins_dir(&[("slow", "slow")]);
    let cfg = config(
        dir.path(),
        &dlq,
        &format!(
            r#"
            [plugin.slow]
            subscriptions = [{{ queue = "{input}", prefetch = 2 }}]
            config = {{ millis = "700" }}
            limits = {{ deadline-ms = 10000 }}
            "#
        ),
    );
    let w = start_ready(cfg).await;
    let bodies: Vec<String> = (0..8).map(|i| format!("work {i}")).collect();
    broker.publish_all("", &input, &bodies).await.unwrap();
    let route = [("queue", input.as_str()), ("plugin", "slow")];

    // While the plugin works: some waiting at the broker, some delivered
    // and unacknowledged, one or more in the plugin.
    let m = wait::until("backlog while working", Duration::from_secs(30), || async {
        let m = scrape(w.addr).await;
        (metric(&m, "warren_route_ready_messages", &route) >= 1.0
            && metric(&m, "warren_route_unacked_messages", &route) >= 1.0
            && metric(&m, "warren_route_in_flight", &route) >= 1.0)
            .then_some(m)
    })
    .await
    .unwrap();
    assert!(
        metric(&m, "warren_route_unacked_messages", &route) <= 2.0,
        "prefetch bounds it"
    );
    let text = get(w.addr, "/metrics").await.text();
    for name in [
        "warren_route_ready_messages",
        "warren_route_unacked_messages",
        "warren_route_in_flight",
        "warren_spool_depth",
    ] {
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has HELP");
        assert!(
            text.contains(&format!("# TYPE {name} gauge\n")),
            "{name} is a gauge"
        );
    }

    // Done: nothing waits anywhere.
    wait::until_true("backlog drained", Duration::from_secs(60), || async {
        let m = scrape(w.addr).await;
        metric(&m, "warren_route_ready_messages", &route) == 0.0
            && metric(&m, "warren_route_unacked_messages", &route) == 0.0
            && metric(&m, "warren_route_in_flight", &route) == 0.0
    })
    .await
    .unwrap();
    assert_eq!(broker.message_count(&input).await.unwrap(), 0);
    w.app.shutdown().await;
    broker.delete_queue(&input).await.unwrap();
}
