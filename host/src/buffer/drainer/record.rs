//! What a drainer reports about itself for status: its state, its
//! window and its record since start. Only the drainer writes it; the
//! spool's status reads it.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::Notify;

/// What the drainer is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum DrainerState {
    /// No drainer runs in this process.
    #[default]
    NotRunning,
    /// Turned off through [`crate::buffer::DrainerHandle::pause`].
    Disabled,
    /// Another process holds the drain lease for this stream.
    Standby,
    /// Holding the lease; nothing to drain.
    Idle,
    /// Republishing entries.
    Draining,
    /// A publish or Redis call failed; retrying after a backoff.
    Paused { error: String, retry_in_ms: u64 },
}

/// The drainer's record since start: `republished - drained` is how many
/// publishes were repeated (each a possible duplicate downstream).
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct DrainStats {
    /// Entries handed to the broker by the drainer, repeats included.
    pub republished: u64,
    /// Passes that ended in a failure and a pause.
    pub pauses: u64,
    /// Confirms the drainer awaits at once now: the configured window,
    /// halved after each failed pass and doubled back as confirms arrive.
    pub window: u64,
    /// Why the last failed pass failed.
    pub last_failure: Option<String>,
}

/// The drainer's side of the spool's state, owned by the drainer's code:
/// the spool holds it only to show it in status.
#[derive(Default)]
pub(crate) struct DrainRecord {
    state: Mutex<DrainerState>,
    republished: AtomicU64,
    pauses: AtomicU64,
    window: AtomicU64,
    last_failure: Mutex<Option<String>>,
    /// Woken when the broker may take publishes again (a new session, an
    /// unblocked connection): ends a drainer's backoff pause at once.
    pub(super) wake: Notify,
}

impl DrainRecord {
    pub(super) fn set_state(&self, state: DrainerState) {
        let mut g = crate::sync::lock(&self.state);
        if *g != state {
            *g = state;
        }
    }

    /// One more entry handed to the broker by the drainer.
    pub(super) fn republished(&self) {
        self.republished.fetch_add(1, Ordering::Relaxed);
    }

    /// A drain pass failed with `error`; the drainer pauses.
    pub(super) fn paused(&self, error: &str) {
        self.pauses.fetch_add(1, Ordering::Relaxed);
        *crate::sync::lock(&self.last_failure) = Some(error.to_owned());
    }

    /// The drainer's current window.
    pub(super) fn set_window(&self, window: usize) {
        self.window.store(window as u64, Ordering::Relaxed);
    }

    pub(crate) fn state(&self) -> DrainerState {
        crate::sync::lock(&self.state).clone()
    }

    /// Why the last failed pass failed.
    pub(crate) fn last_failure(&self) -> Option<String> {
        crate::sync::lock(&self.last_failure).clone()
    }

    pub(crate) fn stats(&self) -> DrainStats {
        DrainStats {
            republished: self.republished.load(Ordering::Relaxed),
            pauses: self.pauses.load(Ordering::Relaxed),
            window: self.window.load(Ordering::Relaxed),
            last_failure: self.last_failure(),
        }
    }
}
