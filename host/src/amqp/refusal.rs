//! Permanent refusals: messages the broker will never take as they are,
//! told apart from transient failures, and remembered per session so the
//! next message to the same destination is refused here instead of on the
//! wire.
//!
//! Why remember: RabbitMQ answers a publish to a missing exchange (404), to
//! an exchange the user may not write (403) or with an over-size body (406)
//! by closing the channel, and every other publish in flight on that shared
//! confirm channel then fails with it. So before a message is sent:
//! - an exchange this session has not published to yet is checked once with
//!   a passive declare on a channel of its own (a 404 there closes nothing
//!   that matters), and the answer is kept for the session;
//! - an exchange the broker refused is refused here for a while
//!   ([`NOT_FOUND_TTL`], [`ACCESS_REFUSED_TTL`]), then tried again, so a
//!   destination declared or permitted later starts working by itself;
//! - a body over the broker's maximum size, once learned from a refusal, is
//!   refused here for the rest of the session.
//!
//! When a refusal closes the channel anyway (an exchange deleted since it
//! was checked, a permission, a size not yet learned), [`attribute`] reads
//! the broker's reply text to tell the message it names from the others
//! that merely shared the channel: only the named one is refused, the rest
//! failed transiently and may be sent again.
//!
//! Does no publishing itself; the publisher calls [`Screen::check`] before
//! each send and [`attribute`] on each channel failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lapin::options::ExchangeDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ExchangeKind};

use super::convert::short;
use crate::message::OutboundMessage;

/// How long a missing exchange is refused before it is checked again
/// (a passive declare on a side channel: cheap, so short).
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(1);
/// How long an exchange the broker refused access to is refused before a
/// publish tries again (that try closes the publish channel once more).
pub const ACCESS_REFUSED_TTL: Duration = Duration::from_secs(10);
/// Exchanges remembered at most; past it the memory starts over (a plugin
/// publishing to ever new exchange names must not grow it without bound).
const MAX_REMEMBERED: usize = 10_000;

/// What the broker refused a message for. The label is the `reason` of
/// `warren_outputs_dead_lettered_total` and of the dead letter's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// 312 NO_ROUTE: no queue is bound for it (mandatory publish).
    NoRoute,
    /// 404 NOT_FOUND: the exchange does not exist.
    NotFound,
    /// 403 ACCESS_REFUSED: no write permission on the exchange.
    AccessRefused,
    /// 406: the body is over the broker's `max_message_size`.
    TooLarge,
    /// 406: a property the broker rejects (`user-id` not the connection's
    /// user, an invalid `expiration`).
    InvalidProperty,
}

impl RefusalKind {
    /// Every kind, so their counters exist (at 0) before the first refusal.
    pub const ALL: [RefusalKind; 5] = [
        RefusalKind::NoRoute,
        RefusalKind::NotFound,
        RefusalKind::AccessRefused,
        RefusalKind::TooLarge,
        RefusalKind::InvalidProperty,
    ];

    /// The label used in metrics and dead-letter headers.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NoRoute => "unroutable",
            RefusalKind::NotFound => "exchange_not_found",
            RefusalKind::AccessRefused => "access_refused",
            RefusalKind::TooLarge => "too_large",
            RefusalKind::InvalidProperty => "invalid_property",
        }
    }
}

/// A message the broker will never take as it is, with the broker's reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "broker refused the message to exchange '{exchange}' with key '{routing_key}': {reply_code} {reply_text}"
)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// AMQP reply code: 312, 403, 404 or 406.
    pub reply_code: u16,
    /// The broker's reply text.
    pub reply_text: String,
}

impl Refusal {
    fn of(
        exchange: &str,
        routing_key: &str,
        kind: RefusalKind,
        reply_code: u16,
        reply_text: String,
    ) -> Self {
        Refusal {
            kind,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            reply_code,
            reply_text,
        }
    }
}

/// The parts of a message a broker's refusal text can name: kept beside a
/// publish in flight (not the body) to tell it from the others when the
/// channel fails.
#[derive(Debug, Clone)]
pub(crate) struct Subject {
    pub(crate) exchange: String,
    pub(crate) routing_key: String,
    user_id: Option<String>,
    expiration: Option<String>,
    body_len: u64,
}

impl Subject {
    pub(crate) fn of(msg: &OutboundMessage) -> Self {
        Subject {
            exchange: msg.exchange.clone(),
            routing_key: msg.routing_key.clone(),
            user_id: msg.properties.user_id.clone(),
            expiration: msg.properties.expiration.clone(),
            body_len: msg.body.len() as u64,
        }
    }

    fn refusal(&self, kind: RefusalKind, reply_code: u16, reply_text: String) -> Refusal {
        Refusal::of(
            &self.exchange,
            &self.routing_key,
            kind,
            reply_code,
            reply_text,
        )
    }

    /// A 312 NO_ROUTE `basic.return` of this message.
    pub(crate) fn no_route(&self, reply_code: u16, reply_text: String) -> Refusal {
        self.refusal(RefusalKind::NoRoute, reply_code, reply_text)
    }
}

/// Whether the channel failure with `code` and `text` (the broker's reply
/// that closed the channel) names the message `s`. `None`: it does not, the
/// message only shared the channel with the one that was refused.
pub(crate) fn attribute(code: u16, text: &str, s: &Subject) -> Option<Refusal> {
    let exchange = if s.exchange.is_empty() {
        "amq.default"
    } else {
        s.exchange.as_str()
    };
    let named = |what: &str, value: &str| text.contains(&format!("{what} '{value}'"));
    let kind = match code {
        404 if named("no exchange", exchange) => RefusalKind::NotFound,
        403 if named("exchange", exchange) => RefusalKind::AccessRefused,
        406 => match too_large(text) {
            Some((size, _)) if size == s.body_len => RefusalKind::TooLarge,
            Some(_) => return None,
            None => {
                let user = s
                    .user_id
                    .as_deref()
                    .is_some_and(|u| named("user_id property set to", u));
                let expiration = s
                    .expiration
                    .as_deref()
                    .is_some_and(|e| named("invalid expiration", e));
                if !(user || expiration) {
                    return None;
                }
                RefusalKind::InvalidProperty
            }
        },
        _ => return None,
    };
    Some(s.refusal(kind, code, text.to_owned()))
}

/// `(message size, max size)` from RabbitMQ's "message size N is larger
/// than [configured] max size M".
fn too_large(text: &str) -> Option<(u64, u64)> {
    let number_after = |marker: &str| -> Option<u64> {
        let rest = &text[text.find(marker)? + marker.len()..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    if !text.contains("is larger than") {
        return None;
    }
    Some((number_after("message size ")?, number_after("max size ")?))
}

enum Verdict {
    /// A passive declare found it in this session.
    Exists,
    /// Refused until the instant; the refusal is the template for messages
    /// to this exchange.
    Refused(Refusal, Instant),
}

#[derive(Default)]
struct Memory {
    generation: u64,
    exchanges: HashMap<String, Verdict>,
    /// Largest body the broker takes, once a refusal said so.
    max_body: Option<(u64, String)>,
}

/// The session's memory of refusals (cheap to clone; shared by every
/// publisher handle).
#[derive(Clone, Default)]
pub(crate) struct Screen {
    memory: Arc<Mutex<Memory>>,
    /// One passive check at a time: a burst of messages to a new exchange
    /// costs one declare, not one each.
    checking: Arc<tokio::sync::Mutex<()>>,
}

impl Screen {
    fn memory(&self, generation: u64) -> MutexGuard<'_, Memory> {
        let mut m = crate::sync::lock(&self.memory);
        if m.generation != generation || m.exchanges.len() > MAX_REMEMBERED {
            // A new session: exchanges may have come or gone, the broker's
            // limits may differ.
            *m = Memory {
                generation,
                ..Memory::default()
            };
        }
        m
    }

    /// `Some(refusal)` when `msg` is known to be refused; checks an exchange
    /// not seen in this session first.
    pub(crate) async fn check(
        &self,
        conn: &Connection,
        generation: u64,
        msg: &OutboundMessage,
    ) -> Option<Refusal> {
        match self.remembered(generation, msg) {
            Known::Refused(r) => return Some(r),
            Known::Fine => return None,
            Known::Unknown => {}
        }
        let _one = self.checking.lock().await;
        // Another task may have checked it while this one waited.
        match self.remembered(generation, msg) {
            Known::Refused(r) => return Some(r),
            Known::Fine => return None,
            Known::Unknown => {}
        }
        match exchange_exists(conn, &msg.exchange).await {
            Ok(()) => {
                self.memory(generation)
                    .exchanges
                    .insert(msg.exchange.clone(), Verdict::Exists);
                None
            }
            Err(Some(text)) => {
                let r = Refusal::of(
                    &msg.exchange,
                    &msg.routing_key,
                    RefusalKind::NotFound,
                    404,
                    text,
                );
                self.remember(generation, &r);
                Some(r)
            }
            // Could not tell (the check itself failed): let the publish
            // decide.
            Err(None) => None,
        }
    }

    fn remembered(&self, generation: u64, msg: &OutboundMessage) -> Known {
        let m = self.memory(generation);
        if let Some((max, text)) = &m.max_body
            && msg.body.len() as u64 > *max
        {
            let text = format!(
                "{text} (learned from an earlier refusal; this message is {} bytes)",
                msg.body.len()
            );
            return Known::Refused(Refusal::of(
                &msg.exchange,
                &msg.routing_key,
                RefusalKind::TooLarge,
                406,
                text,
            ));
        }
        if msg.exchange.is_empty() {
            return Known::Fine;
        }
        match m.exchanges.get(&msg.exchange) {
            Some(Verdict::Exists) => Known::Fine,
            Some(Verdict::Refused(r, until)) if Instant::now() < *until => {
                Known::Refused(Refusal {
                    routing_key: msg.routing_key.clone(),
                    ..r.clone()
                })
            }
            _ => Known::Unknown,
        }
    }

    /// Forget what is known of `exchange` (it was declared again).
    pub(crate) fn forget(&self, exchange: &str) {
        crate::sync::lock(&self.memory).exchanges.remove(exchange);
    }

    /// Remember what the broker refused: the exchange for a while, or its
    /// maximum body size.
    pub(crate) fn remember(&self, generation: u64, r: &Refusal) {
        let mut m = self.memory(generation);
        let ttl = match r.kind {
            RefusalKind::NotFound => NOT_FOUND_TTL,
            RefusalKind::AccessRefused => ACCESS_REFUSED_TTL,
            RefusalKind::TooLarge => {
                if let Some((_, max)) = too_large(&r.reply_text) {
                    m.max_body = Some((max, r.reply_text.clone()));
                }
                return;
            }
            RefusalKind::NoRoute | RefusalKind::InvalidProperty => return,
        };
        m.exchanges.insert(
            r.exchange.clone(),
            Verdict::Refused(r.clone(), Instant::now() + ttl),
        );
    }
}

enum Known {
    Fine,
    Refused(Refusal),
    Unknown,
}

/// A passive declare of `exchange` on a channel of its own. `Err(Some)`:
/// the broker says it does not exist (its text); `Err(None)`: the check
/// could not be made.
async fn exchange_exists(conn: &Connection, exchange: &str) -> Result<(), Option<String>> {
    let channel = conn.create_channel().await.map_err(|_| None)?;
    let declared = channel
        .exchange_declare(
            short(exchange),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(()) => {
            let _ = channel.close(200, "checked".into()).await;
            Ok(())
        }
        // The 404 closed the channel already.
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => {
                Err(Some(amqp.get_message().to_string()))
            }
            _ => Err(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(exchange: &str, body: usize) -> OutboundMessage {
        OutboundMessage::new(exchange, "rk", vec![b'x'; body])
    }

    #[test]
    fn a_channel_close_is_pinned_on_the_message_it_names() {
        let text = "NOT_FOUND - no exchange 'orders.routed' in vhost '/'";
        let r = attribute(404, text, &Subject::of(&msg("orders.routed", 1))).unwrap();
        assert_eq!((r.kind, r.reply_code), (RefusalKind::NotFound, 404));
        assert_eq!(attribute(404, text, &Subject::of(&msg("orders", 1))), None);

        let text = "ACCESS_REFUSED - access to exchange 'secret' in vhost '/' refused for user 'u'";
        assert_eq!(
            attribute(403, text, &Subject::of(&msg("secret", 1))).map(|r| r.kind),
            Some(RefusalKind::AccessRefused)
        );
        assert_eq!(attribute(403, text, &Subject::of(&msg("open", 1))), None);
        let text =
            "ACCESS_REFUSED - access to exchange 'amq.default' in vhost '/' refused for user 'u'";
        assert!(attribute(403, text, &Subject::of(&msg("", 1))).is_some());

        let text =
            "PRECONDITION_FAILED - message size 2048 is larger than configured max size 1024";
        assert_eq!(
            attribute(406, text, &Subject::of(&msg("any", 2048))).map(|r| r.kind),
            Some(RefusalKind::TooLarge)
        );
        assert_eq!(attribute(406, text, &Subject::of(&msg("any", 10))), None);
        assert_eq!(
            attribute(
                406,
                "PRECONDITION_FAILED - something else",
                &Subject::of(&msg("a", 1))
            ),
            None
        );

        let mut m = msg("a", 1);
        m.properties.user_id = Some("mallory".into());
        let text = "PRECONDITION_FAILED - user_id property set to 'mallory' but authenticated user was 'guest'";
        assert_eq!(
            attribute(406, text, &Subject::of(&m)).map(|r| r.kind),
            Some(RefusalKind::InvalidProperty)
        );
        assert_eq!(attribute(406, text, &Subject::of(&msg("a", 1))), None);
    }

    #[test]
    fn a_learned_size_limit_refuses_larger_bodies_for_the_session() {
        let screen = Screen::default();
        let text =
            "PRECONDITION_FAILED - message size 2048 is larger than configured max size 1024";
        let r = attribute(406, text, &Subject::of(&msg("a", 2048))).unwrap();
        screen.remember(1, &r);
        assert!(matches!(
            screen.remembered(1, &msg("", 1025)),
            Known::Refused(_)
        ));
        assert!(matches!(screen.remembered(1, &msg("", 1024)), Known::Fine));
        // A new session forgets it.
        assert!(matches!(screen.remembered(2, &msg("", 4096)), Known::Fine));
    }

    #[test]
    fn a_refused_exchange_is_refused_until_its_ttl_ends() {
        let screen = Screen::default();
        let text = "ACCESS_REFUSED - access to exchange 'secret' in vhost '/' refused for user 'u'";
        let r = attribute(403, text, &Subject::of(&msg("secret", 1))).unwrap();
        screen.remember(1, &r);
        match screen.remembered(1, &msg("secret", 1)) {
            Known::Refused(again) => assert_eq!(again.kind, RefusalKind::AccessRefused),
            _ => panic!("not remembered"),
        }
        assert!(matches!(
            screen.remembered(1, &msg("other", 1)),
            Known::Unknown
        ));
    }
}
