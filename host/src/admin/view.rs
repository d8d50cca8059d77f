//! What the admin API reads: the subsystems' handles, and what only the
//! wiring can answer ([`Wiring`]). `app` fills an [`AdminView`] and hands
//! it to [`super::router`]; the admin module never sees the app itself.

use std::sync::Arc;
use std::time::Duration;

use crate::amqp::{AmqpHandle, AmqpStatus};
use crate::buffer::SpoolHandle;
use crate::dispatch::Dispatcher;
use crate::dispatch::reload::{FailedPlugin, Reloader};

/// Whether Warren should receive work, and if not, why; and what works
/// but not as it should.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// Empty when ready.
    pub reasons: Vec<String>,
    /// Working, but worse than it should: outputs waiting in the spool, a
    /// drain that makes no progress while the broker is up, a spool that
    /// is not highly available. Never makes `ready` false.
    pub degraded: Vec<String>,
}

/// The answers that need the whole running Warren, given by the wiring.
pub trait Wiring: Send + Sync + 'static {
    /// `/ready` and the readiness in `/status`.
    fn readiness(&self) -> Readiness;
    /// How long the drain has made no progress while it could have, once
    /// that is long enough to count as stalled.
    fn drain_stalled(&self, amqp: &AmqpStatus) -> Option<Duration>;
    /// The effective configuration as `warren config` prints it
    /// (`/config`).
    fn config_text(&self) -> String;
}

/// Read-only views of a running Warren, and the reloader and outbox the
/// mutating endpoints act through.
#[derive(Clone)]
pub struct AdminView {
    pub amqp: AmqpHandle,
    pub spool: SpoolHandle,
    /// Plugins' key-value state.
    pub kv: crate::kv::Store,
    pub dispatcher: Arc<Dispatcher>,
    /// The plugin set; reloads go through it.
    pub reloader: Arc<Reloader>,
    /// The process-wide Prometheus recorder (`None` if another recorder
    /// was installed first).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub wiring: Arc<dyn Wiring>,
}

impl AdminView {
    pub(crate) fn readiness(&self) -> Readiness {
        self.wiring.readiness()
    }

    pub(crate) fn drain_stalled(&self, amqp: &AmqpStatus) -> Option<Duration> {
        self.wiring.drain_stalled(amqp)
    }

    /// Plugin files that failed to load at start or at the last reload.
    pub(crate) fn failed_plugins(&self) -> Vec<FailedPlugin> {
        self.reloader.failed()
    }
}
