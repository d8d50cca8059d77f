//! Spool adoption: a live host drains the streams of hosts that are gone.
//!
//! Each host spools to its own stream (`warren:spool:<host-id>`) and, while
//! it lives, renews a claim on it (`{stream}:owner`, every status interval,
//! expiring after `owner_lease_ms`). A host that is replaced under a new id
//! (a new pod name) never renews its old claim again, and what it spooled
//! during an outage would otherwise never be republished. The [`Adopter`]
//! looks for such streams — `warren:spool:*`, not empty, no claim, no drain
//! lease — and drains each one to empty through the same drainer code as
//! the host's own stream.
//!
//! # Order, and who may drain
//! - **One drainer per stream at a time.** The adopter takes the stream's
//!   own drain lease (`{stream}:drain-lock`), the one its owner's drainer
//!   takes, so an adopter never publishes beside the owner, another
//!   adopter, or the owner's drainer that is still finishing.
//! - **The owner wins.** The adopter's lease script refuses to take *or
//!   renew* the lease while the owner's claim exists. An owner restarted
//!   before its claim expired renews it at once and is never adopted; an
//!   owner that comes back later renews its claim, the adopter's next
//!   renewal (within a third of the lease) fails, it stops sending,
//!   collects the confirms in flight, deletes what was confirmed and
//!   releases the lease, and the owner's drainer goes on from the head.
//! - **Stream order.** Like the owner's drainer, the adopter reads from the
//!   head and deletes strictly in order, so the stream is always
//!   "everything not yet confirmed" and whoever drains next starts exactly
//!   where the last one stopped.
//!
//! # What a duplicate costs
//! Entries the dead host had published but not yet deleted (at most its
//! drain window, 1,024 by default) are published again by the adopter,
//! with the same `message_id`; so are entries a failed pass leaves in
//! flight, as for the owner's own drain. Nothing is lost: an entry leaves a
//! stream only after the broker confirmed it.
//!
//! Deliberately not done here: streams under a custom `stream_key` outside
//! `warren:spool:*` are not found; a claimless empty stream is left alone.

use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::drainer::{Adopted, Drainer};
use super::spool::Shared;
use super::{DrainPublisher, DrainerConfig, DrainerHandle, SpoolConfig, SpoolError, SpoolHandle};

/// Where spool streams live; every host's default key matches.
const STREAM_PATTERN: &str = "warren:spool:*";

/// Finds orphaned streams and drains them, one at a time, with its own
/// publisher. `adopter.run(cancel)`.
pub struct Adopter<P: DrainPublisher> {
    cfg: DrainerConfig,
    spool: std::sync::Arc<Shared>,
    /// Moved into each adopted stream's drainer and back; `None` only while
    /// one runs.
    publisher: Option<P>,
    /// The host drainer's on/off switch: adoption pauses with it.
    enabled: watch::Receiver<bool>,
}

impl<P: DrainPublisher> Adopter<P> {
    /// An adopter for the streams next to `spool`'s, following `drainer`'s
    /// pause and resume.
    pub fn new(
        cfg: DrainerConfig,
        spool: &SpoolHandle,
        drainer: &DrainerHandle,
        publisher: P,
    ) -> Result<Adopter<P>, SpoolError> {
        cfg.validate()?;
        Ok(Adopter {
            cfg,
            spool: spool.shared.clone(),
            publisher: Some(publisher),
            enabled: drainer.subscribe(),
        })
    }

    /// How often to look for orphans: a few times per owner lease, jittered
    /// so that hosts started together do not scan together.
    fn scan_interval(&self) -> Duration {
        let base = self.spool.cfg.owner_lease_ms / 3;
        Duration::from_millis(rand::random_range(base / 2..=base.max(1)))
    }

    /// Look for orphans and drain them until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        debug!(pattern = STREAM_PATTERN, "Spool adopter starting.");
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(self.scan_interval()) => {}
            }
            if !*self.enabled.borrow_and_update() {
                continue;
            }
            let orphans = match self.orphans().await {
                Ok(o) => o,
                Err(e) => {
                    debug!(error = %e, "Cannot look for orphaned spool streams.");
                    continue;
                }
            };
            for key in orphans {
                if cancel.is_cancelled() || !*self.enabled.borrow() {
                    break;
                }
                self.adopt(key, &cancel).await;
            }
        }
    }

    /// Drain `key` once; the publisher comes back for the next stream.
    async fn adopt(&mut self, key: String, cancel: &CancellationToken) {
        let owner = SpoolConfig::owner_key(&key);
        let stream = self.spool.adopted(key.clone());
        info!(stream = %key, "Adopting the spool stream of a host that is gone.");
        self.spool.set_adoption(|a| a.draining = Some(key.clone()));
        let Some(publisher) = self.publisher.take() else {
            return;
        };
        let drainer = Drainer::adopting(
            self.cfg.clone(),
            stream.clone(),
            publisher,
            self.enabled.clone(),
            owner,
        );
        let (publisher, outcome) = drainer.run_adopted(cancel).await;
        self.publisher = Some(publisher);
        let entries = stream.drained_total();
        self.spool.set_adoption(|a| {
            a.draining = None;
            a.entries += entries;
            match &outcome {
                Adopted::Drained => a.streams += 1,
                Adopted::Interrupted(Some(why)) => a.last_failure = Some(format!("{key}: {why}")),
                _ => {}
            }
        });
        match outcome {
            Adopted::Drained => info!(stream = %key, entries, "Adopted spool stream drained."),
            Adopted::Declined => {
                info!(stream = %key, entries, "Adopted spool stream handed back: its owner or another host holds it.")
            }
            Adopted::Interrupted(why) => {
                warn!(stream = %key, entries, error = why.as_deref().unwrap_or("stopped"), "Draining an adopted spool stream stopped part-way; it is tried again later.")
            }
        }
        metrics::counter!(super::metric::ADOPTED).increment(entries);
    }

    /// Streams that match [`STREAM_PATTERN`], are not this host's, hold
    /// entries, and have neither an owner's claim nor a drain lease.
    async fn orphans(&self) -> Result<Vec<String>, SpoolError> {
        let link = self.spool.primary.get().await?;
        let mut conn = link.conn();
        let mut cursor: u64 = 0;
        let mut streams = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(STREAM_PATTERN)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut conn)
                .await
                .map_err(|e| SpoolError::from_redis(&link.addr, e))?;
            streams.extend(
                keys.into_iter()
                    .filter(|k| *k != self.spool.key && !k.ends_with(":corrupt")),
            );
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut orphans = Vec::new();
        for key in streams {
            let mut p = redis::pipe();
            p.cmd("EXISTS")
                .arg(SpoolConfig::owner_key(&key))
                .cmd("EXISTS")
                .arg(format!("{key}:drain-lock"))
                .cmd("XLEN")
                .arg(&key);
            let (claimed, leased, len): (u64, u64, u64) = p
                .query_async(&mut conn)
                .await
                .map_err(|e| SpoolError::from_redis(&link.addr, e))?;
            if claimed == 0 && leased == 0 && len > 0 {
                orphans.push(key);
            }
        }
        Ok(orphans)
    }
}
