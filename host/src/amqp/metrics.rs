//! Metric names and labels of the AMQP module, defined in one place.
//! Labels are low-cardinality: failure classes, queue names, outcomes.

use super::failure::FailureClass;

/// Sessions lost, by failure class.
pub const RECONNECTS: &str = "warren_amqp_reconnects_total";
/// Connection attempts that failed, by failure class.
pub const CONNECT_FAILURES: &str = "warren_amqp_connect_failures_total";
/// Consumers re-established without a reconnect, by queue.
pub const CONSUMER_REESTABLISHED: &str = "warren_amqp_consumer_reestablished_total";
/// Consumers found missing on the broker by the periodic check, by queue.
pub const ZOMBIE_CONSUMERS: &str = "warren_amqp_zombie_consumers_total";
/// Acks for deliveries of an older channel or generation (no-ops), by queue.
pub const STALE_ACKS: &str = "warren_amqp_stale_acks_total";
/// Consumers ended by the broker's consumer timeout, by queue.
pub const CONSUMER_TIMEOUTS: &str = "warren_amqp_consumer_timeouts_total";
/// Publishes by outcome.
pub const PUBLISHES: &str = "warren_amqp_publishes_total";
/// 1 while the connection is running, 0 otherwise.
pub const CONNECTED: &str = "warren_amqp_connected";

pub(crate) fn reconnect(class: FailureClass) {
    metrics::counter!(RECONNECTS, "class" => class.as_str()).increment(1);
}

pub(crate) fn connect_failure(class: FailureClass) {
    metrics::counter!(CONNECT_FAILURES, "class" => class.as_str()).increment(1);
}

pub(crate) fn consumer_reestablished(queue: &str) {
    metrics::counter!(CONSUMER_REESTABLISHED, "queue" => queue.to_owned()).increment(1);
}

pub(crate) fn zombie(queue: &str) {
    metrics::counter!(ZOMBIE_CONSUMERS, "queue" => queue.to_owned()).increment(1);
}

pub(crate) fn consumer_timeout(queue: &str) {
    metrics::counter!(CONSUMER_TIMEOUTS, "queue" => queue.to_owned()).increment(1);
}

pub(crate) fn stale_ack(queue: &str) {
    metrics::counter!(STALE_ACKS, "queue" => queue.to_owned()).increment(1);
}

pub(crate) fn publish(outcome: &'static str) {
    metrics::counter!(PUBLISHES, "outcome" => outcome).increment(1);
}

pub(crate) fn connected(up: bool) {
    metrics::gauge!(CONNECTED).set(if up { 1.0 } else { 0.0 });
}
