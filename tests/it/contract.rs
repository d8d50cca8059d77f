//! The plugin contract, the same tests for every language: the Rust
//! examples and fixtures (`plugins/`), and their Python and JavaScript
//! twins (`plugins/python`, `plugins/js`) built from source with the pinned
//! toolchains. Each test runs as `contract::<lang>::<test>`.

use warren::message::HeaderValue;
use warren::plugins::{Outcome, Plugin, PluginRuntime, PluginSettings, TrapKind};
use warren_it::plugins::{Lang, polyglot_wasm, wasm};

use crate::plugins::{assert_echo_serves, delivery, outputs, runtime, settings, trap};

/// Which build of a plugin the tests load.
#[derive(Clone, Copy, Debug)]
enum Impl {
    Rust,
    Other(Lang),
}

/// Example `name` (`echo`, `router`) of `lang`, loaded with `s`.
async fn example(rt: &PluginRuntime, lang: Impl, name: &str, s: PluginSettings) -> Plugin {
    let path = match lang {
        Impl::Rust => wasm(name),
        Impl::Other(l) => polyglot_wasm(l, name),
    }
    .unwrap_or_else(|e| panic!("building {lang:?} {name}: {e:#}"));
    rt.load_file(&path, &s)
        .await
        .unwrap_or_else(|e| panic!("loading {lang:?} {name}: {e}"))
}

/// The plugin playing Rust fixture `role` (`panic`, `flaky`,
/// `sandbox-probe`): that crate for Rust, the `fixture` plugin in mode
/// `role` for the other languages. `pairs` is more host config.
async fn fixture(rt: &PluginRuntime, lang: Impl, role: &str, pairs: &[(&str, &str)]) -> Plugin {
    match lang {
        Impl::Rust if role == "kv" => example(rt, lang, "kv-user", settings(pairs)).await,
        Impl::Rust => example(rt, lang, role, settings(pairs)).await,
        Impl::Other(_) => {
            let mut s = settings(pairs);
            s.config.insert("mode".into(), role.into());
            example(rt, lang, "fixture", s).await
        }
    }
}

async fn echo_outputs_match_input(lang: Impl) {
    let rt = runtime();
    let echo = example(
        &rt,
        lang,
        "echo",
        settings(&[("exchange", "out-ex"), ("routing-key", "out.key")]),
    )
    .await;
    assert_eq!(echo.name(), "echo");
    let mut d = delivery("hello, warren");
    d.properties.content_type = Some("text/plain".into());
    d.properties.correlation_id = Some("corr-1".into());
    d.properties
        .set_header("x-tenant", HeaderValue::String("acme".into()));
    d.properties.set_header("x-count", HeaderValue::I32(7));
    let out = outputs(echo.invoke(&d).await);
    assert_eq!(out.len(), 1);
    let m = &out[0];
    assert_eq!(m.exchange, "out-ex");
    assert_eq!(m.routing_key, "out.key");
    assert_eq!(m.body, d.body);
    assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
    assert_eq!(m.properties.correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(
        m.properties.delivery_mode,
        Some(2),
        "outputs are persistent"
    );
    assert_eq!(
        m.header("x-tenant").and_then(HeaderValue::as_str),
        Some("acme")
    );
    assert_eq!(m.header("x-count").and_then(HeaderValue::as_i64), Some(7));
    // Without host config: the default exchange and `echo.out`.
    let plain = echo.with_settings(&settings(&[])).unwrap();
    let out = outputs(plain.invoke(&delivery("x")).await);
    assert_eq!(
        (out[0].exchange.as_str(), out[0].routing_key.as_str()),
        ("", "echo.out")
    );
}

async fn router_routes_by_json_field_and_rejects_bad_orders(lang: Impl) {
    let rt = runtime();
    let router = example(&rt, lang, "router", PluginSettings::default()).await;
    assert_eq!(router.name(), "router");
    for region in ["eu", "us", "apac", "zürich"] {
        let body = format!(r#"{{"id":1,"region":"{region}"}}"#);
        let out = outputs(router.invoke(&delivery(&body)).await);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].exchange, "orders.routed");
        assert_eq!(out[0].routing_key, format!("orders.{region}"));
        assert_eq!(&out[0].body[..], body.as_bytes());
    }
    for bad in [r#"{"id":2}"#, r#"{"region":7}"#, "[1,2]"] {
        match router.invoke(&delivery(bad)).await {
            Outcome::Reject { reason } => assert!(reason.contains("region"), "{reason}"),
            other => panic!("{bad}: expected reject, got {other:?}"),
        }
    }
    match router.invoke(&delivery("not json")).await {
        Outcome::Reject { reason } => assert!(!reason.is_empty()),
        other => panic!("expected reject, got {other:?}"),
    }
    let routed = router
        .with_settings(&settings(&[("exchange", "other-x")]))
        .unwrap();
    let out = outputs(routed.invoke(&delivery(r#"{"region":"eu"}"#)).await);
    assert_eq!(out[0].exchange, "other-x");
}

/// What the trap's reason must read, given the fixture's body: for
/// Python and JavaScript exactly the exception's one-line summary.
fn expected_trap(lang: Impl, body: &str) -> Option<String> {
    match lang {
        Impl::Rust => None,
        Impl::Other(Lang::Python) => Some(format!("guest panicked: ValueError: boom: {body}")),
        Impl::Other(Lang::Js) => Some(format!("guest panicked: TypeError: boom: {body}")),
    }
}

async fn an_exception_or_panic_traps_with_a_readable_reason(lang: Impl) {
    let rt = runtime();
    let echo = example(&rt, Impl::Rust, "echo", PluginSettings::default()).await;
    let p = fixture(&rt, lang, "panic", &[]).await;
    let (kind, message) = trap(p.invoke(&delivery("order 42")).await);
    assert_eq!(kind, TrapKind::Panic, "{message}");
    assert!(message.contains("boom: order 42"), "{message}");
    if let Some(exact) = expected_trap(lang, "order 42") {
        assert_eq!(message, exact);
    }
    // The plugin serves the next delivery, and nothing else was hurt.
    let (_, again) = trap(p.invoke(&delivery("order 43")).await);
    assert!(again.contains("boom: order 43"), "{again}");
    assert_echo_serves(&echo).await;
}

async fn retry_reports_the_attempt(lang: Impl) {
    let rt = runtime();
    let flaky = fixture(&rt, lang, "flaky", &[("fail-attempts", "2")]).await;
    let mut d = delivery("x");
    for attempt in 1..=2 {
        d.attempt = attempt;
        match flaky.invoke(&d).await {
            Outcome::Retry { reason, .. } => {
                assert!(reason.contains(&format!("attempt {attempt}")), "{reason}")
            }
            other => panic!("expected retry, got {other:?}"),
        }
    }
    d.attempt = 3;
    assert_eq!(outputs(flaky.invoke(&d).await).len(), 1);
}

async fn sandbox_denies_files_environment_and_network(lang: Impl) {
    let rt = runtime();
    let probe = fixture(&rt, lang, "sandbox-probe", &[]).await;
    let out = outputs(probe.invoke(&delivery("x")).await);
    let report: serde_json::Value = serde_json::from_slice(&out[0].body).expect("json report");
    for key in ["file", "dir", "env", "tcp", "dns"] {
        let v = report[key].as_str().unwrap_or_default();
        assert!(v.starts_with("error"), "{key} was not denied: {report}");
    }
    assert_eq!(report["env_count"], 0, "{report}");
}

/// A runtime whose plugins keep their state in memory.
fn runtime_with_state() -> PluginRuntime {
    let limits = warren::kv::KvConfig::default().limits();
    PluginRuntime::with_kv(
        warren::plugins::RuntimeConfig::default(),
        Some(warren::kv::Store::memory(limits)),
    )
    .expect("runtime")
}

/// Run `commands` through the kv fixture: the texts it published and its
/// outcome; the writes of an ack are committed, as dispatch does.
async fn kv_run(p: &Plugin, commands: &str) -> (Vec<String>, Outcome) {
    let outcome = p.invoke(&delivery(commands)).await;
    let mut said = Vec::new();
    if let Outcome::Ack { outputs, writes } = &outcome {
        said = outputs
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        p.kv()
            .expect("namespace")
            .commit(writes)
            .await
            .expect("commit");
    }
    (said, outcome)
}

async fn state_reads_its_own_writes_and_commits_only_with_success(lang: Impl) {
    let rt = runtime_with_state();
    let p = fixture(&rt, lang, "kv", &[]).await;
    assert!(p.manifest().state);
    let (said, _) = kv_run(&p, "set a 1; get a; inc n 2; inc n 3; get n; del a; get a").await;
    assert_eq!(said, ["a=1", "n+=2 -> 2", "n+=3 -> 5", "n=5", "a=(none)"]);
    let (said, _) = kv_run(&p, "get n; get a; inc n -1").await;
    assert_eq!(said, ["n=5", "a=(none)", "n+=-1 -> 4"]);
    // A retry and a trap discard their writes.
    let (_, o) = kv_run(&p, "inc n 100; set b 1; retry").await;
    assert!(matches!(o, Outcome::Retry { .. }), "{o:?}");
    let (_, o) = kv_run(&p, "inc n 100; panic").await;
    assert!(matches!(o, Outcome::Trapped { .. }), "{o:?}");
    let (said, _) = kv_run(&p, "get n; get b").await;
    assert_eq!(said, ["n=4", "b=(none)"]);
    let status = p.kv().expect("namespace").status().await;
    assert_eq!(
        (status.keys, status.commits, status.discarded_writes),
        (Some(1), 2, 3),
        "{status:?}"
    );
}

async fn state_limits_are_refused_naming_the_limit(lang: Impl) {
    let rt = runtime_with_state();
    let p = fixture(&rt, lang, "kv", &[]).await;
    let (said, _) = kv_run(&p, "big-key; big-value; set y z; inc y 1").await;
    assert_eq!(said.len(), 3, "{said:?}");
    assert!(
        said[0].starts_with("error: limit-exceeded:") && said[0].contains("kv.max-key-bytes"),
        "{said:?}"
    );
    assert!(
        said[1].starts_with("error: limit-exceeded:") && said[1].contains("kv.max-value-bytes"),
        "{said:?}"
    );
    assert!(
        said[2].starts_with("error: invalid:") && said[2].contains("not a decimal integer"),
        "{said:?}"
    );
}

/// `NAME(lang)` as a test in `contract::rust`, `contract::python` and
/// `contract::js`.
macro_rules! for_every_language {
    ($($name:ident),* $(,)?) => {
        mod rust {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Impl::Rust).await
            })*
        }
        mod python {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Impl::Other(warren_it::plugins::Lang::Python)).await
            })*
        }
        mod js {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::Impl::Other(warren_it::plugins::Lang::Js)).await
            })*
        }
    };
}

for_every_language!(
    echo_outputs_match_input,
    router_routes_by_json_field_and_rejects_bad_orders,
    an_exception_or_panic_traps_with_a_readable_reason,
    retry_reports_the_attempt,
    sandbox_denies_files_environment_and_network,
    state_reads_its_own_writes_and_commits_only_with_success,
    state_limits_are_refused_naming_the_limit,
);

/// The standard `wasi:keyvalue` (a Rust guest's bindings) over the same
/// state: read-your-writes, the unsigned increment, and keys listed as the
/// delivery sees them.
#[tokio::test]
async fn wasi_keyvalue_sees_the_same_state() {
    let rt = runtime_with_state();
    let p = fixture(&rt, Impl::Rust, "kv", &[]).await;
    let (said, _) = kv_run(
        &p,
        "set a 1; wasi-inc a 4; wasi-get a; wasi-set b x; wasi-list",
    )
    .await;
    assert_eq!(said, ["a+=4 -> 5", "a=5", "b set", "keys=a,b"]);
    let (said, _) = kv_run(&p, "del a; wasi-list; get b; wasi-inc b 1").await;
    assert_eq!(said[..2], ["keys=b", "b=x"]);
    assert!(said[2].starts_with("error: "), "{said:?}");
}

/// README's "Writing a plugin" shows the Python and JavaScript routers as
/// the files are (after their header comment), so what a reader copies is
/// what these tests run.
#[test]
fn the_readme_shows_the_python_and_js_routers_as_they_are() {
    let root = warren_it::plugins::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    for (file, fence, code_starts) in [
        ("plugins/python/router/app.py", "```python\n", "import json"),
        ("plugins/js/router/plugin.js", "```js\n", "import {"),
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let code = &text[text.find(code_starts).unwrap()..];
        assert!(
            readme.contains(&format!("{fence}{code}```\n")),
            "README does not show {file} as it is"
        );
    }
}

/// README's "State" shows `tally`'s `handle` as the file has it.
#[test]
fn the_readme_shows_tally_s_handle_as_it_is() {
    let root = warren_it::plugins::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let text = std::fs::read_to_string(root.join("plugins/tally/src/lib.rs")).unwrap();
    let start = text.find("    fn handle(d: Delivery)").unwrap();
    let end = start + text[start..].find("\n    }\n").unwrap() + "\n    }\n".len();
    let handle: String = text[start..end]
        .lines()
        .map(|l| l.strip_prefix("    ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        readme.contains(&format!("```rust\n{handle}```\n")),
        "README's State section does not show tally's handle as it is:\n{handle}"
    );
}

/// README's "Calling other services" shows the `pay` example as it is.
#[test]
fn the_readme_shows_the_pay_example_as_it_is() {
    let root = warren_it::plugins::repo_root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let text = std::fs::read_to_string(root.join("plugins/pay/src/lib.rs")).unwrap();
    let code = &text[text.find("use warren_sdk").unwrap()..];
    assert!(
        readme.contains(&format!("```rust\n{code}```\n")),
        "README does not show plugins/pay as it is"
    );
}

/// `add` (Rust's `kv::add`): an increment without its answer, folded into
/// the delivery's other writes, committed with it.
#[tokio::test]
async fn add_counts_without_reading_and_reads_see_the_sum() {
    let rt = runtime_with_state();
    let p = fixture(&rt, Impl::Rust, "kv", &[]).await;
    let (said, _) = kv_run(&p, "set n 10; add n 2; add n 3; get n").await;
    assert_eq!(said, ["n=15"]);
    let (said, _) = kv_run(&p, "add n 5; add m 1; get n; get m").await;
    assert_eq!(said, ["n=20", "m=1"]);
    let (_, o) = kv_run(&p, "add n 100; retry").await;
    assert!(matches!(o, Outcome::Retry { .. }), "{o:?}");
    let (said, _) = kv_run(&p, "get n").await;
    assert_eq!(said, ["n=20"]);
}
