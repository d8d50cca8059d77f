//! What the benchmark binaries share: the broker they measure against,
//! queue declarations, and Warren started in-process on a plugins folder.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ConnectionProperties};
use warren::app::App;
use warren::config::Config;
use warren_it::rabbit::{Shared, Version, shared};

/// The message count given as the first command-line argument, or
/// `default`.
pub fn count_arg(default: u64) -> Result<u64> {
    std::env::args()
        .nth(1)
        .map(|a| a.parse().with_context(|| format!("message count {a:?}")))
        .transpose()
        .map(|n| n.unwrap_or(default))
}

/// The RabbitMQ version to measure: `WARREN_BENCH_RABBITMQ` (`3.10`, the
/// default, or `4.0`).
pub fn bench_version() -> Result<Version> {
    match std::env::var("WARREN_BENCH_RABBITMQ").as_deref() {
        Ok("4.0") => Ok(Version::V4_0),
        Ok("3.10") | Err(_) => Ok(Version::V3_10),
        Ok(other) => anyhow::bail!("WARREN_BENCH_RABBITMQ={other}: use 3.10 or 4.0"),
    }
}

/// The shared broker of [`bench_version`].
pub async fn bench_broker() -> Result<Shared> {
    shared(bench_version()?).await
}

/// A connection to the shared broker of [`bench_version`].
pub async fn connect_shared() -> Result<Connection> {
    let b = bench_broker().await?;
    Connection::connect(&b.url, ConnectionProperties::default())
        .await
        .with_context(|| format!("RabbitMQ {} on {}", b.version.label(), b.addr))
}

/// Declare a durable quorum queue, the type Warren declares by default.
pub async fn declare_quorum(ch: &Channel, queue: &str) -> Result<()> {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await?;
    Ok(())
}

/// The plain-lapin baseline: consume `n` messages from `queue` with
/// `prefetch`, acking each (`every` = 1) or every `every`-th with
/// `multiple = true`. Returns the seconds from the first delivery until the
/// broker has processed the last ack.
pub async fn drain_lapin(
    conn: &Connection,
    queue: &str,
    n: u64,
    every: u64,
    prefetch: u16,
) -> Result<f64> {
    let ch = conn.create_channel().await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    let mut got = 0;
    while got < n {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .context("no delivery for 30 s")?
            .context("consumer ended")??;
        started.get_or_insert_with(Instant::now);
        got += 1;
        if got % every == 0 || got == n {
            d.ack(BasicAckOptions {
                multiple: every > 1,
            })
            .await?;
        }
    }
    // Acks are sent asynchronously; a synchronous method on the same
    // channel is answered only after the broker processed them.
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let secs = started
        .map(|t| t.elapsed().as_secs_f64())
        .unwrap_or_default();
    let _ = ch.close(200, "done".into()).await;
    Ok(secs)
}

/// Warren running in-process, and the plugins folder it was started on.
pub struct Warren {
    pub app: App,
    _dir: tempfile::TempDir,
}

/// Start Warren on a fresh plugins folder holding the example plugins
/// `plugins` (built from `plugins/`), with a private spool stream,
/// `bench.*` retry and dead-letter names, warn-level logs, and `extra`
/// (plugin sections) appended to its config. Returns once `App::start`
/// does: topology and consumers may still be registering.
pub async fn start_warren(plugins: &[&str], extra: &str) -> Result<Warren> {
    let dir = tempfile::tempdir()?;
    for name in plugins {
        std::fs::copy(
            warren_it::plugins::wasm(name)?,
            dir.path().join(format!("{name}.wasm")),
        )
        .with_context(|| format!("copying plugin {name}"))?;
    }
    let broker = bench_broker().await?;
    let text = format!(
        r#"
        [amqp]
        url = "{url}"
        [admin]
        bind = "127.0.0.1:0"
        [plugins]
        dir = "{dir}"
        [spool]
        stream-key = "bench.spool.{id}"
        [dispatch]
        retry-exchange = "bench.retry"
        dead-letter-exchange = "bench.dlx"
        dead-letter-queue = "bench.dlq"
        [telemetry]
        log-level = "warn"
        {extra}
        "#,
        dir = dir.path().display(),
        url = broker.url,
        id = uuid::Uuid::new_v4().simple(),
    );
    let config = Config::parse(&text, Vec::new()).map_err(|p| anyhow::anyhow!("{p:?}"))?;
    let app = App::start(config).await?;
    Ok(Warren { app, _dir: dir })
}

impl Warren {
    /// Wait until Warren reports ready (consumers registered).
    pub async fn ready(&self, timeout: Duration) -> Result<()> {
        let handle = self.app.handle();
        warren_it::wait::until_true("Warren ready", timeout, || {
            let ready = handle.readiness().ready;
            async move { ready }
        })
        .await
        .with_context(|| format!("{:?}", handle.readiness()))
    }

    /// Stop Warren as on SIGTERM.
    pub async fn shutdown(self) {
        self.app.shutdown().await;
    }
}
