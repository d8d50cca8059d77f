//! The headers Warren reads and writes on messages, in one place.

use crate::message::{HeaderValue, MessageProperties};
use crate::telemetry::TraceContext;

/// How many times Warren has handed this message to a plugin (set on
/// retried copies; absent means 1).
pub const ATTEMPT: &str = "x-warren-attempt";
/// On dead letters: the plugin, its version, why, and the attempts made.
pub const PLUGIN: &str = "x-warren-plugin";
pub const VERSION: &str = "x-warren-version";
pub const REASON: &str = "x-warren-reason";
/// On dead letters: `reject`, `retries-exhausted`, `trap`, or for an
/// output the broker refused, the refusal's kind (`unroutable`,
/// `exchange_not_found`, `access_refused`, `too_large`,
/// `invalid_property`).
pub const OUTCOME: &str = "x-warren-outcome";
/// On dead-lettered outputs: the broker's reply code (312, 403, 404, 406)
/// and text.
pub const REPLY_CODE: &str = "x-warren-reply-code";
pub const REPLY_TEXT: &str = "x-warren-reply-text";
/// On the dead letter of an output too large for the broker: the size of
/// the body it had (the dead letter goes without it).
pub const BODY_DROPPED: &str = "x-warren-body-dropped";
/// On dead letters of traps: `deadline`, `memory`, `panic` or `other`.
pub const TRAP: &str = "x-warren-trap";
pub const ATTEMPTS: &str = "x-warren-attempts";
/// On dead letters and retries: where the message was consumed from.
pub const QUEUE: &str = "x-warren-queue";
pub const ORIGINAL_EXCHANGE: &str = "x-warren-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
/// A message's own `expiration`, kept here while Warren uses the property
/// (a retry copy's delay) or must not (a dead letter must not expire).
/// Restored into the property when the retried message is delivered again.
pub const ORIGINAL_EXPIRATION: &str = "x-warren-original-expiration";
/// W3C trace context: read from a delivery, written on its outputs as the
/// context of the delivery's span.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Move `p.expiration` into [`ORIGINAL_EXPIRATION`] (one already there,
/// from an earlier retry, is the original and stays).
pub fn stash_expiration(p: &mut MessageProperties) {
    if let Some(e) = p.expiration.take()
        && p.header(ORIGINAL_EXPIRATION).is_none()
    {
        p.set_header(ORIGINAL_EXPIRATION, HeaderValue::String(e));
    }
}

/// `p` as its publisher sent it, after a stay in a queue of Warren's that
/// `is_retry_queue` names: a stashed expiration back in the property (the header
/// gone), and the dead-lettering record the broker added when the delay
/// ran out (its `x-death` entry for that queue, and `x-first-death-*` /
/// `x-last-death-*` naming it) removed. Records of the publisher's own
/// dead-lettering stay.
pub fn as_published(
    mut p: MessageProperties,
    is_retry_queue: impl Fn(&str) -> bool,
) -> MessageProperties {
    // Per delivery: most have neither.
    if p.header("x-death").is_none() && p.header(ORIGINAL_EXPIRATION).is_none() {
        return p;
    }
    if let Some(HeaderValue::String(e)) = p.header(ORIGINAL_EXPIRATION).cloned() {
        p.headers.retain(|(k, _)| k != ORIGINAL_EXPIRATION);
        p.expiration = Some(e);
    }
    for prefix in ["x-first-death", "x-last-death"] {
        let queue = p
            .header(&format!("{prefix}-queue"))
            .and_then(HeaderValue::as_str);
        if queue.is_some_and(&is_retry_queue) {
            let start = format!("{prefix}-");
            p.headers.retain(|(k, _)| !k.starts_with(&start));
        }
    }
    if let Some((_, HeaderValue::Array(deaths))) =
        p.headers.iter_mut().find(|(k, _)| k == "x-death")
    {
        deaths.retain(|d| {
            let queue = match d {
                HeaderValue::Table(t) => t.iter().find(|(k, _)| k == "queue").map(|(_, v)| v),
                _ => None,
            };
            !queue
                .and_then(HeaderValue::as_str)
                .is_some_and(&is_retry_queue)
        });
        if deaths.is_empty() {
            p.headers.retain(|(k, _)| k != "x-death");
        }
    }
    p
}

/// The attempt number of a delivery: its `x-warren-attempt` header, else 1.
pub fn attempt(p: &MessageProperties) -> u32 {
    p.header(ATTEMPT)
        .and_then(HeaderValue::as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// The trace context a delivery carries in its `traceparent` header.
pub fn trace_parent(p: &MessageProperties) -> Option<TraceContext> {
    p.header(TRACEPARENT)
        .and_then(HeaderValue::as_str)
        .and_then(TraceContext::parse)
}

/// The `tracestate` a message came with.
pub fn trace_state(p: &MessageProperties) -> Option<&str> {
    p.header(TRACESTATE).and_then(HeaderValue::as_str)
}

/// Make `to` (an output of the delivery with properties `incoming`) carry
/// the trace context of its publish span, `span`. A plugin that set a
/// `traceparent` of its own keeps it; one copied from the delivery is
/// replaced, since the output is a child of this delivery, not of its
/// parent. `tracestate` is copied from the delivery unless `to` has one.
pub fn propagate_trace(
    incoming: &MessageProperties,
    span: &TraceContext,
    to: &mut MessageProperties,
) {
    let own = to.header(TRACEPARENT);
    if own.is_none() || own == incoming.header(TRACEPARENT) {
        to.set_header(TRACEPARENT, HeaderValue::String(span.traceparent()));
    }
    if to.header(TRACESTATE).is_none()
        && let Some(v) = incoming.header(TRACESTATE)
    {
        to.set_header(TRACESTATE, v.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_defaults_to_one_and_ignores_nonsense() {
        let mut p = MessageProperties::default();
        assert_eq!(attempt(&p), 1);
        p.set_header(ATTEMPT, HeaderValue::I64(3));
        assert_eq!(attempt(&p), 3);
        p.set_header(ATTEMPT, HeaderValue::I64(-2));
        assert_eq!(attempt(&p), 1);
        p.set_header(ATTEMPT, HeaderValue::String("x".into()));
        assert_eq!(attempt(&p), 1);
    }

    #[test]
    fn outputs_carry_the_span_context_unless_the_plugin_set_its_own() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut from = MessageProperties::default();
        from.set_header(TRACEPARENT, HeaderValue::String(parent.into()));
        from.set_header(TRACESTATE, HeaderValue::String("k=v".into()));
        let span = TraceContext::child_of(trace_parent(&from).as_ref());
        // Absent, or copied from the delivery: replaced by the span's.
        for mut to in [MessageProperties::default(), from.clone()] {
            propagate_trace(&from, &span, &mut to);
            let tp = to
                .header(TRACEPARENT)
                .and_then(HeaderValue::as_str)
                .unwrap();
            assert_eq!(tp, span.traceparent());
            assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert_eq!(to.header(TRACESTATE), from.header(TRACESTATE));
        }
        let mut own = MessageProperties::default();
        own.set_header(TRACEPARENT, HeaderValue::String("00-c-d-01".into()));
        propagate_trace(&from, &span, &mut own);
        assert_eq!(
            own.header(TRACEPARENT).and_then(HeaderValue::as_str),
            Some("00-c-d-01")
        );
    }

    #[test]
    fn a_retried_delivery_is_as_its_publisher_sent_it() {
        let retry = "warren.retry.orders";
        let mut p = MessageProperties::default();
        p.set_header("tenant", HeaderValue::String("acme".into()));
        p.set_header(ORIGINAL_EXPIRATION, HeaderValue::String("60000".into()));
        p.set_header("x-first-death-queue", HeaderValue::String(retry.into()));
        p.set_header(
            "x-first-death-reason",
            HeaderValue::String("expired".into()),
        );
        let death =
            |q: &str| HeaderValue::Table(vec![("queue".into(), HeaderValue::String(q.into()))]);
        p.set_header(
            "x-death",
            HeaderValue::Array(vec![death(retry), death("their-own")]),
        );
        let back = as_published(p, |q| q == retry);
        assert_eq!(back.expiration.as_deref(), Some("60000"));
        assert_eq!(
            back.headers,
            vec![
                ("tenant".into(), HeaderValue::String("acme".into())),
                (
                    "x-death".into(),
                    HeaderValue::Array(vec![death("their-own")])
                ),
            ]
        );
    }
}
