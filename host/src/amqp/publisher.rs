//! The confirmed publisher: a dedicated confirm-mode channel per session,
//! re-opened whenever it closes, and a cheap [`Publisher`] handle whose
//! `publish` resolves only when the broker confirmed.
//!
//! Every publish is `mandatory` and has a deadline (the confirm timeout)
//! covering the wait while the broker blocks publishing, the send, and the
//! confirm. Many publishes may be in flight at once: confirms are
//! pipelined on the one channel. It never buffers while disconnected; the
//! caller decides (the outbox spools).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{Channel, Confirmation, Connection};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::convert::{short, to_basic_properties};
use super::failure::{Failure, FailureClass, classify, is_connection_level};
use super::metrics;
use super::supervisor::AmqpStatus;
use crate::message::OutboundMessage;

/// Why a publish did not end confirmed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PublishError {
    /// No live session (or its publish channel is being re-opened).
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
    /// The broker refused the message (`basic.nack`).
    #[error("broker nacked the message")]
    Nacked,
    /// No queue is bound for it (`basic.return` on a mandatory publish).
    #[error(
        "message to exchange '{exchange}' with key '{routing_key}' is unroutable: {reply_code} {reply_text}"
    )]
    Unroutable {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
        /// AMQP reply code (312 NO_ROUTE).
        reply_code: u16,
        /// Broker text.
        reply_text: String,
    },
    /// The exchange does not exist (404); the publish channel was closed by
    /// the broker and is re-opened.
    #[error("exchange '{0}' does not exist")]
    ExchangeNotFound(String),
    /// The channel or connection failed while the publish was in flight
    /// (possibly because another publish on the shared channel failed);
    /// the outcome is unknown.
    #[error("publish failed ({class}): {message}")]
    ConnectionLost {
        /// Failure class (`not_found` for a missing exchange).
        class: FailureClass,
        /// Error text.
        message: String,
    },
}

impl PublishError {
    /// Trying again (or spooling) may succeed: everything but an
    /// unroutable message, a missing exchange, or a refused permission.
    pub fn is_transient(&self) -> bool {
        match self {
            PublishError::Unroutable { .. } | PublishError::ExchangeNotFound(_) => false,
            PublishError::ConnectionLost { class, .. } => *class != FailureClass::AccessRefused,
            _ => true,
        }
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
            PublishError::Unroutable { .. } => "unroutable",
            PublishError::ExchangeNotFound(_) => "exchange_not_found",
            PublishError::ConnectionLost { .. } => "connection_lost",
        }
    }
}

/// The current confirm channel.
#[derive(Clone)]
pub(crate) struct PublisherLink {
    pub(crate) generation: u64,
    pub(crate) channel: Channel,
}

/// A publish on the wire, resolving at its confirm.
pub type PendingConfirm =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, PublishError>> + Send>>;

/// Publishes with confirms (cheap clone; share it freely).
#[derive(Clone)]
pub struct Publisher {
    link: watch::Receiver<Option<PublisherLink>>,
    status: watch::Receiver<AmqpStatus>,
    confirm_timeout: Duration,
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
        }
    }

    /// The confirm timeout.
    pub fn confirm_timeout(&self) -> Duration {
        self.confirm_timeout
    }

    /// Whether a confirm channel is up right now.
    pub fn is_ready(&self) -> bool {
        self.link
            .borrow()
            .as_ref()
            .is_some_and(|l| l.channel.status().connected())
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
        metered(self.send_inner(msg, Some(deadline)).await)
    }

    /// [`Publisher::send`] with no deadline: neither the send nor the
    /// confirm times out here, the caller bounds them. For a window of
    /// publishes in flight, where a slow broker confirms the tail of the
    /// window many confirm timeouts after it was sent while every confirm
    /// before it arrives steadily: the spool's drainer bounds the time
    /// without progress instead.
    pub async fn send_unbounded(
        &self,
        msg: &OutboundMessage,
    ) -> Result<PendingConfirm, PublishError> {
        metered(self.send_inner(msg, None).await)
    }

    async fn send_inner(
        &self,
        msg: &OutboundMessage,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<PendingConfirm, PublishError> {
        let timeout = self.confirm_timeout;
        let mut status = self.status.clone();
        // While blocked, wait (bounded by the deadline) for unblocked.
        loop {
            let blocked = status.borrow_and_update().is_blocked();
            if !blocked {
                break;
            }
            match until(deadline, status.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(PublishError::NotConnected),
                Err(_) => return Err(PublishError::Blocked(timeout)),
            }
        }
        let Some(link) = self.link.borrow().clone() else {
            return Err(PublishError::NotConnected);
        };
        if !link.channel.status().connected() {
            return Err(PublishError::NotConnected);
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
        let confirm = match sent {
            Ok(r) => r.map_err(|e| lost(&msg.exchange, e))?,
            Err(_) => return Err(PublishError::ConfirmTimeout(timeout)),
        };
        let generation = link.generation;
        let (exchange, routing_key) = (msg.exchange.clone(), msg.routing_key.clone());
        Ok(Box::pin(async move {
            let outcome = match until(deadline, confirm).await {
                Ok(r) => r.map_err(|e| lost(&exchange, e))?,
                Err(_) => return Err(PublishError::ConfirmTimeout(timeout)),
            };
            match outcome {
                Confirmation::Ack(None) => Ok(generation),
                Confirmation::Ack(Some(ret)) | Confirmation::Nack(Some(ret)) => {
                    Err(PublishError::Unroutable {
                        exchange,
                        routing_key,
                        reply_code: ret.reply_code,
                        reply_text: ret.reply_text.as_str().to_owned(),
                    })
                }
                Confirmation::Nack(None) => Err(PublishError::Nacked),
                Confirmation::NotRequested => Err(PublishError::ConnectionLost {
                    class: FailureClass::Other,
                    message: "channel is not in confirm mode".to_owned(),
                }),
            }
        }))
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
        Ok(confirm) => Ok(Box::pin(async move {
            let res = confirm.await;
            metrics::publish(match &res {
                Ok(_) => "confirmed",
                Err(e) => e.label(),
            });
            res
        })),
        Err(e) => {
            metrics::publish(e.label());
            Err(e)
        }
    }
}

/// A publish that failed at the channel. The broker's 404 names the
/// exchange; only the publish that named it failed for that reason, the
/// others in flight merely shared the channel it closed.
fn lost(exchange: &str, e: lapin::Error) -> PublishError {
    let class = classify(&e);
    let message = e.to_string();
    if class == FailureClass::NotFound && message.contains(&format!("no exchange '{exchange}'")) {
        PublishError::ExchangeNotFound(exchange.to_owned())
    } else {
        PublishError::ConnectionLost { class, message }
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
    let mut retry = Duration::from_millis(50);
    loop {
        let opened = async {
            let ch = conn.create_channel().await?;
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok::<_, lapin::Error>(ch)
        };
        let channel = tokio::select! {
            biased;
            _ = abort.cancelled() => break,
            r = opened => match r {
                Ok(ch) => ch,
                Err(e) => {
                    if is_connection_level(&e) || !conn.status().connected() {
                        let _ = failures.send(Failure::from_lapin(&e, Some(generation)));
                        break;
                    }
                    warn!(generation, error = %e, "Cannot open the publish channel; retrying.");
                    tokio::select! {
                        biased;
                        _ = abort.cancelled() => break,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(Duration::from_secs(2));
                    continue;
                }
            },
        };
        retry = Duration::from_millis(50);
        debug!(
            generation,
            channel = channel.id(),
            "Publish channel open in confirm mode."
        );
        link.send_replace(Some(PublisherLink {
            generation,
            channel: channel.clone(),
        }));
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                biased;
                _ = abort.cancelled() => {
                    link.send_replace(None);
                    let _ = tokio::time::timeout(Duration::from_secs(1), channel.close(200, "session over".into())).await;
                    return;
                }
                _ = poll.tick() => {
                    if !channel.status().connected() {
                        break;
                    }
                }
            }
        }
        link.send_replace(None);
        if !conn.status().connected() {
            break;
        }
        debug!(generation, "Publish channel closed; re-opening it.");
    }
    link.send_replace(None);
}
