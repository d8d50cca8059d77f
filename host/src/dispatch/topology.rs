//! What dispatch asks the broker to declare: each subscription's queue and
//! binding, a delayed-retry queue per subscription, and the dead-letter
//! exchange and queue.
//!
//! Retries wait in delay tiers: one quorum queue per delay, shared by every
//! subscription. The tiers are `retry-delay-ms` doubled until
//! `retry-delay-max-ms`, which is the last (1 s, 2 s, ... 32 s, 60 s by
//! default), so every delay of the backoff schedule is a tier. Tier `d` is
//! the fanout exchange `<retry-exchange>.<d>` bound to the quorum queue of
//! the same name, whose fixed `x-message-ttl` is `d` and which
//! dead-letters (at least once) through the default exchange with the
//! message's own routing key: a retry copy is published to its tier with
//! the queue it came from as routing key, so it returns there when `d`
//! runs out. A queue-wide TTL expires messages in arrival order, so in one
//! tier nothing waits behind a longer delay; a requested delay goes to the
//! smallest tier at least as long (the longest tier past that), so it is
//! honoured within one tier, never early. Quorum queues are replicated, so
//! a dead node never stops retries.
//!
//! At-least-once dead-lettering keeps a retry whose queue no longer exists
//! in its tier and tries it again later (RabbitMQ's dead-letter worker
//! buffers what routes nowhere): a consumed queue Warren re-creates gets
//! them back, but retries of a queue deleted for good stay, and since the
//! worker takes at most `dead_letter_worker_consumer_prefetch` messages at
//! once, enough of them would hold the tier's later expiries. Delete such
//! a queue's retries (or the tier, which Warren declares again) when
//! retiring a route.

use std::time::Duration;

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};

use crate::amqp::{BindingSpec, ExchangeSpec, ExchangeType, QueueSpec, Topology};
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
    /// Name prefix of the retry delay tiers Warren declares: an exchange
    /// and a quorum queue `<retry-exchange>.<delay>` per tier (`.1s`,
    /// `.2s`, ... `.60s` by default; `ms` for delays that are not whole
    /// seconds).
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

    /// The retry delay tiers, shortest first: `retry-delay-ms` doubled
    /// while shorter than `retry-delay-max-ms`, then that maximum.
    pub fn retry_tiers(&self) -> Vec<Duration> {
        let max = Duration::from_millis(self.retry_delay_max_ms.max(1));
        let mut tier = Duration::from_millis(self.retry_delay_ms.max(1)).min(max);
        let mut out = Vec::new();
        while tier < max {
            out.push(tier);
            tier = tier.saturating_mul(2);
        }
        out.push(max);
        out
    }

    /// The tier a retry delayed by `delay` waits in: the shortest at least
    /// as long, or the longest.
    pub fn retry_tier_for(&self, delay: Duration) -> Duration {
        let tiers = self.retry_tiers();
        let longest = tiers.last().copied().unwrap_or(delay);
        tiers.into_iter().find(|t| *t >= delay).unwrap_or(longest)
    }

    /// The name of tier `tier`'s exchange and queue. A name past AMQP's
    /// 255 bytes keeps the whole suffix and as much of the prefix as fits.
    pub fn retry_tier_name(&self, tier: Duration) -> String {
        let ms = tier.as_millis();
        let suffix = if ms.is_multiple_of(1000) {
            format!(".{}s", ms / 1000)
        } else {
            format!(".{ms}ms")
        };
        let mut prefix = self.retry_exchange.clone();
        let mut cut = prefix.len().min(255 - suffix.len());
        while !prefix.is_char_boundary(cut) {
            cut -= 1;
        }
        prefix.truncate(cut);
        prefix + &suffix
    }

    /// Whether `name` is a queue a retry of `queue` waited in: a tier, or
    /// the classic queue `<retry-exchange>.<queue>` (not declared, but one
    /// that exists on the broker still dead-letters into `queue`).
    pub fn is_retry_queue(&self, name: &str, queue: &str) -> bool {
        name.strip_prefix(self.retry_exchange.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|rest| rest == queue)
            || self
                .retry_tiers()
                .into_iter()
                .any(|t| self.retry_tier_name(t) == name)
    }

    /// The topology shared by all subscriptions: the retry tiers, the
    /// dead-letter exchange and queue.
    pub fn base_topology(&self) -> Topology {
        let mut t = Topology::default();
        for tier in self.retry_tiers() {
            let name = self.retry_tier_name(tier);
            let mut q = QueueSpec::quorum(name.clone());
            q.message_ttl = Some(tier);
            // The default exchange, with the routing key the copy was
            // published with: the queue it came from.
            q.dead_letter_exchange = Some(String::new());
            // At-least-once dead-lettering keeps an expired copy until the
            // queue it returns to has confirmed it; it needs reject-publish.
            q.arguments.push((
                "x-dead-letter-strategy".into(),
                HeaderValue::String("at-least-once".into()),
            ));
            q.arguments.push((
                "x-overflow".into(),
                HeaderValue::String("reject-publish".into()),
            ));
            t = t
                .exchange(ExchangeSpec::durable(name.clone(), ExchangeType::Fanout))
                .queue(q)
                .binding(BindingSpec::new(name.clone(), name, ""));
        }
        t.exchange(ExchangeSpec::durable(
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
    /// bindings). A quorum queue gets Warren's
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
        let mut t = Topology::default().queue(queue);
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
            dedup: None,
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
                dedup: None,
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
    fn retry_tiers_double_up_to_the_maximum() {
        let c = DispatchConfig::default();
        let secs = |s: u64| Duration::from_secs(s);
        assert_eq!(c.retry_tiers(), [1, 2, 4, 8, 16, 32, 60].map(secs).to_vec());
        // Every delay of the backoff schedule is a tier.
        for n in 2..12 {
            let d = c.retry_delay_for(n);
            assert_eq!(c.retry_tier_for(d), d);
        }
        // A requested delay: the shortest tier at least as long.
        assert_eq!(c.retry_tier_for(Duration::from_millis(1)), secs(1));
        assert_eq!(c.retry_tier_for(Duration::from_millis(1001)), secs(2));
        assert_eq!(c.retry_tier_for(secs(33)), secs(60));
        assert_eq!(c.retry_tier_for(secs(3600)), secs(60));
        let quick = DispatchConfig {
            retry_delay_ms: 50,
            retry_delay_max_ms: 200,
            ..DispatchConfig::default()
        };
        let names: Vec<String> = quick
            .retry_tiers()
            .into_iter()
            .map(|t| quick.retry_tier_name(t))
            .collect();
        assert_eq!(
            names,
            [
                "warren.retry.50ms",
                "warren.retry.100ms",
                "warren.retry.200ms"
            ]
        );
        assert!(quick.is_retry_queue("warren.retry.100ms", "orders"));
        assert!(quick.is_retry_queue("warren.retry.orders", "orders"));
        assert!(!quick.is_retry_queue("warren.retry.orders", "other"));
        assert!(!quick.is_retry_queue("warren.retry.1s", "orders"));
    }

    #[test]
    fn retry_tiers_are_replicated_and_return_to_their_queue() {
        let c = DispatchConfig::default();
        let t = c.base_topology();
        let q = &t.queues["warren.retry.4s"];
        assert_eq!(q.queue_type, crate::amqp::QueueType::Quorum);
        assert_eq!(q.message_ttl, Some(Duration::from_secs(4)));
        assert_eq!(q.dead_letter_exchange.as_deref(), Some(""));
        assert_eq!(q.dead_letter_routing_key, None);
        assert_eq!(t.exchanges["warren.retry.4s"].kind, ExchangeType::Fanout);
        assert!(
            t.bindings
                .contains(&BindingSpec::new("warren.retry.4s", "warren.retry.4s", ""))
        );
    }

    #[test]
    fn retry_tier_names_fit_amqp() {
        let c = DispatchConfig {
            retry_exchange: "r".repeat(255),
            ..DispatchConfig::default()
        };
        let a = c.retry_tier_name(Duration::from_secs(60));
        assert_eq!(a.len(), 255);
        assert!(a.ends_with(".60s"));
    }
}
