//! A plain lapin client for tests: declare, publish with confirms, count
//! and collect messages. It is the "outside world" the tests check Warren
//! against, so it uses none of Warren's code.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

/// The shared broker every machine of this project runs.
pub const SHARED_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Ready messages and consumers of `queue` on `conn` (passive declare).
/// For clients with a connection of their own, e.g. the benchmarks.
pub async fn inspect(conn: &Connection, queue: &str) -> Result<(u32, u32)> {
    // A passive declare of a missing queue closes the channel: use a
    // channel of its own.
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("queue {queue} does not exist"))?;
    let _ = ch.close(200, "done".into()).await;
    Ok((q.message_count(), q.consumer_count()))
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("it.{prefix}.{}", uuid::Uuid::new_v4().simple())
}

/// One message as a test sees it.
#[derive(Debug, Clone)]
pub struct Got {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub headers: FieldTable,
    pub properties: BasicProperties,
}

impl Got {
    /// Header `key` as text (long or short string), if present.
    pub fn header_str(&self, key: &str) -> Option<String> {
        match self.headers.inner().get(key)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
            _ => None,
        }
    }

    /// Header `key` as an integer of any width.
    pub fn header_i64(&self, key: &str) -> Option<i64> {
        match self.headers.inner().get(key)? {
            AMQPValue::LongLongInt(v) => Some(*v),
            AMQPValue::LongInt(v) => Some((*v).into()),
            AMQPValue::ShortInt(v) => Some((*v).into()),
            AMQPValue::LongUInt(v) => Some((*v).into()),
            AMQPValue::ShortShortInt(v) => Some((*v).into()),
            _ => None,
        }
    }
}

/// A connection with one confirm-mode channel.
pub struct Broker {
    _conn: Connection,
    ch: Channel,
}

impl Broker {
    pub async fn connect(url: &str) -> Result<Broker> {
        let conn = Connection::connect(url, ConnectionProperties::default())
            .await
            .with_context(|| format!("test client cannot connect to {url}"))?;
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Broker { _conn: conn, ch })
    }

    /// The shared broker on 5672.
    pub async fn shared() -> Result<Broker> {
        Self::connect(SHARED_URL).await
    }

    pub async fn declare_queue(&self, name: &str) -> Result<()> {
        self.declare_queue_with(name, FieldTable::default()).await
    }

    /// A durable queue with `arguments` (`x-queue-type`, `x-max-length`, ...).
    pub async fn declare_queue_with(&self, name: &str, arguments: FieldTable) -> Result<()> {
        self.ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                arguments,
            )
            .await?;
        Ok(())
    }

    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> Result<()> {
        self.ch
            .exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<()> {
        self.ch
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(())
    }

    /// Where the `router` example plugin's outputs for `region` land:
    /// `queue`, bound to the topic exchange it publishes to (`exchange`:
    /// `orders.routed`, or what its `exchange` setting names) with
    /// `orders.<region>`.
    pub async fn declare_routed(&self, queue: &str, exchange: &str, region: &str) -> Result<()> {
        self.declare_queue(queue).await?;
        self.declare_exchange(exchange, ExchangeKind::Topic).await?;
        self.bind(queue, exchange, &format!("orders.{region}"))
            .await
    }

    pub async fn delete_exchange(&self, name: &str) -> Result<()> {
        self.ch
            .exchange_delete(
                name.into(),
                lapin::options::ExchangeDeleteOptions::default(),
            )
            .await?;
        Ok(())
    }

    pub async fn delete_queue(&self, name: &str) -> Result<()> {
        self.ch
            .queue_delete(name.into(), QueueDeleteOptions::default())
            .await?;
        Ok(())
    }

    /// Publish one message with exactly `properties`, confirmed and routed.
    pub async fn publish_with_properties(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<()> {
        let confirm = self.send(exchange, routing_key, body, properties).await?;
        Self::await_confirms(&mut vec![confirm]).await
    }

    /// A mandatory publish on the confirm channel; resolves once sent.
    async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<lapin::PublisherConfirm> {
        Ok(self
            .ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?)
    }

    /// Publish persistent messages with confirms, pipelined; fails unless
    /// every one was confirmed (and routed).
    pub async fn publish_all<I, B>(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: I,
    ) -> Result<usize>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        self.publish_all_with(exchange, routing_key, bodies, FieldTable::default())
            .await
    }

    /// Publish `body` to the queue `input` (through the default exchange)
    /// and collect, within `timeout`, what a plugin turned it into on
    /// `output`: at most one message.
    pub async fn publish_and_collect_one(
        &self,
        input: &str,
        body: &str,
        output: &str,
        timeout: Duration,
    ) -> Result<Vec<Got>> {
        self.publish_all("", input, [body]).await?;
        self.collect(output, 1, timeout).await
    }

    /// Like [`Broker::publish_all`], with headers on every message.
    pub async fn publish_all_with<I, B>(
        &self,
        exchange: &str,
        routing_key: &str,
        bodies: I,
        headers: FieldTable,
    ) -> Result<usize>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let mut pending = Vec::new();
        let mut sent = 0;
        for body in bodies {
            let confirm = self
                .send(exchange, routing_key, body.as_ref(), props.clone())
                .await?;
            sent += 1;
            Self::pipeline(&mut pending, confirm).await?;
        }
        Self::await_confirms(&mut pending).await?;
        Ok(sent)
    }

    /// Publish `(routing key, body, properties)` messages to `exchange`
    /// with confirms, pipelined; fails unless every one was confirmed (and
    /// routed). Returns how many were published.
    pub async fn publish_each<I, K, B>(&self, exchange: &str, messages: I) -> Result<usize>
    where
        I: IntoIterator<Item = (K, B, BasicProperties)>,
        K: AsRef<str>,
        B: AsRef<[u8]>,
    {
        let mut pending = Vec::new();
        let mut sent = 0;
        for (routing_key, body, props) in messages {
            let confirm = self
                .send(exchange, routing_key.as_ref(), body.as_ref(), props)
                .await?;
            sent += 1;
            Self::pipeline(&mut pending, confirm).await?;
        }
        Self::await_confirms(&mut pending).await?;
        Ok(sent)
    }

    /// Add `confirm` to `pending`, awaiting them all once 1,000 are open.
    async fn pipeline(
        pending: &mut Vec<lapin::PublisherConfirm>,
        confirm: lapin::PublisherConfirm,
    ) -> Result<()> {
        pending.push(confirm);
        if pending.len() >= 1000 {
            Self::await_confirms(pending).await?;
        }
        Ok(())
    }

    async fn await_confirms(pending: &mut Vec<lapin::PublisherConfirm>) -> Result<()> {
        for c in pending.drain(..) {
            let confirmation = c.await?;
            if !confirmation.is_ack() {
                bail!("broker nacked a test message");
            }
            if let Some(ret) = confirmation.take_message() {
                bail!("test message was unroutable: {:?}", ret.reply_text);
            }
        }
        Ok(())
    }

    /// Ready messages in `queue` (passive declare).
    pub async fn message_count(&self, queue: &str) -> Result<u32> {
        Ok(self.inspect(queue).await?.0)
    }

    /// Consumers on `queue` (passive declare).
    pub async fn consumer_count(&self, queue: &str) -> Result<u32> {
        Ok(self.inspect(queue).await?.1)
    }

    async fn inspect(&self, queue: &str) -> Result<(u32, u32)> {
        inspect(&self._conn, queue).await
    }

    /// Consume until `n` messages arrived or `timeout` passed; returns what
    /// arrived. Each kept message is acked; anything the broker sent beyond
    /// `n` is requeued when the channel closes (never lost to the test).
    pub async fn collect(&self, queue: &str, n: usize, timeout: Duration) -> Result<Vec<Got>> {
        let ch = self._conn.create_channel().await?;
        let prefetch = u16::try_from(n.clamp(1, 1000)).unwrap_or(1000);
        ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                ShortString::from(format!("it-collect-{}", uuid::Uuid::new_v4().simple())),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let mut got = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + timeout;
        while got.len() < n {
            match tokio::time::timeout_at(deadline, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    d.ack(BasicAckOptions::default()).await?;
                    got.push(Got {
                        body: d.data.clone(),
                        routing_key: d.routing_key.as_str().to_string(),
                        headers: d.properties.headers().clone().unwrap_or_default(),
                        properties: d.properties.clone(),
                    });
                }
                Ok(Some(Err(e))) => return Err(e.into()),
                Ok(None) | Err(_) => break,
            }
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(got)
    }
}

impl Broker {
    /// Collect from `queue` until every body in `want` was seen at least
    /// once, or `timeout` passed; returns everything received (with
    /// duplicates) and the bodies still missing.
    pub async fn collect_until_complete(
        &self,
        queue: &str,
        want: &std::collections::BTreeSet<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(Vec<Got>, Vec<Vec<u8>>)> {
        let mut got = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while seen.len() < want.len() && tokio::time::Instant::now() < deadline {
            let batch = self
                .collect(queue, want.len() - seen.len(), Duration::from_secs(2))
                .await?;
            for g in batch {
                if want.contains(&g.body) {
                    seen.insert(g.body.clone());
                }
                got.push(g);
            }
        }
        let missing = want.difference(&seen).cloned().collect();
        Ok((got, missing))
    }
}

/// Headers with one text value.
pub fn text_header(key: &str, value: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(key.into(), AMQPValue::LongString(value.into()));
    t
}
