//! The resilient AMQP core against real RabbitMQ, each test on both
//! versions (`each_version!`): the shared broker of the version for
//! non-destructive tests (random queue names), the fault proxy and a
//! private node for destructive ones.

// Test helpers outside `#[test]` functions: a failed helper should fail the
// test loudly, like an assertion.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod consumers;
mod failures;
mod publisher;
mod resilience;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren::amqp::{
    Amqp, AmqpConfig, AmqpHandle, AmqpStatus, BackoffConfig, Delivery, QueueSpec,
    SubscriptionConfig, Topology,
};
use warren::message::OutboundMessage;
use warren_it::wait;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warren=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A random queue name.
pub fn qname(prefix: &str) -> String {
    format!("warren-it.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// A config with test-friendly timings.
pub fn config(url: &str, topology: Topology) -> AmqpConfig {
    let mut c = AmqpConfig::new(url, "it");
    c.heartbeat = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c.backoff = BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_secs(1),
    };
    c.consumer_check_interval = Duration::from_secs(1);
    c.confirm_timeout = Duration::from_secs(5);
    c.drain_timeout = Duration::from_secs(5);
    c.watchdog_interval = Duration::from_millis(200);
    c.topology = topology;
    c
}

/// A running supervisor; cancelled and awaited on drop (best effort).
pub struct Running {
    pub handle: AmqpHandle,
    pub cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Running {
    pub fn start(config: AmqpConfig) -> Result<Running> {
        let (amqp, handle) = Amqp::new(config)?;
        let cancel = CancellationToken::new();
        let task = tokio::spawn(amqp.run(cancel.clone()));
        Ok(Running {
            handle,
            cancel,
            task: Some(task),
        })
    }

    pub async fn stop(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .context("supervisor did not stop in time")??;
        }
        Ok(())
    }

    pub fn status(&self) -> AmqpStatus {
        self.handle.status_now()
    }

    pub async fn until_running(&self, generation: u64, timeout: Duration) -> Result<()> {
        let h = self.handle.clone();
        wait::until_true(
            &format!("running at generation >= {generation}"),
            timeout,
            || {
                let s = h.status_now();
                async move { s.is_running() && s.generation >= generation }
            },
        )
        .await
    }

    pub async fn until_consuming(&self, queue: &str, timeout: Duration) -> Result<()> {
        let h = self.handle.clone();
        wait::until_true(&format!("consumer on {queue}"), timeout, || {
            let ok = h.consumer(queue).is_some_and(|s| s.believed_consumers == 1);
            async move { ok }
        })
        .await
    }

    /// Publish until confirmed (retrying transient failures) within
    /// `timeout`.
    pub async fn publish_confirmed(&self, msg: &OutboundMessage, timeout: Duration) -> Result<()> {
        let p = self.handle.publisher();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match p.publish(msg).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e).context("publish failed"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// A durable classic queue topology.
pub fn queue_topology(queue: &str) -> Topology {
    Topology::default().queue(QueueSpec::durable(queue))
}

/// A message with a numeric id to the default exchange.
pub fn numbered(queue: &str, i: u64) -> OutboundMessage {
    let mut m = OutboundMessage::new("", queue, i.to_string().into_bytes());
    m.properties.message_id = Some(i.to_string());
    m
}

pub fn id_of(d: &Delivery) -> u64 {
    std::str::from_utf8(&d.body)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

/// Start a supervisor on `config`, subscribe to `queue` with `prefetch`
/// and, once the consumer is registered, collect its deliveries (see
/// [`collect`]).
pub async fn start_consuming(
    config: AmqpConfig,
    queue: &str,
    prefetch: u16,
) -> Result<(Running, Arc<Mutex<HashSet<u64>>>, JoinHandle<()>)> {
    let r = Running::start(config)?;
    r.until_running(1, Duration::from_secs(10)).await?;
    let sub = subscribe(&r, queue, prefetch);
    r.until_consuming(queue, Duration::from_secs(5)).await?;
    let (seen, task) = collect(sub);
    Ok((r, seen, task))
}

/// Collect delivery ids (acking each) in a background task.
pub fn collect(mut sub: warren::amqp::Subscription) -> (Arc<Mutex<HashSet<u64>>>, JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(d) = sub.next().await {
            let id = id_of(&d);
            d.acker.ack();
            s.lock().unwrap().insert(id);
        }
    });
    (seen, task)
}

/// A plain lapin connection for checks behind Warren's back.
pub async fn plain(url: &str) -> Result<(lapin::Connection, lapin::Channel)> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .with_context(|| format!("cannot connect to {url}: is RabbitMQ running?"))?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch))
}

/// The broker's consumer count of `queue` (passive declare).
pub async fn broker_consumers(ch: &lapin::Channel, queue: &str) -> Result<u32> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.consumer_count())
}

pub async fn delete_queue(url: &str, queue: &str) -> Result<()> {
    let (conn, ch) = plain(url).await?;
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await?;
    let _ = conn.close(200, "bye".into()).await;
    Ok(())
}

pub fn subscribe(r: &Running, queue: &str, prefetch: u16) -> warren::amqp::Subscription {
    r.handle
        .add_subscription(SubscriptionConfig::new(queue).prefetch(prefetch))
        .unwrap()
}
