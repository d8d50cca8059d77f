//! A delivery as the subscriber gets it, and the acker that settles it on
//! the channel it came from.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::amqp::ack::AckKind;
use crate::amqp::metrics;
use crate::message::MessageProperties;

/// One message from the broker, with everything a handler needs.
#[derive(Debug)]
pub struct Delivery {
    /// The body.
    pub body: Bytes,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// The queue it came from.
    pub queue: String,
    /// Its properties and headers.
    pub properties: MessageProperties,
    /// The broker delivered it before (possibly to someone else).
    pub redelivered: bool,
    /// The delivery tag on its channel.
    pub delivery_tag: u64,
    /// The session generation it arrived in.
    pub generation: u64,
    /// Settles the delivery.
    pub acker: DeliveryAcker,
}

/// What happened to an ack, nack or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Queued on the channel the delivery came from.
    Sent,
    /// The delivery's channel or session is gone; the broker will redeliver
    /// it. Counted, not an error.
    Stale,
}

pub(crate) struct AckCmd {
    pub(super) epoch: u64,
    pub(super) tag: u64,
    pub(super) kind: AckKind,
}

/// Settles one delivery; single use. Dropping it unsettled nacks the
/// delivery with requeue, so a lost delivery comes back.
#[derive(Debug)]
pub struct DeliveryAcker {
    pub(super) tx: mpsc::UnboundedSender<AckCmd>,
    pub(super) current: Arc<std::sync::atomic::AtomicU64>,
    pub(super) queue: Arc<str>,
    pub(super) epoch: u64,
    pub(super) tag: u64,
    pub(super) done: bool,
}

impl DeliveryAcker {
    /// Acknowledge: the message is done.
    pub fn ack(mut self) -> AckOutcome {
        self.send(AckKind::Ack)
    }

    /// Negative acknowledgement; `requeue = false` dead-letters (if the
    /// queue has a dead-letter exchange) or drops it.
    pub fn nack(mut self, requeue: bool) -> AckOutcome {
        self.send(AckKind::Nack { requeue })
    }

    /// Reject; like [`DeliveryAcker::nack`] for one message.
    pub fn reject(mut self, requeue: bool) -> AckOutcome {
        self.send(AckKind::Reject { requeue })
    }

    /// Whether the delivery's channel is still the live one.
    pub fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire) == self.epoch && !self.tx.is_closed()
    }

    fn send(&mut self, kind: AckKind) -> AckOutcome {
        self.done = true;
        if self.current.load(Ordering::Acquire) != self.epoch
            || self
                .tx
                .send(AckCmd {
                    epoch: self.epoch,
                    tag: self.tag,
                    kind,
                })
                .is_err()
        {
            metrics::stale_ack(&self.queue);
            debug!(queue = %self.queue, tag = self.tag, "Ack for a delivery of an older channel ignored; the broker redelivers it.");
            return AckOutcome::Stale;
        }
        AckOutcome::Sent
    }
}

impl Drop for DeliveryAcker {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.tx.send(AckCmd {
                epoch: self.epoch,
                tag: self.tag,
                kind: AckKind::Nack { requeue: true },
            });
        }
    }
}
