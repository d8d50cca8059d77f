//! `warren run` as a process: configuration errors and SIGTERM under load
//! (trace export: `spans.rs`).

// Test code: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use warren_it::broker::{Broker, unique};
use warren_it::config::WarrenToml;
use warren_it::plugins::wasm;
use warren_it::process::signal;
use warren_it::wait;

/// Run `warren run --config cfg` and wait until it consumes `queue`.
async fn spawn_consuming(cfg: &std::path::Path, broker: &Broker, queue: &str) -> Child {
    spawn_logging_to(cfg, broker, queue, Stdio::inherit()).await
}

/// [`spawn_consuming`] with Warren's log (its stderr) going to `log`.
async fn spawn_logging_to(
    cfg: &std::path::Path,
    broker: &Broker,
    queue: &str,
    log: Stdio,
) -> Child {
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stderr(log)
        .spawn()
        .unwrap();
    wait::until_true("warren consuming", Duration::from_secs(30), || async {
        broker.consumer_count(queue).await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    child
}

/// Write `dir/warren.toml`: plugins from `dir`, its own spool stream,
/// retry exchange and dead-letter names (queue `dlq`, exchange `<dlq>.x`),
/// the admin API on `admin`, and `rest` (plugin sections and more)
/// merged in.
fn write_config(dir: &std::path::Path, admin: &str, dlq: &str, rest: &str) -> std::path::PathBuf {
    WarrenToml::isolated(dir)
        .dead_letters_to(dlq)
        .admin_bind(admin)
        .merge(rest)
        .write_in(dir)
        .unwrap()
}

fn sigterm(child: &Child) {
    signal(child, "TERM").unwrap();
}

/// SIGTERM, then look every `poll` whether the process has ended (failing
/// after `limit`): its status and how long it took.
async fn stop(child: &mut Child, limit: Duration, poll: Duration) -> (ExitStatus, Duration) {
    sigterm(child);
    let stopping = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s, stopping.elapsed());
        }
        assert!(
            stopping.elapsed() < limit,
            "warren did not exit within {limit:?}"
        );
        tokio::time::sleep(poll).await;
    }
}

#[test]
fn a_config_file_with_several_mistakes_reports_them_all_and_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = WarrenToml::new()
        .amqp_url("http://not-amqp")
        .set("amqp.heartbeat-secs", "often")
        .set("dispatch.max-attempts", 0)
        .admin_bind("nowhere")
        .set("nonsense.key", 1)
        .write_in(dir.path())
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "amqp:",
        "dispatch.max-attempts",
        "admin.bind \"nowhere\"",
        "unknown section [nonsense]",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(
        err.contains(cfg.to_str().unwrap()),
        "file not named:\n{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_exits_zero_and_loses_nothing() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out) = (unique("term-in"), unique("term-out"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("slow").unwrap(), dir.path().join("slow.wasm")).unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    let cfg = write_config(
        dir.path(),
        "127.0.0.1:0",
        &unique("dlq"),
        &format!(
            r#"
            [shutdown]
            grace-period-ms = 10000
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}", prefetch = 100 }}]
            config = {{ routing-key = "{echo_out}" }}
            [plugin.slow]
            subscriptions = [{{ queue = "{slow_in}" }}]
            "#,
            slow_in = unique("slow-in"),
        ),
    );
    let mut child = spawn_consuming(&cfg, &broker, &echo_in).await;

    let n = 20_000;
    let bodies: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    broker.publish_all("", &echo_in, &bodies).await.unwrap();
    // Stop while it is still working through them.
    let (status, _) = stop(
        &mut child,
        Duration::from_secs(20),
        Duration::from_millis(50),
    )
    .await;
    assert_eq!(status.code(), Some(0), "clean stop exits 0");

    // Every input is either acked with its output confirmed, or still in
    // its queue.
    let remaining_count = broker.message_count(&echo_in).await.unwrap() as usize;
    let remaining = broker
        .collect(&echo_in, remaining_count, Duration::from_secs(30))
        .await
        .unwrap();
    let out_count = broker.message_count(&echo_out).await.unwrap() as usize;
    let outputs = broker
        .collect(&echo_out, out_count, Duration::from_secs(30))
        .await
        .unwrap();
    let seen: BTreeSet<Vec<u8>> = remaining
        .iter()
        .chain(outputs.iter())
        .map(|g| g.body.clone())
        .collect();
    let missing: Vec<&String> = bodies
        .iter()
        .filter(|b| !seen.contains(b.as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!(
        "sigterm: {} handled before the stop, {} left in the queue",
        outputs.len(),
        remaining.len()
    );
}

/// `warren run` with `echo` under load and `router` publishing every output
/// to an exchange that does not exist: each of those is dead-lettered with
/// the broker's 404 and the exchange, nothing goes to the spool, every echo
/// output arrives, and the log names the refused destination once, not
/// once per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_to_a_missing_exchange_are_dead_lettered_while_echo_flows() {
    let broker = Broker::shared().await.unwrap();
    let (echo_in, echo_out, orders_in) = (
        unique("miss-echo-in"),
        unique("miss-echo-out"),
        unique("miss-orders"),
    );
    let (missing, dlq) = (unique("missing-x"), unique("miss-dlq"));
    broker.declare_queue(&echo_out).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo").unwrap(), dir.path().join("echo.wasm")).unwrap();
    std::fs::copy(wasm("router").unwrap(), dir.path().join("router.wasm")).unwrap();
    let admin = warren_it::ports::free_port().unwrap();
    let cfg = write_config(
        dir.path(),
        &format!("127.0.0.1:{admin}"),
        &dlq,
        &format!(
            r#"
            [plugin.echo]
            subscriptions = [{{ queue = "{echo_in}", prefetch = 100 }}]
            config = {{ routing-key = "{echo_out}" }}
            [plugin.router]
            subscriptions = [{{ queue = "{orders_in}", prefetch = 100 }}]
            config = {{ exchange = "{missing}" }}
            "#
        ),
    );
    let log_path = dir.path().join("warren.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let child = spawn_logging_to(&cfg, &broker, &echo_in, Stdio::from(log)).await;
    wait::until_true("router consuming", Duration::from_secs(30), || async {
        broker.consumer_count(&orders_in).await.unwrap_or(0) == 1
    })
    .await
    .unwrap();

    let (n_echo, n_orders) = (2_000, 1_000);
    let echo_bodies: Vec<String> = (0..n_echo).map(|i| format!("echo-{i}")).collect();
    let orders: Vec<String> = (0..n_orders)
        .map(|i| format!(r#"{{"id":{i},"region":"eu"}}"#))
        .collect();
    let (a, b) = tokio::join!(
        broker.publish_all("", &echo_in, &echo_bodies),
        broker.publish_all("", &orders_in, &orders),
    );
    a.unwrap();
    b.unwrap();
    let (echoed, dead) = tokio::join!(
        broker.collect(&echo_out, n_echo, Duration::from_secs(120)),
        broker.collect(&dlq, n_orders, Duration::from_secs(120)),
    );
    let (echoed, dead) = (echoed.unwrap(), dead.unwrap());
    assert_eq!(echoed.len(), n_echo, "every echo output arrives");
    assert_eq!(
        dead.len(),
        n_orders,
        "every refused output is dead-lettered"
    );
    let ids: BTreeSet<String> = dead
        .iter()
        .map(|d| String::from_utf8(d.body.clone()).unwrap())
        .collect();
    assert_eq!(ids.len(), n_orders);
    for d in &dead {
        assert_eq!(d.header_i64("x-warren-reply-code"), Some(404), "{d:?}");
        assert_eq!(
            d.header_str("x-warren-outcome").as_deref(),
            Some("exchange_not_found")
        );
        assert_eq!(
            d.header_str("x-warren-original-exchange").as_deref(),
            Some(missing.as_str())
        );
        assert_eq!(
            d.header_str("x-warren-original-routing-key").as_deref(),
            Some("orders.eu")
        );
        let text = d.header_str("x-warren-reply-text").unwrap();
        assert!(text.contains(&format!("no exchange '{missing}'")), "{text}");
    }
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], admin).into();
    let status = warren_it::http::request(addr, "GET", "/status", &[], None)
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        status["spool"]["appended"], 0,
        "nothing was spooled: {status}"
    );
    assert_eq!(status["spool"]["depth"], 0, "{status}");
    let metrics = warren_it::http::request(addr, "GET", "/metrics", &[], None)
        .await
        .unwrap()
        .text();
    assert!(
        metrics.contains(&format!(
            "warren_outputs_dead_lettered_total{{reason=\"exchange_not_found\"}} {n_orders}"
        )),
        "{metrics}"
    );

    sigterm(&child);
    let mut child = child;
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let log = std::fs::read_to_string(&log_path).unwrap();
    let naming: Vec<&str> = log.lines().filter(|l| l.contains(&missing)).collect();
    // Warren's own lines; lapin also logs each once-a-second exchange
    // check the broker answers with a 404.
    let own = naming.iter().filter(|l| l.contains("warren::")).count();
    eprintln!(
        "missing exchange: {own} Warren log lines ({} in all) name it for {n_orders} refused outputs",
        naming.len()
    );
    assert!(
        (1..=3).contains(&own) && naming.len() < 50,
        "one log line per destination and interval, not per message; got {own} ({}):\n{log}",
        naming.len()
    );
    for q in [&echo_in, &echo_out, &orders_in, &dlq] {
        broker.delete_queue(q).await.unwrap();
    }
}

/// A stop ends within one grace period however much is in flight: each
/// phase waits until the same deadline. Here each delivery takes 20 s of
/// guest time (its deadline is 30 s), four are in flight, and the grace
/// period is 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_with_deliveries_that_cannot_finish_ends_within_the_grace_period() {
    /// What the stop may take beyond the grace period: one poll.
    const POLL: Duration = Duration::from_millis(100);
    let broker = Broker::shared().await.unwrap();
    let queue = unique("stop-in");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("slow").unwrap(), dir.path().join("slow.wasm")).unwrap();
    let cfg = WarrenToml::isolated(dir.path())
        .admin_bind("127.0.0.1:0")
        .grace_period_ms(2000)
        .merge(&format!(
            r#"
            [plugin.slow]
            subscriptions = [{{ queue = "{queue}", prefetch = 4 }}]
            limits = {{ deadline-ms = 30000, max-concurrency = 4 }}
            config = {{ millis = 20000 }}
            "#
        ))
        .write_in(dir.path())
        .unwrap();
    let mut child = spawn_consuming(&cfg, &broker, &queue).await;
    let n = 12;
    let bodies: Vec<String> = (0..n).map(|i| format!("m-{i}")).collect();
    broker.publish_all("", &queue, &bodies).await.unwrap();
    wait::until_true(
        "four deliveries in flight",
        Duration::from_secs(30),
        || async { broker.message_count(&queue).await.unwrap_or(0) == n - 4 },
    )
    .await
    .unwrap();

    // Looked at every 10 ms, so the measure is not a poll coarser than
    // what it checks.
    let (status, took) = stop(
        &mut child,
        Duration::from_secs(10),
        Duration::from_millis(10),
    )
    .await;
    assert_eq!(status.code(), Some(0), "a stop at the deadline exits 0");
    assert!(
        took <= Duration::from_secs(2) + POLL,
        "the stop took {took:?}, more than the 2 s grace period and one poll"
    );
    eprintln!("stop: ended {took:?} after SIGTERM");
    // The unfinished deliveries were never acked: the broker has them all.
    wait::until_true("every message back", Duration::from_secs(30), || async {
        broker.message_count(&queue).await.unwrap_or(0) == n
    })
    .await
    .unwrap();
    broker.delete_queue(&queue).await.unwrap();
}
