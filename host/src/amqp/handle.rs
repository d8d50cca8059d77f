//! The handle to a running supervisor and the subscriptions it hands out:
//! the status, the publisher, declarations and subscriptions, each a
//! request to the supervisor or a read of the shared state.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, watch};

use super::consumer::{ConsumerState, Delivery, SubscriptionConfig, SubscriptionStatus};
use super::failure::AmqpError;
use super::publisher::Publisher;
use super::shared::{Command, Shared, SubEntry};
use super::status::AmqpStatus;
use super::topology::Topology;

/// A cheap clonable handle to a running supervisor.
#[derive(Clone)]
pub struct AmqpHandle {
    pub(super) shared: Arc<Shared>,
    pub(super) publisher: Publisher,
}

/// A subscription's delivery stream. Dropping it cancels the consumer.
pub struct Subscription {
    /// The queue.
    pub queue: String,
    /// Deliveries, in the order the broker sent them.
    pub deliveries: mpsc::Receiver<Delivery>,
}

impl Subscription {
    /// The next delivery; `None` once the subscription was removed.
    pub async fn next(&mut self) -> Option<Delivery> {
        self.deliveries.recv().await
    }
}

impl futures::Stream for Subscription {
    type Item = Delivery;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Delivery>> {
        self.deliveries.poll_recv(cx)
    }
}

impl AmqpHandle {
    /// The supervisor's status; `changed()` wakes on every transition.
    pub fn status(&self) -> watch::Receiver<AmqpStatus> {
        self.shared.status.subscribe()
    }

    /// The current status.
    pub fn status_now(&self) -> AmqpStatus {
        self.shared.status.borrow().clone()
    }

    /// The confirmed publisher (cheap clone).
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// What Warren declares for the destination `exchange` /
    /// `routing_key`, if it declares it: the queue `routing_key` of the
    /// default exchange, or the exchange with its bindings and the queues
    /// they bind, each with the bindings of its own. `None` for what
    /// nobody declared here.
    pub fn owned_destination(&self, exchange: &str, routing_key: &str) -> Option<Topology> {
        let all = self.shared.topology.snapshot();
        if exchange.is_empty() {
            return all
                .queues
                .contains_key(routing_key)
                .then(|| all.for_queue(routing_key));
        }
        let spec = all.exchanges.get(exchange)?.clone();
        let mut t = Topology::default().exchange(spec);
        let queues: Vec<String> = all
            .bindings
            .iter()
            .filter(|b| b.exchange == exchange)
            .map(|b| b.queue.clone())
            .collect();
        for q in queues {
            t = t.with_missing(all.for_queue(&q));
        }
        Some(t)
    }

    /// Add `t` to the registry and declare it on the live connection, if
    /// any.
    pub async fn declare(&self, t: Topology) -> Result<(), AmqpError> {
        let (done, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Declare(t, done))
            .map_err(|_| AmqpError::Stopped)?;
        rx.await.map_err(|_| AmqpError::Stopped)?
    }

    /// Start consuming `config.queue`; deliveries arrive on the returned
    /// [`Subscription`] and survive reconnects. The queue's declaration is
    /// taken from the topology registry (passively checked if absent).
    pub fn add_subscription(&self, config: SubscriptionConfig) -> Result<Subscription, AmqpError> {
        let queue = config.queue.clone();
        let (tx, rx) = mpsc::channel(config.buffer());
        {
            let mut subs = crate::sync::lock(&self.shared.subs);
            if subs.contains_key(&queue) {
                return Err(AmqpError::DuplicateSubscription(queue));
            }
            subs.insert(
                queue.clone(),
                SubEntry {
                    status: SubscriptionStatus::new(&queue, config.prefetch),
                    config,
                    tx,
                },
            );
        }
        if self
            .shared
            .commands
            .send(Command::Start(queue.clone()))
            .is_err()
        {
            self.shared.remove_sub(&queue);
            return Err(AmqpError::Stopped);
        }
        Ok(Subscription {
            queue,
            deliveries: rx,
        })
    }

    /// Cancel the subscription to `queue`: the broker stops delivering,
    /// in-flight deliveries may still be acked (up to the drain timeout),
    /// then its channel closes. Resolves when that is done.
    pub async fn remove_subscription(&self, queue: &str) -> Result<(), AmqpError> {
        if self.shared.sub(queue).is_none() {
            return Err(AmqpError::UnknownSubscription(queue.to_owned()));
        }
        let (done, rx) = oneshot::channel();
        self.shared
            .commands
            .send(Command::Stop(queue.to_owned(), done))
            .map_err(|_| AmqpError::Stopped)?;
        rx.await.map_err(|_| AmqpError::Stopped)
    }

    /// Status of every subscription: what Warren believes and the last
    /// broker-side consumer count.
    pub fn consumers(&self) -> Vec<SubscriptionStatus> {
        let subs = crate::sync::lock(&self.shared.subs);
        subs.values().map(|e| e.status.clone()).collect()
    }

    /// Ready to serve: the connection is running and every subscription
    /// has its consumer registered (for a readiness probe).
    pub fn is_ready(&self) -> bool {
        self.shared.status.borrow().is_running()
            && self
                .consumers()
                .iter()
                .all(|c| c.state == ConsumerState::Running && c.believed_consumers == 1)
    }

    /// Status of the subscription to `queue`.
    pub fn consumer(&self, queue: &str) -> Option<SubscriptionStatus> {
        let subs = crate::sync::lock(&self.shared.subs);
        subs.get(queue).map(|e| e.status.clone())
    }
}
