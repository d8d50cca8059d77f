//! Dispatch's metric names and labels, in one place. Labels are plugin
//! names, queue names and fixed words: low cardinality.

use std::time::Duration;

use crate::plugins::Outcome;

/// Counter: deliveries handled, by `plugin` and `outcome`
/// (ack, retry, reject, trap).
pub const DELIVERIES: &str = "warren_deliveries_total";
/// Histogram: seconds in `handle`, by `plugin`, `queue` and `outcome`.
pub const HANDLE_SECONDS: &str = "warren_handle_seconds";
/// Counter: traps, by `plugin` and `kind` (deadline, memory, panic, other).
pub const TRAPS: &str = "warren_traps_total";
/// Counter: messages dead-lettered, by `plugin` and `outcome`.
pub const DEAD_LETTERED: &str = "warren_dead_lettered_total";
/// Counter: retries scheduled, by `queue`.
pub const RETRIED: &str = "warren_retries_total";
/// Counter: deliveries whose channel went away before they were settled
/// (the broker redelivers them), by `queue`.
pub const STALE_SETTLES: &str = "warren_stale_settles_total";
/// Counter: outputs the broker refused for good and Warren dead-lettered,
/// by `reason` (unroutable, exchange_not_found, access_refused, too_large,
/// invalid_property).
pub const OUTPUTS_DEAD_LETTERED: &str = "warren_outputs_dead_lettered_total";
/// Counter: destinations Warren declares that were found missing when an
/// output was refused, and re-declared, by `destination` (the exchange, or
/// the queue for the default exchange: names from manifests and Warren's
/// own configuration, so few).
pub const DESTINATIONS_REDECLARED: &str = "warren_destinations_redeclared_total";
/// Counter: outbox publishes refused by both broker and spool.
pub const OUTBOX_REFUSED: &str = "warren_outbox_refused_total";

/// HELP text of every metric above (and of the reload counter).
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(
        DELIVERIES,
        "Deliveries handled, by plugin and outcome (ack, retry, reject, trap)."
    );
    describe_histogram!(
        HANDLE_SECONDS,
        metrics::Unit::Seconds,
        "Seconds a plugin took to handle a delivery, by plugin, queue and outcome."
    );
    describe_counter!(
        TRAPS,
        "Plugin traps, by plugin and kind (deadline, memory, panic, other)."
    );
    describe_counter!(
        DEAD_LETTERED,
        "Deliveries dead-lettered, by plugin and outcome (reject, trap, retries-exhausted)."
    );
    describe_counter!(RETRIED, "Retries scheduled, by queue.");
    describe_counter!(
        STALE_SETTLES,
        "Deliveries whose channel went away before they were settled (the broker redelivers them), by queue."
    );
    describe_counter!(
        OUTPUTS_DEAD_LETTERED,
        "Outputs the broker refused for good and Warren dead-lettered, by reason."
    );
    describe_counter!(
        DESTINATIONS_REDECLARED,
        "Destinations Warren declares, found missing when an output was refused, and re-declared, by destination."
    );
    describe_counter!(
        OUTBOX_REFUSED,
        "Output publishes refused by both the broker and the spool (retried)."
    );
    describe_counter!(
        super::reload::RELOADS,
        "Plugin reloads, by result (ok, partial, error)."
    );
    // Alerts take the rate of these; a series that appears only at its
    // first increment has no rate then.
    for kind in crate::amqp::RefusalKind::ALL {
        metrics::counter!(OUTPUTS_DEAD_LETTERED, "reason" => kind.as_str()).increment(0);
    }
    metrics::counter!(OUTBOX_REFUSED).increment(0);
}

/// One plugin's per-delivery metric handles, resolved once per route and
/// plugin: looking a labelled metric up by name on every delivery (two
/// label allocations, a hash and the registry's lock) cost more than the
/// increment itself on the drain path.
pub(crate) struct PluginMetrics {
    plugin: String,
    ack: OutcomeMetrics,
    retry: OutcomeMetrics,
    reject: OutcomeMetrics,
    trap: OutcomeMetrics,
}

/// The count and the handle time of one outcome.
struct OutcomeMetrics {
    count: metrics::Counter,
    seconds: metrics::Histogram,
}

impl PluginMetrics {
    pub(crate) fn new(plugin: &str, queue: &str) -> Self {
        let outcome = |label: &'static str| OutcomeMetrics {
            count: metrics::counter!(DELIVERIES, "plugin" => plugin.to_string(), "outcome" => label),
            seconds: metrics::histogram!(HANDLE_SECONDS, "plugin" => plugin.to_string(), "queue" => queue.to_string(), "outcome" => label),
        };
        // The route's retry count exists (at 0) before its first retry, so
        // its rate does.
        metrics::counter!(RETRIED, "queue" => queue.to_string()).increment(0);
        Self {
            plugin: plugin.to_string(),
            ack: outcome("ack"),
            retry: outcome("retry"),
            reject: outcome("reject"),
            trap: outcome("trap"),
        }
    }

    /// The plugin these handles are labelled with.
    pub(crate) fn plugin(&self) -> &str {
        &self.plugin
    }

    /// One delivery `plugin` handled: its outcome counted (for
    /// `/plugins` and Prometheus) and its handle time recorded.
    pub(crate) fn handled(
        &self,
        plugin: &crate::plugins::Plugin,
        outcome: &Outcome,
        took: Duration,
    ) {
        plugin.count(outcome);
        let m = match outcome {
            Outcome::Ack { .. } => &self.ack,
            Outcome::Retry { .. } => &self.retry,
            Outcome::Reject { .. } => &self.reject,
            Outcome::Trapped { kind, .. } => {
                // Rare: looked up when it happens.
                metrics::counter!(TRAPS, "plugin" => self.plugin.clone(), "kind" => kind.as_str())
                    .increment(1);
                &self.trap
            }
        };
        m.count.increment(1);
        m.seconds.record(took.as_secs_f64());
    }
}

pub(crate) fn dead_lettered(plugin: &str, outcome: &str) {
    metrics::counter!(DEAD_LETTERED, "plugin" => plugin.to_string(), "outcome" => outcome.to_string())
        .increment(1);
}

pub(crate) fn retried(queue: &str) {
    metrics::counter!(RETRIED, "queue" => queue.to_string()).increment(1);
}

pub(crate) fn stale_settle(queue: &str) {
    metrics::counter!(STALE_SETTLES, "queue" => queue.to_string()).increment(1);
}

pub(crate) fn outbox_refused() {
    metrics::counter!(OUTBOX_REFUSED).increment(1);
}

pub(crate) fn output_dead_lettered(kind: crate::amqp::RefusalKind) {
    metrics::counter!(OUTPUTS_DEAD_LETTERED, "reason" => kind.as_str()).increment(1);
}

pub(crate) fn destination_redeclared(destination: &str) {
    metrics::counter!(DESTINATIONS_REDECLARED, "destination" => destination.to_owned())
        .increment(1);
}
