//! Consumers: one task and one channel per subscription per session.
//!
//! The task declares what its queue needs, sets the QoS, consumes with
//! manual ack and hands each delivery to the subscriber as a [`Delivery`]
//! with a [`DeliveryAcker`]. It owns the channel's [`AckBook`], so acks are
//! sent in order, coalesced when asked. A consumer whose stream ends, that
//! the broker cancels, whose channel closes, or that the periodic
//! broker-side check finds missing (a zombie) is re-established on the live
//! connection; only a connection-level failure is reported to the
//! supervisor. It does not retry or dead-letter anything itself.
//!
//! Files: this one (the task and subscribing), `pump` (one consumer on one
//! channel), `delivery` (what the subscriber gets and settles with),
//! `subscription` (its settings and status).

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::convert::short;
use super::failure::{AmqpError, Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::shared::Shared;
use super::topology;
use crate::backoff::{Backoff, BackoffConfig};
use pump::Pump;

mod delivery;
mod pump;
mod subscription;

pub(crate) use delivery::AckCmd;
pub use delivery::{AckOutcome, Delivery, DeliveryAcker};
pub use subscription::{ConsumerState, SubscriptionConfig, SubscriptionStatus};

pub(crate) struct ConsumerCtx {
    pub(crate) conn: Arc<Connection>,
    pub(crate) generation: u64,
    pub(crate) queue: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) stop: CancellationToken,
    pub(crate) abort: CancellationToken,
    pub(crate) failures: mpsc::UnboundedSender<Failure>,
    pub(crate) check_interval: Duration,
    pub(crate) flush_interval: Duration,
    pub(crate) drain_timeout: Duration,
    pub(crate) backoff: BackoffConfig,
}

/// Deliveries or ack commands handled per wake-up before yielding.
const BURST: usize = 64;

enum End {
    /// Stopped on request (or the subscriber went away); done.
    Stopped,
    /// The session is over.
    Aborted,
    /// The consumer is gone but the connection may be fine.
    Lost(String),
    /// The broker gave up waiting for an acknowledgement (its consumer
    /// timeout) and closed the channel or cancelled the consumer.
    TimedOut(String),
}

/// The consumer task; returns the queue name when it ends.
pub(crate) async fn run(ctx: ConsumerCtx) -> String {
    let mut task = ConsumerTask::new(ctx);
    while let Some((config, tx)) = task.wanted() {
        let epoch = task.starting();
        let (channel, consumer) = match task.subscribe(&config, epoch).await {
            Ok(subscribed) => subscribed,
            Err((e, conn_level)) => {
                if task.cannot_subscribe(e, conn_level).await.is_break() {
                    break;
                }
                continue;
            }
        };
        task.established(epoch);
        let end = task.pump(&config, &channel, consumer, &tx, epoch).await;
        if task.ended(end, &channel).await.is_break() {
            break;
        }
    }
    task.ctx.shared.update_sub(&task.queue, |s| {
        s.believed_consumers = 0;
        s.state = ConsumerState::Idle;
    });
    task.queue
}

/// What the consumer task carries from one channel to the next in its
/// session.
struct ConsumerTask {
    ctx: ConsumerCtx,
    queue: String,
    /// The epoch of the channel whose deliveries may be acked; 0 between
    /// channels.
    current: Arc<std::sync::atomic::AtomicU64>,
    /// Acks from the subscriber's [`DeliveryAcker`]s, across channels.
    ack_tx: mpsc::UnboundedSender<AckCmd>,
    ack_rx: mpsc::UnboundedReceiver<AckCmd>,
    backoff: Backoff,
    /// The last subscribe error logged, so a repeat is not logged again.
    logged: Option<String>,
    /// No consumer was established yet.
    first: bool,
}

impl ConsumerTask {
    fn new(ctx: ConsumerCtx) -> Self {
        let (ack_tx, ack_rx) = mpsc::unbounded_channel::<AckCmd>();
        Self {
            queue: ctx.queue.clone(),
            current: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            ack_tx,
            ack_rx,
            backoff: Backoff::new(ctx.backoff),
            logged: None,
            first: true,
            ctx,
        }
    }

    /// The subscription's settings and sender while it is still wanted:
    /// not stopped or aborted, still registered, its receiver still there.
    fn wanted(&self) -> Option<(SubscriptionConfig, mpsc::Sender<Delivery>)> {
        if self.ctx.stop.is_cancelled() || self.ctx.abort.is_cancelled() {
            return None;
        }
        let (config, tx) = self.ctx.shared.sub(&self.queue)?;
        if tx.is_closed() {
            return None;
        }
        Some((config, tx))
    }

    /// Publish a subscribe attempt; returns the epoch of its channel.
    fn starting(&self) -> u64 {
        let (first, generation) = (self.first, self.ctx.generation);
        self.ctx.shared.update_sub(&self.queue, |s| {
            s.state = if first {
                ConsumerState::Starting
            } else {
                ConsumerState::Reestablishing
            };
            s.generation = generation;
            s.believed_consumers = 0;
            s.subscribe_attempts += 1;
        });
        self.ctx.shared.epochs.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// [`subscribe`] within [`SUBSCRIBE_TIMEOUT`].
    async fn subscribe(
        &self,
        config: &SubscriptionConfig,
        epoch: u64,
    ) -> Result<(Channel, lapin::Consumer), (AmqpError, bool)> {
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(&self.ctx, config, epoch))
            .await
            .unwrap_or_else(|_| {
                // The channel's state is unknown (a late consume-ok would
                // start deliveries nobody takes): only a new session is
                // sure to close it.
                Err((
                    AmqpError::ChannelFailed {
                        op: "basic.consume",
                        class: FailureClass::Other,
                        message: format!(
                            "no answer within {SUBSCRIBE_TIMEOUT:?} (a queue that is not yet available)"
                        ),
                    },
                    true,
                ))
            })
    }

    /// A subscribe attempt failed. A connection-level failure is reported
    /// to the supervisor and ends the task; any other is logged (once while
    /// it repeats), published, and retried after the backoff.
    async fn cannot_subscribe(&mut self, e: AmqpError, conn_level: bool) -> ControlFlow<()> {
        if conn_level || !self.ctx.conn.status().connected() {
            let _ = self.ctx.failures.send(Failure::new(
                e.class(),
                e.to_string(),
                Some(self.ctx.generation),
            ));
            return ControlFlow::Break(());
        }
        let queue = &self.queue;
        let text = e.to_string();
        if self.logged.as_deref() != Some(text.as_str()) {
            if e.class().is_slow_retry() {
                error!(queue = %queue, class = %e.class(), error = %text, "Cannot subscribe; fix the declaration or the broker, retrying slowly.");
            } else {
                warn!(queue = %queue, class = %e.class(), error = %text, "Cannot subscribe; retrying.");
            }
            self.logged = Some(text.clone());
        }
        self.ctx.shared.update_sub(queue, |s| {
            s.state = ConsumerState::Failed;
            s.last_error = Some(text);
            s.last_error_class = Some(e.class());
        });
        let delay = if e.class().is_slow_retry() {
            self.backoff.slow_delay()
        } else {
            self.backoff.next_delay()
        };
        self.pause(delay).await
    }

    /// Wait `delay`; `Break` if the task is stopped or aborted meanwhile.
    async fn pause(&self, delay: Duration) -> ControlFlow<()> {
        tokio::select! {
            biased;
            _ = self.ctx.abort.cancelled() => ControlFlow::Break(()),
            _ = self.ctx.stop.cancelled() => ControlFlow::Break(()),
            _ = tokio::time::sleep(delay) => ControlFlow::Continue(()),
        }
    }

    /// The consumer is subscribed on the channel of `epoch`: its acks
    /// count from now on.
    fn established(&mut self, epoch: u64) {
        if !self.first {
            metrics::consumer_reestablished(&self.queue);
            info!(queue = %self.queue, generation = self.ctx.generation, "Consumer re-established.");
        }
        self.first = false;
        self.logged = None;
        self.current.store(epoch, Ordering::Release);
        self.ctx.shared.update_sub(&self.queue, |s| {
            s.state = ConsumerState::Running;
            s.believed_consumers = 1;
            s.last_error = None;
            s.last_error_class = None;
        });
    }

    /// Run the consumer on `channel` until it ends.
    async fn pump(
        &mut self,
        config: &SubscriptionConfig,
        channel: &Channel,
        consumer: lapin::Consumer,
        tx: &mpsc::Sender<Delivery>,
        epoch: u64,
    ) -> End {
        let end = Pump::new(self, config, channel, consumer, tx, epoch)
            .run()
            .await;
        self.ctx
            .shared
            .update_sub(&self.queue, |s| s.believed_consumers = 0);
        // Anything still held for this channel is now stale.
        self.current.store(0, Ordering::Release);
        end
    }

    /// The consumer on `channel` ended. Stopped: close the channel and
    /// end. Lost on a live connection: record why, close the channel and
    /// re-establish after the backoff (`Continue`).
    async fn ended(&mut self, end: End, channel: &Channel) -> ControlFlow<()> {
        match end {
            End::Stopped => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.close(200, "subscription stopped".into()),
                )
                .await;
                ControlFlow::Break(())
            }
            End::Aborted => ControlFlow::Break(()),
            End::Lost(_) | End::TimedOut(_) if !self.ctx.conn.status().connected() => {
                // The supervisor learns of this from the connection.
                ControlFlow::Break(())
            }
            End::Lost(why) => {
                self.record_loss(why, false);
                self.reestablish(channel).await
            }
            End::TimedOut(why) => {
                self.record_loss(why, true);
                self.reestablish(channel).await
            }
        }
    }

    /// Log and publish why the consumer was lost on a live connection.
    fn record_loss(&self, why: String, timed_out: bool) {
        let (queue, generation) = (&self.queue, self.ctx.generation);
        if timed_out {
            // Its deliveries are back in the queue; each return
            // counts toward the queue's delivery limit.
            error!(queue = %queue, generation, reason = %why, "The broker's consumer timeout expired: a delivery was held unacknowledged too long. Re-establishing the consumer; raise the queue's consumer timeout above the longest hold.");
            metrics::consumer_timeout(queue);
            self.ctx.shared.update_sub(queue, |s| {
                s.consumer_timeouts += 1;
                s.last_loss = Some(Failure::new(
                    FailureClass::ConsumerTimeout,
                    why,
                    Some(generation),
                ));
            });
        } else {
            warn!(queue = %queue, generation, reason = %why, "Consumer lost; re-establishing it on the live connection.");
            self.ctx.shared.update_sub(queue, |s| {
                s.last_loss = Some(Failure::new(FailureClass::Other, why, Some(generation)));
            });
        }
    }

    /// Close the lost consumer's channel and wait out the backoff before
    /// subscribing again.
    async fn reestablish(&mut self, channel: &Channel) -> ControlFlow<()> {
        self.ctx
            .shared
            .update_sub(&self.queue, |s| s.reestablished += 1);
        if channel.status().connected() {
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                channel.close(200, "re-establishing consumer".into()),
            )
            .await;
        }
        let delay = self.backoff.next_delay();
        self.pause(delay).await
    }
}

async fn subscribe(
    ctx: &ConsumerCtx,
    config: &SubscriptionConfig,
    epoch: u64,
) -> Result<(Channel, lapin::Consumer), (AmqpError, bool)> {
    let lapin_err = |op: &'static str, e: lapin::Error| {
        let conn = is_connection_level(&e)
            && !matches!(
                classify(&e),
                FailureClass::NotFound | FailureClass::PreconditionFailed
            );
        (AmqpError::channel(op, &e), conn)
    };
    let channel = ctx
        .conn
        .create_channel()
        .await
        .map_err(|e| lapin_err("channel.open", e))?;
    let needs = ctx.shared.topology.snapshot().for_queue(&config.queue);
    if let Err(e) =
        super::declare::within_declare_timeout(declare_own(ctx, &channel, &config.queue, &needs))
            .await
    {
        return Err((e, false));
    }
    channel
        .basic_qos(config.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| lapin_err("basic.qos", e))?;
    let tag = format!("warren.{}.{}.{}", config.queue, ctx.generation, epoch);
    let consumer = channel
        .basic_consume(
            short(&config.queue),
            short(&tag),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| lapin_err("basic.consume", e))?;
    Ok((channel, consumer))
}

/// Why a consumer's stream ended without an error. RabbitMQ 4.3+ sends
/// `basic.cancel` when a delivery outlives the consumer timeout (the channel
/// stays open); up to 4.2 it closes the channel with a 406 whose text names
/// the timeout. A cancel with deliveries still unacknowledged on an open
/// channel is taken as a consumer timeout: a queue deleted under Warren
/// also cancels, and is then found missing on re-subscribe.
fn stream_ended(channel: &Channel, outstanding: usize) -> End {
    if channel.status().connected() && outstanding > 0 {
        return End::TimedOut(format!(
            "the broker cancelled the consumer with {outstanding} deliveries unacknowledged (consumer timeout)"
        ));
    }
    End::Lost("consumer stream ended (cancelled by the broker or channel closed)".to_owned())
}

/// Declare what the subscription's queue needs (or check it exists, when
/// Warren does not declare it). A queue that exists with other settings is
/// consumed as it is, its differences recorded for `/status`.
async fn declare_own(
    ctx: &ConsumerCtx,
    channel: &Channel,
    queue: &str,
    needs: &topology::Topology,
) -> Result<(), AmqpError> {
    let Some(spec) = needs.queues.get(queue) else {
        return topology::inspect_queue(channel, queue).await.map(|_| ());
    };
    for e in needs.exchanges.values() {
        topology::declare_exchange(channel, e).await?;
    }
    let diffs =
        topology::declare_or_adopt_queue(|| super::declare::open_channel(&ctx.conn), spec).await?;
    ctx.shared.record_differences(queue, diffs);
    for b in &needs.bindings {
        topology::declare_binding(channel, b).await?;
    }
    Ok(())
}

/// How long subscribing (declarations, QoS, consume) may take. A quorum
/// queue on a node that just restarted can answer one `basic.consume` with
/// INTERNAL_ERROR and the next one never (RabbitMQ 3.10); without a limit
/// the consumer would wait forever while the connection looks healthy.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);
