//! The confirmed publisher: a dedicated confirm-mode channel per session,
//! re-opened whenever it closes, and a cheap [`Publisher`] handle whose
//! `publish` resolves only when the broker confirmed.
//!
//! Every publish is `mandatory` and has a deadline (the confirm timeout)
//! covering the wait while the broker blocks publishing, the send, and the
//! confirm. Many publishes may be in flight at once: confirms are
//! pipelined on the one channel. It never buffers while disconnected; the
//! caller decides (the outbox spools).
//!
//! A channel the broker nacks is replaced, never reused: a quorum queue
//! whose first publish on a channel came before its new leader existed
//! keeps nacking that channel's publishes to it, while a new channel is
//! acked. The first nack on a channel retires it (once; later nacks on it
//! only count); its publishes in flight fail, and the caller sends again
//! from its first unconfirmed message (the drainer after its backoff, a
//! live publish through the spool). Nacks are their own failure class:
//! counted in `/status` ([`NackStats`]) and in the publish metric's
//! `nacked` outcome, with the channel replacements by reason.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use lapin::protocol::AMQPErrorKind;

use super::convert::{short, to_basic_properties};
use super::failure::{Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::refusal::{Refusal, Screen, Subject, attribute};
use super::status::AmqpStatus;
use crate::backoff::{Backoff, BackoffConfig};
use crate::message::OutboundMessage;

/// Why a publish did not end confirmed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    /// No live session (or its publish channel could not be re-opened in
    /// time).
    #[error("not connected to the broker")]
    NotConnected,
    /// The broker blocked publishing (resource alarm) for the whole
    /// confirm timeout.
    #[error("broker blocked publishing for {0:?}")]
    Blocked(Duration),
    /// No confirm arrived within the timeout; the message may or may not
    /// have been routed.
    #[error("no publisher confirm within {0:?}")]
    ConfirmTimeout(Duration),
    /// The broker refused the message (`basic.nack`, e.g. under a resource
    /// alarm or a full queue that rejects publishes).
    #[error("broker nacked the message")]
    Nacked,
    /// The broker will never take this message as it is (no route, no
    /// exchange, no permission, too large): see [`Refusal`].
    #[error(transparent)]
    Refused(Refusal),
    /// The message was refused, and so was its dead letter (the
    /// dead-letter exchange is missing or not writable): nothing took it,
    /// so it is kept and tried again; an operator must fix the exchange.
    #[error("{0}; its dead letter was refused too")]
    DeadLetterRefused(Refusal),
    /// The channel or connection failed while the publish was in flight
    /// (possibly because another publish on the shared channel was
    /// refused); the outcome is unknown.
    #[error("publish failed ({class}): {message}")]
    ConnectionLost {
        /// Failure class.
        class: FailureClass,
        /// Error text.
        message: String,
        /// Only the publish channel closed; the connection is up and the
        /// channel is re-opened, so sending again may go through at once.
        channel_only: bool,
    },
}

impl PublishError {
    /// Trying again (or spooling) may succeed: everything but a permanent
    /// refusal.
    pub fn is_transient(&self) -> bool {
        !matches!(self, PublishError::Refused(_))
    }

    /// Only the publish channel failed (another publish's refusal closed
    /// it): this message was not refused and may be sent again right away.
    pub fn is_channel_only(&self) -> bool {
        matches!(
            self,
            PublishError::ConnectionLost {
                channel_only: true,
                ..
            }
        )
    }

    /// The broker may have the message even though no confirm arrived
    /// (republishing may duplicate).
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(
            self,
            PublishError::ConfirmTimeout(_) | PublishError::ConnectionLost { .. }
        )
    }

    fn label(&self) -> &'static str {
        match self {
            PublishError::NotConnected => "not_connected",
            PublishError::Blocked(_) => "blocked",
            PublishError::ConfirmTimeout(_) => "timeout",
            PublishError::Nacked => "nacked",
            PublishError::Refused(r) => r.kind.as_str(),
            PublishError::DeadLetterRefused(_) => "dead_letter_refused",
            PublishError::ConnectionLost { .. } => "connection_lost",
        }
    }
}

/// Publishes the broker nacked, and the publish channels replaced for it.
#[derive(Debug, Default)]
pub struct NackStats {
    nacks: std::sync::atomic::AtomicU64,
    replaced: std::sync::atomic::AtomicU64,
    last: std::sync::Mutex<Option<std::time::SystemTime>>,
}

/// A copy of [`NackStats`] for `/status`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NackSnapshot {
    /// Publishes nacked since start.
    pub nacks: u64,
    /// Publish channels replaced after a nack.
    pub channels_replaced: u64,
    /// When the last nack arrived.
    #[serde(skip)]
    pub last: Option<std::time::SystemTime>,
}

impl NackStats {
    fn nacked(&self) {
        self.nacks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *crate::sync::lock(&self.last) = Some(std::time::SystemTime::now());
    }

    /// The counts now.
    pub fn snapshot(&self) -> NackSnapshot {
        NackSnapshot {
            nacks: self.nacks.load(std::sync::atomic::Ordering::Relaxed),
            channels_replaced: self.replaced.load(std::sync::atomic::Ordering::Relaxed),
            last: *crate::sync::lock(&self.last),
        }
    }
}

/// Why a publish channel is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Retired {
    Live = 0,
    /// No progress for a long time on a live connection.
    Stalled = 1,
    /// The broker nacked a publish on it.
    Nacked = 2,
}

/// The current confirm channel.
#[derive(Clone)]
pub(crate) struct PublisherLink {
    pub(crate) generation: u64,
    /// Which opening of a publish channel this is (unique in the process).
    pub(crate) epoch: u64,
    pub(crate) channel: Channel,
    /// The session's connection, for the side channel of exchange checks.
    pub(crate) conn: Arc<Connection>,
    /// Set (to a [`Retired`]) by [`Publisher::retire_channel`] or a nack:
    /// the keeper closes this channel and opens another.
    retire: Arc<std::sync::atomic::AtomicU8>,
}

impl PublisherLink {
    /// Open and not marked for replacement: a retired channel takes no
    /// more publishes while the keeper replaces it.
    fn usable(&self) -> bool {
        self.channel.status().connected()
            && self.retire.load(std::sync::atomic::Ordering::Relaxed) == Retired::Live as u8
    }
}

/// Publish channels opened so far, for [`PublisherLink::epoch`].
static CHANNEL_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long a publish waits for the publish channel to be re-opened while
/// the session is up (a refusal closed it a moment ago).
const REOPEN_WAIT: Duration = Duration::from_secs(2);

/// A publish on the wire, resolving at its confirm.
pub type PendingConfirm =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, PublishError>> + Send>>;

/// Publishes with confirms (cheap clone; share it freely).
#[derive(Clone)]
pub struct Publisher {
    link: watch::Receiver<Option<PublisherLink>>,
    status: watch::Receiver<AmqpStatus>,
    confirm_timeout: Duration,
    screen: Screen,
    nacks: Arc<NackStats>,
}

impl Publisher {
    pub(crate) fn new(
        link: watch::Receiver<Option<PublisherLink>>,
        status: watch::Receiver<AmqpStatus>,
        confirm_timeout: Duration,
    ) -> Self {
        Self {
            link,
            status,
            confirm_timeout,
            screen: Screen::default(),
            nacks: Arc::default(),
        }
    }

    /// Nacks so far.
    pub fn nacks(&self) -> NackSnapshot {
        self.nacks.snapshot()
    }

    /// The confirm timeout.
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    /// Whether a confirm channel is up right now, or the session is and
    /// the channel is being re-opened (a publish waits for it).
    pub fn is_ready(&self) -> bool {
        self.status.borrow().is_connected()
            || self
                .link
                .borrow()
                .as_ref()
                .is_some_and(|l| l.channel.status().connected())
    }

    /// Replace the publish channel `epoch` (as [`Publisher::send_unbounded`]
    /// pinned it) with a new one, if it is still the current one: its
    /// publishes made no progress for a long time on a connection that is
    /// alive, so the channel is suspect (e.g. a confirm it will never
    /// deliver). Publishes in flight on it fail and are sent again.
    pub fn retire_channel(&self, epoch: u64) {
        self.retire(epoch, Retired::Stalled);
    }

    /// Mark channel `epoch` for replacement, if it is still the current one
    /// and not marked yet. True when this call marked it.
    fn retire(&self, epoch: u64, why: Retired) -> bool {
        match self.link.borrow().as_ref() {
            Some(l) if l.epoch == epoch => l
                .retire
                .compare_exchange(
                    Retired::Live as u8,
                    why as u8,
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                )
                .is_ok(),
            _ => false,
        }
    }

    /// Forget that `exchange` was refused in this session (it was declared
    /// again): the next publish to it goes to the broker.
    pub fn forget_refusal(&self, exchange: &str) {
        self.screen.forget(exchange);
    }

    /// Whether the broker is blocking publishes (`connection.blocked`).
    pub fn is_blocked(&self) -> bool {
        self.status.borrow().is_blocked()
    }

    /// Publish `msg` (mandatory) and wait for the broker's confirm. Returns
    /// the generation of the session that confirmed it.
    pub async fn publish(&self, msg: &OutboundMessage) -> Result<u64, PublishError> {
        match self.send(msg).await {
            Ok(confirm) => confirm.await,
            Err(e) => Err(e),
        }
    }

    /// Send `msg` (mandatory) and return once it is on the channel; the
    /// returned future resolves at the broker's confirm (or the confirm
    /// timeout, counted from this call). Sends are ordered: calling `send`
    /// for A and then B puts A on the wire before B, which lets a caller
    /// keep many confirms in flight and still publish in order.
    pub async fn send(&self, msg: &OutboundMessage) -> Result<PendingConfirm, PublishError> {
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        metered(self.send_inner(msg, Some(deadline), None).await)
    }

    /// [`Publisher::send`] with no deadline, on one channel: neither the
    /// send nor the confirm times out here, the caller bounds them. For a
    /// window of publishes in flight, where a slow broker confirms the tail
    /// of the window many confirm timeouts after it was sent while every
    /// confirm before it arrives steadily: the spool's drainer bounds the
    /// time without progress instead.
    ///
    /// `channel` pins the window to one publish channel: `None` on the
    /// window's first send (it is set to the channel used), and once that
    /// channel closes every later send fails with
    /// [`PublishError::NotConnected`] instead of going out on the next
    /// channel. A channel closed by one message's refusal drops what was
    /// sent after it; continuing on a new channel would put later messages
    /// ahead of those, so the caller starts over from the first unconfirmed
    /// one instead.
    pub async fn send_unbounded(
        &self,
        msg: &OutboundMessage,
        channel: &mut Option<u64>,
    ) -> Result<PendingConfirm, PublishError> {
        metered(self.send_inner(msg, None, Some(channel)).await)
    }

    async fn send_inner(
        &self,
        msg: &OutboundMessage,
        deadline: Option<tokio::time::Instant>,
        pinned: Option<&mut Option<u64>>,
    ) -> Result<PendingConfirm, PublishError> {
        let timeout = self.confirm_timeout;
        self.wait_unblocked(deadline).await?;
        let link = self.link_for(pinned, deadline).await?;
        let screened = until(
            deadline,
            self.screen.check(&link.conn, link.generation, msg),
        )
        .await;
        match screened {
            Ok(Some(refused)) => return Err(PublishError::Refused(refused)),
            Ok(None) => {}
            Err(_) => return Err(PublishError::ConfirmTimeout(timeout)),
        }
        let sent = until(
            deadline,
            link.channel.basic_publish(
                short(&msg.exchange),
                short(&msg.routing_key),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.body,
                to_basic_properties(&msg.properties),
            ),
        )
        .await;
        let generation = link.generation;
        // What a channel failure needs to tell this message from the others
        // on the channel.
        let subject = Subject::of(msg);
        let confirm = match sent {
            Ok(r) => r.map_err(|e| self.lost(generation, &subject, e))?,
            Err(_) => return Err(PublishError::ConfirmTimeout(timeout)),
        };
        Ok(self.confirmed(confirm, generation, link.epoch, subject, deadline))
    }

    /// While the broker blocks publishing, wait (bounded by the deadline)
    /// for it to unblock.
    async fn wait_unblocked(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), PublishError> {
        let mut status = self.status.clone();
        loop {
            let blocked = status.borrow_and_update().is_blocked();
            if !blocked {
                return Ok(());
            }
            match until(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(PublishError::NotConnected),
                Err(_) => return Err(PublishError::Blocked(self.confirm_timeout)),
            }
        }
    }

    /// The channel to send on. A window's pinned channel must still be the
    /// open one; a window without one yet is pinned to the current one.
    async fn link_for(
        &self,
        pinned: Option<&mut Option<u64>>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<PublisherLink, PublishError> {
        match pinned {
            Some(Some(epoch)) => match self.link.borrow().as_ref() {
                Some(l) if l.epoch == *epoch && l.usable() => Ok(l.clone()),
                _ => Err(PublishError::NotConnected),
            },
            Some(pin) => {
                let link = self.current_link(deadline).await?;
                *pin = Some(link.epoch);
                Ok(link)
            }
            None => self.current_link(deadline).await,
        }
    }

    /// The broker's answer to a sent publish, within the deadline: the
    /// session's generation when it took the message.
    fn confirmed(
        &self,
        confirm: PublisherConfirm,
        generation: u64,
        epoch: u64,
        subject: Subject,
        deadline: Option<tokio::time::Instant>,
    ) -> PendingConfirm {
        let timeout = self.confirm_timeout;
        let this = self.clone();
        Box::pin(async move {
            let outcome = match until(deadline, confirm).await {
                Ok(r) => r.map_err(|e| this.lost(generation, &subject, e))?,
                Err(_) => return Err(PublishError::ConfirmTimeout(timeout)),
            };
            match outcome {
                Confirmation::Ack(None) => Ok(generation),
                Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => Err(
                    PublishError::Refused(
                        subject.no_route(ret.reply_code, ret.reply_text.as_str().to_owned()),
                    ),
                ),
                Confirmation::Nack(None) => {
                    this.nacks.nacked();
                    if this.retire(epoch, Retired::Nacked) {
                        this.nacks
                            .replaced
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        metrics::channel_replaced("nack");
                        warn!(
                            generation,
                            "The broker nacked a publish; replacing the publish channel."
                        );
                    }
                    Err(PublishError::Nacked)
                }
                Confirmation::NotRequested => Err(PublishError::ConnectionLost {
                    class: FailureClass::Other,
                    message: "channel is not in confirm mode".to_owned(),
                    channel_only: false,
                }),
            }
        })
    }

    /// The confirm channel. While the session is up but the channel is
    /// being re-opened (a refusal closed it), wait for it a little, within
    /// the deadline: the refused message's dead letter, and the messages
    /// that shared the channel with it, go out on the new one.
    async fn current_link(
        &self,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<PublisherLink, PublishError> {
        let mut link = self.link.clone();
        let reopen = tokio::time::Instant::now() + REOPEN_WAIT;
        let wait_until = deadline.map_or(reopen, |d| d.min(reopen));
        loop {
            if let Some(l) = link.borrow_and_update().as_ref()
                && l.usable()
            {
                return Ok(l.clone());
            }
            if !self.status.borrow().is_connected() {
                return Err(PublishError::NotConnected);
            }
            match tokio::time::timeout_at(wait_until, link.changed()).await {
                Ok(Ok(())) => {}
                _ => return Err(PublishError::NotConnected),
            }
        }
    }

    /// A publish that failed at the channel: refused when the broker's
    /// reply names it (remembered for the session), else lost along with
    /// the channel.
    fn lost(&self, generation: u64, subject: &Subject, e: lapin::Error) -> PublishError {
        if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
            && let AMQPErrorKind::Soft(_) = amqp.kind()
            && let Some(r) = attribute(amqp.get_id(), amqp.get_message().as_str(), subject)
        {
            self.screen.remember(generation, &r);
            return PublishError::Refused(r);
        }
        PublishError::ConnectionLost {
            class: classify(&e),
            message: e.to_string(),
            channel_only: !is_connection_level(&e) && self.status.borrow().is_connected(),
        }
    }
}

/// `f` bounded by `deadline`, if there is one.
async fn until<F: Future>(
    deadline: Option<tokio::time::Instant>,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, f).await,
        None => Ok(f.await),
    }
}

/// Count a send's outcome now if it failed, else its confirm's when that
/// resolves.
fn metered(sent: Result<PendingConfirm, PublishError>) -> Result<PendingConfirm, PublishError> {
    match sent {
        Ok(confirm) => {
            let sent = std::time::Instant::now();
            Ok(Box::pin(async move {
                let res = confirm.await;
                match &res {
                    Ok(_) => {
                        metrics::confirmed(sent.elapsed());
                        metrics::publish("confirmed");
                    }
                    Err(e) => metrics::publish(e.label()),
                }
                res
            }))
        }
        Err(e) => {
            metrics::publish(e.label());
            Err(e)
        }
    }
}

/// Keep a confirm channel open on `conn` for the session, re-opening it
/// when it closes (a publish to a missing exchange closes it with 404).
pub(crate) async fn keep_channel(
    conn: Arc<Connection>,
    generation: u64,
    link: watch::Sender<Option<PublisherLink>>,
    abort: CancellationToken,
    failures: mpsc::UnboundedSender<Failure>,
) {
    let keeper = Keeper {
        conn,
        generation,
        link,
        abort,
        failures,
    };
    while let Some(channel) = keeper.open().await {
        if keeper.serve(channel).await.is_break() {
            return;
        }
        keeper.link.send_replace(None);
        if !keeper.conn.status().connected() {
            break;
        }
        debug!(generation, "Publish channel closed; re-opening it.");
    }
    keeper.link.send_replace(None);
}

/// What [`keep_channel`] works with.
struct Keeper {
    conn: Arc<Connection>,
    generation: u64,
    link: watch::Sender<Option<PublisherLink>>,
    abort: CancellationToken,
    failures: mpsc::UnboundedSender<Failure>,
}

impl Keeper {
    /// A new channel in confirm mode, retried (50 ms doubling up to 2 s)
    /// while the connection is up. `None` once the session is over; a
    /// connection-level failure is reported.
    async fn open(&self) -> Option<Channel> {
        let generation = self.generation;
        let mut retry = Backoff::new(BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(2),
        });
        loop {
            let opened = async {
                let ch = self.conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                Ok::<_, lapin::Error>(ch)
            };
            let e = tokio::select! {
                biased;
                _ = self.abort.cancelled() => return None,
                r = opened => match r {
                    Ok(channel) => {
                        debug!(generation, channel = channel.id(), "Publish channel open in confirm mode.");
                        return Some(channel);
                    }
                    Err(e) => e,
                },
            };
            if is_connection_level(&e) || !self.conn.status().connected() {
                let _ = self
                    .failures
                    .send(Failure::from_lapin(&e, Some(generation)));
                return None;
            }
            warn!(generation, error = %e, "Cannot open the publish channel; retrying.");
            tokio::select! {
                biased;
                _ = self.abort.cancelled() => return None,
                _ = tokio::time::sleep(retry.next_fixed()) => {}
            }
        }
    }

    /// Publish `channel` as the link and watch it. `Continue` when it
    /// closed or was retired (open another), `Break` when the session is
    /// over (the channel closed here).
    async fn serve(&self, channel: Channel) -> ControlFlow<()> {
        let generation = self.generation;
        let retire = Arc::new(std::sync::atomic::AtomicU8::new(Retired::Live as u8));
        self.link.send_replace(Some(PublisherLink {
            generation,
            epoch: CHANNEL_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            channel: channel.clone(),
            conn: self.conn.clone(),
            retire: retire.clone(),
        }));
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                biased;
                _ = self.abort.cancelled() => {
                    self.link.send_replace(None);
                    let _ = tokio::time::timeout(Duration::from_secs(1), channel.close(200, "session over".into())).await;
                    return ControlFlow::Break(());
                }
                _ = poll.tick() => {
                    let why = retire.load(std::sync::atomic::Ordering::Relaxed);
                    if why != Retired::Live as u8 {
                        let text = if why == Retired::Nacked as u8 {
                            "replaced: nacked"
                        } else {
                            warn!(generation, channel = channel.id(), "No confirm for a long time on a live connection; replacing the publish channel.");
                            metrics::channel_replaced("stall");
                            "replaced: no confirms"
                        };
                        self.link.send_replace(None);
                        let _ = tokio::time::timeout(Duration::from_secs(1), channel.close(200, text.into())).await;
                        return ControlFlow::Continue(());
                    }
                    if !channel.status().connected() {
                        return ControlFlow::Continue(());
                    }
                }
            }
        }
    }
}
