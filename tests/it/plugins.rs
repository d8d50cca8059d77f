//! The plugin runtime against the example plugins built from source: every
//! outcome kind, every trap kind, and that nothing a plugin does hurts the
//! runtime or other plugins (the contract every language shares, the
//! sandbox among it, is in `contract`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use warren::message::MessageProperties;
use warren::plugins::{
    Delivery, InstancePolicy, LimitsOverride, Outcome, Plugin, PluginRuntime, PluginSettings,
    RuntimeConfig, TrapKind,
};
use warren_it::plugins::wasm;

pub(crate) fn runtime() -> PluginRuntime {
    PluginRuntime::new(RuntimeConfig::default()).expect("runtime")
}

pub(crate) fn settings(pairs: &[(&str, &str)]) -> PluginSettings {
    PluginSettings {
        limits: LimitsOverride::default(),
        config: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..PluginSettings::default()
    }
}

async fn load(rt: &PluginRuntime, name: &str, s: PluginSettings) -> Plugin {
    rt.load_file(&wasm(name).expect("plugin build"), &s)
        .await
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub(crate) fn delivery(body: &str) -> Delivery {
    Delivery {
        body: Bytes::from(body.to_string()),
        exchange: "in".into(),
        routing_key: "in.key".into(),
        queue: "q".into(),
        properties: MessageProperties::default(),
        redelivered: false,
        attempt: 1,
    }
}

pub(crate) fn outputs(o: Outcome) -> Vec<warren::message::OutboundMessage> {
    match o {
        Outcome::Ack { outputs, .. } => outputs,
        other => panic!("expected ack, got {other:?}"),
    }
}

pub(crate) fn trap(o: Outcome) -> (TrapKind, String) {
    match o {
        Outcome::Trapped { kind, message } => (kind, message),
        other => panic!("expected a trap, got {other:?}"),
    }
}

/// Echo still answers correctly: the check made after every fault.
pub(crate) async fn assert_echo_serves(echo: &Plugin) {
    let out = outputs(echo.invoke(&delivery("still alive")).await);
    assert_eq!(out.len(), 1);
    assert_eq!(&out[0].body[..], b"still alive");
}

#[tokio::test]
async fn spin_loop_ends_as_deadline_trap_within_twice_the_deadline() {
    let rt = runtime();
    let echo = load(&rt, "echo", PluginSettings::default()).await;
    let deadline = Duration::from_millis(500);
    let spin = load(
        &rt,
        "spin-loop",
        PluginSettings {
            limits: LimitsOverride {
                deadline_ms: Some(500),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let started = Instant::now();
    let (kind, message) = trap(spin.invoke(&delivery("x")).await);
    let took = started.elapsed();
    assert_eq!(kind, TrapKind::Deadline, "{message}");
    assert!(took >= deadline, "trapped early, after {took:?}");
    assert!(
        took < deadline * 2,
        "took {took:?} for a {deadline:?} deadline"
    );
    assert_echo_serves(&echo).await;
}

#[tokio::test]
async fn slow_plugin_calling_the_clock_ends_as_deadline_trap() {
    let rt = runtime();
    let echo = load(&rt, "echo", PluginSettings::default()).await;
    let slow = load(&rt, "slow", settings(&[("millis", "5000")])).await;
    let (kind, message) = trap(slow.invoke(&delivery("x")).await);
    assert_eq!(kind, TrapKind::Deadline, "{message}");
    assert!(message.contains("200 ms"), "{message}");
    // Below its deadline the same plugin succeeds.
    let quick = slow.with_settings(&settings(&[("millis", "1")])).unwrap();
    assert!(matches!(
        quick.invoke(&delivery("x")).await,
        Outcome::Ack { .. }
    ));
    assert_echo_serves(&echo).await;
}

#[tokio::test]
async fn mem_hog_ends_as_memory_trap() {
    let rt = runtime();
    let echo = load(&rt, "echo", PluginSettings::default()).await;
    let hog = load(&rt, "mem-hog", PluginSettings::default()).await;
    assert_eq!(hog.limits().memory_bytes, 16 << 20);
    let (kind, message) = trap(hog.invoke(&delivery("x")).await);
    assert_eq!(kind, TrapKind::Memory, "{message}");
    assert!(message.contains("memory limit"), "{message}");
    assert_echo_serves(&echo).await;
}

#[tokio::test]
async fn chatty_returns_ten_thousand_outputs() {
    let rt = runtime();
    let chatty = load(&rt, "chatty", settings(&[("count", "10000")])).await;
    let out = outputs(chatty.invoke(&delivery("x")).await);
    assert_eq!(out.len(), 10_000);
    assert_eq!(&out[0].body[..], b"0");
    assert_eq!(&out[9_999].body[..], b"9999");
}

#[tokio::test]
async fn outputs_past_the_limit_are_refused_and_discarded() {
    let rt = PluginRuntime::new(RuntimeConfig {
        max_outputs: 100,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let chatty = load(&rt, "chatty", settings(&[("count", "101")])).await;
    match chatty.invoke(&delivery("x")).await {
        Outcome::Reject { reason } => assert!(reason.contains("at most 100"), "{reason}"),
        other => panic!("expected reject, got {other:?}"),
    }
}

#[tokio::test]
async fn faults_in_one_plugin_do_not_disturb_concurrent_deliveries_of_another() {
    let rt = runtime();
    let echo = load(&rt, "echo", PluginSettings::default()).await;
    let spin = load(&rt, "spin-loop", PluginSettings::default()).await;
    let hog = load(&rt, "mem-hog", PluginSettings::default()).await;
    let spin_task = tokio::spawn({
        let spin = spin.clone();
        async move { spin.invoke(&delivery("x")).await }
    });
    let hog_task = tokio::spawn({
        let hog = hog.clone();
        async move { hog.invoke(&delivery("x")).await }
    });
    let mut echoes = tokio::task::JoinSet::new();
    for i in 0..200 {
        let echo = echo.clone();
        echoes.spawn(async move {
            let body = format!("message {i}");
            let out = outputs(echo.invoke(&delivery(&body)).await);
            assert_eq!(&out[0].body[..], body.as_bytes());
        });
    }
    while let Some(r) = echoes.join_next().await {
        r.expect("echo task");
    }
    assert_eq!(trap(spin_task.await.expect("spin")).0, TrapKind::Deadline);
    assert_eq!(trap(hog_task.await.expect("hog")).0, TrapKind::Memory);
}

#[tokio::test]
async fn concurrency_permits_follow_the_limit() {
    let rt = runtime();
    let echo = load(
        &rt,
        "echo",
        PluginSettings {
            limits: LimitsOverride {
                max_concurrency: Some(2),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let a = echo.acquire().await.expect("permit");
    let _b = echo.acquire().await.expect("permit");
    assert!(
        tokio::time::timeout(Duration::from_millis(50), echo.acquire())
            .await
            .is_err(),
        "a third permit was granted"
    );
    drop(a);
    let _c = tokio::time::timeout(Duration::from_secs(5), echo.acquire())
        .await
        .expect("permit after release")
        .expect("permit");
}

/// The SDK's unit tests: `Message::forward` keeps every property and
/// header, each builder sets its property, the typed header accessors.
#[test]
fn the_sdk_unit_tests_pass() {
    let out = warren_it::plugins::sdk_tests().unwrap();
    assert!(
        out.contains("forward_keeps_every_property_and_header ... ok"),
        "{out}"
    );
}

/// A runtime whose compile cache is `dir`.
fn cached_runtime(dir: &std::path::Path) -> PluginRuntime {
    PluginRuntime::new(RuntimeConfig {
        compile_cache_dir: Some(dir.to_path_buf()),
        ..RuntimeConfig::default()
    })
    .expect("runtime")
}

/// Files in the compile cache (wasmtime keeps them under subdirectories).
fn cache_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if !p.to_string_lossy().contains("wasmtime-cache-") {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_second_load_is_served_from_the_compile_cache_and_a_corrupt_entry_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let path = wasm("echo").expect("plugin build");

    let cold = Instant::now();
    let rt = cached_runtime(dir.path());
    rt.load_file(&path, &settings(&[])).await.unwrap();
    let cold = cold.elapsed();
    let stats = rt.compile_cache_stats().unwrap();
    assert_eq!((stats.hits, stats.misses), (0, 1), "{stats:?}");

    // A new process (a new engine with the same settings) finds it.
    let warm = Instant::now();
    let rt = cached_runtime(dir.path());
    let plugin = rt.load_file(&path, &settings(&[])).await.unwrap();
    let warm = warm.elapsed();
    let stats = rt.compile_cache_stats().unwrap();
    assert_eq!((stats.hits, stats.misses), (1, 0), "{stats:?}");
    eprintln!("echo load: {cold:?} compiled, {warm:?} from the cache");
    let out = plugin.invoke(&delivery("cached")).await;
    assert!(matches!(out, Outcome::Ack { .. }), "{out:?}");

    // Pool sizes do not change the machine code: the entry is shared.
    let rt = PluginRuntime::new(RuntimeConfig {
        compile_cache_dir: Some(dir.path().to_path_buf()),
        max_instances: 17,
        ..RuntimeConfig::default()
    })
    .unwrap();
    rt.load_file(&path, &settings(&[])).await.unwrap();
    assert_eq!(rt.compile_cache_stats().unwrap().hits, 1);

    // Garbage in every entry: recompiled, and the entry rewritten.
    let files = cache_files(dir.path());
    assert!(!files.is_empty());
    for f in &files {
        std::fs::write(f, b"not a compiled component").unwrap();
    }
    let rt = cached_runtime(dir.path());
    let plugin = rt.load_file(&path, &settings(&[])).await.unwrap();
    let stats = rt.compile_cache_stats().unwrap();
    assert_eq!((stats.hits, stats.misses), (0, 1), "{stats:?}");
    assert!(matches!(
        plugin.invoke(&delivery("again")).await,
        Outcome::Ack { .. }
    ));
    let rt = cached_runtime(dir.path());
    rt.load_file(&path, &settings(&[])).await.unwrap();
    assert_eq!(rt.compile_cache_stats().unwrap().hits, 1);
}

#[tokio::test]
async fn a_memory_floor_above_the_limit_is_refused_at_load_unless_the_operator_raises_it() {
    let rt = runtime();
    let path = wasm("big-floor").expect("plugin build");
    let err = rt.load_file(&path, &settings(&[])).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("needs at least 3.1 MiB of memory to start; its limit is 2.0 MiB"),
        "{text}"
    );
    // `[plugin.big-floor] limits = { memory-bytes = 8 MiB }`.
    let raised = PluginSettings {
        limits: LimitsOverride {
            memory_bytes: Some(8 << 20),
            ..LimitsOverride::default()
        },
        ..PluginSettings::default()
    };
    let plugin = rt
        .load_bytes_with(&path, std::fs::read(&path).unwrap(), |name| {
            assert_eq!(name, "big-floor");
            raised.clone()
        })
        .await
        .unwrap();
    assert!(plugin.memory_floor() > 3 << 20, "{}", plugin.memory_floor());
    assert!(matches!(
        plugin.invoke(&delivery("x")).await,
        Outcome::Ack { .. }
    ));
    // Lowering it again is refused the same way.
    let lowered = plugin.with_settings(&settings(&[])).unwrap_err();
    assert!(
        lowered.to_string().contains("its limit is 2.0 MiB"),
        "{lowered}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_beyond_the_pool_wait_for_a_slot_and_none_traps() {
    // A pool of 8 instances; 300 deliveries at once.
    let rt = PluginRuntime::new(RuntimeConfig {
        max_instances: 8,
        ..RuntimeConfig::default()
    })
    .unwrap();
    let echo = load(&rt, "echo", settings(&[])).await;
    let f = echo.footprint();
    eprintln!("echo footprint: {f:?}");
    assert!(f.core_instances >= 1 && f.memories >= 1, "{f:?}");
    let all = futures::future::join_all((0..300).map(|i| {
        let echo = echo.clone();
        async move { echo.invoke(&delivery(&format!("m{i}"))).await }
    }))
    .await;
    let trapped: Vec<_> = all
        .iter()
        .filter(|o| !matches!(o, Outcome::Ack { .. }))
        .collect();
    assert!(
        trapped.is_empty(),
        "{} of 300 failed: {:?}",
        trapped.len(),
        trapped.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_deliveries_to_a_fourteen_core_instance_python_plugin_all_succeed() {
    // Warren's default pool holds 2,048 core instances: 146 Python
    // instances at once. 300 deliveries at once must wait for slots, not
    // fail to instantiate.
    let rt = runtime();
    let wasm = warren_it::plugins::python_wasm("echo").expect("python echo build");
    // A deadline no delivery reaches even on a starved machine: this test
    // is about slots, and 146 Python instances at once share two cores.
    let generous = PluginSettings {
        limits: LimitsOverride {
            deadline_ms: Some(30_000),
            ..Default::default()
        },
        ..Default::default()
    };
    let echo = rt
        .load_file(&wasm, &generous)
        .await
        .unwrap_or_else(|e| panic!("loading the Python echo: {e}"));
    let f = echo.footprint();
    assert!(f.core_instances >= 14, "{f:?}");
    let all = futures::future::join_all((0..300).map(|i| {
        let echo = echo.clone();
        async move { echo.invoke(&delivery(&format!("m{i}"))).await }
    }))
    .await;
    for (i, outcome) in all.into_iter().enumerate() {
        let out = outputs(outcome);
        assert_eq!(&out[0].body[..], format!("m{i}").as_bytes());
    }
}

#[tokio::test]
async fn a_large_component_is_served_from_the_compile_cache_on_reload_and_second_start() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = warren_it::plugins::python_wasm("echo").expect("python echo build");
    let started = Instant::now();
    let first = cached_runtime(dir.path());
    first.load_file(&wasm, &settings(&[])).await.unwrap();
    let cold = started.elapsed();
    assert_eq!(first.compile_cache_stats().unwrap().misses, 1);
    // A reload of the unchanged file.
    let started = Instant::now();
    let reloaded = first.load_file(&wasm, &settings(&[])).await.unwrap();
    let reload = started.elapsed();
    assert_eq!(first.compile_cache_stats().unwrap().hits, 1);
    // A second start.
    let second = cached_runtime(dir.path());
    let started = Instant::now();
    let plugin = second.load_file(&wasm, &settings(&[])).await.unwrap();
    let restart = started.elapsed();
    let stats = second.compile_cache_stats().unwrap();
    assert_eq!((stats.hits, stats.misses), (1, 0), "{stats:?}");
    eprintln!("Python echo load: {cold:?} compiled, reload {reload:?}, second start {restart:?}");
    for p in [reloaded, plugin] {
        assert_eq!(outputs(p.invoke(&delivery("cached")).await).len(), 1);
    }
}

/// What `counter` published for each of `bodies`, in order (`None` for a
/// delivery that did not end in an ack).
async fn counts(plugin: &Plugin, bodies: &[&str]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for b in bodies {
        out.push(match plugin.invoke(&delivery(b)).await {
            Outcome::Ack { outputs, .. } => {
                Some(String::from_utf8_lossy(&outputs[0].body).into_owned())
            }
            _ => None,
        });
    }
    out
}

#[tokio::test]
async fn reuse_keeps_state_between_deliveries_until_a_trap_and_fresh_never_does() {
    let rt = runtime();
    let fresh = load(&rt, "counter", settings(&[])).await;
    assert_eq!(fresh.instance_policy(), InstancePolicy::Fresh);
    let one = Some("1".to_owned());
    assert_eq!(counts(&fresh, &["a", "b", "c"]).await, vec![one.clone(); 3]);

    let reuse = fresh
        .with_settings(&PluginSettings {
            instance: InstancePolicy::Reuse { max_deliveries: 4 },
            ..PluginSettings::default()
        })
        .unwrap();
    let got = counts(&reuse, &["a", "b", "c", "panic", "d", "e", "f", "g", "h"]).await;
    let s = |n: &str| Some(n.to_owned());
    // Three deliveries share an instance; the panic traps and drops it;
    // the next delivery starts at 1 again; after 4 an instance is replaced.
    assert_eq!(
        got,
        vec![
            s("1"),
            s("2"),
            s("3"),
            None,
            s("1"),
            s("2"),
            s("3"),
            s("4"),
            s("1")
        ]
    );
    let out = reuse.invoke(&delivery("panic")).await;
    let (kind, message) = trap(out);
    assert_eq!(kind, TrapKind::Panic, "{message}");
    assert!(
        message.contains("asked to panic after 2 deliveries"),
        "{message}"
    );
}
