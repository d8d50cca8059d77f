//! The outbox: where every message Warren publishes goes. To the broker
//! with confirms while it is healthy and the spool is empty; otherwise into
//! the spool, which the drainer republishes in order when the broker is
//! back. When neither takes a message, the caller gets [`OutboxError`] and
//! must keep what it has (a delivery stays unacked): nothing is dropped.
//!
//! A message the broker cannot route (no queue bound, missing exchange)
//! would block the spool forever if it were retried, so it goes to the
//! dead-letter exchange instead, with the reason in its headers.

use std::time::Duration;

use crate::amqp::{PublishError, Publisher};
use crate::buffer::{DrainPublisher, SpoolError, SpoolHandle};
use crate::message::{HeaderValue, OutboundMessage};

use super::headers;

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Confirmed by the broker.
    Broker,
    /// Durably in the spool.
    Spool,
    /// Unroutable; confirmed into the dead-letter exchange.
    DeadLettered,
}

/// Neither the broker nor the spool took the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("message refused: broker: {broker}; spool: {spool}")]
pub struct OutboxError {
    pub broker: String,
    pub spool: String,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    publisher: Publisher,
    spool: SpoolHandle,
    dead_letter_exchange: String,
}

impl Outbox {
    pub fn new(publisher: Publisher, spool: SpoolHandle, dead_letter_exchange: String) -> Self {
        Self {
            publisher,
            spool,
            dead_letter_exchange,
        }
    }

    /// Publish `msg`: resolves when it is confirmed by the broker or
    /// durable in the spool, or fails when neither took it.
    pub async fn publish(&self, msg: &OutboundMessage) -> Result<Placement, OutboxError> {
        if self.spool.is_empty() && self.publisher.is_ready() {
            let broker = match self.to_broker(msg).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            // The broker failed (or the outcome is unknown): the spool keeps
            // it, and everything after it, until the drainer catches up.
            return self
                .spool
                .append(msg.clone())
                .await
                .map(|_| Placement::Spool)
                .map_err(|spool| refused(&broker.to_string(), &spool));
        }
        // The spool is not empty (or not yet known to be): append to keep
        // order. If the spool cannot take it, the broker is the last resort:
        // out of order, but not lost.
        let spool = match self.spool.append(msg.clone()).await {
            Ok(_) => return Ok(Placement::Spool),
            Err(e) => e,
        };
        if !self.publisher.is_ready() {
            return Err(refused("not connected", &spool));
        }
        self.to_broker(msg)
            .await
            .map_err(|broker| refused(&broker.to_string(), &spool))
    }

    /// Publish to the broker; an unroutable message is dead-lettered.
    async fn to_broker(&self, msg: &OutboundMessage) -> Result<Placement, PublishError> {
        let confirmed = self.publisher.publish(msg).await;
        self.settle(msg, confirmed).await
    }

    /// What a broker confirm means: done, dead-letter an unroutable
    /// message, or a (transient) failure for the caller.
    async fn settle(
        &self,
        msg: &OutboundMessage,
        confirmed: Result<u64, PublishError>,
    ) -> Result<Placement, PublishError> {
        match confirmed {
            Ok(_) => Ok(Placement::Broker),
            Err(e) if !e.is_transient() => {
                tracing::warn!(exchange = %msg.exchange, routing_key = %msg.routing_key, error = %e, "Output is unroutable; dead-lettering it.");
                let dead = self.unroutable(msg, &e);
                self.publisher
                    .publish(&dead)
                    .await
                    .map(|_| Placement::DeadLettered)
            }
            Err(e) => Err(e),
        }
    }

    fn unroutable(&self, msg: &OutboundMessage, e: &PublishError) -> OutboundMessage {
        let mut dead = msg.clone();
        let p = &mut dead.properties;
        p.set_header(headers::OUTCOME, HeaderValue::String("unroutable".into()));
        p.set_header(headers::REASON, HeaderValue::String(e.to_string()));
        p.set_header(
            headers::ORIGINAL_EXCHANGE,
            HeaderValue::String(msg.exchange.clone()),
        );
        p.set_header(
            headers::ORIGINAL_ROUTING_KEY,
            HeaderValue::String(msg.routing_key.clone()),
        );
        dead.exchange = self.dead_letter_exchange.clone();
        dead
    }

    /// How long one publish may wait for a confirm.
    pub fn confirm_timeout(&self) -> Duration {
        self.publisher.confirm_timeout()
    }

    /// The publish function the spool's drainer uses: straight to the
    /// broker (never back into the spool), unroutable messages
    /// dead-lettered.
    pub fn drain_publisher(&self) -> OutboxDrain {
        OutboxDrain {
            outbox: self.clone(),
        }
    }
}

fn refused(broker: &str, spool: &SpoolError) -> OutboxError {
    OutboxError {
        broker: broker.to_string(),
        spool: spool.to_string(),
    }
}

/// [`DrainPublisher`] over the confirmed publisher.
pub struct OutboxDrain {
    outbox: Outbox,
}

/// Pipelined: `publish` returns once the message is on the channel (in
/// stream order) and the drainer keeps a window of confirms in flight.
impl DrainPublisher for OutboxDrain {
    type Error = PublishError;
    type Confirm = std::pin::Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, PublishError>> + Send {
        let outbox = self.outbox.clone();
        async move {
            // Unbounded here: the drainer bounds the time without progress.
            let pending = outbox.publisher.send_unbounded(&message).await?;
            let confirm: Self::Confirm = Box::pin(async move {
                let confirmed = pending.await;
                outbox.settle(&message, confirmed).await.map(|_| ())
            });
            Ok(confirm)
        }
    }

    fn is_blocked(&self) -> bool {
        self.outbox.publisher.is_blocked()
    }
}
