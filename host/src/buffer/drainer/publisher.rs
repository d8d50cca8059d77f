//! What the drainer publishes through ([`DrainPublisher`], and
//! [`FnPublisher`] for a plain async closure) and how it is controlled
//! ([`DrainerHandle`]).

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;

use crate::buffer::spool::Shared;
use crate::message::OutboundMessage;

/// Publishes a spooled message. Implemented by the confirmed AMQP publisher
/// (plugged in by `dispatch`) and by [`FnPublisher`] for a plain async
/// closure.
pub trait DrainPublisher: Send + Sync + 'static {
    /// Why a publish failed.
    type Error: std::fmt::Display + Send + 'static;
    /// Resolves when the broker confirmed (`Ok`) or refused/lost the message.
    type Confirm: Future<Output = Result<(), Self::Error>> + Send + 'static;

    /// Hand `message` to the broker. The drainer awaits these one at a time,
    /// in stream order, so the returned future must resolve once the message
    /// is sent (not confirmed); the confirm comes through
    /// [`DrainPublisher::Confirm`].
    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, Self::Error>> + Send;

    /// Whether the broker has said it is holding publishes back (AMQP
    /// `connection.blocked`, a resource alarm). Time spent blocked is not a
    /// stall (see the module doc, "Slow is not failed"): publishing again
    /// would only queue behind the same alarm.
    fn is_blocked(&self) -> bool {
        false
    }

    /// A pass starts: what follows is sent from the first unconfirmed entry
    /// on. A pipelined publisher keeps one pass on one channel (see
    /// `Publisher::send_unbounded`).
    fn begin_pass(&self) {}

    /// The publishes in flight made no progress for the stall timeout while
    /// the broker did not say it was blocking them: whatever carries them
    /// is suspect. A pipelined publisher replaces its channel (a channel
    /// that lost track of a confirm would stall every pass after this one).
    fn stalled(&self) {}
}

/// Adapts an async closure `Fn(OutboundMessage) -> Future<Output =
/// Result<(), E>>` whose future resolves at the confirm: one publish in
/// flight at a time.
pub struct FnPublisher<F>(pub F);

impl<F, Fut, E> DrainPublisher for FnPublisher<F>
where
    F: Fn(OutboundMessage) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    type Error = E;
    type Confirm = std::future::Ready<Result<(), E>>;

    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, E>> + Send {
        let fut = (self.0)(message);
        async move {
            fut.await?;
            Ok(std::future::ready(Ok(())))
        }
    }
}

/// Controls a running [`Drainer`].
#[derive(Clone)]
pub struct DrainerHandle {
    pub(super) enabled: watch::Sender<bool>,
    pub(super) shared: Arc<Shared>,
}

impl DrainerHandle {
    /// Stop draining (e.g. while the broker is known to be down). Publishes
    /// in flight finish; the lease is released.
    pub fn pause(&self) {
        self.enabled.send_replace(false);
    }

    /// Resume draining.
    pub fn resume(&self) {
        self.enabled.send_replace(true);
        self.shared.appended_notify.notify_one();
    }

    /// Retry now instead of waiting out the current backoff: the broker
    /// connection came back (a new session) or stopped blocking publishes.
    /// A kick while no pause is under way ends the next one at once.
    pub fn kick(&self) {
        self.shared.drain.wake.notify_one();
        self.shared.appended_notify.notify_one();
    }

    /// Follow this drainer's pause and resume (the adopter does).
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.enabled.subscribe()
    }
}
