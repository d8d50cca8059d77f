//! One consumer on one channel (see [`Pump`]).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    AckCmd, BURST, ConsumerCtx, ConsumerState, ConsumerTask, Delivery, DeliveryAcker, End,
    SubscriptionConfig, stream_ended,
};
use crate::amqp::ack::{AckBook, AckFrame, Finish};
use crate::amqp::convert::from_basic_properties;
use crate::amqp::failure::{AmqpError, FailureClass, classify};
use crate::amqp::metrics;
use crate::amqp::topology;

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
pub(super) struct Pump<'a> {
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
    pub(super) fn new(
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

    pub(super) async fn run(mut self) -> End {
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
