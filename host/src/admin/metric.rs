//! Gauges sampled from the handles each time `/metrics` is scraped, named
//! in one place. Labels are queue names and fixed words.
//!
//! Counters are emitted where things happen (`amqp::metrics`,
//! `buffer::metric`, `dispatch::metric`, `dispatch::reload::RELOADS`); the
//! spool's depth, bytes and oldest age are gauges the spool keeps current.

use super::AdminView;
use crate::amqp::ConnectionState;

/// Gauge: 1 for the connection's current state, 0 for the others, by
/// `state` (connecting, declaring, running, blocked, recovering,
/// auth-failed, stopping, stopped).
pub const CONNECTION_STATE: &str = "warren_amqp_connection_state";
/// Gauge: the connection's session generation.
pub const GENERATION: &str = "warren_amqp_generation";
/// Gauge: consumers Warren believes it has, by `queue`.
pub const CONSUMERS: &str = "warren_consumers";
/// Gauge: the broker's consumer count at the last check, by `queue`.
pub const BROKER_CONSUMERS: &str = "warren_broker_consumers";
/// Gauge: ready messages in the queue at the last check (the lag), by
/// `queue`.
pub const QUEUE_DEPTH: &str = "warren_queue_depth";
/// Gauge: ready messages waiting at the broker for a route at the last
/// consumer check, by `queue` and `plugin`.
pub const ROUTE_READY: &str = "warren_route_ready_messages";
/// Gauge: deliveries the broker holds unacknowledged for this Warren's
/// consumer of a route, at the last consumer check, by `queue` and
/// `plugin`.
pub const ROUTE_UNACKED: &str = "warren_route_unacked_messages";
/// Gauge: deliveries a route's plugin is handling now (taken and not yet
/// settled), by `queue` and `plugin`.
pub const ROUTE_IN_FLIGHT: &str = "warren_route_in_flight";
/// Gauge: 1 while ready.
pub const READY: &str = "warren_ready";
/// Gauge: 1 while the spool drain is stalled (entries waiting, the broker
/// connected, nothing drained for `spool.drain-stalled-after-ms`).
pub const DRAIN_STALLED: &str = "warren_spool_drain_stalled";
/// Gauge: plugins loaded.
pub const PLUGINS_LOADED: &str = "warren_plugins_loaded";
/// Gauge: plugin files that failed at the last start or reload.
pub const PLUGINS_FAILED: &str = "warren_plugins_failed";
/// Gauge: always 1, labelled with Warren's `version`.
pub const BUILD_INFO: &str = "warren_build_info";

/// Describe every metric Warren exports (their HELP text) and set
/// [`BUILD_INFO`]. Call once the recorder is installed; again is harmless.
pub(crate) fn describe_all() {
    use metrics::describe_gauge;
    crate::amqp::metrics::describe();
    crate::buffer::metric::describe();
    crate::kv::metric::describe();
    crate::dispatch::metric::describe();
    crate::dispatch::dedup::describe();
    describe_gauge!(
        CONNECTION_STATE,
        "1 for the AMQP connection's current state, 0 for the others, by state."
    );
    describe_gauge!(GENERATION, "The AMQP connection's session generation.");
    describe_gauge!(CONSUMERS, "Consumers Warren believes it has, by queue.");
    describe_gauge!(
        BROKER_CONSUMERS,
        "The broker's consumer count at the last check, by queue."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Ready messages in the queue at the last check (the lag), by queue."
    );
    describe_gauge!(
        ROUTE_READY,
        "Ready messages waiting at the broker for the route at the last consumer check, by queue and plugin."
    );
    describe_gauge!(
        ROUTE_UNACKED,
        "Deliveries the broker holds unacknowledged for this Warren's consumer of the route at the last consumer check, by queue and plugin."
    );
    describe_gauge!(
        ROUTE_IN_FLIGHT,
        "Deliveries the route's plugin is handling now (taken, not yet settled), by queue and plugin."
    );
    describe_gauge!(READY, "1 while Warren is ready to receive work.");
    describe_gauge!(
        DRAIN_STALLED,
        "1 while the spool drain makes no progress with entries waiting and the broker connected."
    );
    describe_gauge!(PLUGINS_LOADED, "Plugins loaded.");
    describe_gauge!(
        PLUGINS_FAILED,
        "Plugin files that failed at the last start or reload."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the version label is Warren's.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

const STATES: [&str; 8] = [
    "connecting",
    "declaring",
    "running",
    "blocked",
    "recovering",
    "auth-failed",
    "stopping",
    "stopped",
];

/// Set every gauge from the current state of `app`.
pub(crate) fn sample(app: &AdminView) {
    let status = app.amqp.status_now();
    let current = status.state.name();
    for s in STATES {
        metrics::gauge!(CONNECTION_STATE, "state" => s).set(if s == current { 1.0 } else { 0.0 });
    }
    metrics::gauge!(GENERATION).set(status.generation as f64);
    debug_assert!(
        STATES.contains(&ConnectionState::Running.name()),
        "state names listed"
    );
    for c in app.amqp.consumers() {
        metrics::gauge!(CONSUMERS, "queue" => c.queue.clone()).set(f64::from(c.believed_consumers));
        if let Some((n, _)) = c.broker_consumers {
            metrics::gauge!(BROKER_CONSUMERS, "queue" => c.queue.clone()).set(f64::from(n));
        }
        if let Some(n) = c.broker_messages {
            metrics::gauge!(QUEUE_DEPTH, "queue" => c.queue.clone()).set(f64::from(n));
        }
    }
    sample_backlog(app);
    metrics::gauge!(READY).set(if app.readiness().ready { 1.0 } else { 0.0 });
    let stalled = app.drain_stalled(&status).is_some();
    metrics::gauge!(DRAIN_STALLED).set(if stalled { 1.0 } else { 0.0 });
    metrics::gauge!(PLUGINS_LOADED).set(app.reloader.plugins().len() as f64);
    metrics::gauge!(PLUGINS_FAILED).set(app.failed_plugins().len() as f64);
}

/// The backlog gauges of every route: what waits at the broker (the
/// consumer check's counts) and what Warren handles now. The spool's depth
/// is the host's (`warren_spool_depth`): outputs of every route share it.
fn sample_backlog(app: &AdminView) {
    let checks: std::collections::HashMap<String, (Option<u32>, Option<u32>)> = app
        .amqp
        .consumers()
        .into_iter()
        .map(|c| (c.queue, (c.broker_messages, c.unacked)))
        .collect();
    for (queue, plugin, in_flight) in app.dispatcher.in_flight() {
        let labels = [("queue", queue.clone()), ("plugin", plugin)];
        metrics::gauge!(ROUTE_IN_FLIGHT, &labels).set(in_flight as f64);
        let (ready, unacked) = checks.get(&queue).copied().unwrap_or((None, None));
        if let Some(n) = ready {
            metrics::gauge!(ROUTE_READY, &labels).set(f64::from(n));
        }
        if let Some(n) = unacked {
            metrics::gauge!(ROUTE_UNACKED, &labels).set(f64::from(n));
        }
    }
}
