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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::ack::{AckBook, AckFrame, AckKind, Finish};
use super::backoff::{Backoff, BackoffConfig};
use super::convert::{from_basic_properties, short};
use super::failure::{AmqpError, Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::supervisor::Shared;
use super::topology;
use crate::message::MessageProperties;

/// What to consume and how.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionConfig {
    /// The queue.
    pub queue: String,
    /// `basic.qos` prefetch count.
    pub prefetch: u16,
    /// Coalesce acks into `multiple = true` frames.
    pub coalesce_acks: bool,
}

impl SubscriptionConfig {
    /// Prefetch 100, coalesced acks.
    pub fn new(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            prefetch: 100,
            coalesce_acks: true,
        }
    }

    /// With prefetch `n`.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }

    /// With coalesced acks on or off.
    pub fn coalesce_acks(mut self, on: bool) -> Self {
        self.coalesce_acks = on;
        self
    }

    pub(crate) fn buffer(&self) -> usize {
        usize::from(self.prefetch.max(1)) * 2 + 16
    }
}

/// The state of one subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum ConsumerState {
    /// Not started yet (no session).
    Idle,
    /// Declaring and subscribing.
    Starting,
    /// Consuming.
    Running,
    /// Lost its consumer; being re-established.
    Reestablishing,
    /// Cannot subscribe; retrying (see `last_error`).
    Failed,
    /// Stopping (in-flight deliveries finishing).
    Stopping,
}

/// What Warren knows about one subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionStatus {
    /// The queue.
    pub queue: String,
    /// Prefetch.
    pub prefetch: u16,
    /// The state.
    pub state: ConsumerState,
    /// Consumers Warren believes it has on the queue (0 or 1).
    pub believed_consumers: u32,
    /// The broker's consumer count at the last check, and when.
    pub broker_consumers: Option<(u32, SystemTime)>,
    /// The broker's message count at the last check.
    pub broker_messages: Option<u32>,
    /// The generation of the session the consumer runs in.
    pub generation: u64,
    /// Times the consumer was re-established without a reconnect.
    pub reestablished: u64,
    /// Times the periodic check found the consumer missing on the broker.
    pub zombies: u64,
    /// Periodic checks that got no answer in time (a congested link or a
    /// stuck channel; several in a row re-establish the consumer).
    pub check_timeouts: u64,
    /// Subscribe attempts (declare + consume) since start.
    pub subscribe_attempts: u64,
    /// The last subscribe error, cleared when running again.
    pub last_error: Option<String>,
    /// Its class.
    pub last_error_class: Option<FailureClass>,
    /// Acks for deliveries of an older channel or session (no-ops).
    pub stale_acks: u64,
    /// Times the broker's consumer timeout ended the consumer.
    pub consumer_timeouts: u64,
    /// Why the consumer was last lost on a live connection (kept after it
    /// is re-established).
    pub last_loss: Option<Failure>,
}

impl SubscriptionStatus {
    pub(crate) fn new(queue: &str, prefetch: u16) -> Self {
        Self {
            queue: queue.to_owned(),
            prefetch,
            state: ConsumerState::Idle,
            believed_consumers: 0,
            broker_consumers: None,
            broker_messages: None,
            generation: 0,
            reestablished: 0,
            zombies: 0,
            check_timeouts: 0,
            subscribe_attempts: 0,
            last_error: None,
            last_error_class: None,
            stale_acks: 0,
            consumer_timeouts: 0,
            last_loss: None,
        }
    }
}

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
    epoch: u64,
    tag: u64,
    kind: AckKind,
}

/// Settles one delivery; single use. Dropping it unsettled nacks the
/// delivery with requeue, so a lost delivery comes back.
#[derive(Debug)]
pub struct DeliveryAcker {
    tx: mpsc::UnboundedSender<AckCmd>,
    current: Arc<std::sync::atomic::AtomicU64>,
    queue: Arc<str>,
    epoch: u64,
    tag: u64,
    done: bool,
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
    let queue = ctx.queue.clone();
    let current = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<AckCmd>();
    let mut backoff = Backoff::new(ctx.backoff);
    let mut logged: Option<String> = None;
    let mut first = true;
    loop {
        if ctx.stop.is_cancelled() || ctx.abort.is_cancelled() {
            break;
        }
        let Some((config, tx)) = ctx.shared.sub(&queue) else {
            break;
        };
        if tx.is_closed() {
            break;
        }
        ctx.shared.update_sub(&queue, |s| {
            s.state = if first {
                ConsumerState::Starting
            } else {
                ConsumerState::Reestablishing
            };
            s.generation = ctx.generation;
            s.believed_consumers = 0;
            s.subscribe_attempts += 1;
        });
        let epoch = ctx.shared.epochs.fetch_add(1, Ordering::AcqRel) + 1;
        let subscribed = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe(&ctx, &config, epoch))
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
            });
        let (channel, lapin_consumer) = match subscribed {
            Ok(ok) => ok,
            Err((e, conn_level)) => {
                if conn_level || !ctx.conn.status().connected() {
                    let _ = ctx.failures.send(Failure::new(
                        e.class(),
                        e.to_string(),
                        Some(ctx.generation),
                    ));
                    break;
                }
                let text = e.to_string();
                if logged.as_deref() != Some(text.as_str()) {
                    if e.class().is_slow_retry() {
                        error!(queue = %queue, class = %e.class(), error = %text, "Cannot subscribe; fix the declaration or the broker, retrying slowly.");
                    } else {
                        warn!(queue = %queue, class = %e.class(), error = %text, "Cannot subscribe; retrying.");
                    }
                    logged = Some(text.clone());
                }
                ctx.shared.update_sub(&queue, |s| {
                    s.state = ConsumerState::Failed;
                    s.last_error = Some(text);
                    s.last_error_class = Some(e.class());
                });
                let delay = if e.class().is_slow_retry() {
                    backoff.slow_delay()
                } else {
                    backoff.next_delay()
                };
                tokio::select! {
                    biased;
                    _ = ctx.abort.cancelled() => break,
                    _ = ctx.stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => continue,
                }
            }
        };
        if !first {
            metrics::consumer_reestablished(&queue);
            info!(queue = %queue, generation = ctx.generation, "Consumer re-established.");
        }
        first = false;
        logged = None;
        current.store(epoch, Ordering::Release);
        ctx.shared.update_sub(&queue, |s| {
            s.state = ConsumerState::Running;
            s.believed_consumers = 1;
            s.last_error = None;
            s.last_error_class = None;
        });
        let end = pump(
            &ctx,
            &config,
            &channel,
            lapin_consumer,
            &tx,
            &ack_tx,
            &mut ack_rx,
            &current,
            epoch,
        )
        .await;
        ctx.shared.update_sub(&queue, |s| s.believed_consumers = 0);
        // Anything still held for this channel is now stale.
        current.store(0, Ordering::Release);
        match end {
            End::Stopped => {
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.close(200, "subscription stopped".into()),
                )
                .await;
                break;
            }
            End::Aborted => break,
            End::Lost(ref why) | End::TimedOut(ref why) => {
                if !ctx.conn.status().connected() {
                    // The supervisor learns of this from the connection.
                    break;
                }
                if matches!(end, End::TimedOut(_)) {
                    // Its deliveries are back in the queue; each return
                    // counts toward the queue's delivery limit.
                    error!(queue = %queue, generation = ctx.generation, reason = %why, "The broker's consumer timeout expired: a delivery was held unacknowledged too long. Re-establishing the consumer; raise the queue's consumer timeout above the longest hold.");
                    metrics::consumer_timeout(&queue);
                    ctx.shared.update_sub(&queue, |s| {
                        s.consumer_timeouts += 1;
                        s.last_loss = Some(Failure::new(
                            FailureClass::ConsumerTimeout,
                            why.clone(),
                            Some(ctx.generation),
                        ));
                    });
                } else {
                    warn!(queue = %queue, generation = ctx.generation, reason = %why, "Consumer lost; re-establishing it on the live connection.");
                    ctx.shared.update_sub(&queue, |s| {
                        s.last_loss = Some(Failure::new(
                            FailureClass::Other,
                            why.clone(),
                            Some(ctx.generation),
                        ));
                    });
                }
                ctx.shared.update_sub(&queue, |s| s.reestablished += 1);
                if channel.status().connected() {
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        channel.close(200, "re-establishing consumer".into()),
                    )
                    .await;
                }
                let delay = backoff.next_delay();
                tokio::select! {
                    biased;
                    _ = ctx.abort.cancelled() => break,
                    _ = ctx.stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    ctx.shared.update_sub(&queue, |s| {
        s.believed_consumers = 0;
        s.state = ConsumerState::Idle;
    });
    queue
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
        super::supervisor::within_declare_timeout(declare_own(ctx, &channel, &config.queue, &needs))
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
        topology::declare_or_adopt_queue(|| super::supervisor::open_channel(&ctx.conn), spec)
            .await?;
    ctx.shared.record_differences(queue, diffs);
    for b in &needs.bindings {
        topology::declare_binding(channel, b).await?;
    }
    Ok(())
}

/// How long subscribing (declarations, QoS, consume) may take. A quorum
/// queue on a node that just restarted answered one `basic.consume` with
/// INTERNAL_ERROR and the next one never (RabbitMQ 3.10): without a limit
/// the consumer waited forever while the connection looked healthy.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a broker-side consumer check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Unanswered checks in a row that make the consumer count as lost. One is
/// not enough: the check's passive declare queues behind whatever the
/// connection is sending, and behind a full publish window to a slow broker
/// it can take longer than [`CHECK_TIMEOUT`]. Re-establishing the consumer
/// then would only requeue its deliveries onto the already slow broker. A
/// dead connection is the heartbeat's to find, a cancelled consumer the
/// answered check's (0 consumers).
const CHECK_STRIKES: u32 = 3;

/// A broker-side consumer check in flight: consumers and messages, or why
/// it failed or timed out.
type Check = futures::future::BoxFuture<
    'static,
    Result<Result<(u32, u32), AmqpError>, tokio::time::error::Elapsed>,
>;

#[allow(clippy::too_many_arguments)]
async fn pump(
    ctx: &ConsumerCtx,
    config: &SubscriptionConfig,
    channel: &Channel,
    mut consumer: lapin::Consumer,
    tx: &mpsc::Sender<Delivery>,
    ack_tx: &mpsc::UnboundedSender<AckCmd>,
    ack_rx: &mut mpsc::UnboundedReceiver<AckCmd>,
    current: &Arc<std::sync::atomic::AtomicU64>,
    epoch: u64,
) -> End {
    let queue = config.queue.as_str();
    let queue_arc: Arc<str> = Arc::from(queue);
    let mut book = AckBook::new(config.coalesce_acks);
    let batch = usize::from(config.prefetch / 4).clamp(1, 256);
    let mut flush = tokio::time::interval(ctx.flush_interval);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut check = tokio::time::interval_at(
        tokio::time::Instant::now() + ctx.check_interval,
        ctx.check_interval,
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checking: Option<Check> = None;
    // Checks in a row that got no answer in time (see CHECK_STRIKES).
    let mut unanswered = 0u32;
    let mut stopping: Option<tokio::time::Instant> = None;
    let consumer_tag = consumer.tag();
    let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);

    let send = |frame: AckFrame| {
        // Polled once: the frame is queued in order on the channel; the
        // promise (written to the socket) is not awaited.
        let res = match frame {
            AckFrame::Ack { tag, multiple } => channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .now_or_never(),
            AckFrame::Nack { tag, requeue } => channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue,
                    },
                )
                .now_or_never(),
            AckFrame::Reject { tag, requeue } => channel
                .basic_reject(tag, BasicRejectOptions { requeue })
                .now_or_never(),
        };
        if let Some(Err(e)) = res {
            debug!(queue, error = %e, "Ack not sent; the channel is gone and the broker redelivers.");
        }
    };

    let end = loop {
        tokio::select! {
            biased;
            _ = ctx.abort.cancelled() => break End::Aborted,
            _ = ctx.stop.cancelled(), if stopping.is_none() => {
                ctx.shared.update_sub(queue, |s| s.state = ConsumerState::Stopping);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    channel.basic_cancel(consumer_tag.clone(), BasicCancelOptions::default()),
                ).await;
                stopping = Some(tokio::time::Instant::now() + ctx.drain_timeout);
                if book.outstanding() == 0 {
                    break End::Stopped;
                }
            }
            _ = tokio::time::sleep_until(stopping.unwrap_or(far)), if stopping.is_some() => {
                warn!(queue, outstanding = book.outstanding(), "Drain timeout; unfinished deliveries will be redelivered.");
                break End::Stopped;
            }
            // Cancel-safe: a command taken here is handled before the next
            // select. Everything already queued is handled in one go.
            Some(cmd) = ack_rx.recv() => {
                let now = Instant::now();
                let mut next = Some(cmd);
                let mut handled = 0;
                while let Some(cmd) = next.take() {
                    if cmd.epoch != epoch {
                        metrics::stale_ack(queue);
                        ctx.shared.update_sub(queue, |s| s.stale_acks += 1);
                    } else {
                        match book.finish(cmd.tag, cmd.kind, now) {
                            Finish::Send(frame) => send(frame),
                            Finish::Held if book.held() >= batch => {
                                for f in book.flush(now, ctx.flush_interval) { send(f); }
                            }
                            Finish::Held | Finish::Unknown => {}
                        }
                    }
                    handled += 1;
                    if handled < BURST {
                        next = ack_rx.try_recv().ok();
                    }
                }
                if stopping.is_some() && book.outstanding() == 0 {
                    break End::Stopped;
                }
            }
            _ = flush.tick(), if book.held() > 0 => {
                for f in book.flush(Instant::now(), ctx.flush_interval * 4) { send(f); }
            }
            first = consumer.next(), if stopping.is_none() => {
                // Hand over everything already buffered, up to a burst.
                let mut next = Some(first);
                let mut handled = 0;
                let mut end = None;
                while let Some(item) = next.take() {
                    let d = match item {
                        Some(Ok(d)) => d,
                        Some(Err(e)) => {
                            let class = classify(&e);
                            let why = format!("consumer error ({class}): {e}");
                            end = Some(if class == FailureClass::ConsumerTimeout { End::TimedOut(why) } else { End::Lost(why) });
                            break;
                        }
                        None => {
                            end = Some(stream_ended(channel, book.outstanding()));
                            break;
                        }
                    };
                    book.delivered(d.delivery_tag);
                    let delivery = Delivery {
                        body: Bytes::from(d.data),
                        exchange: d.exchange.as_str().to_owned(),
                        routing_key: d.routing_key.as_str().to_owned(),
                        queue: queue.to_owned(),
                        properties: from_basic_properties(&d.properties),
                        redelivered: d.redelivered,
                        delivery_tag: d.delivery_tag,
                        generation: ctx.generation,
                        acker: DeliveryAcker {
                            tx: ack_tx.clone(),
                            current: current.clone(),
                            queue: queue_arc.clone(),
                            epoch,
                            tag: d.delivery_tag,
                            done: false,
                        },
                    };
                    match tx.try_send(delivery) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(delivery)) => {
                            // Cancel-safe enough: on abort the delivery is
                            // dropped and the broker redelivers it.
                            tokio::select! {
                                biased;
                                _ = ctx.abort.cancelled() => { end = Some(End::Aborted); break; }
                                r = tx.send(delivery) => if r.is_err() { end = Some(End::Stopped); break; },
                            }
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            info!(queue, "Subscriber went away; cancelling the consumer.");
                            end = Some(End::Stopped);
                            break;
                        }
                    }
                    handled += 1;
                    if handled < BURST {
                        next = consumer.next().now_or_never();
                    }
                }
                if let Some(end) = end {
                    break end;
                }
            }
            // The broker-side check runs beside the pump, not inline: a
            // passive declare of a busy quorum queue can take tens of ms,
            // and deliveries and acks must keep flowing meanwhile.
            _ = check.tick(), if checking.is_none() => {
                let (ch, q) = (channel.clone(), queue.to_owned());
                checking = Some(Box::pin(async move {
                    tokio::time::timeout(CHECK_TIMEOUT, topology::inspect_queue(&ch, &q)).await
                }));
            }
            r = async {
                match checking.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if checking.is_some() => {
                checking = None;
                match r {
                    Ok(Ok((consumers, messages))) => {
                        unanswered = 0;
                        ctx.shared.update_sub(queue, |s| {
                            s.broker_consumers = Some((consumers, SystemTime::now()));
                            s.broker_messages = Some(messages);
                        });
                        if consumers == 0 {
                            metrics::zombie(queue);
                            ctx.shared.update_sub(queue, |s| s.zombies += 1);
                            break End::Lost("broker reports no consumer on the queue (zombie)".to_owned());
                        }
                    }
                    Ok(Err(e)) => break End::Lost(format!("consumer check failed: {e}")),
                    Err(_) => {
                        unanswered += 1;
                        ctx.shared.update_sub(queue, |s| s.check_timeouts += 1);
                        if unanswered >= CHECK_STRIKES {
                            break End::Lost(format!(
                                "{unanswered} consumer checks in a row got no answer within {CHECK_TIMEOUT:?}"
                            ));
                        }
                        warn!(queue, unanswered, "Consumer check got no answer in time; the link may be congested, checking again.");
                    }
                }
            }
        }
    };
    // Send what is finished before the channel goes.
    if channel.status().connected() {
        for f in book.flush(Instant::now(), Duration::ZERO) {
            send(f);
        }
    }
    end
}
