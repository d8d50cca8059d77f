//! The `/status` document: everything an operator asks first, from the
//! handles, in one JSON object.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{AdminView, Readiness};
use crate::amqp::{ConnectionState, ConsumerState, Failure};
use crate::buffer::SpoolStatus;
use crate::dispatch::RouteInfo;
use crate::dispatch::reload::FailedPlugin;

#[derive(Serialize)]
pub(crate) struct Status {
    pub ready: bool,
    pub reasons: Vec<String>,
    /// Ready but buffering outputs in the spool (or the spool is not
    /// highly available).
    pub degraded: Vec<String>,
    pub connection: Connection,
    pub consumers: Vec<Consumer>,
    pub spool: Spool,
    pub plugins: Vec<super::handlers::PluginView>,
    pub routes: Vec<RouteInfo>,
    pub failed_plugins: Vec<FailedPlugin>,
    /// Key-value state by plugin (those with `state` loaded since start):
    /// keys and bytes held (null when Redis did not answer), commits,
    /// keys written, discarded write calls.
    pub kv: std::collections::BTreeMap<String, crate::kv::KvPluginStatus>,
    /// Components loaded from the compile cache and compiled since start
    /// (absent with the cache off).
    pub compile_cache: Option<crate::plugins::CompileCacheStats>,
}

#[derive(Serialize)]
pub(crate) struct Connection {
    pub state: &'static str,
    pub generation: u64,
    pub connect_attempts: u64,
    pub last_failure: Option<FailureView>,
    pub declaration_errors: Vec<String>,
    /// The broker's product and version, from the connection's server
    /// properties (the current or last session).
    pub server: Option<crate::amqp::ServerInfo>,
    /// The endpoint (redacted URL) of the current or last session.
    pub endpoint: Option<String>,
    /// Queues consumed as they exist although their settings differ from
    /// Warren's declaration, with each difference.
    pub queue_differences: std::collections::BTreeMap<String, Vec<crate::amqp::ArgumentDiff>>,
    /// Publishes the broker nacked (a failure class of their own: the
    /// channel that took the nack is replaced).
    pub publish_nacks: PublishNacks,
}

#[derive(Serialize)]
pub(crate) struct PublishNacks {
    pub nacks: u64,
    pub channels_replaced: u64,
    pub last_unix_ms: Option<u64>,
}

#[derive(Serialize)]
pub(crate) struct FailureView {
    pub class: &'static str,
    pub message: String,
    pub generation: Option<u64>,
    pub at_unix_ms: u64,
}

impl From<&Failure> for FailureView {
    fn from(f: &Failure) -> Self {
        FailureView {
            class: f.class.as_str(),
            message: f.message.clone(),
            generation: f.generation,
            at_unix_ms: unix_ms(f.at),
        }
    }
}

#[derive(Serialize)]
pub(crate) struct Consumer {
    pub queue: String,
    pub state: &'static str,
    pub prefetch: u16,
    /// Consumers Warren believes it has on the queue.
    pub consumers: u32,
    /// The broker's count at the last check.
    pub broker_consumers: Option<u32>,
    pub broker_checked_unix_ms: Option<u64>,
    /// Ready messages at the last check (the lag).
    pub broker_messages: Option<u32>,
    pub generation: u64,
    pub reestablished: u64,
    pub zombies: u64,
    /// Periodic checks that got no answer in time.
    pub check_timeouts: u64,
    /// Times the broker's consumer timeout ended the consumer.
    pub consumer_timeouts: u64,
    /// Why the consumer was last lost on a live connection
    /// (`consumer_timeout`, or `other` with the reason).
    pub last_loss: Option<FailureView>,
    pub last_error: Option<String>,
    pub last_error_class: Option<&'static str>,
}

#[derive(Serialize)]
pub(crate) struct Spool {
    #[serde(flatten)]
    pub status: SpoolStatus,
    /// "not highly available" on a plain Redis URL.
    pub availability: &'static str,
}

pub(crate) fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub(crate) fn consumer_state(s: &ConsumerState) -> &'static str {
    match s {
        ConsumerState::Idle => "idle",
        ConsumerState::Starting => "starting",
        ConsumerState::Running => "running",
        ConsumerState::Reestablishing => "reestablishing",
        ConsumerState::Failed => "failed",
        ConsumerState::Stopping => "stopping",
    }
}

impl Status {
    pub(crate) async fn collect(app: &AdminView) -> Status {
        let Readiness {
            ready,
            reasons,
            degraded,
        } = app.readiness();
        let amqp = app.amqp.status_now();
        // A fresh snapshot: it never waits for Redis (the primary is read
        // from its watch).
        let spool = app.spool.status().await;
        let consumers = app
            .amqp
            .consumers()
            .into_iter()
            .map(|c| Consumer {
                state: consumer_state(&c.state),
                prefetch: c.prefetch,
                consumers: c.believed_consumers,
                broker_consumers: c.broker_consumers.map(|(n, _)| n),
                broker_checked_unix_ms: c.broker_consumers.map(|(_, t)| unix_ms(t)),
                broker_messages: c.broker_messages,
                generation: c.generation,
                reestablished: c.reestablished,
                zombies: c.zombies,
                check_timeouts: c.check_timeouts,
                consumer_timeouts: c.consumer_timeouts,
                last_loss: c.last_loss.as_ref().map(FailureView::from),
                last_error: c.last_error,
                last_error_class: c.last_error_class.map(|c| c.as_str()),
                queue: c.queue,
            })
            .collect();
        Status {
            ready,
            reasons,
            degraded,
            connection: Connection {
                state: amqp.state.name(),
                generation: amqp.generation,
                connect_attempts: amqp.connect_attempts,
                last_failure: amqp
                    .last_failure
                    .as_ref()
                    .or(match &amqp.state {
                        ConnectionState::Recovering { failure, .. }
                        | ConnectionState::AuthFailed { failure, .. } => Some(failure),
                        _ => None,
                    })
                    .map(FailureView::from),
                declaration_errors: amqp.declaration_errors,
                server: amqp.server,
                endpoint: amqp.endpoint,
                publish_nacks: {
                    let n = app.amqp.publisher().nacks();
                    PublishNacks {
                        nacks: n.nacks,
                        channels_replaced: n.channels_replaced,
                        last_unix_ms: n.last.map(unix_ms),
                    }
                },
                queue_differences: amqp.queue_differences,
            },
            consumers,
            spool: Spool {
                availability: if spool.highly_available {
                    "highly available (sentinel)"
                } else {
                    "not highly available"
                },
                status: spool,
            },
            plugins: super::handlers::plugin_views(app),
            routes: app.dispatcher.route_info(),
            failed_plugins: app.failed_plugins(),
            kv: tokio::time::timeout(Duration::from_secs(1), app.kv.status())
                .await
                .unwrap_or_default(),
            compile_cache: app.reloader.runtime().compile_cache_stats(),
        }
    }
}
