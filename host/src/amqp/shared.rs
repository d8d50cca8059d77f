//! The state the supervisor, its session's tasks and the handles share:
//! the status watch, the registered subscriptions, the topology registry
//! and the command queue to the supervisor.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::{mpsc, oneshot, watch};
use tracing::warn;

use super::consumer::{Delivery, SubscriptionConfig, SubscriptionStatus};
use super::failure::AmqpError;
use super::metrics;
use super::status::{AmqpStatus, ConnectionState};
use super::topology::{ArgumentDiff, Topology, TopologyRegistry};

/// A request from a handle to the supervisor.
pub(crate) enum Command {
    Start(String),
    Stop(String, oneshot::Sender<()>),
    Declare(Topology, oneshot::Sender<Result<(), AmqpError>>),
}

/// A registered subscription, alive across sessions.
pub(crate) struct SubEntry {
    pub(crate) config: SubscriptionConfig,
    pub(crate) tx: mpsc::Sender<Delivery>,
    pub(crate) status: SubscriptionStatus,
}

/// State shared by the supervisor, its tasks and the handles.
pub(crate) struct Shared {
    pub(crate) status: watch::Sender<AmqpStatus>,
    pub(crate) subs: Mutex<BTreeMap<String, SubEntry>>,
    pub(crate) topology: TopologyRegistry,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    pub(crate) epochs: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub(crate) fn update_sub(&self, queue: &str, f: impl FnOnce(&mut SubscriptionStatus)) {
        let mut subs = crate::sync::lock(&self.subs);
        if let Some(e) = subs.get_mut(queue) {
            f(&mut e.status);
        }
    }

    pub(crate) fn sub(&self, queue: &str) -> Option<(SubscriptionConfig, mpsc::Sender<Delivery>)> {
        let subs = crate::sync::lock(&self.subs);
        subs.get(queue).map(|e| (e.config.clone(), e.tx.clone()))
    }

    pub(super) fn sub_names(&self) -> Vec<String> {
        let subs = crate::sync::lock(&self.subs);
        subs.keys().cloned().collect()
    }

    /// Registered, but its subscriber dropped the receiver.
    pub(super) fn receiver_gone(&self, queue: &str) -> bool {
        self.sub(queue).is_some_and(|(_, tx)| tx.is_closed())
    }

    pub(super) fn remove_sub(&self, queue: &str) {
        let mut subs = crate::sync::lock(&self.subs);
        subs.remove(queue);
    }

    pub(super) fn set_state(&self, state: ConnectionState) {
        metrics::connected(matches!(
            state,
            ConnectionState::Running | ConnectionState::Blocked { .. }
        ));
        self.status.send_modify(|s| s.state = state);
    }
}

impl Shared {
    /// Record what differs on `queue` (nothing: it matches). Logged once
    /// per change, with the fix.
    pub(crate) fn record_differences(&self, queue: &str, diffs: Vec<ArgumentDiff>) {
        self.status.send_if_modified(|s| {
            let known = s.queue_differences.get(queue).map_or(&[][..], Vec::as_slice);
            if known == diffs.as_slice() {
                return false;
            }
            for d in &diffs {
                warn!(queue, argument = %d.argument, declared = %d.declared, existing = %d.existing, remedy = d.remedy(), "Queue exists with another setting than Warren declares; consuming it as it is.");
            }
            if diffs.is_empty() {
                s.queue_differences.remove(queue);
            } else {
                s.queue_differences.insert(queue.to_owned(), diffs);
            }
            true
        });
    }
}
