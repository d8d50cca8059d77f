//! What the benchmark binaries share: the broker they measure against,
//! queue declarations, and Warren started in-process on a plugins folder.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lapin::Channel;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use warren::app::App;
use warren::config::Config;

/// The shared RabbitMQ every benchmark but recovery measures against.
pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

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
    let text = format!(
        r#"
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
        let started = Instant::now();
        while !handle.readiness().ready {
            if started.elapsed() > timeout {
                bail!(
                    "Warren not ready after {timeout:?}: {:?}",
                    handle.readiness()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stop Warren as on SIGTERM.
    pub async fn shutdown(self) {
        self.app.shutdown().await;
    }
}
