//! The headers Warren reads and writes on messages, in one place.

use crate::message::{HeaderValue, MessageProperties};

/// How many times Warren has handed this message to a plugin (set on
/// retried copies; absent means 1).
pub const ATTEMPT: &str = "x-warren-attempt";
/// On dead letters: the plugin, its version, why, and the attempts made.
pub const PLUGIN: &str = "x-warren-plugin";
pub const VERSION: &str = "x-warren-version";
pub const REASON: &str = "x-warren-reason";
/// On dead letters: `reject`, `retries-exhausted`, `trap` or `unroutable`.
pub const OUTCOME: &str = "x-warren-outcome";
/// On dead letters of traps: `deadline`, `memory`, `panic` or `other`.
pub const TRAP: &str = "x-warren-trap";
pub const ATTEMPTS: &str = "x-warren-attempts";
/// On dead letters and retries: where the message was consumed from.
pub const QUEUE: &str = "x-warren-queue";
pub const ORIGINAL_EXCHANGE: &str = "x-warren-original-exchange";
pub const ORIGINAL_ROUTING_KEY: &str = "x-warren-original-routing-key";
/// W3C trace context, copied from a delivery onto its outputs.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The attempt number of a delivery: its `x-warren-attempt` header, else 1.
pub fn attempt(p: &MessageProperties) -> u32 {
    p.header(ATTEMPT)
        .and_then(HeaderValue::as_i64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

/// Copy the trace context of `from` onto `to` unless `to` has its own.
pub fn propagate_trace(from: &MessageProperties, to: &mut MessageProperties) {
    for key in [TRACEPARENT, TRACESTATE] {
        if to.header(key).is_none()
            && let Some(v) = from.header(key)
        {
            to.set_header(key, v.clone());
        }
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
    fn trace_context_is_copied_but_never_overwritten() {
        let mut from = MessageProperties::default();
        from.set_header(TRACEPARENT, HeaderValue::String("00-a-b-01".into()));
        let mut to = MessageProperties::default();
        propagate_trace(&from, &mut to);
        assert_eq!(to.header(TRACEPARENT), from.header(TRACEPARENT));
        let mut own = MessageProperties::default();
        own.set_header(TRACEPARENT, HeaderValue::String("00-c-d-01".into()));
        propagate_trace(&from, &mut own);
        assert_eq!(
            own.header(TRACEPARENT).and_then(HeaderValue::as_str),
            Some("00-c-d-01")
        );
    }
}
