//! What the supervisor publishes about its connection: the life-cycle
//! state and the status around it (generation, last failure, the broker
//! talked to, queues used as they are).

use std::collections::BTreeMap;

use super::failure::Failure;
use super::server::ServerInfo;
use super::topology::ArgumentDiff;

/// The connection's life-cycle state.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnectionState {
    /// Opening a connection.
    Connecting {
        /// Attempts since the last healthy session (one that ran at least
        /// the backoff's cap); 0 = first.
        attempt: u32,
    },
    /// Connected; declaring the topology.
    Declaring,
    /// Connected, topology declared, consumers started.
    Running,
    /// The broker blocked publishing (resource alarm).
    Blocked {
        /// The broker's reason.
        reason: String,
    },
    /// Waiting to reconnect after a failure.
    Recovering {
        /// Attempts since the last healthy session.
        attempt: u32,
        /// What went wrong last.
        failure: Failure,
    },
    /// The broker refused the credentials or vhost (403/530); retrying at
    /// the backoff cap.
    AuthFailed {
        /// Attempts since the last healthy session.
        attempt: u32,
        /// The refusal.
        failure: Failure,
    },
    /// Shutting down cleanly.
    Stopping,
    /// Stopped for good.
    Stopped,
}

impl ConnectionState {
    /// A short name for status output.
    pub fn name(&self) -> &'static str {
        match self {
            ConnectionState::Connecting { .. } => "connecting",
            ConnectionState::Declaring => "declaring",
            ConnectionState::Running => "running",
            ConnectionState::Blocked { .. } => "blocked",
            ConnectionState::Recovering { .. } => "recovering",
            ConnectionState::AuthFailed { .. } => "auth-failed",
            ConnectionState::Stopping => "stopping",
            ConnectionState::Stopped => "stopped",
        }
    }
}

/// What the supervisor publishes on its watch channel.
#[derive(Debug, Clone, PartialEq)]
pub struct AmqpStatus {
    /// The state.
    pub state: ConnectionState,
    /// The generation of the current (or last) session; 0 before the first.
    pub generation: u64,
    /// The last classified failure, kept after recovery.
    pub last_failure: Option<Failure>,
    /// Connection attempts since start.
    pub connect_attempts: u64,
    /// Topology declarations that failed in the current session.
    pub declaration_errors: Vec<String>,
    /// When the current (or last) session's connection was established.
    pub session_started: Option<std::time::Instant>,
    /// Queues that exist with other settings than Warren declares, each
    /// used as it is, and what differs.
    pub queue_differences: BTreeMap<String, Vec<ArgumentDiff>>,
    /// The broker the current (or last) session talks to, from the
    /// connection's server properties.
    pub server: Option<ServerInfo>,
    /// The endpoint (redacted URL) of the current (or last) session.
    pub endpoint: Option<String>,
}

impl AmqpStatus {
    /// Connected and running (blocked counts as connected but not ready).
    pub fn is_running(&self) -> bool {
        self.state == ConnectionState::Running
    }

    /// The broker is blocking publishes (`connection.blocked`).
    pub fn is_blocked(&self) -> bool {
        matches!(self.state, ConnectionState::Blocked { .. })
    }

    /// A session is up (running or blocked).
    pub fn is_connected(&self) -> bool {
        matches!(
            self.state,
            ConnectionState::Running | ConnectionState::Blocked { .. }
        )
    }
}
