//! The outbox: where every message Warren publishes goes. To the broker
//! with confirms while it is healthy and the spool is empty; otherwise into
//! the spool, which the drainer republishes in order when the broker is
//! back. When neither takes a message, the caller gets [`OutboxError`] and
//! must keep what it has (a delivery stays unacked): nothing is dropped.
//!
//! A message the broker refuses for good ([`Refusal`]: no queue bound, no
//! such exchange, no write permission, too large) would block the spool
//! forever if it were retried, so it is never spooled: it goes to the
//! dead-letter exchange at once, with the broker's reply, the exchange and
//! the routing key in its headers, and the caller sees it placed. A spooled
//! entry refused when it is drained is dead-lettered the same way (the
//! drainer publishes through [`Outbox::drain_publisher`]), so nothing
//! queues behind it. Repeated refusals of one destination log one line per
//! [`REFUSAL_LOG_INTERVAL`], not one per message.
//!
//! Except where Warren owns the destination: an output refused because an
//! exchange or queue is missing (404, or no route) that Warren declares
//! itself (a manifest's outputs, the retry tiers, the dead-letter exchange
//! and queue) has the destination re-declared with its bindings and is
//! published again; only if that fails is it dead-lettered. Each
//! destination is re-declared at most once per [`HEAL_INTERVAL`] (logged
//! once each time); outputs refused by the state before a re-declaration
//! finished are published again without another.

use crate::sync::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::amqp::{AmqpHandle, PublishError, Publisher, Refusal, RefusalKind};
use crate::buffer::{DrainPublisher, SpoolError, SpoolHandle};
use crate::message::{HeaderValue, OutboundMessage};

use super::headers;

/// Where a message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Confirmed by the broker.
    Broker,
    /// Durably in the spool.
    Spool,
    /// Refused by the broker for good; confirmed into the dead-letter
    /// exchange.
    DeadLettered,
}

impl Placement {
    /// The word for logs and span attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Placement::Broker => "broker",
            Placement::Spool => "spool",
            Placement::DeadLettered => "dead_lettered",
        }
    }
}

/// Neither the broker nor the spool took the message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("message refused: broker: {broker}; spool: {spool}")]
pub struct OutboxError {
    pub broker: String,
    pub spool: String,
}

/// At most one log line per destination and refusal kind this often.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// At most one re-declaration of a destination Warren owns this often.
pub const HEAL_INTERVAL: Duration = Duration::from_secs(10);

/// Tries of one re-declaration, [`HEAL_RETRY_DELAY`] apart. A deletion the
/// broker is still completing can remove an exchange between its declare
/// and the declare of its bindings; the next try finds it gone for good
/// and declares both.
const HEAL_TRIES: u32 = 3;
const HEAL_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Cheap to clone.
#[derive(Clone)]
pub struct Outbox {
    amqp: AmqpHandle,
    publisher: Publisher,
    spool: SpoolHandle,
    dead_letter_exchange: String,
    refusals: Arc<RefusalLog>,
    heals: Arc<Heals>,
}

/// When each destination was last re-declared; a lock per destination, so
/// outputs refused at once wait for one re-declaration.
#[derive(Default)]
struct Heals {
    by_destination: Mutex<HashMap<(String, String), HealSlot>>,
}

/// When one destination was last re-declared.
type HealSlot = Arc<tokio::sync::Mutex<Option<Instant>>>;

impl Outbox {
    pub fn new(amqp: AmqpHandle, spool: SpoolHandle, dead_letter_exchange: String) -> Self {
        Self {
            publisher: amqp.publisher(),
            amqp,
            spool,
            dead_letter_exchange,
            refusals: Arc::default(),
            heals: Arc::default(),
        }
    }

    /// Whether `msg`, refused by `r` after being sent at `sent_at`, should
    /// be published again: its destination is Warren's own and was
    /// re-declared after it was sent (by this call or a concurrent one).
    /// False for destinations Warren does not declare, and when the last
    /// re-declaration is recent and did not help.
    async fn heal(&self, msg: &OutboundMessage, r: &Refusal, sent_at: Instant) -> bool {
        if !matches!(r.kind, RefusalKind::NotFound | RefusalKind::NoRoute) {
            return false;
        }
        let Some(topology) = self.amqp.owned_destination(&msg.exchange, &msg.routing_key) else {
            return false;
        };
        // An exchange is one destination whatever the key; the default
        // exchange's destinations are its queues.
        let key = (
            msg.exchange.clone(),
            if msg.exchange.is_empty() {
                msg.routing_key.clone()
            } else {
                String::new()
            },
        );
        let slot = {
            let mut map = lock(&self.heals.by_destination);
            if map.len() > MAX_LOGGED_DESTINATIONS {
                map.clear();
            }
            map.entry(key).or_default().clone()
        };
        let mut last = slot.lock().await;
        match *last {
            Some(at) if at > sent_at => return true,
            Some(at) if at.elapsed() < HEAL_INTERVAL => return false,
            _ => {}
        }
        let mut declared = self.amqp.declare(topology.clone()).await;
        for _ in 1..HEAL_TRIES {
            if declared.is_ok() {
                break;
            }
            tokio::time::sleep(HEAL_RETRY_DELAY).await;
            declared = self.amqp.declare(topology.clone()).await;
        }
        *last = Some(Instant::now());
        match declared {
            Ok(()) => {
                self.publisher.forget_refusal(&msg.exchange);
                super::metric::destination_redeclared(if msg.exchange.is_empty() {
                    &msg.routing_key
                } else {
                    &msg.exchange
                });
                tracing::warn!(exchange = %msg.exchange, routing_key = %msg.routing_key, reason = r.kind.as_str(), reply_text = %r.reply_text, "An output's destination that Warren declares was missing; re-declared it with its bindings and publishing again.");
                true
            }
            Err(e) => {
                tracing::warn!(exchange = %msg.exchange, routing_key = %msg.routing_key, error = %e, "Could not re-declare a missing destination that Warren declares; dead-lettering.");
                false
            }
        }
    }

    /// Publish `msg` and wait for its confirm; a refusal of a destination
    /// Warren owns heals it and publishes once more (see [`Outbox::heal`]).
    async fn publish_healing(&self, msg: &OutboundMessage) -> Result<u64, PublishError> {
        let sent_at = Instant::now();
        match self.publisher.publish(msg).await {
            Err(PublishError::Refused(r)) if self.heal(msg, &r, sent_at).await => {
                self.publisher.publish(msg).await
            }
            other => other,
        }
    }

    /// Publish `msg`: resolves when it is confirmed by the broker or
    /// durable in the spool, or fails when neither took it.
    pub async fn publish(&self, msg: &OutboundMessage) -> Result<Placement, OutboxError> {
        if self.spool.is_empty() && self.publisher.is_ready() {
            let broker = match self.to_broker(msg).await {
                Ok(p) => return Ok(p),
                Err(e) => e,
            };
            // The broker failed (or the outcome is unknown): the spool keeps
            // it, and everything after it, until the drainer catches up.
            return self
                .spool
                .append(msg.clone())
                .await
                .map(|_| Placement::Spool)
                .map_err(|spool| refused(&broker.to_string(), &spool));
        }
        // The spool is not empty (or not yet known to be): append to keep
        // order. If the spool cannot take it, the broker is the last resort:
        // out of order, but not lost.
        let spool = match self.spool.append(msg.clone()).await {
            Ok(_) => return Ok(Placement::Spool),
            Err(e) => e,
        };
        if !self.publisher.is_ready() {
            return Err(refused("not connected", &spool));
        }
        self.to_broker(msg)
            .await
            .map_err(|broker| refused(&broker.to_string(), &spool))
    }

    /// Publish to the broker; a refused message is dead-lettered. One that
    /// failed only because another publish's refusal closed the shared
    /// channel was not refused itself: it is sent again on the re-opened
    /// channel, within the confirm timeout, instead of going to the spool.
    async fn to_broker(&self, msg: &OutboundMessage) -> Result<Placement, PublishError> {
        let deadline = Instant::now() + self.publisher.confirm_timeout();
        loop {
            let sent_at = Instant::now();
            match self.publisher.publish(msg).await {
                Err(e) if e.is_channel_only() && Instant::now() < deadline => {}
                confirmed => return self.settle(msg, confirmed, sent_at).await,
            }
        }
    }

    /// What a broker confirm of `msg` (sent at `sent_at`) means: done,
    /// heal a destination Warren owns and publish again, dead-letter a
    /// refused message, or a (transient) failure for the caller.
    async fn settle(
        &self,
        msg: &OutboundMessage,
        confirmed: Result<u64, PublishError>,
        sent_at: Instant,
    ) -> Result<Placement, PublishError> {
        let confirmed = match confirmed {
            Err(PublishError::Refused(r)) if self.heal(msg, &r, sent_at).await => {
                self.publisher.publish(msg).await
            }
            other => other,
        };
        match confirmed {
            Ok(_) => Ok(Placement::Broker),
            Err(PublishError::Refused(refusal)) => {
                self.refusals.note(&refusal);
                let dead = self.dead_letter(msg, &refusal);
                match self.publish_healing(&dead).await {
                    Ok(_) => Ok(Placement::DeadLettered),
                    Err(PublishError::Refused(again)) => {
                        tracing::error!(dead_letter_exchange = %self.dead_letter_exchange, error = %again, "The dead letter of a refused output was refused too; keeping the output. Declare the dead-letter exchange (Warren does on every reconnect) or grant write access to it.");
                        Err(PublishError::DeadLetterRefused(refusal))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    fn dead_letter(&self, msg: &OutboundMessage, r: &Refusal) -> OutboundMessage {
        let mut dead = msg.clone();
        let p = &mut dead.properties;
        let text = |s: &str| HeaderValue::String(s.to_owned());
        p.set_header(headers::OUTCOME, text(r.kind.as_str()));
        p.set_header(headers::REASON, text(&r.to_string()));
        p.set_header(headers::REPLY_CODE, HeaderValue::I64(r.reply_code.into()));
        p.set_header(headers::REPLY_TEXT, text(&r.reply_text));
        p.set_header(headers::ORIGINAL_EXCHANGE, text(&msg.exchange));
        p.set_header(headers::ORIGINAL_ROUTING_KEY, text(&msg.routing_key));
        // A dead letter must not expire in the queue.
        headers::stash_expiration(p);
        if r.kind == RefusalKind::TooLarge {
            // The broker takes no body this large, not even as a dead
            // letter: it goes without it (logged at ERROR by the refusal
            // log), so the delivery can end and nothing queues behind it.
            p.set_header(
                headers::BODY_DROPPED,
                HeaderValue::I64(i64::try_from(msg.body.len()).unwrap_or(i64::MAX)),
            );
            dead.body = bytes::Bytes::new();
        }
        dead.exchange = self.dead_letter_exchange.clone();
        dead
    }

    /// The publish function the spool's drainer uses: straight to the
    /// broker (never back into the spool), refused messages
    /// dead-lettered.
    pub fn drain_publisher(&self) -> OutboxDrain {
        OutboxDrain {
            outbox: self.clone(),
            channel: Mutex::new(None),
        }
    }
}

fn refused(broker: &str, spool: &SpoolError) -> OutboxError {
    OutboxError {
        broker: broker.to_string(),
        spool: spool.to_string(),
    }
}

/// [`DrainPublisher`] over the confirmed publisher.
pub struct OutboxDrain {
    outbox: Outbox,
    /// The publish channel this pass's window goes out on (see
    /// [`Publisher::send_unbounded`]).
    channel: Mutex<Option<u64>>,
}

/// Pipelined: `publish` returns once the message is on the channel (in
/// stream order) and the drainer keeps a window of confirms in flight.
impl DrainPublisher for OutboxDrain {
    type Error = PublishError;
    type Confirm = std::pin::Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

    fn publish(
        &self,
        message: OutboundMessage,
    ) -> impl Future<Output = Result<Self::Confirm, PublishError>> + Send {
        let outbox = self.outbox.clone();
        async move {
            // The drainer sends one at a time, so the lock is never
            // contended; it is not held across the await.
            let mut channel = *lock(&self.channel);
            let sent_at = Instant::now();
            // Unbounded here: the drainer bounds the time without progress.
            let sent = outbox
                .publisher
                .send_unbounded(&message, &mut channel)
                .await;
            *lock(&self.channel) = channel;
            let confirm: Self::Confirm =
                match sent {
                    Ok(pending) => Box::pin(async move {
                        let confirmed = pending.await;
                        outbox
                            .settle(&message, confirmed, sent_at)
                            .await
                            .map(|_| ())
                    }),
                    // Refused before it was sent (a destination this session
                    // already knows is refused): its dead letter takes its
                    // place in the window, in stream order.
                    Err(e @ PublishError::Refused(_)) => Box::pin(async move {
                        outbox.settle(&message, Err(e), sent_at).await.map(|_| ())
                    }),
                    Err(e) => return Err(e),
                };
            Ok(confirm)
        }
    }

    fn is_blocked(&self) -> bool {
        self.outbox.publisher.is_blocked()
    }

    fn begin_pass(&self) {
        *lock(&self.channel) = None;
    }

    fn stalled(&self) {
        if let Some(epoch) = *lock(&self.channel) {
            self.outbox.publisher.retire_channel(epoch);
        }
    }
}

/// Counts refused outputs and logs them, at most one line per destination
/// and kind per [`REFUSAL_LOG_INTERVAL`] with the number since the last.
#[derive(Default)]
struct RefusalLog {
    last: Mutex<HashMap<(String, RefusalKind), (Instant, u64)>>,
}

/// Destinations remembered at most (then the memory starts over).
const MAX_LOGGED_DESTINATIONS: usize = 10_000;

impl RefusalLog {
    fn note(&self, r: &Refusal) {
        super::metric::output_dead_lettered(r.kind);
        let mut last = lock(&self.last);
        if last.len() > MAX_LOGGED_DESTINATIONS {
            last.clear();
        }
        let now = Instant::now();
        let since = match last.get_mut(&(r.exchange.clone(), r.kind)) {
            Some((at, n)) if now.duration_since(*at) < REFUSAL_LOG_INTERVAL => {
                *n += 1;
                return;
            }
            Some((at, n)) => {
                *at = now;
                std::mem::take(n)
            }
            None => {
                last.insert((r.exchange.clone(), r.kind), (now, 0));
                0
            }
        };
        drop(last);
        if r.kind == RefusalKind::TooLarge {
            tracing::error!(
                exchange = %r.exchange,
                routing_key = %r.routing_key,
                reply_text = %r.reply_text,
                more_since_last_line = since,
                "The broker refuses outputs this large; dead-lettering them without their body."
            );
        } else {
            tracing::warn!(
                exchange = %r.exchange,
                routing_key = %r.routing_key,
                reason = r.kind.as_str(),
                reply_code = r.reply_code,
                reply_text = %r.reply_text,
                more_since_last_line = since,
                "The broker refuses outputs to this destination; dead-lettering them."
            );
        }
    }
}
