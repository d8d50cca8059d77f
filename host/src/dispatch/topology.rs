//! What dispatch asks the broker to declare: each subscription's queue and
//! binding, a delayed-retry queue per subscription, and the dead-letter
//! exchange and queue.
//!
//! Retries: a retried message is republished to the direct exchange
//! `retry_exchange` with its queue name as routing key, into the classic
//! queue `<retry_exchange>.<queue>`, with a per-message TTL (`expiration`)
//! equal to the delay. That queue dead-letters expired messages through the
//! default exchange back to `<queue>`. The delay doubles per attempt, so a
//! message with a short delay can wait behind one with a longer delay (per
//! message TTLs expire at the head): the delay is a lower bound.

use std::time::Duration;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use crate::amqp::{BindingSpec, ExchangeSpec, ExchangeType, QueueSpec, QueueType, Topology};
use crate::message::HeaderValue;
use crate::plugins::manifest::{Binding, ExchangeKind, Outputs, QueueKind, Subscription};

/// `[dispatch]`: what happens to each outcome.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct DispatchConfig {
    /// Attempts before a message is dead-lettered (a subscription's
    /// `max-attempts` wins).
    pub max_attempts: u32,
    /// Delay before the first retry, ms; doubles per attempt.
    pub retry_delay_ms: u64,
    /// Longest retry delay, ms.
    pub retry_delay_max_ms: u64,
    /// Exchange (and queue prefix) Warren declares for delayed retries.
    pub retry_exchange: String,
    /// Dead-letter exchange Warren declares.
    pub dead_letter_exchange: String,
    /// Dead-letter queue bound to it.
    pub dead_letter_queue: String,
    /// `x-delivery-limit` of the quorum queues Warren declares: a message
    /// returned to its queue this many times (a channel closed while it was
    /// unacknowledged, a consumer timeout, a host killed mid-delivery) is
    /// dead-lettered by the broker into `dead-letter-queue`. RabbitMQ 4
    /// applies 20 when a queue sets none, and drops such a message when
    /// the queue has no dead-letter exchange; Warren sets both.
    pub delivery_limit: u32,
    /// The broker's consumer timeout, ms (RabbitMQ's `consumer_timeout`,
    /// 30 min unless the broker or a queue's `x-consumer-timeout` says
    /// otherwise). A route whose plugin deadline is longer is warned about
    /// at start: the broker would take each such delivery back mid-handle.
    pub broker_consumer_timeout_ms: u64,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            retry_delay_ms: 1_000,
            retry_delay_max_ms: 60_000,
            retry_exchange: "warren.retry".into(),
            dead_letter_exchange: "warren.dlx".into(),
            dead_letter_queue: "warren.dlq".into(),
            delivery_limit: 20,
            broker_consumer_timeout_ms: 1_800_000,
        }
    }
}

impl DispatchConfig {
    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_attempts == 0 {
            out.push("dispatch.max-attempts must be at least 1".into());
        }
        if self.delivery_limit == 0 {
            out.push("dispatch.delivery-limit must be at least 1".into());
        }
        if self.retry_delay_ms > self.retry_delay_max_ms {
            out.push("dispatch.retry-delay-ms exceeds retry-delay-max-ms".into());
        }
        for (key, name) in [
            ("retry-exchange", &self.retry_exchange),
            ("dead-letter-exchange", &self.dead_letter_exchange),
            ("dead-letter-queue", &self.dead_letter_queue),
        ] {
            if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
                out.push(format!(
                    "dispatch.{key} {name:?} must be 1 to 255 bytes and not start with 'amq.'"
                ));
            }
        }
        out
    }

    /// The broker's consumer timeout.
    pub fn broker_consumer_timeout(&self) -> Duration {
        Duration::from_millis(self.broker_consumer_timeout_ms)
    }

    /// The delay before attempt `next` (2, 3, ...).
    pub fn retry_delay_for(&self, next: u32) -> Duration {
        let doublings = next.saturating_sub(2).min(30);
        Duration::from_millis(self.retry_delay_ms)
            .saturating_mul(1u32 << doublings)
            .min(Duration::from_millis(self.retry_delay_max_ms))
    }

    /// The retry queue of `queue`. Names past AMQP's 255 bytes are
    /// shortened with a hash of the full name.
    pub fn retry_queue(&self, queue: &str) -> String {
        let name = format!("{}.{queue}", self.retry_exchange);
        if name.len() <= 255 {
            return name;
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in queue.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        let mut prefix = name;
        let mut cut = 255 - 17;
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
        format!("{prefix}.{h:016x}")
    }

    /// The topology shared by all subscriptions: retry exchange, dead-letter
    /// exchange and queue.
    pub fn base_topology(&self) -> Topology {
        Topology::default()
            .exchange(ExchangeSpec::durable(
                self.retry_exchange.clone(),
                ExchangeType::Direct,
            ))
            .exchange(ExchangeSpec::durable(
                self.dead_letter_exchange.clone(),
                ExchangeType::Fanout,
            ))
            .queue(QueueSpec::quorum(self.dead_letter_queue.clone()))
            .binding(BindingSpec::new(
                self.dead_letter_queue.clone(),
                self.dead_letter_exchange.clone(),
                "",
            ))
    }

    /// The topology one subscription needs: its queue (and exchange and
    /// bindings) and its retry queue. A quorum queue gets Warren's
    /// dead-letter exchange and an explicit delivery limit, so a message
    /// the broker gives up on (returned `delivery_limit` times) ends in the
    /// dead-letter queue with the broker's reason in `x-death`, never
    /// dropped. Messages that expire by the subscription's `message-ttl-ms`
    /// go there too (reason `expired`).
    pub fn subscription_topology(&self, s: &Subscription) -> Topology {
        let mut queue = match s.kind {
            QueueKind::Quorum => {
                let mut q = QueueSpec::quorum(s.queue.clone());
                q.dead_letter_exchange = Some(self.dead_letter_exchange.clone());
                q.delivery_limit = Some(self.delivery_limit);
                q
            }
            QueueKind::Classic => QueueSpec::durable(s.queue.clone()),
        };
        queue.message_ttl = s.message_ttl_ms.map(|ms| Duration::from_millis(ms.into()));
        let mut retry = QueueSpec::durable(self.retry_queue(&s.queue));
        retry.queue_type = QueueType::Classic;
        retry.dead_letter_exchange = Some(String::new());
        retry.dead_letter_routing_key = Some(s.queue.clone());
        let mut t = Topology::default()
            .exchange(ExchangeSpec::durable(
                self.retry_exchange.clone(),
                ExchangeType::Direct,
            ))
            .queue(queue)
            .queue(retry.clone())
            .binding(BindingSpec::new(
                retry.name.clone(),
                self.retry_exchange.clone(),
                s.queue.clone(),
            ));
        if let Some(b) = &s.bind {
            t = bound(t, &s.queue, b, false);
        }
        t
    }

    /// The destinations a plugin's manifest lists for its outputs, each
    /// declared only so that it exists (an existing one is used as it is).
    pub fn outputs_topology(&self, o: &Outputs) -> Topology {
        let mut t = Topology::default();
        for e in &o.exchanges {
            let mut spec = ExchangeSpec::durable(e.name.clone(), exchange_type(e.kind));
            spec.existing_ok = true;
            t = t.exchange(spec);
        }
        for q in &o.queues {
            let mut spec = match q.kind {
                QueueKind::Quorum => QueueSpec::quorum(q.name.clone()),
                QueueKind::Classic => QueueSpec::durable(q.name.clone()),
            };
            spec.existing_ok = true;
            if let Some(n) = q.max_length {
                spec.arguments
                    .push(("x-max-length".into(), HeaderValue::I64(n.into())));
            }
            t = t.queue(spec);
            if let Some(b) = &q.bind {
                t = bound(t, &q.name, b, true);
            }
        }
        t
    }
}

/// `t` with `b`'s exchange and one binding of `queue` per key (key "" when
/// there are none).
fn bound(mut t: Topology, queue: &str, b: &Binding, existing_ok: bool) -> Topology {
    let mut exchange = ExchangeSpec::durable(b.exchange.clone(), exchange_type(b.kind));
    exchange.existing_ok = existing_ok;
    t = t.exchange(exchange);
    if b.keys.is_empty() {
        t = t.binding(BindingSpec::new(queue, b.exchange.clone(), ""));
    }
    for key in &b.keys {
        t = t.binding(BindingSpec::new(queue, b.exchange.clone(), key.clone()));
    }
    t
}

fn exchange_type(k: ExchangeKind) -> ExchangeType {
    match k {
        ExchangeKind::Direct => ExchangeType::Direct,
        ExchangeKind::Fanout => ExchangeType::Fanout,
        ExchangeKind::Topic => ExchangeType::Topic,
        ExchangeKind::Headers => ExchangeType::Headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let c = DispatchConfig {
            retry_delay_ms: 100,
            retry_delay_max_ms: 500,
            ..DispatchConfig::default()
        };
        assert_eq!(c.retry_delay_for(2), Duration::from_millis(100));
        assert_eq!(c.retry_delay_for(3), Duration::from_millis(200));
        assert_eq!(c.retry_delay_for(4), Duration::from_millis(400));
        assert_eq!(c.retry_delay_for(5), Duration::from_millis(500));
        assert_eq!(c.retry_delay_for(99), Duration::from_millis(500));
    }

    #[test]
    fn outputs_are_declared_only_to_exist() {
        use crate::plugins::manifest::{OutputExchange, OutputQueue};
        let c = DispatchConfig::default();
        let t = c.outputs_topology(&Outputs {
            exchanges: vec![OutputExchange {
                name: "orders.routed".into(),
                kind: ExchangeKind::Topic,
            }],
            queues: vec![OutputQueue {
                name: "orders.routed.all".into(),
                kind: QueueKind::Quorum,
                bind: Some(Binding {
                    exchange: "orders.routed".into(),
                    kind: ExchangeKind::Topic,
                    keys: vec!["#".into()],
                }),
                max_length: Some(1000),
            }],
        });
        assert!(t.exchanges["orders.routed"].existing_ok);
        assert!(t.queues["orders.routed.all"].existing_ok);
        assert_eq!(
            t.queues["orders.routed.all"].arguments,
            vec![("x-max-length".to_owned(), HeaderValue::I64(1000))]
        );
        assert_eq!(
            t.bindings,
            vec![BindingSpec::new("orders.routed.all", "orders.routed", "#")]
        );
        // A subscription's own declaration of the same queue wins.
        let sub = Subscription {
            queue: "orders.routed.all".into(),
            kind: QueueKind::Quorum,
            bind: None,
            prefetch: 1,
            message_ttl_ms: None,
            max_attempts: None,
        };
        let both = c.subscription_topology(&sub).with_missing(t);
        assert!(!both.queues["orders.routed.all"].existing_ok);
        // A subscribed quorum queue dead-letters what the broker gives up on.
        let own = &both.queues["orders.routed.all"];
        assert_eq!(own.dead_letter_exchange.as_deref(), Some("warren.dlx"));
        assert_eq!(own.delivery_limit, Some(20));
        assert!(both.exchanges["orders.routed"].existing_ok);
    }

    #[test]
    fn nothing_rabbitmq_4_3_refuses_is_declared() {
        // 4.3 refuses transient non-exclusive queues and `x-queue-mode`.
        let c = DispatchConfig::default();
        for kind in [QueueKind::Quorum, QueueKind::Classic] {
            let sub = Subscription {
                queue: "q".into(),
                kind,
                bind: None,
                prefetch: 1,
                message_ttl_ms: Some(1000),
                max_attempts: None,
            };
            let t = c
                .base_topology()
                .with_missing(c.subscription_topology(&sub));
            for q in t.queues.values() {
                assert!(q.durable, "{} is transient", q.name);
                assert!(!q.field_table().contains_key("x-queue-mode"), "{}", q.name);
            }
        }
    }

    #[test]
    fn retry_queue_names_fit_amqp() {
        let c = DispatchConfig::default();
        assert_eq!(c.retry_queue("orders"), "warren.retry.orders");
        let long = "q".repeat(255);
        let a = c.retry_queue(&long);
        assert!(a.len() <= 255, "{}", a.len());
        assert_ne!(a, c.retry_queue(&"r".repeat(255)));
    }
}
