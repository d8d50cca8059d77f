//! What the benchmark binaries share: the broker they measure against,
//! queue declarations, and Warren started in-process on a plugins folder.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
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

/// Publish `n` persistent messages of `body` bytes to `queue` through the
/// default exchange, with confirms, 2,000 in flight.
pub async fn fill(ch: &Channel, queue: &str, n: u64, body: usize) -> Result<()> {
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; body];
    let mut pending = Vec::with_capacity(2000);
    for i in 0..n {
        // A message id of its own each, for the deduplicated drain's key.
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m{i}").into());
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?,
        );
        if pending.len() == 2000 {
            for c in pending.drain(..) {
                c.await?;
            }
        }
    }
    for c in pending.drain(..) {
        c.await?;
    }
    Ok(())
}

/// CPU time (user + system, every thread) this process has used so far.
pub fn process_cpu() -> Result<Duration> {
    cpu_of("self")
}

/// CPU time (user + system, every thread) process `pid` (or `self`) has
/// used so far, from `/proc/<pid>/stat`, in the kernel's 10 ms ticks
/// (`USER_HZ` is 100 on Linux).
pub fn cpu_of(pid: &str) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which may hold spaces: state is the
    // first, utime the 12th and stime the 13th.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("no command name in {path}"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} is too short"))?
            .parse::<u64>()
            .with_context(|| format!("a tick count in {path}"))
    };
    Ok(Duration::from_millis((tick(11)? + tick(12)?) * 10))
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

/// A plugin's deliveries acked and commits made, at some moment.
#[derive(Debug, Clone, Copy, Default)]
pub struct Handled {
    pub acked: u64,
    pub committed: u64,
}

/// What draining a queue through Warren took.
#[derive(Debug, Clone, Copy)]
pub struct Drained {
    /// From the consumer's registration to the last delivery handled (and
    /// committed, for a plugin with state).
    pub secs: f64,
    /// The whole process's CPU time meanwhile (Warren, and the bench's
    /// own polling, which is negligible).
    pub cpu: Duration,
}

/// Drain `n` messages from `queue` through all of Warren with plugin
/// `plugin` subscribed to it at `prefetch` under instance policy
/// `instance` (`fresh` or `reuse`), `extra` appended to its config; then
/// stop it.
pub async fn drain_warren(
    plugin: &str,
    queue: &str,
    n: u64,
    prefetch: u16,
    instance: &str,
    extra: &str,
) -> Result<Drained> {
    let warren = start_warren(
        &[plugin],
        &format!(
            r#"
            [plugin.{plugin}]
            instance = "{instance}"
            subscriptions = [{{ queue = "{queue}", prefetch = {prefetch} }}]
            {extra}
            "#
        ),
    )
    .await?;
    // Loading and compiling the plugin is start-up, not drain: the clock
    // starts when the consumer is being registered.
    let started = Instant::now();
    let cpu = process_cpu()?;
    let before = warren.counters(plugin).await?;
    warren
        .handled(plugin, before, n, Duration::from_secs(600))
        .await?;
    let drained = Drained {
        secs: started.elapsed().as_secs_f64(),
        cpu: process_cpu()?.saturating_sub(cpu),
    };
    warren.shutdown().await;
    Ok(drained)
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

    /// Wait until plugin `name` has handled `n` more deliveries than
    /// `before` (its outcome counter), and, if it keeps state, until as many
    /// of its deliveries' writes are committed.
    pub async fn handled(
        &self,
        name: &str,
        before: Handled,
        n: u64,
        timeout: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let plugin = self.plugin(name)?;
        // Polled every millisecond: the plugin's own atomic counters, not
        // a Prometheus render, which cost ~4% of the drain when polled this
        // often.
        loop {
            let done = plugin.counters().ack - before.acked;
            if done >= n {
                break;
            }
            if started.elapsed() > timeout {
                anyhow::bail!("Warren acked only {done} of {n} in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // The commits trail the outcomes by a batch: polled only now, since
        // the status reads the store.
        if let Some(kv) = plugin.kv() {
            loop {
                let done = kv.status().await.commits - before.committed;
                if done >= n {
                    break;
                }
                if started.elapsed() > timeout {
                    anyhow::bail!("Warren committed only {done} of {n} in {timeout:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(())
    }

    /// Plugin `name`'s counters now, for [`Warren::handled`].
    pub async fn counters(&self, name: &str) -> Result<Handled> {
        let plugin = self.plugin(name)?;
        let committed = match plugin.kv() {
            Some(kv) => kv.status().await.commits,
            None => 0,
        };
        Ok(Handled {
            acked: plugin.counters().ack,
            committed,
        })
    }

    fn plugin(&self, name: &str) -> Result<warren::plugins::Plugin> {
        self.app
            .handle()
            .reloader
            .plugins()
            .remove(name)
            .with_context(|| format!("plugin {name} not loaded"))
    }

    /// Stop Warren as on SIGTERM.
    pub async fn shutdown(self) {
        self.app.shutdown().await;
    }
}
