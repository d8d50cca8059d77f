//! What the spool shows in `/status`.

use serde::Serialize;

use crate::buffer::drainer::{DrainStats, DrainerState};

/// A snapshot of the spool for `/status` and readiness.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct SpoolStatus {
    /// True with Sentinel; false in plain-URL development mode.
    pub highly_available: bool,
    /// "sentinel" or "not highly available (single Redis URL)".
    pub mode: String,
    /// The stream key.
    pub stream_key: String,
    /// `ip:port` of the primary in use, if connected.
    pub primary: Option<String>,
    /// Incremented on every (re)connection to a primary.
    pub primary_generation: u64,
    /// Replicas each append waits for on the current primary.
    pub wait_for_replicas: u32,
    /// The last connection or write failure, cleared on reconnect.
    pub last_error: Option<String>,
    /// Start-up check findings on the current primary (`appendonly no`,
    /// `min-replicas-to-write 0`, an evicting `maxmemory-policy`).
    pub config_warnings: Vec<String>,
    /// Entries in the stream (appended, not yet drained).
    pub depth: u64,
    /// Payload bytes in the stream.
    pub bytes: u64,
    /// Age of the oldest entry.
    pub oldest_age_ms: Option<u64>,
    /// Appends acknowledged since start.
    pub appended: u64,
    /// Entries republished and deleted since start.
    pub drained: u64,
    /// Appends refused since start.
    pub refused: u64,
    /// The drainer's state.
    pub drainer: DrainerState,
    /// How the drain has gone since start.
    pub drain: DrainStats,
    /// With entries waiting: how long nothing has drained (counted from the
    /// last drained entry or, if later, the oldest entry's append).
    pub drain_idle_ms: Option<u64>,
    /// Other hosts' streams drained by this one.
    pub adoption: Adoption,
}

/// Other hosts' streams this host has drained (see `buffer::adopt`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Adoption {
    /// The stream being drained now, if any.
    pub draining: Option<String>,
    /// Streams drained empty since start.
    pub streams: u64,
    /// Entries republished from adopted streams and deleted.
    pub entries: u64,
    /// The last attempt that stopped part-way, and why.
    pub last_failure: Option<String>,
}
