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
//! - `config`: [`SpoolConfig`], [`DrainerConfig`] (serde, validated).
//! - `error`: [`SpoolError`] and its classifiers.
//! - `sentinel`: primary discovery and failover following (why not
//!   deadpool's sentinel pool is explained there).
//! - `spool`: [`Spool`], [`SpoolHandle`], the group-committing writer,
//!   status.
//! - `drainer`: [`Drainer`], [`DrainerHandle`], [`DrainPublisher`].
//! - `adopt`: [`Adopter`], which drains the streams of hosts that are gone.

mod adopt;
mod config;
mod drainer;
mod error;
mod sentinel;
mod spool;

pub use adopt::Adopter;
pub use config::{DrainerConfig, SpoolConfig};
pub use drainer::{DrainPublisher, Drainer, DrainerHandle, FnPublisher};
pub use error::SpoolError;
pub use spool::{Adoption, DrainStats, DrainerState, EntryId, Spool, SpoolHandle, SpoolStatus};

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
}
