//! The outage spool: Sentinel primary discovery, a Redis Stream of
//! outbound messages, and the drainer. Knows nothing of AMQP or plugins:
//! the drainer publishes through a [`DrainPublisher`] it is given.
//!
//! Owns: the connection to the current Redis primary (one per primary
//! generation, dropped on failover, never recycled), the writer task that
//! group-commits appends, and the drain loop. Does not decide *when* to
//! spool — the outbox does, using [`SpoolHandle::is_empty`] to keep order.
//!
//! # Use
//! ```no_run
//! # async fn demo() -> Result<(), warren::buffer::SpoolError> {
//! use tokio_util::sync::CancellationToken;
//! use warren::buffer::{Drainer, DrainerConfig, FnPublisher, Spool, SpoolConfig};
//! use warren::message::OutboundMessage;
//!
//! let cfg = SpoolConfig::sentinel(["redis://127.0.0.1:26379"], "mymaster", "host-a");
//! let (spool, handle) = Spool::new(cfg)?;
//! let cancel = CancellationToken::new();
//! let tasks = tokio_util::task::TaskTracker::new();
//! tasks.spawn(spool.run(cancel.child_token()));
//! let id = handle.append(OutboundMessage::new("ex", "rk", "body")).await?;
//! let publish = FnPublisher(|m: OutboundMessage| async move { Ok::<(), String>(drop(m)) });
//! let (drainer, control) = Drainer::new(DrainerConfig::default(), &handle, publish)?;
//! tasks.spawn(drainer.run(cancel.child_token()));
//! # let _ = (id, control); Ok(()) }
//! ```
//!
//! # Layout
//! - `config`: [`SpoolConfig`] (the `[spool]` section, validated) and [`DrainerConfig`] (the drainer's tuning).
//! - `error`: [`SpoolError`] and its classifiers.
//! - `sentinel`: primary discovery and failover following (why not
//!   deadpool's sentinel pool is explained there).
//! - `spool`: [`Spool`], [`SpoolHandle`], the group-committing writer,
//!   status.
//! - `drainer`: [`Drainer`], [`DrainerHandle`], [`DrainPublisher`]; its
//!   window, its Redis side, one pass, and the record it keeps for status
//!   ([`DrainerState`], [`DrainStats`]), each in a file of its own.
//! - `adopt`: [`Adopter`], which drains the streams of hosts that are gone.

mod adopt;
mod config;
mod drainer;
mod error;
mod sentinel;
mod spool;

pub use adopt::Adopter;
pub use config::{DrainerConfig, SpoolConfig};
pub use drainer::{DrainPublisher, DrainStats, Drainer, DrainerHandle, DrainerState, FnPublisher};
pub use error::SpoolError;
/// Primary discovery, shared with the key-value store (`crate::kv`).
pub(crate) use sentinel::Primary;
pub(crate) use spool::replicated;
pub use spool::{Adoption, EntryId, Spool, SpoolHandle, SpoolStatus};

/// Metric names (Prometheus), defined in one place. No labels: one spool
/// per process.
pub mod metric {
    /// Gauge: entries in the spool.
    pub const DEPTH: &str = "warren_spool_depth";
    /// Gauge: payload bytes in the spool.
    pub const BYTES: &str = "warren_spool_bytes";
    /// Gauge: age of the oldest entry, seconds.
    pub const OLDEST_AGE: &str = "warren_spool_oldest_age_seconds";
    /// Gauge: 1 while connected to a primary.
    pub const CONNECTED: &str = "warren_spool_primary_connected";
    /// Counter: appends acknowledged.
    pub const APPENDED: &str = "warren_spool_appended_total";
    /// Counter: appends refused.
    pub const REFUSED: &str = "warren_spool_refused_total";
    /// Counter: entries republished and deleted.
    pub const DRAINED: &str = "warren_spool_drained_total";
    /// Counter: drainer pauses after a failure.
    pub const DRAIN_PAUSES: &str = "warren_spool_drain_pauses_total";
    /// Counter: (re)connections to a primary.
    pub const PRIMARY_RESOLVED: &str = "warren_spool_primary_resolved_total";
    /// Counter: entries republished from other hosts' adopted streams.
    pub const ADOPTED: &str = "warren_spool_adopted_total";
    /// Counter: `+switch-master` notifications for our master.
    pub const SWITCH_MASTER: &str = "warren_spool_switch_master_total";
    /// Histogram: seconds an accepted append took (written on the primary
    /// and confirmed by the required replicas).
    pub const APPEND_SECONDS: &str = "warren_spool_append_seconds";
    /// Counter: Redis replies of a type or value Warren did not expect
    /// (the connection is kept).
    pub const UNEXPECTED_REPLIES: &str = "warren_spool_unexpected_replies_total";

    /// HELP text of every metric above.
    pub(crate) fn describe() {
        use metrics::{describe_counter, describe_gauge, describe_histogram};
        describe_gauge!(DEPTH, "Entries waiting in this host's spool stream.");
        describe_gauge!(
            BYTES,
            metrics::Unit::Bytes,
            "Payload bytes waiting in this host's spool stream."
        );
        describe_gauge!(
            OLDEST_AGE,
            metrics::Unit::Seconds,
            "Age of the oldest entry in this host's spool stream, seconds."
        );
        describe_gauge!(CONNECTED, "1 while connected to the spool's primary.");
        describe_counter!(APPENDED, "Spool appends acknowledged.");
        describe_counter!(
            REFUSED,
            "Spool appends refused (full, no primary, not replicated in time)."
        );
        describe_counter!(
            DRAINED,
            "Spool entries republished to the broker and deleted."
        );
        describe_counter!(DRAIN_PAUSES, "Spool drainer pauses after a failure.");
        describe_counter!(PRIMARY_RESOLVED, "(Re)connections to a spool primary.");
        describe_counter!(
            UNEXPECTED_REPLIES,
            "Redis replies of a type or value Warren did not expect; the connection is kept."
        );
        describe_counter!(
            ADOPTED,
            "Entries republished from the streams of hosts that are gone."
        );
        describe_counter!(
            SWITCH_MASTER,
            "Sentinel +switch-master notifications for the spool's master."
        );
        describe_histogram!(
            APPEND_SECONDS,
            metrics::Unit::Seconds,
            "Seconds an accepted spool append took, replicas' confirmation included."
        );
        // Dashboards and alerts take the rate of these; a series that
        // appears only at its first increment has no rate until then.
        for name in [
            APPENDED,
            REFUSED,
            DRAINED,
            DRAIN_PAUSES,
            ADOPTED,
            PRIMARY_RESOLVED,
        ] {
            metrics::counter!(name).increment(0);
        }
    }
}
