//! Outbound HTTP from plugins, through the runtime: what is granted goes
//! out and its answer reaches the plugin; what is not is refused inside
//! the guest with the rule named; the wall budget turns a slow service
//! into a retry. An in-test HTTP server on 127.0.0.1 plays the services;
//! static host entries (`plugins.runtime.outbound-hosts`) give the names
//! the plugin calls the addresses each case needs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use warren::plugins::{Outcome, Plugin, PluginRuntime, PluginSettings, RuntimeConfig};
use warren_it::plugins::{Lang, polyglot_wasm, wasm};

use crate::plugins::delivery;

/// How long the slow route waits before answering.
const SLOW: Duration = Duration::from_secs(20);

/// A server answering by path: `/ok` 200 `pong`, `/redirect` 302 to a
/// loopback name, `/slow` after [`SLOW`], `/busy` 429 with
/// `Retry-After: 2`, `/echo-host` 200 with the Host header it got.
async fn server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(answer(sock));
        }
    });
    addr
}

/// The same server over TLS, with a certificate for `api.test` issued by a
/// CA of its own; returns its address and the CA's certificate as PEM.
async fn tls_server() -> (SocketAddr, String) {
    use std::sync::Arc;
    use tokio_rustls::rustls;

    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "warren test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["api.test".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    #[allow(deprecated)] // ring, as the host uses; deprecated only for lacking post-quantum
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that does not trust the CA ends the handshake.
                if let Ok(tls) = acceptor.accept(sock).await {
                    answer(tls).await;
                }
            });
        }
    });
    (addr, ca.pem())
}

/// Answer one request on `sock` by its path (see [`server`]).
async fn answer<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut sock: S) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (status, extra, body) = match path.as_str() {
        "/ok" => ("200 OK", String::new(), "pong".to_string()),
        "/redirect" => (
            "302 Found",
            "location: http://loop.test:8080/secret\r\n".to_string(),
            String::new(),
        ),
        "/slow" => {
            tokio::time::sleep(SLOW).await;
            ("200 OK", String::new(), "late".to_string())
        }
        "/busy" => (
            "429 Too Many Requests",
            "retry-after: 2\r\n".to_string(),
            String::new(),
        ),
        _ => ("404 Not Found", String::new(), String::new()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\n{extra}content-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

/// A runtime whose names `api.test` (the server), `loop.test` and
/// `meta.test` resolve to 127.0.0.1, 127.0.0.1 and 169.254.169.254.
fn runtime() -> PluginRuntime {
    let mut hosts = BTreeMap::new();
    hosts.insert("api.test".to_string(), "127.0.0.1".parse().unwrap());
    hosts.insert("loop.test".to_string(), "127.0.0.1".parse().unwrap());
    hosts.insert("meta.test".to_string(), "169.254.169.254".parse().unwrap());
    PluginRuntime::new(RuntimeConfig {
        outbound_hosts: hosts,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

/// The `caller` plugin of `lang` (for Python and JavaScript, their
/// `fixture` in mode `caller`) with the operator's grant of the server's
/// origin by name (it is on a loopback address, so only such a grant lets
/// it through).
async fn caller(rt: &PluginRuntime, lang: Option<Lang>, port: u16, wall_ms: Option<u32>) -> Plugin {
    let mut s = PluginSettings {
        allow_outbound: vec![format!("http://api.test:{port}")],
        ..PluginSettings::default()
    };
    s.limits.wall_deadline_ms = wall_ms;
    load_caller(rt, lang, s).await
}

/// The caller of `lang` (the Rust fixture, or the Python or JavaScript
/// fixture in mode `caller`) loaded with `s`.
async fn load_caller(rt: &PluginRuntime, lang: Option<Lang>, mut s: PluginSettings) -> Plugin {
    let path = match lang {
        None => wasm("caller").unwrap(),
        Some(l) => {
            s.config.insert("mode".into(), "caller".into());
            polyglot_wasm(l, "fixture").unwrap()
        }
    };
    rt.load_file(&path, &s)
        .await
        .unwrap_or_else(|e| panic!("loading caller: {e}"))
}

/// Generate `NAME::rust`, `NAME::python` and `NAME::js`, running the async
/// fn `NAME(lang)` with the plugin of each language.
macro_rules! for_every_language {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rust() {
                super::$name(None).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn python() {
                super::$name(Some(warren_it::plugins::Lang::Python)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn js() {
                super::$name(Some(warren_it::plugins::Lang::Js)).await
            }
        }
    };
}

fn reject_reason(o: &Outcome) -> &str {
    match o {
        Outcome::Reject { reason } => reason,
        other => panic!("expected a reject, got {other:?}"),
    }
}

for_every_language!(granted_calls_succeed_and_the_rest_are_refused_naming_the_rule);
async fn granted_calls_succeed_and_the_rest_are_refused_naming_the_rule(lang: Option<Lang>) {
    let addr = server().await;
    let rt = runtime();
    let p = caller(&rt, lang, addr.port(), None).await;
    let manifest_origins = &p.manifest().outbound;
    assert_eq!(
        manifest_origins,
        &["http://loop.test:8080", "http://meta.test:8080"]
    );

    // Allowed: the answer is published.
    let out = p
        .invoke(&delivery(&format!("http://api.test:{}/ok", addr.port())))
        .await;
    assert_published_pong(out);

    // A host nobody granted.
    let o = p
        .invoke(&delivery(&format!("http://other.test:{}/ok", addr.port())))
        .await;
    assert!(reject_reason(&o).contains("origin-not-granted"), "{o:?}");
    // The same server by address: its origin is not granted either.
    let o = p
        .invoke(&delivery(&format!("http://127.0.0.1:{}/ok", addr.port())))
        .await;
    assert!(reject_reason(&o).contains("origin-not-granted"), "{o:?}");

    // Granted by the manifest, but resolving to loopback and metadata
    // addresses, which only an operator grant opens.
    let o = p.invoke(&delivery("http://loop.test:8080/")).await;
    let r = reject_reason(&o);
    assert!(
        r.contains("non-public-address") && r.contains("127.0.0.1"),
        "{r}"
    );
    let o = p.invoke(&delivery("http://meta.test:8080/")).await;
    let r = reject_reason(&o);
    assert!(
        r.contains("non-public-address") && r.contains("169.254.169.254") && r.contains("metadata"),
        "{r}"
    );

    // A redirect to a private address: the host does not follow it; the
    // guest does, and that call is refused.
    let o = p
        .invoke(&delivery(&format!(
            "http://api.test:{}/redirect",
            addr.port()
        )))
        .await;
    let r = reject_reason(&o);
    assert!(
        r.contains("non-public-address") && r.contains("loop.test"),
        "{r}"
    );
}

/// HTTPS: a service behind a private CA is reached once the operator
/// trusts that CA (`plugins.runtime.outbound-ca-file`), through the same
/// grants and resolver as plain HTTP (the name `api.test` resolves to
/// loopback, which only the operator's grant opens; the certificate is
/// verified for that name); without the CA the call fails inside the
/// guest with the TLS error, and the delivery is not trapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_calls_trust_the_operators_ca_file() {
    let (addr, ca_pem) = tls_server().await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let settings = PluginSettings {
        allow_outbound: vec![format!("https://api.test:{}", addr.port())],
        ..PluginSettings::default()
    };
    let url = format!("https://api.test:{}/ok", addr.port());

    // The setting as an operator writes it.
    let config: RuntimeConfig = toml::from_str(&format!(
        "outbound-ca-file = {:?}\noutbound-hosts = {{ \"api.test\" = \"127.0.0.1\", \"loop.test\" = \"127.0.0.1\" }}\n",
        ca_file.display()
    ))
    .unwrap();
    let rt = PluginRuntime::new(config).unwrap();
    let p = rt
        .load_file(&wasm("caller").unwrap(), &settings)
        .await
        .unwrap();
    let out = p.invoke(&delivery(&url)).await;
    assert_published_pong(out);
    // The grant still decides: the same server by another name is refused
    // before any connection.
    let o = p
        .invoke(&delivery(&format!("https://loop.test:{}/ok", addr.port())))
        .await;
    assert!(reject_reason(&o).contains("origin-not-granted"), "{o:?}");
    // Granted and trusted, but the certificate is not for the name called
    // (the name sent and verified is the URL's host, not the address).
    let s = PluginSettings {
        allow_outbound: vec![format!("https://loop.test:{}", addr.port())],
        ..PluginSettings::default()
    };
    let other = rt.load_file(&wasm("caller").unwrap(), &s).await.unwrap();
    let o = other
        .invoke(&delivery(&format!("https://loop.test:{}/ok", addr.port())))
        .await;
    let Outcome::Retry { reason, .. } = &o else {
        panic!("expected the guest's retry, got {o:?}");
    };
    assert!(
        reason.contains("certificate not valid for name \"loop.test\""),
        "{reason}"
    );

    // Without the CA: the guest gets the certificate error and decides
    // (the caller asks for a retry, naming it); nothing traps.
    let p = runtime()
        .load_file(&wasm("caller").unwrap(), &settings)
        .await
        .unwrap();
    let o = p.invoke(&delivery(&url)).await;
    let Outcome::Retry { reason, .. } = &o else {
        panic!("expected the guest's retry, got {o:?}");
    };
    assert!(
        reason.contains("invalid peer certificate") && reason.contains("UnknownIssuer"),
        "{reason}"
    );

    // A CA file that holds no certificate stops the runtime from starting.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let e = PluginRuntime::new(RuntimeConfig {
        outbound_ca_file: Some(empty),
        ..RuntimeConfig::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("outbound-ca-file"), "{e}");
}

for_every_language!(a_slow_service_retries_the_delivery_at_the_wall_deadline);
async fn a_slow_service_retries_the_delivery_at_the_wall_deadline(lang: Option<Lang>) {
    let addr = server().await;
    let rt = runtime();
    let p = caller(&rt, lang, addr.port(), Some(500)).await;
    let started = Instant::now();
    let o = p
        .invoke(&delivery(&format!("http://api.test:{}/slow", addr.port())))
        .await;
    let took = started.elapsed();
    match &o {
        Outcome::Retry { reason, .. } => {
            assert!(reason.contains("wall deadline of 500 ms"), "{reason}")
        }
        other => panic!("expected a retry, got {other:?}"),
    }
    assert!(took < SLOW, "the call waited for the server ({took:?})");
}

for_every_language!(a_429_retries_after_its_retry_after);
async fn a_429_retries_after_its_retry_after(lang: Option<Lang>) {
    let addr = server().await;
    let rt = runtime();
    let p = caller(&rt, lang, addr.port(), None).await;
    let o = p
        .invoke(&delivery(&format!("http://api.test:{}/busy", addr.port())))
        .await;
    match &o {
        Outcome::Retry { reason, delay } => {
            assert!(reason.contains("429"), "{reason}");
            assert_eq!(*delay, Some(Duration::from_secs(2)), "{reason}");
        }
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// The standard `wasi:http/outgoing-handler` goes through the same client
/// and grants as the SDK's helper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasi_http_calls_meet_the_same_grants() {
    let addr = server().await;
    let rt = runtime();
    let mut s = PluginSettings {
        allow_outbound: vec![format!("http://api.test:{}", addr.port())],
        ..PluginSettings::default()
    };
    s.config.insert("via".into(), "wasi-http".into());
    let p = rt.load_file(&wasm("caller").unwrap(), &s).await.unwrap();
    let out = p
        .invoke(&delivery(&format!("http://api.test:{}/ok", addr.port())))
        .await;
    let Outcome::Ack { outputs, .. } = out else {
        panic!("expected ack, got {out:?}");
    };
    assert_eq!(&outputs[0].body[..], b"pong");
    // The host returns the redirect instead of following it.
    let out = p
        .invoke(&delivery(&format!(
            "http://api.test:{}/redirect",
            addr.port()
        )))
        .await;
    let Outcome::Ack { outputs, .. } = out else {
        panic!("expected ack, got {out:?}");
    };
    assert_eq!(
        outputs[0]
            .header("x-status")
            .and_then(warren::message::HeaderValue::as_str),
        Some("302")
    );
    let o = p.invoke(&delivery("http://meta.test:8080/")).await;
    let r = reject_reason(&o);
    assert!(
        r.contains("non-public-address") && r.contains("169.254.169.254"),
        "{r}"
    );
    let o = p
        .invoke(&delivery(&format!("http://other.test:{}/ok", addr.port())))
        .await;
    assert!(reject_reason(&o).contains("origin-not-granted"), "{o:?}");
}

for_every_language!(a_secret_from_a_file_reaches_the_plugin);
/// A secret given as `{ file = .. }` reaches the plugin: Rust reads it
/// through `wasi:config/store`, Python and JavaScript through their SDK's
/// `secret`.
async fn a_secret_from_a_file_reaches_the_plugin(lang: Option<Lang>) {
    let addr = server().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cr3t-from-file\n").unwrap();
    let overrides: warren::config::PluginOverride = toml::from_str(&format!(
        "config = {{ token = {{ file = {:?} }} }}\nallow-outbound = [\"http://api.test:{}\"]\n",
        file.display(),
        addr.port()
    ))
    .unwrap();
    let s = PluginSettings {
        config: overrides.config_strings(),
        allow_outbound: overrides.allow_outbound.clone(),
        ..PluginSettings::default()
    };
    let rt = runtime();
    let p = load_caller(&rt, lang, s).await;
    let out = p
        .invoke(&delivery(&format!("http://api.test:{}/ok", addr.port())))
        .await;
    let Outcome::Ack { outputs, .. } = out else {
        panic!("expected ack, got {out:?}");
    };
    assert_eq!(
        outputs[0]
            .header("x-token-length")
            .and_then(warren::message::HeaderValue::as_str),
        Some("16")
    );
}

each_version!(a_429_comes_back_after_its_retry_after);
/// Through the broker: a service answers 429 with `Retry-After: 2`, the
/// plugin asks for that delay in one line, and the delivery comes back
/// (and succeeds) 2 to 4 s later, through the delay tiers.
async fn a_429_comes_back_after_its_retry_after(target: warren_it::rabbit::Shared) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use warren_it::broker::{Broker, unique};
    use warren_it::config::WarrenToml;

    // 429 on the first call, 200 `pong` after.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let busy = Arc::new(AtomicBool::new(true));
    let flag = busy.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let first = flag.swap(false, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let resp: &[u8] = if first {
                    b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 2\r\ncontent-length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong"
                };
                let _ = sock.write_all(resp).await;
            });
        }
    });

    let broker = Broker::connect(&target.url).await.unwrap();
    let (input, dlq) = (unique("busy-in"), unique("busy-dlq"));
    let prefix = unique("busy-retry");
    let out = unique("busy-out");
    broker.declare_queue(&out).await.unwrap();
    let dir = crate::admin::plugins_dir(&[("caller", "caller")]);
    let config = crate::host::parse(
        &WarrenToml::isolated(dir.path())
            .amqp_url(&target.url)
            .retry_exchange(&prefix)
            .set("dispatch.retry-delay-ms", 1000)
            .set("dispatch.retry-delay-max-ms", 4000)
            .set("dispatch.max-attempts", 5)
            .dead_letters(&unique("busy-dlx"), &dlq)
            .admin_bind("127.0.0.1:0")
            .merge(&format!(
                r#"
                [plugins.runtime]
                outbound-hosts = {{ "api.test" = "127.0.0.1" }}
                [plugin.caller]
                subscriptions = [{{ queue = "{input}" }}]
                allow-outbound = ["http://api.test:{port}"]
                config = {{ routing-key = "{out}" }}
                "#
            )),
    );
    let (app, _handle) = crate::host::start_ready(config).await.unwrap();
    let started = Instant::now();
    broker
        .publish_all("", &input, [format!("http://api.test:{port}/")])
        .await
        .unwrap();
    let got = broker
        .collect(&out, 1, Duration::from_secs(30))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, b"pong");
    assert!(!busy.load(Ordering::SeqCst));
    assert!(
        took >= Duration::from_secs(2) && took <= Duration::from_secs(4),
        "came back after {took:?}"
    );
    // Each call is counted by plugin, origin and status class, and timed.
    let m = crate::admin::scrape(app.admin_addr()).await;
    let origin = format!("http://api.test:{port}");
    for class in ["4xx", "2xx"] {
        let labels = [
            ("plugin", "caller"),
            ("origin", origin.as_str()),
            ("status", class),
        ];
        assert_eq!(
            crate::admin::metric(&m, "warren_plugin_outbound_calls_total", &labels),
            1.0,
            "{class}"
        );
    }
    let labels = [("plugin", "caller"), ("origin", origin.as_str())];
    assert_eq!(
        crate::admin::metric(&m, "warren_plugin_outbound_seconds_count", &labels),
        2.0
    );

    app.shutdown().await;
    for q in [&input, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
    broker.delete_queue(&out).await.unwrap();
    for tier in ["1s", "2s", "4s"] {
        let name = format!("{prefix}.{tier}");
        broker.delete_queue(&name).await.unwrap();
        broker.delete_exchange(&name).await.unwrap();
    }
}

/// `out` acknowledged the delivery with one output: the test server's
/// `pong`, with the `x-status: 200` the caller plugin copies from it.
fn assert_published_pong(out: Outcome) {
    let Outcome::Ack { outputs, .. } = out else {
        panic!("expected ack, got {out:?}");
    };
    assert_eq!(outputs.len(), 1);
    assert_eq!(&outputs[0].body[..], b"pong");
    assert_eq!(
        outputs[0]
            .header("x-status")
            .and_then(warren::message::HeaderValue::as_str),
        Some("200")
    );
}
