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
/// Publish channels replaced, by reason (`nack`, `stall`).
pub const CHANNELS_REPLACED: &str = "warren_amqp_publish_channels_replaced_total";
/// 1 while the connection is running, 0 otherwise.
pub const CONNECTED: &str = "warren_amqp_connected";
/// Histogram: seconds from a publish being on the wire to its confirm.
pub const CONFIRM_SECONDS: &str = "warren_amqp_confirm_seconds";

/// HELP text of every metric above.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(RECONNECTS, "AMQP sessions lost, by failure class.");
    describe_counter!(
        CONNECT_FAILURES,
        "AMQP connection attempts that failed, by failure class."
    );
    describe_counter!(
        CONSUMER_REESTABLISHED,
        "Consumers re-established without a reconnect, by queue."
    );
    describe_counter!(
        ZOMBIE_CONSUMERS,
        "Consumers the broker no longer had at the periodic check, by queue."
    );
    describe_counter!(
        STALE_ACKS,
        "Acks for deliveries of an older channel or session (no-ops), by queue."
    );
    describe_counter!(
        CONSUMER_TIMEOUTS,
        "Consumers ended by the broker's consumer timeout, by queue."
    );
    describe_counter!(PUBLISHES, "Publishes to the broker, by outcome.");
    describe_counter!(
        CHANNELS_REPLACED,
        "Publish channels replaced, by reason: nack (the broker nacked a publish on it), stall (no confirms on a live connection)."
    );
    describe_gauge!(
        CONNECTED,
        "1 while the AMQP connection is running, 0 otherwise."
    );
    describe_histogram!(
        CONFIRM_SECONDS,
        metrics::Unit::Seconds,
        "Seconds from a publish being sent to the broker's confirm."
    );
}

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

pub(crate) fn channel_replaced(reason: &'static str) {
    metrics::counter!(CHANNELS_REPLACED, "reason" => reason).increment(1);
}

pub(crate) fn confirmed(took: std::time::Duration) {
    metrics::histogram!(CONFIRM_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn connected(up: bool) {
    metrics::gauge!(CONNECTED).set(if up { 1.0 } else { 0.0 });
}
