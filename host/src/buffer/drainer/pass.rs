//! One drain pass: reads, publishes and deletes in flight together, one
//! method per event (see [`DrainPass`]).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::record::DrainerState;
use super::stream::{DeleteFailed, DeleteResult, Entry, ReadResult, delete_entries, read_entries};
use super::{DrainPublisher, Drainer, Lease, Stop};
use crate::buffer::error::RedisFailure;
use crate::message::OutboundMessage;

type ConfirmFuture<E> = Pin<Box<dyn Future<Output = (Entry, Result<(), E>)> + Send>>;

/// A pass's publishes awaiting their confirm, the confirmed prefix not yet
/// deleted, and the delete in flight.
pub(super) struct Pass<E> {
    pub(super) inflight: FuturesOrdered<ConfirmFuture<E>>,
    pub(super) confirmed: Vec<Entry>,
    pub(super) deleting: Option<BoxFuture<'static, DeleteResult>>,
}

/// What ending a pass does with the publishes still in flight.
pub(super) enum Settle {
    /// Await their confirms (no more sends) while they keep coming.
    Collect,
    /// Give them up: this many may have been routed and come again.
    Abandon(usize),
    /// Drop them (cancelled): they stay in the stream, republished later.
    Drop,
}

/// Await an optional future; pending forever when there is none (the
/// `select!` branch is disabled then anyway).
async fn poll_opt<T>(f: &mut Option<BoxFuture<'static, T>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// How an event ends a pass: why, and what becomes of the publishes still
/// in flight (see [`Drainer::finish`]).
type End = (Stop, Settle);

/// A Redis failure mid-pass: stop sending, collect the confirms in flight.
fn redis_end(failure: RedisFailure) -> End {
    (Stop::Redis(failure), Settle::Collect)
}

/// One drain pass (see [`Drainer::drain_pass`]) and its state. Each turn
/// of the loop starts a read if the queue runs low, fills the window,
/// starts a delete of the confirmed prefix, then waits for one event: one
/// method per `select!` arm. An event that ends the pass returns the
/// [`End`], and [`Drainer::finish`] settles it.
pub(super) struct DrainPass<'a, P: DrainPublisher> {
    drainer: &'a mut Drainer<P>,
    cancel: &'a CancellationToken,
    lease: &'a mut Lease,
    /// Publishes awaiting their confirm, the confirmed prefix, the delete.
    pass: Pass<P::Error>,
    /// Entries read and not yet sent, in stream order.
    queue: VecDeque<(Entry, Result<OutboundMessage, String>)>,
    /// The `XRANGE` in flight, at most one.
    reading: Option<BoxFuture<'static, ReadResult>>,
    /// The last stream id read; the next read starts after it.
    last_read: Option<String>,
    /// A read returned less than a batch: the stream has no more for now.
    at_end: bool,
    /// Something was sent: the drainer shows as draining.
    sent_any: bool,
    stall: Duration,
    /// The last send or confirm; a stall is measured from it. Progress only
    /// stores the time: the timer is moved when it fires early, not re-armed
    /// on every confirm.
    progress_at: Instant,
    stall_timer: Pin<Box<tokio::time::Sleep>>,
}

impl<'a, P: DrainPublisher> DrainPass<'a, P> {
    pub(super) fn new(
        drainer: &'a mut Drainer<P>,
        cancel: &'a CancellationToken,
        lease: &'a mut Lease,
    ) -> Self {
        let stall = Duration::from_millis(drainer.cfg.stall_timeout_ms);
        DrainPass {
            drainer,
            cancel,
            lease,
            pass: Pass {
                inflight: FuturesOrdered::new(),
                confirmed: Vec::new(),
                deleting: None,
            },
            queue: VecDeque::new(),
            reading: None,
            last_read: None,
            at_end: false,
            sent_any: false,
            stall,
            progress_at: Instant::now(),
            stall_timer: Box::pin(tokio::time::sleep(stall)),
        }
    }

    /// Turn until the stream is drained or an event ends the pass.
    pub(super) async fn run(mut self) -> Stop {
        let (stop, settle) = loop {
            self.start_read();
            if let Err(end) = self.fill_window().await {
                break end;
            }
            self.start_delete();
            if self.is_done() {
                return if self.cancel.is_cancelled() {
                    Stop::Cancelled
                } else {
                    Stop::Idle
                };
            }
            if let Err(end) = self.next_event().await {
                break end;
            }
        };
        self.drainer.finish(stop, self.pass, settle).await
    }

    /// Nothing queued, read, sent or deleted is outstanding (and a read
    /// would have started if the stream had more).
    fn is_done(&self) -> bool {
        self.pass.inflight.is_empty()
            && self.queue.is_empty()
            && self.reading.is_none()
            && self.pass.deleting.is_none()
    }

    /// Read the next page when the queue is below a batch.
    fn start_read(&mut self) {
        let batch = self.drainer.cfg.batch;
        if self.reading.is_none() && !self.at_end && self.queue.len() < batch {
            self.reading = Some(Box::pin(read_entries(
                self.drainer.shared.clone(),
                self.last_read.clone(),
                batch,
            )));
        }
    }

    /// Delete the confirmed prefix, one delete at a time.
    fn start_delete(&mut self) {
        if self.pass.deleting.is_none() && !self.pass.confirmed.is_empty() {
            self.pass.deleting = Some(Box::pin(delete_entries(
                self.drainer.shared.clone(),
                std::mem::take(&mut self.pass.confirmed),
            )));
        }
    }

    /// Send queued entries until the window is full, in stream order,
    /// checking the lease before each.
    async fn fill_window(&mut self) -> Result<(), End> {
        while self.pass.inflight.len() < self.drainer.window.size() && !self.cancel.is_cancelled() {
            let Some((entry, msg)) = self.queue.pop_front() else {
                break;
            };
            if !self.sent_any {
                self.drainer.shared.drain.set_state(DrainerState::Draining);
                self.sent_any = true;
            }
            if Instant::now() + Duration::from_millis(50) >= self.lease.until {
                self.renew_lease().await?;
            }
            match msg {
                Ok(msg) => self.publish(entry, msg).await?,
                Err(detail) => {
                    self.drainer
                        .park_corrupt(&entry, &detail)
                        .await
                        .map_err(redis_end)?;
                    self.pass
                        .inflight
                        .push_back(Box::pin(async move { (entry, Ok(())) }));
                }
            }
        }
        Ok(())
    }

    /// Send one entry; its confirm joins the window.
    async fn publish(&mut self, entry: Entry, msg: OutboundMessage) -> Result<(), End> {
        // Ends at the confirm (the span lives in the confirm's future).
        let span = crate::telemetry::drain_publish_span(&msg);
        let confirm = self
            .drainer
            .send(msg, self.stall)
            .instrument(span.clone())
            .await
            .map_err(|error| (Stop::Publish(error), Settle::Collect))?;
        self.progress_at = Instant::now();
        self.drainer.shared.drain.republished();
        self.pass.inflight.push_back(Box::pin(async move {
            let confirmed = confirm.await;
            drop(span);
            (entry, confirmed)
        }));
        Ok(())
    }

    async fn renew_lease(&mut self) -> Result<(), End> {
        self.drainer
            .renew_lease(self.lease)
            .await
            .map_err(|stop| (stop, Settle::Collect))
    }

    /// Wait for one event and handle it.
    async fn next_event(&mut self) -> Result<(), End> {
        // Cancel-safe: confirms left in flight are simply dropped; their
        // entries stay in the stream and are republished. A read or delete
        // in flight is finished or dropped in `finish`.
        tokio::select! {
            biased;
            _ = self.cancel.cancelled() => Err((Stop::Cancelled, Settle::Drop)),
            _ = self.lease.renew.tick() => self.renew_lease().await,
            r = poll_opt(&mut self.pass.deleting), if self.pass.deleting.is_some() => {
                self.deleted(r)
            }
            r = poll_opt(&mut self.reading), if self.reading.is_some() => self.read(r),
            done = self.pass.inflight.next(), if !self.pass.inflight.is_empty() => {
                self.confirmed(done)
            }
            // Last, so a confirm that is ready wins over the timer.
            _ = &mut self.stall_timer, if !self.pass.inflight.is_empty() => self.stall_timer_fired(),
        }
    }

    /// The delete finished; what it could not delete waits for the next
    /// pass.
    fn deleted(&mut self, r: DeleteResult) -> Result<(), End> {
        self.pass.deleting = None;
        r.map_err(|DeleteFailed { failure, entries }| {
            self.drainer.unsettled.extend(entries);
            redis_end(failure)
        })
    }

    /// A page was read: queue it.
    fn read(&mut self, r: ReadResult) -> Result<(), End> {
        self.reading = None;
        let entries = r.map_err(redis_end)?;
        if entries.len() < self.drainer.cfg.batch {
            self.at_end = true;
        }
        if let Some((e, _)) = entries.last() {
            self.last_read = Some(e.stream_id.clone());
        }
        self.queue.extend(entries);
        Ok(())
    }

    /// The oldest publish in flight was confirmed, or failed.
    fn confirmed(&mut self, done: Option<(Entry, Result<(), P::Error>)>) -> Result<(), End> {
        let Some((entry, result)) = done else {
            return Ok(());
        };
        match result {
            Ok(()) => {
                self.progress_at = Instant::now();
                self.drainer.grow_window();
                self.pass.confirmed.push(entry);
                Ok(())
            }
            Err(e) => {
                // This one and every publish behind it.
                let abandoned = self.pass.inflight.len() + 1;
                Err((Stop::Publish(e.to_string()), Settle::Abandon(abandoned)))
            }
        }
    }

    /// The stall timer fired: a stall if there was no progress for the
    /// stall timeout (time the broker blocks publishes counts as progress;
    /// see the module doc, "Slow is not failed"), else it is moved to the
    /// new due time.
    fn stall_timer_fired(&mut self) -> Result<(), End> {
        if self.drainer.publisher.is_blocked() {
            self.progress_at = Instant::now();
        }
        let stall = self.stall;
        let due = self.progress_at + stall;
        if Instant::now() < due {
            self.stall_timer.as_mut().reset(due.into());
            return Ok(());
        }
        let abandoned = self.pass.inflight.len();
        self.drainer.publisher.stalled();
        let stop = Stop::Publish(format!(
            "no confirm for {stall:?} with {abandoned} publishes in flight"
        ));
        Err((stop, Settle::Abandon(abandoned)))
    }
}
