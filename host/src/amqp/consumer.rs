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

use std::ops::ControlFlow;
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
use super::convert::{from_basic_properties, short};
use super::failure::{AmqpError, Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::supervisor::Shared;
use super::topology;
use crate::backoff::{Backoff, BackoffConfig};
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
    /// Deliveries to this consumer not yet acknowledged (unacked at the
    /// broker on its behalf), at the last check.
    pub unacked: Option<u32>,
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
            unacked: None,
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
/// queue on a node that just restarted can answer one `basic.consume` with
/// INTERNAL_ERROR and the next one never (RabbitMQ 3.10); without a limit
/// the consumer would wait forever while the connection looks healthy.
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

/// What a broker-side consumer check answers: consumers and messages, or
/// why it failed or timed out.
type CheckOutcome = Result<Result<(u32, u32), AmqpError>, tokio::time::error::Elapsed>;

/// A broker-side consumer check in flight.
type Check = futures::future::BoxFuture<'static, CheckOutcome>;

/// The check in flight. A select! branch builds its future even while the
/// branch is disabled, so with none in flight this never resolves.
async fn answer(checking: &mut Option<Check>) -> CheckOutcome {
    match checking.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// One consumer on one channel: hands deliveries to the subscriber and
/// sends their acks in order until the consumer ends. The loop in
/// [`Pump::run`] handles each event in a method of its own.
struct Pump<'a> {
    ctx: &'a ConsumerCtx,
    queue: &'a str,
    /// The queue again, for each delivery's acker.
    queue_arc: Arc<str>,
    channel: &'a Channel,
    consumer: lapin::Consumer,
    consumer_tag: lapin::types::ShortString,
    /// The epoch of this channel; an ack of another one is stale.
    epoch: u64,
    /// Where deliveries go.
    tx: &'a mpsc::Sender<Delivery>,
    ack_tx: &'a mpsc::UnboundedSender<AckCmd>,
    ack_rx: &'a mut mpsc::UnboundedReceiver<AckCmd>,
    current: &'a Arc<std::sync::atomic::AtomicU64>,
    book: AckBook,
    /// How many held acks are sent at once, without waiting for the flush.
    batch: usize,
    flush: tokio::time::Interval,
    check: tokio::time::Interval,
    checking: Option<Check>,
    /// Checks in a row that got no answer in time (see CHECK_STRIKES).
    unanswered: u32,
    /// Once stopping: when the drain gives up.
    stopping: Option<tokio::time::Instant>,
    /// The drain deadline's stand-in while not stopping.
    far: tokio::time::Instant,
}

impl<'a> Pump<'a> {
    fn new(
        task: &'a mut ConsumerTask,
        config: &'a SubscriptionConfig,
        channel: &'a Channel,
        consumer: lapin::Consumer,
        tx: &'a mpsc::Sender<Delivery>,
        epoch: u64,
    ) -> Self {
        let ctx = &task.ctx;
        let mut flush = tokio::time::interval(ctx.flush_interval);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval_at(
            tokio::time::Instant::now() + ctx.check_interval,
            ctx.check_interval,
        );
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Pump {
            ctx,
            queue: config.queue.as_str(),
            queue_arc: Arc::from(config.queue.as_str()),
            channel,
            consumer_tag: consumer.tag(),
            consumer,
            epoch,
            tx,
            ack_tx: &task.ack_tx,
            ack_rx: &mut task.ack_rx,
            current: &task.current,
            book: AckBook::new(config.coalesce_acks),
            batch: usize::from(config.prefetch / 4).clamp(1, 256),
            flush,
            check,
            checking: None,
            unanswered: 0,
            stopping: None,
            far: tokio::time::Instant::now() + Duration::from_secs(86_400 * 365),
        }
    }

    async fn run(mut self) -> End {
        let end = loop {
            tokio::select! {
                biased;
                _ = self.ctx.abort.cancelled() => break End::Aborted,
                _ = self.ctx.stop.cancelled(), if self.stopping.is_none() => {
                    if let Some(end) = self.stop().await {
                        break end;
                    }
                }
                _ = tokio::time::sleep_until(self.stopping.unwrap_or(self.far)), if self.stopping.is_some() => {
                    warn!(queue = self.queue, outstanding = self.book.outstanding(), "Drain timeout; unfinished deliveries will be redelivered.");
                    break End::Stopped;
                }
                // Cancel-safe: a command taken here is handled before the next
                // select. Everything already queued is handled in one go.
                Some(cmd) = self.ack_rx.recv() => {
                    if let Some(end) = self.acks(cmd) {
                        break end;
                    }
                }
                _ = self.flush.tick(), if self.book.held() > 0 => self.flush_held(),
                first = self.consumer.next(), if self.stopping.is_none() => {
                    if let Some(end) = self.deliveries(first).await {
                        break end;
                    }
                }
                // The broker-side check runs beside the pump, not inline: a
                // passive declare of a busy quorum queue can take tens of ms,
                // and deliveries and acks must keep flowing meanwhile.
                _ = self.check.tick(), if self.checking.is_none() => self.start_check(),
                r = answer(&mut self.checking), if self.checking.is_some() => {
                    if let Some(end) = self.checked(r) {
                        break end;
                    }
                }
            }
        };
        // Send what is finished before the channel goes.
        if self.channel.status().connected() {
            for f in self.book.flush(Instant::now(), Duration::ZERO) {
                self.send(f);
            }
        }
        end
    }

    /// Stop requested: cancel the consumer and drain what is outstanding
    /// (done at once when nothing is).
    async fn stop(&mut self) -> Option<End> {
        self.ctx
            .shared
            .update_sub(self.queue, |s| s.state = ConsumerState::Stopping);
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.channel
                .basic_cancel(self.consumer_tag.clone(), BasicCancelOptions::default()),
        )
        .await;
        self.stopping = Some(tokio::time::Instant::now() + self.ctx.drain_timeout);
        (self.book.outstanding() == 0).then_some(End::Stopped)
    }

    /// Settle `cmd` and what else is queued, up to a burst. While
    /// stopping, the last outstanding one ends the pump.
    fn acks(&mut self, cmd: AckCmd) -> Option<End> {
        let now = Instant::now();
        let mut next = Some(cmd);
        let mut handled = 0;
        while let Some(cmd) = next.take() {
            self.settle(cmd, now);
            handled += 1;
            if handled < BURST {
                next = self.ack_rx.try_recv().ok();
            }
        }
        (self.stopping.is_some() && self.book.outstanding() == 0).then_some(End::Stopped)
    }

    /// One ack, nack or reject: sent, or held to coalesce (sent once a
    /// batch is held), or counted as stale.
    fn settle(&mut self, cmd: AckCmd, now: Instant) {
        if cmd.epoch != self.epoch {
            metrics::stale_ack(self.queue);
            self.ctx
                .shared
                .update_sub(self.queue, |s| s.stale_acks += 1);
            return;
        }
        match self.book.finish(cmd.tag, cmd.kind, now) {
            Finish::Send(frame) => self.send(frame),
            Finish::Held if self.book.held() >= self.batch => {
                for f in self.book.flush(now, self.ctx.flush_interval) {
                    self.send(f);
                }
            }
            Finish::Held | Finish::Unknown => {}
        }
    }

    /// Send the held acks that waited long enough.
    fn flush_held(&mut self) {
        for f in self.book.flush(Instant::now(), self.ctx.flush_interval * 4) {
            self.send(f);
        }
    }

    fn send(&self, frame: AckFrame) {
        // Polled once: the frame is queued in order on the channel; the
        // promise (written to the socket) is not awaited.
        let res = match frame {
            AckFrame::Ack { tag, multiple } => self
                .channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .now_or_never(),
            AckFrame::Nack { tag, requeue } => self
                .channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue,
                    },
                )
                .now_or_never(),
            AckFrame::Reject { tag, requeue } => self
                .channel
                .basic_reject(tag, BasicRejectOptions { requeue })
                .now_or_never(),
        };
        if let Some(Err(e)) = res {
            debug!(queue = self.queue, error = %e, "Ack not sent; the channel is gone and the broker redelivers.");
        }
    }

    /// Deliveries from the broker: `first`, then everything already
    /// buffered, up to a burst. An error or the stream's end ends the pump.
    async fn deliveries(
        &mut self,
        first: Option<lapin::Result<lapin::message::Delivery>>,
    ) -> Option<End> {
        // Hand over everything already buffered, up to a burst.
        let mut next = Some(first);
        let mut handled = 0;
        while let Some(item) = next.take() {
            let d = match item {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    let class = classify(&e);
                    let why = format!("consumer error ({class}): {e}");
                    return Some(if class == FailureClass::ConsumerTimeout {
                        End::TimedOut(why)
                    } else {
                        End::Lost(why)
                    });
                }
                None => return Some(stream_ended(self.channel, self.book.outstanding())),
            };
            self.book.delivered(d.delivery_tag);
            let delivery = self.delivery(d);
            if let Some(end) = self.hand_over(delivery).await {
                return Some(end);
            }
            handled += 1;
            if handled < BURST {
                next = self.consumer.next().now_or_never();
            }
        }
        None
    }

    /// `d` as the subscriber gets it, with its acker.
    fn delivery(&self, d: lapin::message::Delivery) -> Delivery {
        Delivery {
            body: Bytes::from(d.data),
            exchange: d.exchange.as_str().to_owned(),
            routing_key: d.routing_key.as_str().to_owned(),
            queue: self.queue.to_owned(),
            properties: from_basic_properties(&d.properties),
            redelivered: d.redelivered,
            delivery_tag: d.delivery_tag,
            generation: self.ctx.generation,
            acker: DeliveryAcker {
                tx: self.ack_tx.clone(),
                current: self.current.clone(),
                queue: self.queue_arc.clone(),
                epoch: self.epoch,
                tag: d.delivery_tag,
                done: false,
            },
        }
    }

    /// Give `delivery` to the subscriber, waiting while its buffer is
    /// full. The subscriber gone, or the session aborted, ends the pump.
    async fn hand_over(&mut self, delivery: Delivery) -> Option<End> {
        match self.tx.try_send(delivery) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(delivery)) => {
                // Cancel-safe enough: on abort the delivery is
                // dropped and the broker redelivers it.
                tokio::select! {
                    biased;
                    _ = self.ctx.abort.cancelled() => Some(End::Aborted),
                    r = self.tx.send(delivery) => r.is_err().then_some(End::Stopped),
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                info!(
                    queue = self.queue,
                    "Subscriber went away; cancelling the consumer."
                );
                Some(End::Stopped)
            }
        }
    }

    /// Start a broker-side check of the consumer.
    fn start_check(&mut self) {
        let (ch, q) = (self.channel.clone(), self.queue.to_owned());
        self.checking = Some(Box::pin(async move {
            tokio::time::timeout(CHECK_TIMEOUT, topology::inspect_queue(&ch, &q)).await
        }));
    }

    /// The check's answer. No consumer on the broker (a zombie), a failed
    /// check, or [`CHECK_STRIKES`] unanswered ones in a row end the pump.
    fn checked(&mut self, r: CheckOutcome) -> Option<End> {
        self.checking = None;
        let queue = self.queue;
        match r {
            Ok(Ok((consumers, messages))) => {
                self.unanswered = 0;
                let unacked = u32::try_from(self.book.outstanding()).unwrap_or(u32::MAX);
                self.ctx.shared.update_sub(queue, |s| {
                    s.broker_consumers = Some((consumers, SystemTime::now()));
                    s.broker_messages = Some(messages);
                    s.unacked = Some(unacked);
                });
                if consumers == 0 {
                    metrics::zombie(queue);
                    self.ctx.shared.update_sub(queue, |s| s.zombies += 1);
                    return Some(End::Lost(
                        "broker reports no consumer on the queue (zombie)".to_owned(),
                    ));
                }
            }
            Ok(Err(e)) => return Some(End::Lost(format!("consumer check failed: {e}"))),
            Err(_) => {
                self.unanswered += 1;
                let unanswered = self.unanswered;
                self.ctx.shared.update_sub(queue, |s| s.check_timeouts += 1);
                if unanswered >= CHECK_STRIKES {
                    return Some(End::Lost(format!(
                        "{unanswered} consumer checks in a row got no answer within {CHECK_TIMEOUT:?}"
                    )));
                }
                warn!(
                    queue,
                    unanswered,
                    "Consumer check got no answer in time; the link may be congested, checking again."
                );
            }
        }
        None
    }
}
