//! Signals and the shutdown order.
//!
//! The order, carried out by `app::App::shutdown` when the first SIGTERM or
//! SIGINT arrives, all of it within one grace period
//! (`shutdown.grace-period-ms`, one deadline for every phase):
//! 1. readiness goes false (load balancers stop sending work);
//! 2. every consumer is cancelled (`basic.cancel`): no new deliveries;
//! 3. in-flight deliveries finish, their outputs are confirmed or spooled,
//!    and they are acked, all within the grace period; what does not finish
//!    stays unacked and the broker redelivers it;
//! 4. the spool drainer stops, and the spool writer finishes the appends
//!    already queued;
//! 5. channels and the connection close; the admin server stops last.
//!
//! `main` waits for the signals and enforces the deadline on a runtime of
//! its own, so plugins that keep the app's workers busy delay neither;
//! at the deadline it abandons the stop where it is. A second signal ends
//! the process at once with status 130. SIGHUP does not stop
//! anything: it reloads the plugins (`app::reload_on_hangup`). A leaf: it
//! knows signals and its own section, nothing of what a stop or a reload
//! does.

use documented::{DocumentedFieldsOpt, DocumentedOpt};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};

/// `[shutdown]`: stopping.
#[derive(Debug, Clone, Deserialize, Serialize, DocumentedOpt, DocumentedFieldsOpt)]
#[serde(rename_all = "kebab-case", default)]
pub struct ShutdownConfig {
    /// How long the whole stop may take after SIGTERM or SIGINT, ms:
    /// in-flight deliveries finish and are acked, the spool and the
    /// connections close, all by this one deadline. What is unfinished then
    /// stays unacked and the broker redelivers it. A second signal ends
    /// the process at once (exit 130).
    pub grace_period_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace_period_ms: 30_000,
        }
    }
}

impl ShutdownConfig {
    /// Every problem with this section.
    pub fn problems(&self) -> Vec<String> {
        if self.grace_period_ms == 0 {
            vec!["shutdown.grace-period-ms must be at least 1".into()]
        } else {
            Vec::new()
        }
    }

    /// The grace period: the whole stop's deadline.
    pub fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.grace_period_ms)
    }
}

/// Which signal asked us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Terminate,
    Interrupt,
}

/// Wait for SIGTERM or SIGINT. If the handlers cannot be installed, never
/// resolves (and logs why): the process then only stops when killed.
pub async fn wait_for_signal() -> StopSignal {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("Cannot install signal handlers; stop the process with SIGKILL.");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => StopSignal::Terminate,
        _ = int.recv() => StopSignal::Interrupt,
    }
}

/// The SIGHUP handler, installed before anything starts so that a SIGHUP
/// sent early does not end the process (its default action). `None`, and
/// a warning, when it cannot be installed.
pub fn hangups() -> Option<tokio::signal::unix::Signal> {
    let hup = signal(SignalKind::hangup()).ok();
    if hup.is_none() {
        tracing::warn!("Cannot install the SIGHUP handler; reload plugins through the admin API.");
    }
    hup
}
